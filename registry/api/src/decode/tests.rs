//! Bodies as python-consul, py-consul and the Go client send them.

use std::time::Duration;
use switchyard_catalog::model::CheckKind;

use super::*;

fn service(body: &str) -> Result<(Endpoint, Vec<NewCheck>), String> {
    let node: Name = "n1".into();
    let def: ServiceIn = decode_body(body.as_bytes())?;
    def.into_endpoint(&node, false)
}

#[test]
fn python_lowercase_and_go_camelcase_decode_alike() {
    let python = r#"{"name":"web","id":"web-1","address":"10.0.0.5","port":8080,"tags":["v1"],
        "meta":{"Team":"Core"},"check":{"ttl":"15s","DeregisterCriticalServiceAfter":"1m"}}"#;
    let go = r#"{"Name":"web","ID":"web-1","Address":"10.0.0.5","Port":8080,"Tags":["v1"],
        "Meta":{"Team":"Core"},"Check":{"TTL":"15s","DeregisterCriticalServiceAfter":"1m"}}"#;
    let snake = r#"{"Name":"web","ID":"web-1","Address":"10.0.0.5","Port":8080,"Tags":["v1"],
        "Meta":{"Team":"Core"},"check":{"ttl":"15s","deregister_critical_service_after":"1m"}}"#;
    let a = service(python).expect("python");
    for other in [go, snake] {
        let b = service(other).expect("decodes");
        assert_eq!(a.0, b.0);
        assert_eq!(a.1[0].check, b.1[0].check);
    }
    let (endpoint, checks) = a;
    assert_eq!(
        endpoint.meta.get("Team").map(String::as_str),
        Some("Core"),
        "meta keys keep their case"
    );
    assert_eq!(checks[0].check.id.as_ref(), "service:web-1");
    assert_eq!(checks[0].check.kind, CheckKind::Ttl);
    assert_eq!(checks[0].check.status, Status::Critical);
    assert!(!checks[0].status_given);
    assert_eq!(
        checks[0].check.definition.ttl,
        Some(Duration::from_secs(15))
    );
    assert_eq!(
        checks[0].check.definition.deregister_critical_after,
        Some(Duration::from_secs(60))
    );
}

#[test]
fn several_checks_get_numbered_ids_and_explicit_status_is_kept() {
    let body = r#"{"Name":"api","Checks":[{"TTL":"5s","Status":"passing"},
        {"HTTP":"http://127.0.0.1:9/health","Interval":"10s","Header":{"X-Token":["a"]}},
        {"CheckID":"custom","TCP":"127.0.0.1:9","Interval":1000000000}]}"#;
    let (endpoint, checks) = service(body).expect("decodes");
    assert_eq!(endpoint.id.as_ref(), "api", "id defaults to the name");
    let ids: Vec<&str> = checks.iter().map(|c| c.check.id.as_ref()).collect();
    assert_eq!(ids, ["service:api:1", "service:api:2", "custom"]);
    assert!(checks[0].status_given);
    assert_eq!(checks[0].check.status, Status::Passing);
    assert_eq!(checks[1].check.kind, CheckKind::Http);
    assert_eq!(checks[1].check.definition.header["X-Token"], ["a"]);
    assert_eq!(
        checks[2].check.definition.interval,
        Some(Duration::from_secs(1)),
        "nanoseconds"
    );
    assert_eq!(checks[1].check.name, "Service 'api' check");
}

#[test]
fn bad_bodies_get_clear_errors() {
    let cases = [
        ("", "empty body"),
        ("{not json", "Request decode failed"),
        // The field at fault is named, in the folded key spelling.
        (
            r#"{"Name":"web","Port":"eighty"}"#,
            "Request decode failed: port: ",
        ),
        (
            r#"{"Name":"web","Port":70000}"#,
            "Request decode failed: port: ",
        ),
        (
            r#"{"Name":"web","Tags":"v1"}"#,
            "Request decode failed: tags: ",
        ),
        (
            r#"{"Name":"web","Meta":{"k":1}}"#,
            "Request decode failed: meta.k: ",
        ),
        (r#"{"Port":80}"#, "Missing service name"),
        (r#"{"Name":""}"#, "Missing service name"),
        (
            r#"{"Name":"web","Address":"0.0.0.0"}"#,
            "Invalid service address",
        ),
        (
            r#"{"Name":"web","Address":"::"}"#,
            "Invalid service address",
        ),
        (
            r#"{"Name":"web","Address":"bad host!"}"#,
            "Invalid service address",
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"soon"}}"#,
            "Request decode failed: check.ttl: ",
        ),
        (
            r#"{"Name":"web","Check":{"HTTP":"http://x/"}}"#,
            "need an interval",
        ),
        (
            r#"{"Name":"web","Check":{"TTL":"5s","Status":"fine"}}"#,
            "Bad check status",
        ),
        (
            r#"{"Name":"web","Check":{"Notes":"no kind"}}"#,
            "Invalid check",
        ),
        (r#"[1,2]"#, "Request decode failed"),
    ];
    for (body, want) in cases {
        let err = service(body).expect_err(body);
        assert!(
            err.contains(want),
            "{body}: {err:?} should mention {want:?}"
        );
    }
}

#[test]
fn unknown_consul_fields_are_ignored_but_native_ones_refused() {
    let body = r#"{"Name":"web","Connect":{"Native":true},"Proxy":null,"Namespace":"default"}"#;
    assert!(service(body).is_ok());
    let native = r#"{"endpoints":[{"node":"n1","service":"web","surprise":1}]}"#;
    let err = decode_body::<BatchIn>(native.as_bytes()).expect_err("unknown field");
    assert!(err.contains("surprise"), "{err}");
}

#[test]
fn native_batch_decodes() {
    let body = r#"{"nodes":[{"name":"n1","address":"10.0.0.1","meta":{"Rack":"r1"}}],
        "endpoints":[{"node":"n1","service":"web","id":"w1","port":80,"checks":[{"ttl":"10s"}]}],
        "deregister":[{"node":"n1","id":"old"}],"deregister_nodes":["n9"]}"#;
    let batch: BatchIn = decode_body(body.as_bytes()).expect("decodes");
    assert_eq!(batch.nodes[0].meta["Rack"], "r1");
    assert_eq!(batch.deregister_nodes, ["n9"]);
    let mut endpoints = batch.endpoints;
    let (endpoint, checks) = endpoints.remove(0).into_parts().expect("valid");
    assert_eq!(endpoint.id.as_ref(), "w1");
    assert_eq!(checks[0].check.id.as_ref(), "service:w1");
}

#[test]
fn node_addresses_and_ids_are_checked() {
    let ok = node_from("n1", "10.0.0.1", None, BTreeMap::new(), BTreeMap::new()).expect("ok");
    assert_eq!(ok.id, node_uuid("n1"));
    assert!(node_from("n1", "", None, BTreeMap::new(), BTreeMap::new()).is_err());
    assert!(node_from("n1", "0.0.0.0", None, BTreeMap::new(), BTreeMap::new()).is_err());
    assert!(node_from(
        "n1",
        "10.0.0.1",
        Some("nope".into()),
        BTreeMap::new(),
        BTreeMap::new()
    )
    .is_err());
    assert!(node_from("", "10.0.0.1", None, BTreeMap::new(), BTreeMap::new()).is_err());
}
