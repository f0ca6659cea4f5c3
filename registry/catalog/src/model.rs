//! The registry's records: nodes, endpoints (service instances) and checks.
//!
//! These are what the store persists and what snapshots share with readers. They
//! derive serde because they cross the store boundary; the HTTP API renders its
//! own wire shapes from them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Cheap-to-clone name used as a map key (node names, service names, ids).
pub type Name = Arc<str>;

/// Consul's check status values. Ordered from best to worst, so `max` is the
/// aggregate of several checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Parses the exact lowercase strings Consul uses; anything else is `None`.
    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Drain state of a node or endpoint: it leaves every routable set at once;
/// traffic already on it may run until the deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Wall-clock start of the drain, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Wall-clock deadline, milliseconds since the Unix epoch, if one was given.
    pub deadline_ms: Option<u64>,
}

impl Drain {
    /// The earlier of two drains' deadlines (an endpoint on a draining node
    /// is cut at whichever comes first).
    pub fn earliest_deadline(a: Option<&Drain>, b: Option<&Drain>) -> Option<u64> {
        let a = a.and_then(|d| d.deadline_ms);
        let b = b.and_then(|d| d.deadline_ms);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: Name,
    /// Stable UUID; derived from the name when the registrant gives none.
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub drain: Option<Drain>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Node {
    /// A node with its derived UUID and nothing else set.
    pub fn new(name: impl Into<Name>, address: impl Into<String>) -> Node {
        let name = name.into();
        Node {
            id: node_uuid(&name),
            name,
            address: address.into(),
            tagged_addresses: BTreeMap::new(),
            meta: BTreeMap::new(),
            drain: None,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// True when the registrant-visible fields are equal (indexes and drain aside).
    pub fn same_definition(&self, other: &Node) -> bool {
        self.name == other.name
            && self.id == other.id
            && self.address == other.address
            && self.tagged_addresses == other.tagged_addresses
            && self.meta == other.meta
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

/// One task endpoint: a service instance on a node. Unique by `(node, id)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: Name,
    pub service: Name,
    pub node: Name,
    /// Empty means "use the node's address".
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub enable_tag_override: bool,
    #[serde(default)]
    pub kind: String,
    /// Task incarnation from the scheduler (0 = none). A registration with a
    /// higher incarnation replaces the same endpoint id on another node; an
    /// older one is ignored.
    #[serde(default)]
    pub incarnation: u64,
    /// Drain of this endpoint alone (its node's drain is on the node). Set
    /// only by the drain API; a re-registration keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Endpoint {
    /// An endpoint with Consul's defaults: no address of its own (the node's is
    /// used), no tags or meta, weights 1/1, no incarnation.
    pub fn new(
        node: impl Into<Name>,
        id: impl Into<Name>,
        service: impl Into<Name>,
        port: u16,
    ) -> Endpoint {
        Endpoint {
            id: id.into(),
            service: service.into(),
            node: node.into(),
            address: String::new(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            tagged_addresses: BTreeMap::new(),
            weights: Weights::default(),
            enable_tag_override: false,
            kind: String::new(),
            incarnation: 0,
            drain: None,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// True when the registrant-visible fields are equal (indexes and drain aside).
    pub fn same_definition(&self, other: &Endpoint) -> bool {
        self.id == other.id
            && self.service == other.service
            && self.node == other.node
            && self.address == other.address
            && self.port == other.port
            && self.tags == other.tags
            && self.meta == other.meta
            && self.tagged_addresses == other.tagged_addresses
            && self.weights == other.weights
            && self.enable_tag_override == other.enable_tag_override
            && self.kind == other.kind
            && self.incarnation == other.incarnation
    }
}

/// How a check is defined. Only TTL checks are driven by this crate today; the
/// other kinds are stored and echoed (the active checker fills them in).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDefinition {
    #[serde(default)]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub http: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub tls_server_name: String,
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// HTTP statuses that pass, inclusive (Switchyard's `ExpectedStatus`);
    /// `None` is Consul's rule: 2xx passes, 429 warns, the rest is critical.
    #[serde(default)]
    pub expected_status: Option<(u16, u16)>,
    #[serde(default)]
    pub tcp: String,
    #[serde(default)]
    pub grpc: String,
    #[serde(default)]
    pub grpc_use_tls: bool,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub interval: Option<Duration>,
    #[serde(default)]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub deregister_critical_after: Option<Duration>,
    #[serde(default)]
    pub success_before_passing: u32,
    #[serde(default)]
    pub failures_before_warning: u32,
    #[serde(default)]
    pub failures_before_critical: u32,
}

/// A health check. Unique by `(node, id)`. An empty `service_id` makes it a
/// node-level check that affects every endpoint on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub node: Name,
    pub id: Name,
    pub name: String,
    pub status: Status,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    /// Consul's `Type`.
    #[serde(default)]
    pub kind: CheckKind,
    #[serde(default)]
    pub definition: CheckDefinition,
    /// Wall clock (ms since the epoch) of the last change of `status`.
    #[serde(default)]
    pub status_since_ms: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What a check is (Consul's `Type`): who sets its status and how. Stored and
/// shown as Consul's strings (`ttl`, `http`, ..., `""`); a string this build
/// does not know reads as `Unknown`, so old or foreign records still load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// No type: a catalog registration's check, a node's `serfHealth`.
    #[default]
    None,
    /// Its status comes from TTL updates (`/v1/agent/check/pass/...`).
    Ttl,
    Http,
    Tcp,
    Grpc,
    H2ping,
    Udp,
    Docker,
    OsService,
    Alias,
    Script,
    /// Maintenance mode of a node or service.
    Maintenance,
    /// Written by the proxy for an endpoint it sees keep failing.
    Passive,
    /// A type this build does not know.
    Unknown,
}

impl CheckKind {
    const ALL: [(CheckKind, &'static str); 13] = [
        (CheckKind::None, ""),
        (CheckKind::Ttl, "ttl"),
        (CheckKind::Http, "http"),
        (CheckKind::Tcp, "tcp"),
        (CheckKind::Grpc, "grpc"),
        (CheckKind::H2ping, "h2ping"),
        (CheckKind::Udp, "udp"),
        (CheckKind::Docker, "docker"),
        (CheckKind::OsService, "os_service"),
        (CheckKind::Alias, "alias"),
        (CheckKind::Script, "script"),
        (CheckKind::Maintenance, "maintenance"),
        (CheckKind::Passive, "passive"),
    ];

    pub fn as_str(self) -> &'static str {
        CheckKind::ALL
            .iter()
            .find(|(kind, _)| *kind == self)
            .map_or("unknown", |(_, text)| text)
    }

    pub fn parse(text: &str) -> CheckKind {
        CheckKind::ALL
            .iter()
            .find(|(_, name)| *name == text)
            .map_or(CheckKind::Unknown, |(kind, _)| *kind)
    }

    /// The kinds this agent probes itself (given an interval).
    pub fn is_probed_here(self) -> bool {
        matches!(self, CheckKind::Http | CheckKind::Tcp | CheckKind::Grpc)
    }

    /// The kinds Consul's agent runs on an interval (which a registration
    /// must then give).
    pub fn needs_interval(self) -> bool {
        matches!(
            self,
            CheckKind::Http
                | CheckKind::Tcp
                | CheckKind::Grpc
                | CheckKind::H2ping
                | CheckKind::Udp
                | CheckKind::Script
                | CheckKind::Docker
                | CheckKind::OsService
        )
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CheckKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CheckKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(CheckKind::parse(&text))
    }
}

/// Check id of a node's liveness (Consul's gossip check). Registered for real
/// when a node is given a TTL lease; otherwise shown as a passing synthetic check.
pub const NODE_HEALTH_CHECK: &str = "serfHealth";
/// Check id Consul uses for node maintenance.
pub const NODE_MAINTENANCE_CHECK: &str = "_node_maintenance";
/// Prefix of the check id Consul uses for service maintenance.
pub const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

impl Check {
    pub fn same_definition(&self, other: &Check) -> bool {
        self.node == other.node
            && self.id == other.id
            && self.name == other.name
            && self.status == other.status
            && self.notes == other.notes
            && self.output == other.output
            && self.service_id == other.service_id
            && self.service_name == other.service_name
            && self.kind == other.kind
            && self.definition == other.definition
    }

    pub fn is_node_level(&self) -> bool {
        self.service_id.is_empty()
    }

    pub fn is_maintenance(&self) -> bool {
        &*self.id == NODE_MAINTENANCE_CHECK || self.id.starts_with(SERVICE_MAINTENANCE_PREFIX)
    }

    pub fn ttl(&self) -> Option<Duration> {
        if self.kind == CheckKind::Ttl {
            self.definition.ttl
        } else {
            None
        }
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary (check
/// output, notes, quotes of a client's input).
pub fn clip(text: &mut String, max: usize) {
    text.truncate(clip_point(text, max));
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary, as a byte length.
pub fn clip_point(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Derives a stable node UUID from its name, so that every agent computes the
/// same id for the same node without coordinating.
pub fn node_uuid(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// Microseconds since the Unix epoch (wall clock: comparable across agents
/// only as far as their clocks agree).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (wall clock, for records shown to humans).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::CheckKind;

    #[test]
    fn check_kinds_keep_consuls_strings_and_unknown_ones_still_load() {
        for text in [
            "",
            "ttl",
            "http",
            "tcp",
            "grpc",
            "os_service",
            "passive",
            "maintenance",
        ] {
            let kind = CheckKind::parse(text);
            assert_ne!(kind, CheckKind::Unknown, "{text:?}");
            assert_eq!(kind.as_str(), text);
            let json = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(
                serde_json::from_str::<CheckKind>(&json).expect("read"),
                kind
            );
        }
        let odd: CheckKind =
            serde_json::from_str("\"carrier-pigeon\"").expect("an unknown kind loads");
        assert_eq!(odd, CheckKind::Unknown);
        assert!(CheckKind::Http.is_probed_here() && !CheckKind::Ttl.is_probed_here());
        assert!(CheckKind::Script.needs_interval() && !CheckKind::Ttl.needs_interval());
    }
}
