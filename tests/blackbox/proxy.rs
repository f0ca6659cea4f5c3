//! The L7 proxy against real hyper backends: routing, balancing, retries,
//! ejection, registry changes, upgrades and malformed input.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Agent, Client};

/// A hyper HTTP/1.1 backend that answers with its name, after an optional
/// delay, with a settable status; echoes forwarding headers back; `/echo`
/// returns the request body; `/ws` upgrades and echoes bytes.
pub(crate) struct Upstream {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) status: Arc<AtomicU16>,
    pub(crate) delay_ms: Arc<AtomicU64>,
    served: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Upstream {
    pub(crate) fn start(name: &str) -> Upstream {
        Upstream::start_on(name, "127.0.0.1:0".parse().expect("addr"))
    }

    pub(crate) fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (n, s, d, c) = (
            name.to_string(),
            status.clone(),
            delay_ms.clone(),
            served.clone(),
        );
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (n, s, d, c) = (n.clone(), s.clone(), d.clone(), c.clone());
                tokio::spawn(async move {
                    let handler = hyper::service::service_fn(move |request| {
                        let (n, s, d, c) = (n.clone(), s.clone(), d.clone(), c.clone());
                        async move { serve(request, &n, &s, &d, &c).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), handler)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            status,
            delay_ms,
            served,
            runtime: Some(runtime),
        }
    }

    /// Closes the listener and every connection.
    pub(crate) fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    pub(crate) fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

type Reply = hyper::Response<http_body_util::Full<hyper::body::Bytes>>;

async fn serve(
    request: hyper::Request<hyper::body::Incoming>,
    name: &str,
    status: &AtomicU16,
    delay_ms: &AtomicU64,
    served: &AtomicUsize,
) -> Result<Reply, std::convert::Infallible> {
    use http_body_util::{BodyExt, Full};
    served.fetch_add(1, Ordering::SeqCst);
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut reply = hyper::Response::builder()
        .status(status.load(Ordering::SeqCst))
        .header("x-backend", name);
    for echo in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
        "host",
        "x-switchyard-failover",
        "x-tenant",
    ] {
        if let Some(value) = request.headers().get(echo) {
            reply = reply.header(format!("x-saw-{echo}"), value.clone());
        }
    }
    if let Some(target) = request.uri().path_and_query() {
        reply = reply.header("x-saw-target", target.as_str());
    }
    if request.uri().path() == "/ws" {
        let upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let reply = reply
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::default())
            .expect("reply");
        return Ok(reply);
    }
    let body = if request.uri().path() == "/echo" {
        request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    } else {
        hyper::body::Bytes::from(name.to_string())
    };
    Ok(reply.body(Full::new(body)).expect("reply"))
}

/// A response as seen by a raw HTTP/1.1 client.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: String,
}

/// Sends `request` bytes on a new connection and reads one response to the
/// end of the connection (requests carry `Connection: close`).
pub(crate) fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).expect("connect proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(request).expect("send");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    parse_raw(&bytes)
}

pub(crate) fn parse_raw(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_string(),
    }
}

pub(crate) fn get(addr: SocketAddr, host: &str, path: &str) -> Raw {
    get_with(addr, host, path, "")
}

pub(crate) fn get_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Raw {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    raw(addr, request.as_bytes())
}

/// Registers `upstreams` as endpoints of `service` on node `n1`.
pub(crate) fn register(c: &Client, service: &str, upstreams: &[&Upstream], tags: &[&str]) {
    let endpoints: Vec<_> = upstreams
        .iter()
        .map(|u| {
            json!({"node": "n1", "service": service, "id": u.name, "address": "127.0.0.1",
                   "port": u.addr.port(), "tags": tags})
        })
        .collect();
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}], "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
}

pub(crate) fn agent_with(config: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("write config");
    let data = dir.path().join("data");
    let agent = Agent::start_in(
        &data,
        &[
            "--config",
            path.to_str().expect("utf8 path"),
            "--proxy-threads",
            "2",
        ],
    );
    (agent, dir)
}

fn counts(addr: SocketAddr, host: &str, requests: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..requests {
        let reply = get(addr, host, "/");
        assert_eq!(reply.status, 200, "{reply:?}");
        *seen.entry(reply.body).or_insert(0) += 1;
    }
    seen
}

#[test]
fn routes_by_host_and_path_and_nothing_else_goes_anywhere() {
    let (agent, _dir) = agent_with(
        r#"
[[http.routes]]
host = "a.test"
service = "svc-a"

[[http.routes]]
path_prefix = "/b/"
service = "svc-b"

[[http.routes]]
host = "*.wild.test"
service = "svc-a"
"#,
    );
    let c = agent.client();
    let (a, b, t) = (
        Upstream::start("a1"),
        Upstream::start("b1"),
        Upstream::start("t1"),
    );
    register(&c, "svc-a", &[&a], &[]);
    register(&c, "svc-b", &[&b], &[]);
    register(
        &c,
        "svc-tagged",
        &[&t],
        &["switchyard.http.host=tagged.test", "v1"],
    );

    let reply = get(agent.http, "A.Test:80", "/x");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "a1"),
        "{reply:?}"
    );
    assert_eq!(get(agent.http, "x.wild.test", "/").body, "a1");
    assert_eq!(get(agent.http, "anything.test", "/b/c").body, "b1");
    // A registry tag is a route with no config change.
    assert_eq!(get(agent.http, "tagged.test", "/").body, "t1");

    // Forwarding headers reach the backend.
    let reply = get(agent.http, "a.test", "/");
    assert_eq!(reply.headers["x-saw-x-forwarded-for"], "127.0.0.1");
    assert_eq!(reply.headers["x-saw-x-forwarded-proto"], "http");
    assert_eq!(reply.headers["x-saw-x-forwarded-host"], "a.test");
    assert_eq!(reply.headers["x-saw-x-request-id"].len(), 16);
    assert!(reply.headers["x-saw-forwarded"].contains("for=127.0.0.1"));

    let served: usize = [&a, &b, &t].iter().map(|u| u.served()).sum();
    for (host, path) in [
        ("unknown.test", "/"),
        ("wild.test", "/"),
        ("a.test.evil", "/"),
    ] {
        let reply = get(agent.http, host, path);
        assert_eq!(reply.status, 404, "{host}{path}: {reply:?}");
        assert!(reply.body.contains("no route"), "{reply:?}");
    }
    assert_eq!(
        [&a, &b, &t].iter().map(|u| u.served()).sum::<usize>(),
        served,
        "a request that matched no route reached a backend"
    );
    // A routed service with no endpoint left answers 503.
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"deregister": [{"node": "n1", "id": "b1"}]}).to_string(),
    );
    assert_eq!(get(agent.http, "x", "/b/").status, 503);
}

#[test]
fn registry_changes_reach_the_very_next_request() {
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let (one, two) = (Upstream::start("one"), Upstream::start("two"));
    register(&c, "web", &[&one], &[]);
    assert_eq!(get(agent.http, "h", "/").body, "one");
    // Add `two` and take `one` out in the same write: the first request after
    // the acknowledgment already goes to `two`, and so do all that follow.
    let batch = json!({
        "endpoints": [{"node": "n1", "service": "web", "id": "two", "address": "127.0.0.1",
                       "port": two.addr.port()}],
        "deregister": [{"node": "n1", "id": "one"}],
    });
    for round in 0..20 {
        let served_one = one.served();
        c.put_ok("/v1/switchyard/batch", &batch.to_string());
        assert_eq!(get(agent.http, "h", "/").body, "two", "round {round}");
        assert_eq!(one.served(), served_one);
        register(&c, "web", &[&one], &[]);
        c.put_ok(
            "/v1/switchyard/batch",
            &json!({"deregister": [{"node": "n1", "id": "two"}]}).to_string(),
        );
        assert_eq!(get(agent.http, "h", "/").body, "one", "round {round}");
    }
    // A critical check takes an endpoint out just as fast.
    register(&c, "web", &[&one, &two], &[]);
    c.put_ok(
        "/v1/catalog/register",
        r#"{"Node":"n1","Address":"127.0.0.1","Check":{"CheckID":"one-bad","Name":"bad","Status":"critical","ServiceID":"one"}}"#,
    );
    let seen = counts(agent.http, "h", 30);
    assert_eq!(seen.get("one"), None, "{seen:?}");
}

#[test]
fn weights_peak_ewma_and_consistent_hashing() {
    let (agent, _dir) = agent_with(
        r#"
[[http.routes]]
host = "rr.test"
service = "rr"
balancer = "round_robin"

[[http.routes]]
host = "ewma.test"
service = "ewma"

[[http.routes]]
host = "hash.test"
service = "hash"
balancer = "consistent_hash"
hash_on = "header:X-User"
"#,
    );
    let c = agent.client();
    // Weighted round robin: 3:1.
    let (heavy, light) = (Upstream::start("heavy"), Upstream::start("light"));
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}], "endpoints": [
        {"node": "n1", "service": "rr", "id": "heavy", "port": heavy.addr.port(), "weights": {"passing": 3, "warning": 1}},
        {"node": "n1", "service": "rr", "id": "light", "port": light.addr.port()},
    ]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
    let seen = counts(agent.http, "rr.test", 200);
    assert_eq!((seen["heavy"], seen["light"]), (150, 50), "{seen:?}");

    // Peak EWMA: a backend 50 ms slower than its peers loses its share.
    let ups: Vec<Upstream> = ["e1", "e2", "e3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    ups[0].delay_ms.store(50, Ordering::SeqCst);
    register(&c, "ewma", &ups.iter().collect::<Vec<_>>(), &[]);
    let seen = counts(agent.http, "ewma.test", 300);
    let slow = seen.get("e1").copied().unwrap_or(0);
    assert!(slow < 30, "slow backend got {slow} of 300: {seen:?}");

    // Consistent hashing: a key stays on one backend; when one of four
    // leaves, only its keys move.
    let ups: Vec<Upstream> = ["h1", "h2", "h3", "h4"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "hash", &ups.iter().collect::<Vec<_>>(), &[]);
    let owner = |user: usize| {
        get_with(
            agent.http,
            "hash.test",
            "/",
            &format!("X-User: user-{user}\r\n"),
        )
        .body
    };
    let before: Vec<String> = (0..200).map(owner).collect();
    let again: Vec<String> = (0..200).map(owner).collect();
    assert_eq!(before, again);
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for o in &before {
        *spread.entry(o.as_str()).or_default() += 1;
    }
    assert_eq!(spread.len(), 4, "{spread:?}");
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"deregister": [{"node": "n1", "id": "h4"}]}).to_string(),
    );
    let after: Vec<String> = (0..200).map(owner).collect();
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(b, "h4", "a key not owned by the leaver moved");
        }
    }
}

// A killed backend retried around, ejected and readmitted: transports.rs,
// over HTTP/1.1, h2c and TLS.

#[test]
fn failing_endpoints_are_ejected_and_fail_open_is_reported() {
    let (agent, _dir) = agent_with(
        r#"
[http]
balancer = "round_robin"
[http.outlier]
consecutive_failures = 2
base_ejection = "30s"
max_ejected_percent = 100
[[http.routes]]
service = "web"
"#,
    );
    let c = agent.client();
    let ups: Vec<Upstream> = ["f1", "f2", "f3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    ups[0].status.store(500, Ordering::SeqCst);
    ups[1].status.store(500, Ordering::SeqCst);
    // POST is not retried, so every 500 reaches the client until ejection.
    let post = |n: usize| {
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nConnection: close\r\n\r\n{}",
            n % 10
        );
        raw(agent.http, request.as_bytes()).status
    };
    for n in 0..12 {
        post(n);
    }
    let before = (ups[0].served(), ups[1].served());
    let ok = (0..200).filter(|&n| post(n) == 200).count();
    assert_eq!(
        ok, 200,
        "healthy f3 takes everything while the others are ejected"
    );
    assert_eq!((ups[0].served(), ups[1].served()), before);
    assert_eq!(
        c.metric("switchyard_proxy_fail_open{service=\"web\"}"),
        Some(0.0)
    );
    // The admin API shows the proxy's passive signals beside the registry's view.
    let view = c.get_ok("/v1/switchyard/services/web").json();
    assert_eq!(view["proxy"]["fail_open"], false, "{view}");
    let ejected: Vec<_> = view["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["proxy"]["ejected"] == true)
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ejected, ["f1", "f2"], "{view}");

    // All three fail: fail-open, in the metric and once in the log.
    ups[2].status.store(500, Ordering::SeqCst);
    for n in 0..10 {
        post(n);
    }
    assert_eq!(
        c.metric("switchyard_proxy_fail_open{service=\"web\"}"),
        Some(1.0)
    );
    assert_eq!(
        c.get_ok("/v1/switchyard/services/web").json()["proxy"]["fail_open"],
        true
    );
    let served = ups[0].served() + ups[1].served();
    for n in 0..10 {
        assert_eq!(post(n), 500);
    }
    assert!(
        ups[0].served() + ups[1].served() > served,
        "fail-open sends to ejected endpoints"
    );
    let log = agent.stderr();
    assert_eq!(log.matches("service is failing open").count(), 1, "{log}");
}

/// `[http] io_uring` set to `on`, ahead of the rest of a config.
fn http_via(on: bool, rest: &str) -> String {
    format!("[http]\nio_uring = {on}\nio_uring_connections = 0\n{rest}")
}

/// The agent's HTTP/1.1 sockets all went the way `[http] io_uring` says.
pub(crate) fn assert_http_sockets_via(c: &Client, on: bool) {
    let (used, unused) = if on {
        ("io_uring", "tokio")
    } else {
        ("tokio", "io_uring")
    };
    let count = |via: &str| {
        c.metric(&format!(
            "switchyard_proxy_http_sockets_total{{via=\"{via}\"}}"
        ))
        .unwrap_or(0.0)
    };
    assert!(count(used) > 0.0, "no HTTP/1.1 socket went via {used}");
    assert_eq!(count(unused), 0.0, "HTTP/1.1 sockets went via {unused}");
}

#[test]
fn websocket_upgrades_and_bodies_pass_through_io_uring() {
    websocket_upgrades_and_bodies_pass_through(true);
}

#[test]
fn websocket_upgrades_and_bodies_pass_through_tokio() {
    websocket_upgrades_and_bodies_pass_through(false);
}

fn websocket_upgrades_and_bodies_pass_through(io_uring: bool) {
    let (agent, _dir) = agent_with(&http_via(io_uring, "[[http.routes]]\nservice = \"ws\"\n"));
    let c = agent.client();
    let up = Upstream::start("ws1");
    register(&c, "ws", &[&up], &[]);

    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    let head = parse_raw(&head);
    assert_eq!(head.status, 101, "{head:?}");
    for message in [&b"ping"[..], b"hello over the tunnel"] {
        stream.write_all(message).expect("write");
        let mut echo = vec![0u8; message.len()];
        stream.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, message);
    }

    // Keep-alive with bodies by length and chunked, pipelined on one connection.
    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let big = "z".repeat(100_000);
    let requests = format!(
        "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
         POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
         POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    stream.write_all(requests.as_bytes()).expect("send");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(
        text.matches("HTTP/1.1 200 OK").count(),
        3,
        "{}",
        &text[..text.len().min(600)]
    );
    assert!(text.contains("\r\n\r\nhello"));
    assert!(text.contains("\r\n\r\nabcde"));
    assert!(text.ends_with(&big));
    assert_http_sockets_via(&c, io_uring);
}

#[test]
fn malformed_requests_get_400_or_431_and_never_reach_a_backend_io_uring() {
    malformed_requests_get_400_or_431_and_never_reach_a_backend(true);
}

#[test]
fn malformed_requests_get_400_or_431_and_never_reach_a_backend_tokio() {
    malformed_requests_get_400_or_431_and_never_reach_a_backend(false);
}

fn malformed_requests_get_400_or_431_and_never_reach_a_backend(io_uring: bool) {
    let (agent, _dir) = agent_with(&http_via(io_uring, "[[http.routes]]\nservice = \"web\"\n"));
    let c = agent.client();
    let up = Upstream::start("w1");
    register(&c, "web", &[&up], &[]);
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd".to_vec(), 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n".to_vec(), 400),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n".to_vec(), 400),
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), 400),
        // Dot-segments would slip past a path-prefix route; refused, not rewritten.
        (b"GET /x/../admin HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), 400),
        (b"GET /x/%2e%2E/admin HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), 400),
        // Obsolete line folding hiding a Transfer-Encoding, and a space before the colon.
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\nabcd".to_vec(), 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\nabcd".to_vec(), 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec(), 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), 400),
        (big_header.into_bytes(), 431),
        (many.into_bytes(), 431),
    ];
    for (request, want) in cases {
        let reply = raw(agent.http, &request);
        assert_eq!(
            reply.status,
            want,
            "{:?}: {reply:?}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    let reply = raw(
        agent.http,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        up.served(),
        1,
        "only the one valid request reached the backend"
    );
    let rejected = c
        .metric("switchyard_proxy_rejected_total{reason=\"bad_request\"}")
        .unwrap_or(0.0);
    assert!(rejected >= 8.0, "{rejected}");
    assert_http_sockets_via(&c, io_uring);
}

#[test]
fn http2_with_prior_knowledge_is_routed_balanced_and_streamed() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let (agent, _dir) = agent_with("[http]\nbalancer = \"round_robin\"\n[[http.routes]]\nhost = \"h2.test\"\nservice = \"web\"\n");
    let c = agent.client();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    register(&c, "web", &[&a, &b], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        let send = |method: &str, host: &str, path: &str, body: &'static str| {
            let mut sender = sender.clone();
            let request = hyper::Request::builder()
                .method(method)
                .uri(format!("http://{host}{path}"))
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request");
            async move {
                let response = sender.send_request(request).await.expect("response");
                let status = response.status().as_u16();
                let saw_for = response
                    .headers()
                    .get("x-saw-x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                (status, String::from_utf8_lossy(&body).to_string(), saw_for)
            }
        };
        // Twenty streams at once on one connection, spread over both endpoints.
        let streams: Vec<_> = (0..20)
            .map(|_| tokio::spawn(send("GET", "h2.test", "/", "")))
            .collect();
        let mut replies = Vec::new();
        for stream in streams {
            replies.push(stream.await.expect("stream task"));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (status, body, saw_for) in replies {
            assert_eq!(status, 200);
            assert_eq!(
                saw_for.as_deref(),
                Some("127.0.0.1"),
                "forwarding headers are set"
            );
            *seen.entry(body).or_default() += 1;
        }
        assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
        assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
        let (status, body, _) = send("POST", "h2.test", "/echo", "over h2").await;
        assert_eq!((status, body.as_str()), (200, "over h2"));
        let (status, _, _) = send("GET", "nowhere.test", "/", "").await;
        assert_eq!(status, 404, "unknown hosts go nowhere over h2 too");
        // Dot-segments are refused over h2 as over HTTP/1.1, before any backend.
        let served = a.served() + b.served();
        for path in ["/x/../admin", "/x/%2e%2e/admin", "/./admin"] {
            let (status, _, _) = send("GET", "h2.test", path, "").await;
            assert_eq!(status, 400, "{path}");
        }
        assert_eq!(
            a.served() + b.served(),
            served,
            "a refused path reached a backend"
        );
    });
}

/// A test CA and leaf certificates it signs, written as PEM files.
pub(crate) struct TestPki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    pub(crate) fn new() -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca");
        TestPki { ca, ca_key }
    }

    /// A TLS client that trusts this CA and offers `alpn`.
    pub(crate) fn connector(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("trust the test CA");
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }

    /// Writes the CA certificate as `ca.pem` in `dir`.
    pub(crate) fn write_ca(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("write ca");
        path
    }

    /// The `[http.tls]` table of an HTTPS listener on a free port with one
    /// certificate for `name` (a leaf written into `dir`).
    pub(crate) fn https_listener(&self, dir: &std::path::Path, name: &str) -> String {
        self.leaf(dir, name);
        let file = |ext: &str| {
            dir.join(format!("{name}.{ext}"))
                .to_string_lossy()
                .to_string()
        };
        format!(
            "[http.tls]\naddr = \"127.0.0.1:0\"\n\
             [[http.tls.certificates]]\ncert = {:?}\nkey = {:?}\nnames = [{name:?}]\n",
            file("pem"),
            file("key"),
        )
    }

    /// Writes `NAME.pem` and `NAME.key` for a leaf valid for `name`; returns its DER.
    pub(crate) fn leaf(&self, dir: &std::path::Path, name: &str) -> Vec<u8> {
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign leaf");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
        cert.der().to_vec()
    }
}

#[test]
fn https_picks_the_certificate_by_sni_and_speaks_h2_and_http1_by_alpn() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let a_der = pki.leaf(certs.path(), "a.test");
    let b_der = pki.leaf(certs.path(), "b.test");
    let file = |name: &str| certs.path().join(name).to_string_lossy().to_string();
    let config = format!(
        "[http.tls]\naddr = \"127.0.0.1:0\"\n\
         [[http.tls.certificates]]\ncert = {:?}\nkey = {:?}\nnames = [\"a.test\"]\n\
         [[http.tls.certificates]]\ncert = {:?}\nkey = {:?}\nnames = [\"b.test\"]\n\
         [[http.routes]]\nhost = \"a.test\"\nservice = \"web\"\n\
         [[http.routes]]\nhost = \"b.test\"\nservice = \"web\"\n",
        file("a.test.pem"),
        file("a.test.key"),
        file("b.test.pem"),
        file("b.test.key"),
    );
    let (agent, _dir) = agent_with(&config);
    let https = agent.https.expect("an https address in the ready line");
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // a.test over h2.
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
        let tls = pki.connector(b"h2")
            .connect(name, tcp)
            .await
            .expect("TLS handshake for a.test");
        let (_, session) = tls.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
        let presented = session.peer_certificates().expect("certificates")[0].to_vec();
        assert_eq!(presented, a_der, "a.test gets its own certificate");
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 over TLS");
        tokio::spawn(connection);
        let request = hyper::Request::get("https://a.test/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("x-saw-x-forwarded-proto")
                .and_then(|v| v.to_str().ok()),
            Some("https")
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"web1");

        // b.test over HTTP/1.1.
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("b.test").expect("name");
        let tls = pki.connector(b"http/1.1")
            .connect(name, tcp)
            .await
            .expect("TLS handshake for b.test");
        let (_, session) = tls.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
        let presented = session.peer_certificates().expect("certificates")[0].to_vec();
        assert_eq!(presented, b_der, "b.test gets its own certificate");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("http/1.1 over TLS");
        tokio::spawn(connection);
        let request = hyper::Request::get("/")
            .header("host", "b.test")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"web1");

        // WebSocket over TLS: the upgrade reaches the backend and becomes a tunnel.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(https).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
        let mut tls = pki.connector(b"http/1.1")
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        tls.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("send upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).await.expect("101 head");
            head.push(byte[0]);
        }
        assert_eq!(parse_raw(&head).status, 101, "{}", String::from_utf8_lossy(&head));
        tls.write_all(b"ping over tls").await.expect("write");
        let mut echo = [0u8; 13];
        tls.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping over tls");
    });
}

#[test]
fn access_logs_are_json_lines_when_on() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let logs = tempfile::tempdir().expect("tempdir");
    let path = logs.path().join("access.jsonl");
    let (agent, _dir) = agent_with(&format!(
        "[http]\naccess_log = {:?}\n[[http.routes]]\nhost = \"x\"\nservice = \"web\"\n",
        path.to_string_lossy()
    ));
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    assert_eq!(get(agent.http, "x", "/a?b=1").status, 200);
    assert_eq!(get(agent.http, "nowhere", "/").status, 404);
    let traced = get_with(agent.http, "x", "/traced", "X-Request-Id: trace-42\r\n");
    assert_eq!(traced.status, 200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut sender, _) = crate::support::h2c(agent.http).await;
        let request = hyper::Request::get("http://x/over-h2")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let _ = response.into_body().collect().await;
    });
    let lines: Vec<serde_json::Value> =
        eventually("four log lines", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                .collect();
            (lines.len() >= 4).then_some(lines)
        });
    let find = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
            .clone()
    };
    let ok = find("/a?b=1");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["host"], "x");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["service"], "web");
    assert_eq!(ok["endpoint"], "web1");
    assert_eq!(ok["node"], "n1");
    assert_eq!(ok["client"], "127.0.0.1");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert!(ok["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(ok["route"], "x/");
    assert_eq!(ok["retries"], 0);
    assert!(
        ok["request_id"].as_str().is_some_and(|id| id.len() == 16),
        "the proxy's own id: {ok}"
    );
    let (upstream, total) = (
        ok["upstream_ms"].as_f64().expect("upstream_ms"),
        ok["duration_ms"].as_f64().expect("duration_ms"),
    );
    assert!(upstream > 0.0 && upstream <= total, "{ok}");
    assert_eq!(
        find("/traced")["request_id"],
        "trace-42",
        "the client's id is kept"
    );
    let missing = lines
        .iter()
        .find(|l| l["host"] == "nowhere")
        .expect("the 404 is logged");
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["service"], "");
    let h2 = find("/over-h2");
    assert_eq!(h2["route"], "x/");
    assert!(h2["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(h2["protocol"], "HTTP/2");
    assert_eq!(h2["status"], 200);
    assert_eq!(h2["endpoint"], "web1");
}

#[test]
fn an_endpoint_that_keeps_failing_is_reported_to_the_registry_then_retried() {
    let (agent, _dir) = agent_with(
        r#"
[http]
balancer = "round_robin"
[http.outlier]
consecutive_failures = 2
base_ejection = "30s"
max_ejected_percent = 100
report_after = "300ms"
report_hold = "2s"
[[http.routes]]
service = "web"
"#,
    );
    let c = agent.client();
    let ups: Vec<Upstream> = ["p1", "p2"].iter().map(|n| Upstream::start(n)).collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    ups[0].status.store(500, Ordering::SeqCst);
    let post = || {
        raw(
            agent.http,
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        )
        .status
    };
    for _ in 0..8 {
        post();
    }
    let passing = |c: &Client| -> Vec<String> {
        c.get_ok("/v1/health/service/web?passing")
            .json()
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|e| e["Service"]["ID"].as_str().map(str::to_string))
            .collect()
    };
    let check = eventually("the passive report", Duration::from_secs(10), || {
        let checks = c.get_ok("/v1/health/checks/web").json();
        checks
            .as_array()
            .expect("array")
            .iter()
            .find(|c| c["CheckID"] == "_switchyard_passive:p1")
            .cloned()
    });
    assert_eq!(check["Status"], "critical", "{check}");
    assert_eq!(check["ServiceID"], "p1");
    assert!(
        check["Output"].as_str().is_some_and(|o| o.contains("fail")),
        "{check}"
    );
    assert_eq!(
        passing(&c),
        ["p2"],
        "DNS and ?passing drop the reported endpoint"
    );
    // After the hold the report is withdrawn and the endpoint is tried again.
    ups[0].status.store(200, Ordering::SeqCst);
    eventually("the report withdrawn", Duration::from_secs(10), || {
        let checks = c.get_ok("/v1/health/checks/web").json();
        let gone = !checks
            .as_array()
            .expect("array")
            .iter()
            .any(|c| c["CheckID"] == "_switchyard_passive:p1");
        gone.then_some(())
    });
    assert_eq!(passing(&c).len(), 2);
}

#[test]
fn new_connections_go_to_the_least_busy_proxy_thread() {
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    let open = |n: usize| -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|_| {
                // Each connection serves a request: a handed one works too.
                let mut stream = std::net::TcpStream::connect(agent.http).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut buf = Vec::new();
                let reply = crate::drain::keep_alive_get(&mut stream, &mut buf);
                assert_eq!(reply.map(|(status, _)| status), Some(200));
                stream
            })
            .collect()
    };
    let open_now = crate::support::open_close_open_stays_even(&c, open);
    drop(open_now);
    crate::support::split_evenly(&c, 0.0);
}

/// ASCII bytes whose value depends on their position: a lost, doubled or
/// reordered stretch shows.
fn patterned(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i * 7 + i / 251) % 26) as u8)
        .collect()
}

/// Reads one response head and its Content-Length body from `stream`.
pub(crate) fn read_response(stream: &mut TcpStream) -> (Raw, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = parse_raw(&head);
    let len: usize = head
        .headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("response body");
    (head, body)
}

#[test]
fn large_bodies_pass_byte_exact_both_ways_and_a_cut_one_closes_the_client_io_uring() {
    large_bodies_pass_byte_exact_both_ways_and_a_cut_one_closes_the_client(true);
}

#[test]
fn large_bodies_pass_byte_exact_both_ways_and_a_cut_one_closes_the_client_tokio() {
    large_bodies_pass_byte_exact_both_ways_and_a_cut_one_closes_the_client(false);
}

fn large_bodies_pass_byte_exact_both_ways_and_a_cut_one_closes_the_client(io_uring: bool) {
    let (agent, _dir) = agent_with(&http_via(
        io_uring,
        "[[http.routes]]\nhost = \"big\"\nservice = \"big\"\n\n\
         [[http.routes]]\nhost = \"cut\"\nservice = \"cut\"\n",
    ));
    let c = agent.client();
    let up = Upstream::start("big1");
    register(&c, "big", &[&up], &[]);

    // A 1 MiB upload echoed back as a 1 MiB response, then a small request
    // on the same connection: every byte in order, none taken from the next.
    let body = patterned(1024 * 1024 + 3);
    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut request = format!(
        "POST /echo HTTP/1.1\r\nHost: big\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: big\r\n\r\n");
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || stream.write_all(&request).expect("send"))
    };
    let (head, echoed) = read_response(&mut stream);
    assert_eq!(head.status, 200, "{head:?}");
    assert!(echoed == body, "the 1 MiB echo differs from what was sent");
    let (head, small) = read_response(&mut stream);
    assert_eq!((head.status, small.as_slice()), (200, &b"big1"[..]));
    writer.join().expect("writer");
    // Both bodies went through the kernel, not through user space.
    let spliced = c
        .metric("switchyard_proxy_spliced_bytes_total")
        .expect("the spliced bytes counter");
    assert!(spliced >= 2.0 * 900_000.0, "spliced {spliced} bytes");

    // A backend that promises 1 MiB and sends 200 kB: the client gets the
    // head and what came, then the connection closes, with no hang.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read_exact(&mut byte).is_err() {
                    break;
                }
                head.push(byte[0]);
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n");
            let _ = stream.write_all(&patterned(200_000));
        }
    });
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "cut", "id": "cut1",
                       "address": "127.0.0.1", "port": port}]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"GET /cut HTTP/1.1\r\nHost: cut\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let read = stream.read_to_end(&mut got);
    assert!(read.is_ok(), "the client was not closed: {read:?}");
    let text = String::from_utf8_lossy(&got[..got.len().min(200)]).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let start = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert_eq!(got.len() - start, 200_000, "what came, and only that");
    assert!(got[start..] == patterned(200_000)[..]);
    assert_http_sockets_via(&c, io_uring);
}

/// A keep-alive backend answering `GET /N/H` with an N-byte patterned body
/// under a head padded to about H bytes, each response in one write.
fn sized_backend() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || loop {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split(' ').nth(1).unwrap_or("/0/0").to_string();
                let mut sizes = path.trim_start_matches('/').split('/');
                let mut size =
                    || -> usize { sizes.next().and_then(|v| v.parse().ok()).unwrap_or(0) };
                let (body, pad) = (size(), size());
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nX-Pad: {}\r\nContent-Length: {body}\r\n\r\n",
                    "p".repeat(pad)
                )
                .into_bytes();
                out.extend_from_slice(&patterned(body));
                if stream.write_all(&out).is_err() {
                    return;
                }
            });
        }
    });
    port
}

#[test]
fn after_a_spliced_response_the_next_head_is_read_alone_and_every_size_stays_byte_exact_io_uring() {
    after_a_spliced_response_the_next_head_is_read_alone(true);
}

#[test]
fn after_a_spliced_response_the_next_head_is_read_alone_and_every_size_stays_byte_exact_tokio() {
    after_a_spliced_response_the_next_head_is_read_alone(false);
}

fn after_a_spliced_response_the_next_head_is_read_alone(io_uring: bool) {
    let (agent, _dir) = agent_with(&http_via(
        io_uring,
        "[[http.routes]]\nhost = \"sized\"\nservice = \"sized\"\n",
    ));
    let c = agent.client();
    let port = sized_backend();
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "sized", "id": "sized1",
                       "address": "127.0.0.1", "port": port}]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let spliced = || {
        c.metric("switchyard_proxy_spliced_bytes_total")
            .unwrap_or(0.0)
    };
    const BIG: usize = 64 * 1024;
    // (body, head padding): a large body, large ones after it (one with a
    // head longer than a head-only read), then small and medium ones after a
    // large one, and a large one again.
    let sequence = [
        (BIG, 0),
        (BIG, 0),
        (BIG, 6000),
        (2000, 0),
        (BIG, 0),
        (10_000, 0),
        (20_000, 3000),
        (BIG, 0),
    ];
    for (i, &(body, pad)) in sequence.iter().enumerate() {
        let before = spliced();
        let request = format!("GET /{body}/{pad} HTTP/1.1\r\nHost: sized\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("send");
        let (head, got) = read_response(&mut stream);
        assert_eq!(head.status, 200, "response {i}: {head:?}");
        assert!(
            got == patterned(body),
            "response {i} ({body} bytes) differs"
        );
        let moved = spliced() - before;
        if i > 0 && body == BIG && sequence[i - 1].0 == BIG {
            // Right after a large response, at most a head-only read's worth
            // of the body is copied: the rest goes through the kernel.
            assert!(
                moved >= (BIG - 4096) as f64,
                "response {i}: only {moved} of {BIG} body bytes spliced"
            );
        }
    }
    assert_http_sockets_via(&c, io_uring);
}

#[test]
fn http_sockets_move_to_the_ring_when_a_thread_gets_busy_and_back_when_it_quiets() {
    let (agent, _dir) =
        agent_with("[http]\nio_uring_connections = 4\n[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("w1");
    register(&c, "web", &[&up], &[]);
    let via = |path: &str| {
        c.metric(&format!(
            "switchyard_proxy_http_sockets_total{{via=\"{path}\"}}"
        ))
        .unwrap_or(0.0)
    };
    let open = || {
        let on = |t: &str| {
            c.metric(&format!(
                "switchyard_proxy_thread_connections{{thread=\"{t}\"}}"
            ))
            .unwrap_or(0.0)
        };
        on("0") + on("1")
    };
    let connect = || {
        let stream = TcpStream::connect(agent.http).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
    };
    let ask = |stream: &mut TcpStream| {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .expect("send");
        let (head, body) = read_response(stream);
        assert_eq!((head.status, body.as_slice()), (200, &b"w1"[..]));
    };

    // One client: tokio's sockets, client and upstream.
    let mut first = connect();
    ask(&mut first);
    assert_eq!(via("io_uring"), 0.0, "one client went on the ring");
    let tokio_before = via("tokio");
    assert!(tokio_before >= 2.0, "{tokio_before}");

    // Twelve clients, about six on each of the two proxy threads: a socket
    // is placed between exchanges, so within a few requests each they are
    // on the ring.
    let mut more: Vec<TcpStream> = (0..11).map(|_| connect()).collect();
    eventually("twelve clients open", Duration::from_secs(10), || {
        (open() == 12.0).then_some(())
    });
    eventually(
        "sockets on the ring with twelve clients",
        Duration::from_secs(10),
        || {
            for stream in more.iter_mut().chain(std::iter::once(&mut first)) {
                ask(stream);
            }
            (via("io_uring") >= 2.0).then_some(())
        },
    );

    // Back to one: the remaining client's socket returns to tokio.
    drop(more);
    eventually(
        "the closed clients are gone",
        Duration::from_secs(10),
        || (open() <= 1.0).then_some(()),
    );
    let tokio_busy = via("tokio");
    eventually(
        "the quiet thread's socket back on tokio",
        Duration::from_secs(10),
        || {
            ask(&mut first);
            (via("tokio") > tokio_busy).then_some(())
        },
    );
    assert!(tokio_busy >= tokio_before);
}

/// The HTTP/2 preface belongs only at the start of a connection (RFC 9113
/// §3.4): sent after a completed HTTP/1.1 exchange it is a malformed
/// HTTP/1.1 request (400), not a switch to HTTP/2.
#[test]
fn the_http2_preface_after_an_http1_request_is_refused() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"pri.test\"\nservice = \"web\"\n");
    let c = agent.client();
    let a = Upstream::start("a");
    register(&c, "web", &[&a], &[]);
    let mut stream = TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: pri.test\r\n\r\n")
        .expect("send");
    let (first, body) = read_response(&mut stream);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(String::from_utf8_lossy(&body), "a");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("send the preface");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "an HTTP/1.1 answer, not HTTP/2 frames: {text:?}"
    );
    // At the start of a connection the preface still means HTTP/2: the
    // agent answers with an HTTP/2 SETTINGS frame (type 4), not HTTP/1.1.
    let mut fresh = TcpStream::connect(agent.http).expect("connect");
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    fresh
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("send the preface");
    let mut frame = [0u8; 9];
    fresh.read_exact(&mut frame).expect("a frame header");
    assert_eq!(frame[3], 4, "a SETTINGS frame: {frame:?}");
}

/// A request with an earlier proxy's `Forwarded` and a `Host` with a port
/// reaches the backend with the same forwarding headers over HTTP/1.1 and
/// over HTTP/2 (the hyper path replaced `Forwarded` and dropped the port).
#[test]
fn forwarding_headers_are_the_same_over_http1_and_http2() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"fw.test\"\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("fw");
    register(&c, "web", &[&up], &[]);
    let over_http1 = raw(
        agent.http,
        b"GET /x HTTP/1.1\r\nHost: fw.test:8443\r\nForwarded: for=192.0.2.1\r\nX-Forwarded-For: 192.0.2.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(over_http1.status, 200);
    let saw = |headers: &HashMap<String, String>| -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-saw-") && *k != "x-saw-x-request-id")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        seen.sort();
        seen
    };
    let http1 = saw(&over_http1.headers);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http2 = runtime.block_on(async {
        let (mut sender, _) = crate::support::h2c(agent.http).await;
        let request = hyper::Request::builder()
            .uri("http://fw.test:8443/x")
            .header("forwarded", "for=192.0.2.1")
            .header("x-forwarded-for", "192.0.2.1")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let headers: HashMap<String, String> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let _ = response.into_body().collect().await;
        headers
    });
    let http2 = saw(&http2);
    assert!(
        http1
            .iter()
            .any(|(k, v)| k == "x-saw-forwarded" && v.starts_with("for=192.0.2.1, for=")),
        "{http1:?}"
    );
    assert!(
        http1
            .iter()
            .any(|(k, v)| k == "x-saw-host" && v == "fw.test:8443"),
        "{http1:?}"
    );
    assert_eq!(
        http1, http2,
        "the backend saw different headers over HTTP/2"
    );
    let by = |protocol: &str| {
        c.metric(&format!(
            "switchyard_proxy_requests_by_protocol_total{{protocol=\"{protocol}\",service=\"web\"}}"
        ))
    };
    assert_eq!(
        (by("http1"), by("h2c"), by("h2")),
        (Some(1.0), Some(1.0), Some(0.0))
    );
}

/// Over HTTP/2, as over HTTP/1.1, an idempotent request answered 503 by one
/// endpoint is retried on another (the hyper path retried only connect
/// failures); a POST is not.
#[test]
fn http2_requests_answered_503_are_retried_on_another_endpoint() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let (agent, _dir) = agent_with(
        // A budget that lets every retry of this burst through.
        "[http]\nbalancer = \"round_robin\"\nretry_budget_floor = 100\n[http.outlier]\nconsecutive_failures = 0\n\
         [[http.routes]]\nhost = \"r.test\"\nservice = \"web\"\n",
    );
    let c = agent.client();
    let ups: Vec<Upstream> = ["r1", "r2"].iter().map(|n| Upstream::start(n)).collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    ups[0].status.store(503, Ordering::SeqCst);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let statuses = |method: &'static str| {
        runtime.block_on(async {
            let (sender, _) = crate::support::h2c(agent.http).await;
            let mut seen = HashMap::new();
            for _ in 0..20 {
                let request = hyper::Request::builder()
                    .method(method)
                    .uri("http://r.test/x")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let response = sender
                    .clone()
                    .send_request(request)
                    .await
                    .expect("response");
                *seen.entry(response.status().as_u16()).or_insert(0) += 1;
                let _ = response.into_body().collect().await;
            }
            seen
        })
    };
    let gets = statuses("GET");
    assert_eq!(gets.get(&200), Some(&20), "{gets:?}");
    let posts = statuses("POST");
    assert!(
        posts.get(&503).is_some_and(|&n| n > 0),
        "a POST is not repeated: {posts:?}"
    );
}

/// A route's own `connect_timeout` holds over HTTP/2 too (the hyper path
/// used the global one it was started with): an endpoint that never
/// completes a connect (its listener's queue is full) fails the request
/// after the route's 300 ms, not the global 20 s.
#[test]
fn a_routes_connect_timeout_holds_over_http2() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    // A listener whose accept queue is full: further SYNs are dropped.
    let silent =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    silent
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    silent.listen(0).expect("listen");
    let addr = silent
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let _fill: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    let (agent, _dir) = agent_with(
        "[http]\nconnect_timeout = \"20s\"\nresponse_timeout = \"30s\"\nretries = 0\n\
         [[http.routes]]\nhost = \"slow.test\"\nservice = \"web\"\nconnect_timeout = \"300ms\"\n",
    );
    let c = agent.client();
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "web", "id": "silent", "address": "127.0.0.1", "port": addr.port()}]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, waited) = runtime.block_on(async {
        let (mut sender, _) = crate::support::h2c(agent.http).await;
        let request = hyper::Request::builder()
            .uri("http://slow.test/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let started = std::time::Instant::now();
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        (status, started.elapsed())
    });
    assert_eq!(status, 502);
    assert!(
        waited < Duration::from_secs(10),
        "waited {waited:?} for a 300 ms connect timeout"
    );
}

/// 1,100 endpoints (more than one chunk of a view), of which only real
/// upstreams on nodes far apart pass: every change to one of them reaches the
/// very next requests, as in a small service.
#[test]
fn a_large_service_routes_across_its_chunks_and_follows_each_change() {
    let (agent, _dir) =
        agent_with("[[http.routes]]\nservice = \"big\"\nbalancer = \"round_robin\"\n");
    let c = agent.client();
    let ups = [
        Upstream::start("one"),
        Upstream::start("two"),
        Upstream::start("three"),
    ];
    let placed = [(5, &ups[0]), (50, &ups[1]), (95, &ups[2])];
    let nodes: Vec<_> = (0..100)
        .map(|n| json!({"name": format!("n{n:03}"), "address": "127.0.0.1"}))
        .collect();
    let mut endpoints = Vec::new();
    for n in 0..100 {
        for i in 0..11 {
            // Critical until a TTL pass: never routed.
            endpoints.push(json!({"node": format!("n{n:03}"), "service": "big",
                "id": format!("e{n:03}-{i:02}"), "port": 1, "checks": [{"ttl": "1h"}]}));
        }
    }
    for (n, up) in placed {
        endpoints.push(
            json!({"node": format!("n{n:03}"), "service": "big", "id": up.name,
            "address": "127.0.0.1", "port": up.addr.port()}),
        );
    }
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"nodes": nodes, "endpoints": endpoints}).to_string(),
    );
    let summary = c.get_ok("/v1/switchyard/services").json();
    let big = summary
        .as_array()
        .and_then(|s| s.iter().find(|v| v["name"] == "big"))
        .cloned()
        .expect("big listed");
    assert_eq!(big["endpoints"], 1103);
    assert_eq!(big["routable"], 3);

    let seen = counts(agent.http, "h", 30);
    assert_eq!(seen.len(), 3, "round robin reaches every chunk: {seen:?}");
    for up in &ups {
        assert_eq!(seen.get(&up.name), Some(&10), "{seen:?}");
    }
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"deregister": [{"node": "n050", "id": "two"}]}).to_string(),
    );
    let seen = counts(agent.http, "h", 20);
    assert_eq!(seen.get("two"), None, "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    c.put_ok("/v1/switchyard/nodes/n095/drain", "");
    let seen = counts(agent.http, "h", 10);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["one"], "{seen:?}");
    let four = Upstream::start("four");
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"endpoints": [{"node": "n060", "service": "big", "id": "four",
            "address": "127.0.0.1", "port": four.addr.port()}]})
        .to_string(),
    );
    let seen = counts(agent.http, "h", 20);
    assert_eq!(seen.get("one"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("four"), Some(&10), "{seen:?}");
}

/// Each proxy thread measures its io_uring's wake-up at start: prompt here,
/// so HTTP/1.1 sockets go on the ring; forced slow (a kernel that defers the
/// ring's signal made every exchange wait ~25 ms), the thread falls back to
/// tokio's sockets with one warning naming the kernel, and still serves.
#[test]
fn a_ring_that_wakes_late_is_not_used() {
    let config =
        "[http]\nio_uring_connections = 0\n[[http.routes]]\nhost = \"h\"\nservice = \"web\"\n";
    for slow in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).expect("write config");
        let floor = std::path::Path::new("5");
        let env: &[(&str, &std::path::Path)] = if slow {
            &[("SWITCHYARD_TEST_RING_WAKEUP_FLOOR_MS", floor)]
        } else {
            &[]
        };
        let agent = Agent::start_in_env(
            &dir.path().join("data"),
            &[
                "--config",
                path.to_str().expect("utf8"),
                "--proxy-threads",
                "1",
            ],
            env,
        );
        let c = agent.client();
        let up = Upstream::start("r1");
        register(&c, "web", &[&up], &[]);
        for _ in 0..5 {
            assert_eq!(get(agent.http, "h", "/").status, 200);
        }
        let wakeup = c
            .metric("switchyard_proxy_io_uring_wakeup_seconds{thread=\"0\"}")
            .expect("the thread's wake-up is measured");
        assert_http_sockets_via(&c, !slow);
        let warned = agent.stderr().contains("io_uring wakes this thread late");
        if slow {
            assert!(wakeup >= 0.005, "{wakeup}");
            assert!(warned, "one warning names the fallback");
        } else {
            assert!(wakeup < 0.001, "a prompt ring here: {wakeup}");
            assert!(!warned);
        }
    }
}
