//! The map stays true to the house: ARCHITECTURE.md's crate map names every
//! workspace member and every top-level module of each, and nothing that is
//! not there; and the crates that read snapshots build without the registry.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const ARCHITECTURE: &str = include_str!("../../ARCHITECTURE.md");
const MANIFEST: &str = include_str!("../../Cargo.toml");

/// The crate map's entries: a top-level path (`registry/`, `src/`) and the
/// text that describes it (its own lines and the indented ones after it).
fn crate_map() -> BTreeMap<String, String> {
    let section = ARCHITECTURE
        .split_once("## Crates")
        .map(|(_, rest)| rest)
        .expect("ARCHITECTURE.md has a `## Crates` section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the crate map is a fenced block");
    let mut entries = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with(char::is_whitespace) {
            let name = line.split_whitespace().next().unwrap_or("").to_string();
            entries.insert(name.clone(), line.to_string());
            current = Some(name);
        } else if let Some(name) = &current {
            if let Some(text) = entries.get_mut(name) {
                text.push('\n');
                text.push_str(line);
            }
        }
    }
    entries
}

/// The `*.rs` names a piece of text mentions (`store/embedded.rs`, `h2.rs`).
fn modules_named(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '.'))
        .filter(|word| word.ends_with(".rs") && word.len() > 3)
        .map(|word| word.trim_start_matches('/').to_string())
        .collect()
}

fn workspace_members() -> Vec<String> {
    let members = MANIFEST
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .expect("[workspace] members");
    members
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn the_crate_map_names_every_member_and_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = crate_map();
    let mut dirs: Vec<String> = workspace_members();
    dirs.push(".".to_string());
    assert!(dirs.len() >= 6, "members: {dirs:?}");
    for dir in dirs {
        let key = if dir == "." {
            "src/".to_string()
        } else {
            format!("{dir}/")
        };
        let text = map
            .get(&key)
            .unwrap_or_else(|| panic!("ARCHITECTURE.md's crate map has no entry {key}"));
        let src = root.join(&dir).join("src");
        let named = modules_named(text);
        for entry in std::fs::read_dir(&src).expect("src/") {
            let file = entry.expect("entry").file_name();
            let file = file.to_string_lossy();
            if !file.ends_with(".rs") || file == "lib.rs" {
                continue;
            }
            assert!(
                named
                    .iter()
                    .any(|n| Path::new(n).file_name().is_some_and(|f| f == &*file)),
                "the crate map's {key} does not name {file}"
            );
        }
        for name in &named {
            let found = src.join(name).exists() || walk(&src).iter().any(|p| p.ends_with(name));
            assert!(
                found,
                "the crate map's {key} names {name}, which {src:?} lacks"
            );
        }
    }
    for (key, _) in map.iter().filter(|(k, _)| k.ends_with('/')) {
        assert!(
            root.join(key).is_dir(),
            "the crate map names {key}, which is not in the repository"
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// DNS and the proxy read snapshots; they depend on the I/O-free catalog
/// only, never on the registry (its HTTP framework, stores and etcd client).
#[test]
fn dns_and_the_proxy_build_without_the_registry() {
    for krate in ["switchyard-dns", "switchyard-proxy"] {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "--locked", "-p", krate, "--prefix", "none"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(tree.contains("switchyard-catalog"), "{krate}:\n{tree}");
        for banned in ["switchyard-registry", "axum ", "redb ", "etcd-client "] {
            assert!(
                !tree.lines().any(|l| l.starts_with(banned)),
                "{krate} depends on {banned}:\n{tree}"
            );
        }
    }
}
