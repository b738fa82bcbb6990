//! The kernel's floor under the fan-out's hand-off spread: how long one thread on the server's
//! CPU takes to hand 2,000 frames to the server side's interface when it does nothing else.
//!
//! The hand-off tap (`crate::egress_tap::TapPoint::HandOff`) times a fan-out from its first
//! listener's datagram to its last, as the server hands them to its interface. With every
//! listener sealed before the first send, that spread is the kernel's send path, frame after
//! frame, on one core. This module measures that path alone, with no server: the same kind of
//! socket the server's link-layer fan-out uses (a packet socket bound to the interface), the
//! same `sendmmsg` batches of 256, two slices per frame (headers, then the datagram) and a
//! listener packet's size. So the report can say how far the server's figure sits above what
//! this machine's kernel allows one thread, which no change in the server can go below.
//!
//! The frames are built once, go to the Ethernet broadcast address (the swarm side takes them
//! and its UDP drops them: no socket listens on their port, and the kernel answers nothing to a
//! frame that was not addressed to it alone), and carry a valid IPv4 header. The swarm is not
//! running yet when this is measured, so nothing of the ramp's is disturbed.
//!
//! Written by hand, and why: timing a bare `sendmmsg` loop on a packet socket is a dozen lines
//! over `nix`; no crate measures this.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, MultiHeaders, SockFlag, SockType, bind, sendmmsg,
    setsockopt, socket, sockopt,
};

/// Frames per round: the listener count of the 3 ms target.
pub const FRAMES: usize = 2000;
/// Frames per `sendmmsg`, as the server's fan-out batches them.
const BATCH: usize = 256;
/// Rounds timed; the figure is their median.
const ROUNDS: usize = 40;
/// Between rounds, as between the mixer's frames, so the interface drains each round.
const ROUND_GAP: Duration = Duration::from_millis(20);
/// UDP payload per frame: a sealed 20 ms Opus packet of the bench's talkers is about this.
const DATAGRAM: usize = 140;
/// Ethernet (14) + IPv4 (20) + UDP (8).
const HEADERS: usize = 42;
/// A UDP port nothing listens on in the swarm's namespace (the swarm binds ephemeral ports).
const DISCARD_PORT: u16 = 9;

/// What one measurement found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SendFloor {
    /// Median time from the first `sendmmsg` of a round to the return of its last, in ms.
    pub p50_ms: f64,
    /// `p50_ms` per frame, in µs.
    pub per_frame_us: f64,
}

/// Times 40 rounds of [`FRAMES`] frames from `source` to `destination` out of
/// `interface`, on a thread of its own pinned to `cpu`. Needs `CAP_NET_RAW`.
pub fn measure(
    interface: &str,
    cpu: usize,
    source: std::net::Ipv4Addr,
    destination: std::net::Ipv4Addr,
) -> Result<SendFloor> {
    let link = link_addr(interface)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_this_thread(cpu)?;
            rounds(&link, source, destination)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the send floor's thread panicked"))?
    })
}

/// `interface`'s packet address, as `getifaddrs` gives it (protocol 0: binding it receives
/// nothing).
fn link_addr(interface: &str) -> Result<LinkAddr> {
    for entry in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if entry.interface_name == interface
            && let Some(addr) = entry.address.as_ref().and_then(|a| a.as_link_addr())
        {
            return Ok(*addr);
        }
    }
    bail!("no packet address for interface {interface}: is it up?")
}

fn pin_this_thread(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    // Pid 0: the calling thread alone.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the send floor's thread to CPU {cpu}"))
}

fn rounds(
    link: &LinkAddr,
    source: std::net::Ipv4Addr,
    destination: std::net::Ipv4Addr,
) -> Result<SendFloor> {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a packet socket (needs CAP_NET_RAW)")?;
    bind(fd.as_raw_fd(), link).context("binding the packet socket to its interface")?;
    // As the server asks: room for a whole round in flight.
    setsockopt(&fd, sockopt::SndBuf, &(4 << 20)).context("sizing the send buffer")?;
    let headers: Vec<[u8; HEADERS]> = (0..FRAMES)
        .map(|i| frame_headers(source, destination, i as u16))
        .collect();
    let datagram = [0x5a_u8; DATAGRAM];
    let slices: Vec<[std::io::IoSlice<'_>; 2]> = headers
        .iter()
        .map(|h| [std::io::IoSlice::new(h), std::io::IoSlice::new(&datagram)])
        .collect();
    let addrs: Vec<Option<LinkAddr>> = vec![None; BATCH];
    let mut multi = MultiHeaders::<LinkAddr>::preallocate(BATCH, None);
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        std::thread::sleep(ROUND_GAP);
        let started = Instant::now();
        let mut sent = 0;
        while sent < FRAMES {
            let batch = &slices[sent..(sent + BATCH).min(FRAMES)];
            let n = sendmmsg(
                fd.as_raw_fd(),
                &mut multi,
                batch,
                &addrs[..batch.len()],
                [],
                MsgFlags::empty(),
            )
            .context("sendmmsg on the packet socket")?
            .count();
            if n == 0 {
                bail!("the packet socket took no frame");
            }
            sent += n;
        }
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let p50_ms = times[times.len() / 2];
    Ok(SendFloor {
        p50_ms,
        per_frame_us: p50_ms * 1e3 / FRAMES as f64,
    })
}

/// Ethernet (broadcast, from nobody in particular: the veth does not check), IPv4 (with its
/// checksum, so the far side's IP takes it) and UDP (checksum 0: none, allowed over IPv4).
fn frame_headers(
    source: std::net::Ipv4Addr,
    destination: std::net::Ipv4Addr,
    id: u16,
) -> [u8; HEADERS] {
    let mut h = [0u8; HEADERS];
    h[0..6].copy_from_slice(&[0xff; 6]);
    h[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    h[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 8 + DATAGRAM) as u16;
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let sum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut h[34..42];
    udp[0..2].copy_from_slice(&DISCARD_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&DISCARD_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + DATAGRAM) as u16).to_be_bytes());
    h
}

/// RFC 791's header checksum (over a header whose checksum field is zero).
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_checksum_verifies() {
        let h = frame_headers(
            std::net::Ipv4Addr::new(10, 77, 0, 1),
            std::net::Ipv4Addr::new(10, 77, 0, 2),
            7,
        );
        // With its checksum in place, a valid header sums to 0xffff: its checksum is then 0.
        assert_eq!(ipv4_checksum(&h[14..34]), 0);
        assert_eq!(u16::from_be_bytes([h[16], h[17]]), 20 + 8 + DATAGRAM as u16);
    }

    #[test]
    fn an_unknown_interface_is_named_in_the_error() {
        let err = link_addr("chorus-no-such-if").unwrap_err();
        assert!(format!("{err:#}").contains("chorus-no-such-if"), "{err:#}");
    }

    /// Loopback has a packet address everywhere; sending there needs root (`CAP_NET_RAW`),
    /// as the bench does. Checks that rounds complete and the figure is positive.
    #[test]
    fn loopback_rounds_complete_as_root() {
        let root = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata("/proc/self").expect("/proc/self"),
        ) == 0;
        if !root {
            eprintln!("SKIPPED: the send floor needs CAP_NET_RAW (run as root)");
            return;
        }
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
        let cpu = (0..nix::sched::CpuSet::count())
            .find(|c| cpus.is_set(*c).unwrap_or(false))
            .expect("this thread may run somewhere");
        let floor = measure(
            "lo",
            cpu,
            std::net::Ipv4Addr::LOCALHOST,
            std::net::Ipv4Addr::LOCALHOST,
        )
        .expect("measure on loopback");
        assert!(floor.p50_ms > 0.0 && floor.per_frame_us > 0.0, "{floor:?}");
    }
}
