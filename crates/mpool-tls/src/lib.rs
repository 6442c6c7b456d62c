//! rustls plumbing shared by the multipassd client and the simulator: the one crypto provider
//! (aws-lc-rs), PEM parsing, certificate generation and private-file writing.
//!
//! Nothing here decides *whom* to trust; that lives with the client (`multipass::trust`) and the
//! simulator (`sim::trust`).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of certificate and key handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{what}: {detail}")]
    Pem {
        /// What was being read.
        what: String,
        /// Why it is unusable.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The process's one crypto provider: aws-lc-rs. Always build configs with
/// `builder_with_provider(provider())`, never the global default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// All certificates in a PEM text.
pub fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { what: what.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what: what.into(), detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM text.
pub fn key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem { what: what.into(), detail: e.to_string() })
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

/// Writes a file readable only by its owner (mode 0600), creating parent directories.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a file with the given mode, creating parent directories. The file is written to a
/// temporary name first and renamed, so a reader never sees half a file.
pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| TlsError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    // A unique temporary name: concurrent writers of one file must not share it.
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err)?;
    f.write_all(contents).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)
}

/// The handshake-signature checks every certificate verifier must keep, even one that accepts
/// any certificate: they prove the peer holds the key of the certificate it shows.
#[derive(Debug)]
pub struct Signatures(pub Arc<CryptoProvider>);

impl Signatures {
    /// A TLS 1.2 handshake signature.
    pub fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    /// A TLS 1.3 handshake signature.
    pub fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    /// The schemes the provider verifies.
    pub fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
}

/// A random hex id, used as a certificate common name (Multipass uses a UUID).
fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A self-signed ECDSA P-256 client certificate shaped like the Multipass CLI's: CN a random id,
/// CA:FALSE.
pub fn generate_client_cert() -> Result<PemPair, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, random_id());
    params.is_ca = IsCa::ExplicitNoCa;
    Ok(PemPair { cert_pem: params.self_signed(&key)?.pem(), key_pem: key.serialize_pem() })
}

/// A root CA and a server certificate it signed for `server_name`, shaped like multipassd
/// 1.16's: "CN=Multipass Root CA" (CA:TRUE) signing an EC P-256 leaf with CN and SAN
/// `server_name`.
pub fn generate_ca_and_server(server_name: &str) -> Result<(PemPair, PemPair), TlsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CountryName, "US");
    ca_params.distinguished_name.push(DnType::OrganizationName, "Canonical");
    ca_params.distinguished_name.push(DnType::CommonName, "Multipass Root CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let ca_pair = PemPair { cert_pem: ca.pem(), key_pem: ca.key().serialize_pem() };

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![server_name.to_string()])?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CountryName, "US");
    leaf.distinguished_name.push(DnType::OrganizationName, "Canonical");
    leaf.distinguished_name.push(DnType::CommonName, server_name);
    leaf.is_ca = IsCa::ExplicitNoCa;
    let cert = leaf.signed_by(&leaf_key, &ca)?;
    Ok((ca_pair, PemPair { cert_pem: cert.pem(), key_pem: leaf_key.serialize_pem() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pairs_parse_back() {
        let client = generate_client_cert().unwrap();
        assert_eq!(certs_from_pem("client", client.cert_pem.as_bytes()).unwrap().len(), 1);
        key_from_pem("client key", client.key_pem.as_bytes()).unwrap();
        let (ca, leaf) = generate_ca_and_server("localhost").unwrap();
        assert_ne!(ca.cert_pem, leaf.cert_pem);
        assert!(certs_from_pem("ca", b"nothing here").is_err());
    }
}
