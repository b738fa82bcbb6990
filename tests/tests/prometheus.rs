//! The chart's media dashboard and alerts work against real data: a real Prometheus scrapes a
//! running three-region conference (examples/conference.yaml run locally, five media servers in
//! one mesh, talking bots), and every media-server PromQL expression of the chart must come back
//! successful and non-empty.
//!
//! The conference also calls phones ("call me"), so the telephony row has data: the example's
//! `telephony` block is pointed at a real Kamailio (`chorus_tests::telephony`) with a baresip desk
//! phone 1001 and a SIPp phone 1004 that answers, presses a key (DTMF) and then sends no audio.
//! Before the scrape: a refused request (a target outside `allowedTargets`), a call to 1004 that
//! ends `media_timeout` after the key press, and a call to 1001 that is active. While Prometheus
//! scrapes: that call is hung up and a second one placed, answered and hung up, so the calls
//! counter grows under Prometheus' eyes (a counter series that first appears at 1 has no rate).
//!
//! How each kind of expression is checked:
//! - dashboard panels: Grafana's variables are replaced as Grafana would (`$__rate_interval` by
//!   `30s`, a multi-value "All" of `$conference`/`$region` by `.*`), then the query must return
//!   data. Only the panels of [`MAY_BE_EMPTY`] may be empty: their counters have a series per
//!   label value only once something went wrong, which it does not here;
//! - dashboard variables (`label_values(SELECTOR, LABEL)`, a Grafana function, not PromQL): the
//!   selector must return series that carry LABEL;
//! - media alerts (`LHS OP THRESHOLD`): the whole rule must evaluate successfully (its result is
//!   whatever fires now, possibly nothing), and LHS alone must return data, so the alert is able
//!   to fire. On this healthy mesh ChorusMeshLinkDown must also not hold for any link, and
//!   ChorusCallFailuresRising's left side must be a number (not NaN) for the conference: calls
//!   ended in the window, so the share of failures is defined.
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
use chorus_tests::bot::{Bot, BotConfig, tone};
use chorus_tests::call_me::participant_id;
use chorus_tests::telephony::{Baresip, BaresipOptions, Kamailio, Sipp, SippOptions};
use chorus_tests::{heavy_test_guard, run_ok, tool, workspace_root};
use serde::Deserialize;
use serde_json::{Value, json};

const EXAMPLE_FILE: &str = "examples/conference.yaml";
/// Where the Secrets the example names are (`pbx.yaml`: the line's demo credentials, which the
/// test call manager knows).
const EXAMPLE_SECRETS: &str = "examples";
const MEDIA_DASHBOARD: &str = "charts/chorus/dashboards/media.json";
const CONFIG_TEMPLATE: &str = "tests/prometheus/prometheus.yml.in";
/// Ports away from the defaults (8080, 7000, 40000) and from the other end-to-end tests.
const BASE_PORT: u16 = 18180;
const MESH_BASE_PORT: u16 = 17100;
const UDP_BASE_PORT: u16 = 41000;
/// SIP port of server 0 of each region (away from the example's 5062, which `make demo` uses).
const SIP_BASE_PORT: u16 = 17300;
const BOTS: usize = 3;
/// The room of the bots and of the participants who ask for calls.
const ROOM: &str = "prometheus";
/// How long Prometheus scrapes (every second) before the queries: enough for 30 s rate windows to
/// hold a couple of dozen samples, and for the mesh to measure RTTs and the primary to count ticks.
const SCRAPE_FOR: Duration = Duration::from_secs(25);
/// Panels whose query may be empty on a healthy mesh, and why it is still a useful panel:
/// - "Mesh errors by category": a series per category once something was refused;
/// - "Phone RTP drops by reason": a series per reason once a datagram at a phone leg's port was
///   dropped (wrong source, unknown payload type, malformed, SRTP failures).
const MAY_BE_EMPTY: [&str; 3] = [
    "Mesh errors by category",
    "Phone RTP drops by reason",
    // No edge bridge connects to the servers-mode demo conference, so none is refused.
    "Edge bridge connections refused by reason",
];
/// The alert whose left side must be a number here (see the module documentation).
const CALL_FAILURES_ALERT: &str = "ChorusCallFailuresRising";

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

    // The call manager and the phones first: a phone must be registered before it is called.
    let kam = Kamailio::start()?;
    let desk_phone = Baresip::start(&kam, BaresipOptions::phone("1001").tone(440.0))?;
    let mut dtmf_phone = Sipp::phone_with(
        &kam,
        "1004",
        "phone_dtmf.xml",
        SippOptions {
            dtmf_digit: '5',
            pause: Duration::from_millis(500),
            ..SippOptions::default()
        },
    )?;

    let (_, mut conference) = read_conference_file(&workspace_root().join(EXAMPLE_FILE))?;
    let telephony = conference.spec.telephony.as_mut().with_context(|| {
        format!("{EXAMPLE_FILE} has no telephony block, so the telephony row cannot be checked")
    })?;
    // The example's call manager is whatever listens on 127.0.0.1:5060; here it is ours. A phone
    // that sends no audio ends its call after 2 s (the CRD's minimum) instead of 10.
    telephony.call_manager_uri = kam.uri();
    telephony.media_timeout_seconds = 2;
    // Dropping `local` (also on an early error return) stops every server and bot.
    let mut local = LocalConference::start(
        &conference,
        LocalOptions {
            base_port: BASE_PORT,
            mesh_base_port: MESH_BASE_PORT,
            udp_base_port: Some(UDP_BASE_PORT),
            sip_base_port: Some(SIP_BASE_PORT),
            mediaserver_bin: Some(mediaserver_bin),
            secrets_dir: Some(workspace_root().join(EXAMPLE_SECRETS)),
            ..LocalOptions::default()
        },
    )
    .await
    .context("starting examples/conference.yaml locally")?;
    local
        .start_bots(BOTS, ROOM, Some(&bot_bin))
        .await
        .context("starting bots")?;

    // Calls before the scrape: a refusal, a call ending media_timeout after a key press, and an
    // answered call to the desk phone.
    let api = CallApi::new(&local.servers[0].base_url())?;
    let ada = api.join(&local, "ada").await?;
    let dora = api.join(&local, "dora").await?;
    let (status, refused) = api
        .post(
            &ada,
            &json!({"to": "not-a-number", "participantId": ada.id}),
        )
        .await?;
    ensure!(
        status == 400 && refused["reason"] == "target_not_allowed",
        "a target outside allowedTargets: {status} {refused}"
    );
    let dtmf_call = api.place(&dora, "1004").await?;
    let first_call = api.place(&ada, "1001").await?;
    api.wait_state(&ada, first_call, "active", Duration::from_secs(15))
        .await
        .with_context(|| format!("desk phone log:\n{}", desk_phone.log()))?;
    let ended = api
        .wait_state(&dora, dtmf_call, "ended", Duration::from_secs(15))
        .await?;
    ensure!(
        ended["endReason"] == "media_timeout",
        "the DTMF phone sends no audio after its key press: {ended}"
    );
    ensure!(
        dtmf_phone.wait().await?.success(),
        "SIPp phone 1004 did not run its scenario (answer, DTMF, BYE received)"
    );

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

    // While Prometheus scrapes: hang up, call again, hang up again.
    let calls_while_scraping = async {
        tokio::time::sleep(SCRAPE_FOR / 4).await;
        api.hang_up(&ada, first_call).await?;
        api.wait_state(&ada, first_call, "ended", Duration::from_secs(10))
            .await?;
        let second = api.place(&ada, "1001").await?;
        api.wait_state(&ada, second, "active", Duration::from_secs(15))
            .await?;
        tokio::time::sleep(SCRAPE_FOR / 4).await;
        api.hang_up(&ada, second).await?;
        let ended = api
            .wait_state(&ada, second, "ended", Duration::from_secs(10))
            .await?;
        ensure!(ended["endReason"] == "hangup", "{ended}");
        anyhow::Ok(())
    };
    let (result, calls) = tokio::join!(
        check_queries(&prometheus, &local, &panels, &variables, &alerts),
        calls_while_scraping
    );
    let result = calls
        .with_context(|| {
            format!(
                "calls while scraping; desk phone log:\n{}",
                desk_phone.log()
            )
        })
        .and(result);
    drop((ada, dora));
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
            Ok(result) => {
                println!("alert {alert} left side: {}", sample_values(&result));
                // Calls ended in the window, so the share of failures is a number.
                let numbers = result.iter().all(|series| {
                    series["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                });
                if alert == CALL_FAILURES_ALERT && !numbers {
                    failures.push(format!(
                        "alert {alert}: its left side is not a number: {}",
                        sample_values(&result)
                    ));
                }
            }
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

/// A participant who asks for calls: a bot joined over HTTP, its token and participant id.
struct Caller {
    _bot: Bot,
    token: String,
    id: u64,
}

/// The calls API of one media server, as the web client uses it.
struct CallApi {
    http: reqwest::Client,
    base: String,
}

impl CallApi {
    fn new(base: &str) -> Result<CallApi> {
        Ok(CallApi {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Joins `identity` to [`ROOM`] with a 1000 Hz tone.
    async fn join(&self, local: &LocalConference, identity: &str) -> Result<Caller> {
        let token = local.token(ROOM, identity).await?;
        let bot = Bot::join_http(
            &self.base,
            ROOM,
            &token,
            BotConfig::new(tone(1000.0, -20.0)),
        )
        .await
        .with_context(|| format!("{identity} joins {ROOM}"))?;
        let id = participant_id(&bot)?;
        Ok(Caller {
            _bot: bot,
            token,
            id,
        })
    }

    /// `POST /v1/rooms/ROOM/calls`: the status and the JSON body.
    async fn post(&self, caller: &Caller, body: &Value) -> Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/rooms/{ROOM}/calls", self.base))
            .bearer_auth(&caller.token)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Asks for a call to `to` (202, `dialing`); returns its id.
    async fn place(&self, caller: &Caller, to: &str) -> Result<u64> {
        let (status, call) = self
            .post(
                caller,
                &json!({"to": to, "participantId": caller.id, "audio": "add"}),
            )
            .await?;
        ensure!(status == 202, "calling {to}: {status} {call}");
        call["id"].as_u64().context("a call id")
    }

    async fn call(&self, caller: &Caller, id: u64) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/v1/rooms/{ROOM}/calls/{id}", self.base))
            .bearer_auth(&caller.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Polls call `id` until it is in `state`; an ended call that should not have ended fails.
    async fn wait_state(
        &self,
        caller: &Caller,
        id: u64,
        state: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let call = self.call(caller, id).await?;
            if call["state"] == state {
                return Ok(call);
            }
            ensure!(
                call["state"] != "ended" && Instant::now() < deadline,
                "call {id} is not {state} after {timeout:?}: {call}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `DELETE` of call `id` (202).
    async fn hang_up(&self, caller: &Caller, id: u64) -> Result<()> {
        let status = self
            .http
            .delete(format!("{}/v1/rooms/{ROOM}/calls/{id}", self.base))
            .bearer_auth(&caller.token)
            .send()
            .await?
            .status();
        ensure!(status == 202, "hanging up call {id}: {status}");
        Ok(())
    }
}
