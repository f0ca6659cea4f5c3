//! Entry points for the cargo-fuzz targets `http_request`,
//! `http_response` and `h2_frames` in `fuzz/` (feature `fuzzing`): the route
//! matcher and the request-head parser, checked against a model; an
//! endpoint's response head and chunked body as both HTTP/1.1 clients read
//! them; a client's HTTP/2 frames as the client-facing codec reads them.
//!
//! Input: route lines (`HOST PREFIX`), a NUL byte, then a request head. The
//! routes compile into a table; the head is parsed with it. Checked:
//! - the table picks the route a plain linear model of the lookup rules
//!   picks (exact host, then the longest matching suffix, then any host;
//!   within each, the longest prefix; the first route of a host and prefix wins);
//! - the host the lookup sees is lowercase and has no port;
//! - a head we would forward parses again, with the same framing, host and
//!   route: what a backend is told about the body is what we framed.

use std::net::{IpAddr, Ipv4Addr};

use crate::config::{Config, HostPattern, RouteConfig};
use crate::route::RouteTable;
use crate::wire::{parse_request, Client, Framing, HeadError};

/// Most routes read from one input.
const MAX_ROUTES: usize = 32;

/// Runs one input; panics when an invariant breaks.
pub fn request_head(data: &[u8]) {
    let (routes_part, head) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (&[][..], data),
    };
    let routes = routes(routes_part);
    let config = Config {
        routes: routes
            .iter()
            .enumerate()
            .map(|(i, (host, prefix, _))| RouteConfig {
                host: Some(host.clone()),
                path_prefix: prefix.clone(),
                ..RouteConfig::to_service(&format!("s{i}"))
            })
            .collect(),
        ..Config::default()
    };
    let table = RouteTable::compile(&config, std::iter::empty());
    let client = Client::new(IpAddr::V4(Ipv4Addr::LOCALHOST), "http");

    let mut out = Vec::new();
    let mut seen = None;
    let parsed = parse_request(
        head,
        config.max_header_bytes,
        config.max_headers,
        &client,
        7,
        &mut out,
        |target| {
            seen = Some((target.host.to_string(), target.path.to_vec()));
            table.find(target.host, target.path).cloned()
        },
        |route| &route.hash_on,
        |route| route.rewrite.as_ref(),
    );
    let (request, route) = match parsed {
        Ok((request, route, _)) => (request, route),
        Err(HeadError::Partial | HeadError::TooLarge | HeadError::Bad(_)) => return,
    };
    let Some((host, path)) = seen else {
        panic!("a parsed request was routed without a lookup");
    };
    assert_eq!(host, request.host.as_str());
    assert!(
        !host.bytes().any(|b| b.is_ascii_uppercase()),
        "host {host:?} is not lowercase"
    );
    let expected = model(&routes, &host, &path).map(|i| format!("s{i}"));
    let got = route.as_ref().map(|r| r.service.to_string());
    assert_eq!(got, expected, "route for host {host:?} path {path:?}");
    let Some(route) = route else {
        return;
    };

    // The forwarded head, read by the same strict rules, frames the body
    // the same way and goes to the same place.
    let mut again = Vec::new();
    let reparsed = parse_request(
        &out,
        usize::MAX,
        crate::config::HEADER_ARRAY,
        &client,
        8,
        &mut again,
        |target| table.find(target.host, target.path).cloned(),
        |route| &route.hash_on,
        |route| route.rewrite.as_ref(),
    );
    let (second, second_route, _) = match reparsed {
        Ok(parsed) => parsed,
        Err(e) => panic!(
            "forwarded head does not parse ({e:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(second.head_len, out.len(), "the forwarded head is one head");
    assert_eq!(second.framing, request.framing);
    assert_eq!(second.host.as_str(), request.host.as_str());
    assert_eq!(
        second_route.map(|r| r.service.clone()),
        Some(route.service.clone())
    );
    if request.framing == Framing::None {
        assert!(!contains_header(&out, b"transfer-encoding"));
    }
}

/// Route lines `HOST PREFIX` that the config would accept.
fn routes(text: &[u8]) -> Vec<(String, String, HostPattern)> {
    let text = String::from_utf8_lossy(text);
    text.lines()
        .filter_map(|line| {
            let (host, prefix) = line.split_once(' ')?;
            if !prefix.starts_with('/') {
                return None;
            }
            let pattern = HostPattern::parse(host).ok()?;
            Some((host.to_string(), prefix.to_string(), pattern))
        })
        .take(MAX_ROUTES)
        .collect()
}

/// The lookup rules, written plainly: the index of the winning route.
fn model(routes: &[(String, String, HostPattern)], host: &str, path: &[u8]) -> Option<usize> {
    let best = |tier: &dyn Fn(&HostPattern) -> bool| {
        let mut best: Option<usize> = None;
        for (i, (_, prefix, pattern)) in routes.iter().enumerate() {
            if tier(pattern) && path.starts_with(prefix.as_bytes()) {
                let longer = best.is_none_or(|b| prefix.len() > routes[b].1.len());
                if longer {
                    best = Some(i);
                }
            }
        }
        best
    };
    if let Some(i) = best(&|p| matches!(p, HostPattern::Exact(h) if h == host)) {
        return Some(i);
    }
    let mut suffixes: Vec<&str> = routes
        .iter()
        .filter_map(|(_, _, p)| match p {
            HostPattern::Suffix(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    suffixes.sort_by_key(|s| std::cmp::Reverse(s.len()));
    suffixes.dedup();
    for suffix in suffixes {
        if host.len() > suffix.len() && host.ends_with(suffix) {
            if let Some(i) = best(&|p| matches!(p, HostPattern::Suffix(s) if s == suffix)) {
                return Some(i);
            }
        }
    }
    best(&|p| *p == HostPattern::Any)
}

fn contains_header(head: &[u8], name: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':'
    })
}

/// Runs one endpoint response (entry point of the target `http_response`):
/// the head parser the HTTP/2 side's HTTP/1.1 client reads it with, then,
/// for a chunked body, the decoder fed in cuts the input's last byte sizes.
/// Checked: the head parsed as fields gives the head the HTTP/1.1 path
/// writes (same status and framing); the decoder always makes progress,
/// never gives more content than it read, and ends where the scanner does.
pub fn response(data: &[u8]) {
    use crate::wire::{parse_response, read_response, Chunks, Line};
    let config = Config::default();
    let mut fields = 0usize;
    let read = read_response(
        data,
        config.max_header_bytes,
        config.max_headers,
        false,
        |line| {
            if let Line::Field(..) = line {
                fields += 1;
            }
        },
    );
    let mut out = Vec::new();
    let written = parse_response(
        data,
        config.max_header_bytes,
        config.max_headers,
        false,
        false,
        None,
        &mut out,
    );
    let head = match (read, written) {
        (Ok(read), Ok(written)) => {
            assert_eq!(
                (read.status, read.framing, read.head_len),
                (written.status, written.framing, written.head_len)
            );
            assert!(out.ends_with(b"\r\n\r\n"));
            read
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            return;
        }
        (a, b) => panic!("the two readings disagree: {a:?} / {b:?}"),
    };
    if head.framing != Framing::Chunked {
        return;
    }
    let body = &data[head.head_len..];
    let cut = usize::from(data.last().copied().unwrap_or(1)).max(1);
    let scanned = Chunks::default().scan(body);
    let mut chunks = Chunks::default();
    let (mut at, mut content) = (0, 0);
    while at < body.len() {
        let end = (at + cut).min(body.len());
        let piece = match chunks.decode(&body[at..end]) {
            Ok(piece) => piece,
            Err(_) => {
                assert!(
                    scanned.is_err(),
                    "the decoder refused what the scanner took"
                );
                return;
            }
        };
        assert!(
            piece.framing + piece.data > 0,
            "no progress on {} bytes",
            end - at
        );
        assert!(piece.framing + piece.data <= end - at);
        at += piece.framing + piece.data;
        content += piece.data;
        if piece.done {
            assert_eq!(scanned, Ok((at, true)), "the decoder ended elsewhere");
            break;
        }
    }
    assert!(content <= body.len());
}

/// A client's bytes after the HTTP/2 preface, read by the client-facing
/// codec: the first byte sets how the rest is cut into reads. Panics when
/// an invariant of `h2_server::fuzz_input` breaks.
pub fn h2_frames(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (io, _client) = tokio::io::duplex(64);
    crate::h2_server::fuzz_input(io, rest, usize::from(cut) * 16 + 1);
}

#[cfg(test)]
mod tests {
    /// Chunked, length, close-delimited and broken responses, mutated.
    #[test]
    fn the_response_entry_point_survives_a_corpus() {
        let seeds: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nT: x\r\n\r\n\x03",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close, x-b\r\nX-B: 2\r\n\r\nabc",
            b"HTTP/1.0 101 Switching\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut input = seeds[rng.usize(..seeds.len())].to_vec();
            for _ in 0..rng.usize(0..5) {
                let i = rng.usize(..input.len());
                input[i] = match rng.u8(0..5) {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'0' + rng.u8(0..10),
                    3 => b';',
                    _ => rng.u8(..),
                };
            }
            super::response(&input);
        }
    }

    /// Requests (one in two header blocks, one with a body and trailers),
    /// SETTINGS, PING, WINDOW_UPDATE and RST_STREAM frames, mutated.
    #[test]
    fn the_h2_entry_point_survives_a_corpus() {
        fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, id: u32, payload: &[u8]) {
            let len = payload.len() as u32;
            out.extend_from_slice(&len.to_be_bytes()[1..]);
            out.extend_from_slice(&[kind, flags]);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(payload);
        }
        let mut seed = vec![0];
        frame(&mut seed, 0x4, 0, 0, &[0, 4, 0, 1, 0, 0]);
        let get = [0x82, 0x86, 0x84, 0x41, 1, b'h', 0x40, 1, b'x', 1, b'y'];
        frame(&mut seed, 0x1, 0x5, 1, &get);
        frame(&mut seed, 0x1, 0x0, 3, &get[..4]);
        frame(&mut seed, 0x9, 0x4, 3, &get[4..]);
        let post = [0x83, 0x86, 0x84, 0xbf, 0x0f, 0x0d, 1, b'4', 0xbe];
        frame(&mut seed, 0x1, 0x4, 5, &post);
        frame(&mut seed, 0x0, 0x8, 5, &[2, b'a', b'b', b'c', b'd', 0, 0]);
        frame(&mut seed, 0x1, 0x5, 5, &[0x40, 2, b't', b'r', 1, b'1']);
        frame(&mut seed, 0x6, 0, 0, b"12345678");
        frame(&mut seed, 0x8, 0, 0, &[0, 0, 1, 0]);
        frame(&mut seed, 0x3, 0, 1, &[0, 0, 0, 8]);
        let mut rng = fastrand::Rng::with_seed(27);
        for round in 0..20_000 {
            let mut input = seed.clone();
            input[0] = rng.u8(..);
            if round > 0 {
                for _ in 0..rng.usize(1..6) {
                    let i = rng.usize(1..input.len());
                    input[i] = match rng.u8(0..4) {
                        0 => 0,
                        1 => 0xff,
                        2 => input[i] ^ (1 << rng.u8(0..8)),
                        _ => rng.u8(..),
                    };
                }
            }
            super::h2_frames(&input);
        }
    }

    const SEED: &[u8] = b"api.example.com /\napi.example.com /v2/\n*.example.com /\n\
        *.eu.example.com /static\n* /health\napi.example.com /v2/\n\0\
        GET /v2/items?x=1 HTTP/1.1\r\nHost: API.example.com:8080\r\n\
        Content-Length: 3\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\n\r\n";

    #[test]
    fn the_fuzz_entry_point_survives_a_corpus() {
        let mut rng = fastrand::Rng::with_seed(9);
        let hosts: [&[u8]; 6] = [
            b"API.example.com",
            b"x.eu.example.com",
            b"eu.example.com",
            b"other",
            b"[::1]:80",
            b"a.b.example.com",
        ];
        let paths: [&[u8]; 6] = [b"/", b"/v2/", b"/v2", b"/health/x", b"/static/a", b"*"];
        for _ in 0..20_000 {
            let mut input = SEED.to_vec();
            match rng.u8(0..3) {
                0 => {
                    let host = hosts[rng.usize(..hosts.len())];
                    let path = paths[rng.usize(..paths.len())];
                    let head = format!(
                        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
                        String::from_utf8_lossy(path),
                        String::from_utf8_lossy(host)
                    );
                    let nul = input.iter().position(|&b| b == 0).unwrap_or(0);
                    input.truncate(nul + 1);
                    input.extend_from_slice(head.as_bytes());
                }
                _ => {
                    for _ in 0..rng.usize(1..6) {
                        let i = rng.usize(..input.len());
                        input[i] = match rng.u8(0..4) {
                            0 => b' ',
                            1 => b'\r',
                            2 => b'\n',
                            _ => rng.u8(..),
                        };
                    }
                }
            }
            super::request_head(&input);
        }
    }
}
