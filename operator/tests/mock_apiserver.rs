//! Reconcile against a mocked API server (the kube-rs controller-rs pattern with tower-test).
//!
//! A small fake answers each request from the scenario's state; every test then asserts the exact
//! sequence of API calls the reconcile made, and the bodies that matter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use chorus_crds::Conference;
use chorus_operator::manifests;
use chorus_operator::metrics::Metrics;
use chorus_operator::reconcile::{Context, error_policy, reconcile};
use http::{Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

/// One request the reconcile made.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

type Responder = Box<dyn FnMut(&Call) -> (u16, Value) + Send>;

fn fixed_now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).unwrap())
}

/// Run one reconcile against `respond`; return its result, the calls, and the context.
async fn run(
    conf: Conference,
    respond: Responder,
) -> (
    Result<Action, chorus_operator::Error>,
    Vec<Call>,
    Arc<Context>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    let server = tokio::spawn(async move {
        let mut respond = respond;
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let call = Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body: if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                },
            };
            let (status, reply) = respond(&call);
            log.lock().unwrap().push(call);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = kube::Client::new(service, "default");
    let ctx = Arc::new(Context::new(client, Arc::new(Metrics::new())).with_clock(fixed_now));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(conf), ctx.clone()),
    )
    .await
    .expect("reconcile finishes");
    // The fake server's task ends by itself once every client clone is dropped.
    drop(server);
    let out = calls.lock().unwrap().clone();
    (result, out, ctx)
}

fn not_found(what: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn status_error(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": format!("injected {reason}"), "reason": reason, "code": code}),
    )
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                 "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

fn owned(api_version: &str, kind: &str, name: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {
        "name": name, "namespace": "chorus",
        "labels": {"chorus.dev/conference": "town", "app.kubernetes.io/managed-by": "chorus-operator"},
        "ownerReferences": [{"apiVersion": "chorus.dev/v1alpha1", "kind": "Conference", "name": "town",
                             "uid": "uid-1", "controller": true}]}})
}

const TWO_REGIONS: &str = r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: { name: town, namespace: chorus, uid: uid-1, generation: 1 }
spec:
  regions:
  - { name: us, replicas: 1 }
  - { name: eu, replicas: 1 }
"#;

fn conference(yaml: &str) -> Conference {
    manifests::read_conference(yaml, "chorus").unwrap()
}

/// A fake that echoes writes and has the given Secrets and list contents.
fn fake(secrets: BTreeMap<String, Value>, lists: BTreeMap<&'static str, Vec<Value>>) -> Responder {
    Box::new(move |call: &Call| {
        let p = call.path.as_str();
        match call.method.as_str() {
            "GET" if p.contains("/secrets/") => {
                let name = p.rsplit('/').next().unwrap();
                match secrets.get(name) {
                    Some(s) => (200, s.clone()),
                    None => not_found(name),
                }
            }
            "GET" if p.ends_with("/statefulsets") => list(
                "StatefulSet",
                "apps/v1",
                lists.get("sts").cloned().unwrap_or_default(),
            ),
            "GET" if p.ends_with("/services") => list(
                "Service",
                "v1",
                lists.get("svc").cloned().unwrap_or_default(),
            ),
            "GET" if p.ends_with("/poddisruptionbudgets") => list(
                "PodDisruptionBudget",
                "policy/v1",
                lists.get("pdb").cloned().unwrap_or_default(),
            ),
            "PATCH" if p.ends_with("/status") => {
                let mut conf = serde_json::to_value(conference(TWO_REGIONS)).unwrap();
                conf["status"] = call.body["status"].clone();
                (200, conf)
            }
            "DELETE" => {
                let name = p.rsplit('/').next().unwrap();
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name}}),
                )
            }
            // Creates, applies and merge patches: the server returns the object.
            "POST" | "PATCH" => {
                let mut body = call.body.clone();
                if body["metadata"]["name"].is_null() {
                    body["metadata"]["name"] = p.rsplit('/').next().unwrap().into();
                }
                (if call.method == "POST" { 201 } else { 200 }, body)
            }
            _ => panic!("unexpected call {}", call.line()),
        }
    })
}

fn apply_lines(regions: &[&str]) -> Vec<String> {
    let mut v = vec![
        "PATCH /api/v1/namespaces/chorus/serviceaccounts/town-mediaserver".to_owned(),
        "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/chorus/roles/town-mediaserver"
            .to_owned(),
        "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/chorus/rolebindings/town-mediaserver"
            .to_owned(),
        "PATCH /api/v1/namespaces/chorus/configmaps/town-mesh".to_owned(),
        "PATCH /api/v1/namespaces/chorus/services/town-mesh".to_owned(),
    ];
    for r in regions {
        v.push(format!("PATCH /api/v1/namespaces/chorus/services/town-{r}"));
        v.push(format!(
            "PATCH /apis/apps/v1/namespaces/chorus/statefulsets/town-{r}"
        ));
        v.push(format!(
            "PATCH /apis/policy/v1/namespaces/chorus/poddisruptionbudgets/town-{r}"
        ));
    }
    v
}

fn prune_lines() -> Vec<String> {
    vec![
        "GET /apis/apps/v1/namespaces/chorus/statefulsets".to_owned(),
        "GET /api/v1/namespaces/chorus/services".to_owned(),
        "GET /apis/policy/v1/namespaces/chorus/poddisruptionbudgets".to_owned(),
    ]
}

const STATUS_LINE: &str =
    "PATCH /apis/chorus.dev/v1alpha1/namespaces/chorus/conferences/town/status";
const EVENT_LINE: &str = "POST /apis/events.k8s.io/v1/namespaces/chorus/events";

fn secret_data(value: &Value) -> BTreeMap<String, String> {
    value["data"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), String::from_utf8(raw).unwrap())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn first_reconcile_of_a_new_conference() {
    let (result, calls, _ctx) = run(
        conference(TWO_REGIONS),
        fake(BTreeMap::new(), BTreeMap::new()),
    )
    .await;
    let action = result.expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    let mut expected = vec![
        "GET /api/v1/namespaces/chorus/secrets/town-mesh-ca".to_owned(),
        "POST /api/v1/namespaces/chorus/secrets".to_owned(),
        "GET /api/v1/namespaces/chorus/secrets/town-mesh-tls".to_owned(),
        "POST /api/v1/namespaces/chorus/secrets".to_owned(),
        "GET /api/v1/namespaces/chorus/secrets/town-join-key".to_owned(),
        "POST /api/v1/namespaces/chorus/secrets".to_owned(),
    ];
    expected.extend(apply_lines(&["us", "eu"]));
    expected.extend(prune_lines());
    expected.push(STATUS_LINE.to_owned());
    // SecretCreated (CA), CertificatesIssued, SecretCreated (join key), phase, mesh generation.
    expected.extend(std::iter::repeat_n(EVENT_LINE.to_owned(), 5));
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    assert_eq!(lines, expected);

    // Applies are server-side applies under our field manager, forced.
    for call in calls
        .iter()
        .filter(|c| c.method == "PATCH" && !c.path.ends_with("/status"))
    {
        assert_eq!(
            call.content_type,
            "application/apply-patch+yaml",
            "{}",
            call.line()
        );
        assert!(
            call.query.contains("fieldManager=chorus-operator"),
            "{}",
            call.query
        );
        assert!(call.query.contains("force=true"), "{}", call.query);
        assert_eq!(call.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }
    // Prune lists select on the conference label.
    for call in calls
        .iter()
        .filter(|c| c.method == "GET" && !c.path.contains("/secrets/"))
    {
        assert!(
            call.query
                .contains("labelSelector=chorus.dev%2Fconference%3Dtown"),
            "{}",
            call.query
        );
    }

    // The mesh TLS Secret holds the CA certificate and a certificate and key per server, and no CA key.
    let tls = &calls[3].body;
    assert_eq!(tls["metadata"]["name"], "town-mesh-tls");
    let keys: Vec<String> = secret_data(tls).into_keys().collect();
    assert_eq!(
        keys,
        [
            "ca.crt",
            "town-eu-0.crt",
            "town-eu-0.key",
            "town-us-0.crt",
            "town-us-0.key"
        ]
    );
    let ca = secret_data(&calls[1].body);
    assert!(ca["ca.key"].contains("PRIVATE KEY"));
    assert_eq!(secret_data(tls)["ca.crt"], ca["ca.crt"]);

    // The StatefulSet apply carries the region's placement.
    let sts = calls
        .iter()
        .find(|c| c.path.ends_with("/statefulsets/town-eu"))
        .unwrap();
    assert_eq!(sts.body["kind"], "StatefulSet");
    assert_eq!(sts.body["apiVersion"], "apps/v1");
    assert_eq!(
        sts.body["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
        "eu"
    );

    // The status patch: Pending, generation 1, conditions with reasons.
    let status = &calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    assert_eq!(status.content_type, "application/apply-patch+yaml");
    let s = &status.body["status"];
    assert_eq!(s["phase"], "Pending");
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(s["meshGeneration"], 1);
    assert_eq!(s["readyServers"], "0/2");
    assert_eq!(
        s["regions"][1]["endpoint"],
        "http://town-eu.chorus.svc:8080"
    );
    let reasons: Vec<(&str, &str, &str)> = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("Ready", "False", "Pending"),
            ("MeshWired", "True", "MeshPlanPublished"),
            ("Degraded", "False", "AsExpected")
        ]
    );

    // Events never carry secret material.
    for call in calls.iter().filter(|c| c.line() == EVENT_LINE) {
        let text = call.body.to_string();
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains("BEGIN CERTIFICATE"),
            "{text}"
        );
    }
    let reasons: Vec<&str> = calls
        .iter()
        .filter(|c| c.line() == EVENT_LINE)
        .map(|c| c.body["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "SecretCreated",
            "CertificatesIssued",
            "SecretCreated",
            "Pending",
            "MeshPlanPublished"
        ]
    );
}

/// Secrets as they exist after the first reconcile: CA, TLS for `servers`, join key.
fn existing_secrets(servers: &[&str]) -> BTreeMap<String, Value> {
    let ca = chorus_operator::secret_material::new_mesh_ca("town").unwrap();
    let loaded = chorus_operator::secret_material::MeshCa::from_secret_data(&ca).unwrap();
    let mut tls = BTreeMap::new();
    tls.insert("ca.crt".to_owned(), ca["ca.crt"].clone());
    for id in servers {
        tls.extend(
            loaded
                .issue(&chorus_operator::plan::ServerCert {
                    id: (*id).to_owned(),
                    dns_names: vec![(*id).to_owned()],
                })
                .unwrap(),
        );
    }
    let secret = |name: &str, data: &BTreeMap<String, k8s_openapi::ByteString>| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "chorus"},
               "data": serde_json::to_value(data).unwrap()})
    };
    BTreeMap::from([
        ("town-mesh-ca".to_owned(), secret("town-mesh-ca", &ca)),
        ("town-mesh-tls".to_owned(), secret("town-mesh-tls", &tls)),
        (
            "town-join-key".to_owned(),
            secret(
                "town-join-key",
                &chorus_operator::secret_material::new_join_key(),
            ),
        ),
    ])
}

#[tokio::test]
async fn removing_a_region_prunes_its_objects_and_leaves_secrets_alone() {
    let mut conf = conference(
        &TWO_REGIONS
            .replace("  - { name: eu, replicas: 1 }\n", "")
            .replace("generation: 1", "generation: 2"),
    );
    // The status the first reconcile wrote (two regions, generation 1).
    let first = chorus_operator::plan::plan(&conference(TWO_REGIONS)).unwrap();
    conf.status = Some(chorus_crds::ConferenceStatus {
        mesh_generation: Some(1),
        mesh_digest: Some(first.mesh_digest),
        phase: Some(chorus_crds::Phase::Ready),
        ..Default::default()
    });

    let lists = BTreeMap::from([
        (
            "sts",
            vec![
                owned("apps/v1", "StatefulSet", "town-us"),
                owned("apps/v1", "StatefulSet", "town-eu"),
            ],
        ),
        (
            "svc",
            vec![
                owned("v1", "Service", "town-mesh"),
                owned("v1", "Service", "town-us"),
                owned("v1", "Service", "town-eu"),
                // Same labels but not controlled by this conference: never pruned.
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "town-handmade", "namespace": "chorus",
                            "labels": {"chorus.dev/conference": "town"}}}),
            ],
        ),
        (
            "pdb",
            vec![
                owned("policy/v1", "PodDisruptionBudget", "town-us"),
                owned("policy/v1", "PodDisruptionBudget", "town-eu"),
            ],
        ),
    ]);
    let (result, calls, _ctx) = run(
        conf,
        fake(existing_secrets(&["town-us-0", "town-eu-0"]), lists),
    )
    .await;
    result.expect("reconcile succeeds");

    let mut expected = vec![
        "GET /api/v1/namespaces/chorus/secrets/town-mesh-ca".to_owned(),
        "GET /api/v1/namespaces/chorus/secrets/town-mesh-tls".to_owned(),
        "GET /api/v1/namespaces/chorus/secrets/town-join-key".to_owned(),
    ];
    expected.extend(apply_lines(&["us"]));
    expected.extend([
        "GET /apis/apps/v1/namespaces/chorus/statefulsets".to_owned(),
        "DELETE /apis/apps/v1/namespaces/chorus/statefulsets/town-eu".to_owned(),
        "GET /api/v1/namespaces/chorus/services".to_owned(),
        "DELETE /api/v1/namespaces/chorus/services/town-eu".to_owned(),
        "GET /apis/policy/v1/namespaces/chorus/poddisruptionbudgets".to_owned(),
        "DELETE /apis/policy/v1/namespaces/chorus/poddisruptionbudgets/town-eu".to_owned(),
        STATUS_LINE.to_owned(),
        // Pruned, phase (Ready -> Provisioning: us exists but has no status), mesh generation 2.
        EVENT_LINE.to_owned(),
        EVENT_LINE.to_owned(),
        EVENT_LINE.to_owned(),
    ]);
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    assert_eq!(lines, expected);
    let events: Vec<&Value> = calls
        .iter()
        .filter(|c| c.line() == EVENT_LINE)
        .map(|c| &c.body)
        .collect();
    assert_eq!(events[0]["reason"], "Pruned");
    assert!(
        events[0]["note"]
            .as_str()
            .unwrap()
            .contains("StatefulSet/town-eu")
    );
    assert_eq!(events[2]["reason"], "MeshPlanPublished");
    let status = calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    assert_eq!(status.body["status"]["meshGeneration"], 2);
    assert_eq!(status.body["status"]["regionNames"], "us");
}

#[tokio::test]
async fn a_new_server_gets_its_certificate_added_without_touching_existing_keys() {
    let conf =
        conference(&TWO_REGIONS.replace("{ name: eu, replicas: 1 }", "{ name: eu, replicas: 2 }"));
    let secrets = existing_secrets(&["town-us-0", "town-eu-0"]);
    let before = secrets["town-mesh-tls"].clone();
    let (result, calls, _ctx) = run(conf, fake(secrets, BTreeMap::new())).await;
    result.expect("reconcile succeeds");

    let lines: Vec<String> = calls.iter().map(Call::line).take(4).collect();
    assert_eq!(
        lines,
        [
            "GET /api/v1/namespaces/chorus/secrets/town-mesh-ca",
            "GET /api/v1/namespaces/chorus/secrets/town-mesh-tls",
            "PATCH /api/v1/namespaces/chorus/secrets/town-mesh-tls",
            "GET /api/v1/namespaces/chorus/secrets/town-join-key",
        ]
    );
    let patch = &calls[2];
    assert_eq!(patch.content_type, "application/merge-patch+json");
    let added: Vec<String> = secret_data(&patch.body).into_keys().collect();
    assert_eq!(
        added,
        ["town-eu-1.crt", "town-eu-1.key"],
        "only the new server's keys are written"
    );
    assert!(before["data"]["town-eu-0.key"].is_string());
    // No other write to any Secret.
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.path.contains("/secrets") && c.method != "GET")
            .count(),
        1
    );
}

#[tokio::test]
async fn ready_children_give_a_ready_status() {
    let ready = |name: &str| {
        let mut s = owned("apps/v1", "StatefulSet", name);
        s["metadata"]["generation"] = 1.into();
        s["spec"] =
            json!({"replicas": 1, "selector": {}, "serviceName": "town-mesh", "template": {}});
        s["status"] = json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1,
                             "currentRevision": "r1", "updateRevision": "r1"});
        s
    };
    let lists = BTreeMap::from([("sts", vec![ready("town-us"), ready("town-eu")])]);
    let (result, calls, _ctx) = run(
        conference(TWO_REGIONS),
        fake(existing_secrets(&["town-us-0", "town-eu-0"]), lists),
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let status = calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    let s = &status.body["status"];
    assert_eq!(s["phase"], "Ready");
    assert_eq!(s["readyServers"], "2/2");
    assert_eq!(s["conditions"][0]["status"], "True");
    assert_eq!(
        s["conditions"][0]["lastTransitionTime"],
        "2027-01-15T08:00:00Z"
    );
    assert_eq!(
        s["regions"][0],
        json!({"name": "us", "readyServers": 1, "desiredServers": 1, "endpoint": "http://town-us.chorus.svc:8080"})
    );
}

#[tokio::test]
async fn an_unsatisfiable_spec_sets_degraded_and_waits() {
    let conf =
        conference(&TWO_REGIONS.replace("name: town", &format!("name: town{}", "x".repeat(50))));
    let (result, calls, _ctx) = run(conf, fake(BTreeMap::new(), BTreeMap::new())).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].ends_with("/status"));
    assert_eq!(lines[1], EVENT_LINE);
    assert_eq!(calls[0].body["status"]["phase"], "Degraded");
    assert_eq!(
        calls[0].body["status"]["conditions"][2]["reason"],
        "NameTooLong"
    );
    assert_eq!(calls[1].body["type"], "Warning");
}

#[tokio::test]
async fn a_conflict_is_retried_with_growing_backoff() {
    // Creating the CA Secret races with someone else: 409.
    let respond: Responder = Box::new(|call: &Call| match call.method.as_str() {
        "GET" => not_found("secret"),
        "POST" => status_error(409, "AlreadyExists"),
        _ => panic!("unexpected call {}", call.line()),
    });
    let conf = conference(TWO_REGIONS);
    let (result, calls, ctx) = run(conf.clone(), respond).await;
    let error = result.expect_err("a 409 fails this reconcile");
    assert_eq!(error.category(), "conflict");
    assert!(error.is_transient());
    assert_eq!(calls.len(), 2);
    let conf = Arc::new(conf);
    assert_eq!(
        error_policy(conf.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(conf.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(conf, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    assert!(
        ctx.metrics
            .encode()
            .contains("chorus_operator_reconcile_errors_total{category=\"conflict\"} 3")
    );
}

#[tokio::test]
async fn a_server_error_stops_the_reconcile_and_requeues() {
    let mut inner = fake(
        existing_secrets(&["town-us-0", "town-eu-0"]),
        BTreeMap::new(),
    );
    let respond: Responder = Box::new(move |call: &Call| {
        if call.method == "PATCH" && call.path.ends_with("/statefulsets/town-us") {
            status_error(500, "InternalError")
        } else {
            inner(call)
        }
    });
    let conf = conference(TWO_REGIONS);
    let (result, calls, ctx) = run(conf.clone(), respond).await;
    let error = result.expect_err("a 500 fails this reconcile");
    assert_eq!(error.category(), "server_error");
    assert!(error.to_string().contains("StatefulSet"), "{error}");
    // Nothing after the failed apply: no prune, no status written from a half-applied state.
    let last = calls.last().unwrap().line();
    assert_eq!(
        last,
        "PATCH /apis/apps/v1/namespaces/chorus/statefulsets/town-us"
    );
    assert_eq!(
        error_policy(Arc::new(conf), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );

    // A permanent error (422) is not hammered.
    let invalid = chorus_operator::Error::Kube {
        verb: "apply",
        kind: "StatefulSet",
        name: "town-us".into(),
        source: kube::Error::Api(Box::new(
            serde_json::from_value(json!({"status": "Failure", "message": "invalid", "reason": "Invalid", "code": 422}))
                .unwrap(),
        )),
    };
    assert!(!invalid.is_transient());
    assert_eq!(
        error_policy(Arc::new(conference(TWO_REGIONS)), &invalid, ctx),
        Action::requeue(Duration::from_secs(300))
    );
}

/// TWO_REGIONS dialling phones with the credentials Secret `pbx`.
fn with_phones() -> Conference {
    conference(&format!(
        "{TWO_REGIONS}  telephony:\n    callManagerUri: sip:pbx.example.com\n    \
         credentialsSecretRef: {{ name: pbx }}\n"
    ))
}

const PBX_PASSWORD: &str = "chorus-secret";

fn pbx_secret(keys: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                base64::engine::general_purpose::STANDARD.encode(v).into(),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "pbx", "namespace": "chorus"}, "data": data})
}

fn degraded(status_call: &Call) -> &Value {
    status_call.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
}

#[tokio::test]
async fn the_sip_password_goes_nowhere_but_into_the_pods_mount() {
    let mut secrets = existing_secrets(&["town-us-0", "town-eu-0"]);
    secrets.insert(
        "pbx".to_owned(),
        pbx_secret(&[("username", "chorus"), ("password", PBX_PASSWORD)]),
    );
    let (result, calls, _ctx) = run(with_phones(), fake(secrets, BTreeMap::new())).await;
    result.expect("reconcile succeeds");
    assert!(
        calls
            .iter()
            .any(|c| c.line() == "GET /api/v1/namespaces/chorus/secrets/pbx"),
        "the operator checks the credentials Secret"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(PBX_PASSWORD);
    for call in &calls {
        let body = call.body.to_string();
        assert!(
            !body.contains(PBX_PASSWORD) && !body.contains(&encoded),
            "{} carries the SIP password",
            call.line()
        );
    }
    let status = calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    assert_eq!(degraded(status)["status"], "False");
    let sts = calls
        .iter()
        .find(|c| c.path.ends_with("/statefulsets/town-us") && c.method == "PATCH")
        .unwrap();
    let volumes = &sts.body["spec"]["template"]["spec"]["volumes"];
    assert!(
        volumes
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "pbx"),
        "{volumes}"
    );
}

#[tokio::test]
async fn a_missing_credentials_secret_or_key_degrades_the_conference_naming_it() {
    let (result, calls, _ctx) = run(
        with_phones(),
        fake(
            existing_secrets(&["town-us-0", "town-eu-0"]),
            BTreeMap::new(),
        ),
    )
    .await;
    result.expect("a missing user Secret is a condition, not an error");
    let status = calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    assert_eq!(status.body["status"]["phase"], "Degraded");
    let condition = degraded(status);
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "SecretMissing");
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("\"pbx\"") && message.contains("credentialsSecretRef"),
        "{message}"
    );

    let mut secrets = existing_secrets(&["town-us-0", "town-eu-0"]);
    secrets.insert("pbx".to_owned(), pbx_secret(&[("username", "chorus")]));
    let (result, calls, _ctx) = run(with_phones(), fake(secrets, BTreeMap::new())).await;
    result.unwrap();
    let status = calls.iter().find(|c| c.line() == STATUS_LINE).unwrap();
    let condition = degraded(status);
    assert_eq!(condition["reason"], "SecretKeyMissing");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("\"password\""),
        "{condition}"
    );
}
