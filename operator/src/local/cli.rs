//! `chorus-operator local`: run a Conference file on this machine until Ctrl-C or SIGTERM.
//!
//! What it prints (stdout, one line per fact, each starting `chorus: `):
//! - first `chorus: conference NAME running locally in WORKDIR`;
//! - per region with servers, `chorus: join at http://127.0.0.X:PORT/?room=ROOM&token=TOKEN (region R)`;
//! - later, deaths of servers or bots (with the log to read), and what a watched change did.
//!
//! Policy: a server that dies is reported and left dead (the mesh must carry on without it), and the
//! working directory is then kept for its log. A watched change that does not plan is reported and
//! ignored: the running conference stays as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_crds::Conference;
use tokio_util::sync::CancellationToken;

use super::{ChildKind, LocalConference, LocalError, LocalOptions};
use crate::manifests;

/// The namespace given to a Conference file that names none; locally it only shows in the plan.
const NAMESPACE: &str = "default";
/// How often the runtime looks for dead children and a changed file.
const POLL: Duration = Duration::from_secs(1);

/// The command line's settings.
#[derive(Clone, Debug)]
pub struct CliOptions {
    /// The Conference YAML file.
    pub file: PathBuf,
    /// Bots to start.
    pub bots: usize,
    /// The room the bots and the printed join URLs use.
    pub room: String,
    /// The working directory (a fresh temp dir when `None`).
    pub workdir: Option<PathBuf>,
    /// The media-server binary (next to this executable when `None`).
    pub mediaserver_bin: Option<PathBuf>,
    /// The bot binary (next to this executable when `None`).
    pub bot_bin: Option<PathBuf>,
    /// HTTP port of server 0 of each region.
    pub base_port: u16,
    /// Re-read the file every second and apply changes live.
    pub watch: bool,
    /// Where the Secret manifests the Conference names are (`<name>.yaml`); `None` is the
    /// Conference file's directory.
    pub secrets_dir: Option<PathBuf>,
}

/// Read and parse a Conference file.
pub fn read_conference_file(path: &Path) -> Result<(String, Conference), LocalError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LocalError::Input(format!("reading {}: {e}", path.display())))?;
    let conf = manifests::read_conference(&text, NAMESPACE)
        .map_err(|e| LocalError::Input(format!("{}: {e}", path.display())))?;
    Ok((text, conf))
}

/// Run until `stop` is cancelled, then stop every child and return.
pub async fn run(options: CliOptions, stop: CancellationToken) -> Result<(), LocalError> {
    let (mut last_text, conf) = read_conference_file(&options.file)?;
    let secrets_dir = options
        .secrets_dir
        .clone()
        .unwrap_or_else(|| match options.file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        });
    let local_options = LocalOptions {
        workdir: options.workdir.clone(),
        mediaserver_bin: options.mediaserver_bin.clone(),
        base_port: options.base_port,
        secrets_dir: Some(secrets_dir),
        ..LocalOptions::default()
    };
    // Ctrl-C during start-up drops the half-started conference, which stops what it started.
    let mut local = tokio::select! {
        started = LocalConference::start(&conf, local_options) => started?,
        () = stop.cancelled() => return Ok(()),
    };
    println!(
        "chorus: conference {} running locally in {}",
        local.name,
        local.workdir.display()
    );
    print_sip_lines(&local);

    let setup = async {
        tokio::select! {
            started = local.start_bots(options.bots, &options.room, options.bot_bin.as_deref()) => started?,
            () = stop.cancelled() => return Ok(false),
        }
        print_join_lines(&local, &options.room).await?;
        Ok::<_, LocalError>(true)
    };
    match setup.await {
        Ok(true) => {}
        Ok(false) => {
            local.shutdown().await;
            return Ok(());
        }
        Err(e) => {
            local.shutdown().await;
            return Err(e);
        }
    }
    if options.bots > 0 {
        println!(
            "chorus: {} talking bots in room {} (logs in {})",
            options.bots,
            options.room,
            local.workdir.join(super::files::LOG_DIR).display()
        );
    }
    if options.watch {
        println!(
            "chorus: watching {} for changes (mesh generation {})",
            options.file.display(),
            local.mesh.generation
        );
    }
    println!("chorus: press Ctrl-C to stop");

    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        report_deaths(&mut local);
        if !options.watch {
            continue;
        }
        let text = match std::fs::read_to_string(&options.file) {
            Ok(text) => text,
            Err(e) => {
                // Editors often replace a file by rename; a moment without it is normal.
                note_once(
                    &mut last_problem,
                    format!("cannot read {}: {e}", options.file.display()),
                );
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text = text.clone();
        let conf = match manifests::read_conference(&text, NAMESPACE) {
            Ok(conf) => conf,
            Err(e) => {
                note_once(
                    &mut last_problem,
                    format!(
                        "{} changed but is not a valid Conference ({}); still running generation {}",
                        options.file.display(),
                        one_line(&e.to_string()),
                        local.mesh.generation
                    ),
                );
                continue;
            }
        };
        let outcome = tokio::select! {
            outcome = local.update(&conf) => outcome,
            () = stop.cancelled() => break,
        };
        last_problem = None;
        match outcome {
            Ok(update) => {
                let mut line = if update.plan_changed {
                    format!(
                        "chorus: {} changed: mesh generation {} written to {}",
                        options.file.display(),
                        update.generation,
                        local.mesh_plan_path().display()
                    )
                } else {
                    format!(
                        "chorus: {} changed, the mesh did not (generation {})",
                        options.file.display(),
                        update.generation
                    )
                };
                if !update.started.is_empty() {
                    line.push_str(&format!("; started {}", update.started.join(", ")));
                }
                if !update.stopped.is_empty() {
                    line.push_str(&format!("; stopped {}", update.stopped.join(", ")));
                }
                println!("{line}");
                if !update.needs_restart.is_empty() {
                    println!(
                        "chorus: {} keep their old settings until restarted (restart chorus-operator local to apply)",
                        update.needs_restart.join(", ")
                    );
                }
            }
            Err(e) => println!(
                "chorus: {} changed but was not applied: {}; still running generation {}",
                options.file.display(),
                one_line(&e.to_string()),
                local.mesh.generation
            ),
        }
    }

    println!("chorus: stopping");
    report_deaths(&mut local);
    let kept = (!local.removes_workdir()).then(|| local.workdir.clone());
    local.shutdown().await;
    match kept {
        Some(dir) => println!("chorus: stopped; files kept in {}", dir.display()),
        None => println!("chorus: stopped"),
    }
    Ok(())
}

/// One join line per region that has a running server (its first one).
async fn print_join_lines(local: &LocalConference, room: &str) -> Result<(), LocalError> {
    for (region, _) in &local.layout().regions {
        let Some(server) = local.servers_in(region).find(|s| s.is_running()) else {
            println!("chorus: region {region} has no media servers");
            continue;
        };
        let token = local.token(room, &format!("guest-{region}")).await?;
        println!(
            "chorus: join at {} (region {region})",
            server.join_url(room, &token)
        );
    }
    Ok(())
}

/// One line per server that dials phones: where its SIP endpoint listens (UDP and TCP), so a
/// call manager's configuration or a packet capture can be pointed at it.
fn print_sip_lines(local: &LocalConference) {
    let Some(t) = local.mesh.telephony.as_ref() else {
        return;
    };
    for server in &local.servers {
        if let Some(sip) = server.sip {
            println!(
                "chorus: {} places phone calls through {} from SIP {sip} (UDP and TCP)",
                server.id, t.call_manager_uri
            );
        }
    }
}

fn report_deaths(local: &mut LocalConference) {
    let exits = local.reap_exited();
    for exit in exits {
        match exit.kind {
            ChildKind::Server => {
                println!(
                    "chorus: media server {} exited unexpectedly ({}); the others keep running; its log: {}",
                    exit.name,
                    exit.status,
                    exit.log.display()
                );
                local.keep_workdir();
            }
            ChildKind::Bot => println!(
                "chorus: {} exited ({}); its log: {}",
                exit.name,
                exit.status,
                exit.log.display()
            ),
        }
    }
}

/// Messages such as CEL validation errors span lines; a `chorus:` line must stay one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Print a problem once, not every second while it lasts.
fn note_once(last: &mut Option<String>, message: String) {
    if last.as_deref() != Some(message.as_str()) {
        println!("chorus: {message}");
        *last = Some(message);
    }
}
