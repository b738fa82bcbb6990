//! Janus AudioBridge, the benchmarks' comparison peer, end to end: the real Janus started by
//! `chorus_tests::janus`, joined through its HTTP API by real WebRTC bots, each hearing the mix.
//!
//! A missing Janus fails these tests (with a pointer to `scripts/bootstrap`), never skips them:
//! benchmarks that silently lost their comparison would look like benchmarks that ran.
//!
//! The listener swarm (`chorus_tests::swarm`) joins Janus too, so capacity is measured the same
//! way on both servers: its listeners must connect (Janus is a full ICE agent) and receive the
//! talker without loss.

use std::time::Duration;

use anyhow::Result;
use chorus_tests::bot::{BotConfig, tone, tones as set};
use chorus_tests::heavy_test_guard;
use chorus_tests::janus::{JanusJitter, JanusOptions, JanusParticipant, JanusServer};
use chorus_tests::swarm::{JanusTarget, Swarm, SwarmConfig};

const FREQS: [f64; 3] = [440.0, 660.0, 880.0];

/// Joins one bot per tone (with the given per-participant jitter settings) into a new room made
/// with `room_jitter`, lets them talk for three seconds, and checks that each hears exactly the
/// two others (the AudioBridge sends every participant the mix minus itself).
async fn three_tones_mix_minus(room_jitter: JanusJitter, jitters: [JanusJitter; 3]) -> Result<()> {
    let janus = JanusServer::start(JanusOptions::default()).await?;
    let session = janus.session().await?;
    let room = session.create_room(room_jitter).await?;
    let mut participants: Vec<JanusParticipant> = Vec::new();
    for (hz, jitter) in FREQS.iter().zip(jitters) {
        let started = std::time::Instant::now();
        let participant = session
            .join(
                room,
                &format!("tone{hz}"),
                jitter,
                BotConfig::new(tone(*hz, -20.0)),
            )
            .await?;
        println!(
            "tone {hz} Hz joined room {room} as {} ({jitter:?}) in {:?}",
            participant.id,
            started.elapsed()
        );
        participants.push(participant);
    }
    let listed = session.list_participants(room).await?;
    assert_eq!(listed.len(), 3, "Janus lists {listed:?}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    for ((participant, hz), jitter) in participants.iter().zip(FREQS).zip(jitters) {
        let report = participant.report_window(Some(Duration::from_secs(2)), &FREQS);
        let level = |freq: f64| {
            report
                .frequencies
                .iter()
                .find(|f| f.freq_hz == freq)
                .map_or(f64::NAN, |f| f.level_dbfs)
        };
        let others: Vec<f64> = FREQS.into_iter().filter(|&other| other != hz).collect();
        let context = format!("bot {hz} Hz ({jitter:?} in a {room_jitter:?} room): {report:?}");
        let lowest = jitter == JanusJitter::Lowest || room_jitter == JanusJitter::Lowest;
        if lowest {
            // With a one-packet prebuffer, a packet arriving between the mixer's two passes makes
            // Janus trim away the frame it just mixed and subtract the next one instead: the
            // participant's own voice leaks into its mix, rarely and ~35 dB down (see the
            // module doc of chorus_tests::janus). Heard clearly, it would be a real failure.
            for &other in &others {
                let found = report.frequencies.iter().find(|f| f.freq_hz == other);
                assert!(found.is_some_and(|f| f.present), "{context}");
            }
            let quietest_other = others
                .iter()
                .map(|&f| level(f))
                .fold(f64::INFINITY, f64::min);
            assert!(
                level(hz) < quietest_other - 25.0,
                "{context}: its own tone is not cancelled"
            );
        } else {
            let heard_others: Vec<u32> = others.iter().map(|&f| f as u32).collect();
            let got = participant.heard(&FREQS);
            assert_eq!(
                got,
                set(&heard_others),
                "{context}: should hear the two others and not itself\n{}",
                janus.log_tail(30)
            );
        }
    }
    for participant in participants {
        let report = participant.leave(&FREQS).await?;
        assert!(report.warnings.is_empty(), "{report:?}");
        assert!(report.packets_received > 100, "{report:?}");
    }
    assert!(session.list_participants(room).await?.is_empty());
    session.destroy_room(room).await?;
    session.destroy().await?;
    Ok(())
}

/// A room with Janus' default prebuffering; one participant asks for the lowest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bots_hear_the_two_others_through_the_audiobridge() -> Result<()> {
    let _serial = heavy_test_guard().await;
    three_tones_mix_minus(
        JanusJitter::Default,
        [
            JanusJitter::Default,
            JanusJitter::Lowest,
            JanusJitter::Default,
        ],
    )
    .await
}

/// A room whose default prebuffering is the lowest: every participant inherits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_with_the_lowest_prebuffering_mixes_too() -> Result<()> {
    let _serial = heavy_test_guard().await;
    three_tones_mix_minus(JanusJitter::Lowest, [JanusJitter::Default; 3]).await
}

/// A missing Janus is a failure that says how to install it.
#[tokio::test]
async fn a_missing_janus_says_to_run_bootstrap() {
    let options = JanusOptions {
        binary: "/nonexistent/janus".into(),
        ..JanusOptions::default()
    };
    let err = JanusServer::start(options)
        .await
        .expect_err("there is no Janus at /nonexistent/janus");
    let message = format!("{err:#}");
    assert!(
        message.contains("/nonexistent/janus") && message.contains("scripts/bootstrap"),
        "{message}"
    );
}

const SWARM_LISTENERS: usize = 10;

/// Ten swarm listeners (recvonly offers, real ICE/DTLS/SRTP each) join an AudioBridge room with
/// one talker bot: every one connects and receives the mix, nearly without loss, and decrypts
/// its samples with its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_listeners_hears_a_janus_talker() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let janus = JanusServer::start(JanusOptions::default()).await?;
    let session = janus.session().await?;
    let room = session.create_room(JanusJitter::Default).await?;
    let talker = session
        .join(
            room,
            "talker",
            JanusJitter::Default,
            BotConfig::new(tone(440.0, -20.0)).counting_only(),
        )
        .await?;
    let mut config = SwarmConfig::janus(janus.base_url(), JanusTarget::new(room), SWARM_LISTENERS);
    config.sample_every = 5;
    config.join_concurrency = 4;
    let mut swarm = Swarm::join(config).await?;
    assert_eq!(
        swarm.joined(),
        SWARM_LISTENERS,
        "{swarm:?}\n{}",
        janus.log_tail(30)
    );
    let listed = session.list_participants(room).await?;
    assert_eq!(listed.len(), SWARM_LISTENERS + 1, "Janus lists {listed:?}");

    let window = Duration::from_secs(3);
    let report = swarm.run_for(window).await?;
    println!("janus swarm: {}", report.summary());
    for l in &report.listeners {
        println!(
            "janus swarm: listener {}: {} packets, {} lost, role {:?}, {} answer, samples {} \
             matched / {} not (per-participant encodes), offsets {:?}",
            l.index,
            l.packets,
            l.lost,
            l.dtls_role,
            l.answer_direction,
            l.samples_ok,
            l.samples_mismatched,
            l.offset_vs_reference_ms
        );
        // Janus encodes for each participant: payloads (and so offsets) are not comparable.
        if !l.is_reference {
            assert_eq!(l.offset_vs_reference_ms, None, "listener {}", l.index);
        }
    }
    // 150 frames in the window; every listener decrypts one in five.
    report.verify(2, 10)?;
    let frames = window.as_millis() as u64 / 20;
    for l in &report.listeners {
        assert!(
            l.packets + 5 >= frames,
            "listener {} received {} packets, expected about {frames}",
            l.index,
            l.packets
        );
        assert_eq!(l.send_errors, 0, "listener {}: {l:?}", l.index);
        assert!(l.consent_answered >= 1, "listener {}: {l:?}", l.index);
    }

    let left = swarm.leave().await?;
    assert_eq!(left, SWARM_LISTENERS);
    let listed = session.list_participants(room).await?;
    assert_eq!(
        listed.len(),
        1,
        "after the swarm left, Janus lists {listed:?}"
    );
    let heard = talker.leave(&[440.0]).await?;
    assert!(heard.warnings.is_empty(), "{heard:?}");
    session.destroy_room(room).await?;
    session.destroy().await?;
    Ok(())
}
