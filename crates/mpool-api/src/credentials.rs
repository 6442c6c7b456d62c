//! The API's credentials as they are now: the bearer tokens ([`LiveTokens`]) and the TLS
//! certificate ([`LiveCert`], a rustls certificate resolver), each swapped in place when
//! `mpool serve` reloads (SIGHUP, `mpool reload`). Every call checks the tokens of the moment
//! and every new TLS handshake presents the certificate of the moment; connections already
//! open keep the certificate they were made with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::auth::{Principal, Tokens};

/// The tokens file's entries, replaceable while serving.
#[derive(Debug, Default)]
pub struct LiveTokens(RwLock<Arc<Tokens>>);

impl LiveTokens {
    /// Holds `tokens`.
    pub fn new(tokens: Tokens) -> LiveTokens {
        LiveTokens(RwLock::new(Arc::new(tokens)))
    }

    /// The principal of a presented token, by the tokens of the moment.
    pub fn check(&self, token: &str) -> Option<Principal> {
        self.current().check(token)
    }

    /// The tokens of the moment.
    pub fn current(&self) -> Arc<Tokens> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the tokens (calls already authenticated keep their principal).
    pub fn replace(&self, tokens: Tokens) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tokens);
    }
}

/// The API's certificate and key, replaceable while serving.
#[derive(Debug)]
pub struct LiveCert(RwLock<Arc<CertifiedKey>>);

impl LiveCert {
    /// Loads `cert` (PEM chain) and `key` (PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<LiveCert, String> {
        Ok(LiveCert(RwLock::new(Arc::new(certified_key(cert, key)?))))
    }

    /// Reloads the files; on an error the certificate of the moment stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), String> {
        self.replace(certified_key(cert, key)?);
        Ok(())
    }

    /// Replaces the certificate (loaded with [`certified_key`]).
    pub fn replace(&self, fresh: CertifiedKey) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
    }

    /// The certificate of the moment.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("[api] {}: {e}", p.display()));
    let certs = mpool_tls::certs_from_pem(&cert.display().to_string(), &read(cert)?).map_err(|e| e.to_string())?;
    let der = mpool_tls::key_from_pem(&key.display().to_string(), &read(key)?).map_err(|e| e.to_string())?;
    let provider = mpool_tls::provider();
    let signing =
        provider.key_provider.load_private_key(der).map_err(|e| format!("[api] tls_key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!("[api] tls_cert {} and tls_key {} do not belong together: {e}", cert.display(), key.display())
    })?;
    Ok(certified)
}

/// A rustls server config presenting `cert`'s certificate of the moment, asking for client
/// certificates signed by `client_ca` when set, offering `alpn`.
pub fn server_config(
    cert: Arc<LiveCert>,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = mpool_tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[api] TLS: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| format!("[api] client_ca {}: {e}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in mpool_tls::certs_from_pem(&ca.display().to_string(), &pem).map_err(|e| e.to_string())? {
                roots.add(c).map_err(|e| format!("[api] client_ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("[api] client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (_, leaf) = mpool_tls::generate_ca_and_server("localhost").unwrap();
        let (c, k) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&c, &leaf.cert_pem).unwrap();
        std::fs::write(&k, &leaf.key_pem).unwrap();
        (c, k)
    }

    #[test]
    fn a_reload_swaps_the_certificate_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = write_pair(dir.path(), "a");
        let (c2, k2) = write_pair(dir.path(), "b");
        let live = LiveCert::load(&c1, &k1).unwrap();
        let first = live.current().cert[0].clone();
        live.reload(&c2, &k2).unwrap();
        let second = live.current().cert[0].clone();
        assert_ne!(first, second);
        let err = live.reload(&c1, &k2).unwrap_err();
        assert!(err.contains("do not belong together"), "{err}");
        assert_eq!(live.current().cert[0], second, "a failed reload keeps the certificate");
        let err = live.reload(&dir.path().join("missing.pem"), &k2).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
    }

    #[test]
    fn replaced_tokens_take_effect_at_once() {
        let (a, b) = (crate::auth::new_token(), crate::auth::new_token());
        let file = |t: &str, name: &str| {
            let h = crate::auth::hex(&crate::auth::hash(t));
            Tokens::parse(&format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{h}\"\npools = [\"*\"]\n")).unwrap()
        };
        let live = LiveTokens::new(file(&a, "a"));
        assert_eq!(live.check(&a).map(|p| p.name), Some("a".into()));
        live.replace(file(&b, "b"));
        assert!(live.check(&a).is_none(), "the old token is refused");
        assert_eq!(live.check(&b).map(|p| p.name), Some("b".into()));
    }
}
