//! Entry point for the cargo-fuzz target `api_request` in `fuzz/` (feature
//! `fuzzing`): any request through the API's router, against a fresh
//! in-memory registry holding one node and one service.
//!
//! Input: a method byte, the request target up to the first newline, then
//! the body. Checked:
//! - no panic, and no 500 (bad input is the client's fault: 4xx) beyond
//!   the two Consul answers with one to client mistakes;
//! - an answer within 5 s (the fixture is shutting down, so blocking
//!   queries answer at once);
//! - a refused request (4xx) changes nothing: the catalog index is the same.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::config::ApiConfig;
use crate::{router, AgentInfo, ApiState, Tokens};
use switchyard_catalog::model::{Endpoint, Node};
use switchyard_registry::MemoryStore;
use switchyard_registry::Registry;
use switchyard_registry::RegistryMetrics;
use switchyard_registry::{Batch, Command};

/// The 500s Consul itself answers to client mistakes, kept for compatibility.
const CONSUL_500: [&str; 2] = ["No path to datacenter", "CheckID \""];

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    /// Kept so the API sees the agent as shutting down.
    _shutdown: watch::Sender<bool>,
    shutting_down: watch::Receiver<bool>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("fuzz fixture runtime: {e}"),
        };
        let (shutdown, shutting_down) = watch::channel(true);
        Fixture {
            runtime,
            _shutdown: shutdown,
            shutting_down,
        }
    })
}

/// Sends one request made of `data`; panics when an invariant breaks.
pub fn api_request(data: &[u8]) {
    let Some((&method, rest)) = data.split_first() else {
        return;
    };
    let (target, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(newline) => (&rest[..newline], &rest[newline + 1..]),
        None => (rest, &[][..]),
    };
    let request = Request::builder()
        .method(METHODS[usize::from(method) % METHODS.len()])
        .uri(target)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()));
    // Targets no HTTP parser would hand over are not the API's concern.
    let Ok(request) = request else {
        return;
    };
    let fixture = fixture();
    fixture.runtime.block_on(async {
        let registry = registry().await;
        let state = Arc::new(ApiState {
            registry: registry.clone(),
            agent: AgentInfo {
                node_name: "n1".to_string(),
                datacenter: "dc1".to_string(),
                advertise_addr: "127.0.0.1".to_string(),
                version: "fuzz",
            },
            config: ApiConfig {
                max_body_bytes: 1 << 20,
                max_batch_endpoints: 100,
                ..ApiConfig::default()
            },
            prometheus: prometheus::Registry::new(),
            shutdown: fixture.shutting_down.clone(),
            load: None,
            tokens: Tokens::default(),
            listeners: OnceLock::new(),
            answers: Default::default(),
            federation: None,
            xds: None,
            routes: None,
            copies: None,
        });
        let before = registry.snapshot().index();
        let answer =
            tokio::time::timeout(Duration::from_secs(5), router(state).oneshot(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => match e {},
            Err(_) => panic!("no answer within 5 s: {:?}", String::from_utf8_lossy(data)),
        };
        let status = response.status();
        if status.as_u16() == 500 {
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            assert!(
                CONSUL_500.iter().any(|known| text.starts_with(known)),
                "a request made the API fail ({text}): {:?}",
                String::from_utf8_lossy(data)
            );
        }
        if status.is_client_error() {
            assert_eq!(
                registry.snapshot().index(),
                before,
                "a refused request ({status}) changed the catalog: {:?}",
                String::from_utf8_lossy(data)
            );
        }
    });
}

async fn registry() -> Registry {
    let metrics = Arc::new(RegistryMetrics::unregistered());
    let (registry, _writer) = match Registry::start(MemoryStore::default(), metrics) {
        Ok(started) => started,
        Err(e) => panic!("fuzz fixture registry: {e}"),
    };
    let mut endpoint = Endpoint::new("n1", "web-1", "web", 80);
    endpoint.tags = vec!["v1".to_string()];
    let batch = Batch {
        nodes: vec![Node::new("n1", "10.0.0.1")],
        endpoints: vec![(endpoint, Vec::new())],
        ..Batch::default()
    };
    if let Err(e) = registry.apply(Command::Batch(batch)).await {
        panic!("fuzz fixture batch: {e}");
    }
    registry
}

#[cfg(test)]
mod tests {
    /// Requests the mutations start from: one per kind of body the API reads.
    const SEEDS: &[&[u8]] = &[
        b"\x01/v1/agent/service/register\n{\"Name\":\"pay\",\"ID\":\"pay-1\",\"Port\":9000,\"Tags\":[\"a\"],\"Meta\":{\"k\":\"v\"},\"Weights\":{\"Passing\":3,\"Warning\":1},\"Check\":{\"TTL\":\"30s\",\"DeregisterCriticalServiceAfter\":\"1m\"}}",
        b"\x01/v1/agent/service/register?replace-existing-checks=true\n{\"Name\":\"pay\",\"Checks\":[{\"HTTP\":\"http://127.0.0.1:1/\",\"Interval\":\"10s\",\"Timeout\":\"1s\"},{\"TCP\":\"127.0.0.1:1\",\"Interval\":\"5s\"}]}",
        b"\x01/v1/catalog/register\n{\"Node\":\"n2\",\"Address\":\"10.0.0.2\",\"Service\":{\"Service\":\"db\",\"ID\":\"db-1\",\"Port\":5432},\"Checks\":[{\"CheckID\":\"c\",\"Name\":\"c\",\"Status\":\"passing\",\"ServiceID\":\"db-1\"}]}",
        b"\x01/v1/catalog/deregister\n{\"Node\":\"n1\",\"ServiceID\":\"web-1\"}",
        b"\x01/v1/agent/check/register\n{\"Name\":\"disk\",\"ID\":\"disk\",\"TTL\":\"15s\",\"ServiceID\":\"web-1\"}",
        b"\x01/v1/agent/check/update/disk\n{\"Status\":\"warning\",\"Output\":\"80%\"}",
        b"\x01/v1/agent/check/pass/disk?note=ok\n",
        b"\x01/v1/agent/service/maintenance/web-1?enable=true&reason=x\n",
        b"\x01/v1/agent/maintenance?enable=false\n",
        b"\x01/v1/switchyard/batch\n{\"nodes\":[{\"name\":\"n3\",\"address\":\"10.3.0.1\",\"meta\":{\"a\":\"b\"}}],\"endpoints\":[{\"node\":\"n3\",\"service\":\"pay\",\"id\":\"pay-2\",\"port\":9001,\"checks\":[{\"ttl\":\"1m\"},{\"http\":\"http://10.3.0.1:9001/h\",\"interval\":\"5s\",\"success_status\":\"200-299\"}]}],\"deregister\":[{\"node\":\"n1\",\"id\":\"web-1\"}]}",
        b"\x01/v1/switchyard/heartbeat\n{\"checks\":[{\"node\":\"n1\",\"id\":\"service:web-1\",\"status\":\"passing\",\"output\":\"ok\"}]}",
        b"\x01/v1/switchyard/nodes/n1/drain?deadline=30s\n",
        b"\x03/v1/switchyard/nodes/n1/drain\n",
        b"\x01/v1/switchyard/endpoints/web-1/drain?node=n1&deadline=1m\n",
        b"\x01/v1/switchyard/endpoints/web-1/maintenance?node=n1&enable=true\n",
        b"\x00/v1/health/service/web?passing=1&index=1&wait=5s&tag=v1&near=_agent\n",
        b"\x00/v1/catalog/service/web?index=100&wait=1m&dc=dc1&stale\n",
        b"\x00/v1/health/state/critical\n",
        b"\x00/v1/switchyard/services/web\n",
        b"\x00/ui/services/web?fragment=1\n",
        b"\x00/metrics\n",
    ];

    #[test]
    fn the_fuzz_entry_point_survives_a_corpus() {
        let mut rng = fastrand::Rng::with_seed(11);
        const NOISE: &[u8] = b"{}[]\":,0-9.eE+\\u00 \ntrue null ?&=%/";
        for round in 0..3000 {
            let mut input = SEEDS[round % SEEDS.len()].to_vec();
            if round >= SEEDS.len() {
                for _ in 0..rng.usize(1..4) {
                    if input.len() < 2 {
                        break;
                    }
                    // Mostly in the body; now and then in the target.
                    let newline = input.iter().position(|&b| b == b'\n').unwrap_or(1);
                    let i = match rng.u8(0..5) {
                        0 => rng.usize(1..input.len()),
                        _ => rng.usize(newline.max(1)..input.len()),
                    };
                    match rng.u8(0..3) {
                        0 => input[i] = NOISE[rng.usize(..NOISE.len())],
                        1 => {
                            input.remove(i);
                        }
                        _ => input.insert(i, NOISE[rng.usize(..NOISE.len())]),
                    }
                }
            }
            super::api_request(&input);
        }
    }
}
