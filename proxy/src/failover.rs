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
) -> Here {
    let view: Option<&Arc<ServiceView>> = snapshot.service(name);
    let ours = view.and_then(|v| v.extra_arc(key));
    let Some(elsewhere) = shared.elsewhere.get() else {
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

/// The service in `dc`'s copy when it has routable endpoints there;
/// `Err` while the copy's first fetch is under way.
fn there(
    elsewhere: &dyn Elsewhere,
    key: ExtraKey<ProxyDecorator>,
    dc: &str,
    lower: &str,
) -> Result<Option<Arc<ProxyService>>, Wait> {
    match elsewhere.copy(dc, CopyOf::Service(lower)) {
        Copied::Ready(copy) => Ok(copy
            .service_ci(lower)
            .and_then(|v| v.extra_arc(key))
            .filter(|s| !s.backends.is_empty())),
        Copied::Fetching(wait) => Err(wait),
        Copied::Unknown => Ok(None),
    }
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
) -> Option<Arc<ProxyService>> {
    let (elsewhere, ours, policy) = match short(shared, here) {
        Ok(short) => short,
        Err(answer) => return answer,
    };
    let lower = name.to_ascii_lowercase();
    for dc in elsewhere.order(policy.as_deref()) {
        if let Ok(Some(service)) = there(&**elsewhere, key, &dc, &lower) {
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
) -> Option<Arc<ProxyService>> {
    let (elsewhere, ours, policy) = match short(shared, here) {
        Ok(short) => short,
        Err(answer) => return answer,
    };
    let lower = name.to_ascii_lowercase();
    for dc in elsewhere.order(policy.as_deref()) {
        let found = match there(&**elsewhere, key, &dc, &lower) {
            Ok(found) => found,
            Err(wait) => {
                wait.await;
                there(&**elsewhere, key, &dc, &lower).ok().flatten()
            }
        };
        if let Some(service) = found {
            elsewhere.failed_over(&lower, &dc);
            return Some(service);
        }
    }
    ours
}
