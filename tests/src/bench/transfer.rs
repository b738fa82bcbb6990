//! Session transfer (DESIGN §12) in `make bench`: a speaker moves from device to device, again
//! and again, while a listener on the same server listens. Each move is a real redemption by a
//! new WebRTC bot (ICE, DTLS, SRTP), alternating tones so the listener can tell the devices apart.
//!
//! Per move:
//! - **switch**: from the redemption request to the first packet at the listener carrying the new
//!   device's tone (what the user experiences: scan, connect, heard);
//! - **audio gap**: in the listener's decoded audio, the silence between the last block of the old
//!   device's tone and the first block of the new one's (0 when they meet).
//!
//! Timing is reported, never asserted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{Percentiles, percentiles};
use crate::bot::{AudioSource, Bot, BotConfig, FRAME_SAMPLES, SAMPLE_RATE, tone};
use crate::call_me::participant_id;
use crate::media_server::MediaServer;
use crate::transfer::{code_of, issue_code, redeem_bot};
use chorus_mediaserver::media::spectrum::tone_level_dbfs;
use chorus_mediaserver::transfer::ISSUE_LIMIT;

/// A tone block above this is heard (the tones are sent at -20 dBFS).
const PRESENT_DBFS: f64 = -40.0;
const ROOM: &str = "transfer";

/// What the transfer scenario measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferFigures {
    /// Redemption request to the new device heard by the listener, ms.
    pub switch_ms: Percentiles,
    /// The listener's audio gap between the two devices, ms.
    pub audio_gap_ms: Percentiles,
    /// Moves measured.
    pub moves: usize,
    /// Moves whose new tone the listener never heard (counted, not measured).
    pub failed: usize,
}

/// The audio gap in `samples` (the listener's decoded audio since `from`) between the last block
/// of `old_hz` and the first of `new_hz`, ms; `None` when the new tone never shows.
fn gap_ms(samples: &[i16], old_hz: f64, new_hz: f64) -> Option<f64> {
    let blocks: Vec<(bool, bool)> = samples
        .chunks_exact(FRAME_SAMPLES)
        .map(|b| {
            (
                tone_level_dbfs(b, old_hz, SAMPLE_RATE) > PRESENT_DBFS,
                tone_level_dbfs(b, new_hz, SAMPLE_RATE) > PRESENT_DBFS,
            )
        })
        .collect();
    let first_new = blocks.iter().position(|b| b.1)?;
    let last_old = blocks[..first_new].iter().rposition(|b| b.0)?;
    Some(((first_new - last_old - 1) * 20) as f64)
}

/// `moves` transfers on one in-process server. A participant may have at most
/// [`ISSUE_LIMIT`] codes a minute, so a fresh mover takes over after every that many moves.
pub async fn measure(moves: usize) -> Result<TransferFigures> {
    let server = MediaServer::start(|_| {}).await?;
    let http = reqwest::Client::new();
    let tones = [440.0, 660.0];
    let listener = server
        .join_bot(ROOM, "listener", BotConfig::new(AudioSource::Silence))
        .await?;
    let (mut switches, mut gaps, mut failed) = (Vec::new(), Vec::new(), 0);
    let mut done = 0;
    let mut mover = 0;
    while done < moves {
        let identity = format!("mover{mover}");
        mover += 1;
        let mut device: Bot = server
            .join_bot(ROOM, &identity, BotConfig::new(tone(tones[0], -20.0)))
            .await?;
        let id = participant_id(&device)?;
        let mut token = server.token(ROOM, &identity);
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..ISSUE_LIMIT.min(moves - done) {
            let (old_hz, new_hz) = (tones[i % 2], tones[(i + 1) % 2]);
            let (status, _, issued) = issue_code(&http, &server.base_url, ROOM, id, &token).await?;
            anyhow::ensure!(status == 201, "issuing a code: {status} {issued}");
            let code = code_of(issued["url"].as_str().context("url")?)?;
            // A little before the move, so the old device's last blocks are in the window.
            let mark = listener
                .received_samples()
                .len()
                .saturating_sub(10 * FRAME_SAMPLES);
            let started = Instant::now();
            let (next, redeemed) =
                redeem_bot(&server.base_url, &code, BotConfig::new(tone(new_hz, -20.0))).await?;
            tokio::time::sleep(Duration::from_millis(700)).await;
            match listener.first_arrival_of(new_hz, PRESENT_DBFS, started) {
                Some(heard) => switches.push(heard.duration_since(started).as_secs_f64() * 1000.0),
                None => failed += 1,
            }
            let heard = listener.received_samples();
            if let Some(gap) = gap_ms(&heard[mark.min(heard.len())..], old_hz, new_hz) {
                gaps.push(gap);
            }
            device.close().await;
            device = next;
            token = redeemed.token;
            done += 1;
        }
        // The mover leaves before the next one speaks.
        let _ = http
            .delete(format!(
                "{}/v1/rooms/{ROOM}/participants/{id}",
                server.base_url
            ))
            .bearer_auth(&token)
            .send()
            .await;
        device.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    listener.close().await;
    Ok(TransferFigures {
        switch_ms: percentiles(&switches),
        audio_gap_ms: percentiles(&gaps),
        moves,
        failed,
    })
}
