//! The etcd store: one catalog shared by many agents.
//!
//! Layout under `<prefix>/catalog/`:
//! - `node/<name>`, `endpoint/<node>\0<id>`, `check/<node>\0<id>`: JSON records
//!   (as in the embedded store); their create/modify indexes are the keys'
//!   etcd revisions, so every agent reports the same ones.
//! - `ttl/<node>\0<id>`: a TTL check's renewal (value: the TTL in ms). Every
//!   agent restarts that check's clock when it sees one.
//! - markers whose mod revision is an index: `index` (the catalog index, put by
//!   every catalog write), `svc/<name>` (a service's last change, kept after the
//!   service is gone), `entry/<node>` (a node entry's last change) and
//!   `table/{services,nodes,checks}`. A fresh agent reads its indexes from them
//!   and so agrees with agents that watched every change.
//!
//! A commit is one transaction, conditional on `index` still having the mod
//! revision this agent's catalog is at: writes through different agents are
//! serialised by etcd, and a loser catches up and applies its commands again.
//! Every agent (the writer included) applies committed changes from one watch
//! on the prefix, resumed after a disconnect from the next revision; a
//! compacted revision turns into a full re-read.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    WatchOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

use super::copy::{keep, LocalCopy, Update};
use super::{Change, Committed, KvChange, Loaded, Record, Store, StoreBatch, StoreStatus};
use crate::error::StoreError;
use crate::model::{Check, Endpoint, Name, Node};
use switchyard_catalog::{KvEntry, PreparedQuery, Session};

/// Largest gRPC message accepted from etcd (a full read is paged well below).
const MAX_MESSAGE: usize = 256 << 20;
/// Keys per page of a full read.
const PAGE: i64 = 5_000;
/// How often the watch asks etcd for a progress report when nothing changes:
/// each answer proves the copy current (staleness) and the stream alive.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// No word from etcd for this long: the watch is restarted.
const SILENCE: Duration = Duration::from_secs(4);

/// Extra tries of a read at start that met a member which is down.
const RETRIES: u32 = 4;
/// Longest pause between tries of a write (a member down, an election).
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// True when the request met a member that is down or has no leader
/// (connection refused or reset; etcd's `Unavailable`: no leader, leader
/// changed, request timed out in raft): worth sending again. A write sent
/// again cannot apply twice (see `commit`).
fn unreachable_member(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// True when a request may have reached etcd's log even though it failed
/// here (no answer in time, a broken stream): its outcome must be found out.
fn ambiguous(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Aborted
        ),
        etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's catalog, e.g. `/switchyard`.
    pub prefix: String,
    pub user: Option<(String, String)>,
    /// PEM CA bundle that signs etcd's server certificates (enables TLS).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for etcd's client-cert auth.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// This agent's name: it keeps `<prefix>/agents/<name>` alive under a
    /// lease while it runs, and checks are shared out among the live names.
    pub member: String,
    /// TTL of that lease: how long a dead agent keeps its checks. Default 5s.
    pub lease_ttl: Duration,
    /// Where this agent keeps its local copy of the catalog (its data
    /// directory): with one, it starts while etcd is down.
    pub copy_dir: Option<PathBuf>,
}

pub struct EtcdStore {
    /// Set once etcd has answered (at start, or later for an agent that
    /// started from its local copy).
    client: Arc<OnceLock<Client>>,
    keys: Keys,
    loaded: Option<Loaded>,
    feed: Option<mpsc::Receiver<Change>>,
    status: Arc<StoreStatus>,
    /// How long a write keeps trying through members that are down or an
    /// election (`store.request_timeout`).
    request_timeout: Duration,
    /// `<prefix>/writes/<member>`: every commit of this agent also puts its
    /// own write id there, so a commit whose outcome is unknown (no quorum
    /// answered) can be told applied or not once etcd answers again.
    mark: Vec<u8>,
    /// The id of this agent's last commit.
    write_id: u64,
}

/// How long past `store.request_timeout` a write whose outcome is unknown
/// (no quorum answered) waits for etcd to say whether it was applied,
/// before it is answered as unknown.
const RESOLVE_FOR: Duration = Duration::from_secs(30);

fn io(err: impl std::fmt::Display) -> StoreError {
    StoreError::Io(err.to_string())
}

/// Key builder and parser for one prefix.
#[derive(Clone, Debug)]
struct Keys {
    /// `<prefix>/catalog/`
    root: Vec<u8>,
}

/// What a key under the catalog root names.
enum Parsed<'a> {
    Node(&'a str),
    Endpoint(&'a str, &'a str),
    Check(&'a str, &'a str),
    Query(&'a str),
    Kv(&'a str),
    KvTombstone(&'a str),
    Session(&'a str),
    SessionTtl(&'a str),
    KvReaped,
    Ttl(&'a str, &'a str),
    Index,
    Service(&'a str),
    Entry(&'a str),
    Table(usize),
}

const TABLES: [&str; 3] = ["services", "nodes", "checks"];

impl Keys {
    fn new(prefix: &str) -> Keys {
        let prefix = prefix.trim_end_matches('/');
        Keys {
            root: format!("{prefix}/catalog/").into_bytes(),
        }
    }

    fn key(&self, kind: &str, name: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.root.len() + kind.len() + name.len() + 1);
        key.extend_from_slice(&self.root);
        key.extend_from_slice(kind.as_bytes());
        key.push(b'/');
        key.extend_from_slice(name.as_bytes());
        key
    }

    fn pair(&self, kind: &str, node: &str, id: &str) -> Vec<u8> {
        let mut key = self.key(kind, node);
        key.push(0);
        key.extend_from_slice(id.as_bytes());
        key
    }

    fn index(&self) -> Vec<u8> {
        let mut key = self.root.clone();
        key.extend_from_slice(b"index");
        key
    }

    fn parse<'a>(&self, key: &'a [u8]) -> Option<Parsed<'a>> {
        let rest = std::str::from_utf8(key.strip_prefix(self.root.as_slice())?).ok()?;
        if rest == "index" {
            return Some(Parsed::Index);
        }
        let (kind, name) = rest.split_once('/')?;
        let pair = || name.split_once('\0');
        Some(match kind {
            "node" => Parsed::Node(name),
            "query" => Parsed::Query(name),
            "kv" => Parsed::Kv(name),
            "kvdel" => Parsed::KvTombstone(name),
            "session" => Parsed::Session(name),
            "sessionttl" => Parsed::SessionTtl(name),
            "kvreaped" => Parsed::KvReaped,
            "endpoint" => pair().map(|(n, i)| Parsed::Endpoint(n, i))?,
            "check" => pair().map(|(n, i)| Parsed::Check(n, i))?,
            "ttl" => pair().map(|(n, i)| Parsed::Ttl(n, i))?,
            "svc" => Parsed::Service(name),
            "entry" => Parsed::Entry(name),
            "table" => Parsed::Table(TABLES.iter().position(|t| *t == name)?),
            _ => return None,
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).replace('\0', "/"),
        message: e.to_string(),
    })
}

fn rev(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Decodes a put; record indexes become the key's revisions.
fn put_record(keys: &Keys, kv: &KeyValue) -> Result<Option<Record>, StoreError> {
    let (create, modify) = (rev(kv.create_revision()), rev(kv.mod_revision()));
    Ok(Some(match keys.parse(kv.key()) {
        Some(Parsed::Node(_)) => {
            let mut node: Node = decode(kv)?;
            (node.create_index, node.modify_index) = (create, modify);
            Record::Node(node.name.clone(), Some(Box::new(node)))
        }
        Some(Parsed::Endpoint(..)) => {
            let mut endpoint: Endpoint = decode(kv)?;
            (endpoint.create_index, endpoint.modify_index) = (create, modify);
            let key = (endpoint.node.clone(), endpoint.id.clone());
            Record::Endpoint(key, Some(Box::new(endpoint)))
        }
        Some(Parsed::Check(..)) => {
            let mut check: Check = decode(kv)?;
            (check.create_index, check.modify_index) = (create, modify);
            let key = (check.node.clone(), check.id.clone());
            Record::Check(key, Some(Box::new(check)))
        }
        Some(Parsed::Query(id)) => {
            let mut query: PreparedQuery = decode(kv)?;
            (query.create_index, query.modify_index) = (create, modify);
            Record::Query(id.into(), Some(Box::new(query)))
        }
        Some(Parsed::Kv(key)) => {
            let mut entry: KvEntry = decode(kv)?;
            (entry.create_index, entry.modify_index) = (create, modify);
            entry.key = key.to_string();
            Record::Kv(key.into(), Some(Box::new(entry)))
        }
        Some(Parsed::KvTombstone(key)) => Record::KvTombstone(key.into()),
        Some(Parsed::Session(id)) => {
            let mut session: Session = decode(kv)?;
            (session.create_index, session.modify_index) = (create, modify);
            Record::Session(id.into(), Some(Box::new(session)))
        }
        Some(Parsed::SessionTtl(id)) => Record::SessionRenewed(id.into()),
        Some(Parsed::KvReaped) => Record::KvReaped(
            std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        Some(Parsed::Ttl(node, id)) => {
            let ms: u64 = decode(kv)?;
            Record::Ttl((node.into(), id.into()), Duration::from_millis(ms))
        }
        // The value is when the writing agent sent the transaction (Unix
        // microseconds); older agents wrote nothing.
        Some(Parsed::Index) => Record::Index {
            written_us: std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse().ok()),
        },
        _ => return Ok(None),
    }))
}

fn delete_record(keys: &Keys, key: &[u8]) -> Option<Record> {
    let pair = |n: &str, i: &str| -> (Name, Name) { (n.into(), i.into()) };
    Some(match keys.parse(key)? {
        Parsed::Node(name) => Record::Node(name.into(), None),
        Parsed::Endpoint(n, i) => Record::Endpoint(pair(n, i), None),
        Parsed::Check(n, i) => Record::Check(pair(n, i), None),
        Parsed::Query(id) => Record::Query(id.into(), None),
        Parsed::Kv(key) => Record::Kv(key.into(), None),
        Parsed::Session(id) => Record::Session(id.into(), None),
        Parsed::KvTombstone(key) => Record::KvUnbury(key.into()),
        _ => return None,
    })
}

impl EtcdStore {
    /// Connects, reads the whole catalog under the prefix and starts the
    /// watch that feeds the writer. When etcd cannot be reached, an agent
    /// with a local copy of the catalog (`copy_dir`) starts from it, stale,
    /// and keeps trying etcd: once it answers, the catalog is replaced by
    /// etcd's and followed from there. Without a copy that is an error.
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Open {
                path: String::new(),
                message: "store.endpoints is empty".to_string(),
            });
        }
        // The copy's file may still be held by the agent this one replaces
        // (an upgrade): then there is none to start from, and it is kept
        // once the file is free.
        let copy = options.copy_dir.as_ref().map(|dir| {
            let opened = LocalCopy::open(dir)
                .map_err(
                    |err| tracing::info!(%err, "the local copy of the catalog is not open yet"),
                )
                .ok();
            (dir.clone(), opened)
        });
        let keys = Keys::new(&options.prefix);
        let status = Arc::new(StoreStatus::member(Some(options.member.as_str().into())));
        let (tx, rx) = mpsc::channel(1024);
        let slot = Arc::new(OnceLock::new());
        let loaded = match reach(options, &keys).await {
            Ok((client, loaded, revision)) => {
                let copy = copy.map(|(dir, opened)| {
                    let copy = keep(dir, opened, status.clone());
                    let _ = copy.send(Update::Reset(Box::new(loaded.clone())));
                    copy
                });
                let _ = slot.set(client.clone());
                start_following(options, &keys, client, revision, tx, &status, copy);
                tracing::info!(endpoints = ?options.endpoints, prefix = %options.prefix, revision,
                    index = loaded.index, "etcd store connected");
                loaded
            }
            Err(err) => {
                let Some((dir, Some(copy))) = copy else {
                    return Err(err);
                };
                let Some((loaded, written_ms)) = copy.read()? else {
                    return Err(err);
                };
                status.stale_since(written_ms);
                status.copied(loaded.index, written_ms);
                let age = Duration::from_millis(crate::model::unix_ms().saturating_sub(written_ms));
                tracing::warn!(%err, ?age, index = loaded.index,
                    "etcd unreachable at start: serving this agent's local copy of the catalog (stale); writes fail until etcd answers");
                tokio::spawn(reach_later(
                    options.clone(),
                    keys.clone(),
                    slot.clone(),
                    tx,
                    status.clone(),
                    keep(dir, Some(copy), status.clone()),
                ));
                loaded
            }
        };
        Ok(EtcdStore {
            client: slot,
            keys,
            loaded: Some(loaded),
            feed: Some(rx),
            status,
            request_timeout: options.request_timeout,
            mark: format!(
                "{}/writes/{}",
                options.prefix.trim_end_matches('/'),
                options.member
            )
            .into_bytes(),
            // Microseconds at start: above any id an earlier run of this
            // agent left in its mark.
            write_id: crate::model::unix_us(),
        })
    }

    fn transaction(&self, batch: &StoreBatch, id: u64) -> Result<Txn, StoreError> {
        let keys = &self.keys;
        let mut ops = vec![TxnOp::put(self.mark.clone(), id.to_string(), None)];
        let catalog_changed = !batch.is_empty();
        for (name, node) in &batch.nodes {
            let key = keys.key("node", name);
            ops.push(match node {
                Some(node) => TxnOp::put(key, encode(&**node)?, None),
                None => TxnOp::delete(key, None),
            });
        }
        for ((node, id), endpoint) in &batch.endpoints {
            let key = keys.pair("endpoint", node, id);
            ops.push(match endpoint {
                Some(endpoint) => TxnOp::put(key, encode(&**endpoint)?, None),
                None => TxnOp::delete(key, None),
            });
        }
        for ((node, id), check) in &batch.checks {
            let key = keys.pair("check", node, id);
            match check {
                Some(check) => ops.push(TxnOp::put(key, encode(&**check)?, None)),
                None => {
                    ops.push(TxnOp::delete(key, None));
                    ops.push(TxnOp::delete(keys.pair("ttl", node, id), None));
                }
            }
        }
        for (id, query) in &batch.queries {
            let key = keys.key("query", id);
            ops.push(match query {
                Some(query) => TxnOp::put(key, encode(&**query)?, None),
                None => TxnOp::delete(key, None),
            });
        }
        // Sessions first: an agent applying this revision sees a session's
        // end before the keys it released (their lock delay is its own).
        for (id, session) in &batch.sessions {
            match session {
                Some(session) => ops.push(TxnOp::put(
                    keys.key("session", id),
                    encode(&**session)?,
                    None,
                )),
                None => {
                    ops.push(TxnOp::delete(keys.key("session", id), None));
                    ops.push(TxnOp::delete(keys.key("sessionttl", id), None));
                }
            }
        }
        for key in &batch.kv_reaped {
            ops.push(TxnOp::delete(keys.key("kvdel", key), None));
        }
        if let Some(floor) = batch.kv_floor {
            ops.push(TxnOp::put(
                keys.key("kvreaped", "floor"),
                floor.to_string().into_bytes(),
                None,
            ));
        }
        for id in &batch.session_renewals {
            ops.push(TxnOp::put(keys.key("sessionttl", id), Vec::new(), None));
        }
        for (key, change) in &batch.kv {
            let (entry, tombstone) = (keys.key("kv", key), keys.key("kvdel", key));
            match change {
                KvChange::Set(e) => {
                    ops.push(TxnOp::put(entry, encode(&**e)?, None));
                    ops.push(TxnOp::delete(tombstone, None));
                }
                KvChange::Deleted(_) => {
                    ops.push(TxnOp::delete(entry, None));
                    ops.push(TxnOp::put(tombstone, Vec::new(), None));
                }
            }
        }
        for ((node, id), ttl) in &batch.ttl_renewals {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            ops.push(TxnOp::put(keys.pair("ttl", node, id), encode(&ms)?, None));
        }
        if catalog_changed {
            let written_us = crate::model::unix_us().to_string();
            ops.push(TxnOp::put(keys.index(), written_us.into_bytes(), None));
            for (service, _) in &batch.service_index {
                ops.push(TxnOp::put(keys.key("svc", service), Vec::new(), None));
            }
            for (node, exists) in &batch.entries {
                let key = keys.key("entry", node);
                ops.push(match exists {
                    true => TxnOp::put(key, Vec::new(), None),
                    false => TxnOp::delete(key, None),
                });
            }
            for (changed, table) in batch.tables.iter().zip(TABLES) {
                if *changed {
                    ops.push(TxnOp::put(keys.key("table", table), Vec::new(), None));
                }
            }
        }
        let base = i64::try_from(batch.base).map_err(io)?;
        let seen = i64::try_from(batch.seen).map_err(io)?;
        let mut when = vec![Compare::mod_revision(keys.index(), CompareOp::Equal, base)];
        // A TTL key that was never written has mod revision 0.
        when.extend(batch.ttl_expiries.iter().map(|(node, id)| {
            Compare::mod_revision(keys.pair("ttl", node, id), CompareOp::Less, seen + 1)
        }));
        // When the compare fails, the mark says whether an earlier try of
        // this very write was applied (its answer lost to a member's death).
        Ok(Txn::new()
            .when(when)
            .and_then(ops)
            .or_else(vec![TxnOp::get(self.mark.clone(), None)]))
    }
}

impl EtcdStore {
    /// The outcome of write `id`, which no quorum acknowledged within
    /// `store.request_timeout`: once etcd answers a (linearizable) read
    /// again, its mark says whether one of the tries was applied. A try not
    /// applied by then never will be (a leader that commits in its term
    /// has dropped what other leaders' logs held), so a refusal is final
    /// and an applied write is acknowledged, late. Waits `RESOLVE_FOR` at
    /// most; then the outcome is unknown, and said so.
    async fn resolve(
        &self,
        client: &Client,
        id: u64,
        tries: u32,
        failed: String,
    ) -> Result<Committed, StoreError> {
        tracing::warn!(tries, error = %failed, "no etcd quorum answered a write within store.request_timeout: waiting for etcd to tell whether it was applied");
        let until = Instant::now() + RESOLVE_FOR;
        let mut pause = Duration::from_millis(100);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io(format!(
                    "no etcd quorum answered within store.request_timeout ({:?}, {tries} tries) nor {RESOLVE_FOR:?} after: the write's outcome is unknown (it may yet be applied): {failed}",
                    self.request_timeout
                )));
            }
            let read = timeout(
                left.min(self.request_timeout),
                client.kv_client().get(self.mark.clone(), None),
            )
            .await;
            if let Ok(Ok(response)) = read {
                let applied = response
                    .kvs()
                    .first()
                    .filter(|kv| kv.value() == id.to_string().as_bytes());
                return match applied {
                    Some(kv) => {
                        tracing::info!(
                            revision = kv.mod_revision(),
                            "the write no quorum acknowledged in time was applied"
                        );
                        Ok(Committed::Shared {
                            revision: rev(kv.mod_revision()),
                        })
                    }
                    None => Err(io(format!(
                        "no etcd quorum answered within store.request_timeout ({:?}, {tries} tries): not applied: {failed}",
                        self.request_timeout
                    ))),
                };
            }
            sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_BACKOFF * 4);
        }
    }
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(self.loaded.take().unwrap_or_default())
    }

    async fn commit(&mut self, batch: StoreBatch) -> Result<Committed, StoreError> {
        self.write_id += 1;
        let id = self.write_id;
        let txn = self.transaction(&batch, id)?;
        let Some(client) = self.client.get().cloned() else {
            return Err(io(
                "etcd has not answered since this agent started: it serves its local copy of the catalog (stale), and writes resume once etcd answers",
            ));
        };
        // The client spreads requests over the members; one that is down
        // refuses the connection and the next try goes to another, and an
        // election ends within a few of etcd's election timeouts: the write
        // keeps trying until `request_timeout`. A retry cannot apply the
        // batch twice: the transaction is conditional on the catalog index,
        // which a first success would have moved (the writer then sees a
        // conflict, catches up, and finds its change there).
        // Each try waits a fifth of that at most: a request caught by a
        // member without a leader waits for one, and may be better sent to
        // another member.
        let deadline = Instant::now() + self.request_timeout;
        let per_try = (self.request_timeout / 5).max(Duration::from_millis(500));
        let mut tries = 0u32;
        let response = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let failed = match timeout(per_try.min(left), client.kv_client().txn(txn.clone())).await
            {
                Ok(Ok(response)) => break response,
                Ok(Err(err)) if unreachable_member(&err) || ambiguous(&err) => err.to_string(),
                // Refused as such (too large, not allowed): not applied,
                // unless an earlier try was.
                Ok(Err(err)) if tries > 0 => {
                    return self.resolve(&client, id, tries, err.to_string()).await
                }
                Ok(Err(err)) => return Err(io(err)),
                Err(_) => format!("no answer within {per_try:?}"),
            };
            tries += 1;
            let pause = Duration::from_millis(10 << tries.min(5)).min(MAX_BACKOFF);
            if Instant::now() + pause >= deadline {
                // A try may still be in a leader's log that lost its quorum,
                // and commit once the quorum is back: the outcome is found
                // out before the write is answered.
                return self.resolve(&client, id, tries, failed).await;
            }
            tracing::debug!(error = %failed, tries, "etcd write met a member down or an election; trying again");
            sleep(pause).await;
        };
        let revision = response.header().map_or(0, |h| rev(h.revision()));
        if response.succeeded() {
            return Ok(Committed::Shared { revision });
        }
        let mine = id.to_string();
        let applied = response.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .filter(|kv| kv.value() == mine.as_bytes())
                .map(|kv| rev(kv.mod_revision())),
            _ => None,
        });
        Ok(match applied {
            // An earlier try was applied; this one met its own change.
            Some(at) => Committed::Shared { revision: at },
            None => Committed::Conflict { revision },
        })
    }

    fn feed(&mut self) -> Option<mpsc::Receiver<Change>> {
        self.feed.take()
    }

    fn shared(&self) -> bool {
        true
    }

    fn status(&self) -> Arc<StoreStatus> {
        self.status.clone()
    }
}

/// A client of etcd, and the whole catalog with its revision: what an agent
/// needs before it follows the catalog.
async fn reach(options: &EtcdOptions, keys: &Keys) -> Result<(Client, Loaded, u64), StoreError> {
    let open_err = |message: String| StoreError::Open {
        path: options.endpoints.join(","),
        message,
    };
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_timeout(options.request_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &options.user {
        connect = connect.with_user(user.clone(), password.clone());
    }
    if options.ca_pem.is_some() || options.identity_pem.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &options.ca_pem {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity_pem {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        connect = connect.with_tls(tls);
    }
    let client = Client::connect(&options.endpoints, Some(connect))
        .await
        .map_err(|e| open_err(e.to_string()))?;
    let mut tries = 0;
    loop {
        match read_all(&client, keys).await {
            Ok((loaded, revision)) => return Ok((client, loaded, revision)),
            // Another member may answer (the client spreads requests).
            Err(_) if tries < RETRIES => {
                tries += 1;
                sleep(Duration::from_millis(50 << tries)).await;
            }
            Err(err) => return Err(open_err(err.to_string())),
        }
    }
}

/// Starts keeping this agent's membership and following the catalog from
/// `revision`.
fn start_following(
    options: &EtcdOptions,
    keys: &Keys,
    client: Client,
    revision: u64,
    tx: mpsc::Sender<Change>,
    status: &Arc<StoreStatus>,
    copy: Option<mpsc::UnboundedSender<Update>>,
) {
    status.contact(revision);
    tokio::spawn(keep_membership(
        client.clone(),
        options.prefix.trim_end_matches('/').to_string(),
        options.member.clone(),
        options.lease_ttl.max(Duration::from_secs(2)),
        status.clone(),
    ));
    tokio::spawn(follow(
        client,
        keys.clone(),
        revision,
        Feed { tx, copy },
        status.clone(),
    ));
}

/// An agent started from its local copy: tries etcd until it answers, then
/// replaces the catalog with etcd's and follows it like any other.
async fn reach_later(
    options: EtcdOptions,
    keys: Keys,
    slot: Arc<OnceLock<Client>>,
    tx: mpsc::Sender<Change>,
    status: Arc<StoreStatus>,
    copy: mpsc::UnboundedSender<Update>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if tx.is_closed() {
            return;
        }
        match reach(&options, &keys).await {
            Ok((client, loaded, revision)) => {
                tracing::info!(
                    revision,
                    index = loaded.index,
                    "etcd answered: the local copy gives way to etcd's catalog"
                );
                let _ = copy.send(Update::Reset(Box::new(loaded.clone())));
                let loaded = Box::new(loaded);
                if tx.send(Change::Reset { revision, loaded }).await.is_err() {
                    return;
                }
                let _ = slot.set(client.clone());
                start_following(&options, &keys, client, revision, tx, &status, Some(copy));
                return;
            }
            Err(err) => tracing::debug!(%err, "etcd still unreachable"),
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Where the watch passes changes on: the writer, and the local copy.
struct Feed {
    tx: mpsc::Sender<Change>,
    copy: Option<mpsc::UnboundedSender<Update>>,
}

impl Feed {
    /// False once the writer is gone.
    async fn send(&self, change: Change) -> bool {
        if let Some(copy) = &self.copy {
            let update = match &change {
                Change::Records { revision, records } => {
                    Update::Records(*revision, records.clone())
                }
                Change::Reset { loaded, .. } => Update::Reset(loaded.clone()),
            };
            let _ = copy.send(update);
        }
        self.tx.send(change).await.is_ok()
    }
}

/// Keeps `<prefix>/agents/<member>` alive under a lease and reads the live
/// agents about once a second. A lapsed lease (a long partition) is granted
/// anew; until then this agent does not see itself among the members and
/// others take its checks.
async fn keep_membership(
    client: Client,
    prefix: String,
    member: String,
    ttl: Duration,
    status: Arc<StoreStatus>,
) {
    let agents = format!("{prefix}/agents/");
    let key = format!("{agents}{member}");
    let loads = format!("{prefix}/load/");
    let load_key = format!("{loads}{member}");
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(5);
    loop {
        let outcome: Result<(), StoreError> = async {
            let mut lease = client.lease_client();
            let granted = lease.grant(ttl_secs, None).await.map_err(io)?;
            let id = granted.id();
            let put = etcd_client::PutOptions::new().with_lease(id);
            client
                .kv_client()
                .put(key.clone(), Vec::new(), Some(put))
                .await
                .map_err(io)?;
            let (mut keeper, mut answers) = lease.keep_alive(id).await.map_err(io)?;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut renewed = Instant::now();
            let mut ticks = 0u64;
            loop {
                tick.tick().await;
                // etcd's leader and members, for /v1/status/leader and peers.
                if ticks.is_multiple_of(5) {
                    match timeout(Duration::from_secs(2), etcd_servers(&client)).await {
                        Ok(Ok(servers)) => status.set_servers(servers),
                        Ok(Err(err)) => tracing::debug!(%err, "cannot read etcd's members"),
                        Err(_) => tracing::debug!("etcd's members: no answer"),
                    }
                }
                ticks += 1;
                if renewed.elapsed() >= ttl / 3 {
                    keeper.keep_alive().await.map_err(io)?;
                    match timeout(Duration::from_secs(2), answers.message()).await {
                        Ok(Ok(Some(answer))) if answer.ttl() > 0 => renewed = Instant::now(),
                        Ok(Ok(_)) => return Err(io("agent lease expired")),
                        Ok(Err(err)) => return Err(io(err)),
                        Err(_) => return Err(io("no answer to a lease renewal")),
                    }
                }
                let listed = client
                    .kv_client()
                    .get(
                        agents.clone(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                    .map_err(io)?;
                let mut members: Vec<Name> = listed
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        let name = kv.key().strip_prefix(agents.as_bytes())?;
                        std::str::from_utf8(name).ok().map(Name::from)
                    })
                    .collect();
                members.sort();
                status.set_members(members);
                exchange_load(&client, &loads, &load_key, &member, id, &status).await;
            }
        }
        .await;
        if let Err(err) = outcome {
            tracing::warn!(%err, "agent membership in etcd lost; re-joining");
        }
        sleep(Duration::from_secs(1)).await;
    }
}

/// etcd's leader and members by their first client URL's address.
async fn etcd_servers(client: &Client) -> Result<super::Servers, etcd_client::Error> {
    let leader = client.maintenance_client().status().await?.leader();
    let listed = client.cluster_client().member_list().await?;
    let addr = |m: &etcd_client::Member| {
        m.client_urls().first().map(|url| {
            url.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string()
        })
    };
    let mut members: Vec<String> = listed.members().iter().filter_map(addr).collect();
    members.sort();
    let leader = listed
        .members()
        .iter()
        .find(|m| m.id() == leader)
        .and_then(addr);
    Ok(super::Servers { leader, members })
}

/// Publishes this agent's live load under its lease (`<prefix>/load/<me>`,
/// gone with the agent) and reads every other agent's. A failure leaves the
/// last reports in place; a drain then stays "draining" until fresh ones
/// arrive, never "drained" on old news.
async fn exchange_load(
    client: &Client,
    loads: &str,
    load_key: &str,
    member: &str,
    lease: i64,
    status: &StoreStatus,
) {
    let board = status.board();
    let put = etcd_client::PutOptions::new().with_lease(lease);
    let mut kv = client.kv_client();
    if let Err(err) = kv.put(load_key, board.encode_local(), Some(put)).await {
        tracing::debug!(%err, "cannot publish this agent's load");
    }
    match kv.get(loads, Some(GetOptions::new().with_prefix())).await {
        Ok(listed) => board.set_remote(listed.kvs().iter().filter_map(|kv| {
            let name = std::str::from_utf8(kv.key().strip_prefix(loads.as_bytes())?).ok()?;
            (name != member).then(|| (Name::from(name), kv.value()))
        })),
        Err(err) => tracing::debug!(%err, "cannot read the other agents' load"),
    }
}

/// Reads every key under the catalog root at one revision, a page at a time.
async fn read_all(client: &Client, keys: &Keys) -> Result<(Loaded, u64), StoreError> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut end = keys.root.clone();
    if let Some(last) = end.last_mut() {
        *last += 1; // '/' + 1: the end of the prefix range
    }
    let mut loaded = Loaded::default();
    let mut from = keys.root.clone();
    let mut at = 0i64;
    let mut tables = [0u64; 3];
    let mut has_tables = false;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if at > 0 {
            options = options.with_revision(at);
        }
        let response = kv.get(from.clone(), Some(options)).await.map_err(io)?;
        if at == 0 {
            at = response.header().map_or(0, |h| h.revision());
        }
        for item in response.kvs() {
            let modify = rev(item.mod_revision());
            match keys.parse(item.key()) {
                Some(Parsed::Service(name)) => loaded.service_index.push((name.into(), modify)),
                Some(Parsed::Entry(name)) => loaded.entry_index.push((name.into(), modify)),
                Some(Parsed::Table(i)) => {
                    tables[i] = modify;
                    has_tables = true;
                }
                _ => match put_record(keys, item) {
                    Ok(Some(Record::Node(_, Some(node)))) => loaded.nodes.push(*node),
                    Ok(Some(Record::Endpoint(_, Some(e)))) => loaded.endpoints.push(*e),
                    Ok(Some(Record::Check(_, Some(c)))) => loaded.checks.push(*c),
                    Ok(Some(Record::Query(_, Some(q)))) => loaded.queries.push(*q),
                    Ok(Some(Record::Kv(_, Some(e)))) => loaded.kv.push(*e),
                    Ok(Some(Record::Session(_, Some(s)))) => loaded.sessions.push(*s),
                    Ok(Some(Record::KvReaped(floor))) => loaded.kv_reaped = floor,
                    Ok(Some(Record::KvTombstone(key))) => {
                        loaded.kv_tombstones.push((key.to_string(), modify))
                    }
                    Ok(Some(Record::Index { .. })) => loaded.index = modify,
                    Ok(_) => {}
                    Err(err) => tracing::error!(%err, "skipping an undecodable record in etcd"),
                },
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    if has_tables {
        loaded.tables = Some(tables);
    }
    Ok((loaded, rev(at)))
}

/// How one watch ended.
enum Ended {
    /// The writer is gone: stop.
    Closed,
    /// The next revision is no longer in etcd's history: read everything.
    Compacted,
}

/// Follows the catalog from `revision` for as long as the writer listens,
/// reconnecting with backoff.
async fn follow(client: Client, keys: Keys, mut revision: u64, tx: Feed, status: Arc<StoreStatus>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = watch_from(&client, &keys, &mut revision, &tx, &status).await;
        match outcome {
            Ok(Ended::Closed) => return,
            Ok(Ended::Compacted) => match read_all(&client, &keys).await {
                Ok((loaded, at)) => {
                    tracing::warn!(
                        from = revision + 1,
                        at,
                        "etcd history compacted past this agent; catalog re-read"
                    );
                    revision = at;
                    status.contact(at);
                    if !tx
                        .send(Change::Reset {
                            revision: at,
                            loaded: Box::new(loaded),
                        })
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Err(err) => tracing::warn!(%err, "etcd re-read failed"),
            },
            Err(err) => {
                if status.connected() {
                    tracing::warn!(%err, revision, "lost etcd; serving the last catalog while reconnecting");
                    backoff = Duration::from_millis(100);
                }
            }
        }
        status.lost();
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if tx.tx.is_closed() {
            return;
        }
    }
}

/// One watch stream from `revision + 1`. Advances `revision` as changes are
/// passed on, so a new stream resumes exactly after the last one.
async fn watch_from(
    client: &Client,
    keys: &Keys,
    revision: &mut u64,
    tx: &Feed,
    status: &StoreStatus,
) -> Result<Ended, StoreError> {
    let start = i64::try_from(*revision + 1).map_err(io)?;
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let (mut watcher, mut stream) = timeout(SILENCE, watch.watch(keys.root.clone(), Some(options)))
        .await
        .map_err(|_| io("etcd watch: no answer"))?
        .map_err(io)?;
    status.contact(*revision);
    let mut heard = Instant::now();
    let mut ask = tokio::time::interval(PROGRESS_EVERY);
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(io)?,
            _ = ask.tick() => {
                if heard.elapsed() > SILENCE {
                    return Err(io("etcd watch: no progress report"));
                }
                watcher.request_progress().await.map_err(io)?;
                continue;
            }
            () = tx.tx.closed() => return Ok(Ended::Closed),
        };
        let Some(response) = message else {
            return Err(io("etcd closed the watch"));
        };
        heard = Instant::now();
        if response.compact_revision() > 0 {
            return Ok(Ended::Compacted);
        }
        if response.canceled() {
            return Err(io(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            )));
        }
        let mut current: Option<(u64, Vec<Record>)> = None;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let at = rev(kv.mod_revision());
            if current.as_ref().is_some_and(|(r, _)| *r != at) {
                if let Some((r, records)) = current.take() {
                    if !pass_on(tx, r, records, revision).await {
                        return Ok(Ended::Closed);
                    }
                }
            }
            let records = &mut current.get_or_insert_with(|| (at, Vec::new())).1;
            let record = match event.event_type() {
                EventType::Put => put_record(keys, kv).unwrap_or_else(|err| {
                    tracing::error!(%err, "skipping an undecodable record from etcd");
                    None
                }),
                EventType::Delete => delete_record(keys, kv.key()),
            };
            records.extend(record);
        }
        if let Some((r, records)) = current.take() {
            if !pass_on(tx, r, records, revision).await {
                return Ok(Ended::Closed);
            }
        }
        let header = response.header().map_or(0, |h| rev(h.revision()));
        status.contact(header.max(*revision));
    }
}

async fn pass_on(tx: &Feed, at: u64, records: Vec<Record>, revision: &mut u64) -> bool {
    *revision = at;
    tx.send(Change::Records {
        revision: at,
        records,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A one-member etcd on free loopback ports, killed on drop.
    struct Etcd {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        socket.local_addr().expect("addr").port()
    }

    fn etcd() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the etcd binary is needed for this test: apt-get install -y etcd-server");
        Etcd {
            child,
            url,
            _dir: dir,
        }
    }

    async fn connect(url: &str) -> EtcdStore {
        let options = EtcdOptions {
            endpoints: vec![url.to_string()],
            prefix: "/race".to_string(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            member: "a".to_string(),
            lease_ttl: Duration::from_secs(5),
            ..EtcdOptions::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match EtcdStore::connect(&options).await {
                Ok(store) => return store,
                Err(err) if Instant::now() > deadline => panic!("etcd never came up: {err}"),
                Err(_) => sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn renew(id: &str) -> ((Name, Name), Duration) {
        (("n".into(), id.into()), Duration::from_secs(2))
    }

    /// An expiry decided before a renewal was seen loses to that renewal; one
    /// decided after it, or of a check never renewed, commits.
    #[tokio::test]
    async fn an_expiry_commits_only_if_no_renewal_came_after_what_was_seen() {
        let etcd = etcd();
        let mut store = connect(&etcd.url).await;
        let renewed = StoreBatch {
            ttl_renewals: vec![renew("c")],
            ..StoreBatch::default()
        };
        let Committed::Shared { revision } = store.commit(renewed).await.expect("commit") else {
            panic!("a plain renewal conflicted");
        };
        let expire = |seen: u64, id: &str| StoreBatch {
            ttl_renewals: vec![renew("other")],
            ttl_expiries: vec![("n".into(), id.into())],
            seen,
            ..StoreBatch::default()
        };
        let stale = store
            .commit(expire(revision - 1, "c"))
            .await
            .expect("commit");
        assert!(matches!(stale, Committed::Conflict { .. }), "{stale:?}");
        let current = store.commit(expire(revision, "c")).await.expect("commit");
        assert!(matches!(current, Committed::Shared { .. }), "{current:?}");
        let never = store.commit(expire(0, "never")).await.expect("commit");
        assert!(matches!(never, Committed::Shared { .. }), "{never:?}");
    }
}
