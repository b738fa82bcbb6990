//! Media-server configuration, in layers: defaults, then a TOML file, then the environment, then
//! command-line flags. Each layer only overrides what it names.
//!
//! Strict: unknown keys in the file are errors (`deny_unknown_fields`), and [`Config::validate`]
//! checks every value at startup with a message naming the setting. The join key itself never
//! appears in `Debug` output or error messages.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use chorus_crds::names::env;
use serde::Deserialize;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the unknown or mistyped key).
        message: String,
    },
    /// An environment variable has a value of the wrong shape.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or missing.
    #[error("setting {setting}: {message}")]
    Invalid {
        /// The setting's file key.
        setting: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The running configuration.
#[derive(Clone)]
pub struct Config {
    /// The HTTP API, web client, metrics and probes.
    pub http_addr: SocketAddr,
    /// The one UDP port every participant's media uses.
    pub udp_addr: SocketAddr,
    /// The address advertised in ICE candidates.
    pub public_address: IpAddr,
    /// This server's id (its pod name in a cluster).
    pub server_id: String,
    /// Its region.
    pub region: String,
    /// The conference it serves (join tokens must name it).
    pub conference: String,
    /// The join-token HMAC key.
    pub join_key: Vec<u8>,
    /// Participants this server accepts, over all rooms.
    pub max_participants: usize,
    /// Threads that seal and send a large room's frame to its listeners; 0: one per core this
    /// process may use (its CPU affinity and cgroup quota).
    pub fan_out_workers: usize,
    /// A room frame going to at least this many participants is split across the fan-out
    /// workers; smaller fan-outs are sent by the port's own thread.
    pub parallel_fan_out_min: usize,
    /// Send listeners' media as whole Ethernet frames through packet sockets, skipping the
    /// kernel's UDP/IP send path, where the process has `CAP_NET_RAW` and a listener's next hop
    /// is known; the rest keeps the UDP socket. The frames skip the pod's own netfilter rules.
    pub link_layer_fan_out: bool,
    /// Rooms this server hosts at once.
    pub max_rooms: usize,
    /// Participants one room accepts.
    pub max_room_participants: usize,
    /// Audio frame length: 10 or 20 ms.
    pub frame_ms: u32,
    /// Length of the top list.
    pub top_speakers: usize,
    /// Candidates forwarded beyond the top list.
    pub extra_candidates: usize,
    /// Jitter-buffer lower bound.
    pub jitter_min_ms: u32,
    /// Jitter-buffer upper bound.
    pub jitter_max_ms: u32,
    /// How often local top lists are computed (and sent to the mesh primary).
    pub rank_interval_ms: u32,
    /// Encode the mixes in Opus's restricted low-delay mode (alone; a mesh plan decides there).
    pub low_delay: bool,
    /// Align each room's tick to its talkers (alone; a mesh plan decides there).
    pub align_ticks: bool,
    /// Where the mesh plan comes from; `None` runs the server alone.
    pub mesh: Option<MeshSource>,
    /// The UDP address of the QUIC mesh endpoint.
    pub mesh_addr: SocketAddr,
    /// The directory holding `ca.crt`, `<server-id>.crt` and `<server-id>.key`.
    pub mesh_tls_dir: PathBuf,
    /// The SIP address for phone calls (UDP; TCP and TLS are dialled from it). `None`: the
    /// server places no calls.
    pub sip_addr: Option<SocketAddr>,
    /// The directory holding the line's `username` and `password` (the telephony Secret).
    pub sip_credentials_dir: Option<PathBuf>,
    /// A PEM file of the CA that signed the call manager's TLS certificate.
    pub sip_ca_file: Option<PathBuf>,
    /// Edge mode: the file holding the one edge token bridges may present (the conference's
    /// edge token Secret, mounted). `None`: any valid edge token of this conference is taken.
    pub edge_token_file: Option<PathBuf>,
}

/// Most fan-out workers a server starts.
pub const MAX_FAN_OUT_WORKERS: usize = 64;

/// Where a server reads its mesh plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshSource {
    /// A JSON file, re-read when it changes (local mode).
    File(PathBuf),
    /// The `mesh.json` key of a ConfigMap, watched through the Kubernetes API.
    ConfigMap {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("http_addr", &self.http_addr)
            .field("udp_addr", &self.udp_addr)
            .field("public_address", &self.public_address)
            .field("server_id", &self.server_id)
            .field("region", &self.region)
            .field("conference", &self.conference)
            .field("join_key", &"<redacted>")
            .field("max_participants", &self.max_participants)
            .field("fan_out_workers", &self.fan_out_workers)
            .field("parallel_fan_out_min", &self.parallel_fan_out_min)
            .field("link_layer_fan_out", &self.link_layer_fan_out)
            .field("max_rooms", &self.max_rooms)
            .field("max_room_participants", &self.max_room_participants)
            .field("frame_ms", &self.frame_ms)
            .field("top_speakers", &self.top_speakers)
            .field("extra_candidates", &self.extra_candidates)
            .field("jitter_min_ms", &self.jitter_min_ms)
            .field("jitter_max_ms", &self.jitter_max_ms)
            .field("rank_interval_ms", &self.rank_interval_ms)
            .field("low_delay", &self.low_delay)
            .field("align_ticks", &self.align_ticks)
            .field("mesh", &self.mesh)
            .field("mesh_addr", &self.mesh_addr)
            .field("mesh_tls_dir", &self.mesh_tls_dir)
            .field("sip_addr", &self.sip_addr)
            .field("sip_credentials_dir", &self.sip_credentials_dir)
            .field("sip_ca_file", &self.sip_ca_file)
            .field("edge_token_file", &self.edge_token_file)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        // The CRD's mixing defaults, so a server alone and a planned one start alike.
        let mixing = crate::media::MixerConfig::default();
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], chorus_crds::names::SIGNAL_PORT)),
            udp_addr: SocketAddr::from(([0, 0, 0, 0], 40000)),
            public_address: IpAddr::from([127, 0, 0, 1]),
            server_id: "chorus-local-0".to_owned(),
            region: "local".to_owned(),
            conference: "local".to_owned(),
            join_key: Vec::new(),
            max_participants: 500,
            fan_out_workers: 0,
            parallel_fan_out_min: 256,
            link_layer_fan_out: false,
            max_rooms: 100,
            max_room_participants: 500,
            frame_ms: mixing.frame_ms,
            top_speakers: mixing.top_speakers,
            extra_candidates: mixing.extra_candidates,
            jitter_min_ms: mixing.jitter_min_ms,
            jitter_max_ms: mixing.jitter_max_ms,
            rank_interval_ms: mixing.rank_interval_ms,
            low_delay: mixing.low_delay,
            align_ticks: mixing.align_ticks,
            mesh: None,
            mesh_addr: SocketAddr::from(([0, 0, 0, 0], chorus_crds::names::MESH_PORT)),
            mesh_tls_dir: PathBuf::from(chorus_crds::names::MESH_TLS_MOUNT),
            sip_addr: None,
            sip_credentials_dir: None,
            sip_ca_file: None,
            edge_token_file: None,
        }
    }
}

/// One layer: every field optional. The TOML file and the flags both fill one of these.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layer {
    /// See [`Config::http_addr`].
    pub http_addr: Option<SocketAddr>,
    /// See [`Config::udp_addr`].
    pub udp_addr: Option<SocketAddr>,
    /// See [`Config::public_address`].
    pub public_address: Option<IpAddr>,
    /// See [`Config::server_id`].
    pub server_id: Option<String>,
    /// See [`Config::region`].
    pub region: Option<String>,
    /// See [`Config::conference`].
    pub conference: Option<String>,
    /// A file holding the join key (its whole content, trailing newline trimmed).
    pub join_key_file: Option<PathBuf>,
    /// See [`Config::max_participants`].
    pub max_participants: Option<usize>,
    /// See [`Config::fan_out_workers`].
    pub fan_out_workers: Option<usize>,
    /// See [`Config::parallel_fan_out_min`].
    pub parallel_fan_out_min: Option<usize>,
    /// See [`Config::link_layer_fan_out`].
    pub link_layer_fan_out: Option<bool>,
    /// See [`Config::max_rooms`].
    pub max_rooms: Option<usize>,
    /// See [`Config::max_room_participants`].
    pub max_room_participants: Option<usize>,
    /// See [`Config::frame_ms`].
    pub frame_ms: Option<u32>,
    /// See [`Config::top_speakers`].
    pub top_speakers: Option<usize>,
    /// See [`Config::extra_candidates`].
    pub extra_candidates: Option<usize>,
    /// See [`Config::jitter_min_ms`].
    pub jitter_min_ms: Option<u32>,
    /// See [`Config::jitter_max_ms`].
    pub jitter_max_ms: Option<u32>,
    /// See [`Config::rank_interval_ms`].
    pub rank_interval_ms: Option<u32>,
    /// See [`Config::low_delay`].
    pub low_delay: Option<bool>,
    /// See [`Config::align_ticks`].
    pub align_ticks: Option<bool>,
    /// A mesh plan file (local mode).
    pub mesh_plan_file: Option<PathBuf>,
    /// See [`Config::mesh_addr`].
    pub mesh_addr: Option<SocketAddr>,
    /// See [`Config::mesh_tls_dir`].
    pub mesh_tls_dir: Option<PathBuf>,
    /// See [`Config::sip_addr`].
    pub sip_addr: Option<SocketAddr>,
    /// See [`Config::sip_credentials_dir`].
    pub sip_credentials_dir: Option<PathBuf>,
    /// See [`Config::sip_ca_file`].
    pub sip_ca_file: Option<PathBuf>,
    /// See [`Config::edge_token_file`].
    pub edge_token_file: Option<PathBuf>,
}

impl Layer {
    /// Read a TOML layer.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The layer the environment gives: the variables the operator sets on pods.
    #[allow(clippy::type_complexity)] // three plain outputs; a struct for them would say less
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, Option<Vec<u8>>, Option<MeshSource>), ConfigError> {
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            name: &'static str,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            get(name)
                .map(|v| {
                    v.parse::<T>().map_err(|e| ConfigError::Env {
                        name,
                        message: format!("{v:?}: {e}"),
                    })
                })
                .transpose()
        }
        let udp_port: Option<u16> = parse(&get, env::UDP_PORT)?;
        let sip_port: Option<u16> = parse(&get, env::SIP_PORT)?;
        let configmap = match (get(env::MESH_CONFIGMAP), get(env::NAMESPACE)) {
            (Some(name), Some(namespace)) => Some(MeshSource::ConfigMap { namespace, name }),
            _ => None,
        };
        let layer = Layer {
            mesh_tls_dir: get(env::MESH_TLS_DIR).map(PathBuf::from),
            server_id: get(env::SERVER_ID),
            region: get(env::REGION),
            conference: get(env::CONFERENCE),
            public_address: parse(&get, env::PUBLIC_ADDRESS)?,
            udp_addr: udp_port.map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
            max_participants: parse(&get, env::MAX_PARTICIPANTS)?,
            fan_out_workers: parse(&get, env::FAN_OUT_WORKERS)?,
            link_layer_fan_out: parse(&get, env::LINK_LAYER_FAN_OUT)?,
            sip_addr: sip_port.map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
            sip_credentials_dir: get(env::SIP_CREDENTIALS_DIR).map(PathBuf::from),
            sip_ca_file: get(env::SIP_CA_FILE).map(PathBuf::from),
            edge_token_file: get(env::EDGE_TOKEN_FILE).map(PathBuf::from),
            ..Layer::default()
        };
        // The key comes straight from the Secret; it is never written to a file by us.
        let key = get(env::JOIN_KEY).map(|k| k.trim_end().as_bytes().to_vec());
        Ok((layer, key, configmap))
    }
}

impl Config {
    /// Apply one layer over this configuration.
    pub fn apply(&mut self, layer: &Layer) -> Result<(), ConfigError> {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = &layer.$field { self.$field = v.clone(); } )* };
        }
        take!(
            http_addr,
            udp_addr,
            public_address,
            server_id,
            region,
            conference,
            max_participants,
            fan_out_workers,
            parallel_fan_out_min,
            link_layer_fan_out,
            max_rooms,
            max_room_participants,
            frame_ms,
            top_speakers,
            extra_candidates,
            jitter_min_ms,
            jitter_max_ms,
            rank_interval_ms,
            low_delay,
            align_ticks,
            mesh_addr,
            mesh_tls_dir
        );
        if layer.sip_addr.is_some() {
            self.sip_addr = layer.sip_addr;
        }
        if layer.sip_credentials_dir.is_some() {
            self.sip_credentials_dir = layer.sip_credentials_dir.clone();
        }
        if layer.sip_ca_file.is_some() {
            self.sip_ca_file = layer.sip_ca_file.clone();
        }
        if layer.edge_token_file.is_some() {
            self.edge_token_file = layer.edge_token_file.clone();
        }
        if let Some(path) = &layer.mesh_plan_file {
            self.mesh = Some(MeshSource::File(path.clone()));
        }
        if let Some(path) = &layer.join_key_file {
            let key = std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            self.join_key = trim_newline(key);
        }
        Ok(())
    }

    /// Check every value; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |setting: &'static str, message: String| Err(ConfigError::Invalid { setting, message });
        if self.join_key.len() < crate::token::MIN_KEY_BYTES {
            return invalid(
                "join-key-file",
                format!(
                    "a join key of at least {} bytes is required (join-key-file or {})",
                    crate::token::MIN_KEY_BYTES,
                    env::JOIN_KEY
                ),
            );
        }
        if self.frame_ms != 10 && self.frame_ms != 20 {
            return invalid("frame-ms", format!("{} is not 10 or 20", self.frame_ms));
        }
        if !(1..=16).contains(&self.top_speakers) {
            return invalid(
                "top-speakers",
                format!("{} is not in 1..=16", self.top_speakers),
            );
        }
        if self.top_speakers + self.extra_candidates > 16 {
            return invalid(
                "extra-candidates",
                "top-speakers + extra-candidates must be at most 16".to_owned(),
            );
        }
        if self.jitter_max_ms < self.jitter_min_ms + self.frame_ms || self.jitter_max_ms > 2000 {
            return invalid(
                "jitter-max-ms",
                format!(
                    "{} must be at least jitter-min-ms + frame-ms ({}) and at most 2000",
                    self.jitter_max_ms,
                    self.jitter_min_ms + self.frame_ms
                ),
            );
        }
        if self.rank_interval_ms < self.frame_ms || self.rank_interval_ms > 2000 {
            return invalid(
                "rank-interval-ms",
                format!("{} must be within frame-ms..=2000", self.rank_interval_ms),
            );
        }
        for (setting, v) in [
            ("max-participants", self.max_participants),
            ("max-rooms", self.max_rooms),
            ("max-room-participants", self.max_room_participants),
        ] {
            if v == 0 || v > 100_000 {
                return invalid(setting, format!("{v} is not in 1..=100000"));
            }
        }
        if self.fan_out_workers > MAX_FAN_OUT_WORKERS {
            return invalid(
                "fan-out-workers",
                format!(
                    "{} is not in 0..={MAX_FAN_OUT_WORKERS} (0: one per core)",
                    self.fan_out_workers
                ),
            );
        }
        if !(2..=100_000).contains(&self.parallel_fan_out_min) {
            return invalid(
                "parallel-fan-out-min",
                format!("{} is not in 2..=100000", self.parallel_fan_out_min),
            );
        }
        for (setting, v) in [
            ("server-id", &self.server_id),
            ("region", &self.region),
            ("conference", &self.conference),
        ] {
            if v.is_empty() || v.len() > 63 {
                return invalid(setting, "must be 1 to 63 characters".to_owned());
            }
        }
        Ok(())
    }

    /// How many fan-out workers to start: [`Config::fan_out_workers`], or with 0 one per core
    /// this process may use.
    pub fn fan_out_threads(&self) -> usize {
        match self.fan_out_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(MAX_FAN_OUT_WORKERS)
    }

    /// The mixing settings of a server running alone, from its flags. In a mesh the plan's
    /// `mixing` block is the only source ([`crate::media::MixerConfig::from_plan`]) and these
    /// flags are unused.
    pub fn mixer(&self) -> crate::media::MixerConfig {
        crate::media::MixerConfig {
            frame_ms: self.frame_ms,
            top_speakers: self.top_speakers,
            extra_candidates: self.extra_candidates,
            jitter_min_ms: self.jitter_min_ms,
            jitter_max_ms: self.jitter_max_ms,
            rank_interval_ms: self.rank_interval_ms,
            low_delay: self.low_delay,
            align_ticks: self.align_ticks,
        }
    }
}

fn trim_newline(mut key: Vec<u8>) -> Vec<u8> {
    while matches!(key.last(), Some(b'\n' | b'\r')) {
        key.pop();
    }
    key
}

/// Build the configuration from every layer: defaults, file, environment, flags.
pub fn load(
    file: Option<&std::path::Path>,
    get_env: impl Fn(&str) -> Option<String>,
    flags: &Layer,
) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    if let Some(path) = file {
        config.apply(&Layer::from_file(path)?)?;
    }
    let (env_layer, env_key, env_mesh) = Layer::from_env(get_env)?;
    config.apply(&env_layer)?;
    if let Some(key) = env_key {
        config.join_key = key;
    }
    if env_mesh.is_some() {
        config.mesh = env_mesh;
    }
    config.apply(flags)?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn layers_override_in_order() {
        let dir = std::env::temp_dir().join(format!("chorus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "top-speakers = 4\nregion = \"file\"\nframe-ms = 10\n",
        )
        .unwrap();
        let flags = Layer {
            region: Some("flag".into()),
            ..Layer::default()
        };
        let c = load(
            Some(&file),
            env_of(&[
                ("CHORUS_REGION", "env"),
                ("CHORUS_JOIN_KEY", KEY),
                ("CHORUS_UDP_PORT", "41000"),
            ]),
            &flags,
        )
        .unwrap();
        assert_eq!(c.top_speakers, 4); // file over default
        assert_eq!(c.frame_ms, 10);
        assert_eq!(c.region, "flag"); // flag over env over file
        assert_eq!(c.udp_addr.port(), 41000);
        assert!(!format!("{c:?}").contains(KEY));
    }

    #[test]
    fn strict_and_validated() {
        let dir = std::env::temp_dir().join(format!("chorus-config-b-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "top-speakerz = 4\n").unwrap();
        let err = load(
            Some(&file),
            env_of(&[("CHORUS_JOIN_KEY", KEY)]),
            &Layer::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("top-speakerz"), "{err}");

        let bad = Layer {
            frame_ms: Some(15),
            ..Layer::default()
        };
        let err = load(None, env_of(&[("CHORUS_JOIN_KEY", KEY)]), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("frame-ms") && err.contains("15"), "{err}");

        let err = load(None, env_of(&[]), &Layer::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("join key"), "{err}");

        let err = load(
            None,
            env_of(&[("CHORUS_JOIN_KEY", KEY), ("CHORUS_UDP_PORT", "x")]),
            &Layer::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("CHORUS_UDP_PORT"), "{err}");
    }
}
