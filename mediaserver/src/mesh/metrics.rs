//! Prometheus collectors of the mesh (DESIGN.md §8), all prefixed `chorus_mesh_`.
//!
//! Labels are bounded: `peer` takes the ids of the plan's servers (a handful per conference, and
//! [`MeshMetrics::forget_peer`] drops a removed server's series), `direction` is `in` or `out`,
//! `category` is a static [`MeshError::category`]. Nothing is labelled by room or participant.
//!
//! The protocol core keeps plain cumulative counters ([`MeshCounters`]); [`MeshMetrics::observe`]
//! adds what moved since the last call, so the core stays free of Prometheus.
//!
//! Invariant: every collector is created once, in [`MeshMetrics::new`]; the names here are the
//! ones the Grafana dashboards query.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::error::MeshError;
use super::protocol::{MeshCounters, MeshNodeState};

/// Traffic direction label values.
pub const DIRECTION_IN: &str = "in";
/// Traffic direction label values.
pub const DIRECTION_OUT: &str = "out";

/// The mesh's collectors. Cheap to clone (the collectors are shared handles).
#[derive(Clone, Debug)]
pub struct MeshMetrics {
    /// `chorus_mesh_rtt_seconds{peer}`: the latest round-trip time to each peer.
    pub rtt: GaugeVec,
    /// `chorus_mesh_bytes_total{peer,direction}`: mesh payload bytes (control frames and media
    /// datagrams, without QUIC/UDP overhead).
    pub bytes: IntCounterVec,
    /// `chorus_mesh_datagrams_total{peer,direction}`: media datagrams.
    pub datagrams: IntCounterVec,
    /// `chorus_mesh_global_list_changes_total`: new global list epochs emitted by this server.
    pub global_list_changes: IntCounter,
    /// `chorus_mesh_consistent_ticks_total`: primary-side ticks at which every server mixed the
    /// current epoch.
    pub consistent_ticks: IntCounter,
    /// `chorus_mesh_ticks_total`: primary-side ticks counted.
    pub ticks: IntCounter,
    /// `chorus_mesh_lists_late_total`: global lists that reached this server after their
    /// switch tick (it switched on arrival).
    pub lists_late: IntCounter,
    /// `chorus_mesh_forwarded_streams`: stream copies this server forwards now.
    pub forwarded_streams: IntGauge,
    /// `chorus_mesh_cross_server_delay_seconds`: origin ingress to arrival here.
    pub cross_server_delay: Histogram,
    /// `chorus_mesh_plan_generation`: the mesh plan generation this server runs.
    pub plan_generation: IntGauge,
    /// `chorus_mesh_errors_total{category}`: refused messages, datagrams and connections.
    pub errors: IntCounterVec,
    last: Arc<Mutex<MeshCounters>>,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshMetrics {
    /// Create every collector (not yet registered).
    pub fn new() -> Self {
        let ms = |v: &[f64]| v.iter().map(|x| x / 1000.0).collect::<Vec<_>>();
        Self {
            rtt: GaugeVec::new(
                Opts::new(
                    "chorus_mesh_rtt_seconds",
                    "Latest round-trip time to each mesh peer.",
                ),
                &["peer"],
            )
            .expect("static metric definition is valid"),
            bytes: IntCounterVec::new(
                Opts::new(
                    "chorus_mesh_bytes_total",
                    "Mesh payload bytes (control frames and media datagrams) per peer and direction.",
                ),
                &["peer", "direction"],
            )
            .expect("static metric definition is valid"),
            datagrams: IntCounterVec::new(
                Opts::new(
                    "chorus_mesh_datagrams_total",
                    "Media datagrams per mesh peer and direction.",
                ),
                &["peer", "direction"],
            )
            .expect("static metric definition is valid"),
            global_list_changes: IntCounter::new(
                "chorus_mesh_global_list_changes_total",
                "Global top list changes (new epochs) emitted by this server as a room's primary.",
            )
            .expect("static metric definition is valid"),
            consistent_ticks: IntCounter::new(
                "chorus_mesh_consistent_ticks_total",
                "Primary-side frame ticks at which every server with participants mixed the global list epoch in force.",
            )
            .expect("static metric definition is valid"),
            ticks: IntCounter::new(
                "chorus_mesh_ticks_total",
                "Primary-side frame ticks counted for the consistency ratio.",
            )
            .expect("static metric definition is valid"),
            lists_late: IntCounter::new(
                "chorus_mesh_lists_late_total",
                "Global lists that reached this server after the tick they were stamped for.",
            )
            .expect("static metric definition is valid"),
            forwarded_streams: IntGauge::new(
                "chorus_mesh_forwarded_streams",
                "Stream copies this server forwards to other servers now (streams x targets).",
            )
            .expect("static metric definition is valid"),
            cross_server_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "chorus_mesh_cross_server_delay_seconds",
                    "Delay from ingress at the origin server to arrival at this server.",
                )
                .buckets(ms(&[
                    1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0,
                ])),
            )
            .expect("static metric definition is valid"),
            plan_generation: IntGauge::new(
                "chorus_mesh_plan_generation",
                "The mesh plan generation this server runs.",
            )
            .expect("static metric definition is valid"),
            errors: IntCounterVec::new(
                Opts::new(
                    "chorus_mesh_errors_total",
                    "Mesh messages, datagrams and connections refused, by category.",
                ),
                &["category"],
            )
            .expect("static metric definition is valid"),
            last: Arc::new(Mutex::new(MeshCounters::default())),
        }
    }

    /// Every collector, for a registry of the caller's choice.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.rtt.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.datagrams.clone()),
            Box::new(self.global_list_changes.clone()),
            Box::new(self.consistent_ticks.clone()),
            Box::new(self.ticks.clone()),
            Box::new(self.lists_late.clone()),
            Box::new(self.forwarded_streams.clone()),
            Box::new(self.cross_server_delay.clone()),
            Box::new(self.plan_generation.clone()),
            Box::new(self.errors.clone()),
        ]
    }

    /// Register every collector in `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        for c in self.collectors() {
            registry.register(c)?;
        }
        Ok(())
    }

    /// Bring the protocol-side metrics up to date with `state`: counters advance by what moved
    /// since the last call, gauges are set.
    pub fn observe(&self, state: &MeshNodeState) {
        let now = state.counters();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let delta = |new: u64, old: u64| new.saturating_sub(old);
        self.global_list_changes
            .inc_by(delta(now.global_list_changes, last.global_list_changes));
        self.ticks.inc_by(delta(now.ticks, last.ticks));
        self.consistent_ticks
            .inc_by(delta(now.consistent_ticks, last.consistent_ticks));
        self.lists_late
            .inc_by(delta(now.lists_late, last.lists_late));
        *last = now;
        drop(last);
        self.forwarded_streams
            .set(i64::try_from(state.forwarded_stream_count()).unwrap_or(i64::MAX));
        self.plan_generation.set(state.plan_generation());
    }

    /// One datagram's cross-server delay.
    pub fn observe_cross_server_delay(&self, delay: Duration) {
        self.cross_server_delay.observe(delay.as_secs_f64());
    }

    /// Count a refused message, datagram or connection.
    pub fn record_error(&self, error: &MeshError) {
        self.errors.with_label_values(&[error.category()]).inc();
    }

    /// Count traffic with a peer.
    pub fn record_traffic(
        &self,
        peer: &str,
        direction: &'static str,
        bytes: usize,
        datagram: bool,
    ) {
        self.bytes
            .with_label_values(&[peer, direction])
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
        if datagram {
            self.datagrams.with_label_values(&[peer, direction]).inc();
        }
    }

    /// Set a peer's round-trip time.
    pub fn set_rtt(&self, peer: &str, rtt: Duration) {
        self.rtt.with_label_values(&[peer]).set(rtt.as_secs_f64());
    }

    /// Drop every series of a peer that left the plan.
    pub fn forget_peer(&self, peer: &str) {
        let _ = self.rtt.remove_label_values(&[peer]);
        for direction in [DIRECTION_IN, DIRECTION_OUT] {
            let _ = self.bytes.remove_label_values(&[peer, direction]);
            let _ = self.datagrams.remove_label_values(&[peer, direction]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_metrics_register_with_the_documented_names() {
        let m = MeshMetrics::new();
        let registry = Registry::new();
        m.register(&registry).unwrap();
        m.record_traffic("b", DIRECTION_OUT, 100, true);
        m.set_rtt("b", Duration::from_millis(3));
        m.record_error(&MeshError::Closed);
        m.observe_cross_server_delay(Duration::from_millis(12));
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for want in [
            "chorus_mesh_rtt_seconds",
            "chorus_mesh_bytes_total",
            "chorus_mesh_datagrams_total",
            "chorus_mesh_global_list_changes_total",
            "chorus_mesh_consistent_ticks_total",
            "chorus_mesh_ticks_total",
            "chorus_mesh_lists_late_total",
            "chorus_mesh_forwarded_streams",
            "chorus_mesh_cross_server_delay_seconds",
            "chorus_mesh_plan_generation",
            "chorus_mesh_errors_total",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing in {names:?}"
            );
        }
        m.forget_peer("b");
    }
}
