//! The agent's own lifecycle under traffic: SIGTERM lets work in progress
//! finish and closes idle connections.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::drain::keep_alive_get;
use crate::proxy::{agent_with, register, Upstream};
use crate::support::{eventually, Agent};

/// An agent routing to one upstream, and a keep-alive connection to it that
/// has served one request and is now idle (with its read buffer).
fn with_an_idle_connection() -> (Agent, tempfile::TempDir, Upstream, TcpStream, Vec<u8>) {
    let (agent, dir) = agent_with("[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    let mut idle = TcpStream::connect(agent.http).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = Vec::new();
    let (status, _) = keep_alive_get(&mut idle, &mut buf).expect("first request");
    assert_eq!(status, 200);
    (agent, dir, up, idle, buf)
}

#[test]
fn sigterm_finishes_requests_in_progress_and_closes_idle_connections() {
    let (agent, _dir, up, mut idle, _buf) = with_an_idle_connection();

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

/// A keep-alive connection idle when SIGTERM arrives whose client sends its
/// next request a moment later (as every client under load does) gets it
/// served with `Connection: close`: closing it at once would lose that
/// request.
#[test]
fn an_idle_keep_alive_connection_that_sends_right_after_sigterm_is_served() {
    let (agent, _dir, _up, mut idle, mut buf) = with_an_idle_connection();

    agent.signal("TERM");
    eventually(
        "both proxy threads stop accepting",
        Duration::from_secs(10),
        || {
            (agent
                .stderr()
                .matches("proxy thread stopped accepting")
                .count()
                == 2)
                .then_some(())
        },
    );
    let reply = keep_alive_get(&mut idle, &mut buf);
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert_eq!(reply, Some((200, "web1".to_string())), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    let exit = agent.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");
}

/// A connection the agent accepted before SIGTERM has a request on its way:
/// it is served (with `Connection: close`), not closed as idle, although it
/// arrives once the proxy has stopped accepting.
#[test]
fn a_connection_accepted_before_sigterm_gets_its_first_request_served() {
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    let mut early = TcpStream::connect(agent.http).expect("connect");
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    eventually(
        "the connection is accepted",
        Duration::from_secs(10),
        || (c.metric("switchyard_proxy_client_connections") >= Some(1.0)).then_some(()),
    );
    agent.signal("TERM");
    eventually(
        "both proxy threads stop accepting",
        Duration::from_secs(10),
        || (agent.stderr().matches("stopped accepting").count() == 2).then_some(()),
    );
    let mut buf = Vec::new();
    let answer = keep_alive_get(&mut early, &mut buf);
    assert_eq!(
        answer.map(|(status, _)| status),
        Some(200),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        String::from_utf8_lossy(&buf)
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
}

fn route_to(service: &str) -> String {
    format!(
        "[http]\nresponse_timeout = \"{}s\"\n[[http.routes]]\nhost = \"x\"\nservice = \"{service}\"\n",
        if service == "one" { 30 } else { 20 }
    )
}

#[test]
fn reloads_under_keep_alive_load_fail_nothing_and_a_bad_one_changes_nothing() {
    let (agent, dir) = agent_with(&route_to("one"));
    let config = dir.path().join("agent.toml");
    let c = agent.client();
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    register(&c, "one", &[&one], &[]);
    register(&c, "two", &[&two], &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let http = agent.http;
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            std::thread::spawn(move || {
                // One connection for the whole run: a reset would show here.
                let mut stream = TcpStream::connect(http).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut buf = Vec::new();
                let mut served = 0;
                // Bounded: at most 20,000 requests per client.
                while !stop.load(Ordering::SeqCst) && served < 20_000 {
                    match keep_alive_get_host(&mut stream, &mut buf, "x") {
                        Some((200, _)) => served += 1,
                        other => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            eprintln!("failed under reload: {other:?}");
                            return;
                        }
                    }
                }
            })
        })
        .collect();

    let backend = |host: &str| {
        let reply = crate::proxy::get(http, host, "/");
        (reply.status == 200).then_some(reply.body)
    };
    for round in 0..20 {
        let target = if round % 2 == 0 { "two" } else { "one" };
        std::fs::write(&config, route_to(target)).expect("write config");
        agent.signal("HUP");
        eventually(
            &format!("reload {round} routes x to {target}"),
            Duration::from_secs(10),
            || (backend("x").as_deref() == Some(target)).then_some(()),
        );
    }
    // Now routed to "one". A bad file is refused with its line, and changes nothing.
    std::fs::write(&config, "[http]\nretries = \"many\"\n").expect("write bad config");
    agent.signal("HUP");
    eventually("the refusal is logged", Duration::from_secs(10), || {
        agent
            .stderr()
            .contains("configuration reload refused")
            .then_some(())
    });
    let log = agent.stderr();
    assert!(log.contains("line 2"), "the error names the line: {log}");
    // A change that needs a restart is refused whole too.
    std::fs::write(
        &config,
        format!("{}[dns]\nnode_ttl = \"5s\"\n", route_to("two")),
    )
    .expect("write config");
    agent.signal("HUP");
    eventually(
        "the second refusal is logged",
        Duration::from_secs(10),
        || {
            (agent
                .stderr()
                .matches("configuration reload refused")
                .count()
                == 2)
                .then_some(())
        },
    );
    assert!(agent.stderr().contains("[dns] changed"));
    for _ in 0..10 {
        assert_eq!(backend("x").as_deref(), Some("one"), "the old routes stay");
    }

    stop.store(true, Ordering::SeqCst);
    for thread in load {
        thread.join().expect("load thread");
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no request failed across 20 reloads"
    );
}

/// One keep-alive GET with a Host header; `(status, body)`.
fn keep_alive_get_host(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    host: &str,
) -> Option<(u16, String)> {
    use std::io::Write;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .ok()?;
    crate::drain::read_response(stream, buf)
}

/// Keep-alive GETs until `stop`; a reused connection closed before any
/// response byte is reopened (what HTTP clients do with idle connections);
/// anything else counts as a failure. Returns (served, failures).
fn client_loop(
    http: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    fresh_each: bool,
) -> (usize, usize) {
    let connect = || {
        let s = TcpStream::connect(http)
            .map_err(|e| eprintln!("connect: {e}"))
            .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        Some(s)
    };
    let (mut served, mut failures) = (0, 0);
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::new();
    // Bounded: at most 50,000 requests.
    while !stop.load(Ordering::SeqCst) && served + failures < 50_000 {
        let reused = stream.is_some() && !fresh_each;
        let mut conn = match stream.take().filter(|_| !fresh_each).or_else(connect) {
            Some(conn) => conn,
            None => {
                failures += 1;
                eprintln!("connect failed");
                continue;
            }
        };
        match keep_alive_get_host(&mut conn, &mut buf, "x") {
            Some((200, _)) => {
                served += 1;
                let closing = String::from_utf8_lossy(&buf)
                    .to_ascii_lowercase()
                    .contains("connection: close");
                if !closing {
                    stream = Some(conn);
                }
            }
            None if reused && buf.is_empty() => {} // idle connection closed: reopen
            other => {
                failures += 1;
                eprintln!(
                    "request failed: {other:?} {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
        }
    }
    (served, failures)
}

/// `client_loop`s through `http`, one per entry of `fresh_each`, until `finish`.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, usize)>>,
}

impl Load {
    fn start(http: std::net::SocketAddr, fresh_each: &[bool]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = fresh_each
            .iter()
            .map(|&fresh| {
                let stop = stop.clone();
                std::thread::spawn(move || client_loop(http, stop, fresh))
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients; the number of requests that failed.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = 0;
        for thread in self.threads {
            let (served, failed) = thread.join().expect("load thread");
            assert!(served > 0);
            failures += failed;
        }
        failures
    }
}

/// A data directory and config file to start an agent from, and its
/// successors with the same arguments plus `--upgrade`.
struct Upgradable {
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl Upgradable {
    fn new(config: &str) -> Upgradable {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).expect("write config");
        Upgradable {
            data: dir.path().join("data"),
            config: path,
            dir,
        }
    }

    fn args(&self) -> Vec<&str> {
        let config = self.config.to_str().expect("utf8");
        vec!["--config", config, "--proxy-threads", "2"]
    }

    fn start(&self) -> Agent {
        Agent::start_in(&self.data, &self.args())
    }

    /// `agent --upgrade`: returns once the successor serves.
    fn successor(&self) -> Agent {
        let mut args = self.args();
        args.push("--upgrade");
        Agent::start_in(&self.data, &args)
    }
}

#[test]
fn an_upgrade_takes_every_listener_and_the_store_without_failing_a_request() {
    let setup = Upgradable::new(
        "[[http.routes]]\nhost = \"x\"\nservice = \"web\"\n[[tcp.listeners]]\naddr = \"127.0.0.1:0\"\nservice = \"web\"\n\
         [xds]\naddr = \"127.0.0.1:0\"\n",
    );
    let old = setup.start();
    let c = old.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    let index_before = c.get_ok("/v1/switchyard/status").json()["index"]
        .as_u64()
        .expect("index");

    let load = Load::start(old.http, &[false, true, false]);
    eventually("load is flowing", Duration::from_secs(10), || {
        (up.served() > 200).then_some(())
    });

    let new = setup.successor();
    assert_eq!(new.api, old.api, "the API listener was handed over");
    assert_eq!(new.http, old.http);
    assert_eq!(new.dns, old.dns);
    assert_eq!(new.tcp, old.tcp);
    assert!(old.xds.is_some());
    assert_eq!(new.xds, old.xds, "the xDS listener was handed over");
    let old_exit = old.wait_exit(Duration::from_secs(30));
    assert!(old_exit.success(), "the old agent exits 0: {old_exit:?}");

    // The new agent has the catalog and serves every protocol on the same ports.
    let c = new.client();
    let status = c.get_ok("/v1/switchyard/status").json();
    assert!(status["index"].as_u64().expect("index") >= index_before);
    let served_at_switch = up.served();
    eventually("the new agent proxies", Duration::from_secs(10), || {
        (up.served() > served_at_switch + 200).then_some(())
    });
    let mut l4 = TcpStream::connect(new.tcp[0]).expect("L4 listener");
    l4.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = Vec::new();
    let (code, body) = keep_alive_get_host(&mut l4, &mut buf, "x").expect("through L4");
    assert_eq!((code, body.as_str()), (200, "web1"));
    let registered = c.put(
        "/v1/agent/service/register",
        r#"{"Name":"after","ID":"after-1","Port":1}"#,
    );
    assert_eq!(
        registered.status, 200,
        "the new agent owns the store: {}",
        registered.body
    );

    let failures = load.finish();
    assert_eq!(failures, 0, "no request failed across the upgrade");
}

/// A successor that takes the sockets and the store, then fails before it
/// serves (here: its metrics address is taken), leaves the old agent
/// serving: it reopens the store, serves the API, DNS and proxy again on the
/// same sockets, loses no request, and can still be upgraded after.
#[test]
fn a_successor_that_fails_after_taking_the_sockets_leaves_the_old_agent_serving() {
    let routes = "[[http.routes]]\nhost = \"x\"\nservice = \"web\"\n";
    let setup = Upgradable::new(routes);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let bad = setup.dir.path().join("bad.toml");
    let metrics = taken.local_addr().expect("addr");
    std::fs::write(
        &bad,
        format!("[api]\nmetrics_addr = \"{metrics}\"\n{routes}"),
    )
    .expect("write config");
    let old = setup.start();
    let c = old.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    let load = Load::start(old.http, &[false, true]);
    eventually("load is flowing", Duration::from_secs(10), || {
        (up.served() > 200).then_some(())
    });

    let mut successor = std::process::Command::new(crate::support::bin())
        .args(["agent", "--node-name", "test-node", "--data-dir"])
        .arg(&setup.data)
        .args([
            "--config",
            bad.to_str().expect("utf8"),
            "--proxy-threads",
            "2",
            "--upgrade",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the successor");
    let status = eventually("the successor fails", Duration::from_secs(60), || {
        successor.try_wait().expect("wait")
    });
    assert!(!status.success(), "the successor cannot serve: {status:?}");

    // The old agent serves again: its API answers and it owns the store.
    let registered = c.put(
        "/v1/agent/service/register",
        r#"{"Name":"after","ID":"after-1","Port":1}"#,
    );
    assert_eq!(registered.status, 200, "{}", registered.body);
    let served_then = up.served();
    eventually("the old agent proxies on", Duration::from_secs(10), || {
        (up.served() > served_then + 200).then_some(())
    });
    assert!(
        old.stderr()
            .contains("serving again after the failed upgrade"),
        "{}",
        old.stderr()
    );
    drop(taken);

    // And a good successor still takes over from it.
    let new = setup.successor();
    assert_eq!(new.http, old.http);
    let old_exit = old.wait_exit(Duration::from_secs(30));
    assert!(old_exit.success(), "the old agent exits 0: {old_exit:?}");
    let services = new.client().get_ok("/v1/catalog/services").json();
    assert!(services.get("after").is_some(), "{services}");
    let failures = load.finish();
    assert_eq!(failures, 0, "no request failed across both attempts");
}

/// A successor that took the sockets and serves, but dies before it says
/// `ready` (a crash at the worst moment): it took no connection, since an
/// upgrading agent accepts nothing before then, so the old agent served
/// every request, and it serves on afterwards.
#[test]
fn a_successor_that_dies_before_ready_drops_no_connection() {
    let routes = "[[http.routes]]\nhost = \"x\"\nservice = \"web\"\n";
    let setup = Upgradable::new(routes);
    let old = setup.start();
    let c = old.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    // Fresh connections too: those are what a successor's accept would take.
    let load = Load::start(old.http, &[false, true]);
    eventually("load is flowing", Duration::from_secs(10), || {
        (up.served() > 200).then_some(())
    });
    let log = setup.dir.path().join("successor.log");
    let mut successor = std::process::Command::new(crate::support::bin())
        .args(["agent", "--node-name", "test-node", "--data-dir"])
        .arg(&setup.data)
        .args(setup.args())
        .arg("--upgrade")
        .env("SWITCHYARD_TEST_DIE_BEFORE_READY_MS", "1000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("successor log"))
        .spawn()
        .expect("spawn the successor");
    let status = eventually("the successor dies", Duration::from_secs(60), || {
        successor.try_wait().expect("wait")
    });
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.code() == Some(1) && said.contains("exiting before ready"),
        "it died by the hook, serving: {status:?}\n{said}"
    );
    // The old agent resumes: its API and store again, the same sockets.
    eventually(
        "the old agent serves again",
        Duration::from_secs(30),
        || {
            old.stderr()
                .contains("serving again after the failed upgrade")
                .then_some(())
        },
    );
    let registered = c.put(
        "/v1/agent/service/register",
        r#"{"Name":"after","ID":"after-1","Port":1}"#,
    );
    assert_eq!(registered.status, 200, "{}", registered.body);
    let served_then = up.served();
    eventually("the old agent proxies on", Duration::from_secs(10), || {
        (up.served() > served_then + 200).then_some(())
    });
    let failures = load.finish();
    assert_eq!(
        failures, 0,
        "no request failed, none was left with the dead successor"
    );
}

/// HTTP/2 clients keep streams in flight through two upgrades, reconnecting
/// when a connection ends. A stream may fail (one sent after the final GOAWAY
/// is refused unprocessed, which a client may retry), but none the backend
/// served is lost: every request that reached it got its whole response.
#[test]
fn http2_streams_across_upgrades_complete_or_never_reach_a_backend() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let setup = Upgradable::new("[[http.routes]]\nservice = \"web\"\n");
    let mut agent = setup.start();
    let up = Upstream::start("web1");
    register(&agent.client(), "web", &[&up], &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let http = agent.http;
    let clients = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(stream) = tokio::net::TcpStream::connect(http).await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let Ok((sender, connection)) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(stream),
                    )
                    .await
                    else {
                        continue;
                    };
                    tokio::spawn(connection);
                    let streams: Vec<_> = (0..8)
                        .map(|_| {
                            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                            let mut sender = sender.clone();
                            tokio::spawn(async move {
                                while !stop.load(Ordering::SeqCst) {
                                    let request = hyper::Request::builder()
                                        .uri("http://x/")
                                        .body(Empty::<Bytes>::new())
                                        .expect("request");
                                    let Ok(response) = sender.send_request(request).await else {
                                        failed.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    };
                                    let status = response.status();
                                    let body = response.into_body().collect().await;
                                    let whole = body.map(|b| b.to_bytes());
                                    if status == 200 && whole.as_deref().ok() == Some(b"web1") {
                                        ok.fetch_add(1, Ordering::SeqCst);
                                    } else {
                                        failed.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    }
                                }
                            })
                        })
                        .collect();
                    for stream in streams {
                        let _ = stream.await;
                    }
                }
            });
        })
    };
    for round in 0..2 {
        let before = ok.load(Ordering::SeqCst);
        eventually(
            &format!("HTTP/2 load flows ({round})"),
            Duration::from_secs(10),
            || (ok.load(Ordering::SeqCst) > before + 500).then_some(()),
        );
        let next = setup.successor();
        let exit = agent.wait_exit(Duration::from_secs(30));
        assert!(exit.success(), "the old agent exits 0: {exit:?}");
        agent = next;
    }
    let before = ok.load(Ordering::SeqCst);
    eventually(
        "HTTP/2 load flows after the upgrades",
        Duration::from_secs(10),
        || (ok.load(Ordering::SeqCst) > before + 500).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    clients.join().expect("clients");
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("HTTP/2 across 2 upgrades: {ok} completed, {failed} failed");
    assert_eq!(
        up.served(),
        ok,
        "every request the backend served was answered in full ({failed} failed unserved)"
    );
}

/// Reads service-manager notifications until one satisfies `wanted`.
fn notification(
    socket: &std::os::unix::net::UnixDatagram,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            Instant::now() < deadline,
            "no such notification within 30 s"
        );
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).to_string();
            if wanted(&message) {
                return message;
            }
        }
    }
}

fn main_pid(message: &str) -> Option<u32> {
    message
        .lines()
        .find_map(|line| line.strip_prefix("MAINPID="))
        .and_then(|pid| pid.parse().ok())
}

/// SIGKILLs a process this test did not spawn, if the test ends first.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !exited(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The upgrade a service manager can follow: on SIGUSR2 the agent starts its
/// successor (same binary path and arguments, plus `--upgrade`), which takes
/// every listener and tells systemd (`NOTIFY_SOCKET`) it is the main process
/// now; the old one exits 0 and no request fails.
#[test]
fn sigusr2_upgrades_in_place_and_tells_the_service_manager() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[[http.routes]]\nhost = \"x\"\nservice = \"web\"\n",
    )
    .expect("write config");
    let socket_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let args = [
        "--config",
        config.to_str().expect("utf8"),
        "--proxy-threads",
        "1",
    ];
    let old = Agent::start_in_env(
        &dir.path().join("data"),
        &args,
        &[("NOTIFY_SOCKET", &socket_path)],
    );
    let ready = notification(&notify, |m| m.contains("READY=1"));
    assert_eq!(main_pid(&ready), Some(old.pid()), "{ready}");
    let c = old.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);
    // A reload is bracketed, so `systemctl reload` returns when it is done.
    old.signal("HUP");
    let reloading = notification(&notify, |m| m.contains("RELOADING=1"));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notification(&notify, |m| m.contains("READY=1"));

    let load = Load::start(old.http, &[false, true]);
    eventually("load is flowing", Duration::from_secs(10), || {
        (up.served() > 200).then_some(())
    });

    // A successor that cannot start (it refuses the config) leaves the old
    // agent serving, and a later SIGUSR2 may try again.
    let good = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&config, "[http\n").expect("break config");
    old.signal("USR2");
    eventually(
        "the failed successor is reported",
        Duration::from_secs(20),
        || {
            old.stderr()
                .contains("the successor agent exited")
                .then_some(())
        },
    );
    std::fs::write(&config, good).expect("restore config");
    let served_after_failure = up.served();
    eventually(
        "the old agent still proxies",
        Duration::from_secs(10),
        || (up.served() > served_after_failure + 100).then_some(()),
    );

    let old_pid = old.pid();
    old.signal("USR2");
    let taken = notification(&notify, |m| {
        m.contains("READY=1") && main_pid(m).is_some_and(|pid| pid != old_pid)
    });
    let new_pid = main_pid(&taken).expect("successor pid");
    let _reaper = KillOnDrop(new_pid);
    let old_exit = old.wait_exit(Duration::from_secs(30));
    assert!(old_exit.success(), "the old agent exits 0: {old_exit:?}");
    assert!(!exited(new_pid), "the successor serves");
    let served_at_switch = up.served();
    eventually("the successor proxies", Duration::from_secs(10), || {
        (up.served() > served_at_switch + 200).then_some(())
    });
    let failures = load.finish();

    // The successor is not this test's child: stop it by its PID.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    notification(&notify, |m| m.contains("STOPPING=1"));
    eventually("the successor exits", Duration::from_secs(20), || {
        exited(new_pid).then_some(())
    });
    assert_eq!(failures, 0, "no request failed across the upgrade");
}

#[test]
fn https_connections_mid_handshake_or_before_their_first_request_are_served_at_sigterm() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = crate::proxy::TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let (agent, _dir) = agent_with(&format!(
        "{}[[http.routes]]\nservice = \"web\"\n",
        pki.https_listener(certs.path(), "a.test")
    ));
    let https = agent.https.expect("an https address in the ready line");
    let c = agent.client();
    let up = Upstream::start("web1");
    register(&c, "web", &[&up], &[]);

    let connector = pki.connector(b"http/1.1");
    let name = || rustls::pki_types::ServerName::try_from("a.test").expect("name");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // One connection accepted but not yet past its TLS handshake, one
        // past it that has not sent a request.
        let mid_handshake = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        let mut ready = connector.connect(name(), tcp).await.expect("TLS handshake");
        eventually(
            "both connections are accepted",
            Duration::from_secs(10),
            || (c.metric("switchyard_proxy_client_connections") >= Some(2.0)).then_some(()),
        );
        agent.signal("TERM");
        eventually(
            "both proxy threads stop accepting",
            Duration::from_secs(10),
            || (agent.stderr().matches("stopped accepting").count() == 2).then_some(()),
        );
        let mut late = connector
            .connect(name(), mid_handshake)
            .await
            .expect("the handshake begun before SIGTERM completes");
        for (what, tls) in [
            ("after its handshake", &mut ready),
            ("mid-handshake", &mut late),
        ] {
            tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await
                .expect("send request");
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
                .await
                .expect("the agent answers and closes within 10 s");
            let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            assert!(read.is_ok() || !answer.is_empty(), "{what}: {read:?}");
            assert!(text.starts_with("http/1.1 200"), "{what}: {text:?}");
            assert!(text.contains("connection: close"), "{what}: {text:?}");
            assert!(text.ends_with("web1"), "{what}: {text:?}");
        }
    });
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
}
