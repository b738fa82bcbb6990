//! Server-added delay through one server, Chorus and Janus AudioBridge alike, under the same load:
//! one room of 20 participants, 3 of them talking.
//!
//! Each talker hums a low carrier and now and then switches to a high probe tone at the same level
//! (it stays a top speaker; only the audio path is measured). A listener finds the probe's first
//! sample in what it decoded and when that sample reached it ([`Bot::onset_heard`]). Mouth-to-ear
//! is that time minus when the talker sent the probe's first frame; what the bots add (their
//! encoder's look-ahead and the detector's bias) is measured by running the same switch through
//! the bots' codec with no network ([`codec_onset_offset`]) and subtracted. What remains is the
//! server: its jitter buffer, its wait for the next mixing tick, its decode, mix and encode, and
//! two loopback hops.
//!
//! The mixing tick's phase against each talker's packets is fixed for as long as both run, so one
//! room gives one phase per talker. Several rooms, each with fresh bots, sample the phases. The
//! talkers send on one shared grid ([`BotConfig::with_send_clock`]) at phases that cover the
//! geometries of three independent talkers evenly, on a randomly shifted lattice
//! ([`lattice_phases`]): bots joined one after another otherwise take phases set by how long each
//! join took, which on loopback spaced the three talkers about 5 ms apart in every room (one
//! geometry, not a sample of them); and independent random phases in 8 rooms made p50 move by
//! ±2 ms between runs, set by which few geometries were drawn. Many rooms with few onsets each
//! sample the geometries; each onset of one talker in one room measures the same one.
//!
//! The physical floor: a server that mixes on a fixed 20 ms tick waits for the next tick after a
//! frame arrives, uniformly 0–20 ms, and its encoder's look-ahead delays the onset once more. The
//! look-ahead is measured like the bots' (one more encode/decode pass through the codec).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{Percentiles, percentiles};
use crate::bot::{
    AudioSource, Bot, BotConfig, codec_onset_offset, codec_onset_offset_through, tone,
};

/// Participants in the delay room.
pub const PARTICIPANTS: usize = 20;
/// Of whom talk.
pub const TALKERS: usize = 3;
/// Each talker's carrier and probe, Hz: far apart, so a probe is never mistaken for a carrier.
const CARRIERS_HZ: [f64; TALKERS] = [220.0, 300.0, 380.0];
const PROBES_HZ: [f64; TALKERS] = [2400.0, 3000.0, 3600.0];
const LEVEL_DBFS: f64 = -20.0;

/// A room of a conference server the scenarios can fill: how a bot gets in.
pub trait Venue {
    /// A participant: a bot, maybe with the server's own handle on it.
    type Member: std::ops::Deref<Target = Bot>;

    /// Joins bot `who` to the room.
    fn join(
        &self,
        who: &str,
        config: BotConfig,
    ) -> impl std::future::Future<Output = Result<Self::Member>>;
}

/// The delay of one system, over all its rooms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelayResult {
    /// Server-added delay per measured onset, ms.
    pub server_added: Percentiles,
    /// The raw samples, ms.
    pub samples_ms: Vec<f64>,
    /// What the bots' codec adds, ms (subtracted already).
    pub bots_ms: f64,
    /// Onsets sent whose probe no listener reported.
    pub missed: usize,
    /// The same onsets at the room's last listener (the last to join, so the last of the shared
    /// frame's fan-out); the figures above are the first listener's. Absent from runs recorded
    /// before it was measured.
    #[serde(default)]
    pub last_listener: Option<Percentiles>,
    /// The raw samples at the last listener, in the order of `samples_ms` (room by room, round
    /// by round, talker by talker). Empty in older runs.
    #[serde(default)]
    pub last_samples_ms: Vec<f64>,
    /// The server's own view, for Chorus (`chorus_server_delay_seconds`: every packet from its
    /// arrival to the first packet sent carrying its audio, no codec look-ahead): packets
    /// counted, and the share of them above [`SERVER_TAIL_MS`]. It tells a hiccup in the server
    /// from one in the bots or the kernel. Absent for Janus and from older runs.
    #[serde(default)]
    pub server_own: Option<ServerOwnDelay>,
}

/// Where the server's own tail starts: a 20 ms room waits at most a frame plus its margin.
pub const SERVER_TAIL_MS: f64 = 25.0;

/// [`DelayResult::server_own`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerOwnDelay {
    /// Packets the server timed.
    pub packets: f64,
    /// Of those, the share above [`SERVER_TAIL_MS`].
    pub share_over_tail: f64,
    /// Its jitter buffers' changes of delay by kind (`chorus_jitter_adjustments_total`: late,
    /// underrun, restart, stretch, unstretch, shed) over all its rooms. Absent from older runs.
    #[serde(default)]
    pub jitter_adjustments: BTreeMap<String, f64>,
}

impl ServerOwnDelay {
    /// From a server's `/metrics` text; `None` if it timed no packet.
    pub fn from_metrics(text: &str) -> Option<ServerOwnDelay> {
        use crate::media_server::metric_sum;
        let packets = metric_sum(text, "chorus_server_delay_seconds_count", &[]);
        let le = format!("le=\"{}\"", SERVER_TAIL_MS / 1000.0);
        let within = metric_sum(text, "chorus_server_delay_seconds_bucket", &[&le]);
        let jitter_adjustments = chorus_mediaserver::media::JitterAdjustments::KINDS
            .iter()
            .map(|kind| {
                let label = format!("kind=\"{kind}\"");
                let n = metric_sum(text, "chorus_jitter_adjustments_total", &[&label]);
                ((*kind).to_owned(), n)
            })
            .collect();
        (packets > 0.0).then(|| ServerOwnDelay {
            packets,
            share_over_tail: (packets - within) / packets,
            jitter_adjustments,
        })
    }
}

fn carrier(i: usize) -> AudioSource {
    tone(CARRIERS_HZ[i], LEVEL_DBFS)
}

fn probe(i: usize) -> AudioSource {
    tone(PROBES_HZ[i], LEVEL_DBFS)
}

/// What the bots add for talker `i`'s probe, ms. Computed once per talker and kept: it runs
/// libopus over 35 frames, a few milliseconds of CPU on a runtime thread. Run just before each
/// probe, as it once was, it could hold back the talker's own sending task on that thread, so
/// that the very packet carrying the onset reached the server late (an underrun: a whole frame
/// more, at that onset alone).
fn bots_offset_ms(i: usize) -> Result<f64> {
    static OFFSETS: OnceLock<Result<[f64; TALKERS], String>> = OnceLock::new();
    let offsets = OFFSETS.get_or_init(|| {
        let mut offsets = [0.0; TALKERS];
        for (k, offset) in offsets.iter_mut().enumerate() {
            *offset = codec_onset_offset(&carrier(k), &probe(k), PROBES_HZ[k])
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(offsets)
    });
    match offsets {
        Ok(offsets) => offsets
            .get(i)
            .copied()
            .with_context(|| format!("no talker {i}: the bench has {TALKERS}")),
        Err(e) => Err(anyhow::anyhow!("the bots' codec offset: {e}")),
    }
}

/// The floor's codec part: how much later one more Opus encode/decode pass (a mixing server's)
/// puts the onset, ms.
pub fn server_codec_lookahead_ms() -> Result<f64> {
    let once = bots_offset_ms(0)?;
    let twice = codec_onset_offset_through(&carrier(0), &probe(0), PROBES_HZ[0], 2)?;
    Ok(twice - once)
}

/// The floor of server-added delay as (p50, p99), ms: the wait for a fixed 20 ms tick (uniform)
/// plus one more codec pass's look-ahead.
pub fn floor_ms(lookahead_ms: f64) -> (f64, f64) {
    (10.0 + lookahead_ms, 19.8 + lookahead_ms)
}

/// Joins the talkers, each humming its carrier, at random send phases.
pub async fn join_talkers<V: Venue>(venue: &V) -> Result<Vec<V::Member>> {
    join_talkers_with(venue, |_, config| {
        config.with_send_phase(Duration::from_micros(rand::random_range(0..20_000)))
    })
    .await
}

/// Joins the talkers, each humming its carrier, on one send grid at `phases`.
pub async fn join_talkers_at<V: Venue>(
    venue: &V,
    phases: [Duration; TALKERS],
) -> Result<Vec<V::Member>> {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    join_talkers_with(venue, |i, config| config.with_send_clock(epoch, phases[i])).await
}

async fn join_talkers_with<V: Venue>(
    venue: &V,
    clock: impl Fn(usize, BotConfig) -> BotConfig,
) -> Result<Vec<V::Member>> {
    // The bots' offsets are computed before anyone talks (see `bots_offset_ms`).
    bots_offset_ms(0)?;
    let mut talkers = Vec::new();
    for i in 0..TALKERS {
        let config = clock(i, BotConfig::new(carrier(i)));
        talkers.push(venue.join(&format!("talker-{i}"), config).await?);
    }
    Ok(talkers)
}

/// The talkers' send phases in room `k` of `rooms`: talker 0 at 0, talkers 1 and 2 at `(Δ1, Δ2)`
/// on a rank-1 lattice over the 20 ms square (the first coordinate evenly spaced, the second by
/// the golden ratio), moved by `shift` (each a fraction of the frame, drawn once per system and
/// run). Three independent talkers' phases differ by two independent uniform offsets; the
/// lattice covers those geometries evenly, and the random shift keeps the estimate unbiased.
/// With 8 rooms at random phases a run's p50 moved by ±2 ms between runs; a model of the aligned
/// tick puts 24 rooms on a shifted lattice within ±0.4 ms (5th to 95th percentile of runs).
pub fn lattice_phases(k: usize, rooms: usize, shift: (f64, f64)) -> [Duration; TALKERS] {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let at = k as f64 + 0.5;
    let u = (at / rooms.max(1) as f64 + shift.0).rem_euclid(1.0);
    let v = (at * GOLDEN + shift.1).rem_euclid(1.0);
    let frame_us = 20_000.0;
    [
        Duration::ZERO,
        Duration::from_micros((u * frame_us) as u64),
        Duration::from_micros((v * frame_us) as u64),
    ]
}

/// One probe onset per talker, measured at each of `ears`: server-added delays (ms) per ear, in
/// the order of `ears`, and how many onsets went unheard.
pub async fn probe_round<T: std::ops::Deref<Target = Bot>>(
    talkers: &[T],
    ears: &[&Bot],
) -> Result<(Vec<Vec<f64>>, usize)> {
    let mut samples = vec![Vec::new(); ears.len()];
    let mut missed = 0;
    for (i, talker) in talkers.iter().enumerate() {
        let offset = bots_offset_ms(i)?;
        let asked = Instant::now();
        talker.set_source(&probe(i))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = talker.onset_sent().filter(|t| *t >= asked);
        talker.set_source(&carrier(i))?;
        let Some(sent) = sent else {
            missed += 1;
            continue;
        };
        for (ear, samples) in ears.iter().zip(samples.iter_mut()) {
            match ear.onset_heard(PROBES_HZ[i], sent) {
                Some(heard) => samples
                    .push(heard.saturating_duration_since(sent).as_secs_f64() * 1000.0 - offset),
                None => missed += 1,
            }
        }
        // Back on the carrier before the next probe.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((samples, missed))
}

/// Fills one room of `venue` (20 participants, 3 talking at `phases`), lets it settle, and measures
/// `onsets` probe onsets per talker at the first and the last listener to join (the others
/// only count packets): (first's delays, last's delays, onsets unheard).
pub async fn measure_room<V: Venue>(
    venue: &V,
    onsets: usize,
    phases: [Duration; TALKERS],
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let talkers = join_talkers_at(venue, phases).await?;
    let ear = venue
        .join("listener-0", BotConfig::new(AudioSource::Silence))
        .await?;
    let mut crowd = Vec::new();
    let listeners = PARTICIPANTS - TALKERS;
    for i in 1..listeners {
        let config = if i + 1 == listeners {
            BotConfig::new(AudioSource::Silence)
        } else {
            BotConfig::new(AudioSource::Silence).counting_only()
        };
        crowd.push(venue.join(&format!("listener-{i}"), config).await?);
    }
    let last = crowd
        .last()
        .context("the room has more than one listener")?;
    // Let every jitter buffer settle on its phase.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut first_samples, mut last_samples) = (Vec::new(), Vec::new());
    let mut missed = 0;
    for _ in 0..onsets {
        let (s, m) = probe_round(&talkers, &[&*ear, &**last]).await?;
        let mut per_ear = s.into_iter();
        first_samples.extend(per_ear.next().unwrap_or_default());
        last_samples.extend(per_ear.next().unwrap_or_default());
        missed += m;
    }
    super::close_all(talkers.iter().map(|b| &**b)).await;
    super::close_all(crowd.iter().map(|b| &**b)).await;
    ear.close().await;
    Ok((first_samples, last_samples, missed))
}

/// Runs `rooms` fresh rooms made by `venue_for(k)` and gathers their onsets.
pub async fn measure<V, F, Fut>(
    rooms: usize,
    onsets: usize,
    mut venue_for: F,
) -> Result<DelayResult>
where
    V: Venue,
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<V>>,
{
    let (mut samples, mut last) = (Vec::new(), Vec::new());
    let mut missed = 0;
    let shift = (rand::random::<f64>(), rand::random::<f64>());
    for k in 0..rooms {
        let venue = venue_for(k).await?;
        let (s, l, m) = measure_room(&venue, onsets, lattice_phases(k, rooms, shift)).await?;
        samples.extend(s);
        last.extend(l);
        missed += m;
    }
    Ok(DelayResult {
        last_listener: Some(percentiles(&last)),
        last_samples_ms: last,
        server_added: percentiles(&samples),
        bots_ms: bots_offset_ms(0)?,
        samples_ms: samples,
        missed,
        server_own: None,
    })
}

/// One room of a Chorus server process.
#[derive(Debug)]
pub struct ChorusRoom<'a> {
    /// The server.
    pub server: &'a crate::mediaserver_process::ServerProcess,
    /// The room's name.
    pub room: String,
}

/// A bot in a [`ChorusRoom`].
#[derive(Debug)]
pub struct ChorusMember(pub Bot);

impl std::ops::Deref for ChorusMember {
    type Target = Bot;

    fn deref(&self) -> &Bot {
        &self.0
    }
}

impl Venue for ChorusRoom<'_> {
    type Member = ChorusMember;

    async fn join(&self, who: &str, config: BotConfig) -> Result<ChorusMember> {
        self.server
            .join_bot(&self.room, who, config)
            .await
            .map(ChorusMember)
    }
}

/// One AudioBridge room of a Janus session.
#[derive(Debug)]
pub struct JanusRoom<'a> {
    /// The session the participants join through.
    pub session: &'a crate::janus::JanusSession,
    /// The room id.
    pub room: u64,
    /// The jitter setting each participant asks for.
    pub jitter: crate::janus::JanusJitter,
}

impl Venue for JanusRoom<'_> {
    type Member = crate::janus::JanusParticipant;

    async fn join(&self, who: &str, config: BotConfig) -> Result<Self::Member> {
        self.session.join(self.room, who, self.jitter, config).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lattice_covers_the_talkers_geometries_evenly() {
        let rooms = 8;
        let points: Vec<[Duration; TALKERS]> = (0..rooms)
            .map(|k| lattice_phases(k, rooms, (0.3, 0.9)))
            .collect();
        for p in &points {
            assert_eq!(p[0], Duration::ZERO);
            assert!(p.iter().all(|d| *d < Duration::from_millis(20)), "{p:?}");
        }
        // One point per eighth of each axis: every offset of talker 1 and of talker 2 is sampled.
        for axis in 1..TALKERS {
            let mut cells: Vec<u128> = points.iter().map(|p| p[axis].as_micros() / 2_500).collect();
            cells.sort_unstable();
            cells.dedup();
            assert!(cells.len() >= rooms - 1, "axis {axis}: {cells:?}");
        }
        // The shift moves every room's point by the same offset, modulo the frame.
        let moved = lattice_phases(3, rooms, (0.5, 0.0));
        let base = lattice_phases(3, rooms, (0.0, 0.0));
        assert_eq!(
            (moved[1].as_micros() + 20_000 - base[1].as_micros()) % 20_000,
            10_000
        );
        assert_eq!(moved[2], base[2]);
    }

    #[test]
    fn the_servers_own_tail_is_read_from_its_histogram() {
        let text = "\
# HELP chorus_server_delay_seconds Server-added delay.
# TYPE chorus_server_delay_seconds histogram
chorus_server_delay_seconds_bucket{le=\"0.02\"} 950
chorus_server_delay_seconds_bucket{le=\"0.025\"} 990
chorus_server_delay_seconds_bucket{le=\"+Inf\"} 1000
chorus_server_delay_seconds_sum 9.5
chorus_server_delay_seconds_count 1000
chorus_jitter_adjustments_total{kind=\"late\"} 2
chorus_jitter_adjustments_total{kind=\"underrun\"} 3
chorus_jitter_adjustments_total{kind=\"unstretch\"} 1
";
        let own = ServerOwnDelay::from_metrics(text).expect("packets were timed");
        assert_eq!(own.packets, 1000.0);
        assert!((own.share_over_tail - 0.01).abs() < 1e-12, "{own:?}");
        assert_eq!(own.jitter_adjustments["late"], 2.0);
        assert_eq!(own.jitter_adjustments["underrun"], 3.0);
        assert_eq!(own.jitter_adjustments["stretch"], 0.0);
        assert_eq!(own.jitter_adjustments["unstretch"], 1.0);
        assert!(ServerOwnDelay::from_metrics("chorus_server_delay_seconds_count 0\n").is_none());
    }
}
