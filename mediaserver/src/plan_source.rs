//! Where a media server's mesh plan comes from, read once at startup and then watched: a JSON
//! file in local mode, or the `mesh.json` key of the conference's ConfigMap in a cluster (read
//! through the Kubernetes API with the pod's own ServiceAccount, which may only read that one
//! ConfigMap).
//!
//! Both sources behave alike: every valid new generation goes to [`MeshNode::apply_plan`], which
//! applies it live (peers and mixing settings); a plan that does not parse or validate is logged
//! and skipped, and the running plan stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_crds::names::MESH_PLAN_KEY;
use chorus_crds::{MeshPlan, MeshPlanError};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::config::MeshSource;
use crate::mesh_node::MeshNode;

/// How often a plan file is checked for changes.
const PLAN_FILE_POLL: Duration = Duration::from_millis(500);

/// Why no plan could be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanSourceError {
    /// The plan file could not be read.
    #[error("reading mesh plan {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The plan (file or ConfigMap key) does not parse or validate.
    #[error("mesh plan {origin}: {source}")]
    Invalid {
        /// The file or `namespace/name` of the ConfigMap.
        origin: String,
        /// What is wrong with it.
        #[source]
        source: MeshPlanError,
    },
    /// The ConfigMap has no `mesh.json` key.
    #[error("ConfigMap {origin} has no {MESH_PLAN_KEY:?} key")]
    MissingKey {
        /// `namespace/name`.
        origin: String,
    },
    /// The Kubernetes API could not be reached or refused the read.
    #[error("reading ConfigMap {origin}: {source}")]
    Kubernetes {
        /// `namespace/name`, or `client` while connecting.
        origin: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl PlanSourceError {
    /// A static label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            PlanSourceError::Read { .. } => "read",
            PlanSourceError::Invalid { .. } => "invalid",
            PlanSourceError::MissingKey { .. } => "missing_key",
            PlanSourceError::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// Read the plan once, at startup.
pub async fn first_plan(source: &MeshSource) -> Result<MeshPlan, PlanSourceError> {
    match source {
        MeshSource::File(path) => read_plan_file(path),
        MeshSource::ConfigMap { namespace, name } => {
            let client =
                Client::try_default()
                    .await
                    .map_err(|source| PlanSourceError::Kubernetes {
                        origin: "client".to_owned(),
                        source,
                    })?;
            let origin = format!("{namespace}/{name}");
            let api: Api<ConfigMap> = Api::namespaced(client, namespace);
            let cm = api
                .get(name)
                .await
                .map_err(|source| PlanSourceError::Kubernetes {
                    origin: origin.clone(),
                    source,
                })?;
            plan_of(&cm, &origin)
        }
    }
}

/// Watch `source` and hand every valid new generation to `node`, until `shutdown`.
pub fn watch(source: MeshSource, node: MeshNode, shutdown: CancellationToken) {
    match source {
        MeshSource::File(path) => {
            tokio::spawn(watch_file(path, node, shutdown));
        }
        MeshSource::ConfigMap { namespace, name } => {
            tokio::spawn(watch_configmap(namespace, name, node, shutdown));
        }
    }
}

/// Read and validate a plan file.
pub fn read_plan_file(path: &Path) -> Result<MeshPlan, PlanSourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlanSourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    MeshPlan::from_json(&text).map_err(|source| PlanSourceError::Invalid {
        origin: path.display().to_string(),
        source,
    })
}

fn plan_of(cm: &ConfigMap, origin: &str) -> Result<MeshPlan, PlanSourceError> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(MESH_PLAN_KEY))
        .ok_or_else(|| PlanSourceError::MissingKey {
            origin: origin.to_owned(),
        })?;
    MeshPlan::from_json(text).map_err(|source| PlanSourceError::Invalid {
        origin: origin.to_owned(),
        source,
    })
}

/// Hand `plan` to the node when it is a new generation.
fn offer(node: &MeshNode, plan: Result<MeshPlan, PlanSourceError>) {
    match plan {
        Ok(plan) if plan.generation != node.generation() => node.apply_plan(plan),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "mesh plan refused; keeping the running plan"),
    }
}

async fn watch_file(path: PathBuf, node: MeshNode, shutdown: CancellationToken) {
    let mut last = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(PLAN_FILE_POLL) => {}
        }
        // A file being rewritten may be missing for a moment: try again at the next poll.
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        if text == last {
            continue;
        }
        let plan = MeshPlan::from_json(&text).map_err(|source| PlanSourceError::Invalid {
            origin: path.display().to_string(),
            source,
        });
        offer(&node, plan);
        last = text;
    }
}

async fn watch_configmap(
    namespace: String,
    name: String,
    node: MeshNode,
    shutdown: CancellationToken,
) {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the mesh plan: no Kubernetes client");
            return;
        }
    };
    let origin = format!("{namespace}/{name}");
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, config);
    tokio::pin!(stream);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = stream.try_next() => event,
        };
        match event {
            Ok(Some(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                offer(&node, plan_of(&cm, &origin));
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            // The watcher retries by itself; a failing API server is logged, not fatal.
            Err(e) => tracing::warn!(error = %e, "mesh plan watch error"),
        }
    }
}
