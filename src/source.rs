//! Where the agent's configuration comes from: the file and the command
//! line's overrides. Kept apart from `config.rs`, which the `config` fuzz
//! target compiles on its own.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::AgentConfig;

/// Where the agent's configuration comes from: the file, if any, and the
/// command-line overrides, applied again on every reload.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConfigSource {
    pub(crate) path: Option<PathBuf>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) api_addr: Option<SocketAddr>,
    pub(crate) dns_addr: Option<SocketAddr>,
    pub(crate) http_addr: Option<SocketAddr>,
    pub(crate) xds_addr: Option<SocketAddr>,
    /// `--dev`: xDS on its default address unless the file sets one.
    pub(crate) dev: bool,
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
        if let Some(addr) = self.xds_addr {
            config.xds.addr = Some(addr);
        } else if self.dev && config.xds.addr.is_none() {
            config.xds.addr = Some(SocketAddr::from(([127, 0, 0, 1], 18000)));
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
