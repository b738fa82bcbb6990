//! Property test of the one top-N selection shared by the local ranker and the mesh merge: over
//! random candidates (with NaN, silence, duplicates and ties), random previous selections and
//! shuffled input orders, the documented rules hold, the resting-insider rule included.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chorus_mediaserver::media::ranking::{Selection, select_top_n};
use proptest::prelude::*;

const SILENCE: f32 = -60.0;

/// Whole-dB levels make ties common; the continuous range covers the rest. Keys come from a small
/// range so duplicates are common too.
fn candidate() -> impl Strategy<Value = (u8, f32)> {
    let importance = prop_oneof![
        1 => Just(f32::NAN),
        4 => (-80i8..=0).prop_map(f32::from),
        4 => -80.0f32..0.0,
    ];
    (0u8..16, importance)
}

/// Candidates and previous selection, each also in a shuffled order, plus `top_n` and hysteresis.
type Case = (Vec<(u8, f32)>, Vec<(u8, f32)>, Vec<u8>, Vec<u8>, usize, f32);

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(candidate(), 0..24),
        prop::collection::vec(0u8..16, 0..8),
        0usize..6,
        prop_oneof![Just(0.0f32), Just(3.0f32), 0.0f32..10.0],
    )
        .prop_flat_map(|(candidates, previous, top_n, hysteresis)| {
            (
                Just(candidates.clone()),
                Just(candidates).prop_shuffle(),
                Just(previous.clone()),
                Just(previous).prop_shuffle(),
                Just(top_n),
                Just(hysteresis),
            )
        })
}

/// The reference eligible set: one entry per key at its loudest, NaN and silence dropped, loudest
/// first then lower key.
fn eligible(candidates: &[(u8, f32)]) -> Vec<(u8, f32)> {
    let mut best: Vec<(u8, f32)> = Vec::new();
    for &(key, importance) in candidates {
        if importance.is_nan() || importance < SILENCE {
            continue;
        }
        match best.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) if entry.1 < importance => entry.1 = importance,
            Some(_) => {}
            None => best.push((key, importance)),
        }
    }
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best
}

/// The reference resting set: previously selected keys present among the candidates with no
/// eligible entry (every entry silent or NaN), in key order.
fn resting(candidates: &[(u8, f32)], previous: &[u8]) -> Vec<u8> {
    let eligible = eligible(candidates);
    let mut keys: Vec<u8> = candidates
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| previous.contains(k) && !eligible.iter().any(|(e, _)| e == k))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn select_top_n_holds_its_rules(
        (candidates, shuffled, previous, previous_shuffled, top_n, hysteresis) in case()
    ) {
        let got: Selection<u8> = select_top_n(&previous, &candidates, top_n, hysteresis, SILENCE);
        let want_eligible = eligible(&candidates);
        let selected: Vec<u8> = got.selected.iter().map(|(k, _)| *k).collect();

        let want_resting = resting(&candidates, &previous);
        // Bounded, and every free slot is filled: by eligible keys first, then by resting ones.
        let voiced = top_n.min(want_eligible.len());
        prop_assert_eq!(selected.len(), top_n.min(want_eligible.len() + want_resting.len()));
        // The resting insiders kept are exactly the first of the resting set (key order), after
        // every eligible selected key: a silent key never takes a slot a voice could have.
        let kept: Vec<u8> = selected[voiced..].to_vec();
        let first_resting: Vec<u8> =
            want_resting.iter().take(selected.len() - voiced).copied().collect();
        prop_assert_eq!(&kept, &first_resting);
        prop_assert!(kept.is_empty() || got.outsiders.is_empty(), "a key rests while a voice waits");
        // Eligible keys exactly once, at their loudest: no silent or NaN key, no duplicate.
        let mut all: Vec<(u8, f32)> = got.selected[..voiced]
            .iter()
            .chain(&got.outsiders)
            .copied()
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        prop_assert_eq!(&all, &want_eligible);

        // The order of the inputs does not matter.
        let again = select_top_n(&previous_shuffled, &shuffled, top_n, hysteresis, SILENCE);
        prop_assert_eq!(&again, &got);

        // A selected key quieter than the best outsider is only there by hysteresis: it was
        // selected before and the outsider does not beat it by more than the margin.
        if let Some(&(outsider, loudest)) = got.outsiders.first() {
            for &(key, importance) in &got.selected {
                if loudest > importance {
                    prop_assert!(
                        previous.contains(&key) && loudest <= importance + hysteresis,
                        "{key} at {importance} kept against {outsider} at {loudest}"
                    );
                }
            }
        }

        // And the converse: a previously selected key loses its slot only to a key louder by
        // more than the margin, or to more louder previously selected keys than there are slots.
        for &(key, importance) in got.outsiders.iter().filter(|(k, _)| previous.contains(k)) {
            let beaten = got.selected.iter().any(|&(_, s)| s > importance + hysteresis);
            let crowded = want_eligible
                .iter()
                .take_while(|(k, _)| *k != key)
                .filter(|(k, _)| previous.contains(k))
                .count()
                >= top_n;
            prop_assert!(beaten || crowded, "{key} at {importance} lost its slot needlessly");
        }

        // Without a previous selection it is exactly the loudest N, ties by key.
        let fresh = select_top_n(&[], &shuffled, top_n, hysteresis, SILENCE);
        let loudest: Vec<(u8, f32)> = want_eligible.iter().take(top_n).copied().collect();
        prop_assert_eq!(&fresh.selected, &loudest);
    }
}
