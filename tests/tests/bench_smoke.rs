//! A one-round run of the benchmark harness, so it cannot rot. It checks that the harness measures
//! something (an onset crossed each path, in a plausible order), never how fast.

use anyhow::Result;
use chorus_tests::bench;
use chorus_tests::heavy_test_guard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_server_harness_measures_both_paths() -> Result<()> {
    let _serial = heavy_test_guard().await;
    let r = bench::cross_server(20, 2).await?;
    eprintln!("{r:?}");
    assert!(
        r.single_server.n >= 1 && r.cross_server.n >= 1,
        "no onset measured: {r:?}"
    );
    // Sanity, not speed: a delay is a positive, finite number of milliseconds.
    for p in [r.single_server, r.cross_server] {
        assert!(p.p50.is_finite() && p.p50 > 0.0, "{r:?}");
    }
    Ok(())
}
