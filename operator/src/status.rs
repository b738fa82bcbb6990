//! The pure status: what the conference looks like, from its plan and its observed children.
//!
//! `status` does no IO; the time is a parameter. Conditions keep their `lastTransitionTime` while
//! their status does not change, so repeated reconciles write identical statuses.
//!
//! Phase rules, first match wins:
//! 1. the spec cannot be satisfied, or a Secret it names is missing: `Degraded` with that reason;
//! 2. no server is desired: `Degraded` (`NoServers`);
//! 3. no region's StatefulSet exists yet: `Pending`;
//! 4. every region has all its servers ready: `Ready`;
//! 5. some StatefulSet is missing or still rolling out: `Provisioning`;
//! 6. otherwise (rolled out, yet servers not ready): `Degraded` (`ServersNotReady`).

use chorus_crds::names::condition;
use chorus_crds::{Conference, ConferenceStatus, Phase, RegionStatus};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::plan::{Plan, SpecProblem};

/// What the apply layer observed, beside the plan.
#[derive(Debug, Default)]
pub struct Observed<'a> {
    /// The conference's StatefulSets that exist now.
    pub statefulsets: &'a [StatefulSet],
    /// A Secret the spec names that is missing or lacks its key.
    pub secret_problem: Option<&'a SpecProblem>,
    /// Whether every server in the mesh plan has its certificate in the mesh TLS Secret.
    pub certificates_complete: bool,
}

/// Compute the status of `conf`. `plan` is the plan's outcome for this same object.
pub fn status(
    conf: &Conference,
    plan: Result<&Plan, &SpecProblem>,
    observed: &Observed<'_>,
    now: &Time,
) -> ConferenceStatus {
    let previous = conf.status.clone().unwrap_or_default();
    let generation = conf.metadata.generation;

    let regions: Vec<RegionStatus> = match plan {
        Ok(p) => p
            .regions
            .iter()
            .map(|r| {
                let sts = find(observed.statefulsets, &r.statefulset);
                RegionStatus {
                    name: r.name.clone(),
                    ready_servers: sts.map_or(0, ready_replicas),
                    desired_servers: r.desired,
                    endpoint: r.endpoint.clone(),
                }
            })
            .collect(),
        Err(_) => previous.regions.clone(),
    };
    let ready: i32 = regions.iter().map(|r| r.ready_servers).sum();
    let desired: i32 = regions.iter().map(|r| r.desired_servers).sum();

    let (phase, reason, message) = decide(plan, observed, &regions, desired);

    let mesh_ok = plan.is_ok() && observed.certificates_complete;
    let (mesh_reason, mesh_message) = match plan {
        Ok(p) if observed.certificates_complete => (
            "MeshPlanPublished",
            format!(
                "mesh plan generation {} lists {} servers, each with its certificate",
                p.mesh.generation,
                p.mesh.nodes.len()
            ),
        ),
        Ok(_) => (
            "CertificatesMissing",
            "some servers have no mesh certificate yet".to_owned(),
        ),
        Err(problem) => (
            problem.reason,
            "no mesh plan: the spec cannot be satisfied".to_owned(),
        ),
    };

    let conditions = vec![
        cond(
            &previous,
            condition::READY,
            phase == Phase::Ready,
            if phase == Phase::Ready {
                "AllServersReady"
            } else {
                reason
            },
            &message,
            generation,
            now,
        ),
        cond(
            &previous,
            condition::MESH_WIRED,
            mesh_ok,
            mesh_reason,
            &mesh_message,
            generation,
            now,
        ),
        cond(
            &previous,
            condition::DEGRADED,
            phase == Phase::Degraded,
            if phase == Phase::Degraded {
                reason
            } else {
                "AsExpected"
            },
            if phase == Phase::Degraded {
                &message
            } else {
                ""
            },
            generation,
            now,
        ),
    ];

    ConferenceStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        ready_servers: Some(format!("{ready}/{desired}")),
        region_names: Some(
            conf.spec
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        regions,
        mesh_generation: plan
            .ok()
            .map(|p| p.mesh.generation)
            .or(previous.mesh_generation),
        mesh_digest: plan
            .ok()
            .map(|p| p.mesh_digest.clone())
            .or(previous.mesh_digest),
        join_url: plan.ok().map(|p| p.join_url.clone()).or(previous.join_url),
    }
}

fn decide(
    plan: Result<&Plan, &SpecProblem>,
    observed: &Observed<'_>,
    regions: &[RegionStatus],
    desired: i32,
) -> (Phase, &'static str, String) {
    let plan = match plan {
        Err(problem) => return (Phase::Degraded, problem.reason, problem.message.clone()),
        Ok(p) => p,
    };
    if let Some(problem) = observed.secret_problem {
        return (Phase::Degraded, problem.reason, problem.message.clone());
    }
    if desired == 0 {
        return (
            Phase::Degraded,
            "NoServers",
            "every region has replicas: 0; nobody can join".to_owned(),
        );
    }
    let existing: Vec<&StatefulSet> = plan
        .regions
        .iter()
        .filter_map(|r| find(observed.statefulsets, &r.statefulset))
        .collect();
    if existing.is_empty() {
        return (
            Phase::Pending,
            "Pending",
            "no media-server StatefulSet observed yet".to_owned(),
        );
    }
    if regions.iter().all(|r| r.ready_servers >= r.desired_servers) {
        return (
            Phase::Ready,
            "AllServersReady",
            format!("{desired} servers ready in {} regions", regions.len()),
        );
    }
    let rolling: Vec<&str> = plan
        .regions
        .iter()
        .filter(|r| find(observed.statefulsets, &r.statefulset).is_none_or(rolling_out))
        .map(|r| r.name.as_str())
        .collect();
    if !rolling.is_empty() {
        return (
            Phase::Provisioning,
            "RollingOut",
            format!("rolling out in regions: {}", rolling.join(", ")),
        );
    }
    let short: Vec<String> = regions
        .iter()
        .filter(|r| r.ready_servers < r.desired_servers)
        .map(|r| format!("{} ({}/{})", r.name, r.ready_servers, r.desired_servers))
        .collect();
    (
        Phase::Degraded,
        "ServersNotReady",
        format!("servers not ready in: {}", short.join(", ")),
    )
}

fn find<'a>(list: &'a [StatefulSet], name: &str) -> Option<&'a StatefulSet> {
    list.iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
}

fn ready_replicas(sts: &StatefulSet) -> i32 {
    sts.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// Whether the StatefulSet controller is still working towards the current spec.
fn rolling_out(sts: &StatefulSet) -> bool {
    let Some(status) = &sts.status else {
        return true;
    };
    let desired = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let seen_latest = status.observed_generation.is_some()
        && status.observed_generation >= sts.metadata.generation;
    let revisions_settled = match (&status.current_revision, &status.update_revision) {
        (Some(c), Some(u)) => c == u,
        _ => true,
    };
    !seen_latest
        || status.updated_replicas.unwrap_or(0) < desired
        || status.replicas != desired
        || !revisions_settled
}

fn cond(
    previous: &ConferenceStatus,
    type_: &str,
    is_true: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if is_true { "True" } else { "False" };
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}
