//! The Helm chart (`charts/chorus/`) installs what it says, and its monitoring speaks the metrics
//! the code exports.
//!
//! Real tools only: `helm lint` / `helm template` (the pinned helm of `scripts/bootstrap`),
//! `kubernetes-validate --strict` on every rendered object, and Prometheus' own `promtool` on the
//! alert rules. The metric-name check reads the Rust sources, so a renamed metric fails here
//! instead of leaving an empty Grafana panel or an alert that can never fire.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use chorus_tests::{
    kubernetes_validate_strict, operator_bin, read_workspace_file, run, run_ok, tool,
    workspace_root,
};
use serde::Deserialize;

const CHART: &str = "charts/chorus";
const CRD_FILE: &str = "crds/conference.yaml";
const CHART_CRD_FILE: &str = "charts/chorus/templates/crd.yaml";
const DASHBOARDS: &str = "charts/chorus/dashboards";
/// Where the metric names are defined: every `"chorus_..."` string literal in these counts.
const METRIC_SOURCES: [&str; 2] = ["mediaserver/src", "operator/src"];

/// Everything switched away from its default: the combination most likely to break a template.
const NON_DEFAULT: [&str; 7] = [
    "replicas=2",
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "crds.install=false",
    "image.repository=registry.example.com/chorus/operator",
    "image.tag=1.2.3-test",
];

/// The edge bridge switched on with everything it requires (and the optional CA).
const EDGE_BRIDGE: [&str; 6] = [
    "edgeBridge.enabled=true",
    "edgeBridge.servers={https://media-0.conf.example,https://media-1.conf.example:8443}",
    "edgeBridge.callManager=sip:pbx.corp.example:5060",
    "edgeBridge.tokenSecret=branch-edge-token",
    "edgeBridge.credentialsSecret=pbx",
    "edgeBridge.caSecret=corp-ca",
];
/// Where the edge bridge's Secrets are mounted (the same paths the operator gives media servers,
/// crds/src/names.rs).
const EDGE_TOKEN_MOUNT: &str = "/etc/chorus/edge-token";
const SIP_CREDENTIALS_MOUNT: &str = "/etc/chorus/sip-credentials";
const SIP_CA_MOUNT: &str = "/etc/chorus/sip-ca";

/// A scratch file for one test, in the directory Cargo gives integration tests; names carry
/// the test's name because tests run in parallel.
fn scratch_file(name: &str, contents: &str) -> Result<PathBuf> {
    chorus_tests::scratch_file(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart"),
        name,
        contents,
    )
}

/// `helm template chorus charts/chorus -n chorus-system --set ...` (must succeed).
fn helm_template(sets: &[&str]) -> Result<String> {
    let mut args = vec!["template", "chorus", CHART, "--namespace", "chorus-system"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = run_ok(&tool("helm")?, &args)?;
    String::from_utf8(output.stdout).context("helm template printed non-UTF-8")
}

/// The rendered objects, without the empty documents of disabled templates.
fn parse_stream(text: &str) -> Result<Vec<serde_yaml::Value>> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("rendered document {} is not YAML", index + 1))?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn kind(object: &serde_yaml::Value) -> &str {
    object["kind"].as_str().unwrap_or("")
}

fn find<'a>(objects: &'a [serde_yaml::Value], wanted: &str) -> Result<&'a serde_yaml::Value> {
    objects.iter().find(|o| kind(o) == wanted).with_context(|| {
        let kinds: Vec<&str> = objects.iter().map(kind).collect();
        format!("the chart rendered no {wanted}; it rendered {kinds:?}")
    })
}

/// `kubernetes-validate --strict` on a rendered stream: exit 0 and no error. Kinds it has no
/// schema for (the monitoring.coreos.com ones) only warn, and that is accepted; anything else it
/// must really have checked.
fn validate_strict(name: &str, rendered: &str, objects: &[serde_yaml::Value]) -> Result<()> {
    let file = scratch_file(name, rendered)?;
    let report = kubernetes_validate_strict(&file)
        .with_context(|| format!("the chart rendered with {name}"))?;
    for object in objects {
        let api_version = object["apiVersion"].as_str().unwrap_or("");
        let object_name = object["metadata"]["name"].as_str().unwrap_or("");
        let checked = format!(
            "passed for resource {}/{object_name}",
            kind(object).to_lowercase()
        );
        let unknown_kind = format!("Couldn't find schema for kind {}", kind(object));
        if api_version.starts_with("monitoring.coreos.com/") {
            ensure!(
                report.contains(&unknown_kind) || report.contains(&checked),
                "kubernetes-validate said nothing about {} {object_name}:\n{report}",
                kind(object)
            );
        } else {
            ensure!(
                report.contains(&checked),
                "kubernetes-validate did not validate {} {object_name}:\n{report}",
                kind(object)
            );
        }
    }
    Ok(())
}

/// The operator container's arguments in the rendered Deployment.
fn operator_args(objects: &[serde_yaml::Value]) -> Result<Vec<String>> {
    let deployment = find(objects, "Deployment")?;
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .context("the operator container has no args")?;
    Ok(args
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect())
}

/// The rendered Deployments of one component (`app.kubernetes.io/component`).
fn deployments<'a>(
    objects: &'a [serde_yaml::Value],
    component: &str,
) -> Vec<&'a serde_yaml::Value> {
    objects
        .iter()
        .filter(|o| {
            kind(o) == "Deployment"
                && o["metadata"]["labels"]["app.kubernetes.io/component"].as_str()
                    == Some(component)
        })
        .collect()
}

/// The values a container's `args` give `flag`, as `--flag=value` or as `--flag value`.
fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        if let Some(value) = arg
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            values.push(value);
        } else if arg == flag
            && let Some(value) = args.get(index + 1)
        {
            values.push(value.as_str());
        }
    }
    values
}

/// The edge bridge's container and pod spec in a render that enabled it.
fn edge_bridge_pod(objects: &[serde_yaml::Value]) -> Result<(&serde_yaml::Value, Vec<String>)> {
    let bridges = deployments(objects, "edge-bridge");
    ensure!(
        bridges.len() == 1,
        "expected one edge-bridge Deployment, the chart rendered {}",
        bridges.len()
    );
    let pod = &bridges[0]["spec"]["template"]["spec"];
    let args = pod["containers"][0]["args"]
        .as_sequence()
        .context("the edge bridge container has no args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    Ok((pod, args))
}

/// Whether `pod` mounts Secret `secret` read-only at `path`, projecting exactly `keys`.
fn mounts_secret(pod: &serde_yaml::Value, secret: &str, path: &str, keys: &[&str]) -> bool {
    let Some(mount) = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str() == Some(path))
    else {
        return false;
    };
    let Some(volume) = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
    else {
        return false;
    };
    let projected: Vec<&str> = volume["secret"]["items"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|item| item["key"].as_str())
        .collect();
    mount["readOnly"].as_bool() == Some(true)
        && volume["secret"]["secretName"].as_str() == Some(secret)
        && projected == keys
}

#[test]
fn helm_lint_passes() -> Result<()> {
    let helm = tool("helm")?;
    run_ok(&helm, ["lint", "--strict", CHART])?;
    let mut args = vec!["lint", "--strict", CHART];
    for set in NON_DEFAULT {
        args.extend(["--set", set]);
    }
    run_ok(&helm, &args)?;
    let mut args = vec!["lint", "--strict", CHART];
    for set in EDGE_BRIDGE {
        args.extend(["--set", set]);
    }
    run_ok(&helm, &args)?;
    Ok(())
}

#[test]
fn default_values_render_valid_objects() -> Result<()> {
    let rendered = helm_template(&[])?;
    let objects = parse_stream(&rendered)?;
    validate_strict("default.yaml", &rendered, &objects)?;

    for wanted in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "CustomResourceDefinition",
        "ConfigMap",
    ] {
        find(&objects, wanted)?;
    }
    for off in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        ensure!(
            objects.iter().all(|o| kind(o) != off),
            "{off} is rendered although monitoring is off by default"
        );
    }
    // The edge bridge is off by default: the operator is the only Deployment.
    ensure!(
        deployments(&objects, "edge-bridge").is_empty()
            && objects.iter().filter(|o| kind(o) == "Deployment").count() == 1,
        "the default values render an edge bridge Deployment"
    );
    // One replica: no leader election (it would only add Lease traffic).
    let args = operator_args(&objects)?;
    ensure!(
        !args.iter().any(|a| a == "--leader-elect"),
        "one replica, yet the operator runs with --leader-elect: {args:?}"
    );

    let deployment = find(&objects, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    ensure!(
        container["image"].as_str() == Some("ghcr.io/chorus-dev/chorus-operator:0.1.0"),
        "default image should be the appVersion tag, is {:?}",
        container["image"]
    );
    let security = &container["securityContext"];
    ensure!(
        security["readOnlyRootFilesystem"].as_bool() == Some(true)
            && security["runAsNonRoot"].as_bool() == Some(true)
            && security["allowPrivilegeEscalation"].as_bool() == Some(false)
            && security["capabilities"]["drop"][0].as_str() == Some("ALL")
            && security["seccompProfile"]["type"].as_str() == Some("RuntimeDefault"),
        "the operator container is not locked down: {}",
        serde_yaml::to_string(security)?
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        ensure!(
            container[probe]["httpGet"]["path"].as_str() == Some(path)
                && container[probe]["httpGet"]["port"].as_str() == Some("http"),
            "{probe} should GET {path} on port http: {:?}",
            container[probe]
        );
    }
    let env = serde_yaml::to_string(&container["env"])?;
    ensure!(
        env.contains("POD_NAME") && env.contains("metadata.name"),
        "POD_NAME must come from the downward API:\n{env}"
    );
    ensure!(
        env.contains("POD_NAMESPACE") && env.contains("metadata.namespace"),
        "POD_NAMESPACE must come from the downward API:\n{env}"
    );

    // Dashboards carry the Grafana sidecar's label.
    let dashboards: Vec<&serde_yaml::Value> =
        objects.iter().filter(|o| kind(o) == "ConfigMap").collect();
    ensure!(dashboards.len() == 2, "expected 2 dashboard ConfigMaps");
    for cm in dashboards {
        ensure!(
            cm["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1"),
            "dashboard ConfigMap {:?} lacks the label grafana_dashboard: \"1\"",
            cm["metadata"]["name"]
        );
    }
    Ok(())
}

#[test]
fn non_default_values_render_valid_objects() -> Result<()> {
    let rendered = helm_template(&NON_DEFAULT)?;
    let objects = parse_stream(&rendered)?;
    validate_strict("non-default.yaml", &rendered, &objects)?;

    for wanted in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        find(&objects, wanted)?;
    }
    ensure!(
        objects
            .iter()
            .all(|o| kind(o) != "CustomResourceDefinition"),
        "crds.install=false still renders the CRD"
    );
    let args = operator_args(&objects)?;
    ensure!(
        args.iter().any(|a| a == "--leader-elect"),
        "two replicas need --leader-elect, the operator gets {args:?}"
    );
    let deployment = find(&objects, "Deployment")?;
    ensure!(
        deployment["spec"]["replicas"].as_i64() == Some(2),
        "replicas=2 not rendered"
    );
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"].as_str();
    ensure!(
        image == Some("registry.example.com/chorus/operator:1.2.3-test"),
        "custom image not rendered: {image:?}"
    );

    // The PodMonitor finds the media servers the way the operator labels them.
    let pod_monitor = find(&objects, "PodMonitor")?;
    ensure!(
        pod_monitor["spec"]["selector"]["matchLabels"]["chorus.dev/scrape"].as_str()
            == Some("true"),
        "the PodMonitor must select chorus.dev/scrape: \"true\""
    );
    let endpoint = &pod_monitor["spec"]["podMetricsEndpoints"][0];
    ensure!(
        endpoint["port"].as_str() == Some("http"),
        "the PodMonitor must scrape port http"
    );
    let relabel = serde_yaml::to_string(&endpoint["relabelings"])?;
    ensure!(
        relabel.contains("__meta_kubernetes_pod_label_chorus_dev_region")
            && relabel.contains("targetLabel: region"),
        "the PodMonitor must copy chorus.dev/region to `region`:\n{relabel}"
    );
    Ok(())
}

#[test]
fn values_schema_rejects_unknown_keys() -> Result<()> {
    // Typos must fail the install, not be ignored: strictness at the top and in nested objects.
    for bad in [
        "replica=2",
        "monitoring.podMonitor.enable=true",
        "crds.instal=false",
        "edgeBridge.enable=true",
    ] {
        let output = run(&tool("helm")?, ["template", "chorus", CHART, "--set", bad])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("additional properties"),
            "helm template accepted --set {bad} ({}):\n{stderr}",
            output.status
        );
    }
    Ok(())
}

#[test]
fn edge_bridge_renders_valid_objects() -> Result<()> {
    let rendered = helm_template(&EDGE_BRIDGE)?;
    let objects = parse_stream(&rendered)?;
    validate_strict("edge-bridge.yaml", &rendered, &objects)?;
    ensure!(
        deployments(&objects, "operator").len() == 1,
        "enabling the edge bridge lost the operator Deployment"
    );

    let (pod, args) = edge_bridge_pod(&objects)?;
    ensure!(
        args.first().map(String::as_str) == Some("edge"),
        "the bridge must run `chorus-mediaserver edge`, its args are {args:?}"
    );
    for (flag, expected) in [
        (
            "--server",
            &[
                "https://media-0.conf.example",
                "https://media-1.conf.example:8443",
            ][..],
        ),
        ("--call-manager", &["sip:pbx.corp.example:5060"]),
        ("--sip-transport", &["udp"]),
        ("--token-file", &["/etc/chorus/edge-token/token"]),
        ("--credentials-dir", &[SIP_CREDENTIALS_MOUNT]),
        ("--ca-file", &["/etc/chorus/sip-ca/ca.crt"]),
        ("--sip-addr", &["0.0.0.0:5060"]),
        ("--rtp-ports", &["20000-20999"]),
        ("--register-expires", &["300"]),
    ] {
        ensure!(
            flag_values(&args, flag) == expected,
            "{flag} should be {expected:?} in the bridge's args {args:?}"
        );
    }
    // Each file a flag names lives in the Secret mounted there.
    for (secret, path, keys) in [
        ("branch-edge-token", EDGE_TOKEN_MOUNT, &["token"][..]),
        ("pbx", SIP_CREDENTIALS_MOUNT, &["username", "password"]),
        ("corp-ca", SIP_CA_MOUNT, &["ca.crt"]),
    ] {
        ensure!(
            mounts_secret(pod, secret, path, keys),
            "Secret {secret} ({keys:?}) must be mounted read-only at {path}:\n{}",
            serde_yaml::to_string(pod)?
        );
    }

    // Phones reach the node directly, and are told the node's address.
    ensure!(
        pod["hostNetwork"].as_bool() == Some(true)
            && pod["dnsPolicy"].as_str() == Some("ClusterFirstWithHostNet"),
        "the bridge must run on the host network with ClusterFirstWithHostNet DNS"
    );
    let container = &pod["containers"][0];
    let public = container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"].as_str() == Some("CHORUS_PUBLIC_ADDRESS"))
        .context("the bridge has no CHORUS_PUBLIC_ADDRESS")?;
    ensure!(
        public["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.hostIP"),
        "with no publicAddress, CHORUS_PUBLIC_ADDRESS must be the node's IP: {public:?}"
    );

    // The media-server image at the chart's appVersion, the one Conferences default to.
    let image = container["image"].as_str().unwrap_or("");
    ensure!(
        image == "ghcr.io/chorus-dev/chorus-mediaserver:0.1.0",
        "the bridge image should be the media server at the appVersion, is {image:?}"
    );
    ensure!(
        read_workspace_file(CRD_FILE)?.contains(&format!("image: {image}")),
        "the bridge image {image} is not the Conference's default spec.media.image ({CRD_FILE})"
    );
    let security = &container["securityContext"];
    ensure!(
        security["readOnlyRootFilesystem"].as_bool() == Some(true)
            && security["runAsNonRoot"].as_bool() == Some(true)
            && security["allowPrivilegeEscalation"].as_bool() == Some(false)
            && security["capabilities"]["drop"][0].as_str() == Some("ALL"),
        "the edge bridge container is not locked down: {}",
        serde_yaml::to_string(security)?
    );
    // No HTTP listener, so no probe to invent.
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        ensure!(
            container[probe].is_null(),
            "the bridge has no listener to probe, yet it has a {probe}"
        );
    }
    Ok(())
}

#[test]
fn edge_bridge_address_follows_the_network() -> Result<()> {
    // A fixed address is passed as is; without the CA Secret there is no CA file.
    let sets: Vec<&str> = EDGE_BRIDGE
        .iter()
        .copied()
        .filter(|s| !s.starts_with("edgeBridge.caSecret="))
        .chain(["edgeBridge.publicAddress=10.1.2.3"])
        .collect();
    let rendered = helm_template(&sets)?;
    let objects = parse_stream(&rendered)?;
    validate_strict("edge-bridge-address.yaml", &rendered, &objects)?;
    let (pod, args) = edge_bridge_pod(&objects)?;
    ensure!(
        flag_values(&args, "--ca-file").is_empty()
            && !mounts_secret(pod, "corp-ca", SIP_CA_MOUNT, &["ca.crt"]),
        "no caSecret, yet the bridge gets a CA: {args:?}"
    );
    let env = serde_yaml::to_string(&pod["containers"][0]["env"])?;
    ensure!(
        env.contains("CHORUS_PUBLIC_ADDRESS") && env.contains("value: 10.1.2.3"),
        "publicAddress=10.1.2.3 must reach CHORUS_PUBLIC_ADDRESS:\n{env}"
    );

    // Off the host network, the node's IP would be wrong: the pod's own is advertised.
    let sets: Vec<&str> = EDGE_BRIDGE
        .iter()
        .copied()
        .chain(["edgeBridge.hostNetwork=false"])
        .collect();
    let objects = parse_stream(&helm_template(&sets)?)?;
    let (pod, _) = edge_bridge_pod(&objects)?;
    let env = serde_yaml::to_string(&pod["containers"][0]["env"])?;
    ensure!(
        pod["hostNetwork"].is_null() && env.contains("status.podIP"),
        "hostNetwork=false must advertise the pod IP:\n{env}"
    );
    Ok(())
}

#[test]
fn edge_bridge_without_required_values_fails() -> Result<()> {
    let helm = tool("helm")?;
    for missing in ["servers", "callManager", "tokenSecret", "credentialsSecret"] {
        let mut args = vec!["template", "chorus", CHART];
        for set in EDGE_BRIDGE {
            if !set.starts_with(&format!("edgeBridge.{missing}=")) {
                args.extend(["--set", set]);
            }
        }
        let output = run(&helm, &args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = format!("edgeBridge.{missing} is required when edgeBridge.enabled is true");
        ensure!(
            !output.status.success() && stderr.contains(&message),
            "an edge bridge without {missing} must fail with {message:?} ({}):\n{stderr}",
            output.status
        );
    }
    // An RTP range the non-root bridge cannot bind is refused too.
    let mut args = vec!["template", "chorus", CHART];
    for set in EDGE_BRIDGE.iter().chain(&["edgeBridge.rtpPorts=500-600"]) {
        args.extend(["--set", set]);
    }
    let output = run(&helm, &args)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("edgeBridge.rtpPorts"),
        "rtpPorts 500-600 was accepted ({}):\n{stderr}",
        output.status
    );
    Ok(())
}

#[test]
fn chart_crd_is_the_generated_crd() -> Result<()> {
    let crd = read_workspace_file(CRD_FILE)?;
    let chart_crd = read_workspace_file(CHART_CRD_FILE).context("run `make crds`")?;
    let expected = format!("{{{{- if .Values.crds.install }}}}\n{crd}{{{{- end }}}}\n");
    ensure!(
        chart_crd == expected,
        "{CHART_CRD_FILE} is not {CRD_FILE} wrapped in `{{{{- if .Values.crds.install }}}}`; \
         run `make crds`"
    );
    // Uninstalling the chart must never delete every Conference with the CRD.
    ensure!(
        crd.contains("helm.sh/resource-policy: keep"),
        "{CRD_FILE} lost its helm.sh/resource-policy: keep annotation"
    );
    Ok(())
}

/// A Role rule: API groups, resources, verbs (resourceNames narrow it, so they are ignored: the
/// ClusterRole grants the whole kind).
fn rules(role: &serde_yaml::Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    role["rules"]
        .as_sequence()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        strings(&r["apiGroups"]),
                        strings(&r["resources"]),
                        strings(&r["verbs"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn grants(cluster_role: &serde_yaml::Value, group: &str, resource: &str, verb: &str) -> bool {
    rules(cluster_role)
        .iter()
        .any(|(groups, resources, verbs)| {
            groups.iter().any(|g| g == group)
                && resources.iter().any(|r| r == resource)
                && verbs.iter().any(|v| v == verb)
        })
}

#[test]
fn cluster_role_holds_what_the_operator_grants_and_uses() -> Result<()> {
    let objects = parse_stream(&helm_template(&[])?)?;
    let cluster_role = find(&objects, "ClusterRole")?;

    // RBAC escalation rule: the operator can only create Roles granting what it holds itself.
    let plan = run_ok(&operator_bin()?, ["plan", "-f", "examples/conference.yaml"])?;
    let planned = parse_stream(&String::from_utf8(plan.stdout)?)?;
    let roles: Vec<&serde_yaml::Value> = planned.iter().filter(|o| kind(o) == "Role").collect();
    ensure!(!roles.is_empty(), "the plan has no Role to compare with");
    for role in roles {
        for (groups, resources, verbs) in rules(role) {
            for group in &groups {
                for resource in &resources {
                    for verb in &verbs {
                        ensure!(
                            grants(cluster_role, group, resource, verb),
                            "the operator creates a Role granting {verb} on {resource} \
                             ({group:?}) but its ClusterRole lacks it, so the API server would \
                             refuse the Role (RBAC escalation)"
                        );
                    }
                }
            }
        }
    }
    // What the operator does itself (operator/src/reconcile.rs, controller.rs): server-side apply
    // of every planned kind.
    for object in &planned {
        let api_version = object["apiVersion"].as_str().unwrap_or("");
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let resource = match kind(object) {
            "Secret" => continue, // created, not applied; checked below
            "PodDisruptionBudget" => "poddisruptionbudgets".to_owned(),
            other => format!("{}s", other.to_lowercase()),
        };
        ensure!(
            grants(cluster_role, group, &resource, "patch"),
            "the operator applies {} but its ClusterRole cannot patch {resource}",
            kind(object)
        );
    }
    for (group, resource, verb) in [
        ("chorus.dev", "conferences", "watch"),
        ("chorus.dev", "conferences/status", "patch"),
        ("apps", "statefulsets", "watch"),
        ("apps", "statefulsets", "delete"),
        ("", "secrets", "create"),
        ("", "secrets", "get"),
        ("events.k8s.io", "events", "create"),
        ("coordination.k8s.io", "leases", "patch"),
    ] {
        ensure!(
            grants(cluster_role, group, resource, verb),
            "the ClusterRole lacks {verb} on {resource} ({group:?})"
        );
    }
    // Least privilege: the operator never lists Secrets, so it must not be able to.
    ensure!(
        !grants(cluster_role, "", "secrets", "list"),
        "the ClusterRole lets the operator list every Secret in the cluster"
    );
    Ok(())
}

/// The rendered PrometheusRule's `spec`, as a Prometheus rules file.
fn rules_file_text() -> Result<String> {
    let objects = parse_stream(&helm_template(&["monitoring.prometheusRule.enabled=true"])?)?;
    let rule = find(&objects, "PrometheusRule")?;
    Ok(serde_yaml::to_string(&rule["spec"])?)
}

/// promtool from PATH, or Debian's /usr/bin/promtool.
fn promtool() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file());
    on_path
        .or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file()))
        .context(
            "`promtool` is not installed (looked in PATH and /usr/bin); run `scripts/bootstrap`, \
             which installs the Debian package `prometheus`",
        )
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let file = scratch_file("chorus.rules.yaml", &rules_file_text()?)?;
    let output = run_ok(
        &promtool()?,
        [OsStr::new("check"), OsStr::new("rules"), file.as_os_str()],
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        stdout.contains("SUCCESS: 7 rules found"),
        "promtool check rules did not find the 7 alerts:\n{stdout}"
    );
    for alert in [
        "ChorusServerDelayHigh",
        "ChorusMeshLinkDown",
        "ChorusMeshConsistencyLow",
        "ChorusCallFailuresRising",
        "ChorusEdgeBridgeMissing",
        "ChorusEdgeLineUnregistered",
        "ChorusReconcileErrors",
    ] {
        ensure!(
            stdout.contains(alert) || std::fs::read_to_string(&file)?.contains(alert),
            "alert {alert} is missing"
        );
    }
    // And promtool bites: a broken expression is refused.
    let broken = scratch_file(
        "broken.rules.yaml",
        "groups:\n- name: x\n  rules:\n  - alert: Broken\n    expr: rate(chorus_mesh_ticks_total[5m] > 0\n",
    )?;
    let output = run(
        &promtool()?,
        [OsStr::new("check"), OsStr::new("rules"), broken.as_os_str()],
    )?;
    ensure!(
        !output.status.success(),
        "promtool accepted a rule with unbalanced parentheses"
    );
    Ok(())
}

/// Every `"chorus_..."` string literal in the metric sources: the names the code exports.
fn exported_metric_names() -> Result<BTreeSet<String>> {
    fn walk(dir: &Path, names: &mut BTreeSet<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, names)?;
            } else if path.extension() == Some(OsStr::new("rs")) {
                let text = std::fs::read_to_string(&path)?;
                // A literal is `"chorus_...` up to the next quote, made of name characters only.
                for (start, _) in text.match_indices("\"chorus_") {
                    let literal = &text[start + 1..];
                    let Some(end) = literal.find('"') else {
                        continue;
                    };
                    let name = &literal[..end];
                    if name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
        Ok(())
    }
    let mut names = BTreeSet::new();
    for dir in METRIC_SOURCES {
        walk(&workspace_root().join(dir), &mut names)?;
    }
    ensure!(
        names.contains("chorus_server_delay_seconds")
            && names.contains("chorus_operator_reconciles_total"),
        "found no metric definitions in {METRIC_SOURCES:?}: {names:?}"
    );
    Ok(names)
}

/// The `chorus_*` metric names an expression uses.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("chorus_") {
        // Part of a longer identifier (`xchorus_...`) is not a metric name.
        let preceded = rest[..start]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Whether `name` is exported: as is, or as a histogram's `_bucket`/`_sum`/`_count` series.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| exported.contains(base))
        })
}

/// Every PromQL expression of every dashboard: (file, panel title, expression), including the
/// template variables' queries.
fn dashboard_exprs() -> Result<Vec<(String, String, String)>> {
    let mut exprs = Vec::new();
    let dir = workspace_root().join(DASHBOARDS);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for path in files {
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{} is not JSON", path.display()))?;
        let panels = dashboard["panels"]
            .as_array()
            .with_context(|| format!("{file} has no panels"))?;
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            // A row only groups the panels below it.
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            ensure!(!targets.is_empty(), "{file}: panel {title:?} has no query");
            for target in targets {
                let expr = target["expr"].as_str().with_context(|| {
                    format!("{file}: panel {title:?} has a target without expr")
                })?;
                exprs.push((file.clone(), title.clone(), expr.to_owned()));
            }
        }
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(query) = variable["query"]["query"].as_str() {
                exprs.push((
                    file.clone(),
                    format!("variable {}", variable["name"]),
                    query.to_owned(),
                ));
            }
        }
    }
    Ok(exprs)
}

#[test]
fn every_dashboard_and_alert_metric_is_exported() -> Result<()> {
    let exported = exported_metric_names()?;
    // The checker bites: an unknown name and a suffix on a non-histogram base are refused.
    ensure!(!is_exported("chorus_made_up_total", &exported));
    ensure!(is_exported("chorus_server_delay_seconds_bucket", &exported));

    let mut queries = dashboard_exprs()?;
    ensure!(
        queries.iter().any(|(f, ..)| f == "media.json")
            && queries.iter().any(|(f, ..)| f == "operator.json"),
        "expected the media and operator dashboards in {DASHBOARDS}"
    );
    let rules: serde_yaml::Value = serde_yaml::from_str(&rules_file_text()?)?;
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let alert = rule["alert"].as_str().unwrap_or("?");
            let expr = rule["expr"].as_str().context("a rule without expr")?;
            queries.push(("PrometheusRule".into(), alert.into(), expr.into()));
        }
    }

    let mut unknown = Vec::new();
    for (file, title, expr) in &queries {
        let names = metric_names_in(expr);
        ensure!(
            !names.is_empty(),
            "{file}: {title:?} queries no chorus_ metric: {expr}"
        );
        for name in names {
            if !is_exported(&name, &exported) {
                unknown.push(format!("{file}: {title:?} uses {name}"));
            }
        }
    }
    if !unknown.is_empty() {
        bail!(
            "metric names that no code in {METRIC_SOURCES:?} exports:\n{}\nexported: {exported:?}",
            unknown.join("\n")
        );
    }
    Ok(())
}
