//! Instructions per listener-packet, counted by valgrind's callgrind: a figure that does not move
//! with this machine's noisy CPU time.
//!
//! The server runs under callgrind with instrumentation off (so it starts, and the swarm joins,
//! at native speed). With talkers and a swarm of listeners in the room, instrumentation is turned
//! on, the counters zeroed, the swarm runs a window, and the counters are dumped
//! (`callgrind_control`). Only the port's fan-out is collected (`--toggle-collect`): its handling
//! of the room's shared frame for every listener (session lookup, header, seal) and the
//! user-space side of its `sendmmsg` rounds (the argument arrays, and the few talkers' datagrams
//! that share them). The count divided by the listener packets the swarm received in the window
//! is the figure.
//!
//! What it leaves out, by construction: the kernel (callgrind counts user space only; the perf
//! profile in BENCHMARKS.md shows the kernel's share) and the per-tick mixing, which does not grow
//! with listeners. Under instrumentation the server runs tens of times slower and may fall
//! behind real time; the count is per packet actually fanned out, so that changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::delay::{self, ChorusRoom};
use crate::mediaserver_process::{ProcessOptions, ServerProcess};
use crate::swarm::{Swarm, SwarmConfig};

/// The functions whose instructions are counted (callgrind patterns, inclusive of callees).
pub const COLLECTED: [&str; 4] = [
    "*port::Driver::fan_out*",
    "*fan_out::fan_out_lane*",
    "*port::pending_datagrams*",
    "*port::send_batch*",
];

/// Set (to anything) to keep callgrind's dumps for `callgrind_annotate`.
pub const KEEP_ENV: &str = "CHORUS_BENCH_KEEP_CALLGRIND";

/// How long the instrumented server may take before its listeners hear the room.
const WARM_UP_SECONDS: usize = 60;
/// Counted windows at most, until the listeners receive something (see the loop's comment).
const MAX_COUNTED_WINDOWS: usize = 6;

/// Whether valgrind is on the `PATH` (`scripts/bootstrap` installs it).
pub fn available() -> bool {
    std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `callgrind_control <flag> <pid>`.
fn control(pid: u32, flag: &str) -> Result<()> {
    let out = std::process::Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {flag} {pid} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The `totals:` line of the newest dump `<prefix>.<pid>.<n>` (n ≥ 1), waiting for it to appear.
async fn newest_dump_total(prefix: &Path, pid: u32) -> Result<u64> {
    let dir = prefix.parent().context("dump prefix has a directory")?;
    let stem = format!(
        "{}.{pid}.",
        prefix
            .file_name()
            .context("dump prefix has a name")?
            .to_string_lossy()
    );
    for _ in 0..200 {
        let mut dumps: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix(&stem)?.parse::<u32>().ok()?;
                Some((n, e.path()))
            })
            .collect();
        dumps.sort();
        if let Some((_, path)) = dumps.last() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(total) = text
                .lines()
                .find_map(|l| l.strip_prefix("totals:"))
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                return Ok(total);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no callgrind dump with totals for pid {pid} under {dir:?}")
}

/// The server's metric samples that are not zero, for an error message.
async fn moving_metrics(server: &ServerProcess) -> String {
    match server.metrics().await {
        Ok(text) => text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n"),
        Err(err) => format!("(unreadable: {err:#})"),
    }
}

/// Counts the fan-out's instructions per listener-packet with `listeners` receive-only listeners
/// and the bench's talkers over `window`. `Ok(None)` without valgrind.
pub async fn per_listener_packet(listeners: usize, window: Duration) -> Result<Option<f64>> {
    if listeners == 0 {
        return Ok(None);
    }
    if !available() {
        eprintln!("instructions: valgrind is missing (scripts/bootstrap installs it); skipped");
        return Ok(None);
    }
    let dir = crate::unique_temp_dir("callgrind")?;
    let prefix = dir.join("callgrind.out");
    let result = async {
        let server = ServerProcess::start(ProcessOptions {
            callgrind_out: Some(prefix.clone()),
            max_participants: Some(listeners + 50),
            // The one-core path, like the pinned ramp's (valgrind runs one thread at a time).
            fan_out_workers: Some(1),
            ..ProcessOptions::default()
        })
        .await?;
        let pid = server.pid();
        let room = ChorusRoom {
            server: &server,
            room: "instructions".into(),
        };
        let talkers = delay::join_talkers(&room).await?;
        let tokens = server.token_maker("instructions");
        let mut swarm = Swarm::join(SwarmConfig::new(
            &server.base_url,
            "instructions",
            listeners,
            move |i| tokens(&format!("counted-{i}")),
        ))
        .await?;
        // Warm up until the listeners hear the room: under valgrind the server is tens of times
        // slower, and its talkers' ICE and DTLS may take many seconds to come up.
        let mut heard = 0;
        for second in 1..=WARM_UP_SECONDS {
            heard = swarm
                .run_for(Duration::from_secs(1))
                .await?
                .packets_received;
            if heard > 0 {
                eprintln!("instructions: the listeners hear the room after {second} s");
                break;
            }
        }
        if heard == 0 {
            bail!(
                "the instrumented server's listeners heard nothing in {WARM_UP_SECONDS} s; its \
                 metrics:\n{}",
                moving_metrics(&server).await
            );
        }
        control(pid, "--instr=on")?;
        control(pid, "--zero")?;
        // Instrumented, the server runs far slower than real time and may send little in one
        // window: windows follow one another until the listeners received something, for at
        // most MAX_COUNTED_WINDOWS.
        let mut packets = 0;
        let mut windows = 0;
        while packets == 0 && windows < MAX_COUNTED_WINDOWS {
            packets += swarm.run_for(window).await?.packets_received;
            windows += 1;
        }
        control(pid, "--dump")?;
        control(pid, "--instr=off")?;
        let total = newest_dump_total(&prefix, pid).await?;
        if packets == 0 {
            bail!(
                "the swarm received nothing in {windows} counted windows of {window:?}; the \
                 server's metrics:\n{}",
                moving_metrics(&server).await
            );
        }
        let _ = swarm.leave().await;
        super::close_all(talkers.iter().map(|b| &**b)).await;
        let per_packet = total as f64 / packets as f64;
        eprintln!(
            "instructions: {total} in the fan-out for {packets} listener packets ({listeners} \
             listeners): {per_packet:.0} per listener-packet"
        );
        Ok(Some(per_packet))
    }
    .await;
    if std::env::var_os(KEEP_ENV).is_some() {
        eprintln!("instructions: callgrind's dumps kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
