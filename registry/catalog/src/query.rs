//! Prepared queries (Consul's `/v1/query`): the stored definition, its
//! template, how a name finds its query, and which instances an execution
//! selects. Shared by the API (`execute`, `explain`) and DNS
//! (`<name>.query.consul`), so both answer alike.
//!
//! A template (`Template.Type = "name_prefix_match"`) answers every name its
//! `Name` is the longest prefix of; each string of its `Service` is rendered
//! with `${name.full}`, `${name.prefix}`, `${name.suffix}`, `${match(N)}`
//! (a group of `Template.Regexp` matched on the full name) and
//! `${agent.segment}` (always empty). A template is compiled once, when it
//! is written: an execution renders, it never parses.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::OrdMap;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::elsewhere::Failover;
use crate::model::{Name, Status};
use crate::snapshot::{Instance, Snapshot};
use crate::view::ServiceView;

/// The one template type Consul has.
pub const NAME_PREFIX_MATCH: &str = "name_prefix_match";

/// A prepared query as stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedQuery {
    pub id: String,
    pub name: String,
    pub session: String,
    pub token: String,
    pub template: Option<QueryTemplate>,
    pub service: QueryService,
    /// `DNS.TTL`: a Go duration, or empty for the service's TTL.
    pub dns_ttl: String,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryTemplate {
    /// `Type`: only `name_prefix_match`.
    pub kind: String,
    pub regexp: String,
    pub remove_empty_tags: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryService {
    pub service: String,
    pub failover: QueryFailover,
    pub ignore_check_ids: Vec<String>,
    pub only_passing: bool,
    pub near: String,
    /// Tags every instance must have; `!tag`: must not have.
    pub tags: Vec<String>,
    pub node_meta: BTreeMap<String, String>,
    pub service_meta: BTreeMap<String, String>,
    pub connect: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryFailover {
    /// Try this many other datacenters, nearest (by round trip) first.
    pub nearest_n: u32,
    /// Then these, in order (those not tried already).
    pub datacenters: Vec<String>,
}

/// A stored query with its template compiled.
#[derive(Debug)]
pub struct Query {
    pub def: Arc<PreparedQuery>,
    regex: Option<Regex>,
}

impl Query {
    /// Checks and compiles a definition: a template's type, regular
    /// expression and every `${…}` in its strings. The error reads like
    /// Consul's (`failed compiling template: …`).
    pub fn compile(def: PreparedQuery) -> Result<Query, String> {
        let regex = match &def.template {
            None => None,
            Some(t) => {
                if t.kind != NAME_PREFIX_MATCH {
                    return Err(format!(
                        "failed compiling template: Bad Template.Type '{}'",
                        t.kind
                    ));
                }
                let regex = match t.regexp.as_str() {
                    "" => None,
                    re => Some(
                        Regex::new(re)
                            .map_err(|e| format!("failed compiling template: Bad Regexp: {e}"))?,
                    ),
                };
                let mut bad = None;
                def.service.each_string(|s| {
                    if let Err(e) = interpolate(s, &Vars::default()) {
                        bad.get_or_insert(e);
                    }
                });
                if let Some(e) = bad {
                    return Err(format!("failed compiling template: {e}"));
                }
                regex
            }
        };
        Ok(Query {
            def: Arc::new(def),
            regex,
        })
    }

    pub fn is_template(&self) -> bool {
        self.def.template.is_some()
    }

    /// The definition as executed for `name`: a template rendered with
    /// it, a static query as it is.
    pub fn render(&self, name: &str) -> PreparedQuery {
        let mut def = (*self.def).clone();
        let Some(template) = &self.def.template else {
            return def;
        };
        let prefix = &self.def.name;
        let suffix = name.get(prefix.len()..).unwrap_or("");
        let groups: Vec<String> = match self.regex.as_ref().and_then(|re| re.captures(name)) {
            Some(caps) => caps
                .iter()
                .map(|m| m.map_or_else(String::new, |m| m.as_str().to_string()))
                .collect(),
            None => Vec::new(),
        };
        let vars = Vars {
            full: name,
            prefix,
            suffix,
            groups: &groups,
        };
        def.service.each_string_mut(|s| {
            // Compiled at write time: every expression is known.
            if let Ok(out) = interpolate(s, &vars) {
                *s = out;
            }
        });
        if template.remove_empty_tags {
            def.service.tags.retain(|t| !t.is_empty());
        }
        def
    }
}

impl QueryService {
    fn each_string(&self, mut f: impl FnMut(&str)) {
        f(&self.service);
        f(&self.near);
        self.failover.datacenters.iter().for_each(|s| f(s));
        self.ignore_check_ids.iter().for_each(|s| f(s));
        self.tags.iter().for_each(|s| f(s));
        self.node_meta.values().for_each(|s| f(s));
        self.service_meta.values().for_each(|s| f(s));
    }

    fn each_string_mut(&mut self, mut f: impl FnMut(&mut String)) {
        f(&mut self.service);
        f(&mut self.near);
        self.failover.datacenters.iter_mut().for_each(&mut f);
        self.ignore_check_ids.iter_mut().for_each(&mut f);
        self.tags.iter_mut().for_each(&mut f);
        self.node_meta.values_mut().for_each(&mut f);
        self.service_meta.values_mut().for_each(&mut f);
    }

    /// The service's view in `snap`: by its name, else in any case (copies
    /// of other datacenters hold names in lower case).
    pub fn view<'a>(&self, snap: &'a Snapshot) -> Option<&'a Arc<ServiceView>> {
        snap.service(&self.service)
            .or_else(|| snap.service_ci(&self.service.to_ascii_lowercase()))
    }

    /// The instances of `view` an execution returns, in catalog order.
    pub fn select<'a>(&self, view: Option<&'a Arc<ServiceView>>) -> Vec<&'a Instance> {
        view.map_or_else(Vec::new, |v| {
            v.instances().filter(|i| self.admits(i)).collect()
        })
    }

    /// The datacenters an empty answer fails over to, in order: the
    /// `NearestN` nearest others, then those of `Datacenters` not among
    /// them. Datacenters out of reach, unknown or ours are left out.
    pub fn failover_targets(&self, failover: &dyn Failover) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if self.failover.nearest_n > 0 {
            out.extend(
                failover
                    .order(Some("nearest"))
                    .into_iter()
                    .take(self.failover.nearest_n as usize),
            );
        }
        if !self.failover.datacenters.is_empty() {
            for dc in failover.order(Some(&self.failover.datacenters.join(","))) {
                if !out.contains(&dc) {
                    out.push(dc);
                }
            }
        }
        out
    }

    /// Whether an execution returns `instance`: not draining; no critical
    /// check (nor, with `OnlyPassing`, a warning one) but those in
    /// `IgnoreCheckIDs`; every tag of `Tags` (any case) and none of its
    /// `!tags`; every `NodeMeta` and `ServiceMeta` pair.
    pub fn admits(&self, instance: &Instance) -> bool {
        if instance.node.drain.is_some() || instance.endpoint.drain.is_some() {
            return false;
        }
        let worst = instance
            .checks
            .iter()
            .filter(|c| !self.ignore_check_ids.iter().any(|id| **id == *c.id))
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Passing);
        let health_ok = match worst {
            Status::Passing => true,
            Status::Warning => !self.only_passing,
            Status::Critical => false,
        };
        let has = |tag: &str| {
            instance
                .endpoint
                .tags
                .iter()
                .any(|t| t.eq_ignore_ascii_case(tag))
        };
        health_ok
            && self.tags.iter().all(|tag| match tag.strip_prefix('!') {
                Some(not) => !has(not),
                None => has(tag),
            })
            && self
                .node_meta
                .iter()
                .all(|(k, v)| instance.node.meta.get(k) == Some(v))
            && self
                .service_meta
                .iter()
                .all(|(k, v)| instance.endpoint.meta.get(k) == Some(v))
    }
}

#[derive(Default)]
struct Vars<'a> {
    full: &'a str,
    prefix: &'a str,
    suffix: &'a str,
    groups: &'a [String],
}

/// Renders `${…}` in `text`; an unknown expression is an error.
fn interpolate(text: &str, vars: &Vars<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {text:?}"))?;
        let expr = after[..end].trim();
        match expr {
            "name.full" => out.push_str(vars.full),
            "name.prefix" => out.push_str(vars.prefix),
            "name.suffix" => out.push_str(vars.suffix),
            "agent.segment" => {}
            _ => {
                let n = expr
                    .strip_prefix("match(")
                    .and_then(|e| e.strip_suffix(')'))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .ok_or_else(|| format!("unknown expression ${{{expr}}} in {text:?}"))?;
                out.push_str(vars.groups.get(n).map_or("", String::as_str));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every stored query, by ID and by name (lower case), as readers see them.
#[derive(Clone, Debug, Default)]
pub struct Queries {
    by_id: OrdMap<Name, Arc<Query>>,
    by_name: OrdMap<Name, Arc<Query>>,
    /// Last index at which any query changed.
    pub index: u64,
}

impl Queries {
    pub fn get(&self, id: &str) -> Option<&Arc<Query>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Query>> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The query `name` (lower case) names exactly, template or not.
    pub fn named(&self, lower: &str) -> Option<&Arc<Query>> {
        self.by_name.get(lower)
    }

    /// What `id_or_name` executes: the query with that ID; else the static
    /// query of that name (any case); else the template whose name is the
    /// longest prefix of it (`""`: the catch-all).
    pub fn resolve(&self, id_or_name: &str) -> Option<&Arc<Query>> {
        if let Some(q) = self.by_id.get(id_or_name) {
            return Some(q);
        }
        let lower = id_or_name.to_ascii_lowercase();
        if let Some(q) = self.by_name.get(lower.as_str()) {
            if !q.is_template() {
                return Some(q);
            }
        }
        let mut end = lower.len();
        loop {
            if let Some(q) = lower
                .get(..end)
                .and_then(|prefix| self.by_name.get(prefix))
                .filter(|q| q.is_template())
            {
                return Some(q);
            }
            if end == 0 {
                return None;
            }
            end -= 1;
            while !lower.is_char_boundary(end) {
                end -= 1;
            }
        }
    }

    /// The writer's: stores (or replaces) a query.
    pub fn insert(&mut self, query: Arc<Query>) {
        if let Some(old) = self.by_id.get(query.def.id.as_str()) {
            self.by_name
                .remove(old.def.name.to_ascii_lowercase().as_str());
        }
        let key: Name = query.def.name.to_ascii_lowercase().into();
        if !key.is_empty() || query.is_template() {
            self.by_name.insert(key, query.clone());
        }
        self.by_id.insert(query.def.id.as_str().into(), query);
    }

    /// The writer's: drops a query.
    pub fn remove(&mut self, id: &str) -> Option<Arc<Query>> {
        let old = self.by_id.remove(id)?;
        let key = old.def.name.to_ascii_lowercase();
        if self
            .by_name
            .get(key.as_str())
            .is_some_and(|q| q.def.id == old.def.id)
        {
            self.by_name.remove(key.as_str());
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str, regexp: &str, service: &str, tags: &[&str]) -> PreparedQuery {
        PreparedQuery {
            id: format!("id-{name}"),
            name: name.to_string(),
            template: Some(QueryTemplate {
                kind: NAME_PREFIX_MATCH.to_string(),
                regexp: regexp.to_string(),
                remove_empty_tags: true,
            }),
            service: QueryService {
                service: service.to_string(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..QueryService::default()
            },
            ..PreparedQuery::default()
        }
    }

    #[test]
    fn a_template_renders_its_groups_and_name_parts() {
        let q = Query::compile(template(
            "geo-db",
            "^geo-db-(.*?)-([^\\-]+?)$",
            "mysql-${match(1)}",
            &["${match(2)}", "${match(7)}", "s-${name.suffix}"],
        ))
        .expect("present");
        let def = q.render("geo-db-customer-primary");
        assert_eq!(def.service.service, "mysql-customer");
        assert_eq!(def.service.tags, ["primary", "s--customer-primary"]);
    }

    #[test]
    fn bad_templates_are_refused() {
        let mut bad = template("x", "(", "s", &[]);
        assert!(Query::compile(bad.clone())
            .expect_err("refused")
            .contains("Bad Regexp"));
        bad.template.as_mut().expect("present").regexp.clear();
        bad.template.as_mut().expect("present").kind = "glob".into();
        assert!(Query::compile(bad.clone())
            .expect_err("refused")
            .contains("Bad Template.Type 'glob'"));
        bad.template.as_mut().expect("present").kind = NAME_PREFIX_MATCH.into();
        bad.service.service = "${nope}".into();
        assert!(Query::compile(bad).expect_err("refused").contains("nope"));
    }

    #[test]
    fn names_find_static_queries_first_then_the_longest_template_prefix() {
        let mut queries = Queries::default();
        let mut web = template("", "", "any-${name.full}", &[]);
        web.id = "catch-all".into();
        queries.insert(Arc::new(Query::compile(web).expect("present")));
        queries.insert(Arc::new(
            Query::compile(template("geo", "", "geo", &[])).expect("present"),
        ));
        queries.insert(Arc::new(
            Query::compile(template("geo-db", "", "geodb", &[])).expect("present"),
        ));
        let fixed = PreparedQuery {
            id: "fixed".into(),
            name: "Geo-DB-X".into(),
            ..PreparedQuery::default()
        };
        queries.insert(Arc::new(Query::compile(fixed).expect("present")));
        let found = |queries: &Queries, n: &str| queries.resolve(n).map(|q| q.def.id.clone());
        assert_eq!(found(&queries, "geo-db-x").as_deref(), Some("fixed"));
        assert_eq!(found(&queries, "geo-db-y").as_deref(), Some("id-geo-db"));
        assert_eq!(found(&queries, "GEO-x").as_deref(), Some("id-geo"));
        assert_eq!(found(&queries, "other").as_deref(), Some("catch-all"));
        assert_eq!(found(&queries, "fixed").as_deref(), Some("fixed"));
        queries.remove("catch-all");
        assert_eq!(found(&queries, "other"), None);
    }
}
