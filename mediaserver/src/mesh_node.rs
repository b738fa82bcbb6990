//! The running mesh node: the thin IO shell that drives the pure protocol
//! ([`crate::mesh::MeshNodeState`]) with the QUIC transport, and connects it to the rooms.
//!
//! One driver task owns the protocol state. It:
//! - takes control messages and media datagrams from the transport;
//! - takes each room's ranked local candidates every rank interval;
//! - polls the protocol (heartbeats, top lists) every few milliseconds and sends what it says;
//! - publishes, per room, the global list to mix and which local streams to forward where, on a
//!   `watch` channel the room task reads;
//! - routes each forwarded datagram to the room it belongs to (by its room hash);
//! - applies new mesh-plan generations live (peers added or removed, mixing parameters).
//!
//! The rooms do the per-packet work themselves (forwarding a local packet, pushing a remote one into
//! the mixer), so the driver never sits on the audio path of a room.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chorus_crds::MeshPlan;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::mesh::wire::{MediaDatagram, MeshCandidate, cross_server_delay, unix_micros_now};
use crate::mesh::{
    MeshError, MeshMetrics, MeshNodeState, MeshPeer, MeshTls, MeshTransport, ProtocolConfig,
    ServerId, StreamKey, TransportConfig,
};

/// How often the driver polls the protocol (heartbeats, lists, views).
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How often a plan file is checked for changes.
const PLAN_FILE_POLL: Duration = Duration::from_millis(500);

/// What a room should mix and forward, as the mesh sees it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomView {
    /// The global list to mix; `None` while the room has no list yet (the room mixes its local
    /// top speakers meanwhile).
    pub selection: Option<Vec<StreamKey>>,
    /// Local streams to forward, each with the servers to send it to.
    pub forward: Vec<(u64, Vec<ServerId>)>,
}

/// A forwarded packet for a room, from another server.
#[derive(Debug)]
pub struct RemotePacket {
    /// The stream, named by its origin server and its id there.
    pub key: StreamKey,
    /// The datagram as received.
    pub datagram: MediaDatagram,
    /// When it arrived here.
    pub arrival: Instant,
}

enum Event {
    RoomOpened {
        room: String,
        inbox: mpsc::Sender<RemotePacket>,
        view: watch::Sender<RoomView>,
    },
    RoomClosed {
        room: String,
    },
    Candidates {
        room: String,
        candidates: Vec<MeshCandidate>,
        participants: usize,
    },
    Plan(Box<MeshPlan>),
}

/// A room's connection to the mesh.
#[derive(Debug)]
pub struct RoomLink {
    /// Updated whenever the room's global list or forwarding changes.
    pub view: watch::Receiver<RoomView>,
    /// Forwarded packets for this room.
    pub inbox: mpsc::Receiver<RemotePacket>,
    /// The room's hash, as carried in datagrams.
    pub room_hash: u64,
}

/// A handle on the mesh node, shared by the rooms.
#[derive(Debug, Clone)]
pub struct MeshNode {
    self_id: ServerId,
    events: mpsc::Sender<Event>,
    transport: MeshTransport,
    metrics: MeshMetrics,
    generation: Arc<AtomicI64>,
}

impl MeshNode {
    /// Start the node: the QUIC transport on `socket`, the driver, and (for a file source) the
    /// plan file watcher. Must be called inside a Tokio runtime.
    pub fn start(
        self_id: &str,
        plan: MeshPlan,
        socket: std::net::UdpSocket,
        tls: &MeshTls,
        metrics: MeshMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, MeshError> {
        let peers = MeshPeer::from_plan(&plan, self_id);
        let (transport, inbound) = MeshTransport::start(
            self_id,
            socket,
            tls,
            peers,
            TransportConfig::default(),
            Some(metrics.clone()),
            shutdown.clone(),
        )?;
        let incarnation = unix_micros_now();
        let state = MeshNodeState::new(self_id, &plan, ProtocolConfig::default(), incarnation);
        let generation = Arc::new(AtomicI64::new(plan.generation));
        metrics.observe(&state);
        let (events, events_rx) = mpsc::channel(1024);
        let driver = Driver {
            state,
            transport: transport.clone(),
            metrics: metrics.clone(),
            rooms: HashMap::new(),
            generation: generation.clone(),
            epoch: Instant::now(),
        };
        tokio::spawn(driver.run(events_rx, inbound, shutdown));
        Ok(Self {
            self_id: self_id.to_owned(),
            events,
            transport,
            metrics,
            generation,
        })
    }

    /// This server's id.
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    /// The plan generation running now.
    pub fn generation(&self) -> i64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Apply a new plan (a new generation from the ConfigMap or the file).
    pub fn apply_plan(&self, plan: MeshPlan) {
        if self.events.try_send(Event::Plan(Box::new(plan))).is_err() {
            tracing::warn!("mesh driver busy or gone; plan update dropped");
        }
    }

    /// Connect a room to the mesh.
    pub fn open_room(&self, room: &str) -> RoomLink {
        let (inbox_tx, inbox) = mpsc::channel(4096);
        let (view_tx, view) = watch::channel(RoomView::default());
        let _ = self.events.try_send(Event::RoomOpened {
            room: room.to_owned(),
            inbox: inbox_tx,
            view: view_tx,
        });
        RoomLink {
            view,
            inbox,
            room_hash: crate::mesh::wire::room_hash(room),
        }
    }

    /// Disconnect a room.
    pub fn close_room(&self, room: &str) {
        let _ = self.events.try_send(Event::RoomClosed {
            room: room.to_owned(),
        });
    }

    /// Report a room's ranked local candidates and participant count (every rank interval).
    pub fn report(&self, room: &str, candidates: Vec<MeshCandidate>, participants: usize) {
        let _ = self.events.try_send(Event::Candidates {
            room: room.to_owned(),
            candidates,
            participants,
        });
    }

    /// Forward one local packet to `targets`, unchanged (no re-encode).
    pub fn forward(&self, datagram: &MediaDatagram, targets: &[ServerId]) {
        match datagram.encode() {
            Ok(bytes) => {
                for to in targets {
                    if let Err(e) = self.transport.send_datagram(to, bytes.clone()) {
                        self.metrics.record_error(&e);
                    }
                }
            }
            Err(e) => self.metrics.record_error(&e),
        }
    }
}

struct Driver {
    state: MeshNodeState,
    transport: MeshTransport,
    metrics: MeshMetrics,
    rooms: HashMap<String, (mpsc::Sender<RemotePacket>, watch::Sender<RoomView>)>,
    generation: Arc<AtomicI64>,
    epoch: Instant,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut inbound: crate::mesh::MeshInbound,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(POLL_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.on_event(event),
                Some((from, message)) = inbound.control.recv() => {
                    let now = self.now();
                    if let Err(e) = self.state.on_message(&from, message, now) {
                        self.metrics.record_error(&e);
                    }
                }
                Some((from, bytes)) = inbound.datagrams.recv() => self.on_datagram(from, bytes),
                _ = ticker.tick() => self.poll(),
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn on_event(&mut self, event: Event) {
        let now = self.now();
        match event {
            Event::RoomOpened { room, inbox, view } => {
                self.rooms.insert(room, (inbox, view));
            }
            Event::RoomClosed { room } => {
                self.rooms.remove(&room);
                if let Err(e) = self.state.on_local_participants(&room, 0) {
                    self.metrics.record_error(&e);
                }
            }
            Event::Candidates {
                room,
                candidates,
                participants,
            } => {
                let result = self
                    .state
                    .on_local_participants(&room, participants)
                    .and_then(|()| self.state.on_local_candidates(&room, candidates, now));
                if let Err(e) = result {
                    self.metrics.record_error(&e);
                }
            }
            Event::Plan(plan) => {
                if plan.generation != self.state.plan_generation() {
                    tracing::info!(
                        generation = plan.generation,
                        nodes = plan.nodes.len(),
                        "applying mesh plan"
                    );
                    self.state.on_plan(&plan);
                    self.transport
                        .set_peers(MeshPeer::from_plan(&plan, self.state.self_id()));
                    self.generation.store(plan.generation, Ordering::Relaxed);
                }
            }
        }
    }

    fn on_datagram(&mut self, from: ServerId, bytes: bytes::Bytes) {
        let arrival = Instant::now();
        let datagram = match MediaDatagram::decode(bytes) {
            Ok(d) => d,
            Err(e) => {
                self.metrics.record_error(&e);
                return;
            }
        };
        if let Some(delay) = cross_server_delay(datagram.ingress_us, unix_micros_now()) {
            self.metrics.observe_cross_server_delay(delay);
        }
        let Some(room) = self.state.room_for_hash(datagram.room_hash) else {
            return; // a room we have no participants in (any more)
        };
        if let Some((inbox, _)) = self.rooms.get(room) {
            let key = StreamKey::new(from, datagram.stream);
            // A full room inbox drops the packet: the jitter buffer conceals it.
            let _ = inbox.try_send(RemotePacket {
                key,
                datagram,
                arrival,
            });
        }
    }

    fn poll(&mut self) {
        let now = self.now();
        for out in self.state.poll(now) {
            if let Err(e) = self.transport.send_control(&out.to, &out.msg) {
                self.metrics.record_error(&e);
            }
        }
        for (room, (_, view)) in &self.rooms {
            let next = RoomView {
                selection: self.state.selection(room).map(|g| g.list.clone()),
                forward: self.state.forwarding(room),
            };
            view.send_if_modified(|current| {
                if *current == next {
                    false
                } else {
                    *current = next;
                    true
                }
            });
        }
        self.metrics.observe(&self.state);
    }
}

/// Watch a plan file: apply every valid new generation; keep the old plan on a bad file.
pub fn watch_plan_file(path: PathBuf, node: MeshNode, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(PLAN_FILE_POLL) => {}
            }
            let Ok(text) = tokio::fs::read_to_string(&path).await else {
                continue;
            };
            if text == last {
                continue;
            }
            match MeshPlan::from_json(&text) {
                Ok(plan) => {
                    if plan.generation != node.generation() {
                        node.apply_plan(plan);
                    }
                    last = text;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "mesh plan file refused; keeping the running plan");
                    last = text;
                }
            }
        }
    });
}

/// Read and validate a plan file once (at startup).
pub fn read_plan_file(path: &std::path::Path) -> Result<MeshPlan, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading mesh plan {}: {e}", path.display()))?;
    MeshPlan::from_json(&text).map_err(|e| format!("mesh plan {}: {e}", path.display()))
}
