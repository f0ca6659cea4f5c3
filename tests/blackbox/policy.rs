//! Ingress policy (issue 32): access by client address and a route's own
//! answers (`respond`, `redirect`), the same over HTTP/1.1, h2c, and TLS
//! with HTTP/2 or HTTP/1.1.

use std::collections::HashMap;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use crate::proxy::{agent_with, get, register, TestPki, Upstream};

/// How a test request reaches the proxy.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Via {
    Http1,
    H2c,
    TlsH2,
    TlsHttp1,
}

/// Sends `request` (a path, and a Host header naming the route's host) to
/// the proxy over `via` on a connection of its own: status, headers
/// (lowercase names), body as received.
pub(crate) fn send(
    via: Via,
    http: std::net::SocketAddr,
    https: std::net::SocketAddr,
    pki: &TestPki,
    mut request: hyper::Request<Empty<Bytes>>,
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .expect("a Host header")
        .to_string();
    if let Via::H2c | Via::TlsH2 = via {
        // HTTP/2 names the host in the URI (:authority).
        let path = request.uri().to_string();
        *request.uri_mut() = format!("https://{host}{path}").parse().expect("uri");
        request.headers_mut().remove(hyper::header::HOST);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let response = match via {
            Via::H2c => {
                let (mut sender, _conn) = crate::support::h2c(http).await;
                sender.send_request(request).await.expect("response")
            }
            Via::Http1 => {
                let tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
                let io = hyper_util::rt::TokioIo::new(tcp);
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("http1");
                tokio::spawn(conn);
                sender.send_request(request).await.expect("response")
            }
            Via::TlsH2 | Via::TlsHttp1 => {
                let tcp = tokio::net::TcpStream::connect(https)
                    .await
                    .expect("connect");
                let name = rustls::pki_types::ServerName::try_from(host).expect("name");
                let alpn: &[u8] = match via {
                    Via::TlsH2 => b"h2",
                    _ => b"http/1.1",
                };
                let tls = pki.connector(alpn).connect(name, tcp).await.expect("TLS");
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Via::TlsH2 = via {
                    let (mut sender, conn) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        io,
                    )
                    .await
                    .expect("h2");
                    tokio::spawn(conn);
                    sender.send_request(request).await.expect("response")
                } else {
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                        .await
                        .expect("http1");
                    tokio::spawn(conn);
                    sender.send_request(request).await.expect("response")
                }
            }
        };
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, headers, body)
    })
}

/// (status, headers, body) of `GET path` on host p.test (HTTP/1.1 as raw
/// bytes on the wire).
fn fetch_all(
    via: Via,
    http: std::net::SocketAddr,
    https: std::net::SocketAddr,
    pki: &TestPki,
    path: &str,
) -> (u16, HashMap<String, String>, String) {
    if let Via::Http1 = via {
        let raw = get(http, "p.test", path);
        return (raw.status, raw.headers, raw.body);
    }
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "p.test")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let (status, headers, body) = send(via, http, https, pki, request);
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// (status, Location, body) of `GET path` on host p.test.
fn fetch(
    via: Via,
    http: std::net::SocketAddr,
    https: std::net::SocketAddr,
    pki: &TestPki,
    path: &str,
) -> (u16, Option<String>, String) {
    let (status, headers, body) = fetch_all(via, http, https, pki, path);
    (status, headers.get("location").cloned(), body)
}

#[test]
fn address_lists_and_fixed_answers_hold_on_every_transport() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let route = |path: &str, extra: &str| {
        format!("[[http.routes]]\nhost = \"p.test\"\npath_prefix = \"{path}\"\nservice = \"web\"\n{extra}")
    };
    let config = [
        pki.https_listener(certs.path(), "p.test"),
        route("/open", ""),
        route("/lan", "allow = [\"10.0.0.0/8\"]\n"),
        route(
            "/lo",
            "allow = [\"127.0.0.1\", \"::1\"]\ndeny = [\"10.0.0.0/8\"]\n",
        ),
        route("/shut", "deny = [\"127.0.0.0/8\"]\n"),
        route(
            "/down",
            "respond = { status = 503, body = \"down for maintenance\" }\n",
        ),
        route(
            "/old",
            "redirect = { to = \"https://{host}{path}\", status = 301 }\n",
        ),
        route(
            "/api/",
            "rewrite_prefix = \"/v2/\"\nrewrite_host = \"inside.svc\"\n",
        ),
        route(
            "/legacy/",
            "rewrite_regex = [\"^/legacy/(\\\\w+)/(.*)$\", \"/$2/$1\"]\n",
        ),
        route(
            "/hdr",
            "request_headers = { set = { x-tenant = \"{service}@{host}\" } }\n\
             response_headers = { set = { x-backend = \"hidden\" }, add = { x-served-by = \"{service}\" }, \
             remove = [\"x-saw-x-forwarded-proto\"] }\n",
        ),
    ]
    .concat();
    let (agent, _dir) = agent_with(&config);
    let https = agent.https.expect("https listener");
    let c = agent.client();
    let up = Upstream::start("web");
    register(&c, "web", &[&up], &[]);

    for via in [Via::Http1, Via::H2c, Via::TlsH2, Via::TlsHttp1] {
        let at = |path: &str| fetch(via, agent.http, https, &pki, path);
        let (status, _, body) = at("/open");
        assert_eq!((status, body.as_str()), (200, "web"), "{via:?}");
        let (status, _, body) = at("/lan");
        assert_eq!(status, 403, "{via:?}: 127.0.0.1 is not in 10/8: {body}");
        assert!(body.contains("allow/deny"), "{via:?}: {body}");
        let (status, _, _) = at("/lo");
        assert_eq!(status, 200, "{via:?}: allowed");
        let (status, _, _) = at("/shut");
        assert_eq!(status, 403, "{via:?}: denied");
        let (status, _, body) = at("/down");
        assert_eq!(status, 503, "{via:?}");
        assert_eq!(body.trim_end(), "down for maintenance", "{via:?}");
        let (status, location, _) = at("/old/page?x=1&y=2");
        assert_eq!(status, 301, "{via:?}");
        assert_eq!(
            location.as_deref(),
            Some("https://p.test/old/page?x=1&y=2"),
            "{via:?}: the target as sent"
        );
        let (status, headers, _) = fetch_all(via, agent.http, https, &pki, "/api/users?id=7");
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(headers["x-saw-target"], "/v2/users?id=7", "{via:?}");
        assert_eq!(headers["x-saw-host"], "inside.svc", "{via:?}");
        assert_eq!(
            headers["x-saw-x-forwarded-host"], "p.test",
            "{via:?}: the client's"
        );
        let (status, headers, _) = fetch_all(via, agent.http, https, &pki, "/legacy/abc/d/e?q");
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(headers["x-saw-target"], "/d/e/abc?q", "{via:?}");
        let (status, headers, _) = fetch_all(via, agent.http, https, &pki, "/hdr");
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(headers["x-saw-x-tenant"], "web@p.test", "{via:?}");
        assert_eq!(headers["x-backend"], "hidden", "{via:?}");
        assert_eq!(headers["x-served-by"], "web", "{via:?}");
        assert!(!headers.contains_key("x-saw-x-forwarded-proto"), "{via:?}");
        assert!(
            headers.contains_key("x-saw-x-forwarded-for"),
            "{via:?}: others kept"
        );
    }
    // Only /open, /lo and the rewrites reached the endpoint.
    assert_eq!(up.served(), 20);
    assert_eq!(
        c.metric("switchyard_proxy_rejected_total{reason=\"forbidden\"}"),
        Some(8.0)
    );
}

#[test]
fn a_bad_policy_is_refused_naming_the_route_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[http.routes]]\nservice = \"web\"\nallow = [\"10.0.0.0/40\"]\n",
    )
    .expect("write");
    let out = crate::cli::check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.routes[0].allow"), "{err}");
}

/// The share of `requests` GETs on ramp.test that endpoint `new` answered,
/// and the seconds since `from` when the last one was sent.
fn share_of_new(
    http: std::net::SocketAddr,
    requests: usize,
    from: std::time::Instant,
) -> (f64, f64) {
    let mut hits = 0;
    for _ in 0..requests {
        let reply = get(http, "ramp.test", "/");
        assert_eq!(reply.status, 200, "{reply:?}");
        hits += usize::from(reply.body == "new");
    }
    (hits as f64 / requests as f64, from.elapsed().as_secs_f64())
}

#[test]
fn slow_start_ramps_a_new_and_an_undrained_endpoint() {
    let window = 8.0;
    let (agent, _dir) = agent_with(
        r#"
[[http.routes]]
host = "ramp.test"
service = "ramp"
balancer = "round_robin"
slow_start = "8s"
"#,
    );
    let c = agent.client();
    let (old, new) = (Upstream::start("old"), Upstream::start("new"));
    register(&c, "ramp", &[&old], &[]);
    assert_eq!(get(agent.http, "ramp.test", "/").body, "old");
    // Full share would be half the requests; just after it joins, the new
    // endpoint gets 10% of that, growing by the time the batch is done.
    let joined = std::time::Instant::now();
    register(&c, "ramp", &[&old, &new], &[]);
    let (share, elapsed) = share_of_new(agent.http, 300, joined);
    let most = (0.1 + 0.9 * (elapsed / window).min(1.0)) / 2.0;
    assert!(share > 0.0, "the new endpoint got nothing");
    assert!(
        share <= most + 0.05,
        "{share} of the requests in the first {elapsed:.1} s; at most {most:.2} expected"
    );
    assert!(elapsed < window / 2.0, "too slow to judge: {elapsed} s");
    // At the end of the window it has its whole share.
    crate::support::eventually(
        "the new endpoint's whole share",
        std::time::Duration::from_secs(30),
        || {
            let (share, _) = share_of_new(agent.http, 200, std::time::Instant::now());
            (share >= 0.45).then_some(())
        },
    );
    // Back from a drain, it ramps again.
    c.put_ok("/v1/switchyard/endpoints/new/drain", "");
    assert!((0..20).all(|_| get(agent.http, "ramp.test", "/").body == "old"));
    let undrained = std::time::Instant::now();
    let answer = c.delete("/v1/switchyard/endpoints/new/drain");
    assert_eq!(answer.status, 200, "{answer:?}");
    let (share, elapsed) = share_of_new(agent.http, 300, undrained);
    let most = (0.1 + 0.9 * (elapsed / window).min(1.0)) / 2.0;
    assert!(
        share > 0.0 && share <= most + 0.05,
        "{share} after the undrain, in {elapsed:.1} s; at most {most:.2} expected"
    );
}

#[test]
fn a_rate_limit_answers_429_with_retry_after_on_every_transport() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    // One bucket for the whole route: 3 requests at once, then one every 30 s.
    let config = [
        pki.https_listener(certs.path(), "p.test"),
        "[[http.routes]]\nhost = \"p.test\"\nservice = \"web\"\n\
         rate_limit = { rate = \"2/m\", burst = 2, key = \"route\" }\n"
            .to_string(),
    ]
    .concat();
    let (agent, _dir) = agent_with(&config);
    let https = agent.https.expect("https listener");
    let c = agent.client();
    let up = Upstream::start("web");
    register(&c, "web", &[&up], &[]);
    let passed = (0..3)
        .filter(|_| fetch_all(Via::Http1, agent.http, https, &pki, "/").0 == 200)
        .count();
    assert_eq!(passed, 3, "the burst passes");
    for via in [Via::Http1, Via::H2c, Via::TlsH2, Via::TlsHttp1] {
        let (status, headers, body) = fetch_all(via, agent.http, https, &pki, "/");
        assert_eq!(status, 429, "{via:?}: {body}");
        let wait: u64 = headers["retry-after"].parse().expect("seconds");
        assert!((1..=30).contains(&wait), "{via:?}: Retry-After {wait}");
        assert!(body.contains("rate_limit"), "{via:?}: {body}");
    }
    assert_eq!(up.served(), 3, "refused requests never go upstream");
    assert_eq!(
        c.metric("switchyard_proxy_rate_limited_total{route=\"p.test/\"}"),
        Some(4.0)
    );
    assert_eq!(
        c.metric("switchyard_proxy_rejected_total{reason=\"rate_limited\"}"),
        Some(4.0)
    );
}

#[test]
fn a_rate_limit_keeps_a_bucket_per_key() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"k.test\"\nservice = \"web\"\n\
         rate_limit = { rate = \"1/m\", burst = 1, key = \"header:X-Api-Key\" }\n\
         [[http.routes]]\nhost = \"ip.test\"\nservice = \"web\"\n\
         rate_limit = { rate = \"1/m\" }\n",
    );
    let c = agent.client();
    let up = Upstream::start("web");
    register(&c, "web", &[&up], &[]);
    let with_key = |key: &str| {
        crate::proxy::get_with(agent.http, "k.test", "/", &format!("X-Api-Key: {key}\r\n")).status
    };
    assert_eq!(
        [with_key("a"), with_key("a"), with_key("a")],
        [200, 200, 429]
    );
    assert_eq!(
        [with_key("b"), with_key("b"), with_key("b")],
        [200, 200, 429]
    );
    assert_eq!(with_key(" a "), 429, "the value is the key, trimmed");
    // Requests without the header are not counted against anyone.
    assert!((0..5).all(|_| get(agent.http, "k.test", "/").status == 200));
    // By client address (the default): one each, and this test is one client.
    assert_eq!(get(agent.http, "ip.test", "/").status, 200);
    let refused = get(agent.http, "ip.test", "/");
    assert_eq!(refused.status, 429);
    assert!(
        refused.headers["retry-after"]
            .parse::<u64>()
            .expect("seconds")
            > 50
    );
    // The route table is rebuilt when a tag route appears: the limits it
    // keeps keep their buckets.
    let other = Upstream::start("other");
    register(&c, "other", &[&other], &["switchyard.http.host=other.test"]);
    assert_eq!(get(agent.http, "other.test", "/").status, 200);
    assert_eq!(get(agent.http, "ip.test", "/").status, 429);
    assert_eq!(with_key("a"), 429);
    assert_eq!(up.served(), 10);
}

#[test]
fn a_cluster_rate_limit_is_shared_by_traffic_through_the_store() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let route = "[[http.routes]]\nhost = \"c.test\"\nservice = \"web\"\n\
                 rate_limit = { rate = \"100/s\", key = \"route\", scope = \"cluster\" }\n";
    let urls = [etcd.url()];
    let a = crate::cluster::agent_on_with(scratch.path(), "agent-a", &urls, "/rl", route);
    let b = crate::cluster::agent_on_with(scratch.path(), "agent-b", &urls, "/rl", route);
    let up = Upstream::start("web");
    register(&a.client(), "web", &[&up], &[]);
    let share = |agent: &crate::support::Agent| {
        agent
            .client()
            .metric("switchyard_proxy_rate_limit_share{route=\"c.test/\"}")
            .unwrap_or(0.0)
    };
    // No traffic yet: each agent admits half.
    crate::support::eventually("even shares", std::time::Duration::from_secs(10), || {
        ((share(&a) - 0.5).abs() < 0.01 && (share(&b) - 0.5).abs() < 0.01).then_some(())
    });
    // Traffic through A only: A's share grows to most of the rate, B keeps
    // its floor (5% divided among the agents).
    let (sa, sb) = crate::support::eventually(
        "shares by traffic",
        std::time::Duration::from_secs(20),
        || {
            for _ in 0..30 {
                let status = get(a.http, "c.test", "/").status;
                assert!(status == 200 || status == 429, "{status}");
            }
            let (sa, sb) = (share(&a), share(&b));
            (sa > 0.9 && sb < 0.1).then_some((sa, sb))
        },
    );
    assert!((sa + sb - 1.0).abs() < 0.06, "shares {sa} + {sb}");
    // Then through B only: the shares follow.
    crate::support::eventually(
        "shares following the traffic",
        std::time::Duration::from_secs(20),
        || {
            for _ in 0..30 {
                let status = get(b.http, "c.test", "/").status;
                assert!(status == 200 || status == 429, "{status}");
            }
            (share(&b) > 0.9 && share(&a) < 0.1).then_some(())
        },
    );
}

/// How many of `requests` GETs of `path` on `host` each endpoint answered.
fn spread(
    http: std::net::SocketAddr,
    host: &str,
    path: &str,
    extra: &str,
    requests: usize,
) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..requests {
        let reply = crate::proxy::get_with(http, host, path, extra);
        assert_eq!(reply.status, 200, "{reply:?}");
        *seen.entry(reply.body).or_insert(0) += 1;
    }
    seen
}

#[test]
fn a_split_divides_requests_by_weight_and_skips_an_empty_subset() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"s.test\"\nservice = \"web\"\nbalancer = \"round_robin\"\n\
         split = [{ tag = \"v1\", weight = 90 }, { tag = \"v2\", weight = 10 }]\n\
         [[http.routes]]\nhost = \"e.test\"\nservice = \"web\"\n\
         split = [{ tag = \"v1\", weight = 50 }, { tag = \"v3\", weight = 50 }]\n",
    );
    let c = agent.client();
    let (a, b, canary) = (
        Upstream::start("v1-a"),
        Upstream::start("v1-b"),
        Upstream::start("v2"),
    );
    register(&c, "web", &[&a, &b], &["v1"]);
    register(&c, "web", &[&canary], &["v2"]);
    let seen = spread(agent.http, "s.test", "/", "", 2000);
    let v2 = seen.get("v2").copied().unwrap_or(0);
    assert!((140..=260).contains(&v2), "10% of 2000 is 200: {seen:?}");
    // Within its subset, each request still goes by the route's balancer.
    let (va, vb) = (seen["v1-a"], seen["v1-b"]);
    assert!(va.abs_diff(vb) <= 2, "round robin within v1: {seen:?}");
    let subset = |route: &str, tag: &str, family: &str| {
        c.metric(&format!(
            "switchyard_proxy_subset_{family}{{route=\"{route}\",subset=\"{tag}\"}}"
        ))
    };
    assert_eq!(subset("s.test/", "v2", "requests_total"), Some(v2 as f64));
    assert_eq!(
        subset("s.test/", "v1", "requests_total"),
        Some((va + vb) as f64)
    );
    // Errors are counted by subset, so a rollout tool can judge the canary.
    canary
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let mut failed = 0;
    for _ in 0..300 {
        failed += usize::from(get(agent.http, "s.test", "/").status == 500);
    }
    assert!(failed > 0);
    assert_eq!(subset("s.test/", "v2", "errors_total"), Some(failed as f64));
    assert_eq!(subset("s.test/", "v1", "errors_total"), Some(0.0));
    // v3 has no endpoint: its half goes to v1, and the metric says so.
    let seen = spread(agent.http, "e.test", "/", "", 100);
    assert_eq!(seen.get("v2"), None, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 100);
    assert_eq!(subset("e.test/", "v3", "routable"), Some(0.0));
    assert_eq!(subset("e.test/", "v1", "routable"), Some(1.0));
    // An endpoint tagged v3 appears: it gets its half.
    let late = Upstream::start("v3");
    register(&c, "web", &[&late], &["v3"]);
    let seen = spread(agent.http, "e.test", "/", "", 400);
    let v3 = seen.get("v3").copied().unwrap_or(0);
    assert!((140..=260).contains(&v3), "half of 400: {seen:?}");
    assert_eq!(subset("e.test/", "v3", "routable"), Some(1.0));
}

#[test]
fn matching_requests_go_to_their_subset_first() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let config = [
        pki.https_listener(certs.path(), "p.test"),
        "[[http.routes]]\nhost = \"p.test\"\nservice = \"web\"\n\
         split = [{ tag = \"stable\", weight = 1 }]\n\
         match = [{ header = \"x-canary\", value = \"1\", tag = \"canary\" },\n\
                  { cookie = \"beta\", value = \"yes\", tag = \"canary\" },\n\
                  { query = \"tier\", value = \"gold\", tag = \"gold\" }]\n"
            .to_string(),
    ]
    .concat();
    let (agent, _dir) = agent_with(&config);
    let https = agent.https.expect("https listener");
    let c = agent.client();
    let (stable, canary) = (Upstream::start("stable"), Upstream::start("canary"));
    register(&c, "web", &[&stable], &["stable"]);
    register(&c, "web", &[&canary], &["canary"]);
    let by = |extra: &str| spread(agent.http, "p.test", "/", extra, 20);
    assert_eq!(by(""), HashMap::from([("stable".to_string(), 20)]));
    assert_eq!(
        by("X-Canary: 1\r\n"),
        HashMap::from([("canary".to_string(), 20)])
    );
    assert_eq!(
        by("X-Canary: 2\r\n"),
        HashMap::from([("stable".to_string(), 20)])
    );
    assert_eq!(
        by("Cookie: a=b; beta=yes\r\n"),
        HashMap::from([("canary".to_string(), 20)])
    );
    // The gold subset has no endpoint yet: matching requests go by the split.
    for via in [Via::Http1, Via::H2c, Via::TlsH2, Via::TlsHttp1] {
        let (status, _, body) = fetch_all(via, agent.http, https, &pki, "/x?tier=gold");
        assert_eq!((status, body.as_str()), (200, "stable"), "{via:?}");
    }
    let gold = Upstream::start("gold");
    register(&c, "web", &[&gold], &["gold"]);
    for via in [Via::Http1, Via::H2c, Via::TlsH2, Via::TlsHttp1] {
        let (status, _, body) = fetch_all(via, agent.http, https, &pki, "/x?tier=gold");
        assert_eq!((status, body.as_str()), (200, "gold"), "{via:?}");
        let (status, _, body) = fetch_all(via, agent.http, https, &pki, "/x?tier=silver");
        assert_eq!((status, body.as_str()), (200, "stable"), "{via:?}");
    }
    // With the stable subset gone, a split with nowhere to send answers 503.
    c.put_ok(
        "/v1/switchyard/batch",
        &serde_json::json!({"deregister": [{"node": "n1", "id": "stable"}]}).to_string(),
    );
    let refused = get(agent.http, "p.test", "/");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("split"), "{refused:?}");
}
