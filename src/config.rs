//! The agent's configuration file: one TOML tree, a table per role.
//! Every key is optional; `configs/dev.toml` lists them all with defaults.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use switchyard_registry::{ApiConfig, StoreConfig};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AgentConfig {
    pub(crate) agent: AgentSection,
    pub(crate) api: ApiConfig,
    pub(crate) store: StoreConfig,
    pub(crate) dns: switchyard_dns::Config,
    pub(crate) http: switchyard_proxy::Config,
    pub(crate) tcp: switchyard_proxy::TcpConfig,
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
        let config: AgentConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
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
        switchyard_registry::api::Tokens::load(&self.api.tokens)?;
        if let Some(tls) = &self.api.tls {
            switchyard_registry::api::tls::acceptor(tls)?;
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
        self.http.validate()?;
        self.tcp.validate()?;
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
                switchyard_registry::api::service_definition(node, &json)
                    .map_err(|e| format!("services[{i}]: {e}"))
            })
            .collect()
    }
}

/// Where the agent's configuration comes from: the file, if any, and the
/// command-line overrides, applied again on every reload.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConfigSource {
    pub(crate) path: Option<PathBuf>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) api_addr: Option<SocketAddr>,
    pub(crate) dns_addr: Option<SocketAddr>,
    pub(crate) http_addr: Option<SocketAddr>,
    pub(crate) proxy_threads: Option<usize>,
    pub(crate) node_name: Option<String>,
    /// `--demo`: the demo service's route is part of every load.
    pub(crate) demo: bool,
}

impl ConfigSource {
    /// The file with the overrides applied, checked.
    pub(crate) fn load(&self) -> Result<AgentConfig, String> {
        let mut config = match &self.path {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.store.data_dir = Some(dir.clone());
        }
        if let Some(addr) = self.api_addr {
            config.api.addr = addr;
        }
        if let Some(addr) = self.dns_addr {
            config.dns.addr = addr;
        }
        if let Some(addr) = self.http_addr {
            config.http.addr = addr;
        }
        if let Some(threads) = self.proxy_threads {
            config.http.threads = threads;
        }
        if let Some(name) = &self.node_name {
            config.agent.node_name = Some(name.clone());
        }
        if self.demo {
            config.http.routes.push(crate::demo::route());
        }
        config.validate()?;
        Ok(config)
    }
}

/// The host name, for the default node name.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "switchyard".to_string())
}
