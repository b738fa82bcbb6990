//! Names shared by the operator and the media servers: labels, ports, object names and condition
//! types.
//!
//! Invariant: every object name the operator creates for a conference is derived here, from the
//! conference name (and region / ordinal), so the operator, the media servers and the tests agree on
//! them without talking to each other.

/// The API group of the `Conference` resource.
pub const GROUP: &str = "chorus.dev";
/// The field manager used for every server-side apply, so ownership of fields is stable.
pub const FIELD_MANAGER: &str = "chorus-operator";

/// `app.kubernetes.io/name` for media-server pods.
pub const APP_MEDIASERVER: &str = "chorus-mediaserver";
/// Label: the conference an object belongs to. Pruning selects on it.
pub const LABEL_CONFERENCE: &str = "chorus.dev/conference";
/// Label: the region of a per-region object.
pub const LABEL_REGION: &str = "chorus.dev/region";
/// Label: the component (`mediaserver`, `mesh`, `client`, ...).
pub const LABEL_COMPONENT: &str = "chorus.dev/component";
/// Label on media-server pods that the chart's PodMonitor selects.
pub const LABEL_SCRAPE: &str = "chorus.dev/scrape";
/// `app.kubernetes.io/managed-by` value on everything the operator owns.
pub const MANAGED_BY: &str = "chorus-operator";

/// Annotation on the mesh ConfigMap: the digest of the plan contents (without the generation).
pub const ANNOTATION_MESH_DIGEST: &str = "chorus.dev/mesh-digest";
/// Annotation on operator-made Secrets: what made them, so a human knows not to edit them.
pub const ANNOTATION_GENERATED_BY: &str = "chorus.dev/generated-by";

/// The key of the mesh plan inside the mesh ConfigMap.
pub const MESH_PLAN_KEY: &str = "mesh.json";
/// The key of the join-token signing key inside its Secret.
pub const JOIN_KEY_KEY: &str = "key";
/// Keys of the CA in the mesh CA Secret and (certificate only) in the mesh TLS Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// The CA's private key; it lives only in the CA Secret, which no pod mounts.
pub const CA_KEY_KEY: &str = "ca.key";

/// The HTTP port of a media server: signalling API, web client, metrics and probes.
pub const SIGNAL_PORT: u16 = 8080;
/// The UDP port of the QUIC mesh between media servers.
pub const MESH_PORT: u16 = 7000;
/// The HTTP port of the operator: metrics and probes.
pub const OPERATOR_HTTP_PORT: u16 = 8080;

/// Where a media-server pod mounts its mesh TLS Secret.
pub const MESH_TLS_MOUNT: &str = "/etc/chorus/mesh-tls";

/// Where a media-server pod mounts the telephony credentials Secret (files `username`, `password`).
/// Files rather than environment variables: a variable's value shows in `kubectl describe`-style
/// tooling, crash reports and `/proc/<pid>/environ` far more readily than a mode-0440 file.
pub const SIP_CREDENTIALS_MOUNT: &str = "/etc/chorus/sip-credentials";
/// The key (and file) of the SIP username in the telephony credentials Secret.
pub const SIP_USERNAME_KEY: &str = "username";
/// The key (and file) of the SIP password in the telephony credentials Secret.
pub const SIP_PASSWORD_KEY: &str = "password";
/// Where a media-server pod mounts the Secret with the call manager's CA (`ca.crt`).
pub const SIP_CA_MOUNT: &str = "/etc/chorus/sip-ca";
/// The key (and file) of the call manager's CA certificate in its Secret.
pub const SIP_CA_KEY: &str = "ca.crt";
/// Where a media-server pod mounts the edge bridge's token Secret (edge mode).
pub const EDGE_TOKEN_MOUNT: &str = "/etc/chorus/edge-token";
/// The key (and file) of the edge bridge's token in its Secret.
pub const EDGE_TOKEN_KEY: &str = "token";

/// Condition types on `Conference.status.conditions`.
pub mod condition {
    /// Every desired media server is ready.
    pub const READY: &str = "Ready";
    /// The mesh plan is published and every server in it has its certificate.
    pub const MESH_WIRED: &str = "MeshWired";
    /// Something keeps the conference from its desired state; the reason says what.
    pub const DEGRADED: &str = "Degraded";
}

/// The StatefulSet (and PDB and client Service) of one region: `<conference>-<region>`.
pub fn region_object(conference: &str, region: &str) -> String {
    format!("{conference}-{region}")
}

/// The id of one media server, which is also its pod name: `<conference>-<region>-<ordinal>`.
pub fn server_id(conference: &str, region: &str, ordinal: u32) -> String {
    format!("{conference}-{region}-{ordinal}")
}

/// The headless Service giving servers stable DNS, and the mesh ConfigMap: `<conference>-mesh`.
pub fn mesh_object(conference: &str) -> String {
    format!("{conference}-mesh")
}

/// The Secret holding the mesh CA (certificate and key). Never mounted into pods.
pub fn mesh_ca_secret(conference: &str) -> String {
    format!("{conference}-mesh-ca")
}

/// The Secret holding the CA certificate and every server's certificate and key.
pub fn mesh_tls_secret(conference: &str) -> String {
    format!("{conference}-mesh-tls")
}

/// The operator-generated join-token key Secret (used when `spec.auth` names none).
pub fn join_key_secret(conference: &str) -> String {
    format!("{conference}-join-key")
}

/// The ServiceAccount (and Role, RoleBinding) of a conference's media servers.
pub fn mediaserver_account(conference: &str) -> String {
    format!("{conference}-mediaserver")
}

/// Key of a server's certificate inside the mesh TLS Secret.
pub fn server_cert_key(server_id: &str) -> String {
    format!("{server_id}.crt")
}

/// Key of a server's private key inside the mesh TLS Secret.
pub fn server_key_key(server_id: &str) -> String {
    format!("{server_id}.key")
}

/// The stable DNS name of a server through the headless mesh Service.
pub fn server_dns(conference: &str, region: &str, ordinal: u32, namespace: &str) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        server_id(conference, region, ordinal),
        mesh_object(conference)
    )
}

/// Environment variables the operator sets on media-server pods. They are the media server's
/// configuration contract in a cluster; local mode sets the same ones.
pub mod env {
    /// The server's id (its pod name).
    pub const SERVER_ID: &str = "CHORUS_SERVER_ID";
    /// The server's region.
    pub const REGION: &str = "CHORUS_REGION";
    /// The conference's name.
    pub const CONFERENCE: &str = "CHORUS_CONFERENCE";
    /// The namespace, for watching the mesh ConfigMap.
    pub const NAMESPACE: &str = "CHORUS_NAMESPACE";
    /// The mesh ConfigMap's name.
    pub const MESH_CONFIGMAP: &str = "CHORUS_MESH_CONFIGMAP";
    /// The directory holding `ca.crt`, `<id>.crt` and `<id>.key`.
    pub const MESH_TLS_DIR: &str = "CHORUS_MESH_TLS_DIR";
    /// The address put in ICE candidates.
    pub const PUBLIC_ADDRESS: &str = "CHORUS_PUBLIC_ADDRESS";
    /// The UDP media port.
    pub const UDP_PORT: &str = "CHORUS_UDP_PORT";
    /// Participants one server accepts.
    pub const MAX_PARTICIPANTS: &str = "CHORUS_MAX_PARTICIPANTS";
    /// Threads that share a large room's listener fan-out (0: one per core).
    pub const FAN_OUT_WORKERS: &str = "CHORUS_FAN_OUT_WORKERS";
    /// `true`: listeners' media leaves through packet sockets (needs `CAP_NET_RAW`).
    pub const LINK_LAYER_FAN_OUT: &str = "CHORUS_LINK_LAYER_FAN_OUT";
    /// The join-token HMAC key (from its Secret).
    pub const JOIN_KEY: &str = "CHORUS_JOIN_KEY";
    /// The directory holding the SIP credentials as the files `username` and `password` (the
    /// telephony Secret, mounted read-only). Set only with telephony in server mode.
    pub const SIP_CREDENTIALS_DIR: &str = "CHORUS_SIP_CREDENTIALS_DIR";
    /// The PEM file of the CA that signed the call manager's certificate. Set only when the
    /// telephony spec names a CA Secret.
    pub const SIP_CA_FILE: &str = "CHORUS_SIP_CA_FILE";
    /// The port the server uses for SIP, UDP and TCP (TLS too with transport `tls`), on all its
    /// addresses. Set only with telephony in server mode.
    pub const SIP_PORT: &str = "CHORUS_SIP_PORT";
    /// The file holding the token an edge bridge presents. Set only with telephony in edge mode.
    pub const EDGE_TOKEN_FILE: &str = "CHORUS_EDGE_TOKEN_FILE";
}
