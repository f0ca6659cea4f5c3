//! Connection hygiene (issue 26): the API closes idle, slow-head and
//! slow-body connections at their limits and leaves a waiting blocking
//! query alone; without a token a connection gets only its head time; and a
//! flood on the API, capped by its share of the descriptor budget, leaves
//! DNS (UDP and TCP) and the proxy serving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::dns::{ask, Via};
use crate::proxy::agent_with;
use crate::support::{eventually, Client};

/// Reads until the peer closes (or 30 s pass); what arrived, and when the
/// close came after `since`.
fn until_closed(stream: &mut TcpStream, since: Instant) -> (String, Duration) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (String::from_utf8_lossy(&got).into_owned(), since.elapsed())
}

fn api_addr(api: &str) -> SocketAddr {
    api.trim_start_matches("http://").parse().expect("api addr")
}

fn metric(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
}

#[test]
fn api_connections_are_closed_at_their_time_limits() {
    let (agent, _dir) =
        agent_with("[api]\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"\nmin_body_rate = 1000\n");
    let addr = api_addr(&agent.api);

    // A head that never ends: 408 at the header timeout.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    let (got, after) = until_closed(&mut slow, started);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    assert!(got.contains("api.header_timeout"), "{got:?}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    // A connection that sends nothing is closed too.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).expect("connect");
    let (_, after) = until_closed(&mut silent, started);
    assert!(
        after < Duration::from_secs(25),
        "still open after {after:?}"
    );

    // Served, then idle: kept past the head limit, closed at the idle one.
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.write_all(b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut buf = Vec::new();
    let answer = crate::drain::read_response(&mut idle, &mut buf).expect("a response");
    assert_eq!(answer.0, 200);
    let served = Instant::now();
    let (_, after) = until_closed(&mut idle, served);
    assert!(
        after >= Duration::from_millis(2500),
        "an idle keep-alive connection was closed after {after:?}, before api.idle_timeout (3 s)"
    );

    // A body that trickles in below min_body_rate: 408 once the grace is over.
    let started = Instant::now();
    let mut trickle = TcpStream::connect(addr).expect("connect");
    trickle
        .write_all(
            b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",
        )
        .expect("send");
    trickle
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut got = Vec::new();
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a body at 5 bytes/s still accepted after 20 s"
        );
        if trickle.write_all(b"\"a\":1").is_err() {
            break true;
        }
        let mut chunk = [0u8; 512];
        match trickle.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    };
    assert!(closed);
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got:?}");

    // A blocking query waits longer than every limit above and is answered.
    let client = Client::new(&agent.api);
    let index = client.get("/v1/catalog/services").index;
    let started = Instant::now();
    let waited = client.get(&format!("/v1/catalog/services?index={index}&wait=5s"));
    assert_eq!(waited.status, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the wait was cut"
    );

    let metrics = client.get("/metrics").body;
    let timed_out = |reason: &str| {
        metric(
            &metrics,
            &format!(
                "switchyard_api_connections_timed_out_total{{listener=\"api\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert!(timed_out("header_timeout") >= 2.0, "{metrics}");
    assert!(timed_out("idle_timeout") >= 1.0, "{metrics}");
    assert!(timed_out("min_body_rate") >= 1.0, "{metrics}");
}

#[test]
fn without_a_token_a_connection_gets_only_its_head_time() {
    let config = format!(
        "{}[api]\nheader_timeout = \"1s\"\nidle_timeout = \"30s\"\n",
        crate::security::config()
    );
    let (agent, _dir) = agent_with(&config);
    let addr = api_addr(&agent.api);
    let request = |token: &str| {
        format!("GET /v1/agent/self HTTP/1.1\r\nHost: x\r\nX-Consul-Token: {token}\r\n\r\n")
    };

    // A refused request, then silence: closed at the head time.
    let started = Instant::now();
    let mut stranger = TcpStream::connect(addr).expect("connect");
    stranger
        .write_all(request("not-a-token-0123456789").as_bytes())
        .expect("send");
    let (got, after) = until_closed(&mut stranger, started);
    assert!(got.starts_with("HTTP/1.1 401"), "{got:?}");
    assert!(after < Duration::from_secs(20), "held for {after:?}");

    // With a valid token the connection is kept between requests.
    let mut known = TcpStream::connect(addr).expect("connect");
    let mut buf = Vec::new();
    known
        .write_all(request(crate::security::READ).as_bytes())
        .expect("send");
    let first = crate::drain::read_response(&mut known, &mut buf).expect("response");
    assert_eq!(first.0, 200);
    std::thread::sleep(Duration::from_millis(2500));
    known
        .write_all(request(crate::security::READ).as_bytes())
        .expect("send again");
    let second = crate::drain::read_response(&mut known, &mut buf)
        .expect("the authenticated connection still open after the head time");
    assert_eq!(second.0, 200);
}

/// The API flooded with connections from many client addresses: the flood
/// meets the API's share of the descriptor budget (refused with 503), and
/// DNS over UDP and TCP and the proxy go on answering; once it ends the API
/// serves again. The agent runs under `ulimit -n 1024`, and the flood is
/// larger than that where this process may open that many.
#[test]
fn a_flood_of_api_connections_leaves_dns_and_the_proxy_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[api]\nmax_connections_per_client = 8\n").expect("config");
    let (_child, ready) = crate::security::agent_under_ulimit(
        "-n 1024",
        dir.path(),
        &dir.path().join("stderr"),
        &format!("--config {}", config.display()),
    );
    let api = ready["api_url"].as_str().expect("api").to_string();
    let addr = api_addr(&api);
    let dns: SocketAddr = ready["dns"].as_str().expect("dns").parse().expect("addr");
    let http: SocketAddr = ready["http"].as_str().expect("http").parse().expect("addr");

    // Connections from many loopback addresses, 8 each (the per-client
    // cap); this process needs the descriptors for them.
    let own = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: own.maximum,
            maximum: own.maximum,
        },
    );
    let room = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    // Up to 1,200 (past the agent's 1,024 descriptors), fewer where this
    // process may open fewer; always well past the API's share (208).
    let count = 1200u32.min(u32::try_from(room.saturating_sub(150)).unwrap_or(u32::MAX));
    assert!(
        count >= 500,
        "this test opens hundreds of connections: raise the hard open-file limit (now {room})"
    );
    let mut flood = Vec::new();
    for i in 0..count {
        if i == 8 {
            // A ninth connection from one address is refused with 429.
            let extra = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            extra
                .bind(&SocketAddr::from(([127, 1, 0, 2], 0)).into())
                .expect("bind");
            extra.connect(&addr.into()).expect("connect");
            let (got, _) = until_closed(&mut TcpStream::from(extra), Instant::now());
            assert!(got.starts_with("HTTP/1.1 429"), "{got:?}");
        }
        let source: SocketAddr = ([127, 1, (i / 8 / 250) as u8, (i / 8 % 250 + 2) as u8], 0).into();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&source.into()).expect("bind a loopback source");
        if socket.connect(&addr.into()).is_ok() {
            flood.push(std::net::TcpStream::from(socket));
        }
    }
    // A new API connection meets the API's cap: 503, at once.
    let (got, _) = until_closed(
        &mut TcpStream::connect(addr).expect("connect"),
        Instant::now(),
    );
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("api.max_connections"),
        "{got:?}"
    );

    // DNS over UDP and TCP and the proxy still answer.
    for via in [Via::Udp, Via::Tcp] {
        let (answer, _) = ask(dns, "consul.", RecordType::SOA, None, via);
        assert_eq!(answer.answers.len(), 1, "{via:?}: {answer:?}");
    }
    let proxied = crate::proxy::get(http, "no-such-host.example", "/");
    assert_eq!(proxied.status, 404, "the proxy answers its own no-route");

    // The flood ends: the API serves again.
    drop(flood);
    let client = Client::new(&api);
    let metrics = eventually("the API answers again", Duration::from_secs(20), || {
        let answer = client.get("/metrics");
        (answer.status == 200).then_some(answer.body)
    });
    let refused = |reason: &str| {
        metric(
            &metrics,
            &format!(
                "switchyard_api_connections_refused_total{{listener=\"api\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert!(refused("connection_limit") >= 1.0, "{metrics}");
    assert!(refused("client_connection_limit") >= 1.0, "{metrics}");
}

/// An HTTP/2 connection to the proxy that opens and asks nothing is closed
/// at `http.header_timeout`; one that was served, at `http.idle_timeout`
/// (each with a GOAWAY first). Before, both were held forever.
#[test]
fn idle_http2_connections_to_the_proxy_are_closed() {
    let (agent, _dir) = agent_with(
        "[http]\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"\n\
         [[http.routes]]\nhost = \"h2.test\"\nservice = \"web\"\n",
    );
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

    let started = Instant::now();
    let mut silent = TcpStream::connect(agent.http).expect("connect");
    silent.write_all(PREFACE).expect("preface");
    let (_, after) = until_closed(&mut silent, started);
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(20),
        "closed after {after:?}"
    );

    // One request (HEADERS with END_STREAM, HPACK literals), answered, then silence.
    let mut served = TcpStream::connect(agent.http).expect("connect");
    served.write_all(PREFACE).expect("preface");
    let mut block = vec![0x82, 0x87, 0x84]; // :method GET, :scheme https, :path /
    block.push(0x41); // :authority, literal with incremental indexing (name index 1)
    block.push(7);
    block.extend_from_slice(b"h2.test");
    let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    served.write_all(&frame).expect("request");
    served
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    // Frames until a HEADERS frame (type 1) on stream 1: the response.
    let answered = loop {
        match served.read(&mut chunk) {
            Ok(0) | Err(_) => break false,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
        let mut at = 0;
        let mut found = false;
        while at + 9 <= seen.len() {
            let len = (usize::from(seen[at]) << 16)
                | (usize::from(seen[at + 1]) << 8)
                | usize::from(seen[at + 2]);
            if seen[at + 3] == 1 && seen[at + 5..at + 9] == [0, 0, 0, 1] {
                found = true;
            }
            at += 9 + len;
        }
        if found {
            break true;
        }
    };
    assert!(answered, "no response on the HTTP/2 connection");
    let served_at = Instant::now();
    let (_, after) = until_closed(&mut served, served_at);
    assert!(
        after >= Duration::from_millis(2500) && after < Duration::from_secs(25),
        "a served HTTP/2 connection closed {after:?} after its answer (idle_timeout 3 s)"
    );
    let sent = agent
        .client()
        .metric("switchyard_proxy_h2_goaways_sent_total{reason=\"idle\"}");
    assert!(
        sent.is_some_and(|n| n >= 1.0),
        "idle GOAWAYs counted: {sent:?}"
    );
}

/// `http.h2.max_connection_age`: a busy HTTP/2 client connection gets a
/// GOAWAY once it is that old; its requests until then are answered, and
/// the client's next request goes on a new connection.
#[test]
fn http2_connections_are_sent_away_at_their_max_age() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let (agent, _dir) = agent_with(
        "[http.h2]\nmax_connection_age = \"1s\"\n\
         [[http.routes]]\nhost = \"age.test\"\nservice = \"web\"\n",
    );
    let c = agent.client();
    let up = crate::proxy::Upstream::start("a1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (answered, ended_after) = runtime.block_on(async {
        let (mut sender, connection) = crate::support::h2c(agent.http).await;
        let started = Instant::now();
        let mut answered = 0;
        while started.elapsed() < Duration::from_secs(15) && !connection.is_finished() {
            let request = hyper::Request::builder()
                .uri("http://age.test/")
                .body(Empty::<Bytes>::new())
                .expect("request");
            match sender.send_request(request).await {
                Ok(response) => {
                    assert_eq!(response.status(), 200);
                    let _ = response.into_body().collect().await;
                    answered += 1;
                }
                Err(_) => break,
            }
            // One request per 100 ms: a busy client, never idle for long.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (answered, started.elapsed())
    });
    assert!(
        answered >= 5,
        "only {answered} requests answered before the GOAWAY"
    );
    assert!(
        ended_after >= Duration::from_millis(900) && ended_after < Duration::from_secs(15),
        "the connection ended after {ended_after:?} (max_connection_age 1 s)"
    );
    let sent = agent
        .client()
        .metric("switchyard_proxy_h2_goaways_sent_total{reason=\"max_age\"}");
    assert!(
        sent.is_some_and(|n| n >= 1.0),
        "max-age GOAWAYs counted: {sent:?}"
    );
}

/// A request body fed from a channel, as slowly as the test sends.
struct Trickle(tokio::sync::mpsc::Receiver<hyper::body::Bytes>);

impl hyper::body::Body for Trickle {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// `http.min_body_rate` on the proxy: a request body trickled below it gets
/// 408 long before `body_timeout` (60 s), over HTTP/1.1 and over HTTP/2, and
/// the endpoint is not blamed; a body above it passes.
#[test]
fn a_request_body_below_the_minimum_rate_gets_408() {
    let up = crate::proxy::Upstream::start("up");
    let (agent, _dir) = agent_with(
        "[http]\nheader_timeout = \"1s\"\nmin_body_rate = 10000\n\
         [http.outlier]\nconsecutive_failures = 1\n\
         [[http.routes]]\nservice = \"web\"\n",
    );
    let c = agent.client();
    crate::proxy::register(&c, "web", &[&up], &[]);
    let post = |size: usize, piece: usize, every: Duration| {
        let started = Instant::now();
        let mut stream = TcpStream::connect(agent.http).expect("connect");
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).expect("head");
        let mut writer = stream.try_clone().expect("clone");
        let feed = std::thread::spawn(move || {
            let mut sent = 0;
            while sent < size {
                let n = piece.min(size - sent);
                if writer.write_all(&vec![b'x'; n]).is_err() {
                    return;
                }
                sent += n;
                std::thread::sleep(every);
            }
        });
        let (answer, after) = until_closed(&mut stream, started);
        let _ = feed.join();
        (answer, after)
    };
    // 1 KB/s against 10 KB/s, after the 1 s grace.
    let (answer, after) = post(20_000, 100, Duration::from_millis(100));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("min_body_rate"), "{answer}");
    assert!(after < Duration::from_secs(10), "cut after {after:?}");
    // 15 KB/s passes.
    let (answer, _) = post(30_000, 1500, Duration::from_millis(100));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // HTTP/2 (h2c): the same trickle on one stream.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = runtime.block_on(async {
        let (mut sender, _conn) = crate::support::h2c::<Trickle>(agent.http).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let request = hyper::Request::post("http://h/echo")
            .body(Trickle(rx))
            .expect("request");
        let feed = tokio::spawn(async move {
            for _ in 0..300 {
                if tx
                    .send(hyper::body::Bytes::from(vec![b'x'; 100]))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(15), sender.send_request(request))
            .await
            .unwrap_or_else(|_| panic!("no answer; agent said:\n{}", agent.stderr()))
            .expect("response");
        feed.abort();
        (response.status(), started.elapsed())
    });
    assert_eq!(status.0, 408, "over HTTP/2");
    assert!(
        status.1 < Duration::from_secs(10),
        "cut after {:?}",
        status.1
    );
    let metrics = c.get_ok("/metrics").body;
    assert!(
        metric(
            &metrics,
            "switchyard_proxy_rejected_total{reason=\"client_timeout\"}"
        ) >= 2.0,
        "both counted"
    );
    assert_eq!(
        c.metric("switchyard_proxy_ejections_total{endpoint=\"up\",node=\"n1\",service=\"web\"}"),
        Some(0.0),
        "the endpoint is not blamed (one failure would eject it)"
    );
}

/// Blocking queries whose clients go away are let go at once (hyper
/// notices the close while the query waits), not held until their wait ends.
#[test]
fn watchers_that_go_away_are_let_go() {
    let agent = crate::support::Agent::start();
    let c = agent.client();
    c.put_ok(
        "/v1/switchyard/batch",
        r#"{"nodes":[{"name":"n1","address":"10.0.0.1"}],"endpoints":[{"node":"n1","service":"web","id":"w1","port":80}]}"#,
    );
    let index = c.get_ok("/v1/health/service/web").index;
    let open = || c.metric("switchyard_api_connections{listener=\"api\"}");
    let base = open().expect("the gauge");
    let addr = api_addr(&agent.api);
    let watchers: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            let head = format!(
                "GET /v1/health/service/web?index={index}&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            s.write_all(head.as_bytes()).expect("blocking query");
            s
        })
        .collect();
    eventually("20 watchers waiting", Duration::from_secs(10), || {
        open().filter(|&n| n >= base + 20.0)
    });
    drop(watchers);
    eventually("the watchers let go", Duration::from_secs(5), || {
        open().filter(|&n| n <= base)
    });
}

/// Reads a response head alone (a HEAD answer has no body to read).
fn read_head(stream: &mut TcpStream) -> crate::proxy::Raw {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    crate::proxy::parse_raw(&head)
}

/// The API reads bodiless requests itself and hands a connection to hyper
/// at its first request with a body: on one connection, pipelined reads
/// are answered in order, HEAD carries the length and no body, a write with
/// a body is served and so is every request after it; `Connection: close`
/// closes after the answer, and a malformed head still gets its 400.
#[test]
fn one_api_connection_carries_reads_heads_and_writes_in_turn() {
    use crate::proxy::read_response;
    let agent = crate::support::Agent::start();
    let addr = api_addr(&agent.api);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    s.write_all(
        b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/catalog/services HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("two pipelined reads");
    let (first, body) = read_response(&mut s);
    assert_eq!(first.status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("\"Config\""),
        "agent/self first: {body:?}"
    );
    let (second, listed) = read_response(&mut s);
    assert_eq!(second.status, 200);
    assert!(second.headers.contains_key("x-consul-index"), "{second:?}");
    let services: serde_json::Value = serde_json::from_slice(&listed).expect("JSON");
    assert!(services.is_object(), "catalog/services second: {services}");

    s.write_all(b"HEAD /v1/catalog/services HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("HEAD");
    let head = read_head(&mut s);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.headers.get("content-length").map(String::as_str),
        Some(listed.len().to_string().as_str()),
        "HEAD declares the GET's length: {head:?}"
    );

    let register = r#"{"Name":"web","ID":"w1","Port":80}"#;
    s.write_all(
        format!(
            "PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{register}",
            register.len()
        )
        .as_bytes(),
    )
    .expect("a write with a body");
    let (registered, body) = read_response(&mut s);
    assert_eq!(registered.status, 200, "{body:?}");
    s.write_all(b"GET /v1/catalog/service/web HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("a read after the write");
    let (read, body) = read_response(&mut s);
    assert_eq!(read.status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("\"w1\""),
        "the same connection serves on: {body:?}"
    );

    let mut closing = TcpStream::connect(addr).expect("connect");
    closing
        .write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let (got, _) = until_closed(&mut closing, Instant::now());
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.contains("connection: close"), "{got:?}");

    let mut malformed = TcpStream::connect(addr).expect("connect");
    malformed
        .write_all(b"GET /v1/status/leader HTTP/1.1\r\nBad Name: y\r\n\r\n")
        .expect("send");
    let (got, _) = until_closed(&mut malformed, Instant::now());
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
}

/// HTTP/1.1 over TLS to the proxy: an idle keep-alive connection is kept
/// past `header_timeout` and closed at `idle_timeout`, and a head that never
/// ends is closed at `header_timeout` from its first byte (hyper's own
/// header timeout ran from the end of the last response and cut idle
/// connections at `header_timeout`).
#[test]
fn tls_http1_connections_to_the_proxy_keep_their_idle_and_head_limits() {
    use crate::proxy::{register, TestPki, Upstream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let (agent, _dir) = agent_with(&format!(
        "[http]\nheader_timeout = \"1s\"\nidle_timeout = \"4s\"\n{}\
         [[http.routes]]\nhost = \"a.test\"\nservice = \"web\"\n",
        pki.https_listener(certs.path(), "a.test")
    ));
    let https = agent.https.expect("an https address");
    let up = Upstream::start("web1");
    register(&agent.client(), "web", &[&up], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(https)
                .await
                .expect("connect");
            let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
            pki.connector(b"http/1.1")
                .connect(name, tcp)
                .await
                .expect("TLS handshake")
        };
        // Reads until the close; how long after `since` it came.
        let closed_after = |mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
                            since: Instant| async move {
            let mut sink = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(30), async {
                while let Ok(n) = tls.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            read.await.expect("the proxy closes the connection");
            since.elapsed()
        };

        let mut served = connect().await;
        served
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("request");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&got).ends_with("web1") {
            let n = served.read(&mut chunk).await.expect("response");
            assert!(n > 0, "closed before the answer: {got:?}");
            got.extend_from_slice(&chunk[..n]);
        }
        let after = closed_after(served, Instant::now()).await;
        assert!(
            after >= Duration::from_millis(3500) && after < Duration::from_secs(25),
            "an idle keep-alive TLS connection closed {after:?} after its answer (idle_timeout 4 s, header_timeout 1 s)"
        );

        let mut slow = connect().await;
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
            .await
            .expect("half a head");
        let after = closed_after(slow, Instant::now()).await;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_millis(3500),
            "a head that never ends closed after {after:?} (header_timeout 1 s)"
        );
    });
}
