//! Proxy metrics. Per-service and per-endpoint handles are created when the
//! service becomes routed (in the registry writer, never per request) and
//! removed when it leaves, so a request pays atomic adds only.

use prometheus::{
    exponential_buckets, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Why a request was answered by the proxy itself.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reject {
    BadRequest,
    HeadTooLarge,
    NoRoute,
    NoEndpoint,
    UpstreamFailed,
    UpstreamTimeout,
    ClientTimeout,
    /// A client already had `max_connections_per_client` open.
    ClientLimit,
    /// A request body over its route's `max_body_bytes`.
    BodyTooLarge,
    /// The proxy already had `max_connections` open.
    ConnectionLimit,
    /// A client address its route's `allow`/`deny` keeps out.
    Forbidden,
    /// Over its route's `rate_limit`.
    RateLimited,
}

impl Reject {
    const ALL: [Reject; 12] = [
        Reject::BadRequest,
        Reject::HeadTooLarge,
        Reject::NoRoute,
        Reject::NoEndpoint,
        Reject::UpstreamFailed,
        Reject::UpstreamTimeout,
        Reject::ClientTimeout,
        Reject::ClientLimit,
        Reject::BodyTooLarge,
        Reject::ConnectionLimit,
        Reject::Forbidden,
        Reject::RateLimited,
    ];

    fn label(self) -> &'static str {
        match self {
            Reject::BadRequest => "bad_request",
            Reject::HeadTooLarge => "head_too_large",
            Reject::NoRoute => "no_route",
            Reject::NoEndpoint => "no_endpoint",
            Reject::UpstreamFailed => "upstream_failed",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::ClientTimeout => "client_timeout",
            Reject::ClientLimit => "client_connection_limit",
            Reject::BodyTooLarge => "body_too_large",
            Reject::ConnectionLimit => "connection_limit",
            Reject::Forbidden => "forbidden",
            Reject::RateLimited => "rate_limited",
        }
    }
}

/// Why the proxy sent an HTTP/2 client a GOAWAY.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GoAway {
    Idle,
    MaxAge,
    Shutdown,
}

impl GoAway {
    fn label(self) -> &'static str {
        match self {
            GoAway::Idle => "idle",
            GoAway::MaxAge => "max_age",
            GoAway::Shutdown => "shutdown",
        }
    }
}

pub struct ProxyMetrics {
    requests: IntCounterVec,
    in_flight: IntGaugeVec,
    connect_errors: IntCounterVec,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    retries: IntCounterVec,
    fail_open: IntGaugeVec,
    grpc: IntCounterVec,
    protocols: IntCounterVec,
    duration: HistogramVec,
    rejected: Vec<IntCounter>,
    rate_limited: IntCounterVec,
    rate_share: GaugeVec,
    subset_requests: IntCounterVec,
    subset_errors: IntCounterVec,
    subset_routable: IntGaugeVec,
    pub(crate) connections: IntGauge,
    pub(crate) thread_connections: IntGaugeVec,
    /// Each proxy thread's io_uring wake-up latency, measured at start.
    pub(crate) ring_wakeup: GaugeVec,
    pub(crate) upgrades: IntCounter,
    /// GOAWAYs sent to HTTP/2 clients, by why (`idle`, `max_age`, `shutdown`).
    pub(crate) goaways: [IntCounter; 3],
    /// Failed accepts by listener kind (`http`, `https`, `l4`).
    pub(crate) accept_errors: IntCounterVec,
    pub(crate) spliced_bytes: IntCounter,
    /// L4 connections relayed through a thread's io_uring, and with recv/send.
    pub(crate) relayed_io_uring: IntCounter,
    pub(crate) relayed_copy: IntCounter,
    /// HTTP/1.1 connections (client and upstream) on a thread's io_uring,
    /// and on tokio's reactor.
    pub(crate) http_io_uring: IntCounter,
    pub(crate) http_tokio: IntCounter,
    tcp: IntCounterVec,
    drain_cuts: IntCounter,
    upstream_tls_failures: IntCounterVec,
    h2: std::sync::Arc<H2Families>,
}

/// How an L4 connection ended.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TcpOutcome {
    /// Both sides closed (or one failed) after bytes moved.
    Closed,
    IdleTimeout,
    /// Cut at its endpoint's drain deadline.
    DrainCut,
    /// The service had no routable endpoint.
    NoEndpoint,
    /// No endpoint accepted the connection.
    ConnectFailed,
}

impl TcpOutcome {
    const ALL: [TcpOutcome; 5] = [
        TcpOutcome::Closed,
        TcpOutcome::IdleTimeout,
        TcpOutcome::DrainCut,
        TcpOutcome::NoEndpoint,
        TcpOutcome::ConnectFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            TcpOutcome::Closed => "closed",
            TcpOutcome::IdleTimeout => "idle_timeout",
            TcpOutcome::DrainCut => "drain_cut",
            TcpOutcome::NoEndpoint => "no_endpoint",
            TcpOutcome::ConnectFailed => "connect_failed",
        }
    }
}

/// Handles for one L4 listener, by outcome.
pub(crate) struct TcpMetrics([IntCounter; 5]);

impl TcpMetrics {
    pub(crate) fn count(&self, outcome: TcpOutcome) {
        self.0[outcome as usize].inc();
    }
}

/// Handles for one endpoint.
pub(crate) struct EndpointMetrics {
    pub(crate) by_class: [IntCounter; 5],
    pub(crate) in_flight: IntGauge,
    pub(crate) connect_errors: IntCounter,
    pub(crate) ejections: IntCounter,
    pub(crate) ejected: IntGauge,
    /// The agent-wide count of connections cut at a drain deadline.
    pub(crate) drain_cuts: IntCounter,
    /// Its upstream HTTP/2 series, made at its first HTTP/2 connection
    /// (endpoints only ever reached over HTTP/1.1 show none).
    h2: std::sync::OnceLock<H2Metrics>,
    h2_source: (std::sync::Arc<H2Families>, [Box<str>; 3]),
}

impl EndpointMetrics {
    pub(crate) fn h2(&self) -> &H2Metrics {
        self.h2.get_or_init(|| {
            let (families, labels) = &self.h2_source;
            let labels = [&*labels[0], &*labels[1], &*labels[2]];
            H2Metrics {
                connections: families.connections.with_label_values(&labels),
                streams: families.streams.with_label_values(&labels),
                goaways: families.goaways.with_label_values(&labels),
            }
        })
    }
}

/// An endpoint's upstream HTTP/2 series.
#[derive(Clone)]
pub(crate) struct H2Metrics {
    /// Connections open to it, over every proxy thread.
    pub(crate) connections: IntGauge,
    /// Streams open on those.
    pub(crate) streams: IntGauge,
    /// GOAWAYs it sent.
    pub(crate) goaways: IntCounter,
}

struct H2Families {
    connections: IntGaugeVec,
    streams: IntGaugeVec,
    goaways: IntCounterVec,
}

/// Handles for one service.
pub(crate) struct ServiceMetrics {
    pub(crate) retries: IntCounter,
    pub(crate) fail_open: IntGauge,
    pub(crate) duration: Histogram,
    /// `switchyard_proxy_grpc_calls_total` of this service, a series made
    /// when its code is first seen (services that carry no gRPC show none).
    grpc: GrpcCodes,
    /// Requests by client protocol, indexed by `Protocol`.
    pub(crate) protocols: [IntCounter; 4],
    /// Failed TLS to the service's endpoints.
    pub(crate) tls: crate::upstream_tls::Failures,
}

/// The client side of a request, for `switchyard_proxy_requests_by_protocol_total`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Protocol {
    Http1 = 0,
    Http1Tls = 1,
    H2c = 2,
    H2 = 3,
}

const PROTOCOLS: [&str; 4] = ["http1", "http1_tls", "h2c", "h2"];

impl ServiceMetrics {
    pub(crate) fn request(&self, protocol: Protocol) {
        self.protocols[protocol as usize].inc();
    }
}

/// gRPC status names (codes 0 to 16), then the two labels of the rest.
const GRPC_CODES: [&str; 19] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
    "other",
    "none",
];

struct GrpcCodes {
    family: IntCounterVec,
    service: String,
    made: [std::sync::OnceLock<IntCounter>; 19],
}

impl GrpcCodes {
    /// The OK series exists from the start (at 0), so the family is there
    /// to see and to alert on before the first call.
    fn new(family: &IntCounterVec, service: &str) -> GrpcCodes {
        let codes = GrpcCodes {
            family: family.clone(),
            service: service.to_string(),
            made: Default::default(),
        };
        let _ = codes.made[0].set(family.with_label_values(&[service, GRPC_CODES[0]]));
        codes
    }
}

impl ServiceMetrics {
    /// Counts a gRPC call an endpoint answered with `status` (the value of
    /// its `grpc-status`; `None` when it carried none).
    pub(crate) fn grpc_call(&self, status: Option<&[u8]>) {
        let slot = match status {
            None => 18,
            Some(code) => std::str::from_utf8(code)
                .ok()
                .and_then(|c| c.parse::<usize>().ok())
                .filter(|&c| c <= 16)
                .unwrap_or(17),
        };
        let codes = &self.grpc;
        codes.made[slot]
            .get_or_init(|| {
                codes
                    .family
                    .with_label_values(&[codes.service.as_str(), GRPC_CODES[slot]])
            })
            .inc();
    }
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> Result<ProxyMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_requests_total",
                "Upstream responses by service, endpoint and status class",
            ),
            &["service", "node", "endpoint", "class"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_in_flight",
                "Requests in flight per endpoint",
            ),
            &["service", "node", "endpoint"],
        )?;
        let connect_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_connect_errors_total",
                "Failed upstream connects (refused, timed out)",
            ),
            &["service", "node", "endpoint"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_ejections_total",
                "Times an endpoint was ejected by outlier detection",
            ),
            &["service", "node", "endpoint"],
        )?;
        let ejected = IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_ejected",
                "1 while an endpoint is ejected by outlier detection",
            ),
            &["service", "node", "endpoint"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("switchyard_proxy_retries_total", "Retried requests"),
            &["service"],
        )?;
        let fail_open = IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_fail_open",
                "1 while a service sends to failing endpoints because too many are bad",
            ),
            &["service"],
        )?;
        let grpc = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_grpc_calls_total",
                "gRPC calls answered by a service's endpoints, by grpc-status (none: the answer carried no status)",
            ),
            &["service", "code"],
        )?;
        let protocols = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_requests_by_protocol_total",
                "Requests routed to a service, by the client's protocol (http1, http1_tls, h2c, h2)",
            ),
            &["service", "protocol"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_proxy_request_duration_seconds",
                "Time from the request head to the end of the upstream response head",
            )
            .buckets(exponential_buckets(0.000_1, 2.5, 14)?),
            &["service"],
        )?;
        let upstream_tls_failures = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_upstream_tls_failures_total",
                "Failed TLS handshakes with a service's endpoints, by reason (certificate: it did not verify; handshake: anything else)",
            ),
            &["service", "reason"],
        )?;
        let rejected_vec = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_rejected_total",
                "Requests the proxy answered itself, by reason",
            ),
            &["reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_rate_limited_total",
                "Requests a route's rate_limit answered 429, by route",
            ),
            &["route"],
        )?;
        let rate_share = GaugeVec::new(
            Opts::new(
                "switchyard_proxy_rate_limit_share",
                "This agent's share of a route's rate limit (1 in agent scope; in cluster scope its part of the cluster's traffic)",
            ),
            &["route"],
        )?;
        let subset_requests = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_subset_requests_total",
                "Requests a split route sent to a subset of its service's endpoints",
            ),
            &["route", "subset"],
        )?;
        let subset_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_subset_errors_total",
                "Requests of a split route's subset answered 5xx (the endpoint's or the proxy's), or a trailers-only gRPC failure",
            ),
            &["route", "subset"],
        )?;
        let subset_routable = IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_subset_routable",
                "1 while a split route's subset has a routable endpoint; 0: it gets no traffic, its weight goes to the others",
            ),
            &["route", "subset"],
        )?;
        registry.register(Box::new(subset_requests.clone()))?;
        registry.register(Box::new(subset_errors.clone()))?;
        registry.register(Box::new(subset_routable.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(rate_share.clone()))?;
        let rejected = Reject::ALL
            .iter()
            .map(|r| rejected_vec.with_label_values(&[r.label()]))
            .collect();
        let connections = IntGauge::new(
            "switchyard_proxy_client_connections",
            "Open client connections",
        )?;
        let thread_connections = IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_thread_connections",
                "Open client connections (HTTP, HTTPS and L4) by proxy thread (new ones go to the least busy)",
            ),
            &["thread"],
        )?;
        let ring_wakeup = GaugeVec::new(
            Opts::new(
                "switchyard_proxy_io_uring_wakeup_seconds",
                "Median wake-up latency of each proxy thread's io_uring, measured at start (over 1 ms: the thread uses tokio's sockets)",
            ),
            &["thread"],
        )?;
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_accept_errors_total",
                "Failed accepts by listener (out of descriptors: the loop pauses)",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(accept_errors.clone()))?;
        let upgrades = IntCounter::new(
            "switchyard_proxy_upgrades_total",
            "Connections upgraded to a tunnel (WebSocket and other 101 responses)",
        )?;
        let spliced_bytes = IntCounter::new(
            "switchyard_proxy_spliced_bytes_total",
            "HTTP/1.1 body bytes moved with splice(2), never copied into the proxy",
        )?;
        let relayed = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_tcp_relays_total",
                "L4 connections whose bytes went through a proxy thread's io_uring (via=io_uring) or a recv/send loop (via=copy)",
            ),
            &["via"],
        )?;
        let relayed_io_uring = relayed.with_label_values(&["io_uring"]);
        let relayed_copy = relayed.with_label_values(&["copy"]);
        let http_sockets = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_http_sockets_total",
                "Plain HTTP/1.1 connections opened, client and upstream, whose reads and writes go through a proxy thread's io_uring (via=io_uring) or tokio's reactor (via=tokio)",
            ),
            &["via"],
        )?;
        let http_io_uring = http_sockets.with_label_values(&["io_uring"]);
        let http_tokio = http_sockets.with_label_values(&["tokio"]);
        let tcp = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_tcp_connections_total",
                "L4 connections by listener and how they ended",
            ),
            &["listener", "outcome"],
        )?;
        let drain_cuts = IntCounter::new(
            "switchyard_proxy_drain_cuts_total",
            "Long-lived connections (WebSocket, HTTP/2 streams, L4) closed at their endpoint's drain deadline",
        )?;
        registry.register(Box::new(drain_cuts.clone()))?;
        registry.register(Box::new(tcp.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(connect_errors.clone()))?;
        registry.register(Box::new(upstream_tls_failures.clone()))?;
        registry.register(Box::new(ring_wakeup.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(ejected.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(fail_open.clone()))?;
        registry.register(Box::new(grpc.clone()))?;
        registry.register(Box::new(protocols.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(rejected_vec))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(thread_connections.clone()))?;
        registry.register(Box::new(upgrades.clone()))?;
        let goaways_vec = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_h2_goaways_sent_total",
                "GOAWAYs sent to HTTP/2 client connections, by reason (idle, max_age, shutdown)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(goaways_vec.clone()))?;
        let goaways = [GoAway::Idle, GoAway::MaxAge, GoAway::Shutdown]
            .map(|why| goaways_vec.with_label_values(&[why.label()]));
        registry.register(Box::new(spliced_bytes.clone()))?;
        registry.register(Box::new(relayed))?;
        registry.register(Box::new(http_sockets))?;
        let h2 = H2Families {
            connections: IntGaugeVec::new(
                Opts::new(
                    "switchyard_proxy_upstream_h2_connections",
                    "HTTP/2 connections open to an endpoint (gRPC, h2c and h2 routes), over every proxy thread",
                ),
                &["service", "node", "endpoint"],
            )?,
            streams: IntGaugeVec::new(
                Opts::new(
                    "switchyard_proxy_upstream_h2_streams",
                    "HTTP/2 streams open to an endpoint",
                ),
                &["service", "node", "endpoint"],
            )?,
            goaways: IntCounterVec::new(
                Opts::new(
                    "switchyard_proxy_upstream_h2_goaways_received_total",
                    "GOAWAYs an endpoint sent the proxy's HTTP/2 connections",
                ),
                &["service", "node", "endpoint"],
            )?,
        };
        registry.register(Box::new(h2.connections.clone()))?;
        registry.register(Box::new(h2.streams.clone()))?;
        registry.register(Box::new(h2.goaways.clone()))?;
        Ok(ProxyMetrics {
            h2: std::sync::Arc::new(h2),
            requests,
            in_flight,
            connect_errors,
            upstream_tls_failures,
            ejections,
            ejected,
            retries,
            fail_open,
            grpc,
            protocols,
            duration,
            rejected,
            rate_limited,
            rate_share,
            subset_requests,
            subset_errors,
            subset_routable,
            connections,
            thread_connections,
            ring_wakeup,
            upgrades,
            goaways,
            accept_errors,
            spliced_bytes,
            relayed_io_uring,
            relayed_copy,
            http_io_uring,
            http_tokio,
            tcp,
            drain_cuts,
        })
    }

    pub(crate) fn tcp_listener(&self, listener: &str) -> TcpMetrics {
        TcpMetrics(
            TcpOutcome::ALL.map(|outcome| self.tcp.with_label_values(&[listener, outcome.label()])),
        )
    }

    pub(crate) fn reject(&self, why: Reject) {
        self.rejected[why as usize].inc();
    }

    /// Gives a split route's subsets their series.
    pub(crate) fn attach_split(&self, route: &str, split: &crate::split::Split) {
        for subset in split.subsets.iter() {
            let labels = [route, &*subset.tag];
            subset.metrics.get_or_init(|| crate::split::SubsetMetrics {
                requests: self.subset_requests.with_label_values(&labels),
                errors: self.subset_errors.with_label_values(&labels),
                routable: {
                    let gauge = self.subset_routable.with_label_values(&labels);
                    gauge.set(1);
                    gauge
                },
            });
        }
    }

    /// Gives a route's rate limiter its counter and share gauge.
    pub(crate) fn attach_limit(&self, route: &str, limiter: &crate::limit::RateLimiter) {
        let _ = limiter
            .refused
            .get_or_init(|| self.rate_limited.with_label_values(&[route]));
        limiter
            .share_gauge
            .get_or_init(|| self.rate_share.with_label_values(&[route]))
            .set(limiter.share());
    }

    /// Counts a GOAWAY sent to an HTTP/2 client.
    pub(crate) fn goaway(&self, why: GoAway) {
        self.goaways[why as usize].inc();
    }

    pub(crate) fn endpoint(&self, service: &str, node: &str, id: &str) -> EndpointMetrics {
        let class = |c: &str| self.requests.with_label_values(&[service, node, id, c]);
        EndpointMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            in_flight: self.in_flight.with_label_values(&[service, node, id]),
            connect_errors: self.connect_errors.with_label_values(&[service, node, id]),
            ejections: self.ejections.with_label_values(&[service, node, id]),
            ejected: self.ejected.with_label_values(&[service, node, id]),
            drain_cuts: self.drain_cuts.clone(),
            h2: std::sync::OnceLock::new(),
            h2_source: (self.h2.clone(), [service.into(), node.into(), id.into()]),
        }
    }

    pub(crate) fn forget_endpoint(&self, service: &str, node: &str, id: &str) {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let _ = self
                .requests
                .remove_label_values(&[service, node, id, class]);
        }
        let _ = self.in_flight.remove_label_values(&[service, node, id]);
        let _ = self
            .connect_errors
            .remove_label_values(&[service, node, id]);
        let _ = self.ejections.remove_label_values(&[service, node, id]);
        let _ = self.ejected.remove_label_values(&[service, node, id]);
        let _ = self
            .h2
            .connections
            .remove_label_values(&[service, node, id]);
        let _ = self.h2.streams.remove_label_values(&[service, node, id]);
        let _ = self.h2.goaways.remove_label_values(&[service, node, id]);
    }

    pub(crate) fn service(&self, service: &str) -> ServiceMetrics {
        ServiceMetrics {
            retries: self.retries.with_label_values(&[service]),
            fail_open: self.fail_open.with_label_values(&[service]),
            duration: self.duration.with_label_values(&[service]),
            grpc: GrpcCodes::new(&self.grpc, service),
            protocols: PROTOCOLS.map(|p| self.protocols.with_label_values(&[service, p])),
            tls: crate::upstream_tls::Failures {
                service: std::sync::Arc::from(service),
                certificate: self
                    .upstream_tls_failures
                    .with_label_values(&[service, "certificate"]),
                handshake: self
                    .upstream_tls_failures
                    .with_label_values(&[service, "handshake"]),
            },
        }
    }

    pub(crate) fn forget_service(&self, service: &str) {
        let _ = self.retries.remove_label_values(&[service]);
        for reason in ["certificate", "handshake"] {
            let _ = self
                .upstream_tls_failures
                .remove_label_values(&[service, reason]);
        }
        let _ = self.fail_open.remove_label_values(&[service]);
        let _ = self.duration.remove_label_values(&[service]);
        for code in GRPC_CODES {
            let _ = self.grpc.remove_label_values(&[service, code]);
        }
        for protocol in PROTOCOLS {
            let _ = self.protocols.remove_label_values(&[service, protocol]);
        }
    }
}
