//! HTTP/1.1 to the endpoints for the requests of HTTP/2 and TLS clients
//! (`h2_tls.rs`; the cleartext HTTP/1.1 path has its own in `conn.rs`).
//!
//! Each proxy thread keeps its idle connections per endpoint (and upstream
//! TLS setup) in a thread-local pool. A request takes one (or connects),
//! writes its head and body, reads the response head, and the response body
//! gives the connection back once read to its end. No task, channel or lock
//! per request: hyper's pooled client, which this replaces, cost more than
//! the rest of the HTTP/2 path (bench/RESULTS.md, W-h2).
//!
//! A pooled connection the endpoint has closed meanwhile fails before any
//! response byte: a request whose body can be sent again then goes once more
//! on another connection (no failure of the endpoint's). An idle connection
//! is checked before use without a syscall when the socket has had no event
//! since its last read.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::h2_tls::BoxError;
use crate::upstream_h2::{Failure, Outgoing};
use crate::upstream_tls::{Alpn, Failures, Io, UpstreamTls};
use crate::wire::{self, Chunks, Framing, HeadError, Line};

/// Longest a connection is kept idle.
const IDLE_KEEP: Duration = Duration::from_secs(30);
/// How often a thread's pool is swept of connections idle too long.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A read's room in a connection's buffer.
const READ_SIZE: usize = 16 * 1024;
/// A body in hand up to this size goes in the head's write.
const WRITE_TOGETHER: usize = 16 * 1024;

/// Where a request goes, and the limits it keeps.
pub(crate) struct Target<'a> {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<(&'a Arc<UpstreamTls>, &'a Failures)>,
    pub(crate) connect_timeout: Duration,
    /// Most idle connections kept per endpoint and thread.
    pub(crate) keep: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    /// The TLS setup's id; 0 for cleartext.
    tls: u64,
}

struct Idle {
    io: Io,
    since: Instant,
}

struct Pool {
    idle: foldhash::HashMap<Key, Vec<Idle>>,
    swept: Instant,
}

thread_local! {
    /// This thread's idle connections, by endpoint.
    static POOL: RefCell<Option<Pool>> = const { RefCell::new(None) };
}

/// An idle connection to `key` that is still open, if the thread has one.
fn take(key: Key) -> Option<Io> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let pool = pool.as_mut()?;
        let idle = pool.idle.get_mut(&key)?;
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < IDLE_KEEP && alive(&conn.io) {
                return Some(conn.io);
            }
        }
        None
    })
}

/// Keeps `io` for the next request to `key` (up to `keep` per endpoint);
/// connections idle too long leave every so often.
fn give(key: Key, io: Io, keep: usize) {
    let _ = POOL.try_with(|pool| {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return;
        };
        let now = Instant::now();
        let pool = pool.get_or_insert_with(|| Pool {
            idle: Default::default(),
            swept: now,
        });
        if now.duration_since(pool.swept) >= SWEEP_EVERY {
            pool.swept = now;
            pool.idle.retain(|_, idle| {
                idle.retain(|conn| now.duration_since(conn.since) < IDLE_KEEP);
                !idle.is_empty()
            });
        }
        let idle = pool.idle.entry(key).or_default();
        if idle.len() < keep {
            idle.push(Idle { io, since: now });
        }
    });
}

/// Whether an idle connection is still open: the endpoint has sent nothing
/// (no FIN, no stray byte). No syscall when its socket has had no event
/// since the last read.
fn alive(io: &Io) -> bool {
    let tcp = io.tcp();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match tcp.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => crate::io::silent(std::os::fd::AsFd::as_fd(tcp)),
    }
}

/// Writes the head of an HTTP/1.1 request into `out`: the request line,
/// `headers` (already this hop's: no hop-by-hop ones), then the framing of
/// `body`: its length when known, else chunked (then true).
pub(crate) fn request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: &Outgoing,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = None;
    for (name, value) in headers {
        if name == hyper::header::CONTENT_LENGTH {
            declared = declared.or(Some(value));
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut length = |n: &[u8]| {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n);
        out.extend_from_slice(b"\r\n");
    };
    match body {
        Outgoing::Whole(bytes) => {
            let _ = write!(out, "content-length: {}\r\n", bytes.len());
        }
        Outgoing::Empty => {
            let sends_body =
                *method == Method::POST || *method == Method::PUT || *method == Method::PATCH;
            if declared.is_some() || sends_body {
                length(b"0");
            }
        }
        Outgoing::Stream(_) => match declared {
            Some(n) => length(n.as_bytes()),
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                return true;
            }
        },
    }
    out.extend_from_slice(b"\r\n");
    false
}

/// How an attempt on one connection failed.
enum Attempt {
    /// Before any response byte, on a connection that may have been closed
    /// by the endpoint while idle.
    Stale(BoxError),
    Failed(Failure),
}

/// Sends `head` and `body` to `target` over HTTP/1.1 and reads the
/// response head. `chunked`: the head says the body goes in chunks
/// (`request_head`); `is_head`: a HEAD request (its response has no body).
pub(crate) async fn send(
    target: &Target<'_>,
    head: &[u8],
    body: Outgoing,
    chunked: bool,
    is_head: bool,
) -> Result<Response<Incoming>, Failure> {
    let key = Key {
        addr: target.addr,
        tls: target.tls.map_or(0, |(tls, _)| tls.id),
    };
    let mut body = Some(body);
    loop {
        let Some(this) = body.take() else {
            return Err(Failure::Broken("the request body is spent".into()));
        };
        // The body again, should this connection turn out stale.
        body = match &this {
            Outgoing::Stream(_) => None,
            Outgoing::Empty => Some(Outgoing::Empty),
            Outgoing::Whole(bytes) => Some(Outgoing::Whole(bytes.clone())),
        };
        let (io, reused) = match take(key) {
            Some(io) => (io, true),
            None => (connect(target).await?, false),
        };
        match attempt(io, head, this, chunked, is_head, target, key).await {
            Ok(response) => return Ok(response),
            Err(Attempt::Stale(e)) if reused && body.is_some() => {
                tracing::debug!(endpoint = %target.addr, error = %e, "a pooled upstream connection was closed: the request goes on another");
            }
            Err(Attempt::Stale(e)) => return Err(Failure::Broken(e)),
            Err(Attempt::Failed(failure)) => return Err(failure),
        }
    }
}

/// A new connection to `target`, within its connect timeout.
async fn connect(target: &Target<'_>) -> Result<Io, Failure> {
    let addr = target.addr;
    let tls = target.tls.map(|(tls, failures)| (&**tls, failures));
    let connecting = Io::connect(addr, tls, Alpn::Http1);
    match tokio::time::timeout(target.connect_timeout, connecting).await {
        Ok(Ok(io)) => Ok(io),
        Ok(Err(e)) => Err(Failure::Connect(e)),
        Err(_) => Err(Failure::Connect(
            format!(
                "connect to {addr} timed out after {:?}",
                target.connect_timeout
            )
            .into(),
        )),
    }
}

/// One try on one connection: the request written, the response head read.
async fn attempt(
    mut io: Io,
    head: &[u8],
    body: Outgoing,
    chunked: bool,
    is_head: bool,
    target: &Target<'_>,
    key: Key,
) -> Result<Response<Incoming>, Attempt> {
    let written = match body {
        Outgoing::Empty => io.write_all(head).await,
        Outgoing::Whole(bytes) if bytes.len() <= WRITE_TOGETHER => {
            let mut both = Vec::with_capacity(head.len() + bytes.len());
            both.extend_from_slice(head);
            both.extend_from_slice(&bytes);
            io.write_all(&both).await
        }
        Outgoing::Whole(bytes) => match io.write_all(head).await {
            Ok(()) => io.write_all(&bytes).await,
            Err(e) => Err(e),
        },
        Outgoing::Stream(body) => match io.write_all(head).await {
            Ok(()) => {
                if let Err(e) = stream_body(&mut io, body, chunked).await {
                    return Err(Attempt::Failed(Failure::Broken(e)));
                }
                Ok(())
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = written.and(io.flush().await) {
        return Err(Attempt::Stale(e.into()));
    }
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        if buf.len() >= target.max_header_bytes {
            return Err(Attempt::Failed(Failure::Broken(
                "the response head is too large".into(),
            )));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_SIZE);
        }
        match io.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(Attempt::Stale("closed before a response".into()))
            }
            Err(e) if buf.is_empty() => return Err(Attempt::Stale(e.into())),
            Ok(0) => {
                return Err(Attempt::Failed(Failure::Broken(
                    "closed within the response head".into(),
                )))
            }
            Err(e) => return Err(Attempt::Failed(Failure::Broken(e.into()))),
            Ok(_) => {}
        }
        // Interim responses (100 Continue, 103) are passed over.
        loop {
            let mut headers = HeaderMap::new();
            let parsed = wire::read_response(
                &buf,
                target.max_header_bytes,
                target.max_headers,
                is_head,
                |line| {
                    if let Line::Field(name, value) = line {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(name.as_bytes()),
                            HeaderValue::from_bytes(value),
                        ) {
                            headers.append(name, value);
                        }
                    }
                },
            );
            let head = match parsed {
                Ok(head) => head,
                Err(HeadError::Partial) => break,
                Err(HeadError::TooLarge) => {
                    return Err(Attempt::Failed(Failure::Broken(
                        "the response head is too large".into(),
                    )))
                }
                Err(HeadError::Bad(why)) => {
                    return Err(Attempt::Failed(Failure::Broken(
                        format!("bad response head: {why}").into(),
                    )))
                }
            };
            buf.advance(head.head_len);
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            let Ok(status) = StatusCode::from_u16(head.status) else {
                return Err(Attempt::Failed(Failure::Broken(
                    "bad response status".into(),
                )));
            };
            let left = match head.framing {
                _ if head.status == 101 => Left::Upgraded,
                Framing::None => Left::Done,
                Framing::Length(n) => Left::Length(n),
                Framing::Chunked => Left::Chunked(Chunks::default()),
                Framing::Close => Left::Close,
            };
            let mut incoming = Incoming {
                io: Some(io),
                buf,
                left,
                reusable: head.reusable,
                key,
                keep: target.keep,
            };
            if matches!(incoming.left, Left::Done) {
                incoming.finish();
            }
            let mut response = Response::new(incoming);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return Ok(response);
        }
    }
}

/// Writes a body still arriving: as it is when the head declared its
/// length, else in chunks.
async fn stream_body(
    io: &mut Io,
    body: crate::h2_tls::ProxyBody,
    chunked: bool,
) -> Result<(), BoxError> {
    let mut body = std::pin::pin!(body);
    let mut size = Vec::with_capacity(20);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            // Trailers: HTTP/1.1 requests carry none upstream.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            size.clear();
            let _ = write!(size, "{:x}\r\n", data.len());
            io.write_all(&size).await?;
            io.write_all(&data).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// What is left of a response body.
enum Left {
    Done,
    Length(u64),
    Chunked(Chunks),
    /// Until the endpoint closes.
    Close,
    /// A 101: the connection is the caller's (`Incoming::upgraded`).
    Upgraded,
}

/// A response body from an endpoint, read off its connection, which goes
/// back to the thread's pool once the body has been read to its end (and
/// is closed when the body is dropped before).
pub(crate) struct Incoming {
    io: Option<Io>,
    /// Read but not yet given out.
    buf: BytesMut,
    left: Left,
    reusable: bool,
    key: Key,
    keep: usize,
}

impl Incoming {
    /// The body ended: the connection goes back to the pool when it can
    /// carry another request (nothing of another response read already).
    fn finish(&mut self) {
        self.left = Left::Done;
        if let Some(io) = self.io.take() {
            if self.reusable && self.buf.is_empty() {
                give(self.key, io, self.keep);
            }
        }
    }

    /// After a 101: the connection, and what the endpoint sent after the
    /// head.
    pub(crate) fn upgraded(mut self) -> Option<(Io, Bytes)> {
        match self.left {
            Left::Upgraded => Some((self.io.take()?, self.buf.split().freeze())),
            _ => None,
        }
    }
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                match &mut this.left {
                    Left::Done | Left::Upgraded => return Poll::Ready(None),
                    Left::Length(n) => {
                        let take = usize::try_from(*n)
                            .unwrap_or(usize::MAX)
                            .min(this.buf.len());
                        let data = this.buf.split_to(take).freeze();
                        *n -= take as u64;
                        if *n == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Left::Chunked(chunks) => {
                        let piece = match chunks.decode(&this.buf) {
                            Ok(piece) => piece,
                            Err(why) => {
                                this.io = None;
                                return Poll::Ready(Some(Err(format!(
                                    "bad chunked response body: {why}"
                                )
                                .into())));
                            }
                        };
                        this.buf.advance(piece.framing);
                        if piece.data > 0 {
                            let data = this.buf.split_to(piece.data).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        if piece.done {
                            this.finish();
                            return Poll::Ready(None);
                        }
                    }
                    Left::Close => {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            if matches!(this.left, Left::Done | Left::Upgraded) {
                return Poll::Ready(None);
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(None);
            };
            if this.buf.capacity() - this.buf.len() < READ_SIZE / 4 {
                this.buf.reserve(READ_SIZE);
            }
            match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.io = None;
                    if matches!(this.left, Left::Close) {
                        this.left = Left::Done;
                        return Poll::Ready(None);
                    }
                    this.left = Left::Done;
                    return Poll::Ready(Some(Err(
                        "the endpoint closed the connection within the response body".into(),
                    )));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.io = None;
                    this.left = Left::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done | Left::Upgraded)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Done | Left::Upgraded => SizeHint::with_exact(0),
            Left::Length(n) => SizeHint::with_exact(n),
            Left::Chunked(_) | Left::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head carries this hop's headers and the body's framing: the
    /// length of a body in hand (whatever the client declared), the
    /// client's length for a streamed body, else chunked.
    #[test]
    fn request_heads_frame_the_body() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("web:8080"));
        headers.insert("content-length", HeaderValue::from_static("99"));
        let mut out = Vec::new();
        request_head(
            &Method::POST,
            "/a?b",
            &headers,
            &Outgoing::Whole(Bytes::from_static(b"hello")),
            &mut out,
        );
        assert_eq!(
            out,
            b"POST /a?b HTTP/1.1\r\nhost: web:8080\r\ncontent-length: 5\r\n\r\n"
        );
        let stream = || Outgoing::Stream(crate::h2_tls::empty());
        request_head(&Method::PUT, "/", &headers, &stream(), &mut out);
        assert!(out.ends_with(b"content-length: 99\r\n\r\n"));
        headers.remove("content-length");
        request_head(&Method::PUT, "/", &headers, &stream(), &mut out);
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        request_head(&Method::GET, "/", &headers, &Outgoing::Empty, &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: web:8080\r\n\r\n");
        request_head(&Method::POST, "/", &headers, &Outgoing::Empty, &mut out);
        assert!(out.ends_with(b"content-length: 0\r\n\r\n"));
    }
}
