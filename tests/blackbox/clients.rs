//! Real Consul clients against an agent (issue 30): py-consul's KV,
//! session, lock, transaction and prepared-query calls
//! (`tests/clients/py_consul.py`). `tools/test` installs py-consul in a
//! virtualenv (`target/py-consul`); `SWITCHYARD_PY_CONSUL` may name
//! another Python that has it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::Agent;

/// A Python with py-consul, or a loud failure saying how to get one.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_PY_CONSUL") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py-consul/bin/python");
    assert!(
        venv.exists(),
        "py-consul is not installed: run tools/test (it makes target/py-consul), \
         or set SWITCHYARD_PY_CONSUL to a python that can `import consul`"
    );
    venv
}

#[test]
fn py_consul_drives_kv_sessions_txn_and_queries() {
    let python = python();
    let agent = Agent::start();
    let api = agent
        .api
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/py_consul.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&api)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "py-consul failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all good"));
}

/// A Patroni node, killed (-9) with its PostgreSQL when dropped.
struct Group {
    patroni: std::process::Child,
    data: PathBuf,
}

impl Group {
    fn kill(&mut self) {
        let group = |pid: i32| {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        };
        // Patroni's group, then the postmaster (Patroni starts it in a
        // group of its own).
        group(self.patroni.id() as i32);
        let _ = self.patroni.wait();
        let postmaster = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = postmaster.and_then(rustix::process::Pid::from_raw) {
            // Its children end when it does.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// PostgreSQL's server programs (Debian's layout), or a loud failure.
fn postgres_bin() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin"))
                .find(|bin| bin.join("pg_ctl").exists())
        });
    found.expect(
        "PostgreSQL is not installed: run tools/test (apt-get install -y postgresql patroni python3-consul)",
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port()
}

/// Patroni (Debian's, on python-consul) runs two PostgreSQL nodes with
/// Switchyard as its Consul: one leads through a session-held lock; killed,
/// the other is promoted within the TTL plus a loop; `patronictl list`
/// works (CONSUL-KV.md §5, 30).
#[test]
fn patroni_elects_and_fails_over_through_switchyard() {
    let patroni = which("patroni").expect(
        "patroni is not installed: run tools/test (apt-get install -y patroni python3-consul postgresql)",
    );
    let bin = postgres_bin();
    let agent = Agent::start();
    let c = agent.client();
    let api = agent
        .api
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().to_path_buf();
    // PostgreSQL runs as `postgres` (it refuses root): it writes here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let root = rustix::process::geteuid().is_root();
    let config = |name: &str| -> PathBuf {
        let path = dir.join(format!("{name}.yml"));
        let text = format!(
            "scope: sy\nname: {name}\n\
             restapi:\n  listen: 127.0.0.1:{rest}\n  connect_address: 127.0.0.1:{rest}\n\
             consul:\n  host: {api}\n\
             bootstrap:\n  dcs:\n    ttl: 20\n    loop_wait: 2\n    retry_timeout: 5\n  initdb:\n  - encoding: UTF8\n\
             postgresql:\n  listen: 127.0.0.1:{pg}\n  connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n  bin_dir: {bin}\n\
             \x20 authentication:\n    superuser: {{username: postgres, password: pw}}\n\
             \x20   replication: {{username: replicator, password: pw}}\n\
             \x20 pg_hba:\n  - host all all 127.0.0.1/32 trust\n  - host replication all 127.0.0.1/32 trust\n  - local all all trust\n\
             \x20 parameters:\n    unix_socket_directories: {dir}\n",
            rest = free_port(),
            pg = free_port(),
            data = dir.join(format!("data-{name}")).display(),
            bin = bin.display(),
            dir = dir.display(),
        );
        std::fs::write(&path, text).expect("config");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        path
    };
    let start = |name: &str| -> Group {
        let path = config(name);
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let mut command = match root {
            true => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&patroni);
                c
            }
            false => Command::new(&patroni),
        };
        command.arg(&path);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let patroni = command
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start patroni");
        Group {
            patroni,
            data: dir.join(format!("data-{name}")),
        }
    };
    let leader = || -> Option<(String, bool)> {
        let answer = c.get("/v1/kv/service/sy/leader");
        (answer.status == 200).then(|| {
            let entry = &answer.json()[0];
            let value = entry["Value"].as_str().unwrap_or_default();
            let name = base64_decode(value);
            (name, entry.get("Session").is_some())
        })
    };
    let mut pg1 = start("pg1");
    let log =
        |name: &str| std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    crate::support::eventually("pg1 leads", Duration::from_secs(90), || {
        (leader() == Some(("pg1".to_string(), true))).then_some(())
    });
    let _pg2 = start("pg2");
    crate::support::eventually("pg2 follows", Duration::from_secs(90), || {
        log("pg2")
            .contains("following a leader (pg1)")
            .then_some(())
    });
    // The leader dies with its postgres: its session is no longer renewed.
    pg1.kill();
    let killed = Instant::now();
    crate::support::eventually("pg2 is promoted", Duration::from_secs(60), || {
        (leader() == Some(("pg2".to_string(), true))).then_some(())
    });
    let took = killed.elapsed();
    // ttl 20 s + loop_wait 2 s, and a margin for the machine.
    assert!(
        took < Duration::from_secs(32),
        "promoted after {took:?}\n{}",
        log("pg2")
    );
    let mut list = match root {
        true => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "patronictl"]);
            c
        }
        false => Command::new("patronictl"),
    };
    let out = list
        .arg("-c")
        .arg(dir.join("pg2.yml"))
        .arg("list")
        .output()
        .expect("patronictl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("pg2") && l.contains("Leader")),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.exists())
    })
}

fn base64_decode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
