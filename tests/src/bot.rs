//! The bot: a real WebRTC participant for end-to-end tests, demos and benchmarks.
//!
//! Built on the async `webrtc` 0.21 crate (webrtc-rs), like any non-browser client would be. It
//! offers one sendrecv Opus track with the RFC 6464 audio-level header extension, and joins
//! either through the HTTP join API (a WHIP-like `POST {base}/v1/rooms/{room}/participants`,
//! left with `DELETE` on the returned `Location`) or through any `offer -> answer` function
//! (tests that talk to a `MediaPort` directly).
//!
//! What it sends: 20 ms frames, 48 kHz mono, encoded with real libopus and paced in real time —
//! a tone, a WAV file (looped), speech-like audio, or silence. Every packet carries the RFC 6464
//! level computed from that frame's RMS (-dBov) and a voice flag. The source and its level can
//! be changed while the bot runs ([`Bot::set_source`], [`Bot::set_level_dbfs`]): a quiet bot
//! can become loud.
//!
//! What it keeps: everything it receives, decoded with libopus (packet loss concealed), in
//! memory and optionally in a WAV file; [`Bot::report`] says how loud each of a list of
//! frequencies is (Goertzel) and the overall RMS.
//!
//! Signal tools (tone and speech generators, Goertzel, RMS) come from
//! `chorus_mediaserver::media::spectrum`, so the bot and the server's tests measure alike.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use chorus_mediaserver::media::spectrum::{
    SpeechLikeGenerator, ToneGenerator, ToneReport, rms_dbfs,
};
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
};

/// The bot's sample rate (Opus' native rate).
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples per 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;
/// The RFC 6464 client-to-mixer audio level extension.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// Frames quieter than this (in -dBov) are sent with the voice flag off.
const VOICE_THRESHOLD_DBOV: u8 = 70;
/// Longest gap (in frames) filled with packet-loss concealment; longer gaps are not filled.
const MAX_CONCEALED_FRAMES: u16 = 50;
/// How long ICE gathering and connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the bot sends.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioSource {
    /// A sine tone.
    Tone {
        /// Frequency in Hz.
        hz: f64,
        /// Level in dBFS (0 = full-scale sine).
        level_dbfs: f64,
    },
    /// A WAV file, looped; any sample rate and channel count (mixed to 48 kHz mono).
    Wav(PathBuf),
    /// Speech-like audio: a harmonic voice with syllables and pauses.
    Speech {
        /// Syllable peak level in dBFS.
        level_dbfs: f64,
    },
    /// Digital silence (frames are still sent, with level 127 and no voice).
    Silence,
}

/// How a bot behaves.
#[derive(Debug, Clone)]
pub struct BotConfig {
    /// What to send first (see [`Bot::set_source`]).
    pub source: AudioSource,
    /// Where to write what the bot hears, as 48 kHz mono 16-bit WAV, when it leaves.
    pub record: Option<PathBuf>,
    /// Local UDP address for ICE. `None`: [`Bot::join_http`] binds 127.0.0.1 for a loopback
    /// server and every interface (`0.0.0.0:0`) otherwise; [`Bot::join_with`] binds 127.0.0.1.
    pub bind: Option<String>,
    /// Decode what arrives (true) or only count packets (false): a crowd of listeners in a load
    /// test need not spend the CPU the few bots that check what they hear do.
    pub decode: bool,
    /// Discontinuous transmission: while the source is digital silence, send one frame in 20
    /// (every 400 ms), as Opus DTX does, instead of every frame.
    pub dtx: bool,
    /// How long after its track is ready the bot starts its 20 ms send clock: the phase of its
    /// frames against everyone else's. `None`: at once, so bots joined one after another get
    /// phases set by how long each join took (on loopback, regularly spaced, not random).
    pub send_phase: Option<Duration>,
    /// A send clock on a shared grid instead: frames go at `epoch + phase + k·20 ms`, so bots
    /// given the same epoch keep exactly the phases asked of them, whenever each joined.
    pub send_clock: Option<(Instant, Duration)>,
}

impl BotConfig {
    /// A bot sending `source`, decoding what it hears, recording nothing.
    pub fn new(source: AudioSource) -> Self {
        BotConfig {
            source,
            record: None,
            bind: None,
            decode: true,
            dtx: false,
            send_phase: None,
            send_clock: None,
        }
    }

    /// The same bot, sending on the grid `epoch + phase + k·20 ms` (see
    /// [`BotConfig::send_clock`]).
    pub fn with_send_clock(mut self, epoch: Instant, phase: Duration) -> Self {
        self.send_clock = Some((epoch, phase));
        self
    }

    /// The same bot, starting its send clock `phase` after its track is ready (see
    /// [`BotConfig::send_phase`]).
    pub fn with_send_phase(mut self, phase: Duration) -> Self {
        self.send_phase = Some(phase);
        self
    }

    /// The same bot, counting packets instead of decoding them.
    pub fn counting_only(mut self) -> Self {
        self.decode = false;
        self
    }

    /// The same bot, with discontinuous transmission while silent (see [`BotConfig::dtx`]).
    pub fn with_dtx(mut self) -> Self {
        self.dtx = true;
        self
    }
}

/// Energy at one frequency of what the bot heard.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrequencyReport {
    /// The frequency analysed.
    pub freq_hz: f64,
    /// Its level (Goertzel amplitude) in dBFS.
    pub level_dbfs: f64,
    /// Whether it stands well above the noise floor.
    pub present: bool,
}

/// What the bot heard (and sent), as printed by `chorus-bot`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BotReport {
    /// Seconds of audio analysed.
    pub seconds_analyzed: f64,
    /// Seconds of audio received in all.
    pub seconds_received: f64,
    /// RTP packets received.
    pub packets_received: u64,
    /// RTP packets sent.
    pub packets_sent: u64,
    /// Overall RMS of the analysed audio, dBFS.
    pub rms_dbfs: f64,
    /// The level at frequencies away from the ones asked for: what "nothing" reads.
    pub noise_floor_dbfs: f64,
    /// One entry per frequency asked for.
    pub frequencies: Vec<FrequencyReport>,
    /// Problems met while leaving (the `DELETE` or closing failed); empty when all went well.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The RFC 6464 level of a frame: its RMS in -dBov (0 = loudest, 127 = silence), where
/// 0 dBov is a full-scale square wave.
pub fn audio_level_dbov(samples: &[i16]) -> u8 {
    if samples.is_empty() {
        return 127;
    }
    let mean_square = samples
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / samples.len() as f64;
    let rms = mean_square.sqrt() / 32768.0;
    if rms <= 0.0 {
        return 127;
    }
    (-20.0 * rms.log10()).round().clamp(0.0, 127.0) as u8
}

/// Loads a WAV file as 48 kHz mono samples (channels averaged, linear resampling).
pub fn load_wav_48k_mono(path: &Path) -> Result<Vec<i16>> {
    let mut reader = hound::WavReader::open(path)
        .with_context(|| format!("cannot open WAV file {}", path.display()))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .map(|s| s.map(|v| v * 32767.0))
            .collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let shift = i32::from(spec.bits_per_sample).saturating_sub(16);
            reader
                .samples::<i32>()
                .map(|s| {
                    s.map(|v| {
                        if shift >= 0 {
                            (v >> shift) as f32
                        } else {
                            (v << -shift) as f32
                        }
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    let mono: Vec<f32> = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / frame.len() as f32)
        .collect();
    if mono.is_empty() {
        bail!("WAV file {} has no samples", path.display());
    }
    let ratio = f64::from(spec.sample_rate.max(1)) / f64::from(SAMPLE_RATE);
    let out_len = ((mono.len() as f64) / ratio).floor().max(1.0) as usize;
    let resampled = (0..out_len)
        .map(|i| {
            let position = i as f64 * ratio;
            let index = position.floor() as usize;
            let fraction = (position - index as f64) as f32;
            let a = mono.get(index).copied().unwrap_or(0.0);
            let b = mono.get(index + 1).copied().unwrap_or(a);
            (a + (b - a) * fraction).round().clamp(-32768.0, 32767.0) as i16
        })
        .collect();
    Ok(resampled)
}

/// The live generator behind an [`AudioSource`].
enum Generator {
    Tone(ToneGenerator),
    Wav {
        samples: Arc<Vec<i16>>,
        position: usize,
        gain: f32,
    },
    Speech(SpeechLikeGenerator),
    Silence,
}

impl Generator {
    fn new(source: &AudioSource) -> Result<Self> {
        Ok(match source {
            AudioSource::Tone { hz, level_dbfs } => {
                Generator::Tone(ToneGenerator::new(*hz, *level_dbfs, SAMPLE_RATE))
            }
            AudioSource::Wav(path) => Generator::Wav {
                samples: Arc::new(load_wav_48k_mono(path)?),
                position: 0,
                gain: 1.0,
            },
            AudioSource::Speech { level_dbfs } => Generator::Speech(SpeechLikeGenerator::new(
                140.0,
                *level_dbfs,
                SAMPLE_RATE,
                rand::random(),
            )),
            AudioSource::Silence => Generator::Silence,
        })
    }

    fn fill(&mut self, frame: &mut [i16]) {
        match self {
            Generator::Tone(tone) => tone.fill(frame),
            Generator::Speech(speech) => speech.fill(frame),
            Generator::Silence => frame.fill(0),
            Generator::Wav {
                samples,
                position,
                gain,
            } => {
                for sample in frame.iter_mut() {
                    let value = samples.get(*position).copied().unwrap_or(0);
                    *sample = (f32::from(value) * *gain).round().clamp(-32768.0, 32767.0) as i16;
                    *position = (*position + 1) % samples.len().max(1);
                }
            }
        }
    }

    fn set_level_dbfs(&mut self, level_dbfs: f64) {
        match self {
            Generator::Tone(tone) => tone.set_level_dbfs(level_dbfs),
            Generator::Speech(speech) => {
                // Keep the pitch, restart at the new level.
                *speech = SpeechLikeGenerator::new(140.0, level_dbfs, SAMPLE_RATE, rand::random());
            }
            // For a file, the level is a gain relative to the file (0 dB = as recorded).
            Generator::Wav { gain, .. } => *gain = 10f32.powf(level_dbfs as f32 / 20.0),
            Generator::Silence => {}
        }
    }
}

/// With DTX, one silent frame in this many is sent (400 ms at 20 ms frames).
const DTX_PERIOD_FRAMES: u32 = 20;

/// Frames at or below this level (in -dBov) count as silence for onset detection.
const ONSET_SILENT_DBOV: u8 = 100;

/// What the send and receive tasks share with the [`Bot`].
struct Shared {
    generator: Mutex<Generator>,
    received: Mutex<Vec<i16>>,
    /// For delay measurement: (sample offset in `received`, arrival) of every decoded packet.
    arrivals: Mutex<Vec<(usize, Instant)>>,
    /// For delay measurement: when the last onset left the bot (a silence-to-sound transition, or
    /// the first frame of a source set by [`Bot::set_source`]).
    onset_sent: Mutex<Option<Instant>>,
    /// Bumped by every [`Bot::set_source`], so the sender knows a new source started.
    source_epoch: AtomicU64,
    /// Whether received packets are decoded.
    decode: bool,
    /// Whether silence is sent discontinuously.
    dtx: bool,
    /// See [`BotConfig::send_phase`].
    send_phase: Option<Duration>,
    /// See [`BotConfig::send_clock`].
    send_clock: Option<(Instant, Duration)>,
    packets_sent: AtomicU64,
    packets_received: AtomicU64,
    /// Highest extended RTP sequence number received, plus 1 (0 before the first packet): with
    /// `first_sequence`, how many packets the sender sent, for loss counting.
    sequence_end: AtomicU64,
    first_sequence: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking audio task cannot leave these in a state worse than "partly filled".
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The peer connection's event handler. `PeerConnectionEventHandler` is declared with
/// `async_trait`; these are that macro's expansion written out, so no extra dependency.
struct BotEvents {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    shared: Arc<Shared>,
}

type EventFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl PeerConnectionEventHandler for BotEvents {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if state == RTCIceGatheringState::Complete {
                self.gathered.send_replace(true);
            }
        })
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.state.send_replace(state);
        })
    }

    fn on_track<'life0, 'async_trait>(
        &'life0 self,
        track: Arc<dyn TrackRemote>,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::spawn(receive_audio(track, shared));
        })
    }
}

/// Decodes the received track with libopus into `shared.received`, concealing short losses.
async fn receive_audio(track: Arc<dyn TrackRemote>, shared: Arc<Shared>) {
    let mut decoder = match opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono) {
        Ok(decoder) => decoder,
        Err(err) => {
            eprintln!("chorus-bot: cannot create an Opus decoder: {err}");
            return;
        }
    };
    // Room for the longest Opus packet (120 ms).
    let mut pcm = vec![0i16; FRAME_SAMPLES * 6];
    let mut last_sequence: Option<u16> = None;
    let mut highest: Option<u64> = None;
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            continue;
        };
        shared.packets_received.fetch_add(1, Ordering::Relaxed);
        // Extended sequence number (unwrapped around the highest so far), for loss counting.
        let sequence = packet.header.sequence_number;
        let extended = match highest {
            None => {
                let first = (1u64 << 32) | u64::from(sequence);
                shared.first_sequence.store(first, Ordering::Relaxed);
                first
            }
            Some(h) => {
                let delta = i64::from(sequence.wrapping_sub(h as u16) as i16);
                h.saturating_add_signed(delta)
            }
        };
        if highest.is_none_or(|h| extended > h) {
            highest = Some(extended);
            shared.sequence_end.store(extended + 1, Ordering::Relaxed);
        }
        if !shared.decode {
            continue;
        }
        let sequence = packet.header.sequence_number;
        if let Some(last) = last_sequence {
            let gap = sequence.wrapping_sub(last);
            if gap == 0 || gap > u16::MAX / 2 {
                continue; // duplicate or late: already concealed
            }
            for _ in 1..gap.min(MAX_CONCEALED_FRAMES) {
                if let Ok(n) = decoder.decode(&[], &mut pcm[..FRAME_SAMPLES], false) {
                    lock(&shared.received).extend_from_slice(&pcm[..n]);
                }
            }
        }
        last_sequence = Some(sequence);
        if packet.payload.is_empty() {
            continue;
        }
        match decoder.decode(&packet.payload, &mut pcm, false) {
            Ok(n) => {
                let arrival = Instant::now();
                let mut received = lock(&shared.received);
                lock(&shared.arrivals).push((received.len(), arrival));
                received.extend_from_slice(&pcm[..n]);
            }
            Err(err) => eprintln!("chorus-bot: undecodable Opus packet: {err}"),
        }
    }
}

/// Sends 20 ms Opus frames from the shared generator, paced in real time, each with its RFC 6464
/// level, until the track is closed.
async fn send_audio(
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    track: Arc<TrackLocalStaticRTP>,
    shared: Arc<Shared>,
) {
    let payload_type = match sender.get_parameters().await {
        Ok(parameters) => match parameters.rtp_parameters.codecs.first() {
            Some(codec) => codec.payload_type,
            None => {
                eprintln!("chorus-bot: no codec was negotiated; not sending");
                return;
            }
        },
        Err(err) => {
            eprintln!("chorus-bot: cannot read the sender's parameters: {err}");
            return;
        }
    };
    let Some(ssrc) = track.track().await.ssrcs().next() else {
        eprintln!("chorus-bot: the track has no SSRC; not sending");
        return;
    };
    let mut encoder =
        match opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip) {
            Ok(encoder) => encoder,
            Err(err) => {
                eprintln!("chorus-bot: cannot create an Opus encoder: {err}");
                return;
            }
        };
    let mut frame = vec![0i16; FRAME_SAMPLES];
    let mut encoded = vec![0u8; 1500];
    let mut sequence_number: u16 = rand::random();
    let mut timestamp: u32 = rand::random();
    let mut first = true;
    let mut previous_level: u8 = 127;
    if let Some((epoch, phase)) = shared.send_clock {
        // The next instant on the grid `epoch + phase + k·frame`.
        let frame = Duration::from_millis(20).as_nanos();
        let into = Instant::now().saturating_duration_since(epoch).as_nanos() % frame;
        let wait = (phase.as_nanos() % frame + frame - into) % frame;
        tokio::time::sleep(Duration::from_nanos(u64::try_from(wait).unwrap_or(0))).await;
    } else if let Some(phase) = shared.send_phase {
        tokio::time::sleep(phase).await;
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut seen_epoch = shared.source_epoch.load(Ordering::SeqCst);
    let mut silent_frames: u32 = 0;
    loop {
        ticker.tick().await;
        let epoch = {
            let mut generator = lock(&shared.generator);
            generator.fill(&mut frame);
            shared.source_epoch.load(Ordering::SeqCst)
        };
        let new_source = epoch != seen_epoch;
        seen_epoch = epoch;
        let level = audio_level_dbov(&frame);
        if shared.dtx && level == 127 && !new_source {
            silent_frames = silent_frames.wrapping_add(1);
            if !silent_frames.is_multiple_of(DTX_PERIOD_FRAMES) {
                // Not sent: the timestamp still advances, as for a real DTX gap.
                timestamp = timestamp.wrapping_add(FRAME_SAMPLES as u32);
                previous_level = level;
                continue;
            }
        } else {
            silent_frames = 0;
        }
        let length = match encoder.encode(&frame, &mut encoded) {
            Ok(length) => length,
            Err(err) => {
                eprintln!("chorus-bot: Opus encoding failed: {err}");
                return;
            }
        };
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: std::mem::take(&mut first),
                payload_type,
                sequence_number,
                timestamp,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(&encoded[..length]),
        };
        sequence_number = sequence_number.wrapping_add(1);
        timestamp = timestamp.wrapping_add(FRAME_SAMPLES as u32);
        let extension = HeaderExtension::AudioLevel(AudioLevelExtension {
            level,
            voice: level < VOICE_THRESHOLD_DBOV,
        });
        let sent_at = Instant::now();
        if track
            .write_rtp_with_extensions(packet, &[extension])
            .await
            .is_err()
        {
            return; // closed
        }
        // A silence-to-sound onset is what delay measurements look for on the far side.
        if level < ONSET_SILENT_DBOV && (new_source || previous_level >= ONSET_SILENT_DBOV) {
            *lock(&shared.onset_sent) = Some(sent_at);
        }
        previous_level = level;
        shared.packets_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where to `DELETE` to leave, when the bot joined over HTTP.
#[derive(Debug, Clone)]
struct HttpSession {
    client: reqwest::Client,
    participant_url: String,
    token: String,
}

/// A participant in a conference.
pub struct Bot {
    peer_connection: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    state: watch::Receiver<RTCPeerConnectionState>,
    sender: Option<JoinHandle<()>>,
    record: Option<PathBuf>,
    http: Option<HttpSession>,
}

impl std::fmt::Debug for Bot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bot")
            .field("state", &*self.state.borrow())
            .field("record", &self.record)
            .field(
                "participant_url",
                &self.http.as_ref().map(|h| &h.participant_url),
            )
            .finish_non_exhaustive()
    }
}

/// Whether `host` (from a URL) names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Bot {
    /// Joins room `room` of the server at `base_url` (e.g. `http://127.0.0.1:8080`) with the
    /// join token `token`: `POST {base}/v1/rooms/{room}/participants` with the SDP offer,
    /// expecting `201 Created`, the answer as the body, and `Location` naming the participant.
    pub async fn join_http(
        base_url: &str,
        room: &str,
        token: &str,
        mut config: BotConfig,
    ) -> Result<Bot> {
        let base =
            reqwest::Url::parse(base_url).with_context(|| format!("`{base_url}` is not a URL"))?;
        if config.bind.is_none() {
            let loopback = base.host_str().is_some_and(is_loopback_host);
            config.bind = Some(if loopback { "127.0.0.1:0" } else { "0.0.0.0:0" }.to_owned());
        }
        let join_url = base
            .join(&format!("/v1/rooms/{room}/participants"))
            .context("cannot build the join URL")?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .context("cannot build the HTTP client")?;
        let session = Arc::new(Mutex::new(None::<HttpSession>));
        let session_slot = Arc::clone(&session);
        let token_owned = token.to_owned();
        let bot = Bot::join_with(config, move |offer| async move {
            let (body, participant_url) = post_offer(&client, &join_url, &token_owned, offer)
                .await
                .context("joining failed")?;
            *lock(&session_slot) = Some(HttpSession {
                client,
                participant_url,
                token: token_owned.clone(),
            });
            Ok(body)
        })
        .await?;
        let mut bot = bot;
        bot.http = lock(&session).take();
        Ok(bot)
    }

    /// Joins through `signal`, which takes the SDP offer and returns the SDP answer (for tests
    /// that hand the offer to a `MediaPort` directly). Returns once the connection is up.
    pub async fn join_with<F, Fut>(config: BotConfig, signal: F) -> Result<Bot>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<String>>,
    {
        let generator = Generator::new(&config.source)?;
        let shared = Arc::new(Shared {
            generator: Mutex::new(generator),
            received: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            onset_sent: Mutex::new(None),
            source_epoch: AtomicU64::new(0),
            decode: config.decode,
            dtx: config.dtx,
            send_phase: config.send_phase,
            send_clock: config.send_clock,
            packets_sent: AtomicU64::new(0),
            packets_received: AtomicU64::new(0),
            sequence_end: AtomicU64::new(0),
            first_sequence: AtomicU64::new(0),
        });

        let opus = RTCRtpCodec {
            mime_type: "audio/opus".to_owned(),
            clock_rate: SAMPLE_RATE,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        };
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus.clone(),
                payload_type: 111,
            },
            RtpCodecKind::Audio,
        )?;
        media_engine.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: AUDIO_LEVEL_URI.to_owned(),
            },
            RtpCodecKind::Audio,
            None,
        )?;
        let (gathered_tx, mut gathered) = watch::channel(false);
        let (state_tx, mut state) = watch::channel(RTCPeerConnectionState::New);
        let events = BotEvents {
            gathered: gathered_tx,
            state: state_tx,
            shared: Arc::clone(&shared),
        };
        let bind = config
            .bind
            .clone()
            .unwrap_or_else(|| "127.0.0.1:0".to_owned());
        let peer_connection = PeerConnectionBuilder::new()
            .with_media_engine(media_engine)
            .with_handler(Arc::new(events))
            .with_udp_addrs(vec![bind])
            .build()
            .await
            .context("cannot create the peer connection")?;
        let peer_connection: Arc<dyn PeerConnection> = Arc::new(peer_connection);

        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "chorus-bot".to_owned(),
            "chorus-bot-audio".to_owned(),
            "chorus bot".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(rand::random::<u32>()),
                    ..Default::default()
                },
                codec: opus,
                ..Default::default()
            }],
        )));
        let sender = peer_connection
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .context("cannot add the audio track")?;

        let offer = peer_connection.create_offer(None).await?;
        peer_connection.set_local_description(offer).await?;
        tokio::time::timeout(CONNECT_TIMEOUT, gathered.wait_for(|done| *done))
            .await
            .context("ICE gathering did not finish")?
            .context("ICE gathering was abandoned")?;
        let offer = peer_connection
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description after gathering"))?
            .sdp;

        let connect = async {
            let answer = signal(offer).await?;
            let answer = RTCSessionDescription::answer(answer)
                .context("the server's answer is not valid SDP")?;
            peer_connection
                .set_remote_description(answer)
                .await
                .context("the server's answer was refused")?;
            let reached = tokio::time::timeout(
                CONNECT_TIMEOUT,
                state.wait_for(|state| {
                    matches!(
                        state,
                        RTCPeerConnectionState::Connected
                            | RTCPeerConnectionState::Failed
                            | RTCPeerConnectionState::Closed
                    )
                }),
            )
            .await
            .context("the connection did not come up in time")?
            .map(|state| *state)
            .context("the connection was dropped")?;
            if reached != RTCPeerConnectionState::Connected {
                bail!("the connection ended as {reached} before it was up");
            }
            Ok(())
        };
        if let Err(err) = connect.await {
            let _ = peer_connection.close().await;
            return Err(err);
        }

        let sending = tokio::spawn(send_audio(sender, track, Arc::clone(&shared)));
        Ok(Bot {
            peer_connection,
            shared,
            state,
            sender: Some(sending),
            record: config.record,
            http: None,
        })
    }

    /// Stops sending and closes the connection, leaving nothing running (a dropped bot only stops
    /// sending). For bots that joined without HTTP, or whose server is going away anyway.
    pub async fn close(&self) {
        if let Some(sending) = &self.sender {
            sending.abort();
        }
        let _ = self.peer_connection.close().await;
    }

    /// Switches what the bot sends, from the next frame on.
    pub fn set_source(&self, source: &AudioSource) -> Result<()> {
        let generator = Generator::new(source)?;
        let mut current = lock(&self.shared.generator);
        *current = generator;
        // Under the same lock the sender fills a frame and reads the epoch in: a frame of the new
        // source is always one the sender knows is new (else its onset would be stamped a frame
        // late, on the next frame, and the measured delay come out 20 ms short).
        self.shared.source_epoch.fetch_add(1, Ordering::SeqCst);
        drop(current);
        Ok(())
    }

    /// Changes the level of the current source (a tone keeps its phase), from the next frame.
    pub fn set_level_dbfs(&self, level_dbfs: f64) {
        lock(&self.shared.generator).set_level_dbfs(level_dbfs);
    }

    /// The connection's current state.
    pub fn connection_state(&self) -> RTCPeerConnectionState {
        *self.state.borrow()
    }

    /// Where the bot's participant lives on the server, when it joined over HTTP.
    pub fn participant_url(&self) -> Option<&str> {
        self.http.as_ref().map(|h| h.participant_url.as_str())
    }

    /// When this bot last sent a silence-to-sound onset (after [`Bot::set_source`] from silence).
    pub fn onset_sent(&self) -> Option<Instant> {
        *lock(&self.shared.onset_sent)
    }

    /// When the first packet carrying `freq_hz` (above `threshold_dbfs`) arrived after `since`:
    /// the far end of a mouth-to-ear delay measurement.
    pub fn first_arrival_of(
        &self,
        freq_hz: f64,
        threshold_dbfs: f64,
        since: Instant,
    ) -> Option<Instant> {
        let arrivals = lock(&self.shared.arrivals).clone();
        let received = lock(&self.shared.received);
        arrivals
            .iter()
            .filter(|(_, at)| *at >= since)
            .find(|(offset, _)| {
                let end = (*offset + FRAME_SAMPLES).min(received.len());
                received
                    .get(*offset..end)
                    .is_some_and(|frame| crate::bot::tone_level(frame, freq_hz) > threshold_dbfs)
            })
            .map(|(_, at)| *at)
    }

    /// When the onset of `freq_hz` reached this bot's ear, to a fraction of a frame: the arrival
    /// of the packet holding the onset's first sample, plus that sample's place in the packet
    /// (the bot plays each packet as it arrives). Only audio arriving after `since` is searched.
    /// The onset is found by [`detect_onset`]; [`codec_onset_offset`] gives the same detector's
    /// answer for the bots' own encoder and decoder, so the two can be subtracted.
    pub fn onset_heard(&self, freq_hz: f64, since: Instant) -> Option<Instant> {
        let arrivals = lock(&self.shared.arrivals).clone();
        let received = lock(&self.shared.received);
        let start = arrivals.iter().find(|(_, at)| *at >= since)?.0;
        let onset = detect_onset(&received, start, freq_hz)?;
        let (offset, at) = arrivals
            .iter()
            .take_while(|(offset, _)| *offset <= onset)
            .last()?;
        let within = (onset - offset) as f64 / f64::from(SAMPLE_RATE);
        Some(*at + Duration::from_secs_f64(within))
    }

    /// Packets received so far, and packets the far end sent meanwhile (by RTP sequence numbers,
    /// from the first received to the highest): their difference is what was lost.
    pub fn packet_counts(&self) -> (u64, u64) {
        let received = self.shared.packets_received.load(Ordering::Relaxed);
        let end = self.shared.sequence_end.load(Ordering::Relaxed);
        let first = self.shared.first_sequence.load(Ordering::Relaxed);
        (received, end.saturating_sub(first))
    }

    /// Which of `freqs_hz` the bot heard (present, in its report's sense) over the last two
    /// seconds, in whole Hz.
    pub fn heard(&self, freqs_hz: &[f64]) -> std::collections::BTreeSet<u32> {
        self.heard_within(Duration::from_secs(2), freqs_hz)
    }

    /// Which of `freqs_hz` the bot heard over the last `window`, in whole Hz.
    pub fn heard_within(
        &self,
        window: Duration,
        freqs_hz: &[f64],
    ) -> std::collections::BTreeSet<u32> {
        self.report_window(Some(window), freqs_hz)
            .frequencies
            .iter()
            .filter(|f| f.present)
            .map(|f| f.freq_hz as u32)
            .collect()
    }

    /// Everything received so far, decoded (48 kHz mono).
    pub fn received_samples(&self) -> Vec<i16> {
        lock(&self.shared.received).clone()
    }

    /// Seconds of audio received so far.
    pub fn seconds_received(&self) -> f64 {
        lock(&self.shared.received).len() as f64 / f64::from(SAMPLE_RATE)
    }

    /// Analyses everything received so far at `freqs_hz`.
    pub fn report(&self, freqs_hz: &[f64]) -> BotReport {
        self.report_window(None, freqs_hz)
    }

    /// Analyses the last `window` of received audio (all of it if `None`) at `freqs_hz`.
    pub fn report_window(&self, window: Option<Duration>, freqs_hz: &[f64]) -> BotReport {
        let received = lock(&self.shared.received);
        let start = window.map_or(0, |window| {
            let wanted = (window.as_secs_f64() * f64::from(SAMPLE_RATE)) as usize;
            received.len().saturating_sub(wanted)
        });
        let analyzed = &received[start..];
        let tones = ToneReport::analyze(analyzed, freqs_hz, SAMPLE_RATE);
        BotReport {
            seconds_analyzed: analyzed.len() as f64 / f64::from(SAMPLE_RATE),
            seconds_received: received.len() as f64 / f64::from(SAMPLE_RATE),
            packets_received: self.shared.packets_received.load(Ordering::Relaxed),
            packets_sent: self.shared.packets_sent.load(Ordering::Relaxed),
            rms_dbfs: rms_dbfs(analyzed),
            noise_floor_dbfs: tones.noise_floor_dbfs,
            frequencies: tones
                .tones
                .iter()
                .map(|tone| FrequencyReport {
                    freq_hz: tone.freq_hz,
                    level_dbfs: tone.level_dbfs,
                    present: tone.present,
                })
                .collect(),
            warnings: Vec::new(),
        }
    }

    /// Leaves: stops sending, `DELETE`s the participant (HTTP joins), closes the connection,
    /// writes the recording, and reports on everything received. A failed `DELETE` or close is
    /// a warning in the report; only failing to write the recording is an error.
    pub async fn leave(mut self, freqs_hz: &[f64]) -> Result<BotReport> {
        if let Some(sending) = self.sender.take() {
            sending.abort();
        }
        let mut problems = Vec::new();
        if let Some(http) = self.http.take() {
            match http
                .client
                .delete(&http.participant_url)
                .bearer_auth(&http.token)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => problems.push(format!(
                    "DELETE {} answered {}",
                    http.participant_url,
                    response.status()
                )),
                Err(err) => problems.push(format!("DELETE {} failed: {err}", http.participant_url)),
            }
        }
        if let Err(err) = self.peer_connection.close().await {
            problems.push(format!("closing the connection failed: {err}"));
        }
        let mut report = self.report(freqs_hz);
        report.warnings = problems;
        if let Some(path) = &self.record {
            write_wav(path, &lock(&self.shared.received))?;
        }
        Ok(report)
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        if let Some(sending) = self.sender.take() {
            sending.abort();
        }
    }
}

/// Writes `samples` as a 48 kHz mono 16-bit WAV file.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    for &sample in samples {
        writer.write_sample(sample)?;
    }
    writer
        .finalize()
        .with_context(|| format!("cannot finish {}", path.display()))
}

/// The level of `freq_hz` in one frame, in dBFS.
pub fn tone_level(frame: &[i16], freq_hz: f64) -> f64 {
    chorus_mediaserver::media::spectrum::tone_level_dbfs(frame, freq_hz, SAMPLE_RATE)
}

/// Window of the onset detector, in samples (2.5 ms).
const ONSET_WINDOW: usize = 120;
/// Step between the detector's windows, in samples (0.5 ms).
const ONSET_HOP: usize = 24;
/// A tone counts as started in a window that reaches this far below its settled level.
const ONSET_BELOW_SETTLED_DB: f64 = 6.0;

/// Where the tone `freq_hz` starts in `samples`, searching from `start`: the first sample of the
/// first 2.5 ms window whose Goertzel level reaches 6 dB below the tone's settled level (measured
/// 20–40 ms after a coarse first detection at −50 dBFS). Relative to the settled level, so a
/// server's gain does not move the answer. `None` if the tone never shows.
pub fn detect_onset(samples: &[i16], start: usize, freq_hz: f64) -> Option<usize> {
    let windows = |from: usize| {
        (from..samples.len().saturating_sub(ONSET_WINDOW))
            .step_by(ONSET_HOP)
            .map(move |i| (i, tone_level(&samples[i..i + ONSET_WINDOW], freq_hz)))
    };
    let (coarse, _) = windows(start).find(|(_, level)| *level > -50.0)?;
    let settled = samples
        .get(coarse + FRAME_SAMPLES..coarse + 2 * FRAME_SAMPLES)
        .map(|frame| tone_level(frame, freq_hz))?;
    let threshold = settled - ONSET_BELOW_SETTLED_DB;
    windows(start)
        .find(|(_, level)| *level >= threshold)
        .map(|(i, _)| i)
}

/// How far into the decoded audio the bots' own codec puts the onset of `after` following
/// `before`, in ms after the first frame of `after` was sent: what the bots add to a mouth-to-ear
/// measurement by [`Bot::onset_heard`] (encoder look-ahead, plus the detector's own bias). It runs
/// the same libopus settings as the sending bot, without a network.
pub fn codec_onset_offset(before: &AudioSource, after: &AudioSource, freq_hz: f64) -> Result<f64> {
    codec_onset_offset_through(before, after, freq_hz, 1)
}

/// [`codec_onset_offset`] through `passes` encode/decode passes in a row (2: the bot's, then a
/// mixing server's), each with the bots' libopus settings.
pub fn codec_onset_offset_through(
    before: &AudioSource,
    after: &AudioSource,
    freq_hz: f64,
    passes: usize,
) -> Result<f64> {
    let (lead_frames, tail_frames) = (25, 10);
    let mut generator = Generator::new(before)?;
    let mut audio = vec![0i16; (lead_frames + tail_frames) * FRAME_SAMPLES];
    for (i, frame) in audio.chunks_exact_mut(FRAME_SAMPLES).enumerate() {
        if i == lead_frames {
            generator = Generator::new(after)?;
        }
        generator.fill(frame);
    }
    let mut packet = vec![0u8; 1500];
    let mut pcm = vec![0i16; FRAME_SAMPLES];
    for _ in 0..passes {
        let mut encoder =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        let mut decoder = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?;
        let mut decoded = Vec::with_capacity(audio.len());
        for frame in audio.chunks_exact(FRAME_SAMPLES) {
            let len = encoder.encode(frame, &mut packet)?;
            let n = decoder.decode(&packet[..len], &mut pcm, false)?;
            decoded.extend_from_slice(&pcm[..n]);
        }
        audio = decoded;
    }
    let first_after = lead_frames * FRAME_SAMPLES;
    let onset = detect_onset(&audio, first_after.saturating_sub(FRAME_SAMPLES), freq_hz)
        .ok_or_else(|| anyhow!("the codec loopback never showed the {freq_hz} Hz onset"))?;
    Ok((onset as f64 - first_after as f64) * 1000.0 / f64::from(SAMPLE_RATE))
}

/// A sine tone source.
pub fn tone(hz: f64, level_dbfs: f64) -> AudioSource {
    AudioSource::Tone { hz, level_dbfs }
}

/// A set of frequencies in whole Hz, to compare with [`Bot::heard`].
pub fn tones(hz: &[u32]) -> std::collections::BTreeSet<u32> {
    hz.iter().copied().collect()
}

/// Speak `text` with espeak-ng (voice such as `en-us`, `en-gb+f3`) into a WAV file, for a bot that
/// talks real synthetic speech. espeak-ng writes 22.05 kHz mono; [`load_wav_48k_mono`] resamples.
pub fn espeak_wav(text: &str, voice: &str, out: &Path) -> Result<()> {
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", voice, "-s", "150", "-w"])
        .arg(out)
        .arg(text)
        .stdin(std::process::Stdio::null())
        .status()
        .context("cannot run espeak-ng (scripts/bootstrap installs it)")?;
    if !status.success() {
        anyhow::bail!("espeak-ng failed ({status})");
    }
    Ok(())
}

/// The join API's exchange (WHIP-like): POSTs the SDP `offer` to `join_url` with `token`;
/// returns the SDP answer and the participant's URL (from `Location`, for leaving).
pub async fn post_offer(
    client: &reqwest::Client,
    join_url: &reqwest::Url,
    token: &str,
    offer: String,
) -> Result<(String, String)> {
    let response = client
        .post(join_url.clone())
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/sdp")
        .body(offer)
        .send()
        .await
        .with_context(|| format!("POST {join_url}"))?;
    let status = response.status();
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::CREATED {
        bail!("POST {join_url} answered {status}: {}", body.trim());
    }
    let location = location
        .ok_or_else(|| anyhow!("POST {join_url} answered 201 without a Location header"))?;
    let participant_url = join_url
        .join(&location)
        .with_context(|| format!("bad Location `{location}`"))?
        .to_string();
    Ok((body, participant_url))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_second_codec_pass_delays_the_onset_by_about_the_opus_look_ahead() {
        let (before, after) = (tone(300.0, -20.0), tone(3000.0, -20.0));
        let once = codec_onset_offset_through(&before, &after, 3000.0, 1).unwrap();
        let twice = codec_onset_offset_through(&before, &after, 3000.0, 2).unwrap();
        eprintln!("onset after one pass {once} ms, after two {twice} ms");
        // The onset cannot show before it was sent, nor a whole frame late.
        assert!((0.0..20.0).contains(&once), "{once}");
        // Opus VoIP look-ahead is 6.5 ms at 48 kHz; the detector works in 0.5 ms steps.
        assert!((5.0..=8.0).contains(&(twice - once)), "{once} -> {twice}");
    }

    use super::*;
    use chorus_mediaserver::endpoint::{InboundAudio, MediaPort, PeerHandle, PeerSender};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn audio_level_follows_rms() {
        let tone = ToneGenerator::new(440.0, -12.0, SAMPLE_RATE).frame(FRAME_SAMPLES * 5);
        assert_eq!(audio_level_dbov(&tone), 15);
        assert_eq!(audio_level_dbov(&[0; 960]), 127);
        assert_eq!(audio_level_dbov(&[]), 127);
        assert_eq!(audio_level_dbov(&[i16::MIN; 960]), 0);
    }

    #[test]
    fn wav_files_are_read_back_at_48k_mono() {
        let dir = std::env::temp_dir().join(format!("chorus-bot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tone.wav");
        let tone = ToneGenerator::new(500.0, -6.0, SAMPLE_RATE).frame(4800);
        write_wav(&path, &tone).unwrap();
        assert_eq!(load_wav_48k_mono(&path).unwrap(), tone);
        // 16 kHz stereo is mixed down and resampled to 48 kHz.
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let path16 = dir.join("tone16.wav");
        let mut writer = hound::WavWriter::create(&path16, spec).unwrap();
        for sample in ToneGenerator::new(500.0, -6.0, 16_000).frame(1600) {
            writer.write_sample(sample).unwrap();
            writer.write_sample(sample).unwrap();
        }
        writer.finalize().unwrap();
        let resampled = load_wav_48k_mono(&path16).unwrap();
        assert_eq!(resampled.len(), 4800);
        let report = ToneReport::analyze(&resampled, &[500.0, 1200.0], SAMPLE_RATE);
        assert!(
            report.tones[0].present && !report.tones[1].present,
            "{report:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn relay(
        mut from: tokio::sync::mpsc::Receiver<InboundAudio>,
        to: PeerSender,
        levels: Arc<Mutex<Vec<u8>>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(audio) = from.recv().await {
                if let Some(level) = audio.level {
                    lock(&levels).push(level.dbov);
                }
                let _ = to.send_opus(audio.payload, FRAME_SAMPLES as u32);
            }
        })
    }

    async fn join_port(port: &Arc<MediaPort>, source: AudioSource) -> (Bot, PeerHandle) {
        let handle_slot = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&handle_slot);
        let port = Arc::clone(port);
        let bot = Bot::join_with(BotConfig::new(source), move |offer| async move {
            let (answer, handle) = port.accept(&offer).await?;
            *lock(&slot) = Some(handle);
            Ok(answer)
        })
        .await
        .unwrap();
        let handle = lock(&handle_slot).take().unwrap();
        (bot, handle)
    }

    /// A stand-in for the HTTP join API (the real one lives in the media server): bearer token
    /// `secret`, `201` with the answer and a `Location`, `DELETE` closes. It echoes each
    /// participant's audio back to it, and reports closed participants on `closed`.
    async fn stub_join_api(
        port: Arc<MediaPort>,
        closed: tokio::sync::mpsc::UnboundedSender<u64>,
    ) -> std::net::SocketAddr {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::response::IntoResponse;
        use axum::routing::{delete, post};

        type Api = (Arc<MediaPort>, tokio::sync::mpsc::UnboundedSender<u64>);
        fn authorized(headers: &HeaderMap) -> bool {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some("Bearer secret")
        }
        async fn join(
            State((port, _)): State<Api>,
            UrlPath(room): UrlPath<String>,
            headers: HeaderMap,
            offer: String,
        ) -> axum::response::Response {
            if !authorized(&headers) {
                return (StatusCode::UNAUTHORIZED, "no valid token").into_response();
            }
            match port.accept(&offer).await {
                Ok((answer, handle)) => {
                    let location = format!("/v1/rooms/{room}/participants/{}", handle.id);
                    let PeerHandle {
                        inbound, outbound, ..
                    } = handle;
                    relay(inbound, outbound, Arc::new(Mutex::new(Vec::new())));
                    (StatusCode::CREATED, [(header::LOCATION, location)], answer).into_response()
                }
                Err(err) => (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
            }
        }
        async fn leave(
            State((port, closed)): State<Api>,
            UrlPath((_room, id)): UrlPath<(String, u64)>,
            headers: HeaderMap,
        ) -> StatusCode {
            if !authorized(&headers) {
                return StatusCode::UNAUTHORIZED;
            }
            port.close_peer(id);
            let _ = closed.send(id);
            StatusCode::NO_CONTENT
        }
        let router = axum::Router::new()
            .route("/v1/rooms/{room}/participants", post(join))
            .route("/v1/rooms/{room}/participants/{id}", delete(leave))
            .with_state((port, closed));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    /// The HTTP join flow: a bad token is refused with the server's message; a good one joins
    /// (201 + Location), audio flows, and leaving sends the DELETE.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joins_and_leaves_over_http() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let port = Arc::new(
            MediaPort::start(socket, "127.0.0.1".parse().unwrap(), shutdown.clone()).unwrap(),
        );
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let api = stub_join_api(Arc::clone(&port), closed_tx).await;
        let base = format!("http://{api}");
        let tone = AudioSource::Tone {
            hz: 800.0,
            level_dbfs: -15.0,
        };

        let refused = Bot::join_http(&base, "lobby", "wrong", BotConfig::new(tone.clone()))
            .await
            .unwrap_err();
        let message = format!("{refused:#}");
        assert!(
            message.contains("401") && message.contains("no valid token"),
            "{message}"
        );

        let record =
            std::env::temp_dir().join(format!("chorus-bot-http-{}.wav", std::process::id()));
        let mut config = BotConfig::new(tone);
        config.record = Some(record.clone());
        let bot = Bot::join_http(&base, "lobby", "secret", config)
            .await
            .unwrap();
        let participant = bot.participant_url().unwrap().to_owned();
        assert!(
            participant.starts_with(&format!("{base}/v1/rooms/lobby/participants/")),
            "{participant}"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        let report = bot.leave(&[800.0, 1500.0]).await.unwrap();
        assert!(report.warnings.is_empty(), "{report:?}");
        assert!(
            report.frequencies[0].present && !report.frequencies[1].present,
            "{report:?}"
        );
        let id: u64 = participant.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(closed_rx.recv().await, Some(id));
        let recorded = load_wav_48k_mono(&record).unwrap();
        assert!(recorded.len() as f64 >= report.seconds_received * f64::from(SAMPLE_RATE) - 1.0);
        std::fs::remove_file(&record).unwrap();
        shutdown.cancel();
    }

    /// Two bots through a `MediaPort` with a relay standing in for the mixer: each hears the
    /// other's tone, and a quiet bot that turns loud shows up in the levels and the audio.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_bots_hear_each_other_and_a_quiet_bot_turns_loud() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let port = Arc::new(
            MediaPort::start(socket, "127.0.0.1".parse().unwrap(), shutdown.clone()).unwrap(),
        );
        let (loud, loud_handle) = join_port(
            &port,
            AudioSource::Tone {
                hz: 500.0,
                level_dbfs: -10.0,
            },
        )
        .await;
        let (quiet, quiet_handle) = join_port(
            &port,
            AudioSource::Tone {
                hz: 1200.0,
                level_dbfs: -60.0,
            },
        )
        .await;
        let quiet_levels = Arc::new(Mutex::new(Vec::new()));
        let relays = [
            relay(
                loud_handle.inbound,
                quiet_handle.outbound.clone(),
                Arc::new(Mutex::new(Vec::new())),
            ),
            relay(
                quiet_handle.inbound,
                loud_handle.outbound.clone(),
                Arc::clone(&quiet_levels),
            ),
        ];
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let quiet_report = quiet.report_window(Some(Duration::from_millis(800)), &[500.0, 1200.0]);
        assert!(quiet_report.frequencies[0].present, "{quiet_report:?}");
        assert!(!quiet_report.frequencies[1].present, "{quiet_report:?}");
        let before = lock(&quiet_levels).last().copied().unwrap();
        assert!((62..=64).contains(&before), "quiet level {before}");

        quiet.set_level_dbfs(-10.0);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let after = lock(&quiet_levels).last().copied().unwrap();
        assert!((12..=14).contains(&after), "loud level {after}");
        let loud_report = loud.report_window(Some(Duration::from_millis(500)), &[500.0, 1200.0]);
        assert!(loud_report.frequencies[1].present, "{loud_report:?}");
        assert!(
            (loud_report.frequencies[1].level_dbfs + 10.0).abs() < 3.0,
            "{loud_report:?}"
        );

        let report = quiet.leave(&[500.0]).await.unwrap();
        assert!(
            report.packets_sent > 80 && report.packets_received > 80,
            "{report:?}"
        );
        loud.leave(&[]).await.unwrap();
        for relay in relays {
            relay.abort();
        }
        shutdown.cancel();
    }
}
