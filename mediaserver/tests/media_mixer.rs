//! End-to-end tests of the media core's `RoomMixer` in virtual time: synthetic talkers encode
//! distinct tones with real libopus, the mixer mixes, and listeners decode what it sends and check
//! with Goertzel which tones they hear.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus_mediaserver::media::codec::{Decoder, Encoder};
use chorus_mediaserver::media::level::dbov_from_pcm;
use chorus_mediaserver::media::spectrum::{ToneGenerator, ToneReport};
use chorus_mediaserver::media::{
    AudioLevel, InboundPacket, MediaError, MixOutput, MixerConfig, RoomMixer, StreamId,
    StreamOrigin,
};

const FREQS: [f64; 5] = [300.0, 500.0, 700.0, 1100.0, 1300.0];
const LEVELS: [f64; 5] = [-10.0, -13.0, -16.0, -22.0, -25.0];

fn id(n: u64) -> StreamId {
    StreamId(n)
}

fn ids(v: &[u64]) -> Vec<StreamId> {
    v.iter().copied().map(StreamId).collect()
}

/// A synthetic participant: a tone through its own Opus encoder, RTP-style numbering.
struct Talker {
    id: StreamId,
    tone: ToneGenerator,
    enc: Encoder,
    seq: u16,
    ts: u32,
    rfc6464: bool,
}

impl Talker {
    fn new(id: StreamId, freq: f64, dbfs: f64, frame_ms: u32, rfc6464: bool) -> Self {
        Self {
            id,
            tone: ToneGenerator::new(freq, dbfs, 48_000),
            enc: Encoder::new(frame_ms).expect("encoder"),
            seq: 65_500, // wraps during every test
            ts: 4_000_000_000,
            rfc6464,
        }
    }

    fn packet(&mut self, arrival: Duration) -> InboundPacket {
        let pcm = self.tone.frame(self.enc.frame_samples());
        let payload = self.enc.encode(&pcm).expect("encode");
        let dbov = dbov_from_pcm(&pcm);
        let pkt = InboundPacket {
            stream: self.id,
            seq: self.seq,
            rtp_timestamp: self.ts,
            payload,
            level: self.rfc6464.then(|| AudioLevel {
                dbov: (-dbov).round().clamp(0.0, 127.0) as u8,
                voice: dbov > -60.0,
            }),
            arrival,
        };
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(self.enc.frame_samples() as u32);
        pkt
    }
}

/// A silent participant that sends RFC 6464 level 127 with one pre-encoded silent frame.
struct Silent {
    id: StreamId,
    payload: Bytes,
    seq: u16,
}

/// One room: the mixer, its talkers, and decoders standing in for listeners.
struct Room {
    mixer: RoomMixer,
    frame_ms: u32,
    talkers: Vec<Talker>,
    silent: Vec<Silent>,
    tick: u64,
    /// Listener decoders: `None` = a plain listener on the shared mix; `Some(id)` = speaker `id`.
    ears: BTreeMap<Option<StreamId>, (Decoder, Vec<i16>)>,
    recording: bool,
}

impl Room {
    fn new(cfg: MixerConfig) -> Self {
        Self {
            mixer: RoomMixer::new(cfg).expect("mixer"),
            frame_ms: cfg.frame_ms,
            talkers: Vec::new(),
            silent: Vec::new(),
            tick: 0,
            ears: BTreeMap::new(),
            recording: false,
        }
    }

    /// Five local tone talkers 1..=5 (FREQS at LEVELS).
    fn five(cfg: MixerConfig, rfc6464: bool) -> Self {
        let mut room = Self::new(cfg);
        for (i, (&f, &l)) in FREQS.iter().zip(&LEVELS).enumerate() {
            room.add_talker(id(i as u64 + 1), f, l, StreamOrigin::Local, rfc6464);
        }
        room
    }

    fn add_talker(&mut self, id: StreamId, freq: f64, dbfs: f64, origin: StreamOrigin, rfc: bool) {
        self.mixer.add_stream(id, origin);
        self.talkers
            .push(Talker::new(id, freq, dbfs, self.frame_ms, rfc));
    }

    fn add_silent(&mut self, id: StreamId) {
        self.mixer.add_stream(id, StreamOrigin::Local);
        let mut enc = Encoder::new(self.frame_ms).expect("encoder");
        let payload = enc.encode(&vec![0; enc.frame_samples()]).expect("encode");
        self.silent.push(Silent {
            id,
            payload,
            seq: 0,
        });
    }

    fn talker(&mut self, id: StreamId) -> &mut Talker {
        self.talkers
            .iter_mut()
            .find(|t| t.id == id)
            .expect("no such talker")
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.tick * u64::from(self.frame_ms))
    }

    fn push_all(&mut self, now: Duration, skip: &[StreamId]) {
        for t in &mut self.talkers {
            let pkt = t.packet(now);
            if !skip.contains(&t.id) {
                self.mixer.push(pkt).expect("valid packet refused");
            }
        }
        for s in &mut self.silent {
            let pkt = InboundPacket {
                stream: s.id,
                seq: s.seq,
                rtp_timestamp: u32::from(s.seq) * 960,
                payload: s.payload.clone(),
                level: Some(AudioLevel {
                    dbov: 127,
                    voice: false,
                }),
                arrival: now,
            };
            s.seq = s.seq.wrapping_add(1);
            self.mixer.push(pkt).expect("valid packet refused");
        }
    }

    /// One frame: every talker sends, the mixer ticks, listeners decode what they receive.
    fn step_skipping(&mut self, skip: &[StreamId]) -> MixOutput {
        let now = self.now();
        self.push_all(now, skip);
        let out = self.mixer.tick(now);
        self.tick += 1;
        self.hear(&out);
        out
    }

    fn step(&mut self) -> MixOutput {
        self.step_skipping(&[])
    }

    fn hear(&mut self, out: &MixOutput) {
        let frame_ms = self.frame_ms;
        let recording = self.recording;
        let mut feed = |key: Option<StreamId>, bytes: &Bytes| {
            let (dec, pcm) = self
                .ears
                .entry(key)
                .or_insert_with(|| (Decoder::new(frame_ms).expect("decoder"), Vec::new()));
            let frame = dec.decode(bytes).expect("mixer output must decode");
            if recording {
                pcm.extend(frame);
            }
        };
        feed(None, &out.shared);
        for (sid, bytes) in &out.per_speaker {
            feed(Some(*sid), bytes);
        }
    }

    fn run(&mut self, ticks: usize) -> Vec<MixOutput> {
        (0..ticks).map(|_| self.step()).collect()
    }

    /// Starts a fresh recording for every ear.
    fn record(&mut self) {
        self.recording = true;
        for (_, pcm) in self.ears.values_mut() {
            pcm.clear();
        }
    }

    fn report(&self, ear: Option<StreamId>) -> ToneReport {
        let pcm = &self.ears[&ear].1;
        assert!(
            pcm.len() >= 24_000,
            "too little audio recorded: {}",
            pcm.len()
        );
        ToneReport::analyze(pcm, &FREQS, 48_000)
    }
}

fn cfg() -> MixerConfig {
    MixerConfig {
        frame_ms: 20,
        top_speakers: 3,
        extra_candidates: 2,
        jitter_min_ms: 40,
        jitter_max_ms: 200,
        rank_interval_ms: 100,
        low_delay: false,
        align_ticks: true,
    }
}

/// The ear hears exactly `freqs`, each at least 20 dB above any other tone's leftover.
fn assert_hears(report: &ToneReport, freqs: &[f64], what: &str) {
    assert_eq!(report.present(), freqs.to_vec(), "{what}: {report:#?}");
    let margin = report.quietest_present_dbfs() - report.loudest_absent_dbfs();
    assert!(margin >= 20.0, "{what}: margin {margin:.1} dB: {report:#?}");
}

/// Named `media::…` so `cargo test -p chorus-mediaserver media` selects them.
mod media {
    use super::*;

    #[test]
    fn five_tones_top_three_shared_and_each_speaker_hears_three_loudest_others() {
        let mut room = Room::five(cfg(), false);
        room.run(50);
        room.record();
        for _ in 0..60 {
            let tick_time = room.now();
            let out = room.step();
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
            assert_eq!(
                out.per_speaker.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                ids(&[1, 2, 3])
            );
            assert_eq!(out.stats.encodes, 4, "3 local speakers + 1 shared");
            // No RFC 6464: every stream is decoded for its energy, and nothing twice.
            assert_eq!(out.stats.decodes, 5);
            assert_eq!(out.stats.decoded, ids(&[1, 2, 3, 4, 5]));
            // Each mixed stream's audio came from the packet that arrived one target delay ago.
            assert_eq!(
                out.carried.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                out.mixed
            );
            for (_, arrival) in &out.carried {
                assert_eq!(tick_time - *arrival, Duration::from_millis(40));
            }
            assert!(out.stats.errors.is_empty() && out.stats.output_errors.is_empty());
        }
        assert_hears(&room.report(None), &[300.0, 500.0, 700.0], "shared");
        // Mix minus self, backfilled with the next loudest (1100 Hz): three others, never itself.
        assert_hears(
            &room.report(Some(id(1))),
            &[500.0, 700.0, 1100.0],
            "speaker 1",
        );
        assert_hears(
            &room.report(Some(id(2))),
            &[300.0, 700.0, 1100.0],
            "speaker 2",
        );
        assert_hears(
            &room.report(Some(id(3))),
            &[300.0, 500.0, 1100.0],
            "speaker 3",
        );

        // The quietest talker (1300 Hz) gets loud: it replaces the quietest selected one (700 Hz)
        // within a bounded number of ticks (jitter delay + level attack).
        room.talker(id(5)).tone.set_level_dbfs(-5.0);
        let mut took = None;
        for k in 0..25 {
            let out = room.step();
            if out.mixed.contains(&id(5)) {
                assert_eq!(out.mixed, ids(&[1, 2, 5]), "replaced the quietest selected");
                took = Some(k);
                break;
            }
        }
        let took = took.expect("louder talker never selected");
        assert!(took <= 6, "took {took} ticks");
        room.run(10);
        room.record();
        for out in room.run(60) {
            assert_eq!(out.mixed, ids(&[1, 2, 5]));
        }
        assert_hears(
            &room.report(None),
            &[300.0, 500.0, 1300.0],
            "shared after change",
        );
        assert_hears(
            &room.report(Some(id(5))),
            &[300.0, 500.0, 700.0],
            "new speaker, backfilled with the one it replaced",
        );
    }

    #[test]
    fn ten_ms_frames_mix_the_same_way() {
        let mut room = Room::five(
            MixerConfig {
                frame_ms: 10,
                jitter_min_ms: 20,
                ..cfg()
            },
            true,
        );
        room.run(100);
        room.record();
        for out in room.run(120) {
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
            assert_eq!(out.stats.encodes, 4);
        }
        assert_hears(&room.report(None), &[300.0, 500.0, 700.0], "shared 10 ms");
        assert_hears(
            &room.report(Some(id(2))),
            &[300.0, 700.0, 1100.0],
            "speaker 2, 10 ms",
        );
    }

    /// In low-delay mode (CELT only) the mixes carry the same tones at the same levels, and
    /// switching the mode live keeps the room mixing.
    #[test]
    fn low_delay_mixes_the_same_way_and_switches_live() {
        let mut room = Room::five(
            MixerConfig {
                low_delay: true,
                ..cfg()
            },
            true,
        );
        room.run(100);
        room.record();
        room.run(100);
        assert_hears(
            &room.report(None),
            &[300.0, 500.0, 700.0],
            "shared, low delay",
        );
        assert_hears(
            &room.report(Some(id(2))),
            &[300.0, 700.0, 1100.0],
            "speaker 2, low delay",
        );
        room.mixer.reconfigure(cfg()).expect("back to VOIP");
        room.run(50);
        room.record();
        for out in room.run(100) {
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
            assert!(out.stats.output_errors.is_empty());
        }
        assert_hears(
            &room.report(None),
            &[300.0, 500.0, 700.0],
            "shared, back to VOIP",
        );
    }

    #[test]
    fn new_settings_apply_live_top_n_and_jitter_in_place_frame_by_rebuilding() {
        let mut room = Room::five(cfg(), true);
        room.run(60);
        assert_eq!(room.step().mixed, ids(&[1, 2, 3]));

        // Top 3 -> 5 and wider jitter bounds: the same streams, the next ticks mix all five,
        // and buffered audio is kept (no frame is lost across the change).
        let wider = MixerConfig {
            top_speakers: 5,
            extra_candidates: 0,
            jitter_max_ms: 300,
            ..cfg()
        };
        room.mixer.reconfigure(wider).expect("valid settings");
        assert_eq!(room.mixer.config(), wider);
        room.run(10);
        room.record();
        for out in room.run(100) {
            assert_eq!(out.mixed, ids(&[1, 2, 3, 4, 5]));
            assert_eq!(out.stats.encodes, 6);
            assert_eq!(out.stats.lost, 0);
        }
        assert_hears(&room.report(None), &FREQS, "shared after top 5");

        // Back to 3: the two quietest leave.
        room.mixer.reconfigure(cfg()).expect("valid settings");
        room.run(10);
        assert_eq!(room.step().mixed, ids(&[1, 2, 3]));

        // Refused settings change nothing.
        let bad = MixerConfig {
            frame_ms: 30,
            ..cfg()
        };
        assert!(room.mixer.reconfigure(bad).is_err());
        assert_eq!(room.mixer.config(), cfg());

        // 20 -> 10 ms frames: the streams stay (10 ms talkers here; 20 ms packets in a 10 ms
        // room have a test of their own).
        let ten = MixerConfig {
            frame_ms: 10,
            ..cfg()
        };
        room.mixer.reconfigure(ten).expect("valid settings");
        assert_eq!(room.mixer.streams(), ids(&[1, 2, 3, 4, 5]));
        let mut ten_ms = Room::five(ten, true);
        ten_ms.mixer = std::mem::replace(&mut room.mixer, RoomMixer::new(cfg()).expect("mixer"));
        ten_ms.run(100);
        ten_ms.record();
        for out in ten_ms.run(120) {
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
        }
        assert_hears(
            &ten_ms.report(None),
            &[300.0, 500.0, 700.0],
            "shared after 10 ms",
        );
    }

    /// A talker's packet that misses its tick costs a frame of delay (the buffer runs dry and
    /// plays again a frame later); the tick reports why, so the metric can tell the talker's
    /// network from the server; and once the frame has not been needed for two seconds it is
    /// taken back.
    #[test]
    fn a_late_packet_is_reported_and_its_frame_taken_back() {
        let cfg = MixerConfig {
            jitter_min_ms: 2,
            ..cfg()
        };
        let mut mixer = RoomMixer::new(cfg).expect("mixer");
        let mut talker = Talker::new(id(1), 440.0, -20.0, 20, true);
        mixer.add_stream(id(1), StreamOrigin::Local);
        let mut total = chorus_mediaserver::media::JitterAdjustments::default();
        let mut waits = Vec::new();
        let mut held_back = None;
        for tick in 1..400u64 {
            let now = Duration::from_millis(tick * 20);
            if let Some(at) = held_back.take() {
                mixer.push(talker.packet(at)).expect("accepted");
            }
            // Each packet 2.5 ms before its tick; packet 100 comes 4 ms after it.
            if tick == 100 {
                held_back = Some(now + Duration::from_millis(4));
            } else {
                mixer
                    .push(talker.packet(now - Duration::from_micros(2_500)))
                    .expect("accepted");
            }
            let out = mixer.tick(now);
            let j = out.stats.jitter;
            total.underruns += j.underruns;
            total.restarts += j.restarts;
            total.stretched += j.stretched;
            total.unstretched += j.unstretched;
            total.shed += j.shed;
            waits.extend(out.carried.iter().map(|(_, at)| (tick, now - *at)));
        }
        assert_eq!(total.underruns, 1, "{total:?}");
        assert_eq!(total.restarts, 1, "{total:?}");
        assert_eq!(
            total.unstretched + total.shed,
            1,
            "taken back once: {total:?}"
        );
        let slow: Vec<_> = waits
            .iter()
            .filter(|(_, w)| *w > Duration::from_millis(20))
            .collect();
        assert!(!slow.is_empty(), "the late packet cost nothing?");
        // A frame late for at most the two seconds (100 ticks) plus two windows it takes.
        assert!(
            slow.iter().all(|(tick, _)| *tick < 100 + 150),
            "still a frame late at {:?}",
            slow.last()
        );
        assert!(
            waits
                .iter()
                .filter(|(t, _)| *t > 300)
                .all(|(_, w)| *w < Duration::from_millis(3))
        );
    }

    /// A 10 ms room (2 ms jitter margin) with one talker sending 20 ms packets of 440 Hz, and a
    /// 10 ms decoder standing in for its listener.
    fn ten_ms_room_with_a_twenty_ms_talker() -> (RoomMixer, Talker, Decoder) {
        let cfg = MixerConfig {
            frame_ms: 10,
            jitter_min_ms: 2,
            ..cfg()
        };
        let mut mixer = RoomMixer::new(cfg).expect("mixer");
        mixer.add_stream(id(1), StreamOrigin::Local);
        let talker = Talker::new(id(1), 440.0, -20.0, 20, true);
        (mixer, talker, Decoder::new(10).expect("decoder"))
    }

    /// A 10 ms room pulls a 20 ms packet every other tick. When the packets come to sit a whole
    /// room frame before their pull (here: they start arriving 10 ms earlier, as when the
    /// tick moves to another talker), the stream moves its pulls a frame sooner, once, instead
    /// of holding every packet 10 ms longer than needed.
    #[test]
    fn a_ten_ms_room_pulls_twenty_ms_packets_as_soon_as_they_are_here() {
        let (mut mixer, mut talker, mut decoder) = ten_ms_room_with_a_twenty_ms_talker();
        let mut heard = Vec::new();
        let (mut sooner, mut lost) = (0, 0);
        let mut waits = Vec::new();
        for tick in 0..300u64 {
            let now = Duration::from_millis(tick * 10);
            // Packets arrive 2 ms before the tick of 20j + 10 ms until 1 s, then 10 ms earlier:
            // 2 ms before the tick of 20j ms, the tick that plays their predecessor's second half.
            let arrival = |j: u64| {
                let on_time = Duration::from_millis(20 * j + 8);
                if j >= 50 {
                    on_time - Duration::from_millis(10)
                } else {
                    on_time
                }
            };
            for j in 0..=tick / 2 + 1 {
                let at = arrival(j);
                if at > now.saturating_sub(Duration::from_millis(10)) && at <= now {
                    mixer
                        .push(talker.packet(at))
                        .expect("a 20 ms packet is accepted");
                }
            }
            let out = mixer.tick(now);
            sooner += out.stats.pulled_sooner;
            if tick >= 200 {
                lost += out.stats.lost;
                waits.extend(out.carried.iter().map(|(_, at)| now - *at));
                heard.extend(decoder.decode(&out.shared).expect("decodes"));
            }
        }
        assert_eq!(sooner, 1, "the pulls move once");
        assert_eq!(lost, 0, "no packet lost");
        // Each packet's first frame plays 2 ms after it arrived and its second 10 ms later
        // (without the move: 12 and 22 ms).
        let (min, max) = (
            waits.iter().min().expect("frames carried"),
            waits.iter().max().expect("frames carried"),
        );
        assert_eq!(*min, Duration::from_millis(2), "{waits:?}");
        assert_eq!(*max, Duration::from_millis(12), "{waits:?}");
        assert_hears(
            &ToneReport::analyze(&heard, &[440.0], 48_000),
            &[440.0],
            "after the move",
        );
    }

    /// An early tick (DESIGN §13: the tick runs as soon as the talkers it waits for are here,
    /// before its deadline) plays the talker it waited for at once, every frame, and that
    /// talker's jitter buffer sees the slack it would have had at the deadline: it never
    /// stretches, though its frames now wait a tenth of a millisecond. A stream the tick does
    /// not wait for (not mixed), whose packets come between the early tick and the deadline,
    /// runs dry once, as when a packet misses its tick, and plays on a frame later.
    #[test]
    fn an_early_tick_plays_the_talker_it_waited_for_without_stretching_it() {
        let cfg = MixerConfig {
            top_speakers: 1,
            jitter_min_ms: 2,
            ..cfg()
        };
        let mut mixer = RoomMixer::new(cfg).expect("mixer");
        // A forwarded talker: mixed, with no mix of its own and so no backfill to wait for.
        mixer.add_stream(id(1), StreamOrigin::Remote);
        mixer.add_stream(id(2), StreamOrigin::Local);
        let mut talker = Talker::new(id(1), 440.0, -20.0, 20, true);
        let mut quiet = Talker::new(id(2), 1100.0, -40.0, 20, true);
        let mut decoder = Decoder::new(20).expect("decoder");
        let us = Duration::from_micros;
        let (mut heard, mut waits) = (Vec::new(), Vec::new());
        let mut quiet_lost_at_300 = 0;
        for tick in 0..500u64 {
            // Tick k is due at 20k + 10 ms; the talker's packet k comes at 20k + 5 ms and the
            // quiet one's at 20k + 7 ms.
            let base = 20_000 * tick;
            let due = us(base + 10_000);
            let out = if tick < 100 {
                // Ticks at their deadline: both streams' packets are there before.
                mixer
                    .push(talker.packet(us(base + 5_000)))
                    .expect("accepted");
                mixer
                    .push(quiet.packet(us(base + 7_000)))
                    .expect("accepted");
                mixer.tick(due)
            } else {
                assert!(
                    !mixer.ready(),
                    "tick {tick}: the talker's packet is not here yet"
                );
                mixer
                    .push(talker.packet(us(base + 5_000)))
                    .expect("accepted");
                assert!(mixer.ready(), "tick {tick}: the talker's packet is here");
                let out = mixer.tick_before(us(base + 5_100), due);
                // Too late for the early tick: the quiet stream's buffer absorbs it.
                let _ = mixer.push(quiet.packet(us(base + 7_000)));
                out
            };
            assert_eq!(out.mixed, ids(&[1]), "tick {tick}");
            if tick >= 100 {
                waits.extend(out.carried.iter().map(|(_, at)| us(base + 5_100) - *at));
            }
            if tick >= 150 {
                heard.extend(decoder.decode(&out.shared).expect("decodes"));
            }
            if tick == 300 {
                quiet_lost_at_300 = mixer.jitter_stats(id(2)).expect("stream").lost;
            }
        }
        let loud = mixer.jitter_stats(id(1)).expect("stream");
        assert_eq!(
            (loud.stretched, loud.lost, loud.underruns),
            (0, 0, 0),
            "the awaited talker plays every frame: {loud:?}"
        );
        assert!(
            waits.len() == 400 && waits.iter().all(|w| *w == us(100)),
            "each of its frames is mixed 0.1 ms after it came: {waits:?}"
        );
        let quiet = mixer.jitter_stats(id(2)).expect("stream");
        assert_eq!(
            (quiet.underruns, quiet.restarts, quiet.lost, quiet.played),
            (1, 1, 0, 499),
            "it ran dry at the first early tick and played on a frame later: {quiet:?}"
        );
        assert_eq!(quiet.lost, quiet_lost_at_300);
        assert_hears(
            &ToneReport::analyze(&heard, &[440.0, 1100.0], 48_000),
            &[440.0],
            "the listener",
        );
    }

    /// One 20 ms packet that misses its pull in a 10 ms room costs one room frame once: the
    /// stream tries again at the next room tick (not a whole packet later), and the next
    /// packet, on time again, moves the pulls back. Before, the late packet made the stream a
    /// whole packet (20 ms) late for as long as half a second.
    #[test]
    fn a_ten_ms_room_loses_one_room_frame_to_one_late_twenty_ms_packet() {
        let (mut mixer, mut talker, mut decoder) = ten_ms_room_with_a_twenty_ms_talker();
        let mut heard = Vec::new();
        let (mut sooner, mut restarts) = (0, 0);
        let mut waits = Vec::new();
        // Packet j arrives 2 ms before the tick of 20j + 10 ms; packet 100 comes 3 ms after it.
        let arrival = |j: u64| {
            let on_time = Duration::from_millis(20 * j + 8);
            if j == 100 {
                on_time + Duration::from_millis(5)
            } else {
                on_time
            }
        };
        let mut next = 0;
        for tick in 0..400u64 {
            let now = Duration::from_millis(tick * 10);
            while arrival(next) <= now {
                mixer
                    .push(talker.packet(arrival(next)))
                    .expect("a 20 ms packet is accepted");
                next += 1;
            }
            let out = mixer.tick(now);
            if tick >= 100 {
                sooner += out.stats.pulled_sooner;
                restarts += out.stats.jitter.restarts;
                waits.extend(out.carried.iter().map(|(_, at)| (tick, now - *at)));
                heard.extend(decoder.decode(&out.shared).expect("decodes"));
            }
        }
        assert_eq!(restarts, 1, "the late packet ran the buffer dry once");
        assert_eq!(
            sooner, 1,
            "and the next packet moved the pulls back at once"
        );
        // The late packet plays 7 ms after it came (at the next room tick), its successors
        // as before: 2 ms after they came, and their second halves 10 ms later.
        let worst = waits.iter().map(|(_, w)| *w).max().expect("frames carried");
        assert!(worst <= Duration::from_millis(12), "{worst:?}");
        let late: Vec<_> = waits
            .iter()
            .filter(|(tick, _)| (200..=204).contains(tick))
            .collect();
        assert!(
            late.iter().any(|(_, w)| *w == Duration::from_millis(7)),
            "{late:?}"
        );
        let after: Vec<_> = waits.iter().filter(|(tick, _)| *tick >= 206).collect();
        assert!(
            after
                .iter()
                .all(|(_, w)| *w == Duration::from_millis(2) || *w == Duration::from_millis(12)),
            "{after:?}"
        );
        assert_hears(
            &ToneReport::analyze(&heard, &[440.0], 48_000),
            &[440.0],
            "around the late packet",
        );
    }

    /// Browsers send 20 ms packets; a 10 ms room plays each as two frames, with or without
    /// RFC 6464 levels, and a speaker still never hears itself.
    #[test]
    fn a_ten_ms_room_plays_twenty_ms_packets_as_two_frames() {
        for rfc6464 in [true, false] {
            let cfg = MixerConfig {
                frame_ms: 10,
                jitter_min_ms: 20,
                ..cfg()
            };
            let mut mixer = RoomMixer::new(cfg).expect("mixer");
            let mut talkers: Vec<Talker> = FREQS
                .iter()
                .zip(&LEVELS)
                .enumerate()
                .map(|(i, (&f, &l))| Talker::new(id(i as u64 + 1), f, l, 20, rfc6464))
                .collect();
            for t in &talkers {
                mixer.add_stream(t.id, StreamOrigin::Local);
            }
            let mut shared = (Decoder::new(10).expect("decoder"), Vec::new());
            let mut own = (Decoder::new(10).expect("decoder"), Vec::new());
            let mut lost = 0;
            for tick in 0..400u64 {
                let now = Duration::from_millis(tick * 10);
                if tick % 2 == 0 {
                    for t in &mut talkers {
                        let pkt = t.packet(now);
                        mixer.push(pkt).expect("a 20 ms packet is accepted");
                    }
                }
                let out = mixer.tick(now + Duration::from_millis(3));
                if tick >= 200 {
                    lost += out.stats.lost;
                    assert_eq!(out.mixed, ids(&[1, 2, 3]), "tick {tick}");
                    shared
                        .1
                        .extend(shared.0.decode(&out.shared).expect("decodes"));
                    let (_, mine) = out
                        .per_speaker
                        .iter()
                        .find(|(sid, _)| *sid == id(2))
                        .expect("speaker 2 has its own mix");
                    own.1.extend(own.0.decode(mine).expect("decodes"));
                }
            }
            assert_eq!(lost, 0, "no frame lost");
            let what = format!("shared, RFC 6464 {rfc6464}");
            assert_hears(
                &ToneReport::analyze(&shared.1, &FREQS, 48_000),
                &[300.0, 500.0, 700.0],
                &what,
            );
            let what = format!("speaker 2, RFC 6464 {rfc6464}");
            assert_hears(
                &ToneReport::analyze(&own.1, &FREQS, 48_000),
                &[300.0, 700.0, 1100.0],
                &what,
            );
        }
        // A 20 ms room still refuses 10 ms packets, saying why.
        let mut mixer = RoomMixer::new(cfg()).expect("mixer");
        mixer.add_stream(id(1), StreamOrigin::Local);
        let mut ten = Talker::new(id(1), 300.0, -10.0, 10, true);
        let err = mixer.push(ten.packet(Duration::ZERO)).unwrap_err();
        assert_eq!(err.category(), "frame_duration");
    }

    #[test]
    fn rfc6464_levels_spare_decodes_of_streams_outside_the_mix() {
        let mut room = Room::five(cfg(), true);
        room.run(50);
        for out in room.run(50) {
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
            // The three mixed plus the one backfill; 1300 Hz (stream 5) costs nothing.
            assert_eq!(out.stats.decoded, ids(&[1, 2, 3, 4]));
            assert_eq!(out.stats.decode_calls(), 4);
            assert_eq!(out.stats.encodes, 4);
        }
    }

    #[test]
    fn encodes_and_decodes_stay_flat_with_fifty_streams_of_which_47_silent() {
        let mut small = Room::new(cfg());
        let mut big = Room::new(cfg());
        for room in [&mut small, &mut big] {
            for (i, (&f, &l)) in FREQS[..3].iter().zip(&LEVELS).enumerate() {
                room.add_talker(id(i as u64 + 1), f, l, StreamOrigin::Local, true);
            }
        }
        for n in 4..=5 {
            small.add_silent(id(n));
        }
        for n in 4..=50 {
            big.add_silent(id(n));
        }
        assert_eq!(big.mixer.streams().len(), 50);
        small.run(50);
        big.run(50);
        big.record();
        for _ in 0..50 {
            let (a, b) = (small.step(), big.step());
            assert_eq!(a.stats.encodes, 4);
            assert_eq!(b.stats.encodes, 4, "same encodes with 5 or 50 streams");
            assert_eq!(b.mixed, ids(&[1, 2, 3]));
            // Silent streams are never selected and never the backfill: no decode at all.
            assert_eq!(b.stats.decoded, ids(&[1, 2, 3]));
            assert_eq!(b.stats.decode_calls(), a.stats.decode_calls());
            assert_eq!(b.stats.jitter_depth.len(), 50);
        }
        assert_hears(&big.report(None), &[300.0, 500.0, 700.0], "shared of 50");
    }

    #[test]
    fn muted_stream_is_never_mixed_nor_decoded() {
        for rfc6464 in [true, false] {
            let mut room = Room::five(cfg(), rfc6464);
            // Mute the loudest talker from the start, and again mid-way after an unmute.
            room.mixer.set_muted(id(1), true);
            room.run(50);
            room.record();
            for out in room.run(60) {
                assert_eq!(out.mixed, ids(&[2, 3, 4]), "rfc6464 {rfc6464}");
                assert!(!out.stats.decoded.contains(&id(1)));
                assert!(out.per_speaker.iter().all(|(s, _)| *s != id(1)));
            }
            assert_hears(&room.report(None), &[500.0, 700.0, 1100.0], "muted 1");
            // Unmuted, it is the loudest again and comes back; muted again, it leaves at once.
            room.mixer.set_muted(id(1), false);
            let back = room.run(10);
            assert!(back.last().unwrap().mixed.contains(&id(1)));
            room.mixer.set_muted(id(1), true);
            let out = room.step();
            assert!(!out.mixed.contains(&id(1)));
            assert!(!out.stats.decoded.contains(&id(1)));
            assert!(room.mixer.candidates().iter().all(|c| c.stream != id(1)));
        }
    }

    #[test]
    fn three_full_scale_tones_are_limited_without_wrapping() {
        let mut room = Room::new(cfg());
        let freqs = [300.0, 700.0, 1300.0];
        for (i, &f) in freqs.iter().enumerate() {
            room.add_talker(id(i as u64 + 1), f, 0.0, StreamOrigin::Local, false);
        }
        room.run(50);
        room.record();
        room.run(60);
        let pcm = &room.ears[&None].1;
        let peak = pcm.iter().map(|s| s.unsigned_abs()).max().unwrap();
        // The limiter ceiling is -1 dBFS; the codec may overshoot it a little but never reaches the
        // rail (where a decoder would have to clip).
        assert!(peak < 32_600, "peak {peak}");
        // A wrapped sample shows as a jump of tens of thousands between neighbours; the steepest
        // legitimate slope here is a few thousand.
        let worst = pcm
            .windows(2)
            .map(|w| (i32::from(w[1]) - i32::from(w[0])).abs())
            .max()
            .unwrap();
        assert!(worst < 12_000, "discontinuity {worst}");
        let report =
            ToneReport::analyze(pcm, &[300.0, 700.0, 1300.0, 400.0, 600.0, 1000.0], 48_000);
        assert_eq!(report.present(), freqs.to_vec(), "{report:#?}");
        let levels: Vec<f64> = freqs
            .iter()
            .map(|&f| report.tone(f).unwrap().level_dbfs)
            .collect();
        // Equal inputs stay equal (a clipper would smear them); intermodulation stays far below.
        assert!(
            levels.iter().all(|l| (l - levels[0]).abs() < 1.5),
            "{levels:?}"
        );
        assert!(
            report.loudest_absent_dbfs() < levels[0] - 30.0,
            "{report:#?}"
        );
    }

    #[test]
    fn malformed_payloads_are_refused_and_change_nothing_else() {
        let mut clean = Room::five(cfg(), false);
        let mut dirty = Room::five(cfg(), false);
        let garbage: Vec<Bytes> = vec![
            Bytes::new(),
            Bytes::from_static(&[0x03, 0x00]),
            Bytes::from_static(&[0x02, 200, 1, 2]),
            Bytes::from(vec![0xFF; 70_000]),
            // A well-formed 10 ms packet in a 20 ms room.
            Encoder::new(10).unwrap().encode(&[0; 480]).unwrap(),
        ];
        for k in 0..150usize {
            let a = clean.step();
            // Garbage on a selected stream, with the sequence number its next real packet will use:
            // refused, so the real packet still lands.
            let arrival = dirty.now();
            let target = dirty.talker(id(1 + (k % 2) as u64 * 3));
            let bad = InboundPacket {
                stream: target.id,
                seq: target.seq,
                rtp_timestamp: target.ts,
                payload: garbage[k % garbage.len()].clone(),
                level: None,
                arrival,
            };
            let err = dirty.mixer.push(bad).unwrap_err();
            assert!(
                matches!(err.category(), "malformed_opus" | "frame_duration"),
                "{err:?}"
            );
            let b = dirty.step();
            assert_eq!(a.shared, b.shared, "tick {k}: shared mix changed");
            assert_eq!(
                a.per_speaker, b.per_speaker,
                "tick {k}: a speaker mix changed"
            );
            assert_eq!(a.mixed, b.mixed);
            assert!(b.stats.errors.is_empty());
        }
        // Unknown streams are refused too.
        let stray = InboundPacket {
            stream: id(99),
            seq: 0,
            rtp_timestamp: 0,
            payload: Bytes::from_static(&[0x78]),
            level: None,
            arrival: Duration::ZERO,
        };
        assert_eq!(
            dirty.mixer.push(stray),
            Err(MediaError::UnknownStream(id(99)))
        );
    }

    #[test]
    fn remote_streams_are_mixed_but_get_no_own_output() {
        let mut room = Room::new(cfg());
        for (i, (&f, &l)) in FREQS.iter().zip(&LEVELS).enumerate() {
            let origin = if i == 1 {
                StreamOrigin::Remote
            } else {
                StreamOrigin::Local
            };
            room.add_talker(id(i as u64 + 1), f, l, origin, false);
        }
        room.run(50);
        room.record();
        for out in room.run(60) {
            assert_eq!(out.mixed, ids(&[1, 2, 3]));
            assert_eq!(
                out.per_speaker.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                ids(&[1, 3])
            );
            assert_eq!(out.stats.encodes, 3, "2 local speakers + 1 shared");
            assert_eq!(out.stats.local_speakers, 2);
        }
        assert_hears(
            &room.report(None),
            &[300.0, 500.0, 700.0],
            "shared with remote",
        );
        assert_hears(
            &room.report(Some(id(1))),
            &[500.0, 700.0, 1100.0],
            "speaker 1 hears remote",
        );
        // What this server reports to the mesh primary: local streams only, ranked, with margin.
        let cands = room.mixer.candidates();
        assert_eq!(
            cands.iter().map(|c| c.stream).collect::<Vec<_>>(),
            ids(&[1, 3, 4, 5])
        );
        assert!(cands.windows(2).all(|w| w[0].importance > w[1].importance));
        assert!(cands.iter().all(|c| c.voice));
        // A -10 dBFS sine is about -13 dBov.
        assert!((cands[0].importance + 13.0).abs() < 1.5, "{cands:?}");
    }

    #[test]
    fn imposed_selection_is_mixed_exactly() {
        let mut room = Room::five(cfg(), true);
        room.run(30);
        // The mesh primary says: the two quiet ones (and a stream this server has not received yet).
        room.mixer
            .set_selection(Some(vec![id(5), id(4), id(77), id(4)]));
        assert_eq!(room.mixer.selection(), Some(&ids(&[4, 5, 77])[..]));
        room.run(10);
        room.record();
        for out in room.run(60) {
            assert_eq!(out.mixed, ids(&[4, 5]));
            assert_eq!(
                out.per_speaker.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                ids(&[4, 5])
            );
            assert_eq!(out.stats.encodes, 3);
            // The two selected plus the backfill (the loudest outside the list).
            assert_eq!(out.stats.decoded, ids(&[1, 4, 5]));
        }
        assert_hears(&room.report(None), &[1100.0, 1300.0], "imposed shared");
        assert_hears(
            &room.report(Some(id(4))),
            &[300.0, 1300.0],
            "imposed speaker 4",
        );
        // Local candidates are still ranked on their own, for the next round of the mesh.
        assert_eq!(
            room.mixer
                .candidates()
                .iter()
                .map(|c| c.stream)
                .collect::<Vec<_>>(),
            ids(&[1, 2, 3, 4, 5])
        );
        // Back to local ranking.
        room.mixer.set_selection(None);
        let out = room.step();
        assert_eq!(out.mixed, ids(&[1, 2, 3]));
    }

    #[test]
    fn lost_packets_are_recovered_with_fec_and_counted() {
        let mut room = Room::five(cfg(), false);
        room.run(50);
        room.record();
        let mut fec = 0;
        let mut lost = 0;
        for k in 0..100 {
            // Stream 1 loses every 7th packet.
            let skip = if k % 7 == 3 { vec![id(1)] } else { vec![] };
            let out = room.step_skipping(&skip);
            fec += out.stats.fec;
            lost += out.stats.lost;
            assert_eq!(out.mixed, ids(&[1, 2, 3]), "a loss does not deselect");
        }
        assert!(lost >= 13, "lost {lost}");
        assert_eq!(
            fec, lost,
            "each isolated loss is recovered from the next packet"
        );
        assert_eq!(
            room.mixer.jitter_stats(id(1)).unwrap().lost,
            u64::from(lost)
        );
        assert_hears(
            &room.report(None),
            &[300.0, 500.0, 700.0],
            "shared with loss",
        );
    }

    #[test]
    fn removed_stream_leaves_the_mix_and_its_encoder() {
        let mut room = Room::five(cfg(), true);
        room.run(50);
        room.mixer.remove_stream(id(2));
        room.talkers.retain(|t| t.id != id(2));
        let out = room.step();
        assert_eq!(out.mixed, ids(&[1, 3, 4]));
        assert_eq!(out.stats.encodes, 4);
        assert!(room.mixer.importance(id(2)).is_none());
        assert!(room.mixer.importance(id(1)).unwrap().voice);
        room.mixer.set_output_loss_percent(20).unwrap();
        assert_eq!(room.step().stats.encodes, 4);
    }

    /// Stream `stream`'s packet for frame `k`: `pcm` encoded, with its RFC 6464 level.
    fn leveled(
        enc: &mut Encoder,
        stream: StreamId,
        k: u64,
        pcm: &[i16],
        now: Duration,
    ) -> InboundPacket {
        let dbov = dbov_from_pcm(pcm);
        InboundPacket {
            stream,
            seq: k as u16,
            rtp_timestamp: (k * 960) as u32,
            payload: enc.encode(pcm).expect("encode"),
            level: Some(AudioLevel {
                dbov: (-dbov).round().clamp(0.0, 127.0) as u8,
                voice: dbov > -60.0,
            }),
            arrival: now,
        }
    }

    /// Ms of `hz` (above -35 dBFS, in 10 ms windows) in `pcm`.
    fn tone_ms(pcm: &[i16], hz: f64) -> usize {
        pcm.chunks_exact(480)
            .filter(|w| chorus_mediaserver::media::spectrum::tone_level_dbfs(w, hz, 48_000) > -35.0)
            .count()
            * 10
    }

    #[test]
    fn a_stream_entering_the_mix_plays_its_talkspurt_from_the_onset_then_catches_up() {
        let mut room = Room::new(MixerConfig {
            jitter_min_ms: 5,
            ..cfg()
        });
        room.add_talker(id(1), 500.0, -20.0, StreamOrigin::Remote, true);
        // Stream 2 starts talking at frame 40 and is listed at frame 44 (a list change's lag):
        // 100 ms at 2000 Hz, then 200 ms at 3000 Hz, then silence. Stream 3 talked at frames
        // 10..15 (1500 Hz) and is listed at frame 30, 15 silent frames later: that talkspurt
        // is over and must not be played.
        room.mixer.add_stream(id(2), StreamOrigin::Remote);
        room.mixer.add_stream(id(3), StreamOrigin::Remote);
        room.mixer.set_selection(Some(ids(&[1])));
        let (mut enc2, mut enc3) = (Encoder::new(20).unwrap(), Encoder::new(20).unwrap());
        let mut a = ToneGenerator::new(2000.0, -20.0, 48_000);
        let mut b = ToneGenerator::new(3000.0, -20.0, 48_000);
        let mut c = ToneGenerator::new(1500.0, -20.0, 48_000);
        let silence = vec![0i16; 960];
        room.record();
        let (mut replayed, mut skipped, mut last_replay) = (0, 0, 0);
        for k in 0..120u64 {
            let now = room.now();
            let two = match k {
                40..45 => a.frame(960),
                45..55 => b.frame(960),
                _ => silence.clone(),
            };
            let three = if (10..15).contains(&k) {
                c.frame(960)
            } else {
                silence.clone()
            };
            room.mixer
                .push(leveled(&mut enc2, id(2), k, &two, now))
                .unwrap();
            room.mixer
                .push(leveled(&mut enc3, id(3), k, &three, now))
                .unwrap();
            match k {
                30 => room.mixer.set_selection(Some(ids(&[1, 3]))),
                44 => room.mixer.set_selection(Some(ids(&[1, 2, 3]))),
                _ => {}
            }
            let out = room.step();
            replayed += out.stats.preroll_replayed;
            skipped += out.stats.preroll_skipped;
            if out.stats.preroll_replayed > 0 {
                last_replay = k;
            }
        }
        let pcm = &room.ears[&None].1;
        let (onset, follow, stale) = (
            tone_ms(pcm, 2000.0),
            tone_ms(pcm, 3000.0),
            tone_ms(pcm, 1500.0),
        );
        eprintln!(
            "heard {onset} ms of the onset, {follow} ms after it, {stale} ms of the stale talkspurt; \
             {replayed} frames replayed, {skipped} skipped, the last replay at frame {last_replay}"
        );
        assert!(
            (90..=110).contains(&onset),
            "the onset's 100 ms: heard {onset} ms"
        );
        assert!(
            (190..=210).contains(&follow),
            "the next 200 ms: heard {follow} ms"
        );
        assert_eq!(
            stale, 0,
            "a talkspurt that ended before the listing is not played"
        );
        // Listed 4 frames after its onset (the jitter buffer held one of them), its whole
        // talkspurt played 3-5 frames behind; in the pause it skipped as many silent frames and
        // has been live since.
        assert!((3..=5).contains(&skipped), "{skipped} frames skipped");
        assert!(replayed >= 14, "{replayed} frames replayed");
        assert!(last_replay < 60, "still behind at frame {last_replay}");
        // The carrier of stream 1 never stopped.
        assert!(tone_ms(pcm, 500.0) >= 2300);
    }

    #[test]
    fn a_stream_that_never_pauses_catches_up_a_frame_at_a_time_after_a_second() {
        let mut room = Room::new(MixerConfig {
            jitter_min_ms: 5,
            ..cfg()
        });
        room.add_talker(id(1), 500.0, -20.0, StreamOrigin::Remote, true);
        room.mixer.add_stream(id(2), StreamOrigin::Remote);
        room.mixer.set_selection(Some(ids(&[1])));
        let mut enc = Encoder::new(20).unwrap();
        let mut hum = ToneGenerator::new(2000.0, -20.0, 48_000);
        let silence = vec![0i16; 960];
        room.record();
        let (mut skipped, mut last_replay) = (0, 0);
        for k in 0..200u64 {
            let now = room.now();
            // A hum from frame 40 on that never stops; listed at frame 44.
            let pcm = if k >= 40 {
                hum.frame(960)
            } else {
                silence.clone()
            };
            room.mixer
                .push(leveled(&mut enc, id(2), k, &pcm, now))
                .unwrap();
            if k == 44 {
                room.mixer.set_selection(Some(ids(&[1, 2])));
            }
            let out = room.step();
            skipped += out.stats.preroll_skipped;
            if out.stats.preroll_replayed > 0 {
                last_replay = k;
            }
        }
        eprintln!("{skipped} frames skipped, the last replay at frame {last_replay}");
        // Its onset was kept (3-5 frames behind); after a second behind it skipped one frame
        // every 200 ms until live: by 1 s + 5 × 200 ms after the listing at the latest.
        assert!((3..=5).contains(&skipped), "{skipped} frames skipped");
        assert!(
            (44 + 50..=44 + 50 + 5 * 10).contains(&last_replay),
            "behind until frame {last_replay}"
        );
        // And the hum played throughout, from its first frame.
        let pcm = &room.ears[&None].1;
        let heard = tone_ms(pcm, 2000.0);
        assert!(
            heard >= (200 - 40 - 5) * 20 - 60,
            "heard {heard} ms of the hum"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]

            /// Any mix of valid packets, garbage, unknown streams, mutes, selections and ticks: no
            /// panic, and the encode count is always local selected speakers + 1.
            #[test]
            fn arbitrary_input_never_panics(
                ops in proptest::collection::vec(
                    (0u8..6, 0u64..6, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()),
                    0..150,
                ),
            ) {
                let mut mixer = RoomMixer::new(cfg()).unwrap();
                let mut enc = Encoder::new(20).unwrap();
                let mut tone = ToneGenerator::new(440.0, -12.0, 48_000);
                let valid = enc.encode(&tone.frame(960)).unwrap();
                for n in 1..=4 {
                    let origin = if n == 4 { StreamOrigin::Remote } else { StreamOrigin::Local };
                    mixer.add_stream(id(n), origin);
                }
                let mut now = Duration::ZERO;
                for (op, stream, seq, bytes, flag) in ops {
                    match op {
                        0 | 1 => {
                            let payload = if op == 0 { valid.clone() } else { Bytes::from(bytes) };
                            let _ = mixer.push(InboundPacket {
                                stream: id(stream),
                                seq,
                                rtp_timestamp: u32::from(seq) * 960,
                                payload,
                                level: flag.then_some(AudioLevel { dbov: seq as u8, voice: flag }),
                                arrival: now,
                            });
                        }
                        2 => mixer.set_muted(id(stream), flag),
                        3 => mixer.set_selection(flag.then(|| vec![id(stream), id(seq as u64 % 6)])),
                        _ => {
                            now += Duration::from_millis(20);
                            let out = mixer.tick(now);
                            prop_assert_eq!(out.stats.encodes as usize, out.stats.local_speakers + 1);
                            prop_assert_eq!(out.per_speaker.len(), out.stats.local_speakers);
                            prop_assert!(out.mixed.len() <= 3 || mixer.selection().is_some());
                            prop_assert!(!out.shared.is_empty());
                        }
                    }
                }
            }
        }
    }
}
