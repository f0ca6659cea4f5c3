//! The request core every transport shares: which endpoint a request (or an
//! L4 connection) tries next, and what each attempt counts for.
//!
//! - [`Attempts::pick`]: balance, set or clear fail-open, enter the
//!   endpoint (its in-flight count); an endpoint withdrawn since the
//!   request's snapshot makes a first attempt reload the service (a few
//!   times at most) and a later one skip it, neither counted as a retry.
//! - [`Attempts::judge`]: an attempt's [`Ending`] counts against the
//!   endpoint (outlier ejection) or for it, and decides whether another
//!   endpoint gets the request: within the route's retries, the service's
//!   retry budget, and only when the request can be sent again.
//!
//! HTTP/1.1 (`conn.rs`), hyper's side (`h2_tls.rs`: HTTP/2, TLS, gRPC) and
//! L4 (`tcp.rs`) move the bytes and shape the answers around it.

use std::sync::Arc;

use crate::backend::ProxyService;
use crate::balance::{self, Backends, Choice, Tried};
use crate::config::Config;
use crate::stats::{Backend, ServiceStats};

/// How one attempt ended, as its transport tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The endpoint answered with `status`.
    Answered { status: u16, grpc: Grpc },
    /// Nothing reached the endpoint: no connection, a refused stream, or a
    /// request its pooled connection closed before sending.
    Unsent,
    /// The connection broke, or the answer was malformed, after the request
    /// went out.
    Broken,
    /// No answer in time.
    Timeout,
    /// The client went away or sent a bad body: the endpoint is not at fault.
    Client,
    /// The client's body fell below `http.min_body_rate`: not the endpoint's
    /// fault either.
    SlowClient,
}

/// A gRPC answer's status as known when its head arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Grpc {
    /// Not a gRPC call (judged by its HTTP status alone).
    #[default]
    No,
    /// A gRPC call whose status comes in its trailers: judged when its body
    /// ends, not here.
    Later,
    /// A trailers-only answer: `failure` when its code counts against the
    /// endpoint (UNAVAILABLE, INTERNAL, UNKNOWN), `retry_on` when the
    /// route's `retry_grpc_on` lists it.
    Status { failure: bool, retry_on: bool },
}

/// Whether the request can go to another endpoint after an attempt.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Replay {
    /// Its body is in hand (or it has none): it can be sent again.
    pub(crate) replayable: bool,
    /// Its method may be repeated after the endpoint may have seen it.
    pub(crate) idempotent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Another endpoint gets the request (a retry taken from the budget).
    Retry,
    /// The attempt's outcome is the request's.
    Done,
}

/// One request's attempts. `Default` picks only (L4 connections, which
/// judge nothing).
#[derive(Default)]
pub(crate) struct Attempts {
    tried: Tried,
    reloads: u8,
    /// Endpoints found withdrawn after the snapshot: tried, not retries.
    skipped: usize,
    /// Whether the request can go to another endpoint.
    replay: Replay,
    /// The route's retries.
    retries: u32,
    /// Endpoints the request may go to, when fewer than the service's
    /// (a split's subset).
    candidates: Option<usize>,
}

/// A first attempt that finds its endpoint withdrawn takes a newer snapshot
/// of the service this many times at most.
const MAX_RELOADS: u8 = 3;

impl Attempts {
    /// The attempts of a request that may be `replay`ed `retries` times.
    pub(crate) fn new(replay: Replay, retries: u32) -> Attempts {
        Attempts {
            replay,
            retries,
            ..Attempts::default()
        }
    }

    /// Endpoints picked and entered so far.
    pub(crate) fn made(&self) -> usize {
        self.tried.count() - self.skipped
    }

    /// The next endpoint to try, entered (the caller leaves it when the
    /// exchange is over); `None` when none is left. `reload` gives the
    /// service's newest snapshot.
    pub(crate) fn pick(
        &mut self,
        service: &mut Arc<ProxyService>,
        stats: &ServiceStats,
        choice: Choice<'_>,
        now: u64,
        rng: &mut fastrand::Rng,
        mut reload: impl FnMut() -> Option<Arc<ProxyService>>,
    ) -> Option<u32> {
        loop {
            let (index, fail_open) = match choice.subset {
                None => balance::pick_with(&service.backends, choice, &self.tried, now, rng)?,
                Some(tag) => {
                    let subset = service.subset(tag);
                    self.candidates = Some(subset.backends.len());
                    let tried = self.tried.within(&subset.full);
                    let (at, open) =
                        balance::pick_with(&subset.backends, choice, &tried, now, rng)?;
                    (subset.full[at as usize], open)
                }
            };
            let first = self.tried.count() == 0;
            stats.after_pick(fail_open, first, &service.backends, now);
            if service.backends[index as usize].stats.enter() {
                self.tried.add(index);
                return Some(index);
            }
            if first && self.reloads < MAX_RELOADS {
                if let Some(newer) = reload() {
                    self.reloads += 1;
                    *service = newer;
                    continue;
                }
            }
            self.tried.add(index);
            self.skipped += 1;
        }
    }

    /// Counts an attempt's `ending` for or against `backend` (one of
    /// `backends`) and says whether another endpoint gets the request.
    pub(crate) fn judge(
        &mut self,
        ending: Ending,
        backend: &Backend,
        backends: &Backends,
        stats: &ServiceStats,
        config: &Config,
        now: u64,
    ) -> Verdict {
        let replay = self.replay;
        let failed = match ending {
            Ending::Answered { status, grpc } => {
                status >= 500 || matches!(grpc, Grpc::Status { failure: true, .. })
            }
            Ending::Unsent | Ending::Broken | Ending::Timeout => true,
            Ending::Client | Ending::SlowClient => false,
        };
        let retryable = match ending {
            Ending::Unsent => replay.replayable,
            Ending::Broken
            | Ending::Answered {
                status: 502 | 503, ..
            } => replay.replayable && replay.idempotent,
            Ending::Answered {
                grpc: Grpc::Status { retry_on, .. },
                ..
            } => retry_on && replay.replayable,
            _ => false,
        };
        if failed {
            backend.stats.failed(now, &config.outlier, stats, backends);
        }
        let candidates = self
            .candidates
            .map_or(backends.len(), |n| n.min(backends.len()));
        let more = self.made() <= self.retries as usize && self.tried.count() < candidates;
        if retryable
            && more
            && stats.take_retry(now, config.retry_budget_ratio, config.retry_budget_floor)
        {
            return Verdict::Retry;
        }
        if !failed && matches!(ending, Ending::Answered { grpc, .. } if grpc != Grpc::Later) {
            backend.stats.succeeded(now);
        }
        Verdict::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProxyMetrics;
    use crate::stats::EndpointStats;

    struct Fixture {
        backends: Backends,
        stats: ServiceStats,
        config: Config,
    }

    fn fixture(endpoints: usize) -> Fixture {
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let backends = (0..endpoints)
            .map(|i| {
                let id = format!("ep-{i}");
                Backend {
                    stats: Arc::new(EndpointStats::new(
                        id.as_str().into(),
                        "node".into(),
                        metrics.endpoint("svc", "node", &id),
                    )),
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    weight: 1,
                    endpoint: None,
                }
            })
            .collect();
        let config = Config {
            retry_budget_floor: 100,
            ..Config::default()
        };
        Fixture {
            backends: Backends::new(backends),
            stats: ServiceStats::new("svc".into(), metrics.service("svc")),
            config,
        }
    }

    const ANY: Replay = Replay {
        replayable: true,
        idempotent: true,
    };
    const POST: Replay = Replay {
        replayable: true,
        idempotent: false,
    };
    const STREAMED: Replay = Replay {
        replayable: false,
        idempotent: true,
    };

    /// The first attempt's verdict on `ending` for `replay`, with retries left.
    fn first(ending: Ending, replay: Replay) -> Verdict {
        let f = fixture(3);
        let mut attempts = Attempts::new(replay, 2);
        attempts.tried.add(0);
        attempts.judge(ending, &f.backends[0], &f.backends, &f.stats, &f.config, 1)
    }

    #[test]
    fn what_each_ending_may_retry() {
        let answered = |status| Ending::Answered {
            status,
            grpc: Grpc::No,
        };
        // Nothing reached the endpoint: any request whose body is in hand.
        assert_eq!(first(Ending::Unsent, POST), Verdict::Retry);
        assert_eq!(first(Ending::Unsent, STREAMED), Verdict::Done);
        // The endpoint may have seen it: idempotent methods only.
        for ending in [Ending::Broken, answered(502), answered(503)] {
            assert_eq!(first(ending, ANY), Verdict::Retry, "{ending:?}");
            assert_eq!(first(ending, POST), Verdict::Done, "{ending:?}");
            assert_eq!(first(ending, STREAMED), Verdict::Done, "{ending:?}");
        }
        // Never: an answer, a timeout, the client's own fault.
        for ending in [
            answered(200),
            answered(500),
            answered(504),
            Ending::Timeout,
            Ending::Client,
            Ending::SlowClient,
        ] {
            assert_eq!(first(ending, ANY), Verdict::Done, "{ending:?}");
        }
        // A trailers-only gRPC status the route lists, message in hand.
        let grpc = |retry_on| Ending::Answered {
            status: 200,
            grpc: Grpc::Status {
                failure: true,
                retry_on,
            },
        };
        assert_eq!(first(grpc(true), POST), Verdict::Retry);
        assert_eq!(first(grpc(true), STREAMED), Verdict::Done);
        assert_eq!(first(grpc(false), POST), Verdict::Done);
    }

    #[test]
    fn retries_stop_at_the_route_limit_and_at_the_last_endpoint() {
        let f = fixture(3);
        let judge = |attempts: &mut Attempts| {
            attempts.judge(
                Ending::Unsent,
                &f.backends[0],
                &f.backends,
                &f.stats,
                &f.config,
                1,
            )
        };
        let mut attempts = Attempts::new(ANY, 1);
        attempts.tried.add(0);
        assert_eq!(judge(&mut attempts), Verdict::Retry);
        attempts.tried.add(1);
        assert_eq!(judge(&mut attempts), Verdict::Done, "retries = 1");
        // Skipped (withdrawn) endpoints are no retries, but they are tried.
        let mut attempts = Attempts::new(ANY, 1);
        attempts.tried.add(0);
        attempts.tried.add(1);
        attempts.skipped = 1;
        assert_eq!(judge(&mut attempts), Verdict::Retry);
        attempts.tried.add(2);
        assert_eq!(judge(&mut attempts), Verdict::Done, "none left to try");
    }

    #[test]
    fn failures_count_against_the_endpoint_and_the_client_s_do_not() {
        let outlier = crate::config::OutlierConfig {
            consecutive_failures: 1,
            max_ejected_percent: 100,
            ..crate::config::OutlierConfig::default()
        };
        for (ending, ejected) in [
            (Ending::Unsent, true),
            (Ending::Broken, true),
            (Ending::Timeout, true),
            (
                Ending::Answered {
                    status: 500,
                    grpc: Grpc::No,
                },
                true,
            ),
            (
                Ending::Answered {
                    status: 200,
                    grpc: Grpc::Status {
                        failure: true,
                        retry_on: false,
                    },
                },
                true,
            ),
            (Ending::Client, false),
            (Ending::SlowClient, false),
            (
                Ending::Answered {
                    status: 404,
                    grpc: Grpc::No,
                },
                false,
            ),
        ] {
            let mut f = fixture(3);
            f.config.outlier = outlier.clone();
            let mut attempts = Attempts::new(STREAMED, 0);
            attempts.tried.add(0);
            attempts.judge(ending, &f.backends[0], &f.backends, &f.stats, &f.config, 1);
            assert_eq!(f.backends[0].stats.is_ejected(1), ejected, "{ending:?}");
        }
    }
}
