//! HTTP/2 to the endpoints (gRPC calls, routes with an `h2c` or `h2`
//! upstream), on the h2 crate.
//!
//! Each proxy thread keeps its own connections per endpoint in a
//! thread-local pool: a request takes no lock of ours and no channel hop,
//! it writes its stream into the connection's state and the connection's
//! task sends it. A connection that has the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` streams open is passed over and
//! another is opened (up to `MAX_CONNECTIONS` per endpoint and thread).
//! Connections are kept alive with PING (one unanswered for
//! `PING_TIMEOUT` ends it), closed after `IDLE_CLOSE` without a stream, and
//! one that received a GOAWAY takes no new stream.
//!
//! A failure says whether the request could have reached the endpoint:
//! never when the connection could not be made, when the endpoint refused
//! the stream (REFUSED_STREAM) or said in a graceful GOAWAY that it did not
//! take it (above its last stream id), or when the connection was known
//! dead before the stream was written. Those may go to another endpoint
//! whatever the method.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::h2_body::{send_body, Received};
use crate::h2_tls::{BoxError, ProxyBody};
use crate::metrics::H2Metrics;
use crate::stats::now_ns;
use crate::upstream_tls::{Alpn, Failures, Io, UpstreamTls};

/// Most connections a thread opens to one endpoint; when all are full the
/// least busy queues the stream until one of its own ends.
const MAX_CONNECTIONS: usize = 8;
/// A PING every so often on each connection...
const PING_EVERY: Duration = Duration::from_secs(30);
/// ...whose answer must come within this, or the connection is ended.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without a stream for this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(90);
/// Receive windows: a stream's, and the connection's (many streams).
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 8 << 20;

/// Where a request goes: the endpoint's address and, over TLS, the
/// route's setup (connections are pooled per both).
pub(crate) struct Target<'a> {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<(&'a Arc<UpstreamTls>, &'a Failures)>,
    pub(crate) connect_timeout: Duration,
    /// The endpoint's HTTP/2 series.
    pub(crate) metrics: &'a H2Metrics,
}

/// The request body as it goes upstream.
pub(crate) enum Outgoing {
    /// No body: the HEADERS frame ends the stream.
    Empty,
    /// The whole body in hand (a unary call's message).
    Whole(Bytes),
    /// A body still arriving, pumped by a task of its own.
    Stream(ProxyBody),
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection: TCP, TLS or the HTTP/2 handshake failed or timed out.
    Connect(BoxError),
    /// The endpoint did not process the request (see the module's text).
    Unsent(BoxError),
    /// It may have reached the endpoint.
    Broken(BoxError),
}

impl Failure {
    pub(crate) fn error(&self) -> &BoxError {
        match self {
            Failure::Connect(e) | Failure::Unsent(e) | Failure::Broken(e) => e,
        }
    }
}

/// What the pool and a connection's task share.
struct ConnState {
    /// Set when the connection can take no new stream (ended, GOAWAY, a
    /// failed PING).
    closed: AtomicBool,
    /// Streams open on it (ours: h2 does not say).
    streams: AtomicU32,
    /// When its last stream ended (`now_ns`).
    idle_since: AtomicU64,
    /// A GOAWAY from the endpoint was seen (counted once).
    goaway: AtomicBool,
    /// The last stream id of the endpoint's latest GOAWAY (`u32::MAX`:
    /// none yet), read off the connection's frames as they arrive.
    goaway_last: Arc<AtomicU32>,
}

impl ConnState {
    fn saw_goaway(&self, metrics: &H2Metrics) {
        if !self.goaway.swap(true, Relaxed) {
            metrics.goaways.inc();
        }
    }
}

#[derive(Clone)]
struct Ready {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<ConnState>,
}

enum Slot {
    Ready(Ready),
    /// Being opened by its own task; requests that need it wait on this.
    Connecting(watch::Receiver<Option<Result<Ready, String>>>),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    /// The TLS setup's id; 0 for cleartext.
    tls: u64,
}

thread_local! {
    /// This thread's connections, by endpoint.
    static POOL: RefCell<foldhash::HashMap<Key, Vec<Slot>>> = RefCell::default();
}

/// What a pool lookup found.
enum Found {
    Use(Ready),
    Wait(watch::Receiver<Option<Result<Ready, String>>>),
    Open,
}

/// A usable connection to `key`, one being opened, or none.
fn find(key: Key) -> Found {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let slots = pool.entry(key).or_default();
        // Settled openings become connections; ended ones leave.
        slots.retain_mut(|slot| {
            if let Slot::Connecting(opened) = slot {
                let settled = opened.borrow().clone();
                match settled {
                    Some(Ok(ready)) => *slot = Slot::Ready(ready),
                    Some(Err(_)) => return false,
                    None => return true,
                }
            }
            match slot {
                Slot::Ready(ready) => !ready.state.closed.load(Relaxed),
                Slot::Connecting(_) => true,
            }
        });
        let mut least: Option<&Ready> = None;
        let mut connecting = None;
        for slot in slots.iter() {
            match slot {
                Slot::Ready(ready) => {
                    let open = ready.state.streams.load(Relaxed) as usize;
                    if open < ready.send.current_max_send_streams() && usable(ready) {
                        return Found::Use(ready.clone());
                    }
                    if least.is_none_or(|l| l.state.streams.load(Relaxed) > open as u32) {
                        least = Some(ready);
                    }
                }
                Slot::Connecting(opened) => connecting = Some(opened.clone()),
            }
        }
        if let Some(opened) = connecting {
            return Found::Wait(opened);
        }
        match least {
            Some(ready) if slots.len() >= MAX_CONNECTIONS && usable(ready) => {
                Found::Use(ready.clone())
            }
            _ => Found::Open,
        }
    })
}

/// Whether `ready` can take a stream. A connection error (a GOAWAY, the
/// endpoint gone) shows here before any stream is written to it; only the
/// connection about to be used is asked (h2 takes its lock for it).
fn usable(ready: &Ready) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let ok = matches!(ready.send.clone().poll_ready(&mut cx), Poll::Ready(Ok(())));
    if !ok {
        ready.state.closed.store(true, Relaxed);
    }
    ok
}

/// Starts opening a connection to `key` on its own task (a request that
/// gives up waiting leaves it to the next), and registers it in the pool.
fn open(key: Key, target: &Target<'_>) -> watch::Receiver<Option<Result<Ready, String>>> {
    let (settle, opened) = watch::channel(None);
    POOL.with(|pool| {
        pool.borrow_mut()
            .entry(key)
            .or_default()
            .push(Slot::Connecting(opened.clone()))
    });
    let addr = target.addr;
    let tls = target
        .tls
        .map(|(tls, failures)| (tls.clone(), failures.clone()));
    let timeout = target.connect_timeout;
    let metrics = target.metrics.clone();
    let leave = Leave {
        key,
        opened: opened.clone(),
        state: None,
    };
    tokio::spawn(async move {
        // Whole, so it drops (and leaves the pool) when the task ends.
        let mut leave = leave;
        let goaway_last = Arc::new(AtomicU32::new(u32::MAX));
        let connecting = connect(addr, tls, goaway_last.clone());
        let io = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                let _ = settle.send(Some(Err(e.to_string())));
                return;
            }
            Err(_) => {
                let _ = settle.send(Some(Err(format!(
                    "connect to {addr} timed out after {timeout:?}"
                ))));
                return;
            }
        };
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(io);
        let (send, mut connection) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(made)) => made,
            Ok(Err(e)) => {
                let _ = settle.send(Some(Err(format!("HTTP/2 handshake with {addr}: {e}"))));
                return;
            }
            Err(_) => {
                let _ = settle.send(Some(Err(format!(
                    "HTTP/2 handshake with {addr} timed out after {timeout:?}"
                ))));
                return;
            }
        };
        let mut ping = connection.ping_pong();
        let mut connection = std::pin::pin!(connection);
        // Used once the endpoint's SETTINGS are in (they come before the
        // answer to a PING): streams beyond its limit would be refused.
        if let Some(pinger) = ping.as_mut() {
            let pong = tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque()));
            let settled = tokio::select! {
                ended = connection.as_mut() => Err(match ended {
                    Ok(()) => format!("{addr} closed the HTTP/2 connection at once"),
                    Err(e) => format!("HTTP/2 connection to {addr}: {e}"),
                }),
                answered = pong => match answered {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("HTTP/2 connection to {addr}: {e}")),
                    Err(_) => Err(format!("{addr} did not answer a PING in {timeout:?}")),
                },
            };
            if let Err(e) = settled {
                let _ = settle.send(Some(Err(e)));
                return;
            }
        }
        let state = Arc::new(ConnState {
            closed: AtomicBool::new(false),
            streams: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ns()),
            goaway: AtomicBool::new(false),
            goaway_last,
        });
        leave.state = Some(state.clone());
        let _ = settle.send(Some(Ok(Ready {
            send,
            state: state.clone(),
        })));
        metrics.connections.inc();
        let ended = drive(connection.as_mut(), ping, &state).await;
        state.closed.store(true, Relaxed);
        metrics.connections.dec();
        match ended {
            Ended::Remote => state.saw_goaway(&metrics),
            Ended::Error(e) => {
                if e.is_go_away() && e.is_remote() {
                    state.saw_goaway(&metrics);
                }
                tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
            Ended::Ours => {}
        }
    });
    opened
}

/// Takes a connection's slot out of this thread's pool when its task ends
/// (an endpoint that is gone leaves nothing behind).
struct Leave {
    key: Key,
    opened: watch::Receiver<Option<Result<Ready, String>>>,
    state: Option<Arc<ConnState>>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let _ = POOL.try_with(|pool| {
            let Ok(mut pool) = pool.try_borrow_mut() else {
                return;
            };
            let Some(slots) = pool.get_mut(&self.key) else {
                return;
            };
            slots.retain(|slot| match slot {
                Slot::Connecting(opened) => !opened.same_channel(&self.opened),
                Slot::Ready(ready) => !self
                    .state
                    .as_ref()
                    .is_some_and(|state| Arc::ptr_eq(state, &ready.state)),
            });
            if slots.is_empty() {
                pool.remove(&self.key);
            }
        });
    }
}

/// How a connection ended.
enum Ended {
    /// Idle too long, or a PING went unanswered: we closed it.
    Ours,
    /// The endpoint ended it cleanly (a GOAWAY with NO_ERROR).
    Remote,
    Error(h2::Error),
}

/// Runs a connection until it ends, with PINGs, closing it when idle.
async fn drive(
    mut connection: Pin<&mut h2::client::Connection<Upstream, Bytes>>,
    mut ping: Option<h2::PingPong>,
    state: &ConnState,
) -> Ended {
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                return match ended {
                    Ok(()) => Ended::Remote,
                    Err(e) => Ended::Error(e),
                };
            }
            _ = tokio::time::sleep(PING_EVERY) => {
                let idle = state.streams.load(Relaxed) == 0
                    && now_ns().saturating_sub(state.idle_since.load(Relaxed))
                        >= IDLE_CLOSE.as_nanos() as u64;
                if idle {
                    // Dropped: h2 closes the socket; no stream is open.
                    state.closed.store(true, Relaxed);
                    return Ended::Ours;
                }
                let Some(pinger) = ping.as_mut() else { continue };
                let pong = tokio::time::timeout(PING_TIMEOUT, pinger.ping(h2::Ping::opaque()));
                tokio::select! {
                    ended = connection.as_mut() => {
                        return match ended {
                            Ok(()) => Ended::Remote,
                            Err(e) => Ended::Error(e),
                        };
                    }
                    answered = pong => {
                        if !matches!(answered, Ok(Ok(_))) {
                            state.closed.store(true, Relaxed);
                            tracing::warn!("an upstream HTTP/2 connection did not answer a PING in {PING_TIMEOUT:?}: closed");
                            return Ended::Ours;
                        }
                    }
                }
            }
        }
    }
}

/// TCP (no Nagle), then TLS offering `h2` when the route asks for it.
async fn connect(
    addr: SocketAddr,
    tls: Option<(Arc<UpstreamTls>, Failures)>,
    goaway_last: Arc<AtomicU32>,
) -> Result<Upstream, BoxError> {
    let tls = tls.as_ref().map(|(tls, failures)| (&**tls, failures));
    let io = Io::connect(addr, tls, Alpn::H2).await?;
    Ok(Upstream {
        io,
        frames: Frames {
            goaway_last,
            ..Frames::default()
        },
    })
}

/// Sends the request `head` makes (its URI gives `:scheme`, `:authority`
/// and `:path`) with `body` to `target` over HTTP/2. A request the endpoint did not take
/// because its connection was going away (a graceful GOAWAY, or the
/// connection found ended as the stream was opened) goes once more to the
/// same endpoint on a fresh connection when its body can be sent again:
/// that is no failure of the endpoint's.
pub(crate) async fn send(
    target: Target<'_>,
    head: &(dyn Fn() -> Request<()> + Sync),
    body: Outgoing,
) -> Result<Response<Incoming>, Failure> {
    let key = Key {
        addr: target.addr,
        tls: target.tls.map_or(0, |(tls, _)| tls.id),
    };
    // The body again, when it can be sent again.
    let spare = match &body {
        Outgoing::Stream(_) => None,
        Outgoing::Empty => Some(Outgoing::Empty),
        Outgoing::Whole(bytes) => Some(Outgoing::Whole(bytes.clone())),
    };
    match attempt(key, &target, head(), body).await {
        Ok(response) => Ok(response),
        Err((failure, true)) => match spare {
            Some(body) => {
                tracing::debug!(endpoint = %target.addr, error = %failure.error(), "upstream HTTP/2 connection going away: the request goes on a new one");
                attempt(key, &target, head(), body)
                    .await
                    .map_err(|(failure, _)| failure)
            }
            None => Err(failure),
        },
        Err((failure, false)) => Err(failure),
    }
}

/// One try on a pooled (or new) connection; a failure says too whether
/// the connection was going away (the endpoint may take it on another).
async fn attempt(
    key: Key,
    target: &Target<'_>,
    request: Request<()>,
    body: Outgoing,
) -> Result<Response<Incoming>, (Failure, bool)> {
    // A pooled connection, or one opened for this request (waited for
    // within the connect timeout: the opening itself keeps to it).
    let mut tries = 0;
    let ready = loop {
        tries += 1;
        let (mut opened, ours) = match find(key) {
            Found::Use(ready) => break ready,
            Found::Wait(opened) => (opened, false),
            Found::Open => (open(key, target), true),
        };
        let settled = opened.wait_for(Option::is_some).await;
        match settled.as_deref() {
            // One opened for this request (or after a few rounds of
            // others filling theirs) is used even when full: h2 holds the
            // stream until one of its own ends.
            Ok(Some(Ok(ready))) if ours || tries >= 4 => break ready.clone(),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err((Failure::Connect(e.clone().into()), false)),
            _ => {
                let e = "the connection attempt was abandoned".into();
                return Err((Failure::Connect(e), false));
            }
        }
    };
    let Ready { mut send, state } = ready;
    let end = matches!(body, Outgoing::Empty);
    let (response, mut outgoing) = match send.send_request(request, end) {
        Ok(sent) => sent,
        Err(e) => {
            // Nothing was written: the connection had ended already.
            state.closed.store(true, Relaxed);
            if e.is_go_away() && e.is_remote() {
                state.saw_goaway(target.metrics);
            }
            return Err((Failure::Unsent(e.into()), true));
        }
    };
    let open = Open::new(state.clone(), target.metrics);
    let id = u32::from(response.stream_id());
    match body {
        Outgoing::Empty => {}
        Outgoing::Whole(bytes) => {
            // Buffered by h2 up to the stream's window; small (in hand).
            if let Err(e) = outgoing.send_data(bytes, true) {
                return Err(judge(e, id, &state, target.metrics));
            }
        }
        Outgoing::Stream(body) => {
            tokio::spawn(send_body(body, outgoing));
        }
    }
    match response.await {
        Ok(response) => Ok(response.map(|recv| Incoming {
            body: Received::new(recv),
            _open: open,
        })),
        Err(e) => Err(judge(e, id, &state, target.metrics)),
    }
}

/// Stream `id`'s failure, judged by whether the endpoint could have taken
/// it, and whether its connection was going away.
fn judge(e: h2::Error, id: u32, state: &ConnState, metrics: &H2Metrics) -> (Failure, bool) {
    if e.is_go_away() && e.is_remote() {
        state.saw_goaway(metrics);
        state.closed.store(true, Relaxed);
        // Streams above a GOAWAY's last stream id were not processed
        // (RFC 9113 §6.8); those at or below it may have been.
        if id > state.goaway_last.load(Relaxed) {
            return (Failure::Unsent(e.into()), true);
        }
    }
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        // RFC 9113 §8.7: not processed.
        return (Failure::Unsent(e.into()), false);
    }
    (Failure::Broken(e.into()), false)
}

/// A stream counted open on its connection and endpoint until dropped.
struct Open {
    state: Arc<ConnState>,
    streams: prometheus::IntGauge,
}

impl Open {
    fn new(state: Arc<ConnState>, metrics: &H2Metrics) -> Open {
        state.streams.fetch_add(1, Relaxed);
        metrics.streams.inc();
        Open {
            state,
            streams: metrics.streams.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.state.streams.fetch_sub(1, Relaxed) == 1 {
            self.state.idle_since.store(now_ns(), Relaxed);
        }
        self.streams.dec();
    }
}

/// A response body from an endpoint (`h2_body::Received`), its stream
/// counted open until the body is dropped.
pub(crate) struct Incoming {
    body: Received,
    _open: Open,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection to an endpoint, in the clear or over TLS, whose incoming
/// frames are watched for a GOAWAY's last stream id (h2 does not say it).
struct Upstream {
    io: Io,
    frames: Frames,
}

/// Follows the frame boundaries of what the endpoint sends (after TLS):
/// each frame's 9-byte header, then its payload passed over, but for a
/// GOAWAY's first four bytes (its last stream id).
#[derive(Default)]
struct Frames {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass over.
    skip: usize,
    /// A GOAWAY's last stream id, as far as read.
    goaway: Option<([u8; 4], usize)>,
    goaway_last: Arc<AtomicU32>,
}

impl Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                if let Some((id, got)) = &mut self.goaway {
                    let take = (4 - *got).min(n);
                    id[*got..*got + take].copy_from_slice(&bytes[..take]);
                    *got += take;
                    if *got == 4 {
                        let last = u32::from_be_bytes(*id) & 0x7fff_ffff;
                        self.goaway_last.store(last, Relaxed);
                        self.goaway = None;
                    }
                }
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let take = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == 9 {
                self.have = 0;
                self.skip = usize::from(self.head[0]) << 16
                    | usize::from(self.head[1]) << 8
                    | usize::from(self.head[2]);
                // Type 0x7: GOAWAY.
                self.goaway = (self.head[3] == 0x7).then_some(([0; 4], 0));
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.frames.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A GOAWAY's last stream id is found among other frames however the
    /// bytes are cut into reads; a later GOAWAY's replaces it.
    #[test]
    fn the_last_stream_id_of_a_goaway_is_read_off_the_frames() {
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0u32.to_be_bytes());
        let mut second = (0x8000_0000u32 | 3).to_be_bytes().to_vec();
        second.extend_from_slice(&0u32.to_be_bytes());
        let mut stream = frame(0x4, 0, &[0; 12]);
        stream.extend(frame(0x0, 1, &[7; 40_000]));
        stream.extend(frame(0x7, 0, &goaway));
        stream.extend(frame(0x1, 3, &[1; 30]));
        for cut in [1, 3, 7, 9, 4096, stream.len()] {
            let mut frames = Frames {
                goaway_last: Arc::new(AtomicU32::new(u32::MAX)),
                ..Frames::default()
            };
            for piece in stream.chunks(cut) {
                frames.feed(piece);
            }
            assert_eq!(frames.goaway_last.load(Relaxed), 5, "reads of {cut} bytes");
            for piece in frame(0x7, 0, &second).chunks(cut) {
                frames.feed(piece);
            }
            // The reserved bit is not part of the id.
            assert_eq!(frames.goaway_last.load(Relaxed), 3, "reads of {cut} bytes");
        }
    }

    /// A connection's slot is in this thread's pool while it is open, and
    /// gone (gauges back to 0) once the endpoint closes it.
    #[test]
    fn a_closed_connection_leaves_the_pool() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut connection = h2::server::handshake(tcp).await.expect("handshake");
                if let Some(Ok((_, mut respond))) = connection.accept().await {
                    let _ = respond.send_response(Response::new(()), true);
                }
                // Answered; then the connection is dropped: closed.
                let _ = tokio::time::timeout(Duration::from_millis(50), connection.accept()).await;
            });
            let metrics = crate::metrics::ProxyMetrics::new(&prometheus::Registry::new())
                .expect("metrics")
                .endpoint("svc", "node", "ep");
            let h2 = metrics.h2();
            let target = Target {
                addr,
                tls: None,
                connect_timeout: Duration::from_secs(2),
                metrics: h2,
            };
            let head = || {
                Request::builder()
                    .uri(format!("http://{addr}/"))
                    .body(())
                    .expect("request")
            };
            let response = send(target, &head, Outgoing::Empty)
                .await
                .expect("answered");
            assert_eq!(response.status(), 200);
            drop(response);
            let key = Key { addr, tls: 0 };
            let slots = || POOL.with(|pool| pool.borrow().get(&key).map_or(0, Vec::len));
            assert_eq!(slots(), 1);
            assert_eq!(h2.connections.get(), 1);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while slots() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(slots(), 0, "the closed connection left the pool");
            assert_eq!(h2.connections.get(), 0);
            assert_eq!(h2.streams.get(), 0);
        });
    }

    #[test]
    fn frames_without_a_goaway_leave_no_last_stream_id() {
        let mut frames = Frames {
            goaway_last: Arc::new(AtomicU32::new(u32::MAX)),
            ..Frames::default()
        };
        frames.feed(&frame(0x4, 0, &[0; 6]));
        frames.feed(&frame(0x6, 0, &[0; 8]));
        frames.feed(&frame(0x0, 1, &[0; 100]));
        assert_eq!(frames.goaway_last.load(Relaxed), u32::MAX);
    }
}
