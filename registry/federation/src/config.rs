//! The `[federation]` table: the other datacenters this agent may ask, by
//! configuration (no gossip, no full mesh: a datacenter needs a path only to
//! the ones it names).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// The other datacenters (`[[federation.datacenters]]`).
    pub datacenters: Vec<DatacenterConfig>,
    /// How often each datacenter's agents are probed for their round trip.
    /// Default 2 s.
    #[serde(deserialize_with = "go_duration")]
    pub probe_interval: Duration,
    /// Longest wait for a connection to another datacenter's agent (and for
    /// a probe's answer). Default 2 s.
    #[serde(deserialize_with = "go_duration")]
    pub connect_timeout: Duration,
    /// The first DNS query for a name in another datacenter waits this long
    /// for its copy's first fetch, then gets SERVFAIL. Default 2 s.
    #[serde(deserialize_with = "go_duration")]
    pub dns_timeout: Duration,
    /// A copy of another datacenter's service or node that nobody asks for
    /// this long is dropped (its watch stops). Default 10 minutes.
    #[serde(deserialize_with = "go_duration")]
    pub copy_expiry: Duration,
    /// Where a service with no routable endpoint here fails over to:
    /// `"nearest"` (the others by measured round trip) or a list of
    /// datacenter names. Default none. A service's tag
    /// `switchyard.failover=dc2,dc3` (or `=nearest`, `=none`) overrides it.
    pub failover: Option<FailoverConfig>,
    /// Most services and nodes copied from one datacenter; a name asked
    /// beyond it is not copied (SERVFAIL) until others expire. Default
    /// 10,000.
    pub max_copies: usize,
    /// With failover on, a service fails over once its routable share here
    /// falls below this fraction (0 to 1). Default 0: only when none is.
    pub min_healthy: f64,
}

/// `federation.failover`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FailoverConfig {
    /// `"nearest"`.
    Word(String),
    /// Datacenter names, in order.
    List(Vec<String>),
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            datacenters: Vec::new(),
            probe_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            dns_timeout: Duration::from_secs(2),
            copy_expiry: Duration::from_secs(600),
            failover: None,
            min_healthy: 0.0,
            max_copies: 10_000,
        }
    }
}

/// One other datacenter.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatacenterConfig {
    /// Its name, as `?dc=` and DNS labels give it.
    pub name: String,
    /// Some of its agents' API addresses (`host:port`, `http://host:port` or
    /// `https://host:port`); any of them may answer.
    pub api: Vec<String>,
    /// A file holding the token this agent presents there (its own probes,
    /// and client requests forwarded without a token of their own).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify its agents' `https` addresses with.
    /// Default: the Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Addresses of its ingress proxies (`ip:port`).
    #[serde(default)]
    pub proxy: Vec<String>,
    /// How our proxy reaches its endpoints when a service fails over there:
    /// `"direct"` (default: their own addresses) or `"proxy"` (through
    /// `proxy`, for datacenters whose endpoints are not routable from here;
    /// HTTP only, L4 listeners go direct).
    #[serde(default)]
    pub via: Via,
}

/// `federation.datacenters.via`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    #[default]
    Direct,
    Proxy,
}

impl FederationConfig {
    /// Rules across fields; `local` is this agent's datacenter.
    pub fn validate(&self, local: &str) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, dc) in self.datacenters.iter().enumerate() {
            let at = format!("federation.datacenters[{i}]");
            if !valid_name(&dc.name) {
                return Err(format!(
                    "{at}.name {:?}: a datacenter name is letters, digits, '-' and '_' (a DNS label)",
                    dc.name
                ));
            }
            if dc.name == local {
                return Err(format!(
                    "{at}.name {:?} is this agent's own datacenter (agent.datacenter)",
                    dc.name
                ));
            }
            if !seen.insert(dc.name.as_str()) {
                return Err(format!("{at}.name {:?} is named twice", dc.name));
            }
            if dc.api.is_empty() {
                return Err(format!(
                    "{at}.api: give at least one agent address of datacenter {:?}",
                    dc.name
                ));
            }
            for address in &dc.api {
                crate::client::base_uri(address).map_err(|e| format!("{at}.api: {e}"))?;
            }
            if let Some(path) = &dc.token_file {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{at}.token_file: cannot read {}: {e}", path.display()))?;
            }
            if dc.via == Via::Proxy && dc.proxy.is_empty() {
                return Err(format!(
                    "{at}: via = \"proxy\" needs the datacenter's proxy addresses (proxy = [\"ip:port\"])"
                ));
            }
            for address in &dc.proxy {
                if address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "{at}.proxy: {address:?} is not an address (ip:port)"
                    ));
                }
            }
        }
        if self.probe_interval < Duration::from_millis(100) {
            return Err("federation.probe_interval must be at least 100ms".to_string());
        }
        match &self.failover {
            None => {}
            Some(FailoverConfig::Word(word)) if word == "nearest" => {}
            Some(FailoverConfig::Word(word)) => {
                return Err(format!(
                    "federation.failover {word:?}: give \"nearest\" or a list of datacenter names"
                ))
            }
            Some(FailoverConfig::List(names)) => {
                for name in names {
                    if !self.datacenters.iter().any(|dc| &dc.name == name) {
                        return Err(format!(
                            "federation.failover names {name:?}, which is not one of [[federation.datacenters]]"
                        ));
                    }
                }
            }
        }
        if !(0.0..=1.0).contains(&self.min_healthy) {
            return Err("federation.min_healthy is a fraction from 0 to 1".to_string());
        }
        if self.dns_timeout.is_zero() {
            return Err("federation.dns_timeout must be above 0".to_string());
        }
        if self.copy_expiry < Duration::from_secs(1) {
            return Err("federation.copy_expiry must be at least 1s".to_string());
        }
        if self.connect_timeout.is_zero() {
            return Err("federation.connect_timeout must be above 0".to_string());
        }
        Ok(())
    }
}

/// A datacenter name: one DNS label of letters, digits, `-` and `_`, and
/// none of the words DNS names use (`service.consul` must not read as a
/// datacenter).
pub fn valid_name(name: &str) -> bool {
    !matches!(
        name.to_ascii_lowercase().as_str(),
        "service" | "node" | "query" | "addr" | "dc" | "consul"
    ) && !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn go_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    switchyard_catalog::parse_go_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FederationConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn a_datacenter_needs_a_name_of_its_own_and_an_address() {
        let ok = parse("[[datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:8500\", \"https://dc2.example:8501\"]\n");
        assert_eq!(ok.validate("dc1"), Ok(()));
        let own = ok.validate("dc2").expect_err("own name");
        assert!(own.contains("own datacenter"), "{own}");
        let none = parse("[[datacenters]]\nname = \"dc2\"\napi = []\n");
        assert!(none
            .validate("dc1")
            .expect_err("no address")
            .contains("at least one"));
        let word = parse("[[datacenters]]\nname = \"service\"\napi = [\"127.0.0.1:1\"]\n");
        assert!(word.validate("dc1").is_err(), "a word of DNS names");
        let bad = parse("[[datacenters]]\nname = \"dc 2\"\napi = [\"127.0.0.1:1\"]\n");
        assert!(bad
            .validate("dc1")
            .expect_err("bad name")
            .contains("DNS label"));
        let twice = parse("[[datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:1\"]\n[[datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:2\"]\n");
        assert!(twice.validate("dc1").expect_err("twice").contains("twice"));
        let scheme = parse("[[datacenters]]\nname = \"dc2\"\napi = [\"ftp://x:1\"]\n");
        assert!(scheme.validate("dc1").expect_err("scheme").contains("http"));
    }

    #[test]
    fn failover_is_nearest_or_known_names() {
        let dcs = "[[datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:1\"]\n";
        let nearest = parse(&format!("failover = \"nearest\"\nmin_healthy = 0.5\n{dcs}"));
        assert_eq!(nearest.validate("dc1"), Ok(()));
        let listed = parse(&format!("failover = [\"dc2\"]\n{dcs}"));
        assert_eq!(listed.validate("dc1"), Ok(()));
        let unknown = parse(&format!("failover = [\"dc3\"]\n{dcs}"));
        assert!(unknown.validate("dc1").expect_err("dc3").contains("dc3"));
        let word = parse(&format!("failover = \"closest\"\n{dcs}"));
        assert!(word.validate("dc1").is_err());
        let share = parse(&format!("min_healthy = 1.5\n{dcs}"));
        assert!(share.validate("dc1").is_err());
        let via = parse(&format!("{dcs}via = \"proxy\"\n"));
        assert!(via
            .validate("dc1")
            .expect_err("no proxies")
            .contains("proxy addresses"));
        let via = parse(&format!(
            "{dcs}via = \"proxy\"\nproxy = [\"127.0.0.1:8080\"]\n"
        ));
        assert_eq!(via.validate("dc1"), Ok(()));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<FederationConfig>(
            "[[datacenters]]\nname = \"dc2\"\napi = [\"127.0.0.1:1\"]\nport = 3\n",
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("port"), "{e}");
    }
}
