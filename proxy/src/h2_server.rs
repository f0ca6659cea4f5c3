//! Client-facing HTTP/2 (prior knowledge, and ALPN `h2` over TLS) on a
//! codec of our own: frames and HPACK (`h2_frame`, `hpack`) read from and
//! written to the connection's own buffers by one task, which also polls
//! every stream's exchange (a future in the connection's set, no task per
//! stream) and sends each response body itself as the client's windows
//! allow. A request goes to `H2Tls::handle` like every other on this side.
//!
//! Nothing is shared between streams but the connection's state, owned by
//! its task; a request body is the one thing another task may hold (an
//! upstream stream's sender), so it alone sits behind a lock of its own.
//! Output for many streams is gathered and written at once.
//!
//! The connection ends gracefully (two-step GOAWAY: streams in progress
//! finish) at shutdown, when idle past its limits, and past
//! `http.h2.max_connection_age`. Malformed requests (RFC 9113 §8.2: field
//! names with uppercase, connection-specific fields, `te` other than
//! `trailers`, bad pseudo-headers, a body that disagrees with its
//! `content-length`) are reset with PROTOCOL_ERROR before the proxy sees
//! them; protocol errors end the connection with GOAWAY.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, Stream as _};
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::h2_frame::{self as frame, Head, Reason};
use crate::h2_tls::{Activity, BoxError, Exchange, H2Tls, ProxyBody};
use crate::hpack::{self, Name};
use crate::metrics::GoAway;

/// Streams a client may open at once.
const MAX_STREAMS: usize = 200;
/// Receive windows: a stream's and the connection's. The connection's
/// bounds what all of a client's unread request bodies may hold.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Largest header list a client may send (as RFC 9113 counts it).
const MAX_HEADER_LIST: usize = 16 << 10;
/// Largest header block (HEADERS and its CONTINUATIONs) read at all.
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The HPACK table size we allow the client's encoder.
const HEADER_TABLE: usize = 4096;
/// Output gathered before response bodies wait for the socket.
const WRITE_HIGH: usize = 64 << 10;
const READ_BUFFER: usize = 64 << 10;
/// The PING that ends the first step of a graceful GOAWAY.
const GRACEFUL_PING: [u8; 8] = *b"sy-drain";
/// Streams a client may reset before their answers, beyond those answered,
/// before the connection is ended (rapid reset, CVE-2023-44487).
const MAX_EARLY_RESETS: usize = 2 * MAX_STREAMS;

/// Serves one HTTP/2 connection until it ends; `stop` resolves at shutdown.
pub(crate) async fn serve<I>(
    h2: Arc<H2Tls>,
    io: I,
    peer: IpAddr,
    proto: &'static str,
    stop: impl Future<Output = ()>,
    first: Arc<Notify>,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let config = h2.shared.config.load_full();
    let mut conn = Conn::new(io, activity.clone());
    let mut streams = FuturesUnordered::new();
    let idle = activity.idle(config.header_timeout, config.idle_timeout);
    let age = config.h2.max_connection_age;
    let aged = async {
        match age.is_zero() {
            true => std::future::pending().await,
            false => tokio::time::sleep(age).await,
        }
    };
    let (mut idle, mut aged, mut stop) = (
        std::pin::pin!(idle),
        std::pin::pin!(aged),
        std::pin::pin!(stop),
    );
    // Once a GOAWAY is sent: when the streams in progress are cut.
    let mut closing = false;
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let goaway = |conn: &mut Conn<I>, why: GoAway, grace: Option<std::time::Duration>| {
        h2.shared.metrics.goaway(why);
        conn.graceful();
        grace.map(|grace| Box::pin(tokio::time::sleep(grace)))
    };
    std::future::poll_fn(|cx| loop {
        if !closing {
            if stop.as_mut().poll(cx).is_ready() {
                closing = true;
                deadline = goaway(&mut conn, GoAway::Shutdown, None);
            } else if aged.as_mut().poll(cx).is_ready() {
                // The streams in progress finish within the shutdown grace;
                // the client reconnects for new ones.
                closing = true;
                deadline = goaway(&mut conn, GoAway::MaxAge, Some(config.shutdown_grace));
            } else if idle.as_mut().poll(cx).is_ready() {
                // A client that does not answer the GOAWAY's PING is cut
                // after header_timeout.
                closing = true;
                deadline = goaway(&mut conn, GoAway::Idle, Some(config.header_timeout));
            }
        }
        if deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
        {
            return Poll::Ready(());
        }
        let mut progress = conn.poll_input(cx);
        for (id, request, cancel) in conn.accepted.drain(..) {
            first.notify_one();
            streams.push(exchange(h2.clone(), id, request, peer, proto, cancel));
        }
        while let Poll::Ready(Some((id, response))) = Pin::new(&mut streams).poll_next(cx) {
            conn.respond(id, response);
            progress = true;
        }
        progress |= conn.pump(cx);
        conn.announce();
        conn.sweep();
        // Output written in full makes room: reading and bodies held back
        // by it go on (nothing else would wake them).
        let had_output = !conn.out.is_empty();
        match conn.poll_output(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTP/2 connection write failed");
                return Poll::Ready(());
            }
            Poll::Ready(Ok(())) if conn.finished() => return Poll::Ready(()),
            Poll::Ready(Ok(())) => progress |= had_output,
            Poll::Pending => {}
        }
        if conn.broken {
            // The peer went away, or a write failed: nothing more to send.
            return Poll::Ready(());
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    if let Some(reason) = conn.error {
        tracing::debug!(%peer, ?reason, "HTTP/2 connection error");
    }
}

/// Ends a stream's exchange early when the client resets the stream.
struct Cancel {
    cancelled: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Cancel {
    fn cancel(&self) {
        self.cancelled.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// One stream's exchange: the request handled; `None` when the client
/// reset the stream first (the exchange is dropped, and with it the
/// upstream stream).
async fn exchange(
    h2: Arc<H2Tls>,
    id: u32,
    request: Request<RequestBody>,
    peer: IpAddr,
    proto: &'static str,
    cancel: Rc<Cancel>,
) -> (u32, Option<Response<ProxyBody>>) {
    let handled = h2.handle(request, peer, proto);
    let mut handled = std::pin::pin!(handled);
    let response = std::future::poll_fn(|cx| {
        if cancel.cancelled.get() {
            return Poll::Ready(None);
        }
        match cancel.waker.take() {
            Some(waker) if waker.will_wake(cx.waker()) => cancel.waker.set(Some(waker)),
            _ => cancel.waker.set(Some(cx.waker().clone())),
        }
        handled.as_mut().poll(cx).map(Some)
    })
    .await;
    (id, response)
}

/// Window given back as request bodies are read, for the connection to
/// announce (a body may be read by another task: an upstream stream's).
struct Credit {
    /// Bytes read, or dropped unread, not yet given back on the connection.
    taken: AtomicUsize,
    /// A stream has read enough to give its own window back.
    stream_due: AtomicBool,
    waker: AtomicWaker,
}

/// What a stream's request body has received and not yet been read.
#[derive(Default)]
struct Inbox {
    chunks: VecDeque<Bytes>,
    queued: usize,
    trailers: Option<HeaderMap>,
    end: bool,
    reset: bool,
    /// The body was dropped: what arrives is given back at once.
    dropped: bool,
    /// Bytes read since the stream's window was last given back.
    taken: usize,
    waker: Option<Waker>,
}

/// A request's body as the client sends it: data as it is read (each read
/// gives the client that much window back, so a slow reader slows the
/// sender), then the trailers. Fails when the client resets the stream.
pub(crate) struct RequestBody {
    inbox: Option<(Arc<Mutex<Inbox>>, Arc<Credit>)>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some((inbox, credit)) = &self.inbox else {
            return Poll::Ready(None);
        };
        let Ok(mut inbox) = inbox.lock() else {
            return Poll::Ready(Some(Err("request body lock poisoned".into())));
        };
        if let Some(chunk) = inbox.chunks.pop_front() {
            let len = chunk.len();
            inbox.queued -= len;
            inbox.taken += len;
            let before = credit.taken.fetch_add(len, Ordering::Relaxed);
            let stream_due = !inbox.end && inbox.taken >= STREAM_WINDOW as usize / 2;
            if stream_due {
                credit.stream_due.store(true, Ordering::Relaxed);
            }
            let half = CONNECTION_WINDOW as usize / 2;
            if stream_due || (before < half && before + len >= half) {
                credit.waker.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if inbox.reset {
            return Poll::Ready(Some(Err("the client reset the stream".into())));
        }
        if inbox.end {
            return Poll::Ready(inbox.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        match &inbox.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.inbox {
            None => true,
            Some((inbox, _)) => inbox.lock().map_or(true, |i| {
                i.end && i.chunks.is_empty() && i.trailers.is_none()
            }),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inbox {
            None => SizeHint::with_exact(0),
            Some(_) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some((inbox, credit)) = &self.inbox else {
            return;
        };
        let Ok(mut inbox) = inbox.lock() else {
            return;
        };
        inbox.dropped = true;
        inbox.chunks.clear();
        let unread = std::mem::take(&mut inbox.queued);
        if unread > 0 {
            credit.taken.fetch_add(unread, Ordering::Relaxed);
            credit.waker.wake();
        }
    }
}

/// Where a stream's response stands.
enum Sending {
    /// The exchange is running.
    Waiting,
    /// The head is sent; the body goes as the windows allow.
    Body {
        body: ProxyBody,
        pending: Bytes,
    },
    Done,
}

struct Stream {
    id: u32,
    /// The client may still send on it.
    recv_open: bool,
    sending: Sending,
    /// How much more the client lets us send on it.
    send_window: i64,
    /// How much more we let the client send on it.
    recv_window: i64,
    inbox: Option<Arc<Mutex<Inbox>>>,
    cancel: Rc<Cancel>,
    /// `content-length` of the request, and the body bytes seen so far.
    expected: Option<u64>,
    received: u64,
    /// Counted in the connection's activity until the stream is gone.
    _exchange: Exchange,
}

/// The connection's own GOAWAY.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    Open,
    /// First step sent (no last stream yet), with a PING to learn when the
    /// client has seen it.
    Announced,
    /// Streams above this id are not processed.
    Final(u32),
}

/// A request head being read from a header block.
#[derive(Default)]
struct RequestHead {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    protocol: bool,
    headers: HeaderMap,
    regular: bool,
    malformed: bool,
    size: usize,
    expected: Option<u64>,
}

impl RequestHead {
    /// Adds a field; `trailers` allow no pseudo-header.
    fn field(&mut self, name: Name, value: Bytes, trailers: bool) {
        let pseudo = match name {
            Name::Method => Some((&mut self.method, 7)),
            Name::Scheme => Some((&mut self.scheme, 7)),
            Name::Authority => Some((&mut self.authority, 10)),
            Name::Path => Some((&mut self.path, 5)),
            Name::Protocol => {
                self.protocol = true;
                None
            }
            Name::Status | Name::OtherPseudo | Name::Bad => {
                self.malformed = true;
                return;
            }
            Name::Header(name) => {
                self.size += name.as_str().len() + value.len() + 32;
                self.header(name, value);
                return;
            }
        };
        if let Some((slot, len)) = pseudo {
            self.size += len + value.len() + 32;
            if trailers || self.regular || slot.is_some() {
                self.malformed = true;
            }
            *slot = Some(value);
        } else {
            // `:protocol` (extended CONNECT) is not offered.
            self.malformed = true;
        }
    }

    fn header(&mut self, name: HeaderName, value: Bytes) {
        self.regular = true;
        // Connection-specific fields (RFC 9113 §8.2.2).
        if frame::connection_specific(&name)
            || (name == header::TE && value.as_ref() != b"trailers")
        {
            self.malformed = true;
            return;
        }
        let Ok(value) = HeaderValue::from_maybe_shared(value) else {
            self.malformed = true;
            return;
        };
        if name == header::CONTENT_LENGTH {
            match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if self.expected.is_none_or(|e| e == n) => self.expected = Some(n),
                _ => self.malformed = true,
            }
        }
        self.headers.append(name, value);
    }

    /// The request, when the head makes one (RFC 9113 §8.3.1).
    fn request(self, body: RequestBody) -> Option<Request<RequestBody>> {
        if self.malformed {
            return None;
        }
        let method = Method::from_bytes(&self.method?).ok()?;
        let mut parts = hyper::http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            parts.authority = Some(Authority::from_maybe_shared(self.authority?).ok()?);
        } else {
            let path = self.path?;
            let scheme = self.scheme?;
            if path.is_empty() {
                return None;
            }
            if let Some(authority) = self.authority {
                parts.scheme = Some(Scheme::try_from(&scheme[..]).ok()?);
                parts.authority = Some(Authority::from_maybe_shared(authority).ok()?);
            }
            parts.path_and_query = Some(PathAndQuery::from_maybe_shared(path).ok()?);
        }
        let uri = Uri::from_parts(parts).ok()?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = self.headers;
        Some(request)
    }
}

/// A connection error: GOAWAY with this reason, then the end.
type ConnError = Reason;

struct Conn<I> {
    io: I,
    activity: Arc<Activity>,
    input: frame::Input,
    preface: bool,
    settings: bool,
    out: Vec<u8>,
    written: usize,
    decoder: hpack::Decoder,
    streams: Vec<Stream>,
    /// Requests read, for the driver to start.
    accepted: Vec<(u32, Request<RequestBody>, Rc<Cancel>)>,
    last_id: u32,
    send_window: i64,
    recv_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    credit: Arc<Credit>,
    blocks: frame::Blocks,
    closing: Closing,
    peer_goaway: bool,
    read_closed: bool,
    broken: bool,
    error: Option<ConnError>,
    early_resets: usize,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    fn new(io: I, activity: Arc<Activity>) -> Conn<I> {
        let out = Vec::with_capacity(16 << 10);
        Conn {
            io,
            activity,
            input: frame::Input::new(READ_BUFFER),
            preface: false,
            settings: false,
            out,
            written: 0,
            decoder: hpack::Decoder::new(HEADER_TABLE),
            streams: Vec::new(),
            accepted: Vec::new(),
            last_id: 0,
            send_window: frame::DEFAULT_WINDOW,
            recv_window: i64::from(CONNECTION_WINDOW),
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            credit: Arc::new(Credit {
                taken: AtomicUsize::new(0),
                stream_due: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
            blocks: frame::Blocks::default(),
            closing: Closing::Open,
            peer_goaway: false,
            read_closed: false,
            broken: false,
            error: None,
            early_resets: 0,
        }
    }

    /// Reads what the socket has and handles every whole frame in it;
    /// whether anything was read.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> bool {
        self.credit.waker.register(cx.waker());
        let mut progress = false;
        // Output the client does not take holds its input back.
        while !self.read_closed && self.error.is_none() && self.out.len() < WRITE_HIGH {
            let mut buf = ReadBuf::new(self.input.space());
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => {
                    self.read_closed = true;
                    self.broken = true;
                }
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        self.read_closed = true;
                        self.broken = true;
                        break;
                    }
                    self.input.filled(n);
                    progress = true;
                    if let Err(reason) = self.frames() {
                        self.fail(reason);
                    }
                }
            }
        }
        progress
    }

    /// Ends the connection with GOAWAY.
    fn fail(&mut self, reason: Reason) {
        if self.error.is_none() {
            self.error = Some(reason);
            frame::goaway(&mut self.out, self.last_id, reason);
            self.read_closed = true;
        }
    }

    /// Handles every whole frame read (the client's preface first).
    fn frames(&mut self) -> Result<(), ConnError> {
        let mut input = std::mem::take(&mut self.input);
        let result = self.preface(&mut input).and_then(|()| match self.preface {
            true => input.frames(|head, payload| self.frame(head, payload)),
            false => Ok(()),
        });
        self.input = input;
        result
    }

    /// Reads the client's connection preface, once.
    fn preface(&mut self, input: &mut frame::Input) -> Result<(), ConnError> {
        if self.preface {
            return Ok(());
        }
        let have = input.pending();
        let want = frame::PREFACE.len();
        if !frame::PREFACE.starts_with(&have[..have.len().min(want)]) {
            return Err(Reason::ProtocolError);
        }
        if have.len() < want {
            return Ok(());
        }
        input.consume(want);
        self.preface = true;
        // Our SETTINGS once the client's preface is in, in the same write
        // as the answer to the client's SETTINGS (a client without
        // TCP_NODELAY holds its request back until what it sent is
        // acknowledged: one write answers both).
        frame::settings(
            &mut self.out,
            &[
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::window_update(
            &mut self.out,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        Ok(())
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if !self.settings {
            // The client's preface ends with SETTINGS (RFC 9113 §3.4).
            if head.kind != frame::SETTINGS || head.flags & frame::ACK != 0 {
                return Err(Reason::ProtocolError);
            }
            self.settings = true;
        }
        if self.blocks.open() && head.kind != frame::CONTINUATION {
            return Err(Reason::ProtocolError);
        }
        match head.kind {
            frame::DATA => self.data(head, payload),
            frame::HEADERS | frame::CONTINUATION => {
                if head.stream == 0 || head.stream.is_multiple_of(2) {
                    return Err(Reason::ProtocolError);
                }
                match self.blocks.take(head, payload, MAX_HEADER_BLOCK)? {
                    Some((id, flags, block)) => self.header_block(id, flags, &block),
                    None => Ok(()),
                }
            }
            frame::PRIORITY => {
                if head.stream == 0 {
                    return Err(Reason::ProtocolError);
                }
                if head.len != 5 {
                    self.reset(head.stream, Reason::FrameSizeError);
                }
                Ok(())
            }
            frame::RST_STREAM => self.rst_stream(head, payload),
            frame::SETTINGS => self.settings_frame(head, payload),
            frame::PING => self.ping(head, payload),
            frame::GOAWAY => {
                if head.stream != 0 {
                    return Err(Reason::ProtocolError);
                }
                self.peer_goaway = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.window_update(head, payload),
            // Clients do not push (§8.4).
            frame::PUSH_PROMISE => Err(Reason::ProtocolError),
            // Unknown frame types are ignored (§4.1).
            _ => Ok(()),
        }
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// A frame on a stream id the client has not opened yet.
    fn idle(&self, id: u32) -> bool {
        id > self.last_id
    }

    fn data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(Reason::ProtocolError);
        }
        let len = head.len as i64;
        if len > self.recv_window {
            return Err(Reason::FlowControlError);
        }
        self.recv_window -= len;
        let data = frame::unpad(head, payload)?;
        // Padding is given back at once; so is anything no body will read.
        let mut give_back = (len as usize) - data.len();
        let Some(i) = self.find(head.stream) else {
            if self.idle(head.stream) {
                return Err(Reason::ProtocolError);
            }
            // A stream already closed (reset, or answered): frames in flight.
            self.give_back(len as usize);
            return Ok(());
        };
        let end = head.flags & frame::END_STREAM != 0;
        let stream = &mut self.streams[i];
        let refused = if !stream.recv_open {
            Some(Reason::StreamClosed)
        } else if len > stream.recv_window {
            Some(Reason::FlowControlError)
        } else {
            stream.recv_window -= len;
            stream.received += data.len() as u64;
            let too_long = stream.expected.is_some_and(|e| stream.received > e);
            let too_short = end && stream.expected.is_some_and(|e| stream.received != e);
            (too_long || too_short).then_some(Reason::ProtocolError)
        };
        if let Some(reason) = refused {
            self.give_back(len as usize);
            self.reset(head.stream, reason);
            return Ok(());
        }
        let stream = &mut self.streams[i];
        if end {
            stream.recv_open = false;
        }
        match &stream.inbox {
            Some(inbox) => {
                if let Ok(mut inbox) = inbox.lock() {
                    if inbox.dropped {
                        give_back += data.len();
                    } else if !data.is_empty() {
                        inbox.queued += data.len();
                        inbox.chunks.push_back(Bytes::copy_from_slice(data));
                    }
                    inbox.end |= end;
                    if let Some(waker) = inbox.waker.take() {
                        waker.wake();
                    }
                }
            }
            None => give_back += data.len(),
        }
        self.give_back(give_back);
        Ok(())
    }

    /// Connection window for bytes no body will read.
    fn give_back(&mut self, n: usize) {
        if n > 0 {
            self.credit.taken.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A whole header block: a new request, or a request's trailers.
    fn header_block(&mut self, id: u32, flags: u8, block: &[u8]) -> Result<(), ConnError> {
        let end = flags & frame::END_STREAM != 0;
        let existing = self.find(id);
        let trailers = existing.is_some();
        let mut head = RequestHead::default();
        // Decoded whatever becomes of the stream: the table must stay in
        // step with the client's.
        self.decoder
            .decode(block, |name, value| head.field(name, value, trailers))
            .map_err(|_| Reason::CompressionError)?;
        if let Some(i) = existing {
            let stream = &mut self.streams[i];
            let short = stream.expected.is_some_and(|e| e != stream.received);
            if !stream.recv_open {
                self.reset(id, Reason::StreamClosed);
            } else if !end || head.malformed || short {
                self.reset(id, Reason::ProtocolError);
            } else {
                stream.recv_open = false;
                if let Some(Ok(mut inbox)) = stream.inbox.as_ref().map(|i| i.lock()) {
                    inbox.trailers = Some(head.headers);
                    inbox.end = true;
                    if let Some(waker) = inbox.waker.take() {
                        waker.wake();
                    }
                }
            }
            return Ok(());
        }
        if !self.idle(id) {
            // A stream already closed: a reset it had not seen yet.
            return Ok(());
        }
        self.last_id = id;
        match self.closing {
            Closing::Final(last) if id > last => return Ok(()),
            _ => {}
        }
        if self.streams.len() >= MAX_STREAMS {
            // Streams reset in this read are still listed: drop them first.
            self.sweep();
        }
        if self.peer_goaway || self.streams.len() >= MAX_STREAMS {
            frame::rst_stream(&mut self.out, id, Reason::RefusedStream);
            return Ok(());
        }
        if head.size > MAX_HEADER_LIST {
            let at = frame::reserve_head(&mut self.out);
            hpack::encode_status(&mut self.out, 431);
            frame::headers_around(&mut self.out, at, id, true, self.peer_max_frame);
            if !end {
                frame::rst_stream(&mut self.out, id, Reason::NoError);
            }
            return Ok(());
        }
        let expected = head.expected;
        if end && expected.is_some_and(|e| e != 0) {
            frame::rst_stream(&mut self.out, id, Reason::ProtocolError);
            return Ok(());
        }
        let inbox = (!end).then(|| Arc::new(Mutex::new(Inbox::default())));
        let body = RequestBody {
            inbox: inbox.clone().map(|i| (i, self.credit.clone())),
        };
        let Some(request) = head.request(body) else {
            frame::rst_stream(&mut self.out, id, Reason::ProtocolError);
            return Ok(());
        };
        let cancel = Rc::new(Cancel {
            cancelled: Cell::new(false),
            waker: Cell::new(None),
        });
        self.streams.push(Stream {
            id,
            recv_open: !end,
            sending: Sending::Waiting,
            send_window: self.peer_initial_window,
            recv_window: i64::from(STREAM_WINDOW),
            inbox,
            cancel: cancel.clone(),
            expected,
            received: 0,
            _exchange: Exchange::begin(&self.activity),
        });
        self.accepted.push((id, request, cancel));
        Ok(())
    }

    fn rst_stream(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(Reason::ProtocolError);
        }
        if payload.len() != 4 {
            return Err(Reason::FrameSizeError);
        }
        let Some(i) = self.find(head.stream) else {
            return match self.idle(head.stream) {
                true => Err(Reason::ProtocolError),
                false => Ok(()),
            };
        };
        let stream = &mut self.streams[i];
        if matches!(stream.sending, Sending::Waiting) {
            self.early_resets += 1;
            if self.early_resets > MAX_EARLY_RESETS {
                return Err(Reason::EnhanceYourCalm);
            }
        }
        close(stream);
        Ok(())
    }

    fn settings_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let Some(settings) = frame::Settings::read(head, payload)? else {
            return Ok(());
        };
        if let Some(value) = settings.initial_window {
            let delta = value - self.peer_initial_window;
            self.peer_initial_window = value;
            for stream in &mut self.streams {
                stream.send_window += delta;
                if stream.send_window > frame::MAX_WINDOW {
                    return Err(Reason::FlowControlError);
                }
            }
        }
        if let Some(value) = settings.max_frame {
            self.peer_max_frame = value;
        }
        // The stream limit is for pushes, which we do not make.
        frame::settings_ack(&mut self.out);
        Ok(())
    }

    fn ping(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(Reason::ProtocolError);
        }
        let opaque: [u8; 8] = payload.try_into().map_err(|_| Reason::FrameSizeError)?;
        if head.flags & frame::ACK == 0 {
            frame::ping(&mut self.out, frame::ACK, opaque);
        } else if opaque == GRACEFUL_PING && self.closing == Closing::Announced {
            // The client has seen the first GOAWAY: what it opened until
            // now is served, nothing after.
            frame::goaway(&mut self.out, self.last_id, Reason::NoError);
            self.closing = Closing::Final(self.last_id);
        }
        Ok(())
    }

    fn window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let raw: [u8; 4] = payload.try_into().map_err(|_| Reason::FrameSizeError)?;
        let increment = i64::from(u32::from_be_bytes(raw) & 0x7fff_ffff);
        if head.stream == 0 {
            if increment == 0 {
                return Err(Reason::ProtocolError);
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(Reason::FlowControlError);
            }
            return Ok(());
        }
        let Some(i) = self.find(head.stream) else {
            return match self.idle(head.stream) {
                true => Err(Reason::ProtocolError),
                false => Ok(()),
            };
        };
        let stream = &mut self.streams[i];
        stream.send_window += increment;
        if increment == 0 {
            self.reset(head.stream, Reason::ProtocolError);
        } else if self.streams[i].send_window > frame::MAX_WINDOW {
            self.reset(head.stream, Reason::FlowControlError);
        }
        Ok(())
    }

    /// Resets a stream from our side.
    fn reset(&mut self, id: u32, reason: Reason) {
        frame::rst_stream(&mut self.out, id, reason);
        if let Some(i) = self.find(id) {
            close(&mut self.streams[i]);
        }
    }

    /// Sends the first step of a graceful GOAWAY.
    fn graceful(&mut self) {
        if !self.preface {
            // The client never spoke: no frame of ours goes before SETTINGS.
            self.error = Some(Reason::NoError);
            return;
        }
        if self.closing == Closing::Open && self.error.is_none() {
            frame::goaway(&mut self.out, frame::MAX_WINDOW as u32, Reason::NoError);
            frame::ping(&mut self.out, 0, GRACEFUL_PING);
            self.closing = Closing::Announced;
        }
    }

    /// An exchange finished: its response's head goes out, its body follows.
    fn respond(&mut self, id: u32, response: Option<Response<ProxyBody>>) {
        let Some(i) = self.find(id) else {
            return;
        };
        let stream = &mut self.streams[i];
        let Some(response) = response else {
            return;
        };
        if !matches!(stream.sending, Sending::Waiting) {
            return;
        }
        self.early_resets = self.early_resets.saturating_sub(1);
        let (parts, body) = response.into_parts();
        let end = body.is_end_stream();
        let at = frame::reserve_head(&mut self.out);
        hpack::encode_status(&mut self.out, parts.status.as_u16());
        encode_headers(&mut self.out, &parts.headers);
        frame::headers_around(&mut self.out, at, id, end, self.peer_max_frame);
        stream.sending = match end {
            true => Sending::Done,
            false => Sending::Body {
                body,
                pending: Bytes::new(),
            },
        };
    }

    /// Sends what response bodies have, as the windows allow; whether any
    /// frame was written.
    fn pump(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let max_frame = self.peer_max_frame as i64;
        for stream in &mut self.streams {
            let Sending::Body { body, pending } = &mut stream.sending else {
                continue;
            };
            loop {
                if self.out.len() >= WRITE_HIGH {
                    return progress;
                }
                if !pending.is_empty() {
                    let n = (pending.len() as i64)
                        .min(stream.send_window)
                        .min(self.send_window)
                        .min(max_frame);
                    if n <= 0 {
                        break;
                    }
                    let chunk = pending.split_to(n as usize);
                    let end = pending.is_empty() && body.is_end_stream();
                    frame::data(&mut self.out, stream.id, &chunk, end);
                    stream.send_window -= n;
                    self.send_window -= n;
                    progress = true;
                    if end {
                        stream.sending = Sending::Done;
                        break;
                    }
                    continue;
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        frame::data(&mut self.out, stream.id, &[], true);
                        stream.sending = Sending::Done;
                        progress = true;
                        break;
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // A failed body (a drain deadline's cut, an
                        // endpoint gone) cancels the stream.
                        frame::rst_stream(&mut self.out, stream.id, Reason::Cancel);
                        close(stream);
                        progress = true;
                        break;
                    }
                    Poll::Ready(Some(Ok(next))) => match next.into_data() {
                        Ok(data) => {
                            if data.is_empty() && body.is_end_stream() {
                                frame::data(&mut self.out, stream.id, &[], true);
                                stream.sending = Sending::Done;
                                progress = true;
                                break;
                            }
                            *pending = data;
                        }
                        Err(next) => {
                            if let Ok(trailers) = next.into_trailers() {
                                let at = frame::reserve_head(&mut self.out);
                                encode_headers(&mut self.out, &trailers);
                                frame::headers_around(
                                    &mut self.out,
                                    at,
                                    stream.id,
                                    true,
                                    self.peer_max_frame,
                                );
                                stream.sending = Sending::Done;
                                progress = true;
                                break;
                            }
                        }
                    },
                }
            }
        }
        progress
    }

    /// Gives the client window back for what request bodies have read.
    fn announce(&mut self) {
        if self.credit.stream_due.swap(false, Ordering::Relaxed) {
            for stream in &mut self.streams {
                let Some(inbox) = stream.inbox.as_ref().filter(|_| stream.recv_open) else {
                    continue;
                };
                let Ok(mut inbox) = inbox.lock() else {
                    continue;
                };
                if inbox.taken >= STREAM_WINDOW as usize / 2 {
                    let taken = std::mem::take(&mut inbox.taken);
                    frame::window_update(&mut self.out, stream.id, taken as u32);
                    stream.recv_window += taken as i64;
                }
            }
        }
        let taken = self.credit.taken.load(Ordering::Relaxed);
        if taken >= CONNECTION_WINDOW as usize / 2 && self.error.is_none() {
            self.credit.taken.fetch_sub(taken, Ordering::Relaxed);
            frame::window_update(&mut self.out, 0, taken as u32);
            self.recv_window += taken as i64;
        }
    }

    /// Drops the streams that are done both ways; a stream answered while
    /// the client still sends is reset with NO_ERROR (RFC 9113 §8.1).
    fn sweep(&mut self) {
        let out = &mut self.out;
        self.streams.retain_mut(|stream| {
            if !matches!(stream.sending, Sending::Done) {
                return true;
            }
            if stream.recv_open {
                frame::rst_stream(out, stream.id, Reason::NoError);
                close(stream);
            }
            false
        });
    }

    /// Writes what is gathered; ready once all of it is written.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    self.broken = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => {
                    self.broken = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > 4 * WRITE_HIGH {
            self.out = Vec::with_capacity(16 << 10);
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Whether the connection is over (called with everything written).
    fn finished(&self) -> bool {
        if self.error.is_some() {
            return true;
        }
        let draining = matches!(self.closing, Closing::Final(_)) || self.peer_goaway;
        draining && self.streams.is_empty() && self.accepted.is_empty()
    }
}

/// A stream ended early (reset by either side): its exchange cancelled,
/// its request body failed, its response body dropped.
fn close(stream: &mut Stream) {
    stream.recv_open = false;
    stream.sending = Sending::Done;
    stream.cancel.cancel();
    if let Some(Ok(mut inbox)) = stream.inbox.as_ref().map(|i| i.lock()) {
        inbox.reset = true;
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
    }
}

/// Response headers and trailers, without the fields HTTP/2 forbids.
fn encode_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if frame::connection_specific(name) {
            continue;
        }
        hpack::encode_field(out, name, value.as_bytes(), value.is_sensitive());
    }
}

/// Feeds `data` to a connection as a client's bytes after the preface, in
/// reads of `cut` bytes, and checks what the connection made of it: every
/// request is HTTP/2 with a method and a path, at most `MAX_STREAMS`
/// streams are open, no window went negative on our side, and the output
/// is whole frames. For the fuzz target `h2_frames`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_input<I: AsyncRead + AsyncWrite + Unpin>(io: I, data: &[u8], cut: usize) {
    let mut conn = Conn::new(io, Arc::new(Activity::new()));
    let mut input = frame::PREFACE.to_vec();
    input.extend_from_slice(data);
    for mut piece in input.chunks(cut.clamp(1, 4096)) {
        while !piece.is_empty() && conn.error.is_none() {
            let space = conn.input.space();
            let n = space.len().min(piece.len());
            space[..n].copy_from_slice(&piece[..n]);
            conn.input.filled(n);
            piece = &piece[n..];
            if let Err(reason) = conn.frames() {
                conn.fail(reason);
            }
        }
        if conn.error.is_some() {
            break;
        }
        conn.sweep();
        assert!(conn.streams.len() <= MAX_STREAMS, "too many streams");
        assert!(conn.recv_window >= 0, "connection window below zero");
        assert!(
            conn.streams.iter().all(|s| s.recv_window >= 0),
            "stream window below zero"
        );
    }
    for (_, request, _) in &conn.accepted {
        assert_eq!(request.version(), Version::HTTP_2);
        assert!(request.method() == Method::CONNECT || request.uri().path_and_query().is_some());
    }
    let mut out = &conn.out[..];
    while !out.is_empty() {
        let head = Head::parse(out).expect("a whole frame header");
        out = out
            .get(frame::HEADER_LEN + head.len..)
            .expect("a whole frame");
    }
}
