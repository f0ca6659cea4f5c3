//! Switchyard DNS: authoritative service discovery answered from registry snapshots.
//!
//! Answers are built per service view at publish time (`DnsDecorator`, run by
//! the registry writer); the UDP workers and the TCP server share one answer
//! engine (`answer.rs`) over the current snapshot, loaded lock-free per query.
//! Depends on `switchyard-registry` for the snapshot types, never on the proxy.
#![forbid(unsafe_code)]

mod answer;
mod config;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod prebuilt;
mod ptr;
mod server;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use switchyard_catalog::{Elsewhere, ExtraKey, Snapshot};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use metrics::DnsMetrics;
pub use prebuilt::{DnsDecorator, DnsService};

/// The sockets of a DNS server: one UDP socket per worker (a SO_REUSEPORT
/// group) and the TCP listener, all on one address.
pub struct DnsSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: std::net::TcpListener,
}

impl DnsSockets {
    /// Second handles on the same sockets (the kernel objects are shared).
    pub fn try_clone(&self) -> std::io::Result<DnsSockets> {
        Ok(DnsSockets {
            udp: self
                .udp
                .iter()
                .map(std::net::UdpSocket::try_clone)
                .collect::<Result<_, _>>()?,
            tcp: self.tcp.try_clone()?,
        })
    }
}

/// A running DNS server (UDP workers + TCP task).
pub struct DnsServer {
    addr: SocketAddr,
    /// Kept to hand the sockets to a new process (binary upgrade).
    sockets: DnsSockets,
    stop: Arc<AtomicBool>,
    stop_tcp: watch::Sender<bool>,
    udp: Vec<JoinHandle<()>>,
    tcp: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Binds UDP and TCP on `config.addr` (or serves on `inherited` sockets
    /// from the process this one upgrades) and starts serving. `answers` is
    /// the key the registry's `Decorators` gave the `DnsDecorator`; other
    /// datacenters' copies (`elsewhere`) hold theirs under the same key.
    pub async fn start(
        config: Arc<Config>,
        datacenter: &str,
        answers: ExtraKey<DnsDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<DnsMetrics>,
        inherited: Option<DnsSockets>,
        elsewhere: Option<Arc<dyn Elsewhere>>,
    ) -> std::io::Result<DnsServer> {
        let bound = match inherited {
            Some(sockets) => sockets,
            None => {
                let (udp, tcp) = server::bind(config.addr, config.udp_workers)?;
                DnsSockets { udp, tcp }
            }
        };
        let kept = bound.try_clone()?;
        let DnsSockets {
            udp: sockets,
            tcp: listener,
        } = bound;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ptr = Arc::new(ptr::Ptr::new());
        let builder = ptr::spawn_builder(
            ptr.clone(),
            snapshot.clone(),
            datacenter.to_ascii_lowercase(),
            config.domain.clone(),
            stop.clone(),
        )?;
        let engine = Arc::new(answer::Engine::new(
            config.clone(),
            datacenter,
            answers,
            snapshot,
            metrics,
            ptr,
            elsewhere,
        ));
        let runtime = tokio::runtime::Handle::current();
        let mut udp = match server::spawn_udp(engine.clone(), sockets, stop.clone(), runtime) {
            Ok(handles) => handles,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        udp.push(builder);
        let (stop_tcp, stop_rx) = watch::channel(false);
        let tcp = tokio::spawn(server::serve_tcp(
            engine,
            listener,
            server::TcpLimits {
                max_connections: config.max_tcp_connections,
                max_per_client: config.max_tcp_connections_per_client,
                idle: config.tcp_idle_timeout,
            },
            stop_rx,
        ));
        Ok(DnsServer {
            addr,
            sockets: kept,
            stop,
            stop_tcp,
            udp,
            tcp,
        })
    }

    /// The bound address (UDP and TCP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handles on the listening sockets, for a new process to serve on.
    pub fn sockets(&self) -> &DnsSockets {
        &self.sockets
    }

    /// Stops accepting, lets the workers finish the query in hand, and joins them.
    pub async fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stop_tcp.send(true);
        let _ = self.tcp.await;
        let udp = self.udp;
        let _ = tokio::task::spawn_blocking(move || {
            for handle in udp {
                let _ = handle.join();
            }
        })
        .await;
    }
}
