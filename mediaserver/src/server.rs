//! Wiring of one media server: the media port, the rooms, the HTTP API.
//!
//! [`serve`] takes already-bound sockets and a shutdown token, so tests bind port 0 and stop the
//! server when they are done. `main` only parses configuration and binds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{Config, MeshSource};
use crate::endpoint::MediaPort;
use crate::mesh::{MeshMetrics, MeshTls};
use crate::mesh_node::MeshNode;
use crate::metrics::Metrics;
use crate::plan_source;
use crate::room::Rooms;
use crate::token::TokenKey;

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
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    http: tokio::net::TcpListener,
    udp: tokio::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (running, fut) = start(config, http, udp, shutdown).await?;
    drop(running);
    fut.await
}

/// Start serving; returns the handles and the future that runs the HTTP server to completion.
pub async fn start(
    config: Config,
    http: tokio::net::TcpListener,
    udp: tokio::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(Running, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let key = TokenKey::new(&config.join_key)?;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let port = Arc::new(MediaPort::start(
        udp,
        config.public_address,
        shutdown.clone(),
    )?);
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
    let ready = Arc::new(AtomicBool::new(true));
    let state = AppState {
        config: config.clone(),
        key,
        rooms: rooms.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        mesh: mesh.clone(),
    };
    tracing::info!(config = ?config, "media server starting");
    let fut = async move {
        let stop = shutdown.clone();
        axum::serve(http, api::router(state))
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                ready.store(false, Ordering::Relaxed);
            })
            .await?;
        Ok(())
    };
    Ok((
        Running {
            metrics,
            rooms,
            mesh,
        },
        fut,
    ))
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
