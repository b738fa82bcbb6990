//! `chorus-bench`: the benchmark harness behind `make bench`. Runs the scenarios, prints a table
//! and writes `bench/results/*.json`. Thin: the measurements live in `chorus_tests::bench`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chorus_tests::bench;
use clap::Parser;

/// Run Chorus benchmarks.
#[derive(Debug, Parser)]
#[command(name = "chorus-bench")]
struct Args {
    /// One-way link delays (ms) to emulate between servers for the cross-server scenario.
    #[arg(long, value_delimiter = ',', default_value = "0,40")]
    link_ms: Vec<u32>,
    /// Onsets measured per scenario.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results/cross_server.json")]
    out: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    println!(
        "| link one-way | single server p50 / p99 | two servers p50 / p99 | extra p50 / p99 | onsets |"
    );
    println!("|---|---|---|---|---|");
    for link in &args.link_ms {
        let r = bench::cross_server(*link, args.rounds).await?;
        println!(
            "| {} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {} |",
            r.link_ms,
            r.single_server.p50,
            r.single_server.p99,
            r.cross_server.p50,
            r.cross_server.p99,
            r.extra.p50,
            r.extra.p99,
            r.extra.n
        );
        results.push(r);
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let json = serde_json::json!({
        "machine": format!("{machine}, {} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        "cross_server": results,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
