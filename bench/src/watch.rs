//! W-watch (issue 26): N watchers blocking on one service of E endpoints
//! (`/v1/health/service/web?index=..`), then one change. Reports the time
//! from the change to each watcher's response head and to its whole body
//! (p50/p99/max), the agent's RSS per waiting watcher, and the agent's CPU
//! for the wake cycle. Watchers connect from many loopback addresses (100
//! each), under `api.max_connections_per_client`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::churn::{http, put, rss_bytes, start_agent_with};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The switchyard binary (build it with --release first).
    #[arg(long, default_value = "target/release/switchyard")]
    agent: PathBuf,
    /// Watcher counts to measure, comma-separated (a fresh agent each).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    watchers: Vec<usize>,
    /// Endpoints of the watched service.
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Watchers send `Accept-Encoding: gzip`, as Go's HTTP client does
    /// (consul-template, Consul's API client).
    #[arg(long)]
    gzip: bool,
    /// Watchers keep their connections open, as consul-template and Consul's
    /// API client do (the default asks `Connection: close`).
    #[arg(long)]
    keep_alive: bool,
}

pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn metric(api: &str, name: &str) -> anyhow::Result<f64> {
    let text = http()
        .get(format!("{api}/metrics"))
        .call()?
        .body_mut()
        .read_to_string()?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// The length of an answer from its head: the head and its Content-Length.
fn answer_length(text: &str) -> Option<usize> {
    let (head, _) = text.split_once("\r\n\r\n")?;
    let body: usize = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })?;
    Some(head.len() + 4 + body)
}

thread_local! {
    static READ: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// One watcher: connects from `source`, asks, and returns the times from
/// `change` (set by the driver) to the response head and to its end.
async fn watcher(
    api: std::net::SocketAddr,
    source: std::net::IpAddr,
    index: u64,
    gzip: bool,
    keep_alive: bool,
    change: tokio::sync::watch::Receiver<Option<Instant>>,
) -> anyhow::Result<(f64, f64, u64)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    let mut stream = socket.connect(api).await?;
    let encoding = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let request = format!(
        "GET /v1/health/service/web?index={index}&wait=300s HTTP/1.1\r\nHost: x\r\n{encoding}{close}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // One read buffer for every watcher (the runtime has one thread): 10,000
    // buffers of their own would cost the client more than the agent.
    let mut head: Option<(f64, String)> = None;
    let mut total = 0;
    // With keep-alive the answer ends at its length, not at the close.
    let mut length: Option<usize> = None;
    loop {
        if length.is_some_and(|length| total >= length) {
            break;
        }
        stream.readable().await?;
        let read = READ.with_borrow_mut(|buf| {
            let n = stream.try_read(buf)?;
            if head.is_none() && n > 0 {
                let text = String::from_utf8_lossy(&buf[..n.min(1024)]).into_owned();
                head = Some((0.0, text));
            }
            Ok::<_, std::io::Error>(n)
        });
        match read {
            Ok(0) => break,
            Ok(n) => {
                if total == 0 {
                    if let Some(head) = head.as_mut() {
                        head.0 = change
                            .borrow()
                            .context("answered before the change")?
                            .elapsed()
                            .as_secs_f64();
                    }
                }
                total += n;
                if keep_alive && length.is_none() {
                    length = head.as_ref().and_then(|(_, text)| answer_length(text));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (head, text) = head.context("no answer")?;
    let new_index = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("X-Consul-Index: ")
                .or_else(|| l.strip_prefix("x-consul-index: "))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let whole = change.borrow().context("change")?.elapsed().as_secs_f64();
    if total < 500 {
        bail!("a short answer: {text}");
    }
    Ok((head, whole, new_index))
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    println!("| watchers | head after the change p50 / p99 / max (ms) | whole body p50 / p99 / max (ms) | agent RSS per waiting watcher | agent CPU for the wake (s) | bodies rendered |");
    println!("|---|---|---|---|---|---|");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for &count in &args.watchers {
        // Past the API's share of this machine's descriptor limit (20,000
        // here, a share of 4,359): the cap is raised for the watchers.
        let config = format!("[api]\nmax_connections = {}\n", count + 1000);
        let agent = start_agent_with(&args.agent, &config)?;
        let pid = agent.child.id();
        let client = http();
        let batch = format!("{}/v1/switchyard/batch", agent.api);
        let nodes: Vec<Value> = (0..args.endpoints.div_ceil(100))
            .map(|n| json!({"name": format!("node-{n}"), "address": format!("10.0.{}.{}", n >> 8 & 255, n & 255)}))
            .collect();
        put(&client, &batch, json!({"nodes": nodes}).to_string())?;
        let endpoints: Vec<Value> = (0..args.endpoints)
            .map(|k| json!({"node": format!("node-{}", k / 100), "service": "web", "id": format!("web-{k}"), "port": 8000 + k % 100, "tags": ["v1", "primary"], "meta": {"version": "1.2.3"}}))
            .collect();
        put(
            &client,
            &batch,
            json!({ "endpoints": endpoints }).to_string(),
        )?;
        let mut response = client
            .get(format!("{}/v1/health/service/web", agent.api))
            .call()?;
        let index: u64 = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .context("index")?;
        let body_len = response.body_mut().read_to_vec()?.len();
        let api: std::net::SocketAddr = agent.api.trim_start_matches("http://").parse()?;
        let rss_before = rss_bytes(pid)?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        let results = runtime.block_on(async {
            let tasks: Vec<_> = (0..count)
                .map(|i| {
                    let source = std::net::IpAddr::from([127, 3, (i / 100 / 250) as u8, (i / 100 % 250 + 1) as u8]);
                    tokio::spawn(watcher(api, source, index, args.gzip, args.keep_alive, rx.clone()))
                })
                .collect();
            let waiting = "switchyard_api_blocking_queries ";
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let now_waiting = metric(&agent.api, waiting)?;
                if now_waiting >= count as f64 {
                    break;
                }
                if Instant::now() > deadline {
                    let open = metric(&agent.api, "switchyard_api_connections{")?;
                    let ended = tasks.iter().filter(|t| t.is_finished()).count();
                    bail!("{now_waiting} of {count} watchers waiting after 120 s ({open} API connections; {ended} watchers ended)");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let rss_waiting = rss_bytes(pid)?;
            let rendered_before = metric(&agent.api, "switchyard_api_blocking_answers_total{outcome=\"rendered\"}")?;
            let cpu_before = cpu_seconds(pid)?;
            tx.send(Some(Instant::now()))?;
            let body = json!({"Node": "node-0", "Address": "10.0.0.0", "Service": {"ID": "web-new", "Service": "web", "Port": 9999}});
            let api_url = agent.api.clone();
            tokio::task::spawn_blocking(move || put(&http(), &format!("{api_url}/v1/catalog/register"), body.to_string())).await??;
            let mut times = Vec::with_capacity(count);
            for task in tasks {
                times.push(task.await??);
            }
            let cpu = cpu_seconds(pid)? - cpu_before;
            let rendered = metric(&agent.api, "switchyard_api_blocking_answers_total{outcome=\"rendered\"}")? - rendered_before;
            anyhow::Ok((times, rss_waiting, cpu, rendered))
        })?;
        let (times, rss_waiting, cpu, rendered) = results;
        if let Some((_, _, stale)) = times.iter().find(|(_, _, i)| *i <= index) {
            bail!("a watcher got index {stale}, not past {index}");
        }
        let mut heads: Vec<f64> = times.iter().map(|t| t.0 * 1000.0).collect();
        let mut wholes: Vec<f64> = times.iter().map(|t| t.1 * 1000.0).collect();
        heads.sort_by(f64::total_cmp);
        wholes.sort_by(f64::total_cmp);
        let per_watcher = rss_waiting.saturating_sub(rss_before) as f64 / count as f64 / 1024.0;
        println!(
            "| {count}{}{} ({} endpoints, {} KB body) | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {per_watcher:.1} KiB | {cpu:.2} | {rendered:.0} |",
            if args.gzip { ", gzip" } else { "" },
            if args.keep_alive { ", keep-alive" } else { "" },
            args.endpoints,
            body_len / 1000,
            percentile(&heads, 0.5),
            percentile(&heads, 0.99),
            heads[heads.len() - 1],
            percentile(&wholes, 0.5),
            percentile(&wholes, 0.99),
            wholes[wholes.len() - 1],
        );
    }
    Ok(())
}
