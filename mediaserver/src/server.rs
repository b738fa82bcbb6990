//! Wiring of one media server: the media port, the rooms, the HTTP API.
//!
//! [`serve`] takes already-bound sockets and a shutdown token, so tests bind port 0 and stop the
//! server when they are done. `main` only parses configuration and binds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chorus_crds::TelephonyMode;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{Config, MeshSource};
use crate::endpoint::MediaPort;
use crate::mesh::{MeshMetrics, MeshTls};
use crate::mesh_node::MeshNode;
use crate::metrics::Metrics;
use crate::plan_source;
use crate::room::Rooms;
use crate::telephony::calls::Calls;
use crate::telephony::edge::hub::EdgeHub;
use crate::telephony::metrics::TelephonyMetrics;
use crate::telephony::sip::SipAgent;
use crate::telephony::{self, TelephonySettings};
use crate::token::TokenKey;
use crate::transfer::{TransferSettings, Transfers};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The join key is unusable.
    #[error("join key: {0}")]
    Key(#[from] crate::token::TokenError),
    /// The media port could not start.
    #[error("media port: {0}")]
    Media(#[from] crate::endpoint::EndpointError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// The mesh plan could not be read.
    #[error("mesh plan: {0}")]
    Plan(#[from] crate::plan_source::PlanSourceError),
    /// This server is not a node of its mesh plan.
    #[error("server id {server:?} is not in the mesh plan (generation {generation})")]
    NotInPlan {
        /// This server's id.
        server: String,
        /// The plan's generation.
        generation: i64,
    },
    /// The mesh could not start (certificates, QUIC endpoint).
    #[error("mesh: {0}")]
    Mesh(#[from] crate::mesh::MeshError),
    /// The mesh's UDP socket could not be bound.
    #[error("binding mesh UDP {addr}: {source}")]
    MeshSocket {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered (a name registered twice: a bug).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Telephony could not start (credentials, CA file, SIP socket).
    #[error("telephony: {0}")]
    Telephony(#[from] crate::telephony::TelephonyError),
}

impl ServeError {
    /// A static label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ServeError::Key(_) => "key",
            ServeError::Media(_) => "media",
            ServeError::Http(_) => "http",
            ServeError::Plan(e) => e.category(),
            ServeError::NotInPlan { .. } => "not_in_plan",
            ServeError::Mesh(e) => e.category(),
            ServeError::MeshSocket { .. } => "mesh_socket",
            ServeError::Metrics(_) => "metrics",
            ServeError::Telephony(e) => e.category(),
        }
    }
}

/// A running server's handles, for tests.
#[derive(Debug, Clone)]
pub struct Running {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The rooms.
    pub rooms: Arc<Rooms>,
    /// The mesh node, when the server is part of a mesh.
    pub mesh: Option<MeshNode>,
    /// The phone calls.
    pub calls: Calls,
    /// Session transfer codes.
    pub transfers: Arc<Transfers>,
}

/// Serve until `shutdown` is cancelled. `sip`, when given, is the socket phone calls are placed
/// from (used once the plan has a `telephony` block).
pub async fn serve(
    config: Config,
    http: tokio::net::TcpListener,
    udp: tokio::net::UdpSocket,
    sip: Option<tokio::net::UdpSocket>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (running, fut) = start(config, http, udp, sip, shutdown).await?;
    drop(running);
    fut.await
}

/// Start serving; returns the handles and the future that runs the HTTP server to completion.
pub async fn start(
    config: Config,
    http: tokio::net::TcpListener,
    udp: tokio::net::UdpSocket,
    sip: Option<tokio::net::UdpSocket>,
    shutdown: CancellationToken,
) -> Result<(Running, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let key = TokenKey::new(&config.join_key)?;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    // The port holds every participant's session: as many as the server admits (its default
    // bound, 4096, would cap a server configured for more listeners).
    let mut port_config = crate::endpoint::PortConfig::new(config.public_address);
    port_config.max_peers = port_config.max_peers.max(config.max_participants);
    port_config.fan_out_workers = config.fan_out_threads();
    port_config.link_layer_fan_out = config.link_layer_fan_out;
    port_config.parallel_fan_out_min = config.parallel_fan_out_min;
    let port = Arc::new(MediaPort::start_with(udp, port_config, shutdown.clone())?);
    metrics
        .register(Box::new(crate::metrics::PortCollector::new(port.clone())))
        .expect("the port collector's names are registered once");
    let mesh = match &config.mesh {
        Some(source) => Some(start_mesh(&config, source, &metrics, shutdown.clone()).await?),
        None => None,
    };
    let rooms = Arc::new(Rooms::new(
        config.clone(),
        port,
        metrics.clone(),
        mesh.clone(),
    ));
    let calls = start_telephony(
        &config,
        sip,
        &metrics,
        mesh.as_ref(),
        rooms.clone(),
        key.clone(),
    )
    .await?;
    let ready = Arc::new(AtomicBool::new(true));
    let transfers = start_transfers(&config, mesh.as_ref());
    let state = AppState {
        config: config.clone(),
        key,
        rooms: rooms.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        mesh: mesh.clone(),
        calls: calls.clone(),
        shutdown: shutdown.clone(),
        transfers: transfers.clone(),
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(3))
            .build()
            .map_err(|e| ServeError::Http(std::io::Error::other(e)))?,
    };
    tracing::info!(config = ?config, "media server starting");
    let hang_up = calls.clone();
    let fut = async move {
        let stop = shutdown.clone();
        // Phones are hung up (a BYE each) as soon as shutdown starts, while HTTP drains.
        let calls_done = tokio::spawn(async move {
            stop.cancelled().await;
            hang_up.shutdown().await;
        });
        let stop = shutdown.clone();
        axum::serve(http, api::router(state))
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                ready.store(false, Ordering::Relaxed);
            })
            .await?;
        let _ = calls_done.await;
        Ok(())
    };
    Ok((
        Running {
            metrics,
            rooms,
            mesh,
            calls,
            transfers,
        },
        fut,
    ))
}

/// The server's transfer codes, following the plan's `transfer` block (the CRD's defaults for a
/// server alone).
fn start_transfers(config: &Config, mesh: Option<&MeshNode>) -> Arc<Transfers> {
    let Some(node) = mesh else {
        return Arc::new(Transfers::new(
            &config.server_id,
            TransferSettings::default(),
        ));
    };
    let mut plan = node.transfer();
    let transfers = Arc::new(Transfers::new(
        &config.server_id,
        TransferSettings::from(&*plan.borrow_and_update()),
    ));
    let follower = Arc::downgrade(&transfers);
    tokio::spawn(async move {
        while plan.changed().await.is_ok() {
            let Some(transfers) = follower.upgrade() else {
                break;
            };
            transfers.set_settings(TransferSettings::from(&*plan.borrow_and_update()));
        }
    });
    transfers
}

/// The server's calls, following the plan's `telephony` block: in server mode a SIP agent on
/// `sip` with the line's credentials places them; in edge mode they are handed to the edge
/// bridges that connect (their tokens checked with `key`).
async fn start_telephony(
    config: &Config,
    sip: Option<tokio::net::UdpSocket>,
    metrics: &Metrics,
    mesh: Option<&MeshNode>,
    rooms: Arc<Rooms>,
    key: TokenKey,
) -> Result<Calls, ServeError> {
    let telephony_metrics = TelephonyMetrics::new();
    for c in telephony_metrics.collectors() {
        metrics.register(c)?;
    }
    // The agent's transport outlives the server's shutdown signal: calls must still send their
    // BYEs. `Calls::shutdown` stops it once they have.
    let sip_stop = CancellationToken::new();
    let edge = EdgeHub::new(
        key,
        &config.conference,
        &config.server_id,
        config.edge_token_file.clone(),
        telephony_metrics.clone(),
    );
    let Some(node) = mesh else {
        return Ok(Calls::new(
            None,
            None,
            rooms,
            telephony_metrics,
            sip_stop,
            edge,
        ));
    };
    let line = match &config.sip_credentials_dir {
        Some(dir) => Some(telephony::read_credentials(dir)?),
        None => None,
    };
    let ca = match &config.sip_ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            telephony::TelephonyError::Config(format!("CA file {}: {e}", path.display()))
        })?),
        None => None,
    };
    let agent = match sip {
        Some(sip) => {
            let agent = SipAgent::start(sip, config.public_address, ca, sip_stop.clone()).await?;
            tracing::info!(sip = %agent.local_addr(), "SIP agent listening");
            Some(agent)
        }
        None => None,
    };
    let has_agent = agent.is_some();
    let settings = move |plan: &Option<chorus_crds::MeshTelephony>| -> Option<TelephonySettings> {
        let plan = plan.as_ref()?;
        let line = match plan.mode {
            // An edge bridge dials with its own line; this server holds none.
            TelephonyMode::Edge => None,
            TelephonyMode::Server => {
                if !has_agent {
                    tracing::error!(
                        "the plan has telephony but this server has no SIP socket; no calls"
                    );
                    return None;
                }
                let Some(line) = line.clone() else {
                    tracing::error!(
                        "the plan has telephony but no SIP credentials are mounted; no calls"
                    );
                    return None;
                };
                Some(line)
            }
        };
        match TelephonySettings::from_plan(plan, line) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "telephony settings refused; no calls");
                None
            }
        }
    };
    let mut plan = node.telephony();
    let calls = Calls::new(
        settings(&plan.borrow_and_update()),
        agent,
        rooms,
        telephony_metrics,
        sip_stop.clone(),
        edge,
    );
    let follower = calls.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sip_stop.cancelled() => break,
                changed = plan.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    follower.set_settings(settings(&plan.borrow_and_update()));
                }
            }
        }
    });
    Ok(calls)
}

async fn start_mesh(
    config: &Config,
    source: &MeshSource,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Result<MeshNode, ServeError> {
    let plan = plan_source::first_plan(source).await?;
    if !plan.nodes.iter().any(|n| n.id == config.server_id) {
        return Err(ServeError::NotInPlan {
            server: config.server_id.clone(),
            generation: plan.generation,
        });
    }
    let tls = MeshTls::from_dir(&config.mesh_tls_dir, &config.server_id)?;
    let socket =
        std::net::UdpSocket::bind(config.mesh_addr).map_err(|source| ServeError::MeshSocket {
            addr: config.mesh_addr,
            source,
        })?;
    let mesh_metrics = MeshMetrics::new();
    for c in mesh_metrics.collectors() {
        metrics.register(c)?;
    }
    let node = MeshNode::start(
        &config.server_id,
        plan,
        socket,
        &tls,
        mesh_metrics,
        shutdown.clone(),
    )?;
    plan_source::watch(source.clone(), node.clone(), shutdown);
    tracing::info!(generation = node.generation(), addr = %config.mesh_addr, "mesh started");
    Ok(node)
}
