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
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
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
    Ok(())
}

/// Hangs call `id` up from the web side, waits for the phone to close it, and checks the phone's
/// recording is dominated by the caller's 1000 Hz over its own 440 Hz.
async fn hang_up_and_check_phone_heard_caller(
    rig: &CallMeRig,
    who: &str,
    id: u64,
    phone: &Baresip,
) -> Result<()> {
    ensure!(rig.hang_up(0, ROOM, who, id).await? == 202, "DELETE");
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let levels = tone_levels(&phone.recording()?, &[440.0, 1000.0])?;
    ensure!(
        levels[1] > -30.0 && levels[1] > levels[0] + 15.0,
        "the phone hears the caller's 1000 Hz, not its own 440 Hz: {levels:?}"
    );
    Ok(())
}

/// Places a call from `caller` (identity `who`, on server `i`) to `to`, waits until it is active
/// and returns its id.
async fn call_active(rig: &CallMeRig, i: usize, who: &str, caller: &Bot, to: &str) -> Result<u64> {
    let (status, call) = rig
        .create_call(
            i,
            ROOM,
            who,
            &json!({"to": to, "participantId": participant_id(caller)?, "audio": "add"}),
        )
        .await?;
    ensure!(status == 202, "create: {status} {call}");
    let id = call["id"].as_u64().context("call id")?;
    rig.wait_state(i, ROOM, who, id, "active", Duration::from_secs(15))
        .await?;
    Ok(id)
}

/// Test 2: an Opus phone passes through untranscoded, tones both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_phone_passes_through_without_transcoding() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| {
            let mut t = telephony_plan(kam, SipTransport::Udp);
            t.codecs = vec![chorus_crds::PhoneCodec::Opus, chorus_crds::PhoneCodec::Pcmu];
            t
        },
        CallMeRig::password(),
    )
    .await?;
    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1002")
            .tone(440.0)
            .codecs(vec![chorus_tests::telephony::Codec::opus()]),
    )?;
    let caller = join(&rig, 0, "olga", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    let id = call_active(&rig, 0, "olga", &caller, "1002").await?;
    let call = rig.call(0, ROOM, "olga", id).await?;
    ensure!(call["codec"] == "opus", "{call}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = listener.heard(&[440.0, 1000.0]);
    ensure!(
        heard.contains(&440),
        "the listener hears the phone: {heard:?}"
    );
    hang_up_and_check_phone_heard_caller(&rig, "olga", id, &phone).await?;
    let metrics = rig.metrics(0).await?;
    ensure!(
        !metrics.contains("chorus_phone_transcodes_total{"),
        "an Opus phone is never transcoded:\n{metrics}"
    );
    ensure!(metrics.contains("chorus_phone_rtp_packets_total{direction=\"in\"}"));
    Ok(())
}

/// Test 4: SIP over TLS with SRTP required: tones both ways, the phone says SRTP is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_signalling_with_required_srtp() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| {
            let mut t = telephony_plan(kam, SipTransport::Tls);
            t.media_encryption = chorus_crds::MediaEncryption::Required;
            t
        },
        CallMeRig::password(),
    )
    .await?;
    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1003").tone(440.0).tls_srtp(),
    )?;
    let caller = join(&rig, 0, "tess", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    let id = call_active(&rig, 0, "tess", &caller, "1003")
        .await
        .with_context(|| format!("phone log:\n{}", phone.log()))?;
    let call = rig.call(0, ROOM, "tess", id).await?;
    ensure!(call["encrypted"] == true, "{call}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = listener.heard(&[440.0, 1000.0]);
    ensure!(
        heard.contains(&440),
        "the listener hears the phone over SRTP: {heard:?}"
    );
    hang_up_and_check_phone_heard_caller(&rig, "tess", id, &phone).await?;
    ensure!(
        phone.log().contains("SRTP is Enabled"),
        "the phone's log shows SRTP:\n{}",
        phone.log()
    );
    Ok(())
}

/// Test 5: DTMF from the phone is counted and never heard: no energy at its two frequencies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_is_counted_and_never_heard() -> Result<()> {
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let mut sipp = Sipp::phone_with(
        &rig.kam,
        "1004",
        "phone_dtmf.xml",
        chorus_tests::telephony::SippOptions {
            dtmf_digit: '5',
            pause: Duration::from_millis(500),
            ..Default::default()
        },
    )?;
    let caller = join(&rig, 0, "dora", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    let id = call_active(&rig, 0, "dora", &caller, "1004").await?;
    // Wait for the key press to be counted.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let metrics = rig.metrics(0).await?;
        if metrics.contains("chorus_phone_dtmf_events_total 1") {
            break;
        }
        ensure!(Instant::now() < deadline, "no DTMF counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // '5' is 770 Hz + 1336 Hz.
    let report = listener.report(&[770.0, 1336.0, 1000.0]);
    for f in &report.frequencies[..2] {
        ensure!(!f.present, "DTMF must never be mixed as audio: {report:?}");
    }
    ensure!(rig.hang_up(0, ROOM, "dora", id).await? == 202);
    sipp.wait().await?;
    Ok(())
}

/// Test 6: a phone called through server A is heard by a participant on server B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_called_in_one_region_is_heard_in_another() -> Result<()> {
    let rig = CallMeRig::start(
        &["us", "eu"],
        |kam| telephony_plan(kam, SipTransport::Udp),
        CallMeRig::password(),
    )
    .await?;
    let _phone = Baresip::start(&rig.kam, BaresipOptions::phone("1001").tone(440.0))?;
    let caller = join(&rig, 0, "uma", tone(1000.0, -20.0)).await?;
    let far = join(&rig, 1, "emil", AudioSource::Silence).await?;
    let id = call_active(&rig, 0, "uma", &caller, "1001").await?;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let heard = far.heard(&[440.0]);
        if heard.contains(&440) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the listener in eu never heard the phone: {:?}",
            far.report_window(Some(Duration::from_secs(2)), &[440.0, 1000.0])
        );
    }
    ensure!(rig.hang_up(0, ROOM, "uma", id).await? == 202);
    Ok(())
}

/// Test 8: as a user would. `chorus-operator local -f conf.yaml` with a `telephony` block pointing
/// at a Kamailio on loopback and `pbx.yaml` (a Secret manifest) beside it; a participant joins with
/// the printed join URL's token, `POST`s a call to 1001 and polls until it is active; the phone
/// hears the participant and the participant's room hears the phone; the servers' logs name
/// neither the number nor the line's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_reads_the_pbx_secret_and_calls_a_phone() -> Result<()> {
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    let kam = chorus_tests::telephony::Kamailio::start()?;
    // A distinctive extension, so the logs can be searched for it.
    const NUMBER: &str = "735193";
    kam.add_user(NUMBER, &chorus_tests::telephony::phone_password(NUMBER))?;
    let phone = Baresip::start(&kam, BaresipOptions::phone(NUMBER).tone(440.0))?;
    let dir = std::env::temp_dir().join(format!(
        "chorus-local-phone-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    let sip_port = chorus_tests::free_udp_addr()?.port();
    std::fs::write(
        dir.join("conf.yaml"),
        format!(
            "apiVersion: chorus.dev/v1alpha1\nkind: Conference\nmetadata:\n  name: phones\n\
             spec:\n  regions:\n    - name: local\n      replicas: 1\n      nodeSelector: {{}}\n  \
             media:\n    udpPort: 43100\n  \
             telephony:\n    callManagerUri: {}\n    credentialsSecretRef:\n      name: pbx\n    \
             codecs: [PCMU]\n    sipPort: {sip_port}\n",
            kam.uri()
        ),
    )?;
    std::fs::write(
        dir.join("pbx.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: pbx\nstringData:\n  username: chorus\n  \
         password: chorus-secret\n",
    )?;
    let mut child = tokio::process::Command::new(chorus_tests::operator_bin()?)
        .args(["local", "-f"])
        .arg(dir.join("conf.yaml"))
        .args(["--base-port", "29180", "--room", "phoneroom", "--workdir"])
        .arg(dir.join("work"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let join_line = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("chorus: join at ") {
                return anyhow::Ok(line);
            }
        }
        anyhow::bail!("chorus-operator local ended before printing a join URL")
    })
    .await
    .context("no join URL within 60 s")??;
    let url = join_line
        .trim_start_matches("chorus: join at ")
        .split(' ')
        .next()
        .context("join URL")?
        .to_owned();
    let parsed = reqwest::Url::parse(&url)?;
    let base = format!(
        "http://{}:{}",
        parsed.host_str().context("host")?,
        parsed.port().context("port")?
    );
    let token = parsed
        .query_pairs()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .context("token")?;
    let caller = Bot::join_http(
        &base,
        "phoneroom",
        &token,
        BotConfig::new(tone(1000.0, -20.0)),
    )
    .await?;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{base}/v1/rooms/phoneroom/calls"))
        .bearer_auth(&token)
        .json(&json!({"to": NUMBER, "participantId": participant_id(&caller)?, "audio": "add"}))
        .send()
        .await?;
    ensure!(res.status() == 202, "create: {}", res.status());
    let location = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("Location")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let call: Value = http
            .get(format!("{base}{location}"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if call["state"] == "active" {
            break;
        }
        ensure!(
            Instant::now() < deadline && call["state"] != "ended",
            "the call did not become active: {call}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = caller.heard(&[440.0]);
    ensure!(
        heard.contains(&440),
        "the caller hears the phone: {heard:?}"
    );
    let res = http
        .delete(format!("{base}{location}"))
        .bearer_auth(&token)
        .send()
        .await?;
    ensure!(res.status() == 202, "DELETE: {}", res.status());
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let levels = tone_levels(&phone.recording()?, &[440.0, 1000.0])?;
    ensure!(
        levels[1] > -30.0 && levels[1] > levels[0] + 15.0,
        "the phone hears the caller: {levels:?}"
    );
    drop(child);
    // Numbers are personal data and the line's password a secret: neither is in any log of the
    // servers (the call was logged, by a hash of the number).
    let logs = dir.join("work/logs");
    let mut read = 0;
    for entry in std::fs::read_dir(&logs)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        read += text.len();
        let leaks: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(NUMBER) || l.contains("chorus-secret"))
            .collect();
        ensure!(
            leaks.is_empty(),
            "{} names the number or the password:\n{}",
            path.display(),
            leaks.join("\n")
        );
    }
    ensure!(
        read > 0,
        "the servers logged something under {}",
        logs.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// SIP over TCP to a call manager that hides where phones are (the line's binding query gets 403):
/// the INVITE goes to the address of record through the proxy, whose location lookup routes it;
/// an A-law phone, tones both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_through_the_proxy_when_the_line_may_not_query() -> Result<()> {
    let rig = CallMeRig::one_server(SipTransport::Tcp).await?;
    rig.kam
        .refuse_binding_query(chorus_tests::telephony::CHORUS_USER)?;
    // An A-law phone (PCMA only): the other G.711 law end to end.
    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1002")
            .tone(440.0)
            .codecs(vec![chorus_tests::telephony::Codec::pcma()]),
    )?;
    let caller = join(&rig, 0, "tom", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    let id = call_active(&rig, 0, "tom", &caller, "1002").await?;
    let call = rig.call(0, ROOM, "tom", id).await?;
    ensure!(
        call["routing"]["method"] == "proxy" && call["routing"]["queryStatus"] == 403,
        "the refused query sends the call through the proxy: {call}"
    );
    ensure!(call["codec"] == "PCMA", "{call}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = listener.heard(&[440.0, 1000.0]);
    ensure!(
        heard.contains(&440),
        "the listener hears the phone: {heard:?}"
    );
    hang_up_and_check_phone_heard_caller(&rig, "tom", id, &phone).await?;
    Ok(())
}

/// With the default `audio: replace`, the requester's web microphone is muted while its phone is
/// active, and heard again once the phone hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phone_replaces_the_web_microphone_while_active() -> Result<()> {
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let phone = Baresip::start(&rig.kam, BaresipOptions::phone("1003").tone(440.0))?;
    let caller = join(&rig, 0, "rita", tone(700.0, -20.0)).await?;
    let listener = join(&rig, 0, "lars", AudioSource::Silence).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = listener.heard(&[440.0, 700.0]);
    ensure!(
        before.contains(&700),
        "the web microphone before: {before:?}"
    );
    let (status, call) = rig
        .create_call(
            0,
            ROOM,
            "rita",
            &json!({"to": "1003", "participantId": participant_id(&caller)?}),
        )
        .await?;
    ensure!(status == 202, "create: {status} {call}");
    let id = call["id"].as_u64().context("call id")?;
    rig.wait_state(0, ROOM, "rita", id, "active", Duration::from_secs(15))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = listener.heard(&[440.0, 700.0]);
    ensure!(
        during.contains(&440) && !during.contains(&700),
        "while the phone is active, the phone replaces the web microphone: {during:?}"
    );
    // Nobody else talks, so the phone's mix is silence, and its frames keep flowing anyway (a
    // phone with an RTP timeout would hang up otherwise): about 50 a second.
    let active_for = Instant::now();
    let out = |m: &str| {
        chorus_tests::media_server::metric_sum(
            m,
            "chorus_phone_rtp_packets_total",
            &["direction=\"out\""],
        )
    };
    let first = out(&rig.metrics(0).await?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = out(&rig.metrics(0).await?) - first;
    let per_second = sent / active_for.elapsed().as_secs_f64();
    ensure!(
        per_second > 40.0,
        "{per_second:.1} packets a second to a phone that hears silence"
    );
    ensure!(rig.hang_up(0, ROOM, "rita", id).await? == 202);
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = listener.heard(&[440.0, 700.0]);
    ensure!(
        after.contains(&700) && !after.contains(&440),
        "after the call, the web microphone again: {after:?}"
    );
    Ok(())
}
