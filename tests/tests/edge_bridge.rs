//! The edge bridge end to end (DESIGN §11, edge placement; US10334001B2's client that registers
//! as a phone): a `chorus-mediaserver edge` process registers with a real Kamailio as the
//! `chorus` line, takes call jobs from a media server process in edge mode, dials a real baresip
//! phone, and joins the room as a WebRTC participant. Every test asserts what each side hears,
//! what the call resource says, and what the bridge holds open.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chorus_tests::bot::{AudioSource, BotConfig, tone};
use chorus_tests::call_me::participant_id;
use chorus_tests::edge::{EdgeRig, ProcessSocket, RTP_PORTS};
use chorus_tests::telephony::{Answer, Baresip, BaresipOptions, CHORUS_USER, tone_levels};
use serde_json::{Value, json};

const ROOM: &str = "edge";

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["state"].as_str().map(str::to_owned))
        .collect()
}

/// The bridge's SIP port, from the binding it registered.
fn sip_port(rig: &EdgeRig) -> Result<u16> {
    let contacts = rig.kam.contacts(CHORUS_USER)?;
    let contact = contacts.first().context("the bridge is registered")?;
    let port = contact
        .rsplit(':')
        .next()
        .and_then(|p| p.split(';').next())
        .and_then(|p| p.trim_end_matches('>').parse().ok())
        .with_context(|| format!("a port in {contact}"))?;
    Ok(port)
}

/// Nothing listens on TCP; the UDP sockets are SIP plus, during a call, the phone's RTP (in the
/// configured range) and the WebRTC leg's one socket.
fn check_sockets(sockets: &[ProcessSocket], sip: u16, in_call: bool) -> Result<()> {
    let listening: Vec<_> = sockets.iter().filter(|s| s.listening).collect();
    ensure!(
        listening.is_empty(),
        "the bridge listens on TCP: {listening:?}"
    );
    let udp: Vec<_> = sockets.iter().filter(|s| s.protocol == "udp").collect();
    ensure!(
        udp.iter().any(|s| s.local.port() == sip),
        "no SIP socket on {sip}: {sockets:?}"
    );
    let rtp = udp
        .iter()
        .filter(|s| s.local.port() != sip && (RTP_PORTS.0..=RTP_PORTS.1).contains(&s.local.port()))
        .count();
    let expected = if in_call { 3 } else { 1 };
    ensure!(
        udp.len() == expected && rtp == usize::from(in_call),
        "UDP sockets: {udp:?} (expected SIP{})",
        if in_call {
            ", one RTP, one WebRTC"
        } else {
            " only"
        }
    );
    Ok(())
}

/// Test 1: the bridge registers, takes a job, dials the phone; the participant hears the
/// phone's 440 Hz and the phone hears the participant's 1000 Hz; a hang-up from the web and one
/// from the phone each end the call on both sides; the bridge holds no listening socket but SIP
/// and the call's media; after the call manager restarts, the line is back within one refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_registers_dials_and_bridges_audio_both_ways() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let expires = 12;
    let mut rig = EdgeRig::start(expires).await?;
    let caller = rig
        .join(ROOM, "wendy", BotConfig::new(tone(1000.0, -20.0)))
        .await?;
    let id = participant_id(&caller)?;
    let token = rig.token(ROOM, "wendy");
    let body = json!({"to": "1001", "participantId": id, "audio": "add"});

    // No bridge yet: the call fails at once, and says why.
    let (status, refused) = rig.api.create_call(&token, ROOM, &body).await?;
    ensure!(
        status == 503 && refused["reason"] == "no_edge_bridge",
        "{status} {refused}"
    );

    let bridge = rig.start_bridge()?;
    rig.kam
        .wait_contact(CHORUS_USER, Duration::from_secs(10), |_| true)
        .with_context(|| bridge.log())?;
    rig.wait_registered_bridges(1, Duration::from_secs(10))
        .await
        .with_context(|| bridge.log())?;
    let sip = sip_port(&rig)?;
    check_sockets(&bridge.sockets()?, sip, false)?;

    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1001")
            .tone(440.0)
            .answer(Answer::After(Duration::from_millis(500))),
    )?;
    let (status, call) = rig.api.create_call(&token, ROOM, &body).await?;
    ensure!(status == 202, "create: {status} {call}");
    ensure!(call["placement"] == "edge", "{call}");
    let call_id = call["id"].as_u64().context("call id")?;
    let api = rig.api.clone();
    let events = {
        let token = token.clone();
        tokio::spawn(async move {
            api.events(&token, ROOM, call_id, Duration::from_secs(40))
                .await
        })
    };
    let active = rig
        .api
        .wait_state(&token, ROOM, call_id, "active", Duration::from_secs(20))
        .await
        .with_context(|| format!("bridge log:\n{}", bridge.log()))?;
    ensure!(
        active["routing"]["method"] == "binding" && active["codec"] == "PCMU",
        "the bridge asked the call manager where the phone is and got G.711: {active}"
    );
    ensure!(active["phoneParticipantId"].as_u64().is_some(), "{active}");
    check_sockets(&bridge.sockets()?, sip, true)?;
    let roster = rig.api.roster(&token, ROOM).await?;
    ensure!(
        roster.iter().any(|p| p == "wendy (phone)"),
        "the phone is a participant: {roster:?}"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = caller.report_window(Some(Duration::from_secs(2)), &[440.0, 1000.0]);
    let tone_440 = heard.frequencies[0].level_dbfs;
    let tone_1000 = heard.frequencies[1].level_dbfs;
    ensure!(
        tone_440 > -35.0 && tone_440 > tone_1000 + 15.0,
        "the participant hears the phone's 440 Hz (and not itself): {heard:?}"
    );

    // Hang-up from the web: CANCEL/BYE from the bridge, the call ended everywhere.
    ensure!(rig.api.hang_up(&token, ROOM, call_id).await? == 202);
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let events = events.await??;
    ensure!(
        states(&events) == ["dialing", "ringing", "active", "ended"],
        "events: {events:?}"
    );
    ensure!(
        events.last().is_some_and(|e| e["endReason"] == "hangup"),
        "{events:?}"
    );
    let levels = tone_levels(&phone.recording()?, &[440.0, 1000.0])?;
    ensure!(
        levels[1] > -30.0 && levels[1] > levels[0] + 15.0,
        "the phone hears the participant's 1000 Hz, not its own 440 Hz: {levels:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let roster = rig.api.roster(&token, ROOM).await?;
        if !roster.iter().any(|p| p.contains("(phone)")) {
            break;
        }
        ensure!(Instant::now() < deadline, "the phone stayed: {roster:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The call's sockets are gone with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while check_sockets(&bridge.sockets()?, sip, false).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_sockets(&bridge.sockets()?, sip, false)?;

    // Hang-up from the phone: the call completes, the phone's participant leaves.
    let (status, call) = rig.api.create_call(&token, ROOM, &body).await?;
    ensure!(status == 202, "second call: {status} {call}");
    let second = call["id"].as_u64().context("call id")?;
    rig.api
        .wait_state(&token, ROOM, second, "active", Duration::from_secs(20))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    phone.hangup()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let call = rig.api.call(&token, ROOM, second).await?;
        if call["state"] == "ended" {
            break call;
        }
        ensure!(Instant::now() < deadline, "not ended: {call}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(ended["endReason"] == "completed", "{ended}");
    let roster = rig.api.roster(&token, ROOM).await?;
    ensure!(!roster.iter().any(|p| p.contains("(phone)")), "{roster:?}");
    let metrics = rig.api.metrics().await?;
    for outcome in ["hangup", "completed"] {
        ensure!(
            metrics.contains(&format!("chorus_calls_total{{outcome=\"{outcome}\"}} 1")),
            "{outcome}: {metrics}"
        );
    }

    // The call manager restarts and forgets every binding: the bridge's refresh (at 75 % of
    // the granted expiry) registers the line again.
    rig.kam.restart()?;
    let restarted = Instant::now();
    ensure!(
        !rig.kam.is_registered(CHORUS_USER)?,
        "a fresh Kamailio has no binding"
    );
    let refresh = Duration::from_secs(u64::from(expires) * 3 / 4);
    rig.kam
        .wait_contact(CHORUS_USER, refresh + Duration::from_secs(3), |_| true)
        .with_context(|| bridge.log())?;
    eprintln!(
        "the line was registered again {:.1} s after the call manager restarted (refresh every {refresh:?})",
        restarted.elapsed().as_secs_f64()
    );
    drop(phone);
    drop(caller);
    Ok(())
}

/// Test 2: a wrong, expired, revoked or foreign token is refused with 401 and a reason (counted,
/// and logged by the server and by a bridge that presents it); reports about calls a bridge was
/// not given, and malformed ones, are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edge_tokens_are_refused_with_their_reason() -> Result<()> {
    let rig = EdgeRig::start(60).await?;
    let http = reqwest::Client::new();
    let jobs = format!("{}/v1/telephony/edge/jobs", rig.server.base_url);
    let other_key =
        chorus_mediaserver::token::TokenKey::new(&chorus_tests::media_server::random_key())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = std::time::SystemTime::now();
    let conference = rig.server.conference().to_owned();
    let cases: Vec<(&str, Option<String>, &str, &str)> = vec![
        ("no token", None, "token_missing", "edge token"),
        (
            "another key",
            Some(other_key.mint_edge(&conference, "bridge-1", Duration::from_secs(60), now)),
            "token_invalid",
            "bad signature",
        ),
        (
            "expired",
            Some(rig.server.edge_token("bridge-1", Duration::ZERO)),
            "token_expired",
            "expired",
        ),
        (
            "another conference",
            Some(
                // Signed with this conference's key, but naming another conference.
                chorus_mediaserver::token::TokenKey::new(&std::fs::read(rig_key_file(&rig)?)?)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .mint_edge("elsewhere", "bridge-1", Duration::from_secs(60), now),
            ),
            "token_scope",
            "elsewhere",
        ),
        (
            "a join token",
            Some(rig.token(ROOM, "wendy")),
            "token_invalid",
            "claims",
        ),
        (
            "valid but not the Secret's",
            Some(rig.server.edge_token("bridge-2", Duration::from_secs(60))),
            "token_revoked",
            "current edge token",
        ),
    ];
    for (what, token, reason, says) in &cases {
        let mut request = http.get(&jobs);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let res = request.send().await?;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(
            status == 401 && body["reason"] == "edge_token",
            "{what}: {status} {body}"
        );
        let message = body["error"].as_str().unwrap_or_default();
        ensure!(
            message.contains(says),
            "{what}: {message:?} should say {says:?}"
        );
        let metrics = rig.api.metrics().await?;
        ensure!(
            metrics.contains(&format!(
                "chorus_edge_connections_refused_total{{reason=\"{reason}\"}}"
            )),
            "{what}: the refusal is counted by reason"
        );
    }
    ensure!(
        rig.server.log().contains("an edge bridge was refused"),
        "the server logs refusals"
    );

    // A bridge with an expired token is refused, says why, and keeps trying (it is not fatal:
    // a rotated Secret is picked up without a restart).
    let mut options = rig.bridge_options.clone();
    options.token = rig.server.edge_token("bridge-1", Duration::ZERO);
    let mut stale = chorus_tests::edge::BridgeProcess::start(&options)?;
    stale
        .wait_log(
            "refused this bridge's token (401): the edge token has expired",
            Duration::from_secs(10),
        )
        .await?;
    ensure!(!stale.exited(), "a refused bridge keeps retrying");
    drop(stale);

    // The right token opens the stream with a hello naming the conference's policy.
    let mut res = http
        .get(&jobs)
        .bearer_auth(&rig.bridge_options.token)
        .send()
        .await?;
    ensure!(res.status() == 200, "{}", res.status());
    let first = tokio::time::timeout(Duration::from_secs(5), res.chunk())
        .await??
        .context("a first chunk")?;
    let first = String::from_utf8_lossy(&first);
    ensure!(
        first.contains("event: hello") && first.contains("\"mode\":\"edge\""),
        "{first}"
    );
    ensure!(
        !first.contains("credentialsSecret\":\""),
        "no Secret names: {first}"
    );
    let bridge_id: u64 = first
        .split("\"bridgeId\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .context("a bridge id")?;

    // Reports: about a call this bridge does not carry (404), malformed (400).
    let report = json!({"bridgeId": bridge_id, "state": "ringing", "sipStatus": 180});
    let res = http
        .post(format!(
            "{}/v1/telephony/edge/calls/999",
            rig.server.base_url
        ))
        .bearer_auth(&rig.bridge_options.token)
        .json(&report)
        .send()
        .await?;
    ensure!(res.status() == 404, "unknown call: {}", res.status());
    let res = http
        .post(format!("{}/v1/telephony/edge/status", rig.server.base_url))
        .bearer_auth(&rig.bridge_options.token)
        .header("content-type", "application/json")
        .body(r#"{"bridgeId": 1, "registered": "yes"}"#)
        .send()
        .await?;
    ensure!(res.status() == 400, "malformed status: {}", res.status());
    let res = http
        .post(format!("{}/v1/telephony/edge/status", rig.server.base_url))
        .json(&json!({"bridgeId": bridge_id, "registered": true}))
        .send()
        .await?;
    ensure!(
        res.status() == 401,
        "a report without a token: {}",
        res.status()
    );
    drop(res);
    Ok(())
}

fn rig_key_file(rig: &EdgeRig) -> Result<std::path::PathBuf> {
    rig.server.key_file().context("the server's join key file")
}

/// Test 3: the conference server dies mid-call (SIGKILL) and comes back on the same ports: the
/// bridge ends the call in flight with `conference_lost` (the phone gets its BYE), reconnects
/// with backoff, and the next call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_ends_the_call_in_flight_and_the_next_call_works() -> Result<()> {
    let _heavy = chorus_tests::heavy_test_guard().await;
    let mut rig = EdgeRig::start(60).await?;
    let bridge = rig.start_bridge()?;
    rig.wait_registered_bridges(1, Duration::from_secs(15))
        .await
        .with_context(|| bridge.log())?;
    let phone = Baresip::start(&rig.kam, BaresipOptions::phone("1001").tone(440.0))?;
    let caller = rig
        .join(ROOM, "wendy", BotConfig::new(tone(1000.0, -20.0)))
        .await?;
    let token = rig.token(ROOM, "wendy");
    let body = json!({"to": "1001", "participantId": participant_id(&caller)?, "audio": "add"});
    let (status, call) = rig.api.create_call(&token, ROOM, &body).await?;
    ensure!(status == 202, "{status} {call}");
    let call_id = call["id"].as_u64().context("call id")?;
    rig.api
        .wait_state(&token, ROOM, call_id, "active", Duration::from_secs(20))
        .await
        .with_context(|| bridge.log())?;
    phone
        .wait_event("CALL_ESTABLISHED", Duration::from_secs(5))
        .await?;

    rig.server.kill();
    let died = Instant::now();
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(10))
        .await
        .with_context(|| bridge.log())?;
    eprintln!(
        "the phone was hung up {:.2} s after the server died",
        died.elapsed().as_secs_f64()
    );
    bridge
        .wait_log("conference_lost", Duration::from_secs(5))
        .await?;
    // Down for a while: the bridge keeps trying, backing off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.server.restart().await?;
    let restarted = Instant::now();
    rig.wait_registered_bridges(1, Duration::from_secs(20))
        .await
        .with_context(|| bridge.log())?;
    eprintln!(
        "the bridge was back {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    drop(caller);

    // The next call works: audio both ways again.
    let caller = rig
        .join(ROOM, "wendy", BotConfig::new(tone(1000.0, -20.0)))
        .await?;
    let listener = rig
        .join(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    let body = json!({"to": "1001", "participantId": participant_id(&caller)?, "audio": "add"});
    let (status, call) = rig.api.create_call(&token, ROOM, &body).await?;
    ensure!(status == 202, "after the restart: {status} {call}");
    let call_id = call["id"].as_u64().context("call id")?;
    rig.api
        .wait_state(&token, ROOM, call_id, "active", Duration::from_secs(20))
        .await
        .with_context(|| bridge.log())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = listener.heard(&[440.0]);
    ensure!(
        heard.contains(&440),
        "the listener hears the phone again: {heard:?}"
    );
    ensure!(rig.api.hang_up(&token, ROOM, call_id).await? == 202);
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let levels = tone_levels(&phone.recording()?, &[440.0, 1000.0])?;
    ensure!(
        levels[1] > -30.0 && levels[1] > levels[0] + 15.0,
        "the phone hears 1000 Hz again: {levels:?}"
    );
    drop(listener);
    drop(caller);
    Ok(())
}
