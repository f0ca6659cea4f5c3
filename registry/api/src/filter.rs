//! Consul's `?filter=` expressions (go-bexpr's grammar, CONSUL-KV.md §4):
//! parsed once per request, checked against the endpoint's selectors, then
//! evaluated on each row as the endpoint renders it (its JSON), so a
//! selector names exactly the field a client reads.
//!
//! A selector through a list (`Checks.Status`) matches when any element
//! does. A map key that is not there makes `==`, `in`, `contains`,
//! `matches` and `is not empty` false, and their negations true.

use regex::Regex;
use serde_json::Value;

/// The prefix Consul's errors carry (clients match it).
const PREFIX: &str = "Failed to create boolean expression evaluator";

fn error(message: impl std::fmt::Display) -> String {
    format!("{PREFIX}: {message}")
}

#[derive(Debug)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match(Match),
}

#[derive(Debug)]
struct Match {
    selector: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Equal(String),
    NotEqual(String),
    /// `"v" in Sel` and `Sel contains "v"`.
    Contains(String),
    NotContains(String),
    Matches(Regex),
    NotMatches(Regex),
    Empty,
    NotEmpty,
}

/// A parsed expression.
#[derive(Debug)]
pub(crate) struct Filter {
    expr: Expr,
}

/// What an endpoint's rows hold, for checking selectors before any row is
/// read (an unknown field is an error, as in Consul).
#[derive(Clone, Copy)]
pub(crate) enum Field {
    Leaf,
    /// Keys are data (`Meta.env`, `Meta["my-key"]`); values are leaves.
    Map,
    /// Anything below (nested shapes not checked).
    Any,
    Obj(&'static [(&'static str, Field)]),
}

const WEIGHTS: Field = Field::Obj(&[("Passing", Field::Leaf), ("Warning", Field::Leaf)]);

pub(crate) const NODE: Field = Field::Obj(&[
    ("ID", Field::Leaf),
    ("Node", Field::Leaf),
    ("Address", Field::Leaf),
    ("Datacenter", Field::Leaf),
    ("TaggedAddresses", Field::Map),
    ("Meta", Field::Map),
]);

pub(crate) const SERVICE: Field = Field::Obj(&[
    ("ID", Field::Leaf),
    ("Service", Field::Leaf),
    ("Kind", Field::Leaf),
    ("Tags", Field::Leaf),
    ("Address", Field::Leaf),
    ("Port", Field::Leaf),
    ("Meta", Field::Map),
    ("TaggedAddresses", Field::Any),
    ("EnableTagOverride", Field::Leaf),
    ("Weights", WEIGHTS),
    ("Connect", Field::Any),
    ("Proxy", Field::Any),
]);

const CHECK: Field = Field::Obj(&[
    ("CheckID", Field::Leaf),
    ("Name", Field::Leaf),
    ("Node", Field::Leaf),
    ("Notes", Field::Leaf),
    ("Output", Field::Leaf),
    ("ServiceID", Field::Leaf),
    ("ServiceName", Field::Leaf),
    ("ServiceTags", Field::Leaf),
    ("Status", Field::Leaf),
    ("Type", Field::Leaf),
]);

/// `/v1/health/service/NAME` rows.
pub(crate) const HEALTH_SERVICE: Field =
    Field::Obj(&[("Node", NODE), ("Service", SERVICE), ("Checks", CHECK)]);

/// `/v1/catalog/service/NAME` (and `/v1/catalog/services`) rows.
pub(crate) const CATALOG_SERVICE: Field = Field::Obj(&[
    ("ID", Field::Leaf),
    ("Node", Field::Leaf),
    ("Address", Field::Leaf),
    ("Datacenter", Field::Leaf),
    ("TaggedAddresses", Field::Map),
    ("NodeMeta", Field::Map),
    ("ServiceID", Field::Leaf),
    ("ServiceName", Field::Leaf),
    ("ServiceKind", Field::Leaf),
    ("ServiceTags", Field::Leaf),
    ("ServiceAddress", Field::Leaf),
    ("ServicePort", Field::Leaf),
    ("ServiceMeta", Field::Map),
    ("ServiceTaggedAddresses", Field::Any),
    ("ServiceWeights", WEIGHTS),
    ("ServiceEnableTagOverride", Field::Leaf),
    ("ServiceConnect", Field::Any),
    ("ServiceProxy", Field::Any),
]);

impl Filter {
    /// Parses an expression (syntax only; `check` tests its selectors).
    pub(crate) fn parse(text: &str) -> Result<Filter, String> {
        let mut p = Parser { text, at: 0 };
        p.ws();
        let expr = p.or()?;
        p.ws();
        if p.at < text.len() {
            return Err(error(format!(
                "1:{} ({}): no match found, expected: \"and\", \"or\" or the end",
                p.at + 1,
                p.at
            )));
        }
        Ok(Filter { expr })
    }

    /// Checks every selector against the endpoint's rows.
    pub(crate) fn check(&self, shape: Field) -> Result<(), String> {
        fn walk(expr: &Expr, shape: Field) -> Result<(), String> {
            match expr {
                Expr::Or(a, b) | Expr::And(a, b) => {
                    walk(a, shape)?;
                    walk(b, shape)
                }
                Expr::Not(e) => walk(e, shape),
                Expr::Match(m) => {
                    let mut at = shape;
                    for (i, part) in m.selector.iter().enumerate() {
                        at = match at {
                            Field::Any => return Ok(()),
                            Field::Map if i + 1 == m.selector.len() => Field::Leaf,
                            Field::Obj(fields) => fields
                                .iter()
                                .find(|(name, _)| name == part)
                                .map(|(_, f)| *f)
                                .ok_or_else(|| {
                                    error(format!(
                                        "Selector {:?} is not valid",
                                        m.selector.join(".")
                                    ))
                                })?,
                            Field::Leaf | Field::Map => {
                                return Err(error(format!(
                                    "Selector {:?} is not valid",
                                    m.selector.join(".")
                                )))
                            }
                        };
                    }
                    Ok(())
                }
            }
        }
        walk(&self.expr, shape)
    }

    /// Whether a row (as the endpoint renders it) passes.
    pub(crate) fn admits(&self, row: &Value) -> bool {
        eval(&self.expr, row)
    }
}

fn eval(expr: &Expr, row: &Value) -> bool {
    match expr {
        Expr::Or(a, b) => eval(a, row) || eval(b, row),
        Expr::And(a, b) => eval(a, row) && eval(b, row),
        Expr::Not(e) => !eval(e, row),
        Expr::Match(m) => {
            let mut found = Vec::new();
            resolve(row, &m.selector, &mut found);
            // Through a list: any element.
            if found.is_empty() {
                return missing(&m.op);
            }
            found.iter().any(|v| match v {
                None => missing(&m.op),
                Some(v) => test(&m.op, v),
            })
        }
    }
}

/// The values a selector reaches (`None`: a key not there), through
/// lists element by element.
fn resolve<'a>(value: &'a Value, path: &[String], out: &mut Vec<Option<&'a Value>>) {
    let Some((first, rest)) = path.split_first() else {
        out.push(Some(value));
        return;
    };
    match value {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            for item in items {
                resolve(item, path, out);
            }
        }
        Value::Object(map) => match map.get(first) {
            Some(next) => resolve(next, rest, out),
            None => out.push(None),
        },
        _ => out.push(None),
    }
}

/// A match on a field that is not there.
fn missing(op: &Op) -> bool {
    matches!(
        op,
        Op::NotEqual(_) | Op::NotContains(_) | Op::NotMatches(_) | Op::Empty
    )
}

/// Whether a field's value equals a literal (coerced to its type).
fn equals(value: &Value, literal: &str) -> bool {
    match value {
        Value::String(s) => s == literal,
        Value::Number(n) => literal
            .parse::<f64>()
            .ok()
            .zip(n.as_f64())
            .is_some_and(|(a, b)| a == b),
        Value::Bool(b) => literal.parse::<bool>().ok() == Some(*b),
        Value::Null => literal.is_empty(),
        Value::Array(items) => items.iter().any(|v| equals(v, literal)),
        Value::Object(_) => false,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn test(op: &Op, value: &Value) -> bool {
    match op {
        Op::Equal(v) => equals(value, v),
        Op::NotEqual(v) => !equals(value, v),
        Op::Contains(v) => contains(value, v),
        Op::NotContains(v) => !contains(value, v),
        Op::Matches(re) => text(value).is_some_and(|t| re.is_match(&t)),
        Op::NotMatches(re) => !text(value).is_some_and(|t| re.is_match(&t)),
        Op::Empty => empty(value),
        Op::NotEmpty => !empty(value),
    }
}

/// `in`/`contains`: a substring of a string, a key of a map, an element of
/// a list.
fn contains(value: &Value, v: &str) -> bool {
    match value {
        Value::String(s) => s.contains(v),
        Value::Object(map) => map.contains_key(v),
        Value::Array(items) => items.iter().any(|item| equals(item, v)),
        _ => false,
    }
}

fn empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn ws(&mut self) -> bool {
        let before = self.at;
        let skipped = self.rest().len() - self.rest().trim_start().len();
        self.at += skipped;
        self.at > before
    }

    fn fail<T>(&self, expected: &str) -> Result<T, String> {
        Err(error(format!(
            "1:{} ({}): no match found, expected: {expected}",
            self.at + 1,
            self.at
        )))
    }

    /// A keyword followed by a word boundary.
    fn keyword(&mut self, word: &str) -> bool {
        let rest = self.rest();
        if rest.starts_with(word)
            && !rest[word.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.at += word.len();
            return true;
        }
        false
    }

    /// `keyword` after optional space, restoring the position when absent.
    fn try_keyword(&mut self, word: &str) -> bool {
        let save = self.at;
        self.ws();
        if self.keyword(word) {
            return true;
        }
        self.at = save;
        false
    }

    fn or(&mut self) -> Result<Expr, String> {
        let left = self.and()?;
        let save = self.at;
        if self.ws() && self.keyword("or") && self.ws() {
            let right = self.or()?;
            return Ok(Expr::Or(Box::new(left), Box::new(right)));
        }
        self.at = save;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let left = self.not()?;
        let save = self.at;
        if self.ws() && self.keyword("and") && self.ws() {
            let right = self.and()?;
            return Ok(Expr::And(Box::new(left), Box::new(right)));
        }
        self.at = save;
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        let save = self.at;
        if self.keyword("not") && self.ws() {
            // `not` before a selector's match (`not Sel == …`), or before a
            // parenthesis, negates what follows.
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.at = save;
        if self.rest().starts_with('(') {
            self.at += 1;
            self.ws();
            let inner = self.or()?;
            self.ws();
            if !self.rest().starts_with(')') {
                return self.fail("\")\"");
            }
            self.at += 1;
            return Ok(inner);
        }
        self.matcher()
    }

    fn matcher(&mut self) -> Result<Expr, String> {
        // `Value in Sel`: a literal first.
        if self.rest().starts_with('"') || self.rest().starts_with('`') {
            let value = self.string()?;
            return self.membership(value);
        }
        if self
            .rest()
            .starts_with(|c: char| c == '-' || c.is_ascii_digit())
        {
            let value = self.number()?;
            return self.membership(value);
        }
        let start = self.at;
        let selector = self.selector()?;
        let after_selector = self.at;
        self.ws();
        let rest = self.rest();
        if let Some(op) = ["==", "!="].into_iter().find(|op| rest.starts_with(op)) {
            self.at += 2;
            self.ws();
            let value = self.value()?;
            let op = match op {
                "==" => Op::Equal(value),
                _ => Op::NotEqual(value),
            };
            return Ok(Expr::Match(Match { selector, op }));
        }
        if self.at > after_selector {
            if self.keyword("is") && self.ws() {
                let op = match self.keyword("empty") {
                    true => Op::Empty,
                    false if self.keyword("not") && self.ws() && self.keyword("empty") => {
                        Op::NotEmpty
                    }
                    false => return self.fail("\"empty\" or \"not empty\""),
                };
                return Ok(Expr::Match(Match { selector, op }));
            }
            let negated = {
                let save = self.at;
                match self.keyword("not") && self.ws() {
                    true => true,
                    false => {
                        self.at = save;
                        false
                    }
                }
            };
            if self.keyword("contains") && self.ws() {
                let value = self.value()?;
                let op = match negated {
                    false => Op::Contains(value),
                    true => Op::NotContains(value),
                };
                return Ok(Expr::Match(Match { selector, op }));
            }
            if self.keyword("matches") && self.ws() {
                let pattern = self.value()?;
                let re = Regex::new(&pattern)
                    .map_err(|e| error(format!("bad regular expression {pattern:?}: {e}")))?;
                let op = match negated {
                    false => Op::Matches(re),
                    true => Op::NotMatches(re),
                };
                return Ok(Expr::Match(Match { selector, op }));
            }
            if self.keyword("in") && self.ws() {
                // A bare word before `in`: a value.
                let value = self.text[start..after_selector].to_string();
                let target = self.selector()?;
                let op = match negated {
                    false => Op::Contains(value),
                    true => Op::NotContains(value),
                };
                return Ok(Expr::Match(Match {
                    selector: target,
                    op,
                }));
            }
        }
        self.fail(
            "\"!=\", \".\", \"==\", \"[\", \"contains\", \"in\", \"is\", \"matches\", \"not\"",
        )
    }

    /// `Value in Sel` / `Value not in Sel`.
    fn membership(&mut self, value: String) -> Result<Expr, String> {
        if !self.ws() {
            return self.fail("\"in\" or \"not in\"");
        }
        let negated = self.try_keyword("not") && self.ws();
        if !(self.keyword("in") && self.ws()) {
            return self.fail("\"in\" or \"not in\"");
        }
        let selector = self.selector()?;
        let op = match negated {
            false => Op::Contains(value),
            true => Op::NotContains(value),
        };
        Ok(Expr::Match(Match { selector, op }))
    }

    fn ident(&mut self) -> Result<String, String> {
        let rest = self.rest();
        let len = rest
            .char_indices()
            .take_while(|(i, c)| {
                if *i == 0 {
                    c.is_ascii_alphabetic()
                } else {
                    c.is_ascii_alphanumeric() || *c == '_'
                }
            })
            .count();
        if len == 0 {
            return self.fail("a selector");
        }
        self.at += len;
        Ok(rest[..len].to_string())
    }

    fn selector(&mut self) -> Result<Vec<String>, String> {
        let mut parts = vec![self.ident()?];
        loop {
            if self.rest().starts_with('.') {
                self.at += 1;
                parts.push(self.ident()?);
            } else if self.rest().starts_with('[') {
                self.at += 1;
                self.ws();
                parts.push(self.string()?);
                self.ws();
                if !self.rest().starts_with(']') {
                    return self.fail("\"]\"");
                }
                self.at += 1;
            } else {
                return Ok(parts);
            }
        }
    }

    /// A value: a string, a number, or a bare selector-like word (taken
    /// as its text).
    fn value(&mut self) -> Result<String, String> {
        let rest = self.rest();
        if rest.starts_with('"') || rest.starts_with('`') {
            return self.string();
        }
        if rest.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            return self.number();
        }
        let start = self.at;
        self.selector()?;
        Ok(self.text[start..self.at].to_string())
    }

    fn number(&mut self) -> Result<String, String> {
        let rest = self.rest();
        let mut len = usize::from(rest.starts_with('-'));
        let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).count();
        let int = digits(&rest[len..]);
        if int == 0 {
            return self.fail("a number");
        }
        len += int;
        if rest[len..].starts_with('.') {
            let frac = digits(&rest[len + 1..]);
            if frac == 0 {
                return self.fail("a digit");
            }
            len += 1 + frac;
        }
        // A number ends at space, a parenthesis or the end.
        if !rest[len..].is_empty()
            && !rest[len..].starts_with(|c: char| c.is_whitespace() || c == ')')
        {
            self.at += len;
            return self.fail("a space, \")\" or the end after a number");
        }
        self.at += len;
        Ok(rest[..len].to_string())
    }

    fn string(&mut self) -> Result<String, String> {
        let rest = self.rest();
        if let Some(raw) = rest.strip_prefix('`') {
            let Some(end) = raw.find('`') else {
                return self.fail("a closing \"`\"");
            };
            self.at += end + 2;
            return Ok(raw[..end].to_string());
        }
        let Some(body) = rest.strip_prefix('"') else {
            return self.fail("a string");
        };
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 2;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, e @ ('"' | '\\' | '/'))) => out.push(e),
                    _ => return self.fail("a valid escape"),
                },
                c => out.push(c),
            }
        }
        self.fail("a closing '\"'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admits(filter: &str, row: &Value) -> bool {
        let f = Filter::parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
        f.check(HEALTH_SERVICE)
            .unwrap_or_else(|e| panic!("{filter}: {e}"));
        f.admits(row)
    }

    #[test]
    fn consul_filters_evaluate_as_go_bexpr_does() {
        let row = json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1", "Meta": {"env": "prod", "my-key": "x"}},
            "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "v2"], "Port": 8080,
                "Meta": {"env": "prod"}, "EnableTagOverride": false},
            "Checks": [{"CheckID": "a", "Status": "passing"}, {"CheckID": "b", "Status": "warning"}],
        });
        assert!(admits(
            r#"Service.Meta.env == "prod" and "v2" in Service.Tags"#,
            &row
        ));
        assert!(admits(r#"Node.Meta["my-key"] == x"#, &row));
        assert!(admits(r#"Checks.Status != "passing""#, &row), "any check");
        assert!(!admits(r#"not Checks.Status != "passing""#, &row));
        assert!(admits(
            r#"Service.Port == 8080 and Service.EnableTagOverride == false"#,
            &row
        ));
        assert!(admits(r#"Node.Meta.missing != "x""#, &row));
        assert!(!admits(r#"Node.Meta.missing == "x""#, &row));
        assert!(admits(
            r#"Service.Tags contains "v1" or Node.Node == nope"#,
            &row
        ));
        assert!(admits(
            r#"Node.Node matches "^n[0-9]$" and Service.ID not matches `-2$`"#,
            &row
        ));
        assert!(admits(
            r#"(Checks is not empty) and Service.Meta is not empty"#,
            &row
        ));
        assert!(admits(r#""v3" not in Service.Tags"#, &row));
        assert!(admits(r#"not (Service.Service == "db")"#, &row));
    }

    #[test]
    fn bad_filters_name_what_is_wrong() {
        for bad in [
            "foo",
            "Address == 10.0.0.1",
            "Service.Port ==",
            "(Node.Node == \"x\"",
            "Node.Node == \"x\" and",
        ] {
            let err = Filter::parse(bad).expect_err(bad);
            assert!(err.starts_with(PREFIX), "{bad}: {err}");
        }
        let unknown = Filter::parse(r#"Nope == "x""#).expect("syntax");
        assert!(unknown.check(HEALTH_SERVICE).is_err());
        let deep = Filter::parse(r#"Node.Meta.a.b == "x""#).expect("syntax");
        assert!(deep.check(HEALTH_SERVICE).is_err());
    }
}
