use std::collections::HashMap;
use std::sync::Arc;

use switchyard_catalog::Name;

use super::*;
use crate::config::OutlierConfig;
use crate::metrics::ProxyMetrics;
use crate::stats::EndpointStats;

fn service(weights: &[u32]) -> Svc {
    service_named(
        &(0..weights.len())
            .map(|i| format!("ep-{i}"))
            .collect::<Vec<_>>(),
        weights,
    )
}

fn service_named(ids: &[String], weights: &[u32]) -> Svc {
    let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let backends: Vec<Backend> = ids
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (id, &weight))| Backend {
            stats: Arc::new(EndpointStats::new(
                id.as_str().into(),
                "node".into(),
                metrics.endpoint("svc", "node", id),
            )),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            weight,
            endpoint: None,
        })
        .collect();
    Svc {
        backends: Backends::new(backends),
    }
}

/// A service's backends, as a view holds them.
struct Svc {
    backends: Backends,
}

impl std::ops::Deref for Svc {
    type Target = Backends;

    fn deref(&self) -> &Backends {
        &self.backends
    }
}

fn counts(svc: &Svc, kind: BalancerKind, picks: usize) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut counts = vec![0; svc.backends.len()];
    for _ in 0..picks {
        let (i, open) =
            pick(&svc.backends, kind, None, &Tried::default(), 0, &mut rng).expect("pick");
        assert!(!open);
        counts[i as usize] += 1;
    }
    counts
}

#[test]
fn smooth_weighted_round_robin_is_exact_and_interleaved() {
    let svc = service(&[5, 1, 1]);
    assert_eq!(
        counts(&svc, BalancerKind::RoundRobin, 700),
        vec![500, 100, 100]
    );
    // nginx's smooth order for 5,1,1: a a b a c a a.
    let order: Vec<u32> = svc.schedule.get().expect("built").to_vec();
    assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0]);
    let equal = service(&[1, 1, 1]);
    let mut rng = fastrand::Rng::with_seed(1);
    let picks: Vec<u32> = (0..6)
        .map(|_| {
            pick(
                &equal,
                BalancerKind::RoundRobin,
                None,
                &Tried::default(),
                0,
                &mut rng,
            )
            .expect("pick")
            .0
        })
        .collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn random_and_least_request_spread_evenly_when_idle() {
    for kind in [
        BalancerKind::Random,
        BalancerKind::LeastRequest,
        BalancerKind::PeakEwma,
    ] {
        let svc = service(&[1, 1, 1, 1]);
        let got = counts(&svc, kind, 4000);
        for &n in &got {
            assert!((800..=1200).contains(&n), "{kind:?}: {got:?}");
        }
    }
}

#[test]
fn least_request_avoids_busy_backends() {
    let svc = service(&[1, 1, 1]);
    svc.backends[0].stats.metrics.in_flight.set(50);
    let got = counts(&svc, BalancerKind::LeastRequest, 3000);
    assert_eq!(got[0], 0, "{got:?}");
}

#[test]
fn peak_ewma_moves_load_off_a_slow_backend() {
    let svc = service(&[1, 1, 1]);
    let now = 1_000_000_000;
    for (i, rtt) in [(0, 50_000_000u64), (1, 500_000), (2, 500_000)] {
        svc.backends[i].stats.observe(rtt, now);
    }
    let mut rng = fastrand::Rng::with_seed(3);
    let mut slow = 0;
    for _ in 0..3000 {
        let (i, _) = pick(
            &svc,
            BalancerKind::PeakEwma,
            None,
            &Tried::default(),
            now,
            &mut rng,
        )
        .expect("pick");
        slow += usize::from(i == 0);
    }
    assert!(slow < 30, "slow backend still got {slow} of 3000");
}

#[test]
fn consistent_hash_keeps_keys_and_moves_only_the_leavers_share() {
    let ids: Vec<String> = (0..4).map(|i| format!("ep-{i}")).collect();
    let four = service_named(&ids, &[1, 1, 1, 1]);
    let three = service_named(&ids[..3], &[1, 1, 1]);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut owner = |svc: &Svc, key: u64| {
        let (i, _) = pick(
            svc,
            BalancerKind::ConsistentHash,
            Some(key),
            &Tried::default(),
            0,
            &mut rng,
        )
        .expect("pick");
        svc.backends[i as usize].stats.id.clone()
    };
    let keys: Vec<u64> = (0..4000u64).map(|k| hash64(&k.to_le_bytes())).collect();
    let mut per_backend: HashMap<Name, usize> = HashMap::new();
    let mut moved = 0;
    for &key in &keys {
        let before = owner(&four, key);
        assert_eq!(before, owner(&four, key), "same key, same endpoint");
        let after = owner(&three, key);
        if before != after {
            assert_eq!(&*before, "ep-3", "only keys of the leaver move");
            moved += 1;
        }
        *per_backend.entry(before).or_default() += 1;
    }
    assert!(moved <= keys.len() / 4 + keys.len() / 20, "moved {moved}");
    for (id, n) in per_backend {
        assert!((600..=1400).contains(&n), "{id} owns {n} of 4000");
    }
}

#[test]
fn tried_and_ejected_backends_are_skipped_until_none_is_left() {
    let svc = service(&[1, 1, 1]);
    let mut rng = fastrand::Rng::with_seed(9);
    let mut tried = Tried::default();
    tried.add(0);
    tried.add(1);
    for kind in [
        BalancerKind::RoundRobin,
        BalancerKind::Random,
        BalancerKind::LeastRequest,
        BalancerKind::PeakEwma,
    ] {
        assert_eq!(
            pick(&svc.backends, kind, Some(1), &tried, 0, &mut rng),
            Some((2, false)),
            "{kind:?}"
        );
    }
    tried.add(2);
    assert_eq!(
        pick(
            &svc.backends,
            BalancerKind::Random,
            None,
            &tried,
            0,
            &mut rng
        ),
        None
    );

    // Eject endpoint 1 through its failure streak.
    let outlier = OutlierConfig {
        consecutive_failures: 2,
        max_ejected_percent: 100,
        ..OutlierConfig::default()
    };
    let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let stats = crate::stats::ServiceStats::new("svc".into(), metrics.service("svc"));
    let now = 5;
    assert!(!svc.backends[1]
        .stats
        .failed(now, &outlier, &stats, &svc.backends));
    assert!(!svc.backends[1].stats.is_ejected(now));
    assert!(!svc.backends[1]
        .stats
        .failed(now, &outlier, &stats, &svc.backends));
    assert!(svc.backends[1].stats.is_ejected(now));
    let got = counts(&svc, BalancerKind::RoundRobin, 300);
    assert_eq!(got[1], 0, "{got:?}");
    // With everything else tried, the ejected one is used, flagged fail-open.
    let mut tried = Tried::default();
    tried.add(0);
    tried.add(2);
    assert_eq!(
        pick(
            &svc.backends,
            BalancerKind::Random,
            None,
            &tried,
            now,
            &mut rng
        ),
        Some((1, true))
    );
    // It returns when its ejection time is over.
    let later = now + crate::stats::nanos(outlier.base_ejection) + 1;
    assert!(!svc.backends[1].stats.is_ejected(later));
}

#[test]
fn the_ejection_cap_keeps_endpoints_in_and_reports_fail_open() {
    let svc = service(&[1, 1, 1]);
    let outlier = OutlierConfig {
        consecutive_failures: 1,
        max_ejected_percent: 50,
        ..OutlierConfig::default()
    };
    let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let stats = crate::stats::ServiceStats::new("svc".into(), metrics.service("svc"));
    assert!(!svc.backends[0]
        .stats
        .failed(1, &outlier, &stats, &svc.backends));
    assert!(svc.backends[0].stats.is_ejected(1));
    // A second ejection would pass 50% of three: refused, fail-open reported.
    assert!(svc.backends[1]
        .stats
        .failed(1, &outlier, &stats, &svc.backends));
    assert!(!svc.backends[1].stats.is_ejected(1));
    assert!(stats.is_fail_open());
    assert_eq!(metrics.service("svc").fail_open.get(), 1);
}

/// Backend 2's share of `picks` when its slow start of `window` began at
/// `from` and the clock reads `now`.
fn ramped_share(svc: &Svc, kind: BalancerKind, window: u64, now: u64) -> f64 {
    let mut rng = fastrand::Rng::with_seed(11);
    let choice = Choice {
        slow_start_ns: window,
        ..Choice::new(kind, None)
    };
    let picks = 30_000;
    let hits = (0..picks)
        .filter(|_| {
            let (i, open) =
                pick_with(&svc.backends, choice, &Tried::default(), now, &mut rng).expect("pick");
            assert!(!open);
            i == 2
        })
        .count();
    hits as f64 / f64::from(picks)
}

#[test]
fn slow_start_ramps_a_new_backends_share_in_every_weighing_balancer() {
    let window = 10_000_000_000;
    let from = 5_000_000_000;
    for kind in [
        BalancerKind::RoundRobin,
        BalancerKind::LeastRequest,
        BalancerKind::PeakEwma,
        BalancerKind::Random,
    ] {
        let svc = service(&[1, 1, 1]);
        svc.backends[2].stats.start_ramp_at(from);
        // Alike in latency (peak EWMA: a slower sample is taken as it is).
        for backend in svc.backends.iter() {
            backend.stats.observe(2_000_000, from);
        }
        // A third of the requests at full share; 10% of that at the start,
        // 55% half way, all of it at the end.
        let start = ramped_share(&svc, kind, window, from);
        assert!(
            (0.02..0.05).contains(&start),
            "{kind:?} at the start: {start}"
        );
        let half = ramped_share(&svc, kind, window, from + window / 2);
        assert!((0.15..0.22).contains(&half), "{kind:?} half way: {half}");
        let end = ramped_share(&svc, kind, window, from + window);
        assert!((0.30..0.37).contains(&end), "{kind:?} at the end: {end}");
        // No slow start on the route: full share at once.
        let plain = counts(&svc, kind, 30_000)[2] as f64 / 30_000.0;
        assert!((0.30..0.37).contains(&plain), "{kind:?} without: {plain}");
    }
}

#[test]
fn slow_start_follows_an_ejection_and_leaves_hashing_alone() {
    let svc = service(&[1, 1, 1]);
    let window = 10_000_000_000;
    let outlier = OutlierConfig {
        consecutive_failures: 1,
        ..OutlierConfig::default()
    };
    let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let stats = crate::stats::ServiceStats::new("svc".into(), metrics.service("svc"));
    let now = 1_000;
    svc.backends[2]
        .stats
        .failed(now, &outlier, &stats, &svc.backends);
    let back = now + crate::stats::nanos(outlier.base_ejection);
    assert_eq!(svc.backends[2].stats.ramp(back, window), RAMP_FLOOR);
    let share = ramped_share(&svc, BalancerKind::RoundRobin, window, back + 1);
    assert!(
        (0.02..0.05).contains(&share),
        "just out of its ejection: {share}"
    );
    // Its first success settles it; the ramp goes on from the ejection's end.
    svc.backends[2].stats.succeeded(back + window / 2);
    let half = svc.backends[2].stats.ramp(back + window / 2, window);
    assert!((0.54..0.56).contains(&half), "{half}");
    assert_eq!(svc.backends[2].stats.ramp(back + window, window), 1.0);
    // A consistent hash keeps its keys whatever the ramp.
    let ring = |slow_start_ns| {
        let mut rng = fastrand::Rng::with_seed(3);
        let choice = Choice {
            slow_start_ns,
            ..Choice::new(BalancerKind::ConsistentHash, None)
        };
        (0..64u64)
            .map(|key| {
                let choice = Choice {
                    key: Some(hash64(&key.to_le_bytes())),
                    ..choice
                };
                pick_with(&svc.backends, choice, &Tried::default(), back + 1, &mut rng)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ring(window), ring(0));
}

/// The same backends as `service_named`, in chunks of `size`, as a view of
/// more than 512 endpoints holds them.
fn chunked(svc: &Svc, size: usize) -> Backends {
    let list: Vec<Backend> = svc.backends.iter().cloned().collect();
    Backends::of(
        list.chunks(size)
            .map(|part| Arc::new(BackendChunk::new(part.to_vec()))),
    )
}

#[test]
fn chunked_backends_index_as_one_list() {
    let ids: Vec<String> = (0..10).map(|i| format!("ep-{i}")).collect();
    let svc = service_named(&ids, &[1; 10]);
    let set = chunked(&svc, 3);
    assert_eq!(set.len(), 10);
    for i in 0..10 {
        assert_eq!(set[i].stats.id, svc.backends[i].stats.id);
    }
    let listed: Vec<_> = set.iter().map(|b| b.stats.id.clone()).collect();
    let expected: Vec<_> = svc.backends.iter().map(|b| b.stats.id.clone()).collect();
    assert_eq!(listed, expected);
}

#[test]
fn round_robin_over_chunks_gives_each_its_weight_per_round_without_bursts() {
    let weights: Vec<u32> = (0..9).map(|i| 1 + i % 3).collect();
    let ids: Vec<String> = (0..9).map(|i| format!("ep-{i}")).collect();
    let svc = service_named(&ids, &weights);
    let set = chunked(&svc, 4);
    let total: u32 = weights.iter().sum();
    let mut rng = fastrand::Rng::with_seed(2);
    let mut got = vec![0u32; 9];
    let mut last = u32::MAX;
    let mut repeats = 0;
    for _ in 0..total * 5 {
        let (i, _) = pick(
            &set,
            BalancerKind::RoundRobin,
            None,
            &Tried::default(),
            0,
            &mut rng,
        )
        .expect("pick");
        got[i as usize] += 1;
        repeats += u32::from(i == last);
        last = i;
    }
    let want: Vec<u32> = weights.iter().map(|w| w * 5).collect();
    assert_eq!(got, want, "five whole rounds");
    assert!(repeats <= total / 4, "{repeats} back-to-back picks");
}

#[test]
fn consistent_hash_over_chunks_is_the_ring_of_one_list() {
    let ids: Vec<String> = (0..12).map(|i| format!("ep-{i}")).collect();
    let svc = service_named(&ids, &[1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1]);
    let set = chunked(&svc, 5);
    let mut rng = fastrand::Rng::with_seed(4);
    let mut tried = Tried::default();
    tried.add(3);
    for k in 0..2000u64 {
        let key = hash64(&k.to_le_bytes());
        for tried in [&Tried::default(), &tried] {
            let one = pick(
                &svc.backends,
                BalancerKind::ConsistentHash,
                Some(key),
                tried,
                0,
                &mut rng,
            );
            let many = pick(
                &set,
                BalancerKind::ConsistentHash,
                Some(key),
                tried,
                0,
                &mut rng,
            );
            assert_eq!(one, many, "key {k}");
        }
    }
}

#[test]
fn every_balancer_over_chunks_skips_tried_backends() {
    let ids: Vec<String> = (0..7).map(|i| format!("ep-{i}")).collect();
    let svc = service_named(&ids, &[1; 7]);
    let set = chunked(&svc, 2);
    let mut rng = fastrand::Rng::with_seed(6);
    let mut tried = Tried::default();
    for i in [0, 1, 2, 3, 4, 6] {
        tried.add(i);
    }
    for kind in [
        BalancerKind::RoundRobin,
        BalancerKind::Random,
        BalancerKind::ConsistentHash,
        BalancerKind::LeastRequest,
        BalancerKind::PeakEwma,
    ] {
        for _ in 0..20 {
            assert_eq!(
                pick(&set, kind, Some(rng.u64(..)), &tried, 0, &mut rng),
                Some((5, false)),
                "{kind:?}"
            );
        }
    }
}
