//! Routes managed through `/v1/switchyard/routes/<name>`: the fields of a
//! `[[http.routes]]` entry as JSON, kept in the catalog's KV store under
//! `ROUTES_PREFIX` (durable, and shared by every agent of a cluster). The
//! writer tells the proxy when keys there change (`ProxyDecorator::
//! kv_changed`), before the write is acknowledged, so a route is live on
//! the next request after the acknowledgment. On an identical host and path
//! prefix an API route wins over a config route, which wins over a tag route.

use std::sync::Arc;

use switchyard_catalog::kv::{Kv, ROUTES_PREFIX};

use crate::config::{Config, RouteConfig};

/// One route of the API, as the proxy compiles it.
#[derive(Clone, Debug)]
pub(crate) struct ApiRoute {
    pub(crate) name: Box<str>,
    pub(crate) route: Arc<RouteConfig>,
}

/// The longest route name.
const MAX_NAME: usize = 128;

/// Checks a route name: letters, digits, `.`, `_` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "route name {name:?}: 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

/// Checks a route as a client sends it (the fields of `[[http.routes]]`
/// in JSON) and returns it as it is stored. An error names the field.
pub fn check_route(name: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    check_name(name)?;
    let route = parse(body)?;
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the route is not JSON: {e}"))?;
    drop(route);
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// A route's JSON, parsed and validated as a config route is.
fn parse(body: &[u8]) -> Result<RouteConfig, String> {
    let mut decoder = serde_json::Deserializer::from_slice(body);
    let route: RouteConfig = serde_path_to_error::deserialize(&mut decoder).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." | "" => e.inner().to_string(),
            _ => format!("{path}: {}", e.inner()),
        }
    })?;
    decoder
        .end()
        .map_err(|e| format!("the route is not one JSON object: {e}"))?;
    let config = Config {
        routes: vec![route],
        ..Config::default()
    };
    config.validate().map_err(|e| {
        e.replacen("http.routes[0].", "", 1)
            .replacen("http.routes[0]: ", "", 1)
    })?;
    config
        .routes
        .into_iter()
        .next()
        .ok_or_else(|| "no route".to_string())
}

/// Every route stored under `ROUTES_PREFIX`, by name. One that no longer
/// passes the checks (written by an older agent, or a CA file gone from
/// this machine) is left out, with a warning.
pub(crate) fn stored(kv: &Kv) -> Vec<ApiRoute> {
    kv.under(ROUTES_PREFIX)
        .filter_map(|entry| {
            let name = entry.key.strip_prefix(ROUTES_PREFIX)?;
            if check_name(name).is_err() {
                tracing::warn!(key = %entry.key, "ignoring a stored route with a bad name");
                return None;
            }
            match parse(&entry.value) {
                Ok(route) => Some(ApiRoute {
                    name: name.into(),
                    route: Arc::new(route),
                }),
                Err(e) => {
                    tracing::warn!(route = name, error = %e, "ignoring a stored route this agent cannot use");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_checked_as_a_config_route_and_errors_name_the_field() {
        let ok = check_route(
            "web-v2",
            br#"{"host": "a.test", "service": "web", "split": [{"tag": "v1", "weight": 1}]}"#,
        )
        .expect("valid");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&ok).expect("json")["service"],
            "web"
        );
        for (name, body, says) in [
            ("a/b", r#"{"service": "web"}"#, "route name"),
            ("", r#"{"service": "web"}"#, "route name"),
            ("ok", r#"{"host": "a.test"}"#, "missing field `service`"),
            (
                "ok",
                r#"{"service": "web", "colour": 1}"#,
                "unknown field `colour`",
            ),
            (
                "ok",
                r#"{"service": "web", "retries": "x"}"#,
                "retries: invalid type",
            ),
            (
                "ok",
                r#"{"service": "web", "split": [{"tag": "v1", "weight": "a"}]}"#,
                "split[0].weight",
            ),
            (
                "ok",
                r#"{"service": "web", "allow": ["10.0.0.0/40"]}"#,
                "allow:",
            ),
            (
                "ok",
                r#"{"service": "web", "path_prefix": "x"}"#,
                "path_prefix",
            ),
            (
                "ok",
                r#"{"service": "web", "rate_limit": {"rate": "fast"}}"#,
                "rate_limit.rate",
            ),
            ("ok", r#"{"service": "web"} {}"#, "one JSON object"),
            ("ok", r#"not json"#, "expected"),
        ] {
            let error = check_route(name, body.as_bytes()).expect_err(body);
            assert!(error.contains(says), "{body}: {error}");
        }
    }
}
