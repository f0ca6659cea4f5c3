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

/// Assignments past this many bytes go in the next response.
pub(crate) const RESPONSE_BYTES: usize = 32 << 10;

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
            let Some(mut carried) = carried else {
                continue;
            };
            if !kind.full_state() {
                // Assignments may travel apart: a response stops past
                // RESPONSE_BYTES, and the rest follow in the next ones, so
                // no stream's buffers grow to its whole subscription.
                let mut size = 0;
                let cut = carried
                    .iter()
                    .position(|r| {
                        size += r.any.value.len();
                        size > RESPONSE_BYTES
                    })
                    .map_or(carried.len(), |at| at.max(1));
                for rest in carried.split_off(cut) {
                    state.dirty.insert(rest.name.clone());
                    state.since = state.since.or(since);
                }
            }
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    use super::*;

    /// A catalog of services, each with a content version per kind.
    #[derive(Default)]
    struct Fake {
        index: u64,
        services: RefCell<HashMap<String, [u64; 4]>>,
        /// Bytes added to every resource.
        pad: usize,
    }

    impl Fake {
        fn with(services: &[&str]) -> Fake {
            let fake = Fake {
                index: 10,
                ..Fake::default()
            };
            for s in services {
                fake.services.borrow_mut().insert(s.to_string(), [1; 4]);
            }
            fake
        }

        fn bump(&self, service: &str, kind: Kind) {
            let mut services = self.services.borrow_mut();
            let versions = services.entry(service.to_string()).or_insert([1; 4]);
            versions[kind.slot()] += 1;
        }
    }

    impl Source for Fake {
        fn index(&self) -> u64 {
            self.index
        }

        fn resource(&self, kind: Kind, name: &str) -> Option<Arc<Resource>> {
            let service = service_of(kind, name)?;
            let version = match self.services.borrow().get(service) {
                Some(versions) => versions[kind.slot()],
                None if kind == Kind::Endpoints => 0,
                None => return None,
            };
            Some(Arc::new(Resource {
                name: name.into(),
                any: Any {
                    type_url: kind.type_url().into(),
                    value: format!("{name}@{version}{}", " ".repeat(self.pad)).into_bytes(),
                },
            }))
        }

        fn cluster_names(&self) -> Vec<Arc<str>> {
            let mut names: Vec<Arc<str>> = (self.services.borrow().keys())
                .map(|s| Arc::from(format!("svc/{s}")))
                .collect();
            names.sort();
            names
        }
    }

    fn ask(kind: Kind, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: kind.type_url().into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(kind: Kind, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad".into(),
                details: Vec::new(),
            }),
            ..ask(kind, names, nonce)
        }
    }

    /// Each resource of a response as `name@version`.
    fn contents(response: &DiscoveryResponse) -> Vec<String> {
        response
            .resources
            .iter()
            .map(|a| String::from_utf8_lossy(&a.value).trim_end().to_string())
            .collect()
    }

    fn next(state: &mut StreamState, source: &Fake) -> Option<DiscoveryResponse> {
        state.next(source).map(|(r, _)| r)
    }

    #[test]
    fn an_ack_quiets_the_stream_until_the_catalog_changes() {
        let fake = Fake::with(&["a"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let first = next(&mut s, &fake).expect("first answer");
        assert_eq!(contents(&first), ["svc/a@1"]);
        assert_eq!(first.version_info, "10");
        let reply = s.request(ask(Kind::Endpoints, &["svc/a"], &first.nonce));
        assert_eq!(reply, Ok(Reply::Ack(Kind::Endpoints)));
        assert!(next(&mut s, &fake).is_none());
        fake.bump("a", Kind::Endpoints);
        s.changed("a", Instant::now());
        let second = next(&mut s, &fake).expect("the change");
        assert_eq!(contents(&second), ["svc/a@2"]);
        assert_ne!(first.nonce, second.nonce);
    }

    #[test]
    fn refused_content_is_not_sent_again_but_a_newer_one_is() {
        let fake = Fake::with(&["a"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let first = next(&mut s, &fake).expect("request");
        s.request(ask(Kind::Endpoints, &["svc/a"], &first.nonce))
            .expect("request");
        fake.bump("a", Kind::Endpoints);
        s.changed("a", Instant::now());
        let bad = next(&mut s, &fake).expect("request");
        let reply = s.request(nack(Kind::Endpoints, &["svc/a"], &bad.nonce));
        assert_eq!(reply, Ok(Reply::Nack(Kind::Endpoints, "bad".into())));
        // Woken again with the same content: nothing.
        s.changed("a", Instant::now());
        assert!(next(&mut s, &fake).is_none(), "refused content resent");
        fake.bump("a", Kind::Endpoints);
        s.changed("a", Instant::now());
        let fixed = next(&mut s, &fake).expect("newer content");
        assert_eq!(contents(&fixed), ["svc/a@3"]);
        assert!(next(&mut s, &fake).is_none());
    }

    #[test]
    fn a_stale_nonce_subscribes_but_acknowledges_nothing() {
        let fake = Fake::with(&["a", "b"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let first = next(&mut s, &fake).expect("request");
        fake.bump("a", Kind::Endpoints);
        s.changed("a", Instant::now());
        let _second = next(&mut s, &fake).expect("request");
        // The client answers the first response late, adding a name.
        let reply = s.request(ask(Kind::Endpoints, &["svc/a", "svc/b"], &first.nonce));
        assert_eq!(reply, Ok(Reply::Subscribe(Kind::Endpoints)));
        let added = next(&mut s, &fake).expect("the added name");
        assert_eq!(contents(&added), ["svc/b@1"]);
    }

    #[test]
    fn assignments_travel_alone_full_state_types_carry_every_subscription() {
        let fake = Fake::with(&["a", "b"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Endpoints, &["svc/a", "svc/b"], ""))
            .expect("request");
        s.request(ask(Kind::Cluster, &["svc/a", "svc/b"], ""))
            .expect("request");
        // Clusters first (make before break), then their assignments.
        let cds = next(&mut s, &fake).expect("request");
        assert_eq!(cds.type_url, Kind::Cluster.type_url());
        assert_eq!(contents(&cds), ["svc/a@1", "svc/b@1"]);
        let eds = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&eds), ["svc/a@1", "svc/b@1"]);
        s.request(ask(Kind::Cluster, &["svc/a", "svc/b"], &cds.nonce))
            .expect("request");
        s.request(ask(Kind::Endpoints, &["svc/a", "svc/b"], &eds.nonce))
            .expect("request");
        // Endpoint churn of a: one assignment, no Cluster response.
        fake.bump("a", Kind::Endpoints);
        s.changed("a", Instant::now());
        let eds = next(&mut s, &fake).expect("request");
        assert_eq!(eds.type_url, Kind::Endpoints.type_url());
        assert_eq!(contents(&eds), ["svc/a@2"]);
        assert!(next(&mut s, &fake).is_none());
        // b's cluster changes: the response carries a and b.
        fake.bump("b", Kind::Cluster);
        s.changed("b", Instant::now());
        let cds = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&cds), ["svc/a@1", "svc/b@2"]);
    }

    #[test]
    fn a_refused_cluster_travels_at_its_last_acknowledged_version() {
        let fake = Fake::with(&["a", "b"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Cluster, &["svc/a", "svc/b"], ""))
            .expect("request");
        let first = next(&mut s, &fake).expect("request");
        s.request(ask(Kind::Cluster, &["svc/a", "svc/b"], &first.nonce))
            .expect("request");
        fake.bump("a", Kind::Cluster);
        s.changed("a", Instant::now());
        let bad = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&bad), ["svc/a@2", "svc/b@1"]);
        s.request(nack(Kind::Cluster, &["svc/a", "svc/b"], &bad.nonce))
            .expect("request");
        fake.bump("b", Kind::Cluster);
        s.changed("b", Instant::now());
        let next_one = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&next_one), ["svc/a@1", "svc/b@2"]);
    }

    #[test]
    fn an_unknown_name_is_answered_by_its_absence_and_sent_once_it_exists() {
        let fake = Fake::with(&["a"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Listener, &["x"], "")).expect("request");
        let answer = next(&mut s, &fake).expect("an answer, not silence");
        assert!(answer.resources.is_empty());
        s.request(ask(Kind::Listener, &["x"], &answer.nonce))
            .expect("request");
        assert!(next(&mut s, &fake).is_none());
        fake.bump("x", Kind::Listener);
        s.changed("x", Instant::now());
        let x = next(&mut s, &fake).expect("x exists now");
        assert_eq!(contents(&x), ["x@2"]);
        // An assignment of an unknown service is an empty one, at once.
        s.request(ask(Kind::Endpoints, &["svc/nothing"], ""))
            .expect("request");
        let eds = next(&mut s, &fake).expect("an empty assignment");
        assert_eq!(contents(&eds), ["svc/nothing@0"]);
    }

    #[test]
    fn wildcards_legacy_and_explicit_then_unsubscription() {
        let fake = Fake::with(&["a", "b"]);
        let mut s = StreamState::new(100);
        // The legacy wildcard: every cluster.
        s.request(ask(Kind::Cluster, &[], "")).expect("request");
        assert!(s.wildcard_clusters());
        let all = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&all), ["svc/a@1", "svc/b@1"]);
        // A new service: its cluster joins the next response.
        fake.bump("c", Kind::Cluster);
        s.all_changed(Kind::Cluster, Instant::now());
        let more = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&more), ["svc/a@1", "svc/b@1", "svc/c@2"]);
        // Named: only that one.
        s.request(ask(Kind::Cluster, &["svc/a"], &more.nonce))
            .expect("request");
        assert!(!s.wildcard_clusters());
        let one = next(&mut s, &fake).expect("request");
        assert_eq!(contents(&one), ["svc/a@1"]);
        // Empty after named: unsubscribed, not a wildcard.
        s.request(ask(Kind::Cluster, &[], &one.nonce))
            .expect("request");
        assert!(!s.wildcard_clusters());
        assert_eq!(s.subscriptions(Kind::Cluster), 0);
        // "*" is a wildcard always.
        s.request(ask(Kind::Cluster, &["*"], "")).expect("request");
        assert!(s.wildcard_clusters());
    }

    #[test]
    fn a_changed_cluster_of_a_wildcard_stream_resends_its_assignment() {
        let fake = Fake::with(&["a"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Cluster, &[], "")).expect("request");
        let cds = next(&mut s, &fake).expect("request");
        s.request(ask(Kind::Cluster, &[], &cds.nonce))
            .expect("request");
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let eds = next(&mut s, &fake).expect("request");
        s.request(ask(Kind::Endpoints, &["svc/a"], &eds.nonce))
            .expect("request");
        fake.bump("a", Kind::Cluster);
        s.all_changed(Kind::Cluster, Instant::now());
        let cds = next(&mut s, &fake).expect("request");
        assert_eq!(cds.type_url, Kind::Cluster.type_url());
        // Envoy warms the changed cluster until an assignment arrives.
        let eds = next(&mut s, &fake).expect("the assignment again");
        assert_eq!(contents(&eds), ["svc/a@1"]);
    }

    #[test]
    fn a_newly_named_resource_is_sent_again_and_versions_grow() {
        let fake = Fake::with(&["a"]);
        let mut s = StreamState::new(100);
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let first = next(&mut s, &fake).expect("request");
        s.request(ask(Kind::Endpoints, &[], &first.nonce))
            .expect("request");
        assert!(
            next(&mut s, &fake).is_none(),
            "an unsubscription is not answered"
        );
        s.request(ask(Kind::Endpoints, &["svc/a"], ""))
            .expect("request");
        let again = next(&mut s, &fake).expect("sent again");
        assert_eq!(contents(&again), ["svc/a@1"]);
        assert_eq!(first.version_info, "10");
        assert_eq!(again.version_info, "10.1");
        assert_ne!(first.nonce, again.nonce);
    }

    #[test]
    fn requests_without_a_type_or_over_the_limit_end_the_stream() {
        let mut s = StreamState::new(2);
        assert_eq!(
            s.request(DiscoveryRequest::default()),
            Err(RequestError::NoType)
        );
        s.request(ask(Kind::Cluster, &["svc/a", "svc/b"], ""))
            .expect("request");
        assert_eq!(
            s.request(ask(Kind::Endpoints, &["svc/a"], "")),
            Err(RequestError::TooMany(2))
        );
        assert_eq!(
            s.request(ask(Kind::Cluster, &["svc/a", "svc/b", "svc/c"], "")),
            Err(RequestError::TooMany(2))
        );
        let unknown = DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.other".into(),
            ..Default::default()
        };
        assert_eq!(s.request(unknown), Ok(Reply::Unknown));
    }

    #[test]
    fn large_assignments_travel_in_several_responses() {
        let fake = Fake {
            pad: 10_000,
            ..Fake::with(&["a", "b", "c", "d", "e"])
        };
        let mut s = StreamState::new(100);
        let names = ["svc/a", "svc/b", "svc/c", "svc/d", "svc/e"];
        s.request(ask(Kind::Endpoints, &names, ""))
            .expect("request");
        let mut got = Vec::new();
        let mut responses = 0;
        while let Some(r) = next(&mut s, &fake) {
            let size: usize = r.resources.iter().map(|a| a.value.len()).sum();
            assert!(
                size <= RESPONSE_BYTES + 10_100,
                "{size} bytes in one response"
            );
            got.extend(contents(&r));
            responses += 1;
        }
        assert_eq!(responses, 2, "5 x 10 KB in responses of 32 KiB");
        got.sort();
        assert_eq!(got, ["svc/a@1", "svc/b@1", "svc/c@1", "svc/d@1", "svc/e@1"]);
    }
}
