//! One media server, real WebRTC bots: who hears whom, codec work per tick, and bad input.
//!
//! Every assertion is about what a listener actually hears (tones found by Goertzel in the audio
//! the bot decoded with libopus) or about the server's own metrics.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use chorus_tests::bot::{AudioSource, Bot, BotConfig, tone, tones as set};
use chorus_tests::heavy_test_guard;
use chorus_tests::media_server::{MediaServer, metric};

const FREQS: [f64; 5] = [300.0, 500.0, 700.0, 1100.0, 1300.0];

async fn join(server: &MediaServer, room: &str, who: &str, source: AudioSource) -> Result<Bot> {
    server.join_bot(room, who, BotConfig::new(source)).await
}

/// The tones a bot heard over the last two seconds.
fn heard(bot: &Bot) -> BTreeSet<u32> {
    bot.heard(&FREQS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_bots_each_hear_the_three_loudest_others() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let server = MediaServer::start(|c| c.top_speakers = 3).await?;
    // Loudest first; 1300 Hz is the quiet one.
    // Quiet enough that the mix of three never reaches the limiter (no intermodulation products).
    let levels = [-20.0, -24.0, -28.0, -34.0, -50.0];
    let mut bots = Vec::new();
    for (hz, level) in FREQS.iter().zip(levels) {
        bots.push(join(&server, "five", &format!("bot{hz}"), tone(*hz, level)).await?);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Every bot hears exactly the three loudest of the others, never itself.
    let expected: [&[u32]; 5] = [
        &[500, 700, 1100],
        &[300, 700, 1100],
        &[300, 500, 1100],
        &[300, 500, 700],
        &[300, 500, 700],
    ];
    for ((bot, hz), want) in bots.iter().zip(FREQS).zip(expected) {
        let got = heard(bot);
        assert_eq!(got, set(want), "bot {hz} Hz heard {got:?}");
        assert!(!got.contains(&(hz as u32)), "bot {hz} hears itself");
    }
    // The quiet bot is not mixed: nobody hears 1300 Hz.
    let report = bots[0].report_window(Some(Duration::from_secs(2)), &FREQS);
    let loud = report
        .frequencies
        .iter()
        .find(|f| f.freq_hz == 500.0)
        .map(|f| f.level_dbfs);
    let quiet = report
        .frequencies
        .iter()
        .find(|f| f.freq_hz == 1300.0)
        .map(|f| f.level_dbfs);
    assert!(
        quiet.unwrap_or(0.0) < loud.unwrap_or(-200.0) - 30.0,
        "1300 Hz leaks into the mix: {report:?}"
    );

    // The quiet bot gets loud: it replaces the quietest selected speaker (700 Hz at -28 dBFS).
    bots[4].set_level_dbfs(-18.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let expected: [&[u32]; 5] = [
        &[500, 1300, 700], // 300 is selected: top-3 of the others = 1300, 500, 700
        &[300, 1300, 700], // 500 likewise
        &[300, 500, 1300], // 700 is out of the top list: it hears the top three
        &[300, 500, 1300], // a listener hears the new top three
        &[300, 500, 700],  // 1300 is selected: the three loudest others
    ];
    for ((bot, hz), want) in bots.iter().zip(FREQS).zip(expected) {
        let got = heard(bot);
        let report = bot.report_window(Some(Duration::from_secs(2)), &FREQS);
        assert_eq!(
            got,
            set(want),
            "after the change, bot {hz} Hz heard {got:?}: {report:?}"
        );
    }
    let info: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/rooms/five", server.base_url))
        .bearer_auth(server.token("five", "observer"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        info["participants"].as_array().map(Vec::len),
        Some(5),
        "{info}"
    );
    assert_eq!(
        info["active_speakers"].as_array().map(Vec::len),
        Some(3),
        "{info}"
    );
    for bot in bots {
        bot.leave(&FREQS).await?;
    }
    Ok(())
}

/// (sum, count) of a histogram.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    (
        metric(text, &format!("{name}_sum")).unwrap_or(0.0),
        metric(text, &format!("{name}_count")).unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_listeners_cost_no_more_encodes_than_none() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let server = MediaServer::start(|c| c.top_speakers = 3).await?;
    let mut bots = Vec::new();
    for (hz, level) in [(300.0, -20.0), (500.0, -24.0), (700.0, -28.0)] {
        bots.push(join(&server, "big", &format!("speaker{hz}"), tone(hz, level)).await?);
    }
    for i in 0..50 {
        bots.push(
            join(
                &server,
                "big",
                &format!("listener{i}"),
                AudioSource::Silence,
            )
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = server.metrics();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.metrics();
    let (es0, ec0) = histogram(&before, "chorus_mixer_encodes_per_tick");
    let (es1, ec1) = histogram(&after, "chorus_mixer_encodes_per_tick");
    let ticks = ec1 - ec0;
    assert!(ticks > 50.0, "the mixer ticked only {ticks} times in 2 s");
    let encodes_per_tick = (es1 - es0) / ticks;
    assert_eq!(encodes_per_tick, 4.0, "3 local top speakers + 1 shared mix");
    let (ds0, dc0) = histogram(&before, "chorus_mixer_decodes_per_tick");
    let (ds1, dc1) = histogram(&after, "chorus_mixer_decodes_per_tick");
    let decodes_per_tick = (ds1 - ds0) / (dc1 - dc0);
    assert!(
        decodes_per_tick <= 3.0,
        "silent listeners are not decoded: {decodes_per_tick}"
    );
    assert_eq!(metric(&after, "chorus_participants"), Some(53.0));
    // Every tick reports how late it woke.
    let (_, lc0) = histogram(&before, "chorus_mixer_tick_lateness_seconds");
    let (_, lc1) = histogram(&after, "chorus_mixer_tick_lateness_seconds");
    // (A scrape can fall inside a tick, between its two observations: one either way each.)
    assert!(
        (lc1 - lc0 - ticks).abs() <= 2.0,
        "one lateness sample per tick: {} for {ticks} ticks",
        lc1 - lc0
    );
    // With three steady talkers the aligned tick runs before its deadline, as soon as all
    // three frames are here (DESIGN §13), at least now and then on this loaded machine.
    let (eas0, eac0) = histogram(&before, "chorus_mixer_tick_early_seconds");
    let (eas1, eac1) = histogram(&after, "chorus_mixer_tick_early_seconds");
    assert!(
        (eac1 - eac0 - ticks).abs() <= 2.0,
        "one early-tick sample per tick: {} for {ticks} ticks",
        eac1 - eac0
    );
    assert!(
        eas1 - eas0 > 0.0,
        "no tick ran before its deadline in {ticks} ticks"
    );

    // And the listeners hear the three speakers. With 53 real-time peers on two cores a bot can
    // miss a few frames, so each is judged on the best of three consecutive two-second windows.
    for (i, bot) in bots[3..].iter().enumerate().step_by(5) {
        assert!(bot.report(&FREQS).packets_received > 0 || i % 5 != 0);
        let mut got = heard(bot);
        for _ in 0..2 {
            if got == set(&[300, 500, 700]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            got = heard(bot);
        }
        let report = bot.report_window(Some(Duration::from_secs(2)), &FREQS);
        assert_eq!(got, set(&[300, 500, 700]), "listener {i}: {report:?}");
    }
    Ok(())
}

async fn post_offer(
    server: &MediaServer,
    room: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, serde_json::Value)> {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/rooms/{room}/participants", server.base_url))
        .header("Content-Type", "application/sdp")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_full_servers_refuse() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let server = MediaServer::start(|c| {
        c.max_room_participants = 2;
        c.max_participants = 3;
    })
    .await?;
    let token = server.token("lobby", "ada");

    let (status, body) =
        post_offer(&server, "lobby", Some(&token), "v=0\r\nthis is not sdp").await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("SDP"),
        "{body}"
    );

    let (status, body) = post_offer(&server, "lobby", None, "v=0").await?;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_missing"))
    );
    let forged = format!("{}x", &token[..token.len() - 1]);
    let (status, body) = post_offer(&server, "lobby", Some(&forged), "v=0").await?;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_invalid")),
        "{body}"
    );
    let expired = server.expired_token("lobby", "ada");
    let (status, body) = post_offer(&server, "lobby", Some(&expired), "v=0").await?;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_expired"))
    );
    let (status, body) = post_offer(&server, "other", Some(&token), "v=0").await?;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_scope")),
        "{body}"
    );
    let (status, _) = post_offer(&server, "bad room!", Some(&token), "v=0").await?;
    assert_eq!(status, 400);

    // Room of two: the third is refused with 403, the server of three: the fourth with 503.
    let a = join(&server, "lobby", "a", tone(300.0, -12.0)).await?;
    let b = join(&server, "lobby", "b", tone(500.0, -12.0)).await?;
    let err = join(&server, "lobby", "c", tone(700.0, -12.0))
        .await
        .err()
        .context("room full")?;
    assert!(
        format!("{err:#}").contains("403") && format!("{err:#}").contains("room is full"),
        "{err:#}"
    );
    let c = join(&server, "side", "c", tone(700.0, -12.0)).await?;
    let err = join(&server, "side", "d", tone(900.0, -12.0))
        .await
        .err()
        .context("server full")?;
    assert!(format!("{err:#}").contains("503"), "{err:#}");

    // Garbage on the media port: dropped and counted; a and b keep hearing each other.
    let garbage = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut rng_state = 0x1234_5678_u32;
    for i in 0..500 {
        let len = (i % 200) + 1;
        let datagram: Vec<u8> = (0..len)
            .map(|_| {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 17;
                rng_state ^= rng_state << 5;
                rng_state as u8
            })
            .collect();
        garbage.send_to(&datagram, server.udp).await?;
        // An RTP-looking header (version 2, payload type 111) from an unknown address.
        let rtp = [
            0x80u8, 111, 0, i as u8, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3,
        ];
        garbage.send_to(&rtp, server.udp).await?;
        if i % 20 == 0 {
            // Paced, so the kernel's socket buffer does not drop what we want counted.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = server.metrics();
    let dropped = metric(&text, "chorus_media_dropped_total{reason=\"malformed\"}").unwrap_or(0.0)
        + metric(&text, "chorus_media_dropped_total{reason=\"unroutable\"}").unwrap_or(0.0);
    assert!(
        dropped >= 950.0,
        "of 1000 garbage datagrams, counted: {dropped}"
    );
    assert_eq!(heard(&a), set(&[500]));
    assert_eq!(heard(&b), set(&[300]));
    let rejected = metric(&text, "chorus_joins_rejected_total{reason=\"room_full\"}");
    assert_eq!(rejected, Some(1.0));
    for bot in [a, b, c] {
        bot.leave(&FREQS).await?;
    }
    Ok(())
}
