//! Failover to other datacenters: a routed service with too few routable
//! endpoints here (none, or a share under `federation.min_healthy`) and a
//! failover policy (`federation.failover`, or its `switchyard.failover=`
//! tag) is served from the first datacenter in its order whose copy has
//! routable endpoints, straight to their addresses. A copy's first fetch
//! is waited for (`federation.dns_timeout` at most), so the first request
//! after a failure is not refused for want of it.

use std::sync::Arc;

use switchyard_catalog::{
    failover_policy, needs_failover, Copied, CopyOf, Elsewhere, ExtraKey, ServiceView, Snapshot,
};

use crate::backend::{ProxyDecorator, ProxyService};
use crate::shared::Shared;

/// How a request may be served elsewhere.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// HTTP: another datacenter's endpoints, or its proxies (`via =
    /// "proxy"`).
    L7,
    /// L4: another datacenter's endpoints.
    L4,
    /// Sent here by another datacenter failing over: ours only.
    Here,
}

/// What to look for elsewhere, read off our snapshot without waiting.
pub(crate) enum Here {
    /// Ours serves it.
    Served(Option<Arc<ProxyService>>),
    /// Ours has too few routable endpoints: try the failover order
    /// (`policy`: the service's own), and ours when none has any.
    Short {
        here: Option<Arc<ProxyService>>,
        policy: Option<String>,
    },
}

/// Ours, and whether it should fail over. `reloading`: a request found an
/// endpoint withdrawn since its snapshot; the writer withdraws endpoints
/// before it publishes the snapshot without them, so ours counts as short
/// when every backend is withdrawn already, not only when the snapshot
/// says so.
pub(crate) fn here(
    shared: &Shared,
    snapshot: &Snapshot,
    key: ExtraKey<ProxyDecorator>,
    name: &str,
    reloading: bool,
    reach: Reach,
) -> Here {
    let view: Option<&Arc<ServiceView>> = snapshot.service(name);
    let ours = view.and_then(|v| v.extra_arc(key));
    let Some(elsewhere) = shared.elsewhere.get().filter(|_| reach != Reach::Here) else {
        return Here::Served(ours);
    };
    let withdrawn = || {
        ours.as_ref()
            .is_some_and(|s| s.backends.iter().all(|b| b.stats.is_withdrawn()))
    };
    let short =
        needs_failover(view.map(|v| &**v), elsewhere.min_healthy()) || (reloading && withdrawn());
    if !short {
        return Here::Served(ours);
    }
    Here::Short {
        here: ours,
        policy: view.and_then(|v| failover_policy(v)).map(str::to_string),
    }
}

/// A first fetch under way.
type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The service in `dc`'s copy when it has routable endpoints there (for
/// HTTP through `dc`'s proxies when it is reached `via = "proxy"`);
/// `Err` while the copy's first fetch is under way.
fn there(
    shared: &Shared,
    elsewhere: &dyn Elsewhere,
    key: ExtraKey<ProxyDecorator>,
    dc: &str,
    lower: &str,
    reach: Reach,
) -> Result<Option<Arc<ProxyService>>, Wait> {
    let found = match elsewhere.copy(dc, CopyOf::Service(lower)) {
        Copied::Ready(copy) => copy
            .service_ci(lower)
            .and_then(|v| v.extra_arc(key))
            .filter(|s| !s.backends.is_empty()),
        Copied::Fetching(wait) => return Err(wait),
        Copied::Unknown | Copied::Full => None,
    };
    let via = elsewhere.via_proxies(dc).filter(|_| reach == Reach::L7);
    Ok(match (found, via) {
        (Some(_), Some(addrs)) => Some(proxies(shared, elsewhere, dc, &addrs)),
        (found, _) => found,
    })
}

/// Datacenter `dc`'s proxies as a service, made once.
fn proxies(
    shared: &Shared,
    elsewhere: &dyn Elsewhere,
    dc: &str,
    addrs: &[std::net::SocketAddr],
) -> Arc<ProxyService> {
    if let Some(made) = shared.via_proxies.load().get(dc) {
        return made.clone();
    }
    let made = Arc::new(ProxyService::proxies(
        dc,
        elsewhere.datacenter(),
        addrs,
        &shared.metrics,
    ));
    shared.via_proxies.rcu(|all| {
        let mut all = (**all).clone();
        all.entry(dc.to_string()).or_insert_with(|| made.clone());
        all
    });
    shared.via_proxies.load().get(dc).cloned().unwrap_or(made)
}

/// What a short service needs: where to look, ours, its policy. `Err`:
/// the answer already (ours serves it, or nothing fails over).
#[allow(clippy::type_complexity)]
fn short(
    shared: &Shared,
    here: Here,
) -> Result<
    (
        &Arc<dyn Elsewhere>,
        Option<Arc<ProxyService>>,
        Option<String>,
    ),
    Option<Arc<ProxyService>>,
> {
    match (here, shared.elsewhere.get()) {
        (Here::Served(service), _) => Err(service),
        (Here::Short { here, .. }, None) => Err(here),
        (Here::Short { here, policy }, Some(elsewhere)) => Ok((elsewhere, here, policy)),
    }
}

/// `find` without waiting: copies not fetched yet are passed over. For a
/// request's reload of its service (an endpoint withdrawn since its
/// snapshot), which may find ours emptied meanwhile.
pub(crate) fn find_now(
    shared: &Shared,
    key: ExtraKey<ProxyDecorator>,
    name: &str,
    here: Here,
    reach: Reach,
) -> Option<Arc<ProxyService>> {
    let (elsewhere, ours, policy) = match short(shared, here) {
        Ok(short) => short,
        Err(answer) => return answer,
    };
    let lower = name.to_ascii_lowercase();
    for dc in elsewhere.order(policy.as_deref()) {
        if let Ok(Some(service)) = there(shared, &**elsewhere, key, &dc, &lower, reach) {
            elsewhere.failed_over(&lower, &dc);
            return Some(service);
        }
    }
    ours
}

/// The service from the first datacenter in its failover order whose copy
/// has routable endpoints (a copy's first fetch waited for); ours when none
/// has.
pub(crate) async fn find(
    shared: &Shared,
    key: ExtraKey<ProxyDecorator>,
    name: &str,
    here: Here,
    reach: Reach,
) -> Option<Arc<ProxyService>> {
    let (elsewhere, ours, policy) = match short(shared, here) {
        Ok(short) => short,
        Err(answer) => return answer,
    };
    let lower = name.to_ascii_lowercase();
    for dc in elsewhere.order(policy.as_deref()) {
        let found = match there(shared, &**elsewhere, key, &dc, &lower, reach) {
            Ok(found) => found,
            Err(wait) => {
                wait.await;
                there(shared, &**elsewhere, key, &dc, &lower, reach)
                    .ok()
                    .flatten()
            }
        };
        if let Some(service) = found {
            elsewhere.failed_over(&lower, &dc);
            return Some(service);
        }
    }
    ours
}
