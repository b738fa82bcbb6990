//! The edge bridge's room side: an answered phone joins its (remote) room as an ordinary WebRTC
//! participant, through the same join API a browser uses, with the job's join token.
//!
//! Built on the async `webrtc` crate (webrtc-rs). The peer connection offers one sendrecv Opus
//! track with the RFC 6464 audio-level extension, gathers its host candidates on one UDP socket,
//! and connects out to the server's media port: ICE, DTLS and SRTP are the encryption of the
//! patent's "encrypted connection to the conference server".
//!
//! Media, both ways through the phone leg of [`crate::telephony::leg`], which transcodes here on
//! the bridge:
//! - phone → room: the leg turns each phone packet into an Opus frame with its level (G.711 is
//!   re-encoded, Opus passes through) and queues it; a pump writes it to the track as RTP with the
//!   level in the extension, so the server ranks the phone like anyone else;
//! - room → phone: each RTP packet of the server's track (the phone's own mix) goes to the leg,
//!   which decodes and G.711-encodes it for the phone.
//!
//! Invariants: the peer connection, its pumps and the leg end together on [`CallRoom::leave`];
//! a connection that fails mid-call cancels the call's `lost` token, so the phone is hung up
//! with `conference_lost` rather than left talking to nobody.

use std::future::Future;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use crate::endpoint::{AudioSink, InboundAudio};
use crate::room::core::ParticipantId;
use crate::room::transport::Transport;
use crate::telephony::TelephonyError;
use crate::telephony::call_task::CallRoom;
use crate::telephony::leg::{LegEvent, LegParams, PhoneLeg, PhoneTransport};
use crate::telephony::metrics::TelephonyMetrics;

/// The RFC 6464 client-to-mixer audio level extension.
const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// ICE gathering, the join request, and ICE + DTLS each get this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Opus frames from the phone waiting for the track.
const UPSTREAM_QUEUE: usize = 64;
/// Samples of a 20 ms frame at 48 kHz, when a packet's own count cannot be read.
const DEFAULT_SAMPLES: u32 = 960;

/// Where the bridge's sockets for a call live.
#[derive(Debug, Clone)]
pub struct MediaAddresses {
    /// The address RTP sockets bind (and WebRTC gathers on).
    pub bind: IpAddr,
    /// The address the phone is told to send RTP to (the bridge's address inside the network).
    pub advertised: IpAddr,
    /// Ports phone RTP sockets may use (`None`: any free port).
    pub rtp_ports: Option<RangeInclusive<u16>>,
}

/// A room of the conference, reached over HTTP and WebRTC.
#[derive(Debug)]
pub struct EdgeRoom {
    /// The server's base URL.
    pub base: reqwest::Url,
    /// The HTTP client (with the server's CA, when it has its own).
    pub http: reqwest::Client,
    /// The room.
    pub room: String,
    /// The job's join token for the phone's participant.
    pub join_token: String,
    /// Socket addresses.
    pub addresses: MediaAddresses,
    /// Metrics of the phone leg.
    pub metrics: TelephonyMetrics,
    /// Cancelled when the room connection fails mid-call.
    pub lost: CancellationToken,
    session: Mutex<Option<Session>>,
}

struct Session {
    peer: Arc<dyn PeerConnection>,
    participant_url: reqwest::Url,
    transport: Arc<PhoneTransport>,
    tasks: Vec<JoinHandle<()>>,
    /// Holds the tasks forwarding the server's tracks (they start whenever a track arrives).
    events: Arc<Events>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("participant_url", &self.participant_url.as_str())
            .finish_non_exhaustive()
    }
}

impl EdgeRoom {
    /// A room side for one job.
    pub fn new(
        base: reqwest::Url,
        http: reqwest::Client,
        room: String,
        join_token: String,
        addresses: MediaAddresses,
        metrics: TelephonyMetrics,
        lost: CancellationToken,
    ) -> Self {
        Self {
            base,
            http,
            room,
            join_token,
            addresses,
            metrics,
            lost,
            session: Mutex::new(None),
        }
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session
            .lock()
            .expect("session lock is never poisoned: nothing panics while holding it")
    }

    /// A UDP socket for the phone's RTP, in the configured port range.
    async fn rtp_socket(&self) -> Result<UdpSocket, TelephonyError> {
        let ip = self.addresses.bind;
        match &self.addresses.rtp_ports {
            None => UdpSocket::bind((ip, 0))
                .await
                .map_err(|e| TelephonyError::Socket(format!("RTP socket on {ip}: {e}"))),
            Some(range) => {
                // A random start spreads calls over the range; each port is tried once.
                let len = u32::from(*range.end() - *range.start()) + 1;
                let first = rand::random::<u32>() % len;
                for i in 0..len {
                    let port = *range.start() + u16::try_from((first + i) % len).unwrap_or(0);
                    if let Ok(socket) = UdpSocket::bind((ip, port)).await {
                        return Ok(socket);
                    }
                }
                Err(TelephonyError::Socket(format!(
                    "no free RTP port in {}-{} on {ip}",
                    range.start(),
                    range.end()
                )))
            }
        }
    }

    async fn connect(
        &self,
        leg: PhoneLeg,
        params: LegParams,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> Result<(Session, ParticipantId), TelephonyError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| TelephonyError::Edge(format!("{what}: {e}"));
        let remote = params
            .answer
            .as_ref()
            .map(|a| a.remote)
            .ok_or_else(|| TelephonyError::Sip("no answer".to_owned()))?;
        let route = leg.route(remote).await?;
        let (queue, mut upstream) = mpsc::channel::<InboundAudio>(UPSTREAM_QUEUE);
        let transport = Arc::new(leg.connect(
            params,
            route,
            AudioSink { queue, tag: 0 },
            events,
            self.metrics.clone(),
        )?);

        let opus = RTCRtpCodec {
            mime_type: "audio/opus".to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        };
        let mut engine = MediaEngine::default();
        engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus.clone(),
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )
            .map_err(|e| fail("Opus codec", &e))?;
        engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .map_err(|e| fail("audio level extension", &e))?;
        let (gathered_tx, mut gathered) = watch::channel(false);
        let (state_tx, mut state) = watch::channel(RTCPeerConnectionState::New);
        let handler = Events {
            gathered: gathered_tx,
            state: state_tx,
            transport: transport.clone(),
            tracks: Mutex::new(Vec::new()),
        };
        let handler = Arc::new(handler);
        // No mDNS: it would bind the multicast port 5353, a listening socket the bridge does
        // not need (the server's candidates are plain addresses).
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .build();
        let peer = PeerConnectionBuilder::new()
            .with_setting_engine(settings)
            .with_media_engine(engine)
            .with_handler(handler.clone())
            .with_udp_addrs(vec![format!("{}:0", self.addresses.bind)])
            .build()
            .await
            .map_err(|e| fail("peer connection", &e))?;
        let peer: Arc<dyn PeerConnection> = Arc::new(peer);
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "chorus-edge".to_owned(),
            "chorus-edge-phone".to_owned(),
            "phone".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(rand::random::<u32>()),
                    ..Default::default()
                },
                codec: opus,
                ..Default::default()
            }],
        )));
        let sender = peer
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| fail("audio track", &e))?;
        let joined = async {
            let offer = peer
                .create_offer(None)
                .await
                .map_err(|e| fail("offer", &e))?;
            peer.set_local_description(offer)
                .await
                .map_err(|e| fail("offer", &e))?;
            tokio::time::timeout(CONNECT_TIMEOUT, gathered.wait_for(|done| *done))
                .await
                .map_err(|_| TelephonyError::Edge("ICE gathering did not finish".to_owned()))?
                .map_err(|_| TelephonyError::Edge("ICE gathering was abandoned".to_owned()))?;
            let offer = peer
                .local_description()
                .await
                .ok_or_else(|| TelephonyError::Edge("no local description".to_owned()))?
                .sdp;
            let (answer, participant_url, participant) = self.post_offer(offer).await?;
            let answer = RTCSessionDescription::answer(answer)
                .map_err(|e| fail("the server's answer", &e))?;
            peer.set_remote_description(answer)
                .await
                .map_err(|e| fail("the server's answer", &e))?;
            let reached = tokio::time::timeout(
                CONNECT_TIMEOUT,
                state.wait_for(|s| {
                    matches!(
                        s,
                        RTCPeerConnectionState::Connected
                            | RTCPeerConnectionState::Failed
                            | RTCPeerConnectionState::Closed
                    )
                }),
            )
            .await
            .map_err(|_| TelephonyError::Edge("the WebRTC connection did not come up".to_owned()))?
            .map(|s| *s)
            .map_err(|_| TelephonyError::Edge("the WebRTC connection was dropped".to_owned()))?;
            if reached != RTCPeerConnectionState::Connected {
                return Err(TelephonyError::Edge(format!(
                    "the WebRTC connection ended as {reached} before it was up"
                )));
            }
            Ok((participant_url, participant))
        };
        let (participant_url, participant) = match joined.await {
            Ok(joined) => joined,
            Err(e) => {
                let _ = peer.close().await;
                transport.close();
                return Err(e);
            }
        };

        let mut tasks = Vec::new();
        // Phone → room: the leg's Opus frames, written to the track with their level.
        tasks.push(tokio::spawn(async move {
            let payload_type = match sender.get_parameters().await {
                Ok(p) => p
                    .rtp_parameters
                    .codecs
                    .first()
                    .map_or(111, |c| c.payload_type),
                Err(_) => 111,
            };
            let Some(ssrc) = track.track().await.ssrcs().next() else {
                tracing::warn!("the edge track has no SSRC; the phone is not heard");
                return;
            };
            let mut first = true;
            while let Some(audio) = upstream.recv().await {
                let packet = rtc::rtp::Packet {
                    header: rtc::rtp::header::Header {
                        version: 2,
                        marker: std::mem::take(&mut first),
                        payload_type,
                        sequence_number: audio.seq,
                        timestamp: audio.rtp_timestamp,
                        ssrc,
                        ..Default::default()
                    },
                    payload: audio.payload,
                };
                let extensions: Vec<HeaderExtension> = audio
                    .level
                    .map(|l| {
                        HeaderExtension::AudioLevel(AudioLevelExtension {
                            level: l.dbov,
                            voice: l.voice,
                        })
                    })
                    .into_iter()
                    .collect();
                if track
                    .write_rtp_with_extensions(packet, &extensions)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
        // A connection that fails after it was up: the conference is gone for this call.
        let lost = self.lost.clone();
        tasks.push(tokio::spawn(async move {
            let _ = state
                .wait_for(|s| {
                    matches!(
                        s,
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                    )
                })
                .await;
            lost.cancel();
        }));
        Ok((
            Session {
                peer,
                participant_url,
                transport,
                tasks,
                events: handler,
            },
            participant,
        ))
    }

    /// `POST {base}/v1/rooms/{room}/participants` with the offer: the answer, the participant's
    /// URL and its id.
    async fn post_offer(
        &self,
        offer: String,
    ) -> Result<(String, reqwest::Url, ParticipantId), TelephonyError> {
        let url = self
            .base
            .join(&format!("/v1/rooms/{}/participants", self.room))
            .map_err(|e| TelephonyError::Edge(format!("join URL: {e}")))?;
        let response = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.http
                .post(url.clone())
                .bearer_auth(&self.join_token)
                .header(reqwest::header::CONTENT_TYPE, "application/sdp")
                .body(offer)
                .send(),
        )
        .await
        .map_err(|_| TelephonyError::Edge("the join request timed out".to_owned()))?
        .map_err(|e| TelephonyError::Edge(format!("the join request failed: {e}")))?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.text().await.unwrap_or_default();
        if status != reqwest::StatusCode::CREATED {
            return Err(TelephonyError::Edge(format!(
                "the room refused the phone ({status}): {}",
                body.trim()
            )));
        }
        let location = location
            .ok_or_else(|| TelephonyError::Edge("the join answer has no Location".to_owned()))?;
        let participant_url = url
            .join(&location)
            .map_err(|e| TelephonyError::Edge(format!("bad Location {location:?}: {e}")))?;
        let participant = location
            .rsplit('/')
            .next()
            .and_then(|id| id.parse::<ParticipantId>().ok())
            .ok_or_else(|| TelephonyError::Edge(format!("bad Location {location:?}")))?;
        Ok((body, participant_url, participant))
    }
}

impl CallRoom for EdgeRoom {
    async fn new_leg(&self) -> Result<PhoneLeg, TelephonyError> {
        PhoneLeg::on_socket(self.rtp_socket().await?, self.addresses.advertised)
    }

    fn owner_present(&self) -> bool {
        // The server follows the owner and sends a hang-up when it leaves.
        true
    }

    async fn join(
        &self,
        leg: PhoneLeg,
        params: LegParams,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> Result<ParticipantId, TelephonyError> {
        let (session, participant) = self.connect(leg, params, events).await?;
        *self.session() = Some(session);
        Ok(participant)
    }

    async fn leave(&self, _phone: ParticipantId) {
        let Some(session) = self.session().take() else {
            return;
        };
        for task in session.tasks.iter().chain(&session.events.take_tracks()) {
            task.abort();
        }
        session.transport.close();
        // Leave politely; a server that is gone is left by closing the connection anyway.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.http
                .delete(session.participant_url.clone())
                .bearer_auth(&self.join_token)
                .send(),
        )
        .await;
        let _ = session.peer.close().await;
    }
}

/// The peer connection's events: gathering, state, and the server's track.
struct Events {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    transport: Arc<PhoneTransport>,
    tracks: Mutex<Vec<JoinHandle<()>>>,
}

impl Events {
    fn take_tracks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(
            &mut *self
                .tracks
                .lock()
                .expect("tracks lock is never poisoned: nothing panics while holding it"),
        )
    }
}

type EventFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl PeerConnectionEventHandler for Events {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if state == RTCIceGatheringState::Complete {
                self.gathered.send_replace(true);
            }
        })
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.state.send_replace(state);
        })
    }

    fn on_track<'life0, 'async_trait>(
        &'life0 self,
        track: Arc<dyn TrackRemote>,
    ) -> EventFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let transport = self.transport.clone();
        let task = tokio::spawn(forward_room_audio(track, transport));
        if let Ok(mut tracks) = self.tracks.lock() {
            tracks.push(task);
        }
        Box::pin(async {})
    }
}

/// Room → phone: every RTP packet of the server's track goes to the leg.
async fn forward_room_audio(track: Arc<dyn TrackRemote>, transport: Arc<PhoneTransport>) {
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            continue;
        };
        if packet.payload.is_empty() {
            continue;
        }
        let samples = opus::packet::get_nb_samples(&packet.payload, 48_000)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_SAMPLES);
        let payload: Bytes = packet.payload;
        // A full queue drops the frame: the phone's jitter buffer conceals it.
        let _ = transport.send_opus(payload, samples);
    }
}
