//! Immutable snapshots of the catalog: the contract between the registry writer
//! and every reader (API, DNS, proxy).
//!
//! A `Snapshot` is built from persistent maps, so cloning it is O(1) and a change
//! rebuilds only the `ServiceView`s it touches: untouched services keep the very
//! same `Arc`. Everything a reader needs per query (routable set, per-tag subsets,
//! aggregated health) is computed here, at publish time.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;

use imbl::{HashMap as PMap, OrdMap, OrdSet};

use crate::model::{Check, Endpoint, Name, Node, Status};
use crate::view::{Decorators, ServiceView};

/// The whole catalog at one index.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub index: u64,
    pub nodes: OrdMap<Name, Arc<NodeEntry>>,
    /// One slot per service name ever seen. A hash trie (not a B-tree): a change
    /// path-copies one slot's branch, with hash compares instead of string ones.
    pub services: PMap<Name, Arc<ServiceEntry>>,
    /// Services with at least one instance.
    pub service_count: usize,
    /// Lowercase alias -> name, only for service names with uppercase letters,
    /// so that case-insensitive lookups (DNS) find them.
    pub aliases: PMap<Name, Name>,
    /// Lowercase alias -> name, only for node names with uppercase letters
    /// (DNS asks in lower case).
    pub node_aliases: PMap<Name, Name>,
    pub tables: TableIndexes,
    pub counts: StateCounts,
    /// Prepared queries, with the index of their last change.
    pub queries: crate::query::Queries,
    /// The key/value store.
    pub kv: crate::kv::Kv,
    pub sessions: crate::session::Sessions,
}

/// Everything kept per service name, in one map entry so that a change costs
/// one path copy. A slot outlives its last instance as a tombstone carrying the
/// index, so a blocking query on a removed service still sees the index grow.
#[derive(Clone, Debug)]
pub struct ServiceEntry {
    /// The service name, shared by every endpoint of the service (interned).
    pub name: Name,
    /// Instances as `(node, endpoint id)`.
    pub members: Members,
    /// Last index at which anything shown for the service changed.
    pub index: u64,
    /// Built at publish time; `None` once the last instance is gone.
    pub view: Option<Arc<ServiceView>>,
}

/// Per-table modify indexes for list endpoints (all services, all nodes, all checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableIndexes {
    /// Any endpoint added, removed or changed.
    pub services: u64,
    /// Any node added, removed or changed.
    pub nodes: u64,
    /// Any check added, removed or changed.
    pub checks: u64,
}

/// A node with everything registered on it.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub node: Arc<Node>,
    pub endpoints: OrdMap<Name, Arc<Endpoint>>,
    pub checks: OrdMap<Name, Arc<Check>>,
    /// Last index at which the node, one of its endpoints or checks changed.
    pub index: u64,
}

impl NodeEntry {
    /// Checks that apply to an endpoint: its own, then the node-level ones.
    pub fn checks_for(&self, endpoint_id: &str) -> Vec<Arc<Check>> {
        let mut own = Vec::new();
        let mut node_level = Vec::new();
        for check in self.checks.values() {
            if check.service_id == endpoint_id {
                own.push(check.clone());
            } else if check.is_node_level() {
                node_level.push(check.clone());
            }
        }
        own.extend(node_level);
        own
    }
}

/// Why an endpoint is or is not routable. Exclusive; the first that applies wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointState {
    Passing,
    Warning,
    Critical,
    Maintenance,
    Draining,
}

impl EndpointState {
    pub const ALL: [EndpointState; 5] = [
        EndpointState::Passing,
        EndpointState::Warning,
        EndpointState::Critical,
        EndpointState::Maintenance,
        EndpointState::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Passing => "passing",
            EndpointState::Warning => "warning",
            EndpointState::Critical => "critical",
            EndpointState::Maintenance => "maintenance",
            EndpointState::Draining => "draining",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// Endpoint counts by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts([u64; 5]);

impl StateCounts {
    pub fn get(&self, state: EndpointState) -> u64 {
        self.0[state.slot()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &StateCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub(crate) fn add_one(&mut self, state: EndpointState) {
        self.0[state.slot()] += 1;
    }

    pub fn sub(&mut self, other: &StateCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_sub(b);
        }
    }
}

/// One endpoint as readers see it: the record, its node and its checks.
#[derive(Clone, Debug)]
pub struct Instance {
    pub endpoint: Arc<Endpoint>,
    pub node: Arc<Node>,
    /// The endpoint's checks followed by the node-level checks of its node
    /// (shared: reusing an instance in the next view copies no list).
    pub checks: Arc<[Arc<Check>]>,
    /// Worst status over `checks` (passing when there are none).
    pub health: Status,
    pub state: EndpointState,
}

impl Instance {
    pub(crate) fn new(
        endpoint: Arc<Endpoint>,
        node: Arc<Node>,
        checks: Vec<Arc<Check>>,
    ) -> Instance {
        let health = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Passing);
        let maintenance = checks.iter().any(|c| c.is_maintenance());
        let state = if maintenance {
            EndpointState::Maintenance
        } else if node.drain.is_some() || endpoint.drain.is_some() {
            EndpointState::Draining
        } else {
            match health {
                Status::Passing => EndpointState::Passing,
                Status::Warning => EndpointState::Warning,
                Status::Critical => EndpointState::Critical,
            }
        };
        Instance {
            endpoint,
            node,
            checks: checks.into(),
            health,
            state,
        }
    }

    /// The deadline of the drain this endpoint is under (its own or its
    /// node's, whichever ends first), in Unix milliseconds.
    pub fn drain_deadline_ms(&self) -> Option<u64> {
        crate::model::Drain::earliest_deadline(
            self.node.drain.as_ref(),
            self.endpoint.drain.as_ref(),
        )
    }

    /// The weight its state gives it: `Weights.Warning` while warning, else
    /// `Weights.Passing`.
    pub fn weight(&self) -> u32 {
        match self.state {
            EndpointState::Warning => self.endpoint.weights.warning,
            _ => self.endpoint.weights.passing,
        }
    }

    /// Passing or warning, not in maintenance, neither it nor its node draining.
    pub fn is_routable(&self) -> bool {
        matches!(self.state, EndpointState::Passing | EndpointState::Warning)
    }

    /// The address traffic goes to: the endpoint's own, else its node's.
    pub fn address(&self) -> &str {
        if self.endpoint.address.is_empty() {
            &self.node.address
        } else {
            &self.endpoint.address
        }
    }

    /// A short human explanation of why the endpoint is excluded, if it is.
    pub fn excluded_because(&self) -> Option<String> {
        match self.state {
            EndpointState::Passing | EndpointState::Warning => None,
            EndpointState::Draining if self.node.drain.is_some() => {
                Some(format!("node {} is draining", self.node.name))
            }
            EndpointState::Draining => Some(format!("endpoint {} is draining", self.endpoint.id)),
            EndpointState::Maintenance => {
                let check = self.checks.iter().find(|c| c.is_maintenance());
                Some(match check {
                    Some(c) if c.is_node_level() => format!("node maintenance: {}", c.notes),
                    Some(c) => format!("service maintenance: {}", c.notes),
                    None => "maintenance".to_string(),
                })
            }
            EndpointState::Critical => {
                let check = self.checks.iter().find(|c| c.status == Status::Critical);
                Some(match check {
                    Some(c) => {
                        let since =
                            crate::model::unix_ms().saturating_sub(c.status_since_ms) / 1000;
                        let since = crate::duration::format_go_duration(
                            std::time::Duration::from_secs(since),
                        );
                        if c.output.is_empty() {
                            format!("check {} is critical (for {since})", c.id)
                        } else {
                            format!("check {} is critical (for {since}): {}", c.id, c.output)
                        }
                    }
                    None => "critical".to_string(),
                })
            }
        }
    }
}

/// A service's instances as sorted `(node, endpoint id)` keys. Small services
/// (the common case: a handful of replicas) keep a plain sorted `Vec`; an
/// `OrdSet` allocates a 16-slot chunk per node, over 500 bytes for a service of
/// three. Past `LARGE` members the persistent set takes over, whose chunk cost is
/// then spread thin and whose clone stays O(1).
#[derive(Clone, Debug)]
pub enum Members {
    Small(Vec<(Name, Name)>),
    Large(OrdSet<(Name, Name)>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Small(Vec::new())
    }
}

impl Members {
    const LARGE: usize = 32;

    pub fn insert(&mut self, key: (Name, Name)) {
        match self {
            Members::Small(list) => {
                if let Err(at) = list.binary_search(&key) {
                    list.insert(at, key);
                    if list.len() > Self::LARGE {
                        *self = Members::Large(list.drain(..).collect());
                    }
                }
            }
            Members::Large(set) => {
                set.insert(key);
            }
        }
    }

    pub fn remove(&mut self, key: &(Name, Name)) {
        match self {
            Members::Small(list) => {
                if let Ok(at) = list.binary_search(key) {
                    list.remove(at);
                }
            }
            Members::Large(set) => {
                set.remove(key);
                if set.len() <= Self::LARGE / 2 {
                    *self = Members::Small(set.iter().cloned().collect());
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Members::Small(list) => list.len(),
            Members::Large(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The members in a key range, in sorted order.
    pub fn range(
        &self,
        lo: Bound<(Name, Name)>,
        hi: Bound<(Name, Name)>,
    ) -> Box<dyn Iterator<Item = &(Name, Name)> + '_> {
        match self {
            Members::Small(list) => {
                let start = match &lo {
                    Bound::Included(k) => list.partition_point(|m| m < k),
                    Bound::Excluded(k) => list.partition_point(|m| m <= k),
                    Bound::Unbounded => 0,
                };
                let end = match &hi {
                    Bound::Included(k) => list.partition_point(|m| m <= k),
                    Bound::Excluded(k) => list.partition_point(|m| m < k),
                    Bound::Unbounded => list.len(),
                };
                Box::new(list[start..end.max(start)].iter())
            }
            Members::Large(set) => Box::new(set.range((lo, hi))),
        }
    }

    /// Whether any member is on `node`.
    pub fn has_node(&self, node: &Name) -> bool {
        let from = (node.clone(), Name::from(""));
        self.range(Bound::Included(from), Bound::Unbounded)
            .next()
            .is_some_and(|(n, _)| n == node)
    }

    /// In sorted order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &(Name, Name)> + '_> {
        match self {
            Members::Small(list) => Box::new(list.iter()),
            Members::Large(set) => Box::new(set.iter()),
        }
    }
}

impl Snapshot {
    /// The catalog index this snapshot was published at (never 0 once published).
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn tables(&self) -> TableIndexes {
        self.tables
    }

    pub fn service(&self, name: &str) -> Option<&Arc<ServiceView>> {
        self.services.get(name)?.view.as_ref()
    }

    /// Looks a service up by a lowercase name (DNS): the exact name first, then
    /// a service whose name differs only in case.
    pub fn service_ci(&self, lower: &str) -> Option<&Arc<ServiceView>> {
        self.service(lower)
            .or_else(|| self.aliases.get(lower).and_then(|name| self.service(name)))
    }

    /// Every service with at least one instance, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceView>> {
        self.services.values().filter_map(|slot| slot.view.as_ref())
    }

    /// Every service, sorted by name (for listings).
    pub fn services_sorted(&self) -> Vec<&Arc<ServiceView>> {
        let mut list: Vec<_> = self.services().collect();
        list.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn service_count(&self) -> usize {
        self.service_count
    }

    /// Index a blocking query on `name` compares against. A service that never
    /// existed reports 1, so a watcher of it wakes when it first appears.
    pub fn service_index(&self, name: &str) -> u64 {
        self.services.get(name).map_or(1, |slot| slot.index).max(1)
    }

    pub fn node(&self, name: &str) -> Option<&Arc<NodeEntry>> {
        self.nodes.get(name)
    }

    /// A node by its name in lower case (DNS), whatever its case.
    pub fn node_ci(&self, lower: &str) -> Option<&Arc<NodeEntry>> {
        self.nodes.get(lower).or_else(|| {
            self.node_aliases
                .get(lower)
                .and_then(|name| self.nodes.get(name))
        })
    }

    /// The writer's: adds a node (and its lowercase alias when its name
    /// has capitals).
    pub fn insert_node(&mut self, name: Name, entry: Arc<NodeEntry>) {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.node_aliases
                .insert(name.to_ascii_lowercase().into(), name.clone());
        }
        self.nodes.insert(name, entry);
    }

    /// The writer's: removes a node and its alias.
    pub fn remove_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() && name.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = name.to_ascii_lowercase();
            if self
                .node_aliases
                .get(lower.as_str())
                .is_some_and(|n| **n == *name)
            {
                self.node_aliases.remove(lower.as_str());
            }
        }
    }

    /// Every node, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<NodeEntry>> {
        self.nodes.values()
    }

    /// Every node, sorted by name (for listings).
    pub fn nodes_sorted(&self) -> Vec<&Arc<NodeEntry>> {
        let mut list: Vec<_> = self.nodes.values().collect();
        list.sort_unstable_by(|a, b| a.node.name.cmp(&b.node.name));
        list
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Endpoint counts by state over the whole catalog.
    pub fn counts(&self) -> StateCounts {
        self.counts
    }

    /// Every check in the catalog, node by node (nodes in no particular order).
    pub fn checks(&self) -> impl Iterator<Item = &Arc<Check>> {
        self.nodes.values().flat_map(|n| n.checks.values())
    }

    /// Looks an instance up by node and endpoint id.
    pub fn instance(&self, node: &str, id: &str) -> Option<&Instance> {
        let entry = self.nodes.get(node)?;
        let endpoint = entry.endpoints.get(id)?;
        self.service(&endpoint.service)?.find(node, id)
    }

    /// The slot of a service for editing. A new slot is named after the
    /// service and, when the name has capitals, given its lowercase alias.
    pub fn service_entry_mut(&mut self, service: &Name) -> &mut ServiceEntry {
        if !self.services.contains_key(service) && service.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower: Name = service.to_ascii_lowercase().into();
            self.aliases.insert(lower, service.clone());
        }
        let slot = self.services.entry(service.clone()).or_insert_with(|| {
            Arc::new(ServiceEntry {
                name: service.clone(),
                members: Members::default(),
                index: 0,
                view: None,
            })
        });
        Arc::make_mut(slot)
    }

    /// Rebuilds the view of one service from the records (see
    /// `ServiceView::build`). Called by the writer for each service a change
    /// touched; `changed_nodes` are the nodes whose entry changed.
    pub fn build_view(
        &self,
        name: &Name,
        changed_nodes: &HashSet<Name>,
        redecorate: bool,
        decorators: &Decorators,
    ) -> Option<ServiceView> {
        let slot = self.services.get(name)?;
        ServiceView::build(
            name,
            slot.index,
            &slot.members,
            slot.view.as_deref(),
            changed_nodes,
            redecorate,
            decorators,
            |node, id| {
                let Some(entry) = self.nodes.get(node) else {
                    debug_assert!(false, "member {node}/{id} has no node");
                    return None;
                };
                let Some(endpoint) = entry.endpoints.get(id) else {
                    debug_assert!(false, "member {node}/{id} has no endpoint");
                    return None;
                };
                Some(Instance::new(
                    endpoint.clone(),
                    entry.node.clone(),
                    entry.checks_for(id),
                ))
            },
        )
    }
}
