//! Switchyard registry: the catalog of nodes, endpoints and checks.
//!
//! One writer task applies every change in order, makes it durable through a
//! [`Store`], and publishes an immutable [`Snapshot`] that readers load through
//! arc-swap without locking. This crate owns the types shared with DNS and the
//! proxy (re-exported here) and serves the HTTP API (Consul-compatible and native).
#![forbid(unsafe_code)]

pub mod api;
mod catalog;
mod config;
mod duration;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod load;
mod metrics;
mod model;
mod sched;
mod snapshot;
mod store;
mod watch;
mod writer;

pub use catalog::{Batch, Command, NewCheck, MAX_OUTPUT_BYTES};
pub use config::{ApiConfig, ApiTlsConfig, Role, StoreConfig, StoreKind, TokenConfig};
pub use duration::{format_go_duration, parse_go_duration};
pub use error::{RegistryError, StoreError};
pub use health::spawn_checker;
pub use load::{BusyEndpoint, ClusterLoad, EndpointLoad, LoadBoard, LoadReport, ServiceLoad};
pub use metrics::RegistryMetrics;
pub use model::{
    node_uuid, unix_ms, Check, CheckDefinition, Drain, Endpoint, Name, Node, Status, TaggedAddress,
    Weights, NODE_HEALTH_CHECK, NODE_MAINTENANCE_CHECK, SERVICE_MAINTENANCE_PREFIX,
};
pub use sched::ThreadPolicy;
pub use snapshot::{
    EndpointState, Extra, Extras, Instance, NodeEntry, ServiceView, Snapshot, StateCounts,
    TableIndexes, ViewDecorator,
};
pub use store::{
    Change, Committed, EmbeddedStore, EtcdOptions, EtcdStore, Keyed, Loaded, MemoryStore, Record,
    Store, StoreBatch, StoreStatus, CATALOG_FILE,
};
pub use watch::WatchKey;
pub use writer::Registry;
