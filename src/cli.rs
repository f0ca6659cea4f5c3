//! Command-line interface: `agent` runs the data plane; the other commands talk
//! to a running agent's API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::agent::{self, ScratchDir};
use crate::source::ConfigSource;
use crate::summary::{summary, DataDir};
use crate::upgrade;

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// The help heading of the flags that only the client commands use.
const CLIENT_OPTIONS: &str = "Client options (commands that talk to a running agent)";

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Service discovery and load balancing: registry, DNS and proxy in one agent",
    long_about = "Switchyard tracks which task endpoints are healthy (registry), answers service \
names with them (DNS) and carries traffic to them (proxy).\n\nStart an all-in-one agent on \
loopback with `switchyard agent --dev`; the other commands talk to a running agent.",
    // A flag given twice counts once, the last one (a wrapper's default,
    // then the caller's own).
    args_override_self = true
)]
pub(crate) struct Cli {
    /// Address of the agent's HTTP API, for the client commands.
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_OPTIONS,
        env = "SWITCHYARD_API",
        default_value = "http://127.0.0.1:8500"
    )]
    api: String,
    /// API token for the client commands (sent as X-Consul-Token).
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_OPTIONS,
        env = "SWITCHYARD_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// CA certificate (PEM) to verify an HTTPS API with (`[api.tls]`), for
    /// the client commands. Default: the Mozilla roots.
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_OPTIONS,
        env = "SWITCHYARD_CACERT"
    )]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for an API that asks for one (`api.tls.client_ca`).
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_OPTIONS,
        env = "SWITCHYARD_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_OPTIONS,
        env = "SWITCHYARD_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Run the agent: registry API (Consul-compatible on :8500), DNS (:8600)
    /// and the HTTP/TCP proxy (:8080).
    Agent(AgentArgs),
    /// One screen about the agent: listeners, catalog counts, index, store.
    Status {
        /// Print the API's JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// List services with endpoint counts by state.
    Services {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a service's endpoints and why any of them is excluded.
    Endpoints {
        /// The service's name.
        service: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register (and deregister) many nodes and endpoints in one durable write.
    ///
    /// FILE is a JSON batch: {"nodes":[{"name","address"}], "endpoints":[{"node",
    /// "service","id","address","port","tags","meta","checks"}], "deregister":
    /// [{"node","id"}], "deregister_nodes":["name"]}; configs/batch.example.json
    /// is one.
    Register {
        /// The batch file (JSON); - reads standard input.
        file: PathBuf,
    },
    /// List nodes with their drain state.
    Nodes {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the proxy's routes and where each came from: the API
    /// (/v1/switchyard/routes), the config ([[http.routes]]) or a service's
    /// tags, in precedence order (on the same host and prefix the first wins).
    Routes {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the datacenters: this one, then the others ([[federation.datacenters]])
    /// by measured round trip, with whether they answer.
    Datacenters {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a node or one endpoint: DNS and the proxy stop sending it new
    /// traffic at once; work in flight finishes, long-lived connections are
    /// cut at the deadline.
    Drain {
        #[command(subcommand)]
        target: DrainTarget,
    },
    /// Return a drained node or endpoint to service.
    Undrain {
        #[command(subcommand)]
        target: UndrainTarget,
    },
}

#[derive(Subcommand, Debug)]
enum DrainTarget {
    /// Drain every endpoint on a node.
    Node {
        /// The node's name.
        name: String,
        #[command(flatten)]
        opts: DrainOpts,
    },
    /// Drain one endpoint (by id; --node when the id exists on several nodes).
    Endpoint {
        /// The endpoint's id.
        id: String,
        /// The endpoint's node, when its id exists on several nodes.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        opts: DrainOpts,
    },
}

#[derive(clap::Args, Debug)]
struct DrainOpts {
    /// Cut what is still open after this long (Go duration: 30s, 5m).
    #[arg(long)]
    deadline: Option<String>,
    /// Show progress until drained; exit 0 when everything finished, 3 when
    /// the deadline cut work.
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand, Debug)]
enum UndrainTarget {
    /// End a node's drain.
    Node {
        /// The node's name.
        name: String,
    },
    /// End one endpoint's drain.
    Endpoint {
        /// The endpoint's id.
        id: String,
        /// The endpoint's node, when its id exists on several nodes.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// All-in-one development agent on loopback with a fresh, throwaway data dir.
    #[arg(long)]
    dev: bool,
    /// Also start three tiny demo backends inside the agent, registered as
    /// service `demo` and routed from host `demo.localhost` (round robin).
    #[arg(long)]
    demo: bool,
    /// TOML config file (see configs/dev.toml for every key and its default).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory of the embedded store (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API listen address (overrides api.addr); port 0 picks a free port.
    #[arg(long)]
    api_addr: Option<SocketAddr>,
    /// DNS listen address, UDP and TCP (overrides dns.addr); port 0 picks a free port.
    #[arg(long)]
    dns_addr: Option<SocketAddr>,
    /// HTTP proxy listen address (overrides http.addr); port 0 picks a free port.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// xDS (ADS) listen address (overrides xds.addr); port 0 picks a free
    /// port. Off unless set, 127.0.0.1:18000 under --dev.
    #[arg(long)]
    xds_addr: Option<SocketAddr>,
    /// Proxy threads, each with its own listener (overrides http.threads; 0 = one per core).
    #[arg(long)]
    proxy_threads: Option<usize>,
    /// This agent's node name (overrides agent.node_name).
    #[arg(long)]
    node_name: Option<String>,
    /// Load and check the configuration, print a summary of it, and exit
    /// (0 when valid, 64 with the line and key at fault).
    #[arg(long)]
    check_config: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Zero-downtime upgrade: take over the listening sockets and the store
    /// of the agent running on the same data directory, which then finishes
    /// its work in progress and exits.
    #[arg(long)]
    upgrade: bool,
}

/// The client commands' token (`--token` / `SWITCHYARD_TOKEN`), set once.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The client commands' HTTP agent (with `--ca-cert` and the client
/// certificate when given), set once.
static HTTP: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();

pub(crate) fn run(cli: Cli) -> ExitCode {
    if let Some(token) = &cli.token {
        let _ = TOKEN.set(token.clone());
    }
    if !matches!(cli.command, Commands::Agent(_)) {
        match http_agent(&cli) {
            Ok(agent) => {
                let _ = HTTP.set(agent);
            }
            Err(e) => {
                eprintln!("switchyard: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    match cli.command {
        Commands::Agent(args) => run_agent(args),
        Commands::Status { json } => client(status(&cli.api, json)),
        Commands::Services { json } => client(services(&cli.api, json)),
        Commands::Endpoints { service, json } => client(endpoints(&cli.api, &service, json)),
        Commands::Register { file } => client(register(&cli.api, &file)),
        Commands::Nodes { json } => client(nodes(&cli.api, json)),
        Commands::Routes { json } => client(routes(&cli.api, json)),
        Commands::Datacenters { json } => client(datacenters(&cli.api, json)),
        Commands::Drain { target } => {
            let (path, opts) = match target {
                DrainTarget::Node { name, opts } => (node_drain_path(&name), opts),
                DrainTarget::Endpoint { id, node, opts } => {
                    (endpoint_drain_path(&id, node.as_deref()), opts)
                }
            };
            match drain(&cli.api, &path, &opts) {
                Ok(code) => code,
                Err(e) => client(Err(e)),
            }
        }
        Commands::Undrain { target } => {
            let path = match target {
                UndrainTarget::Node { name } => node_drain_path(&name),
                UndrainTarget::Endpoint { id, node } => endpoint_drain_path(&id, node.as_deref()),
            };
            client(call(&cli.api, "DELETE", &path, None).map(|_| println!("undrained")))
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether text logs get ANSI colours: only on a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
fn colour_logs(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// How the agent writes its logs (stderr).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

fn run_agent(args: AgentArgs) -> ExitCode {
    let source = ConfigSource {
        path: args.config.clone(),
        data_dir: args.data_dir.clone(),
        api_addr: args.api_addr,
        dns_addr: args.dns_addr,
        http_addr: args.http_addr,
        xds_addr: args.xds_addr,
        dev: args.dev,
        proxy_threads: args.proxy_threads,
        node_name: args.node_name.clone(),
        demo: args.demo,
    };
    let mut config = match source.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("switchyard: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.check_config {
        let data_dir = if config.store.data_dir.is_some() {
            DataDir::Given
        } else if args.dev {
            DataDir::Scratch
        } else {
            DataDir::Missing
        };
        let file = args
            .config
            .as_ref()
            .map(|p| format!(": {}", p.display()))
            .unwrap_or_default();
        println!("configuration ok{file}\n{}", summary(&config, data_dir));
        return ExitCode::SUCCESS;
    }
    let mut scratch = None;
    if args.dev && config.store.data_dir.is_none() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("switchyard-dev-{}-{nanos}", std::process::id()));
        config.store.data_dir = Some(dir.clone());
        scratch = Some(ScratchDir(dir));
    }
    if config.store.kind == switchyard_registry::StoreKind::Embedded
        && config.store.data_dir.is_none()
    {
        eprintln!(
            "switchyard: no data directory: pass --data-dir DIR, set store.data_dir, or use --dev"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    init_tracing(args.log_format);
    let inherited = if args.upgrade {
        let Some(dir) = config.store.data_dir.clone().filter(|_| scratch.is_none()) else {
            eprintln!("switchyard: --upgrade needs the data directory of the running agent (--data-dir or store.data_dir)");
            return ExitCode::from(EXIT_USAGE);
        };
        match upgrade::take_over(&dir) {
            Ok((sockets, stream)) => Some((sockets, agent::Predecessor::Process(stream))),
            Err(e) => {
                eprintln!("switchyard: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match agent::run(config, source, scratch, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn client(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn http_agent(cli: &Cli) -> anyhow::Result<ureq::Agent> {
    use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
    };
    let mut tls = TlsConfig::builder();
    if let Some(path) = &cli.ca_cert {
        let pem = read(path, "--ca-cert")?;
        let roots = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(cert)) => Some(Ok(cert)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<Certificate<'static>>, _>>()
            .with_context(|| format!("--ca-cert {}", path.display()))?;
        anyhow::ensure!(
            !roots.is_empty(),
            "--ca-cert {}: no certificate in the file",
            path.display()
        );
        tls = tls.root_certs(RootCerts::new_with_certs(&roots));
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        let chain = [Certificate::from_pem(&read(cert, "--client-cert")?)
            .with_context(|| format!("--client-cert {}", cert.display()))?];
        let key = PrivateKey::from_pem(&read(key, "--client-key")?)
            .with_context(|| format!("--client-key {}", key.display()))?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(agent_with(tls.build()))
}

fn agent_with(tls: ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .tls_config(tls)
        .build()
        .into()
}

fn http() -> &'static ureq::Agent {
    HTTP.get_or_init(|| agent_with(ureq::tls::TlsConfig::default()))
}

/// Sends a request to the agent and returns the body of a 2xx answer.
fn call(api: &str, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<String> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let agent = http();
    let token = TOKEN.get().map_or("", String::as_str);
    let response = match (method, body) {
        ("GET", _) => agent.get(&url).header("X-Consul-Token", token).call(),
        ("DELETE", _) => agent.delete(&url).header("X-Consul-Token", token).call(),
        (_, Some(body)) => agent
            .put(&url)
            .header("Content-Type", "application/json")
            .header("X-Consul-Token", token)
            .send(&body[..]),
        (_, None) => agent.put(&url).header("X-Consul-Token", token).send_empty(),
    };
    let mut response = response.map_err(|e| {
        anyhow::anyhow!("cannot reach the agent at {api} ({e}); is `switchyard agent` running? (set --api or SWITCHYARD_API)")
    })?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .map_err(|e| anyhow::anyhow!("reading the agent's answer: {e}"))?;
    if !status.is_success() {
        anyhow::bail!("the agent answered {status}: {}", text.trim());
    }
    Ok(text)
}

fn get_json(api: &str, path: &str) -> anyhow::Result<Value> {
    let text = call(api, "GET", path, None)?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("the agent sent invalid JSON: {e}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn status(api: &str, as_json: bool) -> anyhow::Result<()> {
    let status = get_json(api, "/v1/switchyard/status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s = |k: &str| {
        status
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "switchyard {}  node {}  datacenter {}",
        s("version"),
        s("node"),
        s("datacenter")
    );
    println!(
        "catalog   index {}  store {}  {} nodes, {} services, {} endpoints  snapshot published {} ago",
        num(&status, "index"),
        s("store"),
        num(&status, "nodes"),
        num(&status, "services"),
        num(&status, "endpoints"),
        humantime::format_duration(std::time::Duration::from_secs(
            num(&status, "snapshot_age_ms") / 1000
        ))
    );
    if let Some(store) = status
        .get("store_state")
        .filter(|s| s["shared"].as_bool() == Some(true))
    {
        let connected = store["connected"].as_bool() == Some(true);
        println!(
            "store     {}  revision {}  last heard {} ms ago",
            if connected {
                "connected"
            } else {
                "UNREACHABLE (answering from the last catalog)"
            },
            store["revision"].as_u64().unwrap_or(0),
            store["staleness_ms"].as_u64().unwrap_or(0)
        );
    }
    if let Some(by) = status.get("endpoints_by_state").and_then(Value::as_object) {
        let parts: Vec<String> = by
            .iter()
            .map(|(state, n)| format!("{state} {}", n.as_u64().unwrap_or(0)))
            .collect();
        println!("endpoints {}", parts.join(", "));
    }
    if let Some(listeners) = status.get("listeners").and_then(Value::as_object) {
        let mut parts = Vec::new();
        for role in ["api", "dns", "http", "https", "tcp", "xds"] {
            match listeners.get(role) {
                Some(Value::String(addr)) => parts.push(format!("{role} {addr}")),
                Some(Value::Array(list)) if !list.is_empty() => {
                    let addrs: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                    parts.push(format!("{role} {}", addrs.join(",")));
                }
                _ => {}
            }
        }
        println!("listening {}", parts.join("  "));
    }
    if let Some(xds) = status.get("xds").filter(|x| !x.is_null()) {
        let clients = xds["clients"].as_array().cloned().unwrap_or_default();
        println!("xds       {} streams", num(xds, "streams"));
        for c in clients.iter().take(20) {
            let text = |k: &str| c[k].as_str().unwrap_or("-").to_string();
            let last = match c["last_nack"].as_str() {
                Some(nack) => format!("  last NACK {nack}"),
                None => String::new(),
            };
            println!(
                "  {}  {}  {}  {} subscriptions  {} pushes  {} acks  {} nacks{last}",
                text("node"),
                text("user_agent"),
                text("peer"),
                num(c, "subscriptions"),
                num(c, "pushes"),
                num(c, "acks"),
                num(c, "nacks"),
            );
        }
        if clients.len() > 20 {
            println!("  … {} more: switchyard status --json", clients.len() - 20);
        }
    }
    println!(
        "api       tokens {}  blocking queries {}",
        if status.get("tokens").and_then(Value::as_bool) == Some(true) {
            "required"
        } else {
            "off (loopback only)"
        },
        num(&status, "blocking_queries")
    );
    Ok(())
}

fn services(api: &str, as_json: bool) -> anyhow::Result<()> {
    let list = get_json(api, "/v1/switchyard/services")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows = list.as_array().cloned().unwrap_or_default();
    println!(
        "{:<32} {:>9} {:>8} {:>7} {:>7} {:>8} {:>5} {:>8}  TAGS",
        "SERVICE", "ENDPOINTS", "ROUTABLE", "PASSING", "WARNING", "CRITICAL", "MAINT", "DRAINING"
    );
    for row in &rows {
        let by = row.get("by_state").cloned().unwrap_or(Value::Null);
        let tags: Vec<&str> = row
            .get("tags")
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<32} {:>9} {:>8} {:>7} {:>7} {:>8} {:>5} {:>8}  {}",
            row.get("name").and_then(Value::as_str).unwrap_or("?"),
            num(row, "endpoints"),
            num(row, "routable"),
            num(&by, "passing"),
            num(&by, "warning"),
            num(&by, "critical"),
            num(&by, "maintenance"),
            num(&by, "draining"),
            tags.join(",")
        );
    }
    if rows.is_empty() {
        println!("(no services registered)");
    }
    Ok(())
}

fn endpoints(api: &str, service: &str, as_json: bool) -> anyhow::Result<()> {
    let path = format!("/v1/switchyard/services/{}", encode_path(service));
    let view = get_json(api, &path)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<22} {:<12} WHY EXCLUDED",
        "ID", "NODE", "ADDRESS", "STATE"
    );
    for e in view
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        println!(
            "{:<28} {:<20} {:<22} {:<12} {}",
            s("id"),
            s("node"),
            format!("{}:{}", s("address"), num(e, "port")),
            s("state"),
            s("excluded_because")
        );
    }
    Ok(())
}

fn register(api: &str, file: &PathBuf) -> anyhow::Result<()> {
    let body = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
    };
    let answer = call(api, "PUT", "/v1/switchyard/batch", Some(body))?;
    let index = serde_json::from_str::<Value>(&answer)
        .ok()
        .and_then(|v| v.get("index").and_then(Value::as_u64))
        .unwrap_or(0);
    println!("registered; catalog index {index}");
    Ok(())
}

fn nodes(api: &str, as_json: bool) -> anyhow::Result<()> {
    let list = get_json(api, "/v1/switchyard/nodes")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<22} {:<10} {:>9}  DEADLINE",
        "NODE", "ADDRESS", "STATE", "ENDPOINTS"
    );
    for row in list.as_array().into_iter().flatten() {
        let s = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let deadline = row
            .get("drain_deadline_ms")
            .and_then(Value::as_u64)
            .map(|ms| {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
                humantime::format_rfc3339_seconds(at).to_string()
            })
            .unwrap_or_default();
        println!(
            "{:<28} {:<22} {:<10} {:>9}  {}",
            s("name"),
            s("address"),
            s("state"),
            num(row, "endpoints"),
            deadline
        );
    }
    Ok(())
}

fn routes(api: &str, as_json: bool) -> anyhow::Result<()> {
    let list = get_json(api, "/v1/switchyard/routes")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<7} {:<28} {:<16} {:<20} NOTE",
        "ROUTE", "SOURCE", "HOST", "PATH", "SERVICE"
    );
    for row in list.as_array().into_iter().flatten() {
        let s = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let note = match row.get("shadowed_by").and_then(Value::as_str) {
            Some(winner) => format!("overridden by {winner}"),
            None => String::new(),
        };
        println!(
            "{:<24} {:<7} {:<28} {:<16} {:<20} {}",
            s("name"),
            s("source"),
            s("host"),
            s("path_prefix"),
            s("service"),
            note
        );
    }
    Ok(())
}

fn datacenters(api: &str, as_json: bool) -> anyhow::Result<()> {
    let list = get_json(api, "/v1/switchyard/datacenters")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>10} {:>13}  API",
        "DATACENTER", "STATE", "RTT", "LAST CONTACT"
    );
    for row in list.as_array().into_iter().flatten() {
        let name = row.get("name").and_then(Value::as_str).unwrap_or("");
        let state = match (row.get("local"), row.get("reachable")) {
            (Some(Value::Bool(true)), _) => "local",
            (_, Some(Value::Bool(true))) => "reachable",
            _ => "unreached",
        };
        let ms = |key: &str| row.get(key).and_then(Value::as_f64);
        let rtt = ms("rtt_ms").map_or("-".to_string(), |ms| format!("{ms:.2} ms"));
        let contact = ms("last_contact_ms").map_or("never".to_string(), |ms| {
            humantime::format_duration(Duration::from_millis(ms as u64)).to_string() + " ago"
        });
        let api: Vec<&str> = row
            .get("api")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{name:<20} {state:<10} {rtt:>10} {contact:>13}  {}",
            api.join(", ")
        );
    }
    Ok(())
}

fn node_drain_path(name: &str) -> String {
    format!("/v1/switchyard/nodes/{}/drain", encode_path(name))
}

fn endpoint_drain_path(id: &str, node: Option<&str>) -> String {
    let mut path = format!("/v1/switchyard/endpoints/{}/drain", encode_path(id));
    if let Some(node) = node {
        path.push_str("?node=");
        path.push_str(&encode_path(node));
    }
    path
}

/// Exit code of `drain --wait` when the deadline cut work.
const EXIT_CUT: u8 = 3;

/// One line of drain progress.
fn drain_line(status: &Value) -> String {
    let state = status.get("state").and_then(Value::as_str).unwrap_or("?");
    let busy: Vec<String> = status
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| num(e, "in_flight") > 0)
        .take(4)
        .map(|e| {
            format!(
                "{}={}",
                e.get("id").and_then(Value::as_str).unwrap_or("?"),
                num(e, "in_flight")
            )
        })
        .collect();
    format!(
        "{state}: {} in flight, {} cut{}{}",
        num(status, "in_flight"),
        num(status, "cut"),
        if busy.is_empty() { "" } else { "  " },
        busy.join(" ")
    )
}

fn drain(api: &str, path: &str, opts: &DrainOpts) -> anyhow::Result<ExitCode> {
    let body = match &opts.deadline {
        Some(d) => {
            switchyard_registry::parse_go_duration(d)
                .map_err(|e| anyhow::anyhow!("--deadline {d:?}: {e}"))?;
            serde_json::to_vec(&serde_json::json!({ "deadline": d }))?
        }
        None => Vec::new(),
    };
    let status: Value = serde_json::from_str(&call(api, "PUT", path, Some(body))?)
        .map_err(|e| anyhow::anyhow!("the agent sent invalid JSON: {e}"))?;
    if !opts.wait {
        println!("{}", drain_line(&status));
        return Ok(ExitCode::SUCCESS);
    }
    // Progress goes to stderr while the drain runs; the outcome is one line
    // on stdout, printed once.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = String::new();
    let status = loop {
        let status = get_json(api, path)?;
        if status.get("drained").and_then(Value::as_bool) == Some(true) {
            break status;
        }
        if status.get("state").and_then(Value::as_str) == Some("active") {
            if tty && !last.is_empty() {
                eprintln!();
            }
            anyhow::bail!("the drain was cancelled (undrained) while waiting");
        }
        let line = drain_line(&status);
        if line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if tty && !last.is_empty() {
        eprint!("\r\x1b[2K");
    }
    let cut = num(&status, "cut") + num(&status, "in_flight");
    if cut > 0 {
        println!("drained at the deadline: {cut} request(s) or connection(s) cut");
        return Ok(ExitCode::from(EXIT_CUT));
    }
    println!("drained: nothing in flight");
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a path segment.
fn encode_path(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every argument of every command says what it is, and the client-only
    /// flags sit under their own heading, not among `agent`'s options.
    #[test]
    fn every_flag_is_described_and_client_flags_have_their_heading() {
        fn walk(cmd: &clap::Command, path: &str, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                *seen += 1;
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "`{path}` argument `{id}` has no description"
                );
                let client = matches!(
                    id,
                    "api" | "token" | "ca_cert" | "client_cert" | "client_key"
                );
                assert_eq!(
                    arg.get_help_heading() == Some(CLIENT_OPTIONS),
                    client,
                    "`{path}` argument `{id}`: heading {:?}",
                    arg.get_help_heading()
                );
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                assert!(
                    sub.get_about().is_some(),
                    "`{path} {}` has no summary",
                    sub.get_name()
                );
                walk(sub, &format!("{path} {}", sub.get_name()), seen);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut seen = 0;
        walk(&cmd, "switchyard", &mut seen);
        assert!(seen > 20, "only {seen} arguments walked");
        let agent = cmd.find_subcommand("agent").expect("agent");
        let about = agent.get_about().expect("about").to_string();
        assert!(about.contains("proxy") && about.contains("DNS"), "{about}");
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(!colour_logs(false, None));
        assert!(!colour_logs(true, Some("1".into())));
        assert!(colour_logs(true, Some("".into())));
    }
}
