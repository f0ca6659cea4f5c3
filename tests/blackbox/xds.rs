//! xDS (issue 31) with a real proxyless gRPC client nobody here wrote:
//! grpcio's xDS resolver and balancers (`tests/blackbox/xds/client.py`)
//! against the agent's ADS server, calling gRPC backends
//! (`tests/blackbox/xds/backend.py`) that answer with their names.
//! `tools/test` installs grpcio in a virtualenv (`target/py-grpc`);
//! `SWITCHYARD_PY_GRPC` may name another Python that has it. Protocol
//! details real clients cannot be made to show on demand (tokens, limits,
//! Delta) are driven with envoy-types' ADS client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{eventually, Agent, Client};

/// A Python with grpcio, or a loud failure saying how to get one.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_PY_GRPC") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py-grpc/bin/python");
    assert!(
        venv.exists(),
        "grpcio is not installed: run tools/test (it makes target/py-grpc), \
         or set SWITCHYARD_PY_GRPC to a python that can `import grpc`"
    );
    venv
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/blackbox/xds/{name}"))
}

/// gRPC backends answering with their names; stopped on drop.
struct Backends {
    child: Child,
    ports: HashMap<String, u16>,
}

impl Backends {
    fn start(names: &[&str]) -> Backends {
        let mut child = Command::new(python())
            .arg(script("backend.py"))
            .args(names)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn backend.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("backend ports");
        let ports: HashMap<String, u16> =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("backend said {line:?}: {e}"));
        Backends { child, ports }
    }

    fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One grpcio channel to `xds:///<target>`, kept open across calls.
struct XdsClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What a batch of calls got: calls per backend, and the errors.
struct Calls {
    counts: HashMap<String, u64>,
    errors: Vec<String>,
}

impl XdsClient {
    fn start(scratch: &Path, xds: SocketAddr, target: &str) -> XdsClient {
        let bootstrap = scratch.join(format!("bootstrap-{}.json", target.replace(':', "_")));
        let config = json!({
            "xds_servers": [{"server_uri": xds.to_string(),
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": format!("test-{target}"), "cluster": "tests",
                     "locality": {"region": "dc1"}},
        });
        std::fs::write(&bootstrap, config.to_string()).expect("bootstrap");
        let mut child = Command::new(python())
            .arg(script("client.py"))
            .arg(format!("xds:///{target}"))
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client.py");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("client ready");
        assert!(line.contains("ready"), "client said {line:?}");
        XdsClient {
            child,
            stdin,
            stdout,
        }
    }

    /// `n` unary calls, each with `deadline`, with `x-key: key` when given.
    fn calls(&mut self, n: usize, deadline: Duration, key: Option<&str>) -> Calls {
        writeln!(
            self.stdin,
            "calls {n} {} {}",
            deadline.as_secs_f64(),
            key.unwrap_or("")
        )
        .expect("to client");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from client");
        let answer: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
        let counts = answer["counts"]
            .as_object()
            .expect("counts")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect();
        let errors = answer["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e.as_str().unwrap_or("").to_string())
            .collect();
        Calls { counts, errors }
    }

    /// Calls until `done` holds for a batch (at most `within`).
    fn until(&mut self, what: &str, within: Duration, done: impl Fn(&Calls) -> bool) -> Calls {
        let deadline = Instant::now() + within;
        loop {
            let calls = self.calls(10, Duration::from_secs(5), None);
            if done(&calls) {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}: last batch {:?}, errors {:?}",
                calls.counts,
                calls.errors
            );
        }
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn xds_addr(agent: &Agent) -> SocketAddr {
    let status = agent.client().get_ok("/v1/switchyard/status").json();
    status["listeners"]["xds"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no xds listener in {status}"))
}

fn register(c: &Client, service: &str, id: &str, port: u16) {
    let body = json!({
        "Node": format!("node-{id}"), "Address": "127.0.0.1",
        "Service": {"ID": id, "Service": service, "Port": port},
    });
    c.put_ok("/v1/catalog/register", &body.to_string());
}

fn deregister(c: &Client, id: &str) {
    let body = json!({"Node": format!("node-{id}"), "ServiceID": id});
    c.put_ok("/v1/catalog/deregister", &body.to_string());
}

fn xds_agent(scratch: &Path, config: &str) -> Agent {
    let path = scratch.join("agent.toml");
    std::fs::write(&path, format!("[xds]\naddr = \"127.0.0.1:0\"\n{config}")).expect("config");
    Agent::start_in(
        &scratch.join("data"),
        &["--config", path.to_str().expect("utf8")],
    )
}

#[test]
fn grpc_clients_balance_over_the_registry_through_xds() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let agent = xds_agent(scratch.path(), "");
    let c = agent.client();
    let backends = Backends::start(&["b1", "b2", "b3"]);
    register(&c, "web", "web-1", backends.port("b1"));
    register(&c, "web", "web-2", backends.port("b2"));
    let mut client = XdsClient::start(scratch.path(), xds_addr(&agent), "web");

    // Calls spread over every endpoint.
    let calls = client.calls(40, Duration::from_secs(10), None);
    assert!(calls.errors.is_empty(), "{:?}", calls.errors);
    assert!(
        calls.counts.get("b1") >= Some(&5) && calls.counts.get("b2") >= Some(&5),
        "both endpoints get calls: {:?}",
        calls.counts
    );

    // A new endpoint gets calls within a second of its registration.
    register(&c, "web", "web-3", backends.port("b3"));
    let registered = Instant::now();
    client.until("calls to the new endpoint", Duration::from_secs(10), |c| {
        c.counts.contains_key("b3")
    });
    let took = registered.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the new endpoint took {took:?}"
    );

    // A critical endpoint gets none.
    let check = json!({
        "Node": "node-web-1", "Address": "127.0.0.1",
        "Check": {"CheckID": "down", "Name": "down", "Status": "critical", "ServiceID": "web-1"},
    });
    c.put_ok("/v1/catalog/register", &check.to_string());
    client.until("web-1 out", Duration::from_secs(5), |c| {
        !c.counts.contains_key("b1")
    });
    let calls = client.calls(30, Duration::from_secs(5), None);
    assert!(calls.errors.is_empty(), "{:?}", calls.errors);
    assert_eq!(calls.counts.get("b1"), None, "critical: {:?}", calls.counts);

    // A drained endpoint gets none.
    c.put_ok(
        "/v1/switchyard/endpoints/web-2/drain",
        r#"{"deadline":"30s"}"#,
    );
    client.until("web-2 out", Duration::from_secs(5), |c| {
        !c.counts.contains_key("b2")
    });
    let calls = client.calls(30, Duration::from_secs(5), None);
    assert!(calls.errors.is_empty(), "{:?}", calls.errors);
    assert_eq!(calls.counts.get("b2"), None, "drained: {:?}", calls.counts);
    assert_eq!(calls.counts.get("b3"), Some(&30), "{:?}", calls.counts);

    // The server saw the client, every push acknowledged, nothing refused.
    let status = c.get_ok("/v1/switchyard/xds").json();
    let clients = status["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 1, "{status}");
    assert_eq!(clients[0]["node"], "test-web", "{status}");
    assert!(
        clients[0]["user_agent"]
            .as_str()
            .is_some_and(|a| a.contains("gRPC")),
        "{status}"
    );
    assert_eq!(clients[0]["nacks"], 0, "{status}");
    assert!(clients[0]["acks"].as_u64() >= Some(4), "{status}");
    assert_eq!(c.metric("switchyard_xds_streams"), Some(1.0));
    let status = crate::cli::run(&["status"], &agent.api);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("xds       1 streams"), "{text}");
    assert!(text.contains("test-web  gRPC C-core"), "{text}");
    let page = c.get_ok("/ui/xds").body;
    assert!(page.contains(r#"<tr data-node="test-web">"#), "{page}");
    assert!(c.metric("switchyard_xds_pushes_total{type=\"eds\"}") >= Some(3.0));
    assert_eq!(
        c.metric("switchyard_xds_nacks_total{type=\"cds\"}"),
        Some(0.0)
    );

    // Removed, the service's calls fail at once; re-added, they succeed on
    // the same channel.
    for id in ["web-1", "web-2", "web-3"] {
        deregister(&c, id);
    }
    let gone = client.until("the service gone", Duration::from_secs(5), |c| {
        c.counts.is_empty()
    });
    assert!(
        gone.errors.iter().all(|e| e.starts_with("UNAVAILABLE")),
        "{:?}",
        gone.errors
    );
    register(&c, "web", "web-4", backends.port("b1"));
    client.until("the service back", Duration::from_secs(5), |c| {
        c.counts.get("b1") == Some(&10)
    });
}

#[test]
fn an_unknown_service_does_not_exist_until_registered() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let agent = xds_agent(scratch.path(), "");
    let c = agent.client();
    let backends = Backends::start(&["b1"]);
    let mut client = XdsClient::start(scratch.path(), xds_addr(&agent), "later:8080");
    // The server answers the subscription without the name (SotW's "does
    // not exist"); grpcio reads that only for a resource it held, so the
    // call fails on the client's own 15 s resource timer.
    let calls = client.calls(1, Duration::from_secs(25), None);
    assert_eq!(calls.errors.len(), 1, "{:?}", calls.counts);
    assert!(
        calls.errors[0].contains("does not exist"),
        "{:?}",
        calls.errors
    );
    register(&c, "later", "later-1", backends.port("b1"));
    client.until("the registered service", Duration::from_secs(10), |c| {
        c.counts.get("b1") == Some(&10)
    });
}

#[test]
fn a_ring_hash_service_keeps_each_key_on_one_endpoint() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let agent = xds_agent(
        scratch.path(),
        "[[http.routes]]\nhost = \"ring.test\"\nservice = \"ring\"\nbalancer = \"consistent_hash\"\nhash_on = \"header:x-key\"\n",
    );
    let c = agent.client();
    let backends = Backends::start(&["b1", "b2", "b3"]);
    for (id, name) in [("ring-1", "b1"), ("ring-2", "b2"), ("ring-3", "b3")] {
        register(&c, "ring", id, backends.port(name));
    }
    let mut client = XdsClient::start(scratch.path(), xds_addr(&agent), "ring");
    client.until("every endpoint ready", Duration::from_secs(10), |c| {
        c.errors.is_empty()
    });
    let mut owners = std::collections::HashSet::new();
    for key in 0..12 {
        let key = format!("user-{key}");
        let calls = client.calls(8, Duration::from_secs(5), Some(&key));
        assert!(calls.errors.is_empty(), "{:?}", calls.errors);
        assert_eq!(
            calls.counts.len(),
            1,
            "key {key} went to {:?}",
            calls.counts
        );
        owners.extend(calls.counts.into_keys());
    }
    assert!(owners.len() >= 2, "12 keys all on {owners:?}");
}

#[test]
fn a_client_reconnects_to_a_restarted_agent_and_converges() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let agent = xds_agent(scratch.path(), "");
    let c = agent.client();
    let xds = xds_addr(&agent);
    let backends = Backends::start(&["b1", "b2"]);
    register(&c, "web", "web-1", backends.port("b1"));
    let mut client = XdsClient::start(scratch.path(), xds, "web");
    client.until("calls to b1", Duration::from_secs(10), |c| {
        c.counts.get("b1") == Some(&10)
    });

    // A stop ends the streams; the client keeps calling from what it has.
    agent.signal("TERM");
    let stopped = agent.wait_exit(Duration::from_secs(10));
    assert!(stopped.success(), "{stopped:?}");
    let calls = client.calls(10, Duration::from_secs(5), None);
    assert_eq!(calls.counts.get("b1"), Some(&10), "{:?}", calls.errors);

    // The same data and xDS address: the client reconnects and follows a
    // change made after the restart.
    let path = scratch.path().join("agent.toml");
    let again = Agent::start_in(
        &scratch.path().join("data"),
        &[
            "--config",
            path.to_str().expect("utf8"),
            "--xds-addr",
            &xds.to_string(),
        ],
    );
    register(&again.client(), "web", "web-2", backends.port("b2"));
    client.until(
        "calls to b2 after the restart",
        Duration::from_secs(30),
        |c| c.counts.contains_key("b2") && c.counts.contains_key("b1"),
    );
}

#[test]
fn a_client_of_one_agent_follows_a_write_through_another() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let urls = [etcd.url()];
    let xds = "[xds]\naddr = \"127.0.0.1:0\"\n";
    let a = crate::cluster::agent_on_with(scratch.path(), "a", &urls, "/xds", xds);
    let b = crate::cluster::agent_on_with(scratch.path(), "b", &urls, "/xds", xds);
    let backends = Backends::start(&["b1", "b2"]);
    register(&a.client(), "web", "web-1", backends.port("b1"));
    let mut client = XdsClient::start(scratch.path(), xds_addr(&b), "web");
    client.until("b1 through agent b", Duration::from_secs(15), |c| {
        c.counts.get("b1") == Some(&10)
    });
    register(&a.client(), "web", "web-2", backends.port("b2"));
    client.until(
        "b2, written through agent a",
        Duration::from_secs(10),
        |c| c.counts.contains_key("b2"),
    );
}

/// Test 18 of shared/XDS.md: a client in dc1 whose dc1 endpoints refuse
/// connections is served by dc2's, the next priority; dc1's again once they
/// answer.
#[test]
fn calls_fail_over_to_the_next_datacenter_as_a_lower_priority() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = |name: &str| {
        let d = scratch.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        d
    };
    let dc2 = xds_agent(&dir("dc2"), "[agent]\ndatacenter = \"dc2\"\n");
    let dc2_api = dc2.api.trim_start_matches("http://").trim_end_matches('/');
    let dc1 = xds_agent(
        &dir("dc1"),
        &format!(
            "[federation]\nfailover = \"nearest\"\nprobe_interval = \"200ms\"\n\
             [[federation.datacenters]]\nname = \"dc2\"\napi = [\"{dc2_api}\"]\n"
        ),
    );
    let backends = Backends::start(&["near", "far"]);
    register(&dc2.client(), "web", "web-far", backends.port("far"));
    let c = dc1.client();
    register(&c, "web", "web-near", backends.port("near"));
    eventually("dc2 reachable", Duration::from_secs(10), || {
        let list = c.get_ok("/v1/switchyard/datacenters").json();
        list.as_array()?
            .iter()
            .any(|d| d["name"] == "dc2" && d["reachable"] == true)
            .then_some(())
    });
    let mut client = XdsClient::start(scratch.path(), xds_addr(&dc1), "web");
    // Priority 0 (ours) takes every call while it answers.
    client.until("calls to dc1's endpoint", Duration::from_secs(10), |c| {
        c.counts.get("near") == Some(&10)
    });
    // Ours now points at a port nobody listens on: calls go to dc2.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a closed port")
        .port();
    register(&c, "web", "web-near", closed);
    client.until("calls failing over to dc2", Duration::from_secs(20), |c| {
        c.counts.get("far") == Some(&10)
    });
    // And back once ours answers again.
    register(&c, "web", "web-near", backends.port("near"));
    client.until("calls back in dc1", Duration::from_secs(20), |c| {
        c.counts.get("near") == Some(&10)
    });
}

mod raw {
    //! The ADS protocol driven by hand: envoy-types' generated client.

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
    };
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Streaming;

    use super::*;

    const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    /// Its worker carries the streams while the test blocks on the API.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A stream's two halves.
    struct Ads {
        send: mpsc::Sender<DiscoveryRequest>,
        answers: Streaming<DiscoveryResponse>,
    }

    async fn open(xds: SocketAddr, token: Option<&str>) -> Result<Ads, tonic::Status> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
            .await
            .expect("connect");
        let (send, requests) = mpsc::channel(8);
        let mut request = tonic::Request::new(ReceiverStream::new(requests));
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("header");
            request.metadata_mut().insert("authorization", value);
        }
        // The first request goes before the call: the server answers the
        // call's headers only when it has the stream.
        send.send(eds(&["svc/web"], "", None)).await.expect("send");
        let answers = client
            .stream_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Ads { send, answers })
    }

    fn eds(names: &[&str], nonce: &str, error: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(Node {
                id: "raw".into(),
                ..Default::default()
            }),
            type_url: CLA.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            error_detail: error.map(|e| RpcStatus {
                code: 3,
                message: e.into(),
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    async fn next(ads: &mut Ads) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), ads.answers.message())
            .await
            .expect("a response within 10 s")
            .expect("no error")
            .expect("not the end")
    }

    #[test]
    fn streams_need_a_read_token_when_tokens_are_configured() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let agent = xds_agent(
            scratch.path(),
            "[[api.tokens]]\nsecret = \"reader-secret-0123456789\"\nrole = \"read\"\n",
        );
        let reader = agent.client_with_token("reader-secret-0123456789");
        let status = reader.get_ok("/v1/switchyard/status").json();
        let xds: SocketAddr = status["listeners"]["xds"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("xds listener");
        runtime().block_on(async {
            let refused = open(xds, None)
                .await
                .err()
                .expect("refused without a token");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
            let refused = open(xds, Some("wrong-secret-0123456789"))
                .await
                .err()
                .expect("refused with a wrong token");
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
            let mut ads = open(xds, Some("reader-secret-0123456789"))
                .await
                .expect("a read token is enough");
            let first = next(&mut ads).await;
            assert_eq!(first.type_url, CLA);
            assert_eq!(first.resources.len(), 1, "an empty assignment for web");
        });
        assert_eq!(
            reader.metric("switchyard_xds_refused_total{reason=\"token\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn nacks_are_counted_delta_is_refused_and_stream_limits_hold() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let agent = xds_agent(scratch.path(), "max_streams = 2\n");
        let c = agent.client();
        let xds = xds_addr(&agent);
        let backends = Backends::start(&["b1"]);
        runtime().block_on(async {
            let mut ads = open(xds, None).await.expect("stream");
            let first = next(&mut ads).await;
            // Refused: counted, logged, not sent again.
            ads.send
                .send(eds(&["svc/web"], &first.nonce, Some("cannot use it")))
                .await
                .expect("send");
            eventually("the NACK counted", Duration::from_secs(5), || {
                (c.metric("switchyard_xds_nacks_total{type=\"eds\"}") == Some(1.0)).then_some(())
            });
            // A change is sent at once.
            register(&c, "web", "web-1", backends.port("b1"));
            let changed = next(&mut ads).await;
            assert_eq!(changed.resources.len(), 1);
            assert_ne!(changed.resources[0].value, first.resources[0].value);
            assert_ne!(changed.nonce, first.nonce);
            let listed = c.get_ok("/v1/switchyard/xds").json();
            assert_eq!(listed["clients"][0]["nacks"], 1, "{listed}");
            assert_eq!(
                listed["clients"][0]["last_nack"], "eds: cannot use it",
                "{listed}"
            );

            // Delta is not served.
            let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
                .await
                .expect("connect");
            let delta = client
                .delta_aggregated_resources(tokio_stream::iter(vec![
                    DeltaDiscoveryRequest::default(),
                ]))
                .await
                .expect_err("delta refused");
            assert_eq!(delta.code(), tonic::Code::Unimplemented, "{delta:?}");

            // max_streams = 2: a second stream is served, a third refused.
            let _second = open(xds, None).await.expect("second stream");
            let third = open(xds, None).await.err().expect("third refused");
            assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third:?}");
            assert!(third.message().contains("max_streams"), "{third:?}");
            // A closed stream frees its place.
            drop(ads);
            eventually("a place freed", Duration::from_secs(5), || {
                (c.metric("switchyard_xds_streams") == Some(1.0)).then_some(())
            });
            let _again = open(xds, None).await.expect("a stream again");
        });
    }
}
