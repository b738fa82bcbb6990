//! List stability and new speakers in `make demo`'s shape ([`crate::demo_shape`]): five
//! in-process servers in the demo's regions, the demo's three espeak-ng talkers, a silent ear on
//! every server. What `tests/tests/mesh.rs` asserts there, reported as figures:
//!
//! - **steady**: over a fixed window with the three talkers holding the three slots, how often a
//!   server emitted a new global list (per minute), and the share of the primary's ticks on which
//!   every server mixed the same list;
//! - **newcomers**: a fresh participant on each server in turn plays a burst (100 ms of one tone,
//!   then 200 ms of another) after silence; per ear, how much of the burst's first 250 ms it
//!   heard, and the list changes and consistency through those rounds.
//!
//! Measured, never asserted.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::nearest_rank;
use crate::bot::{AudioSource, Bot, BotConfig};
use crate::demo_shape::{
    DEMO_REGIONS, FOLLOW_MS, ONSET_MS, demo_talker_names, demo_talkers, list_changes,
    newcomer_round, primary_ticks, until_all_named, write_newcomer_burst,
};
use crate::mesh_cluster::MeshCluster;

const ROOM: &str = "townhall";
/// The start of a new speaker that is counted: the whole onset tone and the follow-on's first
/// 150 ms. What a listener misses of it is a clipped first syllable.
pub const ONSET_WINDOW_MS: usize = 250;
// The window ends inside the burst, so a whole window is there to be heard.
const _: () = assert!(ONSET_MS < ONSET_WINDOW_MS && ONSET_WINDOW_MS <= ONSET_MS + FOLLOW_MS);

/// The newcomers' start as the ears received it, ms out of [`ONSET_WINDOW_MS`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct OnsetFigures {
    /// Median over every (round, ear).
    pub p50: f64,
    /// The worst (round, ear).
    pub min: f64,
    /// Samples: rounds × ears.
    pub n: usize,
}

/// What the list-stability scenario measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListStability {
    /// Share of the primary's ticks, over the steady window, on which every server mixed the
    /// same list.
    pub consistency: f64,
    /// The primary's ticks over the steady window.
    pub ticks: f64,
    /// New global lists per minute, all servers together, over the steady window.
    pub list_changes_per_minute_three_talkers: f64,
    /// Length of the steady window, s.
    pub seconds: f64,
    /// Per (round, ear): ms received of the newcomer's first [`ONSET_WINDOW_MS`] (onset tone
    /// capped at its 100 ms, follow-on capped at 150 ms).
    pub onset_received_ms: Vec<f64>,
    /// Summary of `onset_received_ms`.
    pub onset_received: OnsetFigures,
    /// Share of the primary's ticks through the newcomer rounds on which every server mixed the
    /// same list.
    pub consistency_with_newcomers: f64,
    /// New global lists through the newcomer rounds, all servers together (each newcomer makes
    /// at least two: in, and out).
    pub newcomer_list_changes: f64,
}

/// Median, minimum and count of `values`.
fn onset_figures(values: &[f64]) -> OnsetFigures {
    let (v, at) = nearest_rank(values);
    OnsetFigures {
        p50: at(&v, 0.5),
        min: v.first().copied().unwrap_or(f64::NAN),
        n: v.len(),
    }
}

/// The demo's shape: `plan_seconds` of the three talkers alone, then `rounds` newcomer rounds
/// (the newcomer's server rotating over the five).
pub async fn measure(plan_seconds: u64, rounds: usize) -> Result<ListStability> {
    let dir = std::env::temp_dir().join(format!(
        "chorus-bench-list-stability-{}",
        std::process::id()
    ));
    let result = measure_in(&dir, plan_seconds, rounds).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// [`measure`], with the talkers' recordings and the burst in `dir`.
async fn measure_in(dir: &Path, plan_seconds: u64, rounds: usize) -> Result<ListStability> {
    let cluster = MeshCluster::start(&DEMO_REGIONS, 3, |_, a| a).await?;
    let talkers = demo_talkers(&cluster, ROOM, dir).await?;
    let mut ears = Vec::new();
    for i in 0..DEMO_REGIONS.len() {
        let ear = BotConfig::new(AudioSource::Silence);
        ears.push(
            cluster
                .server(i)
                .join_bot(ROOM, &format!("ear-{i}"), ear)
                .await?,
        );
    }
    let all = demo_talker_names();
    let result = rounds_of(&cluster, dir, &ears, &all, plan_seconds, rounds).await;
    super::close_all(&talkers).await;
    super::close_all(&ears).await;
    result
}

/// The steady window, then the newcomer rounds, on a running demo shape.
async fn rounds_of(
    cluster: &MeshCluster,
    dir: &Path,
    ears: &[Bot],
    all: &BTreeSet<String>,
    plan_seconds: u64,
    rounds: usize,
) -> Result<ListStability> {
    // Warm-up: every talker has spoken and every server names all three.
    until_all_named(cluster, ROOM, all).await?;
    let changes = || list_changes(cluster, DEMO_REGIONS.len());
    let ticks = || primary_ticks(cluster, ROOM);

    let (changes0, (ticks0, consistent0)) = (changes(), ticks());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(plan_seconds)).await;
    let seconds = started.elapsed().as_secs_f64();
    let (ticks1, consistent1) = ticks();
    let steady_changes = changes() - changes0;
    let steady_ticks = ticks1 - ticks0;
    let consistency = (consistent1 - consistent0) / steady_ticks;
    eprintln!(
        "list stability: {steady_changes} list changes in {seconds:.1} s, consistency {consistency:.4} over {steady_ticks} ticks"
    );

    let wav = dir.join("newcomer.wav");
    write_newcomer_burst(&wav)?;
    let (changes0, (ticks0, consistent0)) = (changes(), ticks());
    let mut received = Vec::new();
    for round in 0..rounds {
        let home = round % DEMO_REGIONS.len();
        let name = format!("newcomer-{round}");
        let heard = newcomer_round(cluster, ROOM, home, &name, ears, &wav).await?;
        let got: Vec<f64> = heard
            .iter()
            .map(|h| {
                (h.onset_ms.min(ONSET_MS) + h.follow_ms.min(ONSET_WINDOW_MS - ONSET_MS)) as f64
            })
            .collect();
        eprintln!("list stability: newcomer {round} on server {home}: ears received {got:?} ms");
        received.extend(got);
        // Its slot is freed and a talker takes it back before the next round.
        until_all_named(cluster, ROOM, all).await?;
    }
    let (ticks1, consistent1) = ticks();
    let newcomer_list_changes = changes() - changes0;
    let consistency_with_newcomers = (consistent1 - consistent0) / (ticks1 - ticks0);
    Ok(ListStability {
        consistency,
        ticks: steady_ticks,
        list_changes_per_minute_three_talkers: steady_changes * 60.0 / seconds,
        seconds,
        onset_received: onset_figures(&received),
        onset_received_ms: received,
        consistency_with_newcomers,
        newcomer_list_changes,
    })
}
