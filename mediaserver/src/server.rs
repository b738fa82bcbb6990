//! Wiring of one media server: the media port, the rooms, the HTTP API.
//!
//! [`serve`] takes already-bound sockets and a shutdown token, so tests bind port 0 and stop the
//! server when they are done. `main` only parses configuration and binds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::endpoint::MediaPort;
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
}

impl ServeError {
    /// A static label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ServeError::Key(_) => "key",
            ServeError::Media(_) => "media",
            ServeError::Http(_) => "http",
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
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    http: tokio::net::TcpListener,
    udp: tokio::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (running, fut) = start(config, http, udp, shutdown)?;
    drop(running);
    fut.await
}

/// Start serving; returns the handles and the future that runs the HTTP server to completion.
pub fn start(
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
    let rooms = Arc::new(Rooms::new(config.clone(), port, metrics.clone()));
    let ready = Arc::new(AtomicBool::new(true));
    let state = AppState {
        config: config.clone(),
        key,
        rooms: rooms.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
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
    Ok((Running { metrics, rooms }, fut))
}
