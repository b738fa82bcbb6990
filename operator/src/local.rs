//! The local runtime: one `Conference` YAML run on this machine, for anyone trying Chorus on a
//! laptop (DESIGN §2) and for end-to-end tests of the mesh.
//!
//! It runs the operator's own [`plan`], so what runs locally is what a cluster
//! would get: the same server ids, regions, mixing, transfer and telephony. Only the addresses
//! differ: each region gets its own loopback address (`127.0.0.2`, `127.0.0.3`, ...), each media
//! server is a `chorus-mediaserver serve` child process, and the `MeshPlan` is a file the servers
//! watch (`WORKDIR/mesh.json`) instead of a ConfigMap.
//!
//! Parts:
//! - [`layout`]: pure address assignment and the local mesh plan (generation semantics included).
//! - [`files`]: the working directory (mesh plan written atomically, TLS material, join key, logs).
//! - [`process`]: finding binaries, the server command line, health probes, stopping children.
//! - [`bots`]: who the synthetic talkers are and where they join.
//! - [`secrets`]: the Secrets a Conference names, read from Secret manifests beside it.
//! - [`cli`]: the `chorus-operator local` loop (print join URLs, report deaths, watch the file).
//! - [`LocalConference`]: the library handle tests use; dropping it stops every child.
//!
//! Invariants:
//! - The operator never links media code: servers and bots are separate binaries (DESIGN §3).
//! - A running server never changes address; a live update only adds or removes servers and moves
//!   the mesh generation when the mesh digest moves.
//! - Every child is stopped when the handle goes away (SIGTERM or SIGINT, 3 s, then SIGKILL), also
//!   when start-up fails half way or its future is dropped.
//! - No child outlives this process, even one killed with SIGKILL: each child watches a pipe this
//!   process holds open and exits when it closes ([`process`] says why it is done that way).
//! - The death of one server is reported, never fatal to the rest: the mesh must survive it.

pub mod bots;
pub mod cli;
pub mod files;
pub mod layout;
pub mod process;
pub mod secrets;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use chorus_crds::{Conference, MeshPlan, TelephonyMode};
use tokio::process::Child;

use crate::plan::{Plan, SpecProblem, plan};
use crate::secret_material::MeshCa;
use layout::{LocalLayout, LocalNode, Ports};
use process::Polite;

/// How long a stopped child gets between the polite signal and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Lifetime of the tokens the runtime mints: a day, long enough for a laptop session.
pub const TOKEN_TTL_SECONDS: u64 = 86_400;

/// Why the local runtime could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The Conference file could not be read or parsed.
    #[error("{0}")]
    Input(String),
    /// The spec passed the schema but cannot be satisfied (the same refusal a cluster gives).
    #[error("the conference cannot be satisfied: {0}")]
    Spec(#[from] SpecProblem),
    /// The plan does not fit this machine (ports, loopback addresses).
    #[error("local layout: {0}")]
    Layout(String),
    /// Reading or writing the working directory failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Making certificates or keys failed.
    #[error("secret material: {0}")]
    SecretMaterial(String),
    /// A Secret the Conference names is missing, malformed or lacks a key. The message names the
    /// manifest file and the key, never a value.
    #[error("{}: {message}", path.display())]
    Secret {
        /// The Secret manifest that was (or would be) read.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A binary the runtime starts is not there.
    #[error("{name} not found at {}; build it with `{build}` (or pass {flag} PATH)", path.display())]
    MissingBinary {
        /// The binary's name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// The command that builds it.
        build: String,
        /// The flag that names another path.
        flag: String,
    },
    /// An address a server needs cannot be bound.
    #[error("{id} cannot bind {proto} {addr}: {source}{hint}")]
    Bind {
        /// The server.
        id: String,
        /// `TCP` or `UDP`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: String,
    },
    /// A child process could not be started.
    #[error("starting {id}: {source}")]
    Spawn {
        /// The server id or `bot-<j>`.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A media server exited before it answered its health probe.
    #[error("{0}")]
    Exited(Box<ServerFailure>),
    /// A media server did not answer its health probe in time.
    #[error("{0}")]
    Unhealthy(Box<ServerFailure>),
    /// `chorus-mediaserver token` failed.
    #[error("minting a join token: {0}")]
    Token(String),
    /// No server has this id.
    #[error("no media server {0:?} in this local conference")]
    UnknownServer(String),
    /// A change the local runtime cannot apply live.
    #[error("{0}")]
    Unsupported(String),
}

impl LocalError {
    /// A short, static label (for logs and tests).
    pub fn category(&self) -> &'static str {
        match self {
            LocalError::Input(_) => "input",
            LocalError::Spec(_) => "spec",
            LocalError::Layout(_) => "layout",
            LocalError::Io { .. } => "io",
            LocalError::SecretMaterial(_) => "secret_material",
            LocalError::Secret { .. } => "secret",
            LocalError::MissingBinary { .. } => "missing_binary",
            LocalError::Bind { .. } => "bind",
            LocalError::Spawn { .. } => "spawn",
            LocalError::Exited(_) => "exited",
            LocalError::Unhealthy(_) => "unhealthy",
            LocalError::Token(_) => "token",
            LocalError::UnknownServer(_) => "unknown_server",
            LocalError::Unsupported(_) => "unsupported",
        }
    }
}

/// A media server that did not come up: who, what happened, and the log that says why.
#[derive(Debug)]
pub struct ServerFailure {
    /// The server.
    pub id: String,
    /// Its base URL.
    pub url: String,
    /// What happened, such as `exited (exit status: 1) before answering http://.../healthz`.
    pub what: String,
    /// Its log file.
    pub log: PathBuf,
    /// The log's last lines (may be empty).
    pub tail: String,
}

impl std::fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "media server {} {}; see its log {}",
            self.id,
            self.what,
            self.log.display()
        )?;
        if !self.tail.is_empty() {
            write!(f, "; it ends with:\n{}", self.tail)?;
        }
        Ok(())
    }
}

/// How to run a conference locally. `Default` is what the command line uses without flags.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The working directory; `None` makes a fresh private one under the temp dir, removed again
    /// when the conference stops cleanly.
    pub workdir: Option<PathBuf>,
    /// The media-server binary; `None` looks next to the running executable.
    pub mediaserver_bin: Option<PathBuf>,
    /// HTTP port of server 0 of each region (server i uses `base_port + i`).
    pub base_port: u16,
    /// Media UDP port of server 0; `None` takes the spec's `media.udpPort` (40000 by default).
    pub udp_base_port: Option<u16>,
    /// Mesh UDP port of server 0.
    pub mesh_base_port: u16,
    /// What the mesh plan advertises as a node's mesh address instead of the one it binds (to put
    /// a proxy in between). Keys are server ids.
    pub mesh_addr_override: HashMap<String, SocketAddr>,
    /// How long a server gets to answer `/healthz`.
    pub health_timeout: Duration,
    /// Extra environment for the media servers (such as `RUST_LOG`).
    pub server_env: Vec<(String, String)>,
    /// Keep a fresh working directory after stopping.
    pub keep_workdir: bool,
    /// Where the Secrets the Conference names are read from, as `<name>.yaml` Secret manifests;
    /// `None` is the current directory. The command line passes the Conference file's directory
    /// unless `--secrets` says otherwise.
    pub secrets_dir: Option<PathBuf>,
    /// SIP port of server 0 when the conference dials phones; `None` takes the spec's
    /// `telephony.sipPort` (5060 by default).
    pub sip_base_port: Option<u16>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            workdir: None,
            mediaserver_bin: None,
            base_port: chorus_crds::names::SIGNAL_PORT,
            udp_base_port: None,
            mesh_base_port: chorus_crds::names::MESH_PORT,
            mesh_addr_override: HashMap::new(),
            health_timeout: Duration::from_secs(20),
            server_env: Vec::new(),
            keep_workdir: false,
            secrets_dir: None,
            sip_base_port: None,
        }
    }
}

/// One media server process.
#[derive(Debug)]
pub struct LocalServer {
    /// The server id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its HTTP address (API, web client, probes, metrics).
    pub http: SocketAddr,
    /// Its media UDP address.
    pub udp: SocketAddr,
    /// The mesh UDP address it binds (the plan may advertise another, see
    /// [`LocalOptions::mesh_addr_override`]).
    pub mesh: SocketAddr,
    /// Its SIP address (UDP and TCP) when the conference dials phones from its servers.
    pub sip: Option<SocketAddr>,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    /// The process; `None` after [`LocalConference::kill`] or once it was found dead.
    pub child: Option<Child>,
    node: LocalNode,
}

impl LocalServer {
    fn new(node: LocalNode, log: PathBuf) -> Self {
        Self {
            id: node.id.clone(),
            region: node.region.clone(),
            http: node.http,
            udp: node.udp,
            mesh: node.mesh,
            sip: node.sip,
            log,
            child: None,
            node,
        }
    }

    /// Its base URL: `http://127.0.0.X:PORT`.
    pub fn base_url(&self) -> String {
        self.node.base_url()
    }

    /// The URL a participant opens to join `room` here.
    pub fn join_url(&self, room: &str, token: &str) -> String {
        layout::join_url(&self.node, room, token)
    }

    /// Where it listens, as the layout placed it.
    pub fn node(&self) -> &LocalNode {
        &self.node
    }

    /// Whether its process runs (as far as the runtime knows: a death shows after the next reap).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// One bot process.
#[derive(Debug)]
pub struct LocalBot {
    /// `bot-<j>`, as in its log's name.
    pub name: String,
    /// The server it joined.
    pub server: String,
    /// Its log file.
    pub log: PathBuf,
    /// The process; `None` once it was found dead.
    pub child: Option<Child>,
}

/// What kind of child a [`ChildExit`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildKind {
    /// A media server.
    Server,
    /// A bot.
    Bot,
}

/// A child found dead without the runtime having stopped it.
#[derive(Debug)]
pub struct ChildExit {
    /// Server or bot.
    pub kind: ChildKind,
    /// The server id or bot name.
    pub name: String,
    /// How it ended.
    pub status: ExitStatus,
    /// Its log.
    pub log: PathBuf,
}

/// What [`LocalConference::update`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The mesh generation now in `mesh.json`.
    pub generation: i64,
    /// Whether `mesh.json` was rewritten (its digest moved).
    pub plan_changed: bool,
    /// Servers started for the new plan.
    pub started: Vec<String>,
    /// Servers stopped because the new plan no longer has them.
    pub stopped: Vec<String>,
    /// Servers whose command-line settings changed (such as `maxParticipantsPerServer`); they keep
    /// the old ones until restarted.
    pub needs_restart: Vec<String>,
}

/// A conference running on this machine. Dropping it stops every child.
#[derive(Debug)]
pub struct LocalConference {
    /// The conference's name.
    pub name: String,
    /// The working directory (mesh plan, TLS material, join key, logs).
    pub workdir: PathBuf,
    /// Every media server of the current plan, in plan order.
    pub servers: Vec<LocalServer>,
    /// The bots started so far.
    pub bots: Vec<LocalBot>,
    /// The mesh plan as last written to `mesh.json`.
    pub mesh: MeshPlan,
    plan: Plan,
    layout: LocalLayout,
    ports: Ports,
    advertise: HashMap<String, SocketAddr>,
    ca: MeshCa,
    mediaserver_bin: PathBuf,
    health_timeout: Duration,
    server_env: Vec<(String, String)>,
    remove_workdir: bool,
    secrets_dir: PathBuf,
    sip_files: Option<files::SipFiles>,
}

impl LocalConference {
    /// Plan `conf`, write the working directory, start every media server and wait until each
    /// answers `/healthz`.
    ///
    /// On failure every server started so far is stopped. The working directory is kept when the
    /// error names a log in it (a server that exited or did not answer).
    pub async fn start(conf: &Conference, options: LocalOptions) -> Result<Self, LocalError> {
        let plan = plan(conf)?;
        refuse_edge_mode(conf)?;
        let secrets_dir = options
            .secrets_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        // Before anything is written: a missing Secret is the user's to fix, not a half-made run.
        let user_secrets = secrets::load_all(&plan, &secrets_dir)?;
        let mut ports = Ports::for_conference(conf, options.base_port);
        ports.mesh = options.mesh_base_port;
        if let Some(udp) = options.udp_base_port {
            ports.udp = udp;
        }
        if let Some(sip) = options.sip_base_port {
            ports.sip = sip;
        }
        let layout = layout::layout(conf, &plan, ports, None)?;
        if let Some(id) = options
            .mesh_addr_override
            .keys()
            .find(|id| layout.node(id).is_none())
        {
            return Err(LocalError::UnknownServer(id.clone()));
        }
        let mediaserver_bin = process::resolve_binary(
            options.mediaserver_bin.as_deref(),
            process::MEDIASERVER_BIN,
            "cargo build -p chorus-mediaserver",
            "--mediaserver-bin",
        )?;
        let (workdir, fresh) = match &options.workdir {
            Some(dir) => (dir.clone(), false),
            None => (files::fresh_workdir(&plan.conference)?, true),
        };
        let prepared = (|| {
            files::prepare_workdir(&workdir)?;
            match &conf.spec.auth.join_key_secret_ref {
                Some(r) => {
                    let secret = user_secrets.get(&r.name).ok_or_else(|| {
                        LocalError::SecretMaterial(format!("Secret {:?} was not read", r.name))
                    })?;
                    let key = secret.value(&r.key, "the join-token key (auth.joinKeySecretRef)")?;
                    files::write_join_key_value(&workdir, key)?;
                }
                None => {
                    files::write_join_key(&workdir)?;
                }
            }
            let sip_files =
                files::write_sip_files(&workdir, conf.spec.telephony.as_ref(), &user_secrets)?;
            let ca = files::new_ca(&workdir, &plan.conference)?;
            for node in &layout.nodes {
                files::issue_server_cert(&workdir, &ca, node)?;
            }
            let mesh = layout::local_mesh_plan(&plan, &layout, &options.mesh_addr_override, None)?;
            files::write_mesh_plan(&workdir, &mesh)?;
            Ok::<_, LocalError>((ca, mesh, sip_files))
        })();
        let (ca, mesh, sip_files) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                // Nothing ran yet, so a directory we made holds nothing worth keeping.
                if fresh {
                    let _ = std::fs::remove_dir_all(&workdir);
                }
                return Err(e);
            }
        };

        // From here on the handle owns the children: an error or a dropped future stops them.
        let mut this = Self {
            name: plan.conference.clone(),
            workdir,
            servers: Vec::new(),
            bots: Vec::new(),
            mesh,
            plan,
            layout,
            ports,
            advertise: options.mesh_addr_override,
            ca,
            mediaserver_bin,
            health_timeout: options.health_timeout,
            server_env: options.server_env,
            remove_workdir: fresh && !options.keep_workdir,
            secrets_dir,
            sip_files,
        };
        match this.boot().await {
            Ok(()) => Ok(this),
            Err(e) => {
                // These errors point at a log in the working directory: keep it for the reader.
                if matches!(e, LocalError::Exited(_) | LocalError::Unhealthy(_)) {
                    this.remove_workdir = false;
                }
                Err(e)
            }
        }
    }

    async fn boot(&mut self) -> Result<(), LocalError> {
        for node in &self.layout.nodes {
            preflight(node)?;
        }
        let nodes = self.layout.nodes.clone();
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        for node in nodes {
            let log = files::log_path(&self.workdir, &node.id);
            // A fresh run starts fresh logs; restarts append to them.
            std::fs::write(&log, b"").map_err(files::io_error("creating the log", &log))?;
            let mut server = LocalServer::new(node, log);
            self.spawn(&mut server)?;
            self.servers.push(server);
        }
        self.wait_healthy(&ids).await
    }

    /// The media-server binary in use.
    pub fn mediaserver_bin(&self) -> &Path {
        &self.mediaserver_bin
    }

    /// `WORKDIR/mesh.json`.
    pub fn mesh_plan_path(&self) -> PathBuf {
        self.workdir.join(files::MESH_PLAN_FILE)
    }

    /// `WORKDIR/join.key`.
    pub fn join_key_path(&self) -> PathBuf {
        self.workdir.join(files::JOIN_KEY_FILE)
    }

    /// The placement of every server of the current plan.
    pub fn layout(&self) -> &LocalLayout {
        &self.layout
    }

    /// The server with this id.
    pub fn server(&self, id: &str) -> Result<&LocalServer, LocalError> {
        self.servers
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| LocalError::UnknownServer(id.to_owned()))
    }

    fn server_index(&self, id: &str) -> Result<usize, LocalError> {
        self.servers
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| LocalError::UnknownServer(id.to_owned()))
    }

    /// The servers of one region, in ordinal order.
    pub fn servers_in<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a LocalServer> + 'a {
        self.servers.iter().filter(move |s| s.region == region)
    }

    /// Mint a join token for `room` and `identity` with the conference's key (by running
    /// `chorus-mediaserver token`, so the operator needs no token code of its own).
    pub async fn token(&self, room: &str, identity: &str) -> Result<String, LocalError> {
        let output = tokio::process::Command::new(&self.mediaserver_bin)
            .arg("token")
            .arg("--key-file")
            .arg(self.join_key_path())
            .args([
                "--conference",
                &self.name,
                "--room",
                room,
                "--identity",
                identity,
            ])
            .args(["--ttl", &TOKEN_TTL_SECONDS.to_string()])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                LocalError::Token(format!(
                    "cannot run {}: {e}",
                    self.mediaserver_bin.display()
                ))
            })?;
        let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() || token.is_empty() {
            return Err(LocalError::Token(format!(
                "`{} token` failed ({}): {}",
                self.mediaserver_bin.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(token)
    }

    /// SIGKILL one server, as a crash would end it, and reap it. Its peers are not told; the mesh
    /// must notice by itself. Killing a server that is not running does nothing.
    pub async fn kill(&mut self, id: &str) -> Result<(), LocalError> {
        let i = self.server_index(id)?;
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        }
        Ok(())
    }

    /// Start one server again with the same addresses, certificate and (current) plan, appending to
    /// its log, and wait until it answers `/healthz`. A running server is killed first.
    pub async fn restart(&mut self, id: &str) -> Result<(), LocalError> {
        self.kill(id).await?;
        let i = self.server_index(id)?;
        let mut server = self.servers.remove(i);
        let spawned = self.spawn(&mut server);
        self.servers.insert(i, server);
        spawned?;
        self.wait_healthy(&[id.to_owned()]).await
    }

    /// Children that died since the last call, without the runtime stopping them. Each is
    /// reported once; a dead server stays in the plan (its peers see it as down).
    pub fn reap_exited(&mut self) -> Vec<ChildExit> {
        let mut out = Vec::new();
        for server in &mut self.servers {
            if let Some(status) = reap(&mut server.child) {
                out.push(ChildExit {
                    kind: ChildKind::Server,
                    name: server.id.clone(),
                    status,
                    log: server.log.clone(),
                });
            }
        }
        for bot in &mut self.bots {
            if let Some(status) = reap(&mut bot.child) {
                out.push(ChildExit {
                    kind: ChildKind::Bot,
                    name: bot.name.clone(),
                    status,
                    log: bot.log.clone(),
                });
            }
        }
        out
    }

    /// Advertise `addr` as server `id`'s mesh address in the plan (or, with `None`, its own again)
    /// while the server keeps binding its own. Rewrites `mesh.json` when that changes the plan, and
    /// returns the generation now in force.
    pub fn set_advertised_mesh_addr(
        &mut self,
        id: &str,
        addr: Option<SocketAddr>,
    ) -> Result<i64, LocalError> {
        self.server_index(id)?;
        match addr {
            Some(addr) => self.advertise.insert(id.to_owned(), addr),
            None => self.advertise.remove(id),
        };
        let mesh =
            layout::local_mesh_plan(&self.plan, &self.layout, &self.advertise, Some(&self.mesh))?;
        if mesh.generation != self.mesh.generation {
            files::write_mesh_plan(&self.workdir, &mesh)?;
            self.mesh = mesh;
        }
        Ok(self.mesh.generation)
    }

    /// Apply a changed Conference live: rewrite `mesh.json` when the mesh digest moved (servers
    /// apply it without a restart), start servers the new plan adds (with new certificates) and
    /// stop those it removes. Running servers keep their addresses.
    ///
    /// A spec that does not plan is refused and changes nothing.
    pub async fn update(&mut self, conf: &Conference) -> Result<Update, LocalError> {
        let plan = plan(conf)?;
        refuse_edge_mode(conf)?;
        // Read again: telephony may have been added, or point at another Secret. The join key is
        // not reread: running servers keep trusting the key they started with.
        let user_secrets = secrets::load_all(&plan, &self.secrets_dir)?;
        if plan.conference != self.name {
            return Err(LocalError::Unsupported(format!(
                "the conference was renamed from {} to {}; stop and start it again to rename",
                self.name, plan.conference
            )));
        }
        let layout = layout::layout(conf, &plan, self.ports, Some(&self.layout))?;
        let added: Vec<LocalNode> = layout
            .nodes
            .iter()
            .filter(|n| self.layout.node(&n.id).is_none())
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .layout
            .nodes
            .iter()
            .filter(|n| layout.node(&n.id).is_none())
            .map(|n| n.id.clone())
            .collect();
        let needs_restart: Vec<String> = layout
            .nodes
            .iter()
            .filter(|n| self.layout.node(&n.id).is_some_and(|old| old != *n))
            .map(|n| n.id.clone())
            .collect();
        let mut advertise = self.advertise.clone();
        advertise.retain(|id, _| layout.node(id).is_some());
        let mesh = layout::local_mesh_plan(&plan, &layout, &advertise, Some(&self.mesh))?;
        for node in &added {
            preflight(node)?;
            files::issue_server_cert(&self.workdir, &self.ca, node)?;
        }
        let sip_files =
            files::write_sip_files(&self.workdir, conf.spec.telephony.as_ref(), &user_secrets)?;

        // Publish first: peers learn of a removed server before it goes (no false failure), and a
        // new server finds itself in the plan when it starts.
        let plan_changed = mesh.generation != self.mesh.generation;
        if plan_changed {
            files::write_mesh_plan(&self.workdir, &mesh)?;
        }
        self.mesh = mesh;
        self.plan = plan;
        self.layout = layout;
        self.advertise = advertise;
        self.sip_files = sip_files;

        let (mut leaving, staying): (Vec<LocalServer>, Vec<LocalServer>) =
            std::mem::take(&mut self.servers)
                .into_iter()
                .partition(|s| removed.contains(&s.id));
        self.servers = staying;
        let mut children: Vec<&mut Child> = leaving
            .iter_mut()
            .filter_map(|s| s.child.as_mut())
            .collect();
        process::stop(&mut children, Polite::Term, STOP_GRACE).await;

        let mut started = Vec::new();
        for node in added {
            let log = files::log_path(&self.workdir, &node.id);
            let mut server = LocalServer::new(node, log);
            let id = server.id.clone();
            // Keep plan order in `servers`, so it matches `mesh.nodes`.
            let position = self
                .mesh
                .nodes
                .iter()
                .position(|n| n.id == id)
                .unwrap_or(self.servers.len())
                .min(self.servers.len());
            let spawned = self.spawn(&mut server);
            self.servers.insert(position, server);
            spawned?;
            started.push(id);
        }
        self.wait_healthy(&started).await?;
        Ok(Update {
            generation: self.mesh.generation,
            plan_changed,
            started,
            stopped: removed,
            needs_restart,
        })
    }

    /// Start `count` bots in `room`, spread over the running servers (bot j goes to region
    /// `j % regions`, then round-robin within it), each with its own sentence, voice and level.
    /// Bots started by an earlier call keep their numbers; new ones continue from there.
    pub async fn start_bots(
        &mut self,
        count: usize,
        room: &str,
        bot_bin: Option<&Path>,
    ) -> Result<(), LocalError> {
        if count == 0 {
            return Ok(());
        }
        let bin = process::resolve_binary(
            bot_bin,
            process::BOT_BIN,
            "cargo build -p chorus-tests --bin chorus-bot",
            "--bot-bin",
        )?;
        // Regions in spec order, each with its running servers.
        let regions: Vec<Vec<(String, String)>> = self
            .layout
            .regions
            .iter()
            .map(|(region, _)| {
                self.servers_in(region)
                    .filter(|s| s.is_running())
                    .map(|s| (s.id.clone(), s.base_url()))
                    .collect::<Vec<_>>()
            })
            .filter(|servers| !servers.is_empty())
            .collect();
        let counts: Vec<usize> = regions.iter().map(Vec::len).collect();
        let first = self.bots.len();
        for j in first..first + count {
            let (region, index) = bots::placement(j, &counts).ok_or_else(|| {
                LocalError::Unsupported("no media server is running to take bots".to_owned())
            })?;
            let (server_id, url) = &regions[region][index];
            let name = format!("bot-{j}");
            let token = self.token(room, &bots::identity(j)).await?;
            let args: Vec<std::ffi::OsString> = vec![
                "--server".into(),
                url.into(),
                "--room".into(),
                room.into(),
                "--say".into(),
                bots::sentence(j).into(),
                "--voice".into(),
                bots::voice(j).into(),
                "--level-dbfs".into(),
                bots::level_dbfs(j).to_string().into(),
            ];
            let log = files::log_path(&self.workdir, &name);
            std::fs::write(&log, b"").map_err(files::io_error("creating the log", &log))?;
            // The token goes in the environment: a command line is visible to every user in `ps`.
            let child = process::spawn_logged(
                &bin,
                &args,
                &[("CHORUS_TOKEN".to_owned(), token)],
                &log,
                &name,
            )?;
            self.bots.push(LocalBot {
                name,
                server: server_id.clone(),
                log,
                child: Some(child),
            });
        }
        Ok(())
    }

    /// Keep the working directory when the conference stops (for its logs), even a fresh one.
    pub fn keep_workdir(&mut self) {
        self.remove_workdir = false;
    }

    /// Whether stopping will remove the working directory.
    pub fn removes_workdir(&self) -> bool {
        self.remove_workdir
    }

    /// Stop everything: bots first (SIGINT, so they leave their rooms), then servers (SIGTERM),
    /// each group given [`STOP_GRACE`] before SIGKILL. Removes a fresh working directory unless
    /// told to keep it.
    pub async fn shutdown(mut self) {
        let mut bots: Vec<&mut Child> = self
            .bots
            .iter_mut()
            .filter_map(|b| b.child.as_mut())
            .collect();
        process::stop(&mut bots, Polite::Int, STOP_GRACE).await;
        let mut servers: Vec<&mut Child> = self
            .servers
            .iter_mut()
            .filter_map(|s| s.child.as_mut())
            .collect();
        process::stop(&mut servers, Polite::Term, STOP_GRACE).await;
        for bot in &mut self.bots {
            bot.child = None;
        }
        for server in &mut self.servers {
            server.child = None;
        }
        // Drop removes the working directory.
    }

    fn spawn(&self, server: &mut LocalServer) -> Result<(), LocalError> {
        let args = process::serve_args(
            &server.node,
            &self.name,
            &self.workdir,
            self.sip_files.as_ref(),
        );
        let child = process::spawn_logged(
            &self.mediaserver_bin,
            &args,
            &self.server_env,
            &server.log,
            &server.id,
        )?;
        server.child = Some(child);
        Ok(())
    }

    /// Wait, concurrently, until each of `ids` answers `/healthz`; the first failure is the error.
    async fn wait_healthy(&mut self, ids: &[String]) -> Result<(), LocalError> {
        let timeout = self.health_timeout;
        let waits = self
            .servers
            .iter_mut()
            .filter(|s| ids.contains(&s.id))
            .map(|s| async move {
                let result = match s.child.as_mut() {
                    Some(child) => process::wait_healthy(child, s.http, timeout).await,
                    None => Err(process::NotHealthy::Timeout("not running".to_owned())),
                };
                (s, result)
            });
        let results = futures::future::join_all(waits).await;
        for (server, result) in results {
            let Err(why) = result else { continue };
            let probe = format!("{}/healthz", server.base_url());
            let what = match &why {
                process::NotHealthy::Exited(status) => {
                    format!("exited ({status}) before answering {probe}")
                }
                process::NotHealthy::Timeout(last) => format!(
                    "did not answer {probe} within {} s (last: {last})",
                    timeout.as_secs()
                ),
                process::NotHealthy::Wait(e) => {
                    format!("could not be watched while waiting for {probe}: {e}")
                }
            };
            let failure = Box::new(ServerFailure {
                id: server.id.clone(),
                url: server.base_url(),
                what,
                log: server.log.clone(),
                tail: files::log_tail(&server.log, 15),
            });
            return Err(match why {
                process::NotHealthy::Exited(_) => {
                    server.child = None;
                    LocalError::Exited(failure)
                }
                process::NotHealthy::Timeout(_) | process::NotHealthy::Wait(_) => {
                    LocalError::Unhealthy(failure)
                }
            });
        }
        Ok(())
    }
}

impl Drop for LocalConference {
    fn drop(&mut self) {
        let mut bots: Vec<&mut Child> = self
            .bots
            .iter_mut()
            .filter_map(|b| b.child.as_mut())
            .collect();
        if !bots.is_empty() {
            process::stop_blocking(&mut bots, Polite::Int, STOP_GRACE);
        }
        let mut servers: Vec<&mut Child> = self
            .servers
            .iter_mut()
            .filter_map(|s| s.child.as_mut())
            .collect();
        if !servers.is_empty() {
            process::stop_blocking(&mut servers, Polite::Term, STOP_GRACE);
        }
        if std::thread::panicking() {
            // A failing test: its logs are the evidence.
            eprintln!("chorus: kept {} for its logs", self.workdir.display());
        } else if self.remove_workdir {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}

/// Take the child's exit status if it has exited (reaping it), leaving `None` behind.
fn reap(child: &mut Option<Child>) -> Option<ExitStatus> {
    let status = child.as_mut()?.try_wait().ok()??;
    *child = None;
    Some(status)
}

/// Check that a server's addresses are free, so a clash is a clear error naming the server
/// rather than a line deep in its log. (A race with another program remains possible, and then
/// the server's own error is in its log.)
fn preflight(node: &LocalNode) -> Result<(), LocalError> {
    let hint = |e: &std::io::Error| -> String {
        match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; stop what uses it or choose other ports (--base-port)".to_owned()
            }
            std::io::ErrorKind::AddrNotAvailable => format!(
                "; this system does not route all of 127.0.0.0/8 to loopback (macOS: \
                 `sudo ifconfig lo0 alias {}`)",
                node.ip
            ),
            _ => String::new(),
        }
    };
    let bind_error = |proto: &'static str, addr: SocketAddr| {
        move |source: std::io::Error| LocalError::Bind {
            id: node.id.clone(),
            proto,
            addr,
            hint: hint(&source),
            source,
        }
    };
    drop(std::net::TcpListener::bind(node.http).map_err(bind_error("TCP", node.http))?);
    drop(std::net::UdpSocket::bind(node.udp).map_err(bind_error("UDP", node.udp))?);
    drop(std::net::UdpSocket::bind(node.mesh).map_err(bind_error("UDP", node.mesh))?);
    if let Some(sip) = node.sip {
        drop(std::net::UdpSocket::bind(sip).map_err(bind_error("UDP", sip))?);
        drop(std::net::TcpListener::bind(sip).map_err(bind_error("TCP", sip))?);
    }
    Ok(())
}

/// Edge mode runs the phone side inside an enterprise network, as its own `chorus-mediaserver
/// edge` process; the local runtime starts only media servers, so it says so instead of running a
/// conference whose phone calls could never be placed.
fn refuse_edge_mode(conf: &Conference) -> Result<(), LocalError> {
    if conf
        .spec
        .telephony
        .as_ref()
        .is_some_and(|t| t.mode == TelephonyMode::Edge)
    {
        return Err(LocalError::Unsupported(
            "telephony.mode edge is not run by chorus-operator local (it places calls from an \
             edge bridge inside the enterprise network); use mode server locally"
                .to_owned(),
        ));
    }
    Ok(())
}
