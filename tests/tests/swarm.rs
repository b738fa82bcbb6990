//! Smoke test of the listener swarm (`chorus_tests::swarm`): an in-process media server, one
//! talker bot playing a 440 Hz tone, and a swarm of lightweight listeners (real ICE, DTLS and
//! SRTP each, one reader thread for all).
//!
//! What must hold: every listener joins and connects; each receives the mix under its own SSRC,
//! nearly lossless; every sampled packet, decrypted with that listener's own keys, carries a
//! payload byte-identical to one the reference listener received; the listeners keep consent
//! fresh and send SRTCP receiver reports without error; every listener receives the shared
//! payloads within a few milliseconds of the reference (kernel receive timestamps); and the
//! reference stream, decoded with libopus, is the talker's 440 Hz tone, well above every other
//! frequency probed.
//!
//! The same test runs with three fan-out workers, so the room's frame is cut into lanes sealed
//! and sent on three threads; and, where this process is root (as CI and the bench are here),
//! across the bench's veth pair with the link-layer fan-out on, one worker and three, so every
//! listener's media leaves as whole Ethernet frames from a packet socket and the same checks
//! hold on what the listeners receive.
//!
//! A further test has sendrecv listeners stream Opus silence upstream (as browsers with an
//! unmuted microphone do): they still receive everything, and the server counts their packets.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use chorus_mediaserver::media::spectrum::ToneReport;
use chorus_tests::bot::{BotConfig, SAMPLE_RATE, tone};
use chorus_tests::heavy_test_guard;
use chorus_tests::media_server::{MediaServer, metric};
use chorus_tests::swarm::{Direction, Swarm, SwarmConfig, SwarmReport, Upstream};
use chorus_tests::swarm_network::{SERVER_IP, SWARM_IP, SwarmNetwork};

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
/// How much later than the reference a listener may typically (median) receive the same
/// payload. The server sends the whole fan-out of a tick in one go, well under a millisecond
/// apart at this size; 20 ms is a whole frame, so a listener served a tick late fails.
const MAX_OFFSET_P50_MS: f64 = 20.0;

/// Checks that every listener's samples have offsets from the reference, from kernel
/// timestamps, with a small median; returns the last listener's median.
fn check_offsets(report: &SwarmReport) -> Result<f64> {
    for l in &report.listeners {
        let offset = l
            .offset_vs_reference_ms
            .with_context(|| format!("listener {} has no offsets: {l:?}", l.index))?;
        assert_eq!(offset.samples, l.samples_ok, "listener {}", l.index);
        assert_eq!(
            offset.kernel_stamped, offset.samples,
            "listener {}: not every sample had kernel timestamps",
            l.index
        );
        assert!(
            offset.p50.abs() < MAX_OFFSET_P50_MS
                && offset.min <= offset.p50
                && offset.p50 <= offset.max,
            "listener {}: offset from the reference {offset:?}",
            l.index
        );
        if l.is_reference {
            assert_eq!(
                (offset.min, offset.max),
                (0.0, 0.0),
                "the reference's own offset"
            );
        }
    }
    let fan_out = report.fan_out().context("no listeners")?;
    assert_eq!(fan_out.last_index, report.listeners.len() - 1);
    println!("swarm: fan-out {fan_out:?}");
    Ok(fan_out
        .last
        .context("the last listener has no offsets")?
        .p50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_listeners_hears_the_talker() -> Result<()> {
    swarm_hears_the_talker(1, Network::Loopback).await
}

/// Across a veth pair into another network namespace (the bench's swarm network), with the
/// link-layer fan-out on: every listener's media leaves through the server's packet socket as
/// a whole Ethernet frame, and every check of the loopback test still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_across_a_veth_pair_hears_the_talker_through_packet_sockets() -> Result<()> {
    swarm_hears_the_talker(1, Network::VethLinkLayer).await
}

/// The same with three fan-out workers: each lane hands its frames to the packet socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_lanes_across_a_veth_pair_hand_their_frames_to_packet_sockets() -> Result<()> {
    swarm_hears_the_talker(3, Network::VethLinkLayer).await
}

/// Where the swarm's listeners are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    /// On 127.0.0.1, the server's UDP socket sending everything.
    Loopback,
    /// In the bench's namespace behind a veth pair, the server sending listeners' media
    /// through packet sockets (`--link-layer-fan-out`).
    VethLinkLayer,
}

/// The same with the room's frame cut into three lanes of ten listeners, each sealed and sent
/// by its own thread (`fan_out.rs`): every listener still gets every frame under its own keys,
/// in the room's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_served_by_three_fan_out_workers_hears_the_talker() -> Result<()> {
    swarm_hears_the_talker(3, Network::Loopback).await
}

async fn swarm_hears_the_talker(fan_out_workers: usize, network: Network) -> Result<()> {
    let _serial = heavy_test_guard().await;
    let veth = match network {
        Network::Loopback => None,
        Network::VethLinkLayer => {
            // `/proc/self` belongs to the process's effective user.
            let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
            if !root {
                eprintln!(
                    "SKIPPED: the veth pair and packet sockets need root (CAP_NET_ADMIN, \
                     CAP_NET_RAW); run as root to test the link-layer fan-out"
                );
                return Ok(());
            }
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some(SwarmNetwork::up(0, cpus.saturating_sub(1)).context("the swarm's veth pair")?)
        }
    };
    let adjust = |config: &mut chorus_mediaserver::config::Config| {
        config.fan_out_workers = fan_out_workers;
        // Small enough that this room's fan-out is split whenever there is more than one worker.
        config.parallel_fan_out_min = 2;
        config.link_layer_fan_out = veth.is_some();
    };
    let server = match &veth {
        None => MediaServer::start(adjust).await?,
        Some(_) => MediaServer::start_on(SERVER_IP, adjust).await?,
    };
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
    if let Some(veth) = &veth {
        config.bind_ip = SWARM_IP;
        config.netns = Some(veth.binder());
    }
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
    // The lanes sealed the listeners' frames exactly when there was more than one worker.
    let lane_frames = metric(&server.metrics(), "chorus_media_lane_frames_total").unwrap_or(0.0);
    if fan_out_workers > 1 {
        assert!(
            lane_frames >= (LISTENERS as f64) * 50.0,
            "only {lane_frames} frames went through the lanes"
        );
    } else {
        assert_eq!(lane_frames, 0.0, "a single worker has no lanes");
    }
    // Over the veth pair nearly every listener datagram left through the packet socket (the
    // first frame to a new destination goes through the UDP socket while its next hop is
    // looked up); on loopback the flag is off and none did.
    let link_layer =
        metric(&server.metrics(), "chorus_media_link_layer_datagrams_total").unwrap_or(0.0);
    let frames_in_window = (WINDOW.as_millis() as f64) / f64::from(frame_ms);
    if veth.is_some() {
        assert!(
            link_layer >= LISTENERS as f64 * frames_in_window * 0.9,
            "only {link_layer} datagrams went through the packet socket"
        );
    } else {
        assert_eq!(link_layer, 0.0, "the link-layer fan-out is off");
    }
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
    let last_p50 = check_offsets(&report)?;
    println!("swarm: the last listener hears the reference's payloads {last_p50:.3} ms later");

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

const SILENCE_ROOM: &str = "swarm-silence";
const SILENCE_LISTENERS: usize = 20;

/// Sendrecv listeners streaming Opus silence upstream: each still receives the talker nearly
/// without loss, and the server counts their packets (50 per second each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_streaming_silence_still_hear_and_are_counted() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let server = MediaServer::start(|_| {}).await?;
    let frame_ms = chorus_mediaserver::media::MixerConfig::default().frame_ms;
    let talker = server
        .join_bot(
            SILENCE_ROOM,
            "talker",
            BotConfig::new(tone(TALKER_HZ, -20.0)).counting_only(),
        )
        .await?;
    let tokens: Vec<String> = (0..SILENCE_LISTENERS)
        .map(|i| server.token(SILENCE_ROOM, &format!("listener-{i}")))
        .collect();
    let mut config = SwarmConfig::new(
        server.base_url.clone(),
        SILENCE_ROOM,
        SILENCE_LISTENERS,
        move |i| tokens.get(i).cloned().unwrap_or_default(),
    );
    config.direction = Direction::SendRecv;
    config.upstream = Upstream::Silence;
    config.sample_every = SAMPLE_EVERY;
    config.join_concurrency = 8;
    let mut swarm = Swarm::join(config).await.context("joining the swarm")?;
    assert_eq!(swarm.joined(), SILENCE_LISTENERS, "{swarm:?}");

    let received = |text: &str| metric(text, "chorus_packets_received_total").unwrap_or(0.0);
    let before = received(&server.metrics());
    let report = swarm.run_for(WINDOW).await?;
    let after = received(&server.metrics());
    println!("swarm (silence upstream): {}", report.summary());

    let frames = WINDOW.as_millis() as u64 / u64::from(frame_ms);
    report.verify(MAX_LOST, frames / u64::from(SAMPLE_EVERY) / 2)?;
    // The talker's 50 packets/s plus every listener's; the counter runs a little past the
    // window (the report comes a moment after it closes), hence the upper slack.
    let seconds = report.window.as_secs_f64();
    let expected_upstream = SILENCE_LISTENERS as f64 * 50.0 * seconds;
    let counted = after - before - 50.0 * seconds;
    println!(
        "server counted {:.0} packets in {seconds:.2} s: about {counted:.0} from the listeners, \
         expected {expected_upstream:.0}; the swarm sent {}",
        after - before,
        report.upstream_sent
    );
    assert!(
        counted > 0.9 * expected_upstream && counted < 1.25 * expected_upstream,
        "the server counted {counted:.0} listener packets, expected about {expected_upstream:.0}"
    );
    assert!(
        (report.upstream_sent as f64) > 0.95 * expected_upstream
            && (report.upstream_sent as f64) < 1.05 * expected_upstream,
        "the swarm sent {} packets, expected about {expected_upstream:.0}",
        report.upstream_sent
    );
    for l in &report.listeners {
        assert!(l.send_ssrc.is_some(), "listener {}: {l:?}", l.index);
        assert!(
            l.audio_level_id.is_some(),
            "listener {}: the answer negotiated no audio-level extension",
            l.index
        );
        assert_eq!(l.send_errors, 0, "listener {}: {l:?}", l.index);
        assert!(
            l.packets + MAX_LOST + 2 >= frames,
            "listener {} received {} packets, expected about {frames}",
            l.index,
            l.packets
        );
    }
    check_offsets(&report)?;

    let left = swarm.leave().await?;
    assert_eq!(left, SILENCE_LISTENERS);
    talker.leave(&[TALKER_HZ]).await?;
    Ok(())
}
