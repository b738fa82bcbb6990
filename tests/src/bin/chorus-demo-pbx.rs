//! `chorus-demo-pbx`: the call manager and desk phone of `make demo`. A Kamailio registrar/proxy on
//! 127.0.0.1:5060 (the `callManagerUri` of examples/conference.yaml, with the accounts of
//! `tests/telephony/kamailio.cfg`: the media servers' `chorus` line of examples/pbx.yaml, phones
//! 1001..1004) and a baresip desk phone registered as extension 1001 that answers at once and
//! talks: an espeak-ng sentence rendered to an 8 kHz mono WAV, repeated.
//!
//! Runs until SIGINT or SIGTERM, or until its stdin closes (the Makefile holds a pipe to it, so it
//! stops with the demo however the demo ends), then stops both. The test harness
//! (`chorus_tests::telephony`) only runs Kamailio on free ports, so the fixed port is done here with
//! the harness' configuration file, binaries and conventions.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chorus_tests::bot::{espeak_wav, load_wav_48k_mono};
use chorus_tests::telephony::{
    BARESIP_BIN, BARESIP_MODULES, KAMAILIO_BIN, KAMCMD_BIN, fixtures_dir, phone_password,
};
use clap::Parser;
use tokio::io::AsyncReadExt as _;

/// How long Kamailio and baresip get to start and register.
const STARTUP: Duration = Duration::from_secs(15);
/// How long each gets to exit politely before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
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
    let mut kamailio = Kamailio::start(dir, args.port)?;
    let wav = dir.join("voice-8k.wav");
    write_voice(&args.say, &args.voice, args.talk_seconds, dir, &wav)?;
    let phone = Phone::start(dir, args.port, &args.extension, &wav, &kamailio);
    let mut phone = match phone {
        Ok(phone) => phone,
        Err(e) => {
            kamailio.stop();
            return Err(e);
        }
    };
    println!(
        "chorus-demo-pbx: call manager (Kamailio) on sip:127.0.0.1:{port}; desk phone {ext} \
         registered: it answers at once and talks (logs in {dir})",
        port = args.port,
        ext = args.extension,
        dir = dir.display()
    );
    println!(
        "chorus-demo-pbx: in the web client, \"Call my phone\" with the number {}",
        args.extension
    );
    let reason = wait_for_stop();
    println!("chorus-demo-pbx: {reason}: stopping the desk phone and the call manager");
    phone.stop();
    kamailio.stop();
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

/// Stops `child` (SIGTERM to its process group when `group`), waiting up to [`STOP_GRACE`]
/// before SIGKILL.
fn stop_child(child: &mut Child, group: bool) {
    let target = if group {
        format!("-{}", child.id())
    } else {
        child.id().to_string()
    };
    let _ = Command::new("kill")
        .args(["-TERM", "--", &target])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &target])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Kamailio with the harness' configuration on a fixed port.
struct Kamailio {
    child: Option<Child>,
    ctl: String,
    log: PathBuf,
}

impl Kamailio {
    fn start(dir: &Path, port: u16) -> Result<Kamailio> {
        // The configuration listens on TLS too, so it needs a certificate.
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .context("cannot generate the TLS certificate")?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.signing_key.serialize_pem())?;
        let tls_port = tcp_port(port + 1)?;
        let ctl = format!("unix:{}", dir.join("kamailio_ctl").display());
        let log = dir.join("kamailio.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(KAMAILIO_BIN)
            .arg("-f")
            .arg(fixtures_dir().join("kamailio.cfg"))
            .args(["-DD", "-E", "-m", "32", "-M", "4"])
            .arg("-P")
            .arg(dir.join("kamailio.pid"))
            .args(["-A", &format!("SIP_PORT={port}")])
            .args(["-A", &format!("TLS_PORT={tls_port}")])
            .args(["-A", &format!("TLS_CERT=\"{}\"", cert.display())])
            .args(["-A", &format!("TLS_KEY=\"{}\"", key.display())])
            .args(["-A", &format!("CTL_SOCK=\"{ctl}\"")])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: Kamailio forks workers, and stop() ends them all.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {KAMAILIO_BIN}"))?;
        let mut kamailio = Kamailio {
            child: Some(child),
            ctl,
            log,
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            if kamailio.kamcmd(&["core.uptime"]).is_ok() {
                return Ok(kamailio);
            }
            let exited = kamailio
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                kamailio.stop();
                bail!(
                    "kamailio did not start; its log {}:\n{}",
                    kamailio.log.display(),
                    std::fs::read_to_string(&kamailio.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kamcmd(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(KAMCMD_BIN)
            .arg("-s")
            .arg(&self.ctl)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()?;
        ensure!(output.status.success(), "kamcmd {args:?} failed");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, true);
        }
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A baresip desk phone: auto-answer, PCMU/PCMA, playing a WAV, registered with Kamailio.
struct Phone {
    child: Option<Child>,
    ctrl_port: u16,
}

impl Phone {
    fn start(
        dir: &Path,
        registrar_port: u16,
        user: &str,
        wav: &Path,
        kamailio: &Kamailio,
    ) -> Result<Phone> {
        let ctrl_port = tcp_port(0)?;
        let phone_dir = dir.join("baresip");
        std::fs::create_dir_all(&phone_dir)?;
        // As chorus_tests::telephony::Baresip writes it, minus recording and TLS.
        std::fs::write(
            phone_dir.join("config"),
            format!(
                "poll_method\t\tepoll\n\
                 sip_listen\t\t127.0.0.1:0\n\
                 net_interface\t\t127.0.0.1\n\
                 audio_player\t\taubridge,sink\n\
                 audio_alert\t\taubridge,sink\n\
                 audio_source\t\taufile,{wav}\n\
                 module_path\t\t{BARESIP_MODULES}\n\
                 module\t\t\tg711.so\n\
                 module\t\t\topus.so\n\
                 module\t\t\taufile.so\n\
                 module\t\t\taubridge.so\n\
                 module_app\t\taccount.so\n\
                 module_app\t\tmenu.so\n\
                 module_app\t\tctrl_tcp.so\n\
                 ctrl_tcp_listen\t\t127.0.0.1:{ctrl_port}\n",
                wav = wav.display(),
            ),
        )?;
        std::fs::write(
            phone_dir.join("accounts"),
            format!(
                "<sip:{user}@127.0.0.1:{registrar_port}>;auth_pass={password};answermode=auto;\
                 audio_codecs=PCMU,PCMA\n",
                password = phone_password(user)
            ),
        )?;
        let log = phone_dir.join("baresip.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(BARESIP_BIN)
            .arg("-f")
            .arg(&phone_dir)
            .current_dir(&phone_dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Not in the terminal's process group: Ctrl-C is ours to pass on, as `quit`.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {BARESIP_BIN}"))?;
        let mut phone = Phone {
            child: Some(child),
            ctrl_port,
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            let dump = kamailio.kamcmd(&["ul.dump"]).unwrap_or_default();
            if dump.contains(&format!("AoR: {user}")) {
                return Ok(phone);
            }
            let exited = phone
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                phone.stop();
                bail!(
                    "baresip {user} did not register; its log {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `quit` over ctrl_tcp (it unregisters; a lone SIGTERM may hang baresip), then the group.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.ctrl_port)) {
            use std::io::Write as _;
            let body = r#"{"command":"quit","params":"","token":"quit"}"#;
            let _ = stream.write_all(format!("{}:{body},", body.len()).as_bytes());
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        stop_child(&mut child, true);
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        self.stop();
    }
}
