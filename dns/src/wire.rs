//! DNS wire format: the query parser and the pieces of a response.
//!
//! Only what an authoritative server needs: one question, an optional OPT
//! record. The parser never panics and never allocates; anything it cannot
//! accept becomes a drop or a FORMERR.

pub(crate) const HEADER_LEN: usize = 12;
/// Largest name, in wire bytes (RFC 1035).
const MAX_NAME: usize = 255;
const MAX_LABELS: usize = 128;

pub(crate) mod rtype {
    pub(crate) const A: u16 = 1;
    pub(crate) const NS: u16 = 2;
    pub(crate) const SOA: u16 = 6;
    pub(crate) const PTR: u16 = 12;
    pub(crate) const TXT: u16 = 16;
    pub(crate) const AAAA: u16 = 28;
    pub(crate) const SRV: u16 = 33;
    pub(crate) const OPT: u16 = 41;
    pub(crate) const IXFR: u16 = 251;
    pub(crate) const AXFR: u16 = 252;
    pub(crate) const ANY: u16 = 255;
}

pub(crate) mod rcode {
    pub(crate) const NOERROR: u8 = 0;
    pub(crate) const FORMERR: u8 = 1;
    pub(crate) const SERVFAIL: u8 = 2;
    pub(crate) const NXDOMAIN: u8 = 3;
    pub(crate) const NOTIMP: u8 = 4;
    pub(crate) const REFUSED: u8 = 5;
    /// Extended: EDNS version not supported (upper bits go in the OPT record).
    pub(crate) const BADVERS: u16 = 16;
}

pub(crate) const CLASS_IN: u16 = 1;

/// EDNS(0) as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Edns {
    pub(crate) udp_size: u16,
    pub(crate) version: u8,
}

/// A parsed query. Label positions point into the packet; `lower` holds the
/// name in lowercase for matching, while the answer echoes the original bytes.
pub(crate) struct Query {
    pub(crate) id: u16,
    pub(crate) rd: bool,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
    /// End of the question section (after QTYPE/QCLASS).
    pub(crate) question_end: usize,
    pub(crate) edns: Option<Edns>,
    /// `(offset in packet, length)` of each label, left to right.
    labels: [(u16, u8); MAX_LABELS],
    label_count: usize,
    /// The labels in lowercase, each preceded by its length (wire form).
    lower: [u8; MAX_NAME],
}

/// Why a packet gets no normal answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Not worth an answer: too short to carry an id, or itself a response.
    Drop,
    /// Answer with this RCODE and no question (the id is in the header).
    Error { id: u16, rd: bool, rcode: u8 },
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

impl Query {
    pub(crate) fn parse(p: &[u8]) -> Result<Query, Reject> {
        if p.len() < HEADER_LEN {
            return Err(Reject::Drop);
        }
        let id = u16::from_be_bytes([p[0], p[1]]);
        let flags = u16::from_be_bytes([p[2], p[3]]);
        if flags & 0x8000 != 0 {
            return Err(Reject::Drop);
        }
        let rd = flags & 0x0100 != 0;
        let error = |rcode| Reject::Error { id, rd, rcode };
        let opcode = (flags >> 11) & 0xF;
        if opcode != 0 {
            return Err(error(rcode::NOTIMP));
        }
        let qdcount = u16::from_be_bytes([p[4], p[5]]);
        let ancount = u16::from_be_bytes([p[6], p[7]]);
        let nscount = u16::from_be_bytes([p[8], p[9]]);
        let arcount = u16::from_be_bytes([p[10], p[11]]);
        if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 2 {
            return Err(error(rcode::FORMERR));
        }
        let mut q = Query {
            id,
            rd,
            qtype: 0,
            qclass: 0,
            question_end: 0,
            edns: None,
            labels: [(0, 0); MAX_LABELS],
            label_count: 0,
            lower: [0; MAX_NAME],
        };
        let mut at = HEADER_LEN;
        let mut name_len = 0usize;
        loop {
            let len = *p.get(at).ok_or(error(rcode::FORMERR))? as usize;
            if len == 0 {
                at += 1;
                break;
            }
            // No compression in a question's name, no extended label types.
            if len > 63 || q.label_count == MAX_LABELS || name_len + len + 1 >= MAX_NAME {
                return Err(error(rcode::FORMERR));
            }
            let label = p.get(at + 1..at + 1 + len).ok_or(error(rcode::FORMERR))?;
            q.labels[q.label_count] = ((at + 1) as u16, len as u8);
            q.label_count += 1;
            q.lower[name_len] = len as u8;
            for (i, b) in label.iter().enumerate() {
                q.lower[name_len + 1 + i] = b.to_ascii_lowercase();
            }
            name_len += len + 1;
            at += len + 1;
        }
        q.qtype = be16(p, at).ok_or(error(rcode::FORMERR))?;
        q.qclass = be16(p, at + 2).ok_or(error(rcode::FORMERR))?;
        at += 4;
        q.question_end = at;
        for _ in 0..arcount {
            // Additional records: only OPT matters; others (TSIG, ...) are skipped.
            let name_byte = *p.get(at).ok_or(error(rcode::FORMERR))?;
            let mut pos = at;
            if name_byte == 0 {
                pos += 1;
            } else {
                // Skip a name (labels or a pointer) we do not interpret.
                loop {
                    let b = *p.get(pos).ok_or(error(rcode::FORMERR))? as usize;
                    if b == 0 {
                        pos += 1;
                        break;
                    }
                    if b & 0xC0 == 0xC0 {
                        pos += 2;
                        break;
                    }
                    if b > 63 {
                        return Err(error(rcode::FORMERR));
                    }
                    pos += b + 1;
                }
            }
            let rtype = be16(p, pos).ok_or(error(rcode::FORMERR))?;
            let class = be16(p, pos + 2).ok_or(error(rcode::FORMERR))?;
            let ttl_hi = be16(p, pos + 4).ok_or(error(rcode::FORMERR))?;
            let rdlen = be16(p, pos + 8).ok_or(error(rcode::FORMERR))? as usize;
            let end = pos + 10 + rdlen;
            if end > p.len() {
                return Err(error(rcode::FORMERR));
            }
            if rtype == rtype::OPT {
                if name_byte != 0 || q.edns.is_some() {
                    return Err(error(rcode::FORMERR));
                }
                q.edns = Some(Edns {
                    udp_size: class,
                    version: (ttl_hi & 0xFF) as u8,
                });
            }
            at = end;
        }
        Ok(q)
    }

    pub(crate) fn label_count(&self) -> usize {
        self.label_count
    }

    /// Label `i` (left to right) in lowercase. `lower` mirrors the packet's
    /// name byte for byte from offset 12, so the recorded offsets index it too.
    pub(crate) fn label(&self, i: usize) -> &[u8] {
        let (at, len) = self.labels[i];
        let start = usize::from(at) - HEADER_LEN;
        &self.lower[start..start + usize::from(len)]
    }

    /// All labels, lowercase, left to right.
    pub(crate) fn labels(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.label_count).map(|i| self.label(i))
    }

    /// Packet offset where label `i` starts (its length byte): the target of
    /// a compression pointer to the name suffix from label `i` on.
    pub(crate) fn suffix_offset(&self, i: usize) -> u16 {
        if i >= self.label_count {
            // The root: point at the terminating zero byte.
            return (self.question_end - 5) as u16;
        }
        self.labels[i].0 - 1
    }
}

/// Appends a name given as dot-separated text in wire form. Returns false
/// (and appends nothing) if a label is empty or too long.
pub(crate) fn push_name(out: &mut Vec<u8>, dotted: &str) -> bool {
    let trimmed = dotted.trim_end_matches('.');
    if trimmed.len() > 253 {
        return false;
    }
    let start = out.len();
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            out.truncate(start);
            return false;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    true
}

/// Appends a compression pointer to `offset`.
pub(crate) fn push_pointer(out: &mut Vec<u8>, offset: u16) {
    out.extend_from_slice(&(0xC000 | offset).to_be_bytes());
}

/// Appends TYPE, CLASS IN, TTL and a placeholder RDLENGTH; returns the
/// position of RDLENGTH for `finish_rdata`.
pub(crate) fn push_rr_head(out: &mut Vec<u8>, rtype: u16, ttl: u32) -> usize {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    at
}

/// Fills in the RDLENGTH written by `push_rr_head`.
pub(crate) fn finish_rdata(out: &mut [u8], rdlen_at: usize) {
    let len = (out.len() - rdlen_at - 2) as u16;
    out[rdlen_at..rdlen_at + 2].copy_from_slice(&len.to_be_bytes());
}

/// Writes a response header.
pub(crate) struct Header {
    pub(crate) id: u16,
    pub(crate) rd: bool,
    pub(crate) aa: bool,
    pub(crate) tc: bool,
    pub(crate) rcode: u8,
    pub(crate) qd: u16,
    pub(crate) an: u16,
    pub(crate) ns: u16,
    pub(crate) ar: u16,
}

impl Header {
    pub(crate) fn write(&self, out: &mut [u8]) {
        let mut flags: u16 = 0x8000; // QR
        if self.aa {
            flags |= 0x0400;
        }
        if self.tc {
            flags |= 0x0200;
        }
        if self.rd {
            flags |= 0x0100;
        }
        flags |= u16::from(self.rcode & 0xF);
        out[0..2].copy_from_slice(&self.id.to_be_bytes());
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[4..6].copy_from_slice(&self.qd.to_be_bytes());
        out[6..8].copy_from_slice(&self.an.to_be_bytes());
        out[8..10].copy_from_slice(&self.ns.to_be_bytes());
        out[10..12].copy_from_slice(&self.ar.to_be_bytes());
    }
}

/// Appends our OPT record: our UDP payload size, extended RCODE bits, version 0.
pub(crate) fn push_opt(out: &mut Vec<u8>, udp_size: u16, extended_rcode: u16) {
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&udp_size.to_be_bytes());
    out.push((extended_rcode >> 4) as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&[0, 0]);
}

/// Size of the OPT record `push_opt` writes.
pub(crate) const OPT_LEN: usize = 11;

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(edns.is_some()),
        ];
        assert!(push_name(&mut p, name));
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            push_opt(&mut p, size, 0);
        }
        p
    }

    #[test]
    fn parses_a_query_with_edns() {
        let p = query("Web.Service.CONSUL", rtype::SRV, Some(1232));
        let q = Query::parse(&p).expect("valid");
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.qtype, rtype::SRV);
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 1232,
                version: 0
            })
        );
        let labels: Vec<&[u8]> = q.labels().collect();
        assert_eq!(labels, [&b"web"[..], b"service", b"consul"]);
        assert_eq!(q.label(1), b"service");
        assert_eq!(q.suffix_offset(2), 12 + 4 + 8);
    }

    #[test]
    fn refuses_malformed_packets_without_panicking() {
        assert_eq!(Query::parse(&[0; 5]).err(), Some(Reject::Drop));
        let mut response = query("a.consul", rtype::A, None);
        response[2] |= 0x80;
        assert_eq!(Query::parse(&response).err(), Some(Reject::Drop));
        let good = query("web.service.consul", rtype::A, Some(4096));
        // Every truncation of a valid query is refused cleanly.
        for cut in 0..good.len() {
            let _ = Query::parse(&good[..cut]);
        }
        let mut two = good.clone();
        two[5] = 2;
        assert!(matches!(
            Query::parse(&two),
            Err(Reject::Error {
                rcode: rcode::FORMERR,
                ..
            })
        ));
        let mut pointer = good.clone();
        pointer[12] = 0xC0;
        assert!(matches!(
            Query::parse(&pointer),
            Err(Reject::Error {
                rcode: rcode::FORMERR,
                ..
            })
        ));
        let mut notify = good;
        notify[2] |= 4 << 3;
        assert!(matches!(
            Query::parse(&notify),
            Err(Reject::Error {
                rcode: rcode::NOTIMP,
                ..
            })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(3);
        let base = query("svc-1.service.consul", rtype::A, Some(1232));
        for _ in 0..20_000 {
            let mut p = base.clone();
            for _ in 0..rng.usize(1..6) {
                let i = rng.usize(..p.len());
                p[i] = rng.u8(..);
            }
            if let Ok(q) = Query::parse(&p) {
                let _ = q.labels().count();
            }
        }
    }
}
