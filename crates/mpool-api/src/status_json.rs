//! Two HTTP/JSON routes of the facade ([`crate::json`]) about the server itself, which the status
//! page ([`crate::status_page`]) refreshes from; both need the same token as the other `GET`
//! routes, and both are plain functions any router can mount (the caller, in; a JSON value or
//! an [`AppError`] the router maps to its HTTP status, out).
//!
//! `GET /v1/health`: what `/healthz` says, in parts:
//! `{"status": "SERVING" | "NOT_SERVING", "daemon": {"ok": bool, "queuedCalls": n},
//! "store": {"ok": bool, "error": "why not, or empty"}, "reconciled": bool,
//! "isolation": {"state": "isolated" | "not isolated" | "unknown", "detail": "what the probe
//! found", "checkedAt": "<RFC 3339>" or null, "vm": "the VM it ran in"}, "host": "name",
//! "draining": bool, "leases": n, "empty": bool}` (`empty`: draining and no lease left).
//!
//! `GET /v1/history`: the last hour, one point per minute, of the acquire latency and the reset
//! duration of each pool the token may use (aggregates only: no holder, lease or owner):
//! `{"now": "<RFC 3339 minute>", "pools": [{"pool": "ci", "acquire": [POINT x 60],
//! "reset": [POINT x 60]}]}`, points oldest first, each
//! `{"minute": "<RFC 3339>", "count": n, "meanSeconds": x, "maxSeconds": x}` (`count` 0 and
//! both figures 0 in a minute without any).

use serde_json::{Value, json};

use mpool_metrics::history::Point;

use crate::app::{App, AppError};
use crate::auth::Principal;

/// A minute (minutes since the Unix epoch) as RFC 3339.
fn minute_json(minute: u64) -> Value {
    let seconds = i64::try_from(minute.saturating_mul(60)).unwrap_or(i64::MAX);
    Value::String(prost_types::Timestamp { seconds, nanos: 0 }.to_string())
}

fn point_json(p: &Point) -> Value {
    json!({
        "minute": minute_json(p.minute),
        "count": p.count,
        "meanSeconds": p.mean().unwrap_or(0.0),
        "maxSeconds": p.max,
    })
}

/// `GET /v1/health`.
pub async fn health(app: &App, p: Option<&Principal>) -> Result<Value, AppError> {
    let h = app.health(p).await?;
    Ok(json!({
        "status": if h.serving { "SERVING" } else { "NOT_SERVING" },
        "daemon": { "ok": h.daemon_ok, "queuedCalls": h.queued_daemon_calls },
        "store": { "ok": h.store_ok, "error": h.store_error.unwrap_or_default() },
        "reconciled": h.reconciled,
        "isolation": {
            "state": h.isolation.state.as_str(),
            "detail": h.isolation.detail,
            "checkedAt": (h.isolation.checked_ms > 0)
                .then(|| crate::convert::timestamp(h.isolation.checked_ms).to_string()),
            "vm": h.isolation.vm,
        },
        "host": h.host,
        "draining": h.draining,
        "leases": h.leases,
        "empty": h.draining && h.leases == 0,
    }))
}

/// `GET /v1/history`.
pub fn history(app: &App, p: Option<&Principal>) -> Value {
    let h = app.history(p);
    let pools: Vec<Value> = h
        .pools
        .iter()
        .map(|pool| {
            json!({
                "pool": pool.pool,
                "acquire": pool.acquire.iter().map(point_json).collect::<Vec<_>>(),
                "reset": pool.reset.iter().map(point_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "now": minute_json(h.now), "pools": pools })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_minutes_counts_and_seconds() {
        let p = Point { minute: 29_000_000, count: 4, sum: 2.0, max: 1.25 };
        let j = point_json(&p);
        assert_eq!(j["minute"], "2025-02-19T21:20:00Z");
        assert_eq!(
            (j["count"].as_u64(), j["meanSeconds"].as_f64(), j["maxSeconds"].as_f64()),
            (Some(4), Some(0.5), Some(1.25))
        );
        let empty = point_json(&Point { minute: 0, ..Point::default() });
        assert_eq!(empty, json!({"minute": "1970-01-01T00:00:00Z", "count": 0, "meanSeconds": 0.0, "maxSeconds": 0.0}));
    }
}
