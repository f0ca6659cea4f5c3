use super::*;

fn client() -> Client {
    Client::new(IpAddr::from([10, 0, 0, 7]), "http")
}

/// Parses `text` with a route for every host; returns the facts and the
/// forwarded head.
fn parse(text: &str) -> Result<(Request, String), HeadError> {
    let mut out = Vec::new();
    let (request, _, _) = parse_request(
        text.as_bytes(),
        16 * 1024,
        100,
        &client(),
        0xabc,
        &mut out,
        |_| Some(HashOn::ClientIp),
        |h| h,
        |_| None,
    )?;
    Ok((request, String::from_utf8(out).expect("utf8")))
}

fn refused(text: &str) -> &'static str {
    match parse(text) {
        Err(HeadError::Bad(why)) => why,
        Err(other) => panic!("{text:?}: expected Bad, got {other:?}"),
        Ok(_) => panic!("{text:?} was accepted"),
    }
}

#[test]
fn ambiguous_framing_is_refused() {
    let cases = [
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "more than one"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", "invalid"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "invalid"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", "invalid"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", "invalid"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "other than chunked"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "other than chunked"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", "other than chunked"),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
        ("GET / HTTP/1.1\r\n\r\n", "Host"),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
        ("GET / HTTP/1.1\r\nHost: a:port\r\n\r\n", "invalid Host"),
        ("GET http://evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n", "path"),
        ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "path"),
        ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", "version"),
        ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", "malformed"),
        ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "malformed"),
    ];
    for (text, why) in cases {
        let got = refused(text);
        assert!(got.contains(why), "{text:?}: {got:?} lacks {why:?}");
    }
}

#[test]
fn oversized_heads_are_too_large_and_partial_heads_wait() {
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    assert_eq!(parse(&big).err(), Some(HeadError::TooLarge));
    let unfinished = format!("GET / HTTP/1.1\r\nX-Big: {}", "y".repeat(20_000));
    assert_eq!(parse(&unfinished).err(), Some(HeadError::TooLarge));
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    assert_eq!(parse(&many).err(), Some(HeadError::TooLarge));
    assert_eq!(
        parse("GET / HTTP/1.1\r\nHost: a\r\n").err(),
        Some(HeadError::Partial)
    );
}

#[test]
fn forwarded_head_drops_hop_by_hop_and_adds_forwarding_headers() {
    let (request, head) = parse(
        "GET /x?y=1 HTTP/1.1\r\nHost: Api.Example.com:8080\r\nConnection: keep-alive, X-Secret\r\n\
         X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: basic x\r\n\
         X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n",
    )
    .expect("valid");
    assert_eq!(request.host.as_str(), "api.example.com");
    assert!(request.keep_alive && request.idempotent && !request.upgrade);
    assert_eq!(request.framing, Framing::None);
    assert!(head.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{head}");
    for gone in [
        "X-Secret",
        "Keep-Alive",
        "TE:",
        "Proxy-Authorization",
        "Connection",
        "https",
    ] {
        assert!(!head.contains(gone), "{gone} forwarded:\n{head}");
    }
    for kept in [
        "Host: Api.Example.com:8080\r\n",
        "Accept: */*\r\n",
        "x-forwarded-for: 1.2.3.4, 10.0.0.7\r\n",
        "x-forwarded-proto: http\r\n",
        "x-forwarded-host: Api.Example.com:8080\r\n",
        "forwarded: for=10.0.0.7;host=\"Api.Example.com:8080\";proto=http\r\n",
        "x-request-id: 0000000000000abc\r\n",
    ] {
        assert!(head.contains(kept), "{kept:?} missing:\n{head}");
    }
    assert!(head.ends_with("\r\n\r\n"));
}

#[test]
fn client_request_id_is_kept_and_bodies_are_framed() {
    let (request, head) =
        parse("POST /p HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\nContent-Length: 12\r\n\r\n")
            .expect("valid");
    assert_eq!(request.framing, Framing::Length(12));
    assert!(!request.idempotent);
    assert!(head.contains("X-Request-Id: mine") && !head.contains("x-request-id"));
    let (request, head) = parse(
        "PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("valid");
    assert_eq!(request.framing, Framing::Chunked);
    assert!(request.expect_continue && request.idempotent);
    assert!(head.contains("transfer-encoding: chunked\r\n") && !head.contains("Expect"));
    let (request, head) = parse("GET / HTTP/1.0\r\n\r\n").expect("1.0 without Host");
    assert!(!request.keep_alive);
    assert!(head.starts_with("GET / HTTP/1.0\r\n") && head.contains("connection: close"));
    let (request, head) =
        parse("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .expect("upgrade");
    assert!(request.upgrade);
    assert!(head.contains("connection: upgrade\r\nupgrade: websocket\r\n"));
}

#[test]
fn hash_keys_come_from_the_route_choice() {
    let mut out = Vec::new();
    let key = |on: HashOn, text: &str| {
        let mut out = Vec::new();
        parse_request(
            text.as_bytes(),
            16384,
            100,
            &client(),
            1,
            &mut out,
            |_| Some(on.clone()),
            |h| h,
            |_| None,
        )
        .expect("valid")
        .2
    };
    let text = "GET / HTTP/1.1\r\nHost: a\r\nX-User: alice\r\nCookie: a=1; session=s1; b=2\r\n\r\n";
    let user = key(HashOn::Header("x-user".into()), text);
    assert!(user.is_some());
    assert_eq!(
        user,
        key(HashOn::Header("x-user".into()), &text.replace("a=1", "a=9"))
    );
    assert_ne!(
        user,
        key(
            HashOn::Header("x-user".into()),
            &text.replace("alice", "bob")
        )
    );
    let session = key(HashOn::Cookie("session".into()), text);
    assert_eq!(session, Some(crate::balance::hash64(b"s1")));
    assert_eq!(key(HashOn::Cookie("none".into()), text), None);
    assert!(key(HashOn::ClientIp, text).is_some());
    // No route: nothing to forward; only the request line (for the access log).
    let (_, route, _) = parse_request(
        text.as_bytes(),
        16384,
        100,
        &client(),
        1,
        &mut out,
        |_| None::<HashOn>,
        |h| h,
        |_| None,
    )
    .expect("valid");
    assert!(route.is_none());
    let line = String::from_utf8(out.clone()).expect("utf8");
    assert!(
        line.ends_with("\r\n") && line.lines().count() == 1 && line.starts_with("GET /"),
        "{line:?}"
    );
}

fn response(text: &str, head: bool, close: bool) -> Result<(Response, String), HeadError> {
    let mut out = Vec::new();
    let r = parse_response(text.as_bytes(), 16384, 100, head, close, None, &mut out)?;
    Ok((r, String::from_utf8(out).expect("utf8")))
}

#[test]
fn responses_are_framed_and_rewritten() {
    let (r, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\nhello", false, false)
        .expect("valid");
    assert_eq!(
        (r.status, r.framing, r.reusable),
        (200, Framing::Length(5), true)
    );
    assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
    let (r, out) =
        response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, true).expect("HEAD");
    assert_eq!(r.framing, Framing::None);
    assert!(out.ends_with("connection: close\r\n\r\n"));
    let (r, _) = response("HTTP/1.1 204 No Content\r\n\r\n", false, false).expect("204");
    assert_eq!(r.framing, Framing::None);
    let (r, out) = response(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        false,
        false,
    )
    .expect("chunked");
    assert_eq!(r.framing, Framing::Chunked);
    assert!(out.contains("transfer-encoding: chunked\r\n"));
    let (r, out) = response("HTTP/1.0 200 OK\r\n\r\n", false, false).expect("close-delimited");
    assert_eq!((r.framing, r.reusable), (Framing::Close, false));
    assert!(out.contains("connection: close"));
    let (r, _) = response(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        false,
        false,
    )
    .expect("close");
    assert!(!r.reusable);
    let (r, out) = response(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        false,
        false,
    )
    .expect("101");
    assert_eq!(r.status, 101);
    assert!(out.contains("Upgrade: websocket") && out.contains("Connection: Upgrade"));
    for bad in [
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        "HTTP/1.1 abc OK\r\n\r\n",
    ] {
        assert!(
            matches!(response(bad, false, false), Err(HeadError::Bad(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn chunk_scanner_finds_the_end_and_refuses_garbage() {
    let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    let mut whole = Chunks::default();
    assert_eq!(whole.scan(body), Ok((body.len() - 4, true)));
    // Byte by byte gives the same end.
    let mut split = Chunks::default();
    let mut used = 0;
    for (i, b) in body.iter().enumerate() {
        let (n, done) = split.scan(std::slice::from_ref(b)).expect("valid");
        used += n;
        if done {
            assert_eq!(i + 1, body.len() - 4);
            break;
        }
    }
    assert_eq!(used, body.len() - 4);
    for bad in [
        &b"x\r\n"[..],
        b"5\nhello\r\n",
        b"5\r\nhelloX\r\n",
        b"11111111111111111\r\n",
        b"0\r\nTrailer\n",
        b"\r\n",
    ] {
        assert!(Chunks::default().scan(bad).is_err(), "{bad:?}");
    }
}

/// Decoding gives the content alone, whatever the reads' sizes, and stops
/// at the body's end (after the trailers).
#[test]
fn chunk_decoder_gives_the_content_alone() {
    let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    for cut in [1, 2, 3, 7, body.len()] {
        let mut chunks = Chunks::default();
        let mut content = Vec::new();
        let mut used = 0;
        let mut done = false;
        for piece in body.chunks(cut) {
            let mut at = 0;
            while at < piece.len() && !done {
                let step = chunks.decode(&piece[at..]).expect("valid");
                content.extend_from_slice(&piece[at + step.framing..][..step.data]);
                at += step.framing + step.data;
                done = step.done;
                if step.data == 0 && !step.done {
                    assert_eq!(at, piece.len(), "a piece without content uses all bytes");
                }
            }
            used += at;
            if done {
                break;
            }
        }
        assert!(done, "reads of {cut}");
        assert_eq!(content, b"hello world", "reads of {cut}");
        assert_eq!(used, body.len() - 4, "reads of {cut}");
    }
    assert!(Chunks::default().decode(b"5\r\nhelloX").is_ok());
    let mut bad = Chunks::default();
    let first = bad
        .decode(b"5\r\nhelloX\r\n")
        .expect("the content comes first");
    assert_eq!((first.framing, first.data), (3, 5));
    assert!(
        bad.decode(b"X\r\n").is_err(),
        "content not followed by CRLF"
    );
}

/// Random bodies, chunked at random (sizes in either case, extensions,
/// trailers) and read in random cuts, decode to themselves, and the decoder
/// ends where the scanner does.
#[test]
fn chunk_decoder_round_trips_random_bodies() {
    let mut rng = fastrand::Rng::with_seed(23);
    for _ in 0..500 {
        let content: Vec<u8> = (0..rng.usize(0..3000)).map(|_| rng.u8(..)).collect();
        let mut wire = Vec::new();
        let mut at = 0;
        while at < content.len() {
            let n = rng.usize(1..=(content.len() - at).min(700));
            let size = if rng.bool() {
                format!("{n:x}")
            } else {
                format!("{n:X}")
            };
            wire.extend_from_slice(size.as_bytes());
            if rng.u8(..4) == 0 {
                wire.extend_from_slice(b";name=value");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&content[at..at + n]);
            wire.extend_from_slice(b"\r\n");
            at += n;
        }
        wire.extend_from_slice(b"0\r\n");
        if rng.bool() {
            wire.extend_from_slice(b"x-trailer: 1\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        let end = wire.len();
        wire.extend_from_slice(b"NEXT RESPONSE");
        assert_eq!(Chunks::default().scan(&wire), Ok((end, true)));

        let mut chunks = Chunks::default();
        let mut decoded = Vec::new();
        let (mut at, mut done) = (0, false);
        while !done {
            assert!(at < wire.len(), "the decoder did not end");
            let cut = (at + rng.usize(1..64)).min(wire.len());
            let piece = chunks.decode(&wire[at..cut]).expect("valid");
            decoded.extend_from_slice(&wire[at + piece.framing..][..piece.data]);
            at += piece.framing + piece.data;
            done = piece.done;
        }
        assert_eq!(at, end);
        assert_eq!(decoded, content);
    }
}

#[test]
fn dot_segments_are_found_however_they_are_spelled() {
    for bad in [
        &b"/."[..],
        b"/..",
        b"/public/../admin",
        b"/public/./x",
        b"/a/..?q=1",
        b"/public/%2e%2e/admin",
        b"/public/%2E./admin",
        b"/public/.%2e/admin",
        b"/public/..%2fadmin",
        b"/public%2F..%2Fadmin",
        b"/public\\..\\admin",
        b"/public/%2e",
    ] {
        assert!(has_dot_segment(bad), "{:?}", String::from_utf8_lossy(bad));
    }
    for good in [
        &b"/"[..],
        b"*",
        b"/index.html",
        b"/.well-known/acme-challenge/x",
        b"/a..b/c",
        b"/.../x",
        b"/v1.2/items",
        b"/search?path=/../etc",
        b"/files/%2e%2e%2e",
        b"/caf%C3%A9",
        b"/a%2",
    ] {
        assert!(
            !has_dot_segment(good),
            "{:?}",
            String::from_utf8_lossy(good)
        );
    }
}

/// The head `text` is forwarded as on a route of `config`.
fn forwarded_by(config: &crate::config::RouteConfig, text: &str) -> String {
    let rewrite = crate::policy::Rewrite::from_config(&config.keys())
        .expect("valid")
        .expect("a rewrite");
    let mut out = Vec::new();
    parse_request(
        text.as_bytes(),
        16384,
        100,
        &client(),
        1,
        &mut out,
        |_| Some((HashOn::ClientIp, &rewrite)),
        |r| &r.0,
        |r| Some(r.1),
    )
    .expect("parsed");
    String::from_utf8(out).expect("utf8")
}

#[test]
fn a_route_rewrites_the_forwarded_path_and_host_but_not_x_forwarded_host() {
    let config: crate::config::RouteConfig = toml::from_str(
        "service = \"web\"\npath_prefix = \"/api/\"\nrewrite_prefix = \"/v2/\"\nrewrite_host = \"inside.svc\"",
    )
    .expect("route");
    let head = forwarded_by(
        &config,
        "GET /api/users?id=1 HTTP/1.1\r\nHost: shop.test\r\n\r\n",
    );
    assert!(
        head.starts_with("GET /v2/users?id=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nHost: inside.svc\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-host: shop.test\r\n"),
        "{head}"
    );
}

#[test]
fn a_route_edits_the_forwarded_headers() {
    let config: crate::config::RouteConfig = toml::from_str(
        "service = \"web\"\nrequest_headers = { set = { x-tenant = \"{service}:{client_ip}:{request_id}\" }, \
         add = { x-extra = \"{host}\" }, remove = [\"X-Drop\"] }",
    )
    .expect("route");
    let head = forwarded_by(&config, "GET / HTTP/1.1\r\nHost: shop.test\r\nX-Drop: 1\r\nx-tenant: forged\r\nX-Request-Id: abc\r\nx-extra: kept\r\n\r\n");
    assert!(!head.to_ascii_lowercase().contains("x-drop"), "{head}");
    assert!(!head.contains("forged"), "a set replaces: {head}");
    let ip = &client().ip_text;
    assert!(
        head.contains(&format!("\r\nx-tenant: web:{ip}:abc\r\n")),
        "{head}"
    );
    assert!(
        head.contains("\r\nx-extra: kept\r\n"),
        "an add keeps: {head}"
    );
    assert!(head.contains("\r\nx-extra: shop.test\r\n"), "{head}");
}
