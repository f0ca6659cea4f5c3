//! DNS metrics. Counter handles for every (qtype, rcode) pair are created up
//! front, so a query pays one atomic add, never a label lookup.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::wire::{rcode, rtype};

const QTYPES: [(u16, &str); 8] = [
    (rtype::A, "A"),
    (rtype::AAAA, "AAAA"),
    (rtype::SRV, "SRV"),
    (rtype::ANY, "ANY"),
    (rtype::SOA, "SOA"),
    (rtype::NS, "NS"),
    (rtype::TXT, "TXT"),
    (rtype::PTR, "PTR"),
];
const RCODES: [(u8, &str); 6] = [
    (rcode::NOERROR, "NOERROR"),
    (rcode::FORMERR, "FORMERR"),
    (rcode::SERVFAIL, "SERVFAIL"),
    (rcode::NXDOMAIN, "NXDOMAIN"),
    (rcode::NOTIMP, "NOTIMP"),
    (rcode::REFUSED, "REFUSED"),
];

pub struct DnsMetrics {
    /// `[qtype][rcode]`, with a last row/column for "other".
    queries: Vec<Vec<IntCounter>>,
    pub(crate) truncated: IntCounter,
    pub(crate) dropped: IntCounter,
    pub(crate) rate_limited: IntCounter,
    pub(crate) duration: Histogram,
    pub(crate) tcp_connections: IntCounter,
    pub(crate) tcp_accept_errors: IntCounter,
    /// TCP connections refused: the listener's or the client's cap.
    pub(crate) tcp_refused: IntCounterVec,
}

impl DnsMetrics {
    pub fn new(registry: &Registry) -> Result<DnsMetrics, prometheus::Error> {
        let vec = IntCounterVec::new(
            Opts::new(
                "switchyard_dns_queries_total",
                "DNS queries by question type and response code",
            ),
            &["qtype", "rcode"],
        )?;
        let qtypes = QTYPES.iter().map(|(_, n)| *n).chain(["other"]);
        let queries = qtypes
            .map(|qt| {
                RCODES
                    .iter()
                    .map(|(_, n)| *n)
                    .chain(["other"])
                    .map(|rc| vec.with_label_values(&[qt, rc]))
                    .collect()
            })
            .collect();
        let truncated = IntCounter::new(
            "switchyard_dns_truncated_total",
            "Responses sent with TC set because answers did not fit",
        )?;
        let dropped = IntCounter::new(
            "switchyard_dns_dropped_total",
            "Packets dropped without an answer (too short, or not a query)",
        )?;
        let rate_limited = IntCounter::new(
            "switchyard_dns_rate_limited_total",
            "UDP queries dropped by the per-client response rate limit",
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_dns_query_duration_seconds",
                "Time to build one answer",
            )
            .buckets(exponential_buckets(0.000_000_5, 3.0, 12)?),
        )?;
        let tcp_connections = IntCounter::new(
            "switchyard_dns_tcp_connections_total",
            "TCP connections accepted",
        )?;
        registry.register(Box::new(vec))?;
        registry.register(Box::new(truncated.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(tcp_connections.clone()))?;
        let tcp_accept_errors = IntCounter::new(
            "switchyard_dns_tcp_accept_errors_total",
            "Failed accepts on the DNS TCP listener (out of descriptors: the loop pauses)",
        )?;
        registry.register(Box::new(tcp_accept_errors.clone()))?;
        let tcp_refused = IntCounterVec::new(
            Opts::new(
                "switchyard_dns_tcp_refused_total",
                "TCP connections closed at accept: dns.max_tcp_connections or max_tcp_connections_per_client reached",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(tcp_refused.clone()))?;
        for reason in ["connection_limit", "client_connection_limit"] {
            tcp_refused.with_label_values(&[reason]);
        }
        Ok(DnsMetrics {
            queries,
            truncated,
            dropped,
            rate_limited,
            duration,
            tcp_connections,
            tcp_accept_errors,
            tcp_refused,
        })
    }

    pub(crate) fn count(&self, qtype: u16, rcode: u8, truncated: bool) {
        let q = QTYPES
            .iter()
            .position(|(t, _)| *t == qtype)
            .unwrap_or(QTYPES.len());
        let r = RCODES
            .iter()
            .position(|(c, _)| *c == rcode)
            .unwrap_or(RCODES.len());
        if let Some(counter) = self.queries.get(q).and_then(|row| row.get(r)) {
            counter.inc();
        }
        if truncated {
            self.truncated.inc();
        }
    }
}
