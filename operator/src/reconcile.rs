//! The thin IO shell around [`crate::plan`] and [`crate::status`]: one reconcile of one conference.
//!
//! The order of API calls is fixed, which is what the mocked-apiserver tests assert:
//! 1. Secrets, in plan order: GET each; create the absent ones; add missing server certificates to
//!    the mesh TLS Secret with a merge patch that only adds keys. Existing data is never replaced.
//! 2. Server-side apply of every planned object, under one field manager, forced (we own them).
//! 3. Prune: LIST StatefulSets, Services and PodDisruptionBudgets by the conference label and DELETE
//!    those this conference controls that the plan no longer wants (a removed region).
//! 4. Server-side apply of the status subresource.
//! 5. Events for what changed (Secrets created, objects pruned, phase and mesh generation moves).
//!
//! Error policy: transient errors (5xx, conflicts, transport) requeue with per-object exponential
//! backoff; permanent ones (4xx other than conflicts) requeue slowly. A spec that cannot be satisfied
//! is not an error: it becomes the Degraded condition and the reconcile waits for a change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_crds::names;
use chorus_crds::{Conference, ConferenceStatus, Phase};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::plan::{Desired, Plan, SecretPlan, SpecProblem, plan};
use crate::secret_material::{self, MeshCa};
use crate::status::{Observed, status};

/// How often a Ready conference is looked at again without any watch event.
const READY_RESYNC: Duration = Duration::from_secs(300);
/// How often a conference that is still converging is looked at again.
const CONVERGING_RESYNC: Duration = Duration::from_secs(10);
/// How often a permanent error is retried, in case something outside the spec fixed it.
const PERMANENT_RETRY: Duration = Duration::from_secs(300);
/// Backoff bounds for transient errors.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared state of every reconcile.
#[derive(Clone)]
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Who we say we are in Events.
    pub reporter: Reporter,
    /// Reconcile metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per conference (namespace/name), for backoff.
    failures: Arc<Mutex<HashMap<String, u32>>>,
    /// The clock, a parameter so tests can fix it.
    clock: fn() -> Time,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context using the wall clock.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: names::FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            metrics,
            failures: Arc::default(),
            clock: || Time(Timestamp::now()),
        }
    }

    /// A context with a fixed clock, for tests.
    pub fn with_clock(mut self, clock: fn() -> Time) -> Self {
        self.clock = clock;
        self
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .expect("failure map lock is never poisoned: no panics while held");
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let exp = BACKOFF_MIN.saturating_mul(1u32 << (*n - 1).min(16));
        exp.min(BACKOFF_MAX)
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .expect("failure map lock is never poisoned: no panics while held")
            .remove(key);
    }
}

fn key_of(conf: &Conference) -> String {
    format!(
        "{}/{}",
        conf.namespace().unwrap_or_default(),
        conf.name_any()
    )
}

/// Reconcile one conference. Called by the controller; also directly by tests.
pub async fn reconcile(conf: Arc<Conference>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let result = reconcile_inner(&conf, &ctx).await;
    if result.is_ok() {
        ctx.succeeded(&key_of(&conf));
    }
    result
}

/// What the controller does after a failed reconcile.
pub fn error_policy(conf: Arc<Conference>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.category());
    tracing::warn!(conference = %key_of(&conf), category = error.category(), %error, "reconcile failed");
    if error.is_transient() {
        Action::requeue(ctx.backoff(&key_of(&conf)))
    } else {
        Action::requeue(PERMANENT_RETRY)
    }
}

async fn reconcile_inner(conf: &Conference, ctx: &Context) -> Result<Action, Error> {
    let namespace = conf.namespace().ok_or(Error::MalformedObject(
        "a namespaced Conference without a namespace",
    ))?;
    let now = (ctx.clock)();
    let mut events = Vec::new();

    let plan = match plan(conf) {
        Ok(plan) => plan,
        Err(problem) => {
            let new = status(conf, Err(&problem), &Observed::default(), &now);
            patch_status(ctx, conf, &namespace, &new).await?;
            transition_events(conf.status.as_ref(), &new, &mut events);
            publish(ctx, conf, events).await;
            return Ok(Action::await_change());
        }
    };

    let secrets = ensure_secrets(ctx, conf, &plan, &mut events).await?;
    for object in &plan.objects {
        apply(ctx, &namespace, object).await?;
    }
    let statefulsets = prune(ctx, conf, &plan, &mut events).await?;

    let observed = Observed {
        statefulsets: &statefulsets,
        secret_problem: secrets.problem.as_ref(),
        certificates_complete: secrets.certificates_complete,
    };
    let new = status(conf, Ok(&plan), &observed, &now);
    patch_status(ctx, conf, &namespace, &new).await?;
    transition_events(conf.status.as_ref(), &new, &mut events);
    publish(ctx, conf, events).await;

    Ok(match new.phase {
        Some(Phase::Ready) => Action::requeue(READY_RESYNC),
        _ => Action::requeue(CONVERGING_RESYNC),
    })
}

/// What ensuring the Secrets found.
struct SecretOutcome {
    problem: Option<SpecProblem>,
    certificates_complete: bool,
}

async fn ensure_secrets(
    ctx: &Context,
    conf: &Conference,
    plan: &Plan,
    events: &mut Vec<Event>,
) -> Result<SecretOutcome, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let mut outcome = SecretOutcome {
        problem: None,
        certificates_complete: false,
    };
    // The CA's data, once read or made, signs the server certificates.
    let mut ca_data: Option<BTreeMap<String, k8s_openapi::ByteString>> = None;

    for wanted in &plan.secrets {
        let name = wanted.name();
        let existing = api
            .get_opt(name)
            .await
            .map_err(Error::kube("get", "Secret", name))?;
        match (wanted, existing) {
            (SecretPlan::MeshCa { .. }, Some(found)) => ca_data = found.data,
            (SecretPlan::MeshCa { .. }, None) => {
                let data = secret_material::new_mesh_ca(&plan.conference)?;
                create_secret(&api, conf, plan, name, data.clone(), "mesh CA").await?;
                events.push(secret_created(name, &plan.namespace, "mesh CA"));
                ca_data = Some(data);
            }
            (SecretPlan::MeshTls { servers, .. }, found) => {
                let have = found.and_then(|s| s.data).unwrap_or_default();
                let missing: Vec<_> = servers
                    .iter()
                    .filter(|s| {
                        !have.contains_key(&names::server_cert_key(&s.id))
                            || !have.contains_key(&names::server_key_key(&s.id))
                    })
                    .collect();
                let needs_ca_cert = !have.contains_key(names::CA_CERT_KEY);
                if missing.is_empty() && !needs_ca_cert {
                    outcome.certificates_complete = true;
                    continue;
                }
                let ca = MeshCa::from_secret_data(ca_data.as_ref().ok_or_else(|| {
                    Error::SecretMaterial {
                        message: "the mesh CA Secret has no data".to_owned(),
                    }
                })?)?;
                let mut added = BTreeMap::new();
                if needs_ca_cert {
                    added.insert(
                        names::CA_CERT_KEY.to_owned(),
                        k8s_openapi::ByteString(ca.cert_pem().as_bytes().to_vec()),
                    );
                }
                for server in &missing {
                    added.extend(ca.issue(server)?);
                }
                if have.is_empty() {
                    create_secret(&api, conf, plan, name, added, "mesh TLS").await?;
                } else {
                    // A merge patch of `data` adds keys and leaves every other key as it is.
                    let patch = serde_json::json!({ "data": added });
                    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(Error::kube("patch", "Secret", name))?;
                }
                let ids: Vec<&str> = missing.iter().map(|s| s.id.as_str()).collect();
                events.push(normal(
                    "CertificatesIssued",
                    "IssueCertificates",
                    format!("issued mesh certificates for {}", ids.join(", ")),
                ));
                outcome.certificates_complete = true;
            }
            (SecretPlan::JoinKey { .. }, Some(_)) => {}
            (SecretPlan::JoinKey { .. }, None) => {
                create_secret(
                    &api,
                    conf,
                    plan,
                    name,
                    secret_material::new_join_key(),
                    "join-token key",
                )
                .await?;
                events.push(secret_created(name, &plan.namespace, "join-token key"));
            }
            (SecretPlan::External { keys, purpose, .. }, found) => {
                // Only key names are looked at; the values are never read into a message.
                let missing_key = keys.iter().find(|key| {
                    !found
                        .as_ref()
                        .and_then(|s| s.data.as_ref())
                        .is_some_and(|d| d.contains_key(*key))
                });
                let problem = if found.is_none() {
                    Some(SpecProblem {
                        reason: "SecretMissing",
                        message: format!("Secret {name:?} for {purpose} does not exist"),
                    })
                } else {
                    missing_key.map(|key| SpecProblem {
                        reason: "SecretKeyMissing",
                        message: format!("Secret {name:?} for {purpose} has no key {key:?}"),
                    })
                };
                // The first problem found stays: it is the one to fix first.
                if outcome.problem.is_none() {
                    outcome.problem = problem;
                }
            }
        }
    }
    Ok(outcome)
}

async fn create_secret(
    api: &Api<Secret>,
    conf: &Conference,
    plan: &Plan,
    name: &str,
    data: BTreeMap<String, k8s_openapi::ByteString>,
    what: &str,
) -> Result<(), Error> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(BTreeMap::from([
                (names::LABEL_CONFERENCE.to_owned(), plan.conference.clone()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    names::MANAGED_BY.to_owned(),
                ),
                ("app.kubernetes.io/part-of".to_owned(), "chorus".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                names::ANNOTATION_GENERATED_BY.to_owned(),
                format!("chorus-operator: {what}; created once, never rotated by the operator"),
            )])),
            owner_references: conf.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    api.create(&PostParams::default(), &secret)
        .await
        .map(|_| ())
        .map_err(Error::kube("create", "Secret", name))
}

async fn apply(ctx: &Context, namespace: &str, object: &Desired) -> Result<(), Error> {
    match object {
        Desired::ServiceAccount(o) => ssa(ctx, namespace, o).await,
        Desired::Role(o) => ssa(ctx, namespace, o).await,
        Desired::RoleBinding(o) => ssa(ctx, namespace, o).await,
        Desired::ConfigMap(o) => ssa(ctx, namespace, o).await,
        Desired::Service(o) => ssa(ctx, namespace, o).await,
        Desired::StatefulSet(o) => ssa(ctx, namespace, o).await,
        Desired::PodDisruptionBudget(o) => ssa(ctx, namespace, o).await,
    }
}

async fn ssa<K>(ctx: &Context, namespace: &str, object: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    // k8s-openapi objects omit apiVersion/kind when serialised alone; apply needs them.
    let mut body = serde_json::to_value(object).expect("k8s-openapi objects always serialise");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    api.patch(
        &name,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(Error::kube("apply", kind_name::<K>(), name))
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "ServiceAccount" => "ServiceAccount",
        "Role" => "Role",
        "RoleBinding" => "RoleBinding",
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "StatefulSet" => "StatefulSet",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "Secret" => "Secret",
        _ => "object",
    }
}

/// Delete what this conference controls but the plan no longer wants. Returns the StatefulSets
/// that remain, which the status is computed from.
async fn prune(
    ctx: &Context,
    conf: &Conference,
    plan: &Plan,
    events: &mut Vec<Event>,
) -> Result<Vec<StatefulSet>, Error> {
    let wanted = |kind: &str| -> Vec<&str> {
        plan.objects
            .iter()
            .filter(|o| o.kind() == kind)
            .map(Desired::name)
            .collect()
    };
    let uid = conf.uid();
    let mut pruned = Vec::new();
    let statefulsets = prune_kind::<StatefulSet>(
        ctx,
        plan,
        uid.as_deref(),
        &wanted("StatefulSet"),
        &mut pruned,
    )
    .await?;
    prune_kind::<Service>(ctx, plan, uid.as_deref(), &wanted("Service"), &mut pruned).await?;
    prune_kind::<PodDisruptionBudget>(
        ctx,
        plan,
        uid.as_deref(),
        &wanted("PodDisruptionBudget"),
        &mut pruned,
    )
    .await?;
    if !pruned.is_empty() {
        events.push(normal(
            "Pruned",
            "Prune",
            format!("deleted objects no longer planned: {}", pruned.join(", ")),
        ));
    }
    Ok(statefulsets)
}

async fn prune_kind<K>(
    ctx: &Context,
    plan: &Plan,
    uid: Option<&str>,
    wanted: &[&str],
    pruned: &mut Vec<String>,
) -> Result<Vec<K>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let selector = format!(
        "{}={},app.kubernetes.io/managed-by={}",
        names::LABEL_CONFERENCE,
        plan.conference,
        names::MANAGED_BY
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::kube("list", kind_name::<K>(), &plan.conference))?;
    let mut kept = Vec::new();
    for item in list.items {
        let name = item.meta().name.clone().unwrap_or_default();
        // Only what this very conference controls: a same-named conference recreated, or a
        // hand-made object with our labels, is left alone.
        let ours = item
            .meta()
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
        if wanted.contains(&name.as_str()) || !ours {
            kept.push(item);
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => pruned.push(format!("{}/{name}", kind_name::<K>())),
            // Already gone: that is what we wanted.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete", kind_name::<K>(), name)(e)),
        }
    }
    Ok(kept)
}

async fn patch_status(
    ctx: &Context,
    conf: &Conference,
    namespace: &str,
    new: &ConferenceStatus,
) -> Result<(), Error> {
    let api: Api<Conference> = Api::namespaced(ctx.client.clone(), namespace);
    let name = conf.name_any();
    let body = serde_json::json!({
        "apiVersion": Conference::api_version(&()),
        "kind": Conference::kind(&()),
        "status": new,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(Error::kube("patch status", "Conference", name))
}

fn normal(reason: &str, action: &str, note: String) -> Event {
    Event {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    }
}

/// A Secret was created. The Secret is the event's related object, which also keeps two such
/// events in one reconcile from being folded into one series by the recorder.
fn secret_created(name: &str, namespace: &str, what: &str) -> Event {
    Event {
        secondary: Some(ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Secret".to_owned()),
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectReference::default()
        }),
        ..normal(
            "SecretCreated",
            "CreateSecret",
            format!("created {what} Secret {name}"),
        )
    }
}

/// Events for status transitions: the phase and the mesh generation.
fn transition_events(
    old: Option<&ConferenceStatus>,
    new: &ConferenceStatus,
    events: &mut Vec<Event>,
) {
    let old_phase = old.and_then(|s| s.phase);
    if old_phase != new.phase
        && let Some(phase) = new.phase
    {
        let degraded = new
            .conditions
            .iter()
            .find(|c| c.type_ == names::condition::DEGRADED && c.status == "True");
        events.push(Event {
            type_: if phase == Phase::Degraded {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: degraded.map_or_else(|| phase.as_str().to_owned(), |c| c.reason.clone()),
            note: Some(match degraded {
                Some(c) => format!("phase {}: {}", phase.as_str(), c.message),
                None => format!("phase {}", phase.as_str()),
            }),
            action: "UpdateStatus".to_owned(),
            secondary: None,
        });
    }
    let old_gen = old.and_then(|s| s.mesh_generation);
    if let Some(generation) = new.mesh_generation
        && old_gen != Some(generation)
    {
        events.push(normal(
            "MeshPlanPublished",
            "PublishMeshPlan",
            format!("published mesh plan generation {generation}"),
        ));
    }
}

async fn publish(ctx: &Context, conf: &Conference, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference: ObjectReference = conf.object_ref(&());
    for event in events {
        // Events are best effort: failing to record one must not fail the reconcile.
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = %event.reason, "could not publish event");
        }
    }
}
