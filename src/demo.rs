//! `agent --demo`: three tiny HTTP backends inside the agent, registered as
//! service `demo` (with HTTP checks) and routed from host `demo.localhost`
//! round robin, so a newcomer can dig, curl and open the dashboard at once.
//! They listen on 127.0.0.1:9001-9003, where the README's steps find them
//! (a port already taken gets a free one instead).

use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::State;
use axum::http::{Method, Uri};
use axum::routing::get;
use axum::Router;
use switchyard_proxy::{BalancerKind, RouteConfig};
use switchyard_registry::Registry;

/// The service the demo registers and the host that routes to it.
pub(crate) const SERVICE: &str = "demo";
pub(crate) const HOST: &str = "demo.localhost";
const BACKENDS: usize = 3;
/// Backend n listens on `FIRST_PORT + n - 1` when that port is free.
const FIRST_PORT: u16 = 9001;

/// The route `--demo` adds to the `[http]` routes (again at every reload).
pub(crate) fn route() -> RouteConfig {
    let mut route = RouteConfig::to_service(SERVICE);
    route.host = Some(HOST.to_string());
    route.balancer = Some(BalancerKind::RoundRobin);
    route
}

/// Starts the backends on loopback ports of their own and registers them on
/// `node`. They live as long as the agent's runtime.
pub(crate) async fn start(registry: &Registry, node: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(BACKENDS);
    for n in 1..=BACKENDS {
        let id = format!("{SERVICE}-{n}");
        let port = FIRST_PORT + n as u16 - 1;
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => listener,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot listen for a demo backend")?,
        };
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/health", get(|| async { "ok\n" }))
            .fallback(hello)
            .with_state(id.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "demo backend stopped");
            }
        });
        let definition = serde_json::json!({
            "Name": SERVICE,
            "ID": id,
            "Address": "127.0.0.1",
            "Port": addr.port(),
            "Tags": ["demo", format!("backend-{n}")],
            "Meta": {"started-by": "switchyard agent --demo"},
            "Check": {
                "Name": "demo HTTP health",
                "HTTP": format!("http://{addr}/health"),
                "Interval": "5s",
                "Status": "passing",
            },
        });
        let command = switchyard_api::service_definition(node, definition.to_string().as_bytes())
            .map_err(anyhow::Error::msg)?;
        registry
            .apply(command)
            .await
            .context("cannot register a demo backend")?;
        addrs.push(addr);
    }
    Ok(addrs)
}

async fn hello(State(id): State<String>, method: Method, uri: Uri) -> String {
    format!("hello from {id}: {method} {uri}\n")
}
