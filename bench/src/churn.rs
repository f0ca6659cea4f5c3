//! Durable registration throughput through the agent's HTTP API, with the
//! embedded store fsyncing every group commit, plus the agent's memory per endpoint.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The switchyard binary (build it with --release first).
    #[arg(long, default_value = "target/release/switchyard")]
    agent: PathBuf,
    /// Endpoints registered through the batch API.
    #[arg(long, default_value_t = 200_000)]
    endpoints: usize,
    /// Endpoints per batch request.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Endpoints per node.
    #[arg(long, default_value_t = 100)]
    per_node: usize,
    /// Single Consul-style registrations (one endpoint per request) after the batches.
    #[arg(long, default_value_t = 4_000)]
    singles: usize,
    /// Concurrent clients for the single registrations.
    #[arg(long, default_value_t = 16)]
    single_clients: usize,
}

/// A release agent on a fresh data directory, killed on drop.
pub(crate) struct AgentProcess {
    pub(crate) child: Child,
    /// `http://host:port` of its API.
    pub(crate) api: String,
    /// Its xDS server's address, when it serves xDS.
    pub(crate) xds: Option<String>,
    /// Its DNS address.
    pub(crate) dns: Option<String>,
    _dir: tempfile::TempDir,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_agent(bin: &PathBuf) -> anyhow::Result<AgentProcess> {
    start_agent_with(bin, "")
}

/// `start_agent` with `config` (TOML) as its configuration file.
pub(crate) fn start_agent_with(bin: &PathBuf, config: &str) -> anyhow::Result<AgentProcess> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, config)?;
    let mut child = Command::new(bin)
        .args([
            "agent",
            "--api-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--node-name",
            "bench",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: Value = serde_json::from_str(&line).context("ready line")?;
    let api = format!("http://{}", ready["api"].as_str().context("api")?);
    let xds = ready["xds"].as_str().map(str::to_string);
    let dns = ready["dns"].as_str().map(str::to_string);
    Ok(AgentProcess {
        child,
        api,
        xds,
        dns,
        _dir: dir,
    })
}

pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kib * 1024)
}

pub(crate) fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

pub(crate) fn put(agent: &ureq::Agent, url: &str, body: String) -> anyhow::Result<()> {
    let mut response = agent
        .put(url)
        .header("Content-Type", "application/json")
        .send(body)?;
    if !response.status().is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        bail!("{url}: {} {text}", response.status());
    }
    Ok(())
}

pub(crate) fn get_json(agent: &ureq::Agent, url: &str) -> anyhow::Result<Value> {
    let mut response = agent.get(url).call()?;
    Ok(serde_json::from_str(
        &response.body_mut().read_to_string()?,
    )?)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let agent = start_agent(&args.agent)?;
    let pid = agent.child.id();
    let client = http();
    let nodes = args.endpoints.div_ceil(args.per_node);
    let node_list: Vec<Value> = (0..nodes)
        .map(|n| json!({"name": format!("node-{n}"), "address": format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)}))
        .collect();
    put(
        &client,
        &format!("{}/v1/switchyard/batch", agent.api),
        json!({"nodes": node_list}).to_string(),
    )?;
    let rss_before = rss_bytes(pid)?;

    // Pre-render every batch body so the clients measure the agent, not JSON building.
    let bodies: Vec<String> = (0..args.endpoints)
        .step_by(args.batch)
        .map(|start| {
            let end = (start + args.batch).min(args.endpoints);
            let endpoints: Vec<Value> = (start..end)
                .map(|k| {
                    json!({
                        "node": format!("node-{}", k / args.per_node),
                        "service": format!("svc-{}", k / 3),
                        "id": format!("task-{k}"),
                        "port": 8000 + (k % 100),
                        "tags": ["v1"],
                    })
                })
                .collect();
            json!({ "endpoints": endpoints }).to_string()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/switchyard/batch", agent.api);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|_| {
            let (bodies, next, url) = (bodies.clone(), next.clone(), url.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let client = http();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else {
                        return Ok(());
                    };
                    put(&client, &url, body.clone())?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let batch_secs = started.elapsed().as_secs_f64();
    let status = get_json(&client, &format!("{}/v1/switchyard/status", agent.api))?;
    let registered = status["endpoints"].as_u64().unwrap_or(0);
    if registered < args.endpoints as u64 {
        bail!(
            "only {registered} of {} endpoints registered",
            args.endpoints
        );
    }
    let rss_after = rss_bytes(pid)?;

    // Consul-style: one endpoint per request, many clients: group commit at work.
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/agent/service/register", agent.api);
    let total = args.singles;
    let started = Instant::now();
    let workers: Vec<_> = (0..args.single_clients)
        .map(|_| {
            let (next, url) = (next.clone(), url.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let client = http();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(());
                    }
                    let body = json!({"Name": format!("single-{}", i % 50), "ID": format!("single-{i}"), "Port": 9000}).to_string();
                    put(&client, &url, body)?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let single_secs = started.elapsed().as_secs_f64();

    let per_endpoint = rss_after.saturating_sub(rss_before) as f64 / args.endpoints as f64;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| endpoints registered (batch API, durable) | {} in {} batches of {} by {} clients |",
        args.endpoints,
        bodies.len(),
        args.batch,
        args.clients
    );
    println!(
        "| batch registration throughput | {:.0} endpoint changes/s ({batch_secs:.2} s) |",
        args.endpoints as f64 / batch_secs
    );
    println!("| single registrations (agent API, {} clients) | {:.0} registrations/s ({total} in {single_secs:.2} s) |", args.single_clients, total as f64 / single_secs);
    println!(
        "| agent RSS before / after | {:.1} MiB / {:.1} MiB |",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    println!("| RSS per endpoint | {per_endpoint:.0} bytes |");
    Ok(())
}
