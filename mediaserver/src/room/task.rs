//! The task of one room: the thin IO shell around [`RoomCore`].
//!
//! It owns the core (so the mixer needs no lock) and the members' transports, and waits on:
//! - joins and leaves ([`Command`]);
//! - the room's one packet queue, into which every member's transport delivers (tagged with the
//!   participant's stream id);
//! - forwarded packets and view changes from the mesh;
//! - new mixing settings (a new plan generation), applied live;
//! - the frame tick, placed by a [`TickClock`] just after the mixed talkers' frames arrive and
//!   woken by a [`TickTimer`] (a timerfd: Tokio's 1 ms wheel would add up to a millisecond): the
//!   core mixes, the task hands frames to transports, reports to the mesh, records metrics,
//!   publishes the roster and removes members whose transport ended.
//!
//! The clock's deadline keeps a margin after the talkers' late edge for the packet that comes
//! late. A tick need not wait it out for packets that came on time: within the clock's early
//! window (that margin, at most a quarter of a frame) the tick runs as soon as every stream the
//! last tick mixed has its frame here ([`RoomCore::ready`], checked as each packet comes), and at
//! the deadline otherwise. Ticks stay on the clock's grid (an early tick is the deadline's tick,
//! run sooner), so they come at least `frame - max_step - frame/4` apart: never two in a frame.
//!
//! The room ends when it has no member and no join in flight: it removes itself from the
//! registry under the registry's lock, so a join never lands in a room that is ending.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::core::{Member, Packet, ParticipantId, RoomCore, Tick};
use super::tick_timer::TickTimer;
use super::transport::Transport;
use super::{ParticipantInfo, Registry, RemoteSpeakerInfo, RoomInfo};
use crate::endpoint::{InboundAudio, MediaPort};
use crate::media::MixerConfig;
use crate::media::tick_clock::{DEFAULT_MAX_STEP, TickClock};
use crate::mesh::wire::unix_micros_now;
use crate::mesh_node::{MeshNode, RemotePacket, Reporter, RoomLink, RoomView};
use crate::metrics::Metrics;

/// What the registry asks of a room.
pub(super) enum Command {
    /// A participant whose transport is up joins; its packets come tagged `tag`.
    Join {
        id: ParticipantId,
        tag: u64,
        identity: String,
        transport: Box<dyn Transport>,
        /// Answered once the participant is in the roster, so a client that follows its own
        /// participant right after the join finds it.
        done: oneshot::Sender<()>,
    },
    /// A participant leaves; `done` says whether it was here. With a `generation`, only if its
    /// transport is still that one (a device it moved away from cannot remove it).
    Leave {
        id: ParticipantId,
        generation: Option<u64>,
        done: oneshot::Sender<bool>,
    },
    /// A participant moves to a new transport, whose packets come tagged `tag`; `done` gets the
    /// new transport generation, or `None` when the participant is not here.
    Replace {
        id: ParticipantId,
        tag: u64,
        transport: Box<dyn Transport>,
        done: oneshot::Sender<Option<u64>>,
    },
    /// A participant's stream is muted or unmuted; `done` says whether it was here.
    Mute {
        id: ParticipantId,
        muted: bool,
        done: oneshot::Sender<bool>,
    },
}

/// Everything one room task holds.
pub(super) struct RoomTask {
    pub(super) name: String,
    pub(super) instance: u64,
    pub(super) core: RoomCore,
    pub(super) link: Option<RoomLink>,
    pub(super) node: Option<MeshNode>,
    /// The server's media port, for the shared frame's one fan-out.
    pub(super) port: Arc<MediaPort>,
    pub(super) mixing: watch::Receiver<MixerConfig>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) info: Arc<Mutex<RoomInfo>>,
    pub(super) registry: Arc<Registry>,
    pub(super) transports: BTreeMap<ParticipantId, Box<dyn Transport>>,
    /// The delivery tag of each member's current transport, and back.
    pub(super) tags: HashMap<u64, ParticipantId>,
    /// Each member's transport generation (0 for the device it joined with).
    pub(super) generations: HashMap<ParticipantId, u64>,
    /// Transports a member moved away from, closed shortly after the move (so the old device
    /// can be told first); they get nothing meanwhile.
    pub(super) retiring: Vec<(Instant, Box<dyn Transport>)>,
    /// The last packet from each member's current transport.
    pub(super) last_packet: HashMap<ParticipantId, Instant>,
    /// Moves waiting for the new device's first packet: tag → (swap time, the old device's last
    /// packet), for the switch-time and audio-gap metrics.
    pub(super) pending_moves: HashMap<u64, (Instant, Option<Instant>)>,
    /// Per member: the last (sequence, timestamp, arrival) the room saw, after renumbering.
    pub(super) last_numbers: HashMap<ParticipantId, (u16, u32, Instant)>,
    /// Per moved member: what to add to its new device's sequence numbers and timestamps so
    /// that its stream goes on where the old device's stopped (`None`: set at its first
    /// packet). Other servers mixing the stream never see a jump, so their jitter buffers need
    /// no reset.
    pub(super) renumber: HashMap<ParticipantId, Option<(u16, u32)>>,
    /// This room's share of the server-wide active-speakers gauge.
    pub(super) active: i64,
    /// The shared frame's recipients as the last tick resolved them; rebuilt only when the
    /// listeners or a transport change, so a steady room does no per-listener lookup per tick.
    pub(super) fan_out: FanOutList,
}

/// Who gets the shared frame: the listeners the room core named, split into media-port peers
/// (one fan-out command for all) and other transports (one send each).
#[derive(Debug, Default)]
pub(super) struct FanOutList {
    /// `None`: a transport changed since this was built.
    listeners: Option<Vec<ParticipantId>>,
    port_peers: Option<Arc<[u64]>>,
    others: Vec<ParticipantId>,
}

impl FanOutList {
    /// Forget the list: a transport was added, replaced or removed.
    fn invalidate(&mut self) {
        self.listeners = None;
    }
}

/// How long an old device keeps its (silent) connection after its participant moved: time for
/// the `transferred` event to reach it before the connection closes.
const RETIRE_AFTER: Duration = Duration::from_millis(500);

/// The room's tick clock for `settings`: aligned to the mixed talkers' arrivals, keeping the
/// jitter buffers' smallest margin plus the timer's own lateness; or, with `align_ticks` off, one
/// that never moves (a fixed tick).
fn tick_clock(settings: &MixerConfig, timer: &TickTimer) -> TickClock {
    let (margin, step) = tick_limits(settings, timer);
    TickClock::new(settings.frame(), margin, step)
}

/// How late past its deadline the tick's timer wakes the task, at most in the usual case: a
/// timerfd within tens of microseconds (a quarter of a millisecond leaves room for the
/// scheduler); Tokio's wheel rounds up to its next millisecond.
fn timer_slack(timer: &TickTimer) -> Duration {
    if timer.precise() {
        Duration::from_micros(250)
    } else {
        Duration::from_millis(1)
    }
}

/// The tick's margin after the talkers and how far it may move per frame under `settings`.
fn tick_limits(settings: &MixerConfig, timer: &TickTimer) -> (Duration, Duration) {
    let margin = Duration::from_millis(u64::from(settings.jitter_min_ms)) + timer_slack(timer);
    let step = if settings.align_ticks {
        DEFAULT_MAX_STEP
    } else {
        Duration::ZERO
    };
    (margin, step)
}

/// When the room's next tick runs: the [`TickClock`]'s deadline, or earlier within the clock's
/// early window once the talkers the tick waits for are all here ([`RoomCore::ready`]).
struct Schedule {
    clock: TickClock,
    /// Set to the early window's opening, then (once it opened without the talkers) to the
    /// deadline.
    timer: TickTimer,
    epoch: Instant,
    /// Where the clock's grid starts, since the epoch (a new frame length starts a new grid).
    epoch_shift: Duration,
    /// The early window is open: a packet that completes the talkers runs the tick.
    window_open: bool,
}

impl Schedule {
    /// The next tick's deadline, since the epoch.
    fn due_at(&self) -> Duration {
        self.clock.next_tick() + self.epoch_shift
    }

    /// The due tick ran: the clock moves on, and the timer waits for the next early window.
    fn advance(&mut self) {
        self.clock.advance();
        let opens = self.clock.earliest_tick() + self.epoch_shift;
        self.window_open = false;
        self.timer.reset(self.epoch + opens);
    }
}

impl RoomTask {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut packets: mpsc::Receiver<InboundAudio>,
    ) {
        let epoch = Instant::now();
        // Ticks on the room's grid, moved towards the mixed talkers' arrivals (DESIGN §13). A
        // tick that is due runs at once: a late task catches up, as a burst, on the same grid.
        let timer = TickTimer::new(epoch);
        let clock = tick_clock(&self.core.settings(), &timer);
        let mut schedule = Schedule {
            clock,
            timer,
            epoch,
            epoch_shift: Duration::ZERO,
            window_open: false,
        };
        let mut link = self.link.take();
        let (mut inbox, mut view, reporter) = match link.as_mut() {
            Some(link) => {
                let (inbox, view, reporter) = link.split();
                (Some(inbox), Some(view), Some(reporter))
            }
            None => (None, None, None),
        };
        loop {
            // Whether a packet that just came completes what an early tick waits for.
            let mut arrived = false;
            tokio::select! {
                Some(remote) = recv_remote(inbox.as_deref_mut()) => {
                    self.on_remote(remote, epoch);
                    arrived = true;
                }
                Some(view) = view_changed(view.as_deref_mut()) => {
                    let switch_at = view.switch_at.map(|at| at.saturating_duration_since(epoch));
                    match self.core.apply_view(view, switch_at) {
                        Ok(backlogs) => {
                            if let Some(node) = &self.node {
                                for b in &backlogs {
                                    for d in &b.datagrams {
                                        node.forward(d, &b.to);
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(room = %self.name, error = %e, "mesh view refused");
                        }
                    }
                }
                Ok(()) = self.mixing.changed() => {
                    let settings = *self.mixing.borrow_and_update();
                    let frame = self.core.settings().frame();
                    match self.core.reconfigure(settings) {
                        Ok(()) if settings.frame() != frame => {
                            // A new grid from now on: its first tick is due at once.
                            schedule.clock = tick_clock(&settings, &schedule.timer);
                            schedule.epoch_shift = epoch.elapsed();
                            schedule.window_open = false;
                            schedule.timer.reset(Instant::now());
                        }
                        // Aligned or fixed, with the new margin, from where the tick is now.
                        Ok(()) => {
                            let (margin, step) = tick_limits(&settings, &schedule.timer);
                            schedule.clock.retune(margin, step);
                        }
                        Err(e) => tracing::error!(room = %self.name, error = %e, "mixing settings refused; keeping the running ones"),
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(audio) = packets.recv() => {
                    self.on_packet(audio, epoch);
                    arrived = true;
                }
                () = schedule.timer.wait() => {
                    self.take_queued(&mut packets, inbox.as_deref_mut(), epoch);
                    let due_at = schedule.due_at();
                    if epoch.elapsed() >= due_at || self.core.ready() {
                        if self.tick(&mut schedule, reporter) {
                            break;
                        }
                    } else {
                        // The early window opened before the talkers it waits for are all
                        // here: tick as soon as they are, or at the deadline.
                        schedule.window_open = true;
                        schedule.timer.reset(epoch + due_at);
                    }
                }
            }
            if arrived && schedule.window_open && self.core.ready() {
                self.take_queued(&mut packets, inbox.as_deref_mut(), epoch);
                if self.tick(&mut schedule, reporter) {
                    break;
                }
            }
        }
        self.metrics.active_speakers.sub(self.active);
        self.metrics.rooms.dec();
        for (_, transport) in std::mem::take(&mut self.transports) {
            transport.close();
        }
        for (_, transport) in std::mem::take(&mut self.retiring) {
            transport.close();
        }
        // Dropping the link takes the room off the mesh.
        drop(link);
        tracing::info!(room = %self.name, "room closed");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Join {
                id,
                tag,
                identity,
                transport,
                done,
            } => {
                tracing::info!(room = %self.name, participant = id, listens_only = transport.listens_only(), "joined");
                if transport.listens_only() {
                    self.core.add_listener(id, identity);
                } else {
                    self.core.add_member(id, identity);
                }
                self.transports.insert(id, transport);
                self.fan_out.invalidate();
                self.tags.insert(tag, id);
                self.generations.insert(id, 0);
                self.publish_roster(None);
                let _ = done.send(());
            }
            Command::Leave {
                id,
                generation,
                done,
            } => {
                let current = self.generations.get(&id).copied();
                let found = match generation {
                    Some(g) if current != Some(g) => false,
                    _ => self.remove(id),
                };
                let _ = done.send(found);
            }
            Command::Replace {
                id,
                tag,
                transport,
                done,
            } => {
                let listens_only = transport.listens_only();
                self.fan_out.invalidate();
                let Some(old) = self.transports.insert(id, transport) else {
                    // Not a member (it left meanwhile): the new transport goes too.
                    if let Some(t) = self.transports.remove(&id) {
                        t.close();
                    }
                    let _ = done.send(None);
                    return;
                };
                // From now on only the new device feeds the stream.
                self.tags.retain(|_, p| *p != id);
                self.tags.insert(tag, id);
                // The new device may talk where the old one only listened, or the reverse.
                if listens_only != old.listens_only() {
                    self.core.set_listens_only(id, listens_only);
                }
                self.core.restart_stream(id);
                let last_old = self.last_packet.remove(&id);
                self.pending_moves.insert(tag, (Instant::now(), last_old));
                self.renumber.insert(id, None);
                let generation = self.generations.get(&id).map_or(1, |g| g + 1);
                self.generations.insert(id, generation);
                self.retiring.push((Instant::now(), old));
                tracing::info!(room = %self.name, participant = id, generation, "moved to another device");
                let _ = done.send(Some(generation));
            }
            Command::Mute { id, muted, done } => {
                let _ = done.send(self.core.set_muted(id, muted));
            }
        }
    }

    fn on_packet(&mut self, audio: InboundAudio, epoch: Instant) {
        self.metrics.packets_received.inc();
        let Some(&participant) = self.tags.get(&audio.tag) else {
            // A device its participant moved away from (or one that left): never mixed.
            self.metrics
                .packets_dropped
                .with_label_values(&["stale_transport"])
                .inc();
            return;
        };
        if let Some((swapped, last_old)) = self.pending_moves.remove(&audio.tag) {
            self.metrics.transfer_switch.observe(
                audio
                    .arrival
                    .saturating_duration_since(swapped)
                    .as_secs_f64(),
            );
            if let Some(last) = last_old {
                self.metrics
                    .transfer_gap
                    .observe(audio.arrival.saturating_duration_since(last).as_secs_f64());
            }
        }
        self.last_packet.insert(participant, audio.arrival);
        let (seq, rtp_timestamp) = self.renumbered(participant, &audio);
        let elapsed = audio.arrival.elapsed();
        let ingress_us = unix_micros_now()
            .saturating_sub(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        let packet = Packet {
            seq,
            rtp_timestamp,
            payload: audio.payload,
            level: audio.level,
            arrival: audio.arrival.saturating_duration_since(epoch),
        };
        let (pushed, forward) = self.core.push_local(participant, packet, ingress_us);
        if let (Some(forward), Some(node)) = (forward, &self.node) {
            node.forward(&forward.datagram, forward.to);
        }
        if let Err(e) = pushed {
            self.metrics
                .packets_dropped
                .with_label_values(&[e.category()])
                .inc();
        }
    }

    /// The packet's sequence number and timestamp in the participant's one numbering: a moved
    /// participant's new device continues where the old one stopped (one frame per 20 ms of
    /// silence in between).
    fn renumbered(&mut self, participant: ParticipantId, audio: &InboundAudio) -> (u16, u32) {
        const FRAME: u32 = 960;
        let offsets = match self.renumber.get(&participant) {
            None => (0, 0),
            Some(Some(offsets)) => *offsets,
            Some(None) => {
                let offsets = match self.last_numbers.get(&participant) {
                    Some((seq, ts, at)) => {
                        let gap = audio.arrival.saturating_duration_since(*at);
                        let frames = u32::try_from((gap.as_millis() / 20).max(1)).unwrap_or(1);
                        (
                            seq.wrapping_add(1).wrapping_sub(audio.seq),
                            ts.wrapping_add(frames.wrapping_mul(FRAME))
                                .wrapping_sub(audio.rtp_timestamp),
                        )
                    }
                    None => (0, 0),
                };
                self.renumber.insert(participant, Some(offsets));
                offsets
            }
        };
        let seq = audio.seq.wrapping_add(offsets.0);
        let ts = audio.rtp_timestamp.wrapping_add(offsets.1);
        self.last_numbers
            .insert(participant, (seq, ts, audio.arrival));
        (seq, ts)
    }

    fn on_remote(&mut self, remote: RemotePacket, epoch: Instant) {
        let arrival = remote.arrival.saturating_duration_since(epoch);
        if let Err(e) = self.core.push_remote(&remote.key, remote.datagram, arrival) {
            self.metrics
                .packets_dropped
                .with_label_values(&[e.category()])
                .inc();
        }
    }

    /// `select!` picks at random among ready branches, so a packet that arrived before the
    /// tick was due could otherwise wait behind it for a whole frame (its buffer runs dry, a
    /// frame of delay for seconds). Hand the tick what is already queued; only that much, so a
    /// flood cannot hold the tick back.
    fn take_queued(
        &mut self,
        packets: &mut mpsc::Receiver<InboundAudio>,
        inbox: Option<&mut mpsc::Receiver<RemotePacket>>,
        epoch: Instant,
    ) {
        for _ in 0..packets.len() {
            match packets.try_recv() {
                Ok(audio) => self.on_packet(audio, epoch),
                Err(_) => break,
            }
        }
        if let Some(inbox) = inbox {
            for _ in 0..inbox.len() {
                match inbox.try_recv() {
                    Ok(remote) => self.on_remote(remote, epoch),
                    Err(_) => break,
                }
            }
        }
    }

    /// Runs the tick `schedule` has due, now (at its deadline, or early in its window because
    /// the talkers it waits for are here), and sets the timer for the next one. Returns whether
    /// the room has ended.
    fn tick(&mut self, schedule: &mut Schedule, reporter: Option<&Reporter>) -> bool {
        let epoch = schedule.epoch;
        let now = epoch.elapsed();
        let due_at = schedule.due_at();
        let tick = self.core.tick_before(now, due_at);
        self.metrics
            .tick_lateness
            .observe(now.saturating_sub(due_at).as_secs_f64());
        self.metrics
            .tick_early
            .observe(due_at.saturating_sub(now).as_secs_f64());
        for (stream, arrival) in &tick.mix.carried {
            // The tick waits for each talker as long as its own jitter buffer asks.
            let margin = self
                .core
                .jitter_target(*stream)
                .map_or(Duration::ZERO, |t| t + timer_slack(&schedule.timer));
            let arrival = arrival.saturating_sub(schedule.epoch_shift);
            schedule.clock.observe_with_margin(*stream, arrival, margin);
        }
        schedule.advance();
        self.on_tick(tick, reporter, epoch);
        self.core.is_empty() && self.end_if_unused()
    }

    fn on_tick(&mut self, tick: Tick, reporter: Option<&Reporter>, epoch: Instant) {
        let started = Instant::now();
        let samples = self.core.settings().frame_samples();
        self.deliver(&tick, samples);
        if let (Some(report), Some(reporter)) = (tick.report.clone(), reporter) {
            reporter.report(report);
        }
        self.record(&tick, started, epoch);
        if tick.periodic {
            self.publish_roster(Some(&tick.mix.mixed));
            // Old devices of moved participants: told by now, closed.
            let now = Instant::now();
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
                .into_iter()
                .partition(|(at, _)| now.duration_since(*at) >= RETIRE_AFTER);
            self.retiring = keep;
            for (_, t) in due {
                t.close();
            }
            // Participants whose connection ended leave without a DELETE.
            let gone: Vec<ParticipantId> = self
                .transports
                .iter()
                .filter(|(_, t)| t.is_gone())
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.remove(id);
            }
        }
    }

    /// Own mixes one send each; the shared frame in one fan-out for every listener on the
    /// media port (one queue entry, one reference count per listener), one send for others.
    fn deliver(&mut self, tick: &Tick, samples: u32) {
        let drop_counted = |e: crate::endpoint::EndpointError| {
            self.metrics
                .packets_dropped
                .with_label_values(&[e.category()])
                .inc();
        };
        for (id, frame) in &tick.deliveries.own {
            if let Some(t) = self.transports.get(id)
                && let Err(e) = t.send_opus(frame.clone(), samples)
            {
                drop_counted(e);
            }
        }
        let listeners = &tick.deliveries.listeners;
        if self.fan_out.listeners.as_ref() != Some(listeners) {
            let mut port_peers = Vec::with_capacity(listeners.len());
            let mut others = Vec::new();
            for id in listeners {
                let Some(t) = self.transports.get(id) else {
                    continue;
                };
                match t.port_peer() {
                    Some(peer) => port_peers.push(peer),
                    None => others.push(*id),
                }
            }
            self.fan_out = FanOutList {
                listeners: Some(listeners.clone()),
                port_peers: (!port_peers.is_empty()).then(|| port_peers.into()),
                others,
            };
        }
        let shared = &tick.deliveries.shared;
        for id in &self.fan_out.others {
            if let Some(t) = self.transports.get(id)
                && let Err(e) = t.send_opus(shared.clone(), samples)
            {
                drop_counted(e);
            }
        }
        if let Some(peers) = &self.fan_out.port_peers
            && let Err(e) = self
                .port
                .send_opus_to_all(Arc::clone(peers), shared.clone(), samples)
        {
            drop_counted(e);
        }
    }

    fn record(&mut self, tick: &Tick, started: Instant, epoch: Instant) {
        let m = &self.metrics;
        let out = &tick.mix;
        let mixed = i64::try_from(out.mixed.len()).unwrap_or(i64::MAX);
        m.active_speakers.add(mixed - self.active);
        self.active = mixed;
        let sent = epoch.elapsed();
        for (_, arrival) in &out.carried {
            m.server_delay
                .observe(sent.saturating_sub(*arrival).as_secs_f64());
        }
        for (_, depth) in &out.stats.jitter_depth {
            m.jitter_depth.observe(depth.as_secs_f64());
        }
        m.decodes_per_tick.observe(f64::from(out.stats.decodes));
        m.encodes_per_tick.observe(f64::from(out.stats.encodes));
        m.packets_lost.inc_by(u64::from(out.stats.lost));
        m.concealed
            .with_label_values(&["plc"])
            .inc_by(u64::from(out.stats.plc));
        m.concealed
            .with_label_values(&["fec"])
            .inc_by(u64::from(out.stats.fec));
        for (kind, n) in out.stats.jitter.by_kind() {
            if n > 0 {
                m.jitter_adjustments.with_label_values(&[kind]).inc_by(n);
            }
        }
        m.ticks.inc();
        m.tick_duration.observe(started.elapsed().as_secs_f64());
    }

    /// Remove a member and its transport; `false` if it was not here.
    fn remove(&mut self, id: ParticipantId) -> bool {
        let Some(member) = self.core.remove_member(id) else {
            return false;
        };
        if let Some(t) = self.transports.remove(&id) {
            t.close();
        }
        self.fan_out.invalidate();
        self.tags.retain(|_, p| *p != id);
        self.generations.remove(&id);
        self.last_packet.remove(&id);
        self.last_numbers.remove(&id);
        self.renumber.remove(&id);
        self.registry.forget_generation(&self.name, id);
        self.registry.left(&self.name, self.instance, &self.metrics);
        tracing::info!(room = %self.name, participant = id, identity = %member.identity, "left");
        self.publish_roster(None);
        true
    }

    /// End the room if no join is in flight, removing it from the registry under its lock.
    fn end_if_unused(&self) -> bool {
        self.registry.end_room(&self.name, self.instance)
    }

    /// Publish the roster; `mixed` is the set mixed at this tick, or `None` between ticks (a
    /// join or leave), which keeps the last speaking set.
    ///
    /// The roster is brought up to date in place: when its ids still match the members (both
    /// in id order) only the speaking flags are rewritten, with no allocation per participant;
    /// otherwise the entries that differ are inserted or removed. A full rebuild cloned every
    /// identity on every join and leave, so a room of N cost O(N²) to fill or empty (about
    /// 8 million string copies for 4,000 listeners, on the task that also mixes).
    fn publish_roster(&self, mixed: Option<&[crate::media::StreamId]>) {
        let members = self.core.members();
        let mut info = self.info.lock().expect("room info lock is never poisoned");
        if let Some(mixed) = mixed {
            info.remote_speakers = self
                .core
                .remote_speakers()
                .map(|(id, s)| RemoteSpeakerInfo {
                    identity: s.identity.clone(),
                    server: s.server.clone(),
                    speaking: mixed.contains(&id) && self.core.voice_active(id),
                })
                .collect();
            info.active_speakers = mixed.iter().map(|s| s.0).collect();
        }
        info.active_speakers.retain(|id| members.contains_key(id));
        let RoomInfo {
            participants,
            active_speakers,
            ..
        } = &mut *info;
        sync_roster(participants, members);
        for p in participants.iter_mut() {
            p.speaking = active_speakers.contains(&p.id)
                && self.core.voice_active(crate::media::StreamId(p.id));
        }
    }
}

/// Makes `roster` list exactly `members`, in id order, keeping the entries that are already
/// right (their speaking flags are the caller's to set). Linear in the two lengths; allocates
/// only for members that are new to the roster.
fn sync_roster(roster: &mut Vec<ParticipantInfo>, members: &BTreeMap<ParticipantId, Member>) {
    let in_step = roster.len() == members.len()
        && roster
            .iter()
            .zip(members.iter())
            .all(|(p, (id, m))| p.id == *id && p.identity == m.identity);
    if in_step {
        return;
    }
    let mut kept = std::mem::take(roster).into_iter().peekable();
    roster.reserve(members.len());
    for (id, m) in members {
        // Entries of members that left are dropped on the way.
        while kept.next_if(|p| p.id < *id).is_some() {}
        match kept.next_if(|p| p.id == *id && p.identity == m.identity) {
            Some(p) => roster.push(p),
            None => roster.push(ParticipantInfo {
                id: *id,
                identity: m.identity.clone(),
                speaking: false,
            }),
        }
    }
}

/// The next forwarded packet, or never when the room is not on a mesh.
async fn recv_remote(inbox: Option<&mut mpsc::Receiver<RemotePacket>>) -> Option<RemotePacket> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// The mesh's new view of the room when it changes; never when the room is not on a mesh (or
/// the mesh is gone).
async fn view_changed(view: Option<&mut watch::Receiver<RoomView>>) -> Option<RoomView> {
    match view {
        Some(view) => match view.changed().await {
            Ok(()) => Some(view.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[(u64, &str)]) -> BTreeMap<ParticipantId, Member> {
        ids.iter()
            .map(|(id, name)| {
                (
                    *id,
                    Member {
                        identity: (*name).to_owned(),
                    },
                )
            })
            .collect()
    }

    fn ids(roster: &[ParticipantInfo]) -> Vec<(u64, &str, bool)> {
        roster
            .iter()
            .map(|p| (p.id, p.identity.as_str(), p.speaking))
            .collect()
    }

    #[test]
    fn the_roster_follows_joins_and_leaves_in_place() {
        let mut roster = Vec::new();
        sync_roster(&mut roster, &members(&[(1, "a"), (3, "c")]));
        assert_eq!(ids(&roster), [(1, "a", false), (3, "c", false)]);
        // A flag the caller set survives a sync that changes nothing about that entry.
        roster[1].speaking = true;
        sync_roster(
            &mut roster,
            &members(&[(1, "a"), (2, "b"), (3, "c"), (4, "d")]),
        );
        assert_eq!(
            ids(&roster),
            [
                (1, "a", false),
                (2, "b", false),
                (3, "c", true),
                (4, "d", false)
            ]
        );
        // Leaves at the front, the middle and the end; a rejoin under another identity.
        sync_roster(&mut roster, &members(&[(2, "b"), (4, "e")]));
        assert_eq!(ids(&roster), [(2, "b", false), (4, "e", false)]);
        sync_roster(&mut roster, &members(&[]));
        assert!(roster.is_empty());
    }

    #[test]
    fn an_unchanged_roster_is_not_reallocated() {
        let all: Vec<(u64, String)> = (0..1000).map(|i| (i, format!("listener-{i}"))).collect();
        let named: Vec<(u64, &str)> = all.iter().map(|(i, n)| (*i, n.as_str())).collect();
        let m = members(&named);
        let mut roster = Vec::new();
        sync_roster(&mut roster, &m);
        let before = roster.as_ptr();
        let first_name = roster[0].identity.as_ptr();
        sync_roster(&mut roster, &m);
        assert_eq!(roster.as_ptr(), before);
        assert_eq!(roster[0].identity.as_ptr(), first_name);
        assert_eq!(roster.len(), 1000);
    }
}
