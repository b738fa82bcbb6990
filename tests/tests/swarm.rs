//! Smoke test of the listener swarm (`chorus_tests::swarm`): an in-process media server, one
//! talker bot playing a 440 Hz tone, and a swarm of lightweight listeners (real ICE, DTLS and
//! SRTP each, one reader thread for all).
//!
//! What must hold: every listener joins and connects; each receives the mix under its own SSRC,
//! nearly lossless; every sampled packet, decrypted with that listener's own keys, carries a
//! payload byte-identical to one the reference listener received; the listeners keep consent
//! fresh and send SRTCP receiver reports without error; and the reference stream, decoded with
//! libopus, is the talker's 440 Hz tone, well above every other frequency probed.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use chorus_mediaserver::media::spectrum::ToneReport;
use chorus_tests::bot::{BotConfig, SAMPLE_RATE, tone};
use chorus_tests::heavy_test_guard;
use chorus_tests::media_server::MediaServer;
use chorus_tests::swarm::{Direction, Swarm, SwarmConfig};

/// The direction the listeners offer: receive-only, so the server's own listener transport
/// (ICE-lite, DTLS, SRTP keyed from the DTLS exporter) carries them.
const DIRECTION: Direction = Direction::RecvOnly;
const ROOM: &str = "swarm";
const LISTENERS: usize = 30;
const TALKER_HZ: f64 = 440.0;
/// Frequencies that must be absent from the mix (nobody plays them).
const ABSENT_HZ: [f64; 5] = [300.0, 600.0, 880.0, 1000.0, 1500.0];
const WINDOW: Duration = Duration::from_secs(3);
/// Each listener decrypts one packet in this many (the reference decrypts all).
const SAMPLE_EVERY: u32 = 5;
/// Losses tolerated per listener over the window (loopback, a loaded CI machine).
const MAX_LOST: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_listeners_hears_the_talker() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let server = MediaServer::start(|_| {}).await?;
    let frame_ms = chorus_mediaserver::media::MixerConfig::default().frame_ms;
    let talker = server
        .join_bot(
            ROOM,
            "talker",
            BotConfig::new(tone(TALKER_HZ, -20.0)).counting_only(),
        )
        .await?;

    let tokens: Vec<String> = (0..LISTENERS)
        .map(|i| server.token(ROOM, &format!("listener-{i}")))
        .collect();
    let mut config = SwarmConfig::new(server.base_url.clone(), ROOM, LISTENERS, move |i| {
        tokens.get(i).cloned().unwrap_or_default()
    });
    config.direction = DIRECTION;
    config.sample_every = SAMPLE_EVERY;
    config.join_concurrency = 8;
    // Short enough that every listener reports at least twice in the window.
    config.rtcp_interval = Duration::from_secs(1);
    let mut swarm = Swarm::join(config).await.context("joining the swarm")?;
    assert_eq!(swarm.joined(), LISTENERS, "{swarm:?}");

    let report = swarm.run_for(WINDOW).await?;
    // Every listener rode the server's own listener transport, not `rtc`'s peer.
    let listeners_on_port =
        chorus_tests::media_server::metric(&server.metrics(), "chorus_media_listeners");
    assert_eq!(
        listeners_on_port,
        Some(LISTENERS as f64),
        "chorus_media_listeners"
    );
    println!("swarm: {}", report.summary());
    let slowest = report.listeners.iter().max_by_key(|l| l.join.dtls);
    println!(
        "swarm: slowest join {:?}; reference {:?}",
        slowest.map(|l| (l.index, l.join)),
        report.listeners.first().map(|l| l.join)
    );

    // Every listener joined, received, lost at most a handful and decrypted its samples to
    // payloads the reference received. At least a few samples each: a window of WINDOW at one
    // frame per `frame_ms` holds dozens.
    let frames = WINDOW.as_millis() as u64 / u64::from(frame_ms);
    let min_samples = frames / u64::from(SAMPLE_EVERY) / 2;
    assert!(min_samples >= 5, "the window is too short to sample");
    report.verify(MAX_LOST, min_samples)?;
    assert_eq!(report.listeners.len(), LISTENERS);
    assert_eq!(report.reference_index, Some(0));

    let mut ssrcs = BTreeSet::new();
    for l in &report.listeners {
        // Nearly every frame of the window arrived (the first may straddle its start).
        assert!(
            l.packets + MAX_LOST + 2 >= frames,
            "listener {} received {} packets, expected about {frames}: {l:?}",
            l.index,
            l.packets
        );
        assert!(
            l.answer_direction == "sendonly",
            "listener {}: answer direction {}",
            l.index,
            l.answer_direction
        );
        // One stream per listener: the server gives each session its own SSRC.
        assert!(
            ssrcs.insert(l.ssrc.context("no SSRC")?),
            "listener {} shares SSRC {:?} with another",
            l.index,
            l.ssrc
        );
        // Consent freshness (every 2.5 s) answered, receiver reports (every 1 s) sent.
        assert!(
            l.consent_answered >= 1 && l.consent_answered + 1 >= l.consent_sent,
            "listener {}: consent {} sent, {} answered",
            l.index,
            l.consent_sent,
            l.consent_answered
        );
        assert!(l.rtcp_sent >= 2, "listener {}: {l:?}", l.index);
        assert_eq!(l.send_errors, 0, "listener {}: {l:?}", l.index);
        assert_eq!(l.kernel_drops, 0, "listener {}: {l:?}", l.index);
    }
    // The reference decrypted every packet it received.
    let reference = &report.listeners[0];
    assert!(reference.is_reference);
    assert_eq!(
        reference.samples_ok,
        reference.packets - reference.duplicates
    );
    assert_eq!(report.reference.len() as u64, reference.samples_ok);

    // What the listeners hear: the talker's tone, clearly, and nothing else. The first 200 ms
    // are skipped (the mix may start inside the window).
    let pcm = report.reference_pcm()?;
    let skip = (SAMPLE_RATE as usize / 5).min(pcm.len());
    let heard = &pcm[skip..];
    assert!(
        heard.len() as f64 >= 0.8 * (WINDOW.as_secs_f64() - 0.2) * f64::from(SAMPLE_RATE),
        "only {} samples decoded",
        heard.len()
    );
    let mut candidates = vec![TALKER_HZ];
    candidates.extend(ABSENT_HZ);
    let tones = ToneReport::analyze(heard, &candidates, SAMPLE_RATE);
    assert_eq!(tones.present(), vec![TALKER_HZ], "{tones:?}");
    let talker_level = tones.tone(TALKER_HZ).context("440 Hz analysed")?.level_dbfs;
    assert!(
        talker_level > tones.loudest_absent_dbfs() + 30.0,
        "440 Hz at {talker_level:.1} dBFS does not stand out: {tones:?}"
    );

    let left = swarm.leave().await?;
    assert_eq!(left, LISTENERS);
    talker.leave(&[TALKER_HZ]).await?;
    Ok(())
}
