//! Answers shared by blocking queries. When a publish wakes many watchers
//! of the same resource with the same parameters, the first to look renders
//! the JSON body and the rest take the same bytes: one render per publish
//! instead of one per watcher, and one copy of the body in memory however
//! many connections are sending it.
//!
//! Clients that accept gzip (Go's HTTP client asks for it by default, so
//! consul-template and Consul's own API client do) get the body compressed,
//! also once per publish, on the first such watcher's request.
//!
//! A shared answer is keyed by the route, its name and its parameters
//! (without `index`, `wait` and the token), and belongs to one snapshot
//! index: a snapshot's content is fixed by its index, and the Consul
//! routes that share render nothing but the snapshot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::OnceCell;

/// Keys kept before idle ones are swept.
const SWEEP_AT: usize = 4096;
/// A key nobody asked for this long is swept.
const IDLE: Duration = Duration::from_secs(60);

/// The bodies being shared, one per key.
pub struct Answers {
    slots: Mutex<HashMap<String, Slot>>,
    rendered: IntCounter,
    shared: IntCounter,
}

impl Default for Answers {
    /// Unregistered counters (tests).
    fn default() -> Answers {
        let counters = IntCounterVec::new(Opts::new("answers", "-"), &["outcome"])
            .unwrap_or_else(|_| unreachable!("a valid metric name"));
        Answers::with(&counters)
    }
}

struct Slot {
    index: u64,
    body: Arc<OnceCell<Arc<Shared>>>,
    used: Instant,
}

/// One rendered answer, and its gzip form once a client asked for it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) body: Bytes,
    gzip: std::sync::OnceLock<Bytes>,
}

impl Shared {
    fn new(body: Bytes) -> Arc<Shared> {
        Arc::new(Shared {
            body,
            gzip: std::sync::OnceLock::new(),
        })
    }

    /// The body gzip-compressed (fast level: the answers are repetitive
    /// JSON, ten times smaller or more), made on first use.
    pub(crate) fn gzip(&self) -> Bytes {
        self.gzip
            .get_or_init(|| {
                use std::io::Write;
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(self.body.len() / 8),
                    flate2::Compression::fast(),
                );
                // Writing to a Vec cannot fail.
                let _ = encoder.write_all(&self.body);
                Bytes::from(encoder.finish().unwrap_or_default())
            })
            .clone()
    }
}

/// Marks a response whose body is a shared answer, so the compression
/// layer can send its shared gzip form.
#[derive(Clone, Debug)]
pub(crate) struct SharedAnswer(pub(crate) Arc<Shared>);

impl Answers {
    /// With `switchyard_api_blocking_answers_total{outcome}` registered.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Answers> {
        let counters = IntCounterVec::new(
            Opts::new(
                "switchyard_api_blocking_answers_total",
                "Answers to blocking queries: bodies rendered, and answers that took a body another query rendered for the same publish.",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(counters.clone()))?;
        Ok(Answers::with(&counters))
    }

    fn with(counters: &IntCounterVec) -> Answers {
        Answers {
            slots: Mutex::default(),
            rendered: counters.with_label_values(&["rendered"]),
            shared: counters.with_label_values(&["shared"]),
        }
    }

    /// The body of `key` at snapshot `index`: rendered by `render` unless
    /// another query rendered it already (or is rendering it: then this one
    /// waits for those bytes). A query holding an older snapshot than the
    /// key's latest renders its own.
    pub(crate) async fn get<E>(
        &self,
        key: String,
        index: u64,
        render: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Arc<Shared>, E> {
        let cell = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if slots.len() >= SWEEP_AT {
                slots.retain(|_, slot| {
                    Arc::strong_count(&slot.body) > 1 || now.duration_since(slot.used) < IDLE
                });
            }
            let slot = slots.entry(key).or_insert_with(|| Slot {
                index,
                body: Arc::new(OnceCell::new()),
                used: now,
            });
            if slot.index < index {
                slot.index = index;
                slot.body = Arc::new(OnceCell::new());
            }
            slot.used = now;
            (slot.index == index).then(|| slot.body.clone())
        };
        let Some(cell) = cell else {
            self.rendered.inc();
            return render().map(Shared::new);
        };
        let mut rendered = false;
        let body = cell
            .get_or_try_init(|| async {
                rendered = true;
                render().map(Shared::new)
            })
            .await
            .cloned();
        match rendered {
            true => self.rendered.inc(),
            false => self.shared.inc(),
        }
        body
    }

    /// Keys held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().map_or(0, |s| s.len())
    }
}

/// The share key of a read: `route` and `name`, and the query's parameters
/// in order, without the ones that do not change the body.
pub(crate) fn key(route: &str, name: &str, pairs: &[(String, String)]) -> String {
    let mut kept: Vec<&(String, String)> = pairs
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "index" | "wait" | "token"))
        .collect();
    kept.sort();
    let mut key = format!("{route}\0{name}");
    for (k, v) in kept {
        key.push('\0');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn body(shared: Result<Arc<Shared>, Infallible>) -> Bytes {
        match shared {
            Ok(shared) => shared.body.clone(),
            Err(never) => match never {},
        }
    }

    #[test]
    fn the_gzip_form_decompresses_to_the_body() {
        use std::io::Read;
        let text = "[{\"Node\":\"n1\",\"Service\":\"web\"}]".repeat(200);
        let shared = Shared::new(Bytes::from(text.clone()));
        let gzip = shared.gzip();
        assert!(
            gzip.len() * 10 < text.len(),
            "{} bytes of {}",
            gzip.len(),
            text.len()
        );
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gzip[..])
            .read_to_string(&mut back)
            .expect("gunzip");
        assert_eq!(back, text);
        assert_eq!(shared.gzip(), gzip, "made once");
    }

    #[tokio::test]
    async fn one_render_per_key_and_index_and_older_snapshots_render_their_own() {
        let answers = Answers::default();
        let renders = AtomicUsize::new(0);
        let render = |text: &'static str| {
            renders.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Infallible>(Bytes::from_static(text.as_bytes()))
        };
        let k = || key("health", "web", &[("index".into(), "7".into())]);
        for _ in 0..100 {
            assert_eq!(body(answers.get(k(), 8, || render("a")).await), "a");
        }
        assert_eq!(renders.load(Ordering::Relaxed), 1);
        assert_eq!(body(answers.get(k(), 9, || render("b")).await), "b");
        // A waiter still on snapshot 8 does not take (or replace) 9's body.
        assert_eq!(body(answers.get(k(), 8, || render("old")).await), "old");
        assert_eq!(body(answers.get(k(), 9, || render("x")).await), "b");
        assert_eq!(renders.load(Ordering::Relaxed), 3);
        assert_eq!(answers.rendered.get(), 3);
        assert_eq!(answers.shared.get(), 100);
        assert_eq!(answers.len(), 1);
    }

    #[test]
    fn the_key_ignores_index_wait_and_token_and_parameter_order() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let a = key(
            "h",
            "web",
            &pairs(&[("index", "1"), ("passing", ""), ("tag", "v1")]),
        );
        let b = key(
            "h",
            "web",
            &pairs(&[
                ("tag", "v1"),
                ("wait", "5s"),
                ("passing", ""),
                ("token", "t"),
            ]),
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            key("h", "web", &pairs(&[("tag", "v2"), ("passing", "")]))
        );
        assert_ne!(
            a,
            key("h", "api", &pairs(&[("tag", "v1"), ("passing", "")]))
        );
    }
}
