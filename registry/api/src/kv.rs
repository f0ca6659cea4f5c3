//! Consul's key/value store: `GET`, `PUT` and `DELETE /v1/kv/<key>`
//! (CONSUL-KV.md §1), with locks (`acquire`, `release`) held by sessions.
//! Reads block on the key or prefix they name and wake only for changes
//! under it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::QueryOpts;
use super::{block, json_body, json_response, write_ok, ApiError, ApiResult, ApiState, Pairs};
use switchyard_catalog::kv::{KvEntry, MAX_VALUE_BYTES};
use switchyard_registry::{Command, RegistryError, WatchKey};

type St = State<Arc<ApiState>>;

fn has(pairs: &Pairs, key: &str) -> bool {
    pairs.iter().any(|(k, _)| k == key)
}

fn value<'a>(pairs: &'a Pairs, key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A key as stored: any non-empty text but one with a `.` or `..` path
/// segment (Consul's router cleans those paths, so no such key is stored
/// under that name; a key must not climb out of a prefix).
fn checked(key: &str) -> Result<&str, ApiError> {
    if key
        .split('/')
        .any(|segment| segment == ".." || segment == ".")
    {
        return Err(ApiError::bad_request(format!(
            "invalid key {key:?}: a key has no '.' or '..' path segment"
        )));
    }
    Ok(key)
}

/// `checked`, and not one of the keys only `/v1/switchyard/routes` writes.
fn writable(key: &str) -> Result<&str, ApiError> {
    if switchyard_catalog::kv::is_reserved(key) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "key {key:?} is under {:?}, written only through /v1/switchyard/routes",
                switchyard_catalog::kv::ROUTES_PREFIX
            ),
        ));
    }
    checked(key)
}

fn entry_json(e: &KvEntry) -> Value {
    let mut out = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if !e.session.is_empty() {
        out["Session"] = Value::String(e.session.clone());
    }
    out
}

/// Nothing there: 404 with an empty body and the read headers (clients
/// block on its index until the key appears).
fn not_found(index: u64, opts: &QueryOpts) -> Response {
    let mut response = json_response(Bytes::new(), index, opts);
    *response.status_mut() = StatusCode::NOT_FOUND;
    response.headers_mut().remove(header::CONTENT_TYPE);
    response
}

pub(super) async fn get(
    State(state): St,
    Path(key): Path<String>,
    Query(q): Query<Pairs>,
) -> ApiResult {
    read(&state, key, q).await
}

pub(super) async fn get_root(State(state): St, Query(q): Query<Pairs>) -> ApiResult {
    read(&state, String::new(), q).await
}

async fn read(state: &ApiState, key: String, q: Pairs) -> ApiResult {
    let opts = QueryOpts::parse(&q)?;
    let keys = has(&q, "keys");
    let recurse = keys || has(&q, "recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let key = checked(&key)?;
    let (snap, index) = block(state, &opts, Some(WatchKey::Kv(key)), |s| match recurse {
        true => s.kv.prefix_index(key),
        false => s.kv.key_index(key),
    })
    .await?;
    if keys {
        // `separator` wins over Consul's old misspelling.
        let separator = value(&q, "separator")
            .or_else(|| value(&q, "seperator"))
            .unwrap_or("");
        let mut out: Vec<&str> = Vec::new();
        for entry in snap.kv.under(key) {
            let rest = &entry.key[key.len()..];
            let cut = match separator {
                "" => entry.key.as_str(),
                sep => match rest.find(sep) {
                    Some(at) => &entry.key[..key.len() + at + sep.len()],
                    None => entry.key.as_str(),
                },
            };
            // Keys under one cut are contiguous in key order.
            if out.last() != Some(&cut) {
                out.push(cut);
            }
        }
        if out.is_empty() && !key.is_empty() {
            return Ok(not_found(index, &opts));
        }
        return Ok(json_response(json_body(&out, &opts)?, index, &opts));
    }
    if recurse {
        let all: Vec<Value> = snap.kv.under(key).map(|e| entry_json(e)).collect();
        if all.is_empty() {
            return Ok(not_found(index, &opts));
        }
        return Ok(json_response(json_body(&all, &opts)?, index, &opts));
    }
    let Some(entry) = snap.kv.get(key) else {
        return Ok(not_found(index, &opts));
    };
    if has(&q, "raw") {
        let mut response = json_response(Bytes::from(entry.value.clone()), index, &opts);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
        return Ok(response);
    }
    Ok(json_response(
        json_body(&[entry_json(entry)], &opts)?,
        index,
        &opts,
    ))
}

/// `cas`, `acquire` and `release` exclude one another.
fn conflicting(q: &Pairs, raw: &Option<String>, with: &[&str]) -> Result<(), ApiError> {
    if with.iter().filter(|k| has(q, k)).count() > 1 {
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}",
            raw.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

fn index_param(q: &Pairs, key: &str) -> Result<Option<u64>, ApiError> {
    value(q, key)
        .map(|v| {
            v.parse::<u64>().map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Failed to parse {key}: {e}"),
                )
            })
        })
        .transpose()
}

/// A write's answer: `true`, or `false` when its condition (`cas`) did
/// not hold.
async fn apply(state: &ApiState, command: Command) -> ApiResult {
    match state.registry.apply(command).await {
        Ok(index) => Ok(write_ok(index, Some("true"))),
        Err(RegistryError::Unmet(_)) => {
            Ok(write_ok(state.registry.snapshot().kv.index, Some("false")))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn put_root() -> ApiResult {
    Err(ApiError::bad_request("Missing key name"))
}

pub(super) async fn put(
    State(state): St,
    Path(key): Path<String>,
    Query(q): Query<Pairs>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult {
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    writable(&key)?;
    conflicting(&q, &raw, &["cas", "acquire", "release"])?;
    let flags = index_param(&q, "flags")?.unwrap_or(0);
    let cas = index_param(&q, "cas")?;
    if body.len() > MAX_VALUE_BYTES {
        // Vault recognises Consul's old text.
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Value exceeds {MAX_VALUE_BYTES} byte limit"),
        )
        .into_response();
        response.extensions_mut().insert(super::OwnLimit);
        return Ok(response);
    }
    let session = value(&q, "acquire").or_else(|| value(&q, "release"));
    if session == Some("") {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "missing session",
        ));
    }
    if let Some(session) = value(&q, "acquire") {
        let command = Command::KvLock {
            key,
            value: body.to_vec(),
            flags,
            session: session.to_string(),
        };
        return apply(&state, command).await;
    }
    if let Some(session) = value(&q, "release") {
        let command = Command::KvUnlock {
            key,
            value: body.to_vec(),
            flags,
            session: session.to_string(),
        };
        return apply(&state, command).await;
    }
    apply(
        &state,
        Command::KvSet {
            key,
            value: body.to_vec(),
            flags,
            cas,
        },
    )
    .await
}

pub(super) async fn delete(
    State(state): St,
    Path(key): Path<String>,
    Query(q): Query<Pairs>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    remove(&state, key, q, raw).await
}

pub(super) async fn delete_root(
    State(state): St,
    Query(q): Query<Pairs>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    remove(&state, String::new(), q, raw).await
}

async fn remove(state: &ApiState, key: String, q: Pairs, raw: Option<String>) -> ApiResult {
    let recurse = has(&q, "recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    writable(&key)?;
    conflicting(&q, &raw, &["recurse", "cas"])?;
    let cas = index_param(&q, "cas")?;
    // A delete that finds nothing changes nothing, and is `true`.
    apply(state, Command::KvDelete { key, recurse, cas }).await
}

/// One operation of `/v1/txn` as clients send it (keys folded).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct TxnIn {
    kv: Option<KvOpIn>,
    node: Option<Value>,
    service: Option<Value>,
    check: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct KvOpIn {
    verb: String,
    key: String,
    value: Option<String>,
    flags: u64,
    index: u64,
    session: String,
}

/// Consul's limits on a transaction (1.14 and later).
const MAX_TXN_OPS: usize = 128;
const MAX_TXN_BYTES: usize = 512 * 1024;

fn too_large(message: String) -> Response {
    let mut response = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    response.extensions_mut().insert(super::OwnLimit);
    response
}

/// `PUT /v1/txn` with KV operations: all applied or none. 200 with each
/// operation's result, or 409 naming every operation that failed.
pub(super) async fn txn(State(state): St, body: Bytes) -> ApiResult {
    if body.len() > MAX_TXN_BYTES {
        return Ok(too_large(format!(
            "Request body too large, max size: {MAX_TXN_BYTES} bytes"
        )));
    }
    let parsed: Vec<TxnIn> = super::decode::decode_body(&body)
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    if parsed.len() > MAX_TXN_OPS {
        return Ok(too_large(format!(
            "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
            parsed.len()
        )));
    }
    let mut ops = Vec::with_capacity(parsed.len());
    for (at, op) in parsed.into_iter().enumerate() {
        if op.node.is_some() || op.service.is_some() || op.check.is_some() {
            return Err(ApiError::bad_request(format!(
                "Failed to parse body: operation {at}: Switchyard's /v1/txn takes KV operations only"
            )));
        }
        let Some(kv) = op.kv else {
            return Err(ApiError::bad_request(format!(
                "Failed to parse body: operation {at} has no KV"
            )));
        };
        match kv.verb.as_str() {
            "get" | "get-tree" | "check-index" | "check-session" | "check-not-exists" => {
                checked(&kv.key)?
            }
            _ => writable(&kv.key)?,
        };
        let value = match kv.value.as_deref() {
            None | Some("") => Vec::new(),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| {
                    ApiError::bad_request(format!("Failed to parse body: operation {at}: {e}"))
                })?,
        };
        if value.len() > MAX_VALUE_BYTES {
            return Ok(too_large(format!(
                "Value for key {:?} is too large ({} > {MAX_VALUE_BYTES} bytes)",
                kv.key,
                value.len()
            )));
        }
        ops.push(switchyard_registry::TxnOp {
            verb: kv.verb,
            key: kv.key,
            value,
            flags: kv.flags,
            index: kv.index,
            session: kv.session,
        });
    }
    // Reads only: no write, no index (Consul's read-only transactions).
    let read_only = ops.iter().all(|op| {
        matches!(
            op.verb.as_str(),
            "get"
                | "get-or-empty"
                | "get-tree"
                | "check-index"
                | "check-session"
                | "check-not-exists"
        )
    });
    let out: switchyard_registry::TxnResults = Default::default();
    let applied = state
        .registry
        .apply(Command::KvTxn {
            ops,
            out: out.clone(),
        })
        .await;
    match applied {
        Ok(index) => {
            let results: Vec<Value> = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|r| {
                    let mut entry = r.entry.clone();
                    // A shared store numbers the write by its revision.
                    if r.written {
                        entry.modify_index = index;
                        if r.created {
                            entry.create_index = index;
                        }
                    }
                    json!({ "KV": entry_json(&entry) })
                })
                .collect();
            let body = json!({ "Results": results, "Errors": null });
            let mut response = json_response(
                json_body(&body, &QueryOpts::default())?,
                index,
                &QueryOpts::default(),
            );
            if read_only {
                response.headers_mut().remove("x-consul-index");
                response.extensions_mut().insert(super::NoIndex);
            }
            Ok(response)
        }
        Err(RegistryError::Txn(errors)) => {
            let errors: Vec<Value> = errors
                .into_iter()
                .map(|(at, what)| json!({ "OpIndex": at, "What": what }))
                .collect();
            let body = json!({ "Results": null, "Errors": errors });
            let mut response = json_response(
                json_body(&body, &QueryOpts::default())?,
                state.registry.snapshot().kv.index,
                &QueryOpts::default(),
            );
            *response.status_mut() = StatusCode::CONFLICT;
            Ok(response)
        }
        Err(e) => Err(e.into()),
    }
}
