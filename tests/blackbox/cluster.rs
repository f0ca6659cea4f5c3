//! Cluster mode: several agents on real etcd processes (one member, or a
//! three-member cluster) started here on loopback with temporary data dirs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use serde_json::{json, Value};

use crate::dns::{ips, udp};
use crate::proxy::{get, Upstream};
use crate::support::{eventually, Agent, Client};

/// The etcd binary; CI installs it (`apt-get install -y etcd-server`).
fn etcd_bin() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("etcd not found: cluster tests need a real etcd (apt-get install -y etcd-server)")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One etcd member, killed on drop.
pub(crate) struct Etcd {
    name: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    cluster: String,
    /// Clients over TLS with certificates: (CA, server cert, server key).
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    child: Option<Child>,
}

impl Etcd {
    /// A one-member cluster.
    pub(crate) fn single(scratch: &Path) -> Etcd {
        let mut members = Etcd::cluster(scratch, 1);
        members.remove(0)
    }

    /// `n` members forming one cluster; returns once it has a leader.
    pub(crate) fn cluster(scratch: &Path, n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| Etcd {
                name: format!("e{i}"),
                dir: scratch.join(format!("etcd-e{i}")),
                client_port: *client,
                peer_port: *peer,
                cluster: cluster.clone(),
                tls: None,
                child: None,
            })
            .collect();
        for member in &mut members {
            member.spawn();
        }
        for member in &members {
            member.wait_healthy();
        }
        members
    }

    /// One member whose clients must speak TLS and present a certificate
    /// signed by `ca` (etcd's `--client-cert-auth`).
    pub(crate) fn single_tls(scratch: &Path, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Etcd {
        let peer = free_port();
        let mut member = Etcd {
            name: "e0".to_string(),
            dir: scratch.join("etcd-tls"),
            client_port: free_port(),
            peer_port: peer,
            cluster: format!("e0=http://127.0.0.1:{peer}"),
            tls: Some((ca, cert, key)),
            child: None,
        };
        member.spawn();
        member.wait_healthy();
        member
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.with_extension("log")).expect("etcd log");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut tls_args = Vec::new();
        if let Some((ca, cert, key)) = &self.tls {
            tls_args.push("--client-cert-auth".into());
            for (flag, path) in [
                ("--trusted-ca-file", ca),
                ("--cert-file", cert),
                ("--key-file", key),
            ] {
                tls_args.push(std::ffi::OsString::from(flag));
                tls_args.push(path.clone().into_os_string());
            }
        }
        let child = Command::new(etcd_bin())
            .args(&tls_args)
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "switchyard-test",
                "--max-txn-ops",
                "100000",
                "--max-request-bytes",
                "33554432",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Polls etcd's `/health` until it reports a leader (over TLS, where the
    /// test has no client of its own, its log saying it serves clients).
    fn wait_healthy(&self) {
        if self.tls.is_some() {
            let log = self.dir.with_extension("log");
            eventually(
                &format!("etcd {} serving TLS clients", self.name),
                Duration::from_secs(30),
                || {
                    let text = std::fs::read_to_string(&log).ok()?;
                    text.contains("ready to serve client requests")
                        .then_some(())
                },
            );
            return;
        }
        let url = format!("{}/health", self.url());
        eventually(
            &format!("etcd {} healthy", self.name),
            Duration::from_secs(30),
            || {
                let body = ureq::get(&url)
                    .call()
                    .ok()?
                    .body_mut()
                    .read_to_string()
                    .ok()?;
                body.contains("\"health\":\"true\"").then_some(())
            },
        );
    }

    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on its data directory and ports.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent on the etcd store at `urls`, named `name`, with etcd's
/// shortest agent lease (2 s) so that a dead agent's checks move quickly.
pub(crate) fn agent_on(scratch: &Path, name: &str, urls: &[String], prefix: &str) -> Agent {
    agent_on_with(scratch, name, urls, prefix, "")
}

/// `agent_on` with extra config text after the `[store]` table's keys
/// (more store keys: TLS, credentials; or other tables).
pub(crate) fn agent_on_with(
    scratch: &Path,
    name: &str,
    urls: &[String],
    prefix: &str,
    store_keys: &str,
) -> Agent {
    let endpoints: Vec<Value> = urls.iter().map(|u| json!(u)).collect();
    let config = format!(
        "[store]\nkind = \"etcd\"\nendpoints = {}\nprefix = \"{prefix}\"\nlease_ttl = \"2s\"\n{store_keys}",
        Value::Array(endpoints)
    );
    let path = scratch.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("write config");
    Agent::start_in(
        &scratch.join(format!("data-{name}")),
        &[
            "--config",
            path.to_str().expect("utf8"),
            "--node-name",
            name,
            "--proxy-threads",
            "1",
        ],
    )
}

fn register(c: &Client, id: &str, upstream: &Upstream) {
    let body = json!({
        "nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "web", "id": id, "address": "127.0.0.1",
                       "port": upstream.addr.port(), "tags": ["switchyard.http.host=web.test"]}],
    });
    c.put_ok("/v1/switchyard/batch", &body.to_string());
}

fn ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["Service"]["ID"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// B's DNS answers web with 127.0.0.1 and its proxy reaches the upstream.
fn served_by(agent: &Agent, upstream: &Upstream) -> bool {
    let dns_ok = ips(&udp(agent.dns, "web.service.consul", RecordType::A).answers)
        .contains(&"127.0.0.1".parse().expect("ip"));
    dns_ok && get(agent.http, "web.test", "/").body == upstream.name
}

/// With etcd down (`a` holding only `w1` of service web): a write through
/// `a` is refused with a store error and changes nothing; after `etcd`
/// restarts, the same write goes through and `b` sees it.
fn refused_until_etcd_returns(a: &Client, b: &Client, etcd: &mut Etcd) {
    let up2 = Upstream::start("u2");
    let body = json!({
        "nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "web", "id": "w2", "address": "127.0.0.1",
                       "port": up2.addr.port()}],
    });
    let refused = a.put("/v1/switchyard/batch", &body.to_string());
    assert_eq!(refused.status, 500, "{}", refused.body);
    assert!(refused.body.contains("store"), "{}", refused.body);
    assert_eq!(ids(&a.get_ok("/v1/health/service/web").json()), ["w1"]);
    etcd.restart();
    eventually("A writes again", Duration::from_secs(30), || {
        (a.put("/v1/switchyard/batch", &body.to_string()).status == 200).then_some(())
    });
    eventually("B sees the write", Duration::from_secs(20), || {
        (ids(&b.get_ok("/v1/health/service/web").json()) == ["w1", "w2"]).then_some(())
    });
}

fn index(c: &Client, path: &str) -> u64 {
    c.get_ok(path)
        .header("X-Consul-Index")
        .and_then(|v| v.parse().ok())
        .expect("X-Consul-Index")
}

#[test]
fn agents_on_one_etcd_share_the_catalog_and_its_indexes() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/sy");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/sy");
    let (ca, cb) = (a.client(), b.client());
    let up1 = Upstream::start("u1");

    register(&ca, "w1", &up1);
    eventually(
        "B serves what A registered",
        Duration::from_secs(10),
        || served_by(&b, &up1).then_some(()),
    );
    // The same state has the same index on every agent, table queries included.
    for path in [
        "/v1/catalog/service/web",
        "/v1/health/service/web",
        "/v1/catalog/services",
        "/v1/catalog/nodes",
        "/v1/catalog/node/n1",
    ] {
        eventually(
            &format!("{path} index agrees"),
            Duration::from_secs(10),
            || (index(&ca, path) == index(&cb, path)).then_some(()),
        );
    }
    // Both agents registered their own node in the one catalog.
    let nodes = cb.get_ok("/v1/catalog/nodes").json();
    let names: Vec<&str> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["Node"].as_str())
        .collect();
    assert!(
        names.contains(&"agent-a") && names.contains(&"agent-b"),
        "{names:?}"
    );

    // A blocking query on B wakes on a write through A.
    let before = index(&cb, "/v1/health/service/web");
    let base = cb.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = base.get(&format!("/v1/health/service/web?index={before}&wait=40s"));
        (answer, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let propagated_before = cb
        .metric("switchyard_registry_propagation_seconds_count")
        .unwrap_or(0.0);
    let up2 = Upstream::start("u2");
    register(&ca, "w2", &up2);
    let (answer, waited) = waiter.join().expect("waiter");
    assert_eq!(
        ids(&answer.json()),
        ["w1", "w2"],
        "woken with the new state"
    );
    assert!(
        waited < Duration::from_secs(35),
        "woken by the write, not the timeout"
    );
    let after: u64 = answer
        .header("X-Consul-Index")
        .and_then(|v| v.parse().ok())
        .expect("index");
    assert!(after > before);
    assert_eq!(after, index(&ca, "/v1/health/service/web"));
    // B measured how long A's write took to reach its readers.
    let propagated = cb
        .metric("switchyard_registry_propagation_seconds_count")
        .unwrap_or(0.0);
    assert!(
        propagated > propagated_before,
        "B observed A's write: {propagated_before} -> {propagated}"
    );

    // Deregistering through B removes it everywhere, and the index still agrees.
    cb.put_ok(
        "/v1/catalog/deregister",
        r#"{"Node":"n1","ServiceID":"w1"}"#,
    );
    eventually("A sees the deregistration", Duration::from_secs(10), || {
        (ids(&ca.get_ok("/v1/health/service/web").json()) == ["w2"]).then_some(())
    });
    assert_eq!(
        index(&ca, "/v1/health/service/web"),
        index(&cb, "/v1/health/service/web")
    );

    // A third agent started now reads the same indexes from etcd.
    let c = agent_on(scratch.path(), "agent-c", &[etcd.url()], "/sy");
    let cc = c.client();
    for path in [
        "/v1/health/service/web",
        "/v1/catalog/services",
        "/v1/catalog/node/n1",
    ] {
        eventually(
            &format!("{path} index on a new agent"),
            Duration::from_secs(10),
            || (index(&cc, path) == index(&ca, path)).then_some(()),
        );
    }
}

#[test]
fn agents_answer_from_their_last_state_while_etcd_is_down() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/sy");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/sy");
    let (ca, cb) = (a.client(), b.client());
    let up1 = Upstream::start("u1");
    register(&ca, "w1", &up1);
    eventually("B serves w1", Duration::from_secs(10), || {
        served_by(&b, &up1).then_some(())
    });

    etcd.kill();
    eventually(
        "B reports etcd unreachable",
        Duration::from_secs(20),
        || {
            let status = cb.get_ok("/v1/switchyard/status").json();
            (status["store_state"]["connected"] == false).then_some(())
        },
    );
    // Reads keep working from the last snapshot: DNS, proxy, API.
    assert!(served_by(&b, &up1));
    assert_eq!(ids(&cb.get_ok("/v1/health/service/web").json()), ["w1"]);
    let staleness = eventually("staleness grows", Duration::from_secs(20), || {
        let status = cb.get_ok("/v1/switchyard/status").json();
        let ms = status["store_state"]["staleness_ms"].as_u64()?;
        (ms >= 1000).then_some(ms)
    });
    assert!(staleness >= 1000);
    assert_eq!(cb.metric("switchyard_registry_store_connected"), Some(0.0));
    // A write cannot be made durable: refused with a clear error, nothing
    // applied; once etcd returns, both agents reconnect and catch up.
    refused_until_etcd_returns(&ca, &cb, &mut etcd);
    let status = cb.get_ok("/v1/switchyard/status").json();
    assert_eq!(status["store_state"]["connected"], true, "{status}");
}

/// An agent started while etcd is down serves its local copy of the
/// catalog at once (DNS, proxy, reads), stale with its age; writes are
/// refused with a store error; once etcd answers the agent takes etcd's
/// catalog (with its indexes), registers its own node and writes again.
#[test]
fn an_agent_started_while_etcd_is_down_serves_its_copy_and_converges() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/sy");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/sy");
    let (ca, cb) = (a.client(), b.client());
    let up1 = Upstream::start("u1");
    register(&ca, "w1", &up1);
    let written = index(&ca, "/v1/health/service/web");
    // The copy is kept by a task of its own: it reaches the write's index.
    eventually("A's local copy holds w1", Duration::from_secs(10), || {
        let status = ca.get_ok("/v1/switchyard/status").json();
        (status["store_state"]["local_copy"]["index"].as_u64()? >= written).then_some(())
    });
    drop(a);
    etcd.kill();

    // Started with etcd down: it serves the copy at once.
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/sy");
    let ca = a.client();
    assert!(
        served_by(&a, &up1),
        "DNS and the proxy answer from the copy"
    );
    assert_eq!(ids(&ca.get_ok("/v1/health/service/web").json()), ["w1"]);
    let status = ca.get_ok("/v1/switchyard/status").json();
    assert_eq!(status["store_state"]["connected"], false, "{status}");
    assert!(
        status["store_state"]["staleness_ms"].as_u64() > Some(0),
        "stale, with the copy's age: {status}"
    );
    // Writes are refused; once etcd returns, A takes etcd's catalog, writes
    // again, and B sees it.
    refused_until_etcd_returns(&ca, &cb, &mut etcd);
    eventually("A's node is registered", Duration::from_secs(20), || {
        let node = ca.get("/v1/catalog/node/agent-a");
        (node.status == 200 && node.json()["Node"]["Node"] == "agent-a").then_some(())
    });
    let status = ca.get_ok("/v1/switchyard/status").json();
    assert_eq!(status["store_state"]["connected"], true, "{status}");
    // The same indexes as an agent that never left.
    eventually(
        "A and B agree on the index",
        Duration::from_secs(20),
        || {
            let (ia, ib) = (
                index(&ca, "/v1/health/service/web"),
                index(&cb, "/v1/health/service/web"),
            );
            (ia == ib).then_some(())
        },
    );
}

#[test]
fn losing_one_of_three_etcd_members_loses_nothing() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut members = Etcd::cluster(scratch.path(), 3);
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let a = agent_on(scratch.path(), "agent-a", &urls, "/sy3");
    let b = agent_on(scratch.path(), "agent-b", &urls, "/sy3");
    let (ca, cb) = (a.client(), b.client());
    let up1 = Upstream::start("u1");
    register(&ca, "w1", &up1);
    eventually("B serves w1", Duration::from_secs(10), || {
        served_by(&b, &up1).then_some(())
    });

    members[0].kill();
    let up2 = Upstream::start("u2");
    eventually(
        "a write through A after a member died",
        Duration::from_secs(30),
        || {
            let body = json!({
                "nodes": [{"name": "n1", "address": "127.0.0.1"}],
                "endpoints": [{"node": "n1", "service": "web", "id": "w2", "address": "127.0.0.1",
                               "port": up2.addr.port(), "tags": ["switchyard.http.host=web.test"]}],
            });
            (ca.put("/v1/switchyard/batch", &body.to_string()).status == 200).then_some(())
        },
    );
    eventually("B sees it", Duration::from_secs(20), || {
        (ids(&cb.get_ok("/v1/health/service/web").json()) == ["w1", "w2"]).then_some(())
    });
    cb.put_ok(
        "/v1/catalog/deregister",
        r#"{"Node":"n1","ServiceID":"w1"}"#,
    );
    eventually("A sees B's write", Duration::from_secs(20), || {
        (ids(&ca.get_ok("/v1/health/service/web").json()) == ["w2"]).then_some(())
    });
    assert!(TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], members[1].client_port))).is_ok());
}

/// The index of the member that leads `members` (etcd's JSON gateway).
fn leader_of(members: &[Etcd]) -> usize {
    let status = |etcd: &Etcd| -> Value {
        ureq::post(&format!("{}/v3/maintenance/status", etcd.url()))
            .send("{}")
            .expect("etcd status")
            .body_mut()
            .read_json()
            .expect("status JSON")
    };
    let leader = status(&members[0])["leader"].clone();
    members
        .iter()
        .position(|m| status(m)["header"]["member_id"] == leader)
        .expect("a member is the leader")
}

/// Writes through the death of etcd's leader all succeed: the election that
/// follows is ridden out (tried again until `store.request_timeout`), never
/// answered with an error, and every write is there afterwards.
#[test]
fn writes_through_the_etcd_leaders_death_all_succeed() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut members = Etcd::cluster(scratch.path(), 3);
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let a = agent_on(scratch.path(), "agent-a", &urls, "/sy-election");
    let ca = a.client();
    let write = |i: u16| {
        let body = json!({
            "nodes": [{"name": "n1", "address": "127.0.0.1"}],
            "endpoints": [{"node": "n1", "service": "web", "id": format!("w{i}"),
                           "address": "127.0.0.1", "port": 10_000 + i}],
        });
        let answer = ca.put("/v1/switchyard/batch", &body.to_string());
        assert_eq!(answer.status, 200, "write {i}: {}", answer.body);
    };
    for i in 0..10 {
        write(i);
    }
    let leader = leader_of(&members);
    members[leader].kill();
    for i in 10..60 {
        write(i);
    }
    let listed = ca.get_ok("/v1/catalog/service/web").json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(60),
        "every acknowledged write is there"
    );
}

/// `serfHealth` of `node` as `c` sees it: its status and output.
/// A write made while etcd has lost its quorum is either acknowledged and
/// then present on every agent, or refused and then absent from every
/// agent: its outcome is found out once a quorum answers again, before the
/// write is answered (never a refusal that later appears: a ghost).
#[test]
fn a_write_during_a_quorum_loss_is_acknowledged_everywhere_or_refused_everywhere() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut members = Etcd::cluster(scratch.path(), 3);
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let keys = "request_timeout = \"2s\"\n";
    let a = agent_on_with(scratch.path(), "agent-a", &urls, "/sy-quorum", keys);
    let b = agent_on_with(scratch.path(), "agent-b", &urls, "/sy-quorum", keys);
    let (ca, cb) = (a.client(), b.client());
    let batch = |id: &str, port: u16| {
        json!({
            "nodes": [{"name": "n1", "address": "127.0.0.1"}],
            "endpoints": [{"node": "n1", "service": "web", "id": id,
                           "address": "127.0.0.1", "port": port}],
        })
        .to_string()
    };
    ca.put_ok("/v1/switchyard/batch", &batch("w0", 10_000));
    eventually("B sees w0", Duration::from_secs(10), || {
        (ids(&cb.get_ok("/v1/health/service/web").json()) == ["w0"]).then_some(())
    });

    // Two of three members die: no quorum.
    members[1].kill();
    members[2].kill();
    let writer = {
        let ca = a.client();
        let body = batch("w1", 10_001);
        std::thread::spawn(move || ca.put("/v1/switchyard/batch", &body))
    };
    // Past store.request_timeout the write waits to learn its outcome...
    eventually("A waits for the outcome", Duration::from_secs(20), || {
        a.stderr()
            .contains("waiting for etcd to tell whether it was applied")
            .then_some(())
    });
    // ...which a quorum, back, tells.
    members[1].restart();
    let answer = writer.join().expect("writer thread");
    assert!(
        answer.status == 200 || (answer.status == 500 && answer.body.contains("not applied")),
        "acknowledged, or refused as not applied: {} {}",
        answer.status,
        answer.body
    );
    eventually("A and B agree", Duration::from_secs(30), || {
        let (ia, ib) = (
            index(&ca, "/v1/health/service/web"),
            index(&cb, "/v1/health/service/web"),
        );
        (ia == ib).then_some(())
    });
    let expected: Vec<&str> = if answer.status == 200 {
        vec!["w0", "w1"]
    } else {
        vec!["w0"]
    };
    for c in [&ca, &cb] {
        assert_eq!(ids(&c.get_ok("/v1/health/service/web").json()), expected);
    }
}

fn serf_health(c: &Client, node: &str) -> (String, String) {
    let checks = c.get_ok(&format!("/v1/health/node/{node}")).json();
    checks
        .as_array()
        .and_then(|all| all.iter().find(|chk| chk["CheckID"] == "serfHealth"))
        .map(|chk| {
            (
                chk["Status"].as_str().unwrap_or("").to_string(),
                chk["Output"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

/// A killed agent is seen dead: once its etcd lease lapses its node's
/// `serfHealth` turns critical on the other agents and its endpoints leave
/// their answers; started again, its node passes and they are back.
#[test]
fn a_killed_agents_node_turns_critical_and_comes_back_with_it() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::single(scratch.path());
    let urls = [etcd.url()];
    let a = agent_on(scratch.path(), "agent-a", &urls, "/sy-dead");
    let b = agent_on(scratch.path(), "agent-b", &urls, "/sy-dead");
    let (ca, cb) = (a.client(), b.client());
    see_each_other(&[&ca, &cb]);
    // An endpoint on B's own node, registered through B.
    cb.put_ok(
        "/v1/agent/service/register",
        r#"{"Name":"web","ID":"web-b","Port":8080}"#,
    );
    let passing = |c: &Client| {
        c.get_ok("/v1/health/service/web?passing")
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    eventually("A sees web-b passing", Duration::from_secs(10), || {
        (passing(&ca) == 1).then_some(())
    });
    assert_eq!(serf_health(&ca, "agent-b").0, "passing");

    b.kill9();
    eventually("B's node critical on A", Duration::from_secs(15), || {
        let (status, output) = serf_health(&ca, "agent-b");
        (status == "critical" && output.contains("lease")).then_some(())
    });
    assert_eq!(passing(&ca), 0, "B's endpoint left the passing answers");
    assert_eq!(serf_health(&ca, "agent-a").0, "passing", "A is alive");

    let b = agent_on(scratch.path(), "agent-b", &urls, "/sy-dead");
    eventually("B's node passes again", Duration::from_secs(15), || {
        (serf_health(&ca, "agent-b").0 == "passing" && passing(&ca) == 1).then_some(())
    });
    drop(b);
}

/// Waits until every agent lists all of them as live members.
fn see_each_other(agents: &[&Client]) {
    for c in agents {
        eventually("the agents see each other", Duration::from_secs(15), || {
            let status = c.get_ok("/v1/switchyard/status").json();
            (status["store_state"]["agents"].as_array()?.len() == agents.len()).then_some(())
        });
    }
}

fn probes(c: &Client) -> f64 {
    c.metric("switchyard_health_probes_total").unwrap_or(0.0)
}

fn check_status(c: &Client, id: &str) -> Option<String> {
    let checks = c.get_ok("/v1/health/service/api").json();
    checks.as_array()?.iter().find_map(|e| {
        e["Checks"].as_array()?.iter().find_map(|chk| {
            (chk["CheckID"] == id).then(|| chk["Status"].as_str().unwrap_or("").to_string())
        })
    })
}

#[test]
fn each_check_runs_on_one_agent_and_moves_when_it_dies() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/own");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/own");
    let (ca, cb) = (a.client(), b.client());
    see_each_other(&[&ca, &cb]);
    let backend = crate::support::Backend::start();
    ca.put_ok(
        "/v1/agent/service/register",
        &format!(
            r#"{{"Name":"api","Address":"127.0.0.1","Port":{},"Check":{{"CheckID":"api-http","HTTP":"http://{}/health","Interval":"100ms","Timeout":"1s"}}}}"#,
            backend.addr.port(),
            backend.addr
        ),
    );
    eventually("the check passes", Duration::from_secs(15), || {
        (check_status(&cb, "api-http").as_deref() == Some("passing")).then_some(())
    });

    // Exactly one agent probes it.
    let (a0, b0) = (probes(&ca), probes(&cb));
    eventually("probes go on", Duration::from_secs(10), || {
        (probes(&ca) + probes(&cb) >= a0 + b0 + 10.0).then_some(())
    });
    let (a1, b1) = (probes(&ca), probes(&cb));
    assert!(
        (a1 > a0) != (b1 > b0),
        "one owner: agent-a {a0}->{a1}, agent-b {b0}->{b1}"
    );
    let (owner, survivor) = if a1 > a0 { (a, b) } else { (b, a) };
    let cs = survivor.client();

    // The owner dies; within its lease TTL the survivor takes the check:
    // the backend failing now turns the check critical.
    owner.kill9();
    backend
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let before = probes(&cs);
    eventually(
        "the survivor runs the check",
        Duration::from_secs(20),
        || (check_status(&cs, "api-http").as_deref() == Some("critical")).then_some(()),
    );
    assert!(probes(&cs) > before);
}

/// TTL checks renewed through one agent stay alive on every agent, whichever
/// agent owns their clocks; when the renewals stop, they expire everywhere.
#[test]
fn ttl_renewals_through_any_agent_reach_the_checks_owner() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/ttl");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/ttl");
    let (ca, cb) = (a.client(), b.client());
    see_each_other(&[&ca, &cb]);
    let endpoints: Vec<Value> = (0..20)
        .map(|i| {
            json!({"node": "hb", "service": "task", "id": format!("t{i}"), "port": 9000,
                   "checks": [{"ttl": "5s", "status": "passing"}]})
        })
        .collect();
    let body = json!({"nodes": [{"name": "hb", "address": "10.4.0.1"}], "endpoints": endpoints});
    ca.put_ok("/v1/switchyard/batch", &body.to_string());
    let beats: Vec<Value> = (0..20)
        .map(|i| json!({"node": "hb", "id": format!("service:t{i}")}))
        .collect();
    let heartbeat = json!({ "checks": beats }).to_string();
    // (0 too while an agent does not know the service yet: its feed may lag.)
    let passing = |c: &Client| {
        let answer = c.get("/v1/switchyard/services/task");
        match answer.status {
            200 => answer.json()["by_state"]["passing"].as_u64().unwrap_or(0),
            _ => 0,
        }
    };
    // B has the batch A took before it is renewed through B (its feed may
    // lag on a loaded machine).
    eventually("B sees the checks", Duration::from_secs(10), || {
        (passing(&cb) == 20).then_some(())
    });
    // Renew through B only, for longer than the TTL: A's clocks expire the
    // checks A owns unless B's renewals reach them. (The TTL is long enough
    // that a stall of a loaded CI machine cannot outlast it.)
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let answer = cb.put_ok("/v1/switchyard/heartbeat", &heartbeat).json();
        assert_eq!(answer["renewed"], 20);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(passing(&ca), 20, "renewals through B reached A's clocks");
    assert_eq!(passing(&cb), 20);
    eventually(
        "every check expires once renewals stop",
        Duration::from_secs(25),
        || (passing(&ca) == 0 && passing(&cb) == 0).then_some(()),
    );
}

#[test]
fn a_drain_counts_requests_in_flight_through_every_agent() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::single(scratch.path());
    let a = agent_on(scratch.path(), "agent-a", &[etcd.url()], "/sy");
    let b = agent_on(scratch.path(), "agent-b", &[etcd.url()], "/sy");
    let (ca, cb) = (a.client(), b.client());
    see_each_other(&[&ca, &cb]);
    let slow = Upstream::start("slow");
    register(&ca, "w1", &slow);
    eventually("B routes to w1", Duration::from_secs(10), || {
        served_by(&b, &slow).then_some(())
    });

    // A slow request through each agent's proxy (long enough for a few
    // report rounds even on a loaded machine); the drain is started on A.
    slow.delay_ms
        .store(6000, std::sync::atomic::Ordering::SeqCst);
    let served = slow.served();
    let requests: Vec<_> = [a.http, b.http]
        .into_iter()
        .map(|http| std::thread::spawn(move || get(http, "web.test", "/")))
        .collect();
    eventually(
        "both slow requests reach w1",
        Duration::from_secs(10),
        || (slow.served() >= served + 2).then_some(()),
    );
    let path = "/v1/switchyard/nodes/n1/drain";
    let started = ca.put_ok(path, r#"{"deadline":"60s"}"#).json();
    assert_eq!(started["state"], "draining", "{started}");

    // Each agent counts its own request and the other's (from its report),
    // and neither calls the node drained while they run.
    for (who, c) in [("A", &ca), ("B", &cb)] {
        let seen = eventually(
            &format!("{who} counts both requests"),
            Duration::from_secs(10),
            || {
                let s = c.get_ok(path).json();
                (s["in_flight"] == 2).then_some(s)
            },
        );
        assert_eq!(seen["state"], "draining", "{who}: {seen}");
        assert_eq!(seen["endpoints"][0]["in_flight"], 2, "{who}: {seen}");
    }
    assert!(
        requests.iter().all(|r| !r.is_finished()),
        "the requests were still running"
    );
    for request in requests {
        assert_eq!(request.join().expect("request thread").body, "slow");
    }
    let done = eventually("A reports n1 drained", Duration::from_secs(10), || {
        let s = ca.get_ok(path).json();
        (s["drained"] == true).then_some(s)
    });
    assert_eq!(done["in_flight"], 0, "{done}");
    // B says the same.
    let on_b = eventually("B reports n1 drained", Duration::from_secs(10), || {
        let s = cb.get_ok(path).json();
        (s["drained"] == true).then_some(s)
    });
    assert_eq!(on_b["state"], "drained");
}

/// Enables etcd's authentication with user `root` (through its JSON gateway).
fn enable_etcd_auth(etcd: &Etcd, password: &str) {
    let call = |path: &str, body: Value| {
        ureq::post(&format!("{}/v3/auth/{path}", etcd.url()))
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("etcd auth/{path}: {e}"));
    };
    call("user/add", json!({"name": "root", "password": password}));
    call("role/add", json!({"name": "root"}));
    call("user/grant", json!({"user": "root", "role": "root"}));
    call("enable", json!({}));
}

/// Registers through one agent and reads it back through the other.
fn shared_between(a: &Agent, b: &Agent) {
    let up = Upstream::start("sec");
    register(&a.client(), "s1", &up);
    eventually("B sees what A wrote", Duration::from_secs(10), || {
        (ids(&b.client().get_ok("/v1/health/service/web").json()) == ["s1"]).then_some(())
    });
}

#[test]
fn agents_reach_etcd_over_tls_with_client_certificates_and_with_a_password() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path();
    let pki = crate::proxy::TestPki::new();
    let ca = pki.write_ca(dir);
    pki.leaf(dir, "127.0.0.1");
    pki.leaf(dir, "agent");
    let etcd = Etcd::single_tls(
        dir,
        ca.clone(),
        dir.join("127.0.0.1.pem"),
        dir.join("127.0.0.1.key"),
    );
    let tls = format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        ca,
        dir.join("agent.pem"),
        dir.join("agent.key")
    );
    let a = agent_on_with(dir, "tls-a", &[etcd.url()], "/sec", &tls);
    let b = agent_on_with(dir, "tls-b", &[etcd.url()], "/sec", &tls);
    shared_between(&a, &b);
    assert_eq!(
        a.client().get_ok("/v1/switchyard/status").json()["store_state"]["connected"],
        true
    );

    // Without a client certificate etcd refuses the agent, and it says why.
    let no_cert = format!("ca_file = {ca:?}\ndial_timeout = \"1s\"\nrequest_timeout = \"1s\"\n");
    let config = dir.join("no-cert.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/sec\"\n{no_cert}",
            etcd.url()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(crate::support::bin())
        .args([
            "agent",
            "--api-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
        ])
        .args(["--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data-no-cert"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run agent");
    assert!(
        !out.status.success(),
        "an agent without a certificate started"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the etcd store"), "{stderr}");

    // Password authentication on a plain etcd.
    std::fs::create_dir_all(dir.join("plain")).expect("mkdir");
    let plain = Etcd::single(&dir.join("plain"));
    enable_etcd_auth(&plain, "root-password-123");
    std::fs::write(dir.join("password"), "root-password-123\n").expect("write password");
    let auth = format!(
        "username = \"root\"\npassword_file = {:?}\n",
        dir.join("password")
    );
    let c = agent_on_with(dir, "auth-c", &[plain.url()], "/sec", &auth);
    let d = agent_on_with(dir, "auth-d", &[plain.url()], "/sec", &auth);
    shared_between(&c, &d);
}

/// The fault harness (`bench/faults.py`) in its short form: a 3-member etcd
/// and 3 agents, writers through every agent while etcd members, an agent
/// and a partition (after a delay and a pause) fail in turn, 2 s apart. It exits non-zero on a lost
/// acknowledged write, a refused write that appears, or agents that do not
/// agree; its table is printed. Its full form is a benchmark (RESULTS.md).
#[test]
fn the_fault_harness_loses_no_acknowledged_write() {
    let _ = etcd_bin();
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| {
            panic!("python3 not found: the fault harness needs it (apt-get install -y python3)")
        });
    let root = env!("CARGO_MANIFEST_DIR");
    let run = Command::new(python)
        .arg(format!("{root}/bench/faults.py"))
        .args(["--seconds", "22", "--binary", crate::support::bin()])
        .current_dir(format!("{root}/bench"))
        .output()
        .expect("run bench/faults.py");
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    println!("{out}");
    assert!(run.status.success(), "{:?}\n{out}\n{err}", run.status);
    assert!(out.contains("| lost | ghosts |"), "{out}");
}
