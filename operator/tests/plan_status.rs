//! Unit tests of the pure core: `plan` and `status`, with no cluster and no clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::names_mixing;

use chorus_crds::{Conference, ConferenceStatus, Phase};
use chorus_operator::manifests;
use chorus_operator::plan::{Desired, SecretPlan, plan};
use chorus_operator::status::{Observed, status};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus};
use k8s_openapi::api::core::v1::{NodeSelectorRequirement, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

fn conf(yaml: &str) -> Conference {
    let mut c = manifests::read_conference(yaml, "chorus").expect("valid conference");
    c.metadata.uid = Some("uid-1".into());
    c.metadata.generation = Some(3);
    c
}

const TWO_REGIONS: &str = r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: { name: town }
spec:
  regions:
  - { name: us, replicas: 2 }
  - { name: eu, replicas: 1, nodeSelector: { "example.com/zone": "eu-1" } }
"#;

fn statefulsets(p: &chorus_operator::plan::Plan) -> Vec<&StatefulSet> {
    p.objects
        .iter()
        .filter_map(|o| match o {
            Desired::StatefulSet(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// The first required node-affinity expression of a pod.
fn first_node_requirement(pod: &PodSpec) -> &NodeSelectorRequirement {
    let required = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("the pod has required node affinity");
    &required.node_selector_terms[0]
        .match_expressions
        .as_ref()
        .expect("the term has match expressions")[0]
}

fn names_of(p: &chorus_operator::plan::Plan, kind: &str) -> Vec<String> {
    p.objects
        .iter()
        .filter(|o| o.kind() == kind)
        .map(|o| o.name().to_owned())
        .collect()
}

#[test]
fn plan_places_each_region_on_its_nodes() {
    let p = plan(&conf(TWO_REGIONS)).unwrap();
    let sts = statefulsets(&p);
    assert_eq!(sts.len(), 2);

    let us = sts[0].spec.as_ref().unwrap();
    assert_eq!(sts[0].metadata.name.as_deref(), Some("town-us"));
    assert_eq!(us.replicas, Some(2));
    assert_eq!(us.service_name.as_deref(), Some("town-mesh"));
    let pod = us.template.spec.as_ref().unwrap();
    let expr = first_node_requirement(pod);
    assert_eq!(expr.key, "topology.kubernetes.io/region");
    assert_eq!(expr.values.as_deref(), Some(&["us".to_owned()][..]));

    // An explicit selector replaces the default one.
    let eu_pod = sts[1]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let eu_expr = first_node_requirement(eu_pod);
    assert_eq!(eu_expr.key, "example.com/zone");
    assert_eq!(eu_expr.values.as_deref(), Some(&["eu-1".to_owned()][..]));

    // Anti-affinity spreads a conference's servers over nodes.
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );

    // One UDP media port, exposed as a hostPort by default; probes; non-root.
    let c = &pod.containers[0];
    let media = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("media"))
        .unwrap();
    assert_eq!(
        (
            media.container_port,
            media.host_port,
            media.protocol.as_deref()
        ),
        (40000, Some(40000), Some("UDP"))
    );
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()
            .contains_key("cpu")
    );
    // Pods carry the scrape label for the PodMonitor.
    let labels = us
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        labels.get("chorus.dev/scrape").map(String::as_str),
        Some("true")
    );

    // Every object is owned by the conference.
    for o in &p.objects {
        let v = o.to_value();
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["uid"],
            "uid-1",
            "{}",
            o.name()
        );
        assert_eq!(
            v["metadata"]["labels"]["chorus.dev/conference"],
            "town",
            "{}",
            o.name()
        );
    }
}

#[test]
fn pods_get_mixing_only_from_the_mesh_plan() {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/conference.yaml"),
    )
    .unwrap();
    // The check itself sees the spellings a flag or a variable would use.
    assert!(names_mixing("--top-speakers") && names_mixing("CHORUS_FRAME_MS"));
    for c in [conf(&example), conf(TWO_REGIONS)] {
        let p = plan(&c).unwrap();
        let sts = statefulsets(&p);
        assert!(!sts.is_empty());
        for s in sts {
            let name = s.metadata.name.as_deref().unwrap_or("?");
            let pod = s.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let media = &pod.containers[0];
            assert_eq!(
                media.args.as_deref(),
                Some(&["serve".to_owned()][..]),
                "{name}"
            );
            for container in pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
            {
                for arg in container
                    .command
                    .iter()
                    .chain(container.args.iter())
                    .flatten()
                {
                    assert!(
                        !names_mixing(arg),
                        "{name}: argument {arg} names a mixing setting"
                    );
                }
                for var in container.env.iter().flatten() {
                    assert!(
                        !names_mixing(&var.name),
                        "{name}: variable {} names a mixing setting",
                        var.name
                    );
                }
                assert!(
                    container.env_from.is_none(),
                    "{name}: envFrom could carry mixing"
                );
            }
        }
        // The mixing is there all the same, in the mesh plan the servers read.
        assert_eq!(
            i64::from(p.mesh.mixing.top_speakers),
            i64::from(c.spec.mixing.top_speakers)
        );
    }
}

#[test]
fn plan_lists_services_pdbs_configmap_and_secrets() {
    let p = plan(&conf(TWO_REGIONS)).unwrap();
    assert_eq!(names_of(&p, "Service"), ["town-mesh", "town-us", "town-eu"]);
    assert_eq!(names_of(&p, "PodDisruptionBudget"), ["town-us", "town-eu"]);
    assert_eq!(names_of(&p, "ConfigMap"), ["town-mesh"]);
    let mesh_svc = p
        .objects
        .iter()
        .find_map(|o| match o {
            Desired::Service(s) if o.name() == "town-mesh" => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        mesh_svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );

    let ids: Vec<_> = p.mesh.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["town-us-0", "town-us-1", "town-eu-0"]);
    assert_eq!(p.mesh.nodes[2].mesh, "town-eu-0.town-mesh.chorus.svc:7000");

    let secrets: Vec<_> = p.secrets.iter().map(SecretPlan::name).collect();
    assert_eq!(secrets, ["town-mesh-ca", "town-mesh-tls", "town-join-key"]);
    match &p.secrets[1] {
        SecretPlan::MeshTls { servers, .. } => {
            assert_eq!(servers.len(), 3);
            assert!(
                servers[0]
                    .dns_names
                    .contains(&"town-us-0.town-mesh.chorus.svc".to_owned())
            );
        }
        other => panic!("expected MeshTls, got {other:?}"),
    }
}

#[test]
fn plan_is_deterministic() {
    let c = conf(TWO_REGIONS);
    let a = manifests::render(&plan(&c).unwrap());
    let b = manifests::render(&plan(&c.clone()).unwrap());
    assert_eq!(a, b);
}

#[test]
fn regions_added_removed_and_scaled() {
    let base = plan(&conf(TWO_REGIONS)).unwrap();

    let added = plan(&conf(&TWO_REGIONS.replace(
        "  - { name: eu,",
        "  - { name: ap, replicas: 1 }\n  - { name: eu,",
    )))
    .unwrap();
    assert_eq!(
        names_of(&added, "StatefulSet"),
        ["town-us", "town-ap", "town-eu"]
    );
    assert_eq!(added.mesh.nodes.len(), 4);

    let removed = plan(&conf(&TWO_REGIONS.replace(
        "  - { name: eu, replicas: 1, nodeSelector: { \"example.com/zone\": \"eu-1\" } }\n",
        "",
    )))
    .unwrap();
    assert_eq!(names_of(&removed, "StatefulSet"), ["town-us"]);
    assert_eq!(names_of(&removed, "Service"), ["town-mesh", "town-us"]);

    let scaled = plan(&conf(&TWO_REGIONS.replace("replicas: 2", "replicas: 4"))).unwrap();
    assert_eq!(
        statefulsets(&scaled)[0].spec.as_ref().unwrap().replicas,
        Some(4)
    );
    assert_eq!(scaled.mesh.nodes.len(), 5);
    assert_ne!(scaled.mesh_digest, base.mesh_digest);
}

#[test]
fn mesh_generation_moves_only_with_the_mesh() {
    let mut c = conf(TWO_REGIONS);
    let first = plan(&c).unwrap();
    assert_eq!(first.mesh.generation, 1);

    // The status records generation 4 for this digest: the plan keeps it.
    c.status = Some(ConferenceStatus {
        mesh_generation: Some(4),
        mesh_digest: Some(first.mesh_digest.clone()),
        ..ConferenceStatus::default()
    });
    assert_eq!(plan(&c).unwrap().mesh.generation, 4);

    // Changing the image does not touch the mesh.
    let mut image = c.clone();
    image.spec.media.image = "example/other:1".into();
    assert_eq!(plan(&image).unwrap().mesh.generation, 4);

    // Changing mixing does.
    let mut mixing = c.clone();
    mixing.spec.mixing.top_speakers = 5;
    let moved = plan(&mixing).unwrap();
    assert_eq!(moved.mesh.generation, 5);
    assert_eq!(moved.mesh.mixing.top_speakers, 5);
    let cm = moved
        .objects
        .iter()
        .find_map(|o| match o {
            Desired::ConfigMap(cm) => Some(cm),
            _ => None,
        })
        .unwrap();
    let published =
        chorus_crds::MeshPlan::from_json(&cm.data.as_ref().unwrap()["mesh.json"]).unwrap();
    assert_eq!(published, moved.mesh);
}

#[test]
fn empty_node_selector_places_anywhere() {
    let p = plan(&conf(&TWO_REGIONS.replace(
        "{ name: us, replicas: 2 }",
        "{ name: us, replicas: 2, nodeSelector: {} }",
    )))
    .unwrap();
    let pod = statefulsets(&p)[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert!(pod.affinity.unwrap().node_affinity.is_none());
}

#[test]
fn node_port_and_load_balancer_exposure_add_per_server_services() {
    let np = plan(&conf(&format!(
        "{TWO_REGIONS}  media: {{ exposure: NodePort, nodePortBase: 31000 }}\n"
    )))
    .unwrap();
    let ports: Vec<_> = np
        .objects
        .iter()
        .filter_map(|o| match o {
            Desired::Service(s) if o.name().ends_with("-media") => {
                s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port
            }
            _ => None,
        })
        .collect();
    assert_eq!(ports, [31000, 31001, 31002]);
    let lb = plan(&conf(&format!(
        "{TWO_REGIONS}  media: {{ exposure: LoadBalancer }}\n"
    )))
    .unwrap();
    assert_eq!(
        names_of(&lb, "Service")
            .iter()
            .filter(|n| n.ends_with("-media"))
            .count(),
        3
    );
    // No hostPort then.
    let pod = statefulsets(&lb)[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert!(
        pod.containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .all(|p| p.host_port.is_none())
    );
}

#[test]
fn unsatisfiable_specs_are_problems_not_panics() {
    let long = "a".repeat(50);
    let too_long = TWO_REGIONS.replace("name: town", &format!("name: town{long}"));
    let err = plan(&conf(&too_long)).unwrap_err();
    assert_eq!(err.reason, "NameTooLong", "{err}");

    let bad_selector = TWO_REGIONS.replace("\"example.com/zone\"", "\"bad key!\"");
    assert_eq!(
        plan(&conf(&bad_selector)).unwrap_err().reason,
        "InvalidNodeSelector"
    );

    let exhausted =
        format!("{TWO_REGIONS}  media: {{ exposure: NodePort, nodePortBase: 32766 }}\n");
    assert_eq!(
        plan(&conf(&exhausted)).unwrap_err().reason,
        "NodePortRangeExhausted"
    );

    // The CEL rules run client-side too.
    let dup = TWO_REGIONS.replace("name: eu", "name: us");
    let err = plan(&conf(&dup)).unwrap_err();
    assert_eq!(err.reason, "InvalidSpec");
    assert!(err.message.contains("unique"), "{err}");

    let no_port_base = format!("{TWO_REGIONS}  media: {{ exposure: NodePort }}\n");
    assert!(
        plan(&conf(&no_port_base))
            .unwrap_err()
            .message
            .contains("nodePortBase")
    );

    let jitter =
        format!("{TWO_REGIONS}  mixing: {{ jitterBuffer: {{ minMs: 100, maxMs: 110 }} }}\n");
    assert!(
        plan(&conf(&jitter))
            .unwrap_err()
            .message
            .contains("jitterBuffer")
    );

    let none = TWO_REGIONS.split("  regions:").next().unwrap().to_owned() + "  regions: []\n";
    assert!(plan(&conf(&none)).is_err());
}

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).unwrap())
}

fn sts(name: &str, desired: i32, ready: i32, settled: bool) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(name.into()),
            generation: Some(2),
            ..ObjectMeta::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(desired),
            ..StatefulSetSpec::default()
        }),
        status: Some(StatefulSetStatus {
            replicas: desired,
            ready_replicas: Some(ready),
            updated_replicas: Some(if settled { desired } else { 0 }),
            observed_generation: Some(2),
            ..StatefulSetStatus::default()
        }),
    }
}

fn cond<'a>(
    s: &'a ConferenceStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn status_follows_the_children() {
    let c = conf(TWO_REGIONS);
    let p = plan(&c).unwrap();
    let obs = |list: &'static [StatefulSet]| Observed {
        statefulsets: list,
        secret_problem: None,
        certificates_complete: true,
    };

    let pending = status(&c, Ok(&p), &obs(&[]), &now());
    assert_eq!(pending.phase, Some(Phase::Pending));
    assert_eq!(pending.observed_generation, Some(3));
    assert_eq!(pending.ready_servers.as_deref(), Some("0/3"));
    assert_eq!(pending.region_names.as_deref(), Some("us,eu"));
    assert_eq!(cond(&pending, "Ready").status, "False");

    let rolling: &'static [StatefulSet] = Box::leak(Box::new([
        sts("town-us", 2, 1, false),
        sts("town-eu", 1, 0, false),
    ]));
    let s = status(&c, Ok(&p), &obs(rolling), &now());
    assert_eq!(s.phase, Some(Phase::Provisioning));
    assert_eq!(cond(&s, "Ready").reason, "RollingOut");

    let stuck: &'static [StatefulSet] = Box::leak(Box::new([
        sts("town-us", 2, 2, true),
        sts("town-eu", 1, 0, true),
    ]));
    let s = status(&c, Ok(&p), &obs(stuck), &now());
    assert_eq!(s.phase, Some(Phase::Degraded));
    assert_eq!(cond(&s, "Degraded").reason, "ServersNotReady");
    assert!(cond(&s, "Degraded").message.contains("eu (0/1)"));

    let ready: &'static [StatefulSet] = Box::leak(Box::new([
        sts("town-us", 2, 2, true),
        sts("town-eu", 1, 1, true),
    ]));
    let s = status(&c, Ok(&p), &obs(ready), &now());
    assert_eq!(s.phase, Some(Phase::Ready));
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(cond(&s, "MeshWired").status, "True");
    assert_eq!(cond(&s, "Degraded").status, "False");
    assert_eq!(s.regions[0].endpoint, "http://town-us.chorus.svc:8080");
    assert_eq!(s.mesh_generation, Some(1));
    assert_eq!(
        s.join_url.as_deref(),
        Some("http://town-us.chorus.svc:8080/")
    );

    // A later reconcile keeps lastTransitionTime of unchanged conditions.
    let mut again = c.clone();
    again.status = Some(s.clone());
    let later = Time(Timestamp::from_second(1_800_000_100).unwrap());
    let s2 = status(&again, Ok(&p), &obs(ready), &later);
    assert_eq!(s2, s);
    let s3 = status(&again, Ok(&p), &obs(stuck), &later);
    assert_eq!(cond(&s3, "Ready").last_transition_time, later);
}

#[test]
fn status_of_problems() {
    let c = conf(TWO_REGIONS);
    let p = plan(&c).unwrap();
    let problem = chorus_operator::plan::SpecProblem {
        reason: "SecretMissing",
        message: "Secret \"x\" does not exist".into(),
    };
    let s = status(
        &c,
        Ok(&p),
        &Observed {
            statefulsets: &[],
            secret_problem: Some(&problem),
            certificates_complete: true,
        },
        &now(),
    );
    assert_eq!(s.phase, Some(Phase::Degraded));
    assert_eq!(cond(&s, "Degraded").reason, "SecretMissing");

    let s = status(&c, Err(&problem), &Observed::default(), &now());
    assert_eq!(s.phase, Some(Phase::Degraded));
    assert_eq!(cond(&s, "MeshWired").status, "False");

    let zero = conf(
        &TWO_REGIONS
            .replace("replicas: 2", "replicas: 0")
            .replace("replicas: 1", "replicas: 0"),
    );
    let pz = plan(&zero).unwrap();
    let s = status(
        &zero,
        Ok(&pz),
        &Observed {
            certificates_complete: true,
            ..Observed::default()
        },
        &now(),
    );
    assert_eq!(cond(&s, "Degraded").reason, "NoServers");
}
