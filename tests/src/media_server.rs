//! An in-process media server for end-to-end tests: real sockets on 127.0.0.1 port 0, a fresh
//! join key, and a handle that mints tokens and stops the server when dropped.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use chorus_mediaserver::config::Config;
use chorus_mediaserver::server::{self, Running};
use chorus_mediaserver::token::TokenKey;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

/// A running media server.
#[derive(Debug)]
pub struct MediaServer {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The UDP media address.
    pub udp: SocketAddr,
    /// The SIP address, when the configuration asked for one (`sip_addr`).
    pub sip: Option<SocketAddr>,
    /// Metrics and rooms, for assertions.
    pub running: Running,
    key: TokenKey,
    conference: String,
    shutdown: CancellationToken,
}

impl MediaServer {
    /// Start a server; `adjust` may change the configuration (limits, top speakers, ...).
    pub async fn start(adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_with_key(&random_key(), adjust).await
    }

    /// Start a server whose media socket binds and advertises `media_ip` (the bench's swarm
    /// network's server side, say) instead of 127.0.0.1.
    pub async fn start_on(media_ip: IpAddr, adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_inner(&random_key(), media_ip, adjust).await
    }

    /// Start a server with a given join key (servers of one conference share it).
    pub async fn start_with_key(
        key_bytes: &[u8],
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        Self::start_inner(key_bytes, [127, 0, 0, 1].into(), adjust).await
    }

    async fn start_inner(
        key_bytes: &[u8],
        media_ip: IpAddr,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let key_bytes = key_bytes.to_vec();
        let mut config = Config {
            public_address: media_ip,
            conference: "e2e".into(),
            join_key: key_bytes.clone(),
            ..Config::default()
        };
        adjust(&mut config);
        config.validate().context("test server configuration")?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let udp = tokio::net::UdpSocket::bind(SocketAddr::new(media_ip, 0)).await?;
        let http_addr = http.local_addr()?;
        let udp_addr = udp.local_addr()?;
        let sip = match config.sip_addr {
            Some(addr) => Some(tokio::net::UdpSocket::bind(addr).await?),
            None => None,
        };
        let sip_addr = sip.as_ref().map(|s| s.local_addr()).transpose()?;
        let conference = config.conference.clone();
        let shutdown = CancellationToken::new();
        let (running, serving) = server::start(config, http, udp, sip, shutdown.clone()).await?;
        tokio::spawn(serving);
        Ok(Self {
            base_url: format!("http://{http_addr}"),
            udp: udp_addr,
            sip: sip_addr,
            running,
            key: TokenKey::new(&key_bytes).map_err(|e| anyhow::anyhow!("{e}"))?,
            conference,
            shutdown,
        })
    }

    /// A join token for `room` valid for an hour.
    pub fn token(&self, room: &str, identity: &str) -> String {
        hour_token(&self.key, &self.conference, room, identity)
    }

    /// `GET /v1/rooms/{room}` with `token`: the room (roster, speakers) as JSON.
    pub async fn room_info_as(&self, room: &str, token: &str) -> Result<serde_json::Value> {
        let info = reqwest::Client::new()
            .get(format!("{}/v1/rooms/{room}", self.base_url))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(info)
    }

    /// The room as `identity` sees it ([`Self::room_info_as`] with a fresh token).
    pub async fn room_info(&self, room: &str, identity: &str) -> Result<serde_json::Value> {
        self.room_info_as(room, &self.token(room, identity)).await
    }

    /// A bot joining `room` as `who` over the HTTP API.
    pub async fn join_bot(
        &self,
        room: &str,
        who: &str,
        config: crate::bot::BotConfig,
    ) -> Result<crate::bot::Bot> {
        crate::bot::Bot::join_http(&self.base_url, room, &self.token(room, who), config)
            .await
            .with_context(|| format!("{who} joining room {room}"))
    }

    /// A token that expired a minute ago.
    pub fn expired_token(&self, room: &str, identity: &str) -> String {
        self.key.mint(
            &self.conference,
            room,
            identity,
            Duration::from_secs(1),
            SystemTime::now() - Duration::from_secs(60),
        )
    }

    /// The server's /metrics text.
    pub fn metrics(&self) -> String {
        self.running.metrics.encode()
    }
}

impl Drop for MediaServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A join token for `room` of `conference`, signed with `key`, valid for an hour from now.
pub fn hour_token(key: &TokenKey, conference: &str, room: &str, identity: &str) -> String {
    key.mint(
        conference,
        room,
        identity,
        Duration::from_secs(3600),
        SystemTime::now(),
    )
}

/// A random join key of 32 printable bytes.
pub fn random_key() -> Vec<u8> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| b'a' + (b % 26)).collect()
}

/// The sum of every sample of metric `name` whose labels contain all of `labels` (`k="v"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|want| rest.contains(want))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The value of a metric line `name` (with labels, exactly as printed), if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
