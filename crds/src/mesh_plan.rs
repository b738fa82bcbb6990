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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

/// Dial-out settings. Credentials are not here: they stay in their Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTelephony {
    /// The call manager's SIP URI.
    pub call_manager_uri: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The caller id shown on the phone.
    pub caller_id: Option<String>,
    /// Codec names in order of preference.
    pub codecs: Vec<String>,
    /// The Secret holding `username` and `password`, if any.
    pub credentials_secret: Option<String>,
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
            },
            transfer: MeshTransfer {
                enabled: true,
                token_ttl_seconds: 60,
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
