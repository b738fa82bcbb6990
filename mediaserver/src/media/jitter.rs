//! Adaptive jitter buffer for one inbound stream, driven by the mixer's frame tick.
//!
//! Packets go in with their RTP sequence number, timestamp and arrival time; once per tick one
//! [`Playout`] comes out: the next frame's payload, a declared loss (with the following packet's
//! payload when it is already here, so the caller can recover the lost frame from Opus in-band
//! FEC), or nothing (not started, underrun, idle).
//!
//! Playout is sequence-driven: one packet is one frame and each tick is the deadline of the next
//! sequence number. That keeps the buffer immune to sender/receiver clock drift (the depth
//! controller absorbs it) and lets a stream pause (no packets) without any timestamp arithmetic.
//!
//! Delay adaptation works on *slack*: how long a frame waited between its arrival and the tick
//! that played it. Ticks come every frame, so a steady stream's slack is a fixed phase plus whole
//! frames; the buffer keeps the smallest slack that still covers the network's jitter, and never
//! a whole frame more than that.
//! - the interarrival jitter `J` is estimated as in RFC 3550 §6.4.1 (in ms) from arrival times and
//!   RTP timestamps, and sets the margin `T = clamp(3·J, min_ms, max_ms)` (the target);
//! - playout starts (and restarts after an underrun) once the oldest packet has waited `T`, or
//!   enough is buffered to cover `T` after the first pop;
//! - over each window of ticks the smallest slack of the frames played is tracked: if it exceeded
//!   `T` by whole frames, that delay was never needed and as many frames are dropped at once
//!   (delay shrinks); if a packet arrived after its tick had passed, or the smallest slack fell below
//!   `T/2`, one tick plays nothing (delay grows). An underrun also grows the delay, because
//!   playout restarts only after waiting the (by then larger) target;
//! - a frame of delay added that way (or by restarting after an underrun) is taken back, one
//!   frame dropped, once [`UNDO_STRETCH_AFTER_WINDOWS`] windows in a row would have played every
//!   frame without it with slack of at least `T/2` and a quarter of `T` to spare. Without this,
//!   one late packet cost a talker whose slack sits between `T/2` and `T` a whole frame for as
//!   long as it kept talking: the room's aligned tick places the talker it follows exactly there,
//!   and the shrink rule above only sheds slack beyond `T` + a frame.
//!
//! An earlier version targeted `frame + 3·J` of buffered *depth*; at jitter near zero that held
//! two frames, 40 ms, where one phase offset (0–20 ms) suffices. Slack measures what matters: the
//! delay this buffer adds to each frame.
//!
//! Invariants:
//! - held packets always lie in `[next, next + capacity)`, `capacity = ceil(max_ms/frame) + 1`, so
//!   memory is bounded and the depth after a tick never exceeds `max_ms` (rounded up to a frame);
//! - the target always lies in `[min_ms, max_ms]`;
//! - a sequence number is never played twice, and never played after a later one;
//! - no input (any seq, timestamp, arrival, including time going backwards) panics.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use super::{AudioLevel, MediaError, SAMPLE_RATE};

/// Multiplier of the jitter estimate in the target delay. RFC 3550 jitter of a uniformly random
/// delay in `[0, D]` is about `D/3`, so 3·J covers the whole spread.
const JITTER_MULTIPLIER: f64 = 3.0;

/// Ticks per adaptation window (half a second at 20 ms).
const ADAPT_WINDOW_TICKS: u32 = 25;

/// Windows in a row that must show a stretch was no longer needed before it is taken back (two
/// seconds of 20 ms packets): a talker whose packets are late now and then is stretched and
/// shrunk at most once per this many windows, not every other window.
pub const UNDO_STRETCH_AFTER_WINDOWS: u32 = 4;

/// A packet this far (in sequence numbers) from the highest seen is not reordering or loss but a
/// restarted sender; two consecutive such packets resynchronise the buffer.
const RESYNC_DISTANCE: i64 = 1000;

/// Late or duplicate? Remember which of the last this-many played positions were real packets.
const PLAYED_HISTORY: u64 = 64;

/// Where the first packet's extended sequence number is placed: far from zero, so unwrapping
/// backwards never underflows.
const EXT_SEQ_ORIGIN: u64 = 1 << 32;

/// Parameters of one [`JitterBuffer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JitterConfig {
    /// Frame (packet) duration in ms.
    pub frame_ms: u32,
    /// Lowest target delay in ms.
    pub min_ms: u32,
    /// Highest target delay in ms; also the bound on buffered audio.
    pub max_ms: u32,
}

impl JitterConfig {
    /// A validated configuration: `1 ≤ frame_ms ≤ 120`, `min_ms ≤ max_ms ≤ 10 s`,
    /// `frame_ms ≤ max_ms`.
    pub fn new(frame_ms: u32, min_ms: u32, max_ms: u32) -> Result<Self, MediaError> {
        if !(1..=120).contains(&frame_ms) {
            return Err(MediaError::InvalidConfig(format!(
                "jitter frame_ms {frame_ms} out of 1..=120"
            )));
        }
        if min_ms > max_ms || max_ms < frame_ms || max_ms > 10_000 {
            return Err(MediaError::InvalidConfig(format!(
                "jitter bounds need frame_ms ≤ max_ms ≤ 10000 and min_ms ≤ max_ms, got \
                 frame {frame_ms}, min {min_ms}, max {max_ms}"
            )));
        }
        Ok(Self {
            frame_ms,
            min_ms,
            max_ms,
        })
    }

    /// How many packets the buffer may hold at once.
    pub fn capacity(&self) -> usize {
        self.max_frames() as usize + 1
    }

    fn max_frames(&self) -> u64 {
        u64::from(self.max_ms.div_ceil(self.frame_ms.max(1)))
    }
}

/// What one tick yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Playout {
    /// The next frame's payload.
    Frame(Bytes),
    /// The next frame is lost. `next` is the following packet's payload when it is buffered: decode
    /// it with FEC to recover the lost frame, else conceal.
    Lost {
        /// The packet after the lost one, if already here.
        next: Option<Bytes>,
    },
    /// Nothing to play: not started yet, underrun, idle stream, or the delay is being stretched.
    Empty,
}

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Held for playout.
    Buffered,
    /// Held, after resetting the buffer for a restarted sequence.
    Resynced,
    /// Already held or already played: dropped.
    Duplicate,
    /// Its playout deadline has passed: dropped.
    Late,
    /// Dropped: too far outside the sequence window (a possible restart awaiting confirmation),
    /// or pushed out at once by the capacity bound.
    Dropped,
}

/// Counters since creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets pushed, whatever became of them.
    pub received: u64,
    /// Frames played from a real packet.
    pub played: u64,
    /// Frames whose packet never arrived in time.
    pub lost: u64,
    /// Packets that arrived after their deadline.
    pub late: u64,
    /// Packets seen twice.
    pub duplicate: u64,
    /// Packets dropped to honour the capacity, to shrink the delay, or as out-of-window strays.
    pub discarded: u64,
    /// Times the buffer reset for a restarted sequence.
    pub resyncs: u64,
    /// Times playout ran dry and had to rebuffer.
    pub underruns: u64,
    /// Times playout started again after running dry: after a pause, or a frame or more later
    /// than before after a packet that missed its tick.
    pub restarts: u64,
    /// Ticks that played nothing on purpose to grow the delay.
    pub stretched: u64,
    /// Frames dropped to take back a stretch (or a restart's frame) that was no longer needed.
    pub unstretched: u64,
}

#[derive(Clone, Debug)]
struct Held {
    payload: Bytes,
    arrival: Duration,
    level: Option<AudioLevel>,
}

/// What a tumbling window of ticks saw of the slack (tick time minus arrival) of played frames.
#[derive(Clone, Copy, Debug, Default)]
struct SlackWindow {
    ticks: u32,
    /// Smallest slack of a frame played in the window, ms; `None` if none was played.
    min_slack_ms: Option<f64>,
    /// Packets that arrived after their tick had passed.
    late: u32,
}

impl SlackWindow {
    fn played(&mut self, slack_ms: f64) {
        self.min_slack_ms = Some(self.min_slack_ms.map_or(slack_ms, |m| m.min(slack_ms)));
    }
}

/// The jitter buffer of one stream. See the module docs for the algorithm.
#[derive(Clone, Debug)]
pub struct JitterBuffer {
    cfg: JitterConfig,
    held: BTreeMap<u64, Held>,
    /// Extended sequence number due at the next tick; `None` until playout first starts.
    next: Option<u64>,
    playing: bool,
    /// Highest extended sequence number accepted: the reference for unwrapping.
    highest: Option<u64>,
    /// Bit i set ⇔ position `next - 1 - i` was played from a real packet.
    played_bits: u64,
    jitter_ms: f64,
    target_ms: f64,
    last_transit: Option<(Duration, u32)>,
    window: SlackWindow,
    /// Sequence number of an out-of-window packet that a consecutive one may confirm.
    pending_resync: Option<u16>,
    last_arrival: Option<Duration>,
    last_level: Option<AudioLevel>,
    /// Frames of delay added by stretching, or by the last restart after running dry, and not
    /// taken back yet.
    stretched_frames: u32,
    /// Consecutive windows in which the stretched delay was not needed.
    calm_windows: u32,
    stats: JitterStats,
}

/// The extended sequence number with low 16 bits `seq` closest to `reference`.
fn unwrap_seq(reference: u64, seq: u16) -> u64 {
    let r = i128::from(reference);
    let mut cand = (r & !0xFFFF) | i128::from(seq);
    if cand - r > 32_768 {
        cand -= 65_536;
    } else if r - cand > 32_768 {
        cand += 65_536;
    }
    u64::try_from(cand.max(0)).unwrap_or(u64::MAX)
}

impl JitterBuffer {
    /// An empty buffer.
    pub fn new(cfg: JitterConfig) -> Self {
        Self {
            cfg,
            held: BTreeMap::new(),
            next: None,
            playing: false,
            highest: None,
            played_bits: 0,
            jitter_ms: 0.0,
            target_ms: Self::target_for(&cfg, 0.0),
            last_transit: None,
            window: SlackWindow::default(),
            pending_resync: None,
            last_arrival: None,
            last_level: None,
            stretched_frames: 0,
            calm_windows: 0,
            stats: JitterStats::default(),
        }
    }

    fn target_for(cfg: &JitterConfig, jitter_ms: f64) -> f64 {
        (JITTER_MULTIPLIER * jitter_ms).clamp(f64::from(cfg.min_ms), f64::from(cfg.max_ms))
    }

    /// Applies new delay bounds live, keeping what is buffered and the jitter estimate. Returns
    /// `false`, changing nothing, when the frame differs or the bound shrinks (held packets could
    /// then lie beyond the new capacity): the caller starts a fresh buffer instead.
    pub fn set_bounds(&mut self, cfg: JitterConfig) -> bool {
        if cfg.frame_ms != self.cfg.frame_ms || cfg.max_ms < self.cfg.max_ms {
            return false;
        }
        self.cfg = cfg;
        self.target_ms = Self::target_for(&self.cfg, self.jitter_ms);
        true
    }

    /// The configuration.
    pub fn config(&self) -> JitterConfig {
        self.cfg
    }

    /// Counters since creation.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Current RFC 3550 interarrival jitter estimate.
    pub fn jitter(&self) -> Duration {
        Duration::from_secs_f64(self.jitter_ms.max(0.0) / 1000.0)
    }

    /// Current target delay, within `[min_ms, max_ms]`.
    pub fn target(&self) -> Duration {
        Duration::from_secs_f64(self.target_ms.max(0.0) / 1000.0)
    }

    /// Audio buffered right now: from the next frame due to the newest packet held, holes
    /// included (they will play out as losses).
    pub fn depth(&self) -> Duration {
        let frames = match (self.floor(), self.held.keys().next_back()) {
            (Some(lo), Some(&hi)) if hi >= lo => hi - lo + 1,
            _ => 0,
        };
        Duration::from_millis(frames.saturating_mul(u64::from(self.cfg.frame_ms)))
    }

    /// Packets held right now (bounded by [`JitterConfig::capacity`]).
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no packet is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether playout is running (started and not in underrun).
    pub fn is_playing(&self) -> bool {
        self.playing
    }

    /// Arrival time of the packet whose audio the last tick yielded (the frame itself, or for a
    /// loss the following packet, whose FEC may stand in for it). `None` if it yielded none.
    pub fn last_arrival(&self) -> Option<Duration> {
        self.last_arrival
    }

    /// When the packet due at the next tick arrived, if it is here and playout has started.
    pub fn next_arrival(&self) -> Option<Duration> {
        if !self.playing {
            return None;
        }
        self.held.get(&self.next?).map(|h| h.arrival)
    }

    /// The RFC 6464 level of the packet the next tick would play, if it is here.
    pub fn next_level(&self) -> Option<AudioLevel> {
        self.held.get(&self.next?).and_then(|h| h.level)
    }

    /// The RFC 6464 level the packet of the last tick's frame carried (`None` for a loss, an
    /// empty tick, or a packet without one): the frame's own level, where the level of the
    /// packets *received* since the last tick describes a later frame.
    pub fn last_level(&self) -> Option<AudioLevel> {
        self.last_level
    }

    /// The first position held packets may occupy.
    fn floor(&self) -> Option<u64> {
        self.next.or_else(|| self.held.keys().next().copied())
    }

    fn target_frames(&self) -> u64 {
        let frames = (self.target_ms / f64::from(self.cfg.frame_ms.max(1))).ceil();
        (frames as u64).max(1)
    }

    /// Moves the playout position forward by `count`, recording whether the (single) position
    /// passed was played from a real packet.
    /// Before a tick that runs early because this stream's frame is here (the room waits for
    /// it up to `due`): a frame of delay this buffer added (a stretch, a restart, its start)
    /// and still holds is dropped at once when the packet after the next one is here too with
    /// half the target to spare before `due`. The tick will wait for that stream's packets up
    /// to `due`, so the frame guards against nothing; the windowed rule would keep it for two
    /// seconds or more (measured: talkers of rooms with early ticks held it 1–2.5 s). Returns
    /// whether a frame was dropped.
    pub fn take_back_before_early_tick(&mut self, due: Duration) -> bool {
        let Some(n) = self.next else { return false };
        if !self.playing || self.stretched_frames == 0 || !self.held.contains_key(&n) {
            return false;
        }
        let Some(after) = self.held.get(&(n + 1)) else {
            return false;
        };
        let spare_ms = due.saturating_sub(after.arrival).as_secs_f64() * 1000.0;
        if spare_ms < self.target_ms / 2.0 {
            return false;
        }
        self.held.remove(&n);
        self.stats.discarded += 1;
        self.stats.unstretched += 1;
        self.stretched_frames -= 1;
        self.calm_windows = 0;
        self.advance(1, false);
        true
    }

    fn advance(&mut self, count: u64, played: bool) {
        let Some(n) = self.next else { return };
        self.played_bits = if count >= PLAYED_HISTORY {
            0
        } else {
            self.played_bits << count
        };
        if played {
            self.played_bits |= 1;
        }
        self.next = Some(n.saturating_add(count));
    }

    fn resync(&mut self) {
        self.held.clear();
        self.next = None;
        self.playing = false;
        self.highest = None;
        self.played_bits = 0;
        self.last_transit = None;
        self.window = SlackWindow::default();
        self.pending_resync = None;
        self.stats.resyncs += 1;
    }

    fn update_jitter(&mut self, arrival: Duration, rtp_timestamp: u32) {
        if let Some((prev_arrival, prev_ts)) = self.last_transit {
            let arrival_diff_ms = (arrival.as_secs_f64() - prev_arrival.as_secs_f64()) * 1000.0;
            // Wrapping difference read as signed: timestamps wrap at 2^32.
            let ts_diff_ms = f64::from(rtp_timestamp.wrapping_sub(prev_ts) as i32)
                / f64::from(SAMPLE_RATE / 1000);
            // Cap one sample's contribution so a timestamp jump cannot poison the estimate.
            let d = (arrival_diff_ms - ts_diff_ms)
                .abs()
                .min(2.0 * f64::from(self.cfg.max_ms));
            if d.is_finite() {
                self.jitter_ms += (d - self.jitter_ms) / 16.0;
            }
        }
        self.last_transit = Some((arrival, rtp_timestamp));
        self.target_ms = Self::target_for(&self.cfg, self.jitter_ms);
    }

    /// Drops the oldest positions until the held span fits the capacity.
    fn enforce_capacity(&mut self) {
        let cap = self.cfg.max_frames() + 1;
        let (Some(lo), Some(&hi)) = (self.floor(), self.held.keys().next_back()) else {
            return;
        };
        if hi < lo || hi - lo < cap {
            return;
        }
        let new_floor = hi + 1 - cap;
        let kept = self.held.split_off(&new_floor);
        let removed = std::mem::replace(&mut self.held, kept).len() as u64;
        self.stats.discarded += removed;
        if let Some(n) = self.next {
            let skipped = new_floor.saturating_sub(n);
            self.stats.lost += skipped.saturating_sub(removed);
            self.advance(skipped, false);
        }
    }

    /// Files one packet. Never fails: anything unusable is counted and dropped.
    pub fn push(
        &mut self,
        seq: u16,
        rtp_timestamp: u32,
        payload: Bytes,
        arrival: Duration,
    ) -> PushOutcome {
        self.push_leveled(seq, rtp_timestamp, payload, arrival, None)
    }

    /// [`Self::push`] with the packet's RFC 6464 level, handed back by [`Self::last_level`] on
    /// the tick that plays it.
    pub fn push_leveled(
        &mut self,
        seq: u16,
        rtp_timestamp: u32,
        payload: Bytes,
        arrival: Duration,
        level: Option<AudioLevel>,
    ) -> PushOutcome {
        self.stats.received += 1;
        let mut outcome = PushOutcome::Buffered;
        let ext = match self.highest {
            None => EXT_SEQ_ORIGIN | u64::from(seq),
            Some(highest) => {
                let ext = unwrap_seq(highest, seq);
                let delta = i128::from(ext) - i128::from(highest);
                if delta.abs() > i128::from(RESYNC_DISTANCE) {
                    // One stray packet must not reset a healthy stream; two in a row mean the
                    // sender restarted its sequence.
                    if self.pending_resync == Some(seq.wrapping_sub(1)) {
                        self.resync();
                        outcome = PushOutcome::Resynced;
                        EXT_SEQ_ORIGIN | u64::from(seq)
                    } else {
                        self.pending_resync = Some(seq);
                        self.stats.discarded += 1;
                        return PushOutcome::Dropped;
                    }
                } else {
                    ext
                }
            }
        };
        self.pending_resync = None;

        if self.held.contains_key(&ext) {
            self.stats.duplicate += 1;
            return PushOutcome::Duplicate;
        }
        if let Some(n) = self.next
            && ext < n
        {
            let back = n - ext;
            if back <= PLAYED_HISTORY && self.played_bits & (1 << (back - 1)) != 0 {
                self.stats.duplicate += 1;
                return PushOutcome::Duplicate;
            }
            // A late packet still tells us about network jitter, and that the delay is too short.
            self.update_jitter(arrival, rtp_timestamp);
            self.stats.late += 1;
            self.window.late += 1;
            return PushOutcome::Late;
        }

        self.update_jitter(arrival, rtp_timestamp);
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.held.insert(
            ext,
            Held {
                payload,
                arrival,
                level,
            },
        );
        self.enforce_capacity();
        if self.held.contains_key(&ext) {
            outcome
        } else {
            PushOutcome::Dropped
        }
    }

    /// The playout decision for the tick at `now`. Call once per frame duration.
    pub fn tick(&mut self, now: Duration) -> Playout {
        self.last_arrival = None;
        self.last_level = None;
        let Some((&first, _)) = self.held.first_key_value() else {
            if self.playing {
                // Ran dry: rebuffer before playing again, which also adds delay.
                self.playing = false;
                self.stats.underruns += 1;
            }
            return Playout::Empty;
        };
        let Some(&hi) = self.held.keys().next_back() else {
            return Playout::Empty;
        };

        if !self.playing {
            let earliest = self.held.values().map(|h| h.arrival).min().unwrap_or(now);
            let waited_ms = now.saturating_sub(earliest).as_secs_f64() * 1000.0;
            let after_first_pop = hi - first;
            if waited_ms < self.target_ms && after_first_pop < self.target_frames() {
                return Playout::Empty;
            }
            // A restart after running dry (a packet missed its tick with nothing behind it)
            // adds a frame of delay just as a stretch does, and may be taken back the same way.
            // So may the first start: it comes at the first tick at which the oldest packet has
            // waited the target, a whole frame after the tick before it when the packet came
            // less than the target before that one; and a slack between a frame and the target
            // plus a frame is never shed by the window's rule (measured: talkers of a room held
            // a frame more than they needed from their first packet for seconds). Whether the
            // frame is needed is the take-back rule's to judge.
            self.stretched_frames = 1;
            if self.next.is_some() {
                self.stats.restarts += 1;
            }
            self.calm_windows = 0;
            // (Re)start at the oldest packet held; positions skipped meanwhile are lost.
            if let Some(n) = self.next
                && first > n
            {
                self.stats.lost += first - n;
                self.advance(first - n, false);
            }
            self.next = Some(first);
            self.playing = true;
            self.window = SlackWindow::default();
        }

        let Some(mut n) = self.next else {
            return Playout::Empty;
        };
        self.window.ticks += 1;
        if self.window.ticks >= ADAPT_WINDOW_TICKS {
            let window = std::mem::take(&mut self.window);
            let frame_ms = f64::from(self.cfg.frame_ms);
            if window.late > 0
                || window
                    .min_slack_ms
                    .is_some_and(|s| s < self.target_ms / 2.0)
            {
                // Frames arrived after (or too close to) their tick: hold one tick to add delay.
                self.stats.stretched += 1;
                self.stretched_frames = self.stretched_frames.saturating_add(1);
                self.calm_windows = 0;
                return Playout::Empty;
            }
            let shed = match window.min_slack_ms {
                // Every frame waited whole frames longer than the margin needs: drop them all
                // now. After a stall the buffer holds several; shedding one per window would
                // keep the stall's delay for seconds.
                Some(slack) if slack >= self.target_ms + frame_ms => {
                    self.calm_windows = 0;
                    ((slack - self.target_ms) / frame_ms).floor() as u64
                }
                // A stretch still held: take it back once it has not been needed for long
                // enough (see the module docs).
                Some(slack)
                    if self.stretched_frames > 0 && slack - frame_ms >= self.target_ms * 0.75 =>
                {
                    self.calm_windows += 1;
                    if self.calm_windows >= UNDO_STRETCH_AFTER_WINDOWS {
                        self.calm_windows = 0;
                        self.stats.unstretched += 1;
                        1
                    } else {
                        0
                    }
                }
                _ => {
                    self.calm_windows = 0;
                    0
                }
            };
            self.stretched_frames = self
                .stretched_frames
                .saturating_sub(u32::try_from(shed).unwrap_or(u32::MAX));
            for _ in 0..shed {
                if self.held.remove(&n).is_some() {
                    self.stats.discarded += 1;
                } else {
                    self.stats.lost += 1;
                }
                self.advance(1, false);
                n += 1;
            }
        }

        match self.held.remove(&n) {
            Some(h) => {
                self.advance(1, true);
                self.stats.played += 1;
                self.last_arrival = Some(h.arrival);
                self.last_level = h.level;
                self.window
                    .played(now.saturating_sub(h.arrival).as_secs_f64() * 1000.0);
                Playout::Frame(h.payload)
            }
            None => {
                self.advance(1, false);
                self.stats.lost += 1;
                let next = self.held.get(&(n + 1)).map(|h| {
                    self.last_arrival = Some(h.arrival);
                    h.payload.clone()
                });
                Playout::Lost { next }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const F: u64 = 20;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn buf(min: u32, max: u32) -> JitterBuffer {
        JitterBuffer::new(JitterConfig::new(20, min, max).unwrap())
    }

    fn payload(seq: u16) -> Bytes {
        Bytes::from(seq.to_be_bytes().to_vec())
    }

    fn push(b: &mut JitterBuffer, seq: u16, arrival_ms: u64) -> PushOutcome {
        b.push(
            seq,
            u32::from(seq).wrapping_mul(960),
            payload(seq),
            ms(arrival_ms),
        )
    }

    /// A frame the buffer holds beyond what an early tick's deadline needs is dropped at once
    /// when the packet after the next is here with half the target to spare; with less to spare,
    /// or no such packet, nothing is dropped.
    #[test]
    fn a_frame_an_early_tick_does_not_need_is_taken_back_at_once() {
        // Packets 6 ms (then 9.5 ms) into each 20 ms; the first tick, at 30 ms, finds two, so
        // the buffer starts a frame behind.
        for (offset_us, dropped) in [(6_000u64, true), (9_500, false)] {
            let mut b = buf(2, 200);
            let at = |k: u64| Duration::from_micros(k * 20_000 + offset_us);
            for k in 0..2u16 {
                b.push(k, u32::from(k) * 960, payload(k), at(u64::from(k)));
            }
            assert_eq!(b.tick(ms(30)), Playout::Frame(payload(0)));
            b.push(2, 2 * 960, payload(2), at(2));
            assert_eq!(
                b.take_back_before_early_tick(ms(50)),
                dropped,
                "offset {offset_us} µs"
            );
            let expect = if dropped { payload(2) } else { payload(1) };
            assert_eq!(
                b.tick(ms(50)),
                Playout::Frame(expect),
                "offset {offset_us} µs"
            );
            assert_eq!(b.stats().unstretched, u64::from(dropped));
            // Nothing held beyond one frame is dropped twice.
            assert!(!b.take_back_before_early_tick(ms(70)));
        }
    }

    /// Plays ticks at `t` until the first non-Empty playout (at most 50 ticks).
    fn first_playout(b: &mut JitterBuffer, mut t: u64) -> (Playout, u64) {
        for _ in 0..50 {
            let p = b.tick(ms(t));
            if p != Playout::Empty {
                return (p, t);
            }
            t += F;
        }
        panic!("never started");
    }

    #[test]
    fn config_is_validated() {
        assert!(JitterConfig::new(0, 0, 100).is_err());
        assert!(JitterConfig::new(20, 100, 40).is_err());
        assert!(JitterConfig::new(20, 0, 10).is_err());
        assert!(JitterConfig::new(20, 0, 20_000).is_err());
        assert_eq!(JitterConfig::new(20, 40, 200).unwrap().capacity(), 11);
    }

    #[test]
    fn in_order_stream_plays_in_order_after_the_target_delay() {
        let mut b = buf(40, 200);
        let mut out = Vec::new();
        for i in 0..100u16 {
            let t = u64::from(i) * F;
            assert_eq!(push(&mut b, i, t), PushOutcome::Buffered);
            if let Playout::Frame(p) = b.tick(ms(t)) {
                assert_eq!(b.last_arrival().unwrap() + ms(40), ms(t));
                out.push(p);
            }
        }
        assert_eq!(out.len(), 98, "two ticks of startup delay");
        for (i, p) in out.iter().enumerate() {
            assert_eq!(p, &payload(i as u16));
        }
        assert_eq!(b.depth(), ms(40));
        assert_eq!(b.stats().played, 98);
        assert_eq!(b.stats().lost, 0);
        assert!(b.is_playing());
        assert_eq!(b.target(), ms(40));
    }

    #[test]
    fn reordered_packets_play_in_sequence() {
        let mut b = buf(40, 200);
        let order = [0u16, 2, 1, 3, 5, 4, 6, 7, 9, 8, 10, 11, 12];
        let mut out = Vec::new();
        for (k, &seq) in order.iter().enumerate() {
            let t = k as u64 * F;
            push(&mut b, seq, t);
            if let Playout::Frame(p) = b.tick(ms(t)) {
                out.push(p);
            }
        }
        let expected: Vec<Bytes> = (0..out.len() as u16).map(payload).collect();
        assert_eq!(out, expected);
        assert_eq!(b.stats().late, 0);
        assert_eq!(b.stats().lost, 0);
    }

    #[test]
    fn lost_packet_is_declared_with_next_payload_for_fec() {
        let mut b = buf(40, 200);
        let mut plays = Vec::new();
        for i in 0..12u16 {
            let t = u64::from(i) * F;
            if i != 5 {
                push(&mut b, i, t);
            }
            plays.push(b.tick(ms(t)));
        }
        let played: Vec<Playout> = plays.into_iter().filter(|p| *p != Playout::Empty).collect();
        assert_eq!(played[4], Playout::Frame(payload(4)));
        assert_eq!(
            played[5],
            Playout::Lost {
                next: Some(payload(6))
            }
        );
        // The last tick played packet 9, which arrived at 9·F.
        assert_eq!(b.last_arrival(), Some(ms(9 * F)));
        assert_eq!(played[6], Playout::Frame(payload(6)));
        assert_eq!(b.stats().lost, 1);
        // The lost packet finally turns up: too late.
        assert_eq!(push(&mut b, 5, 12 * F), PushOutcome::Late);
        assert_eq!(b.stats().late, 1);
    }

    #[test]
    fn burst_loss_declares_without_fec_source() {
        let mut b = buf(40, 200);
        for i in 0..3u16 {
            push(&mut b, i, u64::from(i) * F);
        }
        push(&mut b, 6, 3 * F);
        let (p, t) = first_playout(&mut b, 3 * F);
        assert_eq!(p, Playout::Frame(payload(0)));
        assert_eq!(b.tick(ms(t + F)), Playout::Frame(payload(1)));
        assert_eq!(b.tick(ms(t + 2 * F)), Playout::Frame(payload(2)));
        assert_eq!(b.tick(ms(t + 3 * F)), Playout::Lost { next: None });
        assert_eq!(b.last_arrival(), None);
        assert_eq!(b.tick(ms(t + 4 * F)), Playout::Lost { next: None });
        assert_eq!(
            b.tick(ms(t + 5 * F)),
            Playout::Lost {
                next: Some(payload(6))
            }
        );
        assert_eq!(b.last_arrival(), Some(ms(3 * F)));
        assert_eq!(b.tick(ms(t + 6 * F)), Playout::Frame(payload(6)));
    }

    #[test]
    fn duplicates_are_dropped_whether_held_or_played() {
        let mut b = buf(40, 200);
        push(&mut b, 0, 0);
        assert_eq!(push(&mut b, 0, 1), PushOutcome::Duplicate);
        push(&mut b, 1, F);
        push(&mut b, 2, 2 * F);
        let (p, _) = first_playout(&mut b, 2 * F);
        assert_eq!(p, Playout::Frame(payload(0)));
        assert_eq!(push(&mut b, 0, 3 * F), PushOutcome::Duplicate);
        assert_eq!(b.stats().duplicate, 2);
        assert_eq!(b.stats().late, 0);
        assert_eq!(b.stats().received, 5);
    }

    #[test]
    fn sequence_wraps_at_65535() {
        let mut b = buf(40, 200);
        let seqs: Vec<u16> = (0..12u16).map(|i| 65_530u16.wrapping_add(i)).collect();
        let mut out = Vec::new();
        for (k, &s) in seqs.iter().enumerate() {
            let t = k as u64 * F;
            assert_eq!(push(&mut b, s, t), PushOutcome::Buffered);
            if let Playout::Frame(p) = b.tick(ms(t)) {
                out.push(p);
            }
        }
        let expected: Vec<Bytes> = seqs[..out.len()].iter().map(|&s| payload(s)).collect();
        assert_eq!(out, expected);
        assert!(out.contains(&payload(65_535)) && out.contains(&payload(0)));
        assert_eq!(b.stats().lost + b.stats().late, 0);
        // A reordered packet across the wrap is still in order.
        let mut b = buf(40, 200);
        push(&mut b, 65_534, 0);
        push(&mut b, 0, F);
        push(&mut b, 65_535, F + 1);
        let (p, t) = first_playout(&mut b, 2 * F);
        assert_eq!(p, Playout::Frame(payload(65_534)));
        assert_eq!(b.tick(ms(t + F)), Playout::Frame(payload(65_535)));
        assert_eq!(b.tick(ms(t + 2 * F)), Playout::Frame(payload(0)));
    }

    #[test]
    fn big_jump_resyncs_after_confirmation_and_strays_are_ignored() {
        let mut b = buf(40, 200);
        for i in 0..10u16 {
            push(&mut b, i, u64::from(i) * F);
            b.tick(ms(u64::from(i) * F));
        }
        // One stray far away: dropped, stream unaffected.
        assert_eq!(push(&mut b, 30_000, 10 * F), PushOutcome::Dropped);
        assert_eq!(push(&mut b, 10, 10 * F), PushOutcome::Buffered);
        assert_eq!(b.stats().resyncs, 0);
        // The sender restarts at 20_000: the second consecutive packet resyncs.
        assert_eq!(push(&mut b, 20_000, 11 * F), PushOutcome::Dropped);
        assert_eq!(push(&mut b, 20_001, 12 * F), PushOutcome::Resynced);
        assert_eq!(b.stats().resyncs, 1);
        push(&mut b, 20_002, 13 * F);
        push(&mut b, 20_003, 14 * F);
        let (p, _) = first_playout(&mut b, 14 * F);
        assert_eq!(p, Playout::Frame(payload(20_001)));
    }

    #[test]
    fn underrun_rebuffers_and_idle_stream_is_empty() {
        let mut b = buf(40, 200);
        for i in 0..10u16 {
            push(&mut b, i, u64::from(i) * F);
            b.tick(ms(u64::from(i) * F));
        }
        // Sender stops: the buffer drains, then stays Empty.
        let mut t = 10 * F;
        let mut frames = 0;
        for _ in 0..10 {
            if let Playout::Frame(_) = b.tick(ms(t)) {
                frames += 1;
            }
            t += F;
        }
        assert_eq!(frames, 2);
        assert_eq!(b.stats().underruns, 1);
        assert!(!b.is_playing());
        assert_eq!(b.depth(), Duration::ZERO);
        // It resumes with the next sequence number: nothing is counted lost or late.
        push(&mut b, 10, t);
        assert_eq!(b.tick(ms(t)), Playout::Empty, "rebuffering");
        push(&mut b, 11, t + F);
        push(&mut b, 12, t + 2 * F);
        let (p, _) = first_playout(&mut b, t + F);
        assert_eq!(p, Playout::Frame(payload(10)));
        assert_eq!(b.stats().lost, 0);
        assert_eq!(b.stats().late, 0);
    }

    /// Slack (tick time minus arrival) of the frame played at `now`.
    fn slack(b: &JitterBuffer, now: u64) -> Duration {
        ms(now).saturating_sub(b.last_arrival().expect("a frame was played"))
    }

    #[test]
    fn steady_stream_waits_the_margin_and_less_than_a_frame_more_whatever_the_phase() {
        // Margin 4 ms: a steady stream must settle with slack in [T/2, T + frame), i.e. never a
        // whole frame of needless delay, and never so close to the tick that jitter makes it late.
        for phase in [0u64, 1, 3, 5, 10, 15, 17, 19] {
            let mut b = buf(4, 200);
            // A burst first: ten packets stuck behind a 200 ms stall arrive at once, so playout
            // starts with far too much slack and must shed it.
            for i in 0..10u16 {
                push(&mut b, i, 200 + phase);
            }
            let mut last = Duration::ZERO;
            for tick in 11..400u64 {
                let now = tick * F;
                if tick >= 11 {
                    push(&mut b, tick as u16 - 1, (tick - 1) * F + phase);
                }
                if let Playout::Frame(_) = b.tick(ms(now)) {
                    last = slack(&b, now);
                }
            }
            assert!(
                last >= ms(2) && last < ms(4 + F),
                "phase {phase}: settled with slack {last:?}, stats {:?}",
                b.stats()
            );
            assert_eq!(b.stats().late, 0, "phase {phase}");
            assert!(b.stats().discarded > 0, "phase {phase}: burst never shed");
        }
    }

    #[test]
    fn a_stall_is_shed_within_two_windows() {
        // A 200 ms stall delivers ten packets at once; then the stream is steady again. Once the
        // stalled ten are played, every frame waits ten frames too long: the buffer must shed
        // them all at its next adaptation, not one per window.
        let mut b = buf(4, 300);
        for i in 0..10u16 {
            push(&mut b, i, 200);
        }
        let mut last_too_late = 0;
        for tick in 11..300u64 {
            let now = tick * F;
            push(&mut b, tick as u16 - 1, (tick - 1) * F + 3);
            if let Playout::Frame(_) = b.tick(ms(now))
                && slack(&b, now) >= ms(4 + F)
            {
                last_too_late = tick;
            }
        }
        assert!(
            last_too_late <= 21 + 2 * u64::from(ADAPT_WINDOW_TICKS),
            "a frame too late still at tick {last_too_late}: {:?}",
            b.stats()
        );
        assert_eq!(b.stats().late, 0);
    }

    /// The talker who sets a room's aligned tick plays with slack just above the smallest
    /// target (here 2 ms target, 2.3 ms slack, 0-0.4 ms of jitter). One packet that misses its
    /// tick (the buffer runs dry and restarts a frame later), or comes so close to it that the
    /// buffer stretches, costs a frame of delay; two seconds without need take that frame back,
    /// so the talker is not left a whole frame late for as long as it talks.
    #[test]
    fn one_late_packet_costs_a_frame_for_seconds_not_for_good() {
        // (the hiccup's arrival after its tick in µs, negative: before it)
        for hiccup_after_tick_us in [3_000i64, -500] {
            let mut b = buf(2, 200);
            let jitter = delays(2000, 5, 7);
            let hiccup = 300u64;
            let mut slacks = Vec::new();
            let mut pending = None;
            for tick in 1..1000u64 {
                let now_us = tick * F * 1000;
                if let Some((seq, at)) = pending.take() {
                    b.push(
                        seq as u16,
                        (seq as u32).wrapping_mul(960),
                        payload(seq as u16),
                        at,
                    );
                }
                // Packet `seq` is due at this tick; it arrives 2.3 ms before, minus jitter.
                let seq = tick - 1;
                let at_us = if seq == hiccup {
                    now_us.saturating_add_signed(hiccup_after_tick_us)
                } else {
                    now_us - 2_300 + jitter[seq as usize] * 100
                };
                let at = Duration::from_micros(at_us);
                if at_us <= now_us {
                    b.push(
                        seq as u16,
                        (seq as u32).wrapping_mul(960),
                        payload(seq as u16),
                        at,
                    );
                } else {
                    pending = Some((seq, at));
                }
                if let Playout::Frame(_) = b.tick(Duration::from_micros(now_us)) {
                    slacks.push((tick, slack(&b, tick * F)));
                }
            }
            let s = b.stats();
            assert_eq!(s.stretched + s.restarts, 1, "one frame added: {s:?}");
            assert_eq!(s.unstretched, 1, "and taken back once: {s:?}");
            let undo_by = hiccup + u64::from(ADAPT_WINDOW_TICKS * (UNDO_STRETCH_AFTER_WINDOWS + 2));
            for (tick, slack) in &slacks {
                if *tick > undo_by || *tick < hiccup {
                    assert!(
                        *slack >= Duration::from_micros(1_500) && *slack < ms(3),
                        "hiccup {hiccup_after_tick_us} µs: tick {tick}: slack {slack:?} \
                         (a frame still held), {s:?}"
                    );
                }
            }
            assert!(
                slacks.iter().any(|(_, slack)| *slack > ms(F)),
                "the added frame never showed"
            );
        }
    }

    /// A talker whose packets come too close to the tick in every window keeps its stretch: the
    /// buffer does not drop and re-add a frame over and over.
    #[test]
    fn a_stretch_that_is_still_needed_is_kept() {
        let mut b = buf(2, 200);
        for tick in 1..1000u64 {
            let now = tick * F;
            let seq = tick - 1;
            // 2.3 ms before the tick, but every 10th packet only 0.3 ms before it.
            let early_us = if seq % 10 == 5 { 300 } else { 2_300 };
            b.push(
                seq as u16,
                (seq as u32).wrapping_mul(960),
                payload(seq as u16),
                Duration::from_micros((seq + 1) * F * 1000 - early_us),
            );
            b.tick(ms(now));
        }
        let s = b.stats();
        assert_eq!(s.stretched, 1, "{s:?}");
        assert_eq!(s.unstretched, 0, "{s:?}");
        assert_eq!(s.late, 0, "{s:?}");
    }

    #[test]
    fn late_packets_add_delay_until_none_are_late() {
        // Every 10th packet is 25 ms late. At first that runs the buffer dry or makes the packet
        // miss its tick; the delay must grow until every packet makes it.
        let mut b = buf(0, 200);
        let mut arrivals: Vec<(u64, u16)> = (0..600u64)
            .map(|i| (i * F + if i % 10 == 5 { 25 } else { 0 }, i as u16))
            .collect();
        arrivals.sort();
        let mut next_arrival = 0;
        let misses = |b: &JitterBuffer| b.stats().late + b.stats().underruns + b.stats().lost;
        let mut misses_after_settling = 0;
        for tick in 0..600u64 {
            let now = tick * F + 10;
            while next_arrival < arrivals.len() && arrivals[next_arrival].0 <= now {
                let (at, seq) = arrivals[next_arrival];
                push(&mut b, seq, at);
                next_arrival += 1;
            }
            if tick == 300 {
                misses_after_settling = misses(&b);
            }
            b.tick(ms(now));
        }
        assert!(
            misses_after_settling > 0,
            "the test never made a packet miss"
        );
        assert_eq!(
            misses(&b),
            misses_after_settling,
            "still missing ticks after settling: {:?}",
            b.stats()
        );
    }

    /// Deterministic pseudo-random delays in [0, max) ms.
    fn delays(n: usize, max: u64, mut seed: u64) -> Vec<u64> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (seed >> 33) % max.max(1)
            })
            .collect()
    }

    #[test]
    fn target_grows_under_jitter_and_shrinks_back_with_bounded_depth() {
        let (min, max) = (40u32, 200u32);
        let mut b = buf(min, max);
        // Phase 1: 2 s steady; phase 2: 6 s with 0-80 ms random delay; phase 3: 10 s steady.
        let phase1 = 100usize;
        let phase2 = 300usize;
        let total = 1000usize;
        let jitter = delays(total, 80, 42);
        let mut arrivals: Vec<(u64, u16)> = (0..total)
            .map(|i| {
                let d = if (phase1..phase1 + phase2).contains(&i) {
                    jitter[i]
                } else {
                    0
                };
                (i as u64 * F + d, i as u16)
            })
            .collect();
        arrivals.sort();
        let mut next_arrival = 0;
        let mut target_steady = Duration::ZERO;
        let mut target_peak = Duration::ZERO;
        let mut depth_at_jitter_end = Duration::ZERO;
        let mut depth_at_end = Duration::ZERO;
        let mut frames = 0;
        for tick in 0..total as u64 + 20 {
            let now = tick * F + 5;
            while next_arrival < arrivals.len() && arrivals[next_arrival].0 <= now {
                let (at, seq) = arrivals[next_arrival];
                push(&mut b, seq, at);
                next_arrival += 1;
            }
            if let Playout::Frame(_) = b.tick(ms(now)) {
                frames += 1;
            }
            // Bounds hold at every tick.
            assert!(b.target() >= ms(u64::from(min)) && b.target() <= ms(u64::from(max)));
            assert!(b.depth() <= ms(u64::from(max)), "depth {:?}", b.depth());
            assert!(b.len() <= b.config().capacity());
            if tick == phase1 as u64 {
                target_steady = b.target();
            }
            if (phase1 as u64..(phase1 + phase2) as u64).contains(&tick) {
                target_peak = target_peak.max(b.target());
            }
            if tick == (phase1 + phase2) as u64 {
                depth_at_jitter_end = b.depth();
            }
            if tick == total as u64 - 1 {
                depth_at_end = b.depth();
            }
        }
        assert_eq!(target_steady, ms(u64::from(min)));
        assert!(
            target_peak >= target_steady + ms(40),
            "target did not grow: {target_peak:?}"
        );
        assert!(
            depth_at_jitter_end > ms(u64::from(min)),
            "depth did not follow: {depth_at_jitter_end:?}"
        );
        // Back to steady: the target returns to the minimum and the extra depth is shed.
        assert_eq!(b.target(), ms(u64::from(min)));
        assert!(
            depth_at_end >= ms(u64::from(min)) && depth_at_end <= ms(u64::from(min) + F),
            "depth not back to target: {depth_at_end:?}"
        );
        let s = b.stats();
        assert!(s.discarded > 0, "delay was never shrunk: {s:?}");
        assert!(frames > 900, "{s:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_traffic_never_panics_and_stays_bounded(
            ops in proptest::collection::vec(
                (any::<bool>(), any::<u16>(), any::<u32>(), 0u64..200_000, 0u8..4),
                0..400,
            ),
            frame_ms in prop_oneof![Just(10u32), Just(20u32)],
            min_ms in 0u32..100,
            extra in 0u32..200,
        ) {
            let cfg = JitterConfig::new(frame_ms, min_ms, (min_ms + extra).max(frame_ms)).unwrap();
            let mut b = JitterBuffer::new(cfg);
            let mut now = 0u64;
            let mut pushes = 0u64;
            for (is_push, seq, ts, t, step) in ops {
                if is_push {
                    // Arrival times may go backwards and jump around.
                    b.push(seq, ts, Bytes::from_static(b"x"), Duration::from_millis(t));
                    pushes += 1;
                } else {
                    now += u64::from(step) * u64::from(frame_ms);
                    let _ = b.tick(Duration::from_millis(now));
                }
                prop_assert!(b.len() <= cfg.capacity());
                prop_assert!(b.depth() <= Duration::from_millis(u64::from(cfg.max_frames() as u32 * frame_ms + frame_ms)));
                prop_assert!(b.target() >= Duration::from_millis(u64::from(cfg.min_ms)));
                prop_assert!(b.target() <= Duration::from_millis(u64::from(cfg.max_ms)));
            }
            prop_assert_eq!(b.stats().received, pushes);
        }

        #[test]
        fn sequential_stream_with_random_order_plays_each_seq_at_most_once_in_order(
            start in any::<u16>(),
            swaps in proptest::collection::vec((0usize..200, 0usize..200), 0..40),
            drops in proptest::collection::vec(0usize..200, 0..20),
        ) {
            let mut order: Vec<u16> = (0..200u16).map(|i| start.wrapping_add(i)).collect();
            for (a, c) in swaps {
                // Local reordering only (at most 3 apart), like a real network.
                let c = a + (c % 4);
                if c < order.len() { order.swap(a, c); }
            }
            let mut b = JitterBuffer::new(JitterConfig::new(20, 40, 200).unwrap());
            let mut seen: Vec<u16> = Vec::new();
            for (k, &s) in order.iter().enumerate() {
                let t = k as u64 * 20;
                if !drops.contains(&k) {
                    b.push(s, u32::from(s) * 960, Bytes::from(s.to_be_bytes().to_vec()), Duration::from_millis(t));
                }
                if let Playout::Frame(p) = b.tick(Duration::from_millis(t)) {
                    seen.push(u16::from_be_bytes([p[0], p[1]]));
                }
            }
            // Strictly increasing in unwrapped order: never twice, never backwards.
            for w in seen.windows(2) {
                let d = w[1].wrapping_sub(w[0]);
                prop_assert!((1..1000).contains(&d), "{:?}", w);
            }
        }
    }
}
