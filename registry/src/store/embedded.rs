//! The embedded store: one redb file in the data directory.
//!
//! Records are JSON values in four tables keyed by name or `node\0id`. Each
//! writer batch is one redb write transaction with immediate durability (fsync),
//! run on the blocking pool so the writer task never blocks a runtime thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Committed, KvChange, Loaded, Store, StoreBatch};
use crate::error::StoreError;

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const CHECKS: TableDefinition<&str, &[u8]> = TableDefinition::new("checks");
const QUERIES: TableDefinition<&str, &[u8]> = TableDefinition::new("queries");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const KV_TOMBSTONES: TableDefinition<&str, u64> = TableDefinition::new("kv_tombstones");
const SERVICE_INDEX: TableDefinition<&str, u64> = TableDefinition::new("service_index");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INDEX_KEY: &str = "index";
const KV_REAPED_KEY: &str = "kv_reaped";

/// File name of the catalog inside the data directory.
pub const CATALOG_FILE: &str = "catalog.redb";

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

fn io(err: impl std::fmt::Display) -> StoreError {
    StoreError::Io(err.to_string())
}

fn pair_key(node: &str, id: &str) -> String {
    let mut key = String::with_capacity(node.len() + id.len() + 1);
    key.push_str(node);
    key.push('\0');
    key.push_str(id);
    key
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.replace('\0', "/"),
        message: e.to_string(),
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the catalog in `data_dir`. Fails if another process
    /// holds it open: the file has a single owner at a time.
    pub fn open(data_dir: &Path, cache_bytes: usize) -> Result<EmbeddedStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: data_dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| open_err(e.to_string()))?;
        let path = data_dir.join(CATALOG_FILE);
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| open_err(e.to_string()))?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn load_table<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let table = match txn.open_table(table) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(io)? {
        let (key, value) = row.map_err(io)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

/// Everything in a catalog file (the embedded store's, or cluster mode's
/// local copy, which has the same tables).
pub(super) fn load_db(db: &Database) -> Result<Loaded, StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let mut loaded = Loaded {
        nodes: load_table(&txn, NODES)?,
        endpoints: load_table(&txn, ENDPOINTS)?,
        checks: load_table(&txn, CHECKS)?,
        queries: load_table(&txn, QUERIES)?,
        kv: load_table(&txn, KV)?,
        sessions: load_table(&txn, SESSIONS)?,
        ..Loaded::default()
    };
    match txn.open_table(KV_TOMBSTONES) {
        Ok(table) => {
            for row in table.iter().map_err(io)? {
                let (key, value) = row.map_err(io)?;
                loaded
                    .kv_tombstones
                    .push((key.value().to_string(), value.value()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io(e)),
    }
    match txn.open_table(SERVICE_INDEX) {
        Ok(table) => {
            for row in table.iter().map_err(io)? {
                let (key, value) = row.map_err(io)?;
                loaded
                    .service_index
                    .push((key.value().to_string(), value.value()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io(e)),
    }
    loaded.index = meta(&txn, INDEX_KEY)?.unwrap_or(0);
    loaded.kv_reaped = meta(&txn, KV_REAPED_KEY)?.unwrap_or(0);
    Ok(loaded)
}

/// A value of the `meta` table.
pub(super) fn meta(txn: &redb::ReadTransaction, key: &str) -> Result<Option<u64>, StoreError> {
    match txn.open_table(META) {
        Ok(table) => Ok(table.get(key).map_err(io)?.map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// Replaces everything in a catalog file with `loaded`, and sets the meta
/// values `extra`, in one transaction.
pub(super) fn replace_blocking(
    db: &Database,
    loaded: &Loaded,
    extra: &[(&str, u64)],
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io)?;
    {
        for table in [NODES, ENDPOINTS, CHECKS, QUERIES, KV, SESSIONS] {
            txn.delete_table(table).map_err(io)?;
        }
        txn.delete_table(SERVICE_INDEX).map_err(io)?;
        txn.delete_table(KV_TOMBSTONES).map_err(io)?;
        let mut kv = txn.open_table(KV).map_err(io)?;
        for entry in &loaded.kv {
            kv.insert(entry.key.as_str(), encode(entry)?.as_slice())
                .map_err(io)?;
        }
        let mut sessions = txn.open_table(SESSIONS).map_err(io)?;
        for session in &loaded.sessions {
            sessions
                .insert(session.id.as_str(), encode(session)?.as_slice())
                .map_err(io)?;
        }
        let mut tombstones = txn.open_table(KV_TOMBSTONES).map_err(io)?;
        for (key, index) in &loaded.kv_tombstones {
            tombstones.insert(key.as_str(), *index).map_err(io)?;
        }
        let mut nodes = txn.open_table(NODES).map_err(io)?;
        for node in &loaded.nodes {
            nodes
                .insert(&*node.name, encode(node)?.as_slice())
                .map_err(io)?;
        }
        let mut endpoints = txn.open_table(ENDPOINTS).map_err(io)?;
        for endpoint in &loaded.endpoints {
            let key = pair_key(&endpoint.node, &endpoint.id);
            endpoints
                .insert(key.as_str(), encode(endpoint)?.as_slice())
                .map_err(io)?;
        }
        let mut checks = txn.open_table(CHECKS).map_err(io)?;
        for check in &loaded.checks {
            let key = pair_key(&check.node, &check.id);
            checks
                .insert(key.as_str(), encode(check)?.as_slice())
                .map_err(io)?;
        }
        let mut queries = txn.open_table(QUERIES).map_err(io)?;
        for query in &loaded.queries {
            queries
                .insert(query.id.as_str(), encode(query)?.as_slice())
                .map_err(io)?;
        }
        let mut service_index = txn.open_table(SERVICE_INDEX).map_err(io)?;
        for (name, index) in &loaded.service_index {
            service_index.insert(name.as_str(), *index).map_err(io)?;
        }
        let mut meta = txn.open_table(META).map_err(io)?;
        meta.insert(INDEX_KEY, loaded.index).map_err(io)?;
        meta.insert(KV_REAPED_KEY, loaded.kv_reaped).map_err(io)?;
        for (key, value) in extra {
            meta.insert(*key, *value).map_err(io)?;
        }
    }
    txn.commit().map_err(io)
}

fn commit_blocking(db: &Database, batch: &StoreBatch) -> Result<(), StoreError> {
    commit_with(db, batch, &[])
}

/// Commits `batch`, and sets the meta values `extra` in the same transaction.
pub(super) fn commit_with(
    db: &Database,
    batch: &StoreBatch,
    extra: &[(&str, u64)],
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io)?;
    {
        let mut nodes = txn.open_table(NODES).map_err(io)?;
        for (name, node) in &batch.nodes {
            match node {
                Some(node) => nodes.insert(&**name, encode(&**node)?.as_slice()),
                None => nodes.remove(&**name),
            }
            .map_err(io)?;
        }
        let mut endpoints = txn.open_table(ENDPOINTS).map_err(io)?;
        for ((node, id), endpoint) in &batch.endpoints {
            let key = pair_key(node, id);
            match endpoint {
                Some(endpoint) => endpoints.insert(key.as_str(), encode(&**endpoint)?.as_slice()),
                None => endpoints.remove(key.as_str()),
            }
            .map_err(io)?;
        }
        let mut checks = txn.open_table(CHECKS).map_err(io)?;
        for ((node, id), check) in &batch.checks {
            let key = pair_key(node, id);
            match check {
                Some(check) => checks.insert(key.as_str(), encode(&**check)?.as_slice()),
                None => checks.remove(key.as_str()),
            }
            .map_err(io)?;
        }
        if !batch.kv_reaped.is_empty() {
            let mut tombstones = txn.open_table(KV_TOMBSTONES).map_err(io)?;
            for key in &batch.kv_reaped {
                tombstones.remove(&**key).map_err(io)?;
            }
        }
        if !batch.sessions.is_empty() {
            let mut sessions = txn.open_table(SESSIONS).map_err(io)?;
            for (id, session) in &batch.sessions {
                match session {
                    Some(session) => sessions.insert(&**id, encode(&**session)?.as_slice()),
                    None => sessions.remove(&**id),
                }
                .map_err(io)?;
            }
        }
        if !batch.kv.is_empty() {
            let mut kv = txn.open_table(KV).map_err(io)?;
            let mut tombstones = txn.open_table(KV_TOMBSTONES).map_err(io)?;
            for (key, change) in &batch.kv {
                match change {
                    KvChange::Set(entry) => {
                        kv.insert(&**key, encode(&**entry)?.as_slice())
                            .map_err(io)?;
                        tombstones.remove(&**key).map_err(io)?;
                    }
                    KvChange::Deleted(index) => {
                        kv.remove(&**key).map_err(io)?;
                        tombstones.insert(&**key, *index).map_err(io)?;
                    }
                }
            }
        }
        if !batch.queries.is_empty() {
            let mut queries = txn.open_table(QUERIES).map_err(io)?;
            for (id, query) in &batch.queries {
                match query {
                    Some(query) => queries.insert(&**id, encode(&**query)?.as_slice()),
                    None => queries.remove(&**id),
                }
                .map_err(io)?;
            }
        }
        let mut service_index = txn.open_table(SERVICE_INDEX).map_err(io)?;
        for (name, index) in &batch.service_index {
            service_index.insert(&**name, *index).map_err(io)?;
        }
        let mut meta = txn.open_table(META).map_err(io)?;
        meta.insert(INDEX_KEY, batch.index).map_err(io)?;
        if let Some(floor) = batch.kv_floor {
            meta.insert(KV_REAPED_KEY, floor).map_err(io)?;
        }
        for (key, value) in extra {
            meta.insert(*key, *value).map_err(io)?;
        }
    }
    txn.commit().map_err(io)
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn load(&mut self) -> Result<Loaded, StoreError> {
        load_db(&self.db)
    }

    async fn commit(&mut self, batch: StoreBatch) -> Result<Committed, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || commit_blocking(&db, &batch))
            .await
            .map_err(io)??;
        Ok(Committed::Local)
    }
}
