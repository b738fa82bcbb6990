//! The pure plan: one `Conference` in, every object the operator wants to exist out.
//!
//! `plan` does no IO and reads no clock. The same `Conference` (spec, metadata and status) always
//! gives byte-identical objects, so a reconcile that finds nothing changed applies nothing new, and a
//! dry run (`chorus-operator plan -f`) shows exactly what a cluster would get.
//!
//! Invariants:
//! - Every object carries the conference label, so pruning can select on it, and an owner reference
//!   to the conference when the conference has a uid (it has none in a dry run).
//! - Secrets are planned by name and purpose only ([`SecretPlan`]); their random material is made by
//!   [`crate::secret_material`] at apply time, and only when absent. The user's own Secrets (a join
//!   key, the telephony credentials, CA and edge token) are named with the keys they must hold;
//!   pods mount them as files, and no value of theirs enters the plan, the mesh plan or an env var.
//! - The mesh generation moves exactly when the mesh plan's digest differs from the one recorded in
//!   the conference's status.
//! - A spec that passes the schema but cannot be satisfied is a [`SpecProblem`], never a panic.

use std::collections::BTreeMap;

use chorus_crds::names::{self, env};
use chorus_crds::{
    Conference, Exposure, MeshMixing, MeshNode, MeshPlan, MeshPlanError, MeshTelephony,
    MeshTransfer, RegionSpec, TelephonyMode, TelephonySpec,
};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume,
    VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

/// Longest StatefulSet name: the controller appends a 10-character revision hash to it in a label
/// value, which Kubernetes caps at 63 characters.
const MAX_STATEFULSET_NAME: usize = 52;
/// Highest port a NodePort may use in a default cluster.
const MAX_NODE_PORT: i32 = 32767;
/// UID/GID the media server runs as (the distroless "nonroot" user).
const RUN_AS: i64 = 65532;

/// Everything the operator wants to exist for one conference.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The conference's name.
    pub conference: String,
    /// The namespace everything lives in.
    pub namespace: String,
    /// The mesh plan published in the mesh ConfigMap.
    pub mesh: MeshPlan,
    /// `mesh.digest()`, recorded in status so the next plan knows whether the mesh moved.
    pub mesh_digest: String,
    /// Objects to server-side apply, in apply order (RBAC, config, services, then workloads).
    pub objects: Vec<Desired>,
    /// Secrets to create when absent (never overwritten).
    pub secrets: Vec<SecretPlan>,
    /// Per region, in spec order.
    pub regions: Vec<RegionPlan>,
    /// Where participants open the web client.
    pub join_url: String,
}

/// What the plan says about one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan {
    /// The region's name.
    pub name: String,
    /// Its StatefulSet's name.
    pub statefulset: String,
    /// Servers it should run.
    pub desired: i32,
    /// The in-cluster URL of its client Service.
    pub endpoint: String,
}

/// One object to apply. A closed set, so the apply layer can route each kind to its API.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per reconcile; boxing buys nothing here
pub enum Desired {
    /// The media servers' ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// The media servers' Role (watch their own mesh ConfigMap).
    Role(Role),
    /// Binds the Role to the ServiceAccount.
    RoleBinding(RoleBinding),
    /// The mesh ConfigMap.
    ConfigMap(ConfigMap),
    /// The headless mesh Service, a client Service per region, or a per-server media Service.
    Service(Service),
    /// A region's media servers.
    StatefulSet(StatefulSet),
    /// A region's disruption budget.
    PodDisruptionBudget(PodDisruptionBudget),
}

impl Desired {
    /// The object's name.
    pub fn name(&self) -> &str {
        let meta = match self {
            Desired::ServiceAccount(o) => &o.metadata,
            Desired::Role(o) => &o.metadata,
            Desired::RoleBinding(o) => &o.metadata,
            Desired::ConfigMap(o) => &o.metadata,
            Desired::Service(o) => &o.metadata,
            Desired::StatefulSet(o) => &o.metadata,
            Desired::PodDisruptionBudget(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// The object's kind, for messages and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Desired::ServiceAccount(_) => "ServiceAccount",
            Desired::Role(_) => "Role",
            Desired::RoleBinding(_) => "RoleBinding",
            Desired::ConfigMap(_) => "ConfigMap",
            Desired::Service(_) => "Service",
            Desired::StatefulSet(_) => "StatefulSet",
            Desired::PodDisruptionBudget(_) => "PodDisruptionBudget",
        }
    }

    /// The object as a JSON value (for YAML output and apply patches).
    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Desired::ServiceAccount(o) => serde_json::to_value(o),
            Desired::Role(o) => serde_json::to_value(o),
            Desired::RoleBinding(o) => serde_json::to_value(o),
            Desired::ConfigMap(o) => serde_json::to_value(o),
            Desired::Service(o) => serde_json::to_value(o),
            Desired::StatefulSet(o) => serde_json::to_value(o),
            Desired::PodDisruptionBudget(o) => serde_json::to_value(o),
        };
        v.expect("k8s-openapi objects always serialise")
    }
}

/// A Secret the conference needs. Created with fresh material when absent; never overwritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretPlan {
    /// The mesh CA: certificate and private key. No pod mounts it.
    MeshCa {
        /// The Secret's name.
        name: String,
    },
    /// The CA certificate plus one certificate and key per server, signed by the CA. Servers added
    /// later get their keys added; existing keys are never replaced.
    MeshTls {
        /// The Secret's name.
        name: String,
        /// The CA Secret that signs new server certificates.
        ca_secret: String,
        /// Every server that needs a certificate.
        servers: Vec<ServerCert>,
    },
    /// The join-token HMAC key, when the spec names no Secret of its own.
    JoinKey {
        /// The Secret's name.
        name: String,
    },
    /// A user-provided Secret that must exist; the operator only checks it (and pods may mount it).
    External {
        /// The Secret's name.
        name: String,
        /// The keys that must be inside.
        keys: Vec<String>,
        /// What it is for, for the condition message.
        purpose: &'static str,
    },
}

impl SecretPlan {
    /// The Secret's name.
    pub fn name(&self) -> &str {
        match self {
            SecretPlan::MeshCa { name }
            | SecretPlan::MeshTls { name, .. }
            | SecretPlan::JoinKey { name }
            | SecretPlan::External { name, .. } => name,
        }
    }
}

/// A server's identity in the mesh certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCert {
    /// The server id; the certificate's common name and its key prefix in the Secret.
    pub id: String,
    /// DNS names the certificate is valid for (the id and its stable DNS name).
    pub dns_names: Vec<String>,
}

/// Why a spec that passed the schema cannot be satisfied. It becomes the Degraded condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct SpecProblem {
    /// A CamelCase reason for the condition.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl SpecProblem {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Compute every desired object for `conf`.
pub fn plan(conf: &Conference) -> Result<Plan, SpecProblem> {
    let name =
        conf.metadata.name.clone().ok_or_else(|| {
            SpecProblem::new("MissingName", "the Conference has no metadata.name")
        })?;
    let namespace = conf
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    check(conf, &name)?;

    let owner = conf.controller_owner_ref(&());
    let ctx = Ctx {
        conf,
        name: &name,
        namespace: &namespace,
        owner,
    };

    let mesh = mesh_plan(&ctx);
    let mesh_digest = mesh.digest();

    let mut objects = vec![
        Desired::ServiceAccount(ctx.service_account()),
        Desired::Role(ctx.role()),
        Desired::RoleBinding(ctx.role_binding()),
        Desired::ConfigMap(ctx.mesh_config_map(&mesh, &mesh_digest)),
        Desired::Service(ctx.mesh_service()),
    ];
    let mut regions = Vec::new();
    let mut server_index = 0i32;
    for region in &conf.spec.regions {
        objects.push(Desired::Service(ctx.client_service(region)));
        for ordinal in 0..region.replicas.max(0) {
            if let Some(svc) = ctx.media_service(region, ordinal, server_index) {
                objects.push(Desired::Service(svc));
            }
            server_index += 1;
        }
        objects.push(Desired::StatefulSet(ctx.statefulset(region)));
        objects.push(Desired::PodDisruptionBudget(ctx.pdb(region)));
        regions.push(RegionPlan {
            name: region.name.clone(),
            statefulset: names::region_object(&name, &region.name),
            desired: region.replicas,
            endpoint: client_endpoint(&name, &region.name, &namespace),
        });
    }

    let join_url = regions
        .first()
        .map(|r| format!("{}/", r.endpoint))
        .unwrap_or_default();

    Ok(Plan {
        conference: name.clone(),
        namespace: namespace.clone(),
        secrets: secret_plans(&ctx, &mesh),
        mesh,
        mesh_digest,
        objects,
        regions,
        join_url,
    })
}

/// The checks the schema cannot make.
fn check(conf: &Conference, name: &str) -> Result<(), SpecProblem> {
    // The API server runs the same CEL rules, but an old CRD or a dry run may not have.
    if let Err(errors) = conf.validate_cel() {
        return Err(SpecProblem::new("InvalidSpec", errors.to_string()));
    }
    let spec = &conf.spec;
    if spec.regions.is_empty() {
        return Err(SpecProblem::new(
            "NoRegions",
            "spec.regions must list at least one region",
        ));
    }
    for region in &spec.regions {
        let sts = names::region_object(name, &region.name);
        if sts.len() > MAX_STATEFULSET_NAME {
            return Err(SpecProblem::new(
                "NameTooLong",
                format!(
                    "StatefulSet name {sts:?} ({} characters) exceeds {MAX_STATEFULSET_NAME}; \
                     shorten the conference or region name",
                    sts.len()
                ),
            ));
        }
        if let Some(selector) = &region.node_selector {
            for (k, v) in selector {
                if !valid_label_key(k) || !valid_label_value(v) {
                    return Err(SpecProblem::new(
                        "InvalidNodeSelector",
                        format!(
                            "region {:?}: nodeSelector {k:?}: {v:?} is not a valid label",
                            region.name
                        ),
                    ));
                }
            }
        }
    }
    if let Some(t) = &spec.telephony {
        check_telephony(t, spec.media.udp_port)?;
    }
    if spec.media.exposure == Exposure::NodePort {
        let servers: i32 = spec.regions.iter().map(|r| r.replicas.max(0)).sum();
        let base = spec.media.node_port_base.unwrap_or(0);
        if base + servers - 1 > MAX_NODE_PORT {
            return Err(SpecProblem::new(
                "NodePortRangeExhausted",
                format!(
                    "{servers} servers from nodePortBase {base} run past {MAX_NODE_PORT}; \
                     lower nodePortBase or use another exposure"
                ),
            ));
        }
    }
    Ok(())
}

/// The telephony rules the schema cannot state: everything [`MeshTelephony::validate`] checks
/// (patterns compile, ranges, TLS for required SRTP, credentials in server mode), and a SIP port
/// that no other port of the pod uses.
fn check_telephony(t: &TelephonySpec, udp_port: i32) -> Result<(), SpecProblem> {
    const REASON: &str = "InvalidTelephony";
    MeshTelephony::from(t).validate().map_err(|e| {
        // The plan's field paths are the spec's under `spec.`; say it the way the user wrote it.
        let message = match e {
            MeshPlanError::InvalidTelephony { field, reason } => format!("spec.{field}: {reason}"),
            MeshPlanError::OutOfRange {
                field,
                value,
                range,
            } => format!("spec.{field} = {value} is out of range ({range})"),
            other => other.to_string(),
        };
        SpecProblem::new(REASON, message)
    })?;
    if t.mode == TelephonyMode::Server {
        let taken = [
            (i32::from(names::MESH_PORT), "the mesh port (UDP)"),
            (i32::from(names::SIGNAL_PORT), "the HTTP port (TCP)"),
            (udp_port, "media.udpPort (UDP)"),
        ];
        if let Some((_, what)) = taken.iter().find(|(port, _)| *port == t.sip_port) {
            return Err(SpecProblem::new(
                REASON,
                format!(
                    "spec.telephony.sipPort {} is also {what}; choose another port",
                    t.sip_port
                ),
            ));
        }
    }
    Ok(())
}

/// Label values: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Label keys: an optional DNS-subdomain prefix and `/`, then a name like a non-empty label value.
fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

fn client_endpoint(conference: &str, region: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{}",
        names::region_object(conference, region),
        names::SIGNAL_PORT
    )
}

fn mesh_plan(ctx: &Ctx<'_>) -> MeshPlan {
    let spec = &ctx.conf.spec;
    let mut nodes = Vec::new();
    for region in &spec.regions {
        for ordinal in 0..region.replicas.max(0) as u32 {
            let dns = names::server_dns(ctx.name, &region.name, ordinal, ctx.namespace);
            nodes.push(MeshNode {
                id: names::server_id(ctx.name, &region.name, ordinal),
                region: region.name.clone(),
                mesh: format!("{dns}:{}", names::MESH_PORT),
                signal: format!("http://{dns}:{}", names::SIGNAL_PORT),
            });
        }
    }
    let m = &spec.mixing;
    let mesh_without_generation = MeshPlan {
        conference: ctx.name.to_owned(),
        generation: 0,
        nodes,
        mixing: MeshMixing::from(m),
        transfer: MeshTransfer {
            enabled: spec.transfer.enabled,
            token_ttl_seconds: spec.transfer.token_ttl_seconds.max(0) as u32,
            allow_cross_server: spec.transfer.allow_cross_server,
        },
        telephony: spec.telephony.as_ref().map(MeshTelephony::from),
    };
    let digest = mesh_without_generation.digest();
    let status = ctx.conf.status.as_ref();
    let previous = status.and_then(|s| s.mesh_generation).unwrap_or(0);
    let same = status.and_then(|s| s.mesh_digest.as_deref()) == Some(digest.as_str());
    MeshPlan {
        generation: if same && previous > 0 {
            previous
        } else {
            previous + 1
        },
        ..mesh_without_generation
    }
}

fn secret_plans(ctx: &Ctx<'_>, mesh: &MeshPlan) -> Vec<SecretPlan> {
    let ca = names::mesh_ca_secret(ctx.name);
    let mut out = vec![
        SecretPlan::MeshCa { name: ca.clone() },
        SecretPlan::MeshTls {
            name: names::mesh_tls_secret(ctx.name),
            ca_secret: ca,
            servers: mesh
                .nodes
                .iter()
                .map(|n| {
                    let host = n.mesh.rsplit_once(':').map_or(n.mesh.as_str(), |(h, _)| h);
                    ServerCert {
                        id: n.id.clone(),
                        dns_names: vec![n.id.clone(), host.to_owned()],
                    }
                })
                .collect(),
        },
    ];
    match &ctx.conf.spec.auth.join_key_secret_ref {
        Some(r) => out.push(SecretPlan::External {
            name: r.name.clone(),
            keys: vec![r.key.clone()],
            purpose: "the join-token key (spec.auth.joinKeySecretRef)",
        }),
        None => out.push(SecretPlan::JoinKey {
            name: names::join_key_secret(ctx.name),
        }),
    }
    if let Some(t) = &ctx.conf.spec.telephony {
        out.extend(telephony_secrets(t));
    }
    out
}

/// The user's Secrets a telephony spec names, with the keys each must hold. Only the ones its mode
/// uses: an edge bridge holds the SIP credentials itself, so in edge mode the cluster needs none.
fn telephony_secrets(t: &TelephonySpec) -> Vec<SecretPlan> {
    let mut out = Vec::new();
    match t.mode {
        TelephonyMode::Server => {
            if let Some(creds) = &t.credentials_secret_ref {
                out.push(SecretPlan::External {
                    name: creds.name.clone(),
                    keys: vec![
                        names::SIP_USERNAME_KEY.to_owned(),
                        names::SIP_PASSWORD_KEY.to_owned(),
                    ],
                    purpose: "the SIP credentials (spec.telephony.credentialsSecretRef)",
                });
            }
            if let Some(ca) = &t.ca_secret_ref {
                out.push(SecretPlan::External {
                    name: ca.name.clone(),
                    keys: vec![names::SIP_CA_KEY.to_owned()],
                    purpose: "the call manager's CA (spec.telephony.caSecretRef)",
                });
            }
        }
        TelephonyMode::Edge => {
            if let Some(token) = &t.edge_token_secret_ref {
                out.push(SecretPlan::External {
                    name: token.name.clone(),
                    keys: vec![names::EDGE_TOKEN_KEY.to_owned()],
                    purpose: "the edge bridge's token (spec.telephony.edgeTokenSecretRef)",
                });
            }
        }
    }
    out
}

/// What every builder needs: the conference, its name and namespace, and the owner reference.
struct Ctx<'a> {
    conf: &'a Conference,
    name: &'a str,
    namespace: &'a str,
    owner: Option<OwnerReference>,
}

impl Ctx<'_> {
    fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "app.kubernetes.io/name".into(),
                names::APP_MEDIASERVER.into(),
            ),
            ("app.kubernetes.io/instance".into(), self.name.into()),
            ("app.kubernetes.io/part-of".into(), "chorus".into()),
            (
                "app.kubernetes.io/managed-by".into(),
                names::MANAGED_BY.into(),
            ),
            (names::LABEL_CONFERENCE.into(), self.name.into()),
            (names::LABEL_COMPONENT.into(), component.into()),
        ])
    }

    fn region_labels(&self, component: &str, region: &str) -> BTreeMap<String, String> {
        let mut l = self.labels(component);
        l.insert(names::LABEL_REGION.into(), region.into());
        l
    }

    /// Labels that select this conference's media-server pods (stable: selectors are immutable).
    fn pod_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "app.kubernetes.io/name".into(),
                names::APP_MEDIASERVER.into(),
            ),
            (names::LABEL_CONFERENCE.into(), self.name.into()),
        ])
    }

    fn region_selector(&self, region: &str) -> BTreeMap<String, String> {
        let mut s = self.pod_selector();
        s.insert(names::LABEL_REGION.into(), region.into());
        s
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(labels),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(
                names::mediaserver_account(self.name),
                self.labels("mediaserver"),
            ),
            automount_service_account_token: Some(true),
            ..ServiceAccount::default()
        }
    }

    fn role(&self) -> Role {
        Role {
            metadata: self.meta(
                names::mediaserver_account(self.name),
                self.labels("mediaserver"),
            ),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                resource_names: Some(vec![names::mesh_object(self.name)]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            }]),
        }
    }

    fn role_binding(&self) -> RoleBinding {
        let account = names::mediaserver_account(self.name);
        RoleBinding {
            metadata: self.meta(account.clone(), self.labels("mediaserver")),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: account.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: account,
                namespace: Some(self.namespace.to_owned()),
                ..Subject::default()
            }]),
        }
    }

    fn mesh_config_map(&self, mesh: &MeshPlan, digest: &str) -> ConfigMap {
        let mut meta = self.meta(names::mesh_object(self.name), self.labels("mesh"));
        meta.annotations = Some(BTreeMap::from([
            (names::ANNOTATION_MESH_DIGEST.into(), digest.into()),
            (
                "chorus.dev/mesh-generation".into(),
                mesh.generation.to_string(),
            ),
        ]));
        ConfigMap {
            metadata: meta,
            data: Some(BTreeMap::from([(
                names::MESH_PLAN_KEY.into(),
                mesh.to_json(),
            )])),
            ..ConfigMap::default()
        }
    }

    fn mesh_service(&self) -> Service {
        Service {
            metadata: self.meta(names::mesh_object(self.name), self.labels("mesh")),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                // Servers must find each other before they are ready: readiness waits on the mesh.
                publish_not_ready_addresses: Some(true),
                selector: Some(self.pod_selector()),
                ports: Some(vec![
                    port("mesh", names::MESH_PORT, "UDP"),
                    port("http", names::SIGNAL_PORT, "TCP"),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn client_service(&self, region: &RegionSpec) -> Service {
        Service {
            metadata: self.meta(
                names::region_object(self.name, &region.name),
                self.region_labels("client", &region.name),
            ),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(self.region_selector(&region.name)),
                ports: Some(self.client_ports()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// The client Service's ports: HTTP, and SIP over UDP and TCP when the servers dial phones.
    fn client_ports(&self) -> Vec<ServicePort> {
        let mut ports = vec![port("http", names::SIGNAL_PORT, "TCP")];
        if let Some(t) = self.dialling_telephony() {
            let sip = sip_port(t);
            ports.push(port(SIP_UDP_PORT_NAME, sip, "UDP"));
            ports.push(port(SIP_TCP_PORT_NAME, sip, "TCP"));
        }
        ports
    }

    /// The telephony block when the media servers dial phones themselves (`mode: server`). In edge
    /// mode the edge bridge speaks SIP, so the pods get no SIP port and no SIP credentials.
    fn dialling_telephony(&self) -> Option<&TelephonySpec> {
        self.conf
            .spec
            .telephony
            .as_ref()
            .filter(|t| t.mode == TelephonyMode::Server)
    }

    /// The telephony block in edge mode.
    fn edge_telephony(&self) -> Option<&TelephonySpec> {
        self.conf
            .spec
            .telephony
            .as_ref()
            .filter(|t| t.mode == TelephonyMode::Edge)
    }

    /// The media-server container's ports: HTTP, mesh, media, and SIP when it dials phones. SIP
    /// gets a hostPort exactly when media does: the Contact the server puts in its SIP messages is
    /// its public address, where the call manager sends in-dialog requests such as the phone's BYE.
    fn container_ports(&self) -> Vec<ContainerPort> {
        let media = &self.conf.spec.media;
        let host_port = media.exposure == Exposure::HostPort;
        let mut ports = vec![
            container_port("http", names::SIGNAL_PORT, "TCP", None),
            container_port("mesh", names::MESH_PORT, "UDP", None),
            container_port(
                "media",
                media.udp_port as u16,
                "UDP",
                host_port.then_some(media.udp_port),
            ),
        ];
        if let Some(t) = self.dialling_telephony() {
            let sip = sip_port(t);
            let host = host_port.then_some(i32::from(sip));
            ports.push(container_port(SIP_UDP_PORT_NAME, sip, "UDP", host));
            ports.push(container_port(SIP_TCP_PORT_NAME, sip, "TCP", host));
        }
        ports
    }

    /// The Secrets the media-server container mounts: mesh TLS always; with telephony the
    /// credentials and the call manager's CA (server mode) or the edge token (edge mode). Each
    /// user Secret is projected key by key, so only the keys Chorus uses land in the pod, and a
    /// missing key keeps the pod from starting instead of starting it without credentials.
    fn secret_mounts(&self) -> Vec<(Volume, VolumeMount)> {
        let mut out = vec![secret_mount(
            "mesh-tls",
            &names::mesh_tls_secret(self.name),
            None,
            names::MESH_TLS_MOUNT,
        )];
        if let Some(t) = self.dialling_telephony() {
            if let Some(creds) = &t.credentials_secret_ref {
                out.push(secret_mount(
                    "sip-credentials",
                    &creds.name,
                    Some(&[names::SIP_USERNAME_KEY, names::SIP_PASSWORD_KEY]),
                    names::SIP_CREDENTIALS_MOUNT,
                ));
            }
            if let Some(ca) = &t.ca_secret_ref {
                out.push(secret_mount(
                    "sip-ca",
                    &ca.name,
                    Some(&[names::SIP_CA_KEY]),
                    names::SIP_CA_MOUNT,
                ));
            }
        }
        if let Some(token) = self
            .edge_telephony()
            .and_then(|t| t.edge_token_secret_ref.as_ref())
        {
            out.push(secret_mount(
                "edge-token",
                &token.name,
                Some(&[names::EDGE_TOKEN_KEY]),
                names::EDGE_TOKEN_MOUNT,
            ));
        }
        out
    }

    /// A per-server Service for the UDP media port, when exposure is NodePort or LoadBalancer.
    fn media_service(&self, region: &RegionSpec, ordinal: i32, index: i32) -> Option<Service> {
        let media = &self.conf.spec.media;
        let (type_, node_port) = match media.exposure {
            Exposure::HostPort => return None,
            Exposure::NodePort => ("NodePort", media.node_port_base.map(|b| b + index)),
            Exposure::LoadBalancer => ("LoadBalancer", None),
        };
        let id = names::server_id(self.name, &region.name, ordinal as u32);
        let mut media_port = port("media", media.udp_port as u16, "UDP");
        media_port.node_port = node_port;
        Some(Service {
            metadata: self.meta(
                format!("{id}-media"),
                self.region_labels("media", &region.name),
            ),
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                // Keep the client's source address: ICE checks must come back to the same server.
                external_traffic_policy: Some("Local".into()),
                selector: Some(BTreeMap::from([(
                    "statefulset.kubernetes.io/pod-name".into(),
                    id,
                )])),
                ports: Some(vec![media_port]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    fn statefulset(&self, region: &RegionSpec) -> StatefulSet {
        let sts_name = names::region_object(self.name, &region.name);
        let mut pod_labels = self.region_labels("mediaserver", &region.name);
        pod_labels.insert(names::LABEL_SCRAPE.into(), "true".into());
        StatefulSet {
            metadata: self.meta(sts_name, self.region_labels("mediaserver", &region.name)),
            spec: Some(StatefulSetSpec {
                replicas: Some(region.replicas),
                service_name: Some(names::mesh_object(self.name)),
                // Servers are peers, not a chain: start and stop them together.
                pod_management_policy: Some("Parallel".into()),
                selector: LabelSelector {
                    match_labels: Some(self.region_selector(&region.name)),
                    ..LabelSelector::default()
                },
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("RollingUpdate".into()),
                    ..StatefulSetUpdateStrategy::default()
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(self.pod_spec(region)),
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn pod_spec(&self, region: &RegionSpec) -> PodSpec {
        let media = &self.conf.spec.media;
        let selector = region.node_selector.clone().unwrap_or_else(|| {
            BTreeMap::from([("topology.kubernetes.io/region".into(), region.name.clone())])
        });
        let node_affinity = (!selector.is_empty()).then(|| NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(
                        selector
                            .iter()
                            .map(|(k, v)| NodeSelectorRequirement {
                                key: k.clone(),
                                operator: "In".into(),
                                values: Some(vec![v.clone()]),
                            })
                            .collect(),
                    ),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        });
        let (mut volumes, mut volume_mounts): (Vec<Volume>, Vec<VolumeMount>) =
            self.secret_mounts().into_iter().unzip();
        volumes.push(Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        volume_mounts.push(VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        });
        PodSpec {
            service_account_name: Some(names::mediaserver_account(self.name)),
            affinity: Some(Affinity {
                node_affinity,
                // Preferred, not required: a region with fewer nodes than servers still runs.
                pod_anti_affinity: Some(PodAntiAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![
                        WeightedPodAffinityTerm {
                            weight: 100,
                            pod_affinity_term: PodAffinityTerm {
                                topology_key: "kubernetes.io/hostname".into(),
                                label_selector: Some(LabelSelector {
                                    match_labels: Some(self.pod_selector()),
                                    ..LabelSelector::default()
                                }),
                                ..PodAffinityTerm::default()
                            },
                        },
                    ]),
                    ..PodAntiAffinity::default()
                }),
                ..Affinity::default()
            }),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            termination_grace_period_seconds: Some(30),
            containers: vec![Container {
                name: "mediaserver".into(),
                image: Some(media.image.clone()),
                args: Some(vec!["serve".into()]),
                ports: Some(self.container_ports()),
                env: Some(self.env(region)),
                resources: Some(media.resources.clone().unwrap_or_else(default_resources)),
                readiness_probe: Some(http_probe("/readyz", 5, 3)),
                liveness_probe: Some(http_probe("/healthz", 10, 3)),
                volume_mounts: Some(volume_mounts),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }
    }

    fn env(&self, region: &RegionSpec) -> Vec<EnvVar> {
        let spec = &self.conf.spec;
        let mut out = vec![
            env_field(env::SERVER_ID, "metadata.name"),
            env_field(env::NAMESPACE, "metadata.namespace"),
            env_value(env::CONFERENCE, self.name),
            env_value(env::REGION, &region.name),
            env_value(env::MESH_CONFIGMAP, &names::mesh_object(self.name)),
            env_value(env::MESH_TLS_DIR, names::MESH_TLS_MOUNT),
            env_value(env::UDP_PORT, &spec.media.udp_port.to_string()),
            env_value(
                env::MAX_PARTICIPANTS,
                &region.max_participants_per_server.to_string(),
            ),
        ];
        out.push(match &spec.media.public_address {
            Some(addr) => env_value(env::PUBLIC_ADDRESS, addr),
            None => env_field(env::PUBLIC_ADDRESS, "status.hostIP"),
        });
        let (key_secret, key_key) = match &spec.auth.join_key_secret_ref {
            Some(r) => (r.name.clone(), r.key.clone()),
            None => (
                names::join_key_secret(self.name),
                names::JOIN_KEY_KEY.to_owned(),
            ),
        };
        out.push(env_secret(env::JOIN_KEY, &key_secret, &key_key));
        // Telephony secrets are files (see `secret_mounts`); the environment only says where.
        if let Some(t) = self.dialling_telephony() {
            if t.credentials_secret_ref.is_some() {
                out.push(env_value(
                    env::SIP_CREDENTIALS_DIR,
                    names::SIP_CREDENTIALS_MOUNT,
                ));
            }
            out.push(env_value(env::SIP_PORT, &sip_port(t).to_string()));
            if t.ca_secret_ref.is_some() {
                out.push(env_value(
                    env::SIP_CA_FILE,
                    &format!("{}/{}", names::SIP_CA_MOUNT, names::SIP_CA_KEY),
                ));
            }
        }
        if self
            .edge_telephony()
            .is_some_and(|t| t.edge_token_secret_ref.is_some())
        {
            out.push(env_value(
                env::EDGE_TOKEN_FILE,
                &format!("{}/{}", names::EDGE_TOKEN_MOUNT, names::EDGE_TOKEN_KEY),
            ));
        }
        out
    }

    fn pdb(&self, region: &RegionSpec) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(
                names::region_object(self.name, &region.name),
                self.region_labels("mediaserver", &region.name),
            ),
            spec: Some(PodDisruptionBudgetSpec {
                // One server of a region at a time: its participants rejoin a sibling meanwhile.
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.region_selector(&region.name)),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }
    }
}

/// Names of the SIP ports on the container and the client Service (at most 15 characters, unique
/// within a pod).
const SIP_UDP_PORT_NAME: &str = "sip-udp";
const SIP_TCP_PORT_NAME: &str = "sip-tcp";

/// The SIP port as a port number. The schema and [`check_telephony`] keep it in 1024..=65535, so
/// the fallback is never used; it only keeps a bad value from turning into a panic.
fn sip_port(t: &TelephonySpec) -> u16 {
    u16::try_from(t.sip_port).unwrap_or(5060)
}

/// A Secret volume mounted read-only at `path`: all its keys, or only `keys` (each a file of the
/// same name). Files are readable by the pod's group only (the media server runs in it).
fn secret_mount(
    volume: &str,
    secret: &str,
    keys: Option<&[&str]>,
    path: &str,
) -> (Volume, VolumeMount) {
    let items = keys.map(|keys| {
        keys.iter()
            .map(|k| KeyToPath {
                key: (*k).to_owned(),
                path: (*k).to_owned(),
                mode: None,
            })
            .collect()
    });
    (
        Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                default_mode: Some(0o440),
                items,
                optional: Some(false),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume.into(),
            mount_path: path.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

fn port(name: &str, port: u16, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some(protocol.into()),
        ..ServicePort::default()
    }
}

fn container_port(name: &str, port: u16, protocol: &str, host_port: Option<i32>) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        protocol: Some(protocol.into()),
        host_port,
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("500m".into())),
            ("memory".into(), Quantity("256Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
        ..ResourceRequirements::default()
    }
}
