//! The "call me" rig: a real Kamailio, media servers whose plan has a `telephony` block pointing at
//! it (with the `chorus` line's credentials mounted as files, as the operator mounts the Secret),
//! and the calls API as a web client uses it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chorus_crds::{MediaEncryption, MeshTelephony, PhoneCodec, SipTransport, TelephonyMode};
use serde_json::Value;

use crate::bot::Bot;
use crate::calls_api::CallsApi;
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
        let creds = crate::unique_temp_dir("sip-creds")?;
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

    /// Server `i`'s calls API.
    fn api(&self, i: usize) -> CallsApi {
        CallsApi::new(self.http.clone(), &self.server(i).base_url)
    }

    /// `POST /v1/rooms/{room}/calls` on server `i` as `identity`: the status and the body.
    pub async fn create_call(
        &self,
        i: usize,
        room: &str,
        identity: &str,
        body: &Value,
    ) -> Result<(u16, Value)> {
        let token = self.server(i).token(room, identity);
        self.api(i).create_call(&token, room, body).await
    }

    /// `GET` call `id`.
    pub async fn call(&self, i: usize, room: &str, identity: &str, id: u64) -> Result<Value> {
        let token = self.server(i).token(room, identity);
        self.api(i).call(&token, room, id).await
    }

    /// `DELETE` call `id` (hang up).
    pub async fn hang_up(&self, i: usize, room: &str, identity: &str, id: u64) -> Result<u16> {
        let token = self.server(i).token(room, identity);
        self.api(i).hang_up(&token, room, id).await
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
        let token = self.server(i).token(room, identity);
        self.api(i)
            .wait_state(&token, room, id, state, timeout)
            .await
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
        let token = self.server(i).token(room, identity);
        self.api(i).events(&token, room, id, timeout).await
    }

    /// The roster of `room` on server `i`, as `identity` sees it.
    pub async fn roster(&self, i: usize, room: &str, identity: &str) -> Result<Vec<String>> {
        let token = self.server(i).token(room, identity);
        self.api(i).roster(&token, room).await
    }

    /// The server's metrics text.
    pub async fn metrics(&self, i: usize) -> Result<String> {
        self.api(i).metrics().await
    }
}

/// A bot's participant id, from the `Location` it joined with.
pub fn participant_id(bot: &Bot) -> Result<u64> {
    bot.participant_url()
        .and_then(|u| u.rsplit('/').next())
        .and_then(|id| id.parse().ok())
        .context("the bot joined over HTTP, so it has a participant id")
}
