//! Prometheus metrics: counters and histograms recorded by the API, the engine and the daemon
//! port, rendered in the Prometheus text format (gauges of pool state are added at scrape time
//! from the engine's status).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Histogram bucket bounds, seconds.
const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    /// The configured pools: the only pool names that become label values.
    pools: std::collections::BTreeSet<String>,
}

/// The label value every caller-supplied name outside its known set folds into (an unknown
/// pool, an unknown gRPC method), so a caller cannot add series at will.
pub const UNKNOWN: &str = "unknown";

/// The registry; cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(l: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

/// Help texts of the metrics this module records.
const HELP: &[(&str, &str, &str)] = &[
    ("mpool_acquires_total", "counter", "Acquires by pool and outcome (hot, warm, cold, repeat, error)."),
    ("mpool_acquire_seconds", "histogram", "Time to serve an Acquire, by pool."),
    ("mpool_reset_seconds", "histogram", "Time to reset a VM after its lease, by pool."),
    ("mpool_daemon_call_seconds", "histogram", "multipassd call latency, by operation."),
    ("mpool_daemon_call_errors_total", "counter", "multipassd calls that failed, by operation."),
    ("mpool_grpc_errors_total", "counter", "API calls that ended with an error status, by method and code."),
    (
        "mpool_store_write_failures_total",
        "counter",
        "State store writes that failed (each fails its batch's requests; the store is then retried).",
    ),
];

impl Metrics {
    /// Adds to a counter.
    pub fn count(&self, name: &'static str, labels: Labels, by: u64) {
        if let Ok(mut i) = self.inner.lock() {
            *i.counters.entry((name, labels)).or_insert(0) += by;
        }
    }

    /// Observes a duration.
    pub fn observe(&self, name: &'static str, labels: Labels, d: Duration) {
        if let Ok(mut i) = self.inner.lock() {
            i.histograms.entry((name, labels)).or_default().observe(d.as_secs_f64());
        }
    }

    /// Declares the configured pools: [`Metrics::acquired`] records other pool names a caller
    /// sends as [`UNKNOWN`].
    pub fn set_pools<I: IntoIterator<Item = String>>(&self, pools: I) {
        if let Ok(mut i) = self.inner.lock() {
            i.pools = pools.into_iter().collect();
        }
    }

    /// `pool` if it is a configured pool, else [`UNKNOWN`].
    fn pool_label(&self, pool: &str) -> String {
        match self.inner.lock() {
            Ok(i) if i.pools.contains(pool) => pool.to_string(),
            _ => UNKNOWN.to_string(),
        }
    }

    /// An Acquire finished (`served` is None on error). `pool` is what the caller asked for:
    /// only configured pools become label values.
    pub fn acquired(&self, pool: &str, served: Option<mpool_core::pool::leases::Served>, took: Duration) {
        let pool = self.pool_label(pool);
        let outcome = match served {
            Some(s) => format!("{s:?}").to_lowercase(),
            None => "error".into(),
        };
        self.count("mpool_acquires_total", vec![("pool", pool.clone()), ("outcome", outcome)], 1);
        if served.is_some() {
            self.observe("mpool_acquire_seconds", vec![("pool", pool)], took);
        }
    }

    /// Renders everything in the Prometheus text format, followed by `extra` (gauges).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::new();
        let Ok(i) = self.inner.lock() else { return out };
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, l), v) in i.counters.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", labels(l, None));
            }
            for ((n, l), h) in i.histograms.iter().filter(|((n, _), _)| n == name) {
                for (b, c) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(out, "{n}_bucket{} {c}", labels(l, Some(("le", b.to_string()))));
                }
                let _ = writeln!(out, "{n}_bucket{} {}", labels(l, Some(("le", "+Inf".into()))), h.count);
                let _ = writeln!(out, "{n}_sum{} {}", labels(l, None), h.sum);
                let _ = writeln!(out, "{n}_count{} {}", labels(l, None), h.count);
            }
        }
        out.push_str(extra);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.count("mpool_grpc_errors_total", vec![("method", "Acquire".into()), ("code", "NotFound".into())], 2);
        m.observe("mpool_daemon_call_seconds", vec![("op", "start".into())], Duration::from_millis(3));
        let text = m.render("");
        assert!(text.contains("mpool_grpc_errors_total{method=\"Acquire\",code=\"NotFound\"} 2"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_bucket{op=\"start\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_bucket{op=\"start\",le=\"0.0025\"} 0"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_count{op=\"start\"} 1"), "{text}");
    }

    #[test]
    fn only_configured_pools_become_labels() {
        let m = Metrics::default();
        m.set_pools(["ci".to_string()]);
        m.acquired("ci", None, Duration::ZERO);
        for i in 0..100 {
            m.acquired(&format!("nope-{i}"), None, Duration::ZERO);
        }
        let text = m.render("");
        assert!(text.contains("mpool_acquires_total{pool=\"ci\",outcome=\"error\"} 1"), "{text}");
        assert!(text.contains("mpool_acquires_total{pool=\"unknown\",outcome=\"error\"} 100"), "{text}");
        assert!(!text.contains("nope"), "{text}");
    }
}
