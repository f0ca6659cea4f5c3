//! Rate limits: `rate_limit = { rate = "100/s", burst = 50, key = ..., scope
//! = ... }` on a route, checked after its access lists and before any
//! endpoint is picked, on every transport alike.
//!
//! Each key's bucket is one atomic word: GCRA's theoretical arrival time
//! (the time at which the bucket would be full again), advanced by one
//! emission interval per admitted request with a compare-and-swap. Keys
//! (client addresses, header values) hash into a fixed table of such words,
//! probed a few slots deep; a key whose bucket is full again has no state
//! worth keeping, so its slot goes to the next key that needs one. When
//! every probed slot holds a live bucket, the one closest to full is taken
//! over (that key starts afresh: the table bounds memory, not accuracy).
//!
//! `scope = "cluster"` divides the rate among the live agents: each admits
//! its share, in proportion to the requests it saw in the last second, as
//! the agents tell each other through the store (see `share`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::balance::hash64;

/// `rate_limit = { rate = "100/s", burst = 50, key = "client_ip", scope = "agent" }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second, minute or hour: `"100/s"`, `"600/m"`, `"10/h"`.
    pub rate: String,
    /// Requests let through at once beyond the steady rate (nginx's
    /// `burst`). Default: a tenth of the rate per second (rounded down), so
    /// that arrivals that jitter around the rate still get all of it (with
    /// 0, 400/s offered against "200/s" admitted 153/s; see bench/RESULTS.md).
    #[serde(default)]
    pub burst: Option<u32>,
    /// What one bucket counts: `"client_ip"` (default), `"header:NAME"`
    /// (requests without the header are not limited) or `"route"` (one
    /// bucket for every request of the route).
    #[serde(default = "client_ip")]
    pub key: String,
    /// `"agent"` (default): this agent admits `rate`. `"cluster"`: the live
    /// agents together admit `rate`.
    #[serde(default)]
    pub scope: Scope,
}

fn client_ip() -> String {
    "client_ip".to_string()
}

/// Where a rate limit's rate holds.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Agent,
    Cluster,
}

/// What a request's bucket is keyed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LimitKey {
    ClientIp,
    /// A request header (name in lowercase).
    Header(Box<str>),
    Route,
}

/// The answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limited {
    Pass,
    /// Over the limit: the seconds after which a request would pass.
    Over {
        retry_after: u64,
    },
}

/// The part of a cluster-scope rate divided evenly among the agents, not
/// by their traffic.
const SHARE_FLOOR: f64 = 0.05;

/// Slots per keyed limiter (a power of two), and how deep a key probes.
const SLOTS: usize = 8192;
const PROBE: usize = 8;

struct Slot {
    /// The key's hash (0 = free).
    key: AtomicU64,
    /// Its bucket's theoretical arrival time (ns on `now_ns`'s clock).
    tat: AtomicU64,
}

/// One route's rate limit, shared by every proxy thread and kept across
/// route-table rebuilds while its configuration stays the same.
pub(crate) struct RateLimiter {
    pub(crate) config: RateLimitConfig,
    /// Requests at once beyond the rate (`burst`, or its default).
    burst: u32,
    pub(crate) key: LimitKey,
    /// The configured rate's emission interval (ns per request).
    base_interval: f64,
    /// The interval this agent admits at (the base one divided by its
    /// share in cluster scope), as f64 bits.
    interval: AtomicU64,
    /// The route's one bucket (`key = "route"`).
    one: AtomicU64,
    /// Keyed buckets (empty for `key = "route"`).
    table: Box<[Slot]>,
    /// Requests seen (admitted or not) since the cluster exchange last
    /// read them.
    pub(crate) seen: AtomicU64,
    /// What the last report took from `seen`.
    last_seen: AtomicU64,
    /// `switchyard_proxy_rate_limited_total` of the route, attached when
    /// the route table is installed.
    pub(crate) refused: OnceLock<prometheus::IntCounter>,
    /// `switchyard_proxy_rate_limit_share` of the route.
    pub(crate) share_gauge: OnceLock<prometheus::Gauge>,
}

impl RateLimiter {
    /// The limiter a route's `rate_limit` describes; an error names the key.
    pub(crate) fn from_config(config: &RateLimitConfig) -> Result<RateLimiter, String> {
        let per_second = parse_rate(&config.rate)?;
        let key = match config.key.as_str() {
            "client_ip" => LimitKey::ClientIp,
            "route" => LimitKey::Route,
            other => match other.strip_prefix("header:") {
                Some(name) if !name.is_empty() && name.bytes().all(is_token) => {
                    LimitKey::Header(name.to_ascii_lowercase().into_boxed_str())
                }
                _ => {
                    return Err(format!(
                        "rate_limit.key must be \"client_ip\", \"header:NAME\" or \"route\", not {other:?}"
                    ))
                }
            },
        };
        let base_interval = 1e9 / per_second;
        let burst = config
            .burst
            .unwrap_or((per_second / 10.0).min(f64::from(u32::MAX)) as u32);
        let table = match key {
            LimitKey::Route => Box::default(),
            _ => (0..SLOTS)
                .map(|_| Slot {
                    key: AtomicU64::new(0),
                    tat: AtomicU64::new(0),
                })
                .collect(),
        };
        Ok(RateLimiter {
            config: config.clone(),
            burst,
            key,
            base_interval,
            interval: AtomicU64::new(base_interval.to_bits()),
            one: AtomicU64::new(0),
            table,
            seen: AtomicU64::new(0),
            last_seen: AtomicU64::new(0),
            refused: OnceLock::new(),
            share_gauge: OnceLock::new(),
        })
    }

    /// Admits or refuses a request from `ip` at `now`; `header` finds one of
    /// its headers' value (the key of `key = "header:NAME"`).
    pub(crate) fn judge<'h>(
        &self,
        ip: IpAddr,
        header: impl FnOnce(&str) -> Option<&'h [u8]>,
        now: u64,
    ) -> Limited {
        let key = match &self.key {
            LimitKey::Route => 0,
            LimitKey::ClientIp => match ip.to_canonical() {
                IpAddr::V4(ip) => hash64(&ip.octets()),
                IpAddr::V6(ip) => hash64(&ip.octets()),
            },
            LimitKey::Header(name) => match header(name) {
                Some(value) => hash64(value.trim_ascii()),
                None => return Limited::Pass,
            },
        };
        self.check(key, now)
    }

    /// Admits or refuses a request whose key hashes to `key` (any value
    /// for `key = "route"`) at `now` (ns on `now_ns`'s clock).
    pub(crate) fn check(&self, key: u64, now: u64) -> Limited {
        if self.config.scope == Scope::Cluster {
            self.seen.fetch_add(1, Ordering::Relaxed);
        }
        let interval = f64::from_bits(self.interval.load(Ordering::Relaxed));
        let step = interval.max(1.0) as u64;
        let tolerance = (interval * f64::from(self.burst)) as u64;
        let cell = match self.key {
            LimitKey::Route => &self.one,
            _ => self.slot(key | 1, now),
        };
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > tolerance {
                let wait = ahead - tolerance;
                if let Some(refused) = self.refused.get() {
                    refused.inc();
                }
                return Limited::Over {
                    retry_after: wait.div_ceil(1_000_000_000).max(1),
                };
            }
            match cell.compare_exchange_weak(
                tat,
                start.saturating_add(step),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Limited::Pass,
                Err(current) => tat = current,
            }
        }
    }

    /// The bucket of `key` (never 0), claiming a slot when it has none.
    fn slot(&self, key: u64, now: u64) -> &AtomicU64 {
        let base = (key as usize) & (SLOTS - 1);
        let probed = (0..PROBE).map(|i| &self.table[(base + i) & (SLOTS - 1)]);
        let mut oldest: Option<&Slot> = None;
        for slot in probed {
            let held = slot.key.load(Ordering::Relaxed);
            if held == key {
                return &slot.tat;
            }
            // A free slot, or a bucket full again (its past holds nothing).
            if (held == 0 || slot.tat.load(Ordering::Relaxed) <= now)
                && slot
                    .key
                    .compare_exchange(held, key, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return &slot.tat;
            }
            if oldest
                .is_none_or(|o| slot.tat.load(Ordering::Relaxed) < o.tat.load(Ordering::Relaxed))
            {
                oldest = Some(slot);
            }
        }
        // Every probed slot is live: the one nearest full starts afresh.
        let slot = oldest.unwrap_or(&self.table[base]);
        slot.key.store(key, Ordering::Relaxed);
        slot.tat.store(0, Ordering::Relaxed);
        &slot.tat
    }

    /// Takes the requests seen since the last report (cluster scope).
    pub(crate) fn take_seen(&self) -> u64 {
        let seen = self.seen.swap(0, Ordering::Relaxed);
        self.last_seen.store(seen, Ordering::Relaxed);
        seen
    }

    /// Sets this agent's share of a cluster-scope rate from the requests
    /// the `others` live agents with this route saw (`others_seen`, summed)
    /// beside its own last count: in proportion to the traffic, except
    /// `SHARE_FLOOR` of the rate divided evenly, so that an agent whose
    /// traffic just began admits some before the next exchange.
    pub(crate) fn share_with(&self, others_seen: u64, others: u32) {
        let mine = self.last_seen.load(Ordering::Relaxed);
        let agents = f64::from(others) + 1.0;
        let total = mine.saturating_add(others_seen);
        let share = match total {
            0 => 1.0 / agents,
            _ => (1.0 - SHARE_FLOOR) * mine as f64 / total as f64 + SHARE_FLOOR / agents,
        };
        self.set_share(share);
    }

    /// Sets this agent's share of a cluster-scope rate (0 < share <= 1).
    pub(crate) fn set_share(&self, share: f64) {
        let share = share.clamp(1e-3, 1.0);
        self.interval
            .store((self.base_interval / share).to_bits(), Ordering::Relaxed);
        if let Some(gauge) = self.share_gauge.get() {
            gauge.set(share);
        }
    }

    /// This agent's share of the rate.
    pub(crate) fn share(&self) -> f64 {
        self.base_interval / f64::from_bits(self.interval.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("share", &self.share())
            .finish_non_exhaustive()
    }
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `"100/s"`, `"600/m"`, `"10/h"` (also `sec`, `min`, `hour`) as requests
/// per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let bad =
        || format!("rate_limit.rate must be like \"100/s\", \"600/m\" or \"10/h\", not {text:?}");
    let (count, unit) = text.split_once('/').ok_or_else(bad)?;
    let count: f64 = count.trim().parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(bad()),
    };
    if !(count.is_finite() && count > 0.0) {
        return Err(format!("rate_limit.rate {text:?} must be above 0"));
    }
    let per_second = count / seconds;
    if per_second > 1e9 {
        return Err(format!("rate_limit.rate {text:?} is over 1e9 per second"));
    }
    Ok(per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(text: &str) -> RateLimiter {
        let config: RateLimitConfig = toml::from_str(text).expect("rate_limit");
        RateLimiter::from_config(&config).expect("limiter")
    }

    const SEC: u64 = 1_000_000_000;

    /// Requests of `key` admitted at evenly spaced times over `seconds`.
    fn admitted(l: &RateLimiter, key: u64, per_second: u64, seconds: u64, from: u64) -> u64 {
        let gap = SEC / per_second;
        (0..per_second * seconds)
            .filter(|i| l.check(key, from + i * gap) == Limited::Pass)
            .count() as u64
    }

    #[test]
    fn the_steady_rate_and_the_burst_pass_and_no_more() {
        let l = limiter("rate = \"100/s\"\nburst = 20\nkey = \"route\"");
        // A burst at one instant: 1 + burst.
        let now = 10 * SEC;
        let at_once = (0..100)
            .filter(|_| l.check(7, now) == Limited::Pass)
            .count();
        assert_eq!(at_once, 21);
        // The next request waits for one interval; Retry-After rounds up.
        assert_eq!(l.check(7, now), Limited::Over { retry_after: 1 });
        assert_eq!(
            l.check(7, now + SEC / 100 - 1),
            Limited::Over { retry_after: 1 }
        );
        assert_eq!(l.check(7, now + SEC / 100 + 1), Limited::Pass);
        // Offered twice the rate for 10 s: the rate (plus what the burst had left).
        let l = limiter("rate = \"100/s\"\nburst = 0\nkey = \"route\"");
        let got = admitted(&l, 0, 200, 10, SEC);
        assert!((1000..=1001).contains(&got), "{got}");
        // The default burst is a tenth of the rate per second.
        let l = limiter("rate = \"100/s\"\nkey = \"route\"");
        let at_once = (0..100)
            .filter(|_| l.check(7, SEC) == Limited::Pass)
            .count();
        assert_eq!(at_once, 11);
        let l = limiter("rate = \"1/m\"\nkey = \"route\"");
        assert_eq!(l.check(7, SEC), Limited::Pass);
        assert!(
            matches!(l.check(7, SEC), Limited::Over { .. }),
            "none below 10/s"
        );
        // Below the rate, everything passes.
        let l = limiter("rate = \"600/m\"\nkey = \"route\"");
        assert_eq!(admitted(&l, 0, 5, 10, SEC), 50);
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let l = limiter("rate = \"1/s\"");
        let now = SEC;
        assert_eq!(l.check(1, now), Limited::Pass);
        assert_eq!(l.check(2, now), Limited::Pass);
        assert!(matches!(l.check(1, now), Limited::Over { .. }));
        assert!(matches!(l.check(2, now), Limited::Over { .. }));
        // Many more keys than slots: each still gets its first request.
        let passed = (3..3 + 3 * SLOTS as u64)
            .filter(|k| l.check(hash64(&k.to_le_bytes()), now) == Limited::Pass)
            .count();
        assert_eq!(passed, 3 * SLOTS);
        // Long after, a key's bucket is full again.
        assert_eq!(l.check(1, now + 5 * SEC), Limited::Pass);
        let hour = limiter("rate = \"10/h\"\nkey = \"header:X-Api-Key\"");
        assert_eq!(hour.key, LimitKey::Header("x-api-key".into()));
        assert_eq!(hour.check(9, now), Limited::Pass);
        assert_eq!(hour.check(9, now), Limited::Over { retry_after: 360 });
    }

    #[test]
    fn a_share_of_a_cluster_rate_admits_that_share() {
        let l = limiter("rate = \"100/s\"\nburst = 0\nkey = \"route\"\nscope = \"cluster\"");
        l.set_share(0.25);
        assert!((l.share() - 0.25).abs() < 1e-9);
        let got = admitted(&l, 0, 100, 10, SEC);
        assert!((250..=251).contains(&got), "{got}");
        assert_eq!(l.seen.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn shares_follow_the_traffic_each_agent_saw() {
        let l = limiter("rate = \"100/s\"\nkey = \"route\"\nscope = \"cluster\"");
        // Alone with the route: all of it.
        l.share_with(0, 0);
        assert_eq!(l.share(), 1.0);
        // Three agents, no traffic anywhere: a third each.
        l.share_with(0, 2);
        assert!((l.share() - 1.0 / 3.0).abs() < 1e-9);
        // This agent saw 300 of 400 requests: 95% of that, plus its third
        // of the 5% floor.
        for _ in 0..300 {
            l.check(0, SEC);
        }
        assert_eq!(l.take_seen(), 300);
        assert_eq!(l.seen.load(Ordering::Relaxed), 0);
        l.share_with(100, 2);
        let want = 0.95 * 0.75 + 0.05 / 3.0;
        assert!((l.share() - want).abs() < 1e-9, "{}", l.share());
        // An agent that saw nothing keeps the floor's part.
        let idle = limiter("rate = \"100/s\"\nkey = \"route\"\nscope = \"cluster\"");
        idle.take_seen();
        idle.share_with(400, 2);
        assert!((idle.share() - 0.05 / 3.0).abs() < 1e-9);
        // The three shares of one exchange add up to the whole rate.
        let third = 0.95 * 0.25 + 0.05 / 3.0;
        assert!((want + third + idle.share() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn bad_limits_are_refused_naming_the_key() {
        for (text, says) in [
            ("rate = \"100\"", "rate_limit.rate"),
            ("rate = \"100/d\"", "rate_limit.rate"),
            ("rate = \"0/s\"", "above 0"),
            ("rate = \"-1/s\"", "above 0"),
            ("rate = \"x/s\"", "rate_limit.rate"),
            ("rate = \"1/s\"\nkey = \"cookie:a\"", "rate_limit.key"),
            ("rate = \"1/s\"\nkey = \"header:\"", "rate_limit.key"),
            ("rate = \"1/s\"\nkey = \"header:a b\"", "rate_limit.key"),
        ] {
            let config: RateLimitConfig = toml::from_str(text).expect(text);
            let error = RateLimiter::from_config(&config).expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
        assert!(toml::from_str::<RateLimitConfig>("rate = \"1/s\"\nscope = \"planet\"").is_err());
        assert!(toml::from_str::<RateLimitConfig>("rate = \"1/s\"\nburts = 1").is_err());
    }
}
