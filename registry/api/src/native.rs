//! The native API under `/v1/switchyard/`: what Consul lacks (batch writes,
//! drain state, a status summary with reasons) and `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::Encoder;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::decode::{decode_body, node_from, validate_name, BatchIn, GoDuration};
use super::limits::shown;
use super::{json, write_ok, ApiError, ApiResult, ApiState, Pairs, QueryOpts};
use switchyard_catalog::model::unix_ms;
use switchyard_catalog::model::CheckKind;
use switchyard_catalog::model::{
    Check, CheckDefinition, Drain, Endpoint, Status, NODE_HEALTH_CHECK,
};
use switchyard_catalog::snapshot::{EndpointState, Instance, NodeEntry, Snapshot, StateCounts};
use switchyard_registry::WatchKey;
use switchyard_registry::{Batch, Command, NewCheck};

type St = State<Arc<ApiState>>;

fn counts_json(counts: &StateCounts) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for state in EndpointState::ALL {
        map.insert(state.as_str().to_string(), counts.get(state).into());
    }
    serde_json::Value::Object(map)
}

pub(super) async fn status(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    let counts = snap.counts();
    let body = json!({
        "version": state.agent.version,
        "node": state.agent.node_name,
        "datacenter": state.agent.datacenter,
        "index": snap.index(),
        "store": state.registry.store_kind(),
        "store_state": store_state(&state.registry),
        "nodes": snap.node_count(),
        "services": snap.service_count(),
        "endpoints": counts.total(),
        "endpoints_by_state": counts_json(&counts),
        "snapshot_age_ms": u64::try_from(state.registry.metrics().snapshot_age().as_millis()).unwrap_or(u64::MAX),
        "blocking_queries": state.registry.metrics().blocking_queries.get(),
        "listeners": state.listeners.get(),
        "tokens": !state.tokens.is_empty(),
        "xds": state.xds.as_ref().map(|xds| xds()),
    });
    json(&body, snap.index(), &QueryOpts::default())
}

/// The xDS server's streams: each client's node, user agent, locality,
/// subscriptions, pushes, ACKs and NACKs (404 when xDS is off).
pub(super) async fn xds(State(state): St) -> ApiResult {
    let Some(xds) = &state.xds else {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "xDS is off on this agent: set [xds] addr or --xds-addr",
        ));
    };
    json(
        &xds(),
        state.registry.snapshot().index(),
        &QueryOpts::default(),
    )
}

/// What another datacenter's agent watches here at once (its copies):
/// each name with the index the watcher holds (0: never fetched).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatchIn {
    services: std::collections::BTreeMap<String, u64>,
    nodes: std::collections::BTreeMap<String, u64>,
}

/// Many services and nodes watched in one blocking query (another
/// datacenter's copies of them, one connection for all): answers as soon as
/// any of them is at an index other than the one the caller holds, with
/// each that is (a service's routable endpoints, a node's record, or null
/// when it is gone), or with nothing when `wait` is over.
pub(super) async fn watch(State(state): St, Query(q): Query<Pairs>, body: Bytes) -> ApiResult {
    // The keys are names, as they are: not folded like field names.
    let input: WatchIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "a watch is {{\"services\": {{NAME: INDEX}}, \"nodes\": {{NAME: INDEX}}}}: {e}"
        ))
    })?;
    let keys = input.services.len() + input.nodes.len();
    if keys > state.config.max_batch_endpoints {
        return Err(ApiError::bad_request(format!(
            "watch of {keys} names; the limit is {} (api.max_batch_endpoints)",
            state.config.max_batch_endpoints
        )));
    }
    let opts = QueryOpts::parse(&q)?;
    let wait = opts
        .wait
        .unwrap_or(std::time::Duration::from_secs(300))
        .min(state.config.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let metrics = state.registry.metrics();
    metrics.blocking_queries.inc();
    let _guard = super::BlockingGuard(&metrics.blocking_queries);
    let mut changes = state.registry.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        changes.borrow_and_update();
        let snap = state.registry.snapshot();
        let mut services = serde_json::Map::new();
        for (name, held) in &input.services {
            // DNS names are in lower case: the service is found in any.
            let view = snap.service(name).or_else(|| snap.service_ci(name));
            let index = snap.service_index(view.map_or(name.as_str(), |v| &*v.name));
            if *held != 0 && *held == index {
                continue;
            }
            let endpoints: Vec<_> = view
                .map(|view| view.routable().map(instance_json).collect())
                .unwrap_or_default();
            services.insert(
                name.clone(),
                json!({ "index": index, "endpoints": endpoints }),
            );
        }
        let mut nodes = serde_json::Map::new();
        for (name, held) in &input.nodes {
            let entry = snap.node(name).or_else(|| snap.node_ci(name));
            let index = entry.map_or(1, |n| n.index).max(1);
            if *held != 0 && *held == index {
                continue;
            }
            let node = entry.map(|n| {
                json!({ "name": &*n.node.name, "address": n.node.address, "meta": n.node.meta })
            });
            nodes.insert(name.clone(), json!({ "index": index, "node": node }));
        }
        let over = tokio::time::Instant::now() >= deadline || *shutdown.borrow();
        if !services.is_empty() || !nodes.is_empty() || over {
            let body = json!({ "services": services, "nodes": nodes });
            return json(&body, snap.index(), &opts);
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// The datacenters this agent knows: its own first, then the others by
/// measured round trip, with whether they answer and their addresses.
pub(super) async fn datacenters(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    let body = match &state.federation {
        Some(federation) => serde_json::to_value(federation.datacenters())
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => json!([{ "name": state.agent.datacenter, "local": true, "reachable": true,
            "rtt_ms": 0.0, "last_contact_ms": 0, "api": [], "proxy": [] }]),
    };
    json(&body, snap.index(), &QueryOpts::default())
}

/// How current this agent's catalog is: a shared store may be out of reach,
/// and then DNS and the proxy answer from the last state seen.
fn store_state(registry: &switchyard_registry::Registry) -> serde_json::Value {
    let status = registry.store_status();
    json!({
        "shared": registry.shared(),
        "connected": status.connected(),
        "revision": status.revision(),
        "staleness_ms": u64::try_from(status.staleness().as_millis()).unwrap_or(u64::MAX),
        "agents": *status.members(),
        // Cluster mode's local copy (what the agent would start from
        // while etcd is down): its index and age.
        "local_copy": status.local_copy().map(|(index, written_ms)| json!({
            "index": index,
            "age_ms": switchyard_registry::unix_ms().saturating_sub(written_ms),
        })),
    })
}

pub(super) async fn batch(State(state): St, body: Bytes) -> ApiResult {
    let input: BatchIn = decode_body(&body).map_err(ApiError::bad_request)?;
    let total = input.endpoints.len() + input.deregister.len();
    if total > state.config.max_batch_endpoints {
        return Err(ApiError::bad_request(format!(
            "batch has {total} endpoints; the limit is {} (api.max_batch_endpoints)",
            state.config.max_batch_endpoints
        )));
    }
    let mut batch = Batch::default();
    for node in input.nodes {
        let ttl = node.ttl.map(|t| t.0).filter(|t| !t.is_zero());
        let node = node_from(
            &node.name,
            &node.address,
            node.id,
            node.tagged_addresses,
            node.meta,
        )
        .map_err(|e| ApiError::bad_request(format!("node {}: {e}", node.name)))?;
        if let Some(ttl) = ttl {
            // Registering the node renews its lease: it is alive now.
            batch.node_checks.push(NewCheck {
                check: Check {
                    node: node.name.clone(),
                    id: NODE_HEALTH_CHECK.into(),
                    name: "Serf Health Status".to_string(),
                    status: Status::Passing,
                    notes: "node lease: renew with /v1/switchyard/heartbeat".to_string(),
                    output: String::new(),
                    service_id: String::new(),
                    service_name: String::new(),
                    kind: CheckKind::Ttl,
                    definition: CheckDefinition {
                        ttl: Some(ttl),
                        ..CheckDefinition::default()
                    },
                    status_since_ms: 0,
                    create_index: 0,
                    modify_index: 0,
                },
                status_given: true,
            });
        }
        batch.nodes.push(node);
    }
    for (i, endpoint) in input.endpoints.into_iter().enumerate() {
        let parts = endpoint
            .into_parts()
            .map_err(|e| ApiError::bad_request(format!("endpoints[{i}]: {e}")))?;
        batch.endpoints.push(parts);
    }
    for key in input.deregister {
        validate_name("node name", &key.node).map_err(ApiError::bad_request)?;
        batch
            .deregister_endpoints
            .push((key.node.into(), key.id.into()));
    }
    for node in input.deregister_nodes {
        batch.deregister_nodes.push(node.into());
    }
    let index = state.write(Command::Batch(batch)).await?;
    let mut response = json(&json!({ "index": index }), index, &QueryOpts::default())?;
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatIn {
    checks: Vec<BeatIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BeatIn {
    node: String,
    id: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    output: Option<String>,
}

/// Renews many TTL checks in one write. Unknown and non-TTL checks are
/// skipped and listed in the answer, so the scheduler can re-register them.
pub(super) async fn heartbeat(State(state): St, body: Bytes) -> ApiResult {
    let input: HeartbeatIn = decode_body(&body).map_err(ApiError::bad_request)?;
    if input.checks.len() > state.config.max_batch_endpoints {
        return Err(ApiError::bad_request(format!(
            "heartbeat has {} checks; the limit is {} (api.max_batch_endpoints)",
            input.checks.len(),
            state.config.max_batch_endpoints
        )));
    }
    let snap = state.registry.snapshot();
    let mut beats = Vec::with_capacity(input.checks.len());
    let (mut unknown, mut not_ttl) = (Vec::new(), Vec::new());
    for beat in input.checks {
        let status = match beat.status.as_deref() {
            None | Some("") => Status::Passing,
            Some(s) => Status::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!("Invalid check status: '{}'", shown(s)))
            })?,
        };
        match snap
            .node(&beat.node)
            .and_then(|n| n.checks.get(beat.id.as_str()))
        {
            // Listed back as the client sent them, but never more than a
            // bounded quote of each.
            None => unknown.push(json!({ "node": shown(&beat.node), "id": shown(&beat.id) })),
            Some(check) if check.kind != CheckKind::Ttl => {
                not_ttl.push(json!({ "node": shown(&beat.node), "id": shown(&beat.id) }))
            }
            Some(_) => beats.push((beat.node.into(), beat.id.into(), status, beat.output)),
        }
    }
    let renewed = beats.len();
    let index = state.write(Command::Heartbeat(beats)).await?;
    let out = json!({ "index": index, "renewed": renewed, "unknown": unknown, "not_ttl": not_ttl });
    json(&out, index, &QueryOpts::default())
}

#[derive(Serialize)]
struct ServiceSummary<'a> {
    name: &'a str,
    index: u64,
    tags: Vec<&'a str>,
    endpoints: u64,
    routable: usize,
    by_state: serde_json::Value,
}

pub(super) async fn services(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = super::block(&state, &opts, None, |s| {
        s.tables().services.max(s.tables().checks)
    })
    .await?;
    let out: Vec<ServiceSummary<'_>> = snap
        .services_sorted()
        .into_iter()
        .map(|v| ServiceSummary {
            name: &v.name,
            index: v.index,
            tags: v.tags().collect(),
            endpoints: v.counts.total(),
            routable: v.routable_len(),
            by_state: counts_json(&v.counts),
        })
        .collect();
    json(&out, index, &opts)
}

fn instance_json(i: &Instance) -> serde_json::Value {
    let checks: Vec<_> = i
        .checks
        .iter()
        .map(|c| {
            json!({
                "id": &*c.id,
                "name": c.name,
                "status": c.status.as_str(),
                "type": c.kind.as_str(),
                "output": c.output,
                "notes": c.notes,
                "status_since_ms": c.status_since_ms,
                "node_level": c.is_node_level(),
                "modify_index": c.modify_index,
            })
        })
        .collect();
    json!({
        "id": &*i.endpoint.id,
        "node": &*i.node.name,
        "node_address": i.node.address,
        "node_meta": i.node.meta,
        "address": i.address(),
        "port": i.endpoint.port,
        "tags": i.endpoint.tags,
        "meta": i.endpoint.meta,
        "weight": i.endpoint.weights.passing,
        "state": i.state.as_str(),
        "health": i.health.as_str(),
        "routable": i.is_routable(),
        "excluded_because": i.excluded_because(),
        "checks": checks,
        "incarnation": i.endpoint.incarnation,
        "modify_index": i.endpoint.modify_index,
    })
}

pub(super) async fn service(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = super::block(&state, &opts, Some(WatchKey::Service(&name)), |s| {
        s.service_index(&name)
    })
    .await?;
    let Some(view) = snap.service(&name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service {name:?}"),
        ));
    };
    // The proxy's side of the story (passive signals): fail-open, ejections,
    // failure streaks and in-flight counts, for services it carries traffic to.
    let proxy = state
        .load
        .as_ref()
        .and_then(|l| l.service_load(&view.name).map(|s| (l, s)));
    let endpoints: Vec<_> = view
        .instances()
        .map(|i| {
            let mut out = instance_json(i);
            if let (Some((load, _)), Some(map)) = (&proxy, out.as_object_mut()) {
                let e = load.endpoint_load(&view.name, &i.node.name, &i.endpoint.id);
                map.insert(
                    "proxy".into(),
                    json!({
                        "in_flight": e.in_flight,
                        "ejected": e.ejected,
                        "failures": e.failures,
                        "requests": e.requests,
                        "latency_us": e.latency_us,
                    }),
                );
            }
            out
        })
        .collect();
    let mut out = json!({
        "name": &*view.name,
        "index": view.index,
        "tags": view.tags().collect::<Vec<_>>(),
        "routable": view.routable_len(),
        "by_state": counts_json(&view.counts),
        "endpoints": endpoints,
    });
    if let (Some((_, service)), Some(map)) = (proxy, out.as_object_mut()) {
        map.insert("proxy".into(), json!({"fail_open": service.fail_open}));
    }
    json(&out, index, &opts)
}

/// A node as `/v1/switchyard/nodes` lists it. Its `state` is the drain
/// status's own (`active`, `draining` or `drained`, with the proxy's live
/// counts), so the list and `/nodes/NAME/drain` never disagree.
fn node_json(state: &ApiState, entry: &NodeEntry) -> serde_json::Value {
    let node = &entry.node;
    let progress = drain_progress(
        state,
        node.drain.as_ref(),
        entry.endpoints.values().map(|e| &**e),
    );
    json!({
        "name": &*node.name,
        "id": node.id,
        "address": node.address,
        "meta": node.meta,
        "state": progress.phase,
        "drain_since_ms": node.drain.as_ref().map(|d| d.since_ms),
        "drain_deadline_ms": node.drain.as_ref().and_then(|d| d.deadline_ms),
        "endpoints": entry.endpoints.len(),
        "index": entry.index,
    })
}

pub(super) async fn nodes(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = super::block(&state, &opts, None, |s| s.tables().nodes).await?;
    let out: Vec<_> = snap
        .nodes_sorted()
        .into_iter()
        .map(|e| node_json(&state, e))
        .collect();
    json(&out, index, &opts)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DrainIn {
    deadline: Option<GoDuration>,
}

/// Unix milliseconds as RFC 3339 (UTC, millisecond precision).
fn rfc3339(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Where a drain stands: live traffic on its endpoints from the proxy, and
/// whether it is over.
pub(super) struct DrainProgress<'a> {
    /// "active" (no drain), "draining" or "drained".
    pub phase: &'static str,
    pub in_flight: u64,
    pub cut: u64,
    pub deadline_passed: bool,
    pub endpoints: Vec<(&'a Endpoint, switchyard_catalog::EndpointLoad)>,
}

pub(super) fn drain_progress<'a>(
    state: &ApiState,
    drain: Option<&Drain>,
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> DrainProgress<'a> {
    let mut list = Vec::new();
    let (mut in_flight, mut cut) = (0u64, 0u64);
    for e in endpoints {
        let load = state
            .load
            .as_ref()
            .map(|l| l.endpoint_load(&e.service, &e.node, &e.id))
            .unwrap_or_default();
        in_flight += load.in_flight;
        cut += load.cut;
        list.push((e, load));
    }
    let deadline_passed = drain
        .and_then(|d| d.deadline_ms)
        .is_some_and(|deadline| unix_ms() >= deadline);
    // In cluster mode the other agents' counts must be newer than the drain.
    let complete = drain.is_none_or(|d| {
        state
            .load
            .as_ref()
            .is_none_or(|l| l.complete_after(d.since_ms))
    });
    let drained = drain.is_some() && ((in_flight == 0 && complete) || deadline_passed);
    DrainProgress {
        phase: match drain {
            None => "active",
            Some(_) if drained => "drained",
            Some(_) => "draining",
        },
        in_flight,
        cut,
        deadline_passed,
        endpoints: list,
    }
}

/// The drain status of a set of endpoints under one drain (a node's or an
/// endpoint's), as the API reports it.
fn drain_report<'a>(
    state: &ApiState,
    drain: Option<&Drain>,
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> serde_json::Map<String, serde_json::Value> {
    let progress = drain_progress(state, drain, endpoints);
    let list: Vec<_> = progress
        .endpoints
        .iter()
        .map(|(e, load)| {
            json!({
                "id": &*e.id,
                "service": &*e.service,
                "in_flight": load.in_flight,
                "cut": load.cut,
            })
        })
        .collect();
    let mut out = serde_json::Map::new();
    out.insert("state".into(), progress.phase.into());
    out.insert("since".into(), drain.map(|d| rfc3339(d.since_ms)).into());
    out.insert(
        "deadline".into(),
        drain.and_then(|d| d.deadline_ms).map(rfc3339).into(),
    );
    out.insert("since_ms".into(), drain.map(|d| d.since_ms).into());
    out.insert(
        "deadline_ms".into(),
        drain.and_then(|d| d.deadline_ms).into(),
    );
    out.insert("deadline_passed".into(), progress.deadline_passed.into());
    out.insert("endpoints".into(), list.into());
    out.insert("in_flight".into(), progress.in_flight.into());
    out.insert("cut".into(), progress.cut.into());
    out.insert("drained".into(), (progress.phase == "drained").into());
    out
}

fn node_drain_json(
    state: &ApiState,
    snap: &Snapshot,
    name: &str,
) -> Result<serde_json::Value, ApiError> {
    let entry = snap
        .node(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Unknown node \"{name}\"")))?;
    let mut out = drain_report(
        state,
        entry.node.drain.as_ref(),
        entry.endpoints.values().map(|e| &**e),
    );
    out.insert("node".into(), (*entry.node.name).into());
    Ok(serde_json::Value::Object(out))
}

fn deadline_from(body: &Bytes) -> Result<Option<u64>, ApiError> {
    let input: DrainIn = if body.iter().all(u8::is_ascii_whitespace) {
        DrainIn::default()
    } else {
        decode_body(body).map_err(ApiError::bad_request)?
    };
    Ok(input
        .deadline
        .map(|d| unix_ms().saturating_add(u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX))))
}

pub(super) async fn drain(State(state): St, Path(node): Path<String>, body: Bytes) -> ApiResult {
    let deadline_ms = deadline_from(&body)?;
    tracing::info!(%node, ?deadline_ms, "node drain requested");
    let index = state
        .registry
        .apply(Command::Drain {
            node: node.as_str().into(),
            deadline_ms,
        })
        .await?;
    let snap = state.registry.snapshot();
    json(
        &node_drain_json(&state, &snap, &node)?,
        index,
        &QueryOpts::default(),
    )
}

pub(super) async fn undrain(State(state): St, Path(node): Path<String>) -> ApiResult {
    tracing::info!(%node, "node undrain requested");
    let index = state
        .registry
        .apply(Command::Undrain {
            node: node.as_str().into(),
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn drain_status(State(state): St, Path(node): Path<String>) -> ApiResult {
    let snap = state.registry.snapshot();
    json(
        &node_drain_json(&state, &snap, &node)?,
        snap.index(),
        &QueryOpts::default(),
    )
}

/// The node of endpoint `id`: `?node=` when given, else the one node that
/// has an endpoint with that id (ids are unique per node only).
fn endpoint_node(snap: &Snapshot, id: &str, q: &Pairs) -> Result<String, ApiError> {
    if let Some((_, node)) = q.iter().find(|(k, _)| k == "node") {
        return Ok(node.clone());
    }
    let mut nodes = snap
        .nodes()
        .filter(|e| e.endpoints.contains_key(id))
        .map(|e| e.node.name.to_string());
    match (nodes.next(), nodes.next()) {
        (Some(node), None) => Ok(node),
        (None, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Unknown service ID \"{id}\""),
        )),
        (Some(a), Some(b)) => Err(ApiError::bad_request(format!(
            "endpoint id \"{id}\" exists on several nodes ({a}, {b}, ...); name one with ?node="
        ))),
    }
}

fn endpoint_drain_json(
    state: &ApiState,
    snap: &Snapshot,
    node: &str,
    id: &str,
) -> Result<serde_json::Value, ApiError> {
    let endpoint = snap
        .node(node)
        .and_then(|e| e.endpoints.get(id))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("Unknown service ID \"{id}\" on node \"{node}\""),
            )
        })?;
    let mut out = drain_report(state, endpoint.drain.as_ref(), std::iter::once(&**endpoint));
    out.insert("node".into(), node.into());
    out.insert("endpoint".into(), id.into());
    Ok(serde_json::Value::Object(out))
}

pub(super) async fn endpoint_drain(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
    body: Bytes,
) -> ApiResult {
    let deadline_ms = deadline_from(&body)?;
    let node = endpoint_node(&state.registry.snapshot(), &id, &q)?;
    let index = state
        .registry
        .apply(Command::DrainEndpoint {
            node: node.as_str().into(),
            id: id.as_str().into(),
            deadline_ms,
        })
        .await?;
    let snap = state.registry.snapshot();
    json(
        &endpoint_drain_json(&state, &snap, &node, &id)?,
        index,
        &QueryOpts::default(),
    )
}

pub(super) async fn endpoint_undrain(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let node = endpoint_node(&state.registry.snapshot(), &id, &q)?;
    let index = state
        .registry
        .apply(Command::UndrainEndpoint {
            node: node.as_str().into(),
            id: id.as_str().into(),
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn endpoint_drain_status(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let snap = state.registry.snapshot();
    let node = endpoint_node(&snap, &id, &q)?;
    json(
        &endpoint_drain_json(&state, &snap, &node, &id)?,
        snap.index(),
        &QueryOpts::default(),
    )
}

/// Node maintenance on any node (Consul's `/v1/agent/maintenance` covers
/// only the agent's own): `?enable=true|false&reason=`.
pub(super) async fn node_maintenance(
    State(state): St,
    Path(node): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let (enable, reason) = super::consul::maintenance_args(&q)?;
    let index = state
        .registry
        .apply(Command::NodeMaintenance {
            node: node.as_str().into(),
            enable,
            reason,
        })
        .await?;
    Ok(write_ok(index, None))
}

/// Maintenance for one endpoint on any node: `?enable=&reason=&node=`.
pub(super) async fn endpoint_maintenance(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let (enable, reason) = super::consul::maintenance_args(&q)?;
    let node = endpoint_node(&state.registry.snapshot(), &id, &q)?;
    let index = state
        .registry
        .apply(Command::ServiceMaintenance {
            node: node.as_str().into(),
            id: id.as_str().into(),
            enable,
            reason,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn metrics(State(state): St) -> Response {
    let store = state.registry.store_status();
    let metrics = state.registry.metrics();
    metrics.store_connected.set(i64::from(store.connected()));
    metrics.store_staleness.set(store.staleness().as_secs_f64());
    metrics.before_scrape(&state.registry.snapshot());
    let families = state.prometheus.gather();
    let mut body = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut body) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
