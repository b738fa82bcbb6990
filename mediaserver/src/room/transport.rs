//! A participant's transport: what carries its audio to and from this server.
//!
//! A room member ([`super::core::RoomCore`]) is a participant: a stable id, an identity, a stream,
//! rank state and a roster entry. How its audio travels is a separate, replaceable part behind
//! [`Transport`]. Today that is a WebRTC peer on the server's media port ([`WebRtcTransport`]);
//! a phone leg can implement the same interface, and a device switch replaces the transport
//! under the same participant.
//!
//! Received audio does not go through this interface: every transport of a room delivers into
//! the room's one queue, each packet tagged with the participant's stream id (see
//! [`crate::endpoint::AudioSink`]), so a packet reaches the room without a task or a channel hop
//! per participant.

use std::sync::Arc;

use bytes::Bytes;

use crate::endpoint::{EndpointError, MediaPort, PeerLink, PeerState};

/// What carries one participant's audio. Implementations never wait: sends queue or fail at
/// once.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Queue one Opus frame lasting `samples` samples at 48 kHz for the participant.
    fn send_opus(&self, payload: Bytes, samples: u32) -> Result<(), EndpointError>;

    /// The peer id on this server's media port, when the transport is a WebRTC peer there: the
    /// room then hands the shared frame to the port's one fan-out instead of one send each.
    fn port_peer(&self) -> Option<u64>;

    /// Whether the participant only listens (it sends no audio): the room then keeps no
    /// stream for it in the mixer, so a listener costs the tick nothing.
    fn listens_only(&self) -> bool {
        false
    }

    /// Whether the transport has ended for good (failed, closed by the remote or by us).
    fn is_gone(&self) -> bool;

    /// Tear the transport down. Idempotent; never waits.
    fn close(&self);
}

/// A WebRTC peer on the server's media port.
#[derive(Debug)]
pub struct WebRtcTransport {
    link: PeerLink,
    port: Arc<MediaPort>,
}

impl WebRtcTransport {
    /// The transport over `link`, a peer of `port`.
    pub fn new(link: PeerLink, port: Arc<MediaPort>) -> Self {
        Self { link, port }
    }
}

impl Transport for WebRtcTransport {
    fn send_opus(&self, payload: Bytes, samples: u32) -> Result<(), EndpointError> {
        self.link.outbound.send_opus(payload, samples)
    }

    fn port_peer(&self) -> Option<u64> {
        Some(self.link.id)
    }

    fn listens_only(&self) -> bool {
        self.link.listen_only
    }

    fn is_gone(&self) -> bool {
        self.link.state.borrow().is_terminal()
    }

    fn close(&self) {
        self.port.close_peer(self.link.id);
    }
}

impl WebRtcTransport {
    /// The connection's state now.
    pub fn state(&self) -> PeerState {
        *self.link.state.borrow()
    }
}
