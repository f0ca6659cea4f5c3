//! Catalog and writer behaviour, driven through the real writer with an
//! in-memory (or embedded) store and tokio's paused clock.

use crate::model::CheckKind;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::metrics::RegistryMetrics;
use crate::model::CheckDefinition;
use crate::snapshot::EndpointState;
use crate::store::{EmbeddedStore, MemoryStore, Store};
use crate::writer::Registry;

fn node(name: &str) -> Node {
    Node::new(name, format!("10.0.0.{}", name.len()))
}

fn endpoint(node: &str, id: &str, service: &str, tags: &[&str]) -> Endpoint {
    let mut e = Endpoint::new(node, id, service, 8080);
    e.tags = tags.iter().map(|t| t.to_string()).collect();
    e
}

fn check(node: &str, service_id: &str, status: Status) -> NewCheck {
    NewCheck {
        check: Check {
            node: node.into(),
            id: format!("service:{service_id}").into(),
            name: "probe".to_string(),
            status,
            notes: String::new(),
            output: String::new(),
            service_id: service_id.to_string(),
            service_name: String::new(),
            kind: CheckKind::None,
            definition: CheckDefinition::default(),
            status_since_ms: 0,
            create_index: 0,
            modify_index: 0,
        },
        status_given: true,
    }
}

fn ttl_check(node: &str, service_id: &str, ttl: Duration, dcsa: Option<Duration>) -> NewCheck {
    let mut c = check(node, service_id, Status::Critical);
    c.check.kind = CheckKind::Ttl;
    c.check.definition.ttl = Some(ttl);
    c.check.definition.deregister_critical_after = dcsa;
    c.status_given = false;
    c
}

async fn start_with<S: Store>(store: S) -> Registry {
    let metrics = Arc::new(RegistryMetrics::unregistered());
    let (registry, _writer) = Registry::start(store, metrics).expect("start");
    registry
}

async fn registry(nodes: &[&str]) -> Registry {
    let registry = start_with(MemoryStore::default()).await;
    for name in nodes {
        registry
            .apply(Command::EnsureNode(node(name)))
            .await
            .expect("node");
    }
    registry
}

async fn register(r: &Registry, e: Endpoint, checks: Vec<NewCheck>) -> u64 {
    r.apply(Command::RegisterService {
        endpoint: e,
        checks,
        replace_existing_checks: false,
    })
    .await
    .expect("register")
}

fn routable_ids(r: &Registry, service: &str, tag: Option<&str>) -> Vec<String> {
    let snap = r.snapshot();
    let Some(view) = snap.service(service) else {
        return Vec::new();
    };
    // Routable instances, optionally of one tag (case-insensitive), as DNS
    // picks them.
    let tag = tag.map(str::to_ascii_lowercase);
    let mut ids = Vec::new();
    for chunk in view.chunks() {
        let positions = match &tag {
            None => chunk.routable(),
            Some(tag) => chunk.tagged(tag),
        };
        for &p in positions {
            ids.push(chunk.instances()[p as usize].endpoint.id.to_string());
        }
    }
    ids
}

#[tokio::test]
async fn routable_set_and_tag_subsets_follow_health_maintenance_and_drain() {
    let r = registry(&["n1", "n2"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &["v1"]),
        vec![check("n1", "a", Status::Passing)],
    )
    .await;
    register(
        &r,
        endpoint("n1", "b", "web", &["V1", "v2"]),
        vec![check("n1", "b", Status::Warning)],
    )
    .await;
    register(
        &r,
        endpoint("n2", "c", "web", &["v1"]),
        vec![check("n2", "c", Status::Critical)],
    )
    .await;
    register(&r, endpoint("n2", "d", "web", &["v2"]), vec![]).await;

    assert_eq!(routable_ids(&r, "web", None), ["a", "b", "d"]);
    assert_eq!(
        routable_ids(&r, "web", Some("v1")),
        ["a", "b"],
        "tags match case-insensitively"
    );
    assert_eq!(routable_ids(&r, "web", Some("V2")), ["b", "d"]);
    assert!(routable_ids(&r, "web", Some("v3")).is_empty());
    let snap = r.snapshot();
    let view = snap.service("web").expect("web");
    let passing: Vec<_> = view.passing().map(|i| &*i.endpoint.id).collect();
    assert_eq!(passing, ["a", "d"], "?passing drops warning and critical");
    assert_eq!(view.counts.get(EndpointState::Critical), 1);

    r.apply(Command::ServiceMaintenance {
        node: "n1".into(),
        id: "a".into(),
        enable: true,
        reason: Some("deploy".into()),
    })
    .await
    .expect("maintenance");
    assert_eq!(routable_ids(&r, "web", None), ["b", "d"]);
    let snap = r.snapshot();
    let a = snap.instance("n1", "a").expect("a");
    assert_eq!(a.state, EndpointState::Maintenance);
    assert!(a.excluded_because().expect("reason").contains("deploy"));

    r.apply(Command::Drain {
        node: "n2".into(),
        deadline_ms: None,
    })
    .await
    .expect("drain");
    assert_eq!(
        routable_ids(&r, "web", None),
        ["b"],
        "a draining node's endpoints leave at once"
    );
    assert_eq!(r.snapshot().counts().get(EndpointState::Draining), 2);

    r.apply(Command::Undrain { node: "n2".into() })
        .await
        .expect("undrain");
    assert_eq!(routable_ids(&r, "web", None), ["b", "d"]);

    // One endpoint drained alone; a re-registration keeps its drain.
    r.apply(Command::DrainEndpoint {
        node: "n2".into(),
        id: "d".into(),
        deadline_ms: Some(7),
    })
    .await
    .expect("drain endpoint");
    assert_eq!(routable_ids(&r, "web", None), ["b"]);
    register(&r, endpoint("n2", "d", "web", &["v2", "v3"]), vec![]).await;
    let snap = r.snapshot();
    let d = snap.instance("n2", "d").expect("d");
    assert_eq!(d.state, EndpointState::Draining);
    assert_eq!(d.drain_deadline_ms(), Some(7));
    assert_eq!(
        d.excluded_because().as_deref(),
        Some("endpoint d is draining")
    );
    assert!(r
        .apply(Command::DrainEndpoint {
            node: "n2".into(),
            id: "ghost".into(),
            deadline_ms: None,
        })
        .await
        .is_err());
    r.apply(Command::UndrainEndpoint {
        node: "n2".into(),
        id: "d".into(),
    })
    .await
    .expect("undrain endpoint");
    assert_eq!(routable_ids(&r, "web", None), ["b", "d"]);

    r.apply(Command::NodeMaintenance {
        node: "n1".into(),
        enable: true,
        reason: None,
    })
    .await
    .expect("node maintenance");
    assert_eq!(
        routable_ids(&r, "web", None),
        ["d"],
        "node maintenance removes every endpoint on it"
    );
}

#[tokio::test]
async fn a_change_rebuilds_only_the_services_it_touches() {
    let r = registry(&["n1", "n2"]).await;
    register(&r, endpoint("n1", "web-1", "web", &[]), vec![]).await;
    register(&r, endpoint("n2", "db-1", "db", &[]), vec![]).await;
    let before = r.snapshot();
    register(&r, endpoint("n1", "web-2", "web", &[]), vec![]).await;
    let after = r.snapshot();

    let db_before = before.service("db").expect("db");
    let db_after = after.service("db").expect("db");
    assert!(
        Arc::ptr_eq(db_before, db_after),
        "untouched service keeps its Arc"
    );
    assert_eq!(before.service_index("db"), after.service_index("db"));
    let web_before = before.service("web").expect("web");
    let web_after = after.service("web").expect("web");
    assert!(!Arc::ptr_eq(web_before, web_after));
    assert!(after.service_index("web") > before.service_index("web"));
    assert_eq!(web_after.instances().count(), 2);
    assert_eq!(
        before.service("web").expect("web").instances().count(),
        1,
        "old snapshot is immutable"
    );

    // A node-level change touches every service on that node, and only those.
    let before = r.snapshot();
    r.apply(Command::Drain {
        node: "n2".into(),
        deadline_ms: None,
    })
    .await
    .expect("drain");
    let after = r.snapshot();
    assert!(Arc::ptr_eq(
        before.service("web").expect("web"),
        after.service("web").expect("web")
    ));
    assert!(after.service_index("db") > before.service_index("db"));
}

#[tokio::test]
async fn index_only_grows_and_refused_commands_change_nothing() {
    let r = registry(&["n1"]).await;
    let i1 = register(&r, endpoint("n1", "a", "web", &[]), vec![]).await;
    let i2 = register(&r, endpoint("n1", "b", "web", &[]), vec![]).await;
    assert!(i2 > i1);
    let same = register(&r, endpoint("n1", "b", "web", &[]), vec![]).await;
    assert_eq!(
        same, i2,
        "re-registering an identical endpoint writes nothing"
    );

    let before = r.snapshot();
    let err = r
        .apply(Command::DeregisterService {
            node: "n1".into(),
            id: "nope".into(),
        })
        .await
        .expect_err("unknown id");
    assert!(matches!(err, RegistryError::NotFound(_)));
    assert!(err.to_string().starts_with("Unknown service ID \"nope\""));

    // A batch is all or nothing: the second endpoint names an unknown node.
    let batch = Batch {
        endpoints: vec![
            (endpoint("n1", "c", "web", &[]), vec![]),
            (endpoint("ghost", "d", "web", &[]), vec![]),
        ],
        ..Batch::default()
    };
    let err = r
        .apply(Command::Batch(batch))
        .await
        .expect_err("unknown node");
    assert!(matches!(err, RegistryError::BadRequest(_)));
    let after = r.snapshot();
    assert_eq!(after.index(), before.index());
    assert!(
        after.instance("n1", "c").is_none(),
        "the first half of a refused batch is rolled back"
    );
    assert!(Arc::ptr_eq(
        before.service("web").expect("web"),
        after.service("web").expect("web")
    ));

    let i3 = r
        .apply(Command::DeregisterService {
            node: "n1".into(),
            id: "a".into(),
        })
        .await
        .expect("deregister");
    assert!(i3 > i2);
    assert!(
        r.snapshot().service_index("web") >= i3,
        "removal bumps the service index"
    );
}

#[tokio::test]
async fn removed_service_keeps_a_growing_index() {
    let r = registry(&["n1"]).await;
    register(&r, endpoint("n1", "a", "gone", &[]), vec![]).await;
    let live = r.snapshot().service_index("gone");
    r.apply(Command::DeregisterService {
        node: "n1".into(),
        id: "a".into(),
    })
    .await
    .expect("deregister");
    let snap = r.snapshot();
    assert!(snap.service("gone").is_none());
    assert!(
        snap.service_index("gone") > live,
        "a blocking watcher sees the removal"
    );
    assert_eq!(snap.service_index("never-existed"), 1);
}

#[tokio::test(start_paused = true)]
async fn ttl_check_expires_to_critical_on_time_and_pass_revives_it() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![ttl_check("n1", "a", Duration::from_secs(10), None)],
    )
    .await;
    assert!(
        routable_ids(&r, "web", None).is_empty(),
        "a new TTL check starts critical"
    );
    let pass = || Command::UpdateCheck {
        node: "n1".into(),
        id: "service:a".into(),
        status: Status::Passing,
        output: Some("ok".into()),
        require_ttl: true,
    };
    r.apply(pass()).await.expect("pass");
    let passed_at = Instant::now();
    assert_eq!(routable_ids(&r, "web", None), ["a"]);

    tokio::time::advance(Duration::from_secs(9)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        routable_ids(&r, "web", None),
        ["a"],
        "not expired before the TTL"
    );

    let mut changes = r.subscribe();
    changes.borrow_and_update();
    changes.changed().await.expect("expiry publishes");
    let expired_after = passed_at.elapsed();
    assert!(
        expired_after >= Duration::from_secs(10) && expired_after < Duration::from_secs(11),
        "expired after {expired_after:?}"
    );
    let snap = r.snapshot();
    let a = snap.instance("n1", "a").expect("a");
    assert_eq!(a.health, Status::Critical);
    assert!(
        a.checks[0].output.starts_with("TTL expired"),
        "{}",
        a.checks[0].output
    );

    r.apply(pass()).await.expect("pass again");
    assert_eq!(routable_ids(&r, "web", None), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_ttl_check_alive() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![ttl_check("n1", "a", Duration::from_secs(5), None)],
    )
    .await;
    for _ in 0..10 {
        r.apply(Command::UpdateCheck {
            node: "n1".into(),
            id: "service:a".into(),
            status: Status::Passing,
            output: None,
            require_ttl: true,
        })
        .await
        .expect("heartbeat");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(routable_ids(&r, "web", None), ["a"]);
    }
}

#[tokio::test(start_paused = true)]
async fn deregister_critical_after_removes_the_endpoint() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![ttl_check(
            "n1",
            "a",
            Duration::from_secs(5),
            Some(Duration::from_secs(60)),
        )],
    )
    .await;
    let registered = Instant::now();
    let mut changes = r.subscribe();
    loop {
        changes.borrow_and_update();
        if r.snapshot().instance("n1", "a").is_none() {
            break;
        }
        changes.changed().await.expect("writer alive");
    }
    let gone_after = registered.elapsed();
    assert!(
        gone_after >= Duration::from_secs(60) && gone_after < Duration::from_secs(61),
        "removed after {gone_after:?}"
    );
    assert!(r.snapshot().service("web").is_none());
    assert!(
        r.snapshot().node("n1").expect("n1").checks.is_empty(),
        "its checks go with it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_check_that_recovers_is_not_reaped() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![ttl_check(
            "n1",
            "a",
            Duration::from_secs(600),
            Some(Duration::from_secs(60)),
        )],
    )
    .await;
    tokio::time::advance(Duration::from_secs(30)).await;
    r.apply(Command::UpdateCheck {
        node: "n1".into(),
        id: "service:a".into(),
        status: Status::Passing,
        output: None,
        require_ttl: true,
    })
    .await
    .expect("pass");
    tokio::time::advance(Duration::from_secs(120)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(r.snapshot().instance("n1", "a").is_some());
}

#[tokio::test]
async fn update_on_a_check_without_ttl_is_refused_with_consuls_text() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![check("n1", "a", Status::Passing)],
    )
    .await;
    let err = r
        .apply(Command::UpdateCheck {
            node: "n1".into(),
            id: "service:a".into(),
            status: Status::Critical,
            output: None,
            require_ttl: true,
        })
        .await
        .expect_err("not ttl");
    assert!(matches!(err, RegistryError::NotTtl(_)));
    assert!(err.to_string().contains("does not have associated TTL"));
}

#[tokio::test]
async fn reregistration_keeps_the_status_of_checks_that_state_none() {
    let r = registry(&["n1"]).await;
    let ttl = || ttl_check("n1", "a", Duration::from_secs(60), None);
    register(&r, endpoint("n1", "a", "web", &[]), vec![ttl()]).await;
    r.apply(Command::UpdateCheck {
        node: "n1".into(),
        id: "service:a".into(),
        status: Status::Passing,
        output: None,
        require_ttl: true,
    })
    .await
    .expect("pass");
    register(&r, endpoint("n1", "a", "web", &["new-tag"]), vec![ttl()]).await;
    assert_eq!(routable_ids(&r, "web", Some("new-tag")), ["a"]);
}

#[tokio::test]
async fn concurrent_writes_share_commits() {
    let metrics = Arc::new(RegistryMetrics::unregistered());
    let (r, _writer) = Registry::start(MemoryStore::default(), metrics.clone()).expect("start");
    r.apply(Command::EnsureNode(node("n1")))
        .await
        .expect("node");
    let mut tasks = Vec::new();
    for i in 0..500 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            register(&r, endpoint("n1", &format!("e{i}"), "web", &[]), vec![]).await
        }));
    }
    for task in tasks {
        task.await.expect("join");
    }
    let commits = metrics.commit_commands.get_sample_count();
    assert_eq!(
        r.snapshot()
            .service("web")
            .expect("web")
            .instances()
            .count(),
        500
    );
    assert!(
        commits < 500,
        "500 writes took {commits} commits; group commit should fold them"
    );
}

#[tokio::test]
async fn embedded_store_recovers_everything_and_the_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index_before;
    {
        let store = EmbeddedStore::open(dir.path(), 8 << 20).expect("open");
        let r = start_with(store).await;
        r.apply(Command::EnsureNode(node("n1")))
            .await
            .expect("node");
        r.apply(Command::EnsureNode(node("n2")))
            .await
            .expect("node");
        register(
            &r,
            endpoint("n1", "a", "web", &["v1"]),
            vec![check("n1", "a", Status::Warning)],
        )
        .await;
        register(&r, endpoint("n2", "b", "web", &[]), vec![]).await;
        register(&r, endpoint("n2", "gone", "old", &[]), vec![]).await;
        register(&r, endpoint("n2", "cap", "Caps", &[]), vec![]).await;
        assert!(r.snapshot().service_ci("caps").is_some());
        r.apply(Command::DeregisterService {
            node: "n2".into(),
            id: "gone".into(),
        })
        .await
        .expect("deregister");
        r.apply(Command::Drain {
            node: "n2".into(),
            deadline_ms: Some(42),
        })
        .await
        .expect("drain");
        r.apply(Command::ServiceMaintenance {
            node: "n1".into(),
            id: "a".into(),
            enable: true,
            reason: Some("upgrade".into()),
        })
        .await
        .expect("maint");
        register(&r, endpoint("n1", "e", "web", &[]), vec![]).await;
        r.apply(Command::DrainEndpoint {
            node: "n1".into(),
            id: "e".into(),
            deadline_ms: Some(9),
        })
        .await
        .expect("drain endpoint");
        index_before = r.snapshot().index();
        r.shutdown().await;
    }
    let store = EmbeddedStore::open(dir.path(), 8 << 20).expect("reopen");
    let r = start_with(store).await;
    let snap = r.snapshot();
    assert_eq!(snap.index(), index_before);
    let a = snap.instance("n1", "a").expect("a survives");
    assert_eq!(a.state, EndpointState::Maintenance);
    assert_eq!(a.endpoint.tags, ["v1"]);
    assert!(a.checks.iter().any(|c| c.status == Status::Warning));
    let b = snap.instance("n2", "b").expect("b survives");
    assert_eq!(b.state, EndpointState::Draining);
    assert_eq!(b.node.drain.as_ref().and_then(|d| d.deadline_ms), Some(42));
    let e = snap.instance("n1", "e").expect("e survives");
    assert_eq!(e.state, EndpointState::Draining);
    assert_eq!(
        e.drain_deadline_ms(),
        Some(9),
        "an endpoint's drain is durable"
    );
    assert!(snap.service("old").is_none());
    assert!(
        snap.service_ci("caps").is_some(),
        "case-insensitive alias rebuilt on load"
    );
    assert!(
        snap.service_index("old") > 1,
        "tombstone index survives a restart"
    );
    let next = register(&r, endpoint("n1", "c", "web", &[]), vec![]).await;
    assert!(next > index_before);
}

/// What a reader can observe of a service, for comparing two catalogs.
fn observable(snap: &crate::snapshot::Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for view in snap.services_sorted() {
        for i in view.instances() {
            let checks: Vec<String> = i
                .checks
                .iter()
                .map(|c| format!("{}={}", c.id, c.status))
                .collect();
            out.push(format!(
                "{} {}/{} port={} state={:?} health={} addr={} checks={checks:?}",
                view.name,
                i.endpoint.node,
                i.endpoint.id,
                i.endpoint.port,
                i.state,
                i.health,
                i.address()
            ));
        }
        let key = |i: &crate::Instance| format!("{}/{}", i.endpoint.node, i.endpoint.id);
        let routable: Vec<String> = view.routable().map(key).collect();
        let passing: Vec<String> = view.passing().map(key).collect();
        let tags: Vec<&str> = view.tags().collect();
        out.push(format!(
            "{} routable={routable:?} passing={passing:?} tags={tags:?} counts={:?} len={} {} {}",
            view.name,
            view.counts,
            view.len(),
            view.routable_len(),
            view.passing_len()
        ));
    }
    out.push(format!("{:?} {}", snap.counts(), snap.service_count()));
    out
}

/// The same records loaded from scratch: what a restart would build.
fn rebuilt(snap: &crate::snapshot::Snapshot) -> Catalog {
    let mut loaded = crate::store::Loaded {
        index: snap.index(),
        ..Default::default()
    };
    for entry in snap.nodes() {
        loaded.nodes.push((*entry.node).clone());
        loaded
            .endpoints
            .extend(entry.endpoints.values().map(|e| (**e).clone()));
        loaded
            .checks
            .extend(entry.checks.values().map(|c| (**c).clone()));
    }
    Catalog::from_loaded(loaded, Default::default())
}

#[tokio::test]
async fn incremental_publishing_matches_a_full_rebuild() {
    let nodes = ["n1", "n2", "n3", "n4"];
    let services = ["web", "db", "cache"];
    let r = registry(&nodes).await;
    let mut rng = fastrand::Rng::with_seed(7);
    for step in 0..600 {
        let node = nodes[rng.usize(..nodes.len())];
        let id = format!("e{}", rng.usize(..12));
        let command = match rng.u8(..10) {
            0..=3 => {
                let service = services[rng.usize(..services.len())];
                let tags: &[&str] = if rng.bool() {
                    &["blue"]
                } else {
                    &["green", "x"]
                };
                let mut e = endpoint(node, &id, service, tags);
                e.port = rng.u16(1000..1010);
                let status = [Status::Passing, Status::Warning, Status::Critical][rng.usize(..3)];
                Command::RegisterService {
                    endpoint: e,
                    checks: vec![check(node, &id, status)],
                    replace_existing_checks: rng.bool(),
                }
            }
            4 => Command::DeregisterService {
                node: node.into(),
                id: id.as_str().into(),
            },
            5 => Command::UpdateCheck {
                node: node.into(),
                id: format!("service:{id}").into(),
                status: [Status::Passing, Status::Critical][rng.usize(..2)],
                output: Some(format!("step {step}")),
                require_ttl: false,
            },
            6 => Command::Drain {
                node: node.into(),
                deadline_ms: None,
            },
            7 if rng.bool() => Command::Undrain { node: node.into() },
            7 => Command::DrainEndpoint {
                node: node.into(),
                id: id.as_str().into(),
                deadline_ms: None,
            },
            8 => Command::NodeMaintenance {
                node: node.into(),
                enable: rng.bool(),
                reason: None,
            },
            _ => Command::ServiceMaintenance {
                node: node.into(),
                id: id.as_str().into(),
                enable: rng.bool(),
                reason: None,
            },
        };
        // Refusals (unknown ids) are part of the sequence on purpose.
        let _ = r.apply(command).await;
        let snap = r.snapshot();
        let fresh = rebuilt(&snap);
        assert_eq!(
            observable(&snap),
            observable(&fresh.snap),
            "diverged at step {step}"
        );
    }
}

#[tokio::test]
async fn a_rescheduled_task_replaces_its_old_incarnation() {
    let r = registry(&["n1", "n2"]).await;
    let task = |node: &str, incarnation: u64| {
        let mut e = endpoint(node, "job-7", "worker", &[]);
        e.incarnation = incarnation;
        Command::Batch(Batch {
            endpoints: vec![(e, Vec::new())],
            ..Batch::default()
        })
    };
    r.apply(task("n1", 1)).await.expect("first");
    r.apply(task("n2", 2)).await.expect("moved");
    let snap = r.snapshot();
    let view = snap.service("worker").expect("worker");
    let nodes: Vec<&str> = view.instances().map(|i| &*i.endpoint.node).collect();
    assert_eq!(nodes, ["n2"], "the task moved instead of duplicating");
    // A late registration of the old incarnation changes nothing.
    let before = r.snapshot().index();
    r.apply(task("n1", 1)).await.expect("stale is not an error");
    assert_eq!(r.snapshot().index(), before);
    assert!(r.snapshot().instance("n1", "job-7").is_none());
    // Endpoints without incarnations keep Consul's per-node identity.
    register(&r, endpoint("n1", "plain", "worker", &[]), vec![]).await;
    register(&r, endpoint("n2", "plain", "worker", &[]), vec![]).await;
    assert_eq!(
        r.snapshot()
            .service("worker")
            .expect("worker")
            .instances()
            .count(),
        3
    );
}

#[tokio::test]
async fn status_since_survives_updates_and_moves_on_a_change() {
    let r = registry(&["n1"]).await;
    register(
        &r,
        endpoint("n1", "a", "web", &[]),
        vec![check("n1", "a", Status::Passing)],
    )
    .await;
    let since =
        |r: &Registry| r.snapshot().instance("n1", "a").expect("a").checks[0].status_since_ms;
    let first = since(&r);
    assert!(first > 0);
    let update = |status, output: &str| Command::UpdateCheck {
        node: "n1".into(),
        id: "service:a".into(),
        status,
        output: Some(output.to_string()),
        require_ttl: false,
    };
    r.apply(update(Status::Passing, "still fine"))
        .await
        .expect("update");
    assert_eq!(
        since(&r),
        first,
        "same status: the clock keeps running from the first time"
    );
    let before_change = crate::model::unix_ms();
    r.apply(update(Status::Critical, "down"))
        .await
        .expect("update");
    assert!(
        since(&r) >= before_change,
        "a new status starts a new clock"
    );
    let why = r
        .snapshot()
        .instance("n1", "a")
        .expect("a")
        .excluded_because()
        .expect("excluded");
    assert!(
        why.starts_with("check service:a is critical (for ") && why.ends_with("): down"),
        "{why}"
    );
}

#[test]
fn members_switch_representation_and_stay_sorted() {
    use crate::snapshot::Members;
    let key =
        |i: usize| -> (Name, Name) { (format!("n{}", i % 7).into(), format!("e{i:03}").into()) };
    let mut members = Members::default();
    let mut model = std::collections::BTreeSet::new();
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..2000 {
        let k = key(rng.usize(..80));
        if rng.u8(..3) == 0 {
            members.remove(&k);
            model.remove(&k);
        } else {
            members.insert(k.clone());
            model.insert(k);
        }
        assert_eq!(members.len(), model.len());
        assert!(members.iter().eq(model.iter()), "same keys, same order");
        if members.len() > 32 {
            assert!(
                matches!(members, Members::Large(_)),
                "more than 32 members use the persistent set"
            );
        }
    }
    for k in model.iter() {
        members.remove(k);
    }
    assert!(members.is_empty());
    assert!(
        matches!(members, Members::Small(_)),
        "an emptied set is small again"
    );
}

/// Asserts two listings are equal, naming the first line that differs.
fn same_lines(got: &[String], want: &[String], step: usize) {
    if let Some(at) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "step {step}: line {at} differs: {:?} != {:?} ({} vs {} lines)",
            got.get(at),
            want.get(at),
            got.len(),
            want.len()
        );
    }
}

/// Records, per chunk, each instance's key and state; per view, the chunks'
/// records in order. Outputs built incrementally must equal a fresh record
/// of the view's instances.
struct Recorder;

fn record(service: &str, i: &crate::Instance) -> String {
    format!(
        "{service} {}/{} {:?} {}",
        i.endpoint.node,
        i.endpoint.id,
        i.state,
        i.endpoint.tags.join(",")
    )
}

impl crate::ViewDecorator for Recorder {
    type Chunk = Vec<String>;
    type Output = Vec<String>;

    fn decorate_chunk(
        &self,
        view: &crate::ViewHead<'_>,
        chunk: &crate::Chunk,
        _key: crate::ExtraKey<Recorder>,
    ) -> Arc<Vec<String>> {
        let out = chunk.instances().iter().map(|i| record(view.name, i));
        Arc::new(out.collect())
    }

    fn decorate(
        &self,
        view: &crate::ServiceView,
        change: &crate::ViewChange<'_>,
        key: crate::ExtraKey<Recorder>,
    ) -> Arc<Vec<String>> {
        assert!(
            !change.added.is_empty() || !change.removed.is_empty() || view.index > 0,
            "a view is decorated with what changed"
        );
        let records = view.chunks().iter().flat_map(|chunk| {
            chunk
                .extra(key)
                .expect("every chunk decorated")
                .iter()
                .cloned()
        });
        Arc::new(records.collect())
    }
}

#[tokio::test]
async fn chunked_views_change_only_what_a_write_touches_and_match_a_full_rebuild() {
    let mut decorators = Decorators::default();
    let key = decorators.add(Arc::new(Recorder));
    let metrics = Arc::new(RegistryMetrics::unregistered());
    let (r, _writer) =
        Registry::start_with(MemoryStore::default(), metrics, decorators.clone()).expect("start");
    // One large service over 40 nodes, more than a few chunks.
    let nodes: Vec<String> = (0..40).map(|n| format!("n{n:02}")).collect();
    let mut batch = Batch {
        nodes: nodes.iter().map(|n| node(n)).collect(),
        ..Batch::default()
    };
    for (n, name) in nodes.iter().enumerate() {
        for i in 0..100 {
            let id = format!("e{i:03}");
            let tags: &[&str] = if (n + i) % 3 == 0 {
                &["Blue"]
            } else {
                &["green"]
            };
            batch.endpoints.push((
                endpoint(name, &id, "web", tags),
                vec![check(name, &id, Status::Passing)],
            ));
        }
    }
    r.apply(Command::Batch(batch)).await.expect("batch");
    let view = r.snapshot().service("web").expect("web").clone();
    assert_eq!(view.len(), 4000);
    assert!(view.chunks().len() >= 4000 / switchyard_catalog::CHUNK);

    let mut rng = fastrand::Rng::with_seed(11);
    for step in 0..150 {
        let before = r.snapshot();
        let node_name = nodes[rng.usize(..nodes.len())].clone();
        let node_name = node_name.as_str();
        let id = format!("e{:03}", rng.usize(..130));
        let command = match rng.u8(..12) {
            0..=3 => {
                let tags: &[&str] = match rng.u8(..4) {
                    0 => &["Blue"],
                    1 => &["green", "canary"],
                    2 => &[],
                    _ => &["green"],
                };
                let status = [Status::Passing, Status::Warning, Status::Critical][rng.usize(..3)];
                Command::RegisterService {
                    endpoint: endpoint(node_name, &id, "web", tags),
                    checks: vec![check(node_name, &id, status)],
                    replace_existing_checks: false,
                }
            }
            4..=5 => Command::DeregisterService {
                node: node_name.into(),
                id: id.as_str().into(),
            },
            6 => Command::UpdateCheck {
                node: node_name.into(),
                id: format!("service:{id}").into(),
                status: [Status::Passing, Status::Critical][rng.usize(..2)],
                output: None,
                require_ttl: false,
            },
            7 => Command::Drain {
                node: node_name.into(),
                deadline_ms: None,
            },
            8 => Command::Undrain {
                node: node_name.into(),
            },
            9 => Command::NodeMaintenance {
                node: node_name.into(),
                enable: rng.bool(),
                reason: None,
            },
            10 => {
                // Many endpoints leave at once, as when a node is emptied.
                let gone = (0..130)
                    .map(|i| (Name::from(node_name), Name::from(format!("e{i:03}"))))
                    .collect();
                Command::Batch(Batch {
                    deregister_endpoints: gone,
                    ..Batch::default()
                })
            }
            _ => Command::Redecorate(vec!["web".into()]),
        };
        let redecorate = matches!(command, Command::Redecorate(_));
        let _ = r.apply(command).await;
        let snap = r.snapshot();
        let fresh = rebuilt(&snap);
        same_lines(&observable(&snap), &observable(&fresh.snap), step);
        let Some(view) = snap.service("web") else {
            continue;
        };
        // Decorations follow the instances, chunk by chunk.
        let expected: Vec<String> = view.instances().map(|i| record("web", i)).collect();
        same_lines(view.extra(key).expect("view decorated"), &expected, step);
        assert!(view
            .chunks()
            .iter()
            .all(|c| c.instances().len() <= switchyard_catalog::CHUNK));
        // Only the chunks holding the node that changed are new (two at the
        // most when a small one took a neighbour along, or a full one split).
        if let Some(old) = before.service("web") {
            let new_chunks = view
                .chunks()
                .iter()
                .filter(|c| !old.chunks().iter().any(|o| Arc::ptr_eq(o, c)))
                .count();
            if !redecorate && view.index != old.index {
                assert!(
                    new_chunks <= 4,
                    "step {step}: {new_chunks} of {} chunks rebuilt",
                    view.chunks().len()
                );
            }
        }
    }
}

#[tokio::test]
async fn kv_tombstones_are_reaped_past_the_cap_without_taking_an_index_back() {
    use switchyard_catalog::kv::MAX_TOMBSTONES;
    let dir = tempfile::tempdir().expect("tempdir");
    let (prefix_before, reaped_floor, left);
    {
        let store = EmbeddedStore::open(dir.path(), 8 << 20).expect("open");
        let r = start_with(store).await;
        // More keys than the cap, in transactions of 128 sets.
        let keys: Vec<String> = (0..=MAX_TOMBSTONES)
            .map(|i| format!("gone/{i:05}"))
            .collect();
        for chunk in keys.chunks(128) {
            let ops = chunk
                .iter()
                .map(|k| TxnOp {
                    verb: "set".into(),
                    key: k.clone(),
                    value: b"v".to_vec(),
                    ..TxnOp::default()
                })
                .collect();
            r.apply(Command::KvTxn {
                ops,
                out: Default::default(),
            })
            .await
            .expect("txn");
        }
        r.apply(Command::KvSet {
            key: "kept/a".into(),
            value: b"x".to_vec(),
            flags: 0,
            cas: None,
        })
        .await
        .expect("set");
        r.apply(Command::KvDelete {
            key: "gone/".into(),
            recurse: true,
            cas: None,
        })
        .await
        .expect("delete");
        // The writer reaps after that write, in a write of its own.
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.snapshot().kv.tombstone_count() > MAX_TOMBSTONES {
            assert!(Instant::now() < deadline, "not reaped");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let snap = r.snapshot();
        left = snap.kv.tombstone_count();
        // One delete made them all at one index: all go, the floor stays.
        assert_eq!(left, 0);
        prefix_before = snap.kv.prefix_index("gone/");
        reaped_floor = snap.kv.reaped;
        assert!(reaped_floor > 0);
        assert!(
            snap.kv.prefix_index("kept/") >= reaped_floor,
            "a floor for every prefix"
        );
        r.shutdown().await;
    }
    // Restarted: the same tombstones, the same floor, the same indexes.
    let store = EmbeddedStore::open(dir.path(), 8 << 20).expect("reopen");
    let r = start_with(store).await;
    let snap = r.snapshot();
    assert_eq!(snap.kv.tombstone_count(), left);
    assert_eq!(snap.kv.reaped, reaped_floor);
    assert_eq!(snap.kv.prefix_index("gone/"), prefix_before);
}
