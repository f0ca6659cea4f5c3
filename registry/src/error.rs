//! Errors of the registry crate. Callers branch on the variant; the text of the
//! Consul-compatible ones is part of the contract (clients match on it).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    /// The request was malformed or violates a rule (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The named service, check or node does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// A TTL update on a check without a TTL (HTTP 500, Consul's text).
    #[error("{0}")]
    NotTtl(String),
    /// A conditional write whose condition did not hold (a KV `cas`): it
    /// changed nothing, and Consul answers `false`.
    #[error("{0}")]
    Unmet(String),
    /// A transaction refused: each failing operation (its position, why).
    /// Nothing of it was applied.
    #[error("transaction refused: {}", .0.iter().map(|(i, e)| format!("op {i}: {e}")).collect::<Vec<_>>().join("; "))]
    Txn(Vec<(usize, String)>),
    /// A write refused the way Consul refuses it, with HTTP 500 and its
    /// text (a prepared query whose name clashes with another's).
    #[error("{0}")]
    Refused(String),
    /// The change could not be made durable; nothing was applied.
    #[error("store failure: {0}")]
    Store(#[from] StoreError),
    /// The writer has stopped (agent shutting down).
    #[error("registry is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("store i/o failed: {0}")]
    Io(String),
    #[error("store holds an undecodable record {key}: {message}")]
    Corrupt { key: String, message: String },
}
