//! Request bodies as real clients send them, turned into registry records.
//!
//! Consul matches keys case-insensitively and accepts snake_case aliases, so we
//! fold every structural key to lowercase without `_` or `-` before serde sees
//! it, except inside free-form maps (`Meta`, `NodeMeta`, `Header`) whose keys
//! are data. Durations arrive as Go strings (`"10s"`) or as nanosecond numbers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use switchyard_catalog::model::CheckKind;
use switchyard_catalog::model::{
    node_uuid, Check, CheckDefinition, Endpoint, Name, Node, Status, TaggedAddress, Weights,
};
use switchyard_registry::NewCheck;

/// Folds a key: `DeregisterCriticalServiceAfter`, `deregister_critical_service_after`
/// and `deregistercriticalserviceafter` all become the last.
fn fold_key(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Keys whose object value is user data: its keys are kept as sent.
const FREE_FORM: &[&str] = &["meta", "nodemeta", "servicemeta", "header"];

fn normalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, value) in map {
                let folded = fold_key(&key);
                let value = if FREE_FORM.contains(&folded.as_str()) {
                    value
                } else if folded == "taggedaddresses" {
                    normalize_values(value)
                } else {
                    normalize(value)
                };
                out.insert(folded, value);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// Keeps an object's own keys but normalizes the objects inside it.
fn normalize_values(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
        }
        other => other,
    }
}

/// Parses a JSON body with Consul's loose key rules into `T`.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    decode_at(body).map_err(|e| e.to_string())
}

/// A body that did not decode, and the field at fault when one is.
#[derive(Debug)]
pub(crate) struct DecodeError {
    /// The field's path (`check.interval`, `checks[1].ttl`), keys folded to
    /// lower case as the decoder sees them.
    pub(crate) path: Option<String>,
    pub(crate) message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "Request decode failed: {path}: {}", self.message),
            None => write!(f, "Request decode failed: {}", self.message),
        }
    }
}

/// `decode_body` with the field at fault kept apart from the message.
pub(crate) fn decode_at<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let plain = |message: String| DecodeError {
        path: None,
        message,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(plain("empty body".to_string()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| plain(e.to_string()))?;
    // The path names the field at fault ("deadline: invalid duration ..."),
    // folded to lower case as the keys are.
    serde_path_to_error::deserialize(normalize(value)).map_err(|e| {
        let path = e.path().to_string();
        DecodeError {
            path: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// A duration given as a Go string or as nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GoDuration(pub(crate) Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or a number of nanoseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
                switchyard_catalog::duration::parse_go_duration(v)
                    .map(GoDuration)
                    .map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
                Ok(GoDuration(Duration::from_nanos(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
                u64::try_from(v)
                    .map(|n| GoDuration(Duration::from_nanos(n)))
                    .map_err(|_| E::custom("negative duration"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<GoDuration, E> {
                if v.is_finite() && v >= 0.0 {
                    Ok(GoDuration(Duration::from_nanos(v as u64)))
                } else {
                    Err(E::custom("invalid duration"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn dur(d: Option<GoDuration>) -> Option<Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WeightsIn {
    passing: Option<u32>,
    warning: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TaggedIn {
    address: Option<String>,
    port: Option<u16>,
}

/// A service definition (agent register; also `Service` in catalog register,
/// where the name key is `Service`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ServiceIn {
    pub(crate) id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) service: Option<String>,
    pub(crate) tags: Option<Vec<String>>,
    pub(crate) address: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "taggedaddresses")]
    pub(crate) tagged_addresses: Option<BTreeMap<String, TaggedIn>>,
    pub(crate) weights: Option<WeightsIn>,
    #[serde(rename = "enabletagoverride")]
    pub(crate) enable_tag_override: Option<bool>,
    pub(crate) kind: Option<String>,
    pub(crate) check: Option<CheckIn>,
    pub(crate) checks: Option<Vec<CheckIn>>,
}

/// Catalog checks nest their probe settings in `Definition`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DefinitionIn {
    http: Option<String>,
    tcp: Option<String>,
    grpc: Option<String>,
    interval: Option<GoDuration>,
    timeout: Option<GoDuration>,
    #[serde(rename = "deregistercriticalserviceafter")]
    deregister_critical_after: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CheckIn {
    pub(crate) id: Option<String>,
    #[serde(rename = "checkid")]
    pub(crate) check_id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) node: Option<String>,
    pub(crate) notes: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) output: Option<String>,
    #[serde(rename = "serviceid")]
    pub(crate) service_id: Option<String>,
    ttl: Option<GoDuration>,
    http: Option<String>,
    method: Option<String>,
    header: Option<BTreeMap<String, Vec<String>>>,
    body: Option<String>,
    #[serde(rename = "tlsservername")]
    tls_server_name: Option<String>,
    #[serde(rename = "tlsskipverify")]
    tls_skip_verify: Option<bool>,
    /// Switchyard's extension: `"200-399"`, `"204"` or `204`.
    #[serde(rename = "expectedstatus")]
    expected_status: Option<serde_json::Value>,
    tcp: Option<String>,
    udp: Option<String>,
    grpc: Option<String>,
    #[serde(rename = "grpcusetls")]
    grpc_use_tls: Option<bool>,
    h2ping: Option<String>,
    args: Option<Vec<String>>,
    #[serde(rename = "scriptargs")]
    script_args: Option<Vec<String>>,
    #[serde(rename = "dockercontainerid")]
    docker_container_id: Option<String>,
    #[serde(rename = "osservice")]
    os_service: Option<String>,
    #[serde(rename = "aliasnode")]
    alias_node: Option<String>,
    #[serde(rename = "aliasservice")]
    alias_service: Option<String>,
    interval: Option<GoDuration>,
    timeout: Option<GoDuration>,
    #[serde(rename = "deregistercriticalserviceafter")]
    deregister_critical_after: Option<GoDuration>,
    #[serde(rename = "successbeforepassing")]
    success_before_passing: Option<u32>,
    #[serde(rename = "failuresbeforewarning")]
    failures_before_warning: Option<u32>,
    #[serde(rename = "failuresbeforecritical")]
    failures_before_critical: Option<u32>,
    pub(crate) definition: Option<DefinitionIn>,
}

/// Where a check is being registered, for defaults and validation.
pub(crate) struct CheckContext<'a> {
    pub(crate) node: &'a Name,
    /// The service the check belongs to, if any: `(id, name)`.
    pub(crate) service: Option<(&'a str, &'a str)>,
    /// Default id when the request names none.
    pub(crate) default_id: String,
    /// Catalog checks are reported by their owner, never run: no probe needed.
    pub(crate) catalog: bool,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl CheckIn {
    pub(crate) fn into_check(self, ctx: CheckContext<'_>) -> Result<NewCheck, String> {
        let status_given = self.status.as_deref().is_some_and(|s| !s.is_empty());
        let status = match self.status.as_deref() {
            None | Some("") => Status::Critical,
            Some(s) => Status::parse(s).ok_or_else(|| "Bad check status".to_string())?,
        };
        let def = self.definition.unwrap_or_default();
        let http = non_empty(self.http)
            .or(non_empty(def.http))
            .unwrap_or_default();
        let tcp = non_empty(self.tcp)
            .or(non_empty(def.tcp))
            .unwrap_or_default();
        let grpc = non_empty(self.grpc)
            .or(non_empty(def.grpc))
            .unwrap_or_default();
        let args = self.args.or(self.script_args).unwrap_or_default();
        let ttl = dur(self.ttl);
        let interval = dur(self.interval).or(dur(def.interval));
        let kind = if ttl.is_some() {
            CheckKind::Ttl
        } else if !http.is_empty() {
            CheckKind::Http
        } else if !tcp.is_empty() {
            CheckKind::Tcp
        } else if !grpc.is_empty() {
            CheckKind::Grpc
        } else if non_empty(self.h2ping).is_some() {
            CheckKind::H2ping
        } else if non_empty(self.udp).is_some() {
            CheckKind::Udp
        } else if non_empty(self.docker_container_id).is_some() {
            CheckKind::Docker
        } else if non_empty(self.os_service).is_some() {
            CheckKind::OsService
        } else if non_empty(self.alias_node).is_some() || non_empty(self.alias_service).is_some() {
            CheckKind::Alias
        } else if !args.is_empty() {
            CheckKind::Script
        } else {
            CheckKind::None
        };
        if kind.needs_interval() && !ctx.catalog && interval.is_none() {
            return Err(format!("Invalid check: {kind} checks need an interval > 0"));
        }
        if kind == CheckKind::None && !ctx.catalog {
            return Err(
                "Invalid check: one of TTL, HTTP, TCP, GRPC, UDP, H2PING, Args, DockerContainerID, OSService or AliasService is required"
                    .to_string(),
            );
        }
        let id = non_empty(self.check_id)
            .or(non_empty(self.id))
            .unwrap_or(ctx.default_id);
        validate_name("check id", &id)?;
        let name = non_empty(self.name).unwrap_or_else(|| match ctx.service {
            Some((_, service)) => format!("Service '{service}' check"),
            None => id.clone(),
        });
        let (service_id, service_name) = match ctx.service {
            Some((id, name)) => (id.to_string(), name.to_string()),
            None => (
                non_empty(self.service_id).unwrap_or_default(),
                String::new(),
            ),
        };
        let output = self.output.unwrap_or_default();
        let run_here = kind.is_probed_here();
        let output = if kind == CheckKind::None
            || kind == CheckKind::Ttl
            || run_here
            || ctx.catalog
            || !output.is_empty()
        {
            output
        } else {
            format!("{kind} checks are not run by this agent yet; status is as registered")
        };
        let expected_status = match self.expected_status {
            None => None,
            Some(value) => Some(parse_status_range(&value)?),
        };
        let check = Check {
            node: ctx.node.clone(),
            id: id.into(),
            name,
            status,
            notes: self.notes.unwrap_or_default(),
            output,
            service_id,
            service_name,
            kind,
            definition: CheckDefinition {
                ttl,
                http,
                method: self.method.unwrap_or_default(),
                header: self.header.unwrap_or_default(),
                body: self.body.unwrap_or_default(),
                tls_server_name: self.tls_server_name.unwrap_or_default(),
                tls_skip_verify: self.tls_skip_verify.unwrap_or(false),
                expected_status,
                tcp,
                grpc,
                grpc_use_tls: self.grpc_use_tls.unwrap_or(false),
                args,
                interval,
                timeout: dur(self.timeout).or(dur(def.timeout)),
                deregister_critical_after: dur(self.deregister_critical_after)
                    .or(dur(def.deregister_critical_after)),
                success_before_passing: self.success_before_passing.unwrap_or(0),
                failures_before_warning: self.failures_before_warning.unwrap_or(0),
                failures_before_critical: self.failures_before_critical.unwrap_or(0),
            },
            status_since_ms: 0,
            create_index: 0,
            modify_index: 0,
        };
        Ok(NewCheck {
            check,
            status_given,
        })
    }
}

/// Names (services, ids, nodes): non-empty, bounded, no control characters.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("Missing {what}"));
    }
    if name.len() > 512 {
        return Err(format!("Invalid {what}: longer than 512 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("Invalid {what}: contains control characters"));
    }
    Ok(())
}

/// An address is an IP (not unspecified) or a plausible host name.
pub(crate) fn valid_address(address: &str) -> bool {
    let bare = address.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return !ip.is_unspecified();
    }
    !address.is_empty()
        && address.len() <= 253
        && address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        && !address.starts_with('-')
}

impl ServiceIn {
    /// Builds the endpoint and its checks for node `node`. `name_from_service`
    /// selects catalog register's `Service` key for the name.
    pub(crate) fn into_endpoint(
        mut self,
        node: &Name,
        catalog: bool,
    ) -> Result<(Endpoint, Vec<NewCheck>), String> {
        let name = if catalog {
            non_empty(self.service.take()).or(non_empty(self.name.take()))
        } else {
            non_empty(self.name.take()).or(non_empty(self.service.take()))
        };
        let name = name.ok_or_else(|| "Missing service name".to_string())?;
        validate_name("service name", &name)?;
        let id = non_empty(self.id.take()).unwrap_or_else(|| name.clone());
        validate_name("service ID", &id)?;
        let address = self.address.take().unwrap_or_default();
        if !address.is_empty() && !valid_address(&address) {
            return Err("Invalid service address".to_string());
        }
        let mut tagged_addresses = BTreeMap::new();
        for (key, tagged) in self.tagged_addresses.take().unwrap_or_default() {
            let address = tagged.address.unwrap_or_default();
            if !address.is_empty() && !valid_address(&address) {
                return Err(format!("Invalid tagged address {key:?}"));
            }
            tagged_addresses.insert(
                key,
                TaggedAddress {
                    address,
                    port: tagged.port.unwrap_or(0),
                },
            );
        }
        let weights = match self.weights.take() {
            None => Weights::default(),
            Some(w) => Weights {
                passing: w.passing.unwrap_or(1),
                warning: w.warning.unwrap_or(1),
            },
        };
        if weights.passing == 0 {
            return Err("Passing must be greater than 0".to_string());
        }
        let mut check_defs: Vec<CheckIn> = self.check.take().into_iter().collect();
        check_defs.extend(self.checks.take().unwrap_or_default());
        let total = check_defs.len();
        let mut checks = Vec::with_capacity(total);
        for (i, def) in check_defs.into_iter().enumerate() {
            let default_id = if total == 1 {
                format!("service:{id}")
            } else {
                format!("service:{id}:{}", i + 1)
            };
            let ctx = CheckContext {
                node,
                service: Some((&id, &name)),
                default_id,
                catalog,
            };
            checks.push(def.into_check(ctx)?);
        }
        let endpoint = Endpoint {
            id: id.into(),
            service: name.into(),
            node: node.clone(),
            address,
            port: self.port.unwrap_or(0),
            tags: self.tags.take().unwrap_or_default(),
            meta: self.meta.take().unwrap_or_default(),
            tagged_addresses,
            weights,
            enable_tag_override: self.enable_tag_override.unwrap_or(false),
            kind: self.kind.take().unwrap_or_default(),
            incarnation: 0,
            drain: None,
            create_index: 0,
            modify_index: 0,
        };
        Ok((endpoint, checks))
    }
}

/// `/v1/catalog/register`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CatalogRegisterIn {
    pub(crate) id: Option<String>,
    pub(crate) node: Option<String>,
    pub(crate) address: Option<String>,
    pub(crate) datacenter: Option<String>,
    #[serde(rename = "taggedaddresses")]
    pub(crate) tagged_addresses: Option<BTreeMap<String, String>>,
    #[serde(rename = "nodemeta")]
    pub(crate) node_meta: Option<BTreeMap<String, String>>,
    pub(crate) service: Option<ServiceIn>,
    pub(crate) check: Option<CheckIn>,
    pub(crate) checks: Option<Vec<CheckIn>>,
    #[serde(rename = "skipnodeupdate")]
    pub(crate) skip_node_update: Option<bool>,
}

/// `/v1/catalog/deregister`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CatalogDeregisterIn {
    pub(crate) node: Option<String>,
    #[serde(rename = "serviceid")]
    pub(crate) service_id: Option<String>,
    #[serde(rename = "checkid")]
    pub(crate) check_id: Option<String>,
    pub(crate) datacenter: Option<String>,
}

/// `/v1/agent/check/update/:id`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CheckUpdateIn {
    pub(crate) status: Option<String>,
    pub(crate) output: Option<String>,
}

/// Builds a node record from what a registrant sent.
pub(crate) fn node_from(
    name: &str,
    address: &str,
    id: Option<String>,
    tagged_addresses: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
) -> Result<Node, String> {
    validate_name("node name", name)?;
    if address.is_empty() {
        return Err("Must provide address".to_string());
    }
    if !valid_address(address) {
        return Err(format!("Invalid node address {address:?}"));
    }
    let id = match non_empty(id) {
        Some(id) => {
            if uuid::Uuid::parse_str(&id).is_err() {
                return Err(format!("Invalid node ID {id:?}: not a UUID"));
            }
            id
        }
        None => node_uuid(name),
    };
    Ok(Node {
        name: name.into(),
        id,
        address: address.to_string(),
        tagged_addresses,
        meta,
        drain: None,
        create_index: 0,
        modify_index: 0,
    })
}

/// The native batch body (`PUT /v1/switchyard/batch`). Keys are folded like
/// Consul's, but unknown keys are refused: this API is ours.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BatchIn {
    pub(crate) nodes: Vec<BatchNodeIn>,
    pub(crate) endpoints: Vec<BatchEndpointIn>,
    pub(crate) deregister: Vec<BatchKeyIn>,
    #[serde(rename = "deregisternodes")]
    pub(crate) deregister_nodes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchNodeIn {
    pub(crate) name: String,
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) meta: BTreeMap<String, String>,
    #[serde(default, rename = "taggedaddresses")]
    pub(crate) tagged_addresses: BTreeMap<String, String>,
    /// A lease: the node stays healthy while `serfHealth` is renewed within this.
    #[serde(default)]
    pub(crate) ttl: Option<GoDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchEndpointIn {
    pub(crate) node: String,
    pub(crate) service: String,
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) address: Option<String>,
    #[serde(default)]
    pub(crate) port: u16,
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) meta: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) weights: Option<WeightsIn>,
    #[serde(default)]
    pub(crate) checks: Vec<CheckIn>,
    /// Task incarnation (see `Endpoint::incarnation`).
    #[serde(default)]
    pub(crate) incarnation: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchKeyIn {
    pub(crate) node: String,
    pub(crate) id: String,
}

impl BatchEndpointIn {
    pub(crate) fn into_parts(self) -> Result<(Endpoint, Vec<NewCheck>), String> {
        validate_name("node name", &self.node)?;
        let node: Name = self.node.into();
        let incarnation = self.incarnation;
        let service = ServiceIn {
            id: self.id,
            name: Some(self.service),
            address: self.address,
            port: Some(self.port),
            tags: Some(self.tags),
            meta: Some(self.meta),
            weights: self.weights,
            checks: Some(self.checks),
            ..ServiceIn::default()
        };
        let (mut endpoint, checks) = service.into_endpoint(&node, false)?;
        endpoint.incarnation = incarnation;
        Ok((endpoint, checks))
    }
}

/// `ExpectedStatus`: `"200-399"`, `"204"` or `204`; within 100..=599.
fn parse_status_range(value: &serde_json::Value) -> Result<(u16, u16), String> {
    let bad = || {
        format!("Invalid check: ExpectedStatus must be a status or a range like \"200-399\", not {value}")
    };
    let parse = |text: &str| {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
    };
    let range = match value {
        serde_json::Value::Number(n) => {
            let status = n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|s| (100..=599).contains(s));
            status.map(|s| (s, s))
        }
        serde_json::Value::String(text) => match text.split_once('-') {
            Some((low, high)) => parse(low).zip(parse(high)),
            None => parse(text).map(|s| (s, s)),
        },
        _ => None,
    };
    range.filter(|(low, high)| low <= high).ok_or_else(bad)
}

#[cfg(test)]
mod tests;
