//! Thread-per-core serving: each proxy thread runs a current-thread tokio
//! runtime with its own SO_REUSEPORT listener, its own pool of idle upstream
//! connections and its own buffers, so a request touches no lock and no
//! state of another thread except the shared per-endpoint atomics (and, at
//! accept, a new connection handed to a less busy thread: `Handoff`).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use socket2::{Domain, Protocol, Socket, Type};
use switchyard_catalog::{AcceptErrors, ExtraKey, Snapshot};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access;
use crate::backend::ProxyDecorator;
use crate::conn;
use crate::grace::{FIRST_REQUEST_GRACE, IDLE_DRAIN};
use crate::h2_tls::H2Tls;
use crate::local::{Local, PRUNE_EVERY_SWEEPS, SWEEP_EVERY};
use crate::metrics::ProxyMetrics;
use crate::shared::Shared;
use crate::tcp::{self, TcpRoute};
use crate::wire::Client;
use switchyard_catalog::Ticket;

/// The running proxy (HTTP and L4 listeners): its threads and their shared
/// stop signal.
pub struct Proxy {
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

impl Proxy {
    /// Binds one listener per thread on `http.addr` and on each L4
    /// listener's address (or serves on `inherited` sockets from the process
    /// this one upgrades: then their number sets the thread count), and
    /// starts the threads.
    pub(crate) fn start(
        shared: Arc<Shared>,
        backends: ExtraKey<ProxyDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        inherited: Option<ProxySockets>,
    ) -> io::Result<Proxy> {
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
                // Per thread: its upstream connections live on the runtime
                // that opened them (a pool shared by the threads lent
                // connections that died with another thread's runtime at
                // shutdown: a 502 for a late HTTPS request).
                h2_tls: Arc::new(H2Tls::new(shared.clone(), backends, snapshot.clone())),
                stop: stop_rx.clone(),
                handoff,
            };
            let handle = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || run_thread(thread))?;
            handles.push(handle);
        }
        Ok(Proxy {
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
        let Proxy {
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
    backends: ExtraKey<ProxyDecorator>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    listener: std::net::TcpListener,
    tcp: TcpListeners,
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    h2_tls: Arc<H2Tls>,
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
    slot: Ticket,
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
        slot: Ticket,
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
fn serve_here(local: &Rc<Local>, stream: TcpStream, peer: SocketAddr, slot: Ticket, kind: Kind) {
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
    local: &Rc<Local>,
    slot: Ticket,
    serve: impl std::future::Future<Output = ()> + 'static,
) {
    let local = local.clone();
    tokio::task::spawn_local(async move {
        let _slot = slot;
        serve.await;
        local.thread_connections().dec();
        local.work_ended();
    });
}

/// Serves a connection another thread accepted (already counted for this
/// one in `thread_connections`).
fn take_handed(local: &Rc<Local>, handed: Handed) {
    match TcpStream::from_std(handed.stream) {
        Ok(stream) => serve_here(local, stream, handed.peer, handed.slot, handed.kind),
        Err(e) => {
            local.thread_connections().dec();
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
    let (http, what, label) = match kind {
        Kind::Http => (true, "HTTP", "http"),
        Kind::Https(_) => (false, "HTTPS", "https"),
        Kind::Tcp(_) => (false, "L4", "l4"),
    };
    let mut errors = AcceptErrors::default();
    let failures = local
        .shared
        .metrics
        .accept_errors
        .with_label_values(&[label]);
    // An upgrading agent takes no connection before it is ready.
    tokio::select! {
        () = switchyard_catalog::accepts_open() => {}
        _ = stop.wait_for(|stop| *stop) => return,
    }
    loop {
        let pause = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = local.admit(&stream, peer, http) else { continue };
                    dispatch.place(&local, stream, peer, slot, kind.clone());
                    continue;
                }
                Err(e) => {
                    failures.inc();
                    let backoff = errors.failed(&e, std::time::Instant::now());
                    if let Some(count) = backoff.log {
                        tracing::warn!(error = %e, listener = what, failures = count,
                            "proxy accept failing (counted in switchyard_proxy_accept_errors_total; next line in 10 s at most)");
                    }
                    backoff.pause
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
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
        h2_tls,
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
        let local = Rc::new(Local::new(
            shared,
            backends,
            snapshot.clone(),
            h2_tls,
            stop.clone(),
            handoff.dispatch.counts[index].clone(),
        ));
        let deadlines = {
            let local = local.clone();
            tokio::task::spawn_local(async move { local.deadlines.sweep().await })
        };
        access::configure(local.config().access_log.as_deref());
        if local.config().io_uring || local.tcp().io_uring {
            local.probe_ring(index).await;
        }
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
        local.begin_stopping();
        tracing::info!(
            thread = index,
            open = local.active.get() + local.fresh.get(),
            "proxy thread stopped accepting; finishing its connections"
        );
        sweeper.abort();
        local.drop_idle_upstreams();
        let now = tokio::time::Instant::now();
        let deadline = now + local.config().shutdown_grace;
        let fresh_until = (now + FIRST_REQUEST_GRACE).min(deadline);
        let idle_until = (now + IDLE_DRAIN).min(deadline);
        // Waits for the work to end, not polling: each end of a request or
        // connection wakes this (`Local::work_ended`), and so does the next
        // of the three limits.
        loop {
            let now = tokio::time::Instant::now();
            let fresh = local.fresh.get() > 0 && now < fresh_until;
            let idle = local.thread_connections().get() > 0 && now < idle_until;
            if !(local.active.get() > 0 || fresh || idle) || now >= deadline {
                break;
            }
            let next_limit = [fresh_until, idle_until, deadline]
                .into_iter()
                .filter(|limit| *limit > now)
                .min()
                .unwrap_or(deadline);
            local.work_ends_or(next_limit).await;
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
