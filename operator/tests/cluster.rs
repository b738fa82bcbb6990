//! Against a real cluster: apply the CRD and the example conference, run the controller in-process
//! and wait for the conference to become Ready.
//!
//! Needs a kubeconfig pointing at a disposable cluster, and a media-server image the nodes can pull
//! (`CHORUS_E2E_IMAGE`). Node selectors are cleared so the example schedules on any node.
//! Run with `cargo test -p chorus-operator --test cluster -- --ignored`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use chorus_crds::{Conference, Phase};
use chorus_operator::controller::{self, RunOptions};
use chorus_operator::manifests;
use chorus_operator::metrics::Metrics;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};
use tokio_util::sync::CancellationToken;

#[tokio::test]
#[ignore = "needs cluster"]
async fn example_conference_becomes_ready() -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let ssa = PatchParams::apply("chorus-e2e").force();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "conferences.chorus.dev",
        &ssa,
        &Patch::Apply(Conference::crd()),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // let the API server publish the new type

    let ns = "chorus-e2e";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            ns,
            &ssa,
            &Patch::Apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
        )
        .await?;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/conference.yaml"
    ))?;
    let mut conf = manifests::read_conference(&text, ns)?;
    // The example dials phones through a call manager on the developer's machine, which a
    // cluster's pods cannot reach; its Secret would be needed too. This test is about the mesh.
    conf.spec.telephony = None;
    for region in &mut conf.spec.regions {
        region.node_selector = Some(Default::default());
    }
    if let Ok(image) = std::env::var("CHORUS_E2E_IMAGE") {
        conf.spec.media.image = image;
    }
    let confs: Api<Conference> = Api::namespaced(client.clone(), ns);
    let name = conf.metadata.name.clone().unwrap_or_default();
    confs.patch(&name, &ssa, &Patch::Apply(&conf)).await?;

    let stop = CancellationToken::new();
    let run = tokio::spawn(controller::run(
        client.clone(),
        RunOptions {
            namespace: Some(ns.to_owned()),
            leader_elect: false,
            lease_name: "chorus-operator".into(),
            lease_namespace: ns.into(),
            identity: "e2e".into(),
            lease_seconds: 15,
        },
        Arc::new(Metrics::new()),
        Arc::new(AtomicBool::new(false)),
        stop.clone(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut phase = None;
    while tokio::time::Instant::now() < deadline {
        phase = confs.get(&name).await?.status.and_then(|s| s.phase);
        if phase == Some(Phase::Ready) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    stop.cancel();
    run.await??;
    confs.delete(&name, &DeleteParams::default()).await?;
    assert_eq!(phase, Some(Phase::Ready));
    Ok(())
}
