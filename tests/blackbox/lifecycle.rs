//! The agent's own lifecycle under traffic: SIGTERM lets work in progress
//! finish and closes idle connections.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::drain::keep_alive_get;
use crate::proxy::{agent_with, Upstream};
use crate::support::eventually;

#[test]
fn sigterm_finishes_requests_in_progress_and_closes_idle_connections() {
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("web1");
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "web", "id": "web1", "address": "127.0.0.1",
                       "port": up.addr.port()}]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());

    // An idle keep-alive connection that has served one request.
    let mut idle = TcpStream::connect(agent.http).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = Vec::new();
    let (status, _) = keep_alive_get(&mut idle, &mut buf).expect("first request");
    assert_eq!(status, 200);

    // A slow request in progress when SIGTERM arrives.
    up.delay_ms.store(1500, Ordering::SeqCst);
    let http = agent.http;
    let slow = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(http).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = Vec::new();
        let reply = keep_alive_get(&mut stream, &mut buf);
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        (reply, text.contains("connection: close"))
    });
    eventually(
        "the slow request reaches the backend",
        Duration::from_secs(10),
        || (up.served() == 2).then_some(()),
    );
    let idle_closed = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let read = idle.read(&mut byte);
        (read.map_or(true, |n| n == 0), Instant::now())
    });

    let signalled = Instant::now();
    let exit = agent.terminate();
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");

    let (reply, told_to_close) = slow.join().expect("slow request thread");
    let (status, body) = reply.expect("the slow request got its response");
    assert_eq!((status, body.as_str()), (200, "web1"));
    assert!(told_to_close, "the last response says Connection: close");
    let (closed, at) = idle_closed.join().expect("idle thread");
    assert!(closed, "the idle connection was closed, not answered");
    assert!(
        at.duration_since(signalled) < Duration::from_secs(15),
        "the idle connection did not hold the shutdown"
    );
    assert!(
        TcpStream::connect(http).is_err(),
        "nothing listens after the exit"
    );
}
