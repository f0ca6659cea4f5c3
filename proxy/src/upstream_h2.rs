//! HTTP/2 to the endpoints (gRPC calls, routes with an `h2c` or `h2`
//! upstream), on our own codec (`h2_frame`, `hpack`), like the client side.
//!
//! Each proxy thread keeps its own connections per endpoint in a
//! thread-local pool: a request takes no channel hop, it writes its
//! stream's HEADERS (and a body in hand) into the connection's output
//! under the connection's own lock, and the connection's task writes them
//! with everything else gathered since. A connection that has the
//! server's `SETTINGS_MAX_CONCURRENT_STREAMS` streams open is passed over
//! and another is opened (up to `MAX_CONNECTIONS` per endpoint and
//! thread); when all are full a request waits for a stream of its
//! connection to end. Connections are kept alive with PING (one
//! unanswered for `PING_TIMEOUT` ends it), closed after `IDLE_CLOSE`
//! without a stream, and one that received a GOAWAY takes no new stream.
//!
//! A failure says whether the request could have reached the endpoint:
//! never when the connection could not be made, when the endpoint refused
//! the stream (REFUSED_STREAM) or said in a GOAWAY that it did not take it
//! (above its last stream id), or when the connection was known ended
//! before the stream was written. Those may go to another endpoint
//! whatever the method.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::h2_frame::{self as frame, Head, Reason};
use crate::h2_tls::{BoxError, ProxyBody};
use crate::hpack::{self, Name};
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
/// The HPACK table size we allow the endpoint's encoder.
const HEADER_TABLE: usize = 4096;
/// Largest response header block read at all.
const MAX_HEADER_BLOCK: usize = 256 << 10;
/// Output gathered before streamed request bodies wait for the socket.
const WRITE_HIGH: usize = 64 << 10;
const READ_BUFFER: usize = 64 << 10;
/// Streams a server allows until its SETTINGS say (RFC 9113 §6.5.2 leaves
/// it unlimited; a cautious start).
const INITIAL_MAX_STREAMS: u32 = 100;
/// The largest stream id (§5.1.1): past it a connection takes no stream.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

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
    /// A body still arriving, sent by the connection's task as it comes.
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

/// One connection: what its task and the requests on it share.
struct Client {
    shared: Mutex<Shared>,
    /// Set when the connection can take no new stream (ended, GOAWAY, a
    /// failed PING, ids used up).
    closed: AtomicBool,
    /// Streams open on it.
    streams: AtomicU32,
    /// The server's stream limit.
    max_streams: AtomicU32,
    /// When its last stream ended (`now_ns`).
    idle_since: AtomicU64,
    /// A GOAWAY from the endpoint was seen (counted once).
    goaway: AtomicBool,
    /// The connection's task.
    waker: AtomicWaker,
}

impl Client {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn saw_goaway(&self, metrics: &H2Metrics) {
        if !self.goaway.swap(true, Relaxed) {
            metrics.goaways.inc();
        }
    }
}

/// The connection's state under its lock.
struct Shared {
    /// Frames for the task to write.
    out: Vec<u8>,
    next_id: u32,
    streams: Vec<UpStream>,
    /// How much more the server lets us send on the connection.
    send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// The last stream id of the server's GOAWAY.
    goaway_last: Option<u32>,
    /// Why the connection ended, once it has.
    ended: Option<String>,
    /// Request bodies still arriving, for the task to take and send.
    new_bodies: Vec<(u32, ProxyBody)>,
    /// Requests waiting for a stream slot.
    room: Vec<Waker>,
    /// Response bytes read and not yet given back on the connection.
    taken: usize,
    /// Window updates are due.
    credit_due: bool,
}

/// How a stream ended before its response was whole.
#[derive(Clone, Debug)]
enum StreamEnd {
    /// Reset by the server with this reason.
    Reset(u32),
    /// Above the last stream id of the server's GOAWAY: not processed.
    GoneAway,
    /// The connection ended: why.
    Ended(String),
}

struct UpStream {
    id: u32,
    head: Option<Response<()>>,
    /// The head was handed to the request.
    answered: bool,
    failed: Option<StreamEnd>,
    /// The request's waker: for the head, then for the body.
    waker: Option<Waker>,
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// The server ended its side.
    end: bool,
    /// Read since this stream's window was last given back.
    taken: usize,
    recv_window: i64,
    send_window: i64,
    /// Body in hand not yet sent (windows), and whether it ends the stream.
    pending: Bytes,
    pending_end: bool,
    /// We ended our side.
    sent_end: bool,
    /// The request dropped its stream: reset it if still open.
    dropped: bool,
}

impl UpStream {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn fail(&mut self, end: StreamEnd) {
        if self.failed.is_none() && !(self.end && self.answered) {
            self.failed = Some(end);
        }
        self.wake();
    }
}

impl Shared {
    fn find(&mut self, id: u32) -> Option<&mut UpStream> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    /// Sends what `stream`'s pending body the windows allow.
    fn send_pending(&mut self, i: usize) {
        let max_frame = self.peer_max_frame as i64;
        let stream = &mut self.streams[i];
        while !stream.pending.is_empty() {
            let n = (stream.pending.len() as i64)
                .min(stream.send_window)
                .min(self.send_window)
                .min(max_frame);
            if n <= 0 {
                return;
            }
            let chunk = stream.pending.split_to(n as usize);
            let end = stream.pending.is_empty() && stream.pending_end;
            frame::data(&mut self.out, stream.id, &chunk, end);
            stream.send_window -= n;
            self.send_window -= n;
            stream.sent_end |= end;
        }
    }

    /// Ends every stream the connection's end leaves without an answer.
    fn end(&mut self, why: String) {
        for stream in &mut self.streams {
            stream.fail(StreamEnd::Ended(why.clone()));
        }
        self.ended = Some(why);
        for waker in self.room.drain(..) {
            waker.wake();
        }
    }
}

#[derive(Clone)]
struct Ready {
    client: Arc<Client>,
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
                Slot::Ready(ready) => !ready.client.closed.load(Relaxed),
                Slot::Connecting(_) => true,
            }
        });
        let mut least: Option<&Ready> = None;
        let mut connecting = None;
        for slot in slots.iter() {
            match slot {
                Slot::Ready(ready) => {
                    let open = ready.client.streams.load(Relaxed);
                    if open < ready.client.max_streams.load(Relaxed) {
                        return Found::Use(ready.clone());
                    }
                    if least.is_none_or(|l| l.client.streams.load(Relaxed) > open) {
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
            Some(ready) if slots.len() >= MAX_CONNECTIONS => Found::Use(ready.clone()),
            _ => Found::Open,
        }
    })
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
        client: None,
    };
    tokio::spawn(async move {
        // Whole, so it drops (and leaves the pool) when the task ends.
        let mut leave = leave;
        let tls = tls.as_ref().map(|(tls, failures)| (&**tls, failures));
        let io = match tokio::time::timeout(timeout, Io::connect(addr, tls, Alpn::H2)).await {
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
        let client = Arc::new(Client {
            shared: Mutex::new(Shared {
                out: Vec::with_capacity(16 << 10),
                next_id: 1,
                streams: Vec::new(),
                send_window: frame::DEFAULT_WINDOW,
                peer_initial_window: frame::DEFAULT_WINDOW,
                peer_max_frame: frame::DEFAULT_MAX_FRAME,
                goaway_last: None,
                ended: None,
                new_bodies: Vec::new(),
                room: Vec::new(),
                taken: 0,
                credit_due: false,
            }),
            closed: AtomicBool::new(false),
            streams: AtomicU32::new(0),
            max_streams: AtomicU32::new(INITIAL_MAX_STREAMS),
            idle_since: AtomicU64::new(now_ns()),
            goaway: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let mut conn = Conn::new(io, client.clone(), metrics.clone());
        // Used once the endpoint's SETTINGS are in: streams beyond its
        // limit would be refused.
        let settled =
            tokio::time::timeout(timeout, std::future::poll_fn(|cx| conn.poll_settings(cx)));
        match settled.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = settle.send(Some(Err(format!("HTTP/2 connection to {addr}: {e}"))));
                return;
            }
            Err(_) => {
                let _ = settle.send(Some(Err(format!(
                    "HTTP/2 handshake with {addr} timed out after {timeout:?}"
                ))));
                return;
            }
        }
        leave.client = Some(client.clone());
        let _ = settle.send(Some(Ok(Ready {
            client: client.clone(),
        })));
        metrics.connections.inc();
        let why = conn.run().await;
        client.closed.store(true, Relaxed);
        metrics.connections.dec();
        tracing::debug!(endpoint = %addr, why, "upstream HTTP/2 connection ended");
    });
    opened
}

/// Takes a connection's slot out of this thread's pool when its task ends
/// (an endpoint that is gone leaves nothing behind).
struct Leave {
    key: Key,
    opened: watch::Receiver<Option<Result<Ready, String>>>,
    client: Option<Arc<Client>>,
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
                    .client
                    .as_ref()
                    .is_some_and(|client| Arc::ptr_eq(client, &ready.client)),
            });
            if slots.is_empty() {
                pool.remove(&self.key);
            }
        });
    }
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
            // others filling theirs) is used even when full: the stream
            // waits there until one of its own ends.
            Ok(Some(Ok(ready))) if ours || tries >= 4 => break ready.clone(),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err((Failure::Connect(e.clone().into()), false)),
            _ => {
                let e = "the connection attempt was abandoned".into();
                return Err((Failure::Connect(e), false));
            }
        }
    };
    let client = ready.client;
    let id = std::future::poll_fn(|cx| submit(&client, &request, &body, cx)).await;
    let id = match id {
        Ok(id) => id,
        // Nothing was written: the connection had ended already.
        Err(e) => return Err((Failure::Unsent(e.into()), true)),
    };
    if let Outgoing::Stream(body) = body {
        client.lock().new_bodies.push((id, body));
    }
    client.waker.wake();
    let stream = StreamRef {
        client: client.clone(),
        id,
        _open: Open::new(client.clone(), target.metrics),
    };
    let head = std::future::poll_fn(|cx| {
        let mut shared = client.lock();
        let Some(up) = shared.find(id) else {
            return Poll::Ready(Err(StreamEnd::Ended("stream gone".into())));
        };
        if let Some(head) = up.head.take() {
            up.answered = true;
            return Poll::Ready(Ok(head));
        }
        if let Some(failed) = up.failed.clone() {
            return Poll::Ready(Err(failed));
        }
        match &up.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => up.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    })
    .await;
    match head {
        Ok(head) => Ok(head.map(|()| Incoming { stream })),
        Err(end) => Err(judge(end, &client, target.metrics)),
    }
}

/// Writes a new stream's HEADERS (and a body in hand, as the windows
/// allow) into the connection's output; waits while the connection is at
/// the server's stream limit.
fn submit(
    client: &Client,
    request: &Request<()>,
    body: &Outgoing,
    cx: &mut Context<'_>,
) -> Poll<Result<u32, String>> {
    let mut shared = client.lock();
    if let Some(why) = &shared.ended {
        return Poll::Ready(Err(format!("the connection had ended: {why}")));
    }
    if shared.goaway_last.is_some() || shared.next_id > MAX_STREAM_ID {
        client.closed.store(true, Relaxed);
        return Poll::Ready(Err("the connection is going away".into()));
    }
    let open = shared.streams.len() as u32;
    if open >= client.max_streams.load(Relaxed) {
        shared.room.push(cx.waker().clone());
        return Poll::Pending;
    }
    let id = shared.next_id;
    shared.next_id += 2;
    let end = matches!(body, Outgoing::Empty);
    let at = frame::reserve_head(&mut shared.out);
    encode_request(&mut shared.out, request);
    let max_frame = shared.peer_max_frame;
    frame::headers_around(&mut shared.out, at, id, end, max_frame);
    let (pending, pending_end) = match body {
        Outgoing::Whole(bytes) => (bytes.clone(), true),
        _ => (Bytes::new(), false),
    };
    let send_window = shared.peer_initial_window;
    shared.streams.push(UpStream {
        id,
        head: None,
        answered: false,
        failed: None,
        waker: None,
        chunks: VecDeque::new(),
        trailers: None,
        end: false,
        taken: 0,
        recv_window: i64::from(STREAM_WINDOW),
        send_window,
        pending,
        pending_end,
        sent_end: end,
        dropped: false,
    });
    if pending_end {
        let i = shared.streams.len() - 1;
        if shared.streams[i].pending.is_empty() {
            // An empty body in hand: END_STREAM on its own.
            frame::data(&mut shared.out, id, &[], true);
            shared.streams[i].sent_end = true;
        } else {
            shared.send_pending(i);
        }
    }
    Poll::Ready(Ok(id))
}

/// A request's head as HPACK: pseudo-headers from the method and URI, then
/// the fields HTTP/2 allows.
fn encode_request(out: &mut Vec<u8>, request: &Request<()>) {
    let uri = request.uri();
    hpack::encode_pseudo(out, 2, request.method().as_str().as_bytes());
    hpack::encode_pseudo(out, 6, uri.scheme_str().unwrap_or("http").as_bytes());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    hpack::encode_pseudo(out, 4, path.as_bytes());
    if let Some(authority) = uri.authority() {
        hpack::encode_pseudo(out, 1, authority.as_str().as_bytes());
    }
    for (name, value) in request.headers() {
        if frame::connection_specific(name) || name == header::HOST {
            continue;
        }
        hpack::encode_field(out, name, value.as_bytes(), value.is_sensitive());
    }
}

/// A stream's failure, judged by whether the endpoint could have taken
/// it, and whether its connection was going away.
fn judge(end: StreamEnd, client: &Client, metrics: &H2Metrics) -> (Failure, bool) {
    match end {
        // Streams above a GOAWAY's last stream id were not processed
        // (RFC 9113 §6.8); those at or below it may have been.
        StreamEnd::GoneAway => {
            client.saw_goaway(metrics);
            let e = "the endpoint's GOAWAY left the stream unprocessed".into();
            (Failure::Unsent(e), true)
        }
        // RFC 9113 §8.7: not processed.
        StreamEnd::Reset(code) if code == Reason::RefusedStream as u32 => (
            Failure::Unsent("the endpoint refused the stream".into()),
            false,
        ),
        StreamEnd::Reset(code) => (
            Failure::Broken(format!("the endpoint reset the stream (error code {code})").into()),
            false,
        ),
        StreamEnd::Ended(why) => (Failure::Broken(why.into()), false),
    }
}

/// A stream counted open on its connection and endpoint until dropped.
struct Open {
    client: Arc<Client>,
    streams: prometheus::IntGauge,
}

impl Open {
    fn new(client: Arc<Client>, metrics: &H2Metrics) -> Open {
        client.streams.fetch_add(1, Relaxed);
        metrics.streams.inc();
        Open {
            client,
            streams: metrics.streams.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.client.streams.fetch_sub(1, Relaxed) == 1 {
            self.client.idle_since.store(now_ns(), Relaxed);
        }
        self.streams.dec();
    }
}

/// A request's hold on its stream: dropped, the stream is let go (reset
/// when still open).
struct StreamRef {
    client: Arc<Client>,
    id: u32,
    _open: Open,
}

impl Drop for StreamRef {
    fn drop(&mut self) {
        let mut shared = self.client.lock();
        if let Some(up) = shared.find(self.id) {
            up.dropped = true;
            shared.credit_due = true;
            drop(shared);
            self.client.waker.wake();
        }
    }
}

/// A response body from an endpoint: data as it is read (each read gives
/// the endpoint that much window back), then the trailers.
pub(crate) struct Incoming {
    stream: StreamRef,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let client = &self.stream.client;
        let mut shared = client.lock();
        let id = self.stream.id;
        let Some(i) = shared.streams.iter().position(|s| s.id == id) else {
            return Poll::Ready(None);
        };
        if let Some(chunk) = shared.streams[i].chunks.pop_front() {
            let len = chunk.len();
            shared.taken += len;
            let up = &mut shared.streams[i];
            up.taken += len;
            let due = (!up.end && up.taken >= STREAM_WINDOW as usize / 2)
                || shared.taken >= CONNECTION_WINDOW as usize / 2;
            if due && !shared.credit_due {
                shared.credit_due = true;
                drop(shared);
                client.waker.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let up = &mut shared.streams[i];
        if let Some(failed) = &up.failed {
            let e = match failed {
                StreamEnd::Reset(code) => {
                    format!("the endpoint reset the stream (error code {code})")
                }
                StreamEnd::GoneAway => "the endpoint went away".to_string(),
                StreamEnd::Ended(why) => why.clone(),
            };
            return Poll::Ready(Some(Err(e.into())));
        }
        if up.end {
            return Poll::Ready(up.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        match &up.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => up.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let mut shared = self.stream.client.lock();
        shared.find(self.stream.id).is_none_or(|up| {
            up.end && up.failed.is_none() && up.chunks.is_empty() && up.trailers.is_none()
        })
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A request body being sent by the connection's task.
struct Sending {
    id: u32,
    body: ProxyBody,
    pending: Bytes,
}

/// A connection's task: reads and handles the server's frames, writes what
/// the requests and it gathered, sends streamed request bodies, keeps the
/// connection alive.
struct Conn {
    io: Io,
    client: Arc<Client>,
    metrics: H2Metrics,
    input: frame::Input,
    /// Output being written (taken from the shared buffer).
    writing: Vec<u8>,
    written: usize,
    decoder: hpack::Decoder,
    blocks: frame::Blocks,
    recv_window: i64,
    bodies: Vec<Sending>,
    settings: bool,
    ping: Pin<Box<tokio::time::Sleep>>,
    /// A keepalive PING is out, unanswered.
    pinged: bool,
    /// Something was written since this was last cleared.
    wrote: bool,
}

/// A connection error: GOAWAY with this reason, then the end.
type ConnError = Reason;

impl Conn {
    fn new(io: Io, client: Arc<Client>, metrics: H2Metrics) -> Conn {
        {
            let mut shared = client.lock();
            shared.out.extend_from_slice(frame::PREFACE);
            frame::settings(
                &mut shared.out,
                &[
                    (frame::SETTINGS_ENABLE_PUSH, 0),
                    (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                ],
            );
            frame::window_update(
                &mut shared.out,
                0,
                CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
            );
        }
        Conn {
            io,
            client,
            metrics,
            input: frame::Input::new(READ_BUFFER),
            writing: Vec::with_capacity(16 << 10),
            written: 0,
            decoder: hpack::Decoder::new(HEADER_TABLE),
            blocks: frame::Blocks::default(),
            recv_window: i64::from(CONNECTION_WINDOW),
            bodies: Vec::new(),
            settings: false,
            ping: Box::pin(tokio::time::sleep(PING_EVERY)),
            pinged: false,
            wrote: false,
        }
    }

    /// Ready once the server's SETTINGS are in (the preface written).
    fn poll_settings(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        loop {
            if let Poll::Ready(Err(e)) = self.poll_write(cx) {
                return Poll::Ready(Err(e.to_string()));
            }
            if self.settings {
                return Poll::Ready(Ok(()));
            }
            match self.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(why)) => return Poll::Ready(Err(why)),
                Poll::Ready(Ok(())) => {}
            }
        }
    }

    /// Runs the connection until it ends; why it ended.
    async fn run(&mut self) -> String {
        let why = std::future::poll_fn(|cx| self.poll_run(cx)).await;
        let mut shared = self.client.lock();
        shared.end(why.clone());
        if let Some(last) = shared.goaway_last {
            tracing::debug!(last, "upstream HTTP/2 connection ended after a GOAWAY");
        }
        why
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        self.client.waker.register(cx.waker());
        loop {
            let mut progress = false;
            match self.poll_read(cx) {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(why)) => {
                    // Say so to the server when it was our finding.
                    let _ = self.poll_write(cx);
                    return Poll::Ready(why);
                }
                Poll::Pending => {}
            }
            progress |= self.pump(cx);
            self.housekeep();
            // Output written in full makes room: bodies held back by it go
            // on (nothing else would wake them).
            self.wrote = false;
            match self.poll_write(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(format!("write failed: {e}")),
                Poll::Ready(Ok(())) => progress |= self.wrote,
                Poll::Pending => {}
            }
            if let Some(why) = self.timers(cx) {
                let _ = self.poll_write(cx);
                return Poll::Ready(why);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Keepalive and idle close; why to end, if it is time.
    fn timers(&mut self, cx: &mut Context<'_>) -> Option<String> {
        let shared = self.client.lock();
        let draining = shared.goaway_last.is_some() || self.client.closed.load(Relaxed);
        if draining && shared.streams.is_empty() {
            return Some("going away, no stream left".into());
        }
        drop(shared);
        while self.ping.as_mut().poll(cx).is_ready() {
            if self.pinged {
                self.client.closed.store(true, Relaxed);
                tracing::warn!(
                    "an upstream HTTP/2 connection did not answer a PING in {PING_TIMEOUT:?}: closed"
                );
                return Some("PING unanswered".into());
            }
            let idle = self.client.streams.load(Relaxed) == 0
                && now_ns().saturating_sub(self.client.idle_since.load(Relaxed))
                    >= IDLE_CLOSE.as_nanos() as u64;
            if idle {
                self.client.closed.store(true, Relaxed);
                let mut shared = self.client.lock();
                if shared.streams.is_empty() {
                    frame::goaway(&mut shared.out, 0, Reason::NoError);
                    return Some("idle".into());
                }
            }
            frame::ping(&mut self.client.lock().out, 0, *b"sy-alive");
            self.pinged = true;
            let next = tokio::time::Instant::now() + PING_TIMEOUT;
            self.ping.as_mut().reset(next);
        }
        None
    }

    /// Reads what the socket has and handles every whole frame; an error
    /// ends the connection.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let mut buf = ReadBuf::new(self.input.space());
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(format!("read failed: {e}"))),
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Poll::Ready(Err("the endpoint closed the connection".into()));
                }
                self.input.filled(n);
                let mut input = std::mem::take(&mut self.input);
                let handled = input.frames(|head, payload| self.frame(head, payload));
                self.input = input;
                match handled {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(reason) => {
                        let mut shared = self.client.lock();
                        let last = 0;
                        frame::goaway(&mut shared.out, last, reason);
                        Poll::Ready(Err(format!("protocol error from the endpoint: {reason:?}")))
                    }
                }
            }
        }
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if !self.settings && head.kind != frame::SETTINGS {
            // The server's preface is a SETTINGS frame (RFC 9113 §3.4).
            return Err(Reason::ProtocolError);
        }
        if self.blocks.open() && head.kind != frame::CONTINUATION {
            return Err(Reason::ProtocolError);
        }
        match head.kind {
            frame::DATA => self.data(head, payload),
            frame::HEADERS | frame::CONTINUATION => {
                match self.blocks.take(head, payload, MAX_HEADER_BLOCK)? {
                    Some((id, flags, block)) => self.header_block(id, flags, &block),
                    None => Ok(()),
                }
            }
            frame::RST_STREAM => {
                let raw: [u8; 4] = payload.try_into().map_err(|_| Reason::FrameSizeError)?;
                let code = u32::from_be_bytes(raw);
                let mut shared = self.client.lock();
                if let Some(up) = shared.find(head.stream) {
                    up.fail(StreamEnd::Reset(code));
                    up.sent_end = true;
                    up.end = true;
                }
                Ok(())
            }
            frame::SETTINGS => self.settings_frame(head, payload),
            frame::PING => {
                let opaque: [u8; 8] = payload.try_into().map_err(|_| Reason::FrameSizeError)?;
                if head.flags & frame::ACK == 0 {
                    frame::ping(&mut self.client.lock().out, frame::ACK, opaque);
                } else if self.pinged {
                    self.pinged = false;
                    let next = tokio::time::Instant::now() + PING_EVERY;
                    self.ping.as_mut().reset(next);
                }
                Ok(())
            }
            frame::GOAWAY => {
                let last = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .ok_or(Reason::FrameSizeError)?;
                self.client.closed.store(true, Relaxed);
                self.client.saw_goaway(&self.metrics);
                let mut shared = self.client.lock();
                shared.goaway_last = Some(shared.goaway_last.map_or(last, |l| l.min(last)));
                for up in &mut shared.streams {
                    if up.id > last {
                        up.fail(StreamEnd::GoneAway);
                    }
                }
                for waker in shared.room.drain(..) {
                    waker.wake();
                }
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let raw: [u8; 4] = payload.try_into().map_err(|_| Reason::FrameSizeError)?;
                let increment = i64::from(u32::from_be_bytes(raw) & 0x7fff_ffff);
                let mut shared = self.client.lock();
                if head.stream == 0 {
                    shared.send_window += increment;
                    if shared.send_window > frame::MAX_WINDOW {
                        return Err(Reason::FlowControlError);
                    }
                } else if let Some(up) = shared.find(head.stream) {
                    up.send_window += increment;
                }
                // Held bodies may go on.
                for i in 0..shared.streams.len() {
                    if !shared.streams[i].pending.is_empty() {
                        shared.send_pending(i);
                    }
                }
                Ok(())
            }
            frame::PUSH_PROMISE => Err(Reason::ProtocolError),
            _ => Ok(()),
        }
    }

    fn data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let len = head.len as i64;
        if len > self.recv_window {
            return Err(Reason::FlowControlError);
        }
        self.recv_window -= len;
        let data = frame::unpad(head, payload)?;
        let end = head.flags & frame::END_STREAM != 0;
        let mut shared = self.client.lock();
        // Padding, and what no body will read, is given back at once.
        let mut give_back = len as usize - data.len();
        match shared.find(head.stream) {
            Some(up) if !up.dropped && !up.end && len <= up.recv_window => {
                up.recv_window -= len;
                if !data.is_empty() {
                    up.chunks.push_back(Bytes::copy_from_slice(data));
                }
                up.end |= end;
                up.wake();
            }
            _ => give_back += data.len(),
        }
        shared.taken += give_back;
        if shared.taken >= CONNECTION_WINDOW as usize / 2 {
            shared.credit_due = true;
        }
        Ok(())
    }

    fn header_block(&mut self, id: u32, flags: u8, block: &[u8]) -> Result<(), ConnError> {
        let end = flags & frame::END_STREAM != 0;
        let mut status = None;
        let mut headers = HeaderMap::new();
        let mut malformed = false;
        self.decoder
            .decode(block, |name, value| match name {
                Name::Status if status.is_none() && headers.is_empty() => {
                    status = StatusCode::from_bytes(&value).ok();
                    malformed |= status.is_none();
                }
                Name::Header(name) => match HeaderValue::from_maybe_shared(value) {
                    Ok(value) => {
                        headers.append(name, value);
                    }
                    Err(_) => malformed = true,
                },
                _ => malformed = true,
            })
            .map_err(|_| Reason::CompressionError)?;
        let mut shared = self.client.lock();
        let Some(up) = shared.find(id) else {
            return Ok(());
        };
        let trailers = up.answered || up.head.is_some();
        // Trailers have no pseudo-header and end the stream; a head has
        // its status.
        let bad = match trailers {
            true => status.is_some() || malformed || !end,
            false => status.is_none() || malformed,
        };
        if bad {
            up.fail(StreamEnd::Reset(Reason::ProtocolError as u32));
            up.end = true;
            up.sent_end = true;
            frame::rst_stream(&mut shared.out, id, Reason::ProtocolError);
            return Ok(());
        }
        if trailers {
            up.trailers = Some(headers);
            up.end = true;
            up.wake();
            return Ok(());
        }
        let Some(status) = status else {
            return Ok(());
        };
        if status.is_informational() {
            // 100 Continue and the like: the final head follows.
            return Ok(());
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = hyper::Version::HTTP_2;
        *response.headers_mut() = headers;
        up.head = Some(response);
        up.end |= end;
        up.wake();
        Ok(())
    }

    fn settings_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let Some(settings) = frame::Settings::read(head, payload)? else {
            return Ok(());
        };
        let mut shared = self.client.lock();
        if let Some(value) = settings.max_streams {
            self.client.max_streams.store(value, Relaxed);
            for waker in shared.room.drain(..) {
                waker.wake();
            }
        }
        if let Some(value) = settings.initial_window {
            let delta = value - shared.peer_initial_window;
            shared.peer_initial_window = value;
            for up in &mut shared.streams {
                up.send_window += delta;
            }
        }
        if let Some(value) = settings.max_frame {
            shared.peer_max_frame = value;
        }
        frame::settings_ack(&mut shared.out);
        self.settings = true;
        Ok(())
    }

    /// Sends what streamed request bodies have, as the windows allow.
    fn pump(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut shared = self.client.lock();
        let new = std::mem::take(&mut shared.new_bodies);
        self.bodies
            .extend(new.into_iter().map(|(id, body)| Sending {
                id,
                body,
                pending: Bytes::new(),
            }));
        let max_frame = shared.peer_max_frame as i64;
        self.bodies.retain_mut(|sending| {
            let Some(i) = shared.streams.iter().position(|s| s.id == sending.id) else {
                return false;
            };
            loop {
                if shared.out.len() >= WRITE_HIGH {
                    return true;
                }
                let up_window = shared.streams[i].send_window;
                if shared.streams[i].dropped || shared.streams[i].failed.is_some() {
                    return false;
                }
                if !sending.pending.is_empty() {
                    let n = (sending.pending.len() as i64)
                        .min(up_window)
                        .min(shared.send_window)
                        .min(max_frame);
                    if n <= 0 {
                        return true;
                    }
                    let chunk = sending.pending.split_to(n as usize);
                    let end = sending.pending.is_empty() && sending.body.is_end_stream();
                    frame::data(&mut shared.out, sending.id, &chunk, end);
                    shared.streams[i].send_window -= n;
                    shared.send_window -= n;
                    progress = true;
                    if end {
                        shared.streams[i].sent_end = true;
                        return false;
                    }
                    continue;
                }
                match Pin::new(&mut sending.body).poll_frame(cx) {
                    Poll::Pending => return true,
                    Poll::Ready(None) => {
                        frame::data(&mut shared.out, sending.id, &[], true);
                        shared.streams[i].sent_end = true;
                        progress = true;
                        return false;
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // The client's body failed (a reset, a cut): so
                        // does the call upstream.
                        frame::rst_stream(&mut shared.out, sending.id, Reason::Cancel);
                        shared.streams[i].sent_end = true;
                        shared.streams[i].fail(StreamEnd::Reset(Reason::Cancel as u32));
                        progress = true;
                        return false;
                    }
                    Poll::Ready(Some(Ok(next))) => match next.into_data() {
                        Ok(data) => sending.pending = data,
                        Err(next) => {
                            if let Ok(trailers) = next.into_trailers() {
                                let at = frame::reserve_head(&mut shared.out);
                                for (name, value) in &trailers {
                                    hpack::encode_field(
                                        &mut shared.out,
                                        name,
                                        value.as_bytes(),
                                        value.is_sensitive(),
                                    );
                                }
                                let max = shared.peer_max_frame;
                                frame::headers_around(&mut shared.out, at, sending.id, true, max);
                                shared.streams[i].sent_end = true;
                                progress = true;
                                return false;
                            }
                        }
                    },
                }
            }
        });
        progress
    }

    /// Window updates; streams let go (reset when still open) and finished
    /// ones dropped.
    fn housekeep(&mut self) {
        let mut shared = self.client.lock();
        if !std::mem::take(&mut shared.credit_due) {
            return;
        }
        let Shared {
            out,
            streams,
            room,
            taken,
            ..
        } = &mut *shared;
        let before = streams.len();
        streams.retain_mut(|up| {
            if up.dropped {
                if !(up.end && up.sent_end) {
                    frame::rst_stream(out, up.id, Reason::Cancel);
                }
                // Unread data goes back to the connection.
                *taken += up.chunks.iter().map(Bytes::len).sum::<usize>();
                return false;
            }
            if !up.end && up.taken >= STREAM_WINDOW as usize / 2 {
                frame::window_update(out, up.id, up.taken as u32);
                up.recv_window += up.taken as i64;
                up.taken = 0;
            }
            true
        });
        if streams.len() < before {
            for waker in room.drain(..) {
                waker.wake();
            }
        }
        if *taken >= CONNECTION_WINDOW as usize / 2 {
            frame::window_update(out, 0, *taken as u32);
            self.recv_window += *taken as i64;
            *taken = 0;
        }
    }

    /// Writes what is gathered; ready once all of it is written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.written == self.writing.len() {
                self.writing.clear();
                self.written = 0;
                let mut shared = self.client.lock();
                if shared.out.is_empty() {
                    break;
                }
                std::mem::swap(&mut shared.out, &mut self.writing);
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.writing[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    self.wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
