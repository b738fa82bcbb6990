//! The room mixer: one per room per server, driven by a frame tick.
//!
//! Each tick ([`RoomMixer::tick`]):
//! 1. pulls one [`Playout`] per stream from its jitter buffer;
//! 2. updates each stream's importance: from the RFC 6464 levels that arrived since the last tick
//!    (no decode), or, for senders without them, from the energy of the decoded frame;
//! 3. chooses the mix set: the local top-N ([`Ranker`] with hysteresis over every unmuted stream),
//!    or exactly the global list the mesh primary sent ([`RoomMixer::set_selection`]);
//! 4. decodes what it still needs: the mix set, plus ONE backfill stream (the best-ranked stream
//!    outside the set) when a local speaker needs it; nothing else;
//! 5. sums in `i32` and encodes ONE shared frame for every listener who is not a selected speaker,
//!    and one "mix minus self, backfilled" frame per LOCAL selected speaker.
//!
//! Invariants (each is tested):
//! - encodes per tick = local selected speakers + 1, whatever the number of streams or listeners;
//! - a muted stream is never decoded or mixed; a stream with RFC 6464 levels outside the mix set
//!   (and not the backfill) is never decoded;
//! - a speaker's own output never contains their own audio, and contains the N loudest others;
//! - remote streams are mixed like local ones but never get a per-speaker output;
//! - no sample wraps: sums are `i32` and a gain limiter ([`SoftLimiter`]) keeps every output
//!   sample within -1 dBFS;
//! - one stream's garbage is rejected at [`RoomMixer::push`] (or reported per stream by the
//!   tick) and cannot change any other stream's audio;
//! - a stream entering the mix set starts at the first frame of its talkspurt, not at the frame
//!   due when the list changed: while a stream is not mixed its last [`PREROLL_MS`] of frames are
//!   kept (a mesh peer's backlog lands there too, [`RoomMixer::push_history`]), and on entry it
//!   plays from there, one frame per tick, a little behind; it catches up by skipping frames
//!   without voice, so the extra delay lasts until its first pause (or, for a source that never
//!   pauses, is shed a frame at a time after a second) and never exceeds [`PREROLL_MS`]. The list changes a speaker's first syllable used to lose are not lost. (A
//!   local speaker who heard the entering stream as their backfill hears its onset twice.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::codec::{self, Decoder, Encoder};
use super::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout};
use super::level::LevelTracker;
use super::ranking::{Ranker, Ranking, RankingConfig, rank_order};
use super::{AudioLevel, Candidate, InboundPacket, MediaError, StreamId, StreamOrigin};

/// After an underrun, keep concealing a stream that was playing for this many ticks before
/// letting it go quiet: short gaps sound continuous, long ones fade rather than loop.
const MAX_UNDERRUN_CONCEAL_TICKS: u32 = 5;

/// Largest supported top-N; a bound so a bad config cannot ask for thousands of encoders.
const MAX_TOP_SPEAKERS: usize = 64;

/// How much of a stream's audio is kept while it is not mixed, so that when a new list mixes
/// it, its talkspurt starts from the beginning (ms). It bounds the extra delay of an entering
/// speaker; a list change takes a mesh round trip and a rank report, well under it.
pub const PREROLL_MS: u32 = 300;

/// A stream whose packets span several room frames (20 ms packets in a 10 ms room) pulls a
/// packet every few ticks, on a fixed rotation. When that rotation sits a room frame late for
/// this many packets in a row (each already here, and waiting long enough, at the tick before
/// its pull), the stream skips the rest of its current packet and pulls from that tick on.
/// Without it, half of all streams — whichever rotation they started on — wait a whole room
/// frame more than the tick's alignment to their arrivals allows (measured: +10 ms for every
/// talker of a room). A window of packets (half a second) keeps one early packet from moving
/// the rotation, and the skip costs one room frame of audio, once.
pub const PULL_SOONER_AFTER: u32 = 25;

/// A stream whose packets span several room frames and whose buffer ran dry at a pull plays
/// again a room frame later if its packet was only a little late, on a rotation a frame later.
/// If it plays again within this many room ticks of running dry, a single late packet did it,
/// and for the next [`RECOVER_PULLS`] pulls one packet on time (waiting at the tick before its
/// pull) moves the pulls back a frame sooner. Without it the stream kept the late rotation
/// until [`PULL_SOONER_AFTER`] packets in a row were early, which jitter made take seconds
/// (measured: +10 ms on one talker for 0.5–1.5 s after each late packet).
const RECOVER_WITHIN_TICKS: u32 = 3;

/// See [`RECOVER_WITHIN_TICKS`].
const RECOVER_PULLS: u32 = 2;

/// Ticks a stream must have been waited for (mixed) before an early tick may take back a voiced
/// frame it holds but does not need ([`JitterBuffer::take_back_before_early_tick`]): a second.
/// Until then only a voiceless frame is taken back, so an entering talker's first syllables are
/// never cut.
const TAKE_BACK_VOICED_AFTER_TICKS: u32 = 50;

/// Frames without voice for this long end a talkspurt: what came before is not replayed (ms).
const ONSET_GAP_MS: u32 = 200;

/// A stream still behind after this long without a voiceless frame to skip (music, a hum, a
/// talker who never pauses) skips voiced frames, one per [`FORCED_SKIP_EVERY_MS`] (ms).
const FORCED_CATCH_UP_AFTER_MS: u32 = 1000;
const FORCED_SKIP_EVERY_MS: u32 = 200;

/// RFC 6464 levels at or above this (in -dBov, i.e. quieter than -60 dBov) without the voice
/// flag are not voice: the same silence threshold as the ranking's.
const VOICELESS_DBOV: u8 = 60;

/// Whether a frame of this level is part of a talkspurt.
pub fn voiced(level: Option<AudioLevel>) -> bool {
    level.is_some_and(|l| l.voice || l.dbov < VOICELESS_DBOV)
}

/// One tick's frame of a stream that was not mixed, kept for the onset of its next entry.
#[derive(Debug, Clone)]
struct PastFrame {
    playout: Playout,
    arrival: Option<Duration>,
    voiced: bool,
}

/// Appends `f`, dropping the oldest beyond `keep`.
fn push_bounded(q: &mut VecDeque<PastFrame>, f: PastFrame, keep: usize) {
    q.push_back(f);
    while q.len() > keep {
        q.pop_front();
    }
}

/// The frames of `past` from the start of its last talkspurt: the earliest voiced frame not
/// separated from the end by `gap` voiceless frames in a row. Empty when the stream is not in a
/// talkspurt (it was silent for the last `gap` frames, or throughout).
fn talkspurt(mut past: VecDeque<PastFrame>, gap: usize) -> VecDeque<PastFrame> {
    let trailing = past.iter().rev().take_while(|f| !f.voiced).count();
    if trailing >= gap || trailing == past.len() {
        past.clear();
        return past;
    }
    let mut start = past.len() - trailing - 1;
    let mut silent = 0;
    for i in (0..start).rev() {
        if past[i].voiced {
            start = i;
            silent = 0;
        } else {
            silent += 1;
            if silent >= gap {
                break;
            }
        }
    }
    past.drain(..start);
    past
}

/// The mixing settings of a room: THE one value every part of a server takes them from (the
/// mixer, the room's tick and rank-report schedule, the mesh protocol).
///
/// It is built in one place: [`MixerConfig::from_plan`] from the mesh plan's `mixing` block, which
/// is the only source in a conference; a server running alone, without a plan, builds it from its
/// own flags ([`crate::config::Config::mixer`]). Its defaults are the CRD's
/// ([`chorus_crds::MeshMixing::default`]), so no second set of defaults exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerConfig {
    /// Frame duration: 10 or 20 ms. The tick period.
    pub frame_ms: u32,
    /// How many speakers are mixed (N).
    pub top_speakers: usize,
    /// Ranked streams reported beyond the top N (the mesh margin).
    pub extra_candidates: usize,
    /// Lowest jitter margin (ms): see [`super::jitter`].
    pub jitter_min_ms: u32,
    /// Highest jitter-buffer target delay (ms), also the bound on buffered audio per stream.
    pub jitter_max_ms: u32,
    /// How often a room reports its ranked local candidates to the mesh primary (ms).
    pub rank_interval_ms: u32,
    /// Encode the mixes in Opus's restricted low-delay mode (see [`Encoder::with_mode`]).
    pub low_delay: bool,
    /// Align the room's tick to its talkers' arrivals ([`super::tick_clock`]); off: a fixed
    /// tick. The room task reads it; the mixer itself ticks whenever it is told.
    pub align_ticks: bool,
}

impl MixerConfig {
    /// The settings a mesh plan gives every room of its conference. The plan was validated when
    /// it was parsed; [`RoomMixer::new`] checks the result again.
    pub fn from_plan(m: &chorus_crds::MeshMixing) -> Self {
        let count = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            frame_ms: m.frame_ms,
            top_speakers: count(m.top_speakers),
            extra_candidates: count(m.extra_candidates),
            jitter_min_ms: m.jitter_min_ms,
            jitter_max_ms: m.jitter_max_ms,
            rank_interval_ms: m.rank_interval_ms,
            low_delay: m.low_delay,
            align_ticks: m.align_ticks,
        }
    }

    /// Ticks between two periodic rank reports (at least one).
    pub fn rank_every_ticks(&self) -> u32 {
        (self.rank_interval_ms / self.frame_ms.max(1)).max(1)
    }

    /// The frame as a duration.
    pub fn frame(&self) -> Duration {
        Duration::from_millis(u64::from(self.frame_ms))
    }

    /// RTP timestamp units (48 kHz samples) in one frame.
    pub fn frame_samples(&self) -> u32 {
        48 * self.frame_ms
    }
}

impl Default for MixerConfig {
    fn default() -> Self {
        Self::from_plan(&chorus_crds::MeshMixing::default())
    }
}

/// Work done and state seen during one tick: what the metrics export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TickStats {
    /// Opus decodes of real packets.
    pub decodes: u32,
    /// Lost frames recovered from the next packet's in-band FEC.
    pub fec: u32,
    /// Frames concealed (packet-loss concealment).
    pub plc: u32,
    /// Opus encodes (always local selected speakers + 1).
    pub encodes: u32,
    /// Streams that cost at least one decoder call this tick, sorted.
    pub decoded: Vec<StreamId>,
    /// Frames declared lost by the jitter buffers this tick.
    pub lost: u32,
    /// Streams whose frame could not be decoded this tick (they were treated as lost).
    pub errors: Vec<(StreamId, MediaError)>,
    /// Encoder failures (the affected output is an empty payload this tick).
    pub output_errors: Vec<MediaError>,
    /// Jitter-buffer depth per stream after this tick, sorted by stream.
    pub jitter_depth: Vec<(StreamId, Duration)>,
    /// Local streams among the mixed ones (each got its own encode).
    pub local_speakers: usize,
    /// Frames mixed from before their stream entered the mix (a talkspurt's onset, replayed).
    pub preroll_replayed: u32,
    /// Voiceless frames skipped so an entering stream catches up with real time.
    pub preroll_skipped: u32,
    /// Streams whose packets span several room frames that skipped a frame to pull their
    /// packets a room frame sooner (see [`PULL_SOONER_AFTER`]).
    pub pulled_sooner: u32,
    /// What the streams' jitter buffers did to their delay since the last tick.
    pub jitter: JitterAdjustments,
}

/// Changes of the jitter buffers' delay and their causes, summed over a room's streams: what an
/// operator reads to tell a talker's network from the server when delay jumps by a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitterAdjustments {
    /// Packets that arrived after their tick had passed (dropped).
    pub late: u64,
    /// Times a buffer ran dry (a pause, the end of a stream, or a packet that missed its tick).
    pub underruns: u64,
    /// Times a buffer played again after running dry: after a pause, or a frame or more later
    /// than before.
    pub restarts: u64,
    /// Frames of delay added because frames came too close to their tick.
    pub stretched: u64,
    /// Frames of added delay taken back once they were no longer needed.
    pub unstretched: u64,
    /// Frames dropped because every frame waited whole frames longer than needed (after a
    /// stall), or to honour the buffer's capacity.
    pub shed: u64,
}

impl JitterAdjustments {
    /// The kinds, in the order of [`Self::by_kind`]: the `kind` label of
    /// `chorus_jitter_adjustments_total`.
    pub const KINDS: [&'static str; 6] = [
        "late",
        "underrun",
        "restart",
        "stretch",
        "unstretch",
        "shed",
    ];

    /// Each count with its kind (see [`Self::KINDS`]).
    pub fn by_kind(&self) -> [(&'static str, u64); 6] {
        let counts = [
            self.late,
            self.underruns,
            self.restarts,
            self.stretched,
            self.unstretched,
            self.shed,
        ];
        std::array::from_fn(|i| (Self::KINDS[i], counts[i]))
    }

    /// Adds what a buffer's counters gained from `before` to `after`.
    fn add_between(&mut self, before: &JitterStats, after: &JitterStats) {
        self.late += after.late.saturating_sub(before.late);
        self.underruns += after.underruns.saturating_sub(before.underruns);
        self.restarts += after.restarts.saturating_sub(before.restarts);
        self.stretched += after.stretched.saturating_sub(before.stretched);
        self.unstretched += after.unstretched.saturating_sub(before.unstretched);
        // Frames taken back are counted as discarded too; shed is what is left.
        let discarded = after.discarded.saturating_sub(before.discarded);
        let unstretched = after.unstretched.saturating_sub(before.unstretched);
        self.shed += discarded.saturating_sub(unstretched);
    }
}

impl TickStats {
    /// Every decoder call: decodes, FEC recoveries and concealments.
    pub fn decode_calls(&self) -> u32 {
        self.decodes + self.fec + self.plc
    }
}

/// The result of one tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MixOutput {
    /// The set mixed this tick (sorted).
    pub mixed: Vec<StreamId>,
    /// ONE Opus frame for every listener who is not a selected local speaker (encoded once).
    pub shared: Bytes,
    /// For each LOCAL selected speaker, sorted by stream: its own mix, never containing itself.
    pub per_speaker: Vec<(StreamId, Bytes)>,
    /// For each mixed stream that contributed received audio this tick: the arrival time of the
    /// packet it came from (the server-added-delay metric is `egress - arrival`).
    pub carried: Vec<(StreamId, Duration)>,
    /// Work counters.
    pub stats: TickStats,
}

/// A gain-riding limiter: if a frame's peak would exceed the ceiling (-1 dBFS), the gain drops at
/// once to exactly what that frame needs, then recovers slowly (≈150 ms time constant) with a
/// per-sample ramp. Unlike a clipper it adds no harmonics to a steady signal: a constant overload
/// gets a constant gain, so summed tones stay clean tones.
///
/// Invariant: every output sample's magnitude is at most the ceiling.
#[derive(Clone, Debug)]
pub struct SoftLimiter {
    gain: f32,
    release: f32,
}

impl SoftLimiter {
    /// Output ceiling: -1 dBFS, leaving the encoder headroom for its own overshoot.
    pub const CEILING: f32 = 32767.0 * 0.891_250_9;

    const RELEASE_MS: f32 = 150.0;

    /// A limiter for `frame_ms` frames, at unity gain.
    pub fn new(frame_ms: u32) -> Self {
        Self {
            gain: 1.0,
            release: 1.0 - (-(frame_ms.max(1) as f32) / Self::RELEASE_MS).exp(),
        }
    }

    /// The gain reached at the end of the last frame (1.0 = not limiting).
    pub fn gain(&self) -> f32 {
        self.gain
    }

    /// Limits one frame of `i32` sums into `out` (which must be as long as `bus`; extra samples on
    /// either side are ignored).
    pub fn process(&mut self, bus: &[i32], out: &mut [i16]) {
        let peak = bus.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0) as f32;
        let needed = if peak > Self::CEILING {
            Self::CEILING / peak
        } else {
            1.0
        };
        // Never start above what this frame allows (instant attack) and never recover past it,
        // so every interpolated gain in between is ≤ `needed`.
        let start = self.gain.min(needed);
        let end = (start + (1.0 - start) * self.release).min(needed);
        let n = bus.len().min(out.len()).max(1) as f32;
        for (i, (o, &s)) in out.iter_mut().zip(bus).enumerate() {
            let g = start + (end - start) * (i as f32 + 1.0) / n;
            *o = (s as f32 * g)
                .round()
                .clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16;
        }
        self.gain = end;
    }
}

/// One output encoder with its own limiter state (the shared mix, or one speaker's mix).
#[derive(Debug)]
struct Output {
    encoder: Encoder,
    limiter: SoftLimiter,
}

impl Output {
    fn new(frame_ms: u32, low_delay: bool, loss_percent: Option<u8>) -> Result<Self, MediaError> {
        let mut encoder = Encoder::with_mode(frame_ms, low_delay)?;
        if let Some(p) = loss_percent {
            encoder.set_packet_loss_percent(p)?;
        }
        Ok(Self {
            encoder,
            limiter: SoftLimiter::new(frame_ms),
        })
    }

    fn encode(&mut self, bus: &[i32], scratch: &mut [i16]) -> Result<Bytes, MediaError> {
        self.limiter.process(bus, scratch);
        self.encoder.encode(scratch)
    }
}

#[derive(Debug)]
struct Stream {
    origin: StreamOrigin,
    muted: bool,
    jitter: JitterBuffer,
    /// The jitter buffer's counters at the last tick (for [`TickStats::jitter`]).
    jitter_seen: JitterStats,
    /// Created on first need: a silent stream with RFC 6464 levels may never need one.
    decoder: Option<Decoder>,
    level: LevelTracker,
    /// Loudest RFC 6464 level received since the last tick.
    pending_level: Option<AudioLevel>,
    /// Whether the newest packet carried an RFC 6464 level (then importance needs no decode).
    header_levels: bool,
    /// The decoder was fed during the current (or, until the tick starts, the previous) tick.
    decoder_warm: bool,
    /// Consecutive ticks concealed because of an underrun.
    underrun_concealed: u32,
    /// Room frames per packet of this stream: 1, or 2 for 20 ms packets in a 10 ms room.
    frames_per_packet: usize,
    /// Which room frame of the current packet the next tick plays (0: pull a new packet).
    phase: usize,
    /// The current packet decoded, when a packet spans several room frames.
    split: Option<SplitPacket>,
    /// Consecutive packets (of a stream whose packets span several frames) already waiting long
    /// enough at the tick before their pull (see [`PULL_SOONER_AFTER`]).
    early_packets: u32,
    /// Room ticks since this stream's buffer ran dry at a pull, while it has not played again.
    dry_ticks: Option<u32>,
    /// Pulls left in which one early packet moves the pulls sooner (see [`RECOVER_PULLS`]).
    recovering: u32,
    /// The RFC 6464 level of the current packet, observed again on ticks that pull none.
    last_level: Option<AudioLevel>,
    /// While not mixed: its last [`PREROLL_MS`] of frames (and a peer's backlog).
    history: VecDeque<PastFrame>,
    /// While mixed and behind: the frames to play before the newest, oldest first.
    replay: VecDeque<PastFrame>,
    /// Ticks the stream has been behind.
    behind_ticks: u32,
    /// Consecutive ticks the stream has been waited for (in the last tick's mix set).
    awaited_ticks: u32,
}

impl Stream {
    /// Back to the first room frame of a packet, with nothing split and no late rotation to
    /// recover from: for a new buffer, decoder or packet length.
    fn restart_rotation(&mut self) {
        self.phase = 0;
        self.split = None;
        self.dry_ticks = None;
        self.recovering = 0;
    }
}

/// One decoded packet longer than the room's frame, played a frame at a time.
#[derive(Debug)]
struct SplitPacket {
    pcm: Vec<i16>,
    received: bool,
    arrival: Option<Duration>,
}

/// The jitter buffer's settings for a stream whose packets span `frames` room frames: it runs on
/// the packet's clock, one pull per packet.
fn jitter_config(cfg: &MixerConfig, frames: usize) -> Result<JitterConfig, MediaError> {
    let frames = u32::try_from(frames).unwrap_or(u32::MAX);
    JitterConfig::new(
        cfg.frame_ms.saturating_mul(frames),
        cfg.jitter_min_ms,
        cfg.jitter_max_ms,
    )
}

/// One tick's frame of one stream, decoded at most once.
#[derive(Debug)]
struct Pulled {
    playout: Playout,
    arrival: Option<Duration>,
    pcm: Option<Vec<i16>>,
    rendered: bool,
    /// The stream's decoder was fed on the previous tick (its history is current).
    warm: bool,
    /// The audio came from a received packet (the frame itself or FEC), not concealment.
    received: bool,
    /// The frame can be held for a later entry ([`PREROLL_MS`]): one packet per frame, with
    /// RFC 6464 levels to find a talkspurt by.
    prerollable: bool,
    /// The frame's packet carried a voiced level.
    voiced: bool,
}

impl Pulled {
    /// A frame pulled from the jitter buffer and not decoded yet.
    fn undecoded(playout: Playout, arrival: Option<Duration>, warm: bool) -> Self {
        Self {
            playout,
            arrival,
            pcm: None,
            rendered: false,
            warm,
            received: false,
            prerollable: false,
            voiced: false,
        }
    }
}

/// The mixer of one room on one server. See the module docs.
#[derive(Debug)]
pub struct RoomMixer {
    cfg: MixerConfig,
    jitter_cfg: JitterConfig,
    frame_samples: usize,
    streams: BTreeMap<StreamId, Stream>,
    /// Ranks local streams only: the candidates this server reports to the mesh primary.
    local_ranker: Ranker,
    /// Ranks every stream: the mix set when no global list is imposed.
    mix_ranker: Ranker,
    last_local: Ranking,
    selection: Option<Vec<StreamId>>,
    shared: Output,
    speakers: BTreeMap<StreamId, Output>,
    loss_percent: Option<u8>,
    bus: Vec<i32>,
    scratch: Vec<i16>,
    /// The streams the last tick mixed (and its backfill): the ones an early tick waits for
    /// ([`RoomMixer::ready`]).
    awaited: Vec<StreamId>,
}

impl RoomMixer {
    /// A mixer with no streams. Fails on an unsupported frame size or inconsistent bounds.
    pub fn new(cfg: MixerConfig) -> Result<Self, MediaError> {
        let frame_samples = codec::frame_samples_for(cfg.frame_ms)?;
        if cfg.top_speakers == 0 || cfg.top_speakers > MAX_TOP_SPEAKERS {
            return Err(MediaError::InvalidConfig(format!(
                "top_speakers must be 1..={MAX_TOP_SPEAKERS}, got {}",
                cfg.top_speakers
            )));
        }
        if cfg.extra_candidates > MAX_TOP_SPEAKERS {
            return Err(MediaError::InvalidConfig(format!(
                "extra_candidates must be at most {MAX_TOP_SPEAKERS}, got {}",
                cfg.extra_candidates
            )));
        }
        let jitter_cfg = JitterConfig::new(cfg.frame_ms, cfg.jitter_min_ms, cfg.jitter_max_ms)?;
        let ranking = RankingConfig::new(cfg.top_speakers, cfg.extra_candidates);
        Ok(Self {
            cfg,
            jitter_cfg,
            frame_samples,
            streams: BTreeMap::new(),
            local_ranker: Ranker::new(ranking),
            mix_ranker: Ranker::new(ranking),
            last_local: Ranking::default(),
            selection: None,
            shared: Output::new(cfg.frame_ms, cfg.low_delay, None)?,
            speakers: BTreeMap::new(),
            loss_percent: None,
            bus: vec![0; frame_samples],
            scratch: vec![0; frame_samples],
            awaited: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> MixerConfig {
        self.cfg
    }

    /// Applies new settings live (a new mesh-plan generation), or refuses them and changes
    /// nothing.
    ///
    /// With the same frame, streams keep their buffered audio, levels and decoders, and the
    /// selection is kept: top-N and the margin change at the next tick, and jitter bounds in place
    /// (a buffer whose bound shrinks starts afresh, a glitch of a frame or two). A new frame
    /// length needs new encoders, buffers and level trackers: the streams, their origin and
    /// mute state, the imposed selection and the loss setting carry over; audio in flight does
    /// not. Switching `low_delay` replaces the mixes' encoders (the first frame after it starts
    /// a new Opus stream, which decoders take without a glitch worth a frame).
    pub fn reconfigure(&mut self, cfg: MixerConfig) -> Result<(), MediaError> {
        if cfg == self.cfg {
            return Ok(());
        }
        let mut next = RoomMixer::new(cfg)?;
        if cfg.frame_ms != self.cfg.frame_ms {
            if let Some(p) = self.loss_percent {
                next.set_output_loss_percent(p)?;
            }
            for (&id, s) in &self.streams {
                next.add_stream(id, s.origin);
                next.set_muted(id, s.muted);
            }
            next.selection = self.selection.take();
            *self = next;
            return Ok(());
        }
        if cfg.low_delay != self.cfg.low_delay {
            // New encoders for every mix: the shared one now, each speaker's on its next tick.
            self.shared = Output::new(cfg.frame_ms, cfg.low_delay, self.loss_percent)?;
            self.speakers.clear();
        }
        let ranking = RankingConfig::new(cfg.top_speakers, cfg.extra_candidates);
        self.local_ranker.set_config(ranking);
        self.mix_ranker.set_config(ranking);
        if next.jitter_cfg != self.jitter_cfg {
            for s in self.streams.values_mut() {
                let stream_cfg = jitter_config(&cfg, s.frames_per_packet)?;
                if !s.jitter.set_bounds(stream_cfg) {
                    s.jitter = JitterBuffer::new(stream_cfg);
                    s.jitter_seen = JitterStats::default();
                    s.restart_rotation();
                }
            }
            self.jitter_cfg = next.jitter_cfg;
        }
        self.cfg = cfg;
        Ok(())
    }

    /// Adds a stream. Adding an id that exists only updates its origin.
    pub fn add_stream(&mut self, id: StreamId, origin: StreamOrigin) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.origin = origin;
            return;
        }
        self.streams.insert(
            id,
            Stream {
                origin,
                muted: false,
                jitter: JitterBuffer::new(self.jitter_cfg),
                jitter_seen: JitterStats::default(),
                decoder: None,
                level: LevelTracker::new(self.cfg.frame_ms),
                pending_level: None,
                header_levels: false,
                decoder_warm: false,
                underrun_concealed: 0,
                frames_per_packet: 1,
                phase: 0,
                split: None,
                early_packets: 0,
                dry_ticks: None,
                recovering: 0,
                last_level: None,
                history: VecDeque::new(),
                replay: VecDeque::new(),
                behind_ticks: 0,
                awaited_ticks: 0,
            },
        );
    }

    /// Removes a stream and everything it holds (buffer, decoder, speaker encoder).
    pub fn remove_stream(&mut self, id: StreamId) {
        self.streams.remove(&id);
        self.speakers.remove(&id);
    }

    /// Forgets a stream's received audio: its jitter buffer and decoder start afresh (a new
    /// sender: new SSRC, sequence and timestamps), while its level, rank and selection stay.
    /// Unknown ids are ignored.
    pub fn restart_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.jitter = JitterBuffer::new(self.jitter_cfg);
            s.jitter_seen = JitterStats::default();
            s.decoder = None;
            s.decoder_warm = false;
            s.underrun_concealed = 0;
            s.frames_per_packet = 1;
            s.restart_rotation();
            s.history.clear();
            s.replay.clear();
        }
    }

    /// Mutes or unmutes a stream. A muted stream is never ranked, decoded or mixed; its packets
    /// still flow through the jitter buffer so unmuting is seamless. Unknown ids are ignored.
    pub fn set_muted(&mut self, id: StreamId, muted: bool) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.muted = muted;
            if muted {
                s.level.reset();
                s.pending_level = None;
                s.history.clear();
                s.replay.clear();
            }
        }
    }

    /// The streams present, sorted.
    pub fn streams(&self) -> Vec<StreamId> {
        self.streams.keys().copied().collect()
    }

    /// A stream's jitter-buffer counters.
    pub fn jitter_stats(&self, id: StreamId) -> Option<JitterStats> {
        self.streams.get(&id).map(|s| s.jitter.stats())
    }

    /// A stream's jitter-buffer target: the margin its frames need after their arrival.
    pub fn jitter_target(&self, id: StreamId) -> Option<Duration> {
        self.streams.get(&id).map(|s| s.jitter.target())
    }

    /// A stream's current importance and voice flag, whatever its origin.
    pub fn importance(&self, id: StreamId) -> Option<Candidate> {
        self.streams.get(&id).map(|s| Candidate {
            stream: id,
            importance: s.level.importance(),
            voice: s.level.voice(),
            identity: None,
        })
    }

    /// Tells every output encoder how much loss listeners report (sizes the Opus FEC).
    pub fn set_output_loss_percent(&mut self, percent: u8) -> Result<(), MediaError> {
        self.loss_percent = Some(percent);
        self.shared.encoder.set_packet_loss_percent(percent)?;
        for out in self.speakers.values_mut() {
            out.encoder.set_packet_loss_percent(percent)?;
        }
        Ok(())
    }

    /// Files one packet. Unknown streams and payloads that are not a well-formed Opus packet of
    /// the room's frame length are refused, and nothing else changes; in a 10 ms room a 20 ms
    /// packet (what browsers send) is accepted too, and played as two frames.
    pub fn push(&mut self, pkt: InboundPacket) -> Result<(), MediaError> {
        let s = self
            .streams
            .get_mut(&pkt.stream)
            .ok_or(MediaError::UnknownStream(pkt.stream))?;
        let samples = codec::packet_samples(&pkt.payload)?;
        let frames = match samples {
            n if n == self.frame_samples => 1,
            n if n == 2 * self.frame_samples && self.cfg.frame_ms == 10 => 2,
            got => {
                return Err(MediaError::FrameDuration {
                    expected: self.frame_samples,
                    got,
                });
            }
        };
        if frames != s.frames_per_packet {
            // The sender's packet length changed (or the room's frame did): a new clock for
            // this stream's buffer and decoder.
            s.jitter = JitterBuffer::new(jitter_config(&self.cfg, frames)?);
            s.jitter_seen = JitterStats::default();
            s.decoder = None;
            s.decoder_warm = false;
            s.frames_per_packet = frames;
            s.restart_rotation();
        }
        s.header_levels = pkt.level.is_some();
        if let Some(l) = pkt.level
            && !s.muted
        {
            s.pending_level = Some(match s.pending_level {
                Some(p) => AudioLevel {
                    dbov: p.dbov.min(l.dbov),
                    voice: p.voice || l.voice,
                },
                None => l,
            });
        }
        s.jitter.push_leveled(
            pkt.seq,
            pkt.rtp_timestamp,
            pkt.payload,
            pkt.arrival,
            pkt.level,
        );
        Ok(())
    }

    /// Files a packet a mesh peer sent late, from before it began forwarding the stream (its
    /// backlog): it joins the frames kept for the stream's entry into the mix, not the jitter
    /// buffer, whose playout runs on the live packets. Refused like [`Self::push`]; packets
    /// that span several room frames, or carry no level, are dropped (they cannot be replayed).
    pub fn push_history(&mut self, pkt: InboundPacket) -> Result<(), MediaError> {
        let keep = self.preroll_frames();
        let s = self
            .streams
            .get_mut(&pkt.stream)
            .ok_or(MediaError::UnknownStream(pkt.stream))?;
        let samples = codec::packet_samples(&pkt.payload)?;
        if samples != self.frame_samples || pkt.level.is_none() || s.muted {
            return Ok(());
        }
        // A stream may begin with its backlog: it has levels, so its frames can be kept.
        s.header_levels = true;
        push_bounded(
            &mut s.history,
            PastFrame {
                playout: Playout::Frame(pkt.payload),
                arrival: Some(pkt.arrival),
                voiced: voiced(pkt.level),
            },
            keep,
        );
        Ok(())
    }

    /// [`PREROLL_MS`] in room frames.
    fn preroll_frames(&self) -> usize {
        (PREROLL_MS / self.cfg.frame_ms.max(1)).max(1) as usize
    }

    /// Step 3b of the tick: streams outside the mix set keep their frames; a stream entering it
    /// plays from its talkspurt's first kept frame, and a stream behind catches up by skipping
    /// voiceless frames. Each stream still plays one frame per tick.
    fn preroll(
        &mut self,
        mix_set: &[StreamId],
        pulled: &mut BTreeMap<StreamId, Pulled>,
        stats: &mut TickStats,
    ) {
        let keep = self.preroll_frames();
        let frame_ms = self.cfg.frame_ms.max(1);
        let gap = (ONSET_GAP_MS / frame_ms).max(1) as usize;
        let force_after = FORCED_CATCH_UP_AFTER_MS / frame_ms;
        let force_every = (FORCED_SKIP_EVERY_MS / frame_ms).max(1);
        for (&id, s) in &mut self.streams {
            let Some(p) = pulled.get_mut(&id) else {
                continue;
            };
            if !p.prerollable {
                s.history.clear();
                s.replay.clear();
                continue;
            }
            let current = PastFrame {
                playout: p.playout.clone(),
                arrival: p.arrival,
                voiced: p.voiced,
            };
            if !mix_set.contains(&id) {
                s.behind_ticks = 0;
                // The backfill's frames are kept too. Local speakers hear them now and will hear
                // the onset again when the stream enters; everyone else would miss it otherwise.
                s.replay.clear();
                push_bounded(&mut s.history, current, keep);
                continue;
            }
            if !s.history.is_empty() {
                s.replay = talkspurt(std::mem::take(&mut s.history), gap);
                // Decoded as the backfill, the decoder is ahead of the onset: start it clean.
                p.warm = false;
            }
            if s.replay.is_empty() {
                s.behind_ticks = 0;
                continue;
            }
            s.replay.push_back(current);
            while s.replay.len() > 1 && s.replay.front().is_some_and(|f| !f.voiced) {
                s.replay.pop_front();
                stats.preroll_skipped += 1;
            }
            s.behind_ticks = s.behind_ticks.saturating_add(1);
            if s.replay.len() > 1
                && s.behind_ticks >= force_after
                && s.behind_ticks.is_multiple_of(force_every)
            {
                s.replay.pop_front();
                stats.preroll_skipped += 1;
            }
            while s.replay.len() > keep {
                s.replay.pop_front();
                stats.preroll_skipped += 1;
            }
            if let Some(f) = s.replay.pop_front() {
                if !s.replay.is_empty() {
                    stats.preroll_replayed += 1;
                }
                p.playout = f.playout;
                p.arrival = f.arrival;
            }
        }
    }

    /// Local streams ranked at the last tick: the top N then the margin, for the mesh primary.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.last_local.candidates()
    }

    /// `Some(list)`: mix exactly these streams (the mesh's global list; ids not present here yet
    /// are skipped until they arrive). `None`: mix the local top N.
    pub fn set_selection(&mut self, selection: Option<Vec<StreamId>>) {
        self.selection = selection.map(|mut list| {
            list.sort_unstable();
            list.dedup();
            list
        });
    }

    /// The imposed selection, if any.
    pub fn selection(&self) -> Option<&[StreamId]> {
        self.selection.as_deref()
    }

    /// Runs one frame tick at `now`. Call every `frame_ms`.
    pub fn tick(&mut self, now: Duration) -> MixOutput {
        self.tick_before(now, now)
    }

    /// Whether every stream the last tick mixed (and its backfill) has the frame this tick
    /// would take from it: its next packet is here, or it needs none this tick (a 20 ms packet's
    /// second half in a 10 ms room), or it is not playing (paused, muted, gone). `false` when
    /// the last tick mixed nothing: an early tick ([`RoomMixer::tick_before`]) would then gain
    /// no one anything.
    pub fn ready(&self) -> bool {
        !self.awaited.is_empty()
            && self.awaited.iter().all(|id| {
                self.streams.get(id).is_none_or(|s| {
                    s.muted
                        || !s.jitter.is_playing()
                        || (s.frames_per_packet > 1 && s.phase != 0)
                        || s.jitter.next_arrival().is_some()
                })
            })
    }

    /// The tick due at `due`, run at `now` (at or before it) because the streams it waits for
    /// are [`ready`](RoomMixer::ready) (DESIGN §13: the tick sits just after the top talkers'
    /// packets arrive). Those streams are ticked as at `due`: each has its frame already, so
    /// their jitter buffers see the slack and make the choices they would have made at `due`,
    /// and an early tick never makes them shrink, stretch or run dry; and a frame of delay one
    /// of them holds only because ticks used not to wait for it is dropped at once
    /// ([`JitterBuffer::take_back_before_early_tick`]). Every other stream is
    /// ticked at `now`: a packet of it that comes between `now` and `due` is late for this
    /// tick, which its buffer absorbs as any late packet (it runs dry once and plays on a
    /// frame later). With `now ≥ due` this is [`RoomMixer::tick`] at `now`.
    pub fn tick_before(&mut self, now: Duration, due: Duration) -> MixOutput {
        let awaited = std::mem::take(&mut self.awaited);
        let mut stats = TickStats::default();
        let mut pulled: BTreeMap<StreamId, Pulled> = BTreeMap::new();

        // 1-2. Pull a frame from every stream; update importance. A stream whose packets span
        //    several frames pulls a packet every few ticks and plays it a frame at a time.
        let frame_samples = self.frame_samples;
        let room_frame = Duration::from_millis(u64::from(self.cfg.frame_ms));
        let early = due > now;
        for (&id, s) in &mut self.streams {
            let waited_for = awaited.contains(&id);
            let now = if early && waited_for { due } else { now };
            let mut index = s.phase;
            if s.frames_per_packet > 1 && index + 1 == s.frames_per_packet {
                // The tick before this stream's next pull: is its next packet already here, and
                // has it waited as long as the buffer asks of a frame at its tick? Not a room
                // frame more than that: then its own buffer sheds whole packets, and pulling
                // sooner as well would take back more delay than there is.
                let target = s.jitter.target();
                let early = s.jitter.next_arrival().is_some_and(|arrival| {
                    let waited = now.saturating_sub(arrival);
                    waited >= target / 2 && waited < target + room_frame
                });
                s.early_packets = if early { s.early_packets + 1 } else { 0 };
                let needed = if s.recovering > 0 {
                    1
                } else {
                    PULL_SOONER_AFTER
                };
                s.recovering = s.recovering.saturating_sub(1);
                if s.early_packets >= needed {
                    // Every packet of a whole window sat a room frame longer than it had to (or,
                    // just after one late packet, the next is on time): pull now, skipping the
                    // current packet's last frame, and from here on a frame sooner.
                    s.early_packets = 0;
                    s.recovering = 0;
                    s.split = None;
                    index = 0;
                    stats.pulled_sooner += 1;
                }
            }
            let pull = index == 0;
            s.phase = (index + 1) % s.frames_per_packet.max(1);
            let was_playing = s.jitter.is_playing();
            s.awaited_ticks = if waited_for {
                s.awaited_ticks.saturating_add(1)
            } else {
                0
            };
            // Taking a frame back skips what it carried: of a talker the tick has waited for
            // only briefly (one entering the mix set, whose first syllables must arrive
            // whole), only a frame without voice.
            if pull
                && early
                && waited_for
                && (s.awaited_ticks >= TAKE_BACK_VOICED_AFTER_TICKS
                    || !voiced(s.jitter.next_level()))
            {
                s.jitter.take_back_before_early_tick(due);
            }
            let (playout, arrival) = if pull {
                (s.jitter.tick(now), s.jitter.last_arrival())
            } else {
                (Playout::Empty, None)
            };
            if pull && s.frames_per_packet > 1 {
                if playout == Playout::Empty {
                    // Nothing to play yet (not started, ran dry, or held back to add delay):
                    // try again at the next room tick, not a whole packet later, so delay grows
                    // by a room frame at a time.
                    s.phase = 0;
                    if was_playing && !s.jitter.is_playing() {
                        s.dry_ticks = Some(0);
                    }
                } else if s.dry_ticks.take().is_some_and(|t| t < RECOVER_WITHIN_TICKS) {
                    // Playing again right after one packet missed its pull: that packet moved
                    // the rotation a frame late, and the next packet on time moves it back.
                    s.recovering = RECOVER_PULLS;
                }
            }
            if s.jitter.is_playing() {
                s.dry_ticks = None;
            } else if let Some(t) = s.dry_ticks.as_mut() {
                *t = t.saturating_add(1);
            }
            stats.jitter_depth.push((id, s.jitter.depth()));
            let seen = s.jitter.stats();
            stats.jitter.add_between(&s.jitter_seen, &seen);
            s.jitter_seen = seen;
            if matches!(playout, Playout::Lost { .. }) {
                stats.lost += 1;
            }
            // The decoder is fed once per packet: between pulls its history stays current.
            let warm = if pull {
                std::mem::replace(&mut s.decoder_warm, false)
            } else {
                s.decoder_warm
            };
            if s.muted {
                // Draining only: the muted stream costs no decode and keeps no level.
                s.split = None;
                continue;
            }
            if s.frames_per_packet > 1 {
                let p = split_frame(
                    id,
                    s,
                    (playout, arrival),
                    warm,
                    index,
                    frame_samples,
                    &mut stats,
                );
                pulled.insert(id, p);
                continue;
            }
            let mut p = Pulled::undecoded(playout, arrival, warm);
            p.prerollable = pull && s.header_levels;
            p.voiced = voiced(s.jitter.last_level());
            if s.header_levels {
                match s.pending_level.take() {
                    Some(level) => s.level.observe_rfc6464(level),
                    None => s.level.observe_silence(),
                }
            } else {
                // No level in the header: the frame's energy is the only measure.
                render(id, s, &mut p, &mut stats);
                match (&p.pcm, p.received) {
                    (Some(pcm), true) => s.level.observe_pcm(pcm),
                    _ => s.level.observe_silence(),
                }
            }
            pulled.insert(id, p);
        }

        // 3. Rank and choose the mix set.
        let eligible: Vec<Candidate> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.muted)
            .map(|(&id, s)| Candidate {
                stream: id,
                importance: s.level.importance(),
                voice: s.level.voice(),
                identity: None,
            })
            .collect();
        let local: Vec<Candidate> = eligible
            .iter()
            .filter(|c| {
                self.streams
                    .get(&c.stream)
                    .is_some_and(|s| s.origin == StreamOrigin::Local)
            })
            .cloned()
            .collect();
        self.last_local = self.local_ranker.update(&local);
        let ranked = self.mix_ranker.update(&eligible);
        let (mix_set, backfill): (Vec<StreamId>, Option<StreamId>) = match &self.selection {
            None => (ranked.selected_ids(), ranked.backfill()),
            Some(list) => {
                let set: Vec<StreamId> = list
                    .iter()
                    .copied()
                    .filter(|id| pulled.contains_key(id))
                    .collect();
                let silence = self.mix_ranker.config().silence_dbov;
                let mut outside: Vec<Candidate> = eligible
                    .iter()
                    .filter(|c| !set.contains(&c.stream) && c.importance >= silence)
                    .cloned()
                    .collect();
                outside.sort_by(rank_order);
                (set, outside.first().map(|c| c.stream))
            }
        };
        let local_speakers: Vec<StreamId> = mix_set
            .iter()
            .copied()
            .filter(|id| {
                self.streams
                    .get(id)
                    .is_some_and(|s| s.origin == StreamOrigin::Local)
            })
            .collect();
        // The backfill only serves speakers' own mixes; without local speakers it costs nothing.
        let backfill = backfill.filter(|_| !local_speakers.is_empty());

        // 3b. An entering stream starts at its talkspurt's onset (see the module docs).
        self.preroll(&mix_set, &mut pulled, &mut stats);

        // 4. Decode what the mixes need and was not decoded for energy already.
        for &id in mix_set.iter().chain(backfill.iter()) {
            if let (Some(s), Some(p)) = (self.streams.get_mut(&id), pulled.get_mut(&id))
                && !p.rendered
            {
                render(id, s, p, &mut stats);
            }
        }

        // 5. Mix: one i32 bus of the whole set, then each speaker's bus = set - self + backfill.
        self.bus.fill(0);
        let mut carried = Vec::new();
        for id in &mix_set {
            if let Some(p) = pulled.get(id)
                && let Some(pcm) = &p.pcm
            {
                add_into(&mut self.bus, pcm, 1);
                if p.received
                    && let Some(at) = p.arrival
                {
                    carried.push((*id, at));
                }
            }
        }
        let shared = match self.shared.encode(&self.bus, &mut self.scratch) {
            Ok(b) => b,
            Err(e) => {
                stats.output_errors.push(e);
                Bytes::new()
            }
        };
        stats.encodes += 1;

        let backfill_pcm = backfill
            .and_then(|id| pulled.get(&id))
            .and_then(|p| p.pcm.as_deref());
        let mut per_speaker = Vec::with_capacity(local_speakers.len());
        let mut own = vec![0i32; self.frame_samples];
        for &id in &local_speakers {
            own.copy_from_slice(&self.bus);
            if let Some(pcm) = pulled.get(&id).and_then(|p| p.pcm.as_deref()) {
                add_into(&mut own, pcm, -1);
            }
            if let Some(pcm) = backfill_pcm {
                add_into(&mut own, pcm, 1);
            }
            let out = match self.speakers.entry(id) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    match Output::new(self.cfg.frame_ms, self.cfg.low_delay, self.loss_percent) {
                        Ok(o) => v.insert(o),
                        Err(e) => {
                            stats.output_errors.push(e);
                            continue;
                        }
                    }
                }
            };
            let bytes = match out.encode(&own, &mut self.scratch) {
                Ok(b) => b,
                Err(e) => {
                    stats.output_errors.push(e);
                    Bytes::new()
                }
            };
            stats.encodes += 1;
            per_speaker.push((id, bytes));
        }
        // A speaker's encoder lives exactly as long as they stay selected.
        let keep: BTreeSet<StreamId> = local_speakers.iter().copied().collect();
        self.speakers.retain(|id, _| keep.contains(id));

        stats.decoded.sort_unstable();
        stats.decoded.dedup();
        stats.local_speakers = local_speakers.len();
        self.awaited = mix_set.iter().copied().chain(backfill).collect();
        MixOutput {
            mixed: mix_set,
            shared,
            per_speaker,
            carried,
            stats,
        }
    }
}

/// `bus[i] += sign · pcm[i]`, in i32 (no overflow for any realistic stream count: 2^31 / 2^15).
fn add_into(bus: &mut [i32], pcm: &[i16], sign: i32) {
    for (b, &s) in bus.iter_mut().zip(pcm) {
        *b = b.saturating_add(sign * i32::from(s));
    }
}

/// One room frame of a stream whose packets span several: on the packet's first frame, pull
/// and decode the whole packet (whatever the mix needs: its PCM must be split anyway); on every
/// frame, serve the matching slice and update the stream's importance.
fn split_frame(
    id: StreamId,
    s: &mut Stream,
    (playout, arrival): (Playout, Option<Duration>),
    warm: bool,
    index: usize,
    frame_samples: usize,
    stats: &mut TickStats,
) -> Pulled {
    if index == 0 {
        s.last_level = if s.header_levels {
            s.pending_level.take()
        } else {
            None
        };
        let mut whole = Pulled::undecoded(playout, arrival, warm);
        render(id, s, &mut whole, stats);
        s.split = whole.pcm.map(|pcm| SplitPacket {
            pcm,
            received: whole.received,
            arrival,
        });
    }
    let start = index * frame_samples;
    let slice = s.split.as_ref().and_then(|sp| {
        sp.pcm
            .get(start..start + frame_samples)
            .map(|pcm| (pcm.to_vec(), sp))
    });
    // Rendered already: the packet was decoded whole when it was pulled.
    let mut p = Pulled::undecoded(Playout::Empty, None, warm);
    p.rendered = true;
    if let Some((pcm, sp)) = slice {
        p.arrival = sp.arrival;
        p.pcm = Some(pcm);
        p.received = sp.received;
    }
    if s.header_levels {
        match s.last_level {
            Some(level) => s.level.observe_rfc6464(level),
            None => s.level.observe_silence(),
        }
    } else {
        match (&p.pcm, p.received) {
            (Some(pcm), true) => s.level.observe_pcm(pcm),
            _ => s.level.observe_silence(),
        }
    }
    p
}

/// Turns one stream's playout into PCM, at most once per tick.
fn render(id: StreamId, s: &mut Stream, p: &mut Pulled, stats: &mut TickStats) {
    p.rendered = true;
    let warm = p.warm;
    let frame_ms = s.jitter.config().frame_ms;
    if s.decoder.is_none() {
        match Decoder::new(frame_ms) {
            Ok(d) => s.decoder = Some(d),
            Err(e) => {
                stats.errors.push((id, e));
                return;
            }
        }
    }
    let Some(dec) = s.decoder.as_mut() else {
        return;
    };
    // A decoder that skipped ticks holds stale history; a clean start sounds better.
    if !warm && let Err(e) = dec.reset() {
        stats.errors.push((id, e));
        return;
    }
    let result = match &p.playout {
        Playout::Frame(payload) => {
            stats.decodes += 1;
            s.underrun_concealed = 0;
            p.received = true;
            Some(dec.decode(payload))
        }
        Playout::Lost {
            next: Some(next_payload),
        } => {
            stats.fec += 1;
            s.underrun_concealed = 0;
            p.received = true;
            Some(dec.decode_fec(next_payload))
        }
        // Concealing from a cold decoder would only produce silence.
        Playout::Lost { next: None } if warm => {
            stats.plc += 1;
            s.underrun_concealed = 0;
            Some(dec.conceal())
        }
        Playout::Empty if warm && s.underrun_concealed < MAX_UNDERRUN_CONCEAL_TICKS => {
            stats.plc += 1;
            s.underrun_concealed += 1;
            Some(dec.conceal())
        }
        Playout::Lost { next: None } | Playout::Empty => None,
    };
    let Some(result) = result else {
        return;
    };
    stats.decoded.push(id);
    match result {
        Ok(pcm) => {
            s.decoder_warm = true;
            p.pcm = Some(pcm);
        }
        Err(e) => {
            // Treated as a lost frame; the next tick starts from a clean decoder.
            p.received = false;
            stats.errors.push((id, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::spectrum::{ToneGenerator, ToneReport};

    fn tone_bus(freqs: &[f64], dbfs: f64, samples: usize) -> Vec<i32> {
        let mut gens: Vec<ToneGenerator> = freqs
            .iter()
            .map(|&f| ToneGenerator::new(f, dbfs, 48_000))
            .collect();
        let mut bus = vec![0i32; samples];
        for g in &mut gens {
            for (b, s) in bus.iter_mut().zip(g.frame(samples)) {
                *b += i32::from(s);
            }
        }
        bus
    }

    #[test]
    fn limiter_keeps_three_full_scale_tones_clean_and_in_range() {
        let freqs = [300.0, 700.0, 1300.0];
        let bus = tone_bus(&freqs, 0.0, 48_000);
        let mut lim = SoftLimiter::new(20);
        let mut out = vec![0i16; bus.len()];
        for (b, o) in bus.chunks(960).zip(out.chunks_mut(960)) {
            lim.process(b, o);
        }
        let peak = out.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!(f32::from(peak) <= SoftLimiter::CEILING + 1.0, "peak {peak}");
        let worst_step = out
            .windows(2)
            .map(|w| (i32::from(w[1]) - i32::from(w[0])).abs())
            .max()
            .unwrap();
        assert!(worst_step < 10_000, "discontinuity of {worst_step}");
        // After the first frame the gain is steady: the three tones are equal and nothing else
        // appears (intermodulation products of a clipper would show at 400, 600, 1000 Hz).
        let report = ToneReport::analyze(
            &out[960..],
            &[300.0, 700.0, 1300.0, 400.0, 600.0, 1000.0, 1600.0],
            48_000,
        );
        assert_eq!(report.present(), freqs.to_vec(), "{report:?}");
        let levels: Vec<f64> = freqs
            .iter()
            .map(|&f| report.tone(f).unwrap().level_dbfs)
            .collect();
        assert!(
            levels.iter().all(|l| (l - levels[0]).abs() < 0.5),
            "{levels:?}"
        );
        assert!(
            report.loudest_absent_dbfs() < levels[0] - 60.0,
            "{report:?}"
        );
    }

    #[test]
    fn limiter_is_transparent_below_the_ceiling_and_recovers() {
        let mut lim = SoftLimiter::new(20);
        let quiet: Vec<i32> = (0..960).map(|i| (i % 100) * 100 - 5000).collect();
        let mut out = vec![0i16; 960];
        lim.process(&quiet, &mut out);
        assert!(out.iter().zip(&quiet).all(|(&o, &q)| i32::from(o) == q));
        lim.process(&[100_000; 960], &mut out);
        assert!(lim.gain() < 0.3);
        for _ in 0..100 {
            lim.process(&quiet, &mut out);
        }
        assert!(lim.gain() > 0.99);
        // Extreme sums never wrap.
        lim.process(&[i32::MIN, i32::MAX, 0], &mut out[..3]);
        assert!(out[0] < 0 && out[1] > 0);
    }

    #[test]
    fn config_is_validated() {
        let ok = MixerConfig::default();
        assert!(RoomMixer::new(ok).is_ok());
        for bad in [
            MixerConfig { frame_ms: 30, ..ok },
            MixerConfig {
                top_speakers: 0,
                ..ok
            },
            MixerConfig {
                extra_candidates: 1000,
                ..ok
            },
            MixerConfig {
                jitter_min_ms: 300,
                jitter_max_ms: 200,
                ..ok
            },
        ] {
            let err = RoomMixer::new(bad).unwrap_err();
            assert_eq!(err.category(), "invalid_config");
        }
    }
}
