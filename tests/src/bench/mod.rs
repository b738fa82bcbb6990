//! The benchmark harness (run by `make bench` through `chorus-bench`; a one-iteration smoke run is
//! part of `make test` so it cannot rot). Timing is measured here and reported, never asserted.
//!
//! The scenarios live in submodules ([`delay`], [`capacity`], [`codec_work`], [`mesh`],
//! [`list_stability`], [`telephony`], [`transfer`]) and the
//! cross-server one here; [`harness`] runs them all and [`report`] writes `BENCHMARKS.md`.
//!
//! Mouth-to-ear delay is measured between bots in one process, so one clock serves both ends: the
//! speaker records when it sent a silence-to-sound onset, each listener records when the first
//! packet carrying that tone arrived. The bots add no jitter buffer, so what remains is the network
//! (loopback, plus any emulated link) and the servers.

pub mod capacity;
pub mod codec_work;
pub mod delay;
pub mod harness;
pub mod instructions;
pub mod list_stability;
pub mod listeners;
pub mod mesh;
pub mod report;
pub mod telephony;
pub mod transfer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::bot::{AudioSource, Bot, BotConfig};
use crate::link::{LinkKnobs, relay, relay_addresses};
use crate::media_server::MediaServer;
use crate::mesh_cluster::MeshCluster;

/// Closes every bot of a finished scenario, so none keeps running into the next one.
pub async fn close_all<'a>(bots: impl IntoIterator<Item = &'a Bot>) {
    for bot in bots {
        bot.close().await;
    }
}

/// p50 and p99 of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile (the maximum for fewer than 100 samples).
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

/// The finite `values`, sorted, and their nearest-rank quantile function (NaN when empty).
pub fn nearest_rank(values: &[f64]) -> (Vec<f64>, impl Fn(&[f64], f64) -> f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    (v, at)
}

/// Percentiles of `values` (nearest rank).
pub fn percentiles(values: &[f64]) -> Percentiles {
    let (v, at) = nearest_rank(values);
    Percentiles {
        p50: at(&v, 0.5),
        p99: at(&v, 0.99),
        n: v.len(),
    }
}

/// One cross-server measurement: the same onsets heard on the speaker's server and across a link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrossServer {
    /// Emulated one-way link delay between the servers, ms.
    pub link_ms: u32,
    /// Mouth-to-ear through one server, ms.
    pub single_server: Percentiles,
    /// Mouth-to-ear through two servers and the link, ms.
    pub cross_server: Percentiles,
    /// Per onset: cross − single − link, ms (what the second server and the mesh add).
    pub extra: Percentiles,
    /// Onsets sent.
    pub rounds: usize,
}

async fn join(server: &MediaServer, room: &str, who: &str, source: AudioSource) -> Result<Bot> {
    server.join_bot(room, who, BotConfig::new(source)).await
}

/// How a measured onset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onset {
    /// The speaker keeps talking and switches tone: it stays on the top list, so this measures
    /// the audio path alone.
    ToneChange,
    /// The speaker starts after silence: this adds what it takes to (re)enter the top list.
    AfterSilence,
}

/// Measure onsets of `hz` from `speaker` at each listener, `rounds` times.
async fn onsets(
    speaker: &Bot,
    listeners: &[&Bot],
    hz: f64,
    onset: Onset,
    rounds: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut delays = vec![Vec::new(); listeners.len()];
    let before = match onset {
        // A carrier far from `hz`, at the same level, so the speaker stays selected.
        Onset::ToneChange => AudioSource::Tone {
            hz: hz * 0.5,
            level_dbfs: -20.0,
        },
        Onset::AfterSilence => AudioSource::Silence,
    };
    for _ in 0..rounds {
        speaker.set_source(&before)?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let asked = Instant::now();
        speaker.set_source(&AudioSource::Tone {
            hz,
            level_dbfs: -20.0,
        })?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(sent) = speaker.onset_sent().filter(|t| *t >= asked) else {
            continue;
        };
        for (i, l) in listeners.iter().enumerate() {
            if let Some(arrived) = l.first_arrival_of(hz, -50.0, sent) {
                delays[i].push(arrived.duration_since(sent).as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(delays)
}

/// Two servers joined by an emulated link of `link_ms` one way; a speaker on the first, a listener
/// on each. Every onset is measured on both paths at once.
pub async fn cross_server(link_ms: u32, rounds: usize) -> Result<CrossServer> {
    let knobs = Arc::new(LinkKnobs::default());
    knobs.delay_us.store(link_ms * 1000, Ordering::Relaxed);
    let relays = relay_addresses(2)?;
    let advertised = relays.clone();
    let cluster = MeshCluster::start(&["near", "far"], 3, move |i, _| advertised[i]).await?;
    for (i, addr) in relays.iter().enumerate() {
        relay(*addr, cluster.slots[i].mesh_bind, knobs.clone(), None).await?;
    }
    let room = "bench";
    let speaker = join(cluster.server(0), room, "speaker", AudioSource::Silence).await?;
    let near = join(cluster.server(0), room, "near", AudioSource::Silence).await?;
    let far = join(cluster.server(1), room, "far", AudioSource::Silence).await?;
    // Let the mesh connect and the jitter buffers settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = onsets(&speaker, &[&near, &far], 880.0, Onset::ToneChange, rounds).await?;
    for bot in [&speaker, &near, &far] {
        bot.close().await;
    }
    let extra: Vec<f64> = d[0]
        .iter()
        .zip(&d[1])
        .map(|(single, cross)| cross - single - f64::from(link_ms))
        .collect();
    Ok(CrossServer {
        link_ms,
        single_server: percentiles(&d[0]),
        cross_server: percentiles(&d[1]),
        extra: percentiles(&extra),
        rounds,
    })
}
