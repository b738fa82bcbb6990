//! Session transfer (DESIGN §12) as a client uses it: issue a code for a participant, and join a
//! new device (a bot) by redeeming it, as the `/t` page of the web client does.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bot::{Bot, BotConfig};

/// What a redemption returned besides the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    /// The participant the new device now carries.
    pub participant_id: u64,
    /// The room.
    pub room: String,
    /// A fresh join token for the same identity and the new device.
    pub token: String,
}

/// `POST /v1/rooms/{room}/participants/{id}/transfers` with `token`: the status, the
/// `Cache-Control` header and the body.
pub async fn issue_code(
    http: &reqwest::Client,
    base_url: &str,
    room: &str,
    id: u64,
    token: &str,
) -> Result<(u16, Option<String>, Value)> {
    let res = http
        .post(format!(
            "{base_url}/v1/rooms/{room}/participants/{id}/transfers"
        ))
        .bearer_auth(token)
        .send()
        .await?;
    let status = res.status().as_u16();
    let cache = res
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((status, cache, res.json().await.unwrap_or(Value::Null)))
}

/// The code in a transfer URL's fragment.
pub fn code_of(url: &str) -> Result<String> {
    url.split_once('#')
        .map(|(_, code)| code.to_owned())
        .context("the transfer URL has no fragment")
}

/// `POST /v1/transfer` with `code` and `offer`: the status, the body, and the headers that
/// matter.
pub async fn redeem_raw(
    http: &reqwest::Client,
    base_url: &str,
    code: &str,
    offer: &str,
) -> Result<(u16, String, Option<Redeemed>)> {
    let res = http
        .post(format!("{base_url}/v1/transfer"))
        .header("authorization", format!("Transfer {code}"))
        .header("content-type", "application/sdp")
        .body(offer.to_owned())
        .send()
        .await?;
    let status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let redeemed = match (
        header("chorus-participant-id").and_then(|v| v.parse().ok()),
        header("chorus-room"),
        header("chorus-join-token"),
    ) {
        (Some(participant_id), Some(room), Some(token)) => Some(Redeemed {
            participant_id,
            room,
            token,
        }),
        _ => None,
    };
    Ok((status, res.text().await.unwrap_or_default(), redeemed))
}

/// A new device (a bot that never held a join token) taking the session over with `code`.
pub async fn redeem_bot(base_url: &str, code: &str, config: BotConfig) -> Result<(Bot, Redeemed)> {
    let http = reqwest::Client::new();
    let slot: Arc<Mutex<Option<Redeemed>>> = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let base = base_url.to_owned();
    let code = code.to_owned();
    let bot = Bot::join_with(config, move |offer| async move {
        let (status, body, redeemed) = redeem_raw(&http, &base, &code, &offer).await?;
        if status != 201 {
            bail!("redeeming the code: {status} {body}");
        }
        *out.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = redeemed;
        Ok(body)
    })
    .await?;
    let redeemed = slot
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .take()
        .context("the redemption answered without the participant's headers")?;
    Ok((bot, redeemed))
}
