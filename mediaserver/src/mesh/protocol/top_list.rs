//! The pure list functions of the protocol: sanitising candidates (the mixer's and the peers'),
//! the primary's merge of every server's candidates into the global list and margin, and the
//! canonical form of a received list.
//!
//! No state and no time: the merge depends only on its arguments, so a new primary continues its
//! predecessor's list by passing it as the previous one. The merge's rules are the local ranker's
//! ([`select_top_n`]), so a mesh room picks the speakers a single-server room would.
//!
//! Invariants: outputs are bounded by the limits passed in; importances are clamped to the wire's
//! -127..=0 dBov with NaN as silence, so no value a peer sends outranks every honest one.

use super::StreamKey;
use crate::media::level::DEFAULT_SILENCE_THRESHOLD_DBOV;
use crate::media::ranking::select_top_n;
use crate::media::{Candidate, StreamId};

/// The voiced streams among the first `limit` candidates, sorted: what a local list says, apart
/// from levels.
pub(super) fn voiced_streams(candidates: &[Candidate], limit: usize) -> Vec<StreamId> {
    let mut ids: Vec<StreamId> = candidates
        .iter()
        .filter(|c| c.voice)
        .take(limit)
        .map(|c| c.stream)
        .collect();
    ids.sort_unstable();
    ids
}

/// An importance on the wire's scale, -127..=0 dBov; NaN is silence.
fn sanitize_importance(x: f32) -> f32 {
    if x.is_nan() {
        -127.0
    } else {
        x.clamp(-127.0, 0.0)
    }
}

/// Best first: voice-active, then louder, then lower stream id. One entry per stream, at most
/// `limit`, importance clamped to -127..=0 (NaN is silence).
pub(super) fn sanitize_candidates(mut c: Vec<Candidate>, limit: usize) -> Vec<Candidate> {
    for x in &mut c {
        x.importance = sanitize_importance(x.importance);
    }
    let better = |a: &Candidate, b: &Candidate| {
        b.voice
            .cmp(&a.voice)
            .then_with(|| b.importance.total_cmp(&a.importance))
            .then_with(|| a.stream.cmp(&b.stream))
    };
    c.sort_by(|a, b| a.stream.cmp(&b.stream).then_with(|| better(a, b)));
    c.dedup_by_key(|x| x.stream);
    c.sort_by(better);
    c.truncate(limit);
    c
}

/// The primary's merge: from the `candidates` (key, importance) of every live server, the top
/// `top_n` with hysteresis against `prev`, and the next `extra` as margin. Both results are
/// sorted by key. A candidate that is present but not voice-active comes in at silence: it is
/// never chosen afresh, but when it is on `prev` it rests in its slot until a voice needs it.
///
/// The rules are the local ranker's, [`select_top_n`], so a mesh room picks the same speakers
/// as a single-server room would from the same levels: NaN and importances below the default
/// silence threshold never make the list, a duplicate key counts at its most important entry,
/// equal importance ranks the lower key first. Importances from peers are first clamped to the
/// wire's -127..=0 dBov, so an out-of-range value cannot outrank every honest one.
pub fn merge_top_list(
    prev: &[StreamKey],
    candidates: &[(StreamKey, f32)],
    top_n: usize,
    extra: usize,
    hysteresis_db: f32,
) -> (Vec<StreamKey>, Vec<StreamKey>) {
    // `f32::clamp` keeps NaN as NaN, which the selection treats as silence.
    let levels: Vec<(StreamKey, f32)> = candidates
        .iter()
        .map(|(k, i)| (k.clone(), i.clamp(-127.0, 0.0)))
        .collect();
    let selection = select_top_n(
        prev,
        &levels,
        top_n,
        hysteresis_db,
        DEFAULT_SILENCE_THRESHOLD_DBOV,
    );
    let mut list: Vec<StreamKey> = selection.selected.into_iter().map(|(k, _)| k).collect();
    list.sort();
    let mut margin: Vec<StreamKey> = selection
        .outsiders
        .into_iter()
        .take(extra)
        .map(|(k, _)| k)
        .collect();
    margin.sort();
    (list, margin)
}

/// Sorted and deduplicated: the form a received list is kept in, whatever a peer sent.
pub(super) fn canonical(mut keys: Vec<StreamKey>) -> Vec<StreamKey> {
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, i: u64) -> StreamKey {
        StreamKey::new(s, i)
    }

    #[test]
    fn mesh_merge_ranks_by_importance_then_key() {
        let eligible = vec![
            (key("b", 1), -20.0),
            (key("a", 1), -20.0),
            (key("c", 1), -10.0),
            (key("c", 2), -50.0),
        ];
        let (list, margin) = merge_top_list(&[], &eligible, 2, 1, 3.0);
        assert_eq!(list, vec![key("a", 1), key("c", 1)]);
        assert_eq!(margin, vec![key("b", 1)]);
    }

    #[test]
    fn mesh_merge_has_hysteresis() {
        let prev = vec![key("a", 1)];
        let eligible = vec![(key("a", 1), -20.0), (key("b", 1), -18.0)];
        let (list, _) = merge_top_list(&prev, &eligible, 1, 0, 3.0);
        assert_eq!(list, vec![key("a", 1)], "2 dB louder is not enough");
        let eligible = vec![(key("a", 1), -20.0), (key("b", 1), -16.0)];
        let (list, _) = merge_top_list(&prev, &eligible, 1, 0, 3.0);
        assert_eq!(list, vec![key("b", 1)], "4 dB louder replaces");
    }

    #[test]
    fn mesh_merge_follows_the_local_ranking_rules() {
        // NaN and silence never make the list; a duplicate counts at its loudest entry.
        let eligible = vec![
            (key("a", 1), f32::NAN),
            (key("a", 2), -90.0),
            (key("b", 1), -40.0),
            (key("b", 1), -5.0),
            (key("c", 1), -20.0),
        ];
        let (list, margin) = merge_top_list(&[], &eligible, 1, 5, 3.0);
        assert_eq!(list, vec![key("b", 1)]);
        assert_eq!(margin, vec![key("c", 1)]);
    }

    #[test]
    fn mesh_merge_lets_a_listed_stream_rest_until_a_voice_needs_its_slot() {
        let prev = vec![key("a", 1), key("b", 1)];
        // b is present but not voice-active (the primary enters it at the wire's floor).
        let quiet = vec![(key("a", 1), -20.0), (key("b", 1), -127.0)];
        let (list, margin) = merge_top_list(&prev, &quiet, 2, 1, 3.0);
        assert_eq!(list, prev, "nobody needs b's slot");
        assert!(margin.is_empty(), "a resting stream is no margin");
        // Not listed before, a silent stream never gets a slot, even a free one.
        let (list, _) = merge_top_list(&[key("a", 1)], &quiet, 2, 1, 3.0);
        assert_eq!(list, vec![key("a", 1)]);
        // A quiet voice takes the resting slot without the hysteresis margin.
        let mut voiced = quiet.clone();
        voiced.push((key("c", 1), -55.0));
        let (list, _) = merge_top_list(&prev, &voiced, 2, 1, 3.0);
        assert_eq!(list, vec![key("a", 1), key("c", 1)]);
        // Gone from every report, a resting stream is gone from the list.
        let (list, _) = merge_top_list(&prev, &quiet[..1], 2, 1, 3.0);
        assert_eq!(list, vec![key("a", 1)]);
    }

    #[test]
    fn mesh_candidates_are_sanitised() {
        let c = sanitize_candidates(
            vec![
                Candidate {
                    stream: StreamId(1),
                    importance: f32::NAN,
                    voice: true,
                    identity: None,
                },
                Candidate {
                    stream: StreamId(2),
                    importance: 40.0,
                    voice: true,
                    identity: None,
                },
                Candidate {
                    stream: StreamId(2),
                    importance: -90.0,
                    voice: true,
                    identity: None,
                },
            ],
            8,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].stream, StreamId(2));
        assert_eq!(c[0].importance, 0.0);
        assert_eq!(c[1].importance, -127.0);
    }
}
