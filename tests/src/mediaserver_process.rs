//! A `chorus-mediaserver` running as its own process, for benchmarks that must see the server
//! apart from the load: pinned to one CPU with `taskset`, its CPU time read from `/proc`, in the
//! profile the benchmark itself was built with (release under `make bench`).
//!
//! The in-process [`crate::media_server::MediaServer`] is what tests use; this is the same server
//! as users run it, through its command line. The process is killed when the handle drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chorus_crds::MeshTelephony;
use chorus_mediaserver::token::TokenKey;

use crate::bot::{Bot, BotConfig};
use crate::media_server::{hour_token, random_key};
use crate::mesh_cluster::MeshFiles;

/// How a benchmarked server process is started.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    /// Pin the server to this CPU (`taskset -c`).
    pub cpu: Option<usize>,
    /// Pin the server to these CPUs (a `taskset -c` list such as "0-1") when `cpu` is `None`.
    pub cpu_set: Option<String>,
    /// Fan-out workers (`--fan-out-workers`; the server's default, one per core it may use,
    /// when `None`).
    pub fan_out_workers: Option<usize>,
    /// Split fan-outs to at least this many participants across the workers
    /// (`--parallel-fan-out-min`).
    pub parallel_fan_out_min: Option<usize>,
    /// Bind the media socket on this address and advertise it (`--udp-addr`,
    /// `--public-address`), instead of 127.0.0.1: the bench's swarm network
    /// ([`crate::swarm_network::SERVER_IP`]).
    pub udp_ip: Option<std::net::IpAddr>,
    /// Send listeners' media through packet sockets (`--link-layer-fan-out`).
    pub link_layer_fan_out: bool,
    /// Participants the server and one room accept (the defaults are lower than a capacity run).
    pub max_participants: Option<usize>,
    /// Place phone calls: the server runs as the one node of a mesh plan (file, CA and
    /// certificate made as the operator makes them) holding this `telephony` block, with a SIP
    /// socket on a free loopback port (server mode).
    pub telephony: Option<ProcessTelephony>,
    /// `RUST_LOG` for the server (default `warn`).
    pub log_filter: Option<String>,
    /// Encode the mixes in Opus's restricted low-delay mode (`--low-delay`).
    pub low_delay: bool,
    /// Mix on a fixed tick instead of one aligned to the talkers (`--fixed-tick`).
    pub fixed_tick: bool,
    /// The mixing frame in ms (`--frame-ms`; the server's default, 20, when `None`).
    pub frame_ms: Option<u32>,
    /// Run under valgrind's callgrind, instrumentation off until `callgrind_control` turns it
    /// on, counting only the fan-out (`crate::bench::instructions`); dumps go to
    /// `<this>.<pid>.<n>`.
    pub callgrind_out: Option<PathBuf>,
}

/// The telephony of a [`ServerProcess`]: what the operator would put in the plan and mount.
#[derive(Debug, Clone)]
pub struct ProcessTelephony {
    /// The plan's `telephony` block.
    pub block: MeshTelephony,
    /// The directory holding the line's `username` and `password` files (server mode).
    pub credentials_dir: Option<PathBuf>,
    /// The CA of the call manager's TLS certificate, for SIP over TLS.
    pub ca_file: Option<PathBuf>,
    /// Edge mode: the edge token Secret, mounted (bridges must present this token).
    pub edge_token_file: Option<PathBuf>,
}

/// A running `chorus-mediaserver serve`.
#[derive(Debug)]
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    child: Child,
    /// The command line, for restarts on the same ports.
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    log_filter: String,
    key: TokenKey,
    conference: String,
    workdir: PathBuf,
    /// The mesh plan, CA and certificate of a server with telephony (removed on drop).
    _mesh: Option<MeshFiles>,
}

impl ServerProcess {
    /// Starts the server on fresh loopback ports and waits until `/healthz` answers.
    pub async fn start(options: ProcessOptions) -> Result<Self> {
        let binary = crate::mediaserver_bin()?;
        let workdir = crate::unique_temp_dir("bench-server")?;
        let key = random_key();
        let key_file = workdir.join("join-key");
        std::fs::write(&key_file, &key)?;
        let udp_ip = options
            .udp_ip
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let udp = std::net::UdpSocket::bind((udp_ip, 0))
            .and_then(|s| s.local_addr())
            .with_context(|| format!("no free UDP port on {udp_ip}"))?;
        let http = crate::free_tcp_addr()?;
        // A server with telephony runs as the one node of a mesh plan (where the block lives).
        let mesh = match &options.telephony {
            Some(t) => {
                let mut files = MeshFiles::create(&["bench"], 3, |_, bind| bind)?;
                files.plan.telephony = Some(t.block.clone());
                std::fs::write(files.dir.join("mesh.json"), files.plan.to_json())?;
                Some(files)
            }
            None => None,
        };
        let conference = mesh
            .as_ref()
            .map_or_else(|| "bench".to_owned(), |m| m.plan.conference.clone());
        let max = options.max_participants.unwrap_or(500).to_string();
        // taskset and valgrind each exec the next: the child's pid stays the server's.
        let mut launcher: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpus) = options
            .cpu
            .map(|c| c.to_string())
            .or(options.cpu_set.clone())
        {
            launcher.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        if let Some(out) = &options.callgrind_out {
            launcher.extend(["valgrind".into(), "--tool=callgrind".into()]);
            launcher.push("--instr-atstart=no".into());
            for pattern in crate::bench::instructions::COLLECTED {
                launcher.push(format!("--toggle-collect={pattern}").into());
            }
            let mut file = std::ffi::OsString::from("--callgrind-out-file=");
            file.push(out.as_os_str());
            file.push(".%p");
            launcher.push(file);
        }
        let mut command = match launcher.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command
            .arg("serve")
            .args(["--http-addr", &http.to_string()])
            .args(["--udp-addr", &udp.to_string()])
            .args(["--public-address", &udp_ip.to_string()])
            .args(["--conference", &conference])
            .arg("--join-key-file")
            .arg(&key_file)
            .args(["--max-participants", &max])
            .args(["--max-room-participants", &max]);
        if options.low_delay {
            command.arg("--low-delay");
        }
        if options.fixed_tick {
            command.arg("--fixed-tick");
        }
        if let Some(frame_ms) = options.frame_ms {
            command.args(["--frame-ms", &frame_ms.to_string()]);
        }
        if let Some(workers) = options.fan_out_workers {
            command.args(["--fan-out-workers", &workers.to_string()]);
        }
        if options.link_layer_fan_out {
            command.arg("--link-layer-fan-out");
        }
        if let Some(min) = options.parallel_fan_out_min {
            command.args(["--parallel-fan-out-min", &min.to_string()]);
        }
        if let (Some(files), Some(t)) = (&mesh, &options.telephony) {
            let slot = &files.slots[0];
            command
                .args(["--server-id", &slot.id])
                .args(["--region", &slot.region])
                .arg("--mesh-plan-file")
                .arg(files.dir.join("mesh.json"))
                .args(["--mesh-addr", &slot.mesh_bind.to_string()])
                .arg("--mesh-tls-dir")
                .arg(&files.dir);
            if let Some(dir) = &t.credentials_dir {
                command
                    .args(["--sip-addr", "127.0.0.1:0"])
                    .arg("--sip-credentials-dir")
                    .arg(dir);
            }
            if let Some(ca) = &t.ca_file {
                command.arg("--sip-ca-file").arg(ca);
            }
            if let Some(token) = &t.edge_token_file {
                command.arg("--edge-token-file").arg(token);
            }
        }
        let program = PathBuf::from(command.get_program());
        let args: Vec<std::ffi::OsString> = command.get_args().map(ToOwned::to_owned).collect();
        let log_filter = options.log_filter.unwrap_or_else(|| "warn".to_owned());
        let child = spawn_logged(&program, &args, &log_filter, &workdir)?;
        let server = ServerProcess {
            base_url: format!("http://{http}"),
            child,
            program,
            args,
            log_filter,
            key: TokenKey::new(&key).map_err(|e| anyhow::anyhow!("{e}"))?,
            conference,
            workdir,
            _mesh: mesh,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    async fn wait_healthy(&self) -> Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(response) = client
                .get(format!("{}/healthz", self.base_url))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.workdir.join("server.log")).unwrap_or_default();
        bail!("chorus-mediaserver did not become healthy in 60 s; its log:\n{log}")
    }

    /// Kill the server (SIGKILL: no goodbye to anyone), start it again on the same ports and
    /// files, and wait until it is healthy.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn_logged(&self.program, &self.args, &self.log_filter, &self.workdir)?;
        self.wait_healthy().await
    }

    /// Kill the server (SIGKILL) and wait for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's log so far (every start of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.workdir.join("server.log")).unwrap_or_default()
    }

    /// The file holding the server's join key.
    pub fn key_file(&self) -> Option<PathBuf> {
        let path = self.workdir.join("join-key");
        path.exists().then_some(path)
    }

    /// The conference's name.
    pub fn conference(&self) -> &str {
        &self.conference
    }

    /// An edge token for bridge `bridge` of this conference, valid for `ttl`.
    pub fn edge_token(&self, bridge: &str, ttl: Duration) -> String {
        self.key
            .mint_edge(&self.conference, bridge, ttl, std::time::SystemTime::now())
    }

    /// The server's process id (for CPU time and profilers).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A bot joining `room` as `who`.
    pub async fn join_bot(&self, room: &str, who: &str, config: BotConfig) -> Result<Bot> {
        let token = hour_token(&self.key, &self.conference, room, who);
        Bot::join_http(&self.base_url, room, &token, config)
            .await
            .with_context(|| format!("{who} joining room {room}"))
    }

    /// A join token for `room` valid for an hour (for the HTTP API beside the bots').
    pub fn token(&self, room: &str, identity: &str) -> String {
        hour_token(&self.key, &self.conference, room, identity)
    }

    /// Makes hour tokens for `room` by identity, apart from the server (for a swarm's
    /// thousands of listeners).
    pub fn token_maker(&self, room: &str) -> std::sync::Arc<dyn Fn(&str) -> String + Send + Sync> {
        let (key, conference, room) = (self.key.clone(), self.conference.clone(), room.to_owned());
        std::sync::Arc::new(move |identity: &str| hour_token(&key, &conference, &room, identity))
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.base_url))
            .await?
            .text()
            .await?)
    }
}

/// Start `program args` with `RUST_LOG=filter`, its output appended to `dir/server.log`.
fn spawn_logged(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    filter: &str,
    dir: &std::path::Path,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    Command::new(program)
        .args(args)
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}
