use super::*;
use crate::config::RouteConfig;

fn route(host: Option<&str>, prefix: &str, service: &str) -> RouteConfig {
    RouteConfig {
        host: host.map(str::to_string),
        path_prefix: prefix.to_string(),
        ..RouteConfig::to_service(service)
    }
}

fn find<'a>(table: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
    table.find(host, path.as_bytes()).map(|r| &*r.service)
}

#[test]
fn exact_then_suffix_then_any_and_longest_prefix() {
    let config = Config {
        routes: vec![
            route(Some("api.example.com"), "/", "api"),
            route(Some("api.example.com"), "/v2/", "api-v2"),
            route(Some("*.example.com"), "/", "wild"),
            route(Some("*.eu.example.com"), "/", "eu"),
            route(None, "/static/", "static"),
        ],
        ..Config::default()
    };
    let table = RouteTable::compile(&config, std::iter::empty());
    assert_eq!(find(&table, "api.example.com", "/v2/users"), Some("api-v2"));
    assert_eq!(find(&table, "api.example.com", "/v1/users"), Some("api"));
    assert_eq!(find(&table, "www.example.com", "/"), Some("wild"));
    assert_eq!(find(&table, "a.eu.example.com", "/"), Some("eu"));
    assert_eq!(
        find(&table, "example.com", "/"),
        None,
        "a suffix needs a label before it"
    );
    assert_eq!(find(&table, "other.org", "/static/x.css"), Some("static"));
    assert_eq!(find(&table, "other.org", "/"), None);
}

#[test]
fn tag_routes_join_config_routes_and_lose_ties() {
    let config = Config {
        routes: vec![route(Some("shop.test"), "/", "configured")],
        ..Config::default()
    };
    let tags = [
        "switchyard.http.host=shop.test".to_string(),
        "switchyard.http.host=*.shop.test".to_string(),
        "v1".to_string(),
    ];
    let mut sorted = tags.to_vec();
    sorted.sort();
    let from_tags = TagRoute::from_tags(sorted.iter().map(String::as_str)).expect("route tags");
    let only_path = TagRoute::from_tags(["switchyard.http.path=/orders"]).expect("path");
    let table = RouteTable::compile(
        &config,
        [
            (Name::from("tagged"), &from_tags),
            (Name::from("orders"), &only_path),
        ]
        .into_iter(),
    );
    assert_eq!(find(&table, "shop.test", "/"), Some("configured"));
    assert_eq!(find(&table, "eu.shop.test", "/"), Some("tagged"));
    assert_eq!(find(&table, "anything", "/orders/7"), Some("orders"));
    assert_eq!(TagRoute::from_tags(["v1"]), None);
}

#[test]
fn host_patterns_are_checked() {
    assert_eq!(HostPattern::parse("*"), Ok(HostPattern::Any));
    assert_eq!(
        HostPattern::parse("API.example.com"),
        Ok(HostPattern::Exact("api.example.com".into()))
    );
    assert_eq!(
        HostPattern::parse("*.example.com"),
        Ok(HostPattern::Suffix(".example.com".into()))
    );
    for bad in ["http://a", "a:80", "a..b", "*.", "a b"] {
        assert!(HostPattern::parse(bad).is_err(), "{bad}");
    }
}
