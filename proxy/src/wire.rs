//! HTTP/1.1 heads, strictly: parse with httparse into a fixed array, check
//! framing, and write the rewritten head for the other side in one pass.
//!
//! Refused (400): Content-Length with Transfer-Encoding, more than one
//! Content-Length (even equal ones) or a non-numeric one, any
//! Transfer-Encoding other than exactly `chunked`, a missing or repeated
//! Host on HTTP/1.1, a Host that is not a host name. 431: a head over the
//! byte or field limit. Upstream responses get the same framing rules
//! (a violation is a 502).

use std::net::IpAddr;

use crate::config::{HashOn, HEADER_ARRAY};

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// Why a head could not be used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// More bytes needed.
    Partial,
    /// Over the byte or field limit (431 for requests).
    TooLarge,
    /// Malformed or ambiguous (400 for requests, 502 for responses).
    Bad(&'static str),
}

/// Why a target with a dot-segment is refused (HTTP/1.1 and HTTP/2 alike).
pub(crate) const DOT_SEGMENT: &str =
    "request path has a dot-segment (/./ or /../, also percent-encoded)";

/// True when the path part of a request target (before `?`) has a segment
/// that is `.` or `..`, with the dots percent-encoded or not, and with `/`,
/// `\` or their encodings as separators. Routes match path prefixes, so
/// `/public/../admin` would reach the `/public` route's service and the
/// backend would resolve it to `/admin`; clients that follow RFC 3986 never
/// send such paths, so they are refused rather than rewritten. Paths without
/// `.` or `%` (nearly all) are settled by one scan.
pub(crate) fn has_dot_segment(target: &[u8]) -> bool {
    let path = match target.iter().position(|&b| b == b'?') {
        Some(query) => &target[..query],
        None => target,
    };
    if !path.iter().any(|&b| b == b'.' || b == b'%') {
        return false;
    }
    let mut dots = 0usize;
    let mut other = false;
    let mut i = 0;
    loop {
        // A separator (or the end) closes a segment.
        let separator = match path.get(i..) {
            None | Some([]) => Some(0),
            Some([b'/' | b'\\', ..]) => Some(1),
            Some([b'%', a, b, ..])
                if matches!((a, b.to_ascii_lowercase()), (b'2', b'f') | (b'5', b'c')) =>
            {
                Some(3)
            }
            _ => None,
        };
        if let Some(width) = separator {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            if width == 0 {
                return false;
            }
            dots = 0;
            other = false;
            i += width;
            continue;
        }
        match path.get(i..) {
            Some([b'.', ..]) => {
                dots += 1;
                i += 1;
            }
            Some([b'%', b'2', e, ..]) if e.eq_ignore_ascii_case(&b'e') => {
                dots += 1;
                i += 3;
            }
            _ => {
                other = true;
                i += 1;
            }
        }
    }
}

/// Lowercase host without port, kept inline.
pub(crate) struct Host {
    bytes: [u8; 255],
    len: u8,
}

impl Host {
    fn empty() -> Host {
        Host {
            bytes: [0; 255],
            len: 0,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII host characters are ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }

    /// Takes `value` (a Host header) if it is `name[:port]` or `[v6][:port]`.
    fn set(&mut self, value: &[u8]) -> bool {
        let name = if value.first() == Some(&b'[') {
            match value.iter().position(|&b| b == b']') {
                Some(end) => &value[..=end],
                None => return false,
            }
        } else {
            match value.iter().rposition(|&b| b == b':') {
                Some(colon) => &value[..colon],
                None => value,
            }
        };
        let port = &value[name.len()..];
        let port_ok = port.is_empty()
            || (port.len() > 1 && port.len() <= 6 && port[1..].iter().all(u8::is_ascii_digit));
        let chars_ok = name.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        });
        if name.is_empty() || name.len() > self.bytes.len() || !port_ok || !chars_ok {
            return false;
        }
        for (dst, src) in self.bytes.iter_mut().zip(name) {
            *dst = src.to_ascii_lowercase();
        }
        self.len = name.len() as u8;
        true
    }
}

/// What the connection loop needs to know about a parsed request.
pub(crate) struct Request {
    pub(crate) head_len: usize,
    pub(crate) framing: Framing,
    pub(crate) idempotent: bool,
    pub(crate) is_head: bool,
    /// The client wants the connection kept after this exchange.
    pub(crate) keep_alive: bool,
    pub(crate) upgrade: bool,
    pub(crate) expect_continue: bool,
    pub(crate) host: Host,
    /// `Content-Type: application/grpc-web…`: for hyper's side, which
    /// translates it to gRPC.
    pub(crate) grpc_web: bool,
    /// A CORS preflight (OPTIONS with Access-Control-Request-Method).
    pub(crate) preflight: bool,
    /// Sent here by another datacenter's proxy failing over
    /// (`x-switchyard-failover`): served here or not at all, never sent
    /// on to a third.
    pub(crate) failed_over: bool,
    /// An HTTP/1.0 request (its answer is never sent chunked).
    pub(crate) http10: bool,
}

/// The header a proxy failing over through another datacenter's proxy
/// sends, naming its own datacenter.
pub(crate) const FAILOVER_HEADER: &str = "x-switchyard-failover";

/// Per-connection facts written into every forwarded head.
pub(crate) struct Client {
    pub(crate) ip: IpAddr,
    /// The client address as text (formatted once per connection).
    pub(crate) ip_text: String,
    /// `for=` value of the Forwarded header (IPv6 quoted and bracketed).
    pub(crate) forwarded_for: String,
    pub(crate) proto: &'static str,
}

impl Client {
    pub(crate) fn new(ip: IpAddr, proto: &'static str) -> Client {
        let ip_text = ip.to_string();
        let forwarded_for = match ip {
            IpAddr::V4(_) => ip_text.clone(),
            IpAddr::V6(_) => format!("\"[{ip_text}]\""),
        };
        Client {
            ip,
            ip_text,
            forwarded_for,
            proto,
        }
    }
}

/// The consistent-hash key of a request, as its route says: the client's
/// address, a header's value or a cookie's.
pub(crate) fn hash_key<'h>(
    hash_on: &HashOn,
    ip: IpAddr,
    mut headers: impl Iterator<Item = (&'h str, &'h [u8])>,
) -> Option<u64> {
    match hash_on {
        HashOn::ClientIp => Some(match ip {
            IpAddr::V4(ip) => crate::balance::hash64(&ip.octets()),
            IpAddr::V6(ip) => crate::balance::hash64(&ip.octets()),
        }),
        HashOn::Header(wanted) => headers
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| crate::balance::hash64(trim(value))),
        HashOn::Cookie(wanted) => headers
            .filter(|(name, _)| name.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, value)| value.split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = trim(pair);
                let eq = pair.iter().position(|&b| b == b'=')?;
                (&pair[..eq] == wanted.as_bytes()).then(|| crate::balance::hash64(&pair[eq + 1..]))
            }),
    }
}

/// Methods a retry may repeat (RFC 9110 9.2.2), on every transport.
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

pub(crate) use crate::policy::hop_by_hop;

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &value[start..end]
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

/// Names listed in Connection headers (also hop-by-hop), at most 8.
#[derive(Default)]
struct Listed<'a> {
    names: [&'a [u8]; 8],
    len: usize,
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

impl<'a> Listed<'a> {
    fn read(&mut self, value: &'a [u8]) {
        for token in tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if self.len < self.names.len() {
                self.names[self.len] = token;
                self.len += 1;
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.names[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The length of a complete head within the limits, from httparse's verdict
/// on `buffered` bytes.
fn head_length(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max_bytes: usize,
    malformed: &'static str,
) -> Result<usize, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= max_bytes => Ok(n),
        Ok(httparse::Status::Partial) if buffered < max_bytes => Err(HeadError::Partial),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => Err(HeadError::Bad("unsupported HTTP version")),
        Err(_) => Err(HeadError::Bad(malformed)),
    }
}

fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    let value = trim(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Bad("invalid Content-Length"));
    }
    Ok(value
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// The parts of a request head the route lookup needs.
pub(crate) struct Target<'a> {
    pub(crate) host: &'a str,
    pub(crate) path: &'a [u8],
}

/// Parses a request head from `buf`, checks it, asks `route` (with host and
/// path) which hashing the route wants, and writes the head to forward into
/// `out`. Returns the request facts and the consistent-hash key, if any.
// The limits and the two callbacks are what the fuzz target and the proxy
// pass differently; a parser without I/O takes them as plain arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn parse_request<R>(
    buf: &[u8],
    max_bytes: usize,
    max_headers: usize,
    client: &Client,
    request_id: u64,
    out: &mut Vec<u8>,
    route: impl FnOnce(Target<'_>) -> Option<R>,
    hash_on: impl Fn(&R) -> &HashOn,
    rewrite: impl Fn(&R) -> Option<&crate::policy::Rewrite>,
) -> Result<(Request, Option<R>, Option<u64>), HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADER_ARRAY];
    let mut parsed = httparse::Request::new(&mut headers[..max_headers]);
    let head_len = head_length(
        parsed.parse(buf),
        buf.len(),
        max_bytes,
        "malformed request head",
    )?;
    let (Some(method), Some(path), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HeadError::Bad("malformed request line"));
    };
    let http10 = version == 0;
    if !(path.starts_with('/') || (path == "*" && method == "OPTIONS")) {
        return Err(HeadError::Bad("request target must be a path"));
    }
    if method == "CONNECT" {
        return Err(HeadError::Bad("CONNECT is not served"));
    }
    if has_dot_segment(path.as_bytes()) {
        return Err(HeadError::Bad(DOT_SEGMENT));
    }

    let mut listed = Listed::default();
    let mut host = Host::empty();
    let mut hosts = 0;
    let mut length = None;
    let mut chunked = false;
    let mut upgrade_value: Option<&[u8]> = None;
    let mut expect_continue = false;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut forwarded: Option<&[u8]> = None;
    let mut client_request_id: Option<&[u8]> = None;
    let (mut grpc_web, mut asks_cors, mut failed_over) = (false, false, false);
    for h in parsed.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if !host.set(trim(h.value)) {
                return Err(HeadError::Bad("invalid Host"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(HeadError::Bad("more than one Content-Length"));
            }
            length = Some(parse_length(h.value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !trim(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Bad("Transfer-Encoding other than chunked"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            listed.read(h.value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_value = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("expect") {
            if trim(h.value).eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("forwarded") {
            forwarded = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("x-request-id") {
            client_request_id = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("content-type") {
            let value = trim(h.value);
            grpc_web =
                value.len() >= 20 && value[..20].eq_ignore_ascii_case(b"application/grpc-web");
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            asks_cors = true;
        } else if name.eq_ignore_ascii_case(FAILOVER_HEADER) {
            failed_over = true;
        }
    }
    let preflight = asks_cors && method == "OPTIONS";
    if chunked && length.is_some() {
        return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
    }
    if chunked && http10 {
        return Err(HeadError::Bad("Transfer-Encoding in HTTP/1.0"));
    }
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(HeadError::Bad("HTTP/1.1 needs exactly one Host"));
    }
    let upgrade = listed.upgrade && upgrade_value.is_some() && !http10;
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(0)) | (false, None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if http10 { false } else { !listed.close };

    let Some(route) = route(Target {
        host: host.as_str(),
        path: path.as_bytes(),
    }) else {
        let request = Request {
            head_len,
            framing,
            idempotent: false,
            is_head: false,
            keep_alive,
            upgrade,
            expect_continue,
            host,
            grpc_web,
            preflight,
            failed_over,
            http10,
        };
        // Nothing is forwarded; the request line stays for the access log.
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b"\r\n");
        return Ok((request, None, None));
    };
    let key = hash_key(
        hash_on(&route),
        client.ip,
        parsed.headers.iter().map(|h| (h.name, h.value)),
    );

    // The head to forward (its path and Host as the route rewrites them).
    let rewrite = rewrite(&route);
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match rewrite.filter(|r| r.changes_path()) {
        Some(r) => out.extend_from_slice(r.target(path).as_bytes()),
        None => out.extend_from_slice(path.as_bytes()),
    }
    out.extend_from_slice(if http10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for h in parsed.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || listed.contains(name)
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("x-forwarded-host")
            || name.eq_ignore_ascii_case("forwarded")
            || name.eq_ignore_ascii_case("expect")
            || rewrite.is_some_and(|r| r.request.drops(name))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        match rewrite.and_then(|r| r.host()) {
            Some(host) if name.eq_ignore_ascii_case("host") => {
                out.extend_from_slice(host.as_bytes())
            }
            _ => out.extend_from_slice(h.value),
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(previous) = forwarded_for {
        out.extend_from_slice(previous);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.ip_text.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(client.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    let host_value = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| trim(h.value));
    if let Some(value) = host_value {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"forwarded: ");
    if let Some(previous) = forwarded {
        out.extend_from_slice(previous);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"for=");
    out.extend_from_slice(client.forwarded_for.as_bytes());
    if let Some(value) = host_value {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(value);
        out.push(b'"');
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(client.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if client_request_id.is_none() {
        out.extend_from_slice(b"x-request-id: ");
        push_hex(out, request_id);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(r) = rewrite.filter(|r| !r.request.is_empty()) {
        let ours = format!("{request_id:016x}");
        let cx = crate::policy::Context {
            client_ip: &client.ip_text,
            request_id: client_request_id
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or(&ours),
            host: host.as_str(),
            service: &r.service,
        };
        r.request.write_lines(&cx, out);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(upgrade_value.unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let idempotent = idempotent(method);
    let request = Request {
        head_len,
        framing,
        idempotent,
        is_head: method == "HEAD",
        keep_alive,
        upgrade,
        expect_continue,
        host,
        grpc_web,
        preflight,
        failed_over,
        http10,
    };
    Ok((request, Some(route), key))
}

/// Adds `x-switchyard-failover: <ours>` to a forwarded head (which ends
/// with its blank line): the request goes through another datacenter's
/// proxy, which must serve it there or not at all.
pub(crate) fn mark_failover(head: &mut Vec<u8>, ours: &str) {
    if head.ends_with(b"\r\n\r\n") {
        head.truncate(head.len() - 2);
        head.extend_from_slice(FAILOVER_HEADER.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(ours.as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
    }
}

fn push_hex(out: &mut Vec<u8>, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(DIGITS[((value >> (shift * 4)) & 0xf) as usize]);
    }
}

/// What the connection loop needs to know about an upstream response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) head_len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The upstream connection can carry another request afterwards.
    pub(crate) reusable: bool,
}

/// Parses an upstream response head and writes the head for the client into
/// `out`. `close_client` adds `Connection: close`.
pub(crate) fn parse_response(
    buf: &[u8],
    max_bytes: usize,
    max_headers: usize,
    request_is_head: bool,
    close_client: bool,
    edits: Option<(&crate::policy::HeaderEdits, &[u8])>,
    out: &mut Vec<u8>,
) -> Result<Response, HeadError> {
    out.clear();
    let response = read_response(
        buf,
        max_bytes,
        max_headers,
        request_is_head,
        |line| match line {
            Line::Status(status, reason) => {
                out.extend_from_slice(b"HTTP/1.1 ");
                out.extend_from_slice(&status_digits(status));
                out.push(b' ');
                out.extend_from_slice(reason.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Line::Field(name, _) if edits.is_some_and(|(e, _)| e.drops(name)) => {}
            Line::Field(name, value) => {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        },
    )?;
    if let Some((_, lines)) = edits {
        out.extend_from_slice(lines);
    }
    if response.framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if response.status != 101 && (close_client || response.framing == Framing::Close) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(response)
}

/// A line of a response head that goes on (`read_response`).
pub(crate) enum Line<'a> {
    Status(u16, &'a str),
    Field(&'a str, &'a [u8]),
}

/// Parses an upstream response head: `line` gets the status and reason,
/// then each header that goes on (hop-by-hop ones and those the
/// `Connection` header names dropped, but for a 101's `Upgrade` and
/// `Connection`).
pub(crate) fn read_response(
    buf: &[u8],
    max_bytes: usize,
    max_headers: usize,
    request_is_head: bool,
    mut line: impl FnMut(Line<'_>),
) -> Result<Response, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADER_ARRAY];
    let mut parsed = httparse::Response::new(&mut headers[..max_headers]);
    let head_len = head_length(
        parsed.parse(buf),
        buf.len(),
        max_bytes,
        "malformed response head",
    )?;
    let (Some(status), Some(version)) = (parsed.code, parsed.version) else {
        return Err(HeadError::Bad("malformed status line"));
    };
    let mut listed = Listed::default();
    let mut length = None;
    let mut chunked = false;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(HeadError::Bad("more than one Content-Length"));
            }
            length = Some(parse_length(h.value)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !trim(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Bad("Transfer-Encoding other than chunked"));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            listed.read(h.value);
        }
    }
    if chunked && length.is_some() {
        return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
    }
    let bodiless =
        request_is_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (bodiless, chunked, length) {
        (true, _, _) => Framing::None,
        (false, true, _) => Framing::Chunked,
        (false, false, Some(0)) => Framing::None,
        (false, false, Some(n)) => Framing::Length(n),
        (false, false, None) => Framing::Close,
    };
    let upstream_keeps = if version == 0 {
        listed.keep_alive
    } else {
        !listed.close
    };
    let reusable = upstream_keeps && framing != Framing::Close && status != 101;

    line(Line::Status(status, parsed.reason.unwrap_or("")));
    let switching = status == 101;
    for h in parsed.headers.iter() {
        let keep_for_upgrade = switching
            && (h.name.eq_ignore_ascii_case("upgrade")
                || h.name.eq_ignore_ascii_case("connection"));
        if !keep_for_upgrade && (hop_by_hop(h.name) || listed.contains(h.name)) {
            continue;
        }
        line(Line::Field(h.name, h.value));
    }
    Ok(Response {
        head_len,
        status,
        framing,
        reusable,
    })
}

fn status_digits(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Finds the end of a chunked body in a byte stream that is forwarded as is.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// A piece of a chunked body, decoded (`Chunks::decode`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Bytes of chunk framing (sizes, CRLFs, trailers) first...
    pub(crate) framing: usize,
    /// ...then bytes of content (0 when the bytes or the body ended first).
    pub(crate) data: usize,
    /// The body ended (its trailers passed over).
    pub(crate) done: bool,
}

impl Chunks {
    /// Scans `bytes`; returns how many belong to the body (all of them unless
    /// the body ends inside) and whether it ended.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ChunkState::Done => return Ok((i, true)),
                ChunkState::Data => i += self.take_data(bytes.len() - i),
                _ => {
                    self.step(bytes[i])?;
                    i += 1;
                    if self.state == ChunkState::Done {
                        return Ok((i, true));
                    }
                }
            }
        }
        Ok((bytes.len(), self.state == ChunkState::Done))
    }

    /// The next piece of content in `bytes`, the framing before it passed
    /// over (a body relayed decoded, as to an HTTP/2 client).
    pub(crate) fn decode(&mut self, bytes: &[u8]) -> Result<Piece, &'static str> {
        let mut i = 0;
        while i < bytes.len() && self.state != ChunkState::Done {
            if self.state == ChunkState::Data {
                let data = self.take_data(bytes.len() - i);
                return Ok(Piece {
                    framing: i,
                    data,
                    done: false,
                });
            }
            self.step(bytes[i])?;
            i += 1;
        }
        Ok(Piece {
            framing: i,
            data: 0,
            done: self.state == ChunkState::Done,
        })
    }

    /// Up to `available` bytes of the current chunk's data.
    fn take_data(&mut self, available: usize) -> usize {
        let take = available.min(usize::try_from(self.size).unwrap_or(usize::MAX));
        self.size -= take as u64;
        if self.size == 0 {
            self.state = ChunkState::DataCr;
        }
        take
    }

    /// One byte of framing (any state but `Data` and `Done`).
    fn step(&mut self, b: u8) -> Result<(), &'static str> {
        match self.state {
            ChunkState::Size => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if self.digits == 16 {
                        return Err("chunk size too large");
                    }
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self.size << 4 | u64::from(digit);
                    self.digits += 1;
                }
                b';' | b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::Extension,
                b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                _ => return Err("invalid chunk size"),
            },
            ChunkState::Extension => match b {
                b'\r' => self.state = ChunkState::SizeLf,
                b'\n' => return Err("bare LF in chunk extension"),
                _ => {}
            },
            ChunkState::SizeLf => {
                if b != b'\n' {
                    return Err("chunk size line not ended by CRLF");
                }
                self.digits = 0;
                self.state = if self.size == 0 {
                    ChunkState::TrailerStart
                } else {
                    ChunkState::Data
                };
            }
            ChunkState::DataCr => {
                if b != b'\r' {
                    return Err("chunk data not followed by CRLF");
                }
                self.state = ChunkState::DataLf;
            }
            ChunkState::DataLf => {
                if b != b'\n' {
                    return Err("chunk data not followed by CRLF");
                }
                self.state = ChunkState::Size;
            }
            ChunkState::TrailerStart => match b {
                b'\r' => self.state = ChunkState::FinalLf,
                b'\n' => return Err("bare LF in trailer"),
                _ => self.state = ChunkState::TrailerLine,
            },
            ChunkState::TrailerLine => match b {
                b'\r' => self.state = ChunkState::TrailerLf,
                b'\n' => return Err("bare LF in trailer"),
                _ => {}
            },
            ChunkState::TrailerLf => {
                if b != b'\n' {
                    return Err("trailer line not ended by CRLF");
                }
                self.state = ChunkState::TrailerStart;
            }
            ChunkState::FinalLf => {
                if b != b'\n' {
                    return Err("chunked body not ended by CRLF");
                }
                self.state = ChunkState::Done;
            }
            ChunkState::Data | ChunkState::Done => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The request target of a head as the client sent it (`/a?b`), from its
/// request line.
/// The value of header `name` (the first of that name) in a request head
/// httparse has already accepted.
pub(crate) fn header_in_head<'h>(head: &'h [u8], name: &str) -> Option<&'h [u8]> {
    headers_in_head(head, name).next()
}

/// Every value of header `name` in a request head httparse has accepted.
pub(crate) fn headers_in_head<'h, 'n>(
    head: &'h [u8],
    name: &'n str,
) -> impl Iterator<Item = &'h [u8]> + use<'h, 'n> {
    head.split(|b| *b == b'\n').skip(1).filter_map(move |line| {
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

pub(crate) fn request_target(head: &[u8]) -> &str {
    let line = head
        .split(|b| *b == b'\r' || *b == b'\n')
        .next()
        .unwrap_or(b"");
    let mut parts = line.split(|b| *b == b' ');
    let target = parts.nth(1).unwrap_or(b"/");
    std::str::from_utf8(target).unwrap_or("/")
}
