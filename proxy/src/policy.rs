//! A route's answers of its own, judged after the route is found and before
//! any endpoint is picked, on every transport alike: access by client
//! address (`allow`, `deny`: 403) and fixed answers (`respond`, `redirect`).

use std::net::IpAddr;

use serde::Deserialize;

use crate::config::RouteConfig;

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
    pub(crate) fn from_config(route: &RouteConfig) -> Result<Option<Policy>, String> {
        let cidrs = |list: &[String], key: &str| -> Result<Vec<Cidr>, String> {
            list.iter()
                .map(|c| Cidr::parse(c).map_err(|e| format!("{key}: {e}")))
                .collect()
        };
        let allow = cidrs(&route.allow, "allow")?;
        let deny = cidrs(&route.deny, "deny")?;
        let fixed = match (&route.respond, &route.redirect) {
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

    fn route(extra: &str) -> RouteConfig {
        toml::from_str(&format!("service = \"web\"\n{extra}")).expect("route")
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
