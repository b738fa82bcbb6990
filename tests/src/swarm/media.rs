//! The swarm's media thread: one OS thread reads every listener socket.
//!
//! Connected listeners are handed over by their join tasks ([`Command::Register`]) and live here
//! until the swarm stops. The thread asks `epoll` which of their sockets are ready (plus an
//! eventfd that wakes it for commands) and drains each ready socket with `recvmmsg`, [`BATCH`]
//! datagrams per system call, into one preallocated buffer: reading a packet allocates nothing.
//! By default it polls every millisecond and sleeps in between rather than waiting in `epoll`,
//! so the server's sends do not wake it across CPUs (see `SwarmConfig::poll_interval`). It also sends
//! what a browser's receiver would: a consent-freshness Binding Request every
//! `consent_interval` and an SRTCP Receiver Report every `rtcp_interval`, and answers the
//! server's STUN and DTLS (a repeated final flight).
//!
//! Per listener and packet it parses the RTP header (no decryption) and tracks: the SSRC (one
//! per listener), extended sequence numbers (loss, duplicates, reordering), arrival times and
//! interarrival jitter. Decryption is sampled: the reference listener (the first registered)
//! decrypts everything and keeps every payload; every other listener decrypts one packet in
//! `sample_every`, with its own keys, and records a hash of the payload, which must be one the
//! reference received (the server sends the same encoded mix to every listener; only headers
//! differ).
//!
//! Invariants:
//! - Counters of the measurement window ([`Command::StartWindow`] .. [`Command::EndWindow`])
//!   are separate from the cumulative ones RTCP reports; samples are taken only inside it, and
//!   the snapshot reports the counters as they stood at its end.
//! - The reference keeps recording outside the window, so a sample taken at the window's end
//!   still finds its payload (the snapshot is taken a little after [`Command::EndWindow`]).
//! - Every datagram has two arrival times. The *kernel* one (SO_TIMESTAMPNS, per datagram,
//!   CLOCK_REALTIME, nanoseconds) is stamped when the packet enters the receive path: over
//!   loopback that is inside the server's own send call, so it does not depend on when this
//!   thread gets round to the socket. The *read* one (`Instant`) is taken once per `recvmmsg`
//!   call, right after it returns, so it is late by however long the datagram queued while the
//!   thread served other sockets (up to a full pass over all of them under load). Offsets
//!   between listeners use the kernel stamps (the read times when a stamp is missing, counted
//!   apart); loss, jitter, first/last arrival and the reference's recording use the read times.
//! - With [`super::Upstream::Silence`] every listener sends one packet per 20 ms. The 20 ms are
//!   cut into [`UPSTREAM_PHASES`] slots and listener slot `s` sends in slot `s % UPSTREAM_PHASES`,
//!   so the server sees a spread-out stream as from unsynchronised browsers, not one burst of
//!   N packets per 20 ms. When the thread falls more than a 20 ms period behind, the missed
//!   slots are skipped (counted), not sent in a burst; RTP timestamps follow the clock.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use rtc::crypto::RTCCryptoProvider;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::shared::marshal::{Marshal, Unmarshal};
use rtc::stun::message::TransactionId;

use super::handshake::Joined;
use super::ice::{self, Inbound};
use super::{ListenerReport, OffsetStats, ReferencePacket};

/// Datagrams per `recvmmsg` call.
const BATCH: usize = 32;
/// Room per datagram: more than any RTP packet the server sends (it stays under the MTU).
const SLOT: usize = 1500;
/// Epoll events per wait.
const EVENTS: usize = 256;
/// The epoll key of the command eventfd (listener keys are their slots, far below).
const WAKE_KEY: u64 = u64::MAX;
/// Opus RTP clock rate, for jitter in timestamp units.
const CLOCK_RATE: f64 = 48_000.0;
/// Sequence numbers remembered behind the highest, to tell duplicates from late packets.
const SEEN_WINDOW: u64 = 128;
/// The upstream packet interval (one Opus frame).
const UPSTREAM_PERIOD: Duration = Duration::from_millis(20);
/// RTP timestamp units per upstream packet (20 ms at 48 kHz).
const UPSTREAM_TIMESTAMP_STEP: u32 = 960;
/// Slots per [`UPSTREAM_PERIOD`] over which the listeners' sends are spread.
pub(crate) const UPSTREAM_PHASES: u64 = 10;
/// The RTP payload type the offer gives Opus.
const OPUS_PAYLOAD_TYPE: u8 = 111;
/// RFC 6464 level byte: V (voice activity) bit clear, level 127 (-127 dBov, digital silence).
const SILENT_LEVEL: u8 = 127;

/// What the swarm asks of the media thread.
pub(crate) enum Command {
    /// Take over a connected listener.
    Register(Box<Joined>),
    /// Reset the window counters and start sampling.
    StartWindow,
    /// Stop sampling and freeze the window's clocks (CPU, kernel counters).
    EndWindow,
    /// Report the window.
    Snapshot(tokio::sync::oneshot::Sender<Snapshot>),
    /// Exit the thread.
    Stop,
}

/// What the media thread reports for a window.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) listeners: Vec<ListenerReport>,
    pub(crate) reference: Vec<ReferencePacket>,
    pub(crate) reference_index: Option<usize>,
    pub(crate) window: Duration,
    pub(crate) thread_cpu: Duration,
    pub(crate) process_cpu: Duration,
    pub(crate) udp_rcvbuf_errors: u64,
    pub(crate) udp_in_errors: u64,
    pub(crate) upstream_slots_skipped: u64,
}

/// Settings the thread needs.
#[derive(Clone)]
pub(crate) struct MediaSettings {
    pub(crate) sample_every: u32,
    pub(crate) consent_interval: Duration,
    pub(crate) rtcp_interval: Duration,
    /// See `SwarmConfig::poll_interval`.
    pub(crate) poll_interval: Option<Duration>,
    pub(crate) crypto: Arc<dyn RTCCryptoProvider>,
    /// The Opus payload every listener sends each 20 ms, or None: the listeners send no RTP.
    pub(crate) upstream: Option<Bytes>,
}

/// When a datagram arrived; see the module doc.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// Right after the `recvmmsg` call that read it returned.
    read: Instant,
    /// The kernel's receive timestamp (CLOCK_REALTIME, ns), if it gave one.
    kernel_ns: Option<i64>,
    /// The RTP sequence number (0 until the datagram is known to be RTP).
    seq: u16,
}

/// One sampled payload of a listener.
#[derive(Debug, Clone, Copy)]
struct Sample {
    hash: (u64, usize),
    arrival: Arrival,
}

/// RTP extended sequence numbers (RFC 3550 A.1): 16-bit numbers unwrapped around the highest.
#[derive(Debug, Default, Clone, Copy)]
struct Extender {
    highest: Option<u64>,
}

impl Extender {
    fn extend(&mut self, seq: u16) -> u64 {
        let extended = match self.highest {
            // Start one cycle up so a packet just below the first does not go negative.
            None => (1 << 16) | u64::from(seq),
            Some(highest) => {
                let delta = i64::from(seq.wrapping_sub(highest as u16) as i16);
                highest.saturating_add_signed(delta)
            }
        };
        if self.highest.is_none_or(|h| extended > h) {
            self.highest = Some(extended);
        }
        extended
    }
}

/// Loss, duplicate and reorder counting over extended sequence numbers since `first`.
#[derive(Debug, Default, Clone, Copy)]
struct SeqCounter {
    first: Option<u64>,
    highest: u64,
    /// Bit `i` set: `highest - i` was received.
    seen: u128,
    unique: u64,
    duplicates: u64,
    reordered: u64,
}

impl SeqCounter {
    /// Records one packet; returns false if it was a duplicate.
    fn record(&mut self, extended: u64) -> bool {
        let Some(first) = self.first else {
            *self = SeqCounter {
                first: Some(extended),
                highest: extended,
                seen: 1,
                unique: 1,
                ..*self
            };
            return true;
        };
        if extended > self.highest {
            let shift = extended - self.highest;
            self.seen = if shift >= SEEN_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = extended;
            self.unique += 1;
            return true;
        }
        if extended < first {
            // Sent before counting started; neither lost nor received in this count.
            self.reordered += 1;
            return true;
        }
        let behind = self.highest - extended;
        if behind < SEEN_WINDOW {
            let bit = 1u128 << behind;
            if self.seen & bit != 0 {
                self.duplicates += 1;
                return false;
            }
            self.seen |= bit;
        }
        self.unique += 1;
        self.reordered += 1;
        true
    }

    fn expected(&self) -> u64 {
        self.first.map_or(0, |first| self.highest - first + 1)
    }

    fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.unique)
    }
}

/// The window's counters of one listener.
#[derive(Debug, Default, Clone)]
struct Window {
    seq: SeqCounter,
    rtp_packets: u64,
    rtp_bytes: u64,
    first_arrival: Option<Instant>,
    last_arrival: Option<Instant>,
    foreign_ssrc: u64,
    rtcp_packets: u64,
    stun_packets: u64,
    dtls_packets: u64,
    other_packets: u64,
    /// Each sampled payload.
    samples: Vec<Sample>,
    undecryptable: u64,
    consent_sent: u64,
    consent_answered: u64,
    rtcp_sent: u64,
    upstream_sent: u64,
    send_errors: u64,
    kernel_drops_at_start: u32,
    /// Set when the window is frozen.
    kernel_drops_at_end: u32,
}

/// One listener on the media thread.
struct Listener {
    joined: Joined,
    /// Decrypt every `every`-th packet of the window (1 for the reference).
    every: u64,
    /// Offset in that rotation, so listeners do not all decrypt on the same packet.
    phase: u64,
    is_reference: bool,
    ssrc: Option<u32>,
    extender: Extender,
    /// Since the listener connected, for RTCP.
    total: SeqCounter,
    /// For the RR's fraction lost: expected and received at the previous report.
    rr_expected: u64,
    rr_received: u64,
    jitter: f64,
    last_transit: Option<i64>,
    /// Upstream: the next sequence number and the random timestamp origin.
    send_seq: u16,
    send_timestamp_base: u32,
    consent_pending: Option<TransactionId>,
    kernel_drops: u32,
    window: Window,
    /// The window as it stood at [`Command::EndWindow`]: what the snapshot reports (the live
    /// one keeps counting until the next window starts).
    closed: Option<Window>,
}

/// The reference listener's recording.
#[derive(Debug, Default)]
struct Reference {
    packets: Vec<(u64, Instant, Bytes)>,
    /// Each payload's arrivals, in order. Payloads recur (a steady tone repeats its frames,
    /// silence encodes alike every time), so a sample is matched to the nearest one.
    hashes: HashMap<(u64, usize), Vec<Arrival>>,
}

fn payload_hash(payload: &[u8]) -> (u64, usize) {
    // SipHash with fixed keys: the same bytes hash alike across listeners in this process, and
    // 64 bits make an accidental match between different payloads negligible.
    let mut hasher = DefaultHasher::new();
    hasher.write(payload);
    (hasher.finish(), payload.len())
}

/// `Udp: InErrors` and `Udp: RcvbufErrors` of /proc/net/snmp (host-wide counters).
pub(crate) fn udp_errors() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = text.lines().filter(|line| line.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = names.iter().position(|n| *n == name)?;
        values.get(at)?.parse().ok()
    };
    Some((field("InErrors")?, field("RcvbufErrors")?))
}

fn cpu(who: UsageWho) -> Duration {
    getrusage(who).map_or(Duration::ZERO, |usage| {
        let to_duration = |tv: nix::sys::time::TimeVal| {
            Duration::from_secs(tv.tv_sec().max(0) as u64)
                + Duration::from_micros(tv.tv_usec().max(0) as u64)
        };
        to_duration(usage.user_time()) + to_duration(usage.system_time())
    })
}

/// The media thread's state.
struct MediaThread {
    settings: MediaSettings,
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: Receiver<Command>,
    listeners: Vec<Listener>,
    reference: Reference,
    reference_slot: Option<usize>,
    consent_due: VecDeque<(Instant, usize)>,
    rtcp_due: VecDeque<(Instant, usize)>,
    sampling: bool,
    window_start: Option<Instant>,
    window_end: Option<Instant>,
    thread_cpu_start: Duration,
    thread_cpu: Duration,
    process_cpu_start: Duration,
    process_cpu: Duration,
    snmp_start: Option<(u64, u64)>,
    snmp_delta: (u64, u64),
    /// Arrival epoch for jitter (RTP timestamp units since then).
    epoch: Instant,
    /// Upstream slots run so far (slot `k` is due at `epoch + k × period / phases`).
    upstream_slot: u64,
    upstream_skipped: u64,
    upstream_skipped_at_start: u64,
    upstream_skipped_in_window: u64,
    /// The plain upstream packet being built (reused).
    upstream_buffer: Vec<u8>,
}

/// Starts the media thread; returns its handle. It runs until [`Command::Stop`] or until the
/// command channel closes.
pub(crate) fn spawn(
    settings: MediaSettings,
    commands: Receiver<Command>,
    wake: Arc<EventFd>,
) -> Result<std::thread::JoinHandle<()>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    epoll
        .add(&*wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_KEY))
        .context("adding the command eventfd to epoll")?;
    let mut thread = MediaThread {
        settings,
        epoll,
        wake,
        commands,
        listeners: Vec::new(),
        reference: Reference::default(),
        reference_slot: None,
        consent_due: VecDeque::new(),
        rtcp_due: VecDeque::new(),
        sampling: false,
        window_start: None,
        window_end: None,
        thread_cpu_start: Duration::ZERO,
        thread_cpu: Duration::ZERO,
        process_cpu_start: Duration::ZERO,
        process_cpu: Duration::ZERO,
        snmp_start: None,
        snmp_delta: (0, 0),
        epoch: Instant::now(),
        upstream_slot: 0,
        upstream_skipped: 0,
        upstream_skipped_at_start: 0,
        upstream_skipped_in_window: 0,
        upstream_buffer: Vec::with_capacity(SLOT),
    };
    std::thread::Builder::new()
        .name("swarm-media".to_owned())
        .spawn(move || {
            if let Err(err) = thread.run() {
                eprintln!("swarm: the media thread stopped: {err:#}");
            }
        })
        .context("spawning the media thread")
}

impl MediaThread {
    fn run(&mut self) -> Result<()> {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
            BATCH,
            Some(nix::cmsg_space!(u32, nix::sys::time::TimeSpec)),
        );
        let mut buffer = vec![0u8; BATCH * SLOT];
        loop {
            if !self.commands()? {
                return Ok(());
            }
            let now = Instant::now();
            self.timers(now);
            self.upstream(now);
            // Sleep until the next timer, at most 100 ms (commands wake the eventfd anyway).
            let upstream_due = self
                .settings
                .upstream
                .is_some()
                .then(|| self.upstream_due(self.upstream_slot));
            let next = [self.consent_due.front(), self.rtcp_due.front()]
                .into_iter()
                .flatten()
                .map(|(due, _)| *due)
                .chain(upstream_due)
                .map(|due| due.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_millis(100));
            // Rounded up: epoll counts whole milliseconds, and a timer due in 0.9 ms must not
            // turn into a zero timeout and a spin.
            let timeout = match self.settings.poll_interval {
                // Polling: look without waiting; the sleep comes after the reading below.
                Some(_) => EpollTimeout::ZERO,
                None => EpollTimeout::try_from(next.as_micros().div_ceil(1000))
                    .unwrap_or(EpollTimeout::ZERO),
            };
            let ready = match self.epoll.wait(&mut events, timeout) {
                Ok(ready) => ready,
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err).context("epoll_wait"),
            };
            for event in &events[..ready] {
                let key = event.data();
                if key == WAKE_KEY {
                    // Reset the eventfd; the commands themselves are read above.
                    let _ = self.wake.read();
                    continue;
                }
                if let Ok(slot) = usize::try_from(key) {
                    self.drain(slot, &mut headers, &mut buffer);
                }
            }
            // Polling: a full event list means more is waiting; otherwise sleep, with nobody
            // on the sockets' wait queues, until the next poll or timer.
            if let Some(poll) = self.settings.poll_interval
                && ready < events.len()
            {
                std::thread::sleep(poll.min(next));
            }
        }
    }

    /// Applies queued commands; false once the swarm said stop (or went away).
    fn commands(&mut self) -> Result<bool> {
        loop {
            let command = match self.commands.try_recv() {
                Ok(command) => command,
                Err(TryRecvError::Empty) => return Ok(true),
                Err(TryRecvError::Disconnected) => return Ok(false),
            };
            match command {
                Command::Register(joined) => self.register(*joined)?,
                Command::StartWindow => self.start_window(),
                Command::EndWindow => self.end_window(),
                Command::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Command::Stop => return Ok(false),
            }
        }
    }

    fn register(&mut self, joined: Joined) -> Result<()> {
        let slot = self.listeners.len();
        self.epoll
            .add(
                &joined.socket,
                EpollEvent::new(EpollFlags::EPOLLIN, slot as u64),
            )
            .context("adding a listener socket to epoll")?;
        let is_reference = self.reference_slot.is_none();
        if is_reference {
            self.reference_slot = Some(slot);
        }
        let every = if is_reference {
            1
        } else {
            u64::from(self.settings.sample_every.max(1))
        };
        let now = Instant::now();
        // Spread the timers of listeners that joined together over the interval.
        let spread = |interval: Duration| {
            interval.mul_f64(f64::from(rand::random::<u16>()) / f64::from(u16::MAX))
        };
        self.consent_due
            .push_back((now + spread(self.settings.consent_interval), slot));
        self.rtcp_due
            .push_back((now + spread(self.settings.rtcp_interval), slot));
        sort_queue(&mut self.consent_due);
        sort_queue(&mut self.rtcp_due);
        self.listeners.push(Listener {
            phase: joined.index as u64 % every,
            send_seq: rand::random(),
            send_timestamp_base: rand::random(),
            joined,
            every,
            is_reference,
            ssrc: None,
            extender: Extender::default(),
            total: SeqCounter::default(),
            rr_expected: 0,
            rr_received: 0,
            jitter: 0.0,
            last_transit: None,
            consent_pending: None,
            kernel_drops: 0,
            window: Window::default(),
            closed: None,
        });
        Ok(())
    }

    fn start_window(&mut self) {
        for listener in &mut self.listeners {
            listener.window = Window {
                kernel_drops_at_start: listener.kernel_drops,
                ..Window::default()
            };
            listener.closed = None;
        }
        self.sampling = true;
        self.window_start = Some(Instant::now());
        self.window_end = None;
        self.thread_cpu_start = cpu(UsageWho::RUSAGE_THREAD);
        self.process_cpu_start = cpu(UsageWho::RUSAGE_SELF);
        self.snmp_start = udp_errors();
        self.upstream_skipped_at_start = self.upstream_skipped;
    }

    fn end_window(&mut self) {
        self.sampling = false;
        for listener in &mut self.listeners {
            listener.closed = Some(Window {
                kernel_drops_at_end: listener.kernel_drops,
                ..listener.window.clone()
            });
        }
        self.window_end = Some(Instant::now());
        self.thread_cpu = cpu(UsageWho::RUSAGE_THREAD).saturating_sub(self.thread_cpu_start);
        self.process_cpu = cpu(UsageWho::RUSAGE_SELF).saturating_sub(self.process_cpu_start);
        self.snmp_delta = match (self.snmp_start, udp_errors()) {
            (Some((in_start, rcv_start)), Some((in_end, rcv_end))) => (
                in_end.saturating_sub(in_start),
                rcv_end.saturating_sub(rcv_start),
            ),
            _ => (0, 0),
        };
        self.upstream_skipped_in_window = self.upstream_skipped - self.upstream_skipped_at_start;
    }

    fn snapshot(&self) -> Snapshot {
        let start = self.window_start.unwrap_or(self.epoch);
        let end = self.window_end.unwrap_or_else(Instant::now);
        let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(start));
        let listeners = self
            .listeners
            .iter()
            .map(|l| {
                let w = l.closed.as_ref().unwrap_or(&l.window);
                let matched: Vec<(Arrival, Arrival)> = w
                    .samples
                    .iter()
                    .filter_map(|s| {
                        let arrivals = self.reference.hashes.get(&s.hash)?;
                        Some((s.arrival, nearest(arrivals, s.arrival)?))
                    })
                    .collect();
                let samples_ok = matched.len() as u64;
                let (offset, read_offset) = offsets(&matched);
                let seq_delta = sequence_delta(&matched);
                let j = &l.joined;
                ListenerReport {
                    index: j.index,
                    local_addr: j.local,
                    is_reference: l.is_reference,
                    dtls_role: j.role,
                    srtp_profile: format!("{:?}", j.profile),
                    answer_direction: j.answer_direction.clone(),
                    join: j.timings,
                    early_rtp: j.early_rtp,
                    ssrc: l.ssrc,
                    foreign_ssrc_packets: w.foreign_ssrc,
                    packets: w.rtp_packets,
                    bytes: w.rtp_bytes,
                    expected: w.seq.expected(),
                    lost: w.seq.lost(),
                    duplicates: w.seq.duplicates,
                    reordered: w.seq.reordered,
                    first_arrival: since(w.first_arrival),
                    last_arrival: since(w.last_arrival),
                    jitter_ms: l.jitter / CLOCK_RATE * 1000.0,
                    samples_ok,
                    samples_mismatched: w.samples.len() as u64 - samples_ok,
                    offset_vs_reference_ms: offset,
                    read_offset_vs_reference_ms: read_offset,
                    seq_delta_vs_reference: seq_delta,
                    answered_at: j.answered_at.saturating_duration_since(self.epoch),
                    send_ssrc: self.settings.upstream.is_some().then_some(j.send_ssrc),
                    audio_level_id: j.audio_level_id,
                    upstream_sent: w.upstream_sent,
                    samples_undecryptable: w.undecryptable,
                    rtcp_received: w.rtcp_packets,
                    stun_received: w.stun_packets,
                    dtls_received: w.dtls_packets,
                    other_received: w.other_packets,
                    consent_sent: w.consent_sent,
                    consent_answered: w.consent_answered,
                    rtcp_sent: w.rtcp_sent,
                    send_errors: w.send_errors,
                    kernel_drops: if l.closed.is_some() {
                        w.kernel_drops_at_end
                    } else {
                        l.kernel_drops
                    }
                    .wrapping_sub(w.kernel_drops_at_start),
                }
            })
            .collect();
        let reference = self
            .reference
            .packets
            .iter()
            .filter(|(_, at, _)| *at >= start && *at <= end)
            .map(|(extended, at, payload)| ReferencePacket {
                extended_seq: *extended,
                at: at.saturating_duration_since(start),
                payload: payload.clone(),
            })
            .collect();
        Snapshot {
            listeners,
            reference,
            reference_index: self
                .reference_slot
                .and_then(|slot| self.listeners.get(slot))
                .map(|l| l.joined.index),
            window: end.saturating_duration_since(start),
            thread_cpu: self.thread_cpu,
            process_cpu: self.process_cpu,
            udp_in_errors: self.snmp_delta.0,
            udp_rcvbuf_errors: self.snmp_delta.1,
            upstream_slots_skipped: self.upstream_skipped_in_window,
        }
    }

    /// When upstream slot `slot` is due.
    fn upstream_due(&self, slot: u64) -> Instant {
        self.epoch + UPSTREAM_PERIOD.mul_f64(slot as f64 / UPSTREAM_PHASES as f64)
    }

    /// Runs the upstream slots that are due: each sends one packet for every listener in it.
    fn upstream(&mut self, now: Instant) {
        let Some(payload) = self.settings.upstream.clone() else {
            return;
        };
        let mut ran = 0;
        while self.upstream_due(self.upstream_slot) <= now {
            if ran == UPSTREAM_PHASES {
                // A whole period behind: skip to the present rather than burst.
                let elapsed = now.saturating_duration_since(self.epoch).as_secs_f64();
                let present =
                    (elapsed / UPSTREAM_PERIOD.as_secs_f64() * UPSTREAM_PHASES as f64) as u64 + 1;
                self.upstream_skipped += present.saturating_sub(self.upstream_slot);
                self.upstream_slot = present;
                return;
            }
            let slot = self.upstream_slot;
            let phase = (slot % UPSTREAM_PHASES) as usize;
            // The RTP clock follows the period count: a skipped slot leaves a timestamp gap.
            let periods = (slot / UPSTREAM_PHASES) as u32;
            let mut buffer = std::mem::take(&mut self.upstream_buffer);
            for listener in self
                .listeners
                .iter_mut()
                .skip(phase)
                .step_by(UPSTREAM_PHASES as usize)
            {
                send_upstream(listener, periods, &payload, &mut buffer);
            }
            self.upstream_buffer = buffer;
            self.upstream_slot += 1;
            ran += 1;
        }
    }

    /// Sends due consent checks and receiver reports.
    fn timers(&mut self, now: Instant) {
        while let Some(&(due, slot)) = self.consent_due.front() {
            if due > now {
                break;
            }
            self.consent_due.pop_front();
            self.consent_due
                .push_back((now + self.settings.consent_interval, slot));
            if let Some(listener) = self.listeners.get_mut(slot) {
                consent_check(listener, &self.settings);
            }
        }
        while let Some(&(due, slot)) = self.rtcp_due.front() {
            if due > now {
                break;
            }
            self.rtcp_due.pop_front();
            self.rtcp_due
                .push_back((now + self.settings.rtcp_interval, slot));
            if let Some(listener) = self.listeners.get_mut(slot) {
                receiver_report(listener);
            }
        }
    }

    /// Reads everything queued on listener `slot`'s socket.
    fn drain(
        &mut self,
        slot: usize,
        headers: &mut MultiHeaders<SockaddrStorage>,
        buffer: &mut [u8],
    ) {
        let Some(fd) = self
            .listeners
            .get(slot)
            .map(|l| l.joined.socket.as_raw_fd())
        else {
            return;
        };
        loop {
            let mut lengths = [0usize; BATCH];
            let mut sources = [None::<SocketAddr>; BATCH];
            let mut stamps = [None::<i64>; BATCH];
            let mut drops = None;
            let received = {
                let mut chunks = buffer.chunks_exact_mut(SLOT);
                let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
                let results =
                    match recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
                        Ok(results) => results,
                        Err(Errno::EINTR) => continue,
                        // EAGAIN: drained. Anything else: nothing more to read now either.
                        Err(_) => return,
                    };
                let mut count = 0;
                for (i, message) in results.enumerate() {
                    lengths[i] = message.bytes;
                    sources[i] = message.address.and_then(|address| {
                        address
                            .as_sockaddr_in()
                            .map(|a| SocketAddr::V4((*a).into()))
                            .or_else(|| {
                                address
                                    .as_sockaddr_in6()
                                    .map(|a| SocketAddr::V6((*a).into()))
                            })
                    });
                    if let Ok(cmsgs) = message.cmsgs() {
                        for cmsg in cmsgs {
                            match cmsg {
                                ControlMessageOwned::RxqOvfl(dropped) => drops = Some(dropped),
                                ControlMessageOwned::ScmTimestampns(at) => {
                                    stamps[i] = Some(
                                        at.tv_sec().saturating_mul(1_000_000_000) + at.tv_nsec(),
                                    );
                                }
                                _ => {}
                            }
                        }
                    }
                    count = i + 1;
                }
                count
            };
            let now = Instant::now();
            if let Some(dropped) = drops
                && let Some(listener) = self.listeners.get_mut(slot)
            {
                listener.kernel_drops = dropped;
            }
            for i in 0..received {
                let datagram = &buffer[i * SLOT..i * SLOT + lengths[i].min(SLOT)];
                let arrival = Arrival {
                    read: now,
                    kernel_ns: stamps[i],
                    seq: 0,
                };
                self.datagram(slot, arrival, sources[i], datagram);
            }
            if received < BATCH {
                return;
            }
        }
    }

    /// Handles one datagram of listener `slot`.
    fn datagram(
        &mut self,
        slot: usize,
        arrival: Arrival,
        from: Option<SocketAddr>,
        datagram: &[u8],
    ) {
        let now = arrival.read;
        let sampling = self.sampling;
        let epoch = self.epoch;
        let Some(listener) = self.listeners.get_mut(slot) else {
            return;
        };
        if from != Some(listener.joined.remote) {
            listener.window.other_packets += 1;
            return;
        }
        match datagram.first() {
            Some(128..=191) => {
                // RTCP packet types 192-223 share the first byte range (RFC 5761 §4).
                if datagram.get(1).is_some_and(|pt| (192..=223).contains(pt)) {
                    listener.window.rtcp_packets += 1;
                    return;
                }
                let reference = if listener.is_reference {
                    Some(&mut self.reference)
                } else {
                    None
                };
                rtp(listener, arrival, epoch, datagram, sampling, reference);
            }
            Some(0..=3) => {
                listener.window.stun_packets += 1;
                let joined = &listener.joined;
                match ice::inbound(
                    datagram,
                    joined.remote,
                    &joined.credentials,
                    self.settings.crypto.crypto(),
                ) {
                    Ok(Inbound::Success(transaction)) => {
                        if listener.consent_pending == Some(transaction) {
                            listener.consent_pending = None;
                            listener.window.consent_answered += 1;
                        }
                    }
                    Ok(Inbound::Request(response)) => {
                        if joined.socket.send_to(&response, joined.remote).is_err() {
                            listener.window.send_errors += 1;
                        }
                    }
                    Err(_) => listener.window.other_packets += 1,
                }
            }
            Some(20..=63) => {
                listener.window.dtls_packets += 1;
                let joined = &mut listener.joined;
                let _ = joined
                    .endpoint
                    .read(now, joined.remote, None, BytesMut::from(datagram));
                while let Some(transmit) = joined.endpoint.poll_transmit() {
                    if joined
                        .socket
                        .send_to(&transmit.message, joined.remote)
                        .is_err()
                    {
                        listener.window.send_errors += 1;
                    }
                }
            }
            _ => listener.window.other_packets += 1,
        }
    }
}

/// Keeps a timer queue ordered after a push of a random due time.
fn sort_queue(queue: &mut VecDeque<(Instant, usize)>) {
    queue.make_contiguous().sort_by_key(|(due, _)| *due);
}

/// Counts one RTP packet and, when it is this listener's turn, decrypts it.
fn rtp(
    listener: &mut Listener,
    arrival: Arrival,
    epoch: Instant,
    datagram: &[u8],
    sampling: bool,
    reference: Option<&mut Reference>,
) {
    let [_, _, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3, ..] = *datagram else {
        listener.window.other_packets += 1;
        return;
    };
    let now = arrival.read;
    let seq = u16::from_be_bytes([s0, s1]);
    let arrival = Arrival { seq, ..arrival };
    let timestamp = u32::from_be_bytes([t0, t1, t2, t3]);
    let ssrc = u32::from_be_bytes([c0, c1, c2, c3]);
    if *listener.ssrc.get_or_insert(ssrc) != ssrc {
        listener.window.foreign_ssrc += 1;
        return;
    }
    let extended = listener.extender.extend(seq);
    let is_first = listener.total.first.is_none();
    let is_new = extended > listener.total.highest || is_first;
    listener.total.record(extended);
    // Interarrival jitter (RFC 3550 §6.4.1), over packets in order.
    if is_new {
        let arrival = (now.saturating_duration_since(epoch).as_secs_f64() * CLOCK_RATE) as i64;
        let transit = arrival - i64::from(timestamp);
        if let Some(last) = listener.last_transit {
            let d = (transit - last).abs() as f64;
            listener.jitter += (d - listener.jitter) / 16.0;
        }
        listener.last_transit = Some(transit);
    }
    let window = &mut listener.window;
    window.rtp_packets += 1;
    window.rtp_bytes += datagram.len() as u64;
    window.first_arrival.get_or_insert(now);
    window.last_arrival = Some(now);
    window.seq.record(extended);

    match reference {
        Some(reference) => match decrypt_payload(listener, datagram) {
            Some(payload) => {
                let hash = payload_hash(&payload);
                reference.hashes.entry(hash).or_default().push(arrival);
                reference.packets.push((extended, now, payload));
                if sampling {
                    listener.window.samples.push(Sample { hash, arrival });
                }
            }
            None => {
                if sampling {
                    listener.window.undecryptable += 1;
                }
            }
        },
        None if sampling
            && (listener.window.rtp_packets + listener.phase).is_multiple_of(listener.every) =>
        {
            match decrypt_payload(listener, datagram) {
                Some(payload) => {
                    let hash = payload_hash(&payload);
                    listener.window.samples.push(Sample { hash, arrival });
                }
                None => listener.window.undecryptable += 1,
            }
        }
        None if is_first => {
            // SRTP's rollover counter (RFC 3711 §3.3.1) is inferred from the sequence numbers a
            // context has seen. A context whose first packet came after the sender's sequence
            // wrapped would guess 0 and fail every sample from then on: so the stream's first
            // packet, with counter 0 for certain, anchors it (later samples are under 2^15 apart).
            let _ = decrypt_payload(listener, datagram);
        }
        None => {}
    }
}

/// Decrypts one SRTP packet with the listener's keys; returns its payload.
fn decrypt_payload(listener: &mut Listener, datagram: &[u8]) -> Option<Bytes> {
    let decrypted = listener.joined.remote_srtp.decrypt_rtp(datagram).ok()?;
    let packet = rtc::rtp::Packet::unmarshal(&mut &decrypted[..]).ok()?;
    Some(packet.payload)
}

/// Sends a consent-freshness Binding Request (RFC 7675), as a browser does on its selected pair.
fn consent_check(listener: &mut Listener, settings: &MediaSettings) {
    let joined = &listener.joined;
    match ice::binding_request(&joined.credentials, true, settings.crypto.crypto()) {
        Ok((transaction, request)) => {
            if joined.socket.send_to(&request, joined.remote).is_ok() {
                listener.consent_pending = Some(transaction);
                listener.window.consent_sent += 1;
            } else {
                listener.window.send_errors += 1;
            }
        }
        Err(_) => listener.window.send_errors += 1,
    }
}

/// Sends an SRTCP Receiver Report about the server's stream (RFC 3550 §6.4.2).
fn receiver_report(listener: &mut Listener) {
    let Some(ssrc) = listener.ssrc else {
        return; // nothing received yet: nothing to report
    };
    let total = &listener.total;
    let expected = total.expected();
    let expected_interval = expected - listener.rr_expected;
    let received_interval = total.unique - listener.rr_received;
    let lost_interval = expected_interval.saturating_sub(received_interval);
    let fraction_lost = (lost_interval << 8)
        .checked_div(expected_interval)
        .map_or(0, |fraction| fraction.min(255) as u8);
    listener.rr_expected = expected;
    listener.rr_received = total.unique;
    let report = ReceiverReport {
        // The listener's own (declared) SSRC, as a browser reports from its sender's.
        ssrc: listener.joined.send_ssrc,
        reports: vec![ReceptionReport {
            ssrc,
            fraction_lost,
            // 24-bit field.
            total_lost: total.lost().min(0x7f_ffff) as u32,
            // Cycles in the upper 16 bits, as the extender counts them from one.
            last_sequence_number: (total.highest - (1 << 16)) as u32,
            jitter: listener.jitter as u32,
            last_sender_report: 0,
            delay: 0,
        }],
        profile_extensions: Bytes::new(),
    };
    let sent = report
        .marshal()
        .ok()
        .and_then(|plain| listener.joined.local_srtp.encrypt_rtcp(&plain).ok())
        .is_some_and(|protected| {
            listener
                .joined
                .socket
                .send_to(&protected, listener.joined.remote)
                .is_ok()
        });
    if sent {
        listener.window.rtcp_sent += 1;
    } else {
        listener.window.send_errors += 1;
    }
}

/// Offsets of matched samples from the reference's arrival of the same payload: (kernel stamps
/// where both sides have one, else read times; read times only).
fn offsets(matched: &[(Arrival, Arrival)]) -> (Option<OffsetStats>, Option<OffsetStats>) {
    let mut kernel_stamped = 0;
    let best: Vec<f64> = matched
        .iter()
        .map(
            |(sample, reference)| match (sample.kernel_ns, reference.kernel_ns) {
                (Some(at), Some(reference_at)) => {
                    kernel_stamped += 1;
                    (at - reference_at) as f64 / 1e6
                }
                _ => signed_ms(sample.read, reference.read),
            },
        )
        .collect();
    let read: Vec<f64> = matched
        .iter()
        .map(|(sample, reference)| signed_ms(sample.read, reference.read))
        .collect();
    (
        OffsetStats::of(best, kernel_stamped),
        OffsetStats::of(read, 0),
    )
}

/// The difference of RTP sequence numbers (the listener's minus the reference's) that most
/// matched samples show: the server numbers each listener's packets in step, so it is one
/// constant while nothing is skipped.
fn sequence_delta(matched: &[(Arrival, Arrival)]) -> Option<u16> {
    let mut deltas: Vec<u16> = matched
        .iter()
        .map(|(sample, reference)| sample.seq.wrapping_sub(reference.seq))
        .collect();
    deltas.sort_unstable();
    deltas
        .chunk_by(|a, b| a == b)
        .max_by_key(|run| run.len())
        .and_then(|run| run.first().copied())
}

/// The reference arrival closest to `sample` (by kernel stamps when both have them) among
/// `arrivals`, which are in arrival order.
fn nearest(arrivals: &[Arrival], sample: Arrival) -> Option<Arrival> {
    let at = arrivals.partition_point(|a| a.read < sample.read);
    let distance = |a: &Arrival| match (sample.kernel_ns, a.kernel_ns) {
        (Some(x), Some(y)) => (x - y).unsigned_abs() as f64 / 1e6,
        _ => signed_ms(sample.read, a.read).abs(),
    };
    // Read times lag kernel stamps by differing amounts, so look a little either side.
    arrivals[at.saturating_sub(2)..(at + 2).min(arrivals.len())]
        .iter()
        .min_by(|a, b| distance(a).total_cmp(&distance(b)))
        .copied()
}

/// `a - b` in milliseconds, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1e3
    } else {
        -((b - a).as_secs_f64() * 1e3)
    }
}

/// Sends one upstream packet of `listener`: RTP with the RFC 6464 extension (when negotiated)
/// saying silence, `payload`, SRTP-protected with the listener's keys.
fn send_upstream(listener: &mut Listener, periods: u32, payload: &[u8], plain: &mut Vec<u8>) {
    let joined = &mut listener.joined;
    let timestamp = listener
        .send_timestamp_base
        .wrapping_add(periods.wrapping_mul(UPSTREAM_TIMESTAMP_STEP));
    plain.clear();
    let extension = joined.audio_level_id.filter(|id| (1..=14).contains(id));
    plain.push(if extension.is_some() { 0x90 } else { 0x80 }); // V=2, X
    plain.push(OPUS_PAYLOAD_TYPE);
    plain.extend_from_slice(&listener.send_seq.to_be_bytes());
    plain.extend_from_slice(&timestamp.to_be_bytes());
    plain.extend_from_slice(&joined.send_ssrc.to_be_bytes());
    if let Some(id) = extension {
        // RFC 8285 one-byte form: 0xBEDE, one 32-bit word: ID | L=0, level, padding.
        plain.extend_from_slice(&[0xBE, 0xDE, 0x00, 0x01, id << 4, SILENT_LEVEL, 0, 0]);
    }
    plain.extend_from_slice(payload);
    listener.send_seq = listener.send_seq.wrapping_add(1);
    let sent = joined
        .local_srtp
        .encrypt_rtp(plain)
        .ok()
        .is_some_and(|protected| joined.socket.send_to(&protected, joined.remote).is_ok());
    if sent {
        listener.window.upstream_sent += 1;
    } else {
        listener.window.send_errors += 1;
    }
}
