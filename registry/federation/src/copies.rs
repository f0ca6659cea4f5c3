//! Local copies of other datacenters' services and nodes, for DNS (and the
//! proxy's failover, later): each datacenter's copy is a catalog of its own
//! (an in-memory registry with the same decorators as ours), holding only
//! what was asked for. A copy is made at the first ask and kept current by a
//! blocking query on the remote agent, so a remote change is in the copy as
//! soon as the remote publishes it. Copies nobody asks for expire.
//!
//! Readers find copies without a lock (an `ArcSwap` map per datacenter);
//! only the first ask of a name writes the map.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::StatusCode;
use serde::Deserialize;
use switchyard_catalog::{
    needs_failover, node_uuid, Copied, CopyOf, Decorators, Elsewhere, Failover, Name, Snapshot,
    Weights,
};
use switchyard_registry::{Batch, Command, Endpoint, MemoryStore, Node, Registry, RegistryMetrics};
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
    runtime: tokio::runtime::Handle,
    epoch: Instant,
    /// Itself, for the watch tasks it starts.
    me: std::sync::Weak<Copies>,
    /// Our own catalog: whether a service that fails over is served here
    /// again.
    local: Arc<ArcSwap<Snapshot>>,
    min_healthy: f64,
}

struct DcCopies {
    name: String,
    lower: Vec<u8>,
    registry: Registry,
    services: ArcSwap<HashMap<String, Arc<Watched>>>,
    nodes: ArcSwap<HashMap<String, Arc<Watched>>>,
}

/// One name being copied.
struct Watched {
    /// Turns true at the first fetch.
    fetched: watch::Sender<bool>,
    /// When it was last asked for (ms since `epoch`).
    asked_ms: AtomicU64,
    task: OnceLock<tokio::task::AbortHandle>,
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
            });
        }
        let config = federation.config();
        let (dns_timeout, expiry, min_healthy) =
            (config.dns_timeout, config.copy_expiry, config.min_healthy);
        let copies = Arc::new_cyclic(|me| Copies {
            dns_timeout,
            expiry,
            federation,
            dcs,
            runtime: tokio::runtime::Handle::current(),
            epoch: Instant::now(),
            me: me.clone(),
            local,
            min_healthy,
        });
        if !copies.dcs.is_empty() {
            tokio::spawn(copies.clone().expire());
            tokio::spawn(copies.clone().fail_back());
        }
        Ok(copies)
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

    /// The number of names copied from `dc`.
    pub fn kept(&self, dc: &str) -> usize {
        self.dc(dc).map_or(0, |(_, dc)| {
            dc.services.load().len() + dc.nodes.load().len()
        })
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
            task: OnceLock::new(),
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
        let Some(copies) = self.me.upgrade() else {
            return made;
        };
        let watched = made.clone();
        let task = match of {
            CopyOf::Service(name) => {
                let name = name.to_string();
                self.runtime
                    .spawn(async move { copies.watch_service(at, name, watched).await })
            }
            CopyOf::Node(name) => {
                let name = name.to_string();
                self.runtime
                    .spawn(async move { copies.watch_node(at, name, watched).await })
            }
        };
        let _ = made.task.set(task.abort_handle());
        made
    }

    /// Keeps the copy of service `name` current: one blocking query after
    /// another on the remote agent.
    async fn watch_service(&self, at: usize, name: String, watched: Arc<Watched>) {
        let dc = &self.dcs[at];
        let mut index = 0u64;
        let mut held: HashSet<(Name, Name)> = HashSet::new();
        let mut backoff = Duration::from_millis(250);
        loop {
            let path = format!(
                "/v1/switchyard/services/{name}?index={index}&wait={}s",
                WATCH_WAIT.as_secs()
            );
            match self.federation.fetch(&dc.name, &path, WATCH_WAIT).await {
                Ok((status, remote_index, body)) if status == StatusCode::OK => {
                    match serde_json::from_slice::<ServiceIn>(&body) {
                        Ok(service) => {
                            if self.apply_service(dc, &name, service, &mut held).await {
                                watched.fetched.send_replace(true);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(datacenter = %dc.name, service = %name, error = %e, "a remote service's answer did not parse")
                        }
                    }
                    index = next_index(index, remote_index);
                    backoff = Duration::from_millis(250);
                    continue;
                }
                Ok((status, remote_index, _)) if status == StatusCode::NOT_FOUND => {
                    if self
                        .apply_service(dc, &name, ServiceIn::default(), &mut held)
                        .await
                    {
                        watched.fetched.send_replace(true);
                    }
                    index = next_index(index, remote_index);
                    backoff = Duration::from_millis(250);
                    continue;
                }
                Ok((status, _, body)) => {
                    tracing::warn!(datacenter = %dc.name, service = %name, %status, answer = %String::from_utf8_lossy(&body).trim(), "the datacenter refused a copy's read");
                }
                Err(e) => {
                    tracing::debug!(datacenter = %dc.name, service = %name, error = %e, "copy watch failed; trying again");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Writes what the remote said of service `name` into the copy: its
    /// routable endpoints, and their nodes; the endpoints it no longer has
    /// leave. Returns whether the copy took it.
    async fn apply_service(
        &self,
        dc: &DcCopies,
        name: &str,
        service: ServiceIn,
        held: &mut HashSet<(Name, Name)>,
    ) -> bool {
        let mut batch = Batch::default();
        let mut now: HashSet<(Name, Name)> = HashSet::new();
        let mut nodes: HashSet<String> = HashSet::new();
        for e in service.endpoints.into_iter().filter(|e| e.routable) {
            let node_address = e.node_address.clone().unwrap_or_else(|| e.address.clone());
            if nodes.insert(e.node.clone()) {
                batch.nodes.push(Node {
                    name: e.node.as_str().into(),
                    id: node_uuid(&e.node),
                    address: node_address,
                    tagged_addresses: Default::default(),
                    meta: Default::default(),
                    drain: None,
                    create_index: 0,
                    modify_index: 0,
                });
            }
            now.insert((e.node.as_str().into(), e.id.as_str().into()));
            batch.endpoints.push((
                Endpoint {
                    id: e.id.as_str().into(),
                    service: service.name.as_deref().unwrap_or(name).into(),
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
                },
                Vec::new(),
            ));
        }
        batch.deregister_endpoints = held.difference(&now).cloned().collect();
        match dc.registry.apply(Command::Batch(batch)).await {
            Ok(_) => {
                *held = now;
                true
            }
            Err(e) => {
                tracing::warn!(datacenter = %dc.name, service = %name, error = %e, "a remote service could not be copied");
                false
            }
        }
    }

    /// Keeps the copy of node `name` current.
    async fn watch_node(&self, at: usize, name: String, watched: Arc<Watched>) {
        let dc = &self.dcs[at];
        let mut index = 0u64;
        let mut backoff = Duration::from_millis(250);
        loop {
            let path = format!(
                "/v1/catalog/node/{name}?index={index}&wait={}s",
                WATCH_WAIT.as_secs()
            );
            match self.federation.fetch(&dc.name, &path, WATCH_WAIT).await {
                Ok((status, remote_index, body)) if status == StatusCode::OK => {
                    let node =
                        serde_json::from_slice::<Option<NodeOut>>(&body).map(|n| n.map(|n| n.node));
                    let applied = match node {
                        Ok(Some(node)) => {
                            let batch = Batch {
                                nodes: vec![Node {
                                    name: node.node.as_str().into(),
                                    id: node_uuid(&node.node),
                                    address: node.address,
                                    tagged_addresses: Default::default(),
                                    meta: node.meta,
                                    drain: None,
                                    create_index: 0,
                                    modify_index: 0,
                                }],
                                ..Batch::default()
                            };
                            dc.registry.apply(Command::Batch(batch)).await.is_ok()
                        }
                        Ok(None) => {
                            // Gone there: gone here, unless copied services
                            // still have endpoints on it.
                            let empty = dc
                                .registry
                                .snapshot()
                                .node(&name)
                                .is_some_and(|n| n.endpoints.is_empty());
                            !empty
                                || dc
                                    .registry
                                    .apply(Command::Batch(Batch {
                                        deregister_nodes: vec![name.as_str().into()],
                                        ..Batch::default()
                                    }))
                                    .await
                                    .is_ok()
                        }
                        Err(e) => {
                            tracing::warn!(datacenter = %dc.name, node = %name, error = %e, "a remote node's answer did not parse");
                            false
                        }
                    };
                    if applied {
                        watched.fetched.send_replace(true);
                    }
                    index = next_index(index, remote_index);
                    backoff = Duration::from_millis(250);
                    continue;
                }
                Ok((status, _, body)) => {
                    tracing::warn!(datacenter = %dc.name, node = %name, %status, answer = %String::from_utf8_lossy(&body).trim(), "the datacenter refused a copy's read");
                }
                Err(e) => {
                    tracing::debug!(datacenter = %dc.name, node = %name, error = %e, "copy watch failed; trying again");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
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
                    let mut gone = Vec::new();
                    map.rcu(|all| {
                        let mut all = (**all).clone();
                        gone = stale.iter().filter_map(|name| all.remove(name)).collect();
                        all
                    });
                    self.federation
                        .count_copies(&dc.name, dc.services.load().len() + dc.nodes.load().len());
                    for watched in &gone {
                        if let Some(task) = watched.task.get() {
                            task.abort();
                        }
                    }
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
    /// Notices services served here again (their failover over): logged,
    /// and gone from `switchyard_federation_failover_active`.
    async fn fail_back(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let failing = self.federation.failing_over();
            if failing.is_empty() {
                continue;
            }
            let local = self.local.load();
            let back: Vec<(String, String)> = failing
                .iter()
                .filter(|(service, _)| {
                    !needs_failover(local.service_ci(service).map(|v| &**v), self.min_healthy)
                })
                .map(|(service, dc)| (service.clone(), dc.clone()))
                .collect();
            if back.is_empty() {
                continue;
            }
            for (service, dc) in back {
                self.federation.set_failover(&service, None);
                tracing::info!(%service, from = %dc, "service served here again: failover over");
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

/// The index to ask with next: the remote's, unless it went back (the
/// remote restarted with a smaller one), then from the start.
fn next_index(asked: u64, remote: u64) -> u64 {
    if remote < asked {
        0
    } else {
        remote
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
}

/// `/v1/switchyard/services/NAME`, the parts a copy keeps.
#[derive(Debug, Default, Deserialize)]
struct ServiceIn {
    name: Option<String>,
    #[serde(default)]
    endpoints: Vec<EndpointIn>,
}

#[derive(Debug, Deserialize)]
struct EndpointIn {
    id: String,
    node: String,
    #[serde(default)]
    node_address: Option<String>,
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

/// `/v1/catalog/node/NAME`: `{"Node": {...}, "Services": {...}}` or null.
#[derive(Debug, Deserialize)]
struct NodeOut {
    #[serde(rename = "Node")]
    node: NodeIn,
}

#[derive(Debug, Deserialize)]
struct NodeIn {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Meta", default)]
    meta: std::collections::BTreeMap<String, String>,
}
