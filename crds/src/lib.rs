//! `chorus-crds`: the contracts between the Chorus operator and its media servers.
//!
//! - [`Conference`]: the custom resource users apply (`chorus.dev/v1alpha1`).
//! - [`MeshPlan`]: what the operator publishes for the media servers of one conference.
//! - [`names`]: object names, labels, ports and condition types both sides derive the same way.
//!
//! This crate does no IO. `crds/conference.yaml` is generated from [`Conference`] by
//! `chorus-operator crd` (`make crds`), and a test fails when the two drift.

pub mod conference;
pub mod mesh_plan;
pub mod names;

pub use conference::{
    AuthSpec, Conference, ConferenceSpec, ConferenceStatus, Exposure, JitterBufferSpec,
    MediaEncryption, MediaSpec, MixingSpec, Phase, PhoneCodec, RegionSpec, RegionStatus,
    SecretNameRef, SecretRef, SipTransport, TelephonyMode, TelephonySpec, TransferSpec,
};
pub use mesh_plan::{MeshMixing, MeshNode, MeshPlan, MeshPlanError, MeshTelephony, MeshTransfer};
