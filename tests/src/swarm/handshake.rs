//! Joining one listener: socket, offer/answer (Chorus' join API or a Janus AudioBridge `join`),
//! ICE, DTLS and SRTP keys.
//!
//! Runs as one Tokio task per listener (the swarm bounds how many run at once). Everything here
//! happens once per listener, so clarity wins over thrift; the per-packet work is in
//! [`super::media`], which takes the result over.
//!
//! Invariants:
//! - One UDP socket per listener, never shared: the server tells sessions apart by source
//!   address, and each listener has its own ICE credentials, DTLS association and SRTP keys.
//! - Only datagrams from the server's candidate are looked at; STUN and DTLS are told apart by
//!   their first byte (RFC 7983). RTP that arrives before the keys exist is counted and dropped.
//! - The DTLS handshake fails unless the server's certificate matches the answer's fingerprint
//!   (checked in the DTLS verify callback), and the join fails unless that check ran.
//! - SRTP keys are derived exactly as `rtc`'s own peer connection does (RFC 5764 §4.2): export
//!   `EXTRACTOR-dtls_srtp`, split client/server halves by the DTLS role; the remote (server to
//!   listener) context decrypts RTP, the local one encrypts the listener's RTCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use nix::sys::socket::{setsockopt, sockopt};
use rtc::crypto::{HashAlgorithm, RTCCryptoProvider};
use rtc::dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    VerifyPeerCertificateFn,
};
use rtc::dtls::crypto::Certificate;
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::dtls::state::State;
use rtc::shared::TransportProtocol;
use rtc::srtp::context::Context as SrtpContext;
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;
use rustls_pki_types::CertificateDer;

use super::ice::{self, IceCredentials, Inbound};
use super::sdp::{self, Direction, DtlsRole, OfferParams};

/// First STUN retransmission interval; doubled up to [`STUN_RTO_MAX`] (RFC 8445 paces checks
/// at 50 ms; a loaded server answering late should not be flooded).
const STUN_RTO_START: Duration = Duration::from_millis(100);
const STUN_RTO_MAX: Duration = Duration::from_millis(1600);
/// After the first successful check, how long to wait for the server's own check before
/// nominating anyway.
const NOMINATE_WAIT: Duration = Duration::from_millis(20);
/// Replay window of the server-to-listener SRTP context, as `rtc` uses by default.
const SRTP_REPLAY_WINDOW: usize = 64;
/// Largest datagram read during the handshake (DTLS flights are fragmented to the MTU).
const HANDSHAKE_BUFFER: usize = 2048;

/// How a listener's offer reaches the server and its answer comes back.
pub(crate) enum Signaling {
    /// Chorus's join API: `POST` the offer to `join_url` with the listener's token.
    Chorus {
        client: reqwest::Client,
        join_url: reqwest::Url,
    },
    /// A Janus AudioBridge room (one API session for the whole swarm).
    Janus(super::janus::JanusSignaling),
}

/// What the server must be told when a listener leaves.
#[derive(Debug)]
pub(crate) enum Membership {
    /// `DELETE participant_url` with the listener's token.
    Chorus {
        participant_url: String,
        token: String,
    },
    /// The listener's AudioBridge handle (`leave`, then `detach`).
    Janus(crate::janus::JanusHandle),
}

/// What every listener's join shares.
pub(crate) struct JoinContext {
    pub(crate) signaling: Signaling,
    /// One certificate for the whole swarm: generating thousands is slow, and sharing one
    /// changes nothing on the wire but the fingerprint being the same.
    pub(crate) certificate: Certificate,
    /// `AB:CD:...` SHA-256 of [`Self::certificate`].
    pub(crate) fingerprint: String,
    pub(crate) crypto: Arc<dyn RTCCryptoProvider>,
    pub(crate) direction: Direction,
    pub(crate) bind_ip: IpAddr,
    /// Where the sockets are created, when not in this process's namespace.
    pub(crate) netns: Option<crate::swarm_network::NetnsBinder>,
    pub(crate) recv_buffer_bytes: usize,
    pub(crate) connect_timeout: Duration,
}

impl std::fmt::Debug for JoinContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinContext")
            .field(
                "signaling",
                &match &self.signaling {
                    Signaling::Chorus { join_url, .. } => join_url.to_string(),
                    Signaling::Janus(janus) => format!("{janus:?}"),
                },
            )
            .field("direction", &self.direction)
            .field("bind_ip", &self.bind_ip)
            .finish_non_exhaustive()
    }
}

impl JoinContext {
    /// Generates the swarm's certificate and computes its fingerprint.
    pub(crate) fn certificate(
        crypto: &Arc<dyn RTCCryptoProvider>,
    ) -> Result<(Certificate, String)> {
        let certificate =
            Certificate::generate_self_signed(vec!["chorus-swarm".to_owned()], crypto.crypto())
                .map_err(|e| anyhow!("generating the DTLS certificate: {e}"))?;
        let der = certificate
            .certificate
            .first()
            .context("the generated certificate is empty")?;
        let fingerprint = sha256_fingerprint(crypto, der.as_ref())?.to_ascii_uppercase();
        Ok((certificate, fingerprint))
    }
}

/// `ab:cd:...`: the SHA-256 of `der`, as SDP writes fingerprints (lower case here).
fn sha256_fingerprint(crypto: &Arc<dyn RTCCryptoProvider>, der: &[u8]) -> Result<String> {
    let digest = crypto
        .crypto()
        .hash(HashAlgorithm::Sha256, der)
        .map_err(|e| anyhow!("hashing a certificate: {e}"))?;
    Ok(digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// How long each step of one join took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JoinTimings {
    /// The offer/answer exchange (for Janus: `attach` and `join` until the `joined` event).
    pub http: Duration,
    /// From the answer to the first valid Binding Success Response.
    pub ice: Duration,
    /// From the answer to DTLS HandshakeComplete.
    pub dtls: Duration,
}

/// A connected listener, ready for the media thread.
pub(crate) struct Joined {
    pub(crate) index: usize,
    /// Non-blocking.
    pub(crate) socket: std::net::UdpSocket,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// Kept after the handshake: a server that missed the listener's last flight repeats its
    /// own, and only the endpoint can answer it.
    pub(crate) endpoint: Endpoint,
    /// Listener-to-server keys (SRTCP receiver reports).
    pub(crate) local_srtp: SrtpContext,
    /// Server-to-listener keys (SRTP audio).
    pub(crate) remote_srtp: SrtpContext,
    pub(crate) credentials: IceCredentials,
    pub(crate) role: DtlsRole,
    pub(crate) profile: ProtectionProfile,
    pub(crate) answer_direction: String,
    /// The SSRC of the listener's own stream (sent only with [`super::Upstream::Silence`]).
    pub(crate) send_ssrc: u32,
    /// The answer's id for the RFC 6464 audio-level extension.
    pub(crate) audio_level_id: Option<u8>,
    /// When the answer arrived.
    pub(crate) answered_at: Instant,
    pub(crate) timings: JoinTimings,
    /// RTP datagrams that arrived before the SRTP keys existed (dropped).
    pub(crate) early_rtp: u64,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("index", &self.index)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Binds a listener socket on `ip` port 0, with a receive buffer of `recv_buffer_bytes` and
/// SO_RXQ_OVFL on (so every datagram read reports the socket's drop counter).
fn bind_socket(
    ip: IpAddr,
    netns: Option<&crate::swarm_network::NetnsBinder>,
    recv_buffer_bytes: usize,
) -> Result<std::net::UdpSocket> {
    let socket = match netns {
        Some(binder) => binder.bind(SocketAddr::new(ip, 0))?,
        None => std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding a listener socket on {ip}"))?,
    };
    socket.set_nonblocking(true)?;
    // SO_RCVBUFFORCE passes net.core.rmem_max when privileged; otherwise the capped SO_RCVBUF.
    if setsockopt(&socket, sockopt::RcvBufForce, &recv_buffer_bytes).is_err() {
        setsockopt(&socket, sockopt::RcvBuf, &recv_buffer_bytes)
            .context("setting SO_RCVBUF on a listener socket")?;
    }
    setsockopt(&socket, sockopt::RxqOvfl, &1).context("enabling SO_RXQ_OVFL")?;
    // Kernel receive timestamps (SO_TIMESTAMPNS): the arrival times that offsets between
    // listeners are computed from, free of the media thread's own reading delay.
    setsockopt(&socket, sockopt::ReceiveTimestampns, &true).context("enabling SO_TIMESTAMPNS")?;
    Ok(socket)
}

/// Sends `offer` to the server; returns the answer and what leaving needs.
async fn exchange(
    ctx: &JoinContext,
    index: usize,
    token: String,
    offer: String,
) -> Result<(String, Membership)> {
    match &ctx.signaling {
        Signaling::Chorus { client, join_url } => {
            let (answer, participant_url) =
                crate::bot::post_offer(client, join_url, &token, offer).await?;
            Ok((
                answer,
                Membership::Chorus {
                    participant_url,
                    token,
                },
            ))
        }
        Signaling::Janus(janus) => {
            let (answer, handle) = janus.join(index, offer).await?;
            Ok((answer, Membership::Janus(handle)))
        }
    }
}

/// The DTLS configuration for one listener: the swarm certificate, a client certificate
/// required in the server role (so the server's certificate is always seen), extended master
/// secret, and a verify callback that accepts only the answer's fingerprint and records that it
/// ran in `verified`.
fn dtls_config(
    ctx: &JoinContext,
    role: DtlsRole,
    fingerprint: String,
    verified: Arc<AtomicBool>,
) -> Result<Arc<HandshakeConfig>> {
    let crypto = Arc::clone(&ctx.crypto);
    let verify: VerifyPeerCertificateFn = Arc::new(
        move |certs: &[Vec<u8>], _chains: &[CertificateDer<'static>]| {
            let first = certs
                .first()
                .ok_or(rtc::shared::error::Error::ErrNonCertificate)?;
            let seen = sha256_fingerprint(&crypto, first)
                .map_err(|e| rtc::shared::error::Error::Other(e.to_string()))?;
            if seen == fingerprint {
                verified.store(true, Ordering::SeqCst);
                Ok(())
            } else {
                Err(rtc::shared::error::Error::ErrNoMatchingCertificateFingerprint)
            }
        },
    );
    let config = ConfigBuilder::default()
        .with_crypto_provider(Arc::clone(&ctx.crypto))
        .with_certificates(vec![ctx.certificate.clone()])
        .with_srtp_protection_profiles(vec![
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
        ])
        .with_client_auth(ClientAuthType::RequireAnyClientCert)
        // Self-signed on both sides: the fingerprint callback is the check, as in WebRTC.
        .with_insecure_skip_verify(true)
        .with_verify_peer_certificate(Some(verify))
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
        .build(role == DtlsRole::Client, None)
        .map_err(|e| anyhow!("building the DTLS configuration: {e}"))?;
    Ok(Arc::new(config))
}

/// The two SRTP contexts of a completed handshake: (local, remote).
fn srtp_contexts(
    state: &State,
    crypto: &Arc<dyn RTCCryptoProvider>,
) -> Result<(SrtpContext, SrtpContext, ProtectionProfile)> {
    let profile = match state.srtp_protection_profile() {
        SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
        SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm => ProtectionProfile::AeadAes256Gcm,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
            ProtectionProfile::Aes128CmHmacSha1_80
        }
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32 => {
            ProtectionProfile::Aes128CmHmacSha1_32
        }
        other => bail!("the server chose no usable SRTP profile ({other:?})"),
    };
    let mut config = rtc::srtp::config::Config {
        profile,
        ..Default::default()
    };
    let keying_material = state
        .export_keying_material(
            rtc::srtp::config::LABEL_EXTRACTOR_DTLS_SRTP,
            &[],
            config.keying_material_len(),
        )
        .map_err(|e| anyhow!("exporting DTLS-SRTP keying material: {e}"))?;
    config
        .set_session_keys_from_keying_material(keying_material.as_ref(), state.is_client())
        .map_err(|e| anyhow!("splitting DTLS-SRTP keys: {e}"))?;
    let local = SrtpContext::new(
        &config.keys.local_master_key,
        &config.keys.local_master_salt,
        profile,
        None,
        None,
        crypto.crypto(),
    )
    .map_err(|e| anyhow!("local SRTP context: {e}"))?;
    let remote = SrtpContext::new(
        &config.keys.remote_master_key,
        &config.keys.remote_master_salt,
        profile,
        Some(srtp_replay_protection(SRTP_REPLAY_WINDOW)),
        Some(srtcp_replay_protection(SRTP_REPLAY_WINDOW)),
        crypto.crypto(),
    )
    .map_err(|e| anyhow!("remote SRTP context: {e}"))?;
    Ok((local, remote, profile))
}

/// Sends everything the DTLS endpoint queued.
async fn flush(
    endpoint: &mut Endpoint,
    socket: &tokio::net::UdpSocket,
    remote: SocketAddr,
) -> Result<()> {
    while let Some(transmit) = endpoint.poll_transmit() {
        socket
            .send_to(&transmit.message, remote)
            .await
            .context("sending a DTLS record")?;
    }
    Ok(())
}

/// Joins listener `index` with `token`: returns once ICE and DTLS are up and the SRTP keys
/// exist, or fails after the context's connect timeout. A listener that got an answer but
/// failed to connect is told to leave (best effort) before the error returns.
pub(crate) async fn join_one(
    ctx: &JoinContext,
    index: usize,
    token: String,
) -> Result<(Joined, Membership)> {
    let socket = bind_socket(ctx.bind_ip, ctx.netns.as_ref(), ctx.recv_buffer_bytes)?;
    let local = socket.local_addr()?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let (local_ufrag, local_pwd) = ice::local_credentials();
    let send_ssrc = rand::random::<u32>();
    let offer = sdp::offer(&OfferParams {
        session_id: rand::random::<u32>().into(),
        local,
        ice_ufrag: &local_ufrag,
        ice_pwd: &local_pwd,
        fingerprint: &ctx.fingerprint,
        direction: ctx.direction,
        ssrc: send_ssrc,
    });
    let http_start = Instant::now();
    let (answer_sdp, membership) = exchange(ctx, index, token, offer).await?;
    let connected = connect(
        ctx,
        index,
        socket,
        (local_ufrag, local_pwd),
        send_ssrc,
        &answer_sdp,
        http_start,
    )
    .await;
    match connected {
        Ok(joined) => Ok((joined, membership)),
        Err(err) => {
            // Do not leave a half-joined participant behind in the room.
            let _ = leave(ctx, membership).await;
            Err(err)
        }
    }
}

/// Tells the server that a listener leaves.
pub(crate) async fn leave(ctx: &JoinContext, membership: Membership) -> Result<()> {
    match membership {
        Membership::Chorus {
            participant_url,
            token,
        } => {
            let Signaling::Chorus { client, .. } = &ctx.signaling else {
                bail!("a Chorus participant in a Janus swarm");
            };
            let response = client
                .delete(&participant_url)
                .bearer_auth(&token)
                .send()
                .await
                .with_context(|| format!("DELETE {participant_url}"))?;
            if !response.status().is_success() {
                bail!("DELETE {participant_url} answered {}", response.status());
            }
            Ok(())
        }
        Membership::Janus(handle) => super::janus::leave(handle).await,
    }
}

/// ICE, DTLS and SRTP keys for listener `index`, once its answer is in.
async fn connect(
    ctx: &JoinContext,
    index: usize,
    socket: tokio::net::UdpSocket,
    (local_ufrag, local_pwd): (String, String),
    send_ssrc: u32,
    answer_sdp: &str,
    http_start: Instant,
) -> Result<Joined> {
    let local = socket.local_addr()?;
    let answered = Instant::now();
    let answer = sdp::parse_answer(answer_sdp, local.ip())?;
    if !matches!(answer.direction.as_str(), "sendonly" | "sendrecv") {
        bail!(
            "the server answered a={}: it would send nothing",
            answer.direction
        );
    }
    let remote = answer.candidate;
    let credentials = IceCredentials {
        local_ufrag,
        local_pwd,
        remote_ufrag: answer.ice_ufrag.clone(),
        remote_pwd: answer.ice_pwd.clone(),
        tie_breaker: rand::random(),
    };

    let verified = Arc::new(AtomicBool::new(false));
    let dtls = dtls_config(
        ctx,
        answer.role,
        answer.fingerprint.clone(),
        Arc::clone(&verified),
    )?;
    let mut endpoint = Endpoint::new(
        local,
        TransportProtocol::UDP,
        (answer.role == DtlsRole::Server).then(|| Arc::clone(&dtls)),
    );

    let crypto = ctx.crypto.crypto();
    let deadline = answered + ctx.connect_timeout;
    let mut buffer = vec![0u8; HANDSHAKE_BUFFER];
    let mut pending = Vec::new();
    let mut next_check = answered;
    let mut rto = STUN_RTO_START;
    // A check succeeded (then nominate); the nomination succeeded.
    let mut checked = false;
    let mut ice_done: Option<Instant> = None;
    let mut early_rtp = 0;
    let dtls_done = loop {
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "listener {index} ({local}) not connected to {remote} {:?} after the answer: ICE \
                 {}, DTLS not complete",
                ctx.connect_timeout,
                if ice_done.is_some() {
                    "done"
                } else {
                    "unanswered"
                },
            );
        }
        if ice_done.is_none() && now >= next_check {
            let (transaction, request) = ice::binding_request(&credentials, checked, crypto)?;
            pending.push(transaction);
            socket.send_to(&request, remote).await?;
            next_check = now + rto;
            rto = (rto * 2).min(STUN_RTO_MAX);
        }
        if endpoint.poll_timeout(&remote).is_some_and(|due| now >= due) {
            endpoint
                .handle_timeout(remote, now)
                .map_err(|e| anyhow!("DTLS handshake timed out: {e}"))?;
            flush(&mut endpoint, &socket, remote).await?;
        }
        let mut wake = deadline;
        if ice_done.is_none() {
            wake = wake.min(next_check);
        }
        if let Some(due) = endpoint.poll_timeout(&remote) {
            wake = wake.min(due);
        }
        let received = tokio::time::timeout_at(wake.into(), socket.recv_from(&mut buffer)).await;
        let Ok(received) = received else {
            continue; // a timer is due
        };
        let (len, from) = received.context("reading a listener socket")?;
        if from != remote {
            continue;
        }
        let datagram = &buffer[..len];
        let now = Instant::now();
        match datagram.first() {
            Some(0..=3) => match ice::inbound(datagram, from, &credentials, crypto) {
                Ok(Inbound::Success(transaction)) if !checked && pending.contains(&transaction) => {
                    // The pair works: nominate. An `rtc` server answers the nomination only
                    // once its own triggered check of the pair succeeded, so nominate right
                    // after answering that check (below), or after a short wait for one (a
                    // strictly lite server sends none).
                    checked = true;
                    pending.clear();
                    next_check = now + NOMINATE_WAIT;
                    rto = STUN_RTO_START;
                }
                Ok(Inbound::Success(transaction)) if pending.contains(&transaction) => {
                    if ice_done.is_none() {
                        ice_done = Some(now);
                        if answer.role == DtlsRole::Client {
                            endpoint
                                .connect(now, remote, Arc::clone(&dtls), None)
                                .map_err(|e| anyhow!("starting DTLS: {e}"))?;
                            flush(&mut endpoint, &socket, remote).await?;
                        }
                    }
                }
                Ok(Inbound::Success(_)) => {} // a stale transaction: ignore
                Ok(Inbound::Request(response)) => {
                    socket.send_to(&response, remote).await?;
                    if checked && ice_done.is_none() {
                        next_check = next_check.min(now);
                    }
                }
                // Unauthenticated STUN is not an answer; keep checking until the deadline.
                Err(_) => {}
            },
            Some(20..=63) => {
                let events = endpoint.read(now, remote, None, BytesMut::from(datagram));
                flush(&mut endpoint, &socket, remote).await?;
                let events = events.map_err(|e| anyhow!("DTLS handshake failed: {e}"))?;
                if events
                    .iter()
                    .any(|event| matches!(event, EndpointEvent::HandshakeComplete))
                {
                    break now;
                }
            }
            Some(128..=191) => early_rtp += 1,
            _ => {}
        }
    };
    if !verified.load(Ordering::SeqCst) {
        bail!("DTLS completed without checking the server's certificate fingerprint");
    }
    let state = endpoint
        .get_connection_state(remote)
        .context("DTLS completed but the association vanished")?;
    let (local_srtp, remote_srtp, profile) = srtp_contexts(state, &ctx.crypto)?;
    Ok(Joined {
        index,
        socket: socket.into_std()?,
        local,
        remote,
        endpoint,
        local_srtp,
        remote_srtp,
        credentials,
        role: answer.role,
        profile,
        answer_direction: answer.direction,
        send_ssrc,
        audio_level_id: answer.audio_level_id,
        answered_at: answered,
        timings: JoinTimings {
            http: answered - http_start,
            ice: ice_done.map_or(Duration::ZERO, |t| t - answered),
            dtls: dtls_done - answered,
        },
        early_rtp,
    })
}
