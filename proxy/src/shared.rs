//! The proxy's state shared by the decorator (in the registry's writer) and
//! the proxy threads: the settings and routes, every routed service's
//! long-lived stats, and the reload that swaps settings and routes while
//! requests run.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use switchyard_catalog::{Admission, Elsewhere, Name, Snapshot};

use crate::api_routes::ApiRoute;
use crate::config::{Config, TcpConfig};
use crate::metrics::ProxyMetrics;
use crate::route::{RouteTable, TagRoute};
use crate::stats::{EndpointStats, ServiceStats};

pub(crate) struct ServiceEntry {
    pub(crate) stats: Arc<ServiceStats>,
    /// By (node, id); foldhash: a write looks up every endpoint of the
    /// chunks it rebuilt.
    pub(crate) endpoints: foldhash::HashMap<(Name, Name), Arc<EndpointStats>>,
    pub(crate) tag_route: Option<TagRoute>,
}

/// State shared by the decorator (writer side) and the proxy threads.
pub(crate) struct Shared {
    /// The `[http]` and `[tcp]` tables; replaced by a reload. Proxy threads
    /// keep their own copies and refresh them when `generation` moves.
    pub(crate) config: ArcSwap<Config>,
    pub(crate) tcp: ArcSwap<TcpConfig>,
    pub(crate) generation: AtomicU64,
    pub(crate) metrics: Arc<ProxyMetrics>,
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    /// Services named by a config or API route or an L4 listener.
    pub(crate) configured: ArcSwap<HashSet<String>>,
    /// Routes managed through the API, as the KV store last had them, and
    /// the KV index of their prefix then.
    pub(crate) api_routes: ArcSwap<Vec<ApiRoute>>,
    pub(crate) api_index: AtomicU64,
    pub(crate) services: Mutex<HashMap<Name, ServiceEntry>>,
    /// Open client connections (HTTP, HTTPS and L4), in all and per client
    /// address: `max_connections` and `max_connections_per_client`.
    pub(crate) admission: Arc<Admission>,
    /// Other datacenters' copies, where services fail over (set once at
    /// start, when federation is wired).
    pub(crate) elsewhere: std::sync::OnceLock<Arc<dyn Elsewhere>>,
    /// Other datacenters' proxies as services (`via = "proxy"`), made at
    /// the first failover through them, by datacenter.
    pub(crate) via_proxies: ArcSwap<HashMap<String, Arc<crate::backend::ProxyService>>>,
}

/// The services a configuration and the API's routes send to (HTTP routes
/// and L4 listeners).
pub(crate) fn configured_services(
    config: &Config,
    tcp: &TcpConfig,
    api: &[ApiRoute],
) -> HashSet<String> {
    config
        .routes
        .iter()
        .map(|r| r.service.clone())
        .chain(api.iter().map(|r| r.route.service.clone()))
        .chain(tcp.listeners.iter().map(|l| l.service.clone()))
        .collect()
}

/// A route table with its rate limiters and split subsets counting into
/// `metrics`.
fn with_metrics(table: RouteTable, metrics: &ProxyMetrics) -> RouteTable {
    for (route, limiter) in table.limiters() {
        metrics.attach_limit(route, limiter);
    }
    for (route, split) in table.splits() {
        metrics.attach_split(route, split);
    }
    table
}

impl Shared {
    pub(crate) fn new(config: Config, tcp: TcpConfig, metrics: Arc<ProxyMetrics>) -> Shared {
        let configured = configured_services(&config, &tcp, &[]);
        let routes = Arc::new(ArcSwap::from_pointee(with_metrics(
            RouteTable::compile(&config, std::iter::empty()),
            &metrics,
        )));
        Shared {
            config: ArcSwap::from_pointee(config),
            tcp: ArcSwap::from_pointee(tcp),
            generation: AtomicU64::new(0),
            metrics,
            routes,
            configured: ArcSwap::from_pointee(configured),
            api_routes: ArcSwap::from_pointee(Vec::new()),
            api_index: AtomicU64::new(u64::MAX),
            services: Mutex::new(HashMap::new()),
            admission: Admission::new(),
            elsewhere: std::sync::OnceLock::new(),
            via_proxies: Default::default(),
        }
    }

    /// Takes the API's routes from the KV store when they changed: the
    /// routes are compiled again, and the services that gained or lost
    /// their only route are returned, to be decorated again.
    pub(crate) fn api_routes_changed(&self, kv: &switchyard_catalog::kv::Kv) -> Vec<Name> {
        let index = kv.prefix_index(switchyard_catalog::kv::ROUTES_PREFIX);
        if self.api_index.swap(index, Ordering::Relaxed) == index {
            return Vec::new();
        }
        self.api_routes
            .store(Arc::new(crate::api_routes::stored(kv)));
        let before = self.configured.load_full();
        let after = configured_services(
            &self.config.load(),
            &self.tcp.load(),
            &self.api_routes.load(),
        );
        let changed = before
            .symmetric_difference(&after)
            .map(|s| Name::from(s.as_str()))
            .collect();
        // Routes first: a service left unrouted is emptied only once no
        // route sends to it.
        if let Ok(services) = self.services.lock() {
            self.compile_routes(&services);
        }
        self.configured.store(Arc::new(after));
        changed
    }

    pub(crate) fn compile_routes(&self, services: &HashMap<Name, ServiceEntry>) {
        let tags = services
            .iter()
            .filter_map(|(name, entry)| entry.tag_route.as_ref().map(|r| (name.clone(), r)));
        let table = RouteTable::compile_after(
            &self.config.load(),
            &self.api_routes.load(),
            tags,
            &self.routes.load(),
        );
        self.routes
            .store(Arc::new(with_metrics(table, &self.metrics)));
    }

    /// Forgets services that left the catalog (the decorator is not called
    /// for a service that has no view any more).
    pub(crate) fn prune(&self, snapshot: &Snapshot) {
        let Ok(mut services) = self.services.lock() else {
            return;
        };
        let before = services.len();
        let mut routes_changed = false;
        services.retain(|name, entry| {
            if snapshot.service(name).is_some() {
                return true;
            }
            routes_changed |= entry.tag_route.is_some();
            self.forget(name, entry);
            false
        });
        if routes_changed {
            self.compile_routes(&services);
        }
        if services.len() != before {
            tracing::debug!(
                removed = before - services.len(),
                "proxy forgot services that left the catalog"
            );
        }
    }

    pub(crate) fn forget(&self, name: &str, entry: &ServiceEntry) {
        for (node, id) in entry.endpoints.keys() {
            self.metrics.forget_endpoint(name, node, id);
        }
        self.metrics.forget_service(name);
    }
}

impl Shared {
    /// The endpoints failing since before `cutoff` (ns), with their service,
    /// node and id. Only those are cloned: a scan of a large catalog costs
    /// a pass over atomics.
    pub(crate) fn failing_before(
        &self,
        cutoff: u64,
    ) -> Vec<(Name, Name, Name, Arc<EndpointStats>)> {
        let Ok(services) = self.services.lock() else {
            return Vec::new();
        };
        services
            .iter()
            .flat_map(|(service, entry)| {
                entry
                    .endpoints
                    .iter()
                    .filter(move |(_, stats)| stats.failing_since().is_some_and(|s| s <= cutoff))
                    .map(move |((node, id), stats)| {
                        (service.clone(), node.clone(), id.clone(), stats.clone())
                    })
            })
            .collect()
    }
}

/// A checked configuration change (see `Shared::plan_reload`).
pub struct ReloadPlan {
    pub newly_routed: Vec<Name>,
    pub no_longer_routed: Vec<Name>,
    http: Config,
    tcp: TcpConfig,
}

impl Shared {
    /// Checks a new configuration against the running one. Listener
    /// addresses and thread counts are bound at start: changing them needs a
    /// restart (or a binary upgrade), so such a reload is refused whole.
    pub(crate) fn plan_reload(&self, http: Config, tcp: TcpConfig) -> Result<ReloadPlan, String> {
        http.validate()?;
        tcp.validate()?;
        let old = self.config.load();
        if http.tls != old.tls {
            return Err("http.tls changed: the HTTPS listener and its certificates need a restart (or an upgrade)".to_string());
        }
        if http.addr != old.addr
            || http.threads != old.threads
            || http.thread_policy != old.thread_policy
        {
            return Err("http.addr, http.threads and http.thread_policy are fixed while running (restart or upgrade to change them)".to_string());
        }
        let old_tcp = self.tcp.load();
        let addrs = |t: &TcpConfig| t.listeners.iter().map(|l| l.addr).collect::<Vec<_>>();
        if addrs(&tcp) != addrs(&old_tcp) {
            return Err("tcp.listeners: adding, removing or moving a listener needs a restart (or an upgrade); settings of existing ones reload".to_string());
        }
        let before = self.configured.load();
        let after = configured_services(&http, &tcp, &self.api_routes.load());
        let names = |set: Vec<&String>| {
            let mut v: Vec<Name> = set.into_iter().map(|s| Name::from(s.as_str())).collect();
            v.sort();
            v
        };
        Ok(ReloadPlan {
            newly_routed: names(after.difference(&before).collect()),
            no_longer_routed: names(before.difference(&after).collect()),
            http,
            tcp,
        })
    }

    /// First step of a reload: services the new configuration routes become
    /// routed now, so their views can be rebuilt (`newly_routed`) before any
    /// route points at them.
    pub(crate) fn begin_reload(&self, plan: &ReloadPlan) {
        let mut both = (**self.configured.load()).clone();
        both.extend(plan.newly_routed.iter().map(|n| n.to_string()));
        self.configured.store(Arc::new(both));
    }

    /// Second step: the new settings and routes take effect for the next
    /// request on every thread; services no longer routed should then have
    /// their views rebuilt (`no_longer_routed`) to release their state.
    pub(crate) fn finish_reload(&self, plan: ReloadPlan) {
        let shared = self;
        let configured = configured_services(&plan.http, &plan.tcp, &self.api_routes.load());
        shared.config.store(Arc::new(plan.http));
        shared.tcp.store(Arc::new(plan.tcp));
        shared.generation.fetch_add(1, Ordering::Release);
        if let Ok(services) = shared.services.lock() {
            shared.compile_routes(&services);
        }
        // Only once no route names them: a view rebuilt in between would
        // otherwise empty a service the old routes still send requests to.
        shared.configured.store(Arc::new(configured));
    }
}
