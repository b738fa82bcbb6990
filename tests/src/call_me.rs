//! The "call me" rig: a real Kamailio, media servers whose plan has a `telephony` block pointing at
//! it (with the `chorus` line's credentials mounted as files, as the operator mounts the Secret),
//! and the calls API as a web client uses it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chorus_crds::{MediaEncryption, MeshTelephony, PhoneCodec, SipTransport, TelephonyMode};
use serde_json::Value;

use crate::bot::Bot;
use crate::media_server::MediaServer;
use crate::mesh_cluster::MeshCluster;
use crate::telephony::{CHORUS_PASSWORD, CHORUS_USER, Kamailio};

/// A plan `telephony` block for `kam` over `transport`, with the CRD's defaults otherwise and a
/// short ring timeout.
pub fn telephony_plan(kam: &Kamailio, transport: SipTransport) -> MeshTelephony {
    let uri = match transport {
        SipTransport::Tls => kam.tls_uri(),
        _ => kam.uri(),
    };
    MeshTelephony {
        call_manager_uri: uri,
        transport,
        caller_id: Some("Chorus".into()),
        codecs: vec![PhoneCodec::Pcmu, PhoneCodec::Pcma],
        mode: TelephonyMode::Server,
        media_encryption: MediaEncryption::Optional,
        ring_timeout_seconds: 20,
        media_timeout_seconds: 10,
        max_call_seconds: 3600,
        max_concurrent_calls: 20,
        max_calls_per_identity: 1,
        allowed_targets: vec!["[0-9]{2,6}".into()],
        sip_port: 5060,
        credentials_secret: Some("pbx".into()),
    }
}

/// Kamailio plus a mesh of media servers that place calls through it.
pub struct CallMeRig {
    /// The call manager.
    pub kam: Kamailio,
    /// The servers.
    pub cluster: MeshCluster,
    creds: PathBuf,
    http: reqwest::Client,
}

impl std::fmt::Debug for CallMeRig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMeRig").finish_non_exhaustive()
    }
}

impl Drop for CallMeRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.creds);
    }
}

impl CallMeRig {
    /// Start Kamailio and one server per region, with `telephony(kam)` in the plan and the line
    /// `password` (the right one unless a test wants wrong credentials).
    pub async fn start(
        regions: &[&str],
        telephony: impl FnOnce(&Kamailio) -> MeshTelephony,
        password: &str,
    ) -> Result<Self> {
        let kam = Kamailio::start()?;
        let creds = std::env::temp_dir().join(format!(
            "chorus-sip-creds-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&creds)?;
        std::fs::write(creds.join("username"), CHORUS_USER)?;
        std::fs::write(creds.join("password"), password)?;
        let block = telephony(&kam);
        let ca = kam.cert_path();
        let dir = creds.clone();
        let cluster = MeshCluster::start_configured(
            regions,
            3,
            |_, bind| bind,
            move |plan| plan.telephony = Some(block),
            Some(Arc::new(move |_, c| {
                c.sip_addr = Some("127.0.0.1:0".parse().expect("a literal address"));
                c.sip_credentials_dir = Some(dir.clone());
                c.sip_ca_file = Some(ca.clone());
            })),
        )
        .await?;
        Ok(Self {
            kam,
            cluster,
            creds,
            http: reqwest::Client::new(),
        })
    }

    /// One server (region `us`) calling through a fresh Kamailio over `transport`, with the
    /// plan's defaults of [`telephony_plan`] and the right password.
    pub async fn one_server(transport: SipTransport) -> Result<Self> {
        Self::start(
            &["us"],
            |kam| telephony_plan(kam, transport),
            CHORUS_PASSWORD,
        )
        .await
    }

    /// The line's right password.
    pub fn password() -> &'static str {
        CHORUS_PASSWORD
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &MediaServer {
        self.cluster.server(i)
    }

    /// `POST /v1/rooms/{room}/calls` on server `i` as `identity`: the status and the body.
    pub async fn create_call(
        &self,
        i: usize,
        room: &str,
        identity: &str,
        body: &Value,
    ) -> Result<(u16, Value)> {
        let server = self.server(i);
        let res = self
            .http
            .post(format!("{}/v1/rooms/{room}/calls", server.base_url))
            .bearer_auth(server.token(room, identity))
            .json(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `GET` call `id`.
    pub async fn call(&self, i: usize, room: &str, identity: &str, id: u64) -> Result<Value> {
        let server = self.server(i);
        let res = self
            .http
            .get(format!("{}/v1/rooms/{room}/calls/{id}", server.base_url))
            .bearer_auth(server.token(room, identity))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("GET call {id}: {}", res.status());
        }
        Ok(res.json().await?)
    }

    /// `DELETE` call `id` (hang up).
    pub async fn hang_up(&self, i: usize, room: &str, identity: &str, id: u64) -> Result<u16> {
        let server = self.server(i);
        let res = self
            .http
            .delete(format!("{}/v1/rooms/{room}/calls/{id}", server.base_url))
            .bearer_auth(server.token(room, identity))
            .send()
            .await?;
        Ok(res.status().as_u16())
    }

    /// Poll call `id` until its state is `state` (or it ended otherwise): the call as then.
    pub async fn wait_state(
        &self,
        i: usize,
        room: &str,
        identity: &str,
        id: u64,
        state: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let call = self.call(i, room, identity, id).await?;
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
        i: usize,
        room: &str,
        identity: &str,
        id: u64,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let server = self.server(i);
        let mut res = self
            .http
            .get(format!(
                "{}/v1/rooms/{room}/calls/{id}/events",
                server.base_url
            ))
            .bearer_auth(server.token(room, identity))
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

    /// The roster of `room` on server `i`, as `identity` sees it.
    pub async fn roster(&self, i: usize, room: &str, identity: &str) -> Result<Vec<String>> {
        let server = self.server(i);
        let res = self
            .http
            .get(format!("{}/v1/rooms/{room}", server.base_url))
            .bearer_auth(server.token(room, identity))
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
    pub async fn metrics(&self, i: usize) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.server(i).base_url))
            .send()
            .await?
            .text()
            .await?)
    }
}

/// A bot's participant id, from the `Location` it joined with.
pub fn participant_id(bot: &Bot) -> Result<u64> {
    bot.participant_url()
        .and_then(|u| u.rsplit('/').next())
        .and_then(|id| id.parse().ok())
        .context("the bot joined over HTTP, so it has a participant id")
}
