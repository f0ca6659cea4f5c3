//! Keyed wake-ups for blocking queries.
//!
//! A blocking query on one service (or node) waits on that key's `Notify`; the
//! writer, after publishing, notifies only the keys its changes touched. So
//! 50,000 watchers of 50,000 services cost nothing when one unrelated service
//! flaps: no task is woken to find its index unchanged. Queries on whole tables
//! (all services, all nodes, all checks) wait on the index `watch` instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::model::Name;

/// What a blocking query waits for.
#[derive(Clone, Copy, Debug)]
pub enum WatchKey<'a> {
    Service(&'a str),
    Node(&'a str),
    /// A prepared query's definition, by ID.
    Query(&'a str),
    /// A KV key or prefix: woken by a change to any key that starts with it.
    Kv(&'a str),
}

#[derive(Default)]
struct Keyed {
    map: HashMap<Name, Arc<Notify>>,
    /// Map size after the last sweep; the next sweep runs at twice that.
    swept_at: usize,
}

impl Keyed {
    fn get(&mut self, name: &str) -> Arc<Notify> {
        if let Some(notify) = self.map.get(name) {
            return notify.clone();
        }
        if self.map.len() >= self.swept_at.max(64) * 2 {
            // Drop keys nobody waits on any more (the map holds the only Arc).
            self.map.retain(|_, n| Arc::strong_count(n) > 1);
            self.swept_at = self.map.len();
        }
        let notify = Arc::new(Notify::new());
        self.map.insert(name.into(), notify.clone());
        notify
    }

    fn notify<'a>(&self, names: impl Iterator<Item = &'a Name>) {
        for name in names {
            if let Some(notify) = self.map.get(name) {
                notify.notify_waiters();
            }
        }
    }
}

/// The per-key `Notify`s. Locked briefly by a query registering and by the
/// writer once per publish; never on the DNS or proxy paths.
#[derive(Default)]
pub(crate) struct Watchers {
    services: Mutex<Keyed>,
    nodes: Mutex<Keyed>,
    queries: Mutex<Keyed>,
    kv: Mutex<Keyed>,
}

impl Watchers {
    pub(crate) fn get(&self, key: WatchKey<'_>) -> Arc<Notify> {
        match key {
            WatchKey::Service(name) => self
                .services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name),
            WatchKey::Node(name) => self
                .nodes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name),
            WatchKey::Query(id) => self
                .queries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id),
            WatchKey::Kv(prefix) => self
                .kv
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(prefix),
        }
    }

    /// Wakes the waiters of every prefix of each touched KV key (the key
    /// itself and the empty prefix included).
    pub(crate) fn notify_kv(&self, keys: &[Name]) {
        if keys.is_empty() {
            return;
        }
        let keyed = self.kv.lock().unwrap_or_else(PoisonError::into_inner);
        if keyed.map.is_empty() {
            return;
        }
        for key in keys {
            for end in (0..=key.len()).filter(|end| key.is_char_boundary(*end)) {
                if let Some(notify) = keyed.map.get(&key[..end]) {
                    notify.notify_waiters();
                }
            }
        }
    }

    /// Wakes the waiters of every touched service, node and query.
    pub(crate) fn notify(&self, services: &[Name], nodes: &[Name], queries: &[Name]) {
        if !queries.is_empty() {
            self.queries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify(queries.iter());
        }
        if !services.is_empty() {
            self.services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify(services.iter());
        }
        if !nodes.is_empty() {
            self.nodes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify(nodes.iter());
        }
    }
}
