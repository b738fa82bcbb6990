//! The WebRTC shell of the media server: one UDP port for every participant.
//!
//! Kubernetes exposes one UDP port per media-server pod, so every participant's ICE, DTLS, SRTP
//! and RTCP share one socket. This module owns that socket and the WebRTC state machines behind
//! it, and hands the media core nothing but Opus frames in and out.
//!
//! Parts:
//! - [`MediaPort`] (`port.rs`): owns the socket and ONE driver task that runs every connection —
//!   receive, demultiplex, feed the right connection, drain its datagrams and timers, send. No
//!   participant gets an OS socket or a task of its own.
//! - `demux.rs` (hand-written: no crate routes several ICE sessions over one socket): classifies
//!   each datagram by its first byte (RFC 7983), checks STUN/RTP/RTCP headers, and reads the
//!   local ICE ufrag from a STUN binding request's USERNAME so a first contact finds its peer.
//! - `offer.rs`: checks a participant's SDP offer before WebRTC sees it, so a bad offer gets an
//!   error that says what is wrong (no audio, no Opus/48000/2, neither sendrecv nor recvonly, ...).
//! - `session.rs`: one participant: answer creation, RTP in (with the RFC 6464 level), RTP out
//!   (own SSRC, sequence and timestamp), state changes. A participant who talks is carried by a
//!   sans-IO [`rtc`] peer connection (webrtc-rs); one who only listens (`a=recvonly`) by
//!   `listener.rs`, Chorus's own ICE-lite + DTLS + SRTP built from `rtc`'s public sub-crates,
//!   whose SRTP context we own, so a listener's frame is sealed and batched without `rtc`'s
//!   per-peer pipeline.
//! - Outgoing datagrams leave in `sendmmsg` batches.
//! - `load.rs`: how busy the port's task is; above [`PortConfig::overload_busy`] new
//!   participants are refused with a clear error, so those already in keep being served.
//! - `fan_out.rs`: with [`PortConfig::fan_out_workers`] above one, a large room's listeners are
//!   cut into contiguous lanes, each sealed and sent on its own thread from the same socket.
//! - `link_layer.rs`: with [`PortConfig::link_layer_fan_out`], listeners' media leaves as whole
//!   Ethernet frames through packet sockets (hand-built headers, the kernel's own route and
//!   neighbour), skipping the kernel's UDP/IP send path; whatever it cannot carry keeps the socket.
//!
//! Invariants:
//! - Nothing received from the network can panic this module or reach another participant's
//!   connection: a datagram goes to at most one connection, chosen by ufrag or source address.
//! - Dropped input is counted ([`PortStats`]), never silently lost; a dropped datagram counts
//!   under exactly one reason.
//! - Sending audio never blocks the caller: [`PeerSender::send_opus`] queues or fails at once.

mod demux;
mod fan_out;
mod gcm_seal;
mod link_layer;
mod listener;
mod load;
mod offer;
mod packed;
mod port;
mod session;

use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::media::AudioLevel;

pub use port::{
    MediaPort, PeerHandle, PeerLink, PeerSender, PlainRoute, PlainSender, PortConfig, PortStats,
};

/// One Opus frame received from a participant, as it arrived (no jitter buffering here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundAudio {
    /// The tag of the [`AudioSink`] it was delivered to: the room's stream id for the
    /// participant, or the peer id for a peer that has its own queue.
    pub tag: u64,
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp, 48 kHz clock.
    pub rtp_timestamp: u32,
    /// The Opus packet, zero-copy from the decrypted datagram.
    pub payload: Bytes,
    /// The RFC 6464 audio level; `None` when the extension was not negotiated or the packet does
    /// not carry it.
    pub level: Option<AudioLevel>,
    /// When the datagram was read from the socket.
    pub arrival: Instant,
}

/// Where a peer's received audio goes: a queue shared by every participant of a room, each
/// packet tagged with the participant's stream id, so packets go from the port straight to the
/// room without a task or a channel hop per participant.
#[derive(Debug, Clone)]
pub struct AudioSink {
    /// The queue. Full means the room is behind: the packet is dropped and counted.
    pub queue: mpsc::Sender<InboundAudio>,
    /// The tag stamped on every packet delivered here.
    pub tag: u64,
}

/// The state of one participant's connection, as published on [`PeerHandle::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Answer sent; ICE/DTLS not finished yet.
    Connecting,
    /// ICE and DTLS are up; audio flows.
    Connected,
    /// Consent checks stopped arriving; may still come back.
    Disconnected,
    /// ICE or DTLS failed, or the peer never connected in time. The peer has been removed.
    Failed,
    /// Closed by [`PeerHandle::close`], by the remote, or by port shutdown. The peer has been
    /// removed.
    Closed,
}

impl PeerState {
    /// Whether the peer is gone for good (the port has forgotten it).
    pub fn is_terminal(self) -> bool {
        matches!(self, PeerState::Failed | PeerState::Closed)
    }
}

/// Everything that can go wrong in the endpoint layer.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The offer is not parseable SDP, or lacks what any WebRTC offer must have.
    #[error("malformed SDP offer: {0}")]
    MalformedSdp(String),
    /// The offer is valid SDP but asks for something Chorus does not do.
    #[error("unsupported SDP offer: {0}")]
    UnsupportedOffer(String),
    /// The WebRTC stack refused the offer or could not build an answer.
    #[error("WebRTC negotiation failed: {0}")]
    Negotiation(String),
    /// The UDP socket could not be used.
    #[error("media socket error: {0}")]
    Socket(#[source] std::io::Error),
    /// The port has shut down (its cancellation token fired or its task ended).
    #[error("the media port has shut down")]
    PortClosed,
    /// The port holds as many participants as it is configured for.
    #[error("the media port is full ({0} participants)")]
    TooManyPeers(usize),
    /// The peer has been closed or removed.
    #[error("participant {0} is closed")]
    PeerClosed(u64),
    /// The port's command queue is full; the frame was dropped (the caller must not wait).
    #[error("the media port's send queue is full; frame dropped")]
    SendQueueFull,
    /// The port's task is too busy to take another participant now: it would answer everyone's
    /// consent checks late. Another server, or a retry later, can take the participant.
    #[error(
        "the media server is overloaded (its media task is busy {busy_percent} % of the time; new participants are refused above {limit_percent} %); try another server or retry later"
    )]
    Overloaded {
        /// How busy the port's task is, percent.
        busy_percent: u32,
        /// The limit, percent.
        limit_percent: u32,
    },
    /// The port's fan-out worker threads could not be started.
    #[error("cannot start the media port's fan-out workers: {0}")]
    Workers(#[source] rayon::ThreadPoolBuildError),
}

impl EndpointError {
    /// A short, stable name for metrics labels and logs (`chorus_..._errors{category=...}`).
    pub fn category(&self) -> &'static str {
        match self {
            EndpointError::MalformedSdp(_) => "sdp_malformed",
            EndpointError::UnsupportedOffer(_) => "sdp_unsupported",
            EndpointError::Negotiation(_) => "negotiation",
            EndpointError::Socket(_) => "socket",
            EndpointError::PortClosed => "port_closed",
            EndpointError::TooManyPeers(_) => "capacity",
            EndpointError::PeerClosed(_) => "peer_closed",
            EndpointError::SendQueueFull => "backpressure",
            EndpointError::Workers(_) => "workers",
            EndpointError::Overloaded { .. } => "overloaded",
        }
    }
}
