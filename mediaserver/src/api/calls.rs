//! The calls API of DESIGN §11 ("call me"):
//!
//! - `POST /v1/rooms/{room}/calls`: the join token of a participant in the room; JSON
//!   `{"to": "1001", "participantId": 7, "ringTimeoutSeconds": 20, "audio": "replace"}`;
//!   `202 Accepted` with the call resource and its `Location`.
//! - `GET /v1/rooms/{room}/calls/{id}`: the call resource (state, `endReason`, `sipStatus`,
//!   routing, codec, every transition).
//! - `GET /v1/rooms/{room}/calls/{id}/events`: server-sent events, one `state` event per
//!   transition (the ones so far first), ending after `ended`.
//! - `DELETE /v1/rooms/{room}/calls/{id}`: CANCEL while ringing, BYE when active; `202`.
//!
//! Only the identity that placed a call can see or end it; another identity gets 404, as if it
//! did not exist.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::{ApiError, AppState, authorize};
use crate::telephony::TelephonyError;
use crate::telephony::call::CallState;
use crate::telephony::calls::{CallInfo, CallRequest};

impl From<TelephonyError> for ApiError {
    fn from(e: TelephonyError) -> Self {
        let status = match &e {
            TelephonyError::Disabled => StatusCode::FORBIDDEN,
            TelephonyError::Target(_) | TelephonyError::ForeignHost | TelephonyError::Media(_) => {
                StatusCode::BAD_REQUEST
            }
            TelephonyError::NoSuchParticipant(_) => StatusCode::FORBIDDEN,
            TelephonyError::AlreadyCalling(_) => StatusCode::CONFLICT,
            TelephonyError::IdentityLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            TelephonyError::ServerLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
            TelephonyError::NoSuchCall => StatusCode::NOT_FOUND,
            TelephonyError::NoEdgeBridge => StatusCode::SERVICE_UNAVAILABLE,
            TelephonyError::EdgeToken(_) => StatusCode::UNAUTHORIZED,
            TelephonyError::NotEdgeMode => StatusCode::CONFLICT,
            TelephonyError::Edge(_) => StatusCode::BAD_GATEWAY,
            TelephonyError::NoSuchBridge(_) => StatusCode::NOT_FOUND,
            TelephonyError::Config(_)
            | TelephonyError::Credentials(_)
            | TelephonyError::Socket(_)
            | TelephonyError::Sip(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.category(), e.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) async fn create(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let claims = authorize(&state, &headers, &room)?;
    let request: CallRequest = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the body is not a call request: {e}")))?;
    let call = state.calls.create(&room, &claims.sub, request)?;
    let location = format!("/v1/rooms/{room}/calls/{}", call.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(call),
    )
        .into_response())
}

fn owned_call(
    state: &AppState,
    headers: &HeaderMap,
    room: &str,
    id: u64,
) -> Result<tokio::sync::watch::Receiver<CallInfo>, ApiError> {
    let claims = authorize(state, headers, room)?;
    if !state.calls.owned_by(id, &claims.sub) {
        return Err(TelephonyError::NoSuchCall.into());
    }
    Ok(state.calls.watch(room, id)?)
}

pub(super) async fn read(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let call = owned_call(&state, &headers, &room, id)?;
    let info = call.borrow().clone();
    Ok(axum::Json(info).into_response())
}

pub(super) async fn hang_up(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    owned_call(&state, &headers, &room, id)?;
    let info = state.calls.hang_up(&room, id)?;
    Ok((StatusCode::ACCEPTED, axum::Json(info)).into_response())
}

pub(super) async fn events(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let call = owned_call(&state, &headers, &room, id)?;
    // One event per transition: each wake-up sends the transitions not sent yet, so two quick
    // transitions between wake-ups are both sent.
    let stream =
        futures::stream::unfold((call, 0usize, false), |(mut call, sent, done)| async move {
            if done {
                return None;
            }
            loop {
                let (next, ended) = {
                    let info = call.borrow_and_update();
                    let next = info.events.get(sent).cloned();
                    (next, info.state == CallState::Ended)
                };
                if let Some(transition) = next {
                    let last = transition.state == CallState::Ended;
                    let event = Event::default()
                        .event("state")
                        .json_data(&transition)
                        .unwrap_or_else(|_| Event::default().event("state"));
                    return Some((Ok(event), (call, sent + 1, last)));
                }
                if ended || call.changed().await.is_err() {
                    return None;
                }
            }
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
