//! The L4 TCP proxy against real TCP backends: balancing, half-close, failover,
//! no endpoint, and drains that cut connections at their deadline.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;

use crate::proxy::agent_with;
use crate::support::{eventually, open_close_open_stays_even, split_evenly, Client};

/// A TCP backend: greets each connection with `NAME\n`, echoes what it reads
/// and, when the client half-closes, answers `bye` and closes.
struct Echo {
    name: String,
    addr: SocketAddr,
}

impl Echo {
    fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = listener.local_addr().expect("addr");
        let greeting = format!("{name}\n");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let greeting = greeting.clone();
                std::thread::spawn(move || {
                    if stream.write_all(greeting.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => {
                                let _ = stream.write_all(b"bye");
                                return;
                            }
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Echo {
            name: name.to_string(),
            addr,
        }
    }
}

fn place(c: &Client, endpoints: &[(&str, &str, u16)]) {
    let mut nodes: Vec<&str> = endpoints.iter().map(|(n, _, _)| *n).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let nodes: Vec<_> = nodes
        .iter()
        .map(|n| json!({"name": n, "address": "127.0.0.1"}))
        .collect();
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(n, id, port)| {
            json!({"node": n, "service": "db", "id": id, "address": "127.0.0.1", "port": port})
        })
        .collect();
    let batch = json!({"nodes": nodes, "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect L4 listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream
}

/// Reads the backend's greeting line.
fn greeting(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            other => panic!("no greeting: {other:?} after {line:?}"),
        }
    }
    String::from_utf8_lossy(&line).trim().to_string()
}

/// A whole session: greeting, one echo, half-close, `bye`, EOF.
fn session(addr: SocketAddr) -> String {
    let mut stream = connect(addr);
    let name = greeting(&mut stream);
    stream.write_all(b"hello").expect("write");
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"hello");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("read to EOF");
    assert_eq!(
        rest, b"bye",
        "the backend saw our EOF and could still answer"
    );
    name
}

/// Reads until the proxy closes `stream` (EOF or a reset) and returns what
/// came first; panics with `still_open` if the 15 s read timeout ran out.
fn read_until_closed(stream: &mut TcpStream, still_open: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    if let Err(e) = stream.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{still_open}"
        );
    }
    rest
}

const CONFIG: &str = "[[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"db\"\n\
                      [[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"db\"\nbalancer = \"consistent_hash\"\n\
                      [[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"none\"\n";

#[test]
fn l4_listeners_balance_half_close_and_fail_over() {
    let (agent, _dir) = agent_with(CONFIG);
    assert_eq!(agent.tcp.len(), 3, "three listeners in the ready line");
    let c = agent.client();
    let a = Echo::start("a");
    let b = Echo::start("b");
    place(
        &c,
        &[
            ("n1", &a.name, a.addr.port()),
            ("n2", &b.name, b.addr.port()),
        ],
    );

    // Round robin: an even split.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        *seen.entry(session(agent.tcp[0])).or_default() += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");

    // Consistent hash on the client address: one backend for us.
    let first = session(agent.tcp[1]);
    for _ in 0..6 {
        assert_eq!(session(agent.tcp[1]), first);
    }

    // A service with no endpoint: the connection is closed at once.
    let mut none = connect(agent.tcp[2]);
    let mut buf = [0u8; 8];
    assert_eq!(none.read(&mut buf).expect("EOF"), 0);

    // An endpoint nobody listens on: connections go to the live one.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    place(&c, &[("n3", "dead", dead_port)]);
    for _ in 0..6 {
        let name = session(agent.tcp[0]);
        assert!(name == "a" || name == "b", "{name}");
    }
    let metrics = c.get_ok("/metrics").body;
    let dead_errors: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("switchyard_proxy_connect_errors_total")
                && l.contains("endpoint=\"dead\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        dead_errors >= 1.0,
        "connect errors are counted per endpoint"
    );
}

#[test]
fn a_drain_deadline_cuts_l4_connections_and_reports_them() {
    let (agent, _dir) = agent_with(CONFIG);
    let c = agent.client();
    let a = Echo::start("a");
    place(&c, &[("n1", &a.name, a.addr.port())]);
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = connect(agent.tcp[0]);
            assert_eq!(greeting(&mut s), "a");
            s
        })
        .collect();

    let path = "/v1/switchyard/nodes/n1/drain";
    let started = c.put_ok(path, r#"{"deadline":"1s"}"#).json();
    assert_eq!(started["in_flight"], 2, "{started}");
    assert_eq!(started["state"], "draining");
    // New connections find no endpoint; open ones still work until the deadline.
    let mut refused = connect(agent.tcp[0]);
    let mut buf = [0u8; 8];
    assert_eq!(refused.read(&mut buf).expect("EOF"), 0);
    open[0].write_all(b"x").expect("write");
    let mut echo = [0u8; 1];
    open[0]
        .read_exact(&mut echo)
        .expect("echo before the deadline");

    for stream in &mut open {
        read_until_closed(stream, "still open 15 s after a 1 s deadline");
    }
    let done = eventually("drained with cuts", Duration::from_secs(10), || {
        let s = c.get_ok(path).json();
        (s["drained"] == true).then_some(s)
    });
    assert_eq!(done["cut"], 2, "{done}");
    assert_eq!(done["in_flight"], 0, "{done}");
    assert!(c
        .get_ok("/metrics")
        .body
        .contains("outcome=\"drain_cut\"} 2"));
}

#[test]
fn l4_connections_spread_evenly_over_the_proxy_threads() {
    let (agent, _dir) = agent_with(CONFIG);
    let c = agent.client();
    let a = Echo::start("a");
    place(&c, &[("n1", &a.name, a.addr.port())]);
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                // Each one is served: a handed connection reaches the backend too.
                let mut stream = connect(agent.tcp[0]);
                assert_eq!(greeting(&mut stream), "a");
                stream
            })
            .collect()
    };
    let mut open_now = open_close_open_stays_even(&c, open);
    // A handed connection still carries both ways.
    let mut last = open_now.pop().expect("a connection");
    last.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    last.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    drop((open_now, last));
    split_evenly(&c, 0.0);
}

/// `[tcp]` settings followed by one listener to `db` that closes a
/// connection after 400 ms with no bytes moving.
fn idle_config(io_uring: bool) -> String {
    format!(
        "[tcp]\nio_uring = {io_uring}\n[[tcp.listeners]]\naddr = \"127.0.0.1:0\"\n\
         service = \"db\"\nidle_timeout = \"400ms\"\n"
    )
}

/// A connection that moves bytes every 100 ms outlives three idle timeouts;
/// one that moves none is closed, and counted as such.
fn idle_connections_are_closed_and_busy_ones_are_not(io_uring: bool) {
    let (agent, _dir) = agent_with(&idle_config(io_uring));
    let c = agent.client();
    let a = Echo::start("a");
    place(&c, &[("n1", &a.name, a.addr.port())]);

    let mut idle = connect(agent.tcp[0]);
    assert_eq!(greeting(&mut idle), "a");
    let mut busy = connect(agent.tcp[0]);
    assert_eq!(greeting(&mut busy), "a");
    for i in 0..12u8 {
        busy.write_all(&[i]).expect("write while busy");
        let mut echo = [0u8; 1];
        busy.read_exact(&mut echo)
            .unwrap_or_else(|e| panic!("busy connection cut after {i} round trips: {e}"));
        assert_eq!(echo, [i]);
        // The client's pace, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = read_until_closed(
        &mut idle,
        "an idle connection still open 15 s after its 400 ms timeout",
    );
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the idle close counted", Duration::from_secs(10), || {
        let metrics = c.get_ok("/metrics").body;
        metrics
            .lines()
            .any(|l| l.contains("outcome=\"idle_timeout\"} 1"))
            .then_some(())
    });
    let via = if io_uring { "io_uring" } else { "copy" };
    assert_eq!(
        c.metric(&format!(
            "switchyard_proxy_tcp_relays_total{{via=\"{via}\"}}"
        )),
        Some(2.0),
        "both connections were relayed {via}"
    );
}

#[test]
fn idle_l4_connections_are_closed_and_busy_ones_are_not_through_io_uring() {
    idle_connections_are_closed_and_busy_ones_are_not(true);
}

#[test]
fn idle_l4_connections_are_closed_and_busy_ones_are_not_through_recv_and_send() {
    idle_connections_are_closed_and_busy_ones_are_not(false);
}

#[test]
fn l4_half_close_through_recv_and_send() {
    let (agent, _dir) = agent_with(&idle_config(false).replace("400ms", "10m"));
    let c = agent.client();
    let a = Echo::start("a");
    place(&c, &[("n1", &a.name, a.addr.port())]);
    for _ in 0..3 {
        assert_eq!(session(agent.tcp[0]), "a");
    }
    assert_eq!(
        c.metric("switchyard_proxy_tcp_relays_total{via=\"copy\"}"),
        Some(3.0)
    );
}

/// SIGTERM with an L4 connection open: it keeps working through the grace
/// period, is cut at its end, and the agent exits 0 (the ring it was relayed
/// through is torn down with an operation in flight on each side).
fn sigterm_with_an_l4_connection_open(io_uring: bool) {
    let (agent, _dir) = agent_with(&format!(
        "[http]\nshutdown_grace = \"1500ms\"\n{}",
        idle_config(io_uring).replace("400ms", "10m")
    ));
    let c = agent.client();
    let a = Echo::start("a");
    place(&c, &[("n1", &a.name, a.addr.port())]);
    let mut open = connect(agent.tcp[0]);
    assert_eq!(greeting(&mut open), "a");
    let via = if io_uring { "io_uring" } else { "copy" };
    assert_eq!(
        c.metric(&format!(
            "switchyard_proxy_tcp_relays_total{{via=\"{via}\"}}"
        )),
        Some(1.0)
    );
    agent.signal("TERM");
    // The listeners close at once (new clients are refused, not queued);
    // the open connection still carries bytes.
    eventually(
        "the L4 and HTTP listeners closed",
        Duration::from_secs(10),
        || {
            let refused = |addr| TcpStream::connect(addr).is_err();
            (refused(agent.tcp[0]) && refused(agent.http)).then_some(())
        },
    );
    open.write_all(b"still").expect("write during the grace");
    let mut echo = [0u8; 5];
    if let Err(e) = open.read_exact(&mut echo) {
        panic!(
            "no echo during the grace ({e}); agent log:\n{}",
            agent.stderr()
        );
    }
    assert_eq!(&echo, b"still");
    read_until_closed(&mut open, "the connection outlived the 1.5 s grace by 15 s");
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_lets_an_l4_connection_through_io_uring_work_through_the_grace_then_exits_0() {
    sigterm_with_an_l4_connection_open(true);
}

#[test]
fn sigterm_lets_an_l4_connection_through_recv_and_send_work_through_the_grace_then_exits_0() {
    sigterm_with_an_l4_connection_open(false);
}
