//! Other datacenters, by configuration: no gossip and no full mesh. Each
//! `[[federation.datacenters]]` entry names a datacenter and some of its
//! agents' API addresses. This crate probes them for their round trip
//! ([`Federation::run`]), orders the datacenters by it
//! ([`Federation::datacenters`], Consul's `/v1/catalog/datacenters`), and
//! forwards requests to them ([`Federation::forward`], `?dc=`), over pooled
//! keep-alive connections, cleartext or TLS.
//!
//! A forwarded request carries the client's own token, never this agent's:
//! the remote datacenter's token rules decide, and a request the local agent
//! would refuse is not let through on the agent's credentials.

mod client;
pub mod config;
mod copies;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, Uri};
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::watch;

pub use crate::config::{DatacenterConfig, FailoverConfig, FederationConfig};
pub use crate::copies::Copies;

/// Marks a request one agent forwarded to another datacenter: the receiver
/// answers it itself and never forwards it again (no loops, no relays).
pub const FORWARDED_FROM: HeaderName = HeaderName::from_static("x-switchyard-forwarded-from");

/// Why a request could not be answered by another datacenter.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("No path to datacenter {0:?}: it is not one of [[federation.datacenters]]")]
    Unknown(String),
    #[error("datacenter {dc:?} is not reachable (tried {tried}): {error}")]
    Unreachable {
        dc: String,
        tried: String,
        error: String,
    },
    #[error("datacenter {dc:?} did not answer within {after:?}")]
    Timeout { dc: String, after: Duration },
    #[error("request to datacenter {dc:?} refused: {error}")]
    Request { dc: String, error: String },
}

/// A datacenter as `switchyard datacenters` and the native API show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DatacenterInfo {
    pub name: String,
    /// This agent's own.
    pub local: bool,
    /// Whether the last probe round reached one of its agents.
    pub reachable: bool,
    /// The measured round trip (smoothed), when known.
    pub rtt_ms: Option<f64>,
    /// Time since one of its agents last answered, when one has.
    pub last_contact_ms: Option<u64>,
    /// Its agents' API addresses, the one answering fastest first.
    pub api: Vec<String>,
    /// Its ingress proxies' addresses.
    pub proxy: Vec<String>,
    /// Services of ours answered from there now (failover).
    pub failover_services: Vec<String>,
}

/// Other datacenters, their round trips, and the client to them.
pub struct Federation {
    local: String,
    remotes: Vec<Remote>,
    config: FederationConfig,
    epoch: Instant,
    metrics: Metrics,
    /// Services answered from another datacenter now (lower-case name to
    /// lower-case datacenter).
    failing: arc_swap::ArcSwap<std::collections::HashMap<String, String>>,
    /// Times a datacenter came into or went out of reach.
    reach_changes: AtomicU64,
}

struct Remote {
    name: String,
    /// Its agents' base URIs (scheme and authority), in config order.
    bases: Vec<Uri>,
    /// The token this agent presents there (its own probes).
    token: Option<HeaderValue>,
    proxy: Vec<String>,
    /// `via = "proxy"`: its proxies' addresses, as the proxy fails over.
    via_proxies: Option<Arc<[std::net::SocketAddr]>>,
    client: client::HttpClient,
    /// Smoothed round trip in µs; `u64::MAX` until measured.
    rtt_us: AtomicU64,
    /// The base that answered fastest in the last round.
    best: AtomicUsize,
    reachable: AtomicBool,
    /// When one of its agents last answered (ms since `epoch` + 1; 0 never).
    contact_ms: AtomicU64,
    /// A refused token is logged once per change, not every probe.
    token_refused: AtomicBool,
}

struct Metrics {
    rtt: GaugeVec,
    reachable: IntGaugeVec,
    contact_age: GaugeVec,
    forwarded: IntCounterVec,
    copies: IntGaugeVec,
    failover: IntGaugeVec,
    copy_stale: GaugeVec,
}

impl Metrics {
    fn new(registry: &prometheus::Registry) -> Result<Metrics, prometheus::Error> {
        let rtt = GaugeVec::new(
            Opts::new(
                "switchyard_federation_rtt_seconds",
                "Smoothed round trip to the fastest agent of each other datacenter (NaN until one answers)",
            ),
            &["datacenter"],
        )?;
        let reachable = IntGaugeVec::new(
            Opts::new(
                "switchyard_federation_reachable",
                "Whether the last probe reached an agent of each other datacenter (1) or none (0)",
            ),
            &["datacenter"],
        )?;
        let contact_age = GaugeVec::new(
            Opts::new(
                "switchyard_federation_last_contact_seconds",
                "Time since an agent of each other datacenter last answered (-1: never)",
            ),
            &["datacenter"],
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "switchyard_federation_forwarded_total",
                "Requests forwarded to another datacenter (?dc=), by outcome: answered, unreachable, timeout",
            ),
            &["datacenter", "outcome"],
        )?;
        let copies = IntGaugeVec::new(
            Opts::new(
                "switchyard_federation_copies",
                "Services and nodes of each other datacenter copied here (for DNS), kept while asked for",
            ),
            &["datacenter"],
        )?;
        registry.register(Box::new(copies.clone()))?;
        let copy_stale = GaugeVec::new(
            Opts::new(
                "switchyard_federation_copy_stale_seconds",
                "How long the copies of each other datacenter have failed to follow it (their watch failing); 0 while they follow",
            ),
            &["datacenter"],
        )?;
        registry.register(Box::new(copy_stale.clone()))?;
        let failover = IntGaugeVec::new(
            Opts::new(
                "switchyard_federation_failover_services",
                "Services answered from each other datacenter now (too few routable endpoints here)",
            ),
            &["datacenter"],
        )?;
        registry.register(Box::new(failover.clone()))?;
        registry.register(Box::new(rtt.clone()))?;
        registry.register(Box::new(reachable.clone()))?;
        registry.register(Box::new(contact_age.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        Ok(Metrics {
            rtt,
            reachable,
            contact_age,
            forwarded,
            copies,
            failover,
            copy_stale,
        })
    }
}

impl Federation {
    /// The datacenters of `config` (checked already), seen from `local`.
    /// Metrics go to `registry`.
    pub fn new(
        local: &str,
        config: &FederationConfig,
        registry: &prometheus::Registry,
    ) -> Result<Federation, String> {
        config.validate(local)?;
        let mut remotes = Vec::with_capacity(config.datacenters.len());
        for dc in &config.datacenters {
            let bases = dc
                .api
                .iter()
                .map(|a| client::base_uri(a))
                .collect::<Result<Vec<_>, _>>()?;
            let token = match &dc.token_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        format!(
                            "datacenter {:?}: token_file {}: {e}",
                            dc.name,
                            path.display()
                        )
                    })?;
                    Some(HeaderValue::from_str(text.trim()).map_err(|_| {
                        format!(
                            "datacenter {:?}: token_file {} holds characters a header cannot carry",
                            dc.name,
                            path.display()
                        )
                    })?)
                }
                None => None,
            };
            let client = client::client(dc.ca_file.as_deref(), config.connect_timeout)
                .map_err(|e| format!("datacenter {:?}: {e}", dc.name))?;
            remotes.push(Remote {
                name: dc.name.clone(),
                bases,
                token,
                proxy: dc.proxy.clone(),
                via_proxies: (dc.via == config::Via::Proxy).then(|| {
                    dc.proxy
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect::<Vec<_>>()
                        .into()
                }),
                client,
                rtt_us: AtomicU64::new(u64::MAX),
                best: AtomicUsize::new(0),
                reachable: AtomicBool::new(false),
                contact_ms: AtomicU64::new(0),
                token_refused: AtomicBool::new(false),
            });
        }
        let metrics = Metrics::new(registry).map_err(|e| format!("federation metrics: {e}"))?;
        // Every series of every datacenter exists from the start: a
        // datacenter never reached shows as such, not as a missing series.
        for remote in &remotes {
            let labels = [remote.name.as_str()];
            metrics.rtt.with_label_values(&labels).set(f64::NAN);
            metrics.reachable.with_label_values(&labels).set(0);
            metrics.contact_age.with_label_values(&labels).set(-1.0);
            metrics.copies.with_label_values(&labels).set(0);
            metrics.copy_stale.with_label_values(&labels).set(0.0);
            metrics.failover.with_label_values(&labels).set(0);
            for outcome in ["answered", "unreachable", "timeout"] {
                metrics
                    .forwarded
                    .with_label_values(&[remote.name.as_str(), outcome])
                    .reset();
            }
        }
        Ok(Federation {
            local: local.to_string(),
            remotes,
            config: config.clone(),
            epoch: Instant::now(),
            metrics,
            failing: Default::default(),
            reach_changes: AtomicU64::new(0),
        })
    }

    /// This agent's datacenter.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The other datacenters' names, in config order.
    pub fn remote_names(&self) -> Vec<String> {
        self.remotes.iter().map(|r| r.name.clone()).collect()
    }

    /// The datacenters a service fails over to, in order, lower case, those
    /// out of reach left out: `policy` is the service's own
    /// (`switchyard.failover=` tag: `none`, `nearest` or names), else
    /// `federation.failover`.
    pub fn failover_order(&self, policy: Option<&str>) -> Vec<String> {
        let reachable = |name: &str| {
            self.remote(name)
                .is_some_and(|r| r.reachable.load(Ordering::Relaxed))
        };
        let nearest = || -> Vec<String> {
            self.datacenters()
                .into_iter()
                .filter(|dc| !dc.local && dc.reachable)
                .map(|dc| dc.name.to_ascii_lowercase())
                .collect()
        };
        let listed = |names: &mut dyn Iterator<Item = &str>| -> Vec<String> {
            names
                .map(str::trim)
                .filter(|name| *name != self.local && reachable(name))
                .map(str::to_ascii_lowercase)
                .collect()
        };
        match policy.map(str::trim) {
            Some("none") | Some("") => Vec::new(),
            Some("nearest") => nearest(),
            Some(names) => listed(&mut names.split(',')),
            None => match &self.config.failover {
                None => Vec::new(),
                Some(FailoverConfig::Word(_)) => nearest(),
                Some(FailoverConfig::List(names)) => listed(&mut names.iter().map(String::as_str)),
            },
        }
    }

    /// `dc`'s proxies when the proxy reaches it through them.
    pub fn via_proxies(&self, dc: &str) -> Option<Arc<[std::net::SocketAddr]>> {
        self.remotes
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(dc))?
            .via_proxies
            .clone()
    }

    /// The `[federation]` table in force.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// A read of this agent's own (a copy's watch) from an agent of `dc`,
    /// presenting the datacenter's `token_file` token: the status, the
    /// `X-Consul-Index` and the whole body. `wait` is the blocking query's.
    pub async fn fetch(
        &self,
        dc: &str,
        path: &str,
        wait: Duration,
    ) -> Result<(hyper::StatusCode, u64, Bytes), FederationError> {
        self.send(dc, hyper::Method::GET, path, Bytes::new(), wait)
            .await
    }

    /// `fetch` with a method and a body.
    pub async fn send(
        &self,
        dc: &str,
        method: hyper::Method,
        path: &str,
        body: Bytes,
        wait: Duration,
    ) -> Result<(hyper::StatusCode, u64, Bytes), FederationError> {
        let remote = self
            .remote(dc)
            .ok_or_else(|| FederationError::Unknown(dc.to_string()))?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = path.parse().map_err(|e| FederationError::Request {
            dc: dc.to_string(),
            error: format!("path {path:?}: {e}"),
        })?;
        if let Some(token) = &remote.token {
            request
                .headers_mut()
                .insert("x-consul-token", token.clone());
        }
        let within = wait + wait / 16 + Duration::from_secs(10);
        let response = self.forward(dc, request, within).await?;
        let status = response.status();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = tokio::time::timeout(
            within,
            http_body_util::BodyExt::collect(response.into_body()),
        )
        .await
        .map_err(|_| FederationError::Timeout {
            dc: dc.to_string(),
            after: within,
        })?
        .map_err(|e| FederationError::Unreachable {
            dc: dc.to_string(),
            tried: String::new(),
            error: error_chain(&e),
        })?
        .to_bytes();
        Ok((status, index, body))
    }

    /// Whether `name` is a datacenter this agent knows (its own included).
    pub fn knows(&self, name: &str) -> bool {
        name == self.local || self.remote(name).is_some()
    }

    fn remote(&self, name: &str) -> Option<&Remote> {
        self.remotes.iter().find(|r| r.name == name)
    }

    /// The datacenter names as Consul lists them: this one first, then the
    /// others by measured round trip, those not reached (or not measured
    /// yet) last, by name.
    pub fn names(&self) -> Vec<String> {
        self.datacenters().into_iter().map(|dc| dc.name).collect()
    }

    /// Every datacenter with what is known of it, in `names` order.
    pub fn datacenters(&self) -> Vec<DatacenterInfo> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let failing = self.failing.load();
        let failing_to = |dc: &str| -> Vec<String> {
            let lower = dc.to_ascii_lowercase();
            let mut services: Vec<String> = failing
                .iter()
                .filter(|(_, to)| **to == lower)
                .map(|(service, _)| service.clone())
                .collect();
            services.sort();
            services
        };
        let mut others: Vec<DatacenterInfo> = self
            .remotes
            .iter()
            .map(|r| {
                let rtt = r.rtt_us.load(Ordering::Relaxed);
                let contact = r.contact_ms.load(Ordering::Relaxed);
                let best = r.best.load(Ordering::Relaxed);
                let mut api: Vec<String> = Vec::with_capacity(r.bases.len());
                api.extend(r.bases.get(best).map(base_text));
                api.extend(
                    r.bases
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != best)
                        .map(|(_, b)| base_text(b)),
                );
                DatacenterInfo {
                    name: r.name.clone(),
                    local: false,
                    reachable: r.reachable.load(Ordering::Relaxed),
                    rtt_ms: (rtt != u64::MAX).then(|| rtt as f64 / 1000.0),
                    last_contact_ms: (contact != 0).then(|| now.saturating_sub(contact - 1)),
                    api,
                    proxy: r.proxy.clone(),
                    failover_services: failing_to(&r.name),
                }
            })
            .collect();
        others.sort_by(|a, b| {
            let key = |d: &DatacenterInfo| match (d.reachable, d.rtt_ms) {
                (true, Some(rtt)) => (0, rtt),
                _ => (1, 0.0),
            };
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0)
                .then(ka.1.total_cmp(&kb.1))
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut all = Vec::with_capacity(others.len() + 1);
        all.push(DatacenterInfo {
            name: self.local.clone(),
            local: true,
            reachable: true,
            rtt_ms: Some(0.0),
            last_contact_ms: Some(0),
            api: Vec::new(),
            proxy: Vec::new(),
            failover_services: Vec::new(),
        });
        all.extend(others);
        all
    }

    /// Time since an agent of `dc` last answered (none: never, or not a
    /// remote datacenter).
    pub fn last_contact(&self, dc: &str) -> Option<Duration> {
        let remote = self.remote(dc)?;
        let contact = remote.contact_ms.load(Ordering::Relaxed);
        (contact != 0).then(|| {
            Duration::from_millis(
                (self.epoch.elapsed().as_millis() as u64).saturating_sub(contact - 1),
            )
        })
    }

    fn touch(&self, remote: &Remote) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        remote.contact_ms.store(now, Ordering::Relaxed);
    }

    /// Sends `request` (its URI: path and query only) to an agent of `dc`,
    /// the fastest first, another one when a connection cannot be made.
    /// Its response head must come within `within` (a blocking query's
    /// wait, plus margin). The request's own headers go as they are
    /// (the client's token among them), marked with [`FORWARDED_FROM`].
    pub async fn forward(
        &self,
        dc: &str,
        request: Request<Bytes>,
        within: Duration,
    ) -> Result<Response<Incoming>, FederationError> {
        let remote = self
            .remote(dc)
            .ok_or_else(|| FederationError::Unknown(dc.to_string()))?;
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());
        for name in HOP_BY_HOP {
            parts.headers.remove(*name);
        }
        parts.headers.remove(hyper::header::HOST);
        if let Ok(local) = HeaderValue::from_str(&self.local) {
            parts.headers.insert(FORWARDED_FROM, local);
        }
        let best = remote.best.load(Ordering::Relaxed);
        let order = std::iter::once(best).chain((0..remote.bases.len()).filter(|i| *i != best));
        let mut tried = Vec::new();
        let mut last_error = String::new();
        for i in order {
            let Some(base) = remote.bases.get(i) else {
                continue;
            };
            let uri = match with_path(base, &path) {
                Ok(uri) => uri,
                Err(error) => {
                    return Err(FederationError::Request {
                        dc: dc.to_string(),
                        error,
                    })
                }
            };
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = parts.headers.clone();
            tried.push(base_text(base));
            match tokio::time::timeout(within, remote.client.request(request)).await {
                Ok(Ok(response)) => {
                    self.touch(remote);
                    self.count(dc, "answered");
                    return Ok(response);
                }
                Ok(Err(e)) if e.is_connect() => {
                    last_error = error_chain(&e);
                }
                Ok(Err(e)) => {
                    self.count(dc, "unreachable");
                    return Err(FederationError::Unreachable {
                        dc: dc.to_string(),
                        tried: tried.join(", "),
                        error: error_chain(&e),
                    });
                }
                Err(_) => {
                    self.count(dc, "timeout");
                    return Err(FederationError::Timeout {
                        dc: dc.to_string(),
                        after: within,
                    });
                }
            }
        }
        self.count(dc, "unreachable");
        Err(FederationError::Unreachable {
            dc: dc.to_string(),
            tried: tried.join(", "),
            error: last_error,
        })
    }

    /// Sets how many names of `dc` are copied here.
    pub(crate) fn count_copies(&self, dc: &str, kept: usize) {
        self.metrics
            .copies
            .with_label_values(&[dc])
            .set(kept as i64);
    }

    /// Shows how long `dc`'s copies have failed to follow it.
    pub(crate) fn show_copy_stale(&self, dc: &str, stale: Duration) {
        self.metrics
            .copy_stale
            .with_label_values(&[dc])
            .set(stale.as_secs_f64());
    }

    /// Records `service` as answered from `dc` now (none: here again);
    /// returns the datacenter it was answered from before, if another.
    pub(crate) fn set_failover(&self, service: &str, dc: Option<&str>) -> Option<String> {
        let mut was = None;
        self.failing.rcu(|all| {
            let mut all = (**all).clone();
            was = match dc {
                Some(dc) => all.insert(service.to_string(), dc.to_string()),
                None => all.remove(service),
            };
            all
        });
        let failing = self.failing.load();
        for remote in &self.remotes {
            let lower = remote.name.to_ascii_lowercase();
            let count = failing.values().filter(|dc| **dc == lower).count();
            self.metrics
                .failover
                .with_label_values(&[remote.name.as_str()])
                .set(count as i64);
        }
        was
    }

    /// Services answered from another datacenter now, and from which.
    /// How many times a datacenter came into or went out of reach (only
    /// grows): what failover skips moved when it did.
    pub fn reach_changes(&self) -> u64 {
        self.reach_changes.load(Ordering::Relaxed)
    }

    pub fn failing_over(&self) -> Arc<std::collections::HashMap<String, String>> {
        self.failing.load_full()
    }

    fn count(&self, dc: &str, outcome: &str) {
        self.metrics
            .forwarded
            .with_label_values(&[dc, outcome])
            .inc();
    }

    /// Probes every other datacenter's agents every `probe_interval` until
    /// `shutdown` turns true: the round trip of a small read
    /// (`/v1/status/leader`) to each address, the fastest kept (smoothed).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.remotes.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let rounds = self.remotes.iter().map(|remote| self.probe(remote));
            futures_util::future::join_all(rounds).await;
        }
    }

    /// One probe round of `remote`: every address, at once.
    async fn probe(&self, remote: &Remote) {
        let timeout = self.config.connect_timeout;
        let probes = remote.bases.iter().map(|base| async move {
            let uri = with_path(base, "/v1/status/leader").ok()?;
            let mut request = Request::new(Full::new(Bytes::new()));
            *request.uri_mut() = uri;
            if let Some(token) = &remote.token {
                request
                    .headers_mut()
                    .insert("x-consul-token", token.clone());
            }
            let started = Instant::now();
            let response = tokio::time::timeout(timeout, remote.client.request(request))
                .await
                .ok()?
                .ok()?;
            let status = response.status();
            // Read it whole: the connection goes back to the pool.
            let _ = tokio::time::timeout(
                timeout,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await;
            Some((started.elapsed(), status))
        });
        let answers = futures_util::future::join_all(probes).await;
        let fastest = answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|(rtt, status)| (i, rtt, status)))
            .min_by_key(|(_, rtt, _)| *rtt);
        let was = remote.reachable.load(Ordering::Relaxed);
        let labels = [remote.name.as_str()];
        match fastest {
            Some((i, rtt, status)) => {
                self.touch(remote);
                remote.best.store(i, Ordering::Relaxed);
                let sample = rtt.as_micros().min(u64::MAX as u128 - 1) as u64;
                let old = remote.rtt_us.load(Ordering::Relaxed);
                let smoothed = if old == u64::MAX {
                    sample
                } else {
                    (old * 7 + sample * 3) / 10
                };
                remote.rtt_us.store(smoothed, Ordering::Relaxed);
                remote.reachable.store(true, Ordering::Relaxed);
                if !was {
                    self.reach_changes.fetch_add(1, Ordering::Relaxed);
                }
                self.metrics
                    .rtt
                    .with_label_values(&labels)
                    .set(smoothed as f64 / 1e6);
                self.metrics.reachable.with_label_values(&labels).set(1);
                if !was {
                    tracing::info!(datacenter = %remote.name, rtt_ms = smoothed as f64 / 1000.0, "datacenter reachable");
                }
                let refused = status == hyper::StatusCode::UNAUTHORIZED
                    || status == hyper::StatusCode::FORBIDDEN;
                if refused != remote.token_refused.swap(refused, Ordering::Relaxed) && refused {
                    tracing::warn!(datacenter = %remote.name, %status, "the datacenter refuses this agent's token (federation.datacenters.token_file)");
                }
            }
            None => {
                remote.reachable.store(false, Ordering::Relaxed);
                if was {
                    self.reach_changes.fetch_add(1, Ordering::Relaxed);
                }
                self.metrics.reachable.with_label_values(&labels).set(0);
                if was {
                    tracing::warn!(datacenter = %remote.name, "datacenter not reachable: no agent answered");
                }
            }
        }
        let age = self
            .last_contact(&remote.name)
            .map_or(-1.0, |age| age.as_secs_f64());
        self.metrics.contact_age.with_label_values(&labels).set(age);
    }
}

/// Headers of one connection, not of the request.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn base_text(base: &Uri) -> String {
    let text = base.to_string();
    text.strip_suffix('/').map(str::to_string).unwrap_or(text)
}

fn with_path(base: &Uri, path: &str) -> Result<Uri, String> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path.parse().map_err(|e| format!("path {path:?}: {e}"))?);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// An error with its sources, one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text
}
