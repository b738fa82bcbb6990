//! Top-N speaker selection with hysteresis: one rule set for the local mix and the mesh.
//!
//! [`select_top_n`] is the only place a top-N is chosen. The [`Ranker`] runs it every frame tick
//! over a room's streams on one server, and the mesh primary runs it over the voice-active
//! candidates of every server (`mesh::protocol::merge_top_list`). So a single-server room and a
//! mesh room pick the same speakers from the same levels. The rules, in order:
//! - a NaN importance, or one below the silence threshold, is silence: never eligible (selected
//!   only as a resting insider, last rule), never in the margin;
//! - duplicate keys collapse to their most important entry;
//! - previously selected keys that are still eligible keep their slots (the loudest of them when
//!   there are more than `top_n`);
//! - empty slots are filled by the loudest outsiders straight away (there is nothing to protect);
//! - then the loudest outsider replaces the WEAKEST insider only if it is louder by more than the
//!   hysteresis, repeated until a challenge fails. So a quiet speaker who gets louder replaces the
//!   quietest selected speaker, while two speakers at nearly the same level never swap back and
//!   forth;
//! - last, slots still empty go back to RESTING insiders: previously selected keys that are still
//!   among the candidates but silent now (a talker between sentences). A resting insider keeps its
//!   slot only while no eligible key needs it, and yields it to any eligible key without a margin.
//!   So three talkers in three slots stay selected through their pauses (the list does not drop a
//!   talker at each breath and take it back), while a new voice always gets a free slot at once.
//!   A key missing from the candidates (left, muted) is gone, resting or not.
//!
//! Invariants:
//! - the selection never holds more than `top_n` keys, never a duplicate, and a silent key only
//!   as a resting insider (selected before, still a candidate, its slot needed by no eligible
//!   key);
//! - equal importance always resolves the same way (lower key ranks first), and neither the order
//!   of the candidates nor that of the previous selection matters, so every server that sees the
//!   same inputs selects the same keys.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use super::{Candidate, StreamId};
use crate::media::level::DEFAULT_SILENCE_THRESHOLD_DBOV;

/// The default margin a challenger needs over the weakest selected stream.
pub const DEFAULT_HYSTERESIS_DB: f32 = 3.0;

/// The outcome of [`select_top_n`]: every eligible key exactly once, with its importance, plus
/// the resting insiders that kept their slots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection<K> {
    /// The selected keys, loudest first (ties: lower key first), at most `top_n`: the eligible
    /// ones, then the resting insiders (silent, so ranked last; in key order).
    pub selected: Vec<(K, f32)>,
    /// The other eligible keys, loudest first (ties: lower key first): a margin is a prefix.
    pub outsiders: Vec<(K, f32)>,
}

/// Loudest first; equal importance → lower key first. Total, so sorting is deterministic.
fn by_rank<K: Ord>(a: &(K, f32), b: &(K, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
}

/// Top-N with hysteresis under the rules of the module doc, for any ordered key.
///
/// `previous` is the last selection (its order and duplicates do not matter); `candidates` are
/// (key, importance in dBov), silent ones included: a silent candidate is never eligible, but
/// its presence lets a previous insider rest in a slot nobody needs. `hysteresis_db` is the margin a challenger needs over the weakest
/// insider; a negative or NaN margin counts as none, and an infinite one means a selected key is
/// never displaced while it stays eligible.
///
/// Where the local ranker and the mesh merge used to differ, this one rule set holds for both:
/// - duplicates collapse to the most important entry (the ranker kept the first), because that
///   does not depend on the order in which lists arrive;
/// - NaN is silence (the merge read it as -127 dBov and could select it), and silence is decided
///   by `silence_dbov` for both (the merge had no threshold);
/// - when more previously selected keys are eligible than there are slots, the loudest keep
///   theirs (the ranker kept the first ones in its own order);
/// - an infinite hysteresis never lets a challenger in (the merge read it as none), and a NaN
///   one is none (the ranker then never let a challenger in).
pub fn select_top_n<K: Ord + Clone>(
    previous: &[K],
    candidates: &[(K, f32)],
    top_n: usize,
    hysteresis_db: f32,
    silence_dbov: f32,
) -> Selection<K> {
    // Keep what is `>= silence` rather than drop what is `< silence`: NaN fails every
    // comparison, so a NaN importance is dropped as silence (as is everything under a NaN
    // threshold).
    let mut eligible: Vec<(K, f32)> = candidates
        .iter()
        .filter(|(_, importance)| *importance >= silence_dbov)
        .cloned()
        .collect();
    let previous: BTreeSet<&K> = previous.iter().collect();
    // Previous insiders present but silent, one entry each (the most important; NaN reads as
    // -inf, so selections compare equal), key order: the resting insiders that may keep a slot
    // nobody eligible needs.
    let mut resting: Vec<(K, f32)> = candidates
        .iter()
        .filter(|(key, _)| previous.contains(key) && !eligible.iter().any(|(k, _)| k == key))
        .map(|(key, importance)| {
            let importance = if importance.is_nan() {
                f32::NEG_INFINITY
            } else {
                *importance
            };
            (key.clone(), importance)
        })
        .collect();
    resting.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.total_cmp(&a.1)));
    resting.dedup_by(|later, earlier| later.0 == earlier.0);
    // One entry per key, the most important: sort by key, loudest first within a key, dedup.
    eligible.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.total_cmp(&a.1)));
    eligible.dedup_by(|later, earlier| later.0 == earlier.0);
    eligible.sort_by(by_rank);

    let hysteresis = if hysteresis_db.is_nan() {
        0.0
    } else {
        hysteresis_db.max(0.0)
    };
    // `chosen[i]` says whether `eligible[i]` is selected. `eligible` is in rank order, so the
    // best outsider is the first unchosen index and the weakest insider the last chosen one.
    let mut chosen: Vec<bool> = eligible
        .iter()
        .map(|(key, _)| previous.contains(key))
        .collect();
    let mut count = 0;
    for slot in &mut chosen {
        if *slot {
            if count < top_n {
                count += 1;
            } else {
                *slot = false;
            }
        }
    }
    for slot in &mut chosen {
        if count >= top_n {
            break;
        }
        if !*slot {
            *slot = true;
            count += 1;
        }
    }
    // A displaced key never returns: the new weakest insider is at least as loud as it was, so it
    // would need to beat itself by the margin. Hence at most one swap per eligible key.
    for _ in 0..eligible.len() {
        let challenger = chosen.iter().position(|c| !*c);
        let weakest = chosen.iter().rposition(|c| *c);
        match (challenger, weakest) {
            (Some(ch), Some(w)) if eligible[ch].1 > eligible[w].1 + hysteresis => {
                chosen[ch] = true;
                chosen[w] = false;
            }
            _ => break,
        }
    }

    let mut selection = Selection {
        selected: Vec::with_capacity(top_n.min(count + resting.len())),
        outsiders: Vec::with_capacity(eligible.len() - count),
    };
    for (entry, selected) in eligible.into_iter().zip(chosen) {
        if selected {
            selection.selected.push(entry);
        } else {
            selection.outsiders.push(entry);
        }
    }
    // Every eligible key had its chance at a slot above; what is left rests with its holder.
    let free = top_n.saturating_sub(selection.selected.len());
    selection.selected.extend(resting.into_iter().take(free));
    selection
}

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
        self.selected.iter().chain(&self.extra).cloned().collect()
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
pub fn rank_order(a: &Candidate, b: &Candidate) -> Ordering {
    b.importance
        .total_cmp(&a.importance)
        .then_with(|| a.stream.cmp(&b.stream))
}

/// Stateful top-N selector; state is just the current selection, which is what hysteresis needs.
#[derive(Clone, Debug)]
pub struct Ranker {
    cfg: RankingConfig,
    /// Loudest first, as of the last update.
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

    /// New limits, live: the selection is kept (its weakest dropped when N shrinks, refilled at
    /// the next update when N grows).
    pub fn set_config(&mut self, cfg: RankingConfig) {
        self.cfg = cfg;
        self.selected.truncate(cfg.top_n);
    }

    /// The currently selected streams, loudest first as of the last update.
    pub fn selected(&self) -> &[StreamId] {
        &self.selected
    }

    /// One ranking round over every eligible stream (muted or removed streams simply are not in
    /// `streams`), by [`select_top_n`]. A duplicate id counts once, at its most important entry
    /// (voice-active if any entry at that importance is, named by the first identity given there).
    pub fn update(&mut self, streams: &[Candidate]) -> Ranking {
        let levels: Vec<(StreamId, f32)> =
            streams.iter().map(|c| (c.stream, c.importance)).collect();
        let selection = select_top_n(
            &self.selected,
            &levels,
            self.cfg.top_n,
            self.cfg.hysteresis_db,
            self.cfg.silence_dbov,
        );
        // Back to full candidates. The voice flag is looked up by level, not by position, so the
        // result does not depend on the order of duplicates either; the identity is the first
        // one given at that level (the media core gives none, so this clones no string there).
        let candidate = |&(stream, importance): &(StreamId, f32)| {
            let mut at_level = streams
                .iter()
                .filter(|c| c.stream == stream && c.importance.total_cmp(&importance).is_eq());
            let identity = at_level.clone().find_map(|c| c.identity.clone());
            Candidate {
                stream,
                importance,
                voice: at_level.any(|c| c.voice),
                identity,
            }
        };
        self.selected = selection.selected.iter().map(|(id, _)| *id).collect();
        Ranking {
            selected: selection.selected.iter().map(candidate).collect(),
            extra: selection
                .outsiders
                .iter()
                .take(self.cfg.extra)
                .map(candidate)
                .collect(),
        }
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
            identity: None,
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
        let mut reversed = input.clone();
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
    fn departed_streams_leave_and_silent_ones_never_enter() {
        let mut r = Ranker::new(RankingConfig::new(2, 3));
        r.update(&[c(1, -10.0), c(2, -20.0), c(3, -25.0)]);
        // 2 disappears; 3 (an outsider) goes NaN and 5 arrives silent: neither can take the
        // free slot, which goes to the only voice left besides 1.
        let out = r.update(&[c(1, -10.0), c(3, f32::NAN), c(4, -40.0), c(5, -90.0)]);
        assert_eq!(ids(&out), vec![1, 4]);
        assert!(out.extra.is_empty());
        assert_eq!(r.selected(), &[StreamId(1), StreamId(4)]);
        // Duplicates collapse to their most important entry, whatever the input order.
        let out = r.update(&[c(4, -40.0), c(4, -10.0), c(5, -30.0)]);
        assert_eq!(ids(&out), vec![4, 5]);
        assert_eq!(out.selected[0].importance, -10.0);
        assert_eq!(r.config().top_n, 2);
    }

    #[test]
    fn a_silent_insider_rests_in_its_slot_until_a_voice_needs_it() {
        let mut r = Ranker::new(RankingConfig::new(3, 1));
        r.update(&[c(1, -10.0), c(2, -20.0), c(3, -25.0)]);
        // 3 pauses (silent, then NaN): nobody needs its slot, so it keeps it, ranked last, and
        // it never counts as margin.
        for i in 0..20 {
            let pause = if i % 2 == 0 { -90.0 } else { f32::NAN };
            let out = r.update(&[c(1, -10.0), c(2, -20.0), c(3, pause)]);
            assert_eq!(ids(&out), vec![1, 2, 3]);
            assert!(out.extra.is_empty());
        }
        // A new voice, however quiet, takes the resting slot at once: no margin is needed.
        let out = r.update(&[c(1, -10.0), c(2, -20.0), c(3, -90.0), c(4, -45.0)]);
        assert_eq!(ids(&out), vec![1, 2, 4]);
        assert!(out.extra.is_empty(), "a silent outsider is no margin");
        // Talking again, 3 is a challenger like any other: louder than 4 by the margin, it is in.
        let out = r.update(&[c(1, -10.0), c(2, -20.0), c(3, -30.0), c(4, -45.0)]);
        assert_eq!(ids(&out), vec![1, 2, 3]);
        assert_eq!(out.extra[0].stream, StreamId(4));
        // 1 rests while 4 leaves; then 1 leaves too: a resting insider that is gone is gone.
        let out = r.update(&[c(1, -90.0), c(2, -20.0), c(3, -30.0)]);
        assert_eq!(ids(&out), vec![2, 3, 1]);
        let out = r.update(&[c(2, -20.0), c(3, -30.0)]);
        assert_eq!(ids(&out), vec![2, 3]);
    }

    #[test]
    fn zero_top_n_selects_nothing() {
        let mut r = Ranker::new(RankingConfig::new(0, 2));
        let out = r.update(&[c(1, -10.0), c(2, -20.0), c(3, -30.0)]);
        assert!(out.selected.is_empty());
        assert_eq!(out.extra.len(), 2);
    }
}
