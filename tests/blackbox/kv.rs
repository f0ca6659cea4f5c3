//! Consul's KV store (issue 30 item 1): the conformance cases of
//! CONSUL-KV.md §5 (1-13), blocking reads that wake only for their key or
//! prefix, a kill -9 of the embedded store, and two agents on one etcd.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{eventually, Agent, Client};

/// A raw HTTP/1.1 exchange (bodies that are not text, chunked bodies):
/// status, headers (lower-case names), body.
fn raw(base: &str, request: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&all[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, all[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn put(c: &Client, path: &str, body: &str) -> String {
    let answer = c.put(path, body);
    assert_eq!(answer.status, 200, "PUT {path}: {}", answer.body);
    answer.body
}

fn keys(c: &Client, path: &str) -> Value {
    c.get_ok(path).json()
}

#[test]
fn kv_reads_and_writes_as_consul_does() {
    let agent = Agent::start();
    let c = agent.client();

    // 1. A value, read back whole.
    assert_eq!(put(&c, "/v1/kv/a/b", "x"), "true");
    let read = c.get_ok("/v1/kv/a/b");
    let entry = &read.json()[0];
    assert_eq!(entry["Key"], "a/b");
    assert_eq!(entry["Value"], "eA==");
    assert_eq!(entry["Flags"], 0);
    assert_eq!(entry["LockIndex"], 0);
    assert!(entry.get("Session").is_none(), "no Session when unlocked");
    let index = entry["ModifyIndex"].as_u64().expect("index");
    assert_eq!(entry["CreateIndex"].as_u64(), Some(index));
    assert_eq!(read.index, index);

    // 2. A missing key: 404, empty body, the meta headers.
    let missing = c.get("/v1/kv/no/such");
    assert_eq!(missing.status, 404);
    assert!(missing.body.is_empty());
    assert!(missing.index >= 1);
    assert!(missing.header("X-Consul-KnownLeader").is_some());

    // 3. An empty value is null; raw is byte-exact, binary included.
    assert_eq!(put(&c, "/v1/kv/empty", ""), "true");
    assert_eq!(c.get_ok("/v1/kv/empty").json()[0]["Value"], Value::Null);
    let (status, headers, body) = raw(
        &agent.api,
        b"GET /v1/kv/empty?raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(header(&headers, "content-type"), Some("text/plain"));
    let binary: Vec<u8> = (0..=255u8).collect();
    let mut request = format!(
        "PUT /v1/kv/bin HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        binary.len()
    )
    .into_bytes();
    request.extend_from_slice(&binary);
    let (status, _, body) = raw(&agent.api, &request);
    assert_eq!((status, body.as_slice()), (200, &b"true"[..]));
    let (status, headers, body) = raw(
        &agent.api,
        b"GET /v1/kv/bin?raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body), (200, binary));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));

    // 4. Keys with a separator, the misspelling, a missing prefix, and
    // the whole store's keys.
    for key in ["web/foo", "web/bar", "web/sub/x", "web/sub/y"] {
        put(&c, &format!("/v1/kv/{key}"), "v");
    }
    let cut = json!(["web/bar", "web/foo", "web/sub/"]);
    assert_eq!(keys(&c, "/v1/kv/web/?keys&separator=/"), cut);
    assert_eq!(keys(&c, "/v1/kv/web/?keys&seperator=/"), cut);
    assert_eq!(
        keys(&c, "/v1/kv/web/?keys"),
        json!(["web/bar", "web/foo", "web/sub/x", "web/sub/y"])
    );
    assert_eq!(c.get("/v1/kv/nope/?keys").status, 404);

    // 5. Recurse: sorted; a deletion raises the prefix's index.
    let tree = c.get_ok("/v1/kv/web/?recurse");
    let listed: Vec<String> = tree
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["Key"].as_str().expect("key").to_string())
        .collect();
    assert_eq!(listed, ["web/bar", "web/foo", "web/sub/x", "web/sub/y"]);
    assert_eq!(put(&c, "/v1/kv/other/x", "1"), "true");
    assert_eq!(c.delete("/v1/kv/web/foo").body, "true");
    let after = c.get_ok("/v1/kv/web/?recurse");
    assert!(after.index > tree.index, "{} > {}", after.index, tree.index);
    assert_eq!(after.json().as_array().expect("list").len(), 3);

    // 8. Flags as full uint64; a later PUT without flags clears them.
    put(&c, "/v1/kv/flagged?flags=18446744073709551615", "v");
    let flagged = c.get_ok("/v1/kv/flagged").body;
    assert!(
        flagged.contains("\"Flags\":18446744073709551615"),
        "{flagged}"
    );
    put(&c, "/v1/kv/flagged", "w");
    assert_eq!(c.get_ok("/v1/kv/flagged").json()[0]["Flags"], 0);

    // 9. CAS.
    assert_eq!(put(&c, "/v1/kv/a/b?cas=0", "y"), "false", "exists");
    assert_eq!(put(&c, "/v1/kv/fresh?cas=0", "y"), "true", "absent");
    let now = c.get_ok("/v1/kv/a/b").json()[0]["ModifyIndex"]
        .as_u64()
        .expect("index");
    assert_eq!(
        put(&c, &format!("/v1/kv/a/b?cas={}", now - 1), "z"),
        "false"
    );
    assert_eq!(put(&c, &format!("/v1/kv/a/b?cas={now}"), "z"), "true");
    assert_eq!(c.get_ok("/v1/kv/a/b").json()[0]["Value"], "eg==");

    // 10. Conflicting flags.
    let conflict = c.put("/v1/kv/a/b?cas=1&acquire=s", "v");
    assert_eq!(conflict.status, 400);
    assert!(
        conflict.body.starts_with("Conflicting flags"),
        "{}",
        conflict.body
    );
    assert_eq!(c.delete("/v1/kv/a/?recurse&cas=1").status, 400);
    // No sessions exist yet: an acquire is refused as for an unknown one.
    let acquire = c.put("/v1/kv/lock?acquire=abc", "v");
    assert_eq!(acquire.status, 500);
    assert!(
        acquire.body.starts_with("invalid session"),
        "{}",
        acquire.body
    );
    assert_eq!(c.get("/v1/kv/lock").status, 404, "nothing written");

    // 11. Deletes.
    assert_eq!(c.delete("/v1/kv/never/there").body, "true");
    let fresh = c.get_ok("/v1/kv/fresh").json()[0]["ModifyIndex"]
        .as_u64()
        .expect("index");
    assert_eq!(
        c.delete(&format!("/v1/kv/fresh?cas={}", fresh + 1)).body,
        "false"
    );
    assert_eq!(c.delete("/v1/kv/fresh?cas=0").body, "false");
    assert_eq!(c.delete(&format!("/v1/kv/fresh?cas={fresh}")).body, "true");
    assert_eq!(c.get("/v1/kv/fresh").status, 404);
    assert_eq!(c.delete("/v1/kv/?recurse").body, "true");
    assert_eq!(keys(&c, "/v1/kv/?keys"), json!([]), "the store emptied");

    // 12. The value limit, declared or chunked; nothing stored.
    let big = vec![b'x'; 512 * 1024 + 1];
    let mut request = format!(
        "PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    request.extend_from_slice(&big);
    let (status, _, body) = raw(&agent.api, &request);
    assert_eq!(status, 413);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("Value exceeds"), "{text}");
    let mut request =
        b"PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for chunk in big.chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let (status, _, _) = raw(&agent.api, &request);
    assert_eq!(status, 413);
    assert_eq!(c.get("/v1/kv/big").status, 404);

    // 13. Odd keys; Traefik's probe; no climbing out of a prefix.
    put(&c, "/v1/kv/foo%20bar", "1");
    assert_eq!(c.get_ok("/v1/kv/foo%20bar").json()[0]["Key"], "foo bar");
    put(&c, "/v1/kv/foo%C3%A7bar", "1");
    assert_eq!(c.get_ok("/v1/kv/foo%C3%A7bar").json()[0]["Key"], "fooçbar");
    put(&c, "/v1/kv/a%2Fb", "1");
    assert_eq!(c.get_ok("/v1/kv/a/b").json()[0]["Key"], "a/b");
    let probe = c.get("/v1/kv/traefik/qmslkjdfmqlskdjfmqlksjazcueznbvbwzlkajzebvkwjdcqmlsfj");
    assert_eq!(probe.status, 404);
    let climb = c.put("/v1/kv/a/%2E%2E/b", "1");
    assert_eq!(climb.status, 400, "{}", climb.body);
    assert_eq!(
        c.get("/v1/kv/?keys").json(),
        json!(["a/b", "foo bar", "fooçbar"])
    );
    let no_key = c.put("/v1/kv/", "1");
    assert_eq!(
        (no_key.status, no_key.body.as_str()),
        (400, "Missing key name")
    );
}

#[test]
fn a_blocking_kv_read_wakes_only_for_its_key_or_prefix() {
    let agent = Agent::start();
    let c = agent.client();
    put(&c, "/v1/kv/web/a", "1");
    let tree = c.get_ok("/v1/kv/web/?recurse");

    // 6. Another prefix's write: the wait runs out, same index.
    let (index, base) = (tree.index, c.clone());
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = base.get_ok(&format!("/v1/kv/web/?recurse&index={index}&wait=2s"));
        (answer, started.elapsed())
    });
    put(&c, "/v1/kv/other/x", "1");
    let (answer, took) = waiter.join().expect("waiter");
    assert_eq!(answer.index, index, "not woken by other/x");
    assert!(took >= Duration::from_millis(1900), "{took:?}");

    // A write under it: woken, with the new entry.
    let base = c.clone();
    let waiter = std::thread::spawn(move || {
        base.get_ok(&format!("/v1/kv/web/?recurse&index={index}&wait=30s"))
    });
    put(&c, "/v1/kv/web/z", "2");
    let woke = waiter.join().expect("waiter");
    assert!(woke.index > index);
    assert_eq!(woke.json().as_array().expect("list").len(), 2);

    // 7. A missing key: the read blocks until the key is created.
    let missing = c.get("/v1/kv/later");
    assert_eq!(missing.status, 404);
    let (index, base) = (missing.index, c.clone());
    let waiter = std::thread::spawn(move || {
        let mut index = index;
        loop {
            let answer = base.get(&format!("/v1/kv/later?index={index}&wait=30s"));
            if answer.status == 200 {
                return answer;
            }
            index = answer.index;
        }
    });
    put(&c, "/v1/kv/later", "here");
    let woke = waiter.join().expect("waiter");
    assert_eq!(woke.json()[0]["Value"], "aGVyZQ==");
}

#[test]
fn kv_survives_a_kill_of_the_embedded_store() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let data = scratch.path().join("data");
    let agent = Agent::start_in(&data, &[]);
    let c = agent.client();
    for i in 0..50 {
        put(&c, &format!("/v1/kv/cfg/{i}"), &format!("value-{i}"));
    }
    assert_eq!(c.delete("/v1/kv/cfg/7").body, "true");
    // A session and its lock are kept too.
    let made = c.put("/v1/session/create", &json!({"Name": "kept"}).to_string());
    let session = made.json()["ID"].as_str().expect("ID").to_string();
    assert_eq!(
        put(&c, &format!("/v1/kv/cfg/leader?acquire={session}"), "me"),
        "true"
    );
    let before = c.get_ok("/v1/kv/cfg/?recurse");
    agent.kill9();

    let agent = Agent::start_in(&data, &[]);
    let c = agent.client();
    let after = eventually("the keys are back", Duration::from_secs(10), || {
        let answer = c.get("/v1/kv/cfg/?recurse");
        (answer.status == 200).then_some(answer)
    });
    assert_eq!(after.json(), before.json(), "every acknowledged write");
    assert_eq!(
        after.index, before.index,
        "the prefix's index, its deletion included"
    );
    let kept = c.get_ok(&format!("/v1/session/info/{session}")).json();
    assert_eq!(kept[0]["Name"], "kept", "{kept}");
    let other = c.put("/v1/session/create", "").json()["ID"]
        .as_str()
        .expect("ID")
        .to_string();
    assert_eq!(
        put(&c, &format!("/v1/kv/cfg/leader?acquire={other}"), "you"),
        "false",
        "still held by the session made before the kill"
    );
}

#[test]
fn kv_is_shared_by_the_agents_on_one_etcd() {
    // (Etcd::single says loudly when etcd is not installed.)
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let agent = |name: &str| crate::cluster::agent_on(scratch.path(), name, &[etcd.url()], "/kv");
    let (a, b) = (agent("kv-a"), agent("kv-b"));
    let (ca, cb) = (a.client(), b.client());
    put(&ca, "/v1/kv/app/x", "1");
    put(&ca, "/v1/kv/app/y", "2");
    let seen = eventually("b sees a's writes", Duration::from_secs(10), || {
        let answer = cb.get("/v1/kv/app/?recurse");
        (answer.status == 200 && answer.json().as_array()?.len() == 2).then_some(answer)
    });
    let at_a = ca.get_ok("/v1/kv/app/?recurse");
    assert_eq!(
        seen.json(),
        at_a.json(),
        "the same entries, the same indexes"
    );
    assert_eq!(seen.index, at_a.index);

    // A blocking read on b wakes for a's delete; CAS across agents.
    let (index, base) = (seen.index, cb.clone());
    let waiter = std::thread::spawn(move || {
        base.get_ok(&format!("/v1/kv/app/?recurse&index={index}&wait=30s"))
    });
    assert_eq!(ca.delete("/v1/kv/app/x").body, "true");
    let woke = waiter.join().expect("waiter");
    assert!(woke.index > index);
    assert_eq!(woke.json().as_array().expect("list").len(), 1);
    let y = cb.get_ok("/v1/kv/app/y").json()[0]["ModifyIndex"]
        .as_u64()
        .expect("index");
    assert_eq!(put(&ca, &format!("/v1/kv/app/y?cas={y}"), "3"), "true");
    assert_eq!(
        put(&cb, &format!("/v1/kv/app/y?cas={y}"), "4"),
        "false",
        "stale"
    );

    // A fresh agent reads the same, tombstones included.
    let kv_c = agent("kv-c");
    let c = kv_c.client();
    let fresh = eventually("c has the store", Duration::from_secs(10), || {
        let answer = c.get("/v1/kv/app/?recurse");
        (answer.status == 200).then_some(answer)
    });
    let at_a = ca.get_ok("/v1/kv/app/?recurse");
    assert_eq!(fresh.json(), at_a.json());
    assert_eq!(
        fresh.index, at_a.index,
        "the prefix's index, its deletion included"
    );
}

#[test]
fn consul_endpoints_not_built_answer_501_never_404() {
    let agent = Agent::start();
    let c = agent.client();
    for (method, path) in [
        ("GET", "/v1/operator/raft/configuration"),
        ("PUT", "/v1/event/fire/deploy"),
        ("GET", "/v1/acl/tokens"),
        ("GET", "/v1/connect/ca/roots"),
    ] {
        let answer = match method {
            "GET" => c.get(path),
            _ => c.put(path, ""),
        };
        assert_eq!(answer.status, 501, "{method} {path}: {}", answer.body);
        assert!(
            answer.body.contains(path),
            "names the endpoint: {}",
            answer.body
        );
    }
    assert_eq!(c.get("/nothing/here").status, 404, "outside the API: 404");
    // One agent on the embedded store: itself, alone, in the lead.
    let members = c.get_ok("/v1/agent/members").json();
    let me = c.get_ok("/v1/agent/self").json()["Config"]["NodeName"].clone();
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
    assert_eq!(members[0]["Name"], me);
    assert_eq!(members[0]["Status"], 1);
    let read = c.get_ok("/v1/catalog/services");
    assert_eq!(read.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(read.header("X-Consul-LastContact"), Some("0"));
    assert_eq!(read.header("X-Consul-Default-ACL-Policy"), Some("allow"));
}

#[test]
fn headers_and_status_tell_the_truth_about_etcd() {
    // (Etcd::single says loudly when etcd is not installed.)
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut etcd = crate::cluster::Etcd::single(scratch.path());
    let token = "truth-reader-token-0123456789";
    let tokens =
        format!("[[api.tokens]]\nname = \"reader\"\nrole = \"read\"\nsecret = \"{token}\"\n");
    let agent =
        crate::cluster::agent_on_with(scratch.path(), "truth-a", &[etcd.url()], "/truth", &tokens);
    let c = agent.client_with_token(token);
    let etcd_addr = etcd.url().trim_start_matches("http://").to_string();
    eventually("etcd named as leader", Duration::from_secs(15), || {
        (c.get_ok("/v1/status/leader").json() == json!(etcd_addr)).then_some(())
    });
    assert_eq!(c.get_ok("/v1/status/peers").json(), json!([etcd_addr]));
    let read = c.get_ok("/v1/catalog/services");
    assert_eq!(read.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(
        read.header("X-Consul-Default-ACL-Policy"),
        Some("deny"),
        "tokens set"
    );
    let members = c.get_ok("/v1/agent/members").json();
    assert!(
        members
            .as_array()
            .expect("list")
            .iter()
            .any(|m| m["Name"] == "truth-a"),
        "{members}"
    );

    // etcd stopped: reads go on, stale, and say so.
    etcd.kill();
    let stale = eventually("reads marked stale", Duration::from_secs(20), || {
        let read = c.get_ok("/v1/catalog/services");
        (read.header("X-Consul-KnownLeader") == Some("false")).then_some(read)
    });
    let age: u64 = stale
        .header("X-Consul-LastContact")
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(age > 0, "the time since etcd last answered: {age}");
    etcd.restart();
    eventually("reads current again", Duration::from_secs(30), || {
        let read = c.get_ok("/v1/catalog/services");
        (read.header("X-Consul-KnownLeader") == Some("true")).then_some(())
    });
}

#[test]
fn a_txn_applies_all_of_its_kv_operations_or_none() {
    let agent = Agent::start();
    let c = agent.client();
    let set = |key: &str, value: &str| json!({"KV": {"Verb": "set", "Key": key, "Value": base64_of(value)}});
    // 14. Three sets: 200, each result without its value.
    let ok = c.put(
        "/v1/txn",
        &json!([set("t/a", "1"), set("t/b", "2"), set("t/c", "3")]).to_string(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let body = ok.json();
    assert_eq!(body["Errors"], Value::Null);
    let results = body["Results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["KV"]["Key"], "t/a");
    assert_eq!(results[0]["KV"]["Value"], Value::Null);
    let index = results[0]["KV"]["ModifyIndex"].as_u64().expect("index");
    assert_eq!(
        c.get_ok("/v1/kv/t/a").json()[0]["ModifyIndex"].as_u64(),
        Some(index)
    );

    // A stale CAS fails the whole transaction: 409, nothing applied.
    let failed = c.put(
        "/v1/txn",
        &json!([
            {"KV": {"Verb": "cas", "Key": "t/a", "Value": base64_of("x"), "Index": index - 1}},
            set("t/untouched", "y"),
            {"KV": {"Verb": "check-not-exists", "Key": "t/b"}},
            {"KV": {"Verb": "frobnicate", "Key": "t/b"}},
        ])
        .to_string(),
    );
    assert_eq!(failed.status, 409, "{}", failed.body);
    let body = failed.json();
    assert_eq!(body["Results"], Value::Null);
    let errors = body["Errors"].as_array().expect("errors");
    let at: Vec<u64> = errors
        .iter()
        .map(|e| e["OpIndex"].as_u64().expect("i"))
        .collect();
    assert_eq!(at, [0, 2, 3], "{body}");
    assert!(errors[0]["What"]
        .as_str()
        .expect("what")
        .contains("index is stale"));
    assert!(errors[1]["What"].as_str().expect("what").contains("exists"));
    assert!(errors[2]["What"]
        .as_str()
        .expect("what")
        .contains("unknown KV verb"));
    assert_eq!(c.get("/v1/kv/t/untouched").status, 404, "nothing applied");
    assert_eq!(c.get_ok("/v1/kv/t/a").json()[0]["Value"], "MQ==");

    // 15. Reads: get-tree gives one result per key, with values.
    let read = c.put(
        "/v1/txn",
        &json!([{"KV": {"Verb": "get-tree", "Key": "t/"}}]).to_string(),
    );
    assert_eq!(read.status, 200, "{}", read.body);
    let results = read.json()["Results"].as_array().expect("results").clone();
    assert_eq!(results.len(), 3);
    assert_eq!(
        read.header("X-Consul-Index"),
        None,
        "a read-only txn has none"
    );
    assert!(read.header("X-Consul-LastContact").is_some());
    assert_eq!(results[2]["KV"]["Value"], "Mw==");
    // Operation limits.
    let ops: Vec<Value> = (0..128).map(|i| set(&format!("many/{i}"), "v")).collect();
    assert_eq!(c.put("/v1/txn", &json!(ops).to_string()).status, 200);
    let ops: Vec<Value> = (0..129).map(|i| set(&format!("many/{i}"), "v")).collect();
    let over = c.put("/v1/txn", &json!(ops).to_string());
    assert_eq!(over.status, 413);
    assert!(
        over.body.contains("too many operations (129 > 128)"),
        "{}",
        over.body
    );
    // Bad input: 400, nothing applied.
    let bad = c.put(
        "/v1/txn",
        &json!([{"KV": {"Verb": "set", "Key": "bad", "Value": "%%%"}}]).to_string(),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.starts_with("Failed to parse body"), "{}", bad.body);
    let node = c.put(
        "/v1/txn",
        &json!([{"Node": {"Verb": "get", "Node": {"Node": "n"}}}]).to_string(),
    );
    assert_eq!(node.status, 400, "{}", node.body);
    assert_eq!(c.get("/v1/kv/bad").status, 404);
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
