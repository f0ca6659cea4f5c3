//! Durability: a `kill -9` loses nothing that was acknowledged.

use serde_json::{json, Value};

use crate::support::Agent;

#[test]
fn kill_9_keeps_every_endpoint_and_the_index() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("data");
    let agent = Agent::start_in(&dir, &[]);
    let c = agent.client();
    // 1,000 endpoints over 10 nodes, in 4 batches, plus Consul-style writes.
    for part in 0..4 {
        let nodes: Vec<Value> = (0..10)
            .map(|n| json!({"name": format!("node-{n}"), "address": format!("10.2.0.{}", n + 1)}))
            .collect();
        let endpoints: Vec<Value> = (0..250)
            .map(|i| {
                let k = part * 250 + i;
                json!({
                    "node": format!("node-{}", k % 10),
                    "service": format!("svc-{}", k % 20),
                    "id": format!("task-{k}"),
                    "port": 8000 + (k % 100),
                    "tags": ["blue"],
                })
            })
            .collect();
        let body = json!({"nodes": nodes, "endpoints": endpoints}).to_string();
        c.put_ok("/v1/switchyard/batch", &body);
    }
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"local","Check":{"TTL":"1h","Status":"warning"}}"#,
    );
    c.put_ok("/v1/switchyard/nodes/node-3/drain", "");
    c.put_ok(
        "/v1/agent/service/maintenance/local?enable=true&reason=x",
        "",
    );
    let status = c.get_ok("/v1/switchyard/status").json();
    let index = status["index"].as_u64().expect("index");
    assert_eq!(status["endpoints"], 1001);
    let services_before = c.get_ok("/v1/catalog/services").body;
    agent.kill9();

    let agent = Agent::start_in(&dir, &[]);
    let c = agent.client();
    let status = c.get_ok("/v1/switchyard/status").json();
    assert_eq!(
        status["endpoints"], 1001,
        "every acknowledged endpoint survived kill -9"
    );
    assert!(
        status["index"].as_u64().expect("index") >= index,
        "the index did not go back"
    );
    assert_eq!(
        status["endpoints_by_state"]["draining"], 100,
        "node-3's drain survived"
    );
    assert_eq!(status["endpoints_by_state"]["maintenance"], 1);
    assert_eq!(c.get_ok("/v1/catalog/services").body, services_before);
    let svc = c.get_ok("/v1/catalog/service/svc-7").json();
    assert_eq!(svc.as_array().expect("arr").len(), 50);
    let next = c
        .put_ok("/v1/agent/service/register", r#"{"Name":"after"}"#)
        .index;
    assert!(next > index);
}
