//! Active health checks against real backends.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::support::{eventually, Agent, Backend, Client};

fn check_status(c: &Client, service: &str, check_id: &str) -> (String, String) {
    let checks = c.get_ok(&format!("/v1/health/checks/{service}")).json();
    let check = checks
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .cloned()
        .unwrap_or(Value::Null);
    (
        check["Status"].as_str().unwrap_or("").to_string(),
        check["Output"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn http_check_follows_the_backend_with_thresholds() {
    let agent = Agent::start();
    let c = agent.client();
    let backend = Backend::start();
    let body = format!(
        r#"{{"Name":"api","Address":"127.0.0.1","Port":{},"Check":{{"CheckID":"api-http","HTTP":"http://{}/health","Interval":"100ms","Timeout":"1s","FailuresBeforeCritical":3}}}}"#,
        backend.addr.port(),
        backend.addr
    );
    c.put_ok("/v1/agent/service/register", &body);
    let (_, output) = eventually("the HTTP check to pass", Duration::from_secs(15), || {
        let (status, output) = check_status(&c, "api", "api-http");
        (status == "passing").then_some((status, output))
    });
    assert!(output.contains("200"), "{output}");

    backend.status.store(500, Ordering::SeqCst);
    let output = eventually(
        "the HTTP check to go critical",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "api", "api-http");
            // Read after the status: at least this many failures had been served.
            let served = backend.failures.load(Ordering::SeqCst);
            if status == "critical" {
                assert!(
                    served >= 3,
                    "critical after only {served} failed probes (threshold 3)"
                );
                return Some(output);
            }
            None
        },
    );
    assert!(output.contains("500"), "{output}");
    let passing = c.get_ok("/v1/health/service/api?passing").json();
    assert!(
        passing.as_array().expect("array").is_empty(),
        "a critical endpoint leaves ?passing"
    );

    backend.status.store(200, Ordering::SeqCst);
    eventually("the HTTP check to recover", Duration::from_secs(15), || {
        (check_status(&c, "api", "api-http").0 == "passing").then_some(())
    });
}

#[test]
fn tcp_checks_on_open_and_closed_ports() {
    let agent = Agent::start();
    let c = agent.client();
    let open = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    for (name, addr) in [("up", open.local_addr().expect("addr")), ("down", closed)] {
        let body = format!(
            r#"{{"Name":"{name}","Check":{{"CheckID":"{name}-tcp","TCP":"{addr}","Interval":"100ms","Timeout":"1s","Status":"warning"}}}}"#
        );
        c.put_ok("/v1/agent/service/register", &body);
    }
    eventually(
        "the open port's check to pass",
        Duration::from_secs(15),
        || (check_status(&c, "up", "up-tcp").0 == "passing").then_some(()),
    );
    let (_, output) = eventually(
        "the closed port's check to fail",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "down", "down-tcp");
            (status == "critical").then_some((status, output))
        },
    );
    assert!(output.contains("dial tcp"), "{output}");
    drop(open);
}

/// A scheduler keeps 1,000 endpoints alive with one call per round; when it
/// stops, they all expire; unknown and non-TTL checks are reported, not fatal.
#[test]
fn batch_heartbeats_keep_many_ttl_checks_alive() {
    let agent = Agent::start();
    let c = agent.client();
    let endpoints: Vec<Value> = (0..1000)
        .map(|i| {
            serde_json::json!({"node": "hb", "service": "task", "id": format!("t{i}"), "port": 9000,
                                     "checks": [{"ttl": "2s"}]})
        })
        .collect();
    let body = serde_json::json!({"nodes": [{"name": "hb", "address": "10.4.0.1"}], "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &body.to_string());
    let mut beats: Vec<Value> = (0..1000)
        .map(|i| serde_json::json!({"node": "hb", "id": format!("service:t{i}")}))
        .collect();
    beats.push(serde_json::json!({"node": "hb", "id": "service:ghost"}));
    let heartbeat = serde_json::json!({ "checks": beats }).to_string();
    let passing = |c: &Client| {
        c.get_ok("/v1/switchyard/services/task").json()["by_state"]["passing"]
            .as_u64()
            .unwrap_or(0)
    };
    // Renew every 300 ms for about 4 s: twice the TTL, so an unrenewed check would expire.
    let started = std::time::Instant::now();
    let mut first = true;
    while started.elapsed() < Duration::from_secs(4) {
        let answer = c.put_ok("/v1/switchyard/heartbeat", &heartbeat).json();
        assert_eq!(answer["renewed"], 1000);
        assert_eq!(answer["unknown"][0]["id"], "service:ghost");
        if !first {
            assert_eq!(passing(&c), 1000, "a renewed TTL expired");
        }
        first = false;
        std::thread::sleep(Duration::from_millis(300));
    }
    eventually(
        "every unrenewed TTL to expire",
        Duration::from_secs(15),
        || (passing(&c) == 0).then_some(()),
    );
    let bad = c.put(
        "/v1/switchyard/heartbeat",
        r#"{"checks":[{"node":"hb","id":"service:t1","status":"great"}]}"#,
    );
    assert_eq!(bad.status, 400);
}

/// A node lease: while `serfHealth` is renewed its endpoints serve; when the
/// renewals stop, every endpoint on the node goes critical and leaves DNS.
#[test]
fn a_node_whose_lease_lapses_takes_its_endpoints_out() {
    let agent = Agent::start();
    let c = agent.client();
    let body = serde_json::json!({
        "nodes": [{"name": "leased", "address": "10.6.0.1", "ttl": "1s"}, {"name": "plain", "address": "10.6.0.2"}],
        "endpoints": [
            {"node": "leased", "service": "svc", "id": "a", "port": 1},
            {"node": "leased", "service": "svc", "id": "b", "port": 2},
            {"node": "plain", "service": "svc", "id": "c", "port": 3},
        ],
    });
    c.put_ok("/v1/switchyard/batch", &body.to_string());
    let renew = r#"{"checks":[{"node":"leased","id":"serfHealth"}]}"#;
    assert_eq!(
        c.put_ok("/v1/switchyard/heartbeat", renew).json()["renewed"],
        1
    );
    let entries = c.get_ok("/v1/health/service/svc?passing").json();
    assert_eq!(entries.as_array().expect("array").len(), 3);
    let serf: Vec<&Value> = entries[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["CheckID"] == "serfHealth")
        .collect();
    assert_eq!(
        serf.len(),
        1,
        "the real lease check replaces the synthetic one"
    );
    // No more renewals: the lease lapses.
    let passing = eventually("the lease to lapse", Duration::from_secs(15), || {
        let entries = c.get_ok("/v1/health/service/svc?passing").json();
        let ids: Vec<String> = entries
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap_or("").to_string())
            .collect();
        (ids.len() == 1).then_some(ids)
    });
    assert_eq!(
        passing,
        ["c"],
        "only the endpoint on the unleased node is left"
    );
    let node_checks = c.get_ok("/v1/health/node/leased").json();
    assert_eq!(node_checks[0]["CheckID"], "serfHealth");
    assert_eq!(node_checks[0]["Status"], "critical");
}
