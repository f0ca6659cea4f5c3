//! Local copies of other datacenters' services and nodes, for DNS (and the
//! proxy's failover, later): each datacenter's copy is a catalog of its own
//! (an in-memory registry with the same decorators as ours), holding only
//! what was asked for. A copy is made at the first ask and kept current by
//! one blocking query per datacenter for all its names
//! (`/v1/switchyard/watch` on the remote agent: one connection, however many
//! names), asked again at once when a name is added; so a remote change is in
//! the copy as soon as the remote publishes it. Copies nobody asks for expire.
//!
//! Readers find copies without a lock (an `ArcSwap` map per datacenter);
//! only the first ask of a name writes the map.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::StatusCode;
use serde::Deserialize;
use switchyard_catalog::{
    needs_failover, node_uuid, Copied, CopyOf, Decorators, Elsewhere, Failover, Name, Snapshot,
    Weights,
};
use switchyard_registry::{
    Batch, Check, CheckKind, Command, Endpoint, MemoryStore, NewCheck, Node, Registry,
    RegistryMetrics, Status,
};
use tokio::sync::watch;

use crate::Federation;

/// How long one blocking query on a remote agent waits for a change.
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// Longest pause between tries when a datacenter does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Every other datacenter's copies.
pub struct Copies {
    federation: Arc<Federation>,
    dcs: Vec<DcCopies>,
    dns_timeout: Duration,
    expiry: Duration,
    max_copies: usize,
    epoch: Instant,
    /// Our own catalog: whether a service that fails over is served here
    /// again.
    local: Arc<ArcSwap<Snapshot>>,
    min_healthy: f64,
    /// Woken after every change to any copy.
    changed: tokio::sync::Notify,
}

struct DcCopies {
    name: String,
    lower: Vec<u8>,
    registry: Registry,
    services: ArcSwap<HashMap<String, Arc<Watched>>>,
    nodes: ArcSwap<HashMap<String, Arc<Watched>>>,
    /// Wakes the datacenter's watch when a name is added: it asks again at
    /// once, with the new name.
    added: tokio::sync::Notify,
    /// When a name was last refused for the cap (ms since `epoch`; 0 never).
    refused_ms: AtomicU64,
    /// Since when the watch has failed (ms since `epoch` + 1; 0: it follows).
    failing_ms: AtomicU64,
}

/// One name being copied.
struct Watched {
    /// Turns true at the first fetch.
    fetched: watch::Sender<bool>,
    /// When it was last asked for (ms since `epoch`).
    asked_ms: AtomicU64,
    /// The remote index of what the copy holds (0: nothing yet).
    index: AtomicU64,
}

impl Copies {
    /// Copies of every datacenter `federation` knows, each a catalog whose
    /// views `decorators(dc)` decorate (the DNS decorator first, at the key
    /// DNS reads ours with). Call within the agent's runtime.
    pub fn new(
        federation: Arc<Federation>,
        local: Arc<ArcSwap<Snapshot>>,
        decorators: impl Fn(&str) -> Decorators,
    ) -> Result<Arc<Copies>, String> {
        let mut dcs = Vec::new();
        for name in federation.remote_names() {
            // A catalog of its own; its metrics go nowhere (ours are ours).
            let metrics =
                RegistryMetrics::new(&prometheus::Registry::new()).map_err(|e| e.to_string())?;
            let (registry, _writer) =
                Registry::start_with(MemoryStore::default(), Arc::new(metrics), decorators(&name))
                    .map_err(|e| format!("copy of datacenter {name:?}: {e}"))?;
            dcs.push(DcCopies {
                lower: name.to_ascii_lowercase().into_bytes(),
                name,
                registry,
                services: Default::default(),
                nodes: Default::default(),
                added: tokio::sync::Notify::new(),
                refused_ms: AtomicU64::new(0),
                failing_ms: AtomicU64::new(0),
            });
        }
        let config = federation.config();
        let (dns_timeout, expiry, min_healthy, max_copies) = (
            config.dns_timeout,
            config.copy_expiry,
            config.min_healthy,
            config.max_copies,
        );
        let copies = Arc::new(Copies {
            dns_timeout,
            expiry,
            federation,
            dcs,
            epoch: Instant::now(),
            local,
            min_healthy,
            max_copies,
            changed: tokio::sync::Notify::new(),
        });
        if !copies.dcs.is_empty() {
            tokio::spawn(copies.clone().expire());
            tokio::spawn(copies.clone().fail_back());
        }
        for at in 0..copies.dcs.len() {
            tokio::spawn(copies.clone().watch(at));
        }
        Ok(copies)
    }

    /// Rebuilds the views of `services` in every copy (a reload routes
    /// them now: their copies get proxy backends).
    pub async fn redecorate(&self, services: &[Name]) {
        let names: Vec<Name> = services
            .iter()
            .map(|n| n.to_ascii_lowercase().as_str().into())
            .collect();
        for dc in &self.dcs {
            if let Err(e) = dc.registry.apply(Command::Redecorate(names.clone())).await {
                tracing::warn!(datacenter = %dc.name, error = %e, "cannot rebuild copied services' views after a reload");
            }
        }
    }

    /// A name not copied for the cap: logged once a minute at most.
    fn refused(&self, dc: &DcCopies) {
        let now = self.now_ms();
        let last = dc.refused_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) > 60_000)
            && dc
                .refused_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(datacenter = %dc.name, max = self.max_copies, "a name was not copied: the datacenter's copies are at federation.max_copies (next line in a minute at most)");
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn dc(&self, name: &str) -> Option<(usize, &DcCopies)> {
        self.dcs
            .iter()
            .enumerate()
            .find(|(_, dc)| dc.lower == name.as_bytes() || dc.name == name)
    }

    /// Starts copying `of` from datacenter `at`.
    fn start(&self, at: usize, of: CopyOf<'_>) -> Arc<Watched> {
        let dc = &self.dcs[at];
        let (map, name) = match of {
            CopyOf::Service(name) => (&dc.services, name),
            CopyOf::Node(name) => (&dc.nodes, name),
        };
        let made = Arc::new(Watched {
            fetched: watch::Sender::new(false),
            asked_ms: AtomicU64::new(self.now_ms()),
            index: AtomicU64::new(0),
        });
        let mut ours = false;
        map.rcu(|all| {
            let mut all = (**all).clone();
            ours = !all.contains_key(name);
            all.entry(name.to_string()).or_insert_with(|| made.clone());
            all
        });
        if !ours {
            // Another ask made it first.
            if let Some(theirs) = map.load().get(name) {
                return theirs.clone();
            }
        }
        self.federation
            .count_copies(&dc.name, dc.services.load().len() + dc.nodes.load().len());
        dc.added.notify_one();
        made
    }

    /// Keeps the copies of datacenter `at` current: one blocking query for
    /// all its names at a time (`/v1/switchyard/watch` there), asked again
    /// at once when a name is added.
    async fn watch(self: Arc<Self>, at: usize) {
        let dc = &self.dcs[at];
        let mut backoff = Duration::from_millis(250);
        loop {
            let services = dc.services.load_full();
            let nodes = dc.nodes.load_full();
            if services.is_empty() && nodes.is_empty() {
                dc.added.notified().await;
                continue;
            }
            let held = |map: &HashMap<String, Arc<Watched>>| -> serde_json::Map<String, serde_json::Value> {
                map.iter()
                    .map(|(name, w)| (name.clone(), w.index.load(Ordering::Relaxed).into()))
                    .collect()
            };
            let body = serde_json::json!({ "services": held(&services), "nodes": held(&nodes) });
            let path = format!("/v1/switchyard/watch?wait={}s", WATCH_WAIT.as_secs());
            let asked = self.federation.send(
                &dc.name,
                hyper::Method::POST,
                &path,
                bytes::Bytes::from(body.to_string()),
                WATCH_WAIT,
            );
            let answer = tokio::select! {
                answer = asked => answer,
                () = dc.added.notified() => continue,
            };
            match answer {
                Ok((status, _, body)) if status == StatusCode::OK => {
                    match serde_json::from_slice::<WatchOut>(&body) {
                        Ok(out) => {
                            self.apply(dc, out).await;
                            dc.failing_ms.store(0, Ordering::Relaxed);
                            backoff = Duration::from_millis(250);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(datacenter = %dc.name, error = %e, "a remote watch's answer did not parse")
                        }
                    }
                }
                Ok((status, _, body)) => {
                    tracing::warn!(datacenter = %dc.name, %status, answer = %String::from_utf8_lossy(&body).trim(), "the datacenter refused this agent's watch of its copies");
                }
                Err(e) => {
                    tracing::debug!(datacenter = %dc.name, error = %e, "copy watch failed; trying again");
                }
            }
            let _ = dc.failing_ms.compare_exchange(
                0,
                self.now_ms() + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = dc.added.notified() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Writes a watch's answer into the copy: each service's routable
    /// endpoints and their nodes (the copy's others of that service leave),
    /// each node's record; then marks them fetched at their remote index.
    /// Names expired meanwhile are left out.
    async fn apply(&self, dc: &DcCopies, out: WatchOut) {
        let (services, nodes) = (dc.services.load_full(), dc.nodes.load_full());
        let copy = dc.registry.snapshot();
        let mut batch = Batch::default();
        let mut node_names: HashSet<String> = HashSet::new();
        // Each name answered, with its index there.
        let mut done: Vec<(&Arc<Watched>, u64)> = Vec::new();
        // Nodes first: a node copied for itself keeps its meta.
        for (name, entry) in out.nodes {
            let Some(watched) = nodes.get(&name) else {
                continue;
            };
            match entry.node {
                Some(n) => {
                    if node_names.insert(n.name.clone()) {
                        batch.nodes.push(node(&n.name, n.address, n.meta));
                    }
                }
                // Gone there: gone here, unless copied services still
                // have endpoints on it.
                None => {
                    if copy.node(&name).is_some_and(|n| n.endpoints.is_empty()) {
                        batch.deregister_nodes.push(name.as_str().into());
                    }
                }
            }
            done.push((watched, entry.index));
        }
        for (name, service) in out.services {
            let Some(watched) = services.get(&name) else {
                continue;
            };
            let mut now: HashSet<(Name, Name)> = HashSet::new();
            for mut e in service.endpoints.into_iter().filter(|e| e.routable) {
                let node_address = e.node_address.clone().unwrap_or_else(|| e.address.clone());
                // A node the copy has at that address stays as it is (its
                // meta, when a node watch copied it).
                let known = copy
                    .node(&e.node)
                    .is_some_and(|n| n.node.address == node_address);
                let known = known
                    && (e.node_meta.is_empty()
                        || copy
                            .node(&e.node)
                            .is_some_and(|n| n.node.meta == e.node_meta));
                if !known && node_names.insert(e.node.clone()) {
                    let meta = std::mem::take(&mut e.node_meta);
                    batch.nodes.push(node(&e.node, node_address, meta));
                }
                now.insert((e.node.as_str().into(), e.id.as_str().into()));
                let checks = health_check(&dc.name, &name, &e).into_iter().collect();
                batch.endpoints.push((endpoint(&name, e), checks));
            }
            if let Some(view) = copy.service(&name) {
                batch.deregister_endpoints.extend(
                    view.instances()
                        .map(|i| (i.node.name.clone(), i.endpoint.id.clone()))
                        .filter(|key| !now.contains(key)),
                );
            }
            done.push((watched, service.index));
        }
        if let Err(e) = dc.registry.apply(Command::Batch(batch)).await {
            tracing::warn!(datacenter = %dc.name, error = %e, "a remote change could not be copied");
            return;
        }
        for (watched, index) in done {
            watched.index.store(index.max(1), Ordering::Relaxed);
            watched.fetched.send_replace(true);
        }
        self.changed.notify_waiters();
    }

    /// Drops the copies nobody asked for within `expiry`: their watches
    /// stop and their entries leave the copy.
    async fn expire(self: Arc<Self>) {
        let every = (self.expiry / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let now = self.now_ms();
            let limit = self.expiry.as_millis() as u64;
            for dc in &self.dcs {
                for (map, service) in [(&dc.services, true), (&dc.nodes, false)] {
                    let stale: Vec<String> = map
                        .load()
                        .iter()
                        .filter(|(_, w)| {
                            now.saturating_sub(w.asked_ms.load(Ordering::Relaxed)) > limit
                        })
                        .map(|(name, _)| name.clone())
                        .collect();
                    if stale.is_empty() {
                        continue;
                    }
                    map.rcu(|all| {
                        let mut all = (**all).clone();
                        for name in &stale {
                            all.remove(name);
                        }
                        all
                    });
                    self.federation
                        .count_copies(&dc.name, dc.services.load().len() + dc.nodes.load().len());
                    let snapshot = dc.registry.snapshot();
                    let mut batch = Batch::default();
                    for name in &stale {
                        if service {
                            if let Some(view) = snapshot.service(name) {
                                batch.deregister_endpoints.extend(
                                    view.instances()
                                        .map(|i| (i.node.name.clone(), i.endpoint.id.clone())),
                                );
                            }
                        } else if snapshot.node(name).is_some_and(|n| n.endpoints.is_empty()) {
                            batch.deregister_nodes.push(name.as_str().into());
                        }
                    }
                    tracing::debug!(datacenter = %dc.name, names = ?stale, "copies expired: nobody asked for them");
                    if let Err(e) = dc.registry.apply(Command::Batch(batch)).await {
                        tracing::warn!(datacenter = %dc.name, error = %e, "expired copies could not be dropped");
                    }
                }
            }
        }
    }
}

impl Copies {
    /// Shows how stale each datacenter's copies are, and notices failovers
    /// that are over (ours serves the service again, or
    /// where it went has none either): logged, and no longer counted in
    /// `switchyard_federation_failover_services`.
    async fn fail_back(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut reach_changes = self.federation.reach_changes();
        loop {
            tick.tick().await;
            let seen = self.federation.reach_changes();
            if seen != reach_changes {
                reach_changes = seen;
                self.changed.notify_waiters();
            }
            let now = self.now_ms();
            for dc in &self.dcs {
                let since = dc.failing_ms.load(Ordering::Relaxed);
                let stale = match since {
                    0 => Duration::ZERO,
                    since => Duration::from_millis(now.saturating_sub(since - 1)),
                };
                self.federation.show_copy_stale(&dc.name, stale);
            }
            let failing = self.federation.failing_over();
            if failing.is_empty() {
                continue;
            }
            let local = self.local.load();
            // Over when ours serves it again, or when the datacenter it went
            // to has no routable endpoint of it either (answers are ours,
            // empty, until another has some).
            let over: Vec<(String, String, bool)> = failing
                .iter()
                .filter_map(|(service, dc)| {
                    let here =
                        !needs_failover(local.service_ci(service).map(|v| &**v), self.min_healthy);
                    let there = self.dc(dc).is_some_and(|(_, copies)| {
                        copies
                            .registry
                            .snapshot()
                            .service_ci(service)
                            .is_some_and(|v| v.routable_len() > 0)
                    });
                    (here || !there).then(|| (service.clone(), dc.clone(), here))
                })
                .collect();
            for (service, dc, here) in over {
                self.federation.set_failover(&service, None);
                match here {
                    true => {
                        tracing::info!(%service, from = %dc, "service served here again: failover over")
                    }
                    false => {
                        tracing::warn!(%service, from = %dc, "failover over: the datacenter has no routable endpoint of it either")
                    }
                }
            }
        }
    }
}

impl Failover for Copies {
    fn min_healthy(&self) -> f64 {
        self.min_healthy
    }

    fn order(&self, policy: Option<&str>) -> Vec<String> {
        self.federation.failover_order(policy)
    }

    fn via_proxies(&self, dc: &str) -> Option<Arc<[std::net::SocketAddr]>> {
        self.federation.via_proxies(dc)
    }

    fn datacenter(&self) -> &str {
        self.federation.local()
    }

    fn failed_over(&self, service: &str, dc: &str) {
        let service = service.to_ascii_lowercase();
        if self
            .federation
            .failing_over()
            .get(&service)
            .is_some_and(|d| d == dc)
        {
            return;
        }
        let was = self.federation.set_failover(&service, Some(dc));
        tracing::warn!(%service, to = %dc, from = ?was, "service fails over: too few routable endpoints here");
    }
}

impl Elsewhere for Copies {
    fn knows(&self, dc: &[u8]) -> bool {
        self.dcs.iter().any(|c| c.lower == dc)
    }

    fn copy(&self, dc: &str, of: CopyOf<'_>) -> Copied {
        let Some((at, copies)) = self.dc(dc) else {
            return Copied::Unknown;
        };
        let found = match of {
            CopyOf::Service(name) => copies.services.load().get(name).cloned(),
            CopyOf::Node(name) => copies.nodes.load().get(name).cloned(),
        };
        let watched = match found {
            Some(watched) => {
                watched.asked_ms.store(self.now_ms(), Ordering::Relaxed);
                watched
            }
            None if copies.services.load().len() + copies.nodes.load().len() >= self.max_copies => {
                self.refused(copies);
                return Copied::Full;
            }
            None => self.start(at, of),
        };
        if *watched.fetched.borrow() {
            return Copied::Ready(copies.registry.snapshot());
        }
        let mut fetched = watched.fetched.subscribe();
        let within = self.dns_timeout;
        let wait: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            let _ = tokio::time::timeout(within, fetched.wait_for(|f| *f)).await;
        });
        Copied::Fetching(wait)
    }

    fn datacenters(&self) -> Vec<String> {
        self.dcs
            .iter()
            .map(|dc| String::from_utf8_lossy(&dc.lower).into_owned())
            .collect()
    }

    fn peek(&self, dc: &str) -> Option<Arc<Snapshot>> {
        self.dc(dc).map(|(_, copies)| copies.registry.snapshot())
    }

    fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    fn reach_changes(&self) -> u64 {
        self.federation.reach_changes()
    }
}

/// `/v1/switchyard/watch`'s answer: the names whose index moved.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatchOut {
    services: HashMap<String, ServiceIn>,
    nodes: HashMap<String, NodeWatched>,
}

#[derive(Debug, Default, Deserialize)]
struct ServiceIn {
    index: u64,
    #[serde(default)]
    endpoints: Vec<EndpointIn>,
}

#[derive(Debug, Deserialize)]
struct NodeWatched {
    index: u64,
    node: Option<NodeIn>,
}

fn node(name: &str, address: String, meta: std::collections::BTreeMap<String, String>) -> Node {
    Node {
        name: name.into(),
        id: node_uuid(name),
        address,
        tagged_addresses: Default::default(),
        meta,
        drain: None,
        create_index: 0,
        modify_index: 0,
    }
}

fn endpoint(service: &str, e: EndpointIn) -> Endpoint {
    Endpoint {
        id: e.id.as_str().into(),
        service: service.into(),
        node: e.node.as_str().into(),
        address: e.address,
        port: e.port,
        tags: e.tags,
        meta: e.meta,
        tagged_addresses: Default::default(),
        weights: Weights {
            passing: e.weight.unwrap_or(1),
            warning: 1,
        },
        enable_tag_override: false,
        kind: String::new(),
        incarnation: 0,
        drain: None,
        create_index: 0,
        modify_index: 0,
    }
}

/// The check that carries a copied endpoint's health there (passing or
/// warning: copies hold routable endpoints only), so that a prepared
/// query's `OnlyPassing` reads copies as it reads ours. (Every copied
/// endpoint has it: a batch keeps checks it does not name, so a check only
/// for warnings would outlive the warning.)
fn health_check(dc: &str, service: &str, e: &EndpointIn) -> Option<NewCheck> {
    let status = e.health.as_deref().and_then(Status::parse)?;
    Some(NewCheck {
        check: Check {
            node: e.node.as_str().into(),
            id: REMOTE_HEALTH.into(),
            name: format!("Health in datacenter {dc}"),
            status,
            notes: String::new(),
            output: String::new(),
            service_id: e.id.clone(),
            service_name: service.to_string(),
            kind: CheckKind::None,
            definition: Default::default(),
            status_since_ms: 0,
            create_index: 0,
            modify_index: 0,
        },
        status_given: true,
    })
}

/// The ID of a copied endpoint's health check (see `health_check`).
const REMOTE_HEALTH: &str = "switchyard:remote-health";

#[derive(Debug, Deserialize)]
struct EndpointIn {
    id: String,
    node: String,
    #[serde(default)]
    node_address: Option<String>,
    #[serde(default)]
    node_meta: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    health: Option<String>,
    address: String,
    port: u16,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    routable: bool,
}

#[derive(Debug, Deserialize)]
struct NodeIn {
    name: String,
    address: String,
    #[serde(default)]
    meta: std::collections::BTreeMap<String, String>,
}
