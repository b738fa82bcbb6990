//! Where a room's mixing tick sits within the frame (DESIGN.md §13, "Align the tick").
//!
//! A tick on a fixed phase makes each frame wait for the next tick after it arrives: anywhere
//! from nothing to a whole frame, half a frame on average. But the talkers a room mixes each send
//! on their own packetisation clock, so their frames arrive at a few stable phases of the frame.
//! The [`TickClock`] moves the room's tick, by at most `max_step` per frame, to sit `margin` after
//! the latest arrival phase before the largest gap between those phases (a stream whose jitter
//! buffer needs more than `margin` gets its own, [`TickClock::observe_with_margin`]): the frames
//! of the cluster wait about as little as the margin allows, and only a talker alone on the far
//! side of the largest gap waits longer. With one talker, its frames wait the margin.
//!
//! Each mixed stream's phase is its *late edge*: about the 90th percentile of the phases of its
//! last [`WINDOW`] frames (taken around the newest one, so jitter widens it only on the late
//! side), so a jittery talker is mostly covered by its own spread. A stream that stops carrying frames for
//! [`WINDOW`] ticks no longer counts. With nothing mixed the tick holds still.
//!
//! Pure: time comes in as [`Duration`]s since the room's epoch, so the clock is tested in virtual
//! time with jittery, drifting and disappearing talkers. Written here because it is one small
//! policy over the room's own grid; no crate schedules a mixer.
//!
//! Invariants (for a tick run at its deadline, [`TickClock::next_tick`], or early, anywhere from
//! [`TickClock::earliest_tick`] on):
//! - tick `n` happens at `n·frame + offset_n` with `-frame ≤ offset_n < frame`: the tick never
//!   drifts a frame from the fixed grid, so after `n` frames of real time the room has ticked
//!   `n` times, give or take one. A talker whose clock drifts is followed up to that bound; then
//!   the tick goes back round the other way (at 100 ppm of drift, once every few minutes);
//! - consecutive deadlines differ from a frame by at most `max_step` (below half a frame), and a
//!   tick runs at most a quarter of a frame early, so ticks come `frame ± (max_step + frame/4)`
//!   apart: never two in one frame's time, and the jitter buffers see slack change smoothly and
//!   adapt without dropping or stretching.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::StreamId;

/// Frames of a stream's arrival phases kept for its late edge: half a second at 20 ms.
pub const WINDOW: usize = 25;

/// Which of a window's latest phases is the late edge (0 = the very latest). The third latest
/// of 25 is about the 90th percentile: one packet a scheduler held back does not drag the room's
/// tick (and every talker's wait) later for half a second; the rare frame later than the edge
/// eats into the margin, and one later still is the jitter buffer's to absorb, as any late
/// frame is.
const EDGE_RANK: usize = 2;

/// How much larger another talker's gap must be before the tick stops following the one it
/// follows (µs; see [`TickClock::target_offset`]). About the wobble of a late edge on a loaded
/// machine; a room whose best gap is within this of the followed one waits at most this much
/// longer than it could.
const SWITCH_GAP_US: i64 = 1_500;

/// The default largest move of the tick per frame.
pub const DEFAULT_MAX_STEP: Duration = Duration::from_millis(1);

/// Moves a room's tick towards its talkers' arrivals (see the module doc).
#[derive(Debug, Clone)]
pub struct TickClock {
    frame_us: i64,
    margin_us: i64,
    max_step_us: i64,
    /// The index of the next tick on the grid.
    next: u64,
    /// The next tick's offset from the grid, in `[-frame, frame)`.
    offset_us: i64,
    streams: BTreeMap<StreamId, Arrivals>,
    /// The stream whose ready phase the tick follows (the one before the largest gap).
    lead: Option<StreamId>,
}

/// One stream's recent arrival phases, newest last, with the tick index each came in.
#[derive(Debug, Clone, Default)]
struct Arrivals {
    phases: VecDeque<i64>,
    last_tick: u64,
    /// The margin this stream asks for beyond the clock's own (its jitter buffer's target), µs.
    margin_us: i64,
}

impl TickClock {
    /// A clock for `frame` ticks that keeps `margin` between the talkers' late edge and the tick
    /// and moves by at most `max_step` per frame (clamped to below half a frame). The first tick
    /// is at 0.
    pub fn new(frame: Duration, margin: Duration, max_step: Duration) -> Self {
        let frame_us = micros(frame).max(2);
        Self {
            frame_us,
            margin_us: micros(margin).clamp(0, frame_us - 1),
            max_step_us: micros(max_step).clamp(0, frame_us / 2 - 1),
            next: 0,
            offset_us: 0,
            streams: BTreeMap::new(),
            lead: None,
        }
    }

    /// From now on, keep `margin` after the talkers and move by at most `max_step` per frame
    /// (zero: the tick stays where it is), both clamped as in [`TickClock::new`].
    pub fn retune(&mut self, margin: Duration, max_step: Duration) {
        self.margin_us = micros(margin).clamp(0, self.frame_us - 1);
        self.max_step_us = micros(max_step).clamp(0, self.frame_us / 2 - 1);
    }

    /// When the next tick is due, since the epoch.
    pub fn next_tick(&self) -> Duration {
        let at = i128::from(self.next) * i128::from(self.frame_us) + i128::from(self.offset_us);
        Duration::from_micros(u64::try_from(at.max(0)).unwrap_or(u64::MAX))
    }

    /// How long before the next tick is due it may run, if the talkers it waits for are all
    /// here: the margin the tick keeps after the late edge of the talker it follows, plus how
    /// far that edge sits after the talker's median arrival (so an early tick runs no earlier
    /// than the talker's typical packet), at most a quarter of a frame. The margin and the edge
    /// are there for the packet that comes late; the tick need not wait them out for one that
    /// came on time. Zero for a fixed tick (no step) and before any talker is followed: consecutive
    /// ticks then stay at least `frame - max_step - frame/4` apart, never two in one frame.
    pub fn early_window(&self) -> Duration {
        if self.max_step_us == 0 {
            return Duration::ZERO;
        }
        let Some(lead) = self.lead.and_then(|id| self.streams.get(&id)) else {
            return Duration::ZERO;
        };
        let spread = self
            .late_edge(lead)
            .map_or(0, |(_, edge, median)| (edge - median).max(0));
        let window = (lead.margin_us.max(self.margin_us) + spread).clamp(0, self.frame_us / 4);
        Duration::from_micros(u64::try_from(window).unwrap_or(0))
    }

    /// The earliest the next tick may run once the talkers it waits for are all here: its
    /// [`early_window`](Self::early_window) before it is due, but never more than a frame before
    /// its place on the grid, so an early tick keeps the grid invariant (module doc).
    pub fn earliest_tick(&self) -> Duration {
        let grid_floor = (i128::from(self.next) - 1) * i128::from(self.frame_us);
        let floor = Duration::from_micros(u64::try_from(grid_floor.max(0)).unwrap_or(u64::MAX));
        self.next_tick()
            .saturating_sub(self.early_window())
            .max(floor)
    }

    /// The next tick's offset from the fixed grid, in microseconds (for metrics).
    pub fn offset_micros(&self) -> i64 {
        self.offset_us
    }

    /// The tick that is due now played a frame of `stream` that arrived at `arrival`.
    pub fn observe(&mut self, stream: StreamId, arrival: Duration) {
        self.observe_with_margin(stream, arrival, Duration::ZERO);
    }

    /// [`Self::observe`], for a stream whose frames need `margin` after its late edge if that is
    /// more than the clock's own margin (its jitter buffer's target, plus the timer's slack).
    /// Without it a talker with more jitter than the clock's margin allows comes too close to
    /// the tick now and then, and its jitter buffer adds a whole frame where a few
    /// milliseconds would do.
    pub fn observe_with_margin(&mut self, stream: StreamId, arrival: Duration, margin: Duration) {
        let phase = micros(arrival).rem_euclid(self.frame_us);
        let tick = self.next;
        let a = self.streams.entry(stream).or_default();
        a.phases.push_back(phase);
        while a.phases.len() > WINDOW {
            a.phases.pop_front();
        }
        a.last_tick = tick;
        a.margin_us = micros(margin);
    }

    /// The due tick has run: forget streams silent for a window, move the offset one step
    /// towards the target, and return when the next tick is due.
    pub fn advance(&mut self) -> Duration {
        let now = self.next;
        self.streams
            .retain(|_, a| now.saturating_sub(a.last_tick) < WINDOW as u64);
        if let Some(target) = self.target_offset() {
            // The target's nearest position to where the tick is (so a talker whose phase
            // wobbles across the frame's edge is followed across it), unless that is a frame or
            // more off the grid: then the one a frame the other way, and the tick goes back round.
            let f = self.frame_us;
            let mut goal = self.offset_us + self.wrap_half(target - self.offset_us);
            if goal >= f {
                goal -= f;
            } else if goal < -f {
                goal += f;
            }
            let step = (goal - self.offset_us).clamp(-self.max_step_us, self.max_step_us);
            self.offset_us += step;
        }
        self.next += 1;
        self.next_tick()
    }

    /// `x` moved by whole frames into `[-frame/2, frame/2)`.
    fn wrap_half(&self, x: i64) -> i64 {
        let f = self.frame_us;
        (x + f / 2).rem_euclid(f) - f / 2
    }

    /// When each stream is ready, as a phase in `[0, frame)`: its late edge (the
    /// [`EDGE_RANK`]-th latest of its window's phases, taken around the newest one) plus its
    /// margin (the clock's, or the stream's own if larger; whole frames of it are the jitter
    /// buffer's to hold, so only the rest moves the tick).
    fn ready_phases(&self) -> Vec<(i64, StreamId)> {
        let f = self.frame_us;
        self.streams
            .iter()
            .filter_map(|(&id, a)| {
                let (newest, edge, _) = self.late_edge(a)?;
                let margin = a.margin_us.max(self.margin_us);
                Some(((newest + edge + margin).rem_euclid(f), id))
            })
            .collect()
    }

    /// A stream's newest phase, and its late edge and median phase relative to it (both in
    /// `[-frame/2, frame/2)` around the newest); `None` before its first frame.
    fn late_edge(&self, a: &Arrivals) -> Option<(i64, i64, i64)> {
        let newest = *a.phases.back()?;
        let mut around: Vec<i64> = a
            .phases
            .iter()
            .map(|p| self.wrap_half(p - newest))
            .collect();
        around.sort_unstable_by(|x, y| y.cmp(x));
        let edge = around[EDGE_RANK.min(around.len() - 1)];
        let median = around[around.len() / 2];
        Some((newest, edge, median))
    }

    /// Where the tick should sit: at the ready phase that the largest gap between ready phases
    /// follows, as an offset in `[-frame/2, frame/2)`; `None` with nothing observed. The stream
    /// the tick follows keeps it unless another's gap is larger by [`SWITCH_GAP_US`]: two gaps
    /// of about the same size otherwise trade places with every wobble of the late edges, and
    /// each time the tick walks across the talkers between them (measured in 10 ms rooms:
    /// 3–5 ms walks every few hundred milliseconds, and the talkers it walked back across
    /// missed their pull).
    fn target_offset(&mut self) -> Option<i64> {
        let mut edges = self.ready_phases();
        edges.sort_unstable();
        let f = self.frame_us;
        let &(last, last_id) = edges.last()?;
        // The gap after edge i runs to edge i+1 (the first edge, one frame on, after the last).
        let mut best = (f + edges[0].0 - last, last, last_id);
        let mut lead = (self.lead == Some(last_id)).then_some(best);
        for pair in edges.windows(2) {
            let gap = (pair[1].0 - pair[0].0, pair[0].0, pair[0].1);
            if gap.0 > best.0 {
                best = gap;
            }
            if self.lead == Some(pair[0].1) {
                lead = Some(gap);
            }
        }
        let chosen = match lead {
            Some(lead) if lead.0 + SWITCH_GAP_US >= best.0 => lead,
            _ => best,
        };
        self.lead = Some(chosen.2);
        Some(self.wrap_half(chosen.1))
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const F: u64 = 20_000;

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    fn clock() -> TickClock {
        TickClock::new(us(F), us(3_000), DEFAULT_MAX_STEP)
    }

    /// A talker whose frame `k` arrives at `k·period + phase + jitter(k)`.
    struct Talker {
        id: StreamId,
        phase: u64,
        period: u64,
        jitter: Box<dyn Fn(u64) -> u64>,
    }

    impl Talker {
        fn steady(id: u64, phase_ms: u64) -> Self {
            Self {
                id: StreamId(id),
                phase: phase_ms * 1000,
                period: F,
                jitter: Box::new(|_| 0),
            }
        }

        /// 0–4 ms of pseudo-random jitter on top of `phase_ms`.
        fn jittery(id: u64, phase_ms: u64) -> Self {
            Self {
                jitter: Box::new(|k| k * 2_654_435_761 % 4_001),
                ..Self::steady(id, phase_ms)
            }
        }

        fn arrival(&self, k: u64) -> u64 {
            k * self.period + self.phase + (self.jitter)(k)
        }
    }

    /// Runs `ticks` ticks. Each tick plays, per talker, the newest frame that arrived since the
    /// last tick (a jitter buffer with no margin of its own that drops what it cannot play), and
    /// the clock observes it. Returns per tick its time and the slack (tick − arrival, µs) of
    /// each frame played.
    fn run(c: &mut TickClock, talkers: &[Talker], ticks: usize) -> Vec<(u64, Vec<u64>)> {
        let mut played = vec![0u64; talkers.len()];
        let mut out = Vec::new();
        for _ in 0..ticks {
            let at = c.next_tick().as_micros() as u64;
            let mut slacks = Vec::new();
            for (t, next) in talkers.iter().zip(played.iter_mut()) {
                let mut newest = None;
                while t.arrival(*next) <= at {
                    newest = Some(t.arrival(*next));
                    *next += 1;
                }
                if let Some(arrival) = newest {
                    c.observe(t.id, us(arrival));
                    slacks.push(at - arrival);
                }
            }
            out.push((at, slacks));
            c.advance();
        }
        out
    }

    fn check_grid(ticks: &[(u64, Vec<u64>)]) {
        for (n, (at, _)) in ticks.iter().enumerate() {
            let grid = n as i64 * F as i64;
            let offset = *at as i64 - grid;
            assert!(
                (-(F as i64)..F as i64).contains(&offset),
                "tick {n} at {at} µs is {offset} µs off the grid"
            );
        }
        for pair in ticks.windows(2) {
            let step = pair[1].0 as i64 - pair[0].0 as i64;
            assert!(
                (F as i64 - 1000..=F as i64 + 1000).contains(&step),
                "ticks {step} µs apart"
            );
        }
    }

    /// The tick may run early by the margin it keeps after the talker it follows (that
    /// talker's own when larger), never by more than a quarter of a frame, and a fixed tick or
    /// a clock that follows no one never runs early.
    #[test]
    fn the_early_window_is_the_followed_talkers_margin() {
        let mut c = clock();
        assert_eq!(c.early_window(), Duration::ZERO, "no talker followed yet");
        run(&mut c, &[Talker::steady(1, 5)], 10);
        assert_eq!(c.early_window(), us(3_000), "the clock's own margin");
        c.observe_with_margin(StreamId(1), us(c.next_tick().as_micros() as u64), us(4_000));
        c.advance();
        assert_eq!(c.early_window(), us(4_000), "the talker's larger margin");
        c.observe_with_margin(StreamId(1), us(c.next_tick().as_micros() as u64), us(9_000));
        c.advance();
        assert_eq!(c.early_window(), us(F / 4), "at most a quarter of a frame");

        let mut fixed = TickClock::new(us(F), us(3_000), Duration::ZERO);
        run(&mut fixed, &[Talker::steady(1, 5)], 10);
        assert_eq!(fixed.early_window(), Duration::ZERO, "a fixed tick");
    }

    /// A jittery talker's window also spans how far its late edge sits after its median
    /// arrival: an early tick may run on its typical packet, not only after a late one's edge.
    #[test]
    fn a_jittery_talkers_early_window_reaches_back_to_its_typical_packet() {
        let mut c = clock();
        // 0–4 ms of jitter on top of phase 8 ms: median about 10 ms, late edge (the third
        // latest of 25) about 11.6 ms, the tick due about 3 ms after that.
        let t = Talker::jittery(1, 8);
        let ticks = run(&mut c, &[t], 300);
        check_grid(&ticks);
        let window = c.early_window().as_micros() as u64;
        assert!(
            (4_000..=F / 4).contains(&window),
            "window {window} µs: the margin (3 ms) and the edge's lead over the median"
        );
        let opens = c.earliest_tick().as_micros() as u64 % F;
        assert!(
            (9_000..=11_000).contains(&opens),
            "the window opens at phase {opens} µs, not near the median arrival (10 ms)"
        );
    }

    #[test]
    fn one_talker_waits_only_the_margin() {
        let mut c = clock();
        let ticks = run(&mut c, &[Talker::steady(1, 7)], 100);
        check_grid(&ticks);
        // The tick walks from phase 0 to 7 + 3 = 10 ms, 1 ms a frame.
        for (_, slacks) in &ticks[20..] {
            assert_eq!(slacks, &vec![3_000]);
        }
    }

    #[test]
    fn a_cluster_of_talkers_is_waited_for_past_its_latest() {
        let mut c = clock();
        let talkers = [
            Talker::steady(1, 2),
            Talker::steady(2, 5),
            Talker::steady(3, 8),
        ];
        let ticks = run(&mut c, &talkers, 100);
        check_grid(&ticks);
        // Tick at 8 + 3 = 11 ms: slacks 9, 6 and 3 ms (a fixed tick at 0 gives 18, 15, 12).
        for (_, slacks) in &ticks[30..] {
            assert_eq!(slacks, &vec![9_000, 6_000, 3_000]);
        }
    }

    #[test]
    fn the_largest_gap_decides_even_across_the_frame_edge() {
        let mut c = clock();
        // Phases 17, 19 and 1 ms: one cluster across the edge; the tick goes 3 ms after 1 ms.
        let talkers = [
            Talker::steady(1, 17),
            Talker::steady(2, 19),
            Talker::steady(3, 21),
        ];
        let ticks = run(&mut c, &talkers, 100);
        check_grid(&ticks);
        for (_, slacks) in &ticks[30..] {
            let mut s = slacks.clone();
            s.sort_unstable();
            assert_eq!(s, vec![3_000, 5_000, 7_000]);
        }
    }

    /// Two talkers half a frame apart leave two gaps of the same size. When one wobbles by
    /// half a millisecond either way for a while, the largest gap changes sides; the tick keeps
    /// following the talker it follows instead of walking half a frame back across the other
    /// (which made that one miss its tick).
    #[test]
    fn two_gaps_of_about_the_same_size_do_not_make_the_tick_walk() {
        let mut c = clock();
        let talkers = [
            Talker::steady(1, 0),
            Talker {
                id: StreamId(2),
                phase: 10_000,
                period: F,
                // 0.6 ms late for 40 frames, then 0.6 ms early for 40, and so on.
                jitter: Box::new(|k| if (k / 40) % 2 == 0 { 1_200 } else { 0 }),
            },
        ];
        let ticks = run(&mut c, &talkers, 600);
        check_grid(&ticks);
        let offsets: Vec<i64> = ticks
            .iter()
            .enumerate()
            .skip(100)
            .map(|(n, (at, _))| *at as i64 - n as i64 * F as i64)
            .collect();
        let (lo, hi) = (
            offsets.iter().min().expect("ticks"),
            offsets.iter().max().expect("ticks"),
        );
        assert!(hi - lo <= 1_500, "the tick moved between {lo} and {hi} µs");
        for (n, (_, slacks)) in ticks.iter().enumerate().skip(100) {
            assert!(
                slacks.iter().all(|&s| s >= 1_500),
                "tick {n}: slacks {slacks:?}"
            );
        }
    }

    #[test]
    fn jitter_is_covered_by_the_late_edge() {
        let mut c = clock();
        // 0–4 ms of jitter on top of phase 8 ms, near the grid's half-frame edge.
        let t = Talker::jittery(1, 8);
        let ticks = run(&mut c, &[t], 300);
        check_grid(&ticks);
        let mut total = 0;
        for (n, (_, slacks)) in ticks.iter().enumerate().skip(60) {
            // Every frame makes its tick: a frame later than the window's latest eats into the
            // margin only, and the tick, following the window's edge a step at a time, lags it
            // by at most a couple of steps.
            assert_eq!(slacks.len(), 1, "tick {n} played no frame");
            assert!(
                (1_000..=9_000).contains(&slacks[0]),
                "tick {n}: slack {}",
                slacks[0]
            );
            total += slacks[0];
        }
        // On average the margin plus half the spread: about 5 ms (a fixed tick: 0–20 ms).
        let mean = total / 240;
        assert!((4_000..=6_500).contains(&mean), "mean slack {mean} µs");
    }

    #[test]
    fn a_drifting_talker_is_followed_but_the_grid_holds() {
        let mut c = clock();
        // A sender clock 0.5 % slow: its phase slides 100 µs a frame, round the whole frame in
        // 200 frames.
        let t = Talker {
            id: StreamId(1),
            phase: 5_000,
            period: F + 100,
            jitter: Box::new(|_| 0),
        };
        let ticks = run(&mut c, &[t], 1_000);
        check_grid(&ticks);
        // Mostly just after the talker: the tick keeps up with 100 µs a frame at 1 ms a frame,
        // except while it goes back round after reaching the grid's bound.
        let near = ticks
            .iter()
            .skip(40)
            .filter(|(_, s)| s.iter().all(|&s| s <= 4_000))
            .count();
        assert!(
            near * 10 >= 960 * 7,
            "only {near} of 960 ticks near the talker"
        );
    }

    #[test]
    fn a_talker_who_stops_no_longer_counts() {
        let mut c = clock();
        let talkers = [Talker::steady(1, 4), Talker::steady(2, 14)];
        run(&mut c, &talkers, 60);
        // Talker 2 stops: after a window the tick moves to 4 + 3 = 7 ms.
        let ticks = run(&mut c, &talkers[..1], 100);
        for (_, slacks) in &ticks[WINDOW + 20..] {
            assert_eq!(slacks, &vec![3_000]);
        }
        // Everyone stops: the tick holds where it is.
        let before = c.offset_micros();
        run(&mut c, &[], 100);
        assert_eq!(c.offset_micros(), before);
    }

    #[test]
    fn a_fixed_clock_holds_and_retuned_it_aligns_with_the_new_margin() {
        let mut c = TickClock::new(us(F), us(3_000), Duration::ZERO);
        let talker = [Talker::steady(1, 7)];
        // Fixed: ticks stay on the grid, the frame at 7 ms waits 13 ms.
        for (n, (at, slacks)) in run(&mut c, &talker, 50).into_iter().enumerate().skip(1) {
            assert_eq!(at, n as u64 * F);
            assert_eq!(slacks, vec![13_000]);
        }
        // Aligned with a 5 ms margin from here on: the frames wait 5 ms.
        c.retune(us(5_000), DEFAULT_MAX_STEP);
        let ticks = run(&mut c, &talker, 60);
        for (_, slacks) in &ticks[20..] {
            assert_eq!(slacks, &vec![5_000]);
        }
    }

    /// A talker whose jitter buffer asks for more than the clock's margin (here 6 ms against 3)
    /// gets it: the tick waits 6 ms after its late edge, so its frames are not played so close
    /// to their arrival that its buffer adds a whole frame. The others keep the clock's margin
    /// when their ready phase comes first.
    #[test]
    fn a_talker_that_needs_a_larger_margin_gets_it() {
        let mut c = clock();
        let talkers = [Talker::steady(1, 2), Talker::steady(2, 5)];
        let mut played = [0u64; 2];
        let mut last = Vec::new();
        for _ in 0..100 {
            let at = c.next_tick().as_micros() as u64;
            let mut slacks = Vec::new();
            for (i, (t, next)) in talkers.iter().zip(played.iter_mut()).enumerate() {
                let mut newest = None;
                while t.arrival(*next) <= at {
                    newest = Some(t.arrival(*next));
                    *next += 1;
                }
                if let Some(arrival) = newest {
                    let margin = if i == 1 { us(6_000) } else { Duration::ZERO };
                    c.observe_with_margin(t.id, us(arrival), margin);
                    slacks.push(at - arrival);
                }
            }
            last = slacks;
            c.advance();
        }
        // Ready at 2 + 3 = 5 ms and 5 + 6 = 11 ms: the tick sits at 11 ms.
        assert_eq!(last, vec![9_000, 6_000]);
    }

    proptest! {
        /// Whatever arrives (any phases, jitter, bursts, duplicates, streams that come and go,
        /// talkers asking for any margin, arrivals far from the tick), and whether each tick
        /// runs at its deadline or anywhere in its early window, the grid invariants hold.
        #[test]
        fn the_tick_stays_within_a_frame_of_its_grid_and_about_a_frame_apart(
            events in prop::collection::vec(
                (0u64..6, 0u64..100_000, 0u8..3, prop_oneof![Just(0u64), 0u64..30_000], any::<u8>()),
                0..400,
            ),
            max_step in 0u64..15_000,
        ) {
            let mut c = TickClock::new(us(F), us(3_000), us(max_step));
            let mut deadlines = Vec::new();
            let mut times = Vec::new();
            for (stream, arrival, advance, margin, early) in events {
                let at = c.next_tick().as_micros() as u64;
                let arrival = us(at.saturating_sub(arrival % 60_000));
                if margin == 0 {
                    c.observe(StreamId(stream), arrival);
                } else {
                    c.observe_with_margin(StreamId(stream), arrival, us(margin));
                }
                for _ in 0..advance {
                    let due = c.next_tick().as_micros() as u64;
                    let earliest = c.earliest_tick().as_micros() as u64;
                    prop_assert!(earliest <= due);
                    // Ran at its deadline, or early once its talkers were here.
                    let ran = earliest + (due - earliest) * u64::from(early) / 255;
                    deadlines.push(due as i64);
                    times.push(ran as i64);
                    c.advance();
                }
            }
            let step_bound = (max_step as i64).min(F as i64 / 2 - 1);
            for ticks in [&deadlines, &times] {
                for (n, at) in ticks.iter().enumerate() {
                    let offset = at - n as i64 * F as i64;
                    prop_assert!((-(F as i64)..F as i64).contains(&offset), "tick {n}: {offset}");
                }
            }
            for pair in deadlines.windows(2) {
                prop_assert!(pair[1] > pair[0]);
                prop_assert!((pair[1] - pair[0] - F as i64).abs() <= step_bound);
            }
            let early_bound = if max_step == 0 { 0 } else { F as i64 / 4 };
            for pair in times.windows(2) {
                prop_assert!(
                    (pair[1] - pair[0] - F as i64).abs() <= step_bound + early_bound,
                    "ticks {} µs apart", pair[1] - pair[0]
                );
            }
        }
    }
}
