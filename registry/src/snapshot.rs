//! Immutable snapshots of the catalog: the contract between the registry writer
//! and every reader (API, DNS, proxy).
//!
//! A `Snapshot` is built from persistent maps, so cloning it is O(1) and a change
//! rebuilds only the `ServiceView`s it touches: untouched services keep the very
//! same `Arc`. Everything a reader needs per query (routable set, per-tag subsets,
//! aggregated health) is computed here, at publish time.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};

use crate::model::{Check, Endpoint, Name, Node, Status};

/// The whole catalog at one index.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub(crate) index: u64,
    pub(crate) nodes: OrdMap<Name, Arc<NodeEntry>>,
    pub(crate) services: OrdMap<Name, Arc<ServiceView>>,
    /// service name -> its instances as `(node, endpoint id)`.
    pub(crate) members: OrdMap<Name, OrdSet<(Name, Name)>>,
    /// Last index at which each service changed; kept after a service is gone
    /// (a tombstone) so that a blocking query on it still sees a larger index.
    pub(crate) service_index: OrdMap<Name, u64>,
    pub(crate) tables: TableIndexes,
    pub(crate) counts: StateCounts,
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

    pub(crate) fn add(&mut self, other: &StateCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub(crate) fn sub(&mut self, other: &StateCounts) {
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
    /// The endpoint's checks followed by the node-level checks of its node.
    pub checks: Vec<Arc<Check>>,
    /// Worst status over `checks` (passing when there are none).
    pub health: Status,
    pub state: EndpointState,
}

impl Instance {
    fn new(endpoint: Arc<Endpoint>, node: Arc<Node>, checks: Vec<Arc<Check>>) -> Instance {
        let health = checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Passing);
        let maintenance = checks.iter().any(|c| c.is_maintenance());
        let state = if maintenance {
            EndpointState::Maintenance
        } else if node.drain.is_some() {
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
            checks,
            health,
            state,
        }
    }

    /// Passing or warning, not in maintenance, node not draining.
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
            EndpointState::Draining => Some(format!("node {} is draining", self.node.name)),
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
                    Some(c) if c.output.is_empty() => format!("check {} is critical", c.id),
                    Some(c) => format!("check {} is critical: {}", c.id, c.output),
                    None => "critical".to_string(),
                })
            }
        }
    }
}

/// A service with all its instances and the subsets readers ask for.
#[derive(Debug)]
pub struct ServiceView {
    pub name: Name,
    /// Last index at which anything shown for this service changed.
    pub index: u64,
    /// Sorted by `(node, endpoint id)`.
    pub instances: Vec<Instance>,
    /// Positions in `instances` of the routable ones.
    pub routable: Vec<u32>,
    /// Positions of the instances whose every check is passing (Consul's `?passing`).
    pub passing: Vec<u32>,
    /// Routable positions per tag, keyed by the tag in lowercase (for DNS).
    pub by_tag: HashMap<Box<str>, Vec<u32>>,
    /// Distinct tags over all instances, sorted.
    pub tags: Vec<String>,
    pub counts: StateCounts,
}

impl ServiceView {
    pub(crate) fn build(name: Name, index: u64, instances: Vec<Instance>) -> ServiceView {
        let mut routable = Vec::new();
        let mut passing = Vec::new();
        let mut by_tag: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut tags = BTreeSet::new();
        let mut counts = StateCounts::default();
        for (pos, instance) in instances.iter().enumerate() {
            let pos = pos as u32;
            counts.0[instance.state.slot()] += 1;
            for tag in &instance.endpoint.tags {
                tags.insert(tag.clone());
            }
            if instance.health == Status::Passing {
                passing.push(pos);
            }
            if instance.is_routable() {
                routable.push(pos);
                for tag in &instance.endpoint.tags {
                    let list = by_tag.entry(tag.to_ascii_lowercase().into()).or_default();
                    if list.last() != Some(&pos) {
                        list.push(pos);
                    }
                }
            }
        }
        ServiceView {
            name,
            index,
            instances,
            routable,
            passing,
            by_tag,
            tags: tags.into_iter().collect(),
            counts,
        }
    }

    /// Routable instances, optionally restricted to one tag (case-insensitive).
    pub fn routable_with_tag(&self, tag: Option<&str>) -> impl Iterator<Item = &Instance> {
        let positions: &[u32] = match tag {
            None => &self.routable,
            Some(tag) => {
                let key = tag.to_ascii_lowercase();
                self.by_tag.get(key.as_str()).map_or(&[], |v| v.as_slice())
            }
        };
        positions.iter().map(|&p| &self.instances[p as usize])
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
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceView>> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Index a blocking query on `name` compares against. A service that never
    /// existed reports 1, so a watcher of it wakes when it first appears.
    pub fn service_index(&self, name: &str) -> u64 {
        self.service_index.get(name).copied().unwrap_or(1).max(1)
    }

    pub fn node(&self, name: &str) -> Option<&Arc<NodeEntry>> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<NodeEntry>> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Endpoint counts by state over the whole catalog.
    pub fn counts(&self) -> StateCounts {
        self.counts
    }

    /// Every check in the catalog, node by node.
    pub fn checks(&self) -> impl Iterator<Item = &Arc<Check>> {
        self.nodes.values().flat_map(|n| n.checks.values())
    }

    /// Looks an instance up by node and endpoint id.
    pub fn instance(&self, node: &str, id: &str) -> Option<&Instance> {
        let entry = self.nodes.get(node)?;
        let endpoint = entry.endpoints.get(id)?;
        let view = self.services.get(&*endpoint.service)?;
        let pos = view
            .instances
            .binary_search_by(|i| (&*i.endpoint.node, &*i.endpoint.id).cmp(&(node, id)))
            .ok()?;
        view.instances.get(pos)
    }

    /// Rebuilds the view of one service from the records. Called by the writer
    /// for each service a change touched.
    pub(crate) fn build_view(&self, name: &Name) -> Option<ServiceView> {
        let members = self.members.get(name)?;
        if members.is_empty() {
            return None;
        }
        let mut instances = Vec::with_capacity(members.len());
        for (node, id) in members.iter() {
            let Some(entry) = self.nodes.get(node) else {
                debug_assert!(false, "member {node}/{id} has no node");
                continue;
            };
            let Some(endpoint) = entry.endpoints.get(id) else {
                debug_assert!(false, "member {node}/{id} has no endpoint");
                continue;
            };
            instances.push(Instance::new(
                endpoint.clone(),
                entry.node.clone(),
                entry.checks_for(id),
            ));
        }
        let index = self.service_index(name);
        Some(ServiceView::build(name.clone(), index, instances))
    }
}
