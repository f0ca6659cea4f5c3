//! Switchyard proxy: L7 and L4 load balancing driven by registry snapshots.
//!
//! The foundation only reserves the crate; the proxy issues fill it. It depends on
//! `switchyard-registry` for the snapshot types and never on the DNS crate.
#![forbid(unsafe_code)]

pub use switchyard_registry::Snapshot;
