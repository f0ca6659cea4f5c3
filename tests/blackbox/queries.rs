//! Prepared queries (issue 29, CONSUL-KV.md §3): Consul's `/v1/query`
//! shapes and rules, their DNS forms, a blocking `execute`, and a query
//! kept across a restart. Failover to other datacenters is in
//! `federation.rs`.

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::{json, Value};

use crate::dns::{ips, udp};
use crate::support::{eventually, Agent, Client};

/// Registers `service` instance `id` on `node` (at `address`) with one
/// check of `status` named `check`.
#[allow(clippy::too_many_arguments)]
fn reg(
    c: &Client,
    node: &str,
    address: &str,
    service: &str,
    id: &str,
    tags: &[&str],
    status: &str,
    check: &str,
) {
    c.put_ok(
        "/v1/catalog/register",
        &json!({
            "Node": node,
            "Address": address,
            "Service": {"ID": id, "Service": service, "Tags": tags, "Port": 5432},
            "Checks": [{"CheckID": check, "Name": check, "Status": status, "ServiceID": id}],
        })
        .to_string(),
    );
}

fn create(c: &Client, definition: Value) -> String {
    let answer = c.post("/v1/query", &definition.to_string());
    assert_eq!(answer.status, 200, "create {definition}: {}", answer.body);
    answer.json()["ID"].as_str().expect("an ID").to_string()
}

/// The service IDs an execution returns, sorted.
fn ids(result: &Value) -> Vec<String> {
    let mut ids: Vec<String> = result["Nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("Nodes is a list: {result}"))
        .iter()
        .map(|n| n["Service"]["ID"].as_str().expect("service id").to_string())
        .collect();
    ids.sort();
    ids
}

fn execute(c: &Client, name: &str) -> Value {
    c.get_ok(&format!("/v1/query/{name}/execute")).json()
}

fn error(answer: &crate::support::Answer) -> (u16, &str) {
    (answer.status, answer.body.as_str())
}

#[test]
fn prepared_queries_are_consul_compatible() {
    let agent = Agent::start();
    let c = agent.client();
    reg(
        &c,
        "n1",
        "10.0.0.1",
        "db",
        "db-1",
        &["primary"],
        "passing",
        "c1",
    );
    reg(
        &c,
        "n2",
        "10.0.0.2",
        "db",
        "db-2",
        &["Primary", "canary"],
        "passing",
        "c2",
    );
    reg(
        &c,
        "n3",
        "10.0.0.3",
        "db",
        "db-3",
        &["replica"],
        "passing",
        "c3",
    );

    // 33: tags, with a negation; by name and by ID.
    let id = create(
        &c,
        json!({"Name": "db", "Service": {"Service": "db", "Tags": ["primary", "!canary"]}}),
    );
    for name in ["db", id.as_str()] {
        let result = execute(&c, name);
        assert_eq!(ids(&result), ["db-1"], "{result}");
        assert_eq!(result["Datacenter"], "dc1");
        assert_eq!(result["Failovers"], 0);
        assert_eq!(result["DNS"], json!({"TTL": ""}));
        assert_eq!(result["Service"], "db");
        assert_eq!(result["Nodes"][0]["Node"]["Node"], "n1");
        assert!(result["Nodes"][0]["Checks"].is_array());
    }
    // Read back: one, all, and one that is not there.
    let read = c.get_ok(&format!("/v1/query/{id}")).json();
    assert_eq!(read[0]["ID"], id.as_str());
    assert_eq!(read[0]["Service"]["Tags"], json!(["primary", "!canary"]));
    assert!(read[0]["ModifyIndex"].as_u64().expect("index") > 0);
    assert_eq!(
        c.get_ok("/v1/query").json().as_array().expect("list").len(),
        1
    );
    let missing = c.get("/v1/query/2b6ff3b3-0000-4000-8000-000000000000");
    assert_eq!(error(&missing), (404, "Query not found"));
    let missing = c.get("/v1/query/nothing-like-it/execute");
    assert_eq!(error(&missing), (404, "Query not found"));

    // 34: health. Instances passing, warning, and critical (the last on a
    // check the query may ignore).
    reg(
        &c,
        "n4",
        "10.0.0.4",
        "cache",
        "cache-pass",
        &[],
        "passing",
        "cp",
    );
    reg(
        &c,
        "n5",
        "10.0.0.5",
        "cache",
        "cache-warn",
        &[],
        "warning",
        "cw",
    );
    reg(
        &c,
        "n6",
        "10.0.0.6",
        "cache",
        "cache-crit",
        &[],
        "critical",
        "flaky",
    );
    create(
        &c,
        json!({"Name": "cache", "Service": {"Service": "cache"}}),
    );
    assert_eq!(ids(&execute(&c, "cache")), ["cache-pass", "cache-warn"]);
    create(
        &c,
        json!({"Name": "cache-strict", "Service": {"Service": "cache", "OnlyPassing": true}}),
    );
    assert_eq!(ids(&execute(&c, "cache-strict")), ["cache-pass"]);
    create(
        &c,
        json!({"Name": "cache-all", "Service": {"Service": "cache", "IgnoreCheckIDs": ["flaky"]}}),
    );
    assert_eq!(
        ids(&execute(&c, "cache-all")),
        ["cache-crit", "cache-pass", "cache-warn"]
    );

    // 35: limit, a bad limit, near.
    let one = c.get_ok("/v1/query/cache/execute?limit=1").json();
    assert_eq!(one["Nodes"].as_array().expect("list").len(), 1);
    let bad = c.get("/v1/query/cache/execute?limit=x");
    assert_eq!(bad.status, 500);
    assert!(bad.body.starts_with("Bad limit"), "{}", bad.body);
    let me = c.get_ok("/v1/agent/self").json()["Config"]["NodeName"]
        .as_str()
        .expect("node name")
        .to_string();
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "cache", "ID": "cache-mine", "Address": "10.0.0.9", "Port": 1}).to_string(),
    );
    for _ in 0..10 {
        let near = c.get_ok("/v1/query/cache/execute?near=_agent").json();
        assert_eq!(near["Nodes"][0]["Node"]["Node"], me.as_str(), "{near}");
        assert_eq!(near["Nodes"].as_array().expect("list").len(), 3);
    }

    // 36: a template by name prefix, rendered from its regular expression.
    reg(
        &c,
        "n7",
        "10.0.0.7",
        "mysql-customer",
        "m-1",
        &["primary"],
        "passing",
        "m1",
    );
    reg(
        &c,
        "n8",
        "10.0.0.8",
        "mysql-customer",
        "m-2",
        &["replica"],
        "passing",
        "m2",
    );
    create(
        &c,
        json!({
            "Name": "geo-db",
            "Template": {"Type": "name_prefix_match", "Regexp": "^geo-db-(.*?)-([^\\-]+?)$"},
            "Service": {"Service": "mysql-${match(1)}", "Tags": ["${match(2)}"]},
        }),
    );
    let explained = c.get_ok("/v1/query/geo-db-customer-primary/explain").json();
    assert_eq!(explained["Query"]["Service"]["Service"], "mysql-customer");
    assert_eq!(explained["Query"]["Service"]["Tags"], json!(["primary"]));
    assert_eq!(ids(&execute(&c, "geo-db-customer-replica")), ["m-2"]);
    // A catch-all template, and a second one refused.
    create(
        &c,
        json!({"Name": "", "Template": {"Type": "name_prefix_match"}, "Service": {"Service": "${name.full}"}}),
    );
    assert_eq!(ids(&execute(&c, "mysql-customer")), ["m-1", "m-2"]);
    let second = c.post(
        "/v1/query",
        &json!({"Template": {"Type": "name_prefix_match"}, "Service": {"Service": "x"}})
            .to_string(),
    );
    assert_eq!(second.status, 500);
    assert!(
        second.body.contains("empty name already exists"),
        "{}",
        second.body
    );

    // 37 and the other refusals: each a clear 500 or 400, nothing stored.
    let before = c.get_ok("/v1/query").json().as_array().expect("list").len();
    for (body, text) in [
        (
            json!({"Service": {"Service": "db"}}),
            "Must be bound to a session",
        ),
        (json!({"Name": "x"}), "Must provide a Service name to query"),
        (
            json!({"Name": "DB", "Service": {"Service": "db"}}),
            "aliases an existing query name",
        ),
        (
            json!({"Name": id, "Service": {"Service": "db"}}),
            "aliases an existing query ID",
        ),
        (
            json!({"Name": "t", "Template": {"Type": "glob"}, "Service": {"Service": "db"}}),
            "Bad Template.Type",
        ),
        (
            json!({"Name": "t", "Template": {"Type": "name_prefix_match", "Regexp": "("}, "Service": {"Service": "db"}}),
            "Bad Regexp",
        ),
        (
            json!({"Name": "t", "Service": {"Service": "db", "Failover": {"NearestN": -1}}}),
            "Bad NearestN '-1', must be >= 0",
        ),
        (
            json!({"Name": "t", "Session": "s", "Service": {"Service": "db"}}),
            "invalid session",
        ),
    ] {
        let answer = c.post("/v1/query", &body.to_string());
        assert_eq!(answer.status, 500, "{body}: {}", answer.body);
        assert!(answer.body.contains(text), "{body}: {}", answer.body);
    }
    let malformed = c.post("/v1/query", "{\"Name\": ");
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert_eq!(
        c.get_ok("/v1/query").json().as_array().expect("list").len(),
        before,
        "nothing stored by a refusal"
    );

    // Update and delete.
    let update = json!({"Name": "db", "Service": {"Service": "db", "Tags": ["replica"]}, "DNS": {"TTL": "10s"}});
    c.put_ok(&format!("/v1/query/{id}"), &update.to_string());
    assert_eq!(ids(&execute(&c, "db")), ["db-3"]);
    let unknown = c.put(
        "/v1/query/2b6ff3b3-0000-4000-8000-000000000000",
        &update.to_string(),
    );
    assert_eq!(unknown.status, 500);
    assert!(
        unknown
            .body
            .contains("Cannot modify non-existent prepared query"),
        "{}",
        unknown.body
    );

    // 38: DNS. The query's instances, its TTL, both name forms; none
    // anywhere or no such query: NXDOMAIN.
    let dns = agent.dns;
    let srv = udp(dns, "db.query.consul", RecordType::SRV);
    assert_eq!(srv.metadata.response_code, ResponseCode::NoError);
    assert_eq!(srv.answers.len(), 1, "{:?}", srv.answers);
    assert_eq!(srv.answers[0].ttl, 10, "DNS.TTL");
    match &srv.answers[0].data {
        RData::SRV(s) => assert_eq!(s.port, 5432),
        other => panic!("not SRV: {other:?}"),
    }
    assert_eq!(
        ips(&udp(dns, "_db._tcp.query.consul", RecordType::SRV).additionals),
        vec!["10.0.0.3".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(
        ips(&udp(dns, "db.query.consul", RecordType::A).answers),
        vec!["10.0.0.3".parse::<std::net::IpAddr>().expect("ip")]
    );
    let strict = ips(&udp(dns, "cache-strict.query.consul", RecordType::A).answers);
    let want: Vec<std::net::IpAddr> = ["10.0.0.4", "10.0.0.9"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    assert_eq!(strict, want, "the warning one left out");
    let templated = ips(&udp(dns, "geo-db-customer-primary.query.consul", RecordType::A).answers);
    assert_eq!(
        templated,
        vec!["10.0.0.7".parse::<std::net::IpAddr>().expect("ip")]
    );
    let none = udp(dns, "geo-db-nobody-primary.query.consul", RecordType::A);
    assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);
    c.delete(&format!("/v1/query/{id}"));
    let gone = c.get(&format!("/v1/query/{id}"));
    assert_eq!(gone.status, 404, "deleted");
    // The catch-all now answers `db` (any service by its own name).
    assert_eq!(ids(&execute(&c, "db")), ["db-1", "db-2", "db-3"]);
}

#[test]
fn execute_blocks_until_its_answer_moves() {
    let agent = Agent::start();
    let c = agent.client();
    reg(&c, "n1", "10.0.0.1", "db", "db-1", &[], "passing", "c1");
    let id = create(&c, json!({"Name": "db", "Service": {"Service": "db"}}));
    let first = c.get_ok("/v1/query/db/execute");
    assert!(first.index > 0);
    assert_eq!(first.json()["Index"].as_u64(), Some(first.index));

    // Nothing changes: the wait runs out with the same index.
    let started = Instant::now();
    let idle = c.get_ok(&format!(
        "/v1/query/db/execute?index={}&wait=1s",
        first.index
    ));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(idle.index, first.index);

    // Another service changes: still waiting. Ours changes: answered.
    let (index, base) = (first.index, c.clone());
    let waiter = std::thread::spawn(move || {
        base.get_ok(&format!("/v1/query/db/execute?index={index}&wait=30s"))
    });
    reg(&c, "n9", "10.0.0.9", "other", "o-1", &[], "passing", "o1");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "another service's change woke it");
    reg(&c, "n2", "10.0.0.2", "db", "db-2", &[], "passing", "c2");
    let woke = waiter.join().expect("waiter");
    assert!(woke.index > first.index);
    assert_eq!(ids(&woke.json()), ["db-1", "db-2"]);

    // A new definition wakes it too.
    let (index, base) = (woke.index, c.clone());
    let waiter = std::thread::spawn(move || {
        base.get_ok(&format!("/v1/query/db/execute?index={index}&wait=30s"))
    });
    c.put_ok(
        &format!("/v1/query/{id}"),
        &json!({"Name": "db", "Service": {"Service": "db", "Tags": ["none-has-it"]}}).to_string(),
    );
    let woke = waiter.join().expect("waiter");
    assert!(woke.index > index);
    assert_eq!(ids(&woke.json()), Vec::<String>::new());
}

#[test]
fn queries_survive_a_restart() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let data = scratch.path().join("data");
    let agent = Agent::start_in(&data, &[]);
    let c = agent.client();
    let id = create(
        &c,
        json!({"Name": "kept", "Service": {"Service": "db", "OnlyPassing": true, "Failover": {"NearestN": 2, "Datacenters": ["dc9"]}}}),
    );
    let before = c.get_ok(&format!("/v1/query/{id}")).json();
    agent.terminate();

    let agent = Agent::start_in(&data, &[]);
    let c = agent.client();
    let after = eventually("the query is back", Duration::from_secs(10), || {
        let answer = c.get(&format!("/v1/query/{id}"));
        (answer.status == 200).then(|| answer.json())
    });
    assert_eq!(after, before);
    assert_eq!(
        c.get_ok("/v1/query/kept/execute").json()["Nodes"],
        json!([])
    );
}
