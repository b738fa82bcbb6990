//! The edge bridge's routes (DESIGN §11, edge placement; the protocol is in
//! [`crate::telephony::edge::protocol`]):
//!
//! - `GET /v1/telephony/edge/jobs`: `Authorization: Bearer <edge token>`; a server-sent event
//!   stream (`hello`, then `call` and `hangup` jobs, keep-alive comments between). 401 for a
//!   missing, wrong, expired or foreign token (the reason is logged and counted), 409 when the
//!   conference's telephony is not in edge mode.
//! - `POST /v1/telephony/edge/calls/{id}`: the same token; a call report from the bridge the call
//!   was handed to. `204`.
//! - `POST /v1/telephony/edge/status`: the same token; whether the bridge's line is registered.
//!   `204`.
//!
//! The stream ends when the server shuts down (after the hang-ups of its calls were sent), so a
//! graceful drain never waits on a bridge.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use super::{ApiError, AppState, bearer};
use crate::telephony::TelephonyError;
use crate::telephony::edge::hub::{BridgeSession, EdgeMessage};
use crate::telephony::edge::protocol::{self, CallReport, StatusReport};

/// Check the bridge's token; a refusal is logged with its reason (never the token).
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<crate::token::EdgeClaims, ApiError> {
    state
        .calls
        .edge()
        .authenticate(bearer(headers).ok())
        .map_err(|e| {
            tracing::warn!(reason = %e, "an edge bridge was refused");
            ApiError::from(e)
        })
}

fn edge_mode(state: &AppState) -> Result<chorus_crds::MeshTelephony, ApiError> {
    state
        .mesh
        .as_ref()
        .and_then(|node| node.telephony().borrow().clone())
        .filter(|t| t.mode == chorus_crds::TelephonyMode::Edge)
        .ok_or_else(|| TelephonyError::NotEdgeMode.into())
}

pub(super) async fn jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let claims = authenticate(&state, &headers)?;
    let telephony = edge_mode(&state)?;
    let hub = state.calls.edge().clone();
    let session = hub.attach(&claims.sub);
    let hello = hub.hello(session.id, telephony);
    let first = Event::default()
        .event(protocol::event::HELLO)
        .json_data(&hello)
        .map_err(|e| ApiError::from(TelephonyError::Edge(format!("hello: {e}"))))?;
    let shutdown = state.shutdown.clone();
    // The session lives in the stream: when the bridge goes away the stream is dropped, and
    // with it the session, which detaches the bridge.
    let stream = futures::stream::unfold(
        (Some(first), session, shutdown),
        |(first, mut session, shutdown): (Option<Event>, BridgeSession, _)| async move {
            if let Some(first) = first {
                return Some((Ok(first), (None, session, shutdown)));
            }
            let message = tokio::select! {
                // Jobs queued before the shutdown (the hang-ups it sent) go out first.
                biased;
                message = session.jobs.recv() => message?,
                () = shutdown.cancelled() => return None,
            };
            let event = match &message {
                EdgeMessage::Call(job) => {
                    Event::default().event(protocol::event::CALL).json_data(job)
                }
                EdgeMessage::Hangup(job) => Event::default()
                    .event(protocol::event::HANGUP)
                    .json_data(job),
            }
            .unwrap_or_else(|_| Event::default().comment("unencodable job"));
            Some((Ok(event), (None, session, shutdown)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(protocol::KEEPALIVE)))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not a valid report: {e}"),
        )
    })
}

pub(super) async fn report(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers)?;
    let report: CallReport = parse(&body)?;
    state.calls.edge_report(report.bridge_id, id, report)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers)?;
    let report: StatusReport = parse(&body)?;
    state
        .calls
        .edge()
        .set_registered(report.bridge_id, report.registered)?;
    Ok(StatusCode::NO_CONTENT)
}
