//! The xDS resources of the catalog: per service a Listener (named as
//! clients dial it), a Cluster (`svc/<service>`) and a ClusterLoadAssignment
//! of the same name.
//!
//! Endpoints are encoded at publish time by [`XdsDecorator`], like DNS's
//! answers and the proxy's backends: each chunk of a view encodes its
//! instances once per zone, and a view's assignment is those bytes
//! concatenated under a locality header (protobuf's repeated fields merge by
//! concatenation). A change in one chunk re-encodes that chunk alone.
//! Listeners and Clusters depend on the service's name and balancing policy
//! only; [`Shapes`] builds them once per (name, policy) for every stream.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
    load_balancing_policy, Cluster, LoadBalancingPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
    TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::hash_policy, route_action::ClusterSpecifier,
    route_action::HashPolicy, route_match::PathSpecifier, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    least_request::v3::LeastRequest, ring_hash::v3::RingHash, round_robin::v3::RoundRobin,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::Message;
use switchyard_catalog::{
    Chunk, EndpointState, ExtraKey, Name, ServiceView, ViewChange, ViewDecorator, ViewHead,
};

/// The resource types this server answers, in the order a flush sends them
/// (make before break: clusters, their endpoints, then listeners).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Cluster,
    Endpoints,
    Listener,
    Route,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Cluster, Kind::Endpoints, Kind::Listener, Kind::Route];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    pub fn of_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// The label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoints => "eds",
        }
    }

    /// Listener and Cluster responses carry every subscribed resource: one
    /// left out is deleted at the client.
    pub fn full_state(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }

    pub(crate) fn slot(self) -> usize {
        match self {
            Kind::Cluster => 0,
            Kind::Endpoints => 1,
            Kind::Listener => 2,
            Kind::Route => 3,
        }
    }
}

/// The prefix of Cluster and ClusterLoadAssignment names.
pub const CLUSTER_PREFIX: &str = "svc/";

/// The service a resource name refers to: a Listener is named as clients
/// dial it (`web`, or `web:8080` for a target with a port), a Cluster and
/// its assignment `svc/web`.
pub fn service_of(kind: Kind, name: &str) -> Option<&str> {
    let service = match kind {
        Kind::Listener => match name.rsplit_once(':') {
            Some((service, port)) if port.parse::<u16>().is_ok() => service,
            _ => name,
        },
        Kind::Cluster | Kind::Endpoints => name.strip_prefix(CLUSTER_PREFIX)?,
        Kind::Route => return None,
    };
    (!service.is_empty()).then_some(service)
}

/// One encoded resource as it goes into responses, shared by every stream
/// that is sent it.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    pub any: Any,
}

impl Resource {
    fn new<M: Message + prost::Name>(name: &str, message: &M) -> Arc<Resource> {
        Arc::new(Resource {
            name: name.into(),
            any: any(message),
        })
    }

    /// The same content (the same build, or equal bytes).
    pub fn same(a: &Arc<Resource>, b: &Arc<Resource>) -> bool {
        Arc::ptr_eq(a, b) || a == b
    }
}

fn any<M: Message + prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// How clients balance a service's calls, from the service's balancer where
/// gRPC has one like it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Least request, or round robin where the client has none.
    LeastRequest,
    /// A ring hash on a request header, or (`None`) on the client's channel,
    /// so one client keeps one endpoint.
    RingHash { header: Option<String> },
}

/// Each service's policy (from the proxy's routes, set by the agent at start
/// and reload), and the default for the rest.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub default: LbPolicy,
    pub services: HashMap<String, LbPolicy>,
}

impl Policies {
    pub fn of(&self, service: &str) -> &LbPolicy {
        self.services.get(service).unwrap_or(&self.default)
    }
}

/// Listeners and Clusters built once per (name, policy) and shared by every
/// stream; rebuilt only when the policy of their service changes.
/// Shapes by resource name, each with the policy it was built for.
type Built = HashMap<Arc<str>, (LbPolicy, Arc<Resource>)>;

#[derive(Default)]
pub(crate) struct Shapes {
    listeners: Mutex<Built>,
    clusters: Mutex<Built>,
}

impl Shapes {
    pub(crate) fn listener(&self, name: &str, service: &str, policy: &LbPolicy) -> Arc<Resource> {
        cached(&self.listeners, name, policy, || {
            listener(name, service, policy)
        })
    }

    pub(crate) fn cluster(&self, name: &str, policy: &LbPolicy) -> Arc<Resource> {
        cached(&self.clusters, name, policy, || cluster(name, policy))
    }

    /// Forgets shapes no stream holds any more.
    pub(crate) fn sweep(&self) {
        for map in [&self.listeners, &self.clusters] {
            map.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, (_, r)| Arc::strong_count(r) > 1);
        }
    }
}

fn cached(
    map: &Mutex<Built>,
    name: &str,
    policy: &LbPolicy,
    build: impl FnOnce() -> Arc<Resource>,
) -> Arc<Resource> {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((p, r)) = map.get(name) {
        if p == policy {
            return r.clone();
        }
    }
    let built = build();
    map.insert(name.into(), (policy.clone(), built.clone()));
    built
}

/// An API listener for gRPC clients: an HTTP connection manager with the
/// route inline (no RDS round trip), any authority, the whole path space to
/// the service's cluster, and the router filter last.
fn listener(name: &str, service: &str, policy: &LbPolicy) -> Arc<Resource> {
    let hash_policy = match policy {
        LbPolicy::RingHash { header: Some(h) } => vec![HashPolicy {
            policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: h.clone(),
                regex_rewrite: None,
            })),
            terminal: false,
        }],
        LbPolicy::RingHash { header: None } => vec![HashPolicy {
            policy_specifier: Some(hash_policy::PolicySpecifier::FilterState(
                hash_policy::FilterState {
                    key: "io.grpc.channel_id".into(),
                },
            )),
            terminal: false,
        }],
        _ => Vec::new(),
    };
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(String::new())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(format!(
                "{CLUSTER_PREFIX}{service}"
            ))),
            hash_policy,
            ..Default::default()
        })),
        ..Default::default()
    };
    let routes = RouteConfiguration {
        name: service.into(),
        virtual_hosts: vec![VirtualHost {
            name: service.into(),
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = HttpConnectionManager {
        stat_prefix: service.into(),
        route_specifier: Some(RouteSpecifier::RouteConfig(routes)),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(
        name,
        &Listener {
            name: name.into(),
            api_listener: Some(ApiListener {
                api_listener: Some(any(&manager)),
            }),
            ..Default::default()
        },
    )
}

/// An EDS cluster over ADS. A policy other than round robin goes in
/// `load_balancing_policy` with round robin after it: a client takes the
/// first it supports, where an unknown `lb_policy` would refuse the response.
fn cluster(name: &str, policy: &LbPolicy) -> Arc<Resource> {
    let policy_entry = |name: &str, config: Any| load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(config),
        }),
    };
    let round_robin = || {
        policy_entry(
            "envoy.load_balancing_policies.round_robin",
            any(&RoundRobin::default()),
        )
    };
    let load_balancing_policy = match policy {
        LbPolicy::RoundRobin => None,
        LbPolicy::LeastRequest => Some(LoadBalancingPolicy {
            policies: vec![
                policy_entry(
                    "envoy.load_balancing_policies.least_request",
                    any(&LeastRequest::default()),
                ),
                round_robin(),
            ],
        }),
        LbPolicy::RingHash { .. } => Some(LoadBalancingPolicy {
            policies: vec![policy_entry(
                "envoy.load_balancing_policies.ring_hash",
                // XX_HASH (0), the only function gRPC accepts.
                any(&RingHash {
                    minimum_ring_size: Some(envoy_types::pb::google::protobuf::UInt64Value {
                        value: 1024,
                    }),
                    maximum_ring_size: Some(envoy_types::pb::google::protobuf::UInt64Value {
                        value: 8 * 1024 * 1024,
                    }),
                    ..Default::default()
                }),
            )],
        }),
    };
    Resource::new(
        name,
        &Cluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ConfigSource {
                    config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource {},
                    )),
                    resource_api_version: ApiVersion::V3 as i32,
                    ..Default::default()
                }),
                service_name: String::new(),
            }),
            connect_timeout: Some(PbDuration {
                seconds: 5,
                nanos: 0,
            }),
            load_balancing_policy,
            ..Default::default()
        },
    )
}

/// An assignment with no endpoints: a service unknown here, or with none
/// routable. Clients fail its calls at once instead of waiting.
pub(crate) fn empty_assignment(name: &str) -> Arc<Resource> {
    Resource::new(
        name,
        &ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        },
    )
}

/// One zone's endpoints of a chunk, encoded as `LocalityLbEndpoints`'s
/// repeated `lb_endpoints` field.
struct Zone {
    zone: Name,
    weight: u64,
    bytes: Vec<u8>,
}

/// A chunk's endpoints, encoded per zone, and the hash of each address in
/// them (to find an address that two chunks both hold).
pub struct XdsChunk {
    zones: Vec<Zone>,
    addresses: Vec<u64>,
}

/// A view's ClusterLoadAssignment.
pub struct XdsView {
    pub assignment: Arc<Resource>,
    /// Localities in it (none: no endpoint to send a call to).
    pub localities: usize,
}

/// Builds each view's assignment at publish time. Endpoints with an IP
/// address, a port and a weight: passing and warning ones `HEALTHY`,
/// draining ones `DRAINING` (kept for the calls under way, never picked for
/// a new one); critical and maintenance ones left out.
pub struct XdsDecorator {
    datacenter: Name,
}

impl XdsDecorator {
    pub fn new(datacenter: &str) -> XdsDecorator {
        XdsDecorator {
            datacenter: datacenter.into(),
        }
    }
}

/// The node meta key a node's zone is read from.
pub const ZONE_META: &str = "zone";

fn lb_endpoint(instance: &switchyard_catalog::Instance) -> Option<(LbEndpoint, IpAddr, u32)> {
    let health = match instance.state {
        EndpointState::Passing | EndpointState::Warning => HealthStatus::Healthy,
        EndpointState::Draining => HealthStatus::Draining,
        EndpointState::Critical | EndpointState::Maintenance => return None,
    };
    let weight = instance.weight();
    let port = instance.endpoint.port;
    let ip: IpAddr = instance.address().parse().ok()?;
    if weight == 0 || port == 0 {
        return None;
    }
    let endpoint = LbEndpoint {
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    Some((endpoint, ip, weight))
}

fn address_hash(ip: IpAddr, port: u16) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5157).hash_one((ip, port))
}

fn zone_of(instance: &switchyard_catalog::Instance) -> Name {
    match instance.node.meta.get(ZONE_META) {
        Some(zone) => zone.as_str().into(),
        None => "".into(),
    }
}

/// Encodes `instances` per zone, skipping an address already taken.
fn encode_zones<'a>(
    instances: impl Iterator<Item = &'a switchyard_catalog::Instance>,
    seen: &mut HashSet<u64>,
) -> (Vec<Zone>, Vec<u64>) {
    let mut zones: Vec<Zone> = Vec::new();
    let mut addresses = Vec::new();
    for instance in instances {
        let Some((endpoint, ip, weight)) = lb_endpoint(instance) else {
            continue;
        };
        let hash = address_hash(ip, instance.endpoint.port);
        if !seen.insert(hash) {
            continue;
        }
        addresses.push(hash);
        let zone = zone_of(instance);
        let at = match zones.iter().position(|z| z.zone == zone) {
            Some(at) => at,
            None => {
                zones.push(Zone {
                    zone,
                    weight: 0,
                    bytes: Vec::new(),
                });
                zones.len() - 1
            }
        };
        let z = &mut zones[at];
        z.weight += u64::from(weight);
        prost::encoding::message::encode(2, &endpoint, &mut z.bytes);
    }
    (zones, addresses)
}

impl ViewDecorator for XdsDecorator {
    type Chunk = XdsChunk;
    type Output = XdsView;

    fn decorate_chunk(
        &self,
        _view: &ViewHead<'_>,
        chunk: &Chunk,
        _key: ExtraKey<Self>,
    ) -> Arc<XdsChunk> {
        let (zones, mut addresses) = encode_zones(chunk.instances().iter(), &mut HashSet::new());
        addresses.sort_unstable();
        Arc::new(XdsChunk { zones, addresses })
    }

    fn decorate(
        &self,
        view: &ServiceView,
        _change: &ViewChange<'_>,
        key: ExtraKey<Self>,
    ) -> Arc<XdsView> {
        let name = format!("{CLUSTER_PREFIX}{}", view.name);
        let chunks: Vec<&XdsChunk> = view.chunks().iter().filter_map(|c| c.extra(key)).collect();
        let mut zones: Vec<(Name, u64, Vec<&[u8]>)> = Vec::new();
        if unique_addresses(&chunks) {
            for chunk in &chunks {
                for z in &chunk.zones {
                    match zones.iter_mut().find(|(name, ..)| *name == z.zone) {
                        Some((_, weight, parts)) => {
                            *weight += z.weight;
                            parts.push(&z.bytes);
                        }
                        None => zones.push((z.zone.clone(), z.weight, vec![&z.bytes])),
                    }
                }
            }
            let localities = zones.len();
            let assignment = self.assignment(&name, zones);
            return Arc::new(XdsView {
                assignment,
                localities,
            });
        }
        // Two chunks hold the same address (two records of one endpoint):
        // encoded again with each address once, as clients require.
        let (own, _) = encode_zones(view.instances(), &mut HashSet::new());
        let zones: Vec<_> = own
            .iter()
            .map(|z| (z.zone.clone(), z.weight, vec![&z.bytes[..]]))
            .collect();
        Arc::new(XdsView {
            localities: zones.len(),
            assignment: self.assignment(&name, zones),
        })
    }
}

fn unique_addresses(chunks: &[&XdsChunk]) -> bool {
    if chunks.len() < 2 {
        return true;
    }
    let total: usize = chunks.iter().map(|c| c.addresses.len()).sum();
    let mut seen = HashSet::with_capacity(total);
    chunks
        .iter()
        .flat_map(|c| c.addresses.iter())
        .all(|h| seen.insert(*h))
}

impl XdsDecorator {
    /// `ClusterLoadAssignment` bytes: the name, then this datacenter's
    /// localities at priority 0.
    fn assignment(&self, name: &str, zones: Vec<(Name, u64, Vec<&[u8]>)>) -> Arc<Resource> {
        let mut value = ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        }
        .encode_to_vec();
        append_localities(&mut value, &self.datacenter, 0, zones);
        Arc::new(Resource {
            name: name.into(),
            any: Any {
                type_url: Kind::Endpoints.type_url().into(),
                value,
            },
        })
    }
}

/// Appends to an assignment's bytes, per zone, a locality (`region`, the
/// zone) with its weight (the sum of its endpoints', never 0, the
/// priority's total within u32) at `priority`, and its endpoints.
fn append_localities(
    value: &mut Vec<u8>,
    region: &str,
    priority: u32,
    zones: Vec<(Name, u64, Vec<&[u8]>)>,
) {
    let cap = u64::from(u32::MAX) / (zones.len().max(1) as u64);
    for (zone, weight, parts) in zones {
        let head = LocalityLbEndpoints {
            locality: Some(Locality {
                region: region.to_string(),
                zone: zone.to_string(),
                ..Default::default()
            }),
            load_balancing_weight: Some(UInt32Value {
                value: u32::try_from(weight.clamp(1, cap)).unwrap_or(u32::MAX),
            }),
            priority,
            ..Default::default()
        }
        .encode_to_vec();
        let len = head.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, value);
        prost::encoding::encode_varint(len as u64, value);
        value.extend_from_slice(&head);
        for part in parts {
            value.extend_from_slice(part);
        }
    }
}

/// How many other datacenters' endpoints an assignment carries at most.
pub(crate) const FAILOVER_DEPTH: usize = 3;

/// A service's assignment with the failover datacenters' routable endpoints
/// after ours, each datacenter a priority of its own (numbered densely from
/// ours, or from 0 when we have none): gRPC moves calls to the next
/// priority when every endpoint of one fails. `local`: ours (none: not
/// registered here); `view`: our view, for the addresses already in it.
pub(crate) fn with_failover(
    name: &str,
    local: Option<&XdsView>,
    view: Option<&ServiceView>,
    key: ExtraKey<XdsDecorator>,
    remote: &[(String, Arc<ServiceView>)],
) -> Arc<Resource> {
    let mut value = match local {
        Some(local) => local.assignment.any.value.clone(),
        None => ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    };
    let mut seen: HashSet<u64> = view
        .into_iter()
        .flat_map(|v| v.chunks().iter().filter_map(|c| c.extra(key)))
        .flat_map(|c| c.addresses.iter().copied())
        .collect();
    let mut priority = u32::from(local.is_some_and(|l| l.localities > 0));
    for (dc, copy) in remote {
        let (zones, _) = encode_zones(copy.routable(), &mut seen);
        if zones.is_empty() {
            continue;
        }
        let zones = zones
            .iter()
            .map(|z| (z.zone.clone(), z.weight, vec![&z.bytes[..]]))
            .collect();
        append_localities(&mut value, dc, priority, zones);
        priority += 1;
    }
    Arc::new(Resource {
        name: name.into(),
        any: Any {
            type_url: Kind::Endpoints.type_url().into(),
            value,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use switchyard_registry::{
        Batch, Command, Decorators, Endpoint as Record, MemoryStore, Node, Registry,
        RegistryMetrics,
    };

    use super::*;

    /// A registry in memory whose views carry the decorator's output.
    fn registry() -> (Registry, ExtraKey<XdsDecorator>) {
        let mut decorators = Decorators::default();
        let key = decorators.add(Arc::new(XdsDecorator::new("dc1")));
        let metrics = Arc::new(RegistryMetrics::unregistered());
        let (registry, _writer) =
            Registry::start_with(MemoryStore::default(), metrics, decorators).expect("registry");
        (registry, key)
    }

    fn assignment(registry: &Registry, key: ExtraKey<XdsDecorator>) -> ClusterLoadAssignment {
        let snapshot = registry.snapshot();
        let view = snapshot.service("web").expect("web");
        let bytes = &view.extra(key).expect("decorated").assignment.any.value;
        ClusterLoadAssignment::decode(&bytes[..]).expect("a valid assignment")
    }

    /// (address:port, health, weight) of every endpoint, and each locality's
    /// (zone, weight, priority).
    type Flat = (Vec<(String, i32, u32)>, Vec<(String, u32, u32)>);

    fn flat(cla: &ClusterLoadAssignment) -> Flat {
        let mut endpoints = Vec::new();
        let mut localities = Vec::new();
        for l in &cla.endpoints {
            let locality = l.locality.clone().unwrap_or_default();
            assert_eq!(locality.region, "dc1");
            let weight = l.load_balancing_weight.as_ref().map_or(0, |w| w.value);
            localities.push((locality.zone, weight, l.priority));
            for e in &l.lb_endpoints {
                let Some(HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                    panic!("an endpoint without an address");
                };
                let Some(address::Address::SocketAddress(sa)) =
                    endpoint.address.as_ref().and_then(|a| a.address.clone())
                else {
                    panic!("not a socket address");
                };
                let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    panic!("no port");
                };
                let weight = e.load_balancing_weight.as_ref().map_or(0, |w| w.value);
                endpoints.push((format!("{}:{port}", sa.address), e.health_status, weight));
            }
        }
        endpoints.sort();
        localities.sort();
        (endpoints, localities)
    }

    #[tokio::test]
    async fn assignments_keep_the_rules_clients_hold_them_to() {
        let (registry, key) = registry();
        // 1,200 endpoints on 600 nodes in two zones: three chunks.
        let mut nodes = Vec::new();
        let mut endpoints = Vec::new();
        for n in 0..600 {
            let mut node = Node::new(format!("n{n:03}"), format!("10.0.{}.{}", n / 200, n % 200));
            let zone = if n % 2 == 0 { "a" } else { "b" };
            node.meta.insert(ZONE_META.to_string(), zone.to_string());
            nodes.push(node);
            for port in [80, 81] {
                let e = Record::new(format!("n{n:03}"), format!("e{n}-{port}"), "web", port);
                endpoints.push((e, Vec::new()));
            }
        }
        // Left out: a host name, a weight of 0, port 0; one address twice,
        // from nodes in different chunks.
        let mut named = Record::new("n001", "named", "web", 90);
        named.address = "host.example".into();
        let mut weightless = Record::new("n002", "weightless", "web", 91);
        weightless.weights.passing = 0;
        let portless = Record::new("n003", "portless", "web", 0);
        let mut twin = Record::new("n599", "twin", "web", 80);
        twin.address = "10.0.0.0".into();
        let mut heavy = Record::new("n004", "heavy", "web", 92);
        heavy.weights.passing = 7;
        for e in [named, weightless, portless, twin, heavy] {
            endpoints.push((e, Vec::new()));
        }
        let batch = Batch {
            nodes,
            endpoints,
            ..Batch::default()
        };
        registry.apply(Command::Batch(batch)).await.expect("batch");
        assert!(
            registry
                .snapshot()
                .service("web")
                .expect("web")
                .chunks()
                .len()
                >= 3
        );

        let (all, localities) = flat(&assignment(&registry, key));
        assert_eq!(all.len(), 1201, "1,200 + heavy; the rest left out");
        let unique: HashSet<&String> = all.iter().map(|(a, ..)| a).collect();
        assert_eq!(unique.len(), all.len(), "an address twice");
        assert!(all.iter().any(|e| *e == ("10.0.0.4:92".into(), 1, 7)));
        assert!(all
            .iter()
            .all(|(_, health, _)| *health == HealthStatus::Healthy as i32));
        assert_eq!(
            localities,
            [("a".into(), 601 + 6, 0), ("b".into(), 600, 0)],
            "per zone the sum of its weights, at priority 0"
        );

        // A drained node's endpoints are DRAINING; the assignment matches
        // one encoded from scratch.
        registry
            .apply(Command::Drain {
                node: "n300".into(),
                deadline_ms: None,
            })
            .await
            .expect("drain");
        let (all, _) = flat(&assignment(&registry, key));
        let draining: Vec<&String> = all
            .iter()
            .filter(|(_, h, _)| *h == HealthStatus::Draining as i32)
            .map(|(a, ..)| a)
            .collect();
        assert_eq!(draining, ["10.0.1.100:80", "10.0.1.100:81"]);
        let snapshot = registry.snapshot();
        let view = snapshot.service("web").expect("web");
        let (own, _) = encode_zones(view.instances(), &mut HashSet::new());
        let scratch = XdsDecorator::new("dc1").assignment(
            "svc/web",
            own.iter()
                .map(|z| (z.zone.clone(), z.weight, vec![&z.bytes[..]]))
                .collect(),
        );
        let scratch = ClusterLoadAssignment::decode(&scratch.any.value[..]).expect("decodes");
        assert_eq!(flat(&scratch), flat(&assignment(&registry, key)));
    }

    #[tokio::test]
    async fn failover_datacenters_are_dense_lower_priorities() {
        let (registry, key) = registry();
        let mut endpoints = Vec::new();
        for (service, n) in [("web", 2), ("dc2-web", 3), ("dc3-web", 1)] {
            for i in 0..n {
                let mut e = Record::new("n1", format!("{service}-{i}"), service, 80 + i);
                // web and dc2-web share 10.9.0.1:80 and 10.9.0.2:81.
                let net = if service == "dc3-web" { 3 } else { 0 };
                e.address = format!("10.9.{net}.{}", i + 1);
                endpoints.push((e, Vec::new()));
            }
        }
        let batch = Batch {
            nodes: vec![Node::new("n1", "10.0.0.1")],
            endpoints,
            ..Batch::default()
        };
        registry.apply(Command::Batch(batch)).await.expect("batch");
        let snapshot = registry.snapshot();
        let web = snapshot.service("web").expect("web");
        let remote = [
            (
                "dc2".to_string(),
                snapshot.service("dc2-web").expect("dc2").clone(),
            ),
            (
                "dc3".to_string(),
                snapshot.service("dc3-web").expect("dc3").clone(),
            ),
        ];
        let priorities = |cla: &ClusterLoadAssignment| -> Vec<(String, u32, usize)> {
            cla.endpoints
                .iter()
                .map(|l| {
                    let region = l.locality.clone().unwrap_or_default().region;
                    (region, l.priority, l.lb_endpoints.len())
                })
                .collect()
        };
        let ours = web.extra(key).expect("decorated");
        let with = with_failover("svc/web", Some(ours), Some(web), key, &remote);
        let cla = ClusterLoadAssignment::decode(&with.any.value[..]).expect("decodes");
        // dc2's 10.9.0.1:80 and :81 are ours already: left out there.
        assert_eq!(
            priorities(&cla),
            [
                ("dc1".into(), 0, 2),
                ("dc2".into(), 1, 1),
                ("dc3".into(), 2, 1)
            ]
        );
        // Nothing of ours: the first datacenter with endpoints is priority 0.
        let with = with_failover("svc/web", None, None, key, &remote);
        let cla = ClusterLoadAssignment::decode(&with.any.value[..]).expect("decodes");
        assert_eq!(cla.cluster_name, "svc/web");
        assert_eq!(
            priorities(&cla),
            [("dc2".into(), 0, 3), ("dc3".into(), 1, 1)]
        );
    }
}
