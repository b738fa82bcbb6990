//! The phone leg's media: RTP through the server's one media port (or, on an edge bridge, a
//! socket of its own), transcoding at the edge of the room, and the room [`Transport`] a phone
//! member uses.
//!
//! On a media server a phone's RTP shares the media port with every WebRTC participant
//! (Kubernetes exposes one UDP port per pod): our SDP offers the port's address, and once the
//! phone answers, the port routes datagrams from the address it answered with to this leg
//! ([`MediaPort::route_plain`]). An edge bridge has no media port: each call gets its own UDP
//! socket ([`PhoneLeg::on_socket`]) and the same filter on the answered address.
//!
//! Into the room, each phone packet becomes what a WebRTC participant's packet is: an Opus frame
//! with a level, delivered straight into the room's queue with the phone's stream id. G.711 is
//! decoded at 8 kHz and re-encoded as 20 ms Opus at 8 kHz (libopus takes 8 kHz natively, so no
//! resampler), its level measured from the PCM; an Opus phone's packets pass through untouched.
//! Out of the room, the phone's frame (its mix-minus when it is a top speaker, the shared mix
//! otherwise) is decoded at 8 kHz and G.711-encoded, or passed through to an Opus phone. The
//! room sends a frame every tick, silence included, so phones with RTP timeouts stay up.
//!
//! Invariants:
//! - nothing is routed before the answer: early media is unroutable at the port, never mixed;
//! - RTP is accepted only from the address the phone answered with (and, with SRTP, only when it
//!   authenticates);
//! - RFC 4733 events are counted and reported, never decoded as audio;
//! - a malformed or unexpected datagram is dropped and counted by reason, never a panic, and it
//!   touches no other call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opus::{Application, Channels};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::TelephonyError;
use super::media::PhoneCodec;
use super::media::dtmf::DtmfDetector;
use super::media::g711::G711;
use super::media::rtp::{RtpPacket, RtpSender};
use super::media::sdp::{OfferParams, PhoneAnswer};
use super::media::srtp::SrtpSession;
use super::metrics::TelephonyMetrics;
use crate::endpoint::{AudioSink, EndpointError, InboundAudio, MediaPort, PlainRoute, PlainSender};
use crate::media::AudioLevel;
use crate::media::level::dbov_from_pcm;
use crate::room::transport::Transport;

/// G.711 samples in one 20 ms frame at 8 kHz.
const NARROW_FRAME: usize = 160;
/// The 48 kHz RTP clock of Opus over the 8 kHz of G.711.
const CLOCK_RATIO: u32 = 6;
/// Frames waiting for the phone before new ones are dropped (the room never waits).
const OUT_QUEUE: usize = 32;
/// How often the call is told media still arrives.
const MEDIA_REPORT: Duration = Duration::from_millis(200);
/// A level below this is not voice (the RFC 6464 V flag we set).
const VOICE_DBOV: f32 = -50.0;

/// What the leg tells its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegEvent {
    /// Media arrived from the phone (reported at most every 200 ms).
    Media,
    /// The phone sent a DTMF key press.
    Dtmf(char),
}

/// The media of a call: what we offered and, once answered, what the phone chose.
#[derive(Debug, Clone)]
pub struct LegParams {
    /// Our offer.
    pub offer: OfferParams,
    /// The phone's answer.
    pub answer: Option<PhoneAnswer>,
}

impl LegParams {
    /// Media as offered, not answered yet.
    pub fn offered(offer: OfferParams) -> Self {
        Self {
            offer,
            answer: None,
        }
    }
}

/// Where a leg's RTP travels.
#[derive(Debug, Clone)]
enum LegSocket {
    /// The server's shared media port.
    Port(Arc<MediaPort>),
    /// A socket of the leg's own (an edge bridge), and the address our offer names.
    Own {
        socket: Arc<UdpSocket>,
        advertised: SocketAddr,
    },
}

/// A call's media before the phone answers: where our offer says to send RTP.
#[derive(Debug)]
pub struct PhoneLeg {
    socket: LegSocket,
}

/// Datagrams routed from the answered phone, and a way back to it. Dropping it stops the
/// routing (the port forgets the address; an own socket's reader stops).
#[derive(Debug)]
pub struct LegRoute {
    inbound: mpsc::Receiver<(Bytes, Instant)>,
    sender: LegSender,
    _guard: RouteGuard,
}

#[derive(Debug)]
enum RouteGuard {
    /// The port's route: dropping it unroutes the address.
    Port(#[allow(dead_code)] PlainRoute),
    /// The reader of an own socket.
    Own(tokio::task::JoinHandle<()>),
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let RouteGuard::Own(reader) = self {
            reader.abort();
        }
    }
}

/// Sends datagrams to the answered phone. Never waits: a full queue or socket drops the datagram.
#[derive(Debug, Clone)]
enum LegSender {
    Port(PlainSender),
    Own(Arc<UdpSocket>, SocketAddr),
}

impl LegSender {
    fn send(&self, datagram: Bytes) -> Result<(), ()> {
        match self {
            LegSender::Port(sender) => sender.send(datagram).map_err(|_| ()),
            LegSender::Own(socket, to) => socket
                .try_send_to(&datagram, *to)
                .map(|_| ())
                .map_err(|_| ()),
        }
    }
}

/// Datagrams a leg's own socket may queue before new ones are dropped.
const OWN_QUEUE: usize = 64;

impl PhoneLeg {
    /// A leg on the server's media port.
    pub fn on_port(port: Arc<MediaPort>) -> Self {
        Self {
            socket: LegSocket::Port(port),
        }
    }

    /// A leg on a socket of its own (an edge bridge's RTP socket); our offer names `advertised`
    /// with the socket's port.
    pub fn on_socket(
        socket: UdpSocket,
        advertised: std::net::IpAddr,
    ) -> Result<Self, TelephonyError> {
        let port = socket
            .local_addr()
            .map_err(|e| TelephonyError::Socket(format!("RTP socket address: {e}")))?
            .port();
        Ok(Self {
            socket: LegSocket::Own {
                socket: Arc::new(socket),
                advertised: SocketAddr::new(advertised, port),
            },
        })
    }

    /// The address our offer gives the phone (the media port's public address, or the own
    /// socket's advertised one).
    pub fn local_addr(&self) -> SocketAddr {
        match &self.socket {
            LegSocket::Port(port) => port.candidate_addr(),
            LegSocket::Own { advertised, .. } => *advertised,
        }
    }

    /// Route the answered phone's datagrams to this leg; call before [`PhoneLeg::connect`].
    /// Datagrams from any other address are dropped.
    pub async fn route(&self, remote: SocketAddr) -> Result<LegRoute, TelephonyError> {
        match &self.socket {
            LegSocket::Port(port) => {
                let mut route = port
                    .route_plain(remote)
                    .await
                    .map_err(|e| TelephonyError::Socket(format!("routing the phone's RTP: {e}")))?;
                let (_, closed) = mpsc::channel(1);
                let inbound = std::mem::replace(&mut route.inbound, closed);
                Ok(LegRoute {
                    inbound,
                    sender: LegSender::Port(route.sender()),
                    _guard: RouteGuard::Port(route),
                })
            }
            LegSocket::Own { socket, .. } => {
                let (tx, inbound) = mpsc::channel(OWN_QUEUE);
                let reader = tokio::spawn(read_own_socket(socket.clone(), remote, tx));
                Ok(LegRoute {
                    inbound,
                    sender: LegSender::Own(socket.clone(), remote),
                    _guard: RouteGuard::Own(reader),
                })
            }
        }
    }

    /// Start the media of an answered call: packets from the phone (through `route`) go into
    /// `sink`; frames sent through the returned transport go to the phone.
    pub fn connect(
        self,
        params: LegParams,
        route: LegRoute,
        sink: AudioSink,
        events: mpsc::UnboundedSender<LegEvent>,
        metrics: TelephonyMetrics,
    ) -> Result<PhoneTransport, TelephonyError> {
        let answer = params
            .answer
            .ok_or_else(|| TelephonyError::Sip("the call has no answer yet".to_owned()))?;
        let srtp = match (&params.offer.srtp, &answer.remote_key) {
            (Some(local), Some(remote)) => Some(SrtpSession::new(local, remote)?),
            _ => None,
        };
        let stop = CancellationToken::new();
        let gone = Arc::new(AtomicBool::new(false));
        let (frames, frames_rx) = mpsc::channel(OUT_QUEUE);
        let srtp = srtp.map(|s| Arc::new(std::sync::Mutex::new(s)));
        let sender = route.sender.clone();
        let inbound = Inbound::new(&answer, srtp.clone(), sink, events, metrics.clone())?;
        let outbound = Outbound::new(&answer, srtp, metrics)?;
        tokio::spawn(inbound.run(route, stop.clone(), gone.clone()));
        tokio::spawn(outbound.run(sender, frames_rx, stop.clone(), gone.clone()));
        Ok(PhoneTransport { frames, stop, gone })
    }
}

/// An own socket's reader: datagrams from `remote` only, with their arrival.
async fn read_own_socket(
    socket: Arc<UdpSocket>,
    remote: SocketAddr,
    inbound: mpsc::Sender<(Bytes, Instant)>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        if from != remote {
            continue;
        }
        match inbound.try_send((Bytes::copy_from_slice(&buf[..n]), Instant::now())) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The room's side of a phone: [`Transport::send_opus`] queues a frame for the phone.
#[derive(Debug)]
pub struct PhoneTransport {
    frames: mpsc::Sender<(Bytes, u32)>,
    stop: CancellationToken,
    gone: Arc<AtomicBool>,
}

impl Transport for PhoneTransport {
    fn send_opus(&self, payload: Bytes, samples: u32) -> Result<(), EndpointError> {
        self.frames
            .try_send((payload, samples))
            .map_err(|_| EndpointError::SendQueueFull)
    }

    fn port_peer(&self) -> Option<u64> {
        None
    }

    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.stop.cancel();
    }
}

type SharedSrtp = Option<Arc<std::sync::Mutex<SrtpSession>>>;

fn lock_srtp(s: &std::sync::Mutex<SrtpSession>) -> std::sync::MutexGuard<'_, SrtpSession> {
    s.lock()
        .expect("SRTP lock is never poisoned: nothing panics while holding it")
}

/// From the phone into the room.
struct Inbound {
    codec: PhoneCodec,
    answer: PhoneAnswer,
    srtp: SharedSrtp,
    sink: AudioSink,
    events: mpsc::UnboundedSender<LegEvent>,
    metrics: TelephonyMetrics,
    encoder: Option<opus::Encoder>,
    dtmf: DtmfDetector,
    /// G.711 samples waiting for a whole 20 ms frame, and the 8 kHz timestamp of the first.
    pending: Vec<i16>,
    pending_ts: u32,
    expected: Option<(u16, u32)>,
    seq: u16,
    last_report: Option<Instant>,
}

impl Inbound {
    fn new(
        answer: &PhoneAnswer,
        srtp: SharedSrtp,
        sink: AudioSink,
        events: mpsc::UnboundedSender<LegEvent>,
        metrics: TelephonyMetrics,
    ) -> Result<Self, TelephonyError> {
        let encoder = match answer.codec.g711() {
            Some(_) => {
                let mut e = opus::Encoder::new(8000, Channels::Mono, Application::Voip)
                    .map_err(|e| TelephonyError::Socket(format!("Opus encoder: {e}")))?;
                // Narrowband speech needs little; keep FEC so the room can recover losses.
                let _ = e.set_bitrate(opus::Bitrate::Bits(24_000));
                let _ = e.set_inband_fec(true);
                Some(e)
            }
            None => None,
        };
        Ok(Self {
            codec: answer.codec,
            answer: answer.clone(),
            srtp,
            sink,
            events,
            metrics,
            encoder,
            dtmf: DtmfDetector::new(),
            pending: Vec::with_capacity(NARROW_FRAME * 2),
            pending_ts: 0,
            expected: None,
            seq: 0,
            last_report: None,
        })
    }

    async fn run(mut self, mut route: LegRoute, stop: CancellationToken, gone: Arc<AtomicBool>) {
        loop {
            let (datagram, arrival) = tokio::select! {
                _ = stop.cancelled() => break,
                received = route.inbound.recv() => match received {
                    Some(received) => received,
                    None => break,
                },
            };
            if let Err(reason) = self.on_datagram(&datagram, arrival) {
                self.metrics.rtp_dropped.with_label_values(&[reason]).inc();
            }
        }
        gone.store(true, Ordering::Relaxed);
    }

    fn on_datagram(&mut self, datagram: &[u8], arrival: Instant) -> Result<(), &'static str> {
        // RTCP (payload types 200..=204 in the second byte) is not used yet.
        if matches!(datagram.get(1), Some(200..=204)) {
            return Err("rtcp");
        }
        let clear;
        let rtp = match &self.srtp {
            Some(srtp) => {
                clear = lock_srtp(srtp)
                    .unprotect(datagram)
                    .map_err(|_| "srtp_auth")?;
                &clear[..]
            }
            None => datagram,
        };
        let packet = RtpPacket::parse(rtp).map_err(|_| "malformed")?;
        self.metrics.rtp_packets.with_label_values(&["in"]).inc();
        let now = Instant::now();
        if self
            .last_report
            .is_none_or(|t| now.duration_since(t) >= MEDIA_REPORT)
        {
            self.last_report = Some(now);
            let _ = self.events.send(LegEvent::Media);
        }
        let header = packet.header;
        if self.answer.is_telephone_event(header.payload_type) {
            let presses = self
                .dtmf
                .push(header.timestamp, packet.payload)
                .map_err(|_| "malformed_dtmf")?;
            for press in presses {
                let _ = self.events.send(LegEvent::Dtmf(press.digit));
            }
            return Ok(());
        }
        if !self.answer.is_audio(header.payload_type) {
            return Err("payload_type");
        }
        match self.codec.g711() {
            None => {
                // Opus: the room takes it as it is.
                if packet.payload.is_empty() {
                    return Err("malformed");
                }
                self.deliver(InboundAudio {
                    tag: self.sink.tag,
                    seq: header.sequence,
                    rtp_timestamp: header.timestamp,
                    payload: Bytes::copy_from_slice(packet.payload),
                    level: None,
                    arrival,
                })
            }
            Some(law) => self.transcode(
                law,
                header.sequence,
                header.timestamp,
                packet.payload,
                arrival,
            ),
        }
    }

    fn transcode(
        &mut self,
        law: G711,
        sequence: u16,
        timestamp: u32,
        payload: &[u8],
        arrival: Instant,
    ) -> Result<(), &'static str> {
        // A gap or a jump starts the frame afresh: never glue audio across a loss.
        let continuous = self.expected == Some((sequence, timestamp));
        if !continuous {
            self.pending.clear();
        }
        if self.pending.is_empty() {
            self.pending_ts = timestamp;
        }
        self.expected = Some((
            sequence.wrapping_add(1),
            timestamp.wrapping_add(u32::try_from(payload.len()).unwrap_or(u32::MAX)),
        ));
        law.decode(payload, &mut self.pending);
        while self.pending.len() >= NARROW_FRAME {
            let frame: Vec<i16> = self.pending.drain(..NARROW_FRAME).collect();
            let encoder = self
                .encoder
                .as_mut()
                .expect("a G.711 leg always has its Opus encoder");
            let opus = encoder.encode_vec(&frame, 400).map_err(|_| "encode")?;
            self.metrics
                .transcodes
                .with_label_values(&["from_phone"])
                .inc();
            let dbov = dbov_from_pcm(&frame);
            let level = AudioLevel {
                dbov: u8::try_from((-dbov).clamp(0.0, 127.0) as i64).unwrap_or(127),
                voice: dbov >= VOICE_DBOV,
            };
            let rtp_timestamp = self.pending_ts.wrapping_mul(CLOCK_RATIO);
            self.pending_ts = self.pending_ts.wrapping_add(NARROW_FRAME as u32);
            self.seq = self.seq.wrapping_add(1);
            self.deliver(InboundAudio {
                tag: self.sink.tag,
                seq: self.seq,
                rtp_timestamp,
                payload: Bytes::from(opus),
                level: Some(level),
                arrival,
            })?;
        }
        Ok(())
    }

    fn deliver(&self, audio: InboundAudio) -> Result<(), &'static str> {
        self.sink.queue.try_send(audio).map_err(|_| "room_behind")
    }
}

/// From the room to the phone.
struct Outbound {
    codec: PhoneCodec,
    payload_type: u8,
    srtp: SharedSrtp,
    metrics: TelephonyMetrics,
    decoder: Option<opus::Decoder>,
    sender: RtpSender,
}

impl Outbound {
    fn new(
        answer: &PhoneAnswer,
        srtp: SharedSrtp,
        metrics: TelephonyMetrics,
    ) -> Result<Self, TelephonyError> {
        let decoder = match answer.codec.g711() {
            Some(_) => Some(
                opus::Decoder::new(8000, Channels::Mono)
                    .map_err(|e| TelephonyError::Socket(format!("Opus decoder: {e}")))?,
            ),
            None => None,
        };
        let ssrc = rand::random::<u32>();
        Ok(Self {
            codec: answer.codec,
            payload_type: answer.payload_type,
            srtp,
            metrics,
            decoder,
            sender: RtpSender::new(ssrc, rand::random(), rand::random()),
        })
    }

    async fn run(
        mut self,
        sender: LegSender,
        mut frames: mpsc::Receiver<(Bytes, u32)>,
        stop: CancellationToken,
        gone: Arc<AtomicBool>,
    ) {
        let mut pcm = vec![0i16; 960];
        let mut encoded = Vec::with_capacity(NARROW_FRAME);
        let mut packet = Vec::with_capacity(1500);
        let mut first = true;
        loop {
            let (payload, samples) = tokio::select! {
                _ = stop.cancelled() => break,
                frame = frames.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
            };
            packet.clear();
            let units = match (&mut self.decoder, self.codec.g711()) {
                (Some(decoder), Some(law)) => {
                    let n = match decoder.decode(&payload, &mut pcm, false) {
                        Ok(n) => n,
                        Err(_) => {
                            self.metrics
                                .rtp_dropped
                                .with_label_values(&["decode"])
                                .inc();
                            continue;
                        }
                    };
                    encoded.clear();
                    law.encode(&pcm[..n], &mut encoded);
                    self.metrics
                        .transcodes
                        .with_label_values(&["to_phone"])
                        .inc();
                    let header = self.sender.next_header(self.payload_type, first);
                    header.write_packet(&encoded, &mut packet);
                    u32::try_from(n).unwrap_or(0)
                }
                _ => {
                    let header = self.sender.next_header(self.payload_type, first);
                    header.write_packet(&payload, &mut packet);
                    samples
                }
            };
            self.sender.advance(units);
            first = false;
            let wire = match &self.srtp {
                Some(srtp) => match lock_srtp(srtp).protect(&packet) {
                    Ok(p) => p,
                    Err(_) => {
                        self.metrics
                            .rtp_dropped
                            .with_label_values(&["srtp_protect"])
                            .inc();
                        continue;
                    }
                },
                None => packet.clone(),
            };
            match sender.send(Bytes::from(wire)) {
                Ok(()) => self.metrics.rtp_packets.with_label_values(&["out"]).inc(),
                Err(_) => self
                    .metrics
                    .rtp_dropped
                    .with_label_values(&["port_busy"])
                    .inc(),
            }
        }
        gone.store(true, Ordering::Relaxed);
    }
}
