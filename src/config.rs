//! The agent's configuration file: one TOML tree, a table per role.
//! Every key is optional; `configs/dev.toml` lists them all with defaults.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use switchyard_api::ApiConfig;
use switchyard_registry::StoreConfig;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AgentConfig {
    pub(crate) agent: AgentSection,
    pub(crate) api: ApiConfig,
    pub(crate) store: StoreConfig,
    pub(crate) dns: switchyard_dns::Config,
    pub(crate) http: switchyard_proxy::Config,
    pub(crate) tcp: switchyard_proxy::TcpConfig,
    /// `[federation]`: the other datacenters this agent may ask.
    pub(crate) federation: switchyard_federation::FederationConfig,
    /// `[xds]`: the ADS server of proxyless gRPC clients and Envoy.
    pub(crate) xds: switchyard_xds::XdsConfig,
    /// Services of this agent's node with their checks, in Consul's service
    /// definition shape (`name`, `id`, `port`, `tags`, `meta`, `check` or
    /// `checks` with `http`/`tcp`/`grpc`/`ttl`, `interval`, ...), registered
    /// at start and again on every reload.
    pub(crate) services: Vec<toml::Table>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AgentSection {
    /// This agent's node name. Default: the host name.
    pub(crate) node_name: Option<String>,
    /// Datacenter name reported to Consul clients. Default `dc1`.
    pub(crate) datacenter: String,
    /// Address of this node as registered in the catalog. Default `127.0.0.1`.
    pub(crate) advertise_addr: IpAddr,
    /// Threads of the registry/API runtime. Default 2.
    pub(crate) worker_threads: usize,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            node_name: None,
            datacenter: "dc1".to_string(),
            advertise_addr: IpAddr::from([127, 0, 0, 1]),
            worker_threads: 2,
        }
    }
}

impl AgentConfig {
    /// Reads and checks a config file; the error names the file, line and key.
    pub(crate) fn load(path: &Path) -> Result<AgentConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        AgentConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a config's text (the fuzz target `config` calls this).
    pub(crate) fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check_services_in(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks each `[[services]]` entry; an error names the line of the key
    /// at fault in `text` (or of the entry, when no one key is) and the key.
    fn check_services_in(&self, text: &str) -> Result<(), String> {
        for (i, table) in self.services.iter().enumerate() {
            let json = serde_json::to_vec(table).map_err(|e| format!("services[{i}]: {e}"))?;
            let Err(e) = switchyard_api::service_definition("config-check", &json) else {
                continue;
            };
            let key = match &e.field {
                Some(field) => format!("services[{i}].{field}"),
                None => format!("services[{i}]"),
            };
            let at = match service_line(text, i, e.field.as_deref()) {
                Some(line) => format!("line {line}, "),
                None => String::new(),
            };
            return Err(format!("{at}key `{key}`: {}", e.message));
        }
        Ok(())
    }

    /// Rules that span fields.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.agent.worker_threads == 0 {
            return Err("agent.worker_threads must be at least 1".to_string());
        }
        if self.agent.datacenter.is_empty() {
            return Err("agent.datacenter must not be empty".to_string());
        }
        if let Some(name) = &self.agent.node_name {
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err("agent.node_name must be a non-empty name".to_string());
            }
        }
        if self.api.tokens.is_empty() && !self.api.addr.ip().is_loopback() {
            return Err(format!(
                "api.addr {} is reachable from other hosts: configure [[api.tokens]] (roles read, register, operator) or listen on loopback",
                self.api.addr
            ));
        }
        if let Some(addr) = self.api.metrics_addr {
            if self.api.tokens.is_empty() && !addr.ip().is_loopback() {
                return Err(format!(
                    "api.metrics_addr {addr} is reachable from other hosts: configure [[api.tokens]] (Prometheus sends a read token as a bearer token) or listen on loopback"
                ));
            }
        }
        switchyard_api::Tokens::load(&self.api.tokens)?;
        if let Some(tls) = &self.api.tls {
            switchyard_api::tls::acceptor(tls)?;
        }
        if self.api.max_body_bytes < 1024 {
            return Err("api.max_body_bytes must be at least 1024".to_string());
        }
        if self.store.cache_mib == 0 {
            return Err("store.cache_mib must be at least 1".to_string());
        }
        if self.store.kind == switchyard_registry::StoreKind::Etcd {
            self.store.etcd_options("check")?;
        }
        self.dns.validate()?;
        self.federation.validate(&self.agent.datacenter)?;
        self.http.validate()?;
        self.tcp.validate()?;
        self.xds.validate()?;
        if let Some(addr) = self.xds.addr {
            if self.api.tokens.is_empty() && !addr.ip().is_loopback() {
                return Err(format!(
                    "xds.addr {addr} is reachable from other hosts: configure [[api.tokens]] (clients send a read token) or listen on loopback"
                ));
            }
        }
        self.service_commands("config-check").map(|_| ())
    }

    /// The registration command of each `[[services]]` entry on `node`.
    pub(crate) fn service_commands(
        &self,
        node: &str,
    ) -> Result<Vec<switchyard_registry::Command>, String> {
        self.services
            .iter()
            .enumerate()
            .map(|(i, table)| {
                let json = serde_json::to_vec(table).map_err(|e| format!("services[{i}]: {e}"))?;
                switchyard_api::service_definition(node, &json)
                    .map_err(|e| format!("services[{i}]: {e}"))
            })
            .collect()
    }
}

/// The 1-based line of `services[index]` in `text`, or of the key `field`
/// inside it (a path such as `check.interval` or `checks[1].ttl`, keys
/// folded as the service decoder folds them: lower case, no `_` or `-`).
fn service_line(text: &str, index: usize, field: Option<&str>) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let services = root
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "services")?
        .1;
    let entry = services.get_ref().as_array()?.get(index)?;
    let mut at = entry.span().start;
    let mut value = entry;
    let fold = |key: &str| -> String {
        key.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    for segment in field.unwrap_or("").split('.').filter(|s| !s.is_empty()) {
        let (name, indexes) = match segment.find('[') {
            Some(b) => (&segment[..b], &segment[b..]),
            None => (segment, ""),
        };
        let DeValue::Table(table) = value.get_ref() else {
            break;
        };
        let Some((key, next)) = table.iter().find(|(k, _)| fold(k.get_ref()) == name) else {
            break;
        };
        at = key.span().start;
        value = next;
        for n in indexes
            .split(['[', ']'])
            .filter_map(|n| n.parse::<usize>().ok())
        {
            let Some(item) = value.get_ref().as_array().and_then(|a| a.get(n)) else {
                break;
            };
            at = item.span().start;
            value = item;
        }
    }
    Some(text.get(..at)?.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::AgentConfig;

    #[test]
    fn a_bad_service_names_its_line_and_key() {
        let text = "[agent]\nworker_threads = 2\n\n[[services]]\nname = \"web\"\nport = 80\n\n\
                    [[services]]\nname = \"api\"\nport = 81\n\n[services.check]\nhttp = \"http://127.0.0.1:81/\"\n\
                    interval = \"soon\"\n";
        let err = AgentConfig::parse(text).expect_err("a bad interval");
        assert!(err.contains("line 14"), "{err}");
        assert!(err.contains("services[1].check.interval"), "{err}");

        let text = "[[services]]\nname = \"web\"\n[[services.checks]]\nttl = \"10s\"\n\
                    [[services.checks]]\nTTL = \"forever\"\n";
        let err = AgentConfig::parse(text).expect_err("a bad ttl");
        assert!(err.contains("line 6"), "{err}");
        assert!(err.contains("services[0].checks[1].ttl"), "{err}");

        let text = "[agent]\n\n[[services]]\nport = 80\n";
        let err = AgentConfig::parse(text).expect_err("no name");
        assert!(
            err.contains("line 3") && err.contains("services[0]"),
            "{err}"
        );
    }

    /// What the `config` fuzz target checks, over mutations of the shipped
    /// configs: any text is parsed or refused with a reason, never a panic.
    #[test]
    fn mangled_configs_are_refused_with_a_reason() {
        let seeds = [
            include_str!("../configs/dev.toml"),
            include_str!("../configs/cluster.toml"),
        ];
        for seed in seeds {
            assert!(AgentConfig::parse(seed).is_ok(), "a shipped config loads");
        }
        const NOISE: &[u8] = b"[]{}=\"',.#\n -0123456789abcxyz*/:";
        let mut rng = fastrand::Rng::with_seed(3);
        let mut refused = 0;
        for round in 0..2000 {
            let mut text = seeds[round % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..text.len());
                match rng.u8(0..3) {
                    0 => text[i] = NOISE[rng.usize(..NOISE.len())],
                    1 => {
                        text.remove(i);
                    }
                    _ => text.insert(i, NOISE[rng.usize(..NOISE.len())]),
                }
            }
            let Ok(text) = String::from_utf8(text) else {
                continue;
            };
            if let Err(reason) = AgentConfig::parse(&text) {
                assert!(!reason.trim().is_empty());
                refused += 1;
            }
        }
        assert!(
            refused > 0,
            "no mutation was refused: the test mutates nothing"
        );
    }
}
