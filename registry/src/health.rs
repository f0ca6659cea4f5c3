//! Active health checks: HTTP and TCP probes for the checks registered with an
//! `HTTP` or `TCP` definition.
//!
//! One task owns the schedule (a heap of due times, each check starting at a
//! random point of its first interval); probes run as tasks bounded by a
//! semaphore. A result changes the check's status only after the configured
//! number of consecutive results (`SuccessBeforePassing`, `FailuresBeforeWarning`,
//! `FailuresBeforeCritical`), and only a change of status is written to the
//! catalog: steady checks cost no store writes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::catalog::Command;
use crate::model::{Check, Name, Status};
use crate::writer::Registry;

/// Probes running at once, whatever the number of checks.
const MAX_CONCURRENT_PROBES: usize = 256;
/// Default probe timeout (Consul's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest interval honoured, so a typo cannot turn a check into a flood.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest body excerpt kept as the check's output.
const OUTPUT_BYTES: usize = 1024;

/// Whether this agent runs a check of this kind.
pub(crate) fn is_probed(check: &Check) -> bool {
    matches!(check.kind.as_str(), "http" | "tcp") && check.definition.interval.is_some()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

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
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build_http();
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
async fn probe(client: &HttpClient, check: &Check) -> (Status, String) {
    let def = &check.definition;
    let timeout = def.timeout.unwrap_or(DEFAULT_TIMEOUT);
    match check.kind.as_str() {
        "tcp" => {
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
        "http" => match tokio::time::timeout(timeout, http_probe(client, check)).await {
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

async fn http_probe(client: &HttpClient, check: &Check) -> (Status, String) {
    let def = &check.definition;
    let url = def.http.as_str();
    if !url.starts_with("http://") {
        return (
            Status::Critical,
            format!("{url}: only http:// checks are supported so far"),
        );
    }
    let method = if def.method.is_empty() {
        "GET"
    } else {
        def.method.as_str()
    };
    let mut request = hyper::Request::builder().method(method).uri(url);
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
    let response = match client.request(request).await {
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
    let status = match code.as_u16() {
        200..=299 => Status::Passing,
        429 => Status::Warning,
        _ => Status::Critical,
    };
    (
        status,
        format!("HTTP {method} {url}: {code} Output: {excerpt}"),
    )
}
