//! The registry's part of the agent configuration: the `[store]` table.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A redb file in the data directory (default).
    #[default]
    Embedded,
    /// Nothing persisted; state is lost on exit (tests, benchmarks).
    Memory,
    /// An etcd cluster shared by every agent (cluster mode).
    Etcd,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Directory of the embedded store. `agent --dev` uses a fresh temporary one.
    pub data_dir: Option<PathBuf>,
    /// Page cache of the embedded store, in MiB. Default 64.
    pub cache_mib: usize,
    /// etcd client URLs (`http://host:2379`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's catalog in etcd. Default `/switchyard`.
    pub prefix: String,
    /// etcd user name (etcd's auth); its password from `password_file`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for etcd's server certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, when etcd asks for client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Longest wait to connect to an etcd member. Default 2s.
    #[serde(with = "go_duration")]
    pub dial_timeout: Duration,
    /// Longest wait for one etcd request. Default 5s.
    #[serde(with = "go_duration")]
    pub request_timeout: Duration,
    /// TTL of the lease under which each agent announces itself; an agent
    /// that stops renewing it loses its share of the checks this long after.
    /// Default 5s, at least 2s.
    #[serde(with = "go_duration")]
    pub lease_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            data_dir: None,
            cache_mib: 64,
            endpoints: Vec::new(),
            prefix: "/switchyard".to_string(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
        }
    }
}

impl StoreConfig {
    /// The etcd connection settings, with secrets and certificates read from
    /// their files.
    pub fn etcd_options(&self, member: &str) -> Result<crate::store::EtcdOptions, String> {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| format!("store.{what}: cannot read {}: {e}", path.display()))
        };
        if self.endpoints.is_empty() {
            return Err("store.endpoints: give at least one etcd URL".to_string());
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err("store.lease_ttl must be at least 2s (etcd's shortest lease)".to_string());
        }
        if !self.prefix.starts_with('/') || self.prefix.trim_end_matches('/').is_empty() {
            return Err(format!(
                "store.prefix: {:?} must start with / and name something",
                self.prefix
            ));
        }
        let user = match (&self.username, &self.password_file) {
            (Some(user), Some(path)) => {
                let password = String::from_utf8(read("password_file", path)?)
                    .map_err(|_| "store.password_file: not UTF-8".to_string())?;
                Some((user.clone(), password.trim().to_string()))
            }
            (None, None) => None,
            _ => return Err("store: give both username and password_file, or neither".to_string()),
        };
        let identity_pem = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((read("cert_file", cert)?, read("key_file", key)?)),
            (None, None) => None,
            _ => return Err("store: give both cert_file and key_file, or neither".to_string()),
        };
        let ca_pem = self
            .ca_file
            .as_ref()
            .map(|path| read("ca_file", path))
            .transpose()?;
        Ok(crate::store::EtcdOptions {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            user,
            ca_pem,
            identity_pem,
            connect_timeout: self.dial_timeout,
            request_timeout: self.request_timeout,
            member: member.to_string(),
            lease_ttl: self.lease_ttl,
            copy_dir: self.data_dir.clone(),
        })
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
