//! "Call me" end to end (DESIGN §11): a participant asks the conference to call a desk phone; the
//! media server asks Kamailio where the phone is registered, calls it with rsipstack, and the phone
//! becomes a room member. Real Kamailio, real baresip and SIPp phones, real WebRTC bots; every
//! test asserts what each side actually hears.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chorus_crds::SipTransport;
use chorus_tests::bot::{AudioSource, Bot, BotConfig, tone};
use chorus_tests::call_me::{CallMeRig, participant_id, telephony_plan};
use chorus_tests::telephony::{Answer, Baresip, BaresipOptions, Sipp, tone_levels};
use serde_json::{Value, json};

const ROOM: &str = "callme";

async fn join(rig: &CallMeRig, i: usize, who: &str, source: AudioSource) -> Result<Bot> {
    rig.server(i)
        .join_bot(ROOM, who, BotConfig::new(source))
        .await
}

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["state"].as_str().map(str::to_owned))
        .collect()
}

/// Test 1: G.711 both ways. A web participant at 1000 Hz calls extension 1001 (baresip at
/// 440 Hz); the phone hears 1000 Hz, another participant hears 440 Hz; the events go
/// `dialing → ringing → active`; the phone is in the roster only once active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g711_call_both_ways_through_kamailio() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| telephony_plan(kam, SipTransport::Udp),
        CallMeRig::password(),
    )
    .await?;
    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1001")
            .tone(440.0)
            .answer(Answer::After(Duration::from_millis(800))),
    )?;
    let caller = join(&rig, 0, "wendy", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    let id = participant_id(&caller)?;

    let (status, call) = rig
        .create_call(
            0,
            ROOM,
            "wendy",
            &json!({"to": "1001", "participantId": id, "audio": "add"}),
        )
        .await?;
    ensure!(status == 202, "create: {status} {call}");
    let call_id = call["id"].as_u64().context("call id")?;
    ensure!(call["state"] == "dialing", "{call}");
    let events = {
        let rig = &rig;
        async move {
            rig.events(0, ROOM, "wendy", call_id, Duration::from_secs(30))
                .await
        }
    };
    let (events, roster_before) = tokio::join!(events, async {
        // While dialing and ringing the phone is not in the roster.
        let mut seen_phone_early = false;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let call = rig.call(0, ROOM, "wendy", call_id).await?;
            ensure!(
                Instant::now() < deadline && call["state"] != "ended",
                "the call is not active: {call}\nphone log: {}",
                phone.log()
            );
            let roster = rig.roster(0, ROOM, "wendy").await?;
            let phone_listed = roster.iter().any(|p| p.contains("(phone)"));
            if call["state"] == "active" {
                ensure!(
                    call["routing"]["method"] == "binding",
                    "the call manager's binding should have been used: {call}"
                );
                ensure!(call["codec"] == "PCMU", "{call}");
                break;
            }
            if call["state"] != "active" && phone_listed {
                seen_phone_early = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Talk for a while, then hang up from the web side.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let heard = listener.heard(&[440.0, 1000.0]);
        let roster = rig.roster(0, ROOM, "wendy").await?;
        ensure!(
            rig.hang_up(0, ROOM, "wendy", call_id).await? == 202,
            "DELETE"
        );
        anyhow::Ok((seen_phone_early, heard, roster))
    });
    let events = events?;
    let (seen_phone_early, listener_heard, roster_active) = roster_before?;
    ensure!(!seen_phone_early, "the phone was listed before it answered");
    ensure!(
        roster_active.iter().any(|p| p == "wendy (phone)"),
        "the active phone is in the roster: {roster_active:?}"
    );
    ensure!(
        listener_heard.contains(&440),
        "the listener hears the phone's 440 Hz: {listener_heard:?}"
    );
    ensure!(
        states(&events) == ["dialing", "ringing", "active", "ended"],
        "events: {events:?}"
    );
    let last = events.last().context("an ended event")?;
    ensure!(last["endReason"] == "hangup", "{last}");

    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let levels = tone_levels(&phone.recording()?, &[440.0, 1000.0])?;
    ensure!(
        levels[1] > -30.0 && levels[1] > levels[0] + 15.0,
        "the phone hears 1000 Hz, not its own 440 Hz: {levels:?}"
    );
    let metrics = rig.metrics(0).await?;
    ensure!(
        metrics.contains("chorus_calls_total{outcome=\"hangup\"} 1"),
        "{metrics}"
    );
    ensure!(metrics.contains("chorus_phone_transcodes_total{direction=\"from_phone\"}"));
    // The phone left the room with the call.
    let roster = rig.roster(0, ROOM, "wendy").await?;
    ensure!(!roster.iter().any(|p| p.contains("(phone)")), "{roster:?}");
    drop(listener);
    drop(caller);
    let _ = Sipp::phone;
    Ok(())
}
