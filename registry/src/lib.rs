//! Switchyard registry: the catalog of nodes, endpoints and checks.
//!
//! One writer task applies every change in order, makes it durable through a
//! [`Store`], and publishes an immutable [`Snapshot`] that readers load through
//! arc-swap without locking. The snapshot's types live in `switchyard_catalog`
//! (re-exported here), which is all DNS and the proxy depend on; this crate
//! builds snapshots and stores them; `switchyard-health` checks endpoints and
//! `switchyard-api` serves the HTTP API on this crate's public handle.
#![forbid(unsafe_code)]

mod agents;
mod catalog;
mod config;
mod error;
mod load;
mod metrics;
mod store;
mod watch;
mod writer;

pub use agents::{watch_agents, AGENT_META};
pub use catalog::{Batch, Command, NewCheck, TxnOp, TxnResult, TxnResults, MAX_OUTPUT_BYTES};
pub use config::{StoreConfig, StoreKind};
pub use error::{RegistryError, StoreError};
pub use load::{ClusterLoad, LoadBoard};
pub use metrics::RegistryMetrics;
// The catalog's types, for the binary and the API (DNS and the proxy use
// `switchyard_catalog` itself).
pub use switchyard_catalog::{
    format_go_duration, hold_accepts, node_uuid, open_accepts, parse_go_duration, unix_ms,
    BusyEndpoint, Check, CheckDefinition, CheckKind, Chunk, Copied, CopyOf, Decorators, Drain,
    Elsewhere, Endpoint, EndpointLoad, EndpointState, Extra, ExtraKey, Extras, Instance,
    LoadReport, Name, Node, NodeEntry, ServiceLoad, ServiceView, Snapshot, StateCounts, Status,
    TableIndexes, TaggedAddress, ThreadPolicy, ViewChange, ViewDecorator, ViewHead, Weights,
    NODE_HEALTH_CHECK, NODE_MAINTENANCE_CHECK, SERVICE_MAINTENANCE_PREFIX,
};
// `crate::model::..`, `crate::snapshot::..` and `crate::duration::..` name the
// catalog's modules inside this crate.
pub use store::{
    Change, Committed, EmbeddedStore, EtcdOptions, EtcdStore, Keyed, Loaded, MemoryStore, Record,
    Servers, Store, StoreBatch, StoreStatus, CATALOG_FILE,
};
use switchyard_catalog::{duration, model, snapshot};
pub use watch::WatchKey;
pub use writer::Registry;
