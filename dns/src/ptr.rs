//! Reverse lookups (PTR for `in-addr.arpa` / `ip6.arpa`).
//!
//! An address index per endpoint would cost memory on every catalog, so the
//! index is built off the query path, on demand: the first PTR query wakes the
//! builder; after that it is refreshed at most once a second while the catalog
//! changes and PTR queries keep coming (within the last five minutes). Queries
//! read it lock-free. Only the queries that arrive before the first build has
//! landed wait for it (up to `FIRST_BUILD_WAIT`, then SERVFAIL), so the first
//! PTR query after start gets its answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use switchyard_catalog::{unix_ms, Snapshot};

/// Rebuild at most this often.
const REFRESH: Duration = Duration::from_secs(1);
/// Stop refreshing when no PTR query came for this long.
const IDLE_MS: u64 = 300_000;
/// Longest a query waits for the first build before it gets SERVFAIL.
const FIRST_BUILD_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct PtrIndex {
    /// Catalog index the map was built from.
    pub(crate) index: u64,
    pub(crate) names: HashMap<IpAddr, Vec<String>>,
}

pub(crate) struct Ptr {
    pub(crate) current: ArcSwapOption<PtrIndex>,
    last_query_ms: AtomicU64,
    builder: OnceLock<std::thread::Thread>,
    /// Signalled when the first index lands (queries before it wait here).
    first_build: (Mutex<bool>, Condvar),
}

impl Ptr {
    pub(crate) fn new() -> Ptr {
        Ptr {
            current: ArcSwapOption::empty(),
            last_query_ms: AtomicU64::new(0),
            builder: OnceLock::new(),
            first_build: (Mutex::new(false), Condvar::new()),
        }
    }

    /// The index, waiting (bounded) for the first build if none has landed.
    /// Only queries before the first build ever wait.
    pub(crate) fn index(&self) -> Option<Arc<PtrIndex>> {
        if let Some(index) = self.current.load_full() {
            return Some(index);
        }
        let (built, landed) = &self.first_build;
        let guard = built.lock().unwrap_or_else(|e| e.into_inner());
        let _ = landed
            .wait_timeout_while(guard, FIRST_BUILD_WAIT, |built| !*built)
            .unwrap_or_else(|e| e.into_inner());
        self.current.load_full()
    }

    fn store(&self, index: PtrIndex) {
        self.current.store(Some(Arc::new(index)));
        let (built, landed) = &self.first_build;
        let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
        if !*built {
            *built = true;
            landed.notify_all();
        }
    }

    /// Notes a PTR query; wakes the builder if there is no index yet.
    pub(crate) fn queried(&self) {
        self.last_query_ms.store(unix_ms(), Ordering::Relaxed);
        if self.current.load().is_none() {
            if let Some(builder) = self.builder.get() {
                builder.unpark();
            }
        }
    }
}

fn build(snap: &Snapshot, datacenter: &str, domain: &str) -> PtrIndex {
    let mut names: HashMap<IpAddr, Vec<String>> = HashMap::new();
    for entry in snap.nodes() {
        if let Ok(ip) = entry.node.address.parse::<IpAddr>() {
            names
                .entry(ip)
                .or_default()
                .push(format!("{}.node.{datacenter}.{domain}", entry.node.name));
        }
    }
    for view in snap.services() {
        for instance in view.instances() {
            if let Ok(ip) = instance.endpoint.address.parse::<IpAddr>() {
                let name = format!("{}.service.{datacenter}.{domain}", view.name);
                let list = names.entry(ip).or_default();
                if !list.contains(&name) {
                    list.push(name);
                }
            }
        }
    }
    for list in names.values_mut() {
        list.sort();
    }
    PtrIndex {
        index: snap.index(),
        names,
    }
}

/// Starts the builder thread.
pub(crate) fn spawn_builder(
    ptr: Arc<Ptr>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    datacenter: String,
    domain: String,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let handle = std::thread::Builder::new()
        .name("dns-ptr".to_string())
        .spawn({
            let ptr = ptr.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(REFRESH);
                    let asked = ptr.last_query_ms.load(Ordering::Relaxed);
                    if asked == 0 || unix_ms().saturating_sub(asked) > IDLE_MS {
                        continue;
                    }
                    let snap = snapshot.load_full();
                    let stale = ptr
                        .current
                        .load()
                        .as_ref()
                        .is_none_or(|c| c.index != snap.index());
                    if stale {
                        ptr.store(build(&snap, &datacenter, domain.trim_end_matches('.')));
                    }
                }
            }
        })?;
    let _ = ptr.builder.set(handle.thread().clone());
    Ok(handle)
}

/// The address a reverse name stands for: `d.c.b.a.in-addr.arpa` or 32 nibbles
/// then `ip6.arpa` (labels lowercase, left to right, without the zone).
pub(crate) fn parse_reverse(labels: &[&[u8]]) -> Option<IpAddr> {
    match labels {
        [octets @ .., b"in-addr", b"arpa"] if octets.len() == 4 => {
            let mut out = [0u8; 4];
            for (i, label) in octets.iter().rev().enumerate() {
                out[i] = std::str::from_utf8(label).ok()?.parse().ok()?;
            }
            Some(IpAddr::from(out))
        }
        [nibbles @ .., b"ip6", b"arpa"] if nibbles.len() == 32 => {
            let mut out = [0u8; 16];
            for (i, label) in nibbles.iter().rev().enumerate() {
                let [c] = label else { return None };
                let v = (*c as char).to_digit(16)? as u8;
                out[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
            }
            Some(IpAddr::from(out))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_parse() {
        let v4: Vec<&[u8]> = vec![b"4", b"3", b"2", b"10", b"in-addr", b"arpa"];
        assert_eq!(parse_reverse(&v4), Some("10.2.3.4".parse().expect("ip")));
        let ip6 = "fd00::1".parse::<std::net::Ipv6Addr>().expect("ip");
        let nibbles: Vec<String> = ip6
            .octets()
            .iter()
            .flat_map(|b| [format!("{:x}", b >> 4), format!("{:x}", b & 0xF)])
            .rev()
            .collect();
        let mut labels: Vec<&[u8]> = nibbles.iter().map(|s| s.as_bytes()).collect();
        labels.extend([&b"ip6"[..], b"arpa"]);
        assert_eq!(parse_reverse(&labels), Some(IpAddr::V6(ip6)));
        let bad: Vec<&[u8]> = vec![b"300", b"3", b"2", b"10", b"in-addr", b"arpa"];
        assert_eq!(parse_reverse(&bad), None);
        assert_eq!(parse_reverse(&[b"x", b"arpa"]), None);
    }
}
