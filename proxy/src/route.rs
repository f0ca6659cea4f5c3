//! The route table: host (exact, `*.suffix`, any) and path prefix → service,
//! compiled from the config and from registry tags, swapped atomically.
//!
//! Lookup order: exact host, then the longest matching suffix, then routes for
//! any host; within each, the longest path prefix. A request that matches
//! nothing is answered 404 and sent nowhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_catalog::Name;

use crate::config::{BalancerKind, Config, GrpcRetryOn, HashOn, HostPattern, UpstreamProtocol};

/// Tag that publishes a service under a host name.
pub const HOST_TAG: &str = "switchyard.http.host=";
/// Tag that publishes a service under a path prefix.
pub const PATH_TAG: &str = "switchyard.http.path=";
/// The tag that makes a service's tag route a gRPC-Web one (CORS answered).
pub(crate) const GRPC_WEB_TAG: &str = "switchyard.http.grpc_web=true";
/// The tag that sends every request of a service's tag route over h2c.
pub(crate) const H2C_TAG: &str = "switchyard.http.upstream=h2c";
/// HTTP/2 over TLS to the endpoints (SNI and verified name: the service's).
pub(crate) const H2_TAG: &str = "switchyard.http.upstream=h2";
/// TLS to the endpoints (HTTP/1.1, or HTTP/2 for gRPC, by ALPN).
pub(crate) const UPSTREAM_TLS_TAG: &str = "switchyard.http.upstream_tls=true";

/// What every routing tag starts with.
pub(crate) const TAG_PREFIX: &str = "switchyard.http.";

/// The route a service publishes through its tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TagRoute {
    hosts: Vec<String>,
    path: String,
    /// `switchyard.http.grpc_web=true`.
    grpc_web: bool,
    /// `switchyard.http.upstream=h2c`.
    h2c: bool,
    /// `switchyard.http.upstream=h2`.
    h2: bool,
    /// `switchyard.http.upstream_tls=true` (or `h2`).
    tls: bool,
}

impl TagRoute {
    /// Reads `switchyard.http.host=` / `switchyard.http.path=` from a view's
    /// sorted distinct tags (from `TAG_PREFIX` on, or all of them). `None`
    /// when the service publishes no route.
    pub(crate) fn from_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Option<TagRoute> {
        let mut hosts = Vec::new();
        let mut path = None;
        let mut grpc_web = false;
        let mut h2c = false;
        let mut h2 = false;
        let mut tls = false;
        let tags = tags.into_iter().skip_while(|t| *t < TAG_PREFIX);
        for tag in tags.take_while(|t| t.starts_with(TAG_PREFIX)) {
            if let Some(host) = tag.strip_prefix(HOST_TAG) {
                hosts.push(host.to_string());
            } else if tag == GRPC_WEB_TAG {
                grpc_web = true;
            } else if tag == H2C_TAG {
                h2c = true;
            } else if tag == H2_TAG {
                h2 = true;
                tls = true;
            } else if tag == UPSTREAM_TLS_TAG {
                tls = true;
            } else if let Some(p) = tag.strip_prefix(PATH_TAG) {
                if p.starts_with('/') && path.is_none() {
                    path = Some(p.to_string());
                }
            }
        }
        if hosts.is_empty() && path.is_none() {
            return None;
        }
        Some(TagRoute {
            hosts,
            path: path.unwrap_or_else(|| "/".to_string()),
            grpc_web,
            // TLS wins over cleartext HTTP/2.
            h2c: h2c && !tls,
            h2,
            tls,
        })
    }
}

/// Where a matched request goes and how.
#[derive(Debug)]
pub(crate) struct Route {
    /// What the access log calls it: `host/prefix` of a config route (`*`
    /// for any host), `tags:SERVICE` for a route from a service's tags.
    pub(crate) name: Box<str>,
    pub(crate) service: Name,
    pub(crate) balancer: BalancerKind,
    pub(crate) hash_on: HashOn,
    /// Slow start of newly routable endpoints (ns; 0 = off).
    pub(crate) slow_start_ns: u64,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) retries: u32,
    /// gRPC codes a trailers-only answer is retried on, a bit per code.
    pub(crate) retry_grpc_on: u32,
    /// Largest request body, in bytes; 0 = no limit.
    pub(crate) max_body_bytes: u64,
    /// Answers CORS preflights for gRPC-Web and marks answers for the origin.
    pub(crate) grpc_web: bool,
    /// Every request goes to the endpoints over HTTP/2 (h2c), not only gRPC.
    pub(crate) h2c: bool,
    /// TLS to the endpoints.
    pub(crate) tls: Option<Arc<crate::upstream_tls::UpstreamTls>>,
    /// Every request goes over HTTP/2 on that TLS (ALPN `h2`).
    pub(crate) h2: bool,
    /// Access by address and a fixed answer (none for most routes).
    pub(crate) policy: Option<crate::policy::Policy>,
    /// Path and Host as the endpoints see them (none for most routes).
    pub(crate) rewrite: Option<crate::policy::Rewrite>,
    /// Its rate limit (kept across rebuilds of the table while unchanged).
    pub(crate) limit: Option<Arc<crate::limit::RateLimiter>>,
    /// Its split among subsets of the service's endpoints.
    pub(crate) split: Option<Arc<crate::split::Split>>,
    /// How its responses are compressed.
    pub(crate) compress: Option<crate::compress::Compress>,
}

impl Route {
    /// How this route chooses an endpoint, `key` the request's hash key.
    pub(crate) fn choice(&self, key: Option<u64>) -> crate::balance::Choice<'_> {
        crate::balance::Choice {
            kind: self.balancer,
            key,
            slow_start_ns: self.slow_start_ns,
            subset: None,
        }
    }

    /// Requests of this route go through hyper's side (HTTP/2 or TLS to
    /// the endpoints).
    pub(crate) fn via_hyper(&self) -> bool {
        self.h2c || self.tls.is_some()
    }
}

type Prefixes = Vec<(Box<[u8]>, Arc<Route>)>;

#[derive(Default)]
pub(crate) struct RouteTable {
    exact: HashMap<Box<str>, Prefixes>,
    /// Longest suffix first.
    suffix: Vec<(Box<str>, Prefixes)>,
    any: Prefixes,
    /// Tag routes' TLS setups by service, kept by the next compile (a
    /// setup's clients and pools live as long as it does).
    tag_tls: HashMap<Name, Arc<crate::upstream_tls::UpstreamTls>>,
    /// Rate limiters by route name, kept by the next compile while the
    /// route's limit is the same (its buckets live on).
    limiters: HashMap<Box<str>, Arc<crate::limit::RateLimiter>>,
    /// Split routes' splits, by route name (for their metrics).
    splits: Vec<(Box<str>, Arc<crate::split::Split>)>,
    /// Every route added, in precedence order.
    listing: Vec<Listed>,
}

/// Where a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `/v1/switchyard/routes`.
    Api,
    /// `[[http.routes]]`.
    Config,
    /// A service's `switchyard.http.*` tags.
    Tags,
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Config => "config",
            Source::Tags => "tags",
        }
    }
}

/// One route as `switchyard routes` lists it.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub(crate) name: Box<str>,
    pub(crate) source: Source,
    pub(crate) host: Box<str>,
    pub(crate) path_prefix: Box<str>,
    pub(crate) service: Name,
    /// The route that holds the same host and prefix ahead of this one.
    pub(crate) shadowed_by: Option<Box<str>>,
}

impl RouteTable {
    /// Config routes first, then tag routes: on an identical host and prefix
    /// the config wins.
    pub(crate) fn compile<'a>(
        config: &Config,
        tags: impl Iterator<Item = (Name, &'a TagRoute)>,
    ) -> RouteTable {
        RouteTable::compile_after(config, &[], tags, &RouteTable::default())
    }

    /// Routes managed through the API first, then the config's, then tag
    /// routes: on an identical host and prefix the first wins. Keeps
    /// `previous`'s TLS setups of tag routes and its rate limiters.
    pub(crate) fn compile_after<'a>(
        config: &Config,
        api: &[crate::api_routes::ApiRoute],
        tags: impl Iterator<Item = (Name, &'a TagRoute)>,
        previous: &RouteTable,
    ) -> RouteTable {
        let mut table = RouteTable::default();
        for route in api {
            table.add_config(
                route.name.clone(),
                Source::Api,
                &route.route,
                config,
                previous,
            );
        }
        for route in &config.routes {
            let name = format!(
                "{}{}",
                route.host.as_deref().unwrap_or("*"),
                route.path_prefix
            )
            .into_boxed_str();
            table.add_config(name, Source::Config, route, config, previous);
        }
        let mut tags: Vec<_> = tags.collect();
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        for (service, tag) in tags {
            let tls = match tag.tls {
                false => None,
                true if previous.tag_tls.contains_key(&service) => {
                    previous.tag_tls.get(&service).cloned()
                }
                true => {
                    let source = crate::upstream_tls::TlsSource {
                        server_name: &service,
                        ca_file: None,
                        client: None,
                    };
                    match crate::upstream_tls::UpstreamTls::build(source) {
                        Ok(tls) => Some(Arc::new(tls)),
                        Err(e) => {
                            tracing::warn!(%service, error = %e, "ignoring the route tags of a service whose TLS cannot be set up");
                            continue;
                        }
                    }
                }
            };
            if let Some(tls) = &tls {
                table.tag_tls.insert(service.clone(), tls.clone());
            }
            let target = Arc::new(Route {
                name: format!("tags:{service}").into_boxed_str(),
                service,
                balancer: config.balancer,
                hash_on: HashOn::ClientIp,
                slow_start_ns: 0,
                connect_timeout: config.connect_timeout,
                response_timeout: config.response_timeout,
                retries: config.retries,
                retry_grpc_on: GrpcRetryOn::mask(&config.retry_grpc_on),
                max_body_bytes: config.max_body_bytes,
                grpc_web: tag.grpc_web,
                h2c: tag.h2c,
                tls,
                h2: tag.h2,
                policy: None,
                rewrite: None,
                limit: None,
                split: None,
                compress: None,
            });
            if tag.hosts.is_empty() {
                table.add(HostPattern::Any, &tag.path, target.clone(), Source::Tags);
            }
            for host in &tag.hosts {
                match HostPattern::parse(host) {
                    Ok(pattern) => table.add(pattern, &tag.path, target.clone(), Source::Tags),
                    Err(e) => {
                        tracing::warn!(service = %target.service, error = %e, "ignoring route tag")
                    }
                }
            }
        }
        for prefixes in table.exact.values_mut() {
            sort(prefixes);
        }
        for (_, prefixes) in &mut table.suffix {
            sort(prefixes);
        }
        table
            .suffix
            .sort_by_key(|entry| std::cmp::Reverse(entry.0.len()));
        sort(&mut table.any);
        table
    }

    /// Adds a route of the config or the API (validated already).
    fn add_config(
        &mut self,
        name: Box<str>,
        source: Source,
        route: &crate::config::RouteConfig,
        config: &Config,
        previous: &RouteTable,
    ) {
        let limit = route.rate_limit.as_ref().and_then(|wanted| {
            let kept = previous
                .limiters
                .get(&name)
                .filter(|l| l.config == *wanted)
                .cloned();
            let limit = kept.or_else(|| {
                crate::limit::RateLimiter::from_config(wanted)
                    .ok()
                    .map(Arc::new)
            })?;
            self.limiters.insert(name.clone(), limit.clone());
            Some(limit)
        });
        let split = crate::split::Split::from_config(&route.split, &route.matches)
            .ok()
            .flatten()
            .map(Arc::new);
        if let Some(split) = &split {
            self.splits.push((name.clone(), split.clone()));
        }
        let target = Arc::new(Route {
            name,
            service: Name::from(route.service.as_str()),
            balancer: route.balancer.unwrap_or(config.balancer),
            hash_on: route.hash_on.clone(),
            slow_start_ns: route.slow_start.map_or(0, crate::stats::nanos),
            connect_timeout: route.connect_timeout.unwrap_or(config.connect_timeout),
            response_timeout: route.response_timeout.unwrap_or(config.response_timeout),
            retries: route.retries.unwrap_or(config.retries),
            retry_grpc_on: GrpcRetryOn::mask(
                route
                    .retry_grpc_on
                    .as_deref()
                    .unwrap_or(&config.retry_grpc_on),
            ),
            max_body_bytes: route.max_body_bytes.unwrap_or(config.max_body_bytes),
            grpc_web: route.grpc_web,
            h2c: route.upstream_protocol == UpstreamProtocol::H2c,
            // Built when the route was validated.
            tls: route.tls().ok().flatten(),
            h2: route.upstream_protocol == UpstreamProtocol::H2,
            policy: crate::policy::Policy::from_config(&route.keys())
                .ok()
                .flatten(),
            rewrite: crate::policy::Rewrite::from_config(&route.keys())
                .ok()
                .flatten(),
            limit,
            split,
            compress: route.compression().ok().flatten(),
        });
        let host =
            HostPattern::parse(route.host.as_deref().unwrap_or("*")).unwrap_or(HostPattern::Any);
        self.add(host, &route.path_prefix, target, source);
    }

    /// Every route, where it came from, and the route that takes its
    /// requests instead when another holds its host and prefix.
    pub(crate) fn listing(&self) -> &[Listed] {
        &self.listing
    }

    /// Every split route's split, by route name.
    pub(crate) fn splits(&self) -> impl Iterator<Item = (&str, &Arc<crate::split::Split>)> {
        self.splits.iter().map(|(name, s)| (&**name, s))
    }

    /// Every route's rate limiter, by route name.
    pub(crate) fn limiters(&self) -> impl Iterator<Item = (&str, &Arc<crate::limit::RateLimiter>)> {
        self.limiters.iter().map(|(name, l)| (&**name, l))
    }

    fn add(&mut self, host: HostPattern, prefix: &str, route: Arc<Route>, source: Source) {
        let host_text = match &host {
            HostPattern::Any => "*".to_string(),
            HostPattern::Exact(name) => name.clone(),
            HostPattern::Suffix(suffix) => format!("*{suffix}"),
        };
        let mut listed = Listed {
            name: route.name.clone(),
            source,
            host: host_text.into_boxed_str(),
            path_prefix: prefix.into(),
            service: route.service.clone(),
            shadowed_by: None,
        };
        let entry = (Box::from(prefix.as_bytes()), route);
        let list = match host {
            HostPattern::Any => &mut self.any,
            HostPattern::Exact(name) => self.exact.entry(name.into_boxed_str()).or_default(),
            HostPattern::Suffix(suffix) => {
                match self.suffix.iter().position(|(s, _)| **s == *suffix) {
                    Some(i) => &mut self.suffix[i].1,
                    None => {
                        self.suffix.push((suffix.into_boxed_str(), Vec::new()));
                        let last = self.suffix.len() - 1;
                        &mut self.suffix[last].1
                    }
                }
            }
        };
        // The first route added for an identical prefix wins.
        match list.iter().find(|(p, _)| *p == entry.0) {
            Some((_, winner)) => listed.shadowed_by = Some(winner.name.clone()),
            None => list.push(entry),
        }
        self.listing.push(listed);
    }

    /// `host` is already lowercase and without its port.
    pub(crate) fn find(&self, host: &str, path: &[u8]) -> Option<&Arc<Route>> {
        if let Some(found) = self.exact.get(host).and_then(|p| longest(p, path)) {
            return Some(found);
        }
        for (suffix, prefixes) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(&**suffix) {
                if let Some(found) = longest(prefixes, path) {
                    return Some(found);
                }
            }
        }
        longest(&self.any, path)
    }
}

fn sort(prefixes: &mut Prefixes) {
    prefixes.sort_by_key(|entry| std::cmp::Reverse(entry.0.len()));
}

fn longest<'a>(prefixes: &'a Prefixes, path: &[u8]) -> Option<&'a Arc<Route>> {
    prefixes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map(|(_, route)| route)
}

#[cfg(test)]
mod tests;
