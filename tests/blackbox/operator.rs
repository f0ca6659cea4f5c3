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
    let _ports = crate::support::DEMO_PORTS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
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

/// Metric names (`switchyard_…`) mentioned in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("switchyard_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_grafana_dashboard_and_the_docs_name_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/configs/grafana-dashboard.json"))
        .expect("configs/grafana-dashboard.json");
    let dashboard_json: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(dashboard_json["panels"]
        .as_array()
        .is_some_and(|p| p.len() > 10));
    let docs =
        std::fs::read_to_string(format!("{root}/docs/operations.md")).expect("docs/operations.md");
    // The agent-side names that are not metrics.
    let not_metrics = ["switchyard_proxy", "switchyard_registry", "switchyard_"];

    // An agent with something of each kind: a routed service with traffic,
    // one reached over HTTP/2, an L4 listener, a DNS query, a write.
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"m.test\"\nservice = \"web\"\n\
         rate_limit = { rate = \"1000/s\", burst = 100 }\n\
         match = [{ header = \"x-canary\", value = \"1\", tag = \"canary\" }]\n\
         [[http.routes]]\nhost = \"h2.test\"\nservice = \"web2\"\nupstream_protocol = \"h2c\"\n\
         [[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"web\"\n\
         [[federation.datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:1\"]\n\
         [xds]\naddr = \"127.0.0.1:0\"\n",
    );
    let c = agent.client();
    let up = crate::proxy::Upstream::start("m1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    assert_eq!(get(agent.http, "m.test", "/").status, 200);
    let (h2, _h2_runtime) = crate::grpc::h2c_server();
    crate::grpc::place_ports(&c, "web2", &[("h2", h2.port())], &[]);
    assert_eq!(get(agent.http, "h2.test", "/").status, 200);
    let _ = udp(agent.dns, "web.service.consul", RecordType::A);
    // A refused write.
    assert_eq!(c.put("/v1/agent/check/pass/no-such-check", "").status, 404);
    let text = c.get_ok("/metrics").body;
    let mut families = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            families.insert(name.to_string());
            if kind == "histogram" {
                histograms.insert(name.to_string());
            }
        }
    }
    let exists = |name: &str| {
        families.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| histograms.contains(base))
            })
    };
    for (source, text) in [
        ("grafana-dashboard.json", &dashboard),
        ("operations.md", &docs),
    ] {
        let named = metric_names(text);
        assert!(named.len() > 20, "{source} names metrics: {named:?}");
        for name in named.iter().filter(|n| !not_metrics.contains(&n.as_str())) {
            assert!(
                exists(name),
                "{source} names {name}, which /metrics does not have"
            );
        }
    }
    // And the reference documents every family the agent exports.
    let documented = metric_names(&docs);
    for family in &families {
        if family.starts_with("switchyard_") {
            assert!(
                documented.contains(family),
                "docs/operations.md does not document {family}"
            );
        }
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/switchyard.service"
    ))
    .expect("configs/switchyard.service");
    assert!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "reload is SIGHUP"
    );
    assert!(
        unit.contains("KillSignal=SIGTERM"),
        "stop is the SIGTERM drain"
    );
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed: skipping `systemd-analyze verify` of configs/switchyard.service");
        return;
    };
    assert!(found.status.success());
    // The unit names the installed path; verify it against the built binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/switchyard", crate::support::bin()),
    )
    .expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("switchyard.service"))
        .collect();
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    assert!(
        about_ours.is_empty(),
        "warnings about the unit: {about_ours:?}"
    );
}
