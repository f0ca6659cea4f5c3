//! Switchyard's HTTP API, on the registry's public handle: Consul's agent/catalog/health/status subset, the
//! native `/v1/switchyard/...` API and `/metrics`, on axum.
//!
//! Reads answer from one snapshot. Blocking queries (`?index=&wait=`) compare
//! the *resource's own* index (a service, a node, a table), so a watcher of one
//! service is never answered because another one changed.

mod answers;
mod config;
mod consul;
mod decode;
mod federation;
mod filter;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod kv;
mod limits;
mod native;
mod query;
mod render;
mod routes;
pub mod serve;
mod session;
pub mod tls;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put, MethodRouter};
use axum::Router;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

pub use crate::answers::Answers;
pub use crate::config::{ApiConfig, ApiTlsConfig, Role, TokenConfig};
pub use crate::routes::{RouteBook, RouteCheck};
use switchyard_catalog::snapshot::Snapshot;
use switchyard_registry::Registry;
use switchyard_registry::RegistryError;
use switchyard_registry::WatchKey;

/// Facts about the agent the API reports (`/v1/agent/self`, status).
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub node_name: String,
    pub datacenter: String,
    /// Address other agents and clients reach this one at.
    pub advertise_addr: String,
    pub version: &'static str,
}

/// Everything a handler needs.
pub struct ApiState {
    pub registry: Registry,
    pub agent: AgentInfo,
    pub config: ApiConfig,
    pub prometheus: prometheus::Registry,
    /// Turns true when the agent starts shutting down: blocking queries answer at once.
    pub shutdown: watch::Receiver<bool>,
    /// Live traffic per endpoint (the proxy's counters), for drain status.
    pub load: Option<Arc<dyn switchyard_catalog::LoadReport>>,
    /// The API's tokens; none means every request is allowed.
    pub tokens: Tokens,
    /// The agent's listeners (the ready line), once all are bound.
    pub listeners: std::sync::OnceLock<serde_json::Value>,
    /// Bodies shared by blocking queries that ask the same.
    pub answers: Answers,
    /// The other datacenters (`[federation]`): `?dc=` requests go there.
    pub federation: Option<Arc<switchyard_federation::Federation>>,
    /// Their copies: a service read of a datacenter out of reach is
    /// answered from its copy, stale, with its age.
    pub copies: Option<Arc<dyn switchyard_catalog::Elsewhere>>,
    /// The xDS server's clients as JSON (`/v1/switchyard/xds`, status), when
    /// it runs.
    pub xds: Option<XdsView>,
    /// The proxy's checks and list of routes (`/v1/switchyard/routes`).
    pub routes: Option<routes::RouteBook>,
}

/// What the API shows of the xDS server, without depending on it.
pub type XdsView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl ApiState {
    /// Applies a client's write: checked and trimmed against the `[api]`
    /// limits first (a refusal names the limit and changes nothing).
    pub(crate) async fn write(
        &self,
        mut command: switchyard_registry::Command,
    ) -> Result<u64, ApiError> {
        limits::apply(&self.config, &mut command).map_err(ApiError::bad_request)?;
        Ok(self.registry.apply(command).await?)
    }
}

/// The API's tokens, their secrets loaded.
#[derive(Default)]
pub struct Tokens(Vec<(Vec<u8>, crate::config::Role, String)>);

impl Tokens {
    /// Loads every secret (inline or from its file).
    pub fn load(configs: &[crate::config::TokenConfig]) -> Result<Tokens, String> {
        let mut tokens = Vec::with_capacity(configs.len());
        for config in configs {
            let secret = config.load_secret()?;
            tokens.push((secret.into_bytes(), config.role, config.name.clone()));
        }
        Ok(Tokens(tokens))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is a token of `role` or a higher one.
    pub fn allows(&self, presented: &[u8], role: crate::config::Role) -> bool {
        self.role_of(presented).is_some_and(|r| r >= role)
    }

    /// The role of `presented`, comparing against every secret in constant
    /// time (a mismatch reveals no prefix).
    fn role_of(&self, presented: &[u8]) -> Option<crate::config::Role> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for (secret, role, _) in &self.0 {
            if bool::from(secret.as_slice().ct_eq(presented)) {
                found = Some(*role);
            }
        }
        found
    }
}

/// Who may call a route, declared where the route is registered: reads
/// (GET, HEAD) always need `read`; a route's other methods need the role it
/// names. `Public` routes (the dashboard's pages and assets) check nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Public,
    /// Read-only routes: `read`.
    Read,
    /// Reads need `read`, writes this role.
    Writes(crate::config::Role),
}

impl Access {
    fn needed(self, method: &axum::http::Method) -> Option<crate::config::Role> {
        use axum::http::Method;
        match self {
            Access::Public => None,
            Access::Read => Some(crate::config::Role::Read),
            _ if method == Method::GET || method == Method::HEAD => Some(crate::config::Role::Read),
            Access::Writes(role) => Some(role),
        }
    }
}

/// A route's access rule with the state the check needs.
#[derive(Clone)]
struct Guard {
    state: Arc<ApiState>,
    access: Access,
}

/// `routes` behind `access`: a request without the role it needs reaches no
/// handler (with tokens configured).
fn guarded(
    state: &Arc<ApiState>,
    access: Access,
    routes: MethodRouter<Arc<ApiState>>,
) -> MethodRouter<Arc<ApiState>> {
    let guard = Guard {
        state: state.clone(),
        access,
    };
    routes.route_layer(middleware::from_fn_with_state(guard, authorize))
}

/// The token a request carries: `X-Consul-Token`, `Authorization: Bearer`,
/// or `?token=` (as Consul accepts them).
fn presented_token(request: &Request) -> Option<&[u8]> {
    token_in(request.headers(), request.uri().query())
}

fn token_in<'a>(headers: &'a axum::http::HeaderMap, query: Option<&'a str>) -> Option<&'a [u8]> {
    if let Some(token) = headers.get("x-consul-token") {
        return Some(token.as_bytes());
    }
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    {
        return Some(bearer);
    }
    query.and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(str::as_bytes)
    })
}

/// Refuses requests without a token of the role their route needs (when
/// tokens are configured). A refused request reaches no handler.
async fn authorize(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let Guard { state, access } = guard;
    let Some(needed) = access.needed(request.method()) else {
        return next.run(request).await;
    };
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let refusal = match presented_token(&request) {
        None => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "ACL not found: this agent requires a token (X-Consul-Token header, Authorization: Bearer, or ?token=)",
        )),
        Some(token) => match state.tokens.role_of(token) {
            None => Some(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "ACL not found: the token is not known to this agent",
            )),
            Some(role) if role < needed => Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission denied: a {} token cannot {} {}; it needs the {} role",
                    role.as_str(),
                    request.method(),
                    request.uri().path(),
                    needed.as_str()
                ),
            )),
            Some(_) => {
                if let Some(connection) = request.extensions().get::<serve::Connection>() {
                    connection.authenticated();
                }
                None
            }
        },
    };
    match refusal {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    }
}

/// A Consul service definition, as `/v1/agent/service/register` takes it
/// (JSON, keys in any case or snake_case, with `Check`/`Checks`), turned into
/// the command that registers it on `node`, replacing the checks it had.
/// The agent's config file uses it, so a service defined there behaves as
/// one registered through the API.
pub fn service_definition(
    node: &str,
    json: &[u8],
) -> Result<switchyard_registry::Command, DefinitionError> {
    let def: decode::ServiceIn = decode::decode_at(json).map_err(|e| DefinitionError {
        message: e.to_string(),
        field: e.path,
    })?;
    let (endpoint, checks) =
        def.into_endpoint(&node.into(), false)
            .map_err(|message| DefinitionError {
                field: None,
                message,
            })?;
    Ok(switchyard_registry::Command::RegisterService {
        endpoint,
        checks,
        replace_existing_checks: true,
    })
}

/// A service definition that was refused: why, and the field at fault when
/// the decoder knows it (so that a config file can point at its line).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DefinitionError {
    /// The field's path inside the definition (`check.interval`,
    /// `checks[1].ttl`), keys in lower case.
    pub field: Option<String>,
    pub message: String,
}

/// Whether `request` may read: no tokens are configured, or it presents
/// one with at least the read role.
fn may_read(state: &ApiState, request_token: Option<&[u8]>) -> bool {
    state.tokens.is_empty()
        || request_token
            .and_then(|t| state.tokens.role_of(t))
            .is_some()
}

/// Builds the API router.
pub fn router(state: Arc<ApiState>) -> Router {
    use crate::config::Role::{Operator, Register};
    use Access::{Public, Read, Writes};
    let limit = state.config.max_body_bytes;
    let reads = |routes| guarded(&state, Read, routes);
    let register = |routes| guarded(&state, Writes(Register), routes);
    let operator = |routes| guarded(&state, Writes(Operator), routes);
    // The dashboard's pages and assets load without a token (a browser
    // navigation carries none); they show data only to a request that
    // presents a read token, which their script sends with every refresh.
    let public = |routes| guarded(&state, Public, routes);
    Router::new()
        .route("/v1/agent/self", reads(get(consul::agent_self)))
        .route("/v1/agent/members", reads(get(consul::agent_members)))
        .route("/v1/agent/metrics", reads(get(consul::agent_metrics)))
        .route(
            "/v1/agent/health/service/name/{name}",
            reads(get(consul::agent_health_by_name)),
        )
        .route(
            "/v1/agent/health/service/id/{id}",
            reads(get(consul::agent_health_by_id)),
        )
        .route(
            "/v1/catalog/node-services/{*name}",
            reads(get(consul::catalog_node_services)),
        )
        .route("/v1/agent/services", reads(get(consul::agent_services)))
        .route("/v1/agent/checks", reads(get(consul::agent_checks)))
        .route(
            "/v1/agent/service/register",
            register(put(consul::service_register)),
        )
        .route(
            "/v1/agent/service/deregister/{*id}",
            register(put(consul::service_deregister)),
        )
        .route(
            "/v1/agent/service/maintenance/{*id}",
            operator(put(consul::service_maintenance)),
        )
        .route("/v1/agent/service/{*id}", reads(get(consul::agent_service)))
        .route(
            "/v1/agent/maintenance",
            operator(put(consul::node_maintenance)),
        )
        .route(
            "/v1/agent/check/register",
            register(put(consul::check_register)),
        )
        .route(
            "/v1/agent/check/deregister/{*id}",
            register(put(consul::check_deregister)),
        )
        .route(
            "/v1/agent/check/pass/{*id}",
            register(put(consul::check_pass)),
        )
        .route(
            "/v1/agent/check/warn/{*id}",
            register(put(consul::check_warn)),
        )
        .route(
            "/v1/agent/check/fail/{*id}",
            register(put(consul::check_fail)),
        )
        .route(
            "/v1/agent/check/update/{*id}",
            register(put(consul::check_update)),
        )
        .route(
            "/v1/catalog/register",
            register(put(consul::catalog_register)),
        )
        .route(
            "/v1/catalog/deregister",
            register(put(consul::catalog_deregister)),
        )
        .route(
            "/v1/catalog/datacenters",
            reads(get(consul::catalog_datacenters)),
        )
        .route("/v1/catalog/services", reads(get(consul::catalog_services)))
        .route(
            "/v1/catalog/service/{*name}",
            reads(get(consul::catalog_service)),
        )
        .route("/v1/catalog/nodes", reads(get(consul::catalog_nodes)))
        .route("/v1/catalog/node/{*name}", reads(get(consul::catalog_node)))
        .route(
            "/v1/health/service/{*name}",
            reads(get(consul::health_service)),
        )
        .route(
            "/v1/health/checks/{*name}",
            reads(get(consul::health_checks)),
        )
        .route("/v1/health/state/{state}", reads(get(consul::health_state)))
        .route("/v1/health/node/{*name}", reads(get(consul::health_node)))
        .route(
            "/v1/kv",
            register(get(kv::get_root).put(kv::put_root).delete(kv::delete_root)),
        )
        .route(
            "/v1/kv/",
            register(get(kv::get_root).put(kv::put_root).delete(kv::delete_root)),
        )
        .route(
            "/v1/kv/{*key}",
            register(get(kv::get).put(kv::put).delete(kv::delete)),
        )
        .route("/v1/txn", register(put(kv::txn)))
        .route("/v1/session/create", register(put(session::create)))
        .route("/v1/session/destroy/", register(put(session::destroy_none)))
        .route("/v1/session/destroy/{id}", register(put(session::destroy)))
        .route("/v1/session/renew/{id}", register(put(session::renew)))
        .route("/v1/session/info/{id}", reads(get(session::info)))
        .route("/v1/session/node/{node}", reads(get(session::node)))
        .route("/v1/session/list", reads(get(session::list)))
        .route("/v1/query", register(get(query::list).post(query::create)))
        .route(
            "/v1/query/{id}",
            register(get(query::read).put(query::update).delete(query::delete)),
        )
        .route("/v1/query/{id}/execute", reads(get(query::execute)))
        .route("/v1/query/{id}/explain", reads(get(query::explain)))
        .route("/v1/status/leader", reads(get(consul::status_leader)))
        .route("/v1/status/peers", reads(get(consul::status_peers)))
        .route("/v1/switchyard/status", reads(get(native::status)))
        .route("/v1/switchyard/xds", reads(get(native::xds)))
        .route("/v1/switchyard/routes", reads(get(routes::list)))
        .route(
            "/v1/switchyard/routes/{name}",
            operator(get(routes::get).put(routes::put).delete(routes::delete)),
        )
        .route(
            "/v1/switchyard/datacenters",
            reads(get(native::datacenters)),
        )
        .route(
            "/v1/switchyard/batch",
            register(put(native::batch).post(native::batch)),
        )
        .route(
            "/v1/switchyard/heartbeat",
            register(put(native::heartbeat).post(native::heartbeat)),
        )
        .route("/v1/switchyard/services", reads(get(native::services)))
        .route(
            "/v1/switchyard/watch",
            reads(axum::routing::post(native::watch)),
        )
        .route(
            "/v1/switchyard/services/{name}",
            reads(get(native::service)),
        )
        .route("/v1/switchyard/nodes", reads(get(native::nodes)))
        .route(
            "/v1/switchyard/nodes/{node}/drain",
            operator(
                get(native::drain_status)
                    .put(native::drain)
                    .delete(native::undrain),
            ),
        )
        .route(
            "/v1/switchyard/endpoints/{id}/drain",
            operator(
                get(native::endpoint_drain_status)
                    .put(native::endpoint_drain)
                    .delete(native::endpoint_undrain),
            ),
        )
        .route(
            "/v1/switchyard/nodes/{node}/maintenance",
            operator(put(native::node_maintenance)),
        )
        .route(
            "/v1/switchyard/endpoints/{id}/maintenance",
            operator(put(native::endpoint_maintenance)),
        )
        .route("/metrics", reads(get(native::metrics)))
        .route("/ui", public(get(ui::to_index)))
        .route("/ui/", public(get(ui::services)))
        .route("/ui/services/{name}", public(get(ui::service)))
        .route("/ui/nodes", public(get(ui::nodes)))
        .route("/ui/datacenters", public(get(ui::datacenters)))
        .route("/ui/xds", public(get(ui::xds)))
        .route("/ui/assets/{file}", public(get(ui::asset)))
        .fallback(unimplemented)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            federation::forward,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            common_headers,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The router of the dedicated metrics listener (`api.metrics_addr`):
/// `/metrics` alone, behind the same tokens.
pub fn metrics_router(state: Arc<ApiState>) -> Router {
    let metrics = guarded(&state, Access::Read, get(native::metrics));
    Router::new()
        .route("/metrics", metrics)
        .fallback(not_found)
        .with_state(state)
}

/// The `method` label of `switchyard_api_requests_total`: the methods the
/// API serves, and `other` for anything a client may invent (labels from
/// unauthenticated input must stay a bounded set).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// A Consul endpoint Switchyard does not have (sessions, events, Connect,
/// ACL management, snapshots, …): 501 naming it. Never 404, which clients
/// read as "no such key" and go on with nothing.
async fn unimplemented(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    if !path.starts_with("/v1/") {
        return ApiError::new(StatusCode::NOT_FOUND, "no such endpoint");
    }
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "Switchyard does not implement {method} {path} (docs/compatibility.md lists the Consul API it has)"
        ),
    )
}

/// An answer that carries no `X-Consul-Index` (a read-only transaction's,
/// as in Consul).
#[derive(Clone, Copy)]
pub(crate) struct NoIndex;

/// On a 413 a handler wrote itself (a limit of its own, such as a KV
/// value's): its text stands.
#[derive(Clone, Copy)]
pub(crate) struct OwnLimit;

/// Consul's headers on every response, and request counting.
async fn common_headers(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let too_large = || {
        // axum's own text does not say which limit or how to raise it.
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over {} bytes (api.max_body_bytes)",
                state.config.max_body_bytes
            ),
        )
        .into_response()
    };
    let gzip = accepts_gzip(request.headers());
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut response = if declared.is_some_and(|n| n > state.config.max_body_bytes as u64) {
        // Refused before a byte of the body is read; the connection closes,
        // so the client stops sending.
        let mut response = too_large();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    } else {
        let response = next.run(request).await;
        if response.status() == StatusCode::PAYLOAD_TOO_LARGE
            && response.extensions().get::<OwnLimit>().is_none()
        {
            too_large()
        } else {
            response
        }
    };
    let code = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state
        .registry
        .metrics()
        .api_requests
        .with_label_values(&[method, code])
        .inc();
    if gzip {
        if let Some(answers::SharedAnswer(shared)) = response.extensions_mut().remove() {
            *response.body_mut() = axum::body::Body::from(shared.gzip());
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    let forwarded = response
        .extensions()
        .get::<federation::Forwarded>()
        .is_some();
    let unindexed = response.extensions().get::<NoIndex>().is_some();
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if forwarded {
        // Another datacenter's answer: its X-Consul-* headers stand.
        return response;
    }
    if !headers.contains_key(X_CONSUL_INDEX) && !unindexed {
        let index = state.registry.snapshot().index().max(1);
        headers.insert(X_CONSUL_INDEX, HeaderValue::from(index));
    }
    // What this agent's reads stand on: the store (etcd in cluster mode) in
    // reach or not, and how long since it was last heard from.
    let store = state.registry.store_status();
    let known = match store.connected() {
        true => "true",
        false => "false",
    };
    headers.insert(KNOWN_LEADER, HeaderValue::from_static(known));
    let last_contact = store.staleness().as_millis() as u64;
    headers.insert(LAST_CONTACT, HeaderValue::from(last_contact));
    let policy = match state.tokens.is_empty() {
        true => "allow",
        false => "deny",
    };
    headers.insert(ACL_POLICY, HeaderValue::from_static(policy));
    response
}

/// Whether `Accept-Encoding` takes gzip (not with `q=0`).
fn accepts_gzip(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

const X_CONSUL_INDEX: HeaderName = HeaderName::from_static("x-consul-index");
const KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
const LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");
const CONSISTENCY: HeaderName = HeaderName::from_static("x-consul-effective-consistency");
const ACL_POLICY: HeaderName = HeaderName::from_static("x-consul-default-acl-policy");

/// An error answered as plain text with a status, Consul style.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> ApiError {
        let status = match &err {
            RegistryError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Unmet(_) | RegistryError::Txn(_) => StatusCode::CONFLICT,
            RegistryError::NotTtl(_) | RegistryError::Refused(_) | RegistryError::Store(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            RegistryError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.message).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// Query parameters shared by reads. Flags are present-or-absent like Consul's.
#[derive(Debug, Default)]
struct QueryOpts {
    index: u64,
    wait: Option<Duration>,
    pretty: bool,
    consistency: &'static str,
    tags: Vec<String>,
    node_meta: Vec<(String, String)>,
    passing: bool,
    /// `?filter=`, on the endpoints that take one.
    filter: Option<Arc<filter::Filter>>,
}

type Pairs = Vec<(String, String)>;

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl QueryOpts {
    fn parse(pairs: &Pairs) -> Result<QueryOpts, ApiError> {
        QueryOpts::parse_with(pairs, None)
    }

    /// `parse` for an endpoint that takes `?filter=`, over rows of `shape`.
    fn parse_filtered(pairs: &Pairs, shape: filter::Field) -> Result<QueryOpts, ApiError> {
        QueryOpts::parse_with(pairs, Some(shape))
    }

    /// Whether a row passes `?filter=` (all do without one).
    fn admits<T: Serialize>(&self, row: &T) -> bool {
        match &self.filter {
            None => true,
            Some(filter) => serde_json::to_value(row).is_ok_and(|v| filter.admits(&v)),
        }
    }

    fn parse_with(pairs: &Pairs, shape: Option<filter::Field>) -> Result<QueryOpts, ApiError> {
        let mut opts = QueryOpts {
            consistency: "leader",
            ..QueryOpts::default()
        };
        let (mut stale, mut consistent, mut cached) = (false, false, false);
        for (key, value) in pairs {
            match key.as_str() {
                "index" => {
                    opts.index = value
                        .parse()
                        .map_err(|_| ApiError::bad_request("Invalid index"))?
                }
                "wait" => {
                    let wait = switchyard_catalog::duration::parse_go_duration(value)
                        .map_err(|_| ApiError::bad_request("Invalid wait time"))?;
                    opts.wait = Some(wait);
                }
                "pretty" => opts.pretty = true,
                "stale" => stale = true,
                "consistent" => consistent = true,
                "cached" => cached = true,
                "tag" => opts.tags.push(value.clone()),
                "node-meta" => {
                    let (k, v) = value.split_once(':').unwrap_or((value.as_str(), ""));
                    opts.node_meta.push((k.to_string(), v.to_string()));
                }
                "passing" => {
                    opts.passing = parse_bool(value)
                        .ok_or_else(|| ApiError::bad_request("Invalid value for ?passing"))?
                }
                "filter" if !value.is_empty() => {
                    // A client that filters must never get everything.
                    let Some(shape) = shape else {
                        return Err(ApiError::bad_request(
                            "filter expressions are not supported on this endpoint (they are on health/service, catalog/service, catalog/services, catalog/nodes and agent/services)",
                        ));
                    };
                    let parsed = filter::Filter::parse(value).map_err(ApiError::bad_request)?;
                    parsed.check(shape).map_err(ApiError::bad_request)?;
                    opts.filter = Some(Arc::new(parsed));
                }
                _ => {}
            }
        }
        if stale && consistent {
            return Err(ApiError::bad_request(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if cached && consistent {
            return Err(ApiError::bad_request(
                "Cannot specify ?cached with ?consistent, conflicting semantics.",
            ));
        }
        if stale {
            opts.consistency = "stale";
        } else if consistent {
            opts.consistency = "consistent";
        }
        // `dc` naming another datacenter was forwarded there
        // (`federation::forward`) or is ignored, as Consul's agent
        // endpoints ignore it.
        Ok(opts)
    }

    fn node_meta_matches(&self, meta: &std::collections::BTreeMap<String, String>) -> bool {
        self.node_meta
            .iter()
            .all(|(k, v)| meta.get(k).is_some_and(|have| have == v))
    }
}

/// Counts a waiting blocking query for as long as it lives.
pub(crate) struct BlockingGuard<'a>(pub(crate) &'a prometheus::IntGauge);

impl Drop for BlockingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits until `index_of(snapshot)` exceeds `opts.index` or the wait ends,
/// and returns the snapshot to answer from with that resource's index.
/// With a `key`, only publishes that touched that service or node wake it;
/// without, every publish does (table-wide reads).
async fn block(
    state: &ApiState,
    opts: &QueryOpts,
    key: Option<WatchKey<'_>>,
    index_of: impl Fn(&Snapshot) -> u64,
) -> Result<(Arc<Snapshot>, u64), ApiError> {
    let snapshot = state.registry.snapshot();
    let index = index_of(&snapshot).max(1);
    if opts.index == 0 || index > opts.index {
        return Ok((snapshot, index));
    }
    let metrics = state.registry.metrics();
    let gauge = &metrics.blocking_queries;
    if gauge.get() as usize >= state.config.max_blocking_queries {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many blocking queries (limit {}, api.max_blocking_queries); retry later",
                state.config.max_blocking_queries
            ),
        ));
    }
    gauge.inc();
    let _guard = BlockingGuard(gauge);
    let wait = opts
        .wait
        .unwrap_or(Duration::from_secs(300))
        .min(state.config.max_wait);
    let jitter = wait.as_millis() as u64 / 16;
    let jitter = Duration::from_millis(if jitter > 0 {
        fastrand::u64(0..jitter)
    } else {
        0
    });
    let deadline = Instant::now() + wait + jitter;
    let mut shutdown = state.shutdown.clone();
    let mut changes = state.registry.subscribe();
    let notify = key.map(|key| state.registry.watch_key(key));
    loop {
        // Arm the wake-up first, then look: a publish in between is not missed.
        changes.borrow_and_update();
        let keyed = notify.as_ref().map(|n| n.notified());
        let mut keyed = std::pin::pin!(keyed);
        if let Some(notified) = keyed.as_mut().as_pin_mut() {
            notified.enable();
        }
        let snapshot = state.registry.snapshot();
        let index = index_of(&snapshot).max(1);
        if index > opts.index {
            return Ok((snapshot, index));
        }
        let woke = tokio::select! {
            () = async {
                match keyed.as_mut().as_pin_mut() {
                    Some(notified) => notified.await,
                    None => {
                        let _ = changes.changed().await;
                    }
                }
            } => true,
            () = tokio::time::sleep_until(deadline) => false,
            _ = shutdown.wait_for(|down| *down) => false,
        };
        if !woke {
            break;
        }
        metrics.blocking_wakeups.inc();
    }
    let snapshot = state.registry.snapshot();
    let index = index_of(&snapshot).max(1);
    Ok((snapshot, index))
}

/// A JSON answer with Consul's read headers.
fn json<T: Serialize>(value: &T, index: u64, opts: &QueryOpts) -> ApiResult {
    Ok(json_response(json_body(value, opts)?, index, opts))
}

/// A read's JSON answer, for a blocking query rendered once per snapshot
/// and shared by every query with the same `(route, name, parameters)`
/// (see `answers.rs`); `build` makes the value when a render is needed.
async fn shared_json<T: Serialize>(
    state: &ApiState,
    (route, name, pairs): (&str, &str, &Pairs),
    snapshot: &Snapshot,
    index: u64,
    opts: &QueryOpts,
    build: impl FnOnce() -> T,
) -> ApiResult {
    if opts.index == 0 {
        return json(&build(), index, opts);
    }
    let key = answers::key(route, name, pairs);
    let shared = state
        .answers
        .get(key, snapshot.index(), || json_body(&build(), opts))
        .await?;
    let mut response = json_response(shared.body.clone(), index, opts);
    response
        .extensions_mut()
        .insert(answers::SharedAnswer(shared));
    Ok(response)
}

fn json_body<T: Serialize>(value: &T, opts: &QueryOpts) -> Result<Bytes, ApiError> {
    if opts.pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    }
    .map(Bytes::from)
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn json_response(body: Bytes, index: u64, opts: &QueryOpts) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(X_CONSUL_INDEX, HeaderValue::from(index.max(1)));
    headers.insert(CONSISTENCY, HeaderValue::from_static(opts.consistency));
    response
}

/// A write's answer: 200 with an optional JSON body (Consul returns `true`
/// from the catalog endpoints and nothing from the agent ones).
fn write_ok(index: u64, body: Option<&'static str>) -> Response {
    let mut response = match body {
        Some(body) => (StatusCode::OK, body).into_response(),
        None => StatusCode::OK.into_response(),
    };
    let headers = response.headers_mut();
    if body.is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(X_CONSUL_INDEX, HeaderValue::from(index.max(1)));
    response
}
