//! Cluster mode's local copy of the shared catalog: a catalog file in the
//! agent's data directory (the embedded store's tables), kept by a task of
//! its own from what the etcd watch passes on (never on a request's path),
//! so that an agent started while etcd is down serves DNS, the proxy and
//! reads from it at once, marked stale with its age.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase};
use tokio::sync::mpsc;

use super::embedded::{commit_with, load_db, meta, replace_blocking};
use super::{KvChange, Loaded, Record, StoreBatch, StoreStatus};
use crate::error::StoreError;
use crate::model::unix_ms;

/// File name of the copy inside the data directory.
pub(super) const COPY_FILE: &str = "etcd-copy.redb";
/// Meta key: when the copy was last written (ms since the epoch).
const WRITTEN: &str = "written_ms";

/// What the copy is told.
pub(super) enum Update {
    /// The whole catalog (read at connect or after a compaction).
    Reset(Box<Loaded>),
    /// The records one revision changed.
    Records(u64, Vec<Record>),
}

pub(super) struct LocalCopy {
    db: Arc<Database>,
}

fn io(err: impl std::fmt::Display) -> StoreError {
    StoreError::Io(err.to_string())
}

impl LocalCopy {
    /// Opens (or creates) the copy in `dir`.
    pub(super) fn open(dir: &Path) -> Result<LocalCopy, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: dir.join(COPY_FILE).display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::builder()
            .create(dir.join(COPY_FILE))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(LocalCopy { db: Arc::new(db) })
    }

    /// The copy and when it was written (ms since the epoch), if ever.
    pub(super) fn read(&self) -> Result<Option<(Loaded, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        match meta(&txn, WRITTEN)? {
            None => Ok(None),
            Some(written) => Ok(Some((load_db(&self.db)?, written))),
        }
    }
}

/// Starts the task that keeps the copy in `dir` (`open`: already opened):
/// updates queued while one is written go together in the next
/// transaction. A file another process still holds (the predecessor of an
/// upgrade) is opened again each second; until then updates wait, from the
/// last whole catalog on.
pub(super) fn keep(
    dir: PathBuf,
    open: Option<LocalCopy>,
    status: Arc<StoreStatus>,
) -> mpsc::UnboundedSender<Update> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Update>();
    tokio::spawn(async move {
        let mut copy = open;
        let mut waiting: Vec<Update> = Vec::new();
        while let Some(first) = rx.recv().await {
            waiting.push(first);
            while let Ok(more) = rx.try_recv() {
                waiting.push(more);
            }
            if let Some(last) = waiting.iter().rposition(|u| matches!(u, Update::Reset(_))) {
                waiting.drain(..last);
            }
            if copy.is_none() {
                match LocalCopy::open(&dir) {
                    Ok(opened) => copy = Some(opened),
                    Err(err) => {
                        tracing::debug!(%err, "the local copy of the catalog is not open yet");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some(db) = copy.as_ref().map(|c| c.db.clone()) else {
                continue;
            };
            let updates = std::mem::take(&mut waiting);
            match tokio::task::spawn_blocking(move || write(&db, updates)).await {
                Ok(Ok((index, written))) => status.copied(index, written),
                Ok(Err(err)) => tracing::warn!(%err, "cannot write the local copy of the catalog"),
                Err(err) => tracing::warn!(%err, "cannot write the local copy of the catalog"),
            }
        }
    });
    tx
}

/// Applies `updates` in order, from the last whole catalog among them on;
/// returns the index the copy holds then, and when it was written.
fn write(db: &Database, mut updates: Vec<Update>) -> Result<(u64, u64), StoreError> {
    let written = unix_ms();
    let mut index = 0;
    if let Some(last) = updates.iter().rposition(|u| matches!(u, Update::Reset(_))) {
        let rest = updates.split_off(last + 1);
        if let Some(Update::Reset(loaded)) = updates.pop() {
            replace_blocking(db, &loaded, &[(WRITTEN, written)])?;
            index = loaded.index;
        }
        updates = rest;
    }
    if updates.is_empty() {
        return Ok((index, written));
    }
    let mut batch = StoreBatch::default();
    for update in updates {
        let Update::Records(revision, records) = update else {
            continue;
        };
        batch.index = batch.index.max(revision);
        for record in records {
            match record {
                Record::Node(name, node) => batch.nodes.push((name, node.map(Arc::from))),
                Record::Endpoint(key, endpoint) => {
                    batch.endpoints.push((key, endpoint.map(Arc::from)))
                }
                Record::Check(key, check) => batch.checks.push((key, check.map(Arc::from))),
                Record::Query(id, query) => batch.queries.push((id, query.map(Arc::from))),
                Record::Kv(key, Some(entry)) => {
                    batch.kv.push((key, KvChange::Set(Arc::from(entry))))
                }
                Record::Kv(key, None) | Record::KvTombstone(key) => {
                    batch.kv.push((key, KvChange::Deleted(revision)))
                }
                Record::Session(id, session) => batch.sessions.push((id, session.map(Arc::from))),
                Record::SessionRenewed(_) => {}
                Record::KvUnbury(key) => batch.kv_reaped.push(key),
                Record::KvReaped(floor) => batch.kv_floor = Some(floor),
                Record::Ttl(..) | Record::Index { .. } => {}
            }
        }
    }
    // A later whole catalog is at a revision no lower than the records'.
    batch.index = batch.index.max(index);
    commit_with(db, &batch, &[(WRITTEN, written)])?;
    Ok((batch.index, written))
}
