//! The local runtime's pure part: addresses, the local mesh plan and its generation, the server
//! command line, bot placement, and the files it writes (certificates chain to the CA, keys are
//! private). Nothing here starts a process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::names_mixing;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use chorus_crds::{Conference, MeshPlan};
use chorus_operator::local::layout::{self, LocalLayout, Ports};
use chorus_operator::local::{LocalConference, LocalOptions, bots, files, process};
use chorus_operator::manifests;
use chorus_operator::plan::{Plan, plan};
use x509_parser::extensions::GeneralName;

fn example() -> Conference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/conference.yaml");
    let text = std::fs::read_to_string(&path).expect("examples/conference.yaml");
    manifests::read_conference(&text, "default").expect("the example is a valid Conference")
}

fn conf(yaml: &str) -> Conference {
    manifests::read_conference(yaml, "default").expect("valid conference")
}

/// The example's ports (its `telephony.sipPort` is 5062, clear of a call manager on 5060).
fn ports() -> Ports {
    Ports {
        http: 8080,
        udp: 40000,
        mesh: 7000,
        sip: 5062,
    }
}

/// Where the example's Secret manifests are (`examples/pbx.yaml`).
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn local(conf: &Conference) -> (Plan, LocalLayout, MeshPlan) {
    let p = plan(conf).expect("plans");
    let l = layout::layout(conf, &p, ports(), None).expect("layout");
    let m = layout::local_mesh_plan(&p, &l, &HashMap::new(), None).expect("mesh plan");
    (p, l, m)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn each_region_gets_its_own_loopback_address_and_each_server_its_ports() {
    let c = example();
    let (_, l, _) = local(&c);
    assert_eq!(
        l.regions,
        vec![
            ("us-east".to_owned(), Ipv4Addr::new(127, 0, 0, 2)),
            ("eu-west".to_owned(), Ipv4Addr::new(127, 0, 0, 3)),
            ("ap-south".to_owned(), Ipv4Addr::new(127, 0, 0, 4)),
        ]
    );
    let got: Vec<(&str, u16, SocketAddr, SocketAddr, SocketAddr)> = l
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.ordinal, n.http, n.udp, n.mesh))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "townhall-us-east-0",
                0,
                addr("127.0.0.2:8080"),
                addr("127.0.0.2:40000"),
                addr("127.0.0.2:7000")
            ),
            (
                "townhall-us-east-1",
                1,
                addr("127.0.0.2:8081"),
                addr("127.0.0.2:40001"),
                addr("127.0.0.2:7001")
            ),
            (
                "townhall-eu-west-0",
                0,
                addr("127.0.0.3:8080"),
                addr("127.0.0.3:40000"),
                addr("127.0.0.3:7000")
            ),
            (
                "townhall-eu-west-1",
                1,
                addr("127.0.0.3:8081"),
                addr("127.0.0.3:40001"),
                addr("127.0.0.3:7001")
            ),
            (
                "townhall-ap-south-0",
                0,
                addr("127.0.0.4:8080"),
                addr("127.0.0.4:40000"),
                addr("127.0.0.4:7000")
            ),
        ]
    );
    // maxParticipantsPerServer defaults to 500 in the schema.
    assert!(l.nodes.iter().all(|n| n.max_participants == 500));
    // The defaults the command line uses: HTTP from the flag, media from the spec, mesh 7000.
    assert_eq!(Ports::for_conference(&c, 8080), ports());
}

#[test]
fn the_local_mesh_plan_is_the_cluster_plan_with_local_addresses() {
    let c = example();
    let (cluster, _, m) = local(&c);
    let ids = |p: &MeshPlan| -> Vec<(String, String)> {
        p.nodes
            .iter()
            .map(|n| (n.id.clone(), n.region.clone()))
            .collect()
    };
    assert_eq!(ids(&m), ids(&cluster.mesh));
    assert_eq!(m.conference, "townhall");
    assert_eq!(m.mixing, cluster.mesh.mixing);
    assert_eq!(m.transfer, cluster.mesh.transfer);
    assert_eq!(m.telephony, cluster.mesh.telephony);
    assert_eq!(m.generation, 1);
    let addrs: Vec<(&str, &str)> = m
        .nodes
        .iter()
        .map(|n| (n.mesh.as_str(), n.signal.as_str()))
        .collect();
    assert_eq!(
        addrs,
        vec![
            ("127.0.0.2:7000", "http://127.0.0.2:8080"),
            ("127.0.0.2:7001", "http://127.0.0.2:8081"),
            ("127.0.0.3:7000", "http://127.0.0.3:8080"),
            ("127.0.0.3:7001", "http://127.0.0.3:8081"),
            ("127.0.0.4:7000", "http://127.0.0.4:8080"),
        ]
    );
    // What the servers read back is the same plan, and valid.
    assert_eq!(MeshPlan::from_json(&m.to_json()), Ok(m.clone()));
}

#[test]
fn telephony_and_transfer_carry_over() {
    let c = conf(
        r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: { name: phones }
spec:
  regions: [ { name: us, replicas: 1, maxParticipantsPerServer: 7 } ]
  transfer: { enabled: false, tokenTtlSeconds: 30 }
  telephony:
    callManagerUri: "sip:pbx.example.com:5060"
    transport: tls
    codecs: [PCMU, opus]
    credentialsSecretRef: { name: pbx }
"#,
    );
    let (cluster, l, m) = local(&c);
    assert!(m.telephony.is_some());
    assert_eq!(m.telephony, cluster.mesh.telephony);
    // SIP from the base ports the test lays out with (`ports()`).
    assert_eq!(l.nodes[0].sip, Some(addr("127.0.0.2:5062")));
    assert!(!m.transfer.enabled);
    assert_eq!(m.transfer.token_ttl_seconds, 30);
    assert_eq!(l.nodes[0].max_participants, 7);
}

#[test]
fn the_generation_moves_exactly_when_the_digest_moves() {
    let c = example();
    let (p, l, first) = local(&c);
    let none = HashMap::new();

    // Same plan again: same generation.
    let again = layout::local_mesh_plan(&p, &l, &none, Some(&first)).unwrap();
    assert_eq!(again.generation, 1);
    assert_eq!(again, first);

    // A status carrying another generation in the cluster plan changes nothing locally.
    let mut with_status = c.clone();
    with_status.status = Some(chorus_crds::ConferenceStatus {
        mesh_generation: Some(41),
        ..Default::default()
    });
    let p41 = plan(&with_status).unwrap();
    assert_eq!(
        layout::local_mesh_plan(&p41, &l, &none, Some(&first))
            .unwrap()
            .generation,
        1
    );

    // Mixing changes: +1, and once more when it changes back (the digest moved again).
    let mut louder = c.clone();
    louder.spec.mixing.top_speakers = 5;
    let p5 = plan(&louder).unwrap();
    let second = layout::local_mesh_plan(&p5, &l, &none, Some(&first)).unwrap();
    assert_eq!(second.generation, 2);
    assert_eq!(second.mixing.top_speakers, 5);
    let third = layout::local_mesh_plan(&p, &l, &none, Some(&second)).unwrap();
    assert_eq!(third.generation, 3);
    assert_eq!(third.digest(), first.digest());

    // The generation helper alone.
    assert_eq!(layout::with_generation(first.clone(), None).generation, 1);
}

#[test]
fn an_override_changes_what_the_plan_advertises_not_what_the_server_binds() {
    let c = example();
    let (p, l, first) = local(&c);
    let proxy = addr("127.0.0.1:39999");
    let advertise = HashMap::from([("townhall-eu-west-1".to_owned(), proxy)]);
    let m = layout::local_mesh_plan(&p, &l, &advertise, Some(&first)).unwrap();
    let node = m
        .nodes
        .iter()
        .find(|n| n.id == "townhall-eu-west-1")
        .unwrap();
    assert_eq!(node.mesh, "127.0.0.1:39999");
    assert_eq!(node.signal, "http://127.0.0.3:8081");
    assert_eq!(
        l.node("townhall-eu-west-1").unwrap().mesh,
        addr("127.0.0.3:7001")
    );
    assert_eq!(m.generation, 2, "an advertised address is part of the mesh");
}

#[test]
fn a_live_update_keeps_every_region_on_its_address() {
    let c = example();
    let (_, before, _) = local(&c);

    // Drop the first region and add a new one at the end.
    let mut changed = c.clone();
    changed.spec.regions.remove(0);
    let mut extra = changed.spec.regions[0].clone();
    extra.name = "sa-east".into();
    extra.replicas = 1;
    extra.node_selector = None;
    changed.spec.regions.push(extra);
    changed.spec.regions[0].replicas = 3; // eu-west grows

    let p = plan(&changed).unwrap();
    let after = layout::layout(&changed, &p, ports(), Some(&before)).unwrap();
    assert_eq!(
        after.regions,
        vec![
            ("eu-west".to_owned(), Ipv4Addr::new(127, 0, 0, 3)),
            ("ap-south".to_owned(), Ipv4Addr::new(127, 0, 0, 4)),
            // The lowest free address, freed by us-east.
            ("sa-east".to_owned(), Ipv4Addr::new(127, 0, 0, 2)),
        ]
    );
    for node in &after.nodes {
        if let Some(old) = before.node(&node.id) {
            assert_eq!(old, node, "{} moved", node.id);
        }
    }
    assert_eq!(
        after.node("townhall-eu-west-2").unwrap().http,
        addr("127.0.0.3:8082")
    );

    // Without a previous layout the same spec is laid out in spec order.
    let fresh = layout::layout(&changed, &p, ports(), None).unwrap();
    assert_eq!(fresh.regions[0].1, Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(fresh.regions[2].1, Ipv4Addr::new(127, 0, 0, 4));
}

#[test]
fn ports_past_65535_are_a_layout_error() {
    let c = example();
    let p = plan(&c).unwrap();
    let err = layout::layout(
        &c,
        &p,
        Ports {
            http: 65535,
            udp: 40000,
            mesh: 7000,
            sip: 5060,
        },
        None,
    )
    .unwrap_err();
    assert_eq!(err.category(), "layout");
    assert!(err.to_string().contains("townhall-us-east-1"), "{err}");
}

#[test]
fn the_server_command_line_has_every_flag_and_no_mixing() {
    let c = example();
    let (_, l, _) = local(&c);
    let workdir = PathBuf::from("/w");
    let args: Vec<String> = process::serve_args(&l.nodes[1], "townhall", &workdir, None)
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
    let expected = [
        "serve",
        "--http-addr",
        "127.0.0.2:8081",
        "--udp-addr",
        "127.0.0.2:40001",
        "--public-address",
        "127.0.0.2",
        "--server-id",
        "townhall-us-east-1",
        "--region",
        "us-east",
        "--conference",
        "townhall",
        "--join-key-file",
        "/w/join.key",
        "--mesh-plan-file",
        "/w/mesh.json",
        "--mesh-addr",
        "127.0.0.2:7001",
        "--mesh-tls-dir",
        "/w/tls",
        "--max-participants",
        "500",
    ];
    assert_eq!(args, expected);
    // Mixing comes only from the mesh plan: no flag may give a server a second, stale source.
    // The check itself sees the spellings a flag or a variable would use.
    assert!(names_mixing("--top-speakers") && names_mixing("CHORUS_FRAME_MS"));
    for arg in &args {
        assert!(!names_mixing(arg), "{arg} names a mixing setting");
    }
}

#[test]
fn join_urls_escape_the_room() {
    let c = example();
    let (_, l, _) = local(&c);
    assert_eq!(
        layout::join_url(&l.nodes[2], "lobby", "a.b-c_d"),
        "http://127.0.0.3:8080/?room=lobby&token=a.b-c_d"
    );
    assert_eq!(
        layout::join_url(&l.nodes[0], "all hands&more", "t"),
        "http://127.0.0.2:8080/?room=all%20hands%26more&token=t"
    );
}

#[test]
fn bots_spread_over_regions_first_and_sound_different() {
    // Regions with 2, 2 and 1 servers (the example).
    let counts = [2, 2, 1];
    let placed: Vec<(usize, usize)> = (0..7)
        .map(|j| bots::placement(j, &counts).unwrap())
        .collect();
    assert_eq!(
        placed,
        vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 0), (0, 0)]
    );
    assert_eq!(bots::placement(0, &[]), None);

    let n = bots::distinct_voices();
    let voices: std::collections::BTreeSet<&str> = (0..n).map(bots::voice).collect();
    assert_eq!(voices.len(), n);
    let sentences: std::collections::BTreeSet<String> = (0..40).map(bots::sentence).collect();
    assert_eq!(sentences.len(), 40);
    assert_eq!(
        (0..4).map(bots::level_dbfs).collect::<Vec<_>>(),
        vec![-18, -21, -24, -27]
    );
    assert_eq!(bots::identity(0), "bot-1");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_workdir_holds_a_ca_certificates_that_chain_to_it_private_keys_and_the_plan() {
    let c = example();
    let (_, l, m) = local(&c);
    let dir = files::fresh_workdir("test").unwrap();
    files::prepare_workdir(&dir).unwrap();

    let ca = files::new_ca(&dir, "townhall").unwrap();
    for node in &l.nodes {
        files::issue_server_cert(&dir, &ca, node).unwrap();
    }
    let key_path = files::write_join_key(&dir).unwrap();
    let plan_path = files::write_mesh_plan(&dir, &m).unwrap();

    let ca_pem = std::fs::read(dir.join("tls/ca.crt")).unwrap();
    let (_, ca_der) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
    let ca_cert = ca_der.parse_x509().unwrap();
    assert!(ca_cert.is_ca());
    for node in &l.nodes {
        let pem = std::fs::read(dir.join(format!("tls/{}.crt", node.id))).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = der.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &sans.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                _ => {}
            }
        }
        // Peers verify a server by its id, as in a cluster; the IP is there for humans and tools.
        assert_eq!(dns, vec![node.id.clone()]);
        assert_eq!(ips, vec![node.ip.octets().to_vec()]);
        let key = std::fs::read_to_string(dir.join(format!("tls/{}.key", node.id))).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        #[cfg(unix)]
        assert_eq!(mode(&dir.join(format!("tls/{}.key", node.id))), 0o600);
    }
    // The CA's key never lands on disk: no server may sign certificates.
    assert!(!dir.join("tls/ca.key").exists());

    let join_key = std::fs::read_to_string(&key_path).unwrap();
    assert_eq!(join_key.len(), 44, "32 bytes in base64, no newline");
    #[cfg(unix)]
    {
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(&dir), 0o700);
    }
    let written = MeshPlan::from_json(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    assert_eq!(written, m);

    // Atomic rewrite leaves no temp files behind.
    let mut m2 = m.clone();
    m2.generation = 2;
    files::write_mesh_plan(&dir, &m2).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        MeshPlan::from_json(&std::fs::read_to_string(&plan_path).unwrap())
            .unwrap()
            .generation,
        2
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unsatisfiable_spec_is_refused_before_anything_starts() {
    let long = "a".repeat(40);
    let c = conf(&format!(
        r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: {{ name: {long} }}
spec:
  regions: [ {{ name: region-with-a-long-name, replicas: 1 }} ]
"#
    ));
    let options = LocalOptions {
        mediaserver_bin: Some(PathBuf::from("/nonexistent/chorus-mediaserver")),
        ..LocalOptions::default()
    };
    let err = LocalConference::start(&c, options).await.unwrap_err();
    assert_eq!(err.category(), "spec", "{err}");
    assert!(err.to_string().contains("NameTooLong"), "{err}");
}

#[tokio::test]
async fn a_missing_binary_says_how_to_build_it() {
    let options = LocalOptions {
        mediaserver_bin: Some(PathBuf::from("/nonexistent/chorus-mediaserver")),
        secrets_dir: Some(examples_dir()),
        ..LocalOptions::default()
    };
    let err = LocalConference::start(&example(), options)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "missing_binary", "{err}");
    assert!(
        err.to_string()
            .contains("cargo build -p chorus-mediaserver"),
        "{err}"
    );
}

#[tokio::test]
async fn an_override_for_an_unknown_server_is_refused() {
    let options = LocalOptions {
        mesh_addr_override: HashMap::from([("nobody".to_owned(), addr("127.0.0.1:1"))]),
        secrets_dir: Some(examples_dir()),
        ..LocalOptions::default()
    };
    let err = LocalConference::start(&example(), options)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "unknown_server", "{err}");
}

/// A conference that dials phones from its servers, with credentials and a CA Secret.
const PHONES: &str = r#"
apiVersion: chorus.dev/v1alpha1
kind: Conference
metadata: { name: phones }
spec:
  regions: [ { name: us, replicas: 2 }, { name: eu, replicas: 1 } ]
  telephony:
    callManagerUri: "sips:pbx.example.com:5061"
    transport: tls
    sipPort: 5070
    credentialsSecretRef: { name: pbx }
    caSecretRef: { name: pbx-ca }
"#;

fn secrets_dir(test: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("local-secrets")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

const PBX_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: { name: pbx }\n\
                          stringData: { username: chorus, password: chorus-secret }\n";
const CA_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: { name: pbx-ca }\ntype: Opaque\n\
                         data: { ca.crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg== }\n";

#[test]
fn servers_that_dial_phones_get_a_sip_port_each_and_the_secret_files() {
    let c = conf(PHONES);
    let p = plan(&c).unwrap();
    let l = layout::layout(&c, &p, Ports::for_conference(&c, 8080), None).unwrap();
    // Like every other port: the spec's sipPort plus the ordinal, on the region's address.
    let sips: Vec<Option<SocketAddr>> = l.nodes.iter().map(|n| n.sip).collect();
    assert_eq!(
        sips,
        vec![
            Some(addr("127.0.0.2:5070")),
            Some(addr("127.0.0.2:5071")),
            Some(addr("127.0.0.3:5070")),
        ]
    );

    let dir = secrets_dir(
        "args",
        &[("pbx.yaml", PBX_SECRET), ("pbx-ca.yaml", CA_SECRET)],
    );
    let secrets = chorus_operator::local::secrets::load_all(&p, &dir).unwrap();
    assert_eq!(
        secrets.keys().collect::<Vec<_>>(),
        vec!["pbx", "pbx-ca"],
        "exactly the Secrets the cluster plan checks"
    );
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let sip = files::write_sip_files(&work, c.spec.telephony.as_ref(), &secrets)
        .unwrap()
        .expect("server mode writes the SIP files");
    assert_eq!(sip.credentials_dir, work.join("sip-credentials"));
    assert_eq!(
        std::fs::read_to_string(work.join("sip-credentials/username")).unwrap(),
        "chorus"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("sip-credentials/password")).unwrap(),
        "chorus-secret"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("sip-ca.crt")).unwrap(),
        "-----BEGIN CERTIFICATE-----\n"
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&work.join("sip-credentials/username")), 0o600);
        assert_eq!(mode(&work.join("sip-credentials/password")), 0o600);
        assert_eq!(mode(&work.join("sip-credentials")), 0o700);
    }

    let args: Vec<String> = process::serve_args(&l.nodes[1], "phones", &work, Some(&sip))
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
    let tail = &args[args.len() - 6..];
    let credentials_dir = work.join("sip-credentials").display().to_string();
    let ca_file = work.join("sip-ca.crt").display().to_string();
    assert_eq!(
        tail,
        [
            "--sip-addr",
            "127.0.0.2:5071",
            "--sip-credentials-dir",
            credentials_dir.as_str(),
            "--sip-ca-file",
            ca_file.as_str(),
        ]
    );
    // The password is a file's content, never an argument (`ps` shows arguments to everyone).
    assert!(args.iter().all(|a| !a.contains("chorus-secret")));
    // Nor does a `{:?}` of the loaded Secret show it.
    assert!(!format!("{secrets:?}").contains("chorus-secret"));
}

#[test]
fn a_conference_without_phones_gets_no_sip_flags() {
    let mut c = example();
    c.spec.telephony = None;
    let (_, l, _) = local(&c);
    assert!(l.nodes.iter().all(|n| n.sip.is_none()));
    let args = process::serve_args(&l.nodes[0], "townhall", Path::new("/w"), None);
    assert!(args.iter().all(|a| !a.to_string_lossy().contains("sip")));
}

#[test]
fn secret_manifests_parse_from_string_data_and_base64_data() {
    use chorus_operator::local::secrets::LocalSecret;
    let path = Path::new("/s/pbx.yaml");
    let read = |text: &str| LocalSecret::parse(text, path, "pbx");

    let s = read(PBX_SECRET).unwrap();
    assert_eq!(s.value("password", "test").unwrap(), b"chorus-secret");

    // `chorus` and `chorus-secret` in base64, with the usual extra metadata.
    let s = read(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: pbx\n  namespace: x\n  labels: {a: b}\n\
         type: Opaque\ndata:\n  username: Y2hvcnVz\n  password: Y2hvcnVzLXNlY3JldA==\n",
    )
    .unwrap();
    assert_eq!(s.value("username", "test").unwrap(), b"chorus");
    assert_eq!(s.value("password", "test").unwrap(), b"chorus-secret");
    assert_eq!(s.keys().collect::<Vec<_>>(), vec!["password", "username"]);

    // Both: stringData wins, as the API server has it.
    let s = read(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: pbx}\ndata: {password: b2xk}\n\
         stringData: {password: new}\n",
    )
    .unwrap();
    assert_eq!(s.value("password", "test").unwrap(), b"new");

    let refused = |text: &str, says: &str| {
        let err = read(text).unwrap_err();
        assert_eq!(err.category(), "secret");
        let message = err.to_string();
        assert!(message.contains("/s/pbx.yaml"), "{message}");
        assert!(message.contains(says), "{says}: {message}");
        message
    };
    refused(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pbx}\ndata: {username: chorus}\n",
        "kind Secret",
    );
    refused(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: other}\nstringData: {username: chorus}\n",
        "metadata.name \"other\"",
    );
    // A bad base64 value is named by its key, and its text is not repeated.
    let message = refused(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: pbx}\ndata: {password: chorus-secret!}\n",
        "data.password is not base64",
    );
    assert!(!message.contains("chorus-secret"), "{message}");
    refused("apiVersion: v1\nkind: Secret\n: [\n", "not a YAML document");

    // A missing key names the file and the key.
    let s =
        read("apiVersion: v1\nkind: Secret\nmetadata: {name: pbx}\nstringData: {username: a}\n")
            .unwrap();
    let err = s.value("password", "the SIP credentials").unwrap_err();
    assert_eq!(err.category(), "secret");
    assert!(
        err.to_string().contains("/s/pbx.yaml") && err.to_string().contains("\"password\""),
        "{err}"
    );
}

#[test]
fn a_missing_secret_or_key_is_refused_naming_file_and_key() {
    let c = conf(PHONES);
    let p = plan(&c).unwrap();
    let dir = secrets_dir("missing", &[("pbx-ca.yaml", CA_SECRET)]);
    let err = chorus_operator::local::secrets::load_all(&p, &dir).unwrap_err();
    assert_eq!(err.category(), "secret");
    assert!(err.to_string().contains("pbx.yaml"), "{err}");

    let dir = secrets_dir(
        "missing-key",
        &[
            ("pbx-ca.yaml", CA_SECRET),
            (
                "pbx.yaml",
                "apiVersion: v1\nkind: Secret\nmetadata: {name: pbx}\nstringData: {username: a}\n",
            ),
        ],
    );
    let err = chorus_operator::local::secrets::load_all(&p, &dir).unwrap_err();
    assert!(
        err.to_string().contains("pbx.yaml") && err.to_string().contains("\"password\""),
        "{err}"
    );
}

#[tokio::test]
async fn local_mode_reads_secrets_before_it_starts_anything() {
    let c = conf(PHONES);
    let dir = secrets_dir("before-start", &[]);
    let options = LocalOptions {
        mediaserver_bin: Some(PathBuf::from("/nonexistent/chorus-mediaserver")),
        secrets_dir: Some(dir.clone()),
        ..LocalOptions::default()
    };
    let err = LocalConference::start(&c, options).await.unwrap_err();
    assert_eq!(err.category(), "secret", "{err}");
    assert!(
        err.to_string()
            .contains(&dir.join("pbx.yaml").display().to_string()),
        "{err}"
    );

    // Edge mode places calls from outside; local mode says so rather than run without phones.
    let edge = conf(
        "apiVersion: chorus.dev/v1alpha1\nkind: Conference\nmetadata: {name: e}\nspec:\n  \
         regions: [{name: us}]\n  telephony:\n    callManagerUri: sip:pbx\n    mode: edge\n    \
         edgeTokenSecretRef: {name: edge}\n",
    );
    let err = LocalConference::start(&edge, LocalOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.category(), "unsupported", "{err}");
}

#[test]
fn the_phone_example_plans_with_the_pbx_secret_beside_it() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join("conference-phone.yaml")).unwrap();
    let c = manifests::read_conference(&text, "default").unwrap();
    let p = plan(&c).unwrap();
    let secrets = chorus_operator::local::secrets::load_all(&p, &examples).unwrap();
    let pbx = &secrets["pbx"];
    assert_eq!(pbx.value("username", "test").unwrap(), b"chorus");
    assert_eq!(pbx.value("password", "test").unwrap(), b"chorus-secret");
    let t = p.mesh.telephony.as_ref().unwrap();
    assert_eq!(t.call_manager_uri, "sip:127.0.0.1:5060");
    assert_eq!(t.credentials_secret.as_deref(), Some("pbx"));
}
