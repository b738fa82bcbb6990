//! The edge rig (DESIGN §11, edge placement): a real Kamailio, a media server process whose plan
//! has telephony in `edge` mode (its edge token Secret mounted as a file), and a
//! `chorus-mediaserver edge` bridge process that registers with Kamailio as the `chorus` line and
//! takes call jobs from the server.
//!
//! The bridge runs as its own process, as an enterprise runs it, so a test can read its log, list
//! its sockets from `/proc`, and restart the server or the call manager under it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chorus_crds::{MeshTelephony, SipTransport, TelephonyMode};

use crate::bot::{Bot, BotConfig};
use crate::call_me::telephony_plan;
use crate::calls_api::CallsApi;
use crate::mediaserver_process::{ProcessOptions, ProcessTelephony, ServerProcess};
use crate::telephony::{CHORUS_PASSWORD, CHORUS_USER, Kamailio};

/// The ports the rig's bridge gives phone RTP: below Linux's ephemeral range (32768-60999), so no
/// port 0 socket (the bridge's own SIP socket, another test's) can land in it.
pub const RTP_PORTS: (u16, u16) = (21000, 21999);

/// How a bridge process is started.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Conference server URLs.
    pub servers: Vec<String>,
    /// The edge token it presents.
    pub token: String,
    /// `sip:127.0.0.1:PORT`.
    pub call_manager: String,
    /// The line's `username` and `password` files.
    pub credentials_dir: PathBuf,
    /// Registration expiry asked for.
    pub register_expires: u32,
}

/// A running `chorus-mediaserver edge`, killed when dropped.
#[derive(Debug)]
pub struct BridgeProcess {
    child: Child,
    dir: PathBuf,
}

impl BridgeProcess {
    /// Start a bridge with `options` (SIP on a free loopback port, RTP in [`RTP_PORTS`]).
    pub fn start(options: &BridgeOptions) -> Result<Self> {
        let binary = crate::mediaserver_bin()?;
        let dir = crate::unique_temp_dir("edge-bridge")?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, &options.token)?;
        let log = std::fs::File::create(dir.join("bridge.log"))?;
        let mut command = Command::new(&binary);
        command.arg("edge");
        for server in &options.servers {
            command.args(["--server", server]);
        }
        command
            .arg("--token-file")
            .arg(&token_file)
            .args(["--call-manager", &options.call_manager])
            .arg("--credentials-dir")
            .arg(&options.credentials_dir)
            .args(["--sip-addr", "127.0.0.1:0"])
            .args(["--rtp-ports", &format!("{}-{}", RTP_PORTS.0, RTP_PORTS.1)])
            .args(["--register-expires", &options.register_expires.to_string()])
            .env("RUST_LOG", "info,rsipstack=warn,webrtc=warn,rtc=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} edge", binary.display()))?;
        Ok(Self { child, dir })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default()
    }

    /// Wait until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the bridge's log has no {needle:?} after {timeout:?}:\n{}",
            self.log()
        )
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The sockets the process holds now.
    pub fn sockets(&self) -> Result<Vec<ProcessSocket>> {
        process_sockets(self.pid())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One socket of a process, from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSocket {
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The local address.
    pub local: SocketAddr,
    /// The remote address (unspecified for a socket that is not connected).
    pub remote: SocketAddr,
    /// For TCP, whether it is listening.
    pub listening: bool,
}

/// Every TCP and UDP socket process `pid` holds: its socket inodes (`/proc/PID/fd`) looked up in
/// its network namespace's tables (`/proc/PID/net/{tcp,tcp6,udp,udp6}`).
pub fn process_sockets(pid: u32) -> Result<Vec<ProcessSocket>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut sockets = Vec::new();
    for (table, protocol, v6) in [
        ("tcp", "tcp", false),
        ("tcp6", "tcp", true),
        ("udp", "udp", false),
        ("udp6", "udp", true),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || !inodes.contains(fields[9]) {
                continue;
            }
            sockets.push(ProcessSocket {
                protocol,
                local: proc_addr(fields[1], v6)?,
                remote: proc_addr(fields[2], v6)?,
                // State 0A is TCP_LISTEN.
                listening: protocol == "tcp" && fields[3] == "0A",
            });
        }
    }
    Ok(sockets)
}

/// `0100007F:1F90` (little-endian words) as an address.
fn proc_addr(text: &str, v6: bool) -> Result<SocketAddr> {
    let (ip, port) = text.split_once(':').context("address without a port")?;
    let port = u16::from_str_radix(port, 16)?;
    let bytes: Vec<u8> = (0..ip.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&ip[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    // Each 32-bit word is in host (little-endian) order.
    let mut ordered = Vec::with_capacity(bytes.len());
    for word in bytes.chunks(4) {
        ordered.extend(word.iter().rev());
    }
    let ip: std::net::IpAddr = if v6 {
        let octets: [u8; 16] = ordered
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad IPv6"))?;
        std::net::Ipv6Addr::from(octets).into()
    } else {
        let octets: [u8; 4] = ordered
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad IPv4"))?;
        std::net::Ipv4Addr::from(octets).into()
    };
    Ok(SocketAddr::new(ip, port))
}

/// The plan's telephony block in edge mode for `kam`.
pub fn edge_plan(kam: &Kamailio) -> MeshTelephony {
    MeshTelephony {
        mode: TelephonyMode::Edge,
        credentials_secret: None,
        ..telephony_plan(kam, SipTransport::Udp)
    }
}

/// Kamailio, an edge-mode server process and (once started) a bridge.
#[derive(Debug)]
pub struct EdgeRig {
    /// The call manager.
    pub kam: Kamailio,
    /// The conference server.
    pub server: ServerProcess,
    /// The server's calls API.
    pub api: CallsApi,
    /// The bridge's options (a valid token).
    pub bridge_options: BridgeOptions,
    dir: PathBuf,
}

impl Drop for EdgeRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl EdgeRig {
    /// Start Kamailio and the server (not the bridge). The server's edge token file holds the
    /// token of [`EdgeRig::bridge_options`]; the bridge asks for `register_expires` seconds.
    pub async fn start(register_expires: u32) -> Result<Self> {
        let kam = Kamailio::start()?;
        let dir = crate::unique_temp_dir("edge-rig")?;
        let creds = dir.join("line");
        std::fs::create_dir_all(&creds)?;
        std::fs::write(creds.join("username"), CHORUS_USER)?;
        std::fs::write(creds.join("password"), CHORUS_PASSWORD)?;
        let token_file = dir.join("edge-token");
        // The token is minted with the server's key, which exists once it runs: the file is
        // written right after the start, before any bridge connects.
        std::fs::write(&token_file, "not yet")?;
        let server = ServerProcess::start(ProcessOptions {
            telephony: Some(ProcessTelephony {
                block: edge_plan(&kam),
                credentials_dir: None,
                ca_file: None,
                edge_token_file: Some(token_file.clone()),
            }),
            log_filter: Some("info,rsipstack=warn,webrtc=warn,rtc=warn".to_owned()),
            ..ProcessOptions::default()
        })
        .await?;
        let token = server.edge_token("bridge-1", Duration::from_secs(3600));
        std::fs::write(&token_file, &token)?;
        let api = CallsApi::new(reqwest::Client::new(), &server.base_url);
        let bridge_options = BridgeOptions {
            servers: vec![server.base_url.clone()],
            token,
            call_manager: kam.uri(),
            credentials_dir: creds,
            register_expires,
        };
        Ok(Self {
            kam,
            server,
            api,
            bridge_options,
            dir,
        })
    }

    /// Start a bridge with the rig's options.
    pub fn start_bridge(&self) -> Result<BridgeProcess> {
        BridgeProcess::start(&self.bridge_options)
    }

    /// Wait until the server counts `n` connected bridges whose line is registered.
    pub async fn wait_registered_bridges(&self, n: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let wanted = format!("chorus_edge_bridges{{registered=\"true\"}} {n}");
        loop {
            let metrics = self.api.metrics().await.unwrap_or_default();
            if metrics.contains(&wanted) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server does not see {n} registered bridge(s) after {timeout:?}:\n{}",
                    metrics
                        .lines()
                        .filter(|l| l.contains("edge"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A join token for `room` as `identity`.
    pub fn token(&self, room: &str, identity: &str) -> String {
        self.server.token(room, identity)
    }

    /// A bot joining `room` as `identity`.
    pub async fn join(&self, room: &str, identity: &str, config: BotConfig) -> Result<Bot> {
        self.server.join_bot(room, identity, config).await
    }

    /// The directory of the rig's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
