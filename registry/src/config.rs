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
    /// API tokens. None configured: every request is allowed, which the
    /// agent accepts only on a loopback address.
    pub tokens: Vec<TokenConfig>,
}

/// What a token may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads (every GET, `/metrics`).
    Read,
    /// Reads, and registrations: services, checks, batches, heartbeats (the scheduler).
    Register,
    /// Everything: also drains and maintenance.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Register => "register",
            Role::Operator => "operator",
        }
    }
}

/// One `[[api.tokens]]` entry: a secret (inline or from a file) and its role.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs (never the secret).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the secret (surrounding whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    pub role: Role,
}

impl TokenConfig {
    /// The secret, read from its file when it has one.
    pub fn load_secret(&self) -> Result<String, String> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("token {:?}: cannot read {}: {e}", self.name, path.display()))?
                .trim()
                .to_string(),
            _ => {
                return Err(format!(
                    "token {:?}: give exactly one of secret and secret_file",
                    self.name
                ))
            }
        };
        if secret.len() < 16 {
            return Err(format!(
                "token {:?}: a secret must have at least 16 characters",
                self.name
            ));
        }
        Ok(secret)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8500)),
            max_body_bytes: 64 << 20,
            max_blocking_queries: 50_000,
            max_wait: Duration::from_secs(600),
            max_batch_endpoints: 100_000,
            tokens: Vec::new(),
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
