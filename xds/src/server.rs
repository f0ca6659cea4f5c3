//! The ADS server: tonic's gRPC server, one task per stream. A stream task
//! waits on its client's requests and on the catalog's per-service wake-ups
//! of the services it subscribed to (a change elsewhere wakes nobody), and
//! sends what changed while its outbound slot has room: a slow client holds
//! at most that slot's responses, and later changes coalesce meanwhile.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::sync::PoisonError;

use switchyard_catalog::{failover_policy, Copied, CopyOf, ServiceView, Snapshot};
use switchyard_registry::WatchKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::resources::{
    empty_assignment, service_of, with_failover, Kind, Policies, Resource, XdsView, FAILOVER_DEPTH,
};
use crate::stream::{Reply, RequestError, Source, StreamState};
use crate::{Client, Inner};

/// Responses a stream may have queued for its client.
const SLOT: usize = 4;

pub(crate) struct Ads(pub(crate) Arc<Inner>);

type Responses = ReceiverStream<Result<DiscoveryResponse, Status>>;
type DeltaResponses =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let inner = &self.0;
        inner.authorize(request.metadata()).inspect_err(|_| {
            inner.metrics.refused("token").inc();
        })?;
        let ticket = Ticket::take(inner)?;
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(SLOT);
        tokio::spawn(run(inner.clone(), ticket, peer, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented(
            "xds: only state-of-the-world ADS (StreamAggregatedResources) is served",
        ))
    }
}

/// A stream counted against `[xds] max_streams` while it lives.
struct Ticket(Arc<Inner>);

impl Ticket {
    fn take(inner: &Arc<Inner>) -> Result<Ticket, Status> {
        let max = inner.config.max_streams;
        let open = inner.streams.fetch_add(1, Ordering::AcqRel);
        if open >= max {
            inner.streams.fetch_sub(1, Ordering::AcqRel);
            inner.metrics.refused("max_streams").inc();
            return Err(Status::resource_exhausted(format!(
                "xds: this agent serves at most {max} streams ([xds] max_streams)"
            )));
        }
        inner.metrics.streams.inc();
        Ok(Ticket(inner.clone()))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.streams.dec();
    }
}

/// The catalog as one flush sees it.
struct View<'a> {
    inner: &'a Inner,
    snapshot: &'a Snapshot,
    policies: &'a Policies,
}

impl Source for View<'_> {
    fn index(&self) -> u64 {
        self.snapshot.index()
    }

    fn resource(&self, kind: Kind, name: &str) -> Option<Arc<Resource>> {
        let service = service_of(kind, name)?;
        let view = self.snapshot.service(service);
        let policy = || self.policies.of(service);
        match kind {
            Kind::Listener => view.map(|_| self.inner.shapes.listener(name, service, policy())),
            Kind::Cluster => view.map(|_| self.inner.shapes.cluster(name, policy())),
            Kind::Endpoints => {
                let local = view.and_then(|v| v.extra(self.inner.key));
                if let Some(with) = self.failover(service, name, view, local) {
                    return Some(with);
                }
                Some(
                    local
                        .map(|x| x.assignment.clone())
                        .unwrap_or_else(|| empty_assignment(name)),
                )
            }
            Kind::Route => None,
        }
    }

    fn cluster_names(&self) -> Vec<Arc<str>> {
        self.snapshot
            .services()
            .map(|v| Arc::from(format!("{}{}", crate::CLUSTER_PREFIX, v.name)))
            .collect()
    }
}

impl View<'_> {
    /// The assignment with the failover datacenters' endpoints as lower
    /// priorities, when the service has a failover order and one of them
    /// has routable endpoints (copies are asked for, and so kept, here).
    /// Built once per (ours, their copies) and shared by every stream.
    fn failover(
        &self,
        service: &str,
        name: &str,
        view: Option<&Arc<ServiceView>>,
        local: Option<&XdsView>,
    ) -> Option<Arc<Resource>> {
        let elsewhere = self.inner.elsewhere.as_ref()?;
        let policy = view.and_then(|v| failover_policy(v));
        let order = elsewhere.order(policy);
        if order.is_empty() {
            return None;
        }
        let lower = service.to_ascii_lowercase();
        let mut remote = Vec::new();
        for dc in order.into_iter().take(FAILOVER_DEPTH) {
            if let Copied::Ready(copy) = elsewhere.copy(&dc, CopyOf::Service(&lower)) {
                if let Some(theirs) = copy.service_ci(&lower).filter(|v| v.routable_len() > 0) {
                    remote.push((dc, theirs.clone()));
                }
            }
        }
        if remote.is_empty() {
            return None;
        }
        let local_assignment = local.map(|l| l.assignment.clone());
        let same = |f: &crate::Failover| {
            let local_same = match (&f.local, &local_assignment) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            local_same
                && f.remote.len() == remote.len()
                && f.remote
                    .iter()
                    .zip(&remote)
                    .all(|(a, (_, b))| Arc::ptr_eq(a, b))
        };
        let mut cache = self
            .inner
            .failovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cache.get(name).filter(|f| same(f)) {
            return Some(cached.built.clone());
        }
        let built = with_failover(name, local, view.map(|v| &**v), self.inner.key, &remote);
        if cache.len() > 100_000 {
            cache.clear();
        }
        let entry = crate::Failover {
            local: local_assignment,
            remote: remote.into_iter().map(|(_, v)| v).collect(),
            built: built.clone(),
        };
        cache.insert(name.into(), entry);
        Some(built)
    }
}

type Wake = Pin<Box<dyn Future<Output = (Arc<str>, u64)> + Send>>;

/// How often a stream asks for the copies its assignments use, so that
/// they are kept (a copy nobody asks for expires).
const COPIES_KEPT: Duration = Duration::from_secs(60);

type Changed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A wait for the copies' next change, polled once so that it is
/// registered before the next flush reads them (one that is over already
/// marks the assignments and is made again).
async fn armed(
    elsewhere: &Arc<dyn switchyard_catalog::Elsewhere>,
    state: &mut StreamState,
) -> Changed {
    loop {
        let mut wait = arm_elsewhere(elsewhere.clone());
        let over =
            std::future::poll_fn(|cx| std::task::Poll::Ready(wait.as_mut().poll(cx).is_ready()))
                .await;
        if !over {
            return wait;
        }
        state.all_changed(Kind::Endpoints, Instant::now());
    }
}

/// Waits for any other datacenter's copy to change.
fn arm_elsewhere(elsewhere: Arc<dyn switchyard_catalog::Elsewhere>) -> Changed {
    Box::pin(async move {
        let notified = elsewhere.changed().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        notified.await;
    })
}

/// Waits for the next change of `service`: armed before the snapshot the
/// next flush reads, so no change falls between.
fn arm(inner: &Inner, service: Arc<str>, generation: u64) -> Wake {
    let notify = inner.registry.watch_key(WatchKey::Service(&service));
    let mut notified = Box::pin(notify.notified_owned());
    notified.as_mut().enable();
    Box::pin(async move {
        notified.await;
        (service, generation)
    })
}

async fn run(
    inner: Arc<Inner>,
    _ticket: Ticket,
    peer: Option<SocketAddr>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let client = inner.clients.open(peer);
    let mut state = StreamState::new(inner.config.max_subscriptions);
    let mut wakes: FuturesUnordered<Wake> = FuturesUnordered::new();
    // Services watched, each with the generation of its live wake-up (an
    // older one that fires after an unsubscription is dropped).
    let mut watched: HashMap<Arc<str>, u64> = HashMap::new();
    let mut generation = 0u64;
    let mut index = inner.registry.subscribe();
    let mut policies = inner.policies.subscribe();
    let mut stopping = inner.stopping.subscribe();
    // Other datacenters' copies: a change may change assignments with
    // failover priorities; asked again each minute, copies stay kept.
    let mut elsewhere = match &inner.elsewhere {
        Some(e) => Some(armed(e, &mut state).await),
        None => None,
    };
    let mut keep = tokio::time::interval(COPIES_KEPT);
    let mut counted = [0i64; 4];
    loop {
        if state.is_dirty() {
            match tx.try_reserve() {
                Ok(permit) => {
                    let snapshot = inner.registry.snapshot();
                    let now_policies = policies.borrow_and_update().clone();
                    let view = View {
                        inner: &inner,
                        snapshot: &snapshot,
                        policies: &now_policies,
                    };
                    if let Some((response, since)) = state.next(&view) {
                        if let Some(kind) = Kind::of_url(&response.type_url) {
                            inner.metrics.pushes(kind).inc();
                        }
                        if let Some(since) = since {
                            inner
                                .metrics
                                .push_seconds
                                .observe(since.elapsed().as_secs_f64());
                        }
                        client.pushes.fetch_add(1, Ordering::Relaxed);
                        permit.send(Ok(response));
                        continue;
                    }
                }
                Err(TrySendError::Full(())) => {}
                Err(TrySendError::Closed(())) => break,
            }
        }
        let blocked = state.is_dirty();
        tokio::select! {
            message = requests.message() => {
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %client.node_id(), %status, "xds: stream ended");
                        break;
                    }
                };
                let first = state.node.is_none() && request.node.is_some();
                match state.request(request) {
                    Ok(reply) => note(&inner, &client, &state, reply, first),
                    Err(error) => {
                        let status = match error {
                            RequestError::NoType => Status::invalid_argument(error.to_string()),
                            RequestError::TooMany(_) => {
                                inner.metrics.refused("max_subscriptions").inc();
                                Status::resource_exhausted(error.to_string())
                            }
                        };
                        tracing::warn!(node = %client.node_id(), %status, "xds: stream refused");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
                // Watch what is subscribed now.
                let services = state.services();
                watched.retain(|s, _| services.contains(s));
                for service in services {
                    if !watched.contains_key(&service) {
                        generation += 1;
                        watched.insert(service.clone(), generation);
                        wakes.push(arm(&inner, service, generation));
                    }
                }
                for kind in Kind::ALL {
                    let now = state.subscriptions(kind) as i64;
                    inner.metrics.subscriptions(kind).add(now - counted[kind.slot()]);
                    counted[kind.slot()] = now;
                }
                client.subscriptions.store(counted.iter().sum::<i64>() as usize, Ordering::Relaxed);
            }
            Some((service, at)) = wakes.next(), if !wakes.is_empty() => {
                if watched.get(&service) == Some(&at) {
                    wakes.push(arm(&inner, service.clone(), at));
                    state.changed(&service, Instant::now());
                }
            }
            changed = index.changed(), if state.wildcard_clusters() => {
                if changed.is_err() {
                    break;
                }
                state.all_changed(Kind::Cluster, Instant::now());
            }
            changed = policies.changed() => {
                if changed.is_ok() {
                    let now = Instant::now();
                    state.all_changed(Kind::Listener, now);
                    state.all_changed(Kind::Cluster, now);
                }
            }
            room = tx.reserve(), if blocked => {
                if room.is_err() {
                    break;
                }
            }
            () = tx.closed() => break,
            _ = stopping.changed() => break,
            () = async { elsewhere.as_mut().expect("guarded").await }, if elsewhere.is_some() => {
                if let Some(e) = &inner.elsewhere {
                    elsewhere = Some(armed(e, &mut state).await);
                }
                state.all_changed(Kind::Endpoints, Instant::now());
            }
            _ = keep.tick(), if inner.elsewhere.is_some() => {
                state.all_changed(Kind::Endpoints, Instant::now());
            }
        }
    }
    for kind in Kind::ALL {
        inner.metrics.subscriptions(kind).sub(counted[kind.slot()]);
    }
    inner.clients.close(&client);
    if client.id.is_multiple_of(64) {
        // Now and then, not at every close: 10,000 streams ending together
        // need not each walk every shape.
        inner.shapes.sweep();
    }
}

/// Logs and counts what a request was.
fn note(inner: &Inner, client: &Client, state: &StreamState, reply: Reply, first: bool) {
    if first {
        if let Some(node) = &state.node {
            client.set_node(node);
            tracing::info!(
                node = %client.node_id(),
                user_agent = %client.user_agent(),
                peer = ?client.peer,
                "xds: client connected"
            );
        }
    }
    match reply {
        Reply::Nack(kind, message) => {
            inner.metrics.nacks(kind).inc();
            client.nacks.fetch_add(1, Ordering::Relaxed);
            client.set_last_nack(kind, &message);
            // The client's text, as clipped for status.
            let error = client.last_nack().unwrap_or_default();
            tracing::warn!(
                node = %client.node_id(),
                %error,
                "xds: a client refused a response"
            );
        }
        Reply::Ack(_) => {
            client.acks.fetch_add(1, Ordering::Relaxed);
        }
        Reply::Subscribe(_) => {}
        Reply::Unknown => {
            tracing::debug!(node = %client.node_id(), "xds: a request of a type not served");
        }
    }
}

/// Accepted connections; an accept error (out of descriptors) pauses the
/// loop 100 ms instead of ending the server.
pub(crate) fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = Result<TcpStream, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), listener));
                }
                Err(error) => {
                    tracing::warn!(%error, "xds: accept failed; pausing 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

pub(crate) fn service(inner: Arc<Inner>) -> AggregatedDiscoveryServiceServer<Ads> {
    AggregatedDiscoveryServiceServer::new(Ads(inner)).max_decoding_message_size(4 << 20)
}
