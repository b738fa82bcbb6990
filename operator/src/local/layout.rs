//! The pure part of the local runtime: where each server of a plan listens on this machine, and the
//! local `MeshPlan` that tells the servers so.
//!
//! No IO, no clock, no randomness: the same `Conference`, plan, ports and previous layout always give
//! the same layout and mesh plan, so tests can check addresses without starting anything.
//!
//! Invariants:
//! - Region k of the spec (k = 0, 1, ...) gets the loopback address `127.0.0.{k+2}` when the runtime
//!   starts. On a live update ([`layout`] with a previous layout) regions keep the address they had,
//!   and a new region takes the lowest free one, so no running server ever has to move.
//! - Server i (its ordinal) of a region listens on `http + i`, `udp + i` and `mesh + i` of its
//!   region's address, and, when it dials phones (telephony in server mode), on `sip + i` for SIP
//!   over UDP and TCP. Regions differ by address, so ports repeat across regions without clashing,
//!   and a call manager on `127.0.0.1` keeps its own 5060.
//! - The local mesh plan has exactly the cluster plan's node ids, regions (same order), mixing,
//!   transfer and telephony; only `mesh` and `signal` are local addresses.
//! - The generation starts at 1 and moves exactly when [`MeshPlan::digest`] moves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use chorus_crds::{Conference, MeshPlan, TelephonyMode, names};

use super::LocalError;
use crate::plan::Plan;

/// The last octet of the first region's loopback address (`127.0.0.2`). `127.0.0.1` is left alone:
/// it is where everything else on a laptop listens, so a busy 8080 there does not block region 0.
pub const FIRST_REGION_OCTET: u8 = 2;
/// The last usable octet: 127.0.0.255 is the /24's broadcast address on some systems.
pub const LAST_REGION_OCTET: u8 = 254;

/// SIP's well-known port, the schema's default for `telephony.sipPort`.
pub const DEFAULT_SIP_PORT: u16 = 5060;

/// The first port of each kind; server i of a region adds i.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// HTTP: signalling API, web client, probes, metrics.
    pub http: u16,
    /// UDP: WebRTC media.
    pub udp: u16,
    /// UDP: the QUIC mesh.
    pub mesh: u16,
    /// UDP and TCP: SIP, used only when the conference dials phones from its servers.
    pub sip: u16,
}

impl Ports {
    /// The defaults: HTTP from `http` (8080 on the command line), media from the spec's `udpPort`
    /// (40000 unless set), mesh from 7000, SIP from the spec's `telephony.sipPort` (5060 unless
    /// set), as in a cluster.
    pub fn for_conference(conf: &Conference, http: u16) -> Self {
        let sip = conf
            .spec
            .telephony
            .as_ref()
            .and_then(|t| u16::try_from(t.sip_port).ok())
            .unwrap_or(DEFAULT_SIP_PORT);
        Self {
            http,
            udp: u16::try_from(conf.spec.media.udp_port).unwrap_or(40000),
            mesh: names::MESH_PORT,
            sip,
        }
    }
}

/// Where one media server listens on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// The server id, as in the cluster plan (`<conference>-<region>-<ordinal>`).
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its ordinal within the region.
    pub ordinal: u16,
    /// Its region's loopback address.
    pub ip: Ipv4Addr,
    /// HTTP address: `ip:http+ordinal`.
    pub http: SocketAddr,
    /// Media UDP address: `ip:udp+ordinal`.
    pub udp: SocketAddr,
    /// Mesh UDP address the server binds: `ip:mesh+ordinal`.
    pub mesh: SocketAddr,
    /// SIP address (UDP and TCP): `ip:sip+ordinal`, when the conference dials phones from its
    /// servers (telephony in server mode); `None` otherwise.
    pub sip: Option<SocketAddr>,
    /// Its region's `maxParticipantsPerServer`.
    pub max_participants: u32,
}

impl LocalNode {
    /// Base URL of its HTTP API, as the mesh plan's `signal` holds it.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }
}

/// Every server of a conference on this machine, and the address of each region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalLayout {
    /// Regions in spec order with their loopback address (regions without servers included).
    pub regions: Vec<(String, Ipv4Addr)>,
    /// Servers in the plan's node order (regions in spec order, then ordinal).
    pub nodes: Vec<LocalNode>,
}

impl LocalLayout {
    /// The server with this id.
    pub fn node(&self, id: &str) -> Option<&LocalNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The loopback address of a region.
    pub fn region_ip(&self, region: &str) -> Option<Ipv4Addr> {
        self.regions
            .iter()
            .find(|(name, _)| name == region)
            .map(|(_, ip)| *ip)
    }
}

/// The loopback address of region octet `octet`.
pub fn loopback(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, octet)
}

/// Place every server of `plan` on this machine.
///
/// `previous` is the layout already running (on a live update): its regions keep their addresses.
pub fn layout(
    conf: &Conference,
    plan: &Plan,
    ports: Ports,
    previous: Option<&LocalLayout>,
) -> Result<LocalLayout, LocalError> {
    let octets = region_octets(plan, previous)?;
    let regions: Vec<(String, Ipv4Addr)> = plan
        .regions
        .iter()
        .map(|r| (r.name.clone(), loopback(octets[r.name.as_str()])))
        .collect();

    let max_participants: HashMap<&str, u32> = conf
        .spec
        .regions
        .iter()
        .map(|r| {
            let max = u32::try_from(r.max_participants_per_server.max(1)).unwrap_or(1);
            (r.name.as_str(), max)
        })
        .collect();

    let dials_phones = conf
        .spec
        .telephony
        .as_ref()
        .is_some_and(|t| t.mode == TelephonyMode::Server);

    // The plan lists nodes region by region in ordinal order (MeshPlan invariant), so counting the
    // nodes already seen in a region gives the ordinal without parsing ids.
    let mut seen_in_region: HashMap<&str, u16> = HashMap::new();
    let mut nodes = Vec::with_capacity(plan.mesh.nodes.len());
    for node in &plan.mesh.nodes {
        let ordinal_slot = seen_in_region.entry(node.region.as_str()).or_insert(0);
        let ordinal = *ordinal_slot;
        *ordinal_slot += 1;
        let octet = *octets.get(node.region.as_str()).ok_or_else(|| {
            LocalError::Layout(format!(
                "plan node {} names region {:?}, which the plan's regions do not list",
                node.id, node.region
            ))
        })?;
        let ip = loopback(octet);
        let port = |base: u16, what: &str| -> Result<SocketAddr, LocalError> {
            base.checked_add(ordinal)
                .map(|p| SocketAddr::from((ip, p)))
                .ok_or_else(|| {
                    LocalError::Layout(format!(
                        "{what} port {base} + ordinal {ordinal} of {} runs past 65535; \
                         choose a lower base port",
                        node.id
                    ))
                })
        };
        let local = LocalNode {
            id: node.id.clone(),
            region: node.region.clone(),
            ordinal,
            ip,
            http: port(ports.http, "HTTP")?,
            udp: port(ports.udp, "media UDP")?,
            mesh: port(ports.mesh, "mesh UDP")?,
            sip: if dials_phones {
                Some(port(ports.sip, "SIP")?)
            } else {
                None
            },
            max_participants: max_participants
                .get(node.region.as_str())
                .copied()
                .unwrap_or(1),
        };
        // SIP uses UDP and TCP on one port, so it must miss every other port of the server.
        if let Some(sip) = local.sip
            && [local.http, local.udp, local.mesh].contains(&sip)
        {
            return Err(LocalError::Layout(format!(
                "{} would use port {} for SIP and for another of its ports; choose another \
                 telephony.sipPort",
                local.id,
                sip.port()
            )));
        }
        nodes.push(local);
    }
    Ok(LocalLayout { regions, nodes })
}

/// Region name -> last octet. Fresh: spec order from [`FIRST_REGION_OCTET`]. With a previous
/// layout: old regions keep theirs, new ones take the lowest free octets in spec order.
fn region_octets<'p>(
    plan: &'p Plan,
    previous: Option<&LocalLayout>,
) -> Result<BTreeMap<&'p str, u8>, LocalError> {
    let capacity = usize::from(LAST_REGION_OCTET - FIRST_REGION_OCTET) + 1;
    if plan.regions.len() > capacity {
        return Err(LocalError::Layout(format!(
            "{} regions do not fit the {capacity} loopback addresses 127.0.0.{FIRST_REGION_OCTET}..=\
             127.0.0.{LAST_REGION_OCTET}",
            plan.regions.len()
        )));
    }
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    if let Some(previous) = previous {
        for region in &plan.regions {
            if let Some(ip) = previous.region_ip(&region.name) {
                let octet = ip.octets()[3];
                out.insert(region.name.as_str(), octet);
                used.insert(octet);
            }
        }
    }
    let mut free = (FIRST_REGION_OCTET..=LAST_REGION_OCTET).filter(|o| !used.contains(o));
    for region in &plan.regions {
        if !out.contains_key(region.name.as_str()) {
            // Cannot run out: at most `capacity` regions and each takes one octet.
            let octet = free.next().ok_or_else(|| {
                LocalError::Layout("no free loopback address for a new region".to_owned())
            })?;
            out.insert(region.name.as_str(), octet);
        }
    }
    Ok(out)
}

/// The local mesh plan: the cluster plan's mesh with every node's `mesh` and `signal` pointing at
/// this machine, and the generation set against `previous` ([`with_generation`]).
///
/// `advertise` replaces the `mesh` address the plan gives a node (what its peers dial) while the
/// server itself still binds its layout address: a test routes one server's mesh traffic through a
/// proxy this way.
pub fn local_mesh_plan(
    plan: &Plan,
    layout: &LocalLayout,
    advertise: &HashMap<String, SocketAddr>,
    previous: Option<&MeshPlan>,
) -> Result<MeshPlan, LocalError> {
    let mut mesh = plan.mesh.clone();
    for node in &mut mesh.nodes {
        let local = layout.node(&node.id).ok_or_else(|| {
            LocalError::Layout(format!("plan node {} has no local address", node.id))
        })?;
        node.mesh = advertise
            .get(&node.id)
            .copied()
            .unwrap_or(local.mesh)
            .to_string();
        node.signal = local.base_url();
    }
    Ok(with_generation(mesh, previous))
}

/// Set `candidate.generation`: 1 for the first plan, the previous generation when nothing but the
/// generation differs (same digest), the previous plus one otherwise.
pub fn with_generation(mut candidate: MeshPlan, previous: Option<&MeshPlan>) -> MeshPlan {
    candidate.generation = match previous {
        None => 1,
        Some(p) if p.digest() == candidate.digest() => p.generation,
        Some(p) => p.generation + 1,
    };
    candidate
}

/// The `?room=...&token=...` query value: percent-encode everything but RFC 3986 unreserved
/// characters, so a room name with spaces or `&` still lands in the right room.
pub fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL a participant opens to join `room` on `node`.
pub fn join_url(node: &LocalNode, room: &str, token: &str) -> String {
    format!(
        "{}/?room={}&token={}",
        node.base_url(),
        query_escape(room),
        query_escape(token)
    )
}
