//! Consul's sessions as the snapshot holds them: what a lock on a KV key
//! belongs to. A session ends when it is destroyed, when its TTL runs out
//! (twice the TTL after its last renewal, as in Consul), when its node
//! leaves or when a check it is linked to turns critical or goes; its keys
//! are then released (or deleted) and stay unlockable for its lock delay.

use std::sync::Arc;
use std::time::Duration;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::model::Name;

/// Consul's bounds on a session's TTL.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest lock delay applied.
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// What happens to a session's locked keys when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    #[default]
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    /// Node-level checks it is linked to (`serfHealth` by default).
    pub node_checks: Vec<String>,
    /// Service checks it is linked to (on its node).
    pub service_checks: Vec<String>,
    /// How long its keys stay unlockable after it ends.
    pub lock_delay_ms: u64,
    pub behavior: Behavior,
    /// The TTL as a Go duration; empty: none.
    pub ttl: String,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Session {
    pub fn ttl(&self) -> Option<Duration> {
        match self.ttl.as_str() {
            "" => None,
            ttl => crate::duration::parse_go_duration(ttl)
                .ok()
                .filter(|d| !d.is_zero()),
        }
    }

    pub fn lock_delay(&self) -> Duration {
        Duration::from_millis(self.lock_delay_ms).min(MAX_LOCK_DELAY)
    }

    /// Every check it is linked to.
    pub fn checks(&self) -> impl Iterator<Item = &str> {
        self.node_checks
            .iter()
            .chain(&self.service_checks)
            .map(String::as_str)
    }
}

/// Every session, by ID.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    by_id: OrdMap<Name, Arc<Session>>,
    /// Session ids by node, for the checks a write to a node makes.
    by_node: OrdMap<Name, OrdMap<Name, ()>>,
    /// Last index at which any session was made or ended.
    pub index: u64,
}

impl Sessions {
    pub fn get(&self, id: &str) -> Option<&Arc<Session>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The ids of the sessions on `node`.
    pub fn on_node(&self, node: &str) -> Vec<Name> {
        self.by_node
            .get(node)
            .map(|ids| ids.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The writer's.
    pub fn insert(&mut self, session: Arc<Session>, idx: u64) {
        let id: Name = session.id.as_str().into();
        self.by_node
            .entry(session.node.as_str().into())
            .or_default()
            .insert(id.clone(), ());
        self.by_id.insert(id, session);
        self.index = self.index.max(idx);
    }

    /// The writer's.
    pub fn remove(&mut self, id: &str, idx: u64) -> Option<Arc<Session>> {
        let old = self.by_id.remove(id)?;
        if let Some(ids) = self.by_node.get_mut(old.node.as_str()) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_node.remove(old.node.as_str());
            }
        }
        self.index = self.index.max(idx);
        Some(old)
    }
}
