//! Telephony metrics (DESIGN §8, §11), all prefixed `chorus_`.
//!
//! Labels are static and bounded: outcomes, response classes, directions and drop reasons. No
//! number, participant, room or call id is ever a label.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Every telephony metric of one media server.
#[derive(Debug, Clone)]
pub struct TelephonyMetrics {
    /// Calls ended, by outcome (the end reason).
    pub calls: IntCounterVec,
    /// Calls placed and not yet ended.
    pub active_calls: IntGauge,
    /// Call requests refused before dialling, by reason.
    pub refused: IntCounterVec,
    /// INVITE to the final response of answered calls.
    pub setup_seconds: Histogram,
    /// First ringing to the end of ringing (answer, cancel or refusal).
    pub ringing_seconds: Histogram,
    /// SIP responses to our requests, by class (`1xx` .. `6xx`).
    pub sip_responses: IntCounterVec,
    /// Phone RTP packets, by direction (`in`, `out`).
    pub rtp_packets: IntCounterVec,
    /// Phone RTP datagrams dropped, by reason.
    pub rtp_dropped: IntCounterVec,
    /// Frames transcoded between Opus and the phone's codec, by direction.
    pub transcodes: IntCounterVec,
    /// RFC 4733 DTMF key presses received from phones.
    pub dtmf_events: IntCounter,
    /// Edge bridges connected to this server, by whether their line is registered.
    pub edge_bridges: IntGaugeVec,
    /// Edge bridge connections refused, by reason.
    pub edge_refused: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).expect("static metric definition is valid")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static metric definition is valid")
}

impl TelephonyMetrics {
    /// Create the metrics (unregistered: see [`TelephonyMetrics::collectors`]).
    pub fn new() -> Self {
        let seconds = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0];
        Self {
            calls: counter_vec(
                "chorus_calls_total",
                "Phone calls ended, by outcome (the call's endReason).",
                "outcome",
            ),
            active_calls: IntGauge::new(
                "chorus_calls_active",
                "Phone calls placed by this server and not yet ended.",
            )
            .expect("static metric definition is valid"),
            refused: counter_vec(
                "chorus_call_requests_refused_total",
                "Call requests refused before dialling, by reason.",
                "reason",
            ),
            setup_seconds: histogram(
                "chorus_call_setup_seconds",
                "From the INVITE to the phone's 200 OK, for answered calls.",
                &seconds,
            ),
            ringing_seconds: histogram(
                "chorus_call_ringing_seconds",
                "How long phones rang (first 180/183 to the answer or the end).",
                &seconds,
            ),
            sip_responses: counter_vec(
                "chorus_sip_responses_total",
                "SIP responses to this server's requests, by class.",
                "class",
            ),
            rtp_packets: counter_vec(
                "chorus_phone_rtp_packets_total",
                "RTP packets of phone legs, by direction.",
                "direction",
            ),
            rtp_dropped: counter_vec(
                "chorus_phone_rtp_dropped_total",
                "Phone RTP datagrams dropped, by reason.",
                "reason",
            ),
            transcodes: counter_vec(
                "chorus_phone_transcodes_total",
                "Frames transcoded between Opus and a phone's codec, by direction.",
                "direction",
            ),
            dtmf_events: IntCounter::new(
                "chorus_phone_dtmf_events_total",
                "RFC 4733 key presses received from phones (never mixed as audio).",
            )
            .expect("static metric definition is valid"),
            edge_bridges: IntGaugeVec::new(
                Opts::new(
                    "chorus_edge_bridges",
                    "Edge bridges connected to this server, by whether their line is registered \
                     with the call manager.",
                ),
                &["registered"],
            )
            .expect("static metric definition is valid"),
            edge_refused: counter_vec(
                "chorus_edge_connections_refused_total",
                "Edge bridge connections refused, by reason.",
                "reason",
            ),
        }
    }

    /// Every collector, for registering with the server's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.calls.clone()),
            Box::new(self.active_calls.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.setup_seconds.clone()),
            Box::new(self.ringing_seconds.clone()),
            Box::new(self.sip_responses.clone()),
            Box::new(self.rtp_packets.clone()),
            Box::new(self.rtp_dropped.clone()),
            Box::new(self.transcodes.clone()),
            Box::new(self.dtmf_events.clone()),
            Box::new(self.edge_bridges.clone()),
            Box::new(self.edge_refused.clone()),
        ]
    }

    /// Count one SIP response by its class.
    pub fn sip_response(&self, status: u16) {
        let class = match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            5 => "5xx",
            _ => "6xx",
        };
        self.sip_responses.with_label_values(&[class]).inc();
    }
}

impl Default for TelephonyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
