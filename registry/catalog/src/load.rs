//! What a drain waits for: live traffic on endpoints, as the data plane
//! (the proxy) counts it. The catalog defines the question; the binary plugs
//! in the proxy's answer, so the arrows still point to the catalog. In
//! cluster mode agents exchange their counts (the registry's `LoadBoard`),
//! and a drain sums them.

use crate::model::Name;

/// Traffic on one endpoint right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointLoad {
    /// Requests and long-lived connections (WebSocket, L4) open to it.
    pub in_flight: u64,
    /// Long-lived connections closed at its drain deadline (since the drain began).
    pub cut: u64,
    /// Taken out by the proxy's passive outlier detection, for now.
    pub ejected: bool,
    /// Failures in a row the proxy has seen (connect errors, timeouts, 5xx).
    pub failures: u32,
    /// Responses it has sent since the proxy began routing to it (a rate is
    /// two readings apart).
    pub requests: u64,
    /// The balancer's peak-EWMA response time (microseconds; 0 before the
    /// first response).
    pub latency_us: u64,
}

/// The data plane's view of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceLoad {
    /// Too many endpoints fail: the proxy sends to failing ones rather than none.
    pub fail_open: bool,
}

/// A source of live per-endpoint load.
pub trait LoadReport: Send + Sync {
    /// The load on endpoint `id` of `service` on `node`; zero for one the data
    /// plane does not carry traffic to.
    fn endpoint_load(&self, service: &str, node: &str, id: &str) -> EndpointLoad;

    /// The service's state in the data plane; `None` when it carries no
    /// traffic to it (no route or listener names it).
    fn service_load(&self, service: &str) -> Option<ServiceLoad>;

    /// Every endpoint with work in flight or connections cut (what this
    /// agent reports to the others in cluster mode).
    fn busy(&self) -> Vec<BusyEndpoint> {
        Vec::new()
    }

    /// Whether the counts include every agent's traffic as of `since_ms`
    /// (Unix ms): always, for a single agent.
    fn complete_after(&self, since_ms: u64) -> bool {
        let _ = since_ms;
        true
    }

    /// Requests seen on each route with a cluster-wide rate limit since the
    /// last call (what this agent reports to the others, about once a second).
    fn rates_seen(&self) -> Vec<RateSeen> {
        Vec::new()
    }

    /// The other live agents' reports on those routes, summed per route
    /// (`agents`: how many reported it): each agent then admits its share.
    fn share_rates(&self, others: &[RateSeen]) {
        let _ = others;
    }
}

/// Requests one agent (or, summed, several) saw on a route with a
/// cluster-wide rate limit over about a second.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateSeen {
    #[serde(rename = "r")]
    pub route: Name,
    #[serde(rename = "n")]
    pub seen: u64,
    /// Agents counted in `seen`.
    #[serde(rename = "a", default = "one")]
    pub agents: u32,
}

fn one() -> u32 {
    1
}

/// One endpoint with traffic through one agent's data plane: what agents
/// sharing a catalog tell each other, so a drain counts every agent's work.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BusyEndpoint {
    #[serde(rename = "s")]
    pub service: Name,
    #[serde(rename = "n")]
    pub node: Name,
    #[serde(rename = "i")]
    pub id: Name,
    #[serde(rename = "f")]
    pub in_flight: u64,
    #[serde(rename = "c")]
    pub cut: u64,
}
