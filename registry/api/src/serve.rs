//! The API's connections: its own accept loop and a watchdog per connection
//! around hyper's HTTP/1.1, in place of `axum::serve`, which never closes an
//! idle or slow connection.
//!
//! Each connection is in one phase at a time, and each phase has its limit:
//! - **idle**, waiting for the first byte of a request: `idle_timeout`
//!   between requests, `header_timeout` for the first one (and for every
//!   one while tokens are configured and none was presented yet);
//! - **head**, from that byte until hyper hands the head over:
//!   `header_timeout`, then a 408 (cleartext; over TLS a plain close);
//! - **body**, while a handler waits for body bytes: the body must average
//!   `min_body_rate` bytes/s after a grace of `header_timeout`, else 408;
//! - **busy**, a handler working (a blocking query may wait minutes): no
//!   limit, except that a response write stalled `send_timeout` closes it.
//!
//! Connections are counted per listener and per client address
//! ([`Admission`]); accept failures back off ([`AcceptErrors`]).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use switchyard_catalog::{AcceptErrors, Admission, Refusal};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

mod plain;

/// The limits of one listener's connections (from `[api]`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes per second a request body must average; 0 = no minimum.
    pub min_body_rate: u64,
    pub send_timeout: Duration,
    /// Open connections on the listener; 0 = no cap.
    pub max_connections: usize,
    /// Open connections from one client address; 0 = no cap.
    pub max_connections_per_client: usize,
    /// Tokens are configured: a connection that presented none within its
    /// `header_timeout` is closed when idle.
    pub require_token: bool,
}

impl ConnectionLimits {
    /// The limits `[api]` sets (its `max_connections` already drawn from
    /// the agent's descriptor budget).
    pub fn from_config(config: &crate::config::ApiConfig, require_token: bool) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            min_body_rate: config.min_body_rate,
            send_timeout: config.send_timeout,
            max_connections: config.max_connections,
            max_connections_per_client: config.max_connections_per_client,
            require_token,
        }
    }
}

/// Why the watchdog ended a connection (the metric's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    Head,
    Idle,
    BodyRate,
    Send,
    Token,
}

impl Expired {
    const ALL: [Expired; 5] = [
        Expired::Head,
        Expired::Idle,
        Expired::BodyRate,
        Expired::Send,
        Expired::Token,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Expired::Head => "header_timeout",
            Expired::Idle => "idle_timeout",
            Expired::BodyRate => "min_body_rate",
            Expired::Send => "send_timeout",
            Expired::Token => "no_token",
        }
    }

    /// Whether a 408 may still be written: no response has begun.
    fn answers_408(self) -> bool {
        matches!(self, Expired::Head | Expired::BodyRate)
    }
}

/// The connection metrics of the API's listeners, labelled by listener.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
    closed: IntCounterVec,
    accept_errors: IntCounterVec,
}

impl ConnectionMetrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<ConnectionMetrics> {
        let open = IntGaugeVec::new(
            Opts::new(
                "switchyard_api_connections",
                "Open connections on the API's listeners.",
            ),
            &["listener"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "switchyard_api_connections_refused_total",
                "API connections refused at accept: the listener's or the client's cap.",
            ),
            &["listener", "reason"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "switchyard_api_connections_timed_out_total",
                "API connections closed at one of their time limits.",
            ),
            &["listener", "reason"],
        )?;
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_api_accept_errors_total",
                "Failed accepts on the API's listeners (out of descriptors and the like).",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        Ok(ConnectionMetrics {
            open,
            refused,
            closed,
            accept_errors,
        })
    }

    fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            open: self.open.with_label_values(&[name]),
            full: self
                .refused
                .with_label_values(&[name, Refusal::Full.as_str()]),
            client: self
                .refused
                .with_label_values(&[name, Refusal::Client.as_str()]),
            expired: Expired::ALL.map(|e| self.closed.with_label_values(&[name, e.as_str()])),
            accept_errors: self.accept_errors.with_label_values(&[name]),
        }
    }
}

struct ListenerMetrics {
    open: IntGauge,
    full: IntCounter,
    client: IntCounter,
    expired: [IntCounter; 5],
    accept_errors: IntCounter,
}

const REFUSED_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 57\r\nconnection: close\r\n\r\nthe API is at its connection limit (api.max_connections)\n";
const REFUSED_CLIENT: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 72\r\nconnection: close\r\n\r\ntoo many connections from your address (api.max_connections_per_client)\n";
const TIMED_OUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 71\r\nconnection: close\r\n\r\nthe request did not arrive in time (api.header_timeout, min_body_rate)\n";

/// Serves `router` on `listener` (HTTPS when `tls` is given) until `stop`
/// turns true; then stops accepting, lets requests in progress finish
/// (blocking queries answer at shutdown) and returns.
pub async fn serve(
    name: &str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ConnectionLimits,
    metrics: &ConnectionMetrics,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let metrics = Arc::new(metrics.listener(name));
    let admission = Admission::new();
    let mut errors = AcceptErrors::default();
    let mut connections = JoinSet::new();
    // An upgrading agent takes no connection before it is ready.
    tokio::select! {
        () = switchyard_catalog::accepts_open() => {}
        _ = stop.wait_for(|down| *down) => return Ok(()),
    }
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|down| *down) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                metrics.accept_errors.inc();
                let backoff = errors.failed(&e, std::time::Instant::now());
                if let Some(failures) = backoff.log {
                    tracing::warn!(error = %e, listener = name, failures, "API accept failing (counted in switchyard_api_accept_errors_total; next line in 10 s at most)");
                }
                if !backoff.pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.pause) => {}
                        _ = stop.wait_for(|down| *down) => break,
                    }
                }
                continue;
            }
        };
        let ticket = match admission.admit(
            peer.ip(),
            limits.max_connections,
            limits.max_connections_per_client,
        ) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                let (counter, answer) = match refusal {
                    Refusal::Full => (&metrics.full, REFUSED_FULL),
                    Refusal::Client => (&metrics.client, REFUSED_CLIENT),
                };
                counter.inc();
                if tls.is_none() {
                    let _ = stream.try_write(answer);
                }
                tracing::debug!(%peer, listener = name, reason = refusal.as_str(), "API connection refused");
                continue;
            }
        };
        let tls = tls.clone();
        let router = router.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _ticket = ticket;
            metrics.open.inc();
            connection(stream, peer, tls, router, limits, &metrics, stop).await;
            metrics.open.dec();
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ConnectionLimits,
    metrics: &ListenerMetrics,
    stop: watch::Receiver<bool>,
) {
    let raw = Raw(Arc::new(stream));
    let watch = Arc::new(Watch::new());
    match tls {
        None => {
            let socket = raw.0.clone();
            let mut stopped = stop.clone();
            // Bodiless requests are read and answered without hyper: a
            // waiting one holds no read buffer (see plain.rs).
            let served = plain::serve(&socket, &watch, &router, &limits, &mut stopped).await;
            let expired = match served {
                plain::Outcome::Closed => None,
                plain::Outcome::Expired(expired) => Some(expired),
                plain::Outcome::Hyper(read) => {
                    let io = plain::Prefixed { read, inner: raw };
                    Box::pin(drive(io, &watch, router, limits, stop)).await
                }
            };
            if let Some(expired) = expired {
                metrics.expired[expired as usize].inc();
                if expired.answers_408() {
                    let _ = socket.try_write(TIMED_OUT);
                }
            }
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(raw));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "API: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.expired[Expired::Head as usize].inc();
                    tracing::debug!(%peer, "API: TLS handshake timed out");
                    return;
                }
            };
            if let Some(expired) = Box::pin(drive(stream, &watch, router, limits, stop)).await {
                metrics.expired[expired as usize].inc();
            }
        }
    }
}

/// Runs hyper on `io` under the watchdog; `Some(limit)` when the watchdog
/// ended it.
async fn drive<IO>(
    io: IO,
    watch: &Arc<Watch>,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> Option<Expired>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let watch = watch.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let watch = watch.clone();
            let router = router.clone();
            watch.request_started(request.body().is_end_stream());
            let mut request: Request = request.map(|body| {
                Body::new(Metered {
                    inner: body,
                    watch: watch.clone(),
                })
            });
            request.extensions_mut().insert(Connection(watch.clone()));
            async move {
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| Ended {
                    inner: body,
                    watch: Some(watch),
                }))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
        TokioIo::new(Watched {
            inner: io,
            watch: watch.clone(),
        }),
        service,
    );
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = match watch.deadline(Instant::now(), &limits) {
            Ok(deadline) => deadline,
            Err(expired) => return Some(expired),
        };
        let changed = watch.changed.notified();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "API connection ended");
                }
                return None;
            }
            _ = sleep => {}
            _ = changed => {}
            _ = stop.wait_for(|down| *down), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Marks a request whose connection presented a valid token (set by the
/// authorization layer through the request's extensions).
#[derive(Clone)]
pub struct Connection(Arc<Watch>);

impl Connection {
    pub fn authenticated(&self) {
        self.0.authenticated.store(true, Ordering::Relaxed);
    }
}

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BODY: u8 = 2;
const BUSY: u8 = 3;
const NEVER: u64 = u64::MAX;

/// One connection's phase and progress, written by its I/O and bodies and
/// read by its watchdog. Times are milliseconds since `start`.
struct Watch {
    start: Instant,
    phase: AtomicU8,
    since: AtomicU64,
    served: AtomicBool,
    body_bytes: AtomicU64,
    body_waiting: AtomicBool,
    write_stalled: AtomicU64,
    authenticated: AtomicBool,
    changed: Notify,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            start: Instant::now(),
            phase: AtomicU8::new(IDLE),
            since: AtomicU64::new(0),
            served: AtomicBool::new(false),
            body_bytes: AtomicU64::new(0),
            body_waiting: AtomicBool::new(false),
            write_stalled: AtomicU64::new(NEVER),
            authenticated: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn enter(&self, phase: u8) {
        self.since.store(self.now(), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn read_some(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.enter(HEAD);
        }
    }

    fn request_started(&self, bodiless: bool) {
        self.served.store(true, Ordering::Relaxed);
        self.body_bytes.store(0, Ordering::Relaxed);
        self.body_waiting.store(false, Ordering::Relaxed);
        self.enter(if bodiless { BUSY } else { BODY });
    }

    fn body_ended(&self) {
        if self.phase.load(Ordering::Relaxed) == BODY {
            self.enter(BUSY);
        }
    }

    fn response_ended(&self) {
        if self.phase.load(Ordering::Relaxed) != IDLE {
            self.enter(IDLE);
        }
    }

    fn body_waiting(&self, waiting: bool) {
        let was = self.body_waiting.swap(waiting, Ordering::Relaxed);
        if waiting && !was {
            self.changed.notify_one();
        }
    }

    fn write_stalled(&self, stalled: bool) {
        if stalled {
            if self.write_stalled.load(Ordering::Relaxed) == NEVER {
                self.write_stalled.store(self.now(), Ordering::Relaxed);
                self.changed.notify_one();
            }
        } else {
            self.write_stalled.store(NEVER, Ordering::Relaxed);
        }
    }

    /// When the watchdog must look again (`None`: only on a change), or
    /// the limit that has passed.
    fn deadline(
        &self,
        now: Instant,
        limits: &ConnectionLimits,
    ) -> Result<Option<Instant>, Expired> {
        let ms = |d: Duration| d.as_millis() as u64;
        let elapsed = now.duration_since(self.start).as_millis() as u64;
        let since = self.since.load(Ordering::Relaxed);
        let mut earliest: Option<(u64, Expired)> = None;
        let mut limit = |at: u64, why: Expired| {
            if earliest.is_none_or(|(e, _)| at < e) {
                earliest = Some((at, why));
            }
        };
        let stalled = self.write_stalled.load(Ordering::Relaxed);
        if stalled != NEVER {
            limit(
                stalled.saturating_add(ms(limits.send_timeout)),
                Expired::Send,
            );
        }
        match self.phase.load(Ordering::Relaxed) {
            IDLE => {
                if !self.served.load(Ordering::Relaxed) {
                    limit(ms(limits.header_timeout), Expired::Head);
                } else {
                    limit(since + ms(limits.idle_timeout), Expired::Idle);
                }
                if limits.require_token && !self.authenticated.load(Ordering::Relaxed) {
                    limit(ms(limits.header_timeout), Expired::Token);
                }
            }
            HEAD => limit(since + ms(limits.header_timeout), Expired::Head),
            BODY if limits.min_body_rate > 0 && self.body_waiting.load(Ordering::Relaxed) => {
                let bytes = self.body_bytes.load(Ordering::Relaxed);
                let earned = bytes.saturating_mul(1000) / limits.min_body_rate;
                limit(
                    since + ms(limits.header_timeout) + earned,
                    Expired::BodyRate,
                );
            }
            _ => {}
        }
        match earliest {
            Some((at, why)) if at <= elapsed => Err(why),
            Some((at, _)) => Ok(Some(self.start + Duration::from_millis(at))),
            None => Ok(None),
        }
    }
}

/// The socket, shared so a 408 can be written after hyper let go of it.
struct Raw(Arc<TcpStream>);

impl AsyncRead for Raw {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // Only what has arrived is zeroed and read: hyper's 8 KiB read
            // buffer stays untouched (out of the RSS) past a request's
            // bytes, which matters with thousands of waiting connections.
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let arrived = rustix::io::ioctl_fionread(&*self.0).unwrap_or(0) as usize;
            let want = arrived.clamp(1, buf.remaining());
            match self.0.try_read(buf.initialize_unfilled_to(want)) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Raw {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = rustix::net::shutdown(&*self.0, rustix::net::Shutdown::Write);
        Poll::Ready(shut.map_err(io::Error::from))
    }
}

/// The connection's stream, telling its watch when a request's first bytes
/// arrive and when a write stalls.
struct Watched<IO> {
    inner: IO,
    watch: Arc<Watch>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.watch.read_some();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.write_stalled(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch.write_stalled(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch.write_stalled(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body, counting its bytes and its waits for the watchdog.
struct Metered {
    inner: Incoming,
    watch: Arc<Watch>,
}

impl hyper::body::Body for Metered {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.watch.body_waiting(polled.is_pending());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.watch
                        .body_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.watch.body_ended();
                }
            }
            Poll::Ready(_) => self.watch.body_ended(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body, telling the watch when the response is done (ended or
/// dropped by hyper): the connection is idle from then.
struct Ended {
    inner: Body,
    watch: Option<Arc<Watch>>,
}

impl Ended {
    fn end(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.response_ended();
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.end();
    }
}

impl hyper::body::Body for Ended {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            min_body_rate: 1000,
            send_timeout: Duration::from_secs(30),
            max_connections: 0,
            max_connections_per_client: 0,
            require_token: false,
        }
    }

    fn at(watch: &Watch, ms: u64) -> Instant {
        watch.start + Duration::from_millis(ms)
    }

    #[test]
    fn the_answers_written_raw_declare_their_length() {
        for answer in [REFUSED_FULL, REFUSED_CLIENT, TIMED_OUT] {
            let text = std::str::from_utf8(answer).expect("ASCII");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head");
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse().ok())
                .expect("content-length");
            assert_eq!(declared, body.len(), "{head}");
        }
    }

    #[test]
    fn each_phase_has_its_limit() {
        let l = limits();
        let w = Watch::new();
        // A new connection: its first head within header_timeout.
        assert_eq!(w.deadline(at(&w, 0), &l), Ok(Some(at(&w, 10_000))));
        assert_eq!(w.deadline(at(&w, 10_000), &l), Err(Expired::Head));
        // A request in a handler (a blocking query): no limit.
        w.request_started(true);
        assert_eq!(w.deadline(at(&w, 500_000), &l), Ok(None));
        // ...unless its response stalls.
        w.write_stalled(true);
        let stalled = w.write_stalled.load(Ordering::Relaxed);
        assert_eq!(w.deadline(at(&w, stalled + 30_000), &l), Err(Expired::Send));
        w.write_stalled(false);
        // Between requests: idle_timeout from the response's end.
        w.response_ended();
        let idle = w.since.load(Ordering::Relaxed);
        assert_eq!(
            w.deadline(at(&w, idle), &l),
            Ok(Some(at(&w, idle + 60_000)))
        );
        // A body: the grace, then min_body_rate.
        w.request_started(false);
        let body = w.since.load(Ordering::Relaxed);
        assert_eq!(
            w.deadline(at(&w, body + 60_000), &l),
            Ok(None),
            "not waiting"
        );
        w.body_waiting(true);
        w.body_bytes.store(5_000, Ordering::Relaxed);
        assert_eq!(
            w.deadline(at(&w, body), &l),
            Ok(Some(at(&w, body + 15_000)))
        );
        assert_eq!(
            w.deadline(at(&w, body + 15_000), &l),
            Err(Expired::BodyRate)
        );
    }

    #[test]
    fn without_a_token_the_connection_gets_only_its_first_head_time() {
        let l = ConnectionLimits {
            require_token: true,
            ..limits()
        };
        let w = Watch::new();
        w.request_started(true);
        w.response_ended();
        assert_eq!(w.deadline(at(&w, 10_000), &l), Err(Expired::Token));
        let w = Arc::new(Watch::new());
        w.request_started(true);
        Connection(w.clone()).authenticated();
        w.response_ended();
        let idle = w.since.load(Ordering::Relaxed);
        assert_eq!(
            w.deadline(at(&w, 10_000.max(idle)), &l),
            Ok(Some(at(&w, idle + 60_000)))
        );
    }
}
