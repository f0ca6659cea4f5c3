//! Client-facing HTTP/2 (prior knowledge, and ALPN `h2` over TLS) on the
//! h2 crate, without hyper's server: one task per connection carries every
//! stream of it (no task per stream), each a future in the connection's
//! own set, polled when its own wake-up comes. A request goes to
//! `H2Tls::handle` like every other on this side; its response is sent by
//! `h2_body::send_body` (the client's window paces it; a failed body, cut at
//! a drain deadline, resets the stream with CANCEL). A stream the client
//! resets drops its exchange (the upstream stream is reset in turn).
//!
//! The connection ends gracefully (two-step GOAWAY by h2: streams in
//! progress finish) at shutdown, when idle past its limits, and past
//! `http.h2.max_connection_age`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::body::{Body, Bytes};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::h2_body::{send_body, Received};
use crate::h2_tls::{Activity, Exchange, H2Tls, ProxyBody};
use crate::metrics::GoAway;

/// Streams a client may open at once.
const MAX_STREAMS: u32 = 200;
/// Receive windows: a stream's and the connection's.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Largest header list a client may send.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Most response bytes buffered per stream beyond the client's window.
const MAX_SEND_BUFFER: usize = 400 << 10;

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
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = h2.shared.config.load_full();
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    let handshake = builder.handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(config.header_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
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
    // Once a GOAWAY is sent: how long the streams in progress may take.
    let mut closing: Option<Option<tokio::time::Instant>> = None;
    let goaway = |connection: &mut h2::server::Connection<I, Bytes>,
                  why: GoAway,
                  grace: Option<Duration>| {
        h2.shared.metrics.goaway(why);
        connection.graceful_shutdown();
        Some(grace.map(|grace| tokio::time::Instant::now() + grace))
    };
    loop {
        let deadline = async {
            match closing {
                Some(Some(deadline)) => tokio::time::sleep_until(deadline).await,
                _ => std::future::pending().await,
            }
        };
        // Streams first: every stream that can make progress queues its
        // frames before the connection is polled again, and that poll
        // writes them all at once (one write for many responses, where
        // polling the connection after each stream's step wrote each alone).
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    first.notify_one();
                    let exchange = Exchange::begin(&activity);
                    streams.push(exchange_stream(h2.clone(), request, respond, peer, proto, exchange));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection error");
                    break;
                }
                // Closed: every stream is done, or the connection failed.
                None => break,
            },
            () = &mut aged, if closing.is_none() => {
                // The streams in progress finish within the shutdown grace;
                // the client reconnects for new ones.
                closing = goaway(&mut connection, GoAway::MaxAge, Some(config.shutdown_grace));
            }
            () = &mut idle, if closing.is_none() => {
                // A client that does not answer the GOAWAY's PING is cut
                // after header_timeout.
                closing = goaway(&mut connection, GoAway::Idle, Some(config.header_timeout));
            }
            () = &mut stop, if closing.is_none() => {
                closing = goaway(&mut connection, GoAway::Shutdown, None);
            }
            () = deadline => break,
        }
    }
}

/// One stream: the request handled, its response sent; ended early when
/// the client resets it.
async fn exchange_stream(
    h2: Arc<H2Tls>,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: IpAddr,
    proto: &'static str,
    exchange: Exchange,
) {
    let request = request.map(Received::new);
    let handled = h2.handle(request, peer, proto);
    let mut handled = std::pin::pin!(handled);
    // The client may reset the stream while the answer is being made:
    // then the exchange is dropped (and its upstream stream reset).
    let response = std::future::poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        handled.as_mut().poll(cx).map(Some)
    })
    .await;
    if let Some(response) = response {
        send(respond, response).await;
    }
    drop(exchange);
}

/// Sends `response` on its stream: the head, then the body as the client's
/// window allows, then the trailers.
async fn send(mut respond: h2::server::SendResponse<Bytes>, response: Response<ProxyBody>) {
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(out) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if !end {
        send_body(body, out).await;
    }
}
