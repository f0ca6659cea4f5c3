//! The command line: client commands against a running agent, and configs.

use std::process::Command;

use serde_json::Value;

use crate::support::{bin, Agent};

pub(crate) fn run(args: &[&str], api: &str) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("SWITCHYARD_API", api)
        .output()
        .expect("run switchyard")
}

/// `agent --dev --check-config --config PATH`: loads and checks a config.
pub(crate) fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .args(["agent", "--dev", "--check-config", "--config"])
        .arg(path)
        .output()
        .expect("run switchyard")
}

#[test]
fn register_services_and_endpoints_commands() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("batch.json");
    std::fs::write(
        &file,
        r#"{"nodes":[{"name":"n1","address":"10.3.0.1"}],
            "endpoints":[{"node":"n1","service":"pay","id":"pay-1","port":9000},
                         {"node":"n1","service":"pay","id":"pay-2","port":9001,
                          "checks":[{"ttl":"1m"}]}]}"#,
    )
    .expect("write");
    let out = run(&["register", file.to_str().expect("utf8")], &agent.api);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("registered"));

    let out = run(&["services", "--json"], &agent.api);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    let pay = list
        .as_array()
        .expect("arr")
        .iter()
        .find(|s| s["name"] == "pay")
        .expect("pay")
        .clone();
    assert_eq!(pay["endpoints"], 2);
    assert_eq!(pay["routable"], 1);

    let out = run(&["services"], &agent.api);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pay ") && l.contains(" 2 ")),
        "{table}"
    );

    let out = run(&["endpoints", "pay"], &agent.api);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("pay-2"))
        .expect("pay-2 row");
    assert!(
        row.contains("critical") && row.contains("check service:pay-2 is critical"),
        "{row}"
    );

    let out = run(&["endpoints", "pay", "--json"], &agent.api);
    assert!(out.status.success());
    let service: Value = serde_json::from_slice(&out.stdout).expect("endpoints --json is JSON");
    let states: Vec<&str> = service["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, ["passing", "critical"]);

    let out = run(&["nodes", "--json"], &agent.api);
    assert!(out.status.success());
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("nodes --json is JSON");
    let n1 = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "n1")
        .expect("n1");
    assert_eq!(n1["state"], "active");
    assert_eq!(n1["endpoints"], 2);

    let out = run(&["endpoints", "nope"], &agent.api);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn client_commands_say_when_the_agent_is_unreachable() {
    let out = run(&["services"], "http://127.0.0.1:1");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent"), "{err}");
}

/// Every config in `configs/` passes `--check-config` exactly as a user
/// would run it (no `--dev`, no data directory given), and the check prints
/// a summary a person reads, not a debug dump.
#[test]
fn every_shipped_config_checks_as_it_is() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let out = Command::new(bin())
            .args(["agent", "--check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run switchyard");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with("configuration ok"), "{stdout}");
        for role in ["api ", "store ", "dns ", "http "] {
            assert!(
                stdout.lines().any(|l| l.starts_with(role)),
                "{}: no {role:?} line in\n{stdout}",
                path.display()
            );
        }
        assert!(
            !stdout.contains(" {\n") && !stdout.contains("Some("),
            "a debug dump: {stdout}"
        );
    }
    assert!(seen >= 2, "no configs found");
}

#[test]
fn a_bad_config_names_the_line_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\ndatacenter = \"dc1\"\n\n[api]\naddr = \"not an address\"\n",
    )
    .expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 5") && err.contains("addr"),
        "{err}"
    );

    // --dev serves xDS on its default address unless the file says
    // otherwise; without --dev it is off.
    std::fs::write(&path, "[agent]\ndatacenter = \"dc1\"\n").expect("write");
    let out = check_config(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("xds        127.0.0.1:18000"), "{text}");
    let out = Command::new(bin())
        .args(["agent", "--check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("xds "));
    // An xDS listener reachable from other hosts needs tokens.
    std::fs::write(&path, "[xds]\naddr = \"0.0.0.0:18000\"\n").expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xds.addr") && err.contains("api.tokens"),
        "{err}"
    );
    std::fs::write(&path, "[xds]\nmax_streams = 0\n").expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xds.max_streams"));

    std::fs::write(&path, "[agent]\nsurprise = 1\n").expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise"));

    // The check says a data directory is still needed; starting without one
    // is refused before anything is bound.
    let out = Command::new(bin())
        .args(["agent", "--check-config"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("needs --data-dir"));
    let out = Command::new(bin())
        .args(["agent", "--api-addr", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "no data dir and no --dev");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no data directory"));
}

#[test]
fn bad_proxy_config_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let cases = [
        ("[http]\nretries = 9\n", "retries"),
        ("[http]\nbalancer = \"fastest\"\n", "balancer"),
        (
            "[[http.routes]]\nhost = \"http://a\"\nservice = \"s\"\n",
            "host",
        ),
        (
            "[[http.routes]]\npath_prefix = \"api\"\nservice = \"s\"\n",
            "path_prefix",
        ),
        (
            "[[http.routes]]\nservice = \"s\"\nhash_on = \"body\"\n",
            "hash_on",
        ),
        (
            "[http.outlier]\nmax_ejected_percent = 150\n",
            "max_ejected_percent",
        ),
    ];
    for (text, key) in cases {
        std::fs::write(&path, text).expect("write");
        let out = Command::new(bin())
            .args(["agent", "--dev", "--check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err} does not name {key}");
    }
}

#[test]
fn status_shows_listeners_and_counts_and_logs_can_be_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_in(&dir.path().join("data"), &["--log-format", "json"]);
    let out = run(&["status"], &agent.api);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("http {}", agent.http)), "{text}");
    assert!(text.contains("index"), "{text}");
    assert!(text.contains("snapshot published"), "{text}");
    let out = run(&["status", "--json"], &agent.api);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json parses");
    assert_eq!(status["listeners"]["dns"], agent.dns.to_string());
    assert!(status["nodes"].as_u64().is_some_and(|n| n >= 1));
    // Every log line is a JSON object.
    let log = agent.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(parsed.get("level").is_some(), "{line}");
    }
}

/// Text logs carry ANSI colours only on a terminal, and not even there with
/// `NO_COLOR` set. The agent is started on a taken API port, so it logs that
/// its store opened and then exits on its own.
#[test]
fn logs_have_no_colour_codes_off_a_terminal_or_with_no_color() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf8");
    let args = [
        "agent",
        "--data-dir",
        data,
        "--api-addr",
        &format!("127.0.0.1:{port}"),
        "--dns-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    // Off a terminal: stderr is a pipe.
    let out = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store opened"), "{err}");
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");

    // On a terminal (script(1) gives the agent a pty): colours, unless NO_COLOR.
    let on_tty = |no_color: bool| {
        let command = format!("{} {}", bin(), args.join(" "));
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &command, "/dev/null"])
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd
            .output()
            .expect("script(1) (util-linux) is needed for this test");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let coloured = on_tty(false);
    assert!(coloured.contains("store opened"), "{coloured}");
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_tty(true);
    assert!(plain.contains("store opened"), "{plain}");
    assert!(
        !plain.contains("\x1b["),
        "colour despite NO_COLOR: {plain:?}"
    );
    drop(taken);
}

/// The workspace's `rust-version` is at least what every locked dependency
/// declares, so the toolchain the project names is one that builds it.
#[test]
fn the_declared_toolchain_builds_every_locked_dependency() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let version = |v: &Value| -> Option<(u64, u64)> {
        let mut parts = v.as_str()?.split('.').map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
    };
    let packages = meta["packages"].as_array().expect("packages");
    let ours = packages
        .iter()
        .find(|p| p["name"] == "switchyard")
        .and_then(|p| version(&p["rust_version"]))
        .expect("the workspace declares rust-version");
    let needed = packages
        .iter()
        .filter_map(|p| Some((version(&p["rust_version"])?, p["name"].as_str()?)))
        .max()
        .expect("some dependency declares rust-version");
    assert!(
        ours >= needed.0,
        "rust-version {}.{} is below {}'s {}.{}",
        ours.0,
        ours.1,
        needed.1,
        needed.0 .0,
        needed.0 .1
    );
}
