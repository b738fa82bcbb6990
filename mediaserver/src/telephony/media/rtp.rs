//! Plain RTP (RFC 3550) for the phone leg: parsing what a phone sends, writing what we send.
//!
//! Hand-written rather than `rtc`'s `rtp` crate: the phone leg needs a borrowed, allocation-free
//! view of one datagram with every length checked, and a twelve-byte writer; the WebRTC side's
//! packet types own their buffers and carry machinery (extensions, CSRC vectors) phones do not use.
//!
//! Rules:
//! - version must be 2; the fixed header, the CSRC list, the extension header and its body, and
//!   the padding must all fit in the datagram, or the packet is refused with a reason;
//! - header extensions are skipped (phones rarely send them, and nothing on this leg reads them);
//! - padding is removed from the payload (its count byte must be 1..=payload length);
//! - the writer emits the fixed header only: no CSRCs, no extension, no padding.

use super::PhoneMediaError;

/// The RTP version this leg speaks (RFC 3550 §5.1).
pub const RTP_VERSION: u8 = 2;
/// Size of the fixed RTP header.
pub const RTP_HEADER_LEN: usize = 12;

/// The fields of an RTP header the phone leg uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RtpHeader {
    /// The marker bit: the first packet of a talk spurt, or of a telephone event.
    pub marker: bool,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Sequence number (wraps).
    pub sequence: u16,
    /// Timestamp in the payload format's clock (wraps).
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Appends this header (12 bytes, no CSRCs, no extension, no padding) and `payload` to `out`.
    pub fn write_packet(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(RTP_HEADER_LEN + payload.len());
        out.push(RTP_VERSION << 6);
        out.push(u8::from(self.marker) << 7 | (self.payload_type & 0x7F));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(payload);
    }
}

/// One RTP packet, borrowed from the datagram it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The header fields.
    pub header: RtpHeader,
    /// How many CSRCs the header listed (skipped; phones do not mix).
    pub csrc_count: u8,
    /// Whether a header extension was present (skipped).
    pub has_extension: bool,
    /// The payload, padding removed.
    pub payload: &'a [u8],
}

impl<'a> RtpPacket<'a> {
    /// Parses one datagram. Never panics; any inconsistency is a
    /// [`PhoneMediaError::MalformedRtp`].
    pub fn parse(datagram: &'a [u8]) -> Result<Self, PhoneMediaError> {
        let fixed: &[u8; RTP_HEADER_LEN] = datagram.first_chunk().ok_or(
            PhoneMediaError::MalformedRtp("shorter than the 12-byte header"),
        )?;
        if fixed[0] >> 6 != RTP_VERSION {
            return Err(PhoneMediaError::MalformedRtp("version is not 2"));
        }
        let has_padding = fixed[0] & 0x20 != 0;
        let has_extension = fixed[0] & 0x10 != 0;
        let csrc_count = fixed[0] & 0x0F;
        let header = RtpHeader {
            marker: fixed[1] & 0x80 != 0,
            payload_type: fixed[1] & 0x7F,
            sequence: u16::from_be_bytes([fixed[2], fixed[3]]),
            timestamp: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
        };

        let mut at = RTP_HEADER_LEN + 4 * usize::from(csrc_count);
        if at > datagram.len() {
            return Err(PhoneMediaError::MalformedRtp(
                "CSRC list overruns the datagram",
            ));
        }
        if has_extension {
            // RFC 3550 §5.3.1: 16-bit profile, 16-bit length in 32-bit words, then the body.
            let words = datagram
                .get(at + 2..at + 4)
                .ok_or(PhoneMediaError::MalformedRtp(
                    "extension header overruns the datagram",
                ))?;
            let body_len = 4 * usize::from(u16::from_be_bytes([words[0], words[1]]));
            at += 4 + body_len;
            if at > datagram.len() {
                return Err(PhoneMediaError::MalformedRtp(
                    "extension body overruns the datagram",
                ));
            }
        }
        let mut payload = &datagram[at..];
        if has_padding {
            // The last byte counts the padding, itself included (RFC 3550 §5.1).
            let count = usize::from(*payload.last().ok_or(PhoneMediaError::MalformedRtp(
                "padding flag set on an empty payload",
            ))?);
            if count == 0 || count > payload.len() {
                return Err(PhoneMediaError::MalformedRtp(
                    "padding count is zero or longer than the payload",
                ));
            }
            payload = &payload[..payload.len() - count];
        }
        Ok(Self {
            header,
            csrc_count,
            has_extension,
            payload,
        })
    }
}

/// The sending side of one RTP stream: our SSRC, the next sequence number and the current
/// timestamp.
///
/// The timestamp is separate from the sequence on purpose: audio advances it by the samples of
/// each packet, while the packets of one telephone event all carry the event's start timestamp
/// (RFC 4733 §2.3.1) and a silence gap advances it without sending anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtpSender {
    ssrc: u32,
    sequence: u16,
    timestamp: u32,
}

impl RtpSender {
    /// A stream with the given SSRC and starting values. RFC 3550 §5.1 wants all three random;
    /// the caller draws them, so this stays deterministic under test.
    pub fn new(ssrc: u32, first_sequence: u16, first_timestamp: u32) -> Self {
        Self {
            ssrc,
            sequence: first_sequence,
            timestamp: first_timestamp,
        }
    }

    /// Our SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The sequence number the next packet gets.
    pub fn next_sequence(&self) -> u16 {
        self.sequence
    }

    /// The timestamp the next packet gets.
    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    /// The header of the next packet, at the current timestamp; the sequence number advances.
    pub fn next_header(&mut self, payload_type: u8, marker: bool) -> RtpHeader {
        let header = RtpHeader {
            marker,
            payload_type,
            sequence: self.sequence,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
        };
        self.sequence = self.sequence.wrapping_add(1);
        header
    }

    /// Moves the timestamp on by `units` of the payload's clock (samples per channel).
    pub fn advance(&mut self, units: u32) {
        self.timestamp = self.timestamp.wrapping_add(units);
    }

    /// Appends one audio packet to `out` and advances the timestamp by `units` (the samples the
    /// payload holds, e.g. [`super::PhoneCodec::samples_per_20ms`]).
    pub fn write_audio(
        &mut self,
        payload_type: u8,
        marker: bool,
        payload: &[u8],
        units: u32,
        out: &mut Vec<u8>,
    ) {
        self.next_header(payload_type, marker)
            .write_packet(payload, out);
        self.advance(units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RtpHeader {
        RtpHeader {
            marker: true,
            payload_type: 0,
            sequence: 0xBEEF,
            timestamp: 0x0102_0304,
            ssrc: 0xCAFE_BABE,
        }
    }

    #[test]
    fn write_then_parse() {
        let mut out = vec![0xAA];
        header().write_packet(&[1, 2, 3], &mut out);
        assert_eq!(
            &out[1..13],
            &[0x80, 0x80, 0xBE, 0xEF, 1, 2, 3, 4, 0xCA, 0xFE, 0xBA, 0xBE]
        );
        let packet = RtpPacket::parse(&out[1..]).expect("our own packet parses");
        assert_eq!(packet.header, header());
        assert_eq!(packet.payload, &[1, 2, 3]);
        assert_eq!(packet.csrc_count, 0);
        assert!(!packet.has_extension);
    }

    #[test]
    fn csrcs_extension_and_padding_are_skipped() {
        let mut bytes = vec![0x80 | 0x20 | 0x10 | 2, 8, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7];
        bytes.extend_from_slice(&[0; 8]); // two CSRCs
        bytes.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0x10, 0xFF, 0, 0]); // one-word extension
        bytes.extend_from_slice(&[9, 9, 9]); // payload
        bytes.extend_from_slice(&[0, 0, 3]); // three bytes of padding
        let packet = RtpPacket::parse(&bytes).expect("valid packet");
        assert_eq!(packet.header.payload_type, 8);
        assert!(!packet.header.marker);
        assert_eq!(packet.header.timestamp, 160);
        assert_eq!(packet.csrc_count, 2);
        assert!(packet.has_extension);
        assert_eq!(packet.payload, &[9, 9, 9]);
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "shorter"),
            (&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "shorter"),
            (&[0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "version"),
            (&[0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3], "CSRC"),
            (
                &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE],
                "extension header",
            ),
            (
                &[
                    0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE, 0, 2, 0, 0, 0, 0,
                ],
                "extension body",
            ),
            (&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "empty payload"),
            (&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zero"),
            (&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3], "longer"),
        ];
        for (bytes, needle) in cases {
            let error = RtpPacket::parse(bytes).expect_err("malformed packet");
            assert_eq!(error.category(), "malformed_rtp");
            assert!(error.to_string().contains(needle), "{error} for {bytes:?}");
        }
        // Padding that eats the whole payload is fine.
        let only_padding = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(
            RtpPacket::parse(&only_padding).expect("valid").payload,
            &[] as &[u8]
        );
    }

    #[test]
    fn sender_advances_sequence_and_timestamp() {
        let mut sender = RtpSender::new(7, u16::MAX, u32::MAX - 100);
        let mut out = Vec::new();
        sender.write_audio(0, true, &[0xFF; 160], 160, &mut out);
        sender.write_audio(0, false, &[0xFF; 160], 160, &mut out);
        assert_eq!(out.len(), 2 * (RTP_HEADER_LEN + 160));
        let first = RtpPacket::parse(&out[..172]).expect("valid");
        let second = RtpPacket::parse(&out[172..]).expect("valid");
        assert_eq!(first.header.sequence, u16::MAX);
        assert_eq!(second.header.sequence, 0);
        assert_eq!(first.header.timestamp, u32::MAX - 100);
        assert_eq!(second.header.timestamp, 59);
        assert!(first.header.marker && !second.header.marker);
        assert_eq!(second.header.ssrc, 7);
        // An event's packets share a timestamp: headers without advancing.
        let a = sender.next_header(101, true);
        let b = sender.next_header(101, false);
        assert_eq!(a.timestamp, b.timestamp);
        assert_eq!(b.sequence, a.sequence.wrapping_add(1));
        assert_eq!(sender.next_sequence(), 3);
        assert_eq!(sender.timestamp(), 219);
        assert_eq!(sender.ssrc(), 7);
    }
}
