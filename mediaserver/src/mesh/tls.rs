//! A server's mesh TLS material ([`MeshTls`]) and the rustls configurations that make the mesh
//! mutually authenticated.
//!
//! Each server has `ca.crt` (the conference's mesh CA), its own `<id>.crt` and `<id>.key`
//! (ECDSA P-256, SANs = server id and DNS name, EKU server + client auth).
//! - The server side requires a client certificate chaining to the CA
//!   (`rustls::server::WebPkiClientVerifier`); a peer with no certificate or one from another CA
//!   fails the handshake, so it can neither send control messages nor get a datagram read.
//! - The client side verifies the peer's certificate against the CA with the peer's server id as
//!   the server name.
//! - A client certificate proves membership of the mesh, not which member: the accepting side
//!   learns who dialled from the `Hello` frame and checks with `verify_identity` (the same
//!   webpki check a client does) that the certificate is valid for that id, so one server cannot
//!   pose as another.
//! - TLS 1.3 only (QUIC), ring provider, ALPN [`ALPN`].
//!
//! Invariant: private keys never reach `Debug` output, logs or error messages.

use std::path::Path;
use std::sync::Arc;

use chorus_crds::names;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::error::MeshError;

/// ALPN protocol id of the mesh.
pub const ALPN: &[u8] = b"chorus-mesh/1";

/// A server's mesh TLS material: the CA, its certificate chain and its private key.
pub struct MeshTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for MeshTls {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl MeshTls {
    /// From PEM text: the CA certificate(s), this server's certificate chain, its private key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, MeshError> {
        let certs = |pem: &[u8], what: &str| -> Result<Vec<CertificateDer<'static>>, MeshError> {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MeshError::Tls(format!("{what} is not PEM certificates: {e}")))?;
            if v.is_empty() {
                return Err(MeshError::Tls(format!("{what} holds no certificate")));
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            // The parser's error names the PEM problem only, never key bytes.
            .map_err(|e| MeshError::Tls(format!("private key is not a PEM key: {e}")))?;
        Ok(Self {
            ca: certs(ca_pem, "the CA certificate")?,
            chain: certs(cert_pem, "the server certificate")?,
            key,
        })
    }

    /// From the mounted mesh TLS Secret: `dir/ca.crt`, `dir/<id>.crt`, `dir/<id>.key`.
    pub fn from_dir(dir: &Path, server_id: &str) -> Result<Self, MeshError> {
        let read = |name: String| {
            let path = dir.join(&name);
            std::fs::read(&path)
                .map_err(|e| MeshError::Io(format!("cannot read {}: {e}", path.display())))
        };
        Self::from_pem(
            &read(names::CA_CERT_KEY.to_owned())?,
            &read(names::server_cert_key(server_id))?,
            &read(names::server_key_key(server_id))?,
        )
    }
}

/// Check that `chain` is valid under the verifier's CA for server name `id`.
pub(super) fn verify_identity(
    verifier: &WebPkiServerVerifier,
    chain: &[CertificateDer<'static>],
    id: &str,
) -> Result<(), MeshError> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(MeshError::Tls("no certificate presented".into()));
    };
    let name = ServerName::try_from(id.to_owned())
        .map_err(|e| MeshError::tls(&format!("server id {id:?} is not a valid TLS name"), e))?;
    verifier
        .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            MeshError::tls(
                &format!("certificate is not valid for server {id:?} under the mesh CA"),
                e,
            )
        })
}

/// Both directions of mutual TLS for one server, plus the verifier the accepting side reuses to
/// check a dialer's claimed id.
pub(super) struct MutualTls {
    /// Accepting side: requires a client certificate under the mesh CA.
    pub(super) server: rustls::ServerConfig,
    /// Dialling side: presents this server's certificate, verifies the peer's under the CA.
    pub(super) client: rustls::ClientConfig,
    /// The CA's server-certificate verifier, for `verify_identity`.
    pub(super) verifier: Arc<WebPkiServerVerifier>,
}

impl MeshTls {
    /// The rustls configurations of server `self_id`. Fails if this server's own certificate is
    /// not valid for `self_id` under the CA, so a wrong Secret is caught at start, not by peers.
    pub(super) fn mutual_tls(&self, self_id: &str) -> Result<MutualTls, MeshError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(|e| MeshError::tls("the CA certificate is unusable", e))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| MeshError::tls("cannot build the peer verifier", e))?;
        // Fail early and clearly if our own certificate does not fit our id and CA.
        verify_identity(&verifier, &self.chain, self_id)?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| MeshError::tls("cannot build the client verifier", e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MeshError::tls("TLS 1.3 unavailable", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| MeshError::tls("server certificate or key unusable", e))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MeshError::tls("TLS 1.3 unavailable", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| MeshError::tls("client certificate or key unusable", e))?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(MutualTls {
            server,
            client,
            verifier,
        })
    }
}
