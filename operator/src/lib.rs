//! `chorus-operator`: turns `Conference` resources into region-placed media servers and their mesh.
//!
//! Layering (pure core, thin shell):
//! - [`plan`] and [`status`] are pure: a `Conference` (and observed children) in, objects and a
//!   status out. No IO, no clock.
//! - [`secret_material`] makes certificates and keys, only when a Secret is absent.
//! - [`reconcile`] is the IO shell: apply, prune, status, events, error policy.
//! - [`controller`] wires the watch, leader election and the reconcile loop.
//! - [`http`] and [`metrics`] expose `/metrics`, `/healthz`, `/readyz`.
//! - [`manifests`] renders the CRD and a plan as YAML for the CLI.
//! - [`local`] runs a plan on this machine: media servers as child processes, one loopback address
//!   per region (`chorus-operator local`).

pub mod controller;
pub mod error;
pub mod http;
pub mod local;
pub mod manifests;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod secret_material;
pub mod status;

pub use error::Error;
