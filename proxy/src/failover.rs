//! Failover to other datacenters: a routed service with too few routable
//! endpoints here (none, or a share under `federation.min_healthy`) and a
//! failover policy (`federation.failover`, or its `switchyard.failover=`
//! tag) is served from the first datacenter in its order whose copy has
//! routable endpoints, straight to their addresses. A copy's first fetch
//! is waited for (`federation.dns_timeout` at most), so the first request
//! after a failure is not refused for want of it.

use std::sync::Arc;

use switchyard_catalog::{
    failover_policy, needs_failover, Copied, CopyOf, ExtraKey, ServiceView, Snapshot,
};

use crate::backend::{ProxyDecorator, ProxyService};
use crate::shared::Shared;

/// A service as a request sees it.
pub(crate) struct Found {
    pub(crate) service: Option<Arc<ProxyService>>,
    /// Found in another datacenter's copy: a withdrawn endpoint is skipped,
    /// never reloaded from ours.
    pub(crate) elsewhere: bool,
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

/// Ours, and whether it should fail over.
pub(crate) fn here(
    shared: &Shared,
    snapshot: &Snapshot,
    key: ExtraKey<ProxyDecorator>,
    name: &str,
) -> Here {
    let view: Option<&Arc<ServiceView>> = snapshot.service(name);
    let ours = view.and_then(|v| v.extra_arc(key));
    let Some(elsewhere) = shared.elsewhere.get() else {
        return Here::Served(ours);
    };
    if !needs_failover(view.map(|v| &**v), elsewhere.min_healthy()) {
        return Here::Served(ours);
    }
    Here::Short {
        here: ours,
        policy: view.and_then(|v| failover_policy(v)).map(str::to_string),
    }
}

/// The service from the first datacenter in its failover order whose copy
/// has routable endpoints; ours when none has.
pub(crate) async fn find(
    shared: &Shared,
    key: ExtraKey<ProxyDecorator>,
    name: &str,
    here: Here,
) -> Found {
    let (ours, policy) = match here {
        Here::Served(service) => {
            return Found {
                service,
                elsewhere: false,
            }
        }
        Here::Short { here, policy } => (here, policy),
    };
    let Some(elsewhere) = shared.elsewhere.get() else {
        return Found {
            service: ours,
            elsewhere: false,
        };
    };
    let lower = name.to_ascii_lowercase();
    for dc in elsewhere.order(policy.as_deref()) {
        let copy = match elsewhere.copy(&dc, CopyOf::Service(&lower)) {
            Copied::Ready(copy) => copy,
            Copied::Fetching(wait) => {
                wait.await;
                match elsewhere.copy(&dc, CopyOf::Service(&lower)) {
                    Copied::Ready(copy) => copy,
                    _ => continue,
                }
            }
            Copied::Unknown => continue,
        };
        let there = copy
            .service_ci(&lower)
            .and_then(|v| v.extra_arc(key))
            .filter(|s| !s.backends.is_empty());
        if let Some(there) = there {
            elsewhere.failed_over(&lower, &dc);
            return Found {
                service: Some(there),
                elsewhere: true,
            };
        }
    }
    Found {
        service: ours,
        elsewhere: false,
    }
}
