//! Registry metrics. Created once against the agent's explicit
//! `prometheus::Registry` (no global default registry anywhere in Switchyard).

use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::snapshot::{EndpointState, Snapshot};

pub struct RegistryMetrics {
    pub index: IntGauge,
    pub endpoints: IntGaugeVec,
    pub nodes: IntGauge,
    pub services: IntGauge,
    pub writes: IntCounterVec,
    pub write_errors: IntCounterVec,
    pub write_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub commit_commands: Histogram,
    pub commit_records: Histogram,
    pub publish_seconds: Histogram,
    pub blocking_queries: IntGauge,
    pub blocking_wakeups: IntCounter,
    pub api_requests: IntCounterVec,
    pub commit_conflicts: IntCounter,
    pub probes: IntCounter,
    pub snapshot_revision: IntGauge,
    pub store_connected: IntGauge,
    pub store_staleness: Gauge,
    pub propagation_seconds: Histogram,
    pub snapshot_age: Gauge,
    pub nodes_draining: IntGauge,
    /// When the last snapshot was published (Unix ms), for `snapshot_age`.
    published_ms: std::sync::atomic::AtomicU64,
}

fn seconds(name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(exponential_buckets(0.000_05, 2.5, 14)?),
    )
}

fn sizes(name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(exponential_buckets(1.0, 4.0, 10)?))
}

impl RegistryMetrics {
    pub fn new(registry: &Registry) -> Result<RegistryMetrics, prometheus::Error> {
        let m = RegistryMetrics {
            index: IntGauge::new("switchyard_registry_index", "Current catalog index")?,
            endpoints: IntGaugeVec::new(
                Opts::new(
                    "switchyard_registry_endpoints",
                    "Endpoints by state (passing, warning, critical, maintenance, draining)",
                ),
                &["state"],
            )?,
            nodes: IntGauge::new("switchyard_registry_nodes", "Registered nodes")?,
            services: IntGauge::new(
                "switchyard_registry_services",
                "Services with at least one endpoint",
            )?,
            writes: IntCounterVec::new(
                Opts::new(
                    "switchyard_registry_writes_total",
                    "Commands applied, by kind",
                ),
                &["kind"],
            )?,
            write_errors: IntCounterVec::new(
                Opts::new(
                    "switchyard_registry_write_errors_total",
                    "Commands refused or failed, by kind",
                ),
                &["kind"],
            )?,
            write_seconds: seconds(
                "switchyard_registry_write_duration_seconds",
                "From a command's arrival at the writer queue to its durable acknowledgment",
            )?,
            commit_seconds: seconds(
                "switchyard_registry_commit_duration_seconds",
                "Store commit time per group commit",
            )?,
            commit_commands: sizes(
                "switchyard_registry_commit_commands",
                "Commands folded into one group commit",
            )?,
            commit_records: sizes(
                "switchyard_registry_commit_records",
                "Records written by one group commit",
            )?,
            publish_seconds: seconds(
                "switchyard_registry_publish_duration_seconds",
                "Time to rebuild the touched service views and publish a snapshot",
            )?,
            blocking_queries: IntGauge::new(
                "switchyard_api_blocking_queries",
                "Blocking queries currently waiting",
            )?,
            blocking_wakeups: IntCounter::new(
                "switchyard_api_blocking_wakeups_total",
                "Times a waiting blocking query was woken to re-check its index",
            )?,
            api_requests: IntCounterVec::new(
                Opts::new(
                    "switchyard_api_requests_total",
                    "API requests by method and status class",
                ),
                &["method", "code"],
            )?,
            commit_conflicts: IntCounter::new(
                "switchyard_registry_store_conflicts_total",
                "Group commits retried because another agent wrote to the shared store first",
            )?,
            probes: IntCounter::new(
                "switchyard_health_probes_total",
                "Active health check probes this agent started (in cluster mode, only for the checks it owns)",
            )?,
            snapshot_revision: IntGauge::new(
                "switchyard_registry_store_revision",
                "Shared store revision the published snapshot reflects (0 for a local store)",
            )?,
            store_connected: IntGauge::new(
                "switchyard_registry_store_connected",
                "1 while the store is reachable (always 1 for a local store)",
            )?,
            store_staleness: Gauge::new(
                "switchyard_registry_store_staleness_seconds",
                "Time since the shared store last confirmed this agent's catalog is current",
            )?,
            propagation_seconds: seconds(
                "switchyard_registry_propagation_seconds",
                "From a write to the published snapshot that readers (API, DNS, proxy) see: for a local store from its arrival at the writer; in cluster mode from the writing agent's transaction, on every agent",
            )?,
            snapshot_age: Gauge::new(
                "switchyard_registry_snapshot_age_seconds",
                "Time since the snapshot readers see was published (grows while the catalog is quiet)",
            )?,
            nodes_draining: IntGauge::new(
                "switchyard_registry_nodes_draining",
                "Nodes under a drain (drained or still draining)",
            )?,
            published_ms: std::sync::atomic::AtomicU64::new(crate::model::unix_ms()),
        };
        registry.register(Box::new(m.index.clone()))?;
        registry.register(Box::new(m.endpoints.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.services.clone()))?;
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.write_errors.clone()))?;
        registry.register(Box::new(m.write_seconds.clone()))?;
        registry.register(Box::new(m.commit_seconds.clone()))?;
        registry.register(Box::new(m.commit_commands.clone()))?;
        registry.register(Box::new(m.commit_records.clone()))?;
        registry.register(Box::new(m.publish_seconds.clone()))?;
        registry.register(Box::new(m.blocking_queries.clone()))?;
        registry.register(Box::new(m.blocking_wakeups.clone()))?;
        registry.register(Box::new(m.api_requests.clone()))?;
        registry.register(Box::new(m.commit_conflicts.clone()))?;
        registry.register(Box::new(m.probes.clone()))?;
        registry.register(Box::new(m.snapshot_revision.clone()))?;
        registry.register(Box::new(m.store_connected.clone()))?;
        registry.register(Box::new(m.store_staleness.clone()))?;
        registry.register(Box::new(m.propagation_seconds.clone()))?;
        registry.register(Box::new(m.snapshot_age.clone()))?;
        registry.register(Box::new(m.nodes_draining.clone()))?;
        Ok(m)
    }

    /// Metrics not registered anywhere, for tests and benchmarks.
    pub fn unregistered() -> RegistryMetrics {
        match RegistryMetrics::new(&Registry::new()) {
            Ok(m) => m,
            Err(e) => unreachable!("static metric definitions are valid: {e}"),
        }
    }

    /// Time since the last publish.
    pub fn snapshot_age(&self) -> std::time::Duration {
        let published = self.published_ms.load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_millis(crate::model::unix_ms().saturating_sub(published))
    }

    /// Refreshes the gauges computed at scrape time (a walk over the nodes:
    /// once per scrape, never per write).
    pub fn before_scrape(&self, snap: &Snapshot) {
        self.snapshot_age.set(self.snapshot_age().as_secs_f64());
        let draining = snap.nodes().filter(|e| e.node.drain.is_some()).count();
        self.nodes_draining
            .set(i64::try_from(draining).unwrap_or(i64::MAX));
    }

    pub(crate) fn observe_snapshot(&self, snap: &Snapshot) {
        self.published_ms.store(
            crate::model::unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.index.set(snap.index() as i64);
        self.nodes.set(snap.node_count() as i64);
        self.services.set(snap.service_count() as i64);
        let counts = snap.counts();
        for state in EndpointState::ALL {
            self.endpoints
                .with_label_values(&[state.as_str()])
                .set(counts.get(state) as i64);
        }
    }
}
