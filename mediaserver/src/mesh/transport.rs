//! The mesh transport: QUIC (quinn) between the media servers of one conference, with mutual TLS
//! from the conference's mesh certificates ([`super::tls`]) and control frames on one
//! bidirectional stream per peer ([`super::frame`]). Media travel as QUIC datagrams
//! ([`super::wire::MediaDatagram`] bytes, delivered raw: the caller decodes).
//!
//! This module is the handle the server holds ([`MeshTransport`]): the QUIC endpoint, the peer
//! set from the plan, sending, and per-peer counters. The life of each connection (dial,
//! accept, heartbeats, backoff) is in `connection.rs`.
//!
//! # Connections
//!
//! One QUIC connection per pair of servers; the server with the lower id dials, the other
//! accepts. A dialer reconnects with exponential backoff (`backoff_min` doubling to
//! `backoff_max`, plus up to 25 % jitter, reset after a connection was up). A newer connection
//! from the same peer replaces an older one.
//!
//! Heartbeats of the protocol are ordinary control messages; the transport adds its own Ping/Pong
//! for an application-level RTT next to quinn's `Connection::rtt()`.
//!
//! Hand-written because no crate does it: the framing, the peer identification after accept, the
//! dial/backoff loop and the per-peer counters. QUIC and TLS are quinn and rustls.
//!
//! Invariants: nothing a peer sends panics this code; queues are bounded (a full outbound queue
//! drops and reports [`MeshError::Backpressure`], a full inbound datagram queue drops and
//! counts); the peer set is bounded by the plan; private keys never reach `Debug` output or
//! logs.

mod connection;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_crds::MeshPlan;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::connection::{accept_loop, dial_loop};
use super::error::MeshError;
use super::metrics::{DIRECTION_OUT, MeshMetrics};
use super::protocol::ServerId;
use super::wire::{self, ControlMessage};

// The codec and the TLS material were part of this module; their paths stay valid.
pub use super::frame::{Frame, HELLO_VERSION, MAX_FRAME};
pub use super::tls::{ALPN, MeshTls};

/// A peer to keep a connection with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    /// Its server id (also the TLS server name).
    pub id: ServerId,
    /// `host:port` of its mesh endpoint (resolved at every dial).
    pub addr: String,
}

impl MeshPeer {
    /// Every server of the plan but `self_id`.
    pub fn from_plan(plan: &MeshPlan, self_id: &str) -> Vec<MeshPeer> {
        plan.nodes
            .iter()
            .filter(|n| n.id != self_id)
            .map(|n| MeshPeer {
                id: n.id.clone(),
                addr: n.mesh.clone(),
            })
            .collect()
    }
}

/// Transport timing and queue sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct TransportConfig {
    /// Interval between application-level RTT pings.
    pub ping_interval: Duration,
    /// QUIC idle timeout: a connection unheard this long is dead.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval (must be below the idle timeout).
    pub keep_alive: Duration,
    /// Limit on a dial or an accept handshake, `Hello` included.
    pub handshake_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Frames queued per peer before sends fail with backpressure.
    pub control_queue: usize,
    /// Inbound control messages and datagrams queued for the caller.
    pub inbound_queue: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            control_queue: 1024,
            inbound_queue: 4096,
        }
    }
}

/// Counters of one peer, as [`MeshTransport::peer_stats`] reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer.
    pub peer: ServerId,
    /// Whether a connection is up now.
    pub connected: bool,
    /// quinn's smoothed RTT of the current connection.
    pub rtt: Option<Duration>,
    /// The last application-level Ping/Pong RTT.
    pub app_rtt: Option<Duration>,
    /// Payload bytes received (frames and datagrams).
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Control messages received.
    pub control_in: u64,
    /// Control messages sent.
    pub control_out: u64,
    /// Inbound datagrams dropped because the caller's queue was full.
    pub datagrams_dropped: u64,
    /// Connections established so far.
    pub connects: u64,
}

/// What the transport delivers: control messages and raw media datagrams, tagged by peer.
#[derive(Debug)]
pub struct MeshInbound {
    /// Control messages, in order per peer.
    pub control: mpsc::Receiver<(ServerId, ControlMessage)>,
    /// Media datagrams (decode with [`super::wire::MediaDatagram::decode`]).
    pub datagrams: mpsc::Receiver<(ServerId, Bytes)>,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    control_in: AtomicU64,
    control_out: AtomicU64,
    datagrams_dropped: AtomicU64,
    connects: AtomicU64,
    /// Last app-level RTT in µs plus one; 0 = none yet.
    app_rtt_us: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

#[derive(Debug)]
struct Live {
    id: u64,
    conn: quinn::Connection,
    frames: mpsc::Sender<Vec<u8>>,
}

#[derive(Debug)]
struct Slot {
    addr: String,
    stats: Arc<Counters>,
    live: Option<Live>,
    dialer: Option<CancellationToken>,
}

/// Peer `to`'s slot and its live connection: an unknown peer and one not connected right now are
/// different errors.
fn connected<'a>(
    slots: &'a BTreeMap<ServerId, Slot>,
    to: &str,
) -> Result<(&'a Slot, &'a Live), MeshError> {
    let slot = slots
        .get(to)
        .ok_or_else(|| MeshError::UnknownPeer(to.to_owned()))?;
    let live = slot
        .live
        .as_ref()
        .ok_or_else(|| MeshError::NotConnected(to.to_owned()))?;
    Ok((slot, live))
}

#[derive(Debug)]
struct Inner {
    self_id: ServerId,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    verifier: Arc<WebPkiServerVerifier>,
    config: TransportConfig,
    metrics: Option<MeshMetrics>,
    shutdown: CancellationToken,
    control_tx: mpsc::Sender<(ServerId, ControlMessage)>,
    datagram_tx: mpsc::Sender<(ServerId, Bytes)>,
    peers: Mutex<BTreeMap<ServerId, Slot>>,
    next_conn_id: AtomicU64,
    clock: Instant,
}

/// A running mesh transport. Cheap to clone; every clone drives the same endpoint.
#[derive(Clone, Debug)]
pub struct MeshTransport {
    inner: Arc<Inner>,
}

/// What a QUIC endpoint of the mesh needs: both sides' configurations, and the verifier that
/// checks an accepted peer's claimed id.
struct EndpointConfigs {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    verifier: Arc<WebPkiServerVerifier>,
}

fn endpoint_configs(
    self_id: &str,
    tls: &MeshTls,
    config: &TransportConfig,
) -> Result<EndpointConfigs, MeshError> {
    let tls = tls.mutual_tls(self_id)?;

    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|e| MeshError::io("idle timeout out of range", e))?,
        ))
        .keep_alive_interval(Some(config.keep_alive))
        .datagram_receive_buffer_size(Some(1 << 20))
        .datagram_send_buffer_size(1 << 20)
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    let transport = Arc::new(transport);

    let quic_server = QuicServerConfig::try_from(tls.server)
        .map_err(|e| MeshError::tls("TLS config unusable for QUIC", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server.transport_config(transport.clone());
    let quic_client = QuicClientConfig::try_from(tls.client)
        .map_err(|e| MeshError::tls("TLS config unusable for QUIC", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_client));
    client.transport_config(transport);
    Ok(EndpointConfigs {
        server,
        client,
        verifier: tls.verifier,
    })
}

impl MeshTransport {
    /// Start the transport of server `self_id` on a bound UDP socket. Must be called inside a
    /// Tokio runtime. Keeps connections with `peers` until `shutdown` is cancelled.
    pub fn start(
        self_id: &str,
        socket: UdpSocket,
        tls: &MeshTls,
        peers: Vec<MeshPeer>,
        config: TransportConfig,
        metrics: Option<MeshMetrics>,
        shutdown: CancellationToken,
    ) -> Result<(Self, MeshInbound), MeshError> {
        wire::check_server_id(self_id)?;
        let configs = endpoint_configs(self_id, tls, &config)?;
        socket
            .set_nonblocking(true)
            .map_err(|e| MeshError::io("cannot make the mesh socket non-blocking", e))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| MeshError::Io("the mesh transport needs a Tokio runtime".into()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(configs.server),
            socket,
            runtime,
        )
        .map_err(|e| MeshError::io("cannot start the QUIC endpoint", e))?;
        let queue = config.inbound_queue.max(1);
        let (control_tx, control_rx) = mpsc::channel(queue);
        let (datagram_tx, datagram_rx) = mpsc::channel(queue);
        let inner = Arc::new(Inner {
            self_id: self_id.to_owned(),
            endpoint,
            client_config: configs.client,
            verifier: configs.verifier,
            config,
            metrics,
            shutdown,
            control_tx,
            datagram_tx,
            peers: Mutex::new(BTreeMap::new()),
            next_conn_id: AtomicU64::new(1),
            clock: Instant::now(),
        });
        tokio::spawn(accept_loop(inner.clone()));
        {
            let inner = inner.clone();
            tokio::spawn(async move {
                inner.shutdown.cancelled().await;
                inner.endpoint.close(0u32.into(), b"shutdown");
                let mut peers = inner.lock_peers();
                for slot in peers.values_mut() {
                    if let Some(d) = slot.dialer.take() {
                        d.cancel();
                    }
                }
            });
        }
        let t = MeshTransport { inner };
        t.set_peers(peers);
        Ok((
            t,
            MeshInbound {
                control: control_rx,
                datagrams: datagram_rx,
            },
        ))
    }

    /// The local address of the endpoint.
    pub fn local_addr(&self) -> Result<SocketAddr, MeshError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|e| MeshError::io("no local address", e))
    }

    /// Replace the peer set (a new plan generation): removed peers are disconnected and their
    /// metric series dropped, new ones dialled (when this server's id is the lower).
    pub fn set_peers(&self, peers: Vec<MeshPeer>) {
        let inner = &self.inner;
        let wanted: BTreeMap<ServerId, String> = peers
            .into_iter()
            .filter(|p| p.id != inner.self_id && wire::is_valid_server_id(&p.id))
            .map(|p| (p.id, p.addr))
            .collect();
        let mut to_dial = Vec::new();
        {
            let mut slots = inner.lock_peers();
            let gone: Vec<ServerId> = slots
                .keys()
                .filter(|id| !wanted.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(mut slot) = slots.remove(&id) {
                    if let Some(d) = slot.dialer.take() {
                        d.cancel();
                    }
                    if let Some(live) = slot.live.take() {
                        live.conn.close(0u32.into(), b"removed from plan");
                    }
                }
                if let Some(m) = &inner.metrics {
                    m.forget_peer(&id);
                }
            }
            for (id, addr) in wanted {
                let slot = slots.entry(id.clone()).or_insert_with(|| Slot {
                    addr: addr.clone(),
                    stats: Arc::new(Counters::default()),
                    live: None,
                    dialer: None,
                });
                let moved = slot.addr != addr;
                slot.addr = addr.clone();
                if inner.self_id < id && (moved || slot.dialer.is_none()) {
                    if let Some(d) = slot.dialer.take() {
                        d.cancel();
                    }
                    let cancel = inner.shutdown.child_token();
                    slot.dialer = Some(cancel.clone());
                    to_dial.push((id, addr, cancel));
                }
            }
        }
        for (id, addr, cancel) in to_dial {
            tokio::spawn(dial_loop(self.inner.clone(), id, addr, cancel));
        }
    }

    /// Queue a control message to `to`. Fails without blocking when there is no connection or
    /// the peer's queue is full (the protocol tolerates loss).
    pub fn send_control(&self, to: &str, msg: &ControlMessage) -> Result<(), MeshError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(MeshError::Closed);
        }
        let frame = Frame::encode_control(msg)?;
        let slots = self.inner.lock_peers();
        let (slot, live) = connected(&slots, to)?;
        live.frames.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MeshError::Backpressure(to.to_owned()),
            mpsc::error::TrySendError::Closed(_) => MeshError::NotConnected(to.to_owned()),
        })?;
        slot.stats.control_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Send one media datagram to `to` (unreliable; dropped by QUIC under congestion).
    pub fn send_datagram(&self, to: &str, data: Bytes) -> Result<(), MeshError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(MeshError::Closed);
        }
        let (conn, stats) = {
            let slots = self.inner.lock_peers();
            let (slot, live) = connected(&slots, to)?;
            (live.conn.clone(), slot.stats.clone())
        };
        let len = data.len();
        conn.send_datagram(data).map_err(|e| match e {
            quinn::SendDatagramError::TooLarge => MeshError::TooLarge {
                what: "QUIC datagram",
                len,
                max: conn.max_datagram_size().unwrap_or(0),
            },
            quinn::SendDatagramError::ConnectionLost(_) => MeshError::NotConnected(to.to_owned()),
            other => MeshError::io("datagram refused", other),
        })?;
        stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
        add(&stats.bytes_out, len);
        if let Some(m) = &self.inner.metrics {
            m.record_traffic(to, DIRECTION_OUT, len, true);
        }
        Ok(())
    }

    /// Whether a connection to `peer` is up.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.inner
            .lock_peers()
            .get(peer)
            .is_some_and(|s| s.live.is_some())
    }

    /// Counters of every peer, sorted by id.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let slots = self.inner.lock_peers();
        slots
            .iter()
            .map(|(id, s)| {
                let c = &s.stats;
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let app = get(&c.app_rtt_us);
                PeerStats {
                    peer: id.clone(),
                    connected: s.live.is_some(),
                    rtt: s.live.as_ref().map(|l| l.conn.rtt()),
                    app_rtt: (app > 0).then(|| Duration::from_micros(app - 1)),
                    bytes_in: get(&c.bytes_in),
                    bytes_out: get(&c.bytes_out),
                    datagrams_in: get(&c.datagrams_in),
                    datagrams_out: get(&c.datagrams_out),
                    control_in: get(&c.control_in),
                    control_out: get(&c.control_out),
                    datagrams_dropped: get(&c.datagrams_dropped),
                    connects: get(&c.connects),
                }
            })
            .collect()
    }

    /// Cancel the shutdown token, close every connection and wait (at most 2 s) until the peers
    /// have been told.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    fn lock_peers(&self) -> MutexGuard<'_, BTreeMap<ServerId, Slot>> {
        // A poisoned lock only means a panic elsewhere; the map itself stays consistent.
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record_error(&self, e: &MeshError) {
        if let Some(m) = &self.metrics {
            m.record_error(e);
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}
