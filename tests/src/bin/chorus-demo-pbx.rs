//! `chorus-demo-pbx`: the call manager and desk phone of `make demo`. A Kamailio registrar/proxy on
//! 127.0.0.1:5060 (the `callManagerUri` of examples/conference.yaml, with the accounts of
//! `tests/telephony/kamailio.cfg`: the media servers' `chorus` line of examples/pbx.yaml, phones
//! 1001..1004) and a baresip desk phone registered as extension 1001 that answers at once and
//! talks: an espeak-ng sentence rendered to an 8 kHz mono WAV, repeated.
//!
//! Runs until SIGINT or SIGTERM, or until its stdin closes (the Makefile holds a pipe to it, so it
//! stops with the demo however the demo ends), then stops both. Both are the test harness's
//! (`chorus_tests::telephony`): Kamailio on a fixed port, a baresip phone playing a WAV file.

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use chorus_tests::bot::{espeak_wav, load_wav_48k_mono};
use chorus_tests::telephony::{
    Answer, BARESIP_BIN, Baresip, BaresipOptions, KAMAILIO_BIN, KAMCMD_BIN, Kamailio, Play,
};
use clap::Parser;
use tokio::io::AsyncReadExt as _;

/// The pause after each repetition of the sentence.
const PAUSE_SECONDS: f64 = 1.5;

/// Run a SIP call manager and a talking desk phone for `make demo`.
#[derive(Debug, Parser)]
#[command(name = "chorus-demo-pbx", version)]
struct Args {
    /// The call manager's UDP and TCP port on 127.0.0.1.
    #[arg(long, default_value_t = 5060)]
    port: u16,
    /// The desk phone's extension: one of the accounts of tests/telephony/kamailio.cfg.
    #[arg(long, default_value = "1001")]
    extension: String,
    /// What the phone says, over and over, once answered.
    #[arg(
        long,
        default_value = "Hello from the desk phone. This is extension one thousand and one, \
                         calling in to your conference."
    )]
    say: String,
    /// The espeak-ng voice.
    #[arg(long, default_value = "en-us")]
    voice: String,
    /// How long the recorded voice lasts before the phone falls silent (baresip plays a file once;
    /// a silent phone is hung up after the conference's mediaTimeoutSeconds).
    #[arg(long, default_value_t = 900)]
    talk_seconds: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus-demo-pbx: no demo phone: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    for (path, package) in [
        (KAMAILIO_BIN, "kamailio"),
        (KAMCMD_BIN, "kamailio"),
        (BARESIP_BIN, "baresip-core"),
    ] {
        ensure!(
            Path::new(path).exists(),
            "{path} is missing: install the Debian package {package} (scripts/bootstrap does)"
        );
    }
    let port_free = UdpSocket::bind(("127.0.0.1", args.port)).is_ok()
        && TcpListener::bind(("127.0.0.1", args.port)).is_ok();
    ensure!(
        port_free,
        "127.0.0.1:{} is taken (another call manager?); calls go to whatever listens there",
        args.port
    );
    let dir = std::env::temp_dir().join(format!("chorus-demo-pbx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = serve(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn serve(args: &Args, dir: &Path) -> Result<()> {
    let kamailio = Kamailio::start_on(args.port, tcp_port(args.port + 1)?)?;
    let wav = dir.join("voice-8k.wav");
    write_voice(&args.say, &args.voice, args.talk_seconds, dir, &wav)?;
    let phone = Baresip::start(
        &kamailio,
        BaresipOptions {
            answer: Answer::Auto,
            play: Play::File(wav),
            ..BaresipOptions::phone(&args.extension)
        },
    )?;
    println!(
        "chorus-demo-pbx: call manager (Kamailio) on sip:127.0.0.1:{port}; desk phone {ext} \
         registered: it answers at once and talks (logs in {kam} and {phone})",
        port = args.port,
        ext = args.extension,
        kam = kamailio.dir().display(),
        phone = phone.dir().display()
    );
    println!(
        "chorus-demo-pbx: in the web client, \"Call my phone\" with the number {}",
        args.extension
    );
    let reason = wait_for_stop();
    println!("chorus-demo-pbx: {reason}: stopping the desk phone and the call manager");
    // The phone first (its `quit` deregisters through the call manager), then Kamailio.
    drop(phone);
    drop(kamailio);
    Ok(())
}

/// Blocks until SIGINT, SIGTERM or the end of stdin; says which.
fn wait_for_stop() -> &'static str {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return "no runtime",
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return "no signal handlers";
        };
        let stdin_closed = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            () = stdin_closed => "stdin closed",
        }
    })
}

/// The sentence as 16-bit 8 kHz mono (G.711's format, which baresip's `aufile` needs for PCMU),
/// repeated with a pause for `seconds`.
fn write_voice(text: &str, voice: &str, seconds: u32, dir: &Path, out: &Path) -> Result<()> {
    let raw = dir.join("voice-espeak.wav");
    espeak_wav(text, voice, &raw)?;
    let at_48k = load_wav_48k_mono(&raw)?;
    // 48 kHz to 8 kHz: the mean of each 6 samples, a crude low-pass that speech survives.
    let once: Vec<i16> = at_48k
        .chunks(6)
        .map(|c| (c.iter().map(|&s| i32::from(s)).sum::<i32>() / c.len() as i32) as i16)
        .collect();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(out, spec)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let pause = (PAUSE_SECONDS * 8_000.0) as usize;
    let total = seconds as usize * 8_000;
    let mut written = 0;
    while written < total {
        for &sample in &once {
            writer.write_sample(sample)?;
        }
        for _ in 0..pause {
            writer.write_sample(0i16)?;
        }
        written += once.len() + pause;
    }
    writer
        .finalize()
        .with_context(|| format!("cannot finish {}", out.display()))
}

/// A free port of 127.0.0.1: `preferred` if free, else one the kernel picks.
fn tcp_port(preferred: u16) -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))?;
    Ok(listener.local_addr()?.port())
}
