//! The README as a new user follows it. Its first command starts the agent
//! (on the default ports, as written); then every command of every later
//! shell block runs as written, in order, in one shell at the top of a
//! checkout, against that agent, and gives the output its comment describes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{bin, DEMO_PORTS};

const README: &str = include_str!("../../README.md");

/// The README's ```sh blocks, each a list of commands (lines joined where
/// they end in a backslash).
fn shell_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap_or_default()),
            (Some(block), line) => {
                if let Some(head) = line.strip_suffix('\\') {
                    pending.push_str(head);
                    pending.push_str("\\\n");
                    continue;
                }
                pending.push_str(line);
                if !pending.trim().is_empty() {
                    block.push(std::mem::take(&mut pending));
                }
                pending.clear();
            }
            (None, _) => {}
        }
    }
    blocks
}

/// What a step's output must show, by a piece of its command.
struct Expect {
    command: &'static str,
    check: fn(&str) -> Result<(), String>,
}

fn has(out: &str, parts: &[&str]) -> Result<(), String> {
    match parts.iter().find(|p| !out.contains(**p)) {
        Some(missing) => Err(format!("no {missing:?}")),
        None => Ok(()),
    }
}

const EXPECTED: &[Expect] = &[
    Expect {
        command: "demo.service.consul SRV",
        check: |out| {
            let srv = out
                .lines()
                .filter(|l| l.starts_with("demo.service.consul.") && l.contains("\tSRV\t"))
                .count();
            (srv == 3)
                .then_some(())
                .ok_or(format!("{srv} SRV records, not the three backends"))
        },
    },
    Expect {
        command: "Host: demo.localhost",
        check: |out| has(out, &["hello from demo-"]),
    },
    Expect {
        command: "health/service/web?passing",
        check: |out| has(out, &["\"web-1\"", "\"passing\""]),
    },
    Expect {
        command: "switchyard status",
        check: |out| has(out, &["listening", "api 127.0.0.1:8500", "index"]),
    },
    Expect {
        command: "switchyard services",
        check: |out| has(out, &["demo ", "web "]),
    },
    Expect {
        command: "switchyard endpoints web",
        check: |out| has(out, &["web-1", "passing"]),
    },
    Expect {
        command: "register configs/batch.example.json",
        check: |out| has(out, &["registered; catalog index"]),
    },
    Expect {
        command: "switchyard endpoints pay",
        check: |out| has(out, &["pay-1", "pay-2", "pay-3", "n1", "n2"]),
    },
    Expect {
        command: " web.service.consul",
        check: |out| has(out, &["ANSWER: 1,", "127.0.0.1"]),
    },
    Expect {
        command: "_pay._tcp.service.consul SRV",
        check: |out| has(out, &["ANSWER: 3,", "127.0.0.11", "127.0.0.12"]),
    },
    Expect {
        command: "Host: api.local",
        check: |out| has(out, &["hello from demo-1"]),
    },
    Expect {
        command: "switchyard drain node n1",
        check: |out| has(out, &["drained: nothing in flight"]),
    },
    Expect {
        command: "switchyard nodes",
        check: |out| {
            out.lines()
                .any(|l| l.starts_with("n1 ") && l.contains(" drained "))
                .then_some(())
                .ok_or("n1 is not listed drained".to_string())
        },
    },
];

/// The agent of the README's first command, stopped (SIGTERM) on drop.
struct FirstCommand(Child);

impl Drop for FirstCommand {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the README test runs `{tool}` as the README does and found none: \
         install {package} (tools/test does)"
    );
}

#[test]
fn the_readme_works_as_written_in_order() {
    require("dig", "dnsutils");
    require("curl", "curl");
    let _ports = DEMO_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for port in [8500, 8080] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "the README's agent listens on 127.0.0.1:{port}, which is taken: stop what holds it"
        );
    }
    assert!(
        std::net::UdpSocket::bind("127.0.0.1:8600").is_ok(),
        "the README's agent answers DNS on 127.0.0.1:8600, which is taken"
    );

    // A checkout as the first command leaves it: configs/, and the binary
    // `cargo run --release` built in target/release.
    let checkout = tempfile::tempdir().expect("tempdir");
    let root = checkout.path();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/configs"),
        root.join("configs"),
    )
    .expect("configs link");
    std::fs::create_dir_all(root.join("target/release")).expect("mkdir");
    std::os::unix::fs::symlink(bin(), root.join("target/release/switchyard")).expect("bin link");

    let blocks = shell_blocks(README);
    assert!(blocks.len() >= 4, "the README's shell blocks: {blocks:?}");
    let first = &blocks[0];
    assert!(
        first.len() == 2
            && first[0].starts_with("cargo run --release -- agent --dev")
            && first[1].starts_with("tools/test"),
        "the README starts with the agent and the test command: {first:?}"
    );
    let agent = start_first_command(root, &first[0]);

    let steps: Vec<String> = blocks[1..]
        .iter()
        .flatten()
        .map(|command| {
            // A browser needs a desktop: fetch the page instead.
            match command.trim().strip_prefix("xdg-open ") {
                Some(rest) => format!("curl -sf -o /dev/null {rest}"),
                None => command.clone(),
            }
        })
        .collect();
    let mut script = String::new();
    for (i, step) in steps.iter().enumerate() {
        script.push_str(&format!(
            "printf '\\n@@step {i}\\n'\n{{\n{step}\n}} 2>&1\nprintf '\\n@@rc {i} %d\\n' $?\n"
        ));
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root)
        .env_remove("SWITCHYARD_API")
        .env_remove("SWITCHYARD_TOKEN")
        .output()
        .expect("run bash");
    let text = String::from_utf8_lossy(&out.stdout).to_string();

    let mut matched = vec![false; EXPECTED.len()];
    for (i, step) in steps.iter().enumerate() {
        let begin = format!("@@step {i}\n");
        let end = format!("\n@@rc {i} ");
        let output = text
            .split_once(&begin)
            .and_then(|(_, rest)| rest.split_once(&end))
            .unwrap_or_else(|| panic!("step {i} ({step}) did not run:\n{text}"));
        let rc = output.1.split_whitespace().next().unwrap_or("?");
        let output = output.0;
        assert_eq!(rc, "0", "`{step}` exited {rc}:\n{output}");
        for (n, expect) in EXPECTED.iter().enumerate() {
            if step.contains(expect.command) {
                matched[n] = true;
                if let Err(why) = (expect.check)(output) {
                    panic!("`{step}`: {why} in its output:\n{output}");
                }
            }
        }
    }
    for (n, expect) in EXPECTED.iter().enumerate() {
        assert!(
            matched[n],
            "the README no longer runs a command with {:?}",
            expect.command
        );
    }
    drop(agent);
}

/// Runs the README's first command (`cargo run --release --` is the binary
/// it built) and waits for the agent's ready line.
fn start_first_command(root: &Path, command: &str) -> FirstCommand {
    let command = command.replacen("cargo run --release --", "switchyard", 1);
    let path = format!(
        "{}:{}",
        root.join("target/release").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let stderr = std::fs::File::create(root.join("agent.stderr")).expect("stderr file");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("exec {command}"))
        .current_dir(root)
        .env("PATH", path)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start the agent");
    let stdout = child.stdout.take().expect("stdout");
    let agent = FirstCommand(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if line.contains("\"ready\":true") => agent,
        other => {
            let log = std::fs::read_to_string(root.join("agent.stderr")).unwrap_or_default();
            panic!("`{command}` printed no ready line ({other:?}); stderr:\n{log}")
        }
    }
}

#[test]
fn shell_blocks_join_continued_lines() {
    let text = "x\n```sh\na \\\n  b   # c\n\nd\n```\n```json\n{}\n```\n```sh\ne\n```\n";
    assert_eq!(
        shell_blocks(text),
        [
            vec!["a \\\n  b   # c".to_string(), "d".to_string()],
            vec!["e".to_string()]
        ]
    );
}

/// Every link in the README points inside the repository, at a file that
/// is there: a clone has nothing beside it.
#[test]
fn the_readme_links_only_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut links = 0;
    for (at, _) in README.match_indices("](") {
        let rest = &README[at + 2..];
        let target = &rest[..rest.find(')').unwrap_or(rest.len())];
        links += 1;
        assert!(
            !target.contains("://") && !target.starts_with('/') && !target.contains(".."),
            "the README links outside the repository: {target}"
        );
        let file = target.split('#').next().unwrap_or(target);
        assert!(
            root.join(file).exists(),
            "the README links to {target}, which is not in the repository"
        );
    }
    assert!(links >= 3, "only {links} links found");
    for mention in ["../shared", "CONSUL.md"] {
        assert!(
            !README.contains(mention),
            "the README names {mention}, outside the repository"
        );
    }
}
