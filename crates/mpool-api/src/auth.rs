//! Bearer tokens for TCP listeners: a tokens file of SHA-256 hashes, each with a name, the pools
//! it may use and whether it is an admin. The plaintext token never touches disk or logs.
//!
//! ```toml
//! [[tokens]]
//! name = "kestra"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! pools = ["ci"]        # or ["*"]
//! admin = false         # admins see every lease and pool
//! ```
//! `mpool token new --name kestra --pool ci` prints a fresh token and its line for the file.

use std::path::Path;

use serde::Deserialize;

mod layer;

pub use layer::{AuthLayer, Authenticated, grpc_refusal};

/// Who is calling (put into the request's extensions by [`AuthLayer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Token name: the owner of the leases it acquires.
    pub name: String,
    /// Pools it may use (`*`: all).
    pub pools: Vec<String>,
    /// Sees and manages everything.
    pub admin: bool,
}

impl Principal {
    /// May this principal use `pool`?
    pub fn may_use(&self, pool: &str) -> bool {
        self.admin || self.pools.iter().any(|p| p == "*" || p == pool)
    }

    /// The owner to check leases against: `None` for admins (they may touch any lease).
    pub fn owner(&self) -> Option<String> {
        if self.admin { None } else { Some(self.name.clone()) }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    pools: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// The loaded tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Principal)>,
}

/// SHA-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("mpool_{}", hex(&bytes))
}

impl Tokens {
    /// Loads a tokens file; errors name the file and the entry.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))
    }

    /// Parses the tokens file text.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            let digest = unhex(&t.sha256.to_ascii_lowercase()).ok_or_else(|| {
                format!("tokens[{i}] ({:?}).sha256: expected 64 hex digits (use `mpool token new`)", t.name)
            })?;
            if t.name.is_empty() {
                return Err(format!("tokens[{i}].name: empty"));
            }
            if t.pools.is_empty() && !t.admin {
                return Err(format!("tokens[{i}] ({:?}).pools: list the pools it may use, or [\"*\"]", t.name));
            }
            entries.push((digest, Principal { name: t.name, pools: t.pools, admin: t.admin }));
        }
        Ok(Tokens { entries })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal for a presented token (constant-time comparison of the hashes).
    pub fn check(&self, token: &str) -> Option<Principal> {
        let h = hash(token);
        let mut found = None;
        for (d, p) in &self.entries {
            if aws_lc_rs::constant_time::verify_slices_are_equal(d, &h).is_ok() {
                found = Some(p.clone());
            }
        }
        found
    }
}

/// How a listener authenticates callers.
#[derive(Clone, Debug)]
pub enum Auth {
    /// No checks (Unix socket: its file mode is the access control).
    Open,
    /// Bearer tokens (of the moment: a reload replaces them).
    Tokens(std::sync::Arc<crate::credentials::LiveTokens>),
    /// mTLS: the TLS layer already verified a client certificate; callers are admins.
    ClientCert,
}

/// Why a call was refused (UNAUTHENTICATED / HTTP 401): what the caller should send instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl Auth {
    /// The caller behind a request's headers, the one check of every transport (gRPC metadata
    /// are HTTP/2 headers): `None` on an open listener, the mTLS admin, or the principal of the
    /// `Authorization: Bearer` token; a missing or unknown token is refused.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Option<Principal>, Refused> {
        match self {
            Auth::Open => Ok(None),
            Auth::ClientCert => Ok(Some(Principal { name: "mtls".into(), pools: vec!["*".into()], admin: true })),
            Auth::Tokens(tokens) => {
                let header = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim);
                let token = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
                let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
                    return Err(Refused(
                        "missing token: send the metadata header `authorization: Bearer <token>` (grpcurl: -H 'authorization: Bearer ...')",
                    ));
                };
                tokens.check(token).map(Some).ok_or(Refused("invalid token: check it against the server's tokens file"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_by_hash_only() {
        let token = new_token();
        let text = format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{}\"\npools = [\"ci\"]\n", hex(&hash(&token)));
        let t = Tokens::parse(&text).unwrap();
        let p = t.check(&token).unwrap();
        assert_eq!(p.name, "ci");
        assert!(p.may_use("ci") && !p.may_use("other"));
        assert!(t.check("wrong").is_none());
        assert!(Tokens::parse("[[tokens]]\nname = \"x\"\nsha256 = \"abc\"\npools=[\"*\"]").is_err());
        assert!(Tokens::parse("[[tokens]]\nname = \"x\"\nsha256 = \"abc\"\nextra = 1").is_err());
    }

    #[test]
    fn a_bearer_token_names_the_principal() {
        let token = new_token();
        let text = format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{}\"\nadmin = true\n", hex(&hash(&token)));
        let auth =
            Auth::Tokens(std::sync::Arc::new(crate::credentials::LiveTokens::new(Tokens::parse(&text).unwrap())));
        let mut headers = http::HeaderMap::new();
        assert!(auth.authenticate(&headers).unwrap_err().0.starts_with("missing token"));
        headers.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(auth.authenticate(&headers).unwrap_err().0.starts_with("invalid token"));
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert!(auth.authenticate(&headers).unwrap().unwrap().admin);
        assert_eq!(Auth::Open.authenticate(&http::HeaderMap::new()), Ok(None));
        assert!(Auth::ClientCert.authenticate(&http::HeaderMap::new()).unwrap().unwrap().admin);
    }
}
