//! A service's view: its instances in chunks, what readers ask of them, and
//! the decorators that build reader data (DNS answers, proxy backends) from
//! them.
//!
//! A view keeps its instances sorted by `(node, endpoint id)` in chunks of at
//! most `CHUNK`, each with its own subsets (routable, passing, per tag) and its
//! own decorator outputs. A change rebuilds only the chunks whose key range it
//! touches and shares the others with the previous view, so one registration
//! into a service of 100,000 endpoints costs about what it costs in one of
//! 500: the chunk, plus a copy of the list of chunk handles.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;

use crate::model::{Name, Status};
use crate::snapshot::{Instance, Members, StateCounts};

/// The most instances in one chunk. A rebuilt run of chunks is split evenly
/// under this size.
pub const CHUNK: usize = 512;

/// A chunk smaller than this is merged with a neighbour when a change touches it.
const CHUNK_MIN: usize = CHUNK / 4;

/// Data a reader derives from a view or a chunk, as the view holds it.
pub type Extra = Arc<dyn Any + Send + Sync>;

/// What a decorator sees of the view it decorates a chunk for.
pub struct ViewHead<'a> {
    pub name: &'a Name,
    tags: &'a OrdMap<Name, u32>,
    /// The previous view's chunks that the new chunks replace, in key order
    /// (with their decorator outputs): a decorator that keeps state per
    /// instance finds it here by walking both in order.
    pub replaced: &'a [Arc<Chunk>],
}

impl ViewHead<'_> {
    /// Distinct tags over all instances, sorted.
    pub fn tags(&self) -> impl Iterator<Item = &str> + '_ {
        self.tags.keys().map(|t| &**t)
    }

    /// The distinct tags from `from` on, sorted.
    pub fn tags_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        tags_from(self.tags, from)
    }
}

fn tags_from<'a>(tags: &'a OrdMap<Name, u32>, from: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    tags.range::<_, str>((Bound::Included(from), Bound::Unbounded))
        .map(|(t, _)| &**t)
}

/// Which chunks a new view replaced: decorators that keep state per instance
/// (the proxy's per-endpoint counters) update it from these alone.
pub struct ViewChange<'a> {
    /// Chunks of the previous view that the new one no longer holds.
    pub removed: &'a [Arc<Chunk>],
    /// Chunks of the new view that the previous one did not hold.
    pub added: &'a [Arc<Chunk>],
}

/// Builds reader-specific data at publish time, in the writer: per chunk
/// (from that chunk's instances) and per view (from its chunks' outputs).
/// The registry knows nothing of what is built: this is how DNS gets prebuilt
/// answers without the registry depending on it.
pub trait ViewDecorator: Send + Sync + 'static {
    /// What it builds for each chunk.
    type Chunk: Send + Sync + 'static;
    /// What it builds for each view.
    type Output: Send + Sync + 'static;

    /// A fingerprint of what the chunk outputs depend on beyond the chunk's
    /// own instances. When it changes, every chunk of the view is decorated
    /// again.
    fn basis(&self, _view: &ViewHead<'_>) -> u64 {
        0
    }

    /// Builds a chunk's output (`key` finds this decorator's outputs of the
    /// chunks in `view.replaced`).
    fn decorate_chunk(
        &self,
        view: &ViewHead<'_>,
        chunk: &Chunk,
        key: ExtraKey<Self>,
    ) -> Arc<Self::Chunk>
    where
        Self: Sized;

    /// Runs after the view's chunks are decorated (`key` finds this
    /// decorator's chunk outputs). Cost should follow `change` and the number
    /// of chunks, not the number of instances.
    fn decorate(
        &self,
        view: &ServiceView,
        change: &ViewChange<'_>,
        key: ExtraKey<Self>,
    ) -> Arc<Self::Output>
    where
        Self: Sized;

    /// Runs at publish time, before any view is rebuilt, when keys of the
    /// KV store changed (and once at load), for decorators whose settings
    /// are kept there (the proxy's API routes). Returns the services whose
    /// views must be decorated again in the same publish.
    fn kv_changed(&self, _kv: &crate::kv::Kv) -> Vec<Name> {
        Vec::new()
    }
}

/// A decorator with its output types erased, as the writer runs it.
trait AnyDecorator: Send + Sync {
    fn basis(&self, view: &ViewHead<'_>) -> u64;
    fn chunk(&self, view: &ViewHead<'_>, chunk: &Chunk, at: usize) -> Extra;
    fn view(&self, view: &ServiceView, change: &ViewChange<'_>, at: usize) -> Extra;
    fn kv(&self, kv: &crate::kv::Kv) -> Vec<Name>;
}

impl<D: ViewDecorator> AnyDecorator for D {
    fn basis(&self, view: &ViewHead<'_>) -> u64 {
        ViewDecorator::basis(self, view)
    }

    fn chunk(&self, view: &ViewHead<'_>, chunk: &Chunk, at: usize) -> Extra {
        let key = ExtraKey {
            at,
            of: PhantomData,
        };
        self.decorate_chunk(view, chunk, key)
    }

    fn view(&self, view: &ServiceView, change: &ViewChange<'_>, at: usize) -> Extra {
        let key = ExtraKey {
            at,
            of: PhantomData,
        };
        self.decorate(view, change, key)
    }

    fn kv(&self, kv: &crate::kv::Kv) -> Vec<Name> {
        self.kv_changed(kv)
    }
}

/// The decorators the writer runs over every view it builds. Adding one
/// hands out the typed key under which its readers find its outputs in each
/// view and chunk, so no reader depends on the order decorators were added in.
#[derive(Clone, Default)]
pub struct Decorators(Vec<Arc<dyn AnyDecorator>>);

impl fmt::Debug for Decorators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decorators({})", self.0.len())
    }
}

impl Decorators {
    /// Runs `decorator` over every view from now on; its outputs are found
    /// with the key returned.
    pub fn add<D: ViewDecorator>(&mut self, decorator: Arc<D>) -> ExtraKey<D> {
        self.0.push(decorator);
        ExtraKey {
            at: self.0.len() - 1,
            of: PhantomData,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Tells every decorator the KV store changed; the services any of them
    /// wants decorated again.
    pub fn kv_changed(&self, kv: &crate::kv::Kv) -> Vec<Name> {
        self.0.iter().flat_map(|d| d.kv(kv)).collect()
    }

    fn bases(&self, head: &ViewHead<'_>) -> Box<[u64]> {
        self.0.iter().map(|d| d.basis(head)).collect()
    }

    fn chunk(&self, head: &ViewHead<'_>, chunk: &mut Chunk) {
        if !self.is_empty() {
            let extras = (self.0.iter().enumerate())
                .map(|(at, d)| d.chunk(head, chunk, at))
                .collect();
            chunk.extras = Extras(extras);
        }
    }
}

/// Where one decorator's outputs sit in every view and chunk.
pub struct ExtraKey<D> {
    at: usize,
    of: PhantomData<fn() -> D>,
}

impl<D> Clone for ExtraKey<D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for ExtraKey<D> {}

impl<D> PartialEq for ExtraKey<D> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl<D> fmt::Debug for ExtraKey<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtraKey({}, {})", self.at, std::any::type_name::<D>())
    }
}

/// The decorators' outputs, in registration order.
#[derive(Default)]
pub struct Extras(Box<[Extra]>);

impl fmt::Debug for Extras {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Extras({})", self.0.len())
    }
}

impl Extras {
    fn get<T: Any + Send + Sync>(&self, at: usize) -> Option<&T> {
        self.0.get(at)?.downcast_ref()
    }
}

/// Up to `CHUNK` consecutive instances of a view, with their subsets.
/// Positions are local to the chunk.
#[derive(Debug)]
pub struct Chunk {
    instances: Vec<Instance>,
    routable: Vec<u32>,
    passing: Vec<u32>,
    /// Routable positions per tag, keyed by the tag in lowercase (for DNS).
    by_tag: HashMap<Box<str>, Vec<u32>>,
    /// Distinct tags (as written) with the number of instances carrying each.
    tags: Vec<(Name, u32)>,
    counts: StateCounts,
    extras: Extras,
}

impl Chunk {
    fn build(instances: Vec<Instance>) -> Chunk {
        let mut routable = Vec::new();
        let mut passing = Vec::new();
        let mut by_tag: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut tags: HashMap<&str, u32> = HashMap::new();
        let mut counts = StateCounts::default();
        let mut lower = String::new();
        for (pos, instance) in instances.iter().enumerate() {
            let pos = pos as u32;
            counts.add_one(instance.state);
            for tag in &instance.endpoint.tags {
                *tags.entry(tag).or_default() += 1;
            }
            if instance.health == Status::Passing {
                passing.push(pos);
            }
            if instance.is_routable() {
                routable.push(pos);
                for tag in &instance.endpoint.tags {
                    // Most tags are lowercase already: no key is made for them.
                    let key: &str = if tag.bytes().any(|b| b.is_ascii_uppercase()) {
                        lower.clear();
                        lower.push_str(tag);
                        lower.make_ascii_lowercase();
                        &lower
                    } else {
                        tag
                    };
                    let list = match by_tag.get_mut(key) {
                        Some(list) => list,
                        None => by_tag.entry(key.into()).or_default(),
                    };
                    if list.last() != Some(&pos) {
                        list.push(pos);
                    }
                }
            }
        }
        let mut tags: Vec<(Name, u32)> = tags.into_iter().map(|(t, n)| (t.into(), n)).collect();
        tags.sort_unstable();
        Chunk {
            instances,
            routable,
            passing,
            by_tag,
            tags,
            counts,
            extras: Extras::default(),
        }
    }

    /// Sorted by `(node, endpoint id)`; never empty.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Positions of the routable instances.
    pub fn routable(&self) -> &[u32] {
        &self.routable
    }

    /// Positions of the instances whose every check is passing.
    pub fn passing(&self) -> &[u32] {
        &self.passing
    }

    /// Positions of the routable instances tagged `tag` (lowercase).
    pub fn tagged(&self, tag: &str) -> &[u32] {
        self.by_tag.get(tag).map_or(&[], |p| p)
    }

    pub fn counts(&self) -> StateCounts {
        self.counts
    }

    /// What the decorator of `key` built for this chunk.
    pub fn extra<D: ViewDecorator>(&self, key: ExtraKey<D>) -> Option<&D::Chunk> {
        self.extras.get(key.at)
    }

    /// Like `extra`, as a shared handle that outlives this borrow.
    pub fn extra_arc<D: ViewDecorator>(&self, key: ExtraKey<D>) -> Option<Arc<D::Chunk>> {
        self.extras.0.get(key.at)?.clone().downcast().ok()
    }

    fn first(&self) -> &Instance {
        &self.instances[0]
    }

    fn first_key(&self) -> (Name, Name) {
        let e = &self.first().endpoint;
        (e.node.clone(), e.id.clone())
    }

    fn has_node(&self, node: &str) -> bool {
        let at = self.instances.partition_point(|i| *i.endpoint.node < *node);
        self.instances
            .get(at)
            .is_some_and(|i| *i.endpoint.node == *node)
    }
}

/// A service with all its instances and the subsets readers ask for.
#[derive(Debug)]
pub struct ServiceView {
    pub name: Name,
    /// Last index at which anything shown for this service changed.
    pub index: u64,
    pub counts: StateCounts,
    chunks: Vec<Arc<Chunk>>,
    /// Position of each chunk's first instance, then the instance count.
    starts: Vec<u32>,
    routable_len: usize,
    passing_len: usize,
    /// Distinct tags over all instances with how many carry each.
    tags: OrdMap<Name, u32>,
    /// Each decorator's `basis` for the chunks' outputs.
    bases: Box<[u64]>,
    extras: Extras,
}

impl ServiceView {
    /// The chunks, in key order.
    pub fn chunks(&self) -> &[Arc<Chunk>] {
        &self.chunks
    }

    pub fn len(&self) -> usize {
        self.starts.last().map_or(0, |&n| n as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every instance, sorted by `(node, endpoint id)`.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> + '_ {
        self.chunks.iter().flat_map(|c| c.instances.iter())
    }

    /// The instance at `pos` in `instances()`.
    pub fn instance(&self, pos: usize) -> Option<&Instance> {
        let pos = u32::try_from(pos).ok()?;
        let at = self.starts.partition_point(|&s| s <= pos).checked_sub(1)?;
        self.chunks
            .get(at)?
            .instances
            .get((pos - self.starts[at]) as usize)
    }

    /// The instance of `(node, endpoint id)`.
    pub fn find(&self, node: &str, id: &str) -> Option<&Instance> {
        let key = (node, id);
        let at = self
            .chunks
            .partition_point(|c| {
                let e = &c.first().endpoint;
                (&*e.node, &*e.id) <= key
            })
            .checked_sub(1)?;
        let chunk = &self.chunks[at];
        let pos = chunk
            .instances
            .binary_search_by(|i| (&*i.endpoint.node, &*i.endpoint.id).cmp(&key))
            .ok()?;
        chunk.instances.get(pos)
    }

    /// The routable instances (passing or warning, not in maintenance, not draining).
    pub fn routable(&self) -> impl Iterator<Item = &Instance> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.routable.iter().map(|&p| &c.instances[p as usize]))
    }

    pub fn routable_len(&self) -> usize {
        self.routable_len
    }

    /// The instances whose every check is passing (Consul's `?passing`).
    pub fn passing(&self) -> impl Iterator<Item = &Instance> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.passing.iter().map(|&p| &c.instances[p as usize]))
    }

    pub fn passing_len(&self) -> usize {
        self.passing_len
    }

    /// Distinct tags over all instances, sorted.
    pub fn tags(&self) -> impl Iterator<Item = &str> + '_ {
        self.tags.keys().map(|t| &**t)
    }

    /// The distinct tags from `from` on, sorted.
    pub fn tags_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        tags_from(&self.tags, from)
    }

    pub fn tag_count(&self) -> usize {
        self.tags.len()
    }

    /// Whether any instance carries `tag`, compared without case.
    pub fn has_tag_ci(&self, tag: &str) -> bool {
        self.tags.keys().any(|t| t.eq_ignore_ascii_case(tag))
    }

    /// What the decorator of `key` built for this view (none before the
    /// writer has decorated it).
    pub fn extra<D: ViewDecorator>(&self, key: ExtraKey<D>) -> Option<&D::Output> {
        self.extras.get(key.at)
    }

    /// Like `extra`, as a shared handle that outlives this borrow.
    pub fn extra_arc<D: ViewDecorator>(&self, key: ExtraKey<D>) -> Option<Arc<D::Output>> {
        self.extras.0.get(key.at)?.clone().downcast().ok()
    }

    /// Builds the view of `name` at `index` from its members: the writer's.
    ///
    /// `previous` is the service's current view. Its chunks that hold no
    /// instance of a node in `changed` are shared as they are (with their
    /// decorator outputs); a rebuilt chunk reuses each instance whose node did
    /// not change. `fresh` makes the instance of a member from the records.
    /// `redecorate` decorates every chunk again (the decorators' settings
    /// changed).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        name: &Name,
        index: u64,
        members: &Members,
        previous: Option<&ServiceView>,
        changed: &HashSet<Name>,
        redecorate: bool,
        decorators: &Decorators,
        fresh: impl Fn(&Name, &Name) -> Option<Instance>,
    ) -> Option<ServiceView> {
        if members.is_empty() {
            return None;
        }
        let old: &[Arc<Chunk>] = previous.map_or(&[], |v| &v.chunks);
        let n = old.len();
        let mut dirty = vec![redecorate || n <= 1 || changed.len() >= n; n];
        if !dirty.iter().all(|&d| d) {
            for node in changed {
                let below = old.partition_point(|c| *c.first().endpoint.node < **node);
                let upto = old.partition_point(|c| *c.first().endpoint.node <= **node);
                let (a, b) = (below.saturating_sub(1), upto.saturating_sub(1));
                let b = b.max(a);
                let had = (a..=b).any(|i| old[i].has_node(node));
                if had || members.has_node(node) {
                    dirty[a..=b].fill(true);
                }
            }
            // A small chunk that is rebuilt takes a neighbour along, so that
            // removals do not leave a view of many tiny chunks.
            for i in 0..n {
                if dirty[i] && old[i].instances.len() < CHUNK_MIN && n > 1 {
                    let j = if i + 1 < n { i + 1 } else { i - 1 };
                    dirty[j] = true;
                }
            }
        }

        // Runs of dirty chunks, each rebuilt from the members in its key range.
        let mut chunks: Vec<Arc<Chunk>> = Vec::with_capacity(n.max(1));
        let mut built: Vec<(usize, Vec<Chunk>)> = Vec::new();
        let mut removed: Vec<Arc<Chunk>> = Vec::new();
        let mut i = 0;
        if n == 0 {
            let instances = merge(members.iter(), &[], changed, &fresh);
            built.push((0, split(instances)));
        }
        while i < n {
            if !dirty[i] {
                chunks.push(old[i].clone());
                i += 1;
                continue;
            }
            let a = i;
            while i < n && dirty[i] {
                i += 1;
            }
            let b = i - 1;
            let lo = if a == 0 {
                Bound::Unbounded
            } else {
                Bound::Included(old[a].first_key())
            };
            let hi = if b + 1 == n {
                Bound::Unbounded
            } else {
                Bound::Excluded(old[b + 1].first_key())
            };
            let instances = merge(members.range(lo, hi), &old[a..=b], changed, &fresh);
            removed.extend(old[a..=b].iter().cloned());
            built.push((chunks.len(), split(instances)));
            // Placeholder positions are filled in below, once decorated.
        }

        // The view's totals: the previous ones, less the removed chunks,
        // plus the new.
        let (mut tags, mut counts, mut routable_len, mut passing_len) = match previous {
            Some(v) if n > 0 => (v.tags.clone(), v.counts, v.routable_len, v.passing_len),
            _ => (OrdMap::new(), StateCounts::default(), 0, 0),
        };
        for chunk in &removed {
            for (tag, count) in &chunk.tags {
                if let Some(total) = tags.get_mut(tag) {
                    *total -= count;
                    if *total == 0 {
                        tags.remove(tag);
                    }
                }
            }
            counts.sub(&chunk.counts);
            routable_len -= chunk.routable.len();
            passing_len -= chunk.passing.len();
        }
        for chunk in built.iter().flat_map(|(_, b)| b) {
            for (tag, count) in &chunk.tags {
                *tags.entry(tag.clone()).or_default() += count;
            }
            counts.add(&chunk.counts);
            routable_len += chunk.routable.len();
            passing_len += chunk.passing.len();
        }

        let head = ViewHead {
            name,
            tags: &tags,
            replaced: &removed,
        };
        let bases = decorators.bases(&head);
        if previous.is_some_and(|v| v.bases != bases) && !redecorate {
            // What every chunk's outputs depend on changed: all are rebuilt
            // (their instances are kept).
            return ServiceView::build(
                name, index, members, previous, changed, true, decorators, fresh,
            );
        }

        let mut added = Vec::new();
        for (at, run) in built.into_iter().rev() {
            let run: Vec<Arc<Chunk>> = run
                .into_iter()
                .map(|mut chunk| {
                    decorators.chunk(&head, &mut chunk);
                    Arc::new(chunk)
                })
                .collect();
            added.extend(run.iter().cloned());
            chunks.splice(at..at, run);
        }
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut total = 0u32;
        for chunk in &chunks {
            starts.push(total);
            total += chunk.instances.len() as u32;
        }
        starts.push(total);
        let mut view = ServiceView {
            name: name.clone(),
            index,
            counts,
            chunks,
            starts,
            routable_len,
            passing_len,
            tags,
            bases,
            extras: Extras::default(),
        };
        if !decorators.is_empty() {
            let change = ViewChange {
                removed: &removed,
                added: &added,
            };
            let extras = (decorators.0.iter().enumerate())
                .map(|(at, d)| d.view(&view, &change, at))
                .collect();
            view.extras = Extras(extras);
        }
        Some(view)
    }
}

/// The instances of `members` (sorted), reusing those of `old` whose node is
/// not in `changed`.
fn merge<'a>(
    members: impl Iterator<Item = &'a (Name, Name)>,
    old: &[Arc<Chunk>],
    changed: &HashSet<Name>,
    fresh: &impl Fn(&Name, &Name) -> Option<Instance>,
) -> Vec<Instance> {
    let mut old = old.iter().flat_map(|c| c.instances.iter()).peekable();
    let mut instances = Vec::new();
    for (node, id) in members {
        // Both sequences are sorted by (node, id): advance the old one.
        while old
            .peek()
            .is_some_and(|i| (&*i.endpoint.node, &*i.endpoint.id) < (&**node, &**id))
        {
            old.next();
        }
        if !changed.contains(node) {
            if let Some(reused) = old.next_if(|i| i.endpoint.node == *node && i.endpoint.id == *id)
            {
                instances.push(reused.clone());
                continue;
            }
        }
        if let Some(instance) = fresh(node, id) {
            instances.push(instance);
        }
    }
    instances
}

/// Splits sorted instances into chunks of at most `CHUNK`, evenly.
fn split(instances: Vec<Instance>) -> Vec<Chunk> {
    if instances.len() <= CHUNK {
        return if instances.is_empty() {
            Vec::new()
        } else {
            vec![Chunk::build(instances)]
        };
    }
    let parts = instances.len().div_ceil(CHUNK);
    let size = instances.len().div_ceil(parts);
    let mut rest = instances.into_iter();
    let mut chunks = Vec::with_capacity(parts);
    loop {
        let part: Vec<Instance> = rest.by_ref().take(size).collect();
        if part.is_empty() {
            break;
        }
        chunks.push(Chunk::build(part));
    }
    chunks
}
