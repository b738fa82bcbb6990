//! Listener media handed straight to the network device (`AF_PACKET`), skipping the kernel's
//! UDP and IP send path.
//!
//! A room's frame to thousands of listeners is thousands of datagrams of ~100 bytes, and the
//! kernel's UDP send path (socket lock, route lookup, IP output, neighbour output) costs more
//! per datagram than everything Chorus does for it. On the bench's veth pair a minimal loop
//! measured about 2.9 µs per datagram through a UDP socket's `sendmmsg` and about 1.6 µs through
//! a packet socket's. So when [`PortConfig::link_layer_fan_out`](super::PortConfig) is on and the
//! process may open packet sockets (`CAP_NET_RAW`), listener media leaves as whole Ethernet
//! frames built here: Ethernet, IPv4 and UDP headers (with both checksums) before the sealed
//! SRTP packet, from the port's own address and port, so a listener cannot tell the difference.
//!
//! How a destination is resolved (on the port's task, never per packet): the kernel's own route
//! for it (one `RTM_GETROUTE` netlink request: the interface, the gateway, the preferred source),
//! the next hop's MAC from the kernel's neighbour table (`/proc/net/arp`), the interface's MAC
//! and type from `getifaddrs`. The result is cached per destination address and looked up again
//! every [`HOP_TTL`], so a moved gateway is followed.
//!
//! Written by hand, and why: no crate builds UDP/IPv4/Ethernet headers into caller-owned
//! buffers without allocating, and one fixed netlink request does not warrant a netlink crate
//! family (`rtnetlink` is async and pulls its own runtime glue). Everything here is safe code
//! over `nix`.
//!
//! Invariants:
//! - Nothing is lost to this path. A datagram whose destination is not resolved (IPv6, no
//!   neighbour entry yet, an interface that is neither Ethernet nor loopback, a route the kernel
//!   refuses) goes through the UDP socket, as does any datagram the packet socket does not take
//!   (full queue, device down). The UDP socket's own sends keep the kernel's neighbour entries
//!   alive, and a missed destination is resolved after the send.
//! - A datagram is sent once: the packet socket either took it or reported an error before it,
//!   and only then does the UDP socket send it. Sealed bytes are never sealed again.
//! - The port's UDP socket still carries everything else (ICE, DTLS, RTCP, talkers' media,
//!   phone legs) and still receives everything.
//! - Frames skip the pod's own netfilter `OUTPUT` rules and the socket's cgroup hooks (they still
//!   pass the device's queueing discipline and whatever the node applies past the device). That
//!   is why it is opt-in.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, MultiHeaders, NetlinkAddr, SockFlag, SockProtocol, SockType, bind,
    recv, sendmmsg, sendto, setsockopt, socket, sockopt,
};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

/// How long a resolved destination is trusted before it is looked up again.
pub(crate) const HOP_TTL: Duration = Duration::from_secs(10);
/// How long an unresolvable destination goes through the UDP socket before it is tried again
/// (long enough for the kernel to resolve its neighbour from the UDP socket's own sends).
const RETRY_UNRESOLVED: Duration = Duration::from_secs(1);
/// Destinations looked up per port turn, so a crowd joining at once does not stall the task.
const RESOLVE_PER_TURN: usize = 64;
/// The send buffer asked for on each packet socket. A frame stays charged to the socket until
/// the receiving end takes it (on a veth pair, the peer's IP receive; on a NIC, the end of its
/// DMA), and a 2,000-listener fan-out keeps about 1.5 MB in flight: with the kernel's default
/// (about 208 KiB) most of a large fan-out would find the socket full and go through the UDP
/// socket. The kernel caps the request at `net.core.wmem_max`.
const PACKET_SEND_BUFFER: usize = 4 << 20;
/// Datagrams larger than this go through the UDP socket (the frame must fit any usual MTU).
const MAX_LINK_PAYLOAD: usize = 1200;
/// Ethernet (14) + IPv4 (20) + UDP (8).
const HEADERS: usize = 42;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// `ARPHRD_ETHER` (linux/if_arp.h): the one device type handled.
const ARPHRD_ETHER: u16 = 1;

/// Where frames to one destination go, resolved from the kernel's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The egress interface (its packet socket is in [`LinkLayer::sockets`]).
    ifindex: usize,
    /// The next hop's MAC.
    next_hop_mac: [u8; 6],
    /// The interface's own MAC.
    own_mac: [u8; 6],
    /// The IPv4 source address put in the frames.
    source: Ipv4Addr,
}

/// Why a destination goes through the UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unresolved {
    /// The kernel has no unicast route to it (or refused the lookup).
    NoRoute(String),
    /// The next hop has no complete entry in the neighbour table yet.
    NoNeighbour(Ipv4Addr),
    /// The egress interface is not Ethernet, or has no packet address.
    Interface(String),
    /// The destination is this host: the kernel delivers a frame that enters without its own
    /// route attached only if the sender is not local (else it drops it as a martian), so local
    /// listeners keep the kernel's loopback path.
    Local,
}

/// The packet sockets, the resolved destinations, and what the port's sends missed.
#[derive(Debug)]
pub(crate) struct LinkLayer {
    /// The UDP port every frame comes from (the port socket's).
    source_port: u16,
    /// The port socket's own IPv4 address, if it is bound to one (else the route's source).
    bound: Option<Ipv4Addr>,
    /// One packet socket per egress interface, bound to it.
    sockets: FxHashMap<usize, OwnedFd>,
    hops: FxHashMap<Ipv4Addr, (Hop, Instant)>,
    /// Destinations that could not be resolved, and when to try again.
    unresolved: FxHashMap<Ipv4Addr, Instant>,
    /// Destinations sends found in neither map, for the port to resolve after its flush.
    missed: Mutex<FxHashSet<Ipv4Addr>>,
    /// IPv4 identification of the next frame (DF is set, so it only needs to vary).
    ip_id: AtomicU16,
    /// Datagrams the packet sockets took.
    sent: AtomicU64,
    netlink: OwnedFd,
    netlink_seq: u32,
    /// When resolved destinations are next checked for age.
    next_sweep: Instant,
}

impl LinkLayer {
    /// Opens the netlink socket and checks that packet sockets may be opened (`CAP_NET_RAW`).
    /// `udp_local` is the port socket's address. Fails with why, for the caller to log and to
    /// go on with the UDP socket alone.
    pub(crate) fn open(udp_local: SocketAddr) -> Result<Self, String> {
        let probe = packet_socket()
            .map_err(|err| format!("cannot open a packet socket ({err}); it needs CAP_NET_RAW"))?;
        drop(probe);
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|err| format!("cannot open a route netlink socket: {err}"))?;
        // The kernel answers a route request at once; the timeout only guards the port's task
        // against a kernel that never does.
        setsockopt(
            &netlink,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .map_err(|err| format!("cannot set the netlink socket's timeout: {err}"))?;
        let bound = match udp_local.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        };
        Ok(LinkLayer {
            source_port: udp_local.port(),
            bound,
            sockets: FxHashMap::default(),
            hops: FxHashMap::default(),
            unresolved: FxHashMap::default(),
            missed: Mutex::new(FxHashSet::default()),
            ip_id: AtomicU16::new(0),
            sent: AtomicU64::new(0),
            netlink,
            netlink_seq: 0,
            next_sweep: Instant::now() + RETRY_UNRESOLVED,
        })
    }

    /// Datagrams the packet sockets have taken, since the last call.
    pub(crate) fn take_sent(&self) -> u64 {
        self.sent.swap(0, Ordering::Relaxed)
    }

    /// The resolved hop for `to`, noting it as missed when it was never tried.
    fn hop(&self, to: SocketAddr) -> Option<Hop> {
        let SocketAddr::V4(to) = to else {
            return None;
        };
        if let Some((hop, _)) = self.hops.get(to.ip()) {
            return Some(*hop);
        }
        if !self.unresolved.contains_key(to.ip()) {
            // Poisoned only if a sender panicked mid-insert, which leaves a valid set.
            let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            missed.insert(*to.ip());
        }
        None
    }

    /// Sends the start of `batch`: a run of datagrams with resolved hops on one interface
    /// through its packet socket, or a run without through `udp`. Returns how many were sent,
    /// as [`super::port::send_batch`] does (so `Ok(0)` or an error concern `batch[0]`).
    pub(crate) fn send_batch(
        &self,
        udp: &UdpSocket,
        batch: &[(SocketAddr, &[u8])],
    ) -> std::io::Result<usize> {
        let Some(&(first_to, _)) = batch.first() else {
            return Ok(0);
        };
        let first = self
            .hop(first_to)
            .filter(|_| batch[0].1.len() <= MAX_LINK_PAYLOAD);
        let Some(first) = first else {
            // `batch[0]` is known to go this way; the run ends before the next that need not.
            let run = batch[1..]
                .iter()
                .position(|&(to, d)| d.len() <= MAX_LINK_PAYLOAD && self.hop(to).is_some())
                .map_or(batch.len(), |i| i + 1);
            return super::port::send_batch(udp, &batch[..run]);
        };
        let mut hops = Vec::with_capacity(batch.len());
        hops.push(first);
        for &(to, datagram) in &batch[1..] {
            match self.hop(to) {
                Some(hop) if hop.ifindex == first.ifindex && datagram.len() <= MAX_LINK_PAYLOAD => {
                    hops.push(hop)
                }
                _ => break,
            }
        }
        let run = &batch[..hops.len()];
        match self.send_frames(first.ifindex, run, &hops) {
            Ok(sent) if sent > 0 => {
                self.sent.fetch_add(sent as u64, Ordering::Relaxed);
                Ok(sent)
            }
            // Refused (full queue, device gone) or nothing taken: the UDP socket sends what the
            // packet socket did not, so nothing is lost.
            Ok(_) => super::port::send_batch(udp, run),
            Err(err) => {
                debug!(%err, "packet socket refused a frame; sending through the UDP socket");
                super::port::send_batch(udp, run)
            }
        }
    }

    /// One `sendmmsg` of whole frames on interface `ifindex`'s packet socket.
    fn send_frames(
        &self,
        ifindex: usize,
        run: &[(SocketAddr, &[u8])],
        hops: &[Hop],
    ) -> std::io::Result<usize> {
        let Some(socket) = self.sockets.get(&ifindex) else {
            return Ok(0);
        };
        let first_id = self.ip_id.fetch_add(run.len() as u16, Ordering::Relaxed);
        let mut headers = vec![[0u8; HEADERS]; run.len()];
        for (i, ((to, datagram), hop)) in run.iter().zip(hops).enumerate() {
            let SocketAddr::V4(to) = to else {
                return Ok(0);
            };
            write_headers(
                &mut headers[i],
                hop,
                // Already the bound address where there is one (`resolve_one`).
                hop.source,
                self.source_port,
                *to,
                first_id.wrapping_add(i as u16),
                datagram,
            );
        }
        let slices: Vec<[std::io::IoSlice<'_>; 2]> = headers
            .iter()
            .zip(run)
            .map(|(header, (_, datagram))| {
                [
                    std::io::IoSlice::new(header),
                    std::io::IoSlice::new(datagram),
                ]
            })
            .collect();
        // The socket is bound to its interface: no per-frame address.
        let addrs: Vec<Option<nix::sys::socket::LinkAddr>> = vec![None; run.len()];
        let mut multi = MultiHeaders::<nix::sys::socket::LinkAddr>::preallocate(run.len(), None);
        let results = sendmmsg(
            socket.as_raw_fd(),
            &mut multi,
            &slices,
            &addrs,
            [],
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        Ok(results.count())
    }

    /// Resolves up to [`RESOLVE_PER_TURN`] destinations that sends missed, and looks up again
    /// those resolved more than [`HOP_TTL`] ago. Runs on the port's task after a flush.
    pub(crate) fn resolve(&mut self, now: Instant) {
        let missed: Vec<Ipv4Addr> = {
            // Poisoned only if a sender panicked mid-insert, which leaves a valid set.
            let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            let take: Vec<Ipv4Addr> = missed.iter().take(RESOLVE_PER_TURN).copied().collect();
            for ip in &take {
                missed.remove(ip);
            }
            take
        };
        // Ages are checked once a second: a sweep of every destination on each flush would cost
        // the port more than the lookups it saves.
        let mut stale = Vec::new();
        if now >= self.next_sweep {
            self.next_sweep = now + RETRY_UNRESOLVED;
            self.unresolved.retain(|_, retry| *retry > now);
            stale = self
                .hops
                .iter()
                .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= HOP_TTL)
                .map(|(ip, _)| *ip)
                .take(RESOLVE_PER_TURN.saturating_sub(missed.len()))
                .collect();
        }
        if missed.is_empty() && stale.is_empty() {
            return;
        }
        let tables = match KernelTables::read() {
            Ok(tables) => tables,
            Err(err) => {
                warn!(%err, "cannot read the interfaces or the neighbour table; listener media goes through the UDP socket");
                for ip in missed {
                    self.unresolved.insert(ip, now + RETRY_UNRESOLVED);
                }
                return;
            }
        };
        for ip in missed.into_iter().chain(stale) {
            match self.resolve_one(ip, &tables) {
                Ok(hop) => {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        self.sockets.entry(hop.ifindex)
                    {
                        match open_bound(&tables, hop.ifindex) {
                            Ok(fd) => {
                                info!(
                                    ifindex = hop.ifindex,
                                    "listener media goes to this interface's packet socket"
                                );
                                slot.insert(fd);
                            }
                            Err(err) => {
                                warn!(%err, ifindex = hop.ifindex, "cannot open a packet socket on this interface; its listeners' media goes through the UDP socket");
                                self.hops.remove(&ip);
                                self.unresolved.insert(ip, now + RETRY_UNRESOLVED);
                                continue;
                            }
                        }
                    }
                    self.hops.insert(ip, (hop, now));
                }
                Err(why) => {
                    debug!(%ip, ?why, "listener media to this address goes through the UDP socket");
                    self.hops.remove(&ip);
                    self.unresolved.insert(ip, now + RETRY_UNRESOLVED);
                }
            }
        }
    }

    fn resolve_one(&mut self, ip: Ipv4Addr, tables: &KernelTables) -> Result<Hop, Unresolved> {
        self.netlink_seq = self.netlink_seq.wrapping_add(1);
        let route = query_route(&self.netlink, self.netlink_seq, ip)?;
        let link = tables.links.get(&route.ifindex).ok_or_else(|| {
            Unresolved::Interface(format!("no link address for interface {}", route.ifindex))
        })?;
        let next_hop = route.gateway.unwrap_or(ip);
        if link.hatype != ARPHRD_ETHER {
            return Err(Unresolved::Interface(format!(
                "{} is of ARP hardware type {}, not Ethernet",
                link.name, link.hatype
            )));
        }
        let next_hop_mac = *tables
            .neighbours
            .get(&(next_hop, link.name.clone()))
            .ok_or(Unresolved::NoNeighbour(next_hop))?;
        let source = self
            .bound
            .or(route.preferred_source)
            .ok_or_else(|| Unresolved::NoRoute("the route names no source address".into()))?;
        Ok(Hop {
            ifindex: route.ifindex,
            next_hop_mac,
            own_mac: link.mac,
            source,
        })
    }

    /// The hop cached for `ip`, for tests.
    #[cfg(test)]
    pub(crate) fn cached(&self, ip: Ipv4Addr) -> Option<Hop> {
        self.hops.get(&ip).map(|(hop, _)| *hop)
    }
}

/// A packet socket that receives nothing (protocol 0 hooks it to no traffic).
fn packet_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// A packet socket bound to interface `ifindex`, with `getifaddrs`' own address for it (whose
/// protocol is 0, so binding does not start receiving).
fn open_bound(tables: &KernelTables, ifindex: usize) -> Result<OwnedFd, String> {
    let link = tables
        .links
        .get(&ifindex)
        .ok_or_else(|| format!("no link address for interface {ifindex}"))?;
    let fd = packet_socket().map_err(|err| format!("packet socket: {err}"))?;
    bind(fd.as_raw_fd(), &link.addr).map_err(|err| format!("binding to {}: {err}", link.name))?;
    setsockopt(&fd, sockopt::SndBuf, &PACKET_SEND_BUFFER)
        .map_err(|err| format!("sizing the send buffer on {}: {err}", link.name))?;
    // Linux reports twice what it granted (half for its bookkeeping).
    match nix::sys::socket::getsockopt(&fd, sockopt::SndBuf) {
        Ok(granted) if granted < PACKET_SEND_BUFFER => warn!(
            asked = PACKET_SEND_BUFFER,
            granted,
            interface = %link.name,
            "the packet socket's send buffer is smaller than asked (capped by \
             net.core.wmem_max): part of a large fan-out will go through the UDP socket"
        ),
        _ => {}
    }
    Ok(fd)
}

/// Writes the Ethernet, IPv4 and UDP headers of a frame carrying `payload` to `to`.
fn write_headers(
    header: &mut [u8; HEADERS],
    hop: &Hop,
    source: Ipv4Addr,
    source_port: u16,
    to: SocketAddrV4,
    ip_id: u16,
    payload: &[u8],
) {
    let udp_len = (8 + payload.len()) as u16;
    let ip_len = 20 + udp_len;
    header[0..6].copy_from_slice(&hop.next_hop_mac);
    header[6..12].copy_from_slice(&hop.own_mac);
    header[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    let ip = &mut header[14..34];
    ip[0] = 0x45; // version 4, 5 words of header
    ip[1] = 0; // DSCP / ECN
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let ip_checksum = !fold(sum_words(0, ip));
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    let udp = &mut header[34..42];
    udp[0..2].copy_from_slice(&source_port.to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    // The pseudo-header (addresses, protocol, length), the UDP header, then the payload.
    let mut sum = sum_words(0, &source.octets());
    sum = sum_words(sum, &to.ip().octets());
    sum += 17 + u32::from(udp_len);
    sum = sum_words(sum, udp);
    sum = sum_words(sum, payload);
    let checksum = match !fold(sum) {
        // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
}

/// Adds `bytes` as big-endian 16-bit words (an odd last byte padded with zero) to `sum`.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a 32-bit one's-complement sum to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An interface's packet address, as `getifaddrs` gives it.
#[derive(Debug, Clone)]
struct Link {
    name: String,
    hatype: u16,
    mac: [u8; 6],
    addr: nix::sys::socket::LinkAddr,
}

/// The interfaces and the IPv4 neighbour table, read once per round of resolutions.
#[derive(Debug, Default)]
struct KernelTables {
    links: HashMap<usize, Link>,
    /// Complete neighbour entries: (address, interface name) → MAC.
    neighbours: HashMap<(Ipv4Addr, String), [u8; 6]>,
}

impl KernelTables {
    fn read() -> Result<Self, String> {
        let mut links = HashMap::new();
        for entry in nix::ifaddrs::getifaddrs().map_err(|err| format!("getifaddrs: {err}"))? {
            let Some(addr) = entry.address.as_ref().and_then(|a| a.as_link_addr()) else {
                continue;
            };
            links.insert(
                addr.ifindex(),
                Link {
                    name: entry.interface_name.clone(),
                    hatype: addr.hatype(),
                    mac: addr.addr().unwrap_or([0; 6]),
                    addr: *addr,
                },
            );
        }
        let arp = std::fs::read_to_string("/proc/net/arp")
            .map_err(|err| format!("reading /proc/net/arp: {err}"))?;
        Ok(KernelTables {
            links,
            neighbours: parse_arp_table(&arp),
        })
    }
}

/// The complete entries (flag `ATF_COM`) of `/proc/net/arp`'s text.
fn parse_arp_table(text: &str) -> HashMap<(Ipv4Addr, String), [u8; 6]> {
    const ATF_COM: u32 = 0x2;
    let mut table = HashMap::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw_type, flags, mac, _mask, device] = fields[..] else {
            continue;
        };
        let (Ok(ip), Some(flags), Some(mac)) = (
            ip.parse::<Ipv4Addr>(),
            flags
                .strip_prefix("0x")
                .and_then(|f| u32::from_str_radix(f, 16).ok()),
            parse_mac(mac),
        ) else {
            continue;
        };
        if flags & ATF_COM != 0 && mac != [0; 6] {
            table.insert((ip, device.to_string()), mac);
        }
    }
    table
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The kernel's route to one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    ifindex: usize,
    gateway: Option<Ipv4Addr>,
    preferred_source: Option<Ipv4Addr>,
}

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTN_UNICAST: u8 = 1;
/// A destination on this host.
const RTN_LOCAL: u8 = 2;
const AF_INET: u8 = 2;

/// Asks the kernel (`RTM_GETROUTE`) how it would route a datagram to `ip`.
fn query_route(netlink: &OwnedFd, seq: u32, ip: Ipv4Addr) -> Result<Route, Unresolved> {
    let request = route_request(seq, ip);
    sendto(
        netlink.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|err| Unresolved::NoRoute(format!("netlink send: {err}")))?;
    let mut reply = [0u8; 4096];
    // Replies to an earlier request that timed out may still be queued: skip them by sequence.
    for _ in 0..8 {
        let len = recv(netlink.as_raw_fd(), &mut reply, MsgFlags::empty())
            .map_err(|err| Unresolved::NoRoute(format!("netlink receive: {err}")))?;
        let reply = &reply[..len];
        if reply
            .get(8..12)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
            != Some(seq)
        {
            continue;
        }
        return parse_route_reply(reply);
    }
    Err(Unresolved::NoRoute(
        "no netlink reply to the route request".into(),
    ))
}

/// An `RTM_GETROUTE` request for `ip`: `nlmsghdr`, `rtmsg`, one `RTA_DST` attribute.
fn route_request(seq: u32, ip: Ipv4Addr) -> Vec<u8> {
    let mut message = Vec::with_capacity(36);
    message.extend_from_slice(&36u32.to_ne_bytes());
    message.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    message.extend_from_slice(&[AF_INET, 32, 0, 0, 0, 0, 0, 0]);
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&8u16.to_ne_bytes());
    message.extend_from_slice(&RTA_DST.to_ne_bytes());
    message.extend_from_slice(&ip.octets());
    message
}

/// Reads the kernel's answer to [`route_request`].
fn parse_route_reply(reply: &[u8]) -> Result<Route, Unresolved> {
    let u16_at = |at: usize| {
        reply
            .get(at..at + 2)
            .map(|s| u16::from_ne_bytes([s[0], s[1]]))
    };
    let u32_at = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let ipv4_at = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|s| Ipv4Addr::new(s[0], s[1], s[2], s[3]))
    };
    let malformed = || Unresolved::NoRoute("malformed netlink reply".into());
    let length = u32_at(0).ok_or_else(malformed)? as usize;
    let kind = u16_at(4).ok_or_else(malformed)?;
    let reply = reply.get(..length).ok_or_else(malformed)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(16).ok_or_else(malformed)? as i32;
        return Err(Unresolved::NoRoute(format!(
            "the kernel has no route: {}",
            nix::errno::Errno::from_raw(-errno)
        )));
    }
    if kind != RTM_NEWROUTE {
        return Err(Unresolved::NoRoute(format!(
            "unexpected netlink message type {kind}"
        )));
    }
    let route_type = *reply.get(16 + 7).ok_or_else(malformed)?;
    if route_type == RTN_LOCAL {
        return Err(Unresolved::Local);
    }
    if route_type != RTN_UNICAST {
        return Err(Unresolved::NoRoute(format!("route of type {route_type}")));
    }
    let (mut ifindex, mut gateway, mut preferred_source) = (None, None, None);
    let mut at = 16 + 12;
    while let (Some(len), Some(kind)) = (u16_at(at), u16_at(at + 2)) {
        let len = usize::from(len);
        if len < 4 {
            break;
        }
        let value = at + 4;
        match kind {
            RTA_OIF => ifindex = u32_at(value).map(|i| i as usize),
            RTA_GATEWAY => gateway = ipv4_at(value),
            RTA_PREFSRC => preferred_source = ipv4_at(value),
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Ok(Route {
        ifindex: ifindex
            .ok_or_else(|| Unresolved::NoRoute("the route names no interface".into()))?,
        gateway,
        preferred_source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's-complement sum over a whole header, checksum included, is 0xffff when the
    /// checksum is right.
    fn verifies(bytes: &[u8]) -> bool {
        fold(sum_words(0, bytes)) == 0xffff
    }

    #[test]
    fn headers_carry_valid_ipv4_and_udp_checksums() {
        let hop = Hop {
            ifindex: 3,
            next_hop_mac: [2, 0, 0, 0, 0, 1],
            own_mac: [2, 0, 0, 0, 0, 2],
            source: Ipv4Addr::new(10, 77, 0, 1),
        };
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 50_000);
        for payload in [
            &b"odd payload"[..],
            &b"even payload"[..],
            &[0xffu8; 130][..],
        ] {
            let mut header = [0u8; HEADERS];
            write_headers(&mut header, &hop, hop.source, 40_000, to, 7, payload);
            assert_eq!(&header[0..6], &hop.next_hop_mac);
            assert_eq!(&header[6..12], &hop.own_mac);
            assert!(verifies(&header[14..34]), "IPv4 header checksum");
            assert_eq!(
                u16::from_be_bytes([header[16], header[17]]) as usize,
                28 + payload.len()
            );
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&header[26..34]); // source and destination addresses
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&header[38..40]); // UDP length
            pseudo.extend_from_slice(&header[34..42]);
            pseudo.extend_from_slice(payload);
            assert!(verifies(&pseudo), "UDP checksum over the pseudo-header");
            assert_eq!(u16::from_be_bytes([header[34], header[35]]), 40_000);
            assert_eq!(u16::from_be_bytes([header[36], header[37]]), 50_000);
        }
    }

    #[test]
    fn the_neighbour_table_keeps_complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.77.0.2        0x1         0x2         62:1b:aa:77:8d:02     *        csrv\n\
                    192.0.2.9        0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    192.0.2.1        0x1         0x6         02:00:00:00:00:01     *        eth0\n\
                    garbage line\n";
        let table = parse_arp_table(text);
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.get(&(Ipv4Addr::new(10, 77, 0, 2), "csrv".into())),
            Some(&[0x62, 0x1b, 0xaa, 0x77, 0x8d, 0x02])
        );
        assert!(!table.contains_key(&(Ipv4Addr::new(192, 0, 2, 9), "eth0".into())));
        assert_eq!(parse_mac("01:02:03:04:05"), None);
        assert_eq!(parse_mac("01:02:03:04:05:06:07"), None);
    }

    #[test]
    fn a_route_reply_is_read_and_a_refusal_is_an_error() {
        let mut reply = Vec::new();
        reply.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
        reply.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        reply.extend_from_slice(&0u16.to_ne_bytes());
        reply.extend_from_slice(&1u32.to_ne_bytes());
        reply.extend_from_slice(&0u32.to_ne_bytes());
        reply.extend_from_slice(&[AF_INET, 32, 0, 0, 254, 0, 0, RTN_UNICAST]);
        reply.extend_from_slice(&0u32.to_ne_bytes());
        for (kind, value) in [
            (RTA_OIF, 3u32.to_ne_bytes().to_vec()),
            (RTA_GATEWAY, vec![192, 0, 2, 1]),
            (RTA_PREFSRC, vec![192, 0, 2, 2]),
        ] {
            reply.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            reply.extend_from_slice(&kind.to_ne_bytes());
            reply.extend_from_slice(&value);
        }
        let len = reply.len() as u32;
        reply[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            parse_route_reply(&reply),
            Ok(Route {
                ifindex: 3,
                gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
                preferred_source: Some(Ipv4Addr::new(192, 0, 2, 2)),
            })
        );
        // A truncated reply is an error, not a panic.
        for cut in 0..reply.len() {
            let _ = parse_route_reply(&reply[..cut]);
        }
        let mut error = Vec::new();
        error.extend_from_slice(&20u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-101i32).to_ne_bytes()); // ENETUNREACH
        assert!(matches!(
            parse_route_reply(&error),
            Err(Unresolved::NoRoute(_))
        ));
    }

    /// A listener on this host keeps the kernel's path: its destination resolves to "local",
    /// and every datagram to it still arrives, through the UDP socket. (Frames across a real
    /// link are tested by the swarm over a veth pair, `tests/tests/swarm.rs`.) Without
    /// `CAP_NET_RAW`, opening fails with a reason that names it.
    #[tokio::test]
    async fn a_local_listener_keeps_the_udp_socket_and_loses_nothing() {
        let port = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let listener = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = listener.local_addr().expect("bound");
        let mut link = match LinkLayer::open(port.local_addr().expect("bound")) {
            Ok(link) => link,
            Err(why) => {
                assert!(why.contains("CAP_NET_RAW"), "{why}");
                eprintln!("no packet sockets here: {why}");
                return;
            }
        };
        let SocketAddr::V4(v4) = to else {
            unreachable!("bound to IPv4")
        };
        assert_eq!(link.send_batch(&port, &[(to, b"first")]).expect("send"), 1);
        link.resolve(Instant::now());
        assert_eq!(link.cached(*v4.ip()), None);
        assert!(link.unresolved.contains_key(v4.ip()));
        let tables = KernelTables::read().expect("tables");
        assert_eq!(link.resolve_one(*v4.ip(), &tables), Err(Unresolved::Local));
        let batch = [(to, &b"second"[..]), (to, &b"third!"[..])];
        assert_eq!(link.send_batch(&port, &batch).expect("send"), 2);
        assert_eq!(link.take_sent(), 0, "nothing went through a packet socket");
        let mut buffer = [0u8; 64];
        for expected in [&b"first"[..], b"second", b"third!"] {
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(2), listener.recv_from(&mut buffer))
                    .await
                    .expect("a datagram arrives")
                    .expect("receive");
            assert_eq!(&buffer[..len], expected);
            assert_eq!(from, port.local_addr().expect("bound"));
        }
    }
}
