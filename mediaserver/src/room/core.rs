//! The pure core of one room: members, stream ids, the mixer, what to forward, what to report to
//! the mesh and when, and which remote streams to let go. Time is a parameter (a `Duration` since
//! the room's epoch) and nothing here touches a socket, a channel or a clock, so every rule is
//! unit-tested in virtual time with real Opus (the tests below); the task around it
//! (`task.rs`) only moves packets and frames.
//!
//! Invariants:
//! - a participant's stream id is its participant id, whatever transport carries it; remote
//!   streams get ids from [`REMOTE_ID_BASE`] up, a range participants never reach;
//! - a local stream is forwarded only to the servers the latest mesh view names for it; when a
//!   view starts forwarding it somewhere, its last [`PREROLL_MS`] of packets go there first,
//!   marked as backlog, so the far mixer can play a new speaker's onset from the start;
//! - a new global list is mixed from the room's first tick at or after its switch tick (the
//!   same tick on every server), never before; what to forward changes at once;
//! - the mesh hears from the room every rank interval, and at once when the set of voiced
//!   candidates changes (a new speaker must not wait out the interval);
//! - a remote stream unheard for [`REMOTE_IDLE`] leaves the mixer, unless the global list still
//!   names it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use crate::media::mixer::{PREROLL_MS, voiced};
use crate::media::{
    AudioLevel, InboundPacket, MediaError, MixOutput, MixerConfig, RoomMixer, StreamId,
    StreamOrigin,
};
use crate::mesh::wire::{MAX_IDENTITY, MediaDatagram};
use crate::mesh::{ServerId, StreamKey};
use crate::mesh_node::{LocalReport, RoomView};

/// A participant's id: unique on this server and stable for its whole stay, whatever transport
/// carries it. It is also the participant's stream id in the mixer and on the mesh.
pub type ParticipantId = u64;

/// Remote streams get mixer ids from here up; participant ids count up from 1 and never get
/// near it.
pub const REMOTE_ID_BASE: u64 = 1 << 62;

/// A remote stream unheard for this long leaves the mixer.
pub const REMOTE_IDLE: Duration = Duration::from_secs(5);

/// One received packet, as the core needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp (48 kHz).
    pub rtp_timestamp: u32,
    /// The Opus payload, untouched.
    pub payload: Bytes,
    /// The RFC 6464 level, when carried.
    pub level: Option<AudioLevel>,
    /// When it reached this server, since the room's epoch.
    pub arrival: Duration,
}

/// A local packet to forward, unchanged, to other servers of the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<'a> {
    /// The datagram, carrying the original Opus payload.
    pub datagram: MediaDatagram,
    /// The servers to send it to.
    pub to: &'a [ServerId],
}

/// One room member, apart from its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The identity from the join token.
    pub identity: String,
}

/// A local stream's recent packets, sent to a server that starts receiving the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    /// The packets, oldest first, each marked as backlog.
    pub datagrams: Vec<MediaDatagram>,
    /// The servers that were not receiving the stream before.
    pub to: Vec<ServerId>,
}

/// Who gets what after one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deliveries {
    /// Each selected local speaker's own mix (never containing itself).
    pub own: Vec<(ParticipantId, Bytes)>,
    /// The one shared frame, for every member in `listeners`.
    pub shared: Bytes,
    /// Every member who is not a selected local speaker, in id order.
    pub listeners: Vec<ParticipantId>,
}

/// What one tick produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// The mixer's output (set mixed, stats, arrival of what it carried).
    pub mix: MixOutput,
    /// Frames to hand to members.
    pub deliveries: Deliveries,
    /// A report for the mesh primary, when one is due.
    pub report: Option<LocalReport>,
    /// Whether this tick is a periodic one (every rank interval): time to publish the roster and
    /// reap members whose transport ended.
    pub periodic: bool,
    /// Remote streams that left the mixer this tick (idle too long).
    pub reaped: Vec<StreamId>,
}

/// The mesh side of a room: which server this is, and the remote streams it mixes.
#[derive(Debug)]
struct MeshSide {
    self_id: ServerId,
    room_hash: u64,
    remote_ids: HashMap<StreamKey, StreamId>,
    remote_last_seen: HashMap<StreamId, Duration>,
    next_remote: u64,
    /// Local stream → servers to forward it to, from the latest view.
    forward: HashMap<StreamId, Vec<ServerId>>,
    /// Voiced candidates of the last report, sorted: a change makes the next report due at once.
    reported_voiced: Vec<StreamId>,
    /// The remote streams on the global list, with their server and speaker's identity.
    remote_listed: BTreeMap<StreamId, RemoteSpeaker>,
    /// Each local stream's last [`PREROLL_MS`] of packets, ready to forward: the backlog a
    /// server gets when it starts receiving the stream.
    recent: HashMap<StreamId, VecDeque<MediaDatagram>>,
}

/// A speaker on another server whom the global list names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpeaker {
    /// The server the speaker is connected to.
    pub server: ServerId,
    /// The speaker's identity ("" when that server did not say).
    pub identity: String,
}

/// The pure state of one room. See the module docs.
#[derive(Debug)]
pub struct RoomCore {
    mixer: RoomMixer,
    members: BTreeMap<ParticipantId, Member>,
    mesh: Option<MeshSide>,
    ticks: u32,
    /// A selection waiting for its switch tick (room time).
    pending: Option<(Duration, Option<Vec<StreamId>>)>,
}

impl RoomCore {
    /// A room mixing with `settings`; `mesh` is `(this server's id, the room's hash)` when the
    /// room is on a mesh.
    pub fn new(settings: MixerConfig, mesh: Option<(ServerId, u64)>) -> Result<Self, MediaError> {
        Ok(Self {
            mixer: RoomMixer::new(settings)?,
            members: BTreeMap::new(),
            mesh: mesh.map(|(self_id, room_hash)| MeshSide {
                self_id,
                room_hash,
                remote_ids: HashMap::new(),
                remote_last_seen: HashMap::new(),
                next_remote: 0,
                forward: HashMap::new(),
                reported_voiced: Vec::new(),
                remote_listed: BTreeMap::new(),
                recent: HashMap::new(),
            }),
            ticks: 0,
            pending: None,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> MixerConfig {
        self.mixer.config()
    }

    /// Apply new settings live; on error nothing changes.
    pub fn reconfigure(&mut self, settings: MixerConfig) -> Result<(), MediaError> {
        self.mixer.reconfigure(settings)
    }

    /// The members, by id.
    pub fn members(&self) -> &BTreeMap<ParticipantId, Member> {
        &self.members
    }

    /// A mixed stream's jitter-buffer target (see [`RoomMixer::jitter_target`]).
    pub fn jitter_target(&self, id: StreamId) -> Option<Duration> {
        self.mixer.jitter_target(id)
    }

    /// Whether a stream is voice-active now (its smoothed level, with the hangover): a listed
    /// speaker resting in their slot is not.
    pub fn voice_active(&self, id: StreamId) -> bool {
        self.mixer.importance(id).is_some_and(|c| c.voice)
    }

    /// The speakers on other servers that the global list names, by their stream id here.
    pub fn remote_speakers(&self) -> impl Iterator<Item = (StreamId, &RemoteSpeaker)> + '_ {
        self.mesh
            .iter()
            .flat_map(|m| m.remote_listed.iter().map(|(id, s)| (*id, s)))
    }

    /// Whether nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A participant joins: its stream enters the mixer.
    pub fn add_member(&mut self, id: ParticipantId, identity: String) {
        self.mixer.add_stream(StreamId(id), StreamOrigin::Local);
        self.members.insert(id, Member { identity });
    }

    /// A participant who only listens joins: a member with no stream in the mixer, so it
    /// costs the tick nothing (it hears the shared frame like every other non-speaker).
    pub fn add_listener(&mut self, id: ParticipantId, identity: String) {
        self.members.insert(id, Member { identity });
    }

    /// A member's transport changed to one that sends (`listens_only == false`) or not: its
    /// stream enters or leaves the mixer. `false` if it is not a member.
    pub fn set_listens_only(&mut self, id: ParticipantId, listens_only: bool) -> bool {
        if !self.members.contains_key(&id) {
            return false;
        }
        if listens_only {
            self.mixer.remove_stream(StreamId(id));
        } else {
            self.mixer.add_stream(StreamId(id), StreamOrigin::Local);
        }
        true
    }

    /// A participant leaves: its stream leaves the mixer. `None` if it was not here.
    pub fn remove_member(&mut self, id: ParticipantId) -> Option<Member> {
        let member = self.members.remove(&id)?;
        self.mixer.remove_stream(StreamId(id));
        if let Some(m) = &mut self.mesh {
            m.forward.remove(&StreamId(id));
            m.recent.remove(&StreamId(id));
        }
        Some(member)
    }

    /// Mute or unmute a member's stream: a muted stream is neither ranked nor mixed (its
    /// participant's phone speaks for it, say). `false` if it is not a member.
    pub fn set_muted(&mut self, id: ParticipantId, muted: bool) -> bool {
        if !self.members.contains_key(&id) {
            return false;
        }
        self.mixer.set_muted(StreamId(id), muted);
        true
    }

    /// Forget a participant's received audio (a new transport starts a new SSRC, sequence and
    /// timestamp): its jitter buffer and decoder start afresh; its level, rank and selection
    /// stay.
    pub fn restart_stream(&mut self, id: ParticipantId) {
        self.mixer.restart_stream(StreamId(id));
        if let Some(m) = &mut self.mesh {
            m.recent.remove(&StreamId(id));
        }
    }

    /// A participant's packet. Returns the datagram to forward and where, when the mesh wants
    /// this stream elsewhere; `ingress_us` is the packet's arrival in µs since the Unix epoch
    /// (carried for the cross-server delay metric).
    pub fn push_local(
        &mut self,
        id: ParticipantId,
        packet: Packet,
        ingress_us: u64,
    ) -> (Result<(), MediaError>, Option<Forward<'_>>) {
        let stream = StreamId(id);
        let keep = self.preroll_packets();
        let forward = match &mut self.mesh {
            Some(m) if self.members.contains_key(&id) => {
                let datagram = MediaDatagram {
                    room_hash: m.room_hash,
                    stream,
                    seq: packet.seq,
                    rtp_timestamp: packet.rtp_timestamp,
                    level: packet.level,
                    ingress_us,
                    payload: packet.payload.clone(),
                    backlog: false,
                };
                let recent = m.recent.entry(stream).or_default();
                recent.push_back(datagram.clone());
                while recent.len() > keep {
                    recent.pop_front();
                }
                match m.forward.get(&stream) {
                    Some(targets) if !targets.is_empty() => Some(Forward {
                        datagram,
                        to: targets.as_slice(),
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        let pushed = self.mixer.push(InboundPacket {
            stream,
            seq: packet.seq,
            rtp_timestamp: packet.rtp_timestamp,
            payload: packet.payload,
            level: packet.level,
            arrival: packet.arrival,
        });
        (pushed, forward)
    }

    /// A packet forwarded by another server. A stream seen for the first time enters the mixer
    /// as a remote stream. Refused without a mesh.
    pub fn push_remote(
        &mut self,
        key: &StreamKey,
        datagram: MediaDatagram,
        arrival: Duration,
    ) -> Result<(), MediaError> {
        let stream = self.remote_stream(key)?;
        if let Some(m) = &mut self.mesh {
            m.remote_last_seen.insert(stream, arrival);
        }
        let packet = InboundPacket {
            stream,
            seq: datagram.seq,
            rtp_timestamp: datagram.rtp_timestamp,
            payload: datagram.payload,
            level: datagram.level,
            arrival,
        };
        if datagram.backlog {
            self.mixer.push_history(packet)
        } else {
            self.mixer.push(packet)
        }
    }

    /// [`PREROLL_MS`] in packets of the room's frame (a longer packet only keeps more).
    fn preroll_packets(&self) -> usize {
        (PREROLL_MS / self.mixer.config().frame_ms.max(1)).max(1) as usize
    }

    /// The mixer id of a remote stream, created on first sight.
    fn remote_stream(&mut self, key: &StreamKey) -> Result<StreamId, MediaError> {
        let m = self
            .mesh
            .as_mut()
            .ok_or(MediaError::UnknownStream(key.stream))?;
        if key.server == m.self_id {
            // Our own stream named by the mesh: it is the participant's stream.
            return Ok(key.stream);
        }
        if let Some(id) = m.remote_ids.get(key) {
            return Ok(*id);
        }
        let id = StreamId(REMOTE_ID_BASE + m.next_remote);
        m.next_remote += 1;
        self.mixer.add_stream(id, StreamOrigin::Remote);
        m.remote_ids.insert(key.clone(), id);
        Ok(id)
    }

    /// Apply the mesh's latest view: mix exactly the global list from the first tick at or after
    /// `switch_at` (room time; `None`: from now), and forward what it says at once. Returns the
    /// backlogs to send: for each local stream now forwarded to servers that were not receiving
    /// it, its recent packets (when any of them carries voice).
    pub fn apply_view(
        &mut self,
        view: RoomView,
        switch_at: Option<Duration>,
    ) -> Result<Vec<Backlog>, MediaError> {
        let mut remote_listed = BTreeMap::new();
        let selection = match view.selection {
            Some(list) => {
                let mut ids = Vec::with_capacity(list.len());
                for (i, key) in list.iter().enumerate() {
                    let id = self.remote_stream(key)?;
                    if id.0 >= REMOTE_ID_BASE {
                        let identity = view.names.get(i).cloned().unwrap_or_default();
                        let server = key.server.clone();
                        remote_listed.insert(id, RemoteSpeaker { server, identity });
                    }
                    ids.push(id);
                }
                Some(ids)
            }
            None => None,
        };
        let mut backlogs = Vec::new();
        if let Some(m) = &mut self.mesh {
            m.remote_listed = remote_listed;
            let forward: HashMap<StreamId, Vec<ServerId>> = view.forward.into_iter().collect();
            for (stream, targets) in &forward {
                let before = m.forward.get(stream);
                let to: Vec<ServerId> = targets
                    .iter()
                    .filter(|t| before.is_none_or(|b| !b.contains(t)))
                    .cloned()
                    .collect();
                let Some(recent) = m.recent.get(stream) else {
                    continue;
                };
                if to.is_empty() || !recent.iter().any(|d| voiced(d.level)) {
                    continue;
                }
                backlogs.push(Backlog {
                    datagrams: recent
                        .iter()
                        .map(|d| MediaDatagram {
                            backlog: true,
                            ..d.clone()
                        })
                        .collect(),
                    to,
                });
            }
            m.forward = forward;
        }
        match switch_at {
            Some(at) => self.pending = Some((at, selection)),
            None => {
                self.pending = None;
                self.mixer.set_selection(selection);
            }
        }
        Ok(backlogs)
    }

    /// One frame tick at `now`.
    pub fn tick(&mut self, now: Duration) -> Tick {
        self.tick_before(now, now)
    }

    /// Whether the streams the last tick mixed all have their next frame here, so the tick due
    /// next may run now ([`RoomMixer::ready`](crate::media::RoomMixer::ready)).
    pub fn ready(&self) -> bool {
        self.mixer.ready()
    }

    /// The tick due at `due`, run at `now` (at or before it) because [`RoomCore::ready`] said
    /// so. It is the tick of `due` in every respect but when it runs: a list stamped to switch
    /// at `due` switches here, and the streams it waited for are ticked as at `due`
    /// ([`RoomMixer::tick_before`](crate::media::RoomMixer::tick_before)).
    pub fn tick_before(&mut self, now: Duration, due: Duration) -> Tick {
        let logical = now.max(due);
        if self.pending.as_ref().is_some_and(|(at, _)| logical >= *at)
            && let Some((_, selection)) = self.pending.take()
        {
            self.mixer.set_selection(selection);
        }
        let mix = self.mixer.tick_before(now, due);
        let deliveries = self.deliveries(&mix);
        self.ticks = self.ticks.wrapping_add(1);
        let periodic = self
            .ticks
            .is_multiple_of(self.mixer.config().rank_every_ticks());
        let report = self.report_due(periodic);
        let reaped = if periodic {
            self.reap_remotes(now)
        } else {
            Vec::new()
        };
        Tick {
            mix,
            deliveries,
            report,
            periodic,
            reaped,
        }
    }

    /// Each selected local speaker gets its own frame; every other member shares one.
    fn deliveries(&self, mix: &MixOutput) -> Deliveries {
        let mut own = Vec::with_capacity(mix.per_speaker.len());
        for (stream, frame) in &mix.per_speaker {
            // An empty frame means the encoder failed; the mixer reported it in its stats.
            if self.members.contains_key(&stream.0) && !frame.is_empty() {
                own.push((stream.0, frame.clone()));
            }
        }
        let speakers: Vec<ParticipantId> = mix.per_speaker.iter().map(|(s, _)| s.0).collect();
        let listeners = if mix.shared.is_empty() {
            Vec::new()
        } else {
            self.members
                .keys()
                .copied()
                .filter(|id| !speakers.contains(id))
                .collect()
        };
        Deliveries {
            own,
            shared: mix.shared.clone(),
            listeners,
        }
    }

    /// The rank-report schedule: every rank interval, and at once when the voiced candidates
    /// change. Only on a mesh.
    fn report_due(&mut self, periodic: bool) -> Option<LocalReport> {
        let m = self.mesh.as_mut()?;
        let mut candidates = self.mixer.candidates();
        // A set: levels reorder candidates all the time, membership rarely.
        let mut voiced: Vec<StreamId> = candidates
            .iter()
            .filter(|c| c.voice)
            .map(|c| c.stream)
            .collect();
        voiced.sort_unstable();
        if !periodic && voiced == m.reported_voiced {
            return None;
        }
        m.reported_voiced = voiced;
        for c in &mut candidates {
            // The ranked streams are local, so each is a member's; an identity too long for the
            // mesh travels as none, rather than failing the whole report.
            c.identity = self
                .members
                .get(&c.stream.0)
                .filter(|m| m.identity.len() <= MAX_IDENTITY)
                .map(|m| m.identity.clone());
        }
        Some(LocalReport {
            candidates,
            participants: self.members.len(),
        })
    }

    /// Remote streams idle for [`REMOTE_IDLE`] leave the mixer, unless the list names them.
    fn reap_remotes(&mut self, now: Duration) -> Vec<StreamId> {
        let Some(m) = self.mesh.as_mut() else {
            return Vec::new();
        };
        let mut listed = self
            .mixer
            .selection()
            .map(<[StreamId]>::to_vec)
            .unwrap_or_default();
        if let Some((_, Some(next))) = &self.pending {
            listed.extend(next);
        }
        let idle: Vec<StreamId> = m
            .remote_ids
            .values()
            .copied()
            .filter(|id| !listed.contains(id))
            .filter(|id| {
                m.remote_last_seen
                    .get(id)
                    .is_none_or(|seen| now.saturating_sub(*seen) > REMOTE_IDLE)
            })
            .collect();
        for id in &idle {
            self.mixer.remove_stream(*id);
            m.remote_ids.retain(|_, v| v != id);
            m.remote_last_seen.remove(id);
        }
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl RoomCore {
        fn apply_view_now(&mut self, view: RoomView) -> Result<Vec<Backlog>, MediaError> {
            self.apply_view(view, None)
        }
    }
    use crate::media::codec::Encoder;
    use crate::media::spectrum::ToneGenerator;

    fn settings() -> MixerConfig {
        MixerConfig {
            top_speakers: 2,
            extra_candidates: 1,
            jitter_min_ms: 2,
            ..MixerConfig::default()
        }
    }

    /// A tone talker: real Opus frames with RFC 6464 levels.
    struct Talker {
        tone: ToneGenerator,
        encoder: Encoder,
        seq: u16,
        dbov: u8,
    }

    impl Talker {
        fn new(freq: f64, dbfs: f64) -> Self {
            Self {
                tone: ToneGenerator::new(freq, dbfs, 48_000),
                encoder: Encoder::new(20).expect("20 ms is a valid frame"),
                seq: 0,
                dbov: u8::try_from((-dbfs).round() as i64 + 3).unwrap_or(127),
            }
        }

        fn packet(&mut self, at: Duration) -> Packet {
            let pcm = self.tone.frame(960);
            let payload = self.encoder.encode(&pcm).expect("encode");
            self.seq = self.seq.wrapping_add(1);
            Packet {
                seq: self.seq,
                rtp_timestamp: u32::from(self.seq) * 960,
                payload,
                level: Some(AudioLevel {
                    dbov: self.dbov,
                    voice: true,
                }),
                arrival: at,
            }
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `ticks` frames of 20 ms: each talker sends, then the room ticks.
    fn run(
        core: &mut RoomCore,
        talkers: &mut [(ParticipantId, Talker)],
        start: u64,
        ticks: u64,
    ) -> Vec<Tick> {
        (start..start + ticks)
            .map(|i| {
                let now = ms(i * 20);
                for (id, t) in talkers.iter_mut() {
                    let (pushed, _) = core.push_local(*id, t.packet(now), 0);
                    pushed.expect("valid packet");
                }
                core.tick(now + ms(5))
            })
            .collect()
    }

    #[test]
    fn alone_the_room_mixes_its_top_speakers_and_shares_one_frame() {
        let mut core = RoomCore::new(settings(), None).expect("valid settings");
        for id in 1..=4 {
            core.add_member(id, format!("user-{id}"));
        }
        let mut talkers = vec![
            (1, Talker::new(300.0, -10.0)),
            (2, Talker::new(500.0, -20.0)),
        ];
        let ticks = run(&mut core, &mut talkers, 0, 30);
        let last = ticks.last().expect("ran");
        assert_eq!(last.mix.mixed, vec![StreamId(1), StreamId(2)]);
        let own: Vec<ParticipantId> = last.deliveries.own.iter().map(|(id, _)| *id).collect();
        assert_eq!(own, vec![1, 2]);
        assert_eq!(last.deliveries.listeners, vec![3, 4]);
        assert!(!last.deliveries.shared.is_empty());
        // Without a mesh there is nothing to report and nothing to forward.
        assert!(ticks.iter().all(|t| t.report.is_none()));
        let (_, forward) = core.push_local(1, talkers[0].1.packet(ms(700)), 0);
        assert!(forward.is_none());
    }

    #[test]
    fn a_listener_hears_the_shared_frame_without_a_stream_and_can_start_talking() {
        let mut core = RoomCore::new(settings(), None).expect("valid settings");
        core.add_member(1, "talker".to_owned());
        core.add_listener(2, "listener".to_owned());
        assert_eq!(core.mixer.streams(), vec![StreamId(1)]);
        let mut talkers = vec![(1, Talker::new(300.0, -10.0))];
        let ticks = run(&mut core, &mut talkers, 0, 20);
        let last = ticks.last().expect("ran");
        assert_eq!(last.mix.mixed, vec![StreamId(1)]);
        assert_eq!(last.deliveries.listeners, vec![2]);
        assert!(!last.deliveries.shared.is_empty());
        // Its packets, were any to arrive, belong to no stream.
        let (pushed, _) = core.push_local(2, talkers[0].1.packet(ms(500)), 0);
        assert!(pushed.is_err());
        // Moved to a device that talks, it gets a stream; back to listening, it loses it.
        assert!(core.set_listens_only(2, false));
        assert_eq!(core.mixer.streams(), vec![StreamId(1), StreamId(2)]);
        assert!(core.set_listens_only(2, true));
        assert_eq!(core.mixer.streams(), vec![StreamId(1)]);
        assert!(!core.set_listens_only(9, false));
        assert!(core.remove_member(2).is_some());
    }

    #[test]
    fn reports_every_rank_interval_and_at_once_when_the_voiced_set_changes() {
        let mut core =
            RoomCore::new(settings(), Some(("a".to_owned(), 7))).expect("valid settings");
        core.add_member(1, "one".to_owned());
        core.add_member(2, "two".to_owned());
        let mut talkers = vec![(1, Talker::new(300.0, -10.0))];
        let ticks = run(&mut core, &mut talkers, 0, 20);
        let reported: Vec<usize> = ticks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.report.is_some())
            .map(|(i, _)| i)
            .collect();
        // 100 ms rank interval at 20 ms frames: every 5th tick, plus the tick 1 became voiced.
        let first_voiced = reported[0];
        assert!(
            first_voiced < 4,
            "a new speaker is reported at once: {reported:?}"
        );
        for i in [4, 9, 14, 19] {
            assert!(
                reported.contains(&i),
                "periodic report at tick {i}: {reported:?}"
            );
        }
        assert_eq!(reported.len(), 5, "{reported:?}");
        let report = ticks[19].report.as_ref().expect("periodic");
        assert_eq!(report.participants, 2);
        assert_eq!(report.candidates[0].stream, StreamId(1));
        assert!(report.candidates[0].voice);

        // Speaker 2 starts: reported on the tick its voice is first seen, not at the interval.
        talkers.push((2, Talker::new(500.0, -20.0)));
        let ticks = run(&mut core, &mut talkers, 20, 3);
        let report = ticks
            .iter()
            .find_map(|t| t.report.as_ref())
            .expect("reported at once");
        let streams: Vec<StreamId> = report.candidates.iter().map(|c| c.stream).collect();
        assert_eq!(streams, vec![StreamId(1), StreamId(2)]);
        let names: Vec<Option<&str>> = report
            .candidates
            .iter()
            .map(|c| c.identity.as_deref())
            .collect();
        assert_eq!(names, vec![Some("one"), Some("two")]);
    }

    #[test]
    fn a_new_list_is_mixed_from_its_switch_tick_and_forwarded_at_once() {
        let mut core =
            RoomCore::new(settings(), Some(("a".to_owned(), 7))).expect("valid settings");
        core.add_member(1, "one".to_owned());
        core.add_member(2, "two".to_owned());
        let mut talkers = [
            (1, Talker::new(300.0, -10.0)),
            (2, Talker::new(500.0, -12.0)),
        ];
        let listed = |ids: &[u64]| RoomView {
            selection: Some(ids.iter().map(|&i| StreamKey::new("a", i)).collect()),
            forward: ids
                .iter()
                .map(|&i| (StreamId(i), vec!["b".to_owned()]))
                .collect(),
            names: ids.iter().map(|i| format!("p{i}")).collect(),
            switch_at: None,
        };
        core.apply_view_now(listed(&[1])).expect("view applies");
        let mixed = |ticks: &[Tick]| -> Vec<Vec<StreamId>> {
            ticks.iter().map(|t| t.mix.mixed.clone()).collect()
        };
        let before = run(&mut core, &mut talkers, 0, 9);
        assert!(mixed(&before).iter().all(|m| *m == [StreamId(1)]));

        // Stamped for 200 ms (tick 10 runs at 205 ms): stream 2 is forwarded now, mixed then.
        core.apply_view(listed(&[1, 2]), Some(ms(200)))
            .expect("view applies");
        let (_, forward) = core.push_local(2, talkers[1].1.packet(ms(190)), 0);
        assert!(forward.is_some(), "forwarded before the switch");
        let at = run(&mut core, &mut talkers, 9, 1);
        assert_eq!(mixed(&at), [vec![StreamId(1)]], "185 ms: the old list");
        let after = run(&mut core, &mut talkers, 10, 5);
        assert!(
            mixed(&after)
                .iter()
                .all(|m| *m == [StreamId(1), StreamId(2)]),
            "from 205 ms: the new list, {:?}",
            mixed(&after)
        );
    }

    #[test]
    fn a_server_that_starts_receiving_a_stream_gets_its_recent_packets_first() {
        let mut core =
            RoomCore::new(settings(), Some(("a".to_owned(), 7))).expect("valid settings");
        core.add_member(1, "one".to_owned());
        let mut one = Talker::new(300.0, -10.0);
        // 20 packets before any view: only the last PREROLL_MS (15 at 20 ms) are kept.
        let sent: Vec<u16> = (0..20)
            .map(|i| {
                let p = one.packet(ms(i * 20));
                let seq = p.seq;
                let (pushed, forward) = core.push_local(1, p, 0);
                pushed.expect("valid packet");
                assert!(forward.is_none());
                seq
            })
            .collect();
        let view = |to: &[&str]| RoomView {
            selection: Some(vec![StreamKey::new("a", 1)]),
            forward: vec![(StreamId(1), to.iter().map(|s| (*s).to_owned()).collect())],
            names: vec!["one".to_owned()],
            switch_at: None,
        };
        let backlogs = core.apply_view_now(view(&["b"])).expect("view applies");
        assert_eq!(backlogs.len(), 1);
        assert_eq!(backlogs[0].to, ["b".to_owned()]);
        let seqs: Vec<u16> = backlogs[0].datagrams.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, sent[5..], "the last 300 ms, oldest first");
        assert!(
            backlogs[0]
                .datagrams
                .iter()
                .all(|d| d.backlog && d.stream == StreamId(1))
        );
        // The same view again: "b" has it already. A new server gets the backlog, "b" does not.
        assert!(
            core.apply_view_now(view(&["b"]))
                .expect("applies")
                .is_empty()
        );
        let backlogs = core.apply_view_now(view(&["b", "c"])).expect("applies");
        assert_eq!(backlogs.len(), 1);
        assert_eq!(backlogs[0].to, ["c".to_owned()]);
        // Live packets are not marked as backlog.
        let (_, forward) = core.push_local(1, one.packet(ms(400)), 0);
        assert!(!forward.expect("forwarded").datagram.backlog);

        // A stream whose recent packets are all silent has no onset to send.
        core.add_member(2, "two".to_owned());
        for i in 0..5 {
            let mut p = one.packet(ms(420 + i * 20));
            p.level = Some(AudioLevel {
                dbov: 127,
                voice: false,
            });
            let (pushed, _) = core.push_local(2, p, 0);
            pushed.expect("valid packet");
        }
        let backlogs = core
            .apply_view_now(RoomView {
                selection: Some(vec![StreamKey::new("a", 1)]),
                forward: vec![
                    (StreamId(1), vec!["b".to_owned(), "c".to_owned()]),
                    (StreamId(2), vec!["b".to_owned()]),
                ],
                names: vec!["one".to_owned()],
                switch_at: None,
            })
            .expect("applies");
        assert!(backlogs.is_empty(), "{backlogs:?}");
    }

    #[test]
    fn forwards_only_what_the_view_names_and_mixes_exactly_the_global_list() {
        let mut core =
            RoomCore::new(settings(), Some(("a".to_owned(), 7))).expect("valid settings");
        core.add_member(1, "one".to_owned());
        core.add_member(2, "two".to_owned());
        let mut one = Talker::new(300.0, -10.0);
        let (_, forward) = core.push_local(1, one.packet(ms(0)), 0);
        assert!(forward.is_none(), "no view yet: nothing forwarded");

        let remote = StreamKey::new("b", 9);
        core.apply_view_now(RoomView {
            selection: Some(vec![StreamKey::new("a", 1), remote.clone()]),
            forward: vec![(StreamId(1), vec!["b".to_owned(), "c".to_owned()])],
            names: vec!["one".to_owned(), "far".to_owned()],
            switch_at: None,
        })
        .expect("view applies");
        // The remote speaker is named; our own listed stream is not a remote speaker.
        let named: Vec<(StreamId, String, String)> = core
            .remote_speakers()
            .map(|(id, s)| (id, s.server.clone(), s.identity.clone()))
            .collect();
        assert_eq!(
            named,
            vec![(StreamId(REMOTE_ID_BASE), "b".to_owned(), "far".to_owned())]
        );
        let (_, forward) = core.push_local(1, one.packet(ms(20)), 42);
        let Forward { datagram, to } = forward.expect("stream 1 is forwarded");
        assert_eq!(to, ["b".to_owned(), "c".to_owned()]);
        assert_eq!(
            (datagram.room_hash, datagram.stream, datagram.ingress_us),
            (7, StreamId(1), 42)
        );
        let (_, forward) = core.push_local(2, Talker::new(500.0, -30.0).packet(ms(20)), 0);
        assert!(forward.is_none(), "stream 2 is not on the view");

        // The remote stream gets an id from the remote range, and is mixed with stream 1.
        let mut far = Talker::new(700.0, -12.0);
        let mut mixed = Vec::new();
        for i in 2..30 {
            let now = ms(i * 20);
            let (pushed, _) = core.push_local(1, one.packet(now), 0);
            pushed.expect("valid");
            let p = far.packet(now);
            let datagram = MediaDatagram {
                room_hash: 7,
                stream: StreamId(9),
                seq: p.seq,
                rtp_timestamp: p.rtp_timestamp,
                level: p.level,
                ingress_us: 0,
                payload: p.payload,
                backlog: false,
            };
            core.push_remote(&remote, datagram, now).expect("valid");
            mixed = core.tick(now + ms(5)).mix.mixed;
        }
        assert_eq!(mixed, vec![StreamId(1), StreamId(REMOTE_ID_BASE)]);
    }

    #[test]
    fn idle_remote_streams_leave_unless_listed() {
        let mut core =
            RoomCore::new(settings(), Some(("a".to_owned(), 7))).expect("valid settings");
        core.add_member(1, "one".to_owned());
        let mut far = Talker::new(700.0, -12.0);
        for (key, at) in [(StreamKey::new("b", 1), 0), (StreamKey::new("b", 2), 0)] {
            let p = far.packet(ms(at));
            let datagram = MediaDatagram {
                room_hash: 7,
                stream: key.stream,
                seq: p.seq,
                rtp_timestamp: p.rtp_timestamp,
                level: p.level,
                ingress_us: 0,
                payload: p.payload,
                backlog: false,
            };
            core.push_remote(&key, datagram, ms(at)).expect("valid");
        }
        core.apply_view_now(RoomView {
            selection: Some(vec![StreamKey::new("b", 2)]),
            forward: Vec::new(),
            names: Vec::new(),
            switch_at: None,
        })
        .expect("view applies");
        // Well past the idle limit: the unlisted stream goes, the listed one stays.
        let mut reaped = Vec::new();
        for i in 0..10 {
            reaped.extend(core.tick(REMOTE_IDLE + ms(1000 + i * 20)).reaped);
        }
        assert_eq!(reaped, vec![StreamId(REMOTE_ID_BASE)]);
    }

    #[test]
    fn members_leave_cleanly_and_settings_change_live() {
        let mut core = RoomCore::new(settings(), None).expect("valid settings");
        core.add_member(5, "five".to_owned());
        assert_eq!(core.members()[&5].identity, "five");
        assert_eq!(
            core.remove_member(5).map(|m| m.identity),
            Some("five".to_owned())
        );
        assert!(core.remove_member(5).is_none());
        assert!(core.is_empty());
        let wider = MixerConfig {
            top_speakers: 5,
            ..settings()
        };
        core.reconfigure(wider).expect("valid");
        assert_eq!(core.settings(), wider);
        let bad = MixerConfig {
            frame_ms: 7,
            ..settings()
        };
        assert!(core.reconfigure(bad).is_err());
        assert_eq!(core.settings(), wider);
    }
}
