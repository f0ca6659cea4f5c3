//! The operator's dashboard at `/ui/`: server-rendered HTML pages (services,
//! one service, nodes) and a small script that re-fetches the page's main
//! part every two seconds (`?fragment=1`), computes request rates from two
//! readings, and sends the drain and maintenance buttons to the native API.
//!
//! Pages load without a token (a browser navigation carries none) and show
//! data only to a request with a read token; the script keeps the token the
//! operator typed in session storage and sends it as `X-Consul-Token`, so the
//! buttons pass the API's role checks like any other client.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};

use super::native::drain_progress;
use super::{ApiState, Pairs};
use switchyard_catalog::model::{unix_ms, NODE_MAINTENANCE_CHECK, SERVICE_MAINTENANCE_PREFIX};
use switchyard_catalog::snapshot::{EndpointState, Instance, Snapshot, StateCounts};

type St = State<Arc<ApiState>>;

/// Rows a table shows before asking for a narrower filter.
const MAX_ROWS: usize = 1000;

pub(super) async fn to_index() -> Redirect {
    Redirect::permanent("/ui/")
}

/// What one request to a page asks for.
struct View<'a> {
    state: &'a ApiState,
    /// Just the refreshed part (`?fragment=1`), not the whole page.
    fragment: bool,
    /// It presented a token that may read (or none is needed).
    may_read: bool,
    /// `?q=`: only names containing it.
    filter: String,
}

impl<'a> View<'a> {
    fn new(state: &'a ApiState, headers: &HeaderMap, uri: &Uri, q: &Pairs) -> View<'a> {
        let value = |key: &str| q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        View {
            state,
            fragment: value("fragment").is_some(),
            may_read: super::may_read(state, super::token_in(headers, uri.query())),
            filter: value("q").unwrap_or("").trim().to_lowercase(),
        }
    }

    fn shows(&self, name: &str) -> bool {
        self.filter.is_empty() || name.to_lowercase().contains(&self.filter)
    }

    /// The answer: the main part alone, or the whole page around it.
    fn respond(&self, title: &str, tab: Tab, main: impl FnOnce(&mut String)) -> Response {
        if !self.may_read {
            if self.fragment {
                return html(StatusCode::UNAUTHORIZED, LOGIN.to_string());
            }
            return html(
                StatusCode::OK,
                page(self.state, title, tab, &self.filter, LOGIN),
            );
        }
        let mut body = String::with_capacity(16 << 10);
        main(&mut body);
        if self.fragment {
            return html(StatusCode::OK, body);
        }
        html(
            StatusCode::OK,
            page(self.state, title, tab, &self.filter, &body),
        )
    }
}

const LOGIN: &str = r#"<section class="login"><p>This agent requires an API token with the <b>read</b> role (drain and maintenance need <b>operator</b>).</p><form id="login" method="post"><input type="password" name="token" placeholder="token" autocomplete="off"> <button type="submit">Use token</button></form></section>"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Services,
    Nodes,
    Datacenters,
    Xds,
}

fn page(state: &ApiState, title: &str, tab: Tab, filter: &str, main: &str) -> String {
    let active = |t: Tab| if t == tab { " class=\"active\"" } else { "" };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Switchyard</title><link rel="stylesheet" href="/ui/assets/style.css"></head>
<body><header><a class="brand" href="/ui/">Switchyard</a><nav><a href="/ui/"{s}>Services</a><a href="/ui/nodes"{n}>Nodes</a><a href="/ui/datacenters"{d}>Datacenters</a><a href="/ui/xds"{x}>xDS</a></nav>
<form class="filter" method="get"><input type="search" name="q" value="{filter}" placeholder="filter by name"></form>
<label class="deadline">drain deadline <select id="deadline"><option value="">none</option><option>30s</option><option selected>5m</option><option>30m</option><option>2h</option></select></label>
<span class="agent">node <b>{node}</b> · {dc} · v{version}</span><span id="live" class="live">…</span></header>
<div id="flash" role="alert" hidden></div>
<main id="main">{main}</main>
<script src="/ui/assets/app.js"></script></body></html>
"#,
        title = Esc(title),
        s = active(Tab::Services),
        n = active(Tab::Nodes),
        d = active(Tab::Datacenters),
        x = active(Tab::Xds),
        filter = Esc(filter),
        node = Esc(&state.agent.node_name),
        dc = Esc(&state.agent.datacenter),
        version = state.agent.version,
    )
}

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(headers);
    response
}

/// No inline script or style, no framing (the buttons drain nodes).
fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

pub(super) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    secure(headers);
    response
}

const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// One line about the catalog above every page's tables.
fn summary(out: &mut String, state: &ApiState, snap: &Snapshot) {
    let metrics = state.registry.metrics();
    let store = state.registry.store_status();
    let _ = write!(
        out,
        r#"<p class="summary">index <b>{}</b> · store {} · snapshot published {} ago · {} nodes · {} services · {} endpoints"#,
        snap.index(),
        state.registry.store_kind(),
        Age(metrics.snapshot_age().as_millis() as u64),
        snap.node_count(),
        snap.service_count(),
        snap.counts().total(),
    );
    if state.registry.shared() && !store.connected() {
        let _ = write!(
            out,
            r#" · <span class="badge s-critical">store unreachable for {}: answering from the last catalog</span>"#,
            Age(store.staleness().as_millis() as u64)
        );
    }
    out.push_str("</p>");
}

fn counts_cells(out: &mut String, counts: &StateCounts) {
    for state in EndpointState::ALL {
        let n = counts.get(state);
        let class = if n == 0 { "num zero" } else { "num" };
        let _ = write!(out, r#"<td class="{class}">{n}</td>"#);
    }
}

pub(super) async fn services(
    State(state): St,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<Pairs>,
) -> Response {
    let view = View::new(&state, &headers, &uri, &q);
    view.respond("Services", Tab::Services, |out| {
        let snap = state.registry.snapshot();
        summary(out, &state, &snap);
        out.push_str(r#"<table id="services"><thead><tr><th>Service</th><th class="num">Endpoints</th><th class="num">Routable</th>"#);
        for s in EndpointState::ALL {
            let _ = write!(out, r#"<th class="num">{}</th>"#, s.as_str());
        }
        out.push_str("<th>Tags</th></tr></thead><tbody>");
        let mut rows = Rows::default();
        for service in snap.services_sorted() {
            if !view.shows(&service.name) || !rows.admit() {
                continue;
            }
            let _ = write!(
                out,
                r#"<tr data-service="{name}"><td><a href="/ui/services/{seg}">{name}</a></td><td class="num">{total}</td><td class="num">{routable}</td>"#,
                name = Esc(&service.name),
                seg = Seg(&service.name),
                total = service.counts.total(),
                routable = service.routable_len(),
            );
            counts_cells(out, &service.counts);
            out.push_str(r#"<td class="tags">"#);
            for tag in service.tags().take(8) {
                let _ = write!(out, "<code>{}</code> ", Esc(tag));
            }
            if service.tag_count() > 8 {
                let _ = write!(out, "+{}", service.tag_count() - 8);
            }
            out.push_str("</td></tr>");
        }
        if rows.shown == 0 {
            out.push_str(r#"<tr><td colspan="9" class="empty">No services"#);
            if !view.filter.is_empty() {
                out.push_str(" match the filter");
            }
            out.push_str(".</td></tr>");
        }
        out.push_str("</tbody></table>");
        rows.finish(out);
    })
}

/// Counts a table's rows: the first `MAX_ROWS` are shown, the rest only counted.
#[derive(Default)]
struct Rows {
    shown: usize,
    hidden: usize,
}

impl Rows {
    /// Whether the next row is shown.
    fn admit(&mut self) -> bool {
        if self.shown == MAX_ROWS {
            self.hidden += 1;
            return false;
        }
        self.shown += 1;
        true
    }

    /// Says how many rows were left out, if any.
    fn finish(&self, out: &mut String) {
        if self.hidden > 0 {
            let _ = write!(
                out,
                r#"<p class="more">{} more not shown: narrow the list with the filter.</p>"#,
                self.hidden
            );
        }
    }
}

pub(super) async fn service(
    State(state): St,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<Pairs>,
) -> Response {
    let view = View::new(&state, &headers, &uri, &q);
    let title = format!("Service {name}");
    view.respond(&title, Tab::Services, |out| {
        let snap = state.registry.snapshot();
        summary(out, &state, &snap);
        let Some(service) = snap.service(&name) else {
            let _ = write!(
                out,
                r#"<h1>{}</h1><p class="empty">No such service (any more).</p>"#,
                Esc(&name)
            );
            return;
        };
        let load = state.load.as_ref();
        let proxied = load.and_then(|l| l.service_load(&service.name));
        let _ = write!(
            out,
            r#"<h1>{} <small>{} of {} endpoints routable</small></h1>"#,
            Esc(&service.name),
            service.routable_len(),
            service.counts.total()
        );
        match proxied {
            Some(p) if p.fail_open => out.push_str(r#"<p><span class="badge s-critical">failing open</span> too many endpoints fail: the proxy sends to failing ones rather than to none.</p>"#),
            Some(_) => out.push_str(r#"<p class="note">Routed by the proxy: live traffic below (rates from two refreshes).</p>"#),
            None => out.push_str(r#"<p class="note">No proxy route or listener names this service: DNS and the API only.</p>"#),
        }
        out.push_str(r#"<table id="endpoints"><thead><tr><th>Endpoint</th><th>Node</th><th>Address</th><th>State</th><th>Why excluded</th><th class="num">In flight</th><th class="num">Req/s</th><th class="num">Latency</th><th class="num">Failures</th><th>Checks</th><th></th></tr></thead><tbody>"#);
        let mut rows = Rows::default();
        for instance in service.instances() {
            let wanted = view.shows(&instance.endpoint.id) || view.shows(&instance.node.name);
            if !wanted || !rows.admit() {
                continue;
            }
            let traffic = load
                .map(|l| {
                    l.endpoint_load(&service.name, &instance.node.name, &instance.endpoint.id)
                })
                .unwrap_or_default();
            endpoint_row(out, instance, &traffic, proxied.is_some());
        }
        out.push_str("</tbody></table>");
        rows.finish(out);
    })
}

fn endpoint_row(
    out: &mut String,
    instance: &Instance,
    traffic: &switchyard_catalog::EndpointLoad,
    proxied: bool,
) {
    let (node, id) = (&*instance.node.name, &*instance.endpoint.id);
    let state = instance.state.as_str();
    let _ = write!(
        out,
        r#"<tr data-key="{n}/{i}" data-endpoint="{i}" data-state="{state}" data-requests="{req}"><td><code>{i}</code></td><td><a href="/ui/nodes?q={nq}">{n}</a></td><td><code>{addr}:{port}</code></td><td><span class="badge s-{state}">{state}</span>"#,
        n = Esc(node),
        i = Esc(id),
        nq = Seg(node),
        req = traffic.requests,
        addr = Esc(instance.address()),
        port = instance.endpoint.port,
    );
    if traffic.ejected {
        out.push_str(r#" <span class="badge s-critical">ejected</span>"#);
    }
    let _ = write!(
        out,
        "</td><td>{}</td>",
        Esc(&instance.excluded_because().unwrap_or_default())
    );
    if proxied {
        let _ = write!(
            out,
            r#"<td class="num">{}</td><td class="num rate">–</td><td class="num">{}</td><td class="num">{}</td>"#,
            traffic.in_flight,
            Latency(traffic.latency_us),
            traffic.failures
        );
    } else {
        out.push_str(r#"<td class="num zero">–</td><td class="num zero">–</td><td class="num zero">–</td><td class="num zero">–</td>"#);
    }
    out.push_str("<td>");
    if instance.checks.is_empty() {
        out.push_str(r#"<span class="note">no checks</span>"#);
    }
    for check in instance.checks.iter() {
        let _ = write!(
            out,
            r#"<details><summary><span class="badge s-{st}">{st}</span> {name}</summary>"#,
            st = check.status.as_str(),
            name = Esc(if check.name.is_empty() {
                &check.id
            } else {
                &check.name
            }),
        );
        let _ = write!(
            out,
            "<p><code>{}</code> {}{}</p>",
            Esc(&check.id),
            Esc(check.kind.as_str()),
            if check.is_node_level() {
                " · node-level"
            } else {
                ""
            }
        );
        if !check.output.is_empty() {
            let _ = write!(out, "<pre>{}</pre>", Esc(&check.output));
        }
        if !check.notes.is_empty() {
            let _ = write!(out, r#"<p class="note">{}</p>"#, Esc(&check.notes));
        }
        out.push_str("</details>");
    }
    out.push_str(r#"</td><td class="actions">"#);
    let target = format!("/v1/switchyard/endpoints/{}", Seg(id));
    let node_q = format!("node={}", Seg(node));
    if instance.endpoint.drain.is_some() {
        button(
            out,
            "undrain",
            "DELETE",
            &format!("{target}/drain?{node_q}"),
            "Undrain",
            id,
        );
    } else {
        button(
            out,
            "drain",
            "PUT",
            &format!("{target}/drain?{node_q}"),
            "Drain",
            id,
        );
    }
    let own_maintenance = instance
        .checks
        .iter()
        .any(|c| c.id.starts_with(SERVICE_MAINTENANCE_PREFIX));
    if own_maintenance {
        let url = format!("{target}/maintenance?{node_q}&enable=false");
        button(out, "maintenance-off", "PUT", &url, "End maintenance", id);
    } else {
        let url =
            format!("{target}/maintenance?{node_q}&enable=true&reason=set+from+the+dashboard");
        button(out, "maintenance-on", "PUT", &url, "Maintenance", id);
    }
    out.push_str("</td></tr>");
}

/// A button the script turns into an API call. `drain` buttons carry the
/// deadline chosen at the top of the page.
fn button(out: &mut String, action: &str, method: &str, url: &str, label: &str, target: &str) {
    let _ = write!(
        out,
        r#"<button type="button" data-action="{action}" data-target="{t}" data-method="{method}" data-url="{u}">{label}</button>"#,
        t = Esc(target),
        u = Esc(url),
    );
}

/// The datacenters: this one, then the others by measured round trip,
/// whether they answer, and which of our services fail over to each.
pub(super) async fn datacenters(
    State(state): St,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<Pairs>,
) -> Response {
    let view = View::new(&state, &headers, &uri, &q);
    view.respond("Datacenters", Tab::Datacenters, |out| {
        out.push_str(r#"<table id="datacenters"><thead><tr><th>Datacenter</th><th>State</th><th class="num">Round trip</th><th>Last contact</th><th>Agents</th><th>Services failing over to it</th></tr></thead><tbody>"#);
        let list = match &state.federation {
            Some(federation) => federation.datacenters(),
            None => Vec::new(),
        };
        if list.is_empty() {
            let _ = write!(
                out,
                r#"<tr data-dc="{dc}"><td><b>{dc}</b></td><td><span class="badge s-passing">local</span></td><td class="num">-</td><td>-</td><td></td><td></td></tr>"#,
                dc = Esc(&state.agent.datacenter)
            );
        }
        for dc in list.iter().filter(|dc| view.shows(&dc.name)) {
            let (badge, class) = match (dc.local, dc.reachable) {
                (true, _) => ("local", "passing"),
                (false, true) => ("reachable", "passing"),
                (false, false) => ("out of reach", "critical"),
            };
            let rtt = dc
                .rtt_ms
                .filter(|_| !dc.local)
                .map_or("-".to_string(), |ms| format!("{ms:.2} ms"));
            let contact = match (dc.local, dc.last_contact_ms) {
                (true, _) => "-".to_string(),
                (false, Some(ms)) => format!("{} ago", Age(ms)),
                (false, None) => "never".to_string(),
            };
            let _ = write!(
                out,
                r#"<tr data-dc="{name}"><td><b>{name}</b></td><td><span class="badge s-{class}">{badge}</span></td><td class="num">{rtt}</td><td>{contact}</td><td><code>{api}</code></td><td>{failover}</td></tr>"#,
                name = Esc(&dc.name),
                api = Esc(&dc.api.join(", ")),
                failover = Esc(&dc.failover_services.join(", ")),
            );
        }
        out.push_str("</tbody></table>");
    })
}

/// The xDS server's clients: each stream's node, user agent, locality and
/// peer, how long it has been connected, what it subscribed to, and its
/// pushes, ACKs and NACKs (the last NACK's error).
pub(super) async fn xds(
    State(state): St,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<Pairs>,
) -> Response {
    let view = View::new(&state, &headers, &uri, &q);
    view.respond("xDS clients", Tab::Xds, |out| {
        let Some(xds) = &state.xds else {
            out.push_str(r#"<p class="note">xDS is off on this agent: set <code>[xds] addr</code> or <code>--xds-addr</code>.</p>"#);
            return;
        };
        let listed = xds();
        let clients = listed["clients"].as_array().cloned().unwrap_or_default();
        let _ = write!(
            out,
            r#"<p class="note">{} ADS streams.</p><table id="xds"><thead><tr><th>Node</th><th>Client</th><th>Locality</th><th>Peer</th><th>Connected</th><th class="num">Subscriptions</th><th class="num">Pushes</th><th class="num">ACKs</th><th class="num">NACKs</th><th>Last NACK</th></tr></thead><tbody>"#,
            clients.len()
        );
        let now = switchyard_catalog::unix_ms();
        for c in &clients {
            let text = |k: &str| c[k].as_str().unwrap_or("").to_string();
            let num = |k: &str| c[k].as_u64().unwrap_or(0);
            let node = text("node");
            if !view.shows(&node) {
                continue;
            }
            let _ = write!(
                out,
                r#"<tr data-node="{node}"><td><code>{node}</code></td><td>{agent}</td><td>{locality}</td><td><code>{peer}</code></td><td>{age} ago</td><td class="num">{subs}</td><td class="num">{pushes}</td><td class="num">{acks}</td><td class="num">{nacks}</td><td>{nack}</td></tr>"#,
                node = Esc(&node),
                agent = Esc(&text("user_agent")),
                locality = Esc(&text("locality")),
                peer = Esc(&text("peer")),
                age = Age(now.saturating_sub(num("connected_ms"))),
                subs = num("subscriptions"),
                pushes = num("pushes"),
                acks = num("acks"),
                nacks = num("nacks"),
                nack = Esc(&text("last_nack")),
            );
        }
        out.push_str("</tbody></table>");
    })
}

pub(super) async fn nodes(
    State(state): St,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<Pairs>,
) -> Response {
    let view = View::new(&state, &headers, &uri, &q);
    view.respond("Nodes", Tab::Nodes, |out| {
        let snap = state.registry.snapshot();
        summary(out, &state, &snap);
        out.push_str(r#"<table id="nodes"><thead><tr><th>Node</th><th>Address</th><th class="num">Endpoints</th><th>State</th><th class="num">In flight</th><th class="num">Cut</th><th>Drain progress</th><th></th></tr></thead><tbody>"#);
        let now = unix_ms();
        let mut rows = Rows::default();
        for entry in snap.nodes_sorted() {
            let node = &entry.node;
            if !view.shows(&node.name) || !rows.admit() {
                continue;
            }
            let drain = node.drain.as_ref();
            let progress = drain_progress(&state, drain, entry.endpoints.values().map(|e| &**e));
            let maintenance = entry.checks.contains_key(NODE_MAINTENANCE_CHECK);
            let _ = write!(
                out,
                r#"<tr data-node="{n}" data-phase="{phase}"><td><b>{n}</b></td><td><code>{addr}</code></td><td class="num">{eps}</td><td><span class="badge s-{phase}">{phase}</span>"#,
                n = Esc(&node.name),
                addr = Esc(&node.address),
                eps = entry.endpoints.len(),
                phase = progress.phase,
            );
            if maintenance {
                out.push_str(r#" <span class="badge s-maintenance">maintenance</span>"#);
            }
            let _ = write!(
                out,
                r#"</td><td class="num">{}</td><td class="num">{}</td><td>"#,
                progress.in_flight, progress.cut
            );
            if let Some(drain) = drain {
                let since = now.saturating_sub(drain.since_ms);
                match drain.deadline_ms {
                    Some(deadline) if progress.phase == "draining" => {
                        let total = deadline.saturating_sub(drain.since_ms).max(1);
                        let _ = write!(
                            out,
                            r#"<progress max="{total}" value="{v}"></progress> {left} to the deadline"#,
                            v = since.min(total),
                            left = Age(deadline.saturating_sub(now)),
                        );
                    }
                    _ if progress.phase == "drained" => {
                        let _ = write!(
                            out,
                            "empty{} · draining for {}",
                            if progress.deadline_passed && progress.in_flight > 0 {
                                " (deadline passed)"
                            } else {
                                ""
                            },
                            Age(since)
                        );
                    }
                    _ => {
                        let _ = write!(out, "no deadline · draining for {}", Age(since));
                    }
                }
            }
            out.push_str(r#"</td><td class="actions">"#);
            let base = format!("/v1/switchyard/nodes/{}", Seg(&node.name));
            if drain.is_some() {
                button(out, "undrain", "DELETE", &format!("{base}/drain"), "Undrain", &node.name);
            } else {
                button(out, "drain", "PUT", &format!("{base}/drain"), "Drain", &node.name);
            }
            if maintenance {
                let url = format!("{base}/maintenance?enable=false");
                button(out, "maintenance-off", "PUT", &url, "End maintenance", &node.name);
            } else {
                let url = format!("{base}/maintenance?enable=true&reason=set+from+the+dashboard");
                button(out, "maintenance-on", "PUT", &url, "Maintenance", &node.name);
            }
            out.push_str("</td></tr>");
        }
        if rows.shown == 0 {
            out.push_str(r#"<tr><td colspan="8" class="empty">No nodes.</td></tr>"#);
        }
        out.push_str("</tbody></table>");
        rows.finish(out);
    })
}

/// HTML-escaped text (element content and quoted attribute values).
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// A percent-encoded URL path segment or query value.
struct Seg<'a>(&'a str);

impl fmt::Display for Seg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                f.write_char(b as char)?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

/// A duration in milliseconds, as people read it: 850ms, 42s, 3m 5s, 2h 10m.
struct Age(u64);

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        let s = ms / 1000;
        match s {
            0 => write!(f, "{ms}ms"),
            1..=59 => write!(f, "{s}s"),
            60..=3599 => write!(f, "{}m {}s", s / 60, s % 60),
            _ => write!(f, "{}h {}m", s / 3600, s % 3600 / 60),
        }
    }
}

/// A latency in microseconds: "–" before the first response.
struct Latency(u64);

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("–"),
            us @ 1..=9_999 => write!(f, "{:.2} ms", us as f64 / 1000.0),
            us => write!(f, "{} ms", us / 1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        let hostile = r#"<script>alert("x")</script>&'"#;
        let out = Esc(hostile).to_string();
        assert_eq!(
            out,
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(Seg("a b/c?d").to_string(), "a%20b%2Fc%3Fd");
    }

    /// Submitted before the script has loaded (which turns it into a
    /// header), the token form must not put the token in the URL, where
    /// history and access logs keep it.
    #[test]
    fn the_token_form_never_submits_by_get() {
        let form = LOGIN.split("<form").nth(1).expect("a form");
        let tag = &form[..form.find('>').expect("tag end")];
        assert!(tag.contains(r#"method="post""#), "{tag}");
        assert_eq!(LOGIN.matches("<form").count(), 1);
    }

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(Age(850).to_string(), "850ms");
        assert_eq!(Age(42_000).to_string(), "42s");
        assert_eq!(Age(185_000).to_string(), "3m 5s");
        assert_eq!(Age(7_800_000).to_string(), "2h 10m");
        assert_eq!(Latency(0).to_string(), "–");
        assert_eq!(Latency(1_500).to_string(), "1.50 ms");
    }
}
