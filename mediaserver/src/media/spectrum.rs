//! Test-signal tools shared by the bot participant, the demos and the tests: phase-continuous tone
//! and speech-like generators, Goertzel single-bin analysis, RMS, and a [`ToneReport`] that says
//! which of a set of tones a recording contains.
//!
//! They live in the library (not in a test module) because the end-to-end bot uses the same
//! generators to talk and the same report to judge what it heard.
//!
//! Conventions: levels are dBFS relative to a full-scale sine (peak 32767 ⇒ 0 dBFS), so a tone
//! generated at -12 dBFS is reported at about -12 dBFS. Generators are deterministic.

use std::f64::consts::TAU;

/// Peak amplitude of a 0 dBFS sine.
const FULL_SCALE: f64 = 32767.0;

/// Lowest level any function here reports, instead of -inf for digital silence.
pub const FLOOR_DBFS: f64 = -150.0;

fn dbfs_to_amplitude(dbfs: f64) -> f64 {
    FULL_SCALE * 10f64.powf(dbfs / 20.0)
}

fn amplitude_to_dbfs(amplitude: f64) -> f64 {
    if amplitude <= 0.0 {
        FLOOR_DBFS
    } else {
        (20.0 * (amplitude / FULL_SCALE).log10()).max(FLOOR_DBFS)
    }
}

fn saturate(x: f64) -> i16 {
    // `as` saturates float→int in Rust; the clamp documents the intent.
    x.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
}

/// A sine generator whose phase carries over between frames, so frames concatenate without
/// clicks (a click would smear energy over every frequency and spoil the analysis).
#[derive(Clone, Debug)]
pub struct ToneGenerator {
    freq_hz: f64,
    amplitude: f64,
    sample_rate: u32,
    phase: f64,
}

impl ToneGenerator {
    /// A tone at `freq_hz`, `level_dbfs` (0 = full scale), sampled at `sample_rate`.
    pub fn new(freq_hz: f64, level_dbfs: f64, sample_rate: u32) -> Self {
        Self {
            freq_hz,
            amplitude: dbfs_to_amplitude(level_dbfs),
            sample_rate: sample_rate.max(1),
            phase: 0.0,
        }
    }

    /// Changes the level from the next sample on; the phase is kept.
    pub fn set_level_dbfs(&mut self, level_dbfs: f64) {
        self.amplitude = dbfs_to_amplitude(level_dbfs);
    }

    /// The tone's frequency.
    pub fn freq_hz(&self) -> f64 {
        self.freq_hz
    }

    /// Fills `out` with the next samples.
    pub fn fill(&mut self, out: &mut [i16]) {
        let step = TAU * self.freq_hz / f64::from(self.sample_rate);
        for s in out {
            *s = saturate(self.amplitude * self.phase.sin());
            // Keep the phase small so precision does not degrade over long runs.
            self.phase = (self.phase + step) % TAU;
        }
    }

    /// The next `samples` samples.
    pub fn frame(&mut self, samples: usize) -> Vec<i16> {
        let mut out = vec![0; samples];
        self.fill(&mut out);
        out
    }
}

/// A voiced-speech stand-in for demos: a harmonic tone (fundamental plus decaying harmonics) with
/// slow pitch drift, shaped by a syllable-rate envelope (about 4 syllables a second with short
/// pauses between them). Deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct SpeechLikeGenerator {
    fundamental_hz: f64,
    amplitude: f64,
    sample_rate: f64,
    phase: f64,
    vibrato_phase: f64,
    /// Samples left in the current syllable or pause.
    segment_left: u32,
    segment_len: u32,
    in_syllable: bool,
    rng: u64,
}

impl SpeechLikeGenerator {
    /// Harmonics summed on the fundamental; their amplitudes fall as 1/k.
    const HARMONICS: u32 = 6;

    /// A talker with `fundamental_hz` pitch and syllable peaks near `level_dbfs`.
    pub fn new(fundamental_hz: f64, level_dbfs: f64, sample_rate: u32, seed: u64) -> Self {
        // Scale so the harmonic sum's peak stays near the requested level.
        let harmonic_sum: f64 = (1..=Self::HARMONICS).map(|k| 1.0 / f64::from(k)).sum();
        Self {
            fundamental_hz,
            amplitude: dbfs_to_amplitude(level_dbfs) / harmonic_sum,
            sample_rate: f64::from(sample_rate.max(1)),
            phase: 0.0,
            vibrato_phase: 0.0,
            segment_left: 0,
            segment_len: 1,
            in_syllable: false,
            // Any non-zero state works for xorshift.
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64: tiny, deterministic, good enough for syllable lengths.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn start_segment(&mut self) {
        self.in_syllable = !self.in_syllable;
        let seconds = if self.in_syllable {
            0.12 + 0.16 * self.next_random()
        } else {
            0.04 + 0.12 * self.next_random()
        };
        self.segment_len = ((seconds * self.sample_rate) as u32).max(1);
        self.segment_left = self.segment_len;
    }

    /// Fills `out` with the next samples.
    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            if self.segment_left == 0 {
                self.start_segment();
            }
            self.segment_left -= 1;
            let envelope = if self.in_syllable {
                // Raised-sine bump over the syllable: soft onset and decay like a vowel.
                let pos = 1.0 - f64::from(self.segment_left) / f64::from(self.segment_len);
                (std::f64::consts::PI * pos).sin().powi(2)
            } else {
                0.0
            };
            let mut v = 0.0;
            for k in 1..=Self::HARMONICS {
                v += (self.phase * f64::from(k)).sin() / f64::from(k);
            }
            *s = saturate(self.amplitude * envelope * v);
            // ±3 % pitch drift at 5 Hz, as intonation.
            let pitch = self.fundamental_hz * (1.0 + 0.03 * self.vibrato_phase.sin());
            self.phase = (self.phase + TAU * pitch / self.sample_rate) % TAU;
            self.vibrato_phase = (self.vibrato_phase + TAU * 5.0 / self.sample_rate) % TAU;
        }
    }

    /// The next `samples` samples.
    pub fn frame(&mut self, samples: usize) -> Vec<i16> {
        let mut out = vec![0; samples];
        self.fill(&mut out);
        out
    }
}

/// RMS level of `samples` in dBFS (a full-scale sine reads 0 dBFS; digital silence reads
/// [`FLOOR_DBFS`]).
pub fn rms_dbfs(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return FLOOR_DBFS;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / samples.len() as f64).sqrt();
    // A sine's RMS is peak/√2; scale so the convention matches tone levels.
    amplitude_to_dbfs(rms * std::f64::consts::SQRT_2)
}

/// Goertzel estimate of the peak amplitude of the `freq_hz` component of `samples`, in sample
/// units. A Hann window keeps strong neighbouring tones from leaking into the bin; the result is
/// normalised by the window's sum so a sine of peak `A` at `freq_hz` reads `A`.
pub fn goertzel_amplitude(samples: &[i16], freq_hz: f64, sample_rate: u32) -> f64 {
    let n = samples.len();
    if n < 2 || sample_rate == 0 {
        return 0.0;
    }
    let w = TAU * freq_hz / f64::from(sample_rate);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    let mut window_sum = 0.0;
    let denom = (n - 1) as f64;
    for (i, &x) in samples.iter().enumerate() {
        let hann = 0.5 - 0.5 * (TAU * i as f64 / denom).cos();
        window_sum += hann;
        let s0 = f64::from(x) * hann + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    if window_sum <= 0.0 {
        return 0.0;
    }
    2.0 * power.max(0.0).sqrt() / window_sum
}

/// Goertzel power of each frequency, as the squared amplitude estimate (sample units²).
pub fn goertzel_power(samples: &[i16], freqs_hz: &[f64], sample_rate: u32) -> Vec<f64> {
    freqs_hz
        .iter()
        .map(|&f| goertzel_amplitude(samples, f, sample_rate).powi(2))
        .collect()
}

/// Level of the `freq_hz` component in dBFS.
pub fn tone_level_dbfs(samples: &[i16], freq_hz: f64, sample_rate: u32) -> f64 {
    amplitude_to_dbfs(goertzel_amplitude(samples, freq_hz, sample_rate))
}

/// One analysed frequency of a [`ToneReport`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ToneLevel {
    /// The frequency analysed.
    pub freq_hz: f64,
    /// Its level in dBFS.
    pub level_dbfs: f64,
    /// Whether it stands at least [`ToneReport::PRESENCE_MARGIN_DB`] above the noise floor, above
    /// [`ToneReport::MIN_PRESENT_DBFS`], and within [`ToneReport::MAX_BELOW_LOUDEST_DB`] of the
    /// loudest candidate.
    pub present: bool,
}

/// Which candidate tones a recording contains, and how loud each is.
#[derive(Clone, Debug, PartialEq)]
pub struct ToneReport {
    /// One entry per candidate frequency, in the order given.
    pub tones: Vec<ToneLevel>,
    /// Median level over probe frequencies away from every candidate: what "nothing there" reads.
    pub noise_floor_dbfs: f64,
}

impl ToneReport {
    /// How far above the noise floor a tone must be to count as present.
    pub const PRESENCE_MARGIN_DB: f64 = 20.0;

    /// Nothing quieter than this counts as present, however clean the rest of the recording:
    /// a periodic signal's 16-bit quantisation error alone puts lines near -100 dBFS at
    /// harmonics of its period, which a floor measured between them would call tones.
    pub const MIN_PRESENT_DBFS: f64 = -80.0;

    /// A candidate this far below the loudest one is a leftover, not a presence: a lossy codec
    /// turns a mix of tones into faint intermodulation products (for tones on a 100 Hz grid,
    /// `2·700 − 1100 = 300`), which land exactly on other candidates 40-60 dB down. Inaudible
    /// next to the tones that made them, they must not count as "heard".
    pub const MAX_BELOW_LOUDEST_DB: f64 = 40.0;

    /// Probes keep this far from any candidate so a present tone does not raise the floor.
    const PROBE_CLEARANCE_HZ: f64 = 40.0;

    /// Analyses `samples` (mono, `sample_rate`) for each of `candidates_hz`.
    pub fn analyze(samples: &[i16], candidates_hz: &[f64], sample_rate: u32) -> Self {
        let mut probes: Vec<f64> = Vec::new();
        // Probes every 37 Hz (an odd spacing so they rarely land on harmonics of round
        // frequencies) across the speech band.
        let mut f = 163.0;
        while f < 3900.0 {
            if candidates_hz
                .iter()
                .all(|c| (c - f).abs() > Self::PROBE_CLEARANCE_HZ)
            {
                probes.push(f);
            }
            f += 37.0;
        }
        let mut floor: Vec<f64> = probes
            .iter()
            .map(|&p| tone_level_dbfs(samples, p, sample_rate))
            .collect();
        floor.sort_by(f64::total_cmp);
        let noise_floor_dbfs = floor.get(floor.len() / 2).copied().unwrap_or(FLOOR_DBFS);
        let levels: Vec<f64> = candidates_hz
            .iter()
            .map(|&f| tone_level_dbfs(samples, f, sample_rate))
            .collect();
        let loudest = levels.iter().copied().fold(FLOOR_DBFS, f64::max);
        let tones = candidates_hz
            .iter()
            .zip(levels)
            .map(|(&freq_hz, level_dbfs)| ToneLevel {
                freq_hz,
                level_dbfs,
                present: level_dbfs > noise_floor_dbfs + Self::PRESENCE_MARGIN_DB
                    && level_dbfs > Self::MIN_PRESENT_DBFS
                    && level_dbfs >= loudest - Self::MAX_BELOW_LOUDEST_DB,
            })
            .collect();
        Self {
            tones,
            noise_floor_dbfs,
        }
    }

    /// The entry for `freq_hz`, if it was a candidate.
    pub fn tone(&self, freq_hz: f64) -> Option<&ToneLevel> {
        self.tones
            .iter()
            .find(|t| (t.freq_hz - freq_hz).abs() < 1e-6)
    }

    /// The candidate frequencies found present, in candidate order.
    pub fn present(&self) -> Vec<f64> {
        self.tones
            .iter()
            .filter(|t| t.present)
            .map(|t| t.freq_hz)
            .collect()
    }

    /// The loudest level among the tones that are NOT present (or the noise floor if all are).
    pub fn loudest_absent_dbfs(&self) -> f64 {
        self.tones
            .iter()
            .filter(|t| !t.present)
            .map(|t| t.level_dbfs)
            .fold(self.noise_floor_dbfs, f64::max)
    }

    /// The quietest level among the tones that ARE present (+inf if none is).
    pub fn quietest_present_dbfs(&self) -> f64 {
        self.tones
            .iter()
            .filter(|t| t.present)
            .map(|t| t.level_dbfs)
            .fold(f64::INFINITY, f64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_generator_is_phase_continuous_and_at_level() {
        let mut g = ToneGenerator::new(1000.0, -6.0, 48_000);
        let mut pcm = Vec::new();
        for _ in 0..50 {
            pcm.extend(g.frame(960));
        }
        // No jumps larger than the sine's maximum slope (2π f A / fs) anywhere, frame edges
        // included.
        let max_slope = TAU * 1000.0 * dbfs_to_amplitude(-6.0) / 48_000.0 + 2.0;
        let worst = pcm
            .windows(2)
            .map(|w| (i32::from(w[1]) - i32::from(w[0])).abs())
            .max()
            .unwrap();
        assert!(f64::from(worst) <= max_slope, "jump {worst} > {max_slope}");
        assert!((tone_level_dbfs(&pcm, 1000.0, 48_000) + 6.0).abs() < 0.1);
        assert!((rms_dbfs(&pcm) + 6.0).abs() < 0.1);
    }

    #[test]
    fn report_finds_exactly_the_tones_present() {
        let mut a = ToneGenerator::new(300.0, -10.0, 48_000);
        let mut b = ToneGenerator::new(700.0, -30.0, 48_000);
        let pcm: Vec<i16> = a
            .frame(48_000)
            .iter()
            .zip(b.frame(48_000))
            .map(|(&x, y)| x.saturating_add(y))
            .collect();
        let report = ToneReport::analyze(&pcm, &[300.0, 500.0, 700.0, 1100.0], 48_000);
        assert_eq!(report.present(), vec![300.0, 700.0]);
        assert!((report.tone(300.0).unwrap().level_dbfs + 10.0).abs() < 0.2);
        assert!((report.tone(700.0).unwrap().level_dbfs + 30.0).abs() < 0.2);
        assert!(report.loudest_absent_dbfs() < -60.0, "{report:?}");
        assert!((report.quietest_present_dbfs() + 30.0).abs() < 0.2);
    }

    #[test]
    fn silence_and_empty_inputs_are_floored() {
        assert_eq!(rms_dbfs(&[]), FLOOR_DBFS);
        assert_eq!(rms_dbfs(&[0; 100]), FLOOR_DBFS);
        assert_eq!(goertzel_amplitude(&[], 440.0, 48_000), 0.0);
        let report = ToneReport::analyze(&[0; 4800], &[440.0], 48_000);
        assert!(report.present().is_empty());
        assert_eq!(goertzel_power(&[0; 10], &[1.0, 2.0], 48_000).len(), 2);
    }

    #[test]
    fn speech_like_has_syllables_and_pauses() {
        let mut g = SpeechLikeGenerator::new(140.0, -12.0, 48_000, 7);
        let pcm = g.frame(48_000 * 2);
        let levels: Vec<f64> = pcm.chunks(960).map(rms_dbfs).collect();
        let loud = levels.iter().filter(|&&l| l > -30.0).count();
        let quiet = levels.iter().filter(|&&l| l < -60.0).count();
        assert!(loud > 20 && quiet > 5, "loud {loud} quiet {quiet}");
        assert!(levels.iter().all(|&l| l <= 0.5));
        // Deterministic.
        let mut again = SpeechLikeGenerator::new(140.0, -12.0, 48_000, 7);
        assert_eq!(again.frame(48_000 * 2), pcm);
    }
}
