//! A one-iteration, small-load run of the whole benchmark harness (what `make bench` runs, with
//! `Plan::smoke`), so it cannot rot: every scenario runs against the real servers (Chorus and
//! Janus), the results file and the report are written. It checks that each scenario measured
//! something plausible, never how fast.

use anyhow::Result;
use chorus_tests::bench::{harness, report};
use chorus_tests::{heavy_test_guard, scratch_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_harness_runs_once_and_writes_its_files() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let plan = harness::Plan::smoke();
    let run = harness::run_once(&plan).await?;
    eprintln!("{}", serde_json::to_string(&run)?);

    // Every system's delay was measured: a positive, finite number of milliseconds.
    for system in ["chorus", "janus_default", "janus_tuned"] {
        let d = &run.delay[system];
        assert!(d.server_added.n >= 1, "{system}: no onset measured: {d:?}");
        assert!(
            d.server_added.p50.is_finite() && d.server_added.p50 > 0.0,
            "{system}: {d:?}"
        );
    }
    // Both capacities measured at least one step, with real traffic (some CPU on the server).
    for system in ["chorus", "janus"] {
        let c = &run.capacity[system];
        assert!(!c.steps.is_empty(), "{system}: no capacity step: {c:?}");
        assert!(c.steps[0].server_cpu > 0.0, "{system}: {c:?}");
    }
    // The two-worker scaling ramps ran (the machine has 2 CPUs), and no sampled payload of
    // either was bad. That lanes carry the frames is `tests/swarm.rs`'s to show.
    for system in ["chorus_scaling_1_worker", "chorus_scaling_2_workers"] {
        let c = run
            .listener_capacity
            .get(system)
            .unwrap_or_else(|| panic!("{system} missing: {:?}", run.listener_capacity.keys()));
        assert!(
            !c.steps.is_empty() && c.steps.iter().all(|s| s.samples_bad == 0),
            "{system}: {c:?}"
        );
    }
    // On the swarm's own network, both egress taps followed the fan-out: pairs of the same
    // frame leaving for the first and the last listener, within a frame of each other, at the
    // server's hand-off and after the interface's queue.
    let chorus = &run.listener_capacity["chorus"];
    if chorus.network.as_deref() == Some("veth") {
        let paired = |e: Option<chorus_tests::egress_tap::EgressSpread>| {
            e.is_some_and(|e| e.pairs >= 20 && e.p50_ms.abs() < 20.0)
        };
        assert!(
            chorus.steps.iter().any(|s| paired(s.egress_spread)),
            "{chorus:?}"
        );
        assert!(
            chorus.steps.iter().any(|s| paired(s.hand_off_spread)),
            "{chorus:?}"
        );
    }
    assert!(
        run.machine_speed
            .is_some_and(|s| s.cpu_loop_ns > 0.0 && s.loopback_datagram_us > 0.0),
        "{:?}",
        run.machine_speed
    );
    assert!(
        run.cross_server.cross_server.n >= 1,
        "{:?}",
        run.cross_server
    );
    // The mixer encodes once per local top speaker plus once for everyone else.
    for c in &run.codec_work {
        assert!(
            c.encodes_per_tick >= 1.0 && c.encodes_per_tick <= 4.0,
            "{c:?}"
        );
    }
    assert!(run.mesh_bytes.ratio.is_finite() && run.mesh_bytes.ratio > 0.0);
    assert!(
        run.convergence.heard_everywhere.n + run.convergence.missed >= 1,
        "{:?}",
        run.convergence
    );

    // Phone calls: each placed call heard both ways, and the calls cost the server some CPU.
    let phone = run.telephony.as_ref().expect("the phone-call scenario ran");
    assert!(
        phone.both_ways.n >= 1 && phone.both_ways.p50.is_finite() && phone.both_ways.p50 > 0.0,
        "{phone:?}"
    );
    assert!(phone.cpu.loaded_percent > 0.0, "{:?}", phone.cpu);

    // List stability: consistency is a share of ticks, and every ear received between nothing
    // and all of each newcomer's first 250 ms.
    let lists = run
        .list_stability
        .as_ref()
        .expect("the list-stability scenario ran");
    assert!(
        lists.ticks > 0.0 && (0.0..=1.0).contains(&lists.consistency),
        "{lists:?}"
    );
    assert!(
        !lists.onset_received_ms.is_empty()
            && lists
                .onset_received_ms
                .iter()
                .all(|ms| (0.0..=250.0).contains(ms)),
        "{lists:?}"
    );

    // The files `make bench` writes: the required JSON keys and a report with its tables.
    let runs = [run];
    let json = harness::results_json(&plan, &runs);
    for key in [
        "machine",
        "runs",
        "delay_ms",
        "capacity_listeners_per_core",
        "cross_server_extra_ms",
        "encodes_per_tick",
        "convergence_ms",
        "phone_calls",
        "consistency",
        "list_changes_per_minute_three_talkers",
        "onset_received_ms",
    ] {
        assert!(json.get(key).is_some(), "results lack {key}: {json}");
    }
    assert!(json["delay_ms"]["floor"].as_f64().is_some_and(|f| f > 10.0));
    assert!(
        json["consistency"]
            .as_f64()
            .is_some_and(|c| (0.0..=1.0).contains(&c)),
        "{json}"
    );
    assert!(
        json["list_changes_per_minute_three_talkers"]
            .as_f64()
            .is_some_and(|c| c >= 0.0),
        "{json}"
    );
    for figure in ["p50", "min"] {
        assert!(
            json["onset_received_ms"][figure]
                .as_f64()
                .is_some_and(|ms| (0.0..=250.0).contains(&ms)),
            "onset_received_ms.{figure}: {json}"
        );
    }
    let dir = std::env::temp_dir().join(format!("chorus-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("latest.json");
    harness::write_json(&out, &json)?;
    assert!(std::fs::read_to_string(&out)?.contains("\"delay_ms\""));
    let analysis = scratch_file(&dir, "analysis.md", "## Analysis\n\nhand-written")?;
    let md = report::markdown(&plan, &runs, &std::fs::read_to_string(analysis)?, "today");
    for heading in [
        "## Against the targets",
        "## Server-added delay",
        "## Capacity",
        "## Phone calls",
        "## List stability and new speakers",
        "## Method",
    ] {
        assert!(md.contains(heading), "report lacks {heading}:\n{md}");
    }
    assert!(md.contains("hand-written"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
