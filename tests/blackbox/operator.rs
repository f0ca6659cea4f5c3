//! The operator's first minutes and daily tools: `agent --demo`, the metrics
//! that show how fresh the catalog is, a scrape listener of its own, and the
//! packaging (Grafana dashboard, docs, systemd unit) kept true to the code.

use std::collections::BTreeSet;
use std::time::Duration;

use hickory_proto::rr::{RData, RecordType};
use serde_json::json;

use crate::dns::udp;
use crate::proxy::{agent_with, get};
use crate::security::{config as token_config, OPERATOR, READ};
use crate::support::{eventually, Agent};

#[test]
fn the_demo_answers_dig_curl_and_the_dashboard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_in(&dir.path().join("data"), &["--demo"]);

    // dig @… demo.service.consul SRV: the three backends.
    let answer = udp(agent.dns, "demo.service.consul", RecordType::SRV);
    let ports: BTreeSet<u16> = answer
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(srv) => srv.port,
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    assert_eq!(ports.len(), 3, "three demo backends: {answer:?}");

    // curl -H 'Host: demo.localhost' …: answered in turn by each backend.
    let mut answered_by = BTreeSet::new();
    for _ in 0..3 {
        let reply = get(agent.http, "demo.localhost", "/");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let who = reply
            .body
            .strip_prefix("hello from ")
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("not a demo answer: {:?}", reply.body))
            .to_string();
        answered_by.insert(who);
    }
    let expected: BTreeSet<String> = ["demo-1", "demo-2", "demo-3"].map(String::from).into();
    assert_eq!(answered_by, expected, "round robin over the three");

    // The dashboard lists it, routable.
    let page = agent.client().get_ok("/ui/").body;
    assert!(page.contains(r#"data-service="demo""#), "{page}");
    let service = agent.client().get_ok("/v1/switchyard/services/demo").json();
    assert_eq!(service["routable"], 3, "{service}");
}

fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().expect("scrape");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_show_propagation_and_snapshot_age_on_a_scrape_listener_of_their_own() {
    let config = format!(
        "{}\n[api]\nmetrics_addr = \"127.0.0.1:0\"\n",
        token_config()
    );
    let (agent, _dir) = agent_with(&config);
    let metrics = agent
        .metrics
        .expect("the ready line names the metrics listener");
    let url = format!("http://{metrics}/metrics");

    // Same tokens as the API: a scraper sends a read token.
    let (status, _) = scrape(&url, None);
    assert_eq!(status, 401);
    let (status, before) = scrape(&url, Some(READ));
    assert_eq!(status, 200);
    assert!(sample(&before, "switchyard_registry_snapshot_age_seconds").is_some());
    // Only /metrics lives there.
    let (status, _) = scrape(&format!("http://{metrics}/v1/agent/self"), Some(READ));
    assert_eq!(status, 404);

    let count = "switchyard_registry_propagation_seconds_count";
    let writes_before = sample(&before, count).expect("propagation histogram");
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
                       "endpoints": [{"node": "n1", "service": "web", "id": "w1", "port": 80}]});
    ureq::put(&format!("{}/v1/switchyard/batch", agent.api))
        .header("X-Consul-Token", OPERATOR)
        .send(batch.to_string())
        .expect("register");
    let (_, after) = scrape(&url, Some(READ));
    let writes_after = sample(&after, count).expect("propagation histogram");
    assert!(
        writes_after > writes_before,
        "a write is observed: {writes_before} -> {writes_after}"
    );
    // The API's own /metrics has the same families.
    let (status, api_text) = scrape(&format!("{}/metrics", agent.api), Some(READ));
    assert_eq!(status, 200);
    assert!(sample(&api_text, count).is_some());

    // The snapshot's age grows while nothing is written.
    let age = |text: &str| sample(text, "switchyard_registry_snapshot_age_seconds").unwrap_or(0.0);
    eventually("the snapshot age to grow", Duration::from_secs(10), || {
        let (_, text) = scrape(&url, Some(READ));
        (age(&text) >= 1.0).then_some(())
    });
    let (_, status) = scrape(&format!("{}/v1/switchyard/status", agent.api), Some(READ));
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert!(
        status["snapshot_age_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1000),
        "{status}"
    );
}
