//! Where the catalog is kept durably. The writer commits one `StoreBatch` per
//! group of commands and acknowledges them only after the commit returns.

mod embedded;

use std::future::Future;
use std::sync::Arc;

pub use embedded::{EmbeddedStore, CATALOG_FILE};

use crate::error::StoreError;
use crate::model::{Check, Endpoint, Name, Node};

/// A record keyed by `(node, id)`, or `None` for a deletion.
pub type Keyed<T> = ((Name, Name), Option<Arc<T>>);

/// Everything one group commit changes. `None` values are deletions.
#[derive(Debug, Default)]
pub struct StoreBatch {
    /// The catalog index after this batch; persisted so it never goes back.
    pub index: u64,
    pub nodes: Vec<(Name, Option<Arc<Node>>)>,
    pub endpoints: Vec<Keyed<Endpoint>>,
    pub checks: Vec<Keyed<Check>>,
    /// Last change index per service, kept for services that no longer exist.
    pub service_index: Vec<(Name, u64)>,
}

impl StoreBatch {
    pub fn len(&self) -> usize {
        self.nodes.len() + self.endpoints.len() + self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole stored catalog, read once at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub index: u64,
    pub nodes: Vec<Node>,
    pub endpoints: Vec<Endpoint>,
    pub checks: Vec<Check>,
    pub service_index: Vec<(String, u64)>,
}

/// A durable home for the catalog.
pub trait Store: Send + 'static {
    /// Short name for status output and logs (`embedded`, `memory`, `etcd`).
    fn kind(&self) -> &'static str;

    /// Reads everything stored. Called once, before the writer starts.
    fn load(&mut self) -> Result<Loaded, StoreError>;

    /// Makes a batch durable. The writer awaits it before acknowledging.
    fn commit(&mut self, batch: StoreBatch) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Keeps nothing: for tests and benchmarks of the in-memory path.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Number of commits seen, for tests of group commit.
    pub commits: u64,
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(
        &mut self,
        _batch: StoreBatch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.commits += 1;
        std::future::ready(Ok(()))
    }
}
