//! The decorator that builds each routed service's backend list at publish
//! time, in the registry's writer (`ProxyDecorator`), what a view then holds
//! for the proxy (`ProxyService`), and the proxy's answer to the registry's
//! question of live load (drain status, the dashboard).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_catalog::{
    BusyEndpoint, Chunk, EndpointLoad, ExtraKey, Instance, LoadReport, Name, RateSeen, ServiceLoad,
    ServiceView, ViewChange, ViewDecorator, ViewHead,
};

use crate::balance::{Backend, BackendChunk, Backends};
use crate::config::{Config, TcpConfig};
use crate::metrics::ProxyMetrics;
use crate::route::{TagRoute, TAG_PREFIX};
use crate::shared::{ReloadPlan, ServiceEntry, Shared};
use crate::split::SubsetBackends;
use crate::stats::{now_ns, EndpointStats, ServiceStats};

/// What the proxy keeps per view chunk (a decorator extra): the chunk's
/// endpoints' stats and its backends.
#[derive(Default)]
pub struct ProxyChunk {
    /// Every instance's stats, routable or not (drain status reads these).
    all: Box<[Arc<EndpointStats>]>,
    /// The routable endpoints with a usable address and a weight above 0.
    backends: Arc<BackendChunk>,
}

/// What the proxy keeps per service view (a decorator extra).
pub struct ProxyService {
    pub(crate) stats: Option<Arc<ServiceStats>>,
    /// The routable endpoints with a usable address and a weight above 0.
    pub(crate) backends: Backends,
    chunks: Box<[Arc<ProxyChunk>]>,
    /// Another datacenter's proxies (`via = "proxy"`): requests carry
    /// `x-switchyard-failover` with this, our datacenter's name.
    pub(crate) via: Option<Arc<str>>,
    /// The subsets split routes asked for, built at their first request.
    subsets: crate::split::Subsets,
}

impl ProxyService {
    /// `(node, endpoint id, requests in flight)` for every instance of the
    /// service, routable or not (what a drain waits on).
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, &str, i64)> {
        self.chunks
            .iter()
            .flat_map(|c| c.all.iter())
            .map(|s| (&*s.node, &*s.id, s.in_flight()))
    }

    fn empty() -> ProxyService {
        ProxyService {
            stats: None,
            backends: Backends::default(),
            chunks: Box::new([]),
            via: None,
            subsets: Default::default(),
        }
    }

    /// The view's backends carrying `tag` (a split's subset), built at the
    /// first request that asks and kept with the view.
    pub(crate) fn subset(&self, tag: &str) -> Arc<SubsetBackends> {
        if let Some(found) = self.subsets.load().iter().find(|s| *s.tag == *tag) {
            return found.clone();
        }
        let built = Arc::new(SubsetBackends::build(tag, &self.backends));
        let mut kept = built.clone();
        self.subsets.rcu(|list| {
            let mut list = (**list).clone();
            match list.iter().find(|s| *s.tag == *tag) {
                Some(other) => kept = other.clone(),
                None => list.push(built.clone()),
            }
            list
        });
        kept
    }

    /// Datacenter `dc`'s proxies as one service, for requests failing over
    /// through them from `ours` (its stats and metrics as `<dc>-proxies`).
    pub(crate) fn proxies(
        dc: &str,
        ours: &str,
        addrs: &[SocketAddr],
        metrics: &ProxyMetrics,
    ) -> ProxyService {
        let name = format!("{dc}-proxies");
        let backends = addrs
            .iter()
            .map(|addr| {
                let id = addr.to_string();
                Backend {
                    stats: Arc::new(EndpointStats::new(
                        id.as_str().into(),
                        dc.into(),
                        metrics.endpoint(&name, dc, &id),
                    )),
                    addr: *addr,
                    weight: 1,
                    endpoint: None,
                }
            })
            .collect();
        ProxyService {
            stats: Some(Arc::new(ServiceStats::new(
                name.as_str().into(),
                metrics.service(&name),
            ))),
            backends: Backends::new(backends),
            chunks: Box::new([]),
            via: Some(ours.into()),
            subsets: Default::default(),
        }
    }
}

/// Builds each routed service's `ProxyService` in the registry writer, so a
/// request that follows an API acknowledgment already sees the change.
pub struct ProxyDecorator {
    pub(crate) shared: Arc<Shared>,
    /// The decorator of another datacenter's copy: it decorates the
    /// services *ours* routes (by config or by their tags here), whatever
    /// the copy's own tags say; DNS-only copies get no stats.
    ours: Option<Arc<Shared>>,
    /// The value of every service no route names, and of its chunks.
    empty: Arc<ProxyService>,
    empty_chunk: Arc<ProxyChunk>,
}

impl ProxyDecorator {
    pub fn new(config: Config, tcp: TcpConfig, metrics: Arc<ProxyMetrics>) -> ProxyDecorator {
        ProxyDecorator {
            shared: Arc::new(Shared::new(config, tcp, metrics)),
            ours: None,
            empty: Arc::new(ProxyService::empty()),
            empty_chunk: Arc::new(ProxyChunk::default()),
        }
    }

    /// The decorator of another datacenter's copy (registered at the same
    /// position as ours, so `ExtraKey`s agree): the services `ours` routes
    /// get backends, with stats of their own.
    pub fn for_copies(ours: &ProxyDecorator) -> ProxyDecorator {
        ProxyDecorator {
            ours: Some(ours.shared.clone()),
            ..ProxyDecorator::new(
                Config::default(),
                TcpConfig::default(),
                ours.shared.metrics.clone(),
            )
        }
    }

    /// Where services fail over to: other datacenters' copies, decorated by
    /// `for_copies` decorators.
    pub fn fail_over_to(&self, elsewhere: Arc<dyn switchyard_catalog::Elsewhere>) {
        let _ = self.shared.elsewhere.set(elsewhere);
    }

    /// Checks a new configuration against the running one (see
    /// `Shared::plan_reload`).
    pub fn plan_reload(&self, http: Config, tcp: TcpConfig) -> Result<ReloadPlan, String> {
        self.shared.plan_reload(http, tcp)
    }

    /// First step of a reload (see `Shared::begin_reload`).
    pub fn begin_reload(&self, plan: &ReloadPlan) {
        self.shared.begin_reload(plan)
    }

    /// Second step of a reload (see `Shared::finish_reload`).
    pub fn finish_reload(&self, plan: ReloadPlan) {
        self.shared.finish_reload(plan)
    }
}

impl ProxyDecorator {
    /// Every route (API, config and tags) in precedence order: where it
    /// came from, its host, prefix and service, and the route that takes
    /// its requests when another holds the same host and prefix.
    pub fn routes_json(&self) -> serde_json::Value {
        let table = self.shared.routes.load();
        let routes: Vec<serde_json::Value> = table
            .listing()
            .iter()
            .map(|l| {
                serde_json::json!({
                    "name": &*l.name,
                    "source": l.source.label(),
                    "host": &*l.host,
                    "path_prefix": &*l.path_prefix,
                    "service": &*l.service,
                    "shadowed_by": l.shadowed_by.as_deref(),
                })
            })
            .collect();
        serde_json::Value::Array(routes)
    }

    /// The proxy's live per-endpoint counts, for the registry's drain status.
    pub fn load_report(&self) -> Arc<dyn LoadReport> {
        Arc::new(ProxyLoad {
            shared: self.shared.clone(),
        })
    }
}

struct ProxyLoad {
    shared: Arc<Shared>,
}

impl LoadReport for ProxyLoad {
    fn endpoint_load(&self, service: &str, node: &str, id: &str) -> EndpointLoad {
        let Ok(services) = self.shared.services.lock() else {
            return EndpointLoad::default();
        };
        let Some(stats) = services
            .get(service)
            .and_then(|entry| entry.endpoints.get(&(Name::from(node), Name::from(id))))
        else {
            return EndpointLoad::default();
        };
        let requests = stats.metrics.by_class.iter().map(|c| c.get()).sum();
        EndpointLoad {
            in_flight: u64::try_from(stats.in_flight()).unwrap_or(0),
            cut: stats.cut.load(Ordering::Relaxed),
            ejected: stats.is_ejected(now_ns()),
            failures: stats.failures.load(Ordering::Relaxed),
            requests,
            latency_us: if requests == 0 { 0 } else { stats.ewma_us() },
        }
    }

    fn busy(&self) -> Vec<BusyEndpoint> {
        let Ok(services) = self.shared.services.lock() else {
            return Vec::new();
        };
        let mut busy = Vec::new();
        for (service, entry) in services.iter() {
            for ((node, id), stats) in &entry.endpoints {
                let in_flight = u64::try_from(stats.in_flight()).unwrap_or(0);
                let cut = stats.cut.load(Ordering::Relaxed);
                if in_flight > 0 || cut > 0 {
                    busy.push(BusyEndpoint {
                        service: service.clone(),
                        node: node.clone(),
                        id: id.clone(),
                        in_flight,
                        cut,
                    });
                }
            }
        }
        busy
    }

    fn service_load(&self, service: &str) -> Option<ServiceLoad> {
        let services = self.shared.services.lock().ok()?;
        let entry = services.get(service)?;
        Some(ServiceLoad {
            fail_open: entry.stats.is_fail_open(),
        })
    }

    fn rates_seen(&self) -> Vec<RateSeen> {
        let routes = self.shared.routes.load();
        routes
            .limiters()
            .filter(|(_, l)| l.config.scope == crate::limit::Scope::Cluster)
            .map(|(route, l)| RateSeen {
                route: route.into(),
                seen: l.take_seen(),
                agents: 1,
            })
            .collect()
    }

    fn share_rates(&self, others: &[RateSeen]) {
        let routes = self.shared.routes.load();
        for (route, limiter) in routes.limiters() {
            if limiter.config.scope != crate::limit::Scope::Cluster {
                continue;
            }
            match others.iter().find(|o| &*o.route == route) {
                Some(o) => limiter.share_with(o.seen, o.agents),
                None => limiter.share_with(0, 0),
            }
        }
    }
}

/// An instance's place in its view.
fn instance_key(i: &Instance) -> (&str, &str) {
    (&i.endpoint.node, &i.endpoint.id)
}

/// The very same records (the writer reuses an instance whose node did not
/// change): its published state stands.
fn same_instance(a: &Instance, b: &Instance) -> bool {
    Arc::ptr_eq(&a.endpoint, &b.endpoint)
        && Arc::ptr_eq(&a.node, &b.node)
        && Arc::ptr_eq(&a.checks, &b.checks)
}

impl ProxyDecorator {
    /// Whether a config route, an L4 listener or the service's own tags
    /// route traffic to it.
    fn routed(&self, name: &str, tag_route: &Option<TagRoute>) -> bool {
        match &self.ours {
            // A copy (its names in lower case): routed when ours routes it,
            // by config or by tags here.
            Some(ours) => {
                ours.configured
                    .load()
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(name))
                    || ours
                        .services
                        .lock()
                        .is_ok_and(|services| services.keys().any(|s| s.eq_ignore_ascii_case(name)))
            }
            None => tag_route.is_some() || self.shared.configured.load().contains(name),
        }
    }
}

/// Built per chunk (the chunk's endpoints' stats, found again by key so
/// that counters survive, and its backends), then per view from the chunks:
/// a change costs the chunks it touched.
impl ViewDecorator for ProxyDecorator {
    type Chunk = ProxyChunk;
    type Output = ProxyService;

    fn basis(&self, view: &ViewHead<'_>) -> u64 {
        let tag_route = TagRoute::from_tags(view.tags_from(TAG_PREFIX));
        u64::from(self.routed(view.name, &tag_route))
    }

    fn kv_changed(&self, kv: &switchyard_catalog::kv::Kv) -> Vec<Name> {
        match self.ours {
            // Another datacenter's copy: its KV holds none of our routes.
            Some(_) => Vec::new(),
            None => self.shared.api_routes_changed(kv),
        }
    }

    fn decorate_chunk(
        &self,
        view: &ViewHead<'_>,
        chunk: &Chunk,
        key: ExtraKey<ProxyDecorator>,
    ) -> Arc<ProxyChunk> {
        let shared = &self.shared;
        if self.basis(view) == 0 {
            return self.empty_chunk.clone();
        }
        let Ok(services) = shared.services.lock() else {
            return self.empty_chunk.clone();
        };
        let known = services.get(view.name).map(|entry| &entry.endpoints);
        // The replaced chunks' instances and stats, walked beside this
        // chunk's (both sorted by node, id): most are found there, with no
        // lookup in the service's map of every endpoint.
        let first = chunk.instances().first().map(instance_key);
        let from = view
            .replaced
            .partition_point(|c| c.instances().last().map(instance_key) < first);
        let mut before = view.replaced[from..]
            .iter()
            .filter_map(|c| Some(c.instances().iter().zip(c.extra(key)?.all.iter())))
            .flatten()
            .peekable();
        let mut all = Vec::with_capacity(chunk.instances().len());
        for instance in chunk.instances() {
            let at = instance_key(instance);
            while before.next_if(|(i, _)| instance_key(i) < at).is_some() {}
            if let Some((old, stats)) = before.next_if(|(i, _)| instance_key(i) == at) {
                if !same_instance(old, instance) {
                    stats.publish_state(instance);
                }
                all.push(stats.clone());
                continue;
            }
            let key = (instance.node.name.clone(), instance.endpoint.id.clone());
            let stats = known.and_then(|k| k.get(&key)).cloned().unwrap_or_else(|| {
                let stats = EndpointStats::new(
                    key.1.clone(),
                    key.0.clone(),
                    shared.metrics.endpoint(view.name, &key.0, &key.1),
                );
                // New to a service the proxy already routes: slow start
                // (the endpoints of a service's first view start level).
                if known.is_some() {
                    stats.start_ramp();
                }
                Arc::new(stats)
            });
            stats.publish_state(instance);
            all.push(stats);
        }
        drop(services);
        let mut backends = Vec::with_capacity(chunk.routable().len());
        for &pos in chunk.routable() {
            let instance = &chunk.instances()[pos as usize];
            let weight = instance.weight();
            let Ok(ip) = instance.address().parse::<IpAddr>() else {
                tracing::debug!(service = %view.name, endpoint = %instance.endpoint.id,
                    address = instance.address(), "endpoint address is not an IP; the proxy skips it");
                continue;
            };
            if weight == 0 || instance.endpoint.port == 0 {
                continue;
            }
            backends.push(Backend {
                stats: all[pos as usize].clone(),
                addr: SocketAddr::new(ip, instance.endpoint.port),
                weight,
                endpoint: Some(instance.endpoint.clone()),
            });
        }
        Arc::new(ProxyChunk {
            all: all.into_boxed_slice(),
            backends: Arc::new(BackendChunk::new(backends)),
        })
    }

    fn decorate(
        &self,
        view: &ServiceView,
        change: &ViewChange<'_>,
        key: ExtraKey<ProxyDecorator>,
    ) -> Arc<ProxyService> {
        let shared = &self.shared;
        let tag_route = TagRoute::from_tags(view.tags_from(TAG_PREFIX));
        let routed = self.routed(&view.name, &tag_route);
        let Ok(mut services) = shared.services.lock() else {
            return self.empty.clone();
        };
        if !routed {
            if let Some(old) = services.remove(&view.name) {
                shared.forget(&view.name, &old);
                if old.tag_route.is_some() {
                    shared.compile_routes(&services);
                }
            }
            return self.empty.clone();
        }
        let entry = services
            .entry(view.name.clone())
            .or_insert_with(|| ServiceEntry {
                stats: Arc::new(ServiceStats::new(
                    view.name.clone(),
                    shared.metrics.service(&view.name),
                )),
                endpoints: foldhash::HashMap::default(),
                tag_route: None,
            });
        // The endpoints of the replaced chunks leave the map, those of the
        // new ones enter it; whoever is in neither any more is forgotten.
        // Most are the same stats in both (found again by key): only the
        // others touch the map.
        let proxied = |chunk: &Arc<Chunk>| chunk.extra_arc(key);
        let stats_of = |chunks: &[Arc<Chunk>]| -> Vec<Arc<EndpointStats>> {
            let mut list: Vec<_> = (chunks.iter().filter_map(&proxied))
                .flat_map(|c| c.all.to_vec())
                .collect();
            list.sort_unstable_by_key(Arc::as_ptr);
            list
        };
        let (before, after) = (stats_of(change.removed), stats_of(change.added));
        let kept = |list: &[Arc<EndpointStats>], s: &Arc<EndpointStats>| {
            list.binary_search_by_key(&Arc::as_ptr(s), Arc::as_ptr)
                .is_ok()
        };
        for stats in before.iter().filter(|s| !kept(&after, s)) {
            let key = (stats.node.clone(), stats.id.clone());
            if entry
                .endpoints
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, stats))
            {
                entry.endpoints.remove(&key);
                shared.metrics.forget_endpoint(&view.name, &key.0, &key.1);
            }
        }
        for stats in after.iter().filter(|s| !kept(&before, s)) {
            let key = (stats.node.clone(), stats.id.clone());
            entry.endpoints.insert(key, stats.clone());
        }
        let stats = entry.stats.clone();
        if entry.tag_route != tag_route {
            entry.tag_route = tag_route;
            shared.compile_routes(&services);
        }
        drop(services);
        let chunks: Box<[Arc<ProxyChunk>]> = view
            .chunks()
            .iter()
            .map(|c| proxied(c).unwrap_or_else(|| self.empty_chunk.clone()))
            .collect();
        Arc::new(ProxyService {
            stats: Some(stats),
            backends: Backends::of(chunks.iter().map(|c| c.backends.clone())),
            chunks,
            via: None,
            subsets: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests;
