//! What a drain waits for: live traffic on endpoints, as the data plane
//! (the proxy) counts it. The registry defines the question; the binary plugs
//! in the proxy's answer, so the arrow still points to the registry.

/// Traffic on one endpoint right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointLoad {
    /// Requests and long-lived connections (WebSocket, L4) open to it.
    pub in_flight: u64,
    /// Long-lived connections closed at its drain deadline (since the drain began).
    pub cut: u64,
}

/// A source of live per-endpoint load.
pub trait LoadReport: Send + Sync {
    /// The load on endpoint `id` of `service` on `node`; zero for one the data
    /// plane does not carry traffic to.
    fn endpoint_load(&self, service: &str, node: &str, id: &str) -> EndpointLoad;
}
