//! The simulator's TLS and trust, as multipassd 1.16 does them: a root CA and a `localhost`
//! server certificate in the state dir (the root cert readable by clients), a client
//! certificate requested but not verified at the TLS layer, and a persisted store of trusted
//! client certificates checked on every call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use mpool_multipass::trust::ROOT_CERT_FILE;
use mpool_tls::{self as tls, TlsError};

/// The server's TLS material, created on first start and reused afterwards.
pub struct ServerCerts {
    /// Root CA certificate file (mode 0644).
    pub root_cert: PathBuf,
    cert_pem: String,
    key_pem: String,
}

impl ServerCerts {
    /// Loads `<state>/certificates/{localhost.pem, localhost_key.pem}` and the root cert, or
    /// creates them (the CA key is kept as `localhost_root_key.pem`, as 1.16 does).
    pub fn load_or_create(state_dir: &Path, server_name: &str) -> Result<ServerCerts, TlsError> {
        let dir = state_dir.join("certificates");
        let cert = dir.join(format!("{server_name}.pem"));
        let key = dir.join(format!("{server_name}_key.pem"));
        let root_cert = state_dir.join(ROOT_CERT_FILE);
        if !(cert.is_file() && key.is_file() && root_cert.is_file()) {
            let (ca, leaf) = tls::generate_ca_and_server(server_name)?;
            tls::write_private(&dir.join(format!("{server_name}_root_key.pem")), ca.key_pem.as_bytes())?;
            tls::write_with_mode(&root_cert, ca.cert_pem.as_bytes(), 0o644)?;
            tls::write_private(&key, leaf.key_pem.as_bytes())?;
            tls::write_with_mode(&cert, leaf.cert_pem.as_bytes(), 0o644)?;
        }
        let read_string = |p: &Path| -> Result<String, TlsError> {
            String::from_utf8(tls::read(p)?)
                .map_err(|e| TlsError::Pem { what: p.display().to_string(), detail: e.to_string() })
        };
        Ok(ServerCerts { root_cert, cert_pem: read_string(&cert)?, key_pem: read_string(&key)? })
    }

    /// A rustls server config: our chain, client certificates requested but accepted
    /// unverified (trust is decided per call), ALPN h2.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = tls::provider();
        let certs = tls::certs_from_pem("server certificate", self.cert_pem.as_bytes())?;
        let key = tls::key_from_pem("server key", self.key_pem.as_bytes())?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(RequestButDontVerify { sigs: tls::Signatures(provider) }))
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// `GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_BUT_DONT_VERIFY`: ask for a certificate, accept any
/// (or none), but still check that the client holds its key.
#[derive(Debug)]
struct RequestButDontVerify {
    sigs: mpool_tls::Signatures,
}

impl ClientCertVerifier for RequestButDontVerify {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.sigs.schemes()
    }
}

/// The trusted client certificates, persisted as concatenated PEMs in
/// `<state>/authenticated-certs/multipass_client_certs.pem`.
pub struct TrustStore {
    path: PathBuf,
    certs: Mutex<Vec<Vec<u8>>>,
}

impl TrustStore {
    /// Loads the store (empty when the file does not exist).
    pub fn load(state_dir: &Path) -> Result<TrustStore, TlsError> {
        let path = state_dir.join("authenticated-certs").join("multipass_client_certs.pem");
        let certs = if path.is_file() {
            let pem = tls::read(&path)?;
            if pem.iter().all(u8::is_ascii_whitespace) {
                Vec::new()
            } else {
                tls::certs_from_pem(&path.display().to_string(), &pem)?.into_iter().map(|c| c.to_vec()).collect()
            }
        } else {
            Vec::new()
        };
        Ok(TrustStore { path, certs: Mutex::new(certs) })
    }

    /// No client is trusted yet.
    pub fn is_empty(&self) -> bool {
        self.certs.lock().map(|c| c.is_empty()).unwrap_or(false)
    }

    /// This certificate (DER) is trusted.
    pub fn contains(&self, der: &[u8]) -> bool {
        self.certs.lock().map(|c| c.iter().any(|t| t == der)).unwrap_or(false)
    }

    /// Trusts a certificate and persists the store.
    pub fn add(&self, der: &[u8]) -> Result<(), TlsError> {
        let Ok(mut certs) = self.certs.lock() else {
            return Err(TlsError::Pem { what: "trust store".into(), detail: "poisoned lock".into() });
        };
        if certs.iter().any(|t| t == der) {
            return Ok(());
        }
        certs.push(der.to_vec());
        let mut pem = String::new();
        for c in certs.iter() {
            pem.push_str(&pem_encode(c));
        }
        tls::write_with_mode(&self.path, pem.as_bytes(), 0o600)
    }
}

/// Encodes DER as a PEM CERTIFICATE block.
fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = match chunk.len() {
            1 => (chunk[0] as u32) << 16,
            2 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8,
            _ => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32,
        };
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trips_through_pem() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::load(dir.path()).unwrap();
        assert!(store.is_empty());
        let pair = tls::generate_client_cert().unwrap();
        let der = tls::certs_from_pem("c", pair.cert_pem.as_bytes()).unwrap().remove(0);
        store.add(&der).unwrap();
        let again = TrustStore::load(dir.path()).unwrap();
        assert!(again.contains(&der));
        assert!(!again.is_empty());
    }
}
