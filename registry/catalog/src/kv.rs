//! Consul's key/value store as the snapshot holds it: entries by key (sorted,
//! so a prefix is a range), and a tombstone per deleted key holding the index
//! of its deletion, so that a prefix's index still grows when a key under it
//! goes (a blocking read of the prefix wakes and sees it gone).

use std::ops::Bound;
use std::sync::Arc;

use base64::Engine as _;
use imbl::OrdMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Name;

/// Where the proxy's routes managed through `/v1/switchyard/routes` are
/// kept (one JSON value per route): durable and shared like any key, but
/// written only through that API (the KV API refuses them, and a recursive
/// delete above them leaves them be).
pub const ROUTES_PREFIX: &str = "switchyard/routes/";

/// Whether `key` is one the KV API may not write.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(ROUTES_PREFIX)
}

/// Tombstones kept: past this many the oldest are reaped, down to half.
pub const MAX_TOMBSTONES: usize = 10_000;

/// Consul's `kv_max_value_size`.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// One key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEntry {
    pub key: String,
    /// Stored as base64 (records are JSON).
    #[serde(serialize_with = "to_base64", deserialize_with = "from_base64")]
    pub value: Vec<u8>,
    pub flags: u64,
    /// The session holding its lock (empty: none).
    pub session: String,
    /// Successful acquisitions.
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

fn to_base64<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(value))
}

fn from_base64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(serde::de::Error::custom)
}

/// Every key, and the deletions a prefix's index must remember.
#[derive(Clone, Debug, Default)]
pub struct Kv {
    entries: OrdMap<Name, Arc<KvEntry>>,
    tombstones: OrdMap<Name, u64>,
    /// Keys in a lock delay (a session that held them ended): until when
    /// (Unix ms) no session may lock them. Kept in memory, as in Consul.
    delays: OrdMap<Name, u64>,
    /// Locked keys by the session holding them: a session's end finds its
    /// keys without reading every key.
    held: OrdMap<Name, OrdMap<Name, ()>>,
    /// Last index at which any key changed (the table's index).
    pub index: u64,
    /// The newest deletion whose tombstone was reaped: every prefix's index
    /// is at least this, so reaping never takes one back.
    pub reaped: u64,
}

/// The keys from `prefix` on, while they start with it.
fn range<'a, V>(
    map: &'a OrdMap<Name, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a Name, &'a V)> + 'a {
    map.range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

impl Kv {
    pub fn get(&self, key: &str) -> Option<&Arc<KvEntry>> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries whose key starts with `prefix`, sorted by key.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Arc<KvEntry>> + 'a {
        range(&self.entries, prefix).map(|(_, e)| e)
    }

    /// Tombstones (key, index of its deletion), for the stores.
    pub fn tombstones(&self) -> impl Iterator<Item = (&Name, u64)> {
        self.tombstones.iter().map(|(k, i)| (k, *i))
    }

    /// A key's index: its last change, or its deletion; else the table's.
    pub fn key_index(&self, key: &str) -> u64 {
        self.entries
            .get(key)
            .map(|e| e.modify_index)
            .or_else(|| self.tombstones.get(key).copied())
            .unwrap_or(self.index)
    }

    /// A prefix's index: the newest change or deletion under it; the
    /// table's when there is none (and for the empty prefix).
    pub fn prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.index;
        }
        let entries = range(&self.entries, prefix).map(|(_, e)| e.modify_index);
        let deleted = range(&self.tombstones, prefix).map(|(_, i)| *i);
        match entries.chain(deleted).max() {
            Some(0) | None => self.index,
            Some(index) => index.max(self.reaped),
        }
    }

    /// The keys `session` holds.
    pub fn held_by(&self, session: &str) -> Vec<Name> {
        self.held
            .get(session)
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn unhold(&mut self, session: &str, key: &str) {
        if let Some(keys) = self.held.get_mut(session) {
            keys.remove(key);
            if keys.is_empty() {
                self.held.remove(session);
            }
        }
    }

    /// The writer's: stores an entry (its tombstone, if any, goes).
    pub fn insert(&mut self, entry: Arc<KvEntry>, idx: u64) {
        let key: Name = entry.key.as_str().into();
        self.tombstones.remove(&key);
        if !entry.session.is_empty() {
            self.held
                .entry(entry.session.as_str().into())
                .or_default()
                .insert(key.clone(), ());
        }
        if let Some(old) = self.entries.insert(key, entry.clone()) {
            if !old.session.is_empty() && old.session != entry.session {
                self.unhold(&old.session, &old.key);
            }
        }
        self.index = self.index.max(idx);
    }

    /// The writer's: deletes a key at `idx`, leaving a tombstone.
    pub fn remove(&mut self, key: &str, idx: u64) -> Option<Arc<KvEntry>> {
        let old = self.entries.remove(key)?;
        if !old.session.is_empty() {
            self.unhold(&old.session, key);
        }
        self.tombstones.insert(key.into(), idx);
        self.index = self.index.max(idx);
        Some(old)
    }

    /// Until when (Unix ms) `key` may not be locked; 0: it may.
    pub fn delayed_until(&self, key: &str) -> u64 {
        self.delays.get(key).copied().unwrap_or(0)
    }

    /// The writer's: `key` may not be locked before `until_ms` (delays
    /// that are over are dropped here).
    pub fn delay(&mut self, key: &str, until_ms: u64, now_ms: u64) {
        let over: Vec<Name> = self
            .delays
            .iter()
            .filter(|(_, until)| **until <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in over {
            self.delays.remove(&key);
        }
        if until_ms > now_ms {
            self.delays.insert(key.into(), until_ms);
        }
    }

    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Where to reap when there are more than `max` tombstones: the
    /// deletion index up to which they go, leaving at most the newest
    /// `max / 2` (fewer when deletions share an index).
    pub fn reap_point(&self, max: usize) -> Option<u64> {
        if self.tombstones.len() <= max {
            return None;
        }
        let mut indexes: Vec<u64> = self.tombstones.values().copied().collect();
        indexes.sort_unstable();
        indexes.get(indexes.len() - max / 2 - 1).copied()
    }

    /// The writer's: drops the tombstones of deletions up to `through`;
    /// returns their keys.
    pub fn reap(&mut self, through: u64) -> Vec<Name> {
        let old: Vec<(Name, u64)> = self
            .tombstones
            .iter()
            .filter(|(_, i)| **i <= through)
            .map(|(k, i)| (k.clone(), *i))
            .collect();
        for (key, index) in &old {
            self.tombstones.remove(key);
            self.reaped = self.reaped.max(*index);
        }
        old.into_iter().map(|(k, _)| k).collect()
    }

    /// The writer's: a tombstone another agent reaped.
    pub fn unbury(&mut self, key: &str) {
        self.tombstones.remove(key);
    }

    /// The writer's: a tombstone read back from a store.
    pub fn bury(&mut self, key: &str, idx: u64) {
        if !self.entries.contains_key(key) {
            self.tombstones.insert(key.into(), idx);
        }
        self.index = self.index.max(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, index: u64) -> Arc<KvEntry> {
        Arc::new(KvEntry {
            key: key.to_string(),
            value: b"x".to_vec(),
            create_index: index,
            modify_index: index,
            ..KvEntry::default()
        })
    }

    #[test]
    fn a_prefix_index_remembers_deletions_under_it_only() {
        let mut kv = Kv::default();
        kv.insert(entry("web/a", 3), 3);
        kv.insert(entry("web/b", 5), 5);
        kv.insert(entry("db/a", 7), 7);
        assert_eq!(kv.prefix_index("web/"), 5);
        assert_eq!(kv.under("web/").count(), 2);
        kv.remove("web/b", 9);
        assert_eq!(kv.prefix_index("web/"), 9, "a deletion moves it");
        assert_eq!(kv.prefix_index("db/"), 7, "not another prefix's");
        assert_eq!(kv.prefix_index("nope/"), 9, "none under it: the table's");
        assert_eq!(kv.key_index("web/b"), 9);
        kv.insert(entry("web/b", 11), 11);
        assert_eq!(kv.tombstones().count(), 0);
    }

    #[test]
    fn a_sessions_keys_are_found_without_reading_every_key() {
        let mut kv = Kv::default();
        let locked = |key: &str, session: &str| {
            Arc::new(KvEntry {
                key: key.to_string(),
                session: session.to_string(),
                ..KvEntry::default()
            })
        };
        kv.insert(locked("a", "s1"), 1);
        kv.insert(locked("b", "s1"), 2);
        kv.insert(locked("c", "s2"), 3);
        assert_eq!(kv.held_by("s1").len(), 2);
        kv.insert(locked("a", ""), 4);
        kv.remove("b", 5);
        assert!(kv.held_by("s1").is_empty(), "released and deleted");
        kv.insert(locked("c", "s3"), 6);
        assert!(kv.held_by("s2").is_empty());
        assert_eq!(kv.held_by("s3").len(), 1);
    }

    #[test]
    fn reaping_keeps_the_newest_tombstones_and_never_takes_an_index_back() {
        let mut kv = Kv::default();
        for i in 1..=10u64 {
            kv.insert(entry(&format!("p{i}/k"), i), i);
        }
        kv.insert(entry("p9/live", 11), 11);
        for i in 1..=10u64 {
            kv.remove(&format!("p{i}/k"), 20 + i);
        }
        assert_eq!(kv.reap_point(20), None);
        let through = kv.reap_point(6).expect("over");
        assert_eq!(through, 27, "the newest three stay");
        let p9 = kv.prefix_index("p9/");
        let p2 = kv.prefix_index("p2/");
        let reaped = kv.reap(through);
        assert_eq!(reaped.len(), 7);
        assert_eq!(kv.tombstone_count(), 3);
        assert!(
            kv.prefix_index("p2/") >= p2,
            "a reaped prefix falls to the table"
        );
        assert_eq!(kv.prefix_index("p9/"), p9, "a kept one stays");
        kv.remove("p9/live", 40);
        kv.insert(entry("p1/new", 41), 41);
        assert_eq!(kv.prefix_index("p1/"), 41);
        assert_eq!(kv.reaped, 27);
    }

    #[test]
    fn values_are_stored_as_base64() {
        let e = KvEntry {
            key: "k".into(),
            value: vec![0, 255, 1],
            ..KvEntry::default()
        };
        let text = serde_json::to_string(&e).expect("json");
        assert!(text.contains("\"AP8B\""), "{text}");
        assert_eq!(serde_json::from_str::<KvEntry>(&text).expect("back"), e);
    }
}
