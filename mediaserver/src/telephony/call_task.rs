//! One phone call's task: the pure [`CallMachine`] run against the SIP agent, the phone leg and
//! the room the phone joins, wherever that room is.
//!
//! A call's life here:
//! 1. the routing lookup ([`SipAgent::query_bindings`]): the first binding is dialled, or the
//!    address of record through the proxy when the line may not query or nothing is bound;
//! 2. an RTP socket and the SDP offer (SRTP keys only when signalling is TLS);
//! 3. the INVITE; SIP events, hang-up requests, leg events and a 250 ms tick feed the machine;
//! 4. its actions run here: CANCEL, BYE, the phone joining the room (only on 200 OK with a usable
//!    answer) and leaving it, and each transition published on the call's `watch`.
//!
//! The room side is a [`CallRoom`]: on a media server the phone is a member of a local room
//! ([`crate::telephony::calls`]); on an edge bridge it joins a remote room as a WebRTC
//! participant ([`crate::telephony::edge`]). Everything else is the same code, so both
//! placements behave alike.
//!
//! Invariants: the phone joins only on an answer with usable media and leaves exactly once; a
//! 200 OK that races our CANCEL gets its BYE; the task ends only when the machine has ended.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsipstack::dialog::DialogId;
use rsipstack::dialog::invite_dialog::InviteDialog;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::call::{CallAction, CallInput, CallMachine, CallState, CallTimeouts, EndReason};
use super::calls::{CallInfo, CallTransition, RoutingInfo, RoutingMethod, unix_ms};
use super::leg::{LegEvent, LegParams, PhoneLeg};
use super::media::sdp::{OfferParams, build_offer, parse_answer};
use super::media::srtp::SdesKey;
use super::metrics::TelephonyMetrics;
use super::sip::{Routing, SipAgent, SipEvent};
use super::{TelephonyError, TelephonySettings};
use crate::room::core::ParticipantId;

/// How long the routing lookup may take before the call goes through the proxy instead.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);
/// How often a call checks its timers and its owner.
const CALL_TICK: Duration = Duration::from_millis(250);

/// Where an answered phone goes: the room side of a call.
pub trait CallRoom: Send + Sync + 'static {
    /// A leg for the offer: an RTP address the phone will send to.
    fn new_leg(&self) -> impl Future<Output = Result<PhoneLeg, TelephonyError>> + Send;
    /// Whether the participant who asked for the call is still there (checked every tick; the
    /// call is hung up when not).
    fn owner_present(&self) -> bool;
    /// Put the answered phone into the room, its media through `leg` as `params` negotiated;
    /// returns its participant id there.
    fn join(
        &self,
        leg: PhoneLeg,
        params: LegParams,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> impl Future<Output = Result<ParticipantId, TelephonyError>> + Send;
    /// Take the phone out of the room again.
    fn leave(&self, phone: ParticipantId) -> impl Future<Output = ()> + Send;
}

/// Everything one call's task needs.
#[derive(Debug)]
pub struct CallTask<R> {
    /// The SIP agent the call is placed through.
    pub agent: SipAgent,
    /// The settings in force when the call was placed.
    pub settings: Arc<TelephonySettings>,
    /// The call's id (on the server that owns the call).
    pub id: u64,
    /// The checked user part to dial.
    pub target: String,
    /// The call's timers.
    pub timeouts: CallTimeouts,
    /// Cancelled to hang up (CANCEL while ringing, BYE when active).
    pub hangup: CancellationToken,
    /// Cancelled when the conference is gone (edge placement): the call ends as
    /// [`EndReason::ConferenceLost`].
    pub lost: CancellationToken,
    /// Where the call's state is published.
    pub info: watch::Sender<CallInfo>,
    /// Telephony metrics.
    pub metrics: TelephonyMetrics,
    /// The room side.
    pub room: R,
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
    ringing_since: Option<Instant>,
    lost_seen: bool,
    leg_events: mpsc::UnboundedSender<LegEvent>,
}

impl<R: CallRoom> CallTask<R> {
    /// Run the call to its end.
    pub async fn run(self) {
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
            ringing_since: None,
            lost_seen: false,
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
                () = self.lost.cancelled(), if !live.lost_seen => {
                    live.lost_seen = true;
                    Some(CallInput::ConferenceLost)
                }
                Some(event) = leg_rx.recv() => match event {
                    LegEvent::Media => Some(CallInput::Media),
                    LegEvent::Dtmf(_) => {
                        self.metrics.dtmf_events.inc();
                        None
                    }
                },
                _ = tick.tick() => {
                    // The owner left (or its room closed): the phone goes too, ringing or not.
                    if !self.hangup.is_cancelled() && !self.room.owner_present()
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
    }

    /// Routing lookup, RTP socket, offer, INVITE.
    async fn dial(
        &self,
        live: &mut Live,
    ) -> Result<mpsc::UnboundedReceiver<SipEvent>, TelephonyError> {
        let s = &self.settings;
        let line = s.line()?;
        let routing = match tokio::time::timeout(
            LOOKUP_TIMEOUT,
            self.agent.query_bindings(&s.manager, &self.target, line),
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
                        method: RoutingMethod::Binding,
                        contact: Some(contact),
                        query_status: None,
                    },
                )
            }
            Routing::Bindings(contacts) => (
                s.manager.aor(&self.target)?,
                RoutingInfo {
                    method: RoutingMethod::Proxy,
                    contact: contacts.first().cloned(),
                    query_status: Some(200),
                },
            ),
            Routing::ProxyLookup(status) => (
                s.manager.aor(&self.target)?,
                RoutingInfo {
                    method: RoutingMethod::Proxy,
                    contact: None,
                    query_status: *status,
                },
            ),
        };
        let direct = info.method == RoutingMethod::Binding;
        self.info.send_modify(|i| i.routing = Some(info));
        let leg = self.room.new_leg().await?;
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
            line,
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
        let metrics = &self.metrics;
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
                        self.room.leave(phone).await;
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
        let codec = params.answer.as_ref().map(|a| a.codec.name().to_owned());
        let encrypted = params
            .answer
            .as_ref()
            .is_some_and(|a| a.remote_key.is_some());
        let phone = self.room.join(leg, params, live.leg_events.clone()).await?;
        live.phone = Some(phone);
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
            self.metrics.calls.with_label_values(&[outcome]).inc();
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
