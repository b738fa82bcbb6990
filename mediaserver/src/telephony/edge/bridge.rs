//! `chorus-mediaserver edge`: the bridge that places calls from inside the enterprise network.
//!
//! What runs, all of it opened from here (no listening socket but SIP and each call's RTP and
//! WebRTC sockets):
//! - the line's registration with the call manager ([`SipAgent::keep_registered`]), refreshed
//!   before it expires and retried with backoff, its state reported to every server;
//! - per conference server, one job connection ([`super::protocol`]): it reconnects with
//!   backoff (1 s doubling to 30 s) while the server is unreachable, and logs why a server
//!   refuses it (a wrong, expired or foreign token);
//! - per job, a [`CallTask`] (the same task a media server runs in server mode) whose room side is
//!   an [`EdgeRoom`], and a reporter that posts each transition back.
//!
//! When a job connection breaks, every call it carried is ended at once as `conference_lost`
//! (CANCEL while ringing, BYE when active): the server that asked for them is gone or cannot hear
//! about them any more, so no phone stays ringing for nobody. On shutdown calls are hung up, the
//! line unregistered, then the SIP transport stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, CallJob, CallReport, HangupJob, Hello, StatusReport};
use super::sse::SseReader;
use super::webrtc_room::{EdgeRoom, MediaAddresses};
use crate::telephony::call::{CallState, CallTimeouts, EndReason};
use crate::telephony::call_task::CallTask;
use crate::telephony::calls::CallInfo;
use crate::telephony::metrics::TelephonyMetrics;
use crate::telephony::sip::{CallManager, LineCredentials, SipAgent};
use crate::telephony::{TelephonyError, TelephonySettings, target_hash};

/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long shutdown (or a broken connection) waits for calls to hang up.
const HANGUP_GRACE: Duration = Duration::from_secs(5);
/// How long one report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a bridge needs.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The conference servers to take jobs from (each gets its own connection).
    pub servers: Vec<reqwest::Url>,
    /// The edge token (from its Secret).
    pub token: String,
    /// The call manager, as reached from inside the network.
    pub manager: CallManager,
    /// The line's credentials.
    pub line: LineCredentials,
    /// A CA for the call manager's TLS and the servers' HTTPS, when private.
    pub ca_pem: Option<Vec<u8>>,
    /// Where call media sockets live.
    pub addresses: MediaAddresses,
    /// The registration's requested expiry, seconds.
    pub register_expires: u32,
}

/// The state the connections share.
struct Shared {
    config: BridgeConfig,
    agent: SipAgent,
    http: reqwest::Client,
    metrics: TelephonyMetrics,
    registered: watch::Receiver<bool>,
}

/// Run a bridge on the bound SIP socket `sip` until `shutdown`.
pub async fn run(
    config: BridgeConfig,
    sip: tokio::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), TelephonyError> {
    if config.servers.is_empty() {
        return Err(TelephonyError::Config(
            "an edge bridge needs at least one --server".to_owned(),
        ));
    }
    let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &config.ca_pem {
        let cert = reqwest::Certificate::from_pem(ca)
            .map_err(|e| TelephonyError::Config(format!("CA file: {e}")))?;
        http = http.add_root_certificate(cert);
    }
    let http = http
        .build()
        .map_err(|e| TelephonyError::Config(format!("HTTP client: {e}")))?;
    let sip_stop = CancellationToken::new();
    let agent = SipAgent::start(
        sip,
        config.addresses.advertised,
        config.ca_pem.clone(),
        sip_stop.clone(),
    )
    .await?;
    tracing::info!(sip = %agent.local_addr(), "edge bridge SIP agent listening");
    let (registered_tx, registered) = watch::channel(false);
    let register_stop = CancellationToken::new();
    let registration = {
        let agent = agent.clone();
        let manager = config.manager.clone();
        let line = config.line.clone();
        let expires = config.register_expires;
        let stop = register_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = agent
                .keep_registered(&manager, &line, expires, stop, registered_tx)
                .await
            {
                tracing::error!(error = %e, "the line cannot be registered");
            }
        })
    };
    let shared = Arc::new(Shared {
        config,
        agent,
        http,
        metrics: TelephonyMetrics::new(),
        registered,
    });
    let connections: Vec<JoinHandle<()>> = shared
        .config
        .servers
        .iter()
        .map(|url| tokio::spawn(serve_server(shared.clone(), url.clone(), shutdown.clone())))
        .collect();
    futures::future::join_all(connections).await;
    register_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), registration).await;
    sip_stop.cancel();
    Ok(())
}

/// The job connection to one server, reconnected with backoff until `shutdown`.
async fn serve_server(shared: Arc<Shared>, base: reqwest::Url, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        match connect(&shared, &base).await {
            Ok(response) => {
                tracing::info!(server = %base, "connected to the conference");
                failures = 0;
                let why = take_jobs(&shared, &base, response, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::warn!(server = %base, reason = %why, "the conference connection broke; reconnecting");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(server = %base, error = %e, "cannot connect to the conference");
            }
        }
        let wait = backoff(failures);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// 1 s doubling per consecutive failure, at most [`MAX_BACKOFF`]; 1 s after a connection that
/// worked.
fn backoff(failures: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(failures.saturating_sub(1).min(5)))
        .min(MAX_BACKOFF)
}

/// Open the job stream; a refusal is an error saying why (the server's own message).
async fn connect(
    shared: &Shared,
    base: &reqwest::Url,
) -> Result<reqwest::Response, TelephonyError> {
    let url = base
        .join("/v1/telephony/edge/jobs")
        .map_err(|e| TelephonyError::Config(format!("server URL {base}: {e}")))?;
    let response = shared
        .http
        .get(url)
        .bearer_auth(&shared.config.token)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| TelephonyError::Edge(format!("unreachable: {e}")))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(body);
    Err(if status == reqwest::StatusCode::UNAUTHORIZED {
        TelephonyError::EdgeToken(format!(
            "the conference refused this bridge's token (401): {message}"
        ))
    } else {
        TelephonyError::Edge(format!("the conference answered {status}: {message}"))
    })
}

/// A call this connection carries.
struct Carried {
    hangup: CancellationToken,
    task: JoinHandle<()>,
}

/// Read jobs until the stream ends; returns why it ended. Every call of the connection is ended
/// before this returns.
async fn take_jobs(
    shared: &Arc<Shared>,
    base: &reqwest::Url,
    mut response: reqwest::Response,
    shutdown: &CancellationToken,
) -> String {
    let mut reader = SseReader::new();
    let calls: Arc<Mutex<HashMap<u64, Carried>>> = Arc::new(Mutex::new(HashMap::new()));
    // Cancelled when this connection is gone: the calls it carried end as `conference_lost`.
    let lost = CancellationToken::new();
    let mut hello: Option<(Hello, Arc<TelephonySettings>)> = None;
    let mut status_task: Option<JoinHandle<()>> = None;
    let why = loop {
        let chunk = tokio::select! {
            () = shutdown.cancelled() => break "shutting down".to_owned(),
            chunk = tokio::time::timeout(protocol::STREAM_SILENCE, response.chunk()) => chunk,
        };
        let bytes = match chunk {
            Err(_) => break format!("nothing heard for {:?}", protocol::STREAM_SILENCE),
            Ok(Err(e)) => break format!("read failed: {e}"),
            Ok(Ok(None)) => break "the server closed the stream".to_owned(),
            Ok(Ok(Some(bytes))) => bytes,
        };
        let events = match reader.push(&bytes) {
            Ok(events) => events,
            Err(e) => break format!("malformed stream: {e}"),
        };
        for event in events {
            match event.name.as_str() {
                protocol::event::HELLO => match parse_hello(shared, &event.data) {
                    Ok((h, settings)) => {
                        tracing::info!(
                            server = h.server_id,
                            bridge = h.bridge_id,
                            "the conference took this bridge"
                        );
                        if let Some(task) = status_task.take() {
                            task.abort();
                        }
                        status_task = Some(tokio::spawn(report_status(
                            shared.clone(),
                            base.clone(),
                            h.bridge_id,
                        )));
                        hello = Some((h, settings));
                    }
                    Err(e) => tracing::error!(error = %e, "the conference's hello cannot be used"),
                },
                protocol::event::CALL => {
                    let job: CallJob = match serde_json::from_str(&event.data) {
                        Ok(job) => job,
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed call job ignored");
                            continue;
                        }
                    };
                    let Some((h, settings)) = &hello else {
                        tracing::warn!("a call job before the hello was ignored");
                        continue;
                    };
                    start_call(
                        shared,
                        base,
                        h.bridge_id,
                        settings.clone(),
                        job,
                        &calls,
                        &lost,
                    );
                }
                protocol::event::HANGUP => match serde_json::from_str::<HangupJob>(&event.data) {
                    Ok(job) => {
                        if let Some(call) = lock(&calls).get(&job.call_id) {
                            call.hangup.cancel();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed hang-up job ignored"),
                },
                other => tracing::debug!(event = other, "unknown event ignored"),
            }
        }
    };
    if let Some(task) = status_task.take() {
        task.abort();
    }
    // The connection is gone: hang up what it carried, with the reason that says so (a bridge
    // shutting down hangs up plainly).
    let tasks: Vec<JoinHandle<()>> = lock(&calls)
        .drain()
        .map(|(_, call)| {
            if shutdown.is_cancelled() {
                call.hangup.cancel();
            }
            call.task
        })
        .collect();
    if !shutdown.is_cancelled() {
        lost.cancel();
    }
    if tokio::time::timeout(HANGUP_GRACE, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        tracing::warn!("some calls did not hang up in time");
    }
    why
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("calls lock is never poisoned: nothing panics while holding it")
}

/// The conference's policy with this bridge's own call manager and line.
fn parse_hello(
    shared: &Shared,
    data: &str,
) -> Result<(Hello, Arc<TelephonySettings>), TelephonyError> {
    let hello: Hello = serde_json::from_str(data)
        .map_err(|e| TelephonyError::Edge(format!("malformed hello: {e}")))?;
    let mut settings =
        TelephonySettings::from_plan(&hello.telephony, Some(shared.config.line.clone()))?;
    if settings.manager.host != shared.config.manager.host {
        tracing::info!(
            conference = settings.manager.host,
            bridge = shared.config.manager.host,
            "the bridge dials its own call manager address"
        );
    }
    settings.manager = shared.config.manager.clone();
    Ok((hello, Arc::new(settings)))
}

/// Tell the server whether the line is registered, now and at every change.
async fn report_status(shared: Arc<Shared>, base: reqwest::Url, bridge_id: u64) {
    let Ok(url) = base.join("/v1/telephony/edge/status") else {
        return;
    };
    let mut registered = shared.registered.clone();
    loop {
        let now = *registered.borrow_and_update();
        let report = StatusReport {
            bridge_id,
            registered: now,
        };
        if let Err(e) = post(&shared, &url, &report).await {
            tracing::debug!(error = %e, "status report failed");
        }
        if registered.changed().await.is_err() {
            return;
        }
    }
}

async fn post<T: serde::Serialize>(
    shared: &Shared,
    url: &reqwest::Url,
    body: &T,
) -> Result<(), String> {
    let response = tokio::time::timeout(
        REPORT_TIMEOUT,
        shared
            .http
            .post(url.clone())
            .bearer_auth(&shared.config.token)
            .json(body)
            .send(),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ))
    }
}

/// Start call `job`: its task, and a reporter posting each transition.
fn start_call(
    shared: &Arc<Shared>,
    base: &reqwest::Url,
    bridge_id: u64,
    settings: Arc<TelephonySettings>,
    job: CallJob,
    calls: &Arc<Mutex<HashMap<u64, Carried>>>,
    lost: &CancellationToken,
) {
    let id = job.call_id;
    // The server checked the target with the same policy; the bridge checks again, so a server
    // that is not what it should be cannot make it dial anything else (or inject into SIP).
    let checked = settings.check_target(&job.to);
    let mut timeouts: CallTimeouts = settings.timeouts;
    timeouts.ring = timeouts.ring.min(Duration::from_secs(u64::from(
        job.ring_timeout_seconds.max(1),
    )));
    let target = checked
        .as_ref()
        .map_or_else(|_| job.to.clone(), Clone::clone);
    let info = CallInfo::starting(id, &job.room, 0, &target, settings.mode);
    let (info_tx, info_rx) = watch::channel(info);
    let hangup = CancellationToken::new();
    let call_lost = lost.child_token();
    let room = EdgeRoom::new(
        base.clone(),
        shared.http.clone(),
        job.room.clone(),
        job.join_token.clone(),
        shared.config.addresses.clone(),
        shared.metrics.clone(),
        call_lost.clone(),
    );
    let task = CallTask {
        agent: shared.agent.clone(),
        settings,
        id,
        target: target.clone(),
        timeouts,
        hangup: hangup.clone(),
        lost: call_lost,
        info: info_tx,
        metrics: shared.metrics.clone(),
        room,
    };
    tracing::info!(call = id, target = %target_hash(&target), "dialling for the conference");
    let reporter = tokio::spawn(report_call(
        shared.clone(),
        base.clone(),
        bridge_id,
        id,
        info_rx,
    ));
    let calls_ref = calls.clone();
    let handle = tokio::spawn(async move {
        match checked {
            Ok(_) => task.run().await,
            Err(e) => {
                tracing::warn!(call = id, error = %e, "a job's target was refused here; not dialled");
                task.info.send_modify(|i| i.end(EndReason::Rejected, None));
            }
        }
        // The last report goes out before the call is forgotten.
        let _ = tokio::time::timeout(REPORT_TIMEOUT * 2, reporter).await;
        lock(&calls_ref).remove(&id);
    });
    lock(calls).insert(
        id,
        Carried {
            hangup,
            task: handle,
        },
    );
}

/// Post every transition of call `id`, in order, until it has ended.
async fn report_call(
    shared: Arc<Shared>,
    base: reqwest::Url,
    bridge_id: u64,
    id: u64,
    mut info: watch::Receiver<CallInfo>,
) {
    let Ok(url) = base.join(&format!("/v1/telephony/edge/calls/{id}")) else {
        return;
    };
    // The first transition (dialing) is the server's own.
    let mut sent = 1;
    loop {
        let reports: Vec<CallReport> = {
            let i = info.borrow_and_update();
            i.events
                .iter()
                .skip(sent)
                .map(|t| CallReport {
                    bridge_id,
                    state: t.state,
                    sip_status: t.sip_status,
                    end_reason: t.end_reason,
                    routing: i.routing.clone(),
                    codec: i.codec.clone(),
                    encrypted: i.encrypted,
                    phone_participant_id: (t.state == CallState::Active)
                        .then_some(i.phone_participant_id)
                        .flatten(),
                })
                .collect()
        };
        for report in reports {
            sent += 1;
            let ended = report.state == CallState::Ended;
            if let Err(e) = post(&shared, &url, &report).await {
                tracing::info!(call = id, error = %e, "call report not delivered");
            }
            if ended {
                return;
            }
        }
        if info.changed().await.is_err() {
            return;
        }
    }
}
