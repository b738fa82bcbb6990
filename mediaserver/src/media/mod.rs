//! The pure media core of a Chorus media server.
//!
//! Everything here is sans-IO: packets, levels and time (`Duration` since an arbitrary epoch) are
//! parameters, nothing reads a socket or a clock. That is what lets every part be tested in
//! virtual time with synthetic audio and real libopus.
//!
//! One audio frame's way through this module (DESIGN.md §4):
//! 1. [`mixer::RoomMixer::push`] checks the Opus framing and files the packet in the stream's
//!    [`jitter::JitterBuffer`]; an RFC 6464 level, if present, feeds [`level::LevelTracker`].
//! 2. Every frame tick, [`mixer::RoomMixer::tick`] pulls one frame per stream, ranks streams with
//!    [`ranking::Ranker`] (or takes the mesh primary's global list), decodes only what it must,
//!    sums in `i32`, limits, and encodes once for all listeners plus once per local speaker.
//! 3. [`tick_clock::TickClock`] says when the next tick is due: just after the mixed talkers'
//!    frames arrive, moving at most 1 ms per frame and never a frame off the fixed grid.
//! 4. [`spectrum`] holds the test-signal tools (tones, Goertzel) the bot and the tests share.
//!
//! Invariants held across the module:
//! - no input (bytes, sequence numbers, timestamps, times) can make it panic;
//! - memory per stream is bounded whatever arrives;
//! - codec work per tick depends on the number of selected speakers, never on listeners.

pub mod codec;
pub mod jitter;
pub mod level;
pub mod mixer;
pub mod ranking;
pub mod spectrum;
pub mod tick_clock;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use codec::{Decoder, Encoder};
pub use jitter::{JitterBuffer, JitterConfig, JitterStats, Playout};
pub use level::LevelTracker;
pub use mixer::{JitterAdjustments, MixOutput, MixerConfig, RoomMixer, SoftLimiter, TickStats};
pub use ranking::{Ranker, RankingConfig};

/// The only sample rate the media core runs at (Opus' native rate; RTP timestamps tick at it).
pub const SAMPLE_RATE: u32 = 48_000;

/// Identifies one inbound audio stream within a room (a participant's microphone, local or
/// forwarded from another server). Ordered, so ties anywhere in the core break the same way on
/// every server.
///
/// The same id names the stream everywhere: in the mixer, in the room, and on the mesh (where the
/// origin server's id is its `StreamKey::stream`). It serialises as the bare number, so the mesh's
/// JSON carries `"s":7`, and media datagrams carry the `u64` in network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StreamId(pub u64);

impl From<u64> for StreamId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

/// Where a stream enters this server. Both kinds are mixed the same way; only local streams get a
/// "mix minus self" output, because a remote stream's own listeners live on another server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamOrigin {
    /// A participant connected to this server.
    Local,
    /// A stream forwarded by another server of the mesh.
    Remote,
}

/// An RFC 6464 client-to-mixer audio level, as carried in the RTP header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AudioLevel {
    /// Level in -dBov: 0 is the loudest (overload point), 127 is silence.
    pub dbov: u8,
    /// The sender's voice-activity flag (the extension's V bit).
    pub voice: bool,
}

/// One RTP audio packet as the media core sees it: header fields already parsed, SRTP removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundPacket {
    /// The stream the packet belongs to.
    pub stream: StreamId,
    /// RTP sequence number (wraps at 65535).
    pub seq: u16,
    /// RTP timestamp, 48 kHz units for Opus.
    pub rtp_timestamp: u32,
    /// The Opus payload, untouched.
    pub payload: bytes::Bytes,
    /// RFC 6464 level, when the sender includes the header extension.
    pub level: Option<AudioLevel>,
    /// When the packet reached this server (ingress; carried through for the delay metric).
    pub arrival: Duration,
}

/// A ranked stream: what the ranker selects, and what a server tells the mesh primary about its
/// local speakers (the `"c"` entries of a local top list, hence the short serde names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The stream (on the mesh: its id on the reporting server).
    #[serde(rename = "s")]
    pub stream: StreamId,
    /// Smoothed speech level in dBov (-127 silent ..= 0 loudest). Higher is more important.
    #[serde(rename = "i")]
    pub importance: f32,
    /// Whether the stream is currently voice-active.
    #[serde(rename = "v")]
    pub voice: bool,
    /// The identity of the participant speaking on it (from its join token), when known: the room
    /// fills it in for the mesh, which carries at most `mesh::wire::MAX_IDENTITY` bytes of it.
    /// The media core leaves it `None`.
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Every failure the media core reports. One enum so callers can label metrics with
/// [`MediaError::category`] without matching on strings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// A configuration value is out of range.
    #[error("invalid media configuration: {0}")]
    InvalidConfig(String),
    /// A packet or command named a stream the mixer does not have.
    #[error("unknown stream {0:?}")]
    UnknownStream(StreamId),
    /// The payload is not a well-formed Opus packet (or libopus refused it).
    #[error("malformed Opus payload: {0}")]
    MalformedOpus(String),
    /// A well-formed Opus packet whose duration is not the room's frame duration.
    #[error("Opus packet holds {got} samples per channel, the room uses {expected}")]
    FrameDuration {
        /// Samples per channel the room's frame size needs.
        expected: usize,
        /// Samples per channel the packet holds.
        got: usize,
    },
    /// PCM handed to the encoder has the wrong length.
    #[error("PCM frame of {got} samples, expected {expected}")]
    PcmLength {
        /// Samples the encoder needs.
        expected: usize,
        /// Samples it was given.
        got: usize,
    },
    /// libopus failed for a reason that is not the input's fault.
    #[error("Opus codec failure in {function}: {description}")]
    Codec {
        /// The libopus function that failed.
        function: &'static str,
        /// libopus' own description of the error.
        description: &'static str,
    },
}

impl MediaError {
    /// A short, bounded label for metrics (`chorus_..._errors_total{category=...}`).
    pub fn category(&self) -> &'static str {
        match self {
            MediaError::InvalidConfig(_) => "invalid_config",
            MediaError::UnknownStream(_) => "unknown_stream",
            MediaError::MalformedOpus(_) => "malformed_opus",
            MediaError::FrameDuration { .. } => "frame_duration",
            MediaError::PcmLength { .. } => "pcm_length",
            MediaError::Codec { .. } => "codec",
        }
    }
}
