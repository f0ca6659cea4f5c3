//! What a drain waits for: live traffic on endpoints, as the data plane
//! (the proxy) counts it. The registry defines the question; the binary plugs
//! in the proxy's answer, so the arrow still points to the registry. In
//! cluster mode agents exchange their counts, and a drain sums them.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::model::{unix_ms, Name};

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

/// One agent's report as it travels (JSON under its lease).
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    /// When it was taken: the reporting agent's clock, Unix ms.
    at_ms: u64,
    busy: Vec<BusyEndpoint>,
}

/// Traffic per endpoint summed over the other agents, and when each last reported.
#[derive(Default)]
struct Remote {
    by_endpoint: HashMap<(Name, Name, Name), (u64, u64)>,
    reported: HashMap<Name, u64>,
}

/// The exchange of live load among agents sharing a catalog: this agent's
/// data plane (to report) and the others' last reports (to add). The shared
/// store's membership loop moves the reports about once a second.
#[derive(Default)]
pub struct LoadBoard {
    local: OnceLock<Arc<dyn LoadReport>>,
    remote: ArcSwap<Remote>,
}

impl std::fmt::Debug for LoadBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remote = self.remote.load();
        f.debug_struct("LoadBoard")
            .field("local", &self.local.get().is_some())
            .field("remote_endpoints", &remote.by_endpoint.len())
            .field("reported", &remote.reported)
            .finish()
    }
}

impl LoadBoard {
    /// The data plane whose load this agent reports (set once, at start).
    pub fn set_local(&self, report: Arc<dyn LoadReport>) {
        let _ = self.local.set(report);
    }

    /// This agent's report now, encoded (an empty one without a data plane).
    pub(crate) fn encode_local(&self) -> Vec<u8> {
        let busy = self.local.get().map(|l| l.busy()).unwrap_or_default();
        let wire = Wire {
            at_ms: unix_ms(),
            busy,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Replaces the others' load with the reports just read: `(agent, bytes)`.
    /// An undecodable report counts as none.
    pub(crate) fn set_remote<'a>(&self, reports: impl Iterator<Item = (Name, &'a [u8])>) {
        let mut remote = Remote::default();
        for (agent, bytes) in reports {
            let Ok(wire) = serde_json::from_slice::<Wire>(bytes) else {
                tracing::debug!(%agent, "undecodable load report");
                continue;
            };
            for busy in wire.busy {
                let sum = remote
                    .by_endpoint
                    .entry((busy.service, busy.node, busy.id))
                    .or_default();
                sum.0 = sum.0.saturating_add(busy.in_flight);
                sum.1 = sum.1.saturating_add(busy.cut);
            }
            remote.reported.insert(agent, wire.at_ms);
        }
        self.remote.store(Arc::new(remote));
    }
}

/// This agent's data plane plus what the other agents sharing the catalog
/// last reported: a drain status that counts work in flight through any agent.
pub struct ClusterLoad {
    local: Arc<dyn LoadReport>,
    status: Arc<crate::StoreStatus>,
}

impl ClusterLoad {
    pub fn new(local: Arc<dyn LoadReport>, status: Arc<crate::StoreStatus>) -> ClusterLoad {
        status.board().set_local(local.clone());
        ClusterLoad { local, status }
    }
}

impl LoadReport for ClusterLoad {
    fn endpoint_load(&self, service: &str, node: &str, id: &str) -> EndpointLoad {
        let mut load = self.local.endpoint_load(service, node, id);
        let remote = self.status.board().remote.load();
        let key = (Name::from(service), Name::from(node), Name::from(id));
        if let Some((in_flight, cut)) = remote.by_endpoint.get(&key) {
            load.in_flight = load.in_flight.saturating_add(*in_flight);
            load.cut = load.cut.saturating_add(*cut);
        }
        load
    }

    fn service_load(&self, service: &str) -> Option<ServiceLoad> {
        self.local.service_load(service)
    }

    fn busy(&self) -> Vec<BusyEndpoint> {
        self.local.busy()
    }

    /// Every other live agent has reported since `since_ms`: a zero count is
    /// then a fact, not a report from before the drain.
    fn complete_after(&self, since_ms: u64) -> bool {
        let remote = self.status.board().remote.load();
        let me = self.status.me();
        self.status
            .members()
            .iter()
            .filter(|m| Some(*m) != me)
            .all(|m| remote.reported.get(m).is_some_and(|at| *at >= since_ms))
    }
}
