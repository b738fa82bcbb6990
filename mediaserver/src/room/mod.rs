//! Rooms: where participants meet. Each room is one task that owns a pure [`core::RoomCore`]
//! (members, the mixer, forwarding and reporting rules) and its members' transports.
//!
//! Parts:
//! - `mod.rs` (this file): [`Rooms`], the server's registry. It checks limits, reserves seats,
//!   accepts a WebRTC offer straight into the room's packet queue, and hands the room a
//!   participant with its transport.
//! - [`core`]: the room's pure core, tested in virtual time.
//! - `task.rs`: the room's task, the thin IO shell around the core.
//! - [`transport`]: the [`transport::Transport`] interface a participant's transport implements
//!   (a WebRTC peer today), separate from the participant itself.
//!
//! Invariants:
//! - limits (participants per server and per room, rooms per server) are checked and seats
//!   reserved before any WebRTC work starts, so a full server costs a refused request and
//!   concurrent joins cannot overshoot;
//! - a participant id is the server's, not its transport's: it stays the same for the
//!   participant's whole stay;
//! - a room removes itself from the registry under the registry's lock, only when it has no
//!   member and no join in flight, so a join never lands in a room that is ending;
//! - every join error keeps its type ([`JoinError`]) up to the HTTP status.

pub mod core;
mod task;
mod tick_timer;
pub mod transport;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use self::core::{ParticipantId, RoomCore};
use self::task::{Command, RoomTask};
use self::transport::{Transport, WebRtcTransport};
use crate::config::Config;
use crate::endpoint::{AudioSink, EndpointError, InboundAudio, MediaPort};
use crate::media::{MediaError, MixerConfig};
use crate::mesh_node::MeshNode;
use crate::metrics::Metrics;

/// Packets waiting for a room task before new ones are dropped (about 2 s of 50 talkers).
const ROOM_QUEUE: usize = 5000;

/// Why a join or leave was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The media endpoint refused: a bad or unsupported offer, a failed negotiation, a full or
    /// closed media port.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The room's mixer could not start with the running settings.
    #[error("the room cannot start: {0}")]
    Mixer(#[from] MediaError),
    /// The room has its maximum of participants.
    #[error("room is full ({max} participants)")]
    RoomFull {
        /// The limit.
        max: usize,
    },
    /// This server has its maximum of participants.
    #[error("server is full ({max} participants); try another server of the region")]
    ServerFull {
        /// The limit.
        max: usize,
    },
    /// This server hosts its maximum of rooms.
    #[error("server hosts its maximum of {max} rooms")]
    TooManyRooms {
        /// The limit.
        max: usize,
    },
    /// No such participant in that room.
    #[error("no such participant in this room")]
    NotFound,
    /// The room's task ended while the join was in flight (the server is shutting down).
    #[error("the room closed while joining")]
    RoomClosed,
    /// The participant moved its session to another device: this device's token no longer
    /// speaks for it.
    #[error("the participant moved to another device; this device's session is over")]
    Moved,
}

impl JoinError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            JoinError::Endpoint(e) => e.category(),
            JoinError::Mixer(e) => e.category(),
            JoinError::RoomFull { .. } => "room_full",
            JoinError::ServerFull { .. } => "server_full",
            JoinError::TooManyRooms { .. } => "too_many_rooms",
            JoinError::NotFound => "not_found",
            JoinError::RoomClosed => "room_closed",
            JoinError::Moved => "moved",
        }
    }
}

/// A successful join.
#[derive(Debug)]
pub struct Joined {
    /// The participant's id (unique on this server, stable for its stay).
    pub id: ParticipantId,
    /// The SDP answer.
    pub answer: String,
}

/// What `GET /v1/rooms/{room}` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomInfo {
    /// The room's name.
    pub room: String,
    /// Everyone connected here.
    pub participants: Vec<ParticipantInfo>,
    /// Participant ids being mixed right now.
    pub active_speakers: Vec<u64>,
    /// Speakers on other servers of the conference whom the room's global list names.
    pub remote_speakers: Vec<RemoteSpeakerInfo>,
}

/// A speaker connected to another server of the conference, as this server's participants see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteSpeakerInfo {
    /// The identity from the speaker's join token ("" when its server did not say).
    pub identity: String,
    /// The server the speaker is connected to.
    pub server: String,
    /// Whether they are mixed and voice-active right now (a listed speaker resting in their
    /// slot through a pause is listed, not speaking).
    pub speaking: bool,
}

/// One participant as others see it.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantInfo {
    /// Participant id.
    pub id: u64,
    /// The identity from the join token.
    pub identity: String,
    /// Whether they are mixed and voice-active right now (a listed speaker resting in their
    /// slot through a pause is in `active_speakers`, not speaking).
    pub speaking: bool,
}

struct RoomHandle {
    /// Tells this room from an earlier or later one of the same name.
    instance: u64,
    commands: mpsc::Sender<Command>,
    packets: mpsc::Sender<InboundAudio>,
    info: Arc<Mutex<RoomInfo>>,
    /// Members plus joins in flight: the room's seats taken.
    seats: Arc<AtomicUsize>,
}

/// A new device's transport, negotiated and not yet swapped in (see
/// [`Rooms::prepare_transfer`]). Dropped unused, it is closed.
#[derive(Debug)]
pub struct PreparedTransport {
    tag: u64,
    transport: Option<Box<dyn Transport>>,
}

impl Drop for PreparedTransport {
    fn drop(&mut self) {
        if let Some(t) = self.transport.take() {
            t.close();
        }
    }
}

/// The rooms of a server and its seat counts, shared with every room task.
pub(crate) struct Registry {
    rooms: Mutex<HashMap<String, RoomHandle>>,
    /// Per participant that moved (or is watched for moving): its transport generation, 0 for
    /// the device it joined with, one more per transfer. Dropped when it leaves.
    generations: Mutex<HashMap<(String, ParticipantId), watch::Sender<u64>>>,
    /// Participants on this server plus joins in flight.
    participants: AtomicUsize,
    next_participant: AtomicU64,
    next_instance: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, RoomHandle>> {
        self.rooms
            .lock()
            .expect("rooms lock is never poisoned: nothing panics while holding it")
    }

    fn generations(&self) -> MutexGuard<'_, HashMap<(String, ParticipantId), watch::Sender<u64>>> {
        self.generations
            .lock()
            .expect("generations lock is never poisoned: nothing panics while holding it")
    }

    /// The transport generation of participant `id` of `room`, and its changes.
    pub(crate) fn watch_generation(&self, room: &str, id: ParticipantId) -> watch::Receiver<u64> {
        self.generations()
            .entry((room.to_owned(), id))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Participant `id` left `room`: a later participant with its id (none: ids are not
    /// reused) starts from scratch, and watchers see the channel close.
    pub(crate) fn forget_generation(&self, room: &str, id: ParticipantId) {
        self.generations().remove(&(room.to_owned(), id));
    }

    fn set_generation(&self, room: &str, id: ParticipantId, generation: u64) {
        self.generations()
            .entry((room.to_owned(), id))
            .or_insert_with(|| watch::channel(0).0)
            .send_replace(generation);
    }

    /// A member of room `name` (instance `instance`) left: free its seats.
    fn left(&self, name: &str, instance: u64, metrics: &Metrics) {
        if let Some(h) = self.lock().get(name).filter(|h| h.instance == instance) {
            h.seats.fetch_sub(1, Ordering::SeqCst);
        }
        let left = self.participants.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics
            .participants
            .set(i64::try_from(left).unwrap_or(i64::MAX));
    }

    /// Remove room `name` if it is still instance `instance` and no seat is taken. Returns
    /// whether the room is gone from the registry (then its task ends).
    fn end_room(&self, name: &str, instance: u64) -> bool {
        let mut rooms = self.lock();
        match rooms.get(name) {
            Some(h) if h.instance == instance => {
                if h.seats.load(Ordering::SeqCst) == 0 {
                    rooms.remove(name);
                    true
                } else {
                    false
                }
            }
            // Replaced or removed already: nobody can reach this room any more.
            _ => true,
        }
    }
}

/// A seat on the server, given back unless the join completes.
struct Seat<'a> {
    registry: &'a Registry,
    room: Option<(String, u64)>,
    kept: bool,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.registry.participants.fetch_sub(1, Ordering::SeqCst);
        if let Some((name, instance)) = &self.room
            && let Some(h) = self
                .registry
                .lock()
                .get(name)
                .filter(|h| h.instance == *instance)
        {
            h.seats.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Every room of this server.
pub struct Rooms {
    config: Arc<Config>,
    port: Arc<MediaPort>,
    metrics: Arc<Metrics>,
    mesh: Option<MeshNode>,
    /// The mixing settings every room runs: the plan's on a mesh, the flags' alone.
    mixing: watch::Receiver<MixerConfig>,
    /// Alone, the settings never change; the sender is kept so rooms wait on it quietly.
    _fixed_mixing: Option<watch::Sender<MixerConfig>>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms")
            .field(
                "participants",
                &self.registry.participants.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Rooms {
    /// Rooms served through `port`. On a mesh, every room mixes with the plan's settings and
    /// follows their changes; alone, with `config`'s.
    pub fn new(
        config: Arc<Config>,
        port: Arc<MediaPort>,
        metrics: Arc<Metrics>,
        mesh: Option<MeshNode>,
    ) -> Self {
        let (mixing, fixed) = match &mesh {
            Some(node) => (node.mixing(), None),
            None => {
                let (tx, rx) = watch::channel(config.mixer());
                (rx, Some(tx))
            }
        };
        Self {
            config,
            port,
            metrics,
            mesh,
            mixing,
            _fixed_mixing: fixed,
            registry: Arc::new(Registry {
                rooms: Mutex::new(HashMap::new()),
                generations: Mutex::new(HashMap::new()),
                participants: AtomicUsize::new(0),
                next_participant: AtomicU64::new(1),
                next_instance: AtomicU64::new(1),
            }),
        }
    }

    /// The server's media port (phone legs route their RTP through it).
    pub fn media_port(&self) -> Arc<MediaPort> {
        self.port.clone()
    }

    /// The mixing settings rooms run now.
    pub fn mixing(&self) -> MixerConfig {
        *self.mixing.borrow()
    }

    /// Admit `identity` to `room` with an SDP offer.
    pub async fn join(&self, room: &str, identity: &str, offer: &str) -> Result<Joined, JoinError> {
        let port = self.port.clone();
        let mut answer = String::new();
        let id = self
            .admit(room, identity, async |sink: AudioSink| {
                let (sdp, link) = port.accept_into(offer, sink).await?;
                answer = sdp;
                Ok(Box::new(WebRtcTransport::new(link, port.clone())) as Box<dyn Transport>)
            })
            .await?;
        Ok(Joined { id, answer })
    }

    /// Admit `identity` to `room` over a transport that is not a WebRTC peer of this server's
    /// port (a phone leg): `connect` gets the room's packet sink, tagged with the new
    /// participant's id, and returns the transport. The same limits and seats apply.
    pub async fn join_transport(
        &self,
        room: &str,
        identity: &str,
        connect: impl FnOnce(AudioSink) -> Result<Box<dyn Transport>, JoinError>,
    ) -> Result<ParticipantId, JoinError> {
        self.admit(room, identity, async |sink: AudioSink| connect(sink))
            .await
    }

    /// Reserve a seat, connect the transport into the room's queue, hand the room the member.
    async fn admit(
        &self,
        room: &str,
        identity: &str,
        connect: impl AsyncFnOnce(AudioSink) -> Result<Box<dyn Transport>, JoinError>,
    ) -> Result<ParticipantId, JoinError> {
        let mut seat = self.reserve(room)?;
        let id = self
            .registry
            .next_participant
            .fetch_add(1, Ordering::Relaxed);
        let (commands, packets) = {
            let rooms = self.registry.lock();
            let h = seat
                .room
                .as_ref()
                .and_then(|(name, instance)| rooms.get(name).filter(|h| h.instance == *instance))
                .ok_or(JoinError::RoomClosed)?;
            (h.commands.clone(), h.packets.clone())
        };
        let sink = AudioSink {
            queue: packets,
            tag: id,
        };
        let transport = connect(sink).await?;
        let (done, added) = oneshot::channel();
        let command = Command::Join {
            id,
            tag: id,
            identity: identity.to_owned(),
            transport,
            done,
        };
        if let Err(mpsc::error::SendError(Command::Join { transport, .. })) =
            commands.send(command).await
        {
            transport.close();
            return Err(JoinError::RoomClosed);
        }
        // The room owns the seat from here: it frees it when the participant leaves.
        seat.kept = true;
        // The answer goes out only once the room has the participant: its roster entry, its
        // events and its leave all work from the moment the client holds the answer. (A room
        // does not end while a join holds a seat, so the room task does answer.)
        if added.await.is_err() {
            return Err(JoinError::RoomClosed);
        }
        self.metrics.participants.set(
            i64::try_from(self.registry.participants.load(Ordering::SeqCst)).unwrap_or(i64::MAX),
        );
        Ok(id)
    }

    /// Mute or unmute participant `id`'s stream in `room` (while its phone speaks for it).
    pub async fn set_muted(
        &self,
        room: &str,
        id: ParticipantId,
        muted: bool,
    ) -> Result<(), JoinError> {
        self.ask_member(room, |done| Command::Mute { id, muted, done })
            .await
    }

    /// Whether participant `id` is in `room` now (as the last roster snapshot shows).
    pub fn is_member(&self, room: &str, id: ParticipantId) -> bool {
        self.registry.lock().get(room).is_some_and(|h| {
            h.info
                .lock()
                .expect("room info lock is never poisoned")
                .participants
                .iter()
                .any(|p| p.id == id)
        })
    }

    /// Take a seat on the server and in `room` (starting the room if it is new), or refuse.
    fn reserve(&self, room: &str) -> Result<Seat<'_>, JoinError> {
        let registry = &*self.registry;
        let total = registry.participants.fetch_add(1, Ordering::SeqCst) + 1;
        let mut seat = Seat {
            registry,
            room: None,
            kept: false,
        };
        if total > self.config.max_participants {
            return Err(JoinError::ServerFull {
                max: self.config.max_participants,
            });
        }
        let mut rooms = registry.lock();
        let handle = match rooms.get(room) {
            Some(h) => {
                if h.seats.load(Ordering::SeqCst) >= self.config.max_room_participants {
                    return Err(JoinError::RoomFull {
                        max: self.config.max_room_participants,
                    });
                }
                h
            }
            None => {
                if rooms.len() >= self.config.max_rooms {
                    return Err(JoinError::TooManyRooms {
                        max: self.config.max_rooms,
                    });
                }
                let handle = self.spawn_room(room)?;
                rooms.entry(room.to_owned()).or_insert(handle)
            }
        };
        handle.seats.fetch_add(1, Ordering::SeqCst);
        seat.room = Some((room.to_owned(), handle.instance));
        Ok(seat)
    }

    /// Remove participant `id` from `room`.
    pub async fn leave(&self, room: &str, id: ParticipantId) -> Result<(), JoinError> {
        self.ask_member(room, |done| Command::Leave {
            id,
            generation: None,
            done,
        })
        .await
    }

    /// Remove participant `id` from `room` at the request of the device of transport
    /// `generation` (its join token's): a device the participant moved away from cannot remove
    /// the one it moved to ([`JoinError::Moved`]).
    pub async fn leave_from(
        &self,
        room: &str,
        id: ParticipantId,
        generation: u64,
    ) -> Result<(), JoinError> {
        let current = self
            .registry
            .generations()
            .get(&(room.to_owned(), id))
            .map_or(0, |g| *g.borrow());
        if current != generation {
            return Err(JoinError::Moved);
        }
        self.ask_member(room, |done| Command::Leave {
            id,
            generation: Some(generation),
            done,
        })
        .await
    }

    /// The transport generation of participant `id` (0 until it first moves), and its changes.
    pub fn watch_generation(&self, room: &str, id: ParticipantId) -> watch::Receiver<u64> {
        self.registry.watch_generation(room, id)
    }

    /// The identity of participant `id` of `room`, if it is there.
    pub fn identity_of(&self, room: &str, id: ParticipantId) -> Option<String> {
        self.info(room)?
            .participants
            .into_iter()
            .find(|p| p.id == id)
            .map(|p| p.identity)
    }

    /// Move participant `id` of `room` to a new device whose SDP offer is `offer`: the new
    /// WebRTC peer replaces the old transport under the same participant (same id, identity,
    /// stream, place in the mix, roster entry); only the stream's jitter buffer and decoder
    /// restart. Takes no new seat. Returns the answer and the new transport generation.
    ///
    /// The offer is negotiated first: a bad offer fails here with nothing changed.
    pub async fn transfer(
        &self,
        room: &str,
        id: ParticipantId,
        offer: &str,
    ) -> Result<(String, u64), JoinError> {
        let (sdp, link) = self.prepare_transfer(room, id, offer).await?;
        self.complete_transfer(room, id, sdp, link).await
    }

    /// The first half of [`Rooms::transfer`]: negotiate the new device's offer into `room`'s
    /// queue under a fresh delivery tag, changing nothing yet. Drop the result to abandon it.
    pub async fn prepare_transfer(
        &self,
        room: &str,
        id: ParticipantId,
        offer: &str,
    ) -> Result<(String, PreparedTransport), JoinError> {
        let packets = {
            let rooms = self.registry.lock();
            let h = rooms.get(room).ok_or(JoinError::NotFound)?;
            h.packets.clone()
        };
        if !self.is_member(room, id) {
            return Err(JoinError::NotFound);
        }
        // A fresh tag: packets still queued from the old device carry the old one, which the
        // room stops accepting at the swap, so only one source ever feeds the stream.
        let tag = self
            .registry
            .next_participant
            .fetch_add(1, Ordering::Relaxed);
        let (sdp, link) = self
            .port
            .accept_into(
                offer,
                AudioSink {
                    queue: packets,
                    tag,
                },
            )
            .await?;
        Ok((
            sdp,
            PreparedTransport {
                tag,
                transport: Some(Box::new(WebRtcTransport::new(link, self.port.clone()))),
            },
        ))
    }

    /// The second half of [`Rooms::transfer`]: swap the prepared transport in.
    pub async fn complete_transfer(
        &self,
        room: &str,
        id: ParticipantId,
        sdp: String,
        mut prepared: PreparedTransport,
    ) -> Result<(String, u64), JoinError> {
        let transport = prepared
            .transport
            .take()
            .expect("a prepared transport is completed once");
        let commands = self.registry.lock().get(room).map(|h| h.commands.clone());
        let Some(commands) = commands else {
            transport.close();
            return Err(JoinError::NotFound);
        };
        let (done, result) = oneshot::channel();
        let command = Command::Replace {
            id,
            tag: prepared.tag,
            transport,
            done,
        };
        if let Err(mpsc::error::SendError(Command::Replace { transport, .. })) =
            commands.send(command).await
        {
            transport.close();
            return Err(JoinError::NotFound);
        }
        match result.await {
            Ok(Some(generation)) => {
                self.registry.set_generation(room, id, generation);
                Ok((sdp, generation))
            }
            _ => Err(JoinError::NotFound),
        }
    }

    /// Send `room` a command about one member and wait for whether the member was there.
    async fn ask_member(
        &self,
        room: &str,
        command: impl FnOnce(oneshot::Sender<bool>) -> Command,
    ) -> Result<(), JoinError> {
        let commands = self
            .registry
            .lock()
            .get(room)
            .map(|h| h.commands.clone())
            .ok_or(JoinError::NotFound)?;
        let (done, found) = oneshot::channel();
        commands
            .send(command(done))
            .await
            .map_err(|_| JoinError::NotFound)?;
        match found.await {
            Ok(true) => Ok(()),
            _ => Err(JoinError::NotFound),
        }
    }

    /// A snapshot of `room`, if anybody is in it.
    pub fn info(&self, room: &str) -> Option<RoomInfo> {
        self.registry.lock().get(room).map(|h| {
            h.info
                .lock()
                .expect("room info lock is never poisoned")
                .clone()
        })
    }

    /// Rooms open now.
    pub fn room_count(&self) -> usize {
        self.registry.lock().len()
    }

    fn spawn_room(&self, name: &str) -> Result<RoomHandle, JoinError> {
        let settings = *self.mixing.borrow();
        let link = self.mesh.as_ref().map(|node| node.open_room(name));
        let mesh = self
            .mesh
            .as_ref()
            .zip(link.as_ref())
            .map(|(node, link)| (node.self_id().to_owned(), link.room_hash));
        let core = RoomCore::new(settings, mesh)?;
        let (commands, commands_rx) = mpsc::channel(64);
        let (packets, packets_rx) = mpsc::channel(ROOM_QUEUE);
        let info = Arc::new(Mutex::new(RoomInfo {
            room: name.to_owned(),
            ..RoomInfo::default()
        }));
        let instance = self.registry.next_instance.fetch_add(1, Ordering::Relaxed);
        let task = RoomTask {
            name: name.to_owned(),
            instance,
            core,
            link,
            node: self.mesh.clone(),
            port: self.port.clone(),
            mixing: self.mixing.clone(),
            metrics: self.metrics.clone(),
            info: info.clone(),
            registry: self.registry.clone(),
            transports: std::collections::BTreeMap::new(),
            tags: HashMap::new(),
            generations: HashMap::new(),
            retiring: Vec::new(),
            last_packet: HashMap::new(),
            pending_moves: HashMap::new(),
            last_numbers: HashMap::new(),
            renumber: HashMap::new(),
            active: 0,
            fan_out: Default::default(),
        };
        self.metrics.rooms.inc();
        tokio::spawn(task.run(commands_rx, packets_rx));
        Ok(RoomHandle {
            instance,
            commands,
            packets,
            info,
            seats: Arc::new(AtomicUsize::new(0)),
        })
    }
}
