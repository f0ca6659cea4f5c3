//! Active health checks against real backends.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::support::{eventually, Agent, Backend, Client};

fn check_status(c: &Client, service: &str, check_id: &str) -> (String, String) {
    let checks = c.get_ok(&format!("/v1/health/checks/{service}")).json();
    let check = checks
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .cloned()
        .unwrap_or(Value::Null);
    (
        check["Status"].as_str().unwrap_or("").to_string(),
        check["Output"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn http_check_follows_the_backend_with_thresholds() {
    let agent = Agent::start();
    let c = agent.client();
    let backend = Backend::start();
    let body = format!(
        r#"{{"Name":"api","Address":"127.0.0.1","Port":{},"Check":{{"CheckID":"api-http","HTTP":"http://{}/health","Interval":"100ms","Timeout":"1s","FailuresBeforeCritical":3}}}}"#,
        backend.addr.port(),
        backend.addr
    );
    c.put_ok("/v1/agent/service/register", &body);
    let (_, output) = eventually("the HTTP check to pass", Duration::from_secs(15), || {
        let (status, output) = check_status(&c, "api", "api-http");
        (status == "passing").then_some((status, output))
    });
    assert!(output.contains("200"), "{output}");

    backend.status.store(500, Ordering::SeqCst);
    let output = eventually(
        "the HTTP check to go critical",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "api", "api-http");
            // Read after the status: at least this many failures had been served.
            let served = backend.failures.load(Ordering::SeqCst);
            if status == "critical" {
                assert!(
                    served >= 3,
                    "critical after only {served} failed probes (threshold 3)"
                );
                return Some(output);
            }
            None
        },
    );
    assert!(output.contains("500"), "{output}");
    let passing = c.get_ok("/v1/health/service/api?passing").json();
    assert!(
        passing.as_array().expect("array").is_empty(),
        "a critical endpoint leaves ?passing"
    );

    backend.status.store(200, Ordering::SeqCst);
    eventually("the HTTP check to recover", Duration::from_secs(15), || {
        (check_status(&c, "api", "api-http").0 == "passing").then_some(())
    });
}

#[test]
fn tcp_checks_on_open_and_closed_ports() {
    let agent = Agent::start();
    let c = agent.client();
    let open = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    for (name, addr) in [("up", open.local_addr().expect("addr")), ("down", closed)] {
        let body = format!(
            r#"{{"Name":"{name}","Check":{{"CheckID":"{name}-tcp","TCP":"{addr}","Interval":"100ms","Timeout":"1s","Status":"warning"}}}}"#
        );
        c.put_ok("/v1/agent/service/register", &body);
    }
    eventually(
        "the open port's check to pass",
        Duration::from_secs(15),
        || (check_status(&c, "up", "up-tcp").0 == "passing").then_some(()),
    );
    let (_, output) = eventually(
        "the closed port's check to fail",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "down", "down-tcp");
            (status == "critical").then_some((status, output))
        },
    );
    assert!(output.contains("dial tcp"), "{output}");
    drop(open);
}

/// A scheduler keeps 1,000 endpoints alive with one call per round; when it
/// stops, they all expire; unknown and non-TTL checks are reported, not fatal.
#[test]
fn batch_heartbeats_keep_many_ttl_checks_alive() {
    let agent = Agent::start();
    let c = agent.client();
    let endpoints: Vec<Value> = (0..1000)
        .map(|i| {
            serde_json::json!({"node": "hb", "service": "task", "id": format!("t{i}"), "port": 9000,
                                     "checks": [{"ttl": "4s"}]})
        })
        .collect();
    let body = serde_json::json!({"nodes": [{"name": "hb", "address": "10.4.0.1"}], "endpoints": endpoints});
    c.put_ok("/v1/switchyard/batch", &body.to_string());
    let mut beats: Vec<Value> = (0..1000)
        .map(|i| serde_json::json!({"node": "hb", "id": format!("service:t{i}")}))
        .collect();
    beats.push(serde_json::json!({"node": "hb", "id": "service:ghost"}));
    let heartbeat = serde_json::json!({ "checks": beats }).to_string();
    let passing = |c: &Client| {
        c.get_ok("/v1/switchyard/services/task").json()["by_state"]["passing"]
            .as_u64()
            .unwrap_or(0)
    };
    // Renew every 300 ms for about 6 s, longer than the TTL, so an unrenewed
    // check would expire. (A TTL well past a loaded CI machine's stalls.)
    let started = std::time::Instant::now();
    let mut first = true;
    while started.elapsed() < Duration::from_secs(6) {
        let answer = c.put_ok("/v1/switchyard/heartbeat", &heartbeat).json();
        assert_eq!(answer["renewed"], 1000);
        assert_eq!(answer["unknown"][0]["id"], "service:ghost");
        if !first {
            assert_eq!(passing(&c), 1000, "a renewed TTL expired");
        }
        first = false;
        std::thread::sleep(Duration::from_millis(300));
    }
    eventually(
        "every unrenewed TTL to expire",
        Duration::from_secs(15),
        || (passing(&c) == 0).then_some(()),
    );
    let bad = c.put(
        "/v1/switchyard/heartbeat",
        r#"{"checks":[{"node":"hb","id":"service:t1","status":"great"}]}"#,
    );
    assert_eq!(bad.status, 400);
}

/// A node lease: while `serfHealth` is renewed its endpoints serve; when the
/// renewals stop, every endpoint on the node goes critical and leaves DNS.
#[test]
fn a_node_whose_lease_lapses_takes_its_endpoints_out() {
    let agent = Agent::start();
    let c = agent.client();
    let body = serde_json::json!({
        "nodes": [{"name": "leased", "address": "10.6.0.1", "ttl": "1s"}, {"name": "plain", "address": "10.6.0.2"}],
        "endpoints": [
            {"node": "leased", "service": "svc", "id": "a", "port": 1},
            {"node": "leased", "service": "svc", "id": "b", "port": 2},
            {"node": "plain", "service": "svc", "id": "c", "port": 3},
        ],
    });
    c.put_ok("/v1/switchyard/batch", &body.to_string());
    let renew = r#"{"checks":[{"node":"leased","id":"serfHealth"}]}"#;
    assert_eq!(
        c.put_ok("/v1/switchyard/heartbeat", renew).json()["renewed"],
        1
    );
    let entries = c.get_ok("/v1/health/service/svc?passing").json();
    assert_eq!(entries.as_array().expect("array").len(), 3);
    let serf: Vec<&Value> = entries[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["CheckID"] == "serfHealth")
        .collect();
    assert_eq!(
        serf.len(),
        1,
        "the real lease check replaces the synthetic one"
    );
    // No more renewals: the lease lapses.
    let passing = eventually("the lease to lapse", Duration::from_secs(15), || {
        let entries = c.get_ok("/v1/health/service/svc?passing").json();
        let ids: Vec<String> = entries
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap_or("").to_string())
            .collect();
        (ids.len() == 1).then_some(ids)
    });
    assert_eq!(
        passing,
        ["c"],
        "only the endpoint on the unleased node is left"
    );
    let node_checks = c.get_ok("/v1/health/node/leased").json();
    assert_eq!(node_checks[0]["CheckID"], "serfHealth");
    assert_eq!(node_checks[0]["Status"], "critical");
}

/// A gRPC health server over h2c: answers `grpc.health.v1.Health/Check` for
/// one service name with the status in `serving` (1 = SERVING, 2 = NOT_SERVING).
fn grpc_health_server(
    service: &'static str,
    serving: std::sync::Arc<std::sync::atomic::AtomicU8>,
) -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    grpc_health_server_on(service, serving, None)
}

/// A TLS acceptor with a fresh self-signed certificate for `localhost`,
/// offering `alpn`.
fn self_signed_acceptor(alpn: &[u8]) -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .expect("server config");
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// An HTTPS backend (HTTP/1.1 over TLS) answering 200 `ok` to everything.
fn https_server() -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let acceptor = self_signed_acceptor(b"http/1.1");
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
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let handler = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    (addr, runtime)
}

/// The gRPC health server, over TLS when `tls` is given.
fn grpc_health_server_on(
    service: &'static str,
    serving: std::sync::Arc<std::sync::atomic::AtomicU8>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

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
            let serving = serving.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let status = serving.load(Ordering::SeqCst);
                        async move {
                            let path_ok = request.uri().path() == "/grpc.health.v1.Health/Check"
                                && request
                                    .headers()
                                    .get("content-type")
                                    .is_some_and(|v| v == "application/grpc");
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut expected = vec![0x0A, service.len() as u8];
                            expected.extend_from_slice(service.as_bytes());
                            let known = path_ok && body.get(5..) == Some(&expected[..]);
                            let frame = if known {
                                vec![0, 0, 0, 0, 2, 0x08, status]
                            } else {
                                Vec::new()
                            };
                            let code = if known { "0" } else { "5" };
                            let body = Full::new(Bytes::from(frame)).with_trailers(async move {
                                let mut trailers = hyper::HeaderMap::new();
                                trailers.insert(
                                    "grpc-status",
                                    hyper::header::HeaderValue::from_static(code),
                                );
                                Some(Ok::<_, std::convert::Infallible>(trailers))
                            });
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                        }
                    },
                );
                let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), handler)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), handler)
                            .await;
                    }
                }
            });
        }
    });
    (addr, runtime)
}

#[test]
fn grpc_health_checks_follow_the_server() {
    let agent = Agent::start();
    let c = agent.client();
    let serving = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(1));
    let (addr, _server) = grpc_health_server("pay.v1.Payments", serving.clone());
    let body = format!(
        r#"{{"Name":"pay","Check":{{"CheckID":"pay-grpc","GRPC":"{addr}/pay.v1.Payments","Interval":"100ms","Timeout":"2s"}}}}"#
    );
    c.put_ok("/v1/agent/service/register", &body);
    let (_, output) = eventually("the gRPC check to pass", Duration::from_secs(15), || {
        let (status, output) = check_status(&c, "pay", "pay-grpc");
        (status == "passing").then_some((status, output))
    });
    assert!(output.contains("SERVING"), "{output}");
    serving.store(2, Ordering::SeqCst);
    let output = eventually(
        "the gRPC check to go critical",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "pay", "pay-grpc");
            (status == "critical").then_some(output)
        },
    );
    assert!(output.contains("not SERVING"), "{output}");
    // An unknown service name gets grpc-status NOT_FOUND from the server.
    let body = format!(
        r#"{{"Name":"ghost","Check":{{"CheckID":"ghost-grpc","GRPC":"{addr}/no.Such","Interval":"100ms","Timeout":"2s","Status":"passing"}}}}"#
    );
    c.put_ok("/v1/agent/service/register", &body);
    let output = eventually(
        "the unknown gRPC service to fail",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "ghost", "ghost-grpc");
            (status == "critical").then_some(output)
        },
    );
    assert!(output.contains("status 5"), "{output}");
}

#[test]
fn https_and_grpc_over_tls_checks_verify_or_skip_as_told() {
    let agent = Agent::start();
    let c = agent.client();
    let (https, _https_server) = https_server();
    // TLSSkipVerify: the self-signed backend passes.
    c.put_ok(
        "/v1/agent/service/register",
        &format!(
            r#"{{"Name":"secure","Check":{{"CheckID":"secure-skip","HTTP":"https://{https}/health","Interval":"100ms","Timeout":"2s","TLSSkipVerify":true}}}}"#
        ),
    );
    let output = eventually("the HTTPS check to pass", Duration::from_secs(15), || {
        let (status, output) = check_status(&c, "secure", "secure-skip");
        (status == "passing").then_some(output)
    });
    assert!(output.contains("200") && output.contains("ok"), "{output}");
    // Verified (the default): the same backend's certificate is refused.
    c.put_ok(
        "/v1/agent/service/register",
        &format!(
            r#"{{"Name":"strict","Check":{{"CheckID":"strict-verify","HTTP":"https://{https}/health","Interval":"100ms","Timeout":"2s","TLSServerName":"localhost","Status":"passing"}}}}"#
        ),
    );
    let output = eventually(
        "the verified HTTPS check to fail",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "strict", "strict-verify");
            (status == "critical").then_some(output)
        },
    );
    assert!(output.contains("TLS handshake"), "{output}");

    // gRPC health over TLS.
    let serving = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(1));
    let (grpc, _grpc_server) = grpc_health_server_on(
        "pay.v1.Payments",
        serving,
        Some(self_signed_acceptor(b"h2")),
    );
    c.put_ok(
        "/v1/agent/service/register",
        &format!(
            r#"{{"Name":"pay-tls","Check":{{"CheckID":"pay-tls","GRPC":"{grpc}/pay.v1.Payments","GRPCUseTLS":true,"TLSSkipVerify":true,"Interval":"100ms","Timeout":"2s"}}}}"#
        ),
    );
    let output = eventually(
        "the gRPC TLS check to pass",
        Duration::from_secs(15),
        || {
            let (status, output) = check_status(&c, "pay-tls", "pay-tls");
            (status == "passing").then_some(output)
        },
    );
    assert!(output.contains("SERVING"), "{output}");
}

#[test]
fn http_checks_can_name_the_statuses_that_pass() {
    let agent = Agent::start();
    let c = agent.client();
    let backend = Backend::start();
    let body = format!(
        r#"{{"Name":"legacy","Check":{{"CheckID":"legacy-http","HTTP":"http://{}/","Interval":"100ms","Timeout":"1s","ExpectedStatus":"300-399","Status":"passing"}}}}"#,
        backend.addr
    );
    c.put_ok("/v1/agent/service/register", &body);
    let output = eventually("200 is outside 300-399", Duration::from_secs(15), || {
        let (status, output) = check_status(&c, "legacy", "legacy-http");
        (status == "critical").then_some(output)
    });
    assert!(output.contains("200"), "{output}");
    backend.status.store(302, Ordering::SeqCst);
    eventually("302 passes", Duration::from_secs(15), || {
        (check_status(&c, "legacy", "legacy-http").0 == "passing").then_some(())
    });
    let bad = c.put(
        "/v1/agent/service/register",
        r#"{"Name":"x","Check":{"HTTP":"http://127.0.0.1:1/","Interval":"1s","ExpectedStatus":"399-300"}}"#,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("ExpectedStatus"), "{}", bad.body);
}

#[test]
fn services_and_checks_from_the_config_file_register_and_follow_reloads() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    let define = |name: &str| {
        format!(
            "[[services]]\nname = \"{name}\"\nport = {}\n[services.check]\nhttp = \"http://{}/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\n",
            backend.addr.port(),
            backend.addr
        )
    };
    std::fs::write(&config, define("from-config")).expect("write config");
    let data = dir.path().join("data");
    let agent = Agent::start_in(&data, &["--config", config.to_str().expect("utf8")]);
    let c = agent.client();
    eventually(
        "the config's check to pass",
        Duration::from_secs(15),
        || {
            let (status, _) = check_status(&c, "from-config", "service:from-config");
            (status == "passing").then_some(())
        },
    );

    std::fs::write(&config, define("renamed")).expect("rewrite config");
    agent.signal("HUP");
    eventually(
        "the reload to swap the services",
        Duration::from_secs(15),
        || {
            let services = c.get_ok("/v1/agent/services").json();
            let ok = services.get("renamed").is_some() && services.get("from-config").is_none();
            ok.then_some(())
        },
    );

    // A bad service definition is refused at startup with its place.
    std::fs::write(
        &config,
        "[[services]]\nport = 1\n[services.check]\nhttp = \"http://x/\"\n",
    )
    .expect("write bad config");
    let out = crate::cli::check_config(&config);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("services[0]"), "{err}");
}
