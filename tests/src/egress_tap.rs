//! The server's egress, tapped: when two listeners' datagrams left the server, so the bench can
//! give the fan-out's spread (the last listener's delay after the first's) as the server adds it,
//! without the receivers' delivery in it.
//!
//! The swarm's own figure comes from kernel receive stamps on its sockets, on the far side of
//! the veth pair. That holds the server's send *and* the swarm side's delivery: every listener's
//! datagram goes through one NAPI thread on the swarm's CPU, which on a real network would be
//! thousands of machines receiving in parallel. This tap watches the server's side, at one of
//! two points ([`TapPoint`]):
//! - **Transmit**: as the server's interface hands each frame to its driver, after the
//!   interface's queue. On the bench's veth pair that queue fills whenever the swarm side's ring
//!   (256 frames) does, and it is then drained at the pace of the swarm side's delivery: from
//!   about 1,000 listeners on, most of a frame's datagrams wait there (the queue's `requeues` and
//!   backlog say so), so this point holds the receiver's pace as well.
//! - **Hand-off**: as the server's send hands each frame to the interface, before its queue, in
//!   the server's own system call: where the server's work on a datagram ends, as it ends at a
//!   NIC's queue. A `tc` rule on the interface's egress hook (`clsact`, `u32`) mirrors the two
//!   listeners' datagrams, and only those, to an `ifb` device, and the tap watches that device
//!   transmit them; `mirred` transmits its copy at once, in the caller's context.
//!
//! How:
//! - A packet socket for every protocol (`ETH_P_ALL`), bound to the watched interface, gets a
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
//! What it costs the server: at the transmit point the kernel clones every transmitted frame
//! for the tap before the filter runs, perhaps 0.1–0.2 µs each; at the hand-off point the `u32`
//! rule reads every frame's headers and only the two listeners' are copied. So the bench taps in
//! windows of their own, after the window whose CPU it reports, and what this tap measures errs
//! long, not short. The `tc` rule is removed when the tap stops (or is dropped).
//!
//! Written by hand: a pcap library would need libpcap and would copy every frame to this process.
//! It is safe code over `nix` and `socket2`, and the `tc` command (iproute2). Needs
//! `CAP_NET_RAW`, and `CAP_NET_ADMIN` for the hand-off point.

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

/// Where a tap watches the server's frames leave (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapPoint<'a> {
    /// As `interface` hands each frame to its driver, after the interface's queue.
    Transmit { interface: &'a str },
    /// As the server's send hands each frame to `interface`, before its queue: the two
    /// listeners' datagrams are mirrored to `mirror` (an `ifb` device that is up), whose
    /// transmit is tapped.
    HandOff { interface: &'a str, mirror: &'a str },
}

/// A running tap (see the module docs). [`EgressTap::stop`] ends it.
#[derive(Debug)]
pub struct EgressTap {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<Tapped>>>,
    /// The hand-off point's mirror rule, removed when the tap ends.
    _mirror: Option<MirrorRule>,
}

impl EgressTap {
    /// Taps `point` for the datagrams that `server` sends to `reference` and to `other`.
    pub fn start(
        point: TapPoint<'_>,
        server: SocketAddr,
        reference: SocketAddr,
        other: SocketAddr,
    ) -> Result<EgressTap> {
        if reference.port() == other.port() {
            bail!("the two listeners share port {}", reference.port());
        }
        let ports = [reference.port(), other.port()];
        match point {
            TapPoint::Transmit { interface } => {
                EgressTap::read(open(interface, server.port(), ports)?, ports, None)
            }
            TapPoint::HandOff { interface, mirror } => {
                // The socket first, so nothing mirrored is missed.
                let socket = open(mirror, server.port(), ports)?;
                let rule = MirrorRule::add(interface, mirror, server.port(), ports)?;
                EgressTap::read(socket, ports, Some(rule))
            }
        }
    }

    /// Starts the reader of `socket`.
    fn read(socket: OwnedFd, ports: [u16; 2], mirror: Option<MirrorRule>) -> Result<EgressTap> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ports = (ports[0], ports[1]);
        let reader = std::thread::Builder::new()
            .name("egress-tap".to_owned())
            .spawn(move || read_until(&socket, ports, &stopped))
            .context("spawning the egress tap's reader")?;
        Ok(EgressTap {
            stop,
            reader: Some(reader),
            _mirror: mirror,
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

/// The `tc` filter priority of the hand-off point's mirror rule on the server's interface.
const MIRROR_PRIORITY: &str = "49";

/// The hand-off point's rule (see the module docs): on `interface`'s egress hook, datagrams from
/// the server's port to either listener's port are mirrored to `mirror`. Removed on drop.
#[derive(Debug)]
struct MirrorRule {
    interface: String,
}

impl MirrorRule {
    fn add(interface: &str, mirror: &str, server_port: u16, ports: [u16; 2]) -> Result<Self> {
        // The hook's qdisc may already be there (`scripts/swarm-netns` adds it).
        if !tc(&format!("qdisc show dev {interface}"))?.contains("clsact") {
            tc(&format!("qdisc add dev {interface} clsact"))?;
        }
        let rule = MirrorRule {
            interface: interface.to_owned(),
        };
        for port in ports {
            // `ip sport`/`dport` read the UDP header after a 20-byte IP header, which is what
            // the server sends (no options).
            tc(&format!(
                "filter add dev {interface} egress protocol ip prio {MIRROR_PRIORITY} u32 \
                 match ip protocol 17 0xff match ip sport {server_port} 0xffff \
                 match ip dport {port} 0xffff action mirred egress mirror dev {mirror}"
            ))?;
        }
        Ok(rule)
    }
}

impl Drop for MirrorRule {
    fn drop(&mut self) {
        let interface = &self.interface;
        if let Err(err) = tc(&format!(
            "filter del dev {interface} egress protocol ip prio {MIRROR_PRIORITY}"
        )) {
            eprintln!("egress tap: removing the mirror rule: {err:#}");
        }
    }
}

/// Runs `tc` with the words of `command` (interface names hold no spaces): its output, or its
/// error output as the error.
fn tc(command: &str) -> Result<String> {
    let out = std::process::Command::new("tc")
        .args(command.split_whitespace())
        .output()
        .context("running tc (iproute2; scripts/bootstrap installs it)")?;
    if !out.status.success() {
        bail!(
            "tc {command} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

    fn root() -> Result<bool> {
        Ok(std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0)
    }

    /// Sends 20 frames from a server socket to three listeners on loopback (with a stranger's
    /// datagram and the server's RTCP beside them), tapped at `point` for listeners 0 and 2, and
    /// checks that exactly their RTP was seen and paired.
    fn loopback_fan_out_is_paired(point: TapPoint<'_>) -> Result<()> {
        let server = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = |s: &std::net::UdpSocket| s.local_addr();
        let tap = EgressTap::start(
            point,
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
            "{point:?}: {s:?}"
        );
        assert_eq!(s.pairs, 20, "{point:?}: {s:?}");
        // Listener 2's datagram leaves after listener 0's (and 1's), within the same frame.
        assert!(s.min_ms > 0.0 && s.max_ms < 10.0, "{point:?}: {s:?}");
        Ok(())
    }

    /// On loopback, as root: the filter passes the server's datagrams to the two ports and
    /// nothing else, and the departures pair up by their sequence numbers.
    #[test]
    fn the_tap_sees_only_the_two_listeners_datagrams_on_loopback() -> Result<()> {
        if !root()? {
            eprintln!("SKIPPED: the egress tap needs CAP_NET_RAW (run as root)");
            return Ok(());
        }
        loopback_fan_out_is_paired(TapPoint::Transmit { interface: "lo" })
    }

    /// The same at the hand-off point, as root: the mirror rule copies exactly the two
    /// listeners' datagrams to an `ifb` device of the test's own, and is gone after the tap.
    #[test]
    fn the_hand_off_tap_mirrors_only_the_two_listeners_datagrams_on_loopback() -> Result<()> {
        if !root()? {
            eprintln!("SKIPPED: the hand-off tap needs CAP_NET_ADMIN (run as root)");
            return Ok(());
        }
        let mirror = format!("ctapt{}", std::process::id() % 100_000);
        let ip = |args: &str| -> Result<()> {
            let status = std::process::Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .context("running ip")?;
            anyhow::ensure!(status.success(), "ip {args}: {status}");
            Ok(())
        };
        // The tap adds loopback's egress hook if it is missing; the test takes it away again.
        let had_hook = tc("qdisc show dev lo")?.contains("clsact");
        ip(&format!("link add {mirror} type ifb"))?;
        let result = ip(&format!("link set {mirror} up")).and_then(|()| {
            loopback_fan_out_is_paired(TapPoint::HandOff {
                interface: "lo",
                mirror: &mirror,
            })
        });
        let rules = tc("filter show dev lo egress")?;
        ip(&format!("link del {mirror}"))?;
        if !had_hook {
            tc("qdisc del dev lo clsact")?;
        }
        result?;
        assert!(
            !rules.contains(&mirror),
            "the mirror rule outlived the tap: {rules}"
        );
        Ok(())
    }
}
