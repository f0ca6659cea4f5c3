//! Where the catalog is kept durably. The writer commits one `StoreBatch` per
//! group of commands and acknowledges them only after the commit returns.

mod copy;
mod embedded;
mod etcd;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

pub use embedded::{EmbeddedStore, CATALOG_FILE};
pub use etcd::{EtcdOptions, EtcdStore};

use crate::error::StoreError;
use crate::model::{unix_ms, Check, Endpoint, Name, Node};
use switchyard_catalog::{KvEntry, PreparedQuery, Session};

/// A key's change in a batch: its entry, or its deletion at that index.
#[derive(Clone, Debug)]
pub enum KvChange {
    Set(Arc<KvEntry>),
    Deleted(u64),
}

/// A record keyed by `(node, id)`, or `None` for a deletion.
pub type Keyed<T> = ((Name, Name), Option<Arc<T>>);

/// Everything one group commit changes. `None` values are deletions.
#[derive(Debug, Default)]
pub struct StoreBatch {
    /// The catalog index after this batch; persisted so it never goes back.
    pub index: u64,
    pub nodes: Vec<(Name, Option<Arc<Node>>)>,
    pub endpoints: Vec<Keyed<Endpoint>>,
    pub checks: Vec<Keyed<Check>>,
    /// Prepared queries by ID.
    pub queries: Vec<(Name, Option<Arc<PreparedQuery>>)>,
    /// KV keys set or deleted.
    pub kv: Vec<(Name, KvChange)>,
    /// Sessions made or ended.
    pub sessions: Vec<(Name, Option<Arc<Session>>)>,
    /// KV tombstones reaped, and the floor they leave.
    pub kv_reaped: Vec<Name>,
    pub kv_floor: Option<u64>,
    /// Sessions renewed: a shared store records them so that every agent
    /// restarts the session's clock.
    pub session_renewals: Vec<Name>,
    /// Last change index per service, kept for services that no longer exist.
    pub service_index: Vec<(Name, u64)>,
    /// The catalog index this batch was built on. A shared store commits only
    /// if nobody else changed the catalog since.
    pub base: u64,
    /// Nodes whose entry (record, endpoints or checks) changed, and whether
    /// the node still exists.
    pub entries: Vec<(Name, bool)>,
    /// Which table indexes moved: services, nodes, checks.
    pub tables: [bool; 3],
    /// TTL checks renewed by this batch, with their TTL. A shared store
    /// records them so every agent restarts the check's clock; a local store
    /// has nothing to record (the writer restarts its own).
    pub ttl_renewals: Vec<((Name, Name), Duration)>,
    /// TTL checks this batch turns critical because their clock ran out. A
    /// shared store commits only if none of them was renewed (by any agent)
    /// after `seen`, the store revision this agent had applied: a renewal
    /// that lands first wins over an expiry decided without it.
    pub ttl_expiries: Vec<(Name, Name)>,
    pub seen: u64,
}

impl StoreBatch {
    pub fn len(&self) -> usize {
        self.nodes.len()
            + self.endpoints.len()
            + self.checks.len()
            + self.queries.len()
            + self.kv.len()
            + self.sessions.len()
            + self.kv_reaped.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole stored catalog, read once at start.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub index: u64,
    pub nodes: Vec<Node>,
    pub endpoints: Vec<Endpoint>,
    pub checks: Vec<Check>,
    pub queries: Vec<PreparedQuery>,
    pub kv: Vec<KvEntry>,
    pub sessions: Vec<Session>,
    /// The newest deletion whose tombstone was reaped.
    pub kv_reaped: u64,
    /// Deleted keys with the index of their deletion.
    pub kv_tombstones: Vec<(String, u64)>,
    pub service_index: Vec<(String, u64)>,
    /// Last change index per node entry (a shared store keeps them so that a
    /// freshly started agent reports the same indexes as one that watched).
    pub entry_index: Vec<(String, u64)>,
    /// Table indexes (services, nodes, checks), when the store keeps them.
    pub tables: Option<[u64; 3]>,
}

/// How a commit went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Durable as applied: the writer publishes its working copy.
    Local,
    /// Written to a shared store at this revision. The writer drops its
    /// working copy; the change comes back through the feed, with the store's
    /// revision as its index, exactly as every other agent sees it.
    Shared { revision: u64 },
    /// Someone else changed the catalog first. The writer catches up to this
    /// revision through the feed and applies the commands again.
    Conflict { revision: u64 },
}

/// One change read back from a shared store, in revision order.
#[derive(Debug)]
pub enum Change {
    /// The records one revision changed.
    Records { revision: u64, records: Vec<Record> },
    /// The whole catalog at `revision` (after a gap the store could not
    /// replay, such as a compacted revision): replaces everything.
    Reset { revision: u64, loaded: Box<Loaded> },
}

/// One record of a `Change`; `None` is a deletion. Record indexes are the
/// store's revisions.
#[derive(Clone, Debug)]
pub enum Record {
    Node(Name, Option<Box<Node>>),
    Endpoint((Name, Name), Option<Box<Endpoint>>),
    Check((Name, Name), Option<Box<Check>>),
    /// A prepared query, by ID.
    Query(Name, Option<Box<PreparedQuery>>),
    /// A KV key, or its deletion.
    Kv(Name, Option<Box<KvEntry>>),
    /// A KV key's tombstone (written with its deletion; its revision is the
    /// deletion's index).
    KvTombstone(Name),
    /// A KV tombstone reaped.
    KvUnbury(Name),
    /// The floor reaped tombstones leave (`Kv::reaped`).
    KvReaped(u64),
    /// A session, or its end.
    Session(Name, Option<Box<Session>>),
    /// A session was renewed (its clock restarts on every agent).
    SessionRenewed(Name),
    /// A TTL check was renewed (its clock restarts on every agent).
    Ttl((Name, Name), Duration),
    /// The catalog changed at this revision (every catalog write carries it),
    /// written at `written_us` (Unix microseconds, the writing agent's clock).
    Index {
        written_us: Option<u64>,
    },
}

/// A durable home for the catalog.
pub trait Store: Send + 'static {
    /// Short name for status output and logs (`embedded`, `memory`, `etcd`).
    fn kind(&self) -> &'static str;

    /// Reads everything stored. Called once, before the writer starts.
    fn load(&mut self) -> Result<Loaded, StoreError>;

    /// Makes a batch durable. The writer awaits it before acknowledging.
    fn commit(
        &mut self,
        batch: StoreBatch,
    ) -> impl Future<Output = Result<Committed, StoreError>> + Send;

    /// The changes written by anyone (this agent included), for a store that
    /// several agents share. The writer takes it once and applies what it
    /// yields like its own commands.
    fn feed(&mut self) -> Option<mpsc::Receiver<Change>> {
        None
    }

    /// Whether other agents write to this store too.
    fn shared(&self) -> bool {
        false
    }

    /// Connection state, for staleness reporting.
    fn status(&self) -> Arc<StoreStatus> {
        Arc::new(StoreStatus::local())
    }
}

/// FNV-1a over the parts with a separator: stable across processes and
/// versions, which rendezvous hashing needs (every agent must agree).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // A final mix spreads keys that differ only in their last bytes.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// How current this agent's copy of a shared catalog is. Local stores are
/// always current.
#[derive(Debug)]
pub struct StoreStatus {
    connected: AtomicBool,
    /// Wall-clock time of the last word from the store (ms since the epoch);
    /// 0 for a local store.
    last_contact_ms: AtomicU64,
    /// The store's revision this agent has seen up to.
    revision: AtomicU64,
    /// This agent's name among the agents sharing the store (None: alone).
    me: Option<Name>,
    /// The live agents sharing the store, as last read (sorted).
    members: ArcSwap<Vec<Name>>,
    /// Notified when `members` changes.
    members_changed: tokio::sync::Notify,
    /// Live load exchanged with those agents.
    board: crate::load::LoadBoard,
    /// Cluster mode's local copy of the catalog: the index it holds and
    /// when it was written (ms since the epoch); 0 when there is none.
    copy_index: AtomicU64,
    copy_written_ms: AtomicU64,
    /// A shared store's servers as last read: the leader's and every
    /// member's client address (none for a local store).
    servers: ArcSwap<Servers>,
}

/// The servers of a shared store (etcd): its leader and members, by client
/// address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Servers {
    pub leader: Option<String>,
    pub members: Vec<String>,
}

impl StoreStatus {
    pub fn local() -> StoreStatus {
        StoreStatus::member(None)
    }

    pub(crate) fn member(me: Option<Name>) -> StoreStatus {
        StoreStatus {
            connected: AtomicBool::new(true),
            last_contact_ms: AtomicU64::new(0),
            revision: AtomicU64::new(0),
            me,
            members: ArcSwap::from_pointee(Vec::new()),
            members_changed: tokio::sync::Notify::new(),
            board: crate::load::LoadBoard::default(),
            copy_index: AtomicU64::new(0),
            copy_written_ms: AtomicU64::new(0),
            servers: ArcSwap::from_pointee(Servers::default()),
        }
    }

    /// The local copy now holds the catalog at `index`, written at `written_ms`.
    pub(crate) fn copied(&self, index: u64, written_ms: u64) {
        self.copy_index.store(index, Ordering::Relaxed);
        self.copy_written_ms.store(written_ms, Ordering::Relaxed);
    }

    /// The index the local copy of a shared catalog holds, and when it was
    /// written (ms since the epoch): `None` without one.
    pub fn local_copy(&self) -> Option<(u64, u64)> {
        match self.copy_written_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some((self.copy_index.load(Ordering::Relaxed), at)),
        }
    }

    pub(crate) fn set_members(&self, members: Vec<Name>) {
        if **self.members.load() != members {
            tracing::info!(agents = ?members, "agents sharing the catalog changed");
            self.members.store(Arc::new(members));
            self.members_changed.notify_waiters();
        }
    }

    /// Resolves at the next change of the live agents.
    pub async fn members_changed(&self) {
        self.members_changed.notified().await;
    }

    /// This agent's name among those sharing the store (None: alone).
    pub fn me(&self) -> Option<&Name> {
        self.me.as_ref()
    }

    /// The load this agent and the others report to each other.
    pub fn board(&self) -> &crate::load::LoadBoard {
        &self.board
    }

    /// The live agents sharing the catalog (empty with a local store).
    pub fn members(&self) -> Arc<Vec<Name>> {
        self.members.load_full()
    }

    /// Whether this agent runs the check `(node, id)`: each check has one
    /// owner among the live agents (rendezvous hashing), so a check runs once
    /// in the cluster and moves when its owner's lease lapses. Alone, this
    /// agent owns everything.
    pub fn owns(&self, node: &str, id: &str) -> bool {
        let Some(me) = &self.me else {
            return true;
        };
        let members = self.members.load();
        let score = |agent: &str| fnv1a(&[agent.as_bytes(), node.as_bytes(), id.as_bytes()]);
        let mine = score(me);
        members
            .iter()
            .filter(|m| *m != me)
            .all(|m| (score(m), &**m) < (mine, &**me))
    }

    pub(crate) fn contact(&self, revision: u64) {
        self.connected.store(true, Ordering::Relaxed);
        self.last_contact_ms.store(unix_ms(), Ordering::Relaxed);
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Not connected; the catalog served is as of `written_ms` (a local
    /// copy read at start): its staleness counts from then.
    pub(crate) fn stale_since(&self, written_ms: u64) {
        self.connected.store(false, Ordering::Relaxed);
        self.last_contact_ms
            .store(written_ms.max(1), Ordering::Relaxed);
    }

    pub(crate) fn lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// The shared store's servers, as last read (empty for a local store).
    pub fn servers(&self) -> Arc<Servers> {
        self.servers.load_full()
    }

    pub(crate) fn set_servers(&self, servers: Servers) {
        if *self.servers.load_full() != servers {
            self.servers.store(Arc::new(servers));
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// How long since the store was last heard from: the most this agent's
    /// answers can lag the shared catalog. Zero for a local store.
    pub fn staleness(&self) -> Duration {
        match self.last_contact_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_millis(unix_ms().saturating_sub(at)),
        }
    }
}

/// Keeps nothing: for tests and benchmarks of the in-memory path.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Number of commits seen, for tests of group commit.
    pub commits: u64,
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(
        &mut self,
        _batch: StoreBatch,
    ) -> impl Future<Output = Result<Committed, StoreError>> + Send {
        self.commits += 1;
        std::future::ready(Ok(Committed::Local))
    }
}
