//! Test harness: a running agent, an HTTP client, and polling with deadlines.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Held by the tests whose agent runs `--demo`: its backends take
/// 127.0.0.1:9001-9003 when free, and the README's steps rely on it.
pub(crate) static DEMO_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

/// A `switchyard agent` child process, killed on drop.
pub(crate) struct Agent {
    child: Option<Child>,
    pub(crate) api: String,
    /// DNS address (UDP and TCP).
    pub(crate) dns: std::net::SocketAddr,
    /// HTTP proxy address.
    pub(crate) http: std::net::SocketAddr,
    /// L4 listeners' addresses, in config order.
    pub(crate) tcp: Vec<std::net::SocketAddr>,
    /// HTTPS listener, when configured.
    pub(crate) https: Option<std::net::SocketAddr>,
    /// The dedicated metrics listener (`api.metrics_addr`), when configured.
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// The xDS listener, when configured.
    pub(crate) xds: Option<std::net::SocketAddr>,
    stderr_path: PathBuf,
    _scratch: Option<tempfile::TempDir>,
}

impl Agent {
    /// An agent with a fresh data directory of its own.
    pub(crate) fn start() -> Agent {
        let scratch = tempfile::tempdir().expect("tempdir");
        let dir = scratch.path().join("data");
        let mut agent = Agent::start_in(&dir, &[]);
        agent._scratch = Some(scratch);
        agent
    }

    /// An agent on `data_dir` (kept after the agent stops).
    pub(crate) fn start_in(data_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_in_env(data_dir, extra, &[])
    }

    /// `start_in` with extra environment variables.
    pub(crate) fn start_in_env(data_dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Agent {
        let stderr_path = data_dir.with_extension(format!("stderr-{}", fastrand_suffix()));
        std::fs::create_dir_all(data_dir.parent().expect("parent")).expect("mkdir");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let named = extra.contains(&"--node-name");
        let mut child = Command::new(bin())
            .args([
                "agent",
                "--api-addr",
                "127.0.0.1:0",
                "--dns-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(if named {
                &[][..]
            } else {
                &["--node-name", "test-node"][..]
            })
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn switchyard");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("agent printed no ready line within 30 s; stderr:\n{log}");
            }
        };
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        assert_eq!(ready["ready"], true, "{line}");
        let api = ready["api_url"].as_str().expect("api url").to_string();
        let dns = ready["dns"]
            .as_str()
            .expect("dns address")
            .parse()
            .expect("dns addr");
        let http = ready["http"]
            .as_str()
            .expect("http address")
            .parse()
            .expect("http addr");
        let tcp = ready["tcp"]
            .as_array()
            .expect("tcp addresses")
            .iter()
            .map(|a| a.as_str().and_then(|a| a.parse().ok()).expect("tcp addr"))
            .collect();
        let https = ready["https"].as_str().and_then(|a| a.parse().ok());
        let metrics = ready["metrics"].as_str().and_then(|a| a.parse().ok());
        let xds = ready["xds"].as_str().and_then(|a| a.parse().ok());
        Agent {
            child: Some(child),
            api,
            dns,
            http,
            tcp,
            https,
            metrics,
            xds,
            stderr_path,
            _scratch: None,
        }
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(&self.api)
    }

    /// A client that presents `token` (X-Consul-Token) with every request.
    pub(crate) fn client_with_token(&self, token: &str) -> Client {
        Client {
            base: self.api.clone(),
            token: Some(token.to_string()),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub(crate) fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
        }
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) without waiting.
    pub(crate) fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits (bounded) for the agent to exit on its own.
    pub(crate) fn wait_exit(mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub(crate) fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- agent stderr ----\n{}", self.stderr());
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn fastrand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// An HTTP answer: status, `X-Consul-Index` (0 if absent) and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) index: u64,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`).
    pub(crate) fn new(base: &str) -> Client {
        Client {
            base: base.to_string(),
            token: None,
        }
    }
}

impl Client {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    }

    fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut response = response.expect("HTTP request");
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let index = headers
            .iter()
            .find(|(k, _)| k == "x-consul-index")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .expect("body");
        Answer {
            status,
            index,
            headers,
            body,
        }
    }

    fn with_token<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("X-Consul-Token", token),
            None => request,
        }
    }

    pub(crate) fn get(&self, path: &str) -> Answer {
        Self::answer(
            self.with_token(Self::agent().get(format!("{}{path}", self.base)))
                .call(),
        )
    }

    pub(crate) fn put(&self, path: &str, body: &str) -> Answer {
        Self::answer(
            self.with_token(Self::agent().put(format!("{}{path}", self.base)))
                .header("Content-Type", "application/json")
                .send(body),
        )
    }

    pub(crate) fn post(&self, path: &str, body: &str) -> Answer {
        Self::answer(
            self.with_token(Self::agent().post(format!("{}{path}", self.base)))
                .header("Content-Type", "application/json")
                .send(body),
        )
    }

    pub(crate) fn delete(&self, path: &str) -> Answer {
        Self::answer(
            self.with_token(Self::agent().delete(format!("{}{path}", self.base)))
                .call(),
        )
    }

    /// PUT that must succeed.
    pub(crate) fn put_ok(&self, path: &str, body: &str) -> Answer {
        let answer = self.put(path, body);
        assert_eq!(answer.status, 200, "PUT {path}: {}", answer.body);
        answer
    }

    /// GET that must succeed.
    pub(crate) fn get_ok(&self, path: &str) -> Answer {
        let answer = self.get(path);
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
        answer
    }

    /// The value of one sample in `/metrics`, e.g. `switchyard_api_blocking_queries`.
    pub(crate) fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.get_ok("/metrics").body;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(sample))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub(crate) fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A real HTTP backend for health checks: answers every request with the
/// status in `status` and counts what it served.
pub(crate) struct Backend {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    /// Requests answered with a status other than 2xx.
    pub(crate) failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend {
    pub(crate) fn start() -> Backend {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let failures = Arc::new(AtomicUsize::new(0));
        let (s, f) = (status.clone(), failures.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let code = s.load(Ordering::SeqCst);
                if !(200..300).contains(&code) {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                let reply = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Backend {
            addr,
            status,
            failures,
        }
    }
}

/// Open client connections on proxy threads 0 and 1, from the metrics.
fn per_thread(c: &Client) -> Option<(f64, f64)> {
    let a = c.metric("switchyard_proxy_thread_connections{thread=\"0\"}")?;
    let b = c.metric("switchyard_proxy_thread_connections{thread=\"1\"}")?;
    Some((a, b))
}

/// Waits until `total` connections sit evenly (within 2) on the two threads.
pub(crate) fn split_evenly(c: &Client, total: f64) {
    eventually(
        &format!("{total} connections split evenly over the two threads"),
        Duration::from_secs(10),
        || per_thread(c).filter(|(a, b)| a + b == total && (a - b).abs() <= 2.0),
    );
}

/// The accept-time handoff under churn: 40 connections from `open` split
/// evenly (address hashing alone splits 40 wider than 21/19 two times in
/// three); closing half leaves any split, and 20 more even it out again.
/// Returns the 40 left open.
pub(crate) fn open_close_open_stays_even(
    c: &Client,
    open: impl Fn(usize) -> Vec<std::net::TcpStream>,
) -> Vec<std::net::TcpStream> {
    let mut first = open(40);
    split_evenly(c, 40.0);
    let mut kept = first.split_off(20);
    drop(first);
    eventually("20 connections left", Duration::from_secs(10), || {
        per_thread(c).filter(|(a, b)| a + b == 20.0)
    });
    kept.extend(open(20));
    split_evenly(c, 40.0);
    kept
}

/// An HTTP/2 client connection to `addr` with prior knowledge (h2c), with
/// TCP_NODELAY as gRPC clients set it (a request's body follows its headers
/// at once); the connection runs as a task on the current runtime, whose
/// handle comes back too.
pub(crate) async fn h2c<B>(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake with the proxy");
    (sender, tokio::spawn(connection))
}
