//! The server's side of the edge placement: which bridges are connected, who may connect, and
//! one relay task per call handed to a bridge.
//!
//! A bridge connects with an edge token ([`crate::token::EdgeClaims`]) of this conference; when
//! the conference's edge token Secret is mounted, the token must also be the one it holds, so
//! rotating the Secret locks out the old token at the next connection. Each connection is a
//! [`BridgeSession`], held by its job stream: dropping it (the stream ended, the bridge went
//! away) detaches the bridge, and every call it carried ends as `edge_lost`.
//!
//! A call in edge mode is an `EdgeRelay`: it mints a short-lived join token for the phone's
//! participant, sends the job, and turns the bridge's reports into the call resource's
//! transitions, so the calls API, its events and the web client are the same as in server mode.
//! It keeps the server-side rules too: the owner leaving hangs the phone up, the owner's web
//! stream is muted while the phone is active (`audio: replace`), and a bridge that does not
//! end a call it was told to end is not waited for forever.
//!
//! Invariants: a report is taken only from the bridge the call was handed to; states only move
//! forward; the phone's participant is taken out of the room when the call ends, whichever side
//! ended it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use chorus_crds::MeshTelephony;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::protocol::{CallJob, CallReport, HangupJob, Hello};
use crate::room::core::ParticipantId;
use crate::telephony::TelephonyError;
use crate::telephony::call::{CallState, CallTimeouts, EndReason};
use crate::telephony::calls::{AudioMode, CallInfo, CallTransition, Calls, unix_ms};
use crate::telephony::metrics::TelephonyMetrics;
use crate::token::{EdgeClaims, TokenError, TokenKey};

/// How long after the ring timeout a call still dialing or ringing is ended here, if its bridge
/// has not reported the end.
const RING_GUARD: Duration = Duration::from_secs(15);
/// How long a bridge has to end a call it was told to hang up.
const HANGUP_GUARD: Duration = Duration::from_secs(10);
/// How long the phone's join token outlives the ring timeout.
const JOIN_TOKEN_SLACK: Duration = Duration::from_secs(120);
/// How often a relay checks its owner and its guards.
const RELAY_TICK: Duration = Duration::from_millis(250);

/// What goes down a bridge's job stream.
#[derive(Debug, Clone)]
pub enum EdgeMessage {
    /// Dial.
    Call(CallJob),
    /// Hang up.
    Hangup(HangupJob),
}

struct BridgeEntry {
    name: String,
    jobs: mpsc::UnboundedSender<EdgeMessage>,
    registered: bool,
    calls: usize,
    gone: CancellationToken,
}

/// The edge bridges connected to this server.
#[derive(Clone)]
pub struct EdgeHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    key: TokenKey,
    conference: String,
    server_id: String,
    pin_file: Option<PathBuf>,
    metrics: TelephonyMetrics,
    bridges: Mutex<BTreeMap<u64, BridgeEntry>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for EdgeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHub")
            .field("conference", &self.inner.conference)
            .field("bridges", &self.connected())
            .finish_non_exhaustive()
    }
}

impl EdgeHub {
    /// A hub for `conference` on server `server_id`: edge tokens are checked with `key` (the
    /// join key), and, when `pin_file` is given, must equal its content.
    pub fn new(
        key: TokenKey,
        conference: &str,
        server_id: &str,
        pin_file: Option<PathBuf>,
        metrics: TelephonyMetrics,
    ) -> Self {
        let hub = Self {
            inner: Arc::new(HubInner {
                key,
                conference: conference.to_owned(),
                server_id: server_id.to_owned(),
                pin_file,
                metrics,
                bridges: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        hub.update_gauges(&hub.lock());
        hub
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, BridgeEntry>> {
        self.inner
            .bridges
            .lock()
            .expect("bridges lock is never poisoned: nothing panics while holding it")
    }

    fn update_gauges(&self, bridges: &BTreeMap<u64, BridgeEntry>) {
        let registered = bridges.values().filter(|b| b.registered).count();
        let g = &self.inner.metrics.edge_bridges;
        g.with_label_values(&["true"])
            .set(i64::try_from(registered).unwrap_or(i64::MAX));
        g.with_label_values(&["false"])
            .set(i64::try_from(bridges.len() - registered).unwrap_or(i64::MAX));
    }

    /// Bridges connected now.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Check a bridge's bearer token; the error says why (never echoing the token), and the
    /// refusal is counted by reason.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<EdgeClaims, TelephonyError> {
        let refuse = |reason: &'static str, message: String| {
            self.inner
                .metrics
                .edge_refused
                .with_label_values(&[reason])
                .inc();
            TelephonyError::EdgeToken(message)
        };
        let token = bearer.ok_or_else(|| {
            refuse(
                "token_missing",
                "no edge token: send `Authorization: Bearer <edge token>`".to_owned(),
            )
        })?;
        let claims = self
            .inner
            .key
            .verify_edge(token, &self.inner.conference, SystemTime::now())
            .map_err(|e| {
                let message = match &e {
                    TokenError::Expired => "the edge token has expired".to_owned(),
                    TokenError::Invalid(why) => format!("invalid edge token: {why}"),
                    TokenError::WrongScope {
                        what,
                        found,
                        expected,
                    } => format!("the edge token is for {what} {found:?}, not {expected:?}"),
                    TokenError::Missing => "no edge token".to_owned(),
                };
                refuse(e.category(), message)
            })?;
        if let Some(pin) = &self.inner.pin_file {
            let expected = std::fs::read_to_string(pin).map_err(|e| {
                tracing::error!(file = %pin.display(), error = %e, "cannot read the edge token file");
                refuse(
                    "token_file",
                    "the server cannot read its edge token file".to_owned(),
                )
            })?;
            // Digests compared, so the comparison's time says nothing about the token.
            if Sha256::digest(expected.trim().as_bytes()) != Sha256::digest(token.as_bytes()) {
                return Err(refuse(
                    "token_revoked",
                    "the token is not the conference's current edge token (was its Secret \
                     rotated?)"
                        .to_owned(),
                ));
            }
        }
        Ok(claims)
    }

    /// Attach a bridge named `name`: its job stream is the returned session.
    pub fn attach(&self, name: &str) -> BridgeSession {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (jobs, rx) = mpsc::unbounded_channel();
        let mut bridges = self.lock();
        bridges.insert(
            id,
            BridgeEntry {
                name: name.to_owned(),
                jobs,
                registered: false,
                calls: 0,
                gone: CancellationToken::new(),
            },
        );
        self.update_gauges(&bridges);
        tracing::info!(bridge = id, name, "edge bridge connected");
        BridgeSession {
            id,
            jobs: rx,
            hub: self.clone(),
        }
    }

    fn detach(&self, id: u64) {
        let mut bridges = self.lock();
        if let Some(bridge) = bridges.remove(&id) {
            bridge.gone.cancel();
            tracing::info!(bridge = id, name = bridge.name, "edge bridge disconnected");
        }
        self.update_gauges(&bridges);
    }

    /// The first event of bridge `id`'s stream.
    pub fn hello(&self, id: u64, telephony: MeshTelephony) -> Hello {
        Hello {
            bridge_id: id,
            server_id: self.inner.server_id.clone(),
            conference: self.inner.conference.clone(),
            telephony: MeshTelephony {
                // The Secret's name is the cluster's business, not the bridge's.
                credentials_secret: None,
                ..telephony
            },
        }
    }

    /// Bridge `id` says whether its line is registered.
    pub fn set_registered(&self, id: u64, registered: bool) -> Result<(), TelephonyError> {
        let mut bridges = self.lock();
        let bridge = bridges
            .get_mut(&id)
            .ok_or(TelephonyError::NoSuchBridge(id))?;
        if bridge.registered != registered {
            tracing::info!(
                bridge = id,
                name = bridge.name,
                registered,
                "edge bridge line"
            );
        }
        bridge.registered = registered;
        self.update_gauges(&bridges);
        Ok(())
    }

    /// Whether connection `id` is a bridge of this server.
    pub fn is_connected(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// The bridge for a new call: a registered one before one that is not, then the one with
    /// the fewest calls. `None` when no bridge is connected.
    pub(crate) fn pick(&self) -> Option<BridgeHandle> {
        let mut bridges = self.lock();
        let (&id, bridge) = bridges
            .iter_mut()
            .min_by_key(|(_, b)| (!b.registered, b.calls))?;
        bridge.calls += 1;
        Some(BridgeHandle {
            id,
            jobs: bridge.jobs.clone(),
            gone: bridge.gone.clone(),
            hub: self.clone(),
        })
    }

    fn release(&self, id: u64) {
        if let Some(b) = self.lock().get_mut(&id) {
            b.calls = b.calls.saturating_sub(1);
        }
    }

    /// A join token for the phone's participant.
    fn join_token(&self, room: &str, identity: &str, ttl: Duration) -> String {
        self.inner.key.mint(
            &self.inner.conference,
            room,
            identity,
            ttl,
            SystemTime::now(),
        )
    }
}

/// A bridge's connection: its job stream reads `jobs`; dropping the session detaches the bridge.
#[derive(Debug)]
pub struct BridgeSession {
    /// The connection's id.
    pub id: u64,
    /// Jobs for the bridge.
    pub jobs: mpsc::UnboundedReceiver<EdgeMessage>,
    hub: EdgeHub,
}

impl Drop for BridgeSession {
    fn drop(&mut self) {
        self.hub.detach(self.id);
    }
}

/// A bridge as one call holds it.
#[derive(Debug)]
pub(crate) struct BridgeHandle {
    pub(crate) id: u64,
    jobs: mpsc::UnboundedSender<EdgeMessage>,
    gone: CancellationToken,
    hub: EdgeHub,
}

impl BridgeHandle {
    fn send(&self, message: EdgeMessage) -> bool {
        self.jobs.send(message).is_ok()
    }
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.hub.release(self.id);
    }
}

/// One call handed to a bridge, as this server follows it.
#[derive(Debug)]
pub(crate) struct EdgeRelay {
    pub(crate) calls: Calls,
    pub(crate) id: u64,
    pub(crate) room: String,
    pub(crate) owner: ParticipantId,
    pub(crate) identity: String,
    pub(crate) target: String,
    pub(crate) audio: AudioMode,
    pub(crate) timeouts: CallTimeouts,
    pub(crate) bridge: BridgeHandle,
    pub(crate) hangup: CancellationToken,
    pub(crate) info: watch::Sender<CallInfo>,
    pub(crate) reports: mpsc::UnboundedReceiver<CallReport>,
}

/// What a relay keeps while its call runs.
#[derive(Debug, Default)]
struct RelayState {
    phone: Option<ParticipantId>,
    muted_owner: bool,
    hangup_sent: Option<Instant>,
}

fn rank(state: CallState) -> u8 {
    match state {
        CallState::Dialing => 0,
        CallState::Ringing => 1,
        CallState::Active => 2,
        CallState::Ended => 3,
    }
}

impl EdgeRelay {
    pub(crate) async fn run(mut self) {
        let mut st = RelayState::default();
        let phone_identity = format!("{} (phone)", self.identity);
        let hub = self.calls.edge().clone();
        let job = CallJob {
            call_id: self.id,
            room: self.room.clone(),
            to: self.target.clone(),
            ring_timeout_seconds: u32::try_from(self.timeouts.ring.as_secs()).unwrap_or(u32::MAX),
            join_token: hub.join_token(
                &self.room,
                &phone_identity,
                self.timeouts.ring + JOIN_TOKEN_SLACK,
            ),
        };
        tracing::info!(
            call = self.id,
            bridge = self.bridge.id,
            "call handed to an edge bridge"
        );
        if !self.bridge.send(EdgeMessage::Call(job)) {
            self.finish(&mut st, EndReason::EdgeLost, None).await;
            return;
        }
        let started = Instant::now();
        let gone = self.bridge.gone.clone();
        let mut tick = tokio::time::interval(RELAY_TICK);
        loop {
            tokio::select! {
                report = self.reports.recv() => {
                    let Some(report) = report else {
                        self.finish(&mut st, EndReason::Failed, None).await;
                        return;
                    };
                    if self.apply(&mut st, &phone_identity, report).await {
                        return;
                    }
                }
                () = self.hangup.cancelled(), if st.hangup_sent.is_none() => {
                    st.hangup_sent = Some(Instant::now());
                    self.bridge.send(EdgeMessage::Hangup(HangupJob { call_id: self.id }));
                }
                () = gone.cancelled() => {
                    tracing::warn!(call = self.id, "the edge bridge carrying the call disconnected");
                    self.finish(&mut st, EndReason::EdgeLost, None).await;
                    return;
                }
                _ = tick.tick() => {
                    let rooms = self.calls.rooms();
                    if !self.hangup.is_cancelled() && !rooms.is_member(&self.room, self.owner) {
                        tracing::info!(call = self.id, "the participant left; ending its phone call");
                        self.hangup.cancel();
                    }
                    let state = self.info.borrow().state;
                    let unanswered = matches!(state, CallState::Dialing | CallState::Ringing);
                    if st.hangup_sent.is_some_and(|t| t.elapsed() > HANGUP_GUARD) {
                        tracing::warn!(call = self.id, "the edge bridge did not end the call in time");
                        let reason = if unanswered { EndReason::Cancelled } else { EndReason::Hangup };
                        self.finish(&mut st, reason, None).await;
                        return;
                    }
                    if unanswered && started.elapsed() > self.timeouts.ring + RING_GUARD {
                        tracing::warn!(call = self.id, "the edge bridge never reported an answer or an end");
                        self.bridge.send(EdgeMessage::Hangup(HangupJob { call_id: self.id }));
                        self.finish(&mut st, EndReason::NoAnswer, None).await;
                        return;
                    }
                }
            }
        }
    }

    /// Take one report; `true` once the call has ended.
    async fn apply(&self, st: &mut RelayState, phone_identity: &str, report: CallReport) -> bool {
        let current = self.info.borrow().state;
        if rank(report.state) < rank(current)
            || (report.state == current && report.state != CallState::Active)
        {
            return false;
        }
        if report.state == CallState::Ended {
            self.info.send_modify(|i| {
                i.routing = report.routing.clone().or(i.routing.take());
                i.codec = report.codec.clone().or(i.codec.take());
            });
            let reason = report.end_reason.unwrap_or(EndReason::Failed);
            self.finish(st, reason, report.sip_status).await;
            return true;
        }
        if report.state == CallState::Active
            && st.phone.is_none()
            && let Some(phone) = report.phone_participant_id
        {
            // The participant must be the one our token let in.
            let rooms = self.calls.rooms();
            let genuine = rooms.info(&self.room).is_some_and(|info| {
                info.participants
                    .iter()
                    .any(|p| p.id == phone && p.identity == phone_identity)
            });
            if genuine {
                st.phone = Some(phone);
                if self.audio == AudioMode::Replace
                    && rooms.set_muted(&self.room, self.owner, true).await.is_ok()
                {
                    st.muted_owner = true;
                }
            } else {
                tracing::warn!(
                    call = self.id,
                    "the bridge named a phone participant that is not in the room"
                );
            }
        }
        let phone = st.phone;
        self.info.send_modify(|i| {
            if let Some(status) = report.sip_status {
                i.sip_status = Some(status);
            }
            if report.routing.is_some() {
                i.routing = report.routing.clone();
            }
            if report.codec.is_some() {
                i.codec = report.codec.clone();
            }
            i.encrypted = report.encrypted;
            i.phone_participant_id = phone;
            if i.state != report.state {
                i.state = report.state;
                i.events.push(CallTransition {
                    state: report.state,
                    at_ms: unix_ms(),
                    sip_status: report.sip_status,
                    end_reason: None,
                });
                tracing::info!(call = self.id, state = ?report.state, "phone call (edge)");
            }
        });
        false
    }

    /// End the call here: the phone's participant out of the room, the owner unmuted, the
    /// transition published and counted.
    async fn finish(&self, st: &mut RelayState, reason: EndReason, sip_status: Option<u16>) {
        let rooms = self.calls.rooms();
        if let Some(phone) = st.phone.take() {
            let _ = rooms.leave(&self.room, phone).await;
        }
        if std::mem::take(&mut st.muted_owner) {
            let _ = rooms.set_muted(&self.room, self.owner, false).await;
        }
        let outcome = reason.label();
        self.calls
            .metrics()
            .calls
            .with_label_values(&[outcome])
            .inc();
        tracing::info!(
            call = self.id,
            outcome,
            sip_status,
            "phone call ended (edge)"
        );
        self.info.send_modify(|i| i.end(reason, sip_status));
        self.calls.ended(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hub(pin: Option<PathBuf>) -> EdgeHub {
        let key = TokenKey::new(KEY).expect("a long enough key");
        EdgeHub::new(key, "town", "s1", pin, TelephonyMetrics::new())
    }

    fn token(conference: &str, bridge: &str, ttl: u64) -> String {
        TokenKey::new(KEY).expect("a long enough key").mint_edge(
            conference,
            bridge,
            Duration::from_secs(ttl),
            SystemTime::now(),
        )
    }

    fn refused(hub: &EdgeHub, reason: &str) -> u64 {
        hub.inner
            .metrics
            .edge_refused
            .with_label_values(&[reason])
            .get()
    }

    #[test]
    fn tokens_are_checked_and_pinned_to_the_mounted_secret() {
        let dir = std::env::temp_dir().join(format!("chorus-edge-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = dir.join("token");
        let good = token("town", "hq", 60);
        std::fs::write(&pin, format!("{good}\n")).unwrap();
        let hub = hub(Some(pin.clone()));
        assert_eq!(hub.authenticate(Some(&good)).unwrap().sub, "hq");
        // Valid and of this conference, but not the Secret's: revoked.
        let other = token("town", "hq", 120);
        let err = hub.authenticate(Some(&other)).unwrap_err();
        assert!(err.to_string().contains("current edge token"), "{err}");
        assert_eq!(refused(&hub, "token_revoked"), 1);
        for (bad, reason) in [
            (token("elsewhere", "hq", 60), "token_scope"),
            (token("town", "hq", 0), "token_expired"),
            ("not-a-jwt".to_owned(), "token_invalid"),
        ] {
            let err = hub.authenticate(Some(&bad)).unwrap_err();
            assert!(!err.to_string().contains(&bad), "the token is never echoed");
            assert_eq!(refused(&hub, reason), 1, "{reason}");
        }
        assert!(hub.authenticate(None).is_err());
        assert_eq!(refused(&hub, "token_missing"), 1);
        std::fs::remove_file(&pin).unwrap();
        assert!(hub.authenticate(Some(&good)).is_err(), "no file, no bridge");
        assert_eq!(refused(&hub, "token_file"), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn calls_go_to_registered_bridges_first_and_a_dropped_session_detaches() {
        let hub = hub(None);
        assert!(hub.pick().is_none(), "no bridge, no call");
        let a = hub.attach("a");
        let b = hub.attach("b");
        hub.set_registered(b.id, true).unwrap();
        let first = hub.pick().unwrap();
        assert_eq!(first.id, b.id, "the registered bridge first");
        hub.set_registered(a.id, true).unwrap();
        let second = hub.pick().unwrap();
        assert_eq!(second.id, a.id, "then the one with fewer calls");
        let gauge = |r: &str| hub.inner.metrics.edge_bridges.with_label_values(&[r]).get();
        assert_eq!((gauge("true"), gauge("false")), (2, 0));
        let gone = first.gone.clone();
        drop(b);
        assert!(
            gone.is_cancelled(),
            "the calls of a bridge that left learn it"
        );
        assert_eq!(hub.connected(), 1);
        assert!(matches!(
            hub.set_registered(99, true),
            Err(TelephonyError::NoSuchBridge(99))
        ));
        drop((a, first, second));
        assert_eq!(hub.connected(), 0);
        assert_eq!(gauge("true"), 0);
    }
}
