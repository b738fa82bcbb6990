//! Self-test of the telephony harness (`chorus_tests::telephony`) that the "call me" tests build
//! on: Kamailio starts and answers, a baresip desk phone registers, a SIPp caller authenticated
//! as `chorus` reaches that phone through Kamailio (and the phone records the caller's tone),
//! and a SIPp busy phone answers a call with 486.
//!
//! The peers are real programs installed by `scripts/bootstrap`; a missing one fails the test
//! with a message saying so, never skips it.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chorus_tests::telephony::{
    Baresip, BaresipOptions, Kamailio, Sipp, SippOptions, dominant_tone, tone_levels,
};

#[tokio::test]
async fn kamailio_baresip_and_sipp_reach_each_other() -> Result<()> {
    let started = Instant::now();
    let kamailio = Kamailio::start()?;
    ensure!(
        kamailio.kamcmd(&["core.uptime"])?.contains("uptime"),
        "core.uptime"
    );
    println!(
        "kamailio up at {} after {:?}",
        kamailio.uri(),
        started.elapsed()
    );

    // A desk phone registers with digest auth (401 first).
    let phone = Baresip::start(&kamailio, BaresipOptions::phone("1001"))?;
    let dump = kamailio.ul_dump()?;
    ensure!(dump.contains("AoR: 1001"), "ul.dump lacks 1001:\n{dump}");
    println!("baresip 1001 registered after {:?}", started.elapsed());

    // The media server's stand-in: SIPp as `chorus` (407, digest), 1000 Hz for 2 s, then BYE.
    let mut caller = Sipp::call_with(
        &kamailio,
        "1001",
        "uac_auth.xml",
        SippOptions {
            pause: Duration::from_secs(2),
            ..SippOptions::default()
        },
    )?;
    caller.wait_success().await?;
    let statuses = caller.received_statuses();
    ensure!(
        statuses.contains(&407) && statuses.contains(&200),
        "the caller should see 407 then 200, saw {statuses:?}"
    );
    // baresip closes the recording when it sees the BYE, just after SIPp's 200 arrives.
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let heard = phone.recording()?;
    let levels = tone_levels(&heard, &[440.0, 1000.0])?;
    println!(
        "baresip heard {} with levels {levels:?} (440, 1000 Hz)",
        heard.display()
    );
    ensure!(
        dominant_tone(&heard, &[440.0, 1000.0])? == Some(1000.0),
        "the phone should hear the caller's 1000 Hz; levels {levels:?} in {}",
        heard.display()
    );
    println!("call to baresip done after {:?}", started.elapsed());

    // A busy phone: 1002 registered by one SIPp, answering from another.
    let mut busy = Sipp::phone(&kamailio, "1002", "phone_busy.xml")?;
    ensure!(
        kamailio.contacts("1002")? == [format!("sip:1002@{}", busy.sip_addr())],
        "1002 should be bound to the busy phone only: {:?}",
        kamailio.contacts("1002")?
    );
    let mut caller = Sipp::call(&kamailio, "1002", "uac_reject.xml")?;
    caller.wait_success().await?;
    busy.wait_success().await?;
    ensure!(
        caller.received_statuses().last() == Some(&486),
        "the caller should end with 486, saw {:?}",
        caller.received_statuses()
    );
    ensure!(
        busy.sent_statuses() == [486],
        "the busy phone sent {:?}",
        busy.sent_statuses()
    );
    println!("busy phone done after {:?}", started.elapsed());
    Ok(())
}

/// Every other piece of the harness once, with baresip as the caller: TLS with SRTP, Opus, an
/// answer delay, and the SIPp phones that ring unanswered, hang up, press a key, stay silent, and
/// talk. About 15 s; run with `--ignored` after changing the harness or its fixtures.
#[tokio::test]
#[ignore = "harness coverage, ~15 s: run with --ignored after changing the harness"]
async fn every_peer_and_scenario_once() -> Result<()> {
    use chorus_tests::telephony::{Answer, Codec, wav_rms_dbfs};
    let started = Instant::now();
    let kamailio = Kamailio::start()?;
    let wait = Duration::from_secs(10);

    // TLS + SRTP both ways, tones both ways.
    let tls_phone = Baresip::start(&kamailio, BaresipOptions::phone("1003").tls_srtp())?;
    let tls_caller = Baresip::start(
        &kamailio,
        BaresipOptions::phone("1004").tls_srtp().tone(1000.0),
    )?;
    tls_caller.dial_user(&kamailio, "1003")?;
    tls_phone.wait_event("CALL_ESTABLISHED", wait).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let 2 s of audio flow
    tls_caller.hangup()?;
    tls_phone.wait_event("CALL_CLOSED", wait).await?;
    ensure!(tls_phone.log().contains("SRTP is Enabled"), "no SRTP");
    ensure!(dominant_tone(&tls_phone.recording()?, &[440.0, 1000.0])? == Some(1000.0));
    tls_caller.wait_event("CALL_CLOSED", wait).await?;
    ensure!(dominant_tone(&tls_caller.recording()?, &[440.0, 1000.0])? == Some(440.0));
    drop((tls_phone, tls_caller));
    println!("TLS/SRTP done after {:?}", started.elapsed());

    // Opus, answered after 1 s of ringing.
    let opus = vec![Codec::opus()];
    let phone = Baresip::start(
        &kamailio,
        BaresipOptions::phone("1001")
            .codecs(opus.clone())
            .answer(Answer::After(Duration::from_secs(1))),
    )?;
    let caller = Baresip::start(
        &kamailio,
        BaresipOptions::phone("1004").codecs(opus).tone(1000.0),
    )?;
    let dialled = Instant::now();
    caller.dial_user(&kamailio, "1001")?;
    caller.wait_event("CALL_RINGING", wait).await?;
    caller.wait_event("CALL_ESTABLISHED", wait).await?;
    ensure!(
        dialled.elapsed() >= Duration::from_secs(1),
        "answered too early"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    caller.hangup()?;
    phone.wait_event("CALL_CLOSED", wait).await?;
    ensure!(phone.log().contains("Set audio encoder: opus"), "no opus");
    ensure!(dominant_tone(&phone.recording()?, &[440.0, 1000.0])? == Some(1000.0));
    drop(phone);
    println!("opus + answer delay done after {:?}", started.elapsed());

    // SIPp phones, called by the baresip caller (1004, G.711 now).
    let caller = {
        drop(caller);
        Baresip::start(&kamailio, BaresipOptions::phone("1004").tone(1000.0))?
    };

    let mut ringing = Sipp::phone(&kamailio, "1002", "phone_noanswer.xml")?;
    caller.dial_user(&kamailio, "1002")?;
    caller.wait_event("CALL_RINGING", wait).await?;
    caller.hangup()?;
    ringing.wait_success().await?;
    ensure!(
        ringing.sent_statuses().contains(&487),
        "{:?}",
        ringing.sent_statuses()
    );
    drop(ringing);

    let mut hanging = Sipp::phone_with(
        &kamailio,
        "1002",
        "phone_hangup.xml",
        SippOptions {
            pause: Duration::from_millis(1500),
            ..SippOptions::default()
        },
    )?;
    caller.dial_user(&kamailio, "1002")?;
    caller.wait_event("CALL_ESTABLISHED", wait).await?;
    hanging.wait_success().await?;
    caller.wait_event("CALL_CLOSED", wait).await?;
    ensure!(dominant_tone(&caller.recording()?, &[440.0, 1000.0])? == Some(440.0));
    drop(hanging);

    let mut dtmf = Sipp::phone_with(
        &kamailio,
        "1002",
        "phone_dtmf.xml",
        SippOptions {
            dtmf_digit: '5',
            pause: Duration::from_millis(500),
            ..SippOptions::default()
        },
    )?;
    caller.dial_user(&kamailio, "1002")?;
    let digit = caller.wait_event("CALL_DTMF_START", wait).await?;
    println!("DTMF event at the caller: {digit}");
    caller.hangup()?;
    dtmf.wait_success().await?;
    caller.wait_event("CALL_CLOSED", wait).await?;
    drop(dtmf);

    let mut silent = Sipp::phone(&kamailio, "1002", "phone_silent.xml")?;
    caller.dial_user(&kamailio, "1002")?;
    caller.wait_event("CALL_ESTABLISHED", wait).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    caller.hangup()?;
    silent.wait_success().await?;
    caller.wait_event("CALL_CLOSED", wait).await?;
    let rms = wav_rms_dbfs(&caller.recording()?)?;
    ensure!(rms < -60.0, "a silent phone reads {rms} dBFS");
    drop(silent);

    let mut talking = Sipp::phone_with(
        &kamailio,
        "1002",
        "phone_talk.xml",
        SippOptions {
            pause: Duration::from_millis(500),
            tone_hz: Some(700.0),
            ..SippOptions::default()
        },
    )?;
    caller.dial_user(&kamailio, "1002")?;
    caller.wait_event("CALL_ESTABLISHED", wait).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    caller.hangup()?;
    talking.wait_success().await?;
    caller.wait_event("CALL_CLOSED", wait).await?;
    ensure!(dominant_tone(&caller.recording()?, &[440.0, 700.0, 1000.0])? == Some(700.0));
    println!("SIPp phones done after {:?}", started.elapsed());

    // Accounts and restart.
    kamailio.add_user("1005", "secret")?;
    kamailio.refuse_binding_query("1001")?;
    let mut kamailio = kamailio;
    drop(caller);
    kamailio.restart()?;
    ensure!(
        !kamailio.is_registered("1004")?,
        "bindings survive a restart?"
    );
    println!("all done after {:?}", started.elapsed());
    Ok(())
}
