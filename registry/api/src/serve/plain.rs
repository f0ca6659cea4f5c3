//! Plain API connections read by our own HTTP/1.1 head reader while their
//! requests carry no body: the reads, every blocking query among them.
//!
//! Under hyper a request keeps its connection's 8 KiB read buffer and
//! hyper's connection state for as long as its handler runs, which for a
//! blocking query is minutes. Here the head's bytes are parsed and let go
//! before the handler runs, so a waiting request holds only its parsed head
//! and its handler's future.
//!
//! The first request this reader does not take (one with a body, HTTP/1.0,
//! `Expect`, `Upgrade`, a head over [`MAX_HEAD`] or one httparse refuses)
//! hands the connection to hyper for the rest of its life, with the bytes
//! read so far in front, and hyper answers it as it always did (a 400 or
//! 431 for the malformed).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::Response;
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceExt;

use super::{Connection, ConnectionLimits, Expired, Raw, Watch};

/// The longest head read here; a longer one goes to hyper (which answers
/// 431 past its own limit).
const MAX_HEAD: usize = 16 * 1024;
/// Header fields read here; more go to hyper.
const MAX_HEADERS: usize = 64;

/// How the connection left this reader.
pub(super) enum Outcome {
    /// Done: the client left or asked to close, or the agent stops.
    Closed,
    /// A time limit passed.
    Expired(Expired),
    /// hyper serves the rest, starting with these bytes already read.
    Hyper(Bytes),
}

/// Serves `socket`'s requests until one needs hyper or the connection ends.
pub(super) async fn serve(
    socket: &TcpStream,
    watch: &Arc<Watch>,
    router: &Router,
    limits: &ConnectionLimits,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    // Bytes read and not yet parsed: empty (unallocated) while a request
    // waits, unless the client pipelined.
    let mut read = BytesMut::new();
    loop {
        if read.is_empty() {
            if let Err(outcome) = idle(socket, watch, limits, stop).await {
                return outcome;
            }
        }
        watch.read_some();
        let head = match head(socket, &mut read, watch, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return Outcome::Hyper(read.freeze()),
            Err(outcome) => return outcome,
        };
        if read.is_empty() {
            read = BytesMut::new();
        }
        let Head {
            mut request,
            close,
            head_only,
        } = head;
        request.extensions_mut().insert(Connection(watch.clone()));
        watch.request_started(true);
        let response = tokio::select! {
            response = router.clone().oneshot(request) => match response {
                Ok(response) => response,
                Err(never) => match never {},
            },
            // A client that goes away lets go of its waiting query at once.
            () = gone(socket) => return Outcome::Closed,
        };
        let close = close || asks_close(response.headers()) || *stop.borrow();
        if let Err(outcome) = respond(socket, response, head_only, close, limits, watch).await {
            return outcome;
        }
        watch.response_ended();
        if close {
            let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Write);
            return Outcome::Closed;
        }
    }
}

/// Waits for a request's first byte, within the idle phase's limits.
async fn idle(
    socket: &TcpStream,
    watch: &Watch,
    limits: &ConnectionLimits,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Outcome> {
    let mut first = [0u8; 1];
    loop {
        let deadline = watch
            .deadline(Instant::now(), limits)
            .map_err(Outcome::Expired)?;
        tokio::select! {
            // A peek, not `readable()`: readiness of a fresh socket may be
            // reported before any byte is there.
            peeked = socket.peek(&mut first) => return match peeked {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(Outcome::Closed),
            },
            () = until(deadline) => {}
            _ = stop.wait_for(|down| *down) => return Err(Outcome::Closed),
        }
    }
}

/// Reads until `read` holds a whole head: `Some` when it is one this
/// reader serves (its bytes taken out of `read`), `None` for hyper.
async fn head(
    socket: &TcpStream,
    read: &mut BytesMut,
    watch: &Watch,
    limits: &ConnectionLimits,
) -> Result<Option<Head>, Outcome> {
    loop {
        match parse(read) {
            Parsed::Complete(head, len) => {
                read.advance(len);
                return Ok(Some(head));
            }
            Parsed::Other => return Ok(None),
            Parsed::Partial if read.len() >= MAX_HEAD => return Ok(None),
            Parsed::Partial => {}
        }
        let deadline = watch
            .deadline(Instant::now(), limits)
            .map_err(Outcome::Expired)?;
        tokio::select! {
            ready = socket.readable() => {
                if ready.is_err() {
                    return Err(Outcome::Closed);
                }
            }
            () = until(deadline) => continue,
        }
        let arrived = rustix::io::ioctl_fionread(socket).unwrap_or(0) as usize;
        read.reserve(arrived.clamp(1, MAX_HEAD));
        match socket.try_read_buf(read) {
            Ok(0) => return Err(Outcome::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Outcome::Closed),
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Returns when the client closed its side (or the socket failed); never
/// when it sends more (a pipelined request waits its turn).
async fn gone(socket: &TcpStream) {
    let mut next = [0u8; 1];
    match socket.peek(&mut next).await {
        Ok(n) if n > 0 => std::future::pending().await,
        _ => {}
    }
}

/// A head this reader serves.
struct Head {
    request: Request,
    /// The client asked to close after this response.
    close: bool,
    /// HEAD: the response's fields without its body.
    head_only: bool,
}

// Returned once per head and taken apart at once: boxing would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Partial,
    Complete(Head, usize),
    /// Not ours: hyper's to answer.
    Other,
}

/// Parses an HTTP/1.1 head without a body; anything else is `Other`.
fn parse(bytes: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if parsed.version != Some(1) {
        return Parsed::Other;
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Parsed::Other;
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), Uri::try_from(path)) else {
        return Parsed::Other;
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Other;
        };
        let bodiless = match name {
            TRANSFER_ENCODING | EXPECT | UPGRADE => false,
            CONTENT_LENGTH => field.value == b"0",
            _ => true,
        };
        let Ok(value) = HeaderValue::from_bytes(field.value) else {
            return Parsed::Other;
        };
        if !bodiless {
            return Parsed::Other;
        }
        headers.append(name, value);
    }
    let close = asks_close(&headers);
    let head_only = method == Method::HEAD;
    let mut request = Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Complete(
        Head {
            request,
            close,
            head_only,
        },
        len,
    )
}

/// A `Connection` field with the `close` option.
fn asks_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Writes `response`: `content-length` when its body's size is known,
/// chunked when not, no body for HEAD, 1xx, 204 and 304.
async fn respond(
    socket: &TcpStream,
    response: Response,
    head_only: bool,
    close: bool,
    limits: &ConnectionLimits,
    watch: &Watch,
) -> Result<(), Outcome> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        None
    } else {
        body.size_hint().exact()
    };
    let chunked = !bodiless && length.is_none();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // The framing is ours to write (a HEAD answer keeps the length the
        // body would have had).
        let framing = name == CONTENT_LENGTH || name == TRANSFER_ENCODING;
        if name == CONNECTION || (framing && !head_only) {
            continue;
        }
        field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(DATE) {
        field(
            &mut head,
            b"date",
            httpdate::fmt_http_date(SystemTime::now()).as_bytes(),
        );
    }
    if let Some(length) = length {
        field(&mut head, b"content-length", length.to_string().as_bytes());
    }
    if chunked {
        field(&mut head, b"transfer-encoding", b"chunked");
    }
    if close {
        field(&mut head, b"connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    let mut head = Some(head);
    if !bodiless {
        while let Some(frame) = body.frame().await {
            // A body that fails cannot be finished: the client sees the
            // connection close short of the declared length.
            let frame = frame.map_err(|_| Outcome::Closed)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let first = head.take().unwrap_or_default();
            if chunked {
                let size = format!("{:x}\r\n", data.len());
                let mut bufs = [
                    IoSlice::new(&first),
                    IoSlice::new(size.as_bytes()),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ];
                write_all(socket, &mut bufs, limits, watch).await?;
            } else {
                let mut bufs = [IoSlice::new(&first), IoSlice::new(&data)];
                write_all(socket, &mut bufs, limits, watch).await?;
            }
        }
    }
    let first = head.take().unwrap_or_default();
    let end: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
    write_all(
        socket,
        &mut [IoSlice::new(&first), IoSlice::new(end)],
        limits,
        watch,
    )
    .await
}

fn field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Writes all of `bufs`; a write that cannot go on for `send_timeout`
/// ends the connection.
async fn write_all(
    socket: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    limits: &ConnectionLimits,
    watch: &Watch,
) -> Result<(), Outcome> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match socket.try_write_vectored(bufs) {
            Ok(0) => return Err(Outcome::Closed),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                watch.write_stalled(true);
                match tokio::time::timeout(limits.send_timeout, socket.writable()).await {
                    Ok(Ok(())) => watch.write_stalled(false),
                    Ok(Err(_)) => return Err(Outcome::Closed),
                    Err(_) => return Err(Outcome::Expired(Expired::Send)),
                }
            }
            Err(_) => return Err(Outcome::Closed),
        }
    }
    Ok(())
}

/// The socket with the bytes this reader already took from it in front:
/// what hyper reads when it takes the connection over.
pub(super) struct Prefixed {
    pub(super) read: Bytes,
    pub(super) inner: Raw,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Option<Head> {
        match parse(head.as_bytes()) {
            Parsed::Complete(parsed, len) => {
                assert_eq!(len, head.len(), "{head:?}");
                Some(parsed)
            }
            Parsed::Partial => panic!("partial: {head:?}"),
            Parsed::Other => None,
        }
    }

    #[test]
    fn bodiless_requests_are_read_here() {
        let head = parsed("GET /v1/health/service/web?index=7&wait=1s HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
            .expect("ours");
        assert_eq!(head.request.method(), Method::GET);
        assert_eq!(
            head.request.uri().query(),
            Some("index=7&wait=1s"),
            "the query is kept"
        );
        assert_eq!(head.request.headers()["accept-encoding"], "gzip");
        assert!(!head.close && !head.head_only);
        let head = parsed("PUT /v1/agent/service/deregister/x HTTP/1.1\r\nContent-Length: 0\r\nConnection: keep-alive, Close\r\n\r\n")
            .expect("an empty PUT is ours");
        assert!(head.close, "close among the connection's options");
        assert!(parsed("HEAD / HTTP/1.1\r\n\r\n").expect("ours").head_only);
    }

    #[test]
    fn anything_else_goes_to_hyper() {
        for head in [
            "PUT /v1/catalog/register HTTP/1.1\r\nContent-Length: 12\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /x HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /x HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GE\x01T /x HTTP/1.1\r\n\r\n",
        ] {
            assert!(parsed(head).is_none(), "{head:?} is hyper's");
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect();
        assert!(parsed(&format!("GET / HTTP/1.1\r\n{many}\r\n")).is_none());
    }

    #[test]
    fn a_head_in_pieces_is_partial_and_its_length_excludes_what_follows() {
        assert!(matches!(
            parse(b"GET /v1/status HTTP/1.1\r\nHo"),
            Parsed::Partial
        ));
        let two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        match parse(two) {
            Parsed::Complete(head, len) => {
                assert_eq!(head.request.uri().path(), "/a");
                assert_eq!(&two[len..], b"GET /b HTTP/1.1\r\n\r\n");
            }
            _ => panic!("complete"),
        }
    }
}
