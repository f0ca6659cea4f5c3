//! Agents that die are seen dead (cluster mode). Every agent keeps its name
//! alive in etcd under a lease (`store.lease_ttl`); when an agent's lease
//! lapses (killed, or cut off from etcd), its node gets a critical
//! `serfHealth` check, so its endpoints leave DNS and the proxy everywhere,
//! as Consul's gossip would mark it. When it is back, the check passes again.
//!
//! Agent nodes are those an agent registered for itself (their meta carries
//! `switchyard-version`). One live agent writes each change (the rendezvous
//! owner of the node's `serfHealth`), and only on a change.

use std::collections::BTreeSet;
use std::time::Duration;

use switchyard_catalog::model::{Check, CheckDefinition, CheckKind, Name, Status};
use switchyard_catalog::NODE_HEALTH_CHECK;

use crate::catalog::{Command, NewCheck};
use crate::writer::Registry;

/// The node meta key an agent's own node carries.
pub const AGENT_META: &str = "switchyard-version";

const DEAD: &str = "the agent's etcd lease lapsed (store.lease_ttl): agent down or cut off";
const ALIVE: &str = "Agent alive and reachable";

/// Looks at the live agents whenever they change (and every `every`) and
/// marks agents' nodes.
pub async fn watch_agents(registry: Registry, every: Duration) {
    // The agents' nodes: found once in the catalog (agents that died while
    // this one was down), then every name seen among the live.
    let mut known: BTreeSet<Name> = registry
        .snapshot()
        .nodes()
        .filter(|entry| entry.node.meta.contains_key(AGENT_META))
        .map(|entry| entry.node.name.clone())
        .collect();
    let status = registry.store_status().clone();
    loop {
        // At once when the live agents change; every `every` regardless (a
        // write that failed, a node registered since).
        tokio::select! {
            () = status.members_changed() => {}
            () = tokio::time::sleep(every) => {}
        }
        for command in changes(&registry, &mut known) {
            if let Err(e) = registry.apply(command).await {
                tracing::debug!(error = %e, "could not mark an agent's node");
            }
        }
    }
}

/// The checks to write now: an agent node whose agent is not live and is
/// not marked, or is live and still marked.
fn changes(registry: &Registry, known: &mut BTreeSet<Name>) -> Vec<Command> {
    let status = registry.store_status();
    let members = status.members();
    if members.is_empty() {
        // Not read yet (or not in cluster mode).
        return Vec::new();
    }
    known.extend(members.iter().cloned());
    let snapshot = registry.snapshot();
    let mut out = Vec::new();
    for name in known.iter() {
        let Some(entry) = snapshot.node(name) else {
            continue;
        };
        let node = &entry.node;
        if !node.meta.contains_key(AGENT_META) {
            continue;
        }
        let alive = members.contains(name);
        let marked = entry
            .checks
            .get(NODE_HEALTH_CHECK)
            .is_some_and(|c| c.status == Status::Critical && c.kind == CheckKind::None);
        if alive == marked && status.owns(name, NODE_HEALTH_CHECK) {
            let (state, output) = match alive {
                true => (Status::Passing, ALIVE),
                false => (Status::Critical, DEAD),
            };
            if alive {
                tracing::info!(node = %name, "agent is back: its node passes");
            } else {
                tracing::warn!(node = %name, "agent's lease lapsed: its node is critical");
            }
            out.push(Command::RegisterCheck {
                check: NewCheck {
                    check: serf_health(name.clone(), state, output),
                    status_given: true,
                },
            });
        }
    }
    out
}

fn serf_health(node: Name, status: Status, output: &str) -> Check {
    Check {
        node,
        id: NODE_HEALTH_CHECK.into(),
        name: "Serf Health Status".to_string(),
        status,
        notes: String::new(),
        output: output.to_string(),
        service_id: String::new(),
        service_name: String::new(),
        kind: CheckKind::None,
        definition: CheckDefinition::default(),
        status_since_ms: 0,
        create_index: 0,
        modify_index: 0,
    }
}
