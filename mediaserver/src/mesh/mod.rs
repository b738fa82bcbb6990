//! The mesh between the media servers of one conference (DESIGN.md §5): the distributed mixing
//! protocol (primary election, local and global top lists, forwarding, consistency) and the
//! mutual-TLS QUIC transport that carries it.
//!
//! Layering, as everywhere in this crate, is pure core plus thin shell:
//! - [`wire`]: the network formats. Control messages (versioned, size-limited JSON frames) and the
//!   hand-written binary layout of forwarded media datagrams. Every parser is strict, bounded and
//!   never panics.
//! - [`protocol`]: the sans-IO protocol core, [`protocol::MeshNodeState`]. Time and messages are
//!   inputs, outgoing messages are values. It decides who is the primary of a room, merges top
//!   lists, says what to mix and what to forward to whom, and counts how consistent the mesh is.
//! - [`frame`]: the length-prefixed codec of the control stream (Hello, Ping, Pong, control
//!   messages), bounded before any allocation.
//! - [`tls`]: the mesh TLS material ([`MeshTls`]) and the rustls configurations of mutual TLS
//!   under the conference's mesh CA, including the check of a dialer's claimed id.
//! - [`transport`]: QUIC (quinn) between the servers: the endpoint, the peer set from the plan,
//!   sending control frames and media datagrams, per-peer counters; its `connection` part runs
//!   each connection (dial with backoff, accept and identify, heartbeats/RTT).
//! - [`metrics`]: the mesh's Prometheus collectors.
//!
//! The glue lives outside this module: `crate::mesh_node` feeds each room's latest candidates
//! into [`protocol::MeshNodeState::on_local_candidates`] and publishes to the room, as its view,
//! the [`protocol::MeshNodeState::selection`] to mix and the
//! [`protocol::MeshNodeState::forwarding`] of its local streams; the room's core then sends each
//! listed local packet, unchanged, as a [`wire::MediaDatagram`].
//!
//! Invariants across the module:
//! - nothing that arrives from the network can make it panic; every rejection is a [`MeshError`]
//!   with a static [`MeshError::category`] for metrics;
//! - memory is bounded by the plan (peers) and by configured limits (rooms, list lengths, frame
//!   sizes), whatever peers send;
//! - secrets (private keys) never reach `Debug` output, logs or metrics.

pub mod error;
pub mod frame;
pub mod metrics;
pub mod protocol;
pub mod tls;
pub mod transport;
pub mod wire;

pub use error::MeshError;
pub use metrics::MeshMetrics;
pub use protocol::{
    GlobalList, MeshCounters, MeshNodeState, Outgoing, ProtocolConfig, ServerId, StreamKey,
};
pub use tls::MeshTls;
pub use transport::{MeshInbound, MeshPeer, MeshTransport, PeerStats, TransportConfig};
pub use wire::{ControlMessage, MediaDatagram};
