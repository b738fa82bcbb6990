//! `chorus-tests`: end-to-end tests that run the real binaries against real tools.
//!
//! This library holds what every test file needs to find those: the workspace root, the
//! `chorus-operator` binary (built once per test process), and the external tools that
//! `scripts/bootstrap` installs into `.venv/bin` and `.tools/bin`. A missing tool is a test
//! failure with a message saying how to get it, never a silent skip: a skipped validation looks
//! exactly like a passing one.

pub mod bench;
pub mod bot;
pub mod call_me;
pub mod calls_api;
pub mod demo_shape;
pub mod edge;
pub mod egress_tap;
pub mod janus;
pub mod link;
pub mod media_server;
pub mod mediaserver_process;
pub mod mesh_cluster;
pub mod swarm;
pub mod swarm_network;
pub mod telephony;
pub mod transfer;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

/// The Cargo workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The `chorus-operator` binary, built by `cargo build -p chorus-operator` on first use.
///
/// Integration tests of another crate get no `CARGO_BIN_EXE_*`, so this crate builds the binary
/// itself. Cargo reports where it put it (`--message-format=json`), which keeps this right under a
/// custom `CARGO_TARGET_DIR`. The build runs once per test process; every caller shares its result,
/// including a build failure, which is reported to each of them.
pub fn operator_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    built_once(&BIN, "chorus-operator")
}

/// The `chorus-mediaserver` binary, built on first use like [`operator_bin`], in the profile this
/// crate was built with: a benchmark built with `--release` measures a release server.
pub fn mediaserver_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    built_once(&BIN, "chorus-mediaserver")
}

/// The binary `name` (of the package of the same name), built on the first call for `cell` and
/// shared, build failure included, by every later one.
fn built_once(cell: &OnceLock<Result<PathBuf, String>>, name: &str) -> Result<PathBuf> {
    cell.get_or_init(|| build_bin(name, name).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Builds binary `bin` of workspace package `package` and returns the executable's path.
fn build_bin(package: &str, bin: &str) -> Result<PathBuf> {
    // `CARGO` is the cargo running these tests; using it keeps toolchain and target dir the same.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec![
        "build",
        "--quiet",
        "--message-format=json",
        "--package",
        package,
        "--bin",
        bin,
    ];
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let output = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(&args)
        .output()
        .with_context(|| format!("cannot start {}", cargo.to_string_lossy()))?;
    if !output.status.success() {
        bail!(
            "`cargo build -p {package} --bin {bin}` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // One JSON message per line; the compiler-artifact of the binary carries its `executable`.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built {package} but reported no executable for `{bin}`"))
}

/// An external tool installed by `scripts/bootstrap`: `.venv/bin/<name>` or `.tools/bin/<name>`.
///
/// Only those two places are searched, not `PATH`, so the tests always run the pinned versions.
pub fn tool(name: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let candidates = [
        root.join(".venv/bin").join(name),
        root.join(".tools/bin").join(name),
    ];
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "`{name}` is not installed (looked for {} and {}); run `scripts/bootstrap` \
             (or `make bootstrap`) from {}",
                candidates[0].display(),
                candidates[1].display(),
                root.display()
            )
        })
}

/// Runs `program args...` from the workspace root and returns its output, whatever the exit status.
///
/// Failing to start the program is an error; a non-zero exit is for the caller to judge, since
/// several tests expect one.
pub fn run<I, S>(program: &Path, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    Command::new(program)
        .current_dir(workspace_root())
        .args(&args)
        .output()
        .with_context(|| format!("cannot start {}", describe(program, &args)))
}

/// Like [`run`], but a non-zero exit is an error carrying the program's stdout and stderr.
pub fn run_ok<I, S>(program: &Path, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = run(program, &args)?;
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n--- stdout\n{}--- stderr\n{}",
            describe(program, &args),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A command line for messages, such as `kubernetes-validate --strict crds/conference.yaml`.
fn describe(program: &Path, args: &[std::ffi::OsString]) -> String {
    let name = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(name)
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Held by end-to-end tests that load the machine (dozens of WebRTC peers, real-time audio), so two
/// of them never share the two cores CI has: real-time audio starved of CPU is a different test.
/// An async lock: each test has its own runtime, and the guard lives across awaits.
pub async fn heavy_test_guard() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// `kubernetes-validate --strict FILE` must exit 0 and report no error; returns its report.
pub fn kubernetes_validate_strict(file: &Path) -> Result<String> {
    let output = run_ok(
        &tool("kubernetes-validate")?,
        [OsStr::new("--strict"), file.as_os_str()],
    )?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let failures: Vec<&str> = report
        .lines()
        .filter(|line| line.starts_with("ERROR") || line.contains("FAIL"))
        .collect();
    anyhow::ensure!(
        failures.is_empty(),
        "kubernetes-validate --strict {} exited 0 but reported:\n{}",
        file.display(),
        failures.join("\n")
    );
    Ok(report)
}

/// The text of a file in the workspace, with the path in the error.
pub fn read_workspace_file(relative: &str) -> Result<String> {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Write a scratch file `name` under `dir` (a test's own temporary directory, such as
/// `CARGO_TARGET_TMPDIR`, which only integration tests see) and return its path.
pub fn scratch_file(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A new, empty directory under the system's temporary directory, named `chorus-{what}-…`
/// (process id, a counter and the clock's nanoseconds: never one that exists, which
/// `create_dir` would refuse rather than share).
pub fn unique_temp_dir(what: &str) -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "chorus-{what}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A UDP address of 127.0.0.1 that was free a moment ago (bound to port 0, then released), for
/// a server or relay started next.
pub fn free_udp_addr() -> Result<std::net::SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A TCP address of 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_tcp_addr() -> Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot bind 127.0.0.1:0")?
        .local_addr()?)
}

/// CPU time (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn process_cpu_time(pid: u32) -> Result<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("non-numeric /proc stat field")
    };
    // USER_HZ is 100 on every Linux ABI Rust targets.
    Ok(std::time::Duration::from_millis(
        (ticks(14)? + ticks(15)?) * 10,
    ))
}
