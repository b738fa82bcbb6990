//! `chorus-mediaserver` command line: `serve` and `token`.
//!
//! Thin by design: configuration layers are merged by [`chorus_mediaserver::config::load`], sockets
//! are bound here, and everything else is the library.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use chorus_mediaserver::config::{self, Layer};
use chorus_mediaserver::token::TokenKey;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "chorus-mediaserver", version, about = "A Chorus media server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve participants: HTTP API and web client, one UDP media port.
    Serve(Box<ServeArgs>),
    /// Mint a join token from a key file.
    Token {
        /// The file holding the join key (as the operator's Secret holds it).
        #[arg(long)]
        key_file: PathBuf,
        /// The conference the token is for.
        #[arg(long)]
        conference: String,
        /// The room.
        #[arg(long)]
        room: String,
        /// Who joins.
        #[arg(long)]
        identity: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// A TOML config file (keys as the flags' names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP address.
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
    /// UDP media address.
    #[arg(long)]
    udp_addr: Option<std::net::SocketAddr>,
    /// Address advertised in ICE candidates.
    #[arg(long)]
    public_address: Option<std::net::IpAddr>,
    /// Server id.
    #[arg(long)]
    server_id: Option<String>,
    /// Region.
    #[arg(long)]
    region: Option<String>,
    /// Conference name (tokens must name it).
    #[arg(long)]
    conference: Option<String>,
    /// File holding the join key.
    #[arg(long)]
    join_key_file: Option<PathBuf>,
    /// Participants this server accepts.
    #[arg(long)]
    max_participants: Option<usize>,
    /// Participants one room accepts.
    #[arg(long)]
    max_room_participants: Option<usize>,
    /// Length of the top list.
    #[arg(long)]
    top_speakers: Option<usize>,
    /// Frame length in ms (10 or 20).
    #[arg(long)]
    frame_ms: Option<u32>,
    /// The mesh plan as a JSON file (local mode); re-read when it changes.
    #[arg(long)]
    mesh_plan_file: Option<PathBuf>,
    /// UDP address of the QUIC mesh endpoint.
    #[arg(long)]
    mesh_addr: Option<std::net::SocketAddr>,
    /// Directory with ca.crt, <server-id>.crt and <server-id>.key.
    #[arg(long)]
    mesh_tls_dir: Option<PathBuf>,
    /// SIP address for phone calls (the conference's telephony); none: no calls.
    #[arg(long)]
    sip_addr: Option<std::net::SocketAddr>,
    /// Directory holding the SIP line's `username` and `password` files.
    #[arg(long)]
    sip_credentials_dir: Option<PathBuf>,
    /// PEM file of the CA that signed the call manager's TLS certificate.
    #[arg(long)]
    sip_ca_file: Option<PathBuf>,
    /// Stop when standard input closes (set by `chorus-operator local`, which holds the other end
    /// of a pipe there, so the server ends with it however it ends).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

/// How long a server whose parent is gone gets to stop on its own before it exits regardless.
const ORPHAN_GRACE: Duration = Duration::from_millis(300);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            key_file,
            conference,
            room,
            identity,
            ttl,
        } => {
            let mut key = std::fs::read(&key_file)
                .with_context(|| format!("reading {}", key_file.display()))?;
            while matches!(key.last(), Some(b'\n' | b'\r')) {
                key.pop();
            }
            let key = TokenKey::new(&key).context("join key")?;
            println!(
                "{}",
                key.mint(
                    &conference,
                    &room,
                    &identity,
                    Duration::from_secs(ttl),
                    SystemTime::now()
                )
            );
            Ok(())
        }
        Command::Serve(args) => serve(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let exit_on_stdin_close = args.exit_on_stdin_close;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rsipstack logs every SIP message whole at info: phone numbers are personal data, so
        // its messages stay out of the log unless RUST_LOG asks for them.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rsipstack=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let flags = Layer {
        http_addr: args.http_addr,
        udp_addr: args.udp_addr,
        public_address: args.public_address,
        server_id: args.server_id,
        region: args.region,
        conference: args.conference,
        join_key_file: args.join_key_file,
        max_participants: args.max_participants,
        max_room_participants: args.max_room_participants,
        top_speakers: args.top_speakers,
        frame_ms: args.frame_ms,
        mesh_plan_file: args.mesh_plan_file,
        mesh_addr: args.mesh_addr,
        mesh_tls_dir: args.mesh_tls_dir,
        sip_addr: args.sip_addr,
        sip_credentials_dir: args.sip_credentials_dir,
        sip_ca_file: args.sip_ca_file,
        ..Layer::default()
    };
    let config = config::load(args.config.as_deref(), |k| std::env::var(k).ok(), &flags)
        .context("configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let http = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding HTTP {}", config.http_addr))?;
        let udp = tokio::net::UdpSocket::bind(config.udp_addr)
            .await
            .with_context(|| format!("binding UDP {}", config.udp_addr))?;
        let sip = match config.sip_addr {
            Some(addr) => Some(
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .with_context(|| format!("binding SIP {addr}"))?,
            ),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        if exit_on_stdin_close {
            stop_when_stdin_closes(shutdown.clone()).context("watching standard input")?;
        }
        #[cfg(unix)]
        {
            let stop = shutdown.clone();
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::spawn(async move {
                    term.recv().await;
                    stop.cancel();
                });
            }
        }
        eprintln!(
            "chorus-mediaserver {} ({}) listening on http://{} and udp {}",
            config.server_id, config.region, config.http_addr, config.udp_addr
        );
        chorus_mediaserver::server::serve(config, http, udp, sip, shutdown)
            .await
            .context("media server")
    })
}

/// Cancel `shutdown` once standard input reaches its end, then exit after [`ORPHAN_GRACE`] if the
/// server has not stopped by then: nobody is left to send SIGKILL, and a drain stuck on a client
/// must not keep the ports.
fn stop_when_stdin_closes(shutdown: CancellationToken) -> std::io::Result<()> {
    chorus_mediaserver::stdin_watch::on_stdin_closed(move || {
        eprintln!("chorus-mediaserver: standard input closed (its parent is gone); stopping");
        shutdown.cancel();
        std::thread::sleep(ORPHAN_GRACE);
        std::process::exit(1);
    })
}
