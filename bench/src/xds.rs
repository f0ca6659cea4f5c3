//! W-xds (issue 31): many ADS streams on one agent, then single-endpoint
//! changes. Opens `streams` state-of-the-world ADS streams (over
//! `connections` HTTP/2 connections, as a fleet's clients would each hold
//! one), each subscribed to the endpoints of `subscriptions` of `services`
//! services, acknowledging every response as gRPC clients do. Reports the
//! agent's memory per stream, then for each change (one endpoint's weight,
//! written through the API) the time from sending the write to the last
//! subscribed stream receiving the update (and to every one of them), the
//! write's own round trip, and the agent's CPU per change and per push.
//! Run at several catalog sizes: the cost of one change must follow the
//! changed service, not the catalog.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::churn::{http, put, rss_bytes, start_agent_with};
use crate::watch::cpu_seconds;

const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The switchyard binary (build it with --release first).
    #[arg(long, default_value = "target/release/switchyard")]
    agent: PathBuf,
    /// Catalog sizes (endpoints over all services), comma-separated: a
    /// fresh agent each. Past the subscribed services' endpoints, the rest
    /// are in services of 1,000 endpoints nobody subscribes to.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    endpoints: Vec<usize>,
    /// Services the streams subscribe to.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints of each subscribed service.
    #[arg(long, default_value_t = 1)]
    per_service: usize,
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Services each stream subscribes to.
    #[arg(long, default_value_t = 10)]
    subscriptions: usize,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Changes, one at a time, each to one endpoint of one service.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// SRV queries for the DNS comparison (one outstanding at a time, over
    /// the services in turn).
    #[arg(long, default_value_t = 20_000)]
    dns_queries: usize,
}

/// The local path a client would otherwise take: re-resolving
/// `svc-N.service.consul SRV`. Returns the agent's CPU per query (µs) and
/// the median round trip (ms); large answers are truncated over UDP and
/// asked again over TCP, as resolvers do.
fn dns_cost(dns: &str, pid: u32, args: &Args) -> anyhow::Result<(f64, f64)> {
    use std::io::{Read, Write};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.connect(dns)?;
    let mut rtts = Vec::with_capacity(args.dns_queries);
    let mut answer = vec![0u8; 65_535];
    let cpu_before = cpu_seconds(pid)?;
    for q in 0..args.dns_queries {
        let mut query = vec![(q >> 8) as u8, q as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in [
            format!("svc-{}", q % args.services).as_str(),
            "service",
            "consul",
        ] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 33, 0, 1]);
        let sent = Instant::now();
        socket.send(&query)?;
        let n = socket.recv(&mut answer)?;
        if n < 12 {
            bail!("a short DNS answer");
        }
        if answer[2] & 0x02 != 0 {
            // Truncated: over TCP.
            let mut tcp = std::net::TcpStream::connect(dns)?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&query);
            tcp.write_all(&framed)?;
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len)?;
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut body)?;
        }
        rtts.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    rtts.sort_by(f64::total_cmp);
    Ok((cpu * 1e6 / args.dns_queries as f64, percentile(&rtts, 0.5)))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// The services stream `i` subscribes to.
fn subscribed(i: usize, args: &Args) -> impl Iterator<Item = usize> + '_ {
    (0..args.subscriptions).map(move |k| (i * args.subscriptions + k) % args.services)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "| catalog endpoints | per subscribed service | streams | RSS per stream | sync all | change → last stream p50 / p99 | change → each stream p50 | write p50 | agent CPU per change | per push |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut dns_rows = Vec::new();
    for &total in &args.endpoints {
        let config = format!(
            "[xds]\naddr = \"127.0.0.1:0\"\nmax_streams = {}\n[api]\nmax_batch_endpoints = 200000\n",
            args.streams + 100
        );
        let agent = start_agent_with(&args.agent, &config)?;
        let pid = agent.child.id();
        let xds = agent.xds.clone().context("the agent serves no xDS")?;
        let client = http();
        let batch = format!("{}/v1/switchyard/batch", agent.api);
        // 100 endpoints per node, each of another service: a service's
        // endpoints sit on distinct nodes.
        let nodes: Vec<Value> = (0..(args.services * args.per_service).div_ceil(100))
            .map(|n| json!({"name": format!("node-{n}"), "address": format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)}))
            .collect();
        for part in nodes.chunks(50_000) {
            put(&client, &batch, json!({ "nodes": part }).to_string())?;
        }
        let endpoint = |j: usize, weight: u32| {
            json!({"node": format!("node-{}", j / 100), "service": format!("svc-{}", j % args.services),
                   "id": format!("e-{j}"), "port": 8000, "weights": {"passing": weight, "warning": 1}})
        };
        let subscribed_endpoints = args.services * args.per_service;
        if subscribed_endpoints > total {
            bail!("{total} endpoints cannot hold {subscribed_endpoints} subscribed ones");
        }
        let filler = |f: usize| {
            json!({"node": format!("fill-node-{}", f / 100), "service": format!("fill-{}", f / 1000),
                   "id": format!("f-{f}"), "port": 8000 + f % 100})
        };
        let filler_nodes: Vec<Value> = (0..(total - subscribed_endpoints).div_ceil(100))
            .map(|n| json!({"name": format!("fill-node-{n}"), "address": format!("11.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)}))
            .collect();
        for part in filler_nodes.chunks(50_000) {
            put(&client, &batch, json!({ "nodes": part }).to_string())?;
        }
        let started = Instant::now();
        for from in (0..total).step_by(50_000) {
            let part: Vec<Value> = (from..(from + 50_000).min(total))
                .map(|j| match j < subscribed_endpoints {
                    true => endpoint(j, 1),
                    false => filler(j - subscribed_endpoints),
                })
                .collect();
            put(&client, &batch, json!({ "endpoints": part }).to_string())?;
        }
        eprintln!(
            "{total} endpoints registered in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let rss_before = rss_bytes(pid)?;

        // The streams: each reports (service, arrival) for every
        // assignment it receives.
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
        let opened = Instant::now();
        let channels: Vec<_> = runtime.block_on(async {
            let mut channels = Vec::new();
            for _ in 0..args.connections {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))?
                    .connect()
                    .await?;
                channels.push(channel);
            }
            anyhow::Ok(channels)
        })?;
        let measuring = Arc::new(AtomicBool::new(true));
        for i in 0..args.streams {
            let measuring = measuring.clone();
            let channel = channels[i % channels.len()].clone();
            let names: Vec<String> = subscribed(i, &args)
                .map(|s| format!("svc/svc-{s}"))
                .collect();
            let tx = tx.clone();
            runtime.spawn(async move {
                if let Err(e) = stream(channel, i, names, tx).await {
                    if measuring.load(Ordering::Relaxed) {
                        eprintln!("stream {i}: {e}");
                    }
                }
            });
        }
        let expected = args.streams * args.subscriptions;
        let mut synced = 0;
        runtime.block_on(async {
            while synced < expected {
                match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
                    Ok(Some(_)) => synced += 1,
                    _ => bail!("only {synced} of {expected} first assignments arrived"),
                }
            }
            anyhow::Ok(())
        })?;
        let sync = opened.elapsed();
        // Let the ACKs land before measuring memory.
        std::thread::sleep(Duration::from_secs(2));
        let rss_per_stream = (rss_bytes(pid)?.saturating_sub(rss_before)) / args.streams as u64;

        let mut subscribers = vec![0usize; args.services];
        for i in 0..args.streams {
            for s in subscribed(i, &args) {
                subscribers[s] += 1;
            }
        }
        let mut last = Vec::new();
        let mut each = Vec::new();
        let mut writes = Vec::new();
        let mut pushes = 0usize;
        let cpu_before = cpu_seconds(pid)?;
        for k in 0..args.changes {
            let s = (k * 7) % args.services;
            let body = json!({ "endpoints": [endpoint(s, 2 + (k % 5) as u32)] }).to_string();
            let sent = Instant::now();
            put(&client, &batch, body)?;
            writes.push(sent.elapsed().as_secs_f64() * 1e3);
            let mut got = 0;
            let mut latest = sent;
            runtime.block_on(async {
                while got < subscribers[s] {
                    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                        Ok(Some((service, at))) if service == s => {
                            got += 1;
                            latest = latest.max(at);
                            each.push(at.duration_since(sent).as_secs_f64() * 1e3);
                        }
                        Ok(Some((service, _))) => bail!("an update of svc-{service}, unchanged"),
                        _ => bail!("change {k}: {got} of {} streams updated", subscribers[s]),
                    }
                }
                anyhow::Ok(())
            })?;
            pushes += got;
            last.push(latest.duration_since(sent).as_secs_f64() * 1e3);
        }
        let cpu = cpu_seconds(pid)? - cpu_before;
        let dns = agent.dns.clone().context("dns address")?;
        let (dns_cpu_us, dns_rtt_ms) = dns_cost(&dns, pid, &args)?;
        dns_rows.push(format!(
            "| {total} | {} | {dns_rtt_ms:.3} ms | {dns_cpu_us:.1} µs | {:.0} | {:.2} cores | {:.0} | {:.2} cores |",
            args.per_service,
            // Re-resolving each name every second / every 30 s.
            (args.streams * args.subscriptions) as f64,
            (args.streams * args.subscriptions) as f64 * dns_cpu_us / 1e6,
            (args.streams * args.subscriptions) as f64 / 30.0,
            (args.streams * args.subscriptions) as f64 / 30.0 * dns_cpu_us / 1e6,
        ));
        for list in [&mut last, &mut each, &mut writes] {
            list.sort_by(f64::total_cmp);
        }
        println!(
            "| {total} | {} | {} | {:.1} KiB | {:.1} s | {:.2} / {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} µs |",
            args.per_service,
            args.streams,
            rss_per_stream as f64 / 1024.0,
            sync.as_secs_f64(),
            percentile(&last, 0.5),
            percentile(&last, 0.99),
            percentile(&each, 0.5),
            percentile(&writes, 0.5),
            cpu * 1e3 / args.changes as f64,
            cpu * 1e6 / pushes as f64,
        );
        measuring.store(false, Ordering::Relaxed);
        drop(channels);
        drop(agent);
    }
    println!();
    println!(
        "DNS SRV re-resolution instead ({} clients' names): a change is seen after half the interval on average",
        args.streams * args.subscriptions
    );
    println!();
    println!("| catalog endpoints | endpoints per service | SRV round trip p50 | agent CPU per SRV query | queries/s at 1 s | CPU | queries/s at 30 s | CPU |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in dns_rows {
        println!("{row}");
    }
    Ok(())
}

/// One ADS stream: subscribes to `names`' assignments, reports each one
/// received, and acknowledges each response.
async fn stream(
    channel: tonic::transport::Channel,
    i: usize,
    names: Vec<String>,
    report: mpsc::UnboundedSender<(usize, Instant)>,
) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (send, requests) = mpsc::channel(4);
    let request = |nonce: String, version: String| DiscoveryRequest {
        node: Some(Node {
            id: format!("bench-{i}"),
            ..Default::default()
        }),
        type_url: CLA.into(),
        resource_names: names.clone(),
        response_nonce: nonce,
        version_info: version,
        ..Default::default()
    };
    send.send(request(String::new(), String::new())).await?;
    let mut answers = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await?
        .into_inner();
    let index: HashMap<String, usize> = names
        .iter()
        .filter_map(|n| Some((n.clone(), n.strip_prefix("svc/svc-")?.parse().ok()?)))
        .collect();
    while let Some(response) = answers.message().await? {
        let at = Instant::now();
        for resource in &response.resources {
            let cla = <envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as prost::Message>::decode(&resource.value[..])?;
            if let Some(s) = index.get(&cla.cluster_name) {
                let _ = report.send((*s, at));
            }
        }
        send.send(request(response.nonce, response.version_info))
            .await?;
    }
    Ok(())
}
