//! The decorator that builds each routed service's backend list at publish
//! time, in the registry's writer (`ProxyDecorator`), what a view then holds
//! for the proxy (`ProxyService`), and the proxy's answer to the registry's
//! question of live load (drain status, the dashboard).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_catalog::{
    BusyEndpoint, Chunk, EndpointLoad, EndpointState, LoadReport, Name, ServiceLoad, ServiceView,
    ViewChange, ViewDecorator, ViewHead,
};

use crate::balance::{Backend, Backends};
use crate::config::{Config, TcpConfig};
use crate::metrics::ProxyMetrics;
use crate::route::TagRoute;
use crate::shared::{ReloadPlan, ServiceEntry, Shared};
use crate::stats::{now_ns, EndpointStats, ServiceStats};

/// What the proxy keeps per service view (a decorator extra).
pub struct ProxyService {
    pub(crate) stats: Option<Arc<ServiceStats>>,
    /// The routable endpoints with a usable address and a weight above 0.
    pub(crate) backends: Backends,
    /// Every instance's stats, routable or not (drain status reads these).
    pub(crate) all: Box<[Arc<EndpointStats>]>,
}

impl ProxyService {
    /// `(node, endpoint id, requests in flight)` for every instance of the
    /// service, routable or not (what a drain waits on).
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, &str, i64)> {
        self.all.iter().map(|s| (&*s.node, &*s.id, s.in_flight()))
    }

    fn empty() -> ProxyService {
        ProxyService {
            stats: None,
            backends: Backends::default(),
            all: Box::new([]),
        }
    }
}

/// Builds each routed service's `ProxyService` in the registry writer, so a
/// request that follows an API acknowledgment already sees the change.
pub struct ProxyDecorator {
    pub(crate) shared: Arc<Shared>,
    /// The value of every service no route names.
    empty: Arc<ProxyService>,
}

impl ProxyDecorator {
    pub fn new(config: Config, tcp: TcpConfig, metrics: Arc<ProxyMetrics>) -> ProxyDecorator {
        ProxyDecorator {
            shared: Arc::new(Shared::new(config, tcp, metrics)),
            empty: Arc::new(ProxyService::empty()),
        }
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
}

impl ViewDecorator for ProxyDecorator {
    type Chunk = ();
    type Output = ProxyService;

    fn decorate_chunk(&self, _view: &ViewHead<'_>, _chunk: &Chunk) -> Arc<()> {
        Arc::new(())
    }

    fn decorate(&self, view: &ServiceView, _change: &ViewChange<'_>) -> Arc<ProxyService> {
        let shared = &self.shared;
        let tags: Vec<String> = view.tags().map(str::to_string).collect();
        let tag_route = TagRoute::from_tags(&tags);
        let routed = tag_route.is_some() || shared.configured.load().contains(&*view.name);
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
                endpoints: HashMap::new(),
                tag_route: None,
            });
        let mut endpoints = HashMap::with_capacity(view.len());
        let mut all = Vec::with_capacity(view.len());
        for instance in view.instances() {
            let key = (instance.node.name.clone(), instance.endpoint.id.clone());
            let stats = entry.endpoints.remove(&key).unwrap_or_else(|| {
                Arc::new(EndpointStats::new(
                    key.1.clone(),
                    key.0.clone(),
                    shared.metrics.endpoint(&view.name, &key.0, &key.1),
                ))
            });
            stats.publish_state(instance);
            all.push(stats.clone());
            endpoints.insert(key, stats);
        }
        for (node, id) in entry.endpoints.keys() {
            shared.metrics.forget_endpoint(&view.name, node, id);
        }
        entry.endpoints = endpoints;
        let mut backends = Vec::with_capacity(view.routable_len());
        let mut base = 0;
        let routable = view.chunks().iter().flat_map(|chunk| {
            let at = base;
            base += chunk.instances().len();
            chunk
                .routable()
                .iter()
                .map(move |&p| (at + p as usize, &chunk.instances()[p as usize]))
        });
        for (pos, instance) in routable {
            let weights = &instance.endpoint.weights;
            let weight = if instance.state == EndpointState::Warning {
                weights.warning
            } else {
                weights.passing
            };
            let Ok(ip) = instance.address().parse::<IpAddr>() else {
                tracing::debug!(service = %view.name, endpoint = %instance.endpoint.id,
                    address = instance.address(), "endpoint address is not an IP; the proxy skips it");
                continue;
            };
            if weight == 0 || instance.endpoint.port == 0 {
                continue;
            }
            backends.push(Backend {
                stats: all[pos].clone(),
                addr: SocketAddr::new(ip, instance.endpoint.port),
                weight,
            });
        }
        let stats = entry.stats.clone();
        if entry.tag_route != tag_route {
            entry.tag_route = tag_route;
            shared.compile_routes(&services);
        }
        Arc::new(ProxyService {
            stats: Some(stats),
            backends: Backends::new(backends),
            all: all.into_boxed_slice(),
        })
    }
}
