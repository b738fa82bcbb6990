//! One participant's WebRTC session: a sans-IO `rtc` peer connection and what Chorus keeps
//! beside it.
//!
//! The `rtc` crate (webrtc-rs) does ICE, DTLS, SRTP, RTCP and SDP negotiation; it performs no
//! IO and reads no clock. A [`Session`] is driven by the port's single task: it is fed
//! datagrams and timeouts, and [`Session::drain`] collects what the connection wants sent, the
//! audio it received and its state changes.
//!
//! Invariants:
//! - The server is ICE-lite with one host candidate (the port's public address); the
//!   participant's full ICE agent nominates. So every session on a port shares one candidate
//!   and differs by its ICE ufrag, which is random and unique per port.
//! - Outgoing RTP carries this session's own SSRC, a sequence number that increases by one per
//!   frame and a timestamp that increases by the frame's duration; the mixer supplies only the
//!   Opus payload and its duration, shared `Bytes` and all (no copy until SRTP encrypts).
//! - Incoming RTP reaches the inbound queue only if it has the negotiated Opus payload type.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rand::Rng;
use rand::distr::Alphanumeric;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::configure_rtcp_reports;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MediaEngine};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::listener::{ListenerAnswer, ListenerTransport};
use super::offer::{AUDIO_LEVEL_URI, CheckedOffer, check_offer};
use super::packed::PackedDatagrams;
use super::{AudioSink, EndpointError, InboundAudio, PeerState};
use crate::media::AudioLevel;

/// The payload type Chorus prefers for Opus; the offer's own number wins in the answer.
const OPUS_PAYLOAD_TYPE: u8 = 111;
/// Length of the random local ICE ufrag (RFC 8445 asks for at least 4 characters).
const UFRAG_LEN: usize = 16;
/// Length of the random local ICE password (RFC 8445 asks for at least 22 characters).
const ICE_PASSWORD_LEN: usize = 32;

/// Counters a session reports back to the port.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DrainCounts {
    /// Audio frames delivered to the inbound queue.
    pub(crate) inbound_frames: u64,
    /// Audio frames dropped: inbound queue full or closed, or an unexpected payload type.
    pub(crate) inbound_dropped: u64,
}

/// A participant's negotiated session, before the port registers it.
pub(crate) struct Session {
    pub(crate) id: u64,
    /// Our ICE ufrag: the first half of USERNAME in the participant's binding requests.
    pub(crate) local_ufrag: String,
    pub(crate) created: Instant,
    /// When the timer currently registered with the port for this session fires.
    pub(crate) registered_deadline: Option<Instant>,
    /// Remote addresses routed to this session, oldest first.
    pub(crate) remote_addrs: Vec<SocketAddr>,
    connection: Connection,
    ssrc: u32,
    opus_payload_type: u8,
    audio_level_id: Option<u8>,
    next_sequence: u16,
    next_timestamp: u32,
    marker_pending: bool,
    connected_once: bool,
    state: PeerState,
    state_tx: watch::Sender<PeerState>,
    sink: AudioSink,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("local_ufrag", &self.local_ufrag)
            .field("ssrc", &self.ssrc)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// What carries a session: `rtc`'s whole peer connection (participants who talk), or Chorus's
/// own listener transport (receive-only participants, see `listener.rs`).
enum Connection {
    Rtc {
        peer: Box<RTCPeerConnection>,
        sender_id: RTCRtpSenderId,
    },
    Listener(Box<ListenerTransport>),
}

/// The pieces of a new session that go to the [`super::PeerHandle`].
pub(crate) struct SessionChannels {
    pub(crate) state_rx: watch::Receiver<PeerState>,
    /// The session's own queue, when no sink was given.
    pub(crate) inbound_rx: Option<mpsc::Receiver<InboundAudio>>,
}

fn random_ice_string(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn negotiation(context: &str, err: impl std::fmt::Display) -> EndpointError {
    EndpointError::Negotiation(format!("{context}: {err}"))
}

impl Session {
    /// Builds a session answering `offer_sdp`, advertising `candidate_addr` as its only host
    /// candidate. Returns the session, the SDP answer and the handle's channels.
    ///
    /// CPU-bound (certificate generation, SDP); called outside the port's task so a join never
    /// stalls everyone else's audio.
    pub(crate) fn answer(
        id: u64,
        offer_sdp: &str,
        candidate_addr: SocketAddr,
        inbound_queue: usize,
        sink: Option<AudioSink>,
        now: Instant,
    ) -> Result<(Self, String, SessionChannels), EndpointError> {
        let offer = check_offer(offer_sdp)?;
        if offer.receive_only {
            return Self::answer_listener(id, &offer, candidate_addr, inbound_queue, sink, now);
        }

        let opus = RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            // usedtx=1: a participant's silence costs a packet every 400 ms, not every frame.
            sdp_fmtp_line: "minptime=10;useinbandfec=1;usedtx=1".to_owned(),
            rtcp_feedback: vec![],
        };
        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus.clone(),
                    payload_type: OPUS_PAYLOAD_TYPE,
                },
                RtpCodecKind::Audio,
            )
            .map_err(|err| negotiation("registering Opus", err))?;
        media_engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .map_err(|err| negotiation("registering the audio-level extension", err))?;
        let registry = configure_rtcp_reports(Registry::new());

        let local_ufrag = random_ice_string(UFRAG_LEN);
        let settings = SettingEngineBuilder::new()
            .with_lite(true)
            .with_ice_credentials(local_ufrag.clone(), random_ice_string(ICE_PASSWORD_LEN))
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .build();

        let mut connection = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(|err| negotiation("creating the peer connection", err))?;

        let ssrc: u32 = rand::rng().random();
        let track = MediaStreamTrack::new(
            format!("chorus-{id}"),
            format!("chorus-audio-{id}"),
            "chorus mix".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: opus,
                ..Default::default()
            }],
        );
        let sender_id = connection
            .add_track(track)
            .map_err(|err| negotiation("adding the audio track", err))?;

        connection
            .set_remote_description(now, offer.description)
            .map_err(|err| negotiation("applying the offer", err))?;

        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: candidate_addr.ip().to_string(),
                port: candidate_addr.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(|err| negotiation("creating the host candidate", err))?;
        let candidate = RTCIceCandidate::from(&candidate)
            .to_json()
            .map_err(|err| negotiation("encoding the host candidate", err))?;
        connection
            .add_local_candidate(candidate)
            .map_err(|err| negotiation("adding the host candidate", err))?;

        let answer = connection
            .create_answer(None)
            .map_err(|err| negotiation("creating the answer", err))?;
        connection
            .set_local_description(now, answer)
            .map_err(|err| negotiation("applying the answer", err))?;
        let answer_sdp = connection
            .local_description()
            .map(|description| description.sdp)
            .ok_or_else(|| negotiation("reading the answer", "no local description"))?;

        let opus_payload_type = {
            let mut sender = connection
                .rtp_sender(sender_id)
                .ok_or_else(|| negotiation("reading the sender", "sender vanished"))?;
            sender
                .get_parameters()
                .rtp_parameters
                .codecs
                .iter()
                .find(|codec| {
                    codec
                        .rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(MIME_TYPE_OPUS)
                })
                .map(|codec| codec.payload_type)
                .ok_or_else(|| negotiation("negotiating Opus", "no Opus codec in the answer"))?
        };
        let receiver_ids: Vec<_> = connection.get_receivers().collect();
        let audio_level_id = receiver_ids.into_iter().find_map(|receiver_id| {
            let mut receiver = connection.rtp_receiver(receiver_id)?;
            receiver
                .get_parameters()
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|extension| extension.uri == AUDIO_LEVEL_URI)
                .and_then(|extension| u8::try_from(extension.id).ok())
        });

        let connection = Connection::Rtc {
            peer: Box::new(connection),
            sender_id,
        };
        Ok(Self::assemble(
            id,
            local_ufrag,
            connection,
            ssrc,
            opus_payload_type,
            audio_level_id,
            (inbound_queue, sink),
            now,
            answer_sdp,
        ))
    }

    /// A receive-only participant: Chorus's own listener transport answers.
    fn answer_listener(
        id: u64,
        offer: &CheckedOffer,
        candidate_addr: SocketAddr,
        inbound_queue: usize,
        sink: Option<AudioSink>,
        now: Instant,
    ) -> Result<(Self, String, SessionChannels), EndpointError> {
        let local_ufrag = random_ice_string(UFRAG_LEN);
        let local_pwd = random_ice_string(ICE_PASSWORD_LEN);
        let ssrc: u32 = rand::rng().random();
        let (transport, answer_sdp) = ListenerTransport::answer(
            offer,
            &ListenerAnswer {
                local_ufrag: &local_ufrag,
                local_pwd: &local_pwd,
                candidate: candidate_addr,
                ssrc,
                id,
            },
        )?;
        Ok(Self::assemble(
            id,
            local_ufrag,
            Connection::Listener(Box::new(transport)),
            ssrc,
            offer.opus_payload_type,
            None,
            (inbound_queue, sink),
            now,
            answer_sdp,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        id: u64,
        local_ufrag: String,
        connection: Connection,
        ssrc: u32,
        opus_payload_type: u8,
        audio_level_id: Option<u8>,
        (inbound_queue, sink): (usize, Option<AudioSink>),
        now: Instant,
        answer_sdp: String,
    ) -> (Self, String, SessionChannels) {
        let (state_tx, state_rx) = watch::channel(PeerState::Connecting);
        let (sink, inbound_rx) = match sink {
            Some(sink) => (sink, None),
            None => {
                let (queue, rx) = mpsc::channel(inbound_queue.max(1));
                (AudioSink { queue, tag: id }, Some(rx))
            }
        };
        let mut rng = rand::rng();
        let session = Session {
            id,
            local_ufrag,
            created: now,
            registered_deadline: None,
            remote_addrs: Vec::new(),
            connection,
            ssrc,
            opus_payload_type,
            audio_level_id,
            next_sequence: rng.random(),
            next_timestamp: rng.random(),
            marker_pending: true,
            connected_once: false,
            state: PeerState::Connecting,
            state_tx,
            sink,
        };
        (
            session,
            answer_sdp,
            SessionChannels {
                state_rx,
                inbound_rx,
            },
        )
    }

    /// Whether this participant only listens (Chorus's own listener transport carries it).
    pub(crate) fn is_listener(&self) -> bool {
        matches!(self.connection, Connection::Listener(_))
    }

    pub(crate) fn state(&self) -> PeerState {
        self.state
    }

    pub(crate) fn has_connected(&self) -> bool {
        self.connected_once
    }

    /// Feeds one datagram received from `peer_addr`; `local_addr` is the advertised candidate.
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        local_addr: SocketAddr,
        peer_addr: SocketAddr,
        datagram: BytesMut,
    ) {
        let peer = match &mut self.connection {
            Connection::Rtc { peer, .. } => peer,
            Connection::Listener(transport) => {
                transport.handle_datagram(now, peer_addr, datagram);
                return;
            }
        };
        let message = TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: datagram,
        };
        if let Err(err) = peer.handle_read(message) {
            debug!(peer = self.id, %err, "peer connection rejected a datagram");
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        match &mut self.connection {
            Connection::Rtc { peer, .. } => {
                if let Err(err) = peer.handle_timeout(now) {
                    debug!(peer = self.id, %err, "peer connection timer failed");
                }
            }
            Connection::Listener(transport) => transport.handle_timeout(now),
        }
    }

    /// The connection's next timer, if any.
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        match &mut self.connection {
            Connection::Rtc { peer, .. } => peer.poll_timeout(),
            Connection::Listener(transport) => transport.poll_timeout(),
        }
    }

    /// Queues one Opus frame of `samples` 48 kHz samples for sending: a listener's sealed packet
    /// goes straight into `packed`; `rtc`'s peer queues it until [`Self::drain`]. Frames before
    /// the connection is up are dropped (returns `false`): there is nobody to send them to yet.
    pub(crate) fn send_opus(
        &mut self,
        now: Instant,
        payload: &Bytes,
        samples: u32,
        packed: &mut PackedDatagrams,
    ) -> bool {
        if self.state != PeerState::Connected {
            return false;
        }
        let marker = std::mem::take(&mut self.marker_pending);
        let (sequence_number, timestamp) = (self.next_sequence, self.next_timestamp);
        self.next_sequence = self.next_sequence.wrapping_add(1);
        self.next_timestamp = self.next_timestamp.wrapping_add(samples);
        let (peer, sender_id) = match &mut self.connection {
            Connection::Rtc { peer, sender_id } => (peer, *sender_id),
            Connection::Listener(transport) => {
                return transport.send(
                    marker,
                    self.opus_payload_type,
                    sequence_number,
                    timestamp,
                    self.ssrc,
                    payload,
                    packed,
                );
            }
        };
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker,
                payload_type: self.opus_payload_type,
                sequence_number,
                timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload: payload.clone(),
        };
        let Some(mut sender) = peer.rtp_sender(sender_id) else {
            return false;
        };
        match sender.write_rtp(now, packet) {
            Ok(()) => true,
            Err(err) => {
                debug!(peer = self.id, %err, "cannot send an audio frame");
                false
            }
        }
    }

    /// Collects what the connection produced: datagrams to send (appended to `outgoing`),
    /// received audio (to the inbound queue) and state changes (to the state watch).
    pub(crate) fn drain(&mut self, outgoing: &mut Vec<(SocketAddr, BytesMut)>) -> DrainCounts {
        let mut counts = DrainCounts::default();
        let peer = match &mut self.connection {
            Connection::Rtc { peer, .. } => peer,
            Connection::Listener(transport) => {
                transport.drain_into(outgoing);
                if let Some(state) = transport.take_state() {
                    debug!(peer = self.id, ?state, "listener state changed");
                    self.set_state(state);
                }
                return counts;
            }
        };
        let mut received = Vec::new();
        while let Some(TaggedRTCMessage { now, message }) = peer.poll_read() {
            if let RTCMessage::RtpPacket(_track, packet) = message {
                received.push((now, packet));
            }
        }
        let mut states = Vec::new();
        while let Some(event) = peer.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) = event {
                let mapped = match state {
                    RTCPeerConnectionState::Connected => Some(PeerState::Connected),
                    RTCPeerConnectionState::Disconnected => Some(PeerState::Disconnected),
                    RTCPeerConnectionState::Failed => Some(PeerState::Failed),
                    RTCPeerConnectionState::Closed => Some(PeerState::Closed),
                    _ => None,
                };
                if let Some(mapped) = mapped {
                    states.push(mapped);
                }
            }
        }
        while let Some(datagram) = peer.poll_write() {
            outgoing.push((datagram.transport.peer_addr, datagram.message));
        }
        for (now, packet) in received {
            self.deliver(now, packet, &mut counts);
        }
        for state in states {
            debug!(peer = self.id, ?state, "peer state changed");
            self.set_state(state);
        }
        counts
    }

    fn deliver(&mut self, arrival: Instant, packet: rtc::rtp::Packet, counts: &mut DrainCounts) {
        if packet.header.payload_type != self.opus_payload_type {
            counts.inbound_dropped += 1;
            return;
        }
        let level = self.audio_level_id.and_then(|id| {
            let value = packet.header.get_extension(id)?;
            let byte = *value.first()?;
            Some(AudioLevel {
                dbov: byte & 0x7f,
                voice: byte & 0x80 != 0,
            })
        });
        let audio = InboundAudio {
            tag: self.sink.tag,
            seq: packet.header.sequence_number,
            rtp_timestamp: packet.header.timestamp,
            payload: packet.payload,
            level,
            arrival,
        };
        match self.sink.queue.try_send(audio) {
            Ok(()) => counts.inbound_frames += 1,
            Err(_) => counts.inbound_dropped += 1,
        }
    }

    /// Records a state change; terminal states stick. Live states are published at once;
    /// terminal ones by [`Session::close`], once the port has forgotten the session.
    fn set_state(&mut self, state: PeerState) {
        if self.state.is_terminal() {
            return;
        }
        if state == PeerState::Connected {
            self.connected_once = true;
        }
        self.state = state;
        if !state.is_terminal() {
            self.state_tx.send_replace(state);
        }
    }

    /// Closes the connection (its DTLS close_notify lands in `outgoing`) and publishes the
    /// final state: the one the connection reached by itself, else `state`.
    pub(crate) fn close(&mut self, outgoing: &mut Vec<(SocketAddr, BytesMut)>, state: PeerState) {
        match &mut self.connection {
            Connection::Rtc { peer, .. } => {
                if let Err(err) = peer.close() {
                    debug!(peer = self.id, %err, "closing the peer connection failed");
                }
                while let Some(datagram) = peer.poll_write() {
                    outgoing.push((datagram.transport.peer_addr, datagram.message));
                }
            }
            Connection::Listener(transport) => {
                transport.close(Instant::now());
                transport.drain_into(outgoing);
            }
        }
        self.set_state(state);
        self.state_tx.send_replace(self.state);
    }
}
