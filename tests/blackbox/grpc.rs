//! gRPC through the L7 proxy (issue 27, first step): a gRPC call arriving
//! over HTTP/2 goes upstream over HTTP/2 (h2c) with no configuration,
//! balanced per call, with its trailers; a call the proxy cannot place is
//! answered as gRPC. The backends are gRPC-shaped h2c servers: they echo
//! the framed message and end with `grpc-status: 0` and metadata.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::proxy::agent_with;

/// A gRPC-shaped backend: h2c only, echoes the request body, trailers
/// `grpc-status: 0` and `x-served-by: NAME`.
struct Backend {
    name: String,
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    /// While set, every call ends with `grpc-status: 14` (UNAVAILABLE).
    failing: Arc<std::sync::atomic::AtomicBool>,
    /// While set, every call is answered trailers-only with `grpc-status:
    /// 14` at once, its message unread (an overloaded server).
    shedding: Arc<std::sync::atomic::AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Backend {
    fn start(name: &str) -> Backend {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shedding = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (who, counted, down, shed) = (
            name.to_string(),
            calls.clone(),
            failing.clone(),
            shedding.clone(),
        );
        let (addr, runtime) = serve_loopback(move |stream| {
            let (who, counted, down, shed) =
                (who.clone(), counted.clone(), down.clone(), shed.clone());
            async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let (who, counted, down, shed) =
                            (who.clone(), counted.clone(), down.clone(), shed.clone());
                        async move {
                            counted.fetch_add(1, Ordering::SeqCst);
                            if shed.load(Ordering::SeqCst) {
                                let mut response =
                                    hyper::Response::new(Full::new(Bytes::new()).boxed());
                                let headers = response.headers_mut();
                                for (k, v) in [
                                    ("content-type", "application/grpc"),
                                    ("grpc-status", "14"),
                                    ("grpc-message", "shedding load"),
                                ] {
                                    headers.insert(k, hyper::header::HeaderValue::from_static(v));
                                }
                                return Ok::<_, std::convert::Infallible>(response);
                            }
                            let grpc = request
                                .headers()
                                .get("content-type")
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            let te = request.headers().get("te").cloned();
                            let timeout = request.headers().get("grpc-timeout").cloned();
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if body.ends_with(b"slow") {
                                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                            }
                            let mut trailers = hyper::HeaderMap::new();
                            if let Some(timeout) = timeout {
                                trailers.insert("x-saw-grpc-timeout", timeout);
                            }
                            let code = if down.load(Ordering::SeqCst) {
                                "14"
                            } else {
                                "0"
                            };
                            trailers.insert(
                                "grpc-status",
                                hyper::header::HeaderValue::from_static(code),
                            );
                            if let Ok(value) = hyper::header::HeaderValue::from_str(&who) {
                                trailers.insert("x-served-by", value);
                            }
                            let body = if body.ends_with(b"stream") {
                                Endless(Some(body)).boxed()
                            } else {
                                Full::new(body)
                                    .with_trailers(async move {
                                        Some(Ok::<_, std::convert::Infallible>(trailers))
                                    })
                                    .boxed()
                            };
                            let mut response = hyper::Response::new(body);
                            response.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/grpc"),
                            );
                            if !grpc || te.as_ref().is_none_or(|v| v != "trailers") {
                                *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            calls,
            failing,
            shedding,
            runtime: Some(runtime),
        }
    }
}

impl Backend {
    /// Closes the listener and every connection, as a killed process's
    /// kernel would: every socket is closed when this returns.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// A server stream that sends one message and then nothing, never ending.
struct Endless(Option<Bytes>);

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// Registers `backends` as the endpoints of service `echo` on node `n1`.
fn place(c: &crate::support::Client, backends: &[&Backend]) {
    let endpoints: Vec<(&str, u16)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr.port()))
        .collect();
    place_ports(c, "echo", &endpoints, &[]);
}

/// A loopback listener on a runtime of its own (one worker): each accepted
/// connection goes to `on_connection` as a task. Dropping the runtime ends
/// the server and its connections.
pub(crate) fn serve_loopback<F, Fut>(on_connection: F) -> (SocketAddr, tokio::runtime::Runtime)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(on_connection(stream));
        }
    });
    (addr, runtime)
}

/// Places endpoints `(id, port)` of `service` at 127.0.0.1 on node `n1`,
/// each with `tags`.
pub(crate) fn place_ports(
    c: &crate::support::Client,
    service: &str,
    endpoints: &[(&str, u16)],
    tags: &[&str],
) {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(id, port)| serde_json::json!({"node": "n1", "service": service, "id": id, "address": "127.0.0.1", "port": port, "tags": tags}))
        .collect();
    let batch = serde_json::json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}], "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
}

/// One gRPC message: the 5-byte prefix (uncompressed, length) and `payload`.
fn framed(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// What a call came back with: HTTP status, body, and headers and trailers
/// together (a trailers-only answer has them in its headers).
struct Call {
    status: u16,
    body: Bytes,
    meta: HashMap<String, String>,
}

async fn call(
    sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: &str,
    payload: &[u8],
) -> Call {
    call_within(sender, host, payload, None).await
}

async fn call_within(
    sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: &str,
    payload: &[u8],
    timeout: Option<&str>,
) -> Call {
    let mut request = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{host}/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    let request = request.body(Full::new(framed(payload))).expect("request");
    let response = sender
        .clone()
        .send_request(request)
        .await
        .expect("response");
    let status = response.status().as_u16();
    let mut meta: HashMap<String, String> = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let collected = response.into_body().collect().await.expect("body");
    if let Some(trailers) = collected.trailers() {
        for (k, v) in trailers {
            meta.insert(k.to_string(), v.to_str().unwrap_or_default().to_string());
        }
    }
    Call {
        status,
        body: collected.to_bytes(),
        meta,
    }
}

#[test]
fn grpc_calls_pass_the_l7_proxy_balanced_per_call_with_their_trailers() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n\
         [[http.routes]]\nhost = \"empty.test\"\nservice = \"nobody\"\n",
    );
    let c = agent.client();
    let backends: Vec<Backend> = ["g1", "g2", "g3"]
        .iter()
        .map(|n| Backend::start(n))
        .collect();
    place(&c, &backends.iter().collect::<Vec<_>>());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;

        // One call: echoed, with the backend's trailers.
        let one = call(&sender, "grpc.test", b"hello").await;
        assert_eq!(one.status, 200);
        assert_eq!(one.body, framed(b"hello"), "the message comes back whole");
        assert_eq!(
            one.meta.get("grpc-status").map(String::as_str),
            Some("0"),
            "{:?}",
            one.meta
        );
        assert!(
            one.meta.contains_key("x-served-by"),
            "custom metadata passes: {:?}",
            one.meta
        );

        // Thirty calls on the one client connection spread over all three.
        let mut by: HashMap<String, usize> = HashMap::new();
        let calls: Vec<_> = (0..30)
            .map(|i| {
                let sender = sender.clone();
                tokio::spawn(
                    async move { call(&sender, "grpc.test", format!("m{i}").as_bytes()).await },
                )
            })
            .collect();
        for task in calls {
            let done = task.await.expect("call");
            assert_eq!(done.meta.get("grpc-status").map(String::as_str), Some("0"));
            *by.entry(done.meta.get("x-served-by").cloned().unwrap_or_default())
                .or_default() += 1;
        }
        assert_eq!(
            by.len(),
            3,
            "calls of one connection pinned to fewer backends: {by:?}"
        );
        assert!(
            by.values().all(|&n| n == 10),
            "round robin per call: {by:?}"
        );

        // A call the proxy cannot place is answered as gRPC, not plain text.
        let refused = call(&sender, "empty.test", b"x").await;
        assert_eq!(refused.status, 200, "gRPC errors travel as HTTP 200");
        assert_eq!(
            refused.meta.get("grpc-status").map(String::as_str),
            Some("14"),
            "{:?}",
            refused.meta
        );
        assert!(
            refused
                .meta
                .get("grpc-message")
                .is_some_and(|m| m.contains("switchyard")),
            "{:?}",
            refused.meta
        );
        let unrouted = call(&sender, "nowhere.test", b"x").await;
        assert_eq!(
            unrouted.meta.get("grpc-status").map(String::as_str),
            Some("12"),
            "{:?}",
            unrouted.meta
        );

        // grpc-timeout: the endpoint is told what is left of the deadline,
        // and a call past it ends as DEADLINE_EXCEEDED without waiting on.
        let timed = call_within(&sender, "grpc.test", b"quick", Some("5S")).await;
        let left: u64 = timed
            .meta
            .get("x-saw-grpc-timeout")
            .and_then(|v| v.strip_suffix('m'))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the endpoint got no grpc-timeout in ms: {:?}", timed.meta));
        assert!((1..=5000).contains(&left), "{left} ms left of 5 s");
        let started = std::time::Instant::now();
        let late = call_within(&sender, "grpc.test", b"slow", Some("300m")).await;
        assert_eq!(
            late.meta.get("grpc-status").map(String::as_str),
            Some("4"),
            "{:?}",
            late.meta
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "waited for the slow endpoint"
        );
    });
    assert_eq!(
        backends
            .iter()
            .map(|b| b.calls.load(Ordering::SeqCst))
            .sum::<usize>(),
        33
    );
}

/// An endpoint whose calls end with `grpc-status: 14` (in the trailers of
/// an HTTP 200) counts as failing and is ejected, as one answering 5xx is.
#[test]
fn grpc_unavailable_in_the_trailers_ejects_the_endpoint() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\n\
         [http.outlier]\nconsecutive_failures = 2\nbase_ejection = \"30s\"\nmax_ejected_percent = 50\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n",
    );
    let c = agent.client();
    let backends: Vec<Backend> = ["u1", "u2"].iter().map(|n| Backend::start(n)).collect();
    place(&c, &backends.iter().collect::<Vec<_>>());
    backends[0].failing.store(true, Ordering::SeqCst);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let statuses: Vec<String> = runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        let mut statuses = Vec::new();
        for i in 0..20 {
            let done = call(&sender, "grpc.test", format!("c{i}").as_bytes()).await;
            statuses.push(done.meta.get("grpc-status").cloned().unwrap_or_default());
        }
        statuses
    });
    let unavailable = statuses.iter().filter(|s| *s == "14").count();
    assert_eq!(
        unavailable, 2,
        "ejected after two UNAVAILABLE answers: {statuses:?}"
    );
    assert!(statuses[10..].iter().all(|s| s == "0"), "{statuses:?}");
    assert_eq!(
        c.metric("switchyard_proxy_ejected{endpoint=\"u1\",node=\"n1\",service=\"echo\"}"),
        Some(1.0)
    );
    // gRPC failures travel as HTTP 200: the calls are counted by grpc-status.
    assert_eq!(
        c.metric("switchyard_proxy_grpc_calls_total{code=\"UNAVAILABLE\",service=\"echo\"}"),
        Some(2.0)
    );
    assert_eq!(
        c.metric("switchyard_proxy_grpc_calls_total{code=\"OK\",service=\"echo\"}"),
        Some(18.0)
    );
}

/// A server stream still open at its endpoint's drain deadline is reset and
/// counted as cut; until then it counts as in flight.
#[test]
fn an_open_grpc_stream_is_cut_at_the_drain_deadline() {
    open_stream_cut_at_the_drain_deadline(false);
}

/// The same over HTTP/2 behind TLS (ALPN h2).
#[test]
fn an_open_grpc_stream_over_tls_is_cut_at_the_drain_deadline() {
    open_stream_cut_at_the_drain_deadline(true);
}

fn open_stream_cut_at_the_drain_deadline(tls: bool) {
    let pki = crate::proxy::TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let listener = match tls {
        true => pki.https_listener(certs.path(), "grpc.test"),
        false => String::new(),
    };
    let (agent, _dir) = agent_with(&format!(
        "[[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n{listener}"
    ));
    let c = agent.client();
    let backend = Backend::start("s1");
    place(&c, &[&backend]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut sender = match tls {
            false => crate::support::h2c(agent.http).await.0,
            true => {
                let https = agent.https.expect("an https address");
                let tcp = tokio::net::TcpStream::connect(https)
                    .await
                    .expect("connect");
                let name = rustls::pki_types::ServerName::try_from("grpc.test").expect("name");
                let tls = pki
                    .connector(b"h2")
                    .connect(name, tcp)
                    .await
                    .expect("TLS handshake");
                let (sender, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tls),
                )
                .await
                .expect("h2 over TLS");
                tokio::spawn(conn);
                sender
            }
        };
        let request = hyper::Request::builder()
            .method("POST")
            .uri("http://grpc.test/echo.Echo/Watch")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed(b"stream")))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let first = body.frame().await.expect("a first message").expect("data");
        assert_eq!(first.into_data().ok(), Some(framed(b"stream")));

        let path = "/v1/switchyard/nodes/n1/drain";
        let api = agent.api.clone();
        let started = tokio::task::spawn_blocking(move || {
            crate::support::Client::new(&api)
                .put_ok(path, r#"{"deadline":"1s"}"#)
                .json()
        })
        .await
        .expect("drain");
        assert_eq!(started["in_flight"], 1, "the open stream counts: {started}");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(15), body.frame()).await;
        match ended {
            Ok(Some(Err(_))) | Ok(None) => {}
            Ok(Some(Ok(frame))) => panic!("the stream went on: {frame:?}"),
            Err(_) => panic!("the stream was still open 15 s after a 1 s drain deadline"),
        }
    });
    let done = crate::support::eventually(
        "the cut counted",
        std::time::Duration::from_secs(10),
        || {
            let s = c.get_ok("/v1/switchyard/nodes/n1/drain").json();
            (s["cut"] == 1 && s["in_flight"] == 0).then_some(s)
        },
    );
    assert_eq!(done["drained"], true, "{done}");
}

/// A backend killed under unary calls: a call that cannot reach it (its
/// message in hand) goes to another endpoint. The one call that may meet
/// the proxy's pooled connection to it before the proxy saw it reset (hyper
/// then reports a reset on send, which may come after the endpoint took the
/// call: not retried) is the first after the kill; every later one succeeds.
#[test]
fn a_killed_backend_fails_no_unary_call() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\nretry_budget_floor = 100\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n",
    );
    let c = agent.client();
    let mut backends: Vec<Backend> = ["k1", "k2"].iter().map(|n| Backend::start(n)).collect();
    place(&c, &backends.iter().collect::<Vec<_>>());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sender = runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        for i in 0..4 {
            let warm = call(&sender, "grpc.test", format!("w{i}").as_bytes()).await;
            assert_eq!(warm.meta.get("grpc-status").map(String::as_str), Some("0"));
        }
        sender
    });
    backends[0].kill();
    let statuses: Vec<(String, String)> = runtime.block_on(async {
        let mut statuses = Vec::new();
        for i in 0..20 {
            let done = call(&sender, "grpc.test", format!("c{i}").as_bytes()).await;
            statuses.push((
                done.meta.get("grpc-status").cloned().unwrap_or_default(),
                done.meta.get("x-served-by").cloned().unwrap_or_default(),
            ));
        }
        statuses
    });
    // The first call after the kill too: its pooled connection is found
    // ended before a stream is written to it.
    assert!(
        statuses
            .iter()
            .all(|(status, by)| status == "0" && by == "k2"),
        "{statuses:?}"
    );
}

/// A trailers-only UNAVAILABLE answer (the server shed the call unread) is
/// retried on another endpoint (`retry_grpc_on`, default `["unavailable"]`),
/// so no call fails; a route whose `retry_grpc_on` is empty passes it on.
#[test]
fn a_call_shed_as_unavailable_is_retried_on_another_endpoint() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\nretry_budget_floor = 100\n[http.outlier]\nconsecutive_failures = 0\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n\
         [[http.routes]]\nhost = \"strict.test\"\nservice = \"echo\"\nretry_grpc_on = []\n",
    );
    let c = agent.client();
    let (shed, ok) = (Backend::start("shed"), Backend::start("ok"));
    shed.shedding.store(true, Ordering::SeqCst);
    place(&c, &[&shed, &ok]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        for i in 0..20 {
            let answer = call(&sender, "grpc.test", format!("m{i}").as_bytes()).await;
            assert_eq!(
                answer.meta.get("grpc-status").map(String::as_str),
                Some("0"),
                "call {i}: {:?}",
                answer.meta
            );
            assert_eq!(
                answer.meta.get("x-served-by").map(String::as_str),
                Some("ok")
            );
        }
        assert!(
            shed.calls.load(Ordering::SeqCst) > 0,
            "the shedding one was tried"
        );
        let mut passed_on = 0;
        for i in 0..10 {
            let answer = call(&sender, "strict.test", format!("s{i}").as_bytes()).await;
            if answer.meta.get("grpc-status").map(String::as_str) == Some("14") {
                passed_on += 1;
            }
        }
        assert!(
            passed_on > 0,
            "without retry_grpc_on the status reaches the client"
        );
    });
}

/// A server that refuses every stream with RST_STREAM(REFUSED_STREAM), as
/// one at its stream limit does (RFC 9113 §8.7: not processed).
fn refusing_server() -> (SocketAddr, Arc<AtomicUsize>, tokio::runtime::Runtime) {
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    let (addr, runtime) = serve_loopback(move |stream| {
        let counted = counted.clone();
        async move {
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        }
    });
    (addr, refused, runtime)
}

#[test]
fn a_refused_stream_is_retried_on_another_endpoint() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n",
    );
    let c = agent.client();
    let ok = Backend::start("ok");
    let (refusing, refused, _runtime) = refusing_server();
    place_ports(
        &c,
        "echo",
        &[("ok", ok.addr.port()), ("refusing", refusing.port())],
        &[],
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        for i in 0..10 {
            let answer = call(&sender, "grpc.test", format!("m{i}").as_bytes()).await;
            assert_eq!(
                answer.meta.get("grpc-status").map(String::as_str),
                Some("0"),
                "call {i}: {:?}",
                answer.meta
            );
        }
    });
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the refusing one was tried"
    );
}

/// HTTP/2 requests that RFC 9113 §8.2 makes malformed (connection-specific
/// fields, `te` other than `trailers`, uppercase field names) are refused
/// (RST_STREAM, or GOAWAY where the h2 library takes it for a connection
/// error) and reach no backend; a good request is served.
#[test]
fn http2_requests_that_rfc_9113_forbids_never_reach_a_backend() {
    use std::io::{Read, Write};
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"echo\"\n");
    let c = agent.client();
    let backend = Backend::start("b");
    place(&c, &[&backend]);
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    // One request on stream 1 of a new connection: the frame type that ends
    // it (RST_STREAM 3, GOAWAY 7, or HEADERS 1 with its first block byte).
    let ask = |extra: Option<(&str, &str)>| -> Option<(u8, Option<u8>)> {
        // A gRPC call, so that one let through would reach the backend:
        // :method POST, :scheme http, :path /, :authority h (HPACK), then
        // literal fields without indexing.
        let mut block = vec![0x83, 0x86, 0x84, 0x41, 1, b'h'];
        let mut fields = vec![("content-type", "application/grpc")];
        if extra.is_none_or(|(name, _)| name != "te") {
            fields.push(("te", "trailers"));
        }
        fields.extend(extra);
        for (name, value) in fields {
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1];
        frame.extend_from_slice(&block);
        let mut wire = std::net::TcpStream::connect(agent.http).expect("connect");
        wire.write_all(PREFACE).expect("preface");
        wire.write_all(&frame).expect("request");
        wire.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut seen = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match wire.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
            let mut at = 0;
            while at + 9 <= seen.len() {
                let len = (usize::from(seen[at]) << 16)
                    | (usize::from(seen[at + 1]) << 8)
                    | usize::from(seen[at + 2]);
                let kind = seen[at + 3];
                let stream = seen[at + 8];
                if matches!(kind, 0x3 | 0x7) || (kind == 0x1 && stream == 1) {
                    return Some((kind, seen.get(at + 9).copied()));
                }
                at += 9 + len;
            }
        }
    };
    for field in [
        ("connection", "keep-alive"),
        ("te", "gzip"),
        ("X-Upper", "1"),
        ("transfer-encoding", "chunked"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
    ] {
        let end = ask(Some(field));
        // RST_STREAM, GOAWAY, or a 400 (HPACK static index 12).
        assert!(
            matches!(end, Some((0x3 | 0x7, _)) | Some((0x1, Some(0x8c)))),
            "{field:?} was not refused: {end:?}"
        );
    }
    assert_eq!(
        backend.calls.load(Ordering::SeqCst),
        0,
        "no backend saw one"
    );
    assert!(
        matches!(ask(None), Some((0x1, _))),
        "a good request is answered"
    );
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
}

/// A gRPC-Web request as a browser sends it, on one h2c connection.
async fn web_call(
    sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: &str,
    content_type: &str,
    body: Bytes,
) -> (u16, hyper::HeaderMap, Bytes, bool) {
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{host}/echo.Echo/Say"))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example")
        .body(Full::new(body))
        .expect("request");
    let response = sender
        .clone()
        .send_request(request)
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().is_some();
    (status, headers, collected.to_bytes(), trailers)
}

/// Splits a gRPC-Web body into its message frames and its trailers text.
fn web_frames(body: &[u8]) -> (Vec<Bytes>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    let mut at = 0;
    while at + 5 <= body.len() {
        let len =
            u32::from_be_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]]) as usize;
        let frame = &body[at + 5..(at + 5 + len).min(body.len())];
        if body[at] & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(frame));
        } else {
            messages.push(Bytes::copy_from_slice(frame));
        }
        at += 5 + len;
    }
    (messages, trailers)
}

/// gRPC-Web from a browser, binary and base64 text: translated to gRPC for
/// the endpoint and back, the trailers as the body's last frame; a route
/// with `grpc_web = true` answers the CORS preflight and marks answers for
/// the origin; a call the proxy cannot place is answered in gRPC-Web.
#[test]
fn grpc_web_binary_and_text_pass_and_cors_is_answered() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"web.test\"\nservice = \"echo\"\ngrpc_web = true\n\
         [[http.routes]]\nhost = \"plain.test\"\nservice = \"echo\"\n\
         [[http.routes]]\nhost = \"empty.test\"\nservice = \"nobody\"\n",
    );
    let c = agent.client();
    let backend = Backend::start("g1");
    place(&c, &[&backend]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;

        let (status, headers, body, trailers) = web_call(
            &sender,
            "web.test",
            "application/grpc-web+proto",
            Bytes::from(framed(b"hello").to_vec()),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/grpc-web+proto");
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example"
        );
        assert!(!trailers, "no HTTP trailers: they are in the body");
        let (messages, meta) = web_frames(&body);
        assert_eq!(messages, [Bytes::from_static(b"hello")], "the message back");
        assert!(meta.contains("grpc-status:0\r\n"), "{meta:?}");
        assert!(meta.contains("x-served-by:g1\r\n"), "{meta:?}");

        let text = b64.encode(framed(b"in text"));
        let (status, headers, body, _) = web_call(
            &sender,
            "plain.test",
            "application/grpc-web-text",
            Bytes::from(text),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/grpc-web-text+proto");
        assert!(
            !headers.contains_key("access-control-allow-origin"),
            "no CORS on a route without grpc_web"
        );
        // Base64 per frame, each padded: decoded four characters at a time.
        let mut decoded = Vec::new();
        for group in body.chunks(4) {
            decoded.extend(b64.decode(group).expect("base64 answer"));
        }
        let (messages, meta) = web_frames(&decoded);
        assert_eq!(messages, [Bytes::from_static(b"in text")]);
        assert!(meta.contains("grpc-status:0\r\n"), "{meta:?}");

        // The preflight, answered by the proxy on the gRPC-Web route only.
        let calls = backend.calls.load(Ordering::SeqCst);
        let preflight = |host: &str| {
            hyper::Request::builder()
                .method("OPTIONS")
                .uri(format!("http://{host}/echo.Echo/Say"))
                .header("origin", "https://app.example")
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type,x-grpc-web")
                .body(Full::new(Bytes::new()))
                .expect("request")
        };
        let answer = sender
            .clone()
            .send_request(preflight("web.test"))
            .await
            .expect("preflight");
        assert_eq!(answer.status(), 204);
        let h = answer.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert_eq!(h["access-control-allow-headers"], "content-type,x-grpc-web");
        assert!(h["access-control-allow-methods"]
            .to_str()
            .is_ok_and(|m| m.contains("POST")));
        assert_eq!(backend.calls.load(Ordering::SeqCst), calls, "not forwarded");
        let answer = sender
            .clone()
            .send_request(preflight("plain.test"))
            .await
            .expect("options");
        // Forwarded (over HTTP/1.1, which this h2c-only backend refuses).
        assert_ne!(answer.status(), 204);
        assert!(!answer.headers().contains_key("access-control-allow-origin"));

        // Over HTTP/1.1 as a browser's fetch sends it, preflight first.
        let agent_h1: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let preflight = ureq::http::Request::builder()
            .method("OPTIONS")
            .uri(format!("http://{}/echo.Echo/Say", agent.http))
            .header("host", "web.test")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .body(())
            .expect("preflight");
        let answer = agent_h1.run(preflight).expect("preflight over HTTP/1.1");
        assert_eq!(answer.status(), 204);
        assert_eq!(
            answer.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        let mut answer = agent_h1
            .post(format!("http://{}/echo.Echo/Say", agent.http))
            .header("host", "web.test")
            .header("content-type", "application/grpc-web+proto")
            .header("origin", "https://app.example")
            .send(&framed(b"over http/1.1")[..])
            .expect("gRPC-Web over HTTP/1.1");
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers()["content-type"],
            "application/grpc-web+proto"
        );
        assert_eq!(
            answer.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        let body = answer.body_mut().read_to_vec().expect("body");
        let (messages, meta) = web_frames(&body);
        assert_eq!(messages, [Bytes::from_static(b"over http/1.1")]);
        assert!(meta.contains("grpc-status:0\r\n"), "{meta:?}");

        // Nobody to place it on: a gRPC-Web answer saying UNAVAILABLE.
        let (status, headers, _, _) = web_call(
            &sender,
            "empty.test",
            "application/grpc-web+proto",
            Bytes::from(framed(b"x").to_vec()),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/grpc-web+proto");
        assert_eq!(headers["grpc-status"], "14");
    });
}

/// A plain HTTP/2-only (h2c) server: answers every request with the
/// protocol it arrived in and its path.
pub(crate) fn h2c_server() -> (SocketAddr, tokio::runtime::Runtime) {
    let (addr, runtime) = serve_loopback(move |stream| async move {
        let service = hyper::service::service_fn(
            |request: hyper::Request<hyper::body::Incoming>| async move {
                let said = format!("{:?} {}", request.version(), request.uri().path());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    said,
                ))))
            },
        );
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    (addr, runtime)
}

/// `upstream_protocol = "h2c"` on a route (or the tag
/// `switchyard.http.upstream=h2c`): every request, HTTP/1.1 or HTTP/2 from
/// the client, reaches the endpoints over HTTP/2.
#[test]
fn routes_with_an_h2c_upstream_send_every_request_over_http2() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"h2c.test\"\nservice = \"plain2\"\nupstream_protocol = \"h2c\"\n",
    );
    let c = agent.client();
    let (server, _runtime) = h2c_server();
    place_ports(&c, "plain2", &[("p1", server.port())], &[]);
    place_ports(
        &c,
        "tagged2",
        &[("t1", server.port())],
        &[
            "switchyard.http.host=tagged.test",
            "switchyard.http.upstream=h2c",
        ],
    );
    // HTTP/1.1 from the client, two requests on one connection.
    let agent_h1: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for (host, path) in [
        ("h2c.test", "/one"),
        ("h2c.test", "/two"),
        ("tagged.test", "/t"),
    ] {
        let mut answer = agent_h1
            .get(format!("http://{}{path}", agent.http))
            .header("host", host)
            .call()
            .expect("request");
        assert_eq!(answer.status(), 200, "{host}{path}");
        let body = answer.body_mut().read_to_string().expect("body");
        assert_eq!(body, format!("HTTP/2.0 {path}"), "{host}{path}");
    }
    // HTTP/2 from the client.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c::<Full<Bytes>>(agent.http).await;
        let request = hyper::Request::get("http://h2c.test/h2")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let answer = sender
            .clone()
            .send_request(request)
            .await
            .expect("response");
        assert_eq!(answer.status(), 200);
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, Bytes::from_static(b"HTTP/2.0 /h2"));
    });
}

/// A request or response body fed frame by frame from a channel.
struct Frames(tokio::sync::mpsc::Receiver<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// An h2c server for bidirectional streaming calls: each request DATA frame
/// is echoed as it arrives, and the end of the request ends the answer with
/// `grpc-status: 0`.
fn chat_server() -> (SocketAddr, tokio::runtime::Runtime) {
    let (addr, runtime) = serve_loopback(move |stream| async move {
        let service = hyper::service::service_fn(
            |request: hyper::Request<hyper::body::Incoming>| async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            if tx.send(hyper::body::Frame::data(data)).await.is_err() {
                                return;
                            }
                        }
                    }
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    let _ = tx.send(hyper::body::Frame::trailers(trailers)).await;
                });
                let mut response = hyper::Response::new(Frames(rx));
                response.headers_mut().insert(
                    "content-type",
                    hyper::header::HeaderValue::from_static("application/grpc"),
                );
                Ok::<_, std::convert::Infallible>(response)
            },
        );
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    (addr, runtime)
}

/// A bidirectional streaming call through the proxy: each message comes
/// back before the next is sent (nothing waits for the whole request), and
/// the call ends with the endpoint's trailers when the client ends its side.
#[test]
fn a_bidirectional_streaming_call_streams_both_ways() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"chat.test\"\nservice = \"chat\"\n");
    let c = agent.client();
    let (server, _server_runtime) = chat_server();
    place_ports(&c, "chat", &[("c1", server.port())], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c::<Frames>(agent.http).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let request = hyper::Request::post("http://chat.test/chat.Chat/Talk")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Frames(rx))
            .expect("request");
        tx.send(hyper::body::Frame::data(framed(b"one")))
            .await
            .expect("send");
        let within = std::time::Duration::from_secs(5);
        let response = tokio::time::timeout(within, sender.clone().send_request(request))
            .await
            .expect("headers in time")
            .expect("response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        for (i, message) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
            if i > 0 {
                tx.send(hyper::body::Frame::data(framed(message)))
                    .await
                    .expect("send");
            }
            let frame = tokio::time::timeout(within, body.frame())
                .await
                .unwrap_or_else(|_| panic!("message {i} did not come back while the call is open"))
                .expect("a frame")
                .expect("no error");
            assert_eq!(frame.into_data().ok(), Some(framed(message)), "message {i}");
        }
        drop(tx);
        let last = tokio::time::timeout(within, body.frame())
            .await
            .expect("the end in time")
            .expect("a frame")
            .expect("no error");
        let trailers = last.into_trailers().expect("trailers end the call");
        assert_eq!(trailers["grpc-status"], "0");
    });
}

/// A slow reader slows the sender: a server streaming 1 MiB messages to a
/// client that reads nothing gets only as far as the flow-control windows
/// let it, and the proxy's memory stays bounded; the client then reads on.
#[test]
fn a_stream_nobody_reads_holds_the_sender_and_bounded_memory() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"flood.test\"\nservice = \"flood\"\n");
    let c = agent.client();
    let handed = Arc::new(AtomicUsize::new(0));
    let counted = handed.clone();
    let (server, _server_runtime) = serve_loopback(move |stream| {
        let counted = counted.clone();
        async move {
            let service = hyper::service::service_fn(move |_request| {
                let counted = counted.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move {
                        let message = framed(&vec![7u8; 1 << 20]);
                        for _ in 0..200 {
                            if tx
                                .send(hyper::body::Frame::data(message.clone()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            counted.fetch_add(message.len(), Ordering::SeqCst);
                        }
                    });
                    let mut response = hyper::Response::new(Frames(rx));
                    response.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    });
    place_ports(&c, "flood", &[("f1", server.port())], &[]);
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let pid = agent.pid();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    client.block_on(async {
        let (sender, _) = crate::support::h2c::<Full<Bytes>>(agent.http).await;
        let before = rss(pid);
        let request = hyper::Request::post("http://flood.test/flood.Flood/Pour")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed(b"go")))
            .expect("request");
        let response = sender
            .clone()
            .send_request(request)
            .await
            .expect("response");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let held = handed.load(Ordering::SeqCst);
        let grown = rss(pid).saturating_sub(before);
        assert!(
            held < 40 << 20,
            "the server got {held} bytes out to a client that reads nothing"
        );
        assert!(
            grown < 64 << 10,
            "the proxy grew by {grown} KiB for one unread stream"
        );
        // Reading on, the stream flows again.
        let mut body = response.into_body();
        let mut read = 0usize;
        while read < 60 << 20 {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("data keeps coming once read")
                .expect("a frame")
                .expect("no error");
            read += frame.into_data().map_or(0, |d| d.len());
        }
        assert!(handed.load(Ordering::SeqCst) > held, "the sender moved on");
    });
}

/// Per-call balancing on a long-lived client connection: an endpoint
/// registered while the connection is open gets calls at once (round robin:
/// one of the next three), no reconnect needed.
#[test]
fn a_new_endpoint_gets_calls_on_an_open_client_connection_at_once() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\n\
         [[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n",
    );
    let c = agent.client();
    let backends: Vec<Backend> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| Backend::start(n))
        .collect();
    place(&c, &[&backends[0], &backends[1]]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        for i in 0..6 {
            let answer = call(&sender, "grpc.test", format!("m{i}").as_bytes()).await;
            assert_ne!(
                answer.meta.get("x-served-by").map(String::as_str),
                Some("a3")
            );
        }
        place(&c, &backends.iter().collect::<Vec<_>>());
        let mut served = Vec::new();
        for i in 0..3 {
            let answer = call(&sender, "grpc.test", format!("n{i}").as_bytes()).await;
            served.push(answer.meta.get("x-served-by").cloned().unwrap_or_default());
        }
        assert!(
            served.iter().any(|s| s == "a3"),
            "the new endpoint got none of the next three calls: {served:?}"
        );
    });
}

/// SIGTERM with a call in progress on an HTTP/2 client connection: the
/// connection gets a GOAWAY, the call finishes with its trailers within the
/// shutdown grace, and the agent exits 0.
#[test]
fn a_call_in_progress_at_sigterm_finishes() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n");
    let c = agent.client();
    let backend = Backend::start("s1");
    place(&c, &[&backend]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (answer, agent) = runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        // The backend holds a message ending in "slow" for 3 s.
        let slow = tokio::spawn(async move { call(&sender, "grpc.test", b"take it slow").await });
        while backend.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        agent.signal("TERM");
        (slow.await.expect("call task"), agent)
    });
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.meta.get("grpc-status").map(String::as_str),
        Some("0"),
        "{:?}",
        answer.meta
    );
    assert_eq!(answer.body, framed(b"take it slow"));
    let exit = agent.wait_exit(std::time::Duration::from_secs(20));
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");
}

/// A raw gRPC-shaped h2c server: each connection allows `max_streams`
/// streams at once (`None`: h2's default, unlimited); each call is held
/// `hold`, then its message is echoed with `grpc-status: 0`. With `goaway`,
/// the first connection takes its first stream, reads nothing more for
/// `hold`, then sends a GOAWAY (NO_ERROR, last stream id: that one's) and
/// closes, that stream unanswered (it may have been processed: not to be
/// sent again); the streams sent meanwhile are above the last id.
/// Counts connections and calls answered.
fn raw_server(
    max_streams: Option<u32>,
    hold: std::time::Duration,
    goaway: bool,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::runtime::Runtime,
) {
    async fn answer(
        request: hyper::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        hold: std::time::Duration,
    ) {
        let mut body = request.into_body();
        let mut got = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        tokio::time::sleep(hold).await;
        let mut response = hyper::Response::new(());
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        let Ok(mut send) = respond.send_response(response, false) else {
            return;
        };
        let _ = send.send_data(Bytes::from(got), false);
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    }
    let connections = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (opened, done) = (connections.clone(), answered.clone());
    let once = Arc::new(std::sync::atomic::AtomicBool::new(goaway));
    let (addr, runtime) = serve_loopback(move |stream| {
        let (opened, done, once) = (opened.clone(), done.clone(), once.clone());
        async move {
            let mut builder = h2::server::Builder::new();
            if let Some(max) = max_streams {
                builder.max_concurrent_streams(max);
            }
            let Ok(mut connection) = builder.handshake::<_, Bytes>(stream).await else {
                return;
            };
            opened.fetch_add(1, Ordering::SeqCst);
            if once.swap(false, Ordering::SeqCst) {
                let Some(Ok((request, respond))) = connection.accept().await else {
                    return;
                };
                // Nothing more is read while the first call is held: the
                // streams sent meanwhile are above the GOAWAY's last id.
                tokio::time::sleep(hold).await;
                connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                drop((request, respond));
                let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
                return;
            }
            while let Some(Ok((request, respond))) = connection.accept().await {
                let done = done.clone();
                tokio::spawn(async move {
                    answer(request, respond, hold).await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
    });
    (addr, connections, answered, runtime)
}

/// `n` concurrent calls on `sender`'s client connection, each its own
/// task: the grpc-status of each (with its grpc-message if any), in order.
async fn calls_on(
    sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    n: usize,
) -> Vec<String> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let sender = sender.clone();
            tokio::spawn(async move {
                let done = call(&sender, "grpc.test", format!("c{i}").as_bytes()).await;
                let status = done.meta.get("grpc-status").cloned().unwrap_or_default();
                match done.meta.get("grpc-message") {
                    Some(message) => format!("{status}: {message}"),
                    None => status,
                }
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.expect("call task"));
    }
    statuses
}

/// An endpoint that allows two streams per connection: eight concurrent
/// calls open more connections to it instead of queueing on one, and the
/// per-endpoint HTTP/2 gauges show them (streams back to 0 when done).
#[test]
fn calls_beyond_an_endpoints_stream_limit_open_more_connections() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n");
    let c = agent.client();
    let (addr, connections, answered, _runtime) =
        raw_server(Some(2), std::time::Duration::from_millis(300), false);
    place_ports(&c, "echo", &[("lim", addr.port())], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let statuses = runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        calls_on(&sender, 8).await
    });
    assert!(statuses.iter().all(|s| s == "0"), "{statuses:?}");
    assert_eq!(answered.load(Ordering::SeqCst), 8);
    let opened = connections.load(Ordering::SeqCst);
    assert!(
        opened >= 3,
        "8 concurrent calls at 2 streams per connection went over {opened} connection(s)"
    );
    let labels = "{endpoint=\"lim\",node=\"n1\",service=\"echo\"}";
    let gauge = c
        .metric(&format!("switchyard_proxy_upstream_h2_connections{labels}"))
        .unwrap_or(0.0);
    assert!(gauge >= 3.0, "upstream_h2_connections = {gauge}");
    crate::support::eventually("streams closed", std::time::Duration::from_secs(5), || {
        (c.metric(&format!("switchyard_proxy_upstream_h2_streams{labels}")) == Some(0.0))
            .then_some(())
    });
}

/// An endpoint that sends a GOAWAY while calls are on their way and
/// closes: the calls above its last stream id, which it never took, are
/// sent again on a new connection and none fails; the call at the last id
/// (it may have been processed) is not sent again. The GOAWAY is counted.
#[test]
fn calls_above_a_goaways_last_stream_id_are_sent_again() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"grpc.test\"\nservice = \"echo\"\n");
    let c = agent.client();
    let (addr, connections, answered, _runtime) =
        raw_server(None, std::time::Duration::from_millis(300), true);
    place_ports(&c, "echo", &[("away", addr.port())], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (first, others) = runtime.block_on(async {
        let (sender, _) = crate::support::h2c(agent.http).await;
        // The first call opens the connection and is held there...
        let first = {
            let sender = sender.clone();
            tokio::spawn(async move { call(&sender, "grpc.test", b"first").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // ...while these go out on the same upstream connection, unread.
        let others = calls_on(&sender, 4).await;
        (first.await.expect("first call"), others)
    });
    assert!(others.iter().all(|s| s == "0"), "{others:?}");
    assert_eq!(
        first.meta.get("grpc-status").map(String::as_str),
        Some("14"),
        "the call the endpoint may have taken fails, not sent twice: {:?}",
        first.meta
    );
    assert_eq!(answered.load(Ordering::SeqCst), 4);
    assert!(connections.load(Ordering::SeqCst) >= 2);
    let labels = "{endpoint=\"away\",node=\"n1\",service=\"echo\"}";
    let goaways = c
        .metric(&format!(
            "switchyard_proxy_upstream_h2_goaways_received_total{labels}"
        ))
        .unwrap_or(0.0);
    assert!(goaways >= 1.0, "GOAWAYs received: {goaways}");
}
