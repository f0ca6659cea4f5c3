//! The connections hyper serves: HTTP/2 in cleartext with prior knowledge (a
//! connection that opens with the HTTP/2 preface is handed here by the
//! HTTP/1.1 path) and every TLS connection, HTTP/2 or HTTP/1.1 as ALPN chose
//! (handed here by `tls.rs`).
//! Requests are routed, balanced, counted and retried like HTTP/1.1 ones and
//! sent upstream over HTTP/1.1 by this thread's own pool (`upstream_h1`), or
//! over HTTP/2 (`upstream_h2`) for gRPC calls and HTTP/2 routes.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use switchyard_catalog::{ExtraKey, Snapshot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::access;
use crate::attempts::{Attempts, Ending, Grpc, Replay, Verdict as Judgement};
use crate::backend::{ProxyDecorator, ProxyService};
use crate::conn::Pace;
use crate::failover::Reach;
use crate::grace::FIRST_REQUEST_GRACE;
use crate::grpc_web;
use crate::limit::Limited;
use crate::metrics::Reject;
use crate::policy::Ruling;
use crate::shared::Shared;
use crate::stats::{now_ns, EndpointStats};
use crate::upstream_h1;
use crate::upstream_h2::{self, Failure, Outgoing};
use crate::wire;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

/// The exchanges in progress on one connection, for its idle limits: with
/// none, the connection gets `header_timeout` for its first request and
/// `idle_timeout` between later ones (then a GOAWAY on HTTP/2); on HTTP/1.1
/// a head that has begun ([`Heads`]) gets `header_timeout` from its first
/// byte (hyper's own header timeout runs from the end of the last response,
/// so it would cut idle keep-alive connections at `header_timeout`).
pub(crate) struct Activity {
    start: std::time::Instant,
    open: std::sync::atomic::AtomicUsize,
    /// Milliseconds from `start` to the moment `open` last fell to zero.
    idle_since: std::sync::atomic::AtomicU64,
    /// Milliseconds from `start` to the first byte of a head not yet
    /// answered (HTTP/1.1); `NO_HEAD` when none.
    head_since: std::sync::atomic::AtomicU64,
    served: std::sync::atomic::AtomicBool,
    quiet: Notify,
}

const NO_HEAD: u64 = u64::MAX;

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: std::time::Instant::now(),
            open: Default::default(),
            idle_since: Default::default(),
            head_since: std::sync::atomic::AtomicU64::new(NO_HEAD),
            served: Default::default(),
            quiet: Notify::new(),
        }
    }

    /// Resolves once the connection has been idle, or in a head, past its
    /// limit.
    pub(crate) async fn idle(&self, first: Duration, between: Duration) {
        loop {
            let quiet = self.quiet.notified();
            if self.open.load(Relaxed) > 0 {
                quiet.await;
                continue;
            }
            let head = self.head_since.load(Relaxed);
            let (since, limit) = if !self.served.load(Relaxed) {
                (0, first)
            } else if head != NO_HEAD {
                (head, first)
            } else {
                (self.idle_since.load(Relaxed), between)
            };
            let deadline = self.start + Duration::from_millis(since) + limit;
            if std::time::Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = quiet => {}
            }
        }
    }

    /// Bytes arrived: with no exchange open they begin a head.
    fn read_some(&self) {
        if self.open.load(Relaxed) == 0 && self.head_since.load(Relaxed) == NO_HEAD {
            let now = self.start.elapsed().as_millis() as u64;
            self.head_since.store(now, Relaxed);
            self.quiet.notify_one();
        }
    }
}

/// An HTTP/1.1 connection's stream, telling its [`Activity`] when a head
/// begins.
struct Heads<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Heads<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Heads<I> {
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
        bufs: &[io::IoSlice<'_>],
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

/// One exchange in progress (request in, response body not all sent).
pub(crate) struct Exchange(Arc<Activity>);

impl Exchange {
    pub(crate) fn begin(activity: &Arc<Activity>) -> Exchange {
        activity.served.store(true, Relaxed);
        activity.head_since.store(NO_HEAD, Relaxed);
        activity.open.fetch_add(1, Relaxed);
        Exchange(activity.clone())
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.start.elapsed().as_millis() as u64;
        activity.idle_since.store(now, Relaxed);
        if activity.open.fetch_sub(1, Relaxed) == 1 {
            activity.quiet.notify_one();
        }
    }
}

/// A response body that ends its exchange when sent (or dropped).
struct Sent {
    inner: ProxyBody,
    _exchange: Exchange,
}

impl Body for Sent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hyper side of the proxy (HTTP/2 and TLS), one per proxy thread.
pub(crate) struct H2Tls {
    pub(crate) shared: Arc<Shared>,
    backends: ExtraKey<ProxyDecorator>,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl H2Tls {
    pub(crate) fn new(
        shared: Arc<Shared>,
        backends: ExtraKey<ProxyDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
    ) -> H2Tls {
        H2Tls {
            shared,
            backends,
            snapshot,
        }
    }

    /// Serves one cleartext connection whose first bytes (`prefix`) were
    /// read already: HTTP/2, or HTTP/1.1 (gRPC-Web, which hyper's side
    /// translates).
    pub(crate) async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        prefix: Vec<u8>,
        http2: bool,
        peer: IpAddr,
        stop: watch::Receiver<bool>,
    ) {
        let io = Prefixed {
            prefix,
            at: 0,
            inner: stream,
        };
        self.serve_io(io, http2, peer, "http", stop).await;
    }

    /// Serves one connection with hyper, HTTP/2 or HTTP/1.1. At shutdown the
    /// connection ends gracefully (GOAWAY for HTTP/2) once its requests in
    /// progress are done; one that has sent no request yet first gets
    /// `FIRST_REQUEST_GRACE` for it (a client retries a request lost on a
    /// reused connection, never on a new one).
    pub(crate) async fn serve_io<I>(
        self: Arc<Self>,
        io: I,
        http2: bool,
        peer: IpAddr,
        proto: &'static str,
        mut stop: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let h2 = self.clone();
        // Stores a permit at the first request: a shutdown gives a connection
        // that has not sent one yet `FIRST_REQUEST_GRACE` to do so.
        let first = Arc::new(Notify::new());
        let seen = first.clone();
        let activity = Arc::new(Activity::new());
        let active = activity.clone();
        let service = hyper::service::service_fn(move |request| {
            let h2 = h2.clone();
            seen.notify_one();
            let exchange = Exchange::begin(&active);
            async move {
                let response = h2.handle(request, peer, proto).await;
                // The exchange lasts until its response body is sent.
                Ok::<_, Infallible>(response.map(|body| {
                    BoxBody::new(Sent {
                        inner: body,
                        _exchange: exchange,
                    })
                }))
            }
        });
        let stop = async {
            let _ = stop.wait_for(|stop| *stop).await;
            let _ = tokio::time::timeout(FIRST_REQUEST_GRACE, first.notified()).await;
        };
        if http2 {
            let first = first.clone();
            crate::h2_server::serve(self.clone(), io, peer, proto, stop, first, activity).await;
        } else {
            // hyper's header timeout would run from the last response's end
            // and cut idle keep-alive connections: `Activity` keeps both
            // limits instead.
            let io = Heads {
                inner: io,
                activity: activity.clone(),
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(None)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let config = self.shared.config.load_full();
            let idle = activity.idle(config.header_timeout, config.idle_timeout);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = idle => {}
                _ = stop => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        }
    }

    /// One request, and its access log line when logging is on.
    pub(crate) async fn handle<B>(
        &self,
        request: Request<B>,
        peer: IpAddr,
        proto: &'static str,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        access::configure(self.shared.config.load().access_log.as_deref());
        let mut answered = Answered::default();
        let web = grpc_web::kind(request.headers());
        answered.grpc = web.is_some() || is_grpc(request.headers());
        if !access::enabled() {
            return self
                .exchange(request, web, peer, proto, &mut answered)
                .await;
        }
        answered.logging = true;
        let started = now_ns();
        let method = request.method().as_str().to_string();
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let host = request_host(&request);
        let protocol = if request.version() == hyper::Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        let response = self
            .exchange(request, web, peer, proto, &mut answered)
            .await;
        let (node, endpoint) = answered
            .endpoint
            .as_ref()
            .map_or(("", ""), |e| (&*e.node, &*e.id));
        access::write(&access::Entry {
            time: access::now(),
            request_id: &answered.request_id,
            route: &answered.route,
            client: peer,
            protocol,
            method: &method,
            host: &host,
            path: &path,
            status: response.status().as_u16(),
            service: &answered.service,
            node,
            endpoint,
            attempts: answered.attempts,
            retries: answered.attempts.saturating_sub(1),
            duration_ms: now_ns().saturating_sub(started) as f64 / 1e6,
            upstream_ms: answered.upstream_ns as f64 / 1e6,
        });
        response
    }

    /// Forwards a request and shapes the answer: gRPC calls get gRPC
    /// answers from the proxy too, gRPC-Web goes upstream as gRPC and comes
    /// back as gRPC-Web, and a gRPC-Web route's answers name the origin.
    async fn exchange<B>(
        &self,
        request: Request<B>,
        web: Option<(grpc_web::Web, Box<str>)>,
        peer: IpAddr,
        proto: &'static str,
        answered: &mut Answered,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let mut response = match web {
            None => {
                let response = self.forward(request, peer, proto, answered).await;
                count_subset(answered, &response);
                let response = match answered.compress.take() {
                    Some((route, coding)) => compressed(response, &route, coding),
                    None => response,
                };
                grpc_answer(response, answered.grpc).await
            }
            Some((web, format)) => {
                let response = match grpc_web::to_grpc(request, web, &format).await {
                    Ok(request) => self.forward(request, peer, proto, answered).await,
                    Err(refused) => refused,
                };
                count_subset(answered, &response);
                let response = grpc_answer(response, true).await;
                grpc_web::to_web(response, web, &format)
            }
        };
        if let Some(origin) = answered.cors.take() {
            grpc_web::allow(&mut response, origin);
        }
        response
    }

    async fn forward<B>(
        &self,
        request: Request<B>,
        peer: IpAddr,
        proto: &'static str,
        answered: &mut Answered,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let metrics = &self.shared.metrics;
        if crate::wire::has_dot_segment(request.uri().path().as_bytes()) {
            metrics.reject(Reject::BadRequest);
            return answer(
                StatusCode::BAD_REQUEST,
                crate::wire::DOT_SEGMENT.to_string(),
            );
        }
        let host = request_host(&request);
        let route = self
            .shared
            .routes
            .load()
            .find(&host, request.uri().path().as_bytes())
            .cloned();
        let Some(route) = route else {
            metrics.reject(Reject::NoRoute);
            return answer(StatusCode::NOT_FOUND, format!("no route for host {host:?}"));
        };
        if answered.logging {
            answered.service = route.service.to_string();
            answered.route = route.name.to_string();
        }
        if let Some(policy) = &route.policy {
            let target = || request.uri().path_and_query().map_or("/", |p| p.as_str());
            match policy.judge(peer, &host, target) {
                Ruling::Pass => {}
                Ruling::Forbidden => {
                    metrics.reject(Reject::Forbidden);
                    return answer(
                        StatusCode::FORBIDDEN,
                        "this route does not let your address in (allow/deny)".to_string(),
                    );
                }
                Ruling::Answer {
                    status,
                    body,
                    location,
                } => {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    let mut response = answer(status, body);
                    if let Some(value) = location.and_then(|l| HeaderValue::try_from(l).ok()) {
                        response
                            .headers_mut()
                            .insert(hyper::header::LOCATION, value);
                    }
                    return response;
                }
            }
        }
        if let Some(compress) = &route.compress {
            if !answered.grpc && request.method() != hyper::Method::HEAD {
                let accept = request
                    .headers()
                    .get(hyper::header::ACCEPT_ENCODING)
                    .map(|v| v.as_bytes());
                answered.compress = Some((route.clone(), compress.negotiate(accept)));
            }
        }
        if let Some(limit) = &route.limit {
            let header = |name: &str| request.headers().get(name).map(|v| v.as_bytes());
            if let Limited::Over { retry_after } = limit.judge(peer, header, now_ns()) {
                metrics.reject(Reject::RateLimited);
                let mut response = answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    "over this route's rate limit (rate_limit)".to_string(),
                );
                response
                    .headers_mut()
                    .insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_after));
                return response;
            }
        }
        // A gRPC-Web route answers browsers' CORS preflights itself.
        if route.grpc_web {
            if let Some(origin) = request.headers().get(hyper::header::ORIGIN).cloned() {
                if request.method() == hyper::Method::OPTIONS
                    && request
                        .headers()
                        .contains_key(hyper::header::ACCESS_CONTROL_REQUEST_METHOD)
                {
                    let asked = request
                        .headers()
                        .get(hyper::header::ACCESS_CONTROL_REQUEST_HEADERS);
                    return grpc_web::preflight(&origin, asked);
                }
                answered.cors = Some(origin);
            }
        }
        if route.max_body_bytes > 0 {
            let declared = request
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .or_else(|| request.body().size_hint().exact());
            if declared.is_some_and(|n| n > route.max_body_bytes) {
                metrics.reject(Reject::BodyTooLarge);
                return answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body is over this route's limit of {} bytes (max_body_bytes)",
                        route.max_body_bytes
                    ),
                );
            }
        }
        // A request another datacenter's proxy sent here failing over is
        // served here or not at all.
        let failed_over = request.headers().contains_key(crate::wire::FAILOVER_HEADER);
        let reach = match failed_over {
            true => Reach::Here,
            false => Reach::L7,
        };
        let here = crate::failover::here(
            &self.shared,
            &self.snapshot.load(),
            self.backends,
            &route.service,
            false,
            reach,
        );
        let found =
            crate::failover::find(&self.shared, self.backends, &route.service, here, reach).await;
        let (mut service, stats) = match found {
            Some(s) if !s.backends.is_empty() && s.stats.is_some() => {
                let stats = s.stats.clone();
                (s, stats)
            }
            _ => {
                metrics.reject(Reject::NoEndpoint);
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service {:?} has no healthy endpoints", &*route.service),
                );
            }
        };
        let Some(stats) = stats else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "service not routed".to_string(),
            );
        };
        let mut rng = fastrand::Rng::new();
        // A split route's subset (another datacenter's proxies carry no
        // tags: they split there).
        let split = route.split.as_ref().filter(|_| service.via.is_none());
        let subset = match split {
            None => None,
            Some(split) => {
                let matched = split.has_rules().then(|| {
                    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
                    let values = |name: &str| {
                        request
                            .headers()
                            .get_all(name)
                            .into_iter()
                            .map(|v| v.as_bytes())
                    };
                    split.matched(values, target)
                });
                match split.choose(matched.flatten(), &service, &mut rng) {
                    Ok(at) => at.map(|at| (split.clone(), at)),
                    Err(()) => {
                        metrics.reject(Reject::NoEndpoint);
                        return answer(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "service {:?} has no routable endpoint in this route's split",
                                &*route.service
                            ),
                        );
                    }
                }
            }
        };
        answered.subset = subset.clone();
        let config = self.shared.config.load();
        let key = wire::hash_key(
            &route.hash_on,
            peer,
            request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        );
        // An HTTP/1.1 upgrade (WebSocket over TLS): the Upgrade header goes
        // upstream, and a 101 turns both sides into one tunnel.
        let upgrade =
            request.version() == hyper::Version::HTTP_11 && wants_upgrade(request.headers());
        let mut request = request;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let idempotent = wire::idempotent(parts.method.as_str());
        let mut replayable = body.is_end_stream();
        // A body without a declared length is cut at the limit: the upstream
        // request then fails instead of carrying it on.
        let body = match route.max_body_bytes {
            0 => body.map_err(Into::into).boxed(),
            max => http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
                .boxed(),
        };
        // A unary gRPC call's message arrives with its headers: in hand, it
        // can be sent again, so a call that could not reach an endpoint is
        // retried on another like any request with its body in hand.
        let (in_hand, body) = if answered.grpc {
            match in_hand(body, IN_HAND_MAX).await {
                Ok(bytes) => (Some(bytes), None),
                Err(body) => (None, Some(body)),
            }
        } else {
            (None, Some(body))
        };
        replayable |= in_hand.is_some();
        // A request body keeps `http.min_body_rate` (gRPC streams excepted:
        // a long-lived call may rightly send a message an hour).
        let mut slow = None;
        let body = match body {
            Some(body) if !answered.grpc && !body.is_end_stream() => {
                match Pace::new(config.min_body_rate, config.header_timeout) {
                    Some(pace) => {
                        let flag = Arc::new(AtomicBool::new(false));
                        slow = Some(flag.clone());
                        Some(
                            Paced {
                                inner: body,
                                pace,
                                stall: config.body_timeout,
                                moved: 0,
                                timer: None,
                                slow: flag,
                            }
                            .boxed(),
                        )
                    }
                    None => Some(body),
                }
            }
            body => body,
        };
        let mut body = body;
        // The authority as the client gave it (port included), as the
        // HTTP/1.1 path forwards its Host header.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(HOST).and_then(|v| v.to_str().ok()))
            .unwrap_or(&host)
            .to_string();
        let upgrade_to = parts.headers.get(hyper::header::UPGRADE).cloned();
        // A gRPC call's deadline (`grpc-timeout`) bounds the wait for its
        // answer, and each attempt tells the endpoint what is left of it.
        let deadline = answered
            .grpc
            .then(|| parts.headers.get("grpc-timeout"))
            .flatten()
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map(|left| std::time::Instant::now() + left);
        let received = std::mem::take(&mut parts.headers);
        let mut headers = upstream_headers(received, &authority, peer, proto, rng.u64(..));
        // The route's rewrites: the path, and the Host (`:authority`) the
        // endpoint sees; X-Forwarded-Host keeps the client's.
        if let Some(rewrite) = &route.rewrite {
            if !rewrite.request.is_empty() {
                let ours = headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let ip = peer.to_string();
                let cx = crate::policy::Context {
                    client_ip: &ip,
                    request_id: &ours,
                    host: &host,
                    service: &rewrite.service,
                };
                edit_headers(&mut headers, &rewrite.request, &cx);
            }
            if let Some(host) = rewrite.host().and_then(|h| HeaderValue::from_str(h).ok()) {
                headers.insert(HOST, host);
            }
            match rewritten_uri(&parts.uri, rewrite) {
                Some(uri) => parts.uri = uri,
                None => {
                    metrics.reject(Reject::BadRequest);
                    return answer(
                        StatusCode::BAD_REQUEST,
                        "the route's rewrite made an invalid request target".to_string(),
                    );
                }
            }
        }
        if let Some(ours) = service
            .via
            .as_deref()
            .and_then(|o| HeaderValue::from_str(o).ok())
        {
            // Through another datacenter's proxy: it must not send this on.
            headers.insert(crate::wire::FAILOVER_HEADER, ours);
        }
        if answered.logging {
            answered.request_id = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
        }
        if upgrade {
            headers.insert(
                hyper::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            if let Some(value) = upgrade_to {
                headers.insert(hyper::header::UPGRADE, value);
            }
        }
        let mut client_upgrade = client_upgrade;
        // An HTTP/1.1 attempt's head (made again for each).
        let mut head = Vec::with_capacity(512);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let scheme = if route.tls.is_some() { "https" } else { "http" };
        let mut attempts = Attempts::new(
            Replay {
                replayable,
                idempotent,
            },
            route.retries,
        );
        stats.note_request(now_ns());
        use crate::metrics::Protocol;
        stats
            .metrics
            .request(match (parts.version == hyper::Version::HTTP_2, proto) {
                (true, "https") => Protocol::H2,
                (true, _) => Protocol::H2c,
                (false, _) => Protocol::Http1Tls,
            });
        loop {
            let now = now_ns();
            let picked = attempts.pick(
                &mut service,
                &stats,
                crate::balance::Choice {
                    subset: subset.as_ref().map(|(s, at)| &*s.subsets[*at].tag),
                    ..route.choice(key)
                },
                now,
                &mut rng,
                || {
                    // (Never another datacenter's proxies: the head is
                    // made already, without their mark.)
                    let reach = match failed_over {
                        true => Reach::Here,
                        false => Reach::L4,
                    };
                    let here = crate::failover::here(
                        &self.shared,
                        &self.snapshot.load(),
                        self.backends,
                        &route.service,
                        true,
                        reach,
                    );
                    crate::failover::find_now(
                        &self.shared,
                        self.backends,
                        &route.service,
                        here,
                        reach,
                    )
                    .filter(|s| !s.backends.is_empty())
                },
            );
            let Some(index) = picked else {
                metrics.reject(Reject::NoEndpoint);
                return answer(StatusCode::BAD_GATEWAY, "every endpoint failed".to_string());
            };
            let backend = &service.backends[index as usize];
            answered.attempts += 1;
            if answered.logging {
                answered.endpoint = Some(backend.stats.clone());
            }
            // gRPC calls and routes whose endpoints speak HTTP/2 go over
            // this thread's HTTP/2 pool; the rest over its HTTP/1.1 one.
            let http2 = (answered.grpc || route.h2c || route.h2) && !upgrade;
            let outgoing = match (&in_hand, body.take()) {
                (Some(bytes), _) => Outgoing::Whole(bytes.clone()),
                (None, Some(body)) if !body.is_end_stream() => Outgoing::Stream(body),
                (None, _) => Outgoing::Empty,
            };
            let tls = route.tls.as_ref().map(|tls| (tls, &stats.metrics.tls));
            let sent = if http2 {
                // `:authority` is the client's (a gRPC server may route on
                // it); HTTP/2 carries no Host.
                let authority = route
                    .rewrite
                    .as_ref()
                    .and_then(|r| r.host())
                    .unwrap_or(&authority);
                let Some(uri) = h2_uri(&parts.uri, scheme, authority, backend.addr) else {
                    backend.stats.leave();
                    return answer(StatusCode::BAD_REQUEST, "bad request target".to_string());
                };
                let target = upstream_h2::Target {
                    addr: backend.addr,
                    tls,
                    connect_timeout: route.connect_timeout,
                    metrics: backend.stats.metrics.h2(),
                };
                Pending::H2 {
                    target,
                    uri,
                    outgoing,
                }
            } else {
                let chunked =
                    upstream_h1::request_head(&parts.method, &path, &headers, &outgoing, &mut head);
                let target = upstream_h1::Target {
                    addr: backend.addr,
                    tls,
                    connect_timeout: route.connect_timeout,
                    keep: config.pool_per_endpoint,
                    max_header_bytes: config.max_header_bytes,
                    max_headers: config.max_headers,
                };
                Pending::Http1 {
                    target,
                    chunked,
                    outgoing,
                }
            };
            let started = now_ns();
            let wait = match deadline {
                Some(deadline) => route
                    .response_timeout
                    .min(deadline.saturating_duration_since(std::time::Instant::now())),
                None => route.response_timeout,
            };
            let result = match sent {
                Pending::H2 {
                    target,
                    uri,
                    outgoing,
                } => {
                    let grpc = answered.grpc;
                    let head = || h2_head(&parts.method, &uri, &headers, grpc, deadline);
                    tokio::time::timeout(wait, upstream_h2::send(target, &head, outgoing))
                        .await
                        .map(|r| r.map(|r| r.map(UpBody::H2)))
                }
                Pending::Http1 {
                    target,
                    chunked,
                    outgoing,
                } => {
                    let is_head = parts.method == hyper::Method::HEAD;
                    let sent = upstream_h1::send(&target, &head, outgoing, chunked, is_head);
                    tokio::time::timeout(wait, sent)
                        .await
                        .map(|r| r.map(|r| r.map(UpBody::Http1)))
                }
            };
            let now = now_ns();
            answered.upstream_ns = 0;
            match result {
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let rtt = now.saturating_sub(started);
                    answered.upstream_ns = rtt;
                    backend.stats.observe(rtt, now);
                    stats.metrics.duration.observe(rtt as f64 / 1e9);
                    let class = usize::from(status / 100).clamp(1, 5) - 1;
                    backend.stats.metrics.by_class[class].inc();
                    // A gRPC answer is judged by its grpc-status: in the
                    // headers of a trailers-only answer, else in the trailers.
                    let grpc = match response.headers().get("grpc-status") {
                        _ if !answered.grpc => Grpc::No,
                        None if status < 500 => Grpc::Later,
                        None => Grpc::No,
                        Some(code) => Grpc::Status {
                            failure: grpc_failure(code.as_bytes()),
                            // Trailers-only with a code the route retries on:
                            // nothing reached the client yet.
                            retry_on: response.body().is_end_stream()
                                && std::str::from_utf8(code.as_bytes())
                                    .ok()
                                    .and_then(|v| v.parse::<u32>().ok())
                                    .is_some_and(|code| {
                                        code < 32 && route.retry_grpc_on & (1 << code) != 0
                                    }),
                        },
                    };
                    let ending = Ending::Answered { status, grpc };
                    let verdict =
                        attempts.judge(ending, backend, &service.backends, &stats, &config, now);
                    if verdict == Judgement::Retry {
                        backend.stats.leave();
                        continue;
                    }
                    if answered.grpc && grpc != Grpc::Later {
                        // A trailers-only answer (or a 5xx): counted now.
                        stats.metrics.grpc_call(
                            response
                                .headers()
                                .get("grpc-status")
                                .map(HeaderValue::as_bytes),
                        );
                    }
                    if status == 101 {
                        if let Some(client) = client_upgrade.take() {
                            return tunnel(response, client, backend.stats.clone());
                        }
                    }
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    if let Some(rewrite) = route.rewrite.as_ref().filter(|r| !r.response.is_empty())
                    {
                        let ip = peer.to_string();
                        let cx = crate::policy::Context {
                            client_ip: &ip,
                            request_id: headers
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default(),
                            host: &host,
                            service: &rewrite.service,
                        };
                        edit_headers(&mut parts.headers, &rewrite.response, &cx);
                    }
                    let body = Tracked {
                        inner: body,
                        stats: Some(backend.stats.clone()),
                        grpc: (grpc == Grpc::Later).then(|| Verdict {
                            service: service.clone(),
                            stats: stats.clone(),
                            outlier: config.outlier.clone(),
                        }),
                        cut: None,
                    };
                    return Response::from_parts(parts, body.boxed());
                }
                Ok(Err(e)) => {
                    backend.stats.leave();
                    let tls_failed = |e: &(dyn std::error::Error + 'static)| {
                        if let Some(tls) = route
                            .tls
                            .as_ref()
                            .and_then(|_| crate::upstream_tls::tls_error(e))
                        {
                            stats.metrics.tls.handshake.inc();
                            tracing::warn!(service = %route.service, endpoint = %backend.addr, error = %tls, "upstream TLS failed after the handshake (switchyard_proxy_upstream_tls_failures_total)");
                        }
                    };
                    let ending = if slow.as_ref().is_some_and(|s| s.load(Relaxed)) {
                        // The client's body fell below its pace: its fault,
                        // not the endpoint's.
                        Ending::SlowClient
                    } else {
                        match &e {
                            Failure::Connect(_) => {
                                backend.stats.metrics.connect_errors.inc();
                                Ending::Unsent
                            }
                            Failure::Unsent(_) => Ending::Unsent,
                            Failure::Broken(e) => {
                                tls_failed(e.as_ref());
                                Ending::Broken
                            }
                        }
                    };
                    tracing::debug!(service = %route.service, endpoint = %backend.addr, error = %e.error(), ?ending, "upstream request failed");
                    let verdict =
                        attempts.judge(ending, backend, &service.backends, &stats, &config, now);
                    if verdict == Judgement::Retry {
                        continue;
                    }
                    if ending == Ending::SlowClient {
                        metrics.reject(Reject::ClientTimeout);
                        return answer(
                            StatusCode::REQUEST_TIMEOUT,
                            "request body too slow (http.min_body_rate)".to_string(),
                        );
                    }
                    metrics.reject(Reject::UpstreamFailed);
                    return answer(
                        StatusCode::BAD_GATEWAY,
                        "upstream connection failed".to_string(),
                    );
                }
                Err(_) => {
                    backend.stats.leave();
                    attempts.judge(
                        Ending::Timeout,
                        backend,
                        &service.backends,
                        &stats,
                        &config,
                        now,
                    );
                    metrics.reject(Reject::UpstreamTimeout);
                    return answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream did not answer in time".to_string(),
                    );
                }
            }
        }
    }
}

/// What the access log says of a request beyond the request and response.
#[derive(Default)]
struct Answered {
    logging: bool,
    service: String,
    route: String,
    request_id: String,
    endpoint: Option<Arc<EndpointStats>>,
    attempts: usize,
    /// The last attempt's wait for the response head (ns; 0 when none came).
    upstream_ns: u64,
    /// A gRPC call: upstream over HTTP/2, answered as gRPC when it fails.
    grpc: bool,
    /// The origin a gRPC-Web route's answer is marked for (CORS).
    cors: Option<HeaderValue>,
    /// The split subset the request went to.
    subset: Option<(Arc<crate::split::Split>, usize)>,
    /// A route that compresses, and the coding the client takes.
    compress: Option<(Arc<crate::route::Route>, Option<crate::compress::Coding>)>,
}

/// An attempt on its way: over this thread's HTTP/2 pool, or its HTTP/1.1
/// one.
enum Pending<'a> {
    H2 {
        target: upstream_h2::Target<'a>,
        uri: Uri,
        outgoing: Outgoing,
    },
    Http1 {
        target: upstream_h1::Target<'a>,
        chunked: bool,
        outgoing: Outgoing,
    },
}

/// An endpoint's response body, by the client that received it.
enum UpBody {
    Http1(upstream_h1::Incoming),
    H2(upstream_h2::Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Http1(body) => Pin::new(body).poll_frame(cx),
            UpBody::H2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Http1(body) => body.is_end_stream(),
            UpBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Http1(body) => body.size_hint(),
            UpBody::H2(body) => body.size_hint(),
        }
    }
}

/// Largest request body `in_hand` takes whole.
const IN_HAND_MAX: usize = 64 * 1024;

/// Longest a gRPC call's message is waited for to have it in hand: the
/// client sends it right behind the headers (a unary call), often in the
/// next packet; a streaming call waits this long once, then streams.
const IN_HAND_WAIT: Duration = Duration::from_millis(2);

/// The whole request body when it arrives within `IN_HAND_WAIT` (up to
/// `cap` bytes); otherwise a body that gives back the frames read so far
/// and then the rest, in order.
async fn in_hand(mut body: ProxyBody, cap: usize) -> Result<Bytes, ProxyBody> {
    let mut frames = std::collections::VecDeque::new();
    let mut size = 0;
    let mut deadline = None;
    loop {
        let mut polled =
            Pin::new(&mut body).poll_frame(&mut Context::from_waker(std::task::Waker::noop()));
        if polled.is_pending() {
            // Not here yet: wait for it, a little.
            let until = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + IN_HAND_WAIT);
            polled = match tokio::time::timeout_at(until, body.frame()).await {
                Ok(Some(frame)) => Poll::Ready(Some(frame)),
                Ok(None) => Poll::Ready(None),
                Err(_) => Poll::Pending,
            };
        }
        match polled {
            Poll::Ready(None) => {
                let mut data = frames
                    .into_iter()
                    .filter_map(|f: Frame<Bytes>| f.into_data().ok());
                // A unary call's message is one DATA frame: taken as it is.
                return Ok(match (data.next(), data.next()) {
                    (None, _) => Bytes::new(),
                    (Some(only), None) => only,
                    (Some(first), Some(second)) => {
                        let mut whole = Vec::with_capacity(size);
                        for part in [first, second].into_iter().chain(data) {
                            whole.extend_from_slice(&part);
                        }
                        Bytes::from(whole)
                    }
                });
            }
            Poll::Ready(Some(Ok(frame))) => {
                let trailers = frame.is_trailers();
                size += frame.data_ref().map_or(0, Bytes::len);
                frames.push_back(frame);
                if trailers || size > cap {
                    break;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                return Err(Replayed {
                    frames,
                    error: Some(e),
                    rest: None,
                }
                .boxed())
            }
            Poll::Pending => break,
        }
    }
    Err(Replayed {
        frames,
        error: None,
        rest: Some(body),
    }
    .boxed())
}

/// A request body that must keep its pace (`Pace`), and never stall longer
/// than `stall`: past either it ends in an error, and `slow` tells the
/// attempt that the client, not the endpoint, was at fault.
struct Paced {
    inner: ProxyBody,
    pace: Pace,
    stall: Duration,
    moved: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    slow: Arc<AtomicBool>,
}

impl Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.moved += data.len() as u64;
                }
                this.timer = None;
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(other) => return Poll::Ready(other),
            Poll::Pending => {}
        }
        let (wait, by_rate) = this.pace.wait(this.moved, this.stall);
        // Below the pace already, or until the wait runs out (a stall's wait
        // counts from the first of its polls, the pace's due time is fixed
        // while nothing arrives).
        if !(by_rate && wait.is_zero()) {
            let until = tokio::time::Instant::now() + wait;
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if by_rate && timer.deadline() > until {
                timer.as_mut().reset(until);
            }
            if std::future::Future::poll(timer.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
        }
        this.slow.store(by_rate, Relaxed);
        let why = if by_rate {
            "request body below http.min_body_rate"
        } else {
            "request body stalled (http.body_timeout)"
        };
        Poll::Ready(Some(Err(why.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Frames taken from a body already, then the body's rest.
struct Replayed {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    error: Option<BoxError>,
    rest: Option<ProxyBody>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }
}

/// A `grpc-timeout` value: up to eight digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call (`application/grpc`, `+proto`, ...;
/// not gRPC-Web, which is HTTP/1.1-shaped).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

/// An endpoint's response as a route that compresses sends it on: as it
/// is, with `Vary: Accept-Encoding`, or compressed as it streams.
fn compressed(
    mut response: Response<ProxyBody>,
    route: &crate::route::Route,
    coding: Option<crate::compress::Coding>,
) -> Response<ProxyBody> {
    use crate::compress::{CompressedBody, Decision, Encoder, HeadFacts};
    use hyper::header;
    let Some(compress) = &route.compress else {
        return response;
    };
    // The proxy's own answers are short texts.
    if response.headers().contains_key("x-switchyard") {
        return response;
    }
    let headers = response.headers();
    let get = |name: header::HeaderName| headers.get(name).map(|v| v.as_bytes());
    let varies = headers
        .get_all(header::VARY)
        .iter()
        .any(|v| crate::compress::varies(v.as_bytes()));
    let facts = HeadFacts {
        status: response.status().as_u16(),
        content_type: get(header::CONTENT_TYPE),
        content_encoding: get(header::CONTENT_ENCODING),
        content_length: get(header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok()),
        content_range: headers.contains_key(header::CONTENT_RANGE),
        cache_control: get(header::CACHE_CONTROL),
    };
    let decision = compress.decide(&facts, coding);
    if decision == Decision::AsIs {
        return response;
    }
    let headers = response.headers_mut();
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    let Decision::Compress(coding) = decision else {
        return response;
    };
    let Ok(encoder) = Encoder::new(coding) else {
        return response;
    };
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    // The bytes change: a strong validator becomes a weak one.
    if let Some(tag) = headers.get(header::ETAG) {
        if tag.as_bytes().starts_with(b"\"") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(tag.as_bytes());
            if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, weak);
            }
        }
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, CompressedBody::new(body, encoder).boxed())
}

/// Counts the answer of a request a split route sent to a subset: a 5xx
/// (the endpoint's or the proxy's) or a trailers-only gRPC failure is an
/// error (a gRPC status in trailers after messages is not seen here).
fn count_subset(answered: &mut Answered, response: &Response<ProxyBody>) {
    if let Some((split, at)) = answered.subset.take() {
        let grpc_failed = response
            .headers()
            .get("grpc-status")
            .is_some_and(|v| matches!(v.as_bytes(), b"2" | b"13" | b"14"));
        split.count(at, response.status().as_u16() >= 500 || grpc_failed);
    }
}

/// A gRPC call the proxy answered itself (no route, no endpoint, upstream
/// failed or timed out, a limit) gets a gRPC answer: HTTP 200 with only
/// headers, `grpc-status` saying why and `grpc-message` the proxy's text,
/// never a plain-text 5xx a gRPC client cannot read.
async fn grpc_answer(response: Response<ProxyBody>, grpc: bool) -> Response<ProxyBody> {
    if !grpc || !response.headers().contains_key("x-switchyard") {
        return response;
    }
    let status = match response.status().as_u16() {
        200 => return response,
        504 => "4",        // DEADLINE_EXCEEDED
        413 | 429 => "8",  // RESOURCE_EXHAUSTED
        404 => "12",       // UNIMPLEMENTED: nothing serves this host
        400 | 431 => "13", // INTERNAL
        _ => "14",         // UNAVAILABLE
    };
    let code = response.status().as_u16();
    // The proxy's own answers are short texts in memory.
    let said = match response.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let text = percent_encode(&format!("switchyard (HTTP {code}): {said}"));
    let mut answer = Response::new(empty());
    let headers = answer.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from_static(status));
    if let Ok(message) = HeaderValue::from_str(&text) {
        headers.insert("grpc-message", message);
    }
    headers.insert("x-switchyard", HeaderValue::from_static("proxy"));
    answer
}

/// The request's host: the authority (HTTP/2) or the Host header, without
/// the port, lowercase.
fn request_host<B>(request: &Request<B>) -> String {
    request
        .uri()
        .authority()
        .map(|a| a.host().to_ascii_lowercase())
        .or_else(|| {
            let value = request.headers().get(HOST)?.to_str().ok()?;
            let host = value.rsplit_once(':').map_or(value, |(h, _)| h);
            Some(host.to_ascii_lowercase())
        })
        .unwrap_or_default()
}

/// Whether a request asks for a protocol upgrade (`Connection: upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Answers the client's upgrade with the upstream's 101 and joins the two
/// upgraded connections in a tunnel, which stays in flight on its endpoint
/// until it closes or the endpoint's drain deadline cuts it.
fn tunnel(
    response: Response<UpBody>,
    client: hyper::upgrade::OnUpgrade,
    stats: Arc<EndpointStats>,
) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let upstream = match body {
        UpBody::Http1(body) => body.upgraded(),
        UpBody::H2(_) => None,
    };
    tokio::spawn(async move {
        if let (Ok(client), Some((mut upstream, early))) = (client.await, upstream) {
            let mut client = TokioIo::new(client);
            let joined = async {
                // What the endpoint sent right behind its 101 goes first.
                if !early.is_empty() {
                    tokio::io::AsyncWriteExt::write_all(&mut client, &early).await?;
                }
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            };
            tokio::select! {
                _ = joined => {}
                _ = stats.drain_deadline() => stats.note_cut(),
            }
        }
        stats.leave();
    });
    Response::from_parts(parts, empty())
}

pub(crate) fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A response the proxy gives itself.
pub(crate) fn answer(status: StatusCode, text: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(text + "\n"))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-switchyard", HeaderValue::from_static("proxy"));
    response
}

/// A route's header edits: removed and replaced names out, then its set
/// and added lines in (values rendered for `cx`; one that is not a valid
/// header value is left out).
fn edit_headers(
    headers: &mut HeaderMap,
    edits: &crate::policy::HeaderEdits,
    cx: &crate::policy::Context<'_>,
) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| edits.drops(n.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
    for (name, value) in edits.lines(cx) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(name, value);
        }
    }
}

/// `uri` as a route's rewrite has it: its path and query, and its
/// authority (when it has one) for `rewrite_host`.
fn rewritten_uri(uri: &Uri, rewrite: &crate::policy::Rewrite) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    if rewrite.changes_path() {
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        parts.path_and_query = Some(rewrite.target(target).parse().ok()?);
    }
    if let (Some(host), Some(_)) = (rewrite.host(), &parts.authority) {
        parts.authority = Some(host.parse().ok()?);
    }
    Uri::from_parts(parts).ok()
}

/// The upstream URI of an HTTP/2 attempt: the client's path, its
/// `authority` (else the endpoint's address), `scheme`.
fn h2_uri(client: &Uri, scheme: &str, authority: &str, addr: std::net::SocketAddr) -> Option<Uri> {
    let mut parts = client.clone().into_parts();
    parts.scheme = Some(match scheme {
        "https" => hyper::http::uri::Scheme::HTTPS,
        _ => hyper::http::uri::Scheme::HTTP,
    });
    if parts.authority.is_none() {
        parts.authority = authority.parse().or_else(|_| addr.to_string().parse()).ok();
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).ok()
}

/// The head of an HTTP/2 attempt (made again if it must be sent again): a
/// gRPC call carries `te: trailers` (the only TE HTTP/2 allows, which gRPC
/// servers require) and what is left of its deadline.
fn h2_head(
    method: &hyper::Method,
    uri: &Uri,
    headers: &HeaderMap,
    grpc: bool,
    deadline: Option<std::time::Instant>,
) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = method.clone();
    *head.uri_mut() = uri.clone();
    *head.version_mut() = hyper::Version::HTTP_2;
    let fields = head.headers_mut();
    *fields = headers.clone();
    fields.remove(HOST);
    if grpc {
        fields.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Whole milliseconds, at least one (0 would mean expired).
            let millis = left.as_millis().clamp(1, 99_999_999);
            if let Ok(value) = HeaderValue::from_str(&format!("{millis}m")) {
                fields.insert("grpc-timeout", value);
            }
        }
    }
    head
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Nearly always there is none (HTTP/2 forbids them): no allocation then.
    if !headers.keys().any(|name| wire::hop_by_hop(name.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| wire::hop_by_hop(name.as_str()))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// This hop's forwarding values for one client, host and scheme: the same
/// for every request of a connection, so each thread keeps the last ones.
struct Hop {
    peer: IpAddr,
    host: Box<str>,
    proto: &'static str,
    host_value: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

impl Hop {
    fn new(peer: IpAddr, host: &str, proto: &'static str) -> Hop {
        let peer_text = peer.to_string();
        let for_value = match peer {
            IpAddr::V4(_) => peer_text.clone(),
            IpAddr::V6(_) => format!("\"[{peer_text}]\""),
        };
        let forwarded = format!("for={for_value};host=\"{host}\";proto={proto}");
        Hop {
            peer,
            host: host.into(),
            proto,
            host_value: HeaderValue::from_str(host).ok(),
            forwarded_for: HeaderValue::from_str(&peer_text).ok(),
            forwarded: HeaderValue::from_str(&forwarded).ok(),
        }
    }
}

thread_local! {
    static LAST_HOP: std::cell::RefCell<Option<Hop>> = const { std::cell::RefCell::new(None) };
}

/// The request headers sent upstream (`received`, moved): hop-by-hop ones
/// dropped, `Host` from the request's authority (port included), forwarding
/// headers added to what earlier proxies set (as the HTTP/1.1 path does), a
/// request id added.
fn upstream_headers(
    received: HeaderMap,
    host: &str,
    peer: IpAddr,
    proto: &'static str,
    id: u64,
) -> HeaderMap {
    let mut headers = received;
    strip_hop_by_hop(&mut headers);
    let (host_value, mut forwarded_for, mut forwarded) = LAST_HOP.with(|last| {
        let mut last = last.borrow_mut();
        let hop = match last.as_mut() {
            Some(hop) if hop.peer == peer && hop.proto == proto && *hop.host == *host => hop,
            _ => last.insert(Hop::new(peer, host, proto)),
        };
        (
            hop.host_value.clone(),
            hop.forwarded_for.clone(),
            hop.forwarded.clone(),
        )
    });
    // Appended to what earlier proxies set.
    let earlier = |headers: &HeaderMap, name: &str, this: &Option<HeaderValue>| {
        let earlier = headers.get(name)?.to_str().ok()?;
        let this = this.as_ref()?.to_str().ok()?;
        HeaderValue::from_str(&format!("{earlier}, {this}")).ok()
    };
    if let Some(both) = earlier(&headers, "x-forwarded-for", &forwarded_for) {
        forwarded_for = Some(both);
    }
    if let Some(both) = earlier(&headers, "forwarded", &forwarded) {
        forwarded = Some(both);
    }
    if let Some(value) = host_value {
        headers.insert(HOST, value.clone());
        headers.insert("x-forwarded-host", value);
    }
    if let Some(value) = forwarded_for {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(value) = forwarded {
        headers.insert("forwarded", value);
    }
    if !headers.contains_key("x-request-id") {
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = b"0123456789abcdef"[((id >> (60 - 4 * i)) & 0xf) as usize];
        }
        if let Ok(value) = HeaderValue::from_bytes(&hex) {
            headers.insert("x-request-id", value);
        }
    }
    headers
}

/// A response body that keeps its endpoint's request in flight until the
/// body is done or dropped (what a drain waits for), and ends it at the
/// endpoint's drain deadline: a stream still open then (a gRPC stream, a
/// long download) is reset and counted as cut.
struct Tracked {
    inner: UpBody,
    stats: Option<Arc<EndpointStats>>,
    /// The endpoint's drain deadline, armed when the body first waits.
    cut: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>,
    /// A gRPC call: its `grpc-status`, in the trailers, decides whether
    /// the endpoint failed.
    grpc: Option<Verdict>,
}

/// What judging a gRPC call's outcome needs once its trailers arrive.
struct Verdict {
    service: Arc<ProxyService>,
    stats: Arc<crate::stats::ServiceStats>,
    outlier: crate::config::OutlierConfig,
}

/// gRPC statuses that count against an endpoint (as a 5xx does):
/// UNKNOWN, INTERNAL, UNAVAILABLE.
fn grpc_failure(status: &[u8]) -> bool {
    matches!(status, b"2" | b"13" | b"14")
}

impl Tracked {
    fn finish(&mut self) {
        if let Some(verdict) = self.grpc.take() {
            // Ended (or cut) without trailers: no grpc-status came.
            verdict.stats.metrics.grpc_call(None);
        }
        if let Some(stats) = self.stats.take() {
            stats.leave();
        }
    }

    fn judge(&mut self, trailers: &HeaderMap) {
        let (Some(verdict), Some(stats)) = (self.grpc.take(), self.stats.as_ref()) else {
            return;
        };
        let now = now_ns();
        let status = trailers.get("grpc-status").map(HeaderValue::as_bytes);
        verdict.stats.metrics.grpc_call(status);
        match status {
            Some(status) if grpc_failure(status) => {
                stats.failed(
                    now,
                    &verdict.outlier,
                    &verdict.stats,
                    &verdict.service.backends,
                );
            }
            _ => stats.succeeded(now),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            let this = &mut *self;
            if let Some(stats) = &this.stats {
                let cut = this.cut.get_or_insert_with(|| {
                    let stats = stats.clone();
                    Box::pin(async move { stats.drain_deadline().await })
                });
                if cut.as_mut().poll(cx).is_ready() {
                    stats.note_cut();
                    this.finish();
                    return Poll::Ready(Some(Err("cut at the endpoint's drain deadline".into())));
                }
            }
            return Poll::Pending;
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                self.judge(trailers);
            }
        }
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finish();
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

/// A stream whose first bytes were read already: they are read again first.
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let rest = &self.prefix[self.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarding headers: this hop appended to earlier ones, per
    /// client and host (the per-thread copy of the last ones never leaks
    /// into another client's), hop-by-hop dropped, a request id kept or made.
    #[test]
    fn upstream_headers_append_this_hop_for_each_client() {
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        let mut received = HeaderMap::new();
        received.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        received.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
        received.insert("connection", HeaderValue::from_static("x-hop"));
        received.insert("x-hop", HeaderValue::from_static("1"));
        received.insert("x-request-id", HeaderValue::from_static("given"));
        let sent = upstream_headers(received, "a.test:8080", v4, "https", 0xabc);
        let get =
            |h: &HeaderMap, name: &str| h.get(name).map(|v| v.to_str().expect("text").to_string());
        assert_eq!(get(&sent, "host").as_deref(), Some("a.test:8080"));
        assert_eq!(
            get(&sent, "x-forwarded-for").as_deref(),
            Some("10.0.0.1, 192.0.2.7")
        );
        assert_eq!(
            get(&sent, "forwarded").as_deref(),
            Some("for=10.0.0.1, for=192.0.2.7;host=\"a.test:8080\";proto=https")
        );
        assert_eq!(get(&sent, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(get(&sent, "x-request-id").as_deref(), Some("given"));
        assert!(!sent.contains_key("connection") && !sent.contains_key("x-hop"));
        for (peer, host, proto, xff, fwd) in [
            (
                v4,
                "a.test",
                "http",
                "192.0.2.7",
                "for=192.0.2.7;host=\"a.test\";proto=http",
            ),
            (
                v6,
                "a.test",
                "http",
                "2001:db8::1",
                "for=\"[2001:db8::1]\";host=\"a.test\";proto=http",
            ),
            (
                v6,
                "b.test",
                "http",
                "2001:db8::1",
                "for=\"[2001:db8::1]\";host=\"b.test\";proto=http",
            ),
            (
                v4,
                "a.test",
                "http",
                "192.0.2.7",
                "for=192.0.2.7;host=\"a.test\";proto=http",
            ),
        ] {
            let sent = upstream_headers(HeaderMap::new(), host, peer, proto, 0x1f);
            assert_eq!(get(&sent, "x-forwarded-for").as_deref(), Some(xff));
            assert_eq!(get(&sent, "forwarded").as_deref(), Some(fwd));
            assert_eq!(get(&sent, "x-forwarded-host").as_deref(), Some(host));
            assert_eq!(
                get(&sent, "x-request-id").as_deref(),
                Some("000000000000001f")
            );
        }
    }

    #[test]
    fn grpc_timeouts_parse_by_unit_and_bad_ones_are_ignored() {
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout(b"300m"), Some(Duration::from_millis(300)));
        assert_eq!(grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"10s",
            b"-1S",
            b"1.5S",
            b"10",
        ] {
            assert_eq!(
                grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn grpc_content_types_are_told_from_grpc_web() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web-text"));
        assert!(!with("application/json"));
    }
}
