//! The `MeshPlan`: what the operator hands the media servers of one conference.
//!
//! It is published as the `mesh.json` key of the `<conference>-mesh` ConfigMap (or a file in local
//! mode). Media servers watch it and apply a new generation live.
//!
//! Invariants:
//! - `generation` changes exactly when the rest of the plan changes; [`MeshPlan::digest`] hashes
//!   everything but the generation, and the operator bumps the generation only when it moves.
//! - node ids are unique and listed in a stable order (regions in spec order, then ordinal), so
//!   every server computes the same rendezvous-hash primaries from the same plan.
//! - the plan carries no secret material, only Secret names: it lives in a ConfigMap.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{MediaEncryption, PhoneCodec, SipTransport, TelephonyMode};

/// The mesh of one conference at one generation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPlan {
    /// The conference's name.
    pub conference: String,
    /// Moves whenever anything else in the plan changes.
    pub generation: i64,
    /// Every media server of the conference.
    pub nodes: Vec<MeshNode>,
    /// Ranking and mixing parameters, the same on every server.
    pub mixing: MeshMixing,
    /// Session transfer settings.
    pub transfer: MeshTransfer,
    /// Dial-out settings, when the conference has telephony.
    pub telephony: Option<MeshTelephony>,
}

/// One media server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNode {
    /// The server id, which is also its pod name.
    pub id: String,
    /// Its region.
    pub region: String,
    /// `host:port` of its QUIC mesh endpoint.
    pub mesh: String,
    /// Base URL of its HTTP signalling API.
    pub signal: String,
}

/// Mixing parameters shared by every server of the conference.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshMixing {
    /// Length of the global top list.
    pub top_speakers: u32,
    /// Streams forwarded beyond the top list.
    pub extra_candidates: u32,
    /// Frame length in milliseconds (10 or 20).
    pub frame_ms: u32,
    /// Jitter-buffer lower bound in milliseconds.
    pub jitter_min_ms: u32,
    /// Jitter-buffer upper bound in milliseconds.
    pub jitter_max_ms: u32,
    /// Interval between local top lists in milliseconds.
    pub rank_interval_ms: u32,
    /// Whether the mixes are encoded in Opus's restricted low-delay mode. Absent in plans
    /// written before the field existed: off.
    #[serde(default)]
    pub low_delay: bool,
    /// Whether rooms align their tick to their talkers' arrivals. Absent in plans written before
    /// the field existed: on.
    #[serde(default = "align_ticks_default")]
    pub align_ticks: bool,
}

fn align_ticks_default() -> bool {
    true
}

impl From<&crate::MixingSpec> for MeshMixing {
    /// The plan's copy of a Conference's `mixing` block. Negative numbers (refused by the CRD's
    /// schema) become 0, which [`MeshPlan::from_json`] then refuses as out of range.
    fn from(m: &crate::MixingSpec) -> Self {
        let non_negative = |v: i32| u32::try_from(v).unwrap_or(0);
        Self {
            top_speakers: non_negative(m.top_speakers),
            extra_candidates: non_negative(m.extra_candidates),
            frame_ms: non_negative(m.frame_ms),
            jitter_min_ms: non_negative(m.jitter_buffer.min_ms),
            jitter_max_ms: non_negative(m.jitter_buffer.max_ms),
            rank_interval_ms: non_negative(m.rank_interval_ms),
            low_delay: m.low_delay,
            align_ticks: m.align_ticks,
        }
    }
}

impl Default for MeshMixing {
    /// The CRD's defaults: the one place mixing defaults are written down. A media server running
    /// alone, without a plan, starts from these too.
    fn default() -> Self {
        Self::from(&crate::MixingSpec::default())
    }
}

/// Session transfer settings.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTransfer {
    /// Whether transfer is allowed.
    pub enabled: bool,
    /// Lifetime of a transfer code in seconds.
    pub token_ttl_seconds: u32,
    /// Whether a code redeemed at another server is forwarded to its issuer.
    #[serde(default = "allow_cross_server_default")]
    pub allow_cross_server: bool,
}

fn allow_cross_server_default() -> bool {
    true
}

/// Dial-out settings ("call me"), the Conference's `telephony` block as the media servers use it.
///
/// Secrets are named, never carried: the credentials stay in their Secret, which pods get mounted
/// as files (see `names::env::SIP_CREDENTIALS_DIR`), and this plan sits in a ConfigMap that
/// anyone allowed to read ConfigMaps can read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTelephony {
    /// The call manager's SIP URI (`sip:` or `sips:`).
    pub call_manager_uri: String,
    /// SIP transport to the call manager.
    pub transport: SipTransport,
    /// The caller id shown on the phone; `None` means the credentials' username.
    pub caller_id: Option<String>,
    /// Codecs offered to the phone, in order of preference, no repeats.
    pub codecs: Vec<PhoneCodec>,
    /// Whether the servers dial themselves or an edge bridge does.
    pub mode: TelephonyMode,
    /// SRTP policy on the phone leg.
    pub media_encryption: MediaEncryption,
    /// Seconds a phone may ring before the call ends as `no_answer`.
    pub ring_timeout_seconds: u32,
    /// Seconds without RTP from an answered phone before the call ends as `media_timeout`.
    pub media_timeout_seconds: u32,
    /// Seconds an answered call may last.
    pub max_call_seconds: u32,
    /// Calls one server holds at once.
    pub max_concurrent_calls: u32,
    /// Calls one participant identity holds at once.
    pub max_calls_per_identity: u32,
    /// Patterns of which a target's user part must match one, whole
    /// ([`MeshTelephony::allowed_target_matchers`] anchors them).
    pub allowed_targets: Vec<String>,
    /// The server's SIP port (UDP and TCP; TLS too when the transport is TLS).
    pub sip_port: u16,
    /// The name of the Secret holding `username` and `password`, in server mode (`None` in edge
    /// mode, where the servers hold no SIP account); never its content.
    pub credentials_secret: Option<String>,
}

/// Ranges of the telephony numbers, as the CRD states them: (JSON field, lowest, highest, text).
const TELEPHONY_RANGES: [(&str, u32, u32, &str); 5] = [
    ("telephony.ringTimeoutSeconds", 5, 120, "5..=120"),
    ("telephony.mediaTimeoutSeconds", 2, 60, "2..=60"),
    ("telephony.maxCallSeconds", 60, 86_400, "60..=86400"),
    ("telephony.maxConcurrentCalls", 1, 500, "1..=500"),
    ("telephony.maxCallsPerIdentity", 1, 10, "1..=10"),
];
/// Most `allowedTargets` entries, and the longest one, as in the CRD.
const MAX_ALLOWED_TARGETS: usize = 32;
const MAX_TARGET_PATTERN_LEN: usize = 256;
/// Compiled size cap per pattern: a short pattern with nested counted repetition can otherwise
/// compile to megabytes on every server.
const TARGET_PATTERN_SIZE_LIMIT: usize = 1 << 20;

impl From<&crate::TelephonySpec> for MeshTelephony {
    /// The plan's copy of a Conference's `telephony` block. Numbers out of their type's range
    /// (refused by the CRD's schema) become 0, which [`MeshTelephony::validate`] then refuses.
    fn from(t: &crate::TelephonySpec) -> Self {
        let non_negative = |v: i32| u32::try_from(v).unwrap_or(0);
        Self {
            call_manager_uri: t.call_manager_uri.clone(),
            transport: t.transport,
            caller_id: t.caller_id.clone(),
            codecs: t.codecs.clone(),
            mode: t.mode,
            media_encryption: t.media_encryption,
            ring_timeout_seconds: non_negative(t.ring_timeout_seconds),
            media_timeout_seconds: non_negative(t.media_timeout_seconds),
            max_call_seconds: non_negative(t.max_call_seconds),
            max_concurrent_calls: non_negative(t.max_concurrent_calls),
            max_calls_per_identity: non_negative(t.max_calls_per_identity),
            allowed_targets: t.allowed_targets.clone(),
            sip_port: u16::try_from(t.sip_port).unwrap_or(0),
            // Only servers that dial hold the credentials; in edge mode the bridge does.
            credentials_secret: t
                .credentials_secret_ref
                .as_ref()
                .filter(|_| t.mode == TelephonyMode::Server)
                .map(|s| s.name.clone()),
        }
    }
}

impl MeshTelephony {
    /// Check what the type alone cannot, the same rules as the CRD's schema and CEL: ranges,
    /// codecs without repeats, patterns that compile, TLS for required SRTP, credentials in
    /// server mode.
    pub fn validate(&self) -> Result<(), MeshPlanError> {
        let invalid = |field: &'static str, reason: String| {
            Err(MeshPlanError::InvalidTelephony { field, reason })
        };
        let uri = &self.call_manager_uri;
        if !(uri.starts_with("sip:") || uri.starts_with("sips:"))
            || uri.len() < 5
            || uri.chars().any(char::is_whitespace)
        {
            return invalid(
                "telephony.callManagerUri",
                format!("{uri:?} is not a sip: or sips: URI"),
            );
        }
        if let Some(caller_id) = &self.caller_id
            && (caller_id.is_empty() || caller_id.chars().any(char::is_control))
        {
            return invalid(
                "telephony.callerId",
                "must be non-empty and hold no control characters".to_owned(),
            );
        }
        let values = [
            self.ring_timeout_seconds,
            self.media_timeout_seconds,
            self.max_call_seconds,
            self.max_concurrent_calls,
            self.max_calls_per_identity,
        ];
        for ((field, lo, hi, range), value) in TELEPHONY_RANGES.into_iter().zip(values) {
            if value < lo || value > hi {
                return Err(MeshPlanError::OutOfRange {
                    field,
                    value,
                    range,
                });
            }
        }
        if self.sip_port < 1024 {
            return Err(MeshPlanError::OutOfRange {
                field: "telephony.sipPort",
                value: u32::from(self.sip_port),
                range: "1024..=65535",
            });
        }
        if self.max_calls_per_identity > self.max_concurrent_calls {
            return invalid(
                "telephony.maxCallsPerIdentity",
                format!(
                    "{} exceeds maxConcurrentCalls {}",
                    self.max_calls_per_identity, self.max_concurrent_calls
                ),
            );
        }
        if self.codecs.is_empty() {
            return invalid("telephony.codecs", "lists no codec".to_owned());
        }
        for (i, codec) in self.codecs.iter().enumerate() {
            if self.codecs[..i].contains(codec) {
                return invalid("telephony.codecs", format!("lists {codec:?} twice"));
            }
        }
        if self.media_encryption == MediaEncryption::Required && self.transport != SipTransport::Tls
        {
            return invalid(
                "telephony.mediaEncryption",
                "required needs transport tls: SRTP keys travel in SDP, which must be encrypted"
                    .to_owned(),
            );
        }
        if self.mode == TelephonyMode::Server
            && self.credentials_secret.as_deref().is_none_or(str::is_empty)
        {
            return invalid(
                "telephony.credentialsSecretRef",
                "server mode needs the credentials Secret".to_owned(),
            );
        }
        self.allowed_target_matchers().map(|_| ())
    }

    /// The `allowedTargets` patterns compiled for matching a whole target user part: each is
    /// anchored at both ends, so `1234` allows exactly `1234`, not `99912345`. The one place that
    /// says what "a target matches" means; an error names the pattern that does not compile.
    pub fn allowed_target_matchers(&self) -> Result<Vec<regex::Regex>, MeshPlanError> {
        let invalid = |reason: String| MeshPlanError::InvalidTelephony {
            field: "telephony.allowedTargets",
            reason,
        };
        if self.allowed_targets.is_empty() || self.allowed_targets.len() > MAX_ALLOWED_TARGETS {
            return Err(invalid(format!(
                "must list 1 to {MAX_ALLOWED_TARGETS} patterns, lists {}",
                self.allowed_targets.len()
            )));
        }
        self.allowed_targets
            .iter()
            .map(|pattern| {
                if pattern.is_empty() || pattern.len() > MAX_TARGET_PATTERN_LEN {
                    return Err(invalid(format!(
                        "pattern {pattern:?} must be 1 to {MAX_TARGET_PATTERN_LEN} bytes long"
                    )));
                }
                regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                    .size_limit(TARGET_PATTERN_SIZE_LIMIT)
                    .build()
                    .map_err(|e| invalid(format!("pattern {pattern:?} does not compile: {e}")))
            })
            .collect()
    }
}

/// Why a mesh plan cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshPlanError {
    /// The JSON did not parse into a plan.
    #[error("mesh plan is not valid JSON for a MeshPlan: {0}")]
    Parse(String),
    /// Two nodes share an id.
    #[error("mesh plan lists node id {0:?} twice")]
    DuplicateNode(String),
    /// The telephony block breaks a rule other than a range.
    #[error("mesh plan field {field}: {reason}")]
    InvalidTelephony {
        /// The JSON path of the field, such as `telephony.allowedTargets`.
        field: &'static str,
        /// What is wrong, naming the offending value (never a secret: the plan holds none).
        reason: String,
    },
    /// A number is out of its range.
    #[error("mesh plan field {field} = {value} is out of range ({range})")]
    OutOfRange {
        /// The field's JSON name.
        field: &'static str,
        /// The value found.
        value: u32,
        /// The allowed range, for the message.
        range: &'static str,
    },
}

impl MeshPlanError {
    /// A short, static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            MeshPlanError::Parse(_) => "parse",
            MeshPlanError::DuplicateNode(_) => "duplicate_node",
            MeshPlanError::OutOfRange { .. } => "out_of_range",
            MeshPlanError::InvalidTelephony { .. } => "invalid_telephony",
        }
    }
}

impl MeshPlan {
    /// Parse and validate a plan, as a media server does when its ConfigMap or file changes.
    pub fn from_json(text: &str) -> Result<Self, MeshPlanError> {
        let plan: MeshPlan =
            serde_json::from_str(text).map_err(|e| MeshPlanError::Parse(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Check what the type alone cannot: unique ids and sane numbers.
    pub fn validate(&self) -> Result<(), MeshPlanError> {
        let mut seen = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if !seen.insert(n.id.as_str()) {
                return Err(MeshPlanError::DuplicateNode(n.id.clone()));
            }
        }
        let m = &self.mixing;
        let checks: [(&'static str, u32, u32, u32, &'static str); 3] = [
            ("topSpeakers", m.top_speakers, 1, 16, "1..=16"),
            ("frameMs", m.frame_ms, 10, 20, "10 or 20"),
            ("rankIntervalMs", m.rank_interval_ms, 10, 2000, "10..=2000"),
        ];
        for (field, value, lo, hi, range) in checks {
            if value < lo || value > hi || (field == "frameMs" && value != 10 && value != 20) {
                return Err(MeshPlanError::OutOfRange {
                    field,
                    value,
                    range,
                });
            }
        }
        if let Some(telephony) = &self.telephony {
            telephony.validate()?;
        }
        Ok(())
    }

    /// A hex SHA-256 over everything but the generation. Equal digests mean the same mesh.
    pub fn digest(&self) -> String {
        let mut copy = self.clone();
        copy.generation = 0;
        // Serialising a struct is deterministic: fields in declaration order, no maps.
        let bytes = serde_json::to_vec(&copy)
            .expect("a MeshPlan always serialises: no maps with non-string keys");
        let hash = Sha256::digest(&bytes);
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The plan as pretty JSON, as stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .expect("a MeshPlan always serialises: no maps with non-string keys")
    }

    /// The nodes of one region, in ordinal order.
    pub fn nodes_in<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a MeshNode> + 'a {
        self.nodes.iter().filter(move |n| n.region == region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MeshPlan {
        MeshPlan {
            conference: "townhall".into(),
            generation: 7,
            nodes: vec![MeshNode {
                id: "townhall-us-0".into(),
                region: "us".into(),
                mesh: "townhall-us-0.townhall-mesh.ns.svc:7000".into(),
                signal: "http://townhall-us-0.townhall-mesh.ns.svc:8080".into(),
            }],
            mixing: MeshMixing {
                top_speakers: 3,
                extra_candidates: 1,
                frame_ms: 20,
                jitter_min_ms: 20,
                jitter_max_ms: 120,
                rank_interval_ms: 100,
                low_delay: false,
                align_ticks: true,
            },
            transfer: MeshTransfer {
                enabled: true,
                token_ttl_seconds: 60,
                allow_cross_server: true,
            },
            telephony: None,
        }
    }

    #[test]
    fn design_example_parses() {
        let text = r#"{ "conference": "townhall", "generation": 7,
          "nodes": [ { "id": "townhall-us-0", "region": "us", "mesh": "townhall-us-0.townhall-mesh.ns.svc:7000",
                       "signal": "http://townhall-us-0.townhall-mesh.ns.svc:8080" } ],
          "mixing": { "topSpeakers": 3, "extraCandidates": 1, "frameMs": 20, "jitterMinMs": 20, "jitterMaxMs": 120, "rankIntervalMs": 100 },
          "transfer": { "enabled": true, "tokenTtlSeconds": 60 },
          "telephony": null }"#;
        assert_eq!(MeshPlan::from_json(text), Ok(sample()));
    }

    fn telephony() -> MeshTelephony {
        MeshTelephony {
            call_manager_uri: "sip:pbx.example.com:5060".into(),
            transport: SipTransport::Tls,
            caller_id: Some("\"Chorus\" <sip:chorus@pbx.example.com>".into()),
            codecs: vec![PhoneCodec::Opus, PhoneCodec::Pcmu],
            mode: TelephonyMode::Server,
            media_encryption: MediaEncryption::Required,
            ring_timeout_seconds: 30,
            media_timeout_seconds: 10,
            max_call_seconds: 14_400,
            max_concurrent_calls: 20,
            max_calls_per_identity: 1,
            allowed_targets: vec!["^[0-9*#+]{2,20}$".into(), "1[0-9]{3}".into()],
            sip_port: 5060,
            credentials_secret: Some("pbx".into()),
        }
    }

    #[test]
    fn a_plan_with_telephony_parses_and_names_only_the_secret() {
        let text = r#"{ "conference": "townhall", "generation": 7,
          "nodes": [ { "id": "townhall-us-0", "region": "us", "mesh": "townhall-us-0.townhall-mesh.ns.svc:7000",
                       "signal": "http://townhall-us-0.townhall-mesh.ns.svc:8080" } ],
          "mixing": { "topSpeakers": 3, "extraCandidates": 1, "frameMs": 20, "jitterMinMs": 20, "jitterMaxMs": 120, "rankIntervalMs": 100 },
          "transfer": { "enabled": true, "tokenTtlSeconds": 60 },
          "telephony": { "callManagerUri": "sip:pbx.example.com:5060", "transport": "tls",
                         "callerId": "\"Chorus\" <sip:chorus@pbx.example.com>", "codecs": ["opus", "PCMU"],
                         "mode": "server", "mediaEncryption": "required",
                         "ringTimeoutSeconds": 30, "mediaTimeoutSeconds": 10, "maxCallSeconds": 14400,
                         "maxConcurrentCalls": 20, "maxCallsPerIdentity": 1,
                         "allowedTargets": ["^[0-9*#+]{2,20}$", "1[0-9]{3}"], "sipPort": 5060,
                         "credentialsSecret": "pbx" } }"#;
        let mut expected = sample();
        expected.telephony = Some(telephony());
        assert_eq!(MeshPlan::from_json(text), Ok(expected.clone()));
        // And back: what the operator writes is what a server reads.
        assert_eq!(MeshPlan::from_json(&expected.to_json()), Ok(expected));
        // Strict: a field the servers would not understand (such as a password) is refused.
        let with_password = text.replace(
            r#""credentialsSecret": "pbx""#,
            r#""credentialsSecret": "pbx", "password": "x""#,
        );
        assert_eq!(
            MeshPlan::from_json(&with_password).unwrap_err().category(),
            "parse"
        );
        // G.722 is not a codec the servers have.
        let g722 = text.replace(r#"["opus", "PCMU"]"#, r#"["G722"]"#);
        assert_eq!(MeshPlan::from_json(&g722).unwrap_err().category(), "parse");
    }

    #[test]
    fn bad_telephony_is_refused_naming_the_field() {
        let refused = |edit: &dyn Fn(&mut MeshTelephony), field: &str| {
            let mut plan = sample();
            let mut t = telephony();
            edit(&mut t);
            plan.telephony = Some(t);
            let err = MeshPlan::from_json(&plan.to_json()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        };
        refused(&|t| t.ring_timeout_seconds = 4, "ringTimeoutSeconds");
        refused(&|t| t.media_timeout_seconds = 61, "mediaTimeoutSeconds");
        refused(&|t| t.max_call_seconds = 59, "maxCallSeconds");
        refused(&|t| t.max_concurrent_calls = 0, "maxConcurrentCalls");
        refused(&|t| t.max_calls_per_identity = 11, "maxCallsPerIdentity");
        refused(
            &|t| {
                t.max_concurrent_calls = 2;
                t.max_calls_per_identity = 3;
            },
            "maxCallsPerIdentity",
        );
        refused(&|t| t.sip_port = 80, "sipPort");
        refused(&|t| t.codecs = vec![], "codecs");
        refused(&|t| t.codecs.push(PhoneCodec::Opus), "codecs");
        refused(&|t| t.transport = SipTransport::Udp, "mediaEncryption");
        refused(&|t| t.credentials_secret = None, "credentialsSecret");
        refused(
            &|t| t.call_manager_uri = "http://pbx".into(),
            "callManagerUri",
        );
        refused(&|t| t.caller_id = Some("a\r\nVia: x".into()), "callerId");
        refused(&|t| t.allowed_targets = vec![], "allowedTargets");
        refused(
            &|t| t.allowed_targets.push("[0-9".into()),
            "pattern \"[0-9\" does not compile",
        );
        // Edge mode dials from the enterprise network: the servers need no credentials.
        let mut edge = telephony();
        edge.mode = TelephonyMode::Edge;
        edge.credentials_secret = None;
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn allowed_targets_match_the_whole_user_part() {
        let mut t = telephony();
        t.allowed_targets = vec!["1[0-9]{3}".into(), "^\\+49[0-9]+$".into()];
        let matchers = t.allowed_target_matchers().unwrap();
        let allowed = |target: &str| matchers.iter().any(|m| m.is_match(target));
        assert!(allowed("1234"));
        assert!(!allowed("91234"), "unanchored patterns still match whole");
        assert!(!allowed("12345"));
        assert!(allowed("+4930123"));
        assert!(!allowed("+4930123@evil.example"));
    }

    #[test]
    fn digest_ignores_generation_only() {
        let a = sample();
        let mut b = sample();
        b.generation = 8;
        assert_eq!(a.digest(), b.digest());
        b.mixing.top_speakers = 4;
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn bad_plans_are_refused_with_reasons() {
        let err = MeshPlan::from_json("{").unwrap_err();
        assert_eq!(err.category(), "parse");
        let err =
            MeshPlan::from_json(r#"{"conference":"x","generation":1,"nodes":[],"surprise":1}"#)
                .unwrap_err();
        assert!(
            err.to_string().contains("surprise") || err.to_string().contains("unknown"),
            "{err}"
        );

        let mut dup = sample();
        dup.nodes.push(dup.nodes[0].clone());
        assert_eq!(
            MeshPlan::from_json(&dup.to_json()),
            Err(MeshPlanError::DuplicateNode("townhall-us-0".into()))
        );
        let mut frame = sample();
        frame.mixing.frame_ms = 15;
        assert_eq!(
            MeshPlan::from_json(&frame.to_json())
                .unwrap_err()
                .category(),
            "out_of_range"
        );
    }
}
