//! Balancers: pick one backend of a service for a request, skipping backends
//! already tried by this request and, while any other is left, ejected ones.
//! Everything here reads atomics and the view's immutable lists; the lazily
//! built schedule and ring are made once per view.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::config::BalancerKind;
pub(crate) use crate::stats::Backend;

/// One view chunk's routable backends (usable address, weight above 0),
/// as the proxy decorator builds them per chunk: shared by every view that
/// keeps the chunk, with the chunk's cumulative weights and its lazily built
/// share of the hash ring.
#[derive(Default)]
pub(crate) struct BackendChunk {
    list: Box<[Backend]>,
    /// `weights[i]`: the total weight of `list[..i]` (one more entry than `list`).
    weights: Box<[u64]>,
    ring: OnceLock<HashRing>,
}

impl BackendChunk {
    pub(crate) fn new(list: Vec<Backend>) -> BackendChunk {
        let mut weights = Vec::with_capacity(list.len() + 1);
        let mut total = 0u64;
        weights.push(0);
        for backend in &list {
            total += u64::from(backend.weight);
            weights.push(total);
        }
        BackendChunk {
            list: list.into_boxed_slice(),
            weights: weights.into_boxed_slice(),
            ring: OnceLock::new(),
        }
    }

    fn total(&self) -> u64 {
        self.weights.last().copied().unwrap_or(0)
    }

    fn ring(&self) -> &HashRing {
        self.ring.get_or_init(|| HashRing::build(&self.list))
    }
}

/// A view's routable backends: its chunks' lists read as one, indexed from
/// 0, with what the balancers share per view (the round-robin cursor, and
/// for a view of one chunk nginx's smooth weighted schedule). Building one
/// costs the number of chunks, not of backends.
#[derive(Default)]
pub(crate) struct Backends {
    /// The chunks that have backends.
    chunks: Box<[Arc<BackendChunk>]>,
    /// Index of each chunk's first backend, then the backend count.
    starts: Box<[u32]>,
    /// Total weight before each chunk, then the view's total.
    weights: Box<[u64]>,
    /// The step (coprime with the total weight) round robin takes through
    /// the weight space of a view of several chunks.
    stride: u64,
    cursor: AtomicUsize,
    schedule: OnceLock<Box<[u32]>>,
}

impl Backends {
    /// One list, as a view of one chunk (another datacenter's proxies, the
    /// tests' services).
    pub(crate) fn new(list: Vec<Backend>) -> Backends {
        Backends::of([Arc::new(BackendChunk::new(list))])
    }

    pub(crate) fn of(chunks: impl IntoIterator<Item = Arc<BackendChunk>>) -> Backends {
        let chunks: Box<[Arc<BackendChunk>]> =
            chunks.into_iter().filter(|c| !c.list.is_empty()).collect();
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut weights = Vec::with_capacity(chunks.len() + 1);
        let (mut count, mut total) = (0u32, 0u64);
        for chunk in chunks.iter() {
            starts.push(count);
            weights.push(total);
            count += chunk.list.len() as u32;
            total += chunk.total();
        }
        starts.push(count);
        weights.push(total);
        Backends {
            chunks,
            starts: starts.into_boxed_slice(),
            weights: weights.into_boxed_slice(),
            stride: stride(total),
            ..Backends::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.starts.last().map_or(0, |&n| n as usize)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Backend> + '_ {
        self.chunks.iter().flat_map(|c| c.list.iter())
    }

    /// The chunk holding backend `index`, and the index in it.
    fn locate(&self, index: u32) -> (usize, usize) {
        let at = self
            .starts
            .partition_point(|&s| s <= index)
            .saturating_sub(1);
        (at, (index - self.starts[at]) as usize)
    }

    /// The backend whose share of the total weight holds `slot`.
    fn at_weight(&self, slot: u64) -> u32 {
        let at = self
            .weights
            .partition_point(|&w| w <= slot)
            .saturating_sub(1);
        let chunk = &self.chunks[at];
        let slot = slot - self.weights[at];
        let local = chunk
            .weights
            .partition_point(|&w| w <= slot)
            .saturating_sub(1);
        self.starts[at] + local as u32
    }
}

impl std::ops::Index<usize> for Backends {
    type Output = Backend;

    fn index(&self, index: usize) -> &Backend {
        let (at, local) = self.locate(index as u32);
        &self.chunks[at].list[local]
    }
}

/// About the golden section of `total`, moved to the next number coprime
/// with it: consecutive turns land far apart, and `total` turns visit every
/// slot once.
fn stride(total: u64) -> u64 {
    if total <= 1 {
        return 1;
    }
    let mut step = ((total as f64 * 0.618_033_988_75) as u64).clamp(1, total - 1);
    while gcd64(step, total) != 1 {
        step += 1;
    }
    step
}

fn gcd64(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd64(b, a % b)
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

    /// The backends tried, as indices into a subset whose backends' indices
    /// in the whole list are `full` (ascending); those outside it dropped.
    pub(crate) fn within(&self, full: &[u32]) -> Tried {
        let mut local = Tried::default();
        for &index in &self.picks[..self.len] {
            if let Ok(at) = full.binary_search(&index) {
                local.add(at as u32);
            }
        }
        local
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

    /// The first point at or after `key` on the ring (looking at no more
    /// than `limit` points) whose backend is usable.
    fn find(&self, key: u64, usable: impl Fn(u32) -> bool, limit: usize) -> Option<(u64, u32)> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(h, _)| *h < key);
        (0..self.points.len().min(limit))
            .map(|step| self.points[(start + step) % self.points.len()])
            .find(|&(_, i)| usable(i))
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

/// How a route chooses among its service's backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Choice<'a> {
    pub(crate) kind: BalancerKind,
    /// The consistent-hash key, when the route hashes.
    pub(crate) key: Option<u64>,
    /// Slow start (ns, 0 = off): a newly routable backend's share ramps
    /// from `RAMP_FLOOR` to full over this window.
    pub(crate) slow_start_ns: u64,
    /// The tag of the split subset the request goes to (none: the whole
    /// service).
    pub(crate) subset: Option<&'a str>,
}

impl Choice<'_> {
    pub(crate) fn new(kind: BalancerKind, key: Option<u64>) -> Choice<'static> {
        Choice {
            kind,
            key,
            slow_start_ns: 0,
            subset: None,
        }
    }
}

/// The share a backend gets when its slow start begins.
pub(crate) const RAMP_FLOOR: f64 = 0.1;

/// Chooses a backend for one attempt (the route's plain balancer, as the
/// tests drive it).
#[cfg(test)]
pub(crate) fn pick(
    set: &Backends,
    kind: BalancerKind,
    key: Option<u64>,
    tried: &Tried,
    now: u64,
    rng: &mut fastrand::Rng,
) -> Option<(u32, bool)> {
    pick_with(set, Choice::new(kind, key), tried, now, rng)
}

/// Chooses a backend for one attempt. Returns the index and whether the
/// choice had to include ejected backends (fail-open).
///
/// With slow start, a backend still ramping is passed over with the
/// probability of the share it lacks, wherever its balancer lands on it:
/// the next in the round-robin order, another draw or the other of two
/// choices takes the turn, so its share of requests grows with its ramp in
/// every balancer that weighs. Consistent hashing keeps its keys instead.
pub(crate) fn pick_with(
    set: &Backends,
    choice: Choice<'_>,
    tried: &Tried,
    now: u64,
    rng: &mut fastrand::Rng,
) -> Option<(u32, bool)> {
    if set.is_empty() {
        return None;
    }
    let Choice { kind, key, .. } = choice;
    let healthy = |i: u32| !tried.contains(i) && !set[i as usize].stats.is_ejected(now);
    if choice.slow_start_ns > 0 && kind != BalancerKind::ConsistentHash {
        let draws = std::cell::Cell::new(rng.u64(..) | 1);
        let admitted = |i: u32| {
            healthy(i) && {
                let share = set[i as usize].stats.ramp(now, choice.slow_start_ns);
                share >= 1.0 || unit(&draws) < share
            }
        };
        if let Some(i) = pick_among(set, kind, key, &admitted, now, rng) {
            return Some((i, false));
        }
    }
    if let Some(i) = pick_among(set, kind, key, &healthy, now, rng) {
        return Some((i, false));
    }
    let untried = |i: u32| !tried.contains(i);
    pick_among(set, kind, key, &untried, now, rng).map(|i| (i, true))
}

/// The next number of a xorshift sequence, as a fraction in [0, 1).
fn unit(state: &std::cell::Cell<u64>) -> f64 {
    let mut x = state.get();
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.set(x);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn pick_among(
    set: &Backends,
    kind: BalancerKind,
    key: Option<u64>,
    usable: &dyn Fn(u32) -> bool,
    now: u64,
    rng: &mut fastrand::Rng,
) -> Option<u32> {
    let n = set.len();
    let from = |start: usize| {
        (0..n)
            .map(|step| ((start + step) % n) as u32)
            .find(|&i| usable(i))
    };
    match kind {
        BalancerKind::RoundRobin => match &*set.chunks {
            [one] => {
                let order = set.schedule.get_or_init(|| schedule(&one.list));
                let start = set.cursor.fetch_add(1, Ordering::Relaxed);
                (0..order.len())
                    .map(|step| order[(start + step) % order.len()])
                    .find(|&i| usable(i))
            }
            // Many chunks: turn `c` takes the weight slot `c * stride` (mod
            // the total), so each backend gets its weight's share of every
            // round and consecutive turns land far apart.
            _ => {
                let total = set.weights.last().copied().unwrap_or(0);
                let start = set.cursor.fetch_add(1, Ordering::Relaxed) as u64;
                let slot = |turn: u64| {
                    let slot =
                        u128::from(turn % total) * u128::from(set.stride) % u128::from(total);
                    set.at_weight(slot as u64)
                };
                (0..total.min(64))
                    .map(|step| slot(start.wrapping_add(step)))
                    .find(|&i| usable(i))
                    .or_else(|| from(start as usize % n))
            }
        },
        // A few draws before walking on from one, so that a backend passed
        // over does not hand its turn to its neighbour alone.
        BalancerKind::Random => (0..4)
            .map(|_| rng.u32(..n as u32))
            .find(|&i| usable(i))
            .or_else(|| from(rng.usize(..n))),
        BalancerKind::ConsistentHash => match key {
            Some(key) => ring_find(set, key, usable),
            None => from(rng.usize(..n)),
        },
        BalancerKind::LeastRequest => p2c(set, usable, rng, |b| {
            (b.stats.in_flight().max(0) as f64 + 1.0) / f64::from(b.weight)
        }),
        BalancerKind::PeakEwma => p2c(set, usable, rng, |b| {
            b.stats.latency_ns(now) * (b.stats.in_flight().max(0) as f64 + 1.0)
                / f64::from(b.weight)
        }),
    }
}

/// The first usable backend clockwise from `key` on the ring of all the
/// view's chunks: each chunk holds its backends' points, so the answer is
/// the nearest of each chunk's first usable point.
fn ring_find(set: &Backends, key: u64, usable: &dyn Fn(u32) -> bool) -> Option<u32> {
    if let [one] = &*set.chunks {
        return one.ring().find(key, usable, usize::MAX).map(|(_, i)| i);
    }
    let mut best: Option<(u64, u32)> = None;
    for (at, chunk) in set.chunks.iter().enumerate() {
        let base = set.starts[at];
        let found = chunk.ring().find(key, |i| usable(base + i), 64);
        if let Some((point, i)) = found {
            let distance = point.wrapping_sub(key);
            if best.is_none_or(|(d, _)| distance < d) {
                best = Some((distance, base + i));
            }
        }
    }
    best.map(|(_, i)| i).or_else(|| {
        let n = set.len();
        (0..n as u32).find(|&i| usable(i))
    })
}

/// Power of two choices: the cheaper of two distinct random usable backends
/// (ties go to whichever was drawn first, so idle backends share evenly).
fn p2c(
    backends: &Backends,
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
