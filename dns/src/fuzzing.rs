//! Entry point for the cargo-fuzz target in `fuzz/` (feature `fuzzing`, which
//! also brings in the registry to build the fixture's snapshot: DNS itself
//! needs only the catalog). Its test runs under `tools/test`
//! (`--all-features`).

use std::sync::{Arc, OnceLock};

use switchyard_registry::{
    Batch, Command, Decorators, Endpoint, MemoryStore, Node, Registry, RegistryMetrics,
};

use crate::answer::{Engine, Scratch, Transport};
use crate::{Config, DnsDecorator, DnsMetrics};

struct Fixture {
    engine: Engine,
    _runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("fuzz fixture runtime: {e}"),
        };
        let config = Arc::new(Config::default());
        let mut decorators = Decorators::default();
        let answers = decorators.add(Arc::new(DnsDecorator::new(config.clone(), "dc1")));
        let registry = runtime.block_on(async move {
            let metrics = Arc::new(RegistryMetrics::unregistered());
            let (registry, _writer) =
                match Registry::start_with(MemoryStore::default(), metrics, decorators) {
                    Ok(r) => r,
                    Err(e) => panic!("fuzz fixture registry: {e}"),
                };
            let node = |i: usize| {
                let mut node = Node::new(format!("n{i}"), format!("10.0.0.{i}"));
                node.meta.insert("k".to_string(), "v".to_string());
                node
            };
            let endpoint = |i: usize, address: &str| {
                let mut e = Endpoint::new(format!("n{}", i % 3), format!("e{i}"), "web", 80);
                e.address = address.to_string();
                e.tags = vec!["v1".to_string()];
                e
            };
            let batch = Batch {
                nodes: (0..3).map(node).collect(),
                endpoints: vec![
                    (endpoint(0, ""), Vec::new()),
                    (endpoint(1, "fd00::1"), Vec::new()),
                    (endpoint(2, "host.example"), Vec::new()),
                ],
                ..Batch::default()
            };
            if let Err(e) = registry.apply(Command::Batch(batch)).await {
                panic!("fuzz fixture batch: {e}");
            }
            registry
        });
        let metrics = match DnsMetrics::new(&prometheus::Registry::new()) {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("fuzz fixture metrics: {e}"),
        };
        let ptr = Arc::new(crate::ptr::Ptr::new());
        let engine = Engine::new(
            config,
            "dc1",
            answers,
            registry.snapshot_cell(),
            metrics,
            ptr,
            None,
        );
        Fixture {
            engine,
            _runtime: runtime,
        }
    })
}

/// Answers `data` as a UDP and as a TCP query and checks the answers' framing.
pub fn answer_packet(data: &[u8]) {
    let fixture = fixture();
    let mut out = Vec::new();
    let mut scratch = Scratch::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        if fixture
            .engine
            .answer(data, transport, &mut out, &mut scratch)
            .is_some()
        {
            assert!(out.len() >= 12, "an answer always has a header");
            assert_eq!(out[..2], data[..2], "the id is echoed");
            assert!(out[2] & 0x80 != 0, "QR is set");
            if transport == Transport::Udp && out.len() > 512 {
                assert!(data.len() > 12, "only EDNS queries get more than 512 bytes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_entry_point_survives_a_corpus() {
        let mut rng = fastrand::Rng::with_seed(5);
        let seed = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x07service\x06consul\x00\x00\x21\x00\x01";
        for _ in 0..5000 {
            let mut p = seed.to_vec();
            for _ in 0..rng.usize(0..5) {
                let i = rng.usize(..p.len());
                p[i] = rng.u8(..);
            }
            p.truncate(rng.usize(0..=p.len()));
            super::answer_packet(&p);
        }
    }
}
