//! The calls API of DESIGN §11 as a web client uses it: one server's `/v1/rooms/{room}/calls`
//! routes, the room roster and the metrics, each request with the caller's join token.
//!
//! Shared by the "call me" rig (media servers in this process) and the edge rig (a server
//! process, restarted mid-test), so both placements are driven by the same client.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

/// One server's calls API.
#[derive(Debug, Clone)]
pub struct CallsApi {
    http: reqwest::Client,
    base_url: String,
}

impl CallsApi {
    /// The API at `base_url` (`http://127.0.0.1:PORT`).
    pub fn new(http: reqwest::Client, base_url: &str) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    /// `POST /v1/rooms/{room}/calls` with `token`: the status and the body.
    pub async fn create_call(&self, token: &str, room: &str, body: &Value) -> Result<(u16, Value)> {
        let res = self
            .http
            .post(format!("{}/v1/rooms/{room}/calls", self.base_url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `GET` call `id`.
    pub async fn call(&self, token: &str, room: &str, id: u64) -> Result<Value> {
        let res = self
            .http
            .get(format!("{}/v1/rooms/{room}/calls/{id}", self.base_url))
            .bearer_auth(token)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("GET call {id}: {}", res.status());
        }
        Ok(res.json().await?)
    }

    /// `DELETE` call `id` (hang up): the status.
    pub async fn hang_up(&self, token: &str, room: &str, id: u64) -> Result<u16> {
        let res = self
            .http
            .delete(format!("{}/v1/rooms/{room}/calls/{id}", self.base_url))
            .bearer_auth(token)
            .send()
            .await?;
        Ok(res.status().as_u16())
    }

    /// Poll call `id` until its state is `state` (or it ended otherwise): the call as then.
    pub async fn wait_state(
        &self,
        token: &str,
        room: &str,
        id: u64,
        state: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let call = self.call(token, room, id).await?;
            if call["state"] == state {
                return Ok(call);
            }
            if call["state"] == "ended" {
                bail!("call {id} ended before {state}: {call}");
            }
            if Instant::now() > deadline {
                bail!("call {id} not {state} after {timeout:?}: {call}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Read the call's server-sent events until `ended` (or `timeout`): each event's data.
    pub async fn events(
        &self,
        token: &str,
        room: &str,
        id: u64,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let mut res = self
            .http
            .get(format!(
                "{}/v1/rooms/{room}/calls/{id}/events",
                self.base_url
            ))
            .bearer_auth(token)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("events of call {id}: {}", res.status());
        }
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(chunk) = tokio::time::timeout_at(deadline, res.chunk()).await {
            match chunk? {
                Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                None => break,
            }
        }
        Ok(text
            .split("\n\n")
            .filter_map(|block| {
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim)
                    .collect();
                serde_json::from_str(&data).ok()
            })
            .collect())
    }

    /// The identities in the roster of `room`, as the holder of `token` sees it.
    pub async fn roster(&self, token: &str, room: &str) -> Result<Vec<String>> {
        let res = self
            .http
            .get(format!("{}/v1/rooms/{room}", self.base_url))
            .bearer_auth(token)
            .send()
            .await?;
        let info: Value = res.json().await?;
        Ok(info["participants"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["identity"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The server's metrics text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await?
            .text()
            .await?)
    }
}
