//! Real Consul clients against an agent (issue 30): py-consul's KV,
//! session, lock, transaction and prepared-query calls
//! (`tests/clients/py_consul.py`). `tools/test` installs py-consul in a
//! virtualenv (`target/py-consul`); `SWITCHYARD_PY_CONSUL` may name
//! another Python that has it.

use std::path::PathBuf;
use std::process::Command;

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
