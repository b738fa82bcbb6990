//! End-to-end tests of the WebRTC shell (`chorus_mediaserver::endpoint`) over loopback.
//!
//! Real peers: each client is an async `webrtc` 0.21 peer connection (webrtc-rs), sending a
//! tone encoded with libopus and decoding what it receives with libopus. Both clients talk to
//! the SAME server UDP port. The test stands in for the mixer with a plain relay: each peer's
//! inbound Opus frames go to the other peer's outbound.
//!
//! (The bot in `chorus-tests` cannot be used here: that crate depends on this one.)
// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::f32::consts::TAU;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chorus_mediaserver::endpoint::{
    EndpointError, InboundAudio, MediaPort, PeerHandle, PeerSender, PeerState, PortConfig,
    PortStats,
};
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
};

const SAMPLE_RATE: u32 = 48_000;
/// 20 ms at 48 kHz.
const FRAME_SAMPLES: usize = 960;
const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

// ---------------------------------------------------------------------------------------------
// Signal helpers

/// One 20 ms frame of a sine tone; `phase` carries over between frames.
fn tone_frame(hz: f32, dbfs: f32, phase: &mut f32) -> Vec<i16> {
    let amplitude = 32767.0 * 10f32.powf(dbfs / 20.0);
    let step = TAU * hz / SAMPLE_RATE as f32;
    (0..FRAME_SAMPLES)
        .map(|_| {
            let sample = amplitude * phase.sin();
            *phase = (*phase + step) % TAU;
            sample as i16
        })
        .collect()
}

/// RFC 6464 level of a frame: -dBov, 0 (loudest) ..= 127 (silence).
fn level_dbov(samples: &[i16]) -> u8 {
    let mean_square = samples
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / samples.len() as f64;
    let rms = mean_square.sqrt() / 32768.0;
    if rms <= 0.0 {
        return 127;
    }
    (-20.0 * rms.log10()).round().clamp(0.0, 127.0) as u8
}

/// Amplitude of the `hz` component of `samples` (Goertzel), in sample units.
fn goertzel_amplitude(samples: &[i16], hz: f32) -> f32 {
    let n = samples.len() as f32;
    let coefficient = 2.0 * (TAU * hz / SAMPLE_RATE as f32).cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &sample in samples {
        let s0 = f32::from(sample) + coefficient * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coefficient * s1 * s2;
    2.0 * power.max(0.0).sqrt() / n
}

// ---------------------------------------------------------------------------------------------
// A minimal WebRTC client on the async `webrtc` crate

/// The client's event handler. The trait is declared with `async_trait`; the methods below are
/// that macro's expansion written out, so this test needs no extra dependency.
struct ClientEvents {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    received: Arc<Mutex<Vec<i16>>>,
}

impl PeerConnectionEventHandler for ClientEvents {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
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
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
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
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let received = Arc::clone(&self.received);
        Box::pin(async move {
            tokio::spawn(decode_track(track, received));
        })
    }
}

/// Decodes every Opus packet of `track` with libopus into `received`.
async fn decode_track(track: Arc<dyn TrackRemote>, received: Arc<Mutex<Vec<i16>>>) {
    let mut decoder = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).unwrap();
    let mut pcm = vec![0i16; FRAME_SAMPLES * 6];
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
            if packet.payload.is_empty() {
                continue;
            }
            if let Ok(decoded) = decoder.decode(&packet.payload, &mut pcm, false) {
                received.lock().unwrap().extend_from_slice(&pcm[..decoded]);
            }
        }
    }
}

struct TestClient {
    peer_connection: Arc<dyn PeerConnection>,
    received: Arc<Mutex<Vec<i16>>>,
    state: watch::Receiver<RTCPeerConnectionState>,
    gathered: watch::Receiver<bool>,
    sender: Option<tokio::task::JoinHandle<()>>,
}

impl TestClient {
    /// A client with one sendrecv Opus track and the audio-level extension, ready to offer.
    async fn new() -> (Self, Arc<TrackLocalStaticRTP>) {
        let (client, track) = Self::build(false).await;
        (client, track.expect("a talking client has a track"))
    }

    /// A client that only listens: one recvonly audio transceiver, no track.
    async fn listener() -> Self {
        Self::build(true).await.0
    }

    async fn build(listen_only: bool) -> (Self, Option<Arc<TrackLocalStaticRTP>>) {
        let opus = RTCRtpCodec {
            mime_type: "audio/opus".to_owned(),
            clock_rate: SAMPLE_RATE,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        };
        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus.clone(),
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )
            .unwrap();
        media_engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .unwrap();
        let (gathered_tx, gathered) = watch::channel(false);
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let received = Arc::new(Mutex::new(Vec::new()));
        let events = ClientEvents {
            gathered: gathered_tx,
            state: state_tx,
            received: Arc::clone(&received),
        };
        let peer_connection = PeerConnectionBuilder::new()
            .with_media_engine(media_engine)
            .with_handler(Arc::new(events))
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await
            .unwrap();
        let peer_connection: Arc<dyn PeerConnection> = Arc::new(peer_connection);
        if listen_only {
            peer_connection
                .add_transceiver_from_kind(
                    RtpCodecKind::Audio,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Recvonly,
                        streams: vec![],
                        send_encodings: vec![],
                    }),
                )
                .await
                .unwrap();
            let client = TestClient {
                peer_connection,
                received,
                state,
                gathered,
                sender: None,
            };
            return (client, None);
        }
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "test-stream".to_owned(),
            "test-audio".to_owned(),
            "test audio".to_owned(),
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
        peer_connection
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        let client = TestClient {
            peer_connection,
            received,
            state,
            gathered,
            sender: None,
        };
        (client, Some(track))
    }

    /// Creates the offer and waits for ICE gathering (no trickle).
    async fn offer(&mut self) -> String {
        let offer = self.peer_connection.create_offer(None).await.unwrap();
        self.peer_connection
            .set_local_description(offer)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.gathered.wait_for(|done| *done))
            .await
            .expect("ICE gathering did not complete in 5 s")
            .unwrap();
        self.peer_connection
            .local_description()
            .await
            .expect("local description")
            .sdp
    }

    /// Joins `port` and starts sending a `hz` tone at `dbfs`, with its RFC 6464 level.
    /// Returns the client, the server's handle and the SDP answer.
    async fn join(port: &MediaPort, hz: f32, dbfs: f32) -> (Self, PeerHandle, String) {
        let (mut client, track) = Self::new().await;
        let offer = client.offer().await;
        let (handle, answer) = client.connect(port, &offer).await;
        client.sender = Some(tokio::spawn(send_tone(
            Arc::clone(&client.peer_connection),
            track,
            hz,
            dbfs,
        )));
        (client, handle, answer)
    }

    /// Joins `port` as a receive-only listener. Returns the client, the server's handle and
    /// the SDP answer.
    async fn join_listener(port: &MediaPort) -> (Self, PeerHandle, String) {
        let mut client = Self::listener().await;
        let offer = client.offer().await;
        assert!(
            offer.contains("a=recvonly"),
            "a listener's offer is recvonly:\n{offer}"
        );
        let (handle, answer) = client.connect(port, &offer).await;
        (client, handle, answer)
    }

    /// Hands `offer` to `port`, applies the answer and waits until both sides are connected.
    /// Returns the server's handle and the answer.
    async fn connect(&mut self, port: &MediaPort, offer: &str) -> (PeerHandle, String) {
        let (answer, mut handle) = port.accept(offer).await.expect("accept offer");
        self.peer_connection
            .set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap())
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            self.state
                .wait_for(|state| *state == RTCPeerConnectionState::Connected),
        )
        .await
        .expect("client did not connect in 10 s")
        .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), handle.wait_connected())
                .await
                .expect("server side did not connect in 5 s"),
            "server side of the peer failed"
        );
        (handle, answer)
    }

    /// The last `duration` of decoded audio.
    fn last(&self, duration: Duration) -> Vec<i16> {
        let samples = self.received.lock().unwrap();
        let wanted = (duration.as_secs_f32() * SAMPLE_RATE as f32) as usize;
        samples[samples.len().saturating_sub(wanted)..].to_vec()
    }

    fn received_len(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    async fn close(self) {
        if let Some(sender) = self.sender {
            sender.abort();
        }
        let _ = self.peer_connection.close().await;
    }
}

/// Sends a tone, 20 ms Opus frames paced in real time, each with its RFC 6464 level.
async fn send_tone(
    peer_connection: Arc<dyn PeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    hz: f32,
    dbfs: f32,
) {
    let sender = peer_connection
        .get_senders()
        .await
        .into_iter()
        .next()
        .expect("the client has a sender");
    let payload_type = sender
        .get_parameters()
        .await
        .unwrap()
        .rtp_parameters
        .codecs
        .first()
        .expect("negotiated codec")
        .payload_type;
    let ssrc = track.track().await.ssrcs().next().expect("ssrc");
    let mut encoder =
        opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut phase = 0.0f32;
    let mut sequence_number: u16 = rand::random();
    let mut timestamp: u32 = rand::random();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        ticker.tick().await;
        let frame = tone_frame(hz, dbfs, &mut phase);
        let level = level_dbov(&frame);
        let payload = encoder.encode_vec(&frame, 1500).unwrap();
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type,
                sequence_number,
                timestamp,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::from(payload),
        };
        sequence_number = sequence_number.wrapping_add(1);
        timestamp = timestamp.wrapping_add(FRAME_SAMPLES as u32);
        let extension = HeaderExtension::AudioLevel(AudioLevelExtension { level, voice: true });
        if track
            .write_rtp_with_extensions(packet, &[extension])
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The RFC 6464 levels of the frames a relay forwarded.
type RelayedLevels = Arc<Mutex<Vec<Option<chorus_mediaserver::media::AudioLevel>>>>;

/// The mixer's stand-in: forwards every frame `from` receives to `to`, recording the levels.
fn relay(
    mut from: tokio::sync::mpsc::Receiver<InboundAudio>,
    to: PeerSender,
    levels: RelayedLevels,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(audio) = from.recv().await {
            levels.lock().unwrap().push(audio.level);
            let _ = to.send_opus(audio.payload, FRAME_SAMPLES as u32);
        }
    })
}

fn start_port(config: impl FnOnce(&mut PortConfig)) -> (MediaPort, CancellationToken) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = UdpSocket::from_std(socket).unwrap();
    let mut port_config = PortConfig::new("127.0.0.1".parse().unwrap());
    config(&mut port_config);
    let shutdown = CancellationToken::new();
    let port = MediaPort::start_with(socket, port_config, shutdown.clone()).unwrap();
    (port, shutdown)
}

/// The `a=ice-ufrag` of an SDP.
fn ice_ufrag(sdp: &str) -> String {
    sdp.lines()
        .find_map(|line| line.trim().strip_prefix("a=ice-ufrag:"))
        .expect("a=ice-ufrag in the answer")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_port_hear_each_other_and_not_themselves() {
    let (port, shutdown) = start_port(|_| {});
    let server_port = port.local_addr().port();

    let (alice, alice_handle, alice_answer) = TestClient::join(&port, 440.0, -12.0).await;
    let (bob, bob_handle, bob_answer) = TestClient::join(&port, 1000.0, -20.0).await;
    for answer in [&alice_answer, &bob_answer] {
        assert!(
            answer.contains(&format!("127.0.0.1 {server_port} typ host")),
            "the answer advertises the shared port's host candidate:\n{answer}"
        );
        assert!(answer.contains("a=ice-lite"), "the server is ICE-lite");
        assert!(answer.contains(AUDIO_LEVEL_URI), "audio level negotiated");
    }
    assert_eq!(port.stats().peers, 2);

    let alice_levels = Arc::new(Mutex::new(Vec::new()));
    let bob_levels = Arc::new(Mutex::new(Vec::new()));
    let PeerHandle {
        id: alice_id,
        inbound: alice_inbound,
        outbound: alice_outbound,
        state: mut alice_state,
    } = alice_handle;
    let PeerHandle {
        inbound: bob_inbound,
        outbound: bob_outbound,
        ..
    } = bob_handle;
    let relays = [
        relay(alice_inbound, bob_outbound, Arc::clone(&alice_levels)),
        relay(bob_inbound, alice_outbound.clone(), Arc::clone(&bob_levels)),
    ];

    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Each client hears the other's tone, and not its own.
    for (name, client, theirs, own) in [
        ("alice", &alice, 1000.0, 440.0),
        ("bob", &bob, 440.0, 1000.0),
    ] {
        let audio = client.last(Duration::from_secs(1));
        assert!(
            audio.len() >= SAMPLE_RATE as usize * 9 / 10,
            "{name} decoded only {} samples in the last second",
            audio.len()
        );
        let heard = goertzel_amplitude(&audio, theirs);
        let leaked = goertzel_amplitude(&audio, own);
        println!("{name}: {theirs} Hz amplitude {heard:.0}, own {own} Hz amplitude {leaked:.0}");
        assert!(
            heard > 1000.0,
            "{name} should hear the {theirs} Hz tone (amplitude {heard})"
        );
        assert!(
            leaked < heard / 20.0,
            "{name} should not hear its own {own} Hz tone ({leaked} vs {heard})"
        );
    }

    // RFC 6464 levels arrive in InboundAudio: -12 dBFS sine = -15 dBov, -20 dBFS = -23 dBov.
    for (name, levels, expected) in [("alice", &alice_levels, 15u8), ("bob", &bob_levels, 23u8)] {
        let levels = levels.lock().unwrap();
        assert!(
            levels.len() > 50,
            "{name}: only {} frames relayed",
            levels.len()
        );
        assert!(
            levels
                .iter()
                .all(|level| matches!(level, Some(l) if l.voice && l.dbov.abs_diff(expected) <= 1)),
            "{name}: levels should all be ({expected}, voice): {:?}",
            &levels[..levels.len().min(10)]
        );
    }

    let stats = port.stats();
    println!("{stats:?}");
    assert!(stats.inbound_frames > 100 && stats.outbound_frames > 100);
    assert_eq!(stats.dropped_malformed, 0);

    // Closing one participant removes it and leaves the other.
    port.close_peer(alice_id);
    tokio::time::timeout(
        Duration::from_secs(2),
        alice_state.wait_for(|s| *s == PeerState::Closed),
    )
    .await
    .expect("alice closed")
    .unwrap();
    assert_eq!(port.stats().peers, 1);
    assert!(matches!(
        alice_outbound.send_opus(Bytes::from_static(&[0xf8]), 960),
        Ok(()) | Err(EndpointError::SendQueueFull)
    ));

    shutdown.cancel();
    for relay in relays {
        relay.abort();
    }
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_only_client_is_carried_by_the_listener_transport_and_hears_the_talker() {
    let (port, shutdown) = start_port(|_| {});
    let server_port = port.local_addr().port();
    let (talker, talker_handle, _) = TestClient::join(&port, 440.0, -12.0).await;
    let (listener, listener_handle, answer) = TestClient::join_listener(&port).await;
    assert!(answer.contains("a=ice-lite"), "{answer}");
    assert!(answer.contains("a=sendonly"), "{answer}");
    assert!(answer.contains("a=setup:passive"), "{answer}");
    assert!(answer.contains("usedtx=1"), "{answer}");
    assert!(
        answer.contains(&format!("127.0.0.1 {server_port} typ host")),
        "{answer}"
    );
    let stats = port.stats();
    assert_eq!((stats.peers, stats.listeners), (2, 1), "{stats:?}");

    // The talker's frames go to the listener, sealed by Chorus's own SRTP context.
    let relay = relay(
        talker_handle.inbound,
        listener_handle.outbound.clone(),
        Arc::new(Mutex::new(Vec::new())),
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let audio = listener.last(Duration::from_secs(1));
    assert!(
        audio.len() >= SAMPLE_RATE as usize * 9 / 10,
        "the listener decoded only {} samples in the last second",
        audio.len()
    );
    let heard = goertzel_amplitude(&audio, 440.0);
    let other = goertzel_amplitude(&audio, 1000.0);
    println!("listener: 440 Hz amplitude {heard:.0}, 1000 Hz {other:.0}");
    assert!(heard > 1000.0, "the listener should hear 440 Hz ({heard})");
    assert!(other < heard / 20.0, "and nothing at 1000 Hz ({other})");

    // Closing the listener removes it from the port and the listener count.
    let mut state = listener_handle.state.clone();
    port.close_peer(listener_handle.id);
    tokio::time::timeout(
        Duration::from_secs(2),
        state.wait_for(|s| *s == PeerState::Closed),
    )
    .await
    .expect("listener closed")
    .unwrap();
    let stats = port.stats();
    assert_eq!((stats.peers, stats.listeners), (1, 0), "{stats:?}");

    relay.abort();
    shutdown.cancel();
    talker.close().await;
    listener.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_is_counted_and_does_not_disturb_a_peer() {
    let (port, shutdown) = start_port(|_| {});
    let (client, handle, answer) = TestClient::join(&port, 300.0, -30.0).await;

    // The server sends the client a 700 Hz tone.
    // Sent through the fan-out path, as a mixer sends its shared mix to all listeners.
    let port = Arc::new(port);
    let fan_out = Arc::clone(&port);
    let listeners: Arc<[u64]> = Arc::from([handle.id]);
    let tone = tokio::spawn(async move {
        let mut encoder =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Audio)
                .unwrap();
        let mut phase = 0.0;
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        loop {
            ticker.tick().await;
            let frame = tone_frame(700.0, -10.0, &mut phase);
            let payload = Bytes::from(encoder.encode_vec(&frame, 1500).unwrap());
            let _ = fan_out.send_opus_to_all(Arc::clone(&listeners), payload, FRAME_SAMPLES as u32);
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = port.stats();
    let received_before = client.received_len();
    assert!(goertzel_amplitude(&client.last(Duration::from_millis(500)), 700.0) > 2000.0);

    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target: SocketAddr = port.local_addr();
    let mut binding_request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    binding_request.extend_from_slice(&[9; 12]);
    // A binding request with the real server ufrag but a forged MESSAGE-INTEGRITY.
    let username = format!("{}:evil", ice_ufrag(&answer));
    let mut forged = binding_request.clone();
    let mut attributes = Vec::new();
    attributes.extend_from_slice(&0x0006u16.to_be_bytes());
    attributes.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attributes.extend_from_slice(username.as_bytes());
    while !attributes.len().is_multiple_of(4) {
        attributes.push(0);
    }
    attributes.extend_from_slice(&0x0008u16.to_be_bytes());
    attributes.extend_from_slice(&20u16.to_be_bytes());
    attributes.extend_from_slice(&[0xab; 20]);
    forged[2..4].copy_from_slice(&(attributes.len() as u16).to_be_bytes());
    forged.extend_from_slice(&attributes);
    let random: Vec<u8> = (0..200).map(|_| rand::random::<u8>() | 0xc0).collect();
    let rtp_looking = [
        0x80, 111, 0x12, 0x34, 0, 0, 0x10, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8,
    ];
    let garbage: [&[u8]; 6] = [
        &random,
        &binding_request[..10], // truncated STUN header
        &rtp_looking,           // RTP from an unknown address
        &[],
        &[0x16, 0xfe, 0xfd], // truncated DTLS
        &forged,             // routed by ufrag, rejected by ICE
    ];
    for _ in 0..20 {
        for datagram in garbage {
            attacker.send_to(datagram, target).await.unwrap();
        }
    }
    // The forged request gets no binding success.
    let mut reply = [0u8; 1500];
    let answered =
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut reply)).await;
    assert!(
        answered.is_err(),
        "a forged binding request must not be answered"
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = port.stats();
    println!("before {before:?}\nafter {after:?}");
    assert!(
        after.dropped_malformed >= before.dropped_malformed + 80,
        "malformed datagrams are counted"
    );
    assert!(after.dropped_unroutable >= before.dropped_unroutable + 20);
    assert_eq!(*handle.state.borrow(), PeerState::Connected);
    let received_during = client.received_len() - received_before;
    assert!(
        received_during >= SAMPLE_RATE as usize,
        "the peer kept receiving audio ({received_during} samples in ~1.3 s)"
    );
    assert!(goertzel_amplitude(&client.last(Duration::from_millis(500)), 700.0) > 2000.0);
    assert_eq!(after.peers, 1);

    tone.abort();
    shutdown.cancel();
    client.close().await;
}

/// The demultiplexer's verdict on a garbage datagram that names no participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Not STUN, DTLS, RTP or RTCP by its first byte, or a broken header.
    Malformed,
    /// Well-formed, but from an unknown address with no known ufrag.
    Unroutable,
}

/// `count` datagrams of varied garbage, none of which can reach a participant, each with the
/// reason it must be dropped for.
fn garbage_datagrams(count: usize) -> Vec<(Vec<u8>, Verdict)> {
    let random_bytes = |len: usize| -> Vec<u8> { (0..len).map(|_| rand::random()).collect() };
    let stun_binding_request = |username: &[u8]| -> Vec<u8> {
        let mut attributes = Vec::new();
        attributes.extend_from_slice(&0x0006u16.to_be_bytes());
        attributes.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attributes.extend_from_slice(username);
        while !attributes.len().is_multiple_of(4) {
            attributes.push(0);
        }
        let mut message = vec![0x00, 0x01];
        message.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        message.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        message.extend_from_slice(&random_bytes(12));
        message.extend_from_slice(&attributes);
        message
    };
    (0..count)
        .map(|i| match i % 8 {
            // Random bytes whose first byte is none of STUN, DTLS or RTP (RFC 7983).
            0 => {
                let mut datagram = random_bytes(rand::random_range(1..1200));
                datagram[0] = rand::random_range(64..128);
                (datagram, Verdict::Malformed)
            }
            // A binding request cut inside its 20-byte header.
            1 => {
                let mut datagram = stun_binding_request(b"nobody:x");
                datagram.truncate(rand::random_range(1..20));
                (datagram, Verdict::Malformed)
            }
            // A well-formed binding request for a ufrag no participant has.
            2 => (
                stun_binding_request(b"noSuchUfrag:evil"),
                Verdict::Unroutable,
            ),
            // RTP with an unknown SSRC and a random payload.
            3 => {
                let mut datagram = vec![0x80, 111];
                datagram.extend_from_slice(&random_bytes(10));
                datagram.extend_from_slice(&random_bytes(rand::random_range(0..200)));
                (datagram, Verdict::Unroutable)
            }
            // An RTCP sender report header whose length field fits the datagram.
            4 => {
                let mut datagram = vec![0x80, 200, 0, 6];
                datagram.extend_from_slice(&random_bytes(24));
                (datagram, Verdict::Unroutable)
            }
            // A DTLS handshake record with a random body.
            5 => {
                let mut datagram = vec![0x16, 0xfe, 0xfd];
                datagram.extend_from_slice(&random_bytes(rand::random_range(10..300)));
                (datagram, Verdict::Unroutable)
            }
            6 => (Vec::new(), Verdict::Malformed),
            // RTP announcing 15 CSRCs that are not there.
            _ => {
                let mut datagram = vec![0x8f, 111];
                datagram.extend_from_slice(&random_bytes(rand::random_range(10..60)));
                (datagram, Verdict::Malformed)
            }
        })
        .collect()
}

/// Sends `datagrams` to `port` in small batches, waiting after each until `read(stats)` says the
/// port has taken in as many as were sent: a loopback flood can outrun the port and the kernel
/// would then drop datagrams the test wants counted.
async fn flood(
    port: &MediaPort,
    datagrams: &[(Vec<u8>, Verdict)],
    read: impl Fn(&PortStats) -> u64,
) {
    const BATCH: usize = 32;
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = port.local_addr();
    let start = read(&port.stats());
    let mut sent = 0u64;
    for batch in datagrams.chunks(BATCH) {
        for (datagram, _) in batch {
            attacker.send_to(datagram, target).await.unwrap();
        }
        sent += batch.len() as u64;
        let caught_up = async {
            while read(&port.stats()) - start < sent {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), caught_up)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the port took in only {} of {sent} datagrams: {:?}",
                    read(&port.stats()) - start,
                    port.stats()
                )
            });
    }
}

/// Drops for every reason a datagram can be dropped for, before it reaches a participant.
/// Between `before` and `after`, the port dropped every datagram of `garbage` exactly once, each
/// under the reason it deserves.
fn assert_dropped_once_each(before: &PortStats, after: &PortStats, garbage: &[(Vec<u8>, Verdict)]) {
    let expect = |verdict| garbage.iter().filter(|(_, v)| *v == verdict).count() as u64;
    assert_eq!(
        datagrams_dropped(after) - datagrams_dropped(before),
        garbage.len() as u64,
        "each garbage datagram is dropped exactly once"
    );
    assert_eq!(
        after.dropped_malformed - before.dropped_malformed,
        expect(Verdict::Malformed)
    );
    assert_eq!(
        after.dropped_unroutable - before.dropped_unroutable,
        expect(Verdict::Unroutable)
    );
}

fn datagrams_dropped(stats: &PortStats) -> u64 {
    stats.dropped_malformed + stats.dropped_unroutable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_flood_is_counted_once_per_datagram() {
    const FLOOD: usize = 8_000;
    let (port, shutdown) = start_port(|_| {});

    // On a port with nobody on it, every datagram read is garbage: the drops must add up to
    // exactly the datagrams read, one reason each.
    let garbage = garbage_datagrams(FLOOD);
    let before = port.stats();
    flood(&port, &garbage, |stats| stats.datagrams_in).await;
    // Anything counted late would show up here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = port.stats();
    println!("idle port: before {before:?}\nafter {after:?}");
    assert_eq!(after.datagrams_in - before.datagrams_in, FLOOD as u64);
    assert_dropped_once_each(&before, &after, &garbage);

    // The same with a participant talking and listening: its own datagrams are never dropped,
    // and the flood does not disturb it.
    let (client, handle, _answer) = TestClient::join(&port, 300.0, -30.0).await;
    let PeerHandle {
        inbound: mut from_client,
        outbound: to_client,
        state,
        ..
    } = handle;
    let heard_from_client = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&heard_from_client);
    let listener = tokio::spawn(async move {
        while from_client.recv().await.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let tone = tokio::spawn(async move {
        let mut encoder =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Audio)
                .unwrap();
        let mut phase = 0.0;
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        loop {
            ticker.tick().await;
            let frame = tone_frame(700.0, -10.0, &mut phase);
            let payload = Bytes::from(encoder.encode_vec(&frame, 1500).unwrap());
            let _ = to_client.send_opus(payload, FRAME_SAMPLES as u32);
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let garbage = garbage_datagrams(FLOOD);
    let before = port.stats();
    let received_before = client.received_len();
    let heard_before = heard_from_client.load(std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    flood(&port, &garbage, datagrams_dropped).await;
    // Long enough for both directions to show audio, whatever the flood took.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = started.elapsed();
    let after = port.stats();
    println!("with a participant, {elapsed:?}: before {before:?}\nafter {after:?}");
    assert_dropped_once_each(&before, &after, &garbage);
    // The participant's datagrams were read too, and none of them was dropped.
    assert!(after.datagrams_in - before.datagrams_in > FLOOD as u64);

    assert_eq!(*state.borrow(), PeerState::Connected);
    assert_eq!(after.peers, 1);
    // 20 ms frames both ways; at least half of them must have made it through the flood.
    let frames = (elapsed.as_millis() / 20) as usize;
    let heard = heard_from_client.load(std::sync::atomic::Ordering::Relaxed) - heard_before;
    assert!(
        heard >= frames / 2,
        "the server heard {heard} of ~{frames} frames from the participant"
    );
    let received = (client.received_len() - received_before) / FRAME_SAMPLES;
    assert!(
        received >= frames / 2,
        "the participant heard {received} of ~{frames} frames from the server"
    );
    assert!(goertzel_amplitude(&client.last(Duration::from_millis(300)), 700.0) > 2000.0);

    tone.abort();
    listener.abort();
    shutdown.cancel();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unsupported_offers_get_clear_errors() {
    let (port, shutdown) = start_port(|_| {});
    let cases = [
        ("", "sdp_malformed", "empty"),
        ("hello", "sdp_malformed", "v=0"),
        ("v=0\r\no=broken\r\n", "sdp_malformed", "not valid SDP"),
        (
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n",
            "sdp_unsupported",
            "no audio",
        ),
        (
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n",
            "sdp_unsupported",
            "opus/48000/2",
        ),
    ];
    for (offer, category, phrase) in cases {
        let err = port
            .accept(offer)
            .await
            .expect_err("the offer must be refused");
        println!("{category}: {err}");
        assert_eq!(err.category(), category, "{err}");
        assert!(
            err.to_string().contains(phrase),
            "`{err}` should mention `{phrase}`"
        );
    }
    assert_eq!(port.stats().peers, 0);
    shutdown.cancel();
    // After shutdown, accept fails cleanly.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = port.accept("v=0").await.expect_err("port closed");
    assert!(matches!(
        err,
        EndpointError::PortClosed | EndpointError::MalformedSdp(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_connects_is_removed() {
    let (port, shutdown) = start_port(|config| config.connect_timeout = Duration::from_millis(800));
    let (mut client, _track) = TestClient::new().await;
    let offer = client.offer().await;
    let (_answer, mut handle) = port.accept(&offer).await.unwrap();
    // The answer is never applied, so the client never sends a binding request.
    assert_eq!(port.stats().peers, 1);
    let connected = tokio::time::timeout(Duration::from_secs(3), handle.wait_connected())
        .await
        .expect("the port gives up within its connect timeout");
    assert!(!connected);
    assert_eq!(*handle.state.borrow(), PeerState::Failed);
    assert_eq!(port.stats().peers, 0);
    shutdown.cancel();
    client.close().await;
}

/// A port whose task is busier than its limit refuses newcomers with a clear error, and keeps
/// the participant it has. The limit is 0 here, so any work at all makes the port "overloaded".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_port_refuses_newcomers_and_keeps_who_it_has() {
    let (port, shutdown) = start_port(|config| config.overload_busy = 0.0);
    let (mut first, _track) = TestClient::new().await;
    let offer = first.offer().await;
    // Idle until now: the first participant is taken.
    let (_answer, handle) = port.accept(&offer).await.expect("an idle port accepts");
    // Give the port's task work for a few of its load windows (each datagram is read, checked
    // and dropped as malformed).
    let poke = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        poke.send_to(&[0xff; 32], port.local_addr()).unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        port.busy() > 0.0,
        "the port's task did work: {}",
        port.busy()
    );
    assert!(port.stats().busy_permille <= 1000);
    let (mut second, _track) = TestClient::new().await;
    let offer = second.offer().await;
    let err = port
        .accept(&offer)
        .await
        .expect_err("an overloaded port refuses newcomers");
    assert!(
        matches!(
            err,
            EndpointError::Overloaded {
                limit_percent: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.category(), "overloaded");
    assert!(err.to_string().contains("overloaded"), "{err}");
    // The participant already in is untouched.
    assert_eq!(port.stats().peers, 1);
    assert!(!handle.state.borrow().is_terminal());
    shutdown.cancel();
    first.close().await;
    second.close().await;
}

/// Sanity check of the test's own signal helpers.
#[test]
fn goertzel_finds_a_tone_and_level_matches_rms() {
    let mut phase = 0.0;
    let frame: Vec<i16> = (0..5)
        .flat_map(|_| tone_frame(440.0, -12.0, &mut phase))
        .collect();
    let at_440 = goertzel_amplitude(&frame, 440.0);
    let expected = 32767.0 * 10f32.powf(-12.0 / 20.0);
    assert!(
        (at_440 - expected).abs() < expected * 0.05,
        "{at_440} vs {expected}"
    );
    assert!(goertzel_amplitude(&frame, 1000.0) < expected * 0.02);
    assert_eq!(level_dbov(&frame), 15);
    assert_eq!(level_dbov(&[0; 960]), 127);
}
