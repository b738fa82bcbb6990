//! Headless Chromium (Debian's `chromium`) against the web client: two browsers, each with a fake
//! microphone playing its own tone, join one room. Each must hear the other's tone and not its own,
//! as measured inside the page (WebAudio analyser on the received stream). And a browser uses
//! "Call my phone": a baresip desk phone behind a real Kamailio rings, answers, is heard in the
//! page, and is hung up from the page.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use chorus_tests::media_server::MediaServer;
use chorus_tests::workspace_root;

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

async fn browser(url: String, wav: &Path, freqs: &str) -> Result<serde_json::Value> {
    node(
        "join_and_measure.mjs",
        &[url.as_str(), &wav.to_string_lossy(), "6", freqs],
    )
    .await
}

/// Runs a Playwright script of tests/browser with `args`; its stdout is JSON.
async fn node(script: &str, args: &[&str]) -> Result<serde_json::Value> {
    let dir = workspace_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        bail!("tests/browser/node_modules is missing: run scripts/bootstrap");
    }
    if !Path::new("/usr/bin/chromium").exists() {
        bail!("/usr/bin/chromium is missing: run scripts/bootstrap");
    }
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
async fn two_browsers_hear_each_other_and_not_themselves() -> Result<()> {
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
    let (a, b) = tokio::join!(
        browser(url("alice"), &a_wav, "620,1040"),
        browser(url("bob"), &b_wav, "620,1040")
    );
    let (a, b) = (a?, b?);
    let level = |v: &serde_json::Value, f: &str| v["levels"][f].as_f64().unwrap_or(-300.0);
    eprintln!("alice heard {a}\nbob heard {b}");
    assert_eq!(a["state"], "connected");
    assert_eq!(b["state"], "connected");
    // Each hears the other clearly (the analyser reports dBFS per FFT bin)...
    assert!(
        level(&a, "1040") > -50.0,
        "alice should hear bob's 1040 Hz: {a}"
    );
    assert!(
        level(&b, "620") > -50.0,
        "bob should hear alice's 620 Hz: {b}"
    );
    // ...and its own tone not at all: at least 40 dB below the other's.
    assert!(
        level(&a, "620") < level(&a, "1040") - 40.0,
        "alice hears herself: {a}"
    );
    assert!(
        level(&b, "1040") < level(&b, "620") - 40.0,
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
