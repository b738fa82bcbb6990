//! `chorus-bot`: a WebRTC participant that joins a Chorus room over HTTP, talks (a tone, a WAV
//! file, speech-like audio or silence), listens, and prints a JSON report of what it heard.
//!
//! Thin: argument parsing and the run loop; everything else is `chorus_tests::bot`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use chorus_tests::bot::{AudioSource, Bot, BotConfig, BotReport, espeak_wav};
use clap::{ArgGroup, Parser};
use serde::Serialize;

/// Level of a tone or speech when `--level-dbfs` is not given.
const DEFAULT_LEVEL_DBFS: f64 = -20.0;

/// Join a Chorus room as a bot participant and report what it hears.
#[derive(Debug, Parser)]
#[command(name = "chorus-bot", version)]
#[command(group(ArgGroup::new("source").args(["tone", "wav", "speech", "say"])))]
struct Args {
    /// Base URL of the media server's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "CHORUS_SERVER")]
    server: String,
    /// Room to join.
    #[arg(long)]
    room: String,
    /// Join token (JWT minted with the conference key).
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
    /// Send a sine tone at this frequency (Hz).
    #[arg(long, value_name = "HZ")]
    tone: Option<f64>,
    /// Level of the tone or speech in dBFS [default: -20]; for --wav, a gain in dB [default: 0].
    #[arg(long, value_name = "L", allow_negative_numbers = true)]
    level_dbfs: Option<f64>,
    /// Send this WAV file, looped.
    #[arg(long, value_name = "FILE")]
    wav: Option<PathBuf>,
    /// Send speech-like audio (a synthetic harmonic voice with syllables and pauses).
    #[arg(long)]
    speech: bool,
    /// Say this text, looped, with espeak-ng.
    #[arg(long, value_name = "TEXT")]
    say: Option<String>,
    /// The espeak-ng voice for --say, e.g. en-us, en-gb+f3.
    #[arg(long, default_value = "en-us")]
    voice: String,
    /// Leave after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
    /// Write what the bot hears to this WAV file (48 kHz mono).
    #[arg(long, value_name = "OUT.wav")]
    record: Option<PathBuf>,
    /// Frequencies (Hz) to report the received energy of.
    #[arg(long, value_name = "HZ,...", value_delimiter = ',')]
    report_freqs: Vec<f64>,
    /// Exit at once when standard input closes (set by `chorus-operator local`, which holds the
    /// other end of a pipe there, so the bot ends with it however it ends).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

/// The JSON printed on stdout.
#[derive(Debug, Serialize)]
struct Output<'a> {
    room: &'a str,
    participant: Option<String>,
    #[serde(flatten)]
    report: BotReport,
}

async fn run(args: Args) -> Result<()> {
    let level_dbfs = args.level_dbfs.unwrap_or(DEFAULT_LEVEL_DBFS);
    let spoken = match &args.say {
        Some(text) => {
            let path =
                std::env::temp_dir().join(format!("chorus-bot-say-{}.wav", std::process::id()));
            espeak_wav(text, &args.voice, &path)?;
            Some(path)
        }
        None => None,
    };
    let source = match (
        &args.tone,
        spoken.as_ref().or(args.wav.as_ref()),
        args.speech,
    ) {
        (Some(hz), _, _) => AudioSource::Tone {
            hz: *hz,
            level_dbfs,
        },
        (None, Some(path), _) => AudioSource::Wav(path.clone()),
        (None, None, true) => AudioSource::Speech { level_dbfs },
        (None, None, false) => AudioSource::Silence,
    };
    let wav_gain = match source {
        AudioSource::Wav(_) if spoken.is_some() => None,
        AudioSource::Wav(_) => args.level_dbfs,
        _ => None,
    };
    let mut config = BotConfig::new(source);
    config.record = args.record.clone();
    let bot = Bot::join_http(&args.server, &args.room, &args.token, config)
        .await
        .context("chorus-bot could not join")?;
    if let Some(gain_db) = wav_gain {
        bot.set_level_dbfs(gain_db);
    }
    let participant = bot.participant_url().map(str::to_owned);
    eprintln!(
        "chorus-bot: joined room {} as {}",
        args.room,
        participant.as_deref().unwrap_or("?")
    );
    match args.seconds {
        Some(seconds) => {
            let duration = Duration::try_from_secs_f64(seconds.max(0.0))
                .context("--seconds is out of range")?;
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                _ = tokio::signal::ctrl_c() => eprintln!("chorus-bot: interrupted"),
            }
        }
        None => {
            tokio::signal::ctrl_c()
                .await
                .context("cannot wait for Ctrl-C")?;
        }
    }
    let report = bot.leave(&args.report_freqs).await?;
    let output = Output {
        room: &args.room,
        participant,
        report,
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

/// Exit the process once standard input reaches its end.
///
/// No report and no leave: whoever started the bot is gone, and so are, or soon will be, the
/// servers it would say goodbye to.
fn exit_when_stdin_closes() -> std::io::Result<()> {
    chorus_mediaserver::stdin_watch::on_stdin_closed(|| {
        eprintln!("chorus-bot: standard input closed (its parent is gone); exiting");
        std::process::exit(1);
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.exit_on_stdin_close
        && let Err(err) = exit_when_stdin_closes()
    {
        eprintln!("chorus-bot: cannot watch standard input: {err}");
        return ExitCode::FAILURE;
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chorus-bot: {err:#}");
            ExitCode::FAILURE
        }
    }
}
