//! Rooms: the glue between WebRTC peers ([`crate::endpoint`]) and the pure mixer
//! ([`crate::media::RoomMixer`]).
//!
//! Each room is one task that owns its mixer, so the mixer needs no lock. The task:
//! - takes joins and leaves as commands;
//! - receives every participant's packets through one bounded channel (a slow room drops packets
//!   and counts them rather than blocking the socket task);
//! - every `frame_ms`, ticks the mixer and hands each participant one Opus frame: its own mix if it
//!   is a selected speaker, else the one shared frame (the same `Bytes`, not a copy);
//! - ends when its last participant leaves.
//!
//! Limits (participants per server and per room, rooms per server) are checked before any WebRTC
//! work starts, so a full server costs a refused request and nothing more.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::endpoint::{InboundAudio, MediaPort, PeerHandle, PeerSender, PeerState};
use crate::media::{AudioLevel, InboundPacket, RoomMixer, StreamId, StreamOrigin};
use crate::mesh::wire::{DatagramLevel, MediaDatagram, MeshCandidate, unix_micros_now};
use crate::mesh::{ServerId, StreamKey};
use crate::mesh_node::{MeshNode, RemotePacket, RoomLink, RoomView};
use crate::metrics::Metrics;

/// Packets waiting for a room task before new ones are dropped (about 2 s of 50 talkers).
const ROOM_QUEUE: usize = 5000;

/// Why a join or leave was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The SDP offer cannot be answered.
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
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
    /// Something on our side failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl JoinError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            JoinError::BadOffer(_) => "bad_offer",
            JoinError::RoomFull { .. } => "room_full",
            JoinError::ServerFull { .. } => "server_full",
            JoinError::TooManyRooms { .. } => "too_many_rooms",
            JoinError::NotFound => "not_found",
            JoinError::Internal(_) => "internal",
        }
    }
}

/// A successful join.
#[derive(Debug)]
pub struct Joined {
    /// The participant's id (unique on this server).
    pub id: u64,
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
}

/// One participant as others see it.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantInfo {
    /// Participant id.
    pub id: u64,
    /// The identity from the join token.
    pub identity: String,
    /// Whether they are mixed right now.
    pub speaking: bool,
}

enum Command {
    Join {
        id: u64,
        identity: String,
        peer: PeerHandle,
    },
    Leave {
        id: u64,
        done: oneshot::Sender<bool>,
    },
}

struct RoomHandle {
    commands: mpsc::Sender<Command>,
    info: Arc<Mutex<RoomInfo>>,
    members: Arc<AtomicUsize>,
}

/// Every room of this server.
pub struct Rooms {
    config: Arc<Config>,
    port: Arc<MediaPort>,
    metrics: Arc<Metrics>,
    mesh: Option<MeshNode>,
    rooms: Mutex<HashMap<String, RoomHandle>>,
    participants: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms")
            .field("participants", &self.participants.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Rooms {
    /// Rooms served through `port`.
    pub fn new(
        config: Arc<Config>,
        port: Arc<MediaPort>,
        metrics: Arc<Metrics>,
        mesh: Option<MeshNode>,
    ) -> Self {
        Self {
            config,
            port,
            metrics,
            mesh,
            rooms: Mutex::new(HashMap::new()),
            participants: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomHandle>> {
        self.rooms
            .lock()
            .expect("rooms lock is never poisoned: nothing panics while holding it")
    }

    /// Admit `identity` to `room` with an SDP offer.
    pub async fn join(&self, room: &str, identity: &str, offer: &str) -> Result<Joined, JoinError> {
        self.reap();
        self.check_limits(room)?;
        // Reserve the seat before the (slow) WebRTC work, so concurrent joins cannot overshoot.
        let total = self.participants.fetch_add(1, Ordering::SeqCst) + 1;
        if total > self.config.max_participants {
            self.participants.fetch_sub(1, Ordering::SeqCst);
            return Err(JoinError::ServerFull {
                max: self.config.max_participants,
            });
        }
        let accepted = self.port.accept(offer).await;
        let (answer, peer) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                self.participants.fetch_sub(1, Ordering::SeqCst);
                return Err(match e.category() {
                    "internal" => JoinError::Internal(e.to_string()),
                    _ => JoinError::BadOffer(e.to_string()),
                });
            }
        };
        let id = peer.id;
        let commands = {
            let mut rooms = self.lock();
            let handle = rooms
                .entry(room.to_owned())
                .or_insert_with(|| self.spawn_room(room));
            handle.members.fetch_add(1, Ordering::SeqCst);
            handle.commands.clone()
        };
        self.metrics
            .participants
            .set(self.participants.load(Ordering::SeqCst) as i64);
        commands
            .send(Command::Join {
                id,
                identity: identity.to_owned(),
                peer,
            })
            .await
            .map_err(|_| JoinError::Internal("room task ended".to_owned()))?;
        Ok(Joined { id, answer })
    }

    fn check_limits(&self, room: &str) -> Result<(), JoinError> {
        let rooms = self.lock();
        match rooms.get(room) {
            Some(h) if h.members.load(Ordering::SeqCst) >= self.config.max_room_participants => {
                Err(JoinError::RoomFull {
                    max: self.config.max_room_participants,
                })
            }
            None if rooms.len() >= self.config.max_rooms => Err(JoinError::TooManyRooms {
                max: self.config.max_rooms,
            }),
            _ => Ok(()),
        }
    }

    /// Remove participant `id` from `room`.
    pub async fn leave(&self, room: &str, id: u64) -> Result<(), JoinError> {
        let commands = self
            .lock()
            .get(room)
            .map(|h| h.commands.clone())
            .ok_or(JoinError::NotFound)?;
        let (done, found) = oneshot::channel();
        commands
            .send(Command::Leave { id, done })
            .await
            .map_err(|_| JoinError::NotFound)?;
        match found.await {
            Ok(true) => Ok(()),
            _ => Err(JoinError::NotFound),
        }
    }

    /// A snapshot of `room`, if anybody is in it.
    pub fn info(&self, room: &str) -> Option<RoomInfo> {
        self.lock().get(room).map(|h| {
            h.info
                .lock()
                .expect("room info lock is never poisoned")
                .clone()
        })
    }

    fn spawn_room(&self, name: &str) -> RoomHandle {
        let (tx, rx) = mpsc::channel(64);
        let info = Arc::new(Mutex::new(RoomInfo {
            room: name.to_owned(),
            ..RoomInfo::default()
        }));
        let members = Arc::new(AtomicUsize::new(0));
        let link = self.mesh.as_ref().map(|node| node.open_room(name));
        let mesh = self
            .mesh
            .as_ref()
            .zip(link.as_ref())
            .map(|(node, link)| RoomMesh {
                room_hash: link.room_hash,
                node: node.clone(),
                remote_ids: HashMap::new(),
                remote_last_seen: HashMap::new(),
                next_remote: 0,
                forward: HashMap::new(),
            });
        let task = RoomTask {
            name: name.to_owned(),
            mesh,
            link,
            port: self.port.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            info: info.clone(),
            members: members.clone(),
            server_participants: self.participants.clone(),
        };
        self.metrics.rooms.inc();
        tokio::spawn(task.run(rx));
        RoomHandle {
            commands: tx,
            info,
            members,
        }
    }

    /// Forget rooms whose task has ended (their last participant left).
    pub fn reap(&self) {
        let mut rooms = self.lock();
        // The rooms gauge already went down when each room's task ended.
        rooms.retain(|_, h| !h.commands.is_closed());
    }
}

struct Member {
    identity: String,
    outbound: PeerSender,
    state: tokio::sync::watch::Receiver<PeerState>,
}

/// A room's side of the mesh: its link, and the ids its remote streams have in its mixer.
struct RoomMesh {
    node: MeshNode,
    room_hash: u64,
    /// Remote streams get mixer ids from a range local participants never use.
    remote_ids: HashMap<StreamKey, StreamId>,
    remote_last_seen: HashMap<StreamId, Instant>,
    next_remote: u64,
    /// Local stream id → servers to forward it to, from the latest view.
    forward: HashMap<u64, Vec<ServerId>>,
}

/// Local participant ids come from the media port's counter; remote streams count down from here.
const REMOTE_ID_BASE: u64 = 1 << 62;
/// A remote stream unheard for this long leaves the mixer.
const REMOTE_IDLE: Duration = Duration::from_secs(5);

impl RoomMesh {
    fn remote_id(&mut self, key: &StreamKey, mixer: &mut RoomMixer) -> StreamId {
        if let Some(id) = self.remote_ids.get(key) {
            return *id;
        }
        let id = StreamId(REMOTE_ID_BASE + self.next_remote);
        self.next_remote += 1;
        mixer.add_stream(id, StreamOrigin::Remote);
        self.remote_ids.insert(key.clone(), id);
        id
    }

    /// Apply the latest view: mix exactly the global list; remember what to forward.
    fn apply_view(&mut self, view: RoomView, mixer: &mut RoomMixer) {
        self.forward = view.forward.into_iter().collect();
        let selection = view.selection.map(|list| {
            list.iter()
                .map(|key| {
                    if key.server == self.node.self_id() {
                        StreamId(key.stream)
                    } else {
                        self.remote_id(key, mixer)
                    }
                })
                .collect()
        });
        mixer.set_selection(selection);
    }

    fn drop_idle_remotes(&mut self, mixer: &mut RoomMixer) {
        let now = Instant::now();
        let idle: Vec<StreamId> = self
            .remote_ids
            .values()
            .copied()
            .filter(|id| {
                self.remote_last_seen
                    .get(id)
                    .is_none_or(|seen| now.duration_since(*seen) > REMOTE_IDLE)
            })
            .collect();
        // A stream on the current list stays, even if quiet: the list says to mix it.
        let listed = mixer
            .selection()
            .map(<[StreamId]>::to_vec)
            .unwrap_or_default();
        for id in idle.into_iter().filter(|id| !listed.contains(id)) {
            mixer.remove_stream(id);
            self.remote_ids.retain(|_, v| *v != id);
            self.remote_last_seen.remove(&id);
        }
    }
}

struct RoomTask {
    name: String,
    mesh: Option<RoomMesh>,
    link: Option<RoomLink>,
    port: Arc<MediaPort>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    info: Arc<Mutex<RoomInfo>>,
    members: Arc<AtomicUsize>,
    server_participants: Arc<AtomicUsize>,
}

impl RoomTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mixer = RoomMixer::new(self.config.mixer());
        let mut mixer = match mixer {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(room = %self.name, error = %e, "cannot start the mixer");
                self.metrics.rooms.dec();
                return;
            }
        };
        let epoch = Instant::now();
        let frame = Duration::from_millis(u64::from(self.config.frame_ms));
        let samples = 48 * self.config.frame_ms;
        let (packets_tx, mut packets) = mpsc::channel::<(StreamId, InboundAudio)>(ROOM_QUEUE);
        let mut members: BTreeMap<u64, Member> = BTreeMap::new();
        let mut ticker = tokio::time::interval(frame);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let rank_every = (self.config.rank_interval_ms / self.config.frame_ms).max(1);
        let mut tick_count: u32 = 0;
        let mut reported_voiced: Vec<StreamId> = Vec::new();
        // This room's share of the server-wide active-speakers gauge.
        let mut active: i64 = 0;

        let mut mesh = self.mesh.take();
        let (mut remote_inbox, mut view) = match self.link.take() {
            Some(link) => (Some(link.inbox), Some(link.view)),
            None => (None, None),
        };
        loop {
            tokio::select! {
                Some(remote) = recv_remote(&mut remote_inbox) => {
                    if let Some(m) = mesh.as_mut() {
                        let stream = m.remote_id(&remote.key, &mut mixer);
                        m.remote_last_seen.insert(stream, remote.arrival);
                        let d = remote.datagram;
                        let packet = InboundPacket {
                            stream,
                            seq: d.seq,
                            rtp_timestamp: d.rtp_timestamp,
                            payload: d.payload,
                            level: d.level.map(|l| AudioLevel { dbov: l.dbov, voice: l.voice }),
                            arrival: remote.arrival.saturating_duration_since(epoch),
                        };
                        if let Err(e) = mixer.push(packet) {
                            self.metrics.packets_dropped.with_label_values(&[e.category()]).inc();
                        }
                    }
                }
                Some(latest) = view_changed(&mut view) => {
                    if let Some(m) = mesh.as_mut() {
                        m.apply_view(latest, &mut mixer);
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Join { id, identity, peer }) => {
                        let PeerHandle { inbound, outbound, state, .. } = peer;
                        let stream = StreamId(id);
                        mixer.add_stream(stream, StreamOrigin::Local);
                        spawn_forwarder(stream, inbound, packets_tx.clone(), self.metrics.clone());
                        members.insert(id, Member { identity, outbound, state });
                        tracing::info!(room = %self.name, participant = id, "joined");
                    }
                    Some(Command::Leave { id, done }) => {
                        let found = self.remove(&mut mixer, &mut members, id);
                        let _ = done.send(found);
                    }
                    None => break,
                },
                Some((stream, audio)) = packets.recv() => {
                    self.metrics.packets_received.inc();
                    if let Some(m) = mesh.as_ref()
                        && let Some(targets) = m.forward.get(&stream.0)
                        && !targets.is_empty()
                    {
                        let datagram = MediaDatagram {
                            room_hash: m.room_hash,
                            stream: stream.0,
                            seq: audio.seq,
                            rtp_timestamp: audio.rtp_timestamp,
                            level: audio.level.map(|(dbov, voice)| DatagramLevel { dbov, voice }),
                            ingress_us: unix_micros_now()
                                .saturating_sub(u64::try_from(audio.arrival.elapsed().as_micros()).unwrap_or(0)),
                            payload: audio.payload.clone(),
                        };
                        m.node.forward(&datagram, targets);
                    }
                    let packet = InboundPacket {
                        stream,
                        seq: audio.seq,
                        rtp_timestamp: audio.rtp_timestamp,
                        payload: audio.payload,
                        level: audio.level.map(|(dbov, voice)| AudioLevel { dbov, voice }),
                        arrival: audio.arrival.saturating_duration_since(epoch),
                    };
                    if let Err(e) = mixer.push(packet) {
                        self.metrics.packets_dropped.with_label_values(&[e.category()]).inc();
                    }
                }
                _ = ticker.tick() => {
                    let started = Instant::now();
                    let now = started.saturating_duration_since(epoch);
                    let out = mixer.tick(now);
                    self.send(&members, &out, samples);
                    self.metrics.active_speakers.add(out.mixed.len() as i64 - active);
                    active = out.mixed.len() as i64;
                    let sent = Instant::now().saturating_duration_since(epoch);
                    for (_, arrival) in &out.carried {
                        self.metrics.server_delay.observe(sent.saturating_sub(*arrival).as_secs_f64());
                    }
                    for (_, depth) in &out.stats.jitter_depth {
                        self.metrics.jitter_depth.observe(depth.as_secs_f64());
                    }
                    self.metrics.decodes_per_tick.observe(f64::from(out.stats.decodes));
                    self.metrics.encodes_per_tick.observe(f64::from(out.stats.encodes));
                    self.metrics.packets_lost.inc_by(u64::from(out.stats.lost));
                    self.metrics.concealed.with_label_values(&["plc"]).inc_by(u64::from(out.stats.plc));
                    self.metrics.concealed.with_label_values(&["fec"]).inc_by(u64::from(out.stats.fec));
                    self.metrics.ticks.inc();
                    self.metrics.tick_duration.observe(started.elapsed().as_secs_f64());

                    tick_count = tick_count.wrapping_add(1);
                    let periodic = tick_count.is_multiple_of(rank_every);
                    if let Some(m) = mesh.as_mut() {
                        // Every rank interval, and at once when the voiced candidates change: a
                        // new speaker must not wait out the interval to reach the primary.
                        let candidates = mixer.candidates();
                        let mut voiced: Vec<StreamId> =
                            candidates.iter().filter(|c| c.voice).map(|c| c.stream).collect();
                        // A set: levels reorder candidates all the time, membership rarely.
                        voiced.sort_unstable();
                        if periodic || voiced != reported_voiced {
                            reported_voiced = voiced;
                            let candidates = candidates
                                .into_iter()
                                .map(|c| MeshCandidate { stream: c.stream.0, importance: c.importance, voice: c.voice })
                                .collect();
                            m.node.report(&self.name, candidates, members.len());
                        }
                    }
                    if periodic {
                        self.publish_info(&members, &out.mixed);
                        if let Some(m) = mesh.as_mut() {
                            m.drop_idle_remotes(&mut mixer);
                        }
                        // Peers whose connection ended leave without a DELETE.
                        let gone: Vec<u64> = members
                            .iter()
                            .filter(|(_, m)| m.state.borrow().is_terminal())
                            .map(|(id, _)| *id)
                            .collect();
                        for id in gone {
                            self.remove(&mut mixer, &mut members, id);
                        }
                    }
                    if members.is_empty() && self.members.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                }
            }
        }
        self.metrics.active_speakers.sub(active);
        self.metrics.rooms.dec();
        if let Some(m) = &mesh {
            m.node.close_room(&self.name);
        }
        for id in members.keys() {
            self.port.close_peer(*id);
        }
        tracing::info!(room = %self.name, "room closed");
    }

    /// Each selected local speaker gets its own frame; everyone else shares one frame, handed to
    /// the port in one fan-out (one queue entry, one reference count per listener).
    fn send(&self, members: &BTreeMap<u64, Member>, out: &crate::media::MixOutput, samples: u32) {
        let mut speakers = std::collections::HashSet::new();
        for (stream, frame) in &out.per_speaker {
            speakers.insert(stream.0);
            if frame.is_empty() {
                continue; // the encoder failed; the mixer reported it in stats.output_errors
            }
            if let Some(member) = members.get(&stream.0)
                && let Err(e) = member.outbound.send_opus(frame.clone(), samples)
            {
                self.metrics
                    .packets_dropped
                    .with_label_values(&[e.category()])
                    .inc();
            }
        }
        let listeners: Arc<[u64]> = members
            .keys()
            .copied()
            .filter(|id| !speakers.contains(id))
            .collect();
        if !listeners.is_empty()
            && !out.shared.is_empty()
            && let Err(e) = self
                .port
                .send_opus_to_all(listeners, out.shared.clone(), samples)
        {
            self.metrics
                .packets_dropped
                .with_label_values(&[e.category()])
                .inc();
        }
    }

    fn remove(&self, mixer: &mut RoomMixer, members: &mut BTreeMap<u64, Member>, id: u64) -> bool {
        let Some(member) = members.remove(&id) else {
            return false;
        };
        mixer.remove_stream(StreamId(id));
        self.port.close_peer(id);
        self.members.fetch_sub(1, Ordering::SeqCst);
        let left = self.server_participants.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.participants.set(left as i64);
        tracing::info!(room = %self.name, participant = id, identity = %member.identity, "left");
        true
    }

    fn publish_info(&self, members: &BTreeMap<u64, Member>, mixed: &[StreamId]) {
        let speaking: Vec<u64> = mixed
            .iter()
            .map(|s| s.0)
            .filter(|id| members.contains_key(id))
            .collect();
        let mut info = self.info.lock().expect("room info lock is never poisoned");
        info.participants = members
            .iter()
            .map(|(id, m)| ParticipantInfo {
                id: *id,
                identity: m.identity.clone(),
                speaking: speaking.contains(id),
            })
            .collect();
        info.active_speakers = speaking;
    }
}

/// The next forwarded packet, or never when the room is not on a mesh.
async fn recv_remote(inbox: &mut Option<mpsc::Receiver<RemotePacket>>) -> Option<RemotePacket> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The mesh's new view of the room when it changes; never when the room is not on a mesh (or
/// the mesh is gone).
async fn view_changed(view: &mut Option<watch::Receiver<RoomView>>) -> Option<RoomView> {
    match view {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Move one peer's packets into the room's queue, tagged with its stream id.
fn spawn_forwarder(
    stream: StreamId,
    mut inbound: mpsc::Receiver<InboundAudio>,
    room: mpsc::Sender<(StreamId, InboundAudio)>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        while let Some(audio) = inbound.recv().await {
            if room.try_send((stream, audio)).is_err() {
                metrics
                    .packets_dropped
                    .with_label_values(&["room_queue_full"])
                    .inc();
                if room.is_closed() {
                    break;
                }
            }
        }
    });
}
