//! Consul's sessions (`/v1/session/*`, CONSUL-KV.md §2): create, destroy,
//! info, node, list and renew. What a session's end does to its keys is the
//! registry's (`Command::SessionDestroy`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::decode::decode_body;
use super::{block, json, write_ok, ApiError, ApiResult, ApiState, Pairs, QueryOpts};
use switchyard_catalog::duration::{format_go_duration, parse_go_duration};
use switchyard_catalog::session::{MAX_TTL, MIN_TTL};
use switchyard_catalog::{Behavior, Session};
use switchyard_registry::Command;

type St = State<Arc<ApiState>>;

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

/// A session as clients send it (keys folded; every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SessionIn {
    name: String,
    node: Option<String>,
    checks: Option<Vec<String>>,
    nodechecks: Option<Vec<String>>,
    servicechecks: Option<Vec<ServiceCheckIn>>,
    lockdelay: Option<Value>,
    behavior: Option<String>,
    ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ServiceCheckIn {
    id: String,
}

/// `LockDelay`: a Go duration, or nanoseconds (under 1000: seconds, as
/// Consul reads them).
fn lock_delay(value: Option<&Value>) -> Result<Duration, ApiError> {
    let bad =
        |v: &Value| ApiError::bad_request(format!("Request decode failed: bad LockDelay {v}"));
    match value {
        None | Some(Value::Null) => Ok(Duration::from_secs(15)),
        Some(Value::Number(n)) => {
            let n = n.as_f64().ok_or_else(|| bad(&Value::Null))?;
            if !(0.0..=1e18).contains(&n) {
                return Err(bad(&json!(n)));
            }
            Ok(match n < 1000.0 {
                true => Duration::from_secs_f64(n),
                false => Duration::from_nanos(n as u64),
            })
        }
        Some(Value::String(s)) => parse_go_duration(s).map_err(|_| bad(&json!(s))),
        Some(other) => Err(bad(other)),
    }
}

/// Checks a creation as Consul does and makes the session.
fn session_from(body: &[u8], state: &ApiState) -> Result<Session, ApiError> {
    // No body (or JSON null): every default.
    let text = body.trim_ascii();
    let input: SessionIn = match text.is_empty() || text == b"null" {
        true => SessionIn::default(),
        false => decode_body(body).map_err(ApiError::bad_request)?,
    };
    let behavior = match input.behavior.as_deref() {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => return Err(refused(format!("Invalid Behavior setting '{other}'"))),
    };
    let ttl = input.ttl.unwrap_or_default();
    let ttl = match ttl.as_str() {
        "" => String::new(),
        text => {
            let parsed = parse_go_duration(text)
                .map_err(|e| refused(format!("Session TTL '{text}' invalid: {e}")))?;
            if parsed.is_zero() {
                String::new()
            } else if parsed < MIN_TTL || parsed > MAX_TTL {
                return Err(refused(format!(
                    "Invalid Session TTL '{}', must be between [{}={}]",
                    parsed.as_nanos(),
                    format_go_duration(MIN_TTL),
                    format_go_duration(MAX_TTL)
                )));
            } else {
                format_go_duration(parsed)
            }
        }
    };
    // `Checks` (or `NodeChecks`) present replaces the default serfHealth,
    // `[]` included.
    let node_checks = input
        .nodechecks
        .or(input.checks)
        .unwrap_or_else(|| vec![switchyard_catalog::NODE_HEALTH_CHECK.to_string()]);
    Ok(Session {
        id: uuid::Uuid::new_v4().to_string(),
        name: input.name,
        node: input
            .node
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| state.agent.node_name.clone()),
        node_checks,
        service_checks: input
            .servicechecks
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect(),
        lock_delay_ms: lock_delay(input.lockdelay.as_ref())?.as_millis() as u64,
        behavior,
        ttl,
        create_index: 0,
        modify_index: 0,
    })
}

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay_ms as u128 * 1_000_000,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl,
        "NodeChecks": s.node_checks,
        "ServiceChecks": if s.service_checks.is_empty() {
            Value::Null
        } else {
            s.service_checks.iter().map(|id| json!({"ID": id, "Namespace": ""})).collect()
        },
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

pub(super) async fn create(State(state): St, body: Bytes) -> ApiResult {
    let session = session_from(&body, &state)?;
    let id = session.id.clone();
    let index = state.write(Command::SessionCreate(session)).await?;
    json(&json!({ "ID": id }), index, &QueryOpts::default())
}

pub(super) async fn destroy(State(state): St, Path(id): Path<String>) -> ApiResult {
    if id.is_empty() {
        return Err(ApiError::bad_request("Missing session"));
    }
    let index = state
        .write(Command::SessionDestroy {
            id: id.as_str().into(),
        })
        .await?;
    Ok(write_ok(index, Some("true")))
}

pub(super) async fn destroy_none() -> ApiResult {
    Err(ApiError::bad_request("Missing session"))
}

pub(super) async fn renew(State(state): St, Path(id): Path<String>) -> ApiResult {
    let index = state
        .write(Command::SessionRenew {
            id: id.as_str().into(),
        })
        .await?;
    let snap = state.registry.snapshot();
    let found: Vec<Value> = snap
        .sessions
        .get(&id)
        .map(|s| session_json(s))
        .into_iter()
        .collect();
    json(&found, index, &QueryOpts::default())
}

pub(super) async fn info(
    State(state): St,
    Path(id): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, None, |s| s.sessions.index).await?;
    let found: Vec<Value> = snap
        .sessions
        .get(&id)
        .map(|s| session_json(s))
        .into_iter()
        .collect();
    json(&found, index, &opts)
}

pub(super) async fn node(
    State(state): St,
    Path(node): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, None, |s| s.sessions.index).await?;
    let found: Vec<Value> = snap
        .sessions
        .iter()
        .filter(|s| s.node == node)
        .map(|s| session_json(s))
        .collect();
    json(&found, index, &opts)
}

pub(super) async fn list(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let (snap, index) = block(&state, &opts, None, |s| s.sessions.index).await?;
    let all: Vec<Value> = snap.sessions.iter().map(|s| session_json(s)).collect();
    json(&all, index, &opts)
}
