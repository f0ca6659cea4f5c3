//! The answer engine: one query in, one response out, from one snapshot.
//! Used unchanged by the UDP and TCP paths, so both always agree.

use std::collections::HashSet;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_catalog::{
    failover_policy, needs_failover, Chunk, Copied, CopyOf, Elsewhere, ExtraKey, NodeEntry,
    QueryService, ServiceView, Snapshot, CHUNK,
};

use crate::config::Config;
use crate::metrics::DnsMetrics;
use crate::prebuilt::{
    parse_hex_ip, push_addr_rr, DnsDecorator, DnsService, Entry, Family, SRV_TARGET,
};
use crate::ptr::{parse_reverse, Ptr};
use crate::wire::{
    finish_rdata, push_opt, push_pointer, push_rr_head, rcode, rtype, Header, Query, Reject,
    CLASS_IN, HEADER_LEN, OPT_LEN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// Per-worker buffers, reused for every query (no allocation per query).
pub(crate) struct Scratch {
    positions: Vec<u32>,
    targets: Vec<(usize, u32)>,
    rng: fastrand::Rng,
    sent: Sent,
    keys: Keys,
    /// Whether a name of another datacenter whose copy is being fetched may
    /// be answered later (`pending`), or gets SERVFAIL now (the second try).
    pub(crate) defer: bool,
    /// Set instead of an answer: the caller waits for it, then asks again
    /// with `defer` off. (The reply written meanwhile is a SERVFAIL.)
    pub(crate) pending: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            positions: Vec::with_capacity(256),
            targets: Vec::with_capacity(256),
            rng: fastrand::Rng::new(),
            sent: Sent {
                stamps: Vec::new(),
                round: 0,
            },
            keys: HashSet::default(),
            defer: true,
            pending: None,
        }
    }
}

/// Bits of a position that index into its chunk; the rest number the chunk.
const CHUNK_BITS: u32 = 10;
const _: () = assert!(CHUNK <= 1 << CHUNK_BITS);

/// An answer position: the chunk and the instance in it.
fn position(chunk: usize, local: u32) -> u32 {
    ((chunk as u32) << CHUNK_BITS) | local
}

/// The chunk's answers and the entry of a position.
fn entry_at(
    chunks: &[Arc<Chunk>],
    key: ExtraKey<DnsDecorator>,
    p: u32,
) -> Option<(&DnsService, &Entry)> {
    let dns = chunks.get((p >> CHUNK_BITS) as usize)?.extra(key)?;
    Some((
        dns,
        dns.entries.get((p & ((1 << CHUNK_BITS) - 1)) as usize)?,
    ))
}

/// A 64-bit FNV-1a hash of a record's bytes: the key under which a view of
/// many chunks tells repeated address records and SRV targets apart (its
/// chunks number their records separately).
fn record_key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Hashes a `record_key` by taking it as it is.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

type Keys = HashSet<u64, BuildHasherDefault<KeyHasher>>;

/// Which records one answer has sent: the chunk's own numbering when the
/// view has one chunk, else the records' keys.
enum Dedup {
    None,
    Ids,
    Keys,
}

/// Which address records (by `Entry::addr`) one answer has sent: a stamp per
/// record, so starting an answer clears nothing. It grows to the largest
/// service answered and is then reused.
struct Sent {
    stamps: Vec<u32>,
    round: u32,
}

impl Sent {
    /// Starts an answer over `records` address records.
    fn begin(&mut self, records: usize) {
        self.round = self.round.wrapping_add(1);
        if self.round == 0 {
            self.stamps.fill(0);
            self.round = 1;
        }
        if self.stamps.len() < records {
            self.stamps.resize(records, 0);
        }
    }

    fn contains(&self, record: u32) -> bool {
        self.stamps.get(record as usize) == Some(&self.round)
    }

    /// Marks `record` sent; false if it already was.
    fn insert(&mut self, record: u32) -> bool {
        match self.stamps.get_mut(record as usize) {
            Some(stamp) if *stamp != self.round => {
                *stamp = self.round;
                true
            }
            _ => false,
        }
    }
}

/// What happened, for metrics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outcome {
    pub(crate) qtype: u16,
    pub(crate) rcode: u8,
    pub(crate) truncated: bool,
}

/// Sections counted while writing a response.
#[derive(Default)]
struct Counts {
    an: u16,
    ns: u16,
    ar: u16,
    tc: bool,
}

pub(crate) struct Engine {
    pub(crate) config: Arc<Config>,
    domain: Vec<Vec<u8>>,
    datacenter: Vec<u8>,
    /// Where each view holds its `DnsService`.
    answers: ExtraKey<DnsDecorator>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) metrics: Arc<DnsMetrics>,
    ptr: Arc<Ptr>,
    /// Other datacenters' copies (`<name>.service.<dc>.consul`, failover).
    elsewhere: Option<Arc<dyn Elsewhere>>,
    /// `federation.min_healthy`, read once.
    min_healthy: f64,
}

/// What a name under our zone refers to.
enum Target<'a> {
    Apex,
    Service {
        name: &'a str,
        tag: Option<String>,
    },
    Node(String),
    /// A prepared query, by ID or name.
    Query(String),
    Addr(IpAddr),
    Unknown,
}

/// An answer that waits for a copy's first fetch (see `Engine::failover`).
struct Deferred;

/// Which of a service's instances an answer picks from.
#[derive(Clone, Copy)]
enum Pick<'a> {
    Routable,
    /// Routable and tagged (lower case).
    Tag(&'a str),
    /// What a prepared query admits.
    Query(&'a QueryService),
}

impl<'a> Pick<'a> {
    fn tag(tag: Option<&'a str>) -> Pick<'a> {
        tag.map_or(Pick::Routable, Pick::Tag)
    }
}

/// Sets the TTL of the record whose TYPE starts at `type_at`.
fn set_ttl(out: &mut [u8], type_at: usize, ttl: u32) {
    if let Some(field) = out.get_mut(type_at + 4..type_at + 8) {
        field.copy_from_slice(&ttl.to_be_bytes());
    }
}

fn text(label: &[u8]) -> Option<&str> {
    std::str::from_utf8(label).ok()
}

fn join(labels: &[&[u8]]) -> Option<String> {
    let parts: Option<Vec<&str>> = labels.iter().map(|l| text(l)).collect();
    Some(parts?.join("."))
}

impl Engine {
    pub(crate) fn new(
        config: Arc<Config>,
        datacenter: &str,
        answers: ExtraKey<DnsDecorator>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<DnsMetrics>,
        ptr: Arc<Ptr>,
        elsewhere: Option<Arc<dyn Elsewhere>>,
    ) -> Engine {
        Engine {
            ptr,
            min_healthy: elsewhere.as_ref().map_or(0.0, |e| e.min_healthy()),
            elsewhere,
            domain: config.domain_labels(),
            datacenter: datacenter.to_ascii_lowercase().into_bytes(),
            config,
            answers,
            snapshot,
            metrics,
        }
    }

    /// Answers `packet` into `out`. `None` means: send nothing.
    pub(crate) fn answer(
        &self,
        packet: &[u8],
        transport: Transport,
        out: &mut Vec<u8>,
        scratch: &mut Scratch,
    ) -> Option<Outcome> {
        out.clear();
        let q = match Query::parse(packet) {
            Ok(q) => q,
            Err(Reject::Drop) => return None,
            Err(Reject::Error { id, rd, rcode }) => {
                out.resize(HEADER_LEN, 0);
                Header {
                    id,
                    rd,
                    aa: false,
                    tc: false,
                    rcode,
                    qd: 0,
                    an: 0,
                    ns: 0,
                    ar: 0,
                }
                .write(out);
                return Some(Outcome {
                    qtype: 0,
                    rcode,
                    truncated: false,
                });
            }
        };
        out.resize(HEADER_LEN, 0);
        out.extend_from_slice(&packet[HEADER_LEN..q.question_end]);
        let budget = match (transport, q.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => 512,
            (Transport::Udp, Some(e)) => {
                usize::from(e.udp_size.clamp(512, self.config.max_udp_size))
            }
        };
        let reserve = if q.edns.is_some() { OPT_LEN } else { 0 };
        let mut counts = Counts::default();
        let (rcode, aa, extended) = if q.edns.is_some_and(|e| e.version > 0) {
            (0, false, rcode::BADVERS)
        } else if q.qtype == rtype::ANY && matches!(transport, Transport::Udp) {
            // ANY over UDP is an amplification tool: an empty, truncated
            // answer sends real clients to TCP (RFC 8482 allows this).
            counts.tc = true;
            (0, true, 0)
        } else {
            let (rcode, aa) = self.resolve(&q, out, budget - reserve, &mut counts, scratch);
            (rcode, aa, 0)
        };
        if q.edns.is_some() {
            push_opt(out, self.config.max_udp_size, extended);
            counts.ar += 1;
        }
        Header {
            id: q.id,
            rd: q.rd,
            aa,
            tc: counts.tc,
            rcode,
            qd: 1,
            an: counts.an,
            ns: counts.ns,
            ar: counts.ar,
        }
        .write(out);
        Some(Outcome {
            qtype: q.qtype,
            rcode,
            truncated: counts.tc,
        })
    }

    /// Writes the answer sections; returns (RCODE, authoritative).
    fn resolve(
        &self,
        q: &Query,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        s: &mut Scratch,
    ) -> (u8, bool) {
        if q.qclass != CLASS_IN && q.qclass != 255 {
            return (rcode::REFUSED, false);
        }
        let n = q.label_count();
        if n >= 2 && q.label(n - 1) == b"arpa" && matches!(q.label(n - 2), b"in-addr" | b"ip6") {
            return self.reverse(q, out, budget, c);
        }
        let d = self.domain.len();
        let in_zone = n >= d
            && self
                .domain
                .iter()
                .enumerate()
                .all(|(i, l)| q.label(n - d + i) == l.as_slice());
        if !in_zone {
            // Not an open resolver: names outside our zone are refused.
            return (rcode::REFUSED, false);
        }
        if matches!(q.qtype, rtype::AXFR | rtype::IXFR) {
            return (rcode::NOTIMP, true);
        }
        let snap = self.snapshot.load();
        let mut buf: [&[u8]; 128] = [&[]; 128];
        let mut len = 0;
        for label in q.labels().take(n - d) {
            buf[len] = label;
            len += 1;
        }
        let apex = n - d;
        let (target, remote) = self.classify(q, &buf[..len]);
        if let Some(dc) = remote {
            return self.elsewhere(q, dc, target, &snap, out, budget, c, s, apex);
        }
        match target {
            Target::Apex => self.apex(q, &snap, out, budget, c, apex),
            Target::Unknown => self.negative(q, &snap, out, c, apex, rcode::NXDOMAIN),
            Target::Service { name, tag } => {
                self.service(q, &snap, name, tag.as_deref(), out, budget, c, s, apex)
            }
            Target::Node(name) => match snap.node_ci(&name) {
                Some(entry) => self.node(q, &snap, entry, out, c, apex),
                None => self.negative(q, &snap, out, c, apex, rcode::NXDOMAIN),
            },
            Target::Query(name) => self.query(q, &snap, &name, out, budget, c, s, apex),
            Target::Addr(ip) => {
                let wanted = matches!(
                    (q.qtype, ip),
                    (rtype::A | rtype::ANY, IpAddr::V4(_))
                        | (rtype::AAAA | rtype::ANY, IpAddr::V6(_))
                );
                if !wanted {
                    return self.negative(q, &snap, out, c, apex, rcode::NOERROR);
                }
                push_addr_rr(out, Some(12), ip, self.config.node_ttl.as_secs() as u32);
                c.an += 1;
                (rcode::NOERROR, true)
            }
        }
    }

    /// PTR for node and endpoint addresses. We are not the authority for the
    /// reverse zones: addresses we do not know are REFUSED.
    fn reverse(&self, q: &Query, out: &mut Vec<u8>, budget: usize, c: &mut Counts) -> (u8, bool) {
        let mut buf: [&[u8]; 128] = [&[]; 128];
        let mut len = 0;
        for label in q.labels() {
            buf[len] = label;
            len += 1;
        }
        let Some(ip) = parse_reverse(&buf[..len]) else {
            return (rcode::REFUSED, false);
        };
        if !matches!(q.qtype, rtype::PTR | rtype::ANY) {
            return (rcode::REFUSED, false);
        }
        self.ptr.queried();
        let Some(index) = self.ptr.index() else {
            // The first build took longer than a query may wait.
            return (rcode::SERVFAIL, false);
        };
        let Some(names) = index.names.get(&ip) else {
            return (rcode::REFUSED, false);
        };
        let ttl = self.config.node_ttl.as_secs() as u32;
        for name in names {
            let start = out.len();
            push_pointer(out, 12);
            let at = push_rr_head(out, rtype::PTR, ttl);
            if !crate::wire::push_name(out, name) || out.len() > budget {
                out.truncate(start);
                c.tc |= out.len() > budget || start + 64 > budget;
                break;
            }
            finish_rdata(out, at);
            c.an += 1;
        }
        (rcode::NOERROR, true)
    }

    /// Whether `dc` names another datacenter this agent knows.
    fn remote(&self, dc: &[u8]) -> bool {
        self.elsewhere.as_ref().is_some_and(|e| e.knows(dc))
    }

    /// What the name refers to, and the other datacenter it names (none:
    /// ours).
    fn classify<'a>(&self, q: &Query, labels: &[&'a [u8]]) -> (Target<'a>, Option<&'a [u8]>) {
        let mut rest = labels;
        if rest.is_empty() {
            return (Target::Apex, None);
        }
        // Optional datacenter: `<dc>` or `<dc>.dc` right before the domain.
        let mut remote = None;
        if let [head @ .., dc, b"dc"] = rest {
            if *dc == self.datacenter.as_slice() {
                rest = head;
            } else if self.remote(dc) {
                remote = Some(*dc);
                rest = head;
            } else {
                return (Target::Unknown, None);
            }
        } else if let [head @ .., dc] = rest {
            if !head.is_empty() {
                if *dc == self.datacenter.as_slice() {
                    rest = head;
                } else if self.remote(dc) {
                    remote = Some(*dc);
                    rest = head;
                }
            }
        }
        (Self::target(q, rest), remote)
    }

    fn target<'a>(q: &Query, rest: &[&'a [u8]]) -> Target<'a> {
        match rest {
            [] => Target::Apex,
            // RFC 2782: _service._tag[.service]; `_tcp`/`_udp` mean no tag.
            [svc, proto] | [svc, proto, b"service"]
                if svc.first() == Some(&b'_')
                    && proto.first() == Some(&b'_')
                    && (q.qtype == rtype::SRV || rest.len() == 3) =>
            {
                let Some(name) = text(&svc[1..]) else {
                    return Target::Unknown;
                };
                let tag = match &proto[1..] {
                    b"tcp" | b"udp" => None,
                    t => match text(t) {
                        Some(t) => Some(t.to_string()),
                        None => return Target::Unknown,
                    },
                };
                Target::Service { name, tag }
            }
            [parts @ .., b"service"] if !parts.is_empty() => {
                let (svc, tag) = parts
                    .split_last()
                    .map_or((&b""[..], &[][..]), |(s, t)| (*s, t));
                let Some(name) = text(svc) else {
                    return Target::Unknown;
                };
                if tag.is_empty() {
                    return Target::Service { name, tag: None };
                }
                match join(tag) {
                    Some(tag) => Target::Service {
                        name,
                        tag: Some(tag),
                    },
                    None => Target::Unknown,
                }
            }
            // RFC 2782 form of a query: `_<name>._tcp.query`.
            [name, b"_tcp", b"query"] if name.first() == Some(&b'_') => {
                text(&name[1..]).map_or(Target::Unknown, |n| Target::Query(n.to_string()))
            }
            [parts @ .., b"query"] if !parts.is_empty() => {
                join(parts).map_or(Target::Unknown, Target::Query)
            }
            [parts @ .., b"node"] if !parts.is_empty() => {
                join(parts).map_or(Target::Unknown, Target::Node)
            }
            [hex, b"addr"] => parse_hex_ip(hex).map_or(Target::Unknown, Target::Addr),
            _ => Target::Unknown,
        }
    }

    /// A name in another datacenter: answered from its copy, the same way as
    /// ours. A copy not fetched yet defers the answer (`Scratch::pending`)
    /// or, on the second try, is a SERVFAIL.
    #[allow(clippy::too_many_arguments)]
    fn elsewhere(
        &self,
        q: &Query,
        dc: &[u8],
        target: Target<'_>,
        local: &Snapshot,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        s: &mut Scratch,
        apex: usize,
    ) -> (u8, bool) {
        let (Some(elsewhere), Some(dc)) = (&self.elsewhere, text(dc)) else {
            return self.negative(q, local, out, c, apex, rcode::NXDOMAIN);
        };
        let of = match &target {
            Target::Service { name, .. } => CopyOf::Service(name),
            Target::Node(name) => CopyOf::Node(name),
            _ => return self.negative(q, local, out, c, apex, rcode::NXDOMAIN),
        };
        match elsewhere.copy(dc, of) {
            Copied::Ready(snap) => match target {
                Target::Service { name, tag } => {
                    let view = snap.service_ci(name);
                    let pick = Pick::tag(tag.as_deref());
                    self.service_here(q, &snap, view, pick, None, out, budget, c, s, apex)
                }
                Target::Node(name) => match snap.node_ci(&name) {
                    Some(entry) => self.node(q, &snap, entry, out, c, apex),
                    None => self.negative(q, &snap, out, c, apex, rcode::NXDOMAIN),
                },
                _ => self.negative(q, &snap, out, c, apex, rcode::NXDOMAIN),
            },
            Copied::Fetching(wait) => {
                if s.defer {
                    s.pending = Some(wait);
                }
                (rcode::SERVFAIL, false)
            }
            Copied::Unknown => self.negative(q, local, out, c, apex, rcode::NXDOMAIN),
            Copied::Full => (rcode::SERVFAIL, false),
        }
    }

    /// A service of ours, or, when it has too few routable endpoints here
    /// and a failover policy, of the first datacenter in its failover order
    /// whose copy has some. (A copy not fetched yet defers the answer, as
    /// for a name with that datacenter's label.)
    #[allow(clippy::too_many_arguments)]
    fn service(
        &self,
        q: &Query,
        snap: &Snapshot,
        name: &str,
        tag: Option<&str>,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        s: &mut Scratch,
        apex: usize,
    ) -> (u8, bool) {
        let view = snap.service_ci(name);
        if let Some(elsewhere) = &self.elsewhere {
            if needs_failover(view.map(|v| &**v), self.min_healthy) {
                let policy = view.and_then(|v| failover_policy(v));
                let routable =
                    |copy: &Snapshot| copy.service_ci(name).is_some_and(|v| v.routable_len() > 0);
                match Self::failover(&**elsewhere, elsewhere.order(policy), name, s, routable) {
                    Err(Deferred) => return (rcode::SERVFAIL, false),
                    Ok(Some(copy)) => {
                        let there = copy.service_ci(name);
                        let pick = Pick::tag(tag);
                        return self
                            .service_here(q, &copy, there, pick, None, out, budget, c, s, apex);
                    }
                    Ok(None) => {}
                }
            }
        }
        self.service_here(q, snap, view, Pick::tag(tag), None, out, budget, c, s, apex)
    }

    /// A prepared query (`<name>.query.<domain>`): the instances it admits
    /// here, or, when none, in the first datacenter it fails over to that
    /// has some (from that datacenter's copy). No instance anywhere, or no
    /// such query: NXDOMAIN, as in Consul. `DNS.TTL` overrides the
    /// service's TTL.
    #[allow(clippy::too_many_arguments)]
    fn query(
        &self,
        q: &Query,
        snap: &Snapshot,
        name: &str,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        s: &mut Scratch,
        apex: usize,
    ) -> (u8, bool) {
        let Some(query) = snap.queries.resolve(name) else {
            return self.negative(q, snap, out, c, apex, rcode::NXDOMAIN);
        };
        let def = query.render(name);
        let ttl = match def.dns_ttl.as_str() {
            "" => None,
            ttl => switchyard_catalog::parse_go_duration(ttl)
                .ok()
                .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        };
        let service = &def.service;
        let admits = |view: Option<&Arc<ServiceView>>| {
            view.is_some_and(|v| v.instances().any(|i| service.admits(i)))
        };
        let pick = Pick::Query(service);
        let view = service.view(snap);
        if admits(view) {
            return self.service_here(q, snap, view, pick, ttl, out, budget, c, s, apex);
        }
        if let Some(elsewhere) = &self.elsewhere {
            let lower = service.service.to_ascii_lowercase();
            let dcs = service.failover_targets(&**elsewhere);
            let has = |copy: &Snapshot| admits(service.view(copy));
            match Self::failover(&**elsewhere, dcs, &lower, s, has) {
                Err(Deferred) => return (rcode::SERVFAIL, false),
                Ok(Some(copy)) => {
                    let there = service.view(&copy);
                    return self.service_here(q, &copy, there, pick, ttl, out, budget, c, s, apex);
                }
                Ok(None) => {}
            }
        }
        self.negative(q, snap, out, c, apex, rcode::NXDOMAIN)
    }

    /// Where a service short here is answered from: the copy of the first
    /// of `dcs` (in order) that `has` what the answer needs (the failover
    /// recorded). `Deferred` while such a copy's first fetch is under way
    /// and the answer may wait (`Scratch::pending` set); `None` when no
    /// datacenter has any.
    fn failover(
        elsewhere: &dyn Elsewhere,
        dcs: Vec<String>,
        lower: &str,
        s: &mut Scratch,
        has: impl Fn(&Snapshot) -> bool,
    ) -> Result<Option<Arc<Snapshot>>, Deferred> {
        for dc in dcs {
            match elsewhere.copy(&dc, CopyOf::Service(lower)) {
                Copied::Ready(copy) if has(&copy) => {
                    elsewhere.failed_over(lower, &dc);
                    return Ok(Some(copy));
                }
                Copied::Fetching(wait) if s.defer => {
                    s.pending = Some(wait);
                    return Err(Deferred);
                }
                Copied::Ready(_) | Copied::Fetching(_) | Copied::Unknown | Copied::Full => {}
            }
        }
        Ok(None)
    }

    // The answer engine's per-query state (output, budget, counts, scratch)
    // shared by every name form's writer, plus this form's own inputs.
    #[allow(clippy::too_many_arguments)]
    fn service_here(
        &self,
        q: &Query,
        snap: &Snapshot,
        view: Option<&Arc<ServiceView>>,
        pick: Pick<'_>,
        ttl: Option<u32>,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        s: &mut Scratch,
        apex: usize,
    ) -> (u8, bool) {
        let Some(view) = view else {
            return self.negative(q, snap, out, c, apex, rcode::NXDOMAIN);
        };
        let wanted = |f: Family, has_srv: bool| match q.qtype {
            rtype::A => f == Family::V4,
            rtype::AAAA => f == Family::V6,
            rtype::ANY => f != Family::Name,
            rtype::SRV => has_srv,
            _ => false,
        };
        let chunks = view.chunks();
        s.positions.clear();
        let mut tagged = false;
        for (at, chunk) in chunks.iter().enumerate() {
            let Some(dns) = chunk.extra(self.answers) else {
                return (rcode::SERVFAIL, true);
            };
            let wanted_at = |p: u32| {
                let e = dns.entries.get(p as usize)?;
                wanted(e.family, e.has_srv()).then(|| position(at, p))
            };
            match pick {
                Pick::Routable => s
                    .positions
                    .extend(chunk.routable().iter().copied().filter_map(wanted_at)),
                Pick::Tag(tag) => {
                    let positions = chunk.tagged(tag);
                    tagged |= !positions.is_empty();
                    s.positions
                        .extend(positions.iter().copied().filter_map(wanted_at));
                }
                Pick::Query(def) => s.positions.extend(
                    (0..chunk.instances().len() as u32)
                        .filter(|&p| def.admits(&chunk.instances()[p as usize]))
                        .filter_map(wanted_at),
                ),
            }
        }
        if let Pick::Tag(tag) = pick {
            if !tagged && !view.has_tag_ci(tag) {
                return self.negative(q, snap, out, c, apex, rcode::NXDOMAIN);
            }
        }
        if s.positions.is_empty() {
            return self.negative(q, snap, out, c, apex, rcode::NOERROR);
        }
        s.rng.shuffle(&mut s.positions);
        let srv = q.qtype == rtype::SRV;
        let entry = |p: u32| entry_at(chunks, self.answers, p);
        // Each record once (RFC 2181 §5.5): instances on one address give one
        // A/AAAA answer, and one additional record for their SRV targets.
        let dedup = match chunks {
            [one] => match one.extra(self.answers) {
                Some(dns) if dns.shared_addrs => {
                    s.sent.begin(dns.id_count());
                    Dedup::Ids
                }
                _ => Dedup::None,
            },
            _ => {
                s.keys.clear();
                Dedup::Keys
            }
        };
        if !srv {
            let (positions, sent, keys) = (&mut s.positions, &mut s.sent, &mut s.keys);
            match dedup {
                Dedup::None => {}
                Dedup::Ids => {
                    positions.retain(|&p| entry(p).is_some_and(|(_, e)| sent.insert(e.addr)))
                }
                Dedup::Keys => positions.retain(|&p| {
                    entry(p).is_some_and(|(dns, e)| keys.insert(record_key(dns.addr(e))))
                }),
            }
        }
        if self.config.max_answers > 0 {
            s.positions.truncate(self.config.max_answers);
        }
        s.targets.clear();
        let mut additional = 0usize;
        for &p in &s.positions {
            let Some((dns, entry)) = entry(p) else {
                continue;
            };
            let addr = dns.addr(entry);
            let target_key = || record_key(&dns.srv(entry)[SRV_TARGET..]);
            let (rr_len, extra) = if srv {
                let repeat = match dedup {
                    Dedup::None => false,
                    Dedup::Ids => s.sent.contains(entry.target),
                    Dedup::Keys => s.keys.contains(&target_key()),
                };
                let extra = if addr.is_empty() || repeat {
                    0
                } else {
                    2 + addr.len()
                };
                (dns.srv(entry).len(), extra)
            } else {
                (2 + addr.len(), 0)
            };
            if out.len() + rr_len + additional + extra > budget {
                c.tc = true;
                break;
            }
            if srv {
                if extra > 0 {
                    s.targets.push((out.len() + SRV_TARGET, p));
                    match dedup {
                        Dedup::None => {}
                        Dedup::Ids => {
                            s.sent.insert(entry.target);
                        }
                        Dedup::Keys => {
                            s.keys.insert(target_key());
                        }
                    }
                }
                additional += extra;
                let at = out.len();
                out.extend_from_slice(dns.srv(entry));
                if let Some(ttl) = ttl {
                    set_ttl(out, at + 2, ttl);
                }
            } else {
                push_pointer(out, 12);
                let at = out.len();
                out.extend_from_slice(addr);
                if let Some(ttl) = ttl {
                    set_ttl(out, at, ttl);
                }
            }
            c.an += 1;
        }
        for &(target_at, p) in &s.targets {
            let Some((dns, entry)) = entry(p) else {
                continue;
            };
            let addr = dns.addr(entry);
            if target_at <= 0x3FFF {
                push_pointer(out, target_at as u16);
            } else {
                // Beyond pointer reach (large TCP answers): write the name out.
                out.extend_from_slice(&dns.srv(entry)[SRV_TARGET..]);
            }
            let at = out.len();
            out.extend_from_slice(addr);
            if let Some(ttl) = ttl {
                set_ttl(out, at, ttl);
            }
            c.ar += 1;
        }
        (rcode::NOERROR, true)
    }

    fn node(
        &self,
        q: &Query,
        snap: &Snapshot,
        entry: &NodeEntry,
        out: &mut Vec<u8>,
        c: &mut Counts,
        apex: usize,
    ) -> (u8, bool) {
        let ttl = self.config.node_ttl.as_secs() as u32;
        let ip = entry.node.address.parse::<IpAddr>().ok();
        match (q.qtype, ip) {
            (rtype::A | rtype::ANY, Some(ip @ IpAddr::V4(_)))
            | (rtype::AAAA | rtype::ANY, Some(ip @ IpAddr::V6(_))) => {
                push_addr_rr(out, Some(12), ip, ttl);
                c.an += 1;
                (rcode::NOERROR, true)
            }
            (rtype::TXT, _) if !entry.node.meta.is_empty() => {
                for (k, v) in &entry.node.meta {
                    let txt = if k.starts_with("rfc1035-") {
                        v.clone()
                    } else {
                        format!("{k}={v}")
                    };
                    let bytes = txt.as_bytes();
                    let bytes = &bytes[..bytes.len().min(255)];
                    push_pointer(out, 12);
                    let at = push_rr_head(out, rtype::TXT, ttl);
                    out.push(bytes.len() as u8);
                    out.extend_from_slice(bytes);
                    finish_rdata(out, at);
                    c.an += 1;
                }
                (rcode::NOERROR, true)
            }
            _ => self.negative(q, snap, out, c, apex, rcode::NOERROR),
        }
    }

    fn apex(
        &self,
        q: &Query,
        snap: &Snapshot,
        out: &mut Vec<u8>,
        budget: usize,
        c: &mut Counts,
        apex: usize,
    ) -> (u8, bool) {
        let zone = q.suffix_offset(apex);
        match q.qtype {
            rtype::SOA | rtype::ANY => {
                self.push_soa(out, zone, snap);
                c.an += 1;
                if q.qtype == rtype::ANY {
                    self.push_ns(out, zone, c, budget);
                }
                (rcode::NOERROR, true)
            }
            rtype::NS => {
                self.push_ns(out, zone, c, budget);
                (rcode::NOERROR, true)
            }
            _ => self.negative(q, snap, out, c, apex, rcode::NOERROR),
        }
    }

    /// NS `ns.<zone>` with its address as glue.
    fn push_ns(&self, out: &mut Vec<u8>, zone: u16, c: &mut Counts, budget: usize) {
        if out.len() + 64 > budget {
            return;
        }
        push_pointer(out, zone);
        let at = push_rr_head(out, rtype::NS, self.config.node_ttl.as_secs() as u32);
        let ns_name = out.len();
        out.push(2);
        out.extend_from_slice(b"ns");
        push_pointer(out, zone);
        finish_rdata(out, at);
        c.an += 1;
        push_addr_rr(
            out,
            Some(ns_name as u16),
            self.config.ns_addr,
            self.config.node_ttl.as_secs() as u32,
        );
        c.ar += 1;
    }

    fn push_soa(&self, out: &mut Vec<u8>, zone: u16, snap: &Snapshot) {
        let min = self.config.soa_min_ttl.as_secs() as u32;
        push_pointer(out, zone);
        let at = push_rr_head(out, rtype::SOA, min);
        out.push(2);
        out.extend_from_slice(b"ns");
        push_pointer(out, zone);
        out.push(10);
        out.extend_from_slice(b"hostmaster");
        push_pointer(out, zone);
        // The catalog index is the zone's serial: it grows with every change.
        let serial = (snap.index() & 0xFFFF_FFFF) as u32;
        for value in [serial, 3600, 600, 86400, min] {
            out.extend_from_slice(&value.to_be_bytes());
        }
        finish_rdata(out, at);
    }

    /// NXDOMAIN, or NOERROR with no data (RFC 2308): the SOA in authority.
    fn negative(
        &self,
        q: &Query,
        snap: &Snapshot,
        out: &mut Vec<u8>,
        c: &mut Counts,
        apex: usize,
        rcode: u8,
    ) -> (u8, bool) {
        self.push_soa(out, q.suffix_offset(apex), snap);
        c.ns += 1;
        (rcode, true)
    }
}
