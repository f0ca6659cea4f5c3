//! A proxy thread's own state ([`Local`]): its copies of the settings and
//! routes, its pool of idle upstream connections, buffers and pipes, its
//! io_uring, its deadline table and its shutdown counts. Every module that
//! serves a connection (HTTP/1.1, HTTP/2, TLS, L4) reads it; it uses none of
//! them, so the imports point one way.

use std::cell::{Cell, OnceCell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Cache};
use prometheus::IntGauge;
use switchyard_catalog::{ExtraKey, Refusal, Snapshot, Ticket};
use switchyard_uring::Ring;

/// A ring whose median wake-up takes longer is not used (prompt: ~0.1 ms).
const SLOW_WAKEUP: Duration = Duration::from_millis(1);
/// One-way trips a wake-up probe times (about 1.1 ms each), and probes at
/// most.
const PROBE_TRIPS: usize = 7;
const PROBES: usize = 3;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access;
use crate::backend::{ProxyDecorator, ProxyService};
use crate::balance::Backend;
use crate::config::{Config, TcpConfig};
use crate::deadline::Deadlines;
use crate::h2_tls::H2Tls;
use crate::io::{Buf, Conn};
use crate::metrics::Reject;
use crate::route::RouteTable;
use crate::shared::Shared;
use crate::splice::Pipe;
use crate::stats::EndpointStats;

/// Idle upstream connections older than this are closed by the sweeper
/// (below the usual 60-75 s keep-alive of upstream servers).
const POOL_IDLE: Duration = Duration::from_secs(30);
/// How often the sweeper closes idle connections to withdrawn endpoints
/// (drained, in maintenance, failing) and ones idle too long.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// `POOL_IDLE` in sweeps.
const POOL_IDLE_SWEEPS: u64 = POOL_IDLE.as_secs() / SWEEP_EVERY.as_secs();
/// Every this many sweeps, thread 0 prunes services that left the catalog.
pub(crate) const PRUNE_EVERY_SWEEPS: u32 = 10;

/// Idle connections to one endpoint address, newest last, with the time each
/// became idle.
struct Idle {
    stats: Arc<EndpointStats>,
    /// Each with the sweep count when it was put back (no clock read per
    /// request).
    streams: Vec<(Conn, u64)>,
}

/// The answer to a client over its connection cap.
const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 73\r\nconnection: close\r\nx-switchyard: proxy\r\n\r\ntoo many connections from your address (http.max_connections_per_client)\n";
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 71\r\nconnection: close\r\nx-switchyard: proxy\r\n\r\nthe proxy is at its connection limit (http.max_connections); try again\n";

/// A proxy thread's own state.
pub(crate) struct Local {
    pub(crate) shared: Arc<Shared>,
    backends: ExtraKey<ProxyDecorator>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    pub(crate) routes: RefCell<Cache<Arc<ArcSwap<RouteTable>>, Arc<RouteTable>>>,
    /// This thread's copies of the settings (`Rc`: no shared refcount per
    /// request), refreshed when a reload moves the shared generation.
    config: RefCell<Rc<Config>>,
    tcp: RefCell<Rc<TcpConfig>>,
    generation: Cell<u64>,
    /// Looked up twice per request: foldhash, not SipHash (the keys are our
    /// endpoints' addresses, not attacker-chosen).
    pool: RefCell<foldhash::HashMap<SocketAddr, Idle>>,
    /// Sweeps so far: the pool's coarse clock.
    sweeps: Cell<u64>,
    /// HTTP/2 connections are handed to hyper here.
    pub(crate) h2_tls: Arc<H2Tls>,
    /// Turns true at shutdown (HTTP/2 connections then send GOAWAY).
    pub(crate) stop: watch::Receiver<bool>,
    buffers: RefCell<Vec<Buf>>,
    /// Empty pipes for `splice`; `splicing` turns false when the kernel
    /// refuses to splice sockets, and bodies are then copied.
    pipes: RefCell<Vec<Pipe>>,
    splicing: Cell<bool>,
    pub(crate) rng: RefCell<fastrand::Rng>,
    request_ids: Cell<u64>,
    stopping: Cell<bool>,
    /// Requests whose head has begun to arrive, and L4 connections: what a
    /// shutdown waits for (idle keep-alive connections are not counted).
    pub(crate) active: Cell<usize>,
    /// Connections accepted that have not begun their first request: the
    /// client has one coming, so a shutdown waits `FIRST_REQUEST_GRACE` for it.
    pub(crate) fresh: Cell<usize>,
    /// Woken, once the thread is stopping, whenever one of the counts above
    /// (or an open connection) ends: what the shutdown waits on.
    settled: tokio::sync::Notify,
    /// This thread's open HTTP connections (see `Handoff`).
    thread_connections: IntGauge,
    /// The ring L4 connections relay through, made at the first one (`None`
    /// where io_uring is unavailable).
    ring: OnceCell<Option<Rc<Ring>>>,
    /// The time limits of this thread's waits (`deadline.rs`).
    pub(crate) deadlines: Deadlines,
}

impl Local {
    /// A thread's state, its copies of the settings taken now.
    pub(crate) fn new(
        shared: Arc<Shared>,
        backends: ExtraKey<ProxyDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        h2_tls: Arc<H2Tls>,
        stop: watch::Receiver<bool>,
        thread_connections: IntGauge,
    ) -> Local {
        Local {
            routes: RefCell::new(Cache::new(shared.routes.clone())),
            config: RefCell::new(Rc::new((**shared.config.load()).clone())),
            tcp: RefCell::new(Rc::new((**shared.tcp.load()).clone())),
            generation: Cell::new(shared.generation.load(Ordering::Acquire)),
            snapshot: RefCell::new(Cache::new(snapshot)),
            shared,
            backends,
            pool: RefCell::new(foldhash::HashMap::default()),
            sweeps: Cell::new(0),
            h2_tls,
            stop,
            buffers: RefCell::new(Vec::new()),
            pipes: RefCell::new(Vec::new()),
            splicing: Cell::new(true),
            rng: RefCell::new(fastrand::Rng::new()),
            request_ids: Cell::new(fastrand::u64(..) << 24),
            stopping: Cell::new(false),
            active: Cell::new(0),
            fresh: Cell::new(0),
            settled: tokio::sync::Notify::new(),
            thread_connections,
            ring: OnceCell::new(),
            deadlines: Deadlines::default(),
        }
    }

    /// `service_anywhere` without waiting for a copy's first fetch (a
    /// request's reload of its service).
    pub(crate) fn service_anywhere_now(
        &self,
        name: &str,
        reach: crate::failover::Reach,
    ) -> Option<Arc<ProxyService>> {
        let here = {
            let mut cache = self.snapshot.borrow_mut();
            crate::failover::here(&self.shared, cache.load(), self.backends, name, true, reach)
        };
        crate::failover::find_now(&self.shared, self.backends, name, here, reach)
    }

    /// A request's service: ours, or another datacenter's when ours fails
    /// over (`failover.rs`).
    pub(crate) async fn service_anywhere(
        &self,
        name: &str,
        reach: crate::failover::Reach,
    ) -> Option<Arc<ProxyService>> {
        let here = {
            let mut cache = self.snapshot.borrow_mut();
            crate::failover::here(
                &self.shared,
                cache.load(),
                self.backends,
                name,
                false,
                reach,
            )
        };
        crate::failover::find(&self.shared, self.backends, name, here, reach).await
    }

    fn refresh(&self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation.get() {
            let config = Rc::new((**self.shared.config.load()).clone());
            access::configure(config.access_log.as_deref());
            *self.config.borrow_mut() = config;
            *self.tcp.borrow_mut() = Rc::new((**self.shared.tcp.load()).clone());
            self.generation.set(generation);
        }
    }

    /// Counts a new connection against the proxy's cap and the per-client
    /// cap. `None` when either is reached: the connection is refused (plain
    /// HTTP gets a 503 or 429 first, written without waiting) and dropped.
    pub(crate) fn admit(&self, stream: &TcpStream, peer: SocketAddr, http: bool) -> Option<Ticket> {
        let config = self.config();
        let admitted = self.shared.admission.admit(
            peer.ip(),
            config.max_connections,
            config.max_connections_per_client,
        );
        match admitted {
            Ok(ticket) => Some(ticket),
            Err(refusal) => {
                let (why, answer) = match refusal {
                    Refusal::Full => (Reject::ConnectionLimit, FULL),
                    Refusal::Client => (Reject::ClientLimit, TOO_MANY),
                };
                self.shared.metrics.reject(why);
                if http {
                    let _ = stream.try_write(answer);
                }
                None
            }
        }
    }

    /// Whether requests are being logged (checked before building an entry).
    pub(crate) fn logging(&self) -> bool {
        self.refresh();
        access::enabled()
    }

    /// The `[http]` settings in force.
    pub(crate) fn config(&self) -> Rc<Config> {
        self.refresh();
        self.config.borrow().clone()
    }

    /// The `[tcp]` settings in force.
    pub(crate) fn tcp(&self) -> Rc<TcpConfig> {
        self.refresh();
        self.tcp.borrow().clone()
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        let id = self.request_ids.get().wrapping_add(1);
        self.request_ids.set(id);
        id
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.get()
    }

    fn buffer_size(&self) -> usize {
        self.config().max_header_bytes.max(16 * 1024)
    }

    /// A plain HTTP/1.1 connection, client or upstream, placed as `place`
    /// says.
    pub(crate) fn http_conn(&self, stream: TcpStream) -> Option<Conn> {
        let ring = self.http_ring();
        self.count_placed(ring.is_some());
        Conn::new(stream, ring.as_ref())
    }

    /// Moves `conn` (between exchanges) to where this thread's load says it
    /// belongs, if it is not there yet.
    pub(crate) fn place(&self, conn: &mut Conn) {
        let on_ring = matches!(conn, Conn::Ring { .. });
        let want = self.ring_wanted(on_ring);
        if want != on_ring {
            let ring = if want { self.ring() } else { None };
            if conn.place(ring.as_ref()) {
                self.count_placed(ring.is_some());
            }
        }
    }

    /// The ring for a plain HTTP/1.1 connection: `None` when `[http]
    /// io_uring` is off, io_uring is unavailable, or this thread serves
    /// too few connections for their operations to share its enters (with
    /// one client the ring costs more than tokio's path: RESULTS.md).
    fn http_ring(&self) -> Option<Rc<Ring>> {
        if self.ring_wanted(false) {
            self.ring()
        } else {
            None
        }
    }

    /// Whether HTTP/1.1 sockets go on the ring now, for one that is there
    /// already (`on_ring`) or not: from `io_uring_connections` client
    /// connections on this thread, and below half of that back to tokio.
    fn ring_wanted(&self, on_ring: bool) -> bool {
        let config = self.config();
        if !config.io_uring {
            return false;
        }
        let from = config.io_uring_connections as i64;
        let open = self.thread_connections.get();
        if on_ring {
            open >= from / 2
        } else {
            open >= from
        }
    }

    fn count_placed(&self, on_ring: bool) {
        let metrics = &self.shared.metrics;
        if on_ring {
            metrics.http_io_uring.inc();
        } else {
            metrics.http_tokio.inc();
        }
    }

    /// Makes this thread's io_uring and measures how promptly it wakes
    /// (`switchyard_proxy_io_uring_wakeup_seconds{thread}`). A ring that wakes
    /// later than [`SLOW_WAKEUP`] is not used: the thread's connections go
    /// through tokio's sockets, with one warning naming the kernel and the
    /// figure (a kernel that defers the ring's signal made every exchange
    /// wait ~25 ms, and only a benchmark saw it). Call before serving.
    pub(crate) async fn probe_ring(&self, thread: usize) {
        let Ok(ring) = Ring::new() else {
            // `ring()` says so on first use.
            return;
        };
        tokio::task::spawn_local(ring.clone().drive());
        // A kernel that defers the signal is slow every time; a busy machine
        // now and then: the best of up to three probes counts.
        let mut measured = Duration::MAX;
        for _ in 0..PROBES {
            match ring.wake_latency(PROBE_TRIPS).await {
                Ok(median) => measured = measured.min(median),
                Err(e) => {
                    tracing::warn!(error = %e, thread, "io_uring wake-up probe failed: this thread uses tokio's sockets");
                    let _ = self.ring.set(None);
                    return;
                }
            }
            if measured <= SLOW_WAKEUP {
                break;
            }
        }
        // A test hook: the slow path, forced.
        let floor = std::env::var("SWITCHYARD_TEST_RING_WAKEUP_FLOOR_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let median = measured.max(floor);
        self.shared
            .metrics
            .ring_wakeup
            .with_label_values(&[&thread.to_string()])
            .set(median.as_secs_f64());
        if median > SLOW_WAKEUP {
            let kernel = rustix::system::uname();
            tracing::warn!(
                thread,
                kernel = %kernel.release().to_string_lossy(),
                wakeup_ms = median.as_secs_f64() * 1e3,
                "io_uring wakes this thread late on this kernel: its connections use tokio's sockets"
            );
            let _ = self.ring.set(None);
        } else {
            let _ = self.ring.set(Some(ring));
        }
    }

    /// This thread's io_uring (for L4 relays and HTTP/1.1 connections),
    /// made and driven from the first call on; `None` (logged once per
    /// thread) where io_uring is unavailable.
    pub(crate) fn ring(&self) -> Option<Rc<Ring>> {
        self.ring
            .get_or_init(|| match Ring::new() {
                Ok(ring) => {
                    tokio::task::spawn_local(ring.clone().drive());
                    Some(ring)
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring is unavailable: connections go through tokio's reactor (L4 bytes with recv and send)"
                    );
                    None
                }
            })
            .clone()
    }

    pub(crate) fn take_buffer(&self) -> Buf {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Buf::with_capacity(self.buffer_size()))
    }

    /// Keeps up to 256 buffers of the base size; grown ones are freed, so
    /// idle memory stays small after a burst of large bodies.
    pub(crate) fn give_buffer(&self, mut buf: Buf) {
        let mut buffers = self.buffers.borrow_mut();
        if buffers.len() < 256 && buf.capacity() == self.buffer_size() {
            buf.clear();
            buffers.push(buf);
        }
    }

    /// An empty pipe for splicing a body, or `None` when bodies are copied.
    pub(crate) fn take_pipe(&self) -> Option<Pipe> {
        if !self.splicing.get() {
            return None;
        }
        if let Some(pipe) = self.pipes.borrow_mut().pop() {
            return Some(pipe);
        }
        match Pipe::new() {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a pipe for splice: copying this body");
                None
            }
        }
    }

    /// Takes back a pipe `splice::exact` left empty; keeps up to 64.
    pub(crate) fn give_pipe(&self, pipe: Pipe) {
        let mut pipes = self.pipes.borrow_mut();
        if pipes.len() < 64 {
            pipes.push(pipe);
        }
    }

    /// Whether long bodies are spliced on this thread.
    pub(crate) fn splices(&self) -> bool {
        self.splicing.get()
    }

    /// The kernel refused to splice sockets: copy from now on.
    pub(crate) fn stop_splicing(&self) {
        if self.splicing.replace(false) {
            tracing::warn!("splice(2) is not supported for these sockets: large bodies are copied");
        }
    }

    pub(crate) fn pool_take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut pool = self.pool.borrow_mut();
        pool.get_mut(&addr)?.streams.pop().map(|(s, _)| s)
    }

    pub(crate) fn pool_put(&self, backend: &Backend, stream: Conn) {
        if self.stopping.get() || backend.stats.is_withdrawn() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        let idle = pool.entry(backend.addr).or_insert_with(|| Idle {
            stats: backend.stats.clone(),
            streams: Vec::new(),
        });
        if idle.streams.len() < self.config().pool_per_endpoint {
            idle.streams.push((stream, self.sweeps.get()));
        }
    }

    /// This thread's open HTTP connections (see `server::Handoff`).
    pub(crate) fn thread_connections(&self) -> &IntGauge {
        &self.thread_connections
    }

    /// From now on exchanges answer with `Connection: close`.
    pub(crate) fn begin_stopping(&self) {
        self.stopping.set(true);
    }

    /// Tells a stopping thread that some of its work ended.
    pub(crate) fn work_ended(&self) {
        if self.stopping.get() {
            self.settled.notify_one();
        }
    }

    /// Waits until some work ends (`work_ended`) or `until`, whichever is
    /// first. A `work_ended` that came before the wait still counts.
    pub(crate) async fn work_ends_or(&self, until: tokio::time::Instant) {
        tokio::select! {
            _ = self.settled.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }

    /// Closes every idle upstream connection (at shutdown).
    pub(crate) fn drop_idle_upstreams(&self) {
        self.pool.borrow_mut().clear();
    }

    /// Closes idle connections that are too old or lead to an endpoint that
    /// was withdrawn, so a drained node sees its idle connections go.
    pub(crate) fn sweep(&self) {
        let sweeps = self.sweeps.get() + 1;
        self.sweeps.set(sweeps);
        let oldest = sweeps.saturating_sub(POOL_IDLE_SWEEPS);
        let mut pool = self.pool.borrow_mut();
        pool.retain(|_, idle| {
            if idle.stats.is_withdrawn() {
                return false;
            }
            idle.streams.retain(|(_, since)| *since >= oldest);
            !idle.streams.is_empty()
        });
    }
}

/// Counts a request in progress on this thread while it lives (or, made by
/// `adopt_fresh`, a new connection before its first request), and tells a
/// stopping thread when it ends.
pub(crate) struct Busy<'a> {
    local: &'a Local,
    counter: &'a Cell<usize>,
}

impl<'a> Busy<'a> {
    pub(crate) fn enter(local: &'a Local) -> Busy<'a> {
        local.active.set(local.active.get() + 1);
        Busy {
            local,
            counter: &local.active,
        }
    }

    /// Takes over the count the accept loop made for this new connection
    /// (made there, so a shutdown sees it before this task first runs).
    pub(crate) fn adopt_fresh(local: &'a Local) -> Busy<'a> {
        Busy {
            local,
            counter: &local.fresh,
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.counter.set(self.counter.get() - 1);
        self.local.work_ended();
    }
}
