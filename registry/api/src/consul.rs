//! Consul-compatible endpoints (CONSUL.md sections 1-4).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::json;

use super::decode::{
    decode_body, node_from, CatalogDeregisterIn, CatalogRegisterIn, CheckContext, CheckIn,
    CheckUpdateIn, ServiceIn,
};
use super::render::{CatalogServiceOut, CheckOut, NodeOut, ServiceEntryOut, ServiceOut};
use super::{
    block, json, parse_bool, shared_json, write_ok, ApiError, ApiResult, ApiState, Pairs, QueryOpts,
};
use switchyard_catalog::model::{Name, Status, NODE_HEALTH_CHECK};
use switchyard_catalog::snapshot::{Instance, Snapshot};
use switchyard_registry::Command;
use switchyard_registry::WatchKey;

type St = State<Arc<ApiState>>;

fn agent_node(state: &ApiState) -> Name {
    state.agent.node_name.as_str().into()
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request(message)
}

fn query_value<'a>(pairs: &'a Pairs, key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

// ---- agent ----------------------------------------------------------------

pub(super) async fn agent_self(State(state): St) -> ApiResult {
    let a = &state.agent;
    let body = json!({
        "Config": {
            "Datacenter": a.datacenter,
            "NodeName": a.node_name,
            "NodeID": switchyard_catalog::model::node_uuid(&a.node_name),
            "Server": true,
            "Version": "1.20.0",
            "Revision": "switchyard",
            "SwitchyardVersion": a.version,
            // Patroni reads it after an `Invalid Session TTL`.
            "SessionTTLMin": switchyard_catalog::session::MIN_TTL.as_nanos() as u64,
        },
        "DebugConfig": {},
        "Coord": null,
        "Member": {
            "Name": a.node_name,
            "Addr": a.advertise_addr,
            "Port": 8301,
            "Tags": { "dc": a.datacenter, "role": "consul", "segment": "" },
            "Status": 1,
        },
        "Meta": {},
        "Stats": {},
        "xDS": null,
    });
    json(
        &body,
        state.registry.snapshot().index(),
        &QueryOpts::default(),
    )
}

pub(super) async fn agent_services(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse_filtered(&q, super::filter::SERVICE)?;
    let snap = state.registry.snapshot();
    let dc = state.agent.datacenter.as_str();
    let node = snap.node(&state.agent.node_name);
    let out: BTreeMap<&str, ServiceOut<'_>> = node
        .map(|n| {
            n.endpoints
                .values()
                .map(|e| (&*e.id, ServiceOut::new(e, dc)))
                .filter(|(_, row)| opts.admits(row))
                .collect()
        })
        .unwrap_or_default();
    json(&out, snap.index(), &opts)
}

pub(super) async fn agent_service(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let node_name = state.agent.node_name.clone();
    let hash_of = |snap: &Snapshot| -> Option<(String, u64)> {
        let entry = snap.node(&node_name)?;
        let e = entry.endpoints.get(id.as_str())?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&ServiceOut::new(e, ""))
            .ok()?
            .hash(&mut h);
        Some((format!("{:016x}", h.finish()), e.modify_index))
    };
    let wanted_hash = query_value(&q, "hash").map(str::to_string);
    let (snap, _) = match wanted_hash {
        // Hash-based blocking: wait until the content hash differs.
        Some(hash) if opts.wait.is_some() || !hash.is_empty() => {
            let initial = state.registry.snapshot();
            let same = hash_of(&initial).is_some_and(|(h, _)| h == hash);
            if same {
                let index = initial.index();
                let opts = QueryOpts {
                    index,
                    wait: opts.wait,
                    ..QueryOpts::default()
                };
                block(&state, &opts, Some(WatchKey::Node(&node_name)), |s| {
                    if hash_of(s).is_some_and(|(h, _)| h == hash) {
                        index
                    } else {
                        s.index()
                    }
                })
                .await?
            } else {
                (initial.clone(), initial.index())
            }
        }
        _ => {
            let snap = state.registry.snapshot();
            let index = snap.index();
            (snap, index)
        }
    };
    let entry = snap.node(&state.agent.node_name);
    let Some(endpoint) = entry.and_then(|n| n.endpoints.get(id.as_str())) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        ));
    };
    let (hash, index) = hash_of(&snap).unwrap_or_default();
    let out = ServiceOut::new(endpoint, &state.agent.datacenter).with_hash(hash.clone());
    let mut response = json(&out, index, &opts)?;
    if let Ok(value) = axum::http::HeaderValue::from_str(&hash) {
        response.headers_mut().insert("x-consul-contenthash", value);
    }
    Ok(response)
}

pub(super) async fn agent_checks(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let snap = state.registry.snapshot();
    let mut out = BTreeMap::new();
    if let Some(entry) = snap.node(&state.agent.node_name) {
        for check in entry.checks.values() {
            out.insert(&*check.id, CheckOut::new(check, service_tags(entry, check)));
        }
    }
    json(&out, snap.index(), &opts)
}

fn service_tags<'a>(
    entry: &'a switchyard_catalog::snapshot::NodeEntry,
    check: &switchyard_catalog::model::Check,
) -> &'a [String] {
    static NONE: Vec<String> = Vec::new();
    entry
        .endpoints
        .get(check.service_id.as_str())
        .map_or(&NONE, |e| &e.tags)
}

pub(super) async fn service_register(
    State(state): St,
    Query(q): Query<Pairs>,
    body: Bytes,
) -> ApiResult {
    let def: ServiceIn = decode_body(&body).map_err(bad)?;
    let node = agent_node(&state);
    let (endpoint, checks) = def.into_endpoint(&node, false).map_err(bad)?;
    let replace = query_value(&q, "replace-existing-checks").is_some();
    let index = state
        .write(Command::RegisterService {
            endpoint,
            checks,
            replace_existing_checks: replace,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn service_deregister(State(state): St, Path(id): Path<String>) -> ApiResult {
    let index = state
        .registry
        .apply(Command::DeregisterService {
            node: agent_node(&state),
            id: id.into(),
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) fn maintenance_args(q: &Pairs) -> Result<(bool, Option<String>), ApiError> {
    let enable = query_value(q, "enable")
        .ok_or_else(|| ApiError::bad_request("Missing value for enable"))?;
    let enable = parse_bool(enable)
        .filter(|_| !enable.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("Invalid value for enable: {enable:?}")))?;
    let reason = query_value(q, "reason").map(str::to_string);
    Ok((enable, reason))
}

pub(super) async fn service_maintenance(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let (enable, reason) = maintenance_args(&q)?;
    let index = state
        .registry
        .apply(Command::ServiceMaintenance {
            node: agent_node(&state),
            id: id.into(),
            enable,
            reason,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn node_maintenance(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let (enable, reason) = maintenance_args(&q)?;
    let index = state
        .registry
        .apply(Command::NodeMaintenance {
            node: agent_node(&state),
            enable,
            reason,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn check_register(State(state): St, body: Bytes) -> ApiResult {
    let def: CheckIn = decode_body(&body).map_err(bad)?;
    let node = agent_node(&state);
    let name = def.name.clone().filter(|n| !n.is_empty());
    let Some(name) = name else {
        return Err(ApiError::bad_request("Missing check name"));
    };
    let service_id = def.service_id.clone().filter(|s| !s.is_empty());
    let snap = state.registry.snapshot();
    let service = match &service_id {
        Some(id) => {
            let endpoint = snap
                .node(&node)
                .and_then(|n| n.endpoints.get(id.as_str()).cloned())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("ServiceID {id:?} does not exist"),
                    )
                })?;
            Some(endpoint)
        }
        None => None,
    };
    let ctx = CheckContext {
        node: &node,
        service: service.as_ref().map(|e| (&*e.id, &*e.service)),
        default_id: name,
        catalog: false,
    };
    let check = def.into_check(ctx).map_err(bad)?;
    let index = state.write(Command::RegisterCheck { check }).await?;
    Ok(write_ok(index, None))
}

pub(super) async fn check_deregister(State(state): St, Path(id): Path<String>) -> ApiResult {
    let index = state
        .registry
        .apply(Command::DeregisterCheck {
            node: agent_node(&state),
            id: id.into(),
        })
        .await?;
    Ok(write_ok(index, None))
}

async fn ttl_update(
    state: &ApiState,
    id: String,
    status: Status,
    output: Option<String>,
) -> ApiResult {
    let index = state
        .write(Command::UpdateCheck {
            node: agent_node(state),
            id: id.into(),
            status,
            output,
            require_ttl: true,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn check_pass(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let note = query_value(&q, "note").map(str::to_string);
    ttl_update(&state, id, Status::Passing, note).await
}

pub(super) async fn check_warn(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let note = query_value(&q, "note").map(str::to_string);
    ttl_update(&state, id, Status::Warning, note).await
}

pub(super) async fn check_fail(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let note = query_value(&q, "note").map(str::to_string);
    ttl_update(&state, id, Status::Critical, note).await
}

pub(super) async fn check_update(
    State(state): St,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let update: CheckUpdateIn = decode_body(&body).map_err(bad)?;
    let text = update.status.unwrap_or_default();
    let status = Status::parse(&text)
        .ok_or_else(|| ApiError::bad_request(format!("Invalid check status: '{text}'")))?;
    ttl_update(&state, id, status, update.output).await
}

// ---- catalog --------------------------------------------------------------

pub(super) async fn catalog_register(
    State(state): St,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    let reg: CatalogRegisterIn = decode_body(&body).map_err(bad)?;
    if let Some(dc) = reg.datacenter.as_deref().filter(|d| !d.is_empty()) {
        if dc != state.agent.datacenter {
            let path = "/v1/catalog/register";
            return Ok(super::federation::forward_write(&state, dc, path, &headers, body).await);
        }
    }
    let name = reg.node.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::bad_request("Must provide node"));
    }
    let snap = state.registry.snapshot();
    let skip = reg.skip_node_update.unwrap_or(false);
    let node = match (skip, snap.node(&name)) {
        (true, Some(existing)) => (*existing.node).clone(),
        _ => node_from(
            &name,
            reg.address.as_deref().unwrap_or_default(),
            reg.id,
            reg.tagged_addresses.unwrap_or_default(),
            reg.node_meta.unwrap_or_default(),
        )
        .map_err(bad)?,
    };
    let node_name = node.name.clone();
    let mut checks = Vec::new();
    let endpoint = match reg.service {
        Some(service) => {
            let (endpoint, service_checks) =
                service.into_endpoint(&node_name, true).map_err(bad)?;
            checks.extend(service_checks.into_iter().map(|c| c.check));
            Some(endpoint)
        }
        None => None,
    };
    let mut check_defs: Vec<CheckIn> = reg.check.into_iter().collect();
    check_defs.extend(reg.checks.unwrap_or_default());
    for def in check_defs {
        let service_id = def.service_id.clone().filter(|s| !s.is_empty());
        let service_name = service_id.as_ref().and_then(|sid| {
            endpoint
                .as_ref()
                .filter(|e| *e.id == **sid)
                .map(|e| e.service.to_string())
                .or_else(|| {
                    snap.node(&node_name)
                        .and_then(|n| n.endpoints.get(sid.as_str()))
                        .map(|e| e.service.to_string())
                })
        });
        if let (Some(sid), None) = (&service_id, &service_name) {
            return Err(ApiError::bad_request(format!(
                "Unknown service ID {sid:?} for check on node {node_name:?}"
            )));
        }
        let default_id = def
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("Missing check ID or name"))?;
        let ctx = CheckContext {
            node: &node_name,
            service: service_id.as_deref().zip(service_name.as_deref()),
            default_id,
            catalog: true,
        };
        checks.push(def.into_check(ctx).map_err(bad)?.check);
    }
    let index = state
        .write(Command::CatalogRegister {
            node,
            skip_node_update: skip,
            endpoint,
            checks,
        })
        .await?;
    Ok(write_ok(index, Some("true")))
}

pub(super) async fn catalog_deregister(
    State(state): St,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    let reg: CatalogDeregisterIn = decode_body(&body).map_err(bad)?;
    if let Some(dc) = reg.datacenter.as_deref().filter(|d| !d.is_empty()) {
        if dc != state.agent.datacenter {
            let path = "/v1/catalog/deregister";
            return Ok(super::federation::forward_write(&state, dc, path, &headers, body).await);
        }
    }
    let node = reg
        .node
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Must provide node"))?;
    let index = state
        .registry
        .apply(Command::CatalogDeregister {
            node: node.into(),
            service_id: reg.service_id.filter(|s| !s.is_empty()).map(Into::into),
            check_id: reg.check_id.filter(|s| !s.is_empty()).map(Into::into),
        })
        .await?;
    Ok(write_ok(index, Some("true")))
}

pub(super) async fn catalog_datacenters(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    // Ours first, then the others by measured round trip (as Consul does).
    let names = match &state.federation {
        Some(federation) => federation.names(),
        None => vec![state.agent.datacenter.clone()],
    };
    json(&names, snap.index(), &QueryOpts::default())
}

pub(super) async fn catalog_services(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse_filtered(&q, super::filter::CATALOG_SERVICE)?;
    let dc = state.agent.datacenter.as_str();
    let (snap, index) = block(&state, &opts, None, |s| {
        s.tables().services.max(s.tables().nodes)
    })
    .await?;
    let build = || {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for view in snap.services() {
            let keep = (opts.node_meta.is_empty()
                || view
                    .instances()
                    .any(|i| opts.node_meta_matches(&i.node.meta)))
                && (opts.filter.is_none()
                    || view
                        .instances()
                        .any(|i| opts.admits(&CatalogServiceOut::new(&i.node, &i.endpoint, dc))));
            if keep {
                out.insert(&view.name, view.tags().collect());
            }
        }
        out
    };
    shared_json(
        &state,
        ("catalog/services", "", &q),
        &snap,
        index,
        &opts,
        build,
    )
    .await
}

fn has_tags(instance: &Instance, tags: &[String]) -> bool {
    tags.iter().all(|t| instance.endpoint.tags.contains(t))
}

pub(super) async fn catalog_service(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse_filtered(&q, super::filter::CATALOG_SERVICE)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Service(&name)), |s| {
        s.service_index(&name)
    })
    .await?;
    let dc = state.agent.datacenter.as_str();
    let build = || catalog_entries(&snap, &name, &opts, dc);
    shared_json(
        &state,
        ("catalog/service", &name, &q),
        &snap,
        index,
        &opts,
        build,
    )
    .await
}

/// `/v1/catalog/service/NAME`'s entries in `snap` (ours, or another
/// datacenter's copy when it is out of reach), reported as datacenter `dc`.
pub(super) fn catalog_entries<'a>(
    snap: &'a Snapshot,
    name: &str,
    opts: &QueryOpts,
    dc: &'a str,
) -> Vec<CatalogServiceOut<'a>> {
    snap.service(name)
        .or_else(|| snap.service_ci(name))
        .map(|view| {
            view.instances()
                .filter(|i| has_tags(i, &opts.tags) && opts.node_meta_matches(&i.node.meta))
                .map(|i| CatalogServiceOut::new(&i.node, &i.endpoint, dc))
                .filter(|row| opts.admits(row))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) async fn catalog_nodes(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse_filtered(&q, super::filter::NODE)?;
    let (snap, index) = block(&state, &opts, None, |s| s.tables().nodes).await?;
    let dc = state.agent.datacenter.as_str();
    let build = || -> Vec<NodeOut<'_>> {
        snap.nodes_sorted()
            .into_iter()
            .filter(|n| opts.node_meta_matches(&n.node.meta))
            .map(|n| NodeOut::new(&n.node, dc))
            .filter(|row| opts.admits(row))
            .collect()
    };
    shared_json(
        &state,
        ("catalog/nodes", "", &q),
        &snap,
        index,
        &opts,
        build,
    )
    .await
}

pub(super) async fn catalog_node(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Node(&name)), |s| {
        s.node(&name).map_or(1, |n| n.index)
    })
    .await?;
    let dc = state.agent.datacenter.as_str();
    let Some(entry) = snap.node(&name) else {
        return json(&serde_json::Value::Null, index, &opts);
    };
    let services: BTreeMap<&str, ServiceOut<'_>> = entry
        .endpoints
        .values()
        .map(|e| (&*e.id, ServiceOut::new(e, dc)))
        .collect();
    let out = json!({ "Node": NodeOut::new(&entry.node, dc), "Services": services });
    json(&out, index, &opts)
}

/// `/v1/catalog/node-services/NODE`: the node and its services as a list
/// (`{"Node": null, "Services": []}` for a node not in the catalog).
pub(super) async fn catalog_node_services(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Node(&name)), |s| {
        s.node(&name).map_or(1, |n| n.index)
    })
    .await?;
    let dc = state.agent.datacenter.as_str();
    let out = match snap.node(&name) {
        None => json!({ "Node": null, "Services": [] }),
        Some(entry) => {
            let services: Vec<ServiceOut<'_>> = entry
                .endpoints
                .values()
                .map(|e| ServiceOut::new(e, dc))
                .collect();
            json!({ "Node": NodeOut::new(&entry.node, dc), "Services": services })
        }
    };
    json(&out, index, &opts)
}

/// One of this agent's services with its checks and their worst status,
/// as `/v1/agent/health/service/*` shows it.
fn agent_health<'a>(
    entry: &'a switchyard_catalog::NodeEntry,
    endpoint: &'a switchyard_catalog::Endpoint,
    dc: &'a str,
) -> (Status, serde_json::Value) {
    let checks: Vec<_> = entry
        .checks
        .values()
        .filter(|c| c.service_id == *endpoint.id || c.is_node_level())
        .collect();
    let worst = checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Passing);
    let rendered: Vec<CheckOut<'_>> = checks
        .iter()
        .map(|c| CheckOut::new(c, &endpoint.tags))
        .collect();
    let body = json!({
        "AggregatedStatus": worst.as_str(),
        "Service": ServiceOut::new(endpoint, dc),
        "Checks": rendered,
    });
    (worst, body)
}

/// Consul's status code for an aggregated status: 200 passing, 429
/// warning, 503 critical.
fn health_code(status: Status) -> StatusCode {
    match status {
        Status::Passing => StatusCode::OK,
        Status::Warning => StatusCode::TOO_MANY_REQUESTS,
        Status::Critical => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn health_answer(status: Status, body: serde_json::Value, text: bool) -> ApiResult {
    let mut response = match text {
        true => axum::response::IntoResponse::into_response(status.as_str().to_string()),
        false => axum::response::IntoResponse::into_response(axum::Json(body)),
    };
    *response.status_mut() = health_code(status);
    Ok(response)
}

/// `/v1/agent/health/service/name/NAME`: this agent's instances of a
/// service, with the worst status among them as the status code (what
/// load balancers and Nomad poll). `?format=text`: the status alone.
pub(super) async fn agent_health_by_name(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let snap = state.registry.snapshot();
    let dc = state.agent.datacenter.as_str();
    let text = query_value(&q, "format") == Some("text");
    let Some(entry) = snap.node(&state.agent.node_name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("ServiceName {name} Not Found"),
        ));
    };
    let found: Vec<(Status, serde_json::Value)> = entry
        .endpoints
        .values()
        .filter(|e| *e.service == *name)
        .map(|e| agent_health(entry, e, dc))
        .collect();
    if found.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("ServiceName {name} Not Found"),
        ));
    }
    let worst = found
        .iter()
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(Status::Passing);
    let bodies: Vec<serde_json::Value> = found.into_iter().map(|(_, b)| b).collect();
    health_answer(worst, serde_json::Value::Array(bodies), text)
}

/// `/v1/agent/health/service/id/ID`: one of this agent's instances.
pub(super) async fn agent_health_by_id(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let snap = state.registry.snapshot();
    let dc = state.agent.datacenter.as_str();
    let text = query_value(&q, "format") == Some("text");
    let found = snap.node(&state.agent.node_name).and_then(|entry| {
        entry
            .endpoints
            .get(id.as_str())
            .map(|e| agent_health(entry, e, dc))
    });
    let Some((status, body)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("ServiceId {id} not found"),
        ));
    };
    health_answer(status, body, text)
}

/// `/v1/agent/metrics`: the agent's metrics in Consul's JSON shape
/// (gauges, counters, histograms as samples), or the Prometheus text with
/// `?format=prometheus`.
pub(super) async fn agent_metrics(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    use prometheus::proto::MetricType;
    if query_value(&q, "format") == Some("prometheus") {
        return Ok(super::native::metrics(State(state)).await);
    }
    let store = state.registry.store_status();
    let metrics = state.registry.metrics();
    metrics.store_connected.set(i64::from(store.connected()));
    metrics.store_staleness.set(store.staleness().as_secs_f64());
    metrics.before_scrape(&state.registry.snapshot());
    let families = state.prometheus.gather();
    let (mut gauges, mut counters, mut samples) = (Vec::new(), Vec::new(), Vec::new());
    for family in &families {
        for metric in family.get_metric() {
            let labels: BTreeMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let name = family.name();
            match family.get_field_type() {
                MetricType::GAUGE => gauges.push(json!({
                    "Name": name, "Value": metric.get_gauge().get_value(), "Labels": labels,
                })),
                MetricType::COUNTER => {
                    let v = metric.get_counter().get_value();
                    counters.push(json!({
                        "Name": name, "Count": v, "Sum": v, "Min": v, "Max": v,
                        "Mean": v, "Stddev": 0, "Rate": 0, "Labels": labels,
                    }));
                }
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    let (count, sum) = (h.get_sample_count(), h.get_sample_sum());
                    let mean = if count > 0 { sum / count as f64 } else { 0.0 };
                    samples.push(json!({
                        "Name": name, "Count": count, "Sum": sum, "Mean": mean,
                        "Rate": 0, "Labels": labels,
                    }));
                }
                _ => {}
            }
        }
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    json(
        &json!({
            "Timestamp": now, "Gauges": gauges, "Points": [], "Counters": counters,
            "Samples": samples,
        }),
        state.registry.snapshot().index(),
        &QueryOpts::default(),
    )
}

// ---- health ---------------------------------------------------------------

pub(super) async fn health_service(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse_filtered(&q, super::filter::HEALTH_SERVICE)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Service(&name)), |s| {
        s.service_index(&name)
    })
    .await?;
    let dc = state.agent.datacenter.as_str();
    let build = || health_entries(&snap, &name, &opts, dc);
    shared_json(
        &state,
        ("health/service", &name, &q),
        &snap,
        index,
        &opts,
        build,
    )
    .await
}

/// `/v1/health/service/NAME`'s entries in `snap` (ours, or another
/// datacenter's copy when it is out of reach), reported as datacenter `dc`.
pub(super) fn health_entries<'a>(
    snap: &'a Snapshot,
    name: &str,
    opts: &QueryOpts,
    dc: &'a str,
) -> Vec<ServiceEntryOut<'a>> {
    let mut out = Vec::new();
    // (A copy holds names in lower case, as DNS asks for them.)
    if let Some(view) = snap.service(name).or_else(|| snap.service_ci(name)) {
        // `?passing`: the view's precomputed passing positions.
        let instances: Box<dyn Iterator<Item = &Instance>> = if opts.passing {
            Box::new(view.passing())
        } else {
            Box::new(view.instances())
        };
        for instance in instances {
            if !has_tags(instance, &opts.tags) || !opts.node_meta_matches(&instance.node.meta) {
                continue;
            }
            let entry = health_entry(instance, dc);
            if opts.admits(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

/// One instance as `/v1/health/service` (and a prepared query's
/// `execute`) shows it, in datacenter `dc`.
pub(super) fn health_entry<'a>(instance: &'a Instance, dc: &'a str) -> ServiceEntryOut<'a> {
    let mut checks = Vec::with_capacity(instance.checks.len() + 1);
    if !instance.checks.iter().any(|c| &*c.id == NODE_HEALTH_CHECK) {
        checks.push(CheckOut::serf_health(&instance.node));
    }
    for check in instance.checks.iter() {
        let tags: &[String] = if check.is_node_level() {
            &[]
        } else {
            &instance.endpoint.tags
        };
        checks.push(CheckOut::new(check, tags));
    }
    ServiceEntryOut {
        node: NodeOut::new(&instance.node, dc),
        service: ServiceOut::new(&instance.endpoint, dc),
        checks,
    }
}

pub(super) async fn health_checks(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Service(&name)), |s| {
        s.service_index(&name)
    })
    .await?;
    let build = || {
        let mut out = Vec::new();
        if let Some(view) = snap.service(&name) {
            for instance in view.instances() {
                if !opts.node_meta_matches(&instance.node.meta) {
                    continue;
                }
                for check in instance.checks.iter().filter(|c| !c.is_node_level()) {
                    out.push(CheckOut::new(check, &instance.endpoint.tags));
                }
            }
        }
        out
    };
    shared_json(
        &state,
        ("health/checks", &name, &q),
        &snap,
        index,
        &opts,
        build,
    )
    .await
}

pub(super) async fn health_state(
    State(state): St,
    Path(wanted): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let filter = match wanted.as_str() {
        "any" => None,
        other => Some(Status::parse(other).ok_or_else(|| ApiError::bad_request("Invalid state"))?),
    };
    let (snap, index) = block(&state, &opts, None, |s| {
        s.tables().checks.max(s.tables().nodes)
    })
    .await?;
    let mut out = Vec::new();
    for entry in snap.nodes_sorted() {
        if !opts.node_meta_matches(&entry.node.meta) {
            continue;
        }
        if matches!(filter, None | Some(Status::Passing))
            && !entry.checks.contains_key(NODE_HEALTH_CHECK)
        {
            out.push(CheckOut::serf_health(&entry.node));
        }
        for check in entry.checks.values() {
            if filter.is_none_or(|s| s == check.status) {
                out.push(CheckOut::new(check, service_tags(entry, check)));
            }
        }
    }
    json(&out, index, &opts)
}

pub(super) async fn health_node(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, Some(WatchKey::Node(&name)), |s| {
        s.node(&name).map_or(1, |n| n.index)
    })
    .await?;
    let mut out = Vec::new();
    if let Some(entry) = snap.node(&name) {
        if !entry.checks.contains_key(NODE_HEALTH_CHECK) {
            out.push(CheckOut::serf_health(&entry.node));
        }
        for check in entry.checks.values() {
            out.push(CheckOut::new(check, service_tags(entry, check)));
        }
    }
    json(&out, index, &opts)
}

// ---- status ---------------------------------------------------------------

/// This agent's API address as others reach it (the advertised host and
/// the API's port).
fn own_address(state: &ApiState) -> String {
    let port = state
        .listeners
        .get()
        .and_then(|l| l["api"].as_str())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map_or(8500, |a| a.port());
    let host = &state.agent.advertise_addr;
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The leader and peers of what holds the catalog: etcd's leader and
/// members in cluster mode (by client address; the leader empty while
/// unknown, as Consul's is without a leader), this agent alone on the
/// embedded store.
fn servers(state: &ApiState) -> (String, Vec<String>) {
    if !state.registry.shared() {
        let me = own_address(state);
        return (me.clone(), vec![me]);
    }
    let servers = state.registry.store_status().servers();
    (
        servers.leader.clone().unwrap_or_default(),
        servers.members.clone(),
    )
}

pub(super) async fn status_leader(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    json(&servers(&state).0, snap.index(), &QueryOpts::default())
}

pub(super) async fn status_peers(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    json(&servers(&state).1, snap.index(), &QueryOpts::default())
}

/// `/v1/agent/members`: the live agents sharing this catalog (this one
/// alone on the embedded store), each at its node's address.
pub(super) async fn agent_members(State(state): St) -> ApiResult {
    let snap = state.registry.snapshot();
    let store = state.registry.store_status();
    let mut names: Vec<String> = store.members().iter().map(|n| n.to_string()).collect();
    if !names.contains(&state.agent.node_name) {
        names.push(state.agent.node_name.clone());
        names.sort();
    }
    let members: Vec<_> = names
        .iter()
        .map(|name| {
            let addr = snap
                .node(name)
                .map(|n| n.node.address.clone())
                .unwrap_or_default();
            json!({
                "Name": name,
                "Addr": addr,
                "Port": 8301,
                "Tags": {"dc": state.agent.datacenter, "role": "consul", "build": "1.20.0:switchyard"},
                "Status": 1,
                "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
                "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
            })
        })
        .collect();
    json(&members, snap.index(), &QueryOpts::default())
}
