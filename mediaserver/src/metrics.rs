//! The media server's Prometheus metrics (DESIGN §8), all prefixed `chorus_`.
//!
//! Labels are bounded: reasons are static strings; nothing is labelled by participant or by room
//! (rooms are unbounded). Per-tick figures are histograms, so `sum/count` gives the mean per tick
//! and the buckets give the spread.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of one media server.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Ingress arrival to the first egress packet carrying that audio.
    pub server_delay: Histogram,
    /// Jitter-buffer depth of mixed streams, sampled each tick.
    pub jitter_depth: Histogram,
    /// How long one mixer tick takes.
    pub tick_duration: Histogram,
    /// How late past its deadline a room's tick woke (the timer's and the scheduler's share of
    /// server-added delay).
    pub tick_lateness: Histogram,
    /// How long before its deadline a room's tick ran because the talkers it waits for were all
    /// here (0 for a tick that ran at its deadline).
    pub tick_early: Histogram,
    /// Opus decodes in one tick of one room.
    pub decodes_per_tick: Histogram,
    /// Opus encodes in one tick of one room.
    pub encodes_per_tick: Histogram,
    /// Mixer ticks run.
    pub ticks: IntCounter,
    /// Participants connected.
    pub participants: IntGauge,
    /// Rooms with participants.
    pub rooms: IntGauge,
    /// Streams mixed right now, over all rooms.
    pub active_speakers: IntGauge,
    /// RTP packets received from participants.
    pub packets_received: IntCounter,
    /// Packets the jitter buffers found missing.
    pub packets_lost: IntCounter,
    /// Datagrams or packets dropped as malformed, by reason.
    pub packets_dropped: IntCounterVec,
    /// Joins refused, by reason.
    pub joins_rejected: IntCounterVec,
    /// Frames concealed (PLC) or recovered (FEC), by kind.
    pub concealed: IntCounterVec,
    /// The jitter buffers' changes of delay and their causes, by kind.
    pub jitter_adjustments: IntCounterVec,
    /// Transfer codes issued.
    pub transfer_codes: IntCounter,
    /// Transfer redemptions, by outcome.
    pub transfer_redemptions: IntCounterVec,
    /// A redemption's swap to the first audio from the new device.
    pub transfer_switch: Histogram,
    /// The last packet from the old device to the first from the new one.
    pub transfer_gap: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("static metric definition is valid")
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let ms = |v: &[f64]| v.iter().map(|x| x / 1000.0).collect::<Vec<_>>();
        let counts = vec![
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0,
        ];
        let m = Self {
            registry: Registry::new(),
            server_delay: histogram(
                "chorus_server_delay_seconds",
                "Server-added delay: ingress arrival of a packet to the first egress packet carrying its audio.",
                ms(&[2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 80.0, 120.0, 200.0]),
            ),
            jitter_depth: histogram(
                "chorus_jitter_buffer_depth_seconds",
                "Jitter-buffer depth of mixed streams, sampled every tick.",
                ms(&[0.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 200.0, 400.0]),
            ),
            tick_duration: histogram(
                "chorus_mixer_tick_duration_seconds",
                "Time one mixer tick of one room takes (decode, mix, encode).",
                ms(&[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]),
            ),
            tick_lateness: histogram(
                "chorus_mixer_tick_lateness_seconds",
                "How late past its deadline a room's mixer tick woke.",
                ms(&[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]),
            ),
            tick_early: histogram(
                "chorus_mixer_tick_early_seconds",
                "How long before its deadline a room's mixer tick ran because the talkers it waits for had all arrived (0 at the deadline).",
                ms(&[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0]),
            ),
            decodes_per_tick: histogram(
                "chorus_mixer_decodes_per_tick",
                "Opus decodes in one tick of one room.",
                counts.clone(),
            ),
            encodes_per_tick: histogram(
                "chorus_mixer_encodes_per_tick",
                "Opus encodes in one tick of one room: local top speakers + 1.",
                counts,
            ),
            ticks: IntCounter::new("chorus_mixer_ticks_total", "Mixer ticks run, over all rooms.")
                .expect("static metric definition is valid"),
            participants: IntGauge::new("chorus_participants", "Participants connected to this server.")
                .expect("static metric definition is valid"),
            rooms: IntGauge::new("chorus_rooms", "Rooms with participants on this server.")
                .expect("static metric definition is valid"),
            active_speakers: IntGauge::new(
                "chorus_active_speakers",
                "Streams being mixed right now, over all rooms.",
            )
            .expect("static metric definition is valid"),
            packets_received: IntCounter::new(
                "chorus_packets_received_total",
                "RTP audio packets received from participants.",
            )
            .expect("static metric definition is valid"),
            packets_lost: IntCounter::new(
                "chorus_packets_lost_total",
                "Packets the jitter buffers found missing at playout.",
            )
            .expect("static metric definition is valid"),
            packets_dropped: IntCounterVec::new(
                Opts::new(
                    "chorus_packets_dropped_total",
                    "Datagrams or packets dropped, by reason (malformed, unknown source, late, ...).",
                ),
                &["reason"],
            )
            .expect("static metric definition is valid"),
            joins_rejected: IntCounterVec::new(
                Opts::new("chorus_joins_rejected_total", "Join requests refused, by reason."),
                &["reason"],
            )
            .expect("static metric definition is valid"),
            concealed: IntCounterVec::new(
                Opts::new(
                    "chorus_frames_concealed_total",
                    "Lost frames replaced by packet-loss concealment (plc) or recovered with in-band FEC (fec).",
                ),
                &["kind"],
            )
            .expect("static metric definition is valid"),
            jitter_adjustments: IntCounterVec::new(
                Opts::new(
                    "chorus_jitter_adjustments_total",
                    "Jitter-buffer events that change a talker's delay, by kind: late (a packet after its tick), underrun (ran dry: a pause, an end, or a packet that missed its tick), restart (played again after running dry, a frame or more later), stretch (a frame added), unstretch (an added frame taken back), shed (excess delay dropped).",
                ),
                &["kind"],
            )
            .expect("static metric definition is valid"),
            transfer_codes: IntCounter::new(
                "chorus_transfer_codes_issued_total",
                "Session transfer codes issued (QR codes shown).",
            )
            .expect("static metric definition is valid"),
            transfer_redemptions: IntCounterVec::new(
                Opts::new(
                    "chorus_transfer_redemptions_total",
                    "Transfer code redemptions, by outcome (ok, unknown, expired, used, gone, bad_offer, limited, ...).",
                ),
                &["outcome"],
            )
            .expect("static metric definition is valid"),
            transfer_switch: histogram(
                "chorus_transfer_switch_seconds",
                "Session transfer: the swap to the first audio packet from the new device.",
                ms(&[20.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0]),
            ),
            transfer_gap: histogram(
                "chorus_transfer_audio_gap_seconds",
                "Session transfer: the last audio packet from the old device to the first from the new one.",
                ms(&[20.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0]),
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.server_delay.clone()),
            Box::new(m.jitter_depth.clone()),
            Box::new(m.tick_duration.clone()),
            Box::new(m.tick_lateness.clone()),
            Box::new(m.tick_early.clone()),
            Box::new(m.decodes_per_tick.clone()),
            Box::new(m.encodes_per_tick.clone()),
            Box::new(m.ticks.clone()),
            Box::new(m.participants.clone()),
            Box::new(m.rooms.clone()),
            Box::new(m.active_speakers.clone()),
            Box::new(m.packets_received.clone()),
            Box::new(m.packets_lost.clone()),
            Box::new(m.packets_dropped.clone()),
            Box::new(m.joins_rejected.clone()),
            Box::new(m.concealed.clone()),
            Box::new(m.jitter_adjustments.clone()),
            Box::new(m.transfer_codes.clone()),
            Box::new(m.transfer_redemptions.clone()),
            Box::new(m.transfer_switch.clone()),
            Box::new(m.transfer_gap.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("each metric name is registered once");
        }
        // Every kind from the start, so a dashboard's rate reads 0 rather than nothing.
        for kind in crate::media::JitterAdjustments::KINDS {
            m.jitter_adjustments.with_label_values(&[kind]);
        }
        m
    }

    /// Register an extra collector (the endpoint's port counters, the mesh's metrics).
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
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

/// The media port's own counters, read from [`crate::endpoint::MediaPort::stats`] at scrape time.
#[derive(Debug)]
pub struct PortCollector {
    port: std::sync::Arc<crate::endpoint::MediaPort>,
    datagrams: IntCounterVec,
    dropped: IntCounterVec,
    frames: IntCounterVec,
    peers: IntGauge,
    listeners: IntGauge,
    lane_frames: IntCounter,
    link_layer_datagrams: IntCounter,
    busy: prometheus::Gauge,
}

impl PortCollector {
    /// A collector for `port`.
    pub fn new(port: std::sync::Arc<crate::endpoint::MediaPort>) -> Self {
        Self {
            port,
            datagrams: IntCounterVec::new(
                Opts::new("chorus_media_datagrams_total", "UDP datagrams on the media port, by direction."),
                &["direction"],
            )
            .expect("static metric definition is valid"),
            dropped: IntCounterVec::new(
                Opts::new(
                    "chorus_media_dropped_total",
                    "Datagrams or frames the media port dropped, by reason (malformed input, unknown source, full queues).",
                ),
                &["reason"],
            )
            .expect("static metric definition is valid"),
            frames: IntCounterVec::new(
                Opts::new("chorus_media_frames_total", "Opus frames through the media port, by direction."),
                &["direction"],
            )
            .expect("static metric definition is valid"),
            peers: IntGauge::new("chorus_media_peers", "WebRTC peers on the media port.")
                .expect("static metric definition is valid"),
            listeners: IntGauge::new(
                "chorus_media_listeners",
                "Receive-only peers on the media port's own listener transport (a subset of chorus_media_peers).",
            )
            .expect("static metric definition is valid"),
            lane_frames: IntCounter::new(
                "chorus_media_lane_frames_total",
                "Opus frames to listeners sealed and sent by the fan-out workers' lanes, a large room's frame split across threads (a subset of chorus_media_frames_total{direction=\"out\"}).",
            )
            .expect("static metric definition is valid"),
            link_layer_datagrams: IntCounter::new(
                "chorus_media_link_layer_datagrams_total",
                "Datagrams to listeners sent as whole Ethernet frames through packet sockets (--link-layer-fan-out), skipping the kernel's UDP/IP send path (a subset of chorus_media_datagrams_total{direction=\"out\"}).",
            )
            .expect("static metric definition is valid"),
            busy: prometheus::Gauge::new(
                "chorus_media_port_busy_ratio",
                "Share of the time the media port's task spends working rather than waiting (smoothed over about a second); above its limit (0.9) new participants are refused.",
            )
            .expect("static metric definition is valid"),
        }
    }
}

/// Move a counter up to `value` (the port's counters only grow).
fn catch_up(counter: &IntCounter, value: u64) {
    counter.inc_by(value.saturating_sub(counter.get()));
}

impl prometheus::core::Collector for PortCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.datagrams.desc();
        d.extend(self.dropped.desc());
        d.extend(self.frames.desc());
        d.extend(self.peers.desc());
        d.extend(self.listeners.desc());
        d.extend(self.lane_frames.desc());
        d.extend(self.link_layer_datagrams.desc());
        d.extend(self.busy.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let s = self.port.stats();
        catch_up(&self.datagrams.with_label_values(&["in"]), s.datagrams_in);
        catch_up(&self.datagrams.with_label_values(&["out"]), s.datagrams_out);
        catch_up(
            &self.dropped.with_label_values(&["malformed"]),
            s.dropped_malformed,
        );
        catch_up(
            &self.dropped.with_label_values(&["unroutable"]),
            s.dropped_unroutable,
        );
        catch_up(
            &self.dropped.with_label_values(&["inbound_queue"]),
            s.inbound_dropped,
        );
        catch_up(
            &self.dropped.with_label_values(&["outbound"]),
            s.outbound_dropped,
        );
        catch_up(
            &self.dropped.with_label_values(&["send_error"]),
            s.send_errors,
        );
        catch_up(&self.frames.with_label_values(&["in"]), s.inbound_frames);
        catch_up(&self.frames.with_label_values(&["out"]), s.outbound_frames);
        catch_up(&self.lane_frames, s.lane_frames);
        catch_up(&self.link_layer_datagrams, s.link_layer_datagrams);
        self.busy.set(s.busy_permille as f64 / 1000.0);
        self.peers.set(i64::try_from(s.peers).unwrap_or(i64::MAX));
        self.listeners
            .set(i64::try_from(s.listeners).unwrap_or(i64::MAX));
        let mut m = self.datagrams.collect();
        m.extend(self.dropped.collect());
        m.extend(self.frames.collect());
        m.extend(self.peers.collect());
        m.extend(self.listeners.collect());
        m.extend(self.lane_frames.collect());
        m.extend(self.link_layer_datagrams.collect());
        m.extend(self.busy.collect());
        m
    }
}
