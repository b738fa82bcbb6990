//! The plan's `mixing` block is the only source of every room's settings, and a new generation
//! reconfigures live rooms: real WebRTC bots on three servers, asserting what each listener hears.
//! Also: a burst of rooms all reach their primary (lossless room lifecycle on the mesh).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chorus_mediaserver::media::{Candidate, StreamId};
use chorus_mediaserver::mesh::{MeshMetrics, MeshTls};
use chorus_mediaserver::mesh_node::{LocalReport, MeshNode};
use chorus_tests::bot::{AudioSource, Bot, BotConfig, tone, tones};
use chorus_tests::heavy_test_guard;
use chorus_tests::media_server::metric;
use chorus_tests::mesh_cluster::{MeshCluster, MeshFiles};
use tokio_util::sync::CancellationToken;

const ROOM: &str = "plenary";
const FIVE: [f64; 5] = [300.0, 500.0, 700.0, 900.0, 1100.0];

/// Waits up to `within` for `bot` to hear exactly `want` over its last full second of audio.
async fn hears_exactly(bot: &Bot, want: &BTreeSet<u32>, within: Duration) -> BTreeSet<u32> {
    let window = Some(Duration::from_secs(1));
    let deadline = Instant::now() + within;
    loop {
        let report = bot.report_window(window, &FIVE);
        let got: BTreeSet<u32> = report
            .frequencies
            .iter()
            .filter(|f| f.present)
            .map(|f| f.freq_hz as u32)
            .collect();
        if (report.seconds_analyzed >= 0.99 && &got == want) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every server runs plan `generation`, then for a second of audio mixed under it,
/// and checks that each listener hears exactly `want` and each server mixes `active` speakers.
async fn expect_everywhere(
    cluster: &MeshCluster,
    listeners: &[Bot],
    generation: u32,
    want: &BTreeSet<u32>,
    active: f64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while (0..3).any(|i| {
        metric(&cluster.server(i).metrics(), "chorus_mesh_plan_generation")
            != Some(f64::from(generation))
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "generation {generation} never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only audio mixed after the change counts.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (i, ear) in listeners.iter().enumerate() {
        let got = hears_exactly(ear, want, Duration::from_secs(8)).await;
        let report = ear.report_window(Some(Duration::from_secs(1)), &FIVE);
        assert_eq!(
            &got, want,
            "server {i}'s listener, generation {generation}: {report:?}"
        );
    }
    // The primary and every mixer agree.
    for i in 0..3 {
        let text = cluster.server(i).metrics();
        assert_eq!(
            metric(&text, "chorus_active_speakers"),
            Some(active),
            "server {i}, generation {generation}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_mixing_reaches_every_mixer_and_changes_live() -> Result<()> {
    let _serial = heavy_test_guard().await;
    // The plan says top 2; a server's own default (3) must not matter.
    let mut cluster = MeshCluster::start(&["us", "eu", "ap"], 2, |_, a| a).await?;
    let mut talkers = Vec::new();
    for (i, hz) in FIVE.iter().enumerate() {
        let level = -18.0 - 2.0 * i as f64;
        talkers.push(
            cluster
                .server(0)
                .join_bot(
                    ROOM,
                    &format!("talker{i}"),
                    BotConfig::new(tone(*hz, level)),
                )
                .await?,
        );
    }
    let mut listeners = Vec::new();
    for i in 0..3 {
        listeners.push(
            cluster
                .server(i)
                .join_bot(
                    ROOM,
                    &format!("ear{i}"),
                    BotConfig::new(AudioSource::Silence),
                )
                .await?,
        );
    }

    let two = tones(&[300, 500]);
    for (i, ear) in listeners.iter().enumerate() {
        let got = hears_exactly(ear, &two, Duration::from_secs(8)).await;
        assert_eq!(got, two, "server {i}'s listener under the plan's top 2");
    }

    // A new generation: top 5. Nothing restarts; every mixer follows.
    cluster.update_plan(|p| p.mixing.top_speakers = 5)?;
    let all = tones(&[300, 500, 700, 900, 1100]);
    expect_everywhere(&cluster, &listeners, 2, &all, 5.0).await?;

    // Another generation: 10 ms frames. The bots keep sending 20 ms packets, as browsers do; every
    // room now ticks every 10 ms, plays each packet as two frames, and still mixes all five.
    cluster.update_plan(|p| p.mixing.frame_ms = 10)?;
    expect_everywhere(&cluster, &listeners, 3, &all, 5.0).await?;
    // One room per server, ticking every 10 ms now: about 100 ticks a second, not 50.
    let ticks = |i: usize| metric(&cluster.server(i).metrics(), "chorus_mixer_ticks_total");
    let before: Vec<Option<f64>> = (0..3).map(ticks).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, before) in before.into_iter().enumerate() {
        let rate = ticks(i).unwrap_or(0.0) - before.unwrap_or(0.0);
        assert!(
            (80.0..=120.0).contains(&rate),
            "server {i}: {rate} ticks in a second"
        );
    }
    drop(talkers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_sees_remote_speakers_by_identity() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let cluster = MeshCluster::start(&["us", "eu"], 3, |_, a| a).await?;
    let bob = cluster
        .server(1)
        .join_bot(ROOM, "bob", BotConfig::new(tone(500.0, -20.0)))
        .await?;
    let ada = cluster
        .server(0)
        .join_bot(ROOM, "ada", BotConfig::new(AudioSource::Silence))
        .await?;
    let server = cluster.server(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = server.room_info(ROOM, "ada").await?;
        let named = info["remote_speakers"].as_array().is_some_and(|r| {
            r.iter()
                .any(|s| s["identity"] == "bob" && s["speaking"] == true)
        });
        if named {
            break info;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bob never named on server 0: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Bob is named with his server, and is not counted as one of this server's participants.
    let remote = &info["remote_speakers"][0];
    assert_eq!(remote["server"], cluster.slots[1].id.as_str(), "{info}");
    let here: Vec<&str> = info["participants"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["identity"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(here, vec!["ada"], "{info}");
    // And ada hears him.
    let heard = hears_exactly(&ada, &tones(&[500]), Duration::from_secs(5)).await;
    assert_eq!(heard, tones(&[500]));

    // Bob pauses: he rests in his slot (still named, still listed), but is not speaking.
    bob.set_source(&AudioSource::Silence)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = server.room_info(ROOM, "ada").await?;
        let bob_entry = info["remote_speakers"]
            .as_array()
            .and_then(|r| r.iter().find(|s| s["identity"] == "bob").cloned());
        let Some(bob_entry) = bob_entry else {
            anyhow::bail!("bob, resting in his slot, is no longer named: {info}");
        };
        if bob_entry["speaking"] == false {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bob is silent but still shown speaking: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(bob);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rooms_opened_in_a_burst_all_reach_their_primary() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let files = MeshFiles::create(&["us", "eu"], 3, |_, a| a)?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut nodes = Vec::new();
    for slot in &files.slots {
        let tls = MeshTls::from_dir(&files.dir, &slot.id)?;
        let socket = std::net::UdpSocket::bind(slot.mesh_bind)?;
        nodes.push(MeshNode::start(
            &slot.id,
            files.plan.clone(),
            socket,
            &tls,
            MeshMetrics::new(),
            shutdown.clone(),
        )?);
    }
    let node = Arc::new(nodes.remove(0));

    // Every room opens and reports one voiced speaker in the same instant.
    let mut links = Vec::new();
    for i in 0..1000u64 {
        let link = node.open_room(&format!("room-{i}"));
        link.report(LocalReport {
            candidates: vec![Candidate {
                stream: StreamId(i + 1),
                importance: -20.0,
                voice: true,
                identity: None,
            }],
            participants: 1,
        });
        links.push(link);
    }
    // A room reached its primary (whichever server that is) when its view lists its speaker.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: Vec<usize> = links
            .iter()
            .enumerate()
            .filter(|(i, link)| {
                let view = link.view.borrow();
                !view
                    .selection
                    .as_ref()
                    .is_some_and(|list| list.iter().any(|k| k.stream == StreamId(*i as u64 + 1)))
            })
            .map(|(i, _)| i)
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} of 1000 rooms never got a global list, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(links);
    drop(nodes);
    Ok(())
}
