//! The `Conference` custom resource (`chorus.dev/v1alpha1`, short name `conf`).
//!
//! The doc comments on every field become `kubectl explain` text, so they are written for the user
//! who applies a conference, not for us. The schema carries defaults, ranges and enums; the CEL rules
//! carry what one field alone cannot say (unique region names, jitter min below max, ...). The same
//! rules run client-side through `Conference::validate_cel`, so `chorus-operator plan` refuses what
//! the API server would refuse, with the same message.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A Chorus conference: media servers placed in several regions that share one global list of top
/// speakers and mix it once, near each listener.
// Each `printcolumn(...)` repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chorus.dev",
    version = "v1alpha1",
    kind = "Conference",
    doc = "A Chorus conference: media servers in several regions that agree on one global list of top speakers and mix it once, near each listener.",
    plural = "conferences",
    singular = "conference",
    shortname = "conf",
    namespaced,
    status = "ConferenceStatus",
    cel,
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Provisioning, Ready or Degraded"
    ),
    printcolumn(
        name = "Regions",
        type_ = "string",
        json_path = ".status.regionNames",
        description = "The regions, in spec order"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyServers",
        description = "Ready media servers / desired"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.regions) >= 1").message("at least one region is required"))]
#[x_kube(validation = Rule::new("self.regions.all(r, self.regions.exists_one(o, o.name == r.name))").message("region names must be unique"))]
pub struct ConferenceSpec {
    /// The regions the conference spans. Each gets its own media servers, placed on nodes of that
    /// region. At least one.
    #[schemars(length(min = 1, max = 16))]
    pub regions: Vec<RegionSpec>,

    /// How speakers are ranked and mixed.
    #[serde(default)]
    pub mixing: MixingSpec,

    /// The media-server pods: image, resources and how their UDP media port is exposed.
    #[serde(default)]
    pub media: MediaSpec,

    /// Optional dial-out to desk IP phones through the PBX's call manager ("call me").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telephony: Option<TelephonySpec>,

    /// Moving a live session to another device by scanning a QR code.
    #[serde(default)]
    pub transfer: TransferSpec,

    /// Join-token signing. The operator generates a key Secret when none is named.
    #[serde(default)]
    pub auth: AuthSpec,
}

/// One region of a conference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// The region's name, a DNS label such as `us-east`. It names the region's StatefulSet
    /// (`<conference>-<name>`) and, unless `nodeSelector` is set, selects nodes labelled
    /// `topology.kubernetes.io/region=<name>`.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// How many media servers run in this region.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,

    /// Node labels a server of this region must run on. Defaults to
    /// `topology.kubernetes.io/region: <name>`. An empty map places servers on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// The most participants one server of this region accepts; joins beyond it get 503.
    #[serde(default = "default_max_participants")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_participants_per_server: i32,
}

/// How speakers are ranked and mixed. Every server of the conference mixes the same global list.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.topSpeakers + self.extraCandidates <= 16").message("topSpeakers + extraCandidates must be at most 16"))]
#[x_kube(validation = Rule::new("self.rankIntervalMs >= self.frameMs").message("rankIntervalMs must be at least frameMs"))]
#[x_kube(validation = Rule::new("self.jitterBuffer.maxMs >= self.jitterBuffer.minMs + self.frameMs").message("jitterBuffer.maxMs must exceed minMs by at least one frame"))]
pub struct MixingSpec {
    /// How many speakers the conference mixes at once (the global top list's length).
    #[serde(default = "default_top_speakers")]
    #[schemars(range(min = 1, max = 16))]
    pub top_speakers: i32,

    /// Streams forwarded beyond the top list, so a new speaker's first syllable is already on every
    /// server when the list changes.
    #[serde(default = "default_extra_candidates")]
    #[schemars(range(min = 0, max = 8))]
    pub extra_candidates: i32,

    /// Audio frame length in milliseconds: 10 or 20.
    #[serde(default = "default_frame_ms")]
    #[schemars(extend("enum" = [10, 20]))]
    pub frame_ms: i32,

    /// Adaptive jitter-buffer bounds.
    #[serde(default)]
    pub jitter_buffer: JitterBufferSpec,

    /// How often each server sends its local top list to the room's primary, in milliseconds.
    #[serde(default = "default_rank_interval_ms")]
    #[schemars(range(min = 10, max = 2000))]
    pub rank_interval_ms: i32,

    /// Encode the mix with Opus's restricted low-delay mode: 2.5 ms of encoder look-ahead instead
    /// of 6.5 ms, so every listener hears about 4 ms sooner. It costs Opus's in-band FEC (a lost
    /// packet of the mix is concealed rather than recovered from the next one), so leave it off
    /// where listeners' networks lose packets.
    #[serde(default)]
    pub low_delay: bool,

    /// Move each room's mixing tick, by at most 1 ms per frame, to sit just after its top
    /// talkers' frames arrive instead of on a fixed phase where a frame waits up to a whole frame
    /// for the next tick. On by default; off gives the fixed tick back.
    #[serde(default = "default_true")]
    pub align_ticks: bool,
}

/// Bounds of the adaptive jitter buffer, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JitterBufferSpec {
    /// The smallest jitter margin, in milliseconds: a frame waits at least this long after it
    /// arrives before the mixer tick that plays it. The buffer raises the margin to three times
    /// the measured interarrival jitter, and adds less than one frame of phase on top.
    #[serde(default = "default_jitter_min_ms")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_ms: i32,
    /// The largest delay the buffer grows to under jitter, in milliseconds.
    #[serde(default = "default_jitter_max_ms")]
    #[schemars(range(min = 10, max = 2000))]
    pub max_ms: i32,
}

/// The media-server pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.exposure != 'NodePort' || has(self.nodePortBase)").message("nodePortBase is required when exposure is NodePort"))]
pub struct MediaSpec {
    /// The media-server container image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// Compute resources of each media server. Defaults to 500m CPU and 256Mi memory requested,
    /// 1Gi memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The UDP port all participants of a server share for WebRTC media.
    #[serde(default = "default_udp_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub udp_port: i32,

    /// How the UDP media port reaches participants: `HostPort` (default; the node's address),
    /// `NodePort` (one NodePort Service per server, from `nodePortBase` up) or `LoadBalancer`
    /// (one LoadBalancer Service per server).
    #[serde(default)]
    pub exposure: Exposure,

    /// The first NodePort used when `exposure` is `NodePort`; server k of the conference gets
    /// `nodePortBase + k`, in region order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port_base: Option<i32>,

    /// The address put in ICE candidates. Defaults to the node's IP (`status.hostIP`), which is
    /// right for `HostPort` on nodes with public addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub public_address: Option<String>,
}

/// How the UDP media port is exposed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Exposure {
    /// A hostPort on the node running the server.
    #[default]
    HostPort,
    /// One NodePort Service per server.
    NodePort,
    /// One LoadBalancer Service per server.
    LoadBalancer,
}

/// Dial-out to desk IP phones through the PBX's call manager ("call me"): a participant asks the
/// conference to call a phone, and the phone joins the room as one more member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mediaEncryption != 'required' || self.transport == 'tls'").message("mediaEncryption: required needs transport: tls (SRTP keys are exchanged in SDP, which must travel over TLS)"))]
#[x_kube(validation = Rule::new("self.mode != 'server' || has(self.credentialsSecretRef)").message("mode: server needs credentialsSecretRef (the media servers dial through the call manager themselves)"))]
#[x_kube(validation = Rule::new("self.mode != 'edge' || has(self.edgeTokenSecretRef)").message("mode: edge needs edgeTokenSecretRef (the token the edge bridge authenticates with)"))]
#[x_kube(validation = Rule::new("self.maxCallsPerIdentity <= self.maxConcurrentCalls").message("maxCallsPerIdentity must not exceed maxConcurrentCalls"))]
pub struct TelephonySpec {
    /// The call manager (SIP registrar / proxy), as a SIP URI such as `sip:pbx.example.com:5060`.
    /// Calls go to `sip:<target>@<its host>`, so targets stay in the call manager's domain.
    #[schemars(length(min = 5, max = 512), regex(pattern = r"^sips?:[^\s]+$"))]
    pub call_manager_uri: String,

    /// SIP transport to the call manager: `udp` (default), `tcp` or `tls`.
    #[serde(default)]
    pub transport: SipTransport,

    /// A Secret in the conference's namespace with the keys `username` and `password` the media
    /// servers authenticate to the call manager with (SIP digest). Required in `server` mode. The
    /// operator mounts it into the media-server pods as files; it never copies its content
    /// anywhere else (not into the mesh plan, status, events or logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretNameRef>,

    /// The caller id the phone shows, such as `"Chorus" <sip:chorus@pbx.example.com>`. Defaults
    /// to the credentials' username at the call manager's domain. No control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\x00-\x1F\x7F]+$"))]
    pub caller_id: Option<String>,

    /// Codecs offered to the phone, in order of preference, each at most once: `opus`, `PCMU`
    /// (G.711 mu-law), `PCMA` (G.711 A-law). G.722 is not offered: the media server has no G.722
    /// codec, and offering one it cannot decode would end in silence rather than a clean refusal.
    #[serde(default = "default_phone_codecs")]
    #[schemars(length(min = 1, max = 3))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(o, o == c))").message("codecs must not repeat"))]
    pub codecs: Vec<PhoneCodec>,

    /// Where calls are placed: `server` (default), the media servers dial the phone through the
    /// call manager themselves; `edge`, a `chorus-mediaserver edge` bridge inside the enterprise
    /// network registers with the call manager, dials and joins the room as a participant.
    #[serde(default)]
    pub mode: TelephonyMode,

    /// SRTP on the phone leg: `disabled` (plain RTP), `optional` (default; SRTP when the phone
    /// accepts it, else plain RTP) or `required` (calls fail without SRTP). SRTP keys travel in
    /// SDP (SDES), so they are offered only over `tls`; `required` therefore needs `transport: tls`.
    #[serde(default)]
    pub media_encryption: MediaEncryption,

    /// How long a phone may ring before the call ends as `no_answer`, in seconds.
    #[serde(default = "default_ring_timeout_seconds")]
    #[schemars(range(min = 5, max = 120))]
    pub ring_timeout_seconds: i32,

    /// How long an answered phone may send no RTP before the call ends as `media_timeout`, in
    /// seconds.
    #[serde(default = "default_media_timeout_seconds")]
    #[schemars(range(min = 2, max = 60))]
    pub media_timeout_seconds: i32,

    /// The longest a call may last once answered, in seconds (default 4 hours).
    #[serde(default = "default_max_call_seconds")]
    #[schemars(range(min = 60, max = 86400))]
    pub max_call_seconds: i32,

    /// The most phone calls one media server holds at once (ringing or answered); more are
    /// refused.
    #[serde(default = "default_max_concurrent_calls")]
    #[schemars(range(min = 1, max = 500))]
    pub max_concurrent_calls: i32,

    /// The most phone calls one participant identity may have at once.
    #[serde(default = "default_max_calls_per_identity")]
    #[schemars(range(min = 1, max = 10))]
    pub max_calls_per_identity: i32,

    /// What may be dialled: regular expressions (RE2 / Rust `regex` syntax) of which a target's
    /// user part must match at least one, matched against the whole user part. The default allows
    /// 2 to 20 digits, `*`, `#` and `+`. A pattern that does not compile is refused, and so is one
    /// that compiles to more than 1 MiB (prefer ASCII classes such as `[0-9a-z]` to Unicode ones
    /// such as `\w`, which are large).
    #[serde(default = "default_allowed_targets")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 256)))]
    // `matches` fails on a pattern that does not compile, and a failing rule refuses the object;
    // `in [true, false]` keeps that failure from being absorbed the way `||` would absorb it.
    #[x_kube(validation = Rule::new("self.all(p, ''.matches(p) in [true, false])").message("every allowedTargets entry must be a valid regular expression"))]
    pub allowed_targets: Vec<String>,

    /// The port each media server uses for SIP, UDP and TCP alike (and for TLS when `transport`
    /// is `tls`). It must differ from the mesh port (7000), the HTTP port (8080) and
    /// `media.udpPort`.
    #[serde(default = "default_sip_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub sip_port: i32,

    /// An optional Secret with the key `ca.crt`: the CA (PEM) that signed the call manager's TLS
    /// certificate, when it is not a public CA. Used with `transport: tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretNameRef>,

    /// A Secret with the key `token` that an edge bridge presents when it connects to the
    /// conference. Required in `edge` mode, unused in `server` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_token_secret_ref: Option<SecretNameRef>,
}

/// SIP transport.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SipTransport {
    /// SIP over UDP.
    #[default]
    Udp,
    /// SIP over TCP.
    Tcp,
    /// SIP over TLS (with SRTP where the phone supports it).
    Tls,
}

/// A codec the phone leg may use. There is deliberately no G.722: the media server has no G.722
/// codec and must not advertise one.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PhoneCodec {
    /// Opus.
    #[serde(rename = "opus")]
    Opus,
    /// G.711 mu-law.
    #[serde(rename = "PCMU")]
    Pcmu,
    /// G.711 A-law.
    #[serde(rename = "PCMA")]
    Pcma,
}

/// Where phone calls are placed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TelephonyMode {
    /// The media servers dial through the call manager.
    #[default]
    Server,
    /// An edge bridge inside the enterprise network dials and joins the room as a participant.
    Edge,
}

/// SRTP on the phone leg.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MediaEncryption {
    /// Plain RTP only.
    Disabled,
    /// SRTP when the phone accepts it (and the transport is TLS), plain RTP otherwise.
    #[default]
    Optional,
    /// SRTP or no call.
    Required,
}

/// Session transfer by QR code.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferSpec {
    /// Whether participants may move their session to another device.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a transfer code stays redeemable, in seconds. Codes are single use.
    #[serde(default = "default_transfer_ttl")]
    #[schemars(range(min = 10, max = 600))]
    pub token_ttl_seconds: i32,
    /// Whether a code may be redeemed at any server of the conference (it is forwarded to the
    /// server that issued it) rather than only at the issuer.
    #[serde(default = "default_true")]
    pub allow_cross_server: bool,
}

/// Join-token signing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// A Secret holding the HMAC key that signs join tokens. When absent, the operator creates
    /// `<conference>-join-key` once and never rotates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_key_secret_ref: Option<SecretRef>,
}

/// A reference to a key of a Secret in the conference's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the Secret. Defaults to `key`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the conference's namespace, by name. The keys it must hold are fixed by the field
/// that names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretNameRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the operator observed of a conference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConferenceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Provisioning, Ready or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, MeshWired and Degraded, each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per region: ready and desired servers, and where clients connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionStatus>,
    /// Ready servers over desired servers, such as `5/6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_servers: Option<String>,
    /// The region names, comma separated, for `kubectl get conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_names: Option<String>,
    /// The generation of the mesh plan the operator published. It changes only when the mesh does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_generation: Option<i64>,
    /// The digest of the published mesh plan's contents, which decides when its generation moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_digest: Option<String>,
    /// Where participants open the web client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_url: Option<String>,
}

/// The lifecycle phase of a conference.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Accepted; nothing observed running yet.
    Pending,
    /// Servers are being created or rolled out.
    Provisioning,
    /// Every desired server is ready and the mesh is wired.
    Ready,
    /// Something keeps the conference from its desired state; see the Degraded condition.
    Degraded,
}

impl Phase {
    /// The phase as it appears in the resource, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Provisioning => "Provisioning",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
        }
    }
}

/// What the operator observed of one region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// The region's name.
    pub name: String,
    /// Media servers of this region that pass their readiness probe.
    pub ready_servers: i32,
    /// Media servers this region should run.
    pub desired_servers: i32,
    /// The in-cluster URL of the region's client Service.
    pub endpoint: String,
}

fn default_replicas() -> i32 {
    1
}
fn default_max_participants() -> i32 {
    500
}
fn default_top_speakers() -> i32 {
    3
}
fn default_extra_candidates() -> i32 {
    1
}
fn default_frame_ms() -> i32 {
    20
}
fn default_rank_interval_ms() -> i32 {
    100
}
fn default_jitter_min_ms() -> i32 {
    2
}
fn default_jitter_max_ms() -> i32 {
    120
}
fn default_image() -> String {
    "ghcr.io/chorus-dev/chorus-mediaserver:0.1.0".to_owned()
}
fn default_udp_port() -> i32 {
    40000
}
fn default_true() -> bool {
    true
}
fn default_transfer_ttl() -> i32 {
    60
}
fn default_secret_key() -> String {
    crate::names::JOIN_KEY_KEY.to_owned()
}
fn default_phone_codecs() -> Vec<PhoneCodec> {
    vec![PhoneCodec::Opus, PhoneCodec::Pcmu, PhoneCodec::Pcma]
}
fn default_ring_timeout_seconds() -> i32 {
    30
}
fn default_media_timeout_seconds() -> i32 {
    10
}
fn default_max_call_seconds() -> i32 {
    14_400
}
fn default_max_concurrent_calls() -> i32 {
    20
}
fn default_max_calls_per_identity() -> i32 {
    1
}
/// What may be dialled unless the spec says otherwise: 2 to 20 digits, `*`, `#` and `+`.
pub const DEFAULT_ALLOWED_TARGET: &str = "^[0-9*#+]{2,20}$";
fn default_allowed_targets() -> Vec<String> {
    vec![DEFAULT_ALLOWED_TARGET.to_owned()]
}
fn default_sip_port() -> i32 {
    5060
}

impl Default for MixingSpec {
    fn default() -> Self {
        Self {
            top_speakers: default_top_speakers(),
            extra_candidates: default_extra_candidates(),
            frame_ms: default_frame_ms(),
            jitter_buffer: JitterBufferSpec::default(),
            rank_interval_ms: default_rank_interval_ms(),
            low_delay: false,
            align_ticks: true,
        }
    }
}

impl Default for JitterBufferSpec {
    fn default() -> Self {
        Self {
            min_ms: default_jitter_min_ms(),
            max_ms: default_jitter_max_ms(),
        }
    }
}

impl Default for MediaSpec {
    fn default() -> Self {
        Self {
            image: default_image(),
            resources: None,
            udp_port: default_udp_port(),
            exposure: Exposure::default(),
            node_port_base: None,
            public_address: None,
        }
    }
}

impl Default for TransferSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            token_ttl_seconds: default_transfer_ttl(),
            allow_cross_server: true,
        }
    }
}
