//! The pure media pieces of the phone leg (DESIGN.md §11, "call me"): the server dials an IP
//! phone over SIP and relays audio between it and the room.
//!
//! Everything here is sans-IO: bytes and text in, values or a [`PhoneMediaError`] out. Sockets,
//! the SIP stack, the call state machine and the room glue live elsewhere and call into this.
//!
//! - [`sdp`]: our offer (we always dial out, so we are always the offerer) and the phone's answer.
//! - [`rtp`]: plain RTP (RFC 3550) framing, and the sending side's sequence/timestamp state.
//! - [`g711`]: G.711 μ-law and A-law, written by hand.
//! - [`dtmf`]: RFC 4733 telephone events, and a detector that reports each key press once.
//! - [`srtp`]: SDES keys (RFC 4568) and SRTP protect/unprotect on `rtc`'s SRTP contexts.
//!
//! Invariants held across the module:
//! - no input (datagram, payload, SDP text, key attribute) can make it panic: every length and
//!   index is checked, and what does not fit becomes an error with a static [`category`];
//! - nothing keeps state that grows with what the phone sends;
//! - key material never appears in `Debug` output or error messages.
//!
//! [`category`]: PhoneMediaError::category

pub mod dtmf;
pub mod g711;
pub mod rtp;
pub mod sdp;
pub mod srtp;

pub use dtmf::{DtmfDetector, DtmfPress, TelephoneEvent};
pub use g711::G711;
pub use rtp::{RtpHeader, RtpPacket, RtpSender};
pub use sdp::{Direction, OfferParams, PhoneAnswer, TelephoneEventFormat};
pub use srtp::{SdesKey, SrtpSession};

/// The payload type we offer for RFC 4733 telephone events (dynamic; the phone may answer with
/// another number, see [`PhoneAnswer::telephone_event`]).
pub const TELEPHONE_EVENT_PAYLOAD_TYPE: u8 = 101;

/// The clock rate we offer for telephone events. RFC 4733 §2.1 ties it to the audio clock, but
/// 8000 Hz is what every phone understands, including alongside Opus.
pub const TELEPHONE_EVENT_CLOCK_RATE: u32 = 8000;

/// The packetisation interval of the phone leg, in milliseconds (`a=ptime:20` in our offer).
pub const PTIME_MS: u32 = 20;

/// A codec the phone leg speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PhoneCodec {
    /// G.711 μ-law (static payload type 0).
    Pcmu,
    /// G.711 A-law (static payload type 8).
    Pcma,
    /// Opus (RFC 7587; a dynamic payload type, we offer 111).
    Opus,
}

impl PhoneCodec {
    /// Every codec, in our order of preference (Opus avoids transcoding in the room).
    pub const ALL: [PhoneCodec; 3] = [PhoneCodec::Opus, PhoneCodec::Pcmu, PhoneCodec::Pcma];

    /// The encoding name as written in `a=rtpmap` (compared case-insensitively when parsing).
    pub fn name(self) -> &'static str {
        match self {
            PhoneCodec::Pcmu => "PCMU",
            PhoneCodec::Pcma => "PCMA",
            PhoneCodec::Opus => "opus",
        }
    }

    /// The payload type we offer: the static one for G.711, our dynamic choice for Opus.
    pub fn payload_type(self) -> u8 {
        match self {
            PhoneCodec::Pcmu => 0,
            PhoneCodec::Pcma => 8,
            PhoneCodec::Opus => 111,
        }
    }

    /// Whether [`PhoneCodec::payload_type`] is a static assignment (RFC 3551 §6), valid in an
    /// m-line even without an `a=rtpmap`.
    pub fn has_static_payload_type(self) -> bool {
        !matches!(self, PhoneCodec::Opus)
    }

    /// The RTP clock rate in Hz.
    pub fn clock_rate(self) -> u32 {
        match self {
            PhoneCodec::Pcmu | PhoneCodec::Pcma => 8000,
            PhoneCodec::Opus => 48_000,
        }
    }

    /// The channel count written in SDP. RFC 7587 §7 makes Opus always `opus/48000/2`, whatever
    /// the stream actually carries; G.711 is mono.
    pub fn sdp_channels(self) -> u8 {
        match self {
            PhoneCodec::Pcmu | PhoneCodec::Pcma => 1,
            PhoneCodec::Opus => 2,
        }
    }

    /// RTP timestamp units (samples per channel at [`PhoneCodec::clock_rate`]) in 20 ms: how far
    /// the timestamp advances per packet at our ptime.
    pub fn samples_per_20ms(self) -> u32 {
        self.clock_rate() / 1000 * PTIME_MS
    }

    /// The G.711 law of this codec, if it is G.711.
    pub fn g711(self) -> Option<G711> {
        match self {
            PhoneCodec::Pcmu => Some(G711::MuLaw),
            PhoneCodec::Pcma => Some(G711::ALaw),
            PhoneCodec::Opus => None,
        }
    }
}

/// Every failure of the phone leg's media parsers. One enum so callers can label metrics with
/// [`PhoneMediaError::category`]; the SIP layer maps `codec_mismatch` to the call's `endReason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PhoneMediaError {
    /// A datagram that is not a well-formed RTP packet.
    #[error("malformed RTP packet: {0}")]
    MalformedRtp(&'static str),
    /// An RTP payload that is not a well-formed RFC 4733 telephone event.
    #[error("malformed telephone-event payload: {0}")]
    MalformedDtmf(&'static str),
    /// SDP text that cannot be parsed.
    #[error("malformed SDP at line {line}: {reason}")]
    MalformedSdp {
        /// 1-based line number (0 when the problem is the text as a whole).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The answer has no `m=audio` line.
    #[error("the SDP answer has no audio stream")]
    NoAudio,
    /// The phone answered the audio stream with port 0 (RFC 3264 §6: stream rejected).
    #[error("the phone rejected the audio stream (port 0)")]
    AudioRejected,
    /// None of the answer's payload types is a codec we offered.
    #[error("no codec in common with the phone (answered payload types: {answered})")]
    CodecMismatch {
        /// The payload types of the answer's m-line, as written.
        answered: String,
    },
    /// The answer's transport profile is not the one we offered.
    #[error("the answer uses profile {answered}, we offered {offered}")]
    ProfileMismatch {
        /// What we offered (`RTP/AVP` or `RTP/SAVP`).
        offered: &'static str,
        /// What came back.
        answered: String,
    },
    /// We require SRTP, and the answer has no `a=crypto` we can use.
    #[error("SRTP required, but the answer has no usable a=crypto: {0}")]
    MissingCrypto(String),
    /// An SDES `a=crypto` attribute or key that cannot be used. Never holds key material.
    #[error("invalid SDES crypto attribute: {0}")]
    InvalidCrypto(String),
    /// SRTP protect or unprotect refused a packet (authentication, replay, length, context).
    #[error("SRTP {operation} failed: {reason}")]
    Srtp {
        /// `protect`, `unprotect`, `protect_rtcp`, `unprotect_rtcp` or `context`.
        operation: &'static str,
        /// The SRTP implementation's description.
        reason: String,
    },
}

impl PhoneMediaError {
    /// A short, bounded label for metrics and for the call's end reason.
    pub fn category(&self) -> &'static str {
        match self {
            PhoneMediaError::MalformedRtp(_) => "malformed_rtp",
            PhoneMediaError::MalformedDtmf(_) => "malformed_dtmf",
            PhoneMediaError::MalformedSdp { .. } => "malformed_sdp",
            PhoneMediaError::NoAudio => "no_audio",
            PhoneMediaError::AudioRejected => "media_rejected",
            PhoneMediaError::CodecMismatch { .. } => "codec_mismatch",
            PhoneMediaError::ProfileMismatch { .. } => "profile_mismatch",
            PhoneMediaError::MissingCrypto(_) => "missing_crypto",
            PhoneMediaError::InvalidCrypto(_) => "invalid_crypto",
            PhoneMediaError::Srtp { .. } => "srtp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_constants() {
        assert_eq!(PhoneCodec::Pcmu.samples_per_20ms(), 160);
        assert_eq!(PhoneCodec::Pcma.samples_per_20ms(), 160);
        assert_eq!(PhoneCodec::Opus.samples_per_20ms(), 960);
        assert_eq!(PhoneCodec::Opus.name(), "opus");
        assert_eq!(PhoneCodec::Pcma.payload_type(), 8);
        assert_eq!(PhoneCodec::Opus.sdp_channels(), 2);
        assert!(!PhoneCodec::Opus.has_static_payload_type());
        assert_eq!(PhoneCodec::Pcmu.g711(), Some(G711::MuLaw));
    }

    #[test]
    fn categories_are_distinct() {
        let errors = [
            PhoneMediaError::MalformedRtp("x"),
            PhoneMediaError::MalformedDtmf("x"),
            PhoneMediaError::MalformedSdp {
                line: 1,
                reason: "x".into(),
            },
            PhoneMediaError::NoAudio,
            PhoneMediaError::AudioRejected,
            PhoneMediaError::CodecMismatch {
                answered: "9".into(),
            },
            PhoneMediaError::ProfileMismatch {
                offered: "RTP/AVP",
                answered: "x".into(),
            },
            PhoneMediaError::MissingCrypto("x".into()),
            PhoneMediaError::InvalidCrypto("x".into()),
            PhoneMediaError::Srtp {
                operation: "protect",
                reason: "x".into(),
            },
        ];
        let categories: std::collections::HashSet<_> =
            errors.iter().map(PhoneMediaError::category).collect();
        assert_eq!(categories.len(), errors.len());
        assert_eq!(
            PhoneMediaError::CodecMismatch {
                answered: String::new()
            }
            .category(),
            "codec_mismatch"
        );
    }
}
