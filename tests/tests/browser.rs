//! Headless Chromium (Debian's `chromium`) against the web client: two browsers, each with a fake
//! microphone playing its own tone, join one room. Each must hear the other's tone and not its own,
//! as measured inside the page (WebAudio analyser on the received stream). And a browser uses
//! "Call my phone": a baresip desk phone behind a real Kamailio rings, answers, is heard in the
//! page, and is hung up from the page. And a browser moves its session to another browser by the
//! QR code it shows, scanned with zbarimg from a screenshot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chorus_tests::bot::{AudioSource, BotConfig};
use chorus_tests::media_server::MediaServer;
use chorus_tests::workspace_root;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Held by each test while its browsers run: Chromium instances are heavy on two cores, and the two
/// tests' three at once starve WebRTC's audio.
static BROWSERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn write_tone(path: &Path, hz: f64) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for n in 0..48_000 * 30 {
        let v = (2.0 * std::f64::consts::PI * hz * f64::from(n) / 48_000.0).sin() * 0.3;
        w.write_sample((v * f64::from(i16::MAX)) as i16)?;
    }
    w.finalize()?;
    Ok(())
}

/// Joins one Chromium per `(url, wav)` and measures what each heard at `freqs`, all in the same
/// window while every one of them is still connected. One JSON value per participant.
async fn browsers(people: &[(String, &Path)], freqs: &str) -> Result<Vec<serde_json::Value>> {
    let mut args = vec!["6".to_owned(), freqs.to_owned()];
    for (url, wav) in people {
        args.push(url.clone());
        args.push(wav.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = node("join_and_measure.mjs", &args).await?;
    let heard = out
        .as_array()
        .context("join_and_measure prints an array")?
        .clone();
    ensure!(
        heard.len() == people.len(),
        "one result per participant: {out}"
    );
    Ok(heard)
}

/// tests/browser, once its tools are there.
fn browser_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        bail!("tests/browser/node_modules is missing: run scripts/bootstrap");
    }
    if !Path::new("/usr/bin/chromium").exists() {
        bail!("/usr/bin/chromium is missing: run scripts/bootstrap");
    }
    Ok(dir)
}

/// Runs a Playwright script of tests/browser with `args`; its stdout is JSON.
async fn node(script: &str, args: &[&str]) -> Result<serde_json::Value> {
    let dir = browser_dir()?;
    let out = tokio::process::Command::new("node")
        .current_dir(&dir)
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running node")?;
    if !out.status.success() {
        bail!(
            "browser run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "browser printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_hear_each_other_not_themselves_and_a_listener_hears_both() -> Result<()> {
    let _turn = BROWSERS.lock().await;
    let server = MediaServer::start(|_| {}).await?;
    let dir = std::env::temp_dir().join(format!("chorus-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (a_wav, b_wav) = (dir.join("a.wav"), dir.join("b.wav"));
    write_tone(&a_wav, 620.0)?;
    write_tone(&b_wav, 1040.0)?;
    let url = |who: &str| {
        format!(
            "{}/?room=browsers&token={}&autojoin=1&raw=1",
            server.base_url,
            server.token("browsers", who)
        )
    };
    // Carol listens only: no microphone, a recvonly offer, Chorus's own listener transport
    // (ICE-lite, DTLS and SRTP keyed from the DTLS exporter) instead of `rtc`'s peer.
    let heard = browsers(
        &[
            (url("alice"), &a_wav),
            (url("bob"), &b_wav),
            (url("carol") + "&listen=1", &a_wav),
        ],
        "620,1040",
    )
    .await?;
    let (a, b, c) = (&heard[0], &heard[1], &heard[2]);
    let level = |v: &serde_json::Value, f: &str| v["levels"][f].as_f64().unwrap_or(-300.0);
    eprintln!("alice heard {a}\nbob heard {b}\ncarol heard {c}");
    // What the server saw, for a failure's story: concealed frames, drops and losses per stream.
    for line in server.metrics().lines().filter(|l| {
        [
            "chorus_frames_concealed_total",
            "chorus_packets_dropped_total",
            "chorus_packets_lost_total",
            "chorus_media_dropped_total",
            "chorus_packets_received_total",
        ]
        .iter()
        .any(|m| l.starts_with(m))
    }) {
        eprintln!("server: {line}");
    }
    assert_eq!(a["state"], "connected");
    assert_eq!(b["state"], "connected");
    assert_eq!(c["state"], "connected");
    // Talkers get `rtc`'s sendrecv peer; the listener a sendonly answer from the listener path.
    assert_eq!(a["stats"]["answerDirection"], "sendrecv", "{a}");
    assert_eq!(c["stats"]["answerDirection"], "sendonly", "{c}");
    // Each hears the other clearly (the analyser reports dBFS per FFT bin)...
    assert!(
        level(a, "1040") > -50.0,
        "alice should hear bob's 1040 Hz: {a}"
    );
    assert!(
        level(b, "620") > -50.0,
        "bob should hear alice's 620 Hz: {b}"
    );
    // ...throughout the window, not on average: a dropout of a few hundred ms fails too...
    let throughout = |v: &serde_json::Value, f: &str| {
        v["series"][f].as_array().is_some_and(|s| {
            s.len() == 10 && s.iter().all(|x| x.as_f64().unwrap_or(-300.0) > -50.0)
        })
    };
    assert!(throughout(a, "1040"), "alice lost bob's tone at times: {a}");
    assert!(throughout(b, "620"), "bob lost alice's tone at times: {b}");
    // The listener hears both talkers, throughout.
    assert!(
        throughout(c, "620"),
        "carol lost alice's tone at times: {c}"
    );
    assert!(throughout(c, "1040"), "carol lost bob's tone at times: {c}");
    // ...and its own tone not at all: at least 40 dB below the other's.
    assert!(
        level(a, "620") < level(a, "1040") - 40.0,
        "alice hears herself: {a}"
    );
    assert!(
        level(b, "1040") < level(b, "620") - 40.0,
        "bob hears himself: {b}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_my_phone_from_the_browser() -> Result<()> {
    let _turn = BROWSERS.lock().await;
    use chorus_crds::SipTransport;
    use chorus_tests::call_me::CallMeRig;
    use chorus_tests::telephony::{Baresip, BaresipOptions};
    let rig = CallMeRig::one_server(SipTransport::Udp).await?;
    let phone = Baresip::start(&rig.kam, BaresipOptions::phone("1001").tone(440.0))?;
    let dir = std::env::temp_dir().join(format!("chorus-browser-phone-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let wav = dir.join("mic.wav");
    write_tone(&wav, 1000.0)?;
    let server = rig.server(0);
    let url = format!(
        "{}/?room=phones&token={}&autojoin=1&raw=1",
        server.base_url,
        server.token("phones", "pia")
    );
    let seen = node(
        "call_my_phone.mjs",
        &[
            url.as_str(),
            &wav.to_string_lossy(),
            "1001",
            "3",
            "440,1000",
        ],
    )
    .await?;
    eprintln!("the page saw {seen}");
    let states: Vec<&str> = seen["states"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(states.first(), Some(&"dialing"), "{seen}");
    assert!(
        states.windows(2).any(|w| w == ["active", "ended"]) && states.last() == Some(&"ended"),
        "the page shows the call active, then ended: {seen}"
    );
    assert_eq!(seen["activeText"], "Your phone is in the call.", "{seen}");
    assert_eq!(seen["endedText"], "Phone call ended: hung up.", "{seen}");
    let level = |f: &str| seen["levels"][f].as_f64().unwrap_or(-300.0);
    assert!(level("440") > -50.0, "the page hears the phone: {seen}");
    // The server hung the phone up (its BYE reaching a phone is checked in tests/call_me.rs).
    let metrics = rig.metrics(0).await?;
    assert!(
        metrics.contains("chorus_calls_total{outcome=\"hangup\"} 1"),
        "the server ended the call as hung up:\n{metrics}"
    );
    drop(phone);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A Playwright script of tests/browser driven step by step: it prints one JSON object per line
/// and reads lines from stdin. Killed if dropped early.
struct NodeSteps {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl NodeSteps {
    fn start(script: &str, args: &[&str]) -> Result<Self> {
        let mut child = tokio::process::Command::new("node")
            .current_dir(browser_dir()?)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running node")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("node's stdout")?).lines();
        let mut err = child.stderr.take().context("node's stderr")?;
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        });
        Ok(Self {
            child,
            stdin,
            stdout,
            stderr,
        })
    }

    /// The next JSON line, which must be step `step`.
    async fn step(&mut self, step: &str) -> Result<Value> {
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .with_context(|| format!("the browser script printed no `{step}` in 60 s"))??;
        let Some(line) = line else {
            let _ = self.child.kill().await;
            let status = self.child.wait().await?;
            let stderr = (&mut self.stderr).await.unwrap_or_default();
            bail!("the browser script ended before `{step}` ({status}): {stderr}");
        };
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("the browser script printed no JSON: {line}"))?;
        ensure!(value["step"] == step, "expected step `{step}`, got {value}");
        Ok(value)
    }

    async fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Close stdin (the script's last wait) and wait for it to exit cleanly.
    async fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("the browser script did not exit")??;
        let stderr = self.stderr.await.unwrap_or_default();
        ensure!(
            status.success(),
            "the browser script failed ({status}): {stderr}"
        );
        Ok(())
    }
}

/// The text of the QR code in `png`, scanned by zbarimg (Debian zbar-tools).
async fn scan_qr(png: &Path) -> Result<String> {
    let out = tokio::process::Command::new("zbarimg")
        .args(["--raw", "-q"])
        .arg(png)
        .stdin(Stdio::null())
        .output()
        .await;
    let out = match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("zbarimg is missing (Debian zbar-tools): run scripts/bootstrap")
        }
        other => other.context("running zbarimg")?,
    };
    ensure!(
        out.status.success(),
        "zbarimg found no QR code in {} ({}): {}",
        png.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)
        .context("zbarimg printed no text")?
        .trim()
        .to_owned())
}

/// The participant ids of `room`'s roster, as `token`'s holder sees it.
async fn roster_ids(server: &MediaServer, room: &str, token: &str) -> Result<Vec<u64>> {
    let info = server.room_info_as(room, token).await?;
    Ok(info["participants"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// Waits up to `within` until `bot` heard (over its last 2 s) `want` among `freqs`.
async fn until_heard(
    bot: &chorus_tests::bot::Bot,
    freqs: &[f64],
    want: &[u32],
    within: Duration,
) -> std::collections::BTreeSet<u32> {
    let deadline = Instant::now() + within;
    loop {
        let heard = bot.heard(freqs);
        if heard.iter().copied().eq(want.iter().copied()) || Instant::now() > deadline {
            return heard;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "Move to another device" (DESIGN §12) in real browsers: page 1 joins (440 Hz), shows the QR
/// code; zbarimg scans a screenshot of it; page 2 (880 Hz, a second Chromium with a fresh context
/// and no join token) opens the scanned link and takes the session over. Page 2 is connected as
/// the same participant, page 1 says it moved and hung up, the listener hears 880 Hz and no
/// 440 Hz, and the roster still has the same two participants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_to_another_device_by_qr_code() -> Result<()> {
    const ROOM: &str = "moving";
    let _turn = BROWSERS.lock().await;
    // Fail at once, not after the browsers ran: the scanner is part of the test.
    let zbar = tokio::process::Command::new("zbarimg")
        .arg("--version")
        .output()
        .await;
    ensure!(
        zbar.is_ok_and(|o| o.status.success()),
        "zbarimg is missing (Debian zbar-tools): run scripts/bootstrap"
    );
    let server = MediaServer::start(|_| {}).await?;
    let listener = server
        .join_bot(ROOM, "lars", BotConfig::new(AudioSource::Silence))
        .await?;
    let l_token = server.token(ROOM, "lars");
    let dir = std::env::temp_dir().join(format!("chorus-browser-move-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (wav1, wav2, png) = (dir.join("1.wav"), dir.join("2.wav"), dir.join("qr.png"));
    write_tone(&wav1, 440.0)?;
    write_tone(&wav2, 880.0)?;
    let url = format!(
        "{}/?room={ROOM}&token={}&autojoin=1&raw=1",
        server.base_url,
        server.token(ROOM, "ada")
    );
    let freqs = [440.0, 880.0];
    let started = Instant::now();
    let mut script = NodeSteps::start(
        "move_device.mjs",
        &[
            url.as_str(),
            &wav1.to_string_lossy(),
            &wav2.to_string_lossy(),
            &png.to_string_lossy(),
        ],
    )?;

    let shown = script.step("qr").await?;
    eprintln!(
        "page 1 shows the code after {:?}: {shown}",
        started.elapsed()
    );
    let page1_id: u64 = shown["participantId"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("page 1's participant id: {shown}"))?;
    ensure!(
        shown["moveState"]
            .as_str()
            .is_some_and(|s| s.starts_with("The code expires in ")),
        "page 1 counts the code's seconds down: {shown}"
    );
    let before = until_heard(&listener, &freqs, &[440], Duration::from_secs(5)).await;
    ensure!(
        before.contains(&440) && !before.contains(&880),
        "the listener hears page 1 before the move: {before:?}"
    );
    let scanned = scan_qr(&png).await?;
    eprintln!("zbarimg read {scanned}");
    ensure!(
        scanned.starts_with(&format!("{}/t#", server.base_url)),
        "the QR code holds the /t link with the code in its fragment: {scanned}"
    );
    script.send_line(&scanned).await?;
    let moved = script.step("moved").await?;
    eprintln!("after the move ({:?}): {moved}", started.elapsed());
    ensure!(
        moved["page2State"] == "connected"
            && moved["page2Status"]
                .as_str()
                .is_some_and(|s| s.starts_with("Connected"))
            && moved["page2StatusIsError"] == false,
        "page 2 is connected: {moved}"
    );
    ensure!(
        moved["page1Status"]
            .as_str()
            .is_some_and(|s| s.contains("Moved to another device.")),
        "page 1 says it moved: {moved}"
    );
    ensure!(
        moved["page1State"] == "none" && moved["page1QrPanelHidden"] == true,
        "page 1 hung up and hid the code: {moved}"
    );
    ensure!(
        moved["page2ParticipantId"].as_str() == Some(page1_id.to_string().as_str()),
        "page 2 is the same participant as page 1 ({page1_id}): {moved}"
    );
    ensure!(
        moved["page2Location"]
            .as_str()
            .is_some_and(|l| l.contains("/t") && !l.contains('#')),
        "the code left page 2's address bar: {moved}"
    );
    ensure!(
        moved["page2CredentialsHidden"] == true && moved["page2Cookies"] == 0,
        "page 2 asks for no token and holds no cookie: {moved}"
    );

    // Page 2 talks on while the listener listens: 880 Hz now, and 440 Hz gone.
    let after = until_heard(&listener, &freqs, &[880], Duration::from_secs(8)).await;
    ensure!(
        after.contains(&880) && !after.contains(&440),
        "the listener hears page 2 (880 Hz) and no longer page 1 (440 Hz): {after:?}"
    );
    let ids = roster_ids(&server, ROOM, &l_token).await?;
    ensure!(
        ids.len() == 2 && ids.contains(&page1_id),
        "the roster still has the listener and participant {page1_id}, and nobody else: {ids:?}"
    );
    script.finish().await?;
    eprintln!("the whole move took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
