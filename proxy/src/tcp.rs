//! The L4 TCP proxy: each `[[tcp.listeners]]` entry sends its connections to
//! one registry service. One upstream connection per client connection;
//! bytes are copied both ways on the proxy threads, with each side's end of
//! stream passed on as a half-close. Endpoints, balancers, in-flight counts
//! and drains are the L7 proxy's: an open connection counts as in flight on
//! its endpoint until it closes, and is cut at the endpoint's drain deadline.
//!
//! The bytes go through the thread's io_uring (`switchyard-uring`) unless
//! `[tcp] io_uring = false` or the kernel refuses it; then through a
//! recv/send loop on the runtime (`pipe`).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use switchyard_uring::Ring;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::attempts::Attempts;
use crate::balance::hash64;
use crate::config::BalancerKind;
use crate::failover::Reach;
use crate::local::{Busy, Local};
use crate::metrics::{TcpMetrics, TcpOutcome};
use crate::stats::{now_ns, EndpointStats};

/// Most endpoints one client connection is offered to before it is closed.
const MAX_CONNECT_TRIES: usize = 3;

/// One listener: its position in `[[tcp.listeners]]` (whose settings a
/// reload may change) and its metrics.
pub(crate) struct TcpRoute {
    pub(crate) index: usize,
    pub(crate) metrics: TcpMetrics,
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    local: Rc<Local>,
    route: Arc<TcpRoute>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let busy = Busy::enter(&local);
    let outcome = proxy(&local, &route, client, peer).await;
    route.metrics.count(outcome);
    drop(busy);
}

async fn proxy(
    local: &Local,
    route: &TcpRoute,
    mut client: TcpStream,
    peer: SocketAddr,
) -> TcpOutcome {
    let tcp = local.tcp();
    let Some(config) = tcp.listeners.get(route.index) else {
        return TcpOutcome::NoEndpoint;
    };
    let kind = config.balancer.kind();
    let key = (kind == BalancerKind::ConsistentHash).then(|| match peer.ip() {
        std::net::IpAddr::V4(ip) => hash64(&ip.octets()),
        std::net::IpAddr::V6(ip) => hash64(&ip.octets()),
    });
    let Some(mut service) = local.service_anywhere(&config.service, Reach::L4).await else {
        return TcpOutcome::NoEndpoint;
    };
    let Some(service_stats) = service.stats.clone() else {
        return TcpOutcome::NoEndpoint;
    };
    let outlier = local.config().outlier.clone();
    let mut attempts = Attempts::default();
    let (mut upstream, stats) = loop {
        let now = now_ns();
        let picked = attempts.pick(
            &mut service,
            &service_stats,
            crate::balance::Choice::new(kind, key),
            now,
            &mut local.rng.borrow_mut(),
            || local.service_anywhere_now(&config.service, Reach::L4),
        );
        let Some(index) = picked else {
            return if attempts.made() == 0 {
                TcpOutcome::NoEndpoint
            } else {
                TcpOutcome::ConnectFailed
            };
        };
        let backend = &service.backends[index as usize];
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                backend.stats.succeeded(now_ns());
                break (stream, backend.stats.clone());
            }
            _ => {
                backend.stats.leave();
                backend.stats.metrics.connect_errors.inc();
                backend
                    .stats
                    .failed(now_ns(), &outlier, &service_stats, &service.backends);
                if attempts.made() >= MAX_CONNECT_TRIES.min(service.backends.len()) {
                    return TcpOutcome::ConnectFailed;
                }
            }
        }
    };
    drop(service);
    let _ = client.set_nodelay(true);
    let ring = if tcp.io_uring { local.ring() } else { None };
    let metrics = &local.shared.metrics;
    let outcome = match ring {
        Some(ring) => {
            metrics.relayed_io_uring.inc();
            relay(&ring, client, upstream, config.idle_timeout, &stats).await
        }
        None => {
            metrics.relayed_copy.inc();
            let mut up = local.take_buffer();
            let mut down = local.take_buffer();
            let outcome = pipe(
                &mut client,
                &mut upstream,
                up.space(),
                down.space(),
                config.idle_timeout,
                &stats,
            )
            .await;
            local.give_buffer(up);
            local.give_buffer(down);
            outcome
        }
    };
    stats.leave();
    outcome
}

/// `pipe` through the thread's ring: the ring owns both sockets from here
/// and closes them once the kernel is done with them.
async fn relay(
    ring: &Rc<Ring>,
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    stats: &EndpointStats,
) -> TcpOutcome {
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "L4 connection cannot leave the runtime for the ring");
            return TcpOutcome::Closed;
        }
    };
    let relay = ring.relay(client.into(), upstream.into());
    let watchdog = async {
        loop {
            tokio::time::sleep(idle).await;
            if !relay.take_moved() {
                return;
            }
        }
    };
    // Leaving by a timeout or the drain deadline drops the relay: both
    // sockets are shut down.
    tokio::select! {
        _ = relay.finished() => TcpOutcome::Closed,
        _ = watchdog => TcpOutcome::IdleTimeout,
        _ = stats.drain_deadline() => {
            stats.note_cut();
            TcpOutcome::DrainCut
        }
    }
}

/// Copies both ways until both directions have ended, either side fails,
/// nothing moves for `idle`, or the endpoint's drain deadline passes.
async fn pipe(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    up: &mut [u8],
    down: &mut [u8],
    idle: Duration,
    stats: &EndpointStats,
) -> TcpOutcome {
    let moved = Cell::new(false);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let both = async {
        let _ = tokio::try_join!(
            one_way(&mut cr, &mut uw, up, &moved),
            one_way(&mut ur, &mut cw, down, &moved)
        );
    };
    let watchdog = async {
        loop {
            moved.set(false);
            tokio::time::sleep(idle).await;
            if !moved.get() {
                return;
            }
        }
    };
    tokio::select! {
        _ = both => TcpOutcome::Closed,
        _ = watchdog => TcpOutcome::IdleTimeout,
        _ = stats.drain_deadline() => {
            stats.note_cut();
            TcpOutcome::DrainCut
        }
    }
}

/// Copies `src` to `dst` until `src` ends, then half-closes `dst`.
async fn one_way(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    buf: &mut [u8],
    moved: &Cell<bool>,
) -> std::io::Result<()> {
    loop {
        let n = src.read(buf).await?;
        if n == 0 {
            return dst.shutdown().await;
        }
        dst.write_all(&buf[..n]).await?;
        moved.set(true);
    }
}
