//! The mesh protocol core (DESIGN.md §5), sans-IO: one [`MeshNodeState`] per media server.
//!
//! Time is a parameter (`Duration` since an arbitrary, per-process epoch; it only has to be
//! monotonic), messages come in through [`MeshNodeState::on_message`] and go out as
//! [`Outgoing`] values from [`MeshNodeState::poll`]. No sockets, no clocks, no randomness: the
//! same inputs give the same outputs, which is what lets `tests/mesh_protocol.rs` run whole meshes
//! in virtual time with loss, cuts and restarts.
//!
//! # What one server does, per room
//!
//! - **Liveness.** Every `heartbeat_interval` a [`ControlMessage::Heartbeat`] goes to every peer of
//!   the plan. Any message from a peer proves it alive; a peer unheard for
//!   `heartbeat_interval × missed_heartbeats` is dead. Peers start dead until heard, so a server
//!   that starts alone does not wait for the others. A changed `incarnation` means the peer
//!   restarted: what it announced before is forgotten.
//! - **Membership.** The set of rooms this server has participants in goes to every peer on change
//!   and every `membership_refresh`.
//! - **Primary.** The rendezvous order of a room is the plan's nodes sorted by
//!   `SHA-256("chorus-rendezvous\0" || room || "\0" || id)` (first 8 bytes, big-endian, highest
//!   first; ties by id). The primary is the first LIVE server in that order, so every server with
//!   the same plan and liveness view names the same one, and when it dies the next takes over.
//! - **Local top list.** Every `rankIntervalMs` (and at once when the primary changes or a new
//!   global list was accepted) a server with participants sends the primary its local candidates
//!   (voice-active first, then its selected streams that are resting between sentences), best
//!   first, at most `topSpeakers + extraCandidates`, with the epoch it mixes.
//! - **Global top list.** The primary merges the fresh lists of live servers with the local
//!   ranker's rules ([`select_top_n`](crate::media::ranking::select_top_n), via [`merge_top_list`]): voice-active, non-silent streams
//!   only, ranked by importance then [`StreamKey`]; a stream on the current list keeps its slot
//!   unless a challenger is louder by more than `hysteresis_db` (so the list does not flap), and
//!   a listed stream that falls silent but is still reported keeps its slot until a voice-active
//!   stream needs it (so a talker's pauses change nothing); the next `extraCandidates` form the
//!   margin. It sends the result to every live server with participants
//!   when it changes (with a new epoch) and every `global_refresh` (same epoch). A server whose
//!   acknowledged epoch lags is sent the list again (at most once per rank interval), so a lost
//!   list is repaired within about one rank interval instead of one refresh.
//! - **Epochs.** A receiver accepts a global list only from the server it itself considers the
//!   primary, and only if its epoch is not lower than the list it has. A primary starts every term
//!   (taking over, or after a peer appears or restarts) with a grace period: it waits until every
//!   live member has reported (or one rank interval passed), learning the epochs they mix, and then
//!   emits an epoch above every epoch it has seen. So a restarted or partitioned old primary never
//!   has a stale list win: its old epoch is below what the others hold, and its first new list is
//!   made from everyone's current reports.
//! - **Forwarding.** A local stream is forwarded when it is on the global list or margin and is
//!   voice-active locally, to every other live server with participants in the room. A server
//!   whose participants are all silent forwards nothing. Per room the mesh forwards at most
//!   `(topSpeakers + extraCandidates) × (servers − 1)` streams, whatever the participant count.
//! - **Mixing.** [`MeshNodeState::selection`] is exactly the accepted global list.
//! - **Consistency.** The primary of a room counts frame ticks (`frameMs` grid) and, of those, the
//!   ticks at which every live server with participants has acknowledged its current epoch. The
//!   ratio is the fraction of time the whole mesh mixed the same set in the same epoch (an upper
//!   bound on disagreement: it includes the acknowledgement's way back).
//!
//! Hand-written because no crate does it: rendezvous hashing (a few lines over SHA-256) and the
//! epoch rules above (the hysteresis merge is the media core's selection); the protocol itself is
//! this project's.
//!
//!
//! # Files
//!
//! [`MeshNodeState`] is one state machine; its methods are split by concern over the files of
//! this module, each with an `impl MeshNodeState` block (the fields are private to the module, so
//! every file sees them and nothing outside does):
//! - `mod.rs`: the public types, the state and its inputs: the plan, the local participants and
//!   candidates, the dispatch of each control message to its handler, and [`MeshNodeState::poll`],
//!   which runs the due work of every concern in a fixed order.
//! - `liveness.rs`: peers: heartbeats, incarnations (restarts), who is alive, the rooms each
//!   peer announced, and which live servers are members of a room.
//! - `election.rs`: the rendezvous order and the primary of each room; a term's start and end.
//! - `rooms.rs`: the state every server keeps per room: its local list to the primary, the
//!   accepted global list (the epoch rules on the receiving side), idle rooms.
//! - `lead.rs`: the primary's term: members' local lists in, the merge into epochs, broadcasts
//!   and repairs out, consistency ticks.
//! - `forwarding.rs`: which local streams go to which servers.
//! - `top_list.rs`: pure functions over lists: sanitising candidates, the merge, canonical form.
//!
//! Invariants:
//! - no input (message, time, candidate value) panics; bad messages are refused with a
//!   [`MeshError`] and counted in [`MeshCounters::messages_rejected`];
//! - state is bounded: peers by the plan, rooms by [`ProtocolConfig::max_rooms`], lists by the wire
//!   limits;
//! - an accepted epoch never decreases while the primary stays the same, and a new primary's
//!   first epoch is above every epoch its members reported.

mod election;
mod forwarding;
mod lead;
mod liveness;
mod rooms;
mod top_list;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chorus_crds::MeshPlan;

use super::error::MeshError;
pub use super::wire::StreamKey;
use super::wire::{
    self, ControlMessage, MAX_GLOBAL_LIST, MAX_GLOBAL_MARGIN, MAX_LOCAL_CANDIDATES,
    MAX_ROOMS_PER_MESSAGE,
};
use crate::media::{Candidate, MixerConfig};
pub use election::rendezvous_order;
use liveness::Peer;
pub use rooms::GlobalList;
use rooms::Room;
pub use top_list::merge_top_list;
use top_list::{sanitize_candidates, voiced_streams};

/// A media server's id (its pod name), as in the plan.
pub type ServerId = String;

/// Protocol timing and limits that are not in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ProtocolConfig {
    /// Interval between heartbeats to each peer.
    pub heartbeat_interval: Duration,
    /// A peer unheard for this many heartbeat intervals is dead.
    pub missed_heartbeats: u32,
    /// Interval between unchanged membership announcements.
    pub membership_refresh: Duration,
    /// Interval between unchanged global list refreshes.
    pub global_refresh: Duration,
    /// How much louder (dB) a challenger must be than the weakest listed stream to replace it.
    pub hysteresis_db: f32,
    /// Rooms this server keeps state for (at most 1024, the membership message's limit).
    pub max_rooms: usize,
    /// How long an empty room's state is kept before it is dropped.
    pub room_linger: Duration,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            missed_heartbeats: 5,
            membership_refresh: Duration::from_secs(1),
            global_refresh: Duration::from_secs(1),
            hysteresis_db: 3.0,
            max_rooms: MAX_ROOMS_PER_MESSAGE,
            room_linger: Duration::from_secs(10),
        }
    }
}

impl ProtocolConfig {
    /// How long a peer may stay unheard before it is dead.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.missed_heartbeats.max(1))
    }
}

/// One message to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// The peer to send it to.
    pub to: ServerId,
    /// The message.
    pub msg: ControlMessage,
}

/// Cumulative counters of one server's protocol state (the metrics helper turns them into
/// Prometheus counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// New epochs emitted by this server as a primary (each is a global list change).
    pub global_list_changes: u64,
    /// Frame ticks counted by this server as the primary of a room with participants.
    pub ticks: u64,
    /// Of those, ticks at which every live server with participants mixed the current epoch.
    pub consistent_ticks: u64,
    /// Global lists accepted.
    pub lists_accepted: u64,
    /// Global lists refused (not from this server's primary, or a lower epoch).
    pub lists_rejected: u64,
    /// Messages refused with an error (unknown peer, invalid content, room limit).
    pub messages_rejected: u64,
    /// Times this server became the primary of a room.
    pub takeovers: u64,
    /// Global lists that reached this server after the tick they were stamped for (it switched
    /// at once, late).
    pub lists_late: u64,
}

#[derive(Clone, Copy, Debug)]
struct Mixing {
    top_n: usize,
    extra: usize,
    rank_interval: Duration,
    frame: Duration,
}

impl Mixing {
    /// The protocol's view of the one mixing-settings value, bounded by the wire's limits.
    fn from_plan(plan: &MeshPlan) -> Self {
        let m = MixerConfig::from_plan(&plan.mixing);
        Self {
            top_n: m.top_speakers.clamp(1, MAX_GLOBAL_LIST),
            extra: m.extra_candidates.min(MAX_GLOBAL_MARGIN),
            rank_interval: Duration::from_millis(u64::from(m.rank_interval_ms.clamp(10, 2000))),
            frame: m.frame(),
        }
    }

    fn local_limit(&self) -> usize {
        (self.top_n + self.extra).min(MAX_LOCAL_CANDIDATES)
    }
}

/// The protocol state of one media server for every room of its conference.
#[derive(Debug)]
pub struct MeshNodeState {
    self_id: ServerId,
    incarnation: u64,
    config: ProtocolConfig,
    generation: i64,
    nodes: Vec<ServerId>,
    in_plan: bool,
    mixing: Mixing,
    peers: BTreeMap<ServerId, Peer>,
    rooms: BTreeMap<String, Room>,
    by_hash: HashMap<u64, String>,
    outbox: Vec<Outgoing>,
    next_heartbeat: Duration,
    next_membership: Duration,
    membership_dirty: bool,
    counters: MeshCounters,
    /// The latest time seen in any call (for calls that take no time).
    now: Duration,
    /// The wall clock at time zero of this state, µs since the Unix epoch: switch ticks cross
    /// the mesh as wall-clock times (servers keep NTP time), each server's own times do not.
    wall_origin_us: u64,
}

impl MeshNodeState {
    /// The state of server `self_id` under `plan`. `incarnation` must differ between runs of the
    /// same server (a random number or the start time), so peers notice a restart.
    pub fn new(
        self_id: impl Into<ServerId>,
        plan: &MeshPlan,
        config: ProtocolConfig,
        incarnation: u64,
    ) -> Self {
        let mut config = config;
        config.max_rooms = config.max_rooms.clamp(1, MAX_ROOMS_PER_MESSAGE);
        let mut s = Self {
            self_id: self_id.into(),
            incarnation,
            config,
            generation: plan.generation,
            nodes: Vec::new(),
            in_plan: false,
            mixing: Mixing::from_plan(plan),
            peers: BTreeMap::new(),
            rooms: BTreeMap::new(),
            by_hash: HashMap::new(),
            outbox: Vec::new(),
            next_heartbeat: Duration::ZERO,
            next_membership: Duration::ZERO,
            membership_dirty: true,
            counters: MeshCounters::default(),
            now: Duration::ZERO,
            wall_origin_us: 0,
        };
        s.on_plan(plan);
        s
    }

    /// Apply a new plan generation live: peers added or removed, mixing parameters, room orders.
    /// Primaries are recomputed at the next [`Self::poll`].
    pub fn on_plan(&mut self, plan: &MeshPlan) {
        self.generation = plan.generation;
        self.mixing = Mixing::from_plan(plan);
        self.nodes = plan
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .filter(|id| wire::is_valid_server_id(id))
            .collect();
        self.in_plan = self.nodes.contains(&self.self_id);
        let wanted: BTreeSet<&ServerId> = self
            .nodes
            .iter()
            .filter(|id| **id != self.self_id)
            .collect();
        self.peers.retain(|id, _| wanted.contains(id));
        for id in wanted {
            self.peers.entry(id.clone()).or_default();
        }
        for (name, room) in &mut self.rooms {
            room.order = rendezvous_order(name, &self.nodes);
            room.remote.retain(|id, _| self.peers.contains_key(id));
            if !self.in_plan {
                // Removed from the mesh: no primary, no global list (the mixer ranks locally).
                room.primary = None;
                room.lead = None;
                room.current = None;
                room.previous = None;
            }
        }
        self.membership_dirty = true;
    }

    /// Sets the wall-clock time (µs since the Unix epoch) of this state's time zero: the shell
    /// calls it once, with the wall clock read when its monotonic time zero was. Until then (and
    /// in tests whose servers share one virtual clock) it is 0.
    pub fn set_wall_origin_us(&mut self, us: u64) {
        self.wall_origin_us = us;
    }

    /// A wall-clock time (µs since the Unix epoch) as this state's time; `None` before its
    /// time zero.
    fn local_time(&self, wall_us: u64) -> Option<Duration> {
        wall_us
            .checked_sub(self.wall_origin_us)
            .map(Duration::from_micros)
    }

    /// This server's id.
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    /// The plan generation this state runs.
    pub fn plan_generation(&self) -> i64 {
        self.generation
    }

    /// Cumulative counters.
    pub fn counters(&self) -> MeshCounters {
        self.counters
    }

    /// The local participant count of `room` changed. Zero removes the room from this server's
    /// membership (and drops its local candidates).
    pub fn on_local_participants(&mut self, room: &str, count: usize) -> Result<(), MeshError> {
        wire::check_room(room)?;
        if count == 0 && !self.rooms.contains_key(room) {
            return Ok(());
        }
        let r = self.ensure_room(room)?;
        let was = r.local_participants > 0;
        r.local_participants = count;
        if count == 0 {
            r.local_candidates.clear();
        }
        if was != (count > 0) {
            r.next_rank = None;
            self.membership_dirty = true;
        }
        Ok(())
    }

    /// The mixer's ranked local candidates of `room` (top N then margin). Called every tick or
    /// every rank interval; the latest value is what the next local top list carries.
    pub fn on_local_candidates(
        &mut self,
        room: &str,
        candidates: Vec<Candidate>,
        now: Duration,
    ) -> Result<(), MeshError> {
        self.now = self.now.max(now);
        wire::check_room(room)?;
        let limit = self.mixing.local_limit();
        let r = self.ensure_room(room)?;
        r.local_candidates = sanitize_candidates(candidates, limit);
        if voiced_streams(&r.local_candidates, limit) != r.sent_streams {
            r.next_rank = None;
        }
        Ok(())
    }

    /// A control message from peer `from`, received at `now`. Call [`Self::poll`] afterwards to
    /// collect any replies.
    pub fn on_message(
        &mut self,
        from: &str,
        msg: ControlMessage,
        now: Duration,
    ) -> Result<(), MeshError> {
        self.now = self.now.max(now);
        let result = self.handle_message(from, msg, now);
        if result.is_err() {
            self.counters.messages_rejected += 1;
        }
        result
    }

    /// Checks the sender and the message, settles the sender's liveness, then hands the content
    /// to the handler of its kind.
    fn handle_message(
        &mut self,
        from: &str,
        msg: ControlMessage,
        now: Duration,
    ) -> Result<(), MeshError> {
        if !self.in_plan || !self.peers.contains_key(from) {
            return Err(MeshError::UnknownPeer(from.to_owned()));
        }
        msg.validate()?;
        // A heartbeat's incarnation must be read before the liveness bookkeeping, which forgets
        // a restarted peer's rooms and lists; every other kind only proves the sender alive.
        let restarted = match &msg {
            ControlMessage::Heartbeat {
                incarnation,
                generation,
                ..
            } => self.on_heartbeat(from, *incarnation, *generation)?,
            _ => false,
        };
        self.on_peer_heard(from, restarted, now)?;
        match msg {
            ControlMessage::Heartbeat { .. } => Ok(()),
            ControlMessage::RoomMembership { rooms } => self.on_room_membership(from, rooms),
            ControlMessage::LocalTopList {
                room,
                seq,
                epoch,
                candidates,
                late_us,
            } => self.on_local_top_list(
                from,
                &room,
                (seq, epoch, Duration::from_micros(late_us)),
                candidates,
                now,
            ),
            ControlMessage::GlobalTopList {
                room,
                epoch,
                primary,
                list,
                margin,
                names,
                at_us,
            } => self.on_global_top_list(
                from,
                &room,
                (epoch, at_us),
                primary,
                (list, names, margin),
                now,
            ),
        }
    }

    /// Advance to `now`: detect dead peers, re-elect primaries, send what is due (heartbeats,
    /// membership, local lists, global lists as primary), count consistency ticks, forget idle
    /// rooms. Call it often (every few milliseconds to every frame) and after every message.
    pub fn poll(&mut self, now: Duration) -> Vec<Outgoing> {
        self.now = self.now.max(now);
        if !self.in_plan {
            self.outbox.clear();
            return Vec::new();
        }
        // Liveness first: who is alive now decides the primaries, and with them where the local
        // lists go and which terms this server leads.
        self.expire_silent_peers(now);
        self.refresh_primaries(now);
        self.send_heartbeats_if_due(now);
        self.announce_membership_if_due(now);

        let names: Vec<String> = self.rooms.keys().cloned().collect();
        let mut idle = Vec::new();
        for name in names {
            self.send_local_list(&name, now);
            self.step_primary(&name, now);
            if self.room_is_idle(&name, now) {
                idle.push(name);
            }
        }
        for name in idle {
            self.rooms.remove(&name);
            self.by_hash.remove(&wire::room_hash(&name));
        }
        std::mem::take(&mut self.outbox)
    }
}
