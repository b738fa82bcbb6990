//! The listener transport: what a receive-only participant (`a=recvonly`) needs, built from
//! `rtc`'s public sub-crates instead of a whole `rtc` peer connection.
//!
//! A listener only hears the room's shared mix. Through `rtc`'s peer every frame to every
//! listener crosses its interceptor chain, a few hash maps and allocations, and its SRTP context,
//! which `rtc` does not hand out. Here Chorus owns the per-listener work, so the fan-out can be
//! made cheap (issue "Capacity"). The pieces, each from `rtc` (webrtc-rs) and used through its
//! public API only:
//! - ICE-lite: STUN binding requests are checked (USERNAME, MESSAGE-INTEGRITY with our password)
//!   and answered with `rtc::stun`; the participant's full agent nominates (USE-CANDIDATE);
//! - DTLS with `rtc::dtls`'s sans-IO endpoint, as server (the answer says `a=setup:passive`) or,
//!   when the offer insists on `passive`, as client; the participant's certificate must match the
//!   offer's fingerprint;
//! - SRTP keyed from the DTLS exporter (RFC 5764), exactly once per direction: outbound by our
//!   own in-place `AEAD_AES_128_GCM` seal (`gcm_seal`, no allocation per packet), or by an
//!   `rtc::srtp` context when the participant only offered `AES_CM_128_HMAC_SHA1_80`; inbound
//!   SRTCP by an `rtc::srtp` context.
//!
//! Written by hand here: the answer SDP (a dozen fixed lines) and the RTP header (12 bytes),
//! which is written straight into the port's packed batch and sealed there.
//!
//! Invariants:
//! - our outbound SRTP context is the only one that ever seals this listener's SSRC (no nonce
//!   reuse): it is created once, at the end of the handshake, and only [`ListenerTransport::send`]
//!   uses it;
//! - nothing is sent to an address before a binding request from it passed its integrity check;
//!   media goes to the latest address that nominated (USE-CANDIDATE), else the first that checked;
//! - RTP from a listener is dropped unread (it offered to receive only); its SRTCP is
//!   authenticated and decrypted, then ignored;
//! - without a valid binding request for [`CONSENT_TIMEOUT`] (RFC 7675) the listener fails;
//! - no input panics: every parse error is a dropped datagram.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig};
use rtc::dtls::crypto::Certificate;
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::shared::TransportProtocol;
use rtc::srtp::config::LABEL_EXTRACTOR_DTLS_SRTP;
use rtc::srtp::context::Context;
use rtc::srtp::crypto::{HashAlgorithm, RTCCryptoProvider};
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;
use rtc::stun::attributes::{ATTR_USE_CANDIDATE, ATTR_USERNAME};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message};
use rtc::stun::xoraddr::XorMappedAddress;
use tracing::debug;

use super::EndpointError;
use super::PeerState;
use super::gcm_seal::GcmSealer;
use super::offer::CheckedOffer;
use super::packed::PackedDatagrams;

/// RFC 7675: consent expires 30 s after the last successful check.
pub(crate) const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// SRTP replay window for the listener's SRTCP.
const REPLAY_WINDOW: usize = 64;

/// The process's DTLS identity for listeners: one certificate, generated on first use (a
/// certificate per listener would cost milliseconds of CPU per join for nothing: the
/// fingerprint in each answer is what binds the association).
struct Identity {
    provider: Arc<dyn RTCCryptoProvider>,
    certificate: Certificate,
    /// `sha-256 AA:BB:...`, as it goes into `a=fingerprint`.
    fingerprint: String,
}

fn identity() -> Result<&'static Identity, EndpointError> {
    static IDENTITY: OnceLock<Result<Identity, String>> = OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            let provider = rtc::srtp::crypto::default_provider()
                .map_err(|err| format!("no crypto provider: {err}"))?;
            let certificate =
                Certificate::generate_self_signed(vec!["chorus".to_owned()], provider.crypto())
                    .map_err(|err| format!("generating the DTLS certificate: {err}"))?;
            let der = certificate
                .certificate
                .first()
                .ok_or("the generated certificate is empty")?;
            let digest = provider
                .crypto()
                .hash(HashAlgorithm::Sha256, der.as_ref())
                .map_err(|err| format!("hashing the DTLS certificate: {err}"))?;
            let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
            Ok(Identity {
                provider,
                certificate,
                fingerprint: format!("sha-256 {}", hex.join(":")),
            })
        })
        .as_ref()
        .map_err(|err| EndpointError::Negotiation(err.clone()))
}

/// What a new listener's answer needs besides its transport.
pub(crate) struct ListenerAnswer<'a> {
    pub(crate) local_ufrag: &'a str,
    pub(crate) local_pwd: &'a str,
    pub(crate) candidate: SocketAddr,
    pub(crate) ssrc: u32,
    pub(crate) id: u64,
}

/// One listener's ICE-lite, DTLS and SRTP state. Driven by its `Session`.
pub(crate) struct ListenerTransport {
    local_ufrag: String,
    local_pwd: String,
    /// `local:remote`, the USERNAME every valid binding request carries.
    username: String,
    provider: Arc<dyn RTCCryptoProvider>,
    dtls: Endpoint,
    /// Set when we are the DTLS client: the config to connect with once ICE has an address.
    client_config: Option<Arc<HandshakeConfig>>,
    /// The address the DTLS association is keyed by: the first that spoke DTLS (or that we
    /// connected to). Later DTLS from another of the listener's addresses joins the same one.
    dtls_remote: Option<SocketAddr>,
    /// Where media goes.
    selected: Option<SocketAddr>,
    /// Seals our RTP to the listener. See the module invariants.
    srtp_out: Option<Outbound>,
    /// Opens the listener's SRTCP.
    srtcp_in: Option<Context>,
    last_consent: Option<Instant>,
    /// State changes not yet collected by the session.
    pending_state: Option<PeerState>,
    /// Datagrams to send, collected by [`Self::drain_into`].
    queued: Vec<(SocketAddr, BytesMut)>,
}

impl std::fmt::Debug for ListenerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTransport")
            .field("local_ufrag", &self.local_ufrag)
            .field("selected", &self.selected)
            .field("keyed", &self.srtp_out.is_some())
            .finish_non_exhaustive()
    }
}

/// The outbound SRTP seal: ours for AES-GCM, `rtc::srtp`'s context for the HMAC profile.
enum Outbound {
    Gcm(GcmSealer),
    Context(Context),
}

fn srtp_profiles() -> Vec<SrtpProtectionProfile> {
    // GCM first: one AES pass and no separate HMAC, the cheaper seal per listener-packet.
    vec![
        SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
    ]
}

impl ListenerTransport {
    /// A transport answering `offer` (already checked, receive-only), and its answer SDP.
    pub(crate) fn answer(
        offer: &CheckedOffer,
        local: &ListenerAnswer<'_>,
    ) -> Result<(Self, String), EndpointError> {
        let identity = identity()?;
        let sha256: Vec<String> = offer
            .fingerprints
            .iter()
            .filter(|(hash, _)| hash == "sha-256")
            .map(|(_, value)| value.to_ascii_lowercase())
            .collect();
        if sha256.is_empty() {
            return Err(EndpointError::UnsupportedOffer(
                "the offer has no sha-256 DTLS fingerprint".into(),
            ));
        }
        // The offer's `passive` makes us the DTLS client; `actpass` or `active` the server.
        let we_are_client = offer.setup.as_deref() == Some("passive");
        let provider = identity.provider.clone();
        let verify_provider = provider.clone();
        let verify: rtc::dtls::config::VerifyPeerCertificateFn =
            Arc::new(move |certs: &[Vec<u8>], _chains| {
                let first = certs
                    .first()
                    .ok_or(rtc::shared::error::Error::ErrNoCertificates)?;
                let digest = verify_provider
                    .crypto()
                    .hash(HashAlgorithm::Sha256, first)
                    .map_err(|err| rtc::shared::error::Error::Other(err.to_string()))?;
                let hex: Vec<String> = digest.iter().map(|b| format!("{b:02x}")).collect();
                if sha256.contains(&hex.join(":")) {
                    Ok(())
                } else {
                    Err(rtc::shared::error::Error::Other(
                        "the certificate does not match the offer's fingerprint".into(),
                    ))
                }
            });
        let config = ConfigBuilder::default()
            .with_crypto_provider(provider.clone())
            .with_certificates(vec![identity.certificate.clone()])
            .with_srtp_protection_profiles(srtp_profiles())
            .with_client_auth(ClientAuthType::RequireAnyClientCert)
            .with_insecure_skip_verify(true)
            .with_verify_peer_certificate(Some(verify))
            .with_extended_master_secret(ExtendedMasterSecretType::Require)
            .build(we_are_client, None)
            .map_err(|err| EndpointError::Negotiation(format!("DTLS configuration: {err}")))?;
        let config = Arc::new(config);
        let (dtls, client_config) = if we_are_client {
            (
                Endpoint::new(local.candidate, TransportProtocol::UDP, None),
                Some(config),
            )
        } else {
            (
                Endpoint::new(local.candidate, TransportProtocol::UDP, Some(config)),
                None,
            )
        };
        let transport = ListenerTransport {
            local_ufrag: local.local_ufrag.to_owned(),
            local_pwd: local.local_pwd.to_owned(),
            username: format!("{}:{}", local.local_ufrag, offer.ice_ufrag),
            provider,
            dtls,
            client_config,
            dtls_remote: None,
            selected: None,
            srtp_out: None,
            srtcp_in: None,
            last_consent: None,
            pending_state: None,
            queued: Vec::new(),
        };
        let sdp = answer_sdp(offer, local, &identity.fingerprint, we_are_client);
        Ok((transport, sdp))
    }

    /// Feeds one datagram from `from`; replies are queued.
    pub(crate) fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: BytesMut) {
        match datagram.first() {
            Some(0..=3) => self.handle_stun(now, from, &datagram),
            Some(20..=63) => self.handle_dtls(now, from, datagram),
            Some(128..=191) => {
                // RTCP (payload types 192-223 with the marker bit) is authenticated and
                // dropped; RTP from a listener is dropped unread.
                let is_rtcp = datagram.get(1).is_some_and(|b| (192..=223).contains(b));
                if is_rtcp
                    && let Some(ctx) = self.srtcp_in.as_mut()
                    && let Err(err) = ctx.decrypt_rtcp(&datagram)
                {
                    debug!(%err, "listener SRTCP rejected");
                }
            }
            _ => {}
        }
    }

    fn handle_stun(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let mut request = Message::new();
        if request.unmarshal_binary(datagram).is_err() || request.typ != BINDING_REQUEST {
            return;
        }
        let username = request.get(ATTR_USERNAME).unwrap_or_default();
        if username != self.username.as_bytes() {
            return;
        }
        if MessageIntegrity::check(
            &mut request,
            self.local_pwd.as_bytes(),
            self.provider.crypto(),
        )
        .is_err()
        {
            debug!(%from, "binding request failed its integrity check");
            return;
        }
        let mut response = Message::new();
        let built = response.build(&[
            Box::new(request.clone()),
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                self.local_pwd.clone(),
                self.provider.crypto(),
            )),
            Box::new(FINGERPRINT),
        ]);
        if let Err(err) = built {
            debug!(%err, "cannot build a binding response");
            return;
        }
        self.queued.push((from, BytesMut::from(&response.raw[..])));
        self.last_consent = Some(now);
        if request.contains(ATTR_USE_CANDIDATE) || self.selected.is_none() {
            self.selected = Some(from);
        }
        if let Some(config) = self.client_config.take() {
            // We are the DTLS client: ICE has an address now, so the handshake can start.
            self.dtls_remote = Some(from);
            if let Err(err) = self.dtls.connect(now, from, config, None) {
                debug!(%err, "cannot start the DTLS handshake");
                self.pending_state = Some(PeerState::Failed);
            }
            self.collect_dtls();
        }
    }

    fn handle_dtls(&mut self, now: Instant, from: SocketAddr, datagram: BytesMut) {
        // DTLS only after ICE checked this participant: an unchecked address gets nothing back.
        if self.last_consent.is_none() {
            return;
        }
        let remote = *self.dtls_remote.get_or_insert(from);
        match self.dtls.read(now, remote, None, datagram) {
            Ok(events) => {
                for event in events {
                    match event {
                        EndpointEvent::HandshakeComplete => self.keyed(remote),
                        EndpointEvent::PeerClosed => self.pending_state = Some(PeerState::Closed),
                        _ => {}
                    }
                }
            }
            Err(err) => debug!(%err, "listener DTLS rejected a datagram"),
        }
        self.collect_dtls();
    }

    /// The handshake finished: derive both SRTP contexts from the exporter.
    fn keyed(&mut self, remote: SocketAddr) {
        match self.srtp_contexts(remote) {
            Ok((out, inbound)) => {
                if self.srtp_out.is_none() {
                    self.srtp_out = Some(out);
                    self.srtcp_in = Some(inbound);
                    self.pending_state = Some(PeerState::Connected);
                }
            }
            Err(err) => {
                debug!(%err, "cannot key SRTP for a listener");
                self.pending_state = Some(PeerState::Failed);
            }
        }
    }

    fn srtp_contexts(&self, remote: SocketAddr) -> Result<(Outbound, Context), String> {
        let state = self
            .dtls
            .get_connection_state(remote)
            .ok_or("no DTLS association")?;
        let profile = match state.srtp_protection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
                ProtectionProfile::Aes128CmHmacSha1_80
            }
            other => return Err(format!("unexpected SRTP profile {other:?}")),
        };
        let mut config = rtc::srtp::config::Config {
            profile,
            ..Default::default()
        };
        let material = state
            .export_keying_material(LABEL_EXTRACTOR_DTLS_SRTP, &[], config.keying_material_len())
            .map_err(|err| format!("exporting keying material: {err}"))?;
        config
            .set_session_keys_from_keying_material(material.as_ref(), state.is_client())
            .map_err(|err| format!("splitting keying material: {err}"))?;
        let crypto = self.provider.crypto();
        let out = if matches!(profile, ProtectionProfile::AeadAes128Gcm) {
            Outbound::Gcm(
                GcmSealer::new(
                    crypto,
                    &config.keys.local_master_key,
                    &config.keys.local_master_salt,
                )
                .map_err(|err| format!("outbound SRTP seal: {err}"))?,
            )
        } else {
            Outbound::Context(
                Context::new(
                    &config.keys.local_master_key,
                    &config.keys.local_master_salt,
                    profile,
                    None,
                    None,
                    crypto,
                )
                .map_err(|err| format!("outbound SRTP context: {err}"))?,
            )
        };
        let inbound = Context::new(
            &config.keys.remote_master_key,
            &config.keys.remote_master_salt,
            profile,
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
            crypto,
        )
        .map_err(|err| format!("inbound SRTCP context: {err}"))?;
        Ok((out, inbound))
    }

    /// DTLS's datagrams go where media goes (the association's own address until ICE picked).
    fn collect_dtls(&mut self) {
        while let Some(transmit) = self.dtls.poll_transmit() {
            let to = self.selected.unwrap_or(transmit.transport.peer_addr);
            self.queued.push((to, transmit.message));
        }
    }

    /// Moves every queued datagram to `outgoing`.
    pub(crate) fn drain_into(&mut self, outgoing: &mut Vec<(SocketAddr, BytesMut)>) {
        outgoing.append(&mut self.queued);
    }

    /// Drives DTLS retransmissions and consent expiry.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(remote) = self.dtls_remote
            && self.dtls.poll_timeout(&remote).is_some_and(|at| at <= now)
        {
            if let Err(err) = self.dtls.handle_timeout(remote, now) {
                debug!(%err, "listener DTLS handshake gave up");
                self.pending_state = Some(PeerState::Failed);
            }
            self.collect_dtls();
        }
        if self
            .last_consent
            .is_some_and(|at| now >= at + CONSENT_TIMEOUT)
        {
            debug!(ufrag = %self.local_ufrag, "listener consent expired");
            self.pending_state = Some(PeerState::Failed);
        }
    }

    /// The next instant [`Self::handle_timeout`] has work.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let dtls = self
            .dtls_remote
            .and_then(|remote| self.dtls.poll_timeout(&remote));
        let consent = self.last_consent.map(|at| at + CONSENT_TIMEOUT);
        match (dtls, consent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A state change since the last call, if any.
    pub(crate) fn take_state(&mut self) -> Option<PeerState> {
        self.pending_state.take()
    }

    /// Writes one RTP packet of the room's frame for this listener into `packed`, sealed, with
    /// its destination; false (nothing written) before the keys and an address exist, or if
    /// sealing failed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        marker: bool,
        payload_type: u8,
        sequence_number: u16,
        timestamp: u32,
        ssrc: u32,
        payload: &[u8],
        packed: &mut PackedDatagrams,
    ) -> bool {
        let (Some(out), Some(to)) = (self.srtp_out.as_mut(), self.selected) else {
            return false;
        };
        let start = packed.begin();
        let bytes = packed.bytes_mut();
        bytes.push(0x80);
        bytes.push((u8::from(marker) << 7) | (payload_type & 0x7f));
        bytes.extend_from_slice(&sequence_number.to_be_bytes());
        bytes.extend_from_slice(&timestamp.to_be_bytes());
        bytes.extend_from_slice(&ssrc.to_be_bytes());
        bytes.extend_from_slice(payload);
        let sealed = match out {
            Outbound::Gcm(sealer) => sealer.seal(bytes, start).map_err(|e| e.to_string()),
            Outbound::Context(ctx) => match ctx.encrypt_rtp(&bytes[start..]) {
                Ok(sealed) => {
                    bytes.truncate(start);
                    bytes.extend_from_slice(&sealed);
                    Ok(())
                }
                Err(err) => Err(err.to_string()),
            },
        };
        match sealed {
            Ok(()) => {
                packed.commit(to, start);
                true
            }
            Err(err) => {
                packed.abandon(start);
                debug!(%err, "cannot seal a frame for a listener");
                false
            }
        }
    }

    /// Ends the DTLS association (its close_notify is queued).
    pub(crate) fn close(&mut self, now: Instant) {
        if let Some(remote) = self.dtls_remote {
            let _ = self.dtls.stop(now, remote);
            self.collect_dtls();
        }
    }
}

/// The answer to a listener's offer: ICE-lite, one host candidate, `sendonly` Opus.
fn answer_sdp(
    offer: &CheckedOffer,
    local: &ListenerAnswer<'_>,
    fingerprint: &str,
    we_are_client: bool,
) -> String {
    let ip = local.candidate.ip();
    let port = local.candidate.port();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let pt = offer.opus_payload_type;
    let mut sdp = String::with_capacity(1024);
    let mut line = |l: &str| {
        sdp.push_str(l);
        sdp.push_str("\r\n");
    };
    line("v=0");
    line(&format!("o=- {} 2 IN {family} {ip}", local.id));
    line("s=chorus");
    line("t=0 0");
    if offer.bundle
        && let Some(mid) = &offer.mid
    {
        line(&format!("a=group:BUNDLE {mid}"));
    }
    line("a=ice-lite");
    line(&format!("m=audio {port} UDP/TLS/RTP/SAVPF {pt}"));
    line(&format!("c=IN {family} {ip}"));
    if let Some(mid) = &offer.mid {
        line(&format!("a=mid:{mid}"));
    }
    line(&format!("a=ice-ufrag:{}", local.local_ufrag));
    line(&format!("a=ice-pwd:{}", local.local_pwd));
    line(&format!("a=fingerprint:{fingerprint}"));
    line(if we_are_client {
        "a=setup:active"
    } else {
        "a=setup:passive"
    });
    line("a=sendonly");
    line("a=rtcp-mux");
    line(&format!("a=rtpmap:{pt} opus/48000/2"));
    line(&format!("a=fmtp:{pt} minptime=10;useinbandfec=1;usedtx=1"));
    line(&format!("a=msid:chorus-{0} chorus-audio-{0}", local.id));
    line(&format!("a=ssrc:{} cname:chorus-{}", local.ssrc, local.id));
    line(&format!(
        "a=candidate:1 1 udp 2130706431 {ip} {port} typ host"
    ));
    line("a=end-of-candidates");
    sdp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::offer::check_offer;
    use rtc::stun::textattrs::Username;

    const OFFER: &str = "v=0\r\n\
o=- 1 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=fingerprint:sha-256 AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 109\r\n\
c=IN IP4 0.0.0.0\r\n\
a=mid:audio0\r\n\
a=ice-ufrag:them\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwxyz\r\n\
a=setup:actpass\r\n\
a=rtcp-mux\r\n\
a=rtpmap:109 opus/48000/2\r\n\
a=recvonly\r\n";

    fn transport() -> (ListenerTransport, String) {
        let offer = check_offer(OFFER).expect("a good listener offer");
        ListenerTransport::answer(
            &offer,
            &ListenerAnswer {
                local_ufrag: "us",
                local_pwd: "0123456789abcdefghijklmnopqrstuv",
                candidate: "192.0.2.7:4000".parse().expect("an address"),
                ssrc: 1234,
                id: 9,
            },
        )
        .expect("answered")
    }

    fn binding_request(username: &str, password: &str, nominate: bool) -> Vec<u8> {
        let provider = rtc::srtp::crypto::default_provider().expect("provider");
        let mut m = Message::new();
        let mut setters: Vec<Box<dyn rtc::stun::message::Setter>> = vec![
            Box::new(BINDING_REQUEST),
            Box::new(rtc::stun::message::TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, username.to_owned())),
        ];
        if nominate {
            setters.push(Box::new(
                rtc::ice::attributes::use_candidate::UseCandidateAttr,
            ));
        }
        setters.push(Box::new(
            MessageIntegrity::new_short_term_integrity_with_provider(
                password.to_owned(),
                provider.crypto(),
            ),
        ));
        setters.push(Box::new(FINGERPRINT));
        m.build(&setters).expect("built");
        m.raw
    }

    #[test]
    fn the_answer_is_a_sendonly_ice_lite_opus_answer_in_the_offers_terms() {
        let (_, sdp) = transport();
        for line in [
            "a=group:BUNDLE audio0",
            "a=ice-lite",
            "m=audio 4000 UDP/TLS/RTP/SAVPF 109",
            "c=IN IP4 192.0.2.7",
            "a=mid:audio0",
            "a=ice-ufrag:us",
            "a=setup:passive",
            "a=sendonly",
            "a=rtcp-mux",
            "a=rtpmap:109 opus/48000/2",
            "a=fmtp:109 minptime=10;useinbandfec=1;usedtx=1",
            "a=ssrc:1234 cname:chorus-9",
            "a=candidate:1 1 udp 2130706431 192.0.2.7 4000 typ host",
        ] {
            assert!(
                sdp.contains(&format!("{line}\r\n")),
                "{line} missing:\n{sdp}"
            );
        }
        let fingerprint = sdp
            .lines()
            .find_map(|l| l.strip_prefix("a=fingerprint:sha-256 "))
            .expect("a fingerprint");
        assert_eq!(fingerprint.split(':').count(), 32, "{fingerprint}");
        // The answer parses as SDP.
        rtc::peer_connection::sdp::RTCSessionDescription::answer(sdp.clone())
            .expect("an answer")
            .unmarshal()
            .expect("valid SDP");
    }

    #[test]
    fn only_a_binding_request_with_our_credentials_gets_an_answer_and_picks_the_address() {
        let (mut t, _) = transport();
        let from: SocketAddr = "198.51.100.1:5000".parse().expect("an address");
        let mut out = Vec::new();
        let t0 = Instant::now();
        // Wrong password, wrong username: silence, and no address.
        for request in [
            binding_request("us:them", "not the password at all, no", true),
            binding_request("us:someone", "0123456789abcdefghijklmnopqrstuv", true),
        ] {
            t.handle_datagram(t0, from, BytesMut::from(&request[..]));
            t.drain_into(&mut out);
            assert!(out.is_empty());
            assert_eq!(t.selected, None);
        }
        // DTLS from an address ICE has not checked gets nothing back.
        t.handle_datagram(t0, from, BytesMut::from(&[22u8, 254, 253, 0, 0][..]));
        t.drain_into(&mut out);
        assert!(out.is_empty());

        let request = binding_request("us:them", "0123456789abcdefghijklmnopqrstuv", false);
        t.handle_datagram(t0, from, BytesMut::from(&request[..]));
        t.drain_into(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, from);
        let mut response = Message::new();
        response
            .unmarshal_binary(&out[0].1)
            .expect("a STUN message");
        assert_eq!(response.typ, BINDING_SUCCESS);
        let provider = rtc::srtp::crypto::default_provider().expect("provider");
        MessageIntegrity::check(
            &mut response,
            b"0123456789abcdefghijklmnopqrstuv",
            provider.crypto(),
        )
        .expect("signed with our password");
        let mut mapped = XorMappedAddress::default();
        rtc::stun::message::Getter::get_from(&mut mapped, &response).expect("mapped address");
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);
        assert_eq!(t.selected, Some(from));

        // A nomination from another address moves the media there; consent is now timed.
        let other: SocketAddr = "198.51.100.2:6000".parse().expect("an address");
        let request = binding_request("us:them", "0123456789abcdefghijklmnopqrstuv", true);
        t.handle_datagram(t0, other, BytesMut::from(&request[..]));
        assert_eq!(t.selected, Some(other));
        assert_eq!(t.poll_timeout(), Some(t0 + CONSENT_TIMEOUT));
        // Unkeyed, nothing can be sent yet.
        let mut media = PackedDatagrams::default();
        assert!(!t.send(false, 109, 1, 960, 1234, &[0xf8], &mut media));
        assert_eq!(media.len(), 0);
        assert_eq!(media.begin(), 0, "nothing left half-written");
        // Consent runs out.
        t.handle_timeout(t0 + CONSENT_TIMEOUT);
        assert_eq!(t.take_state(), Some(PeerState::Failed));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No datagram, whatever its first byte, panics the listener transport.
        #[test]
        fn arbitrary_datagrams(first in 0u8..=255, rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let offer = crate::endpoint::offer::check_offer(&tests_offer()).expect("offer");
            let (mut t, _) = ListenerTransport::answer(
                &offer,
                &ListenerAnswer {
                    local_ufrag: "us",
                    local_pwd: "0123456789abcdefghijklmnopqrstuv",
                    candidate: "127.0.0.1:4000".parse().expect("an address"),
                    ssrc: 1,
                    id: 1,
                },
            )
            .expect("answered");
            let mut datagram = vec![first];
            datagram.extend(rest);
            let from: SocketAddr = "127.0.0.1:5000".parse().expect("an address");
            t.handle_datagram(Instant::now(), from, BytesMut::from(&datagram[..]));
            t.handle_timeout(Instant::now());
            let mut out = Vec::new();
            t.drain_into(&mut out);
        }
    }

    fn tests_offer() -> String {
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 AB:CD\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=ice-ufrag:them\r\na=ice-pwd:abcdefghijklmnopqrstuvwxyz\r\na=setup:actpass\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=recvonly\r\n".to_owned()
    }
}
