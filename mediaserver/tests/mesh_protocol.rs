//! The mesh protocol core in virtual time: a small deterministic network simulator runs several
//! `MeshNodeState`s with message delay, loss, cut links and server death/restart. Every message
//! goes through the real wire encoding and decoding on its way.
//!
//! Invariants checked on every simulated millisecond: an accepted global list's epoch never goes
//! down on a server (within one run of that server).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chorus_crds::{MeshMixing, MeshNode, MeshPlan, MeshTransfer};
use chorus_mediaserver::media::{Candidate, StreamId};
use chorus_mediaserver::mesh::protocol::rendezvous_order;
use chorus_mediaserver::mesh::{
    ControlMessage, GlobalList, MeshNodeState, ProtocolConfig, StreamKey,
};

const ROOM: &str = "town";
const MS: Duration = Duration::from_millis(1);

fn plan(ids: &[String]) -> MeshPlan {
    MeshPlan {
        conference: "town".into(),
        generation: 1,
        nodes: ids
            .iter()
            .map(|id| MeshNode {
                id: id.clone(),
                region: "r".into(),
                mesh: format!("{id}:7000"),
                signal: format!("http://{id}:8080"),
            })
            .collect(),
        mixing: MeshMixing {
            top_speakers: 3,
            extra_candidates: 1,
            frame_ms: 20,
            jitter_min_ms: 20,
            jitter_max_ms: 120,
            rank_interval_ms: 100,
            low_delay: false,
            align_ticks: true,
        },
        transfer: MeshTransfer {
            enabled: false,
            token_ttl_seconds: 60,
            allow_cross_server: true,
        },
        telephony: None,
    }
}

fn cand(stream: u64, importance: f32, voice: bool) -> Candidate {
    Candidate {
        stream: StreamId(stream),
        importance,
        voice,
        identity: Some(format!("speaker-{stream}")),
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Clone, Default)]
struct Local {
    participants: usize,
    candidates: Vec<Candidate>,
}

struct Sim {
    ids: Vec<String>,
    plan: MeshPlan,
    config: ProtocolConfig,
    nodes: Vec<Option<MeshNodeState>>,
    incarnation: u64,
    now: Duration,
    queue: BTreeMap<(Duration, u64), (usize, usize, Vec<u8>)>,
    seq: u64,
    delay: Duration,
    loss: f64,
    cut: BTreeSet<(usize, usize)>,
    rng: Rng,
    local: Vec<BTreeMap<String, Local>>,
    /// Highest epoch each running server has accepted (reset on restart).
    epochs: Vec<u64>,
    control_bytes: u64,
    /// Ground truth, per simulated ms with a listed primary: all participating servers mix the
    /// list in force on the primary (the switch ticks taken into account).
    truth_ticks: u64,
    truth_consistent: u64,
}

impl Sim {
    fn new(n: usize, delay_ms: u64, seed: u64) -> Self {
        let ids: Vec<String> = (0..n).map(|i| format!("town-r-{i}")).collect();
        Self {
            plan: plan(&ids),
            config: ProtocolConfig::default(),
            nodes: (0..n).map(|_| None).collect(),
            incarnation: 0,
            now: Duration::ZERO,
            queue: BTreeMap::new(),
            seq: 0,
            delay: Duration::from_millis(delay_ms),
            loss: 0.0,
            cut: BTreeSet::new(),
            rng: Rng(seed | 1),
            local: vec![BTreeMap::new(); n],
            epochs: vec![0; n],
            control_bytes: 0,
            truth_ticks: 0,
            truth_consistent: 0,
            ids,
        }
    }

    fn idx(&self, id: &str) -> usize {
        self.ids.iter().position(|x| x == id).unwrap()
    }

    fn node(&self, i: usize) -> &MeshNodeState {
        self.nodes[i].as_ref().unwrap()
    }

    fn start(&mut self, i: usize) {
        self.incarnation += 1;
        let mut s = MeshNodeState::new(
            self.ids[i].clone(),
            &self.plan,
            self.config.clone(),
            self.incarnation,
        );
        for (room, l) in &self.local[i] {
            s.on_local_participants(room, l.participants).unwrap();
            s.on_local_candidates(room, l.candidates.clone(), self.now)
                .unwrap();
        }
        self.nodes[i] = Some(s);
        self.epochs[i] = 0;
    }

    fn start_all(&mut self) {
        for i in 0..self.ids.len() {
            self.start(i);
        }
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    fn set_local(&mut self, i: usize, participants: usize, candidates: Vec<Candidate>) {
        let l = Local {
            participants,
            candidates,
        };
        if let Some(s) = &mut self.nodes[i] {
            s.on_local_participants(ROOM, l.participants).unwrap();
            s.on_local_candidates(ROOM, l.candidates.clone(), self.now)
                .unwrap();
        }
        self.local[i].insert(ROOM.into(), l);
    }

    fn isolate(&mut self, i: usize, on: bool) {
        for j in 0..self.ids.len() {
            if j != i {
                for pair in [(i, j), (j, i)] {
                    if on {
                        self.cut.insert(pair);
                    } else {
                        self.cut.remove(&pair);
                    }
                }
            }
        }
    }

    fn step(&mut self) {
        self.now += MS;
        let due: Vec<(Duration, u64)> = self
            .queue
            .range(..=(self.now, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let (from, to, bytes) = self.queue.remove(&k).unwrap();
            let msg = ControlMessage::decode(&bytes).expect("a valid encoding decodes");
            let from_id = self.ids[from].clone();
            if let Some(node) = &mut self.nodes[to]
                && let Err(e) = node.on_message(&from_id, msg, self.now)
            {
                // Only messages in flight across a plan change may be refused.
                assert_eq!(e.category(), "unknown_peer", "{e}");
            }
        }
        for i in 0..self.ids.len() {
            let Some(node) = &mut self.nodes[i] else {
                continue;
            };
            let out = node.poll(self.now);
            if let Some(sel) = node.selection(ROOM) {
                assert!(
                    sel.epoch >= self.epochs[i],
                    "server {i} went from epoch {} back to {} at {:?}",
                    self.epochs[i],
                    sel.epoch,
                    self.now
                );
                self.epochs[i] = sel.epoch;
            }
            for o in out {
                let to = self.ids.iter().position(|x| *x == o.to).unwrap();
                let bytes = o.msg.encode().expect("the core only makes valid messages");
                self.control_bytes += bytes.len() as u64;
                assert_eq!(ControlMessage::decode(&bytes).unwrap(), o.msg);
                if self.cut.contains(&(i, to)) || self.rng.chance(self.loss) {
                    continue;
                }
                self.seq += 1;
                self.queue
                    .insert((self.now + self.delay, self.seq), (i, to, bytes));
            }
        }
        self.record_truth();
    }

    fn participating(&self) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|&i| {
                self.nodes[i].is_some()
                    && self.local[i].get(ROOM).is_some_and(|l| l.participants > 0)
            })
            .collect()
    }

    fn record_truth(&mut self) {
        let alive: Vec<usize> = (0..self.ids.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect();
        let Some(&first) = alive.first() else { return };
        let Some(p) = self.node(first).primary(ROOM) else {
            return;
        };
        let Some(pi) = self.nodes.get(self.idx(&p)).and_then(|n| n.as_ref()) else {
            return;
        };
        // What is mixed now: a list in force (past its switch tick), not merely received.
        let Some(truth) = pi.mixing(ROOM, self.now).cloned() else {
            return;
        };
        self.truth_ticks += 1;
        if self
            .participating()
            .iter()
            .all(|&i| self.node(i).mixing(ROOM, self.now) == Some(&truth))
        {
            self.truth_consistent += 1;
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Steps until `pred` holds; the time it took, or `None` after `limit`.
    fn run_until(&mut self, limit: Duration, pred: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        while self.now - start <= limit {
            if pred(self) {
                return Some(self.now - start);
            }
            self.step();
        }
        None
    }

    /// Every live server names the same primary, and every participating server mixes that
    /// primary's list at the same epoch.
    fn agreed(&self) -> Option<GlobalList> {
        let alive: Vec<usize> = (0..self.ids.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect();
        let primary = self.node(*alive.first()?).primary(ROOM)?;
        if alive
            .iter()
            .any(|&i| self.node(i).primary(ROOM).as_deref() != Some(primary.as_str()))
        {
            return None;
        }
        let parts = self.participating();
        let first = self.node(*parts.first()?).selection(ROOM)?.clone();
        if first.primary != primary {
            return None;
        }
        parts
            .iter()
            .all(|&i| self.node(i).selection(ROOM) == Some(&first))
            .then_some(first)
    }

    fn agreed_on(&self, list: &[StreamKey]) -> bool {
        self.agreed().is_some_and(|g| g.list == list)
    }

    fn counters_sum(&self) -> (u64, u64) {
        self.nodes
            .iter()
            .flatten()
            .map(|n| (n.counters().ticks, n.counters().consistent_ticks))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

fn key(sim: &Sim, i: usize, stream: impl Into<StreamId>) -> StreamKey {
    StreamKey::new(sim.ids[i].clone(), stream)
}

fn sorted(mut v: Vec<StreamKey>) -> Vec<StreamKey> {
    v.sort();
    v
}

/// Three servers with different local candidates:
/// 0: s1 -20, s2 -40; 1: s10 -15, s11 -50; 2: s20 -30, s21 -35, s22 loud but silent.
fn three_servers(delay_ms: u64, seed: u64) -> Sim {
    let mut sim = Sim::new(3, delay_ms, seed);
    sim.set_local(0, 5, vec![cand(1, -20.0, true), cand(2, -40.0, true)]);
    sim.set_local(1, 5, vec![cand(10, -15.0, true), cand(11, -50.0, true)]);
    sim.set_local(
        2,
        5,
        vec![
            cand(20, -30.0, true),
            cand(21, -35.0, true),
            cand(22, -5.0, false),
        ],
    );
    // Staggered starts, so heartbeat phases differ between servers (and between seeds).
    for i in 0..3 {
        sim.start(i);
        sim.run(Duration::from_millis(seed.wrapping_mul(7 + i as u64) % 50));
    }
    sim
}

fn expected_full(sim: &Sim) -> Vec<StreamKey> {
    sorted(vec![key(sim, 1, 10), key(sim, 0, 1), key(sim, 2, 20)])
}

#[test]
fn mesh_three_servers_converge_on_one_list_and_one_primary() {
    let mut sim = three_servers(10, 7);
    let want = expected_full(&sim);
    let took = sim
        .run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("servers converge");
    eprintln!("converged in {took:?}");
    assert!(took <= Duration::from_millis(300), "took {took:?}");
    let g = sim.agreed().unwrap();
    assert_eq!(
        g.margin,
        vec![key(&sim, 2, 21)],
        "margin is the next stream"
    );
    // Every server learns who speaks on each listed stream, wherever the speaker is.
    let names: Vec<String> = g
        .list
        .iter()
        .map(|k| format!("speaker-{}", k.stream.0))
        .collect();
    for i in 0..3 {
        let list = sim.node(i).selection(ROOM).expect("a list");
        assert_eq!(list.names, names, "server {i}");
    }
    // The primary is the rendezvous winner, the same everywhere.
    let order = rendezvous_order(ROOM, &sim.ids);
    assert_eq!(g.primary, order[0]);
    for i in 0..3 {
        assert_eq!(sim.node(i).primary(ROOM).unwrap(), order[0]);
    }
    // It stays converged: refreshes do not change the epoch.
    let epoch = g.epoch;
    sim.run(Duration::from_secs(3));
    let g2 = sim.agreed().expect("still agreed");
    assert_eq!(g2.epoch, epoch, "no change, no new epoch");
    // Every tick counted by the primary after convergence is consistent.
    let (t0, c0) = sim.counters_sum();
    sim.run(Duration::from_secs(1));
    let (t1, c1) = sim.counters_sum();
    assert_eq!(t1 - t0, 50, "one tick per 20 ms frame");
    assert_eq!(c1 - c0, t1 - t0);
}

#[test]
fn mesh_primary_failover_and_rejoin_without_stale_list() {
    for seed in [11, 12, 13, 14, 15] {
        mesh_primary_failover_and_rejoin_without_stale_list_with(seed);
    }
}

fn mesh_primary_failover_and_rejoin_without_stale_list_with(seed: u64) {
    let mut sim = three_servers(5 + (seed % 4) * 5, seed);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("converge");
    let old = sim.agreed().unwrap();
    let p = sim.idx(&old.primary);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != p).collect();

    // Kill the primary: the next in rendezvous order takes over within the heartbeat timeout
    // plus one rank interval, and its list no longer holds the dead server's streams.
    sim.kill(p);
    let order = rendezvous_order(ROOM, &sim.ids);
    let next = order.iter().find(|id| **id != old.primary).unwrap().clone();
    let mut eligible: Vec<(StreamKey, f32)> = Vec::new();
    for &i in &survivors {
        for c in &sim.local[i][ROOM].candidates {
            if c.voice {
                eligible.push((key(&sim, i, c.stream), c.importance));
            }
        }
    }
    eligible.sort_by(|a, b| b.1.total_cmp(&a.1));
    let want_after: Vec<StreamKey> =
        sorted(eligible.iter().take(3).map(|(k, _)| k.clone()).collect());
    let bound = sim.config.heartbeat_timeout() + Duration::from_millis(100);
    let took = sim
        .run_until(Duration::from_secs(3), |s| {
            s.agreed()
                .is_some_and(|g| g.primary == next && g.list == want_after)
        })
        .expect("failover");
    eprintln!("failover in {took:?} (bound {bound:?})");
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    let after = sim.agreed().unwrap();
    assert!(
        after.epoch > old.epoch,
        "a new primary starts above the old epoch"
    );

    // Lists keep flowing: a new loud speaker on a survivor reaches everyone.
    let s = survivors[0];
    let mut cands = sim.local[s][ROOM].candidates.clone();
    cands.push(cand(99, -1.0, true));
    sim.set_local(s, 5, cands);
    let took = sim
        .run_until(Duration::from_secs(2), |x| {
            x.agreed().is_some_and(|g| g.list.contains(&key(x, s, 99)))
        })
        .expect("new speaker propagates after failover");
    assert!(took <= Duration::from_millis(150), "took {took:?}");
    let held = sim.agreed().unwrap().epoch;
    let with_99 = sim.agreed().unwrap().list;

    // Restart the old primary with fresh state: it is the rendezvous winner again. Its first
    // lists (low epochs, or made before it heard anyone) must not win; it takes over with an
    // epoch above what the others hold and a list made from everyone's reports.
    sim.start(p);
    let mut full: Vec<(StreamKey, f32)> = Vec::new();
    for i in 0..3 {
        for c in &sim.local[i][ROOM].candidates {
            if c.voice {
                full.push((key(&sim, i, c.stream), c.importance));
            }
        }
    }
    full.sort_by(|a, b| b.1.total_cmp(&a.1));
    let want_full: Vec<StreamKey> = sorted(full.iter().take(3).map(|(k, _)| k.clone()).collect());
    let old_primary = old.primary.clone();
    let start = sim.now;
    loop {
        sim.step();
        for &i in &survivors {
            let sel = sim.node(i).selection(ROOM).unwrap();
            if sel.primary == old_primary {
                assert!(sel.epoch > held, "stale epoch {} won", sel.epoch);
                assert_eq!(sel.list, want_full, "a partial list won");
            } else {
                assert_eq!(sel.list, with_99);
            }
        }
        if sim.agreed().is_some_and(|g| g.primary == old_primary) {
            break;
        }
        assert!(sim.now - start < Duration::from_secs(2), "rejoin too slow");
    }
}

#[test]
fn mesh_partitioned_primary_heals_without_its_stale_list_winning() {
    for seed in [5, 6, 7, 8] {
        mesh_partitioned_primary_heals_without_its_stale_list_winning_with(seed);
    }
}

fn mesh_partitioned_primary_heals_without_its_stale_list_winning_with(seed: u64) {
    let mut sim = three_servers(5 + (seed % 4) * 5, seed);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("converge");
    let p = sim.idx(&sim.agreed().unwrap().primary);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != p).collect();

    // Cut the primary off. It keeps running alone (its own list shrinks to its own streams);
    // the others fail over.
    sim.isolate(p, true);
    sim.run(Duration::from_secs(2));
    let isolated = sim.node(p).selection(ROOM).unwrap().clone();
    assert!(isolated.list.iter().all(|k| k.server == sim.ids[p]));
    let survivor_list = sim.node(survivors[0]).selection(ROOM).unwrap().clone();
    assert_ne!(survivor_list.primary, sim.ids[p]);

    // Heal. Until the old primary's fresh list arrives, survivors keep the failover list; the
    // isolated list never wins anywhere.
    sim.isolate(p, false);
    let start = sim.now;
    loop {
        sim.step();
        for &i in &survivors {
            let sel = sim.node(i).selection(ROOM).unwrap();
            assert_ne!(sel.list, isolated.list, "the isolated list won on {i}");
        }
        if sim.agreed_on(&want) {
            break;
        }
        assert!(sim.now - start < Duration::from_secs(2), "heal too slow");
    }
    assert_eq!(sim.agreed().unwrap().primary, sim.ids[p]);
}

#[test]
fn mesh_lossy_links_converge_and_the_consistency_counter_sees_disagreement() {
    for seed in [3, 4, 5, 6, 7, 8] {
        mesh_lossy_links_converge_and_the_consistency_counter_sees_disagreement_with(seed);
    }
}

fn mesh_lossy_links_converge_and_the_consistency_counter_sees_disagreement_with(seed: u64) {
    let mut sim = three_servers(15, seed);
    sim.loss = 0.20;
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(3), |s| s.agreed_on(&want))
        .expect("converges despite 20% loss");

    // Changing speakers under loss: lists change often, some servers lag.
    let (t0, c0) = sim.counters_sum();
    let (tt0, tc0) = (sim.truth_ticks, sim.truth_consistent);
    for round in 0..10u64 {
        let i = (round % 3) as usize;
        let mut cands = sim.local[i][ROOM].candidates.clone();
        cands.retain(|c| c.stream < StreamId(100));
        cands.push(cand(100 + round, -2.0, true));
        sim.set_local(i, 5, cands);
        sim.run(Duration::from_millis(400));
    }
    let (t1, c1) = sim.counters_sum();
    let (tt1, tc1) = (sim.truth_ticks, sim.truth_consistent);
    let counted = (c1 - c0) as f64 / (t1 - t0) as f64;
    let truth = (tc1 - tc0) as f64 / (tt1 - tt0) as f64;
    eprintln!("under loss: counted consistency {counted:.3}, ground truth {truth:.3}");
    assert!(t1 > t0);
    assert!(
        c1 - c0 < t1 - t0,
        "disagreement while lists change under loss must show in the counter"
    );
    assert!(
        counted <= truth + 0.05,
        "the counter is an upper bound on disagreement: counted {counted:.3}, truth {truth:.3}"
    );
    assert!(counted > 0.4, "consistent most of the time: {counted:.3}");

    // Stable speakers, still lossy: converge again.
    sim.run_until(Duration::from_secs(3), |s| s.agreed().is_some())
        .expect("reconverges under loss");

    // Loss gone: every counted tick is consistent.
    sim.loss = 0.0;
    sim.run(Duration::from_secs(1));
    let (t2, c2) = sim.counters_sum();
    sim.run(Duration::from_secs(1));
    let (t3, c3) = sim.counters_sum();
    assert_eq!(c3 - c2, t3 - t2);
}

#[test]
fn mesh_cut_link_degrades_without_panic_and_recovers() {
    for seed in [9, 10, 11] {
        mesh_cut_link_degrades_without_panic_and_recovers_with(seed);
    }
}

fn mesh_cut_link_degrades_without_panic_and_recovers_with(seed: u64) {
    let mut sim = three_servers(10, seed);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("converge");
    sim.cut.insert((0, 1));
    sim.cut.insert((1, 0));
    for _ in 0..3000 {
        sim.step();
        for i in 0..3 {
            assert!(
                sim.node(i).selection(ROOM).is_some(),
                "server {i} lost its list"
            );
        }
    }
    sim.cut.clear();
    let took = sim
        .run_until(Duration::from_secs(3), |s| s.agreed_on(&want))
        .expect("recovers after the cut heals");
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
}

#[test]
fn mesh_silent_server_forwards_nothing() {
    let mut sim = Sim::new(3, 10, 1);
    sim.set_local(0, 3, vec![cand(1, -20.0, true), cand(2, -25.0, true)]);
    sim.set_local(1, 3, vec![cand(10, -15.0, true)]);
    // Server 2 has listeners only: everyone silent.
    sim.set_local(2, 40, vec![cand(20, -80.0, false), cand(21, -90.0, false)]);
    sim.start_all();
    let want = sorted(vec![key(&sim, 0, 1), key(&sim, 0, 2), key(&sim, 1, 10)]);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("converge");
    sim.run(Duration::from_millis(500));
    let silent = sim.node(2);
    assert!(silent.forwarding(ROOM).is_empty());
    assert!(silent.forward_targets(ROOM, StreamId(20)).is_empty());
    assert_eq!(silent.forwarded_stream_count(), 0);
    // The others forward their listed streams to both other servers, the silent one included.
    let mut targets = sim.node(0).forward_targets(ROOM, StreamId(1));
    targets.sort();
    assert_eq!(targets, vec![sim.ids[1].clone(), sim.ids[2].clone()]);
    assert_eq!(
        sim.node(1).forward_targets(ROOM, StreamId(10)),
        vec![sim.ids[0].clone(), sim.ids[2].clone()]
    );
}

fn bandwidth_run(participants: usize) -> (usize, u64) {
    let mut sim = Sim::new(3, 10, 21);
    for i in 0..3 {
        let cands: Vec<Candidate> = (0..participants as u64)
            .map(|s| cand(s, -10.0 - (s as f32) * 0.5 - i as f32 * 0.1, true))
            .collect();
        sim.set_local(i, participants, cands);
    }
    sim.start_all();
    sim.run_until(Duration::from_secs(2), |s| s.agreed().is_some())
        .expect("converge");
    sim.run(Duration::from_secs(1));
    let forwarded: usize = (0..3).map(|i| sim.node(i).forwarded_stream_count()).sum();
    let before = sim.control_bytes;
    sim.run(Duration::from_secs(2));
    (forwarded, sim.control_bytes - before)
}

#[test]
fn mesh_bandwidth_is_flat_in_participants() {
    let (f10, b10) = bandwidth_run(10);
    let (f100, b100) = bandwidth_run(100);
    let bound = (3 + 1) * (3 - 1);
    assert!(f10 <= bound && f100 <= bound, "{f10} / {f100} > {bound}");
    assert_eq!(f10, f100, "forwarded streams do not grow with participants");
    assert!(f10 > 0);
    let ratio = b100 as f64 / b10 as f64;
    eprintln!("forwarded {f10} vs {f100}; control bytes/2 s {b10} vs {b100}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "control bytes 10 vs 100 participants: {b10} vs {b100}"
    );
}

#[test]
fn mesh_refuses_strangers_and_bad_messages() {
    let sim = three_servers(10, 1);
    let mut s = MeshNodeState::new(sim.ids[0].clone(), &sim.plan, ProtocolConfig::default(), 1);
    let hb = ControlMessage::Heartbeat {
        sent_at_us: 0,
        incarnation: 1,
        generation: 1,
    };
    let e = s.on_message("intruder", hb, MS).unwrap_err();
    assert_eq!(e.category(), "unknown_peer");
    let forged = ControlMessage::GlobalTopList {
        room: ROOM.into(),
        epoch: 1_000,
        primary: sim.ids[2].clone(),
        list: vec![],
        margin: vec![],
        names: vec![],
        at_us: 0,
    };
    let e = s.on_message(&sim.ids[1], forged, MS).unwrap_err();
    assert_eq!(e.category(), "invalid");
    let bad_room = ControlMessage::LocalTopList {
        room: "no spaces".into(),
        seq: 1,
        epoch: 0,
        candidates: vec![],
        late_us: 0,
    };
    assert_eq!(
        s.on_message(&sim.ids[1], bad_room, MS)
            .unwrap_err()
            .category(),
        "invalid"
    );
    assert_eq!(s.counters().messages_rejected, 3);
    assert_eq!(
        s.on_local_participants("", 1).unwrap_err().category(),
        "invalid"
    );
}

#[test]
fn mesh_room_limit_is_enforced() {
    let ids = vec!["a".to_string(), "b".to_string()];
    let config = ProtocolConfig {
        max_rooms: 2,
        ..ProtocolConfig::default()
    };
    let mut s = MeshNodeState::new("a", &plan(&ids), config, 1);
    s.on_local_participants("r1", 1).unwrap();
    s.on_local_participants("r2", 1).unwrap();
    assert_eq!(
        s.on_local_participants("r3", 1).unwrap_err().category(),
        "too_many_rooms"
    );
    let e = s
        .on_message(
            "b",
            ControlMessage::RoomMembership {
                rooms: vec!["r4".into()],
            },
            MS,
        )
        .unwrap_err();
    assert_eq!(e.category(), "too_many_rooms");
}

#[test]
fn mesh_plan_changes_apply_live() {
    let mut sim = Sim::new(4, 10, 2);
    let three: Vec<String> = sim.ids[..3].to_vec();
    sim.plan = plan(&three);
    for i in 0..4 {
        sim.set_local(i, 2, vec![cand(1, -20.0 - i as f32, true)]);
    }
    for i in 0..3 {
        sim.start(i);
    }
    let want3 = sorted((0..3).map(|i| key(&sim, i, 1)).collect());
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want3))
        .expect("three converge");

    // Generation 2 adds a fourth server, louder than one of the others.
    let mut p2 = plan(&sim.ids);
    p2.generation = 2;
    sim.plan = p2.clone();
    sim.set_local(3, 2, vec![cand(1, -5.0, true)]);
    for i in 0..3 {
        sim.nodes[i].as_mut().unwrap().on_plan(&p2);
    }
    sim.start(3);
    let want4 = sorted(vec![key(&sim, 0, 1), key(&sim, 1, 1), key(&sim, 3, 1)]);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want4))
        .expect("the new server joins the mesh live");
    for i in 0..4 {
        assert_eq!(sim.node(i).plan_generation(), 2);
        assert_eq!(sim.node(i).peer_generation(&sim.ids[(i + 1) % 4]), Some(2));
    }

    // Generation 3 removes server 3: it stops taking part, the rest carry on.
    let mut p3 = plan(&three);
    p3.generation = 3;
    sim.plan = p3.clone();
    for i in 0..4 {
        sim.nodes[i].as_mut().unwrap().on_plan(&p3);
    }
    assert!(
        sim.node(3).selection(ROOM).is_none(),
        "a removed server mixes locally"
    );
    assert!(sim.node(3).forward_targets(ROOM, StreamId(1)).is_empty());
    sim.kill(3);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want3))
        .expect("the others reconverge without it");
}

#[test]
fn mesh_fast_restart_is_noticed_by_incarnation() {
    let mut sim = three_servers(10, 4);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("converge");
    let p = sim.idx(&sim.agreed().unwrap().primary);
    let other = (p + 1) % 3;
    // Restart well within the heartbeat timeout, with a new loudest stream.
    sim.kill(other);
    sim.run(Duration::from_millis(50));
    sim.set_local(other, 5, vec![cand(77, -3.0, true)]);
    sim.start(other);
    let took = sim
        .run_until(Duration::from_secs(2), |s| {
            s.agreed().is_some_and(|g| {
                g.list.contains(&key(s, other, 77))
                    && !g
                        .list
                        .iter()
                        .chain(&g.margin)
                        .any(|k| k.server == s.ids[other] && k.stream != StreamId(77))
            })
        })
        .expect("the restarted server's new list replaces its old one");
    assert!(took <= Duration::from_millis(300), "took {took:?}");
}

#[test]
fn mesh_new_speaker_reaches_every_server_without_waiting_for_the_rank_interval() {
    for (seed, phase_ms) in [(21, 7), (22, 37), (23, 71), (24, 93)] {
        let mut sim = three_servers(10, seed);
        let want = expected_full(&sim);
        sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
            .expect("servers converge");
        // Anywhere in the 100 ms rank interval.
        sim.run(Duration::from_millis(phase_ms));
        let primary = sim.idx(&sim.agreed().expect("agreed").primary);
        let other = (primary + 1) % 3;
        let mut candidates = sim.local[other][ROOM].candidates.clone();
        candidates.insert(0, cand(99, -3.0, true));
        sim.set_local(other, 5, candidates);
        let mut want = expected_full(&sim);
        // The loudest newcomer replaces the weakest of the three (stream 20 at -30 dBov).
        want.retain(|k| *k != key(&sim, 2, 20));
        want.push(key(&sim, other, 99));
        let want = sorted(want);
        let took = sim
            .run_until(Duration::from_secs(1), |s| s.agreed_on(&want))
            .expect("the newcomer is agreed on");
        // One hop to the primary and one back (10 ms each), not a wait for the next interval.
        assert!(
            took <= Duration::from_millis(40),
            "seed {seed}, phase {phase_ms} ms: took {took:?}"
        );
    }
}

/// Three talkers on three servers hold the three slots. One keeps pausing between sentences (its
/// server still reports the stream, no longer voice-active): the list and its epoch never change,
/// and every tick stays consistent. A new voice takes the resting slot at once, without needing
/// the hysteresis margin; when the resting talker leaves, its slot is freed.
#[test]
fn mesh_a_pausing_talker_keeps_its_slot_until_a_voice_needs_it() {
    let mut sim = Sim::new(3, 10, 5);
    for i in 0..3 {
        sim.set_local(i, 2, vec![cand(1 + i as u64, -20.0, true)]);
    }
    sim.start_all();
    let want = sorted((0..3).map(|i| key(&sim, i, 1 + i as u64)).collect());
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("servers converge");
    sim.run(Duration::from_millis(500));
    let epoch = sim.agreed().expect("agreed").epoch;
    let (t0, c0) = sim.counters_sum();
    for round in 0..10 {
        sim.set_local(1, 2, vec![cand(2, -127.0, false)]);
        for _ in 0..15 {
            sim.run(Duration::from_millis(20));
            let g = sim.agreed().expect("still agreed");
            assert_eq!(
                g.list, want,
                "round {round}: the pausing talker keeps its slot"
            );
            assert_eq!(g.epoch, epoch, "round {round}: a pause is no change");
        }
        sim.set_local(1, 2, vec![cand(2, -22.0, true)]);
        sim.run(Duration::from_millis(200));
        assert!(sim.agreed_on(&want), "round {round}: talking again");
    }
    let (t1, c1) = sim.counters_sum();
    assert_eq!(t1 - t0, 250, "5 s of 20 ms ticks");
    assert_eq!(c1 - c0, t1 - t0, "every tick consistent");

    // Server 1's talker rests; a quiet new voice on server 0 takes that slot straight away.
    sim.set_local(1, 2, vec![cand(2, -127.0, false)]);
    sim.run(Duration::from_millis(300));
    sim.set_local(0, 2, vec![cand(1, -20.0, true), cand(5, -45.0, true)]);
    let took = sim
        .run_until(Duration::from_secs(1), |s| {
            s.agreed_on(&sorted(vec![key(s, 0, 1), key(s, 0, 5), key(s, 2, 3)]))
        })
        .expect("the new voice takes the resting slot");
    assert!(took <= Duration::from_millis(60), "took {took:?}");

    // The new voice goes quiet and leaves; the old talker, resting, is not on the list any more
    // (it lost its slot), so the freed slot stays empty until someone speaks.
    sim.set_local(0, 2, vec![cand(1, -20.0, true)]);
    let took = sim
        .run_until(Duration::from_secs(1), |s| {
            s.agreed_on(&sorted(vec![key(s, 0, 1), key(s, 2, 3)]))
        })
        .expect("the departed voice's slot is freed");
    assert!(took <= Duration::from_millis(60), "took {took:?}");
}

/// Whether every participating server mixes the same list (epoch and streams) at the sim's now.
fn mixing_agrees(sim: &Sim) -> bool {
    let lists: Vec<Option<(u64, Vec<StreamKey>)>> = sim
        .participating()
        .iter()
        .map(|&i| {
            sim.node(i)
                .mixing(ROOM, sim.now)
                .map(|g| (g.epoch, g.list.clone()))
        })
        .collect();
    lists.windows(2).all(|w| w[0] == w[1])
}

fn lists_late(sim: &Sim) -> u64 {
    sim.nodes
        .iter()
        .flatten()
        .map(|n| n.counters().lists_late)
        .sum()
}

/// What one list change looked like: lists that arrived late, ms in which the servers mixed
/// different lists, the primary's ticks and consistent ticks, every server's switch tick.
struct Change {
    late: u64,
    disagreed_ms: u64,
    ticks: u64,
    consistent: u64,
    switch_at: Vec<Option<Duration>>,
}

/// A loud newcomer on a member server comes (even rounds) or goes (odd rounds): a new list.
/// Runs 400 ms after it.
fn change(sim: &mut Sim, member: usize, base: &[Candidate], round: usize) -> Change {
    let mut candidates = base.to_vec();
    if round.is_multiple_of(2) {
        candidates.insert(0, cand(99, -3.0, true));
    }
    let (late0, (t0, c0)) = (lists_late(sim), sim.counters_sum());
    sim.set_local(member, 5, candidates);
    let mut disagreed_ms = 0;
    for _ in 0..400 {
        sim.step();
        if !mixing_agrees(sim) {
            disagreed_ms += 1;
        }
    }
    let (t1, c1) = sim.counters_sum();
    Change {
        late: lists_late(sim) - late0,
        disagreed_ms,
        ticks: t1 - t0,
        consistent: c1 - c0,
        switch_at: (0..3).map(|i| sim.node(i).switch_at(ROOM)).collect(),
    }
}

/// DESIGN.md §5: a new list takes effect at the tick the primary stamps on it, a measured
/// one-way delay ahead, on every server at once; a server the list reaches late switches on
/// arrival, says so, and the primary counts the ticks it mixed the old list.
#[test]
fn mesh_a_new_list_switches_at_the_agreed_tick_on_every_server() {
    let mut sim = three_servers(15, 5);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("servers converge");
    let primary = sim.idx(&sim.agreed().expect("agreed").primary);
    let member = (primary + 1) % 3;
    let base = sim.local[member][ROOM].candidates.clone();

    let mut report = Vec::new();
    for round in 0..6 {
        let c = change(&mut sim, member, &base, round);
        report.push(format!(
            "round {round}: {} late, {} ms disagreeing, {}/{} ticks consistent",
            c.late, c.disagreed_ms, c.consistent, c.ticks
        ));
        // The lead is half the round trip measured while converging, plus the guard.
        assert_eq!(c.late, 0, "{report:?}");
        assert_eq!(c.disagreed_ms, 0, "{report:?}");
        assert!(c.ticks >= 19, "{report:?}");
        assert_eq!(c.consistent, c.ticks, "{report:?}");
        assert!(
            c.switch_at.windows(2).all(|w| w[0] == w[1]),
            "one switch tick everywhere: {:?}",
            c.switch_at
        );
    }

    // The links slow to 60 ms: the next list arrives 45 ms after its tick (the lead still
    // expects 15 ms). The members say so, and the primary's count sees the disagreement.
    sim.delay = Duration::from_millis(60);
    sim.run(Duration::from_millis(500)); // the slowdown reaches every queue
    let c = change(&mut sim, member, &base, 6);
    report.push(format!(
        "slow links: {} late, {} ms disagreeing, {}/{} ticks consistent",
        c.late, c.disagreed_ms, c.consistent, c.ticks
    ));
    assert_eq!(c.late, 2, "{report:?}");
    assert!((40..=50).contains(&c.disagreed_ms), "{report:?}");
    let missed = c.ticks - c.consistent;
    assert!((2..=3).contains(&missed), "{report:?}");
    // Measured again, the lead covers 60 ms, and the next change is on time.
    let c = change(&mut sim, member, &base, 7);
    report.push(format!(
        "slow links, measured: {} late, {} ms disagreeing, {}/{} ticks consistent",
        c.late, c.disagreed_ms, c.consistent, c.ticks
    ));
    eprintln!("{}", report.join("\n"));
    assert_eq!((c.late, c.disagreed_ms), (0, 0), "{report:?}");
    assert_eq!(c.consistent, c.ticks, "{report:?}");
}

/// A stream the new list drops is still forwarded until the new list's switch tick: the servers
/// mix the old list until then, and must not lose its last frames.
#[test]
fn mesh_a_dropped_speaker_is_forwarded_until_the_switch_tick() {
    let mut sim = three_servers(15, 9);
    let want = expected_full(&sim);
    sim.run_until(Duration::from_secs(2), |s| s.agreed_on(&want))
        .expect("servers converge");
    let epoch = sim.agreed().expect("agreed").epoch;
    // The loudest newcomer on server 0 takes the weakest slot, stream 20 of server 2, which
    // becomes the margin; stream 21, the old margin, is on neither.
    let mut candidates = sim.local[0][ROOM].candidates.clone();
    candidates.insert(0, cand(99, -3.0, true));
    sim.set_local(0, 5, candidates);
    sim.run_until(Duration::from_secs(1), |s| {
        s.node(2).selection(ROOM).is_some_and(|g| g.epoch > epoch)
    })
    .expect("server 2 gets the new list");
    let switch_at = sim.node(2).switch_at(ROOM).expect("a switch tick");
    assert!(sim.now < switch_at, "accepted ahead of its tick");
    assert!(
        !sim.node(2)
            .selection(ROOM)
            .expect("a list")
            .margin
            .contains(&key(&sim, 2, 21)),
        "the new list drops stream 21"
    );
    assert!(
        !sim.node(2)
            .selection(ROOM)
            .expect("a list")
            .list
            .contains(&key(&sim, 2, 21)),
        "the new list drops stream 21"
    );
    while sim.now < switch_at {
        assert!(
            !sim.node(2).forward_targets(ROOM, StreamId(21)).is_empty(),
            "stream 21 still forwarded at {:?} (switch at {switch_at:?})",
            sim.now
        );
        sim.step();
    }
    sim.run(Duration::from_millis(2));
    assert!(sim.node(2).forward_targets(ROOM, StreamId(21)).is_empty());
}
