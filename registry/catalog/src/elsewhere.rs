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
}

/// Other datacenters' copies, asked for by name (lower case).
pub trait Elsewhere: Send + Sync {
    /// Whether `dc` (lower case) is another datacenter this agent knows.
    /// Asked per query: answers from memory, without a lock.
    fn knows(&self, dc: &[u8]) -> bool;

    /// The copy of `of` in `dc`: made (and its watch started) at the first
    /// ask, kept while asked for.
    fn copy(&self, dc: &str, of: CopyOf<'_>) -> Copied;
}
