//! Active checks at scale: N endpoints with HTTP checks every `interval`
//! against one local backend; reports the agent's CPU per probe and in total.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[arg(long, default_value = "target/release/switchyard")]
    agent: PathBuf,
    /// Endpoints, one HTTP check each.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Check interval (Go duration).
    #[arg(long, default_value = "10s")]
    interval: String,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .context("stat")?
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn backend(hits: Arc<AtomicUsize>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let hits = hits.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let mut seen = Vec::new();
                loop {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.clear();
                    hits.fetch_add(1, Ordering::Relaxed);
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let hits = Arc::new(AtomicUsize::new(0));
    let backend = backend(hits.clone())?;
    let process = crate::churn::start_agent(&args.agent)?;
    let api = process.api.clone();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let nodes: Vec<Value> = (0..args.endpoints.div_ceil(100))
        .map(|n| json!({"name": format!("n{n}"), "address": "127.0.0.1"}))
        .collect();
    for start in (0..args.endpoints).step_by(5000) {
        let endpoints: Vec<Value> = (start..(start + 5000).min(args.endpoints))
            .map(|k| json!({
                "node": format!("n{}", k / 100), "service": format!("s{}", k / 10), "id": format!("e{k}"),
                "port": backend.port(),
                "checks": [{"http": format!("http://{backend}/health/{k}"), "interval": args.interval, "timeout": "5s"}],
            }))
            .collect();
        let body = if start == 0 {
            json!({"nodes": nodes, "endpoints": endpoints})
        } else {
            json!({"endpoints": endpoints})
        };
        agent
            .put(format!("{api}/v1/switchyard/batch"))
            .header("Content-Type", "application/json")
            .send(body.to_string())?;
    }
    // Wait for every check to pass once (the first round is spread over one interval).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: Value = serde_json::from_str(
            &agent
                .get(format!("{api}/v1/switchyard/status"))
                .call()?
                .body_mut()
                .read_to_string()?,
        )?;
        if status["endpoints_by_state"]["passing"].as_u64() == Some(args.endpoints as u64) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "checks did not all pass: {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let pid = process.child.id();
    let (cpu0, hits0, t0) = (
        cpu_seconds(pid)?,
        hits.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(args.seconds));
    let (cpu1, hits1, elapsed) = (
        cpu_seconds(pid)?,
        hits.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    drop(process);
    let probes = (hits1 - hits0) as f64;
    let cpu = cpu1 - cpu0;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| endpoints with an HTTP check | {} every {} |",
        args.endpoints, args.interval
    );
    println!(
        "| probes answered in {elapsed:.0} s | {probes:.0} ({:.0}/s) |",
        probes / elapsed
    );
    println!("| agent CPU | {:.1}% of one core |", cpu / elapsed * 100.0);
    println!(
        "| agent CPU per probe | {:.1} µs |",
        cpu * 1e6 / probes.max(1.0)
    );
    Ok(())
}
