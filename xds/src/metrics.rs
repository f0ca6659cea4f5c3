//! xDS metrics, on the agent's registry.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::resources::Kind;

pub struct XdsMetrics {
    pub(crate) streams: IntGauge,
    subscriptions: IntGaugeVec,
    pushes: IntCounterVec,
    nacks: IntCounterVec,
    pub(crate) push_seconds: Histogram,
    refused: IntCounterVec,
}

impl XdsMetrics {
    pub fn new(registry: &Registry) -> Result<XdsMetrics, prometheus::Error> {
        let streams = IntGauge::new("switchyard_xds_streams", "Open ADS streams")?;
        let subscriptions = IntGaugeVec::new(
            Opts::new(
                "switchyard_xds_subscriptions",
                "Resources subscribed over all ADS streams, by type",
            ),
            &["type"],
        )?;
        let pushes = IntCounterVec::new(
            Opts::new("switchyard_xds_pushes_total", "ADS responses sent, by type"),
            &["type"],
        )?;
        let nacks = IntCounterVec::new(
            Opts::new(
                "switchyard_xds_nacks_total",
                "ADS responses a client refused (NACK), by type",
            ),
            &["type"],
        )?;
        let push_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_xds_push_seconds",
                "Time from a catalog change's publication to its ADS response being sent",
            )
            .buckets(exponential_buckets(0.000_05, 2.0, 16)?),
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "switchyard_xds_refused_total",
                "ADS streams refused or ended by the server, by reason",
            ),
            &["reason"],
        )?;
        // Every series exists from the start (a dashboard's rate of NACKs
        // reads 0, not nothing).
        for kind in Kind::ALL {
            subscriptions.with_label_values(&[kind.label()]);
            pushes.with_label_values(&[kind.label()]);
            nacks.with_label_values(&[kind.label()]);
        }
        for reason in ["token", "max_streams", "max_subscriptions"] {
            refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(streams.clone()))?;
        registry.register(Box::new(subscriptions.clone()))?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(nacks.clone()))?;
        registry.register(Box::new(push_seconds.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(XdsMetrics {
            streams,
            subscriptions,
            pushes,
            nacks,
            push_seconds,
            refused,
        })
    }

    pub(crate) fn subscriptions(&self, kind: Kind) -> IntGauge {
        self.subscriptions.with_label_values(&[kind.label()])
    }

    pub(crate) fn pushes(&self, kind: Kind) -> IntCounter {
        self.pushes.with_label_values(&[kind.label()])
    }

    pub(crate) fn nacks(&self, kind: Kind) -> IntCounter {
        self.nacks.with_label_values(&[kind.label()])
    }

    pub(crate) fn refused(&self, reason: &str) -> IntCounter {
        self.refused.with_label_values(&[reason])
    }
}
