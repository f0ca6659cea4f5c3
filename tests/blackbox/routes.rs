//! Routes managed through `/v1/switchyard/routes` (issue 32, item 1): live
//! on the next request after the acknowledgment, above config and tag
//! routes, durable, shared by a cluster's agents, behind the operator role.

use serde_json::{json, Value};

use crate::cli::run;
use crate::proxy::{agent_with, get, register, Upstream};
use crate::security::{config as token_config, OPERATOR, READ};
use crate::support::{eventually, Agent};

const CONFIG: &str = "[[http.routes]]\nhost = \"p.test\"\nservice = \"cfg\"\n";

/// Upstreams named after their services `cfg`, `api` and `tagged` (the last
/// with a tag route on p.test and t.test).
fn services(agent: &Agent) -> Vec<Upstream> {
    let c = agent.client();
    let ups: Vec<Upstream> = ["cfg", "api", "tagged"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    register(&c, "cfg", &[&ups[0]], &[]);
    register(&c, "api", &[&ups[1]], &[]);
    register(
        &c,
        "tagged",
        &[&ups[2]],
        &["switchyard.http.host=p.test", "switchyard.http.host=t.test"],
    );
    ups
}

fn body(agent: &Agent, host: &str) -> String {
    let reply = get(agent.http, host, "/");
    format!("{} {}", reply.status, reply.body.trim_end())
}

#[test]
fn an_api_route_is_live_after_its_ack_and_overrides_config_and_tags() {
    let (agent, _dir) = agent_with(CONFIG);
    let _ups = services(&agent);
    let c = agent.client();
    // The config route holds p.test ahead of the tag route.
    assert_eq!(body(&agent, "p.test"), "200 cfg");
    assert_eq!(body(&agent, "t.test"), "200 tagged");
    assert_eq!(get(agent.http, "n.test", "/").status, 404);

    // Created: the very next request uses it, no waiting.
    let ack = c.put_ok(
        "/v1/switchyard/routes/new-site",
        r#"{"host": "n.test", "service": "api"}"#,
    );
    assert!(
        ack.json()["index"].as_u64().is_some_and(|i| i > 0),
        "{ack:?}"
    );
    assert_eq!(body(&agent, "n.test"), "200 api");
    // Updated.
    c.put_ok(
        "/v1/switchyard/routes/new-site",
        r#"{"host": "n.test", "service": "cfg"}"#,
    );
    assert_eq!(body(&agent, "n.test"), "200 cfg");
    let got = c.get_ok("/v1/switchyard/routes/new-site").json();
    assert_eq!(got["route"], json!({"host": "n.test", "service": "cfg"}));
    // Over the config route of the same host and prefix, and back.
    c.put_ok(
        "/v1/switchyard/routes/takeover",
        r#"{"host": "p.test", "service": "api", "response_headers": {"set": {"x-via": "api"}}}"#,
    );
    let reply = get(agent.http, "p.test", "/");
    assert_eq!(
        (reply.body.as_str(), reply.headers["x-via"].as_str()),
        ("api", "api")
    );
    let listed = c.get_ok("/v1/switchyard/routes").json();
    let row = |name: &str| -> Value {
        listed
            .as_array()
            .expect("list")
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {listed}"))
    };
    assert_eq!(row("takeover")["source"], "api");
    assert_eq!(row("p.test/")["source"], "config");
    assert_eq!(row("p.test/")["shadowed_by"], "takeover");
    assert_eq!(row("tags:tagged")["source"], "tags");
    let out = run(&["routes"], &agent.api);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("takeover") && l.contains(" api ")),
        "{text}"
    );
    assert!(text.contains("overridden by takeover"), "{text}");
    c.delete("/v1/switchyard/routes/takeover");
    assert_eq!(body(&agent, "p.test"), "200 cfg");
    // Deleted: gone at once.
    let gone = c.delete("/v1/switchyard/routes/new-site");
    assert_eq!(gone.status, 200, "{gone:?}");
    assert_eq!(get(agent.http, "n.test", "/").status, 404);
    assert_eq!(c.get("/v1/switchyard/routes/new-site").status, 404);
    assert_eq!(c.delete("/v1/switchyard/routes/new-site").status, 404);
}

#[test]
fn an_invalid_route_is_refused_whole_naming_the_field() {
    let (agent, _dir) = agent_with(CONFIG);
    let c = agent.client();
    let before = c.get_ok("/v1/switchyard/routes").json();
    for (name, route, says) in [
        ("bad*name", r#"{"service": "api"}"#, "route name"),
        ("r", r#"{"host": "x.test"}"#, "missing field `service`"),
        ("r", r#"{"service": "api", "retries": "many"}"#, "retries"),
        (
            "r",
            r#"{"service": "api", "split": [{"tag": "v1", "weight": "a"}]}"#,
            "split[0].weight",
        ),
        (
            "r",
            r#"{"service": "api", "deny": ["10.0.0.0/99"]}"#,
            "deny",
        ),
        (
            "r",
            r#"{"service": "api", "rate_limit": {"rate": "lots"}}"#,
            "rate_limit.rate",
        ),
        (
            "r",
            r#"{"service": "api", "request_headers": {"set": {"x-forwarded-for": "1"}}}"#,
            "request_headers",
        ),
        (
            "r",
            r#"{"service": "api", "path_prefix": "nope"}"#,
            "path_prefix",
        ),
        ("r", "{not json", "route"),
    ] {
        let answer = c.put(&format!("/v1/switchyard/routes/{name}"), route);
        assert_eq!(answer.status, 400, "{route}: {answer:?}");
        assert!(answer.body.contains(says), "{route}: {}", answer.body);
    }
    assert_eq!(
        c.get_ok("/v1/switchyard/routes").json(),
        before,
        "nothing stored"
    );
    assert_eq!(c.get("/v1/switchyard/routes/r").status, 404);
    // The KV API neither writes nor deletes them.
    c.put_ok(
        "/v1/switchyard/routes/kept",
        r#"{"host": "k.test", "service": "api"}"#,
    );
    let direct = c.put("/v1/kv/switchyard/routes/sneaky", r#"{"service": "api"}"#);
    assert_eq!(direct.status, 403, "{direct:?}");
    assert!(direct.body.contains("/v1/switchyard/routes"), "{direct:?}");
    assert_eq!(c.delete("/v1/kv/switchyard/routes/kept").status, 403);
    c.put_ok("/v1/kv/app/x", "1");
    c.delete("/v1/kv/?recurse");
    assert_eq!(
        c.get("/v1/kv/app/x").status,
        404,
        "the recursive delete ran"
    );
    assert_eq!(
        c.get_ok("/v1/switchyard/routes/kept").json()["route"]["host"],
        "k.test"
    );
}

#[test]
fn routes_need_the_operator_role_to_change_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, token_config()).expect("write config");
    let args = [
        "--config",
        path.to_str().expect("utf8"),
        "--proxy-threads",
        "1",
    ];
    let data = dir.path().join("data");
    let agent = Agent::start_in(&data, &args);
    let route = r#"{"host": "n.test", "service": "api"}"#;
    let reader = agent.client_with_token(READ);
    let refused = reader.put("/v1/switchyard/routes/site", route);
    assert_eq!(refused.status, 403, "{refused:?}");
    let scheduler = agent.client_with_token("register-token-0123456789");
    assert_eq!(
        scheduler.put("/v1/switchyard/routes/site", route).status,
        403
    );
    assert_eq!(scheduler.delete("/v1/switchyard/routes/site").status, 403);
    let oncall = agent.client_with_token(OPERATOR);
    oncall.put_ok("/v1/switchyard/routes/site", route);
    assert_eq!(
        reader.get_ok("/v1/switchyard/routes/site").json()["route"]["service"],
        "api"
    );
    assert_eq!(
        agent.client().get("/v1/switchyard/routes").status,
        401,
        "no token"
    );
    // Durable: the route comes back with the agent.
    agent.kill9();
    let agent = Agent::start_in(&data, &args);
    let up = Upstream::start("api");
    register(&agent.client_with_token(OPERATOR), "api", &[&up], &[]);
    assert_eq!(body(&agent, "n.test"), "200 api");
}

#[test]
fn an_api_route_made_on_one_agent_routes_on_every_agent() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let etcd = crate::cluster::Etcd::single(scratch.path());
    let urls = [etcd.url()];
    let a = crate::cluster::agent_on_with(scratch.path(), "agent-a", &urls, "/routes", "");
    let b = crate::cluster::agent_on_with(scratch.path(), "agent-b", &urls, "/routes", "");
    let up = Upstream::start("api");
    register(&a.client(), "api", &[&up], &[]);
    a.client().put_ok(
        "/v1/switchyard/routes/site",
        r#"{"host": "n.test", "service": "api"}"#,
    );
    assert_eq!(
        body(&a, "n.test"),
        "200 api",
        "live on the agent that acknowledged it"
    );
    eventually(
        "agent B routes it",
        std::time::Duration::from_secs(10),
        || (body(&b, "n.test") == "200 api").then_some(()),
    );
    b.client().delete("/v1/switchyard/routes/site");
    assert_eq!(get(b.http, "n.test", "/").status, 404);
    eventually(
        "agent A drops it",
        std::time::Duration::from_secs(10),
        || (get(a.http, "n.test", "/").status == 404).then_some(()),
    );
}
