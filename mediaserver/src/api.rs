//! The HTTP API (axum): joining works the way WHIP does, plus room info, the web client, metrics
//! and probes.
//!
//! - `POST /v1/rooms/{room}/participants`: `Authorization: Bearer <join token>`,
//!   `Content-Type: application/sdp`, body = SDP offer. `201 Created` with the SDP answer, a
//!   `Location` to DELETE for leaving, and the participant id in `Chorus-Participant-Id`.
//! - `DELETE /v1/rooms/{room}/participants/{id}`: the same token; `204`.
//! - `GET /v1/rooms/{room}`: the same token; participants and active speakers as JSON.
//! - `/v1/rooms/{room}/calls...`: "call me", a participant's desk phone brought into the room
//!   (see `api/calls.rs`).
//! - `/v1/telephony/edge/...`: the edge bridge's job stream and reports (see `api/edge.rs`).
//! - `/v1/rooms/{room}/participants/{id}/transfers`, `/v1/transfer`, `.../events` and the `/t`
//!   page: session transfer by QR code (see `api/transfer.rs`).
//! - `GET /`: the web client. `/metrics`, `/healthz`, `/readyz`.
//!
//! Every refusal is JSON `{"error": <message>, "reason": <static code>}` with a 4xx/5xx status, and is
//! counted by reason. Messages never contain tokens or keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;

mod calls;
mod edge;
mod transfer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::room::{JoinError, Rooms};
use crate::token::{TokenError, TokenKey};

/// Largest SDP offer accepted. Browsers send a few kilobytes.
const MAX_SDP_BYTES: usize = 64 * 1024;

/// What every handler reads.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The running configuration.
    pub config: Arc<Config>,
    /// Checks join tokens.
    pub key: TokenKey,
    /// The rooms of this server.
    pub rooms: Arc<Rooms>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the server can accept participants; cleared on shutdown.
    pub ready: Arc<AtomicBool>,
    /// The mesh node, whose plan generation `/readyz` reports.
    pub mesh: Option<crate::mesh_node::MeshNode>,
    /// The phone calls ("call me").
    pub calls: crate::telephony::calls::Calls,
    /// Cancelled when the server shuts down (long-lived streams end then).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Session transfer codes.
    pub transfers: Arc<crate::transfer::Transfers>,
    /// For requests to other servers of the conference (forwarded transfer codes).
    pub http: reqwest::Client,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/v1/rooms/{room}", get(room_info))
        .route("/v1/rooms/{room}/participants", post(join))
        .route("/v1/rooms/{room}/participants/{id}", delete(leave))
        .route("/v1/rooms/{room}/calls", post(calls::create))
        .route(
            "/v1/rooms/{room}/calls/{id}",
            get(calls::read).delete(calls::hang_up),
        )
        .route("/v1/rooms/{room}/calls/{id}/events", get(calls::events))
        .route(
            "/v1/rooms/{room}/participants/{id}/transfers",
            post(transfer::issue),
        )
        .route(
            "/v1/rooms/{room}/participants/{id}/events",
            get(transfer::events),
        )
        .route("/v1/transfer", post(transfer::redeem))
        .route("/t", get(index))
        .route("/v1/telephony/edge/jobs", get(edge::jobs))
        .route("/v1/telephony/edge/calls/{id}", post(edge::report))
        .route("/v1/telephony/edge/status", post(edge::status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_SDP_BYTES))
        .with_state(state)
}

/// A refusal: status, static reason, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({"error": self.message, "reason": self.reason})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, e.category(), e.to_string())
    }
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        use crate::endpoint::EndpointError as Ep;
        let status = match &e {
            JoinError::Endpoint(inner) => match inner {
                Ep::MalformedSdp(_) | Ep::UnsupportedOffer(_) => StatusCode::BAD_REQUEST,
                // The offer parsed but WebRTC could not answer it: the offer's content is at fault.
                Ep::Negotiation(_) => StatusCode::UNPROCESSABLE_ENTITY,
                // Full or shutting down: another server (or a retry) can take the participant.
                Ep::TooManyPeers(_) | Ep::PortClosed | Ep::Overloaded { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                Ep::Socket(_) | Ep::Workers(_) | Ep::PeerClosed(_) | Ep::SendQueueFull => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            JoinError::Mixer(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JoinError::RoomFull { .. } => StatusCode::FORBIDDEN,
            JoinError::ServerFull { .. }
            | JoinError::TooManyRooms { .. }
            | JoinError::RoomClosed => StatusCode::SERVICE_UNAVAILABLE,
            JoinError::NotFound => StatusCode::NOT_FOUND,
            JoinError::Moved => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.category(), e.to_string())
    }
}

fn check_room_name(room: &str) -> Result<(), ApiError> {
    let ok = !room.is_empty()
        && room.len() <= 64
        && room
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_room_name",
            "room names are 1 to 64 characters of letters, digits, '-' and '_'",
        ))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, TokenError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(TokenError::Missing)
}

fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    room: &str,
) -> Result<crate::token::Claims, ApiError> {
    check_room_name(room)?;
    let token = bearer(headers)?;
    Ok(state
        .key
        .verify(token, &state.config.conference, room, SystemTime::now())?)
}

/// Count a refusal and pass it on.
fn counted(state: &AppState, e: ApiError) -> ApiError {
    state
        .metrics
        .joins_rejected
        .with_label_values(&[e.reason])
        .inc();
    e
}

async fn join(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = authorize(&state, &headers, &room).map_err(|e| counted(&state, e))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/sdp") {
        return Err(counted(
            &state,
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_content_type",
                "send the SDP offer with Content-Type: application/sdp",
            ),
        ));
    }
    let offer = std::str::from_utf8(&body).map_err(|_| {
        counted(
            &state,
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_offer",
                "the SDP offer is not UTF-8",
            ),
        )
    })?;
    let joined = state
        .rooms
        .join(&room, &claims.sub, offer)
        .await
        .map_err(|e| counted(&state, e.into()))?;
    let location = format!("/v1/rooms/{room}/participants/{}", joined.id);
    Ok((
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_owned()),
            (header::LOCATION, location),
            (
                header::HeaderName::from_static("chorus-participant-id"),
                joined.id.to_string(),
            ),
        ],
        joined.answer,
    )
        .into_response())
}

async fn leave(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let claims = authorize(&state, &headers, &room)?;
    // The device's token names its transport generation: one a participant moved away from
    // cannot remove it (409 moved).
    state.rooms.leave_from(&room, id, claims.generation).await?;
    state.transfers.revoke(&room, id);
    Ok(StatusCode::NO_CONTENT)
}

async fn room_info(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &room)?;
    let info = state.rooms.info(&room).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_room",
            format!("room {room:?} has nobody in it"),
        )
    })?;
    Ok(axum::Json(info).into_response())
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if state.ready.load(Ordering::Relaxed) {
        match &state.mesh {
            Some(node) => (
                StatusCode::OK,
                format!("ready mesh-generation={}\n", node.generation()),
            ),
            None => (StatusCode::OK, "ready\n".to_owned()),
        }
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    }
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../web/index.html"),
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../web/app.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointError;
    use crate::media::MediaError;

    /// Every join and endpoint error reaches HTTP with its own status and reason, never as a
    /// generic "bad offer".
    #[test]
    fn every_join_error_has_its_status_and_reason() {
        let io = || std::io::Error::other("boom");
        let table: Vec<(JoinError, StatusCode, &str)> = vec![
            (
                EndpointError::MalformedSdp("no v= line".into()).into(),
                StatusCode::BAD_REQUEST,
                "sdp_malformed",
            ),
            (
                EndpointError::UnsupportedOffer("no Opus".into()).into(),
                StatusCode::BAD_REQUEST,
                "sdp_unsupported",
            ),
            (
                EndpointError::Negotiation("no DTLS fingerprint".into()).into(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "negotiation",
            ),
            (
                EndpointError::TooManyPeers(500).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
            ),
            (
                EndpointError::PortClosed.into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "port_closed",
            ),
            (
                EndpointError::Socket(io()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "socket",
            ),
            (
                EndpointError::PeerClosed(3).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "peer_closed",
            ),
            (
                EndpointError::SendQueueFull.into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "backpressure",
            ),
            (
                MediaError::InvalidConfig("frame".into()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "invalid_config",
            ),
            (
                JoinError::RoomFull { max: 5 },
                StatusCode::FORBIDDEN,
                "room_full",
            ),
            (
                JoinError::ServerFull { max: 5 },
                StatusCode::SERVICE_UNAVAILABLE,
                "server_full",
            ),
            (
                JoinError::TooManyRooms { max: 5 },
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_rooms",
            ),
            (JoinError::NotFound, StatusCode::NOT_FOUND, "not_found"),
            (
                JoinError::RoomClosed,
                StatusCode::SERVICE_UNAVAILABLE,
                "room_closed",
            ),
        ];
        for (error, status, reason) in table {
            let message = error.to_string();
            let api = ApiError::from(error);
            assert_eq!((api.status, api.reason), (status, reason), "{message}");
            assert_eq!(api.message, message);
        }
    }

    #[test]
    fn every_token_error_is_401_with_its_reason() {
        for (error, reason) in [
            (TokenError::Missing, "token_missing"),
            (TokenError::Expired, "token_expired"),
        ] {
            let api = ApiError::from(error);
            assert_eq!((api.status, api.reason), (StatusCode::UNAUTHORIZED, reason));
            let response = api.into_response();
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE),
                Some(&HeaderValue::from_static("Bearer"))
            );
        }
    }
}
