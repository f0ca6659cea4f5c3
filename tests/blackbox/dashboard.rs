//! The web dashboard in a real browser: Debian's headless Chromium, driven
//! over the DevTools protocol, against a running agent. It lists the
//! registered services, its drain button drains a node (with the deadline
//! chosen on the page) and the page shows it; with tokens configured it asks
//! for one and refuses a drain to a read-only token.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::proxy::agent_with;
use crate::security::{config as token_config, OPERATOR, READ};
use crate::support::{eventually, Agent};

/// The browser binary: `$SWITCHYARD_CHROMIUM`, or Debian's `chromium`.
fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_CHROMIUM") {
        return PathBuf::from(path);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "the dashboard test needs Chromium and found none at /usr/bin/chromium: \
         install it (apt-get install -y chromium; .ci/run does) or set SWITCHYARD_CHROMIUM"
    );
}

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(chromium_binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = eventually(
            "chromium's DevToolsActivePort",
            Duration::from_secs(60),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("chromium exited at start: {status}");
                }
                let text = std::fs::read_to_string(&port_file).ok()?;
                text.lines().next()?.trim().parse().ok()
            },
        );
        let list: Value = eventually("chromium's target list", Duration::from_secs(30), || {
            let mut answer = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
                .call()
                .ok()?;
            answer.body_mut().read_json().ok()
        });
        let url = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|page| page["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {list}"))
            .to_string();
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect devtools");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("devtools handshake");
        Browser {
            child,
            socket,
            next_id: 1,
            _profile: profile,
        }
    }

    /// One DevTools command and its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .expect("send to devtools");
        loop {
            let reply = self.socket.read().expect("read from devtools");
            let tungstenite::Message::Text(text) = reply else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str()).expect("devtools json");
            if reply["id"] != id {
                continue; // an event
            }
            if let Some(error) = reply.get("error") {
                panic!("{method} failed: {error}");
            }
            return reply["result"].clone();
        }
    }

    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until the page's script has run (it is a plain script at the end
    /// of the body): before that a click does nothing and a submitted token
    /// form reloads the page instead of keeping the token.
    fn wait_until_scripted(&mut self) {
        self.wait_for("the page's script", "document.readyState !== 'loading'");
    }

    /// Polls `expression` until it yields something other than null/false.
    fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.eval(expression);
            if !value.is_null() && value != Value::Bool(false) {
                return value;
            }
            if Instant::now() > deadline {
                let page = self.eval("document.body ? document.body.innerText : ''");
                panic!("timed out waiting for {what}; the page shows:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut ignored = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut ignored);
        }
    }
}

fn register_catalog(agent: &Agent, token: Option<&str>) {
    let batch = json!({
        "nodes": [{"name": "n1", "address": "127.0.0.1"}, {"name": "n2", "address": "127.0.0.2"}],
        "endpoints": [
            {"node": "n1", "service": "web", "id": "web-1", "address": "127.0.0.1", "port": 9001},
            {"node": "n2", "service": "web", "id": "web-2", "address": "127.0.0.2", "port": 9001},
            {"node": "n2", "service": "billing", "id": "billing-1", "address": "127.0.0.2", "port": 9002},
        ],
    });
    let mut request = ureq::put(&format!("{}/v1/switchyard/batch", agent.api));
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    request
        .send(batch.to_string())
        .expect("register the catalog");
}

const SERVICE_NAMES: &str = "[...document.querySelectorAll('#services tr[data-service]')].map(r => r.dataset.service).join(',') || null";

fn phase_of(node: &str) -> String {
    format!("(document.querySelector('#nodes tr[data-node=\"{node}\"]')?.dataset.phase ?? null)")
}

fn click(browser: &mut Browser, node: &str, action: &str) {
    browser.wait_until_scripted();
    let clicked = browser.eval(&format!(
        "(() => {{ const b = document.querySelector('#nodes tr[data-node=\"{node}\"] button[data-action=\"{action}\"]'); if (!b) return false; b.click(); return true; }})()"
    ));
    assert_eq!(clicked, Value::Bool(true), "no {action} button for {node}");
}

#[test]
fn the_dashboard_lists_services_and_its_drain_button_drains_a_node() {
    let agent = Agent::start();
    register_catalog(&agent, None);
    let c = agent.client();
    let mut browser = Browser::start();

    browser.open(&format!("{}/ui/", agent.api));
    let names = browser.wait_for("the services table", SERVICE_NAMES);
    assert_eq!(names, "billing,web", "services listed in order");
    let web_total = browser.eval(
        "document.querySelector('#services tr[data-service=\"web\"] td:nth-child(2)').textContent",
    );
    assert_eq!(web_total, "2");

    browser.open(&format!("{}/ui/nodes", agent.api));
    assert_eq!(browser.wait_for("node n1", &phase_of("n1")), "active");
    // The deadline chosen on the page travels with the drain.
    browser.eval("document.getElementById('deadline').value = '30m'");
    click(&mut browser, "n1", "drain");
    let phase = browser.wait_for(
        "n1 to show its drain",
        &format!("(p => p === 'active' ? null : p)({})", phase_of("n1")),
    );
    assert!(phase == "draining" || phase == "drained", "phase {phase}");
    let status = c.get_ok("/v1/switchyard/nodes/n1/drain").json();
    assert_ne!(status["state"], "active", "{status}");
    let deadline = status["deadline_ms"].as_u64().expect("a deadline") as i64;
    let since = status["since_ms"].as_u64().expect("since") as i64;
    assert!(
        (deadline - since - 30 * 60 * 1000).abs() < 60_000,
        "the 30m deadline from the page: {status}"
    );
    assert_eq!(
        browser.eval(&phase_of("n2")),
        "active",
        "only n1 was drained"
    );
    // The services page counts the drained endpoint.
    browser.open(&format!("{}/ui/", agent.api));
    browser.wait_for(
        "web's draining count",
        "document.querySelector('#services tr[data-service=\"web\"] td:nth-child(8)')?.textContent === '1'",
    );

    // Undrain from the page, and the page follows the API's answer.
    browser.open(&format!("{}/ui/nodes", agent.api));
    browser.wait_for("node n1", &phase_of("n1"));
    click(&mut browser, "n1", "undrain");
    browser.wait_for(
        "n1 active again",
        &format!("{} === 'active'", phase_of("n1")),
    );
    let status = c.get_ok("/v1/switchyard/nodes/n1/drain").json();
    assert_eq!(
        status["state"],
        "active",
        "{status}\nthe agent's log:\n{}",
        agent.stderr()
    );
}

#[test]
fn with_tokens_the_dashboard_asks_for_one_and_drains_only_for_an_operator() {
    let (agent, _dir) = agent_with(&token_config());
    register_catalog(&agent, Some(OPERATOR));
    let mut browser = Browser::start();

    browser.open(&format!("{}/ui/", agent.api));
    browser.wait_for(
        "the token form",
        "document.getElementById('login') !== null",
    );
    let leaked = browser.eval("document.querySelector('#services') !== null");
    assert_eq!(leaked, Value::Bool(false), "no data without a token");

    let sign_in = |browser: &mut Browser, token: &str| {
        browser.wait_until_scripted();
        browser.eval(&format!(
            "(() => {{ const f = document.getElementById('login'); f.token.value = '{token}'; f.requestSubmit(); return true; }})()"
        ));
    };
    sign_in(&mut browser, READ);
    let names = browser.wait_for("the services table", SERVICE_NAMES);
    assert_eq!(names, "billing,web");

    // A read token sees the nodes but its drain is refused, visibly.
    browser.open(&format!("{}/ui/nodes", agent.api));
    browser.wait_for("node n1", &phase_of("n1"));
    click(&mut browser, "n1", "drain");
    let refusal = browser.wait_for(
        "the refusal",
        "(f => f.hidden ? null : f.textContent)(document.getElementById('flash'))",
    );
    let refusal = refusal.as_str().unwrap_or_default().to_string();
    assert!(refusal.contains("403"), "{refusal}");
    assert!(refusal.contains("operator"), "{refusal}");
    assert_eq!(browser.eval(&phase_of("n1")), "active");

    // An operator token drains.
    browser.eval("sessionStorage.setItem('switchyard-token', 'nobody-knows-this-token-1'); true");
    browser.open(&format!("{}/ui/nodes", agent.api));
    browser.wait_for(
        "the token form for an unknown token",
        "document.getElementById('login') !== null",
    );
    sign_in(&mut browser, OPERATOR);
    browser.wait_for("node n1", &phase_of("n1"));
    click(&mut browser, "n1", "drain");
    browser.wait_for(
        "n1 drained by the operator",
        &format!("(p => p === 'active' ? null : p)({})", phase_of("n1")),
    );
}
