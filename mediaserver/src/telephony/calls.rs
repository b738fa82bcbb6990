//! The calls of one server: who may call what, and one task per call that runs the pure
//! [`CallMachine`] against the SIP agent, the phone leg and the room.
//!
//! A call's life in its task:
//! 1. the routing lookup ([`SipAgent::query_bindings`]): the first binding is dialled, or the
//!    address of record through the proxy when the line may not query or nothing is bound;
//! 2. an RTP socket and the SDP offer (SRTP keys only when signalling is TLS);
//! 3. the INVITE; SIP events, hang-up requests, leg events and a 250 ms tick feed the machine;
//! 4. its actions run here: CANCEL, BYE, the phone joining the room (only on 200 OK with a usable
//!    answer) and leaving it, and each transition published to the call's event history.
//!
//! Invariants:
//! - one phone per participant, `maxCallsPerIdentity` per identity, `maxConcurrentCalls` per
//!   server, all checked and reserved under one lock before anything is dialled;
//! - the owner leaving (or its room closing) hangs its phone up, and so does
//!   [`Calls::shutdown`], which waits for every BYE/CANCEL before the SIP transport stops;
//! - a call's record stays readable for [`ENDED_RETENTION`] after it ends, then is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsipstack::dialog::DialogId;
use rsipstack::dialog::invite_dialog::InviteDialog;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::call::{CallAction, CallInput, CallMachine, CallState, EndReason};
use super::leg::{LegEvent, LegParams, PhoneLeg};
use super::media::sdp::{OfferParams, build_offer, parse_answer};
use super::media::srtp::SdesKey;
use super::metrics::TelephonyMetrics;
use super::sip::{Routing, SipAgent, SipEvent};
use super::{TelephonyError, TelephonySettings, target_hash};
use crate::room::Rooms;
use crate::room::core::ParticipantId;

/// How long an ended call stays readable.
pub const ENDED_RETENTION: Duration = Duration::from_secs(300);
/// How long the routing lookup may take before the call goes through the proxy instead.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);
/// How often a call checks its timers and its owner.
const CALL_TICK: Duration = Duration::from_millis(250);
/// How long shutdown waits for calls to hang up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the web user's own stream does while its phone is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// The web stream is muted while the phone is active (no echo between the two devices).
    #[default]
    Replace,
    /// Both are heard.
    Add,
}

/// A call request, as `POST /v1/rooms/{room}/calls` takes it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallRequest {
    /// The number, extension or `sip:user@<call manager>` to call.
    pub to: String,
    /// The requesting participant (must be the token's identity, in this room).
    pub participant_id: ParticipantId,
    /// Ring timeout in seconds (at most the conference's).
    #[serde(default)]
    pub ring_timeout_seconds: Option<u32>,
    /// What the participant's web stream does while the phone is active.
    #[serde(default)]
    pub audio: AudioMode,
}

/// One transition, as the event stream sends it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallTransition {
    /// The new state.
    pub state: CallState,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The SIP status that caused it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sip_status: Option<u16>,
    /// Set on `ended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
}

/// How the phone was found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingInfo {
    /// `binding`: the call manager's registration binding was dialled; `proxy`: the address of
    /// record went through the proxy's location lookup.
    pub method: &'static str,
    /// The contact dialled, for `binding`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    /// The status of a refused query, for `proxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_status: Option<u16>,
}

/// A call resource (`GET /v1/rooms/{room}/calls/{id}`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallInfo {
    /// The call's id on this server.
    pub id: u64,
    /// The room.
    pub room: String,
    /// The participant who asked.
    pub participant_id: ParticipantId,
    /// The user part dialled.
    pub to: String,
    /// Where the call is.
    pub state: CallState,
    /// Why it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    /// The last SIP status that mattered (180 while ringing, the final one at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sip_status: Option<u16>,
    /// How the phone was found, once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingInfo>,
    /// The codec the phone answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<&'static str>,
    /// Whether the phone's media is SRTP.
    pub encrypted: bool,
    /// The phone's participant id in the room, while active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_participant_id: Option<ParticipantId>,
    /// Every transition so far, in order.
    pub events: Vec<CallTransition>,
}

struct CallEntry {
    room: String,
    owner: ParticipantId,
    identity: String,
    info: watch::Sender<CallInfo>,
    hangup: CancellationToken,
    ended_at: Option<Instant>,
    task: Option<JoinHandle<()>>,
}

/// Every call of this server.
#[derive(Clone)]
pub struct Calls {
    inner: Arc<CallsInner>,
}

struct CallsInner {
    /// The plan's settings with the line's credentials; `None` when the plan has no telephony
    /// (or it cannot be used: then `problem` says why).
    settings: Mutex<Option<Arc<TelephonySettings>>>,
    agent: Option<SipAgent>,
    rooms: Arc<Rooms>,
    metrics: TelephonyMetrics,
    calls: Mutex<HashMap<u64, CallEntry>>,
    next_id: AtomicU64,
    /// Stops the SIP transport, after calls have hung up.
    sip_stop: CancellationToken,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("enabled", &self.settings().is_some())
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Calls {
    /// Calls placed through `agent` with `settings`; `None` for both when the conference has no
    /// telephony (every request is then refused with [`TelephonyError::Disabled`]).
    /// `sip_stop` stops the agent's transport; [`Calls::shutdown`] cancels it last.
    pub fn new(
        settings: Option<TelephonySettings>,
        agent: Option<SipAgent>,
        rooms: Arc<Rooms>,
        metrics: TelephonyMetrics,
        sip_stop: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(CallsInner {
                settings: Mutex::new(settings.map(Arc::new)),
                agent,
                rooms,
                metrics,
                calls: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                sip_stop,
            }),
        }
    }

    /// The settings new calls use.
    pub fn settings(&self) -> Option<Arc<TelephonySettings>> {
        self.inner
            .settings
            .lock()
            .expect("settings lock is never poisoned")
            .clone()
    }

    /// New settings (a new plan generation); calls in progress keep theirs.
    pub fn set_settings(&self, settings: Option<TelephonySettings>) {
        *self
            .inner
            .settings
            .lock()
            .expect("settings lock is never poisoned") = settings.map(Arc::new);
    }

    /// The metrics.
    pub fn metrics(&self) -> &TelephonyMetrics {
        &self.inner.metrics
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, CallEntry>> {
        self.inner
            .calls
            .lock()
            .expect("calls lock is never poisoned: nothing panics while holding it")
    }

    /// Place a call for `identity` (from its join token) in `room`. Checks and limits come
    /// first; the call then runs in its own task. Returns the call as it starts (`dialing`).
    pub fn create(
        &self,
        room: &str,
        identity: &str,
        request: CallRequest,
    ) -> Result<CallInfo, TelephonyError> {
        let refused = |e: TelephonyError| {
            self.inner
                .metrics
                .refused
                .with_label_values(&[e.category()])
                .inc();
            e
        };
        let (Some(settings), Some(agent)) = (self.settings(), &self.inner.agent) else {
            return Err(refused(TelephonyError::Disabled));
        };
        let target = settings.check_target(&request.to).map_err(refused)?;
        let owner_ok = self.inner.rooms.info(room).is_some_and(|info| {
            info.participants
                .iter()
                .any(|p| p.id == request.participant_id && p.identity == identity)
        });
        if !owner_ok {
            return Err(refused(TelephonyError::NoSuchParticipant(
                request.participant_id,
            )));
        }
        let mut calls = self.lock();
        let now = Instant::now();
        calls.retain(|_, c| c.ended_at.is_none_or(|t| now - t < ENDED_RETENTION));
        let live = |c: &&CallEntry| c.ended_at.is_none();
        if calls
            .values()
            .filter(live)
            .any(|c| c.room == room && c.owner == request.participant_id)
        {
            return Err(refused(TelephonyError::AlreadyCalling(
                request.participant_id,
            )));
        }
        if calls.values().filter(live).count() >= settings.max_concurrent_calls {
            return Err(refused(TelephonyError::ServerLimit(
                settings.max_concurrent_calls,
            )));
        }
        if calls
            .values()
            .filter(live)
            .filter(|c| c.identity == identity)
            .count()
            >= settings.max_calls_per_identity
        {
            return Err(refused(TelephonyError::IdentityLimit(
                settings.max_calls_per_identity,
            )));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let info = CallInfo {
            id,
            room: room.to_owned(),
            participant_id: request.participant_id,
            to: target.clone(),
            state: CallState::Dialing,
            end_reason: None,
            sip_status: None,
            routing: None,
            codec: None,
            encrypted: false,
            phone_participant_id: None,
            events: vec![CallTransition {
                state: CallState::Dialing,
                at_ms: unix_ms(),
                sip_status: None,
                end_reason: None,
            }],
        };
        let (info_tx, _) = watch::channel(info.clone());
        let hangup = CancellationToken::new();
        let mut timeouts = settings.timeouts;
        if let Some(ring) = request.ring_timeout_seconds {
            timeouts.ring = timeouts
                .ring
                .min(Duration::from_secs(u64::from(ring.max(1))));
        }
        let job = CallJob {
            calls: self.clone(),
            settings: settings.clone(),
            agent: agent.clone(),
            id,
            room: room.to_owned(),
            owner: request.participant_id,
            identity: identity.to_owned(),
            target,
            audio: request.audio,
            timeouts,
            hangup: hangup.clone(),
            info: info_tx.clone(),
        };
        tracing::info!(call = id, room, target = %target_hash(&job.target), "placing a phone call");
        self.inner.metrics.active_calls.inc();
        let task = tokio::spawn(job.run());
        calls.insert(
            id,
            CallEntry {
                room: room.to_owned(),
                owner: request.participant_id,
                identity: identity.to_owned(),
                info: info_tx,
                hangup,
                ended_at: None,
                task: Some(task),
            },
        );
        Ok(info)
    }

    /// The call `id` of `room` and a receiver of its changes.
    pub fn watch(&self, room: &str, id: u64) -> Result<watch::Receiver<CallInfo>, TelephonyError> {
        self.lock()
            .get(&id)
            .filter(|c| c.room == room)
            .map(|c| c.info.subscribe())
            .ok_or(TelephonyError::NoSuchCall)
    }

    /// Ask call `id` of `room` to end (CANCEL while ringing, BYE when active). Returns it.
    pub fn hang_up(&self, room: &str, id: u64) -> Result<CallInfo, TelephonyError> {
        let calls = self.lock();
        let call = calls
            .get(&id)
            .filter(|c| c.room == room)
            .ok_or(TelephonyError::NoSuchCall)?;
        call.hangup.cancel();
        Ok(call.info.borrow().clone())
    }

    /// Whether `identity` owns call `id` (only the requester may read or end it).
    pub fn owned_by(&self, id: u64, identity: &str) -> bool {
        self.lock().get(&id).is_some_and(|c| c.identity == identity)
    }

    /// Hang up every call and wait (a bounded time) for their BYEs and CANCELs, then stop the
    /// SIP transport.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut calls = self.lock();
            calls
                .values_mut()
                .filter_map(|c| {
                    c.hangup.cancel();
                    c.task.take()
                })
                .collect()
        };
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
            tracing::warn!("some phone calls did not hang up in time");
        }
        self.inner.sip_stop.cancel();
    }

    fn ended(&self, id: u64) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.ended_at = Some(Instant::now());
            c.task = None;
        }
        self.inner.metrics.active_calls.dec();
    }
}

/// Everything one call's task needs.
struct CallJob {
    calls: Calls,
    settings: Arc<TelephonySettings>,
    agent: SipAgent,
    id: u64,
    room: String,
    owner: ParticipantId,
    identity: String,
    target: String,
    audio: AudioMode,
    timeouts: super::call::CallTimeouts,
    hangup: CancellationToken,
    info: watch::Sender<CallInfo>,
}

/// What the task holds while the call runs.
struct Live {
    machine: CallMachine,
    epoch: Instant,
    dialog_id: Option<DialogId>,
    cancel_pending: bool,
    dialog: Option<InviteDialog>,
    /// A final response (of any class) has arrived.
    finished_signalling: bool,
    leg: Option<PhoneLeg>,
    params: Option<LegParams>,
    phone: Option<ParticipantId>,
    muted_owner: bool,
    ringing_since: Option<Instant>,
    leg_events: mpsc::UnboundedSender<LegEvent>,
}

impl CallJob {
    async fn run(self) {
        let epoch = Instant::now();
        let (leg_events, mut leg_rx) = mpsc::unbounded_channel();
        let mut live = Live {
            machine: CallMachine::new(Duration::ZERO, self.timeouts),
            epoch,
            dialog_id: None,
            cancel_pending: false,
            dialog: None,
            finished_signalling: false,
            leg: None,
            params: None,
            phone: None,
            muted_owner: false,
            ringing_since: None,
            leg_events,
        };
        let mut sip = match self.dial(&mut live).await {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::warn!(call = self.id, error = %e, "the call could not be placed");
                let actions = live.machine.step(epoch.elapsed(), CallInput::LocalFailure);
                self.perform(&mut live, actions).await;
                None
            }
        };
        let mut tick = tokio::time::interval(CALL_TICK);
        while live.machine.state() != CallState::Ended {
            let input = tokio::select! {
                event = recv_sip(sip.as_mut()) => match event {
                    Some(event) => self.on_sip(&mut live, event),
                    None => {
                        sip = None;
                        Some(CallInput::SignallingFailed)
                    }
                },
                () = self.hangup.cancelled(), if !live.cancel_pending && live.machine.state() != CallState::Ended => {
                    live.cancel_pending = true;
                    Some(CallInput::Hangup)
                }
                Some(event) = leg_rx.recv() => match event {
                    LegEvent::Media => Some(CallInput::Media),
                    LegEvent::Dtmf(_) => {
                        self.calls.inner.metrics.dtmf_events.inc();
                        None
                    }
                },
                _ = tick.tick() => {
                    // The owner left (or its room closed): the phone goes too, ringing or not.
                    if !self.calls.inner.rooms.is_member(&self.room, self.owner)
                        && !self.hangup.is_cancelled()
                    {
                        tracing::info!(call = self.id, "the participant left; ending its phone call");
                        self.hangup.cancel();
                    }
                    Some(CallInput::Tick)
                }
            };
            if let Some(input) = input {
                let actions = live.machine.step(epoch.elapsed(), input);
                self.perform(&mut live, actions).await;
            }
        }
        // A 200 OK may still arrive for a call we cancelled before any final response: it gets
        // its BYE. A call whose final response came has nothing more to wait for.
        if let Some(mut events) = sip
            && !live.finished_signalling
            && live.dialog_id.is_some()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(event) = events.recv().await {
                    if let SipEvent::Final { status, dialog, .. } = event {
                        if let (true, Some(dialog)) = ((200..300).contains(&status), dialog) {
                            let _ = self.agent.bye(&dialog).await;
                        }
                        break;
                    }
                }
            })
            .await;
        }
        self.calls.ended(self.id);
    }

    /// Routing lookup, RTP socket, offer, INVITE.
    async fn dial(
        &self,
        live: &mut Live,
    ) -> Result<mpsc::UnboundedReceiver<SipEvent>, TelephonyError> {
        let s = &self.settings;
        let routing = match tokio::time::timeout(
            LOOKUP_TIMEOUT,
            self.agent.query_bindings(&s.manager, &self.target, &s.line),
        )
        .await
        {
            Ok(Ok(routing)) => routing,
            Ok(Err(e)) => {
                tracing::info!(call = self.id, error = %e, "routing lookup failed; dialling through the proxy");
                Routing::ProxyLookup(None)
            }
            Err(_) => Routing::ProxyLookup(None),
        };
        // A binding is dialled directly: the call manager said where the phone is. Over TLS the
        // call stays on the call manager's connection (a phone's own TLS port is rarely
        // reachable with a certificate we can verify), so the proxy routes it.
        let tls = s.manager.transport == rsipstack::sip::Transport::Tls;
        let (request_uri, info) = match &routing {
            Routing::Bindings(contacts) if !contacts.is_empty() && !tls => {
                let contact = contacts[0].clone();
                let uri = rsipstack::sip::Uri::try_from(contact.as_str())
                    .map_err(|e| TelephonyError::Sip(format!("binding contact: {e}")))?;
                (
                    uri,
                    RoutingInfo {
                        method: "binding",
                        contact: Some(contact),
                        query_status: None,
                    },
                )
            }
            Routing::Bindings(contacts) => (
                s.manager.aor(&self.target)?,
                RoutingInfo {
                    method: "proxy",
                    contact: contacts.first().cloned(),
                    query_status: Some(200),
                },
            ),
            Routing::ProxyLookup(status) => (
                s.manager.aor(&self.target)?,
                RoutingInfo {
                    method: "proxy",
                    contact: None,
                    query_status: *status,
                },
            ),
        };
        let direct = info.method == "binding";
        self.info.send_modify(|i| i.routing = Some(info));
        let leg = PhoneLeg::on_port(self.calls.inner.rooms.media_port());
        let srtp = s.offers_srtp().then(|| SdesKey::generate(&mut rand::rng()));
        let offer = OfferParams {
            address: leg.local_addr().ip(),
            port: leg.local_addr().port(),
            codecs: s.codecs.clone(),
            session_id: self.id,
            session_version: 1,
            srtp,
        };
        let sdp = build_offer(&offer);
        let events = self.agent.invite(
            &s.manager,
            &s.line,
            s.caller_id.clone(),
            request_uri,
            direct,
            sdp,
        )?;
        live.leg = Some(leg);
        live.params = Some(LegParams::offered(offer));
        Ok(events)
    }

    fn on_sip(&self, live: &mut Live, event: SipEvent) -> Option<CallInput> {
        let metrics = &self.calls.inner.metrics;
        match event {
            SipEvent::Calling(id) => {
                live.dialog_id = Some(id);
                None
            }
            SipEvent::Provisional(status) => {
                metrics.sip_response(status);
                if live.ringing_since.is_none() && matches!(status, 180 | 183) {
                    live.ringing_since = Some(Instant::now());
                }
                Some(CallInput::Provisional(status))
            }
            SipEvent::Final {
                status,
                body,
                dialog,
            } => {
                metrics.sip_response(status);
                live.finished_signalling = true;
                if let Some(since) = live.ringing_since {
                    metrics
                        .ringing_seconds
                        .observe(since.elapsed().as_secs_f64());
                }
                if !(200..300).contains(&status) {
                    return Some(CallInput::Final(status));
                }
                metrics
                    .setup_seconds
                    .observe(live.epoch.elapsed().as_secs_f64());
                live.dialog = dialog;
                let answer = std::str::from_utf8(&body)
                    .map_err(|_| "the answer is not UTF-8".to_owned())
                    .and_then(|text| {
                        let offered = live
                            .params
                            .as_ref()
                            .map(|p| p.offer.clone())
                            .ok_or_else(|| "no offer".to_owned())?;
                        parse_answer(text, &offered).map_err(|e| e.to_string())
                    })
                    .and_then(|answer| {
                        if self.settings.encryption == super::MediaEncryption::Required
                            && answer.remote_key.is_none()
                        {
                            Err("SRTP is required but the phone answered without a key".to_owned())
                        } else {
                            Ok(answer)
                        }
                    });
                match answer {
                    Ok(answer) => {
                        if let Some(p) = live.params.as_mut() {
                            p.answer = Some(answer);
                        }
                        Some(CallInput::Answered(status))
                    }
                    Err(reason) => {
                        tracing::warn!(call = self.id, %reason, "the phone's answer cannot be used");
                        Some(CallInput::AnswerUnusable(status))
                    }
                }
            }
            SipEvent::RemoteBye => Some(CallInput::RemoteBye),
            SipEvent::Failed(reason) => {
                tracing::info!(call = self.id, %reason, "signalling failed");
                Some(CallInput::SignallingFailed)
            }
        }
    }

    async fn perform(&self, live: &mut Live, actions: Vec<CallAction>) {
        for action in actions {
            match action {
                CallAction::SendCancel => match &live.dialog_id {
                    Some(id) => {
                        if let Err(e) = self.agent.cancel(id).await {
                            tracing::debug!(call = self.id, error = %e, "CANCEL not sent");
                        }
                    }
                    None => tracing::debug!(call = self.id, "nothing to cancel yet"),
                },
                CallAction::SendBye => {
                    if let Some(dialog) = live.dialog.take()
                        && let Err(e) = self.agent.bye(&dialog).await
                    {
                        tracing::info!(call = self.id, error = %e, "BYE failed");
                    }
                }
                CallAction::JoinRoom => {
                    if let Err(e) = self.join_room(live).await {
                        tracing::warn!(call = self.id, error = %e, "the phone could not join the room");
                        let more = live
                            .machine
                            .step(live.epoch.elapsed(), CallInput::LocalFailure);
                        Box::pin(self.perform(live, more)).await;
                    }
                }
                CallAction::LeaveRoom => {
                    if let Some(phone) = live.phone.take() {
                        let _ = self.calls.inner.rooms.leave(&self.room, phone).await;
                    }
                    if live.muted_owner {
                        live.muted_owner = false;
                        let _ = self
                            .calls
                            .inner
                            .rooms
                            .set_muted(&self.room, self.owner, false)
                            .await;
                    }
                }
                CallAction::Publish(state) => self.publish(live, state),
            }
        }
    }

    async fn join_room(&self, live: &mut Live) -> Result<(), TelephonyError> {
        let leg = live
            .leg
            .take()
            .ok_or_else(|| TelephonyError::Socket("the RTP socket is gone".to_owned()))?;
        let params = live
            .params
            .clone()
            .ok_or_else(|| TelephonyError::Sip("no negotiated media".to_owned()))?;
        let remote = params
            .answer
            .as_ref()
            .map(|a| a.remote)
            .ok_or_else(|| TelephonyError::Sip("no answer".to_owned()))?;
        let route = leg.route(remote).await?;
        let events = live.leg_events.clone();
        let metrics = self.calls.inner.metrics.clone();
        let codec = params.answer.as_ref().map(|a| a.codec.name());
        let encrypted = params
            .answer
            .as_ref()
            .is_some_and(|a| a.remote_key.is_some());
        let identity = format!("{} (phone)", self.identity);
        let phone = self
            .calls
            .inner
            .rooms
            .join_transport(&self.room, &identity, move |sink| {
                leg.connect(params, route, sink, events, metrics)
                    .map(|t| Box::new(t) as Box<dyn crate::room::transport::Transport>)
                    .map_err(|e| {
                        crate::room::JoinError::Endpoint(
                            crate::endpoint::EndpointError::Negotiation(e.to_string()),
                        )
                    })
            })
            .await
            .map_err(|e| TelephonyError::Sip(format!("joining the room: {e}")))?;
        live.phone = Some(phone);
        if self.audio == AudioMode::Replace
            && self
                .calls
                .inner
                .rooms
                .set_muted(&self.room, self.owner, true)
                .await
                .is_ok()
        {
            live.muted_owner = true;
        }
        self.info.send_modify(|i| {
            i.phone_participant_id = Some(phone);
            i.codec = codec;
            i.encrypted = encrypted;
        });
        Ok(())
    }

    fn publish(&self, live: &Live, state: CallState) {
        let end_reason = live.machine.end_reason();
        let sip_status = live.machine.sip_status();
        if state == CallState::Ended {
            let outcome = end_reason.map_or("failed", EndReason::label);
            self.calls
                .inner
                .metrics
                .calls
                .with_label_values(&[outcome])
                .inc();
            tracing::info!(call = self.id, outcome, sip_status, "phone call ended");
        } else {
            tracing::info!(call = self.id, state = ?state, "phone call");
        }
        self.info.send_modify(|i| {
            i.state = state;
            i.sip_status = sip_status;
            i.end_reason = end_reason;
            if state == CallState::Ended {
                i.phone_participant_id = None;
            }
            i.events.push(CallTransition {
                state,
                at_ms: unix_ms(),
                sip_status,
                end_reason,
            });
        });
    }
}

async fn recv_sip(events: Option<&mut mpsc::UnboundedReceiver<SipEvent>>) -> Option<SipEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}
