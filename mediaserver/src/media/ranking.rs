//! Top-N speaker selection with hysteresis.
//!
//! Each frame tick the [`Ranker`] receives every eligible stream's smoothed importance and
//! updates its selected set:
//! - a selected stream that disappears or falls silent leaves the set;
//! - empty slots are filled by the loudest unselected streams straight away (there is nothing to
//!   protect);
//! - otherwise a challenger replaces the WEAKEST selected stream only if it is louder by
//!   [`RankingConfig::hysteresis_db`]. So a quiet speaker who gets louder replaces the quietest
//!   selected speaker, while two speakers at nearly the same level never swap back and forth.
//!
//! Invariants:
//! - the selected set never holds more than `top_n` streams, never a silent one, never a duplicate;
//! - equal importance always resolves the same way (lower [`StreamId`] ranks first), so every
//!   server that sees the same inputs selects the same streams;
//! - NaN importances are treated as silence.

use super::{Candidate, StreamId};
use crate::media::level::DEFAULT_SILENCE_THRESHOLD_DBOV;

/// The default margin a challenger needs over the weakest selected stream.
pub const DEFAULT_HYSTERESIS_DB: f32 = 3.0;

/// Parameters of a [`Ranker`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankingConfig {
    /// How many streams are selected (N).
    pub top_n: usize,
    /// How many further ranked streams are reported after the top N (the mesh margin).
    pub extra: usize,
    /// How much louder (dB) a challenger must be than the weakest selected stream to replace it.
    pub hysteresis_db: f32,
    /// Streams below this importance (dBov) are silent: never selected, never in the margin.
    pub silence_dbov: f32,
}

impl RankingConfig {
    /// N selected plus `extra` margin, default hysteresis and silence threshold.
    pub fn new(top_n: usize, extra: usize) -> Self {
        Self {
            top_n,
            extra,
            hysteresis_db: DEFAULT_HYSTERESIS_DB,
            silence_dbov: DEFAULT_SILENCE_THRESHOLD_DBOV,
        }
    }
}

/// The outcome of one ranking round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ranking {
    /// The selected streams, loudest first (ties by id).
    pub selected: Vec<Candidate>,
    /// The next-ranked non-silent streams after the selection, loudest first, at most `extra`.
    pub extra: Vec<Candidate>,
}

impl Ranking {
    /// Selected then margin: the list a server sends to the mesh primary.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.selected.iter().chain(&self.extra).copied().collect()
    }

    /// The ids of the selected streams, sorted by id.
    pub fn selected_ids(&self) -> Vec<StreamId> {
        let mut ids: Vec<StreamId> = self.selected.iter().map(|c| c.stream).collect();
        ids.sort_unstable();
        ids
    }

    /// The best-ranked stream outside the selection: what backfills a speaker's own mix.
    pub fn backfill(&self) -> Option<StreamId> {
        self.extra.first().map(|c| c.stream)
    }
}

/// Loudest first; equal importance → lower id first. Total, so sorting is deterministic.
pub fn rank_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.importance
        .total_cmp(&a.importance)
        .then_with(|| a.stream.cmp(&b.stream))
}

/// Sanitises an importance: NaN reads as silence.
fn importance_of(c: &Candidate) -> f32 {
    if c.importance.is_nan() {
        f32::NEG_INFINITY
    } else {
        c.importance
    }
}

/// Stateful top-N selector; state is just the current selection, which is what hysteresis needs.
#[derive(Clone, Debug)]
pub struct Ranker {
    cfg: RankingConfig,
    selected: Vec<StreamId>,
}

impl Ranker {
    /// A ranker with nothing selected.
    pub fn new(cfg: RankingConfig) -> Self {
        Self {
            cfg,
            selected: Vec::with_capacity(cfg.top_n),
        }
    }

    /// The configuration.
    pub fn config(&self) -> RankingConfig {
        self.cfg
    }

    /// New limits, live: the selection is kept (trimmed to its weakest-last order when N shrinks,
    /// refilled at the next update when N grows).
    pub fn set_config(&mut self, cfg: RankingConfig) {
        self.cfg = cfg;
        self.selected.truncate(cfg.top_n);
    }

    /// The currently selected streams (in no particular order).
    pub fn selected(&self) -> &[StreamId] {
        &self.selected
    }

    /// One ranking round over every eligible stream (muted or removed streams simply are not in
    /// `streams`). Duplicate ids in `streams` are collapsed (first occurrence wins).
    pub fn update(&mut self, streams: &[Candidate]) -> Ranking {
        let silence = self.cfg.silence_dbov;
        // Eligible = present and not silent, sorted by rank, duplicates removed.
        let mut eligible: Vec<Candidate> = Vec::with_capacity(streams.len());
        for c in streams {
            let imp = importance_of(c);
            if imp >= silence && !eligible.iter().any(|e| e.stream == c.stream) {
                eligible.push(Candidate {
                    importance: imp,
                    ..*c
                });
            }
        }
        eligible.sort_by(rank_order);
        let find = |id: StreamId| eligible.iter().find(|c| c.stream == id).copied();

        // 1. Drop selected streams that left or fell silent.
        self.selected.retain(|&id| find(id).is_some());
        self.selected.truncate(self.cfg.top_n);

        // 2. Fill empty slots with the best unselected streams.
        for c in &eligible {
            if self.selected.len() >= self.cfg.top_n {
                break;
            }
            if !self.selected.contains(&c.stream) {
                self.selected.push(c.stream);
            }
        }

        // 3. Challenges: the best outsider against the weakest insider, until one fails. Each
        //    swap strictly raises the selection's minimum, so this ends within top_n rounds.
        for _ in 0..self.cfg.top_n {
            let challenger = eligible
                .iter()
                .find(|c| !self.selected.contains(&c.stream))
                .copied();
            let weakest = self
                .selected
                .iter()
                .filter_map(|&id| find(id))
                .max_by(rank_order);
            match (challenger, weakest) {
                (Some(ch), Some(w)) if ch.importance > w.importance + self.cfg.hysteresis_db => {
                    if let Some(slot) = self.selected.iter_mut().find(|id| **id == w.stream) {
                        *slot = ch.stream;
                    }
                }
                _ => break,
            }
        }

        let mut selected: Vec<Candidate> =
            self.selected.iter().filter_map(|&id| find(id)).collect();
        selected.sort_by(rank_order);
        let extra = eligible
            .iter()
            .filter(|c| !self.selected.contains(&c.stream))
            .take(self.cfg.extra)
            .copied()
            .collect();
        Ranking { selected, extra }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, importance: f32) -> Candidate {
        Candidate {
            stream: StreamId(id),
            importance,
            voice: true,
        }
    }

    fn ids(r: &Ranking) -> Vec<u64> {
        r.selected.iter().map(|c| c.stream.0).collect()
    }

    #[test]
    fn selects_loudest_n_in_rank_order_with_margin() {
        let mut r = Ranker::new(RankingConfig::new(3, 2));
        let out = r.update(&[
            c(1, -30.0),
            c(2, -10.0),
            c(3, -20.0),
            c(4, -40.0),
            c(5, -15.0),
            c(6, -50.0),
        ]);
        assert_eq!(ids(&out), vec![2, 5, 3]);
        assert_eq!(
            out.extra.iter().map(|c| c.stream.0).collect::<Vec<_>>(),
            vec![1, 4]
        );
        assert_eq!(out.backfill(), Some(StreamId(1)));
        assert_eq!(out.candidates().len(), 5);
        assert_eq!(
            out.selected_ids(),
            vec![StreamId(2), StreamId(3), StreamId(5)]
        );
    }

    #[test]
    fn louder_challenger_replaces_the_quietest_selected() {
        let mut r = Ranker::new(RankingConfig::new(3, 1));
        r.update(&[c(1, -10.0), c(2, -15.0), c(3, -20.0), c(4, -30.0)]);
        // 4 rises above 3 by more than the margin: 3 (the quietest selected) goes, not 1 or 2.
        let out = r.update(&[c(1, -10.0), c(2, -15.0), c(3, -20.0), c(4, -12.0)]);
        assert_eq!(ids(&out), vec![1, 4, 2]);
        assert_eq!(out.extra[0].stream, StreamId(3));
    }

    #[test]
    fn near_equal_speakers_do_not_flap() {
        let mut r = Ranker::new(RankingConfig::new(1, 1));
        r.update(&[c(1, -20.0), c(2, -21.0)]);
        // Alternate who is marginally louder: within the 3 dB margin nothing changes.
        for i in 0..50 {
            let (a, b) = if i % 2 == 0 {
                (-20.0, -18.0)
            } else {
                (-19.0, -20.5)
            };
            let out = r.update(&[c(1, a), c(2, b)]);
            assert_eq!(ids(&out), vec![1]);
        }
        // A clear lead switches it.
        let out = r.update(&[c(1, -20.0), c(2, -16.9)]);
        assert_eq!(ids(&out), vec![2]);
    }

    #[test]
    fn ties_break_by_stream_id_whatever_the_input_order() {
        let mut a = Ranker::new(RankingConfig::new(2, 2));
        let mut b = Ranker::new(RankingConfig::new(2, 2));
        let input = [c(9, -20.0), c(3, -20.0), c(7, -20.0), c(5, -20.0)];
        let mut reversed = input;
        reversed.reverse();
        let ra = a.update(&input);
        let rb = b.update(&reversed);
        assert_eq!(ra, rb);
        assert_eq!(ids(&ra), vec![3, 5]);
        assert_eq!(
            ra.extra.iter().map(|c| c.stream.0).collect::<Vec<_>>(),
            vec![7, 9]
        );
    }

    #[test]
    fn silent_departed_and_nan_streams_leave() {
        let mut r = Ranker::new(RankingConfig::new(2, 3));
        r.update(&[c(1, -10.0), c(2, -20.0), c(3, -25.0)]);
        // 1 falls silent, 2 disappears, 3 is NaN: the slots refill from what is left.
        let out = r.update(&[c(1, -90.0), c(3, f32::NAN), c(4, -40.0)]);
        assert_eq!(ids(&out), vec![4]);
        assert!(out.extra.is_empty());
        assert_eq!(r.selected(), &[StreamId(4)]);
        // Duplicates collapse.
        let out = r.update(&[c(4, -40.0), c(4, -10.0), c(5, -30.0)]);
        assert_eq!(ids(&out), vec![5, 4]);
        assert_eq!(r.config().top_n, 2);
    }

    #[test]
    fn zero_top_n_selects_nothing() {
        let mut r = Ranker::new(RankingConfig::new(0, 2));
        let out = r.update(&[c(1, -10.0), c(2, -20.0), c(3, -30.0)]);
        assert!(out.selected.is_empty());
        assert_eq!(out.extra.len(), 2);
    }
}
