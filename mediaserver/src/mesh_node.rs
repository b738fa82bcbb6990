//! The running mesh node: the thin IO shell that drives the pure protocol
//! ([`crate::mesh::MeshNodeState`]) with the QUIC transport, and connects it to the rooms.
//!
//! One driver task owns the protocol state. It:
//! - takes control messages and media datagrams from the transport;
//! - takes each room's latest ranked local candidates (see below);
//! - polls the protocol (heartbeats, top lists) every few milliseconds and sends what it says;
//! - publishes, per room, the global list to mix and which local streams to forward where, on a
//!   `watch` channel the room task reads;
//! - routes each forwarded datagram to the room it belongs to (by its room hash);
//! - applies new mesh-plan generations live: peers added or removed, and the plan's mixing
//!   settings, which it publishes to every room ([`MeshNode::mixing`]).
//!
//! Nothing a room says is lost to a full queue:
//! - room lifecycle (opened, closed) and plans go through an unbounded channel: they are rare
//!   and bounded by the room limit, and a lost "room opened" would leave that room off the mesh
//!   for good;
//! - candidate reports are latest-value-wins: each room writes its report into its own `watch`
//!   and wakes the driver, which reads every changed report. A burst of reports from many rooms
//!   costs each room one slot, not a place in a shared queue.
//!
//! The rooms do the per-packet work themselves (forwarding a local packet, pushing a remote one into
//! the mixer), so the driver never sits on the audio path of a room.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chorus_crds::{MeshPlan, MeshTelephony};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::media::{Candidate, MixerConfig, StreamId};
use crate::mesh::wire::{MediaDatagram, cross_server_delay, unix_micros_now};
use crate::mesh::{
    ControlMessage, MeshError, MeshMetrics, MeshNodeState, MeshPeer, MeshTls, MeshTransport,
    ProtocolConfig, ServerId, StreamKey, TransportConfig,
};

/// How often the driver polls the protocol (heartbeats, lists, views).
const POLL_EVERY: Duration = Duration::from_millis(10);

/// What a room should mix and forward, as the mesh sees it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomView {
    /// The global list to mix; `None` while the room has no list yet (the room mixes its local
    /// top speakers meanwhile).
    pub selection: Option<Vec<StreamKey>>,
    /// Local streams to forward, each with the servers to send it to.
    pub forward: Vec<(StreamId, Vec<ServerId>)>,
    /// Who speaks on each stream of `selection`, in the same order ("" when unknown).
    pub names: Vec<String>,
    /// When `selection` takes effect: the room mixes the list it had until its first tick at
    /// or after this (`None`: at once). Forwarding follows `forward` at once.
    pub switch_at: Option<Instant>,
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

/// A room's latest word to the mesh: its ranked local candidates and how many participants it
/// has here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalReport {
    /// Ranked local candidates, best first (top N then the margin), each with its speaker's
    /// identity when the room knows it.
    pub candidates: Vec<Candidate>,
    /// Participants connected here.
    pub participants: usize,
}

enum Event {
    RoomOpened {
        room: String,
        instance: u64,
        inbox: mpsc::Sender<RemotePacket>,
        view: watch::Sender<RoomView>,
        reports: watch::Receiver<LocalReport>,
    },
    RoomClosed {
        room: String,
        instance: u64,
    },
    Plan(Box<MeshPlan>),
}

/// A room's connection to the mesh. Dropping it takes the room off the mesh.
#[derive(Debug)]
pub struct RoomLink {
    /// Updated whenever the room's global list or forwarding changes.
    pub view: watch::Receiver<RoomView>,
    /// Forwarded packets for this room.
    pub inbox: mpsc::Receiver<RemotePacket>,
    /// The room's hash, as carried in datagrams.
    pub room_hash: u64,
    room: String,
    /// Tells this link from an earlier or later room of the same name, whose close or open may
    /// reach the driver in between.
    instance: u64,
    reporter: Reporter,
    events: mpsc::UnboundedSender<Event>,
}

impl RoomLink {
    /// Report the room's ranked local candidates and participant count. Only the latest report
    /// matters, so this never waits and never fails; the driver reads it at once.
    pub fn report(&self, report: LocalReport) {
        self.reporter.report(report);
    }

    /// The link's receiving ends and itself, borrowed apart, so a room can wait on both
    /// receivers and still report.
    pub fn split(
        &mut self,
    ) -> (
        &mut mpsc::Receiver<RemotePacket>,
        &mut watch::Receiver<RoomView>,
        &Reporter,
    ) {
        (&mut self.inbox, &mut self.view, &self.reporter)
    }
}

/// The reporting end of a [`RoomLink`].
#[derive(Debug)]
pub struct Reporter {
    reports: watch::Sender<LocalReport>,
    wake: Arc<Notify>,
}

impl Reporter {
    /// See [`RoomLink::report`].
    pub fn report(&self, report: LocalReport) {
        self.reports.send_replace(report);
        self.wake.notify_one();
    }
}

impl Drop for RoomLink {
    fn drop(&mut self) {
        // The driver may be gone at shutdown; then there is nothing left to tell.
        let _ = self.events.send(Event::RoomClosed {
            room: std::mem::take(&mut self.room),
            instance: self.instance,
        });
        self.reporter.wake.notify_one();
    }
}

/// A handle on the mesh node, shared by the rooms.
#[derive(Debug, Clone)]
pub struct MeshNode {
    self_id: ServerId,
    events: mpsc::UnboundedSender<Event>,
    wake: Arc<Notify>,
    next_instance: Arc<AtomicU64>,
    transport: MeshTransport,
    metrics: MeshMetrics,
    generation: Arc<AtomicI64>,
    mixing: watch::Receiver<MixerConfig>,
    telephony: watch::Receiver<Option<MeshTelephony>>,
    transfer: watch::Receiver<chorus_crds::MeshTransfer>,
    signals: watch::Receiver<HashMap<String, String>>,
}

/// Each server of the plan's HTTP base URL, by server id.
fn signals_of(plan: &MeshPlan) -> HashMap<String, String> {
    plan.nodes
        .iter()
        .map(|n| (n.id.clone(), n.signal.clone()))
        .collect()
}

impl MeshNode {
    /// Start the node: the QUIC transport on `socket` and the driver. Must be called inside a
    /// Tokio runtime. Plans after the first come through [`MeshNode::apply_plan`].
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
        let mut state = MeshNodeState::new(self_id, &plan, ProtocolConfig::default(), incarnation);
        let epoch = Instant::now();
        // The protocol's time zero is `epoch`; switch ticks cross the mesh on the wall clock.
        state.set_wall_origin_us(unix_micros_now());
        let generation = Arc::new(AtomicI64::new(plan.generation));
        let (mixing_tx, mixing) = watch::channel(MixerConfig::from_plan(&plan.mixing));
        let (telephony_tx, telephony) = watch::channel(plan.telephony.clone());
        let (transfer_tx, transfer) = watch::channel(plan.transfer);
        let (signals_tx, signals) = watch::channel(signals_of(&plan));
        metrics.observe(&state);
        let (events, events_rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let driver = Driver {
            state,
            transport: transport.clone(),
            metrics: metrics.clone(),
            rooms: HashMap::new(),
            generation: generation.clone(),
            mixing: mixing_tx,
            telephony: telephony_tx,
            transfer: transfer_tx,
            signals: signals_tx,
            epoch,
        };
        tokio::spawn(driver.run(events_rx, wake.clone(), inbound, shutdown));
        Ok(Self {
            self_id: self_id.to_owned(),
            events,
            wake,
            next_instance: Arc::new(AtomicU64::new(1)),
            transport,
            metrics,
            generation,
            mixing,
            telephony,
            transfer,
            signals,
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

    /// The mixing settings of the running plan; changes when a new generation changes them.
    pub fn mixing(&self) -> watch::Receiver<MixerConfig> {
        self.mixing.clone()
    }

    /// The telephony settings of the running plan (`None`: the conference places no calls);
    /// changes when a new generation changes them.
    pub fn telephony(&self) -> watch::Receiver<Option<MeshTelephony>> {
        self.telephony.clone()
    }

    /// The HTTP base URL of server `id` in the running plan (empty or `None` when the plan does
    /// not say).
    pub fn signal_of(&self, id: &str) -> Option<String> {
        self.signals
            .borrow()
            .get(id)
            .filter(|s| !s.is_empty())
            .cloned()
    }

    /// The session-transfer settings of the running plan; changes with a new generation.
    pub fn transfer(&self) -> watch::Receiver<chorus_crds::MeshTransfer> {
        self.transfer.clone()
    }

    /// Apply a new plan (a new generation from the ConfigMap or the file).
    pub fn apply_plan(&self, plan: MeshPlan) {
        if self.events.send(Event::Plan(Box::new(plan))).is_err() {
            tracing::warn!("mesh driver gone; plan update dropped");
        }
    }

    /// Connect a room to the mesh, until the returned link is dropped.
    pub fn open_room(&self, room: &str) -> RoomLink {
        let (inbox_tx, inbox) = mpsc::channel(4096);
        let (view_tx, view) = watch::channel(RoomView::default());
        let (reports, reports_rx) = watch::channel(LocalReport::default());
        let instance = self.next_instance.fetch_add(1, Ordering::Relaxed);
        // Unbounded: see the module docs. Fails only when the driver is gone (shutdown).
        let _ = self.events.send(Event::RoomOpened {
            room: room.to_owned(),
            instance,
            inbox: inbox_tx,
            view: view_tx,
            reports: reports_rx,
        });
        self.wake.notify_one();
        RoomLink {
            view,
            inbox,
            room_hash: crate::mesh::wire::room_hash(room),
            room: room.to_owned(),
            instance,
            reporter: Reporter {
                reports,
                wake: self.wake.clone(),
            },
            events: self.events.clone(),
        }
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

/// One room as the driver holds it.
struct RoomEntry {
    instance: u64,
    inbox: mpsc::Sender<RemotePacket>,
    view: watch::Sender<RoomView>,
    reports: watch::Receiver<LocalReport>,
}

struct Driver {
    state: MeshNodeState,
    transport: MeshTransport,
    metrics: MeshMetrics,
    rooms: HashMap<String, RoomEntry>,
    generation: Arc<AtomicI64>,
    mixing: watch::Sender<MixerConfig>,
    telephony: watch::Sender<Option<MeshTelephony>>,
    transfer: watch::Sender<chorus_crds::MeshTransfer>,
    signals: watch::Sender<HashMap<String, String>>,
    epoch: Instant,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        wake: Arc<Notify>,
        mut inbound: crate::mesh::MeshInbound,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(POLL_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.on_event(event),
                () = wake.notified() => {
                    // Lifecycle events first, so a report never precedes its room's opening.
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                    self.take_reports();
                }
                Some((from, message)) = inbound.control.recv() => {
                    let now = self.now();
                    // A new global list must reach its room before its switch tick, not at the
                    // next poll: that room's view goes out at once. Only that room's: every
                    // other message waits for the poll, which walks every room.
                    let room = match &message {
                        ControlMessage::GlobalTopList { room, .. } => Some(room.clone()),
                        _ => None,
                    };
                    let epoch = |state: &MeshNodeState, room: &str| {
                        state.selection(room).map(|g| (g.epoch, g.primary.clone()))
                    };
                    let before = room.as_deref().and_then(|r| epoch(&self.state, r));
                    if let Err(e) = self.state.on_message(&from, message, now) {
                        self.metrics.record_error(&e);
                    }
                    if let Some(room) = room
                        && epoch(&self.state, &room) != before
                    {
                        self.publish_view(&room);
                    }
                }
                Some((from, bytes)) = inbound.datagrams.recv() => self.on_datagram(from, bytes),
                _ = ticker.tick() => {
                    self.take_reports();
                    self.poll();
                }
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::RoomOpened {
                room,
                instance,
                inbox,
                view,
                reports,
            } => {
                self.rooms.insert(
                    room,
                    RoomEntry {
                        instance,
                        inbox,
                        view,
                        reports,
                    },
                );
            }
            Event::RoomClosed { room, instance } => {
                // A later room of the same name may already be open: leave it be.
                if self
                    .rooms
                    .get(&room)
                    .is_some_and(|r| r.instance == instance)
                {
                    self.rooms.remove(&room);
                    if let Err(e) = self.state.on_local_participants(&room, 0) {
                        self.metrics.record_error(&e);
                    }
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
                    self.telephony.send_if_modified(|current| {
                        let changed = *current != plan.telephony;
                        current.clone_from(&plan.telephony);
                        changed
                    });
                    self.signals.send_replace(signals_of(&plan));
                    self.transfer.send_if_modified(|current| {
                        let changed = *current != plan.transfer;
                        *current = plan.transfer;
                        changed
                    });
                    let mixing = MixerConfig::from_plan(&plan.mixing);
                    self.mixing.send_if_modified(|current| {
                        let changed = *current != mixing;
                        *current = mixing;
                        changed
                    });
                }
            }
        }
    }

    /// Feed the protocol every room report that changed since it was last read.
    fn take_reports(&mut self) {
        let now = self.now();
        for (room, entry) in &mut self.rooms {
            if !entry.reports.has_changed().unwrap_or(false) {
                continue;
            }
            let report = entry.reports.borrow_and_update().clone();
            let result = self
                .state
                .on_local_participants(room, report.participants)
                .and_then(|()| self.state.on_local_candidates(room, report.candidates, now));
            if let Err(e) = result {
                self.metrics.record_error(&e);
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
        // A backlog packet was held back on purpose: its age is not the path's delay.
        if !datagram.backlog
            && let Some(delay) = cross_server_delay(datagram.ingress_us, unix_micros_now())
        {
            self.metrics.observe_cross_server_delay(delay);
        }
        let Some(room) = self.state.room_for_hash(datagram.room_hash) else {
            return; // a room we have no participants in (any more)
        };
        if let Some(RoomEntry { inbox, .. }) = self.rooms.get(room) {
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
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in &rooms {
            self.publish_view(room);
        }
        self.metrics.observe(&self.state);
    }

    /// Sends `room` its view (what to mix from when, what to forward) if it changed.
    fn publish_view(&self, room: &str) {
        let Some(RoomEntry { view, .. }) = self.rooms.get(room) else {
            return;
        };
        let list = self.state.selection(room);
        let next = RoomView {
            selection: list.map(|g| g.list.clone()),
            forward: self.state.forwarding(room),
            names: list.map(|g| g.names.clone()).unwrap_or_default(),
            switch_at: self.state.switch_at(room).map(|d| self.epoch + d),
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
}
