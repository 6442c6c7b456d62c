//! How the client commands print what the server says: a lease as one line of JSON, an error
//! status as `Code: message`.

use mpool_api::proto::v1;

/// An error status as the commands report it, e.g. `NotFound: no such lease`.
pub fn status_err(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A lease as one line of JSON. `served` is there only when the server knows it (Acquire and
/// Renew answers); listings do not record how a lease was served.
pub fn lease_json(l: &v1::Lease) -> String {
    lease_value(l).to_string()
}

/// A lease as [`lease_json`] writes it, as a JSON value.
pub fn lease_value(l: &v1::Lease) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": l.id,
        "pool": l.pool,
        "vm": l.vm,
        "holder": l.holder,
        "requestId": l.request_id,
        "grantedAt": ts(&l.granted_at),
        "expiresAt": ts(&l.expires_at),
    });
    if let Ok(served) = v1::Served::try_from(l.served)
        && served != v1::Served::Unspecified
        && let Some(m) = v.as_object_mut()
    {
        m.insert("served".into(), served.as_str_name().into());
    }
    v
}

fn ts(t: &Option<mpool_api::proto::Timestamp>) -> String {
    t.as_ref().map(|t| t.to_string()).unwrap_or_default()
}
