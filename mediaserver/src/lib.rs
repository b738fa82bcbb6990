//! `chorus-mediaserver`: one Chorus media server.
//!
//! Layering (pure core, thin shell):
//! - [`media`]: the pure media core. Jitter buffers, importance ranking, top-N selection, the mixer
//!   and the Opus codec wrapper. Time and packets are inputs; no sockets, no clocks.
//! - [`endpoint`]: the WebRTC shell. One UDP socket shared by every participant, demultiplexed to
//!   sans-IO `rtc` peer connections; received audio goes straight into its room's queue.
//! - [`room`]: the rooms. Each is a pure [`room::core::RoomCore`] (members, mixer, forwarding and
//!   reporting rules) inside one task; a participant is separate from its
//!   [`room::transport::Transport`].
//! - [`mesh`]: the cross-server mesh: wire formats, the sans-IO protocol (primary, top lists,
//!   forwarding, consistency), the QUIC transport (frames, TLS, connections) and its metrics.
//! - [`mesh_node`]: the thin shell driving the mesh protocol and linking it to the rooms; it also
//!   publishes the plan's mixing settings to every room.
//! - [`plan_source`]: where the mesh plan comes from (a file, or the ConfigMap) and its watch.
//! - [`telephony`]: "call me": the SIP agent, the pure call state machine, the phone leg's media
//!   (SDP, RTP, G.711, DTMF, SDES-SRTP) and the calls of a server; a phone is one more room
//!   member behind the same transport interface.
//! - [`transfer`]: session transfer by QR code: the code store; the swap itself is a room's.
//! - [`api`]: the HTTP API (WHIP-like join), web client, metrics and probes.
//! - [`config`], [`token`], [`metrics`], [`server`]: configuration layers, join tokens, Prometheus
//!   metrics and the wiring that `main` calls with bound sockets.
//! - [`stdin_watch`]: how a server (or bot) started by `chorus-operator local` notices its parent
//!   is gone.

pub mod api;
pub mod config;
pub mod endpoint;
pub mod media;
pub mod mesh;
pub mod mesh_node;
pub mod metrics;
pub mod plan_source;
pub mod room;
pub mod server;
pub mod stdin_watch;
pub mod telephony;
pub mod token;
pub mod transfer;
