//! The registry API over HTTP: Consul-compatible reads and writes, blocking
//! queries, bad input, TTL expiry and the native API.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{eventually, Agent, Answer, Client};

fn ids(entries: &Value, pointer: &str) -> Vec<String> {
    let mut out: Vec<String> = entries
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            e.pointer(pointer)
                .and_then(Value::as_str)
                .expect(pointer)
                .to_string()
        })
        .collect();
    out.sort();
    out
}

#[test]
fn register_read_and_ttl_pass() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"name":"web","id":"web-1","port":8080,"tags":["v1"],"check":{"ttl":"30s"}}"#,
    );
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"web","ID":"web-2","Port":8081,"Address":"127.0.0.2","Check":{"TTL":"30s","Status":"passing"}}"#,
    );

    let catalog = c.get_ok("/v1/catalog/service/web");
    assert_eq!(ids(&catalog.json(), "/ServiceID"), ["web-1", "web-2"]);
    assert_eq!(catalog.json()[0]["Node"], "test-node");
    let tagged = c.get_ok("/v1/catalog/service/web?tag=v1");
    assert_eq!(ids(&tagged.json(), "/ServiceID"), ["web-1"]);
    assert_eq!(
        c.get_ok("/v1/catalog/services").json()["web"],
        json!(["v1"])
    );

    let passing = c.get_ok("/v1/health/service/web?passing");
    assert_eq!(
        ids(&passing.json(), "/Service/ID"),
        ["web-2"],
        "a new TTL check starts critical"
    );
    let all = c.get_ok("/v1/health/service/web");
    assert_eq!(ids(&all.json(), "/Service/ID"), ["web-1", "web-2"]);
    let checks = &all.json()[0]["Checks"];
    assert!(checks
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| c["CheckID"] == "serfHealth"));
    assert!(checks
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| c["CheckID"] == "service:web-1" && c["Status"] == "critical"));

    let before = c.get_ok("/v1/health/service/web").index;
    let pass = c.put_ok("/v1/agent/check/pass/service:web-1?note=alive", "");
    assert!(pass.index > before);
    let passing = c.get_ok("/v1/health/service/web?passing=1");
    assert_eq!(ids(&passing.json(), "/Service/ID"), ["web-1", "web-2"]);
    let check = &c.get_ok("/v1/health/checks/web").json();
    let web1 = check
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "service:web-1")
        .expect("check");
    assert_eq!(web1["Output"], "alive");
    assert_eq!(web1["Status"], "passing");

    c.put_ok(
        "/v1/agent/check/update/service:web-1",
        r#"{"Status":"warning","Output":"slow"}"#,
    );
    let passing = c.get_ok("/v1/health/service/web?passing");
    assert_eq!(
        ids(&passing.json(), "/Service/ID"),
        ["web-2"],
        "?passing drops warning"
    );
    let native = c.get_ok("/v1/switchyard/services/web").json();
    assert_eq!(native["routable"], 2, "warning endpoints stay routable");

    // Agent views and the other reads answer with Consul's shapes and headers.
    assert!(c.get_ok("/v1/agent/services").json()["web-1"]["Port"] == 8080);
    assert!(c.get_ok("/v1/agent/checks").json()["service:web-2"]["Status"] == "passing");
    let svc = c.get_ok("/v1/agent/service/web-2");
    assert!(svc.header("x-consul-contenthash").is_some());
    assert_eq!(c.get_ok("/v1/catalog/nodes").json()[0]["Node"], "test-node");
    assert_eq!(
        c.get_ok("/v1/catalog/node/test-node").json()["Services"]["web-1"]["ID"],
        "web-1"
    );
    assert!(!c
        .get_ok("/v1/health/node/test-node")
        .json()
        .as_array()
        .expect("arr")
        .is_empty());
    assert!(
        c.get_ok("/v1/health/state/warning")
            .json()
            .as_array()
            .expect("arr")
            .len()
            == 1
    );
    // The embedded store: this agent alone leads, at its API address.
    let api = agent
        .api
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert_eq!(c.get_ok("/v1/status/leader").json(), api.as_str());
    assert_eq!(c.get_ok("/v1/status/peers").json(), json!([api]));
    assert_eq!(
        c.get_ok("/v1/agent/self").json()["Config"]["Datacenter"],
        "dc1"
    );
    for path in [
        "/v1/health/service/none",
        "/v1/catalog/service/none",
        "/v1/agent/service/none",
        "/v1/catalog/services",
    ] {
        let a = c.get(path);
        assert!(a.index > 0, "{path} has X-Consul-Index");
        assert_eq!(a.header("x-consul-knownleader"), Some("true"), "{path}");
        assert_eq!(a.header("x-consul-lastcontact"), Some("0"), "{path}");
    }
    assert_eq!(
        c.get("/v1/health/service/none").body,
        "[]",
        "unknown service is 200 []"
    );

    // Maintenance hides an endpoint from ?passing; disabling restores it.
    c.put_ok(
        "/v1/agent/service/maintenance/web-2?enable=true&reason=deploy",
        "",
    );
    let passing = c.get_ok("/v1/health/service/web?passing");
    assert!(ids(&passing.json(), "/Service/ID").is_empty());
    c.put_ok("/v1/agent/service/maintenance/web-2?enable=false", "");
    assert_eq!(
        ids(
            &c.get_ok("/v1/health/service/web?passing").json(),
            "/Service/ID"
        ),
        ["web-2"]
    );

    let metrics = c.get_ok("/metrics").body;
    assert!(
        metrics.contains("switchyard_registry_endpoints{state=\"warning\"} 1"),
        "{metrics}"
    );

    c.put_ok("/v1/agent/service/deregister/web-1", "");
    assert_eq!(
        ids(&c.get_ok("/v1/catalog/service/web").json(), "/ServiceID"),
        ["web-2"]
    );
}

#[test]
fn error_texts_follow_consul() {
    let agent = Agent::start();
    let c = agent.client();
    let a = c.put("/v1/agent/service/deregister/nope", "");
    assert_eq!(a.status, 404);
    assert!(a.body.contains("Unknown service ID \"nope\""), "{}", a.body);
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"h","Check":{"HTTP":"http://127.0.0.1:9/","Interval":"10s"}}"#,
    );
    let a = c.put("/v1/agent/check/pass/service:h", "");
    assert_eq!(a.status, 500);
    assert!(
        a.body.contains("does not have associated TTL"),
        "{}",
        a.body
    );
    let a = c.put("/v1/agent/check/pass/none", "");
    assert_eq!(a.status, 404);
    assert!(a.body.contains("Unknown check ID"), "{}", a.body);
    assert_eq!(c.get("/v1/health/service/h?passing=maybe").status, 400);
    assert_eq!(c.get("/v1/health/service/h?index=abc").status, 400);
    assert_eq!(c.get("/v1/health/service/h?index=1&wait=soon").status, 400);
    assert_eq!(c.get("/v1/health/service/h?stale&consistent").status, 400);
    assert_eq!(c.get("/v1/health/state/bogus").status, 400);
    assert_eq!(c.get("/v1/health/service/h?dc=elsewhere").status, 500);
    assert_eq!(
        c.put("/v1/agent/service/maintenance/h", "").status,
        400,
        "enable is required"
    );
    assert_eq!(c.delete("/v1/agent/service/register").status, 405);
}

/// Snapshot of everything the catalog shows, to prove a refused write changed nothing.
fn catalog_state(c: &Client) -> (u64, String, String) {
    let services = c.get_ok("/v1/catalog/services");
    let checks = c.get_ok("/v1/health/state/any");
    let index = c.get_ok("/v1/switchyard/status").json()["index"]
        .as_u64()
        .expect("index");
    (index, services.body, checks.body)
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok("/v1/agent/service/register", r#"{"Name":"web","Port":80}"#);
    let before = catalog_state(&c);
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/agent/service/register", "{not json", "decode"),
        ("/v1/agent/service/register", "", "empty body"),
        (
            "/v1/agent/service/register",
            r#"{"Name":"web","Port":"80"}"#,
            "decode",
        ),
        (
            "/v1/agent/service/register",
            r#"{"Name":"web","Tags":{"a":1}}"#,
            "decode",
        ),
        (
            "/v1/agent/service/register",
            r#"{"Name":"web","Address":"0.0.0.0"}"#,
            "Invalid service address",
        ),
        (
            "/v1/agent/service/register",
            r#"{"Port":80}"#,
            "Missing service name",
        ),
        (
            "/v1/agent/service/register",
            r#"{"Name":"web","Check":{"TTL":"5s","Status":"great"}}"#,
            "Bad check status",
        ),
        (
            "/v1/agent/check/register",
            r#"{"TTL":"5s"}"#,
            "Missing check name",
        ),
        (
            "/v1/agent/check/update/service:web",
            r#"{"Status":"bogus"}"#,
            "Invalid check status",
        ),
        ("/v1/catalog/register", r#"{"Node":"n1"}"#, "address"),
        ("/v1/catalog/register", r#"{"Address":"10.0.0.1"}"#, "node"),
        (
            "/v1/catalog/register",
            r#"{"Node":"n1","Address":"10.0.0.1","Service":{"Service":"x","Address":"::"}}"#,
            "Invalid service address",
        ),
        ("/v1/catalog/deregister", r#"{"Node":""}"#, "node"),
        (
            "/v1/switchyard/batch",
            r#"{"endpoints":[{"node":"ghost","service":"x"}]}"#,
            "not registered",
        ),
        (
            "/v1/switchyard/batch",
            r#"{"endpoints":[{"service":"x"}]}"#,
            "node",
        ),
        (
            "/v1/switchyard/batch",
            r#"{"nodes":[{"name":"n1","address":"0.0.0.0"}]}"#,
            "address",
        ),
        ("/v1/switchyard/batch", r#"{"unknown":[]}"#, "unknown"),
        (
            "/v1/switchyard/batch",
            r#"{"nodes":[{"name":"n1","address":"10.0.0.1"}],"endpoints":[{"node":"n1","service":"ok"},{"node":"n2","service":"bad"}]}"#,
            "not registered",
        ),
    ];
    // The native write routes and the agent's maintenance and check routes,
    // aimed at targets that exist, so only the malformed part can refuse them.
    let node = c.get_ok("/v1/switchyard/status").json()["node"]
        .as_str()
        .expect("node")
        .to_string();
    let more: Vec<(String, &str, &str)> = cases
        .iter()
        .map(|&(path, body, want)| (path.to_string(), body, want))
        .chain([
            ("/v1/switchyard/heartbeat".into(), "{not json", "decode"),
            (
                "/v1/switchyard/heartbeat".into(),
                r#"{"checks":"service:web"}"#,
                "decode",
            ),
            (
                "/v1/switchyard/heartbeat".into(),
                r#"{"checks":[{"node":"n","id":"c","status":"great"}]}"#,
                "status",
            ),
            (
                format!("/v1/switchyard/nodes/{node}/drain"),
                r#"{"deadline":"soon"}"#,
                "deadline",
            ),
            (
                format!("/v1/switchyard/nodes/{node}/drain"),
                r#"{"deadline":"60s","extra":1}"#,
                "extra",
            ),
            (
                "/v1/switchyard/endpoints/web/drain".into(),
                r#"{"deadline":-5}"#,
                "deadline",
            ),
            (
                format!("/v1/switchyard/nodes/{node}/maintenance?enable=maybe"),
                "",
                "enable",
            ),
            (
                "/v1/switchyard/endpoints/web/maintenance".into(),
                "",
                "enable",
            ),
            ("/v1/agent/maintenance?enable=yes".into(), "", "enable"),
            ("/v1/agent/check/register".into(), "[1,2]", "decode"),
            ("/v1/catalog/deregister".into(), "{not json", "decode"),
        ])
        .collect();
    for (path, body, want) in &more {
        let a = c.put(path, body);
        assert_eq!(a.status, 400, "{path} {body}: {}", a.body);
        assert!(
            a.body.to_lowercase().contains(&want.to_lowercase()),
            "{path} {body}: {:?} should mention {want:?}",
            a.body
        );
    }
    assert_eq!(catalog_state(&c), before, "refused writes left no trace");
    // Unknown targets are 404 and change nothing either.
    assert_eq!(c.put("/v1/agent/service/deregister/ghost", "").status, 404);
    assert_eq!(c.put("/v1/switchyard/nodes/ghost/drain", "").status, 404);
    assert_eq!(catalog_state(&c), before);
}

#[test]
fn blocking_query_wakes_only_for_its_own_service() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"a","ID":"a1","Port":1}"#,
    );
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"b","ID":"b1","Port":1}"#,
    );
    let index = c.get_ok("/v1/health/service/a").index;

    // Changes to b while a watcher of a waits: the watcher runs to its timeout.
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let a = c.get_ok(&format!("/v1/health/service/a?index={index}&wait=2s"));
            (a.index, started.elapsed())
        })
    };
    eventually("the watcher to be waiting", Duration::from_secs(10), || {
        (c.metric("switchyard_api_blocking_queries") == Some(1.0)).then_some(())
    });
    for port in 2..12 {
        c.put_ok(
            "/v1/agent/service/register",
            &format!(r#"{{"Name":"b","ID":"b1","Port":{port}}}"#),
        );
    }
    // Not even woken server-side: waiters park on their own service's key.
    assert_eq!(c.metric("switchyard_api_blocking_wakeups_total"), Some(0.0));
    let (returned, elapsed) = watcher.join().expect("watcher");
    assert_eq!(returned, index, "changes to b must not move a's index");
    assert!(
        elapsed >= Duration::from_secs(2),
        "woken early after {elapsed:?}"
    );

    // A change to a wakes it at once, with a larger index.
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || {
            let a = c.get_ok(&format!("/v1/health/service/a?index={index}&wait=60s"));
            (a.index, Instant::now(), a.json())
        })
    };
    eventually("the watcher to be waiting", Duration::from_secs(10), || {
        (c.metric("switchyard_api_blocking_queries") == Some(1.0)).then_some(())
    });
    let changed_at = Instant::now();
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"a","ID":"a2","Port":1}"#,
    );
    let (returned, woke_at, body) = watcher.join().expect("watcher");
    assert!(returned > index);
    assert_eq!(c.metric("switchyard_api_blocking_wakeups_total"), Some(1.0));
    assert_eq!(ids(&body, "/Service/ID"), ["a1", "a2"]);
    let delay = woke_at.duration_since(changed_at);
    // Bounded far below the 60 s wait: proves the change woke it. (The latency
    // itself is measured by the W-churn benchmark, not asserted here.)
    assert!(
        delay < Duration::from_secs(10),
        "woke {delay:?} after the change"
    );

    // A watcher of the list of services wakes on a new service.
    let list_index = c.get_ok("/v1/catalog/services").index;
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.get_ok(&format!("/v1/catalog/services?index={list_index}&wait=60s"))
                .json()
        })
    };
    eventually("the watcher to be waiting", Duration::from_secs(10), || {
        (c.metric("switchyard_api_blocking_queries") == Some(1.0)).then_some(())
    });
    c.put_ok("/v1/agent/service/register", r#"{"Name":"c","Port":1}"#);
    let services = watcher.join().expect("watcher");
    assert!(services.get("c").is_some());
}

#[test]
fn ttl_expires_to_critical_through_the_api() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"t","Check":{"CheckID":"t-ttl","TTL":"300ms","Status":"passing"}}"#,
    );
    assert_eq!(
        c.get_ok("/v1/health/service/t?passing")
            .json()
            .as_array()
            .expect("arr")
            .len(),
        1
    );
    let check = eventually("the TTL to expire", Duration::from_secs(10), || {
        let checks = c.get_ok("/v1/health/checks/t").json();
        let check = checks[0].clone();
        (check["Status"] == "critical").then_some(check)
    });
    assert!(check["Output"]
        .as_str()
        .expect("output")
        .starts_with("TTL expired"));
    assert!(c
        .get_ok("/v1/health/service/t?passing")
        .json()
        .as_array()
        .expect("arr")
        .is_empty());
}

#[test]
fn deregister_critical_after_reaps_through_the_api() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"z","Check":{"TTL":"10m","DeregisterCriticalServiceAfter":"200ms"}}"#,
    );
    eventually(
        "the critical service to be deregistered",
        Duration::from_secs(10),
        || {
            c.get_ok("/v1/catalog/service/z")
                .json()
                .as_array()
                .expect("arr")
                .is_empty()
                .then_some(())
        },
    );
}

#[test]
fn catalog_register_and_native_drain() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/catalog/register",
        r#"{"Node":"n1","Address":"10.1.0.1","NodeMeta":{"rack":"r1"},"Service":{"Service":"db","ID":"db-1","Port":5432},"Check":{"Name":"db ok","CheckID":"db-1-ok","ServiceID":"db-1","Status":"passing"}}"#,
    );
    c.put_ok(
        "/v1/catalog/register",
        r#"{"Node":"n2","Address":"10.1.0.2","Service":{"Service":"db","ID":"db-2","Port":5432}}"#,
    );
    let passing = c.get_ok("/v1/health/service/db?passing").json();
    assert_eq!(
        ids(&passing, "/Service/ID"),
        ["db-1", "db-2"],
        "catalog services without checks pass"
    );
    assert_eq!(
        ids(
            &c.get_ok("/v1/catalog/service/db?node-meta=rack:r1").json(),
            "/ServiceID"
        ),
        ["db-1"]
    );

    let drained = c
        .put_ok("/v1/switchyard/nodes/n1/drain", r#"{"deadline":"60s"}"#)
        .json();
    // Nothing is in flight to db (nobody routes it), so n1 is drained at once.
    assert_eq!(drained["state"], "drained", "{drained}");
    assert_eq!(drained["drained"], true);
    assert!(
        drained["deadline_ms"].as_u64().expect("deadline")
            > drained["since_ms"].as_u64().expect("since")
    );
    let view = c.get_ok("/v1/switchyard/services/db").json();
    assert_eq!(view["routable"], 1);
    let db1 = view["endpoints"]
        .as_array()
        .expect("arr")
        .iter()
        .find(|e| e["id"] == "db-1")
        .expect("db-1")
        .clone();
    assert_eq!(db1["state"], "draining");
    assert_eq!(db1["excluded_because"], "node n1 is draining");
    assert_eq!(
        c.get_ok("/v1/switchyard/nodes/n1/drain").json()["state"],
        "drained"
    );
    assert_eq!(c.delete("/v1/switchyard/nodes/n1/drain").status, 200);
    assert_eq!(c.get_ok("/v1/switchyard/services/db").json()["routable"], 2);

    c.put_ok(
        "/v1/catalog/deregister",
        r#"{"Node":"n1","ServiceID":"db-1"}"#,
    );
    assert_eq!(
        ids(&c.get_ok("/v1/catalog/service/db").json(), "/ServiceID"),
        ["db-2"]
    );
    c.put_ok("/v1/catalog/deregister", r#"{"Node":"n2"}"#);
    assert!(c
        .get_ok("/v1/catalog/service/db")
        .json()
        .as_array()
        .expect("arr")
        .is_empty());
    let nodes = ids(&c.get_ok("/v1/catalog/nodes").json(), "/Node");
    assert_eq!(nodes, ["n1", "test-node"]);
}

#[test]
fn sigterm_answers_waiting_queries_and_exits_cleanly() {
    let agent = Agent::start();
    let c = agent.client();
    let index = c.get_ok("/v1/catalog/services").index;
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.get(&format!("/v1/catalog/services?index={index}&wait=5m"))
                .status
        })
    };
    eventually("the watcher to be waiting", Duration::from_secs(10), || {
        (c.metric("switchyard_api_blocking_queries") == Some(1.0)).then_some(())
    });
    let status = agent.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        watcher.join().expect("watcher"),
        200,
        "the waiting query got its answer"
    );
}

/// 150 blocking queries on one service (two parameter sets) all receive the
/// change with its new index, each set the same body, and the bodies were
/// rendered once per parameter set, not once per watcher (issue 26). A
/// third of the watchers accept gzip, and get the same body compressed.
#[test]
fn many_watchers_of_one_service_all_get_the_change_from_one_render() {
    use std::io::{Read, Write};
    let agent = Agent::start();
    let c = agent.client();
    for i in 0..40 {
        c.put_ok(
            "/v1/agent/service/register",
            &format!(r#"{{"Name":"web","ID":"web-{i}","Port":{}}}"#, 9000 + i),
        );
    }
    let index = c.get_ok("/v1/health/service/web").index;
    let addr: std::net::SocketAddr = agent
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("api addr");
    let watchers: Vec<(std::net::TcpStream, bool)> = (0..150)
        .map(|i| {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            let passing = i % 2 == 0;
            let query = if passing { "&passing" } else { "" };
            let gzip = if i % 3 == 0 { "Accept-Encoding: gzip\r\n" } else { "" };
            write!(
                stream,
                "GET /v1/health/service/web?index={index}&wait=60s{query} HTTP/1.1\r\nHost: x\r\n{gzip}Connection: close\r\n\r\n"
            )
            .expect("send");
            (stream, passing)
        })
        .collect();
    eventually("150 queries waiting", Duration::from_secs(10), || {
        let metrics = c.get_ok("/metrics").body;
        metrics
            .lines()
            .any(|l| l == "switchyard_api_blocking_queries 150")
            .then_some(())
    });
    let before = c.get_ok("/metrics").body;
    c.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"web","ID":"web-new","Port":9999}"#,
    );
    let mut bodies = std::collections::HashMap::new();
    let mut gzipped = 0;
    for (mut stream, passing) in watchers {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("the answer");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        if head.contains("content-encoding: gzip") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&raw[split..])
                .read_to_end(&mut plain)
                .expect("gunzip the answer");
            raw.truncate(split);
            raw.extend_from_slice(&plain);
            gzipped += 1;
        }
        let answer = crate::proxy::parse_raw(&raw);
        assert_eq!(answer.status, 200);
        let new_index: u64 = answer.headers["x-consul-index"].parse().expect("index");
        assert!(new_index > index, "{new_index} after {index}");
        let entries: Value = serde_json::from_str(&answer.body).expect("JSON");
        assert_eq!(entries.as_array().map(Vec::len), Some(41));
        assert!(answer.body.contains("web-new"));
        let first = bodies.entry(passing).or_insert_with(|| answer.body.clone());
        assert_eq!(
            *first, answer.body,
            "watchers with the same query got different bodies"
        );
    }
    assert_eq!(gzipped, 50, "the watchers that accept gzip get it");
    let after = c.get_ok("/metrics").body;
    let count = |text: &str, outcome: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "switchyard_api_blocking_answers_total{{outcome=\"{outcome}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let rendered = count(&after, "rendered") - count(&before, "rendered");
    let shared = count(&after, "shared") - count(&before, "shared");
    assert!(
        rendered <= 4.0 && shared >= 146.0,
        "{rendered} renders and {shared} shared answers for 150 watchers of two queries"
    );
}

#[test]
fn agent_health_node_services_and_metrics_as_consul_shows_them() {
    let agent = Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "web", "ID": "web-1", "Port": 1, "Check": {"TTL": "1h"}}).to_string(),
    );
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "web", "ID": "web-2", "Port": 2}).to_string(),
    );
    // The worst of this agent's instances is the status code.
    let by_name = c.get("/v1/agent/health/service/name/web");
    assert_eq!(by_name.status, 503, "{}", by_name.body);
    let entries = by_name.json();
    assert_eq!(entries.as_array().map(Vec::len), Some(2));
    let text = c.get("/v1/agent/health/service/name/web?format=text");
    assert_eq!((text.status, text.body.as_str()), (503, "critical"));
    c.put_ok("/v1/agent/check/warn/service:web-1", "");
    assert_eq!(c.get("/v1/agent/health/service/name/web").status, 429);
    c.put_ok("/v1/agent/check/pass/service:web-1", "");
    let passing = c.get("/v1/agent/health/service/name/web?format=text");
    assert_eq!((passing.status, passing.body.as_str()), (200, "passing"));
    let one = c.get("/v1/agent/health/service/id/web-2");
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["Service"]["ID"], "web-2");
    assert_eq!(one.json()["AggregatedStatus"], "passing");
    assert_eq!(c.get("/v1/agent/health/service/id/nope").status, 404);
    assert_eq!(c.get("/v1/agent/health/service/name/nope").status, 404);

    // node-services: the node and its services as a list.
    let me = c.get_ok("/v1/agent/self").json()["Config"]["NodeName"]
        .as_str()
        .expect("name")
        .to_string();
    let listed = c.get_ok(&format!("/v1/catalog/node-services/{me}")).json();
    assert_eq!(listed["Node"]["Node"], me.as_str());
    let mut ids: Vec<&str> = listed["Services"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["ID"].as_str().expect("id"))
        .collect();
    ids.sort();
    assert_eq!(ids, ["web-1", "web-2"]);
    assert_eq!(
        c.get_ok("/v1/catalog/node-services/ghost").json(),
        json!({"Node": null, "Services": []})
    );

    // Metrics in Consul's JSON shape, or as Prometheus text.
    let metrics = c.get_ok("/v1/agent/metrics").json();
    let gauges = metrics["Gauges"].as_array().expect("gauges");
    assert!(
        gauges
            .iter()
            .any(|g| g["Name"] == "switchyard_registry_snapshot_age_seconds"),
        "{metrics}"
    );
    assert!(metrics["Counters"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    let text = c.get_ok("/v1/agent/metrics?format=prometheus").body;
    assert!(text.contains("# TYPE switchyard_registry_snapshot_age_seconds gauge"));
}

/// `?filter=` on health/service, catalog/service, catalog/services,
/// catalog/nodes and agent/services (CONSUL-KV.md §5, 39-42).
#[test]
fn filter_expressions_select_rows_as_consul_does() {
    let agent = Agent::start();
    let c = agent.client();
    let register = |node: &str,
                    meta: Value,
                    id: &str,
                    tags: &[&str],
                    smeta: Value,
                    status: &str| {
        c.put_ok(
            "/v1/catalog/register",
            &json!({
                "Node": node, "Address": format!("10.0.0.{}", &node[1..]), "NodeMeta": meta,
                "Service": {"ID": id, "Service": "web", "Tags": tags, "Meta": smeta, "Port": 80},
                "Checks": [{"CheckID": format!("c-{id}"), "Name": "c", "Status": status, "ServiceID": id}],
            })
            .to_string(),
        );
    };
    register(
        "n1",
        json!({"rack": "a"}),
        "web-1",
        &["v1"],
        json!({"env": "prod", "my-key": "x"}),
        "passing",
    );
    register(
        "n2",
        json!({"rack": "b"}),
        "web-2",
        &["v2"],
        json!({"env": "prod"}),
        "warning",
    );
    register(
        "n3",
        json!({}),
        "web-3",
        &["v2"],
        json!({"env": "dev"}),
        "passing",
    );
    let q = |path: &str, filter: &str| -> Answer {
        let encoded: String = filter
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        c.get(&format!("{path}?filter={encoded}"))
    };
    let ids = |answer: &Answer, pointer: &str| -> Vec<String> {
        assert_eq!(answer.status, 200, "{}", answer.body);
        self::ids(&answer.json(), pointer)
    };

    // 39.
    let prod_v2 = q(
        "/v1/health/service/web",
        r#"Service.Meta.env == "prod" and "v2" in Service.Tags"#,
    );
    assert_eq!(ids(&prod_v2, "/Service/ID"), ["web-2"]);
    let keyed = q("/v1/health/service/web", r#"Service.Meta["my-key"] == x"#);
    assert_eq!(ids(&keyed, "/Service/ID"), ["web-1"]);
    // 40. Through a list: any check.
    let unhealthy = q("/v1/health/service/web", r#"Checks.Status != "passing""#);
    assert_eq!(ids(&unhealthy, "/Service/ID"), ["web-2"]);
    let healthy = q(
        "/v1/health/service/web",
        r#"not Checks.Status != "passing""#,
    );
    assert_eq!(ids(&healthy, "/Service/ID"), ["web-1", "web-3"]);
    // 41. Missing keys; quoting; catalog's flat selectors.
    let nodes = q("/v1/catalog/nodes", r#"Meta.missing != "x""#);
    assert_eq!(
        ids(&nodes, "/Node").len(),
        4,
        "every node (the agent's too)"
    );
    assert_eq!(
        ids(&q("/v1/catalog/nodes", r#"Meta.missing == "x""#), "/Node"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&q("/v1/catalog/nodes", r#"Address == "10.0.0.1""#), "/Node"),
        ["n1"]
    );
    let unquoted = q("/v1/catalog/nodes", "Address == 10.0.0.1");
    assert_eq!(unquoted.status, 400, "{}", unquoted.body);
    let tagged = q("/v1/catalog/service/web", r#"ServiceTags contains "v1""#);
    assert_eq!(ids(&tagged, "/ServiceID"), ["web-1"]);
    let racked = q(
        "/v1/catalog/service/web",
        r#"NodeMeta.rack == b or ServiceMeta.env == dev"#,
    );
    assert_eq!(ids(&racked, "/ServiceID"), ["web-2", "web-3"]);
    // catalog/services: the services with a matching instance.
    let listed = q("/v1/catalog/services", r#"ServiceMeta.env == "dev""#);
    assert_eq!(listed.status, 200);
    assert!(listed.json().get("web").is_some(), "{}", listed.body);
    let none = q("/v1/catalog/services", r#"ServiceMeta.env == "qa""#);
    assert_eq!(none.json(), json!({}));
    // agent/services.
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "api", "ID": "api-1", "Port": 9, "Meta": {"team": "x"}}).to_string(),
    );
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "api", "ID": "api-2", "Port": 10}).to_string(),
    );
    let mine = q("/v1/agent/services", r#"Meta.team == x and Port == 9"#);
    assert_eq!(mine.status, 200);
    assert_eq!(
        mine.json().as_object().map(|m| m.len()),
        Some(1),
        "{}",
        mine.body
    );
    // 42. Bad expressions and selectors: a clear 400 with Consul's prefix;
    // an endpoint without filters refuses one rather than ignore it.
    for bad in ["foo", r#"Nope == "x""#, r#"Service.Port =="#] {
        let answer = q("/v1/health/service/web", bad);
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert!(
            answer
                .body
                .starts_with("Failed to create boolean expression evaluator:"),
            "{bad}: {}",
            answer.body
        );
    }
    assert_eq!(
        q("/v1/health/state/any", r#"Status == "passing""#).status,
        400
    );
}
