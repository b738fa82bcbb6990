//! Child processes of the local runtime: finding the binaries, the media server's command line,
//! health probes, and stopping children.
//!
//! Invariants:
//! - Children run in their own process group, so a Ctrl-C at the terminal reaches only the runtime,
//!   which then stops them in order (bots first, so they can leave while servers still run). A
//!   child the runtime never stops itself would be reported as an unexpected death.
//! - No child outlives the runtime, however the runtime ends. Stopping children in order covers
//!   SIGTERM, SIGINT and errors, but not SIGKILL or a crash, and those used to leave every server
//!   running and holding its ports, so the next run failed with "Address already in use". The
//!   kernel's own answer, a parent-death signal set with `prctl` between fork and exec, needs
//!   `unsafe` (`pre_exec`), which the workspace forbids. So each child gets a pipe as its standard
//!   input, the runtime keeps the write end for as long as it owns the child, and the child is told
//!   with [`EXIT_ON_STDIN_CLOSE`] to exit when the pipe closes. The kernel closes it when the
//!   runtime dies, whatever kills it; no polling, and no window in which a parent death goes
//!   unseen. The write end is close-on-exec (std's pipes are), so no other child holds it open.
//!   The watch is opt-in because a server run by hand or in a pod often has no standard input at
//!   all, and must not take that for its parent's death.
//! - A child is only ever signalled while it is unreaped, so its pid cannot have been reused.
//! - Secrets never go on a command line (visible in `ps`): the join key and the SIP credentials
//!   are file paths, a bot's token travels in its environment.
//! - The user's `CHORUS_*` environment does not leak into children: local mode configures servers
//!   by flags only, and a stray `CHORUS_JOIN_KEY` must not silently change which key they trust.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chorus_crds::names::env;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use super::LocalError;
use super::files::{JOIN_KEY_FILE, MESH_PLAN_FILE, SipFiles, TLS_DIR, io_error};
use super::layout::LocalNode;

/// The media server's binary name.
pub const MEDIASERVER_BIN: &str = "chorus-mediaserver";
/// The bot's binary name.
pub const BOT_BIN: &str = "chorus-bot";
/// The flag, understood by both binaries, that makes a child exit once its standard input closes.
pub const EXIT_ON_STDIN_CLOSE: &str = "--exit-on-stdin-close";

/// The signal a child gets first, before SIGKILL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polite {
    /// SIGTERM: media servers drain and exit on it.
    Term,
    /// SIGINT: the bot leaves its room on it (and dies without leaving on SIGTERM).
    Int,
}

impl Polite {
    fn flag(self) -> &'static str {
        match self {
            Polite::Term => "-TERM",
            Polite::Int => "-INT",
        }
    }
}

/// Find a binary: `explicit` when given, else next to the running executable. Test executables live
/// in `target/<profile>/deps/`, so the parent of a `deps` directory is searched as well.
pub fn resolve_binary(
    explicit: Option<&Path>,
    name: &str,
    build: &str,
    flag: &str,
) -> Result<PathBuf, LocalError> {
    let missing = |path: PathBuf| LocalError::MissingBinary {
        name: name.to_owned(),
        path,
        build: build.to_owned(),
        flag: flag.to_owned(),
    };
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(missing(path.to_owned()))
        };
    }
    let exe = std::env::current_exe()
        .map_err(io_error("finding the running executable", Path::new(".")))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut candidates = vec![dir.join(name)];
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = dir.parent()
    {
        candidates.push(parent.join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| missing(candidates[0].clone()))
}

/// The `chorus-mediaserver serve` arguments for one node.
///
/// No mixing flags: mixing belongs to the mesh plan's `mixing` block (`mesh.json` here, the
/// ConfigMap in a cluster, whose pods get no mixing flags either). A flag would be a second source
/// that keeps its start-up value while the plan moves on. Telephony settings likewise come from the
/// plan; only where SIP listens and where its secrets lie are flags (`--sip-addr`,
/// `--sip-credentials-dir`, `--sip-ca-file`), as in a pod they are its environment and mounts.
pub fn serve_args(
    node: &LocalNode,
    conference: &str,
    workdir: &Path,
    sip: Option<&SipFiles>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("--http-addr", node.http.to_string().into());
    flag("--udp-addr", node.udp.to_string().into());
    flag("--public-address", node.ip.to_string().into());
    flag("--server-id", node.id.clone().into());
    flag("--region", node.region.clone().into());
    flag("--conference", conference.into());
    flag("--join-key-file", workdir.join(JOIN_KEY_FILE).into());
    flag("--mesh-plan-file", workdir.join(MESH_PLAN_FILE).into());
    flag("--mesh-addr", node.mesh.to_string().into());
    flag("--mesh-tls-dir", workdir.join(TLS_DIR).into());
    flag(
        "--max-participants",
        node.max_participants.to_string().into(),
    );
    if let (Some(addr), Some(files)) = (node.sip, sip) {
        flag("--sip-addr", addr.to_string().into());
        flag(
            "--sip-credentials-dir",
            files.credentials_dir.clone().into(),
        );
        if let Some(ca) = &files.ca_file {
            flag("--sip-ca-file", ca.clone().into());
        }
    }
    let mut out = vec![OsString::from("serve")];
    out.extend(args);
    out
}

/// Start `bin args... --exit-on-stdin-close` with stdout and stderr appended to `log`, in its own
/// process group, and a pipe as its standard input whose write end stays in the returned `Child`:
/// the child ends when that `Child` is dropped or this process dies (see the module docs).
pub fn spawn_logged(
    bin: &Path,
    args: &[OsString],
    envs: &[(String, String)],
    log: &Path,
    id: &str,
) -> Result<Child, LocalError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_error("opening the log", log))?;
    let err_file = file.try_clone().map_err(io_error("opening the log", log))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .arg(EXIT_ON_STDIN_CLOSE)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err_file))
        // A safety net only: the runtime stops children politely itself, this catches a panic path.
        .kill_on_drop(true);
    for name in [
        env::SERVER_ID,
        env::REGION,
        env::CONFERENCE,
        env::NAMESPACE,
        env::MESH_CONFIGMAP,
        env::MESH_TLS_DIR,
        env::PUBLIC_ADDRESS,
        env::UDP_PORT,
        env::MAX_PARTICIPANTS,
        env::JOIN_KEY,
        env::SIP_CREDENTIALS_DIR,
        env::SIP_CA_FILE,
        env::SIP_PORT,
        env::EDGE_TOKEN_FILE,
    ] {
        cmd.env_remove(name);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    #[cfg(unix)]
    cmd.process_group(0);
    cmd.spawn().map_err(|source| LocalError::Spawn {
        id: id.to_owned(),
        source,
    })
}

/// A minimal HTTP/1.1 `GET`: the status code and body. Enough for probes, without an HTTP client
/// dependency in the operator.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2 s"))??;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Why a server did not become healthy.
#[derive(Debug)]
pub enum NotHealthy {
    /// It exited first.
    Exited(ExitStatus),
    /// It did not answer 200 in time; the last thing seen.
    Timeout(String),
    /// Its status could not be read.
    Wait(std::io::Error),
}

/// Poll `GET http://addr/healthz` until it answers 200, the child exits, or `timeout` passes.
pub async fn wait_healthy(
    child: &mut Child,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), NotHealthy> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(NotHealthy::Exited(status)),
            Ok(None) => {}
            Err(e) => return Err(NotHealthy::Wait(e)),
        }
        let last = match http_get(addr, "/healthz").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, _)) => format!("HTTP {code}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(NotHealthy::Timeout(last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send `signal` to every unreaped child in one `kill` call. Best effort: a child that exited in
/// the meantime is simply reaped later. No `libc` here (the crate forbids `unsafe`), hence `kill(1)`.
fn signal_all(children: &mut [&mut Child], signal: Polite) {
    let mut pids: Vec<String> = Vec::new();
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None))
            && let Some(pid) = child.id()
        {
            pids.push(pid.to_string());
        }
    }
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(signal.flag())
        .args(&pids)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether any of `children` is still running (reaping those that exited).
fn any_running(children: &mut [&mut Child]) -> bool {
    children
        .iter_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
}

/// Stop children: `signal`, up to `grace` for them to exit, then SIGKILL. Blocking, so that `Drop`
/// can use it too (it waits at most `grace` plus a moment).
pub fn stop_blocking(children: &mut [&mut Child], signal: Polite, grace: Duration) {
    signal_all(children, signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && any_running(children) {
        std::thread::sleep(Duration::from_millis(25));
    }
    kill_blocking(children);
}

/// SIGKILL every child still running and reap it (waits at most about a second).
pub fn kill_blocking(children: &mut [&mut Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.start_kill();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && any_running(children) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`stop_blocking`] without blocking the async runtime's thread while waiting.
pub async fn stop(children: &mut [&mut Child], signal: Polite, grace: Duration) {
    signal_all(children, signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && any_running(children) {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
        }
    }
}
