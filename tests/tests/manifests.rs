//! What Chorus hands to Kubernetes is valid Kubernetes: the generated CRD, the example
//! Conference, and every object `chorus-operator plan` would apply.
//!
//! These run the real `chorus-operator` binary and the real validators that `scripts/bootstrap`
//! installs (`kubernetes-validate --strict`, and `jsonschema` through
//! `tests/scripts/validate_against_crd.py` for custom resources, which `kubernetes-validate` only
//! warns about). Each validator also gets a deliberately broken input, so a validator that
//! silently accepts everything fails the suite instead of passing it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use chorus_crds::{MeshPlan, names};
use chorus_tests::{
    kubernetes_validate_strict, operator_bin, read_workspace_file, run, run_ok, tool,
    workspace_root,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde::Deserialize;

const CRD_FILE: &str = "crds/conference.yaml";
const EXAMPLE_FILE: &str = "examples/conference.yaml";
const CRD_VALIDATOR: &str = "tests/scripts/validate_against_crd.py";

/// The example's conference name and regions with their replicas, as examples/conference.yaml
/// says; the plan assertions below are written against them.
const CONFERENCE: &str = "townhall";
const REGIONS: [(&str, i32); 3] = [("us-east", 2), ("eu-west", 2), ("ap-south", 1)];

/// A scratch file for one test, in the directory Cargo gives integration tests; names carry
/// the test's name because tests run in parallel.
fn scratch_file(name: &str, contents: &str) -> Result<PathBuf> {
    chorus_tests::scratch_file(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("manifests"),
        name,
        contents,
    )
}

/// Runs the CRD-schema validator on `files`, against the checked-in CRD.
fn validate_against_crd(files: &[&Path]) -> Result<std::process::Output> {
    let mut args = vec![
        workspace_root().join(CRD_VALIDATOR),
        workspace_root().join(CRD_FILE),
    ];
    args.extend(files.iter().map(|f| f.to_path_buf()));
    run(&tool("python")?, &args)
}

/// Replaces the first `from` in `text`, failing when there is none, so an edit of the example
/// cannot quietly turn a negative test into a copy of the valid file.
fn break_example(example: &str, from: &str, to: &str) -> Result<String> {
    ensure!(
        example.contains(from),
        "{EXAMPLE_FILE} no longer contains {from:?}; update this test's broken variants"
    );
    Ok(example.replacen(from, to, 1))
}

#[test]
fn crd_yaml_matches_generator() -> Result<()> {
    let output = run_ok(&operator_bin()?, ["crd"])?;
    let generated =
        String::from_utf8(output.stdout).context("`chorus-operator crd` printed non-UTF-8")?;
    let committed = read_workspace_file(CRD_FILE).context("run `make crds` to generate it")?;
    if generated != committed {
        let line = generated
            .lines()
            .zip(committed.lines())
            .position(|(g, c)| g != c)
            .unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
        bail!(
            "{CRD_FILE} is not what `chorus-operator crd` generates (first difference at line {}):\n\
             \x20 generated: {:?}\n\
             \x20 {CRD_FILE}: {:?}\n\
             Run `make crds` to regenerate it.",
            line + 1,
            generated.lines().nth(line).unwrap_or("<end of output>"),
            committed.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
    Ok(())
}

#[test]
fn crd_passes_kubernetes_validate_strict() -> Result<()> {
    let report = kubernetes_validate_strict(&workspace_root().join(CRD_FILE))?;
    // kubernetes-validate only warns for kinds it has no schema for; a CRD must really be checked.
    ensure!(
        report.contains("passed for resource customresourcedefinition/conferences.chorus.dev"),
        "kubernetes-validate did not validate the CRD:\n{report}"
    );
    Ok(())
}

#[test]
fn kubernetes_validate_strict_rejects_unknown_fields() -> Result<()> {
    // Proves --strict bites, so the plan test below cannot pass on a validator that accepts all.
    let bad = scratch_file(
        "unknown-field-service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: townhall-mesh\nspec:\n  clusterIP: None\n  \
         clusterIp: None\n  ports:\n    - port: 7000\n",
    )?;
    let output = run(
        &tool("kubernetes-validate")?,
        [OsStr::new("--strict"), bad.as_os_str()],
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success() && stdout.contains("clusterIp"),
        "kubernetes-validate --strict accepted a Service with the unknown field clusterIp \
         ({}):\n{stdout}",
        output.status
    );
    Ok(())
}

#[test]
fn example_passes_kubernetes_validate_and_crd_schema() -> Result<()> {
    // kubernetes-validate has no schema for Conference and only warns; it still checks the YAML
    // and the object's envelope.
    kubernetes_validate_strict(&workspace_root().join(EXAMPLE_FILE))?;

    let output = validate_against_crd(&[&workspace_root().join(EXAMPLE_FILE)])?;
    ensure!(
        output.status.success(),
        "{EXAMPLE_FILE} does not match the CRD schema in {CRD_FILE}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn crd_schema_validator_rejects_bad_conferences() -> Result<()> {
    let example = read_workspace_file(EXAMPLE_FILE)?;
    // Each variant breaks one rule of the schema; the validator must name the field it broke.
    let variants = [
        (
            "top-speakers-out-of-range",
            "topSpeakers: 3",
            "topSpeakers: 99",
            "spec.mixing.topSpeakers",
        ),
        ("unknown-field", "  regions:", "  regionz:", "regionz"),
        (
            "exposure-not-in-enum",
            "exposure: HostPort",
            "exposure: Hostport",
            "spec.media.exposure",
        ),
        (
            "replicas-not-integer",
            "replicas: 2",
            "replicas: two",
            "spec.regions[0].replicas",
        ),
        (
            "bad-region-name",
            "name: us-east",
            "name: US_East",
            "spec.regions[0].name",
        ),
        (
            "frame-not-in-enum",
            "frameMs: 20",
            "frameMs: 30",
            "spec.mixing.frameMs",
        ),
    ];
    for (name, from, to, field) in variants {
        let broken = scratch_file(
            &format!("bad-{name}.yaml"),
            &break_example(&example, from, to)?,
        )?;
        let output = validate_against_crd(&[&broken])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(1) && stderr.contains(field),
            "the CRD schema validator should reject `{to}` (variant {name}) naming {field}, but it \
             exited {} with:\n{stderr}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(())
}

/// One document of the plan: its kind and name, and the document itself.
struct Object {
    kind: String,
    name: String,
    value: serde_yaml::Value,
}

fn parse_stream(text: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("plan document {} is not YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, key| v.get(*key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .with_context(|| format!("plan document {} has no {}", index + 1, path.join(".")))
        };
        objects.push(Object {
            kind: field(&["kind"])?,
            name: field(&["metadata", "name"])?,
            value,
        });
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Result<&'a Object> {
    objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .with_context(|| {
            let present: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .collect();
            format!(
                "the plan has no {kind} {name}; it has: {}",
                present.join(", ")
            )
        })
}

#[test]
fn plan_output_passes_kubernetes_validate_strict() -> Result<()> {
    let output = run_ok(&operator_bin()?, ["plan", "-f", EXAMPLE_FILE])?;
    let plan =
        String::from_utf8(output.stdout).context("`chorus-operator plan` printed non-UTF-8")?;
    let plan_file = scratch_file("plan-townhall.yaml", &plan)?;
    kubernetes_validate_strict(&plan_file)?;

    let objects = parse_stream(&plan)?;
    let mut kinds = BTreeMap::<&str, usize>::new();
    for object in &objects {
        *kinds.entry(object.kind.as_str()).or_default() += 1;
    }
    for kind in [
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    ] {
        ensure!(
            kinds.contains_key(kind),
            "the plan has no {kind}; it has {kinds:?}"
        );
    }

    // One StatefulSet per region, sized and placed as the example says.
    for (region, replicas) in REGIONS {
        let name = names::region_object(CONFERENCE, region);
        let sts: StatefulSet =
            serde_yaml::from_value(find(&objects, "StatefulSet", &name)?.value.clone())
                .with_context(|| format!("StatefulSet {name} does not parse as a StatefulSet"))?;
        let spec = sts
            .spec
            .with_context(|| format!("StatefulSet {name} has no spec"))?;
        ensure!(
            spec.replicas == Some(replicas),
            "StatefulSet {name} has replicas {:?}, the example asks for {replicas}",
            spec.replicas
        );
    }
    // ap-south names its nodes explicitly; the pod template must carry that label value (as a
    // nodeSelector or a node affinity: either places the pods in the right region).
    let ap_south = find(
        &objects,
        "StatefulSet",
        &names::region_object(CONFERENCE, "ap-south"),
    )?;
    let pod_spec = serde_yaml::to_string(&ap_south.value["spec"]["template"]["spec"])?;
    ensure!(
        pod_spec.contains("ap-south-1"),
        "StatefulSet townhall-ap-south does not select nodes of topology.kubernetes.io/region \
         ap-south-1:\n{pod_spec}"
    );

    // The headless Service that gives servers stable DNS names.
    let mesh = names::mesh_object(CONFERENCE);
    let service: Service = serde_yaml::from_value(find(&objects, "Service", &mesh)?.value.clone())?;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip);
    ensure!(
        cluster_ip.as_deref() == Some("None"),
        "Service {mesh} must be headless (clusterIP: None), has {cluster_ip:?}"
    );

    // The mesh plan the media servers read: a valid MeshPlan naming every server of the example.
    let config_map: ConfigMap =
        serde_yaml::from_value(find(&objects, "ConfigMap", &mesh)?.value.clone())?;
    let mesh_json = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(names::MESH_PLAN_KEY))
        .with_context(|| format!("ConfigMap {mesh} has no key {}", names::MESH_PLAN_KEY))?;
    let mesh_plan = MeshPlan::from_json(mesh_json)
        .with_context(|| format!("ConfigMap {mesh}: invalid mesh.json"))?;
    ensure!(
        mesh_plan.conference == CONFERENCE,
        "mesh.json names conference {}",
        mesh_plan.conference
    );
    for (region, replicas) in REGIONS {
        let ids: Vec<&str> = mesh_plan.nodes_in(region).map(|n| n.id.as_str()).collect();
        let expected: Vec<String> = (0..replicas as u32)
            .map(|ordinal| names::server_id(CONFERENCE, region, ordinal))
            .collect();
        ensure!(
            ids == expected,
            "mesh.json lists {ids:?} for region {region}, expected {expected:?}"
        );
    }
    Ok(())
}

#[test]
fn plan_rejects_invalid_spec() -> Result<()> {
    let example = read_workspace_file(EXAMPLE_FILE)?;
    let duplicate = break_example(&example, "name: eu-west", "name: us-east")?;
    let file = scratch_file("duplicate-regions.yaml", &duplicate)?;
    let output = run(
        &operator_bin()?,
        [OsStr::new("plan"), OsStr::new("-f"), file.as_os_str()],
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "`chorus-operator plan` accepted two regions named us-east:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    ensure!(
        stderr.contains("unique"),
        "`chorus-operator plan` refused duplicate region names without saying they must be unique:\n{stderr}"
    );
    // The operator reports bad specs; it never panics on them.
    ensure!(
        !stderr.contains("panicked"),
        "`chorus-operator plan` panicked:\n{stderr}"
    );
    Ok(())
}

const PHONE_EXAMPLE_FILE: &str = "examples/conference-phone.yaml";

#[test]
fn phone_example_matches_the_crd_and_plans_valid_objects() -> Result<()> {
    let example = workspace_root().join(PHONE_EXAMPLE_FILE);
    let output = validate_against_crd(&[&example])?;
    ensure!(
        output.status.success(),
        "{PHONE_EXAMPLE_FILE} does not match the CRD schema in {CRD_FILE}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Its Secret manifest is an ordinary, valid Secret.
    kubernetes_validate_strict(&workspace_root().join("examples/pbx.yaml"))?;
    // G.722 is gone from the schema: the validator refuses it.
    let text = read_workspace_file(PHONE_EXAMPLE_FILE)?;
    ensure!(
        text.contains("codecs: [opus, PCMU, PCMA]"),
        "{PHONE_EXAMPLE_FILE} no longer lists its codecs as this test expects"
    );
    let g722 = scratch_file(
        "bad-phone-g722.yaml",
        &text.replacen("codecs: [opus, PCMU, PCMA]", "codecs: [G722]", 1),
    )?;
    let output = validate_against_crd(&[&g722])?;
    ensure!(
        output.status.code() == Some(1)
            && String::from_utf8_lossy(&output.stderr).contains("spec.telephony.codecs"),
        "the CRD schema accepted codec G722:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = run_ok(&operator_bin()?, ["plan", "-f", PHONE_EXAMPLE_FILE])?;
    let plan =
        String::from_utf8(output.stdout).context("`chorus-operator plan` printed non-UTF-8")?;
    kubernetes_validate_strict(&scratch_file("plan-phones.yaml", &plan)?)?;
    // The mesh plan names the Secret and holds nothing of its content.
    let objects = parse_stream(&plan)?;
    let config_map: ConfigMap = serde_yaml::from_value(
        find(&objects, "ConfigMap", &names::mesh_object("phones"))?
            .value
            .clone(),
    )?;
    let mesh_json = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(names::MESH_PLAN_KEY))
        .context("the mesh ConfigMap has no mesh.json")?;
    let mesh_plan = MeshPlan::from_json(mesh_json)?;
    let telephony = mesh_plan
        .telephony
        .context("the phone example's plan has no telephony")?;
    ensure!(telephony.credentials_secret.as_deref() == Some("pbx"));
    ensure!(
        !plan.contains("chorus-secret"),
        "the plan carries the example's password"
    );
    Ok(())
}

const EDGE_EXAMPLE_FILE: &str = "examples/conference-edge.yaml";

#[test]
fn edge_example_matches_the_crd_and_mounts_only_the_edge_token() -> Result<()> {
    let example = workspace_root().join(EDGE_EXAMPLE_FILE);
    let output = validate_against_crd(&[&example])?;
    ensure!(
        output.status.success(),
        "{EDGE_EXAMPLE_FILE} does not match the CRD schema in {CRD_FILE}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    kubernetes_validate_strict(&workspace_root().join("examples/edge-token.yaml"))?;

    let output = run_ok(&operator_bin()?, ["plan", "-f", EDGE_EXAMPLE_FILE])?;
    let plan =
        String::from_utf8(output.stdout).context("`chorus-operator plan` printed non-UTF-8")?;
    kubernetes_validate_strict(&scratch_file("plan-edge.yaml", &plan)?)?;
    let objects = parse_stream(&plan)?;
    let config_map: ConfigMap = serde_yaml::from_value(
        find(&objects, "ConfigMap", &names::mesh_object("branch"))?
            .value
            .clone(),
    )?;
    let mesh_json = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(names::MESH_PLAN_KEY))
        .context("the mesh ConfigMap has no mesh.json")?;
    let telephony = MeshPlan::from_json(mesh_json)?
        .telephony
        .context("the edge example's plan has no telephony")?;
    ensure!(telephony.mode == chorus_crds::TelephonyMode::Edge);
    ensure!(
        telephony.credentials_secret.is_none(),
        "in edge mode the servers hold no SIP account"
    );
    // The servers get the edge token (to accept only it) and nothing of a SIP line.
    ensure!(
        plan.contains(names::env::EDGE_TOKEN_FILE) && plan.contains("branch-edge-token"),
        "the servers mount the edge token Secret"
    );
    ensure!(
        !plan.contains(names::env::SIP_CREDENTIALS_DIR),
        "the servers of an edge conference mount no SIP credentials"
    );
    Ok(())
}
