//! Publish cost of one change as the catalog grows: preload N endpoints, then
//! time single-endpoint changes (apply + rebuild of the touched service view +
//! publish) through the real writer with an in-memory store.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use switchyard_registry::{Batch, Command, Endpoint, MemoryStore, Node, Registry, RegistryMetrics};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Catalog sizes in endpoints.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,100000,1000000"
    )]
    sizes: Vec<usize>,
    /// Timed endpoint changes per size.
    #[arg(long, default_value_t = 5_000)]
    changes: usize,
    /// Endpoint changes per command (1 = one publish per change; larger values
    /// show what group commit does under churn).
    #[arg(long, default_value_t = 1)]
    group: usize,
}

fn node(n: usize) -> Node {
    Node::new(
        format!("node-{n}"),
        format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255),
    )
}

fn endpoint(k: usize, port: u16) -> Endpoint {
    let mut e = Endpoint::new(
        format!("node-{}", k / 100),
        format!("task-{k}"),
        format!("svc-{}", k / 3),
        port,
    );
    e.tags = vec!["v1".to_string()];
    e
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024
}

async fn one_size(size: usize, changes: usize, group: usize) -> anyhow::Result<(f64, f64, f64)> {
    let rss_before = rss_bytes();
    let metrics = Arc::new(RegistryMetrics::unregistered());
    let (registry, _writer) = Registry::start(MemoryStore::default(), metrics).context("start")?;
    let nodes: Vec<Node> = (0..size.div_ceil(100)).map(node).collect();
    registry
        .apply(Command::Batch(Batch {
            nodes,
            ..Batch::default()
        }))
        .await?;
    for start in (0..size).step_by(10_000) {
        let endpoints = (start..(start + 10_000).min(size))
            .map(|k| (endpoint(k, 8000), Vec::new()))
            .collect();
        registry
            .apply(Command::Batch(Batch {
                endpoints,
                ..Batch::default()
            }))
            .await?;
    }
    let rss_loaded = rss_bytes();
    let started = Instant::now();
    let mut i = 0;
    while i < changes {
        let change = if group <= 1 {
            Command::RegisterService {
                endpoint: endpoint(fastrand_index(i, size), 9000 + (i % 1000) as u16),
                checks: Vec::new(),
                replace_existing_checks: false,
            }
        } else {
            let endpoints = (i..(i + group).min(changes))
                .map(|j| {
                    (
                        endpoint(fastrand_index(j, size), 9000 + (j % 1000) as u16),
                        Vec::new(),
                    )
                })
                .collect();
            Command::Batch(Batch {
                endpoints,
                ..Batch::default()
            })
        };
        registry.apply(change).await?;
        i += group.max(1);
    }
    let per_change_us = started.elapsed().as_secs_f64() * 1e6 / changes as f64;
    let snap = registry.snapshot();
    anyhow::ensure!(
        snap.counts().total() as usize == size,
        "catalog holds {} endpoints",
        snap.counts().total()
    );
    let per_endpoint = rss_loaded.saturating_sub(rss_before) as f64 / size as f64;
    registry.shutdown().await;
    Ok((per_change_us, per_endpoint, rss_loaded as f64 / 1048576.0))
}

/// A spread of endpoint positions without a random generator dependency.
fn fastrand_index(i: usize, size: usize) -> usize {
    (i.wrapping_mul(2_654_435_761)) % size
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    // One thread: the figure is the work per change (channel hop, apply, view
    // rebuild, publish), not cross-thread wake-up latency, which is noise here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("| endpoints | µs per change (apply + publish) | ratio to smallest | RSS per endpoint | process RSS |");
    println!("|---|---|---|---|---|");
    let mut first = None;
    for size in args.sizes {
        let (us, per_endpoint, rss) = runtime.block_on(one_size(size, args.changes, args.group))?;
        let base = *first.get_or_insert(us);
        println!(
            "| {size} | {us:.2} | {:.2}× | {per_endpoint:.0} B | {rss:.0} MiB |",
            us / base
        );
    }
    Ok(())
}
