//! Live traffic on endpoints across agents: in cluster mode each agent
//! reports its data plane's counts (`switchyard_catalog::LoadReport`) and a
//! drain sums every agent's.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use switchyard_catalog::{
    unix_ms, BusyEndpoint, EndpointLoad, LoadReport, Name, RateSeen, ServiceLoad,
};

/// One agent's report as it travels (JSON under its lease).
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    /// When it was taken: the reporting agent's clock, Unix ms.
    at_ms: u64,
    busy: Vec<BusyEndpoint>,
    /// Requests on routes with a cluster-wide rate limit since the last
    /// report (absent from agents before rate limits).
    #[serde(default)]
    rates: Vec<RateSeen>,
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
        let rates = self.local.get().map(|l| l.rates_seen()).unwrap_or_default();
        let wire = Wire {
            at_ms: unix_ms(),
            busy,
            rates,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Replaces the others' load with the reports just read: `(agent, bytes)`.
    /// An undecodable report counts as none.
    pub(crate) fn set_remote<'a>(&self, reports: impl Iterator<Item = (Name, &'a [u8])>) {
        let mut remote = Remote::default();
        let mut rates: HashMap<Name, RateSeen> = HashMap::new();
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
            for seen in wire.rates {
                let sum = rates.entry(seen.route.clone()).or_insert(RateSeen {
                    route: seen.route,
                    seen: 0,
                    agents: 0,
                });
                sum.seen = sum.seen.saturating_add(seen.seen);
                sum.agents = sum.agents.saturating_add(1);
            }
            remote.reported.insert(agent, wire.at_ms);
        }
        self.remote.store(Arc::new(remote));
        if let Some(local) = self.local.get() {
            let rates: Vec<RateSeen> = rates.into_values().collect();
            local.share_rates(&rates);
        }
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
