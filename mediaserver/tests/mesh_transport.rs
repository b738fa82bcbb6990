//! The mesh transport over real QUIC on loopback, with certificates from a test CA made by rcgen
//! exactly as the operator makes them (ECDSA P-256, SANs = id and DNS name, EKU server + client).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_mediaserver::media::{AudioLevel, StreamId};
use chorus_mediaserver::mesh::transport::{ALPN, Frame};
use chorus_mediaserver::mesh::{
    ControlMessage, MediaDatagram, MeshInbound, MeshMetrics, MeshPeer, MeshTls, MeshTransport,
    TransportConfig,
};
use quinn::crypto::rustls::QuicClientConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// `(cert PEM, key PEM)` for server `id`.
fn issue(ca: &Ca, id: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec![id.to_owned(), format!("{id}.town-mesh.ns.svc")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn tls(ca: &Ca, id: &str) -> MeshTls {
    let (cert, key) = issue(ca, id);
    MeshTls::from_pem(ca.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
}

fn config() -> TransportConfig {
    TransportConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(300),
        handshake_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..TransportConfig::default()
    }
}

fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn peer(id: &str, addr: SocketAddr) -> MeshPeer {
    MeshPeer {
        id: id.into(),
        addr: addr.to_string(),
    }
}

struct Node {
    t: MeshTransport,
    inbound: MeshInbound,
}

fn start(
    id: &str,
    socket: UdpSocket,
    tls: &MeshTls,
    peers: Vec<MeshPeer>,
    metrics: Option<MeshMetrics>,
) -> Node {
    let (t, inbound) = MeshTransport::start(
        id,
        socket,
        tls,
        peers,
        config(),
        metrics,
        CancellationToken::new(),
    )
    .unwrap();
    Node { t, inbound }
}

async fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pred()
}

fn hb(n: u64) -> ControlMessage {
    ControlMessage::Heartbeat {
        sent_at_us: n,
        incarnation: 7,
        generation: 3,
    }
}

fn media(n: u16) -> MediaDatagram {
    MediaDatagram {
        room_hash: 42,
        stream: StreamId(9),
        seq: n,
        rtp_timestamp: u32::from(n) * 960,
        level: Some(AudioLevel {
            dbov: 20,
            voice: true,
        }),
        ingress_us: 1_700_000_000_000_000,
        payload: Bytes::from_static(b"\x78opus-frame"),
        backlog: false,
    }
}

async fn expect_control(node: &mut Node, from: &str, msg: &ControlMessage) {
    let (who, got) = timeout(Duration::from_secs(3), node.inbound.control.recv())
        .await
        .expect("control message arrives")
        .expect("channel open");
    assert_eq!(who, from);
    assert_eq!(&got, msg);
}

async fn expect_datagram(node: &mut Node, from: &str, d: &MediaDatagram) {
    let (who, got) = timeout(Duration::from_secs(3), node.inbound.datagrams.recv())
        .await
        .expect("datagram arrives")
        .expect("channel open");
    assert_eq!(who, from);
    assert_eq!(&MediaDatagram::decode(got).unwrap(), d);
}

fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for mf in registry.gather() {
        if mf.name() != name {
            continue;
        }
        for m in mf.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                let c = m.get_counter().get_value();
                let g = m.get_gauge().get_value();
                return Some(c.max(g));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_two_servers_exchange_control_and_datagrams_and_measure_rtt() {
    let ca = new_ca("test mesh CA");
    let (sa, sb) = (bind(), bind());
    let (addr_a, addr_b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let metrics = MeshMetrics::new();
    let registry = prometheus::Registry::new();
    metrics.register(&registry).unwrap();
    let mut a = start(
        "town-r-0",
        sa,
        &tls(&ca, "town-r-0"),
        vec![peer("town-r-1", addr_b)],
        Some(metrics.clone()),
    );
    let mut b = start(
        "town-r-1",
        sb,
        &tls(&ca, "town-r-1"),
        vec![peer("town-r-0", addr_a)],
        None,
    );
    assert!(
        wait_for(Duration::from_secs(5), || a.t.is_connected("town-r-1")
            && b.t.is_connected("town-r-0"))
        .await,
        "servers connect"
    );

    a.t.send_control("town-r-1", &hb(1)).unwrap();
    expect_control(&mut b, "town-r-0", &hb(1)).await;
    b.t.send_control("town-r-0", &hb(2)).unwrap();
    expect_control(&mut a, "town-r-1", &hb(2)).await;

    a.t.send_datagram("town-r-1", media(1).encode().unwrap())
        .unwrap();
    expect_datagram(&mut b, "town-r-0", &media(1)).await;
    b.t.send_datagram("town-r-0", media(2).encode().unwrap())
        .unwrap();
    expect_datagram(&mut a, "town-r-1", &media(2)).await;

    // RTT: quinn's and the app-level ping both measured, and exported.
    assert!(
        wait_for(Duration::from_secs(3), || a.t.peer_stats()[0]
            .app_rtt
            .is_some())
        .await,
        "app-level RTT measured"
    );
    let s = &a.t.peer_stats()[0];
    assert_eq!(s.peer, "town-r-1");
    assert!(s.connected);
    assert!(s.rtt.is_some_and(|r| r < Duration::from_secs(1)));
    assert!(s.app_rtt.is_some_and(|r| r < Duration::from_secs(1)));
    assert_eq!((s.datagrams_in, s.datagrams_out), (1, 1));
    assert!(s.control_in >= 1 && s.control_out >= 1);
    assert!(s.bytes_in > 0 && s.bytes_out > 0);
    let peer_label = [("peer", "town-r-1"), ("direction", "out")];
    assert_eq!(
        metric(&registry, "chorus_mesh_datagrams_total", &peer_label),
        Some(1.0)
    );
    assert!(metric(&registry, "chorus_mesh_bytes_total", &peer_label).unwrap() > 0.0);
    assert!(
        wait_for(Duration::from_secs(2), || metric(
            &registry,
            "chorus_mesh_rtt_seconds",
            &[("peer", "town-r-1")]
        )
        .is_some_and(|v| v > 0.0))
        .await
    );

    // Errors are clear: an unknown peer, an oversized datagram.
    assert_eq!(
        a.t.send_control("nobody", &hb(3)).unwrap_err().category(),
        "unknown_peer"
    );
    let big = Bytes::from(vec![0u8; 4000]);
    assert_eq!(
        a.t.send_datagram("town-r-1", big).unwrap_err().category(),
        "too_large"
    );
    a.t.shutdown().await;
    b.t.shutdown().await;
}

/// A raw QUIC client that tries to get in with the given trust and client certificate, claims
/// `claim` in its hello, sends a control frame and a datagram. Returns whether the server closed
/// the connection (or refused the handshake).
async fn intruder(
    target: SocketAddr,
    target_id: &str,
    trust_pem: &str,
    client_cert: Option<(String, String)>,
    claim: &str,
) -> bool {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trust_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(cfg).unwrap()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint.connect_with(client, target, target_id).unwrap();
    let conn = match timeout(Duration::from_secs(3), connecting).await {
        Ok(Ok(conn)) => conn,
        _ => return true, // refused during the handshake
    };
    if let Ok(Ok((mut send, _recv))) = timeout(Duration::from_secs(1), conn.open_bi()).await {
        let hello = Frame::Hello {
            server_id: claim.into(),
        }
        .encode()
        .unwrap();
        let _ = send.write_all(&hello).await;
        let _ = send
            .write_all(&Frame::Control(hb(666)).encode().unwrap())
            .await;
    }
    let _ = conn.send_datagram(media(666).encode().unwrap());
    let closed = timeout(Duration::from_secs(4), conn.closed()).await.is_ok();
    endpoint.close(0u32.into(), b"");
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_strangers_can_neither_connect_nor_inject() {
    let ca = new_ca("conference CA");
    let other = new_ca("some other CA");
    let sb = bind();
    let addr_b = sb.local_addr().unwrap();
    // b expects town-r-0 and town-r-2 as peers.
    let rogue_socket = bind();
    let rogue_addr = rogue_socket.local_addr().unwrap();
    let mut b = start(
        "town-r-1",
        sb,
        &tls(&ca, "town-r-1"),
        vec![peer("town-r-0", rogue_addr), peer("town-r-2", rogue_addr)],
        None,
    );

    // 1. A full transport with certificates of another CA, posing as town-r-0 (it dials b).
    let rogue_tls = tls(&other, "town-r-0");
    let rogue = start(
        "town-r-0",
        rogue_socket,
        &rogue_tls,
        vec![peer("town-r-1", addr_b)],
        None,
    );
    // A transport refuses to start with a certificate not issued by its own CA.
    let (c, k) = issue(&other, "town-r-0");
    let mixed = MeshTls::from_pem(ca.pem.as_bytes(), c.as_bytes(), k.as_bytes()).unwrap();
    let err = MeshTransport::start(
        "town-r-0",
        bind(),
        &mixed,
        vec![],
        config(),
        None,
        CancellationToken::new(),
    )
    .unwrap_err();
    assert_eq!(err.category(), "tls", "{err}");

    // 2. A raw client trusting the right CA but presenting another CA's client certificate.
    assert!(
        intruder(
            addr_b,
            "town-r-1",
            &ca.pem,
            Some(issue(&other, "town-r-0")),
            "town-r-0"
        )
        .await,
        "foreign client certificate must be refused"
    );
    // 3. No client certificate at all.
    assert!(
        intruder(addr_b, "town-r-1", &ca.pem, None, "town-r-0").await,
        "a client without certificate must be refused"
    );
    // 4. A genuine certificate of town-r-2 claiming to be town-r-0.
    assert!(
        intruder(
            addr_b,
            "town-r-1",
            &ca.pem,
            Some(issue(&ca, "town-r-2")),
            "town-r-0"
        )
        .await,
        "an impostor must be refused"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.t.is_connected("town-r-0"));
    assert!(!rogue.t.is_connected("town-r-1"));
    assert!(b.inbound.control.try_recv().is_err(), "no control got in");
    assert!(
        b.inbound.datagrams.try_recv().is_err(),
        "no datagram got in"
    );
    for s in b.t.peer_stats() {
        assert_eq!(
            (s.connects, s.datagrams_in, s.control_in),
            (0, 0, 0),
            "{s:?}"
        );
    }
    rogue.t.shutdown().await;
    b.t.shutdown().await;
}

async fn rebind(addr: SocketAddr) -> UdpSocket {
    for _ in 0..100 {
        if let Ok(s) = UdpSocket::bind(addr) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot rebind {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_reconnects_after_a_peer_restarts() {
    let ca = new_ca("test mesh CA");
    let (tls_a, tls_b) = (tls(&ca, "town-r-0"), tls(&ca, "town-r-1"));
    let (sa, sb) = (bind(), bind());
    let (addr_a, addr_b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = start("town-r-0", sa, &tls_a, vec![peer("town-r-1", addr_b)], None);
    let b = start("town-r-1", sb, &tls_b, vec![peer("town-r-0", addr_a)], None);
    assert!(
        wait_for(Duration::from_secs(5), || a.t.is_connected("town-r-1")
            && b.t.is_connected("town-r-0"))
        .await
    );

    // The accepting side restarts: the dialer notices and dials again with backoff.
    b.t.shutdown().await;
    drop(b);
    assert!(
        wait_for(Duration::from_secs(4), || !a.t.is_connected("town-r-1")).await,
        "the dialer notices the restart"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sb = rebind(addr_b).await;
    let mut b = start("town-r-1", sb, &tls_b, vec![peer("town-r-0", addr_a)], None);
    assert!(
        wait_for(Duration::from_secs(8), || a.t.is_connected("town-r-1")
            && b.t.is_connected("town-r-0"))
        .await,
        "reconnected after the acceptor restarted"
    );
    a.t.send_control("town-r-1", &hb(10)).unwrap();
    expect_control(&mut b, "town-r-0", &hb(10)).await;
    // At least one reconnect. Not exactly one: a dial that lands while the restarted acceptor is
    // still coming up can be dropped and redialed, which counts twice (seen once in CI).
    assert!(a.t.peer_stats()[0].connects >= 2, "{:?}", a.t.peer_stats());

    // The dialing side restarts: its new connection replaces the old one at the acceptor.
    a.t.shutdown().await;
    drop(a);
    let sa = rebind(addr_a).await;
    let mut a = start("town-r-0", sa, &tls_a, vec![peer("town-r-1", addr_b)], None);
    assert!(
        wait_for(Duration::from_secs(8), || a.t.is_connected("town-r-1")
            && b.t.is_connected("town-r-0")
            && b.t.peer_stats()[0].connects >= 2)
        .await,
        "reconnected after the dialer restarted"
    );
    b.t.send_control("town-r-0", &hb(11)).unwrap();
    expect_control(&mut a, "town-r-1", &hb(11)).await;
    b.t.send_datagram("town-r-0", media(3).encode().unwrap())
        .unwrap();
    expect_datagram(&mut a, "town-r-1", &media(3)).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}
