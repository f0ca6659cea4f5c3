//! The `[xds]` table of the agent configuration.

use std::net::SocketAddr;

use serde::Deserialize;

/// `[xds]`: the ADS server. Off unless `addr` is set (`--dev` sets
/// `127.0.0.1:18000`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct XdsConfig {
    /// Where the ADS server listens (port 0: any free port).
    pub addr: Option<SocketAddr>,
    /// Streams this agent serves at once; one more is refused
    /// (RESOURCE_EXHAUSTED) with the limit named.
    pub max_streams: usize,
    /// Resources one stream may subscribe to, over all types.
    pub max_subscriptions: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            addr: None,
            max_streams: 50_000,
            max_subscriptions: 10_000,
        }
    }
}

impl XdsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_streams == 0 {
            return Err("xds.max_streams must be at least 1".into());
        }
        if self.max_subscriptions == 0 {
            return Err("xds.max_subscriptions must be at least 1".into());
        }
        Ok(())
    }
}
