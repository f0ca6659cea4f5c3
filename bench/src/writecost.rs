//! Write cost by service size (issue 26): one endpoint registered into, and
//! deregistered from, a service that already has N endpoints, through the
//! API (durable: acknowledged after the group commit), one at a time. The
//! client's latency per write and the writer's publish time per write (from
//! `switchyard_registry_publish_duration_seconds`), by N.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use crate::churn::{get_json, http, put, start_agent, start_agent_with};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The switchyard binary (build it with --release first).
    #[arg(long, default_value = "target/release/switchyard")]
    agent: PathBuf,
    /// Service sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    sizes: Vec<usize>,
    /// Single-endpoint changes measured per size (each a registration and a deregistration).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Route the service through the proxy (its backends are then built too).
    #[arg(long)]
    routed: bool,
    /// Endpoints per change: above 1, each change is one batch of this many
    /// registrations (`/v1/switchyard/batch`) and one of their deregistrations.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

fn publish_seconds(api: &str) -> anyhow::Result<(f64, f64)> {
    let text = http()
        .get(format!("{api}/metrics"))
        .call()?
        .body_mut()
        .with_config()
        // A routed service of 100k endpoints has metrics for each.
        .limit(1 << 30)
        .read_to_string()?;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("switchyard_registry_publish_duration_seconds_sum"),
        value("switchyard_registry_publish_duration_seconds_count"),
    ))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    println!("| endpoints in the service | register: client µs (median) | deregister: client µs (median) | publish µs per write (mean) |");
    println!("|---|---|---|---|");
    for &size in &args.sizes {
        let agent = if args.routed {
            start_agent_with(&args.agent, "[[http.routes]]\nservice = \"big\"\n")?
        } else {
            start_agent(&args.agent)?
        };
        let client = http();
        let nodes = size.div_ceil(100).max(1);
        let node_list: Vec<Value> = (0..nodes)
            .map(|n| json!({"name": format!("node-{n}"), "address": format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)}))
            .collect();
        let batch = format!("{}/v1/switchyard/batch", agent.api);
        put(&client, &batch, json!({"nodes": node_list}).to_string())?;
        for start in (0..size).step_by(5000) {
            let endpoints: Vec<Value> = (start..(start + 5000).min(size))
                .map(|k| json!({"node": format!("node-{}", k / 100), "service": "big", "id": format!("task-{k}"), "port": 8000 + k % 100, "tags": ["v1"]}))
                .collect();
            put(
                &client,
                &batch,
                json!({ "endpoints": endpoints }).to_string(),
            )?;
        }
        let status = get_json(&client, &format!("{}/v1/switchyard/status", agent.api))?;
        let registered = status["endpoints"].as_u64().context("endpoints")?;
        anyhow::ensure!(
            registered >= size as u64,
            "only {registered} of {size} registered"
        );
        let register = format!("{}/v1/catalog/register", agent.api);
        let deregister = format!("{}/v1/catalog/deregister", agent.api);
        let (sum0, count0) = publish_seconds(&agent.api)?;
        let (mut reg, mut dereg) = (Vec::new(), Vec::new());
        for i in 0..args.changes {
            // Spread over the service: each change lands on another node.
            let n = i * 7919 % nodes;
            let node = format!("node-{n}");
            let address = format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255);
            if args.batch > 1 {
                let ids: Vec<String> = (0..args.batch).map(|b| format!("extra-{i}-{b}")).collect();
                let endpoints: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"node": node, "service": "big", "id": id, "port": 9000}))
                    .collect();
                let started = Instant::now();
                put(
                    &client,
                    &batch,
                    json!({ "endpoints": endpoints }).to_string(),
                )?;
                reg.push(started.elapsed().as_secs_f64() * 1e6);
                let gone: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"node": node, "id": id}))
                    .collect();
                let started = Instant::now();
                put(&client, &batch, json!({ "deregister": gone }).to_string())?;
                dereg.push(started.elapsed().as_secs_f64() * 1e6);
                continue;
            }
            let body = json!({"Node": node, "Address": address, "Service": {"ID": format!("extra-{i}"), "Service": "big", "Port": 9000}});
            let started = Instant::now();
            put(&client, &register, body.to_string())?;
            reg.push(started.elapsed().as_secs_f64() * 1e6);
            let body = json!({"Node": node, "ServiceID": format!("extra-{i}")});
            let started = Instant::now();
            put(&client, &deregister, body.to_string())?;
            dereg.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let (sum1, count1) = publish_seconds(&agent.api)?;
        let publish = (sum1 - sum0) / (count1 - count0).max(1.0) * 1e6;
        println!(
            "| {size} | {:.0} | {:.0} | {publish:.0} |",
            median(reg),
            median(dereg)
        );
    }
    Ok(())
}
