//! Requests for another datacenter (`?dc=NAME`): forwarded whole to one of
//! its agents and answered with its response, headers and all, blocking
//! queries included (the index is the remote one). A forwarded request is
//! never forwarded again, and a datacenter this agent has no entry for gets
//! Consul's "No path to datacenter".

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use switchyard_federation::{FederationError, FORWARDED_FROM};

use crate::{ApiError, ApiState};

/// Marks a response that another datacenter gave.
#[derive(Clone, Copy)]
pub(crate) struct Forwarded;

/// Consul's answer for a datacenter it cannot reach.
pub(crate) fn no_path(dc: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("No path to datacenter {dc:?}"),
    )
}

/// The reads and writes that name a datacenter; agent endpoints are this
/// agent's own, whatever `dc` says (as in Consul).
fn forwardable(path: &str) -> bool {
    if path == "/v1/catalog/datacenters" {
        return false;
    }
    [
        "/v1/catalog/",
        "/v1/health/",
        "/v1/status/",
        "/v1/query",
        "/v1/kv/",
        "/v1/switchyard/services",
    ]
    .iter()
    .any(|prefix| path.starts_with(prefix))
}

fn param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// How long the remote datacenter may take to answer: a blocking query's
/// wait (capped as this agent caps its own, plus the remote's jitter of up
/// to a sixteenth) and a margin; 30 s for anything else.
fn answer_within(state: &ApiState, query: Option<&str>) -> Duration {
    let blocking = param(query, "index").is_some_and(|i| i != "0" && !i.is_empty());
    if !blocking {
        return Duration::from_secs(30);
    }
    let wait = param(query, "wait")
        .and_then(|w| switchyard_catalog::parse_go_duration(w).ok())
        .unwrap_or(Duration::from_secs(300))
        .min(state.config.max_wait);
    wait + wait / 16 + Duration::from_secs(10)
}

/// The middleware: requests for this datacenter pass on; others go there.
pub(crate) async fn forward(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let query = request.uri().query();
    let Some(dc) = param(query, "dc").filter(|dc| !dc.is_empty()) else {
        return next.run(request).await;
    };
    if dc == state.agent.datacenter || !forwardable(request.uri().path()) {
        return next.run(request).await;
    }
    let dc = dc.to_string();
    if let Some(from) = request.headers().get(FORWARDED_FROM) {
        let from = String::from_utf8_lossy(from.as_bytes()).into_owned();
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "No path to datacenter {dc:?}: datacenter {from:?} sent this request to {:?}, which does not forward it again",
                state.agent.datacenter
            ),
        )
        .into_response();
    }
    let Some(federation) = state.federation.as_ref().filter(|f| f.knows(&dc)) else {
        return no_path(&dc).into_response();
    };
    let within = answer_within(&state, query);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let uri = parts.uri.clone();
    let request = Request::from_parts(parts, body);
    send(&state, federation, &dc, request, within, Some(&uri)).await
}

/// A write whose body names another datacenter (`Datacenter` in
/// `/v1/catalog/register` and `/deregister`), made there as Consul does.
pub(crate) async fn forward_write(
    state: &ApiState,
    dc: &str,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if headers.contains_key(FORWARDED_FROM) {
        return no_path(dc).into_response();
    }
    let Some(federation) = state.federation.as_ref().filter(|f| f.knows(dc)) else {
        return no_path(dc).into_response();
    };
    let mut request = Request::new(body);
    *request.method_mut() = axum::http::Method::PUT;
    *request.headers_mut() = headers.clone();
    match path.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return no_path(dc).into_response(),
    }
    send(
        state,
        federation,
        dc,
        request,
        Duration::from_secs(30),
        None,
    )
    .await
}

/// Sends `request` to `dc` and answers with its response (a refusal named
/// as the datacenter's; `stale_for`: a read that its copy may answer when
/// the datacenter is out of reach).
async fn send(
    state: &ApiState,
    federation: &switchyard_federation::Federation,
    dc: &str,
    request: Request<axum::body::Bytes>,
    within: Duration,
    stale_for: Option<&axum::http::Uri>,
) -> Response {
    let mut response = match federation.forward(dc, request, within).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            if parts.status == StatusCode::UNAUTHORIZED || parts.status == StatusCode::FORBIDDEN {
                // Say whose refusal it is: the client's token was checked there.
                let text = match body.collect().await {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    Err(_) => String::new(),
                };
                ApiError::new(
                    parts.status,
                    format!("datacenter {dc:?} refused the request: {}", text.trim()),
                )
                .into_response()
            } else {
                Response::from_parts(parts, Body::new(body))
            }
        }
        Err(error @ (FederationError::Unreachable { .. } | FederationError::Timeout { .. })) => {
            match stale_for.and_then(|uri| stale(state, dc, uri, &error)) {
                Some(answer) => answer,
                None => failed(dc, error),
            }
        }
        Err(error) => failed(dc, error),
    };
    response.extensions_mut().insert(Forwarded);
    response
}

/// The answer to a request another datacenter could not be asked for.
fn failed(dc: &str, error: FederationError) -> Response {
    let status = match error {
        FederationError::Unknown(_) => StatusCode::INTERNAL_SERVER_ERROR,
        FederationError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        FederationError::Unreachable { .. } | FederationError::Request { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    tracing::debug!(datacenter = %dc, %error, "forward failed");
    ApiError::new(status, error.to_string()).into_response()
}

/// A health or catalog read of a service in a datacenter out of reach,
/// answered from this agent's copy of it (routable endpoints only, as DNS
/// sees them), stale: `X-Consul-LastContact` is the time since the datacenter last
/// answered, `X-Consul-KnownLeader` false. None when there is no copy, or
/// when a blocking read's copy has nothing newer than the caller holds.
fn stale(
    state: &ApiState,
    dc: &str,
    uri: &axum::http::Uri,
    error: &FederationError,
) -> Option<Response> {
    let path = uri.path();
    let (name, health) = match path.strip_prefix("/v1/health/service/") {
        Some(name) => (name, true),
        None => (path.strip_prefix("/v1/catalog/service/")?, false),
    };
    let copies = state.copies.as_ref()?;
    let lower = name.to_ascii_lowercase();
    let switchyard_catalog::Copied::Ready(copy) =
        copies.copy(dc, switchyard_catalog::CopyOf::Service(&lower))
    else {
        return None;
    };
    let axum::extract::Query(pairs) =
        axum::extract::Query::<crate::Pairs>::try_from_uri(uri).ok()?;
    let opts = crate::QueryOpts::parse(&pairs).ok()?;
    let index = copy
        .service_ci(&lower)
        .map_or(1, |view| copy.service_index(&view.name));
    if opts.index != 0 && opts.index >= index {
        return None;
    }
    let mut answer = match health {
        true => crate::json(
            &crate::consul::health_entries(&copy, name, &opts, dc),
            index,
            &opts,
        ),
        false => crate::json(
            &crate::consul::catalog_entries(&copy, name, &opts, dc),
            index,
            &opts,
        ),
    }
    .ok()?;
    let age = state
        .federation
        .as_ref()
        .and_then(|f| f.last_contact(dc))
        .map_or(u64::MAX, |age| age.as_millis() as u64);
    let headers = answer.headers_mut();
    headers.insert(crate::LAST_CONTACT, age.into());
    headers.insert(
        crate::KNOWN_LEADER,
        axum::http::HeaderValue::from_static("false"),
    );
    tracing::debug!(datacenter = %dc, service = %name, %error, age_ms = age, "answered from the copy: the datacenter is out of reach");
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_endpoints_stay_local_and_catalog_reads_go() {
        assert!(forwardable("/v1/catalog/service/web"));
        assert!(forwardable("/v1/health/service/web"));
        assert!(forwardable("/v1/switchyard/services/web"));
        assert!(!forwardable("/v1/catalog/datacenters"));
        assert!(!forwardable("/v1/agent/services"));
        assert!(!forwardable("/v1/switchyard/nodes/n1/drain"));
    }

    #[test]
    fn parameters_are_found_by_whole_key() {
        assert_eq!(param(Some("index=5&dc=dc2"), "dc"), Some("dc2"));
        assert_eq!(param(Some("xdc=dc2"), "dc"), None);
        assert_eq!(param(Some("dc"), "dc"), Some(""));
        assert_eq!(param(None, "dc"), None);
    }
}
