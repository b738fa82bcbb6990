//! The edge protocol: what a media server and an edge bridge say to each other.
//!
//! The bridge opens every connection (it sits behind the enterprise firewall):
//! - `GET /v1/telephony/edge/jobs` with `Authorization: Bearer <edge token>`: a server-sent event
//!   stream. The first event is `hello` ([`Hello`]); then `call` ([`CallJob`]) and `hangup`
//!   ([`HangupJob`]) as calls are asked for and ended. A comment line every
//!   [`KEEPALIVE`] keeps proxies from closing it and tells the bridge the server is alive.
//! - `POST /v1/telephony/edge/calls/{id}` with a [`CallReport`]: one per transition of call `id`.
//! - `POST /v1/telephony/edge/status` with a [`StatusReport`]: whether the bridge's line is
//!   registered with the call manager.
//!
//! Every type refuses unknown fields, and a join token never appears in `Debug` output.

use std::time::Duration;

use chorus_crds::MeshTelephony;
use serde::{Deserialize, Serialize};

use crate::telephony::call::{CallState, EndReason};
use crate::telephony::calls::RoutingInfo;

/// How often the server sends a keep-alive comment on the job stream.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long the bridge waits without a byte on the job stream before it calls the connection
/// lost (three keep-alives missed).
pub const STREAM_SILENCE: Duration = Duration::from_secs(16);

/// The SSE event names.
pub mod event {
    /// [`super::Hello`].
    pub const HELLO: &str = "hello";
    /// [`super::CallJob`].
    pub const CALL: &str = "call";
    /// [`super::HangupJob`].
    pub const HANGUP: &str = "hangup";
}

/// The first event on a job stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hello {
    /// This connection's id on the server; reports name it.
    pub bridge_id: u64,
    /// The server's id.
    pub server_id: String,
    /// The conference.
    pub conference: String,
    /// The conference's telephony policy (codecs, SRTP, timeouts, caller id). The bridge dials
    /// its own call manager with its own line; the policy is the conference's.
    pub telephony: MeshTelephony,
}

/// Dial a phone and bridge it into a room.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallJob {
    /// The call's id on the server.
    pub call_id: u64,
    /// The room the phone joins.
    pub room: String,
    /// The checked user part to dial.
    pub to: String,
    /// Seconds the phone may ring.
    pub ring_timeout_seconds: u32,
    /// A join token for the phone's participant (short-lived, for this room only).
    pub join_token: String,
}

impl std::fmt::Debug for CallJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallJob")
            .field("call_id", &self.call_id)
            .field("room", &self.room)
            .field("to", &crate::telephony::target_hash(&self.to))
            .field("ring_timeout_seconds", &self.ring_timeout_seconds)
            .field("join_token", &"<redacted>")
            .finish()
    }
}

/// End a call: CANCEL while ringing, BYE when active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HangupJob {
    /// The call.
    pub call_id: u64,
}

/// A transition of a call on the bridge, as the call resource shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallReport {
    /// The reporting connection (its [`Hello::bridge_id`]).
    pub bridge_id: u64,
    /// The new state.
    pub state: CallState,
    /// The SIP status that caused it.
    #[serde(default)]
    pub sip_status: Option<u16>,
    /// Set on `ended`.
    #[serde(default)]
    pub end_reason: Option<EndReason>,
    /// How the phone was found.
    #[serde(default)]
    pub routing: Option<RoutingInfo>,
    /// The codec the phone answered with.
    #[serde(default)]
    pub codec: Option<String>,
    /// Whether the phone's media is SRTP.
    #[serde(default)]
    pub encrypted: bool,
    /// The phone's participant id in the room, once it joined.
    #[serde(default)]
    pub phone_participant_id: Option<u64>,
}

/// The bridge's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusReport {
    /// The reporting connection.
    pub bridge_id: u64,
    /// Whether the line is registered with the call manager.
    pub registered: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_refuse_unknown_fields() {
        let report = CallReport {
            bridge_id: 3,
            state: CallState::Ended,
            sip_status: Some(486),
            end_reason: Some(EndReason::Busy),
            routing: None,
            codec: Some("PCMU".into()),
            encrypted: false,
            phone_participant_id: None,
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains(r#""endReason":"busy""#), "{json}");
        assert_eq!(serde_json::from_str::<CallReport>(&json).unwrap(), report);
        let extra = json.replacen('{', r#"{"admin":true,"#, 1);
        assert!(serde_json::from_str::<CallReport>(&extra).is_err());
        assert!(serde_json::from_str::<CallReport>(r#"{"bridgeId":1,"state":"flying"}"#).is_err());
    }

    #[test]
    fn a_job_never_shows_its_token_or_number_in_debug() {
        let job = CallJob {
            call_id: 1,
            room: "lobby".into(),
            to: "1001".into(),
            ring_timeout_seconds: 20,
            join_token: "eyJsecret".into(),
        };
        let shown = format!("{job:?}");
        assert!(
            !shown.contains("eyJsecret") && !shown.contains("1001"),
            "{shown}"
        );
    }
}
