//! Fresh secret material: the mesh CA, server certificates and the join-token key.
//!
//! This is the one place the operator makes randomness. It runs only when a Secret (or one server's
//! entry in the mesh TLS Secret) is absent, so existing material is never replaced by accident.
//!
//! Certificates are real X.509 (rcgen, ECDSA P-256): a self-signed CA, and per server a leaf with
//! both server and client auth usages, because mesh links are mutual TLS in both directions.

use std::collections::BTreeMap;

use base64::Engine;
use chorus_crds::names;
use k8s_openapi::ByteString;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::Error;
use crate::plan::ServerCert;

/// How long mesh certificates stay valid. Rotation is a deliberate act (delete the Secrets), so the
/// lifetime is long; the operator never rotates on its own.
const CERT_LIFETIME: Duration = Duration::days(3650);

/// A new mesh CA: `ca.crt` and `ca.key`.
pub fn new_mesh_ca(conference: &str) -> Result<BTreeMap<String, ByteString>, Error> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("chorus mesh CA for {conference}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params);
    let cert = params.self_signed(&key).map_err(cert_error)?;
    Ok(BTreeMap::from([
        (names::CA_CERT_KEY.to_owned(), bytes(cert.pem())),
        (names::CA_KEY_KEY.to_owned(), bytes(key.serialize_pem())),
    ]))
}

/// A CA loaded from its Secret, able to sign server certificates.
#[derive(Debug)]
pub struct MeshCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl MeshCa {
    /// Load the CA from the data of its Secret.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, Error> {
        let text = |key: &str| -> Result<String, Error> {
            let raw = data.get(key).ok_or_else(|| Error::SecretMaterial {
                message: format!("mesh CA Secret has no {key:?} key"),
            })?;
            String::from_utf8(raw.0.clone()).map_err(|_| Error::SecretMaterial {
                message: format!("mesh CA Secret key {key:?} is not PEM text"),
            })
        };
        let cert_pem = text(names::CA_CERT_KEY)?;
        let key = KeyPair::from_pem(&text(names::CA_KEY_KEY)?).map_err(cert_error)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_error)?;
        Ok(Self { cert_pem, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new certificate and key for one server: `<id>.crt` and `<id>.key`.
    pub fn issue(&self, server: &ServerCert) -> Result<BTreeMap<String, ByteString>, Error> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(server.dns_names.clone()).map_err(cert_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, server.id.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        Ok(BTreeMap::from([
            (names::server_cert_key(&server.id), bytes(cert.pem())),
            (
                names::server_key_key(&server.id),
                bytes(key.serialize_pem()),
            ),
        ]))
    }
}

/// A new join-token key: 32 random bytes, base64 text (so it can also be pasted into a config).
pub fn new_join_key() -> BTreeMap<String, ByteString> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let text = base64::engine::general_purpose::STANDARD.encode(raw);
    BTreeMap::from([(names::JOIN_KEY_KEY.to_owned(), bytes(text))])
}

fn set_validity(params: &mut CertificateParams) {
    // Backdate a little so a node with a slightly slow clock accepts a fresh certificate.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + CERT_LIFETIME;
}

fn bytes(s: String) -> ByteString {
    ByteString(s.into_bytes())
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::SecretMaterial {
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca() {
        let ca_data = new_mesh_ca("townhall").expect("CA");
        let ca = MeshCa::from_secret_data(&ca_data).expect("load CA");
        let server = ServerCert {
            id: "townhall-us-0".into(),
            dns_names: vec![
                "townhall-us-0".into(),
                "townhall-us-0.townhall-mesh.ns.svc".into(),
            ],
        };
        let leaf = ca.issue(&server).expect("issue");
        let pem = String::from_utf8(leaf["townhall-us-0.crt"].0.clone()).expect("utf8");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.contains_key("townhall-us-0.key"));

        // Parse both and check the leaf names the CA as issuer and carries the SANs.
        let (_, ca_der) = x509_parser::pem::parse_x509_pem(&ca_data["ca.crt"].0).expect("pem");
        let ca_cert = ca_der.parse_x509().expect("ca x509");
        let (_, leaf_der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        let leaf_cert = leaf_der.parse_x509().expect("leaf x509");
        assert_eq!(leaf_cert.issuer(), ca_cert.subject());
        assert!(ca_cert.is_ca());
        leaf_cert
            .verify_signature(Some(ca_cert.public_key()))
            .expect("leaf signed by the CA");
        let sans = leaf_cert
            .subject_alternative_name()
            .expect("ext")
            .expect("SAN present");
        assert_eq!(sans.value.general_names.len(), 2);
    }

    #[test]
    fn join_keys_are_random() {
        assert_ne!(new_join_key(), new_join_key());
        assert_eq!(new_join_key()["key"].0.len(), 44); // 32 bytes in base64
    }

    #[test]
    fn a_ca_secret_without_key_is_a_clear_error() {
        let mut data = new_mesh_ca("x").expect("CA");
        data.remove("ca.key");
        let err = MeshCa::from_secret_data(&data).expect_err("missing key");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
