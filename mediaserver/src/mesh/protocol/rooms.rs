//! The state every server keeps per room, primary or not: the rendezvous order and the current
//! primary, the local participants and candidates, the local top list sent to the primary, the
//! members' lists received, and the global list accepted and mixed.
//!
//! A room is created by the first local participant, candidate list or peer message that names
//! it, and dropped (by `poll`) once it has been empty for `room_linger`: no local participant,
//! no live peer announcing it, no fresh local list from a peer.
//!
//! A new list takes effect at the tick it is stamped for (DESIGN.md §5, "Mixing"), not when it
//! arrives: until then the previous list stays in force ([`MeshNodeState::mixing`]), while the
//! new list's streams are already forwarded, so their packets are there at the switch. A list
//! that arrives after its tick takes effect at once and is acknowledged as late by how much.
//!
//! Invariants: at most `max_rooms` rooms, a room beyond that is refused; a global list is
//! accepted only from the server this one considers the primary and only with an epoch not below
//! the current one; an accepted list is canonical (sorted, deduplicated, its margin disjoint from
//! the list); a switch is never further ahead than [`MAX_SWITCH_LEAD`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::election::{rendezvous_order, update_primary};
use super::lead::{Lead, MAX_SWITCH_LEAD};
use super::top_list::{canonical, voiced_streams};
use super::{MeshNodeState, Outgoing, ServerId, StreamKey};
use crate::media::{Candidate, StreamId};
use crate::mesh::error::MeshError;
use crate::mesh::wire::{self, ControlMessage};

/// A global top list as accepted by a server (or made by it, as primary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalList {
    /// The list's epoch.
    pub epoch: u64,
    /// The primary that made it.
    pub primary: ServerId,
    /// The streams to mix, sorted by key.
    pub list: Vec<StreamKey>,
    /// The streams forwarded beyond the list, sorted by key, disjoint from `list`.
    pub margin: Vec<StreamKey>,
    /// The identity speaking on each stream of `list`, in the same order ("" when unknown).
    pub names: Vec<String>,
    /// When it takes effect: µs since the Unix epoch on the primary's clock (0: at once).
    pub at_us: u64,
}

/// Accepts `list` into a room's (current, previous, switch tick) to take effect at `switch_at`
/// (at once when nothing is mixed yet). The list in force now stays in force until then; a
/// pending list not yet in force is replaced.
pub(super) fn accept(
    (current, previous, at): (
        &mut Option<GlobalList>,
        &mut Option<GlobalList>,
        &mut Duration,
    ),
    list: GlobalList,
    switch_at: Duration,
    now: Duration,
) {
    if current.is_some() && now >= *at {
        *previous = current.take();
    }
    *at = if previous.is_none() { now } else { switch_at };
    *current = Some(list);
}

impl GlobalList {
    /// Whether stream `stream` of server `server` is on the list or the margin.
    pub fn forwards(&self, server: &str, stream: StreamId) -> bool {
        self.list
            .iter()
            .chain(&self.margin)
            .any(|k| k.stream == stream && k.server == server)
    }
}

/// A member's latest local top list, as received by the server it considers the primary.
#[derive(Debug)]
pub(super) struct RemoteList {
    pub(super) seq: u64,
    pub(super) received: Duration,
    pub(super) epoch: u64,
    pub(super) candidates: Vec<Candidate>,
    /// How late the member switched to `epoch` after its stamped tick.
    pub(super) late: Duration,
}

/// One room on this server.
#[derive(Debug)]
pub(super) struct Room {
    pub(super) order: Vec<ServerId>,
    pub(super) primary: Option<ServerId>,
    pub(super) local_participants: usize,
    pub(super) local_candidates: Vec<Candidate>,
    pub(super) local_seq: u64,
    /// When the next local list is due; `None`: at the next poll.
    pub(super) next_rank: Option<Duration>,
    /// The voiced streams (sorted) of the last local list sent: when the candidates' set differs,
    /// the next list is due at once instead of at the next rank interval, so a new speaker
    /// reaches the primary without waiting out the interval.
    pub(super) sent_streams: Vec<StreamId>,
    pub(super) remote: BTreeMap<ServerId, RemoteList>,
    /// The latest list accepted (or made, as primary); in force from `switch_at`.
    pub(super) current: Option<GlobalList>,
    /// The list in force until `switch_at`.
    pub(super) previous: Option<GlobalList>,
    /// When `current` takes effect here (this state's time).
    pub(super) switch_at: Duration,
    /// How much after its stamped tick `current` arrived here (zero: on time).
    pub(super) late: Duration,
    pub(super) max_epoch_seen: u64,
    pub(super) lead: Option<Lead>,
    pub(super) idle_since: Option<Duration>,
}

impl Room {
    /// The epoch of the accepted global list; 0 before the first.
    pub(super) fn current_epoch(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.epoch)
    }

    /// Accepts `list` to take effect at `switch_at` ([`accept`]).
    pub(super) fn accept(&mut self, list: GlobalList, switch_at: Duration, now: Duration) {
        accept(
            (&mut self.current, &mut self.previous, &mut self.switch_at),
            list,
            switch_at,
            now,
        );
    }
}

impl MeshNodeState {
    /// Rooms this server keeps state for.
    pub fn rooms(&self) -> impl Iterator<Item = &str> + '_ {
        self.rooms.keys().map(String::as_str)
    }

    /// The room whose [`wire::room_hash`] is `hash`, among the rooms this server knows.
    pub fn room_for_hash(&self, hash: u64) -> Option<&str> {
        self.by_hash.get(&hash).map(String::as_str)
    }

    /// What this server mixes in `room`: the accepted global list. `None` until one arrives (the
    /// mixer then ranks locally).
    pub fn selection(&self, room: &str) -> Option<&GlobalList> {
        self.rooms.get(room).and_then(|r| r.current.as_ref())
    }

    /// The global list in force in `room` at `now`: [`Self::selection`] once its switch tick has
    /// come, the previous list before.
    pub fn mixing(&self, room: &str, now: Duration) -> Option<&GlobalList> {
        let r = self.rooms.get(room)?;
        if now >= r.switch_at {
            r.current.as_ref()
        } else {
            r.previous.as_ref().or(r.current.as_ref())
        }
    }

    /// When [`Self::selection`] takes effect in `room` (this state's time); `None` without one.
    pub fn switch_at(&self, room: &str) -> Option<Duration> {
        let r = self.rooms.get(room)?;
        r.current.as_ref().map(|_| r.switch_at)
    }

    /// The state of `room`, created (and its primary elected) if new; a new room beyond
    /// `max_rooms` is refused.
    pub(super) fn ensure_room(&mut self, room: &str) -> Result<&mut Room, MeshError> {
        wire::check_room(room)?;
        if !self.rooms.contains_key(room) {
            if self.rooms.len() >= self.config.max_rooms {
                return Err(MeshError::TooManyRooms {
                    max: self.config.max_rooms,
                });
            }
            let order = rendezvous_order(room, &self.nodes);
            self.by_hash.insert(wire::room_hash(room), room.to_owned());
            self.rooms.insert(
                room.to_owned(),
                Room {
                    order,
                    primary: None,
                    local_participants: 0,
                    local_candidates: Vec::new(),
                    local_seq: 0,
                    next_rank: None,
                    sent_streams: Vec::new(),
                    remote: BTreeMap::new(),
                    current: None,
                    previous: None,
                    switch_at: Duration::ZERO,
                    late: Duration::ZERO,
                    max_epoch_seen: 0,
                    lead: None,
                    idle_since: None,
                },
            );
        }
        let r = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| MeshError::invalid("room", "room vanished"))?;
        if r.primary.is_none() {
            update_primary(
                r,
                &self.self_id,
                self.in_plan,
                &self.peers,
                self.now,
                &mut self.counters,
            );
        }
        Ok(r)
    }

    /// This server's local top list of room `name` to the primary, when due. The primary itself
    /// sends none: it reads its own candidates directly.
    pub(super) fn send_local_list(&mut self, name: &str, now: Duration) {
        let limit = self.mixing.local_limit();
        let rank_interval = self.mixing.rank_interval;
        let Some(r) = self.rooms.get_mut(name) else {
            return;
        };
        if r.local_participants == 0 || r.next_rank.is_some_and(|t| now < t) {
            return;
        }
        r.next_rank = Some(now + rank_interval);
        r.sent_streams = voiced_streams(&r.local_candidates, limit);
        let Some(primary) = r.primary.clone() else {
            return;
        };
        if primary == self.self_id {
            return; // the primary reads its own candidates directly
        }
        r.local_seq += 1;
        // Voice-active streams, then (the candidates are sorted voice first) the listed ones
        // that went quiet: reporting those keeps them present at the primary, so they rest in
        // their slots through a pause instead of leaving the list and coming back.
        let self_id = &self.self_id;
        let listed = |c: &Candidate| {
            r.current.as_ref().is_some_and(|g| {
                g.list
                    .iter()
                    .any(|k| k.server == *self_id && k.stream == c.stream)
            })
        };
        let candidates: Vec<Candidate> = r
            .local_candidates
            .iter()
            .filter(|c| c.voice || listed(c))
            .take(limit)
            .cloned()
            .collect();

        self.outbox.push(Outgoing {
            to: primary,
            msg: ControlMessage::LocalTopList {
                room: name.to_owned(),
                seq: r.local_seq,
                epoch: r.current_epoch(),
                candidates,
                late_us: u64::try_from(r.late.as_micros()).unwrap_or(u64::MAX),
            },
        });
    }

    /// A global top list. Accepted only from the server this one considers the room's primary
    /// and only if its epoch is not below the current list's (the epoch rules of the `protocol`
    /// module doc); a list that names another sender as its primary is an error.
    pub(super) fn on_global_top_list(
        &mut self,
        from: &str,
        room: &str,
        (epoch, at_us): (u64, u64),
        primary: ServerId,
        (list, names, margin): (Vec<StreamKey>, Vec<String>, Vec<StreamKey>),
        now: Duration,
    ) -> Result<(), MeshError> {
        if primary != from {
            return Err(MeshError::invalid(
                "global top list",
                format!("sent by {from:?} but names {primary:?} as its primary"),
            ));
        }
        self.ensure_room(room)?;
        // The stamped tick on this server's clock, and how late the list is for it.
        let target = if at_us == 0 {
            Some(now)
        } else {
            self.local_time(at_us)
        };
        let switch_at = target.unwrap_or(now).clamp(now, now + MAX_SWITCH_LEAD);
        let late = target.map_or(Duration::ZERO, |t| now.saturating_sub(t));
        let Some(r) = self.rooms.get_mut(room) else {
            return Ok(());
        };
        r.max_epoch_seen = r.max_epoch_seen.max(epoch);
        let from_primary = r.primary.as_deref() == Some(from);
        if !from_primary || epoch < r.current_epoch() {
            self.counters.lists_rejected += 1;
            return Ok(());
        }
        let named: BTreeMap<StreamKey, String> = list.iter().cloned().zip(names).collect();
        let list = canonical(list);
        let names = list
            .iter()
            .map(|k| named.get(k).cloned().unwrap_or_default())
            .collect();
        let margin: Vec<StreamKey> = canonical(margin)
            .into_iter()
            .filter(|k| list.binary_search(k).is_err())
            .collect();
        let new = GlobalList {
            epoch,
            primary,
            list,
            margin,
            names,
            at_us,
        };
        let changed = r
            .current
            .as_ref()
            .is_none_or(|c| c.epoch != new.epoch || c.primary != new.primary);
        if changed {
            r.accept(new, switch_at, now);
            r.late = late;
            if !late.is_zero() {
                self.counters.lists_late += 1;
            }
            // Acknowledge at once (the local list carries the epoch we now take on).
            r.next_rank = None;
        } else {
            // A refresh of the same list: its content, not its timing.
            r.current = Some(new);
        }
        self.counters.lists_accepted += 1;
        Ok(())
    }

    /// How long a received local list counts as fresh.
    pub(super) fn list_ttl(&self) -> Duration {
        self.mixing
            .rank_interval
            .saturating_mul(4)
            .max(self.config.heartbeat_timeout())
    }

    /// Whether room `name` has been empty for the room linger, so `poll` drops it. Starts the
    /// room's idle time when it becomes empty and clears it when it is not.
    pub(super) fn room_is_idle(&mut self, name: &str, now: Duration) -> bool {
        let ttl = self.list_ttl();
        let linger = self.config.room_linger;
        let anyone = self
            .peers
            .values()
            .any(|p| p.alive && p.rooms.contains(name));
        let Some(r) = self.rooms.get_mut(name) else {
            return false;
        };
        let busy = r.local_participants > 0
            || anyone
            || r.remote
                .values()
                .any(|l| now.saturating_sub(l.received) <= ttl);
        if busy {
            r.idle_since = None;
            return false;
        }
        let since = *r.idle_since.get_or_insert(now);
        now.saturating_sub(since) >= linger
    }
}
