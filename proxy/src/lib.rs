//! Switchyard proxy: L7 load balancing driven by registry snapshots.
//!
//! HTTP/1.1 runs on a data path of our own (`server.rs`, `conn.rs`,
//! `wire.rs`): thread-per-core, httparse into a fixed header array, pooled
//! buffers and upstream connections per thread, strict framing. Each routed
//! service's backends are built at publish time by `ProxyDecorator` (in the
//! registry writer), so a request after an API acknowledgment already sees the
//! change. Per-endpoint state (in-flight, latency, failures, ejection) is in
//! atomics. Depends on `switchyard-catalog` only, never on the registry or the
//! DNS crate.
#![forbid(unsafe_code)]

mod access;
mod api_routes;
mod attempts;
mod backend;
mod balance;
mod compress;
mod config;
mod conn;
mod deadline;
mod failover;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod grace;
mod grpc_web;
mod h2_frame;
mod h2_server;
mod h2_tls;
mod hpack;
mod io;
mod limit;
mod local;
mod metrics;
mod passive;
mod policy;
mod route;
mod server;
mod shared;
mod splice;
mod split;
mod stats;
mod tcp;
mod tls;
mod upstream_h1;
mod upstream_h2;
mod upstream_tls;
mod wire;

use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_catalog::{ExtraKey, Snapshot};

pub use api_routes::{check_name as check_route_name, check_route};
pub use backend::{ProxyDecorator, ProxyService};
pub use config::{
    BalancerKind, CertificateConfig, Config, HashOn, OutlierConfig, PassiveReport, RouteConfig,
    TcpBalancer, TcpConfig, TcpListenerConfig, TlsConfig,
};
pub use limit::{RateLimitConfig, Scope as RateLimitScope};
pub use metrics::ProxyMetrics;
pub use passive::{report_passive_failures, PASSIVE_CHECK_PREFIX};
pub use policy::{HeaderEditsConfig, RedirectConfig, RespondConfig};
pub use route::{HOST_TAG, PATH_TAG};
pub use server::{Proxy, ProxySockets};
pub use shared::ReloadPlan;
pub use split::{MatchConfig, SplitConfig};

impl Proxy {
    /// Starts the proxy threads. `backends` is the key the registry's
    /// `Decorators` gave `decorator`.
    pub fn start_with(
        decorator: &ProxyDecorator,
        backends: ExtraKey<ProxyDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        inherited: Option<ProxySockets>,
    ) -> std::io::Result<Proxy> {
        Proxy::start(decorator.shared.clone(), backends, snapshot, inherited)
    }
}
