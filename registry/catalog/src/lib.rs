//! Switchyard catalog: the records (nodes, endpoints, checks), the immutable
//! [`Snapshot`] the registry's writer publishes, its per-service views and
//! their decorators, and the few settings and questions the roles share
//! ([`ThreadPolicy`], [`LoadReport`], [`HealthReports`], Go durations).
//!
//! This is all that DNS and the proxy depend on: it does no I/O, so they
//! build without the registry's stores, API or health checker. The registry
//! builds snapshots (the `pub` fields and builders marked "the writer's"),
//! everyone else reads them.
#![forbid(unsafe_code)]

pub mod accept;
pub mod admission;
pub mod duration;
pub mod elsewhere;
pub mod kv;
pub mod load;
pub mod model;
pub mod query;
pub mod report;
pub mod session;
pub mod snapshot;
pub mod thread_policy;
pub mod view;

pub use accept::{accepts_open, hold_accepts, open_accepts, AcceptBackoff, AcceptErrors};
pub use admission::{Admission, Refusal, Ticket};
pub use duration::{format_go_duration, parse_go_duration};
pub use elsewhere::{
    failover_policy, needs_failover, Copied, CopyOf, Elsewhere, Failover, FAILOVER_TAG,
};
pub use kv::{Kv, KvEntry};
pub use load::{BusyEndpoint, EndpointLoad, LoadReport, RateSeen, ServiceLoad};
pub use model::{
    clip, clip_point, node_uuid, unix_ms, Check, CheckDefinition, CheckKind, Drain, Endpoint, Name,
    Node, Status, TaggedAddress, Weights, NODE_HEALTH_CHECK, NODE_MAINTENANCE_CHECK,
    SERVICE_MAINTENANCE_PREFIX,
};
pub use query::{
    PreparedQuery, Queries, Query, QueryFailover, QueryService, QueryTemplate, NAME_PREFIX_MATCH,
};
pub use report::{HealthReports, Reported};
pub use session::{Behavior, Session, Sessions};
pub use snapshot::{
    EndpointState, Instance, Members, NodeEntry, Snapshot, StateCounts, TableIndexes,
};
pub use thread_policy::ThreadPolicy;
pub use view::{
    Chunk, Decorators, Extra, ExtraKey, Extras, ServiceView, ViewChange, ViewDecorator, ViewHead,
    CHUNK,
};
