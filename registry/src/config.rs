//! The registry's part of the agent configuration: the `[api]` and `[store]` tables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address of the HTTP API. Default `127.0.0.1:8500` (Consul's port).
    pub addr: SocketAddr,
    /// Largest request body accepted, in bytes. Default 64 MiB (batch registrations).
    pub max_body_bytes: usize,
    /// Most blocking queries waiting at once; more get 429. Default 50,000.
    pub max_blocking_queries: usize,
    /// Longest `wait` honoured for blocking queries. Default 10 minutes.
    #[serde(with = "go_duration")]
    pub max_wait: Duration,
    /// Most endpoints in one native batch. Default 100,000.
    pub max_batch_endpoints: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8500)),
            max_body_bytes: 64 << 20,
            max_blocking_queries: 50_000,
            max_wait: Duration::from_secs(600),
            max_batch_endpoints: 100_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A redb file in the data directory (default).
    #[default]
    Embedded,
    /// Nothing persisted; state is lost on exit (tests, benchmarks).
    Memory,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Directory of the embedded store. `agent --dev` uses a fresh temporary one.
    pub data_dir: Option<PathBuf>,
    /// Page cache of the embedded store, in MiB. Default 64.
    pub cache_mib: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            data_dir: None,
            cache_mib: 64,
        }
    }
}

mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse_go_duration(&text).map_err(serde::de::Error::custom)
    }
}
