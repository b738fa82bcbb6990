//! Listener capacity, measured with the swarm (`crate::swarm`): how much server CPU a listener
//! costs, and how many one pinned core holds.
//!
//! The bot-based capacity scenario (`capacity.rs`) runs out of load generator near a hundred
//! listeners: each bot is a whole WebRTC peer. Here one thread of this process carries
//! thousands of receive-only listeners, each with real ICE, real DTLS and its own SRTP keys,
//! reading every socket with `recvmmsg`, tracking every listener's sequence numbers and
//! decrypting a sample of each listener's packets against a reference listener's.
//!
//! The server runs pinned to one CPU with 3 talkers in the room; for each step of listeners a
//! fresh swarm joins, warms up, and is measured over a window:
//! - the server's CPU (from `/proc`), the swarm thread's own CPU;
//! - loss from sequence numbers, kernel drops (per socket and host-wide), sample checks.
//!
//! A step *holds* when every listener joined and received under one SSRC, loss is at most
//! [`MAX_LOSS`], every listener's samples matched the reference (at least one each), nothing
//! was dropped by a kernel, the server's core was not saturated, and the swarm thread stayed
//! below 80 % of its core (else the step is marked as limited by the generator, and neither
//! holds nor enters the slope). The headline is the slope of server CPU over listeners (CPU
//! seconds per listener-second) by least squares over the steps that held, with the fixed cost
//! (intercept) beside it; listeners per core is its inverse. A ramp with fewer than two steps
//! that held has no slope.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::egress_tap::{EgressSpread, EgressTap, TapPoint};
use crate::process_cpu_time;
use crate::swarm::{Swarm, SwarmConfig, SwarmReport};

/// The figure `get` takes from the step of `listeners` listeners (a last-minus-first delay, say:
/// [`SwarmStep::last_minus_first_ms`], or the p50 of a tap's spread), if that step has it.
pub fn at_step(
    c: &ListenerCapacity,
    listeners: usize,
    get: impl Fn(&SwarmStep) -> Option<f64>,
) -> Option<f64> {
    c.steps
        .iter()
        .filter(|s| s.listeners == listeners)
        .find_map(get)
}

/// How long each egress tap listens, after the CPU window (see [`crate::egress_tap`]).
const EGRESS_WINDOW: Duration = Duration::from_secs(2);

/// Loss a step may show.
pub const MAX_LOSS: f64 = 0.001;
/// A server above this share of its core is saturated: the step does not hold.
const SERVER_SATURATED: f64 = 0.95;
/// A generator above this share of its core may have been the limit, not the server.
const GENERATOR_SATURATED: f64 = 0.8;

/// How a ramp runs.
#[derive(Debug, Clone)]
pub struct SwarmPlan {
    /// Listeners per step, ascending.
    pub steps: Vec<usize>,
    /// Measuring window per step.
    pub window: Duration,
    /// Every listener but the reference decrypts one packet in this many.
    pub sample_every: u32,
    /// CPUs the server may use: a step whose server is above 95 % of them does not hold.
    pub server_cpus: f64,
    /// Other threads (pids) whose CPU is charged to the server: on the swarm network, its
    /// side's NAPI thread (`crate::swarm_network`).
    pub server_threads: Vec<u32>,
    /// Other threads whose CPU is the generator's, beside the swarm's media thread: on the
    /// swarm network, the listeners' NAPI thread, on the swarm's CPU.
    pub generator_threads: Vec<u32>,
    /// The network between the server and the swarm, for the results: `"veth"` or
    /// `"loopback"`.
    pub network: &'static str,
    /// The server's interface towards the swarm, where [`crate::egress_tap`] watches the
    /// fan-out leave (a window of its own after each step's); `None`: not tapped.
    pub egress_interface: Option<&'static str>,
    /// The `ifb` device the hand-off tap mirrors the interface's datagrams to (a window of its
    /// own too); `None`: the hand-off is not tapped.
    pub hand_off_mirror: Option<&'static str>,
}

/// The fan-out's spread at `point` over [`EGRESS_WINDOW`]: the last-admitted listener's
/// departures after the reference's.
async fn egress_spread(
    swarm: &mut Swarm,
    point: TapPoint<'_>,
    window_report: &SwarmReport,
) -> Result<Option<EgressSpread>> {
    let Some((reference, last)) = swarm.fan_out_ends() else {
        return Ok(None);
    };
    if reference.remote != last.remote {
        // A socket per listener (Janus): it encodes per listener too, so there is no one frame
        // to follow across the fan-out.
        return Ok(None);
    }
    let tap = EgressTap::start(point, reference.remote, reference.local, last.local)?;
    let tapped = swarm.run_for(EGRESS_WINDOW).await?;
    // Which of the reference's frames each of the last listener's is: the swarm's payload
    // matches, from either window (one constant while the server skips nothing).
    let delta = |report: &SwarmReport| {
        report
            .listeners
            .iter()
            .find(|l| l.index == last.index)
            .and_then(|l| l.seq_delta_vs_reference)
    };
    match delta(&tapped).or_else(|| delta(window_report)) {
        Some(seq_delta) => tap.stop(seq_delta),
        None => anyhow::bail!(
            "no payload of listener {} matched the reference's: its frames cannot be paired",
            last.index
        ),
    }
}

/// The CPU time of `pid` and of `others` together.
fn cpu_time_of(pid: Option<u32>, others: &[u32]) -> Result<Duration> {
    let mut total = match pid {
        Some(pid) => process_cpu_time(pid)?,
        None => Duration::ZERO,
    };
    for &other in others {
        total += process_cpu_time(other)?;
    }
    Ok(total)
}

/// One step of the ramp.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwarmStep {
    /// Listeners asked for.
    pub listeners: usize,
    /// Listeners that connected.
    pub joined: usize,
    /// Seconds the swarm took to join them all.
    pub join_seconds: f64,
    /// Server CPU over the window, in cores.
    pub server_cpu: f64,
    /// The swarm thread's CPU over the window, in cores.
    pub generator_cpu: f64,
    /// RTP packets the listeners received in the window.
    pub packets: u64,
    /// Lost over received plus lost.
    pub loss: f64,
    /// Datagrams dropped by the kernel: per-socket overflows plus the host's UDP receive-buffer
    /// errors over the window (the server's socket included).
    pub kernel_drops: u64,
    /// Sampled payloads that matched the reference.
    pub samples_ok: u64,
    /// Sampled payloads that did not decrypt, or (where every listener gets the same encoding)
    /// did not match the reference.
    pub samples_bad: u64,
    /// Whether every listener passed its own checks (joined, one SSRC, loss, samples).
    pub every_listener_checked: bool,
    /// The swarm thread was above 80 % of its core: the step says nothing about the server.
    pub generator_limited: bool,
    /// The median delay of the last-admitted listener after the first's, ms (by kernel
    /// receive stamps of the same payload); `None` where payloads differ per listener.
    #[serde(default)]
    pub last_minus_first_ms: Option<f64>,
    /// The same spread where the server's interface transmits, after its queue (by
    /// [`crate::egress_tap`], in a window of its own after the step's): without the swarm
    /// side's delivery, but paced by it wherever the queue fills. `None` where not tapped.
    #[serde(default)]
    pub egress_spread: Option<EgressSpread>,
    /// The same spread where the server hands its datagrams to the interface, before its queue
    /// (in a window of its own): what the server adds. `None` where not tapped.
    #[serde(default)]
    pub hand_off_spread: Option<EgressSpread>,
    /// Why leaving after the window failed, if it did (the step's figures stand).
    #[serde(default)]
    pub leave_error: Option<String>,
    /// Whether the step held (see the module docs).
    pub held: bool,
}

/// The ramp of one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerCapacity {
    /// Every step measured.
    pub steps: Vec<SwarmStep>,
    /// Server CPU-seconds per listener-second: the least-squares slope of server CPU over
    /// listeners. NaN (`null` in JSON) without two steps that held.
    #[serde(deserialize_with = "nan_if_null")]
    pub cpu_per_listener: f64,
    /// The fixed cost: the slope's intercept, in cores (talkers, mixing, timers).
    #[serde(deserialize_with = "nan_if_null")]
    pub fixed_cpu: f64,
    /// Listeners per core from the slope: `1 / cpu_per_listener`.
    #[serde(deserialize_with = "nan_if_null")]
    pub per_core: f64,
    /// The largest step that held (on the one pinned core, but for the two-worker scaling
    /// ramps, whose server has two).
    pub held_one_core: usize,
    /// User-space instructions of the port's fan-out per listener-packet, by callgrind
    /// (`super::instructions`); `None` where not counted.
    #[serde(default)]
    pub instructions_per_listener_packet: Option<f64>,
    /// The network between the server and the swarm: `"veth"` (the swarm's own namespace,
    /// `crate::swarm_network`) or `"loopback"`; `None` in runs recorded before the choice
    /// existed (loopback).
    #[serde(default)]
    pub network: Option<String>,
    /// Of the server's outgoing datagrams over the ramp, the share sent as whole frames through
    /// packet sockets (`--link-layer-fan-out`); `None` where the server did not use them.
    #[serde(default)]
    pub link_layer_share: Option<f64>,
}

/// JSON has no NaN: serde_json writes it as `null`, which reads back as NaN here.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Least-squares line through `(x, y)` points: `(slope, intercept)`; NaN with fewer than two
/// distinct x.
pub fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (f64::NAN, f64::NAN);
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    (slope, mean_y - slope * mean_x)
}

/// The summary of a ramp's steps.
pub fn summarize(steps: Vec<SwarmStep>, network: Option<String>) -> ListenerCapacity {
    // Only steps that held: a saturated server, or one that dropped or lost packets, did less
    // than the step asked of it, and its CPU would flatten the slope (Janus at 100 listeners
    // used 98 % of its core and lost packets; counted, it doubled Janus's listeners per core).
    let points: Vec<(f64, f64)> = steps
        .iter()
        .filter(|s| s.held)
        .map(|s| (s.listeners as f64, s.server_cpu))
        .collect();
    let (slope, intercept) = fit_line(&points);
    let held_one_core = steps
        .iter()
        .filter(|s| s.held)
        .map(|s| s.listeners)
        .max()
        .unwrap_or(0);
    ListenerCapacity {
        steps,
        cpu_per_listener: slope,
        fixed_cpu: intercept,
        per_core: 1.0 / slope,
        held_one_core,
        instructions_per_listener_packet: None,
        network,
        link_layer_share: None,
    }
}

/// Ramps swarms of listeners into a room of the server process `server_pid` (its talkers
/// already in the room). `config(k, n)` is step `k`'s swarm of `n` listeners (each step's
/// listeners should have identities of their own). Stops after a step that did not hold.
pub async fn measure(
    config: impl Fn(usize, usize) -> SwarmConfig,
    server_pid: u32,
    plan: &SwarmPlan,
) -> Result<ListenerCapacity> {
    let mut steps = Vec::new();
    for (k, &n) in plan.steps.iter().enumerate() {
        let mut config = config(k, n);
        config.sample_every = plan.sample_every;
        let mut swarm = Swarm::join(config).await?;
        let join_seconds = swarm.join_duration().as_secs_f64();
        // Warm up: every listener past its first packets, the server's batches steady.
        swarm.run_for(Duration::from_secs(1)).await?;
        let server0 = cpu_time_of(Some(server_pid), &plan.server_threads)?;
        let generator0 = cpu_time_of(None, &plan.generator_threads)?;
        let report = swarm.run_for(plan.window).await?;
        let window = report.window.as_secs_f64();
        let server_cpu =
            (cpu_time_of(Some(server_pid), &plan.server_threads)? - server0).as_secs_f64() / window;
        // The media thread and (on the swarm network) the listeners' NAPI thread share the
        // swarm's CPU: together they say whether the generator kept up.
        let generator_cpu = report.swarm_core_fraction
            + (cpu_time_of(None, &plan.generator_threads)? - generator0).as_secs_f64() / window;
        // The two taps in windows of their own, so neither's cost is in the other's figure.
        let mut tapped = async |point: Option<TapPoint<'_>>| match point {
            Some(point) => egress_spread(&mut swarm, point, &report)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("listeners: {n}: egress tap at {point:?}: {e:#}");
                    None
                }),
            None => None,
        };
        let hand_off_spread = tapped(
            plan.egress_interface
                .zip(plan.hand_off_mirror)
                .map(|(interface, mirror)| TapPoint::HandOff { interface, mirror }),
        )
        .await;
        let egress_spread = tapped(
            plan.egress_interface
                .map(|interface| TapPoint::Transmit { interface }),
        )
        .await;
        // A failed leave (a participant the server had already let go, say) is recorded, not
        // fatal: the window's figures above are complete whatever happens after it.
        let leave_error = swarm.leave().await.err().map(|e| format!("{e:#}"));
        if let Some(e) = &leave_error {
            eprintln!("listeners: {n}: leaving: {e}");
        }
        let received_or_lost = (report.packets_received + report.packets_lost).max(1);
        let loss = report.packets_lost as f64 / received_or_lost as f64;
        let kernel_drops = report.kernel_drops + report.udp_rcvbuf_errors;
        // Each listener may lose its share of the allowed loss, rounded up.
        let frames = (plan.window.as_secs_f64() * 50.0).ceil();
        let max_lost = (frames * MAX_LOSS).ceil() as u64;
        let checked = report.verify(max_lost, 1);
        if let Err(err) = &checked {
            eprintln!("listeners: {n}: {err:#}");
        }
        let generator_limited = generator_cpu > GENERATOR_SATURATED;
        // The fan-out's spread: the last-admitted listener's delay after the first's, by kernel
        // receive stamps of the same payload (listener 0, the reference, is admitted first).
        let last_minus_first_ms = report
            .fan_out()
            .and_then(|f| f.last_answered)
            .map(|o| o.p50);
        let step = SwarmStep {
            listeners: n,
            joined: report.listeners_joined,
            join_seconds,
            server_cpu,
            generator_cpu,
            packets: report.packets_received,
            loss,
            kernel_drops,
            samples_ok: report.samples_ok,
            // Janus encodes for every listener: there a payload unlike the reference's is
            // expected, and only an undecryptable sample is bad.
            samples_bad: report.samples_undecryptable
                + if report.verify_payloads {
                    report.samples_mismatched
                } else {
                    0
                },
            every_listener_checked: checked.is_ok(),
            generator_limited,
            last_minus_first_ms,
            egress_spread,
            hand_off_spread,
            leave_error,
            held: checked.is_ok()
                && loss <= MAX_LOSS
                && kernel_drops == 0
                && !generator_limited
                && server_cpu <= SERVER_SATURATED * plan.server_cpus,
        };
        eprintln!(
            "listeners: {n}: joined {} in {join_seconds:.1} s, server {:.1} % of a core, swarm \
             {:.0} %, loss {:.4} %, kernel drops {kernel_drops}, samples {} ok / {} bad, last \
             minus first {:?} ms (at the server's hand-off {:?} ms, after its interface's \
             queue {:?} ms){}",
            step.joined,
            server_cpu * 100.0,
            step.generator_cpu * 100.0,
            loss * 100.0,
            step.samples_ok,
            step.samples_bad,
            step.last_minus_first_ms,
            step.hand_off_spread.map(|e| e.p50_ms),
            step.egress_spread.map(|e| e.p50_ms),
            if step.held {
                ""
            } else if generator_limited {
                " — limited by the generator"
            } else {
                " — did not hold"
            }
        );
        let stop = !step.held;
        steps.push(step);
        if stop {
            break;
        }
        // Let the server forget the last swarm before the next one joins.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(summarize(steps, Some(plan.network.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(listeners: usize, server_cpu: f64, generator_limited: bool, held: bool) -> SwarmStep {
        SwarmStep {
            listeners,
            joined: listeners,
            join_seconds: 0.0,
            server_cpu,
            generator_cpu: 0.1,
            packets: 0,
            loss: 0.0,
            kernel_drops: 0,
            samples_ok: 1,
            samples_bad: 0,
            every_listener_checked: held,
            generator_limited,
            last_minus_first_ms: None,
            egress_spread: None,
            hand_off_spread: None,
            leave_error: None,
            held,
        }
    }

    #[test]
    fn the_slope_and_intercept_come_from_the_steps_that_held() {
        let c = summarize(
            vec![
                step(250, 0.05 + 250.0 * 1e-4, false, true),
                step(500, 0.05 + 500.0 * 1e-4, false, true),
                step(1000, 0.05 + 1000.0 * 1e-4, false, true),
                // A generator-limited step, or a saturated server's, would bend the line: both
                // are left out.
                step(2000, 0.10, true, false),
                step(4000, 0.98, false, false),
            ],
            Some("veth".into()),
        );
        assert!((c.cpu_per_listener - 1e-4).abs() < 1e-9, "{c:?}");
        assert!((c.fixed_cpu - 0.05).abs() < 1e-9, "{c:?}");
        assert!((c.per_core - 10_000.0).abs() < 1e-3, "{c:?}");
        assert_eq!(c.held_one_core, 1000);
    }

    #[test]
    fn one_point_makes_no_slope() {
        let c = summarize(vec![step(250, 0.1, false, true)], None);
        assert!(c.cpu_per_listener.is_nan());
        assert_eq!(c.held_one_core, 250);
        let (slope, _) = fit_line(&[(1.0, 1.0), (1.0, 2.0)]);
        assert!(slope.is_nan());
    }
}
