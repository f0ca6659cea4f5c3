//! The proxy's chunk and view outputs, built incrementally as the writer
//! builds them, against a fresh build of the same view (the oracle), over a
//! routed service of thousands of endpoints.

use std::collections::{BTreeMap, HashMap, HashSet};

use switchyard_catalog::{
    Check, CheckDefinition, CheckKind, Decorators, Endpoint, EndpointState, Members, Node, Status,
};

use super::*;

/// The records of a fake catalog: instances by key, as the writer keeps them.
struct Records {
    members: Members,
    instances: BTreeMap<(Name, Name), Instance>,
    nodes: Vec<Arc<Node>>,
}

fn instance(node: &Arc<Node>, id: &str, port: u16, status: Status) -> Instance {
    let mut endpoint = Endpoint::new(&*node.name, id, "big", port);
    endpoint.tags = vec!["switchyard.http.host=big".to_string()];
    let check = Check {
        node: node.name.clone(),
        id: format!("service:{id}").into(),
        name: "probe".to_string(),
        status,
        notes: String::new(),
        output: String::new(),
        service_id: id.to_string(),
        service_name: "big".to_string(),
        kind: CheckKind::None,
        definition: CheckDefinition::default(),
        status_since_ms: 0,
        create_index: 0,
        modify_index: 0,
    };
    let state = match status {
        Status::Passing => EndpointState::Passing,
        Status::Warning => EndpointState::Warning,
        Status::Critical => EndpointState::Critical,
    };
    Instance {
        endpoint: Arc::new(endpoint),
        node: node.clone(),
        checks: vec![Arc::new(check)].into(),
        health: status,
        state,
    }
}

/// What a view's proxy output shows: the backends in order, and every
/// instance's stats key in order.
fn shown(service: &ProxyService) -> (Vec<(SocketAddr, u32, String)>, Vec<String>) {
    let backends = service
        .backends
        .iter()
        .map(|b| (b.addr, b.weight, format!("{}/{}", b.stats.node, b.stats.id)))
        .collect();
    let all = service
        .in_flight()
        .map(|(node, id, _)| format!("{node}/{id}"))
        .collect();
    (backends, all)
}

fn decorator() -> (Arc<ProxyDecorator>, Decorators, ExtraKey<ProxyDecorator>) {
    let metrics = Arc::new(ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics"));
    let proxy = Arc::new(ProxyDecorator::new(
        Config::default(),
        TcpConfig::default(),
        metrics,
    ));
    let mut decorators = Decorators::default();
    let key = decorators.add(proxy.clone());
    (proxy, decorators, key)
}

#[test]
fn incremental_backends_match_a_fresh_build_and_keep_their_counters() {
    let (proxy, decorators, key) = decorator();
    let nodes: Vec<Arc<Node>> = (0..30)
        .map(|n| Arc::new(Node::new(format!("n{n:02}"), format!("10.1.0.{}", n + 1))))
        .collect();
    let mut records = Records {
        members: Members::default(),
        instances: BTreeMap::new(),
        nodes,
    };
    for node in &records.nodes {
        for i in 0..40u16 {
            let id = format!("e{i:02}");
            let at = (node.name.clone(), Name::from(id.as_str()));
            records.members.insert(at.clone());
            records
                .instances
                .insert(at, instance(node, &id, 9000 + i, Status::Passing));
        }
    }
    let name: Name = "big".into();
    let build = |records: &Records,
                 previous: Option<&ServiceView>,
                 changed: &HashSet<Name>,
                 decorators: &Decorators| {
        ServiceView::build(
            &name,
            1,
            &records.members,
            previous,
            changed,
            false,
            decorators,
            |node, id| records.instances.get(&(node.clone(), id.clone())).cloned(),
        )
        .expect("a view")
    };
    let mut view = build(&records, None, &HashSet::new(), &decorators);
    assert!(view.chunks().len() > 2, "{} chunks", view.chunks().len());
    let mut rng = fastrand::Rng::with_seed(3);
    for step in 0..60 {
        let node = records.nodes[rng.usize(..records.nodes.len())].clone();
        let id = format!("e{:02}", rng.usize(..60));
        let at = (node.name.clone(), Name::from(id.as_str()));
        match rng.u8(..4) {
            0 => {
                records.members.remove(&at);
                records.instances.remove(&at);
            }
            1 | 2 => {
                let status = [Status::Passing, Status::Warning, Status::Critical][rng.usize(..3)];
                records.members.insert(at.clone());
                let port = rng.u16(1..u16::MAX);
                records
                    .instances
                    .insert(at, instance(&node, &id, port, status));
            }
            _ => {
                // The node's record changes: every instance on it is new.
                let moved = Arc::new(Node::new(&*node.name, format!("10.2.0.{}", rng.u8(1..250))));
                for (key, i) in records.instances.iter_mut() {
                    if key.0 == node.name {
                        let status = i.health;
                        *i = instance(&moved, &key.1, i.endpoint.port, status);
                    }
                }
                let slot = records.nodes.iter().position(|n| n.name == node.name);
                records.nodes[slot.expect("node")] = moved;
            }
        }
        let before = view.extra_arc(key).expect("proxied");
        let changed: HashSet<Name> = [node.name.clone()].into();
        let next = build(&records, Some(&view), &changed, &decorators);
        let got = next.extra_arc(key).expect("proxied");
        let (fresh_proxy, fresh_decorators, fresh_key) = decorator();
        let fresh = build(&records, None, &HashSet::new(), &fresh_decorators);
        let want = fresh.extra_arc(fresh_key).expect("proxied");
        assert_eq!(shown(&got), shown(&want), "step {step}");
        drop(fresh_proxy);
        // Stats survive for every endpoint that stayed, and the service's map
        // holds exactly the view's endpoints.
        let old: HashMap<(&str, &str), &Arc<EndpointStats>> = before
            .chunks
            .iter()
            .flat_map(|c| c.all.iter())
            .map(|s| ((&*s.node, &*s.id), s))
            .collect();
        for stats in got.chunks.iter().flat_map(|c| c.all.iter()) {
            if let Some(was) = old.get(&(&*stats.node, &*stats.id)) {
                assert!(Arc::ptr_eq(was, stats), "step {step}: {}", stats.id);
            }
        }
        let services = proxy.shared.services.lock().expect("lock");
        let mut mapped: Vec<String> = services["big"]
            .endpoints
            .keys()
            .map(|(n, i)| format!("{n}/{i}"))
            .collect();
        mapped.sort();
        assert_eq!(mapped, shown(&got).1, "step {step}");
        drop(services);
        view = next;
    }
}
