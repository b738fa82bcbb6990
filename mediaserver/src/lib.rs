//! `chorus-mediaserver`: one Chorus media server.
//!
//! Layering (pure core, thin shell):
//! - [`media`]: the pure media core. Jitter buffers, importance ranking, top-N selection, the mixer
//!   and the Opus codec wrapper. Time and packets are inputs; no sockets, no clocks.
//! - [`endpoint`]: the WebRTC shell. One UDP socket shared by every participant, demultiplexed to
//!   sans-IO `rtc` peer connections.
//! - [`room`]: one task per room joining the two: packets in, one mixer tick per frame, frames out.
//! - [`api`]: the HTTP API (WHIP-like join), web client, metrics and probes.
//! - [`config`], [`token`], [`metrics`], [`server`]: configuration layers, join tokens, Prometheus
//!   metrics and the wiring that `main` calls with bound sockets.

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
pub mod token;
