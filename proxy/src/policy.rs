//! A route's answers of its own, judged after the route is found and before
//! any endpoint is picked, on every transport alike: access by client
//! address (`allow`, `deny`: 403) and fixed answers (`respond`, `redirect`).

use std::net::IpAddr;

use serde::Deserialize;

/// A route's keys this module reads (`RouteConfig::keys`).
pub(crate) struct RouteKeys<'a> {
    pub(crate) service: &'a str,
    pub(crate) path_prefix: &'a str,
    pub(crate) allow: &'a [String],
    pub(crate) deny: &'a [String],
    pub(crate) respond: Option<&'a RespondConfig>,
    pub(crate) redirect: Option<&'a RedirectConfig>,
    pub(crate) rewrite_prefix: Option<&'a str>,
    pub(crate) rewrite_regex: Option<&'a [String]>,
    pub(crate) rewrite_host: Option<&'a str>,
    pub(crate) request_headers: Option<&'a HeaderEditsConfig>,
    pub(crate) response_headers: Option<&'a HeaderEditsConfig>,
}

/// `respond = { status = 503, body = "down for maintenance" }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

/// `redirect = { to = "https://{host}{path}", status = 308 }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The Location; `{host}` is the request's host (without its port),
    /// `{path}` its target as the client sent it, query string included.
    pub to: String,
    #[serde(default = "permanent")]
    pub status: u16,
}

fn permanent() -> u16 {
    308
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(bits) => bits
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A route's own answer instead of an endpoint's.
#[derive(Debug, PartialEq, Eq)]
enum Fixed {
    Respond { status: u16, body: Box<str> },
    Redirect { to: Box<str>, status: u16 },
}

/// A route's access lists and fixed answer, built from its configuration.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    fixed: Option<Fixed>,
}

/// What a route's policy says of a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ruling {
    /// On to the endpoints.
    Pass,
    /// The client's address is not let in: 403.
    Forbidden,
    /// A fixed answer: its status, text body and Location (redirects).
    Answer {
        status: u16,
        body: String,
        location: Option<String>,
    },
}

impl Policy {
    /// The route's policy, `None` when it has none; an error names the key.
    pub(crate) fn from_config(route: &RouteKeys<'_>) -> Result<Option<Policy>, String> {
        let cidrs = |list: &[String], key: &str| -> Result<Vec<Cidr>, String> {
            list.iter()
                .map(|c| Cidr::parse(c).map_err(|e| format!("{key}: {e}")))
                .collect()
        };
        let allow = cidrs(route.allow, "allow")?;
        let deny = cidrs(route.deny, "deny")?;
        let fixed = match (route.respond, route.redirect) {
            (Some(_), Some(_)) => return Err("give respond or redirect, not both".into()),
            (Some(r), None) => {
                if !(200..=599).contains(&r.status) {
                    return Err(format!(
                        "respond.status must be 200 to 599, not {}",
                        r.status
                    ));
                }
                Some(Fixed::Respond {
                    status: r.status,
                    body: r.body.as_str().into(),
                })
            }
            (None, Some(r)) => {
                if ![301, 302, 303, 307, 308].contains(&r.status) {
                    return Err(format!(
                        "redirect.status must be 301, 302, 303, 307 or 308, not {}",
                        r.status
                    ));
                }
                let rest = r.to.replace("{host}", "").replace("{path}", "");
                if rest.contains(['{', '}']) {
                    return Err(format!(
                        "redirect.to {:?}: only {{host}} and {{path}} are replaced",
                        r.to
                    ));
                }
                if r.to.is_empty() || r.to.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(format!("redirect.to {:?} is not a URL", r.to));
                }
                Some(Fixed::Redirect {
                    to: r.to.as_str().into(),
                    status: r.status,
                })
            }
            (None, None) => None,
        };
        if allow.is_empty() && deny.is_empty() && fixed.is_none() {
            return Ok(None);
        }
        Ok(Some(Policy { allow, deny, fixed }))
    }

    /// Judges a request from `ip` for `host`; `target` (the request target
    /// as sent) is read only by a redirect.
    pub(crate) fn judge<'t>(
        &self,
        ip: IpAddr,
        host: &str,
        target: impl FnOnce() -> &'t str,
    ) -> Ruling {
        if self.deny.iter().any(|c| c.contains(ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)))
        {
            return Ruling::Forbidden;
        }
        match &self.fixed {
            None => Ruling::Pass,
            Some(Fixed::Respond { status, body }) => Ruling::Answer {
                status: *status,
                body: body.to_string(),
                location: None,
            },
            Some(Fixed::Redirect { to, status }) => {
                let host = strip_port(host);
                let location = to.replace("{host}", host).replace("{path}", target());
                Ruling::Answer {
                    status: *status,
                    body: format!("moved to {location}"),
                    location: Some(location),
                }
            }
        }
    }
}

/// `request_headers` / `response_headers = { set = {...}, add = {...},
/// remove = [...] }`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsConfig {
    /// Replaces the header (or adds it).
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Adds a line, keeping any the message has.
    #[serde(default)]
    pub add: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A piece of a header value template.
#[derive(Debug)]
enum Piece {
    Text(Box<str>),
    ClientIp,
    RequestId,
    Host,
    Service,
}

/// What a header value is made of per request.
pub(crate) struct Context<'a> {
    pub(crate) client_ip: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) host: &'a str,
    pub(crate) service: &'a str,
}

/// A route's header edits of one direction, checked and compiled.
#[derive(Debug, Default)]
pub(crate) struct HeaderEdits {
    /// Lowercase names: set ones replace, add ones append.
    set: Vec<(Box<str>, Vec<Piece>)>,
    add: Vec<(Box<str>, Vec<Piece>)>,
    remove: Vec<Box<str>>,
}

impl HeaderEdits {
    fn from_config(config: &HeaderEditsConfig, key: &str) -> Result<HeaderEdits, String> {
        let name = |n: &str| -> Result<Box<str>, String> {
            let lower = n.to_ascii_lowercase();
            if lower.is_empty() || hyper::header::HeaderName::from_bytes(lower.as_bytes()).is_err()
            {
                return Err(format!("{key}: {n:?} is not a header name"));
            }
            if hop_by_hop(&lower)
                || lower.starts_with("x-forwarded-")
                || [
                    "forwarded",
                    "host",
                    "content-length",
                    "x-request-id",
                    "x-switchyard-failover",
                ]
                .contains(&lower.as_str())
            {
                return Err(format!(
                    "{key}: {n:?} is a hop-by-hop header or one the proxy owns; it cannot be edited \
                     (the Host: rewrite_host)"
                ));
            }
            Ok(lower.into())
        };
        let template = |v: &str| -> Result<Vec<Piece>, String> {
            let mut pieces = Vec::new();
            let mut rest = v;
            while let Some(open) = rest.find('{') {
                if open > 0 {
                    pieces.push(Piece::Text(rest[..open].into()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| format!("{key}: {v:?} has an unclosed {{"))?;
                pieces.push(match &rest[open + 1..open + close] {
                    "client_ip" => Piece::ClientIp,
                    "request_id" => Piece::RequestId,
                    "host" => Piece::Host,
                    "service" => Piece::Service,
                    other => {
                        return Err(format!(
                            "{key}: {{{other}}} in {v:?}: only {{client_ip}}, {{request_id}}, {{host}} and {{service}}"
                        ))
                    }
                });
                rest = &rest[open + close + 1..];
            }
            if !rest.is_empty() {
                pieces.push(Piece::Text(rest.into()));
            }
            if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err(format!("{key}: {v:?} has control characters"));
            }
            Ok(pieces)
        };
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(n, v)| Ok((name(n)?, template(v)?)))
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(HeaderEdits {
            set: pairs(&config.set)?,
            add: pairs(&config.add)?,
            remove: config
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether a header of the message goes: removed, or replaced by a set.
    pub(crate) fn drops(&self, name: &str) -> bool {
        self.remove.iter().any(|n| n.eq_ignore_ascii_case(name))
            || self.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Writes the headers (sets, then adds) as HTTP/1.1 lines, values
    /// rendered for `cx`.
    pub(crate) fn write_lines(&self, cx: &Context<'_>, out: &mut Vec<u8>) {
        for (name, value) in self.lines(cx) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The headers to write (sets, then adds), values rendered for `cx`.
    pub(crate) fn lines<'e>(
        &'e self,
        cx: &'e Context<'_>,
    ) -> impl Iterator<Item = (&'e str, String)> + 'e {
        self.set.iter().chain(&self.add).map(move |(name, pieces)| {
            let mut value = String::new();
            for piece in pieces {
                value.push_str(match piece {
                    Piece::Text(t) => t,
                    Piece::ClientIp => cx.client_ip,
                    Piece::RequestId => cx.request_id,
                    Piece::Host => cx.host,
                    Piece::Service => cx.service,
                });
            }
            // A client's Host or request id could carry what a header
            // line cannot.
            value.retain(|c| !c.is_control());
            (&**name, value)
        })
    }
}

/// What a route changes in a request it forwards: the path (its matched
/// prefix replaced, or a regular expression's replacement), the Host the
/// endpoint sees (`X-Forwarded-Host` keeps the client's), and the headers
/// each way.
#[derive(Debug)]
pub(crate) struct Rewrite {
    prefix: Option<(Box<str>, Box<str>)>,
    regex: Option<(regex::Regex, Box<str>)>,
    host: Option<Box<str>>,
    pub(crate) request: HeaderEdits,
    pub(crate) response: HeaderEdits,
    pub(crate) service: Box<str>,
}

impl Rewrite {
    /// The route's rewrite, `None` when it has none; an error names the key.
    pub(crate) fn from_config(route: &RouteKeys<'_>) -> Result<Option<Rewrite>, String> {
        if route.rewrite_prefix.is_some() && route.rewrite_regex.is_some() {
            return Err("give rewrite_prefix or rewrite_regex, not both".into());
        }
        let prefix = match route.rewrite_prefix {
            Some(to) if !to.starts_with('/') || to.chars().any(|c| c.is_control() || c == ' ') => {
                return Err(format!(
                    "rewrite_prefix {to:?} must be a path starting with '/'"
                ));
            }
            Some(to) => Some((route.path_prefix.into(), to.into())),
            None => None,
        };
        let regex = match route.rewrite_regex {
            None => None,
            Some([pattern, to]) => {
                let compiled = regex::Regex::new(pattern)
                    .map_err(|e| format!("rewrite_regex {pattern:?}: {e}"))?;
                if to.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(format!("rewrite_regex replacement {to:?} is not a path"));
                }
                Some((compiled, to.as_str().into()))
            }
            Some(_) => {
                return Err("rewrite_regex is [PATTERN, REPLACEMENT]".into());
            }
        };
        let host = match route.rewrite_host {
            Some(h)
                if h.is_empty()
                    || !h
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b)) =>
            {
                return Err(format!("rewrite_host {h:?} is not a host name"));
            }
            Some(h) => Some(h.into()),
            None => None,
        };
        let request = match route.request_headers {
            Some(c) => HeaderEdits::from_config(c, "request_headers")?,
            None => HeaderEdits::default(),
        };
        let response = match route.response_headers {
            Some(c) => HeaderEdits::from_config(c, "response_headers")?,
            None => HeaderEdits::default(),
        };
        if prefix.is_none()
            && regex.is_none()
            && host.is_none()
            && request.is_empty()
            && response.is_empty()
        {
            return Ok(None);
        }
        Ok(Some(Rewrite {
            prefix,
            regex,
            host,
            request,
            response,
            service: route.service.into(),
        }))
    }

    /// The target to forward for `target` (path and query as the client
    /// sent them); the query is kept as it is.
    pub(crate) fn target<'t>(&self, target: &'t str) -> std::borrow::Cow<'t, str> {
        use std::borrow::Cow;
        let (path, query) = match target.find('?') {
            Some(at) => target.split_at(at),
            None => (target, ""),
        };
        let path: Cow<'_, str> = if let Some((matched, to)) = &self.prefix {
            match path.strip_prefix(&**matched) {
                Some(rest) => Cow::Owned(format!("{to}{rest}")),
                None => Cow::Borrowed(path),
            }
        } else if let Some((regex, to)) = &self.regex {
            regex.replace(path, &**to)
        } else {
            return Cow::Borrowed(target);
        };
        let slash = if path.starts_with('/') { "" } else { "/" };
        Cow::Owned(format!("{slash}{path}{query}"))
    }

    /// The Host the endpoint sees instead of the client's.
    pub(crate) fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Whether the path changes.
    pub(crate) fn changes_path(&self) -> bool {
        self.prefix.is_some() || self.regex.is_some()
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(at)
            if !host[at..].contains(']') && host[at + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            &host[..at]
        }
        _ => host,
    }
}

/// Headers of one connection (RFC 9110 7.6.1), never forwarded as they are
/// and never edited by a route.
pub(crate) fn hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The reason phrase of a status a policy answers with.
pub(crate) fn reason(status: u16) -> &'static str {
    hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(extra: &str) -> RouteKeys<'static> {
        let config: crate::config::RouteConfig =
            toml::from_str(&format!("service = \"web\"\n{extra}")).expect("route");
        Box::leak(Box::new(config)).keys()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn address_blocks_let_in_and_keep_out() {
        let p = Policy::from_config(&route(
            "allow = [\"10.0.0.0/8\", \"fd00::/8\", \"192.168.1.7\"]\ndeny = [\"10.9.0.0/16\"]",
        ))
        .expect("valid")
        .expect("a policy");
        let judge = |a: &str| p.judge(ip(a), "h", || "/");
        assert_eq!(judge("10.1.2.3"), Ruling::Pass);
        assert_eq!(judge("::ffff:10.1.2.3"), Ruling::Pass, "v4-mapped");
        assert_eq!(judge("fd12::1"), Ruling::Pass);
        assert_eq!(judge("192.168.1.7"), Ruling::Pass);
        assert_eq!(judge("192.168.1.8"), Ruling::Forbidden);
        assert_eq!(judge("10.9.8.7"), Ruling::Forbidden, "deny wins");
        assert_eq!(judge("127.0.0.1"), Ruling::Forbidden);
        let everyone = Policy::from_config(&route("allow = [\"0.0.0.0/0\", \"::/0\"]"))
            .expect("valid")
            .expect("a policy");
        assert_eq!(everyone.judge(ip("8.8.8.8"), "h", || "/"), Ruling::Pass);
        assert_eq!(everyone.judge(ip("2001::1"), "h", || "/"), Ruling::Pass);
    }

    #[test]
    fn redirects_carry_the_host_and_the_target_as_sent() {
        let p = Policy::from_config(&route("redirect = { to = \"https://{host}{path}\" }"))
            .expect("valid")
            .expect("a policy");
        let verdict = p.judge(ip("127.0.0.1"), "shop.test:8080", || "/a/b?x=1&y");
        let Ruling::Answer {
            status, location, ..
        } = verdict
        else {
            panic!("{verdict:?}");
        };
        assert_eq!(status, 308);
        assert_eq!(location.as_deref(), Some("https://shop.test/a/b?x=1&y"));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn rewrites_change_the_path_and_keep_the_query() {
        let prefix =
            Rewrite::from_config(&route("path_prefix = \"/api/\"\nrewrite_prefix = \"/v2/\""))
                .expect("valid")
                .expect("a rewrite");
        assert_eq!(prefix.target("/api/users?id=7"), "/v2/users?id=7");
        assert_eq!(prefix.target("/api/"), "/v2/");
        let regex = Rewrite::from_config(&route(
            "rewrite_regex = [\"^/old/(.*)$\", \"/new/$1\"]\nrewrite_host = \"internal.svc\"",
        ))
        .expect("valid")
        .expect("a rewrite");
        assert_eq!(regex.target("/old/a/b?q=/old/"), "/new/a/b?q=/old/");
        assert_eq!(regex.target("/other"), "/other");
        assert_eq!(regex.host(), Some("internal.svc"));
        let bare = Rewrite::from_config(&route("rewrite_regex = [\"^/x\", \"y\"]"))
            .expect("valid")
            .expect("a rewrite");
        assert_eq!(bare.target("/x/z"), "/y/z", "a path always starts with /");
        let refused = |extra: &str| Rewrite::from_config(&route(extra)).expect_err(extra);
        assert!(refused("rewrite_regex = [\"(\", \"/\"]").starts_with("rewrite_regex"));
        assert!(refused("rewrite_regex = [\"a\"]").contains("[PATTERN, REPLACEMENT]"));
        assert!(refused("rewrite_prefix = \"v2\"").contains("starting with '/'"));
        assert!(refused("rewrite_host = \"a b\"").contains("not a host"));
    }

    #[test]
    fn header_edits_refuse_what_the_proxy_owns_and_unknown_placeholders() {
        let refused = |extra: &str| Rewrite::from_config(&route(extra)).expect_err(extra);
        for owned in [
            "connection",
            "X-Forwarded-For",
            "host",
            "x-request-id",
            "content-length",
        ] {
            let e = refused(&format!("request_headers = {{ remove = [\"{owned}\"] }}"));
            assert!(e.contains("cannot be edited"), "{owned}: {e}");
        }
        let e = refused("response_headers = { set = { x-a = \"{user}\" } }");
        assert!(
            e.starts_with("response_headers") && e.contains("{user}"),
            "{e}"
        );
        let e = refused("request_headers = { add = { \"bad name\" = \"v\" } }");
        assert!(e.contains("not a header name"), "{e}");
        let e = refused("request_headers = { set = { x-a = \"{host\" } }");
        assert!(e.contains("unclosed"), "{e}");
    }

    #[test]
    fn bad_policies_are_refused_naming_the_key() {
        let refused = |extra: &str| Policy::from_config(&route(extra)).expect_err(extra);
        assert!(refused("allow = [\"10.0.0.0/33\"]").starts_with("allow:"));
        assert!(refused("deny = [\"nonsense\"]").starts_with("deny:"));
        assert!(refused("respond = { status = 99 }").contains("respond.status"));
        assert!(refused("redirect = { to = \"/x\", status = 200 }").contains("redirect.status"));
        assert!(refused("redirect = { to = \"https://{hots}/\" }").contains("only {host}"));
        assert!(
            refused("respond = { status = 503 }\nredirect = { to = \"/\" }").contains("not both")
        );
        assert_eq!(Policy::from_config(&route("")), Ok(None));
    }
}
