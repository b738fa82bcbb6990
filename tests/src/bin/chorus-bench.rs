//! `chorus-bench`: the benchmark harness behind `make bench`. Runs every scenario `--runs` times
//! and writes `bench/results/latest.json` and `BENCHMARKS.md`. Thin: the measurements live in
//! `chorus_tests::bench`.
//!
//! Run the built binary directly (as `make bench` does), not through `cargo run`: it builds
//! `chorus-mediaserver` itself, and a nested cargo would wait on `cargo run`'s build lock.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chorus_tests::bench::{capacity, harness, report, telephony};
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
    /// them away from the real report): `telephony` or `transfer`.
    #[arg(long, value_parser = ["telephony", "transfer"])]
    only: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let plan = if args.smoke {
        harness::Plan::smoke()
    } else {
        harness::Plan::full(args.runs.max(1))
    };
    match args.only.as_deref() {
        Some("transfer") => return only_transfer(&args, &plan).await,
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
