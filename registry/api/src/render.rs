//! Consul's JSON shapes, borrowed from snapshot records (no copies).

use std::collections::BTreeMap;

use serde::Serialize;

use switchyard_catalog::duration::format_go_duration;
use switchyard_catalog::model::{Check, Endpoint, Node, TaggedAddress, Weights};

static EMPTY_TAGS: Vec<String> = Vec::new();

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NodeOut<'a> {
    #[serde(rename = "ID")]
    pub(crate) id: &'a str,
    pub(crate) node: &'a str,
    pub(crate) address: &'a str,
    pub(crate) datacenter: &'a str,
    pub(crate) tagged_addresses: &'a BTreeMap<String, String>,
    pub(crate) meta: &'a BTreeMap<String, String>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

impl<'a> NodeOut<'a> {
    pub(crate) fn new(node: &'a Node, dc: &'a str) -> NodeOut<'a> {
        NodeOut {
            id: &node.id,
            node: &node.name,
            address: &node.address,
            datacenter: dc,
            tagged_addresses: &node.tagged_addresses,
            meta: &node.meta,
            create_index: node.create_index,
            modify_index: node.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct WeightsOut {
    passing: u32,
    warning: u32,
}

impl From<Weights> for WeightsOut {
    fn from(w: Weights) -> WeightsOut {
        WeightsOut {
            passing: w.passing,
            warning: w.warning,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TaggedOut<'a> {
    address: &'a str,
    port: u16,
}

fn tagged(map: &BTreeMap<String, TaggedAddress>) -> BTreeMap<&str, TaggedOut<'_>> {
    map.iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                TaggedOut {
                    address: &v.address,
                    port: v.port,
                },
            )
        })
        .collect()
}

/// A service instance as the agent and health endpoints show it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    address: &'a str,
    tagged_addresses: BTreeMap<&'a str, TaggedOut<'a>>,
    meta: &'a BTreeMap<String, String>,
    port: u16,
    weights: WeightsOut,
    enable_tag_override: bool,
    kind: &'a str,
    datacenter: &'a str,
    create_index: u64,
    modify_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_hash: Option<String>,
}

impl<'a> ServiceOut<'a> {
    pub(crate) fn new(e: &'a Endpoint, dc: &'a str) -> ServiceOut<'a> {
        ServiceOut {
            id: &e.id,
            service: &e.service,
            tags: &e.tags,
            address: &e.address,
            tagged_addresses: tagged(&e.tagged_addresses),
            meta: &e.meta,
            port: e.port,
            weights: e.weights.into(),
            enable_tag_override: e.enable_tag_override,
            kind: &e.kind,
            datacenter: dc,
            create_index: e.create_index,
            modify_index: e.modify_index,
            content_hash: None,
        }
    }

    pub(crate) fn with_hash(mut self, hash: String) -> Self {
        self.content_hash = Some(hash);
        self
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DefinitionOut<'a> {
    #[serde(rename = "HTTP", skip_serializing_if = "str::is_empty")]
    http: &'a str,
    #[serde(rename = "TCP", skip_serializing_if = "str::is_empty")]
    tcp: &'a str,
    #[serde(rename = "GRPC", skip_serializing_if = "str::is_empty")]
    grpc: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    method: &'a str,
    #[serde(rename = "TLSSkipVerify")]
    tls_skip_verify: bool,
    interval: String,
    timeout: String,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    deregister_critical_service_after: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CheckOut<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'static str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    #[serde(rename = "Type")]
    kind: &'a str,
    interval: String,
    timeout: String,
    exposed_port: u16,
    definition: DefinitionOut<'a>,
    create_index: u64,
    modify_index: u64,
}

fn go(d: Option<std::time::Duration>) -> String {
    d.map(format_go_duration).unwrap_or_default()
}

impl<'a> CheckOut<'a> {
    /// `tags` are the tags of the check's service (empty for node checks).
    pub(crate) fn new(c: &'a Check, tags: &'a [String]) -> CheckOut<'a> {
        let d = &c.definition;
        CheckOut {
            node: &c.node,
            check_id: &c.id,
            name: &c.name,
            status: c.status.as_str(),
            notes: &c.notes,
            output: &c.output,
            service_id: &c.service_id,
            service_name: &c.service_name,
            service_tags: tags,
            kind: c.kind.as_str(),
            interval: go(d.interval),
            timeout: go(d.timeout),
            exposed_port: 0,
            definition: DefinitionOut {
                http: &d.http,
                tcp: &d.tcp,
                grpc: &d.grpc,
                method: &d.method,
                tls_skip_verify: d.tls_skip_verify,
                interval: go(d.interval),
                timeout: go(d.timeout),
                ttl: d.ttl.map(format_go_duration),
                deregister_critical_service_after: go(d.deregister_critical_after),
            },
            create_index: c.create_index,
            modify_index: c.modify_index,
        }
    }

    /// The node-level liveness check Consul agents carry (`serfHealth`).
    /// Switchyard has no gossip; the node is alive while it is registered.
    pub(crate) fn serf_health(node: &'a Node) -> CheckOut<'a> {
        CheckOut {
            node: &node.name,
            check_id: "serfHealth",
            name: "Serf Health Status",
            status: "passing",
            notes: "",
            output: "Agent alive and reachable",
            service_id: "",
            service_name: "",
            service_tags: &EMPTY_TAGS,
            kind: "",
            interval: String::new(),
            timeout: String::new(),
            exposed_port: 0,
            definition: DefinitionOut {
                http: "",
                tcp: "",
                grpc: "",
                method: "",
                tls_skip_verify: false,
                interval: String::new(),
                timeout: String::new(),
                ttl: None,
                deregister_critical_service_after: String::new(),
            },
            create_index: node.create_index,
            modify_index: node.create_index,
        }
    }
}

/// One row of `/v1/catalog/service/:name`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CatalogServiceOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: &'a BTreeMap<String, String>,
    node_meta: &'a BTreeMap<String, String>,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_kind: &'a str,
    service_address: &'a str,
    service_port: u16,
    service_tags: &'a [String],
    service_meta: &'a BTreeMap<String, String>,
    service_tagged_addresses: BTreeMap<&'a str, TaggedOut<'a>>,
    service_weights: WeightsOut,
    service_enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CatalogServiceOut<'a> {
    pub(crate) fn new(n: &'a Node, e: &'a Endpoint, dc: &'a str) -> CatalogServiceOut<'a> {
        CatalogServiceOut {
            id: &n.id,
            node: &n.name,
            address: &n.address,
            datacenter: dc,
            tagged_addresses: &n.tagged_addresses,
            node_meta: &n.meta,
            service_id: &e.id,
            service_name: &e.service,
            service_kind: &e.kind,
            service_address: &e.address,
            service_port: e.port,
            service_tags: &e.tags,
            service_meta: &e.meta,
            service_tagged_addresses: tagged(&e.tagged_addresses),
            service_weights: e.weights.into(),
            service_enable_tag_override: e.enable_tag_override,
            create_index: e.create_index,
            modify_index: e.modify_index,
        }
    }
}

/// One entry of `/v1/health/service/:name`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceEntryOut<'a> {
    pub(crate) node: NodeOut<'a>,
    pub(crate) service: ServiceOut<'a>,
    pub(crate) checks: Vec<CheckOut<'a>>,
}
