//! Codec work per mixing tick as a room grows: the room's mixer (the media core every server
//! runs) with 3 talkers and N−3 silent participants, in virtual time, with real libopus.
//!
//! Silent participants still send (RFC 6464 level 127 and an Opus silence frame), as browsers do,
//! so every stream goes through its jitter buffer and the ranking; only what the mixer decides to
//! decode and encode is counted. The wall time per tick is reported too: it is the CPU the mixing
//! itself costs, apart from SRTP and sockets.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use chorus_mediaserver::media::codec::Encoder;
use chorus_mediaserver::media::level::dbov_from_pcm;
use chorus_mediaserver::media::spectrum::ToneGenerator;
use chorus_mediaserver::media::{
    AudioLevel, InboundPacket, MixerConfig, RoomMixer, StreamId, StreamOrigin,
};
use serde::{Deserialize, Serialize};

/// Codec work at one room size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodecWork {
    /// Participants in the room.
    pub participants: usize,
    /// Opus encodes per tick (mean over the measured ticks).
    pub encodes_per_tick: f64,
    /// Opus decoder calls per tick (decodes, FEC, concealment).
    pub decodes_per_tick: f64,
    /// Mixer wall time per tick, µs (mean).
    pub tick_us: f64,
}

const FRAME_MS: u32 = 20;
/// Ticks before measuring (jitter buffers start, ranking settles) and measured.
const WARMUP_TICKS: u64 = 100;
const MEASURED_TICKS: u64 = 250;

/// Runs a room of `participants` (3 of them talking) and counts the mixer's codec work.
pub fn measure(participants: usize) -> Result<CodecWork> {
    let cfg = MixerConfig {
        frame_ms: FRAME_MS,
        ..MixerConfig::default()
    };
    let mut mixer = RoomMixer::new(cfg).map_err(|e| anyhow!("{e}"))?;
    let mut talkers = Vec::new();
    for (i, hz) in [300.0, 500.0, 700.0].into_iter().enumerate() {
        let id = StreamId(i as u64 + 1);
        mixer.add_stream(id, StreamOrigin::Local);
        talkers.push((
            id,
            ToneGenerator::new(hz, -20.0 - 3.0 * i as f64, 48_000),
            Encoder::new(FRAME_MS).map_err(|e| anyhow!("{e}"))?,
        ));
    }
    let silent_ids: Vec<StreamId> = (talkers.len()..participants.max(talkers.len()))
        .map(|i| StreamId(i as u64 + 1))
        .collect();
    for id in &silent_ids {
        mixer.add_stream(*id, StreamOrigin::Local);
    }
    let silence: Bytes = Encoder::new(FRAME_MS)
        .and_then(|mut e| e.encode(&vec![0; e.frame_samples()]))
        .map_err(|e| anyhow!("{e}"))?;

    let (mut encodes, mut decodes, mut busy) = (0u64, 0u64, Duration::ZERO);
    for tick in 0..WARMUP_TICKS + MEASURED_TICKS {
        let now = Duration::from_millis(tick * u64::from(FRAME_MS));
        let seq = tick as u16;
        let ts = (tick as u32).wrapping_mul(960);
        for (id, tone, encoder) in &mut talkers {
            let pcm = tone.frame(encoder.frame_samples());
            let payload = encoder.encode(&pcm).map_err(|e| anyhow!("{e}"))?;
            let dbov = (-dbov_from_pcm(&pcm)).round().clamp(0.0, 127.0) as u8;
            mixer
                .push(InboundPacket {
                    stream: *id,
                    seq,
                    rtp_timestamp: ts,
                    payload,
                    level: Some(AudioLevel { dbov, voice: true }),
                    arrival: now,
                })
                .map_err(|e| anyhow!("{e}"))?;
        }
        let started = Instant::now();
        for id in &silent_ids {
            mixer
                .push(InboundPacket {
                    stream: *id,
                    seq,
                    rtp_timestamp: ts,
                    payload: silence.clone(),
                    level: Some(AudioLevel {
                        dbov: 127,
                        voice: false,
                    }),
                    arrival: now,
                })
                .map_err(|e| anyhow!("{e}"))?;
        }
        // A frame waits out the jitter margin before the tick that plays it.
        let out = mixer.tick(now + Duration::from_millis(u64::from(FRAME_MS) / 2));
        if tick >= WARMUP_TICKS {
            busy += started.elapsed();
            encodes += u64::from(out.stats.encodes);
            decodes += u64::from(out.stats.decode_calls());
        }
    }
    let n = MEASURED_TICKS as f64;
    Ok(CodecWork {
        participants,
        encodes_per_tick: encodes as f64 / n,
        decodes_per_tick: decodes as f64 / n,
        tick_us: busy.as_secs_f64() * 1e6 / n,
    })
}
