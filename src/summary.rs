//! `agent --check-config`: what the agent would run with, as a person reads
//! it (one line per role), rather than the configuration's debug dump.

use std::fmt::Write;

use switchyard_registry::StoreKind;

use crate::config::AgentConfig;
use crate::source::host_name;

/// Where the embedded store's directory comes from, as far as the check knows.
pub(crate) enum DataDir {
    /// Set by the file or `--data-dir`.
    Given,
    /// `--dev` makes a fresh temporary one at start.
    Scratch,
    /// Neither: the agent refuses to start until one is given.
    Missing,
}

/// The summary `--check-config` prints after "configuration ok".
pub(crate) fn summary(config: &AgentConfig, data_dir: DataDir) -> String {
    let mut out = String::new();
    let agent = &config.agent;
    let node = match &agent.node_name {
        Some(name) => name.clone(),
        None => format!("{} (the host name)", host_name()),
    };
    let _ = writeln!(
        out,
        "node       {node}  datacenter {}  address {}",
        agent.datacenter, agent.advertise_addr
    );

    let api = &config.api;
    let tokens = match api.tokens.len() {
        0 => "none (loopback only)".to_string(),
        n => format!("{n}"),
    };
    let _ = writeln!(
        out,
        "api        {}://{}  tokens {tokens}{}",
        if api.tls.is_some() { "https" } else { "http" },
        api.addr,
        api.metrics_addr
            .map(|a| format!("  metrics also on {a}"))
            .unwrap_or_default()
    );

    let store = &config.store;
    let store_line = match store.kind {
        StoreKind::Memory => "memory (nothing is persisted)".to_string(),
        StoreKind::Etcd => format!(
            "etcd {} under prefix {}",
            store.endpoints.join(","),
            store.prefix
        ),
        StoreKind::Embedded => match (&store.data_dir, data_dir) {
            (Some(dir), DataDir::Given) => format!("embedded in {}", dir.display()),
            (_, DataDir::Scratch) => {
                "embedded in a fresh temporary directory (--dev), removed at exit".to_string()
            }
            _ => "embedded; no data directory yet: the agent needs --data-dir DIR, \
                  store.data_dir or --dev to start"
                .to_string(),
        },
    };
    let _ = writeln!(out, "store      {store_line}");

    let dns = &config.dns;
    let _ = writeln!(
        out,
        "dns        {} (UDP and TCP)  domain {}",
        dns.addr, dns.domain
    );

    let http = &config.http;
    let threads = match http.threads {
        0 => "one thread per core".to_string(),
        1 => "1 thread".to_string(),
        n => format!("{n} threads"),
    };
    let _ = writeln!(
        out,
        "http       {}  {threads}  balancer {}  routes {} (and services' switchyard.http.host= tags)",
        http.addr,
        serde_name(&http.balancer),
        http.routes.len()
    );
    for route in &http.routes {
        let _ = writeln!(
            out,
            "             {}{} -> {}",
            route.host.as_deref().unwrap_or("*"),
            route.path_prefix,
            route.service
        );
    }
    if let Some(addr) = http.tls.addr {
        let _ = writeln!(
            out,
            "https      {addr}  certificates {}",
            http.tls.certificates.len()
        );
    }
    for listener in &config.tcp.listeners {
        let _ = writeln!(
            out,
            "tcp        {} -> {} ({})",
            listener.addr,
            listener.service,
            serde_name(&listener.balancer)
        );
    }
    if let Some(addr) = config.xds.addr {
        let _ = writeln!(
            out,
            "xds        {addr}  (ADS)  max_streams {}",
            config.xds.max_streams
        );
    }
    for dc in &config.federation.datacenters {
        let _ = writeln!(out, "datacenter {} at {}", dc.name, dc.api.join(", "));
    }
    let names: Vec<String> = config
        .services
        .iter()
        .map(|table| {
            ["name", "Name", "NAME"]
                .iter()
                .find_map(|k| table.get(*k).and_then(|v| v.as_str()))
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    let _ = write!(
        out,
        "services   {}",
        if names.is_empty() {
            "none defined in the file".to_string()
        } else {
            names.join(", ")
        }
    );
    out
}

/// The name a config value is written with in TOML (`peak_ewma`).
fn serde_name<T: std::fmt::Debug>(value: &T) -> String {
    // The enums are `rename_all = "snake_case"`: their Debug names in snake case.
    let debug = format!("{value:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_written_as_in_the_file() {
        assert_eq!(
            serde_name(&switchyard_proxy::BalancerKind::PeakEwma),
            "peak_ewma"
        );
        assert_eq!(
            serde_name(&switchyard_proxy::BalancerKind::RoundRobin),
            "round_robin"
        );
    }

    #[test]
    fn the_summary_names_each_role_and_the_missing_data_directory() {
        let config = AgentConfig::parse(include_str!("../configs/dev.toml")).expect("dev.toml");
        let text = summary(&config, DataDir::Missing);
        for role in ["node ", "api ", "store ", "dns ", "http ", "services "] {
            assert!(
                text.lines().any(|l| l.starts_with(role)),
                "{role:?} in\n{text}"
            );
        }
        assert!(text.contains("127.0.0.1:8500"), "{text}");
        assert!(text.contains("needs --data-dir"), "{text}");
        assert!(!text.contains("AgentConfig {"), "no debug dump: {text}");
        let scratch = summary(&config, DataDir::Scratch);
        assert!(scratch.contains("temporary directory"), "{scratch}");
    }
}
