//! The edge placement of "call me" (DESIGN §11, the claim of US10334001B2): a bridge inside the
//! enterprise network registers with the call manager as a line, takes call jobs from the
//! conference over a connection it opens itself, dials the desk phone, and joins the room as an
//! ordinary WebRTC participant; that DTLS-SRTP leg is the encrypted connection to the cloud.
//!
//! - [`protocol`]: what the server and the bridge say to each other (a server-sent event stream
//!   of jobs, and JSON reports back); [`sse`] reads the stream on the bridge.
//! - [`hub`]: the server's side: bridge authentication and bookkeeping, and one relay per call
//!   that turns the bridge's reports into the call resource.
//! - [`bridge`]: `chorus-mediaserver edge`: registration, the job connection with reconnect and
//!   backoff, and one [`crate::telephony::call_task::CallTask`] per job, the same task a media
//!   server runs in server mode.
//! - [`webrtc_room`]: the bridge's room side: the phone joins a remote room as a WebRTC
//!   participant (webrtc-rs), transcoded on the bridge.
//!
//! Invariants: the bridge opens no listening socket but its SIP socket and each call's RTP and
//! WebRTC sockets; a job stream that breaks ends every call it carried with a clear reason
//! (`conference_lost` on the bridge, `edge_lost` on the server), so no phone is left ringing.

pub mod bridge;
pub mod hub;
pub mod protocol;
pub mod sse;
pub mod webrtc_room;
