//! "Call me" outcomes and abuse (DESIGN §11): every way a call to a desk phone can end, each with
//! its `endReason`, SIP status and `chorus_calls_total` outcome (issue test 3), and what the calls
//! API refuses, what garbage on the SIP and RTP ports does not break, and what never leaks
//! (issue test 7). Real Kamailio, baresip and SIPp phones, real WebRTC bots.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chorus_crds::SipTransport;
use chorus_tests::bot::{AudioSource, Bot, BotConfig, tone};
use chorus_tests::call_me::{CallMeRig, participant_id, telephony_plan};
use chorus_tests::media_server::{MediaServer, metric_sum};
use chorus_tests::mesh_cluster::MeshCluster;
use chorus_tests::telephony::{Answer, Baresip, BaresipOptions, CHORUS_PASSWORD, Sipp};
use rand::Rng;
use serde_json::{Value, json};

const ROOM: &str = "callme";

async fn join(rig: &CallMeRig, who: &str, source: AudioSource) -> Result<Bot> {
    rig.server(0)
        .join_bot(ROOM, who, BotConfig::new(source))
        .await
}

/// Place a call as `identity` for participant `id`; it must be accepted (202, `dialing`).
async fn place(rig: &CallMeRig, identity: &str, body: &Value) -> Result<u64> {
    let (status, call) = rig.create_call(0, ROOM, identity, body).await?;
    ensure!(status == 202, "create {body}: {status} {call}");
    ensure!(call["state"] == "dialing", "{call}");
    call["id"].as_u64().context("call id")
}

/// Poll call `id` until it has ended: the call then.
async fn ended(rig: &CallMeRig, identity: &str, id: u64, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let call = rig.call(0, ROOM, identity, id).await?;
        if call["state"] == "ended" {
            return Ok(call);
        }
        ensure!(
            Instant::now() < deadline,
            "call {id} has not ended after {timeout:?}: {call}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn states(call: &Value) -> Vec<String> {
    call["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["state"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The call ended with `reason` and, when given, `sip_status`; its last event says the same.
fn ensure_end(call: &Value, reason: &str, sip_status: Option<u16>) -> Result<()> {
    ensure!(call["state"] == "ended", "{call}");
    ensure!(
        call["endReason"] == reason,
        "endReason {reason} expected: {call}"
    );
    if let Some(status) = sip_status {
        ensure!(
            call["sipStatus"] == status,
            "sipStatus {status} expected: {call}"
        );
    }
    let last = call["events"]
        .as_array()
        .and_then(|e| e.last())
        .context("events")?;
    ensure!(
        last["state"] == "ended" && last["endReason"] == reason,
        "the last event is the end: {call}"
    );
    ensure!(
        states(call).iter().filter(|s| *s == "ended").count() == 1,
        "ended exactly once: {call}"
    );
    Ok(())
}

/// SIPp finished its scenario successfully (it checks what it received: CANCEL, BYE, ACK...).
async fn sipp_success(phone: &mut Sipp, what: &str) -> Result<()> {
    let wait = tokio::time::timeout(Duration::from_secs(15), phone.wait_success()).await;
    ensure!(
        matches!(wait, Ok(Ok(()))),
        "SIPp {what}: {wait:?}\nmessages:\n{}",
        phone.messages()
    );
    Ok(())
}

fn ensure_outcome(metrics: &str, outcome: &str, count: u32) -> Result<()> {
    let line = format!("chorus_calls_total{{outcome=\"{outcome}\"}} {count}");
    ensure!(
        metrics.lines().any(|l| l == line),
        "{line} expected in:\n{}",
        calls_lines(metrics)
    );
    Ok(())
}

/// The sample line of metric `name` (no labels), as printed.
fn metric_line(metrics: &str, name: &str) -> String {
    metrics
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or_default()
        .to_owned()
}

fn calls_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with("chorus_call"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Test 3 (outcomes): one rig, one caller, one call after another, each ending its own way:
/// busy (486), declined (603), an extension nobody registered (404), no answer within the
/// request's ring timeout (CANCEL, 487), the phone hanging up (`completed`), the web hanging up
/// while it rings (`cancelled`, CANCEL) and once answered (`hangup`, BYE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_call_ends() -> Result<()> {
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let caller = join(&rig, "wendy", tone(1000.0, -20.0)).await?;
    let id = participant_id(&caller)?;
    let call_to = |to: &str| json!({"to": to, "participantId": id, "audio": "add"});

    // Busy: 486 from the phone.
    let mut busy = Sipp::phone(&rig.kam, "1001", "phone_busy.xml")?;
    let call_id = place(&rig, "wendy", &call_to("1001")).await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(10)).await?;
    ensure_end(&call, "busy", Some(486))?;
    ensure!(states(&call) == ["dialing", "ended"], "{call}");
    sipp_success(&mut busy, "busy (its ACK)").await?;
    // A finished SIPp phone stays bound until dropped, and the first binding is the one dialled.
    drop(busy);

    // Declined: 603.
    let mut declined = Sipp::phone(&rig.kam, "1002", "phone_decline.xml")?;
    let call_id = place(&rig, "wendy", &call_to("1002")).await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(10)).await?;
    ensure_end(&call, "declined", Some(603))?;
    sipp_success(&mut declined, "decline (its ACK)").await?;
    drop(declined);

    // Nobody registered 1004: the call manager has no binding (404 Not Registered).
    let call_id = place(&rig, "wendy", &call_to("1004")).await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(10)).await?;
    ensure_end(&call, "not_registered", Some(404))?;
    ensure!(call["routing"]["method"] == "proxy", "{call}");

    // No answer: the request's ring timeout (3 s, below the conference's 20 s) ends the ringing
    // with a CANCEL, which the phone confirms with 487.
    let mut silent_ringer = Sipp::phone(&rig.kam, "1003", "phone_noanswer.xml")?;
    let started = Instant::now();
    let call_id = place(
        &rig,
        "wendy",
        &json!({"to": "1003", "participantId": id, "ringTimeoutSeconds": 3}),
    )
    .await?;
    rig.wait_state(0, ROOM, "wendy", call_id, "ringing", Duration::from_secs(5))
        .await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(12)).await?;
    let rang = started.elapsed();
    ensure_end(&call, "no_answer", Some(487))?;
    ensure!(states(&call) == ["dialing", "ringing", "ended"], "{call}");
    ensure!(
        rang >= Duration::from_millis(2_800) && rang < Duration::from_secs(9),
        "the ring timeout is the request's 3 s: ended after {rang:?}"
    );
    sipp_success(&mut silent_ringer, "no answer (CANCEL received, 487 sent)").await?;
    ensure!(
        silent_ringer.messages().contains("CANCEL sip:"),
        "the phone received a CANCEL:\n{}",
        silent_ringer.messages()
    );
    ensure!(
        silent_ringer.sent_statuses().contains(&487),
        "{:?}",
        silent_ringer.sent_statuses()
    );
    drop(silent_ringer);

    // The phone answers and hangs up itself after a second: `completed`.
    let mut hanger = Sipp::phone(&rig.kam, "1001", "phone_hangup.xml")?;
    let call_id = place(&rig, "wendy", &call_to("1001")).await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(10)).await?;
    ensure_end(&call, "completed", Some(200))?;
    ensure!(states(&call) == ["dialing", "active", "ended"], "{call}");
    sipp_success(&mut hanger, "hang-up (200 to its BYE)").await?;
    drop(hanger);

    // The web hangs up while the phone rings: CANCEL, 487, `cancelled`.
    let mut ringer = Sipp::phone(&rig.kam, "1002", "phone_noanswer.xml")?;
    let call_id = place(&rig, "wendy", &call_to("1002")).await?;
    rig.wait_state(0, ROOM, "wendy", call_id, "ringing", Duration::from_secs(5))
        .await?;
    ensure!(
        rig.hang_up(0, ROOM, "wendy", call_id).await? == 202,
        "DELETE"
    );
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(8)).await?;
    ensure_end(&call, "cancelled", Some(487))?;
    sipp_success(&mut ringer, "cancelled (CANCEL received, 487 sent)").await?;
    ensure!(
        ringer.messages().contains("CANCEL sip:"),
        "{}",
        ringer.messages()
    );

    // The web hangs up an answered call: BYE to the phone, `hangup`.
    let desk = Baresip::start(&rig.kam, BaresipOptions::phone("1003").answer(Answer::Auto))?;
    let call_id = place(&rig, "wendy", &call_to("1003")).await?;
    rig.wait_state(0, ROOM, "wendy", call_id, "active", Duration::from_secs(10))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        rig.hang_up(0, ROOM, "wendy", call_id).await? == 202,
        "DELETE"
    );
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(8)).await?;
    ensure_end(&call, "hangup", Some(200))?;
    desk.wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await
        .with_context(|| format!("the phone got the BYE; log:\n{}", desk.log()))?;

    // An ended call is over: its participant may call again at once, and it is no longer
    // counted as active.
    let active_at_end = metric_line(&rig.metrics(0).await?, "chorus_calls_active");
    let (again, again_body) = rig.create_call(0, ROOM, "wendy", &call_to("1004")).await?;
    if again == 202 {
        let again_id = again_body["id"].as_u64().context("call id")?;
        let call = ended(&rig, "wendy", again_id, Duration::from_secs(10)).await?;
        ensure_end(&call, "not_registered", Some(404))?;
    }
    let metrics = rig.metrics(0).await?;
    let not_registered = if again == 202 { 2 } else { 1 };
    ensure_outcome(&metrics, "not_registered", not_registered)?;
    for outcome in [
        "busy",
        "declined",
        "no_answer",
        "completed",
        "cancelled",
        "hangup",
    ] {
        ensure_outcome(&metrics, outcome, 1)?;
    }
    ensure!(
        again == 202 && active_at_end == "chorus_calls_active 0",
        "PRODUCT BUG: a call hung up from the web (BYE) reads `ended`, yet for about 2 s more \
         the server still counts it as live: a new call for the same participant is refused \
         ({again} {again_body}) and the gauge reads `{active_at_end}` (CallJob::run waits for a \
         late 200 OK whenever `live.dialog` is None, which SendBye also causes)"
    );
    drop(caller);
    Ok(())
}

/// Test 3 (outcomes): the line's password is wrong, so the call manager refuses the INVITE
/// (407 again after the answered challenge): `auth_failed`, and the phone never rings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_line_credentials_end_auth_failed() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| telephony_plan(kam, SipTransport::Udp),
        "not-the-password",
    )
    .await?;
    let phone = Sipp::phone(&rig.kam, "1001", "phone_busy.xml")?;
    let caller = join(&rig, "wendy", AudioSource::Silence).await?;
    let id = participant_id(&caller)?;
    let call_id = place(&rig, "wendy", &json!({"to": "1001", "participantId": id})).await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(15)).await?;
    // Kamailio challenges the INVITE with 407 and refuses the wrong answer with 407 again; the
    // routing lookup before it was refused too (401), so the call went through the proxy.
    ensure_end(&call, "auth_failed", Some(407))?;
    ensure!(
        call["routing"]["method"] == "proxy" && call["routing"]["queryStatus"] == 401,
        "{call}"
    );
    ensure!(
        !phone.messages().contains("INVITE sip:"),
        "the phone must not ring:\n{}",
        phone.messages()
    );
    ensure_outcome(&rig.metrics(0).await?, "auth_failed", 1)?;
    drop(caller);
    Ok(())
}

/// Test 3 (outcomes): a phone that answers and sends no RTP is hung up (BYE) after the plan's
/// media timeout: `media_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_phone_ends_media_timeout() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| {
            let mut plan = telephony_plan(kam, SipTransport::Udp);
            plan.media_timeout_seconds = 2;
            plan
        },
        CallMeRig::password(),
    )
    .await?;
    let mut phone = Sipp::phone(&rig.kam, "1001", "phone_silent.xml")?;
    let caller = join(&rig, "wendy", tone(1000.0, -20.0)).await?;
    let id = participant_id(&caller)?;
    let call_id = place(&rig, "wendy", &json!({"to": "1001", "participantId": id})).await?;
    let active = rig
        .wait_state(0, ROOM, "wendy", call_id, "active", Duration::from_secs(10))
        .await?;
    let answered = Instant::now();
    ensure!(active["codec"] == "PCMU", "{active}");
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(10)).await?;
    let silent_for = answered.elapsed();
    ensure_end(&call, "media_timeout", Some(200))?;
    ensure!(
        silent_for >= Duration::from_millis(1_500) && silent_for < Duration::from_secs(6),
        "the media timeout is the plan's 2 s: ended {silent_for:?} after the answer"
    );
    sipp_success(&mut phone, "silent (BYE received)").await?;
    ensure_outcome(&rig.metrics(0).await?, "media_timeout", 1)?;
    drop(caller);
    Ok(())
}

/// `POST /v1/rooms/{room}/calls` with a raw body and an optional bearer token.
async fn post_raw(
    server: &MediaServer,
    room: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, Value)> {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/rooms/{room}/calls", server.base_url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

/// The port baresip receives the call's RTP from (`... receiving from 127.0.0.1:PORT`).
fn leg_port(log: &str) -> Option<u16> {
    log.lines()
        .filter_map(|l| l.split_once("receiving from 127.0.0.1:"))
        .filter_map(|(_, port)| port.trim().parse().ok())
        .next_back()
}

/// One garbage datagram: random bytes of a random length, or (every fourth) something that
/// looks like RTP (version 2, PCMU or a random payload type, a random SSRC) with a random payload.
fn garbage(rng: &mut impl Rng, i: usize) -> Vec<u8> {
    if i.is_multiple_of(4) {
        let mut packet = vec![0u8; 12 + rng.random_range(0..200)];
        rng.fill_bytes(&mut packet);
        packet[0] = 0x80;
        packet[1] = if i.is_multiple_of(8) {
            0
        } else {
            packet[1] & 0x7F
        };
        packet
    } else {
        let mut bytes = vec![0u8; rng.random_range(0..1400)];
        rng.fill_bytes(&mut bytes);
        if i.is_multiple_of(5) && bytes.len() > 8 {
            // A start line that looks like SIP, then noise.
            bytes[..8].copy_from_slice(b"INVITE s");
        }
        bytes
    }
}

/// Every label value of every metric sample in a Prometheus text exposition.
fn label_values(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(l.split_once('{')?.1.rsplit_once('}')?.0.to_owned()))
        .flat_map(|labels| {
            labels
                .split("\",")
                .filter_map(|pair| Some(pair.split_once('=')?.1.trim_matches('"').to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Test 7 (security and bad input): the API's refusals, 1,000 garbage datagrams at the SIP and
/// RTP ports of a live call (which goes on, the room still hearing the phone), and no password
/// or dialled number in metrics, call resources or events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_garbage_and_no_leaks() -> Result<()> {
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let server = rig.server(0);
    let phone = Baresip::start(
        &rig.kam,
        BaresipOptions::phone("1001")
            .tone(440.0)
            .answer(Answer::Auto),
    )?;
    let caller = join(&rig, "wendy", tone(1000.0, -20.0)).await?;
    let listener = join(&rig, "lars", AudioSource::Silence).await?;
    let id = participant_id(&caller)?;
    let lars_id = participant_id(&listener)?;
    let good = json!({"to": "1001", "participantId": id, "audio": "add"});
    // Everything the API answered, to search for leaks at the end.
    let mut seen: Vec<Value> = Vec::new();

    let wendy = Some(server.token(ROOM, "wendy"));
    let refusals: Vec<(Option<String>, String, u16, &str)> = vec![
        (None, good.to_string(), 401, ""),
        // A token is for one room: another room's token does not open this one.
        (
            Some(server.token("elsewhere", "wendy")),
            good.to_string(),
            401,
            "",
        ),
        (
            wendy.clone(),
            json!({"to": "1001@evil.example.com", "participantId": id}).to_string(),
            400,
            "foreign_host",
        ),
        (
            wendy.clone(),
            json!({"to": "12345678", "participantId": id}).to_string(),
            400,
            "target_not_allowed",
        ),
        (
            wendy.clone(),
            json!({"to": "1001;transport=tcp", "participantId": id}).to_string(),
            400,
            "target_not_allowed",
        ),
        // Lars's participant id with Wendy's token.
        (
            wendy.clone(),
            json!({"to": "1001", "participantId": lars_id}).to_string(),
            403,
            "no_such_participant",
        ),
        (
            wendy.clone(),
            "{\"to\": \"1001\", \"participantId\": ".into(),
            400,
            "bad_request",
        ),
        (
            wendy.clone(),
            json!({"to": "1001", "participantId": id, "callerId": "spoof"}).to_string(),
            400,
            "bad_request",
        ),
    ];
    for (token, body, want, reason) in refusals {
        let (status, answer) = post_raw(server, ROOM, token.as_deref(), &body).await?;
        ensure!(
            status == want && (reason.is_empty() || answer["reason"] == reason),
            "{body} with {}: {want} {reason} expected, got {status} {answer}",
            if token.is_some() {
                "a token"
            } else {
                "no token"
            }
        );
        seen.push(answer);
    }
    let metrics = rig.metrics(0).await?;
    ensure!(
        metrics.contains("chorus_calls_active 0"),
        "no call was placed by the refused requests: {}",
        calls_lines(&metrics)
    );

    // A real call, answered by the baresip phone.
    let call_id = place(&rig, "wendy", &good).await?;
    let active = rig
        .wait_state(0, ROOM, "wendy", call_id, "active", Duration::from_secs(10))
        .await
        .with_context(|| format!("phone log:\n{}", phone.log()))?;
    seen.push(active);
    // A second call for the same participant while the first is active.
    let (status, answer) = rig.create_call(0, ROOM, "wendy", &good).await?;
    ensure!(
        status == 409 && answer["reason"] == "already_calling",
        "{status} {answer}"
    );
    seen.push(answer);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        listener.heard(&[440.0]).contains(&440),
        "the listener hears the phone before the garbage"
    );

    // The phone leg's RTP shares the server's one media port (one UDP port per pod): baresip
    // logs where the server's RTP comes from (symmetric RTP), and that is the media port.
    let sip = server
        .sip
        .context("the rig gives the server a SIP socket")?;
    let rtp_port = leg_port(&phone.log())
        .with_context(|| format!("baresip names the leg's RTP address:\n{}", phone.log()))?;
    ensure!(
        rtp_port == server.udp.port(),
        "the phone leg's RTP comes from the media port {}, not {rtp_port}",
        server.udp.port()
    );
    let unroutable_before = metric_sum(
        &rig.metrics(0).await?,
        "chorus_media_dropped_total",
        &["reason=\"unroutable\""],
    );
    let datagrams: Vec<Vec<u8>> = {
        let mut rng = rand::rng();
        (0..1_000).map(|i| garbage(&mut rng, i)).collect()
    };
    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut sent = 0;
    for (i, datagram) in datagrams.iter().enumerate() {
        let target: std::net::SocketAddr = if i % 2 == 0 {
            sip
        } else {
            ([127, 0, 0, 1], rtp_port).into()
        };
        if sender.send_to(datagram, target).await.is_ok() {
            sent += 1;
        }
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    ensure!(sent == 1_000, "sent {sent} datagrams");
    // Let the room mix a couple of seconds of the phone after the garbage.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let call = rig.call(0, ROOM, "wendy", call_id).await?;
    ensure!(
        call["state"] == "active",
        "the call survives the garbage: {call}"
    );
    let heard = listener.heard(&[440.0, 1000.0]);
    ensure!(
        heard.contains(&440),
        "the listener still hears the phone's 440 Hz after the garbage: {heard:?}"
    );
    seen.push(call);
    // The garbage reached the media port and was dropped there as unroutable (it came from
    // neither a WebRTC peer nor the phone's answered address): never played, never the leg's.
    let metrics = rig.metrics(0).await?;
    let unroutable = metric_sum(
        &metrics,
        "chorus_media_dropped_total",
        &["reason=\"unroutable\""],
    ) - unroutable_before;
    let malformed = metric_sum(
        &metrics,
        "chorus_media_dropped_total",
        &["reason=\"malformed\""],
    );
    ensure!(
        unroutable + malformed >= 450.0,
        "{unroutable} unroutable and {malformed} malformed of 500 garbage datagrams:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("chorus_media_dropped") || l.starts_with("chorus_phone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let health = reqwest::get(format!("{}/healthz", server.base_url)).await?;
    ensure!(health.status() == 200, "/healthz: {}", health.status());

    ensure!(
        rig.hang_up(0, ROOM, "wendy", call_id).await? == 202,
        "DELETE"
    );
    let events = rig
        .events(0, ROOM, "wendy", call_id, Duration::from_secs(10))
        .await?;
    let last = events.last().context("an ended event")?;
    ensure!(last["endReason"] == "hangup", "{events:?}");
    phone
        .wait_event("CALL_CLOSED", Duration::from_secs(5))
        .await?;
    let call = ended(&rig, "wendy", call_id, Duration::from_secs(5)).await?;
    seen.push(call);
    seen.extend(events);

    // No secret, and no number as a label.
    let metrics = rig.metrics(0).await?;
    ensure_outcome(&metrics, "hangup", 1)?;
    ensure!(
        !metrics.contains(CHORUS_PASSWORD),
        "the line password is in the metrics"
    );
    let labels = label_values(&metrics);
    ensure!(!labels.is_empty(), "the metrics have labels");
    for number in ["1001", "12345678", "evil.example.com"] {
        ensure!(
            !labels.iter().any(|v| v.contains(number)),
            "{number} is a metric label value:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains(number))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for answer in &seen {
        let text = answer.to_string();
        ensure!(
            !text.contains(CHORUS_PASSWORD),
            "the line password in {text}"
        );
    }
    for reason in [
        "foreign_host",
        "target_not_allowed",
        "no_such_participant",
        "already_calling",
    ] {
        ensure!(
            metrics.contains(&format!(
                "chorus_call_requests_refused_total{{reason=\"{reason}\"}}"
            )),
            "refusal {reason} counted: {}",
            calls_lines(&metrics)
        );
    }
    drop(listener);
    drop(caller);
    Ok(())
}

/// Test 7: a conference without telephony refuses every call request (403,
/// `telephony_disabled`), however good the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_telephony_no_calls() -> Result<()> {
    let cluster = MeshCluster::start(&["us"], 3, |_, bind| bind).await?;
    let server = cluster.server(0);
    let caller = server
        .join_bot(ROOM, "wendy", BotConfig::new(AudioSource::Silence))
        .await?;
    let id = participant_id(&caller)?;
    let token = server.token(ROOM, "wendy");
    let (status, answer) = post_raw(
        server,
        ROOM,
        Some(&token),
        &json!({"to": "1001", "participantId": id}).to_string(),
    )
    .await?;
    ensure!(
        status == 403 && answer["reason"] == "telephony_disabled",
        "{status} {answer}"
    );
    // Still authenticated first: no token is 401, not a hint about telephony.
    let (status, _) = post_raw(server, ROOM, None, "{}").await?;
    ensure!(status == 401, "{status}");
    drop(caller);
    Ok(())
}

/// Leaving and shutting down hang phones up with a real BYE: the participant leaving ends its
/// active call (`hangup`) and the phone sees the call close; another participant's phone, still
/// up when the server is stopped, is hung up by the shutdown before the SIP transport stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_and_shutdown_hang_phones_up() -> Result<()> {
    let mut rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let first = Baresip::start(&rig.kam, BaresipOptions::phone("1001").tone(440.0))?;
    let second = Baresip::start(&rig.kam, BaresipOptions::phone("1002").tone(440.0))?;
    let leaver = join(&rig, "leo", tone(1000.0, -20.0)).await?;
    let stayer = join(&rig, "stan", tone(700.0, -20.0)).await?;
    let leaving_call = place(
        &rig,
        "leo",
        &json!({"to": "1001", "participantId": participant_id(&leaver)?}),
    )
    .await?;
    let staying_call = place(
        &rig,
        "stan",
        &json!({"to": "1002", "participantId": participant_id(&stayer)?}),
    )
    .await?;
    for (who, id) in [("leo", leaving_call), ("stan", staying_call)] {
        rig.wait_state(0, ROOM, who, id, "active", Duration::from_secs(15))
            .await?;
    }
    // The participant leaves (its DELETE): its phone is hung up.
    leaver.leave(&[]).await?;
    let call = ended(&rig, "leo", leaving_call, Duration::from_secs(3)).await?;
    ensure!(call["endReason"] == "hangup", "{call}");
    first
        .wait_event("CALL_CLOSED", Duration::from_secs(3))
        .await
        .context("the leaver's phone got its BYE")?;
    // The other call is untouched by that.
    let call = rig.call(0, ROOM, "stan", staying_call).await?;
    ensure!(call["state"] == "active", "{call}");
    // The server stops: the remaining phone is hung up too.
    rig.cluster.kill(0);
    second
        .wait_event("CALL_CLOSED", Duration::from_secs(4))
        .await
        .context("the phone got a BYE at server shutdown")?;
    drop(stayer);
    Ok(())
}

/// The limits: `maxCallsPerIdentity` answers 429, `maxConcurrentCalls` answers 503, both before
/// anything is dialled; ringing calls count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_server_limits() -> Result<()> {
    let rig = CallMeRig::start(
        &["us"],
        |kam| {
            let mut t = telephony_plan(kam, SipTransport::Udp);
            t.max_concurrent_calls = 2;
            t.max_calls_per_identity = 1;
            t
        },
        CHORUS_PASSWORD,
    )
    .await?;
    let _ring1 = Sipp::phone(&rig.kam, "1001", "phone_noanswer.xml")?;
    let _ring2 = Sipp::phone(&rig.kam, "1002", "phone_noanswer.xml")?;
    let ann = join(&rig, "ann", AudioSource::Silence).await?;
    let ann_too = join(&rig, "ann", AudioSource::Silence).await?;
    let bob = join(&rig, "bob", AudioSource::Silence).await?;
    let cat = join(&rig, "cat", AudioSource::Silence).await?;
    let first = place(
        &rig,
        "ann",
        &json!({"to": "1001", "participantId": participant_id(&ann)?}),
    )
    .await?;
    // The same identity from another device: over its limit.
    let (status, answer) = rig
        .create_call(
            0,
            ROOM,
            "ann",
            &json!({"to": "1002", "participantId": participant_id(&ann_too)?}),
        )
        .await?;
    ensure!(
        status == 429 && answer["reason"] == "identity_limit",
        "{status} {answer}"
    );
    let second = place(
        &rig,
        "bob",
        &json!({"to": "1002", "participantId": participant_id(&bob)?}),
    )
    .await?;
    // The server holds its maximum of two calls.
    let (status, answer) = rig
        .create_call(
            0,
            ROOM,
            "cat",
            &json!({"to": "1001", "participantId": participant_id(&cat)?}),
        )
        .await?;
    ensure!(
        status == 503 && answer["reason"] == "server_limit",
        "{status} {answer}"
    );
    for (who, id) in [("ann", first), ("bob", second)] {
        ensure!(rig.hang_up(0, ROOM, who, id).await? == 202);
        let call = ended(&rig, who, id, Duration::from_secs(6)).await?;
        ensure!(call["endReason"] == "cancelled", "{call}");
    }
    Ok(())
}
