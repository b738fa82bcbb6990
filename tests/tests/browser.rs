//! Headless Chromium (Debian's `chromium`) against the web client: two browsers, each with a fake
//! microphone playing its own tone, join one room. Each must hear the other's tone and not its own,
//! as measured inside the page (WebAudio analyser on the received stream).

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use chorus_tests::media_server::MediaServer;
use chorus_tests::workspace_root;

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
    let dir = workspace_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        bail!("tests/browser/node_modules is missing: run scripts/bootstrap");
    }
    if !Path::new("/usr/bin/chromium").exists() {
        bail!("/usr/bin/chromium is missing: run scripts/bootstrap");
    }
    let out = tokio::process::Command::new("node")
        .current_dir(&dir)
        .args(["join_and_measure.mjs", &url])
        .arg(wav)
        .args(["6", freqs])
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
