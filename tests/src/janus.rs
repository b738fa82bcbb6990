//! Janus AudioBridge as the comparison peer of the benchmarks: the real Janus 1.1 server (Debian
//! `janus`, installed by `scripts/bootstrap`), driven through its own HTTP (REST) API, joined by
//! the same WebRTC [`Bot`]s that join Chorus.
//!
//! What this module provides:
//!
//! - [`JanusServer::start`] writes a private configuration folder into a fresh temporary directory
//!   (only the AudioBridge plugin and the HTTP transport, each through a symlink in a private
//!   plugins folder, so no other plugin or transport is loaded), starts `/usr/bin/janus` on it
//!   (optionally pinned to one CPU with `taskset`), waits until `GET /janus/info` answers with this
//!   instance's own server name, and kills the process when dropped. Janus' output goes to
//!   `janus.log` in that directory; a failed start reports its tail.
//! - [`JanusSession`]: one Janus API session. One background task long-polls the session's events
//!   (`GET /janus/<session>?maxev=100`) and hands each one to whoever waits for the transaction
//!   that caused it; another sends a keepalive every 20 s. Both stop when the session and every
//!   handle attached to it are gone. Many handles (hundreds of participants) share one session
//!   and one poll loop, and joins may run concurrently.
//! - [`JanusSession::join`]: attaches a handle to `janus.plugin.audiobridge`, and joins a [`Bot`]
//!   through [`Bot::join_with`]: the bot's offer goes out with the AudioBridge `join` request
//!   (non-trickle: the bot gathers every candidate first), and the `joined` event carrying the
//!   JSEP answer completes the negotiation. [`JanusParticipant::leave`] sends `leave`, detaches
//!   and closes the bot.
//!
//! # Jitter settings
//!
//! The AudioBridge's only receive-side buffer is its per-participant *prebuffer*: decoded frames
//! wait in a queue that the mixer pops once per tick. A participant joins the mix once more than
//! `prebuffer` packets are queued; after that, whenever `2 × prebuffer` or more are queued, the
//! oldest are dropped down to `prebuffer`. The room sets the default (`default_prebuffering` in
//! `create`, 6 when absent); a participant may override it (`prebuffer` in `join`). The maximum
//! is 50.
//!
//! Since the mixer pops one frame per tick and a sender adds one per 20 ms, the queue then stays
//! at about `prebuffer + 1` frames: that many 20 ms frames is the delay the buffer adds.
//!
//! - [`JanusJitter::Default`]: nothing is sent, so Janus' own default applies: **6 packets**. A
//!   participant is mixed once 7 are queued, the queue holds about 7 (~140 ms), and is trimmed
//!   back to 6 whenever it reaches 12.
//! - [`JanusJitter::Lowest`]: **1 packet** (`default_prebuffering: 1` for a room, `prebuffer: 1`
//!   for a participant): mixed once 2 are queued, the queue holds about 2 (~40 ms), and is trimmed
//!   back to 1 whenever it reaches 2. This is the lowest value that works: Janus accepts 0, but
//!   with 0 the trimming rule (`queue >= 0` always holds) drops every packet as it arrives, so
//!   the participant is never heard (tried: three bots in such a room hear digital silence).
//!   One more cost of Lowest: the mixer peeks at a participant's oldest frame to mix it, then pops
//!   the oldest frame again to subtract it from that participant's own mix; a packet arriving in
//!   between trims the mixed frame away, and the next one is subtracted instead. So a Lowest
//!   participant now and then hears a trace of itself (measured: in a few 2 s windows out of 37,
//!   its own tone ~35 dB below the others; never with the default).
//!
//! # What else to know about Janus
//!
//! - Janus never gathers ICE candidates on a loopback interface (its gathering code skips
//!   `IFF_LOOPBACK`, and `ice_enforce_list = "lo"` only makes libnice fall back to every other
//!   interface, IPv6 included). Its host candidates are on the machine's own non-loopback
//!   address, the `local-ip` of `GET /janus/info`. A bot bound to 127.0.0.1 never completes ICE
//!   with them (plain UDP between the two addresses works, but Janus reports ICE failed), so
//!   [`JanusSession::join`] binds bots to that address unless their [`BotConfig::bind`] says
//!   otherwise. Traffic to one's own address still stays inside the kernel (the `local` routing
//!   table sends it through `lo`), so this costs what loopback costs. A machine with no interface
//!   but `lo` cannot run Janus this way; [`JanusServer::start`] says so.
//! - The AudioBridge mixes every unmuted participant (no top-N), once per 20 ms tick on average:
//!   its mixer thread sleeps in 5 ms steps and mixes once 15 ms have passed since the last
//!   20 ms-aligned deadline, so ticks jitter by up to ~5 ms. Each participant gets the mix minus
//!   its own contribution, encoded for it alone (one Opus encode per participant per tick, even
//!   for listeners who all hear the same mix). The 32-bit sum is narrowed to 16 bits with no
//!   limiter or clamp. Measured here: about 1.3 % of a core per listener in a 48 kHz room with one
//!   speaker, so one core holds roughly 75 participants.
//! - Rooms are 16 kHz unless created otherwise; [`JanusSession::create_room`] asks for 48 kHz.
//! - The RFC 6464 audio-level extension is not required; when negotiated (the room default, and
//!   the bots offer it), packets marked 127 (digital silence) are decoded but not mixed.
//! - When Opus in-band FEC is negotiated (the bots offer `useinbandfec=1`), the first two packets
//!   of a participant are dropped unseen (a sequence-number probation) before decoding starts.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::bot::{Bot, BotConfig, BotReport};

/// The Janus binary of the Debian package.
pub const JANUS_BIN: &str = "/usr/bin/janus";
/// The AudioBridge plugin of the Debian package.
pub const AUDIOBRIDGE_PLUGIN_SO: &str =
    "/usr/lib/x86_64-linux-gnu/janus/plugins/libjanus_audiobridge.so";
/// The HTTP (REST) transport of the Debian package.
pub const HTTP_TRANSPORT_SO: &str = "/usr/lib/x86_64-linux-gnu/janus/transports/libjanus_http.so";
/// The AudioBridge's package name, as `attach` wants it.
pub const AUDIOBRIDGE: &str = "janus.plugin.audiobridge";
/// Janus 1.1's built-in `default_prebuffering` (packets), used when a room sets none.
pub const DEFAULT_PREBUFFERING: u32 = 6;
/// The lowest prebuffer (packets) with which a participant is still heard (see the module doc).
pub const LOWEST_PREBUFFERING: u32 = 1;
/// The room sampling rate asked for (Janus' default would be 16 kHz).
pub const ROOM_SAMPLING_RATE: u32 = 48_000;

/// How long Janus may take to answer `GET /janus/info` after starting.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one plain API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an asynchronous plugin request may take to produce its event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Janus answers an idle long poll after 30 s; give it some slack before calling it lost.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(45);
/// Sessions time out after 60 s without a request; keep ours alive well within that.
const KEEPALIVE_PERIOD: Duration = Duration::from_secs(20);
/// Events fetched per long poll: joins of many participants produce O(n²) notifications.
const MAX_EVENTS_PER_POLL: u32 = 100;
/// Consecutive failed polls after which the event loop gives up on the session.
const MAX_POLL_FAILURES: u32 = 5;
/// Attempts at starting Janus, in case another process takes the HTTP port we picked.
const START_ATTEMPTS: u32 = 3;

/// How [`JanusServer::start`] runs Janus.
#[derive(Debug, Clone)]
pub struct JanusOptions {
    /// Pin Janus to this CPU (`taskset -c`), so its CPU time can be compared with a pinned Chorus.
    pub cpu: Option<usize>,
    /// Janus' log level, 0-7 (4 = info, its default; 3 = warnings and errors only).
    pub debug_level: u8,
    /// The Janus binary ([`JANUS_BIN`] unless a test wants another).
    pub binary: PathBuf,
}

impl Default for JanusOptions {
    fn default() -> Self {
        JanusOptions {
            cpu: None,
            debug_level: 4,
            binary: PathBuf::from(JANUS_BIN),
        }
    }
}

/// The jitter (prebuffer) setting of a room or a participant; see the module doc for the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JanusJitter {
    /// Send nothing: Janus' own default of [`DEFAULT_PREBUFFERING`] packets (or, for a
    /// participant, the room's setting).
    #[default]
    Default,
    /// [`LOWEST_PREBUFFERING`] packet: the least buffering with which a participant is heard.
    Lowest,
}

impl JanusJitter {
    /// The prebuffer this setting means, in packets, when the room itself uses Janus' default.
    pub fn prebuffer_packets(self) -> u32 {
        match self {
            JanusJitter::Default => DEFAULT_PREBUFFERING,
            JanusJitter::Lowest => LOWEST_PREBUFFERING,
        }
    }

    /// The value to put in a request, if any (Default sends nothing).
    fn requested(self) -> Option<u32> {
        match self {
            JanusJitter::Default => None,
            JanusJitter::Lowest => Some(LOWEST_PREBUFFERING),
        }
    }
}

/// A running Janus, killed when dropped.
#[derive(Debug)]
pub struct JanusServer {
    child: Child,
    dir: PathBuf,
    base_url: String,
    local_ip: String,
}

impl JanusServer {
    /// Starts Janus with only the AudioBridge and the HTTP transport, on a free port of 127.0.0.1,
    /// and returns once its API answers. A missing Janus is an error naming `scripts/bootstrap`.
    pub async fn start(options: JanusOptions) -> Result<JanusServer> {
        check_installed(&options.binary)?;
        let mut attempt = 1;
        loop {
            let mut server = JanusServer::spawn(&options)?;
            match server.wait_until_ready().await {
                Ok(()) => return Ok(server),
                Err(err) => {
                    let log = server.log_tail(40);
                    // Someone took the port between our probe and Janus' bind: try another.
                    let port_taken = log.contains("Couldn't start webserver")
                        || format!("{err}").contains("answered by another server");
                    if port_taken && attempt < START_ATTEMPTS {
                        attempt += 1;
                        continue;
                    }
                    // The directory goes with `server`, so the log's tail goes into the error.
                    return Err(err.context(format!("Janus did not start; its log ends:\n{log}")));
                }
            }
        }
    }

    /// Writes the configuration into a fresh directory and starts the process.
    fn spawn(options: &JanusOptions) -> Result<JanusServer> {
        let dir = crate::unique_temp_dir("janus")?;
        let spawned = JanusServer::spawn_in(options, &dir);
        if spawned.is_err() {
            // Nothing runs in it; once a server exists, its Drop cleans up instead.
            let _ = std::fs::remove_dir_all(&dir);
        }
        spawned
    }

    fn spawn_in(options: &JanusOptions, dir: &Path) -> Result<JanusServer> {
        let dir = dir.to_path_buf();
        let port = crate::free_tcp_addr()?.port();
        // A name of our own, so the readiness check cannot mistake another server for ours.
        let server_name = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "chorus-janus".to_owned());
        // Janus knows levels 0-7.
        write_config(&dir, port, &server_name, options.debug_level.min(7))?;
        let log_path = dir.join("janus.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("cannot share {}", log_path.display()))?;
        let config_dir = dir.join("conf");
        let mut command = match options.cpu {
            Some(cpu) => {
                // taskset execs Janus, so the child's pid is Janus' own.
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu.to_string()).arg(&options.binary);
                command
            }
            None => Command::new(&options.binary),
        };
        command
            .arg("-F")
            .arg(&config_dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", options.binary.display()))?;
        Ok(JanusServer {
            child,
            dir,
            base_url: format!("http://127.0.0.1:{port}/janus"),
            local_ip: String::new(),
        })
    }

    /// Polls `GET /janus/info` until it answers with this instance's name and the AudioBridge.
    async fn wait_until_ready(&mut self) -> Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("cannot build the HTTP client")?;
        let expected_name = self
            .dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info_url = format!("{}/info", self.base_url);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_problem = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("cannot check on Janus")? {
                bail!("Janus exited during startup ({status})");
            }
            match client.get(&info_url).send().await {
                Ok(response) => match response.json::<Value>().await {
                    Ok(info) => {
                        ensure!(
                            info["server-name"] == expected_name.as_str(),
                            "{info_url} is answered by another server ({}), not the Janus we \
                             started",
                            info["server-name"]
                        );
                        ensure!(
                            info["plugins"].get(AUDIOBRIDGE).is_some(),
                            "Janus started without the AudioBridge plugin: {}",
                            info["plugins"]
                        );
                        let local_ip = info["local-ip"].as_str().unwrap_or_default().to_owned();
                        ensure!(
                            !local_ip.is_empty() && !local_ip.starts_with("127."),
                            "Janus found no network interface but loopback (local IP \
                             `{local_ip}`); it never gathers ICE candidates on loopback, so no \
                             bot could reach it"
                        );
                        self.local_ip = local_ip;
                        return Ok(());
                    }
                    Err(err) => last_problem = format!("unreadable answer: {err}"),
                },
                Err(err) => last_problem = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("GET {info_url} did not answer within {STARTUP_TIMEOUT:?}: {last_problem}")
    }

    /// The Janus API root, `http://127.0.0.1:PORT/janus`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The process id (Janus itself, also under `taskset`), e.g. for `/proc/<pid>/stat`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address Janus picked as its own (its ICE host candidates are on it).
    pub fn local_ip(&self) -> &str {
        &self.local_ip
    }

    /// The temporary directory holding the configuration and the log (removed on drop, unless
    /// the thread is panicking, so a failed test leaves the log behind).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Janus' stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("janus.log")
    }

    /// The last `lines` lines of Janus' log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A new API session on this server.
    pub async fn session(&self) -> Result<JanusSession> {
        JanusSession::connect(&self.base_url).await
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        // Killing an already exited process fails harmlessly; either way, reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Fails with a pointer to `scripts/bootstrap` when Janus or one of its parts is missing.
fn check_installed(binary: &Path) -> Result<()> {
    for path in [
        binary,
        Path::new(AUDIOBRIDGE_PLUGIN_SO),
        Path::new(HTTP_TRANSPORT_SO),
    ] {
        if !path.exists() {
            bail!(
                "Janus is not installed: {} is missing; run `scripts/bootstrap` (or `make \
                 bootstrap`) from {}, which installs the Debian package `janus`",
                path.display(),
                crate::workspace_root().display()
            );
        }
    }
    Ok(())
}

/// Writes `conf/` (janus.jcfg, the HTTP transport, the AudioBridge) and the private plugin,
/// transport, event-handler and logger folders under `dir`.
fn write_config(dir: &Path, port: u16, server_name: &str, debug_level: u8) -> Result<()> {
    let folder = |name: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(path)
    };
    let conf = folder("conf")?;
    let plugins = folder("plugins")?;
    let transports = folder("transports")?;
    // Empty: no event handler or logger is loaded (and Janus does not warn about the folders).
    let events = folder("events")?;
    let loggers = folder("loggers")?;
    // Janus loads every library in its plugin folders; these hold just the two we want.
    for (target, folder) in [
        (AUDIOBRIDGE_PLUGIN_SO, &plugins),
        (HTTP_TRANSPORT_SO, &transports),
    ] {
        let target = Path::new(target);
        let link = folder.join(target.file_name().unwrap_or(target.as_os_str()));
        std::os::unix::fs::symlink(target, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))?;
    }
    let janus = format!(
        r#"general: {{
	configs_folder = "{conf}"
	plugins_folder = "{plugins}"
	transports_folder = "{transports}"
	events_folder = "{events}"
	loggers_folder = "{loggers}"
	debug_level = {debug_level}
	debug_timestamps = true
	debug_colors = false
	server_name = "{server_name}"
	session_timeout = 60
	exit_on_dl_error = true
}}
certificates: {{
}}
media: {{
}}
nat: {{
	nice_debug = false
	ignore_mdns = true
	ice_ignore_list = "vmnet"
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
	broadcast = false
}}
"#,
        conf = conf.display(),
        plugins = plugins.display(),
        transports = transports.display(),
        events = events.display(),
        loggers = loggers.display(),
    );
    let http = format!(
        r#"general: {{
	json = "compact"
	base_path = "/janus"
	http = true
	port = {port}
	ip = "127.0.0.1"
	https = false
}}
admin: {{
	admin_http = false
	admin_https = false
}}
"#
    );
    // No static rooms: each test or benchmark creates its own.
    let audiobridge = "general: {\n\tevents = false\n}\n";
    for (name, text) in [
        ("janus.jcfg", janus.as_str()),
        ("janus.transport.http.jcfg", http.as_str()),
        ("janus.plugin.audiobridge.jcfg", audiobridge),
    ] {
        let path = conf.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent between statements; a panic elsewhere cannot break them.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the session's handles and its background tasks share.
#[derive(Debug)]
struct Shared {
    client: reqwest::Client,
    session_id: u64,
    session_url: String,
    next_transaction: AtomicU64,
    /// Who waits for the event of which transaction.
    waiters: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Why the event loop stopped, once it has.
    closed: Mutex<Option<String>>,
    /// Events nobody waited for (other participants joining and leaving, `webrtcup`, ...).
    unsolicited: AtomicU64,
}

impl Shared {
    fn transaction(&self) -> String {
        format!("t{}", self.next_transaction.fetch_add(1, Ordering::Relaxed))
    }

    /// POSTs a Janus API request; a `"janus": "error"` answer is an error.
    async fn post(&self, url: &str, request: &Value) -> Result<Value> {
        let response = self
            .client
            .post(url)
            .json(request)
            .send()
            .await
            .with_context(|| format!("POST {url} failed"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("POST {url}: cannot read the answer"))?;
        ensure!(status.is_success(), "POST {url} answered {status}: {text}");
        let reply: Value = serde_json::from_str(&text)
            .with_context(|| format!("POST {url} answered with invalid JSON: {text}"))?;
        if reply["janus"] == "error" {
            bail!("{}", janus_error(&reply));
        }
        Ok(reply)
    }

    /// Registers interest in the event of `transaction`, before the request goes out (the event
    /// may be polled before the request's own answer arrives).
    fn wait_for(self: &Arc<Self>, transaction: &str) -> Result<Waiter> {
        if let Some(reason) = lock(&self.closed).as_ref() {
            bail!("the Janus session {} is gone: {reason}", self.session_id);
        }
        let (sender, receiver) = oneshot::channel();
        lock(&self.waiters).insert(transaction.to_owned(), sender);
        Ok(Waiter {
            shared: Arc::clone(self),
            transaction: transaction.to_owned(),
            receiver: Some(receiver),
        })
    }

    fn dispatch(&self, event: Value) {
        if event["janus"] == "keepalive" {
            return;
        }
        let waiter = event["transaction"]
            .as_str()
            .and_then(|transaction| lock(&self.waiters).remove(transaction));
        match waiter {
            // A waiter that gave up (timed out) drops its receiver; nothing to do then.
            Some(waiter) => drop(waiter.send(event)),
            None => {
                self.unsolicited.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Stops the session: every current and future waiter fails with `reason`.
    fn close(&self, reason: String) {
        *lock(&self.closed) = Some(reason);
        // Dropping the senders wakes the waiters with an error.
        lock(&self.waiters).clear();
    }

    fn closed_reason(&self) -> String {
        lock(&self.closed)
            .clone()
            .unwrap_or_else(|| "the event loop stopped".to_owned())
    }
}

/// One registered wait for a transaction's event; unregisters itself when dropped.
struct Waiter {
    shared: Arc<Shared>,
    transaction: String,
    receiver: Option<oneshot::Receiver<Value>>,
}

impl Waiter {
    async fn event(mut self) -> Result<Value> {
        let receiver = self
            .receiver
            .take()
            .ok_or_else(|| anyhow!("the event of {} was already taken", self.transaction))?;
        match tokio::time::timeout(EVENT_TIMEOUT, receiver).await {
            Ok(Ok(event)) => Ok(event),
            Ok(Err(_)) => bail!(
                "no event for transaction {}: {}",
                self.transaction,
                self.shared.closed_reason()
            ),
            Err(_) => bail!(
                "no event for transaction {} within {EVENT_TIMEOUT:?}",
                self.transaction
            ),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        lock(&self.shared.waiters).remove(&self.transaction);
    }
}

/// `Janus error CODE: REASON` from a `"janus": "error"` answer or event.
fn janus_error(reply: &Value) -> String {
    format!(
        "Janus error {}: {}",
        reply["error"]["code"],
        reply["error"]["reason"]
            .as_str()
            .unwrap_or("(no reason given)")
    )
}

/// The plugin's data of an answer or event; an AudioBridge `error_code` is an error.
fn plugin_data(reply: &Value) -> Result<Value> {
    if reply["janus"] == "error" {
        bail!("{}", janus_error(reply));
    }
    let data = &reply["plugindata"]["data"];
    ensure!(
        data.is_object(),
        "Janus answered without plugin data: {reply}"
    );
    if let Some(code) = data.get("error_code") {
        bail!(
            "AudioBridge error {code}: {}",
            data["error"].as_str().unwrap_or("(no reason given)")
        );
    }
    Ok(data.clone())
}

/// Aborts the session's background tasks once the session and all its handles are gone.
#[derive(Debug)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Long-polls the session's events and dispatches them, until the session is gone.
async fn poll_events(shared: Arc<Shared>) {
    let url = format!("{}?maxev={MAX_EVENTS_PER_POLL}", shared.session_url);
    let mut failures = 0;
    loop {
        let polled = async {
            let response = shared
                .client
                .get(&url)
                .timeout(LONG_POLL_TIMEOUT)
                .send()
                .await?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let events = response.error_for_status()?.json::<Value>().await?;
            Ok::<_, reqwest::Error>(Some(events))
        }
        .await;
        match polled {
            Ok(Some(Value::Array(events))) => {
                failures = 0;
                for event in events {
                    shared.dispatch(event);
                }
            }
            Ok(Some(event)) => {
                failures = 0;
                shared.dispatch(event);
            }
            Ok(None) => {
                shared.close(format!(
                    "Janus no longer knows session {}",
                    shared.session_id
                ));
                return;
            }
            Err(err) => {
                failures += 1;
                if failures >= MAX_POLL_FAILURES {
                    shared.close(format!("polling GET {url} failed {failures} times: {err}"));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200) * failures).await;
            }
        }
    }
}

/// Sends a session keepalive every [`KEEPALIVE_PERIOD`].
async fn keep_alive(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(KEEPALIVE_PERIOD);
    ticker.tick().await; // the first tick is immediate; the session was just created
    loop {
        ticker.tick().await;
        let request = json!({"janus": "keepalive", "transaction": shared.transaction()});
        // A lost keepalive is retried next period; a dead server shows in the poll loop.
        let _ = shared.post(&shared.session_url, &request).await;
    }
}

/// A Janus API session with its event loop; see the module doc.
#[derive(Debug)]
pub struct JanusSession {
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
    /// Janus' own address (`local-ip`), where its ICE candidates are; bots bind to it.
    local_ip: Option<String>,
    /// The handle for room management (`create`, `listparticipants`, `destroy`).
    control: JanusHandle,
}

impl JanusSession {
    /// Creates a session on the Janus API at `base_url` (`http://HOST:PORT/janus`) and attaches
    /// a control handle to the AudioBridge.
    pub async fn connect(base_url: &str) -> Result<JanusSession> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        let info: Value = client
            .get(format!("{base_url}/info"))
            .send()
            .await
            .with_context(|| format!("GET {base_url}/info failed"))?
            .json()
            .await
            .with_context(|| format!("GET {base_url}/info: unreadable answer"))?;
        let local_ip = info["local-ip"]
            .as_str()
            .filter(|ip| !ip.is_empty() && !ip.starts_with("127."))
            .map(str::to_owned);
        let created: Value = {
            let response = client
                .post(&base_url)
                .json(&json!({"janus": "create", "transaction": "create"}))
                .send()
                .await
                .with_context(|| format!("POST {base_url} (create session) failed"))?;
            response
                .json()
                .await
                .with_context(|| format!("POST {base_url} (create session): unreadable answer"))?
        };
        if created["janus"] == "error" {
            bail!("creating a session failed: {}", janus_error(&created));
        }
        let session_id = created["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("creating a session answered without an id: {created}"))?;
        let shared = Arc::new(Shared {
            client,
            session_id,
            session_url: format!("{base_url}/{session_id}"),
            next_transaction: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            unsolicited: AtomicU64::new(0),
        });
        let tasks = Arc::new(Tasks(vec![
            tokio::spawn(poll_events(Arc::clone(&shared))),
            tokio::spawn(keep_alive(Arc::clone(&shared))),
        ]));
        let control = attach(&shared, &tasks).await?;
        Ok(JanusSession {
            shared,
            tasks,
            local_ip,
            control,
        })
    }

    /// The Janus session id.
    pub fn id(&self) -> u64 {
        self.shared.session_id
    }

    /// Events that arrived with nobody waiting for them (notifications about other
    /// participants, `webrtcup`, `media`, `hangup`, ...), so far.
    pub fn unsolicited_events(&self) -> u64 {
        self.shared.unsolicited.load(Ordering::Relaxed)
    }

    /// Attaches a new handle to the AudioBridge (one per participant: one PeerConnection each).
    pub async fn attach(&self) -> Result<JanusHandle> {
        attach(&self.shared, &self.tasks).await
    }

    /// Creates a 48 kHz room with no talking events and no recording, with the given jitter
    /// setting as its `default_prebuffering`; returns the room id Janus chose.
    pub async fn create_room(&self, jitter: JanusJitter) -> Result<u64> {
        let mut request = json!({
            "request": "create",
            "description": "chorus benchmark",
            "sampling_rate": ROOM_SAMPLING_RATE,
            "audiolevel_event": false,
            "record": false,
        });
        if let Some(packets) = jitter.requested() {
            request["default_prebuffering"] = json!(packets);
        }
        let data = self
            .control
            .request(request)
            .await
            .context("creating an AudioBridge room")?;
        ensure!(
            data["audiobridge"] == "created",
            "creating a room answered {data}"
        );
        data["room"]
            .as_u64()
            .ok_or_else(|| anyhow!("creating a room answered without a room id: {data}"))
    }

    /// The room's participants as the AudioBridge lists them (`id`, `display`, `muted`, ...).
    pub async fn list_participants(&self, room: u64) -> Result<Vec<Value>> {
        let data = self
            .control
            .request(json!({"request": "listparticipants", "room": room}))
            .await
            .with_context(|| format!("listing the participants of room {room}"))?;
        data["participants"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("listparticipants answered without participants: {data}"))
    }

    /// Destroys a room (its participants are kicked out).
    pub async fn destroy_room(&self, room: u64) -> Result<()> {
        self.control
            .request(json!({"request": "destroy", "room": room}))
            .await
            .with_context(|| format!("destroying room {room}"))?;
        Ok(())
    }

    /// The address Janus reported as its own (`local-ip`), where its ICE candidates are.
    pub fn local_ip(&self) -> Option<&str> {
        self.local_ip.as_deref()
    }

    /// Joins `room` as `display` with a bot made from `config`, over real WebRTC. `jitter`
    /// Lowest sends `prebuffer: 1` with the join; Default sends none (the room's setting holds).
    /// A bot with no [`BotConfig::bind`] binds to Janus' [`local_ip`](Self::local_ip) (see the
    /// module doc for why not 127.0.0.1).
    pub async fn join(
        &self,
        room: u64,
        display: &str,
        jitter: JanusJitter,
        mut config: BotConfig,
    ) -> Result<JanusParticipant> {
        if config.bind.is_none() {
            config.bind = self.local_ip.as_ref().map(|ip| format!("{ip}:0"));
        }
        let handle = self.attach().await?;
        let mut request = json!({
            "request": "join",
            "room": room,
            "display": display,
            "muted": false,
        });
        if let Some(packets) = jitter.requested() {
            request["prebuffer"] = json!(packets);
        }
        let (id_sender, mut id_receiver) = oneshot::channel();
        let handle_ref = &handle;
        let joined = Bot::join_with(config, move |offer| async move {
            // The bot has gathered all its candidates: no trickle to wait for.
            let jsep = json!({"type": "offer", "sdp": offer, "trickle": false});
            let event = handle_ref.request_with_event(request, Some(jsep)).await?;
            ensure!(
                event.data["audiobridge"] == "joined",
                "join answered {}",
                event.data
            );
            let id = event.data["id"]
                .as_u64()
                .ok_or_else(|| anyhow!("the joined event has no participant id: {}", event.data))?;
            let jsep = event
                .jsep
                .ok_or_else(|| anyhow!("the joined event carries no SDP answer"))?;
            ensure!(
                jsep["type"] == "answer",
                "Janus sent {jsep} instead of an answer"
            );
            let answer = jsep["sdp"]
                .as_str()
                .ok_or_else(|| anyhow!("the answer has no SDP: {jsep}"))?
                .to_owned();
            // The receiver lives until after join_with returns; a failed send cannot happen.
            let _ = id_sender.send(id);
            Ok(answer)
        })
        .await;
        let bot = match joined {
            Ok(bot) => bot,
            Err(err) => {
                // Best effort: the handle is useless now, and the error that matters is `err`.
                let _ = handle.detach().await;
                return Err(err.context(format!("joining Janus room {room} as {display}")));
            }
        };
        let id = id_receiver
            .try_recv()
            .context("the bot joined without Janus naming the participant")?;
        Ok(JanusParticipant {
            bot,
            id,
            room,
            handle,
        })
    }

    /// Destroys the session on the server (its handles hang up) and stops its event loop.
    pub async fn destroy(self) -> Result<()> {
        let request = json!({"janus": "destroy", "transaction": self.shared.transaction()});
        self.shared
            .post(&self.shared.session_url, &request)
            .await
            .with_context(|| format!("destroying Janus session {}", self.shared.session_id))?;
        Ok(())
    }
}

/// Attaches a handle to the AudioBridge.
async fn attach(shared: &Arc<Shared>, tasks: &Arc<Tasks>) -> Result<JanusHandle> {
    let request = json!({
        "janus": "attach",
        "plugin": AUDIOBRIDGE,
        "transaction": shared.transaction(),
    });
    let reply = shared
        .post(&shared.session_url, &request)
        .await
        .context("attaching to the AudioBridge")?;
    let id = reply["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("attach answered without a handle id: {reply}"))?;
    Ok(JanusHandle {
        shared: Arc::clone(shared),
        _tasks: Arc::clone(tasks),
        id,
        url: format!("{}/{id}", shared.session_url),
    })
}

/// An asynchronous event of a plugin request.
#[derive(Debug, Clone)]
pub struct JanusEvent {
    /// The plugin's data (`plugindata.data`), e.g. `{"audiobridge": "joined", ...}`.
    pub data: Value,
    /// The JSEP (SDP offer or answer) the event carries, if any.
    pub jsep: Option<Value>,
}

/// A handle attached to the AudioBridge (keeps its session's event loop alive).
#[derive(Debug)]
pub struct JanusHandle {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
    id: u64,
    url: String,
}

impl JanusHandle {
    /// The Janus handle id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A synchronous plugin request (`create`, `listparticipants`, ...): returns the plugin's
    /// data; an AudioBridge `error_code` is an error.
    pub async fn request(&self, body: Value) -> Result<Value> {
        let name = body["request"].clone();
        let request = json!({
            "janus": "message",
            "transaction": self.shared.transaction(),
            "body": body,
        });
        let reply = self
            .shared
            .post(&self.url, &request)
            .await
            .with_context(|| format!("AudioBridge request {name}"))?;
        plugin_data(&reply).with_context(|| format!("AudioBridge request {name}"))
    }

    /// An asynchronous plugin request (`join`, `leave`, `configure`), optionally with a JSEP:
    /// returns the event it produced.
    pub async fn request_with_event(&self, body: Value, jsep: Option<Value>) -> Result<JanusEvent> {
        let name = body["request"].clone();
        let transaction = self.shared.transaction();
        let waiter = self.shared.wait_for(&transaction)?;
        let mut request = json!({
            "janus": "message",
            "transaction": transaction,
            "body": body,
        });
        if let Some(jsep) = jsep {
            request["jsep"] = jsep;
        }
        let reply = self
            .shared
            .post(&self.url, &request)
            .await
            .with_context(|| format!("AudioBridge request {name}"))?;
        // Requests are acknowledged and answered by an event, unless the plugin refused them on
        // the spot, which it answers synchronously.
        let event = if reply["janus"] == "ack" {
            waiter
                .event()
                .await
                .with_context(|| format!("AudioBridge request {name}"))?
        } else {
            reply
        };
        let data = plugin_data(&event).with_context(|| format!("AudioBridge request {name}"))?;
        let jsep = event.get("jsep").cloned();
        Ok(JanusEvent { data, jsep })
    }

    /// Detaches the handle (hanging up its PeerConnection, if any).
    pub async fn detach(&self) -> Result<()> {
        let request = json!({"janus": "detach", "transaction": self.shared.transaction()});
        self.shared
            .post(&self.url, &request)
            .await
            .with_context(|| format!("detaching handle {}", self.id))?;
        Ok(())
    }
}

/// A bot in an AudioBridge room. Derefs to its [`Bot`].
#[derive(Debug)]
pub struct JanusParticipant {
    /// The WebRTC participant.
    pub bot: Bot,
    /// Its AudioBridge participant id.
    pub id: u64,
    /// Its room.
    pub room: u64,
    handle: JanusHandle,
}

impl Deref for JanusParticipant {
    type Target = Bot;

    fn deref(&self) -> &Bot {
        &self.bot
    }
}

impl JanusParticipant {
    /// The Janus handle id of its PeerConnection.
    pub fn handle_id(&self) -> u64 {
        self.handle.id
    }

    /// Leaves: the AudioBridge `leave` request, detaching the handle, then [`Bot::leave`].
    /// Janus' complaints become warnings in the report, as the bot's own do.
    pub async fn leave(self, freqs_hz: &[f64]) -> Result<BotReport> {
        let mut problems = Vec::new();
        if let Err(err) = self
            .handle
            .request_with_event(json!({"request": "leave"}), None)
            .await
        {
            problems.push(format!("{err:#}"));
        }
        if let Err(err) = self.handle.detach().await {
            problems.push(format!("{err:#}"));
        }
        let mut report = self.bot.leave(freqs_hz).await?;
        report.warnings.extend(problems);
        Ok(report)
    }
}
