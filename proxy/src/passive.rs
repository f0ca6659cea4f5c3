//! Passive health reports: an endpoint the proxy sees keep failing becomes a
//! check in the registry (so DNS and `?passing` drop it too), withdrawn after
//! `outlier.report_hold` or at its first success.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_catalog::{CheckKind, HealthReports, Name};

use crate::backend::ProxyDecorator;
use crate::stats::{nanos, now_ns, EndpointStats};

/// Reports endpoints that keep failing to the registry as checks (see
/// `OutlierConfig::report`), withdraws each report after `report_hold` or
/// once the endpoint succeeds again. Runs until aborted.
pub async fn report_passive_failures(
    decorator: Arc<ProxyDecorator>,
    registry: Arc<dyn HealthReports>,
) {
    use switchyard_catalog::{Check, CheckDefinition, Status};
    let shared = decorator.shared.clone();
    let mut reported: HashMap<(Name, Name), (Arc<EndpointStats>, std::time::Instant)> =
        HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let outlier = shared.config.load().outlier.clone();
        let now = now_ns();
        if outlier.report != crate::config::PassiveReport::Off {
            let cutoff = now.saturating_sub(nanos(outlier.report_after));
            for (service, node, id, stats) in shared.failing_before(cutoff) {
                let key = (node.clone(), id.clone());
                let since = stats.failing_since().unwrap_or(now);
                if reported.contains_key(&key) {
                    continue;
                }
                let status = if outlier.report == crate::config::PassiveReport::Warning {
                    Status::Warning
                } else {
                    Status::Critical
                };
                let output = format!(
                    "the proxy has seen this endpoint fail for {:?} without a success ({} ejection(s) by outlier detection); withdrawn after {:?} so it is tried again",
                    Duration::from_nanos(now.saturating_sub(since)),
                    stats.ejections(),
                    outlier.report_hold,
                );
                let check = Check {
                    node: node.clone(),
                    id: format!("{PASSIVE_CHECK_PREFIX}{id}").into(),
                    name: "Proxy passive health".to_string(),
                    status,
                    notes: String::new(),
                    output,
                    service_id: id.to_string(),
                    service_name: service.to_string(),
                    kind: CheckKind::Passive,
                    definition: CheckDefinition::default(),
                    status_since_ms: 0,
                    create_index: 0,
                    modify_index: 0,
                };
                match registry.report(check).await {
                    Ok(_) => {
                        tracing::warn!(service = %service, node = %node, endpoint = %id,
                            status = status.as_str(), "reported an endpoint that keeps failing to the registry");
                        reported.insert(key, (stats, std::time::Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, endpoint = %id, "cannot report a failing endpoint")
                    }
                }
            }
        }
        let hold = outlier.report_hold;
        let done: Vec<(Name, Name)> = reported
            .iter()
            .filter(|(_, (stats, at))| at.elapsed() >= hold || stats.failing_since().is_none())
            .map(|(key, _)| key.clone())
            .collect();
        for key in done {
            let Some((stats, _)) = reported.remove(&key) else {
                continue;
            };
            stats.reset_failing();
            let (node, id) = key;
            let check_id = format!("{PASSIVE_CHECK_PREFIX}{id}").into();
            if let Err(e) = registry.withdraw(node.clone(), check_id).await {
                tracing::debug!(error = %e, endpoint = %id, "cannot withdraw a passive report");
            } else {
                tracing::info!(node = %node, endpoint = %id, "withdrew the passive failure report; the endpoint is tried again");
            }
        }
    }
}

/// Check id prefix of passive-failure reports.
pub const PASSIVE_CHECK_PREFIX: &str = "_switchyard_passive:";
