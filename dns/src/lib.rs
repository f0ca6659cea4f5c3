//! Switchyard DNS: authoritative service discovery answered from registry snapshots.
//!
//! The foundation only reserves the crate; the DNS role (issue "DNS: authoritative
//! service discovery") fills it. It depends on `switchyard-registry` for the snapshot
//! types and never on the proxy.
#![forbid(unsafe_code)]

pub use switchyard_registry::Snapshot;
