//! Other datacenters' catalogs as DNS (and, later, the proxy) read them:
//! local copies of the services and nodes asked for, each copy a
//! [`Snapshot`] of its own built by the same writer code as ours (so the
//! same decorators, and the same answer paths, serve it). The federation
//! crate keeps them; readers see only this trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::snapshot::Snapshot;

/// What a copy holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyOf<'a> {
    /// A service (its routable endpoints and their nodes).
    Service(&'a str),
    /// A node (its record).
    Node(&'a str),
}

/// Where a copy stands.
pub enum Copied {
    /// Fetched at least once: the datacenter's copy snapshot (stale while
    /// the datacenter is out of reach, never empty for that).
    Ready(Arc<Snapshot>),
    /// Its first fetch is under way: the future ends when it is done or
    /// when the wait for it (`federation.dns_timeout`) is over.
    Fetching(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Not a datacenter this agent knows.
    Unknown,
    /// Not copied: the datacenter's copies are at their cap
    /// (`federation.max_copies`), so a flood of made-up names cannot grow
    /// them. (DNS answers SERVFAIL; the proxy passes the datacenter over.)
    Full,
}

/// Other datacenters' copies, asked for by name (lower case).
pub trait Elsewhere: Failover + Send + Sync {
    /// Whether `dc` (lower case) is another datacenter this agent knows.
    /// Asked per query: answers from memory, without a lock.
    fn knows(&self, dc: &[u8]) -> bool;

    /// The copy of `of` in `dc`: made (and its watch started) at the first
    /// ask, kept while asked for.
    fn copy(&self, dc: &str, of: CopyOf<'_>) -> Copied;

    /// Every other datacenter this agent knows, lower case.
    fn datacenters(&self) -> Vec<String>;

    /// `dc`'s copies as they are, without asking for anything (none: not a
    /// datacenter this agent knows).
    fn peek(&self, dc: &str) -> Option<Arc<Snapshot>>;

    /// Notified (`notify_waiters`) whenever any copy changes or a
    /// datacenter comes into or goes out of reach: a blocking read whose
    /// answer may fail over waits on it.
    fn changed(&self) -> &tokio::sync::Notify;

    /// How many times a datacenter came into or went out of reach (only
    /// grows).
    fn reach_changes(&self) -> u64;
}

/// Where services fail over to, and the record of those that do.
pub trait Failover: Send + Sync {
    /// The share of a service's endpoints that must be routable here;
    /// below it the service fails over (`federation.min_healthy`; 0: only
    /// when none is).
    fn min_healthy(&self) -> f64;

    /// The datacenters a service fails over to, in order, lower case:
    /// `policy` is its `switchyard.failover=` tag's value (`none`,
    /// `nearest`, or names), else `federation.failover`. Datacenters out
    /// of reach are left out.
    fn order(&self, policy: Option<&str>) -> Vec<String>;

    /// How the proxy reaches `dc`'s endpoints when it fails over: `None`
    /// straight to their addresses, else through these proxies of that
    /// datacenter (`via = "proxy"`).
    fn via_proxies(&self, dc: &str) -> Option<Arc<[std::net::SocketAddr]>>;

    /// This agent's own datacenter.
    fn datacenter(&self) -> &str;

    /// `service` was answered from `dc`: the first time (or another `dc`)
    /// it is logged, and `switchyard_federation_failover_services` and the
    /// datacenters list show it.
    fn failed_over(&self, service: &str, dc: &str);
}

/// The tag that sets a service's failover (`switchyard.failover=dc2,dc3`,
/// `=nearest` or `=none`).
pub const FAILOVER_TAG: &str = "switchyard.failover=";

/// A service's own failover policy: its `switchyard.failover=` tag's value.
pub fn failover_policy(view: &crate::view::ServiceView) -> Option<&str> {
    view.tags_from(FAILOVER_TAG)
        .next()
        .and_then(|tag| tag.strip_prefix(FAILOVER_TAG))
}

/// Whether a service (none: not in the catalog) has too few routable
/// endpoints here: none, or a share under `min_healthy`.
pub fn needs_failover(view: Option<&crate::view::ServiceView>, min_healthy: f64) -> bool {
    let Some(view) = view else {
        return true;
    };
    let routable = view.routable_len();
    routable == 0 || (min_healthy > 0.0 && (routable as f64) < min_healthy * view.len() as f64)
}
