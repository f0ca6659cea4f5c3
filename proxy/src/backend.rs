//! Per-endpoint and per-service runtime state, and the decorator that builds
//! each routed service's backend list at publish time.
//!
//! State that must outlive one view (in-flight counts, latency estimates,
//! failure streaks, ejections, metric handles) lives in `EndpointStats` and
//! `ServiceStats`, created when an endpoint or service first appears and found
//! again by key when the next view is built. Requests touch only atomics.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use switchyard_catalog::{
    unix_ms, BusyEndpoint, EndpointLoad, EndpointState, HealthReports, Instance, LoadReport, Name,
    ServiceLoad, ServiceView, Snapshot, ViewDecorator,
};

use crate::balance::Ring;
use crate::config::{Config, OutlierConfig, TcpConfig};
use crate::metrics::{EndpointMetrics, ProxyMetrics, ServiceMetrics};
use crate::route::{RouteTable, TagRoute};

/// Nanoseconds since the first call: a cheap monotonic clock for atomics.
pub(crate) fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Decay time of the peak-EWMA latency estimate.
const EWMA_DECAY_NS: f64 = 1e9;
/// Latency assumed for an endpoint not measured yet (it is tried soon, not flooded).
const EWMA_INITIAL_NS: f64 = 1e6;

/// Runtime state of one endpoint, shared by every proxy thread.
pub(crate) struct EndpointStats {
    pub(crate) id: Name,
    pub(crate) node: Name,
    pub(crate) metrics: EndpointMetrics,
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    failures: AtomicU32,
    ejected_until_ns: AtomicU64,
    ejections: AtomicU32,
    /// Set at publish time when the endpoint leaves the routable set (drain,
    /// maintenance, critical), before the snapshot that says so is visible.
    withdrawn: AtomicBool,
    /// Start and deadline (Unix ms, 0 = none) of the drain it is under.
    drain_since_ms: AtomicU64,
    drain_deadline_ms: AtomicU64,
    /// Wakes long-lived connections when the drain deadline changes.
    drain_changed: tokio::sync::Notify,
    /// Long-lived connections closed at the deadline since the drain began.
    cut: AtomicU64,
    /// When the current run of failures got it ejected (0 = not failing):
    /// what the passive reporter looks at.
    failing_since_ns: AtomicU64,
    /// Its last response had a body long enough to splice.
    large_responses: AtomicBool,
}

impl EndpointStats {
    pub(crate) fn new(id: Name, node: Name, metrics: EndpointMetrics) -> EndpointStats {
        EndpointStats {
            id,
            node,
            metrics,
            ewma_ns: AtomicU64::new(EWMA_INITIAL_NS.to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            withdrawn: AtomicBool::new(false),
            drain_since_ms: AtomicU64::new(0),
            drain_deadline_ms: AtomicU64::new(0),
            drain_changed: tokio::sync::Notify::new(),
            cut: AtomicU64::new(0),
            failing_since_ns: AtomicU64::new(0),
            large_responses: AtomicBool::new(false),
        }
    }

    /// Since when the endpoint has been failing without a success (ns on
    /// `now_ns`'s clock), if it is.
    pub(crate) fn failing_since(&self) -> Option<u64> {
        match self.failing_since_ns.load(Ordering::Relaxed) {
            0 => None,
            since => Some(since),
        }
    }

    /// Forgets the failing run (a report was withdrawn: new evidence needed).
    pub(crate) fn reset_failing(&self) {
        self.failing_since_ns.store(0, Ordering::Relaxed);
    }

    pub(crate) fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// Counts a request or connection to this endpoint; false (and nothing
    /// counted) when the endpoint was withdrawn after the caller's snapshot.
    ///
    /// Pairs with `publish_state`: the count is made before the flag is read
    /// and the flag is set before the snapshot is published, so either this
    /// sees the flag, or a drain status read after the publish sees the count.
    pub(crate) fn enter(&self) -> bool {
        self.metrics.in_flight.inc();
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.withdrawn.load(Ordering::Relaxed) {
            self.metrics.in_flight.dec();
            return false;
        }
        true
    }

    pub(crate) fn leave(&self) {
        self.metrics.in_flight.dec();
    }

    pub(crate) fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Relaxed)
    }

    /// Records the endpoint's routability and drain at publish time.
    fn publish_state(&self, instance: &Instance) {
        self.withdrawn
            .store(!instance.is_routable(), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        let since = [&instance.node.drain, &instance.endpoint.drain]
            .into_iter()
            .flatten()
            .map(|d| d.since_ms)
            .max()
            .unwrap_or(0);
        if since != 0 && self.drain_since_ms.swap(since, Ordering::Relaxed) != since {
            self.cut.store(0, Ordering::Relaxed);
        }
        let deadline = instance.drain_deadline_ms().unwrap_or(0);
        if self.drain_deadline_ms.swap(deadline, Ordering::Release) != deadline {
            self.drain_changed.notify_waiters();
        }
    }

    /// Resolves when the endpoint's drain deadline has passed; pends while it
    /// has none. Long-lived connections select on it and close.
    pub(crate) async fn drain_deadline(&self) {
        loop {
            let changed = self.drain_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = self.drain_deadline_ms.load(Ordering::Acquire);
            if deadline == 0 {
                changed.await;
                continue;
            }
            let now = unix_ms();
            if now >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                _ = changed => {}
            }
        }
    }

    /// Counts a long-lived connection closed at the drain deadline.
    pub(crate) fn note_cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
        self.metrics.drain_cuts.inc();
        tracing::info!(endpoint = %self.id, node = %self.node, "connection closed at the drain deadline");
    }

    /// Peak-EWMA latency, decayed for the time since the last sample so an
    /// endpoint that was slow once gets tried again.
    pub(crate) fn latency_ns(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        ewma * (-age / EWMA_DECAY_NS).exp()
    }

    /// The last peak-EWMA estimate, undecayed (what the operator's view shows).
    pub(crate) fn ewma_us(&self) -> u64 {
        (f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) / 1e3) as u64
    }

    /// Whether its last response had a body long enough to splice: the
    /// next one's head is then read on its own, so that little of the body
    /// is copied through user space before the splice takes over.
    pub(crate) fn large_responses(&self) -> bool {
        self.large_responses.load(Ordering::Relaxed)
    }

    pub(crate) fn note_response(&self, large: bool) {
        // Written only on a change: the line stays shared between threads.
        if self.large_responses.load(Ordering::Relaxed) != large {
            self.large_responses.store(large, Ordering::Relaxed);
        }
    }

    /// Folds in one response time: a slower sample replaces the estimate at
    /// once (the "peak"), a faster one pulls it down gradually.
    pub(crate) fn observe(&self, rtt_ns: u64, now: u64) {
        let rtt = rtt_ns as f64;
        let old = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        let next = if rtt > old {
            rtt
        } else {
            let w = (-age / EWMA_DECAY_NS).exp();
            old * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) > now
    }

    pub(crate) fn succeeded(&self, now: u64) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.failing_since_ns.load(Ordering::Relaxed) != 0 {
            self.failing_since_ns.store(0, Ordering::Relaxed);
        }
        // A success after the ejection has ended settles the endpoint: its
        // next ejection starts from the base time again.
        if self.ejections.load(Ordering::Relaxed) != 0 {
            let until = self.ejected_until_ns.load(Ordering::Relaxed);
            if until != 0 && now > until {
                self.ejections.store(0, Ordering::Relaxed);
                self.ejected_until_ns.store(0, Ordering::Relaxed);
                self.metrics.ejected.set(0);
            }
        }
    }

    /// Counts a failure; ejects the endpoint when the streak reaches the
    /// threshold and the service's cap allows. Returns whether the cap
    /// refused an ejection (the service is then failing open).
    pub(crate) fn failed(
        &self,
        now: u64,
        outlier: &OutlierConfig,
        service: &ServiceStats,
        peers: &[Backend],
    ) -> bool {
        let streak = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0
            || streak < outlier.consecutive_failures
            || self.is_ejected(now)
        {
            return false;
        }
        let ejected = peers.iter().filter(|b| b.stats.is_ejected(now)).count();
        let cap = peers.len() * outlier.max_ejected_percent as usize / 100;
        if ejected > 0 && ejected + 1 > cap {
            service.set_fail_open(
                true,
                &format!(
                    "{} of {} endpoints already ejected; {} keeps failing",
                    ejected,
                    peers.len(),
                    self.id
                ),
            );
            return true;
        }
        let round = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let time = outlier
            .base_ejection
            .saturating_mul(1 << round)
            .min(outlier.max_ejection);
        let until = now.saturating_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until_ns.store(until, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        let _ = self.failing_since_ns.compare_exchange(
            0,
            now.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.metrics.ejections.inc();
        self.metrics.ejected.set(1);
        tracing::warn!(
            service = %service.name, endpoint = %self.id, node = %self.node,
            failures = streak, ejected_for = ?time,
            "endpoint ejected by outlier detection"
        );
        false
    }
}

/// Runtime state of one routed service.
pub(crate) struct ServiceStats {
    pub(crate) name: Name,
    pub(crate) metrics: ServiceMetrics,
    fail_open: AtomicBool,
    window_sec: AtomicU64,
    window_requests: AtomicU32,
    window_retries: AtomicU32,
}

impl ServiceStats {
    pub(crate) fn new(name: Name, metrics: ServiceMetrics) -> ServiceStats {
        ServiceStats {
            name,
            metrics,
            fail_open: AtomicBool::new(false),
            window_sec: AtomicU64::new(0),
            window_requests: AtomicU32::new(0),
            window_retries: AtomicU32::new(0),
        }
    }

    /// Enters or leaves fail-open, logging each transition once.
    pub(crate) fn set_fail_open(&self, on: bool, reason: &str) {
        if self.fail_open.load(Ordering::Relaxed) == on {
            return;
        }
        if self.fail_open.swap(on, Ordering::Relaxed) == on {
            return;
        }
        self.metrics.fail_open.set(i64::from(on));
        if on {
            tracing::warn!(service = %self.name, reason, "service is failing open: sending to endpoints that are failing");
        } else {
            tracing::info!(service = %self.name, "service left fail-open");
        }
    }

    pub(crate) fn is_fail_open(&self) -> bool {
        self.fail_open.load(Ordering::Relaxed)
    }

    fn window(&self, now: u64) {
        let sec = now / 1_000_000_000;
        let current = self.window_sec.load(Ordering::Relaxed);
        if current != sec
            && self
                .window_sec
                .compare_exchange(current, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.window_requests.store(0, Ordering::Relaxed);
            self.window_retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a first attempt toward the retry budget.
    pub(crate) fn note_request(&self, now: u64) {
        self.window(now);
        self.window_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget: `floor` per second plus `ratio` of
    /// this second's requests.
    pub(crate) fn take_retry(&self, now: u64, ratio: f64, floor: u32) -> bool {
        self.window(now);
        let requests = f64::from(self.window_requests.load(Ordering::Relaxed));
        let allowed = f64::from(floor) + requests * ratio;
        let used = self.window_retries.fetch_add(1, Ordering::Relaxed);
        if f64::from(used) < allowed {
            self.metrics.retries.inc();
            true
        } else {
            self.window_retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

/// One routable endpoint as the balancers see it.
pub(crate) struct Backend {
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
}

/// What the proxy keeps per service view (a decorator extra).
pub struct ProxyService {
    pub(crate) stats: Option<Arc<ServiceStats>>,
    /// The routable endpoints with a usable address and a weight above 0.
    pub(crate) backends: Box<[Backend]>,
    /// Every instance's stats, routable or not (drain status reads these).
    pub(crate) all: Box<[Arc<EndpointStats>]>,
    pub(crate) cursor: AtomicUsize,
    pub(crate) schedule: OnceLock<Box<[u32]>>,
    pub(crate) ring: OnceLock<Ring>,
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
            backends: Box::new([]),
            all: Box::new([]),
            cursor: AtomicUsize::new(0),
            schedule: OnceLock::new(),
            ring: OnceLock::new(),
        }
    }
}

struct ServiceEntry {
    stats: Arc<ServiceStats>,
    endpoints: HashMap<(Name, Name), Arc<EndpointStats>>,
    tag_route: Option<TagRoute>,
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
    /// Services named by a config route or L4 listener.
    configured: ArcSwap<HashSet<String>>,
    services: Mutex<HashMap<Name, ServiceEntry>>,
    empty: Arc<ProxyService>,
    /// Open connections per client address (only while a cap is set).
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// One client connection counted against `max_connections_per_client`;
/// released when dropped.
pub(crate) struct ClientSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.shared.clients.lock() {
            if let Some(open) = clients.get_mut(&self.ip) {
                *open -= 1;
                if *open == 0 {
                    clients.remove(&self.ip);
                }
            }
        }
    }
}

/// Counts a new connection from `ip` against `max` (0 = no cap): `Ok(None)`
/// when uncounted, `Ok(Some(slot))` when counted, `Err(())` when the client
/// is at its cap.
pub(crate) fn client_slot(
    shared: &Arc<Shared>,
    ip: IpAddr,
    max: usize,
) -> Result<Option<ClientSlot>, ()> {
    if max == 0 {
        return Ok(None);
    }
    let Ok(mut clients) = shared.clients.lock() else {
        return Ok(None);
    };
    let open = clients.entry(ip).or_insert(0);
    if *open >= max {
        return Err(());
    }
    *open += 1;
    Ok(Some(ClientSlot {
        shared: shared.clone(),
        ip,
    }))
}

/// The services a configuration routes to (HTTP routes and L4 listeners).
fn configured_services(config: &Config, tcp: &TcpConfig) -> HashSet<String> {
    config
        .routes
        .iter()
        .map(|r| r.service.clone())
        .chain(tcp.listeners.iter().map(|l| l.service.clone()))
        .collect()
}

impl Shared {
    fn compile_routes(&self, services: &HashMap<Name, ServiceEntry>) {
        let tags = services
            .iter()
            .filter_map(|(name, entry)| entry.tag_route.as_ref().map(|r| (name.clone(), r)));
        self.routes
            .store(Arc::new(RouteTable::compile(&self.config.load(), tags)));
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

    fn forget(&self, name: &str, entry: &ServiceEntry) {
        for (node, id) in entry.endpoints.keys() {
            self.metrics.forget_endpoint(name, node, id);
        }
        self.metrics.forget_service(name);
    }
}

/// Builds each routed service's `ProxyService` in the registry writer, so a
/// request that follows an API acknowledgment already sees the change.
pub struct ProxyDecorator {
    pub(crate) shared: Arc<Shared>,
}

impl ProxyDecorator {
    pub fn new(config: Config, tcp: TcpConfig, metrics: Arc<ProxyMetrics>) -> ProxyDecorator {
        let configured = configured_services(&config, &tcp);
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::compile(
            &config,
            std::iter::empty(),
        )));
        ProxyDecorator {
            shared: Arc::new(Shared {
                config: ArcSwap::from_pointee(config),
                tcp: ArcSwap::from_pointee(tcp),
                generation: AtomicU64::new(0),
                metrics,
                routes,
                configured: ArcSwap::from_pointee(configured),
                services: Mutex::new(HashMap::new()),
                empty: Arc::new(ProxyService::empty()),
                clients: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Checks a new configuration against the running one. Listener
    /// addresses and thread counts are bound at start: changing them needs a
    /// restart (or a binary upgrade), so such a reload is refused whole.
    pub fn plan_reload(&self, http: Config, tcp: TcpConfig) -> Result<ReloadPlan, String> {
        http.validate()?;
        tcp.validate()?;
        let old = self.shared.config.load();
        if http.tls != old.tls {
            return Err("http.tls changed: the HTTPS listener and its certificates need a restart (or an upgrade)".to_string());
        }
        if http.addr != old.addr
            || http.threads != old.threads
            || http.thread_policy != old.thread_policy
        {
            return Err("http.addr, http.threads and http.thread_policy are fixed while running (restart or upgrade to change them)".to_string());
        }
        let old_tcp = self.shared.tcp.load();
        let addrs = |t: &TcpConfig| t.listeners.iter().map(|l| l.addr).collect::<Vec<_>>();
        if addrs(&tcp) != addrs(&old_tcp) {
            return Err("tcp.listeners: adding, removing or moving a listener needs a restart (or an upgrade); settings of existing ones reload".to_string());
        }
        let before = self.shared.configured.load();
        let after = configured_services(&http, &tcp);
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
    pub fn begin_reload(&self, plan: &ReloadPlan) {
        let mut both = (**self.shared.configured.load()).clone();
        both.extend(plan.newly_routed.iter().map(|n| n.to_string()));
        self.shared.configured.store(Arc::new(both));
    }

    /// Second step: the new settings and routes take effect for the next
    /// request on every thread; services no longer routed should then have
    /// their views rebuilt (`no_longer_routed`) to release their state.
    pub fn finish_reload(&self, plan: ReloadPlan) {
        let shared = &self.shared;
        let configured = configured_services(&plan.http, &plan.tcp);
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

impl Shared {
    /// The endpoints failing since before `cutoff` (ns), with their service,
    /// node and id. Only those are cloned: a scan of a large catalog costs
    /// a pass over atomics.
    fn failing_before(&self, cutoff: u64) -> Vec<(Name, Name, Name, Arc<EndpointStats>)> {
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

/// Reports endpoints that keep failing to the registry as checks (see
/// `OutlierConfig::report`), withdraws each report after `report_hold` or
/// once the endpoint succeeds again. Runs until aborted.
pub async fn report_passive_failures(
    decorator: Arc<ProxyDecorator>,
    registry: Arc<dyn HealthReports>,
) {
    use switchyard_catalog::{Check, CheckDefinition, Status};
    let shared = decorator.shared.clone();
    let mut reported: HashMap<(Name, Name), (Arc<EndpointStats>, std::time::Instant)> =
        HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let outlier = shared.config.load().outlier.clone();
        let now = now_ns();
        if outlier.report != crate::config::PassiveReport::Off {
            let cutoff = now.saturating_sub(nanos(outlier.report_after));
            for (service, node, id, stats) in shared.failing_before(cutoff) {
                let key = (node.clone(), id.clone());
                let since = stats.failing_since().unwrap_or(now);
                if reported.contains_key(&key) {
                    continue;
                }
                let status = if outlier.report == crate::config::PassiveReport::Warning {
                    Status::Warning
                } else {
                    Status::Critical
                };
                let output = format!(
                    "the proxy has seen this endpoint fail for {:?} without a success ({} ejection(s) by outlier detection); withdrawn after {:?} so it is tried again",
                    Duration::from_nanos(now.saturating_sub(since)),
                    stats.ejections(),
                    outlier.report_hold,
                );
                let check = Check {
                    node: node.clone(),
                    id: format!("{PASSIVE_CHECK_PREFIX}{id}").into(),
                    name: "Proxy passive health".to_string(),
                    status,
                    notes: String::new(),
                    output,
                    service_id: id.to_string(),
                    service_name: service.to_string(),
                    kind: "passive".to_string(),
                    definition: CheckDefinition::default(),
                    status_since_ms: 0,
                    create_index: 0,
                    modify_index: 0,
                };
                match registry.report(check).await {
                    Ok(_) => {
                        tracing::warn!(service = %service, node = %node, endpoint = %id,
                            status = status.as_str(), "reported an endpoint that keeps failing to the registry");
                        reported.insert(key, (stats, std::time::Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, endpoint = %id, "cannot report a failing endpoint")
                    }
                }
            }
        }
        let hold = outlier.report_hold;
        let done: Vec<(Name, Name)> = reported
            .iter()
            .filter(|(_, (stats, at))| at.elapsed() >= hold || stats.failing_since().is_none())
            .map(|(key, _)| key.clone())
            .collect();
        for key in done {
            let Some((stats, _)) = reported.remove(&key) else {
                continue;
            };
            stats.reset_failing();
            let (node, id) = key;
            let check_id = format!("{PASSIVE_CHECK_PREFIX}{id}").into();
            if let Err(e) = registry.withdraw(node.clone(), check_id).await {
                tracing::debug!(error = %e, endpoint = %id, "cannot withdraw a passive report");
            } else {
                tracing::info!(node = %node, endpoint = %id, "withdrew the passive failure report; the endpoint is tried again");
            }
        }
    }
}

/// Check id prefix of passive-failure reports.
pub const PASSIVE_CHECK_PREFIX: &str = "_switchyard_passive:";

/// A checked configuration change (see `ProxyDecorator::plan_reload`).
pub struct ReloadPlan {
    pub newly_routed: Vec<Name>,
    pub no_longer_routed: Vec<Name>,
    http: Config,
    tcp: TcpConfig,
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
    type Output = ProxyService;

    fn decorate(&self, view: &ServiceView) -> Arc<ProxyService> {
        let shared = &self.shared;
        let tag_route = TagRoute::from_tags(&view.tags);
        let routed = tag_route.is_some() || shared.configured.load().contains(&*view.name);
        let Ok(mut services) = shared.services.lock() else {
            return shared.empty.clone();
        };
        if !routed {
            if let Some(old) = services.remove(&view.name) {
                shared.forget(&view.name, &old);
                if old.tag_route.is_some() {
                    shared.compile_routes(&services);
                }
            }
            return shared.empty.clone();
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
        let mut endpoints = HashMap::with_capacity(view.instances.len());
        let mut all = Vec::with_capacity(view.instances.len());
        for instance in &view.instances {
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
        let mut backends = Vec::with_capacity(view.routable.len());
        for &pos in &view.routable {
            let instance = &view.instances[pos as usize];
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
                stats: all[pos as usize].clone(),
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
            backends: backends.into_boxed_slice(),
            all: all.into_boxed_slice(),
            cursor: AtomicUsize::new(0),
            schedule: OnceLock::new(),
            ring: OnceLock::new(),
        })
    }
}

/// `Duration` to nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
