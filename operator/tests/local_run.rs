//! The local runtime with real processes: `examples/conference.yaml` as five `chorus-mediaserver`
//! processes on three loopback addresses, through the library and through `chorus-operator local`.
//!
//! The media-server binary is the one next to this test's target directory
//! (`target/<profile>/chorus-mediaserver`); when it is missing it is built with the `cargo` running
//! the tests. `CHORUS_MEDIASERVER_BIN` names another binary. A binary that cannot be had fails the
//! test with a message saying how to get it: a skipped process test looks exactly like a passing one.
//!
//! Ports differ from the defaults (and between the tests), so a `chorus-operator local` someone
//! runs by hand does not collide with the tests. The command has no flag for the mesh ports, so its
//! tests take turns ([`COMMAND`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chorus_crds::{Conference, MeshPlan};
use chorus_operator::local::process::http_get;
use chorus_operator::local::{LocalConference, LocalOptions};
use chorus_operator::manifests;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Held by each test that runs `chorus-operator local`: every run binds the default mesh ports
/// (7000 + i) on 127.0.0.2 and up.
static COMMAND: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn example_text() -> String {
    std::fs::read_to_string(workspace().join("examples/conference.yaml")).unwrap()
}

fn example() -> Conference {
    manifests::read_conference(&example_text(), "default").unwrap()
}

/// The media-server binary: `CHORUS_MEDIASERVER_BIN`, else `target/<profile>/chorus-mediaserver`,
/// built with `$CARGO` when absent.
fn mediaserver_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CHORUS_MEDIASERVER_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "CHORUS_MEDIASERVER_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    // This test runs from target/<profile>/deps/; the workspace's binaries sit one level up.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let bin = profile_dir.join("chorus-mediaserver");
    if bin.is_file() {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(&cargo)
        .current_dir(workspace())
        .args(["build", "--quiet", "-p", "chorus-mediaserver", "--bin"])
        .arg("chorus-mediaserver")
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success() && bin.is_file(),
        "{} is missing and `cargo build -p chorus-mediaserver` did not make it ({}):\n{}\n\
         Build it yourself (`cargo build -p chorus-mediaserver`) or set CHORUS_MEDIASERVER_BIN.",
        bin.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

/// Poll `GET addr path` until 200 or `timeout`; the last answer on failure.
async fn wait_for_200(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(addr, path).await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `pid` runs (a zombie, exited but not yet reaped, does not).
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn stale_hint(log: &Path) -> String {
    format!(
        "\n(if {} shows an unknown flag, the media-server binary is stale: \
         `cargo build -p chorus-mediaserver`)",
        log.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_runs_as_local_processes_survives_a_kill_and_stops_cleanly() {
    let bin = mediaserver_bin();
    let options = LocalOptions {
        mediaserver_bin: Some(bin),
        base_port: 18080,
        udp_base_port: Some(41000),
        mesh_base_port: 17000,
        // The example dials phones: its Secret is beside it, and SIP ports away from the
        // command test's and from a running demo's.
        secrets_dir: Some(workspace().join("examples")),
        sip_base_port: Some(17400),
        ..LocalOptions::default()
    };
    let mut local = match LocalConference::start(&example(), options).await {
        Ok(local) => local,
        Err(e) => panic!("{e}{}", stale_hint(Path::new("the server's log"))),
    };
    assert_eq!(local.name, "townhall");
    assert_eq!(local.servers.len(), 5);
    let on_disk =
        MeshPlan::from_json(&std::fs::read_to_string(local.mesh_plan_path()).unwrap()).unwrap();
    assert_eq!(on_disk, local.mesh);
    assert_eq!(on_disk.generation, 1);

    for server in &local.servers {
        for path in ["/healthz", "/readyz"] {
            if let Err(last) = wait_for_200(server.http, path, Duration::from_secs(20)).await {
                panic!(
                    "{} {path} did not answer 200 within 20 s (last: {last}); log {}",
                    server.id,
                    server.log.display()
                );
            }
        }
    }
    assert_eq!(
        local.servers[2].http,
        "127.0.0.3:18080".parse::<SocketAddr>().unwrap()
    );

    let token = local.token("lobby", "tester").await.unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    // A crash-like kill is not reported as an unexpected death, and the others keep serving.
    let victim = local.servers[0].id.clone();
    local.kill(&victim).await.unwrap();
    assert!(!local.servers[0].is_running());
    assert!(local.reap_exited().is_empty());
    for server in &local.servers[1..] {
        assert_eq!(
            http_get(server.http, "/healthz").await.unwrap().0,
            200,
            "{}",
            server.id
        );
    }
    local.restart(&victim).await.unwrap();
    assert_eq!(
        http_get(local.servers[0].http, "/healthz").await.unwrap().0,
        200
    );

    // An unexpected death is reported once, with its log.
    let pid = local.servers[4].child.as_ref().unwrap().id().unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let exits = loop {
        let exits = local.reap_exited();
        if !exits.is_empty() || Instant::now() > deadline {
            break exits;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0].name, local.servers[4].id);
    assert!(local.reap_exited().is_empty());

    let pids: Vec<u32> = local
        .servers
        .iter()
        .filter_map(|s| s.child.as_ref().and_then(|c| c.id()))
        .collect();
    assert_eq!(pids.len(), 4);
    let workdir = local.workdir.clone();
    let http: Vec<SocketAddr> = local.servers.iter().map(|s| s.http).collect();
    let started = Instant::now();
    local.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "servers should stop on SIGTERM"
    );
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} still runs");
    }
    for addr in http {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
    assert!(
        !workdir.exists(),
        "a fresh workdir is removed after a clean stop"
    );
}

/// Sends SIGTERM to the command if the test fails half way, so the command stops its media servers
/// the normal way (after SIGKILL, as `kill_on_drop` would send, they stop on their own without
/// draining; `no_child_outlives_the_command_killed_with_sigkill` checks that).
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
            // Give it its own grace period (3 s per group of children) to stop them.
            let deadline = Instant::now() + Duration::from_secs(8);
            while pid_alive(self.0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Read stdout lines until one satisfies `want`, failing after `timeout` with what was seen.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: &mut Vec<String>,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                seen.push(line.clone());
                if want(&line) {
                    return line;
                }
            }
            Ok(Ok(None)) => panic!(
                "chorus-operator local ended early; it printed:\n{}",
                seen.join("\n")
            ),
            Ok(Err(e)) => panic!("reading its output: {e}"),
            Err(_) => panic!("timed out; it printed:\n{}", seen.join("\n")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_join_urls_applies_a_watched_change_and_exits_zero_on_sigterm() {
    let _turn = COMMAND.lock().await;
    let bin = mediaserver_bin();
    let workdir = std::env::temp_dir().join(format!("chorus-local-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).unwrap();
    // Media ports away from the library test's; mesh ports are the command's default 7000 + i.
    let file = workdir.join("conference.yaml");
    let text = example_text()
        .replace("udpPort: 40000", "udpPort: 42000")
        .replace("sipPort: 5062", "sipPort: 27400");
    // The example dials phones: its Secret goes beside the copy, as `kubectl apply` would read it.
    std::fs::copy(
        workspace().join("examples/pbx.yaml"),
        workdir.join("pbx.yaml"),
    )
    .unwrap();
    assert_ne!(
        text,
        example_text(),
        "the example's udpPort line changed; update this test"
    );
    std::fs::write(&file, &text).unwrap();

    let mut child = spawn_local(
        &file,
        &workdir,
        &bin,
        &["--base-port", "28080", "--room", "standup", "--watch"],
    );
    let pid = child.id().unwrap();
    let _stop = StopOnDrop(pid);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();

    let first = read_until(&mut lines, &mut seen, Duration::from_secs(40), |l| {
        l.starts_with("chorus: ")
    })
    .await;
    assert_eq!(
        first,
        format!(
            "chorus: conference townhall running locally in {}",
            workdir.display()
        ),
        "{}",
        stale_hint(&workdir.join("logs"))
    );
    let mut joins = Vec::new();
    for region in ["us-east", "eu-west", "ap-south"] {
        let line = read_until(&mut lines, &mut seen, Duration::from_secs(20), |l| {
            l.starts_with("chorus: join at ")
        })
        .await;
        assert!(line.ends_with(&format!(" (region {region})")), "{line}");
        joins.push(line);
    }
    let ip = |line: &str| line.split("http://").nth(1).unwrap()[..9].to_owned();
    assert_eq!(
        joins.iter().map(|l| ip(l)).collect::<Vec<_>>(),
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    );
    assert!(
        joins[0].starts_with("chorus: join at http://127.0.0.2:28080/?room=standup&token="),
        "{}",
        joins[0]
    );
    read_until(&mut lines, &mut seen, Duration::from_secs(5), |l| {
        l.contains("Ctrl-C")
    })
    .await;

    // A mixing change is written as generation 2; the servers keep running.
    std::fs::write(&file, text.replace("topSpeakers: 3", "topSpeakers: 4")).unwrap();
    let changed = read_until(&mut lines, &mut seen, Duration::from_secs(20), |l| {
        l.contains("changed")
    })
    .await;
    assert!(changed.contains("mesh generation 2"), "{changed}");
    let plan =
        MeshPlan::from_json(&std::fs::read_to_string(workdir.join("mesh.json")).unwrap()).unwrap();
    assert_eq!((plan.generation, plan.mixing.top_speakers), (2, 4));

    // A change that does not plan is reported and changes nothing.
    std::fs::write(
        &file,
        text.replace("name: eu-west", "name: us-east")
            .replace("topSpeakers: 3", "topSpeakers: 4"),
    )
    .unwrap();
    let refused = read_until(&mut lines, &mut seen, Duration::from_secs(20), |l| {
        l.contains("changed")
    })
    .await;
    assert!(refused.contains("generation 2"), "{refused}");

    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("it stops within 15 s")
        .unwrap();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await
    {
        seen.push(line);
    }
    assert!(
        status.success(),
        "{status}; it printed:\n{}",
        seen.join("\n")
    );
    assert!(
        seen.iter()
            .any(|l| l == "chorus: stopped" || l.starts_with("chorus: stopped"))
    );
    for port in [28080, 28081] {
        let addr: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
    assert!(workdir.join("logs/townhall-us-east-0.log").is_file());
    std::fs::remove_dir_all(&workdir).unwrap();
}

/// The command line of `pid`, arguments joined by spaces (empty once it is gone).
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Running processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let dir = dir.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid_alive(pid) && cmdline(pid).contains(dir))
        .collect()
}

/// SIGKILLs, when the test ends, whatever still runs with the working directory on its command
/// line, so a failed run does not leave servers holding the ports of the tests after it.
struct KillLeftovers(PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_child_outlives_the_command_killed_with_sigkill() {
    let _turn = COMMAND.lock().await;
    let bin = mediaserver_bin();
    let workdir = std::env::temp_dir().join(format!("chorus-local-orphans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).unwrap();
    let _leftovers = KillLeftovers(workdir.clone());
    let file = workdir.join("conference.yaml");
    std::fs::write(
        &file,
        "apiVersion: chorus.dev/v1alpha1\nkind: Conference\nmetadata: { name: orphans }\nspec:\n  \
         regions:\n  - { name: us, replicas: 2 }\n  - { name: eu, replicas: 1 }\n  \
         media: { udpPort: 43000 }\n",
    )
    .unwrap();

    let mut child = spawn_local(&file, &workdir, &bin, &["--base-port", "38080"]);
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    read_until(&mut lines, &mut seen, Duration::from_secs(40), |l| {
        l.contains("Ctrl-C")
    })
    .await;

    let children: Vec<u32> = processes_mentioning(&workdir)
        .into_iter()
        .filter(|&p| parent_of(p) == Some(pid))
        .collect();
    assert_eq!(
        children.len(),
        3,
        "one process per media server; found {:?}",
        children.iter().map(|&p| cmdline(p)).collect::<Vec<_>>()
    );

    // SIGKILL to the command alone: nothing of it runs after this, no handler, no Drop.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let left: Vec<String> = processes_mentioning(&workdir)
        .into_iter()
        .map(|p| format!("{p}: {}", cmdline(p)))
        .collect();
    assert!(
        left.is_empty(),
        "still running 2 s after the command was killed: {left:#?}"
    );
    for pid in children {
        assert!(!pid_alive(pid), "pid {pid} still runs");
    }
    for port in [38080, 38081] {
        let addr: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
}

/// `chorus-operator local -f FILE` in `workdir` with the media server `bin` and `extra` flags;
/// its stdout is piped for the test to read, and it is killed if the test drops it.
fn spawn_local(
    file: &std::path::Path,
    workdir: &std::path::Path,
    bin: &std::path::Path,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus-operator"))
        .arg("local")
        .arg("-f")
        .arg(file)
        .arg("--workdir")
        .arg(workdir)
        .arg("--mediaserver-bin")
        .arg(bin)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}
