//! The agent's open-descriptor budget: a share of `RLIMIT_NOFILE` for each
//! role's connections, so that a flood on one listener runs into its own
//! cap and never takes the descriptors the others need. The agent raises
//! its soft limit to the hard one before drawing it (`agent.rs`).
//!
//! Of the limit, `64 + limit/8` stays with the agent itself (store files,
//! listeners, rings, pipes, health probes, etcd). The rest is shared:
//! the proxy 60% (half for client connections, half for their upstream
//! connections and the pools), the API 25%, DNS over TCP 10%, the metrics
//! listener 5%. A cap of 0 (the default) means the share; a configured cap
//! above its share is kept, as the operator's choice, with a warning that
//! the caps together no longer fit the limit.

use crate::config::AgentConfig;

/// Connections each role may hold open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The soft limit the budget was drawn from.
    pub(crate) limit: u64,
    /// Client connections of the proxy (HTTP, HTTPS and L4 together).
    pub(crate) proxy: usize,
    pub(crate) api: usize,
    pub(crate) dns_tcp: usize,
    pub(crate) metrics: usize,
}

impl Budget {
    /// The budget of this process's soft limit.
    pub(crate) fn current() -> Budget {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        // No limit at all: budget as for a generous one.
        Budget::of(limit.current.unwrap_or(1 << 20))
    }

    pub(crate) fn of(limit: u64) -> Budget {
        let shared = limit.saturating_sub(64 + limit / 8);
        let share = |percent: u64| (shared * percent / 100).max(8) as usize;
        Budget {
            limit,
            proxy: share(60) / 2,
            api: share(25),
            dns_tcp: share(10),
            metrics: share(5),
        }
    }

    /// Draws the budget of the soft limit in force for `config`, warning
    /// of each configured cap over its share. The agent calls it after raising its limit, on
    /// each configuration it runs (start and reload alike).
    pub(crate) fn draw(config: &mut AgentConfig) -> Budget {
        let budget = Budget::current();
        for over in budget.apply(config) {
            tracing::warn!("{over}");
        }
        budget
    }

    /// Sets each role's connection cap in `config` that is 0 to its share.
    /// Returns a warning for each configured cap over its share.
    pub(crate) fn apply(&self, config: &mut AgentConfig) -> Vec<String> {
        let mut over = Vec::new();
        let mut fit = |key: &str, value: &mut usize, share: usize| {
            if *value > share {
                over.push(format!(
                    "{key} = {} is over its share ({share}) of the open-descriptor limit ({}): a flood on it can take descriptors the other roles need; raise the limit (LimitNOFILE) instead",
                    *value, self.limit
                ));
            }
            if *value == 0 {
                *value = share;
            }
        };
        fit(
            "http.max_connections",
            &mut config.http.max_connections,
            self.proxy,
        );
        fit(
            "api.max_connections",
            &mut config.api.max_connections,
            self.api,
        );
        fit(
            "dns.max_tcp_connections",
            &mut config.dns.max_tcp_connections,
            self.dns_tcp,
        );
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_leave_room_for_the_agent_and_fit_the_limit() {
        for limit in [256u64, 1024, 20_000, 1 << 20] {
            let b = Budget::of(limit);
            let used = (b.proxy * 2 + b.api + b.dns_tcp + b.metrics) as u64;
            assert!(used + 64 + limit / 8 <= limit, "{limit}: {b:?}");
            assert!(b.api >= 8 && b.dns_tcp >= 8 && b.proxy >= 8, "{b:?}");
        }
    }

    #[test]
    fn zero_takes_the_share_and_a_larger_cap_is_kept_with_a_warning() {
        let budget = Budget::of(20_000);
        let mut config = AgentConfig::default();
        config.api.max_connections = 100;
        config.dns.max_tcp_connections = 1_000_000;
        let over = budget.apply(&mut config);
        assert_eq!(config.http.max_connections, budget.proxy);
        assert_eq!(config.api.max_connections, 100);
        assert_eq!(config.dns.max_tcp_connections, 1_000_000);
        assert_eq!(over.len(), 1);
        assert!(over[0].contains("dns.max_tcp_connections"), "{over:?}");
    }
}
