//! What the data plane tells the registry: checks for endpoints it sees
//! keep failing (the proxy's passive health reports). The proxy decides
//! what and when; the binary plugs the registry in, so the proxy needs no
//! more of the registry than this trait.

use std::future::Future;
use std::pin::Pin;

use crate::model::{Check, Name};

/// The outcome of one report, once the registry has it (durably).
pub type Reported<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where the data plane writes the checks it derives from traffic.
pub trait HealthReports: Send + Sync {
    /// Records `check` (its status given, replacing one with the same id).
    fn report(&self, check: Check) -> Reported<'_>;

    /// Removes the check `id` of `node`.
    fn withdraw(&self, node: Name, id: Name) -> Reported<'_>;
}
