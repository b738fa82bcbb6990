//! The call state machine: one phone call, from the INVITE to its end, as a pure function of
//! SIP events, media arrival and time.
//!
//! The shell (`calls.rs`) feeds it what happened ([`CallInput`]) with the time, and carries out
//! what it asks ([`CallAction`]): send CANCEL or BYE, put the phone into the room or take it out,
//! publish a transition. Nothing here touches a socket or a clock, so every path (ring timeout,
//! a 200 OK racing a CANCEL, a silent phone) is tested in virtual time.
//!
//! Invariants:
//! - states only move forward: `dialing → ringing → active → ended` (ringing may be skipped);
//! - the phone joins the room only on an answer with usable media, and leaves exactly once;
//! - every call ends exactly once, with one [`EndReason`] and the SIP status that decided it;
//! - a call we cancelled ends when the phone confirms (its 487) or, at the latest,
//!   [`CANCEL_GUARD`] later, so no call stays "ringing" because a phone never answered the CANCEL.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long to wait for the final response after sending CANCEL before ending the call anyway.
pub const CANCEL_GUARD: Duration = Duration::from_secs(5);

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// INVITE sent, nothing from the phone yet.
    Dialing,
    /// The phone rings (180/183).
    Ringing,
    /// Answered: the phone is in the room.
    Active,
    /// Over; see the end reason.
    Ended,
}

/// Why a call ended. `completed` is the phone hanging up an answered call; `hangup` is this side
/// ending it (the web user, the participant leaving, the room closing, server shutdown, or the
/// maximum call length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The phone hung up.
    Completed,
    /// This side hung up an answered call.
    Hangup,
    /// This side cancelled the call before it was answered.
    Cancelled,
    /// The phone rang for the whole ring timeout.
    NoAnswer,
    /// 486 or 600.
    Busy,
    /// 603.
    Declined,
    /// The call manager has no binding for the target (404/604).
    NotRegistered,
    /// No response, or 408/480/503 and transport failures.
    Unreachable,
    /// The call manager refused our credentials (401/407/403 after answering the challenge).
    AuthFailed,
    /// No codec in common (488/415/606, or an answer we cannot use).
    CodecMismatch,
    /// An answered phone sent no media for the media timeout.
    MediaTimeout,
    /// Any other final response.
    Rejected,
    /// Something on this side failed (no socket, no room).
    Failed,
    /// Edge placement: the bridge lost its connection to the conference (the server went away
    /// or the network broke), so it hung the phone up.
    ConferenceLost,
    /// Edge placement, as the server sees it: the bridge carrying the call disconnected.
    EdgeLost,
}

impl EndReason {
    /// A static label for metrics (the serialized name).
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::Hangup => "hangup",
            EndReason::Cancelled => "cancelled",
            EndReason::NoAnswer => "no_answer",
            EndReason::Busy => "busy",
            EndReason::Declined => "declined",
            EndReason::NotRegistered => "not_registered",
            EndReason::Unreachable => "unreachable",
            EndReason::AuthFailed => "auth_failed",
            EndReason::CodecMismatch => "codec_mismatch",
            EndReason::MediaTimeout => "media_timeout",
            EndReason::Rejected => "rejected",
            EndReason::Failed => "failed",
            EndReason::ConferenceLost => "conference_lost",
            EndReason::EdgeLost => "edge_lost",
        }
    }

    /// The reason a final non-2xx response means, when nobody cancelled.
    pub fn from_status(status: u16) -> EndReason {
        match status {
            486 | 600 => EndReason::Busy,
            603 => EndReason::Declined,
            404 | 604 => EndReason::NotRegistered,
            408 | 480 | 503 => EndReason::Unreachable,
            401 | 403 | 407 => EndReason::AuthFailed,
            415 | 488 | 606 => EndReason::CodecMismatch,
            487 => EndReason::Cancelled,
            _ => EndReason::Rejected,
        }
    }
}

/// The call's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimeouts {
    /// From the INVITE to an answer; then CANCEL and `no_answer`.
    pub ring: Duration,
    /// An answered phone silent this long ends the call (`media_timeout`).
    pub media: Duration,
    /// The longest call.
    pub max_call: Duration,
}

/// Something that happened to the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallInput {
    /// A provisional response (100 is ignored; 180/183 mean ringing).
    Provisional(u16),
    /// A 2xx whose SDP answer the leg can use.
    Answered(u16),
    /// A 2xx whose SDP answer the leg cannot use (no common codec, no key where SRTP is required).
    AnswerUnusable(u16),
    /// A final non-2xx response.
    Final(u16),
    /// The phone sent BYE.
    RemoteBye,
    /// This side wants the call over, with the reason to report when it was answered
    /// ([`EndReason::Hangup`]) or not ([`EndReason::Cancelled`] is used then).
    Hangup,
    /// Media arrived from the answered phone.
    Media,
    /// Signalling failed without a response (transport error, transaction timeout).
    SignallingFailed,
    /// A local failure (the room refused the phone, no RTP socket).
    LocalFailure,
    /// The conference the phone was bridged to is gone (edge placement): hang up or cancel, and
    /// end as [`EndReason::ConferenceLost`].
    ConferenceLost,
    /// Time passed.
    Tick,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallAction {
    /// Send CANCEL for the pending INVITE.
    SendCancel,
    /// Send BYE in the dialog.
    SendBye,
    /// Put the phone into the room.
    JoinRoom,
    /// Take the phone out of the room.
    LeaveRoom,
    /// The state changed: publish it (an event on the call's stream).
    Publish(CallState),
}

/// One call's state.
#[derive(Debug, Clone)]
pub struct CallMachine {
    state: CallState,
    timeouts: CallTimeouts,
    started: Duration,
    answered_at: Option<Duration>,
    last_media: Duration,
    /// Set once a CANCEL is sent: when, and the reason to end with.
    cancelling: Option<(Duration, EndReason)>,
    end_reason: Option<EndReason>,
    sip_status: Option<u16>,
    in_room: bool,
}

impl CallMachine {
    /// A call whose INVITE goes out at `now`.
    pub fn new(now: Duration, timeouts: CallTimeouts) -> Self {
        Self {
            state: CallState::Dialing,
            timeouts,
            started: now,
            answered_at: None,
            last_media: now,
            cancelling: None,
            end_reason: None,
            sip_status: None,
            in_room: false,
        }
    }

    /// The state now.
    pub fn state(&self) -> CallState {
        self.state
    }

    /// Why it ended, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.end_reason
    }

    /// The last final SIP status seen (or the provisional one while ringing).
    pub fn sip_status(&self) -> Option<u16> {
        self.sip_status
    }

    /// When the phone answered.
    pub fn answered_at(&self) -> Option<Duration> {
        self.answered_at
    }

    /// The next time [`CallInput::Tick`] can change anything.
    pub fn next_deadline(&self) -> Option<Duration> {
        match self.state {
            CallState::Ended => None,
            CallState::Dialing | CallState::Ringing => Some(match self.cancelling {
                Some((at, _)) => at + CANCEL_GUARD,
                None => self.started + self.timeouts.ring,
            }),
            CallState::Active => {
                let answered = self.answered_at.unwrap_or(self.started);
                Some((self.last_media + self.timeouts.media).min(answered + self.timeouts.max_call))
            }
        }
    }

    /// Feed one input at `now`; returns what to do, in order.
    pub fn step(&mut self, now: Duration, input: CallInput) -> Vec<CallAction> {
        let mut actions = Vec::new();
        if self.state == CallState::Ended {
            // A late response to a finished call (a 200 racing our CANCEL that arrived after the
            // guard) still must not leave a dialog open on the phone.
            if let CallInput::Answered(_) | CallInput::AnswerUnusable(_) = input {
                actions.push(CallAction::SendBye);
            }
            return actions;
        }
        match input {
            CallInput::Provisional(status) => {
                if matches!(status, 180 | 183) && self.state == CallState::Dialing {
                    self.sip_status = Some(status);
                    self.move_to(CallState::Ringing, &mut actions);
                }
            }
            CallInput::Answered(status) => {
                self.sip_status = Some(status);
                if self.state == CallState::Active {
                    return actions;
                }
                if let Some((_, reason)) = self.cancelling {
                    // The phone answered while our CANCEL was on its way: hang up at once.
                    actions.push(CallAction::SendBye);
                    self.end(reason, &mut actions);
                    return actions;
                }
                self.answered_at = Some(now);
                self.last_media = now;
                self.in_room = true;
                actions.push(CallAction::JoinRoom);
                self.move_to(CallState::Active, &mut actions);
            }
            CallInput::AnswerUnusable(status) => {
                self.sip_status = Some(status);
                actions.push(CallAction::SendBye);
                let reason = self.cancelling.map_or(EndReason::CodecMismatch, |(_, r)| r);
                self.end(reason, &mut actions);
            }
            CallInput::Final(status) => {
                self.sip_status = Some(status);
                let reason = match self.cancelling {
                    Some((_, reason)) => reason,
                    None => EndReason::from_status(status),
                };
                self.end(reason, &mut actions);
            }
            CallInput::RemoteBye => {
                if self.state == CallState::Active {
                    self.end(EndReason::Completed, &mut actions);
                }
            }
            CallInput::Hangup => match self.state {
                CallState::Active => {
                    actions.push(CallAction::SendBye);
                    self.end(EndReason::Hangup, &mut actions);
                }
                CallState::Dialing | CallState::Ringing => {
                    self.cancel(now, EndReason::Cancelled, &mut actions);
                }
                CallState::Ended => {}
            },
            CallInput::ConferenceLost => match self.state {
                CallState::Active => {
                    actions.push(CallAction::SendBye);
                    self.end(EndReason::ConferenceLost, &mut actions);
                }
                CallState::Dialing | CallState::Ringing => match self.cancelling {
                    // Already cancelling: the phone's 487 (or the guard) ends it, now as lost.
                    Some((at, _)) => self.cancelling = Some((at, EndReason::ConferenceLost)),
                    None => self.cancel(now, EndReason::ConferenceLost, &mut actions),
                },
                CallState::Ended => {}
            },
            CallInput::Media => {
                if self.state == CallState::Active {
                    self.last_media = now;
                }
            }
            CallInput::SignallingFailed => {
                if self.state == CallState::Active {
                    // An answered call whose signalling broke: its media may still flow, but
                    // nobody can hang it up properly any more.
                    actions.push(CallAction::SendBye);
                }
                let reason = self.cancelling.map_or(EndReason::Unreachable, |(_, r)| r);
                self.end(reason, &mut actions);
            }
            CallInput::LocalFailure => {
                match self.state {
                    CallState::Active => actions.push(CallAction::SendBye),
                    CallState::Dialing | CallState::Ringing if self.cancelling.is_none() => {
                        actions.push(CallAction::SendCancel)
                    }
                    _ => {}
                }
                self.end(EndReason::Failed, &mut actions);
            }
            CallInput::Tick => self.on_tick(now, &mut actions),
        }
        actions
    }

    fn on_tick(&mut self, now: Duration, actions: &mut Vec<CallAction>) {
        match self.state {
            CallState::Dialing | CallState::Ringing => match self.cancelling {
                Some((at, reason)) => {
                    if now >= at + CANCEL_GUARD {
                        self.end(reason, actions);
                    }
                }
                None => {
                    if now >= self.started + self.timeouts.ring {
                        self.cancel(now, EndReason::NoAnswer, actions);
                    }
                }
            },
            CallState::Active => {
                let answered = self.answered_at.unwrap_or(self.started);
                if now >= self.last_media + self.timeouts.media {
                    actions.push(CallAction::SendBye);
                    self.end(EndReason::MediaTimeout, actions);
                } else if now >= answered + self.timeouts.max_call {
                    actions.push(CallAction::SendBye);
                    self.end(EndReason::Hangup, actions);
                }
            }
            CallState::Ended => {}
        }
    }

    fn cancel(&mut self, now: Duration, reason: EndReason, actions: &mut Vec<CallAction>) {
        if self.cancelling.is_none() {
            self.cancelling = Some((now, reason));
            actions.push(CallAction::SendCancel);
        }
    }

    fn move_to(&mut self, state: CallState, actions: &mut Vec<CallAction>) {
        if self.state != state {
            self.state = state;
            actions.push(CallAction::Publish(state));
        }
    }

    fn end(&mut self, reason: EndReason, actions: &mut Vec<CallAction>) {
        if self.in_room {
            self.in_room = false;
            actions.push(CallAction::LeaveRoom);
        }
        self.end_reason = Some(reason);
        self.move_to(CallState::Ended, actions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: CallTimeouts = CallTimeouts {
        ring: Duration::from_secs(30),
        media: Duration::from_secs(10),
        max_call: Duration::from_secs(3600),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn answered_call_joins_the_room_and_the_phone_hangs_up() {
        let mut m = CallMachine::new(ms(0), T);
        assert_eq!(m.step(ms(10), CallInput::Provisional(100)), vec![]);
        assert_eq!(
            m.step(ms(50), CallInput::Provisional(180)),
            vec![CallAction::Publish(CallState::Ringing)]
        );
        // A second 180 (or a 183 after it) changes nothing.
        assert_eq!(m.step(ms(60), CallInput::Provisional(183)), vec![]);
        assert_eq!(
            m.step(ms(900), CallInput::Answered(200)),
            vec![CallAction::JoinRoom, CallAction::Publish(CallState::Active)]
        );
        assert_eq!(m.answered_at(), Some(ms(900)));
        assert_eq!(
            m.step(ms(5000), CallInput::RemoteBye),
            vec![CallAction::LeaveRoom, CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::Completed));
        assert_eq!(m.sip_status(), Some(200));
        // Nothing moves an ended call.
        assert_eq!(m.step(ms(6000), CallInput::Hangup), vec![]);
        assert_eq!(m.step(ms(6000), CallInput::Tick), vec![]);
    }

    #[test]
    fn final_responses_map_to_reasons() {
        for (status, reason) in [
            (486, EndReason::Busy),
            (600, EndReason::Busy),
            (603, EndReason::Declined),
            (404, EndReason::NotRegistered),
            (408, EndReason::Unreachable),
            (407, EndReason::AuthFailed),
            (401, EndReason::AuthFailed),
            (488, EndReason::CodecMismatch),
            (500, EndReason::Rejected),
        ] {
            let mut m = CallMachine::new(ms(0), T);
            let actions = m.step(ms(100), CallInput::Final(status));
            assert_eq!(actions, vec![CallAction::Publish(CallState::Ended)]);
            assert_eq!(m.end_reason(), Some(reason), "status {status}");
            assert_eq!(m.sip_status(), Some(status));
        }
    }

    #[test]
    fn ring_timeout_cancels_and_ends_as_no_answer_on_487() {
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(100), CallInput::Provisional(180));
        assert_eq!(m.next_deadline(), Some(T.ring));
        assert_eq!(m.step(T.ring - ms(1), CallInput::Tick), vec![]);
        assert_eq!(
            m.step(T.ring, CallInput::Tick),
            vec![CallAction::SendCancel]
        );
        // Only one CANCEL, however often time passes.
        assert_eq!(m.step(T.ring + ms(100), CallInput::Tick), vec![]);
        assert_eq!(m.state(), CallState::Ringing);
        assert_eq!(
            m.step(T.ring + ms(200), CallInput::Final(487)),
            vec![CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::NoAnswer));
        assert_eq!(m.sip_status(), Some(487));
    }

    #[test]
    fn a_cancel_the_phone_never_confirms_ends_after_the_guard() {
        let mut m = CallMachine::new(ms(0), T);
        assert_eq!(
            m.step(ms(1000), CallInput::Hangup),
            vec![CallAction::SendCancel]
        );
        assert_eq!(m.next_deadline(), Some(ms(1000) + CANCEL_GUARD));
        assert_eq!(
            m.step(ms(1000) + CANCEL_GUARD, CallInput::Tick),
            vec![CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::Cancelled));
    }

    #[test]
    fn an_answer_racing_our_cancel_is_hung_up_and_never_joins() {
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(100), CallInput::Provisional(180));
        m.step(ms(2000), CallInput::Hangup);
        let actions = m.step(ms(2010), CallInput::Answered(200));
        assert_eq!(
            actions,
            vec![CallAction::SendBye, CallAction::Publish(CallState::Ended)]
        );
        assert!(!actions.contains(&CallAction::JoinRoom));
        assert_eq!(m.end_reason(), Some(EndReason::Cancelled));
        // An answer arriving even later still gets its BYE.
        assert_eq!(
            m.step(ms(9000), CallInput::Answered(200)),
            vec![CallAction::SendBye]
        );
    }

    #[test]
    fn web_hangup_of_an_active_call_sends_bye() {
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(500), CallInput::Answered(200));
        assert_eq!(
            m.step(ms(3000), CallInput::Hangup),
            vec![
                CallAction::SendBye,
                CallAction::LeaveRoom,
                CallAction::Publish(CallState::Ended)
            ]
        );
        assert_eq!(m.end_reason(), Some(EndReason::Hangup));
    }

    #[test]
    fn a_silent_phone_times_out_but_a_talking_one_does_not() {
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(500), CallInput::Answered(200));
        // Media every 20 ms for 30 s keeps it up.
        let mut now = ms(500);
        while now < ms(30_000) {
            now += ms(20);
            m.step(now, CallInput::Media);
            assert_eq!(m.step(now, CallInput::Tick), vec![]);
        }
        // Then silence: it ends exactly one media timeout after the last packet.
        assert_eq!(m.next_deadline(), Some(now + T.media));
        assert_eq!(m.step(now + T.media - ms(1), CallInput::Tick), vec![]);
        assert_eq!(
            m.step(now + T.media, CallInput::Tick),
            vec![
                CallAction::SendBye,
                CallAction::LeaveRoom,
                CallAction::Publish(CallState::Ended)
            ]
        );
        assert_eq!(m.end_reason(), Some(EndReason::MediaTimeout));
    }

    #[test]
    fn an_unusable_answer_is_hung_up_as_codec_mismatch() {
        let mut m = CallMachine::new(ms(0), T);
        assert_eq!(
            m.step(ms(700), CallInput::AnswerUnusable(200)),
            vec![CallAction::SendBye, CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::CodecMismatch));
    }

    #[test]
    fn the_longest_call_is_hung_up() {
        let t = CallTimeouts {
            max_call: Duration::from_secs(60),
            ..T
        };
        let mut m = CallMachine::new(ms(0), t);
        m.step(ms(1000), CallInput::Answered(200));
        let mut now = ms(1000);
        let mut ended = false;
        while now < ms(62_000) && !ended {
            now += ms(20);
            m.step(now, CallInput::Media);
            ended = m.step(now, CallInput::Tick).contains(&CallAction::SendBye);
        }
        assert!(ended);
        assert_eq!(now, ms(61_000));
        assert_eq!(m.end_reason(), Some(EndReason::Hangup));
    }

    #[test]
    fn signalling_failure_while_dialing_is_unreachable() {
        let mut m = CallMachine::new(ms(0), T);
        assert_eq!(
            m.step(ms(32_000), CallInput::SignallingFailed),
            vec![CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::Unreachable));
    }

    #[test]
    fn a_lost_conference_cancels_a_ringing_phone_and_hangs_up_an_answered_one() {
        // Ringing: CANCEL, and the phone's 487 ends the call as lost, not as cancelled.
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(50), CallInput::Provisional(180));
        assert_eq!(
            m.step(ms(500), CallInput::ConferenceLost),
            vec![CallAction::SendCancel]
        );
        assert_eq!(
            m.step(ms(600), CallInput::Final(487)),
            vec![CallAction::Publish(CallState::Ended)]
        );
        assert_eq!(m.end_reason(), Some(EndReason::ConferenceLost));

        // A hang-up already cancelling keeps its CANCEL; the reason becomes the loss.
        let mut m = CallMachine::new(ms(0), T);
        assert_eq!(
            m.step(ms(10), CallInput::Hangup),
            vec![CallAction::SendCancel]
        );
        assert_eq!(m.step(ms(20), CallInput::ConferenceLost), vec![]);
        m.step(ms(30), CallInput::Final(487));
        assert_eq!(m.end_reason(), Some(EndReason::ConferenceLost));

        // Answered: BYE, out of the room, ended.
        let mut m = CallMachine::new(ms(0), T);
        m.step(ms(100), CallInput::Answered(200));
        assert_eq!(
            m.step(ms(900), CallInput::ConferenceLost),
            vec![
                CallAction::SendBye,
                CallAction::LeaveRoom,
                CallAction::Publish(CallState::Ended)
            ]
        );
        assert_eq!(m.end_reason(), Some(EndReason::ConferenceLost));
        assert_eq!(EndReason::ConferenceLost.label(), "conference_lost");
        // Nothing more happens to an ended call.
        assert_eq!(m.step(ms(950), CallInput::ConferenceLost), vec![]);
    }
}
