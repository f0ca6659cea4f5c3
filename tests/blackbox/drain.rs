//! Draining end to end: the registry's drain state, the proxy's in-flight
//! counts, new traffic moving away at once, deadlines cutting long-lived
//! connections, and the CLI that waits for it all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::run;
use crate::proxy::{agent_with, get, parse_raw, Upstream};
use crate::support::{eventually, Client};

const ROUTE: &str = "[[http.routes]]\nservice = \"web\"\n";

/// Registers each `(node, upstream)` as an endpoint of `web`.
fn place(c: &Client, endpoints: &[(&str, &Upstream)]) {
    let mut nodes: Vec<&str> = endpoints.iter().map(|(n, _)| *n).collect();
    nodes.dedup();
    let nodes: Vec<_> = nodes
        .iter()
        .map(|n| json!({"name": n, "address": "127.0.0.1"}))
        .collect();
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(n, u)| {
            json!({"node": n, "service": "web", "id": u.name, "address": "127.0.0.1",
                   "port": u.addr.port()})
        })
        .collect();
    let batch = json!({"nodes": nodes, "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
}

fn status(c: &Client, path: &str) -> Value {
    c.get_ok(path).json()
}

fn backend_of(addr: SocketAddr) -> String {
    let reply = get(addr, "h", "/");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[test]
fn a_node_drains_after_its_slow_request_finishes_and_undrains() {
    let (agent, _dir) = agent_with(ROUTE);
    let c = agent.client();
    let slow = Upstream::start("slow");
    let other = Upstream::start("other");
    place(&c, &[("n1", &slow)]);

    // A slow request is in flight on n1 when the drain starts.
    slow.delay_ms.store(1500, Ordering::SeqCst);
    let http = agent.http;
    let in_flight = std::thread::spawn(move || get(http, "h", "/"));
    eventually(
        "the slow request reaches n1",
        Duration::from_secs(10),
        || (slow.served() == 1).then_some(()),
    );
    place(&c, &[("n2", &other)]);

    let path = "/v1/switchyard/nodes/n1/drain";
    let started = c.put_ok(path, r#"{"deadline":"60s"}"#).json();
    assert_eq!(started["state"], "draining", "{started}");
    assert_eq!(started["in_flight"], 1, "{started}");
    assert_eq!(started["drained"], false);
    assert_eq!(started["endpoints"][0]["id"], "slow");
    assert_eq!(started["endpoints"][0]["in_flight"], 1);
    assert!(started["deadline"]
        .as_str()
        .is_some_and(|d| d.ends_with('Z')));

    // New requests go elsewhere from the acknowledgment on.
    for _ in 0..20 {
        assert_eq!(backend_of(agent.http), "other");
    }
    assert_eq!(slow.served(), 1);
    let listed = run(&["nodes"], &agent.api);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("n1 ") && l.contains("draining")),
        "{listed}"
    );

    // The slow request completes; then the node reports drained.
    let reply = in_flight.join().expect("slow request thread");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "slow");
    let done = eventually("n1 drained", Duration::from_secs(10), || {
        let s = status(&c, path);
        (s["drained"] == true).then_some(s)
    });
    assert_eq!(done["state"], "drained");
    assert_eq!(done["in_flight"], 0);
    assert_eq!(done["cut"], 0);
    let waited = run(&["drain", "node", "n1", "--wait"], &agent.api);
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    // One final line, on stdout; nothing on stderr once drained.
    let out = String::from_utf8_lossy(&waited.stdout);
    assert_eq!(out.trim(), "drained: nothing in flight", "{out}");
    let err = String::from_utf8_lossy(&waited.stderr);
    assert!(!err.contains("drained"), "a second final line: {err}");
    // The node list agrees with the drain status.
    let listed = run(&["nodes"], &agent.api);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("n1 ") && l.contains(" drained ")),
        "{listed}"
    );
    let nodes = c.get_ok("/v1/switchyard/nodes").json();
    let n1 = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["name"] == "n1"))
        .expect("n1 listed");
    assert_eq!(n1["state"], "drained", "{nodes}");

    let undrained = run(&["undrain", "node", "n1"], &agent.api);
    assert!(undrained.status.success());
    assert_eq!(status(&c, path)["state"], "active");
    slow.delay_ms.store(0, Ordering::SeqCst);
    eventually("traffic returns to n1", Duration::from_secs(10), || {
        (backend_of(agent.http) == "slow").then_some(())
    });
}

/// Opens a WebSocket-style tunnel through the proxy and checks one echo.
fn open_tunnel(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
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
    assert_eq!(parse_raw(&head).status, 101);
    stream.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    stream
}

#[test]
fn the_deadline_cuts_a_long_lived_connection_and_says_so() {
    let (agent, _dir) = agent_with(ROUTE);
    let c = agent.client();
    let up = Upstream::start("ws");
    place(&c, &[("n1", &up)]);
    let mut tunnel = open_tunnel(agent.http);

    let path = "/v1/switchyard/nodes/n1/drain";
    let started = c.put_ok(path, r#"{"deadline":"1s"}"#).json();
    assert_eq!(started["in_flight"], 1, "the tunnel counts: {started}");
    assert_eq!(started["drained"], false);
    // Until the deadline the tunnel still works.
    tunnel.write_all(b"pong").expect("write");
    let mut echo = [0u8; 4];
    tunnel
        .read_exact(&mut echo)
        .expect("echo before the deadline");

    let mut rest = Vec::new();
    match tunnel.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the tunnel was still open 15 s after a 1 s deadline"
        ),
    }
    // At the deadline the node counts as drained; the cut tunnel leaves its
    // endpoint's in-flight count a moment later.
    let done = eventually("drained at the deadline", Duration::from_secs(10), || {
        let s = status(&c, path);
        (s["drained"] == true && s["in_flight"] == 0).then_some(s)
    });
    assert_eq!(done["cut"], 1, "{done}");
    assert_eq!(done["in_flight"], 0, "{done}");
    assert_eq!(done["deadline_passed"], true);
    // The CLI reports the cut with its own exit code.
    let waited = run(&["drain", "node", "n1", "--wait"], &agent.api);
    assert_eq!(waited.status.code(), Some(3), "{waited:?}");
}

#[test]
fn one_endpoint_drains_while_its_node_keeps_serving() {
    let (agent, _dir) = agent_with(ROUTE);
    let c = agent.client();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    place(&c, &[("n1", &a), ("n1", &b)]);

    let drained = run(&["drain", "endpoint", "a", "--deadline", "30s"], &agent.api);
    assert!(drained.status.success(), "{drained:?}");
    let s = status(&c, "/v1/switchyard/endpoints/a/drain");
    assert_eq!(s["node"], "n1");
    assert_eq!(s["endpoint"], "a");
    assert_eq!(s["state"], "drained", "nothing was in flight: {s}");
    assert_eq!(
        status(&c, "/v1/switchyard/nodes/n1/drain")["state"],
        "active"
    );
    for _ in 0..20 {
        assert_eq!(backend_of(agent.http), "b");
    }
    let view = status(&c, "/v1/switchyard/services/web");
    let excluded: Vec<_> = view["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["excluded_because"].as_str())
        .collect();
    assert_eq!(excluded, ["endpoint a is draining"]);

    // Ids are unique per node only: an ambiguous one needs ?node=.
    let twin = Upstream::start("a");
    place(&c, &[("n2", &twin)]);
    let ambiguous = c.get("/v1/switchyard/endpoints/a/drain");
    assert_eq!(ambiguous.status, 400, "{}", ambiguous.body);
    assert!(ambiguous.body.contains("?node="), "{}", ambiguous.body);
    assert_eq!(
        status(&c, "/v1/switchyard/endpoints/a/drain?node=n2")["state"],
        "active"
    );
    assert_eq!(c.get("/v1/switchyard/endpoints/ghost/drain").status, 404);
    assert_eq!(
        c.put("/v1/switchyard/nodes/n1/drain", r#"{"deadline":"soon"}"#)
            .status,
        400,
        "a bad deadline is refused"
    );

    assert!(
        run(&["undrain", "endpoint", "a", "--node", "n1"], &agent.api)
            .status
            .success()
    );
    eventually("a serves again", Duration::from_secs(10), || {
        (backend_of(agent.http) == "a").then_some(())
    });
}

/// One keep-alive GET on `stream`; `(status, body)`.
pub(crate) fn keep_alive_get(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .ok()?;
    read_response(stream, buf)
}

/// Reads one response with a Content-Length body; `(status, body)`.
pub(crate) fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Some((
                    parse_raw(format!("{head}\r\n\r\n").as_bytes()).status,
                    body[..length].to_string(),
                ));
            }
        }
    }
}

#[test]
fn draining_under_load_fails_nothing_and_moves_traffic_at_the_ack() {
    let (agent, _dir) = agent_with(ROUTE);
    let c = agent.client();
    let ups: Vec<Upstream> = ["u1", "u2", "u3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    place(&c, &[("n1", &ups[0]), ("n2", &ups[1]), ("n3", &ups[2])]);
    for u in &ups {
        u.delay_ms.store(2, Ordering::SeqCst);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
            let addr = agent.http;
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut buf = Vec::new();
                // Bounded: at most 5,000 requests per client.
                for _ in 0..5000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match keep_alive_get(&mut stream, &mut buf) {
                        Some((200, _)) => {}
                        _ => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            stream = TcpStream::connect(addr).expect("reconnect");
                            stream
                                .set_read_timeout(Some(Duration::from_secs(10)))
                                .expect("timeout");
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    eventually(
        "load is running on every node",
        Duration::from_secs(20),
        || ups.iter().all(|u| u.served() > 20).then_some(()),
    );

    let ack = c.put_ok("/v1/switchyard/nodes/n1/drain", "").json();
    let at_ack = ups[0].served();
    let in_flight_at_ack = ack["in_flight"].as_u64().expect("in_flight") as usize;
    let before = done.load(Ordering::SeqCst);
    eventually("more load after the drain", Duration::from_secs(20), || {
        (done.load(Ordering::SeqCst) > before + 400).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client thread");
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no client saw an error");
    assert!(
        ups[0].served() <= at_ack + in_flight_at_ack,
        "n1 got new requests after the ack: {} at the ack (+{} in flight), {} now",
        at_ack,
        in_flight_at_ack,
        ups[0].served()
    );
    let s = eventually("n1 drained", Duration::from_secs(10), || {
        let s = status(&c, "/v1/switchyard/nodes/n1/drain");
        (s["drained"] == true).then_some(s)
    });
    assert_eq!(s["in_flight"], 0);
}
