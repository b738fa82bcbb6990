//! Mesh scenarios on three in-process servers joined by the real QUIC mesh (loopback):
//! - mesh bytes per room as the room grows from 10 to 300 participants;
//! - convergence: how long until a new, loudest speaker is heard on all three servers.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{Percentiles, percentiles};
use crate::bot::{AudioSource, BotConfig, tone};
use crate::media_server::metric_sum;
use crate::mesh_cluster::MeshCluster;

const REGIONS: [&str; 3] = ["us", "eu", "ap"];

/// Mesh bytes per second at each room size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshBytes {
    /// (participants, bytes per second sent on the mesh by all servers for the room).
    pub rates: Vec<(usize, f64)>,
    /// Rate at the largest size over the rate at the smallest.
    pub ratio: f64,
}

fn mesh_out_bytes(cluster: &MeshCluster) -> f64 {
    (0..REGIONS.len())
        .map(|i| {
            metric_sum(
                &cluster.server(i).metrics(),
                "chorus_mesh_bytes_total",
                &["direction=\"out\""],
            )
        })
        .sum()
}

/// One room over three servers, 3 talkers (one per server), grown to each of `sizes`
/// participants (spread over the servers, listeners counting packets only).
pub async fn mesh_bytes(sizes: &[usize]) -> Result<MeshBytes> {
    let cluster = MeshCluster::start(&REGIONS, 3, |_, a| a).await?;
    let room = "bytes";
    let mut bots = Vec::new();
    for (i, hz) in [300.0, 500.0, 700.0].into_iter().enumerate() {
        let config = BotConfig::new(tone(hz, -20.0 - 2.0 * i as f64));
        bots.push(
            cluster
                .server(i)
                .join_bot(room, &format!("talker{i}"), config)
                .await?,
        );
    }
    let mut rates = Vec::new();
    for &size in sizes {
        while bots.len() < size {
            let n = bots.len();
            // Listeners count packets and send only DTX frames: 300 real WebRTC peers must fit
            // on the same 2 cores as three servers.
            let config = BotConfig::new(AudioSource::Silence)
                .counting_only()
                .with_dtx();
            bots.push(
                cluster
                    .server(n % 3)
                    .join_bot(room, &format!("listener{n}"), config)
                    .await?,
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (b0, t0) = (mesh_out_bytes(&cluster), Instant::now());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let rate = (mesh_out_bytes(&cluster) - b0) / t0.elapsed().as_secs_f64();
        eprintln!("mesh bytes: {size} participants: {rate:.0} B/s");
        rates.push((size, rate));
    }
    super::close_all(&bots).await;
    let ratio = match (rates.first(), rates.last()) {
        (Some((_, first)), Some((_, last))) if *first > 0.0 => last / first,
        _ => f64::NAN,
    };
    Ok(MeshBytes { rates, ratio })
}

/// Convergence times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Convergence {
    /// From the new speaker's first loud frame to the last server's listener hearing it, ms.
    pub heard_everywhere: Percentiles,
    /// Onsets not heard on some server within a second.
    pub missed: usize,
}

/// Three servers each with one talker (so the top 3 is full) and one listener; a new speaker,
/// louder than all, starts after silence on each server in turn. `rounds` onsets.
pub async fn convergence(rounds: usize) -> Result<Convergence> {
    let cluster = MeshCluster::start(&REGIONS, 3, |_, a| a).await?;
    let room = "converge";
    let mut talkers = Vec::new();
    let mut ears = Vec::new();
    let mut newcomers = Vec::new();
    for i in 0..REGIONS.len() {
        let server = cluster.server(i);
        let level = -26.0 - 3.0 * i as f64;
        let config = BotConfig::new(tone(300.0 + 200.0 * i as f64, level));
        talkers.push(server.join_bot(room, &format!("talker{i}"), config).await?);
        let ear = BotConfig::new(AudioSource::Silence);
        ears.push(server.join_bot(room, &format!("ear{i}"), ear).await?);
        let quiet = BotConfig::new(AudioSource::Silence);
        newcomers.push(
            server
                .join_bot(room, &format!("newcomer{i}"), quiet)
                .await?,
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    const NEW_HZ: f64 = 1500.0;
    let mut samples = Vec::new();
    let mut missed = 0;
    for round in 0..rounds {
        let speaker = &newcomers[round % newcomers.len()];
        let asked = Instant::now();
        speaker.set_source(&tone(NEW_HZ, -14.0))?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let sent = speaker.onset_sent().filter(|t| *t >= asked);
        speaker.set_source(&AudioSource::Silence)?;
        let Some(sent) = sent else {
            missed += 1;
            continue;
        };
        let heard: Option<Vec<Instant>> = ears
            .iter()
            .map(|ear| ear.first_arrival_of(NEW_HZ, -50.0, sent))
            .collect();
        match heard.and_then(|h| h.into_iter().max()) {
            Some(last) => samples.push(last.duration_since(sent).as_secs_f64() * 1000.0),
            None => missed += 1,
        }
        // Long enough for the newcomer to leave the top list again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    super::close_all(&talkers).await;
    super::close_all(&ears).await;
    super::close_all(&newcomers).await;
    Ok(Convergence {
        heard_everywhere: percentiles(&samples),
        missed,
    })
}
