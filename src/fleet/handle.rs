//! Lease handles: a lease id that carries its host, so `mpool exec` and `mpool release` know
//! where to go with nothing but what `mpool acquire` printed. A handle is
//! `LEASE_ID@ENDPOINT` with the endpoint in URL-safe base64 without padding: no `/`, `?`, `#`
//! or `%`, so it fits in a URL path segment as it is. A plain lease id (no `@`; mpool's ids
//! never have one) stays a plain lease id.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A lease id and, when it came as a handle, the endpoint of the host that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    /// The lease id the host knows.
    pub lease_id: String,
    /// The host's endpoint, when the handle carried one.
    pub endpoint: Option<String>,
}

/// The handle of lease `lease_id` held by the host at `endpoint`.
pub fn encode(lease_id: &str, endpoint: &str) -> String {
    format!("{lease_id}@{}", URL_SAFE_NO_PAD.encode(endpoint))
}

/// Reads a handle or a plain lease id; a handle whose endpoint part does not decode to an
/// endpoint is refused with what is wrong.
pub fn decode(s: &str) -> Result<Handle, String> {
    let Some((lease_id, host)) = s.rsplit_once('@') else {
        return Ok(Handle { lease_id: s.to_string(), endpoint: None });
    };
    let bad = |why: &str| format!("lease handle {s:?}: {why}; pass it as `mpool acquire` printed it");
    if lease_id.is_empty() {
        return Err(bad("no lease id before '@'"));
    }
    let endpoint = URL_SAFE_NO_PAD
        .decode(host)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("the part after '@' is not an encoded endpoint"))?;
    if !["unix:", "http://", "https://"].iter().any(|p| endpoint.starts_with(p)) {
        return Err(bad("the part after '@' is not an endpoint (unix:PATH or http(s)://HOST:PORT)"));
    }
    Ok(Handle { lease_id: lease_id.to_string(), endpoint: Some(endpoint) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_carries_its_endpoint_and_is_url_safe() {
        for ep in ["unix:/run/mpool/mpool.sock", "https://mp-2.lab:7443", "http://[::1]:7070/?#%"] {
            let h = encode("lease-abc123", ep);
            assert!(h.chars().all(|c| c.is_ascii_alphanumeric() || "-_@".contains(c)), "{h}");
            assert_eq!(decode(&h), Ok(Handle { lease_id: "lease-abc123".into(), endpoint: Some(ep.into()) }));
        }
    }

    #[test]
    fn plain_ids_stay_plain_and_bad_handles_are_refused() {
        assert_eq!(decode("lease-1"), Ok(Handle { lease_id: "lease-1".into(), endpoint: None }));
        assert!(decode("@aHR0cDovL3g").unwrap_err().contains("no lease id"));
        assert!(decode("lease-1@!!").unwrap_err().contains("not an encoded endpoint"));
        let not_endpoint = format!("lease-1@{}", URL_SAFE_NO_PAD.encode("ftp://x"));
        assert!(decode(&not_endpoint).unwrap_err().contains("not an endpoint"));
    }
}
