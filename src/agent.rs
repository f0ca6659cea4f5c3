//! `switchyard agent`: builds the runtime, starts the registry writer, then the
//! API, prints the ready line, and drains on SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use switchyard_api::{self as api, AgentInfo, ApiState};
use switchyard_dns::{DnsDecorator, DnsMetrics, DnsServer};
use switchyard_proxy::{Proxy, ProxyDecorator, ProxyMetrics};
use switchyard_registry::{
    Command, Decorators, EmbeddedStore, EtcdStore, MemoryStore, Node, Registry, RegistryMetrics,
    Store, StoreKind,
};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::source::{host_name, ConfigSource};
use crate::upgrade::{self, UpgradeListener};

/// A data directory the agent made for itself (`--dev`) and removes on exit.
pub(crate) struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the listening sockets a starting agent serves on came from.
pub(crate) enum Predecessor {
    /// The agent this one upgrades: told on this stream once we serve.
    Process(std::os::unix::net::UnixStream),
    /// This process, after a successor took the sockets and never served:
    /// its DNS and proxy servers kept serving and stop once the resumed ones
    /// do.
    Same(Box<(DnsServer, Proxy)>),
}

/// How one run of `serve` ended.
enum Served {
    /// Stopped, or handed over to a successor that serves.
    Done,
    /// A successor took the sockets and failed before it served: serve on.
    Resume(Box<Resume>),
}

struct Resume {
    /// The running configuration (reloads included).
    config: AgentConfig,
    sockets: upgrade::Sockets,
    servers: (DnsServer, Proxy),
}

pub(crate) fn run(
    config: AgentConfig,
    source: ConfigSource,
    scratch: Option<ScratchDir>,
    inherited: Option<(upgrade::Sockets, Predecessor)>,
) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let mut config = config;
    crate::budget::Budget::draw(&mut config);
    let config = config;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.agent.worker_threads)
        .thread_name("switchyard")
        .enable_all()
        .build()
        .context("cannot build the runtime")?;
    // Read once, at start: once the binary at this path is replaced,
    // `/proc/self/exe` names a deleted file.
    let successor = upgrade::Successor::of_this_process();
    let (mut config, mut inherited) = (config, inherited);
    let result = loop {
        let serving = serve(config, source.clone(), inherited.take(), &successor);
        match runtime.block_on(serving) {
            Ok(Served::Done) => break Ok(()),
            Ok(Served::Resume(resume)) => {
                let Resume {
                    config: running,
                    sockets,
                    servers,
                } = *resume;
                tracing::warn!(
                    "the successor failed before it served: serving on, from the same sockets"
                );
                config = running;
                inherited = Some((sockets, Predecessor::Same(Box::new(servers))));
            }
            Err(e) => break Err(e),
        }
    };
    drop(scratch);
    result
}

/// Raises the soft limit on open descriptors to the hard one, before any
/// thread or ring is made (the rings size their file tables from it): a
/// data plane holds a descriptor per connection, and the default soft limit
/// (1024 on most systems) is far below what the hard limit allows.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open-descriptor limit")
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, "cannot raise the open-descriptor limit to the hard limit")
        }
    }
}

async fn serve(
    config: AgentConfig,
    source: ConfigSource,
    inherited: Option<(upgrade::Sockets, Predecessor)>,
    successor: &std::io::Result<upgrade::Successor>,
) -> anyhow::Result<Served> {
    let (mut agent, predecessor) = Running::start(config, &source, inherited).await?;
    agent.announce(predecessor);
    match agent.run(&source, successor).await {
        Ending::Stop => {
            agent.stop().await;
            Ok(Served::Done)
        }
        Ending::Upgrade(stream) => agent.hand_over(stream).await,
    }
}

/// A serving agent: the registry and what feeds it, the API, DNS and the
/// proxy, as `Running::start` made them.
struct Running {
    /// The running configuration (reloads included).
    config: AgentConfig,
    /// The registry and what serves or feeds it, stopped as one.
    control: ControlPlane,
    proxy: Arc<ProxyDecorator>,
    /// Other datacenters' copies (their proxy backends follow our routes).
    copies: Arc<switchyard_federation::Copies>,
    /// The xDS server, when it serves (its policies follow our routes),
    /// and a second handle on its listener, to pass on at an upgrade.
    xds: Option<(switchyard_xds::Xds, std::net::TcpListener)>,
    node_name: String,
    /// Ids of the `[[services]]` the file registered (for reloads).
    config_services: Vec<Arc<str>>,
    /// Turns true when the API and the metrics listener should stop.
    shutdown: watch::Sender<bool>,
    /// A second handle on the API's listener, to pass on at an upgrade.
    api_listener: std::net::TcpListener,
    dns: DnsServer,
    http: Proxy,
    signals: Signals,
    upgrades: Option<UpgradeListener>,
}

/// Why `Running::run` returned.
enum Ending {
    /// SIGTERM or SIGINT.
    Stop,
    /// A successor connected to the upgrade socket.
    Upgrade(std::os::unix::net::UnixStream),
}

impl Running {
    /// Opens the store and starts the registry, registers this node and the
    /// file's services, starts the checkers, the API, DNS and the proxy (on
    /// `inherited` sockets at an upgrade), and prints the ready line.
    async fn start(
        config: AgentConfig,
        source: &ConfigSource,
        inherited: Option<(upgrade::Sockets, Predecessor)>,
    ) -> anyhow::Result<(Running, Option<Predecessor>)> {
        let resuming = matches!(inherited, Some((_, Predecessor::Same(_))));
        let upgrading = inherited.is_some();
        let (mut sockets, predecessor) = match inherited {
            Some((sockets, predecessor)) => (Some(sockets), Some(predecessor)),
            None => (None, None),
        };
        if matches!(predecessor, Some(Predecessor::Process(_))) {
            // The predecessor accepts on these sockets until this agent
            // says it is ready: a successor that dies or hangs first must
            // hold no connection (`announce` opens the gate).
            switchyard_registry::hold_accepts();
        }
        let prometheus = prometheus::Registry::new();
        let metrics = Arc::new(RegistryMetrics::new(&prometheus).context("metrics")?);
        let dns_config = Arc::new(config.dns.clone());
        let dns_metrics = Arc::new(DnsMetrics::new(&prometheus).context("dns metrics")?);
        let proxy_metrics = Arc::new(ProxyMetrics::new(&prometheus).context("proxy metrics")?);
        let proxy = Arc::new(ProxyDecorator::new(
            config.http.clone(),
            config.tcp.clone(),
            proxy_metrics,
        ));
        // Decorators, run by the writer over every view it builds: DNS's answers
        // and the proxy's backend lists, each found again by its key.
        let mut decorators = Decorators::default();
        let dns_answers = decorators.add(Arc::new(DnsDecorator::new(
            dns_config.clone(),
            &config.agent.datacenter,
        )));
        let proxy_backends = decorators.add(proxy.clone());
        // xDS's endpoint assignments, built only when it serves.
        let xds_key = config.xds.addr.map(|_| {
            decorators.add(Arc::new(switchyard_xds::XdsDecorator::new(
                &config.agent.datacenter,
            )))
        });
        let (registry, writer) = open_registry(&config, metrics, decorators, resuming).await?;

        let node_name = config.agent.node_name.clone().unwrap_or_else(host_name);
        let advertise = config.agent.advertise_addr.to_string();
        let config_services = if registry.store_status().connected() {
            register_own_node(&registry, &node_name, &advertise).await?;
            // Services defined in the config file (their checks start with
            // the checker).
            register_config_services(&config, &registry, &node_name, &[]).await?
        } else {
            // Cluster mode started from the local copy while etcd is down:
            // the agent's own node and its config's services are written
            // once etcd answers.
            register_when_reachable(&config, &registry, &node_name, &advertise)?
        };
        let demo = match source.demo {
            true => crate::demo::start(&registry, &node_name).await?,
            false => Vec::new(),
        };
        let checker = switchyard_health::spawn_checker(registry.clone());
        // Cluster mode: the nodes of agents whose etcd lease lapsed turn
        // critical (their endpoints leave DNS and the proxy everywhere).
        if registry.shared() {
            tokio::spawn(switchyard_registry::watch_agents(
                registry.clone(),
                std::time::Duration::from_secs(1),
            ));
        }
        let passive = tokio::spawn(switchyard_proxy::report_passive_failures(
            proxy.clone(),
            Arc::new(registry.clone()),
        ));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let answers = api::Answers::register(&prometheus).context("API metrics")?;
        // Other datacenters: always known (the list may be empty), probed
        // for their round trips until shutdown.
        let federation = Arc::new(
            switchyard_federation::Federation::new(
                &config.agent.datacenter,
                &config.federation,
                &prometheus,
            )
            .map_err(anyhow::Error::msg)?,
        );
        tokio::spawn(federation.clone().run(shutdown_rx.clone()));
        // Their services and nodes as DNS asks for them: a catalog per
        // datacenter, decorated like ours (the DNS decorator at the same key).
        let copies = switchyard_federation::Copies::new(
            federation.clone(),
            registry.snapshot_cell(),
            |dc| {
                let mut decorators = Decorators::default();
                let dns = decorators.add(Arc::new(DnsDecorator::new(dns_config.clone(), dc)));
                let backends = decorators.add(Arc::new(ProxyDecorator::for_copies(&proxy)));
                debug_assert!(
                    dns == dns_answers && backends == proxy_backends,
                    "a copy's decorators sit where ours do"
                );
                decorators
            },
        )
        .map_err(anyhow::Error::msg)?;
        proxy.fail_over_to(copies.clone());
        let xds = match xds_key {
            Some(key) => {
                let inherited = sockets.as_mut().and_then(|s| s.xds.take());
                let (xds, listener) = start_xds(&config, &registry, key, &prometheus, inherited)?;
                let copies = copies.clone() as Arc<dyn switchyard_registry::Elsewhere>;
                Some((xds.with_elsewhere(copies), listener))
            }
            None => None,
        };
        let state = Arc::new(ApiState {
            registry: registry.clone(),
            agent: AgentInfo {
                node_name: node_name.clone(),
                datacenter: config.agent.datacenter.clone(),
                advertise_addr: advertise,
                version: env!("CARGO_PKG_VERSION"),
            },
            config: config.api.clone(),
            prometheus,
            shutdown: shutdown_rx.clone(),
            // In cluster mode a drain also counts what the other agents carry.
            load: Some(match registry.shared() {
                true => Arc::new(switchyard_registry::ClusterLoad::new(
                    proxy.load_report(),
                    registry.store_status().clone(),
                )),
                false => proxy.load_report(),
            }),
            tokens: api::Tokens::load(&config.api.tokens).map_err(anyhow::Error::msg)?,
            listeners: std::sync::OnceLock::new(),
            answers,
            federation: Some(federation),
            copies: Some(copies.clone()),
            xds: xds.as_ref().map(|(xds, _)| {
                let xds = xds.clone();
                Arc::new(move || xds_json(&xds)) as api::XdsView
            }),
            routes: Some(api::RouteBook {
                check: Arc::new(switchyard_proxy::check_route),
                list: {
                    let proxy = proxy.clone();
                    Arc::new(move || proxy.routes_json())
                },
            }),
        });
        let xds_addr = match xds {
            Some((xds, listener)) => {
                let addr = listener.local_addr()?;
                let kept = listener.try_clone()?;
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let mut stop = shutdown_rx.clone();
                let serving = xds.clone();
                tokio::spawn(async move {
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    if let Err(e) = serving.serve(listener, stopped).await {
                        tracing::error!(error = %e, "the xDS server stopped");
                    }
                });
                Some((xds, addr, kept))
            }
            None => None,
        };
        let api_listener = match sockets.as_mut().and_then(|s| s.api.take()) {
            Some(listener) => listener,
            None => std::net::TcpListener::bind(config.api.addr)
                .with_context(|| format!("cannot listen on {}", config.api.addr))?,
        };
        api_listener.set_nonblocking(true)?;
        let api_kept = api_listener.try_clone()?;
        let listener = tokio::net::TcpListener::from_std(api_listener)?;
        let api_addr = listener.local_addr()?;
        let api_tls = match &config.api.tls {
            Some(tls) => Some(api::tls::acceptor(tls).map_err(anyhow::Error::msg)?),
            None => None,
        };
        if api_tls.is_none() && !api_addr.ip().is_loopback() {
            tracing::warn!(api = %api_addr, "the API is reachable from other hosts over cleartext HTTP: tokens travel unencrypted; configure [api.tls]");
        }
        let api_scheme = if api_tls.is_some() { "https" } else { "http" };
        let connection_metrics =
            api::serve::ConnectionMetrics::register(&state.prometheus).context("API metrics")?;
        let limits =
            api::serve::ConnectionLimits::from_config(&config.api, !state.tokens.is_empty());
        let api = tokio::spawn({
            let (tls, router, metrics) = (
                api_tls.clone(),
                api::router(state.clone()),
                connection_metrics.clone(),
            );
            let stop = shutdown_rx.clone();
            async move { api::serve::serve("api", listener, tls, router, limits, &metrics, stop).await }
        });
        let metrics_addr = match config.api.metrics_addr {
            Some(addr) => {
                let limits = api::serve::ConnectionLimits {
                    max_connections: crate::budget::Budget::current().metrics,
                    ..limits
                };
                let serving = Metrics {
                    tls: api_tls,
                    state: state.clone(),
                    limits,
                    connections: connection_metrics,
                };
                Some(serve_metrics(addr, upgrading, serving, shutdown_rx).await?)
            }
            None => None,
        };

        let dns = DnsServer::start(
            dns_config,
            &config.agent.datacenter,
            dns_answers,
            registry.snapshot_cell(),
            dns_metrics,
            sockets.as_mut().and_then(|s| s.dns.take()),
            Some(copies.clone() as Arc<dyn switchyard_registry::Elsewhere>),
        )
        .await
        .with_context(|| format!("cannot listen for DNS on {}", config.dns.addr))?;
        let dns_addr = dns.local_addr();
        let http = Proxy::start_with(
            &proxy,
            proxy_backends,
            registry.snapshot_cell(),
            sockets.as_mut().and_then(|s| s.proxy.take()),
        )
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.addr))?;
        let http_addr = http.local_addr();

        // Installed before the ready line: a SIGHUP after it must never kill us.
        let signals = Signals::new()?;
        let ready = serde_json::json!({
            "ready": true,
            "api": api_addr.to_string(),
            "api_url": format!("{api_scheme}://{api_addr}"),
            "dns": dns_addr.to_string(),
            "http": http_addr.to_string(),
            "https": http.tls_addr().map(|a| a.to_string()),
            "metrics": metrics_addr.map(|a| a.to_string()),
            "tcp": http.tcp_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "xds": xds_addr.as_ref().map(|(_, a, _)| a.to_string()),
            "node": node_name,
        });
        let _ = state.listeners.set(ready.clone());
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{ready}")?;
            out.flush()?;
        }
        tracing::info!(api = %api_addr, dns = %dns_addr, http = %http_addr, node = %node_name, index = registry.snapshot().index(), "switchyard agent ready");
        if !demo.is_empty() {
            tracing::info!(
                "demo: {n} backends serve service {service}; try  dig @{dns_ip} -p {dns_port} {service}.service.consul SRV  ·  curl -H 'Host: {host}' http://{http_addr}/  ·  open {api_scheme}://{api_addr}/ui/",
                n = demo.len(),
                service = crate::demo::SERVICE,
                host = crate::demo::HOST,
                dns_ip = dns_addr.ip(),
                dns_port = dns_addr.port(),
            );
        }
        let upgrades = match &config.store.data_dir {
            Some(dir) => match UpgradeListener::bind(dir) {
                Ok(listener) => Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "no upgrade socket: `agent --upgrade` cannot take over from this agent");
                    None
                }
            },
            None => None,
        };
        let running = Running {
            config,
            control: ControlPlane {
                api,
                checker,
                passive,
                registry,
                writer,
            },
            proxy,
            copies,
            xds: xds_addr.map(|(xds, _, kept)| (xds, kept)),
            node_name,
            config_services,
            shutdown,
            api_listener: api_kept,
            dns,
            http,
            signals,
            upgrades,
        };
        Ok((running, predecessor))
    }

    /// Tells whoever served before that this agent serves now: the agent it
    /// upgrades, or this process's own servers after a failed upgrade (they
    /// stop), and systemd.
    fn announce(&self, predecessor: Option<Predecessor>) {
        match predecessor {
            Some(Predecessor::Process(stream)) => {
                upgrade::die_before_ready_for_tests();
                upgrade::ready(stream);
                switchyard_registry::open_accepts();
                tracing::info!("took over from the previous agent");
            }
            Some(Predecessor::Same(servers)) => {
                tracing::info!("serving again after the failed upgrade");
                tokio::spawn(async move {
                    let (dns, http) = *servers;
                    stop_data_plane(http, dns).await;
                });
            }
            None => {}
        }
        upgrade::notify(upgrade::Lifecycle::Ready);
    }

    /// Serves until SIGTERM/SIGINT or a successor's upgrade request,
    /// reloading on SIGHUP and starting a successor on SIGUSR2.
    async fn run(
        &mut self,
        source: &ConfigSource,
        successor: &std::io::Result<upgrade::Successor>,
    ) -> Ending {
        loop {
            let next_upgrade = async {
                match &self.upgrades {
                    Some(listener) => listener.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = self.signals.next() => match signal {
                    Signal::Reload => self.reload(source).await,
                    Signal::Stop => return Ending::Stop,
                    Signal::Upgrade => match (&self.upgrades, successor) {
                        (Some(_), Ok(successor)) => match successor.spawn() {
                            Ok(pid) => tracing::info!(pid, "SIGUSR2: started the successor agent"),
                            Err(e) => tracing::error!(error = %e, "SIGUSR2: cannot start the successor agent"),
                        },
                        (None, _) => tracing::error!("SIGUSR2 ignored: this agent has no upgrade socket"),
                        (_, Err(e)) => tracing::error!(error = %e, "SIGUSR2 ignored: this agent's binary path is unknown"),
                    },
                },
                stream = next_upgrade => return Ending::Upgrade(stream),
            }
        }
    }

    /// SIGHUP: the file again; on success the file's services again too.
    async fn reload(&mut self, source: &ConfigSource) {
        upgrade::notify(upgrade::Lifecycle::Reloading);
        let registry = &self.control.registry;
        if reload(
            source,
            &mut self.config,
            &self.proxy,
            registry,
            &self.copies,
        )
        .await
        {
            let registered = register_config_services(
                &self.config,
                registry,
                &self.node_name,
                &self.config_services,
            )
            .await;
            match registered {
                Ok(ids) => self.config_services = ids,
                Err(e) => tracing::error!(error = %e, "cannot apply the config's services"),
            }
            if let Some((xds, _)) = &self.xds {
                xds.set_policies(xds_policies(&self.config.http));
            }
        }
        upgrade::notify(upgrade::Lifecycle::Ready);
    }

    /// SIGTERM: stop accepting, let the proxy and DNS finish their work in
    /// progress, then the API, the checkers and the registry (store flushed).
    async fn stop(self) {
        // Not at an upgrade: the successor is the main process by then.
        upgrade::notify(upgrade::Lifecycle::Stopping);
        if let Some(upgrades) = self.upgrades {
            upgrades.remove();
        }
        drop(self.api_listener);
        tracing::info!("shutting down: no new API requests, finishing queued writes");
        let _ = self.shutdown.send(true);
        stop_data_plane(self.http, self.dns).await;
        stop_control_plane(self.control).await;
        tracing::info!("stopped");
    }

    /// An upgrade: stop the API and the registry (the store closed for the
    /// successor), hand the listeners over, then let the proxy and DNS finish
    /// their work in progress. If the successor fails before it serves, this
    /// agent serves on from the same sockets (`Served::Resume`).
    async fn hand_over(self, mut stream: std::os::unix::net::UnixStream) -> anyhow::Result<Served> {
        tracing::info!(
            "upgrade requested: stopping the API and the store, then handing over the listeners"
        );
        let _ = self.shutdown.send(true);
        stop_control_plane(self.control).await;
        let sockets = upgrade::Sockets {
            api: Some(self.api_listener),
            dns: Some(self.dns.sockets().try_clone()?),
            proxy: Some(self.http.sockets().try_clone()?),
            xds: self.xds.map(|(_, listener)| listener),
        };
        let (handed, sockets) = tokio::task::spawn_blocking(move || {
            let handed = upgrade::hand_over(&mut stream, &sockets);
            (handed, sockets)
        })
        .await
        .context("handover task")?;
        match handed {
            Ok(upgrade::Handed::Ready) => {
                tracing::info!("the new agent serves; finishing the work in progress")
            }
            failed => {
                match failed {
                    Ok(handed) => tracing::error!(
                        ?handed,
                        "the new agent took the listeners but did not report ready"
                    ),
                    Err(e) => tracing::error!(error = %e, "handover failed"),
                }
                // Its API and registry stopped for the handover; the DNS and
                // proxy servers still serve and hand over to resumed ones.
                return Ok(Served::Resume(Box::new(Resume {
                    config: self.config,
                    sockets,
                    servers: (self.dns, self.http),
                })));
            }
        }
        stop_data_plane(self.http, self.dns).await;
        tracing::info!("stopped after handing over");
        Ok(Served::Done)
    }
}

/// The registry and what reads or feeds it through the API, as they stop.
struct ControlPlane {
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    checker: tokio::task::JoinHandle<()>,
    passive: tokio::task::JoinHandle<()>,
    registry: Registry,
    writer: tokio::task::JoinHandle<()>,
}

/// The xDS server and its listener: the predecessor's at an upgrade (its
/// streams end there and clients reconnect here, queued meanwhile), else a
/// new one.
fn start_xds(
    config: &AgentConfig,
    registry: &Registry,
    key: switchyard_registry::ExtraKey<switchyard_xds::XdsDecorator>,
    prometheus: &prometheus::Registry,
    inherited: Option<std::net::TcpListener>,
) -> anyhow::Result<(switchyard_xds::Xds, std::net::TcpListener)> {
    let Some(addr) = config.xds.addr else {
        anyhow::bail!("xds.addr is not set");
    };
    let metrics = Arc::new(switchyard_xds::XdsMetrics::new(prometheus).context("xds metrics")?);
    let tokens = api::Tokens::load(&config.api.tokens).map_err(anyhow::Error::msg)?;
    let authorize = (!tokens.is_empty()).then(|| {
        Arc::new(move |token: &[u8]| tokens.allows(token, api::Role::Read))
            as switchyard_xds::Authorizer
    });
    let xds = switchyard_xds::Xds::new(
        config.xds.clone(),
        registry.clone(),
        key,
        xds_policies(&config.http),
        metrics,
        authorize,
    );
    let listener = match inherited {
        Some(listener) => listener,
        None => std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for xDS on {addr}"))?,
    };
    Ok((xds, listener))
}

/// Each routed service's balancer as xDS clients can follow it: round robin,
/// least request, or a ring hash (on the route's header, or per client).
fn xds_policies(http: &switchyard_proxy::Config) -> switchyard_xds::Policies {
    use switchyard_proxy::{BalancerKind, HashOn};
    use switchyard_xds::LbPolicy;
    let policy = |kind: BalancerKind, hash_on: &HashOn| match kind {
        BalancerKind::LeastRequest | BalancerKind::PeakEwma => LbPolicy::LeastRequest,
        BalancerKind::ConsistentHash => LbPolicy::RingHash {
            header: match hash_on {
                HashOn::Header(name) => Some(name.clone()),
                HashOn::ClientIp | HashOn::Cookie(_) => None,
            },
        },
        BalancerKind::RoundRobin | BalancerKind::Random => LbPolicy::RoundRobin,
    };
    let mut services = std::collections::HashMap::new();
    for route in &http.routes {
        services
            .entry(route.service.clone())
            .or_insert_with(|| policy(route.balancer.unwrap_or(http.balancer), &route.hash_on));
    }
    switchyard_xds::Policies {
        default: policy(http.balancer, &HashOn::ClientIp),
        services,
    }
}

/// `/v1/switchyard/xds` and status's `xds`.
fn xds_json(xds: &switchyard_xds::Xds) -> serde_json::Value {
    serde_json::json!({
        "streams": xds.streams(),
        "clients": xds.clients(),
    })
}

/// The one way the control plane stops (the API told to stop already):
/// requests in progress finish, the checkers stop, and the writer applies
/// what is queued, flushes and closes the store.
async fn stop_control_plane(plane: ControlPlane) {
    match plane.api.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "API server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "API server task failed"),
    }
    plane.checker.abort();
    plane.passive.abort();
    plane.registry.shutdown().await;
    let _ = plane.writer.await;
}

/// The one way the data plane stops: the proxy and DNS stop accepting and
/// finish their work in progress (`http.shutdown_grace`).
async fn stop_data_plane(http: Proxy, dns: DnsServer) {
    http.shutdown().await;
    dns.shutdown().await;
}

/// Opens the configured store and starts the registry's writer on it.
async fn open_registry(
    config: &AgentConfig,
    metrics: Arc<RegistryMetrics>,
    decorators: Decorators,
    resuming: bool,
) -> anyhow::Result<(Registry, tokio::task::JoinHandle<()>)> {
    match config.store.kind {
        StoreKind::Embedded => {
            let dir = config
                .store
                .data_dir
                .clone()
                .context("store.data_dir is required for the embedded store")?;
            let store = open_embedded(&dir, config.store.cache_mib << 20, resuming).await?;
            tracing::info!(path = %store.path().display(), "embedded store opened");
            start(store, metrics, decorators)
        }
        StoreKind::Memory => start(MemoryStore::default(), metrics, decorators),
        StoreKind::Etcd => {
            let member = config.agent.node_name.clone().unwrap_or_else(host_name);
            let options = config
                .store
                .etcd_options(&member)
                .map_err(anyhow::Error::msg)?;
            let store = EtcdStore::connect(&options)
                .await
                .context("cannot reach the etcd store")?;
            start(store, metrics, decorators)
        }
    }
}

/// Registers the agent's own node and its config's services from a task
/// that tries again each second until the store takes them; returns the
/// config's service ids.
fn register_when_reachable(
    config: &AgentConfig,
    registry: &Registry,
    node_name: &str,
    advertise: &str,
) -> anyhow::Result<Vec<switchyard_registry::Name>> {
    let ids = config
        .service_commands(node_name)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter_map(|command| match command {
            Command::RegisterService { endpoint, .. } => Some(endpoint.id.clone()),
            _ => None,
        })
        .collect();
    let (config, registry) = (config.clone(), registry.clone());
    let (node_name, advertise) = (node_name.to_string(), advertise.to_string());
    tokio::spawn(async move {
        loop {
            let done = async {
                register_own_node(&registry, &node_name, &advertise).await?;
                register_config_services(&config, &registry, &node_name, &[]).await
            };
            match done.await {
                Ok(_) => {
                    tracing::info!("the agent's own node and config services are registered");
                    return;
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "not registered yet"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    Ok(ids)
}

/// Registers the agent's own node (its address, version in meta).
async fn register_own_node(
    registry: &Registry,
    node_name: &str,
    advertise: &str,
) -> anyhow::Result<()> {
    let mut own_node = Node::new(node_name, advertise.to_string());
    own_node.tagged_addresses = BTreeMap::from([
        ("lan".to_string(), advertise.to_string()),
        ("wan".to_string(), advertise.to_string()),
    ]);
    own_node.meta = BTreeMap::from([(
        switchyard_registry::AGENT_META.to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    )]);
    registry
        .apply(Command::EnsureNode(own_node))
        .await
        .context("cannot register the agent's own node")?;
    Ok(())
}

/// Opens the embedded store. After a failed upgrade the successor may still
/// be letting go of the file (it was stopped a moment ago): retried briefly.
async fn open_embedded(
    dir: &std::path::Path,
    cache_bytes: usize,
    resuming: bool,
) -> anyhow::Result<EmbeddedStore> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match EmbeddedStore::open(dir, cache_bytes) {
            Ok(store) => return Ok(store),
            Err(e) if resuming && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the store is still held by the failed successor");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Serves `/metrics` on `addr` from a thread and runtime of its own, so a
/// scrape is answered even while the agent's runtime is saturated. Stops at
/// shutdown. An upgrading agent waits for its predecessor to let go of the
/// address (it is not handed over).
async fn serve_metrics(
    addr: std::net::SocketAddr,
    upgrading: bool,
    serving: Metrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let listener = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => break listener,
            Err(e) if upgrading && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, %addr, "metrics address still held by the previous agent");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot listen for metrics on {addr}"))
            }
        }
    };
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the metrics runtime")?;
    std::thread::Builder::new()
        .name("switchyard-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics listener failed");
                        return;
                    }
                };
                let Metrics {
                    tls,
                    state,
                    limits,
                    connections,
                } = serving;
                let router = api::metrics_router(state);
                let served =
                    api::serve::serve("metrics", listener, tls, router, limits, &connections, stop)
                        .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "metrics server stopped with an error");
                }
            })
        })
        .context("cannot start the metrics thread")?;
    Ok(local)
}

/// What the metrics listener serves, and under which limits.
struct Metrics {
    tls: Option<api::tls::TlsAcceptor>,
    state: Arc<ApiState>,
    limits: api::serve::ConnectionLimits,
    connections: api::serve::ConnectionMetrics,
}

fn start<S: Store>(
    store: S,
    metrics: Arc<RegistryMetrics>,
    decorators: Decorators,
) -> anyhow::Result<(Registry, tokio::task::JoinHandle<()>)> {
    Registry::start_with(store, metrics, decorators).context("cannot load the catalog")
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Reload,
    Stop,
    /// SIGUSR2: start a successor that takes over (an upgrade from inside).
    Upgrade,
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            usr2: signal(SignalKind::user_defined2())
                .context("cannot install the SIGUSR2 handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                Signal::Reload
            }
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Stop
            }
            _ = self.usr2.recv() => {
                tracing::info!("SIGUSR2 received: upgrading in place");
                Signal::Upgrade
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT received");
                Signal::Stop
            }
        }
    }
}

/// Registers the `[[services]]` of `config` on this agent's node and
/// deregisters those of `before` (ids) that the config no longer has.
/// Returns the ids now defined by the config.
async fn register_config_services(
    config: &AgentConfig,
    registry: &Registry,
    node: &str,
    before: &[switchyard_registry::Name],
) -> anyhow::Result<Vec<switchyard_registry::Name>> {
    let mut ids = Vec::new();
    for command in config.service_commands(node).map_err(anyhow::Error::msg)? {
        if let Command::RegisterService { endpoint, .. } = &command {
            ids.push(endpoint.id.clone());
        }
        registry
            .apply(command)
            .await
            .context("cannot register a service from the config")?;
    }
    for id in before.iter().filter(|id| !ids.contains(id)) {
        let _ = registry
            .apply(Command::DeregisterService {
                node: node.into(),
                id: id.clone(),
            })
            .await;
    }
    Ok(ids)
}

/// How long after a reload the services it no longer routes keep their
/// backend lists.
const RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGHUP: reads the configuration again and applies what can change while
/// running (the `[http]` routes and settings, the settings of the `[tcp]`
/// listeners). Anything wrong, or a change that needs a restart, is logged
/// with its reason and the running configuration stays whole.
async fn reload(
    source: &ConfigSource,
    running: &mut AgentConfig,
    proxy: &ProxyDecorator,
    registry: &Registry,
    copies: &switchyard_federation::Copies,
) -> bool {
    let Some(path) = &source.path else {
        tracing::warn!("SIGHUP ignored: the agent was started without --config");
        return false;
    };
    let refuse = |why: &str| {
        tracing::error!(file = %path.display(), "configuration reload refused, the running configuration stays: {why}");
    };
    let mut next = match source.load() {
        Ok(next) => next,
        Err(e) => {
            refuse(&e);
            return false;
        }
    };
    if next.store.data_dir.is_none() {
        next.store.data_dir = running.store.data_dir.clone();
    }
    crate::budget::Budget::draw(&mut next);
    let fixed = [
        ("agent", next.agent != running.agent),
        ("api", next.api != running.api),
        ("store", next.store != running.store),
        ("dns", next.dns != running.dns),
        ("xds", next.xds != running.xds),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(t, _)| *t).collect();
    if !changed.is_empty() {
        refuse(&format!(
            "[{}] changed, which needs a restart (or an upgrade); only [http], [[services]] and the settings of [tcp] listeners reload",
            changed.join("], [")
        ));
        return false;
    }
    let plan = match proxy.plan_reload(next.http.clone(), next.tcp.clone()) {
        Ok(plan) => plan,
        Err(e) => {
            refuse(&e);
            return false;
        }
    };
    // Services the new routes name get their backend lists before any route
    // points at them; services no longer routed release theirs afterwards.
    proxy.begin_reload(&plan);
    if !plan.newly_routed.is_empty() {
        if let Err(e) = registry
            .apply(Command::Redecorate(plan.newly_routed.clone()))
            .await
        {
            tracing::warn!(error = %e, "cannot rebuild the newly routed services' views");
        }
        // Copies of them in other datacenters get their backends too.
        copies.redecorate(&plan.newly_routed).await;
    }
    let released = plan.no_longer_routed.clone();
    let (added, removed) = (plan.newly_routed.len(), released.len());
    proxy.finish_reload(plan);
    if !released.is_empty() {
        // A request that found its route just before the swap looks its
        // service up a moment later (later still if its thread was preempted
        // in between): release only after such requests have done so. A
        // service routed again by then keeps its backends (the decorator
        // reads the routes at rebuild time).
        let registry = registry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_AFTER).await;
            if let Err(e) = registry.apply(Command::Redecorate(released)).await {
                tracing::warn!(error = %e, "cannot rebuild the services no longer routed");
            }
        });
    }
    tracing::info!(
        file = %path.display(),
        routes = next.http.routes.len(),
        tcp_listeners = next.tcp.listeners.len(),
        newly_routed = added,
        no_longer_routed = removed,
        "configuration reloaded"
    );
    *running = next;
    true
}
