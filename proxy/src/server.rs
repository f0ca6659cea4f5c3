//! Thread-per-core serving: each proxy thread runs a current-thread tokio
//! runtime with its own SO_REUSEPORT listener, its own pool of idle upstream
//! connections and its own buffers, so a request touches no lock and no
//! state of another thread except the shared per-endpoint atomics (and, at
//! accept, a new connection handed to a less busy thread: `Handoff`).

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::{ArcSwap, Cache};
use prometheus::IntGauge;
use socket2::{Domain, Protocol, Socket, Type};
use switchyard_catalog::{ExtraKey, Snapshot};
use switchyard_uring::Ring;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access;
use crate::backend::{client_slot, Backend, ClientSlot, EndpointStats, ProxyService, Shared};
use crate::config::{Config, TcpConfig};
use crate::conn;
use crate::deadline::Deadlines;
use crate::h2::H2;
use crate::io::{Buf, Conn};
use crate::metrics::{ProxyMetrics, Reject};
use crate::route::RouteTable;
use crate::splice::Pipe;
use crate::tcp::{self, TcpRoute};
use crate::wire::Client;

/// Idle upstream connections older than this are closed by the sweeper
/// (below the usual 60-75 s keep-alive of upstream servers).
const POOL_IDLE: Duration = Duration::from_secs(30);
/// How often the sweeper closes idle connections to withdrawn endpoints
/// (drained, in maintenance, failing) and ones idle too long.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// `POOL_IDLE` in sweeps.
const POOL_IDLE_SWEEPS: u64 = POOL_IDLE.as_secs() / SWEEP_EVERY.as_secs();
/// Every this many sweeps, thread 0 prunes services that left the catalog.
const PRUNE_EVERY_SWEEPS: u32 = 10;

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

/// A proxy thread's own state.
pub(crate) struct Local {
    pub(crate) shared: Arc<Shared>,
    backends: ExtraKey<ProxyService>,
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
    pub(crate) h2: Arc<H2>,
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
    /// This thread's open HTTP connections (see `Handoff`).
    thread_connections: IntGauge,
    /// The ring L4 connections relay through, made at the first one (`None`
    /// where io_uring is unavailable).
    ring: OnceCell<Option<Rc<Ring>>>,
    /// The time limits of this thread's waits (`deadline.rs`).
    pub(crate) deadlines: Deadlines,
}

/// How long a shutdown waits for a connection it accepted to send its first
/// request. Closing it at once would lose a request that was on its way: a
/// client retries only on a reused connection, never on a new one.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// How long a shutdown keeps idle keep-alive connections open. A client
/// under load sends its next request the moment a response arrives; closing
/// its connection then would lose that request (wrk counts a read error, a
/// browser retries). Within this window it is served with `Connection:
/// close` instead, and the client opens a new connection (to the successor,
/// at an upgrade). Connections idle for all of it are closed at its end.
const IDLE_DRAIN: Duration = Duration::from_secs(1);

impl Local {
    /// The proxy's view of a service in the current snapshot.
    pub(crate) fn service(&self, name: &str) -> Option<Arc<ProxyService>> {
        let mut cache = self.snapshot.borrow_mut();
        cache.load().service(name)?.extra_arc(self.backends)
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

    /// Counts a new connection against the per-client cap. `None` when the
    /// client is at its cap: the connection is refused (plain HTTP gets a
    /// 429 first, written without waiting) and dropped.
    pub(crate) fn admit(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        http: bool,
    ) -> Option<Option<ClientSlot>> {
        let max = self.config().max_connections_per_client;
        match client_slot(&self.shared, peer.ip(), max) {
            Ok(slot) => Some(slot),
            Err(()) => {
                self.shared.metrics.reject(Reject::ClientLimit);
                if http {
                    let _ = stream.try_write(TOO_MANY);
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

    /// Closes idle connections that are too old or lead to an endpoint that
    /// was withdrawn, so a drained node sees its idle connections go.
    fn sweep(&self) {
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

/// The running proxy (HTTP and L4 listeners): its threads and their shared
/// stop signal.
pub struct HttpProxy {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    /// Kept to hand the listeners to a new process (binary upgrade).
    sockets: ProxySockets,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

/// The proxy's listening sockets: one HTTP listener per thread (a
/// SO_REUSEPORT group) and, per `[[tcp.listeners]]` entry, one per thread.
pub struct ProxySockets {
    pub http: Vec<std::net::TcpListener>,
    pub tcp: Vec<Vec<std::net::TcpListener>>,
    /// HTTPS, one per thread; empty when `[http.tls]` is off.
    pub tls: Vec<std::net::TcpListener>,
}

impl ProxySockets {
    /// Second handles on the same sockets (the kernel objects are shared).
    pub fn try_clone(&self) -> io::Result<ProxySockets> {
        let clone_all = |list: &[std::net::TcpListener]| {
            list.iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<io::Result<Vec<_>>>()
        };
        Ok(ProxySockets {
            http: clone_all(&self.http)?,
            tcp: self
                .tcp
                .iter()
                .map(|group| clone_all(group))
                .collect::<io::Result<_>>()?,
            tls: clone_all(&self.tls)?,
        })
    }
}

/// `threads` listeners on `addr` (the first picks the port when it is 0).
fn listener_group(addr: SocketAddr, threads: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listener(addr)?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..threads {
        group.push(listener(bound)?);
    }
    Ok(group)
}

/// One thread's L4 listeners, each with its route.
type TcpListeners = Vec<(std::net::TcpListener, Arc<TcpRoute>)>;

fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl HttpProxy {
    /// Binds one listener per thread on `http.addr` and on each L4
    /// listener's address (or serves on `inherited` sockets from the process
    /// this one upgrades: then their number sets the thread count), and
    /// starts the threads.
    pub(crate) fn start(
        shared: Arc<Shared>,
        backends: ExtraKey<ProxyService>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        inherited: Option<ProxySockets>,
    ) -> io::Result<HttpProxy> {
        let config = shared.config.load_full();
        let tcp_config = shared.tcp.load_full();
        let mut sockets = match inherited {
            Some(sockets) if !sockets.http.is_empty() => sockets,
            _ => ProxySockets {
                http: listener_group(config.addr, config.thread_count())?,
                tcp: Vec::new(),
                tls: Vec::new(),
            },
        };
        let threads = sockets.http.len();
        let acceptor = match config.tls.addr {
            Some(addr) => {
                if sockets.tls.len() != threads {
                    sockets.tls = listener_group(addr, threads)?;
                }
                Some(crate::tls::acceptor(&config.tls).map_err(io::Error::other)?)
            }
            None => {
                sockets.tls.clear();
                None
            }
        };
        let tls_addr = match sockets.tls.first() {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        // L4 listeners come in config order; a group that does not match
        // the thread count (or is missing) is bound afresh.
        sockets.tcp.truncate(tcp_config.listeners.len());
        for (index, listener_config) in tcp_config.listeners.iter().enumerate() {
            match sockets.tcp.get(index) {
                Some(group) if group.len() == threads => {}
                _ => {
                    let group = listener_group(listener_config.addr, threads)?;
                    if index < sockets.tcp.len() {
                        sockets.tcp[index] = group;
                    } else {
                        sockets.tcp.push(group);
                    }
                }
            }
        }
        let kept = sockets.try_clone()?;
        let addr = sockets.http[0].local_addr()?;
        let mut tcp: Vec<TcpListeners> = (0..threads).map(|_| Vec::new()).collect();
        let mut tcp_addrs = Vec::new();
        for (index, group) in sockets.tcp.into_iter().enumerate() {
            let bound = group[0].local_addr()?;
            let route = Arc::new(TcpRoute {
                index,
                metrics: shared.metrics.tcp_listener(&bound.to_string()),
            });
            for (own, listener) in tcp.iter_mut().zip(group) {
                own.push((listener, route.clone()));
            }
            tcp_addrs.push(bound);
        }
        let listeners = sockets.http;
        let mut tls_listeners: Vec<Option<std::net::TcpListener>> =
            sockets.tls.into_iter().map(Some).collect();
        tls_listeners.resize_with(threads, || None);
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        let handoffs = Handoff::group(&shared.metrics, threads);
        for (index, (((listener, tcp), tls), handoff)) in listeners
            .into_iter()
            .zip(tcp)
            .zip(tls_listeners)
            .zip(handoffs)
            .enumerate()
        {
            let thread = Thread {
                index,
                shared: shared.clone(),
                backends,
                snapshot: snapshot.clone(),
                listener,
                tcp,
                tls: tls.zip(acceptor.clone()),
                // Per thread: hyper's client runs each upstream connection as
                // a task on the runtime that opened it, so a pool shared by
                // the threads lent connections that died with another
                // thread's runtime at shutdown (a 502 for a late HTTPS request).
                h2: Arc::new(H2::new(shared.clone(), backends, snapshot.clone())),
                stop: stop_rx.clone(),
                handoff,
            };
            let handle = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || run_thread(thread))?;
            handles.push(handle);
        }
        Ok(HttpProxy {
            addr,
            tls_addr,
            tcp_addrs,
            sockets: kept,
            stop,
            threads: handles,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTPS listener's address, when `[http.tls]` is on.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The L4 listeners' bound addresses, in config order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Handles on the listening sockets, for a new process to serve on.
    pub fn sockets(&self) -> &ProxySockets {
        &self.sockets
    }

    /// Stops accepting; requests in progress finish (answered with
    /// `Connection: close`) within `shutdown_grace`; then each thread closes
    /// its idle keep-alive connections and ends.
    pub async fn shutdown(self) {
        let HttpProxy {
            sockets,
            stop,
            threads,
            ..
        } = self;
        // The threads drop their listeners as they stop accepting; the
        // handles kept for an upgrade must go too, or the sockets stay
        // listening through the grace and new connections queue unanswered
        // in their backlogs instead of being refused.
        drop(sockets);
        let _ = stop.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// What one proxy thread starts with.
struct Thread {
    index: usize,
    shared: Arc<Shared>,
    backends: ExtraKey<ProxyService>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    listener: std::net::TcpListener,
    tcp: TcpListeners,
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    h2: Arc<H2>,
    stop: watch::Receiver<bool>,
    handoff: Handoff,
}

/// What a connection is for: which listener accepted it.
#[derive(Clone)]
enum Kind {
    Http,
    Https(tokio_rustls::TlsAcceptor),
    Tcp(Arc<TcpRoute>),
}

/// A new connection handed from the thread that accepted it to a less busy
/// one.
struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Option<ClientSlot>,
    kind: Kind,
}

/// Spreads client connections (HTTP, HTTPS and L4) evenly over the proxy
/// threads. Each thread accepts from its own `SO_REUSEPORT` listeners, which
/// split connections by address hash: 50 clients can land 30/20, and those
/// on the busier thread wait longer (HAProxy dispatches to its least busy
/// thread). A thread holding more than `HANDOFF_SLACK` above the least busy
/// one passes a new connection there.
#[derive(Clone)]
struct Dispatch {
    own: usize,
    /// Open client connections per thread (the `thread_connections` gauges).
    counts: Arc<[IntGauge]>,
    peers: Arc<[tokio::sync::mpsc::UnboundedSender<Handed>]>,
}

/// A thread's side of the handoff: where to send, and what it was sent.
struct Handoff {
    dispatch: Dispatch,
    inbox: tokio::sync::mpsc::UnboundedReceiver<Handed>,
}

const HANDOFF_SLACK: i64 = 1;

impl Handoff {
    fn group(metrics: &ProxyMetrics, threads: usize) -> Vec<Handoff> {
        let counts: Arc<[IntGauge]> = (0..threads)
            .map(|i| {
                metrics
                    .thread_connections
                    .with_label_values(&[&i.to_string()])
            })
            .collect();
        let (peers, inboxes): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let peers: Arc<[_]> = peers.into();
        inboxes
            .into_iter()
            .enumerate()
            .map(|(own, inbox)| Handoff {
                dispatch: Dispatch {
                    own,
                    counts: counts.clone(),
                    peers: peers.clone(),
                },
                inbox,
            })
            .collect()
    }
}

impl Dispatch {
    /// The thread that serves a connection this one accepted, counted for
    /// it now (so two threads deciding at once see each other's choice).
    fn choose(&self) -> usize {
        let least = (0..self.counts.len())
            .min_by_key(|&i| self.counts[i].get())
            .unwrap_or(self.own);
        let target = if self.counts[self.own].get() > self.counts[least].get() + HANDOFF_SLACK {
            least
        } else {
            self.own
        };
        self.counts[target].inc();
        target
    }

    /// Serves a connection this thread accepted, here or on the thread
    /// `choose` picks. A thread that has stopped taking connections gives it
    /// back, and it is served here.
    fn place(
        &self,
        local: &Rc<Local>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: Option<ClientSlot>,
        kind: Kind,
    ) {
        let target = self.choose();
        if target == self.own {
            serve_here(local, stream, peer, slot, kind);
            return;
        }
        let Ok(stream) = stream.into_std() else {
            self.counts[target].dec();
            return;
        };
        let handed = Handed {
            stream,
            peer,
            slot,
            kind,
        };
        if let Err(back) = self.peers[target].send(handed) {
            self.counts[target].dec();
            let back = back.0;
            if let Ok(stream) = TcpStream::from_std(back.stream) {
                self.counts[self.own].inc();
                serve_here(local, stream, back.peer, back.slot, back.kind);
            }
        }
    }
}

/// Serves one client connection on this thread; it was counted in
/// `thread_connections` for it already (and is uncounted when it ends).
fn serve_here(
    local: &Rc<Local>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Option<ClientSlot>,
    kind: Kind,
) {
    match kind {
        Kind::Http => {
            // Counted now: `conn::serve` adopts it when it first runs.
            local.fresh.set(local.fresh.get() + 1);
            let info = Client::new(peer.ip(), "http");
            spawn_counted(local, slot, conn::serve(local.clone(), stream, info));
        }
        Kind::Https(acceptor) => {
            // Counted now, as for HTTP: `tls::serve` adopts it.
            local.fresh.set(local.fresh.get() + 1);
            let serve = crate::tls::serve(local.clone(), acceptor, stream, peer);
            spawn_counted(local, slot, serve);
        }
        Kind::Tcp(route) => {
            spawn_counted(local, slot, tcp::serve(local.clone(), route, stream, peer))
        }
    }
}

/// Runs one connection's task, holding its per-client slot, and uncounts it
/// from `thread_connections` when it ends.
fn spawn_counted(
    local: &Local,
    slot: Option<ClientSlot>,
    serve: impl std::future::Future<Output = ()> + 'static,
) {
    let count = local.thread_connections.clone();
    tokio::task::spawn_local(async move {
        let _slot = slot;
        serve.await;
        count.dec();
    });
}

/// Serves a connection another thread accepted (already counted for this
/// one in `thread_connections`).
fn take_handed(local: &Rc<Local>, handed: Handed) {
    match TcpStream::from_std(handed.stream) {
        Ok(stream) => serve_here(local, stream, handed.peer, handed.slot, handed.kind),
        Err(e) => {
            local.thread_connections.dec();
            tracing::warn!(error = %e, "proxy thread cannot take a handed connection");
        }
    }
}

/// Accepts from one listener until the stop, placing each connection.
async fn accept_loop(
    local: Rc<Local>,
    dispatch: Dispatch,
    listener: TcpListener,
    kind: Kind,
    mut stop: watch::Receiver<bool>,
) {
    let (http, what) = match kind {
        Kind::Http => (true, "HTTP"),
        Kind::Https(_) => (false, "HTTPS"),
        Kind::Tcp(_) => (false, "L4"),
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = local.admit(&stream, peer, http) else { continue };
                    dispatch.place(&local, stream, peer, slot, kind.clone());
                }
                Err(e) => {
                    // Out of descriptors or similar: back off briefly.
                    tracing::warn!(error = %e, listener = what, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
}

fn run_thread(thread: Thread) {
    let Thread {
        index,
        shared,
        backends,
        snapshot,
        listener,
        tcp,
        tls,
        h2,
        mut stop,
        mut handoff,
    } = thread;
    shared
        .config
        .load()
        .thread_policy
        .apply_to_current_thread(&format!("proxy-{index}"));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "proxy thread cannot build its runtime");
            return;
        }
    };
    let tasks = tokio::task::LocalSet::new();
    tasks.block_on(&runtime, async move {
        let local = Rc::new(Local {
            routes: RefCell::new(Cache::new(shared.routes.clone())),
            config: RefCell::new(Rc::new((**shared.config.load()).clone())),
            tcp: RefCell::new(Rc::new((**shared.tcp.load()).clone())),
            generation: Cell::new(shared.generation.load(Ordering::Acquire)),
            snapshot: RefCell::new(Cache::new(snapshot.clone())),
            shared,
            backends,
            pool: RefCell::new(foldhash::HashMap::default()),
            sweeps: Cell::new(0),
            h2,
            stop: stop.clone(),
            buffers: RefCell::new(Vec::new()),
            pipes: RefCell::new(Vec::new()),
            splicing: Cell::new(true),
            rng: RefCell::new(fastrand::Rng::new()),
            request_ids: Cell::new(fastrand::u64(..) << 24),
            stopping: Cell::new(false),
            active: Cell::new(0),
            fresh: Cell::new(0),
            thread_connections: handoff.dispatch.counts[index].clone(),
            ring: OnceCell::new(),
            deadlines: Deadlines::default(),
        });
        let deadlines = {
            let local = local.clone();
            tokio::task::spawn_local(async move { local.deadlines.sweep().await })
        };
        access::configure(local.config().access_log.as_deref());
        let sweeper = {
            let local = local.clone();
            let snapshot = snapshot.clone();
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.tick().await;
                let mut sweeps = 0u32;
                loop {
                    tick.tick().await;
                    local.sweep();
                    access::flush();
                    sweeps = sweeps.wrapping_add(1);
                    if index == 0 && sweeps.is_multiple_of(PRUNE_EVERY_SWEEPS) {
                        local.shared.prune(&snapshot.load());
                    }
                }
            })
        };
        // One accept task per listener; this task takes handed connections.
        let mut accepting = Vec::new();
        let mut accept = |listener: std::net::TcpListener, kind: Kind, what: &str| {
            match TcpListener::from_std(listener) {
                Ok(listener) => accepting.push(tokio::task::spawn_local(accept_loop(
                    local.clone(),
                    handoff.dispatch.clone(),
                    listener,
                    kind,
                    stop.clone(),
                ))),
                Err(e) => {
                    tracing::error!(error = %e, listener = what, "proxy thread cannot use its listener")
                }
            }
        };
        accept(listener, Kind::Http, "HTTP");
        if let Some((listener, acceptor)) = tls {
            accept(listener, Kind::Https(acceptor), "HTTPS");
        }
        for (listener, route) in tcp {
            accept(listener, Kind::Tcp(route), "L4");
        }
        loop {
            tokio::select! {
                Some(handed) = handoff.inbox.recv() => take_handed(&local, handed),
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        // Connections handed here before the stop are served like ones
        // accepted here; a thread handing one now gets it back.
        handoff.inbox.close();
        while let Some(handed) = handoff.inbox.recv().await {
            take_handed(&local, handed);
        }
        for task in accepting {
            let _ = task.await;
        }
        local.stopping.set(true);
        tracing::info!(
            thread = index,
            open = local.active.get() + local.fresh.get(),
            "proxy thread stopped accepting; finishing its connections"
        );
        sweeper.abort();
        local.pool.borrow_mut().clear();
        let now = tokio::time::Instant::now();
        let deadline = now + local.config().shutdown_grace;
        let fresh_until = (now + FIRST_REQUEST_GRACE).min(deadline);
        let idle_until = (now + IDLE_DRAIN).min(deadline);
        loop {
            let now = tokio::time::Instant::now();
            let fresh = local.fresh.get() > 0 && now < fresh_until;
            let idle = local.thread_connections.get() > 0 && now < idle_until;
            if !(local.active.get() > 0 || fresh || idle) || now >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if local.active.get() > 0 {
            tracing::warn!(
                thread = index,
                open = local.active.get(),
                "shutdown grace ended with requests or connections still open"
            );
        }
        deadlines.abort();
        // Returning drops the keep-alive connections still idle: closed
        // between requests, which HTTP/1.1 clients expect of an idle
        // connection, after `IDLE_DRAIN` in which they could not have been.
    });
}
