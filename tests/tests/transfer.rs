//! Session transfer by QR code (DESIGN §12, US11997149B1) end to end: real WebRTC bots, real
//! libopus. A participant moves to a device that never held a join token; the others see no leave
//! and no join, hear the new device in the old one's place, and never hear the old device again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chorus_mediaserver::media::spectrum::tone_level_dbfs;
use chorus_tests::bot::{AudioSource, Bot, BotConfig, FRAME_SAMPLES, SAMPLE_RATE, tone};
use chorus_tests::call_me::participant_id;
use chorus_tests::media_server::{MediaServer, metric};
use chorus_tests::transfer::{code_of, issue_code, redeem_bot, redeem_raw};
use serde_json::Value;

const ROOM: &str = "move";
/// A tone block above this is "heard" (the tones are sent at -20 dBFS).
const PRESENT_DBFS: f64 = -40.0;

/// Per 20 ms block of what `bot` received: which of `freqs` are present.
fn blocks(bot: &Bot, freqs: &[f64]) -> Vec<Vec<bool>> {
    bot.received_samples()
        .chunks_exact(FRAME_SAMPLES)
        .map(|block| {
            freqs
                .iter()
                .map(|f| tone_level_dbfs(block, *f, SAMPLE_RATE) > PRESENT_DBFS)
                .collect()
        })
        .collect()
}

/// `GET /v1/rooms/{ROOM}` at `base` with `token`: the room as JSON.
async fn room_info(http: &reqwest::Client, base: &str, token: &str) -> Result<Value> {
    Ok(http
        .get(format!("{base}/v1/rooms/{ROOM}"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?)
}

/// The participant ids of a room as `room_info` gives it.
fn participant_ids(info: &Value) -> Vec<u64> {
    info["participants"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// The roster's participant ids.
async fn roster(http: &reqwest::Client, server: &MediaServer, token: &str) -> Result<Vec<u64>> {
    Ok(participant_ids(
        &room_info(http, &server.base_url, token).await?,
    ))
}

/// Read `participant`'s event stream with `token` until it ends: the event names.
async fn event_names(base: String, participant: u64, token: String) -> Result<Vec<String>> {
    let mut res = reqwest::Client::new()
        .get(format!(
            "{base}/v1/rooms/{ROOM}/participants/{participant}/events"
        ))
        .bearer_auth(&token)
        .send()
        .await?;
    ensure!(res.status() == 200, "events: {}", res.status());
    let mut text = String::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(30), res.chunk()).await? {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("event:"))
        .map(|e| e.trim().to_owned())
        .collect())
}

/// Tests 1 and 6: top speaker A (440 Hz) moves to A′ (660 Hz), a bot with no join token. The
/// listener hears 440, then 660 after a gap under 300 ms, and no 440 after it; A keeps sending
/// (now 1000 Hz) and nobody hears that. Polled every 50 ms, the roster always lists A's id and
/// never changes size, and the active-speakers gauge never dips. A gets `transferred`, then its
/// connection closes; its stale leave cannot remove A′.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_speaker_moves_without_a_leave_or_a_join() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let server = MediaServer::start(|_| {}).await?;
    let http = reqwest::Client::new();
    let a = server
        .join_bot(ROOM, "ada", BotConfig::new(tone(440.0, -20.0)))
        .await?;
    let listener = server
        .join_bot(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    let a_id = participant_id(&a)?;
    let a_token = server.token(ROOM, "ada");
    let l_token = server.token(ROOM, "lars");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = roster(&http, &server, &l_token).await?;
    ensure!(before.contains(&a_id) && before.len() == 2, "{before:?}");

    let events = tokio::spawn(event_names(server.base_url.clone(), a_id, a_token.clone()));
    // Watch the roster and the active-speakers gauge every 50 ms throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (http, base, token, stop) = (
            http.clone(),
            server.base_url.clone(),
            l_token.clone(),
            stop.clone(),
        );
        let metrics = server.running.metrics.clone();
        tokio::spawn(async move {
            let mut sizes = BTreeSet::new();
            let mut missing_a = 0;
            let mut min_active = f64::MAX;
            while !stop.load(Ordering::Relaxed) {
                let ids = participant_ids(&room_info(&http, &base, &token).await?);
                sizes.insert(ids.len());
                if !ids.contains(&a_id) {
                    missing_a += 1;
                }
                if let Some(active) = metric(&metrics.encode(), "chorus_active_speakers") {
                    min_active = min_active.min(active);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok((sizes, missing_a, min_active))
        })
    };

    let (status, cache, issued) = issue_code(&http, &server.base_url, ROOM, a_id, &a_token).await?;
    ensure!(status == 201, "issue: {status} {issued}");
    ensure!(cache.as_deref() == Some("no-store"), "{cache:?}");
    ensure!(
        issued["qrSvg"].as_str().is_some_and(|s| s.contains("<svg")),
        "{issued}"
    );
    let url = issued["url"].as_str().context("url")?;
    ensure!(
        url.contains("/t#"),
        "the code travels in the fragment: {url}"
    );
    let code = code_of(url)?;

    let switched = Instant::now();
    let (a2, redeemed) =
        redeem_bot(&server.base_url, &code, BotConfig::new(tone(660.0, -20.0))).await?;
    ensure!(
        redeemed.participant_id == a_id,
        "the same participant: {redeemed:?}"
    );
    // The old device keeps talking, now at 1000 Hz: nobody may hear it.
    a.set_source(&tone(1000.0, -20.0))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (sizes, missing_a, min_active) = watcher.await??;
    ensure!(
        missing_a == 0,
        "A's id was missing from {missing_a} roster polls"
    );
    ensure!(
        sizes == BTreeSet::from([2]),
        "the participant count changed: {sizes:?}"
    );
    ensure!(
        min_active >= 1.0,
        "the active speakers gauge dipped to {min_active}"
    );

    // What the listener heard, block by block.
    let heard = blocks(&listener, &[440.0, 660.0, 1000.0]);
    let first_660 = heard
        .iter()
        .position(|b| b[1])
        .context("the listener never heard A′'s 660 Hz")?;
    let last_440 = heard[..first_660]
        .iter()
        .rposition(|b| b[0])
        .context("the listener never heard A's 440 Hz")?;
    let gap_ms = (first_660 - last_440 - 1) * 20;
    eprintln!(
        "switch: 440 Hz last heard in block {last_440}, 660 Hz first in {first_660}: gap {gap_ms} ms; redeem to first 660 Hz {:?}",
        listener
            .first_arrival_of(660.0, PRESENT_DBFS, switched)
            .map(|t| t - switched)
    );
    ensure!(gap_ms < 300, "the audio gap was {gap_ms} ms");
    // The block where the two meet may hold both (the switch falls inside it, and the mix's
    // encoder carries a few ms over); from the next block on, 440 Hz is gone for good.
    let late_440: Vec<usize> = (first_660 + 1..heard.len())
        .filter(|i| heard[*i][0])
        .collect();
    ensure!(
        late_440.is_empty(),
        "440 Hz was heard after the switch (blocks {late_440:?}, first 660 Hz block {first_660})"
    );
    ensure!(
        !heard.iter().any(|b| b[2]),
        "the old device's 1000 Hz was heard"
    );
    ensure!(
        heard[heard.len() - 25..].iter().filter(|b| b[1]).count() > 20,
        "A′ is still speaking at the end"
    );

    // A was told, then its connection closed.
    let events = events.await??;
    ensure!(events == ["transferred"], "A's events: {events:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.connection_state() == webrtc::peer_connection::RTCPeerConnectionState::Connected {
        ensure!(Instant::now() < deadline, "A's connection stayed up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A's stale leave (its old token) cannot remove A′.
    let stale = http
        .delete(format!(
            "{}/v1/rooms/{ROOM}/participants/{a_id}",
            server.base_url
        ))
        .bearer_auth(&a_token)
        .send()
        .await?;
    ensure!(stale.status() == 409, "stale leave: {}", stale.status());
    let after = roster(&http, &server, &l_token).await?;
    ensure!(after.contains(&a_id) && after.len() == 2, "{after:?}");
    let metrics = server.running.metrics.encode();
    ensure!(
        metric(&metrics, "chorus_transfer_codes_issued_total") == Some(1.0),
        "codes issued"
    );
    ensure!(
        metrics.contains("chorus_transfer_redemptions_total{outcome=\"ok\"} 1"),
        "redemptions"
    );
    ensure!(
        metric(&metrics, "chorus_transfer_switch_seconds_count") == Some(1.0)
            && metric(&metrics, "chorus_transfer_audio_gap_seconds_count") == Some(1.0),
        "switch and gap observed once: {}",
        metrics
            .lines()
            .filter(|l| l.contains("transfer"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The new device's token leaves for real.
    let leave = http
        .delete(format!(
            "{}/v1/rooms/{ROOM}/participants/{a_id}",
            server.base_url
        ))
        .bearer_auth(&redeemed.token)
        .send()
        .await?;
    ensure!(leave.status() == 204, "A′ leaves: {}", leave.status());
    drop((a, a2, listener));
    Ok(())
}

/// Tests 2 and 3: every way a redemption or an issue can fail says why, and none of them costs
/// the code or the participant: a second redemption (410 used) leaves A′ talking, an expired code
/// is 410, another identity cannot issue (403), a code for a participant who left is 409, a random
/// code 404, a bad offer 400 with the code still good afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_and_cost_nothing() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let server = MediaServer::start(|_| {}).await?;
    let http = reqwest::Client::new();
    let base = server.base_url.clone();
    let a = server
        .join_bot(ROOM, "ada", BotConfig::new(tone(440.0, -20.0)))
        .await?;
    let listener = server
        .join_bot(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    let a_id = participant_id(&a)?;
    let a_token = server.token(ROOM, "ada");

    // Another identity's token cannot move A.
    let (status, _, body) =
        issue_code(&http, &base, ROOM, a_id, &server.token(ROOM, "mallory")).await?;
    ensure!(
        status == 403 && body["reason"] == "not_yours",
        "{status} {body}"
    );

    // A bad offer with a good code: 400, and the code still works afterwards.
    let (_, _, issued) = issue_code(&http, &base, ROOM, a_id, &a_token).await?;
    let code = code_of(issued["url"].as_str().context("url")?)?;
    let (status, body, _) = redeem_raw(&http, &base, &code, "v=0\r\nnot an offer").await?;
    ensure!(status == 400, "bad offer: {status} {body}");
    let (a2, redeemed) = redeem_bot(&base, &code, BotConfig::new(tone(660.0, -20.0))).await?;
    ensure!(redeemed.participant_id == a_id);

    // A second redemption: 410 already used, and A′ keeps talking.
    let (status, body, _) = redeem_raw(&http, &base, &code, "v=0\r\n").await?;
    ensure!(
        status == 410 && body.contains("code_used") && body.contains("usedAt"),
        "{status} {body}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        listener.heard(&[660.0]).contains(&660),
        "A′ still talks after the refused second redemption"
    );

    // A random code: 404.
    let (status, body, _) = redeem_raw(
        &http,
        &base,
        &format!(
            "{}~AAAAAAAAAAAAAAAAAAAAAAAA",
            server.running.transfers.server_id()
        ),
        "v=0\r\n",
    )
    .await?;
    ensure!(
        status == 404 && body.contains("unknown_code"),
        "{status} {body}"
    );
    // No code at all: 401.
    let res = http
        .post(format!("{base}/v1/transfer"))
        .body("v=0")
        .send()
        .await?;
    ensure!(res.status() == 401, "no code: {}", res.status());

    // An expired code: 410.
    server
        .running
        .transfers
        .set_settings(chorus_mediaserver::transfer::TransferSettings {
            ttl: Duration::from_secs(1),
            ..chorus_mediaserver::transfer::TransferSettings::default()
        });
    let (_, _, issued) = issue_code(&http, &base, ROOM, a_id, &redeemed.token).await?;
    let expired = code_of(issued["url"].as_str().context("url")?)?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, body, _) = redeem_raw(&http, &base, &expired, "v=0\r\n").await?;
    ensure!(
        status == 410 && body.contains("code_expired"),
        "{status} {body}"
    );

    // The old device's token can no longer issue codes for the participant it gave away.
    let (status, _, body) = issue_code(&http, &base, ROOM, a_id, &a_token).await?;
    ensure!(
        status == 409 && body["reason"] == "moved",
        "{status} {body}"
    );

    // A code for a participant who left: 409.
    server
        .running
        .transfers
        .set_settings(chorus_mediaserver::transfer::TransferSettings::default());
    let b = server
        .join_bot(ROOM, "bea", BotConfig::new(AudioSource::Silence))
        .await?;
    let b_id = participant_id(&b)?;
    let b_token = server.token(ROOM, "bea");
    let (_, _, issued) = issue_code(&http, &base, ROOM, b_id, &b_token).await?;
    let b_code = code_of(issued["url"].as_str().context("url")?)?;
    b.leave(&[]).await?;
    let (status, body, _) = redeem_raw(&http, &base, &b_code, "v=0\r\n").await?;
    ensure!(
        status == 409 && body.contains("participant_gone"),
        "{status} {body}"
    );

    let metrics = server.running.metrics.encode();
    for outcome in [
        "ok",
        "code_used",
        "code_expired",
        "unknown_code",
        "participant_gone",
    ] {
        ensure!(
            metrics.contains(&format!(
                "chorus_transfer_redemptions_total{{outcome=\"{outcome}\"}}"
            )),
            "outcome {outcome} is counted"
        );
    }
    drop((a, a2, listener));
    Ok(())
}

/// Test 5: A (440 Hz) on server 0, L on server 1; A′ (660 Hz) redeems A's code through server 1,
/// which forwards it to server 0. It succeeds with A's id, A′ talks to server 0's media port, L
/// hears 660 Hz, and L's roster (its local participants) never changes while A stays listed as a
/// speaker of the other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_redeemed_at_another_server_is_forwarded_to_its_issuer() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let mut cluster =
        chorus_tests::mesh_cluster::MeshCluster::start(&["us", "eu"], 3, |_, b| b).await?;
    // The plan names each server's HTTP address (as the operator's plan does).
    let urls: Vec<String> = (0..2).map(|i| cluster.server(i).base_url.clone()).collect();
    cluster.update_plan(|plan| {
        for (node, url) in plan.nodes.iter_mut().zip(&urls) {
            node.signal = url.clone();
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster
        .server(1)
        .running
        .mesh
        .as_ref()
        .and_then(|n| n.signal_of("e2e-us-0"))
        .is_none()
    {
        ensure!(
            Instant::now() < deadline,
            "server 1 never learned server 0's address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = reqwest::Client::new();
    let (s0, s1) = (cluster.server(0), cluster.server(1));
    let a = s0
        .join_bot(ROOM, "ada", BotConfig::new(tone(440.0, -20.0)))
        .await?;
    let listener = s1
        .join_bot(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    let a_id = participant_id(&a)?;
    let l_token = s1.token(ROOM, "lars");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listener.heard(&[440.0]).contains(&440) {
        ensure!(Instant::now() < deadline, "L never heard A across the mesh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (http, base, token, stop) = (
            http.clone(),
            s1.base_url.clone(),
            l_token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut locals = BTreeSet::new();
            let (mut longest_without_a, mut since) = (Duration::ZERO, None::<Instant>);
            while !stop.load(Ordering::Relaxed) {
                let info = room_info(&http, &base, &token).await?;
                locals.insert(info["participants"].to_string());
                let a_listed = info["remote_speakers"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|r| r["identity"] == "ada"));
                match (a_listed, since) {
                    (false, None) => since = Some(Instant::now()),
                    (true, Some(t)) => {
                        longest_without_a = longest_without_a.max(t.elapsed());
                        since = None;
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(t) = since {
                longest_without_a = longest_without_a.max(t.elapsed());
            }
            anyhow::Ok((locals, longest_without_a))
        })
    };
    let (status, _, issued) =
        issue_code(&http, &s0.base_url, ROOM, a_id, &s0.token(ROOM, "ada")).await?;
    ensure!(status == 201, "{status} {issued}");
    let code = code_of(issued["url"].as_str().context("url")?)?;
    // Redeemed through server 1.
    let (a2, redeemed) =
        redeem_bot(&s1.base_url, &code, BotConfig::new(tone(660.0, -20.0))).await?;
    ensure!(redeemed.participant_id == a_id, "{redeemed:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (locals, longest_without_a) = watcher.await??;
    ensure!(locals.len() == 1, "L's roster changed: {locals:?}");
    ensure!(
        longest_without_a < Duration::from_millis(500),
        "A was missing from L's speakers for {longest_without_a:?}"
    );
    let heard = listener.heard(&[440.0, 660.0]);
    ensure!(
        heard.contains(&660) && !heard.contains(&440),
        "L hears A′ (660 Hz) in A's place: {heard:?}"
    );
    // A′'s media goes to the issuer: server 0 carries the participant, server 1 has only L.
    ensure!(
        s0.running.rooms.is_member(ROOM, a_id),
        "the participant stays on its server"
    );
    ensure!(
        s0.running
            .metrics
            .encode()
            .contains("chorus_transfer_redemptions_total{outcome=\"ok\"} 1")
            && s1
                .running
                .metrics
                .encode()
                .contains("chorus_transfer_redemptions_total{outcome=\"forwarded\"} 1"),
        "server 1 forwarded the code and server 0 redeemed it"
    );
    drop((a, a2, listener));
    Ok(())
}

/// A redemption reuses the participant's seat: a full room (and a full server) still takes the
/// move, while a new join is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_room_still_takes_a_move() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let server = MediaServer::start(|c| {
        c.max_room_participants = 2;
        c.max_participants = 2;
    })
    .await?;
    let http = reqwest::Client::new();
    let a = server
        .join_bot(ROOM, "ada", BotConfig::new(tone(440.0, -20.0)))
        .await?;
    let listener = server
        .join_bot(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    ensure!(
        server
            .join_bot(ROOM, "late", BotConfig::new(AudioSource::Silence))
            .await
            .is_err(),
        "the room is full for a new participant"
    );
    let a_id = participant_id(&a)?;
    let (_, _, issued) = issue_code(
        &http,
        &server.base_url,
        ROOM,
        a_id,
        &server.token(ROOM, "ada"),
    )
    .await?;
    let code = code_of(issued["url"].as_str().context("url")?)?;
    let (a2, redeemed) =
        redeem_bot(&server.base_url, &code, BotConfig::new(tone(660.0, -20.0))).await?;
    ensure!(redeemed.participant_id == a_id);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        listener.heard(&[660.0]).contains(&660),
        "the moved participant is heard in the full room"
    );
    drop((a, a2, listener));
    Ok(())
}
