//! TLS to the endpoints (issue 27, item 3): a route's `upstream_tls`, its
//! server name and CA file, mutual TLS with a client certificate,
//! `upstream_protocol = "h2"` (HTTP/2 by ALPN), and the tags. The backends
//! are real TLS servers (rustls + hyper) on loopback with a test CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::proxy::{agent_with, get, TestPki};

/// An HTTPS backend for `name` (a leaf of the test CA). It answers every
/// request with its HTTP version and whether the client presented a
/// certificate; with `require_client`, a client without one (signed by the
/// test CA) fails the handshake.
struct TlsBackend {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
}

impl TlsBackend {
    fn start(pki: &TestPki, dir: &Path, name: &str, require_client: bool) -> TlsBackend {
        pki.leaf(dir, name);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
                .expect("leaf file")
                .collect::<Result<_, _>>()
                .expect("leaf");
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(pki.write_ca(dir)).expect("ca file") {
                roots.add(ca.expect("ca")).expect("trust the CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let counted = counted.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        counted.fetch_add(1, Ordering::SeqCst);
                        let (_, session) = tls.get_ref();
                        let h2 = session.alpn_protocol() == Some(b"h2");
                        let client_cert = session.peer_certificates().is_some();
                        let service = hyper::service::service_fn(
                            move |request: hyper::Request<hyper::body::Incoming>| {
                                let body =
                                    format!("{:?} client-cert={client_cert}", request.version());
                                async move {
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                        Full::new(Bytes::from(body)),
                                    ))
                                }
                            },
                        );
                        let io = hyper_util::rt::TokioIo::new(tls);
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(io, service)
                            .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    });
                }
            });
        });
        TlsBackend { addr, handshakes }
    }
}

fn place(c: &crate::support::Client, service: &str, backend: &TlsBackend, tags: &[&str]) {
    let batch = serde_json::json!({
        "nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": service, "id": format!("{service}-1"),
                       "address": "127.0.0.1", "port": backend.addr.port(), "tags": tags}],
    });
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
}

#[test]
fn routes_reach_their_endpoints_over_verified_and_mutual_tls_and_h2() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    let web = TlsBackend::start(&pki, dir, "web.internal", false);
    let secure = TlsBackend::start(&pki, dir, "secure.internal", true);
    pki.leaf(dir, "proxy.client");
    let ca = pki.write_ca(dir);
    let file = |name: &str| dir.join(name).to_string_lossy().to_string();
    let config = format!(
        "[[http.routes]]\nhost = \"tls.test\"\nservice = \"web\"\nupstream_tls = true\n\
         upstream_server_name = \"web.internal\"\nupstream_ca_file = {ca:?}\n\
         [[http.routes]]\nhost = \"h2.test\"\nservice = \"web\"\nupstream_protocol = \"h2\"\n\
         upstream_server_name = \"web.internal\"\nupstream_ca_file = {ca:?}\n\
         [[http.routes]]\nhost = \"wrong-name.test\"\nservice = \"web\"\nupstream_tls = true\n\
         upstream_server_name = \"other.internal\"\nupstream_ca_file = {ca:?}\n\
         [[http.routes]]\nhost = \"mutual.test\"\nservice = \"secure\"\nupstream_tls = true\n\
         upstream_server_name = \"secure.internal\"\nupstream_ca_file = {ca:?}\n\
         upstream_client_cert = {:?}\nupstream_client_key = {:?}\n\
         [[http.routes]]\nhost = \"no-client-cert.test\"\nservice = \"secure\"\nupstream_tls = true\n\
         upstream_server_name = \"secure.internal\"\nupstream_ca_file = {ca:?}\n",
        file("proxy.client.pem"),
        file("proxy.client.key"),
        ca = ca.to_string_lossy(),
    );
    let (agent, _dir) = agent_with(&config);
    let c = agent.client();
    place(&c, "web", &web, &[]);
    place(&c, "secure", &secure, &[]);

    let answer = get(agent.http, "tls.test", "/");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "HTTP/1.1 client-cert=false");
    let answer = get(agent.http, "h2.test", "/");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "HTTP/2.0 client-cert=false", "h2 by ALPN");

    // A gRPC call on an HTTP/1.1-upstream TLS route goes over HTTP/2 (ALPN).
    let call = crate::proxy::raw(
        agent.http,
        b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: tls.test\r\ncontent-type: application/grpc\r\n\
          te: trailers\r\ncontent-length: 5\r\nconnection: close\r\n\r\n\0\0\0\0\0",
    );
    assert!(
        call.body.starts_with("HTTP/2.0"),
        "gRPC over h2 by ALPN: {call:?}"
    );

    let answer = get(agent.http, "mutual.test", "/");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "HTTP/1.1 client-cert=true", "mutual TLS");

    // A certificate that does not name the server name: refused, counted.
    let accepted = web.handshakes.load(Ordering::SeqCst);
    let answer = get(agent.http, "wrong-name.test", "/");
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(
        web.handshakes.load(Ordering::SeqCst),
        accepted,
        "no request went over an unverified connection"
    );
    let failures = c.metric(
        "switchyard_proxy_upstream_tls_failures_total{reason=\"certificate\",service=\"web\"}",
    );
    assert!(failures.is_some_and(|n| n >= 1.0), "{failures:?}");

    // Mutual TLS without a client certificate: the endpoint refuses.
    let answer = get(agent.http, "no-client-cert.test", "/");
    assert_eq!(answer.status, 502, "{answer:?}");
    let text = c.get_ok("/metrics").body;
    assert!(
        text.lines().any(
            |l| l.starts_with("switchyard_proxy_upstream_tls_failures_total{")
                && l.contains("service=\"secure\"")
                && !l.ends_with(" 0")
        ),
        "the refused handshake is counted:\n{text}"
    );
}

/// `switchyard.http.upstream_tls=true`: the tag route speaks TLS, verifying
/// the service's name against the Mozilla roots, which the test CA is not
/// among: refused and counted, never sent in clear.
#[test]
fn the_upstream_tls_tag_makes_a_tag_route_speak_verified_tls() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let backend = TlsBackend::start(&pki, certs.path(), "tagged", false);
    let (agent, _dir) = agent_with("");
    let c = agent.client();
    place(
        &c,
        "tagged",
        &backend,
        &[
            "switchyard.http.host=tagged.test",
            "switchyard.http.upstream_tls=true",
        ],
    );
    crate::support::eventually("the tag route", std::time::Duration::from_secs(5), || {
        let answer = get(agent.http, "tagged.test", "/");
        (answer.status != 404).then_some(answer)
    });
    let answer = get(agent.http, "tagged.test", "/");
    assert_eq!(answer.status, 502, "{answer:?}");
    let failures = c.metric(
        "switchyard_proxy_upstream_tls_failures_total{reason=\"certificate\",service=\"tagged\"}",
    );
    assert!(failures.is_some_and(|n| n >= 1.0), "{failures:?}");
}

#[test]
fn upstream_tls_settings_are_checked_when_the_config_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (config, says) in [
        (
            "[[http.routes]]\nservice = \"web\"\nupstream_tls = true\nupstream_ca_file = \"/nonexistent/ca.pem\"\n",
            "/nonexistent/ca.pem",
        ),
        (
            "[[http.routes]]\nservice = \"web\"\nupstream_tls = true\nupstream_client_cert = \"/x.pem\"\n",
            "upstream_client_key",
        ),
        (
            "[[http.routes]]\nservice = \"web\"\nupstream_ca_file = \"/x.pem\"\n",
            "upstream_tls = true",
        ),
        (
            "[[http.routes]]\nservice = \"web\"\nupstream_tls = true\nupstream_protocol = \"h2c\"\n",
            "h2c",
        ),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["agent", "--check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{config} accepted");
        assert!(stderr.contains(says), "{config}: {stderr}");
    }
}
