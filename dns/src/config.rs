//! The `[dns]` table of the agent configuration.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use switchyard_catalog::ThreadPolicy;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP and TCP listen address. Default `127.0.0.1:8600`; port 0 picks one.
    pub addr: SocketAddr,
    /// Zone we are authoritative for. Default `consul.`.
    pub domain: String,
    /// UDP worker threads, each with its own SO_REUSEPORT socket. Default 2.
    pub udp_workers: usize,
    /// Scheduling policy of the UDP workers. Default `batch` (SCHED_BATCH: no
    /// wake-up preemption, so a busy worker takes bigger batches).
    pub thread_policy: ThreadPolicy,
    /// TTL of service answers: exact names, prefixes ending in `*`, and `*` as
    /// the fallback (exact beats prefix, longest prefix wins). Default 0 s.
    #[serde(deserialize_with = "ttl_map")]
    pub service_ttl: BTreeMap<String, Duration>,
    /// TTL of node and addr answers. Default 0 s.
    #[serde(deserialize_with = "go_duration")]
    pub node_ttl: Duration,
    /// SOA minimum and the TTL of negative answers. Default 0 s.
    #[serde(deserialize_with = "go_duration")]
    pub soa_min_ttl: Duration,
    /// Largest UDP answer we send when the client advertises more (EDNS).
    /// Default 4096.
    pub max_udp_size: u16,
    /// Optional cap on answers per response (0 = no cap, the default).
    pub max_answers: usize,
    /// Address given for the zone's name server (`ns.<domain>`). Default 127.0.0.1.
    pub ns_addr: IpAddr,
    /// Most TCP connections at once. 0 (default): DNS's share of the
    /// agent's descriptor budget.
    pub max_tcp_connections: usize,
    /// Most TCP connections from one client address. 0 = no cap. Default 64.
    pub max_tcp_connections_per_client: usize,
    /// A TCP connection idle this long is closed. Default 10 s.
    #[serde(deserialize_with = "go_duration")]
    pub tcp_idle_timeout: Duration,
    /// UDP answers per second to one client address, per UDP worker (a
    /// client's socket stays on one worker); more are dropped and counted.
    /// An amplification defence. 0 = off (default).
    pub rate_limit: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8600)),
            domain: "consul.".to_string(),
            udp_workers: 2,
            thread_policy: ThreadPolicy::Batch,
            service_ttl: BTreeMap::new(),
            node_ttl: Duration::ZERO,
            soa_min_ttl: Duration::ZERO,
            max_udp_size: 4096,
            max_answers: 0,
            ns_addr: IpAddr::from([127, 0, 0, 1]),
            max_tcp_connections: 0,
            max_tcp_connections_per_client: 64,
            tcp_idle_timeout: Duration::from_secs(10),
            rate_limit: 0,
        }
    }
}

fn go_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    switchyard_catalog::parse_go_duration(&text).map_err(serde::de::Error::custom)
}

fn ttl_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Duration>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            switchyard_catalog::parse_go_duration(&v)
                .map(|d| (k.clone(), d))
                .map_err(|e| serde::de::Error::custom(format!("service_ttl.{k}: {e}")))
        })
        .collect()
}

impl Config {
    /// Rules that span fields.
    pub fn validate(&self) -> Result<(), String> {
        let domain = self.domain.trim_end_matches('.');
        if domain.is_empty() || domain.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(format!(
                "dns.domain {:?} is not a valid zone name",
                self.domain
            ));
        }
        if self.udp_workers == 0 {
            return Err("dns.udp_workers must be at least 1".to_string());
        }
        if self.max_udp_size < 512 {
            return Err("dns.max_udp_size must be at least 512".to_string());
        }
        Ok(())
    }

    /// The zone's labels, lowercase, left to right.
    pub(crate) fn domain_labels(&self) -> Vec<Vec<u8>> {
        self.domain
            .trim_end_matches('.')
            .split('.')
            .map(|l| l.to_ascii_lowercase().into_bytes())
            .collect()
    }

    /// The TTL for a service, by the `service_ttl` rules.
    pub(crate) fn ttl_for(&self, service: &str) -> u32 {
        if let Some(ttl) = self.service_ttl.get(service) {
            return ttl.as_secs() as u32;
        }
        let prefix = self
            .service_ttl
            .iter()
            .filter_map(|(k, v)| k.strip_suffix('*').map(|p| (p, v)))
            .filter(|(p, _)| !p.is_empty() && service.starts_with(p))
            .max_by_key(|(p, _)| p.len());
        if let Some((_, ttl)) = prefix {
            return ttl.as_secs() as u32;
        }
        self.service_ttl
            .get("*")
            .map_or(0, |ttl| ttl.as_secs() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules_exact_then_longest_prefix_then_wildcard() {
        let mut config = Config::default();
        for (k, v) in [("db*", 5), ("db-main", 9), ("d*", 3), ("*", 1)] {
            config
                .service_ttl
                .insert(k.to_string(), Duration::from_secs(v));
        }
        assert_eq!(config.ttl_for("db-main"), 9);
        assert_eq!(config.ttl_for("db-other"), 5);
        assert_eq!(config.ttl_for("dx"), 3);
        assert_eq!(config.ttl_for("web"), 1);
        assert_eq!(Config::default().ttl_for("web"), 0);
    }
}
