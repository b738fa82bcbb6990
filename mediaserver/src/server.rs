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
use crate::mesh_node::{self, MeshNode};
use crate::metrics::Metrics;
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
    /// The mesh could not start (plan, certificates, socket).
    #[error("mesh: {0}")]
    Mesh(String),
}

impl ServeError {
    /// A static label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ServeError::Key(_) => "key",
            ServeError::Media(_) => "media",
            ServeError::Http(_) => "http",
            ServeError::Mesh(_) => "mesh",
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
    let plan = match source {
        MeshSource::File(path) => mesh_node::read_plan_file(path).map_err(ServeError::Mesh)?,
        MeshSource::ConfigMap { namespace, name } => {
            crate::plan_source::first_plan(namespace, name)
                .await
                .map_err(ServeError::Mesh)?
        }
    };
    if !plan.nodes.iter().any(|n| n.id == config.server_id) {
        return Err(ServeError::Mesh(format!(
            "server id {:?} is not in the mesh plan (generation {})",
            config.server_id, plan.generation
        )));
    }
    let tls = MeshTls::from_dir(&config.mesh_tls_dir, &config.server_id)
        .map_err(|e| ServeError::Mesh(e.to_string()))?;
    let socket = std::net::UdpSocket::bind(config.mesh_addr)
        .map_err(|e| ServeError::Mesh(format!("binding mesh UDP {}: {e}", config.mesh_addr)))?;
    let mesh_metrics = MeshMetrics::new();
    for c in mesh_metrics.collectors() {
        metrics
            .register(c)
            .map_err(|e| ServeError::Mesh(format!("registering mesh metrics: {e}")))?;
    }
    let node = MeshNode::start(
        &config.server_id,
        plan,
        socket,
        &tls,
        mesh_metrics,
        shutdown.clone(),
    )
    .map_err(|e| ServeError::Mesh(e.to_string()))?;
    match source {
        MeshSource::File(path) => mesh_node::watch_plan_file(path.clone(), node.clone(), shutdown),
        MeshSource::ConfigMap { namespace, name } => crate::plan_source::watch_configmap(
            namespace.clone(),
            name.clone(),
            node.clone(),
            shutdown,
        ),
    }
    tracing::info!(generation = node.generation(), addr = %config.mesh_addr, "mesh started");
    Ok(node)
}
