//! Consul's sessions and locks (issue 30 item 2): the conformance cases of
//! CONSUL-KV.md §5 (16-26), a lock contended by five clients, and sessions
//! across agents on one etcd.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{eventually, Agent, Client};

fn create(c: &Client, body: Value) -> String {
    let answer = c.put("/v1/session/create", &body.to_string());
    assert_eq!(answer.status, 200, "create {body}: {}", answer.body);
    answer.json()["ID"].as_str().expect("ID").to_string()
}

fn info(c: &Client, id: &str) -> Value {
    c.get_ok(&format!("/v1/session/info/{id}")).json()
}

fn entry(c: &Client, key: &str) -> Option<Value> {
    let answer = c.get(&format!("/v1/kv/{key}"));
    (answer.status == 200).then(|| answer.json()[0].clone())
}

fn put(c: &Client, path: &str, body: &str) -> String {
    let answer = c.put(path, body);
    assert_eq!(answer.status, 200, "PUT {path}: {}", answer.body);
    answer.body
}

#[test]
fn sessions_are_created_checked_and_listed_as_consul_does() {
    let agent = Agent::start();
    let c = agent.client();
    let me = c.get_ok("/v1/agent/self").json()["Config"]["NodeName"]
        .as_str()
        .expect("node")
        .to_string();

    // 16. No body: this agent's node, serfHealth, 15 s, release.
    let id = create(&c, Value::Null);
    let s = &info(&c, &id)[0];
    assert_eq!(s["Node"], me.as_str());
    assert_eq!(s["NodeChecks"], json!(["serfHealth"]));
    assert_eq!(s["LockDelay"], 15_000_000_000u64);
    assert_eq!(s["Behavior"], "release");
    // 17. Patroni's body; a number of seconds as LockDelay.
    let patroni = create(
        &c,
        json!({"name": "x", "checks": [], "lockdelay": "0.001s", "behavior": "delete", "ttl": "15.0s"}),
    );
    let s = &info(&c, &patroni)[0];
    assert_eq!(
        (s["Behavior"].as_str(), s["TTL"].as_str()),
        (Some("delete"), Some("15s"))
    );
    assert_eq!(s["NodeChecks"], json!([]));
    assert_eq!(s["LockDelay"], 1_000_000u64);
    let fifteen = create(&c, json!({"LockDelay": 15}));
    assert_eq!(info(&c, &fifteen)[0]["LockDelay"], 15_000_000_000u64);

    // 18. Refusals: 500 with Consul's texts, nothing made.
    c.put_ok(
        "/v1/agent/check/register",
        &json!({"Name": "down", "ID": "down", "TTL": "1h"}).to_string(),
    );
    let before = c
        .get_ok("/v1/session/list")
        .json()
        .as_array()
        .expect("list")
        .len();
    for (body, text) in [
        (json!({"TTL": "5s"}), "Invalid Session TTL"),
        (json!({"TTL": "soon"}), "Session TTL 'soon' invalid"),
        (
            json!({"Behavior": "explode"}),
            "Invalid Behavior setting 'explode'",
        ),
        (json!({"Node": "ghost"}), "Missing node registration"),
        (
            json!({"Checks": ["nope"]}),
            "Missing check 'nope' registration",
        ),
        (
            json!({"Checks": ["down"]}),
            "Check 'down' is in critical state",
        ),
    ] {
        let answer = c.put("/v1/session/create", &body.to_string());
        assert_eq!(answer.status, 500, "{body}: {}", answer.body);
        assert!(answer.body.starts_with(text), "{body}: {}", answer.body);
    }
    assert_eq!(
        c.get_ok("/v1/session/list")
            .json()
            .as_array()
            .expect("list")
            .len(),
        before
    );
    let malformed = c.put("/v1/session/create", "{\"TTL\": ");
    assert_eq!(malformed.status, 400);

    // 19. An unknown session.
    let ghost = "9f0c6c1e-0000-4000-8000-000000000000";
    assert_eq!(info(&c, ghost), json!([]));
    let renew = c.put(&format!("/v1/session/renew/{ghost}"), "");
    assert_eq!(
        (renew.status, renew.body.as_str()),
        (404, format!("Session id '{ghost}' not found").as_str())
    );
    assert_eq!(put(&c, &format!("/v1/session/destroy/{ghost}"), ""), "true");
    // Listing by node, and a renewal of a live one.
    let mine = c.get_ok(&format!("/v1/session/node/{me}")).json();
    assert_eq!(mine.as_array().map(Vec::len), Some(3), "{mine}");
    let renewed = c.put(&format!("/v1/session/renew/{patroni}"), "");
    assert_eq!(renewed.status, 200);
    assert_eq!(renewed.json()[0]["ID"], patroni.as_str());
    put(&c, &format!("/v1/session/destroy/{patroni}"), "");
    assert_eq!(info(&c, &patroni), json!([]));
}

#[test]
fn locks_follow_their_sessions() {
    let agent = Agent::start();
    let c = agent.client();
    let s1 = create(&c, json!({"LockDelay": "2s"}));
    let s2 = create(&c, json!({}));

    // 25. Held; re-acquired by the holder; not released by another.
    assert_eq!(put(&c, &format!("/v1/kv/k?acquire={s1}"), "one"), "true");
    let held = entry(&c, "k").expect("k");
    assert_eq!(
        (held["Session"].as_str(), held["LockIndex"].as_u64()),
        (Some(s1.as_str()), Some(1))
    );
    assert_eq!(put(&c, &format!("/v1/kv/k?acquire={s1}"), "two"), "true");
    assert_eq!(entry(&c, "k").expect("k")["LockIndex"], 1, "unchanged");
    assert_eq!(
        put(&c, &format!("/v1/kv/k?acquire={s2}"), "x"),
        "false",
        "held"
    );
    assert_eq!(put(&c, &format!("/v1/kv/k?release={s2}"), "x"), "false");
    // A plain write keeps the lock.
    assert_eq!(put(&c, "/v1/kv/k", "plain"), "true");
    assert_eq!(entry(&c, "k").expect("k")["Session"], s1.as_str());

    // 24. Destroyed: released at once, then the lock delay.
    let before = entry(&c, "k").expect("k");
    put(&c, &format!("/v1/session/destroy/{s1}"), "");
    let released = entry(&c, "k").expect("k");
    assert!(released.get("Session").is_none(), "{released}");
    assert_eq!(released["LockIndex"], before["LockIndex"]);
    assert!(released["ModifyIndex"].as_u64() > before["ModifyIndex"].as_u64());
    let started = Instant::now();
    assert_eq!(
        put(&c, &format!("/v1/kv/k?acquire={s2}"), "x"),
        "false",
        "in its lock delay"
    );
    assert_eq!(put(&c, "/v1/kv/k", "plain"), "true", "plain writes go on");
    eventually("the lock delay ends", Duration::from_secs(10), || {
        (put(&c, &format!("/v1/kv/k?acquire={s2}"), "x") == "true").then_some(())
    });
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    // A release starts no delay.
    assert_eq!(put(&c, &format!("/v1/kv/k?release={s2}"), "x"), "true");
    assert_eq!(put(&c, &format!("/v1/kv/k?acquire={s2}"), "y"), "true");
    assert_eq!(entry(&c, "k").expect("k")["LockIndex"], 3);

    // 22. Behavior delete: the key goes, and a prefix watcher wakes.
    let s3 = create(&c, json!({"Behavior": "delete", "LockDelay": "0s"}));
    assert_eq!(
        put(&c, &format!("/v1/kv/eph/member?acquire={s3}"), "me"),
        "true"
    );
    let tree = c.get_ok("/v1/kv/eph/?recurse");
    let (index, base) = (tree.index, c.clone());
    let waiter = std::thread::spawn(move || {
        base.get(&format!("/v1/kv/eph/?recurse&index={index}&wait=30s"))
    });
    put(&c, &format!("/v1/session/destroy/{s3}"), "");
    let woke = waiter.join().expect("waiter");
    assert_eq!(woke.status, 404, "deleted: {}", woke.body);
    assert!(woke.index > index);

    // 21. A linked check: warning does nothing, critical ends the session.
    c.put_ok(
        "/v1/agent/check/register",
        &json!({"Name": "alive", "ID": "alive", "TTL": "1h", "Status": "passing"}).to_string(),
    );
    let s4 = create(&c, json!({"Checks": ["serfHealth", "alive"]}));
    assert_eq!(
        put(&c, &format!("/v1/kv/leader?acquire={s4}"), "me"),
        "true"
    );
    c.put_ok("/v1/agent/check/warn/alive", "");
    assert_eq!(
        info(&c, &s4).as_array().map(Vec::len),
        Some(1),
        "warning: still there"
    );
    c.put_ok("/v1/agent/check/fail/alive", "");
    assert_eq!(info(&c, &s4), json!([]), "critical: gone in the same write");
    let leader = entry(&c, "leader").expect("leader");
    assert!(leader.get("Session").is_none(), "{leader}");

    // 26. The node deregistered: its sessions go, their locks released.
    c.put_ok(
        "/v1/catalog/register",
        &json!({"Node": "n9", "Address": "10.0.0.9"}).to_string(),
    );
    let s5 = create(&c, json!({"Node": "n9", "Checks": []}));
    assert_eq!(
        put(&c, &format!("/v1/kv/n9-lock?acquire={s5}"), "n9"),
        "true"
    );
    c.put_ok("/v1/catalog/deregister", &json!({"Node": "n9"}).to_string());
    assert_eq!(info(&c, &s5), json!([]));
    assert!(entry(&c, "n9-lock").expect("kept").get("Session").is_none());

    // A prepared query bound to a session goes with it.
    let s6 = create(&c, json!({}));
    let made = c.post(
        "/v1/query",
        &json!({"Session": s6, "Service": {"Service": "db"}}).to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let query = made.json()["ID"].as_str().expect("ID").to_string();
    put(&c, &format!("/v1/session/destroy/{s6}"), "");
    assert_eq!(c.get(&format!("/v1/query/{query}")).status, 404);
}

#[test]
fn a_session_ends_twice_its_ttl_after_its_last_renewal() {
    let agent = Agent::start();
    let c = agent.client();
    let id = create(&c, json!({"TTL": "10s", "LockDelay": "0s"}));
    let started = Instant::now();
    assert_eq!(put(&c, &format!("/v1/kv/ttl?acquire={id}"), "v"), "true");
    // Renewed at 12 s (its first deadline is 20 s): still there at 21 s.
    eventually("12 s pass", Duration::from_secs(15), || {
        (started.elapsed() >= Duration::from_secs(12)).then_some(())
    });
    assert_eq!(c.put(&format!("/v1/session/renew/{id}"), "").status, 200);
    eventually("21 s pass", Duration::from_secs(15), || {
        (started.elapsed() >= Duration::from_secs(21)).then_some(())
    });
    assert_eq!(info(&c, &id).as_array().map(Vec::len), Some(1), "renewed");
    // No more renewals: gone 20 s after the last one, not before 19 s.
    let renewed_at = Duration::from_secs(12);
    eventually("the session ends", Duration::from_secs(20), || {
        (info(&c, &id) == json!([])).then_some(())
    });
    let ended = started.elapsed();
    assert!(ended >= renewed_at + Duration::from_secs(19), "{ended:?}");
    assert!(entry(&c, "ttl").expect("kept").get("Session").is_none());
}

/// Five clients contend for one lock, each with its session: over 200
/// hand-overs, never two holders at once (each holder checks and marks a
/// shared flag while it holds).
#[test]
fn a_lock_contended_by_five_clients_has_one_holder_at_a_time() {
    let agent = Agent::start();
    let held = Arc::new(AtomicBool::new(false));
    let handovers = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..5)
        .map(|_| {
            let c = agent.client();
            let (held, handovers, overlaps) = (held.clone(), handovers.clone(), overlaps.clone());
            std::thread::spawn(move || {
                let id = create(&c, json!({"LockDelay": "0s"}));
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut index = 0;
                while handovers.load(Ordering::SeqCst) < 200 && Instant::now() < deadline {
                    if put(&c, &format!("/v1/kv/svc/leader?acquire={id}"), "me") == "true" {
                        if held.swap(true, Ordering::SeqCst) {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        handovers.fetch_add(1, Ordering::SeqCst);
                        held.store(false, Ordering::SeqCst);
                        assert_eq!(
                            put(&c, &format!("/v1/kv/svc/leader?release={id}"), ""),
                            "true"
                        );
                    } else {
                        // Wait for the holder to let go (Consul's lock loop).
                        let answer = c.get(&format!("/v1/kv/svc/leader?index={index}&wait=1s"));
                        index = answer.index;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    assert!(handovers.load(Ordering::SeqCst) >= 200, "{handovers:?}");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
}

#[test]
fn sessions_and_locks_across_agents_on_one_etcd() {
    // (Etcd::single says loudly when etcd is not installed.)
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let agent = |name: &str| crate::cluster::agent_on(scratch.path(), name, &[etcd.url()], "/sess");
    let (a, b) = (agent("sess-a"), agent("sess-b"));
    let (ca, cb) = (a.client(), b.client());
    // Each agent's node has its lease's serfHealth before a session links it.
    for (c, node) in [(&ca, "sess-a"), (&cb, "sess-b")] {
        eventually("the node's serfHealth", Duration::from_secs(10), || {
            let checks = c.get_ok(&format!("/v1/health/node/{node}")).json();
            checks
                .as_array()?
                .iter()
                .any(|ch| ch["CheckID"] == "serfHealth" && ch["Status"] == "passing")
                .then_some(())
        });
    }
    let sa = create(&ca, json!({"LockDelay": "0s"}));
    let sb = create(&cb, json!({"LockDelay": "0s"}));
    eventually("b knows a's session", Duration::from_secs(10), || {
        (info(&cb, &sa).as_array()?.len() == 1).then_some(())
    });
    // a's session locks through b; b's cannot take it through a.
    assert_eq!(
        put(&cb, &format!("/v1/kv/leader?acquire={sa}"), "a"),
        "true"
    );
    assert_eq!(
        put(&ca, &format!("/v1/kv/leader?acquire={sb}"), "b"),
        "false"
    );

    // a dies: its node's lease lapses, serfHealth turns critical, its
    // session ends and b takes the lock.
    a.kill9();
    let started = Instant::now();
    eventually("b takes over", Duration::from_secs(30), || {
        (put(&cb, &format!("/v1/kv/leader?acquire={sb}"), "b") == "true").then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(info(&cb, &sa), json!([]));
    assert_eq!(
        entry(&cb, "leader").expect("leader")["Session"],
        sb.as_str()
    );

    // A TTL session made through b is renewed through a third agent, and
    // both see it.
    let c = agent("sess-c");
    let cc = c.client();
    let st = create(&cb, json!({"TTL": "10s"}));
    eventually("c knows it", Duration::from_secs(10), || {
        (info(&cc, &st).as_array()?.len() == 1).then_some(())
    });
    assert_eq!(cc.put(&format!("/v1/session/renew/{st}"), "").status, 200);
}
