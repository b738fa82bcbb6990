//! `chorus-operator` command line: `crd`, `plan -f FILE`, `run`, `local -f FILE`.
//!
//! Thin by design: parse flags (defaults, then environment, then flags), then call the library.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use chorus_operator::controller::{self, RunOptions};
use chorus_operator::http::{self, HttpState};
use chorus_operator::manifests;
use chorus_operator::metrics::Metrics;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-operator",
    version,
    about = "Runs Chorus conferences on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Conference CRD as YAML (pipe to `kubectl apply -f -`).
    Crd,
    /// Print every object the operator would create for a Conference, without a cluster.
    Plan {
        /// The Conference YAML file ("-" for standard input).
        #[arg(short = 'f', long = "file")]
        file: String,
        /// Namespace for a Conference that names none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Run the controller against the cluster from the kubeconfig or in-cluster config.
    Run(RunArgs),
    /// Run a Conference on this machine: its media servers as local processes, each region on its
    /// own 127.0.0.x address. Prints the URLs to join; Ctrl-C stops everything.
    Local(LocalArgs),
}

#[derive(clap::Args, Debug)]
struct LocalArgs {
    /// The Conference YAML file.
    #[arg(short = 'f', long = "file")]
    file: std::path::PathBuf,
    /// Synthetic talkers (espeak-ng speech over WebRTC) to start, spread over the regions.
    #[arg(long, default_value_t = 0)]
    bots: usize,
    /// The room the bots join and the printed URLs open.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Directory for the mesh plan, TLS material, join key and logs (default: a fresh temp dir).
    #[arg(long)]
    workdir: Option<std::path::PathBuf>,
    /// The chorus-mediaserver binary (default: next to this executable).
    #[arg(long)]
    mediaserver_bin: Option<std::path::PathBuf>,
    /// The chorus-bot binary (default: next to this executable).
    #[arg(long)]
    bot_bin: Option<std::path::PathBuf>,
    /// HTTP port of each region's first server; server i uses base-port + i.
    #[arg(long, default_value_t = chorus_crds::names::SIGNAL_PORT)]
    base_port: u16,
    /// Re-read the file every second and apply changes live (mixing; servers added or removed).
    #[arg(long)]
    watch: bool,
    /// Directory of the Secret manifests the Conference names, each `<secret-name>.yaml`
    /// (default: the Conference file's directory).
    #[arg(long = "secrets", value_name = "DIR")]
    secrets: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CHORUS_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CHORUS_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// Take part in leader election (needed when running more than one replica).
    #[arg(long, env = "CHORUS_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "CHORUS_LEASE_NAME", default_value = "chorus-operator")]
    lease_name: String,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (defaults to the pod name).
    #[arg(long, env = "POD_NAME", default_value = "chorus-operator-local")]
    identity: String,
    /// Lease duration in seconds (10..=120).
    #[arg(long, env = "CHORUS_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(10..=120))]
    lease_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "CHORUS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", manifests::crd_yaml());
            Ok(())
        }
        Command::Plan { file, namespace } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let yaml = manifests::plan_yaml(&text, &namespace)
                .with_context(|| format!("planning {file}"))?;
            print!("{yaml}");
            Ok(())
        }
        Command::Run(args) => run(args),
        Command::Local(args) => local(args),
    }
}

fn local(args: LocalArgs) -> anyhow::Result<()> {
    // Warnings only: the runtime talks to the user through its `chorus:` lines on stdout.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let options = chorus_operator::local::cli::CliOptions {
        file: args.file,
        bots: args.bots,
        room: args.room,
        workdir: args.workdir,
        mediaserver_bin: args.mediaserver_bin,
        bot_bin: args.bot_bin,
        base_port: args.base_port,
        watch: args.watch,
        secrets_dir: args.secrets,
    };
    let result = runtime.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        chorus_operator::local::cli::run(options, stop).await
    });
    drop(runtime);
    if let Err(e) = result {
        // The message is the whole story (server, log path, fix); a backtrace would bury it. Every
        // child is already stopped by now.
        eprintln!("chorus: error ({}): {e}", e.category());
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));

        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind(args.http_addr)
            .await
            .with_context(|| format!("binding {}", args.http_addr))?;
        let http_stop = stop.clone();
        let server = tokio::spawn(http::serve(
            listener,
            HttpState {
                metrics: metrics.clone(),
                ready: ready.clone(),
            },
            async move { http_stop.cancelled().await },
        ));

        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (kubeconfig or in-cluster config)")?;
        let options = RunOptions {
            namespace: args.namespace,
            leader_elect: args.leader_elect,
            lease_name: args.lease_name,
            lease_namespace: args.lease_namespace,
            identity: args.identity,
            lease_seconds: args.lease_seconds,
        };
        let result = controller::run(client, options, metrics, ready.clone(), stop.clone()).await;
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
        stop.cancel();
        server
            .await
            .context("HTTP server task")?
            .context("HTTP server")?;
        result.context("controller")
    })
}

async fn cancel_on_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
    stop.cancel();
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
