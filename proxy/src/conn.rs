//! One client connection: read a head, route it, pick an endpoint, forward
//! the request on a pooled upstream connection, relay the response, repeat
//! while the client keeps the connection. The whole exchange runs inline in
//! this task; nothing per request is allocated once the buffers are warm.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::access;
use crate::attempts::{Attempts, Ending, Grpc, Replay, Verdict};
use crate::backend::ProxyService;
use crate::balance::Backend;
use crate::compress::{Coding, Decision, Encoder, HeadFacts};
use crate::failover::Reach;
use crate::io::{Buf, Conn};
use crate::limit::Limited;
use crate::local::{Busy, Local};
use crate::metrics::Reject;
use crate::policy::Ruling;
use crate::route::Route;
use crate::splice::{self, Broken, SPLICE_ABOVE};
use crate::stats::{now_ns, EndpointStats, ServiceStats};
use crate::wire::{self, Chunks, Client, Framing, HeadError, Request};

/// What the connection does after an exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// The client speaks HTTP/2: hand the connection over.
    Http2,
    /// gRPC-Web (or its CORS preflight) over HTTP/1.1: hyper's side, which
    /// translates it to gRPC, takes the connection, the head still unread.
    Hyper,
}

/// Serves one client connection until it closes, errs or idles out.
pub(crate) async fn serve(local: Rc<Local>, client: TcpStream, info: Client) {
    let _ = client.set_nodelay(true);
    // Adopted first: a connection dropped here is uncounted too.
    let mut fresh = Some(Busy::adopt_fresh(&local));
    let Some(mut client) = local.http_conn(client) else {
        return;
    };
    local.shared.metrics.connections.inc();
    let mut cbuf = local.take_buffer();
    let mut ubuf = local.take_buffer();
    let mut head = Vec::with_capacity(1024);
    let mut reply = Vec::with_capacity(1024);
    loop {
        local.place(&mut client);
        // The HTTP/2 preface is recognised only at the start of a connection
        // (RFC 9113 §3.4); later it is a malformed HTTP/1.1 request.
        let first = fresh.is_some();
        let next = exchange(
            &local,
            &mut client,
            &info,
            first,
            &mut cbuf,
            &mut ubuf,
            &mut head,
            &mut reply,
        )
        .await;
        drop(fresh.take());
        if matches!(next, Next::Http2 | Next::Hyper) {
            let prefix = cbuf.filled().to_vec();
            local.give_buffer(cbuf);
            local.give_buffer(ubuf);
            let _busy = Busy::enter(&local);
            if let Some(client) = client.into_tokio() {
                let http2 = next == Next::Http2;
                local
                    .h2_tls
                    .clone()
                    .serve(client, prefix, http2, info.ip, local.stop.clone())
                    .await;
            }
            local.shared.metrics.connections.dec();
            return;
        }
        if next == Next::Close || local.stopping() {
            break;
        }
    }
    local.give_buffer(cbuf);
    local.give_buffer(ubuf);
    client.shutdown().await;
    local.shared.metrics.connections.dec();
}

/// Largest a relay buffer grows to.
const MAX_BUFFER: usize = 256 * 1024;

/// Longest wait for a client to take a response the proxy writes itself.
const WRITE_LIMIT: Duration = Duration::from_secs(10);

/// Answers a request the proxy handles itself.
async fn answer(
    local: &Local,
    client: &mut Conn,
    status: u16,
    reason: &str,
    body: &str,
    close: bool,
) -> Next {
    answer_with(local, client, status, reason, None, body, close).await
}

/// `answer` with a Location header (a route's redirect).
async fn answer_with(
    local: &Local,
    client: &mut Conn,
    status: u16,
    reason: &str,
    header: Option<(&str, &str)>,
    body: &str,
    close: bool,
) -> Next {
    let header = header
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .unwrap_or_default();
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{header}{}x-switchyard: proxy\r\n\r\n{body}\n",
        body.len() + 1,
        if close { "connection: close\r\n" } else { "" },
    );
    match local
        .deadlines
        .within(WRITE_LIMIT, client.write_all(text.as_bytes()))
        .await
    {
        Some(Ok(())) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

// The connection's parts, lent one exchange at a time by `serve`, which owns
// them; `Exchange` bundles them for the steps after the head is parsed.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    local: &Local,
    client: &mut Conn,
    info: &Client,
    first: bool,
    cbuf: &mut Buf,
    ubuf: &mut Buf,
    head: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> Next {
    let config = local.config();
    let metrics = &local.shared.metrics;
    let mut head_deadline = None;
    let request_id = local.next_request_id();
    // From the first byte of a head on, a shutdown waits for this exchange.
    let mut busy = None;
    let (request, route, key) = loop {
        if !cbuf.is_empty() {
            if busy.is_none() {
                busy = Some(Busy::enter(local));
            }
            if first && cbuf.filled().starts_with(b"PRI * HTTP/2") {
                // HTTP/2 with prior knowledge: hyper takes the connection.
                return Next::Http2;
            }
            let parsed = {
                let mut routes = local.routes.borrow_mut();
                let table = routes.load();
                wire::parse_request(
                    cbuf.filled(),
                    config.max_header_bytes,
                    config.max_headers,
                    info,
                    request_id,
                    head,
                    |target| table.find(target.host, target.path).cloned(),
                    |route: &Arc<Route>| &route.hash_on,
                    |route: &Arc<Route>| route.rewrite.as_ref(),
                )
            };
            match parsed {
                Ok(parsed) => break parsed,
                Err(HeadError::Partial) => {}
                Err(HeadError::TooLarge) => {
                    metrics.reject(Reject::HeadTooLarge);
                    return answer(
                        local,
                        client,
                        431,
                        "Request Header Fields Too Large",
                        "request head too large (http.max_header_bytes, http.max_headers)",
                        true,
                    )
                    .await;
                }
                Err(HeadError::Bad(why)) => {
                    metrics.reject(Reject::BadRequest);
                    return answer(local, client, 400, "Bad Request", why, true).await;
                }
            }
        }
        // Between requests the client may idle for `idle_timeout`; once a
        // head has started it has `header_timeout` to finish it.
        let read = if cbuf.is_empty() {
            local
                .deadlines
                .within(config.idle_timeout, cbuf.fill(client))
                .await
        } else {
            let deadline =
                *head_deadline.get_or_insert_with(|| Instant::now() + config.header_timeout);
            local
                .deadlines
                .within_at(|| deadline, cbuf.fill(client))
                .await
        };
        match read {
            Some(Ok(0)) | Some(Err(_)) => return Next::Close,
            Some(Ok(_)) => {}
            None if head_deadline.is_some() => {
                metrics.reject(Reject::ClientTimeout);
                return answer(
                    local,
                    client,
                    408,
                    "Request Timeout",
                    "request head too slow (http.header_timeout)",
                    true,
                )
                .await;
            }
            None => return Next::Close,
        }
    };
    // gRPC-Web, its preflight on a gRPC-Web route, and any request of a
    // route whose endpoints speak HTTP/2 or TLS go through hyper's side.
    if request.grpc_web
        || route
            .as_ref()
            .is_some_and(|r| r.via_hyper() || (request.preflight && r.grpc_web))
    {
        return Next::Hyper;
    }
    // The route's own answer, judged before the head (its target) goes.
    let verdict = route.as_ref().and_then(|r| r.policy.as_ref()).map(|p| {
        p.judge(info.ip, request.host.as_str(), || {
            wire::request_target(cbuf.filled())
        })
    });
    // Its rate limit, for requests it lets in.
    let limited = match (&verdict, route.as_ref().and_then(|r| r.limit.as_ref())) {
        (None | Some(Ruling::Pass), Some(limit)) => {
            let head = &cbuf.filled()[..request.head_len];
            let header = |name: &str| wire::header_in_head(head, name);
            limit.judge(info.ip, header, now_ns())
        }
        _ => Limited::Pass,
    };
    // So does the coding a compressing route's answer may take (never for
    // HEAD, or for HTTP/1.0, which cannot take a chunked body).
    let compress = route
        .as_ref()
        .and_then(|r| r.compress.as_ref())
        .filter(|_| !request.is_head && !request.http10)
        .map(|c| {
            let head = &cbuf.filled()[..request.head_len];
            c.negotiate(wire::header_in_head(head, "accept-encoding"))
        });
    // The split's match rules read the head too.
    let matched = route
        .as_ref()
        .and_then(|r| r.split.as_ref())
        .filter(|s| s.has_rules())
        .and_then(|s| {
            let head = &cbuf.filled()[..request.head_len];
            s.matched(
                |name| wire::headers_in_head(head, name),
                wire::request_target(head),
            )
        });
    cbuf.consume(request.head_len);
    // A refused request with a body we did not read ends the connection.
    let close_on_refusal = !request.keep_alive || request.framing != Framing::None;
    // The clock is read for the access log only, and only while it is on.
    let started = local.logging().then(now_ns);
    let Some(route) = route else {
        metrics.reject(Reject::NoRoute);
        let outcome = Outcome::refused(404, started);
        log_access(info, head, &request, None, &outcome);
        let body = format!("no route for host {:?}", request.host.as_str());
        return answer(local, client, 404, "Not Found", &body, close_on_refusal).await;
    };
    match verdict {
        None | Some(Ruling::Pass) => {}
        Some(Ruling::Forbidden) => {
            metrics.reject(Reject::Forbidden);
            let outcome = Outcome::refused(403, started);
            log_access(info, head, &request, Some(&route), &outcome);
            let body = "this route does not let your address in (allow/deny)";
            return answer(local, client, 403, "Forbidden", body, close_on_refusal).await;
        }
        Some(Ruling::Answer {
            status,
            body,
            location,
        }) => {
            let outcome = Outcome::refused(status, started);
            log_access(info, head, &request, Some(&route), &outcome);
            let reason = crate::policy::reason(status);
            let location = location.as_deref().map(|l| ("location", l));
            return answer_with(
                local,
                client,
                status,
                reason,
                location,
                &body,
                close_on_refusal,
            )
            .await;
        }
    }
    if let Limited::Over { retry_after } = limited {
        metrics.reject(Reject::RateLimited);
        let outcome = Outcome::refused(429, started);
        log_access(info, head, &request, Some(&route), &outcome);
        let wait = retry_after.to_string();
        return answer_with(
            local,
            client,
            429,
            "Too Many Requests",
            Some(("retry-after", &wait)),
            "over this route's rate limit (rate_limit)",
            close_on_refusal,
        )
        .await;
    }
    let reach = match request.failed_over {
        true => Reach::Here,
        false => Reach::L7,
    };
    let service = local
        .service_anywhere(&route.service, reach)
        .await
        .filter(|s| !s.backends.is_empty());
    // A split route's subset (another datacenter's proxies carry no tags:
    // they split there).
    let split = route
        .split
        .as_ref()
        .filter(|_| service.as_ref().is_some_and(|s| s.via.is_none()));
    let subset = match (&service, split) {
        (Some(service), Some(split)) => split.choose(matched, service, &mut local.rng.borrow_mut()),
        _ => Ok(None),
    };
    let none_healthy = service.is_none();
    let (Some(service), Ok(subset)) = (service, subset) else {
        metrics.reject(Reject::NoEndpoint);
        let outcome = Outcome::refused(503, started);
        log_access(info, head, &request, Some(&route), &outcome);
        let body = match none_healthy {
            true => format!("service {:?} has no healthy endpoints", &*route.service),
            false => format!(
                "service {:?} has no routable endpoint in this route's split",
                &*route.service
            ),
        };
        return answer(
            local,
            client,
            503,
            "Service Unavailable",
            &body,
            close_on_refusal,
        )
        .await;
    };
    if let Some(ours) = &service.via {
        // Through another datacenter's proxy: it must not send this on.
        wire::mark_failover(head, ours);
    }
    if let Framing::Length(n) = request.framing {
        if route.max_body_bytes > 0 && n > route.max_body_bytes {
            metrics.reject(Reject::BodyTooLarge);
            let outcome = Outcome::refused(413, started);
            log_access(info, head, &request, Some(&route), &outcome);
            let body = format!(
                "request body of {n} bytes is over this route's limit of {} (max_body_bytes)",
                route.max_body_bytes
            );
            return answer(local, client, 413, "Content Too Large", &body, true).await;
        }
    }
    if request.expect_continue
        && request.framing != Framing::None
        && client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return Next::Close;
    }
    // A body that is already here travels with the head, so the request can
    // be sent again to another endpoint.
    let mut body = request.framing;
    if let Framing::Length(n) = body {
        if let Ok(n) = usize::try_from(n) {
            if n <= cbuf.len() {
                head.extend_from_slice(&cbuf.filled()[..n]);
                cbuf.consume(n);
                body = Framing::None;
            }
        }
    }
    let replayable = body == Framing::None;

    let mut outcome = Outcome::refused(0, started);
    let exchange = Exchange {
        local,
        client,
        cbuf,
        ubuf,
        reply,
    };
    let mut rendered = Vec::new();
    let response_edits = match route.rewrite.as_ref().filter(|r| !r.response.is_empty()) {
        Some(r) => {
            let cx = crate::policy::Context {
                client_ip: &info.ip_text,
                request_id: access::header(head, "x-request-id"),
                host: request.host.as_str(),
                service: &r.service,
            };
            r.response.write_lines(&cx, &mut rendered);
            Some((&r.response, &rendered[..]))
        }
        None => None,
    };
    let req = Forward {
        head,
        request: &request,
        route: &route,
        body,
        replayable,
        response_edits,
        subset: split.zip(subset).map(|(s, at)| &*s.subsets[at].tag),
        compress,
    };
    let next = forward(exchange, req, service, key, &mut outcome).await;
    if let (Some(split), Some(at)) = (split, subset) {
        split.count(at, outcome.status >= 500);
    }
    log_access(info, head, &request, Some(&route), &outcome);
    next
}

/// How a request ended, for the access log.
#[derive(Default)]
struct Outcome {
    /// When the request began; `None` while the access log is off (then
    /// nothing is recorded).
    started: Option<u64>,
    /// What the client got; 0 when it went away first.
    status: u16,
    /// The endpoint that answered.
    endpoint: Option<Arc<EndpointStats>>,
    attempts: usize,
    /// The last attempt's wait for its endpoint's response head (ns; 0
    /// when none came).
    upstream_ns: u64,
}

impl Outcome {
    fn refused(status: u16, started: Option<u64>) -> Outcome {
        Outcome {
            started,
            status,
            ..Outcome::default()
        }
    }
}

/// Writes the access log line of one request, when logging is on.
fn log_access(
    info: &Client,
    head: &[u8],
    request: &Request,
    route: Option<&Route>,
    outcome: &Outcome,
) {
    let Some(started) = outcome.started else {
        return;
    };
    let (route, service) = route.map_or(("", ""), |r| (&*r.name, &*r.service));
    let (method, path) = access::request_line(head);
    let (node, endpoint) = outcome
        .endpoint
        .as_ref()
        .map_or(("", ""), |e| (&*e.node, &*e.id));
    access::write(&access::Entry {
        time: access::now(),
        request_id: access::header(head, "x-request-id"),
        route,
        client: info.ip,
        protocol: "HTTP/1.1",
        method,
        host: request.host.as_str(),
        path,
        status: outcome.status,
        service,
        node,
        endpoint,
        attempts: outcome.attempts,
        retries: outcome.attempts.saturating_sub(1),
        duration_ms: now_ns().saturating_sub(started) as f64 / 1e6,
        upstream_ms: outcome.upstream_ns as f64 / 1e6,
    });
}

/// Why an attempt did not produce a response for the client.
enum Failure {
    /// Nothing reached the endpoint: always safe to try another.
    Connect,
    /// The endpoint answered 502/503; the response was not forwarded.
    Status(u16),
    /// The connection broke or the response was malformed.
    Broken,
    /// No response head in time.
    Timeout,
    /// The client went away or sent a bad body: end without answering.
    Client,
    /// The client sent its body below `http.min_body_rate`: 408, then close.
    SlowClient,
}

/// A request body's minimum pace: `rate` bytes/s on average, counted from
/// `start` once `grace` has passed (`http.min_body_rate` after a grace of
/// `http.header_timeout`), so that a client trickling a body cannot hold a
/// connection and an upstream one for `body_timeout` per byte.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    start: Instant,
    grace: Duration,
    rate: u64,
}

impl Pace {
    pub(crate) fn new(rate: u64, grace: Duration) -> Option<Pace> {
        (rate > 0).then(|| Pace {
            start: Instant::now(),
            grace,
            rate,
        })
    }

    /// How long the next wait for the body may last with `moved` bytes of it
    /// through: until the average would fall below the rate, and never over
    /// `stall`. True when the rate, not `stall`, is what limits it.
    pub(crate) fn wait(&self, moved: u64, stall: Duration) -> (Duration, bool) {
        let earned = Duration::from_millis(moved.saturating_mul(1000) / self.rate);
        let due = self.start + self.grace + earned;
        let left = due.saturating_duration_since(Instant::now());
        if left < stall {
            (left, true)
        } else {
            (stall, false)
        }
    }
}

/// The connection side of one exchange: the thread, the client connection,
/// its read buffer and the upstream's, and the response head being built.
/// Each step of the exchange (forward, each attempt) takes it whole.
struct Exchange<'a> {
    local: &'a Local,
    client: &'a mut Conn,
    cbuf: &'a mut Buf,
    ubuf: &'a mut Buf,
    reply: &'a mut Vec<u8>,
}

/// The request being forwarded: its head as it goes upstream, the request
/// as parsed, its route, how its body is framed, and whether it may be sent
/// again (no body to stream: a retry can replay it).
#[derive(Clone, Copy)]
struct Forward<'a> {
    head: &'a [u8],
    request: &'a Request,
    route: &'a Route,
    body: Framing,
    replayable: bool,
    /// The route's response header edits, their lines rendered.
    response_edits: Option<(&'a crate::policy::HeaderEdits, &'a [u8])>,
    /// The tag of the split subset it goes to.
    subset: Option<&'a str>,
    /// For a route that compresses: the coding the client takes, if any.
    compress: Option<Option<Coding>>,
}

/// Picks endpoints and attempts the request until one answers, the retry
/// budget or the endpoints run out, or the client goes away.
async fn forward(
    Exchange {
        local,
        client,
        cbuf,
        ubuf,
        reply,
    }: Exchange<'_>,
    req: Forward<'_>,
    mut service: Arc<ProxyService>,
    key: Option<u64>,
    outcome: &mut Outcome,
) -> Next {
    let Forward {
        request,
        route,
        replayable,
        ..
    } = req;
    let config = local.config();
    let metrics = &local.shared.metrics;
    let stats = match &service.stats {
        Some(stats) => stats.clone(),
        None => {
            outcome.status = 503;
            return answer(
                local,
                client,
                503,
                "Service Unavailable",
                "service not routed",
                true,
            )
            .await;
        }
    };
    let mut attempts = Attempts::new(
        Replay {
            replayable,
            idempotent: request.idempotent,
        },
        route.retries,
    );
    // One clock read serves the budget and the first pick.
    let mut now = now_ns();
    stats.note_request(now);
    stats.metrics.request(crate::metrics::Protocol::Http1);
    loop {
        let picked = attempts.pick(
            &mut service,
            &stats,
            crate::balance::Choice {
                subset: req.subset,
                ..route.choice(key)
            },
            now,
            &mut local.rng.borrow_mut(),
            // (A reload never picks another datacenter's proxies: the
            // head is written already, without their mark.)
            || {
                let reach = match request.failed_over {
                    true => Reach::Here,
                    false => Reach::L4,
                };
                local.service_anywhere_now(&route.service, reach)
            },
        );
        let Some(index) = picked else {
            metrics.reject(Reject::NoEndpoint);
            outcome.status = 502;
            return answer(
                local,
                client,
                502,
                "Bad Gateway",
                "every endpoint failed",
                true,
            )
            .await;
        };
        let backend = &service.backends[index as usize];
        outcome.attempts += 1;
        if outcome.started.is_some() {
            outcome.endpoint = Some(backend.stats.clone());
        }
        outcome.upstream_ns = 0;
        let lent = Exchange {
            local,
            client: &mut *client,
            cbuf: &mut *cbuf,
            ubuf: &mut *ubuf,
            reply: &mut *reply,
        };
        let result = attempt(lent, req, &stats, backend, &mut outcome.upstream_ns).await;
        backend.stats.leave();
        now = now_ns();
        let ending = match result {
            Ok((_, status)) => Ending::Answered {
                status,
                grpc: Grpc::No,
            },
            Err(Failure::Connect) => Ending::Unsent,
            Err(Failure::Status(status)) => Ending::Answered {
                status,
                grpc: Grpc::No,
            },
            Err(Failure::Broken) => Ending::Broken,
            Err(Failure::Timeout) => Ending::Timeout,
            Err(Failure::Client) => Ending::Client,
            Err(Failure::SlowClient) => Ending::SlowClient,
        };
        let verdict = attempts.judge(ending, backend, &service.backends, &stats, &config, now);
        let failure = match result {
            Ok((next, status)) => {
                // Relayed already: never retried.
                outcome.status = status;
                return next;
            }
            Err(failure) => failure,
        };
        if verdict == Verdict::Retry {
            continue;
        }
        outcome.status = match failure {
            Failure::Client => 0,
            Failure::SlowClient => 408,
            Failure::Timeout => 504,
            Failure::Status(status) => status,
            Failure::Connect | Failure::Broken => 502,
        };
        return match failure {
            Failure::Client => Next::Close,
            Failure::SlowClient => {
                metrics.reject(Reject::ClientTimeout);
                answer(
                    local,
                    client,
                    408,
                    "Request Timeout",
                    "request body too slow (http.min_body_rate)",
                    true,
                )
                .await
            }
            Failure::Timeout => {
                metrics.reject(Reject::UpstreamTimeout);
                answer(
                    local,
                    client,
                    504,
                    "Gateway Timeout",
                    "upstream did not answer in time",
                    true,
                )
                .await
            }
            Failure::Status(status) => {
                metrics.reject(Reject::UpstreamFailed);
                let body = format!("upstream answered {status}; retries exhausted");
                answer(
                    local,
                    client,
                    status,
                    if status == 503 {
                        "Service Unavailable"
                    } else {
                        "Bad Gateway"
                    },
                    &body,
                    true,
                )
                .await
            }
            Failure::Connect | Failure::Broken => {
                metrics.reject(Reject::UpstreamFailed);
                answer(
                    local,
                    client,
                    502,
                    "Bad Gateway",
                    "upstream connection failed",
                    true,
                )
                .await
            }
        };
    }
}

async fn connect(local: &Local, addr: std::net::SocketAddr, limit: Duration) -> Option<Conn> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            local.http_conn(stream)
        }
        _ => None,
    }
}

/// One try against one endpoint. `Ok` when the client got a response (with
/// the upstream status).
async fn attempt(
    Exchange {
        local,
        client,
        cbuf,
        ubuf,
        reply,
    }: Exchange<'_>,
    Forward {
        head,
        request,
        route,
        body,
        replayable,
        response_edits,
        compress,
        ..
    }: Forward<'_>,
    stats: &ServiceStats,
    backend: &Backend,
    head_ns: &mut u64,
) -> Result<(Next, u16), Failure> {
    let config = local.config();
    let mut pooled = local.pool_take(backend.addr);
    if !replayable {
        // The body will be streamed once: do not gamble on a stale connection.
        while let Some(stream) = pooled.take() {
            if stream.alive() {
                pooled = Some(stream);
                break;
            }
            pooled = local.pool_take(backend.addr);
        }
    }
    let started = now_ns();
    ubuf.clear();
    // A pooled connection the endpoint has closed meanwhile fails before any
    // response byte; the request then goes once more on a new connection.
    let (mut upstream, response) = loop {
        let reused = pooled.is_some();
        let mut upstream = match pooled.take() {
            Some(mut stream) => {
                local.place(&mut stream);
                stream
            }
            None => match connect(local, backend.addr, route.connect_timeout).await {
                Some(stream) => stream,
                None => {
                    backend.stats.metrics.connect_errors.inc();
                    return Err(Failure::Connect);
                }
            },
        };
        if !matches!(
            local
                .deadlines
                .within(config.body_timeout, upstream.write_all(head))
                .await,
            Some(Ok(()))
        ) {
            if reused && replayable {
                continue;
            }
            return Err(Failure::Broken);
        }
        if body != Framing::None {
            let mut none = Vec::new();
            let max = match route.max_body_bytes {
                0 => u64::MAX,
                max => max,
            };
            let pace = Pace::new(config.min_body_rate, config.header_timeout);
            match relay(
                local,
                cbuf,
                client,
                &mut upstream,
                body,
                &mut none,
                config.body_timeout,
                max,
                pace,
            )
            .await
            {
                Ok(()) => {}
                Err(Side::Source) => return Err(Failure::Client),
                Err(Side::Slow) => return Err(Failure::SlowClient),
                Err(Side::TooLarge) => {
                    local.shared.metrics.reject(Reject::BodyTooLarge);
                    return Err(Failure::Client);
                }
                Err(Side::Sink) => return Err(Failure::Broken),
            }
        }
        // After a spliceable response from this endpoint, the next head is
        // read on its own (in reads of HEAD_READ bytes), so that the body is
        // spliced nearly whole.
        let max = if backend.stats.large_responses() && local.splices() {
            HEAD_READ
        } else {
            usize::MAX
        };
        let response = loop {
            match local
                .deadlines
                .within(route.response_timeout, ubuf.fill_up_to(&mut upstream, max))
                .await
            {
                None => return Err(Failure::Timeout),
                Some(Ok(0)) | Some(Err(_)) if ubuf.is_empty() && reused && replayable => {
                    break None
                }
                Some(Ok(0)) | Some(Err(_)) => return Err(Failure::Broken),
                Some(Ok(_)) => {}
            }
            let close_client = !request.keep_alive || local.stopping();
            match wire::parse_response(
                ubuf.filled(),
                config.max_header_bytes,
                config.max_headers,
                request.is_head,
                close_client,
                response_edits,
                reply,
            ) {
                Ok(response) if (100..200).contains(&response.status) && response.status != 101 => {
                    // Interim responses (103 Early Hints) pass through; 100
                    // Continue was already sent by us.
                    if response.status != 100
                        && !matches!(
                            local
                                .deadlines
                                .within(WRITE_LIMIT, client.write_all(reply))
                                .await,
                            Some(Ok(()))
                        )
                    {
                        return Err(Failure::Client);
                    }
                    ubuf.consume(response.head_len);
                }
                Ok(response) => break Some(response),
                Err(HeadError::Partial) => {}
                Err(HeadError::TooLarge | HeadError::Bad(_)) => return Err(Failure::Broken),
            }
        };
        match response {
            Some(response) => break (upstream, response),
            None => {
                ubuf.clear();
                continue;
            }
        }
    };
    let now = now_ns();
    let rtt = now.saturating_sub(started);
    *head_ns = rtt;
    backend.stats.observe(rtt, now);
    stats.metrics.duration.observe(rtt as f64 / 1e9);
    // A compressing route's decision, read from the endpoint's head.
    let decision = match (route.compress.as_ref(), compress) {
        (Some(c), Some(coding)) => {
            let head = &ubuf.filled()[..response.head_len];
            let get = |name: &str| wire::header_in_head(head, name);
            let facts = HeadFacts {
                status: response.status,
                content_type: get("content-type"),
                content_encoding: get("content-encoding"),
                content_length: match response.framing {
                    Framing::Length(n) => Some(n),
                    Framing::None => Some(0),
                    _ => None,
                },
                content_range: get("content-range").is_some(),
                cache_control: get("cache-control"),
            };
            let varies = get("vary").is_some_and(crate::compress::varies);
            (c.decide(&facts, coding), varies)
        }
        _ => (Decision::AsIs, false),
    };
    ubuf.consume(response.head_len);
    backend
        .stats
        .note_response(matches!(response.framing, Framing::Length(n) if n >= SPLICE_ABOVE));
    let status = response.status;
    if (status == 502 || status == 503) && replayable && request.idempotent {
        // The caller decides whether another endpoint gets the request; the
        // 5xx body is not read, so the connection is dropped.
        backend.stats.metrics.by_class[4].inc();
        return Err(Failure::Status(status));
    }
    let class = usize::from(status / 100).clamp(1, 5) - 1;
    backend.stats.metrics.by_class[class].inc();

    if status == 101 {
        if !request.upgrade {
            return Err(Failure::Broken);
        }
        local.shared.metrics.upgrades.inc();
        if !matches!(
            local
                .deadlines
                .within(WRITE_LIMIT, client.write_all(reply))
                .await,
            Some(Ok(()))
        ) {
            return Ok((Next::Close, status));
        }
        tunnel(client.take(), upstream, cbuf, ubuf, &backend.stats).await;
        return Ok((Next::Close, status));
    }
    let close_client =
        !request.keep_alive || response.framing == Framing::Close || local.stopping();
    let relayed = match decision {
        (Decision::Compress(coding), varies) => {
            crate::compress::rewrite_head(reply, Some(coding), !varies);
            relay_compressed(
                local,
                ubuf,
                &mut upstream,
                client,
                response.framing,
                reply,
                config.body_timeout,
                coding,
            )
            .await
        }
        (decision, varies) => {
            if decision == Decision::Vary {
                crate::compress::rewrite_head(reply, None, !varies);
            }
            relay(
                local,
                ubuf,
                &mut upstream,
                client,
                response.framing,
                reply,
                config.body_timeout,
                u64::MAX,
                None,
            )
            .await
        }
    };
    match relayed {
        Ok(()) => {}
        Err(_) => return Ok((Next::Close, status)),
    }
    if response.reusable && ubuf.is_empty() {
        local.pool_put(backend, upstream);
    }
    let next = if close_client {
        Next::Close
    } else {
        Next::KeepAlive
    };
    Ok((next, status))
}

/// Most bytes the first read of a response takes when the endpoint's last
/// response was spliced: a head, and the start of the body that is copied
/// behind it before the rest is spliced.
const HEAD_READ: usize = 4096;

/// Body bytes up to this size are copied behind the head (one plain write);
/// larger ones are written beside it with writev.
const COPY_BELOW: usize = 4096;

/// Which end of a relay failed.
enum Side {
    Source,
    Sink,
    /// The body passed its limit (counted on the wire, chunk framing included).
    TooLarge,
    /// The source fell below its minimum pace.
    Slow,
}

/// Forwards one body of `framing` from `src` to `dst`: first the bytes
/// already in `buf`, then reads, each write following its read. `prefix`
/// (a head, possibly empty) goes out in the same write as the first bytes.
/// Bytes after the body stay in `buf`. The rest of a long enough
/// Content-Length body is spliced (`splice.rs`), never copied. A request
/// body keeps `pace` (each wait for `src` ends when it would fall below).
// Nine plain inputs of one copy loop, used in both directions (request and
// response bodies): a struct would only rename them at each call.
#[allow(clippy::too_many_arguments)]
async fn relay(
    local: &Local,
    buf: &mut Buf,
    src: &mut Conn,
    dst: &mut Conn,
    framing: Framing,
    prefix: &mut Vec<u8>,
    stall: Duration,
    max: u64,
    pace: Option<Pace>,
) -> Result<(), Side> {
    let mut chunks = Chunks::default();
    let mut relayed: u64 = 0;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        let (take, done) = match framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                left -= take as u64;
                (take, left == 0)
            }
            Framing::Chunked => chunks.scan(buf.filled()).map_err(|_| Side::Source)?,
            Framing::Close => (buf.len(), false),
        };
        relayed = relayed.saturating_add(take as u64);
        if relayed > max {
            return Err(Side::TooLarge);
        }
        let written = if prefix.is_empty() {
            if take == 0 {
                Some(Ok(()))
            } else {
                local
                    .deadlines
                    .within(stall, dst.write_buf(buf, take))
                    .await
            }
        } else if take <= COPY_BELOW {
            prefix.extend_from_slice(&buf.filled()[..take]);
            let result = local.deadlines.within(stall, dst.write_all(prefix)).await;
            prefix.clear();
            result
        } else {
            // A large first chunk goes out beside the head in one message
            // instead of being copied behind it.
            let result = local
                .deadlines
                .within(stall, dst.write_both(prefix, buf, take))
                .await;
            prefix.clear();
            result
        };
        if !matches!(written, Some(Ok(()))) {
            return Err(Side::Sink);
        }
        buf.consume(take);
        if done {
            return Ok(());
        }
        if matches!(framing, Framing::Length(_))
            && left >= SPLICE_ABOVE
            && relayed.saturating_add(left) <= max
            && buf.is_empty()
        {
            if let Some(pipe) = local.take_pipe() {
                let paced = pace.map(|p| (p, relayed));
                match splice::exact(&pipe, src, dst, left, stall, paced).await {
                    Ok(()) => {
                        local.give_pipe(pipe);
                        local.shared.metrics.spliced_bytes.inc_by(left);
                        return Ok(());
                    }
                    Err(Broken::Unsupported) => {
                        local.give_pipe(pipe);
                        local.stop_splicing();
                    }
                    Err(Broken::Source) => return Err(Side::Source),
                    Err(Broken::Sink) => return Err(Side::Sink),
                    Err(Broken::Slow) => return Err(Side::Slow),
                }
            }
        }
        let (wait, by_rate) = pace.map_or((stall, false), |p| p.wait(relayed, stall));
        if wait.is_zero() && by_rate {
            return Err(Side::Slow);
        }
        match local.deadlines.within(wait, buf.fill(src)).await {
            Some(Ok(0)) if framing == Framing::Close => return Ok(()),
            None if by_rate => return Err(Side::Slow),
            Some(Ok(0)) | Some(Err(_)) | None => return Err(Side::Source),
            Some(Ok(_)) => buf.grow_if_full(MAX_BUFFER),
        }
    }
}

/// Forwards a response body of `framing` from `src` to `dst` compressed
/// with `coding`, as a chunked body: each read goes through the encoder and
/// whatever it has made goes out as a chunk (`head` with the first). Bytes
/// after the body stay in `buf`.
#[allow(clippy::too_many_arguments)]
async fn relay_compressed(
    local: &Local,
    buf: &mut Buf,
    src: &mut Conn,
    dst: &mut Conn,
    framing: Framing,
    head: &mut Vec<u8>,
    stall: Duration,
    coding: Coding,
) -> Result<(), Side> {
    let mut encoder = Some(Encoder::new(coding).map_err(|_| Side::Sink)?);
    let mut chunks = Chunks::default();
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut made = Vec::new();
    let mut ended = false;
    loop {
        let mut done = false;
        if let Some(enc) = encoder.as_mut() {
            match framing {
                Framing::None => done = true,
                Framing::Length(_) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    enc.write(&buf.filled()[..take]).map_err(|_| Side::Sink)?;
                    buf.consume(take);
                    left -= take as u64;
                    done = left == 0;
                }
                Framing::Chunked => loop {
                    let piece = chunks.decode(buf.filled()).map_err(|_| Side::Source)?;
                    buf.consume(piece.framing);
                    if piece.data > 0 {
                        enc.write(&buf.filled()[..piece.data])
                            .map_err(|_| Side::Sink)?;
                        buf.consume(piece.data);
                    }
                    if piece.done {
                        done = true;
                        break;
                    }
                    if piece.framing == 0 && piece.data == 0 {
                        break;
                    }
                },
                Framing::Close => {
                    enc.write(buf.filled()).map_err(|_| Side::Sink)?;
                    let all = buf.len();
                    buf.consume(all);
                    done = ended;
                }
            }
        }
        match (done, encoder.take()) {
            (true, Some(enc)) => enc.finish_into(&mut made).map_err(|_| Side::Sink)?,
            (_, Some(mut enc)) => {
                enc.drain_into(&mut made);
                encoder = Some(enc);
            }
            (_, None) => {}
        }
        if !made.is_empty() {
            head.extend_from_slice(format!("{:x}\r\n", made.len()).as_bytes());
            head.append(&mut made);
            head.extend_from_slice(b"\r\n");
        }
        if done {
            head.extend_from_slice(b"0\r\n\r\n");
        }
        if !head.is_empty() {
            let written = local.deadlines.within(stall, dst.write_all(head)).await;
            head.clear();
            if !matches!(written, Some(Ok(()))) {
                return Err(Side::Sink);
            }
        }
        if done {
            return Ok(());
        }
        match local.deadlines.within(stall, buf.fill(src)).await {
            // A body that ends with the connection: finished on the next turn.
            Some(Ok(0)) if framing == Framing::Close => ended = true,
            Some(Ok(0)) | Some(Err(_)) | None => return Err(Side::Source),
            Some(Ok(_)) => buf.grow_if_full(MAX_BUFFER),
        }
    }
}

/// After a 101: bytes already read on either side go first, then both
/// directions are copied until either side closes, or until the endpoint's
/// drain deadline cuts the tunnel.
async fn tunnel(
    client: Conn,
    upstream: Conn,
    cbuf: &mut Buf,
    ubuf: &mut Buf,
    stats: &EndpointStats,
) {
    use tokio::io::AsyncWriteExt;
    let (Some(mut client), Some(mut upstream)) = (client.into_tokio(), upstream.into_tokio())
    else {
        return;
    };
    if !ubuf.is_empty() {
        if client.write_all(ubuf.filled()).await.is_err() {
            return;
        }
        ubuf.clear();
    }
    if !cbuf.is_empty() {
        if upstream.write_all(cbuf.filled()).await.is_err() {
            return;
        }
        cbuf.clear();
    }
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = stats.drain_deadline() => stats.note_cut(),
    }
}
