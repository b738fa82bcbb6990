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
    // The emulated 20 ms link is on the cross path only.
    assert!(r.cross_server.p50 > r.single_server.p50, "{r:?}");
    Ok(())
}
