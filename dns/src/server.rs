//! Listeners: UDP workers (one SO_REUSEPORT socket and thread each, blocking
//! I/O, no allocation per query or per batch once a worker has started) and a
//! TCP server on the agent's runtime.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use switchyard_catalog::{AcceptErrors, Admission};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::answer::{Engine, Scratch, Transport};

/// How often a blocked UDP worker looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.bind(&addr.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(STOP_POLL))?;
    Ok(socket)
}

/// Binds `workers` UDP sockets and a TCP listener on one address. When the
/// port is 0 the first UDP socket picks it, and TCP must then get the same
/// number; if another process holds that TCP port, try a fresh one.
pub(crate) fn bind(
    addr: SocketAddr,
    workers: usize,
) -> io::Result<(Vec<UdpSocket>, std::net::TcpListener)> {
    const ATTEMPTS: usize = 32;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let first = udp_socket(addr)?;
        let bound = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(udp_socket(bound)?);
        }
        match tcp_listener(bound) {
            Ok(listener) => return Ok((sockets, listener)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < ATTEMPTS =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    }
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Starts a worker thread on each bound UDP socket.
pub(crate) fn spawn_udp(
    engine: Arc<Engine>,
    sockets: Vec<UdpSocket>,
    stop: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let engine = engine.clone();
        let stop = stop.clone();
        let name = format!("dns-udp-{i}");
        let later = Later {
            socket: Arc::new(socket.try_clone()?),
            runtime: runtime.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                engine.config.thread_policy.apply_to_current_thread(&name);
                udp_worker(&engine, &socket, &stop, &later)
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Datagrams taken per `recvmmsg` call.
const BATCH: usize = 32;
/// Largest query accepted over UDP (EDNS clients send small queries).
const MAX_QUERY: usize = 4096;

/// One worker: `recvmmsg` waits for the first datagram and takes whatever else
/// is queued (up to `BATCH`), the engine answers each, and `sendmmsg` sends
/// all answers in one call. Under load this turns two syscalls and a wake-up
/// per query into two syscalls per batch.
/// Where a UDP worker answers the queries it cannot answer yet (a name of
/// another datacenter whose copy is being fetched): a task on the agent's
/// runtime waits for the copy, answers, and sends from a second handle on
/// the worker's socket, while the worker goes on with the next batch.
struct Later {
    socket: Arc<UdpSocket>,
    runtime: tokio::runtime::Handle,
}

impl Later {
    fn answer(
        &self,
        engine: &Arc<Engine>,
        wait: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        packet: Vec<u8>,
        peer: SocketAddr,
    ) {
        let (engine, socket) = (engine.clone(), self.socket.clone());
        self.runtime.spawn(async move {
            wait.await;
            let mut scratch = Scratch::new();
            scratch.defer = false;
            let mut out = Vec::with_capacity(512);
            match engine.answer(&packet, Transport::Udp, &mut out, &mut scratch) {
                Some(outcome) => {
                    engine
                        .metrics
                        .count(outcome.qtype, outcome.rcode, outcome.truncated);
                    if let Err(e) = socket.send_to(&out, peer) {
                        tracing::debug!(error = %e, "dns udp send failed");
                    }
                }
                None => engine.metrics.dropped.inc(),
            }
        });
    }
}

/// A received datagram's source, as the standard library names it.
fn socket_addr(peer: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = peer.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    peer.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

fn udp_worker(engine: &Arc<Engine>, socket: &UdpSocket, stop: &AtomicBool, later: &Later) {
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

    let fd = socket.as_raw_fd();
    // Everything a batch uses is allocated here, once: per batch the worker
    // only builds the I/O vectors, on the stack.
    let mut packets: Box<[[u8; MAX_QUERY]; BATCH]> = Box::new([[0u8; MAX_QUERY]; BATCH]);
    let mut outs: [Vec<u8>; BATCH] = std::array::from_fn(|_| Vec::with_capacity(1232));
    let mut lens = [0usize; BATCH];
    let mut peers: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut scratch = Scratch::new();
    let mut limiter = RateLimit::new(engine.config.rate_limit);
    while !stop.load(Ordering::Relaxed) {
        let mut count = 0;
        {
            let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
                packets.each_mut().map(|p| [IoSliceMut::new(p)]);
            match recvmmsg(
                fd,
                &mut recv_headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(received) => {
                    for (i, message) in received.enumerate() {
                        lens[i] = message.bytes;
                        peers[i] = message.address;
                        count = i + 1;
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "dns udp receive failed");
                    continue;
                }
            }
        }
        let mut replies = 0;
        for i in 0..count {
            if limiter.on() {
                let client = peers[i]
                    .as_ref()
                    .and_then(|p| p.as_sockaddr_in().map(|a| IpAddr::from(a.ip())))
                    .or_else(|| {
                        peers[i]
                            .as_ref()
                            .and_then(|p| p.as_sockaddr_in6().map(|a| IpAddr::from(a.ip())))
                    });
                if let Some(client) = client {
                    if !limiter.allow(client, Instant::now()) {
                        engine.metrics.rate_limited.inc();
                        continue;
                    }
                }
            }
            let started = Instant::now();
            let len = lens[i].min(MAX_QUERY);
            let answered = engine.answer(
                &packets[i][..len],
                Transport::Udp,
                &mut outs[replies],
                &mut scratch,
            );
            if let Some(wait) = scratch.pending.take() {
                if let Some(peer) = peers[i].as_ref().and_then(socket_addr) {
                    later.answer(engine, wait, packets[i][..len].to_vec(), peer);
                }
                continue;
            }
            match answered {
                Some(outcome) if peers[i].is_some() => {
                    engine
                        .metrics
                        .count(outcome.qtype, outcome.rcode, outcome.truncated);
                    peers.swap(replies, i);
                    replies += 1;
                }
                _ => engine.metrics.dropped.inc(),
            }
            engine
                .metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
        }
        if replies == 0 {
            continue;
        }
        let slices: [[IoSlice<'_>; 1]; BATCH] = outs.each_ref().map(|o| [IoSlice::new(o)]);
        if let Err(e) = sendmmsg(
            fd,
            &mut send_headers,
            &slices[..replies],
            &peers[..replies],
            [],
            MsgFlags::empty(),
        ) {
            tracing::debug!(error = %e, "dns udp send failed");
        }
    }
}

/// A UDP worker's per-client token buckets: `per_sec` answers a second,
/// with a burst of one second's worth. Buckets idle for a minute are dropped.
struct RateLimit {
    per_sec: u32,
    buckets: std::collections::HashMap<IpAddr, (f64, Instant)>,
    swept: Option<Instant>,
}

impl RateLimit {
    fn new(per_sec: u32) -> RateLimit {
        RateLimit {
            per_sec,
            buckets: std::collections::HashMap::new(),
            swept: None,
        }
    }

    fn on(&self) -> bool {
        self.per_sec > 0
    }

    fn allow(&mut self, client: IpAddr, now: Instant) -> bool {
        let rate = f64::from(self.per_sec);
        if self
            .swept
            .is_none_or(|at| now.duration_since(at) > Duration::from_secs(60))
        {
            self.buckets
                .retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
            self.swept = Some(now);
        }
        let (tokens, seen) = self.buckets.entry(client).or_insert((rate, now));
        let refill = now.duration_since(*seen).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(rate);
        *seen = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The caps and time limit of DNS over TCP (`[dns]`).
pub(crate) struct TcpLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_per_client: usize,
    /// Longest wait for a query (whole) or for the client to take an answer.
    pub(crate) idle: Duration,
}

/// Accepts TCP connections until `stop` turns true.
pub(crate) async fn serve_tcp(
    engine: Arc<Engine>,
    listener: TcpListener,
    limits: TcpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let admission = Admission::new();
    let idle = limits.idle;
    let mut errors = AcceptErrors::default();
    // An upgrading agent takes no connection before it is ready.
    tokio::select! {
        () = switchyard_catalog::accepts_open() => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(got) => got,
            Err(e) => {
                engine.metrics.tcp_accept_errors.inc();
                let backoff = errors.failed(&e, std::time::Instant::now());
                if let Some(failures) = backoff.log {
                    tracing::warn!(error = %e, failures, "dns tcp accept failing (counted in switchyard_dns_tcp_accept_errors_total; next line in 10 s at most)");
                }
                if !backoff.pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.pause) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                continue;
            }
        };
        let permit = match admission.admit(peer.ip(), limits.max_connections, limits.max_per_client)
        {
            Ok(ticket) => ticket,
            Err(refusal) => {
                engine
                    .metrics
                    .tcp_refused
                    .with_label_values(&[refusal.as_str()])
                    .inc();
                tracing::debug!(%peer, reason = refusal.as_str(), "dns tcp connection refused");
                continue;
            }
        };
        engine.metrics.tcp_connections.inc();
        let engine = engine.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_connection(&engine, stream, idle, stop).await {
                tracing::debug!(error = %e, %peer, "dns tcp connection ended");
            }
        });
    }
}

async fn tcp_connection(
    engine: &Engine,
    mut stream: TcpStream,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut packet = Vec::new();
    let mut out = Vec::with_capacity(4096);
    let mut scratch = Scratch::new();
    loop {
        let mut len = [0u8; 2];
        tokio::select! {
            read = tokio::time::timeout(idle, stream.read_exact(&mut len)) => match read {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()),
            },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        packet.resize(len, 0);
        tokio::time::timeout(idle, stream.read_exact(&mut packet[..len]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "slow client"))??;
        let started = Instant::now();
        let mut answered = engine.answer(&packet[..len], Transport::Tcp, &mut out, &mut scratch);
        if let Some(wait) = scratch.pending.take() {
            // Another datacenter's copy on its way: wait for it, then again.
            wait.await;
            scratch.defer = false;
            answered = engine.answer(&packet[..len], Transport::Tcp, &mut out, &mut scratch);
            scratch.defer = true;
        }
        let Some(outcome) = answered else {
            engine.metrics.dropped.inc();
            return Ok(());
        };
        engine
            .metrics
            .count(outcome.qtype, outcome.rcode, outcome.truncated);
        engine
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        tokio::time::timeout(idle, stream.write_all(&framed))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client not reading"))??;
    }
}
