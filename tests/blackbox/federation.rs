//! Many datacenters (issue 29): separate agents with their own data
//! directories on loopback, one per datacenter, federated by configuration.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};

use crate::dns::{ask, ips, udp, Via};
use crate::support::{bin, eventually, Agent, Client};

const READER: &str = "dc3-reader-token-0123456789";
const WRITER: &str = "dc3-writer-token-0123456789";

/// An agent of datacenter `dc` with `extra` config text.
fn start_dc(scratch: &Path, dc: &str, extra: &str) -> Agent {
    start_dc_with(scratch, dc, extra, &[])
}

/// `start_dc` with more arguments (they override the harness's own).
fn start_dc_with(scratch: &Path, dc: &str, extra: &str, args: &[&str]) -> Agent {
    let config = format!("[agent]\ndatacenter = \"{dc}\"\n{extra}");
    let path = scratch.join(format!("{dc}.toml"));
    std::fs::write(&path, config).expect("write config");
    let node = format!("{dc}-node");
    let mut all = vec![
        "--config",
        path.to_str().expect("utf8"),
        "--node-name",
        &node,
        "--proxy-threads",
        "1",
    ];
    all.extend_from_slice(args);
    Agent::start_in(&scratch.join(format!("data-{dc}")), &all)
}

fn host_port(agent: &Agent) -> String {
    agent
        .api
        .strip_prefix("http://")
        .expect("cleartext API")
        .trim_end_matches('/')
        .to_string()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn register(c: &Client, id: &str, port: u16) {
    c.put_ok(
        "/v1/agent/service/register",
        &json!({"Name": "web", "ID": id, "Address": "127.0.0.1", "Port": port}).to_string(),
    );
}

/// Waits until the agent of `c` has reached datacenter `dc` (measured, so
/// failover does not skip it).
fn wait_reachable(c: &Client, dc: &str) {
    eventually(&format!("{dc} reachable"), Duration::from_secs(10), || {
        let list = c.get_ok("/v1/switchyard/datacenters").json();
        list.as_array()?
            .iter()
            .any(|d| d["name"] == dc && d["reachable"] == true)
            .then_some(())
    });
}

/// dc1 knows dc2 (open), dc3 (tokens) and dc4 (nobody home).
struct Fleet {
    dc1: Agent,
    dc2: Agent,
    dc3: Agent,
    _scratch: tempfile::TempDir,
}

fn fleet() -> Fleet {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let dc3 = start_dc(
        scratch.path(),
        "dc3",
        &format!(
            "[[api.tokens]]\nname = \"reader\"\nrole = \"read\"\nsecret = \"{READER}\"\n\
             [[api.tokens]]\nname = \"writer\"\nrole = \"register\"\nsecret = \"{WRITER}\"\n"
        ),
    );
    let federation = format!(
        "[federation]\nprobe_interval = \"200ms\"\nconnect_timeout = \"500ms\"\ndns_timeout = \"1s\"\n\
         [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n\
         [[federation.datacenters]]\nname = \"dc3\"\napi = [\"http://{}\"]\n\
         [[federation.datacenters]]\nname = \"dc4\"\napi = [\"127.0.0.1:{}\"]\n",
        host_port(&dc2),
        host_port(&dc3),
        closed_port()
    );
    let dc1 = start_dc(scratch.path(), "dc1", &federation);
    Fleet {
        dc1,
        dc2,
        dc3,
        _scratch: scratch,
    }
}

#[test]
fn reads_and_writes_name_a_datacenter_and_are_answered_there() {
    let fleet = fleet();
    let (dc1, dc2) = (fleet.dc1.client(), fleet.dc2.client());
    register(&dc2, "web-a", 9001);

    // The catalog: ours first, then those that answer, by round trip; the
    // one nobody answers for last.
    let listed = eventually("dc2 and dc3 measured", Duration::from_secs(10), || {
        let list = dc1.get_ok("/v1/catalog/datacenters").json();
        (list == json!(["dc1", "dc2", "dc3", "dc4"]) || list == json!(["dc1", "dc3", "dc2", "dc4"]))
            .then_some(list)
    });
    assert_eq!(listed[0], "dc1");
    let detail = dc1.get_ok("/v1/switchyard/datacenters").json();
    let dc4 = detail
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["name"] == "dc4")
        .expect("dc4 listed");
    assert_eq!(dc4["reachable"], false, "{detail}");
    assert_eq!(dc4["last_contact_ms"], Value::Null, "{detail}");
    let dc2_row = detail
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["name"] == "dc2")
        .expect("dc2");
    assert!(
        dc2_row["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{detail}"
    );

    // A read in dc2, through dc1: dc2's entries and dc2's index.
    let there = dc1.get_ok("/v1/catalog/service/web?dc=dc2");
    let direct = dc2.get_ok("/v1/catalog/service/web");
    assert_eq!(there.json(), direct.json());
    assert_eq!(there.json()[0]["Datacenter"], "dc2");
    assert_eq!(there.index, direct.index);
    // dc1 itself has no such service.
    assert_eq!(dc1.get_ok("/v1/catalog/service/web").json(), json!([]));
    // The native read too.
    let native = dc1.get_ok("/v1/switchyard/services/web?dc=dc2").json();
    assert_eq!(
        native["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{native}"
    );

    // A blocking read wakes on dc2's change, with dc2's new index.
    let index = there.index;
    let waiter = {
        let dc1 = dc1.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let answer = dc1.get(&format!(
                "/v1/health/service/web?dc=dc2&index={index}&wait=20s"
            ));
            (answer, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    register(&dc2, "web-b", 9002);
    let (woke, took) = waiter.join().expect("waiter");
    assert_eq!(woke.status, 200, "{}", woke.body);
    assert!(woke.index > index, "index {} after {index}", woke.index);
    assert_eq!(
        woke.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        woke.body
    );
    assert!(
        took < Duration::from_secs(15),
        "woke after {took:?}, not on the change"
    );

    // A write with ?dc= is made there.
    let node = json!({"Node": "remote-node", "Address": "10.0.0.9",
        "Service": {"Service": "db", "ID": "db-1", "Port": 5432}});
    dc1.put_ok("/v1/catalog/register?dc=dc2", &node.to_string());
    assert_eq!(
        dc2.get_ok("/v1/catalog/service/db").json()[0]["Node"],
        "remote-node"
    );
    assert_eq!(dc1.get_ok("/v1/catalog/service/db").json(), json!([]));

    // So is one whose body names dc2 (Consul's Datacenter field), and its
    // deregistration; a datacenter with no path is refused.
    let body = json!({"Datacenter": "dc2", "Node": "body-node", "Address": "10.0.0.8",
        "Service": {"Service": "cache", "ID": "cache-1", "Port": 6379}});
    dc1.put_ok("/v1/catalog/register", &body.to_string());
    assert_eq!(
        dc2.get_ok("/v1/catalog/service/cache").json()[0]["Node"],
        "body-node"
    );
    assert_eq!(dc1.get_ok("/v1/catalog/service/cache").json(), json!([]));
    let gone = json!({"Datacenter": "dc2", "Node": "body-node"});
    dc1.put_ok("/v1/catalog/deregister", &gone.to_string());
    assert_eq!(dc2.get_ok("/v1/catalog/service/cache").json(), json!([]));
    let nowhere = json!({"Datacenter": "dc9", "Node": "x", "Address": "10.0.0.9"});
    let refused = dc1.put("/v1/catalog/register", &nowhere.to_string());
    assert_eq!(refused.status, 500);
    assert!(
        refused.body.contains("No path to datacenter"),
        "{}",
        refused.body
    );

    // Agent endpoints are this agent's own, whatever dc says (as in Consul).
    let own = dc1.get_ok("/v1/agent/services?dc=dc2").json();
    assert_eq!(own.as_object().map(|o| o.len()), Some(0), "{own}");
}

#[test]
fn a_datacenter_without_a_path_tokens_and_loops_get_clear_errors() {
    let fleet = fleet();
    let dc1 = fleet.dc1.client();
    register(&fleet.dc3.client_with_token(WRITER), "web-z", 9009);

    let unknown = dc1.get("/v1/catalog/services?dc=dc9");
    assert_eq!(unknown.status, 500);
    assert!(
        unknown.body.contains("No path to datacenter \"dc9\""),
        "{}",
        unknown.body
    );

    let down = dc1.get("/v1/catalog/services?dc=dc4");
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(
        down.body.contains("\"dc4\" is not reachable"),
        "{}",
        down.body
    );

    // dc3 wants a token: none, or a wrong one, is refused there and says so.
    let none = dc1.get("/v1/catalog/services?dc=dc3");
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(
        none.body.contains("datacenter \"dc3\" refused"),
        "{}",
        none.body
    );
    let wrong = dc1.get("/v1/catalog/services?dc=dc3&token=not-the-token-at-all");
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let right = dc1.get_ok(&format!("/v1/catalog/service/web?dc=dc3&token={READER}"));
    assert_eq!(right.json()[0]["ServiceID"], "web-z");

    // A request another agent forwarded is not forwarded again.
    let looped = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .get(format!("{}/v1/catalog/services?dc=dc2", fleet.dc1.api))
        .header("X-Switchyard-Forwarded-From", "dc7")
        .call()
        .expect("request");
    assert_eq!(looped.status().as_u16(), 500);

    // The operator's view.
    let out = std::process::Command::new(bin())
        .args(["datacenters", "--api", &fleet.dc1.api])
        .output()
        .expect("run switchyard datacenters");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[1].starts_with("dc1") && lines[1].contains("local"),
        "{text}"
    );
    let dc4 = lines
        .iter()
        .find(|l| l.starts_with("dc4"))
        .expect("dc4 row");
    assert!(dc4.contains("unreached") && dc4.contains("never"), "{text}");
    let metrics = dc1.get_ok("/metrics").body;
    assert!(
        metrics.contains("switchyard_federation_reachable{datacenter=\"dc4\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "switchyard_federation_forwarded_total{datacenter=\"dc4\",outcome=\"unreachable\"} 1"
    ));
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().expect("ip")
}

#[test]
fn dns_answers_names_of_another_datacenter_from_a_copy_that_follows_it() {
    let fleet = fleet();
    let dc2 = fleet.dc2.client();
    let batch = json!({
        "nodes": [
            {"name": "n1", "address": "10.0.0.1"},
            {"name": "n2", "address": "10.0.0.2"},
            {"name": "n3", "address": "10.0.0.3"},
        ],
        "endpoints": [
            {"node": "n1", "service": "web", "id": "w1", "port": 8001, "tags": ["v1"]},
            {"node": "n3", "service": "Payments", "id": "pay1", "port": 7000},
            // Critical until its TTL is renewed: not routable, so not copied.
            {"node": "n2", "service": "web", "id": "w2", "port": 8002, "checks": [{"ttl": "1h"}]},
        ],
    });
    dc2.put_ok("/v1/switchyard/batch", &batch.to_string());
    let dns = fleet.dc1.dns;

    // The first ask waits for the copy's first fetch, then answers.
    let first = udp(dns, "web.service.dc2.consul", RecordType::A);
    assert_eq!(first.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&first.answers), vec![ip("10.0.0.1")]);
    // Ours has no such service.
    let here = udp(dns, "web.service.consul", RecordType::A);
    assert_eq!(here.metadata.response_code, ResponseCode::NXDomain);
    // Every form, over UDP and TCP.
    let tagged = udp(dns, "v1.web.service.dc2.consul", RecordType::A);
    assert_eq!(ips(&tagged.answers), vec![ip("10.0.0.1")]);
    let (over_tcp, _) = ask(dns, "web.service.dc2.consul", RecordType::A, None, Via::Tcp);
    assert_eq!(ips(&over_tcp.answers), vec![ip("10.0.0.1")]);
    let srv = udp(dns, "_web._tcp.service.dc2.consul", RecordType::SRV);
    let targets: Vec<(u16, String)> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.port, srv.target.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(targets.len(), 1, "{srv:?}");
    assert_eq!(targets[0].0, 8001);
    assert!(
        targets[0].1.contains(".dc2."),
        "the target names dc2: {targets:?}"
    );
    let node = udp(dns, "n2.node.dc2.consul", RecordType::A);
    assert_eq!(ips(&node.answers), vec![ip("10.0.0.2")]);
    let (node_tcp, _) = ask(dns, "n3.node.dc2.consul", RecordType::A, None, Via::Tcp);
    assert_eq!(ips(&node_tcp.answers), vec![ip("10.0.0.3")]);
    // Names are matched in any case there, as here.
    assert_eq!(
        a_records(dns, "payments.service.dc2.consul"),
        vec![ip("10.0.0.3")]
    );
    let missing = udp(dns, "nosuch.service.dc2.consul", RecordType::A);
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);

    // A change there shows here: an endpoint added, one removed.
    let more = json!({
        "endpoints": [{"node": "n3", "service": "web", "id": "w3", "port": 8003}],
        "deregister": [{"node": "n1", "id": "w1"}],
    });
    dc2.put_ok("/v1/switchyard/batch", &more.to_string());
    eventually("dc2's change in dc1's DNS", Duration::from_secs(5), || {
        let now = udp(dns, "web.service.dc2.consul", RecordType::A);
        (ips(&now.answers) == vec![ip("10.0.0.3")]).then_some(())
    });

    // A datacenter nobody answers for: SERVFAIL once dns_timeout is over.
    let down = udp(dns, "web.service.dc4.consul", RecordType::A);
    assert_eq!(down.metadata.response_code, ResponseCode::ServFail);
    // One this agent does not know is not a datacenter label at all.
    let unknown = udp(dns, "web.service.dc9.consul", RecordType::A);
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn made_up_names_cannot_grow_the_copies_past_their_cap() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    register(&dc2.client(), "web-a", 9001);
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nmax_copies = 3\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n",
            host_port(&dc2)
        ),
    );
    let answer = udp(dc1.dns, "web.service.dc2.consul", RecordType::A);
    assert_eq!(ips(&answer.answers), vec![ip("127.0.0.1")]);
    for made_up in ["x1", "x2"] {
        let m = udp(
            dc1.dns,
            &format!("{made_up}.service.dc2.consul"),
            RecordType::A,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
    let refused = udp(dc1.dns, "x3.service.dc2.consul", RecordType::A);
    assert_eq!(refused.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(
        dc1.client()
            .metric("switchyard_federation_copies{datacenter=\"dc2\"}"),
        Some(3.0)
    );
    // What is copied already still answers.
    let again = udp(dc1.dns, "web.service.dc2.consul", RecordType::A);
    assert_eq!(ips(&again.answers), vec![ip("127.0.0.1")]);
    assert!(dc1.stderr().contains("federation.max_copies"));
}

#[test]
fn a_copy_nobody_asks_for_expires() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    register(&dc2.client(), "web-a", 9001);
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\ncopy_expiry = \"1s\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n",
            host_port(&dc2)
        ),
    );
    let c = dc1.client();
    let copies = || c.metric("switchyard_federation_copies{datacenter=\"dc2\"}");
    assert_eq!(copies(), Some(0.0));
    let answer = udp(dc1.dns, "web.service.dc2.consul", RecordType::A);
    assert_eq!(ips(&answer.answers), vec![ip("127.0.0.1")]);
    assert_eq!(copies(), Some(1.0));
    // Left alone, it goes.
    eventually("the copy dropped", Duration::from_secs(10), || {
        (copies() == Some(0.0)).then_some(())
    });
    // And is made again at the next ask.
    let again = udp(dc1.dns, "web.service.dc2.consul", RecordType::A);
    assert_eq!(ips(&again.answers), vec![ip("127.0.0.1")]);
    assert_eq!(copies(), Some(1.0));
}

/// Registers `id` of `service` through the agent API, at `address`, with a
/// TTL check (critical until passed) when `ttl`.
fn register_at(c: &Client, service: &str, id: &str, address: &str, tags: &[&str], ttl: bool) {
    let mut body = json!({"Name": service, "ID": id, "Address": address, "Port": 80, "Tags": tags});
    if ttl {
        body["Check"] = json!({"TTL": "1h"});
    }
    c.put_ok("/v1/agent/service/register", &body.to_string());
}

fn a_records(dns: std::net::SocketAddr, name: &str) -> Vec<std::net::IpAddr> {
    ips(&udp(dns, name, RecordType::A).answers)
}

#[test]
fn dns_fails_over_by_policy_and_share_and_comes_back() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let dc3 = start_dc(scratch.path(), "dc3", "");
    for (dc, at) in [(&dc2, "10.0.2.1"), (&dc3, "10.0.3.1")] {
        let c = dc.client();
        for service in ["web", "api", "db", "cache"] {
            register_at(&c, service, &format!("{service}-x"), at, &[], false);
        }
    }
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nprobe_interval = \"200ms\"\nconnect_timeout = \"500ms\"\n\
             failover = [\"dc3\", \"dc2\"]\nmin_healthy = 0.6\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n\
             [[federation.datacenters]]\nname = \"dc3\"\napi = [\"{}\"]\n",
            host_port(&dc2),
            host_port(&dc3)
        ),
    );
    let c = dc1.client();
    // web: one of two routable here (0.5 < min_healthy 0.6).
    register_at(&c, "web", "web-1", "10.0.1.1", &[], true);
    register_at(&c, "web", "web-2", "10.0.1.2", &[], false);
    // api: down here, its own policy sends it to dc2.
    register_at(
        &c,
        "api",
        "api-1",
        "10.0.1.3",
        &["switchyard.failover=dc2"],
        true,
    );
    // db: down here, and never fails over.
    register_at(
        &c,
        "db",
        "db-1",
        "10.0.1.4",
        &["switchyard.failover=none"],
        true,
    );
    let dns = dc1.dns;
    // Both others measured first, so neither is skipped as out of reach.
    eventually("dc2 and dc3 reachable", Duration::from_secs(10), || {
        let list = c.get_ok("/v1/switchyard/datacenters").json();
        (list
            .as_array()?
            .iter()
            .filter(|d| d["reachable"] == true)
            .count()
            == 3)
            .then_some(())
    });

    assert_eq!(
        a_records(dns, "web.service.consul"),
        vec![ip("10.0.3.1")],
        "the first of the list"
    );
    assert_eq!(
        a_records(dns, "api.service.consul"),
        vec![ip("10.0.2.1")],
        "its own policy"
    );
    let db = udp(dns, "db.service.consul", RecordType::A);
    assert_eq!(db.metadata.response_code, ResponseCode::NoError);
    assert!(
        db.answers.is_empty(),
        "no failover for db: {:?}",
        db.answers
    );
    assert_eq!(
        a_records(dns, "cache.service.consul"),
        vec![ip("10.0.3.1")],
        "absent here"
    );
    let failing_to = |dc: &str| {
        c.metric(&format!(
            "switchyard_federation_failover_services{{datacenter=\"{dc}\"}}"
        ))
    };
    assert_eq!(failing_to("dc3"), Some(2.0));
    assert_eq!(failing_to("dc2"), Some(1.0));
    let listed = c.get_ok("/v1/switchyard/datacenters").json();
    let dc3_row = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["name"] == "dc3")
        .expect("dc3");
    assert_eq!(
        dc3_row["failover_services"],
        json!(["cache", "web"]),
        "{listed}"
    );
    // The dashboard shows the same.
    let page = c.get_ok("/ui/datacenters?fragment=1").body;
    let row = page
        .split("<tr ")
        .find(|row| row.contains("data-dc=\"dc3\""))
        .unwrap_or_else(|| panic!("no dc3 row: {page}"));
    assert!(
        row.contains("reachable") && row.contains("cache, web"),
        "{row}"
    );

    // web's share recovers: served here again.
    c.put_ok("/v1/agent/check/pass/service:web-1", "");
    let mut here = a_records(dns, "web.service.consul");
    here.sort();
    assert_eq!(here, vec![ip("10.0.1.1"), ip("10.0.1.2")]);
    eventually(
        "web's failover shown as over",
        Duration::from_secs(5),
        || (failing_to("dc3") == Some(1.0)).then_some(()),
    );
    assert!(
        dc1.stderr().contains("failover over"),
        "the end is logged too"
    );

    // dc3 gone: failover skips it once it is seen out of reach.
    dc3.kill9();
    eventually("cache fails over to dc2", Duration::from_secs(10), || {
        (a_records(dns, "cache.service.consul") == vec![ip("10.0.2.1")]).then_some(())
    });
    let page = c.get_ok("/ui/datacenters?fragment=1").body;
    assert!(page.contains("out of reach"), "{page}");
    assert!(
        dc1.stderr().contains("service fails over"),
        "one log line per change"
    );
    // Where cache went has none left either: that failover is over too.
    eventually(
        "cache and api fail over to dc2",
        Duration::from_secs(5),
        || (failing_to("dc2") == Some(2.0)).then_some(()),
    );
    dc2.client()
        .put_ok("/v1/agent/service/deregister/cache-x", "");
    eventually("cache's failover over", Duration::from_secs(5), || {
        (failing_to("dc2") == Some(1.0)).then_some(())
    });
    assert!(dc1.stderr().contains("no routable endpoint of it either"));
}

#[test]
fn the_proxy_fails_over_to_another_datacenter_and_back() {
    use crate::proxy::{get, Upstream};
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let remote = Upstream::start("remote");
    crate::proxy::register(&dc2.client(), "web", &[&remote], &[]);
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nfailover = \"nearest\"\nprobe_interval = \"200ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n\
             [[http.routes]]\nhost = \"web.test\"\nservice = \"web\"\n\
             [[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"web\"\n",
            host_port(&dc2)
        ),
    );
    let c = dc1.client();
    let local = Upstream::start("local");
    let body = json!({"Name": "web", "ID": "web-local", "Address": "127.0.0.1",
        "Port": local.addr.port(), "Check": {"TTL": "1h"}});
    c.put_ok("/v1/agent/service/register", &body.to_string());
    wait_reachable(&c, "dc2");
    let over_l4 = |addr: std::net::SocketAddr| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect L4");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    };

    let over_h2c = |addr: std::net::SocketAddr| -> (u16, String) {
        use http_body_util::{BodyExt, Empty};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .expect("h2c");
            tokio::spawn(conn);
            let request = hyper::Request::builder()
                .uri("http://web.test/")
                .body(Empty::<hyper::body::Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };

    // Critical here: HTTP/1.1, HTTP/2 and L4 go to dc2's endpoint.
    let first = get(dc1.http, "web.test", "/");
    assert_eq!((first.status, first.body.as_str()), (200, "remote"));
    assert_eq!(over_h2c(dc1.http), (200, "remote".to_string()));
    assert!(over_l4(dc1.tcp[0]).ends_with("remote"));
    // Healthy here: back at once.
    c.put_ok("/v1/agent/check/pass/service:web-local", "");
    let back = get(dc1.http, "web.test", "/");
    assert_eq!((back.status, back.body.as_str()), (200, "local"));
    assert_eq!(over_h2c(dc1.http), (200, "local".to_string()));
    assert!(over_l4(dc1.tcp[0]).ends_with("local"));
    // And away again.
    c.put_ok("/v1/agent/check/fail/service:web-local", "");
    let again = get(dc1.http, "web.test", "/");
    assert_eq!((again.status, again.body.as_str()), (200, "remote"));
}

fn post(url: &str, body: &str) -> (u16, Value) {
    let mut response = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(url)
        .send(body)
        .expect("request");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn one_watch_carries_many_names_and_blocks_until_one_moves() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let c = dc2.client();
    register(&c, "web-a", 9001);
    let url = format!("{}/v1/switchyard/watch?wait=20s", dc2.api);

    // Never fetched (index 0): answered at once, gone names as such.
    let (status, first) = post(
        &url,
        r#"{"services": {"web": 0, "nope": 0}, "nodes": {"dc2-node": 0}}"#,
    );
    assert_eq!(status, 200, "{first}");
    let web = &first["services"]["web"];
    assert_eq!(
        web["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    assert_eq!(first["services"]["nope"]["endpoints"], json!([]));
    assert_eq!(first["nodes"]["dc2-node"]["node"]["name"], "dc2-node");
    let index = web["index"].as_u64().expect("index");

    // Held at its index: blocks until web moves, and answers with web alone.
    let body =
        json!({"services": {"web": index, "nope": first["services"]["nope"]["index"]}}).to_string();
    let waiter = {
        let (url, body) = (url.clone(), body.clone());
        std::thread::spawn(move || post(&url, &body))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "nothing moved: it waits");
    register(&c, "web-b", 9002);
    let (status, moved) = waiter.join().expect("waiter");
    assert_eq!(status, 200);
    assert_eq!(
        moved["services"]["web"]["endpoints"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{moved}"
    );
    assert!(moved["services"].get("nope").is_none(), "{moved}");

    // Nothing moves within its wait: an empty answer.
    let short = format!("{}/v1/switchyard/watch?wait=200ms", dc2.api);
    let index = moved["services"]["web"]["index"].as_u64().expect("index");
    let (_, idle) = post(&short, &json!({"services": {"web": index}}).to_string());
    assert_eq!(idle["services"], json!({}), "{idle}");
    // A body that is not a watch is refused.
    let (status, _) = post(&url, "{\"services\": [1, 2]}");
    assert_eq!(status, 400);
}

#[test]
fn hundreds_of_copied_names_share_one_connection_to_a_datacenter() {
    // The remote allows 200 connections per client (api default): one
    // watch per name would stop at 200.
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let endpoints: Vec<Value> = (0..300)
        .map(|i| json!({"node": "n1", "service": format!("s{i}"), "id": format!("s{i}"), "port": 80}))
        .collect();
    let batch = json!({"nodes": [{"name": "n1", "address": "10.1.1.1"}], "endpoints": endpoints});
    dc2.client()
        .put_ok("/v1/switchyard/batch", &batch.to_string());
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n",
            host_port(&dc2)
        ),
    );
    for i in 0..300 {
        let name = format!("s{i}.service.dc2.consul");
        assert_eq!(a_records(dc1.dns, &name), vec![ip("10.1.1.1")], "{name}");
    }
    assert_eq!(
        dc1.client()
            .metric("switchyard_federation_copies{datacenter=\"dc2\"}"),
        Some(300.0)
    );
}

#[test]
fn a_datacenter_out_of_reach_answers_from_its_copy_with_its_age_and_catches_up() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let port = closed_port();
    let api = format!("127.0.0.1:{port}");
    let dc2 = start_dc_with(scratch.path(), "dc2", "", &["--api-addr", &api]);
    register_at(&dc2.client(), "web", "web-1", "10.0.0.1", &[], false);
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nprobe_interval = \"200ms\"\nconnect_timeout = \"500ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{api}\"]\n"
        ),
    );
    let c = dc1.client();
    assert_eq!(
        a_records(dc1.dns, "web.service.dc2.consul"),
        vec![ip("10.0.0.1")]
    );
    let fresh = c.get_ok("/v1/health/service/web?dc=dc2");
    assert_eq!(fresh.header("X-Consul-KnownLeader"), Some("true"));

    // Cut off: DNS and health reads answer from the copy, stale, aged.
    dc2.kill9();
    eventually("dc2 seen out of reach", Duration::from_secs(10), || {
        (c.metric("switchyard_federation_reachable{datacenter=\"dc2\"}") == Some(0.0)).then_some(())
    });
    assert_eq!(
        a_records(dc1.dns, "web.service.dc2.consul"),
        vec![ip("10.0.0.1")]
    );
    let stale = c.get_ok("/v1/health/service/web?dc=dc2");
    assert_eq!(stale.header("X-Consul-KnownLeader"), Some("false"));
    let age: u64 = stale
        .header("X-Consul-LastContact")
        .and_then(|v| v.parse().ok())
        .expect("an age");
    assert!(age > 0, "stale for {age} ms");
    assert_eq!(stale.json()[0]["Service"]["ID"], "web-1", "{}", stale.body);
    assert!(c.metric("switchyard_federation_last_contact_seconds{datacenter=\"dc2\"}") > Some(0.0));
    let catalog = c.get_ok("/v1/catalog/service/web?dc=dc2");
    assert_eq!(catalog.header("X-Consul-KnownLeader"), Some("false"));
    assert_eq!(catalog.json()[0]["ServiceID"], "web-1", "{}", catalog.body);
    let stale_for = || c.metric("switchyard_federation_copy_stale_seconds{datacenter=\"dc2\"}");
    eventually("the copies shown stale", Duration::from_secs(10), || {
        (stale_for() > Some(0.0)).then_some(())
    });
    // A read of something never copied has nothing to fall back on.
    assert_eq!(c.get("/v1/health/service/other?dc=dc2").status, 503);

    // Back: the copy catches up with what changed meanwhile.
    let dc2 = start_dc_with(scratch.path(), "dc2", "", &["--api-addr", &api]);
    register_at(&dc2.client(), "web", "web-2", "10.0.0.2", &[], false);
    eventually("dc2's change in dc1's DNS", Duration::from_secs(15), || {
        let mut now = a_records(dc1.dns, "web.service.dc2.consul");
        now.sort();
        (now == vec![ip("10.0.0.1"), ip("10.0.0.2")]).then_some(())
    });
    eventually(
        "the copies following again",
        Duration::from_secs(10),
        || (stale_for() == Some(0.0)).then_some(()),
    );
    eventually("dc2 reachable again", Duration::from_secs(10), || {
        (c.metric("switchyard_federation_reachable{datacenter=\"dc2\"}") == Some(1.0)).then_some(())
    });
}

#[test]
fn a_datacenter_of_two_agents_on_etcd_is_asked_through_either() {
    // (Etcd::single says loudly when etcd is not installed.)
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let agent = |name: &str| {
        let dc2 = "[agent]\ndatacenter = \"dc2\"\n";
        crate::cluster::agent_on_with(scratch.path(), name, &[etcd.url()], "/dc2", dc2)
    };
    let (a, b) = (agent("dc2-a"), agent("dc2-b"));
    register_at(&a.client(), "web", "web-1", "10.0.0.1", &[], false);
    // A prepared query made through one agent executes through the other.
    let made = a.client().post(
        "/v1/query",
        &json!({"Name": "web-q", "Service": {"Service": "web"}}).to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.body);
    eventually(
        "the query through dc2's other agent",
        Duration::from_secs(10),
        || {
            let answer = b.client().get("/v1/query/web-q/execute");
            (answer.status == 200 && answer.json()["Nodes"][0]["Service"]["ID"] == "web-1")
                .then_some(())
        },
    );
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nprobe_interval = \"200ms\"\nconnect_timeout = \"500ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\", \"{}\"]\n",
            host_port(&a),
            host_port(&b)
        ),
    );
    let c = dc1.client();
    assert_eq!(
        a_records(dc1.dns, "web.service.dc2.consul"),
        vec![ip("10.0.0.1")]
    );
    assert_eq!(
        c.get_ok("/v1/catalog/service/web?dc=dc2").json()[0]["ServiceID"],
        "web-1"
    );

    // One agent of dc2 gone: the other answers reads and carries changes.
    a.kill9();
    let read = c.get_ok("/v1/catalog/service/web?dc=dc2");
    assert_eq!(read.json()[0]["ServiceID"], "web-1", "{}", read.body);
    register_at(&b.client(), "web", "web-2", "10.0.0.2", &[], false);
    eventually(
        "a change made through dc2's other agent",
        Duration::from_secs(15),
        || {
            let mut now = a_records(dc1.dns, "web.service.dc2.consul");
            now.sort();
            (now == vec![ip("10.0.0.1"), ip("10.0.0.2")]).then_some(())
        },
    );
}

#[test]
fn failover_through_another_datacenters_proxy_is_marked_and_never_sent_on() {
    use crate::proxy::{get, get_with, Upstream};
    let scratch = tempfile::tempdir().expect("tempdir");
    let route = "[[http.routes]]\nhost = \"web.test\"\nservice = \"web\"\n";
    // dc3: web is up.
    let dc3 = start_dc(scratch.path(), "dc3", route);
    let third = Upstream::start("third");
    crate::proxy::register(&dc3.client(), "web", &[&third], &[]);
    // dc2: web is up, and would fail over to dc3.
    let dc2 = start_dc(
        scratch.path(),
        "dc2",
        &format!(
            "{route}[federation]\nfailover = \"nearest\"\nprobe_interval = \"200ms\"\n\
             [[federation.datacenters]]\nname = \"dc3\"\napi = [\"{}\"]\n",
            host_port(&dc3)
        ),
    );
    let remote = Upstream::start("remote");
    crate::proxy::register(&dc2.client(), "web", &[&remote], &[]);
    // dc1: web down here; dc2 reached through its proxy.
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "{route}[federation]\nfailover = [\"dc2\"]\nprobe_interval = \"200ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\nvia = \"proxy\"\nproxy = [\"{}\"]\n",
            host_port(&dc2),
            dc2.http
        ),
    );
    let c = dc1.client();
    register_at(&c, "web", "web-local", "127.0.0.1", &[], true);
    wait_reachable(&dc1.client(), "dc2");
    wait_reachable(&dc2.client(), "dc3");

    // Through dc2's proxy: two hops, marked with our datacenter.
    let through = get(dc1.http, "web.test", "/");
    assert_eq!((through.status, through.body.as_str()), (200, "remote"));
    assert_eq!(
        through
            .headers
            .get("x-saw-x-switchyard-failover")
            .map(String::as_str),
        Some("dc1"),
        "{through:?}"
    );
    let hops = through
        .headers
        .get("x-saw-x-forwarded-for")
        .cloned()
        .unwrap_or_default();
    assert_eq!(hops.split(',').count(), 2, "two proxies on the way: {hops}");

    // dc2's web down: dc2 would fail over to dc3, but a request marked by a
    // failover is served there or not at all.
    let body = json!({"Name": "web", "ID": "web-remote", "Address": "127.0.0.1",
        "Port": remote.addr.port(), "Check": {"TTL": "1h"}});
    dc2.client()
        .put_ok("/v1/agent/service/register", &body.to_string());
    dc2.client().put_ok(
        "/v1/switchyard/batch",
        &json!({"deregister": [{"node": "n1", "id": "remote"}]}).to_string(),
    );
    let unmarked = get(dc2.http, "web.test", "/");
    assert_eq!(
        (unmarked.status, unmarked.body.as_str()),
        (200, "third"),
        "dc2 fails over itself"
    );
    let marked = get_with(dc2.http, "web.test", "/", "x-switchyard-failover: dc1\r\n");
    assert_eq!(marked.status, 503, "{marked:?}");
}

#[test]
fn a_route_added_by_a_reload_fails_over_to_a_copy_made_before_it() {
    use crate::proxy::{get, Upstream};
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let remote = Upstream::start("remote");
    crate::proxy::register(&dc2.client(), "Api", &[&remote], &[]);
    let federation = format!(
        "[federation]\nfailover = \"nearest\"\nprobe_interval = \"200ms\"\n\
         [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n",
        host_port(&dc2)
    );
    let dc1 = start_dc(scratch.path(), "dc1", &federation);
    let c = dc1.client();
    register_at(&c, "Api", "api-local", "127.0.0.1", &[], true);
    wait_reachable(&c, "dc2");
    // DNS copies Api (not routed here yet: no proxy stats in the copy).
    assert_eq!(
        a_records(dc1.dns, "api.service.consul"),
        vec![ip("127.0.0.1")]
    );
    // A reload routes it (named in capitals, as registered): the copy made
    // before serves the route.
    std::fs::write(
        scratch.path().join("dc1.toml"),
        format!(
            "[agent]\ndatacenter = \"dc1\"\n{federation}\
             [[http.routes]]\nhost = \"api.test\"\nservice = \"Api\"\n"
        ),
    )
    .expect("config");
    dc1.signal("HUP");
    let answer = eventually(
        "the new route served from dc2",
        Duration::from_secs(10),
        || {
            let answer = get(dc1.http, "api.test", "/");
            (answer.status == 200).then_some(answer)
        },
    );
    assert_eq!(answer.body, "remote");
}

/// `execute` of prepared query `name` at `c`: (datacenter, failovers,
/// service IDs sorted, index).
fn execute(c: &Client, path: &str) -> (String, u64, Vec<String>, u64) {
    let answer = c.get_ok(path);
    let body = answer.json();
    let mut ids: Vec<String> = body["Nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("Nodes: {body}"))
        .iter()
        .map(|n| n["Service"]["ID"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    (
        body["Datacenter"].as_str().expect("dc").to_string(),
        body["Failovers"].as_u64().expect("failovers"),
        ids,
        answer.index,
    )
}

#[test]
fn prepared_queries_fail_over_and_a_blocking_execute_wakes_on_it() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dc2 = start_dc(scratch.path(), "dc2", "");
    let dc3 = start_dc(scratch.path(), "dc3", "");
    register_at(&dc2.client(), "db", "db-2", "10.0.2.1", &["primary"], false);
    register_at(&dc3.client(), "db", "db-3", "10.0.3.1", &["primary"], false);
    register_at(
        &dc3.client(),
        "db",
        "db-3-replica",
        "10.0.3.9",
        &["replica"],
        false,
    );
    let dc1 = start_dc(
        scratch.path(),
        "dc1",
        &format!(
            "[federation]\nprobe_interval = \"200ms\"\nconnect_timeout = \"500ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{}\"]\n\
             [[federation.datacenters]]\nname = \"dc3\"\napi = [\"{}\"]\n",
            host_port(&dc2),
            host_port(&dc3)
        ),
    );
    let c = dc1.client();
    register_at(&c, "db", "db-1", "10.0.1.1", &["primary"], true);
    c.put_ok("/v1/agent/check/pass/service:db-1", "");
    wait_reachable(&c, "dc2");
    wait_reachable(&c, "dc3");
    let made = c.post(
        "/v1/query",
        &json!({"Name": "db-any", "Service": {"Service": "db", "Tags": ["primary"],
            "Failover": {"Datacenters": ["dc3", "dc2"]}}})
        .to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let path = "/v1/query/db-any/execute";
    let (dc, failovers, ids, index) = execute(&c, path);
    assert_eq!(
        (dc.as_str(), failovers, ids),
        ("dc1", 0, vec!["db-1".to_string()])
    );

    // A blocking execute wakes the moment ours fail: answered from dc3.
    let (base, wait) = (c.clone(), format!("{path}?index={index}&wait=30s"));
    let waiter = std::thread::spawn(move || execute(&base, &wait));
    c.put_ok("/v1/agent/check/fail/service:db-1", "");
    let (dc, failovers, ids, index) = waiter.join().expect("waiter");
    assert_eq!(
        (dc.as_str(), failovers, ids),
        ("dc3", 1, vec!["db-3".to_string()]),
        "the first listed, its tags applied"
    );
    assert_eq!(
        a_records(dc1.dns, "db-any.query.consul"),
        vec![ip("10.0.3.1")],
        "DNS answers the same"
    );
    // A change there while failed over wakes it too.
    let (base, wait) = (c.clone(), format!("{path}?index={index}&wait=30s"));
    let waiter = std::thread::spawn(move || execute(&base, &wait));
    register_at(
        &dc3.client(),
        "db",
        "db-3b",
        "10.0.3.2",
        &["primary"],
        false,
    );
    let (dc, _, ids, _) = waiter.join().expect("waiter");
    assert_eq!(dc, "dc3");
    assert_eq!(ids, ["db-3", "db-3b"]);

    // NearestN: one of the others, whichever is nearer.
    let made = c.post(
        "/v1/query",
        &json!({"Name": "db-near", "Service": {"Service": "db", "Tags": ["primary"],
            "Failover": {"NearestN": 1}}})
        .to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let (dc, failovers, _, _) = execute(&c, "/v1/query/db-near/execute");
    assert!(dc == "dc2" || dc == "dc3", "{dc}");
    assert_eq!(failovers, 1);
    // Without failover: an empty answer, here.
    let made = c.post(
        "/v1/query",
        &json!({"Name": "db-here", "Service": {"Service": "db"}}).to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let (dc, failovers, ids, _) = execute(&c, "/v1/query/db-here/execute");
    assert_eq!(
        (dc.as_str(), failovers, ids),
        ("dc1", 0, Vec::<String>::new())
    );
    let none = udp(dc1.dns, "db-here.query.consul", RecordType::A);
    assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);

    // dc3 gone: failover skips it once it is seen out of reach, and a
    // blocking execute learns of that too (its wait is a minute: an answer
    // well before shows it was woken).
    let (_, _, _, index) = execute(&c, path);
    let (base, path_) = (c.clone(), path.to_string());
    let waiter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut index = index;
        loop {
            let got = execute(&base, &format!("{path_}?index={index}&wait=60s"));
            if got.0 != "dc3" || started.elapsed() > Duration::from_secs(60) {
                return (got, started.elapsed());
            }
            index = got.3;
        }
    });
    dc3.kill9();
    let ((dc, failovers, ids, _), took) = waiter.join().expect("waiter");
    assert_eq!(
        (dc.as_str(), failovers, ids),
        ("dc2", 1, vec!["db-2".to_string()])
    );
    assert!(
        took < Duration::from_secs(30),
        "woken, not timed out: {took:?}"
    );
    assert_eq!(
        a_records(dc1.dns, "db-any.query.consul"),
        vec![ip("10.0.2.1")]
    );

    // Ours recover: a blocking execute learns of it, answered here again.
    let (_, _, _, index) = execute(&c, path);
    let (base, wait) = (c.clone(), format!("{path}?index={index}&wait=30s"));
    let waiter = std::thread::spawn(move || execute(&base, &wait));
    c.put_ok("/v1/agent/check/pass/service:db-1", "");
    let (dc, failovers, ids, _) = waiter.join().expect("waiter");
    assert_eq!(
        (dc.as_str(), failovers, ids),
        ("dc1", 0, vec!["db-1".to_string()])
    );
    assert_eq!(
        a_records(dc1.dns, "db-any.query.consul"),
        vec![ip("10.0.1.1")]
    );
}
