//! API tokens with roles: every route needs its role, a refused write changes
//! nothing, and an API reachable from other hosts needs tokens.

use std::time::Duration;

use crate::proxy::agent_with;

pub(crate) const READ: &str = "read-token-0123456789";
const REGISTER: &str = "register-token-0123456789";
pub(crate) const OPERATOR: &str = "operator-token-0123456789";

pub(crate) fn config() -> String {
    format!(
        "[[api.tokens]]\nname = \"dashboards\"\nsecret = \"{READ}\"\nrole = \"read\"\n\
         [[api.tokens]]\nname = \"scheduler\"\nsecret = \"{REGISTER}\"\nrole = \"register\"\n\
         [[api.tokens]]\nname = \"oncall\"\nsecret = \"{OPERATOR}\"\nrole = \"operator\"\n"
    )
}

/// How a token travels.
#[derive(Clone, Copy)]
enum Carry {
    Header,
    Bearer,
    Query,
}

/// Sends one request; returns the status and the body.
fn send(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
    token: Option<(&str, Carry)>,
) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut url = format!("{base}{path}");
    let mut headers = Vec::new();
    match token {
        Some((token, Carry::Header)) => headers.push(("X-Consul-Token", token.to_string())),
        Some((token, Carry::Bearer)) => headers.push(("Authorization", format!("Bearer {token}"))),
        Some((token, Carry::Query)) => {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("token=");
            url.push_str(token);
        }
        None => {}
    }
    let response = match method {
        "GET" => {
            let mut request = agent.get(&url);
            for (k, v) in &headers {
                request = request.header(*k, v);
            }
            request.call()
        }
        "DELETE" => {
            let mut request = agent.delete(&url);
            for (k, v) in &headers {
                request = request.header(*k, v);
            }
            request.call()
        }
        _ => {
            let mut request = agent.put(&url);
            for (k, v) in &headers {
                request = request.header(*k, v);
            }
            request.send(body)
        }
    };
    let mut response = response.expect("request");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, text)
}

#[test]
fn every_route_needs_its_role_and_refused_writes_change_nothing() {
    let (agent, _dir) = agent_with(&config());
    let base = agent.api.clone();
    // Something to act on, registered by the scheduler's token.
    let (status, body) = send(
        &base,
        "PUT",
        "/v1/switchyard/batch",
        r#"{"nodes":[{"name":"n1","address":"10.0.0.1"}],"endpoints":[{"node":"n1","service":"web","id":"web-1","port":80,"checks":[{"ttl":"1m"}]}]}"#,
        Some((REGISTER, Carry::Header)),
    );
    assert_eq!(status, 200, "{body}");
    let reg_svc = r#"{"Name":"api","ID":"api-1","Port":9000,"Check":{"TTL":"30s"}}"#;
    // (method, path, body, least role: 0 read, 1 register, 2 operator)
    let routes: &[(&str, &str, &str, u8)] = &[
        ("GET", "/v1/agent/self", "", 0),
        ("GET", "/v1/agent/services", "", 0),
        ("GET", "/v1/agent/checks", "", 0),
        ("GET", "/v1/agent/service/api-1", "", 0),
        ("GET", "/v1/catalog/datacenters", "", 0),
        ("GET", "/v1/catalog/services", "", 0),
        ("GET", "/v1/catalog/service/web", "", 0),
        ("GET", "/v1/catalog/nodes", "", 0),
        ("GET", "/v1/catalog/node/n1", "", 0),
        ("GET", "/v1/health/service/web", "", 0),
        ("GET", "/v1/health/checks/web", "", 0),
        ("GET", "/v1/health/state/any", "", 0),
        ("GET", "/v1/health/node/n1", "", 0),
        ("GET", "/v1/status/leader", "", 0),
        ("GET", "/v1/status/peers", "", 0),
        ("GET", "/v1/switchyard/status", "", 0),
        ("GET", "/v1/switchyard/services", "", 0),
        ("GET", "/v1/switchyard/services/web", "", 0),
        ("GET", "/v1/switchyard/nodes", "", 0),
        ("GET", "/v1/switchyard/nodes/n1/drain", "", 0),
        ("GET", "/v1/switchyard/endpoints/web-1/drain", "", 0),
        ("GET", "/metrics", "", 0),
        ("PUT", "/v1/agent/service/register", reg_svc, 1),
        (
            "PUT",
            "/v1/agent/check/register",
            r#"{"Name":"c","CheckID":"c1","TTL":"30s"}"#,
            1,
        ),
        ("PUT", "/v1/agent/check/pass/c1", "", 1),
        ("PUT", "/v1/agent/check/warn/c1", "", 1),
        ("PUT", "/v1/agent/check/fail/c1", "", 1),
        (
            "PUT",
            "/v1/agent/check/update/c1",
            r#"{"Status":"passing"}"#,
            1,
        ),
        ("PUT", "/v1/agent/check/deregister/c1", "", 1),
        (
            "PUT",
            "/v1/catalog/register",
            r#"{"Node":"n2","Address":"10.0.0.2"}"#,
            1,
        ),
        ("PUT", "/v1/catalog/deregister", r#"{"Node":"n2"}"#, 1),
        ("PUT", "/v1/switchyard/heartbeat", r#"{"checks":[]}"#, 1),
        (
            "PUT",
            "/v1/switchyard/batch",
            r#"{"nodes":[{"name":"n3","address":"10.0.0.3"}]}"#,
            1,
        ),
        ("PUT", "/v1/agent/service/deregister/api-1", "", 1),
        ("PUT", "/v1/agent/maintenance?enable=true", "", 2),
        ("PUT", "/v1/agent/maintenance?enable=false", "", 2),
        (
            "PUT",
            "/v1/agent/service/maintenance/web-1?enable=false",
            "",
            2,
        ),
        ("PUT", "/v1/switchyard/nodes/n1/drain", "", 2),
        ("DELETE", "/v1/switchyard/nodes/n1/drain", "", 2),
        ("PUT", "/v1/switchyard/endpoints/web-1/drain", "", 2),
        ("DELETE", "/v1/switchyard/endpoints/web-1/drain", "", 2),
    ];
    let index = |base: &str| -> u64 {
        let (_, body) = send(
            base,
            "GET",
            "/v1/switchyard/status",
            "",
            Some((READ, Carry::Header)),
        );
        serde_json::from_str::<serde_json::Value>(&body).expect("status")["index"]
            .as_u64()
            .expect("index")
    };
    let tokens = [READ, REGISTER, OPERATOR];
    for &(method, path, body, least) in routes {
        let before = index(&base);
        let (status, text) = send(&base, method, path, body, None);
        assert_eq!(status, 401, "{method} {path} without a token: {text}");
        assert!(text.contains("requires a token"), "{text}");
        let (status, _) = send(
            &base,
            method,
            path,
            body,
            Some(("not-a-known-token-at-all", Carry::Header)),
        );
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        for (role, token) in tokens.iter().enumerate() {
            if (role as u8) < least {
                let (status, text) = send(&base, method, path, body, Some((token, Carry::Bearer)));
                assert_eq!(status, 403, "{method} {path} with the {role} token: {text}");
                assert!(text.contains("Permission denied"), "{text}");
            }
        }
        if method != "GET" {
            assert_eq!(
                index(&base),
                before,
                "a refused {method} {path} changed the catalog"
            );
        }
        // The least role is enough (the token carried in the query this time).
        let (status, text) = send(
            &base,
            method,
            path,
            body,
            Some((tokens[least as usize], Carry::Query)),
        );
        assert!(
            status != 401 && status != 403,
            "{method} {path} with its role: {status} {text}"
        );
    }
}

#[test]
fn the_cli_sends_its_token() {
    let (agent, _dir) = agent_with(&config());
    let run = |token: Option<&str>| {
        let mut command = std::process::Command::new(crate::support::bin());
        command.args(["services"]).env("SWITCHYARD_API", &agent.api);
        match token {
            Some(token) => command.env("SWITCHYARD_TOKEN", token),
            None => command.env_remove("SWITCHYARD_TOKEN"),
        };
        command.output().expect("run")
    };
    let out = run(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = run(Some(READ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(crate::support::bin())
        .args(["--token", READ, "drain", "node", "n1"])
        .env("SWITCHYARD_API", &agent.api)
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
}

#[test]
fn the_api_speaks_tls_and_can_require_client_certificates() {
    use std::io::{Read, Write};
    let pki = crate::proxy::TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| certs.path().join(name).to_str().expect("utf8").to_string();
    let ca = pki.write_ca(certs.path());
    pki.leaf(certs.path(), "127.0.0.1");
    pki.leaf(certs.path(), "scheduler");
    // A client certificate from a CA the agent does not trust.
    let strangers = tempfile::tempdir().expect("tempdir");
    crate::proxy::TestPki::new().leaf(strangers.path(), "scheduler");
    let stranger = |ext: &str| {
        let path = strangers.path().join(format!("scheduler.{ext}"));
        path.to_str().expect("utf8").to_string()
    };
    let (agent, _dir) = agent_with(&format!(
        "[api]\nmetrics_addr = \"127.0.0.1:0\"\n[api.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        at("127.0.0.1.pem"),
        at("127.0.0.1.key"),
        ca.to_str().expect("utf8"),
    ));
    assert!(agent.api.starts_with("https://"), "{}", agent.api);
    let batch = certs.path().join("batch.json");
    std::fs::write(
        &batch,
        r#"{"nodes":[{"name":"n1","address":"10.3.0.1"}],
            "endpoints":[{"node":"n1","service":"pay","id":"pay-1","port":9000}]}"#,
    )
    .expect("write");
    let cli = |args: &[&str], cert: Option<(String, String)>| {
        let mut command = std::process::Command::new(crate::support::bin());
        command
            .args(args)
            .env("SWITCHYARD_API", &agent.api)
            .env("SWITCHYARD_CACERT", &ca);
        if let Some((cert, key)) = cert {
            command.args(["--client-cert", &cert, "--client-key", &key]);
        }
        command.output().expect("run")
    };
    let ours = || Some((at("scheduler.pem"), at("scheduler.key")));

    // With the CA and a client certificate it signed: a write and a read.
    let out = cli(&["register", batch.to_str().expect("utf8")], ours());
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["services", "--json"], ours());
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"pay\""));

    // Without a client certificate, or with a stranger's, nothing gets through.
    let index = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).to_string();
    let before = cli(&["status", "--json"], ours());
    let other = certs.path().join("other.json");
    std::fs::write(
        &other,
        r#"{"endpoints":[{"node":"n1","service":"evil","id":"evil-1","port":1}]}"#,
    )
    .expect("write");
    for cert in [None, Some((stranger("pem"), stranger("key")))] {
        let out = cli(&["register", other.to_str().expect("utf8")], cert);
        assert!(!out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"),
            "{out:?}"
        );
    }
    let after = cli(&["status", "--json"], ours());
    let status = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_str(&index(out)).expect("status --json")
    };
    assert!(status(&before)["index"].as_u64().is_some(), "{before:?}");
    assert_eq!(status(&before)["index"], status(&after)["index"]);
    let out = cli(&["services", "--json"], ours());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("evil"));

    // Without our CA the agent's certificate is not trusted.
    let out = std::process::Command::new(crate::support::bin())
        .args(["services", "--client-cert", &at("scheduler.pem")])
        .args(["--client-key", &at("scheduler.key")])
        .env("SWITCHYARD_API", &agent.api)
        .env_remove("SWITCHYARD_CACERT")
        .output()
        .expect("run");
    assert!(!out.status.success(), "{out:?}");

    // Cleartext HTTP to the API gets no HTTP answer.
    let addr = agent.api.trim_start_matches("https://");
    let mut plain = std::net::TcpStream::connect(addr).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    plain
        .write_all(b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");

    // The metrics listener is HTTPS too, with the same client rule.
    let metrics = agent.metrics.expect("metrics listener");
    let scrape = |cert: Option<(String, String)>| {
        let mut command = std::process::Command::new(crate::support::bin());
        command
            .args(["status"])
            .env("SWITCHYARD_API", format!("https://{metrics}"))
            .env("SWITCHYARD_CACERT", &ca);
        if let Some((cert, key)) = cert {
            command.args(["--client-cert", &cert, "--client-key", &key]);
        }
        command.output().expect("run")
    };
    // `status` is not served there (404), but the handshake decides first.
    let out = scrape(None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"),
        "{out:?}"
    );
    let out = scrape(ours());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );

    // A key that is not the certificate's, or a missing file, is a config
    // error naming its key.
    let path = certs.path().join("bad.toml");
    for (cert, key, named) in [
        (at("127.0.0.1.pem"), at("scheduler.key"), "api.tls"),
        (at("missing.pem"), at("127.0.0.1.key"), "api.tls.cert"),
    ] {
        std::fs::write(
            &path,
            format!("[api.tls]\ncert = {cert:?}\nkey = {key:?}\n"),
        )
        .expect("write");
        let out = crate::cli::check_config(&path);
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(named),
            "{out:?}"
        );
    }
}

#[test]
fn an_api_reachable_from_other_hosts_needs_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[api]\naddr = \"0.0.0.0:0\"\n").expect("write");
    let out = crate::cli::check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.tokens"), "{err}");
    // A short secret is refused too.
    std::fs::write(
        &path,
        "[[api.tokens]]\nsecret = \"short\"\nrole = \"read\"\n",
    )
    .expect("write");
    let out = crate::cli::check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 characters"));
}

#[test]
fn slowloris_clients_are_cut_at_the_header_timeout_while_others_are_served() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Instant;
    const SLOW: usize = 64;
    let (agent, _dir) =
        agent_with("[http]\nheader_timeout = \"3s\"\n[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = crate::proxy::Upstream::start("web1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    let served_before = up.served();

    // Each slow client starts a head and then sends one byte every 100 ms,
    // never finishing it, until the agent answers or closes (at most 15 s).
    let cut = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Barrier::new(SLOW + 1));
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let (cut, started, addr) = (cut.clone(), started.clone(), agent.http);
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                let begun = Instant::now();
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n")
                    .expect("write");
                started.wait();
                let mut answer = Vec::new();
                let dribble = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
                for &byte in dribble.iter().cycle() {
                    if begun.elapsed() > Duration::from_secs(15) {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                    if stream.write_all(&[byte]).is_err() {
                        break;
                    }
                }
                cut.fetch_add(1, Ordering::SeqCst);
                (
                    String::from_utf8_lossy(&answer).to_string(),
                    begun.elapsed(),
                )
            })
        })
        .collect();

    // Every slow client has started its head; others are served meanwhile.
    started.wait();
    let mut served_while_slow_open = 0;
    for _ in 0..50 {
        let reply = crate::proxy::get(agent.http, "h", "/");
        assert_eq!(reply.status, 200, "{reply:?}");
        if cut.load(Ordering::SeqCst) == 0 {
            served_while_slow_open += 1;
        }
    }
    assert!(
        served_while_slow_open > 0,
        "no request was served while the slow clients held their connections"
    );

    // Each slow client gets a 408 no earlier than the header timeout, and
    // none of their requests reached the backend.
    for handle in slow {
        let (answer, elapsed) = handle.join().expect("slow client");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{answer:?} after {elapsed:?}"
        );
        assert!(answer.contains("http.header_timeout"), "{answer:?}");
        assert!(elapsed >= Duration::from_secs(3), "cut after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(15), "never cut");
    }
    assert_eq!(up.served(), served_before + 50);
    assert!(c
        .metric("switchyard_proxy_rejected_total{reason=\"client_timeout\"}")
        .is_some_and(|n| n >= SLOW as f64));
}

#[test]
fn a_client_that_stops_reading_is_cut_after_the_body_timeout() {
    use std::io::{Read, Write};
    const BODY: usize = 64 << 20;
    let (agent, _dir) =
        agent_with("[http]\nbody_timeout = \"2s\"\n[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = crate::proxy::Upstream::start("web1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    let open = || {
        c.metric("switchyard_proxy_client_connections")
            .unwrap_or(-1.0)
    };
    // The backend echoes 64 MiB, far more than the sockets between us hold;
    // this client sends it all and then reads nothing.
    let mut stream = std::net::TcpStream::connect(agent.http).expect("connect");
    stream
        .write_all(
            format!("POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: {BODY}\r\n\r\n").as_bytes(),
        )
        .expect("head");
    stream.write_all(&vec![b'x'; BODY]).expect("body");
    crate::support::eventually(
        "the proxy drops the connection of a client that stopped reading",
        Duration::from_secs(30),
        || (open() == 0.0).then_some(()),
    );
    // Meanwhile and after, others are served.
    assert_eq!(crate::proxy::get(agent.http, "h", "/").status, 200);
    // What was in flight arrives, then the end: well short of the body.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got > 0, "the response had started");
    assert!(got < BODY, "the whole body arrived ({got} bytes)");
}

#[test]
fn every_limit_names_its_key_when_hit() {
    let (agent, _dir) = agent_with(
        "[api]\nmax_body_bytes = 1024\nmax_batch_endpoints = 1\nmax_blocking_queries = 1\n\
         [http]\nmax_header_bytes = 1024\n",
    );
    let c = agent.client();
    let index = c.get_ok("/v1/catalog/services").index;
    let endpoint = |id: &str| format!(r#"{{"node":"n1","service":"s","id":"{id}","port":1}}"#);
    let batch = |endpoints: &[String]| {
        format!(
            r#"{{"nodes":[{{"name":"n1","address":"10.0.0.1"}}],"endpoints":[{}]}}"#,
            endpoints.join(",")
        )
    };
    let padded = format!(
        r#"{{"nodes":[{{"name":"n1","address":"10.0.0.1","meta":{{"pad":"{}"}}}}]}}"#,
        "x".repeat(2000)
    );
    for (body, status, key) in [
        (padded, 413, "api.max_body_bytes"),
        (
            batch(&[endpoint("a"), endpoint("b")]),
            400,
            "api.max_batch_endpoints",
        ),
    ] {
        let answer = c.put("/v1/switchyard/batch", &body);
        assert_eq!(answer.status, status, "{answer:?}");
        assert!(answer.body.contains(key), "{answer:?}");
    }
    assert_eq!(
        c.get_ok("/v1/catalog/services").index,
        index,
        "refused writes change nothing"
    );

    // One blocking query waits; the next one is refused.
    let waiting = {
        let c = agent.client();
        std::thread::spawn(move || c.get(&format!("/v1/catalog/services?index={index}&wait=3s")))
    };
    crate::support::eventually("a blocking query waits", Duration::from_secs(10), || {
        (c.metric("switchyard_api_blocking_queries") == Some(1.0)).then_some(())
    });
    let refused = c.get(&format!("/v1/catalog/services?index={index}&wait=3s"));
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(
        refused.body.contains("api.max_blocking_queries"),
        "{refused:?}"
    );
    assert_eq!(waiting.join().expect("waiting query").status, 200);

    // The proxy's head limit.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "y".repeat(2000)
    );
    let reply = crate::proxy::raw(agent.http, big.as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    assert!(reply.body.contains("http.max_header_bytes"), "{reply:?}");
}

#[test]
fn one_client_cannot_hold_more_than_its_share_of_connections() {
    use std::io::{Read, Write};
    let (agent, _dir) =
        agent_with("[http]\nmax_connections_per_client = 2\n[[http.routes]]\nservice = \"web\"\n");
    let c = agent.client();
    let up = crate::proxy::Upstream::start("web1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    let open = || {
        let stream = std::net::TcpStream::connect(agent.http).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
    };
    let mut held: Vec<_> = (0..2).map(|_| open()).collect();
    let mut buf = Vec::new();
    for stream in &mut held {
        let (status, _) = crate::drain::keep_alive_get(stream, &mut buf).expect("served");
        assert_eq!(status, 200);
    }
    // A third connection from the same address is refused with a 429.
    let mut third = open();
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("http.max_connections_per_client"), "{text}");
    assert!(c
        .metric("switchyard_proxy_rejected_total{reason=\"client_connection_limit\"}")
        .is_some_and(|n| n >= 1.0));
    // Closing one frees its slot.
    drop(held.pop());
    crate::support::eventually("a freed slot", Duration::from_secs(10), || {
        let mut stream = open();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer)
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
}

#[test]
fn request_bodies_over_the_route_limit_are_refused_or_cut() {
    let (agent, _dir) = agent_with(
        "[http]\nmax_body_bytes = 1000\n[[http.routes]]\npath_prefix = \"/small\"\nservice = \"web\"\nmax_body_bytes = 10\n[[http.routes]]\nservice = \"web\"\n",
    );
    let c = agent.client();
    let up = crate::proxy::Upstream::start("web1");
    crate::proxy::register(&c, "web", &[&up], &[]);
    let post = |path: &str, body: &str| {
        crate::proxy::raw(
            agent.http,
            format!(
                "POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let ok = post("/small/echo", "12345");
    assert_eq!(ok.status, 200, "{ok:?}");
    let served = up.served();
    let refused = post("/small/echo", &"x".repeat(100));
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(refused.body.contains("max_body_bytes"), "{refused:?}");
    assert_eq!(
        up.served(),
        served,
        "a refused body never reaches the backend"
    );
    // The table-wide limit applies to the other route.
    assert_eq!(post("/echo", &"y".repeat(500)).status, 200);
    assert_eq!(post("/echo", &"y".repeat(2000)).status, 413);
    // A chunked body is cut when it passes the limit: no response comes back.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(agent.http).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"POST /small/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "an oversized chunked body is not answered 200"
    );
    assert!(c
        .metric("switchyard_proxy_rejected_total{reason=\"body_too_large\"}")
        .is_some_and(|n| n >= 3.0));

    // The same limit over HTTP/2.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let (mut sender, _) = crate::support::h2c(agent.http).await;
        for (size, expected) in [(5usize, 200u16), (100, 413)] {
            let request = hyper::Request::post("http://h/small/echo")
                .body(Full::new(Bytes::from(vec![b'z'; size])))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            assert_eq!(response.status().as_u16(), expected, "{size} bytes over h2");
        }
    });
}

/// The request counter's `method` label takes only the methods the API
/// knows: a client that invents methods (before any token check) adds no
/// series of its own; its requests count as `other`.
#[test]
fn invented_methods_do_not_grow_the_metric_labels() {
    let agent = crate::support::Agent::start();
    let addr: std::net::SocketAddr = agent
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("api addr");
    for method in ["BREW", "WHEN", "XYZZY"] {
        let request =
            format!("{method} /v1/agent/self HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = crate::proxy::raw(addr, request.as_bytes());
        assert!(answer.status >= 400, "{method}: {}", answer.status);
    }
    let metrics = agent.client().get_ok("/metrics").body;
    for method in ["BREW", "WHEN", "XYZZY"] {
        assert!(!metrics.contains(method), "{method} became a label");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_api_requests_total{")
                && l.contains("method=\"other\"")),
        "{metrics}"
    );
}

/// A child process killed (and reaped) when dropped, also when a test fails.
pub(crate) struct Reaped(pub(crate) std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent started by bash under `ulimit ARGS` (data in `dir`, stderr to
/// `stderr`, `extra` arguments after the usual ones), with its ready line;
/// killed when dropped.
pub(crate) fn agent_under_ulimit(
    args: &str,
    dir: &std::path::Path,
    stderr: &std::path::Path,
    extra: &str,
) -> (Reaped, serde_json::Value) {
    use std::io::{BufRead, BufReader};
    let command = format!(
        "ulimit {args} && exec {} agent --api-addr 127.0.0.1:0 --dns-addr 127.0.0.1:0 \
         --http-addr 127.0.0.1:0 --data-dir {} --node-name t {extra}",
        crate::support::bin(),
        dir.join("data").display()
    );
    let mut child = std::process::Command::new("bash")
        .args(["-c", &command])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr"))
        .spawn()
        .expect("start the agent");
    let stdout = child.stdout.take().expect("stdout");
    let child = Reaped(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let ready = serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
    (child, ready)
}

/// CPU seconds (user + system) a process has used, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .expect("stat fields");
    // utime and stime are fields 14 and 15 (11 and 12 after the name).
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Out of descriptors, the accept loops of DNS over TCP and the proxy pause
/// between tries instead of spinning: the agent, started under `ulimit -n
/// 1024` and then given a limit just above what it holds (below its
/// budget's caps, which would refuse the flood first), flooded with
/// connections, stays cheap and quiet (a line per 10 s), and the failures
/// are counted.
#[test]
fn accept_loops_out_of_descriptors_stay_quiet_and_cheap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr_path = dir.path().join("agent.stderr");
    let (child, ready) = agent_under_ulimit("-n 1024", dir.path(), &stderr_path, "");
    let dns: std::net::SocketAddr = ready["dns"].as_str().expect("dns").parse().expect("addr");
    let http: std::net::SocketAddr = ready["http"].as_str().expect("http").parse().expect("addr");
    let api = ready["api_url"].as_str().expect("api").to_string();
    let pid = child.0.id();
    let open = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let low = (open() + 40) as u64;
    let lowered = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={low}:{low}")])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(lowered.success(), "prlimit failed");

    // Hold connections until the agent runs out of descriptors; the rest
    // wait in the listeners' backlogs, keeping them readable.
    let mut held = Vec::new();
    for _ in 0..160 {
        if let Ok(stream) = std::net::TcpStream::connect(dns) {
            held.push(stream);
        }
    }
    for _ in 0..20 {
        if let Ok(stream) = std::net::TcpStream::connect(http) {
            held.push(stream);
        }
    }
    crate::support::eventually(
        "the agent at its descriptor limit",
        Duration::from_secs(10),
        || (open() as u64 + 8 >= low).then_some(()),
    );
    let before = cpu_seconds(pid);
    let window = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    let elapsed = window.elapsed().as_secs_f64();
    assert!(
        used < 0.5 * elapsed,
        "the agent used {used:.2} s of CPU in {elapsed:.2} s at its descriptor limit: spinning"
    );
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let lines = log.lines().filter(|l| l.contains("accept failing")).count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} accept-failure lines (one per listener per 10 s expected):\n{log}"
    );

    // Once the connections close, the failures are there to see.
    drop(held);
    let client = crate::support::Client::new(&api);
    let metrics =
        crate::support::eventually("the API answers again", Duration::from_secs(20), || {
            let answer = client.get("/metrics");
            (answer.status == 200).then_some(answer.body)
        });
    let count = |family: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(family))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        count("switchyard_dns_tcp_accept_errors_total") > 0.0,
        "{metrics}"
    );
    drop(child);
}

/// A `Content-Length` over `api.max_body_bytes` gets its 413 before any byte
/// of the body is sent (issue 26: the refusal used to come after 64 MiB).
#[test]
fn an_api_body_declared_too_large_is_refused_before_it_is_sent() {
    use std::io::{Read, Write};
    let agent = crate::support::Agent::start();
    let addr: std::net::SocketAddr = agent
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("api addr");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(
            b"PUT /v1/switchyard/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
        )
        .expect("send the head only");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "no 413 with the body unsent: {text:?}"
    );
    assert!(text.contains("api.max_body_bytes"), "{text}");
    // Nothing changed.
    let services = agent.client().get_ok("/v1/catalog/services").json();
    assert_eq!(services.as_object().map(|o| o.len()), Some(0), "{services}");
}

/// Consul-shaped limits on what a write may carry: each refusal names its
/// limit and changes nothing; output and notes are cut; errors quote a
/// client's input only in part.
#[test]
fn registrations_over_the_consul_limits_are_refused_with_the_limit_named() {
    let (agent, _dir) = agent_with("[api]\nmax_tags = 3\ncheck_output_max_size = 100\n");
    let c = agent.client();
    let before = c.get_ok("/v1/catalog/services").index;
    let meta: serde_json::Map<String, serde_json::Value> = (0..65)
        .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
        .collect();
    let cases = [
        (
            serde_json::json!({"Name": "m", "ID": "m1", "Port": 1, "Meta": meta}),
            "api.max_meta_keys",
        ),
        (
            serde_json::json!({"Name": "m", "ID": "m1", "Port": 1, "Meta": {"k": "v".repeat(513)}}),
            "api.max_meta_value_length",
        ),
        (
            serde_json::json!({"Name": "m", "ID": "m1", "Port": 1, "Meta": {"k".repeat(129): "v"}}),
            "api.max_meta_key_length",
        ),
        (
            serde_json::json!({"Name": "m", "ID": "m1", "Port": 1, "Tags": ["a", "b", "c", "d"]}),
            "api.max_tags",
        ),
        (
            serde_json::json!({"Name": "m", "ID": "m1", "Port": 1, "Tags": ["t".repeat(600)]}),
            "api.max_tag_length",
        ),
    ];
    for (body, limit) in cases {
        let answer = c.put("/v1/agent/service/register", &body.to_string());
        assert_eq!(answer.status, 400, "{limit}: {}", answer.body);
        assert!(answer.body.contains(limit), "{limit}: {}", answer.body);
        assert!(
            answer.body.len() < 400,
            "the error quotes in part: {}",
            answer.body
        );
    }
    let batch = serde_json::json!({"nodes": [{"name": "n1", "address": "10.0.0.1", "meta": meta}]});
    let answer = c.put("/v1/switchyard/batch", &batch.to_string());
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("api.max_meta_keys"), "{}", answer.body);
    assert_eq!(
        c.get_ok("/v1/catalog/services").index,
        before,
        "refused writes changed nothing"
    );

    // Output and notes are cut, the registration kept.
    c.put_ok(
        "/v1/agent/service/register",
        &serde_json::json!({"Name": "o", "ID": "o1", "Port": 1,
            "Check": {"TTL": "1m", "Notes": "n".repeat(5000)}})
        .to_string(),
    );
    c.put_ok(
        "/v1/agent/check/pass/service:o1?note=".to_string().as_str(),
        "",
    );
    let update = serde_json::json!({"Status": "passing", "Output": "x".repeat(10_000)});
    c.put_ok("/v1/agent/check/update/service:o1", &update.to_string());
    let checks = c.get_ok("/v1/health/checks/o").json();
    let check = &checks[0];
    assert_eq!(check["Output"].as_str().map(str::len), Some(100), "{check}");
    assert_eq!(check["Notes"].as_str().map(str::len), Some(100), "{check}");

    // A heartbeat naming a huge unknown id gets a bounded quote of it back.
    let beat = serde_json::json!({"checks": [{"node": "nope", "id": "z".repeat(100_000)}]});
    let answer = c.put_ok("/v1/switchyard/heartbeat", &beat.to_string());
    assert!(
        answer.body.len() < 1000,
        "{} bytes echoed",
        answer.body.len()
    );
}

/// The agent raises its soft limit on open descriptors to the hard limit at
/// start (issue 26, item 2, first part): a flood meets the hard limit, not
/// the usual soft 1024.
#[test]
fn the_agent_raises_its_descriptor_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, ready) =
        agent_under_ulimit("-S -n 256", dir.path(), &dir.path().join("stderr"), "");
    assert_eq!(ready["ready"], true, "{ready}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).expect("limits");
    drop(child);
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    // "Max open files <soft> <hard> files"
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "256", "the soft limit was not raised: {open_files}");
    assert_eq!(soft, hard, "{open_files}");
}
