//! Who we are to the daemon (our client certificate) and how we check who the daemon is
//! (its root CA, a pinned leaf, or, only when asked, nothing).
//!
//! multipassd requests a client certificate but does not verify it at the TLS layer; trust is a
//! store of PEMs checked per call. We reuse the Multipass CLI's certificate when it is readable
//! (it is usually trusted already), else we generate our own ECDSA P-256 pair in mpool's data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::{DaemonAddress, Error};
use mpool_tls as tls;

/// Which client certificate to present.
#[derive(Clone, Debug, Default)]
pub enum ClientIdentity {
    /// The Multipass CLI's certificate if readable, else mpool's own (generated on first use).
    #[default]
    Auto,
    /// mpool's own certificate in its data dir (generated on first use).
    Own,
    /// These files.
    Files {
        /// Certificate PEM.
        cert: PathBuf,
        /// PKCS#8 key PEM.
        key: PathBuf,
    },
}

/// How to verify the daemon's certificate.
#[derive(Clone, Debug, Default)]
pub enum ServerVerification {
    /// A root CA from the known locations (1.16.1+ then 1.16.0, or beside the socket as the
    /// simulator writes it), else a pin of the daemon's readable `localhost.pem`, else an error.
    #[default]
    Auto,
    /// Verify the chain against this root certificate.
    RootCert(PathBuf),
    /// Accept exactly this leaf certificate.
    Pin(PathBuf),
    /// Accept any certificate (the handshake signatures are still checked). Off by default.
    InsecureSkipVerify,
}

/// Root CA locations of multipassd 1.16.1+ and 1.16.0 (snap and non-snap).
pub const ROOT_CERT_PATHS: &[&str] = &[
    "/var/snap/multipass/common/data/multipassd/multipass_root_cert.pem",
    "/usr/local/etc/multipassd/multipass_root_cert.pem",
    "/var/snap/multipass/common/data/multipassd/certificates/multipass_root_cert.pem",
    "/usr/local/share/ca-certificates/multipass_root_cert.pem",
];

/// The daemon's own server certificate (readable to root), used as a pin for <= 1.15 daemons.
pub const SERVER_CERT_PATHS: &[&str] = &[
    "/var/snap/multipass/common/data/multipassd/certificates/localhost.pem",
    "/root/.local/share/multipassd/certificates/localhost.pem",
];

/// The root certificate's file name; the simulator writes it beside its socket too.
pub const ROOT_CERT_FILE: &str = "multipass_root_cert.pem";

/// A certificate and key ready for rustls, and where they came from.
pub struct Identity {
    /// Certificate chain (one self-signed cert).
    pub certs: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// The certificate file, for messages.
    pub cert_path: PathBuf,
}

/// The Multipass CLI's certificate directories (snap, then non-snap) under `home`.
fn cli_cert_dirs(home: &Path) -> [PathBuf; 2] {
    [
        home.join("snap/multipass/current/data/multipass-client-certificate"),
        home.join(".local/share/multipass-client-certificate"),
    ]
}

/// Reads a passphrase file: its first line (a trailing newline or later lines are not part of
/// the secret). `what` names the option in the error.
pub fn read_passphrase_file(path: &Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Loads the identity to present, generating mpool's own under `data_dir` if needed.
pub fn load_identity(choice: &ClientIdentity, data_dir: &Path) -> Result<Identity, Error> {
    let load = |cert: &Path, key: &Path| -> Result<Identity, Error> {
        let tls_err = |e: tls::TlsError| Error::Tls(e.to_string());
        let certs =
            tls::certs_from_pem(&cert.display().to_string(), &tls::read(cert).map_err(tls_err)?).map_err(tls_err)?;
        let key_der =
            tls::key_from_pem(&key.display().to_string(), &tls::read(key).map_err(tls_err)?).map_err(tls_err)?;
        Ok(Identity { certs, key: key_der, cert_path: cert.to_path_buf() })
    };
    match choice {
        ClientIdentity::Files { cert, key } => load(cert, key),
        ClientIdentity::Auto => {
            if let Some(home) = std::env::var_os("HOME") {
                for dir in cli_cert_dirs(Path::new(&home)) {
                    let (cert, key) = (dir.join("multipass_cert.pem"), dir.join("multipass_cert_key.pem"));
                    if cert.is_file() && key.is_file() {
                        match load(&cert, &key) {
                            Ok(id) => return Ok(id),
                            Err(e) => tracing::debug!("not reusing the CLI certificate: {e}"),
                        }
                    }
                }
            }
            own_identity(data_dir, &load)
        }
        ClientIdentity::Own => own_identity(data_dir, &load),
    }
}

fn own_identity(data_dir: &Path, load: &dyn Fn(&Path, &Path) -> Result<Identity, Error>) -> Result<Identity, Error> {
    let (cert, key) = (data_dir.join("client-cert.pem"), data_dir.join("client-key.pem"));
    if !(cert.is_file() && key.is_file()) {
        let pair = tls::generate_client_cert().map_err(|e| Error::Tls(e.to_string()))?;
        tls::write_private(&key, pair.key_pem.as_bytes()).map_err(|e| Error::Tls(e.to_string()))?;
        tls::write_with_mode(&cert, pair.cert_pem.as_bytes(), 0o644).map_err(|e| Error::Tls(e.to_string()))?;
        tracing::info!(cert = %cert.display(), "generated mpool's client certificate");
    }
    load(&cert, &key)
}

/// Builds the server verifier for `address` according to `choice`.
pub fn server_verifier(
    choice: &ServerVerification,
    address: &DaemonAddress,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    let (verifier, _) = checked_server_verifier(choice, address, Arc::default())?;
    Ok(verifier)
}

/// Why the daemon's certificate last failed verification ("its certificate ... was checked
/// against ..."), shared between a client's verifier and its error paths.
pub type TrustFailureSlot = Arc<std::sync::Mutex<Option<String>>>;

/// [`server_verifier`] that also records, in `failures`, which certificate was checked against
/// what whenever verification fails; returns what it checks against, for messages.
pub fn checked_server_verifier(
    choice: &ServerVerification,
    address: &DaemonAddress,
    failures: TrustFailureSlot,
) -> Result<(Arc<dyn ServerCertVerifier>, String), Error> {
    let provider = tls::provider();
    let tls_err = |e: tls::TlsError| Error::Tls(e.to_string());
    let load = |path: &Path| -> Result<Vec<CertificateDer<'static>>, Error> {
        tls::certs_from_pem(&path.display().to_string(), &tls::read(path).map_err(tls_err)?).map_err(tls_err)
    };
    let root = |path: &Path| -> Result<(Arc<dyn ServerCertVerifier>, String), Error> {
        let certs = load(path)?;
        let against = format!(
            "the root certificate {} ({})",
            path.display(),
            certs.first().map(|c| fingerprint(c)).unwrap_or_default()
        );
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c).map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        }
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        Ok((v, against))
    };
    let pin = |path: &Path| -> Result<(Arc<dyn ServerCertVerifier>, String), Error> {
        let certs = load(path)?;
        let against = format!(
            "the pinned certificate {} ({})",
            path.display(),
            certs.first().map(|c| fingerprint(c)).unwrap_or_default()
        );
        let v: Arc<dyn ServerCertVerifier> =
            Arc::new(AnyOrPinned { pinned: certs.into_iter().next(), sigs: tls::Signatures(provider.clone()) });
        Ok((v, against))
    };
    let (inner, against) = match choice {
        ServerVerification::RootCert(p) => root(p)?,
        ServerVerification::Pin(p) => pin(p)?,
        ServerVerification::InsecureSkipVerify => (
            Arc::new(AnyOrPinned { pinned: None, sigs: tls::Signatures(provider.clone()) })
                as Arc<dyn ServerCertVerifier>,
            "nothing (--insecure-skip-verify)".to_string(),
        ),
        ServerVerification::Auto => {
            let mut candidates: Vec<PathBuf> = Vec::new();
            if let DaemonAddress::Unix(sock) = address
                && let Some(dir) = sock.parent()
            {
                candidates.push(dir.join(ROOT_CERT_FILE));
            }
            candidates.extend(ROOT_CERT_PATHS.iter().map(PathBuf::from));
            let mut found = None;
            for c in &candidates {
                if std::fs::File::open(c).is_ok() {
                    tracing::debug!(root = %c.display(), "verifying multipassd against its root CA");
                    found = Some(root(c)?);
                    break;
                }
            }
            if found.is_none() {
                for c in SERVER_CERT_PATHS {
                    if std::fs::File::open(c).is_ok() {
                        tracing::debug!(pin = c, "pinning multipassd's server certificate");
                        found = Some(pin(Path::new(c))?);
                        break;
                    }
                }
            }
            match found {
                Some(f) => f,
                None => {
                    let tried: Vec<String> = candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .chain(SERVER_CERT_PATHS.iter().map(|s| s.to_string()))
                        .collect();
                    return Err(Error::Tls(format!(
                        "cannot verify multipassd: no readable root certificate or server certificate (tried {}). \
                         Point mpool at the daemon's multipass_root_cert.pem (`--root-cert` / `[daemon] root_cert`), \
                         or, for a Multipass <= 1.15 daemon whose certificate you cannot read, set `insecure_skip_verify`",
                        tried.join(", ")
                    )));
                }
            }
        }
    };
    let verifier = Arc::new(Recording { inner, against: against.clone(), failures });
    Ok((verifier, against))
}

/// A certificate's SHA-256 fingerprint, `sha256:` and hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// What a certificate verification error means, in words.
fn certificate_problem(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "it is not signed by that certificate (UnknownIssuer)".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "it is not issued for the name mpool checks (`localhost` on a Unix socket, the host on TCP)".into()
            }
            C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
            C::ApplicationVerificationFailure => "it is not the pinned certificate".into(),
            C::BadSignature => {
                "it is not signed by that certificate's key (BadSignature: another CA of the same name, \
                 e.g. the daemon regenerated its root certificate)"
                    .into()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    }
}

/// Delegates verification and records each failure (which certificate, against what, why).
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ServerCertVerifier>,
    against: String,
    failures: TrustFailureSlot,
}

impl Recording {
    fn record(&self, what: Option<String>) {
        if let Ok(mut slot) = self.failures.lock() {
            *slot = what;
        }
    }
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => {
                self.record(None);
                Ok(v)
            }
            Err(e) => {
                self.record(Some(format!(
                    "its certificate ({}) was checked against {}: {}",
                    fingerprint(end_entity),
                    self.against,
                    certificate_problem(&e)
                )));
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the rustls client config: our identity, the verifier, ALPN h2 (multipassd's gRPC core
/// refuses the handshake without it).
pub fn client_config(identity: Identity, verifier: Arc<dyn ServerCertVerifier>) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.certs, identity.key)
        .map_err(|e| Error::Tls(format!("client certificate {}: {e}", identity.cert_path.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Accepts exactly the pinned leaf, or any leaf when none is pinned; the handshake signatures
/// are always checked, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AnyOrPinned {
    pinned: Option<CertificateDer<'static>>,
    sigs: mpool_tls::Signatures,
}

impl ServerCertVerifier for AnyOrPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pinned {
            Some(p) if p.as_ref() != end_entity.as_ref() => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
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
