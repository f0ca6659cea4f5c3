//! Active health checks: HTTP(S), TCP and gRPC (cleartext or TLS) probes for
//! the checks registered with an `HTTP`, `TCP` or `GRPC` definition.
//!
//! One task owns the schedule (a heap of due times, each check starting at a
//! random point of its first interval); probes run as tasks bounded by a
//! semaphore. A result changes the check's status only after the configured
//! number of consecutive results (`SuccessBeforePassing`, `FailuresBeforeWarning`,
//! `FailuresBeforeCritical`), and only a change of status is written to the
//! catalog: steady checks cost no store writes.
//!
//! A crate of its own on the registry's public handle (`Registry`): it reads
//! snapshots and the check-change feed and writes through `Registry::apply`,
//! like any other client of the registry.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod tls;

use switchyard_catalog::{Check, CheckKind, Name, Status};
use switchyard_registry::{Command, Registry};

/// Probes running at once, whatever the number of checks.
const MAX_CONCURRENT_PROBES: usize = 256;
/// Default probe timeout (Consul's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest interval honoured, so a typo cannot turn a check into a flood.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest body excerpt kept as the check's output.
const OUTPUT_BYTES: usize = 1024;

/// Whether this agent runs this check.
fn is_probed(check: &Check) -> bool {
    check.kind.is_probed_here() && check.definition.interval.is_some()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;
type GrpcClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// What probes use: pooled clients for HTTP/1.1 and gRPC over h2c, and a
/// TLS dialer for HTTPS and gRPC over TLS (a connection per probe).
#[derive(Clone)]
struct Clients {
    http: HttpClient,
    grpc: GrpcClient,
    tls: Option<Arc<tls::TlsDialer>>,
}

struct Active {
    check: Arc<Check>,
    generation: u64,
    successes: u32,
    failures: u32,
    /// A probe of this check is in flight (no second one is started).
    running: bool,
}

struct Probed {
    key: (Name, Name),
    generation: u64,
    status: Status,
    output: String,
}

/// Starts the checker for every probed check in the catalog, now and later.
pub fn spawn_checker(registry: Registry) -> JoinHandle<()> {
    let events = registry.check_changes();
    tokio::spawn(run(registry, events))
}

async fn run(registry: Registry, mut events: mpsc::UnboundedReceiver<Vec<(Name, Name)>>) {
    let client = Clients {
        http: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build_http(),
        grpc: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .build_http(),
        tls: match tls::TlsDialer::new() {
            Ok(dialer) => Some(Arc::new(dialer)),
            Err(e) => {
                tracing::error!(error = %e, "no TLS for health checks: HTTPS and gRPC-over-TLS checks will fail");
                None
            }
        },
    };
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES));
    let (results_tx, mut results) = mpsc::channel::<Probed>(1024);
    let mut active: HashMap<(Name, Name), Active> = HashMap::new();
    let mut due: BinaryHeap<Reverse<(Instant, Name, Name, u64)>> = BinaryHeap::new();
    let mut generation = 0u64;

    let initial: Vec<(Name, Name)> = registry
        .snapshot()
        .checks()
        .map(|c| (c.node.clone(), c.id.clone()))
        .collect();
    let mut pending = Some(initial);
    loop {
        if let Some(keys) = pending.take() {
            let snap = registry.snapshot();
            for key in keys {
                let current = snap
                    .node(&key.0)
                    .and_then(|n| n.checks.get(&key.1).cloned())
                    .filter(|c| is_probed(c));
                match current {
                    Some(check) => {
                        let same = active
                            .get(&key)
                            .is_some_and(|a| a.check.definition == check.definition);
                        if same {
                            if let Some(a) = active.get_mut(&key) {
                                a.check = check;
                            }
                            continue;
                        }
                        generation += 1;
                        let interval = interval_of(&check);
                        let jitter =
                            Duration::from_millis(fastrand::u64(0..=interval.as_millis() as u64));
                        due.push(Reverse((
                            Instant::now() + jitter,
                            key.0.clone(),
                            key.1.clone(),
                            generation,
                        )));
                        active.insert(
                            key,
                            Active {
                                check,
                                generation,
                                successes: 0,
                                failures: 0,
                                running: false,
                            },
                        );
                    }
                    None => {
                        active.remove(&key);
                    }
                }
            }
        }
        let next = due.peek().map(|Reverse((at, ..))| *at);
        tokio::select! {
            event = events.recv() => match event {
                Some(keys) => pending = Some(keys),
                None => return,
            },
            Some(result) = results.recv() => {
                handle_result(&registry, &mut active, &mut due, result);
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((at, ..))) = due.peek() {
                    if *at > now {
                        break;
                    }
                    let Some(Reverse((_, node, id, gen))) = due.pop() else { break };
                    let key = (node, id);
                    let Some(entry) = active.get_mut(&key) else { continue };
                    if entry.generation != gen || entry.running {
                        continue;
                    }
                    if !registry.store_status().owns(&key.0, &key.1) {
                        // Another live agent runs this check; look again next
                        // interval, in case its owner has gone.
                        entry.successes = 0;
                        entry.failures = 0;
                        let next = now + interval_of(&entry.check);
                        due.push(Reverse((next, key.0, key.1, gen)));
                        continue;
                    }
                    registry.metrics().probes.inc();
                    entry.running = true;
                    let check = entry.check.clone();
                    let (client, permits, tx) = (client.clone(), permits.clone(), results_tx.clone());
                    tokio::spawn(async move {
                        let Ok(_permit) = permits.acquire_owned().await else { return };
                        let (status, output) = probe(&client, &check).await;
                        let _ = tx.send(Probed { key, generation: gen, status, output }).await;
                    });
                }
            }
        }
    }
}

fn interval_of(check: &Check) -> Duration {
    check
        .definition
        .interval
        .unwrap_or(Duration::from_secs(10))
        .max(MIN_INTERVAL)
}

fn handle_result(
    registry: &Registry,
    active: &mut HashMap<(Name, Name), Active>,
    due: &mut BinaryHeap<Reverse<(Instant, Name, Name, u64)>>,
    result: Probed,
) {
    let Some(entry) = active.get_mut(&result.key) else {
        return;
    };
    if entry.generation != result.generation {
        return;
    }
    entry.running = false;
    let def = &entry.check.definition;
    let next = match result.status {
        Status::Passing => {
            entry.successes += 1;
            entry.failures = 0;
            (entry.successes >= def.success_before_passing.max(1)).then_some(Status::Passing)
        }
        failed => {
            entry.failures += 1;
            entry.successes = 0;
            if entry.failures >= def.failures_before_critical.max(1) {
                Some(failed)
            } else if def.failures_before_warning > 0
                && entry.failures >= def.failures_before_warning
            {
                Some(Status::Warning)
            } else {
                None
            }
        }
    };
    due.push(Reverse((
        Instant::now() + interval_of(&entry.check),
        result.key.0.clone(),
        result.key.1.clone(),
        entry.generation,
    )));
    let Some(status) = next else { return };
    if status == entry.check.status {
        return;
    }
    let command = Command::UpdateCheck {
        node: result.key.0.clone(),
        id: result.key.1.clone(),
        status,
        output: Some(result.output),
        require_ttl: false,
    };
    // Written off the scheduling loop (group commit folds simultaneous
    // changes); the applied change comes back as an event refreshing `entry.check`.
    let registry = registry.clone();
    let check = result.key.1.clone();
    tokio::spawn(async move {
        if let Err(e) = registry.apply(command).await {
            tracing::debug!(error = %e, %check, "health check result not recorded");
        }
    });
}

/// Runs one probe: `(status, output)`.
async fn probe(client: &Clients, check: &Check) -> (Status, String) {
    let def = &check.definition;
    let timeout = def.timeout.unwrap_or(DEFAULT_TIMEOUT);
    match check.kind {
        CheckKind::Tcp => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(def.tcp.as_str()))
                .await
            {
                Ok(Ok(_)) => (Status::Passing, format!("TCP connect {}: Success", def.tcp)),
                Ok(Err(e)) => (Status::Critical, format!("dial tcp {}: {e}", def.tcp)),
                Err(_) => (
                    Status::Critical,
                    format!("dial tcp {}: i/o timeout after {timeout:?}", def.tcp),
                ),
            }
        }
        CheckKind::Grpc => match tokio::time::timeout(timeout, grpc_probe(client, check)).await {
            Ok(result) => result,
            Err(_) => (
                Status::Critical,
                format!("gRPC {}: timeout after {timeout:?}", def.grpc),
            ),
        },
        CheckKind::Http => match tokio::time::timeout(timeout, http_probe(client, check)).await {
            Ok(result) => result,
            Err(_) => (
                Status::Critical,
                format!("Get {:?}: timeout after {timeout:?}", def.http),
            ),
        },
        other => (
            Status::Critical,
            format!("{other} checks are not run by this agent"),
        ),
    }
}

async fn http_probe(client: &Clients, check: &Check) -> (Status, String) {
    let def = &check.definition;
    let url = def.http.as_str();
    let method = if def.method.is_empty() {
        "GET"
    } else {
        def.method.as_str()
    };
    let secure = url.starts_with("https://");
    if !secure && !url.starts_with("http://") {
        return (
            Status::Critical,
            format!("{url}: the check URL must start with http:// or https://"),
        );
    }
    let uri: hyper::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => return (Status::Critical, format!("invalid check URL {url}: {e}")),
    };
    // Over TLS the request goes on its own connection, in origin form.
    let target = if secure {
        uri.path_and_query().map_or("/", |p| p.as_str()).to_string()
    } else {
        url.to_string()
    };
    let mut request = hyper::Request::builder().method(method).uri(target);
    if let Some(authority) = uri.authority() {
        request = request.header("host", authority.as_str());
    }
    for (name, values) in &def.header {
        for value in values {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    request = request.header("user-agent", "Switchyard Health Check");
    let request = match request.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => {
            return (
                Status::Critical,
                format!("invalid check request {url}: {e}"),
            )
        }
    };
    let response = if secure {
        https_request(client, check, &uri, request).await
    } else {
        client
            .http
            .request(request)
            .await
            .map_err(|e| e.to_string())
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return (Status::Critical, format!("{method} {url}: {e}")),
    };
    let code = response.status();
    let body = Limited::new(response.into_body(), OUTPUT_BYTES * 4)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(OUTPUT_BYTES)]).into_owned();
    let status = match (def.expected_status, code.as_u16()) {
        (Some((low, high)), code) if (low..=high).contains(&code) => Status::Passing,
        (Some(_), _) => Status::Critical,
        (None, 200..=299) => Status::Passing,
        (None, 429) => Status::Warning,
        (None, _) => Status::Critical,
    };
    (
        status,
        format!("HTTP {method} {url}: {code} Output: {excerpt}"),
    )
}

/// The TLS dialer, or why there is none.
fn dialer(client: &Clients) -> Result<&tls::TlsDialer, String> {
    client
        .tls
        .as_deref()
        .ok_or_else(|| "TLS is unavailable in this agent".to_string())
}

/// The host, port and TLS server name of a target.
fn tls_target<'a>(check: &'a Check, host: &'a str, port: u16) -> (&'a str, u16, &'a str) {
    let name = if check.definition.tls_server_name.is_empty() {
        host
    } else {
        check.definition.tls_server_name.as_str()
    };
    (host, port, name)
}

/// One HTTPS request on a fresh TLS connection.
async fn https_request(
    client: &Clients,
    check: &Check,
    uri: &hyper::Uri,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (host, port, name) = tls_target(check, host, uri.port_u16().unwrap_or(443));
    let stream = dialer(client)?
        .connect(host, port, name, check.definition.tls_skip_verify, false)
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// `grpc.health.v1.Health/Check` over h2c. `GRPC` is `host:port` or
/// `host:port/service`; SERVING (1) is passing, anything else critical.
async fn grpc_probe(client: &Clients, check: &Check) -> (Status, String) {
    let target = check.definition.grpc.as_str();
    let (authority, service) = target.split_once('/').unwrap_or((target, ""));
    let tls = check.definition.grpc_use_tls;
    // HealthCheckRequest { string service = 1; } in one length-prefixed frame.
    let mut message = Vec::with_capacity(service.len() + 2);
    if !service.is_empty() {
        message.push(0x0A);
        push_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!(
            "{}://{authority}/grpc.health.v1.Health/Check",
            if tls { "https" } else { "http" }
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "Switchyard Health Check")
        .body(Full::new(Bytes::from(frame)));
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            return (
                Status::Critical,
                format!("gRPC {target}: invalid request: {e}"),
            )
        }
    };
    let response = if tls {
        grpc_tls_request(client, check, authority, request).await
    } else {
        client
            .grpc
            .request(request)
            .await
            .map_err(|e| e.to_string())
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return (Status::Critical, format!("gRPC {target}: {e}")),
    };
    let header_status = grpc_status(response.headers());
    let collected = match Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(c) => c,
        Err(e) => return (Status::Critical, format!("gRPC {target}: {e}")),
    };
    let trailer_status = collected.trailers().and_then(grpc_status);
    if let Some((code, text)) = header_status
        .or(trailer_status)
        .filter(|(code, _)| code != "0")
    {
        return (
            Status::Critical,
            format!("gRPC {target}: status {code} {text}"),
        );
    }
    let body = collected.to_bytes();
    match body.get(5..).and_then(serving_status) {
        Some(1) => (Status::Passing, format!("gRPC {target}: SERVING")),
        Some(other) => (
            Status::Critical,
            format!("gRPC {target}: status {other} (not SERVING)"),
        ),
        None => (
            Status::Critical,
            format!("gRPC {target}: no health status in the answer"),
        ),
    }
}

/// One gRPC request over TLS (ALPN h2) on a fresh connection.
async fn grpc_tls_request(
    client: &Clients,
    check: &Check,
    authority: &str,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let parsed: hyper::http::uri::Authority = authority
        .parse()
        .map_err(|e| format!("invalid target {authority:?}: {e}"))?;
    let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
    let (host, port, name) = tls_target(check, host, parsed.port_u16().unwrap_or(443));
    let stream = dialer(client)?
        .connect(host, port, name, check.definition.tls_skip_verify, true)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

fn grpc_status(headers: &hyper::HeaderMap) -> Option<(String, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.to_string();
    let text = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, text))
}

/// `HealthCheckResponse.status` (field 1, varint) from a protobuf message.
fn serving_status(mut message: &[u8]) -> Option<u64> {
    let mut status = 0;
    while !message.is_empty() {
        let (key, rest) = read_varint(message)?;
        message = rest;
        match (key >> 3, key & 7) {
            (field, 0) => {
                let (value, rest) = read_varint(message)?;
                message = rest;
                if field == 1 {
                    status = value;
                }
            }
            (_, 2) => {
                let (len, rest) = read_varint(message)?;
                message = rest.get(usize::try_from(len).ok()?..)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_responses_decode() {
        assert_eq!(serving_status(&[0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0x08, 0x02]), Some(2));
        assert_eq!(serving_status(&[]), Some(0), "UNKNOWN is the default");
        assert_eq!(
            serving_status(&[0x12, 0x01, 0x41, 0x08, 0x01]),
            Some(1),
            "unknown fields skipped"
        );
        assert_eq!(serving_status(&[0x08]), None);
        assert_eq!(serving_status(&[0x12, 0x05, 0x41]), None);
        let mut v = Vec::new();
        push_varint(&mut v, 300);
        assert_eq!(read_varint(&v), Some((300, &[][..])));
    }
}
