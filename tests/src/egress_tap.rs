//! The server's egress, tapped: when two listeners' datagrams left the server's network
//! interface, so the bench can give the fan-out's spread (the last listener's delay after the
//! first's) as the server adds it, without the receivers' delivery in it.
//!
//! The swarm's own figure comes from kernel receive stamps on its sockets, on the far side of
//! the veth pair. That holds the server's send *and* the swarm side's delivery: every listener's
//! datagram goes through one NAPI thread on the swarm's CPU, which on a real network would be
//! thousands of machines receiving in parallel. This tap sees the frames as the server's
//! interface transmits them.
//!
//! How:
//! - A packet socket for every protocol (`ETH_P_ALL`), bound to the server's interface, gets a
//!   copy of each frame the interface transmits. The kernel stamps it as it hands the frame to
//!   the device's driver (`dev_queue_xmit_nit`, `SO_TIMESTAMPNS`, the realtime clock), after the
//!   server's whole send path: the link-layer fan-out's frames and the UDP socket's alike.
//! - A classic BPF filter keeps only IPv4 UDP from the server's port to the two listeners' ports,
//!   cut to its headers. So the reader sees two datagrams a frame, not thousands.
//! - The reader never blocks on the socket: it sleeps and drains. A blocked reader would have the
//!   sending server wake it, twice a frame, in the middle of the fan-out.
//! - Pairs: the server numbers each listener's RTP packets in step, from a random start of its
//!   own, so one frame's two datagrams differ in sequence number by a constant. That constant is
//!   not in the clear, and time cannot give it once the spread nears half a frame (10 ms: the
//!   neighbouring frame's datagram is then nearer). The swarm knows it: it decrypts samples of
//!   both listeners and matches their payloads byte for byte
//!   ([`crate::swarm::ListenerReport::seq_delta_vs_reference`]). Each of the other listener's
//!   datagrams pairs with the reference's of the sequence number that constant gives; RTCP on
//!   the same port is left out.
//!
//! What it costs the server: the kernel clones every transmitted frame for the tap before the
//! filter runs, perhaps 0.1–0.2 µs each. So the bench taps in a window of its own, after the
//! window whose CPU it reports, and what this tap measures errs long, not short.
//!
//! Written by hand: a pcap library would need libpcap and would copy every frame to this process.
//! It is safe code over `nix` and `socket2`. Needs `CAP_NET_RAW`.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, bind,
    recvmsg, setsockopt, socket, sockopt,
};
use serde::{Deserialize, Serialize};
use socket2::SockFilter;

/// How often the reader drains the socket: far less than a receive buffer's worth of two
/// datagrams per 20 ms frame.
const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// Bytes kept of each frame: Ethernet (14), IPv4 with any options (at most 60), UDP (8) and the
/// RTP header's first 12.
const SNAP_BYTES: u32 = 96;
/// `sll_pkttype` of a frame this host transmits.
const PACKET_OUTGOING: u8 = 4;

/// One tapped RTP datagram: when it left and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Departure {
    /// Realtime clock, ns.
    pub at_ns: i64,
    /// The RTP header's sequence number.
    pub seq: u16,
}

/// The other listener's departures after the reference's, over the pairs that matched.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EgressSpread {
    /// Datagrams tapped to the reference and to the other listener.
    pub reference_datagrams: u64,
    pub other_datagrams: u64,
    /// Pairs that matched (see the module docs).
    pub pairs: u64,
    /// Of the pairs' offsets (other minus reference), ms.
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The reference's departures and the other listener's, in the order tapped.
type Tapped = (Vec<Departure>, Vec<Departure>);

/// A running tap (see the module docs). [`EgressTap::stop`] ends it.
#[derive(Debug)]
pub struct EgressTap {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<Tapped>>>,
}

impl EgressTap {
    /// Taps `interface` for the datagrams that `server` sends to `reference` and to `other`.
    pub fn start(
        interface: &str,
        server: SocketAddr,
        reference: SocketAddr,
        other: SocketAddr,
    ) -> Result<EgressTap> {
        if reference.port() == other.port() {
            bail!("the two listeners share port {}", reference.port());
        }
        let socket = open(interface, server.port(), [reference.port(), other.port()])?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ports = (reference.port(), other.port());
        let reader = std::thread::Builder::new()
            .name("egress-tap".to_owned())
            .spawn(move || read_until(&socket, ports, &stopped))
            .context("spawning the egress tap's reader")?;
        Ok(EgressTap {
            stop,
            reader: Some(reader),
        })
    }

    /// Stops the tap and pairs what it saw, the other listener's sequence numbers being the
    /// reference's plus `seq_delta` (see the module docs); `None` without a single pair.
    pub fn stop(mut self, seq_delta: u16) -> Result<Option<EgressSpread>> {
        self.stop.store(true, Ordering::Relaxed);
        let reader = self
            .reader
            .take()
            .expect("the reader is only taken here, and stop consumes the tap");
        let (reference, other) = reader
            .join()
            .map_err(|_| anyhow!("the egress tap's reader panicked"))??;
        Ok(spread(&reference, &other, seq_delta))
    }
}

impl Drop for EgressTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The packet socket, filtered, bound to `interface`, stamping.
fn open(interface: &str, server_port: u16, ports: [u16; 2]) -> Result<OwnedFd> {
    let link = nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter(|entry| entry.interface_name == interface)
        .find_map(|entry| entry.address.and_then(|a| a.as_link_addr().copied()))
        .with_context(|| format!("no interface {interface}"))?;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::EthAll,
    )
    .context("opening a packet socket (needs CAP_NET_RAW)")?;
    // Filter first: until then the socket takes every frame of every interface.
    let fd = {
        let socket = socket2::Socket::from(fd);
        socket
            .attach_filter(&filter(server_port, ports))
            .context("attaching the tap's filter")?;
        OwnedFd::from(socket)
    };
    setsockopt(&fd, sockopt::ReceiveTimestampns, &true).context("enabling SO_TIMESTAMPNS")?;
    // getifaddrs' address has protocol 0, which binding reads as "keep the socket's own".
    bind(fd.as_raw_fd(), &link).with_context(|| format!("binding the tap to {interface}"))?;
    // Frames of other interfaces may have been queued before the bind; drop them.
    let mut scratch = [0u8; 16];
    while recvmsg::<()>(
        fd.as_raw_fd(),
        &mut [IoSliceMut::new(&mut scratch)],
        None,
        MsgFlags::MSG_DONTWAIT,
    )
    .is_ok()
    {}
    Ok(fd)
}

/// Classic BPF: IPv4, UDP, not a later fragment, from `server_port` to one of `ports`; keep
/// [`SNAP_BYTES`] of it.
fn filter(server_port: u16, ports: [u16; 2]) -> [SockFilter; 14] {
    const LDH_ABS: u16 = 0x28;
    const LDB_ABS: u16 = 0x30;
    const LDXB_MSH: u16 = 0xb1;
    const LDH_IND: u16 = 0x48;
    const JEQ: u16 = 0x15;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    // Jumps are relative to the next instruction; ACCEPT is instruction 12, DROP 13.
    [
        SockFilter::new(LDH_ABS, 0, 0, 12), // 0: EtherType
        SockFilter::new(JEQ, 0, 11, 0x0800),
        SockFilter::new(LDB_ABS, 0, 0, 23), // 2: IP protocol
        SockFilter::new(JEQ, 0, 9, 17),
        SockFilter::new(LDH_ABS, 0, 0, 20), // 4: fragment offset
        SockFilter::new(JSET, 7, 0, 0x1fff),
        SockFilter::new(LDXB_MSH, 0, 0, 14), // 6: X = the IP header's length
        SockFilter::new(LDH_IND, 0, 0, 14),  // 7: UDP source port
        SockFilter::new(JEQ, 0, 4, u32::from(server_port)),
        SockFilter::new(LDH_IND, 0, 0, 16), // 9: UDP destination port
        SockFilter::new(JEQ, 1, 0, u32::from(ports[0])),
        SockFilter::new(JEQ, 0, 1, u32::from(ports[1])),
        SockFilter::new(RET, 0, 0, SNAP_BYTES), // 12: ACCEPT
        SockFilter::new(RET, 0, 0, 0),          // 13: DROP
    ]
}

/// Drains `socket` every [`DRAIN_EVERY`] until `stop`; the reference's and the other's
/// departures.
fn read_until(
    socket: &OwnedFd,
    (reference_port, other_port): (u16, u16),
    stop: &AtomicBool,
) -> Result<Tapped> {
    let (mut reference, mut other) = (Vec::new(), Vec::new());
    let mut frame = [0u8; SNAP_BYTES as usize];
    loop {
        let last_pass = stop.load(Ordering::Relaxed);
        loop {
            let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
            let (len, outgoing, stamp) = {
                let mut iov = [IoSliceMut::new(&mut frame)];
                let message = match recvmsg::<LinkAddr>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(message) => message,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(err) => return Err(err).context("reading the egress tap"),
                };
                let outgoing = message
                    .address
                    .is_some_and(|a| a.pkttype() == PACKET_OUTGOING);
                let mut stamp = None;
                for cmsg in message.cmsgs().context("the tap's control messages")? {
                    if let ControlMessageOwned::ScmTimestampns(at) = cmsg {
                        stamp = Some(at.tv_sec().saturating_mul(1_000_000_000) + at.tv_nsec());
                    }
                }
                (message.bytes, outgoing, stamp)
            };
            let (Some(at_ns), true) = (stamp, outgoing) else {
                continue;
            };
            if let Some((port, seq)) = rtp_destination_and_seq(&frame[..len.min(frame.len())]) {
                let departure = Departure { at_ns, seq };
                if port == reference_port {
                    reference.push(departure);
                } else if port == other_port {
                    other.push(departure);
                }
            }
        }
        if last_pass {
            return Ok((reference, other));
        }
        std::thread::sleep(DRAIN_EVERY);
    }
}

/// The UDP destination port and RTP sequence number of an Ethernet/IPv4/UDP frame that carries
/// RTP; `None` for RTCP (packet types 192–223, RFC 5761 §4) and for a frame too short.
fn rtp_destination_and_seq(frame: &[u8]) -> Option<(u16, u16)> {
    let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
    let udp = 14 + ihl;
    let be16 = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let port = be16(udp + 2)?;
    let rtp = udp + 8;
    if *frame.get(rtp)? >> 6 != 2 || (192..=223).contains(frame.get(rtp + 1)?) {
        return None;
    }
    Some((port, be16(rtp + 2)?))
}

/// Pairs `other`'s departures with `reference`'s, whose sequence numbers are `seq_delta` lower
/// (see the module docs); `None` without a pair.
pub fn spread(
    reference: &[Departure],
    other: &[Departure],
    seq_delta: u16,
) -> Option<EgressSpread> {
    let by_seq: std::collections::HashMap<u16, i64> =
        reference.iter().map(|r| (r.seq, r.at_ns)).collect();
    let mut offsets: Vec<f64> = other
        .iter()
        .filter_map(|o| {
            let reference_at = by_seq.get(&o.seq.wrapping_sub(seq_delta))?;
            Some((o.at_ns - reference_at) as f64 / 1e6)
        })
        .collect();
    offsets.sort_by(f64::total_cmp);
    let at = |q: f64| offsets[((offsets.len() - 1) as f64 * q).round() as usize];
    Some(EgressSpread {
        reference_datagrams: reference.len() as u64,
        other_datagrams: other.len() as u64,
        pairs: offsets.len() as u64,
        min_ms: *offsets.first()?,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: *offsets.last()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(at_ms: f64, seq: u16) -> Departure {
        Departure {
            at_ns: (at_ms * 1e6) as i64,
            seq,
        }
    }

    /// Frames 20 ms apart; the reference from sequence number 100, the other from `start`,
    /// leaving `offset(k)` ms after the reference's datagram of frame `k`.
    fn frames(n: u16, start: u16, offset: impl Fn(u16) -> f64) -> (Vec<Departure>, Vec<Departure>) {
        let reference = (0..n).map(|k| d(f64::from(k) * 20.0, 100 + k)).collect();
        let mut other: Vec<_> = (0..n)
            .map(|k| d(f64::from(k) * 20.0 + offset(k), start.wrapping_add(k)))
            .collect();
        other.sort_by_key(|o| o.at_ns);
        (reference, other)
    }

    #[test]
    fn pairs_follow_the_sequence_numbers_and_skip_what_was_not_tapped() {
        let (mut reference, other) = frames(10, 7, |k| if k == 6 { 4.0 } else { 2.5 });
        // The reference's datagram of frame 3 was not tapped: the other's has no pair.
        reference.remove(3);
        let s = spread(&reference, &other, 7u16.wrapping_sub(100)).expect("pairs");
        assert_eq!(s.pairs, 9, "{s:?}");
        assert!((s.p50_ms - 2.5).abs() < 1e-6, "{s:?}");
        assert!((s.min_ms - 2.5).abs() < 1e-6, "{s:?}");
        assert!((s.max_ms - 4.0).abs() < 1e-6, "{s:?}");
        assert_eq!((s.reference_datagrams, s.other_datagrams), (9, 10));
    }

    #[test]
    fn a_spread_beyond_half_a_frame_pairs_by_sequence_not_by_nearness() {
        // 14 ms late: each datagram is nearer the reference's next frame (6 ms) than its own.
        let (reference, other) = frames(30, 40_000, |_| 14.0);
        let s = spread(&reference, &other, 40_000 - 100).expect("pairs");
        assert_eq!(s.pairs, 30, "{s:?}");
        assert!((s.p50_ms - 14.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn an_other_listener_ahead_of_the_reference_gives_negative_offsets() {
        // Its sequence numbers wrap during the window.
        let (reference, other) = frames(12, 65_530, |_| -3.0);
        let s = spread(&reference, &other, 65_530u16.wrapping_sub(100)).expect("pairs");
        assert_eq!(s.pairs, 12);
        assert!((s.p50_ms + 3.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn a_wrong_constant_or_nothing_tapped_gives_no_figure() {
        let (reference, other) = frames(10, 500, |_| 2.0);
        assert_eq!(spread(&reference, &other, 1), None);
        assert_eq!(spread(&[], &other, 400), None);
        assert_eq!(spread(&reference, &[], 400), None);
    }

    #[test]
    fn rtcp_and_truncated_frames_are_not_departures() {
        let mut frame = vec![0u8; 14 + 20 + 8 + 4];
        frame[14] = 0x45;
        let udp = 14 + 20;
        frame[udp + 2..udp + 4].copy_from_slice(&5004u16.to_be_bytes());
        frame[udp + 8] = 0x80;
        frame[udp + 8 + 1] = 111;
        frame[udp + 8 + 2..].copy_from_slice(&777u16.to_be_bytes());
        assert_eq!(rtp_destination_and_seq(&frame), Some((5004, 777)));
        for cut in 0..frame.len() {
            assert_eq!(rtp_destination_and_seq(&frame[..cut]), None, "cut at {cut}");
        }
        // A sender report on the same port (rtcp-mux), and a datagram that is not version 2.
        frame[udp + 8 + 1] = 200;
        assert_eq!(rtp_destination_and_seq(&frame), None);
        frame[udp + 8 + 1] = 111;
        frame[udp + 8] = 0x40;
        assert_eq!(rtp_destination_and_seq(&frame), None);
    }

    /// On loopback, as root: the filter passes the server's datagrams to the two ports and
    /// nothing else, and the departures pair up by their sequence numbers.
    #[test]
    fn the_tap_sees_only_the_two_listeners_datagrams_on_loopback() -> Result<()> {
        let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
        if !root {
            eprintln!("SKIPPED: the egress tap needs CAP_NET_RAW (run as root)");
            return Ok(());
        }
        let server = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = |s: &std::net::UdpSocket| s.local_addr();
        let tap = EgressTap::start(
            "lo",
            addr(&server)?,
            addr(&listeners[0])?,
            addr(&listeners[2])?,
        )?;
        for k in 0..20u16 {
            for (i, l) in listeners.iter().enumerate() {
                let mut rtp = [0u8; 40];
                rtp[0] = 0x80;
                rtp[1] = 111;
                rtp[2..4].copy_from_slice(&(1000 * i as u16 + k).to_be_bytes());
                server.send_to(&rtp, addr(l)?)?;
            }
            // Not from the server's port: filtered out, though it goes to a tapped port.
            stranger.send_to(&[0x80, 111, 0, k as u8], addr(&listeners[0])?)?;
            // RTCP from the server's port: left out.
            server.send_to(&[0x80, 200, 0, 6, 0, 0, 0, 0], addr(&listeners[2])?)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = tap.stop(2000)?.expect("the tap paired the datagrams");
        assert_eq!(
            (s.reference_datagrams, s.other_datagrams),
            (20, 20),
            "{s:?}"
        );
        assert_eq!(s.pairs, 20, "{s:?}");
        // Listener 2's datagram leaves after listener 0's (and 1's), within the same frame.
        assert!(s.min_ms > 0.0 && s.max_ms < 10.0, "{s:?}");
        Ok(())
    }
}
