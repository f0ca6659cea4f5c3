//! The API's part of the agent configuration: the `[api]` table (listener,
//! limits, tokens and their roles, TLS).

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
    /// A second listener for `/metrics` alone, served by its own thread and
    /// runtime so scrapes answer even when the agent's runtime is busy.
    /// Default none (`/metrics` is on `addr` either way).
    pub metrics_addr: Option<SocketAddr>,
    /// API tokens. None configured: every request is allowed, which the
    /// agent accepts only on a loopback address.
    pub tokens: Vec<TokenConfig>,
    /// `[api.tls]`: serve the API (and `metrics_addr`) over HTTPS only.
    /// Default none (cleartext HTTP).
    pub tls: Option<ApiTlsConfig>,
    /// Most `Meta` keys on a service or node. Default 64 (Consul's).
    pub max_meta_keys: usize,
    /// Longest `Meta` key, in bytes. Default 128 (Consul's).
    pub max_meta_key_length: usize,
    /// Longest `Meta` value, in bytes. Default 512 (Consul's).
    pub max_meta_value_length: usize,
    /// Most tags on a service. Default 256.
    pub max_tags: usize,
    /// Longest tag, in bytes. Default 512.
    pub max_tag_length: usize,
    /// A check's output and notes are cut to this many bytes. Default 4096
    /// (Consul's `check_output_max_size`).
    pub check_output_max_size: usize,
    /// Time a client has to send a request head (TLS handshake included
    /// for the first): 408 after. Default 10 s.
    #[serde(with = "go_duration")]
    pub header_timeout: Duration,
    /// A keep-alive connection idle this long between requests is closed.
    /// Default 90 s.
    #[serde(with = "go_duration")]
    pub idle_timeout: Duration,
    /// Bytes per second a request body must average once `header_timeout`
    /// has passed since its head; slower: 408 and closed. 0 = no minimum.
    /// Default 1024.
    pub min_body_rate: u64,
    /// A response write that makes no progress this long closes the
    /// connection (a client that stopped reading). Default 60 s.
    #[serde(with = "go_duration")]
    pub send_timeout: Duration,
    /// Open connections on `addr`; more are refused (503). 0 (default): the
    /// API's share of the agent's descriptor budget.
    pub max_connections: usize,
    /// Open connections from one client address (Consul's
    /// `http_max_conns_per_client`); more are refused (429). 0 = no cap.
    /// Default 200.
    pub max_connections_per_client: usize,
}

/// `[api.tls]`: the API's certificate and, for mutual TLS, the CA that
/// signs its clients' certificates.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the certificate's private key.
    pub key: PathBuf,
    /// PEM file with the CA certificates clients must present a certificate
    /// from (Consul's `verify_incoming`). Default none: no client certificate asked.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
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
            metrics_addr: None,
            tokens: Vec::new(),
            tls: None,
            max_meta_keys: 64,
            max_meta_key_length: 128,
            max_meta_value_length: 512,
            max_tags: 256,
            max_tag_length: 512,
            check_output_max_size: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            min_body_rate: 1024,
            send_timeout: Duration::from_secs(60),
            max_connections: 0,
            max_connections_per_client: 200,
        }
    }
}

mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        switchyard_catalog::parse_go_duration(&text).map_err(serde::de::Error::custom)
    }
}
