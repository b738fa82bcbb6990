//! Capacity: listeners one server core holds in one room with 3 talkers.
//!
//! The server runs pinned to one CPU; this process (the bots) runs on the other (`make bench`
//! pins it). Listeners are added in steps. At each step, over a measuring window, the harness
//! reads:
//! - loss at the listeners, from RTP sequence numbers (packets the server sent that never came);
//! - the server's CPU (from `/proc`), and the load generator's own;
//! - mouth-to-ear delay at one decoding listener, by probe onsets as in [`super::delay`].
//!
//! A step holds when loss is at most 0.1 % and the p99 delay stays within the limit (a delay
//! excursion must show in two windows in a row to fail a step). The capacity
//! is the largest step that held. When the load generator itself runs out of CPU first, the
//! figure is a lower bound, and the result says so: the server's CPU per listener then gives the
//! extrapolated capacity of a whole core.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::delay::{self, Venue};
use super::percentiles;
use crate::bot::{AudioSource, BotConfig};
use crate::process_cpu_time;

/// The load steps: listeners in the room.
pub const STEPS: [usize; 18] = [
    10, 20, 30, 40, 50, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000,
];
/// Loss a step may show.
pub const MAX_LOSS: f64 = 0.001;
/// Above this share of its core, the load generator's own timing is suspect.
const GENERATOR_BUSY: f64 = 0.85;
const WINDOW: Duration = Duration::from_secs(6);

/// One load step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Listeners in the room (besides the 3 talkers and the measuring listener).
    pub listeners: usize,
    /// Packets lost at the listeners over the window, as a fraction.
    pub loss: f64,
    /// Server CPU over the window, in cores.
    pub server_cpu: f64,
    /// Load generator CPU over the window, in cores.
    pub generator_cpu: f64,
    /// Mouth-to-ear p99 at the measuring listener, ms (server-added, bots subtracted).
    pub delay_p99_ms: f64,
    /// Whether the step held (loss and delay within limits).
    pub held: bool,
}

/// What limited the capacity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The server lost packets or delayed them beyond the limit.
    Server,
    /// The load generator ran out of CPU first: the capacity is a lower bound.
    LoadGenerator,
    /// Every step held.
    Steps,
}

/// Capacity of one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    /// Listeners at the largest step that held.
    pub listeners: usize,
    /// What stopped the ramp.
    pub limited_by: Limit,
    /// Server CPU per listener at the largest step that held, in % of a core.
    pub cpu_per_listener_percent: f64,
    /// 100 % of a core divided by the CPU per listener: the capacity a whole core would hold if
    /// the cost stayed linear (an extrapolation when the load generator limited the ramp).
    pub extrapolated_listeners_per_core: f64,
    /// Every step measured.
    pub steps: Vec<Step>,
}

/// What ended a ramp of `steps`, if something did: the last step failed, or the load generator
/// was saturated. A failed step is blamed on whichever side was busier: a server with most of its
/// core to spare did not cause the loss or delay a saturated load generator shows.
pub fn limit_of(steps: &[Step]) -> Option<Limit> {
    let last = steps.last()?;
    if last.held {
        return (last.generator_cpu > GENERATOR_BUSY).then_some(Limit::LoadGenerator);
    }
    Some(if last.server_cpu >= last.generator_cpu {
        Limit::Server
    } else {
        Limit::LoadGenerator
    })
}

/// Ramps listeners in `venue` (served by process `server_pid`) until a step fails, the load
/// generator saturates, or `max_listeners` is reached. `delay_limit_ms` bounds the p99 delay.
pub async fn measure<V: Venue>(
    venue: &V,
    server_pid: u32,
    max_listeners: usize,
    delay_limit_ms: f64,
) -> Result<Capacity> {
    let talkers = delay::join_talkers(venue).await?;
    let probe_ear = venue
        .join("measuring-listener", BotConfig::new(AudioSource::Silence))
        .await?;
    let mut listeners = Vec::new();
    let mut steps = Vec::new();
    for &target in STEPS.iter().filter(|&&s| s <= max_listeners) {
        while listeners.len() < target {
            let config = BotConfig::new(AudioSource::Silence).counting_only();
            listeners.push(
                venue
                    .join(&format!("listener-{}", listeners.len()), config)
                    .await?,
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let counts = |ls: &[V::Member]| -> (u64, u64) {
            ls.iter()
                .map(|l| l.packet_counts())
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        // A step that fails on delay alone is measured once more, and fails only if the second
        // window fails too: one late probe among a dozen is as often the bots' scheduling as the
        // server's.
        let mut attempt = 0;
        let (loss, server_cpu, generator_cpu, delay_p99_ms, held) = loop {
            attempt += 1;
            let (received0, sent0) = counts(&listeners);
            let server0 = process_cpu_time(server_pid)?;
            let own0 = process_cpu_time(std::process::id())?;
            let started = Instant::now();
            let mut delays = Vec::new();
            while started.elapsed() < WINDOW {
                delays.extend(
                    delay::probe_round(&talkers, &[&*probe_ear])
                        .await?
                        .0
                        .concat(),
                );
            }
            let wall = started.elapsed().as_secs_f64();
            let server_cpu = (process_cpu_time(server_pid)? - server0).as_secs_f64() / wall;
            let generator_cpu = (process_cpu_time(std::process::id())? - own0).as_secs_f64() / wall;
            let (received1, sent1) = counts(&listeners);
            let sent = sent1.saturating_sub(sent0).max(1);
            let received = received1.saturating_sub(received0);
            let loss = (1.0 - received as f64 / sent as f64).max(0.0);
            let delay_p99_ms = percentiles(&delays).p99;
            let held = loss <= MAX_LOSS && delay_p99_ms <= delay_limit_ms;
            if held || loss > MAX_LOSS || attempt >= 2 {
                break (loss, server_cpu, generator_cpu, delay_p99_ms, held);
            }
        };
        eprintln!(
            "capacity: {target} listeners: loss {:.3} %, server {:.0} % of a core, generator \
             {:.0} %, p99 {delay_p99_ms:.1} ms{}",
            loss * 100.0,
            server_cpu * 100.0,
            generator_cpu * 100.0,
            if held { "" } else { " — did not hold" }
        );
        steps.push(Step {
            listeners: target,
            loss,
            server_cpu,
            generator_cpu,
            delay_p99_ms,
            held,
        });
        if !held || generator_cpu > GENERATOR_BUSY {
            break;
        }
    }
    let limited_by = limit_of(&steps).unwrap_or(Limit::Steps);
    super::close_all(talkers.iter().map(|b| &**b)).await;
    super::close_all(listeners.iter().map(|b| &**b)).await;
    probe_ear.close().await;
    let best = steps.iter().rfind(|s| s.held).cloned();
    let (listeners_held, per_listener) = match &best {
        // Talkers and the measuring listener are served too.
        Some(s) => (s.listeners, s.server_cpu / (s.listeners + 4) as f64),
        None => (0, f64::NAN),
    };
    Ok(Capacity {
        listeners: listeners_held,
        limited_by,
        cpu_per_listener_percent: per_listener * 100.0,
        extrapolated_listeners_per_core: 1.0 / per_listener,
        steps,
    })
}
