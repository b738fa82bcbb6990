//! The calls of one server: who may call what, and who places each call.
//!
//! In server mode each call is a [`CallTask`] here: this server dials through its SIP agent and
//! the phone joins the local room through [`ServerRoom`]. In edge mode the call is handed to a
//! connected edge bridge ([`crate::telephony::edge::hub`]), which dials from inside the
//! enterprise network and reports every transition back; the call resource, its events and the
//! limits are the same either way.
//!
//! Invariants:
//! - one phone per participant, `maxCallsPerIdentity` per identity, `maxConcurrentCalls` per
//!   server, all checked and reserved under one lock before anything is dialled;
//! - the owner leaving (or its room closing) hangs its phone up, and so does
//!   [`Calls::shutdown`], which waits for every BYE/CANCEL before the SIP transport stops;
//! - a call's record stays readable for [`ENDED_RETENTION`] after it ends, then is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_crds::TelephonyMode;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::call::{CallState, EndReason};
use super::call_task::{CallRoom, CallTask};
use super::edge::hub::{EdgeHub, EdgeRelay};
use super::edge::protocol::CallReport;
use super::leg::{LegEvent, LegParams, PhoneLeg};
use super::metrics::TelephonyMetrics;
use super::sip::SipAgent;
use super::{TelephonyError, TelephonySettings, target_hash};
use crate::room::Rooms;
use crate::room::core::ParticipantId;

/// How long an ended call stays readable.
pub const ENDED_RETENTION: Duration = Duration::from_secs(300);
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// How a phone was reached.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMethod {
    /// The call manager's registration binding was dialled.
    Binding,
    /// The address of record went through the proxy's location lookup.
    Proxy,
}

/// How the phone was found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingInfo {
    /// How it was reached.
    pub method: RoutingMethod,
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
    pub codec: Option<String>,
    /// Who placed the call: `server` (this media server dialled) or `edge` (an edge bridge).
    pub placement: TelephonyMode,
    /// Whether the phone's media is SRTP.
    pub encrypted: bool,
    /// The phone's participant id in the room, while active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_participant_id: Option<ParticipantId>,
    /// Every transition so far, in order.
    pub events: Vec<CallTransition>,
}

impl CallInfo {
    /// A call as it starts: `dialing`, one transition.
    pub fn starting(
        id: u64,
        room: &str,
        participant_id: ParticipantId,
        to: &str,
        placement: TelephonyMode,
    ) -> Self {
        Self {
            id,
            room: room.to_owned(),
            participant_id,
            to: to.to_owned(),
            state: CallState::Dialing,
            end_reason: None,
            sip_status: None,
            routing: None,
            codec: None,
            placement,
            encrypted: false,
            phone_participant_id: None,
            events: vec![CallTransition {
                state: CallState::Dialing,
                at_ms: unix_ms(),
                sip_status: None,
                end_reason: None,
            }],
        }
    }

    /// End the call here with `reason` (and the SIP status that decided it, if any).
    pub fn end(&mut self, reason: EndReason, sip_status: Option<u16>) {
        self.state = CallState::Ended;
        self.end_reason = Some(reason);
        if sip_status.is_some() {
            self.sip_status = sip_status;
        }
        self.phone_participant_id = None;
        self.events.push(CallTransition {
            state: CallState::Ended,
            at_ms: unix_ms(),
            sip_status: self.sip_status,
            end_reason: Some(reason),
        });
    }
}

struct CallEntry {
    room: String,
    owner: ParticipantId,
    identity: String,
    info: watch::Sender<CallInfo>,
    /// Edge placement: the bridge carrying the call and where its reports go.
    edge: Option<(u64, mpsc::UnboundedSender<CallReport>)>,
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
    /// The edge bridges connected to this server (used in edge mode).
    edge: EdgeHub,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("enabled", &self.settings().is_some())
            .finish_non_exhaustive()
    }
}

/// Now, in milliseconds since the Unix epoch (transition stamps).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Calls {
    /// Calls placed through `agent` with `settings`, or handed to the bridges of `edge` when the
    /// settings say edge mode; `None` settings when the conference has no telephony (every
    /// request is then refused with [`TelephonyError::Disabled`]). `sip_stop` stops the agent's
    /// transport; [`Calls::shutdown`] cancels it last.
    pub fn new(
        settings: Option<TelephonySettings>,
        agent: Option<SipAgent>,
        rooms: Arc<Rooms>,
        metrics: TelephonyMetrics,
        sip_stop: CancellationToken,
        edge: EdgeHub,
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
                edge,
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

    /// The edge bridges connected to this server.
    pub fn edge(&self) -> &EdgeHub {
        &self.inner.edge
    }

    /// The rooms the phones join.
    pub(crate) fn rooms(&self) -> &Arc<Rooms> {
        &self.inner.rooms
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
        let Some(settings) = self.settings() else {
            return Err(refused(TelephonyError::Disabled));
        };
        let agent = match settings.mode {
            TelephonyMode::Server => match &self.inner.agent {
                Some(agent) => Some(agent.clone()),
                None => return Err(refused(TelephonyError::Disabled)),
            },
            TelephonyMode::Edge => None,
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
        let info = CallInfo::starting(id, room, request.participant_id, &target, settings.mode);
        let (info_tx, _) = watch::channel(info.clone());
        let hangup = CancellationToken::new();
        let mut timeouts = settings.timeouts;
        if let Some(ring) = request.ring_timeout_seconds {
            timeouts.ring = timeouts
                .ring
                .min(Duration::from_secs(u64::from(ring.max(1))));
        }
        let (task, edge) = match agent {
            Some(agent) => {
                let task = CallTask {
                    agent,
                    settings: settings.clone(),
                    id,
                    target: target.clone(),
                    timeouts,
                    hangup: hangup.clone(),
                    lost: CancellationToken::new(),
                    info: info_tx.clone(),
                    metrics: self.inner.metrics.clone(),
                    room: ServerRoom {
                        rooms: self.inner.rooms.clone(),
                        room: room.to_owned(),
                        owner: request.participant_id,
                        identity: identity.to_owned(),
                        audio: request.audio,
                        metrics: self.inner.metrics.clone(),
                        muted_owner: AtomicBool::new(false),
                    },
                };
                let calls = self.clone();
                let task = tokio::spawn(async move {
                    task.run().await;
                    calls.ended(id);
                });
                (task, None)
            }
            None => {
                // Edge mode: a connected bridge dials; none connected is a clear refusal.
                let Some(bridge) = self.inner.edge.pick() else {
                    return Err(refused(TelephonyError::NoEdgeBridge));
                };
                let (reports, reports_rx) = mpsc::unbounded_channel();
                let bridge_id = bridge.id;
                let relay = EdgeRelay {
                    calls: self.clone(),
                    id,
                    room: room.to_owned(),
                    owner: request.participant_id,
                    identity: identity.to_owned(),
                    target: target.clone(),
                    audio: request.audio,
                    timeouts,
                    bridge,
                    hangup: hangup.clone(),
                    info: info_tx.clone(),
                    reports: reports_rx,
                };
                (tokio::spawn(relay.run()), Some((bridge_id, reports)))
            }
        };
        tracing::info!(call = id, room, target = %target_hash(&target), placement = ?settings.mode, "placing a phone call");
        self.inner.metrics.active_calls.inc();
        calls.insert(
            id,
            CallEntry {
                room: room.to_owned(),
                owner: request.participant_id,
                identity: identity.to_owned(),
                info: info_tx,
                edge,
                hangup,
                ended_at: None,
                task: Some(task),
            },
        );
        Ok(info)
    }

    /// A report from edge bridge `bridge` about call `id`: passed to the call's relay. Only the
    /// bridge the call was handed to may report on it.
    pub fn edge_report(
        &self,
        bridge: u64,
        id: u64,
        report: CallReport,
    ) -> Result<(), TelephonyError> {
        let calls = self.lock();
        let (holder, reports) = calls
            .get(&id)
            .and_then(|c| c.edge.as_ref())
            .ok_or(TelephonyError::NoSuchCall)?;
        if *holder != bridge {
            return Err(TelephonyError::NoSuchCall);
        }
        reports.send(report).map_err(|_| TelephonyError::NoSuchCall)
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

    /// Call `id` is over: its record is kept for [`ENDED_RETENTION`].
    pub(crate) fn ended(&self, id: u64) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.ended_at = Some(Instant::now());
            c.task = None;
        }
        self.inner.metrics.active_calls.dec();
    }
}

/// The room side of a call this server dials: the phone is a member of a local room, beside the
/// participant who asked for it.
#[derive(Debug)]
pub struct ServerRoom {
    rooms: Arc<Rooms>,
    room: String,
    owner: ParticipantId,
    identity: String,
    audio: AudioMode,
    metrics: TelephonyMetrics,
    /// Whether the owner's web stream was muted for the phone (and must be unmuted).
    muted_owner: AtomicBool,
}

impl CallRoom for ServerRoom {
    async fn new_leg(&self) -> Result<PhoneLeg, TelephonyError> {
        Ok(PhoneLeg::on_port(self.rooms.media_port()))
    }

    fn owner_present(&self) -> bool {
        self.rooms.is_member(&self.room, self.owner)
    }

    async fn join(
        &self,
        leg: PhoneLeg,
        params: LegParams,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> Result<ParticipantId, TelephonyError> {
        let remote = params
            .answer
            .as_ref()
            .map(|a| a.remote)
            .ok_or_else(|| TelephonyError::Sip("no answer".to_owned()))?;
        let route = leg.route(remote).await?;
        let metrics = self.metrics.clone();
        let identity = format!("{} (phone)", self.identity);
        let phone = self
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
        if self.audio == AudioMode::Replace
            && self
                .rooms
                .set_muted(&self.room, self.owner, true)
                .await
                .is_ok()
        {
            self.muted_owner.store(true, Ordering::Relaxed);
        }
        Ok(phone)
    }

    async fn leave(&self, phone: ParticipantId) {
        let _ = self.rooms.leave(&self.room, phone).await;
        if self.muted_owner.swap(false, Ordering::Relaxed) {
            let _ = self.rooms.set_muted(&self.room, self.owner, false).await;
        }
    }
}
