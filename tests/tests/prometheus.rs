//! The chart's media dashboard and alerts work against real data: a real Prometheus scrapes a
//! running three-region conference (examples/conference.yaml run locally, five media servers in
//! one mesh, talking bots), and every media-server PromQL expression of the chart must come back
//! successful and non-empty.
//!
//! How each kind of expression is checked:
//! - dashboard panels: Grafana's variables are replaced as Grafana would (`$__rate_interval` by
//!   `30s`, a multi-value "All" of `$conference`/`$region` by `.*`), then the query must return
//!   data. Only "Mesh errors by category" may be empty: its counter has a series per category
//!   only once something was refused, which a healthy mesh never does;
//! - dashboard variables (`label_values(SELECTOR, LABEL)`, a Grafana function, not PromQL): the
//!   selector must return series that carry LABEL;
//! - media alerts (`LHS OP THRESHOLD`): the whole rule must evaluate successfully (its result is
//!   whatever fires now, possibly nothing), and LHS alone must return data, so the alert is able
//!   to fire. On this healthy mesh ChorusMeshLinkDown must also not hold for any link.
//! - operator expressions: no API server runs here, so no operator runs; chart.rs checks their
//!   metric names against the code instead.
//!
//! The scrape config (tests/prometheus/prometheus.yml.in) gives each target the labels the chart's
//! PodMonitor gives a pod in a cluster: `region`, `conference`, and `instance` = the server id.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chorus_operator::local::{LocalConference, LocalOptions, cli::read_conference_file};
use chorus_tests::{heavy_test_guard, run_ok, tool, workspace_root};
use serde::Deserialize;

const EXAMPLE_FILE: &str = "examples/conference.yaml";
const MEDIA_DASHBOARD: &str = "charts/chorus/dashboards/media.json";
const CONFIG_TEMPLATE: &str = "tests/prometheus/prometheus.yml.in";
/// Ports away from the defaults (8080, 7000, 40000) and from the other end-to-end tests.
const BASE_PORT: u16 = 18180;
const MESH_BASE_PORT: u16 = 17100;
const UDP_BASE_PORT: u16 = 41000;
const BOTS: usize = 3;
/// How long Prometheus scrapes (every second) before the queries: enough for 30 s rate windows to
/// hold a couple of dozen samples, and for the mesh to measure RTTs and the primary to count ticks.
const SCRAPE_FOR: Duration = Duration::from_secs(25);
/// Panels whose query may be empty on a healthy mesh, and why it is still a useful panel.
const MAY_BE_EMPTY: [&str; 1] = ["Mesh errors by category"];

/// A workspace binary: the one in the target directory if built, else built now (with the cargo
/// running these tests, so toolchain and target directory match).
fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf> {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("CARGO_TARGET_TMPDIR has no parent")?;
    let path = target.join("debug").join(bin);
    if path.is_file() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_ok(
        Path::new(&cargo),
        ["build", "--quiet", "--package", package, "--bin", bin],
    )?;
    ensure!(
        path.is_file(),
        "cargo built {package} but {} is not there",
        path.display()
    );
    Ok(path)
}

/// `prometheus` from PATH, or Debian's /usr/bin/prometheus.
fn prometheus_bin() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file()))
        .context(
            "`prometheus` is not installed (looked in PATH and /usr/bin); run `scripts/bootstrap`, \
             which installs the Debian package `prometheus`",
        )
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Debug, Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
}

struct Prometheus {
    client: reqwest::Client,
    url: String,
}

impl Prometheus {
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<ApiResponse> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let body = response.text().await?;
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// An instant query: its result vector, or an error naming the expression.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        let response = self.get("/api/v1/query", &[("query", expr)]).await?;
        ensure!(
            response.status == "success",
            "Prometheus refused {expr}: {:?}",
            response.error
        );
        Ok(response.data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// A query result's values, shortened: `label=value ... => value` for the first few series.
fn sample_values(result: &[serde_json::Value]) -> String {
    let shown: Vec<String> = result
        .iter()
        .take(4)
        .map(|series| {
            let labels: Vec<String> = series["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            format!("{{{}}} {}", labels.join(","), series["value"][1])
        })
        .collect();
    format!("{} series: {}", result.len(), shown.join("; "))
}

/// Replaces Grafana's variables the way Grafana does before sending the query.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$conference", ".*")
        .replace("$region", ".*")
}

/// Splits `LHS OP NUMBER` into LHS, failing when a rule is not written that way.
fn alert_lhs(expr: &str) -> Result<&str> {
    let expr = expr.trim();
    let (rest, threshold) = expr
        .rsplit_once(char::is_whitespace)
        .context("empty rule")?;
    let (lhs, op) = rest
        .trim_end()
        .rsplit_once(char::is_whitespace)
        .context("no operator")?;
    ensure!(
        threshold.parse::<f64>().is_ok() && [">", "<", "==", ">=", "<=", "!="].contains(&op),
        "alert expression is not `LHS OP NUMBER`, so this test cannot check it can fire: {expr}"
    );
    Ok(lhs.trim_end())
}

#[test]
fn alert_lhs_splits_threshold() -> Result<()> {
    ensure!(alert_lhs("sum(rate(x[5m])) > 0.04\n")? == "sum(rate(x[5m]))");
    ensure!(alert_lhs("a / b < 0.95")? == "a / b");
    ensure!(alert_lhs("rate(x[5m])").is_err());
    Ok(())
}

/// The chart's media-server alert rules (group chorus.mediaserver) as (alert, expression).
fn media_alerts() -> Result<Vec<(String, String)>> {
    let output = run_ok(
        &tool("helm")?,
        [
            "template",
            "chorus",
            "charts/chorus",
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
    )?;
    let rule: serde_yaml::Value = serde_yaml::from_slice(&output.stdout)?;
    let mut alerts = Vec::new();
    for group in rule["spec"]["groups"].as_sequence().into_iter().flatten() {
        if group["name"].as_str() != Some("chorus.mediaserver") {
            continue;
        }
        for r in group["rules"].as_sequence().into_iter().flatten() {
            alerts.push((
                r["alert"].as_str().unwrap_or("?").to_owned(),
                r["expr"].as_str().context("rule without expr")?.to_owned(),
            ));
        }
    }
    ensure!(
        alerts.len() >= 3,
        "expected the media alerts in the PrometheusRule"
    );
    Ok(alerts)
}

/// (name, PromQL or Grafana query) pairs: a panel's title or a variable's name, and its query.
type Queries = Vec<(String, String)>;

/// (panel title, expression) of every media-dashboard panel, and the variables' queries.
fn media_dashboard() -> Result<(Queries, Queries)> {
    let path = workspace_root().join(MEDIA_DASHBOARD);
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            panels.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                target["expr"]
                    .as_str()
                    .context("target without expr")?
                    .to_owned(),
            ));
        }
    }
    let mut variables = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            variables.push((
                variable["name"].as_str().unwrap_or("?").to_owned(),
                query.to_owned(),
            ));
        }
    }
    Ok((panels, variables))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_prometheus_answers_every_media_query() -> Result<()> {
    let _guard = heavy_test_guard().await;
    let prometheus_bin = prometheus_bin()?;
    let mediaserver_bin = workspace_bin("chorus-mediaserver", "chorus-mediaserver")?;
    let bot_bin = workspace_bin("chorus-tests", "chorus-bot")?;
    let (panels, variables) = media_dashboard()?;
    let alerts = media_alerts()?;

    let (_, conference) = read_conference_file(&workspace_root().join(EXAMPLE_FILE))?;
    // Dropping `local` (also on an early error return) stops every server and bot.
    let mut local = LocalConference::start(
        &conference,
        LocalOptions {
            base_port: BASE_PORT,
            mesh_base_port: MESH_BASE_PORT,
            udp_base_port: Some(UDP_BASE_PORT),
            mediaserver_bin: Some(mediaserver_bin),
            ..LocalOptions::default()
        },
    )
    .await
    .context("starting examples/conference.yaml locally")?;
    local
        .start_bots(BOTS, "prometheus", Some(&bot_bin))
        .await
        .context("starting bots")?;

    // A static scrape config standing in for the PodMonitor: same labels, one target per server.
    let targets: String = local
        .servers
        .iter()
        .map(|s| {
            format!(
                "      - targets: [\"{}\"]\n        labels: {{region: \"{}\", instance: \"{}\", conference: \"{}\"}}\n",
                s.http, s.region, s.id, local.name
            )
        })
        .collect();
    let template = std::fs::read_to_string(workspace_root().join(CONFIG_TEMPLATE))?;
    ensure!(
        template.contains("@TARGETS@"),
        "{CONFIG_TEMPLATE} has no @TARGETS@"
    );
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, template.replace("@TARGETS@\n", &targets))?;
    let log_path = dir.join("prometheus.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port()?;
    let mut child = tokio::process::Command::new(&prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", prometheus_bin.display()))?;
    let prometheus = Prometheus {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        url: format!("http://127.0.0.1:{port}"),
    };

    let result = check_queries(&prometheus, &local, &panels, &variables, &alerts).await;
    let _ = child.kill().await;
    local.shutdown().await;
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        Err(e) => {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(e.context(format!(
                "Prometheus log {} ends with:\n{}",
                log_path.display(),
                tail.join("\n")
            )))
        }
    }
}

async fn check_queries(
    prometheus: &Prometheus,
    local: &LocalConference,
    panels: &[(String, String)],
    variables: &[(String, String)],
    alerts: &[(String, String)],
) -> Result<()> {
    // Ready, then every target up.
    let started = Instant::now();
    loop {
        let ready = prometheus
            .client
            .get(format!("{}/-/ready", prometheus.url))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "Prometheus did not become ready in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scraping = Instant::now();
    loop {
        let targets = prometheus.get("/api/v1/targets", &[]).await?;
        let active = targets.data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let health: BTreeMap<String, String> = active
            .iter()
            .map(|t| {
                (
                    t["labels"]["instance"].as_str().unwrap_or("?").to_owned(),
                    format!(
                        "{} {}",
                        t["health"].as_str().unwrap_or("?"),
                        t["lastError"].as_str().unwrap_or("")
                    ),
                )
            })
            .collect();
        if active.len() == local.servers.len() && health.values().all(|h| h.starts_with("up")) {
            break;
        }
        ensure!(
            scraping.elapsed() < Duration::from_secs(15),
            "not every media server is scraped: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(SCRAPE_FOR.saturating_sub(scraping.elapsed())).await;

    let mut failures = Vec::new();
    for (title, expr) in panels {
        let promql = grafana_to_promql(expr);
        match prometheus.query(&promql).await {
            Ok(result) if result.is_empty() && !MAY_BE_EMPTY.contains(&title.as_str()) => {
                failures.push(format!("panel {title:?}: no data for {promql}"))
            }
            // Printed for `--nocapture` runs: what the panel would show now.
            Ok(result) => println!("panel {title:?}: {}", sample_values(&result)),
            Err(e) => failures.push(format!("panel {title:?}: {e:#}")),
        }
    }
    for (name, query) in variables {
        // label_values(SELECTOR, LABEL): the selector must return series carrying LABEL.
        let Some(inner) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            failures.push(format!("variable {name}: not label_values(...): {query}"));
            continue;
        };
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values without label")?;
        let (selector, label) = (grafana_to_promql(selector.trim()), label.trim());
        match prometheus.query(&selector).await {
            Ok(result) if result.iter().any(|s| s["metric"][label].is_string()) => {}
            Ok(_) => failures.push(format!("variable {name}: no {label} values in {selector}")),
            Err(e) => failures.push(format!("variable {name}: {e:#}")),
        }
    }
    for (alert, expr) in alerts {
        if let Err(e) = prometheus.query(expr).await {
            failures.push(format!("alert {alert}: {e:#}"));
            continue;
        }
        let lhs = alert_lhs(expr)?;
        match prometheus.query(lhs).await {
            Ok(result) if result.is_empty() => {
                failures.push(format!("alert {alert}: no data for its left side {lhs}"))
            }
            Ok(result) => println!("alert {alert} left side: {}", sample_values(&result)),
            Err(e) => failures.push(format!("alert {alert}: {e:#}")),
        }
        // Every link of this mesh is up, so the link-down condition must hold for none of them.
        if alert == "ChorusMeshLinkDown" {
            let down = prometheus.query(expr).await?;
            if !down.is_empty() {
                failures.push(format!(
                    "alert {alert} holds on a healthy mesh: {}",
                    serde_json::to_string(&down)?
                ));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} checks failed:\n{}",
            failures.len(),
            panels.len() + variables.len() + alerts.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
