//! Splits: a route's requests divided among subsets of its service's
//! endpoints, chosen by tag (`split = [{ tag = "v1", weight = 90 }, ...]`),
//! and requests that match a header, cookie or query parameter sent to a
//! subset first (`match = [{ header = "x-canary", value = "1", tag = "v2" }]`).
//!
//! A subset with no routable endpoint gets no traffic: its weight goes to
//! the others, and `switchyard_proxy_subset_routable` says so. Within its
//! subset a request is balanced by the route's balancer, over a list of the
//! subset's backends built once per view (`ProxyService::subset`).

use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::backend::ProxyService;

/// One `split` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// The endpoints carrying this tag form the subset.
    pub tag: String,
    /// Its part of the route's requests, against the other entries' weights.
    pub weight: u32,
}

/// One `match` entry: exactly one of `header`, `cookie` and `query`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    /// The value it must have, exactly.
    pub value: String,
    /// The subset a matching request goes to (when it has endpoints).
    pub tag: String,
}

/// What a match rule looks at.
#[derive(Debug, PartialEq, Eq)]
enum On {
    /// A request header (name in lowercase).
    Header(Box<str>),
    Cookie(Box<str>),
    Query(Box<str>),
}

#[derive(Debug)]
struct Rule {
    on: On,
    value: Box<str>,
    /// Index of its subset.
    subset: usize,
}

/// One subset of a split route.
#[derive(Debug)]
pub(crate) struct Subset {
    pub(crate) tag: Box<str>,
    /// 0 for a subset only match rules send to.
    weight: u32,
    /// Its series, attached when the route table is installed.
    pub(crate) metrics: OnceLock<SubsetMetrics>,
}

/// `switchyard_proxy_subset_*` of one subset.
#[derive(Debug)]
pub(crate) struct SubsetMetrics {
    pub(crate) requests: prometheus::IntCounter,
    pub(crate) errors: prometheus::IntCounter,
    pub(crate) routable: prometheus::IntGauge,
}

/// A route's split and match rules.
#[derive(Debug)]
pub(crate) struct Split {
    pub(crate) subsets: Box<[Subset]>,
    rules: Box<[Rule]>,
}

impl Split {
    /// The route's split, `None` when it has neither `split` nor `match`;
    /// an error names the key.
    pub(crate) fn from_config(
        split: &[SplitConfig],
        matches: &[MatchConfig],
    ) -> Result<Option<Split>, String> {
        if split.is_empty() && matches.is_empty() {
            return Ok(None);
        }
        let mut subsets: Vec<Subset> = Vec::new();
        for (i, entry) in split.iter().enumerate() {
            if entry.tag.is_empty() {
                return Err(format!("split[{i}].tag is empty"));
            }
            if subsets.iter().any(|s| *s.tag == *entry.tag) {
                return Err(format!("split[{i}]: tag {:?} is split twice", entry.tag));
            }
            if entry.weight > 1_000_000 {
                return Err(format!("split[{i}].weight must be at most 1000000"));
            }
            subsets.push(Subset {
                tag: entry.tag.as_str().into(),
                weight: entry.weight,
                metrics: OnceLock::new(),
            });
        }
        if !split.is_empty() && subsets.iter().all(|s| s.weight == 0) {
            return Err("split: every weight is 0".to_string());
        }
        let mut rules = Vec::new();
        for (i, rule) in matches.iter().enumerate() {
            let on = match (&rule.header, &rule.cookie, &rule.query) {
                (Some(name), None, None) if is_token(name) => {
                    On::Header(name.to_ascii_lowercase().into())
                }
                (None, Some(name), None) if !name.is_empty() => On::Cookie(name.as_str().into()),
                (None, None, Some(name)) if !name.is_empty() => On::Query(name.as_str().into()),
                _ => {
                    return Err(format!(
                        "match[{i}]: give one of header, cookie or query, with a name"
                    ))
                }
            };
            if rule.tag.is_empty() {
                return Err(format!("match[{i}].tag is empty"));
            }
            let subset = match subsets.iter().position(|s| *s.tag == *rule.tag) {
                Some(at) => at,
                None => {
                    subsets.push(Subset {
                        tag: rule.tag.as_str().into(),
                        weight: 0,
                        metrics: OnceLock::new(),
                    });
                    subsets.len() - 1
                }
            };
            rules.push(Rule {
                on,
                value: rule.value.as_str().into(),
                subset,
            });
        }
        Ok(Some(Split {
            subsets: subsets.into_boxed_slice(),
            rules: rules.into_boxed_slice(),
        }))
    }

    /// Whether any rule reads the request (so its head must be looked at).
    pub(crate) fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The subset of the first rule the request matches: `values` gives
    /// every value of a header (HTTP/2 clients may send cookies in several),
    /// `target` is the request target (path and query).
    pub(crate) fn matched<'s, 'h, I: Iterator<Item = &'h [u8]>>(
        &'s self,
        values: impl Fn(&'s str) -> I,
        target: &str,
    ) -> Option<usize> {
        self.rules.iter().find_map(|rule| {
            let hit = match &rule.on {
                On::Header(name) => values(name).any(|v| v.trim_ascii() == rule.value.as_bytes()),
                On::Cookie(name) => values("cookie").any(|v| {
                    v.split(|b| *b == b';').any(|pair| {
                        let pair = pair.trim_ascii();
                        pair.strip_prefix(name.as_bytes())
                            .and_then(|rest| rest.strip_prefix(b"="))
                            .is_some_and(|v| v == rule.value.as_bytes())
                    })
                }),
                On::Query(name) => target.split_once('?').is_some_and(|(_, query)| {
                    query.split('&').any(|pair| match pair.split_once('=') {
                        Some((n, v)) => n == &**name && v == &*rule.value,
                        None => pair == &**name && rule.value.is_empty(),
                    })
                }),
            };
            hit.then_some(rule.subset)
        })
    }

    /// The subset a request goes to: its match's when that subset has a
    /// routable endpoint, else one drawn by weight among the weighted
    /// subsets that have. `Ok(None)` for a route with match rules only
    /// and no match (the whole service); `Err(())` when no subset it could
    /// go to has an endpoint.
    pub(crate) fn choose(
        &self,
        matched: Option<usize>,
        service: &ProxyService,
        rng: &mut fastrand::Rng,
    ) -> Result<Option<usize>, ()> {
        let routable = |at: usize| {
            let subset = &self.subsets[at];
            let has = !service.subset(&subset.tag).backends.is_empty();
            if let Some(m) = subset.metrics.get() {
                // Written only on a change: the line stays shared.
                if m.routable.get() != i64::from(has) {
                    m.routable.set(i64::from(has));
                }
            }
            has
        };
        if let Some(at) = matched {
            if routable(at) {
                return Ok(Some(at));
            }
        }
        // One pass, each subset asked once: a weighted draw that keeps a
        // routable subset with the chance of its weight in what was seen.
        let (mut seen, mut chosen) = (0u64, None);
        for (at, subset) in self.subsets.iter().enumerate() {
            if subset.weight == 0 || !routable(at) {
                continue;
            }
            seen += u64::from(subset.weight);
            if rng.u64(..seen) < u64::from(subset.weight) {
                chosen = Some(at);
            }
        }
        match chosen {
            Some(at) => Ok(Some(at)),
            None if self.subsets.iter().any(|s| s.weight > 0) => Err(()),
            None => Ok(None),
        }
    }

    /// Counts a request to subset `at` and whether it failed.
    pub(crate) fn count(&self, at: usize, failed: bool) {
        if let Some(m) = self.subsets.get(at).and_then(|s| s.metrics.get()) {
            m.requests.inc();
            if failed {
                m.errors.inc();
            }
        }
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One subset's routable backends in a view (built at its first request).
pub(crate) struct SubsetBackends {
    pub(crate) tag: Box<str>,
    pub(crate) backends: crate::balance::Backends,
    /// Each backend's index in the view's whole list (ascending).
    pub(crate) full: Box<[u32]>,
}

impl SubsetBackends {
    pub(crate) fn build(tag: &str, all: &crate::balance::Backends) -> SubsetBackends {
        let (full, list): (Vec<u32>, Vec<_>) = all
            .iter()
            .enumerate()
            .filter(|(_, b)| b.has_tag(tag))
            .map(|(i, b)| (i as u32, b.clone()))
            .unzip();
        SubsetBackends {
            tag: tag.into(),
            backends: crate::balance::Backends::new(list),
            full: full.into_boxed_slice(),
        }
    }
}

/// Shared by every view's cache.
pub(crate) type Subsets = arc_swap::ArcSwap<Vec<Arc<SubsetBackends>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Result<Option<Split>, String> {
        #[derive(Deserialize)]
        struct Keys {
            #[serde(default)]
            split: Vec<SplitConfig>,
            #[serde(default, rename = "match")]
            matches: Vec<MatchConfig>,
        }
        let keys: Keys = toml::from_str(text).map_err(|e| e.to_string())?;
        Split::from_config(&keys.split, &keys.matches)
    }

    #[test]
    fn rules_match_headers_cookies_and_query_parameters() {
        let s = split(
            "split = [{ tag = \"v1\", weight = 9 }, { tag = \"v2\", weight = 1 }]\n\
             match = [{ header = \"X-Canary\", value = \"1\", tag = \"v2\" },\n\
                      { cookie = \"beta\", value = \"yes\", tag = \"v3\" },\n\
                      { query = \"tier\", value = \"gold\", tag = \"v1\" }]",
        )
        .expect("valid")
        .expect("split");
        let tags: Vec<&str> = s.subsets.iter().map(|s| &*s.tag).collect();
        assert_eq!(tags, ["v1", "v2", "v3"], "match-only subsets come last");
        let none = |_: &str| std::iter::empty();
        assert_eq!(s.matched(none, "/a"), None);
        let one = |wanted: &'static str, value: &'static [u8]| {
            move |name: &str| (name == wanted).then_some(value).into_iter()
        };
        assert_eq!(s.matched(one("x-canary", b"1"), "/a"), Some(1));
        assert_eq!(s.matched(one("x-canary", b"0"), "/a"), None);
        assert_eq!(s.matched(one("cookie", b"a=1; beta=yes; c"), "/"), Some(2));
        assert_eq!(s.matched(one("cookie", b"betas=yes; beta=no"), "/"), None);
        // Cookies split over several headers (HTTP/2's crumbs).
        let crumbs = |name: &str| {
            let list: &[&[u8]] = match name {
                "cookie" => &[b"a=1", b"beta=yes"],
                _ => &[],
            };
            list.iter().copied()
        };
        assert_eq!(s.matched(crumbs, "/"), Some(2));
        assert_eq!(s.matched(none, "/p?x=1&tier=gold"), Some(0));
        assert_eq!(s.matched(none, "/p?tier=golden"), None);
        assert_eq!(
            s.matched(none, "/p/tier=gold"),
            None,
            "the path is not the query"
        );
    }

    #[test]
    fn bad_splits_are_refused_naming_the_key() {
        for (text, says) in [
            ("split = [{ tag = \"\", weight = 1 }]", "split[0].tag"),
            ("split = [{ tag = \"a\", weight = 0 }]", "every weight is 0"),
            (
                "split = [{ tag = \"a\", weight = 1 }, { tag = \"a\", weight = 2 }]",
                "split[1]",
            ),
            (
                "match = [{ header = \"x\", cookie = \"y\", value = \"1\", tag = \"a\" }]",
                "match[0]",
            ),
            ("match = [{ value = \"1\", tag = \"a\" }]", "match[0]"),
            (
                "match = [{ header = \"a b\", value = \"1\", tag = \"a\" }]",
                "match[0]",
            ),
            (
                "match = [{ query = \"q\", value = \"1\", tag = \"\" }]",
                "match[0].tag",
            ),
        ] {
            let error = split(text).expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
        assert!(split("split = [{ tag = \"a\", weight = 1, share = 2 }]").is_err());
        assert!(split("").expect("nothing").is_none());
    }
}
