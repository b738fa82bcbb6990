//! Session transfer by QR code (DESIGN §12):
//!
//! - `POST /v1/rooms/{room}/participants/{id}/transfers`: that participant's own join token
//!   (its identity, its current device). `201 {url, expiresAt, expiresInSeconds, qrSvg}` with
//!   `Cache-Control: no-store`; the code is in the URL's fragment only. 403 for another identity
//!   (`not_yours`) or when transfer is off (`transfer_disabled`), 404 for a participant not here,
//!   409 for a device the participant already moved away from (`moved`), 429 past the limit.
//! - `POST /v1/transfer`: `Authorization: Transfer <code>`, `Content-Type: application/sdp`, the
//!   new device's offer. `201` with the SDP answer, `Location`, `Chorus-Participant-Id` (the same
//!   participant), `Chorus-Room` and `Chorus-Join-Token` (a fresh token for the same identity and
//!   the new device). The code is checked and the participant found before the offer is
//!   negotiated, and the offer before the code is spent: a bad offer (400) leaves the code
//!   usable. 404 `unknown_code`, 410 `code_expired` or `code_used` (with `usedAt`), 409
//!   `participant_gone`, 429 past the limit. A code another server of the conference issued is
//!   forwarded to that server (the plan's `signal` address; `transfer.allowCrossServer`), whose
//!   answer carries its own media address; `Chorus-Server` names it.
//! - `GET /v1/rooms/{room}/participants/{id}/events`: the device's join token; server-sent
//!   events: `transferred` once the participant moved to another device (then the old device's
//!   connection closes), or `left`.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::json;

use super::{ApiError, AppState, authorize};
use crate::room::core::ParticipantId;
use crate::transfer::codes::{CodeTarget, RedeemError, issuer_of};
use crate::transfer::{LimitError, qr_svg, unix_ms};

/// Lifetime of the join token a redemption returns.
const FRESH_TOKEN_TTL: Duration = Duration::from_secs(4 * 3600);

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Disabled => {
                ApiError::new(StatusCode::FORBIDDEN, "transfer_disabled", e.to_string())
            }
            LimitError::TooMany => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many", e.to_string())
            }
        }
    }
}

fn redeem_error(e: RedeemError) -> ApiError {
    match e {
        RedeemError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "unknown_code", e.to_string()),
        RedeemError::Expired { .. } => ApiError::new(
            StatusCode::GONE,
            "code_expired",
            "the transfer code has expired",
        ),
        RedeemError::Used { used_ms } => ApiError::new(
            StatusCode::GONE,
            "code_used",
            format!(
                "the transfer code was already used (usedAt {used_ms} ms since the Unix epoch)"
            ),
        ),
        RedeemError::Gone => participant_gone(),
        RedeemError::Malformed => ApiError::new(StatusCode::BAD_REQUEST, "bad_code", e.to_string()),
    }
}

fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

pub(super) async fn issue(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, ParticipantId)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = authorize(&state, &headers, &room)?;
    let identity = state.rooms.identity_of(&room, id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such participant in this room",
        )
    })?;
    if identity != claims.sub {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_yours",
            "only the participant's own device can move it",
        ));
    }
    if *state.rooms.watch_generation(&room, id).borrow() != claims.generation {
        return Err(crate::room::JoinError::Moved.into());
    }
    let issued = state.transfers.issue(
        CodeTarget {
            room: room.clone(),
            participant: id,
            identity,
        },
        SystemTime::now(),
    )?;
    state.metrics.transfer_codes.inc();
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "no Host header to build the link with",
            )
        })?;
    // The fragment never reaches a server: the code stays out of every access log.
    let url = format!("{scheme}://{host}/t#{}", issued.code);
    let svg = qr_svg(&url).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "qr",
            format!("QR code: {e}"),
        )
    })?;
    let now = unix_ms(SystemTime::now());
    let mut response = (
        StatusCode::CREATED,
        axum::Json(json!({
            "url": url,
            "expiresAt": issued.expires_ms,
            "expiresInSeconds": issued.expires_ms.saturating_sub(now) / 1000,
            "qrSvg": svg,
        })),
    )
        .into_response();
    no_store(&mut response);
    Ok(response)
}

fn transfer_code(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Transfer "))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "transfer_code_missing",
                "send `Authorization: Transfer <code>`",
            )
        })
}

pub(super) async fn redeem(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let outcome = |label: &str| {
        state
            .metrics
            .transfer_redemptions
            .with_label_values(&[label])
            .inc();
    };
    let result = redeem_inner(&state, &headers, &body).await;
    match &result {
        // Counted by the issuer, which redeemed it.
        Ok(r) if r.headers().contains_key("chorus-server") => outcome("forwarded"),
        Ok(_) => outcome("ok"),
        Err(e) => outcome(e.reason),
    }
    result
}

async fn redeem_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    state.transfers.admit_redemption()?;
    let code = transfer_code(headers)?;
    if let Some(issuer) = issuer_of(code).filter(|i| *i != state.transfers.server_id()) {
        return forward(state, issuer, headers, body).await;
    }
    let target = state
        .transfers
        .check(code, SystemTime::now())
        .map_err(redeem_error)?;
    if !state.rooms.is_member(&target.room, target.participant) {
        return Err(participant_gone());
    }
    let is_sdp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/sdp"));
    if !is_sdp {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_content_type",
            "the body must be an SDP offer (Content-Type: application/sdp)",
        ));
    }
    let offer = std::str::from_utf8(body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "sdp_malformed",
            "the offer is not UTF-8",
        )
    })?;
    // The offer first: a bad one changes nothing and the code stays usable.
    let (answer, prepared) = state
        .rooms
        .prepare_transfer(&target.room, target.participant, offer)
        .await
        .map_err(|e| match e {
            crate::room::JoinError::NotFound => participant_gone(),
            other => ApiError::from(other),
        })?;
    let target = state
        .transfers
        .spend(code, SystemTime::now())
        .map_err(redeem_error)?;
    let (answer, generation) = state
        .rooms
        .complete_transfer(&target.room, target.participant, answer, prepared)
        .await
        .map_err(|_| participant_gone())?;
    let token = state.key.mint_for_generation(
        &state.config.conference,
        &target.room,
        &target.identity,
        generation,
        FRESH_TOKEN_TTL,
        SystemTime::now(),
    );
    tracing::info!(room = %target.room, participant = target.participant, generation, "session moved to another device");
    let location = format!(
        "/v1/rooms/{}/participants/{}",
        target.room, target.participant
    );
    let mut response = (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_owned()),
            (header::LOCATION, location),
            (
                header::HeaderName::from_static("chorus-participant-id"),
                target.participant.to_string(),
            ),
            (
                header::HeaderName::from_static("chorus-room"),
                target.room.clone(),
            ),
            (header::HeaderName::from_static("chorus-join-token"), token),
        ],
        answer,
    )
        .into_response();
    no_store(&mut response);
    Ok(response)
}

/// The header a forwarded redemption carries (the forwarding server's id): a server never
/// forwards a request that was forwarded to it, so a stale plan cannot make a loop.
const FORWARDED_BY: &str = "chorus-forwarded-by";
/// How long the issuer gets to answer a forwarded redemption.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Redeem a code another server of the conference issued, at that server: the request goes on
/// as it came (code, offer), and its answer, which carries the issuer's media address, comes
/// back as the issuer gave it, with an absolute `Location` on the issuer.
async fn forward(
    state: &AppState,
    issuer: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let misdirected = |message: &str| {
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "other_server",
            message.to_owned(),
        )
    };
    if headers.contains_key(FORWARDED_BY) {
        return Err(misdirected(
            "a forwarded code was not issued by the server it was forwarded to",
        ));
    }
    if !state.transfers.settings().allow_cross_server {
        return Err(misdirected(
            "the code was issued by another server of the conference, and this conference \
             redeems codes only where they were issued",
        ));
    }
    let signal = state
        .mesh
        .as_ref()
        .and_then(|node| node.signal_of(issuer))
        .ok_or_else(|| redeem_error(RedeemError::Unknown))?;
    let url = format!("{}/v1/transfer", signal.trim_end_matches('/'));
    let mut request = state
        .http
        .post(&url)
        .header(FORWARDED_BY, state.transfers.server_id())
        .body(body.clone());
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(v) = headers.get(&name) {
            request = request.header(name, v.clone());
        }
    }
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, request.send())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "issuer_unreachable",
                "the server that issued the code did not answer in time",
            )
        })?
        .map_err(|e| {
            tracing::warn!(issuer, error = %e, "forwarding a transfer code failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "issuer_unreachable",
                "the server that issued the code cannot be reached",
            )
        })?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::builder().status(status);
    for (name, value) in answer.headers() {
        let keep = [
            "content-type",
            "chorus-participant-id",
            "chorus-room",
            "chorus-join-token",
            "cache-control",
        ]
        .contains(&name.as_str());
        if keep {
            response = response.header(name.as_str(), value.as_bytes());
        } else if name.as_str() == "location" {
            let location = format!(
                "{}{}",
                signal.trim_end_matches('/'),
                value.to_str().unwrap_or_default()
            );
            response = response.header(header::LOCATION, location);
        }
    }
    response = response.header(
        header::HeaderName::from_static("chorus-server"),
        signal.as_str(),
    );
    let bytes = answer.bytes().await.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "issuer_unreachable",
            "the issuing server's answer broke off",
        )
    })?;
    tracing::info!(
        issuer,
        status = status.as_u16(),
        "transfer code redeemed at its issuer"
    );
    response
        .body(axum::body::Body::from(bytes))
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "issuer_unreachable", e.to_string()))
}

fn participant_gone() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "participant_gone",
        "the participant this code moves has left the room",
    )
}

pub(super) async fn events(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, ParticipantId)>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let claims = authorize(&state, &headers, &room)?;
    match state.rooms.identity_of(&room, id) {
        Some(identity) if identity == claims.sub => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_yours",
                "only the participant's own devices can follow it",
            ));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such participant in this room",
            ));
        }
    }
    let generation = state.rooms.watch_generation(&room, id);
    let mine = claims.generation;
    let stream = futures::stream::unfold(Some(generation), move |watch| async move {
        let mut watch = watch?;
        loop {
            let now = *watch.borrow_and_update();
            if now > mine {
                let event = Event::default()
                    .event("transferred")
                    .json_data(json!({"participantId": id, "generation": now}))
                    .unwrap_or_else(|_| Event::default().event("transferred"));
                return Some((Ok(event), None));
            }
            if watch.changed().await.is_err() {
                let event = Event::default()
                    .event("left")
                    .json_data(json!({"participantId": id}))
                    .unwrap_or_else(|_| Event::default().event("left"));
                return Some((Ok(event), None));
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
