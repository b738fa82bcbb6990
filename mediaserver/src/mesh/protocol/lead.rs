//! The primary's term in a room (DESIGN.md §5, "Global top list", "Mixing").
//!
//! While this server is a room's primary it holds a `Lead`: it takes in the members' local top
//! lists, merges them with its own candidates into the global list and margin, stamps a new
//! epoch when they change, and sends the list to every live member (again every
//! `global_refresh`, and to a member whose acknowledged epoch lags). On the frame grid it counts
//! the ticks at which every member mixes the epoch in force.
//!
//! Each new list is stamped with the tick it takes effect at: now plus the slowest member's
//! one-way delay (half the round trip from sending a list to its acknowledgement) and a guard.
//! Every server switches at that tick; one that got the list late says by how much, and the
//! ticks it mixed the old list count as inconsistent. Ticks are judged once the members'
//! acknowledgements can have arrived (a lead's worth later), so an acknowledgement in flight is
//! not counted as a miss.
//!
//! Invariants: a term starts in a grace period (until every live member has reported, or one
//! rank interval passed), so its first epoch is above every epoch the members reported and a
//! restarted or partitioned old primary never wins with a stale list; within a term the epoch
//! never decreases; a member is sent a repair at most once per rank interval.

use std::collections::BTreeMap;
use std::time::Duration;

use super::rooms::{GlobalList, RemoteList, accept};
use super::top_list::{merge_top_list, sanitize_candidates};
use super::{MeshNodeState, Outgoing, ServerId, StreamKey};
use crate::media::Candidate;
use crate::mesh::error::MeshError;
use crate::mesh::wire::ControlMessage;

/// The level a present but not voice-active candidate enters the merge at: the wire's floor,
/// below every silence threshold.
const SILENT_DBOV: f32 = -127.0;

/// The furthest ahead a list's switch tick is stamped (and accepted): a slower member switches
/// late rather than every server waiting for it.
pub(super) const MAX_SWITCH_LEAD: Duration = Duration::from_millis(150);

/// Added to the slowest member's one-way delay: scheduling slack on both ends.
const SWITCH_GUARD: Duration = Duration::from_millis(3);

/// A member's one-way delay until a round trip has been measured.
const DEFAULT_ONE_WAY: Duration = Duration::from_millis(10);

/// This server's term as the primary of a room.
#[derive(Debug)]
pub(super) struct Lead {
    /// Start of the current grace period.
    since: Duration,
    in_grace: bool,
    /// Emit a new epoch when the grace ends, even if the content is unchanged.
    force_new_epoch: bool,
    /// The epoch last emitted; 0 before the first emission.
    epoch: u64,
    list: Vec<StreamKey>,
    margin: Vec<StreamKey>,
    /// Who speaks on each stream of `list`, in the same order ("" when unknown).
    names: Vec<String>,
    last_broadcast: Duration,
    sent_to: BTreeMap<ServerId, Duration>,
    next_tick: Option<Duration>,
    /// When `epoch` takes effect (this state's time), and on the wall clock (µs).
    switch_at: Duration,
    at_us: u64,
    /// The epoch in force before `switch_at`.
    prev_epoch: u64,
    /// Each member's round trip, list to acknowledgement (smoothed).
    rtt: BTreeMap<ServerId, Duration>,
}

impl Lead {
    pub(super) fn new(now: Duration) -> Self {
        Self {
            since: now,
            in_grace: true,
            force_new_epoch: true,
            epoch: 0,
            list: Vec::new(),
            margin: Vec::new(),
            names: Vec::new(),
            last_broadcast: now,
            sent_to: BTreeMap::new(),
            next_tick: None,
            switch_at: now,
            at_us: 0,
            prev_epoch: 0,
            rtt: BTreeMap::new(),
        }
    }

    /// How far ahead of now a new list is stamped for `members`.
    fn switch_lead(&self, members: &[ServerId]) -> Duration {
        members
            .iter()
            .map(|m| self.rtt.get(m).map_or(DEFAULT_ONE_WAY, |rtt| *rtt / 2))
            .max()
            .map_or(Duration::ZERO, |one_way| {
                (one_way + SWITCH_GUARD).min(MAX_SWITCH_LEAD)
            })
    }

    /// Whether a member whose last list acknowledged `acked` after switching `late` mixes, at
    /// tick `t`, the epoch in force then.
    fn in_step(&self, acked: u64, late: Duration, t: Duration) -> bool {
        if t >= self.switch_at {
            acked == self.epoch && t >= self.switch_at + late
        } else {
            acked == self.prev_epoch || acked == self.epoch
        }
    }

    pub(super) fn enter_grace(&mut self, now: Duration) {
        self.since = now;
        self.in_grace = true;
        self.force_new_epoch = true;
    }
}

impl MeshNodeState {
    /// A member's local top list, to this server as (it believes) the room's primary. The list
    /// also acknowledges the epoch the member mixes: when that lags this server's current term,
    /// the member missed a global list and is sent it again.
    pub(super) fn on_local_top_list(
        &mut self,
        from: &str,
        room: &str,
        (seq, epoch, late): (u64, u64, Duration),
        candidates: Vec<Candidate>,
        now: Duration,
    ) -> Result<(), MeshError> {
        let limit = self.mixing.local_limit();
        let rank_interval = self.mixing.rank_interval;
        self.ensure_room(room)?;
        if let Some(peer) = self.peers.get_mut(from) {
            peer.rooms.insert(room.to_owned());
        }
        let self_id = self.self_id.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return Ok(());
        };
        if r.remote.get(from).is_some_and(|l| seq <= l.seq) {
            return Ok(()); // reordered or duplicate
        }
        let acked_before = r.remote.get(from).map(|l| l.epoch);
        // The first acknowledgement of this term's list measures the member's round trip.
        if let Some(lead) = &mut r.lead
            && lead.epoch > 0
            && epoch == lead.epoch
            && acked_before != Some(epoch)
            && let Some(sent) = lead.sent_to.get(from)
        {
            // Up at once, down slowly: a list stamped too short arrives late everywhere.
            let sample = now.saturating_sub(*sent);
            let rtt = lead.rtt.entry(from.to_owned()).or_insert(sample);
            *rtt = if sample > *rtt {
                sample
            } else {
                (*rtt * 3 + sample) / 4
            };
        }
        r.remote.insert(
            from.to_owned(),
            RemoteList {
                seq,
                received: now,
                epoch,
                candidates: sanitize_candidates(candidates, limit),
                late,
            },
        );
        r.max_epoch_seen = r.max_epoch_seen.max(epoch);
        // Repair: a member that acknowledges an older epoch missed the list. At most once per
        // rank interval: the member's next list, an interval later, is the first that can
        // acknowledge the copy, so resending sooner would only duplicate it.
        if let Some(lead) = &mut r.lead
            && lead.epoch > 0
            && !lead.in_grace
            && epoch != lead.epoch
        {
            let last = lead.sent_to.get(from).copied();
            if last.is_none_or(|t| now.saturating_sub(t) >= rank_interval) {
                lead.sent_to.insert(from.to_owned(), now);
                self.outbox.push(Outgoing {
                    to: from.to_owned(),
                    msg: global_message(room, &self_id, lead),
                });
            }
        }
        Ok(())
    }

    /// One step of this server's term in room `name` at `now` (nothing when it does not lead
    /// the room): once the grace period is over, merge the fresh lists into the global list,
    /// emit a new epoch or a refresh when due, and count the consistency ticks up to `now`.
    pub(super) fn step_primary(&mut self, name: &str, now: Duration) {
        if self.rooms.get(name).is_none_or(|r| r.lead.is_none()) {
            return;
        }
        let members = self.members(name, now);
        let unreachable = self.has_unreachable_member(name, now);
        let ttl = self.list_ttl();
        let mixing = self.mixing;
        let hysteresis = self.config.hysteresis_db;
        let refresh = self.config.global_refresh;
        let self_id = self.self_id.clone();
        let wall_origin_us = self.wall_origin_us;
        let peers = &self.peers;
        let Some(r) = self.rooms.get_mut(name) else {
            return;
        };
        let local_participants = r.local_participants;
        let Some(lead) = r.lead.as_mut() else {
            return;
        };

        if lead.in_grace {
            let since = lead.since;
            let all_reported = members
                .iter()
                .all(|m| r.remote.get(m).is_some_and(|l| l.received >= since));
            if !all_reported && now < since + mixing.rank_interval {
                return;
            }
            lead.in_grace = false;
        }

        let mut candidates: Vec<(StreamKey, f32)> = Vec::new();
        let mut identities: BTreeMap<StreamKey, String> = BTreeMap::new();
        let mut note = |key: &StreamKey, c: &Candidate| {
            if let Some(identity) = &c.identity {
                identities.insert(key.clone(), identity.clone());
            }
        };
        // Voice-active candidates compete at their level. The others are only present: at
        // silence they cannot win a slot, but a listed one among them rests in its slot until a
        // voice needs it (the list does not drop a talker at every pause).
        let level = |c: &Candidate| if c.voice { c.importance } else { SILENT_DBOV };
        if local_participants > 0 {
            for c in &r.local_candidates {
                let key = StreamKey::new(self_id.clone(), c.stream);
                note(&key, c);
                candidates.push((key, level(c)));
            }
        }
        for (server, l) in &r.remote {
            let live = peers.get(server).is_some_and(|p| p.alive);
            if !live || now.saturating_sub(l.received) > ttl {
                continue;
            }
            for c in &l.candidates {
                let key = StreamKey::new(server.clone(), c.stream);
                note(&key, c);
                candidates.push((key, level(c)));
            }
        }
        // Hysteresis continues the list the members mix: the previous primary's after a
        // takeover, ours within a term. After a grace caused by peers (re)appearing, our own
        // list may be an isolated one, so the merge starts afresh.
        let prev: &[StreamKey] = match &r.current {
            Some(c) if c.primary != self_id => &c.list,
            _ if lead.epoch > 0 && !lead.force_new_epoch => &lead.list,
            _ => &[],
        };
        let (list, margin) =
            merge_top_list(prev, &candidates, mixing.top_n, mixing.extra, hysteresis);
        // A listed stream whose speaker went quiet keeps the name it had.
        let names: Vec<String> = list
            .iter()
            .map(|k| {
                identities.get(k).cloned().unwrap_or_else(|| {
                    lead.list
                        .iter()
                        .position(|old| old == k)
                        .and_then(|i| lead.names.get(i).cloned())
                        .unwrap_or_default()
                })
            })
            .collect();

        let changed = lead.epoch == 0
            || lead.force_new_epoch
            || r.max_epoch_seen > lead.epoch
            || list != lead.list
            || margin != lead.margin;
        let mut broadcast = false;
        let switch_lead = lead.switch_lead(&members);
        if changed {
            let current = r.current.as_ref().map_or(0, |c| c.epoch);
            // The epoch mixed now stays in force until the new one's tick.
            let in_force = if now >= r.switch_at {
                current
            } else {
                r.previous.as_ref().map_or(0, |p| p.epoch)
            };
            lead.prev_epoch = in_force;
            lead.epoch = lead
                .epoch
                .max(r.max_epoch_seen)
                .max(current)
                .saturating_add(1);
            lead.force_new_epoch = false;
            lead.list = list;
            lead.margin = margin;
            lead.names = names;
            lead.switch_at = now + switch_lead;
            lead.at_us = wall_origin_us
                .saturating_add(u64::try_from(lead.switch_at.as_micros()).unwrap_or(u64::MAX));
            r.max_epoch_seen = lead.epoch;
            accept(
                (&mut r.current, &mut r.previous, &mut r.switch_at),
                GlobalList {
                    epoch: lead.epoch,
                    primary: self_id.clone(),
                    list: lead.list.clone(),
                    margin: lead.margin.clone(),
                    names: lead.names.clone(),
                    at_us: lead.at_us,
                },
                lead.switch_at,
                now,
            );
            r.late = Duration::ZERO;
            // Nothing was mixed before (a first list switches at once): so is the record.
            lead.switch_at = r.switch_at;
            self.counters.global_list_changes += 1;
            broadcast = true;
        } else if now.saturating_sub(lead.last_broadcast) >= refresh {
            broadcast = true;
        }
        if broadcast {
            lead.last_broadcast = now;
            for m in &members {
                lead.sent_to.insert(m.clone(), now);
                self.outbox.push(Outgoing {
                    to: m.clone(),
                    msg: global_message(name, &self_id, lead),
                });
            }
        }

        // Consistency: on the frame grid, does every member mix the epoch in force? A tick is
        // judged once acknowledgements sent on time can have arrived: twice the lead later.
        if local_participants > 0 || !members.is_empty() {
            let judged = (switch_lead * 2).min(MAX_SWITCH_LEAD * 2);
            let mut next = lead.next_tick.unwrap_or(now);
            let mut n = 0;
            while next + judged <= now && n < 1000 {
                let consistent = !unreachable
                    && members.iter().all(|m| {
                        r.remote
                            .get(m)
                            .is_some_and(|l| lead.in_step(l.epoch, l.late, next))
                    });
                self.counters.ticks += 1;
                if consistent {
                    self.counters.consistent_ticks += 1;
                }
                next += mixing.frame;
                n += 1;
            }
            if next + judged <= now {
                next = now.saturating_sub(judged) + mixing.frame;
            }
            lead.next_tick = Some(next);
        } else {
            lead.next_tick = None;
        }
    }
}

/// The term's current global list of `room`, as sent to a member.
fn global_message(room: &str, self_id: &str, lead: &Lead) -> ControlMessage {
    ControlMessage::GlobalTopList {
        room: room.to_owned(),
        epoch: lead.epoch,
        primary: self_id.to_owned(),
        list: lead.list.clone(),
        margin: lead.margin.clone(),
        names: lead.names.clone(),
        at_us: lead.at_us,
    }
}
