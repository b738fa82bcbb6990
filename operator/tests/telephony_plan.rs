//! The `telephony` block through the cluster plan: the CRD's rules (schema and CEL, run
//! client-side), what the media-server pods get (files, not environment, for the credentials), and
//! that no Secret content can reach the mesh plan.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chorus_crds::names::{self, env};
use chorus_crds::{Conference, MediaEncryption, PhoneCodec, SipTransport, TelephonyMode};
use chorus_operator::manifests;
use chorus_operator::plan::{Desired, Plan, SecretPlan, plan};
use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use kube::CustomResourceExt;

fn conf(yaml: &str) -> Conference {
    manifests::read_conference(yaml, "chorus").expect("valid conference")
}

const BASE: &str = r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: { name: town }
spec:
  regions: [ { name: us, replicas: 2 } ]
"#;

/// BASE with a telephony block made of `lines` (each a `key: value` line under `telephony:`).
fn with_telephony(lines: &[&str]) -> String {
    let mut text = format!("{BASE}  telephony:\n");
    for line in lines {
        text.push_str(&format!("    {line}\n"));
    }
    text
}

fn phones() -> Conference {
    conf(&with_telephony(&[
        "callManagerUri: sip:pbx.example.com",
        "credentialsSecretRef: { name: pbx }",
    ]))
}

fn pod(p: &Plan) -> &PodSpec {
    p.objects
        .iter()
        .find_map(|o| match o {
            Desired::StatefulSet(s) => s.spec.as_ref()?.template.spec.as_ref(),
            _ => None,
        })
        .expect("a StatefulSet with a pod template")
}

fn container(p: &Plan) -> &Container {
    &pod(p).containers[0]
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

fn client_service(p: &Plan) -> &Service {
    p.objects
        .iter()
        .find_map(|o| match o {
            Desired::Service(s) if s.metadata.name.as_deref() == Some("town-us") => Some(s),
            _ => None,
        })
        .expect("the client Service")
}

#[test]
fn defaults_are_the_documented_ones() {
    let t = phones().spec.telephony.unwrap();
    assert_eq!(t.transport, SipTransport::Udp);
    assert_eq!(
        t.codecs,
        vec![PhoneCodec::Opus, PhoneCodec::Pcmu, PhoneCodec::Pcma]
    );
    assert_eq!(t.mode, TelephonyMode::Server);
    assert_eq!(t.media_encryption, MediaEncryption::Optional);
    assert_eq!(
        (
            t.ring_timeout_seconds,
            t.media_timeout_seconds,
            t.max_call_seconds
        ),
        (30, 10, 14_400)
    );
    assert_eq!((t.max_concurrent_calls, t.max_calls_per_identity), (20, 1));
    assert_eq!(t.allowed_targets, vec!["^[0-9*#+]{2,20}$".to_owned()]);
    assert_eq!(t.sip_port, 5060);

    // The same defaults stand in the schema the API server applies.
    let crd = serde_json::to_value(Conference::crd()).unwrap();
    let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["telephony"]["properties"];
    assert_eq!(props["ringTimeoutSeconds"]["default"], 30);
    assert_eq!(props["ringTimeoutSeconds"]["minimum"].as_f64(), Some(5.0));
    assert_eq!(props["ringTimeoutSeconds"]["maximum"].as_f64(), Some(120.0));
    assert_eq!(props["mediaTimeoutSeconds"]["default"], 10);
    assert_eq!(props["maxCallSeconds"]["maximum"].as_f64(), Some(86400.0));
    assert_eq!(props["maxConcurrentCalls"]["maximum"].as_f64(), Some(500.0));
    assert_eq!(props["maxCallsPerIdentity"]["maximum"].as_f64(), Some(10.0));
    assert_eq!(props["allowedTargets"]["maxItems"], 32);
    assert_eq!(props["allowedTargets"]["items"]["maxLength"], 256);
    assert_eq!(props["sipPort"]["default"], 5060);
    assert_eq!(props["mediaEncryption"]["default"], "optional");
    assert_eq!(props["mode"]["default"], "server");
    assert_eq!(
        props["codecs"]["items"]["enum"],
        serde_json::json!(["opus", "PCMU", "PCMA"])
    );
}

#[test]
fn g722_is_not_a_codec() {
    let text = with_telephony(&[
        "callManagerUri: sip:pbx.example.com",
        "credentialsSecretRef: { name: pbx }",
        "codecs: [G722]",
    ]);
    let err = manifests::read_conference(&text, "chorus").unwrap_err();
    assert!(err.to_string().contains("G722"), "{err}");
}

#[test]
fn the_crd_rules_refuse_what_cannot_work_with_a_clear_message() {
    let refused = |lines: &[&str], says: &str| {
        let mut all = vec!["callManagerUri: sip:pbx.example.com"];
        all.extend_from_slice(lines);
        let err = plan(&conf(&with_telephony(&all))).unwrap_err();
        assert!(
            err.message.contains(says),
            "{lines:?} should be refused saying {says:?}: {err}"
        );
        err
    };
    let err = refused(
        &[
            "credentialsSecretRef: { name: pbx }",
            "mediaEncryption: required",
        ],
        "mediaEncryption: required needs transport: tls",
    );
    assert_eq!(err.reason, "InvalidSpec");
    refused(
        &[
            "credentialsSecretRef: { name: pbx }",
            "codecs: [opus, PCMU, opus]",
        ],
        "codecs must not repeat",
    );
    refused(&[], "mode: server needs credentialsSecretRef");
    refused(
        &["mode: edge", "credentialsSecretRef: { name: pbx }"],
        "mode: edge needs edgeTokenSecretRef",
    );
    refused(
        &[
            "credentialsSecretRef: { name: pbx }",
            "maxConcurrentCalls: 2",
            "maxCallsPerIdentity: 3",
        ],
        "maxCallsPerIdentity must not exceed maxConcurrentCalls",
    );
    // A pattern that does not compile makes the rule fail, and the failure names the pattern.
    let err = refused(
        &[
            "credentialsSecretRef: { name: pbx }",
            "allowedTargets: ['^[0-9]+$', '^(1234$']",
        ],
        "^(1234$",
    );
    assert_eq!(err.reason, "InvalidSpec");
    // TLS with required SRTP is fine.
    plan(&conf(&with_telephony(&[
        "callManagerUri: sips:pbx.example.com",
        "credentialsSecretRef: { name: pbx }",
        "transport: tls",
        "mediaEncryption: required",
    ])))
    .unwrap();
}

#[test]
fn the_operator_refuses_what_the_schema_cannot_see() {
    let refused = |lines: &[&str], says: &str| {
        let mut all = vec![
            "callManagerUri: sip:pbx.example.com",
            "credentialsSecretRef: { name: pbx }",
        ];
        all.extend_from_slice(lines);
        let err = plan(&conf(&with_telephony(&all))).unwrap_err();
        assert_eq!(err.reason, "InvalidTelephony", "{err}");
        assert!(err.message.contains(says), "{says}: {err}");
    };
    // The SIP port shares UDP and TCP with nothing else of the pod.
    refused(&["sipPort: 7000"], "the mesh port");
    refused(&["sipPort: 8080"], "the HTTP port");
    refused(&["sipPort: 40000"], "media.udpPort");
    // A pattern the CEL engine accepts but that compiles too large for a server to hold.
    refused(
        &["allowedTargets: ['\\w{100}']"],
        "spec.telephony.allowedTargets: pattern",
    );
}

#[test]
fn media_servers_get_the_credentials_as_files_and_their_sip_ports() {
    let p = plan(&phones()).unwrap();
    let c = container(&p);

    // Credentials: a read-only mount of only the two keys, and a variable saying where.
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/etc/chorus/sip-credentials")
        .expect("the credentials are mounted");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod(&p)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("pbx"));
    let keys: Vec<&str> = secret
        .items
        .as_ref()
        .unwrap()
        .iter()
        .map(|i| i.key.as_str())
        .collect();
    assert_eq!(keys, ["username", "password"]);
    assert_eq!(secret.default_mode, Some(0o440));
    assert_eq!(
        env_value(c, env::SIP_CREDENTIALS_DIR),
        Some("/etc/chorus/sip-credentials")
    );
    assert_eq!(env_value(c, env::SIP_PORT), Some("5060"));
    // No CA named: no CA variable.
    assert_eq!(env_value(c, env::SIP_CA_FILE), None);
    // Nothing reads a credential into the environment.
    for e in c.env.as_ref().unwrap() {
        let from_secret = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref());
        if let Some(r) = from_secret {
            assert_ne!(r.name, "pbx", "{} reads the SIP Secret", e.name);
        }
    }

    // SIP over UDP and TCP on the SIP port, with a hostPort like the media port (HostPort).
    let ports: Vec<(String, i32, String, Option<i32>)> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .filter(|p| p.name.as_deref().unwrap_or("").starts_with("sip"))
        .map(|p| {
            (
                p.name.clone().unwrap(),
                p.container_port,
                p.protocol.clone().unwrap(),
                p.host_port,
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("sip-udp".to_owned(), 5060, "UDP".to_owned(), Some(5060)),
            ("sip-tcp".to_owned(), 5060, "TCP".to_owned(), Some(5060)),
        ]
    );
    let service_ports: Vec<(String, i32, String)> = client_service(&p)
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.port, p.protocol.clone().unwrap()))
        .collect();
    assert_eq!(
        service_ports,
        [
            ("http".to_owned(), 8080, "TCP".to_owned()),
            ("sip-udp".to_owned(), 5060, "UDP".to_owned()),
            ("sip-tcp".to_owned(), 5060, "TCP".to_owned()),
        ]
    );

    // The operator checks the Secret exists with both keys (SecretMissing / SecretKeyMissing).
    assert!(p.secrets.contains(&SecretPlan::External {
        name: "pbx".into(),
        keys: vec!["username".into(), "password".into()],
        purpose: "the SIP credentials (spec.telephony.credentialsSecretRef)",
    }));
}

#[test]
fn a_ca_secret_is_mounted_as_one_file() {
    let p = plan(&conf(&with_telephony(&[
        "callManagerUri: sips:pbx.example.com",
        "transport: tls",
        "credentialsSecretRef: { name: pbx }",
        "caSecretRef: { name: pbx-ca }",
        "sipPort: 5061",
    ])))
    .unwrap();
    let c = container(&p);
    assert_eq!(
        env_value(c, env::SIP_CA_FILE),
        Some("/etc/chorus/sip-ca/ca.crt")
    );
    assert_eq!(env_value(c, env::SIP_PORT), Some("5061"));
    let volume = pod(&p)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("pbx-ca"))
        .expect("the CA Secret is a volume");
    let items = volume.secret.as_ref().unwrap().items.as_ref().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, names::SIP_CA_KEY);
    assert!(
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == volume.name
                && m.mount_path == names::SIP_CA_MOUNT
                && m.read_only == Some(true))
    );
    assert!(p.secrets.iter().any(|s| matches!(
        s,
        SecretPlan::External { name, keys, .. } if name == "pbx-ca" && keys == &["ca.crt".to_owned()]
    )));
}

#[test]
fn in_edge_mode_the_pods_hold_no_sip_credentials_and_no_sip_port() {
    let p = plan(&conf(&with_telephony(&[
        "callManagerUri: sip:pbx.example.com",
        "mode: edge",
        "edgeTokenSecretRef: { name: edge }",
        // Named but unused in edge mode: the bridge holds the PBX account, not the cluster.
        "credentialsSecretRef: { name: pbx }",
    ])))
    .unwrap();
    let c = container(&p);
    assert_eq!(env_value(c, env::SIP_CREDENTIALS_DIR), None);
    assert_eq!(env_value(c, env::SIP_PORT), None);
    assert_eq!(
        env_value(c, env::EDGE_TOKEN_FILE),
        Some("/etc/chorus/edge-token/token")
    );
    assert!(
        c.ports.as_ref().unwrap().iter().all(|p| !p
            .name
            .as_deref()
            .unwrap_or("")
            .starts_with("sip"))
    );
    assert!(!p.secrets.iter().any(|s| s.name() == "pbx"));
    assert!(p.secrets.iter().any(|s| s.name() == "edge"));
    let t = p.mesh.telephony.as_ref().unwrap();
    assert_eq!(t.mode, TelephonyMode::Edge);
    assert_eq!(t.credentials_secret, None);
}

#[test]
fn the_mesh_plan_names_the_secret_and_holds_no_secret_content() {
    let p = plan(&phones()).unwrap();
    let t = p.mesh.telephony.as_ref().unwrap();
    assert_eq!(t.credentials_secret.as_deref(), Some("pbx"));
    assert_eq!(t.sip_port, 5060);
    assert_eq!(t.allowed_targets, ["^[0-9*#+]{2,20}$"]);

    // The whole dry run, as `chorus-operator plan` prints it.
    let rendered = manifests::render(&p);
    let config_map = p
        .objects
        .iter()
        .find_map(|o| match o {
            Desired::ConfigMap(c) => Some(c),
            _ => None,
        })
        .unwrap();
    let mesh_json = &config_map.data.as_ref().unwrap()[names::MESH_PLAN_KEY];
    assert!(
        mesh_json.contains(r#""credentialsSecret": "pbx""#),
        "{mesh_json}"
    );
    for word in ["password", "username", "secretKeyRef"] {
        assert!(
            !mesh_json.to_lowercase().contains(&word.to_lowercase()),
            "mesh.json mentions {word}:\n{mesh_json}"
        );
    }
    // The user's Secret is not re-rendered (not even as a skeleton) and nothing carries a value.
    assert!(!rendered.contains("stringData"), "{rendered}");
    assert!(!rendered.contains("CHORUS_SIP_PASSWORD"));
    assert!(!rendered.contains("CHORUS_SIP_USERNAME"));
}
