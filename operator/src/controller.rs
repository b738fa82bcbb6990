//! Controller wiring: watch Conferences (and the StatefulSets they own), reconcile, and keep to one
//! active replica through a `coordination.k8s.io` Lease.
//!
//! Leadership: a replica that is not leader waits, ready to take over. A leader that loses its lease
//! stops reconciling at once and returns an error, so the process exits and restarts as a standby;
//! two replicas never reconcile at the same time for longer than the lease's grace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chorus_crds::names;
use chorus_crds::{Conference, Phase};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::ListParams;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::reconcile::{Context, error_policy, reconcile};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Take part in leader election.
    pub leader_elect: bool,
    /// The Lease's name.
    pub lease_name: String,
    /// The Lease's namespace.
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// Lease duration in seconds.
    pub lease_seconds: u64,
}

/// Run until `stop` is cancelled (Ok) or leadership is lost (Err).
pub async fn run(
    client: Client,
    options: RunOptions,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let conferences: Api<Conference> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    check_crd(&conferences).await?;
    ready.store(true, Ordering::Relaxed);

    let leadership = if options.leader_elect {
        Some(acquire_leadership(&client, &options, &metrics, &stop).await?)
    } else {
        metrics.set_leader(true);
        None
    };
    if stop.is_cancelled() {
        return Ok(());
    }

    // Stop reconciling when asked to, or the moment the lease is lost.
    let controller_stop = stop.child_token();
    let lost = Arc::new(AtomicBool::new(false));
    if let Some(mut rx) = leadership {
        let controller_stop = controller_stop.clone();
        let lost = lost.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !*rx.borrow() {
                    break;
                }
            }
            metrics.set_leader(false);
            lost.store(true, Ordering::Relaxed);
            controller_stop.cancel();
        });
    }

    let statefulsets: Api<StatefulSet> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ctx = Arc::new(Context::new(client, metrics.clone()));
    let controller = Controller::new(conferences, watcher::Config::default().any_semantic()).owns(
        statefulsets,
        watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            names::MANAGED_BY
        )),
    );
    let store = controller.store();
    let shutdown = controller_stop.clone().cancelled_owned();
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((object, _)) => tracing::debug!(conference = %object.name, "reconciled"),
                Err(error) => tracing::debug!(%error, "controller event"),
            }
            let mut counts = [
                (Phase::Pending.as_str(), 0i64),
                (Phase::Provisioning.as_str(), 0),
                (Phase::Ready.as_str(), 0),
                (Phase::Degraded.as_str(), 0),
            ];
            for conf in store.state() {
                let phase = conf
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(Phase::Pending);
                if let Some(slot) = counts.iter_mut().find(|(p, _)| *p == phase.as_str()) {
                    slot.1 += 1;
                }
            }
            metrics.set_conferences(&counts);
            futures::future::ready(())
        })
        .await;

    if lost.load(Ordering::Relaxed) && !stop.is_cancelled() {
        return Err(Error::LostLeadership);
    }
    Ok(())
}

async fn check_crd(conferences: &Api<Conference>) -> Result<(), Error> {
    match conferences.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::Input(
            "the Conference CRD is not installed: run `chorus-operator crd | kubectl apply -f -` \
             or install the Helm chart"
                .to_owned(),
        )),
        Err(e) => Err(Error::kube("list", "Conference", "*")(e)),
    }
}

async fn acquire_leadership(
    client: &Client,
    options: &RunOptions,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<tokio::sync::watch::Receiver<bool>, Error> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(options.lease_seconds)
        .with_grace(options.lease_seconds.div_ceil(3).max(1))
        .with_field_manager(names::FIELD_MANAGER)
        .build()
        .await
        .map_err(|e| Error::Leadership(e.to_string()))?;
    let (mut rx, _task) = manager.watch().await;
    tracing::info!(identity = %options.identity, lease = %options.lease_name, "waiting for the leader lease");
    loop {
        if *rx.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(Error::Leadership("the lease task ended".to_owned()));
                }
            }
            () = stop.cancelled() => return Ok(rx),
        }
    }
    tracing::info!(identity = %options.identity, "acquired the leader lease");
    metrics.set_leader(true);
    Ok(rx)
}
