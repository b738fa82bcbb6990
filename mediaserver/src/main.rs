//! `chorus-mediaserver` command line: `serve`, `edge` and `token`.
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
    /// Bridge phone calls from inside an enterprise network: register with the call manager as
    /// a line, take call jobs from the conference, dial, and join rooms over WebRTC. Opens no
    /// listening socket but SIP and each call's media.
    Edge(Box<EdgeArgs>),
    /// Mint a join token (or, with `--scope edge`, an edge bridge's token) from a key file.
    Token {
        /// The file holding the join key (as the operator's Secret holds it).
        #[arg(long)]
        key_file: PathBuf,
        /// The conference the token is for.
        #[arg(long)]
        conference: String,
        /// `join` (a participant of one room) or `edge` (an edge bridge of the conference).
        #[arg(long, value_enum, default_value = "join")]
        scope: TokenScope,
        /// The room (join tokens).
        #[arg(long, required_if_eq("scope", "join"))]
        room: Option<String>,
        /// Who joins (join tokens) or the bridge's name (edge tokens).
        #[arg(long)]
        identity: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum TokenScope {
    Join,
    Edge,
}

#[derive(clap::Args, Debug)]
struct EdgeArgs {
    /// A conference server's URL (repeat for each server the bridge serves).
    #[arg(
        long = "server",
        env = "CHORUS_EDGE_SERVERS",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<reqwest::Url>,
    /// The file holding the bridge's edge token (its Secret, mounted).
    #[arg(long, env = "CHORUS_EDGE_TOKEN_FILE")]
    token_file: PathBuf,
    /// The call manager, as reached from here: `sip:host[:port]` (or `sips:` for TLS).
    #[arg(long, env = "CHORUS_EDGE_CALL_MANAGER")]
    call_manager: String,
    /// SIP transport to the call manager: udp, tcp or tls.
    #[arg(long, env = "CHORUS_EDGE_SIP_TRANSPORT", default_value = "udp")]
    sip_transport: String,
    /// The directory holding the line's `username` and `password` files.
    #[arg(long, env = "CHORUS_SIP_CREDENTIALS_DIR")]
    credentials_dir: PathBuf,
    /// PEM file of a private CA (the call manager's TLS, the servers' HTTPS).
    #[arg(long, env = "CHORUS_SIP_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The local SIP address (UDP; TCP and TLS connections are dialled from it).
    #[arg(long, env = "CHORUS_EDGE_SIP_ADDR", default_value = "0.0.0.0:5060")]
    sip_addr: std::net::SocketAddr,
    /// The address phones send RTP to and our Contact names (this host inside the network).
    /// Default: the SIP address's, when it is not a wildcard.
    #[arg(long, env = "CHORUS_PUBLIC_ADDRESS")]
    public_address: Option<std::net::IpAddr>,
    /// Ports for phone RTP, `LOW-HIGH` (default: any free port).
    #[arg(long, env = "CHORUS_EDGE_RTP_PORTS")]
    rtp_ports: Option<String>,
    /// Registration expiry asked of the call manager, seconds (refreshed at 75 %).
    #[arg(long, env = "CHORUS_EDGE_REGISTER_EXPIRES", default_value_t = 300)]
    register_expires: u32,
    /// Stop when standard input closes.
    #[arg(long)]
    exit_on_stdin_close: bool,
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
    /// Threads that seal and send a large room's frame to its listeners (0: one per core).
    #[arg(long)]
    fan_out_workers: Option<usize>,
    /// Fan-outs to at least this many participants are split across the fan-out workers.
    #[arg(long)]
    parallel_fan_out_min: Option<usize>,
    /// Send listeners' media as whole Ethernet frames through packet sockets (needs
    /// CAP_NET_RAW; falls back on the UDP socket where it cannot), skipping the kernel's UDP/IP
    /// send path. The frames skip this host's netfilter OUTPUT rules.
    #[arg(long)]
    link_layer_fan_out: bool,
    /// Length of the top list.
    #[arg(long)]
    top_speakers: Option<usize>,
    /// Frame length in ms (10 or 20).
    #[arg(long)]
    frame_ms: Option<u32>,
    /// Encode the mixes in Opus's restricted low-delay mode (2.5 ms look-ahead, no in-band FEC).
    /// Alone only: in a mesh the plan's `mixing.lowDelay` decides.
    #[arg(long)]
    low_delay: bool,
    /// Mix on a fixed tick instead of one aligned to the talkers' arrivals. Alone only: in a
    /// mesh the plan's `mixing.alignTicks` decides.
    #[arg(long)]
    fixed_tick: bool,
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
    /// Edge mode: the file holding the edge token bridges must present (the Secret, mounted).
    #[arg(long)]
    edge_token_file: Option<PathBuf>,
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
            scope,
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
            let ttl = Duration::from_secs(ttl);
            let token = match scope {
                TokenScope::Join => key.mint(
                    &conference,
                    room.as_deref()
                        .context("--room is required for a join token")?,
                    &identity,
                    ttl,
                    SystemTime::now(),
                ),
                TokenScope::Edge => key.mint_edge(&conference, &identity, ttl, SystemTime::now()),
            };
            println!("{token}");
            Ok(())
        }
        Command::Serve(args) => serve(*args),
        Command::Edge(args) => edge(*args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rsipstack logs every SIP message whole at info: phone numbers are personal data, so
        // its messages stay out of the log unless RUST_LOG asks for them.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,rsipstack=warn,webrtc=warn,rtc=warn")
        });
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Parse `LOW-HIGH`.
fn port_range(text: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let (low, high) = text
        .split_once('-')
        .with_context(|| format!("--rtp-ports {text:?}: expected LOW-HIGH"))?;
    let (low, high): (u16, u16) = (
        low.trim()
            .parse()
            .with_context(|| format!("--rtp-ports {text:?}"))?,
        high.trim()
            .parse()
            .with_context(|| format!("--rtp-ports {text:?}"))?,
    );
    anyhow::ensure!(
        low > 0 && low <= high,
        "--rtp-ports {text:?}: LOW must be 1..=HIGH"
    );
    Ok(low..=high)
}

fn edge(args: EdgeArgs) -> anyhow::Result<()> {
    use chorus_mediaserver::telephony::edge::bridge::{self, BridgeConfig};
    use chorus_mediaserver::telephony::edge::webrtc_room::MediaAddresses;
    use chorus_mediaserver::telephony::{read_credentials, sip::CallManager};
    init_logging();
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading the edge token {}", args.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "the edge token file {} is empty",
        args.token_file.display()
    );
    let manager =
        CallManager::parse(&args.call_manager, &args.sip_transport).context("--call-manager")?;
    let line = read_credentials(&args.credentials_dir).context("--credentials-dir")?;
    let ca_pem = match &args.ca_file {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let bind = args.sip_addr.ip();
    let advertised = match args.public_address {
        Some(ip) => ip,
        None if !bind.is_unspecified() => bind,
        None => anyhow::bail!(
            "--public-address is needed when --sip-addr is a wildcard: phones must be told where to send RTP"
        ),
    };
    let rtp_ports = args.rtp_ports.as_deref().map(port_range).transpose()?;
    anyhow::ensure!(
        args.register_expires >= 10,
        "--register-expires must be at least 10 seconds"
    );
    let config = BridgeConfig {
        servers: args.servers,
        token,
        manager,
        line,
        ca_pem,
        addresses: MediaAddresses {
            bind,
            advertised,
            rtp_ports,
        },
        register_expires: args.register_expires,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let exit_on_stdin_close = args.exit_on_stdin_close;
    runtime.block_on(async move {
        let sip = tokio::net::UdpSocket::bind(args.sip_addr)
            .await
            .with_context(|| format!("binding SIP {}", args.sip_addr))?;
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone());
        if exit_on_stdin_close {
            stop_when_stdin_closes(shutdown.clone()).context("watching standard input")?;
        }
        eprintln!(
            "chorus-mediaserver edge: SIP on {}, {} conference server(s)",
            args.sip_addr,
            config.servers.len()
        );
        bridge::run(config, sip, shutdown)
            .await
            .context("edge bridge")
    })
}

/// Cancel `shutdown` on SIGINT or SIGTERM.
fn watch_signals(shutdown: CancellationToken) {
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::spawn(async move {
                term.recv().await;
                shutdown.cancel();
            });
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let exit_on_stdin_close = args.exit_on_stdin_close;
    init_logging();

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
        fan_out_workers: args.fan_out_workers,
        parallel_fan_out_min: args.parallel_fan_out_min,
        link_layer_fan_out: args.link_layer_fan_out.then_some(true),
        top_speakers: args.top_speakers,
        frame_ms: args.frame_ms,
        low_delay: args.low_delay.then_some(true),
        align_ticks: args.fixed_tick.then_some(false),
        mesh_plan_file: args.mesh_plan_file,
        mesh_addr: args.mesh_addr,
        mesh_tls_dir: args.mesh_tls_dir,
        sip_addr: args.sip_addr,
        sip_credentials_dir: args.sip_credentials_dir,
        sip_ca_file: args.sip_ca_file,
        edge_token_file: args.edge_token_file,
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
        watch_signals(shutdown.clone());
        if exit_on_stdin_close {
            stop_when_stdin_closes(shutdown.clone()).context("watching standard input")?;
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
