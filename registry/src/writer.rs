//! The single writer: applies commands in order, commits them to the store in
//! groups, publishes the next snapshot and only then acknowledges.
//!
//! Group commit: while a commit is in flight, new commands queue in the channel;
//! the next turn takes all of them (up to `MAX_GROUP`) into one store batch, so
//! many small registrations share one fsync.
//!
//! Two kinds of store:
//! - A local one (embedded redb, memory): the batch is committed
//!   (`Committed::Local`), then the writer publishes the snapshot it built and
//!   acknowledges.
//! - A shared one (etcd, many agents): the batch carries the revision this
//!   catalog reflects (`seen`) and commits only if no other agent wrote the
//!   same keys since. On success (`Committed::Shared`) the writer drops its own
//!   copy of the change and waits (`catch_up`, up to `CATCH_UP`) until the
//!   store's feed has brought it back at its revision, so every agent applies
//!   every change the same way, from the feed, and publishes it at the same
//!   index. On a conflict it catches up with the other agents' writes and
//!   applies the commands again, up to `MAX_ATTEMPTS` times. Between
//!   commands, the feed's changes (other agents' writes, lease expiries) are
//!   applied as they come (`catalog/replica.rs`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::catalog::{Catalog, Command, Dirty, NewCheck};
use crate::error::{RegistryError, StoreError};
use crate::metrics::RegistryMetrics;
use crate::model::{Name, Status};
use crate::snapshot::Snapshot;
use crate::store::{Change, Committed, Record, Store, StoreStatus};
use crate::watch::{WatchKey, Watchers};
use crate::Decorators;

/// Most commands folded into one store commit.
const MAX_GROUP: usize = 4096;
/// Queue depth in front of the writer; senders wait when it is full.
const QUEUE: usize = 8192;
/// Tries of one group against a shared store that other agents write to.
const MAX_ATTEMPTS: usize = 16;
/// Longest wait for the feed to show a committed write before acknowledging it.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

type Reply = oneshot::Sender<Result<u64, RegistryError>>;

enum Request {
    Apply {
        command: Box<Command>,
        reply: Reply,
        received: Instant,
    },
    Shutdown(oneshot::Sender<()>),
}

/// Handle to the registry: submit commands, read snapshots, watch the index.
/// Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Request>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    index: watch::Receiver<u64>,
    metrics: Arc<RegistryMetrics>,
    store_kind: &'static str,
    store_status: Arc<StoreStatus>,
    shared: bool,
    watchers: Arc<Watchers>,
    check_events: CheckEvents,
}

/// Where the writer reports changed checks, when a health checker listens.
type CheckEvents = Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<Vec<(Name, Name)>>>>>;

/// The data plane's passive reports become check registrations and
/// deregistrations, applied (durably) like any other write.
impl switchyard_catalog::HealthReports for Registry {
    fn report(&self, check: crate::model::Check) -> switchyard_catalog::Reported<'_> {
        Box::pin(async move {
            let command = Command::RegisterCheck {
                check: NewCheck {
                    check,
                    status_given: true,
                },
            };
            self.apply(command)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn withdraw(&self, node: Name, id: Name) -> switchyard_catalog::Reported<'_> {
        Box::pin(async move {
            let command = Command::DeregisterCheck { node, id };
            self.apply(command)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

impl Registry {
    /// Loads the catalog from `store`, publishes the first snapshot and starts
    /// the writer task on the current runtime.
    pub fn start<S: Store>(
        store: S,
        metrics: Arc<RegistryMetrics>,
    ) -> Result<(Registry, JoinHandle<()>), StoreError> {
        Registry::start_with(store, metrics, Decorators::default())
    }

    /// Like `start`, with decorators that derive reader data from every view
    /// the writer builds (DNS answers, for instance).
    pub fn start_with<S: Store>(
        mut store: S,
        metrics: Arc<RegistryMetrics>,
        decorators: Decorators,
    ) -> Result<(Registry, JoinHandle<()>), StoreError> {
        let loaded = store.load()?;
        let catalog = Catalog::from_loaded(loaded, decorators);
        let first = catalog.snap.clone();
        metrics.observe_snapshot(&first);
        let index = first.index;
        let snapshot = Arc::new(ArcSwap::from_pointee(first));
        let (index_tx, index_rx) = watch::channel(index);
        let (tx, rx) = mpsc::channel(QUEUE);
        let store_kind = store.kind();
        let store_status = store.status();
        let shared = store.shared();
        let feed = store.feed();
        let watchers = Arc::new(Watchers::default());
        let check_events = CheckEvents::default();
        let mut writer = Writer {
            store,
            catalog,
            rx,
            snapshot: snapshot.clone(),
            index_tx,
            metrics: metrics.clone(),
            timers: Timers::default(),
            watchers: watchers.clone(),
            check_events: check_events.clone(),
            feed,
            feed_revision: store_status.revision(),
            status: store_status.clone(),
        };
        writer.arm_loaded_timers();
        let handle = tokio::spawn(writer.run());
        let registry = Registry {
            inner: Arc::new(Inner {
                tx,
                snapshot,
                index: index_rx,
                metrics,
                store_kind,
                store_status,
                shared,
                watchers,
                check_events,
            }),
        };
        Ok((registry, handle))
    }

    /// Applies a command; returns once it is durable and visible in the
    /// snapshot, with the catalog index at that point.
    pub async fn apply(&self, command: Command) -> Result<u64, RegistryError> {
        let (reply, rx) = oneshot::channel();
        let request = Request::Apply {
            command: Box::new(command),
            reply,
            received: Instant::now(),
        };
        self.inner
            .tx
            .send(request)
            .await
            .map_err(|_| RegistryError::ShuttingDown)?;
        rx.await.map_err(|_| RegistryError::ShuttingDown)?
    }

    /// The current snapshot. Lock-free; hold it for one unit of work.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// The shared cell readers load from (DNS and proxy keep a clone of it).
    pub fn snapshot_cell(&self) -> Arc<ArcSwap<Snapshot>> {
        self.inner.snapshot.clone()
    }

    /// A receiver that changes whenever a new snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.index.clone()
    }

    /// The keys of checks changed by each publish, from now on, for one
    /// listener (the health checker). A new call replaces the previous listener;
    /// when the receiver is dropped the writer stops sending.
    pub fn check_changes(&self) -> mpsc::UnboundedReceiver<Vec<(Name, Name)>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self
            .inner
            .check_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    /// A `Notify` woken after every publish that touched this service or node
    /// (and by no other). Enable a `notified()` future before reading the
    /// snapshot, then await it, so that no publish is missed in between.
    pub fn watch_key(&self, key: WatchKey<'_>) -> Arc<tokio::sync::Notify> {
        self.inner.watchers.get(key)
    }

    pub fn metrics(&self) -> &Arc<RegistryMetrics> {
        &self.inner.metrics
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store_kind
    }

    /// How current this agent's copy of the catalog is (always current with
    /// a local store).
    pub fn store_status(&self) -> &Arc<StoreStatus> {
        &self.inner.store_status
    }

    /// Whether other agents share this catalog (the etcd store).
    pub fn shared(&self) -> bool {
        self.inner.shared
    }

    /// Asks the writer to finish what is queued before this call and stop.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.inner.tx.send(Request::Shutdown(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer<S> {
    store: S,
    catalog: Catalog,
    rx: mpsc::Receiver<Request>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    index_tx: watch::Sender<u64>,
    metrics: Arc<RegistryMetrics>,
    timers: Timers,
    watchers: Arc<Watchers>,
    check_events: CheckEvents,
    /// Changes from a shared store (every agent's commits, ours included).
    feed: Option<mpsc::Receiver<Change>>,
    /// The store revision the catalog reflects.
    feed_revision: u64,
    /// Store connection and membership (who owns which check's clocks).
    status: Arc<StoreStatus>,
}

impl<S: Store> Writer<S> {
    async fn run(mut self) {
        loop {
            let next = self.timers.next_deadline();
            let first = tokio::select! {
                change = recv_feed(&mut self.feed), if self.feed.is_some() => {
                    match change {
                        Some(change) => {
                            self.apply_change(change);
                            self.maybe_reap().await;
                        }
                        None => {
                            tracing::error!("the store's feed stopped; this agent no longer sees other agents' writes");
                            self.feed = None;
                        }
                    }
                    continue;
                }
                request = self.rx.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
                () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let now = Instant::now();
                    let mut due = self.timers.due(now, &self.catalog);
                    // With a shared store, only a check's owner acts on its
                    // clocks; the others look again shortly, in case the owner
                    // is gone by then.
                    due.retain(|command| {
                        let (kind, node, id) = match command {
                            Command::ExpireTtl { node, id } => (TimerKind::Ttl, node, id),
                            Command::ReapCritical { node, check } => (TimerKind::Reap, node, check),
                            Command::SessionExpire { id } => {
                                // The owner of the session's node ends it.
                                let node: Name = self
                                    .catalog
                                    .snap
                                    .sessions
                                    .get(id)
                                    .map_or_else(|| Name::from(""), |s| s.node.as_str().into());
                                let owned = self.status.owns(&node, id);
                                if !owned {
                                    self.timers.defer(
                                        TimerKind::Session,
                                        (id.clone(), Name::from("")),
                                        now,
                                        &self.catalog,
                                    );
                                }
                                return owned;
                            }
                            _ => return true,
                        };
                        let owned = self.status.owns(node, id);
                        if !owned {
                            self.timers
                                .defer(kind, (node.clone(), id.clone()), now, &self.catalog);
                        }
                        owned
                    });
                    if !due.is_empty() {
                        let work = due.into_iter().map(|c| (c, None, Instant::now())).collect();
                        self.process(work).await;
                        self.maybe_reap().await;
                    }
                    continue;
                }
            };
            let mut work = Vec::new();
            let mut shutdown = None;
            let mut next_request = Some(first);
            while let Some(request) = next_request.take() {
                match request {
                    Request::Apply {
                        command,
                        reply,
                        received,
                    } => work.push((*command, Some(reply), received)),
                    Request::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if work.len() < MAX_GROUP {
                    next_request = self.rx.try_recv().ok();
                }
            }
            if !work.is_empty() {
                self.process(work).await;
                self.maybe_reap().await;
            }
            if let Some(done) = shutdown {
                self.rx.close();
                while let Ok(request) = self.rx.try_recv() {
                    match request {
                        Request::Apply { reply, .. } => {
                            let _ = reply.send(Err(RegistryError::ShuttingDown));
                        }
                        Request::Shutdown(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                tracing::info!(index = self.catalog.index(), "registry writer stopped");
                let _ = done.send(());
                return;
            }
        }
    }

    /// Past `MAX_TOMBSTONES` KV tombstones, the oldest go (down to half),
    /// in one write of their own; with a shared store, by the one agent
    /// that owns the reaping (as a check has one owner), so every agent
    /// sees the same tombstones.
    async fn maybe_reap(&mut self) {
        use switchyard_catalog::kv::MAX_TOMBSTONES;
        let kv = &self.catalog.snap.kv;
        if kv.tombstone_count() <= MAX_TOMBSTONES
            || (self.store.shared() && !self.status.owns("", "kv-tombstones"))
        {
            return;
        }
        let Some(through) = kv.reap_point(MAX_TOMBSTONES) else {
            return;
        };
        tracing::debug!(through, "reaping KV tombstones");
        self.process(vec![(Command::KvReap { through }, None, Instant::now())])
            .await;
    }

    async fn process(&mut self, work: Vec<(Command, Option<Reply>, Instant)>) {
        let shared = self.store.shared();
        let (mut commands, meta): (Vec<Command>, Vec<(Option<Reply>, Instant)>) = work
            .into_iter()
            .map(|(command, reply, received)| (command, (reply, received)))
            .unzip();
        let mut results = Vec::with_capacity(commands.len());
        let mut attempt = 0;
        loop {
            let before = self.catalog.snap.clone();
            results.clear();
            let mut refresh = Vec::new();
            // A shared store may refuse the group (another agent wrote first):
            // keep the commands to apply them again.
            let group = match shared {
                true => commands.clone(),
                false => std::mem::take(&mut commands),
            };
            let mut expiries = Vec::new();
            let mut sessions_renewed: Vec<Name> = Vec::new();
            for command in group {
                let kind = command.kind();
                let session_key = match &command {
                    Command::SessionCreate(s) => Some(Name::from(s.id.as_str())),
                    Command::SessionRenew { id } => Some(id.clone()),
                    _ => None,
                };
                if let Command::ExpireTtl { node, id } = &command {
                    let key = (node.clone(), id.clone());
                    // The timer that made this command is gone from the map;
                    // a clock there again was restarted since, by a renewal
                    // another agent committed first (seen on a retry).
                    if self.timers.ttl.contains_key(&key) {
                        results.push((kind, Ok(())));
                        continue;
                    }
                    expiries.push(key);
                }
                if let Command::SessionExpire { id } = &command {
                    // Renewed since the timer fired.
                    if self.timers.sessions.contains_key(id) {
                        results.push((kind, Ok(())));
                        continue;
                    }
                    tracing::info!(session = %id, "session ended: its TTL ran out");
                }
                let ttl_keys = ttl_keys(&command);
                let saved = self.catalog.snap.clone();
                let mark = self.catalog.dirty.mark();
                let result = match self.catalog.apply(command) {
                    Ok(_) => {
                        refresh.extend(ttl_keys);
                        sessions_renewed.extend(session_key);
                        Ok(())
                    }
                    Err(err) => {
                        self.catalog.snap = saved;
                        self.catalog.dirty.rollback(mark);
                        Err(err)
                    }
                };
                results.push((kind, result));
            }
            let renewals: Vec<((Name, Name), std::time::Duration)> = match shared {
                true => refresh
                    .iter()
                    .filter_map(|key| {
                        let ttl = self.catalog.get_check(&key.0, &key.1)?.ttl()?;
                        Some((key.clone(), ttl))
                    })
                    .collect(),
                false => Vec::new(),
            };
            // A shared store records renewals, so every agent restarts the
            // session's clock; a local one has nothing to record.
            let session_renewals = match shared {
                true => sessions_renewed.clone(),
                false => Vec::new(),
            };
            if !self.catalog.dirty.is_empty()
                || !renewals.is_empty()
                || !session_renewals.is_empty()
            {
                let mut batch = self.catalog.store_batch();
                batch.base = before.index;
                batch.ttl_renewals = renewals;
                batch.session_renewals = session_renewals;
                if shared {
                    batch.ttl_expiries = expiries;
                    batch.seen = self.feed_revision;
                }
                self.metrics.commit_records.observe(batch.len() as f64);
                self.metrics.commit_commands.observe(results.len() as f64);
                let started = Instant::now();
                let committed = if batch.is_empty()
                    && batch.ttl_renewals.is_empty()
                    && batch.session_renewals.is_empty()
                {
                    // Views to rebuild and nothing to store (a reload's
                    // `Redecorate`): this agent's own business.
                    Ok(Committed::Local)
                } else {
                    self.store.commit(batch).await
                };
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                match committed {
                    Ok(Committed::Local) => {
                        self.publish_dirty();
                        for ((_, result), (_, received)) in results.iter().zip(&meta) {
                            if result.is_ok() {
                                self.metrics
                                    .propagation_seconds
                                    .observe(received.elapsed().as_secs_f64());
                            }
                        }
                    }
                    Ok(Committed::Shared { revision }) => {
                        // The change comes back through the feed with the
                        // store's revisions; this copy of it is dropped.
                        self.catalog.snap = before;
                        self.catalog.dirty = Dirty::default();
                        refresh.clear();
                        self.catch_up(revision).await;
                    }
                    Ok(Committed::Conflict { revision }) => {
                        self.catalog.snap = before;
                        self.catalog.dirty = Dirty::default();
                        self.catch_up(revision).await;
                        attempt += 1;
                        if attempt < MAX_ATTEMPTS {
                            self.metrics.commit_conflicts.inc();
                            continue;
                        }
                        let message = format!(
                            "gave up after {MAX_ATTEMPTS} conflicting writes by other agents"
                        );
                        fail_all(&mut results, &message);
                        refresh.clear();
                    }
                    Err(err) => {
                        tracing::error!(%err, "store commit failed; the batch was not applied");
                        self.catalog.snap = before;
                        self.catalog.dirty = Dirty::default();
                        fail_all(&mut results, &err.to_string());
                        refresh.clear();
                    }
                }
            }
            let now = Instant::now();
            for key in refresh {
                self.timers.refresh_ttl(key, now, &self.catalog);
            }
            if !shared {
                for id in sessions_renewed {
                    self.timers.refresh_session(id, now, &self.catalog);
                }
            }
            break;
        }
        let index = self.catalog.index().max(1);
        for ((kind, result), (reply, received)) in results.into_iter().zip(meta) {
            match &result {
                Ok(()) => self.metrics.writes.with_label_values(&[kind]).inc(),
                Err(_) => self.metrics.write_errors.with_label_values(&[kind]).inc(),
            }
            self.metrics
                .write_seconds
                .observe(received.elapsed().as_secs_f64());
            if let Some(reply) = reply {
                let _ = reply.send(result.map(|()| index));
            }
        }
    }

    /// Publishes everything dirty: views rebuilt, snapshot swapped, watchers
    /// of the touched keys woken, timers and the health checker told of
    /// changed checks.
    fn publish_dirty(&mut self) {
        let dirty_checks: Vec<(Name, Name)> = self.catalog.dirty.checks.iter().cloned().collect();
        let dirty = &self.catalog.dirty;
        let touched_services: Vec<Name> = dirty.services.iter().cloned().collect();
        let touched_nodes: Vec<Name> = dirty.entries.union(&dirty.nodes).cloned().collect();
        let touched_queries: Vec<Name> = dirty.queries.iter().cloned().collect();
        let touched_kv: Vec<Name> = dirty.kv.iter().cloned().collect();
        let started = Instant::now();
        let snapshot = self.catalog.publish();
        self.metrics.observe_snapshot(&snapshot);
        let index = snapshot.index;
        self.snapshot.store(Arc::new(snapshot));
        self.index_tx.send_replace(index);
        self.watchers
            .notify(&touched_services, &touched_nodes, &touched_queries);
        self.watchers.notify_kv(&touched_kv);
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = Instant::now();
        for key in &dirty_checks {
            self.timers.check_changed(key.clone(), now, &self.catalog);
        }
        if !dirty_checks.is_empty() {
            let mut slot = self
                .check_events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slot
                .as_ref()
                .is_some_and(|tx| tx.send(dirty_checks).is_err())
            {
                *slot = None;
            }
        }
    }

    /// Applies what the shared store's feed yields until it has passed
    /// `revision` (a commit of ours or someone else's), or a few seconds pass:
    /// a write is committed once etcd says so, and is acknowledged even if the
    /// watch that shows it is slow to come back.
    async fn catch_up(&mut self, revision: u64) {
        let deadline = Instant::now() + CATCH_UP;
        while self.feed_revision < revision {
            let Some(feed) = self.feed.as_mut() else {
                return;
            };
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(change)) => self.apply_change(change),
                Ok(None) => {
                    self.feed = None;
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        revision,
                        seen = self.feed_revision,
                        "store feed is behind a committed write; acknowledging it anyway"
                    );
                    return;
                }
            }
        }
    }

    /// One change from the shared store's feed: applied and published.
    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Records { revision, records } => {
                self.feed_revision = self.feed_revision.max(revision);
                let written_us = records.iter().find_map(|r| match r {
                    Record::Index { written_us } => *written_us,
                    _ => None,
                });
                let renewed = self.catalog.apply_records(records, revision);
                if !self.catalog.dirty.is_empty() {
                    self.publish_dirty();
                    if let Some(written_us) = written_us {
                        let micros = crate::model::unix_us().saturating_sub(written_us);
                        self.metrics
                            .propagation_seconds
                            .observe(micros as f64 / 1e6);
                    }
                }
                let now = Instant::now();
                for key in renewed {
                    self.timers.refresh_ttl(key, now, &self.catalog);
                }
                for id in std::mem::take(&mut self.catalog.renewed_sessions) {
                    self.timers.refresh_session(id, now, &self.catalog);
                }
            }
            Change::Reset { revision, loaded } => {
                self.feed_revision = self.feed_revision.max(revision);
                let decorators = std::mem::take(&mut self.catalog.decorators);
                let old =
                    std::mem::replace(&mut self.catalog, Catalog::from_loaded(*loaded, decorators));
                self.catalog.mark_all(&old.snap);
                self.timers = Timers::default();
                self.publish_dirty();
                self.arm_loaded_timers();
            }
        }
        self.metrics
            .snapshot_revision
            .set(i64::try_from(self.feed_revision).unwrap_or(i64::MAX));
    }

    /// After a restart every TTL starts afresh and every critical check's
    /// deregister clock starts now: time spent down is not held against anyone.
    fn arm_loaded_timers(&mut self) {
        let now = Instant::now();
        let keys: Vec<(Name, Name)> = self
            .catalog
            .snap
            .checks()
            .map(|c| (c.node.clone(), c.id.clone()))
            .collect();
        for key in keys {
            self.timers.refresh_ttl(key.clone(), now, &self.catalog);
            self.timers.check_changed(key, now, &self.catalog);
        }
        let sessions: Vec<Name> = self
            .catalog
            .snap
            .sessions
            .iter()
            .map(|s| s.id.as_str().into())
            .collect();
        for id in sessions {
            self.timers.refresh_session(id, now, &self.catalog);
        }
        self.catalog.renewed_sessions.clear();
    }
}

async fn recv_feed(feed: &mut Option<mpsc::Receiver<Change>>) -> Option<Change> {
    match feed {
        Some(feed) => feed.recv().await,
        None => std::future::pending().await,
    }
}

/// Turns every successful result of a group into a store failure.
fn fail_all(results: &mut [(&'static str, Result<(), RegistryError>)], message: &str) {
    for (_, result) in results.iter_mut() {
        if result.is_ok() {
            *result = Err(RegistryError::Store(StoreError::Io(message.to_string())));
        }
    }
}

/// Checks whose TTL clock a successful command restarts.
fn ttl_keys(command: &Command) -> Vec<(Name, Name)> {
    let of = |checks: &[NewCheck]| -> Vec<(Name, Name)> {
        checks
            .iter()
            .map(|c| (c.check.node.clone(), c.check.id.clone()))
            .collect()
    };
    match command {
        Command::UpdateCheck { node, id, .. } => vec![(node.clone(), id.clone())],
        Command::RegisterService { checks, .. } => of(checks),
        Command::RegisterCheck { check } => of(std::slice::from_ref(check)),
        Command::CatalogRegister { checks, .. } => checks
            .iter()
            .map(|c| (c.node.clone(), c.id.clone()))
            .collect(),
        Command::Batch(batch) => batch
            .endpoints
            .iter()
            .flat_map(|(_, c)| of(c))
            .chain(of(&batch.node_checks))
            .collect(),
        Command::Heartbeat(beats) => beats
            .iter()
            .map(|(node, id, ..)| (node.clone(), id.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum TimerKind {
    Ttl,
    Reap,
    /// A session's TTL (key: its id and "").
    Session,
}

/// TTL deadlines and deregister-critical clocks. The heap may hold stale
/// entries; an entry fires only if it still matches the maps.
#[derive(Default)]
struct Timers {
    ttl: HashMap<(Name, Name), Instant>,
    /// Sessions' deadlines: twice their TTL after their last renewal.
    sessions: HashMap<Name, Instant>,
    critical_since: HashMap<(Name, Name), Instant>,
    heap: BinaryHeap<Reverse<(Instant, TimerKind, Name, Name)>>,
}

impl Timers {
    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    fn refresh_ttl(&mut self, key: (Name, Name), now: Instant, catalog: &Catalog) {
        let ttl = catalog.get_check(&key.0, &key.1).and_then(|c| c.ttl());
        match ttl {
            Some(ttl) => {
                let at = now + ttl;
                self.ttl.insert(key.clone(), at);
                self.heap.push(Reverse((at, TimerKind::Ttl, key.0, key.1)));
            }
            None => {
                self.ttl.remove(&key);
            }
        }
    }

    /// Restarts a session's clock (made, renewed): it ends twice its TTL
    /// from now unless renewed again.
    fn refresh_session(&mut self, id: Name, now: Instant, catalog: &Catalog) {
        match catalog.snap.sessions.get(&id).and_then(|s| s.ttl()) {
            Some(ttl) => {
                let at = now + ttl * 2;
                self.sessions.insert(id.clone(), at);
                self.heap
                    .push(Reverse((at, TimerKind::Session, id, Name::from(""))));
            }
            None => {
                self.sessions.remove(&id);
            }
        }
    }

    fn check_changed(&mut self, key: (Name, Name), now: Instant, catalog: &Catalog) {
        let Some(check) = catalog.get_check(&key.0, &key.1) else {
            self.ttl.remove(&key);
            self.critical_since.remove(&key);
            return;
        };
        if check.ttl().is_none() {
            self.ttl.remove(&key);
        }
        match check.definition.deregister_critical_after {
            Some(after) if check.status == Status::Critical && !check.service_id.is_empty() => {
                if !self.critical_since.contains_key(&key) {
                    self.critical_since.insert(key.clone(), now);
                    self.heap
                        .push(Reverse((now + after, TimerKind::Reap, key.0, key.1)));
                }
            }
            _ => {
                self.critical_since.remove(&key);
            }
        }
    }

    /// Puts back a timer that fired on an agent not owning the check: it
    /// fires again a second later (the deregister clock keeps its start).
    fn defer(&mut self, kind: TimerKind, key: (Name, Name), now: Instant, catalog: &Catalog) {
        let at = now + std::time::Duration::from_secs(1);
        match kind {
            TimerKind::Ttl => {
                self.ttl.insert(key.clone(), at);
            }
            TimerKind::Session => {
                self.sessions.insert(key.0.clone(), at);
            }
            TimerKind::Reap => {
                // It was due: keep it due, so a new owner reaps at once.
                let after = catalog
                    .get_check(&key.0, &key.1)
                    .and_then(|c| c.definition.deregister_critical_after)
                    .unwrap_or_default();
                let since = now.checked_sub(after).unwrap_or(now);
                self.critical_since.entry(key.clone()).or_insert(since);
            }
        }
        self.heap.push(Reverse((at, kind, key.0, key.1)));
    }

    /// Pops every timer due at `now` and turns the live ones into commands.
    fn due(&mut self, now: Instant, catalog: &Catalog) -> Vec<Command> {
        let mut out = Vec::new();
        while let Some(Reverse((at, ..))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, kind, node, id))) = self.heap.pop() else {
                break;
            };
            let key = (node, id);
            match kind {
                TimerKind::Ttl => {
                    if self.ttl.get(&key) == Some(&at) {
                        self.ttl.remove(&key);
                        out.push(Command::ExpireTtl {
                            node: key.0,
                            id: key.1,
                        });
                    }
                }
                TimerKind::Session => {
                    if self.sessions.get(&key.0) == Some(&at) {
                        self.sessions.remove(&key.0);
                        out.push(Command::SessionExpire { id: key.0 });
                    }
                }
                TimerKind::Reap => {
                    let Some(since) = self.critical_since.get(&key).copied() else {
                        continue;
                    };
                    let after = catalog
                        .get_check(&key.0, &key.1)
                        .and_then(|c| c.definition.deregister_critical_after);
                    match after {
                        Some(after) if since + after <= now => {
                            self.critical_since.remove(&key);
                            out.push(Command::ReapCritical {
                                node: key.0,
                                check: key.1,
                            });
                        }
                        Some(after) => {
                            self.heap
                                .push(Reverse((since + after, TimerKind::Reap, key.0, key.1)));
                        }
                        None => {
                            self.critical_since.remove(&key);
                        }
                    }
                }
            }
        }
        out
    }
}
