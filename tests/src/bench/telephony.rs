//! Phone calls ("call me", DESIGN §10 and §11): how soon an answered call carries audio both ways,
//! and what an active call costs the server.
//!
//! The server is a separate `chorus-mediaserver` process (its CPU time read from `/proc`), the one
//! node of a mesh plan whose `telephony` block points at a real Kamailio. The phones are ours:
//! a SIPp UAS per phone (registered through Kamailio like the test phones) answers at once, and
//! its SDP names a UDP socket of this process rather than SIPp's own. That socket is the phone's
//! audio: it streams a µ-law tone from the moment SIPp saw the INVITE (SIPp writes the offer's
//! RTP address to a file, a real phone knows it from the offer too), and it timestamps every
//! packet the server sends it, so the phone's side of "audio both ways" is observed where the
//! phone would hear it, not inferred from the server's counters.
//!
//! **Set-up.** A web bot talks (a quiet 3000 Hz tone) and places the call with `"audio": "add"`, a
//! second bot listens. Per call, relative to the phone's 200 OK as the server saw it (the call's
//! `active` transition, `atMs`, Unix ms):
//! - phone → room: when the listening bot hears the onset of the phone's 500 Hz
//!   ([`Bot::onset_heard`]);
//! - room → phone: when the first packet carrying the talker's 3000 Hz reached the phone's socket
//!   (the first packet of any kind is kept beside it);
//! - both ways: the later of the two.
//!
//! The bots' `Instant`s become Unix time through one sample of both clocks; the server's `atMs`
//! is whole milliseconds (truncated), so each figure reads up to 1 ms long.
//!
//! **CPU per call.** N silent web bots in one room; the server's CPU over a window with no call,
//! then with each bot in a call to its own phone (G.711 µ-law, every phone streaming a tone, the
//! bots' web streams kept: `"audio": "add"`). Per call: the difference over N, in % of one core.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use chorus_crds::SipTransport;
use chorus_mediaserver::media::spectrum::{ToneGenerator, tone_level_dbfs};
use chorus_mediaserver::telephony::media::g711::{linear_to_ulaw, ulaw_to_linear};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bot::{AudioSource, Bot, BotConfig, tone};
use crate::call_me::{participant_id, telephony_plan};
use crate::mediaserver_process::{ProcessOptions, ProcessTelephony, ServerProcess};
use crate::process_cpu_time;
use crate::telephony::{CHORUS_PASSWORD, CHORUS_USER, Kamailio, SIPP_BIN};

/// The phone's tone, Hz (heard in the room).
const PHONE_HZ: f64 = 500.0;
/// Its level, dBFS.
const PHONE_DBFS: f64 = -20.0;
/// The talking bot's tone, Hz (heard at the phone): far from the phone's and quieter, so the
/// listener's onset detector (2.5 ms windows, −50 dBFS coarse threshold) never takes its leakage
/// for the phone's tone.
const ROOM_HZ: f64 = 3000.0;
/// Its level, dBFS.
const ROOM_DBFS: f64 = -35.0;
/// A 20 ms packet at the phone carries the room's tone above this.
const HEARD_DBFS: f64 = -45.0;
/// G.711 samples per 20 ms packet.
const PACKET_SAMPLES: usize = 160;
/// The DESIGN §10 target: audio both ways within this of the 200 OK, ms.
pub const TARGET_MS: f64 = 100.0;

/// p50, p95 and max of a small sample, ms.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Tail {
    /// Median (nearest rank).
    pub p50: f64,
    /// 95th percentile (nearest rank: the maximum below 20 samples).
    pub p95: f64,
    /// Largest.
    pub max: f64,
    /// Samples.
    pub n: usize,
}

/// [`Tail`] of `values` (non-finite ones left out).
pub fn tail(values: &[f64]) -> Tail {
    let (v, at) = super::nearest_rank(values);
    Tail {
        p50: at(&v, 0.5),
        p95: at(&v, 0.95),
        max: v.last().copied().unwrap_or(f64::NAN),
        n: v.len(),
    }
}

/// One answered call's set-up, ms after the server saw the 200 OK.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallSetup {
    /// The listening bot heard the phone's tone start.
    pub phone_to_room_ms: f64,
    /// The first packet carrying the room's tone reached the phone.
    pub room_to_phone_ms: f64,
    /// The first RTP packet of any kind reached the phone.
    pub first_packet_ms: f64,
    /// The later of the two directions.
    pub both_ways_ms: f64,
    /// From the request (`dialing`) to the 200 OK (`active`): Kamailio and the phone's answer.
    pub dial_to_answer_ms: f64,
}

/// The server's CPU with and without active calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallCpu {
    /// Concurrent calls in the loaded window.
    pub calls: usize,
    /// The phones' codec.
    pub codec: String,
    /// Length of each window, s.
    pub window_s: f64,
    /// Server CPU with the same web bots and no call, % of one core.
    pub idle_percent: f64,
    /// Server CPU with the calls, % of one core.
    pub loaded_percent: f64,
    /// (loaded − idle) / calls, % of one core.
    pub per_call_percent: f64,
}

/// Everything the phone-call scenario measured in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhoneCalls {
    /// Calls placed for the set-up figures.
    pub calls: usize,
    /// Of which were not measured in both directions (not answered, or no audio seen).
    pub failed: usize,
    /// Every measured call.
    pub per_call: Vec<CallSetup>,
    /// Phone → room, ms.
    pub phone_to_room: Tail,
    /// Room → phone (the room's tone at the phone's socket), ms.
    pub room_to_phone: Tail,
    /// Room → phone, first packet of any kind, ms.
    pub first_packet: Tail,
    /// Both ways (per call, the later direction), ms.
    pub both_ways: Tail,
    /// CPU per active call.
    pub cpu: CallCpu,
}

/// How much the phone-call scenario measures.
#[derive(Debug, Clone, Copy)]
pub struct PhonePlan {
    /// Calls placed one after the other for the set-up figures.
    pub setup_calls: usize,
    /// Concurrent calls for the CPU figure.
    pub cpu_calls: usize,
    /// Each CPU window.
    pub cpu_window: Duration,
}

/// Unix time of an `Instant`, through one sample of both clocks.
#[derive(Debug, Clone, Copy)]
struct Clocks {
    instant: Instant,
    unix_ms: f64,
}

impl Clocks {
    fn sample() -> Self {
        let instant = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Clocks { instant, unix_ms }
    }

    fn unix_ms(&self, at: Instant) -> f64 {
        if at >= self.instant {
            self.unix_ms + at.duration_since(self.instant).as_secs_f64() * 1000.0
        } else {
            self.unix_ms - self.instant.duration_since(at).as_secs_f64() * 1000.0
        }
    }
}

/// The SIP side of a bench phone: answers every INVITE at once, PCMU only, with `@RTP_PORT@` in
/// its SDP (the bench's socket, not SIPp's), and writes the offer's RTP address to
/// `@DIR@/peer-N` (N the call's number) before answering.
const PHONE_SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="bench phone">
  <recv request="INVITE">
    <action>
      <ereg regexp="c=IN IP4 ([0-9.]+)" search_in="body" check_it="true" assign_to="c,rip"/>
      <ereg regexp="m=audio ([0-9]+)" search_in="body" check_it="true" assign_to="m,rport"/>
      <exec command="echo [$rip]:[$rport] > @DIR@/peer.tmp-[call_number]; mv @DIR@/peer.tmp-[call_number] @DIR@/peer-[call_number]"/>
    </action>
  </recv>
  <Reference variables="c,m"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]phone[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      [last_Record-Route:]
      Contact: <sip:[service]@[local_ip]:[local_port]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=phone 1 1 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio @RTP_PORT@ RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=ptime:20
    ]]>
  </send>
  <recv request="ACK" crlf="true"/>
  <recv request="BYE" timeout="600000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
</scenario>
"#;

/// What a phone saw of one call.
#[derive(Debug, Default)]
struct Heard {
    /// The first RTP packet from the server.
    first_packet: Option<Instant>,
    /// The first one carrying the room's tone.
    first_tone: Option<Instant>,
}

/// A bench phone: account `user` bound to a SIPp UAS, whose calls' audio is a socket of ours.
struct Phone {
    user: String,
    sipp: Child,
    dir: PathBuf,
    socket: Arc<tokio::net::UdpSocket>,
    calls: u32,
}

impl Drop for Phone {
    fn drop(&mut self) {
        let _ = self.sipp.kill();
        let _ = self.sipp.wait();
        if std::env::var_os(crate::telephony::KEEP_ENV).is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An even port whose next two are free as well (SIPp binds its media port and the one two up).
fn free_media_port() -> Result<u16> {
    for _ in 0..50 {
        let port = 20000 + 2 * (rand::random::<u16>() % 20000);
        let free = |p: u16| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 2) {
            return Ok(port);
        }
    }
    bail!("no free media port pair for SIPp")
}

impl Phone {
    /// Starts the phone and binds `user` (an account created here) to it.
    async fn start(kam: &Kamailio, user: &str) -> Result<Phone> {
        let dir = std::env::temp_dir().join(format!(
            "chorus-bench-phone-{user}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let rtp_port = socket.local_addr()?.port();
        let scenario = PHONE_SCENARIO
            .replace("@DIR@", &dir.display().to_string())
            .replace("@RTP_PORT@", &rtp_port.to_string());
        std::fs::write(dir.join("phone.xml"), scenario)?;
        let sip_port = crate::free_udp_addr()?.port();
        let log = std::fs::File::create(dir.join("phone.log"))?;
        let sipp = Command::new(SIPP_BIN)
            .args(["-sf", "phone.xml", "-s", user, "-i", "127.0.0.1"])
            .args(["-p", &sip_port.to_string(), "-mi", "127.0.0.1"])
            .args(["-mp", &free_media_port()?.to_string()])
            .args(["-m", "1000", "-nostdin"])
            .args(["-trace_err", "-error_file", "errors.log"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {SIPP_BIN} (package sip-tester)"))?;
        let mut phone = Phone {
            user: user.to_owned(),
            sipp,
            dir,
            socket: Arc::new(socket),
            calls: 0,
        };
        let password = format!("bench-{user}");
        kam.add_user(user, &password)?;
        kam.unregister(user)?;
        register(kam, user, &password, sip_port, &phone.dir).await?;
        let contact = format!("sip:{user}@127.0.0.1:{sip_port}");
        kam.wait_contact(user, Duration::from_secs(5), |c| c == contact)?;
        if let Some(status) = phone.sipp.try_wait()? {
            bail!(
                "bench phone {user} exited ({status}): {}",
                std::fs::read_to_string(phone.dir.join("phone.log")).unwrap_or_default()
            );
        }
        Ok(phone)
    }

    /// Expects the next call: once SIPp has seen its INVITE, streams the phone's tone to the
    /// offer's address and records what arrives from there, until the returned task is aborted.
    fn next_call(&mut self) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Heard>>) {
        self.calls += 1;
        let peer_file = self.dir.join(format!("peer-{}", self.calls));
        let socket = self.socket.clone();
        let heard = Arc::new(Mutex::new(Heard::default()));
        let out = heard.clone();
        let task = tokio::spawn(async move {
            let peer: SocketAddr = loop {
                if let Some(addr) = std::fs::read_to_string(&peer_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    break addr;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let mut tone = ToneGenerator::new(PHONE_HZ, PHONE_DBFS, 8000);
            let ssrc: u32 = rand::random();
            let (mut seq, mut ts) = (rand::random::<u16>(), rand::random::<u32>());
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut buf = vec![0u8; 2048];
            let mut pcm = Vec::with_capacity(PACKET_SAMPLES);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let mut packet = Vec::with_capacity(12 + PACKET_SAMPLES);
                        packet.extend_from_slice(&[0x80, 0]);
                        packet.extend_from_slice(&seq.to_be_bytes());
                        packet.extend_from_slice(&ts.to_be_bytes());
                        packet.extend_from_slice(&ssrc.to_be_bytes());
                        packet.extend(tone.frame(PACKET_SAMPLES).into_iter().map(linear_to_ulaw));
                        let _ = socket.send_to(&packet, peer).await;
                        seq = seq.wrapping_add(1);
                        ts = ts.wrapping_add(PACKET_SAMPLES as u32);
                    }
                    received = socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = received else { continue };
                        let at = Instant::now();
                        if from != peer {
                            continue;
                        }
                        let Some(payload) = ulaw_payload(&buf[..n]) else { continue };
                        pcm.clear();
                        pcm.extend(payload.iter().map(|c| ulaw_to_linear(*c)));
                        let level = tone_level_dbfs(&pcm, ROOM_HZ, 8000);
                        let mut h = out.lock().expect("not poisoned");
                        h.first_packet.get_or_insert(at);
                        if level > HEARD_DBFS {
                            h.first_tone.get_or_insert(at);
                        }
                    }
                }
            }
        });
        (task, heard)
    }
}

/// The payload of a PCMU RTP packet (`None` for anything else, RFC 4733 events included).
fn ulaw_payload(packet: &[u8]) -> Option<&[u8]> {
    if packet.len() < 12 || packet[0] >> 6 != 2 || packet[1] & 0x7f != 0 {
        return None;
    }
    let mut at = 12 + 4 * usize::from(packet[0] & 0x0f);
    if packet[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([*packet.get(at + 2)?, *packet.get(at + 3)?]);
        at += 4 + 4 * usize::from(words);
    }
    packet.get(at..).filter(|p| !p.is_empty())
}

/// Binds `user` to `127.0.0.1:contact_port` with the harness's `register.xml` run.
async fn register(
    kam: &Kamailio,
    user: &str,
    password: &str,
    contact_port: u16,
    dir: &Path,
) -> Result<()> {
    // The bench runs on a multi-threaded runtime: this worker may block while SIPp registers.
    tokio::task::block_in_place(|| {
        crate::telephony::run_register(kam, user, password, contact_port, dir)
    })
}

/// The calls API of one server process.
struct Calls<'a> {
    server: &'a ServerProcess,
    room: &'a str,
    http: reqwest::Client,
}

impl Calls<'_> {
    async fn create(&self, identity: &str, bot: &Bot, to: &str) -> Result<u64> {
        let res = self
            .http
            .post(format!(
                "{}/v1/rooms/{}/calls",
                self.server.base_url, self.room
            ))
            .bearer_auth(self.server.token(self.room, identity))
            .json(&json!({"to": to, "participantId": participant_id(bot)?, "audio": "add"}))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(status.as_u16() == 202, "calling {to}: {status} {body}");
        body["id"].as_u64().context("call id")
    }

    async fn get(&self, identity: &str, id: u64) -> Result<Value> {
        let res = self
            .http
            .get(format!(
                "{}/v1/rooms/{}/calls/{id}",
                self.server.base_url, self.room
            ))
            .bearer_auth(self.server.token(self.room, identity))
            .send()
            .await?;
        ensure!(res.status().is_success(), "GET call {id}: {}", res.status());
        Ok(res.json().await?)
    }

    /// Polls call `id` until `state`: the call as then.
    async fn wait_state(&self, identity: &str, id: u64, state: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let call = self.get(identity, id).await?;
            if call["state"] == state {
                return Ok(call);
            }
            ensure!(
                call["state"] != "ended" && Instant::now() < deadline,
                "call {id} is not {state}: {call}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn hang_up(&self, identity: &str, id: u64) -> Result<()> {
        self.http
            .delete(format!(
                "{}/v1/rooms/{}/calls/{id}",
                self.server.base_url, self.room
            ))
            .bearer_auth(self.server.token(self.room, identity))
            .send()
            .await?;
        self.wait_state(identity, id, "ended").await.map(drop)
    }
}

/// `atMs` of the call's transition to `state`.
fn transition_ms(call: &Value, state: &str) -> Option<f64> {
    call["events"]
        .as_array()?
        .iter()
        .find(|e| e["state"] == state)?["atMs"]
        .as_f64()
}

/// Places `n` calls one after the other and times each.
async fn setup_times(
    server: &ServerProcess,
    kam: &Kamailio,
    n: usize,
) -> Result<(Vec<CallSetup>, usize)> {
    let room = "phone-setup";
    let talker = server
        .join_bot(room, "talker", BotConfig::new(tone(ROOM_HZ, ROOM_DBFS)))
        .await?;
    let ear = server
        .join_bot(room, "ear", BotConfig::new(AudioSource::Silence))
        .await?;
    let mut phone = Phone::start(kam, "2000").await?;
    let calls = Calls {
        server,
        room,
        http: reqwest::Client::new(),
    };
    let clocks = Clocks::sample();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The detector must not take the talker for the phone.
    ensure!(
        ear.onset_heard(PHONE_HZ, clocks.instant).is_none(),
        "the listener hears {PHONE_HZ} Hz before any call: the talker's tone leaks into it"
    );
    let mut measured = Vec::new();
    let mut failed = 0;
    for k in 0..n {
        let (task, heard) = phone.next_call();
        let asked = Instant::now();
        let result = async {
            let id = calls.create("talker", &talker, &phone.user).await?;
            let call = calls.wait_state("talker", id, "active").await;
            // Long enough for both tones to show and settle (the onset detector looks 20–40 ms
            // past the onset, and the phone's tone needs a mixing tick and a jitter buffer).
            tokio::time::sleep(Duration::from_millis(400)).await;
            let hung = calls.hang_up("talker", id).await;
            let call = call?;
            hung?;
            let answered = transition_ms(&call, "active").context("no active transition")?;
            let dialed = transition_ms(&call, "dialing").unwrap_or(f64::NAN);
            let heard = heard.lock().expect("not poisoned");
            let in_room = ear
                .onset_heard(PHONE_HZ, asked)
                .context("the room never heard the phone")?;
            let at_phone = heard
                .first_tone
                .with_context(|| format!("the phone never heard the room ({heard:?})"))?;
            let phone_to_room_ms = clocks.unix_ms(in_room) - answered;
            let room_to_phone_ms = clocks.unix_ms(at_phone) - answered;
            anyhow::Ok(CallSetup {
                phone_to_room_ms,
                room_to_phone_ms,
                first_packet_ms: heard
                    .first_packet
                    .map_or(f64::NAN, |t| clocks.unix_ms(t) - answered),
                both_ways_ms: phone_to_room_ms.max(room_to_phone_ms),
                dial_to_answer_ms: answered - dialed,
            })
        }
        .await;
        task.abort();
        match result {
            Ok(setup) => {
                eprintln!(
                    "phone call {}: phone→room {:.1} ms, room→phone {:.1} ms (first packet {:.1} \
                     ms), dial→answer {:.0} ms",
                    k + 1,
                    setup.phone_to_room_ms,
                    setup.room_to_phone_ms,
                    setup.first_packet_ms,
                    setup.dial_to_answer_ms
                );
                measured.push(setup);
            }
            Err(err) => {
                eprintln!("phone call {}: not measured: {err:#}", k + 1);
                failed += 1;
            }
        }
        // The phone's tone must be gone from the room before the next onset.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    super::close_all([&talker, &ear]).await;
    Ok((measured, failed))
}

/// Server CPU over `window`, in % of one core.
async fn cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    let before = process_cpu_time(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = process_cpu_time(pid)? - before;
    Ok(used.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0)
}

/// The server's CPU per active call, from `n` concurrent calls.
async fn cpu_per_call(
    server: &ServerProcess,
    kam: &Kamailio,
    n: usize,
    window: Duration,
) -> Result<CallCpu> {
    let room = "phone-cpu";
    // Joins and calls settle before a window starts.
    let settle = (window / 2).min(Duration::from_secs(1));
    let mut bots = Vec::new();
    let mut phones = Vec::new();
    for i in 0..n {
        bots.push(
            server
                .join_bot(
                    room,
                    &format!("caller-{i}"),
                    BotConfig::new(AudioSource::Silence),
                )
                .await?,
        );
        phones.push(Phone::start(kam, &format!("{}", 2100 + i)).await?);
    }
    let calls = Calls {
        server,
        room,
        http: reqwest::Client::new(),
    };
    tokio::time::sleep(settle).await;
    let idle_percent = cpu_percent(server.pid(), window).await?;
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    let result = async {
        for (i, (bot, phone)) in bots.iter().zip(&mut phones).enumerate() {
            let (task, _) = phone.next_call();
            tasks.push(task);
            let who = format!("caller-{i}");
            let id = calls.create(&who, bot, &phone.user).await?;
            ids.push((who, id));
        }
        for (who, id) in &ids {
            calls.wait_state(who, *id, "active").await?;
        }
        tokio::time::sleep(settle).await;
        let loaded_percent = cpu_percent(server.pid(), window).await?;
        // Every call still up through the window.
        for (who, id) in &ids {
            let call = calls.get(who, *id).await?;
            ensure!(call["state"] == "active", "a call ended early: {call}");
        }
        anyhow::Ok(loaded_percent)
    }
    .await;
    for (who, id) in &ids {
        let _ = calls.hang_up(who, *id).await;
    }
    for task in tasks {
        task.abort();
    }
    super::close_all(&bots).await;
    let loaded_percent = result?;
    Ok(CallCpu {
        calls: n,
        codec: "PCMU".into(),
        window_s: window.as_secs_f64(),
        idle_percent,
        loaded_percent,
        per_call_percent: (loaded_percent - idle_percent) / n.max(1) as f64,
    })
}

/// The whole phone-call scenario: Kamailio, a server process with telephony, set-up times, then
/// CPU per call.
pub async fn measure(plan: PhonePlan) -> Result<PhoneCalls> {
    let kam = Kamailio::start()?;
    let creds = std::env::temp_dir().join(format!(
        "chorus-bench-sip-creds-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&creds)?;
    std::fs::write(creds.join("username"), CHORUS_USER)?;
    std::fs::write(creds.join("password"), CHORUS_PASSWORD)?;
    let mut block = telephony_plan(&kam, SipTransport::Udp);
    block.max_concurrent_calls = u32::try_from(plan.cpu_calls.max(1) + 5)?;
    let result = async {
        let server = ServerProcess::start(ProcessOptions {
            telephony: Some(ProcessTelephony {
                block,
                credentials_dir: Some(creds.clone()),
                ca_file: Some(kam.cert_path()),
                edge_token_file: None,
            }),
            ..ProcessOptions::default()
        })
        .await?;
        let (per_call, failed) = setup_times(&server, &kam, plan.setup_calls).await?;
        let cpu = cpu_per_call(&server, &kam, plan.cpu_calls, plan.cpu_window).await?;
        eprintln!(
            "phone CPU: {:.1} % idle, {:.1} % with {} calls: {:.2} % of a core per call",
            cpu.idle_percent, cpu.loaded_percent, cpu.calls, cpu.per_call_percent
        );
        let of = |f: fn(&CallSetup) -> f64| tail(&per_call.iter().map(f).collect::<Vec<_>>());
        anyhow::Ok(PhoneCalls {
            calls: plan.setup_calls,
            failed,
            phone_to_room: of(|c| c.phone_to_room_ms),
            room_to_phone: of(|c| c.room_to_phone_ms),
            first_packet: of(|c| c.first_packet_ms),
            both_ways: of(|c| c.both_ways_ms),
            per_call,
            cpu,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&creds);
    result
}
