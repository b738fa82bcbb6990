//! The mesh plan in a cluster: the `mesh.json` key of the conference's ConfigMap, read and watched
//! through the Kubernetes API with the pod's own ServiceAccount (which may only read that one
//! ConfigMap). Every valid new generation is applied live; a bad one is logged and skipped.

use chorus_crds::MeshPlan;
use chorus_crds::names::MESH_PLAN_KEY;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::mesh_node::MeshNode;

fn plan_of(cm: &ConfigMap) -> Result<MeshPlan, String> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(MESH_PLAN_KEY))
        .ok_or_else(|| format!("the ConfigMap has no {MESH_PLAN_KEY:?} key"))?;
    MeshPlan::from_json(text).map_err(|e| e.to_string())
}

/// Read the plan once, at startup.
pub async fn first_plan(namespace: &str, name: &str) -> Result<MeshPlan, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("connecting to Kubernetes: {e}"))?;
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let cm = api
        .get(name)
        .await
        .map_err(|e| format!("reading ConfigMap {namespace}/{name}: {e}"))?;
    plan_of(&cm).map_err(|e| format!("ConfigMap {namespace}/{name}: {e}"))
}

/// Watch the ConfigMap and hand every new generation to `node`.
pub fn watch_configmap(
    namespace: String,
    name: String,
    node: MeshNode,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let client = match Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the mesh plan: no Kubernetes client");
                return;
            }
        };
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
                    match plan_of(&cm) {
                        Ok(plan) if plan.generation != node.generation() => node.apply_plan(plan),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "mesh plan refused; keeping the running plan")
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The watcher retries by itself; a failing API server is logged, not fatal.
                Err(e) => tracing::warn!(error = %e, "mesh plan watch error"),
            }
        }
    });
}
