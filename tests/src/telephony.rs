//! Telephony test peers for the "call me" feature: a call manager (Kamailio), desk phones
//! (baresip) and scripted phones and callers (SIPp), all on 127.0.0.1, plus the audio checks
//! that tell what a phone heard.
//!
//! Every peer is a real program from a Debian package that `scripts/bootstrap` installs
//! (`kamailio`, `kamailio-tls-modules`, `sip-tester`, `baresip-core`). A missing one is an error
//! saying so, never a skipped test. Each instance gets its own temporary directory, its own free
//! ports (so test binaries can run in parallel), and its own log file; a failed start reports the
//! log's path and tail. Every process is killed when its handle drops, and the directory removed
//! unless the thread is panicking or `CHORUS_KEEP_TELEPHONY` is set ([`KEEP_ENV`]: a test that
//! returns an error drops its peers normally, so set it to read their logs afterwards).
//!
//! - [`Kamailio`]: registrar (bindings in memory) and stateful proxy with Record-Route, from
//!   `tests/telephony/kamailio.cfg`. Digest accounts live in a run-time table: `chorus` /
//!   `chorus-secret` (the media server's account) and `1001`..`1004` with password `phone100N`
//!   ([`phone_password`]). REGISTER is challenged with 401; INVITE from a known account with 407.
//!   A call to a user with no binding gets `404 Not Registered`; a bound phone that sends nothing
//!   back gets 408 after 3 s (`fr_timer`). UDP and TCP share one port, TLS has another (a
//!   certificate made per run with `rcgen`). [`Kamailio::refuse_binding_query`] makes it answer
//!   a REGISTER without Contact (a binding query) for one account with `403 Query Refused`.
//! - [`Baresip`]: a desk phone registered as `100N`, over UDP, TCP or TLS (optionally with
//!   mandatory SDES-SRTP), answering automatically, after a delay, or on [`Baresip::accept`],
//!   playing a WAV (a generated tone by default) and recording what it hears to a WAV
//!   ([`Baresip::recording`]). Driven over its `ctrl_tcp` socket: dial, hangup, accept, quit, and
//!   its events (`CALL_INCOMING`, `CALL_ESTABLISHED`, `CALL_CLOSED`, ...).
//! - [`Sipp`]: SIPp scenarios from `tests/telephony/sipp/`: phones ([`Sipp::phone`]: busy,
//!   decline, no answer, hang-up, DTMF, silent, talk) registered by a second SIPp process, and
//!   callers ([`Sipp::call`]). SIPp's exit status is the verdict ([`Sipp::wait`]).
//! - Audio analysis: [`tone_levels`], [`dominant_tone`], [`wav_rms_dbfs`] (Goertzel from
//!   `chorus_mediaserver::media::spectrum`), and [`write_tone_wav`].
//!
//! # Blocking and async
//!
//! Starting peers and the `kamcmd`/`ctrl_tcp` commands block for a few milliseconds at most
//! (only the peer and Kamailio take part). Waiting for something the *other* party of a call
//! does ([`Sipp::wait`], [`Baresip::wait_event`]) is `async`: in a `#[tokio::test]` the media
//! server under test often runs on the same (current-thread) runtime, and blocking it there
//! would deadlock the call. [`Sipp::wait_blocking`] is for tests without a runtime.
//!
//! # Traps (each cost time; see also the comments in the fixture files)
//!
//! - Kamailio: no `alias="127.0.0.1"` without a port, or every `127.0.0.1:*` URI is "myself"
//!   and in-dialog requests to phones on 127.0.0.1 fail `loose_route()` with 404.
//! - baresip: the WAV for `aufile` must have the codec's rate and channels (8 kHz mono for
//!   G.711, 48 kHz stereo for `opus/48000/2`; [`Codec::wav_format`]); `ctrl_tcp` serves one
//!   connection at a time (a new one silently takes the events away from the old), so this
//!   module keeps exactly one; `quit` stops it politely (a lone SIGTERM may hang). Its `sndfile`
//!   module names recordings `dump-YYYY-MM-DD-HH-MM-SS-{dec,enc}.wav` (dec = heard, enc = sent):
//!   two calls starting within the same second share a name, the second overwriting the first
//!   (so the newest file is still the latest call's). A call on which no RTP arrived leaves an
//!   empty recording.
//!   The WAV header gets its length when the call ends. baresip 1.0 has no answer delay of its
//!   own; [`Answer::After`] accepts over `ctrl_tcp` once `CALL_INCOMING` has been seen.
//! - SIPp: one process cannot REGISTER and then take an INVITE with a new Call-ID, so a phone is
//!   two processes (`register.xml`, then a UAS-only process whose port the Contact names). A
//!   response code cannot be a `[key]`: `uac_reject.xml` gets its `@STATUS@` written in.
//!   `rtp_stream` files must exist when the scenario loads. A 487 must carry every Via of the
//!   INVITE (`phone_noanswer.xml`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chorus_mediaserver::media::spectrum::{goertzel_amplitude, rms_dbfs};
use serde_json::{Value, json};

/// The Kamailio binary of the Debian package `kamailio`.
pub const KAMAILIO_BIN: &str = "/usr/sbin/kamailio";
/// Kamailio's control tool (same package).
pub const KAMCMD_BIN: &str = "/usr/sbin/kamcmd";
/// Kamailio's TLS module (package `kamailio-tls-modules`).
pub const KAMAILIO_TLS_MODULE: &str = "/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so";
/// The baresip binary of the Debian package `baresip-core`.
pub const BARESIP_BIN: &str = "/usr/bin/baresip";
/// baresip's modules (same package).
pub const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";
/// The SIPp binary of the Debian package `sip-tester`.
pub const SIPP_BIN: &str = "/usr/bin/sipp";
/// RFC 4733 DTMF captures shipped with SIPp: `dtmf_2833_<digit>.pcap`.
pub const SIPP_DTMF_PCAPS: &str = "/usr/share/sip-tester";

/// The media server's account on the call manager.
pub const CHORUS_USER: &str = "chorus";
/// Its password.
pub const CHORUS_PASSWORD: &str = "chorus-secret";
/// The phone accounts the configuration creates (passwords from [`phone_password`]).
pub const PHONE_USERS: [&str; 4] = ["1001", "1002", "1003", "1004"];

/// How long Kamailio may take to answer `core.uptime` (it usually takes well under a second).
const KAMAILIO_STARTUP: Duration = Duration::from_secs(10);
/// How long a baresip may take to open its control socket and register.
const BARESIP_STARTUP: Duration = Duration::from_secs(10);
/// How long a `ctrl_tcp` command may take to be answered.
const CTRL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process may take to exit after a polite request, before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long SIPp's registration of a phone may take.
const SIPP_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// SIPp's own global timeout (`-timeout`): no scenario here should run longer.
const SIPP_GLOBAL_TIMEOUT: Duration = Duration::from_secs(150);
/// Start attempts, in case another process takes a port between our probe and the bind.
const START_ATTEMPTS: u32 = 3;
/// Polling period of every wait in this module.
const POLL: Duration = Duration::from_millis(25);
/// Recordings are analysed from this point on: the first packets carry codec warm-up and the
/// jitter buffer filling.
const SKIP_START: Duration = Duration::from_millis(300);
/// Goertzel block length: short enough that a lost packet's phase jump costs one block only.
const BLOCK: Duration = Duration::from_millis(200);
/// A tone quieter than this is not "heard" by [`dominant_tone`]. The generated tones are at
/// -6 dBFS; G.711 and Opus carry them within a dB or two.
pub const HEARD_DBFS: f64 = -40.0;

/// The password of phone account `user` in the shipped configuration (`phone1001` for `1001`).
pub fn phone_password(user: &str) -> String {
    format!("phone{user}")
}

/// The directory of the fixture files: `tests/telephony` in this crate.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("telephony")
}

// ------------------------------------------------------------------------------------------------
// Kamailio
// ------------------------------------------------------------------------------------------------

/// A running Kamailio (registrar + proxy) on its own ports, stopped when dropped.
#[derive(Debug)]
pub struct Kamailio {
    child: Option<Child>,
    dir: PathBuf,
    sip_port: u16,
    tls_port: u16,
}

impl Kamailio {
    /// Starts Kamailio with `tests/telephony/kamailio.cfg` on free ports of 127.0.0.1 and
    /// returns once `kamcmd core.uptime` answers.
    pub fn start() -> Result<Kamailio> {
        let mut kamailio = Self::prepared()?;
        let mut attempt = 1;
        loop {
            kamailio.sip_port = free_port_both()?;
            kamailio.tls_port = crate::free_tcp_addr()?.port();
            match kamailio.spawn_and_wait() {
                Ok(()) => return Ok(kamailio),
                Err(err) => {
                    let log = kamailio.log();
                    let port_taken =
                        log.contains("Address already in use") || log.contains("bind(");
                    if port_taken && attempt < START_ATTEMPTS {
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Starts Kamailio on fixed ports of 127.0.0.1 (`make demo`'s call manager on 5060), once:
    /// a port in use is an error.
    pub fn start_on(sip_port: u16, tls_port: u16) -> Result<Kamailio> {
        let mut kamailio = Self::prepared()?;
        kamailio.sip_port = sip_port;
        kamailio.tls_port = tls_port;
        kamailio.spawn_and_wait()?;
        Ok(kamailio)
    }

    /// A run directory with its certificate, nothing started yet.
    fn prepared() -> Result<Kamailio> {
        for tool in [KAMAILIO_BIN, KAMCMD_BIN, KAMAILIO_TLS_MODULE] {
            require_installed(tool, "kamailio and kamailio-tls-modules")?;
        }
        let dir = crate::unique_temp_dir("kamailio")?;
        write_certificate(&dir)?;
        Ok(Kamailio {
            child: None,
            dir,
            sip_port: 0,
            tls_port: 0,
        })
    }

    /// Starts the process on the current ports and waits until it answers.
    fn spawn_and_wait(&mut self) -> Result<()> {
        self.stop();
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let cfg = fixtures_dir().join("kamailio.cfg");
        let define = |name: &str, value: String| format!("{name}={value}");
        let mut command = Command::new(KAMAILIO_BIN);
        command
            .arg("-f")
            .arg(&cfg)
            .args(["-DD", "-E", "-m", "32", "-M", "4"])
            .arg("-P")
            .arg(self.dir.join("kamailio.pid"))
            .arg("-A")
            .arg(define("SIP_PORT", self.sip_port.to_string()))
            .arg("-A")
            .arg(define("TLS_PORT", self.tls_port.to_string()))
            .arg("-A")
            .arg(define("TLS_CERT", quoted(&self.cert_path())))
            .arg("-A")
            .arg(define("TLS_KEY", quoted(&self.key_path())))
            .arg("-A")
            .arg(define("CTL_SOCK", format!("\"{}\"", self.ctl_socket())))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Kamailio forks workers, and Drop stops them all.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {KAMAILIO_BIN}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + KAMAILIO_STARTUP;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("cannot check on kamailio")?
            {
                self.child = None;
                bail!(
                    "kamailio exited during startup ({status}); log {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, 30)
                );
            }
            if self.kamcmd(&["core.uptime"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kamailio did not answer `kamcmd core.uptime` within {KAMAILIO_STARTUP:?}; \
                     log {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, 30)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops Kamailio (SIGTERM to its process group, which it passes on to its workers; SIGKILL
    /// to the group after `STOP_GRACE`) and starts it again on the same ports and files. Every
    /// binding and every account added at run time is gone afterwards.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn_and_wait()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(POLL);
        }
        // Whatever is left of the group (normally nothing).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The UDP address (`127.0.0.1:PORT`).
    pub fn udp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sip_port))
    }

    /// The TCP address: the same port as UDP.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.udp_addr()
    }

    /// The TLS address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port))
    }

    /// The proxy's URI, `sip:127.0.0.1:PORT` (UDP or TCP).
    pub fn uri(&self) -> String {
        format!("sip:{}", self.udp_addr())
    }

    /// The proxy's TLS URI, `sip:127.0.0.1:PORT;transport=tls`.
    pub fn tls_uri(&self) -> String {
        format!("sip:{};transport=tls", self.tls_addr())
    }

    /// The URI that reaches `user` through this proxy, `sip:USER@127.0.0.1:PORT`.
    pub fn user_uri(&self, user: &str) -> String {
        format!("sip:{user}@{}", self.udp_addr())
    }

    /// The domain of accounts (`From`/`To` host and digest realm): `127.0.0.1`.
    pub fn domain(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The self-signed certificate (PEM) Kamailio serves on TLS, for clients' CA lists.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// Its private key (PEM).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The control socket, `unix:/…/kamailio_ctl`, for `kamcmd -s`.
    pub fn ctl_socket(&self) -> String {
        format!("unix:{}", self.dir.join("kamailio_ctl").display())
    }

    /// Kamailio's stderr (`-E`): start-up, `xlog` lines of the routing script, errors.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kamailio.log")
    }

    /// The log's contents so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The temporary directory of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The main process' id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `kamcmd -s <ctl> ARGS...` and returns its output; failure carries its stderr. String
    /// arguments that look like numbers need kamcmd's `s:` prefix (`s:1001`).
    pub fn kamcmd(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(KAMCMD_BIN)
            .arg("-s")
            .arg(self.ctl_socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {KAMCMD_BIN}"))?;
        ensure!(
            output.status.success(),
            "kamcmd {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kamcmd ul.dump`: every binding of the location table.
    pub fn ul_dump(&self) -> Result<String> {
        self.kamcmd(&["ul.dump"])
    }

    /// The contact addresses bound to `user` (empty when it is not registered).
    pub fn contacts(&self, user: &str) -> Result<Vec<String>> {
        Ok(parse_contacts(&self.ul_dump()?, user))
    }

    /// Whether `user` has at least one binding.
    pub fn is_registered(&self, user: &str) -> Result<bool> {
        Ok(!self.contacts(user)?.is_empty())
    }

    /// Polls the location table until a contact of `user` satisfies `accept`; returns the
    /// contacts then.
    pub fn wait_contact(
        &self,
        user: &str,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let contacts = self.contacts(user)?;
            if contacts.iter().any(|c| accept(c)) {
                return Ok(contacts);
            }
            if Instant::now() > deadline {
                bail!(
                    "{user} has no matching binding after {timeout:?} (contacts: {contacts:?}); \
                     kamailio log {}",
                    self.log_path().display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Adds (or changes) account `user` with `password`, effective at once.
    pub fn add_user(&self, user: &str, password: &str) -> Result<()> {
        self.kamcmd(&[
            "htable.sets",
            "users",
            &format!("s:{user}"),
            &format!("s:{password}"),
        ])
        .map(drop)
    }

    /// Removes account `user`: its REGISTERs are refused and its INVITEs pass unchallenged.
    pub fn remove_user(&self, user: &str) -> Result<()> {
        self.kamcmd(&["htable.delete", "users", &format!("s:{user}")])
            .map(drop)
    }

    /// Removes every binding of `user` (a phone that vanished without unregistering stays bound
    /// otherwise, and calls fork to it). No binding is not an error.
    pub fn unregister(&self, user: &str) -> Result<()> {
        match self.kamcmd(&["ul.rm", "location", &format!("s:{user}")]) {
            Ok(_) => Ok(()),
            Err(err) if format!("{err:#}").contains("not found") => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Removes one binding of `user`: `contact` as [`Kamailio::contacts`] lists it.
    pub fn remove_contact(&self, user: &str, contact: &str) -> Result<()> {
        self.kamcmd(&[
            "ul.rm_contact",
            "location",
            &format!("s:{user}"),
            &format!("s:{contact}"),
        ])
        .map(drop)
    }

    /// From now on, a binding query (REGISTER without Contact) of `user` gets `403 Query
    /// Refused` (after authentication), as from a call manager that hides where phones are.
    pub fn refuse_binding_query(&self, user: &str) -> Result<()> {
        self.kamcmd(&["htable.seti", "noquery", &format!("s:{user}"), "1"])
            .map(drop)
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        self.stop();
        remove_run_dir(&self.dir);
    }
}

/// `"…"`: a Kamailio string define.
fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// Writes `cert.pem` (self-signed, SAN 127.0.0.1 and localhost), `key.pem` and `both.pem` (the
/// two together, as baresip wants its own certificate) into `dir`.
fn write_certificate(dir: &Path) -> Result<()> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .context("cannot generate the TLS certificate")?;
    let cert = certified.cert.pem();
    let key = certified.signing_key.serialize_pem();
    for (name, text) in [
        ("cert.pem", cert.clone()),
        ("key.pem", key.clone()),
        ("both.pem", format!("{cert}{key}")),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The `Address:` lines under `AoR: <user>` in `kamcmd ul.dump` output.
fn parse_contacts(dump: &str, user: &str) -> Vec<String> {
    let mut current: Option<&str> = None;
    let mut contacts = Vec::new();
    for line in dump.lines().map(str::trim) {
        if let Some(aor) = line.strip_prefix("AoR: ") {
            current = Some(aor);
        } else if let Some(address) = line.strip_prefix("Address: ")
            && current == Some(user)
        {
            contacts.push(address.to_owned());
        }
    }
    contacts
}

// ------------------------------------------------------------------------------------------------
// baresip
// ------------------------------------------------------------------------------------------------

/// The SIP transport a [`Baresip`] registers and calls over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SipTransport {
    /// UDP to Kamailio's [`Kamailio::udp_addr`].
    #[default]
    Udp,
    /// TCP to [`Kamailio::tcp_addr`].
    Tcp,
    /// TLS to [`Kamailio::tls_addr`] (Kamailio's certificate as the CA).
    Tls,
}

/// When a [`Baresip`] answers an incoming call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Answer {
    /// At once (`answermode=auto`): no 180, straight to 200.
    #[default]
    Auto,
    /// Never by itself: it rings (180) until [`Baresip::accept`] or the caller gives up.
    Manual,
    /// Rings (180) for this long after `CALL_INCOMING`, then accepts over `ctrl_tcp` (baresip
    /// 1.0 has no answer delay of its own).
    After(Duration),
}

/// An audio codec as baresip's `audio_codecs` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codec(pub String);

impl Codec {
    /// G.711 µ-law, 8 kHz mono.
    pub fn pcmu() -> Codec {
        Codec("PCMU".to_owned())
    }

    /// G.711 A-law, 8 kHz mono.
    pub fn pcma() -> Codec {
        Codec("PCMA".to_owned())
    }

    /// Opus as WebRTC uses it (`opus/48000/2`; a bare `opus` does not match it).
    pub fn opus() -> Codec {
        Codec("opus/48000/2".to_owned())
    }

    /// The (sample rate, channels) of the WAV `aufile` must be given for this codec: baresip
    /// fails to start the source otherwise. `NAME/RATE[/CHANNELS]` is read as written; G.711
    /// names are 8 kHz mono, `G722` 16 kHz mono.
    pub fn wav_format(&self) -> (u32, u16) {
        let mut parts = self.0.split('/');
        let name = parts.next().unwrap_or_default().to_ascii_uppercase();
        let rate = parts.next().and_then(|r| r.parse().ok());
        let channels = parts.next().and_then(|c| c.parse().ok());
        match (rate, channels) {
            (Some(rate), Some(channels)) => (rate, channels),
            (Some(rate), None) => (rate, 1),
            _ => match name.as_str() {
                "OPUS" => (48_000, 2),
                "G722" => (16_000, 1),
                _ => (8_000, 1),
            },
        }
    }
}

/// What a [`Baresip`] plays into its calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Play {
    /// A sine of this frequency (Hz) at -6 dBFS, written for the first codec's format.
    Tone(f64),
    /// This WAV, which must match the negotiated codec's rate and channels.
    File(PathBuf),
}

/// How [`Baresip::start`] sets up a phone.
#[derive(Debug, Clone)]
pub struct BaresipOptions {
    /// The account's user (`1001`); its AOR is `sip:USER@127.0.0.1:<kamailio port>`.
    pub user: String,
    /// The digest password ([`phone_password`] of the user by default).
    pub password: String,
    /// Whether to register (a caller-only phone does not, and is not challenged unless its user
    /// is an account).
    pub register: bool,
    /// UDP unless changed.
    pub transport: SipTransport,
    /// `mediaenc=srtp-mand`: SDES-SRTP required (meant for [`SipTransport::Tls`]; the log then
    /// shows `SRTP is Enabled`).
    pub srtp: bool,
    /// When incoming calls are answered.
    pub answer: Answer,
    /// Codecs in order of preference (`PCMU`, `PCMA` by default).
    pub codecs: Vec<Codec>,
    /// What the phone sends (a 440 Hz tone by default).
    pub play: Play,
    /// Length of a generated tone; `aufile` stops at the end of the file.
    pub tone_seconds: f64,
}

impl BaresipOptions {
    /// Phone `user` with the shipped password, UDP, auto-answer, PCMU/PCMA, a 440 Hz tone.
    pub fn phone(user: &str) -> BaresipOptions {
        BaresipOptions {
            user: user.to_owned(),
            password: phone_password(user),
            register: true,
            transport: SipTransport::Udp,
            srtp: false,
            answer: Answer::Auto,
            codecs: vec![Codec::pcmu(), Codec::pcma()],
            play: Play::Tone(440.0),
            tone_seconds: 60.0,
        }
    }

    /// Over TLS with mandatory SRTP.
    pub fn tls_srtp(mut self) -> BaresipOptions {
        self.transport = SipTransport::Tls;
        self.srtp = true;
        self
    }

    /// With `answer`.
    pub fn answer(mut self, answer: Answer) -> BaresipOptions {
        self.answer = answer;
        self
    }

    /// With these codecs, in order of preference.
    pub fn codecs(mut self, codecs: Vec<Codec>) -> BaresipOptions {
        self.codecs = codecs;
        self
    }

    /// Playing a tone of `hz`.
    pub fn tone(mut self, hz: f64) -> BaresipOptions {
        self.play = Play::Tone(hz);
        self
    }
}

/// A running baresip desk phone, asked to quit (then killed) when dropped.
#[derive(Debug)]
pub struct Baresip {
    child: Child,
    dir: PathBuf,
    user: String,
    aor: String,
    ctrl: Ctrl,
    call_uri_suffix: String,
}

impl Baresip {
    /// Starts a phone registered (unless `options.register` is false) with `kamailio`, and
    /// returns once `ctrl_tcp` answers and the registration shows in `ul.dump` (and baresip's
    /// log shows its `200 OK`).
    pub fn start(kamailio: &Kamailio, options: BaresipOptions) -> Result<Baresip> {
        require_installed(BARESIP_BIN, "baresip-core")?;
        require_installed(BARESIP_MODULES, "baresip-core")?;
        ensure!(
            !options.codecs.is_empty(),
            "baresip needs at least one codec"
        );
        let dir = crate::unique_temp_dir(&format!("baresip-{}", options.user))?;
        let mut attempt = 1;
        loop {
            match Baresip::spawn(kamailio, &options, &dir) {
                Ok(phone) => return Ok(phone),
                Err(err) => {
                    let log = std::fs::read_to_string(dir.join("baresip.log")).unwrap_or_default();
                    if log.contains("ctrl_tcp: failed to listen") && attempt < START_ATTEMPTS {
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    fn spawn(kamailio: &Kamailio, options: &BaresipOptions, dir: &Path) -> Result<Baresip> {
        std::fs::create_dir_all(dir.join("rec"))?;
        let wav = match &options.play {
            Play::File(path) => path.clone(),
            Play::Tone(hz) => {
                let (rate, channels) = options.codecs[0].wav_format();
                let path = dir.join(format!("tone{hz}_{rate}_{channels}.wav"));
                if !path.exists() {
                    write_tone_wav(&path, *hz, rate, channels, options.tone_seconds)?;
                }
                path
            }
        };
        let ctrl_port = crate::free_tcp_addr()?.port();
        let (registrar, transport_param) = match options.transport {
            SipTransport::Udp => (kamailio.udp_addr(), ""),
            SipTransport::Tcp => (kamailio.tcp_addr(), ";transport=tcp"),
            SipTransport::Tls => (kamailio.tls_addr(), ";transport=tls"),
        };
        // Port 0: baresip lets the kernel pick its UDP, TCP and TLS ports.
        let config = format!(
            "# Written by chorus_tests::telephony::Baresip\n\
             poll_method\t\tepoll\n\
             sip_listen\t\t127.0.0.1:0\n\
             net_interface\t\t127.0.0.1\n\
             sip_certificate\t\t{both}\n\
             sip_cafile\t\t{ca}\n\
             audio_player\t\taubridge,sink\n\
             audio_alert\t\taubridge,sink\n\
             audio_source\t\taufile,{wav}\n\
             module_path\t\t{BARESIP_MODULES}\n\
             module\t\t\tg711.so\n\
             module\t\t\tg722.so\n\
             module\t\t\topus.so\n\
             module\t\t\taufile.so\n\
             module\t\t\taubridge.so\n\
             module\t\t\tsndfile.so\n\
             module\t\t\tsrtp.so\n\
             module_app\t\taccount.so\n\
             module_app\t\tmenu.so\n\
             module_app\t\tctrl_tcp.so\n\
             ctrl_tcp_listen\t\t127.0.0.1:{ctrl_port}\n\
             snd_path\t\t{rec}\n",
            both = kamailio.dir().join("both.pem").display(),
            ca = kamailio.cert_path().display(),
            wav = wav.display(),
            rec = dir.join("rec").display(),
        );
        std::fs::write(dir.join("config"), config)?;
        let codecs: Vec<&str> = options.codecs.iter().map(|c| c.0.as_str()).collect();
        let answermode = match options.answer {
            Answer::Auto => "auto",
            Answer::Manual | Answer::After(_) => "manual",
        };
        let mut account = format!(
            "<sip:{user}@{registrar}{transport_param}>;auth_pass={password};\
             answermode={answermode};audio_codecs={codecs}",
            user = options.user,
            password = options.password,
            codecs = codecs.join(","),
        );
        if options.srtp {
            account.push_str(";mediaenc=srtp-mand");
        }
        if !options.register {
            account.push_str(";regint=0");
        }
        std::fs::write(dir.join("accounts"), format!("{account}\n"))?;

        let log_path = dir.join("baresip.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(BARESIP_BIN)
            .arg("-f")
            .arg(dir)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {BARESIP_BIN}"))?;
        let failed = |child: &mut Child, what: String| -> anyhow::Error {
            let _ = child.kill();
            let _ = child.wait();
            anyhow!(
                "baresip {}: {what}; log {}:\n{}",
                options.user,
                log_path.display(),
                log_tail(&log_path, 30)
            )
        };
        let deadline = Instant::now() + BARESIP_STARTUP;
        let ctrl = loop {
            if let Some(status) = child.try_wait()? {
                return Err(failed(
                    &mut child,
                    format!("exited during startup ({status})"),
                ));
            }
            match Ctrl::connect(ctrl_port, options.answer) {
                // The port was free when picked, but another test's baresip may have taken it
                // since: only a connection to this phone's own baresip will do (events of a
                // wrong one never arrive here).
                Ok(ctrl) => match ctrl.command("reginfo", "") {
                    Ok(info) if info.contains(&format!("{}@", options.user)) => break ctrl,
                    Ok(info) => {
                        return Err(failed(
                            &mut child,
                            format!(
                                "ctrl_tcp on port {ctrl_port} is another baresip's \
                                 (ctrl_tcp: failed to listen): {info}"
                            ),
                        ));
                    }
                    Err(_) if Instant::now() <= deadline => std::thread::sleep(POLL),
                    Err(err) => {
                        return Err(failed(
                            &mut child,
                            format!("ctrl_tcp on port {ctrl_port} does not answer ({err:#})"),
                        ));
                    }
                },
                Err(err) if Instant::now() > deadline => {
                    return Err(failed(
                        &mut child,
                        format!("ctrl_tcp on port {ctrl_port} never answered ({err:#})"),
                    ));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        };
        let call_uri_suffix = transport_param.to_owned();
        let aor = format!("sip:{}@{registrar}", options.user);
        let phone = Baresip {
            child,
            dir: dir.to_path_buf(),
            user: options.user.clone(),
            aor,
            ctrl,
            call_uri_suffix,
        };
        if options.register {
            // baresip's log line `1001@127.0.0.1: {0/UDP/v4} 200 OK (…) [1 binding]` says its
            // own registration succeeded; ul.dump says Kamailio has the binding.
            let mut phone = phone;
            loop {
                if let Some(status) = phone.child.try_wait()? {
                    return Err(failed(
                        &mut phone.child,
                        format!("exited while registering ({status})"),
                    ));
                }
                let log = phone.log();
                let ok = log.lines().any(|l| l.contains("} 200 OK"));
                if ok && kamailio.is_registered(&options.user)? {
                    return Ok(phone);
                }
                if Instant::now() > deadline {
                    let dump = kamailio.ul_dump().unwrap_or_default();
                    return Err(failed(
                        &mut phone.child,
                        format!(
                            "not registered with kamailio within {BARESIP_STARTUP:?} \
                             (kamailio log {}; ul.dump:\n{dump})",
                            kamailio.log_path().display()
                        ),
                    ));
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(phone)
    }

    /// The account's user (`1001`).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The account's AOR, `sip:1001@127.0.0.1:PORT` (the registrar's address).
    pub fn aor(&self) -> &str {
        &self.aor
    }

    /// Sends `command` with `params` over `ctrl_tcp` and returns the response's `data`; a
    /// response with `ok: false` is an error.
    pub fn command(&self, command: &str, params: &str) -> Result<String> {
        self.ctrl.command(command, params).with_context(|| {
            format!(
                "baresip {} `{command} {params}` (log {})",
                self.user,
                self.log_path().display()
            )
        })
    }

    /// Dials `uri` (a full SIP URI). A call through Kamailio over TLS needs `;transport=tls`
    /// on the URI; [`Baresip::dial_user`] adds it.
    pub fn dial(&self, uri: &str) -> Result<String> {
        self.command("dial", uri)
    }

    /// Dials `user` through `kamailio`, over this phone's transport.
    pub fn dial_user(&self, kamailio: &Kamailio, user: &str) -> Result<String> {
        let registrar = match self.call_uri_suffix.as_str() {
            ";transport=tls" => kamailio.tls_addr(),
            _ => kamailio.udp_addr(),
        };
        self.dial(&format!("sip:{user}@{registrar}{}", self.call_uri_suffix))
    }

    /// Hangs up the current call.
    pub fn hangup(&self) -> Result<String> {
        self.command("hangup", "")
    }

    /// Answers the ringing call (with [`Answer::Manual`]).
    pub fn accept(&self) -> Result<String> {
        self.command("accept", "")
    }

    /// Every event seen on `ctrl_tcp` so far (JSON objects with `type`, `param`, `peeruri`…).
    pub fn events(&self) -> Vec<Value> {
        self.ctrl.lock().events.clone()
    }

    /// Waits for the next event of `kind` (`CALL_INCOMING`, `CALL_RINGING`,
    /// `CALL_ESTABLISHED`, `CALL_CLOSED`, ...) not returned by an earlier call, and returns it.
    pub async fn wait_event(&self, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut state = self.ctrl.lock();
                let from = state.cursors.get(kind).copied().unwrap_or(0);
                let found = state
                    .events
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, event)| event["type"] == kind)
                    .map(|(index, event)| (index, event.clone()));
                if let Some((index, event)) = found {
                    state.cursors.insert(kind.to_owned(), index + 1);
                    return Ok(event);
                }
                if state.closed {
                    bail!(
                        "baresip {} closed its control connection before {kind}; log {}",
                        self.user,
                        self.log_path().display()
                    );
                }
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .events()
                    .iter()
                    .map(|e| e["type"].as_str().unwrap_or("?").to_owned())
                    .collect();
                bail!(
                    "baresip {}: no {kind} within {timeout:?} (events: {seen:?}); log {}",
                    self.user,
                    self.log_path().display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The newest recording of what the phone heard (`rec/dump-…-dec.wav`). Its header is
    /// complete once the call has ended.
    pub fn recording(&self) -> Result<PathBuf> {
        self.newest_recording("-dec.wav")
    }

    /// The newest recording of what the phone sent (`rec/dump-…-enc.wav`).
    pub fn sent_recording(&self) -> Result<PathBuf> {
        self.newest_recording("-enc.wav")
    }

    /// Every recording of what the phone heard, oldest first.
    pub fn recordings(&self) -> Result<Vec<PathBuf>> {
        let rec = self.dir.join("rec");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&rec)
            .with_context(|| format!("cannot list {}", rec.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with("-dec.wav"))
            .collect();
        // The names carry the call's start time, so they sort in time order.
        files.sort();
        Ok(files)
    }

    fn newest_recording(&self, suffix: &str) -> Result<PathBuf> {
        let rec = self.dir.join("rec");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&rec)
            .with_context(|| format!("cannot list {}", rec.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files.pop().with_context(|| {
            format!(
                "baresip {} has no *{suffix} in {} (no call had audio yet?); log {}",
                self.user,
                rec.display(),
                self.log_path().display()
            )
        })
    }

    /// baresip's output (`SRTP is Enabled (cryptosuite=…)`, `Set audio encoder: …`, call
    /// states, registration replies).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where that output goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("baresip.log")
    }

    /// The phone's temporary directory (config, accounts, `rec/`, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        // `quit` unregisters and exits; a lone SIGTERM may hang.
        let _ = self.ctrl.send("quit", "", "drop-quit");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.ctrl.shutdown();
        remove_run_dir(&self.dir);
    }
}

/// What the `ctrl_tcp` reader thread has seen.
#[derive(Debug, Default)]
struct CtrlState {
    events: Vec<Value>,
    responses: HashMap<String, Value>,
    /// Per event type: the index after the last event [`Baresip::wait_event`] returned.
    cursors: HashMap<String, usize>,
    closed: bool,
}

#[derive(Debug, Default)]
struct CtrlShared {
    state: Mutex<CtrlState>,
    changed: Condvar,
}

/// The one `ctrl_tcp` connection of a baresip (netstring-framed JSON both ways): commands go out
/// on it, and a reader thread files responses by token and keeps every event.
#[derive(Debug)]
struct Ctrl {
    writer: Arc<Mutex<TcpStream>>,
    shared: Arc<CtrlShared>,
    next_token: AtomicU64,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Ctrl {
    fn connect(port: u16, answer: Answer) -> Result<Ctrl> {
        let stream = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )?;
        stream.set_nodelay(true)?;
        let reading = stream.try_clone()?;
        let writer = Arc::new(Mutex::new(stream));
        let shared = Arc::new(CtrlShared::default());
        let reader = {
            let shared = Arc::clone(&shared);
            let writer = Arc::clone(&writer);
            std::thread::Builder::new()
                .name(format!("baresip-ctrl-{port}"))
                .spawn(move || read_ctrl(reading, &shared, &writer, answer))?
        };
        Ok(Ctrl {
            writer,
            shared,
            next_token: AtomicU64::new(1),
            reader: Some(reader),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CtrlState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send(&self, command: &str, params: &str, token: &str) -> Result<()> {
        send_netstring(
            &self.writer,
            &json!({"command": command, "params": params, "token": token}),
        )
    }

    fn command(&self, command: &str, params: &str) -> Result<String> {
        let token = format!("t{}", self.next_token.fetch_add(1, Ordering::Relaxed));
        self.send(command, params, &token)?;
        let deadline = Instant::now() + CTRL_TIMEOUT;
        let mut state = self.lock();
        loop {
            if let Some(response) = state.responses.remove(&token) {
                let data = response["data"].as_str().unwrap_or_default().to_owned();
                ensure!(
                    response["ok"] == true,
                    "baresip refused `{command}`: {data}"
                );
                return Ok(data);
            }
            ensure!(!state.closed, "baresip closed its control connection");
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "no answer to `{command}` within {CTRL_TIMEOUT:?}"
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn shutdown(&mut self) {
        if let Ok(stream) = self.writer.lock() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn send_netstring(writer: &Mutex<TcpStream>, message: &Value) -> Result<()> {
    let body = message.to_string();
    let mut stream = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stream.write_all(format!("{}:{body},", body.len()).as_bytes())?;
    Ok(())
}

/// The reader thread: netstrings in, responses and events filed; with [`Answer::After`], each
/// `CALL_INCOMING` starts a timer that accepts the call.
fn read_ctrl(
    mut stream: TcpStream,
    shared: &CtrlShared,
    writer: &Arc<Mutex<TcpStream>>,
    answer: Answer,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some((message, used)) = parse_netstring(&buf) {
            buf.drain(..used);
            let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                continue;
            };
            if value["event"] == true {
                if let (Answer::After(delay), true) = (answer, value["type"] == "CALL_INCOMING") {
                    let writer = Arc::clone(writer);
                    // The delay is the behaviour asked for (ringing), not a wait for a state.
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let accept =
                            json!({"command": "accept", "params": "", "token": "auto-accept"});
                        let _ = send_netstring(&writer, &accept);
                    });
                }
                let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                state.events.push(value);
            } else if value["response"] == true {
                let token = value["token"].as_str().unwrap_or_default().to_owned();
                let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                state.responses.insert(token, value);
            }
            shared.changed.notify_all();
        }
    }
    let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    state.closed = true;
    shared.changed.notify_all();
}

/// One complete netstring (`LEN:PAYLOAD,`) at the start of `buf`: its payload and the bytes used.
fn parse_netstring(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let colon = buf.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&buf[..colon])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let end = colon + 1 + len;
    if buf.len() <= end {
        return None;
    }
    Some((buf[colon + 1..end].to_vec(), end + 1))
}

// ------------------------------------------------------------------------------------------------
// SIPp
// ------------------------------------------------------------------------------------------------

/// Settings of a [`Sipp`] run beyond its scenario.
#[derive(Debug, Clone)]
pub struct SippOptions {
    /// SIPp's `-d`: how long a bare `<pause/>` lasts. `phone_talk.xml` rings that long,
    /// `phone_hangup.xml` and `uac_auth.xml` talk that long, `phone_dtmf.xml` waits that long
    /// before the key press. One second unless set.
    pub pause: Duration,
    /// The tone streamed as `tone_ulaw.wav` (G.711 µ-law, 8 kHz): 440 Hz for phones and
    /// 1000 Hz for callers unless set.
    pub tone_hz: Option<f64>,
    /// The key `phone_dtmf.xml` presses (`0`-`9`, `*`, `#`).
    pub dtmf_digit: char,
    /// The final status `uac_reject.xml` expects (written over its `@STATUS@`).
    pub expect_status: u16,
    /// SIPp's media port (`-mp`); a free one unless set.
    pub media_port: Option<u16>,
}

impl Default for SippOptions {
    fn default() -> Self {
        SippOptions {
            pause: Duration::from_secs(1),
            tone_hz: None,
            dtmf_digit: '1',
            expect_status: 486,
            media_port: None,
        }
    }
}

/// A SIPp process running one scenario once (`-m 1`), killed when dropped. For a phone, its
/// binding is removed from Kamailio on drop as well.
#[derive(Debug)]
pub struct Sipp {
    child: Child,
    dir: PathBuf,
    name: String,
    sip_addr: SocketAddr,
    media_port: u16,
    status: Option<ExitStatus>,
    /// (kamcmd control socket, user, contact) to remove on drop.
    binding: Option<(String, String, String)>,
}

impl Sipp {
    /// Phone `user` (registered with its [`phone_password`]) running `scenario` (a file name in
    /// `tests/telephony/sipp/`, such as `phone_busy.xml`) as a UAS for one call. Any earlier
    /// binding of `user` is removed first, so calls reach this phone only.
    pub fn phone(kamailio: &Kamailio, user: &str, scenario: &str) -> Result<Sipp> {
        Sipp::phone_with(kamailio, user, scenario, SippOptions::default())
    }

    /// [`Sipp::phone`] with options.
    pub fn phone_with(
        kamailio: &Kamailio,
        user: &str,
        scenario: &str,
        options: SippOptions,
    ) -> Result<Sipp> {
        let dir = crate::unique_temp_dir(&format!("sipp-{user}"))?;
        let tone = options.tone_hz.unwrap_or(440.0);
        let (sip_port, media_port) = (free_udp_port()?, media_port(&options)?);
        let mut phone = Sipp::spawn(
            &dir, scenario, None, user, sip_port, media_port, tone, &options,
        )?;
        kamailio.unregister(user)?;
        // The UAS is up (a SIPp UAS binds at start); now point the AOR at it.
        let contact = format!("sip:{user}@127.0.0.1:{sip_port}");
        let registered = run_register(kamailio, user, &phone_password(user), sip_port, &dir);
        if let Err(err) = registered {
            return Err(err.context(format!("registering SIPp phone {user} ({scenario})")));
        }
        kamailio.wait_contact(user, SIPP_REGISTER_TIMEOUT, |c| c == contact)?;
        phone.binding = Some((kamailio.ctl_socket(), user.to_owned(), contact));
        // The UAS must not have died in the meantime (a scenario that fails to load exits).
        if let Some(status) = phone.child.try_wait()? {
            bail!(
                "SIPp phone {user} ({scenario}) exited before any call ({status}); log {}:\n{}",
                phone.log_path().display(),
                log_tail(&phone.log_path(), 30)
            );
        }
        Ok(phone)
    }

    /// A caller running `scenario` (such as `uac_auth.xml`: authenticates as `chorus`) that
    /// calls `callee` through `kamailio`, in the background.
    pub fn call(kamailio: &Kamailio, callee: &str, scenario: &str) -> Result<Sipp> {
        Sipp::call_with(kamailio, callee, scenario, SippOptions::default())
    }

    /// [`Sipp::call`] with options.
    pub fn call_with(
        kamailio: &Kamailio,
        callee: &str,
        scenario: &str,
        options: SippOptions,
    ) -> Result<Sipp> {
        let dir = crate::unique_temp_dir(&format!("sipp-call-{callee}"))?;
        let tone = options.tone_hz.unwrap_or(1000.0);
        let (sip_port, media_port) = (free_udp_port()?, media_port(&options)?);
        Sipp::spawn(
            &dir,
            scenario,
            Some(kamailio.udp_addr()),
            callee,
            sip_port,
            media_port,
            tone,
            &options,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        dir: &Path,
        scenario: &str,
        remote: Option<SocketAddr>,
        service: &str,
        sip_port: u16,
        media_port: u16,
        tone_hz: f64,
        options: &SippOptions,
    ) -> Result<Sipp> {
        require_installed(SIPP_BIN, "sip-tester")?;
        let source = fixtures_dir().join("sipp").join(scenario);
        let text = std::fs::read_to_string(&source)
            .with_context(|| format!("cannot read SIPp scenario {}", source.display()))?;
        let text = text.replace("@STATUS@", &options.expect_status.to_string());
        std::fs::write(dir.join(scenario), text)?;
        // Every file a scenario may refer to must exist when it loads.
        write_ulaw_tone_wav(&dir.join("tone_ulaw.wav"), tone_hz, 30.0)?;
        let pcap = Path::new(SIPP_DTMF_PCAPS).join(format!(
            "dtmf_2833_{}.pcap",
            match options.dtmf_digit {
                '*' => "star".to_owned(),
                '#' => "pound".to_owned(),
                digit => digit.to_string(),
            }
        ));
        std::fs::copy(&pcap, dir.join("dtmf.pcap")).with_context(|| {
            format!(
                "cannot copy {} (package sip-tester; DTMF digit {:?})",
                pcap.display(),
                options.dtmf_digit
            )
        })?;
        let name = scenario.trim_end_matches(".xml").to_owned();
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(SIPP_BIN);
        if let Some(remote) = remote {
            command.arg(remote.to_string());
        }
        command
            .arg("-sf")
            .arg(scenario)
            .args(["-s", service, "-i", "127.0.0.1", "-mi", "127.0.0.1"])
            .args(["-p", &sip_port.to_string(), "-mp", &media_port.to_string()])
            .args(["-m", "1", "-nostdin"])
            .args(["-d", &options.pause.as_millis().to_string()])
            .args(["-trace_msg", "-message_file", "messages.log"])
            .args(["-trace_err", "-error_file", "errors.log"])
            .args(["-timeout", &format!("{}s", SIPP_GLOBAL_TIMEOUT.as_secs())])
            .arg("-timeout_error")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {SIPP_BIN}"))?;
        Ok(Sipp {
            child,
            dir: dir.to_path_buf(),
            name,
            sip_addr: SocketAddr::from(([127, 0, 0, 1], sip_port)),
            media_port,
            status: None,
            binding: None,
        })
    }

    /// Waits (async) for SIPp to finish its one call and returns its exit status: success
    /// means the scenario ran as written. Gives up after SIPp's own global timeout.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + SIPP_GLOBAL_TIMEOUT + Duration::from_secs(5);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "SIPp {} still running after {SIPP_GLOBAL_TIMEOUT:?}",
                self.name
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`Sipp::wait`] for tests without an async runtime.
    pub fn wait_blocking(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for SIPp {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// [`Sipp::wait`], then an error carrying SIPp's output and messages unless it succeeded.
    pub async fn wait_success(&mut self) -> Result<()> {
        let status = self.wait().await?;
        self.check(status)
    }

    /// [`Sipp::wait_success`] without an async runtime.
    pub fn wait_success_blocking(&mut self) -> Result<()> {
        let status = self.wait_blocking()?;
        self.check(status)
    }

    fn check(&self, status: ExitStatus) -> Result<()> {
        ensure!(
            status.success(),
            "SIPp {} failed ({status}); log {}:\n{}\n--- errors\n{}\n--- messages (tail)\n{}",
            self.name,
            self.log_path().display(),
            log_tail(&self.log_path(), 20),
            log_tail(&self.dir.join("errors.log"), 20),
            log_tail(&self.dir.join("messages.log"), 60)
        );
        Ok(())
    }

    /// The exit status if SIPp has finished.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking on SIPp {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Every SIP message SIPp sent and received (`-trace_msg`).
    pub fn messages(&self) -> String {
        std::fs::read_to_string(self.dir.join("messages.log")).unwrap_or_default()
    }

    /// The status codes of the responses SIPp received, in order (a caller's 407, 100, 180,
    /// 486…).
    pub fn received_statuses(&self) -> Vec<u16> {
        statuses_in(&self.messages(), "received")
    }

    /// The status codes of the responses SIPp sent (a phone's 180, 200, 487…).
    pub fn sent_statuses(&self) -> Vec<u16> {
        statuses_in(&self.messages(), "sent")
    }

    /// SIPp's screen output (its statistics at exit).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The SIP address this SIPp listens on.
    pub fn sip_addr(&self) -> SocketAddr {
        self.sip_addr
    }

    /// Its RTP port (`[media_port]` in the SDP).
    pub fn media_port(&self) -> u16 {
        self.media_port
    }

    /// The run's directory (scenario copy, `tone_ulaw.wav`, `dtmf.pcap`, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((ctl, user, contact)) = self.binding.take() {
            let _ = Command::new(KAMCMD_BIN)
                .args(["-s", &ctl, "ul.rm_contact", "location"])
                .arg(format!("s:{user}"))
                .arg(format!("s:{contact}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        remove_run_dir(&self.dir);
    }
}

/// Runs `register.xml` to completion: `user` bound to `127.0.0.1:contact_port` at `kamailio`,
/// its files under `dir/register`. Blocks (up to a few seconds): from async code, call it on a
/// blocking thread.
pub fn run_register(
    kamailio: &Kamailio,
    user: &str,
    password: &str,
    contact_port: u16,
    dir: &Path,
) -> Result<()> {
    let source = fixtures_dir().join("sipp/register.xml");
    let reg_dir = dir.join("register");
    std::fs::create_dir_all(&reg_dir)?;
    std::fs::copy(&source, reg_dir.join("register.xml"))
        .with_context(|| format!("cannot copy {}", source.display()))?;
    let log_path = reg_dir.join("register.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(SIPP_BIN)
        .arg(kamailio.udp_addr().to_string())
        .args([
            "-sf",
            "register.xml",
            "-s",
            user,
            "-au",
            user,
            "-ap",
            password,
        ])
        .args(["-key", "contact_port", &contact_port.to_string()])
        .args(["-key", "expires", "3600", "-i", "127.0.0.1"])
        .args(["-p", &free_udp_port()?.to_string(), "-m", "1", "-nostdin"])
        .args(["-trace_msg", "-message_file", "messages.log"])
        .args(["-timeout", &format!("{}s", SIPP_REGISTER_TIMEOUT.as_secs())])
        .arg("-timeout_error")
        .current_dir(&reg_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {SIPP_BIN}"))?;
    let deadline = Instant::now() + SIPP_REGISTER_TIMEOUT + Duration::from_secs(2);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "SIPp register.xml did not finish; log {}",
                log_path.display()
            );
        }
        std::thread::sleep(POLL);
    };
    ensure!(
        status.success(),
        "SIPp register.xml for {user} failed ({status}); log {}:\n{}\n--- messages\n{}\n\
         (kamailio log {})",
        log_path.display(),
        log_tail(&log_path, 20),
        log_tail(&reg_dir.join("messages.log"), 40),
        kamailio.log_path().display()
    );
    Ok(())
}

/// Response status codes in a SIPp `-trace_msg` log, of messages `direction` ("sent" or
/// "received"). Each message follows a dashed line with a timestamp and a line like
/// `UDP message received [390] bytes :` or `UDP message sent (292 bytes):`.
fn statuses_in(messages: &str, direction: &str) -> Vec<u16> {
    let marker = format!("message {direction}");
    let mut statuses = Vec::new();
    let mut expect_first_line = false;
    for line in messages.lines() {
        if line.starts_with("-----") {
            expect_first_line = false;
        } else if line.contains(" message sent") || line.contains(" message received") {
            expect_first_line = line.contains(&marker);
        } else if expect_first_line && !line.trim().is_empty() {
            expect_first_line = false;
            if let Some(code) = line
                .trim()
                .strip_prefix("SIP/2.0 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
            {
                statuses.push(code);
            }
        }
    }
    statuses
}

fn media_port(options: &SippOptions) -> Result<u16> {
    match options.media_port {
        Some(port) => Ok(port),
        // SIPp binds the media port and the one two above (video); keep four free.
        None => free_udp_run(4),
    }
}

// ------------------------------------------------------------------------------------------------
// Audio
// ------------------------------------------------------------------------------------------------

/// Writes a sine of `freq_hz` at -6 dBFS (half scale), 16-bit PCM, `rate` Hz, `channels`
/// identical channels, `seconds` long.
pub fn write_tone_wav(
    path: &Path,
    freq_hz: f64,
    rate: u32,
    channels: u16,
    seconds: f64,
) -> Result<()> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    for sample in tone_samples(freq_hz, rate, seconds) {
        for _ in 0..channels {
            writer.write_sample(sample)?;
        }
    }
    writer
        .finalize()
        .with_context(|| format!("cannot finish {}", path.display()))
}

fn tone_samples(freq_hz: f64, rate: u32, seconds: f64) -> impl Iterator<Item = i16> {
    let frames = (f64::from(rate) * seconds).round() as usize;
    let step = std::f64::consts::TAU * freq_hz / f64::from(rate);
    (0..frames).map(move |i| (16_384.0 * (step * i as f64).sin()).round() as i16)
}

/// Writes a G.711 µ-law WAV (8 kHz mono, format tag 7) of a -6 dBFS sine: what SIPp's
/// `rtp_stream` sends as payload type 0.
pub fn write_ulaw_tone_wav(path: &Path, freq_hz: f64, seconds: f64) -> Result<()> {
    let data: Vec<u8> = tone_samples(freq_hz, 8_000, seconds)
        .map(linear_to_ulaw)
        .collect();
    let data_len = u32::try_from(data.len()).context("tone too long")?;
    let mut wav = Vec::with_capacity(data.len() + 58);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(4 + 26 + 12 + 8 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&18u32.to_le_bytes());
    wav.extend_from_slice(&7u16.to_le_bytes()); // WAVE_FORMAT_MULAW
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&8_000u32.to_le_bytes());
    wav.extend_from_slice(&8_000u32.to_le_bytes()); // bytes per second
    wav.extend_from_slice(&1u16.to_le_bytes()); // block align
    wav.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(&0u16.to_le_bytes()); // no extension
    wav.extend_from_slice(b"fact");
    wav.extend_from_slice(&4u32.to_le_bytes());
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.extend_from_slice(&data);
    std::fs::write(path, wav).with_context(|| format!("cannot write {}", path.display()))
}

/// G.711 µ-law encoding of one 16-bit sample.
fn linear_to_ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let mut value = i32::from(sample);
    let sign = if value < 0 {
        value = -value;
        0x80
    } else {
        0
    };
    let value = value.min(CLIP) + BIAS;
    let exponent = (7 - (value.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (value >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// The samples of a 16-bit WAV mixed down to mono, and its rate.
pub fn read_wav_mono(path: &Path) -> Result<(Vec<i16>, u32)> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let spec = reader.spec();
    ensure!(
        spec.sample_format == hound::SampleFormat::Int && spec.bits_per_sample == 16,
        "{}: 16-bit PCM expected, found {spec:?}",
        path.display()
    );
    let samples: Vec<i16> = reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let channels = usize::from(spec.channels.max(1));
    let mono = samples
        .chunks(channels)
        .map(|frame| {
            let sum: i32 = frame.iter().map(|&s| i32::from(s)).sum();
            (sum / frame.len() as i32) as i16
        })
        .collect();
    Ok((mono, spec.sample_rate))
}

/// The part of a recording that is analysed: from [`SKIP_START`] on.
fn analysed(path: &Path) -> Result<(Vec<i16>, u32)> {
    let (mono, rate) = read_wav_mono(path)?;
    let skip = (f64::from(rate) * SKIP_START.as_secs_f64()) as usize;
    let block = (f64::from(rate) * BLOCK.as_secs_f64()) as usize;
    ensure!(
        mono.len() >= skip + block,
        "{} holds {:.2} s of audio, too little to analyse (a recording is complete once its \
         call has ended)",
        path.display(),
        mono.len() as f64 / f64::from(rate.max(1))
    );
    Ok((mono[skip..].to_vec(), rate))
}

/// The level (dBFS) of each of `freqs_hz` in the WAV at `path`: mono mix-down, the first
/// 300 ms skipped, Goertzel over 200 ms blocks averaged in power. A -6 dBFS tone reads about
/// -6; silence reads far below [`HEARD_DBFS`].
pub fn tone_levels(path: &Path, freqs_hz: &[f64]) -> Result<Vec<f64>> {
    let (samples, rate) = analysed(path)?;
    let block = (f64::from(rate) * BLOCK.as_secs_f64()) as usize;
    let blocks: Vec<&[i16]> = samples.chunks_exact(block).collect();
    Ok(freqs_hz
        .iter()
        .map(|&f| {
            let power = blocks
                .iter()
                .map(|b| goertzel_amplitude(b, f, rate).powi(2))
                .sum::<f64>()
                / blocks.len() as f64;
            amplitude_dbfs(power.sqrt())
        })
        .collect())
}

/// The loudest of `candidates_hz` in the WAV at `path`, or `None` if none reaches
/// [`HEARD_DBFS`] (silence, or something else entirely).
pub fn dominant_tone(path: &Path, candidates_hz: &[f64]) -> Result<Option<f64>> {
    let levels = tone_levels(path, candidates_hz)?;
    Ok(candidates_hz
        .iter()
        .zip(levels)
        .filter(|(_, level)| *level >= HEARD_DBFS)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(&f, _)| f))
}

/// The RMS level (dBFS, a full-scale sine reading 0) of the WAV at `path` after the first
/// 300 ms: what tells a silent line from a live one. A recording without that much audio reads
/// the floor (-150): baresip's `sndfile` writes only what it decoded, so a call on which no RTP
/// arrived leaves an empty WAV. Read it after the call ended (`CALL_CLOSED`): until then its
/// header says it is empty too.
pub fn wav_rms_dbfs(path: &Path) -> Result<f64> {
    let (mono, rate) = read_wav_mono(path)?;
    let skip = (f64::from(rate) * SKIP_START.as_secs_f64()) as usize;
    Ok(mono.get(skip..).map_or(-150.0, rms_dbfs))
}

fn amplitude_dbfs(amplitude: f64) -> f64 {
    if amplitude <= 0.0 {
        return -150.0;
    }
    (20.0 * (amplitude / 32_767.0).log10()).max(-150.0)
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// Fails with a pointer to `scripts/bootstrap` when `path` (part of `packages`) is missing.
fn require_installed(path: &str, packages: &str) -> Result<()> {
    ensure!(
        Path::new(path).exists(),
        "{path} is missing: the Debian package(s) {packages} are not installed; run \
         `scripts/bootstrap` (or `make bootstrap`) from {}",
        crate::workspace_root().display()
    );
    Ok(())
}

/// Set this variable (to anything) to keep every run directory, logs included.
pub const KEEP_ENV: &str = "CHORUS_KEEP_TELEPHONY";

/// Removes a peer's run directory, unless the thread is panicking (a failed assertion keeps the
/// logs) or [`KEEP_ENV`] is set (a test that returned an error drops its peers normally).
fn remove_run_dir(dir: &Path) {
    if !std::thread::panicking() && std::env::var_os(KEEP_ENV).is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A port of 127.0.0.1 free for UDP, as a moment ago.
fn free_udp_port() -> Result<u16> {
    Ok(crate::free_udp_addr()?.port())
}

/// A port of 127.0.0.1 free for both UDP and TCP (Kamailio listens on both).
fn free_port_both() -> Result<u16> {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no port of 127.0.0.1 free for both UDP and TCP")
}

/// The first of `n` consecutive UDP ports of 127.0.0.1 that are all free (the first even).
fn free_udp_run(n: u16) -> Result<u16> {
    for _ in 0..50 {
        let first = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port() & !1;
        if port < 1024 || port > u16::MAX - n {
            continue;
        }
        drop(first);
        let held: Result<Vec<_>, _> = (port..port + n)
            .map(|p| std::net::UdpSocket::bind(("127.0.0.1", p)))
            .collect();
        if held.is_ok() {
            return Ok(port);
        }
    }
    bail!("found no {n} consecutive free UDP ports on 127.0.0.1")
}

/// The last `lines` lines of a log file (empty if unreadable).
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_read_per_aor() {
        let dump = "AoRs: {\n Info: {\n  AoR: 1002\n  Contacts: {\n   Contact: {\n    \
                    Address: sip:1002@127.0.0.1:5092\n   }\n  }\n }\n Info: {\n  AoR: 1001\n  \
                    Contacts: {\n   Contact: {\n    Address: sip:1001-0x1@127.0.0.1:35222\n";
        assert_eq!(parse_contacts(dump, "1002"), ["sip:1002@127.0.0.1:5092"]);
        assert_eq!(
            parse_contacts(dump, "1001"),
            ["sip:1001-0x1@127.0.0.1:35222"]
        );
        assert!(parse_contacts(dump, "1003").is_empty());
    }

    #[test]
    fn ulaw_matches_g711() {
        assert_eq!(linear_to_ulaw(0), 0xFF);
        assert_eq!(linear_to_ulaw(-1), 0x7F);
        assert_eq!(linear_to_ulaw(32_767), 0x80);
        assert_eq!(linear_to_ulaw(-32_768), 0x00);
    }

    #[test]
    fn netstrings_split() {
        let buf = b"5:hello,3:ab";
        let (first, used) = parse_netstring(buf).expect("one message");
        assert_eq!((first.as_slice(), used), (&b"hello"[..], 8));
        assert!(parse_netstring(&buf[used..]).is_none());
    }

    #[test]
    fn statuses_by_direction() {
        let log = "----------------------------------------------- 2026-11-26 16:17:20.77\n\
                   UDP message sent (10 bytes):\n\nINVITE sip:x SIP/2.0\nVia: y\n\n\
                   ----------------------------------------------- 2026-11-26 16:17:20.78\n\
                   UDP message received [300] bytes :\n\nSIP/2.0 486 Busy Here\nVia: x\n";
        assert_eq!(statuses_in(log, "received"), [486]);
        assert!(statuses_in(log, "sent").is_empty());
    }
}
