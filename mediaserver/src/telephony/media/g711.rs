//! G.711 (ITU-T G.711) μ-law and A-law, between 16-bit linear PCM and 8-bit code words.
//!
//! Written by hand: there is no maintained crate for it, and the whole codec is a page of bit
//! arithmetic (the segment/mantissa layout of G.711 Tables 1a/2a, as in the classic public-domain
//! Sun reference). Both laws take the full `i16` range: μ-law clips at ±32635 before biasing,
//! A-law works on the top 13 bits.
//!
//! Invariants:
//! - every function is total: any `i16` encodes, any `u8` decodes, nothing panics;
//! - decoding reconstructs at the middle of the quantisation step, so the error of a round trip is
//!   at most half a step (about 1/32 of the magnitude, 3% or -30 dB), except for the clipped tails;
//! - `encode(decode(c)) == c` for every code word, except μ-law's negative zero (0x7F), which
//!   decodes to 0 and so encodes as positive zero (0xFF).

/// μ-law's bias: added to the magnitude so that every value has a leading one in bits 7..=14.
const ULAW_BIAS: i32 = 0x84;
/// The largest magnitude μ-law encodes without clipping (32767 minus the bias, rounded down).
const ULAW_CLIP: i32 = 32_635;
/// Code words are sent inverted (μ-law) or with even bits inverted (A-law), so that silence
/// has many ones on the line (an old T1/E1 clock recovery concern, kept by the standard).
const ALAW_XOR: u8 = 0x55;

/// Which G.711 law.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum G711 {
    /// μ-law (PCMU), North America and Japan.
    MuLaw,
    /// A-law (PCMA), the rest of the world.
    ALaw,
}

impl G711 {
    /// The code word of digital silence: what to send when the room has nothing for the phone.
    pub fn silence(self) -> u8 {
        match self {
            G711::MuLaw => linear_to_ulaw(0),
            G711::ALaw => linear_to_alaw(0),
        }
    }

    /// Encodes one sample.
    pub fn encode_sample(self, sample: i16) -> u8 {
        match self {
            G711::MuLaw => linear_to_ulaw(sample),
            G711::ALaw => linear_to_alaw(sample),
        }
    }

    /// Decodes one code word.
    pub fn decode_sample(self, code: u8) -> i16 {
        match self {
            G711::MuLaw => ulaw_to_linear(code),
            G711::ALaw => alaw_to_linear(code),
        }
    }

    /// Appends the code words of `pcm` to `out` (one byte per sample).
    pub fn encode(self, pcm: &[i16], out: &mut Vec<u8>) {
        out.extend(pcm.iter().map(|&sample| self.encode_sample(sample)));
    }

    /// Appends the samples of `codes` to `out` (one sample per byte).
    pub fn decode(self, codes: &[u8], out: &mut Vec<i16>) {
        out.extend(codes.iter().map(|&code| self.decode_sample(code)));
    }
}

/// Encodes one 16-bit linear sample as μ-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let value = i32::from(sample);
    let sign: u8 = if value < 0 { 0x80 } else { 0 };
    // i32 so that -32768 has a magnitude; clipping keeps the biased value below 2^15.
    let magnitude = value.abs().min(ULAW_CLIP) + ULAW_BIAS;
    // The segment is the position of the leading one above bit 7 (the bias guarantees bit 7 or
    // higher is set, and the clip that nothing above bit 14 is).
    let leading_bit = 31 - magnitude.leading_zeros() as i32;
    let exponent = (leading_bit - 7).clamp(0, 7);
    let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
    // Both fit in a nibble/three bits by construction; the casts cannot truncate.
    !(sign | ((exponent as u8) << 4) | mantissa as u8)
}

/// Decodes one μ-law code word to 16-bit linear.
pub fn ulaw_to_linear(code: u8) -> i16 {
    let code = !code;
    let exponent = u32::from((code >> 4) & 0x07);
    let mantissa = i32::from(code & 0x0F);
    // The middle of the step: (mantissa + 0.5) steps above the segment start, bias removed.
    let magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS;
    let value = if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    };
    // |value| <= 32124, always an i16.
    value as i16
}

/// Encodes one 16-bit linear sample as A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    // A-law quantises 13 bits; the arithmetic shift keeps the sign.
    let mut value = i32::from(sample) >> 3;
    let mask = if value >= 0 {
        0x80 ^ ALAW_XOR
    } else {
        // One's complement, so -1 and 0 land in the two smallest steps of each sign.
        value = -value - 1;
        ALAW_XOR
    };
    // Segment 0 covers 0..32, segment s >= 1 covers 2^(s+4)..2^(s+5); value < 2^12 here.
    let segment = if value < 32 {
        0
    } else {
        (31 - value.leading_zeros() as i32) - 4
    };
    let shift = if segment < 2 { 1 } else { segment };
    let mantissa = (value >> shift) & 0x0F;
    // segment <= 7 since value < 4096; both casts fit.
    ((segment as u8) << 4 | mantissa as u8) ^ mask
}

/// Decodes one A-law code word to 16-bit linear.
pub fn alaw_to_linear(code: u8) -> i16 {
    let code = code ^ ALAW_XOR;
    let mantissa = i32::from(code & 0x0F) << 4;
    let segment = u32::from((code >> 4) & 0x07);
    // The middle of the step, in 16-bit units: half a step is 8 in segments 0 and 1.
    let magnitude = match segment {
        0 => mantissa + 8,
        1 => mantissa + 0x108,
        _ => (mantissa + 0x108) << (segment - 1),
    };
    let value = if code & 0x80 != 0 {
        magnitude
    } else {
        -magnitude
    };
    // |value| <= 32256, always an i16.
    value as i16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::spectrum;

    /// Half a quantisation step, plus slack for the input truncation, for a magnitude.
    fn ulaw_bound(sample: i16) -> i32 {
        (i32::from(sample).abs() + ULAW_BIAS) / 32 + 1
    }

    fn alaw_bound(sample: i16) -> i32 {
        i32::from(sample).abs() / 32 + 16
    }

    #[test]
    fn known_code_points() {
        assert_eq!(linear_to_ulaw(0), 0xFF);
        assert_eq!(linear_to_ulaw(-1), 0x7F);
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x80), 32_124);
        assert_eq!(ulaw_to_linear(0x00), -32_124);
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(linear_to_alaw(-1), 0x55);
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32_256);
        assert_eq!(alaw_to_linear(0x2A), -32_256);
        assert_eq!(linear_to_alaw(i16::MAX), 0xAA);
        assert_eq!(linear_to_alaw(i16::MIN), 0x2A);
        assert_eq!(G711::MuLaw.silence(), 0xFF);
        assert_eq!(G711::ALaw.silence(), 0xD5);
    }

    #[test]
    fn round_trip_error_is_half_a_step_across_the_range() {
        for sample in i16::MIN..=i16::MAX {
            let mu = i32::from(ulaw_to_linear(linear_to_ulaw(sample)));
            assert!(
                (mu - i32::from(sample)).abs() <= ulaw_bound(sample),
                "μ-law {sample} -> {mu}"
            );
            let a = i32::from(alaw_to_linear(linear_to_alaw(sample)));
            assert!(
                (a - i32::from(sample)).abs() <= alaw_bound(sample),
                "A-law {sample} -> {a}"
            );
            // Sign is kept (zero may go either way by one step).
            if sample.unsigned_abs() > 16 {
                assert_eq!(mu.signum(), i32::from(sample).signum());
                assert_eq!(a.signum(), i32::from(sample).signum());
            }
        }
    }

    #[test]
    fn encoding_is_monotonic() {
        let mut last = (i32::MIN, i32::MIN);
        for sample in i16::MIN..=i16::MAX {
            let mu = i32::from(ulaw_to_linear(linear_to_ulaw(sample)));
            let a = i32::from(alaw_to_linear(linear_to_alaw(sample)));
            assert!(mu >= last.0 && a >= last.1, "not monotonic at {sample}");
            last = (mu, a);
        }
    }

    #[test]
    fn every_code_word_survives_decode_then_encode() {
        for code in 0..=u8::MAX {
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(
                linear_to_ulaw(ulaw_to_linear(code)),
                expected,
                "μ {code:#x}"
            );
            assert_eq!(linear_to_alaw(alaw_to_linear(code)), code, "A {code:#x}");
        }
    }

    #[test]
    fn a_sine_at_minus_10_dbfs_keeps_30_db_of_snr() {
        let pcm = spectrum::ToneGenerator::new(1000.0, -10.0, 8000).frame(8000);
        for law in [G711::MuLaw, G711::ALaw] {
            let mut coded = Vec::new();
            law.encode(&pcm, &mut coded);
            assert_eq!(coded.len(), pcm.len());
            let mut decoded = Vec::new();
            law.decode(&coded, &mut decoded);
            let (signal, noise) =
                pcm.iter()
                    .zip(&decoded)
                    .fold((0.0f64, 0.0f64), |(signal, noise), (&x, &y)| {
                        let x = f64::from(x);
                        (signal + x * x, noise + (x - f64::from(y)).powi(2))
                    });
            let snr = 10.0 * (signal / noise).log10();
            assert!(snr > 30.0, "{law:?}: SNR {snr:.1} dB");
            // And the tone is still where it was.
            let level = spectrum::tone_level_dbfs(&decoded, 1000.0, 8000);
            assert!(
                (level + 10.0).abs() < 1.0,
                "{law:?}: 1 kHz at {level:.1} dBFS"
            );
        }
    }
}
