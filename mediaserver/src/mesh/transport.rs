//! The mesh transport: QUIC (quinn) between the media servers of one conference, with mutual TLS
//! from the conference's mesh certificates.
//!
//! # Trust
//!
//! Each server has `ca.crt` (the conference's mesh CA), its own `<id>.crt` and `<id>.key`
//! (ECDSA P-256, SANs = server id and DNS name, EKU server + client auth), see [`MeshTls`].
//! - The server side requires a client certificate chaining to the CA
//!   (`rustls::server::WebPkiClientVerifier`); a peer with no certificate or one from another CA
//!   fails the handshake, so it can neither send control messages nor get a datagram read.
//! - The client side verifies the peer's certificate against the CA with the peer's server id as
//!   the server name.
//! - The accepting side learns who dialled from the first frame (`Hello`) and checks that the
//!   client certificate is valid for that id under the CA (same webpki check as a client does),
//!   so one server cannot pose as another.
//! - TLS 1.3 only (QUIC), ring provider, ALPN `chorus-mesh/1`.
//!
//! # Connections
//!
//! One QUIC connection per pair of servers; the server with the lower id dials, the other
//! accepts. A dialer reconnects with exponential backoff (`backoff_min` doubling to
//! `backoff_max`, plus up to 25 % jitter, reset after a connection was up). A newer connection
//! from the same peer replaces an older one.
//!
//! # Framing on the control stream
//!
//! The dialer opens one bidirectional stream. Each frame is `length (u32 BE) || kind (u8) || body`,
//! `length` counting kind and body, `1..=MAX_FRAME`:
//!
//! | kind | frame   | body |
//! |------|---------|------|
//! | 1    | Hello   | version (u8 = 1) `\|\|` the dialer's server id (UTF-8) |
//! | 2    | Ping    | u64 BE: sender's clock, µs |
//! | 3    | Pong    | u64 BE: the Ping's value, echoed |
//! | 4    | Control | one [`ControlMessage`] as [`ControlMessage::encode`] makes it |
//!
//! A length over the limit closes the connection (the stream cannot be resynchronised); a bad body
//! is counted and skipped. Media travel as QUIC datagrams ([`super::wire::MediaDatagram`] bytes,
//! delivered raw: the caller decodes).
//!
//! Heartbeats of the protocol are ordinary control messages; the transport adds its own Ping/Pong
//! for an application-level RTT next to quinn's `Connection::rtt()`.
//!
//! Hand-written because no crate does it: the framing, the peer identification after accept, the
//! dial/backoff loop and the per-peer counters. QUIC and TLS are quinn and rustls.
//!
//! Invariants: nothing a peer sends panics this code; queues are bounded (a full outbound queue
//! drops and reports [`MeshError::Backpressure`], a full inbound datagram queue drops and
//! counts); private keys never reach `Debug` output or logs.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_crds::{MeshPlan, names};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::error::MeshError;
use super::metrics::{DIRECTION_IN, DIRECTION_OUT, MeshMetrics};
use super::protocol::ServerId;
use super::wire::{self, ControlMessage, MAX_CONTROL_BYTES};

/// ALPN protocol id of the mesh.
pub const ALPN: &[u8] = b"chorus-mesh/1";
/// Largest frame body (kind byte plus body).
pub const MAX_FRAME: usize = MAX_CONTROL_BYTES + 1;
/// Version byte in `Hello`.
pub const HELLO_VERSION: u8 = 1;

const KIND_HELLO: u8 = 1;
const KIND_PING: u8 = 2;
const KIND_PONG: u8 = 3;
const KIND_CONTROL: u8 = 4;

/// One frame of the control stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// First frame from the dialer: who it is.
    Hello {
        /// The dialer's server id.
        server_id: ServerId,
    },
    /// RTT probe.
    Ping(u64),
    /// RTT probe answer.
    Pong(u64),
    /// A protocol message.
    Control(ControlMessage),
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, MeshError> {
        match self {
            Frame::Hello { server_id } => {
                wire::check_server_id(server_id)?;
                let mut b = vec![HELLO_VERSION];
                b.extend_from_slice(server_id.as_bytes());
                with_prefix(KIND_HELLO, &b)
            }
            Frame::Ping(t) => with_prefix(KIND_PING, &t.to_be_bytes()),
            Frame::Pong(t) => with_prefix(KIND_PONG, &t.to_be_bytes()),
            Frame::Control(m) => Self::encode_control(m),
        }
    }

    /// A control frame, without cloning the message into a [`Frame`].
    pub fn encode_control(msg: &ControlMessage) -> Result<Vec<u8>, MeshError> {
        with_prefix(KIND_CONTROL, &msg.encode()?)
    }

    /// The body length announced by a length prefix, checked against `1..=max`.
    pub fn length(prefix: [u8; 4], max: usize) -> Result<usize, MeshError> {
        let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(MeshError::Truncated {
                what: "control frame",
                need: 1,
                got: 0,
            });
        }
        if len > max {
            return Err(MeshError::TooLarge {
                what: "control frame",
                len,
                max,
            });
        }
        Ok(len)
    }

    /// Decode a frame body (kind byte and body, without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<Self, MeshError> {
        if frame.len() > MAX_FRAME {
            return Err(MeshError::TooLarge {
                what: "control frame",
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let Some((&kind, body)) = frame.split_first() else {
            return Err(MeshError::Truncated {
                what: "control frame",
                need: 1,
                got: 0,
            });
        };
        let u64_body = |what: &'static str| -> Result<u64, MeshError> {
            let b: [u8; 8] = body.try_into().map_err(|_| MeshError::Malformed {
                what,
                detail: format!("body must be 8 bytes, got {}", body.len()),
            })?;
            Ok(u64::from_be_bytes(b))
        };
        match kind {
            KIND_HELLO => {
                let Some((&version, id)) = body.split_first() else {
                    return Err(MeshError::Truncated {
                        what: "hello frame",
                        need: 2,
                        got: body.len(),
                    });
                };
                if version != HELLO_VERSION {
                    return Err(MeshError::UnsupportedVersion {
                        what: "hello frame",
                        version,
                        supported: HELLO_VERSION,
                    });
                }
                let id = std::str::from_utf8(id).map_err(|_| MeshError::Malformed {
                    what: "hello frame",
                    detail: "server id is not UTF-8".into(),
                })?;
                wire::check_server_id(id)?;
                Ok(Frame::Hello {
                    server_id: id.to_owned(),
                })
            }
            KIND_PING => Ok(Frame::Ping(u64_body("ping frame")?)),
            KIND_PONG => Ok(Frame::Pong(u64_body("pong frame")?)),
            KIND_CONTROL => Ok(Frame::Control(ControlMessage::decode(body)?)),
            other => Err(MeshError::Malformed {
                what: "control frame",
                detail: format!("unknown frame kind {other}"),
            }),
        }
    }
}

fn with_prefix(kind: u8, body: &[u8]) -> Result<Vec<u8>, MeshError> {
    let len = body.len() + 1;
    let too_large = || MeshError::TooLarge {
        what: "control frame",
        len,
        max: MAX_FRAME,
    };
    if len > MAX_FRAME {
        return Err(too_large());
    }
    let len32 = u32::try_from(len).map_err(|_| too_large())?;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&len32.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    Ok(out)
}

/// A server's mesh TLS material: the CA, its certificate chain and its private key.
pub struct MeshTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for MeshTls {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl MeshTls {
    /// From PEM text: the CA certificate(s), this server's certificate chain, its private key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, MeshError> {
        let certs = |pem: &[u8], what: &str| -> Result<Vec<CertificateDer<'static>>, MeshError> {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MeshError::Tls(format!("{what} is not PEM certificates: {e}")))?;
            if v.is_empty() {
                return Err(MeshError::Tls(format!("{what} holds no certificate")));
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            // The parser's error names the PEM problem only, never key bytes.
            .map_err(|e| MeshError::Tls(format!("private key is not a PEM key: {e}")))?;
        Ok(Self {
            ca: certs(ca_pem, "the CA certificate")?,
            chain: certs(cert_pem, "the server certificate")?,
            key,
        })
    }

    /// From the mounted mesh TLS Secret: `dir/ca.crt`, `dir/<id>.crt`, `dir/<id>.key`.
    pub fn from_dir(dir: &Path, server_id: &str) -> Result<Self, MeshError> {
        let read = |name: String| {
            let path = dir.join(&name);
            std::fs::read(&path)
                .map_err(|e| MeshError::Io(format!("cannot read {}: {e}", path.display())))
        };
        Self::from_pem(
            &read(names::CA_CERT_KEY.to_owned())?,
            &read(names::server_cert_key(server_id))?,
            &read(names::server_key_key(server_id))?,
        )
    }
}

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

fn tls_err(context: &str, e: impl std::fmt::Display) -> MeshError {
    MeshError::Tls(format!("{context}: {e}"))
}

fn io_err(context: &str, e: impl std::fmt::Display) -> MeshError {
    MeshError::Io(format!("{context}: {e}"))
}

/// Check that `chain` is valid under the verifier's CA for server name `id`.
fn verify_identity(
    verifier: &WebPkiServerVerifier,
    chain: &[CertificateDer<'static>],
    id: &str,
) -> Result<(), MeshError> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(MeshError::Tls("no certificate presented".into()));
    };
    let name = ServerName::try_from(id.to_owned())
        .map_err(|e| tls_err(&format!("server id {id:?} is not a valid TLS name"), e))?;
    verifier
        .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            tls_err(
                &format!("certificate is not valid for server {id:?} under the mesh CA"),
                e,
            )
        })
}

struct Crypto {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    verifier: Arc<WebPkiServerVerifier>,
}

fn build_crypto(
    self_id: &str,
    tls: &MeshTls,
    config: &TransportConfig,
) -> Result<Crypto, MeshError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &tls.ca {
        roots
            .add(ca.clone())
            .map_err(|e| tls_err("the CA certificate is unusable", e))?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| tls_err("cannot build the peer verifier", e))?;
    // Fail early and clearly if our own certificate does not fit our id and CA.
    verify_identity(&verifier, &tls.chain, self_id)?;

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| tls_err("cannot build the client verifier", e))?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS 1.3 unavailable", e))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| tls_err("server certificate or key unusable", e))?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS 1.3 unavailable", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| tls_err("client certificate or key unusable", e))?;
    client_tls.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|e| io_err("idle timeout out of range", e))?,
        ))
        .keep_alive_interval(Some(config.keep_alive))
        .datagram_receive_buffer_size(Some(1 << 20))
        .datagram_send_buffer_size(1 << 20)
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    let transport = Arc::new(transport);

    let quic_server = QuicServerConfig::try_from(server_tls)
        .map_err(|e| tls_err("TLS config unusable for QUIC", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server.transport_config(transport.clone());
    let quic_client = QuicClientConfig::try_from(client_tls)
        .map_err(|e| tls_err("TLS config unusable for QUIC", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_client));
    client.transport_config(transport);
    Ok(Crypto {
        server,
        client,
        verifier,
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
        let crypto = build_crypto(self_id, tls, &config)?;
        socket
            .set_nonblocking(true)
            .map_err(|e| io_err("cannot make the mesh socket non-blocking", e))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| MeshError::Io("the mesh transport needs a Tokio runtime".into()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(crypto.server),
            socket,
            runtime,
        )
        .map_err(|e| io_err("cannot start the QUIC endpoint", e))?;
        let queue = config.inbound_queue.max(1);
        let (control_tx, control_rx) = mpsc::channel(queue);
        let (datagram_tx, datagram_rx) = mpsc::channel(queue);
        let inner = Arc::new(Inner {
            self_id: self_id.to_owned(),
            endpoint,
            client_config: crypto.client,
            verifier: crypto.verifier,
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
            .map_err(|e| io_err("no local address", e))
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
            other => io_err("datagram refused", other),
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

    async fn dial(
        &self,
        peer: &str,
        addr: &str,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), MeshError> {
        let sockaddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| io_err(&format!("cannot resolve {addr:?}"), e))?
            .next()
            .ok_or_else(|| MeshError::Io(format!("{addr:?} resolves to no address")))?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sockaddr, peer)
            .map_err(|e| io_err("cannot start a connection", e))?;
        let handshake = async {
            let conn = connecting
                .await
                .map_err(|e| tls_err(&format!("handshake with {peer:?} failed"), e))?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| io_err("cannot open the control stream", e))?;
            let hello = Frame::Hello {
                server_id: self.self_id.clone(),
            }
            .encode()?;
            send.write_all(&hello)
                .await
                .map_err(|e| io_err("cannot send hello", e))?;
            Ok::<_, MeshError>((conn, send, recv))
        };
        tokio::time::timeout(self.config.handshake_timeout, handshake)
            .await
            .map_err(|_| MeshError::Io(format!("handshake with {peer:?} timed out")))?
    }

    async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), MeshError> {
        let accept = async {
            let conn = incoming
                .accept()
                .map_err(|e| io_err("cannot accept", e))?
                .await
                .map_err(|e| tls_err("inbound handshake failed", e))?;
            let (send, mut recv) = conn
                .accept_bi()
                .await
                .map_err(|e| io_err("no control stream", e))?;
            let (_, hello) = read_frame(&mut recv).await?;
            Ok::<_, MeshError>((conn, send, recv, hello))
        };
        let (conn, send, recv, hello) = tokio::time::timeout(self.config.handshake_timeout, accept)
            .await
            .map_err(|_| MeshError::Io("inbound handshake timed out".into()))??;
        let server_id = match hello {
            Ok(Frame::Hello { server_id }) => server_id,
            Ok(_) => {
                conn.close(1u32.into(), b"expected hello");
                return Err(MeshError::invalid(
                    "hello frame",
                    "first frame is not hello",
                ));
            }
            Err(e) => {
                conn.close(1u32.into(), b"bad hello");
                return Err(e);
            }
        };
        if !self.lock_peers().contains_key(&server_id) {
            conn.close(2u32.into(), b"not in plan");
            return Err(MeshError::UnknownPeer(server_id));
        }
        if server_id > self.self_id {
            // The lower id dials; accepting the other direction too would make two connections
            // replace each other forever.
            conn.close(4u32.into(), b"lower id dials");
            return Err(MeshError::invalid(
                "hello frame",
                format!(
                    "{server_id:?} dialled {:?}; the lower id dials",
                    self.self_id
                ),
            ));
        }
        let chain = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
        let verified = match chain {
            Some(chain) => verify_identity(&self.verifier, &chain, &server_id),
            None => Err(MeshError::Tls("peer presented no certificate".into())),
        };
        if let Err(e) = verified {
            conn.close(3u32.into(), b"identity mismatch");
            return Err(e);
        }
        self.run_connection(&server_id, conn, send, recv).await;
        Ok(())
    }

    async fn run_connection(
        &self,
        peer: &str,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.control_queue.max(1));
        let stats = {
            let mut slots = self.lock_peers();
            let Some(slot) = slots.get_mut(peer) else {
                conn.close(2u32.into(), b"not in plan");
                return;
            };
            let old = slot.live.replace(Live {
                id,
                conn: conn.clone(),
                frames: tx.clone(),
            });
            if let Some(old) = old {
                old.conn.close(0u32.into(), b"replaced");
            }
            slot.stats.connects.fetch_add(1, Ordering::Relaxed);
            slot.stats.clone()
        };
        info!(peer, remote = %conn.remote_address(), "mesh peer connected");
        let outcome = tokio::select! {
            r = self.write_loop(peer, &conn, &mut send, rx, &stats) => r,
            r = self.read_loop(peer, &mut recv, &tx, &stats) => r,
            r = self.datagram_loop(peer, &conn, &stats) => r,
            _ = self.shutdown.cancelled() => Ok(()),
        };
        if let Err(e) = &outcome {
            debug!(peer, error = %e, "mesh connection ended");
        }
        {
            let mut slots = self.lock_peers();
            if let Some(slot) = slots.get_mut(peer)
                && slot.live.as_ref().is_some_and(|l| l.id == id)
            {
                slot.live = None;
            }
        }
        conn.close(0u32.into(), b"closed");
        info!(peer, "mesh peer disconnected");
    }

    async fn write_loop(
        &self,
        peer: &str,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        mut rx: mpsc::Receiver<Vec<u8>>,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => return Ok(()),
                },
                _ = ping.tick() => {
                    if let Some(m) = &self.metrics {
                        let app = stats.app_rtt_us.load(Ordering::Relaxed);
                        let rtt = if app > 0 { Duration::from_micros(app - 1) } else { conn.rtt() };
                        m.set_rtt(peer, rtt);
                    }
                    Frame::Ping(self.now_us()).encode()?
                }
            };
            send.write_all(&frame)
                .await
                .map_err(|e| io_err("control stream write failed", e))?;
            add(&stats.bytes_out, frame.len());
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_OUT, frame.len(), false);
            }
        }
    }

    async fn read_loop(
        &self,
        peer: &str,
        recv: &mut quinn::RecvStream,
        tx: &mpsc::Sender<Vec<u8>>,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        loop {
            let (len, frame) = read_frame(recv).await?;
            add(&stats.bytes_in, len);
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_IN, len, false);
            }
            match frame {
                Ok(Frame::Control(msg)) => {
                    stats.control_in.fetch_add(1, Ordering::Relaxed);
                    self.control_tx
                        .send((peer.to_owned(), msg))
                        .await
                        .map_err(|_| MeshError::Closed)?;
                }
                Ok(Frame::Ping(t)) => {
                    // Best effort: a full queue just skips one RTT sample.
                    let _ = tx.try_send(Frame::Pong(t).encode()?);
                }
                Ok(Frame::Pong(t)) => {
                    let rtt = self.now_us().saturating_sub(t);
                    stats
                        .app_rtt_us
                        .store(rtt.saturating_add(1), Ordering::Relaxed);
                    if let Some(m) = &self.metrics {
                        m.set_rtt(peer, Duration::from_micros(rtt));
                    }
                }
                Ok(Frame::Hello { .. }) => {}
                Err(e) => {
                    debug!(peer, error = %e, "mesh frame refused");
                    self.record_error(&e);
                }
            }
        }
    }

    async fn datagram_loop(
        &self,
        peer: &str,
        conn: &quinn::Connection,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        loop {
            let d = conn
                .read_datagram()
                .await
                .map_err(|e| io_err("connection lost", e))?;
            stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
            add(&stats.bytes_in, d.len());
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_IN, d.len(), true);
            }
            if self.datagram_tx.try_send((peer.to_owned(), d)).is_err() {
                stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Read one frame: `Err` when the stream is broken or the length is over the limit (the
/// connection must end), `Ok((bytes, Err))` when only the body is bad.
async fn read_frame(
    recv: &mut quinn::RecvStream,
) -> Result<(usize, Result<Frame, MeshError>), MeshError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| io_err("control stream read failed", e))?;
    let len = Frame::length(prefix, MAX_FRAME)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| io_err("control stream read failed", e))?;
    Ok((len + 4, Frame::decode(&body)))
}

async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            i = inner.endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.clone().handle_incoming(incoming).await {
                debug!(error = %e, "mesh inbound connection refused");
                inner.record_error(&e);
            }
        });
    }
}

async fn dial_loop(inner: Arc<Inner>, peer: ServerId, addr: String, cancel: CancellationToken) {
    let min = inner.config.backoff_min.max(Duration::from_millis(1));
    let max = inner.config.backoff_max.max(min);
    let mut backoff = min;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match inner.dial(&peer, &addr).await {
            Ok((conn, send, recv)) => {
                let up = Instant::now();
                inner.run_connection(&peer, conn, send, recv).await;
                if up.elapsed() >= Duration::from_secs(1) {
                    backoff = min;
                }
            }
            Err(e) => {
                debug!(peer = %peer, error = %e, "mesh dial failed");
                inner.record_error(&e);
            }
        }
        let quarter = u64::try_from(backoff.as_micros() / 4).unwrap_or(0).max(1);
        let jitter = Duration::from_micros(rand::random::<u64>() % quarter);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}
