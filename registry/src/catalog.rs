//! The writer's working copy of the catalog and the commands that change it.
//!
//! Only the writer task owns a `Catalog`. Each command either applies completely
//! or (on error) is rolled back by the writer restoring the O(1) clone it took
//! before. Mutations record what they touched in `Dirty`, which drives both the
//! store batch and the set of service views rebuilt at publish time.

use std::collections::HashSet;
use std::sync::Arc;

use imbl::OrdMap;

use crate::error::RegistryError;
use crate::model::CheckKind;
use crate::model::{
    unix_ms, Check, Drain, Endpoint, Name, Node, Status, NODE_HEALTH_CHECK, NODE_MAINTENANCE_CHECK,
    SERVICE_MAINTENANCE_PREFIX,
};
use crate::snapshot::{NodeEntry, ServiceEntry, Snapshot};
use crate::store::{KvChange, Loaded, StoreBatch};
use crate::Decorators;
use switchyard_catalog::{Behavior, KvEntry, PreparedQuery, Query, Session};

/// Longest check output kept (Consul's default `OutputMaxSize`).
pub const MAX_OUTPUT_BYTES: usize = 4096;

/// A change to the catalog. The API and the writer's own timers speak in these.
#[derive(Debug, Clone)]
pub enum Command {
    /// Register or replace a service instance (agent API) with its checks.
    RegisterService {
        endpoint: Endpoint,
        checks: Vec<NewCheck>,
        /// Remove this instance's checks that are not in `checks`.
        replace_existing_checks: bool,
    },
    DeregisterService {
        node: Name,
        id: Name,
    },
    /// Register a check on a node, optionally bound to a service on it.
    RegisterCheck {
        check: NewCheck,
    },
    DeregisterCheck {
        node: Name,
        id: Name,
    },
    /// Set a check's status (TTL pass/warn/fail/update).
    UpdateCheck {
        node: Name,
        id: Name,
        status: Status,
        output: Option<String>,
        /// Refuse checks that are not TTL checks (Consul's agent API rule).
        require_ttl: bool,
    },
    ServiceMaintenance {
        node: Name,
        id: Name,
        enable: bool,
        reason: Option<String>,
    },
    NodeMaintenance {
        node: Name,
        enable: bool,
        reason: Option<String>,
    },
    /// Consul's `/v1/catalog/register`.
    CatalogRegister {
        node: Node,
        skip_node_update: bool,
        endpoint: Option<Endpoint>,
        checks: Vec<Check>,
    },
    /// Consul's `/v1/catalog/deregister`.
    CatalogDeregister {
        node: Name,
        service_id: Option<Name>,
        check_id: Option<Name>,
    },
    /// Many nodes and endpoints at once, in one durable write (the scheduler's path).
    Batch(Batch),
    /// Renew many TTL checks at once: `(node, check id, status, output)`.
    /// Checks that are gone or not TTL checks are skipped.
    Heartbeat(Vec<(Name, Name, Status, Option<String>)>),
    Drain {
        node: Name,
        deadline_ms: Option<u64>,
    },
    Undrain {
        node: Name,
    },
    /// Drain one endpoint (its node stays active).
    DrainEndpoint {
        node: Name,
        id: Name,
        deadline_ms: Option<u64>,
    },
    UndrainEndpoint {
        node: Name,
        id: Name,
    },
    /// Rebuild these services' views (decorators included) without changing
    /// the catalog or its index: a decorator's own inputs changed (a proxy
    /// config reload routes a service it did not before).
    Redecorate(Vec<Name>),
    /// Register the node unless an identical definition exists (the agent's own node).
    EnsureNode(Node),
    /// A TTL check missed its deadline (issued by the writer's timers).
    ExpireTtl {
        node: Name,
        id: Name,
    },
    /// A check stayed critical past `DeregisterCriticalServiceAfter`.
    ReapCritical {
        node: Name,
        check: Name,
    },
    /// Store a prepared query: a new one (`create`), or a new definition of
    /// an existing one (its `CreateIndex` kept).
    PutQuery {
        query: PreparedQuery,
        create: bool,
    },
    DeleteQuery {
        id: Name,
    },
    /// Consul's `PUT /v1/kv/<key>`. With `cas`, only if the key's
    /// `ModifyIndex` is that (0: only if absent); else `Unmet`. An existing
    /// lock's session is kept.
    KvSet {
        key: String,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    },
    /// Consul's `DELETE /v1/kv/<key>`: the key, or every key under it
    /// (`recurse`). With `cas`, only if the key is absent or its
    /// `ModifyIndex` is that; else `Unmet`.
    KvDelete {
        key: String,
        recurse: bool,
        cas: Option<u64>,
    },
    /// `PUT /v1/kv/<key>?acquire=<session>`: lock the key for the session
    /// (and write it); `Unmet` when another holds it or it is in a lock
    /// delay.
    KvLock {
        key: String,
        value: Vec<u8>,
        flags: u64,
        session: String,
    },
    /// `?release=<session>`: unlock the key the session holds (and write
    /// it); `Unmet` when the session does not hold it.
    KvUnlock {
        key: String,
        value: Vec<u8>,
        flags: u64,
        session: String,
    },
    /// Consul's `/v1/txn` (KV operations): all applied, or none. The
    /// results (the entries written or read, in order) are left in `out`.
    KvTxn {
        ops: Vec<TxnOp>,
        out: TxnResults,
    },
    /// Drops the tombstones of KV deletions up to this index (issued by
    /// the writer when there are too many).
    KvReap {
        through: u64,
    },
    SessionCreate(Session),
    /// Ends a session (nothing for one that is gone).
    SessionDestroy {
        id: Name,
    },
    /// Restarts a session's TTL clock.
    SessionRenew {
        id: Name,
    },
    /// A session's TTL ran out (issued by the writer's timers).
    SessionExpire {
        id: Name,
    },
}

impl Command {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterService { .. } => "register_service",
            Command::DeregisterService { .. } => "deregister_service",
            Command::RegisterCheck { .. } => "register_check",
            Command::DeregisterCheck { .. } => "deregister_check",
            Command::UpdateCheck { .. } => "update_check",
            Command::ServiceMaintenance { .. } => "service_maintenance",
            Command::NodeMaintenance { .. } => "node_maintenance",
            Command::CatalogRegister { .. } => "catalog_register",
            Command::CatalogDeregister { .. } => "catalog_deregister",
            Command::Batch(_) => "batch",
            Command::Heartbeat(_) => "heartbeat",
            Command::Drain { .. } => "drain",
            Command::Undrain { .. } => "undrain",
            Command::DrainEndpoint { .. } => "drain_endpoint",
            Command::UndrainEndpoint { .. } => "undrain_endpoint",
            Command::Redecorate(_) => "redecorate",
            Command::EnsureNode(_) => "ensure_node",
            Command::ExpireTtl { .. } => "ttl_expired",
            Command::ReapCritical { .. } => "reap_critical",
            Command::PutQuery { .. } => "query_put",
            Command::DeleteQuery { .. } => "query_delete",
            Command::KvSet { .. } => "kv_set",
            Command::KvDelete { .. } => "kv_delete",
            Command::KvLock { .. } => "kv_lock",
            Command::KvUnlock { .. } => "kv_unlock",
            Command::KvTxn { .. } => "kv_txn",
            Command::KvReap { .. } => "kv_reap",
            Command::SessionCreate(_) => "session_create",
            Command::SessionDestroy { .. } => "session_destroy",
            Command::SessionRenew { .. } => "session_renew",
            Command::SessionExpire { .. } => "session_expire",
        }
    }
}

/// One operation of a KV transaction (`/v1/txn`): Consul's `Verb` and the
/// fields it reads.
#[derive(Debug, Clone, Default)]
pub struct TxnOp {
    pub verb: String,
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub index: u64,
    pub session: String,
}

/// One result of a transaction: the entry, and whether the transaction
/// wrote it (`created`: made it).
#[derive(Debug, Clone)]
pub struct TxnResult {
    pub entry: KvEntry,
    pub written: bool,
    pub created: bool,
}

/// Where a transaction leaves its results for the caller.
pub type TxnResults = Arc<std::sync::Mutex<Vec<TxnResult>>>;

/// The native batch: applied atomically, one index for all of it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub nodes: Vec<Node>,
    pub endpoints: Vec<(Endpoint, Vec<NewCheck>)>,
    /// Node-level checks (a node's lease: `serfHealth` with a TTL).
    pub node_checks: Vec<NewCheck>,
    pub deregister_endpoints: Vec<(Name, Name)>,
    pub deregister_nodes: Vec<Name>,
}

/// What a batch of commands touched.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub(crate) services: HashSet<Name>,
    pub(crate) nodes: HashSet<Name>,
    pub(crate) endpoints: HashSet<(Name, Name)>,
    pub(crate) checks: HashSet<(Name, Name)>,
    /// Nodes whose entry (record, endpoints or checks) changed: instances on
    /// other nodes are reused as they are when a view is rebuilt.
    pub(crate) entries: HashSet<Name>,
    /// Services whose every chunk is decorated again (the decorators'
    /// settings changed).
    pub(crate) redecorate: HashSet<Name>,
    /// Prepared queries written or deleted, by ID.
    pub(crate) queries: HashSet<Name>,
    /// KV keys set or deleted.
    pub(crate) kv: HashSet<Name>,
    /// Sessions made or ended.
    pub(crate) sessions: HashSet<Name>,
    /// KV tombstones reaped.
    pub(crate) kv_reaped: HashSet<Name>,
    /// Keys in insertion order, so a refused command's keys can be taken back.
    journal: Vec<DirtyKey>,
}

#[derive(Debug, Clone)]
enum DirtyKey {
    Service(Name),
    Node(Name),
    Endpoint((Name, Name)),
    Check((Name, Name)),
    Entry(Name),
    Redecorate(Name),
    Query(Name),
    Kv(Name),
    Session(Name),
    KvReaped(Name),
}

impl Dirty {
    pub(crate) fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.nodes.is_empty()
            && self.endpoints.is_empty()
            && self.checks.is_empty()
            && self.queries.is_empty()
            && self.kv.is_empty()
            && self.sessions.is_empty()
            && self.kv_reaped.is_empty()
    }

    fn add(&mut self, key: DirtyKey) {
        let new = match &key {
            DirtyKey::Service(k) => self.services.insert(k.clone()),
            DirtyKey::Node(k) => self.nodes.insert(k.clone()),
            DirtyKey::Endpoint(k) => self.endpoints.insert(k.clone()),
            DirtyKey::Check(k) => self.checks.insert(k.clone()),
            DirtyKey::Entry(k) => self.entries.insert(k.clone()),
            DirtyKey::Redecorate(k) => self.redecorate.insert(k.clone()),
            DirtyKey::Query(k) => self.queries.insert(k.clone()),
            DirtyKey::Kv(k) => self.kv.insert(k.clone()),
            DirtyKey::Session(k) => self.sessions.insert(k.clone()),
            DirtyKey::KvReaped(k) => self.kv_reaped.insert(k.clone()),
        };
        if new {
            self.journal.push(key);
        }
    }

    /// A position to roll back to.
    pub(crate) fn mark(&self) -> usize {
        self.journal.len()
    }

    /// Forgets every key added since `mark`.
    pub(crate) fn rollback(&mut self, mark: usize) {
        for key in self.journal.drain(mark..) {
            match key {
                DirtyKey::Service(k) => self.services.remove(&k),
                DirtyKey::Node(k) => self.nodes.remove(&k),
                DirtyKey::Endpoint(k) => self.endpoints.remove(&k),
                DirtyKey::Check(k) => self.checks.remove(&k),
                DirtyKey::Entry(k) => self.entries.remove(&k),
                DirtyKey::Redecorate(k) => self.redecorate.remove(&k),
                DirtyKey::Query(k) => self.queries.remove(&k),
                DirtyKey::Kv(k) => self.kv.remove(&k),
                DirtyKey::Session(k) => self.sessions.remove(&k),
                DirtyKey::KvReaped(k) => self.kv_reaped.remove(&k),
            };
        }
    }
}

/// The writer's mutable catalog: a snapshot being edited plus what changed.
///
/// A refused command is undone by restoring the clone of `snap` taken before it
/// and rolling `dirty` back to its mark: it leaves no trace, not even a publish.
#[derive(Default)]
pub(crate) struct Catalog {
    pub(crate) snap: Snapshot,
    pub(crate) dirty: Dirty,
    /// Run on every view built (see `ViewDecorator`).
    pub(crate) decorators: Decorators,
    /// Sessions whose clock restarts (made or renewed, read back from a
    /// shared store); the writer takes them.
    pub(crate) renewed_sessions: Vec<Name>,
}

/// A check in a registration, with whether the registrant stated its status.
#[derive(Debug, Clone)]
pub struct NewCheck {
    pub check: Check,
    /// False when the request left `Status` out: a new check starts critical and
    /// a re-registered one keeps the status it had.
    pub status_given: bool,
}

fn unknown_service(id: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."
    ))
}

fn unknown_check(id: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Unknown check ID \"{id}\". Ensure that the check ID is passed, not the check name."
    ))
}

fn unknown_node(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("Unknown node \"{name}\""))
}

fn clip_output(mut output: String) -> String {
    switchyard_catalog::clip(&mut output, MAX_OUTPUT_BYTES);
    output
}

impl Catalog {
    /// Rebuilds the catalog from what the store loaded.
    pub(crate) fn from_loaded(loaded: Loaded, decorators: Decorators) -> Catalog {
        // A store that keeps every index (etcd) is taken at its word; otherwise
        // services inherit the indexes of their nodes and checks.
        let exact = loaded.tables.is_some();
        let mut snap = Snapshot {
            index: loaded.index,
            ..Snapshot::default()
        };
        for node in loaded.nodes {
            let index = node.modify_index;
            snap.insert_node(
                node.name.clone(),
                Arc::new(NodeEntry {
                    node: Arc::new(node),
                    endpoints: OrdMap::new(),
                    checks: OrdMap::new(),
                    index,
                }),
            );
        }
        for endpoint in loaded.endpoints {
            let Some(entry) = snap.nodes.get(&endpoint.node) else {
                tracing::warn!(node = %endpoint.node, id = %endpoint.id, "stored endpoint without node; dropped");
                continue;
            };
            let mut endpoint = endpoint;
            endpoint.node = entry.node.name.clone();
            let key = (endpoint.node.clone(), endpoint.id.clone());
            let modify = endpoint.modify_index;
            let service_entry = snap.service_entry_mut(&endpoint.service);
            endpoint.service = service_entry.name.clone();
            service_entry.members.insert(key);
            service_entry.index = service_entry.index.max(modify);
            if let Some(entry) = snap.nodes.get_mut(&endpoint.node) {
                let entry = Arc::make_mut(entry);
                entry.index = entry.index.max(modify);
                entry
                    .endpoints
                    .insert(endpoint.id.clone(), Arc::new(endpoint));
            }
        }
        for check in loaded.checks {
            let Some(entry) = snap.nodes.get_mut(&check.node) else {
                tracing::warn!(node = %check.node, id = %check.id, "stored check without node; dropped");
                continue;
            };
            let entry = Arc::make_mut(entry);
            entry.index = entry.index.max(check.modify_index);
            entry.checks.insert(check.id.clone(), Arc::new(check));
        }
        for entry in loaded.kv {
            let idx = entry.modify_index;
            snap.kv.insert(Arc::new(entry), idx);
        }
        for (key, idx) in loaded.kv_tombstones {
            snap.kv.bury(&key, idx);
        }
        snap.kv.reaped = loaded.kv_reaped;
        // The table's index: its newest entry, tombstone or reaped one.
        snap.kv.index = snap.kv.index.max(loaded.kv_reaped);
        for session in loaded.sessions {
            let idx = session.modify_index;
            snap.sessions.insert(Arc::new(session), idx);
        }
        for query in loaded.queries {
            let id = query.id.clone();
            snap.queries.index = snap.queries.index.max(query.modify_index);
            match Query::compile(query) {
                Ok(query) => snap.queries.insert(Arc::new(query)),
                Err(e) => {
                    tracing::error!(query = %id, error = %e, "stored prepared query does not compile; dropped")
                }
            }
        }
        for (name, index) in loaded.service_index {
            let service_entry = snap.service_entry_mut(&name.into());
            service_entry.index = service_entry.index.max(index);
        }
        for (name, index) in loaded.entry_index {
            if let Some(entry) = snap.nodes.get_mut(name.as_str()) {
                let entry = Arc::make_mut(entry);
                entry.index = entry.index.max(index);
            }
        }
        let mut top = snap.nodes.values().map(|e| e.index).max().unwrap_or(0);
        let names: Vec<Name> = snap.services.keys().cloned().collect();
        for name in names.iter().filter(|_| !exact) {
            let nodes = &snap.nodes;
            if let Some(service_entry) = snap.services.get_mut(name) {
                let service_entry = Arc::make_mut(service_entry);
                for (node, _) in service_entry.members.iter() {
                    if let Some(entry) = nodes.get(node) {
                        service_entry.index = service_entry.index.max(entry.index);
                    }
                }
                top = top.max(service_entry.index);
            }
        }
        snap.index = snap.index.max(top);
        let [services, nodes, checks] = loaded.tables.unwrap_or([snap.index; 3]);
        snap.tables = crate::snapshot::TableIndexes {
            services,
            nodes,
            checks,
        };
        let mut catalog = Catalog {
            snap,
            dirty: Dirty::default(),
            decorators,
            renewed_sessions: Vec::new(),
        };
        for service in names {
            catalog.dirty.add(DirtyKey::Service(service));
        }
        catalog.kv_changed();
        catalog.rebuild_views();
        catalog.dirty = Dirty::default();
        catalog
    }

    pub(crate) fn index(&self) -> u64 {
        self.snap.index
    }

    /// Stores a prepared query after Consul's checks against the others: no
    /// other query has its name (any case) or an ID equal to it, and one
    /// catch-all template at most.
    fn put_query(
        &mut self,
        mut query: PreparedQuery,
        create: bool,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let existing = self.snap.queries.get(&query.id).map(|q| q.def.clone());
        match (&existing, create) {
            (Some(_), true) => {
                return Err(RegistryError::Refused(format!(
                    "prepared query ID '{}' is in use",
                    query.id
                )))
            }
            (None, false) => {
                return Err(RegistryError::Refused(format!(
                    "Cannot modify non-existent prepared query: '{}'",
                    query.id
                )))
            }
            _ => {}
        }
        let lower = query.name.to_ascii_lowercase();
        if !lower.is_empty() || query.template.is_some() {
            if let Some(other) = self
                .snap
                .queries
                .named(&lower)
                .filter(|other| other.def.id != query.id)
            {
                return Err(RegistryError::Refused(match lower.is_empty() {
                    true => "a query template with an empty name already exists".to_string(),
                    false => format!(
                        "name '{}' aliases an existing query name ({})",
                        query.name, other.def.id
                    ),
                }));
            }
        }
        if !query.name.is_empty()
            && query.name != query.id
            && self.snap.queries.get(&query.name).is_some()
        {
            return Err(RegistryError::Refused(format!(
                "name '{}' aliases an existing query ID",
                query.name
            )));
        }
        if !query.session.is_empty() && self.snap.sessions.get(&query.session).is_none() {
            return Err(RegistryError::Refused(format!(
                "invalid session {:?}",
                query.session
            )));
        }
        query.create_index = existing.as_ref().map_or(idx, |q| q.create_index);
        query.modify_index = idx;
        let compiled = Query::compile(query).map_err(RegistryError::Refused)?;
        let id: Name = compiled.def.id.as_str().into();
        self.set_query(&id, Some(Arc::new(compiled)), idx);
        Ok(true)
    }

    fn kv_set(
        &mut self,
        key: String,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let old = self.snap.kv.get(&key).cloned();
        if let Some(cas) = cas {
            let now = old.as_ref().map_or(0, |e| e.modify_index);
            if now != cas {
                return Err(RegistryError::Unmet(format!(
                    "failed to set key {key:?}, index is stale"
                )));
            }
        }
        if old
            .as_ref()
            .is_some_and(|e| e.value == value && e.flags == flags && cas.is_none())
        {
            return Ok(false);
        }
        // An existing lock stays.
        let session = old.as_ref().map(|e| e.session.clone()).unwrap_or_default();
        let lock_index = old.as_ref().map_or(0, |e| e.lock_index);
        self.put_kv(
            old.as_deref(),
            (key, value, flags),
            (session, lock_index),
            idx,
        );
        Ok(true)
    }

    /// Writes a key's new entry at `idx` (its `CreateIndex` kept from
    /// `old`) with its lock (`session`, `LockIndex`), and marks it.
    fn put_kv(
        &mut self,
        old: Option<&KvEntry>,
        (key, value, flags): (String, Vec<u8>, u64),
        (session, lock_index): (String, u64),
        idx: u64,
    ) {
        let entry = KvEntry {
            value,
            flags,
            session,
            lock_index,
            create_index: old.map_or(idx, |e| e.create_index),
            modify_index: idx,
            key,
        };
        self.dirty.add(DirtyKey::Kv(entry.key.as_str().into()));
        self.snap.kv.insert(Arc::new(entry), idx);
    }

    fn kv_delete(
        &mut self,
        key: &str,
        recurse: bool,
        cas: Option<u64>,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        // A recursive delete above the reserved keys leaves them be.
        let reserved = |k: &str| {
            switchyard_catalog::kv::is_reserved(k) && !switchyard_catalog::kv::is_reserved(key)
        };
        let keys: Vec<Name> = match recurse {
            true => self
                .snap
                .kv
                .under(key)
                .filter(|e| !reserved(&e.key))
                .map(|e| e.key.as_str().into())
                .collect(),
            false => {
                let Some(old) = self.snap.kv.get(key) else {
                    return Ok(false);
                };
                if cas.is_some_and(|cas| cas != old.modify_index) {
                    return Err(RegistryError::Unmet(format!(
                        "failed to delete key {key:?}, index is stale"
                    )));
                }
                vec![key.into()]
            }
        };
        for key in &keys {
            self.snap.kv.remove(key, idx);
            self.dirty.add(DirtyKey::Kv(key.clone()));
        }
        Ok(!keys.is_empty())
    }

    fn kv_lock(
        &mut self,
        key: String,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        if self.snap.sessions.get(session).is_none() {
            return Err(RegistryError::Refused(format!(
                "invalid session {session:?}"
            )));
        }
        let old = self.snap.kv.get(&key).cloned();
        let held = old.as_ref().is_some_and(|e| e.session == session);
        if let Some(other) = old.as_ref().filter(|e| !e.session.is_empty() && !held) {
            return Err(RegistryError::Unmet(format!(
                "failed to lock key {key:?}, lock is already held (by {:?})",
                other.session
            )));
        }
        if !held && self.snap.kv.delayed_until(&key) > unix_ms() {
            return Err(RegistryError::Unmet(format!(
                "failed to lock key {key:?}: in a lock delay"
            )));
        }
        let lock_index = old.as_ref().map_or(0, |e| e.lock_index) + u64::from(!held);
        let lock = (session.to_string(), lock_index);
        self.put_kv(old.as_deref(), (key, value, flags), lock, idx);
        Ok(true)
    }

    fn kv_unlock(
        &mut self,
        key: String,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let Some(old) = self
            .snap
            .kv
            .get(&key)
            .filter(|e| e.session == session)
            .cloned()
        else {
            return Err(RegistryError::Unmet(format!(
                "failed to unlock key {key:?}, lock isn't held, or is held by another session"
            )));
        };
        let lock = (String::new(), old.lock_index);
        self.put_kv(Some(&old), (key, value, flags), lock, idx);
        Ok(true)
    }

    /// A KV transaction: each operation against the state the previous
    /// ones left; any failing one refuses all (each failure reported).
    fn kv_txn(
        &mut self,
        ops: Vec<TxnOp>,
        out: &TxnResults,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let mut errors: Vec<(usize, String)> = Vec::new();
        let mut results: Vec<TxnResult> = Vec::new();
        let mut changed = false;
        let missing = |key: &str| format!("key {key:?} doesn't exist");
        for (at, op) in ops.into_iter().enumerate() {
            let key = op.key.clone();
            let wrote = match op.verb.as_str() {
                "set" => Some(self.kv_set(op.key, op.value, op.flags, None, idx)),
                "cas" => Some(self.kv_set(op.key, op.value, op.flags, Some(op.index), idx)),
                "lock" => Some(self.kv_lock(op.key, op.value, op.flags, &op.session, idx)),
                "unlock" => Some(self.kv_unlock(op.key, op.value, op.flags, &op.session, idx)),
                "delete" | "delete-tree" | "delete-cas" => {
                    let cas = (op.verb == "delete-cas").then_some(op.index);
                    let recurse = op.verb == "delete-tree";
                    match self.kv_delete(&key, recurse, cas, idx) {
                        Ok(c) => changed |= c,
                        Err(e) => errors.push((at, e.to_string())),
                    }
                    None
                }
                _ => None,
            };
            match wrote {
                Some(Ok(c)) => {
                    changed |= c;
                    if let Some(entry) = self.snap.kv.get(&key) {
                        results.push(TxnResult {
                            entry: KvEntry {
                                value: Vec::new(),
                                ..(**entry).clone()
                            },
                            written: true,
                            created: entry.create_index == idx,
                        });
                    }
                    continue;
                }
                Some(Err(e)) => {
                    errors.push((at, e.to_string()));
                    continue;
                }
                None => {}
            }
            let current = self.snap.kv.get(&key).cloned();
            let read = |entry: &Arc<KvEntry>| TxnResult {
                entry: (**entry).clone(),
                written: false,
                created: false,
            };
            match op.verb.as_str() {
                "delete" | "delete-tree" | "delete-cas" => {}
                "get" => match &current {
                    Some(entry) => results.push(read(entry)),
                    None => errors.push((at, missing(&key))),
                },
                "get-or-empty" => results.extend(current.as_ref().map(read)),
                "get-tree" => results.extend(self.snap.kv.under(&key).map(read)),
                "check-index" => match &current {
                    None => errors.push((at, missing(&key))),
                    Some(e) if e.modify_index != op.index => errors.push((
                        at,
                        format!(
                            "failed index check for key {key:?}, current modify index {} != {}",
                            e.modify_index, op.index
                        ),
                    )),
                    Some(_) => {}
                },
                "check-session" => match &current {
                    None => errors.push((at, missing(&key))),
                    Some(e) if e.session != op.session => errors.push((
                        at,
                        format!(
                            "failed session check for key {key:?}, current session {:?} != {:?}",
                            e.session, op.session
                        ),
                    )),
                    Some(_) => {}
                },
                "check-not-exists" => {
                    if current.is_some() {
                        errors.push((at, format!("key {key:?} exists")));
                    }
                }
                verb => errors.push((at, format!("unknown KV verb {verb:?}"))),
            }
        }
        if !errors.is_empty() {
            return Err(RegistryError::Txn(errors));
        }
        *out.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = results;
        Ok(changed)
    }

    /// Makes a session after Consul's checks: its node is registered, and
    /// every check it links to is there and not critical.
    fn session_create(&mut self, mut session: Session, idx: u64) -> Result<bool, RegistryError> {
        let Some(node) = self.snap.nodes.get(session.node.as_str()) else {
            return Err(RegistryError::Refused(
                "Missing node registration".to_string(),
            ));
        };
        for check in session.checks() {
            match node.checks.get(check) {
                // A node without a serfHealth of its own (one agent on the
                // embedded store) is alive: the API shows it passing.
                None if check == NODE_HEALTH_CHECK => {}
                None => {
                    return Err(RegistryError::Refused(format!(
                        "Missing check '{check}' registration"
                    )))
                }
                Some(c) if c.status == Status::Critical => {
                    return Err(RegistryError::Refused(format!(
                        "Check '{check}' is in critical state"
                    )))
                }
                Some(_) => {}
            }
        }
        if self.snap.sessions.get(&session.id).is_some() {
            return Err(RegistryError::Refused(format!(
                "Session ID '{}' is in use",
                session.id
            )));
        }
        session.create_index = idx;
        session.modify_index = idx;
        self.dirty
            .add(DirtyKey::Session(session.id.as_str().into()));
        self.snap.sessions.insert(Arc::new(session), idx);
        Ok(true)
    }

    /// Ends a session: its keys released (or deleted, by its behavior) and
    /// held back from locking for its lock delay; prepared queries bound to
    /// it go. Whether there was one.
    pub(crate) fn session_end(&mut self, id: &str, idx: u64) -> bool {
        let Some(session) = self.snap.sessions.remove(id, idx) else {
            return false;
        };
        self.dirty.add(DirtyKey::Session(id.into()));
        let now = unix_ms();
        let until = now + session.lock_delay().as_millis() as u64;
        let held: Vec<Arc<KvEntry>> = self
            .snap
            .kv
            .held_by(id)
            .iter()
            .filter_map(|key| self.snap.kv.get(key).cloned())
            .collect();
        for entry in held {
            match session.behavior {
                Behavior::Release => {
                    let mut released = (*entry).clone();
                    released.session.clear();
                    released.modify_index = idx;
                    self.snap.kv.insert(Arc::new(released), idx);
                }
                Behavior::Delete => {
                    self.snap.kv.remove(&entry.key, idx);
                }
            }
            self.snap.kv.delay(&entry.key, until, now);
            self.dirty.add(DirtyKey::Kv(entry.key.as_str().into()));
        }
        let bound: Vec<Name> = self
            .snap
            .queries
            .iter()
            .filter(|q| q.def.session == id)
            .map(|q| q.def.id.as_str().into())
            .collect();
        for query in bound {
            self.set_query(&query, None, idx);
        }
        true
    }

    /// Ends the sessions whose node is gone or one of whose checks is gone
    /// or critical (after a write that may have done that): those on the
    /// nodes this group of writes touched.
    fn end_broken_sessions(&mut self, idx: u64) -> bool {
        let touched: Vec<Name> = self
            .dirty
            .entries
            .iter()
            .chain(&self.dirty.nodes)
            .flat_map(|node| self.snap.sessions.on_node(node))
            .collect();
        let broken: Vec<Name> = touched
            .iter()
            .filter_map(|id| self.snap.sessions.get(id))
            .filter(|s| match self.snap.nodes.get(s.node.as_str()) {
                None => true,
                Some(node) => s.checks().any(|check| match node.checks.get(check) {
                    None => check != NODE_HEALTH_CHECK,
                    Some(c) => c.status == Status::Critical,
                }),
            })
            .map(|s| s.id.as_str().into())
            .collect();
        for id in &broken {
            tracing::info!(session = %id, "session ended: its node or a check it links to is gone or critical");
            self.session_end(id, idx);
        }
        !broken.is_empty()
    }

    /// Puts (or, with `None`, removes) a query and marks it dirty.
    pub(crate) fn set_query(&mut self, id: &Name, query: Option<Arc<Query>>, idx: u64) {
        match query {
            Some(query) => self.snap.queries.insert(query),
            None => {
                self.snap.queries.remove(id);
            }
        }
        self.snap.queries.index = self.snap.queries.index.max(idx);
        self.dirty.add(DirtyKey::Query(id.clone()));
    }

    /// Applies one command. On error the catalog may be half-changed: the
    /// caller restores its pre-command clone. Returns whether anything changed.
    pub(crate) fn apply(&mut self, command: Command) -> Result<bool, RegistryError> {
        let idx = self.snap.index + 1;
        // Whether the command may end sessions: a node or check gone, or
        // a check turned critical.
        let health = !matches!(
            command,
            Command::PutQuery { .. }
                | Command::DeleteQuery { .. }
                | Command::KvSet { .. }
                | Command::KvDelete { .. }
                | Command::KvLock { .. }
                | Command::KvUnlock { .. }
                | Command::KvTxn { .. }
                | Command::KvReap { .. }
                | Command::SessionCreate(_)
                | Command::SessionDestroy { .. }
                | Command::SessionRenew { .. }
                | Command::SessionExpire { .. }
                | Command::Redecorate(_)
        );
        let mut changed = match command {
            Command::RegisterService {
                endpoint,
                checks,
                replace_existing_checks,
            } => self.register_service(endpoint, checks, replace_existing_checks, idx)?,
            Command::DeregisterService { node, id } => {
                if !self.has_endpoint(&node, &id) {
                    return Err(unknown_service(&id));
                }
                self.del_endpoint(&node, &id, idx)
            }
            Command::RegisterCheck { check } => {
                let NewCheck {
                    check,
                    status_given,
                } = check;
                if !check.service_id.is_empty()
                    && !self.has_endpoint(&check.node, &check.service_id)
                {
                    return Err(RegistryError::NotFound(format!(
                        "ServiceID \"{}\" does not exist",
                        check.service_id
                    )));
                }
                self.put_check(check, !status_given, idx)?
            }
            Command::DeregisterCheck { node, id } => {
                if !self.has_check(&node, &id) {
                    return Err(unknown_check(&id));
                }
                self.del_check(&node, &id, idx)
            }
            Command::UpdateCheck {
                node,
                id,
                status,
                output,
                require_ttl,
            } => self.update_check(&node, &id, status, output, require_ttl, idx)?,
            Command::ServiceMaintenance {
                node,
                id,
                enable,
                reason,
            } => self.service_maintenance(&node, &id, enable, reason, idx)?,
            Command::NodeMaintenance {
                node,
                enable,
                reason,
            } => self.node_maintenance(&node, enable, reason, idx)?,
            Command::CatalogRegister {
                node,
                skip_node_update,
                endpoint,
                checks,
            } => self.catalog_register(node, skip_node_update, endpoint, checks, idx)?,
            Command::CatalogDeregister {
                node,
                service_id,
                check_id,
            } => {
                if !self.snap.nodes.contains_key(&node) {
                    return Err(unknown_node(&node));
                }
                match (service_id, check_id) {
                    (Some(id), _) => {
                        if !self.has_endpoint(&node, &id) {
                            return Err(unknown_service(&id));
                        }
                        self.del_endpoint(&node, &id, idx)
                    }
                    (None, Some(id)) => {
                        if !self.has_check(&node, &id) {
                            return Err(unknown_check(&id));
                        }
                        self.del_check(&node, &id, idx)
                    }
                    (None, None) => self.del_node(&node, idx),
                }
            }
            Command::Batch(batch) => self.batch(batch, idx)?,
            Command::Heartbeat(beats) => {
                let mut changed = false;
                for (node, id, status, output) in beats {
                    if self
                        .get_check(&node, &id)
                        .is_some_and(|c| c.kind == CheckKind::Ttl)
                    {
                        changed |= self.update_check(&node, &id, status, output, true, idx)?;
                    }
                }
                changed
            }
            Command::Drain { node, deadline_ms } => {
                let entry = self
                    .snap
                    .nodes
                    .get(&node)
                    .ok_or_else(|| unknown_node(&node))?;
                let since_ms = entry
                    .node
                    .drain
                    .as_ref()
                    .map_or_else(unix_ms, |d| d.since_ms);
                self.set_drain(
                    &node,
                    Some(Drain {
                        since_ms,
                        deadline_ms,
                    }),
                    idx,
                )
            }
            Command::Undrain { node } => {
                if !self.snap.nodes.contains_key(&node) {
                    return Err(unknown_node(&node));
                }
                self.set_drain(&node, None, idx)
            }
            Command::DrainEndpoint {
                node,
                id,
                deadline_ms,
            } => {
                let endpoint = self.endpoint_or_404(&node, &id)?;
                let since_ms = endpoint.drain.as_ref().map_or_else(unix_ms, |d| d.since_ms);
                let drain = Drain {
                    since_ms,
                    deadline_ms,
                };
                self.set_endpoint_drain(&node, &id, Some(drain), idx)
            }
            Command::UndrainEndpoint { node, id } => {
                self.endpoint_or_404(&node, &id)?;
                self.set_endpoint_drain(&node, &id, None, idx)
            }
            Command::EnsureNode(node) => self.put_node(node, idx),
            Command::Redecorate(services) => {
                for name in services {
                    self.redecorate(name);
                }
                false
            }
            Command::ExpireTtl { node, id } => {
                let Some(check) = self.get_check(&node, &id) else {
                    return Ok(false);
                };
                if check.status == Status::Critical {
                    return Ok(false);
                }
                let output = format!(
                    "TTL expired (last output before timeout follows): {}",
                    check.output
                );
                let mut next = (*check).clone();
                next.status = Status::Critical;
                next.output = clip_output(output);
                self.put_check(next, false, idx)?
            }
            Command::ReapCritical { node, check } => {
                let Some(check) = self.get_check(&node, &check) else {
                    return Ok(false);
                };
                if check.status != Status::Critical || check.service_id.is_empty() {
                    return Ok(false);
                }
                let id: Name = check.service_id.as_str().into();
                tracing::info!(node = %node, service_id = %id, check = %check.id,
                    "deregistering service critical for longer than deregister_critical_service_after");
                self.del_endpoint(&node, &id, idx)
            }
            Command::PutQuery { query, create } => self.put_query(query, create, idx)?,
            Command::DeleteQuery { id } => {
                if self.snap.queries.get(&id).is_none() {
                    return Err(RegistryError::Refused(format!(
                        "Cannot delete non-existent prepared query: '{id}'"
                    )));
                }
                self.set_query(&id, None, idx);
                true
            }
            Command::KvSet {
                key,
                value,
                flags,
                cas,
            } => self.kv_set(key, value, flags, cas, idx)?,
            Command::KvDelete { key, recurse, cas } => self.kv_delete(&key, recurse, cas, idx)?,
            Command::KvLock {
                key,
                value,
                flags,
                session,
            } => self.kv_lock(key, value, flags, &session, idx)?,
            Command::KvUnlock {
                key,
                value,
                flags,
                session,
            } => self.kv_unlock(key, value, flags, &session, idx)?,
            Command::KvTxn { ops, out } => self.kv_txn(ops, &out, idx)?,
            Command::KvReap { through } => {
                let reaped = self.snap.kv.reap(through);
                for key in &reaped {
                    self.dirty.add(DirtyKey::KvReaped(key.clone()));
                }
                !reaped.is_empty()
            }
            Command::SessionCreate(session) => self.session_create(session, idx)?,
            Command::SessionDestroy { id } | Command::SessionExpire { id } => {
                self.session_end(&id, idx)
            }
            Command::SessionRenew { id } => {
                if self.snap.sessions.get(&id).is_none() {
                    return Err(RegistryError::NotFound(format!(
                        "Session id '{id}' not found"
                    )));
                }
                false
            }
        };
        if health && !self.snap.sessions.is_empty() {
            changed |= self.end_broken_sessions(idx);
        }
        if changed {
            self.snap.index = idx;
        }
        Ok(changed)
    }

    fn has_endpoint(&self, node: &str, id: &str) -> bool {
        self.snap
            .nodes
            .get(node)
            .is_some_and(|e| e.endpoints.contains_key(id))
    }

    fn has_check(&self, node: &str, id: &str) -> bool {
        self.snap
            .nodes
            .get(node)
            .is_some_and(|e| e.checks.contains_key(id))
    }

    pub(crate) fn get_check(&self, node: &str, id: &str) -> Option<Arc<Check>> {
        self.snap.nodes.get(node)?.checks.get(id).cloned()
    }

    /// Every change to a node's entry goes through here, which marks it.
    fn entry_mut(&mut self, node: &Name) -> Option<&mut NodeEntry> {
        if !self.dirty.entries.contains(node) {
            self.dirty.add(DirtyKey::Entry(node.clone()));
        }
        self.snap.nodes.get_mut(node).map(Arc::make_mut)
    }

    /// Marks everything shown for a node as changed at `idx`.
    fn touch_node(&mut self, node: &Name, idx: u64, all_services: bool) {
        let mut services = Vec::new();
        if let Some(entry) = self.entry_mut(node) {
            entry.index = idx;
            if all_services {
                services.extend(entry.endpoints.values().map(|e| e.service.clone()));
            }
        }
        for service in services {
            self.touch_service(&service, idx);
        }
    }

    fn service_entry_mut(&mut self, service: &Name) -> &mut ServiceEntry {
        self.snap.service_entry_mut(service)
    }

    /// Replaces an endpoint's node and service names by the catalog's shared
    /// copies: a million endpoints then hold a million pointers, not strings.
    fn intern(&self, endpoint: &mut Endpoint) {
        if let Some(entry) = self.snap.nodes.get(&endpoint.node) {
            endpoint.node = entry.node.name.clone();
        }
        if let Some(name) = self
            .snap
            .services
            .get(&endpoint.service)
            .map(|s| s.name.clone())
        {
            endpoint.service = name;
        }
    }

    fn touch_service(&mut self, service: &Name, idx: u64) {
        self.service_entry_mut(service).index = idx;
        self.dirty.add(DirtyKey::Service(service.clone()));
    }

    fn put_node(&mut self, mut node: Node, idx: u64) -> bool {
        let name = node.name.clone();
        match self.snap.nodes.get(&name) {
            Some(entry) if entry.node.same_definition(&node) => false,
            Some(entry) => {
                node.drain = entry.node.drain.clone();
                node.create_index = entry.node.create_index;
                node.modify_index = idx;
                if let Some(entry) = self.entry_mut(&name) {
                    entry.node = Arc::new(node);
                }
                self.node_changed(&name, idx);
                true
            }
            None => {
                node.create_index = idx;
                node.modify_index = idx;
                node.drain = None;
                self.snap.insert_node(
                    name.clone(),
                    Arc::new(NodeEntry {
                        node: Arc::new(node),
                        endpoints: OrdMap::new(),
                        checks: OrdMap::new(),
                        index: idx,
                    }),
                );
                self.node_changed(&name, idx);
                true
            }
        }
    }

    fn node_changed(&mut self, name: &Name, idx: u64) {
        self.dirty.add(DirtyKey::Node(name.clone()));
        self.snap.tables.nodes = idx;
        self.touch_node(name, idx, true);
    }

    fn set_drain(&mut self, name: &Name, drain: Option<Drain>, idx: u64) -> bool {
        let Some(entry) = self.snap.nodes.get(name) else {
            return false;
        };
        if entry.node.drain == drain {
            return false;
        }
        let mut node = (*entry.node).clone();
        node.drain = drain;
        node.modify_index = idx;
        if let Some(entry) = self.entry_mut(name) {
            entry.node = Arc::new(node);
        }
        self.node_changed(name, idx);
        true
    }

    fn endpoint_or_404(&self, node: &Name, id: &Name) -> Result<Arc<Endpoint>, RegistryError> {
        let entry = self
            .snap
            .nodes
            .get(node)
            .ok_or_else(|| unknown_node(node))?;
        entry
            .endpoints
            .get(id)
            .cloned()
            .ok_or_else(|| unknown_service(id))
    }

    fn set_endpoint_drain(
        &mut self,
        node: &Name,
        id: &Name,
        drain: Option<Drain>,
        idx: u64,
    ) -> bool {
        let Some(endpoint) = self.snap.nodes.get(node).and_then(|e| e.endpoints.get(id)) else {
            return false;
        };
        if endpoint.drain == drain {
            return false;
        }
        let mut endpoint = (**endpoint).clone();
        endpoint.drain = drain;
        endpoint.modify_index = idx;
        let service = endpoint.service.clone();
        if let Some(entry) = self.entry_mut(node) {
            entry.endpoints.insert(id.clone(), Arc::new(endpoint));
            entry.index = idx;
        }
        self.touch_service(&service, idx);
        self.dirty
            .add(DirtyKey::Endpoint((node.clone(), id.clone())));
        self.snap.tables.services = idx;
        true
    }

    fn del_node(&mut self, name: &Name, idx: u64) -> bool {
        let Some(entry) = self.snap.nodes.get(name).cloned() else {
            return false;
        };
        for id in entry.endpoints.keys() {
            self.del_endpoint(name, id, idx);
        }
        for id in entry.checks.keys() {
            self.del_check(name, id, idx);
        }
        self.snap.remove_node(name);
        self.dirty.add(DirtyKey::Node(name.clone()));
        self.snap.tables.nodes = idx;
        true
    }

    fn put_endpoint(&mut self, mut endpoint: Endpoint, idx: u64) -> Result<bool, RegistryError> {
        self.intern(&mut endpoint);
        let node = endpoint.node.clone();
        let id = endpoint.id.clone();
        let entry = self.snap.nodes.get(&node).ok_or_else(|| {
            RegistryError::BadRequest(format!("endpoint {id}: node \"{node}\" is not registered"))
        })?;
        let previous = entry.endpoints.get(&id).cloned();
        if let Some(prev) = &previous {
            if prev.same_definition(&endpoint) {
                return Ok(false);
            }
            endpoint.drain = prev.drain.clone();
            endpoint.create_index = prev.create_index;
            if prev.service != endpoint.service {
                // Same id re-registered under another service name: move it.
                let old_service = prev.service.clone();
                self.service_entry_mut(&old_service)
                    .members
                    .remove(&(node.clone(), id.clone()));
                self.touch_service(&old_service, idx);
            }
        } else {
            endpoint.drain = None;
            endpoint.create_index = idx;
        }
        endpoint.modify_index = idx;
        let service = endpoint.service.clone();
        if let Some(entry) = self.entry_mut(&node) {
            entry.endpoints.insert(id.clone(), Arc::new(endpoint));
            entry.index = idx;
        }
        self.service_entry_mut(&service)
            .members
            .insert((node.clone(), id.clone()));
        self.touch_service(&service, idx);
        self.dirty.add(DirtyKey::Endpoint((node, id)));
        self.snap.tables.services = idx;
        Ok(true)
    }

    /// Removes an endpoint and the checks bound to it.
    fn del_endpoint(&mut self, node: &Name, id: &Name, idx: u64) -> bool {
        let Some(entry) = self.snap.nodes.get(node) else {
            return false;
        };
        let Some(endpoint) = entry.endpoints.get(id).cloned() else {
            return false;
        };
        let bound: Vec<Name> = entry
            .checks
            .values()
            .filter(|c| c.service_id == **id)
            .map(|c| c.id.clone())
            .collect();
        for check in bound {
            self.del_check(node, &check, idx);
        }
        if let Some(entry) = self.entry_mut(node) {
            entry.endpoints.remove(id);
            entry.index = idx;
        }
        self.service_entry_mut(&endpoint.service)
            .members
            .remove(&(node.clone(), id.clone()));
        self.touch_service(&endpoint.service, idx);
        self.dirty
            .add(DirtyKey::Endpoint((node.clone(), id.clone())));
        self.snap.tables.services = idx;
        true
    }

    /// Inserts or replaces a check. With `keep_status`, a re-registered check
    /// that does not state its status keeps the one it had.
    fn put_check(
        &mut self,
        mut check: Check,
        keep_status: bool,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let node = check.node.clone();
        let id = check.id.clone();
        let entry = self.snap.nodes.get(&node).ok_or_else(|| {
            RegistryError::BadRequest(format!("check {id}: node \"{node}\" is not registered"))
        })?;
        if !check.service_id.is_empty() {
            match entry.endpoints.get(check.service_id.as_str()) {
                Some(endpoint) => check.service_name = endpoint.service.to_string(),
                None => {
                    return Err(RegistryError::BadRequest(format!(
                        "check {id}: service \"{}\" is not registered on node \"{node}\"",
                        check.service_id
                    )))
                }
            }
        }
        check.output = clip_output(check.output);
        let previous = entry.checks.get(&id).cloned();
        if let Some(prev) = &previous {
            if keep_status {
                check.status = prev.status;
                check.output = prev.output.clone();
            }
            check.status_since_ms = if prev.status == check.status {
                prev.status_since_ms
            } else {
                unix_ms()
            };
            if prev.same_definition(&check) {
                return Ok(false);
            }
            check.create_index = prev.create_index;
            if prev.service_id != check.service_id {
                self.check_touches(prev, idx);
            }
        } else {
            check.create_index = idx;
            check.status_since_ms = unix_ms();
        }
        check.modify_index = idx;
        let check = Arc::new(check);
        if let Some(entry) = self.entry_mut(&node) {
            entry.checks.insert(id.clone(), check.clone());
        }
        self.check_touches(&check, idx);
        self.dirty.add(DirtyKey::Check((node, id)));
        self.snap.tables.checks = idx;
        Ok(true)
    }

    /// Marks what a check's change affects: its service, or the whole node.
    fn check_touches(&mut self, check: &Check, idx: u64) {
        if check.is_node_level() {
            self.touch_node(&check.node, idx, true);
            return;
        }
        self.touch_node(&check.node, idx, false);
        let service = self
            .snap
            .nodes
            .get(&check.node)
            .and_then(|e| e.endpoints.get(check.service_id.as_str()))
            .map(|e| e.service.clone());
        if let Some(service) = service {
            self.touch_service(&service, idx);
        }
    }

    fn del_check(&mut self, node: &Name, id: &Name, idx: u64) -> bool {
        let Some(check) = self.get_check(node, id) else {
            return false;
        };
        self.check_touches(&check, idx);
        if let Some(entry) = self.entry_mut(node) {
            entry.checks.remove(id);
        }
        self.dirty.add(DirtyKey::Check((node.clone(), id.clone())));
        self.snap.tables.checks = idx;
        true
    }

    fn register_service(
        &mut self,
        endpoint: Endpoint,
        checks: Vec<NewCheck>,
        replace_existing_checks: bool,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let node = endpoint.node.clone();
        let id = endpoint.id.clone();
        let mut changed = false;
        if endpoint.incarnation > 0 {
            // The same task id elsewhere in the service: an older incarnation is
            // replaced (the task moved), a newer one means this registration is stale.
            let same_task: Vec<Arc<Endpoint>> = self
                .snap
                .services
                .get(&endpoint.service)
                .map(|service_entry| {
                    service_entry
                        .members
                        .iter()
                        .filter(|(_, member)| *member == id)
                        .filter_map(|(n, i)| self.snap.nodes.get(n)?.endpoints.get(i).cloned())
                        .collect()
                })
                .unwrap_or_default();
            if same_task
                .iter()
                .any(|e| e.incarnation > endpoint.incarnation)
            {
                tracing::debug!(id = %id, incarnation = endpoint.incarnation, "stale registration ignored");
                return Ok(false);
            }
            for old in same_task.iter().filter(|e| e.node != node) {
                changed |= self.del_endpoint(&old.node, &old.id, idx);
            }
        }
        changed |= self.put_endpoint(endpoint, idx)?;
        if replace_existing_checks {
            let keep: HashSet<&str> = checks.iter().map(|c| &*c.check.id).collect();
            let stale: Vec<Name> = self
                .snap
                .nodes
                .get(&node)
                .map(|e| {
                    e.checks
                        .values()
                        .filter(|c| c.service_id == *id && !c.is_maintenance())
                        .filter(|c| !keep.contains(&*c.id))
                        .map(|c| c.id.clone())
                        .collect()
                })
                .unwrap_or_default();
            for check in stale {
                changed |= self.del_check(&node, &check, idx);
            }
        }
        for NewCheck {
            check,
            status_given,
        } in checks
        {
            changed |= self.put_check(check, !status_given, idx)?;
        }
        Ok(changed)
    }

    fn update_check(
        &mut self,
        node: &Name,
        id: &Name,
        status: Status,
        output: Option<String>,
        require_ttl: bool,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let check = self.get_check(node, id).ok_or_else(|| unknown_check(id))?;
        if require_ttl && check.kind != CheckKind::Ttl {
            return Err(RegistryError::NotTtl(format!(
                "CheckID \"{id}\" does not have associated TTL"
            )));
        }
        let output = clip_output(output.unwrap_or_default());
        if check.status == status && check.output == output {
            return Ok(false);
        }
        let mut next = (*check).clone();
        next.status = status;
        next.output = output;
        self.put_check(next, false, idx)
    }

    fn service_maintenance(
        &mut self,
        node: &Name,
        id: &Name,
        enable: bool,
        reason: Option<String>,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let entry = self
            .snap
            .nodes
            .get(node)
            .ok_or_else(|| unknown_service(id))?;
        let endpoint = entry
            .endpoints
            .get(id)
            .cloned()
            .ok_or_else(|| unknown_service(id))?;
        let check_id: Name = format!("{SERVICE_MAINTENANCE_PREFIX}{id}").into();
        if !enable {
            return Ok(self.del_check(node, &check_id, idx));
        }
        let notes = reason.filter(|r| !r.is_empty()).unwrap_or_else(|| {
            "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.".to_string()
        });
        let check = Check {
            node: node.clone(),
            id: check_id,
            name: "Service Maintenance Mode".to_string(),
            status: Status::Critical,
            notes,
            output: String::new(),
            service_id: id.to_string(),
            service_name: endpoint.service.to_string(),
            kind: CheckKind::Maintenance,
            definition: Default::default(),
            status_since_ms: 0,
            create_index: 0,
            modify_index: 0,
        };
        self.put_check(check, false, idx)
    }

    fn node_maintenance(
        &mut self,
        node: &Name,
        enable: bool,
        reason: Option<String>,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        if !self.snap.nodes.contains_key(node) {
            return Err(unknown_node(node));
        }
        let check_id: Name = NODE_MAINTENANCE_CHECK.into();
        if !enable {
            return Ok(self.del_check(node, &check_id, idx));
        }
        let notes = reason.filter(|r| !r.is_empty()).unwrap_or_else(|| {
            "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.".to_string()
        });
        let check = Check {
            node: node.clone(),
            id: check_id,
            name: "Node Maintenance Mode".to_string(),
            status: Status::Critical,
            notes,
            output: String::new(),
            service_id: String::new(),
            service_name: String::new(),
            kind: CheckKind::Maintenance,
            definition: Default::default(),
            status_since_ms: 0,
            create_index: 0,
            modify_index: 0,
        };
        self.put_check(check, false, idx)
    }

    fn catalog_register(
        &mut self,
        node: Node,
        skip_node_update: bool,
        endpoint: Option<Endpoint>,
        checks: Vec<Check>,
        idx: u64,
    ) -> Result<bool, RegistryError> {
        let mut changed = false;
        if !(skip_node_update && self.snap.nodes.contains_key(&node.name)) {
            changed |= self.put_node(node, idx);
        }
        if let Some(endpoint) = endpoint {
            changed |= self.put_endpoint(endpoint, idx)?;
        }
        for check in checks {
            changed |= self.put_check(check, false, idx)?;
        }
        Ok(changed)
    }

    fn batch(&mut self, batch: Batch, idx: u64) -> Result<bool, RegistryError> {
        let mut changed = false;
        for node in batch.nodes {
            changed |= self.put_node(node, idx);
        }
        for NewCheck {
            check,
            status_given,
        } in batch.node_checks
        {
            changed |= self.put_check(check, !status_given, idx)?;
        }
        for (endpoint, checks) in batch.endpoints {
            changed |= self.register_service(endpoint, checks, false, idx)?;
        }
        for (node, id) in batch.deregister_endpoints {
            changed |= self.del_endpoint(&node, &id, idx);
        }
        for node in batch.deregister_nodes {
            changed |= self.del_node(&node, idx);
        }
        Ok(changed)
    }

    /// Rebuilds the views of the services touched since the last publish.
    pub(crate) fn rebuild_views(&mut self) {
        if !self.dirty.kv.is_empty() {
            self.kv_changed();
        }
        let services: Vec<Name> = self.dirty.services.iter().cloned().collect();
        for name in services {
            let redecorate = self.dirty.redecorate.contains(&name);
            let fresh = self
                .snap
                .build_view(&name, &self.dirty.entries, redecorate, &self.decorators)
                .map(Arc::new);
            if let Some(view) = &fresh {
                self.snap.counts.add(&view.counts);
                self.snap.service_count += 1;
            }
            let old = std::mem::replace(&mut self.service_entry_mut(&name).view, fresh);
            if let Some(old) = old {
                self.snap.counts.sub(&old.counts);
                self.snap.service_count -= 1;
            }
        }
    }

    /// The store batch for everything dirty: the current record, or a deletion.
    pub(crate) fn store_batch(&self) -> StoreBatch {
        let dirty = &self.dirty;
        let mut batch = StoreBatch {
            index: self.snap.index,
            ..StoreBatch::default()
        };
        for name in &dirty.nodes {
            let node = self.snap.nodes.get(name).map(|e| e.node.clone());
            batch.nodes.push((name.clone(), node));
        }
        for (node, id) in &dirty.endpoints {
            let endpoint = self
                .snap
                .nodes
                .get(node)
                .and_then(|e| e.endpoints.get(id).cloned());
            batch.endpoints.push(((node.clone(), id.clone()), endpoint));
        }
        for (node, id) in &dirty.checks {
            let check = self.get_check(node, id);
            batch.checks.push(((node.clone(), id.clone()), check));
        }
        for service in &dirty.services {
            if let Some(service_entry) = self.snap.services.get(service) {
                batch
                    .service_index
                    .push((service.clone(), service_entry.index));
            }
        }
        for node in dirty.entries.union(&dirty.nodes) {
            batch
                .entries
                .push((node.clone(), self.snap.nodes.contains_key(node)));
        }
        for key in &dirty.kv {
            let change = match self.snap.kv.get(key) {
                Some(entry) => KvChange::Set(entry.clone()),
                None => KvChange::Deleted(self.snap.kv.key_index(key)),
            };
            batch.kv.push((key.clone(), change));
        }
        if !dirty.kv_reaped.is_empty() {
            batch.kv_reaped = dirty.kv_reaped.iter().cloned().collect();
            batch.kv_floor = Some(self.snap.kv.reaped);
        }
        for id in &dirty.sessions {
            let session = self.snap.sessions.get(id).cloned();
            batch.sessions.push((id.clone(), session));
        }
        for id in &dirty.queries {
            let query = self.snap.queries.get(id).map(|q| q.def.clone());
            batch.queries.push((id.clone(), query));
        }
        batch.tables = [
            !dirty.endpoints.is_empty(),
            !dirty.nodes.is_empty(),
            !dirty.checks.is_empty(),
        ];
        batch
    }

    /// Tells the decorators of the KV store as it is now; the services they
    /// name are decorated again in this publish.
    fn kv_changed(&mut self) {
        for name in self.decorators.kv_changed(&self.snap.kv) {
            self.redecorate(name);
        }
    }

    /// Marks a service with a view to be decorated again, every chunk.
    fn redecorate(&mut self, name: Name) {
        if self
            .snap
            .services
            .get(&name)
            .is_some_and(|s| s.view.is_some())
        {
            self.dirty.add(DirtyKey::Service(name.clone()));
            self.dirty.add(DirtyKey::Redecorate(name));
        }
    }

    /// Publishes: rebuild dirty views and hand out an immutable copy.
    pub(crate) fn publish(&mut self) -> Snapshot {
        self.rebuild_views();
        self.dirty = Dirty::default();
        self.snap.clone()
    }
}

mod replica;
#[cfg(test)]
mod tests;
