//! [`MediaPort`]: one UDP socket, one task, every participant of the server.
//!
//! The task owns the socket and every `Session`. It waits for whichever comes first — a
//! datagram, a command (register, send audio, close), the earliest connection timer, or
//! shutdown — handles it, and sends what the affected connections produced. Datagrams are
//! routed (hand-written; see `demux.rs`) by, in order:
//! 1. a STUN binding request's local ufrag (first contact, and re-routing if an address is
//!    reused by another participant);
//! 2. the source address, learned from earlier binding requests.
//!
//! Anything else is dropped: a datagram whose headers are broken counts in
//! [`PortStats::dropped_malformed`], a well-formed one that names no participant in
//! [`PortStats::dropped_unroutable`].
//!
//! Invariants:
//! - Every datagram read counts in [`PortStats::datagrams_in`] and then either reaches exactly
//!   one session or counts under exactly one drop reason, so the drop reasons add up to what
//!   was dropped and a dashboard may sum them. What a session's connection discards after that
//!   (a forged binding request, undecryptable SRTP) is not a port drop: `rtc` does not report it.
//! - At most [`PortConfig::max_peers`] sessions; at most `MAX_ADDRS_PER_PEER` learned
//!   addresses per session, so a flood of forged binding requests cannot grow memory.
//! - A session that reaches `Failed`/`Closed`, or does not connect within
//!   [`PortConfig::connect_timeout`], is removed with its ufrag and addresses.
//! - Senders never wait: the command queue is bounded and a full queue drops the frame.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::demux::{Datagram, classify, is_binding_success};
use super::fan_out::FanOutWorkers;
use super::link_layer::LinkLayer;
use super::load::LoadMeter;
use super::packed::PackedDatagrams;
use super::session::{Session, SessionChannels};
use super::{AudioSink, EndpointError, InboundAudio, PeerState};

/// Addresses remembered per session (a participant has a few candidates at most).
pub(crate) const MAX_ADDRS_PER_PEER: usize = 8;
/// Largest datagram read; bigger ones are truncated by the OS and then fail their checks.
const RECEIVE_BUFFER: usize = 2048;
/// Datagrams read per wake-up before looking at commands and timers again.
const RECEIVE_BATCH: usize = 256;
/// Commands handled per wake-up before looking at the socket again.
const COMMAND_BATCH: usize = 256;
/// Time spent on commands per wake-up before looking at the socket again (one large room's
/// fan-out may take longer on its own; the next waits).
const COMMAND_BUDGET: Duration = Duration::from_millis(2);
/// The soonest a session's timer may fire after it is armed.
const MIN_TIMER_DELAY: Duration = Duration::from_millis(1);

/// Tunables of a [`MediaPort`]. `Default` suits production; tests shrink the timeouts.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// The address put in the host ICE candidate (the pod's or node's reachable IP).
    pub public_ip: IpAddr,
    /// The port put in the host ICE candidate; `None` = the socket's own port.
    pub public_port: Option<u16>,
    /// Most participants on this port; `accept` beyond it fails with `TooManyPeers`.
    pub max_peers: usize,
    /// A participant that is not connected this long after its answer is removed.
    pub connect_timeout: Duration,
    /// Frames buffered in the queue of a peer accepted with a queue of its own ([`MediaPort::accept`])
    /// before new ones are dropped; a peer accepted into a room's queue uses the room's bound.
    pub inbound_queue: usize,
    /// Commands (mostly outbound frames, all participants together) buffered for the task.
    pub command_queue: usize,
    /// Threads that seal and send a large room's listener fan-out, the port's own included:
    /// 1 keeps everything on the port's task. See `fan_out.rs`.
    pub fan_out_workers: usize,
    /// Fan-outs to at least this many participants are split across the workers; smaller ones
    /// are not worth waking a thread for.
    pub parallel_fan_out_min: usize,
    /// New participants are refused ([`EndpointError::Overloaded`]) while the port's task is
    /// busy more than this share of the time (`load.rs`); 1.0 or more never refuses.
    pub overload_busy: f64,
    /// The socket's receive buffer to ask for (`SO_RCVBUF`). Every participant's packets share
    /// this one socket, so a burst from many at once (each browser's 20 ms frame, in step after
    /// a network stall) must fit while the task is busy sending a fan-out: the kernel's default
    /// (about 208 KiB, some 300 datagrams) is not enough for hundreds of microphones. The
    /// kernel caps the request at `net.core.rmem_max`; the port logs what it got.
    ///
    /// The send buffer stays the kernel's default: it paces a large fan-out to the device's
    /// drain, and a 4 MiB one (tried in the capacity bench) kept thousands of datagrams alive
    /// at once and cost the server 15–20 % more CPU per listener in an A/B run.
    pub receive_buffer_bytes: usize,
    /// Send listeners' media as whole Ethernet frames through packet sockets
    /// (`link_layer.rs`), skipping the kernel's UDP and IP send path, where the process may
    /// (`CAP_NET_RAW`) and the destination's next hop is known; everything else keeps the UDP
    /// socket. Off by default: the frames skip the pod's own netfilter rules.
    pub link_layer_fan_out: bool,
}

/// [`PortConfig::receive_buffer_bytes`] by default: 4 MiB, some 4,000 audio datagrams in the
/// kernel's accounting.
pub const DEFAULT_RECEIVE_BUFFER_BYTES: usize = 4 << 20;

impl PortConfig {
    /// Defaults, advertising `public_ip`.
    pub fn new(public_ip: IpAddr) -> Self {
        PortConfig {
            public_ip,
            public_port: None,
            max_peers: 4096,
            connect_timeout: Duration::from_secs(30),
            inbound_queue: 256,
            command_queue: 16 * 1024,
            fan_out_workers: 1,
            parallel_fan_out_min: 256,
            overload_busy: 0.9,
            receive_buffer_bytes: DEFAULT_RECEIVE_BUFFER_BYTES,
            link_layer_fan_out: false,
        }
    }
}

/// Asks for a receive buffer of `bytes` on `socket`, logging what the kernel granted (it caps
/// the request at `net.core.rmem_max`) and warning when that is less than asked.
fn size_receive_buffer(socket: &UdpSocket, bytes: usize) -> Result<(), EndpointError> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let failed = |e: nix::Error| EndpointError::Socket(std::io::Error::from(e));
    setsockopt(socket, sockopt::RcvBuf, &bytes).map_err(failed)?;
    let granted = getsockopt(socket, sockopt::RcvBuf).map_err(failed)?;
    // Linux stores (and reports) twice the size set, the other half for its bookkeeping, so a
    // request it granted in full reads back as at least `bytes`.
    if granted < bytes {
        warn!(
            asked = bytes,
            granted,
            "the media socket's receive buffer is smaller than asked (capped by \
             net.core.rmem_max): bursts from many participants at once may be dropped; raise \
             net.core.rmem_max on the node to at least the size asked"
        );
    } else {
        info!(granted, "media socket receive buffer");
    }
    Ok(())
}

/// Counters of a port, read with [`MediaPort::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Datagrams read from the socket.
    pub datagrams_in: u64,
    /// Datagrams written to the socket.
    pub datagrams_out: u64,
    /// Datagrams dropped as malformed: not STUN/DTLS/RTP/RTCP by their first byte, or a broken
    /// STUN/DTLS/RTP/RTCP header. Disjoint from `dropped_unroutable`.
    pub dropped_malformed: u64,
    /// Well-formed datagrams dropped because they belong to no participant: from an unknown
    /// address, and no known ufrag. Disjoint from `dropped_malformed`.
    pub dropped_unroutable: u64,
    /// Audio frames delivered to inbound queues (a peer's own, or its room's).
    pub inbound_frames: u64,
    /// Received audio frames dropped (inbound queue full or closed, or wrong payload type): a
    /// room that falls behind loses packets here rather than blocking the socket.
    pub inbound_dropped: u64,
    /// Audio frames sent.
    pub outbound_frames: u64,
    /// Audio frames not sent (command queue full, participant not connected or gone).
    pub outbound_dropped: u64,
    /// Socket send errors.
    pub send_errors: u64,
    /// Participants currently on the port.
    pub peers: u64,
    /// Of those, receive-only participants on Chorus's own listener transport.
    pub listeners: u64,
    /// Of `outbound_frames`, those sealed and sent by the fan-out workers' lanes.
    pub lane_frames: u64,
    /// Of `datagrams_out`, those sent as whole frames through a packet socket
    /// ([`PortConfig::link_layer_fan_out`]).
    pub link_layer_datagrams: u64,
    /// How busy the port's task is, in thousandths of the time (`load.rs`).
    pub busy_permille: u64,
}

/// Shared counters, written by the task and read by [`MediaPort::stats`].
#[derive(Debug, Default)]
struct Counters {
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_unroutable: AtomicU64,
    inbound_frames: AtomicU64,
    inbound_dropped: AtomicU64,
    outbound_frames: AtomicU64,
    outbound_dropped: AtomicU64,
    send_errors: AtomicU64,
    peers: AtomicU64,
    listeners: AtomicU64,
    lane_frames: AtomicU64,
    link_layer_datagrams: AtomicU64,
    /// The task's last published busy share (an `f64`'s bits), and when (ms after `epoch`).
    busy_share: AtomicU64,
    busy_published_ms: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    if by > 0 {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// What the rest of the server asks of the port's task.
enum Command {
    Register {
        session: Box<Session>,
        reply: oneshot::Sender<Result<(), EndpointError>>,
    },
    SendOpus {
        peer: u64,
        payload: Bytes,
        samples: u32,
    },
    FanOut {
        peers: Arc<[u64]>,
        payload: Bytes,
        samples: u32,
    },
    Close {
        peer: u64,
    },
    /// Route RTP and RTCP from `remote` (a phone leg's answered address) to `inbox`.
    RoutePlain {
        remote: SocketAddr,
        inbox: mpsc::Sender<(Bytes, Instant)>,
    },
    /// Stop routing `remote`.
    UnroutePlain {
        remote: SocketAddr,
    },
    /// Send one datagram as it is (a phone leg's RTP or SRTP).
    SendPlain {
        to: SocketAddr,
        datagram: Bytes,
    },
}

/// The shared UDP media port. Cheap to share behind an `Arc`; dropping it does not stop the
/// task — cancel the token given to [`MediaPort::start`].
#[derive(Debug)]
pub struct MediaPort {
    local_addr: SocketAddr,
    candidate_addr: SocketAddr,
    config: PortConfig,
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    next_peer_id: AtomicU64,
    /// When the task started: the origin of `Counters::busy_published_ms`.
    epoch: Instant,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Register { session, .. } => write!(f, "Register({})", session.id),
            Command::SendOpus { peer, samples, .. } => write!(f, "SendOpus({peer}, {samples})"),
            Command::FanOut { peers, samples, .. } => {
                write!(f, "FanOut({} peers, {samples})", peers.len())
            }
            Command::Close { peer } => write!(f, "Close({peer})"),
            Command::RoutePlain { remote, .. } => write!(f, "RoutePlain({remote})"),
            Command::UnroutePlain { remote } => write!(f, "UnroutePlain({remote})"),
            Command::SendPlain { to, datagram } => {
                write!(f, "SendPlain({to}, {} bytes)", datagram.len())
            }
        }
    }
}

/// Sends Opus frames to one participant. Cheap to clone; never waits.
#[derive(Debug, Clone)]
pub struct PeerSender {
    peer: u64,
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl PeerSender {
    /// The participant this sender writes to.
    pub fn peer_id(&self) -> u64 {
        self.peer
    }

    /// Queues one Opus frame lasting `samples` samples at 48 kHz (960 for 20 ms). The port
    /// stamps the participant's SSRC, sequence number, timestamp and payload type. `payload`
    /// is shared, not copied: give every listener a clone of the same `Bytes`.
    ///
    /// Fails at once, dropping the frame, if the port's queue is full or the port is gone.
    /// Frames for a participant that is not connected (yet, or any more) are dropped by the
    /// port and counted in [`PortStats::outbound_dropped`].
    pub fn send_opus(&self, payload: Bytes, samples: u32) -> Result<(), EndpointError> {
        let command = Command::SendOpus {
            peer: self.peer,
            payload,
            samples,
        };
        self.commands.try_send(command).map_err(|err| {
            bump(&self.counters.outbound_dropped, 1);
            match err {
                mpsc::error::TrySendError::Full(_) => EndpointError::SendQueueFull,
                mpsc::error::TrySendError::Closed(_) => EndpointError::PortClosed,
            }
        })
    }
}

/// One participant on the port, as returned by [`MediaPort::accept`].
///
/// Dropping the handle does not end the session (the fields may live in different places);
/// call [`PeerHandle::close`]. Sessions that fail or never connect are removed by the port.
#[derive(Debug)]
pub struct PeerHandle {
    /// Unique on this port.
    pub id: u64,
    /// Audio received from the participant, in arrival order.
    pub inbound: mpsc::Receiver<InboundAudio>,
    /// Sends audio to the participant.
    pub outbound: PeerSender,
    /// The connection's state; ends at `Failed` or `Closed`.
    pub state: watch::Receiver<PeerState>,
}

/// One peer on the port whose audio goes to a shared [`AudioSink`], as returned by
/// [`MediaPort::accept_into`]: everything a [`PeerHandle`] has but the inbound queue.
#[derive(Debug)]
pub struct PeerLink {
    /// Unique on this port.
    pub id: u64,
    /// Sends audio to the peer.
    pub outbound: PeerSender,
    /// The connection's state; ends at `Failed` or `Closed`.
    pub state: watch::Receiver<PeerState>,
    /// The peer offered to receive only: it sends no audio, and Chorus's own listener
    /// transport carries it.
    pub listen_only: bool,
}

impl PeerHandle {
    /// Tears the session down (DTLS close_notify, then removal). Idempotent; never waits.
    pub fn close(&self) {
        close_peer(&self.outbound.commands, self.id);
    }

    /// A clone of the outbound sender, for a mixer that keeps its own list.
    pub fn sender(&self) -> PeerSender {
        self.outbound.clone()
    }

    /// Waits until the state is `Connected` (true) or terminal (false).
    pub async fn wait_connected(&mut self) -> bool {
        match self
            .state
            .wait_for(|state| *state == PeerState::Connected || state.is_terminal())
            .await
        {
            Ok(state) => *state == PeerState::Connected,
            Err(_) => false,
        }
    }
}

fn close_peer(commands: &mpsc::Sender<Command>, peer: u64) {
    // A close must not be lost to a full queue of audio frames; it may wait for room, but the
    // caller does not: a detached task does the waiting.
    match commands.try_send(Command::Close { peer }) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(command)) => {
            let commands = commands.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = commands.send(command).await;
                });
            }
        }
    }
}

impl MediaPort {
    /// Starts the port's task on `socket`, advertising `public_ip` and the socket's port in
    /// every answer's host candidate. Must be called inside a Tokio runtime.
    pub fn start(
        socket: UdpSocket,
        public_ip: IpAddr,
        shutdown: CancellationToken,
    ) -> Result<Self, EndpointError> {
        Self::start_with(socket, PortConfig::new(public_ip), shutdown)
    }

    /// [`MediaPort::start`] with explicit tunables.
    pub fn start_with(
        socket: UdpSocket,
        config: PortConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, EndpointError> {
        let local_addr = socket.local_addr().map_err(EndpointError::Socket)?;
        size_receive_buffer(&socket, config.receive_buffer_bytes)?;
        let candidate_addr = SocketAddr::new(
            config.public_ip,
            config.public_port.unwrap_or(local_addr.port()),
        );
        let (commands, command_rx) = mpsc::channel(config.command_queue.max(1));
        let counters = Arc::new(Counters::default());
        let epoch = Instant::now();
        let workers = match config.fan_out_workers {
            0 | 1 => None,
            n => Some(FanOutWorkers::new(n).map_err(EndpointError::Workers)?),
        };
        let link = if config.link_layer_fan_out {
            match LinkLayer::open(local_addr) {
                Ok(link) => {
                    info!(
                        "listener media goes to the network device where its next hop is known (link-layer fan-out)"
                    );
                    Some(link)
                }
                Err(why) => {
                    warn!(%why, "link-layer fan-out asked for but unavailable; listener media goes through the UDP socket");
                    None
                }
            }
        } else {
            None
        };
        let driver = Driver {
            socket,
            candidate_addr,
            config: config.clone(),
            sessions: FxHashMap::default(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            plain: HashMap::new(),
            timers: BTreeSet::new(),
            commands: command_rx,
            counters: Arc::clone(&counters),
            outgoing: Vec::new(),
            packed: PackedDatagrams::default(),
            workers,
            link,
            fan_out_positions: None,
            load: LoadMeter::new(epoch),
            epoch,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|err| {
            EndpointError::Socket(std::io::Error::other(format!(
                "MediaPort::start needs a Tokio runtime: {err}"
            )))
        })?;
        runtime.spawn(driver.run(shutdown));
        info!(%local_addr, %candidate_addr, fan_out_workers = config.fan_out_workers.max(1), "media port started");
        Ok(MediaPort {
            local_addr,
            candidate_addr,
            config,
            commands,
            counters,
            next_peer_id: AtomicU64::new(1),
            epoch,
        })
    }

    /// The socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address advertised in host candidates.
    pub fn candidate_addr(&self) -> SocketAddr {
        self.candidate_addr
    }

    /// Accepts a participant's SDP offer. The offer must have one audio section offering
    /// Opus/48000/2, sendrecv (or recvonly: a listener, carried by Chorus's own listener
    /// transport); the RFC 6464 audio-level extension is negotiated when offered.
    /// Returns the SDP answer (ICE-lite, one host candidate, no trickle) and the handle, whose
    /// `inbound` queue receives the peer's audio (tagged with the peer id).
    pub async fn accept(&self, offer_sdp: &str) -> Result<(String, PeerHandle), EndpointError> {
        let (answer, link, inbound) = self.accept_with(offer_sdp, None).await?;
        let inbound = inbound.expect("a session given no sink makes its own inbound queue");
        let PeerLink {
            id,
            outbound,
            state,
            ..
        } = link;
        Ok((
            answer,
            PeerHandle {
                id,
                inbound,
                outbound,
                state,
            },
        ))
    }

    /// [`MediaPort::accept`], delivering the peer's audio into `sink` (a room's shared queue)
    /// instead of a queue of its own.
    pub async fn accept_into(
        &self,
        offer_sdp: &str,
        sink: AudioSink,
    ) -> Result<(String, PeerLink), EndpointError> {
        let (answer, link, _) = self.accept_with(offer_sdp, Some(sink)).await?;
        Ok((answer, link))
    }

    async fn accept_with(
        &self,
        offer_sdp: &str,
        sink: Option<AudioSink>,
    ) -> Result<(String, PeerLink, Option<mpsc::Receiver<InboundAudio>>), EndpointError> {
        if self.commands.is_closed() {
            return Err(EndpointError::PortClosed);
        }
        let busy = self.busy();
        if busy > self.config.overload_busy {
            return Err(EndpointError::Overloaded {
                busy_percent: (busy * 100.0).round() as u32,
                limit_percent: (self.config.overload_busy * 100.0).round() as u32,
            });
        }
        let id = self.next_peer_id.fetch_add(1, Ordering::Relaxed);
        let (session, answer, channels) = Session::answer(
            id,
            offer_sdp,
            self.candidate_addr,
            self.config.inbound_queue,
            sink,
            Instant::now(),
        )?;
        let SessionChannels {
            state_rx,
            inbound_rx,
        } = channels;
        let listen_only = session.is_listener();
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Register {
                session: Box::new(session),
                reply,
            })
            .await
            .map_err(|_| EndpointError::PortClosed)?;
        reply_rx.await.map_err(|_| EndpointError::PortClosed)??;
        let link = PeerLink {
            id,
            outbound: PeerSender {
                peer: id,
                commands: self.commands.clone(),
                counters: Arc::clone(&self.counters),
            },
            state: state_rx,
            listen_only,
        };
        Ok((answer, link, inbound_rx))
    }

    /// Sends one Opus frame to each of `peers`, as [`PeerSender::send_opus`] does for one, in a
    /// single queue entry: the mixer's shared mix goes to every listener for one channel send
    /// and one reference count per listener. Fails at once (dropping the frame for all) if the
    /// queue is full or the port is gone.
    pub fn send_opus_to_all(
        &self,
        peers: Arc<[u64]>,
        payload: Bytes,
        samples: u32,
    ) -> Result<(), EndpointError> {
        let count = peers.len() as u64;
        let command = Command::FanOut {
            peers,
            payload,
            samples,
        };
        self.commands.try_send(command).map_err(|err| {
            bump(&self.counters.outbound_dropped, count);
            match err {
                mpsc::error::TrySendError::Full(_) => EndpointError::SendQueueFull,
                mpsc::error::TrySendError::Closed(_) => EndpointError::PortClosed,
            }
        })
    }

    /// Route RTP and RTCP arriving from `remote` to the returned queue, until the returned
    /// route is dropped: a phone leg's media shares the server's one UDP port (one port per pod
    /// is all Kubernetes exposes). Only that exact address is routed, and only once WebRTC
    /// sessions have not claimed it; anything else from elsewhere stays unroutable and counted.
    pub async fn route_plain(&self, remote: SocketAddr) -> Result<PlainRoute, EndpointError> {
        let (inbox, inbound) = mpsc::channel(PLAIN_QUEUE);
        self.commands
            .send(Command::RoutePlain { remote, inbox })
            .await
            .map_err(|_| EndpointError::PortClosed)?;
        Ok(PlainRoute {
            remote,
            inbound,
            commands: self.commands.clone(),
            counters: Arc::clone(&self.counters),
        })
    }

    /// Closes participant `peer`, as [`PeerHandle::close`] does.
    pub fn close_peer(&self, peer: u64) {
        close_peer(&self.commands, peer);
    }

    /// How busy the port's task is: the share of the last fraction of a second it spent
    /// working, 0..=1 (`load.rs`). A task that published nothing for a while counts as idle.
    pub fn busy(&self) -> f64 {
        let published = self.counters.busy_published_ms.load(Ordering::Relaxed);
        let estimate = f64::from_bits(self.counters.busy_share.load(Ordering::Relaxed));
        let since = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(published));
        super::load::decay(estimate, since)
    }

    /// A snapshot of the port's counters.
    pub fn stats(&self) -> PortStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PortStats {
            datagrams_in: load(&c.datagrams_in),
            datagrams_out: load(&c.datagrams_out),
            dropped_malformed: load(&c.dropped_malformed),
            dropped_unroutable: load(&c.dropped_unroutable),
            inbound_frames: load(&c.inbound_frames),
            inbound_dropped: load(&c.inbound_dropped),
            outbound_frames: load(&c.outbound_frames),
            outbound_dropped: load(&c.outbound_dropped),
            send_errors: load(&c.send_errors),
            peers: load(&c.peers),
            listeners: load(&c.listeners),
            lane_frames: load(&c.lane_frames),
            link_layer_datagrams: load(&c.link_layer_datagrams),
            busy_permille: (self.busy() * 1000.0).round() as u64,
        }
    }
}

/// Datagrams waiting for a phone leg before new ones are dropped (about a second of G.711).
const PLAIN_QUEUE: usize = 64;

/// Plain RTP to and from one remote address through the port ([`MediaPort::route_plain`]).
/// Dropping it stops the routing.
#[derive(Debug)]
pub struct PlainRoute {
    remote: SocketAddr,
    /// Datagrams from the remote, with their arrival.
    pub inbound: mpsc::Receiver<(Bytes, Instant)>,
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl PlainRoute {
    /// A sender of datagrams to the remote, from the port's address.
    pub fn sender(&self) -> PlainSender {
        PlainSender {
            to: self.remote,
            commands: self.commands.clone(),
            counters: Arc::clone(&self.counters),
        }
    }
}

impl Drop for PlainRoute {
    fn drop(&mut self) {
        let _ = self.commands.try_send(Command::UnroutePlain {
            remote: self.remote,
        });
    }
}

/// Sends datagrams to a routed remote. Never waits.
#[derive(Debug, Clone)]
pub struct PlainSender {
    to: SocketAddr,
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl PlainSender {
    /// Queue one datagram; fails at once (dropping it) when the port's queue is full.
    pub fn send(&self, datagram: Bytes) -> Result<(), EndpointError> {
        self.commands
            .try_send(Command::SendPlain {
                to: self.to,
                datagram,
            })
            .map_err(|err| {
                bump(&self.counters.outbound_dropped, 1);
                match err {
                    mpsc::error::TrySendError::Full(_) => EndpointError::SendQueueFull,
                    mpsc::error::TrySendError::Closed(_) => EndpointError::PortClosed,
                }
            })
    }
}

/// Datagrams per `sendmmsg` call.
const SEND_BATCH: usize = 256;

/// Every datagram of one flush, listeners' media first. Never inlined, like [`send_batch`]:
/// the bench counts both by name (callgrind's `--toggle-collect`).
#[inline(never)]
fn pending_datagrams<'a>(
    workers: Option<&'a FanOutWorkers>,
    packed: &'a PackedDatagrams,
    outgoing: &'a [(SocketAddr, BytesMut)],
) -> Vec<(SocketAddr, &'a [u8])> {
    let mut pending = Vec::with_capacity(packed.len() + outgoing.len());
    if let Some(workers) = workers {
        pending.extend(workers.pending());
    }
    pending.extend(packed.iter());
    pending.extend(outgoing.iter().map(|(to, d)| (*to, &d[..])));
    pending
}

/// Sends `batch` with one `sendmmsg` call; returns how many the kernel took.
#[inline(never)]
pub(super) fn send_batch(
    socket: &UdpSocket,
    batch: &[(SocketAddr, &[u8])],
) -> std::io::Result<usize> {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    let slices: Vec<[IoSlice<'_>; 1]> = batch
        .iter()
        .map(|(_, datagram)| [IoSlice::new(datagram)])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = batch
        .iter()
        .map(|(to, _)| Some(SockaddrStorage::from(*to)))
        .collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), None);
    let results = sendmmsg(
        socket.as_raw_fd(),
        &mut headers,
        &slices,
        &addrs,
        [],
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    Ok(results.count())
}

/// The port's task: owns the socket and every session.
struct Driver {
    socket: UdpSocket,
    candidate_addr: SocketAddr,
    config: PortConfig,
    /// By peer id. Fx hashing: ids are the port's own counter, never chosen by a remote, and
    /// the fan-out looks one up per listener per frame.
    sessions: FxHashMap<u64, Session>,
    by_ufrag: HashMap<String, u64>,
    by_addr: HashMap<SocketAddr, u64>,
    /// Phone legs' answered addresses and where their datagrams go.
    plain: HashMap<SocketAddr, mpsc::Sender<(Bytes, Instant)>>,
    /// (deadline, peer) for every session's next timer.
    timers: BTreeSet<(Instant, u64)>,
    commands: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
    /// Datagrams produced since the last flush.
    outgoing: Vec<(SocketAddr, BytesMut)>,
    /// Listeners' media produced since the last flush, packed in one buffer.
    packed: PackedDatagrams,
    /// Threads that share a large fan-out (`None`: one worker, this task).
    workers: Option<FanOutWorkers>,
    /// Packet sockets for listeners' media (`None`: the UDP socket carries everything).
    link: Option<LinkLayer>,
    /// The last large fan-out's list and each peer's place in it: a room sends the same list
    /// (the same `Arc`) tick after tick until its membership changes.
    fan_out_positions: Option<(Arc<[u64]>, PeerPositions)>,
    /// How busy this task is, published to `counters` at the end of each window.
    load: LoadMeter,
    /// The origin of `Counters::busy_published_ms`.
    epoch: Instant,
}

/// Each peer's place in one fan-out list.
type PeerPositions = FxHashMap<u64, usize>;

impl Driver {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        loop {
            let next_timer = self.timers.first().map(|(deadline, _)| *deadline);
            let sleep = async {
                match next_timer {
                    Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                    None => std::future::pending().await,
                }
            };
            // When the work of this turn began (the wait before it is idle time).
            let woke;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                readable = self.socket.readable() => {
                    woke = Instant::now();
                    if let Err(err) = readable {
                        warn!(%err, "media socket failed; stopping the port");
                        break;
                    }
                    self.receive_batch(&mut buffer);
                }
                command = self.commands.recv() => {
                    woke = Instant::now();
                    let Some(command) = command else { break };
                    let started = woke;
                    self.handle_command(command);
                    for _ in 1..COMMAND_BATCH {
                        // A backlog of large fan-outs must not starve the socket: consent checks
                        // wait in its buffer, and a listener whose checks go unanswered for 30 s
                        // is let go. Past the budget the socket gets its turn; frames wait in
                        // the queue, and a full queue drops new frames, never a participant.
                        if started.elapsed() >= COMMAND_BUDGET {
                            break;
                        }
                        match self.commands.try_recv() {
                            Ok(command) => self.handle_command(command),
                            Err(_) => break,
                        }
                    }
                }
                () = sleep => {
                    woke = Instant::now();
                    self.handle_timers();
                }
            }
            self.flush().await;
            let now = Instant::now();
            if let Some(busy) = self.load.record(now - woke, now) {
                let at = now.saturating_duration_since(self.epoch).as_millis() as u64;
                self.counters
                    .busy_share
                    .store(busy.to_bits(), Ordering::Relaxed);
                self.counters.busy_published_ms.store(at, Ordering::Relaxed);
            }
        }
        self.shutdown().await;
    }

    fn receive_batch(&mut self, buffer: &mut [u8]) {
        for _ in 0..RECEIVE_BATCH {
            match self.socket.try_recv_from(buffer) {
                Ok((len, from)) => {
                    let datagram = buffer.get(..len).unwrap_or_default();
                    self.handle_datagram(Instant::now(), from, datagram);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    // ICMP errors (port unreachable of a departed peer) surface here on some
                    // systems; they concern one remote, not the port.
                    debug!(%err, "media socket receive error");
                    break;
                }
            }
        }
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        bump(&self.counters.datagrams_in, 1);
        let target = match classify(datagram) {
            Err(malformed) => {
                debug!(%from, reason = malformed.0, "dropping malformed datagram");
                bump(&self.counters.dropped_malformed, 1);
                return;
            }
            Ok(Datagram::StunBindingRequest { local_ufrag }) => {
                let by_ufrag = local_ufrag.and_then(|ufrag| self.by_ufrag.get(ufrag).copied());
                if let Some(peer) = by_ufrag
                    && self.by_addr.get(&from) != Some(&peer)
                {
                    self.first_contact(peer, now, from, datagram);
                    return;
                }
                by_ufrag.or_else(|| self.by_addr.get(&from).copied())
            }
            Ok(Datagram::Rtp | Datagram::Rtcp) if !self.by_addr.contains_key(&from) => {
                if let Some(inbox) = self.plain.get(&from) {
                    if inbox
                        .try_send((Bytes::copy_from_slice(datagram), now))
                        .is_err()
                    {
                        bump(&self.counters.inbound_dropped, 1);
                    }
                    return;
                }
                None
            }
            Ok(Datagram::Stun | Datagram::Dtls | Datagram::Rtp | Datagram::Rtcp) => {
                self.by_addr.get(&from).copied()
            }
        };
        let Some(session) = target.and_then(|peer| self.sessions.get_mut(&peer)) else {
            debug!(%from, "dropping datagram from an unknown address");
            bump(&self.counters.dropped_unroutable, 1);
            return;
        };
        session.handle_datagram(now, self.candidate_addr, from, BytesMut::from(datagram));
        let peer = session.id;
        self.service(peer, now);
    }

    /// A binding request naming `peer`'s ufrag from an address not yet routed to it. The
    /// address is learned only if the session answers with a binding success, i.e. the
    /// request passed its MESSAGE-INTEGRITY check: a forged request cannot steer routing.
    fn first_contact(&mut self, peer: u64, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            // `by_ufrag` and `sessions` change together, so this is not expected; if it happens
            // the datagram is still dropped, and every drop is counted.
            bump(&self.counters.dropped_unroutable, 1);
            return;
        };
        session.handle_datagram(now, self.candidate_addr, from, BytesMut::from(datagram));
        let produced_from = self.outgoing.len();
        self.service(peer, now);
        let accepted = self.outgoing[produced_from..]
            .iter()
            .any(|(to, reply)| *to == from && is_binding_success(reply));
        if accepted {
            debug!(peer, %from, "learned a participant's address");
            self.learn_address(peer, from);
        }
    }

    /// Routes `from` to `peer` from now on (moving it if another session had it).
    fn learn_address(&mut self, peer: u64, from: SocketAddr) {
        match self.by_addr.get(&from) {
            Some(&known) if known == peer => return,
            Some(&other) => {
                if let Some(session) = self.sessions.get_mut(&other) {
                    session.remote_addrs.retain(|addr| *addr != from);
                }
            }
            None => {}
        }
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.remote_addrs.len() >= MAX_ADDRS_PER_PEER {
            let oldest = session.remote_addrs.remove(0);
            self.by_addr.remove(&oldest);
        }
        session.remote_addrs.push(from);
        self.by_addr.insert(from, peer);
    }

    fn handle_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Register { session, reply } => {
                let peer = session.id;
                let result = self.register(*session, now);
                let registered = result.is_ok();
                if reply.send(result).is_err() && registered {
                    // The caller of `accept` gave up; nobody holds the handle.
                    debug!(peer, "registration abandoned by its caller");
                    self.remove(peer, PeerState::Closed);
                }
            }
            Command::SendOpus {
                peer,
                payload,
                samples,
            } => self.send_opus(peer, &payload, samples, now),
            Command::FanOut {
                peers,
                payload,
                samples,
            } => self.fan_out(&peers, &payload, samples, now),
            Command::Close { peer } => self.remove(peer, PeerState::Closed),
            Command::RoutePlain { remote, inbox } => {
                self.plain.insert(remote, inbox);
            }
            Command::UnroutePlain { remote } => {
                self.plain.remove(&remote);
            }
            Command::SendPlain { to, datagram } => {
                self.outgoing.push((to, BytesMut::from(&datagram[..])));
            }
        }
    }

    /// The room's shared frame to each of `peers`. Never inlined: the bench counts this
    /// function's instructions by name (callgrind's `--toggle-collect`).
    #[inline(never)]
    fn fan_out(&mut self, peers: &Arc<[u64]>, payload: &Bytes, samples: u32, now: Instant) {
        if self.workers.is_some() && peers.len() >= self.config.parallel_fan_out_min.max(2) {
            self.fan_out_in_lanes(peers, payload, samples, now);
            return;
        }
        for &peer in peers.iter() {
            self.send_opus(peer, payload, samples, now);
        }
    }

    /// [`Driver::fan_out`] across the workers: the listeners among `peers`, in their order, are
    /// cut into lanes (`fan_out.rs`); peers carried by `rtc` follow here, one by one.
    fn fan_out_in_lanes(
        &mut self,
        peers: &Arc<[u64]>,
        payload: &Bytes,
        samples: u32,
        now: Instant,
    ) {
        let Driver {
            sessions,
            workers,
            link,
            fan_out_positions,
            socket,
            counters,
            ..
        } = self;
        let Some(workers) = workers.as_mut() else {
            return;
        };
        let positions = match fan_out_positions {
            Some((list, positions)) if Arc::ptr_eq(list, peers) => positions,
            _ => {
                let positions = peers.iter().enumerate().map(|(i, &p)| (p, i)).collect();
                &mut fan_out_positions.insert((Arc::clone(peers), positions)).1
            }
        };
        let mut listeners: Vec<Option<&mut Session>> = Vec::with_capacity(peers.len());
        listeners.resize_with(peers.len(), || None);
        let mut others = Vec::new();
        for session in sessions.values_mut() {
            let Some(&at) = positions.get(&session.id) else {
                continue;
            };
            if session.is_listener() {
                listeners[at] = Some(session);
            } else {
                others.push(session.id);
            }
        }
        // Peers that are not on the port count as dropped in the lanes (their slot is `None`),
        // as in `send_opus`; so do `rtc` peers' slots, which are sent below instead.
        let counts = workers.fan_out(&mut listeners, socket, link.as_ref(), payload, samples, now);
        drop(listeners);
        bump(&counters.outbound_frames, counts.sealed);
        bump(&counters.lane_frames, counts.sealed);
        bump(
            &counters.outbound_dropped,
            counts.dropped.saturating_sub(others.len() as u64),
        );
        bump(&counters.datagrams_out, counts.sent);
        bump(&counters.send_errors, counts.send_errors);
        for peer in others {
            self.send_opus(peer, payload, samples, now);
        }
    }

    fn send_opus(&mut self, peer: u64, payload: &Bytes, samples: u32, now: Instant) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            bump(&self.counters.outbound_dropped, 1);
            return;
        };
        if session.send_opus(now, payload, samples, &mut self.packed) {
            bump(&self.counters.outbound_frames, 1);
            // A listener's packet is already in `outgoing`; `rtc`'s peer must be drained.
            if !session.is_listener() {
                self.service(peer, now);
            }
        } else {
            bump(&self.counters.outbound_dropped, 1);
        }
    }

    fn register(&mut self, session: Session, now: Instant) -> Result<(), EndpointError> {
        if self.sessions.len() >= self.config.max_peers {
            return Err(EndpointError::TooManyPeers(self.sessions.len()));
        }
        if self.by_ufrag.contains_key(&session.local_ufrag) {
            // 16 random alphanumerics: a collision means something is badly wrong with rand.
            return Err(EndpointError::Negotiation(
                "ICE ufrag collision on this port; retry".into(),
            ));
        }
        let peer = session.id;
        if session.is_listener() {
            bump(&self.counters.listeners, 1);
        }
        self.by_ufrag.insert(session.local_ufrag.clone(), peer);
        self.sessions.insert(peer, session);
        self.counters
            .peers
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        debug!(peer, "participant registered on the media port");
        self.service(peer, now);
        Ok(())
    }

    fn handle_timers(&mut self) {
        let now = Instant::now();
        // Take the expired timers first: servicing a session re-arms its timer, and a timer
        // that comes back already expired must wait for the next turn, not spin here.
        let mut expired = Vec::new();
        while let Some(&(deadline, peer)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.remove(&(deadline, peer));
            expired.push(peer);
        }
        for peer in expired {
            if let Some(session) = self.sessions.get_mut(&peer) {
                session.registered_deadline = None;
                session.handle_timeout(now);
                self.service(peer, now);
            }
        }
    }

    /// Drains session `peer` after anything happened to it: queues its datagrams, delivers
    /// its audio, reaps it if it ended, and re-arms its timer.
    fn service(&mut self, peer: u64, now: Instant) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let counts = session.drain(&mut self.outgoing);
        bump(&self.counters.inbound_frames, counts.inbound_frames);
        bump(&self.counters.inbound_dropped, counts.inbound_dropped);

        let connect_deadline = session.created + self.config.connect_timeout;
        if session.state().is_terminal() {
            let state = session.state();
            self.remove(peer, state);
            return;
        }
        if !session.has_connected() && now >= connect_deadline {
            info!(peer, "participant did not connect in time; removing it");
            self.remove(peer, PeerState::Failed);
            return;
        }
        let mut next = session.poll_timeout();
        if !session.has_connected() {
            next = Some(next.map_or(connect_deadline, |at| at.min(connect_deadline)));
        }
        // A connection asking to be woken in the past is woken on the next millisecond, so a
        // confused timer costs a wake-up per millisecond, never a spinning task.
        let next = next.map(|at| at.max(now + MIN_TIMER_DELAY));
        if next != session.registered_deadline {
            if let Some(old) = session.registered_deadline.take() {
                self.timers.remove(&(old, peer));
            }
            if let Some(at) = next {
                self.timers.insert((at, peer));
            }
            session.registered_deadline = next;
        }
    }

    /// Closes and forgets session `peer`, publishing `state` (unless it already ended).
    fn remove(&mut self, peer: u64, state: PeerState) {
        let Some(mut session) = self.sessions.remove(&peer) else {
            return;
        };
        if let Some(at) = session.registered_deadline.take() {
            self.timers.remove(&(at, peer));
        }
        if session.is_listener() {
            self.counters.listeners.fetch_sub(1, Ordering::Relaxed);
        }
        self.by_ufrag.remove(&session.local_ufrag);
        for addr in &session.remote_addrs {
            if self.by_addr.get(addr) == Some(&peer) {
                self.by_addr.remove(addr);
            }
        }
        self.counters
            .peers
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        // Published last, so whoever sees the terminal state also sees the port without it.
        session.close(&mut self.outgoing, state);
        debug!(peer, state = ?session.state(), "participant removed from the media port");
    }

    /// Sends every queued datagram, listeners' media first, up to [`SEND_BATCH`] per
    /// `sendmmsg` call (a room's shared frame to its listeners is a few system calls, not one
    /// per listener). Waits only when the socket's send buffer is full.
    async fn flush(&mut self) {
        let outgoing = std::mem::take(&mut self.outgoing);
        let packed = std::mem::take(&mut self.packed);
        let workers = self.workers.take();
        {
            let pending = pending_datagrams(workers.as_ref(), &packed, &outgoing);
            // Listeners' media comes first; only it may take the packet sockets.
            let media = pending.len() - outgoing.len();
            let mut start = 0;
            while start < pending.len() {
                let end = if start < media { media } else { pending.len() };
                let end = end.min(start + SEND_BATCH);
                let batch = &pending[start..end];
                let link = self.link.as_ref().filter(|_| start < media);
                let result = self
                    .socket
                    .try_io(tokio::io::Interest::WRITABLE, || match link {
                        Some(link) => link.send_batch(&self.socket, batch),
                        None => send_batch(&self.socket, batch),
                    });
                match result {
                    Ok(sent) => {
                        bump(&self.counters.datagrams_out, sent as u64);
                        start += sent.max(1);
                        if sent == 0 {
                            // The kernel took none and reported no error: count the first as
                            // failed rather than spin on it.
                            bump(&self.counters.send_errors, 1);
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Err(err) = self.socket.writable().await {
                            debug!(%err, "media socket not writable");
                            bump(&self.counters.send_errors, (pending.len() - start) as u64);
                            break;
                        }
                    }
                    Err(err) => {
                        // `sendmmsg` fails only when the first datagram fails (an unreachable
                        // remote, say): that one is lost, the rest go on.
                        debug!(to = %batch[0].0, %err, "media socket send failed");
                        bump(&self.counters.send_errors, 1);
                        start += 1;
                    }
                }
            }
        }
        // Keep both buffers' capacity for the next round.
        self.outgoing = outgoing;
        self.outgoing.clear();
        self.packed = packed;
        self.packed.clear();
        self.workers = workers;
        if let Some(workers) = &mut self.workers {
            workers.clear();
        }
        if let Some(link) = &mut self.link {
            bump(&self.counters.link_layer_datagrams, link.take_sent());
            // Destinations this flush sent through the UDP socket for want of a next hop.
            link.resolve(Instant::now());
        }
    }

    async fn shutdown(&mut self) {
        let peers: Vec<u64> = self.sessions.keys().copied().collect();
        for peer in peers {
            self.remove(peer, PeerState::Closed);
        }
        self.flush().await;
        self.commands.close();
        // Fail registrations that raced with shutdown instead of leaving their callers waiting.
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Register { reply, .. } = command {
                let _ = reply.send(Err(EndpointError::PortClosed));
            }
        }
        info!("media port stopped");
    }
}
