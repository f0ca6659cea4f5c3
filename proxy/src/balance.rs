//! Balancers: pick one backend of a service for a request, skipping backends
//! already tried by this request and, while any other is left, ejected ones.
//! Everything here reads atomics and the view's immutable lists; the lazily
//! built schedule and ring are made once per view.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::config::BalancerKind;
pub(crate) use crate::stats::Backend;

/// A view's routable backends (usable address, weight above 0), with what
/// its balancers build from them once (the weighted schedule, the hash
/// ring) and share (the round-robin cursor). Reads as the slice of backends.
#[derive(Default)]
pub(crate) struct Backends {
    list: Box<[Backend]>,
    cursor: AtomicUsize,
    schedule: OnceLock<Box<[u32]>>,
    ring: OnceLock<HashRing>,
}

impl Backends {
    pub(crate) fn new(list: Vec<Backend>) -> Backends {
        Backends {
            list: list.into_boxed_slice(),
            ..Backends::default()
        }
    }
}

impl std::ops::Deref for Backends {
    type Target = [Backend];

    fn deref(&self) -> &[Backend] {
        &self.list
    }
}

/// Backends already tried by one request (retries never reuse one).
#[derive(Default)]
pub(crate) struct Tried {
    picks: [u32; 8],
    len: usize,
}

impl Tried {
    pub(crate) fn add(&mut self, index: u32) {
        if self.len < self.picks.len() {
            self.picks[self.len] = index;
            self.len += 1;
        }
    }

    pub(crate) fn contains(&self, index: u32) -> bool {
        self.picks[..self.len].contains(&index)
    }

    pub(crate) fn count(&self) -> usize {
        self.len
    }
}

/// A 64-bit hash that is stable across runs and builds (FNV-1a, then a
/// finalizer that spreads nearby inputs over the whole ring).
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Points per unit of weight on the hash ring.
const RING_POINTS: u32 = 160;

/// A ring hash over the backends: each backend owns points derived from its
/// endpoint id (not its position), so when one of N leaves only the keys it
/// owned move.
pub(crate) struct HashRing {
    points: Box<[(u64, u32)]>,
}

impl HashRing {
    fn build(backends: &[Backend]) -> HashRing {
        let mut points = Vec::new();
        for (i, backend) in backends.iter().enumerate() {
            let count = RING_POINTS * backend.weight.min(16);
            let mut label =
                Vec::with_capacity(backend.stats.id.len() + backend.stats.node.len() + 12);
            for point in 0..count {
                label.clear();
                label.extend_from_slice(backend.stats.node.as_bytes());
                label.push(b'/');
                label.extend_from_slice(backend.stats.id.as_bytes());
                label.push(b'#');
                label.extend_from_slice(&point.to_le_bytes());
                points.push((hash64(&label), i as u32));
            }
        }
        points.sort_unstable();
        HashRing {
            points: points.into_boxed_slice(),
        }
    }

    /// The first usable backend at or after `key` on the ring.
    fn find(&self, key: u64, usable: impl Fn(u32) -> bool) -> Option<u32> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(h, _)| *h < key);
        (0..self.points.len())
            .map(|step| self.points[(start + step) % self.points.len()].1)
            .find(|&i| usable(i))
    }
}

/// The smooth weighted round-robin order (nginx's algorithm), computed once
/// per view: each turn adds every weight to its counter and takes the largest,
/// which then pays the total. Equal weights give the plain rotation.
fn schedule(backends: &[Backend]) -> Box<[u32]> {
    let gcd = backends.iter().fold(0u32, |g, b| gcd(g, b.weight)).max(1);
    let mut weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight / gcd)).collect();
    // Keep the schedule short: scale very large weights down.
    let total: u64 = weights.iter().sum();
    if total > 4096 {
        for w in &mut weights {
            *w = (*w * 4096 / total).max(1);
        }
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Chooses a backend for one attempt. `key` is the consistent-hash key when
/// the route hashes. Returns the index and whether the choice had to include
/// ejected backends (fail-open).
pub(crate) fn pick(
    set: &Backends,
    kind: BalancerKind,
    key: Option<u64>,
    tried: &Tried,
    now: u64,
    rng: &mut fastrand::Rng,
) -> Option<(u32, bool)> {
    if set.is_empty() {
        return None;
    }
    let healthy = |i: u32| !tried.contains(i) && !set[i as usize].stats.is_ejected(now);
    if let Some(i) = pick_among(set, kind, key, &healthy, now, rng) {
        return Some((i, false));
    }
    let untried = |i: u32| !tried.contains(i);
    pick_among(set, kind, key, &untried, now, rng).map(|i| (i, true))
}

fn pick_among(
    set: &Backends,
    kind: BalancerKind,
    key: Option<u64>,
    usable: &dyn Fn(u32) -> bool,
    now: u64,
    rng: &mut fastrand::Rng,
) -> Option<u32> {
    let backends: &[Backend] = set;
    let n = backends.len();
    match kind {
        BalancerKind::RoundRobin => {
            let order = set.schedule.get_or_init(|| schedule(backends));
            let start = set.cursor.fetch_add(1, Ordering::Relaxed);
            (0..order.len())
                .map(|step| order[(start + step) % order.len()])
                .find(|&i| usable(i))
        }
        BalancerKind::Random => {
            let start = rng.usize(..n);
            (0..n)
                .map(|step| ((start + step) % n) as u32)
                .find(|&i| usable(i))
        }
        BalancerKind::ConsistentHash => match key {
            Some(key) => set
                .ring
                .get_or_init(|| HashRing::build(backends))
                .find(key, usable),
            None => {
                let start = rng.usize(..n);
                (0..n)
                    .map(|step| ((start + step) % n) as u32)
                    .find(|&i| usable(i))
            }
        },
        BalancerKind::LeastRequest => p2c(backends, usable, rng, |b| {
            (b.stats.in_flight().max(0) as f64 + 1.0) / f64::from(b.weight)
        }),
        BalancerKind::PeakEwma => p2c(backends, usable, rng, |b| {
            b.stats.latency_ns(now) * (b.stats.in_flight().max(0) as f64 + 1.0)
                / f64::from(b.weight)
        }),
    }
}

/// Power of two choices: the cheaper of two distinct random usable backends
/// (ties go to whichever was drawn first, so idle backends share evenly).
fn p2c(
    backends: &[Backend],
    usable: &dyn Fn(u32) -> bool,
    rng: &mut fastrand::Rng,
    cost: impl Fn(&Backend) -> f64,
) -> Option<u32> {
    let n = backends.len();
    let better = |a: u32, b: u32| {
        if cost(&backends[b as usize]) < cost(&backends[a as usize]) {
            b
        } else {
            a
        }
    };
    if n == 1 {
        return usable(0).then_some(0);
    }
    for _ in 0..4 {
        let a = rng.u32(..n as u32);
        let mut b = rng.u32(..n as u32 - 1);
        if b >= a {
            b += 1;
        }
        match (usable(a), usable(b)) {
            (true, true) => return Some(better(a, b)),
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            (false, false) => {}
        }
    }
    (0..n as u32).filter(|&i| usable(i)).reduce(better)
}

#[cfg(test)]
mod tests;
