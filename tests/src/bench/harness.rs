//! The whole benchmark run behind `make bench`: every scenario, several times, summarised into
//! `bench/results/latest.json` and `BENCHMARKS.md`.
//!
//! A [`Plan`] says how much load and how many repetitions; [`Plan::full`] is `make bench`,
//! [`Plan::smoke`] is the one-iteration, small-load run `make test` does so the harness cannot
//! rot. Each run measures every scenario once; the summary keeps each figure's min, median and
//! max over the runs, and the JSON's headline values are the medians.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::capacity::{self, Capacity};
use super::delay::{self, ChorusRoom, DelayResult, JanusRoom};
use super::list_stability::{self, ListStability};
use super::listeners::{self, ListenerCapacity, SwarmPlan, SwarmStep};
use super::mesh::{self, Convergence, MeshBytes};
use super::telephony::{self, PhoneCalls, PhonePlan};
use super::transfer::{self, TransferFigures};
use super::{CrossServer, codec_work, cross_server};
use crate::janus::{JanusJitter, JanusOptions, JanusServer};
use crate::mediaserver_process::{ProcessOptions, ServerProcess};
use crate::swarm::{Direction, JanusTarget, SwarmConfig, Upstream};

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Repetitions of every scenario.
    pub runs: usize,
    /// Rooms (fresh bots, fresh phases) per system in the delay scenario.
    pub delay_rooms: usize,
    /// Probe onsets per talker per room.
    pub delay_onsets: usize,
    /// The delay systems to measure (their result keys); empty: all of them.
    pub delay_systems: Vec<String>,
    /// Largest capacity step tried, listeners.
    pub capacity_max_listeners: usize,
    /// Server CPU for capacity (the load runs on the others).
    pub capacity_cpu: usize,
    /// The swarm's listener steps (see [`super::listeners`]); empty: the scenario is skipped.
    pub listener_steps: Vec<usize>,
    /// The swarm's measuring window per step.
    pub listener_window: std::time::Duration,
    /// Every swarm listener but the reference decrypts one packet in this many.
    pub listener_sample_every: u32,
    /// The largest step of listeners streaming silence upstream (each a whole WebRTC peer).
    pub listener_steps_streaming_max: usize,
    /// The swarm's steps against Janus AudioBridge.
    pub listener_steps_janus: Vec<usize>,
    /// Listeners in the callgrind count of instructions per listener-packet; 0 skips it.
    pub instruction_listeners: usize,
    /// Steps of the two-worker scaling ramps (one worker, then two, on the same two CPUs);
    /// empty skips them.
    pub scaling_steps: Vec<usize>,
    /// The scaling servers split fan-outs to at least this many listeners across workers.
    pub scaling_parallel_min: usize,
    /// Put the swarm in its own network namespace behind a veth pair
    /// ([`crate::swarm_network`]) when this machine allows it; false, or where it cannot be
    /// built: loopback.
    pub swarm_on_veth: bool,
    /// With the swarm on its veth pair, the capacity servers send listeners' media through
    /// packet sockets (`--link-layer-fan-out`); over loopback they cannot (a frame from and to
    /// this host is a martian to the kernel), and the UDP socket sends it.
    pub link_layer_fan_out: bool,
    /// One-way link delay for the cross-server scenario, ms.
    pub link_ms: u32,
    /// Onsets in the cross-server scenario.
    pub cross_rounds: usize,
    /// Room sizes for codec work.
    pub codec_sizes: Vec<usize>,
    /// Room sizes for mesh bytes (first and last are compared).
    pub mesh_sizes: Vec<usize>,
    /// Onsets in the convergence scenario.
    pub convergence_rounds: usize,
    /// Phone calls: set-up times and CPU per call.
    pub phone: PhonePlan,
    /// Session transfers in a row.
    pub transfers: usize,
    /// Seconds of the demo shape's three talkers alone, counting list changes and ticks.
    pub list_stability_seconds: u64,
    /// Newcomer rounds in the demo shape after that window.
    pub list_stability_rounds: usize,
}

impl Plan {
    /// `make bench`.
    pub fn full(runs: usize) -> Plan {
        Plan {
            runs,
            // 120 onsets per system per run, over 24 talker phases: p99 needs hundreds.
            delay_rooms: 24,
            delay_onsets: 2,
            delay_systems: Vec::new(),
            capacity_max_listeners: 3000,
            capacity_cpu: 0,
            listener_steps: vec![250, 500, 1000, 2000, 3000, 4000, 8000],
            listener_window: std::time::Duration::from_secs(5),
            listener_sample_every: 100,
            listener_steps_streaming_max: 2000,
            listener_steps_janus: vec![10, 20, 30, 40, 50, 60, 80, 100],
            instruction_listeners: 100,
            scaling_steps: vec![500, 1000, 2000],
            scaling_parallel_min: 256,
            swarm_on_veth: true,
            link_layer_fan_out: true,
            link_ms: 40,
            cross_rounds: 20,
            codec_sizes: vec![10, 100, 1000],
            mesh_sizes: vec![10, 300],
            convergence_rounds: 9,
            phone: PhonePlan {
                setup_calls: 10,
                cpu_calls: 10,
                cpu_window: std::time::Duration::from_secs(10),
            },
            transfers: 30,
            list_stability_seconds: 60,
            list_stability_rounds: 10,
        }
    }

    /// The smoke run of `make test`: one iteration, small load, every code path.
    pub fn smoke() -> Plan {
        Plan {
            runs: 1,
            delay_rooms: 1,
            delay_onsets: 1,
            delay_systems: Vec::new(),
            capacity_max_listeners: 20,
            capacity_cpu: 0,
            listener_steps: vec![10, 20],
            listener_window: std::time::Duration::from_secs(1),
            listener_sample_every: 5,
            listener_steps_streaming_max: 20,
            listener_steps_janus: vec![5, 10],
            // valgrind's start-up alone would double the smoke's time; the bench runs it.
            instruction_listeners: 0,
            scaling_steps: vec![10, 20],
            // Small enough that the smoke's rooms are split too.
            scaling_parallel_min: 2,
            swarm_on_veth: true,
            link_layer_fan_out: true,
            link_ms: 20,
            cross_rounds: 2,
            codec_sizes: vec![10, 30],
            mesh_sizes: vec![4, 8],
            convergence_rounds: 1,
            phone: PhonePlan {
                setup_calls: 2,
                cpu_calls: 2,
                cpu_window: std::time::Duration::from_secs(1),
            },
            transfers: 2,
            list_stability_seconds: 5,
            list_stability_rounds: 1,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Server-added delay per system: `chorus`, `janus_default`, `janus_tuned`.
    pub delay: BTreeMap<String, DelayResult>,
    /// The codec look-ahead of one more encode pass, ms (part of the floor).
    pub lookahead_ms: f64,
    /// Capacity per system: `chorus`, `janus`.
    pub capacity: BTreeMap<String, Capacity>,
    /// Cross-server delay.
    pub cross_server: CrossServer,
    /// Codec work per room size.
    pub codec_work: Vec<codec_work::CodecWork>,
    /// Mesh bytes per room size.
    pub mesh_bytes: MeshBytes,
    /// Convergence.
    pub convergence: Convergence,
    /// Phone calls (absent from runs recorded before the scenario existed).
    #[serde(default)]
    pub telephony: Option<PhoneCalls>,
    /// Session transfers (absent from runs recorded before the scenario existed).
    #[serde(default)]
    pub transfer: Option<TransferFigures>,
    /// List stability and new speakers in the demo's shape (absent from runs recorded before
    /// the scenario existed).
    #[serde(default)]
    pub list_stability: Option<ListStability>,
    /// Listener capacity by swarm, per system (absent from runs recorded before the scenario
    /// existed).
    #[serde(default)]
    pub listener_capacity: BTreeMap<String, ListenerCapacity>,
    /// The machine's speed at the run's start (absent from runs recorded before it was taken).
    #[serde(default)]
    pub machine_speed: Option<MachineSpeed>,
}

/// A fixed piece of work timed at a run's start, so that runs on different days can be told
/// apart: the same VM type has run some days at half the speed of others (a shared host), and
/// every CPU figure moves with it. Ratios taken within one run (against Janus, two workers over
/// one) do not.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MachineSpeed {
    /// ns per step of a dependent integer loop (multiply and xor-shift; the best of 5 passes).
    pub cpu_loop_ns: f64,
    /// µs per 120-byte datagram over loopback, sent and received by one thread (the best of 5).
    pub loopback_datagram_us: f64,
}

/// Times [`MachineSpeed`]'s work (about half a second).
pub fn machine_speed() -> Result<MachineSpeed> {
    const STEPS: u64 = 20_000_000;
    const DATAGRAMS: u32 = 20_000;
    let mut cpu = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15_u64);
        for _ in 0..STEPS {
            x = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            x ^= x >> 29;
        }
        std::hint::black_box(x);
        cpu = cpu.min(started.elapsed().as_nanos() as f64 / STEPS as f64);
    }
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(receiver.local_addr()?)?;
    let (datagram, mut buffer) = ([7u8; 120], [0u8; 256]);
    let mut udp = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..DATAGRAMS {
            sender.send(&datagram)?;
            receiver.recv(&mut buffer)?;
        }
        udp = udp.min(started.elapsed().as_secs_f64() * 1e6 / f64::from(DATAGRAMS));
    }
    Ok(MachineSpeed {
        cpu_loop_ns: cpu,
        loopback_datagram_us: udp,
    })
}

/// Pins every thread of this process to `cpus` (a `taskset` list such as "1" or "0-1").
fn pin_self(cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(status.success(), "taskset -a -p -c {cpus} failed: {status}");
    Ok(())
}

/// Every online CPU of the machine, as a `taskset` list. Not `available_parallelism`: that
/// honours this process's affinity, so once pinned the process would count only the CPUs it
/// was pinned to, and "unpinning" would pin it to CPU 0 — where the measured server runs.
fn all_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|list| list.trim().to_owned())
        .ok()
        .filter(|list| !list.is_empty())
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            format!("0-{}", n.saturating_sub(1))
        })
}

/// The CPUs of a `taskset` list such as "0-3,6,8-9"; malformed parts are skipped.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .flat_map(|part| -> Vec<usize> {
            let mut ends = part
                .trim()
                .splitn(2, '-')
                .map(|n| n.trim().parse::<usize>());
            match (ends.next(), ends.next()) {
                (Some(Ok(first)), None) => vec![first],
                (Some(Ok(first)), Some(Ok(last))) if first <= last => (first..=last).collect(),
                _ => Vec::new(),
            }
        })
        .collect()
}

/// While alive, every thread of this process stays off `server_cpu` (the CPU a pinned server
/// is measured on); dropped, it may run anywhere again.
struct AwayFrom;

impl AwayFrom {
    fn cpu(server_cpu: usize) -> Result<AwayFrom> {
        let others: Vec<String> = parse_cpu_list(&all_cpus())
            .into_iter()
            .filter(|c| *c != server_cpu)
            .map(|c| c.to_string())
            .collect();
        if !others.is_empty() {
            pin_self(&others.join(","))?;
        }
        Ok(AwayFrom)
    }
}

impl Drop for AwayFrom {
    fn drop(&mut self) {
        if let Err(err) = pin_self(&all_cpus()) {
            eprintln!("bench: could not unpin this process: {err:#}");
        }
    }
}

/// The capacity scenario for both systems: the server pinned to `plan.capacity_cpu`, this
/// process to the other CPUs for the duration.
async fn capacities(plan: &Plan, delay_limits: (f64, f64)) -> Result<BTreeMap<String, Capacity>> {
    let _away = AwayFrom::cpu(plan.capacity_cpu)?;
    let mut out = BTreeMap::new();
    {
        let server = ServerProcess::start(ProcessOptions {
            cpu: Some(plan.capacity_cpu),
            max_participants: Some(plan.capacity_max_listeners + 50),
            ..ProcessOptions::default()
        })
        .await?;
        let room = ChorusRoom {
            server: &server,
            room: "capacity".into(),
        };
        let c = capacity::measure(
            &room,
            server.pid(),
            plan.capacity_max_listeners,
            delay_limits.0,
        )
        .await?;
        out.insert("chorus".to_owned(), c);
        drop(room);
        drop(server);

        let janus = JanusServer::start(JanusOptions {
            cpu: Some(plan.capacity_cpu),
            debug_level: 3,
            ..JanusOptions::default()
        })
        .await?;
        let session = janus.session().await?;
        let room = JanusRoom {
            session: &session,
            room: session.create_room(JanusJitter::Default).await?,
            jitter: JanusJitter::Default,
        };
        let c = capacity::measure(
            &room,
            janus.pid(),
            plan.capacity_max_listeners,
            delay_limits.1,
        )
        .await?;
        out.insert("janus".to_owned(), c);
    }
    Ok(out)
}

/// Where a ramp's listeners live: the swarm's own network namespace behind a veth pair
/// ([`crate::swarm_network`]) when the plan asks for it and this machine can build it, else
/// loopback (as in runs before the choice existed).
struct SwarmPlace {
    network: Option<crate::swarm_network::SwarmNetwork>,
}

impl SwarmPlace {
    /// The swarm network with the server side's NAPI thread on `server_cpu` and the swarm
    /// side's on the first other CPU (or loopback, saying why).
    fn build(plan: &Plan) -> SwarmPlace {
        if !plan.swarm_on_veth {
            return SwarmPlace { network: None };
        }
        let swarm_cpu = parse_cpu_list(&all_cpus())
            .into_iter()
            .find(|c| *c != plan.capacity_cpu)
            .unwrap_or(plan.capacity_cpu);
        match crate::swarm_network::SwarmNetwork::up(plan.capacity_cpu, swarm_cpu) {
            Ok(network) => SwarmPlace {
                network: Some(network),
            },
            Err(err) => {
                eprintln!("listeners: no swarm network, the swarm runs over loopback: {err:#}");
                SwarmPlace { network: None }
            }
        }
    }

    /// The address the server's media socket binds and advertises.
    fn server_ip(&self) -> Option<std::net::IpAddr> {
        self.network
            .as_ref()
            .map(|_| crate::swarm_network::SERVER_IP)
    }

    /// Whether the server sends listeners' media through packet sockets here: only across the
    /// veth pair, and only if the plan asks.
    fn link_layer(&self, plan: &Plan) -> bool {
        self.network.is_some() && plan.link_layer_fan_out
    }

    /// `config`'s listeners, placed here.
    fn place(&self, mut config: SwarmConfig) -> SwarmConfig {
        if let Some(network) = &self.network {
            config.bind_ip = crate::swarm_network::SWARM_IP;
            config.netns = Some(network.binder());
        }
        config
    }

    /// A ramp of `steps` run here: this place's kernel threads charged to the server and the
    /// generator, and its network named in the results.
    fn ramp(&self, steps: Vec<usize>, plan: &Plan, server_cpus: f64) -> SwarmPlan {
        let (server_threads, generator_threads, network, egress_interface, hand_off_mirror) =
            match &self.network {
                Some(n) => (
                    n.server_threads().to_vec(),
                    n.swarm_threads().to_vec(),
                    "veth",
                    Some(crate::swarm_network::SERVER_INTERFACE),
                    Some(crate::swarm_network::HAND_OFF_MIRROR),
                ),
                None => (Vec::new(), Vec::new(), "loopback", None, None),
            };
        SwarmPlan {
            steps,
            window: plan.listener_window,
            sample_every: plan.listener_sample_every,
            server_cpus,
            server_threads,
            generator_threads,
            network,
            egress_interface,
            hand_off_mirror,
        }
    }
}

/// Listener capacity by swarm: a fresh server pinned to `plan.capacity_cpu` with 3 talkers,
/// this process (talkers and swarm) on the other CPUs.
pub async fn listener_capacities(plan: &Plan) -> Result<BTreeMap<String, ListenerCapacity>> {
    let mut out = BTreeMap::new();
    if plan.listener_steps.is_empty() {
        return Ok(out);
    }
    let _away = AwayFrom::cpu(plan.capacity_cpu)?;
    let place = SwarmPlace::build(plan);
    {
        let largest = plan.listener_steps.iter().copied().max().unwrap_or(0);
        let server = ServerProcess::start(ProcessOptions {
            cpu: Some(plan.capacity_cpu),
            max_participants: Some(largest + 50),
            fan_out_workers: Some(1),
            udp_ip: place.server_ip(),
            link_layer_fan_out: place.link_layer(plan),
            ..ProcessOptions::default()
        })
        .await?;
        let room = ChorusRoom {
            server: &server,
            room: "listeners".into(),
        };
        let talkers = delay::join_talkers(&room).await?;
        let tokens = server.token_maker("listeners");
        let swarm_plan = place.ramp(plan.listener_steps.clone(), plan, 1.0);
        // Receive-only listeners: Chorus's own listener transport.
        let t = tokens.clone();
        let c = listeners::measure(
            |k, n| {
                let t = t.clone();
                place.place(SwarmConfig::new(
                    &server.base_url,
                    "listeners",
                    n,
                    move |i| t(&format!("listener-{k}-{i}")),
                ))
            },
            server.pid(),
            &swarm_plan,
        )
        .await?;
        let c = with_link_layer_share(c, &server).await;
        out.insert("chorus".to_owned(), c);
        // The same path's user-space instructions per listener-packet, by callgrind, on a
        // server of its own (instrumented, so not pinned: its CPU time means nothing).
        // A failed count is reported as not counted ("null"), not fatal to the whole run.
        let counted = super::instructions::per_listener_packet(
            plan.instruction_listeners,
            plan.listener_window,
        )
        .await
        .unwrap_or_else(|err| {
            eprintln!("instructions: not counted: {err:#}");
            None
        });
        if let Some(c) = out.get_mut("chorus") {
            c.instructions_per_listener_packet = counted;
        }
        // Listeners whose microphone streams silence: sendrecv, 50 packets/s each upstream.
        let t = tokens.clone();
        let silence_plan = SwarmPlan {
            // Each such listener is a whole WebRTC peer: smaller steps, so several hold.
            steps: [100, 200, 300, 400]
                .into_iter()
                .chain(plan.listener_steps.iter().copied())
                .filter(|n| *n <= plan.listener_steps_streaming_max)
                .collect::<std::collections::BTreeSet<usize>>()
                .into_iter()
                .collect(),
            ..swarm_plan.clone()
        };
        let c = listeners::measure(
            |k, n| {
                let t = t.clone();
                let mut config = SwarmConfig::new(&server.base_url, "listeners", n, move |i| {
                    t(&format!("streaming-{k}-{i}"))
                });
                config.direction = Direction::SendRecv;
                config.upstream = Upstream::Silence;
                place.place(config)
            },
            server.pid(),
            &silence_plan,
        )
        .await?;
        out.insert("chorus_streaming_silence".to_owned(), c);
        super::close_all(talkers.iter().map(|b| &**b)).await;
        drop(room);
        drop(server);

        // Janus AudioBridge by the same method: its listeners offer recvonly too. It gathers
        // its host candidates at start, the swarm network's side among them.
        let janus = JanusServer::start(JanusOptions {
            cpu: Some(plan.capacity_cpu),
            debug_level: 3,
            ..JanusOptions::default()
        })
        .await?;
        let session = janus.session().await?;
        let janus_room = session.create_room(JanusJitter::Default).await?;
        let venue = JanusRoom {
            session: &session,
            room: janus_room,
            jitter: JanusJitter::Default,
        };
        let talkers = delay::join_talkers(&venue).await?;
        let c = listeners::measure(
            |_, n| {
                place.place(SwarmConfig::janus(
                    janus.base_url(),
                    JanusTarget::new(janus_room),
                    n,
                ))
            },
            janus.pid(),
            &SwarmPlan {
                steps: plan.listener_steps_janus.clone(),
                ..swarm_plan.clone()
            },
        )
        .await?;
        out.insert("janus".to_owned(), c);
        super::close_all(talkers.iter().map(|b| &**b)).await;
    }
    out.extend(worker_scaling(plan).await?);
    Ok(out)
}

/// The two-worker scaling ramps: the same swarm (still off `plan.capacity_cpu`) against a
/// server on every CPU, with one fan-out worker and then two. Keys `chorus_scaling_1_worker`
/// and `chorus_scaling_2_workers`; nothing when the plan has no scaling steps or the machine
/// one CPU.
async fn worker_scaling(plan: &Plan) -> Result<BTreeMap<String, ListenerCapacity>> {
    let mut out = BTreeMap::new();
    let cpus = parse_cpu_list(&all_cpus()).len();
    if plan.scaling_steps.is_empty() || cpus < 2 {
        return Ok(out);
    }
    let _away = AwayFrom::cpu(plan.capacity_cpu)?;
    let place = SwarmPlace::build(plan);
    let largest = plan.scaling_steps.iter().copied().max().unwrap_or(0);
    for workers in [1, 2] {
        let server = ServerProcess::start(ProcessOptions {
            cpu_set: Some(all_cpus()),
            max_participants: Some(largest + 50),
            fan_out_workers: Some(workers),
            parallel_fan_out_min: Some(plan.scaling_parallel_min),
            udp_ip: place.server_ip(),
            link_layer_fan_out: place.link_layer(plan),
            ..ProcessOptions::default()
        })
        .await?;
        let room = ChorusRoom {
            server: &server,
            room: "scaling".into(),
        };
        let talkers = delay::join_talkers(&room).await?;
        let tokens = server.token_maker("scaling");
        let c = listeners::measure(
            |k, n| {
                let t = tokens.clone();
                place.place(SwarmConfig::new(&server.base_url, "scaling", n, move |i| {
                    t(&format!("scaling-{k}-{i}"))
                }))
            },
            server.pid(),
            &place.ramp(plan.scaling_steps.clone(), plan, cpus as f64),
        )
        .await?;
        let c = with_link_layer_share(c, &server).await;
        let name = if workers == 1 {
            "chorus_scaling_1_worker".to_owned()
        } else {
            format!("chorus_scaling_{workers}_workers")
        };
        out.insert(name, c);
        super::close_all(talkers.iter().map(|b| &**b)).await;
    }
    Ok(out)
}

/// Server-added delay of every system, in fresh rooms: Chorus by default, in low-delay mode and
/// on a fixed tick, Janus AudioBridge with its default and its lowest jitter setting.
pub async fn delays(plan: &Plan) -> Result<BTreeMap<String, delay::DelayResult>> {
    let wanted =
        |name: &str| plan.delay_systems.is_empty() || plan.delay_systems.iter().any(|s| s == name);
    let mut delays = BTreeMap::new();
    for (name, low_delay, fixed_tick, frame_ms) in [
        ("chorus", false, false, None),
        ("chorus_low_delay", true, false, None),
        ("chorus_low_delay_10ms", true, false, Some(10)),
        ("chorus_fixed_tick", false, true, None),
    ] {
        if !wanted(name) {
            continue;
        }
        let server = ServerProcess::start(ProcessOptions {
            low_delay,
            fixed_tick,
            frame_ms,
            ..ProcessOptions::default()
        })
        .await?;
        let s = &server;
        let mut d = delay::measure(plan.delay_rooms, plan.delay_onsets, |k| async move {
            Ok(ChorusRoom {
                server: s,
                room: format!("delay-{k}"),
            })
        })
        .await?;
        d.server_own = delay::ServerOwnDelay::from_metrics(&server.metrics().await?);
        eprintln!("delay {name}: {:?}", d.server_added);
        delays.insert(name.to_owned(), d);
    }
    if wanted("janus_default") || wanted("janus_tuned") {
        let janus = JanusServer::start(JanusOptions {
            debug_level: 3,
            ..JanusOptions::default()
        })
        .await?;
        let session = janus.session().await?;
        for (name, jitter) in [
            ("janus_default", JanusJitter::Default),
            ("janus_tuned", JanusJitter::Lowest),
        ] {
            if !wanted(name) {
                continue;
            }
            let session = &session;
            let d = delay::measure(plan.delay_rooms, plan.delay_onsets, |_| async move {
                Ok(JanusRoom {
                    session,
                    room: session.create_room(jitter).await?,
                    jitter,
                })
            })
            .await?;
            eprintln!("delay {name}: {:?}", d.server_added);
            delays.insert(name.to_owned(), d);
        }
    }
    Ok(delays)
}

/// One run of every scenario.
pub async fn run_once(plan: &Plan) -> Result<RunResult> {
    let speed = machine_speed()?;
    eprintln!("machine speed: {speed:?}");
    let delays = delays(plan).await?;
    let lookahead_ms = delay::server_codec_lookahead_ms()?;
    // A step holds while its p99 stays within 10 ms of the same system's unloaded p99 (and, for
    // Chorus, that is compared with the target separately).
    let limit = |name: &str| {
        delays
            .get(name)
            .map_or(f64::INFINITY, |d| d.server_added.p99 + 10.0)
    };
    let capacity = capacities(plan, (limit("chorus"), limit("janus_default"))).await?;
    let listener_capacity = listener_capacities(plan).await?;
    let cross = cross_server(plan.link_ms, plan.cross_rounds).await?;
    eprintln!("cross-server: {:?}", cross.extra);
    let codec_work = plan
        .codec_sizes
        .iter()
        .map(|n| codec_work::measure(*n))
        .collect::<Result<Vec<_>>>()?;
    let mesh_bytes = mesh::mesh_bytes(&plan.mesh_sizes).await?;
    let convergence = mesh::convergence(plan.convergence_rounds).await?;
    eprintln!("convergence: {:?}", convergence.heard_everywhere);
    let phone = telephony::measure(plan.phone).await?;
    eprintln!("phone calls, both ways: {:?}", phone.both_ways);
    let moves = transfer::measure(plan.transfers).await?;
    eprintln!(
        "transfers: switch {:?}, gap {:?}",
        moves.switch_ms, moves.audio_gap_ms
    );
    let lists =
        list_stability::measure(plan.list_stability_seconds, plan.list_stability_rounds).await?;
    eprintln!(
        "list stability: consistency {:.4}, {:.2} list changes a minute, newcomers' start received {:?}",
        lists.consistency, lists.list_changes_per_minute_three_talkers, lists.onset_received
    );
    Ok(RunResult {
        delay: delays,
        lookahead_ms,
        capacity,
        cross_server: cross,
        codec_work,
        mesh_bytes,
        convergence,
        telephony: Some(phone),
        transfer: Some(moves),
        list_stability: Some(lists),
        listener_capacity,
        machine_speed: Some(speed),
    })
}

/// Min, median and max of one figure over the runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median (the lower middle for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread {
            min: f64::NAN,
            median: f64::NAN,
            max: f64::NAN,
        };
    }
    Spread {
        min: v[0],
        median: v[(v.len() - 1) / 2],
        max: v[v.len() - 1],
    }
}

/// A delay system of the report: its key in the results, its label, its figures' names.
#[derive(Debug, Clone, Copy)]
pub struct DelaySystem {
    /// The key in `RunResult::delay` and in `delay_ms`.
    pub key: &'static str,
    /// How the report names it.
    pub label: &'static str,
    /// The names of its p50 and p99 figures.
    pub figures: (&'static str, &'static str),
}

/// The delay systems, in the report's order.
pub const DELAY_SYSTEMS: [DelaySystem; 6] = [
    DelaySystem {
        key: "chorus",
        label: "Chorus",
        figures: ("delay.chorus.p50", "delay.chorus.p99"),
    },
    DelaySystem {
        key: "chorus_low_delay",
        label: "Chorus, `mixing.lowDelay`",
        figures: ("delay.chorus_low_delay.p50", "delay.chorus_low_delay.p99"),
    },
    DelaySystem {
        key: "chorus_low_delay_10ms",
        label: "Chorus, `mixing.lowDelay` and `frameMs: 10`",
        figures: (
            "delay.chorus_low_delay_10ms.p50",
            "delay.chorus_low_delay_10ms.p99",
        ),
    },
    DelaySystem {
        key: "chorus_fixed_tick",
        label: "Chorus, `mixing.alignTicks: false` (the fixed tick)",
        figures: ("delay.chorus_fixed_tick.p50", "delay.chorus_fixed_tick.p99"),
    },
    DelaySystem {
        key: "janus_default",
        label: "Janus AudioBridge, default (prebuffer 6)",
        figures: ("delay.janus_default.p50", "delay.janus_default.p99"),
    },
    DelaySystem {
        key: "janus_tuned",
        label: "Janus AudioBridge, lowest (prebuffer 1)",
        figures: ("delay.janus_tuned.p50", "delay.janus_tuned.p99"),
    },
];

/// Chorus's delay systems and the figure of their server's own tail (percent of packets).
pub const SERVER_TAIL_FIGURES: [(&str, &str); 4] = [
    ("chorus", "delay.chorus.server_tail_percent"),
    (
        "chorus_low_delay",
        "delay.chorus_low_delay.server_tail_percent",
    ),
    (
        "chorus_low_delay_10ms",
        "delay.chorus_low_delay_10ms.server_tail_percent",
    ),
    (
        "chorus_fixed_tick",
        "delay.chorus_fixed_tick.server_tail_percent",
    ),
];

/// Chorus's delay systems and the figure of how often their jitter buffers added a frame of
/// delay (a restart after running dry, or a stretch), per 1,000 packets. The bench's talkers and
/// listeners never pause, so a restart is a packet that missed its tick (or a stream's end).
pub const FRAMES_ADDED_FIGURES: [(&str, &str); 4] = [
    ("chorus", "delay.chorus.frames_added_per_1000"),
    (
        "chorus_low_delay",
        "delay.chorus_low_delay.frames_added_per_1000",
    ),
    (
        "chorus_low_delay_10ms",
        "delay.chorus_low_delay_10ms.frames_added_per_1000",
    ),
    (
        "chorus_fixed_tick",
        "delay.chorus_fixed_tick.frames_added_per_1000",
    ),
];

/// The delay figures (each system's p50 and p99, and the fixed-tick floor's), each over the
/// runs, from each run's delays and codec look-ahead.
pub fn delay_figures(
    runs: &[(&BTreeMap<String, DelayResult>, f64)],
) -> BTreeMap<&'static str, Spread> {
    let mut f = BTreeMap::new();
    for system in &DELAY_SYSTEMS {
        let of = |get: fn(&DelayResult) -> f64| {
            spread(
                runs.iter()
                    .map(|(d, _)| d.get(system.key).map_or(f64::NAN, get)),
            )
        };
        f.insert(system.figures.0, of(|d| d.server_added.p50));
        f.insert(system.figures.1, of(|d| d.server_added.p99));
    }
    let last = |get: fn(&super::Percentiles) -> f64| {
        spread(runs.iter().map(|(d, _)| {
            d.get("chorus")
                .and_then(|c| c.last_listener.as_ref())
                .map_or(f64::NAN, get)
        }))
    };
    // A figure from each Chorus system's server-own view, over the runs (NaN where absent).
    let own = |key: &str, get: &dyn Fn(&delay::ServerOwnDelay) -> Option<f64>| {
        spread(runs.iter().map(|(d, _)| {
            d.get(key)
                .and_then(|r| r.server_own.as_ref())
                .and_then(get)
                .unwrap_or(f64::NAN)
        }))
    };
    for (key, figure) in SERVER_TAIL_FIGURES {
        f.insert(figure, own(key, &|o| Some(o.share_over_tail * 100.0)));
    }
    for (key, figure) in FRAMES_ADDED_FIGURES {
        f.insert(
            figure,
            own(key, &|o| {
                let count = |kind: &str| o.jitter_adjustments.get(kind).copied();
                // Absent from runs recorded before the metric existed.
                Some((count("restart")? + count("stretch")?) / o.packets * 1000.0)
            }),
        );
    }
    f.insert("delay.chorus_last_listener.p50", last(|p| p.p50));
    f.insert("delay.chorus_last_listener.p99", last(|p| p.p99));
    f.insert(
        "delay.floor.p50",
        spread(runs.iter().map(|(_, l)| delay::floor_ms(*l).0)),
    );
    f.insert(
        "delay.floor.p99",
        spread(runs.iter().map(|(_, l)| delay::floor_ms(*l).1)),
    );
    f
}

/// The figures of the report, each over the runs.
pub fn figures(runs: &[RunResult]) -> BTreeMap<&'static str, Spread> {
    let delays: Vec<(&BTreeMap<String, DelayResult>, f64)> =
        runs.iter().map(|r| (&r.delay, r.lookahead_ms)).collect();
    let mut f = delay_figures(&delays);
    let mut put = |name: &'static str, get: &dyn Fn(&RunResult) -> f64| {
        f.insert(name, spread(runs.iter().map(get)));
    };
    for (system, held, per_core, per_listener) in [
        (
            "chorus",
            "capacity.chorus",
            "capacity.chorus.extrapolated",
            "capacity.chorus.cpu_per_listener_percent",
        ),
        (
            "janus",
            "capacity.janus",
            "capacity.janus.extrapolated",
            "capacity.janus.cpu_per_listener_percent",
        ),
    ] {
        let of =
            |r: &RunResult, get: fn(&Capacity) -> f64| r.capacity.get(system).map_or(f64::NAN, get);
        put(held, &|r| of(r, |c| c.listeners as f64));
        put(per_core, &|r| of(r, |c| c.extrapolated_listeners_per_core));
        put(per_listener, &|r| of(r, |c| c.cpu_per_listener_percent));
    }
    put("cross_server_extra.p50", &|r| r.cross_server.extra.p50);
    put("cross_server_extra.p99", &|r| r.cross_server.extra.p99);
    put("mesh_bytes_ratio", &|r| r.mesh_bytes.ratio);
    put("convergence.p50", &|r| r.convergence.heard_everywhere.p50);
    put("convergence.p99", &|r| r.convergence.heard_everywhere.p99);
    let phones: Vec<Option<&PhoneCalls>> = runs.iter().map(|r| r.telephony.as_ref()).collect();
    f.extend(phone_figures(&phones));
    let moves: Vec<Option<&TransferFigures>> = runs.iter().map(|r| r.transfer.as_ref()).collect();
    f.extend(transfer_figures(&moves));
    let lists: Vec<Option<&ListStability>> =
        runs.iter().map(|r| r.list_stability.as_ref()).collect();
    f.extend(list_stability_figures(&lists));
    f
}

/// The list-stability figures over the runs (`None`: a run without them).
pub fn list_stability_figures(runs: &[Option<&ListStability>]) -> BTreeMap<&'static str, Spread> {
    let mut f = BTreeMap::new();
    let mut put = |name: &'static str, get: fn(&ListStability) -> f64| {
        f.insert(name, spread(runs.iter().map(|r| r.map_or(f64::NAN, get))));
    };
    put("list_stability.consistency", |l| l.consistency);
    put("list_stability.list_changes_per_minute", |l| {
        l.list_changes_per_minute_three_talkers
    });
    put("list_stability.onset_received.p50", |l| {
        l.onset_received.p50
    });
    put("list_stability.onset_received.min", |l| {
        l.onset_received.min
    });
    put("list_stability.consistency_with_newcomers", |l| {
        l.consistency_with_newcomers
    });
    put("list_stability.newcomer_list_changes", |l| {
        l.newcomer_list_changes
    });
    f
}

/// The list-stability keys of the results JSON, each a median over the runs: `consistency`,
/// `list_changes_per_minute_three_talkers` and `onset_received_ms` at the top level, the rest
/// under `list_stability`.
pub fn list_stability_json(
    plan: &Plan,
    runs: &[Option<&ListStability>],
) -> serde_json::Map<String, Value> {
    let f = list_stability_figures(runs);
    let m = |k: &str| f.get(k).map_or(f64::NAN, |s| s.median);
    let mut keys = serde_json::Map::new();
    keys.insert(
        "consistency".to_owned(),
        json!(m("list_stability.consistency")),
    );
    keys.insert(
        "list_changes_per_minute_three_talkers".to_owned(),
        json!(m("list_stability.list_changes_per_minute")),
    );
    keys.insert(
        "onset_received_ms".to_owned(),
        json!({
            "p50": m("list_stability.onset_received.p50"),
            "min": m("list_stability.onset_received.min"),
        }),
    );
    keys.insert(
        "list_stability".to_owned(),
        json!({
            "seconds_per_run": plan.list_stability_seconds,
            "newcomer_rounds_per_run": plan.list_stability_rounds,
            "consistency_with_newcomers": m("list_stability.consistency_with_newcomers"),
            "newcomer_list_changes": m("list_stability.newcomer_list_changes"),
            "shape": "make demo's: 5 servers, 3 espeak-ng talkers, a silent ear on every server",
            "consistency_from": "the primary's chorus_mesh_consistent_ticks_total over chorus_mesh_ticks_total",
            "onset_received_of": "per (newcomer, ear): ms heard of the newcomer's first 250 ms (100 ms at 3100 Hz, then 150 ms of 4300 Hz), in 10 ms windows above -30 dBFS",
        }),
    );
    keys
}

/// The session-transfer figures over the runs (`None`: a run without them).
pub fn transfer_figures(runs: &[Option<&TransferFigures>]) -> BTreeMap<&'static str, Spread> {
    let mut f = BTreeMap::new();
    let mut put = |name: &'static str, get: fn(&TransferFigures) -> f64| {
        f.insert(name, spread(runs.iter().map(|r| r.map_or(f64::NAN, get))));
    };
    put("transfer.switch.p50", |t| t.switch_ms.p50);
    put("transfer.switch.p99", |t| t.switch_ms.p99);
    put("transfer.gap.p50", |t| t.audio_gap_ms.p50);
    put("transfer.gap.p99", |t| t.audio_gap_ms.p99);
    f
}

/// The session-transfer block of the results JSON.
pub fn transfer_json(plan: &Plan, runs: &[Option<&TransferFigures>]) -> Value {
    let f = transfer_figures(runs);
    let m = |k: &str| f.get(k).map_or(f64::NAN, |s| s.median);
    json!({
        "switch_ms": {"p50": m("transfer.switch.p50"), "p99": m("transfer.switch.p99")},
        "audio_gap_ms": {"p50": m("transfer.gap.p50"), "p99": m("transfer.gap.p99")},
        "moves_per_run": plan.transfers,
        "moves_not_heard": runs.iter().flatten().map(|t| t.failed).sum::<usize>(),
        "switch_from": "the redemption request to the first packet of the new device's tone at a listener",
        "gap_from": "the listener's decoded audio: last block of the old device's tone to the first of the new one's",
    })
}

/// The phone-call figures over the runs (`None`: a run without them).
pub fn phone_figures(runs: &[Option<&PhoneCalls>]) -> BTreeMap<&'static str, Spread> {
    let mut f = BTreeMap::new();
    let mut put = |name: &'static str, get: &dyn Fn(&PhoneCalls) -> f64| {
        f.insert(name, spread(runs.iter().map(|r| r.map_or(f64::NAN, get))));
    };
    put("phone.phone_to_room.p50", &|p| p.phone_to_room.p50);
    put("phone.phone_to_room.p95", &|p| p.phone_to_room.p95);
    put("phone.phone_to_room.max", &|p| p.phone_to_room.max);
    put("phone.room_to_phone.p50", &|p| p.room_to_phone.p50);
    put("phone.room_to_phone.p95", &|p| p.room_to_phone.p95);
    put("phone.room_to_phone.max", &|p| p.room_to_phone.max);
    put("phone.first_packet.p50", &|p| p.first_packet.p50);
    put("phone.first_packet.p95", &|p| p.first_packet.p95);
    put("phone.first_packet.max", &|p| p.first_packet.max);
    put("phone.both_ways.p50", &|p| p.both_ways.p50);
    put("phone.both_ways.p95", &|p| p.both_ways.p95);
    put("phone.both_ways.max", &|p| p.both_ways.max);
    put("phone.cpu_per_call_percent", &|p| p.cpu.per_call_percent);
    put("phone.cpu_idle_percent", &|p| p.cpu.idle_percent);
    put("phone.cpu_loaded_percent", &|p| p.cpu.loaded_percent);
    f
}

/// The `phone_calls` object of the results: medians over the runs.
pub fn phone_json(plan: &Plan, runs: &[Option<&PhoneCalls>]) -> Value {
    let f = phone_figures(runs);
    let m = |k: &str| f.get(k).map_or(f64::NAN, |s| s.median);
    let trio = |d: &str| {
        json!({
            "p50": m(&format!("phone.{d}.p50")),
            "p95": m(&format!("phone.{d}.p95")),
            "max": m(&format!("phone.{d}.max")),
        })
    };
    json!({
        "setup_ms_after_200_ok": {
            "phone_to_room": trio("phone_to_room"),
            "room_to_phone": trio("room_to_phone"),
            "room_to_phone_first_packet": trio("first_packet"),
            "both_ways": trio("both_ways"),
            "target": telephony::TARGET_MS,
            "calls_per_run": plan.phone.setup_calls,
            "calls_not_measured": runs.iter().flatten().map(|p| p.failed).sum::<usize>(),
            "room_to_phone_observed_at": "the phone's own RTP socket (first packet carrying the room's tone)",
        },
        "cpu_per_call_percent_of_core": m("phone.cpu_per_call_percent"),
        "cpu_idle_percent": m("phone.cpu_idle_percent"),
        "cpu_loaded_percent": m("phone.cpu_loaded_percent"),
        "cpu_concurrent_calls": plan.phone.cpu_calls,
        "cpu_codec": "PCMU",
    })
}

/// The machine, as a reader needs it to compare.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    // The machine's, not this process's: the capacity scenario pins the harness to one CPU.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get()));
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cpu}, {cores} cores, {memory_gib:.0} GiB")
}

/// `delay_ms` of a results file from the median figure `m` of each key: every system of
/// [`DELAY_SYSTEMS`], the last listener, the floor and Chorus over the floor.
pub fn delay_ms_json(m: &dyn Fn(&str) -> f64) -> Value {
    let mut delay_ms = serde_json::Map::new();
    for system in &DELAY_SYSTEMS {
        delay_ms.insert(
            system.key.to_owned(),
            json!({"p50": m(system.figures.0), "p99": m(system.figures.1)}),
        );
    }
    delay_ms.insert(
        "chorus_last_listener".to_owned(),
        json!({"p50": m("delay.chorus_last_listener.p50"), "p99": m("delay.chorus_last_listener.p99")}),
    );
    delay_ms.insert("floor".to_owned(), json!(m("delay.floor.p50")));
    delay_ms.insert("floor_p99".to_owned(), json!(m("delay.floor.p99")));
    delay_ms.insert(
        "chorus_over_floor_p50".to_owned(),
        json!(m("delay.chorus.p50") / m("delay.floor.p50")),
    );
    Value::Object(delay_ms)
}

/// The results file: the required shape, headline values as medians over the runs, then every
/// run in full.
pub fn results_json(plan: &Plan, runs: &[RunResult]) -> Value {
    let f = figures(runs);
    let m = |k: &str| f.get(k).map_or(f64::NAN, |s| s.median);
    let codec = |n: usize| {
        spread(runs.iter().map(|r| {
            r.codec_work
                .iter()
                .find(|c| c.participants == n)
                .map_or(f64::NAN, |c| c.encodes_per_tick)
        }))
        .median
    };
    let mut encodes = serde_json::Map::new();
    for n in &plan.codec_sizes {
        encodes.insert(n.to_string(), json!(codec(*n)));
    }
    let (first, last) = (
        plan.mesh_sizes.first().copied().unwrap_or(0),
        plan.mesh_sizes.last().copied().unwrap_or(0),
    );
    let mut value = json!({
        "machine": machine(),
        "runs": runs.len(),
        "delay_ms": delay_ms_json(&m),
        // Per core: one core over the measured CPU per listener at the largest step that held.
        // The listeners actually held are beside it; for Chorus they are a lower bound whenever
        // the load generator ran out of CPU first (`chorus_limited_by`).
        "capacity_listeners_per_core": {
            "chorus": m("capacity.chorus.extrapolated"),
            "janus": m("capacity.janus.extrapolated"),
            "chorus_listeners_held": m("capacity.chorus"),
            "janus_listeners_held": m("capacity.janus"),
            "chorus_cpu_per_listener_percent": m("capacity.chorus.cpu_per_listener_percent"),
            "janus_cpu_per_listener_percent": m("capacity.janus.cpu_per_listener_percent"),
            "chorus_limited_by": runs.last().and_then(|r| r.capacity.get("chorus")).map(|c| c.limited_by),
            "janus_limited_by": runs.last().and_then(|r| r.capacity.get("janus")).map(|c| c.limited_by),
        },
        "capacity": capacity_json(&runs.iter().map(|r| &r.listener_capacity).collect::<Vec<_>>()),
        "cross_server_extra_ms": {"p50": m("cross_server_extra.p50"), "p99": m("cross_server_extra.p99"), "link_one_way_ms": plan.link_ms},
        "encodes_per_tick": encodes,
        format!("mesh_bytes_ratio_{last}_vs_{first}"): m("mesh_bytes_ratio"),
        "convergence_ms": {"p50": m("convergence.p50"), "p99": m("convergence.p99")},
        "phone_calls": phone_json(plan, &runs.iter().map(|r| r.telephony.as_ref()).collect::<Vec<_>>()),
        "transfer": transfer_json(plan, &runs.iter().map(|r| r.transfer.as_ref()).collect::<Vec<_>>()),
        "spread": f,
        "per_run": runs,
    });
    let lists: Vec<Option<&ListStability>> =
        runs.iter().map(|r| r.list_stability.as_ref()).collect();
    if let Value::Object(top) = &mut value {
        top.extend(list_stability_json(plan, &lists));
    }
    value
}

/// The `capacity` object of the results: the swarm's figures, medians over the runs. Figures
/// not measured (yet) are `null`, never a made-up number.
pub fn capacity_json(runs: &[&BTreeMap<String, ListenerCapacity>]) -> Value {
    let med = |system: &str, get: fn(&ListenerCapacity) -> f64| {
        let s = spread(runs.iter().map(|r| r.get(system).map_or(f64::NAN, get)));
        if s.median.is_finite() {
            json!(s.median)
        } else {
            Value::Null
        }
    };
    let chorus_per_core = med("chorus", |c| c.per_core);
    let janus_per_core = med("janus", |c| c.per_core);
    let ratio = match (chorus_per_core.as_f64(), janus_per_core.as_f64()) {
        (Some(c), Some(j)) if j > 0.0 => json!(c / j),
        _ => Value::Null,
    };
    // At the swarm's sockets; where the server's interface transmits, after its queue; and
    // where the server hands its datagrams to the interface (the egress taps, veth only).
    let last_minus_first = med("chorus", |c| {
        listeners::at_step(c, 2000, |s| s.last_minus_first_ms).unwrap_or(f64::NAN)
    });
    let last_minus_first_egress = med("chorus", |c| {
        listeners::at_step(c, 2000, |s| s.egress_spread.map(|e| e.p50_ms)).unwrap_or(f64::NAN)
    });
    let last_minus_first_hand_off = med("chorus", |c| {
        listeners::at_step(c, 2000, |s| s.hand_off_spread.map(|e| e.p50_ms)).unwrap_or(f64::NAN)
    });
    // Where the swarm ran in the last run (`veth` or `loopback`; older runs: loopback).
    let network = runs
        .last()
        .and_then(|r| r.get("chorus"))
        .map(|c| c.network.clone().unwrap_or_else(|| "loopback".to_owned()));
    json!({
        "network": network,
        "held_one_core": med("chorus", |c| c.held_one_core as f64),
        "per_core_cpu": chorus_per_core,
        "cpu_seconds_per_listener_second": med("chorus", |c| c.cpu_per_listener),
        "fixed_cpu_cores": med("chorus", |c| c.fixed_cpu),
        "per_core_cpu_streaming_silence": med("chorus_streaming_silence", |c| c.per_core),
        "janus_per_core_cpu": janus_per_core,
        "ratio_vs_janus": ratio,
        "last_minus_first_delay_ms_at_2000": last_minus_first,
        "last_minus_first_egress_ms_at_2000": last_minus_first_egress,
        "last_minus_first_hand_off_ms_at_2000": last_minus_first_hand_off,
        "instructions_per_listener_packet": med("chorus", |c| {
            c.instructions_per_listener_packet.unwrap_or(f64::NAN)
        }),
        "two_workers": two_workers_json(runs),
        "link_layer_share": med("chorus", |c| c.link_layer_share.unwrap_or(f64::NAN)),
    })
}

/// `c` with the share of `server`'s outgoing datagrams that left through packet sockets (from
/// its metrics), where it sent any that way.
async fn with_link_layer_share(
    mut c: ListenerCapacity,
    server: &ServerProcess,
) -> ListenerCapacity {
    match server.metrics().await {
        Ok(text) => {
            let link =
                crate::media_server::metric(&text, "chorus_media_link_layer_datagrams_total")
                    .unwrap_or(0.0);
            let out = crate::media_server::metric_sum(
                &text,
                "chorus_media_datagrams_total",
                &["direction=\"out\""],
            );
            if link > 0.0 && out > 0.0 {
                c.link_layer_share = Some(link / out);
            }
        }
        Err(err) => eprintln!("listeners: cannot read the server's metrics: {err:#}"),
    }
    c
}

/// The two-worker scaling figures of [`capacity_json`]: CPU per listener with one fan-out worker
/// and with two on the same CPUs (the slope, or at the largest step with one point), their
/// ratio, and the fan-out's spread at the largest step of each.
fn two_workers_json(runs: &[&BTreeMap<String, ListenerCapacity>]) -> Value {
    fn largest_held(c: &ListenerCapacity) -> Option<&SwarmStep> {
        c.steps
            .iter()
            .filter(|s| s.held)
            .max_by_key(|s| s.listeners)
    }
    let per_listener = |c: &ListenerCapacity| {
        if c.cpu_per_listener.is_finite() {
            c.cpu_per_listener
        } else {
            largest_held(c).map_or(f64::NAN, |s| s.server_cpu / s.listeners as f64)
        }
    };
    // A figure of the largest step held: the spread at the swarm's sockets or at a tap.
    let at_largest = |get: fn(&SwarmStep) -> Option<f64>| {
        move |c: &ListenerCapacity| largest_held(c).and_then(get).unwrap_or(f64::NAN)
    };
    let spread_at_largest = at_largest(|s| s.last_minus_first_ms);
    let egress_at_largest = at_largest(|s| s.egress_spread.map(|e| e.p50_ms));
    let hand_off_at_largest = at_largest(|s| s.hand_off_spread.map(|e| e.p50_ms));
    let med = |system: &str, get: &dyn Fn(&ListenerCapacity) -> f64| {
        let s = spread(runs.iter().map(|r| r.get(system).map_or(f64::NAN, get)));
        s.median.is_finite().then_some(s.median)
    };
    let one = med("chorus_scaling_1_worker", &per_listener);
    let two = med("chorus_scaling_2_workers", &per_listener);
    let largest = |system: &str| {
        med(system, &|c: &ListenerCapacity| {
            largest_held(c).map_or(f64::NAN, |s| s.listeners as f64)
        })
    };
    json!({
        "cpu_per_listener_1_worker": one,
        "cpu_per_listener_2_workers": two,
        "ratio_2_to_1": match (one, two) {
            (Some(one), Some(two)) if one > 0.0 => json!(two / one),
            _ => Value::Null,
        },
        "largest_step_held_1_worker": largest("chorus_scaling_1_worker"),
        "largest_step_held_2_workers": largest("chorus_scaling_2_workers"),
        "last_minus_first_ms_1_worker": med("chorus_scaling_1_worker", &spread_at_largest),
        "last_minus_first_ms_2_workers": med("chorus_scaling_2_workers", &spread_at_largest),
        "last_minus_first_egress_ms_1_worker": med("chorus_scaling_1_worker", &egress_at_largest),
        "last_minus_first_egress_ms_2_workers": med("chorus_scaling_2_workers", &egress_at_largest),
        "last_minus_first_hand_off_ms_1_worker": med("chorus_scaling_1_worker", &hand_off_at_largest),
        "last_minus_first_hand_off_ms_2_workers": med("chorus_scaling_2_workers", &hand_off_at_largest),
    })
}

/// Writes the JSON results to `path` (creating its directory).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_as_taskset_writes_them() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0-2,5,7-8\n"), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(parse_cpu_list("3"), vec![3]);
        assert_eq!(parse_cpu_list("2-1,x,4"), vec![4]);
        assert!(parse_cpu_list("").is_empty());
    }

    #[test]
    fn all_cpus_names_at_least_this_cpu() {
        assert!(!parse_cpu_list(&all_cpus()).is_empty());
    }
}
