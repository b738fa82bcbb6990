//! How important a stream is right now: a smoothed speech level in dBov.
//!
//! The raw input is, per frame, either the sender's RFC 6464 level (free: it is in the RTP header,
//! no decode needed) or, when the sender does not send one, the RMS energy of the decoded frame.
//! Both are expressed in dBov (0 = overload point, -127 = silence) so they rank on one scale.
//!
//! Smoothing is asymmetric: a rise is followed by an exponential moving average with a short time
//! constant (fast attack), a fall is slew-limited to a fixed number of dB per second (slow
//! release). A new talker's first syllable raises their importance within a frame or two, while
//! the gaps between words do not make a current talker drop out; and because the release is a
//! rate, two talkers who pause together keep their relative order. That asymmetry, together with
//! the ranking's hysteresis margin, is what keeps the speaker list from flapping.
//!
//! Invariants: the smoothed level is always within [-127, 0]; any input (NaN included) keeps it
//! there.

use super::AudioLevel;

/// The quietest level RFC 6464 can express; also what "no signal at all" reads.
pub const SILENT_DBOV: f32 = -127.0;

/// Below this smoothed level a stream counts as silent: it is not ranked as a speaker, so it is
/// never selected, never decoded when it carries RFC 6464 levels, and never costs an encode.
/// Room noise on a real microphone sits well below -60 dBov; quiet speech sits well above it.
pub const DEFAULT_SILENCE_THRESHOLD_DBOV: f32 = -60.0;

/// How quickly the level follows a rise (time constant).
pub const DEFAULT_ATTACK_MS: f32 = 10.0;

/// How slowly it follows a fall (dB per second): a -20 dBov talker needs about two seconds of
/// silence to fall below the silence threshold, which bridges any pause between words.
pub const DEFAULT_RELEASE_DB_PER_S: f32 = 20.0;

/// How long the voice flag stays up after the sender last flagged voice (or after the level last
/// crossed the silence threshold, for streams without RFC 6464).
pub const VOICE_HANGOVER_MS: u32 = 300;

/// The level of a PCM frame in dBov: RMS relative to a full-scale square wave, as RFC 6464
/// defines it (a full-scale sine therefore reads about -3 dBov). Clamped to [-127, 0].
pub fn dbov_from_pcm(pcm: &[i16]) -> f32 {
    if pcm.is_empty() {
        return SILENT_DBOV;
    }
    let sum: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / pcm.len() as f64).sqrt();
    if rms <= 0.0 {
        return SILENT_DBOV;
    }
    let db = 20.0 * (rms / 32768.0).log10();
    (db as f32).clamp(SILENT_DBOV, 0.0)
}

/// The RFC 6464 header value as dBov (the header carries -dBov as 0..=127).
pub fn dbov_from_rfc6464(level: AudioLevel) -> f32 {
    -f32::from(level.dbov.min(127))
}

/// Smoothed importance of one stream. Call exactly one `observe_*` per frame tick.
#[derive(Clone, Debug)]
pub struct LevelTracker {
    smoothed: f32,
    attack: f32,
    /// dB the level may fall per frame.
    release_step: f32,
    silence_threshold: f32,
    hangover_frames: u32,
    voice_frames_left: u32,
}

impl LevelTracker {
    /// A tracker for `frame_ms` ticks with the default time constants and silence threshold.
    pub fn new(frame_ms: u32) -> Self {
        Self::with_params(
            frame_ms,
            DEFAULT_ATTACK_MS,
            DEFAULT_RELEASE_DB_PER_S,
            DEFAULT_SILENCE_THRESHOLD_DBOV,
        )
    }

    /// A tracker with an explicit attack time constant (ms), release rate (dB/s) and silence
    /// threshold (dBov). Out-of-range values fall back to instant attack / the defaults.
    pub fn with_params(
        frame_ms: u32,
        attack_ms: f32,
        release_db_per_s: f32,
        silence_dbov: f32,
    ) -> Self {
        let frame = frame_ms.max(1) as f32;
        // Per-frame EMA coefficient for a time constant τ: 1 - e^(-frame/τ).
        let attack = if attack_ms.is_finite() && attack_ms > 0.0 {
            1.0 - (-frame / attack_ms).exp()
        } else {
            1.0
        };
        let rate = if release_db_per_s.is_finite() && release_db_per_s > 0.0 {
            release_db_per_s
        } else {
            DEFAULT_RELEASE_DB_PER_S
        };
        Self {
            smoothed: SILENT_DBOV,
            attack,
            release_step: rate * frame / 1000.0,
            silence_threshold: if silence_dbov.is_finite() {
                silence_dbov.clamp(SILENT_DBOV, 0.0)
            } else {
                DEFAULT_SILENCE_THRESHOLD_DBOV
            },
            hangover_frames: VOICE_HANGOVER_MS.div_ceil(frame_ms.max(1)),
            voice_frames_left: 0,
        }
    }

    fn observe_dbov(&mut self, dbov: f32) {
        let x = if dbov.is_finite() {
            dbov.clamp(SILENT_DBOV, 0.0)
        } else {
            SILENT_DBOV
        };
        let next = if x > self.smoothed {
            self.smoothed + self.attack * (x - self.smoothed)
        } else {
            x.max(self.smoothed - self.release_step)
        };
        self.smoothed = next.clamp(SILENT_DBOV, 0.0);
    }

    fn voice_seen(&mut self, voice: bool) {
        if voice {
            self.voice_frames_left = self.hangover_frames;
        } else {
            self.voice_frames_left = self.voice_frames_left.saturating_sub(1);
        }
    }

    /// A frame whose sender sent an RFC 6464 level.
    pub fn observe_rfc6464(&mut self, level: AudioLevel) {
        let dbov = dbov_from_rfc6464(level);
        self.observe_dbov(dbov);
        self.voice_seen(level.voice && dbov >= self.silence_threshold);
    }

    /// A decoded frame of a sender without RFC 6464 levels.
    pub fn observe_pcm(&mut self, pcm: &[i16]) {
        let dbov = dbov_from_pcm(pcm);
        self.observe_dbov(dbov);
        self.voice_seen(dbov >= self.silence_threshold);
    }

    /// A tick with nothing from the stream (idle, underrun, muted): decays toward silence.
    pub fn observe_silence(&mut self) {
        self.observe_dbov(SILENT_DBOV);
        self.voice_seen(false);
    }

    /// Forgets everything (e.g. on mute), so the stream starts from silence again.
    pub fn reset(&mut self) {
        self.smoothed = SILENT_DBOV;
        self.voice_frames_left = 0;
    }

    /// The smoothed level in dBov: the stream's importance.
    pub fn importance(&self) -> f32 {
        self.smoothed
    }

    /// Whether the stream is below the silence threshold.
    pub fn is_silent(&self) -> bool {
        self.smoothed < self.silence_threshold
    }

    /// Whether the stream is voice-active (with hangover).
    pub fn voice(&self) -> bool {
        self.voice_frames_left > 0
    }

    /// The silence threshold in dBov.
    pub fn silence_threshold(&self) -> f32 {
        self.silence_threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::spectrum::ToneGenerator;

    #[test]
    fn pcm_level_matches_rfc6464_convention() {
        let mut g = ToneGenerator::new(1000.0, 0.0, 48_000);
        let full_sine = g.frame(960);
        assert!((dbov_from_pcm(&full_sine) + 3.0).abs() < 0.2);
        let mut g = ToneGenerator::new(1000.0, -20.0, 48_000);
        assert!((dbov_from_pcm(&g.frame(960)) + 23.0).abs() < 0.2);
        assert_eq!(dbov_from_pcm(&[0; 960]), SILENT_DBOV);
        assert_eq!(dbov_from_pcm(&[]), SILENT_DBOV);
        assert_eq!(dbov_from_pcm(&[i16::MIN; 4]), 0.0);
        assert_eq!(
            dbov_from_rfc6464(AudioLevel {
                dbov: 255,
                voice: false
            }),
            -127.0
        );
    }

    #[test]
    fn fast_attack_slow_release() {
        let mut t = LevelTracker::new(20);
        assert!(t.is_silent());
        let loud = AudioLevel {
            dbov: 20,
            voice: true,
        };
        t.observe_rfc6464(loud);
        // One 20 ms frame with a 10 ms attack covers most of the rise.
        assert!(t.importance() > -40.0, "{}", t.importance());
        t.observe_rfc6464(loud);
        assert!(t.importance() > -25.0);
        assert!(t.voice());
        // 200 ms of silence (a pause between words) leaves it well above the threshold.
        for _ in 0..10 {
            t.observe_silence();
        }
        assert!(!t.is_silent(), "{}", t.importance());
        assert!(t.voice(), "hangover bridges 200 ms");
        // Three seconds of silence and it is silent.
        for _ in 0..150 {
            t.observe_silence();
        }
        assert!(t.is_silent());
        assert!(!t.voice());
    }

    #[test]
    fn output_stays_in_range_for_any_input() {
        let mut t = LevelTracker::with_params(10, 0.0, f32::NAN, f32::INFINITY);
        t.observe_dbov(f32::NAN);
        t.observe_dbov(f32::INFINITY);
        t.observe_dbov(1e9);
        assert!((SILENT_DBOV..=0.0).contains(&t.importance()));
        t.observe_dbov(-1e9);
        assert!((SILENT_DBOV..=0.0).contains(&t.importance()));
        t.reset();
        assert_eq!(t.importance(), SILENT_DBOV);
        assert_eq!(t.silence_threshold(), DEFAULT_SILENCE_THRESHOLD_DBOV);
    }
}
