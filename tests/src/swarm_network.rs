//! The listener swarm's own network: a namespace behind a veth pair with threaded NAPI
//! (`scripts/swarm-netns`), so the capacity ramps charge the server for its sends and not for
//! its receivers' delivery.
//!
//! Over loopback the kernel delivers each datagram to the receiving socket inside the sender's
//! `sendmmsg`: at 2,000 listeners about 28 % of the pinned server's CPU went to the swarm's
//! socket lookups and enqueues, work that over a real network runs on the listeners' machines.
//! Across the veth pair the server's send ends at the veth's transmit (the packet queued for
//! the peer, whose NAPI thread is woken if it sleeps), as a send ends at a NIC driver; the
//! swarm side's NAPI thread, pinned to the swarm's CPU, does the delivery. The server side's
//! NAPI thread, which delivers what the listeners send (STUN, RTCP, upstream silence) to the
//! server, is pinned to the server's CPU, and [`SwarmNetwork::server_threads`] names it so its
//! CPU is charged to the server; [`SwarmNetwork::swarm_threads`] likewise to the generator.
//!
//! Sockets are created in a namespace by the thread that lives in it: a Linux thread's network
//! namespace is its own (`setns`), and a socket stays in the namespace it was created in
//! whichever thread uses it. [`NetnsBinder`] hands such a thread bind requests, so the rest of
//! the swarm (its Tokio tasks, its media thread) never leaves this process's namespace and
//! reaches the server's HTTP API as before.
//!
//! Invariants: the namespace and the pair exist from [`SwarmNetwork::up`] until the value
//! drops; building one needs root, `ip` and `ethtool`, and the caller falls back on loopback
//! when it fails (the results say which network each ramp ran on).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};

/// The namespace's name (in `/run/netns`), as `scripts/swarm-netns` makes it.
pub const NAMESPACE: &str = "chorus-swarm";
/// The server side of the pair's interface, in this process's namespace.
pub const SERVER_INTERFACE: &str = "csrv";
/// The `ifb` device the bench's hand-off tap mirrors [`SERVER_INTERFACE`]'s datagrams to
/// (`crate::egress_tap::TapPoint::HandOff`), in this process's namespace.
pub const HAND_OFF_MIRROR: &str = "ctap";
/// The server side of the pair, in this process's namespace.
pub const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
/// The swarm side, in [`NAMESPACE`].
pub const SWARM_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));

type BindRequest = (SocketAddr, mpsc::Sender<std::io::Result<UdpSocket>>);

/// Binds UDP sockets inside [`NAMESPACE`] (see the module docs). Cheap to clone.
#[derive(Clone, Debug)]
pub struct NetnsBinder {
    requests: mpsc::Sender<BindRequest>,
}

impl NetnsBinder {
    /// Starts the thread that lives in `namespace` (a name under `/run/netns`).
    pub fn spawn(namespace: &str) -> Result<NetnsBinder> {
        let path = PathBuf::from("/run/netns").join(namespace);
        let file = std::fs::File::open(&path)
            .with_context(|| format!("opening {} (is the namespace up?)", path.display()))?;
        let (requests, inbox) = mpsc::channel::<BindRequest>();
        let (ready, entered) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{namespace}"))
            .spawn(move || {
                let joined = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = joined.is_ok();
                // The receiver waits for exactly this message; if it is gone, so is the binder.
                let _ = ready.send(joined);
                if !ok {
                    return;
                }
                // Ends when every NetnsBinder clone has dropped.
                for (addr, reply) in inbox {
                    let _ = reply.send(UdpSocket::bind(addr));
                }
            })
            .context("spawning the namespace's binding thread")?;
        entered
            .recv()
            .context("the namespace's binding thread died")?
            .with_context(|| format!("entering the network namespace {namespace}"))?;
        Ok(NetnsBinder { requests })
    }

    /// A UDP socket bound to `addr`, created in the binder's namespace.
    pub fn bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send((addr, reply))
            .context("the namespace's binding thread is gone")?;
        answer
            .recv()
            .context("the namespace's binding thread is gone")?
            .with_context(|| format!("binding {addr} in the swarm's namespace"))
    }
}

/// The swarm's namespace and veth pair, up while this lives.
#[derive(Debug)]
pub struct SwarmNetwork {
    binder: NetnsBinder,
    server_threads: Vec<u32>,
    swarm_threads: Vec<u32>,
    // Declared last, so the pair goes down after the binder's channel has closed.
    _pair: PairDown,
}

/// Takes the namespace and pair down when dropped, whatever failed after they went up.
#[derive(Debug)]
struct PairDown;

impl Drop for PairDown {
    fn drop(&mut self) {
        let script = crate::workspace_root().join("scripts/swarm-netns");
        match Command::new(&script).arg("down").status() {
            Ok(s) if s.success() => {}
            other => eprintln!("swarm network: {} down: {other:?}", script.display()),
        }
    }
}

impl SwarmNetwork {
    /// Builds the namespace and pair with `scripts/swarm-netns up`, the server side's NAPI
    /// thread on `server_cpu` and the swarm side's on `swarm_cpu`.
    pub fn up(server_cpu: usize, swarm_cpu: usize) -> Result<SwarmNetwork> {
        let script = crate::workspace_root().join("scripts/swarm-netns");
        let out = Command::new(&script)
            .args(["up", &server_cpu.to_string(), &swarm_cpu.to_string()])
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        // From here on the guard takes the pair down, also when `up` stopped half-way (the
        // script stops at its first error and leaves what it built).
        let pair = PairDown;
        if !out.status.success() {
            bail!(
                "{} up failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SwarmNetwork {
            server_threads: napi_threads(SERVER_INTERFACE)?,
            swarm_threads: napi_threads("cswarm")?,
            binder: NetnsBinder::spawn(NAMESPACE)?,
            _pair: pair,
        })
    }

    /// Binds sockets on [`SWARM_IP`].
    pub fn binder(&self) -> NetnsBinder {
        self.binder.clone()
    }

    /// Kernel threads whose CPU is the server's (its side's NAPI polling).
    pub fn server_threads(&self) -> &[u32] {
        &self.server_threads
    }

    /// Kernel threads whose CPU is the swarm's (the listeners' delivery).
    pub fn swarm_threads(&self) -> &[u32] {
        &self.swarm_threads
    }
}

/// The pids of the NAPI kernel threads of device `dev` (named `napi/DEV-ID`).
fn napi_threads(dev: &str) -> Result<Vec<u32>> {
    let prefix = format!("napi/{dev}-");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm"))
            && comm.trim_end().starts_with(&prefix)
        {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        bail!("no NAPI thread for {dev}: threaded NAPI did not start");
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binder_without_its_namespace_says_so() {
        let err = NetnsBinder::spawn("chorus-no-such-namespace").unwrap_err();
        assert!(
            format!("{err:#}").contains("is the namespace up?"),
            "{err:#}"
        );
    }
}
