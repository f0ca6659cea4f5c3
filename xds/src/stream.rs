//! One ADS stream's protocol state, without I/O: what the client subscribed
//! to per type, what it was sent, acknowledged and refused, and what must
//! be sent next.
//!
//! Rules (the xDS protocol, and where it leaves a choice, go-control-plane's
//! and the clients' observed behaviour):
//! - every request's `resource_names` replace the subscription of its type;
//!   it counts as an ACK or NACK only when its nonce is the last one sent for
//!   the type, and a NACK is told by `error_detail` alone;
//! - an empty name list is a wildcard until a request of the type has named a
//!   resource (the legacy wildcard), an unsubscription afterwards; `*` is a
//!   wildcard always;
//! - Listener and Cluster responses carry every subscribed resource that
//!   exists (one left out is deleted at the client, which is how a name
//!   unknown here is answered); assignments travel only when they change;
//! - a newly named resource is sent even when it was sent before;
//! - refused content is never sent again: a full-state response carries the
//!   last acknowledged version of a refused resource instead.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::resources::{service_of, Kind, Resource};

/// What the state needs of the catalog to build a response.
pub trait Source {
    /// The catalog index responses are versioned with.
    fn index(&self) -> u64;
    /// The resource `name` of `kind`, when it exists.
    fn resource(&self, kind: Kind, name: &str) -> Option<Arc<Resource>>;
    /// Every service's cluster name, for a wildcard Cluster subscription.
    fn cluster_names(&self) -> Vec<Arc<str>>;
}

/// A request the stream cannot go on after.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("xds: a request needs a type_url")]
    NoType,
    #[error("xds: this stream may subscribe to at most {0} resources ([xds] max_subscriptions)")]
    TooMany(usize),
}

/// What a request was, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A request of a type this server does not serve (ignored).
    Unknown,
    /// A subscription (first or changed), or a stale nonce's request.
    Subscribe(Kind),
    Ack(Kind),
    /// The client refused the response: its error detail.
    Nack(Kind, String),
}

#[derive(Default)]
struct TypeState {
    /// A request of this type came.
    requested: bool,
    /// Any request of this type named a resource: an empty list is now an
    /// unsubscription, not a wildcard.
    named: bool,
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// What the client holds as far as we know: what we last sent, put back
    /// to the acknowledged version when it refuses.
    sent: HashMap<Arc<str>, Arc<Resource>>,
    acked: HashMap<Arc<str>, Arc<Resource>>,
    rejected: HashMap<Arc<str>, Arc<Resource>>,
    /// The last response's nonce and the resources it carried.
    pending: Option<(String, Vec<Arc<Resource>>)>,
    /// Names whose resource may have changed.
    dirty: HashSet<Arc<str>>,
    /// Every name may have changed (policy reload, wildcard change).
    all_dirty: bool,
    /// A request is owed an answer though nothing may differ (a new name
    /// that does not exist is answered by leaving it out).
    owed: bool,
    /// When the oldest change not yet sent was published.
    since: Option<Instant>,
    /// The last version sent: (catalog index, repeat).
    version: (u64, u32),
}

impl TypeState {
    fn is_dirty(&self) -> bool {
        self.owed || self.all_dirty || !self.dirty.is_empty()
    }

    fn subscribed(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// The state of one stream.
pub struct StreamState {
    types: [TypeState; 4],
    pub node: Option<Node>,
    nonce: u64,
    max_subscriptions: usize,
}

impl StreamState {
    pub fn new(max_subscriptions: usize) -> StreamState {
        StreamState {
            types: Default::default(),
            node: None,
            nonce: 0,
            max_subscriptions,
        }
    }

    fn of(&mut self, kind: Kind) -> &mut TypeState {
        &mut self.types[kind.slot()]
    }

    /// Subscribed names per type (wildcards not counted).
    pub fn subscriptions(&self, kind: Kind) -> usize {
        self.types[kind.slot()].names.len()
    }

    /// A Cluster wildcard is subscribed (an Envoy): the set of services
    /// matters, not only named ones.
    pub fn wildcard_clusters(&self) -> bool {
        self.types[Kind::Cluster.slot()].wildcard
    }

    /// The services any subscription names.
    pub fn services(&self) -> HashSet<Arc<str>> {
        let mut services = HashSet::new();
        for kind in Kind::ALL {
            for name in &self.types[kind.slot()].names {
                if let Some(s) = service_of(kind, name) {
                    services.insert(Arc::from(s));
                }
            }
        }
        services
    }

    /// Takes a request: the subscription it states, and the ACK or NACK it
    /// carries.
    pub fn request(&mut self, request: DiscoveryRequest) -> Result<Reply, RequestError> {
        if self.node.is_none() {
            self.node = request.node;
        }
        if request.type_url.is_empty() {
            return Err(RequestError::NoType);
        }
        let Some(kind) = Kind::of_url(&request.type_url) else {
            return Ok(Reply::Unknown);
        };
        let others: usize = Kind::ALL
            .iter()
            .filter(|k| **k != kind)
            .map(|k| self.subscriptions(*k))
            .sum();
        if others + request.resource_names.len() > self.max_subscriptions {
            return Err(RequestError::TooMany(self.max_subscriptions));
        }
        let state = self.of(kind);
        let mut reply = Reply::Subscribe(kind);
        let current = matches!(&state.pending, Some((n, _)) if *n == request.response_nonce);
        if let Some((_, carried)) = state.pending.take().filter(|_| current) {
            match request.error_detail {
                Some(error) => {
                    // The client keeps what it had: put that back, and
                    // remember what it refused.
                    if kind.full_state() {
                        state.sent = state.acked.clone();
                    }
                    for resource in carried {
                        let name = resource.name.clone();
                        match state.acked.get(&name) {
                            Some(good) => state.sent.insert(name.clone(), good.clone()),
                            None => state.sent.remove(&name),
                        };
                        state.rejected.insert(name, resource);
                    }
                    reply = Reply::Nack(kind, error.message);
                }
                None => {
                    for resource in &carried {
                        state.rejected.remove(&resource.name);
                    }
                    state.acked = state.sent.clone();
                    reply = Reply::Ack(kind);
                }
            }
        }
        // The subscription.
        let first = !state.requested;
        state.requested = true;
        let names = request.resource_names;
        let (wildcard, named): (bool, BTreeSet<Arc<str>>) = if names.is_empty() {
            (!state.named, BTreeSet::new())
        } else {
            state.named = true;
            let wildcard = names.iter().any(|n| n == "*");
            let named = names
                .into_iter()
                .filter(|n| n != "*")
                .map(Arc::from)
                .collect();
            (wildcard, named)
        };
        if wildcard && (!state.wildcard || first) {
            state.all_dirty = true;
            state.owed = true;
        }
        for name in named.difference(&state.names) {
            // Sent again even when the client had it before.
            state.sent.remove(name);
            state.dirty.insert(name.clone());
            state.owed = true;
        }
        let gone: Vec<Arc<str>> = state.names.difference(&named).cloned().collect();
        for name in gone {
            state.sent.remove(&name);
            state.acked.remove(&name);
            state.rejected.remove(&name);
            state.dirty.remove(&name);
        }
        if state.wildcard && !wildcard {
            state.all_dirty = true;
        }
        state.wildcard = wildcard;
        state.names = named;
        Ok(reply)
    }

    /// The catalog changed `service` (at `at`, when it was published).
    pub fn changed(&mut self, service: &str, at: Instant) {
        for kind in Kind::ALL {
            let state = self.of(kind);
            let hit: Vec<Arc<str>> = state
                .names
                .iter()
                .filter(|n| service_of(kind, n) == Some(service))
                .cloned()
                .collect();
            let wildcard_hit = state.wildcard && kind == Kind::Cluster;
            if hit.is_empty() && !wildcard_hit {
                continue;
            }
            state.dirty.extend(hit);
            if wildcard_hit {
                state.all_dirty = true;
            }
            state.since.get_or_insert(at);
        }
    }

    /// Everything of `kind` may have changed (policies reloaded, the set of
    /// services changed under a wildcard).
    pub fn all_changed(&mut self, kind: Kind, at: Instant) {
        let state = self.of(kind);
        if state.wildcard || !state.names.is_empty() {
            state.all_dirty = true;
            state.since.get_or_insert(at);
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.types.iter().any(TypeState::is_dirty)
    }

    /// The next response to send, in make-before-break order (clusters,
    /// their assignments, listeners), with when the oldest change it carries
    /// was published; `None` when nothing differs from what the client holds.
    pub fn next(&mut self, source: &dyn Source) -> Option<(DiscoveryResponse, Option<Instant>)> {
        for kind in Kind::ALL {
            if !self.types[kind.slot()].is_dirty() {
                continue;
            }
            let carried = self.changes(kind, source);
            let state = self.of(kind);
            let since = state.since.take();
            state.dirty.clear();
            state.all_dirty = false;
            let owed = std::mem::take(&mut state.owed);
            // `None`: a full-state type the client holds as it is.
            let Some(carried) = carried else {
                continue;
            };
            let silent = !owed && !kind.full_state();
            if carried.is_empty() && (silent || kind == Kind::Route) {
                continue;
            }
            let index = source.index();
            state.version = if index > state.version.0 {
                (index, 0)
            } else {
                (state.version.0, state.version.1 + 1)
            };
            let version = match state.version {
                (index, 0) => index.to_string(),
                (index, n) => format!("{index}.{n}"),
            };
            for resource in &carried {
                state.sent.insert(resource.name.clone(), resource.clone());
            }
            if kind.full_state() {
                let names: HashSet<&Arc<str>> = carried.iter().map(|r| &r.name).collect();
                state.sent.retain(|name, _| names.contains(name));
            }
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            let response = DiscoveryResponse {
                version_info: version,
                resources: carried.iter().map(|r| r.any.clone()).collect(),
                type_url: kind.type_url().into(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            let state = self.of(kind);
            state.pending = Some((nonce, carried));
            if kind == Kind::Cluster {
                self.rewarm(&response);
            }
            return Some((response, since));
        }
        None
    }

    /// A changed Cluster waits (in Envoy) for its assignment, even an
    /// unchanged one: send those again.
    fn rewarm(&mut self, response: &DiscoveryResponse) {
        if !self.types[Kind::Cluster.slot()].wildcard {
            return;
        }
        let names: Vec<Arc<str>> = match &self.types[Kind::Cluster.slot()].pending {
            Some((_, carried)) => carried.iter().map(|r| r.name.clone()).collect(),
            None => return,
        };
        debug_assert_eq!(names.len(), response.resources.len());
        let eds = self.of(Kind::Endpoints);
        for name in names {
            if eds.subscribed(&name) {
                eds.sent.remove(&name);
                eds.dirty.insert(name);
            }
        }
    }

    /// What a response of `kind` would carry now: for a full-state type
    /// every subscribed resource that exists (`None` when that is what the
    /// client holds), else the changed ones.
    fn changes(&self, kind: Kind, source: &dyn Source) -> Option<Vec<Arc<Resource>>> {
        let state = &self.types[kind.slot()];
        // Content the client refused is not sent again.
        let fresh = |name: &str| -> Option<Arc<Resource>> {
            let current = source.resource(kind, name)?;
            match state.rejected.get(name) {
                Some(refused) if Resource::same(refused, &current) => {
                    state.acked.get(name).cloned()
                }
                _ => Some(current),
            }
        };
        if kind.full_state() {
            let names: Vec<Arc<str>> = if state.wildcard && kind == Kind::Cluster {
                let mut all = source.cluster_names();
                all.extend(state.names.iter().cloned());
                all.sort();
                all.dedup();
                all
            } else {
                state.names.iter().cloned().collect()
            };
            let carried: Vec<Arc<Resource>> = names.iter().filter_map(|n| fresh(n)).collect();
            let same = carried.len() == state.sent.len()
                && carried.iter().all(|r| {
                    state
                        .sent
                        .get(&r.name)
                        .is_some_and(|s| Resource::same(s, r))
                });
            if same && !state.owed {
                return None;
            }
            return Some(carried);
        }
        let names: Vec<&Arc<str>> = if state.all_dirty {
            state.names.iter().collect()
        } else {
            state
                .dirty
                .iter()
                .filter(|n| state.names.contains(&***n))
                .collect()
        };
        let mut carried: Vec<Arc<Resource>> = names
            .into_iter()
            .filter_map(|n| fresh(n))
            .filter(|r| {
                !state
                    .sent
                    .get(&r.name)
                    .is_some_and(|s| Resource::same(s, r))
            })
            .collect();
        carried.sort_by(|a, b| a.name.cmp(&b.name));
        Some(carried)
    }
}
