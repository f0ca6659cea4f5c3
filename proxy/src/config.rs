//! The `[http]` table of the agent configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use switchyard_catalog::ThreadPolicy;

/// How a route picks one endpoint of its service.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Power of two choices over latency (peak EWMA) × load.
    #[default]
    PeakEwma,
    /// Ring hash on `hash_on`: a key keeps its endpoint while the set is stable.
    ConsistentHash,
    Random,
}

/// What a consistent-hash route hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HashOn {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// A request header (name in lowercase).
    Header(String),
    /// A cookie.
    Cookie(String),
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        let parsed = match text.split_once(':') {
            Some(("header", name)) if !name.is_empty() => {
                Some(HashOn::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if !name.is_empty() => Some(HashOn::Cookie(name.to_string())),
            _ => None,
        };
        parsed.ok_or_else(|| {
            serde::de::Error::custom(format!(
                "hash_on must be \"client_ip\", \"header:NAME\" or \"cookie:NAME\", not {text:?}"
            ))
        })
    }
}

/// One `[[http.routes]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact host, `*.suffix`, or absent / `*` for any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix; default `/`.
    #[serde(default = "slash")]
    pub path_prefix: String,
    /// Registry service the route sends to.
    pub service: String,
    /// Default: the `[http]` table's `balancer`.
    #[serde(default)]
    pub balancer: Option<BalancerKind>,
    /// For `consistent_hash`; default `client_ip`.
    #[serde(default)]
    pub hash_on: HashOn,
    /// A newly routable endpoint (new to the service, back from critical,
    /// maintenance or a drain, or out of an ejection) ramps from 10% of its
    /// share to all of it over this time. Default: none.
    #[serde(default, deserialize_with = "opt_duration")]
    pub slow_start: Option<Duration>,
    /// Default: the `[http]` table's value.
    #[serde(default, deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Time allowed for the response head. Default: the `[http]` table's value.
    #[serde(default, deserialize_with = "opt_duration")]
    pub response_timeout: Option<Duration>,
    /// Extra attempts for idempotent requests. Default: the `[http]` table's value.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Largest request body in bytes (413 beyond). Default: the `[http]` table's value.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// gRPC statuses on which a call is retried on another endpoint. Default:
    /// the `[http]` table's value.
    #[serde(default)]
    pub retry_grpc_on: Option<Vec<GrpcRetryOn>>,
    /// Answer browsers' CORS preflights for gRPC-Web and mark answers for
    /// their origin. gRPC-Web itself is translated on every route.
    #[serde(default)]
    pub grpc_web: bool,
    /// How requests go to the endpoints. Default `http1`; gRPC calls go
    /// over HTTP/2 whatever this says.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// TLS to the endpoints (HTTP/1.1, or HTTP/2 for gRPC, by ALPN);
    /// `upstream_protocol = "h2"` implies it.
    #[serde(default)]
    pub upstream_tls: bool,
    /// The name sent (SNI) and verified in the endpoints' certificates.
    /// Default: the service's name.
    #[serde(default)]
    pub upstream_server_name: Option<String>,
    /// PEM file of the CAs the endpoints' certificates must chain to.
    /// Default: the Mozilla roots (webpki-roots).
    #[serde(default)]
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS: both or neither.
    #[serde(default)]
    pub upstream_client_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub upstream_client_key: Option<std::path::PathBuf>,
    /// Client addresses let in (CIDR blocks or addresses); empty: all.
    /// Checked before anything else: others get 403.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client addresses kept out (403), even when `allow` lists them.
    #[serde(default)]
    pub deny: Vec<String>,
    /// A fixed answer instead of the service's (maintenance).
    #[serde(default)]
    pub respond: Option<crate::policy::RespondConfig>,
    /// A redirect instead of the service's answer.
    #[serde(default)]
    pub redirect: Option<crate::policy::RedirectConfig>,
    /// Replaces the matched `path_prefix` in the forwarded path.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// `[PATTERN, REPLACEMENT]`: the path's first match replaced (`$1`...).
    #[serde(default)]
    pub rewrite_regex: Option<Vec<String>>,
    /// The Host the endpoints see.
    #[serde(default)]
    pub rewrite_host: Option<String>,
    /// Headers set, added or removed on the way to the endpoints.
    #[serde(default)]
    pub request_headers: Option<crate::policy::HeaderEditsConfig>,
    /// Headers set, added or removed on the way back to the client.
    #[serde(default)]
    pub response_headers: Option<crate::policy::HeaderEditsConfig>,
    /// Requests over this rate get 429 with Retry-After.
    #[serde(default)]
    pub rate_limit: Option<crate::limit::RateLimitConfig>,
    /// Codings responses are compressed with, in order of preference
    /// (`zstd`, `br`, `gzip`); the client's Accept-Encoding chooses.
    #[serde(default)]
    pub compress: Vec<String>,
    /// Media types compressed (`type/*` for a whole type). Default: text,
    /// JSON, JavaScript, XML and SVG.
    #[serde(default)]
    pub compress_types: Option<Vec<String>>,
    /// Smallest body compressed (by its Content-Length). Default 1024.
    #[serde(default)]
    pub compress_min_bytes: Option<u64>,
    /// The route's requests divided among subsets of the service's
    /// endpoints, chosen by tag, by weight.
    #[serde(default)]
    pub split: Vec<crate::split::SplitConfig>,
    /// Requests matching a header, cookie or query parameter go to a
    /// subset first.
    #[serde(default, rename = "match")]
    pub matches: Vec<crate::split::MatchConfig>,
    /// The TLS setup, built from the fields above when the configuration
    /// is validated.
    #[serde(skip)]
    pub(crate) built_tls: crate::upstream_tls::Built,
}

impl RouteConfig {
    /// The keys the route's policy and rewrite are built from.
    pub(crate) fn keys(&self) -> crate::policy::RouteKeys<'_> {
        crate::policy::RouteKeys {
            service: &self.service,
            path_prefix: &self.path_prefix,
            allow: &self.allow,
            deny: &self.deny,
            respond: self.respond.as_ref(),
            redirect: self.redirect.as_ref(),
            rewrite_prefix: self.rewrite_prefix.as_deref(),
            rewrite_regex: self.rewrite_regex.as_deref(),
            rewrite_host: self.rewrite_host.as_deref(),
            request_headers: self.request_headers.as_ref(),
            response_headers: self.response_headers.as_ref(),
        }
    }

    /// The route's compression settings, if any.
    pub(crate) fn compression(&self) -> Result<Option<crate::compress::Compress>, String> {
        crate::compress::Compress::from_config(
            &self.compress,
            self.compress_types.as_deref(),
            self.compress_min_bytes,
        )
    }

    /// A route to `service` for any host and path, every setting at its
    /// default.
    pub fn to_service(service: &str) -> RouteConfig {
        RouteConfig {
            host: None,
            path_prefix: slash(),
            service: service.to_string(),
            balancer: None,
            hash_on: HashOn::default(),
            slow_start: None,
            connect_timeout: None,
            response_timeout: None,
            retries: None,
            max_body_bytes: None,
            retry_grpc_on: None,
            grpc_web: false,
            upstream_protocol: UpstreamProtocol::default(),
            upstream_tls: false,
            upstream_server_name: None,
            upstream_ca_file: None,
            upstream_client_cert: None,
            upstream_client_key: None,
            allow: Vec::new(),
            deny: Vec::new(),
            respond: None,
            redirect: None,
            rewrite_prefix: None,
            rewrite_regex: None,
            rewrite_host: None,
            request_headers: None,
            response_headers: None,
            rate_limit: None,
            compress: Vec::new(),
            compress_types: None,
            compress_min_bytes: None,
            split: Vec::new(),
            matches: Vec::new(),
            built_tls: Default::default(),
        }
    }

    /// The route's TLS to its endpoints, if any (files read once per loaded
    /// configuration).
    pub(crate) fn tls(&self) -> Result<Option<Arc<crate::upstream_tls::UpstreamTls>>, String> {
        let tls = self.upstream_tls || self.upstream_protocol == UpstreamProtocol::H2;
        if !tls {
            if self.upstream_server_name.is_some()
                || self.upstream_ca_file.is_some()
                || self.upstream_client_cert.is_some()
                || self.upstream_client_key.is_some()
            {
                return Err("upstream TLS settings need upstream_tls = true".to_string());
            }
            return Ok(None);
        }
        if self.upstream_protocol == UpstreamProtocol::H2c {
            return Err(
                "upstream_protocol = \"h2c\" is cleartext: use \"h2\" for HTTP/2 over TLS"
                    .to_string(),
            );
        }
        let client = match (&self.upstream_client_cert, &self.upstream_client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err("upstream_client_cert and upstream_client_key go together".to_string()),
        };
        self.built_tls
            .get_or_build(|| {
                crate::upstream_tls::UpstreamTls::build(crate::upstream_tls::TlsSource {
                    server_name: self
                        .upstream_server_name
                        .as_deref()
                        .unwrap_or(&self.service),
                    ca_file: self.upstream_ca_file.as_deref(),
                    client,
                })
            })
            .map(Some)
    }
}

/// The protocol a route speaks to its endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, pooled connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (cleartext), requests multiplexed.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`), requests multiplexed.
    H2,
}

/// A gRPC status a call may be retried on: only when the endpoint answered
/// with it before any response message (a trailers-only answer), the
/// call's message was in hand, and the retries and the budget allow.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrpcRetryOn {
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Internal,
    Unavailable,
}

impl GrpcRetryOn {
    /// The statuses as a bit per gRPC code.
    pub(crate) fn mask(list: &[GrpcRetryOn]) -> u32 {
        list.iter().fold(0, |mask, on| {
            mask | 1
                << match on {
                    GrpcRetryOn::Cancelled => 1,
                    GrpcRetryOn::DeadlineExceeded => 4,
                    GrpcRetryOn::ResourceExhausted => 8,
                    GrpcRetryOn::Internal => 13,
                    GrpcRetryOn::Unavailable => 14,
                }
        })
    }
}

fn slash() -> String {
    "/".to_string()
}

/// `[http.h2]`: HTTP/2 client connections (cleartext and TLS).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct H2Config {
    /// A client connection older than this gets a GOAWAY: its streams in
    /// progress finish, and the client opens a new connection (which may
    /// land on another agent behind a load balancer). 0 (default) = off.
    #[serde(deserialize_with = "duration")]
    pub max_connection_age: Duration,
}

/// Passive outlier ejection.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (connect errors, timeouts, 5xx) that eject an endpoint. 0 = off.
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub base_ejection: Duration,
    /// Longest ejection. Default 5 m.
    #[serde(deserialize_with = "duration")]
    pub max_ejection: Duration,
    /// Most of a service's endpoints ejected at once, in percent (one may always
    /// be). Past that the failing endpoints stay in and the service is reported
    /// fail-open. Default 50.
    pub max_ejected_percent: u32,
    /// What an endpoint that keeps failing (ejected, and no success since,
    /// for `report_after`) is reported to the registry as: a check with this
    /// status, so DNS and every other proxy drop it too. `critical` (default),
    /// `warning`, or `off`.
    pub report: PassiveReport,
    /// Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub report_after: Duration,
    /// How long a reported check stays before it is withdrawn and the endpoint
    /// is tried again (a critical endpoint gets no traffic to prove itself
    /// with). Default 1 m.
    #[serde(deserialize_with = "duration")]
    pub report_hold: Duration,
}

/// The status of a passive-failure check.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PassiveReport {
    #[default]
    Critical,
    Warning,
    Off,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            report: PassiveReport::Critical,
            report_after: Duration::from_secs(30),
            report_hold: Duration::from_secs(60),
        }
    }
}

/// The `[http]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listen address for HTTP/1.1 and cleartext HTTP/2. Default
    /// `127.0.0.1:8080`; port 0 picks one.
    pub addr: SocketAddr,
    /// Proxy threads, each with its own listener and upstream pool. 0 = one per core.
    pub threads: usize,
    /// Scheduling policy of the proxy threads (HTTP and L4). Default `normal`;
    /// `batch` is SCHED_BATCH (see `ThreadPolicy`).
    pub thread_policy: ThreadPolicy,
    /// Default balancer of routes that name none. Default `peak_ewma`.
    pub balancer: BalancerKind,
    /// Default 2 s.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Time an upstream has to start its response. Default 60 s.
    #[serde(deserialize_with = "duration")]
    pub response_timeout: Duration,
    /// A keep-alive client connection idle this long is closed. Default 60 s.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Time a client has to send a whole request head (slow clients). Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A body read or write stalled this long aborts the exchange. Default 60 s.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Least average rate of a request body, in bytes/s, once
    /// `header_timeout` has passed since it began; a slower one gets 408 and
    /// the connection closes. 0 = no minimum. Default 1024.
    pub min_body_rate: u64,
    /// Extra attempts for idempotent requests (connect failure, 502, 503),
    /// each to an endpoint not yet tried. Default 2.
    pub retries: u32,
    /// gRPC statuses on which a call is retried (see `GrpcRetryOn`).
    /// Default `["unavailable"]`.
    pub retry_grpc_on: Vec<GrpcRetryOn>,
    /// Retries allowed beyond the floor, as a share of requests. Default 0.2.
    pub retry_budget_ratio: f64,
    /// Retries per second always allowed per service. Default 10.
    pub retry_budget_floor: u32,
    /// Largest request or response head in bytes; larger gets 431. Default 16384.
    pub max_header_bytes: usize,
    /// Most header fields in a head; more gets 431. Default 100.
    pub max_headers: usize,
    /// Idle upstream connections kept per endpoint and thread. Default 1024:
    /// the cap must sit above the requests in flight per endpoint, or every
    /// request past it opens and closes a connection (W-http at 500 clients
    /// in bench/RESULTS.md). Idle ones close after 30 s.
    pub pool_per_endpoint: usize,
    /// At shutdown (SIGTERM), how long requests and L4 connections in progress
    /// may take to finish; idle keep-alive connections close when a thread's
    /// work is done. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Passive outlier ejection.
    pub outlier: OutlierConfig,
    /// `[http.h2]`: HTTP/2 client connections.
    pub h2: H2Config,
    /// Routes from host and path prefix to registry services.
    pub routes: Vec<RouteConfig>,
    /// The HTTPS listener (off unless `addr` is set).
    pub tls: TlsConfig,
    /// File that gets one JSON line per request; absent = no access log.
    pub access_log: Option<std::path::PathBuf>,
    /// Largest request body in bytes: a larger Content-Length gets 413 before
    /// anything is sent upstream; a chunked body that grows past it is cut.
    /// 0 = no limit (default).
    pub max_body_bytes: u64,
    /// Open connections one client address may hold across the HTTP, HTTPS
    /// and L4 listeners; more are refused (HTTP gets a 429). 0 = no cap (default).
    pub max_connections_per_client: usize,
    /// Open client connections across the HTTP, HTTPS and L4 listeners;
    /// more are refused (HTTP gets a 503). 0 (default): the proxy's share of
    /// the agent's descriptor budget.
    pub max_connections: usize,
    /// Carry plain HTTP/1.1 connections' reads and writes through each proxy
    /// thread's io_uring (default), or through tokio's epoll reactor. Where
    /// io_uring is unavailable, tokio's. Reloadable; applies to connections
    /// made after the change.
    pub io_uring: bool,
    /// Client connections a proxy thread serves from which its HTTP/1.1
    /// sockets go on the ring (they move back below half of it): with fewer,
    /// their operations have no others to share an enter with, and tokio's
    /// path costs less. Default 4; 0 = always on the ring.
    pub io_uring_connections: usize,
}

/// One certificate chain and its key, served for `names` (SNI).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// Server names this certificate answers; each must be valid for it.
    #[serde(default)]
    pub names: Vec<String>,
}

/// `[http.tls]`: HTTPS with HTTP/2 and HTTP/1.1 by ALPN, terminated here.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Listen address; absent = no HTTPS listener. Port 0 picks one.
    pub addr: Option<SocketAddr>,
    /// The first is also served to clients that send no (or an unknown) name.
    pub certificates: Vec<CertificateConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 0,
            thread_policy: ThreadPolicy::Normal,
            balancer: BalancerKind::PeakEwma,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            retries: 2,
            retry_grpc_on: vec![GrpcRetryOn::Unavailable],
            retry_budget_ratio: 0.2,
            retry_budget_floor: 10,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            pool_per_endpoint: 1024,
            shutdown_grace: Duration::from_secs(10),
            outlier: OutlierConfig::default(),
            h2: H2Config::default(),
            routes: Vec::new(),
            tls: TlsConfig::default(),
            access_log: None,
            max_connections_per_client: 0,
            max_connections: 0,
            io_uring: true,
            io_uring_connections: 4,
            max_body_bytes: 0,
        }
    }
}

/// Most retries of one request (each goes to an endpoint not tried yet).
pub(crate) const MAX_RETRIES: u32 = 7;

/// Most header fields we ever parse (the fixed httparse array).
pub(crate) const HEADER_ARRAY: usize = 128;

impl Config {
    /// Rules that span fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_header_bytes < 1024 || self.max_header_bytes > 1 << 20 {
            return Err("http.max_header_bytes must be between 1024 and 1048576".to_string());
        }
        if self.max_headers == 0 || self.max_headers > HEADER_ARRAY {
            return Err(format!(
                "http.max_headers must be between 1 and {HEADER_ARRAY}"
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(format!("http.retries must be at most {MAX_RETRIES}"));
        }
        if !(0.0..=10.0).contains(&self.retry_budget_ratio) {
            return Err("http.retry_budget_ratio must be between 0 and 10".to_string());
        }
        if self.outlier.max_ejected_percent > 100 {
            return Err("http.outlier.max_ejected_percent must be at most 100".to_string());
        }
        if self.outlier.base_ejection.is_zero()
            || self.outlier.max_ejection < self.outlier.base_ejection
        {
            return Err(
                "http.outlier: base_ejection must be > 0 and max_ejection >= base_ejection"
                    .to_string(),
            );
        }
        if self.tls.addr.is_some() && self.tls.certificates.is_empty() {
            return Err("http.tls.addr is set but http.tls.certificates is empty".to_string());
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.service.is_empty() {
                return Err(format!("http.routes[{i}].service must not be empty"));
            }
            if !route.path_prefix.starts_with('/') {
                return Err(format!(
                    "http.routes[{i}].path_prefix must start with '/', not {:?}",
                    route.path_prefix
                ));
            }
            if route.retries.is_some_and(|r| r > MAX_RETRIES) {
                return Err(format!(
                    "http.routes[{i}].retries must be at most {MAX_RETRIES}"
                ));
            }
            if let Some(host) = &route.host {
                HostPattern::parse(host).map_err(|e| format!("http.routes[{i}].host: {e}"))?;
            }
            route.tls().map_err(|e| format!("http.routes[{i}]: {e}"))?;
            crate::policy::Policy::from_config(&route.keys())
                .map_err(|e| format!("http.routes[{i}].{e}"))?;
            crate::policy::Rewrite::from_config(&route.keys())
                .map_err(|e| format!("http.routes[{i}].{e}"))?;
            crate::split::Split::from_config(&route.split, &route.matches)
                .map_err(|e| format!("http.routes[{i}].{e}"))?;
            route
                .compression()
                .map_err(|e| format!("http.routes[{i}].{e}"))?;
            if let Some(limit) = &route.rate_limit {
                crate::limit::RateLimiter::from_config(limit)
                    .map_err(|e| format!("http.routes[{i}].{e}"))?;
            }
        }
        Ok(())
    }

    /// Threads to run: `threads`, or one per core.
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    switchyard_catalog::parse_go_duration(&text).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// How an L4 listener picks an endpoint for a new connection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TcpBalancer {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices over open connections.
    LeastConnections,
    /// Ring hash on the client's IP address: a client keeps its endpoint
    /// while the set is stable.
    ConsistentHash,
    Random,
}

impl TcpBalancer {
    pub(crate) fn kind(self) -> BalancerKind {
        match self {
            TcpBalancer::RoundRobin => BalancerKind::RoundRobin,
            TcpBalancer::LeastConnections => BalancerKind::LeastRequest,
            TcpBalancer::ConsistentHash => BalancerKind::ConsistentHash,
            TcpBalancer::Random => BalancerKind::Random,
        }
    }
}

/// One `[[tcp.listeners]]` entry: an address whose connections go to a service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    /// Listen address; port 0 picks one.
    pub addr: SocketAddr,
    /// Registry service the connections go to.
    pub service: String,
    #[serde(default)]
    pub balancer: TcpBalancer,
    /// Default 2 s. A failed connect tries another endpoint (at most 3 in all).
    #[serde(default = "default_tcp_connect", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// A connection with no bytes moving either way this long is closed. Default 10 m.
    #[serde(default = "default_tcp_idle", deserialize_with = "duration")]
    pub idle_timeout: Duration,
}

fn default_tcp_connect() -> Duration {
    Duration::from_secs(2)
}

fn default_tcp_idle() -> Duration {
    Duration::from_secs(600)
}

/// The `[tcp]` table: L4 listeners.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    pub listeners: Vec<TcpListenerConfig>,
    /// Relay bytes through each proxy thread's io_uring (default), or with a
    /// recv/send loop per connection. Where io_uring is unavailable the loop
    /// is used anyway, and each thread logs that once.
    pub io_uring: bool,
}

impl Default for TcpConfig {
    fn default() -> TcpConfig {
        TcpConfig {
            listeners: Vec::new(),
            io_uring: true,
        }
    }
}

impl TcpConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.service.is_empty() {
                return Err(format!("tcp.listeners[{i}].service must not be empty"));
            }
            if listener.connect_timeout.is_zero() || listener.idle_timeout.is_zero() {
                return Err(format!(
                    "tcp.listeners[{i}]: connect_timeout and idle_timeout must be > 0"
                ));
            }
            let clash = self.listeners[..i]
                .iter()
                .any(|other| other.addr == listener.addr && listener.addr.port() != 0);
            if clash {
                return Err(format!(
                    "tcp.listeners[{i}].addr {} is used by an earlier listener",
                    listener.addr
                ));
            }
        }
        Ok(())
    }
}

/// A route's `host`, checked: any host, one name, or `*.suffix`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
}

impl HostPattern {
    pub(crate) fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.trim().to_ascii_lowercase();
        if lower.is_empty() || lower == "*" {
            return Ok(HostPattern::Any);
        }
        let (pattern, name) = match lower.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(format!(".{rest}")), rest.to_string()),
            None => (HostPattern::Exact(lower.clone()), lower.clone()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !name.split('.').any(str::is_empty);
        if valid {
            Ok(pattern)
        } else {
            Err(format!(
                "{text:?} is not a host name, `*.suffix` or `*` (no port, no scheme)"
            ))
        }
    }
}
