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
//!   global list was accepted) a server with participants sends the primary its voice-active local
//!   candidates, best first, at most `topSpeakers + extraCandidates`, with the epoch it mixes.
//! - **Global top list.** The primary merges the fresh lists of live servers with the local
//!   ranker's rules ([`select_top_n`], via [`merge_top_list`]): voice-active, non-silent streams
//!   only, ranked by importance then [`StreamKey`]; a stream on the current list keeps its slot
//!   unless a challenger is louder by more than `hysteresis_db` (so the list does not flap); the
//!   next `extraCandidates` form the margin. It sends the result to every live server with participants
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
//! Invariants:
//! - no input (message, time, candidate value) panics; bad messages are refused with a
//!   [`MeshError`] and counted in [`MeshCounters::messages_rejected`];
//! - state is bounded: peers by the plan, rooms by [`ProtocolConfig::max_rooms`], lists by the wire
//!   limits;
//! - an accepted epoch never decreases while the primary stays the same, and a new primary's
//!   first epoch is above every epoch its members reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chorus_crds::MeshPlan;
use sha2::{Digest, Sha256};

use super::error::MeshError;
pub use super::wire::StreamKey;
use super::wire::{
    self, ControlMessage, MAX_GLOBAL_LIST, MAX_GLOBAL_MARGIN, MAX_LOCAL_CANDIDATES,
    MAX_ROOMS_PER_MESSAGE,
};
use crate::media::level::DEFAULT_SILENCE_THRESHOLD_DBOV;
use crate::media::ranking::select_top_n;
use crate::media::{Candidate, MixerConfig, StreamId};

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

#[derive(Debug, Default)]
struct Peer {
    last_heard: Option<Duration>,
    alive: bool,
    incarnation: Option<u64>,
    generation: Option<i64>,
    rooms: BTreeSet<String>,
}

#[derive(Debug)]
struct RemoteList {
    seq: u64,
    received: Duration,
    epoch: u64,
    candidates: Vec<Candidate>,
}

#[derive(Debug)]
struct Lead {
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
}

impl Lead {
    fn new(now: Duration) -> Self {
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
        }
    }

    fn enter_grace(&mut self, now: Duration) {
        self.since = now;
        self.in_grace = true;
        self.force_new_epoch = true;
    }
}

#[derive(Debug)]
struct Room {
    order: Vec<ServerId>,
    primary: Option<ServerId>,
    local_participants: usize,
    local_candidates: Vec<Candidate>,
    local_seq: u64,
    /// When the next local list is due; `None`: at the next poll.
    next_rank: Option<Duration>,
    /// The voiced streams (sorted) of the last local list sent: when the candidates' set differs,
    /// the next list is due at once instead of at the next rank interval, so a new speaker
    /// reaches the primary without waiting out the interval.
    sent_streams: Vec<StreamId>,
    remote: BTreeMap<ServerId, RemoteList>,
    current: Option<GlobalList>,
    max_epoch_seen: u64,
    lead: Option<Lead>,
    idle_since: Option<Duration>,
}

impl Room {
    fn current_epoch(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.epoch)
    }
}

/// The voiced streams among the first `limit` candidates, sorted: what a local list says, apart
/// from levels.
fn voiced_streams(candidates: &[Candidate], limit: usize) -> Vec<StreamId> {
    let mut ids: Vec<StreamId> = candidates
        .iter()
        .filter(|c| c.voice)
        .take(limit)
        .map(|c| c.stream)
        .collect();
    ids.sort_unstable();
    ids
}

/// The rendezvous order of `room` over `nodes`: highest score first, ties by id.
pub fn rendezvous_order(room: &str, nodes: &[ServerId]) -> Vec<ServerId> {
    let mut scored: Vec<(u64, &ServerId)> = nodes
        .iter()
        .map(|id| {
            let mut h = Sha256::new();
            h.update(b"chorus-rendezvous\0");
            h.update(room.as_bytes());
            h.update([0u8]);
            h.update(id.as_bytes());
            (wire::first_u64(&h.finalize()), id)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, id)| id.clone()).collect()
}

fn sanitize_importance(x: f32) -> f32 {
    if x.is_nan() {
        -127.0
    } else {
        x.clamp(-127.0, 0.0)
    }
}

/// Best first: voice-active, then louder, then lower stream id. One entry per stream, at most
/// `limit`, importance clamped to -127..=0 (NaN is silence).
fn sanitize_candidates(mut c: Vec<Candidate>, limit: usize) -> Vec<Candidate> {
    for x in &mut c {
        x.importance = sanitize_importance(x.importance);
    }
    let better = |a: &Candidate, b: &Candidate| {
        b.voice
            .cmp(&a.voice)
            .then_with(|| b.importance.total_cmp(&a.importance))
            .then_with(|| a.stream.cmp(&b.stream))
    };
    c.sort_by(|a, b| a.stream.cmp(&b.stream).then_with(|| better(a, b)));
    c.dedup_by_key(|x| x.stream);
    c.sort_by(better);
    c.truncate(limit);
    c
}

/// The primary's merge: from the voice-active `eligible` streams (key, importance), the top
/// `top_n` with hysteresis against `prev`, and the next `extra` as margin. Both results are
/// sorted by key.
///
/// The rules are the local ranker's, [`select_top_n`], so a mesh room picks the same speakers
/// as a single-server room would from the same levels: NaN and importances below the default
/// silence threshold never make the list, a duplicate key counts at its most important entry,
/// equal importance ranks the lower key first. Importances from peers are first clamped to the
/// wire's -127..=0 dBov, so an out-of-range value cannot outrank every honest one.
pub fn merge_top_list(
    prev: &[StreamKey],
    eligible: &[(StreamKey, f32)],
    top_n: usize,
    extra: usize,
    hysteresis_db: f32,
) -> (Vec<StreamKey>, Vec<StreamKey>) {
    // `f32::clamp` keeps NaN as NaN, which the selection treats as silence.
    let levels: Vec<(StreamKey, f32)> = eligible
        .iter()
        .map(|(k, i)| (k.clone(), i.clamp(-127.0, 0.0)))
        .collect();
    let selection = select_top_n(
        prev,
        &levels,
        top_n,
        hysteresis_db,
        DEFAULT_SILENCE_THRESHOLD_DBOV,
    );
    let mut list: Vec<StreamKey> = selection.selected.into_iter().map(|(k, _)| k).collect();
    list.sort();
    let mut margin: Vec<StreamKey> = selection
        .outsiders
        .into_iter()
        .take(extra)
        .map(|(k, _)| k)
        .collect();
    margin.sort();
    (list, margin)
}

fn canonical(mut keys: Vec<StreamKey>) -> Vec<StreamKey> {
    keys.sort();
    keys.dedup();
    keys
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
            }
        }
        self.membership_dirty = true;
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

    /// Whether `id` is live in this server's view (this server is live when it is in the plan).
    pub fn is_alive(&self, id: &str) -> bool {
        if id == self.self_id {
            return self.in_plan;
        }
        self.peers.get(id).is_some_and(|p| p.alive)
    }

    /// Peers live in this server's view, sorted.
    pub fn live_peers(&self) -> Vec<ServerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The plan generation a peer announced in its last heartbeat.
    pub fn peer_generation(&self, id: &str) -> Option<i64> {
        self.peers.get(id).and_then(|p| p.generation)
    }

    /// Rooms this server keeps state for.
    pub fn rooms(&self) -> impl Iterator<Item = &str> + '_ {
        self.rooms.keys().map(String::as_str)
    }

    /// The room whose [`wire::room_hash`] is `hash`, among the rooms this server knows.
    pub fn room_for_hash(&self, hash: u64) -> Option<&str> {
        self.by_hash.get(&hash).map(String::as_str)
    }

    /// The primary of `room` in this server's view.
    pub fn primary(&self, room: &str) -> Option<ServerId> {
        match self.rooms.get(room) {
            Some(r) => r.primary.clone(),
            None => self.primary_in(&rendezvous_order(room, &self.nodes)),
        }
    }

    /// What this server mixes in `room`: the accepted global list. `None` until one arrives (the
    /// mixer then ranks locally).
    pub fn selection(&self, room: &str) -> Option<&GlobalList> {
        self.rooms.get(room).and_then(|r| r.current.as_ref())
    }

    /// The servers a local stream's packets go to now (sorted); empty when it is not forwarded.
    /// It allocates; per packet, prefer caching [`Self::forwarding`] once per tick.
    pub fn forward_targets(&self, room: &str, stream: StreamId) -> Vec<ServerId> {
        match self.rooms.get(room) {
            Some(r) if self.forwards(r, stream) => self.room_targets(room),
            _ => Vec::new(),
        }
    }

    /// Every local stream of `room` that is forwarded now, with its targets.
    pub fn forwarding(&self, room: &str) -> Vec<(StreamId, Vec<ServerId>)> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        let targets = self.room_targets(room);
        if targets.is_empty() {
            return Vec::new();
        }
        r.local_candidates
            .iter()
            .filter(|c| self.forwards(r, c.stream))
            .map(|c| (c.stream, targets.clone()))
            .collect()
    }

    /// Stream copies forwarded now over all rooms (streams × targets).
    pub fn forwarded_stream_count(&self) -> usize {
        self.rooms
            .keys()
            .map(|room| {
                self.forwarding(room)
                    .iter()
                    .map(|(_, t)| t.len())
                    .sum::<usize>()
            })
            .sum()
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
            } => self.on_local_top_list(from, &room, seq, epoch, candidates, now),
            ControlMessage::GlobalTopList {
                room,
                epoch,
                primary,
                list,
                margin,
                names,
            } => self.on_global_top_list(from, &room, epoch, primary, (list, names), margin),
        }
    }

    /// A heartbeat: records the peer's incarnation and plan generation. Returns whether the
    /// incarnation changed, i.e. the peer restarted; its announced rooms are then forgotten.
    fn on_heartbeat(
        &mut self,
        from: &str,
        incarnation: u64,
        generation: i64,
    ) -> Result<bool, MeshError> {
        let Some(peer) = self.peers.get_mut(from) else {
            return Err(MeshError::UnknownPeer(from.to_owned()));
        };
        let restarted = peer.incarnation.is_some_and(|i| i != incarnation);
        if restarted {
            peer.rooms.clear();
        }
        peer.incarnation = Some(incarnation);
        peer.generation = Some(generation);
        Ok(restarted)
    }

    /// Any message proves its sender alive. When that is news, or the sender `restarted`, every
    /// term this server leads restarts its grace period (the peer's reports are needed before a
    /// new list), a restarted peer's lists are dropped, and primaries are re-elected.
    fn on_peer_heard(
        &mut self,
        from: &str,
        restarted: bool,
        now: Duration,
    ) -> Result<(), MeshError> {
        let Some(peer) = self.peers.get_mut(from) else {
            return Err(MeshError::UnknownPeer(from.to_owned()));
        };
        peer.last_heard = Some(now);
        let came_alive = !peer.alive;
        peer.alive = true;
        if came_alive || restarted {
            for r in self.rooms.values_mut() {
                if restarted {
                    r.remote.remove(from);
                }
                if let Some(lead) = &mut r.lead {
                    lead.enter_grace(now);
                }
            }
            // Liveness changed only now; otherwise primaries stand (rooms are many, messages
            // more).
            self.refresh_primaries(now);
        }
        Ok(())
    }

    /// The full set of rooms a peer has participants in: it replaces the previous set, and the
    /// peer's lists for rooms it left are dropped. Rooms that cannot be kept (invalid name, room
    /// limit) are refused with the last such error, the others still apply.
    fn on_room_membership(&mut self, from: &str, rooms: Vec<String>) -> Result<(), MeshError> {
        let mut set = BTreeSet::new();
        let mut result = Ok(());
        for room in rooms {
            match self.ensure_room(&room) {
                Ok(_) => {
                    set.insert(room);
                }
                Err(e) => result = Err(e),
            }
        }
        if let Some(peer) = self.peers.get_mut(from) {
            let left: Vec<String> = peer.rooms.difference(&set).cloned().collect();
            peer.rooms = set;
            for room in left {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.remote.remove(from);
                }
            }
        }
        result
    }

    /// A member's local top list, to this server as (it believes) the room's primary. The list
    /// also acknowledges the epoch the member mixes: when that lags this server's current term,
    /// the member missed a global list and is sent it again.
    fn on_local_top_list(
        &mut self,
        from: &str,
        room: &str,
        seq: u64,
        epoch: u64,
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
        r.remote.insert(
            from.to_owned(),
            RemoteList {
                seq,
                received: now,
                epoch,
                candidates: sanitize_candidates(candidates, limit),
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

    /// A global top list. Accepted only from the server this one considers the room's primary
    /// and only if its epoch is not below the current list's (see the module doc's epoch rules);
    /// a list that names another sender as its primary is an error.
    fn on_global_top_list(
        &mut self,
        from: &str,
        room: &str,
        epoch: u64,
        primary: ServerId,
        (list, names): (Vec<StreamKey>, Vec<String>),
        margin: Vec<StreamKey>,
    ) -> Result<(), MeshError> {
        if primary != from {
            return Err(MeshError::invalid(
                "global top list",
                format!("sent by {from:?} but names {primary:?} as its primary"),
            ));
        }
        self.ensure_room(room)?;
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
        };
        let changed = r
            .current
            .as_ref()
            .is_none_or(|c| c.epoch != new.epoch || c.primary != new.primary);
        r.current = Some(new);
        if changed {
            // Acknowledge at once (the local list carries the epoch we now mix).
            r.next_rank = None;
        }
        self.counters.lists_accepted += 1;
        Ok(())
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
        let timeout = self.config.heartbeat_timeout();
        for peer in self.peers.values_mut() {
            if peer.alive
                && peer
                    .last_heard
                    .is_none_or(|t| now.saturating_sub(t) > timeout)
            {
                peer.alive = false;
            }
        }
        self.refresh_primaries(now);

        if now >= self.next_heartbeat {
            let sent_at_us = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
            for id in self.peers.keys() {
                self.outbox.push(Outgoing {
                    to: id.clone(),
                    msg: ControlMessage::Heartbeat {
                        sent_at_us,
                        incarnation: self.incarnation,
                        generation: self.generation,
                    },
                });
            }
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }

        if self.membership_dirty || now >= self.next_membership {
            let rooms: Vec<String> = self
                .rooms
                .iter()
                .filter(|(_, r)| r.local_participants > 0)
                .map(|(n, _)| n.clone())
                .collect();
            for id in self.peers.keys() {
                self.outbox.push(Outgoing {
                    to: id.clone(),
                    msg: ControlMessage::RoomMembership {
                        rooms: rooms.clone(),
                    },
                });
            }
            self.membership_dirty = false;
            self.next_membership = now + self.config.membership_refresh;
        }

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

    // ----- internals -------------------------------------------------------------------------

    fn primary_in(&self, order: &[ServerId]) -> Option<ServerId> {
        primary_of(order, &self.self_id, self.in_plan, &self.peers)
    }

    fn ensure_room(&mut self, room: &str) -> Result<&mut Room, MeshError> {
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

    fn refresh_primaries(&mut self, now: Duration) {
        for r in self.rooms.values_mut() {
            update_primary(
                r,
                &self.self_id,
                self.in_plan,
                &self.peers,
                now,
                &mut self.counters,
            );
        }
    }

    fn send_local_list(&mut self, name: &str, now: Duration) {
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
        let candidates: Vec<Candidate> = r
            .local_candidates
            .iter()
            .filter(|c| c.voice)
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
            },
        });
    }

    /// Live peers with participants in `room` (by membership or a fresh local list), sorted.
    fn members(&self, room: &str, now: Duration) -> Vec<ServerId> {
        let ttl = self.list_ttl();
        let r = self.rooms.get(room);
        self.peers
            .iter()
            .filter(|(id, p)| {
                p.alive
                    && (p.rooms.contains(room)
                        || r.and_then(|r| r.remote.get(*id))
                            .is_some_and(|l| now.saturating_sub(l.received) <= ttl))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether a server that announced participants in `room` recently is now unreachable. It
    /// cannot be mixing the current list (it never got it), so consistency counts it as a miss
    /// until the room linger passes: a partition shows up in the metric, not only a slow peer.
    fn has_unreachable_member(&self, room: &str, now: Duration) -> bool {
        self.peers.values().any(|p| {
            !p.alive
                && p.rooms.contains(room)
                && p.last_heard
                    .is_some_and(|heard| now.saturating_sub(heard) <= self.config.room_linger)
        })
    }

    fn list_ttl(&self) -> Duration {
        self.mixing
            .rank_interval
            .saturating_mul(4)
            .max(self.config.heartbeat_timeout())
    }

    fn step_primary(&mut self, name: &str, now: Duration) {
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

        let mut eligible: Vec<(StreamKey, f32)> = Vec::new();
        let mut identities: BTreeMap<StreamKey, String> = BTreeMap::new();
        let mut note = |key: &StreamKey, c: &Candidate| {
            if let Some(identity) = &c.identity {
                identities.insert(key.clone(), identity.clone());
            }
        };
        if local_participants > 0 {
            for c in r.local_candidates.iter().filter(|c| c.voice) {
                let key = StreamKey::new(self_id.clone(), c.stream);
                note(&key, c);
                eligible.push((key, c.importance));
            }
        }
        for (server, l) in &r.remote {
            let live = peers.get(server).is_some_and(|p| p.alive);
            if !live || now.saturating_sub(l.received) > ttl {
                continue;
            }
            for c in l.candidates.iter().filter(|c| c.voice) {
                let key = StreamKey::new(server.clone(), c.stream);
                note(&key, c);
                eligible.push((key, c.importance));
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
            merge_top_list(prev, &eligible, mixing.top_n, mixing.extra, hysteresis);
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
        if changed {
            let current = r.current.as_ref().map_or(0, |c| c.epoch);
            lead.epoch = lead
                .epoch
                .max(r.max_epoch_seen)
                .max(current)
                .saturating_add(1);
            lead.force_new_epoch = false;
            lead.list = list;
            lead.margin = margin;
            lead.names = names;
            r.max_epoch_seen = lead.epoch;
            r.current = Some(GlobalList {
                epoch: lead.epoch,
                primary: self_id.clone(),
                list: lead.list.clone(),
                margin: lead.margin.clone(),
                names: lead.names.clone(),
            });
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

        // Consistency: on the frame grid, does every member mix the current epoch?
        if local_participants > 0 || !members.is_empty() {
            let consistent = !unreachable
                && members
                    .iter()
                    .all(|m| r.remote.get(m).is_some_and(|l| l.epoch == lead.epoch));
            let mut next = lead.next_tick.unwrap_or(now);
            let mut n = 0;
            while next <= now && n < 1000 {
                self.counters.ticks += 1;
                if consistent {
                    self.counters.consistent_ticks += 1;
                }
                next += mixing.frame;
                n += 1;
            }
            if next <= now {
                next = now + mixing.frame;
            }
            lead.next_tick = Some(next);
        } else {
            lead.next_tick = None;
        }
    }

    fn room_is_idle(&mut self, name: &str, now: Duration) -> bool {
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

    fn forwards(&self, r: &Room, stream: StreamId) -> bool {
        r.local_participants > 0
            && r.current
                .as_ref()
                .is_some_and(|g| g.forwards(&self.self_id, stream))
            && r.local_candidates
                .iter()
                .any(|c| c.stream == stream && c.voice)
    }

    fn room_targets(&self, room: &str) -> Vec<ServerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive && p.rooms.contains(room))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Re-elect the primary of one room; on a change, start or end this server's term and send the
/// local list to the new primary at the next poll.
fn update_primary(
    r: &mut Room,
    self_id: &str,
    in_plan: bool,
    peers: &BTreeMap<ServerId, Peer>,
    now: Duration,
    counters: &mut MeshCounters,
) {
    let p = primary_of(&r.order, self_id, in_plan, peers);
    if p == r.primary {
        return;
    }
    if p.as_deref() == Some(self_id) {
        r.lead = Some(Lead::new(now));
        counters.takeovers += 1;
    } else {
        r.lead = None;
    }
    r.primary = p;
    r.next_rank = None;
}

fn primary_of(
    order: &[ServerId],
    self_id: &str,
    in_plan: bool,
    peers: &BTreeMap<ServerId, Peer>,
) -> Option<ServerId> {
    order
        .iter()
        .find(|id| {
            if id.as_str() == self_id {
                in_plan
            } else {
                peers.get(*id).is_some_and(|p| p.alive)
            }
        })
        .cloned()
}

fn global_message(room: &str, self_id: &str, lead: &Lead) -> ControlMessage {
    ControlMessage::GlobalTopList {
        room: room.to_owned(),
        epoch: lead.epoch,
        primary: self_id.to_owned(),
        list: lead.list.clone(),
        margin: lead.margin.clone(),
        names: lead.names.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, i: u64) -> StreamKey {
        StreamKey::new(s, i)
    }

    #[test]
    fn mesh_merge_ranks_by_importance_then_key() {
        let eligible = vec![
            (key("b", 1), -20.0),
            (key("a", 1), -20.0),
            (key("c", 1), -10.0),
            (key("c", 2), -50.0),
        ];
        let (list, margin) = merge_top_list(&[], &eligible, 2, 1, 3.0);
        assert_eq!(list, vec![key("a", 1), key("c", 1)]);
        assert_eq!(margin, vec![key("b", 1)]);
    }

    #[test]
    fn mesh_merge_has_hysteresis() {
        let prev = vec![key("a", 1)];
        let eligible = vec![(key("a", 1), -20.0), (key("b", 1), -18.0)];
        let (list, _) = merge_top_list(&prev, &eligible, 1, 0, 3.0);
        assert_eq!(list, vec![key("a", 1)], "2 dB louder is not enough");
        let eligible = vec![(key("a", 1), -20.0), (key("b", 1), -16.0)];
        let (list, _) = merge_top_list(&prev, &eligible, 1, 0, 3.0);
        assert_eq!(list, vec![key("b", 1)], "4 dB louder replaces");
    }

    #[test]
    fn mesh_merge_follows_the_local_ranking_rules() {
        // NaN and silence never make the list; a duplicate counts at its loudest entry.
        let eligible = vec![
            (key("a", 1), f32::NAN),
            (key("a", 2), -90.0),
            (key("b", 1), -40.0),
            (key("b", 1), -5.0),
            (key("c", 1), -20.0),
        ];
        let (list, margin) = merge_top_list(&[], &eligible, 1, 5, 3.0);
        assert_eq!(list, vec![key("b", 1)]);
        assert_eq!(margin, vec![key("c", 1)]);
    }

    #[test]
    fn mesh_rendezvous_is_a_permutation_and_stable() {
        let nodes: Vec<ServerId> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let o1 = rendezvous_order("room", &nodes);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(o1, rendezvous_order("room", &reversed));
        let mut sorted = o1.clone();
        sorted.sort();
        assert_eq!(sorted, nodes);
    }

    #[test]
    fn mesh_candidates_are_sanitised() {
        let c = sanitize_candidates(
            vec![
                Candidate {
                    stream: StreamId(1),
                    importance: f32::NAN,
                    voice: true,
                    identity: None,
                },
                Candidate {
                    stream: StreamId(2),
                    importance: 40.0,
                    voice: true,
                    identity: None,
                },
                Candidate {
                    stream: StreamId(2),
                    importance: -90.0,
                    voice: true,
                    identity: None,
                },
            ],
            8,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].stream, StreamId(2));
        assert_eq!(c[0].importance, 0.0);
        assert_eq!(c[1].importance, -127.0);
    }
}
