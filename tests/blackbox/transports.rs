//! The proxy's resilience over every client transport (issue 27, item 1):
//! HTTP/1.1 (our own wire path), HTTP/2 with prior knowledge and HTTP/2 over
//! TLS (hyper's side) share one request core, so a killed endpoint is
//! retried around, ejected and readmitted, failing endpoints are ejected and
//! fail-open is set and cleared, a drained endpoint gets nothing after the
//! acknowledgment, and a reloaded timeout holds, the same way over each.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::proxy::{agent_with, register, TestPki, Upstream};
use crate::support::{eventually, Agent};

#[derive(Clone, Copy, Debug)]
enum Transport {
    Http1,
    H2c,
    Tls,
}

/// A client of the proxy over one transport (a connection per request).
struct Front {
    transport: Transport,
    runtime: tokio::runtime::Runtime,
    pki: TestPki,
    certs: tempfile::TempDir,
}

impl Front {
    fn new(transport: Transport) -> Front {
        let pki = TestPki::new();
        let certs = tempfile::tempdir().expect("tempdir");
        Front {
            transport,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            pki,
            certs,
        }
    }

    /// An agent with `config` and, for TLS, an HTTPS listener.
    fn agent(&self, config: &str) -> (Agent, tempfile::TempDir) {
        let tls = match self.transport {
            Transport::Tls => self.pki.https_listener(self.certs.path(), "a.test"),
            _ => String::new(),
        };
        agent_with(&format!("{config}\n{tls}"))
    }

    /// One request; its status and body.
    fn send(&self, agent: &Agent, method: &str, body: &str) -> (u16, String) {
        let request = hyper::Request::builder()
            .method(method)
            .uri("/")
            .header("host", "h")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.runtime.block_on(async {
            let response = match self.transport {
                Transport::Http1 => {
                    let tcp = tokio::net::TcpStream::connect(agent.http)
                        .await
                        .expect("connect");
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                            .expect("http/1.1");
                    tokio::spawn(conn);
                    sender.send_request(request).await
                }
                Transport::H2c => {
                    let tcp = tokio::net::TcpStream::connect(agent.http)
                        .await
                        .expect("connect");
                    let (mut sender, conn) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(tcp),
                    )
                    .await
                    .expect("h2c");
                    tokio::spawn(conn);
                    sender.send_request(request).await
                }
                Transport::Tls => {
                    let https = agent.https.expect("an https address");
                    let tcp = tokio::net::TcpStream::connect(https)
                        .await
                        .expect("connect");
                    let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
                    let tls = self
                        .pki
                        .connector(b"h2")
                        .connect(name, tcp)
                        .await
                        .expect("TLS handshake");
                    let (mut sender, conn) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(tls),
                    )
                    .await
                    .expect("h2 over TLS");
                    tokio::spawn(conn);
                    sender.send_request(request).await
                }
            };
            let response = response.expect("a response");
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// `requests` GETs, all of which must succeed: answers by backend name.
    fn counts(&self, agent: &Agent, requests: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..requests {
            let (status, body) = self.send(agent, "GET", "");
            assert_eq!(status, 200, "{:?}: {body}", self.transport);
            *seen.entry(body).or_insert(0) += 1;
        }
        seen
    }
}

fn a_killed_backend_is_retried_around_ejected_and_readmitted(transport: Transport) {
    let front = Front::new(transport);
    let (agent, _dir) = front.agent(
        "[http]\nbalancer = \"round_robin\"\n\
         [http.outlier]\nconsecutive_failures = 3\nbase_ejection = \"1s\"\n\
         [[http.routes]]\nservice = \"web\"\n",
    );
    let c = agent.client();
    let mut ups: Vec<Upstream> = ["k1", "k2", "k3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    assert_eq!(front.counts(&agent, 30).len(), 3, "{transport:?}");
    let dead = ups[0].addr;
    ups[0].kill();
    // Every GET succeeds: a refused connect goes to another endpoint.
    let seen = front.counts(&agent, 60);
    assert_eq!(seen.get("k1"), None, "{transport:?}");
    let ejections = "switchyard_proxy_ejections_total{endpoint=\"k1\",node=\"n1\",service=\"web\"}";
    assert_eq!(
        c.metric(ejections),
        Some(1.0),
        "{transport:?}: k1 ejected once"
    );
    let errors =
        "switchyard_proxy_connect_errors_total{endpoint=\"k1\",node=\"n1\",service=\"web\"}";
    // (Of the failures that ejected it, some may be pooled connections found
    // broken rather than refused connects.)
    let connect_errors = c.metric(errors).unwrap_or(0.0);
    assert!(
        (1.0..=6.0).contains(&connect_errors),
        "{transport:?}: while ejected k1 is not tried: {connect_errors} connect errors"
    );
    ups[0] = Upstream::start_on("k1", dead);
    eventually("k1 readmitted", Duration::from_secs(10), || {
        front.counts(&agent, 6).contains_key("k1").then_some(())
    });
}

#[test]
fn a_killed_backend_is_retried_around_ejected_and_readmitted_over_h2c() {
    a_killed_backend_is_retried_around_ejected_and_readmitted(Transport::H2c);
}

#[test]
fn a_killed_backend_is_retried_around_ejected_and_readmitted_over_tls() {
    a_killed_backend_is_retried_around_ejected_and_readmitted(Transport::Tls);
}

#[test]
fn a_killed_backend_is_retried_around_ejected_and_readmitted_over_http1() {
    a_killed_backend_is_retried_around_ejected_and_readmitted(Transport::Http1);
}

fn failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared(transport: Transport) {
    let front = Front::new(transport);
    let (agent, _dir) = front.agent(
        "[http]\nbalancer = \"round_robin\"\n\
         [http.outlier]\nconsecutive_failures = 2\nbase_ejection = \"2s\"\nmax_ejected_percent = 100\n\
         [[http.routes]]\nservice = \"web\"\n",
    );
    let c = agent.client();
    let ups: Vec<Upstream> = ["f1", "f2", "f3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    let fail_open = || c.metric("switchyard_proxy_fail_open{service=\"web\"}");
    ups[0].status.store(500, Ordering::SeqCst);
    ups[1].status.store(500, Ordering::SeqCst);
    // POST is not retried: 500s reach the client until f1 and f2 are ejected.
    for _ in 0..12 {
        front.send(&agent, "POST", "x");
    }
    // (Few enough to end well within the 2 s ejection.)
    let ok = (0..20)
        .filter(|_| front.send(&agent, "POST", "x").0 == 200)
        .count();
    assert_eq!(ok, 20, "{transport:?}: f3 takes everything");
    assert_eq!(fail_open(), Some(0.0), "{transport:?}");
    // All three fail: fail-open, and ejected endpoints get requests again.
    ups[2].status.store(500, Ordering::SeqCst);
    for _ in 0..10 {
        front.send(&agent, "POST", "x");
    }
    assert_eq!(fail_open(), Some(1.0), "{transport:?}: set");
    // Healed: once the ejections end, fail-open is cleared by this
    // transport's own picks.
    for up in &ups {
        up.status.store(200, Ordering::SeqCst);
    }
    eventually("fail-open cleared", Duration::from_secs(30), || {
        let (status, _) = front.send(&agent, "POST", "x");
        (status == 200 && fail_open() == Some(0.0)).then_some(())
    });
}

#[test]
fn failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared_over_http1() {
    failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared(Transport::Http1);
}

#[test]
fn failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared_over_h2c() {
    failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared(Transport::H2c);
}

#[test]
fn failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared_over_tls() {
    failing_endpoints_are_ejected_and_fail_open_is_set_and_cleared(Transport::Tls);
}

fn a_drained_endpoint_gets_nothing_after_the_ack(transport: Transport) {
    let front = Front::new(transport);
    let (agent, _dir) =
        front.agent("[http]\nbalancer = \"round_robin\"\n[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let ups: Vec<Upstream> = ["d1", "d2", "d3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "web", &ups.iter().collect::<Vec<_>>(), &[]);
    assert_eq!(front.counts(&agent, 30).len(), 3, "{transport:?}");
    // The acknowledgment is the line: every request after it avoids d1.
    let drained = c
        .put_ok("/v1/switchyard/endpoints/d1/drain", r#"{"deadline":"30s"}"#)
        .json();
    assert_eq!(drained["endpoint"], "d1", "{drained}");
    let served = ups[0].served();
    let seen = front.counts(&agent, 30);
    assert_eq!(seen.get("d1"), None, "{transport:?}: {seen:?}");
    assert_eq!(seen.len(), 2, "{transport:?}: {seen:?}");
    assert_eq!(ups[0].served(), served, "{transport:?}");
    let status = c.get_ok("/v1/switchyard/endpoints/d1/drain").json();
    assert_eq!(status["state"], "drained", "{transport:?}: {status}");
}

#[test]
fn a_drained_endpoint_gets_nothing_after_the_ack_over_http1() {
    a_drained_endpoint_gets_nothing_after_the_ack(Transport::Http1);
}

#[test]
fn a_drained_endpoint_gets_nothing_after_the_ack_over_h2c() {
    a_drained_endpoint_gets_nothing_after_the_ack(Transport::H2c);
}

#[test]
fn a_drained_endpoint_gets_nothing_after_the_ack_over_tls() {
    a_drained_endpoint_gets_nothing_after_the_ack(Transport::Tls);
}

/// A route's `response_timeout`, changed by a reload (SIGHUP), holds for the
/// next request over every transport: a slow endpoint's answer that fitted
/// before is cut with a 504 after.
fn a_reloaded_response_timeout_holds(transport: Transport) {
    let front = Front::new(transport);
    let route = |timeout: &str| {
        format!("[[http.routes]]\nservice = \"web\"\nresponse_timeout = \"{timeout}\"\n")
    };
    let (agent, dir) = front.agent(&route("5s"));
    let c = agent.client();
    let slow = Upstream::start("s1");
    slow.delay_ms.store(700, Ordering::SeqCst);
    register(&c, "web", &[&slow], &[]);
    assert_eq!(
        front.send(&agent, "GET", "").0,
        200,
        "{transport:?}: fits 5 s"
    );
    // The same file with the new timeout (and, for TLS, its listener as it was).
    let path = dir.path().join("agent.toml");
    let before = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, before.replace("\"5s\"", "\"200ms\"")).expect("write config");
    agent.signal("HUP");
    eventually("the new timeout holds", Duration::from_secs(10), || {
        (front.send(&agent, "GET", "").0 == 504).then_some(())
    });
}

#[test]
fn a_reloaded_response_timeout_holds_over_http1() {
    a_reloaded_response_timeout_holds(Transport::Http1);
}

#[test]
fn a_reloaded_response_timeout_holds_over_h2c() {
    a_reloaded_response_timeout_holds(Transport::H2c);
}

#[test]
fn a_reloaded_response_timeout_holds_over_tls() {
    a_reloaded_response_timeout_holds(Transport::Tls);
}
