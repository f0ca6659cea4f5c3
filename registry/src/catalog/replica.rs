//! Applying changes read back from a shared store (etcd).
//!
//! Commands are validated and turned into records by the agent that received
//! them; every agent, that one included, then applies the committed records
//! as they are, at the store's revision. No rule is checked again here: the
//! records are the catalog.

use std::sync::Arc;

use imbl::OrdMap;

use super::{Catalog, DirtyKey};
use crate::model::{Check, Endpoint, Name, Node};
use crate::snapshot::{NodeEntry, Snapshot};
use crate::store::Record;
use switchyard_catalog::{PreparedQuery, Query};

impl Catalog {
    /// Applies one revision's records. Returns the TTL checks it renewed.
    pub(crate) fn apply_records(
        &mut self,
        records: Vec<Record>,
        revision: u64,
    ) -> Vec<(Name, Name)> {
        let mut renewed = Vec::new();
        let mut deletions = Vec::new();
        let mut endpoints = Vec::new();
        let mut checks = Vec::new();
        let mut catalog_changed = false;
        // Sessions that end first, while the keys they held still say so:
        // each agent holds those keys back for the session's lock delay.
        for record in &records {
            if let Record::Session(id, None) = record {
                self.session_gone(id, revision);
            }
        }
        // Nodes first, then what lives on them; deletions last, innermost first.
        for record in records {
            match record {
                Record::Node(_, Some(node)) => self.replace_node(*node, revision),
                Record::Endpoint(_, Some(endpoint)) => endpoints.push(*endpoint),
                Record::Check(_, Some(check)) => checks.push(*check),
                // Each agent restarts the clock with the TTL in the check's definition.
                Record::Ttl(key, _) => renewed.push(key),
                Record::Index { .. } => catalog_changed = true,
                Record::Query(id, query) => self.replace_query(&id, query, revision),
                Record::Kv(key, Some(entry)) => {
                    self.snap.kv.insert(Arc::from(entry), revision);
                    self.dirty.add(DirtyKey::Kv(key));
                }
                Record::Kv(key, None) => {
                    self.snap.kv.remove(&key, revision);
                    self.dirty.add(DirtyKey::Kv(key));
                }
                Record::KvTombstone(key) => self.snap.kv.bury(&key, revision),
                Record::Session(id, Some(session)) => {
                    self.snap.sessions.insert(Arc::from(session), revision);
                    self.dirty.add(DirtyKey::Session(id.clone()));
                    self.renewed_sessions.push(id);
                }
                Record::Session(_, None) => {}
                Record::SessionRenewed(id) => self.renewed_sessions.push(id),
                Record::KvUnbury(key) => self.snap.kv.unbury(&key),
                Record::KvReaped(floor) => self.snap.kv.reaped = self.snap.kv.reaped.max(floor),
                deletion => deletions.push(deletion),
            }
        }
        for endpoint in endpoints {
            self.replace_endpoint(endpoint, revision);
        }
        for check in checks {
            self.replace_check(check, revision);
        }
        deletions.sort_by_key(|r| match r {
            Record::Check(..) => 0,
            Record::Endpoint(..) => 1,
            _ => 2,
        });
        for deletion in deletions {
            match deletion {
                Record::Check((node, id), None) => {
                    self.del_check(&node, &id, revision);
                }
                Record::Endpoint((node, id), None) => {
                    self.del_endpoint(&node, &id, revision);
                }
                Record::Node(name, None) => {
                    self.del_node(&name, revision);
                }
                _ => {}
            }
        }
        if catalog_changed {
            self.snap.index = self.snap.index.max(revision);
        }
        renewed.retain(|(node, id)| self.get_check(node, id).is_some());
        renewed
    }

    /// A query as committed (compiled again: a definition that no longer
    /// compiles is dropped, loudly).
    fn replace_query(&mut self, id: &Name, query: Option<Box<PreparedQuery>>, revision: u64) {
        let compiled = query.and_then(|q| match Query::compile(*q) {
            Ok(q) => Some(Arc::new(q)),
            Err(e) => {
                tracing::error!(query = %id, error = %e, "replicated prepared query does not compile; dropped");
                None
            }
        });
        self.set_query(id, compiled, revision);
    }

    /// A session ended by another write: gone, and the keys it holds (the
    /// same revision releases or deletes them) held back for its delay.
    fn session_gone(&mut self, id: &str, revision: u64) {
        let Some(session) = self.snap.sessions.remove(id, revision) else {
            return;
        };
        self.dirty.add(DirtyKey::Session(id.into()));
        let now = crate::model::unix_ms();
        let until = now + session.lock_delay().as_millis() as u64;
        let held = self.snap.kv.held_by(id);
        for key in held {
            self.snap.kv.delay(&key, until, now);
        }
    }

    fn replace_node(&mut self, node: Node, revision: u64) {
        let name = node.name.clone();
        match self.entry_mut(&name) {
            Some(entry) => entry.node = Arc::new(node),
            None => {
                self.snap.insert_node(
                    name.clone(),
                    Arc::new(NodeEntry {
                        node: Arc::new(node),
                        endpoints: OrdMap::new(),
                        checks: OrdMap::new(),
                        index: revision,
                    }),
                );
            }
        }
        self.node_changed(&name, revision);
    }

    fn replace_endpoint(&mut self, mut endpoint: Endpoint, revision: u64) {
        self.intern(&mut endpoint);
        let node = endpoint.node.clone();
        let id = endpoint.id.clone();
        let Some(entry) = self.snap.nodes.get(&node) else {
            tracing::warn!(node = %node, id = %id, "replicated endpoint on an unknown node; skipped");
            return;
        };
        if let Some(prev) = entry.endpoints.get(&id).cloned() {
            if prev.service != endpoint.service {
                self.service_entry_mut(&prev.service)
                    .members
                    .remove(&(node.clone(), id.clone()));
                self.touch_service(&prev.service, revision);
            }
        }
        let service = endpoint.service.clone();
        if let Some(entry) = self.entry_mut(&node) {
            entry.endpoints.insert(id.clone(), Arc::new(endpoint));
            entry.index = revision;
        }
        let service_entry = self.service_entry_mut(&service);
        service_entry.members.insert((node.clone(), id.clone()));
        self.touch_service(&service, revision);
        self.dirty.add(DirtyKey::Endpoint((node, id)));
        self.snap.tables.services = revision;
    }

    fn replace_check(&mut self, check: Check, revision: u64) {
        let node = check.node.clone();
        let id = check.id.clone();
        let Some(entry) = self.snap.nodes.get(&node) else {
            tracing::warn!(node = %node, id = %id, "replicated check on an unknown node; skipped");
            return;
        };
        if let Some(prev) = entry.checks.get(&id).cloned() {
            if prev.service_id != check.service_id {
                self.check_touches(&prev, revision);
            }
        }
        let check = Arc::new(check);
        if let Some(entry) = self.entry_mut(&node) {
            entry.checks.insert(id.clone(), check.clone());
        }
        self.check_touches(&check, revision);
        self.dirty.add(DirtyKey::Check((node, id)));
        self.snap.tables.checks = revision;
    }

    /// After the catalog was replaced wholesale: everything in `old` or in
    /// the new catalog counts as changed, so views are rebuilt and every
    /// watcher is woken.
    pub(crate) fn mark_all(&mut self, old: &Snapshot) {
        let services: Vec<Name> = old
            .services
            .keys()
            .chain(self.snap.services.keys())
            .cloned()
            .collect();
        for service in services {
            self.dirty.add(DirtyKey::Service(service));
        }
        let queries: Vec<Name> = old
            .queries
            .iter()
            .chain(self.snap.queries.iter())
            .map(|q| q.def.id.as_str().into())
            .collect();
        for id in queries {
            self.dirty.add(DirtyKey::Query(id));
        }
        let keys: Vec<Name> = old
            .kv
            .under("")
            .chain(self.snap.kv.under(""))
            .map(|e| e.key.as_str().into())
            .collect();
        for key in keys {
            self.dirty.add(DirtyKey::Kv(key));
        }
        for snap in [old, &self.snap.clone()] {
            for (name, entry) in snap.nodes.iter() {
                self.dirty.add(DirtyKey::Node(name.clone()));
                self.dirty.add(DirtyKey::Entry(name.clone()));
                for id in entry.checks.keys() {
                    self.dirty.add(DirtyKey::Check((name.clone(), id.clone())));
                }
            }
        }
    }
}
