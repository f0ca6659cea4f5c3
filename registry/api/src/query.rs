//! Consul's prepared queries (`/v1/query`): create, read, update, delete,
//! `execute` and `explain` (CONSUL-KV.md §3).
//!
//! Unlike Consul, `execute` is a blocking query: with `?index=` it answers
//! when its answer may have changed: the query's definition, its service
//! here, or the copy of its service in another datacenter. Its index is
//! the larger of the query's and the service's indexes here (both from our
//! catalog's counter: whichever changed last is the larger, so it moves
//! when either does) plus the service's index in each datacenter's copy
//! (each its own counter, summed) plus the number of times a datacenter
//! came into or went out of reach (failover skips those out of reach). It moves whenever one of them does, the
//! moment a failover starts or ends included. It can only go back when a
//! new definition names another service; the wait ends whenever the index
//! differs from the one held, so a watcher then starts over, as Consul's
//! clients do when an index goes back. Failover reads the other datacenters' copies
//! (`switchyard-federation`): the same ones DNS and the proxy fail over
//! with, so the three agree on where a service is served from.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use super::consul::health_entry;
use super::decode::decode_body;
use super::render::ServiceEntryOut;
use super::{json, write_ok, ApiError, ApiResult, ApiState, BlockingGuard, Pairs, QueryOpts};
use switchyard_catalog::duration::parse_go_duration;
use switchyard_catalog::snapshot::{Instance, Snapshot};
use switchyard_catalog::{
    Copied, CopyOf, PreparedQuery, QueryFailover, QueryService, QueryTemplate,
};
use switchyard_registry::{Command, WatchKey};

type St = State<Arc<ApiState>>;

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

fn invalid(message: impl std::fmt::Display) -> ApiError {
    refused(format!("Invalid prepared query: {message}"))
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Query not found")
}

// ---- definitions ------------------------------------------------------------

/// A definition as clients send it (keys folded by `decode_body`; lists and
/// maps may be null).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct QueryIn {
    name: String,
    session: String,
    token: String,
    template: Option<TemplateIn>,
    service: Option<ServiceIn>,
    dns: Option<DnsIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TemplateIn {
    r#type: String,
    regexp: String,
    removeemptytags: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ServiceIn {
    service: String,
    failover: Option<FailoverIn>,
    ignorecheckids: Option<Vec<String>>,
    onlypassing: bool,
    near: String,
    tags: Option<Vec<String>>,
    nodemeta: Option<BTreeMap<String, String>>,
    servicemeta: Option<BTreeMap<String, String>>,
    connect: bool,
    peer: String,
    samenessgroup: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FailoverIn {
    nearestn: i64,
    datacenters: Option<Vec<String>>,
    targets: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DnsIn {
    ttl: String,
}

/// Checks a definition as Consul does (`Invalid prepared query: …`, 500)
/// and turns it into the stored record under `id`.
fn definition(body: &[u8], id: String) -> Result<PreparedQuery, ApiError> {
    let input: QueryIn = decode_body(body).map_err(ApiError::bad_request)?;
    let template = input
        .template
        .filter(|t| !t.r#type.is_empty())
        .map(|t| QueryTemplate {
            kind: t.r#type,
            regexp: t.regexp,
            remove_empty_tags: t.removeemptytags,
        });
    let service = input.service.unwrap_or_default();
    if service.service.is_empty() {
        return Err(invalid("Must provide a Service name to query"));
    }
    let failover = service.failover.unwrap_or_default();
    if failover.nearestn < 0 {
        return Err(invalid(format!(
            "Bad NearestN '{}', must be >= 0",
            failover.nearestn
        )));
    }
    if failover.targets.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid(
            "Failover.Targets (cluster peering) is not supported: name datacenters in Failover.Datacenters",
        ));
    }
    if !service.peer.is_empty() || !service.samenessgroup.is_empty() {
        return Err(invalid(
            "Service.Peer and Service.SamenessGroup (cluster peering) are not supported",
        ));
    }
    if service.connect {
        return Err(invalid(
            "Service.Connect is not supported: Switchyard has no Connect proxies",
        ));
    }
    if input.name.is_empty() && template.is_none() && input.session.is_empty() {
        return Err(invalid("Must be bound to a session"));
    }
    let ttl = input.dns.unwrap_or_default().ttl;
    if !ttl.is_empty() {
        if ttl.trim_start().starts_with('-') {
            return Err(invalid(format!("Bad DNS TTL '{ttl}', must be >=0")));
        }
        parse_go_duration(&ttl).map_err(|e| invalid(format!("Bad DNS TTL '{ttl}': {e}")))?;
    }
    let nearest_n = u32::try_from(failover.nearestn)
        .map_err(|_| invalid(format!("Bad NearestN '{}'", failover.nearestn)))?;
    Ok(PreparedQuery {
        id,
        name: input.name,
        session: input.session,
        token: input.token,
        template,
        service: QueryService {
            service: service.service,
            failover: QueryFailover {
                nearest_n,
                datacenters: failover.datacenters.unwrap_or_default(),
            },
            ignore_check_ids: service.ignorecheckids.unwrap_or_default(),
            only_passing: service.onlypassing,
            near: service.near,
            tags: service.tags.unwrap_or_default(),
            node_meta: service.nodemeta.unwrap_or_default(),
            service_meta: service.servicemeta.unwrap_or_default(),
            connect: false,
        },
        dns_ttl: ttl,
        create_index: 0,
        modify_index: 0,
    })
}

/// A definition in Consul's shape. The query's `Token` shows as
/// `<hidden>`: our tokens are roles, and no role reads another's secret.
fn definition_json(q: &PreparedQuery) -> serde_json::Value {
    let template = q.template.clone().unwrap_or_default();
    let s = &q.service;
    json!({
        "ID": q.id,
        "Name": q.name,
        "Session": q.session,
        "Token": if q.token.is_empty() { "" } else { "<hidden>" },
        "Template": {
            "Type": template.kind,
            "Regexp": template.regexp,
            "RemoveEmptyTags": template.remove_empty_tags,
        },
        "Service": {
            "Service": s.service,
            "Failover": {
                "NearestN": s.failover.nearest_n,
                "Datacenters": s.failover.datacenters,
                "Targets": null,
            },
            "IgnoreCheckIDs": s.ignore_check_ids,
            "OnlyPassing": s.only_passing,
            "Near": s.near,
            "Tags": s.tags,
            "NodeMeta": s.node_meta,
            "ServiceMeta": s.service_meta,
            "Peer": "",
            "Connect": s.connect,
        },
        "DNS": { "TTL": q.dns_ttl },
        "CreateIndex": q.create_index,
        "ModifyIndex": q.modify_index,
    })
}

pub(super) async fn create(State(state): St, body: Bytes) -> ApiResult {
    let id = uuid::Uuid::new_v4().to_string();
    let query = definition(&body, id.clone())?;
    state
        .write(Command::PutQuery {
            query,
            create: true,
        })
        .await?;
    json(
        &json!({ "ID": id }),
        state.registry.snapshot().index(),
        &QueryOpts::default(),
    )
}

pub(super) async fn update(State(state): St, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let query = definition(&body, id)?;
    let index = state
        .write(Command::PutQuery {
            query,
            create: false,
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn delete(State(state): St, Path(id): Path<String>) -> ApiResult {
    let index = state
        .write(Command::DeleteQuery {
            id: id.as_str().into(),
        })
        .await?;
    Ok(write_ok(index, None))
}

pub(super) async fn list(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = super::block(&state, &opts, None, |s| s.queries.index).await?;
    let all: Vec<_> = snap
        .queries
        .iter()
        .map(|q| definition_json(&q.def))
        .collect();
    json(&all, index, &opts)
}

pub(super) async fn read(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = super::block(&state, &opts, Some(WatchKey::Query(&id)), |s| {
        s.queries
            .get(&id)
            .map_or(s.queries.index, |q| q.def.modify_index)
    })
    .await?;
    let query = snap.queries.get(&id).ok_or_else(not_found)?;
    json(&[definition_json(&query.def)], index, &opts)
}

/// `GET /v1/query/<id or name>/explain`: the definition as it executes for
/// that name (a template rendered).
pub(super) async fn explain(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let snap = state.registry.snapshot();
    let query = snap.queries.resolve(&name).ok_or_else(not_found)?;
    let rendered = query.render(&name);
    json(
        &json!({ "Query": definition_json(&rendered) }),
        snap.queries.index,
        &opts,
    )
}

// ---- execute ------------------------------------------------------------------

/// `execute`'s own parameters.
struct ExecuteOpts {
    near: Option<String>,
    limit: Option<usize>,
}

impl ExecuteOpts {
    fn parse(pairs: &Pairs) -> Result<ExecuteOpts, ApiError> {
        let mut out = ExecuteOpts {
            near: None,
            limit: None,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "near" if !value.is_empty() => out.near = Some(value.clone()),
                "limit" => {
                    let limit: i64 = value
                        .parse()
                        .map_err(|e| refused(format!("Bad limit: {e}")))?;
                    out.limit = usize::try_from(limit).ok().filter(|l| *l > 0);
                }
                "connect" if super::parse_bool(value) == Some(true) => {
                    return Err(ApiError::bad_request(
                        "connect: Switchyard has no Connect proxies",
                    ))
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Where an execution's answer came from.
struct Answer {
    /// The snapshot the instances are in: ours or a datacenter's copy.
    snap: Arc<Snapshot>,
    /// The datacenter that answered (ours when nothing failed over).
    dc: String,
    /// Datacenters tried after ours.
    failovers: usize,
    /// The sum of the indexes the answer depends on (see the module doc).
    index: u64,
}

/// Runs `def` once: here, then (when nothing here qualifies) in the
/// datacenters it fails over to, in order, until one has instances. A
/// copy being fetched for the first time is awaited (for
/// `federation.dns_timeout` at most).
async fn run(state: &ApiState, def: &QueryService, query_index: u64) -> Answer {
    let local = state.registry.snapshot();
    let here = def.view(&local);
    let local_index = here.map_or_else(
        || local.service_index(&def.service),
        |v| local.service_index(&v.name),
    );
    let mut answer = Answer {
        dc: state.agent.datacenter.clone(),
        failovers: 0,
        index: query_index.max(local_index),
        snap: local.clone(),
    };
    let Some(elsewhere) = &state.copies else {
        return answer;
    };
    let lower = def.service.to_ascii_lowercase();
    // Every other datacenter's copy counts, failed over to or not, in reach
    // or not: the sum never loses a term.
    answer.index += elsewhere
        .datacenters()
        .iter()
        .filter_map(|dc| elsewhere.peek(dc))
        .map(|copy| copy.service_index(&lower))
        .sum::<u64>()
        + elsewhere.reach_changes();
    if !def.select(here).is_empty() {
        return answer;
    }
    let targets = def.failover_targets(&**elsewhere);
    let mut found = None;
    for (tried, dc) in targets.iter().enumerate() {
        if found.is_some() {
            break;
        }
        let mut copied = elsewhere.copy(dc, CopyOf::Service(&lower));
        if let Copied::Fetching(wait) = copied {
            wait.await;
            copied = elsewhere.copy(dc, CopyOf::Service(&lower));
        }
        if let Copied::Ready(snap) = copied {
            if !def.select(def.view(&snap)).is_empty() {
                elsewhere.failed_over(&lower, dc);
                found = Some((tried + 1, dc.clone(), snap));
            }
        }
    }
    // Copies made by this execution count from the next one on; the
    // index may only grow meanwhile.
    match found {
        Some((failovers, dc, snap)) => Answer {
            snap,
            dc,
            failovers,
            index: answer.index,
        },
        None => Answer {
            failovers: targets.len(),
            ..answer
        },
    }
}

/// Orders the selection: shuffled, with the instances on the `near` node
/// (`_agent`: this agent's) first. There are no network coordinates to
/// sort the rest by, so they stay shuffled.
fn order<'a>(state: &ApiState, mut picked: Vec<&'a Instance>, near: &str) -> Vec<&'a Instance> {
    fastrand::shuffle(&mut picked);
    let near = match near {
        "" | "_ip" => return picked,
        "_agent" => state.agent.node_name.as_str(),
        node => node,
    };
    picked.sort_by_key(|i| *i.node.name != *near);
    picked
}

pub(super) async fn execute(
    State(state): St,
    Path(name): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let exec = ExecuteOpts::parse(&q)?;
    let metrics = state.registry.metrics();
    let mut guard = None;
    let deadline = Instant::now()
        + opts
            .wait
            .unwrap_or(Duration::from_secs(300))
            .min(state.config.max_wait);
    let mut shutdown = state.shutdown.clone();
    loop {
        let snap = state.registry.snapshot();
        let query = snap.queries.resolve(&name).ok_or_else(not_found)?.clone();
        let def = query.render(&name);
        // Armed before the answer is computed: a change in between wakes us.
        let on_query = state.registry.watch_key(WatchKey::Query(&query.def.id));
        let service = def
            .service
            .view(&snap)
            .map_or_else(|| def.service.service.clone(), |v| v.name.to_string());
        let on_service = state.registry.watch_key(WatchKey::Service(&service));
        let (q_woke, s_woke) = (on_query.notified(), on_service.notified());
        let copies = state.copies.clone();
        let c_woke = copies.as_ref().map(|c| c.changed().notified());
        let (mut q_woke, mut s_woke, mut c_woke) = (
            std::pin::pin!(q_woke),
            std::pin::pin!(s_woke),
            std::pin::pin!(c_woke),
        );
        q_woke.as_mut().enable();
        s_woke.as_mut().enable();
        if let Some(c) = c_woke.as_mut().as_pin_mut() {
            c.enable();
        }
        let answer = run(&state, &def.service, query.def.modify_index).await;
        let index = answer.index.max(1);
        let over = Instant::now() >= deadline || *shutdown.borrow();
        if opts.index == 0 || index != opts.index || over {
            return respond(&state, &def, answer, &exec, &opts);
        }
        if guard.is_none() {
            if metrics.blocking_queries.get() as usize >= state.config.max_blocking_queries {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many blocking queries (limit {}, api.max_blocking_queries); retry later",
                        state.config.max_blocking_queries
                    ),
                ));
            }
            metrics.blocking_queries.inc();
            guard = Some(BlockingGuard(&metrics.blocking_queries));
        }
        tokio::select! {
            () = &mut q_woke => {}
            () = &mut s_woke => {}
            () = async {
                match c_woke.as_mut().as_pin_mut() {
                    Some(c) => c.await,
                    None => std::future::pending().await,
                }
            } => {}
            () = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
        metrics.blocking_wakeups.inc();
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ExecuteOut<'a> {
    service: &'a str,
    nodes: Vec<ServiceEntryOut<'a>>,
    #[serde(rename = "DNS")]
    dns: serde_json::Value,
    datacenter: &'a str,
    failovers: usize,
    index: u64,
    last_contact: u64,
    known_leader: bool,
    consistency_level: &'a str,
}

fn respond(
    state: &ApiState,
    def: &PreparedQuery,
    answer: Answer,
    exec: &ExecuteOpts,
    opts: &QueryOpts,
) -> Result<Response, ApiError> {
    let picked = def.service.select(def.service.view(&answer.snap));
    let near = exec.near.as_deref().unwrap_or(&def.service.near);
    let mut picked = order(state, picked, near);
    if let Some(limit) = exec.limit {
        picked.truncate(limit);
    }
    let here = answer.dc == state.agent.datacenter;
    let last_contact = match (&state.federation, here) {
        (Some(f), false) => f
            .last_contact(&answer.dc)
            .map_or(0, |d| d.as_millis() as u64),
        _ => 0,
    };
    let out = ExecuteOut {
        service: &def.service.service,
        nodes: picked
            .into_iter()
            .map(|i| health_entry(i, &answer.dc))
            .collect(),
        dns: json!({ "TTL": def.dns_ttl }),
        datacenter: &answer.dc,
        failovers: answer.failovers,
        index: answer.index.max(1),
        last_contact,
        known_leader: here,
        consistency_level: opts.consistency,
    };
    let mut response = json(&out, answer.index, opts)?;
    if !here {
        response
            .extensions_mut()
            .insert(super::federation::Forwarded);
        let headers = response.headers_mut();
        headers.insert(
            super::KNOWN_LEADER,
            axum::http::HeaderValue::from_static("false"),
        );
        headers.insert(super::LAST_CONTACT, last_contact.into());
    }
    Ok(response.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_catalog::NAME_PREFIX_MATCH;

    #[test]
    fn definitions_are_checked_as_consul_checks_them() {
        let err = |body: &str| {
            definition(body.as_bytes(), "id".into())
                .expect_err("refused")
                .message
        };
        assert!(err(r#"{"Name":"x"}"#).contains("Must provide a Service name to query"));
        assert!(err(r#"{"Service":{"Service":"db"}}"#).contains("Must be bound to a session"));
        assert!(
            err(r#"{"Name":"x","Service":{"Service":"db","Failover":{"NearestN":-1}}}"#)
                .contains("Bad NearestN '-1', must be >= 0")
        );
        assert!(
            err(r#"{"Name":"x","Service":{"Service":"db"},"DNS":{"TTL":"-5s"}}"#)
                .contains("Bad DNS TTL")
        );
        assert!(
            err(r#"{"Name":"x","Service":{"Service":"db"},"DNS":{"TTL":"soon"}}"#)
                .contains("Bad DNS TTL 'soon'")
        );
        let ok = definition(
            br#"{"name":"db","service":{"service":"db","only_passing":true,"tags":["a","!b"],"failover":{"nearest_n":2,"datacenters":null}},"template":{"type":"name_prefix_match"}}"#,
            "id".into(),
        )
        .expect("valid");
        assert!(ok.service.only_passing);
        assert_eq!(ok.service.failover.nearest_n, 2);
        assert_eq!(ok.service.tags, ["a", "!b"]);
        assert_eq!(ok.template.expect("valid").kind, NAME_PREFIX_MATCH);
    }
}
