//! Thin wrapper over libopus (the `opus` crate) for the one format Chorus speaks internally:
//! 48 kHz, mono, 10 ms or 20 ms frames.
//!
//! Invariants:
//! - no byte sequence handed to [`Decoder::decode`], [`Decoder::decode_fec`] or
//!   [`validate_packet`] can panic; anything libopus or the framing check rejects becomes
//!   [`MediaError::MalformedOpus`] (or [`MediaError::FrameDuration`] for a valid packet of the
//!   wrong length);
//! - every frame a [`Decoder`] returns has exactly [`Decoder::frame_samples`] samples, so the mixer
//!   can sum frames without length checks;
//! - the encoder is tuned for conferencing: VOIP application, in-band FEC on, DTX off (a mixer
//!   output never goes silent on the wire; listeners keep a steady packet clock).

use bytes::Bytes;
use opus::{Application, Bitrate, Channels, ErrorCode};

use super::{MediaError, SAMPLE_RATE};

/// Encoder bitrate: enough for wideband speech with FEC headroom.
pub const DEFAULT_BITRATE_BPS: i32 = 32_000;

/// Loss hint the encoder starts with; it makes libopus spend bits on FEC from the first packet.
pub const DEFAULT_LOSS_PERCENT: u8 = 5;

/// The largest packet libopus can produce for one frame (RFC 6716 §3.4).
const MAX_FRAME_BYTES: usize = 1275;

/// The largest payload worth parsing: 48 frames of the maximum size (RFC 6716 code 3 packets).
/// Anything longer is rejected before it reaches libopus, whose Rust binding would otherwise
/// panic on lengths beyond `i32::MAX`.
pub const MAX_PACKET_BYTES: usize = 48 * MAX_FRAME_BYTES + 2;

/// Samples per channel in one frame of `frame_ms` at 48 kHz, if `frame_ms` is a frame size the
/// core supports (10 or 20).
pub fn frame_samples_for(frame_ms: u32) -> Result<usize, MediaError> {
    match frame_ms {
        10 | 20 => Ok((SAMPLE_RATE / 1000 * frame_ms) as usize),
        other => Err(MediaError::InvalidConfig(format!(
            "frame_ms must be 10 or 20, got {other}"
        ))),
    }
}

/// Checks an Opus payload's framing like [`validate_packet`] and returns how many samples (per
/// channel, at 48 kHz) it holds, whatever that is.
pub fn packet_samples(payload: &[u8]) -> Result<usize, MediaError> {
    if payload.is_empty() {
        return Err(MediaError::MalformedOpus("empty payload".into()));
    }
    if payload.len() > MAX_PACKET_BYTES {
        return Err(MediaError::MalformedOpus(format!(
            "{} bytes is longer than any Opus packet",
            payload.len()
        )));
    }
    opus::packet::parse(payload).map_err(malformed)?;
    opus::packet::get_nb_samples(payload, SAMPLE_RATE).map_err(malformed)
}

/// Checks an Opus payload's framing (TOC byte, frame count, frame lengths) without decoding it,
/// and that it holds exactly `frame_samples` samples. This is what lets the mixer refuse garbage
/// at `push` time instead of discovering it at the tick.
pub fn validate_packet(payload: &[u8], frame_samples: usize) -> Result<(), MediaError> {
    let got = packet_samples(payload)?;
    if got != frame_samples {
        return Err(MediaError::FrameDuration {
            expected: frame_samples,
            got,
        });
    }
    Ok(())
}

/// Errors caused by the input bytes.
fn malformed(e: opus::Error) -> MediaError {
    MediaError::MalformedOpus(format!("{}: {}", e.function(), e.description()))
}

/// Errors from decode calls: the packet's fault unless libopus says its own state is broken.
fn decode_error(e: opus::Error) -> MediaError {
    match e.code() {
        ErrorCode::BadArg
        | ErrorCode::InvalidPacket
        | ErrorCode::BufferTooSmall
        | ErrorCode::Unknown => malformed(e),
        _ => codec_error(e),
    }
}

fn codec_error(e: opus::Error) -> MediaError {
    MediaError::Codec {
        function: e.function(),
        description: e.description(),
    }
}

/// A mono 48 kHz Opus encoder for one output stream (the shared mix or one speaker's mix).
/// Each output keeps its own encoder because Opus is stateful across frames.
#[derive(Debug)]
pub struct Encoder {
    inner: opus::Encoder,
    frame_samples: usize,
    scratch: Vec<u8>,
}

impl Encoder {
    /// An encoder for `frame_ms` (10 or 20) frames, VOIP, ~32 kbit/s, FEC on, DTX off.
    pub fn new(frame_ms: u32) -> Result<Self, MediaError> {
        Self::with_mode(frame_ms, false)
    }

    /// Like [`Encoder::new`]; with `low_delay`, Opus's restricted low-delay application: CELT
    /// only, 2.5 ms of look-ahead instead of the VOIP mode's 6.5 ms. The price is SILK's in-band
    /// FEC (a lost frame is concealed, not recovered from the next packet) and SILK's efficiency
    /// on speech at low rates; at the 32 kbit/s used here CELT carries wideband speech well.
    pub fn with_mode(frame_ms: u32, low_delay: bool) -> Result<Self, MediaError> {
        let frame_samples = frame_samples_for(frame_ms)?;
        let application = if low_delay {
            Application::LowDelay
        } else {
            Application::Voip
        };
        let mut inner =
            opus::Encoder::new(SAMPLE_RATE, Channels::Mono, application).map_err(codec_error)?;
        inner
            .set_bitrate(Bitrate::Bits(DEFAULT_BITRATE_BPS))
            .map_err(codec_error)?;
        // CELT has no in-band FEC; asking for it in low-delay mode would only mislead.
        inner.set_inband_fec(!low_delay).map_err(codec_error)?;
        inner
            .set_packet_loss_perc(i32::from(DEFAULT_LOSS_PERCENT))
            .map_err(codec_error)?;
        inner.set_dtx(false).map_err(codec_error)?;
        Ok(Self {
            inner,
            frame_samples,
            scratch: vec![0; MAX_FRAME_BYTES],
        })
    }

    /// The encoder's look-ahead in samples at 48 kHz: what it delays the audio by.
    pub fn lookahead_samples(&mut self) -> Result<u32, MediaError> {
        let n = self.inner.get_lookahead().map_err(codec_error)?;
        Ok(u32::try_from(n).unwrap_or(0))
    }

    /// Samples per frame this encoder expects.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Tells the encoder how much loss the receivers see, so it sizes its FEC (0..=100 %; larger
    /// values are clamped).
    pub fn set_packet_loss_percent(&mut self, percent: u8) -> Result<(), MediaError> {
        self.inner
            .set_packet_loss_perc(i32::from(percent.min(100)))
            .map_err(codec_error)
    }

    /// Encodes exactly one frame.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Bytes, MediaError> {
        if pcm.len() != self.frame_samples {
            return Err(MediaError::PcmLength {
                expected: self.frame_samples,
                got: pcm.len(),
            });
        }
        let n = self
            .inner
            .encode(pcm, &mut self.scratch)
            .map_err(codec_error)?;
        let packet = self.scratch.get(..n).ok_or(MediaError::Codec {
            function: "opus_encode",
            description: "returned a length beyond its buffer",
        })?;
        Ok(Bytes::copy_from_slice(packet))
    }
}

/// A mono 48 kHz Opus decoder for one inbound stream.
#[derive(Debug)]
pub struct Decoder {
    inner: opus::Decoder,
    frame_samples: usize,
}

impl Decoder {
    /// A decoder producing `frame_ms` (10 or 20) frames.
    pub fn new(frame_ms: u32) -> Result<Self, MediaError> {
        let frame_samples = frame_samples_for(frame_ms)?;
        let inner = opus::Decoder::new(SAMPLE_RATE, Channels::Mono).map_err(codec_error)?;
        Ok(Self {
            inner,
            frame_samples,
        })
    }

    /// Samples per frame this decoder produces.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Decodes one packet into one frame.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<i16>, MediaError> {
        validate_packet(payload, self.frame_samples)?;
        self.run(payload, false)
    }

    /// Packet-loss concealment: a frame that continues the signal when a packet is missing and no
    /// FEC is available.
    pub fn conceal(&mut self) -> Result<Vec<i16>, MediaError> {
        self.run(&[], false)
    }

    /// Recovers a lost frame from the in-band FEC of the packet that FOLLOWS it. Call this for the
    /// lost frame, then [`Decoder::decode`] the same `next_payload` normally on the next tick.
    /// If `next_payload` carries no FEC, libopus falls back to concealment.
    pub fn decode_fec(&mut self, next_payload: &[u8]) -> Result<Vec<i16>, MediaError> {
        validate_packet(next_payload, self.frame_samples)?;
        self.run(next_payload, true)
    }

    /// Forgets the signal history, for a stream whose decoder sat idle while packets went by
    /// undecoded: decoding from a clean state beats decoding from a stale one.
    pub fn reset(&mut self) -> Result<(), MediaError> {
        self.inner.reset_state().map_err(codec_error)
    }

    fn run(&mut self, input: &[u8], fec: bool) -> Result<Vec<i16>, MediaError> {
        let mut out = vec![0i16; self.frame_samples];
        let n = self
            .inner
            .decode(input, &mut out, fec)
            .map_err(decode_error)?;
        if n != self.frame_samples {
            return Err(MediaError::FrameDuration {
                expected: self.frame_samples,
                got: n,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::spectrum::{ToneGenerator, ToneReport};
    use proptest::prelude::*;

    fn encode_tone(frame_ms: u32, freq: f64, dbfs: f64, frames: usize) -> Vec<Bytes> {
        let mut enc = Encoder::new(frame_ms).unwrap();
        let mut tone = ToneGenerator::new(freq, dbfs, SAMPLE_RATE);
        (0..frames)
            .map(|_| enc.encode(&tone.frame(enc.frame_samples())).unwrap())
            .collect()
    }

    /// Where a 1 kHz tone that starts after 100 ms of silence first shows in the decoded audio,
    /// in samples, through an encoder in `low_delay` mode or not.
    fn onset_through(low_delay: bool) -> usize {
        let mut enc = Encoder::with_mode(20, low_delay).unwrap();
        let mut dec = Decoder::new(20).unwrap();
        let mut tone = ToneGenerator::new(1000.0, -12.0, SAMPLE_RATE);
        let mut out = Vec::new();
        for i in 0..25 {
            let pcm = if i < 5 { vec![0; 960] } else { tone.frame(960) };
            out.extend(dec.decode(&enc.encode(&pcm).unwrap()).unwrap());
        }
        // A -12 dBFS sine peaks near 8,200: a tenth of that is the tone, not codec noise.
        out.iter().position(|s| s.unsigned_abs() > 800).unwrap()
    }

    #[test]
    fn low_delay_mode_cuts_the_look_ahead_and_still_carries_a_tone() {
        let voip = Encoder::with_mode(20, false)
            .unwrap()
            .lookahead_samples()
            .unwrap();
        let low = Encoder::with_mode(20, true)
            .unwrap()
            .lookahead_samples()
            .unwrap();
        // 6.5 ms and 2.5 ms at 48 kHz.
        assert_eq!((voip, low), (312, 120));
        // And in the audio itself: the onset comes about 4 ms (192 samples) sooner.
        let (voip_onset, low_onset) = (onset_through(false), onset_through(true));
        let earlier = voip_onset as f64 - low_onset as f64;
        assert!(
            (140.0..=240.0).contains(&earlier),
            "onset at {voip_onset} (VOIP) and {low_onset} (low delay) samples"
        );
        let mut enc = Encoder::with_mode(20, true).unwrap();
        let mut dec = Decoder::new(20).unwrap();
        let mut tone = ToneGenerator::new(440.0, -12.0, SAMPLE_RATE);
        let mut pcm = Vec::new();
        for _ in 0..100 {
            pcm.extend(dec.decode(&enc.encode(&tone.frame(960)).unwrap()).unwrap());
        }
        let report = ToneReport::analyze(&pcm[48_000..], &[440.0, 1000.0], SAMPLE_RATE);
        let tone = report.tone(440.0).unwrap();
        assert!(
            tone.present && (tone.level_dbfs + 12.0).abs() < 2.0,
            "{report:?}"
        );
        assert!(!report.tone(1000.0).unwrap().present, "{report:?}");
    }

    #[test]
    fn tone_survives_round_trip_at_both_frame_sizes() {
        for frame_ms in [10, 20] {
            let frames = (1000 / frame_ms) as usize;
            let packets = encode_tone(frame_ms, 440.0, -12.0, frames * 2);
            let mut dec = Decoder::new(frame_ms).unwrap();
            let mut pcm = Vec::new();
            for p in &packets {
                let f = dec.decode(p).unwrap();
                assert_eq!(f.len(), dec.frame_samples());
                pcm.extend(f);
            }
            // Skip the first second (encoder ramp-up), analyse the second.
            let report = ToneReport::analyze(&pcm[48_000..], &[440.0, 1000.0], SAMPLE_RATE);
            let tone = report.tone(440.0).unwrap();
            assert!(tone.present, "440 Hz lost: {report:?}");
            assert!((tone.level_dbfs + 12.0).abs() < 2.0, "{report:?}");
            assert!(!report.tone(1000.0).unwrap().present, "{report:?}");
        }
    }

    #[test]
    fn fec_recovers_a_lost_frame_better_than_silence() {
        let packets = encode_tone(20, 440.0, -12.0, 60);
        let mut dec = Decoder::new(20).unwrap();
        for p in &packets[..40] {
            dec.decode(p).unwrap();
        }
        // Packet 40 is lost; 41 carries its FEC.
        let recovered = dec.decode_fec(&packets[41]).unwrap();
        assert_eq!(recovered.len(), 960);
        let after = dec.decode(&packets[41]).unwrap();
        assert_eq!(after.len(), 960);
        let rms = crate::media::spectrum::rms_dbfs(&recovered);
        assert!(rms > -30.0, "FEC frame is near silent: {rms} dBFS");
    }

    #[test]
    fn conceal_produces_a_full_frame() {
        let packets = encode_tone(10, 440.0, -12.0, 20);
        let mut dec = Decoder::new(10).unwrap();
        for p in &packets {
            dec.decode(p).unwrap();
        }
        let f = dec.conceal().unwrap();
        assert_eq!(f.len(), 480);
        assert!(crate::media::spectrum::rms_dbfs(&f) > -40.0);
    }

    #[test]
    fn known_bad_payloads_are_rejected() {
        let mut dec = Decoder::new(20).unwrap();
        // Empty.
        assert!(matches!(dec.decode(&[]), Err(MediaError::MalformedOpus(_))));
        // Code 3 (arbitrary frame count) with a zero frame count.
        assert!(matches!(
            dec.decode(&[0x03, 0x00]),
            Err(MediaError::MalformedOpus(_))
        ));
        // Code 2 (two frames, explicit size) whose first size runs past the end.
        assert!(matches!(
            dec.decode(&[0x02, 200, 1, 2]),
            Err(MediaError::MalformedOpus(_))
        ));
        // A valid 10 ms packet in a 20 ms room.
        let ten = encode_tone(10, 440.0, -12.0, 1);
        assert_eq!(
            dec.decode(&ten[0]),
            Err(MediaError::FrameDuration {
                expected: 960,
                got: 480
            })
        );
        // A 60 ms packet (code 3, 3 × 20 ms CELT frames, CBR) in a 20 ms room.
        assert!(dec.decode(&[0xFB, 0x03, 0, 0, 0]).is_err());
        // Longer than any Opus packet.
        assert!(matches!(
            dec.decode(&vec![0u8; MAX_PACKET_BYTES + 1]),
            Err(MediaError::MalformedOpus(_))
        ));
        // The decoder still works afterwards.
        let good = encode_tone(20, 440.0, -12.0, 1);
        assert_eq!(dec.decode(&good[0]).unwrap().len(), 960);
    }

    #[test]
    fn encoder_rejects_wrong_pcm_length_and_bad_frame_size() {
        let mut enc = Encoder::new(20).unwrap();
        assert_eq!(
            enc.encode(&[0; 480]),
            Err(MediaError::PcmLength {
                expected: 960,
                got: 480
            })
        );
        assert!(matches!(
            Encoder::new(30),
            Err(MediaError::InvalidConfig(_))
        ));
        assert!(matches!(Decoder::new(0), Err(MediaError::InvalidConfig(_))));
        enc.set_packet_loss_percent(250).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // Random bytes are sometimes valid Opus (any TOC with code 0 is), so the property is:
        // never panic, and an Ok frame always has the room's length.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut dec = Decoder::new(20).unwrap();
            match dec.decode(&bytes) {
                Ok(frame) => prop_assert_eq!(frame.len(), 960),
                Err(e) => {
                    let expected = matches!(
                        e,
                        MediaError::MalformedOpus(_) | MediaError::FrameDuration { .. }
                    );
                    prop_assert!(expected, "unexpected error {:?}", e);
                }
            }
            if let Ok(frame) = dec.decode_fec(&bytes) {
                prop_assert_eq!(frame.len(), 960);
            }
            prop_assert_eq!(dec.conceal().unwrap().len(), 960);
        }
    }
}
