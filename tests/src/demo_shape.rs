//! `make demo`'s shape on in-process servers, shared by the mesh tests (`tests/tests/mesh.rs`,
//! which assert on it) and the benchmark (`bench::list_stability`, which reports it as figures):
//! five servers in the demo's regions, the demo's three espeak-ng talkers, and the newcomer whose
//! burst shows how much of a new speaker's start every server hears.
//!
//! What is observed comes from outside the servers: who each server names as speaking (its room
//! API), the global-list and tick counters (its metrics), and tones in the audio a bot decoded.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use chorus_operator::local::bots;

use crate::bot::{AudioSource, Bot, BotConfig, espeak_wav, tone_level, write_wav};
use crate::media_server::metric;
use crate::mesh_cluster::MeshCluster;

/// The demo's regions, in examples/conference.yaml's order: us-east ×2, eu-west ×2, ap-south ×1.
pub const DEMO_REGIONS: [&str; 5] = ["us-east", "us-east-b", "eu-west", "eu-west-b", "ap-south"];

/// How many talkers the demo runs (`BOTS`' default): as many as the global list has slots.
pub const DEMO_TALKERS: usize = 3;

/// The demo's three talkers (`make demo`'s espeak-ng bots, with their sentences, voices, levels
/// and placement: bot j on the first server of region j % 3), in `room`, talking into `dir`'s
/// recordings.
pub async fn demo_talkers(cluster: &MeshCluster, room: &str, dir: &Path) -> Result<Vec<Bot>> {
    std::fs::create_dir_all(dir)?;
    let talker_server = [0usize, 2, 4];
    let mut talkers = Vec::new();
    for (j, &server) in talker_server.iter().enumerate() {
        let wav = dir.join(format!("bot-{j}.wav"));
        espeak_wav(&bots::sentence(j), bots::voice(j), &wav)?;
        let bot = cluster
            .server(server)
            .join_bot(
                room,
                &bots::identity(j),
                BotConfig::new(AudioSource::Wav(wav)),
            )
            .await?;
        // As chorus-bot does with --level-dbfs: a gain on the recording.
        bot.set_level_dbfs(bots::level_dbfs(j) as f64);
        talkers.push(bot);
    }
    Ok(talkers)
}

/// The identities of [`demo_talkers`]: what every server names once all three have spoken.
pub fn demo_talker_names() -> BTreeSet<String> {
    (0..DEMO_TALKERS).map(bots::identity).collect()
}

/// The speakers server `i`'s participants in `room` are told about: its own listed talkers and
/// the remote ones the global list names.
pub async fn named(cluster: &MeshCluster, room: &str, i: usize) -> Result<BTreeSet<String>> {
    let info = cluster.server(i).room_info(room, "observer").await?;
    let mut names: BTreeSet<String> = info["remote_speakers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["identity"].as_str().map(str::to_owned))
        .collect();
    let active: Vec<u64> = info["active_speakers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    for p in info["participants"].as_array().into_iter().flatten() {
        if p["id"].as_u64().is_some_and(|id| active.contains(&id)) {
            names.extend(p["identity"].as_str().map(str::to_owned));
        }
    }
    Ok(names)
}

/// Waits (20 s at most) until every one of the demo's servers names exactly `all` in `room`.
pub async fn until_all_named(
    cluster: &MeshCluster,
    room: &str,
    all: &BTreeSet<String>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ok = true;
        for i in 0..DEMO_REGIONS.len() {
            ok &= named(cluster, room, i).await? == *all;
        }
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the speakers {all:?} are never all listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// New global lists emitted so far by the first `servers` servers together.
pub fn list_changes(cluster: &MeshCluster, servers: usize) -> f64 {
    (0..servers)
        .map(|i| {
            metric(
                &cluster.server(i).metrics(),
                "chorus_mesh_global_list_changes_total",
            )
            .unwrap_or(0.0)
        })
        .sum()
}

/// The ticks `room`'s primary counted, and of those the consistent ones (every server mixed the
/// same list on that tick).
pub fn primary_ticks(cluster: &MeshCluster, room: &str) -> (f64, f64) {
    let text = cluster.server(cluster.primary_of(room)).metrics();
    (
        metric(&text, "chorus_mesh_ticks_total").unwrap_or(0.0),
        metric(&text, "chorus_mesh_consistent_ticks_total").unwrap_or(0.0),
    )
}

/// The newcomer's distinctive onset: its first [`ONSET_MS`] at one tone, the next [`FOLLOW_MS`]
/// at another, so a listener can tell which part of its start arrived.
pub const ONSET_HZ: f64 = 3100.0;
/// The tone after the onset.
pub const FOLLOW_HZ: f64 = 4300.0;
/// Length of the onset tone, ms.
pub const ONSET_MS: usize = 100;
/// Length of the follow-on tone, ms.
pub const FOLLOW_MS: usize = 200;
/// Level of both tones: louder than every demo talker, so the newcomer takes a slot.
pub const ONSET_DBFS: f64 = -12.0;
/// Windows in which tones are counted: 10 ms, so a tone is resolved to 100 Hz. A whole 100 ms
/// tone fills 10 or 11 of them; one 20 ms frame lost leaves at most 9.
const WINDOW: usize = 480;

/// How many ms of `hz` (above -30 dBFS, in 10 ms windows) are in `samples`.
pub fn tone_ms(samples: &[i16], hz: f64) -> usize {
    samples
        .chunks_exact(WINDOW)
        .filter(|w| tone_level(w, hz) > -30.0)
        .count()
        * 10
}

/// Writes the newcomer's burst to `path`: [`ONSET_MS`] of the onset tone, [`FOLLOW_MS`] of the
/// follow-on, then 3 s of silence (longer than a round, so the file's loop never plays twice).
pub fn write_newcomer_burst(path: &Path) -> Result<()> {
    let sine = |hz: f64, ms: usize| -> Vec<i16> {
        let amplitude = 32767.0 * 10f64.powf(ONSET_DBFS / 20.0);
        (0..ms * 48)
            .map(|n| {
                (amplitude * (2.0 * std::f64::consts::PI * hz * n as f64 / 48_000.0).sin()) as i16
            })
            .collect()
    };
    let mut burst = sine(ONSET_HZ, ONSET_MS);
    burst.extend(sine(FOLLOW_HZ, FOLLOW_MS));
    burst.extend(std::iter::repeat_n(0i16, 48 * 3000));
    write_wav(path, &burst)
}

/// What one ear heard of one newcomer's burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewcomerHeard {
    /// Ms of the onset tone heard from the moment the burst was started.
    pub onset_ms: usize,
    /// Ms of the follow-on tone heard from then.
    pub follow_ms: usize,
    /// Ms of the onset tone in the second before (anything but 0 would be a false positive).
    pub onset_before_ms: usize,
}

/// One newcomer round: a fresh silent participant `name` joins `room` on server `home`, stays
/// silent 1.5 s, plays the burst of `burst_wav` (see [`write_newcomer_burst`]) and 1.5 s later
/// goes silent and leaves. Returns what each of `ears` heard of it, in order. The caller waits
/// for the list to settle again before the next round.
pub async fn newcomer_round(
    cluster: &MeshCluster,
    room: &str,
    home: usize,
    name: &str,
    ears: &[Bot],
    burst_wav: &Path,
) -> Result<Vec<NewcomerHeard>> {
    let newcomer = cluster
        .server(home)
        .join_bot(room, name, BotConfig::new(AudioSource::Silence))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let marks: Vec<usize> = ears.iter().map(|e| e.received_samples().len()).collect();
    let before: Vec<usize> = ears
        .iter()
        .zip(&marks)
        .map(|(e, &m)| {
            let s = e.received_samples();
            tone_ms(&s[m.saturating_sub(48_000)..m], ONSET_HZ)
        })
        .collect();
    newcomer.set_source(&AudioSource::Wav(burst_wav.to_path_buf()))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    newcomer.set_source(&AudioSource::Silence)?;
    let heard = ears
        .iter()
        .zip(&marks)
        .zip(before)
        .map(|((ear, &m), onset_before_ms)| {
            let s = ear.received_samples();
            let after = &s[m..];
            NewcomerHeard {
                onset_ms: tone_ms(after, ONSET_HZ),
                follow_ms: tone_ms(after, FOLLOW_HZ),
                onset_before_ms,
            }
        })
        .collect();
    newcomer.close().await;
    Ok(heard)
}
