//! The listener swarm: many receive-only WebRTC listeners in one process, cheaply.
//!
//! The client side of a capacity benchmark: it joins N listeners to one room of a Chorus media
//! server through the ordinary join API (`POST {base}/v1/rooms/{room}/participants`, SDP offer
//! in, SDP answer out, `DELETE` the returned `Location` to leave), or to a Janus AudioBridge
//! room through Janus' HTTP API ([`Target::Janus`], see `janus.rs`), each with real ICE, real
//! DTLS and its own SRTP keys, then measures what they receive. Optionally every listener also
//! streams silence upstream, as a browser with an unmuted microphone does ([`Upstream`]). A `webrtc`/`rtc` peer connection per
//! listener costs about a core per 80 listeners, so instead each listener is built from `rtc`'s
//! sub-crates (`rtc::stun`, `rtc::dtls`, `rtc::srtp`, `rtc::rtp`, `rtc::rtcp`):
//!
//! - `sdp.rs`: the hand-written offer and the answer parser;
//! - `ice.rs`: Binding Requests/Responses (the listener controls; it also answers the server's
//!   own checks, which a full agent such as Janus sends);
//! - `handshake.rs`: one listener's join (socket, signalling, ICE, DTLS, SRTP key export), as a
//!   Tokio task; [`Swarm::join`] runs at most `join_concurrency` of them at once;
//! - `janus.rs`: the signalling against a Janus AudioBridge room;
//! - `media.rs`: ONE OS thread that reads every socket (`epoll` + `recvmmsg`), counts, samples
//!   decryption, timestamps arrivals, sends consent checks and SRTCP receiver reports, and the
//!   upstream silence.
//!
//! Usage: [`Swarm::join`] with a [`SwarmConfig`], then [`Swarm::run_for`] (as often as wanted)
//! for a [`SwarmReport`], then [`Swarm::leave`]. [`SwarmReport::verify`] checks that every
//! listener joined, received, lost little and decrypted its samples to the reference payloads;
//! [`SwarmReport::reference_pcm`] decodes what the reference listener heard;
//! [`ListenerReport::offset_vs_reference_ms`] and [`SwarmReport::fan_out`] say how much later
//! than the reference each listener received the same payloads.
//!
//! Invariants:
//! - Listener 0 is the reference: it joins first, alone, so it is recording before any other
//!   listener's samples are taken; it decrypts every packet and keeps every payload.
//! - A sample matches only a payload the reference received byte for byte (compared by a 64-bit
//!   SipHash and the length): the server encodes the listeners' mix once and sends the same
//!   bytes to each, so a listener with wrong keys, or a server mixing per listener, shows up
//!   as mismatches. Janus' AudioBridge does encode per participant, so against it payloads need
//!   not match ([`SwarmConfig::verify_payloads`] off, offsets mostly unavailable).
//! - A listener's offset for a sample is its arrival minus the reference's nearest arrival of
//!   the same payload (identical payloads recur: silence, a steady tone; so an offset is only
//!   unambiguous within half the interval at which a payload repeats, at least ±10 ms), from
//!   kernel receive timestamps (SO_TIMESTAMPNS, nanosecond resolution; over
//!   loopback stamped as the server sends, so the swarm's own reading order and load do not
//!   enter). Only where a stamp is missing does it fall back on the time read right after the
//!   `recvmmsg` call that returned the packet, which lags by up to the media thread's pass
//!   over all sockets; [`ListenerReport::read_offset_vs_reference_ms`] gives that view too.
//! - The swarm's own CPU is measured on the media thread alone (`RUSAGE_THREAD`), so a server
//!   running in the same process does not count: above ~80 % of a core, the generator, not
//!   the server, may be the bottleneck ([`SwarmReport::generator_saturated`]).

mod handshake;
mod ice;
pub mod janus;
mod media;
mod sdp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::Semaphore;

pub use handshake::JoinTimings;
pub use janus::JanusTarget;
pub use sdp::{Direction, DtlsRole};

use handshake::{JoinContext, Membership, Signaling};
use media::{Command, MediaSettings};

/// Makes the join token of listener `i` (each listener should have its own identity).
pub type TokenFactory = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// Which server the swarm joins.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Target {
    /// Chorus' join API: `POST {base_url}/v1/rooms/{room}/participants` with `token(i)`.
    #[default]
    Chorus,
    /// A Janus AudioBridge room through the Janus API at `base_url` (`http://HOST:PORT/janus`);
    /// `room` and `token` are not used. Listeners bind to Janus' own address when `bind_ip` is
    /// a loopback one (Janus has no candidate on loopback).
    Janus(JanusTarget),
}

/// What the listeners send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Upstream {
    /// Nothing but STUN and RTCP (a muted browser tab).
    #[default]
    None,
    /// 50 packets/s each of SRTP-protected Opus silence (libopus' encoding of 20 ms of zeros,
    /// made once), with the RFC 6464 audio level 127 when the answer negotiated the extension:
    /// a browser listener that does not mute its microphone. Needs [`Direction::SendRecv`].
    Silence,
}

/// How to build a swarm.
#[derive(Clone)]
pub struct SwarmConfig {
    /// The server's HTTP base, such as `http://127.0.0.1:8080` (for [`Target::Janus`], the
    /// Janus API root, `http://127.0.0.1:8088/janus`).
    pub base_url: String,
    /// The room to join (Chorus).
    pub room: String,
    /// Listener `i`'s join token (Chorus).
    pub token: TokenFactory,
    /// Which server and protocol to join through.
    pub target: Target,
    /// What the listeners send.
    pub upstream: Upstream,
    /// Whether [`SwarmReport::verify`] requires every sample to match a reference payload.
    /// True for Chorus (one encoding for all listeners); false for Janus, which encodes for
    /// every participant separately, so equal payloads are a coincidence there.
    pub verify_payloads: bool,
    /// How many listeners.
    pub listeners: usize,
    /// The direction offered: [`Direction::RecvOnly`] is the target, [`Direction::SendRecv`]
    /// what a server that accepts only full participants needs.
    pub direction: Direction,
    /// Every listener but the reference decrypts one packet in this many (at most 10 000, so
    /// the SRTP rollover estimate between two samples never spans half the sequence space).
    pub sample_every: u32,
    /// The listeners' sockets bind here (port 0). Must be a concrete address: it goes into the
    /// offer's host candidate.
    pub bind_ip: IpAddr,
    /// At most this many joins (HTTP + ICE + DTLS) in flight at once.
    pub join_concurrency: usize,
    /// How long one listener may take from its answer to DTLS complete.
    pub connect_timeout: Duration,
    /// SO_RCVBUF requested for each listener socket.
    pub recv_buffer_bytes: usize,
    /// Consent-freshness interval. Chrome checks its selected pair every 2.5 s; an `rtc`-based
    /// server counts a pair as disconnected after 5 s without STUN (and then stops sending),
    /// so this must stay well under 5 s.
    pub consent_interval: Duration,
    /// Receiver-report interval (RFC 3550's 5 s minimum, as browsers send for audio).
    pub rtcp_interval: Duration,
    /// `Some(p)`: the media thread polls its sockets every `p` and sleeps in between, instead of
    /// waiting in `epoll` for the next datagram. On one machine the sender's `sendmmsg` runs the
    /// loopback delivery itself, so a swarm woken per datagram makes the server pay a
    /// cross-CPU wake-up (an IPI, a VM exit here) for most bursts: cost that a remote browser
    /// never charges the server. Polling keeps the sockets' wait queues empty. `None` waits
    /// in `epoll` (lowest reaction time, for tests that time single packets).
    pub poll_interval: Option<Duration>,
    /// Create the listeners' sockets in another network namespace (the bench's
    /// [`crate::swarm_network`]); `bind_ip` must then be an address of that namespace.
    pub netns: Option<crate::swarm_network::NetnsBinder>,
}

impl std::fmt::Debug for SwarmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmConfig")
            .field("base_url", &self.base_url)
            .field("room", &self.room)
            .field("listeners", &self.listeners)
            .field("target", &self.target)
            .field("upstream", &self.upstream)
            .field("verify_payloads", &self.verify_payloads)
            .field("direction", &self.direction)
            .field("sample_every", &self.sample_every)
            .field("bind_ip", &self.bind_ip)
            .field("join_concurrency", &self.join_concurrency)
            .field("connect_timeout", &self.connect_timeout)
            .field("recv_buffer_bytes", &self.recv_buffer_bytes)
            .field("consent_interval", &self.consent_interval)
            .field("rtcp_interval", &self.rtcp_interval)
            .field("poll_interval", &self.poll_interval)
            .field("netns", &self.netns.is_some())
            .finish_non_exhaustive()
    }
}

impl SwarmConfig {
    /// `listeners` recvonly listeners on 127.0.0.1, sampling 1 packet in 100, 64 joins at a
    /// time, `token(i)` for listener `i`.
    pub fn new(
        base_url: impl Into<String>,
        room: impl Into<String>,
        listeners: usize,
        token: impl Fn(usize) -> String + Send + Sync + 'static,
    ) -> Self {
        SwarmConfig {
            base_url: base_url.into(),
            room: room.into(),
            token: Arc::new(token),
            target: Target::Chorus,
            upstream: Upstream::None,
            verify_payloads: true,
            listeners,
            direction: Direction::RecvOnly,
            sample_every: 100,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            join_concurrency: 64,
            connect_timeout: Duration::from_secs(15),
            recv_buffer_bytes: 512 * 1024,
            consent_interval: Duration::from_millis(2500),
            rtcp_interval: Duration::from_secs(5),
            poll_interval: Some(Duration::from_millis(1)),
            netns: None,
        }
    }

    /// `listeners` recvonly listeners joining Janus AudioBridge room `target.room` through the
    /// Janus API at `janus_base_url`; otherwise as [`SwarmConfig::new`], with
    /// `verify_payloads` off (see there).
    pub fn janus(janus_base_url: impl Into<String>, target: JanusTarget, listeners: usize) -> Self {
        let room = target.room.to_string();
        SwarmConfig {
            target: Target::Janus(target),
            verify_payloads: false,
            ..SwarmConfig::new(janus_base_url, room, listeners, |_| String::new())
        }
    }
}

/// The spread of a listener's arrival offsets from the reference's, ms (positive: later).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffsetStats {
    /// Matched samples the offsets come from.
    pub samples: u64,
    /// Of these, how many had kernel timestamps on both sides (the rest used read times).
    pub kernel_stamped: u64,
    /// Smallest offset.
    pub min: f64,
    /// Median offset.
    pub p50: f64,
    /// Largest offset.
    pub max: f64,
}

impl OffsetStats {
    /// Stats of `offsets` (None when empty).
    fn of(mut offsets: Vec<f64>, kernel_stamped: u64) -> Option<OffsetStats> {
        if offsets.is_empty() {
            return None;
        }
        offsets.sort_by(f64::total_cmp);
        Some(OffsetStats {
            samples: offsets.len() as u64,
            kernel_stamped,
            min: offsets[0],
            p50: offsets[offsets.len() / 2],
            max: offsets[offsets.len() - 1],
        })
    }
}

/// The reference's and the last listener's offsets ([`SwarmReport::fan_out`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FanOut {
    /// The reference's own offsets (zero by construction; present when it sampled).
    pub reference: Option<OffsetStats>,
    /// The highest-indexed listener.
    pub last_index: usize,
    /// Its offsets from the reference.
    pub last: Option<OffsetStats>,
    /// The listener whose answer came last (with concurrent joins, not necessarily the
    /// highest index).
    pub last_answered_index: usize,
    /// Its offsets from the reference.
    pub last_answered: Option<OffsetStats>,
}

/// What one listener received during a window.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerReport {
    /// The listener's number (0 = the reference).
    pub index: usize,
    /// Its socket.
    pub local_addr: SocketAddr,
    /// Whether it is the reference (decrypts everything).
    pub is_reference: bool,
    /// Its DTLS role (from the answer's `a=setup`).
    pub dtls_role: DtlsRole,
    /// The negotiated SRTP protection profile.
    pub srtp_profile: String,
    /// The answer's direction (`sendonly` or `sendrecv`).
    pub answer_direction: String,
    /// How long its join took.
    pub join: JoinTimings,
    /// When its answer arrived, from the start of the swarm's media thread (just before the
    /// first join): orders listeners as the server admitted them.
    pub answered_at: Duration,
    /// RTP that arrived before its keys existed (during the join; dropped).
    pub early_rtp: u64,
    /// The server's SSRC for this listener (first seen ever).
    pub ssrc: Option<u32>,
    /// RTP packets with another SSRC (must be 0: one stream per listener).
    pub foreign_ssrc_packets: u64,
    /// RTP datagrams received (duplicates included).
    pub packets: u64,
    /// Their bytes (SRTP, headers included).
    pub bytes: u64,
    /// Sequence numbers spanned: highest - first + 1.
    pub expected: u64,
    /// Sequence numbers never received.
    pub lost: u64,
    /// Sequence numbers received more than once.
    pub duplicates: u64,
    /// Packets that arrived after a higher sequence number.
    pub reordered: u64,
    /// First packet, from the window's start.
    pub first_arrival: Option<Duration>,
    /// Last packet, from the window's start.
    pub last_arrival: Option<Duration>,
    /// RFC 3550 interarrival jitter, ms (cumulative estimate at the snapshot).
    pub jitter_ms: f64,
    /// Sampled payloads that the reference also received.
    pub samples_ok: u64,
    /// Sampled payloads the reference never received.
    pub samples_mismatched: u64,
    /// Sampled packets that failed SRTP authentication or parsing.
    pub samples_undecryptable: u64,
    /// Per matched sample, its arrival minus the reference's arrival of the same payload, by
    /// kernel receive timestamps (see the module doc); None without matched samples, and for
    /// every listener but the reference when [`SwarmConfig::verify_payloads`] is off.
    pub offset_vs_reference_ms: Option<OffsetStats>,
    /// The same offsets from the times read right after each `recvmmsg` call (include the
    /// media thread's reading order and delay).
    pub read_offset_vs_reference_ms: Option<OffsetStats>,
    /// Its RTP sequence number minus the reference's for the same payload, as most matched
    /// samples show it (the server numbers every listener's packets in step); `None` without
    /// matched samples.
    pub seq_delta_vs_reference: Option<u16>,
    /// The SSRC it sends upstream with (None: it sends nothing).
    pub send_ssrc: Option<u32>,
    /// The answer's RFC 6464 audio-level extension id (None: not negotiated).
    pub audio_level_id: Option<u8>,
    /// Upstream RTP packets sent.
    pub upstream_sent: u64,
    /// SRTCP packets received.
    pub rtcp_received: u64,
    /// STUN messages received (consent responses).
    pub stun_received: u64,
    /// DTLS records received after the handshake.
    pub dtls_received: u64,
    /// Datagrams from elsewhere or of no known kind.
    pub other_received: u64,
    /// Consent checks sent.
    pub consent_sent: u64,
    /// Consent checks answered (integrity checked).
    pub consent_answered: u64,
    /// Receiver reports sent.
    pub rtcp_sent: u64,
    /// Sends that failed (STUN, RTCP, upstream RTP).
    pub send_errors: u64,
    /// Datagrams the kernel dropped on this socket (SO_RXQ_OVFL, as of its last read).
    pub kernel_drops: u32,
}

/// One payload the reference listener decrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferencePacket {
    /// Extended RTP sequence number (gaps are losses).
    pub extended_seq: u64,
    /// Arrival, from the window's start.
    pub at: Duration,
    /// The Opus payload.
    pub payload: Bytes,
}

/// What the swarm measured over one [`Swarm::run_for`].
#[derive(Debug, Clone)]
pub struct SwarmReport {
    /// Listeners asked for.
    pub listeners_requested: usize,
    /// Listeners connected (ICE + DTLS + keys).
    pub listeners_joined: usize,
    /// `(index, error)` of every listener that failed to join.
    pub join_failures: Vec<(usize, String)>,
    /// Wall time of [`Swarm::join`].
    pub join_duration: Duration,
    /// The measurement window's length.
    pub window: Duration,
    /// Per listener, in index order.
    pub listeners: Vec<ListenerReport>,
    /// What the reference decrypted during the window, in arrival order.
    pub reference: Vec<ReferencePacket>,
    /// The reference listener's index.
    pub reference_index: Option<usize>,
    /// Sums over listeners.
    pub packets_received: u64,
    /// Sum of [`ListenerReport::lost`].
    pub packets_lost: u64,
    /// Sum of [`ListenerReport::samples_ok`].
    pub samples_ok: u64,
    /// Sum of [`ListenerReport::samples_mismatched`].
    pub samples_mismatched: u64,
    /// Sum of [`ListenerReport::samples_undecryptable`].
    pub samples_undecryptable: u64,
    /// Sum of per-socket kernel drops (SO_RXQ_OVFL).
    pub kernel_drops: u64,
    /// Sum of [`ListenerReport::upstream_sent`].
    pub upstream_sent: u64,
    /// Upstream send slots (one tenth of the listeners each) skipped because the media thread
    /// fell a whole 20 ms period behind.
    pub upstream_slots_skipped: u64,
    /// Whether [`SwarmReport::verify`] checks payloads ([`SwarmConfig::verify_payloads`]).
    pub verify_payloads: bool,
    /// Host-wide `Udp: RcvbufErrors` over the window (includes any other UDP socket, such as
    /// an in-process server's).
    pub udp_rcvbuf_errors: u64,
    /// Host-wide `Udp: InErrors` over the window.
    pub udp_in_errors: u64,
    /// CPU the media thread used during the window.
    pub swarm_cpu: Duration,
    /// `swarm_cpu / window`: the share of one core the generator used.
    pub swarm_core_fraction: f64,
    /// CPU the whole process used during the window (includes an in-process server).
    pub process_cpu: Duration,
}

impl SwarmReport {
    /// Whether the media thread used more than 80 % of a core: the generator may have been the
    /// limit, not the server.
    pub fn generator_saturated(&self) -> bool {
        self.swarm_core_fraction > 0.8
    }

    /// The reference's offsets and those of the last listener, by index and by answer time.
    /// None without listeners.
    pub fn fan_out(&self) -> Option<FanOut> {
        let reference = self
            .listeners
            .iter()
            .find(|l| Some(l.index) == self.reference_index);
        let last = self.listeners.iter().max_by_key(|l| l.index)?;
        let last_answered = self.listeners.iter().max_by_key(|l| l.answered_at)?;
        Some(FanOut {
            reference: reference.and_then(|l| l.offset_vs_reference_ms),
            last_index: last.index,
            last: last.offset_vs_reference_ms,
            last_answered_index: last_answered.index,
            last_answered: last_answered.offset_vs_reference_ms,
        })
    }

    /// Checks delivery: every requested listener joined; each received packets under one SSRC,
    /// lost at most `max_lost`, had at least `min_samples` samples checked and every one of
    /// them decrypted to a payload the reference received. Without
    /// [`SwarmReport::verify_payloads`], samples must only decrypt (`min_samples` counts
    /// decrypted samples, matched or not). Errors list every listener that fails (the first
    /// 20).
    pub fn verify(&self, max_lost: u64, min_samples: u64) -> Result<()> {
        let mut problems = Vec::new();
        if self.listeners_joined != self.listeners_requested {
            problems.push(format!(
                "{} of {} listeners joined; failures: {:?}",
                self.listeners_joined,
                self.listeners_requested,
                self.join_failures.iter().take(5).collect::<Vec<_>>()
            ));
        }
        if self.reference.is_empty() {
            problems.push("the reference listener decrypted nothing".to_owned());
        }
        for l in &self.listeners {
            let mut wrong = Vec::new();
            if l.packets == 0 {
                wrong.push("received no RTP".to_owned());
            }
            if l.lost > max_lost {
                wrong.push(format!("lost {} of {}", l.lost, l.expected));
            }
            if l.foreign_ssrc_packets > 0 {
                wrong.push(format!(
                    "{} packets under another SSRC",
                    l.foreign_ssrc_packets
                ));
            }
            let checked = if self.verify_payloads {
                l.samples_ok
            } else {
                l.samples_ok + l.samples_mismatched
            };
            if checked < min_samples {
                wrong.push(format!(
                    "{checked} samples checked, want at least {min_samples}"
                ));
            }
            if l.samples_undecryptable > 0 || (self.verify_payloads && l.samples_mismatched > 0) {
                wrong.push(format!(
                    "{} samples not in the reference, {} undecryptable",
                    l.samples_mismatched, l.samples_undecryptable
                ));
            }
            if !wrong.is_empty() {
                problems.push(format!("listener {}: {}", l.index, wrong.join(", ")));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let shown = problems.len().min(20);
        bail!(
            "{} problems (first {shown}):\n{}",
            problems.len(),
            problems[..shown].join("\n")
        )
    }

    /// The reference listener's audio during the window, decoded with libopus (48 kHz mono),
    /// losses concealed (up to a second per gap).
    pub fn reference_pcm(&self) -> Result<Vec<i16>> {
        const SAMPLE_RATE: u32 = 48_000;
        const MAX_FRAME: usize = 5760; // 120 ms
        const CONCEAL_FRAMES: u64 = 50;
        let mut decoder = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)
            .map_err(|e| anyhow!("creating an Opus decoder: {e}"))?;
        let mut pcm = Vec::new();
        let mut frame = vec![0i16; MAX_FRAME];
        let mut previous: Option<(u64, usize)> = None;
        let mut ordered: Vec<&ReferencePacket> = self.reference.iter().collect();
        ordered.sort_by_key(|p| p.extended_seq);
        ordered.dedup_by_key(|p| p.extended_seq);
        for packet in ordered {
            if let Some((last_seq, last_len)) = previous {
                let gap = packet.extended_seq.saturating_sub(last_seq + 1);
                for _ in 0..gap.min(CONCEAL_FRAMES) {
                    let n = decoder
                        .decode(&[], &mut frame[..last_len.max(120)], false)
                        .map_err(|e| anyhow!("Opus concealment: {e}"))?;
                    pcm.extend_from_slice(&frame[..n]);
                }
            }
            let n = decoder
                .decode(&packet.payload, &mut frame, false)
                .map_err(|e| anyhow!("decoding packet {}: {e}", packet.extended_seq))?;
            pcm.extend_from_slice(&frame[..n]);
            previous = Some((packet.extended_seq, n));
        }
        Ok(pcm)
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        format!(
            "{}/{} listeners joined in {:.2?}; window {:.2?}: {} packets, {} lost, samples \
             {} ok / {} mismatched / {} undecryptable, kernel drops {} (host RcvbufErrors {}), \
             upstream {} sent ({} slots skipped), last listener offset p50 {}, \
             swarm CPU {:.2?} = {:.0} % of a core",
            self.listeners_joined,
            self.listeners_requested,
            self.join_duration,
            self.window,
            self.packets_received,
            self.packets_lost,
            self.samples_ok,
            self.samples_mismatched,
            self.samples_undecryptable,
            self.kernel_drops,
            self.udp_rcvbuf_errors,
            self.upstream_sent,
            self.upstream_slots_skipped,
            self.fan_out()
                .and_then(|f| f.last)
                .map_or("-".to_owned(), |o| format!("{:.3} ms", o.p50)),
            self.swarm_cpu,
            self.swarm_core_fraction * 100.0
        )
    }
}

/// A joined swarm; its media thread runs until [`Swarm::leave`] or drop.
pub struct Swarm {
    config: SwarmConfig,
    /// Taken by [`Swarm::leave`].
    context: Option<Arc<JoinContext>>,
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    members: Vec<Membership>,
    /// Every joined listener's sockets, in the order their joins finished.
    endpoints: Vec<ListenerEndpoints>,
    join_failures: Vec<(usize, String)>,
    join_duration: Duration,
}

/// Where one listener's media flows: its own socket and the server's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListenerEndpoints {
    /// The listener's number (0 = the reference).
    pub index: usize,
    /// The listener's socket.
    pub local: SocketAddr,
    /// The server's, as ICE chose it.
    pub remote: SocketAddr,
    answered_at: Instant,
}

impl ListenerEndpoints {
    fn of(joined: &handshake::Joined) -> Self {
        ListenerEndpoints {
            index: joined.index,
            local: joined.local,
            remote: joined.remote,
            answered_at: joined.answered_at,
        }
    }
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("config", &self.config)
            .field("joined", &self.members.len())
            .field("join_failures", &self.join_failures.len())
            .field("join_duration", &self.join_duration)
            .finish_non_exhaustive()
    }
}

impl Swarm {
    /// Joins `config.listeners` listeners: the reference first, alone, then the rest at most
    /// `join_concurrency` at a time. Fails if the reference cannot join; other failures are
    /// recorded in the report ([`SwarmReport::join_failures`]) so a benchmark can go on.
    pub async fn join(mut config: SwarmConfig) -> Result<Swarm> {
        if config.listeners == 0 {
            bail!("a swarm needs at least one listener");
        }
        if config.bind_ip.is_unspecified() {
            bail!("bind_ip must be a concrete address: it is the offer's host candidate");
        }
        if !(1..=10_000).contains(&config.sample_every) {
            bail!(
                "sample_every must be 1..=10000, not {}",
                config.sample_every
            );
        }
        if config.upstream == Upstream::Silence && config.direction != Direction::SendRecv {
            bail!("Upstream::Silence needs Direction::SendRecv: a recvonly listener sends no RTP");
        }
        let crypto = rtc::srtp::crypto::default_provider()
            .map_err(|e| anyhow!("no crypto provider: {e}"))?;
        let (certificate, fingerprint) = JoinContext::certificate(&crypto)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        let signaling = match &config.target {
            Target::Chorus => {
                let base = reqwest::Url::parse(&config.base_url)
                    .with_context(|| format!("`{}` is not a URL", config.base_url))?;
                let join_url = base
                    .join(&format!("/v1/rooms/{}/participants", config.room))
                    .context("building the join URL")?;
                Signaling::Chorus { client, join_url }
            }
            Target::Janus(target) => {
                let janus =
                    janus::JanusSignaling::connect(&config.base_url, target.clone()).await?;
                if config.bind_ip.is_loopback() {
                    config.bind_ip = janus.local_ip().context(
                        "Janus reported no non-loopback address of its own to bind listeners to",
                    )?;
                }
                Signaling::Janus(janus)
            }
        };
        let upstream = match config.upstream {
            Upstream::None => None,
            Upstream::Silence => Some(silence_frame()?),
        };
        let context = Arc::new(JoinContext {
            signaling,
            certificate,
            fingerprint,
            crypto: Arc::clone(&crypto),
            direction: config.direction,
            bind_ip: config.bind_ip,
            netns: config.netns.clone(),
            recv_buffer_bytes: config.recv_buffer_bytes,
            connect_timeout: config.connect_timeout,
        });

        let (commands, receiver) = mpsc::channel();
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .context("eventfd")?,
        );
        let thread = media::spawn(
            MediaSettings {
                sample_every: config.sample_every,
                consent_interval: config.consent_interval,
                rtcp_interval: config.rtcp_interval,
                poll_interval: config.poll_interval,
                crypto,
                upstream,
            },
            receiver,
            Arc::clone(&wake),
        )?;
        let mut swarm = Swarm {
            config,
            context: Some(Arc::clone(&context)),
            commands,
            wake,
            thread: Some(thread),
            members: Vec::new(),
            endpoints: Vec::new(),
            join_failures: Vec::new(),
            join_duration: Duration::ZERO,
        };

        let started = Instant::now();
        // The reference first and alone: it must be recording before anyone is sampled.
        let (reference, membership) = handshake::join_one(&context, 0, (swarm.config.token)(0))
            .await
            .context("the reference listener (0) could not join")?;
        swarm.members.push(membership);
        swarm.endpoints.push(ListenerEndpoints::of(&reference));
        swarm.send(Command::Register(Box::new(reference)))?;

        let semaphore = Arc::new(Semaphore::new(swarm.config.join_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for index in 1..swarm.config.listeners {
            let permit = Arc::clone(&semaphore)
                .acquire_owned()
                .await
                .context("join semaphore closed")?;
            let context = Arc::clone(&context);
            let token = (swarm.config.token)(index);
            let commands = swarm.commands.clone();
            let wake = Arc::clone(&swarm.wake);
            tasks.spawn(async move {
                let result = handshake::join_one(&context, index, token).await;
                drop(permit);
                // Registered at once, so nothing piles up in the socket while others join.
                result
                    .and_then(|(joined, membership)| {
                        let endpoints = ListenerEndpoints::of(&joined);
                        commands
                            .send(Command::Register(Box::new(joined)))
                            .map_err(|_| anyhow!("the media thread is gone"))?;
                        let _ = wake.write(1);
                        Ok((membership, endpoints))
                    })
                    .map_err(|e| (index, format!("{e:#}")))
            });
        }
        while let Some(outcome) = tasks.join_next().await {
            match outcome {
                Ok(Ok((membership, endpoints))) => {
                    swarm.members.push(membership);
                    swarm.endpoints.push(endpoints);
                }
                Ok(Err(failure)) => swarm.join_failures.push(failure),
                Err(panic) => swarm.join_failures.push((usize::MAX, panic.to_string())),
            }
        }
        swarm.join_failures.sort();
        swarm.join_duration = started.elapsed();
        Ok(swarm)
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| anyhow!("the swarm's media thread has stopped"))?;
        self.wake.write(1).context("waking the media thread")?;
        Ok(())
    }

    /// Listeners connected.
    pub fn joined(&self) -> usize {
        self.members.len()
    }

    /// The reference's endpoints and those of the listener whose answer came last (the
    /// server's last-admitted listener, as in [`FanOut::last_answered`]); `None` with fewer
    /// than two listeners.
    pub fn fan_out_ends(&self) -> Option<(ListenerEndpoints, ListenerEndpoints)> {
        let reference = self.endpoints.iter().find(|e| e.index == 0)?;
        let last = self
            .endpoints
            .iter()
            .filter(|e| e.index != 0)
            .max_by_key(|e| e.answered_at)?;
        Some((*reference, *last))
    }

    /// How long [`Swarm::join`] took.
    pub fn join_duration(&self) -> Duration {
        self.join_duration
    }

    /// Measures for `duration`: resets the window counters, waits, and reports. The report is
    /// taken a moment after the window closes, so samples taken at its very end can still be
    /// matched against the reference.
    pub async fn run_for(&mut self, duration: Duration) -> Result<SwarmReport> {
        const GRACE: Duration = Duration::from_millis(250);
        self.send(Command::StartWindow)?;
        tokio::time::sleep(duration).await;
        self.send(Command::EndWindow)?;
        tokio::time::sleep(GRACE).await;
        let (reply, snapshot) = tokio::sync::oneshot::channel();
        self.send(Command::Snapshot(reply))?;
        let snapshot = snapshot
            .await
            .context("the media thread stopped before reporting")?;
        let mut listeners = snapshot.listeners;
        listeners.sort_by_key(|l| l.index);
        if !self.config.verify_payloads {
            // Payloads are encoded per listener: the few that happen to equal one of the
            // reference's (a steady tone repeats) would give offsets of whole frames.
            for l in listeners.iter_mut().filter(|l| !l.is_reference) {
                l.offset_vs_reference_ms = None;
                l.read_offset_vs_reference_ms = None;
                l.seq_delta_vs_reference = None;
            }
        }
        let sum = |f: fn(&ListenerReport) -> u64| listeners.iter().map(f).sum::<u64>();
        let window = snapshot.window;
        Ok(SwarmReport {
            listeners_requested: self.config.listeners,
            listeners_joined: self.members.len(),
            join_failures: self.join_failures.clone(),
            join_duration: self.join_duration,
            window,
            packets_received: sum(|l| l.packets),
            packets_lost: sum(|l| l.lost),
            samples_ok: sum(|l| l.samples_ok),
            samples_mismatched: sum(|l| l.samples_mismatched),
            samples_undecryptable: sum(|l| l.samples_undecryptable),
            kernel_drops: sum(|l| u64::from(l.kernel_drops)),
            udp_rcvbuf_errors: snapshot.udp_rcvbuf_errors,
            udp_in_errors: snapshot.udp_in_errors,
            swarm_cpu: snapshot.thread_cpu,
            swarm_core_fraction: if window.is_zero() {
                0.0
            } else {
                snapshot.thread_cpu.as_secs_f64() / window.as_secs_f64()
            },
            process_cpu: snapshot.process_cpu,
            upstream_sent: sum(|l| l.upstream_sent),
            upstream_slots_skipped: snapshot.upstream_slots_skipped,
            verify_payloads: self.config.verify_payloads,
            reference: snapshot.reference,
            reference_index: snapshot.reference_index,
            listeners,
        })
    }

    /// Leaves: tells the server about every listener (at most `join_concurrency` at a time:
    /// Chorus `DELETE`s the participant, Janus `leave` and `detach`), stops the media thread,
    /// and closes a Janus API session. Returns how many leaves the server accepted; errors if
    /// any failed.
    pub async fn leave(mut self) -> Result<usize> {
        let semaphore = Arc::new(Semaphore::new(self.config.join_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let shared = self.context.take().context("the swarm has left already")?;
        for member in std::mem::take(&mut self.members) {
            let permit = Arc::clone(&semaphore)
                .acquire_owned()
                .await
                .context("leave semaphore closed")?;
            let context = Arc::clone(&shared);
            tasks.spawn(async move {
                let outcome = handshake::leave(&context, member).await;
                drop(permit);
                outcome.map_err(|e| format!("{e:#}"))
            });
        }
        let mut left = 0;
        let mut failures = Vec::new();
        while let Some(outcome) = tasks.join_next().await {
            match outcome {
                Ok(Ok(())) => left += 1,
                Ok(Err(failure)) => failures.push(failure),
                Err(panic) => failures.push(panic.to_string()),
            }
        }
        self.stop();
        // Every join and leave task is done: the swarm holds the context's last reference.
        if let Ok(context) = Arc::try_unwrap(shared)
            && let Signaling::Janus(janus) = context.signaling
            && let Err(err) = janus.destroy().await
        {
            failures.push(format!("{err:#}"));
        }
        if !failures.is_empty() {
            bail!(
                "{} leaves failed, e.g. {}",
                failures.len(),
                failures.first().map_or("", String::as_str)
            );
        }
        Ok(left)
    }

    fn stop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// libopus' encoding of 20 ms of digital silence (48 kHz mono, VoIP): what a browser's
/// encoder sends for a silent microphone with DTX off. Encoded once; every packet reuses it.
fn silence_frame() -> Result<Bytes> {
    const SAMPLE_RATE: u32 = 48_000;
    const FRAME: usize = 960; // 20 ms
    let mut encoder =
        opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)
            .map_err(|e| anyhow!("creating an Opus encoder: {e}"))?;
    let mut out = vec![0u8; 1500];
    let len = encoder
        .encode(&[0i16; FRAME], &mut out)
        .map_err(|e| anyhow!("encoding silence: {e}"))?;
    out.truncate(len);
    Ok(Bytes::from(out))
}
