//! Per-endpoint and per-service runtime state, shared by every proxy thread.
//!
//! State that must outlive one view (in-flight counts, latency estimates,
//! failure streaks, ejections, retry budgets, metric handles) lives in
//! `EndpointStats` and `ServiceStats`, created when an endpoint or service
//! first appears and found again by key when the next view is built.
//! Requests touch only atomics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchyard_catalog::{unix_ms, Instance, Name};

use crate::balance::Backends;
use crate::config::OutlierConfig;
use crate::metrics::{EndpointMetrics, ServiceMetrics};

/// Nanoseconds since the first call: a cheap monotonic clock for atomics.
pub(crate) fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Decay time of the peak-EWMA latency estimate.
const EWMA_DECAY_NS: f64 = 1e9;
/// Latency assumed for an endpoint not measured yet (it is tried soon, not flooded).
const EWMA_INITIAL_NS: f64 = 1e6;

/// Runtime state of one endpoint, shared by every proxy thread.
pub(crate) struct EndpointStats {
    pub(crate) id: Name,
    pub(crate) node: Name,
    pub(crate) metrics: EndpointMetrics,
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    pub(crate) failures: AtomicU32,
    ejected_until_ns: AtomicU64,
    ejections: AtomicU32,
    /// Set at publish time when the endpoint leaves the routable set (drain,
    /// maintenance, critical), before the snapshot that says so is visible.
    withdrawn: AtomicBool,
    /// Start and deadline (Unix ms, 0 = none) of the drain it is under.
    drain_since_ms: AtomicU64,
    drain_deadline_ms: AtomicU64,
    /// Wakes long-lived connections when the drain deadline changes.
    drain_changed: tokio::sync::Notify,
    /// Long-lived connections closed at the deadline since the drain began.
    pub(crate) cut: AtomicU64,
    /// When the current run of failures got it ejected (0 = not failing):
    /// what the passive reporter looks at.
    failing_since_ns: AtomicU64,
    /// Its last response had a body long enough to splice.
    large_responses: AtomicBool,
    /// When it last became routable again, or joined a service that had
    /// endpoints already (0 = never): where its slow start begins.
    ramp_from_ns: AtomicU64,
}

impl EndpointStats {
    pub(crate) fn new(id: Name, node: Name, metrics: EndpointMetrics) -> EndpointStats {
        EndpointStats {
            id,
            node,
            metrics,
            ewma_ns: AtomicU64::new(EWMA_INITIAL_NS.to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            withdrawn: AtomicBool::new(false),
            drain_since_ms: AtomicU64::new(0),
            drain_deadline_ms: AtomicU64::new(0),
            drain_changed: tokio::sync::Notify::new(),
            cut: AtomicU64::new(0),
            failing_since_ns: AtomicU64::new(0),
            large_responses: AtomicBool::new(false),
            ramp_from_ns: AtomicU64::new(0),
        }
    }

    /// Begins a slow start now: the endpoint joined a service that was
    /// already taking traffic.
    pub(crate) fn start_ramp(&self) {
        self.start_ramp_at(now_ns());
    }

    pub(crate) fn start_ramp_at(&self, now: u64) {
        self.ramp_from_ns.store(now.max(1), Ordering::Relaxed);
    }

    /// The share of its weight a route with a slow-start `window` gives
    /// it: from `RAMP_FLOOR` when it became routable again (or its
    /// ejection ended) to 1 at the window's end.
    pub(crate) fn ramp(&self, now: u64, window: u64) -> f64 {
        let ejected_until = self.ejected_until_ns.load(Ordering::Relaxed);
        let from = self.ramp_from_ns.load(Ordering::Relaxed).max(ejected_until);
        if from == 0 || now >= from.saturating_add(window) {
            return 1.0;
        }
        let floor = crate::balance::RAMP_FLOOR;
        floor + (1.0 - floor) * (now.saturating_sub(from) as f64 / window as f64)
    }

    /// Since when the endpoint has been failing without a success (ns on
    /// `now_ns`'s clock), if it is.
    pub(crate) fn failing_since(&self) -> Option<u64> {
        match self.failing_since_ns.load(Ordering::Relaxed) {
            0 => None,
            since => Some(since),
        }
    }

    /// Forgets the failing run (a report was withdrawn: new evidence needed).
    pub(crate) fn reset_failing(&self) {
        self.failing_since_ns.store(0, Ordering::Relaxed);
    }

    pub(crate) fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// Counts a request or connection to this endpoint; false (and nothing
    /// counted) when the endpoint was withdrawn after the caller's snapshot.
    ///
    /// Pairs with `publish_state`: the count is made before the flag is read
    /// and the flag is set before the snapshot is published, so either this
    /// sees the flag, or a drain status read after the publish sees the count.
    pub(crate) fn enter(&self) -> bool {
        self.metrics.in_flight.inc();
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.withdrawn.load(Ordering::Relaxed) {
            self.metrics.in_flight.dec();
            return false;
        }
        true
    }

    pub(crate) fn leave(&self) {
        self.metrics.in_flight.dec();
    }

    pub(crate) fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Relaxed)
    }

    /// Records the endpoint's routability and drain at publish time.
    pub(crate) fn publish_state(&self, instance: &Instance) {
        let routable = instance.is_routable();
        if self.withdrawn.swap(!routable, Ordering::Relaxed) && routable {
            self.start_ramp();
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let since = [&instance.node.drain, &instance.endpoint.drain]
            .into_iter()
            .flatten()
            .map(|d| d.since_ms)
            .max()
            .unwrap_or(0);
        if since != 0 && self.drain_since_ms.swap(since, Ordering::Relaxed) != since {
            self.cut.store(0, Ordering::Relaxed);
        }
        let deadline = instance.drain_deadline_ms().unwrap_or(0);
        if self.drain_deadline_ms.swap(deadline, Ordering::Release) != deadline {
            self.drain_changed.notify_waiters();
        }
    }

    /// Resolves when the endpoint's drain deadline has passed; pends while it
    /// has none. Long-lived connections select on it and close.
    pub(crate) async fn drain_deadline(&self) {
        loop {
            let changed = self.drain_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = self.drain_deadline_ms.load(Ordering::Acquire);
            if deadline == 0 {
                changed.await;
                continue;
            }
            let now = unix_ms();
            if now >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                _ = changed => {}
            }
        }
    }

    /// Counts a long-lived connection closed at the drain deadline.
    pub(crate) fn note_cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
        self.metrics.drain_cuts.inc();
        tracing::info!(endpoint = %self.id, node = %self.node, "connection closed at the drain deadline");
    }

    /// Peak-EWMA latency, decayed for the time since the last sample so an
    /// endpoint that was slow once gets tried again.
    pub(crate) fn latency_ns(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        ewma * (-age / EWMA_DECAY_NS).exp()
    }

    /// The last peak-EWMA estimate, undecayed (what the operator's view shows).
    pub(crate) fn ewma_us(&self) -> u64 {
        (f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) / 1e3) as u64
    }

    /// Whether its last response had a body long enough to splice: the
    /// next one's head is then read on its own, so that little of the body
    /// is copied through user space before the splice takes over.
    pub(crate) fn large_responses(&self) -> bool {
        self.large_responses.load(Ordering::Relaxed)
    }

    pub(crate) fn note_response(&self, large: bool) {
        // Written only on a change: the line stays shared between threads.
        if self.large_responses.load(Ordering::Relaxed) != large {
            self.large_responses.store(large, Ordering::Relaxed);
        }
    }

    /// Folds in one response time: a slower sample replaces the estimate at
    /// once (the "peak"), a faster one pulls it down gradually.
    pub(crate) fn observe(&self, rtt_ns: u64, now: u64) {
        let rtt = rtt_ns as f64;
        let old = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        let next = if rtt > old {
            rtt
        } else {
            let w = (-age / EWMA_DECAY_NS).exp();
            old * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) > now
    }

    pub(crate) fn succeeded(&self, now: u64) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.failing_since_ns.load(Ordering::Relaxed) != 0 {
            self.failing_since_ns.store(0, Ordering::Relaxed);
        }
        // A success after the ejection has ended settles the endpoint: its
        // next ejection starts from the base time again.
        if self.ejections.load(Ordering::Relaxed) != 0 {
            let until = self.ejected_until_ns.load(Ordering::Relaxed);
            if until != 0 && now > until {
                // Its slow start after the ejection goes on from there.
                self.ramp_from_ns.fetch_max(until, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
                self.ejected_until_ns.store(0, Ordering::Relaxed);
                self.metrics.ejected.set(0);
            }
        }
    }

    /// Counts a failure; ejects the endpoint when the streak reaches the
    /// threshold and the service's cap allows. Returns whether the cap
    /// refused an ejection (the service is then failing open).
    pub(crate) fn failed(
        &self,
        now: u64,
        outlier: &OutlierConfig,
        service: &ServiceStats,
        peers: &Backends,
    ) -> bool {
        let streak = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0
            || streak < outlier.consecutive_failures
            || self.is_ejected(now)
        {
            return false;
        }
        let ejected = peers.iter().filter(|b| b.stats.is_ejected(now)).count();
        let cap = peers.len() * outlier.max_ejected_percent as usize / 100;
        if ejected > 0 && ejected + 1 > cap {
            service.set_fail_open(
                true,
                &format!(
                    "{} of {} endpoints already ejected; {} keeps failing",
                    ejected,
                    peers.len(),
                    self.id
                ),
            );
            return true;
        }
        let round = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let time = outlier
            .base_ejection
            .saturating_mul(1 << round)
            .min(outlier.max_ejection);
        let until = now.saturating_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until_ns.store(until, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        let _ = self.failing_since_ns.compare_exchange(
            0,
            now.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.metrics.ejections.inc();
        self.metrics.ejected.set(1);
        tracing::warn!(
            service = %service.name, endpoint = %self.id, node = %self.node,
            failures = streak, ejected_for = ?time,
            "endpoint ejected by outlier detection"
        );
        false
    }
}

/// Runtime state of one routed service.
pub(crate) struct ServiceStats {
    pub(crate) name: Name,
    pub(crate) metrics: ServiceMetrics,
    fail_open: AtomicBool,
    window_sec: AtomicU64,
    window_requests: AtomicU32,
    window_retries: AtomicU32,
}

impl ServiceStats {
    pub(crate) fn new(name: Name, metrics: ServiceMetrics) -> ServiceStats {
        ServiceStats {
            name,
            metrics,
            fail_open: AtomicBool::new(false),
            window_sec: AtomicU64::new(0),
            window_requests: AtomicU32::new(0),
            window_retries: AtomicU32::new(0),
        }
    }

    /// Enters or leaves fail-open, logging each transition once.
    pub(crate) fn set_fail_open(&self, on: bool, reason: &str) {
        if self.fail_open.load(Ordering::Relaxed) == on {
            return;
        }
        if self.fail_open.swap(on, Ordering::Relaxed) == on {
            return;
        }
        self.metrics.fail_open.set(i64::from(on));
        if on {
            tracing::warn!(service = %self.name, reason, "service is failing open: sending to endpoints that are failing");
        } else {
            tracing::info!(service = %self.name, "service left fail-open");
        }
    }

    /// After a pick: a first attempt that had to take an ejected endpoint
    /// (`fail_open`) sets fail-open; a service in fail-open with no ejected
    /// endpoint left clears it. Every transport calls this with its picks,
    /// so a service reached only over HTTP/2, TLS or L4 leaves fail-open too.
    /// A retry that falls back to an ejected endpoint has merely run out of
    /// others: it speaks for nothing.
    pub(crate) fn after_pick(&self, fail_open: bool, first: bool, backends: &Backends, now: u64) {
        if fail_open && first {
            self.set_fail_open(true, "every endpoint is ejected");
        } else if self.is_fail_open() && !backends.iter().any(|b| b.stats.is_ejected(now)) {
            self.set_fail_open(false, "");
        }
    }

    pub(crate) fn is_fail_open(&self) -> bool {
        self.fail_open.load(Ordering::Relaxed)
    }

    fn window(&self, now: u64) {
        let sec = now / 1_000_000_000;
        let current = self.window_sec.load(Ordering::Relaxed);
        if current != sec
            && self
                .window_sec
                .compare_exchange(current, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.window_requests.store(0, Ordering::Relaxed);
            self.window_retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a first attempt toward the retry budget.
    pub(crate) fn note_request(&self, now: u64) {
        self.window(now);
        self.window_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget: `floor` per second plus `ratio` of
    /// this second's requests.
    pub(crate) fn take_retry(&self, now: u64, ratio: f64, floor: u32) -> bool {
        self.window(now);
        let requests = f64::from(self.window_requests.load(Ordering::Relaxed));
        let allowed = f64::from(floor) + requests * ratio;
        let used = self.window_retries.fetch_add(1, Ordering::Relaxed);
        if f64::from(used) < allowed {
            self.metrics.retries.inc();
            true
        } else {
            self.window_retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

/// `Duration` to nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One routable endpoint as the balancers see it: its stats, where to
/// reach it, and its weight in this view.
#[derive(Clone)]
pub(crate) struct Backend {
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    /// Its registry record (tags for splits); none for another
    /// datacenter's proxies.
    pub(crate) endpoint: Option<Arc<switchyard_catalog::model::Endpoint>>,
}

impl Backend {
    /// Whether its endpoint carries `tag`.
    pub(crate) fn has_tag(&self, tag: &str) -> bool {
        self.endpoint
            .as_ref()
            .is_some_and(|e| e.tags.iter().any(|t| t == tag))
    }
}
