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
