//! `/v1/switchyard/routes`: the proxy's routes managed through the API. A
//! route is the fields of a `[[http.routes]]` entry as JSON, kept in the KV
//! store under `ROUTES_PREFIX` (durable, shared by a cluster's agents). The
//! proxy checks a route and lists every route (`RouteBook`); this module
//! only moves them in and out of the store.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use switchyard_catalog::kv::ROUTES_PREFIX;
use switchyard_registry::Command;

use super::{json, ApiError, ApiResult, ApiState, QueryOpts};

/// Checks route `name`'s JSON: the bytes to store, or an error that names
/// the field.
pub type RouteCheck = Arc<dyn Fn(&str, &[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// What the API asks of the proxy about routes, without depending on it.
#[derive(Clone)]
pub struct RouteBook {
    pub check: RouteCheck,
    /// Every route (API, config and tags), where it came from, and the one
    /// that takes its requests when another holds its host and prefix.
    pub list: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

type St = State<Arc<ApiState>>;

fn book(state: &ApiState) -> Result<&RouteBook, ApiError> {
    state.routes.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this agent runs no HTTP proxy: it has no routes",
        )
    })
}

fn key(name: &str) -> String {
    format!("{ROUTES_PREFIX}{name}")
}

pub(super) async fn list(State(state): St) -> ApiResult {
    let book = book(&state)?;
    json(
        &(book.list)(),
        state.registry.snapshot().kv.prefix_index(ROUTES_PREFIX),
        &QueryOpts::default(),
    )
}

pub(super) async fn get(State(state): St, Path(name): Path<String>) -> ApiResult {
    book(&state)?;
    let snapshot = state.registry.snapshot();
    let Some(entry) = snapshot.kv.get(&key(&name)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route {name:?} (routes of the config and of tags are in GET /v1/switchyard/routes)"),
        ));
    };
    let route: serde_json::Value = serde_json::from_slice(&entry.value)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    json(
        &json!({ "name": name, "route": route, "index": entry.modify_index }),
        entry.modify_index,
        &QueryOpts::default(),
    )
}

pub(super) async fn put(State(state): St, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let book = book(&state)?;
    let value = (book.check)(&name, &body)
        .map_err(|e| ApiError::bad_request(format!("route {name:?} refused: {e}")))?;
    let index = state
        .write(Command::KvSet {
            key: key(&name),
            value,
            flags: 0,
            cas: None,
        })
        .await?;
    json(&json!({ "index": index }), index, &QueryOpts::default())
}

pub(super) async fn delete(State(state): St, Path(name): Path<String>) -> ApiResult {
    book(&state)?;
    if state.registry.snapshot().kv.get(&key(&name)).is_none() {
        return Ok((StatusCode::NOT_FOUND, format!("no route {name:?}\n")).into_response());
    }
    let index = state
        .write(Command::KvDelete {
            key: key(&name),
            recurse: false,
            cas: None,
        })
        .await?;
    json(&json!({ "index": index }), index, &QueryOpts::default())
}
