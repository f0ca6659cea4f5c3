//! Answers built once per service view, at publish time, by the registry's
//! writer (through `ViewDecorator`). A query then only picks, shuffles and
//! copies these bytes.
//!
//! Every record's owner is a compression pointer to the question name (offset
//! 12), so the bytes fit any question. An SRV record's target is written out in
//! full; the target's address record (for the additional section) is kept
//! without its owner, which the query path points at the SRV target.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use switchyard_catalog::{
    Chunk, ExtraKey, Instance, ServiceView, Status, ViewChange, ViewDecorator, ViewHead,
};

use crate::config::Config;
use crate::wire::{finish_rdata, push_name, push_pointer, push_rr_head, rtype};

/// Owner pointer to the question name.
const QUESTION: u16 = 12;

/// Address family of an instance, for A/AAAA selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
    /// A host name: no address records; the SRV target is the name itself.
    Name,
}

/// Where an instance's records sit in the arena: 16 bytes per instance.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) family: Family,
    /// The SRV record (owner pointer included); `srv_len == 0` when the target
    /// cannot be written as a name. Its target starts at `SRV_TARGET`.
    srv: u32,
    srv_len: u16,
    /// The instance's address record in `DnsService::addrs` (`NO_ADDR` for
    /// a host name). Instances on one address share one record, so an answer
    /// can send each record once (RFC 2181 §5.5).
    pub(crate) addr: u32,
    /// The SRV target's additional record: one id per distinct (target name,
    /// address), `NO_ADDR` without an address. Instances on one address
    /// usually share a target, but one that names no address of its own
    /// has its node's name as target.
    pub(crate) target: u32,
}

/// `Entry::addr` of an instance that has no address record.
const NO_ADDR: u32 = u32::MAX;

/// Offset of the target name inside an SRV record: owner pointer (2), TYPE,
/// CLASS, TTL, RDLENGTH (10), priority, weight, port (6).
pub(crate) const SRV_TARGET: usize = 18;

impl Entry {
    pub(crate) fn has_srv(&self) -> bool {
        self.srv_len > 0
    }
}

/// One chunk's ready answers; `entries` is indexed like the chunk's instances.
#[derive(Debug)]
pub struct DnsService {
    arena: Box<[u8]>,
    pub(crate) entries: Box<[Entry]>,
    /// Each distinct address record (TYPE..RDATA, no owner): arena offset
    /// and length.
    addrs: Box<[(u32, u16)]>,
    /// Distinct SRV targets with an address (the range of `Entry::target`).
    target_count: u32,
    /// Whether two instances share an address record or an SRV target:
    /// only then does an answer need to skip repeats.
    pub(crate) shared_addrs: bool,
}

impl DnsService {
    pub(crate) fn srv(&self, e: &Entry) -> &[u8] {
        &self.arena[e.srv as usize..e.srv as usize + e.srv_len as usize]
    }

    /// The instance's address record without its owner name (TYPE..RDATA):
    /// the answer to A/AAAA after a pointer to the question, and the SRV
    /// target's additional record after a pointer to the target. Empty for a
    /// host name.
    pub(crate) fn addr(&self, e: &Entry) -> &[u8] {
        match self.addrs.get(e.addr as usize) {
            Some(&(at, len)) => &self.arena[at as usize..at as usize + len as usize],
            None => &[],
        }
    }

    /// How many ids `Entry::addr` and `Entry::target` range over.
    pub(crate) fn id_count(&self) -> usize {
        self.addrs.len().max(self.target_count as usize)
    }
}

/// Builds `DnsService` for every view the writer publishes.
pub struct DnsDecorator {
    config: Arc<Config>,
    datacenter: String,
    /// Every view's (empty) output, shared: a write allocates nothing for it.
    view: Arc<()>,
}

impl DnsDecorator {
    pub fn new(config: Arc<Config>, datacenter: &str) -> DnsDecorator {
        DnsDecorator {
            config,
            datacenter: datacenter.to_ascii_lowercase(),
            view: Arc::new(()),
        }
    }

    fn build(&self, name: &str, instances: &[Instance]) -> DnsService {
        let ttl = self.config.ttl_for(name);
        let domain = self.config.domain.trim_end_matches('.');
        let mut arena = Vec::with_capacity(instances.len() * 80);
        let mut entries = Vec::with_capacity(instances.len());
        let mut addrs: Vec<(u32, u16)> = Vec::with_capacity(instances.len());
        let mut by_ip: HashMap<IpAddr, u32> = HashMap::with_capacity(instances.len());
        // A target is its address's name, or (for an endpoint without an
        // address of its own) its node's: keyed without building the name.
        let mut by_target: HashMap<(u32, Option<&str>), u32> =
            HashMap::with_capacity(instances.len());
        let mut target = String::new();
        for instance in instances {
            let address = instance.address();
            let ip = address.parse::<IpAddr>().ok();
            let family = match ip {
                Some(IpAddr::V4(_)) => Family::V4,
                Some(IpAddr::V6(_)) => Family::V6,
                None => Family::Name,
            };
            let pos = |arena: &Vec<u8>| arena.len() as u32;
            let weight = match instance.health {
                Status::Passing => instance.endpoint.weights.passing,
                _ => instance.endpoint.weights.warning,
            }
            .min(u32::from(u16::MAX)) as u16;
            let node_target = ip.is_some() && instance.endpoint.address.is_empty();
            target.clear();
            match ip {
                None => target.push_str(address),
                Some(_) if node_target => {
                    let _ = write!(
                        target,
                        "{}.node.{}.{domain}",
                        instance.node.name, self.datacenter
                    );
                }
                Some(ip) => {
                    push_hex_ip(&mut target, ip);
                    let _ = write!(target, ".addr.{}.{domain}", self.datacenter);
                }
            }
            let srv = pos(&arena);
            push_pointer(&mut arena, QUESTION);
            let rdlen_at = push_rr_head(&mut arena, rtype::SRV, ttl);
            arena.extend_from_slice(&1u16.to_be_bytes());
            arena.extend_from_slice(&weight.to_be_bytes());
            arena.extend_from_slice(&instance.endpoint.port.to_be_bytes());
            debug_assert_eq!(arena.len() - srv as usize, SRV_TARGET);
            let srv_len = if push_name(&mut arena, &target) {
                finish_rdata(&mut arena, rdlen_at);
                (pos(&arena) - srv) as u16
            } else {
                arena.truncate(srv as usize);
                0
            };
            let addr = match ip {
                Some(ip) => *by_ip.entry(ip).or_insert_with(|| {
                    let at = pos(&arena);
                    push_addr_rr(&mut arena, None, ip, ttl);
                    addrs.push((at, (pos(&arena) - at) as u16));
                    (addrs.len() - 1) as u32
                }),
                None => NO_ADDR,
            };
            let target = match ip {
                Some(_) => {
                    let next = by_target.len() as u32;
                    let node = node_target.then_some(&*instance.node.name);
                    *by_target.entry((addr, node)).or_insert(next)
                }
                None => NO_ADDR,
            };
            entries.push(Entry {
                family,
                srv,
                srv_len,
                addr,
                target,
            });
        }
        let with_ip = entries.iter().filter(|e| e.addr != NO_ADDR).count();
        let shared_addrs = addrs.len() < with_ip || by_target.len() < with_ip;
        DnsService {
            arena: arena.into_boxed_slice(),
            entries: entries.into_boxed_slice(),
            addrs: addrs.into_boxed_slice(),
            target_count: by_target.len() as u32,
            shared_addrs,
        }
    }
}

/// Answers are per chunk: a view needs nothing of its own.
impl ViewDecorator for DnsDecorator {
    type Chunk = DnsService;
    type Output = ();

    fn decorate_chunk(
        &self,
        view: &ViewHead<'_>,
        chunk: &Chunk,
        _key: ExtraKey<DnsDecorator>,
    ) -> Arc<DnsService> {
        Arc::new(self.build(view.name, chunk.instances()))
    }

    fn decorate(
        &self,
        _view: &ServiceView,
        _change: &ViewChange<'_>,
        _key: ExtraKey<DnsDecorator>,
    ) -> Arc<()> {
        self.view.clone()
    }
}

/// An A or AAAA record; `owner` is a pointer, or none (the caller writes it).
pub(crate) fn push_addr_rr(out: &mut Vec<u8>, owner: Option<u16>, ip: IpAddr, ttl: u32) {
    if let Some(owner) = owner {
        push_pointer(out, owner);
    }
    match ip {
        IpAddr::V4(v4) => {
            let at = push_rr_head(out, rtype::A, ttl);
            out.extend_from_slice(&v4.octets());
            finish_rdata(out, at);
        }
        IpAddr::V6(v6) => {
            let at = push_rr_head(out, rtype::AAAA, ttl);
            out.extend_from_slice(&v6.octets());
            finish_rdata(out, at);
        }
    }
}

/// Consul's `<hex>.addr` label: 8 hex digits for IPv4, 32 for IPv6.
/// Appends `ip`'s bytes in lowercase hex (Consul's `<hex>.addr.` names).
fn push_hex_ip(out: &mut String, ip: IpAddr) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut push = |bytes: &[u8]| {
        for b in bytes {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    };
    match ip {
        IpAddr::V4(v4) => push(&v4.octets()),
        IpAddr::V6(v6) => push(&v6.octets()),
    }
}

/// The inverse of `push_hex_ip`.
pub(crate) fn parse_hex_ip(label: &[u8]) -> Option<IpAddr> {
    let hex = std::str::from_utf8(label).ok()?;
    let byte = |i: usize| u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok();
    match hex.len() {
        8 => Some(IpAddr::from([byte(0)?, byte(1)?, byte(2)?, byte(3)?])),
        32 => {
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = byte(i)?;
            }
            Some(IpAddr::from(octets))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_names_of_addresses_read_back() {
        for ip in ["10.0.1.255", "127.0.0.1", "2001:db8::ff00:42:8329"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut hex = String::new();
            push_hex_ip(&mut hex, ip);
            assert_eq!(hex.len(), if ip.is_ipv4() { 8 } else { 32 });
            assert_eq!(parse_hex_ip(hex.as_bytes()), Some(ip), "{hex}");
        }
        let mut hex = String::new();
        push_hex_ip(&mut hex, "10.0.1.255".parse().expect("ip"));
        assert_eq!(hex, "0a0001ff");
    }
}
