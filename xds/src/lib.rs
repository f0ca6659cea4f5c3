//! Switchyard's xDS server: the registry as the control plane of proxyless
//! gRPC clients (`xds:///service`) and Envoy, over the Aggregated Discovery
//! Service, state of the world.
//!
//! - `resources.rs`: the resources of a service (Listener, Cluster,
//!   ClusterLoadAssignment), the assignment encoded at publish time by a
//!   view decorator;
//! - `stream.rs`: one stream's protocol state (subscriptions, ACK/NACK,
//!   nonces, what to send next), without I/O;
//! - `server.rs`: the gRPC service, a task per stream woken by the catalog's
//!   per-service wake-ups.

mod config;
mod metrics;
mod resources;
mod server;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::core::v3::Node;
use serde::Serialize;
use switchyard_catalog::ExtraKey;
use switchyard_registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::Status;

pub use config::XdsConfig;
pub use metrics::XdsMetrics;
pub use resources::{
    service_of, Kind, LbPolicy, Policies, Resource, XdsDecorator, XdsView, CLUSTER_PREFIX,
    ZONE_META,
};
pub use stream::{Reply, RequestError, Source, StreamState};

/// Whether a presented token may read (`None`: no tokens are configured).
pub type Authorizer = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xds server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// An assignment with failover priorities and what it was built from (our
/// assignment and the copies' views, held so that a match is the same
/// build, never a new one at a freed address).
pub(crate) struct Failover {
    pub(crate) local: Option<Arc<Resource>>,
    pub(crate) remote: Vec<Arc<switchyard_catalog::ServiceView>>,
    pub(crate) built: Arc<Resource>,
}

/// The xDS server's handle: cheap to clone.
#[derive(Clone)]
pub struct Xds {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    registry: Registry,
    key: ExtraKey<XdsDecorator>,
    shapes: resources::Shapes,
    policies: watch::Sender<Arc<Policies>>,
    config: XdsConfig,
    metrics: Arc<XdsMetrics>,
    clients: Clients,
    streams: AtomicUsize,
    authorize: Option<Authorizer>,
    /// True once the server stops: every stream ends (cleanly, so clients
    /// reconnect to another agent at once).
    stopping: watch::Sender<bool>,
    /// Other datacenters' copies: failover priorities in assignments.
    elsewhere: Option<Arc<dyn switchyard_catalog::Elsewhere>>,
    /// Assignments with failover priorities, by name, with what they were
    /// built from.
    failovers: Mutex<HashMap<Arc<str>, Failover>>,
}

impl Xds {
    /// `key`: where the registry's views hold [`XdsDecorator`]'s output.
    pub fn new(
        config: XdsConfig,
        registry: Registry,
        key: ExtraKey<XdsDecorator>,
        policies: Policies,
        metrics: Arc<XdsMetrics>,
        authorize: Option<Authorizer>,
    ) -> Xds {
        Xds {
            inner: Arc::new(Inner {
                registry,
                key,
                shapes: resources::Shapes::default(),
                policies: watch::Sender::new(Arc::new(policies)),
                config,
                metrics,
                clients: Clients::default(),
                streams: AtomicUsize::new(0),
                authorize,
                stopping: watch::Sender::new(false),
                elsewhere: None,
                failovers: Mutex::default(),
            }),
        }
    }

    /// Assignments carry the failover datacenters' routable endpoints
    /// (`[federation] failover`, or a service's `switchyard.failover=` tag)
    /// as lower priorities. Call before serving.
    pub fn with_elsewhere(mut self, elsewhere: Arc<dyn switchyard_catalog::Elsewhere>) -> Xds {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.elsewhere = Some(elsewhere);
        }
        self
    }

    /// New balancing policies (a reload): every stream's Listeners and
    /// Clusters are compared again and the changed ones pushed.
    pub fn set_policies(&self, policies: Policies) {
        self.inner.policies.send_replace(Arc::new(policies));
    }

    /// Serves ADS on `listener` until `shutdown` completes; then its streams
    /// end.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), XdsError> {
        let stopping = &self.inner.stopping;
        let shutdown = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .add_service(server::service(self.inner.clone()))
            .serve_with_incoming_shutdown(server::incoming(listener), shutdown)
            .await?;
        Ok(())
    }

    /// The clients connected now.
    pub fn clients(&self) -> Vec<ClientStatus> {
        self.inner.clients.list()
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.inner.streams.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// With tokens configured a stream needs one with the `read` role, in
    /// `x-consul-token` or `authorization: Bearer`.
    fn authorize(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(check) = &self.authorize else {
            return Ok(());
        };
        let token = metadata
            .get("x-consul-token")
            .map(|v| v.as_bytes())
            .or_else(|| {
                metadata
                    .get("authorization")
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            });
        match token {
            None => Err(Status::unauthenticated(
                "xds: a token with the read role is needed (x-consul-token, or authorization: Bearer)",
            )),
            Some(token) if check(token) => Ok(()),
            Some(_) => Err(Status::permission_denied(
                "xds: the token is not known, or lacks the read role",
            )),
        }
    }
}

/// One connected stream, as operators see it.
pub(crate) struct Client {
    id: u64,
    peer: Option<SocketAddr>,
    since_ms: u64,
    node: Mutex<(String, String, String)>,
    subscriptions: AtomicUsize,
    pushes: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    last_nack: Mutex<Option<String>>,
}

impl Client {
    fn node_id(&self) -> String {
        self.node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    fn user_agent(&self) -> String {
        self.node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }

    fn set_node(&self, node: &Node) {
        let locality = node
            .locality
            .as_ref()
            .map(|l| match l.zone.is_empty() {
                true => l.region.clone(),
                false => format!("{}/{}", l.region, l.zone),
            })
            .unwrap_or_default();
        let agent = match &node.user_agent_version_type {
            Some(
                envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v),
            ) => format!("{} {v}", node.user_agent_name),
            _ => node.user_agent_name.clone(),
        };
        // Client-chosen text, logged and shown: bounded.
        let clip = |s: String| match s.char_indices().nth(256) {
            Some((at, _)) => s[..at].to_string(),
            None => s,
        };
        *self.node.lock().unwrap_or_else(PoisonError::into_inner) =
            (clip(node.id.clone()), clip(agent), clip(locality));
    }

    fn last_nack(&self) -> Option<String> {
        self.last_nack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_last_nack(&self, kind: Kind, message: &str) {
        let text: String = message.chars().take(512).collect();
        *self
            .last_nack
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(format!("{}: {text}", kind.label()));
    }
}

/// An xDS client in `switchyard status`, the dashboard and
/// `/v1/switchyard/xds`.
#[derive(Clone, Debug, Serialize)]
pub struct ClientStatus {
    pub node: String,
    pub user_agent: String,
    pub locality: String,
    pub peer: Option<SocketAddr>,
    pub connected_ms: u64,
    pub subscriptions: usize,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

#[derive(Default)]
struct Clients {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Client>>>,
}

impl Clients {
    fn open(&self, peer: Option<SocketAddr>) -> Arc<Client> {
        let client = Arc::new(Client {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            peer,
            since_ms: switchyard_catalog::unix_ms(),
            node: Mutex::default(),
            subscriptions: AtomicUsize::new(0),
            pushes: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            last_nack: Mutex::new(None),
        });
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(client.id, client.clone());
        client
    }

    fn close(&self, client: &Client) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&client.id);
    }

    fn list(&self) -> Vec<ClientStatus> {
        let open: Vec<Arc<Client>> = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut list: Vec<ClientStatus> = open
            .iter()
            .map(|c| {
                let (node, user_agent, locality) = c
                    .node
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                ClientStatus {
                    node,
                    user_agent,
                    locality,
                    peer: c.peer,
                    connected_ms: c.since_ms,
                    subscriptions: c.subscriptions.load(Ordering::Relaxed),
                    pushes: c.pushes.load(Ordering::Relaxed),
                    acks: c.acks.load(Ordering::Relaxed),
                    nacks: c.nacks.load(Ordering::Relaxed),
                    last_nack: c.last_nack(),
                }
            })
            .collect();
        list.sort_by(|a, b| {
            a.node
                .cmp(&b.node)
                .then(a.connected_ms.cmp(&b.connected_ms))
        });
        list
    }
}
