//! Joining swarm listeners to a Janus AudioBridge room, so Janus is measured by the same method
//! as Chorus.
//!
//! Signalling only: per listener, one handle attached to `janus.plugin.audiobridge` on one API
//! session shared by the whole swarm ([`crate::janus::JanusSession`]: one long-poll loop for
//! every handle), and a `join` request carrying the listener's offer as a non-trickle JSEP
//! (`"trickle": false`: the offer already holds the listener's one candidate and
//! `a=end-of-candidates`). Janus then gathers its own candidates before answering, so the
//! `joined` event's answer lists them all (the configuration `crate::janus` writes does not turn
//! full-trickle on). ICE, DTLS and SRTP then run exactly as against Chorus, with two differences
//! the listener already handles: Janus is a full ICE agent that sends its own checks (answered
//! with the listener's password) and lists a candidate per interface and family (the answer
//! parser picks the one on the listener's own address), and it answers `a=setup:active` (the
//! listener is the DTLS server).
//!
//! What Janus accepts, tried against Janus 1.1.2's AudioBridge: a `recvonly` offer joins
//! (unmuted), is answered `a=sendonly` with `a=setup:active`, and the participant is sent the
//! mix like any other, so listeners offer what they offer Chorus, and Janus does per listener
//! what it does for a participant that sends nothing: mix-minus and one Opus encode per tick.
//! A `sendrecv` offer with [`super::Upstream::Silence`] joins unmuted too (answered
//! `a=sendrecv`): the point is what an unmuted microphone costs. [`JanusTarget::muted`] exists
//! for comparisons, but a muted participant costs Janus less than a browser that forgets to
//! mute.
//!
//! Janus encodes every participant's mix separately, so listeners' payloads differ from the
//! reference's (a few coincide: a steady tone repeats frames). [`super::SwarmConfig::janus`]
//! therefore turns payload verification off, and the offsets from the reference are withheld.
//!
//! Invariant: a handle whose join failed is detached at once, so a failed listener leaves no
//! participant behind.

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::json;

use crate::janus::{JanusHandle, JanusJitter, JanusSession};

/// Where and how the swarm joins Janus.
#[derive(Debug, Clone, PartialEq)]
pub struct JanusTarget {
    /// The AudioBridge room (created beforehand, e.g. with
    /// [`JanusSession::create_room`](crate::janus::JanusSession::create_room)).
    pub room: u64,
    /// Join muted (the listener's packets, if any, are not mixed).
    pub muted: bool,
    /// Per-participant prebuffer; Default sends none (the room's setting holds).
    pub jitter: JanusJitter,
}

impl JanusTarget {
    /// Unmuted listeners in `room` with the room's prebuffer.
    pub fn new(room: u64) -> Self {
        JanusTarget {
            room,
            muted: false,
            jitter: JanusJitter::Default,
        }
    }
}

/// The swarm's Janus session and the room it joins.
#[derive(Debug)]
pub(crate) struct JanusSignaling {
    session: JanusSession,
    target: JanusTarget,
}

impl JanusSignaling {
    /// Opens a session on the Janus API at `base_url` (`http://HOST:PORT/janus`).
    pub(crate) async fn connect(base_url: &str, target: JanusTarget) -> Result<Self> {
        let session = JanusSession::connect(base_url)
            .await
            .with_context(|| format!("opening a Janus session at {base_url}"))?;
        Ok(JanusSignaling { session, target })
    }

    /// Janus' own address (`local-ip`), where its candidates are: listeners must bind to it
    /// (Janus never gathers on loopback; see `crate::janus`).
    pub(crate) fn local_ip(&self) -> Option<IpAddr> {
        self.session.local_ip().and_then(|ip| ip.parse().ok())
    }

    /// Attaches a handle and joins it to the room with `offer`; returns the SDP answer and the
    /// handle (the listener's membership).
    pub(crate) async fn join(&self, index: usize, offer: String) -> Result<(String, JanusHandle)> {
        let handle = self.session.attach().await?;
        match self.join_handle(&handle, index, offer).await {
            Ok(answer) => Ok((answer, handle)),
            Err(err) => {
                let _ = handle.detach().await;
                Err(err.context(format!(
                    "listener {index} joining AudioBridge room {}",
                    self.target.room
                )))
            }
        }
    }

    async fn join_handle(
        &self,
        handle: &JanusHandle,
        index: usize,
        offer: String,
    ) -> Result<String> {
        let mut request = json!({
            "request": "join",
            "room": self.target.room,
            "display": format!("swarm-{index}"),
            "muted": self.target.muted,
        });
        if self.target.jitter == JanusJitter::Lowest {
            request["prebuffer"] = json!(JanusJitter::Lowest.prebuffer_packets());
        }
        let jsep = json!({"type": "offer", "sdp": offer, "trickle": false});
        let event = handle.request_with_event(request, Some(jsep)).await?;
        ensure!(
            event.data["audiobridge"] == "joined",
            "join answered {}",
            event.data
        );
        let jsep = event
            .jsep
            .ok_or_else(|| anyhow!("the joined event carries no SDP answer: {}", event.data))?;
        ensure!(
            jsep["type"] == "answer",
            "Janus sent {jsep} instead of an answer"
        );
        jsep["sdp"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the answer has no SDP: {jsep}"))
    }

    /// Destroys the session (Janus hangs up any handle still attached).
    pub(crate) async fn destroy(self) -> Result<()> {
        self.session.destroy().await
    }
}

/// Leaves the room and detaches the handle (hanging up its PeerConnection).
pub(crate) async fn leave(handle: JanusHandle) -> Result<()> {
    let left = handle
        .request_with_event(json!({"request": "leave"}), None)
        .await;
    let detached = handle.detach().await;
    left?;
    detached
}
