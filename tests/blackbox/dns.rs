//! DNS over real UDP and TCP sockets against the real agent. Queries are
//! written by hand; answers are decoded by hickory-proto, an independent parser.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use serde_json::json;

use crate::support::{eventually, Agent, Client};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Via {
    Udp,
    Tcp,
}

fn query_bytes(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let id = fastrand_id();
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.trim_end_matches('.').split('.') {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    if let Some(size) = edns {
        p.extend_from_slice(&[0, 0, 41]);
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    p
}

fn fastrand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7)
        & 0xFFFF) as u16
}

/// Sends raw bytes and returns the raw answer (`None` on timeout).
fn exchange(addr: SocketAddr, packet: &[u8], via: Via) -> Option<Vec<u8>> {
    match via {
        Via::Udp => {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            socket.send_to(packet, addr).expect("send");
            let mut buf = vec![0u8; 65535];
            let (len, _) = socket.recv_from(&mut buf).ok()?;
            buf.truncate(len);
            Some(buf)
        }
        Via::Tcp => {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(packet);
            stream.write_all(&framed).expect("write");
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).ok()?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut buf).ok()?;
            Some(buf)
        }
    }
}

pub(crate) fn ask(
    addr: SocketAddr,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    via: Via,
) -> (Message, usize) {
    let packet = query_bytes(name, u16::from(qtype), edns);
    let raw =
        exchange(addr, &packet, via).unwrap_or_else(|| panic!("no answer for {name} {qtype}"));
    assert_eq!(raw[..2], packet[..2], "id echoed");
    let message =
        Message::from_vec(&raw).unwrap_or_else(|e| panic!("undecodable answer for {name}: {e}"));
    (message, raw.len())
}

pub(crate) fn udp(addr: SocketAddr, name: &str, qtype: RecordType) -> Message {
    ask(addr, name, qtype, None, Via::Udp).0
}

pub(crate) fn ips(records: &[Record]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn register_web(c: &Client) {
    let body = json!({
        "nodes": [
            {"name": "n1", "address": "10.0.0.1", "meta": {"rack": "r1"}},
            {"name": "n2", "address": "10.0.0.2"},
            {"name": "n3", "address": "10.0.0.3"},
        ],
        "endpoints": [
            {"node": "n1", "service": "web", "id": "w1", "port": 8001, "tags": ["v1", "blue"]},
            {"node": "n2", "service": "web", "id": "w2", "port": 8002, "tags": ["v2"]},
            {"node": "n3", "service": "web", "id": "w3", "port": 8003, "address": "10.9.0.3", "tags": ["v1"],
             "weights": {"passing": 7, "warning": 1}},
            {"node": "n3", "service": "web", "id": "w4", "port": 8004,
             "checks": [{"ttl": "1h"}]},
            {"node": "n1", "service": "db", "id": "db1", "port": 5432, "address": "fd00::1"},
            {"node": "n2", "service": "Payments", "id": "pay1", "port": 7000},
        ],
    });
    c.put_ok("/v1/switchyard/batch", &body.to_string());
}

#[test]
fn every_name_form_answers_from_the_catalog() {
    let agent = Agent::start();
    register_web(&agent.client());
    let dns = agent.dns;
    let healthy = vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.9.0.3")];

    let m = udp(dns, "web.service.consul", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(
        ips(&m.answers),
        healthy,
        "the critical TTL endpoint w4 is left out"
    );
    for name in [
        "web.service.dc1.consul",
        "web.service.dc1.dc.consul",
        "WeB.SeRvIcE.CoNsUl",
    ] {
        assert_eq!(
            ips(&udp(dns, name, RecordType::A).answers),
            healthy,
            "{name}"
        );
    }
    let m = udp(dns, "WeB.SeRvIcE.CoNsUl", RecordType::A);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "WeB.SeRvIcE.CoNsUl.",
        "owner echoes the question's case"
    );
    assert_eq!(
        ips(&udp(dns, "v1.web.service.consul", RecordType::A).answers),
        [ip("10.0.0.1"), ip("10.9.0.3")]
    );
    assert_eq!(
        ips(&udp(dns, "V2.web.service.consul", RecordType::A).answers),
        [ip("10.0.0.2")]
    );
    assert_eq!(
        ips(&udp(dns, "db.service.consul", RecordType::AAAA).answers),
        [ip("fd00::1")]
    );
    assert_eq!(
        ips(&udp(dns, "n1.node.consul", RecordType::A).answers),
        [ip("10.0.0.1")]
    );
    assert_eq!(
        ips(&udp(dns, "0a090003.addr.consul", RecordType::A).answers),
        [ip("10.9.0.3")]
    );
    // Node names in any case: DNS asks in lower case (or in 0x20 mixed
    // case); a node registered with capitals is found either way.
    agent.client().put_ok(
        "/v1/catalog/register",
        r#"{"Node": "Big-Node-7", "Address": "10.7.7.7"}"#,
    );
    for name in ["big-node-7.node.consul", "BIG-node-7.node.consul"] {
        assert_eq!(
            ips(&udp(dns, name, RecordType::A).answers),
            [ip("10.7.7.7")],
            "{name}"
        );
    }
    agent
        .client()
        .put_ok("/v1/catalog/deregister", r#"{"Node": "Big-Node-7"}"#);
    let gone = udp(dns, "big-node-7.node.consul", RecordType::A);
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    let txt = udp(dns, "n1.node.consul", RecordType::TXT);
    assert!(
        matches!(&txt.answers[0].data, RData::TXT(t) if t.to_string().contains("rack=r1")),
        "{txt:?}"
    );

    // SRV: RFC 2782 forms, weights, ports, targets, and exactly the targets' addresses as additionals.
    for name in [
        "_web._tcp.service.consul",
        "web.service.consul",
        "_web._tcp.consul",
    ] {
        let m = udp(dns, name, RecordType::SRV);
        assert_eq!(m.answers.len(), 3, "{name}");
        let mut targets = Vec::new();
        for record in &m.answers {
            let RData::SRV(srv) = &record.data else {
                panic!("not SRV: {record:?}")
            };
            assert_eq!(srv.priority, 1);
            let target = srv.target.to_ascii();
            match srv.port {
                8001 => assert_eq!(target, "n1.node.dc1.consul."),
                8002 => assert_eq!(target, "n2.node.dc1.consul."),
                8003 => {
                    assert_eq!(target, "0a090003.addr.dc1.consul.");
                    assert_eq!(srv.weight, 7);
                }
                other => panic!("unexpected port {other}"),
            }
            targets.push(target);
        }
        let mut additional: Vec<String> = m
            .additionals
            .iter()
            .filter(|r| r.record_type() == RecordType::A)
            .map(|r| r.name.to_ascii())
            .collect();
        targets.sort();
        additional.sort();
        assert_eq!(
            additional, targets,
            "{name}: additional section holds exactly the targets"
        );
    }
    let m = udp(dns, "_web._v1.service.consul", RecordType::SRV);
    assert_eq!(m.answers.len(), 2, "RFC 2782 tag form");

    // The zone itself.
    let soa = udp(dns, "consul", RecordType::SOA);
    assert!(matches!(&soa.answers[0].data, RData::SOA(_)));
    let ns = udp(dns, "consul", RecordType::NS);
    assert_eq!(ns.answers[0].record_type(), RecordType::NS);
    assert_eq!(ips(&ns.additionals), [ip("127.0.0.1")]);
}

#[test]
fn negative_answers_carry_the_soa_and_foreign_names_are_refused() {
    let agent = Agent::start();
    register_web(&agent.client());
    let dns = agent.dns;
    let cases = [
        (
            "missing.service.consul",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "nope.web.service.consul",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        ("ghost.node.consul", RecordType::A, ResponseCode::NXDomain),
        ("web.whatever.consul", RecordType::A, ResponseCode::NXDomain),
        (
            "web.service.otherdc.dc.consul",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.service.consul",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        ("db.service.consul", RecordType::A, ResponseCode::NoError),
        ("web.service.consul", RecordType::MX, ResponseCode::NoError),
    ];
    for (name, qtype, rcode) in cases {
        let m = udp(dns, name, qtype);
        assert_eq!(m.metadata.response_code, rcode, "{name} {qtype}");
        assert!(m.answers.is_empty(), "{name} {qtype}");
        assert_eq!(m.authorities.len(), 1, "{name} {qtype}: SOA in authority");
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert!(m.metadata.authoritative);
    }
    for name in ["example.com", "consul.example.com", "service.consu"] {
        let m = udp(dns, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(m.answers.is_empty() && !m.metadata.authoritative);
    }
    let m = udp(dns, "consul", RecordType::AXFR);
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
}

/// 300 instances: UDP fills its budget and sets TC; TCP returns everything.
/// A node runs many tasks of one service on one address: each record goes
/// out once (RFC 2181 §5.5), so the answer fits UDP and sets no TC. SRV
/// stays one answer per endpoint (the ports differ), with one additional
/// address record per distinct target.
#[test]
fn identical_records_are_sent_once() {
    let agent = Agent::start();
    let c = agent.client();
    let mut endpoints: Vec<_> = (0..200)
        .map(|i| json!({"node": "n1", "service": "dup", "id": format!("d{i}"), "port": 9000 + i}))
        .collect();
    endpoints.extend((0..2).map(|i| {
        json!({"node": "n1", "service": "dup", "id": format!("x{i}"), "port": 9500 + i,
               "address": "10.5.0.1"})
    }));
    // The node's own address, named by the endpoint: another SRV target.
    endpoints.push(
        json!({"node": "n1", "service": "dup", "id": "own", "port": 9600,
                          "address": "10.0.0.1"}),
    );
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"nodes": [{"name": "n1", "address": "10.0.0.1"}], "endpoints": endpoints})
            .to_string(),
    );
    let dns = agent.dns;
    for via in [Via::Udp, Via::Tcp] {
        let (m, _) = ask(dns, "dup.service.consul", RecordType::A, None, via);
        assert!(!m.metadata.truncation, "{via:?}: no TC for two addresses");
        assert_eq!(
            ips(&m.answers),
            [ip("10.0.0.1"), ip("10.5.0.1")],
            "{via:?}: each address once"
        );
    }
    let (m, _) = ask(dns, "dup.service.consul", RecordType::SRV, None, Via::Tcp);
    assert_eq!(m.answers.len(), 203, "one SRV per endpoint");
    let mut owners: Vec<String> = m
        .additionals
        .iter()
        .filter(|r| r.record_type() == RecordType::A)
        .map(|r| r.name.to_string())
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            "0a000001.addr.dc1.consul.",
            "0a050001.addr.dc1.consul.",
            "n1.node.dc1.consul.",
        ],
        "one additional per distinct target"
    );
    // Over UDP the additionals of the SRVs that fit are there, once each.
    let (m, _) = ask(dns, "dup.service.consul", RecordType::SRV, None, Via::Udp);
    assert!(m.metadata.truncation, "203 SRVs do not fit 512 bytes");
    let mut udp_owners: Vec<String> = m.additionals.iter().map(|r| r.name.to_string()).collect();
    let all = udp_owners.len();
    udp_owners.sort();
    udp_owners.dedup();
    assert_eq!(
        udp_owners.len(),
        all,
        "no repeated additional: {udp_owners:?}"
    );
    assert!(!udp_owners.is_empty());
}

#[test]
fn large_answers_truncate_over_udp_and_are_complete_over_tcp() {
    let agent = Agent::start();
    let c = agent.client();
    let nodes: Vec<_> = (0..300)
        .map(|i| json!({"name": format!("big-{i}"), "address": format!("10.7.{}.{}", i / 250, i % 250 + 1)}))
        .collect();
    let mut endpoints: Vec<_> = (0..300)
        .map(|i| json!({"node": format!("big-{i}"), "service": "big", "id": format!("b{i}"), "port": 9000}))
        .collect();
    endpoints.extend((0..300).map(|i| {
        json!({"node": format!("big-{i}"), "service": "big6", "id": format!("v6-{i}"), "port": 9000,
               "address": format!("fd00::{:x}", i + 1)})
    }));
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"nodes": nodes, "endpoints": endpoints}).to_string(),
    );
    let dns = agent.dns;
    for (name, qtype) in [
        ("big.service.consul", RecordType::A),
        ("big6.service.consul", RecordType::AAAA),
        ("big.service.consul", RecordType::SRV),
    ] {
        for (edns, limit) in [(None, 512), (Some(1232), 1232), (Some(4096), 4096)] {
            let (m, size) = ask(dns, name, qtype, edns, Via::Udp);
            assert!(
                size <= limit,
                "{name} {qtype} {edns:?}: {size} bytes over {limit}"
            );
            assert!(
                m.metadata.truncation,
                "{name} {qtype} {edns:?}: TC must be set"
            );
            assert!(
                !m.answers.is_empty() && m.answers.len() < 300,
                "{name} {qtype} {edns:?}"
            );
            if qtype == RecordType::SRV {
                assert_eq!(
                    m.additionals
                        .iter()
                        .filter(|r| r.record_type() == RecordType::A)
                        .count(),
                    m.answers.len()
                );
            }
        }
        let (m, _) = ask(dns, name, qtype, None, Via::Tcp);
        assert!(!m.metadata.truncation, "{name} {qtype} over TCP");
        assert_eq!(
            m.answers.len(),
            300,
            "{name} {qtype}: TCP returns the full set"
        );
        if qtype == RecordType::SRV {
            assert_eq!(m.additionals.len(), 300);
        }
    }
    // A set that fits is never marked truncated.
    let (m, _) = ask(dns, "big-1.node.consul", RecordType::A, None, Via::Udp);
    assert!(!m.metadata.truncation);
}

#[test]
fn answers_are_shuffled() {
    let agent = Agent::start();
    register_web(&agent.client());
    let mut orders = std::collections::HashSet::new();
    for _ in 0..50 {
        let m = udp(agent.dns, "web.service.consul", RecordType::A);
        let order: Vec<String> = m.answers.iter().map(|r| format!("{:?}", r.data)).collect();
        orders.insert(order);
    }
    assert!(orders.len() > 1, "50 answers all came in the same order");
}

#[test]
fn drain_maintenance_and_ttl_expiry_leave_dns_at_once() {
    let agent = Agent::start();
    let c = agent.client();
    register_web(&c);
    let dns = agent.dns;
    // A write is acknowledged after its snapshot is published: no waiting needed.
    c.put_ok("/v1/switchyard/nodes/n2/drain", "");
    assert_eq!(
        ips(&udp(dns, "web.service.consul", RecordType::A).answers),
        [ip("10.0.0.1"), ip("10.9.0.3")]
    );
    c.delete("/v1/switchyard/nodes/n2/drain");
    assert_eq!(
        ips(&udp(dns, "web.service.consul", RecordType::A).answers).len(),
        3
    );

    c.put_ok("/v1/catalog/register", r#"{"Node":"n1","Address":"10.0.0.1","Check":{"CheckID":"_node_maintenance","Name":"m","Status":"critical"}}"#);
    assert_eq!(
        ips(&udp(dns, "web.service.consul", RecordType::A).answers),
        [ip("10.0.0.2"), ip("10.9.0.3")]
    );

    // A TTL check that passes, then expires.
    c.put_ok("/v1/agent/service/register", r#"{"Name":"pulse","Address":"10.5.5.5","Check":{"CheckID":"pulse-ttl","TTL":"400ms","Status":"passing"}}"#);
    assert_eq!(
        ips(&udp(dns, "pulse.service.consul", RecordType::A).answers),
        [ip("10.5.5.5")]
    );
    eventually(
        "the TTL to expire out of DNS",
        Duration::from_secs(10),
        || {
            let m = udp(dns, "pulse.service.consul", RecordType::A);
            m.answers.is_empty().then_some(())
        },
    );
}

#[test]
fn garbage_never_stops_the_server() {
    let agent = Agent::start();
    register_web(&agent.client());
    let dns = agent.dns;
    let good = query_bytes("web.service.consul", 1, Some(1232));
    let mut rng = fastrand_seed(11);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..3000 {
        let mut p = good.clone();
        match i % 3 {
            0 => p.truncate(rng(p.len())),
            1 => {
                for _ in 0..4 {
                    let at = rng(p.len());
                    p[at] = rng(256) as u8;
                }
            }
            _ => p = (0..rng(600)).map(|_| rng(256) as u8).collect(),
        }
        let _ = socket.send_to(&p, dns);
    }
    // Over TCP too: a truncated frame, then a connection that sends nothing.
    if let Ok(mut s) = TcpStream::connect(dns) {
        let _ = s.write_all(&[0, 200, 1, 2, 3]);
    }
    // Two questions are a format error, answered as such.
    let mut two = good.clone();
    two[5] = 2;
    let raw = exchange(dns, &two, Via::Udp).expect("FORMERR answer");
    assert_eq!(raw[3] & 0x0F, 1, "FORMERR");
    let m = udp(dns, "web.service.consul", RecordType::A);
    assert_eq!(m.answers.len(), 3, "still answering after garbage");
    let metrics = agent.client().get_ok("/metrics").body;
    assert!(
        metrics.contains("switchyard_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}"),
        "{metrics}"
    );
}

fn fastrand_seed(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |bound| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if bound == 0 {
            0
        } else {
            (state % bound as u64) as usize
        }
    }
}

#[test]
fn reverse_lookups_name_nodes_and_services() {
    let agent = Agent::start();
    register_web(&agent.client());
    let dns = agent.dns;
    // The first PTR query starts building the reverse index and waits for
    // it: it gets its answer, not SERVFAIL.
    let m = udp(dns, "1.0.0.10.in-addr.arpa", RecordType::PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    let names: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(names, ["n1.node.dc1.consul."]);
    let m = udp(dns, "3.0.9.10.in-addr.arpa", RecordType::PTR);
    let names: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(
        names,
        ["web.service.dc1.consul."],
        "an endpoint's own address names its service"
    );
    let m = udp(dns, "9.9.9.9.in-addr.arpa", RecordType::PTR);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "not ours: refused"
    );
    let m = udp(dns, "1.0.0.10.in-addr.arpa", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // Later changes reach the index within its refresh period.
    agent.client().put_ok(
        "/v1/switchyard/batch",
        r#"{"nodes":[{"name":"late","address":"10.0.0.99"}]}"#,
    );
    eventually(
        "a new node to be reverse-resolvable",
        Duration::from_secs(10),
        || {
            let m = udp(dns, "99.0.0.10.in-addr.arpa", RecordType::PTR);
            let names: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
            (names == ["late.node.dc1.consul."]).then_some(())
        },
    );
}

#[test]
fn any_over_udp_goes_to_tcp_and_one_client_is_rate_limited() {
    let (agent, _dir) = crate::proxy::agent_with("[dns]\nrate_limit = 20\n");
    let c = agent.client();
    register_web(&c);
    // One query (the limit counts every query from 127.0.0.1).
    assert!(!udp(agent.dns, "web.service.consul", RecordType::A)
        .answers
        .is_empty());
    // ANY over UDP: empty and truncated; over TCP: the records.
    let (any, _) = ask(
        agent.dns,
        "web.service.consul",
        RecordType::ANY,
        None,
        Via::Udp,
    );
    assert!(any.metadata.truncation, "ANY over UDP is sent to TCP");
    assert!(any.answers.is_empty());
    assert_eq!(any.metadata.response_code, ResponseCode::NoError);
    let (any, _) = ask(
        agent.dns,
        "web.service.consul",
        RecordType::ANY,
        None,
        Via::Tcp,
    );
    assert!(!any.answers.is_empty(), "ANY over TCP answers");

    // One client sending 200 queries at once gets about one second's worth.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let packet = query_bytes("web.service.consul", 1, None);
    for _ in 0..200 {
        socket.send_to(&packet, agent.dns).expect("send");
    }
    let mut answered = 0;
    let mut buf = [0u8; 4096];
    while socket.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    assert!(answered >= 1, "the first queries are answered");
    assert!(
        answered < 200,
        "the limit dropped some: {answered} answered"
    );
    let limited = c
        .metric("switchyard_dns_rate_limited_total")
        .expect("rate-limit metric");
    assert!(limited >= 1.0, "{limited}");
}

/// A service of 1,100 endpoints (views hold it in chunks): every record is
/// sent once across chunks, and a change anywhere in it shows at once.
#[test]
fn a_large_service_answers_each_record_once_and_follows_each_change() {
    let agent = Agent::start();
    let c = agent.client();
    let nodes: Vec<_> = (0..100)
        .map(|n| json!({"name": format!("n{n:03}"), "address": format!("10.8.0.{}", n + 1)}))
        .collect();
    let endpoints: Vec<_> = (0..1100)
        .map(|e| {
            json!({"node": format!("n{:03}", e / 11), "service": "big",
                   "id": format!("e{e:04}"), "port": 9000 + e})
        })
        .collect();
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"nodes": nodes, "endpoints": endpoints}).to_string(),
    );
    let dns = agent.dns;
    let node_ip = |n: usize| ip(&format!("10.8.0.{}", n + 1));
    let check = |expect_ips: &[IpAddr], srv: usize| {
        let (m, _) = ask(dns, "big.service.consul", RecordType::A, None, Via::Tcp);
        let got = ips(&m.answers);
        let mut want = expect_ips.to_vec();
        want.sort();
        assert_eq!(got, want, "each address once, across chunks");
        let (m, _) = ask(dns, "big.service.consul", RecordType::SRV, None, Via::Tcp);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), srv, "one SRV per endpoint");
        let mut owners: Vec<String> = m.additionals.iter().map(|r| r.name.to_string()).collect();
        let all = owners.len();
        owners.sort();
        owners.dedup();
        assert_eq!(owners.len(), all, "each SRV target's record once");
        assert_eq!(all, expect_ips.len(), "one additional per target");
    };
    let mut expect: Vec<IpAddr> = (0..100).map(node_ip).collect();
    check(&expect, 1100);

    // One endpoint leaves from the middle, a node drains, another endpoint
    // arrives with an address of its own.
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"deregister": [{"node": "n050", "id": "e0551"}]}).to_string(),
    );
    c.put_ok("/v1/switchyard/nodes/n070/drain", "");
    c.put_ok(
        "/v1/switchyard/batch",
        &json!({"endpoints": [{"node": "n020", "service": "big", "id": "own",
            "address": "10.9.9.9", "port": 7000}]})
        .to_string(),
    );
    expect.retain(|&a| a != node_ip(70));
    expect.push(ip("10.9.9.9"));
    check(&expect, 1100 - 1 - 11 + 1);
}
