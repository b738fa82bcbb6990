//! `chorus-bench`: the benchmark harness behind `make bench`. Runs every scenario `--runs` times
//! and writes `bench/results/latest.json` and `BENCHMARKS.md`. Thin: the measurements live in
//! `chorus_tests::bench`.
//!
//! Run the built binary directly (as `make bench` does), not through `cargo run`: it builds
//! `chorus-mediaserver` itself, and a nested cargo would wait on `cargo run`'s build lock.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chorus_tests::bench::{capacity, harness, list_stability, listeners, report, telephony};
use clap::Parser;

/// Run the Chorus benchmarks against Janus AudioBridge.
#[derive(Debug, Parser)]
#[command(name = "chorus-bench")]
struct Args {
    /// Repetitions of every scenario (the report shows min, median and max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The one-iteration, small-load run `make test` does: checks the harness, measures nothing
    /// worth reading.
    #[arg(long)]
    smoke: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    /// Where to write the Markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    /// Hand-written analysis appended to the report.
    #[arg(long, default_value = "bench/analysis.md")]
    analysis: PathBuf,
    /// Measure nothing: rewrite both files from the runs kept in this results file (its
    /// `per_run`), e.g. after editing the analysis. The runs must come from the full plan.
    #[arg(long)]
    report_from: Option<PathBuf>,
    /// Run one scenario only and write its figures alone (to `--out` and `--markdown`; point
    /// them away from the real report): `telephony`, `transfer`, `list_stability` (the demo
    /// shape's list changes, consistency and newcomers) or `delay` (every delay system, as in
    /// the full run: 24 rooms × 2 onsets × 3 talkers each).
    /// `listeners` is the swarm's listener capacity alone.
    #[arg(long, value_parser = ["telephony", "transfer", "list_stability", "delay", "listeners"])]
    only: Option<String>,
    /// With `--only delay`: measure only these systems (comma-separated keys, e.g.
    /// `chorus,chorus_low_delay`); the others are reported as missing.
    #[arg(long, value_delimiter = ',')]
    delay_systems: Vec<String>,
    /// Run the listener swarm over loopback even where its own network namespace (a veth pair
    /// with threaded NAPI, `scripts/swarm-netns`) can be built: for comparing the two.
    #[arg(long)]
    swarm_loopback: bool,
    /// Keep every listener datagram on the server's UDP socket in the capacity ramps (no
    /// `--link-layer-fan-out`, which they use where the swarm is on its veth pair): for
    /// comparing the two send paths.
    #[arg(long)]
    udp_socket_fan_out: bool,
    /// With `--only listeners`: these receive-only steps instead of the plan's (comma-separated
    /// listener counts), for a quick look; the other ramps keep theirs.
    #[arg(long, value_delimiter = ',')]
    listener_steps: Vec<usize>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut plan = if args.smoke {
        harness::Plan::smoke()
    } else {
        harness::Plan::full(args.runs.max(1))
    };
    plan.swarm_on_veth = !args.swarm_loopback;
    plan.link_layer_fan_out = !args.udp_socket_fan_out;
    if !args.listener_steps.is_empty() {
        plan.listener_steps.clone_from(&args.listener_steps);
    }
    match args.only.as_deref() {
        Some("transfer") => return only_transfer(&args, &plan).await,
        Some("delay") => return only_delay(&args, &plan).await,
        Some("list_stability") => return only_list_stability(&args, &plan).await,
        Some("listeners") => return only_listeners(&args, &plan).await,
        Some(_) => return only_telephony(&args, &plan).await,
        None => {}
    }
    let mut runs: Vec<harness::RunResult> = Vec::new();
    if let Some(path) = &args.report_from {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        runs = serde_json::from_value(value["per_run"].clone())
            .with_context(|| format!("{} has no readable per_run", path.display()))?;
        // Judged again by today's rule, from the steps as measured.
        for run in &mut runs {
            for capacity in run.capacity.values_mut() {
                if let Some(limit) = capacity::limit_of(&capacity.steps) {
                    capacity.limited_by = limit;
                }
            }
            for c in run.listener_capacity.values_mut() {
                // The callgrind count is not in the steps: kept as measured.
                let counted = c.instructions_per_listener_packet;
                *c = listeners::summarize(std::mem::take(&mut c.steps), c.network.clone());
                c.instructions_per_listener_packet = counted;
            }
        }
    }
    let plan = if args.report_from.is_some() {
        harness::Plan::full(runs.len())
    } else {
        plan
    };
    for run in 0..if args.report_from.is_some() {
        0
    } else {
        plan.runs
    } {
        eprintln!("chorus-bench: run {} of {}", run + 1, plan.runs);
        runs.push(harness::run_once(&plan).await?);
        // Each run's figures are kept as they come, so a failure later loses nothing.
        harness::write_json(&args.out, &harness::results_json(&plan, &runs))?;
    }
    harness::write_json(&args.out, &harness::results_json(&plan, &runs))?;
    let analysis = std::fs::read_to_string(&args.analysis)
        .with_context(|| format!("reading {}", args.analysis.display()))?;
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    std::fs::write(
        &args.markdown,
        report::markdown(&plan, &runs, &analysis, &date),
    )
    .with_context(|| format!("writing {}", args.markdown.display()))?;
    println!(
        "wrote {} and {}",
        args.out.display(),
        args.markdown.display()
    );
    Ok(())
}

/// `--only telephony`: the phone-call scenario alone, `--runs` times.
async fn only_telephony(args: &Args, plan: &harness::Plan) -> Result<()> {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        eprintln!("chorus-bench: telephony, run {} of {}", run + 1, plan.runs);
        runs.push(telephony::measure(plan.phone).await?);
    }
    let refs: Vec<Option<&telephony::PhoneCalls>> = runs.iter().map(Some).collect();
    let value = serde_json::json!({
        "machine": harness::machine(),
        "runs": runs.len(),
        "phone_calls": harness::phone_json(plan, &refs),
        "spread": harness::phone_figures(&refs),
        "per_run": runs,
    });
    write_only(args, &value, &report::phone_calls_section(plan, &refs))
}

/// `--only transfer`: the session-transfer scenario alone, `--runs` times.
async fn only_transfer(args: &Args, plan: &harness::Plan) -> Result<()> {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        eprintln!("chorus-bench: transfer, run {} of {}", run + 1, plan.runs);
        runs.push(chorus_tests::bench::transfer::measure(plan.transfers).await?);
    }
    let refs: Vec<Option<&chorus_tests::bench::transfer::TransferFigures>> =
        runs.iter().map(Some).collect();
    let value = serde_json::json!({
        "machine": harness::machine(),
        "runs": runs.len(),
        "transfer": harness::transfer_json(plan, &refs),
        "spread": harness::transfer_figures(&refs),
        "per_run": runs,
    });
    write_only(args, &value, &report::transfer_section(plan, &refs))
}

/// `--only list_stability`: the demo shape's list stability and newcomers alone, `--runs` times.
async fn only_list_stability(args: &Args, plan: &harness::Plan) -> Result<()> {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        eprintln!(
            "chorus-bench: list stability, run {} of {}",
            run + 1,
            plan.runs
        );
        runs.push(
            list_stability::measure(plan.list_stability_seconds, plan.list_stability_rounds)
                .await?,
        );
    }
    let refs: Vec<Option<&list_stability::ListStability>> = runs.iter().map(Some).collect();
    let mut value = serde_json::json!({
        "machine": harness::machine(),
        "runs": runs.len(),
        "spread": harness::list_stability_figures(&refs),
        "per_run": runs,
    });
    if let serde_json::Value::Object(top) = &mut value {
        top.extend(harness::list_stability_json(plan, &refs));
    }
    write_only(args, &value, &report::list_stability_section(plan, &refs))
}

/// `--only listeners`: the swarm's listener capacity alone, `--runs` times.
async fn only_listeners(args: &Args, plan: &harness::Plan) -> Result<()> {
    let mut runs = Vec::new();
    let speed = harness::machine_speed()?;
    eprintln!("machine speed: {speed:?}");
    for run in 0..plan.runs {
        eprintln!("chorus-bench: listeners, run {} of {}", run + 1, plan.runs);
        runs.push(harness::listener_capacities(plan).await?);
    }
    let value = serde_json::json!({
        "machine": harness::machine(),
        "machine_speed": speed,
        "runs": runs.len(),
        "capacity": harness::capacity_json(&runs.iter().collect::<Vec<_>>()),
        "per_run": runs,
    });
    write_only(
        args,
        &value,
        &report::listener_capacity_section(&runs.iter().collect::<Vec<_>>()),
    )
}

/// `--only delay`: every system's server-added delay, `--runs` times, over the full run's rooms.
async fn only_delay(args: &Args, plan: &harness::Plan) -> Result<()> {
    let mut plan = plan.clone();
    plan.delay_systems.clone_from(&args.delay_systems);
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        eprintln!("chorus-bench: delay, run {} of {}", run + 1, plan.runs);
        let delays = harness::delays(&plan).await?;
        let lookahead = chorus_tests::bench::delay::server_codec_lookahead_ms()?;
        runs.push((delays, lookahead));
    }
    let refs: Vec<_> = runs.iter().map(|(d, l)| (d, *l)).collect();
    let f = harness::delay_figures(&refs);
    let m = |k: &str| f.get(k).map_or(f64::NAN, |s| s.median);
    let value = serde_json::json!({
        "machine": harness::machine(),
        "runs": runs.len(),
        "delay_ms": harness::delay_ms_json(&m),
        "spread": f,
        "per_run": runs.iter().map(|(d, l)| serde_json::json!({"delay": d, "lookahead_ms": l})).collect::<Vec<_>>(),
    });
    write_only(
        args,
        &value,
        &report::delay_section(plan.delay_rooms, plan.delay_onsets, &f),
    )
}

/// Write one scenario's results alone: its JSON to `--out`, its section to `--markdown`.
fn write_only(args: &Args, value: &serde_json::Value, markdown: &str) -> Result<()> {
    harness::write_json(&args.out, value)?;
    std::fs::write(&args.markdown, markdown)
        .with_context(|| format!("writing {}", args.markdown.display()))?;
    println!(
        "wrote {} and {}",
        args.out.display(),
        args.markdown.display()
    );
    Ok(())
}
