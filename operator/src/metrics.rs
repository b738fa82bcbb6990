//! The operator's Prometheus metrics.
//!
//! Names are `chorus_operator_*`. Labels are bounded: error categories are a static set
//! ([`crate::error::Error::category`]) and phases are four; nothing is labelled by conference.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Reconcile counters, durations, errors, conferences by phase and leadership.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    conferences: IntGaugeVec,
    leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new(
            "chorus_operator_reconciles_total",
            "Reconciles of Conference resources started.",
        )
        .expect("static metric definition is valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "chorus_operator_reconcile_errors_total",
                "Failed reconciles, by error category.",
            ),
            &["category"],
        )
        .expect("static metric definition is valid");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "chorus_operator_reconcile_duration_seconds",
                "Time one reconcile of one Conference takes.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("static metric definition is valid");
        let conferences = IntGaugeVec::new(
            Opts::new("chorus_operator_conferences", "Conferences, by phase."),
            &["phase"],
        )
        .expect("static metric definition is valid");
        let leader = IntGauge::new(
            "chorus_operator_leader",
            "1 while this replica holds the leader lease and reconciles.",
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(conferences.clone()),
            Box::new(leader.clone()),
        ] {
            registry
                .register(c)
                .expect("each metric name is registered once");
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            conferences,
            leader,
        }
    }

    /// Count a reconcile and time it until the returned guard drops.
    pub fn reconcile_started(&self) -> prometheus::HistogramTimer {
        self.reconciles.inc();
        self.duration.start_timer()
    }

    /// Count a failed reconcile.
    pub fn reconcile_failed(&self, category: &'static str) {
        self.errors.with_label_values(&[category]).inc();
    }

    /// Set the number of conferences in each phase (every phase, zeros included).
    pub fn set_conferences(&self, counts: &[(&'static str, i64)]) {
        for (phase, n) in counts {
            self.conferences.with_label_values(&[phase]).set(*n);
        }
    }

    /// Record whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding gathered metrics into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
