//! Prometheus metrics with the Prometheus project's Rust client (`prometheus-client`): the
//! counters and histograms the API, the engine and the daemon port record, plus gauges of pool
//! state made at scrape time from the engine's status, encoded in the Prometheus
//! text format 0.0.4 ([`CONTENT_TYPE`]).
//!
//! Every label value comes from a bounded set, so no caller can add series at will: pool names a
//! caller sends fold into [`UNKNOWN`] unless they are configured ([`Metrics::set_pools`]), the
//! API folds gRPC methods it does not serve into [`UNKNOWN`] before they get here, status codes
//! are the 17 gRPC codes, daemon operations and acquire outcomes are names in the code, VM
//! states are the engine's. No exemplars.
//!
//! Exported: counters `mpool_acquires_total{pool,outcome}`,
//! `mpool_daemon_call_errors_total{op}`, `mpool_grpc_errors_total{method,code}`,
//! `mpool_store_write_failures_total`; histograms `mpool_acquire_seconds{pool}`,
//! `mpool_reset_seconds{pool}`, `mpool_daemon_call_seconds{op}`; gauges `mpool_vms{pool,state}`,
//! `mpool_leases{pool}`, `mpool_waiters{pool}`, `mpool_daemon_up`, `mpool_daemon_queue`,
//! `mpool_store_up`. (prometheus-client appends `_total` to a counter's registered name.)
//! Metrics made for a host ([`Metrics::for_host`], as `mpool serve` makes them) carry a
//! `host` label on every series, so one Prometheus scraping several hosts tells them apart.
//! `mpool_store_up`, `mpool_pool_held_back{pool}`, `mpool_pool_disk_used_bytes{pool}`, `mpool_host_disk_free_bytes`, `mpool_host_disk_total_bytes`,
//! `mpool_host_cpus`, `mpool_host_memory_bytes` (once known). (prometheus-client appends `_total` to a counter's registered name.)
//!
//! Besides, the last hour of acquire latency and reset duration per pool and minute
//! ([`history`], [`Metrics::history`]), for the status page's charts.

mod gauges;
pub mod history;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mpool_core::pool::leases::Served;
use mpool_core::pool::status::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use history::{Clock, History, HistorySnapshot};

/// The label value every caller-supplied name outside its known set folds into (an unknown
/// pool, an unknown gRPC method), so a caller cannot add series at will.
pub const UNKNOWN: &str = "unknown";

/// The `Content-Type` of [`Metrics::render`]'s text: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Histogram bucket bounds, seconds.
const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The `outcome` label values of `mpool_acquires_total`: how an Acquire was served, or `error`.
const OUTCOMES: [&str; 5] = ["hot", "warm", "cold", "repeat", "error"];

/// The gRPC status codes by number, named as tonic's `Code` prints them.
const GRPC_CODES: [&str; 17] = [
    "Ok",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcquireLabels {
    pool: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: &'static str,
}

/// A histogram with [`BUCKETS`].
fn seconds() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The registry and a handle on each metric in it.
#[derive(Debug)]
struct Inner {
    registry: Registry,
    acquires: Family<AcquireLabels, Counter>,
    acquire_seconds: Histograms<PoolLabels>,
    reset_seconds: Histograms<PoolLabels>,
    daemon_call_seconds: Histograms<OpLabels>,
    daemon_call_errors: Family<OpLabels, Counter>,
    grpc_errors: Family<GrpcLabels, Counter>,
    store_write_failures: Counter,
    /// The configured pools: the only pool names a caller sends that become label values.
    pools: RwLock<BTreeSet<String>>,
    /// The last hour of `acquire_seconds` and `reset_seconds`, per minute.
    history: History,
    /// The `host` label every series carries, if any.
    host: Option<String>,
}

/// The metrics of one `mpool serve`; cheap to clone (clones share the registry).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::with_clock(Arc::new(std::time::SystemTime::now))
    }
}

/// A registry whose series all carry `host="<host>"` (no label without a host).
fn registry_for(host: Option<&str>) -> Registry {
    let labels = host.map(|h| (Cow::Borrowed("host"), Cow::Owned(h.to_string())));
    Registry::with_labels(labels.into_iter())
}

impl Metrics {
    /// Metrics whose [`Metrics::history`] reads the time from `clock` (tests move it;
    /// [`Metrics::default`] uses the system's wall clock).
    pub fn with_clock(clock: Clock) -> Metrics {
        Metrics::build(None, clock)
    }

    /// Metrics of the host named `host`: every series carries the label `host="<host>"`.
    pub fn for_host(host: &str) -> Metrics {
        Metrics::build(Some(host.to_string()), Arc::new(std::time::SystemTime::now))
    }

    fn build(host: Option<String>, clock: Clock) -> Metrics {
        let mut registry = registry_for(host.as_deref());
        let acquires = Family::default();
        let acquire_seconds = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let reset_seconds = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let daemon_call_seconds = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let daemon_call_errors = Family::default();
        let grpc_errors = Family::default();
        let store_write_failures = Counter::default();
        // Counters are registered without `_total`: the encoder appends it. Help texts get a
        // final period from the registry.
        registry.register(
            "mpool_acquires",
            "Acquires by pool and outcome (hot, warm, cold, repeat, error)",
            acquires.clone(),
        );
        registry.register("mpool_acquire_seconds", "Time to serve an Acquire, by pool", acquire_seconds.clone());
        registry.register("mpool_reset_seconds", "Time to reset a VM after its lease, by pool", reset_seconds.clone());
        registry.register(
            "mpool_daemon_call_seconds",
            "multipassd call latency, by operation",
            daemon_call_seconds.clone(),
        );
        registry.register(
            "mpool_daemon_call_errors",
            "multipassd calls that failed, by operation",
            daemon_call_errors.clone(),
        );
        registry.register(
            "mpool_grpc_errors",
            "API calls that ended with an error status, by method and code",
            grpc_errors.clone(),
        );
        registry.register(
            "mpool_store_write_failures",
            "State store writes that failed (each fails its batch's requests; the store is then retried)",
            store_write_failures.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                acquires,
                acquire_seconds,
                reset_seconds,
                daemon_call_seconds,
                daemon_call_errors,
                grpc_errors,
                store_write_failures,
                pools: RwLock::default(),
                history: History::new(clock),
                host,
            }),
        }
    }

    /// Declares the configured pools: [`Metrics::acquired`] records other pool names a caller
    /// sends as [`UNKNOWN`]. Each pool's acquire counters (every outcome) and its acquire and
    /// reset histograms start at zero, so they are there before the first acquire (a counter
    /// that appears only at its first increment hides that increment from `rate()`).
    pub fn set_pools<I: IntoIterator<Item = String>>(&self, pools: I) {
        let pools: BTreeSet<String> = pools.into_iter().collect();
        for pool in pools.iter().cloned().chain([UNKNOWN.to_string()]) {
            for outcome in OUTCOMES {
                let _ = self.inner.acquires.get_or_create(&AcquireLabels { pool: pool.clone(), outcome });
            }
        }
        for pool in &pools {
            let labels = PoolLabels { pool: pool.clone() };
            let _ = self.inner.acquire_seconds.get_or_create(&labels);
            let _ = self.inner.reset_seconds.get_or_create(&labels);
        }
        self.inner.history.set_pools(&pools);
        if let Ok(mut p) = self.inner.pools.write() {
            *p = pools;
        }
    }

    /// `pool` if it is a configured pool, else [`UNKNOWN`].
    fn pool_label(&self, pool: &str) -> String {
        match self.inner.pools.read() {
            Ok(p) if p.contains(pool) => pool.to_string(),
            _ => UNKNOWN.to_string(),
        }
    }

    /// An Acquire finished (`served` is None on error). `pool` is what the caller asked for:
    /// only configured pools become label values.
    pub fn acquired(&self, pool: &str, served: Option<Served>, took: Duration) {
        let pool = self.pool_label(pool);
        let outcome = match served {
            Some(Served::Hot) => OUTCOMES[0],
            Some(Served::Warm) => OUTCOMES[1],
            Some(Served::Cold) => OUTCOMES[2],
            Some(Served::Repeat) => OUTCOMES[3],
            None => OUTCOMES[4],
        };
        self.inner.acquires.get_or_create(&AcquireLabels { pool: pool.clone(), outcome }).inc();
        if served.is_some() {
            // The history keeps configured pools only (a pool may be named "unknown").
            if pool != UNKNOWN || self.inner.pools.read().is_ok_and(|p| p.contains(UNKNOWN)) {
                self.inner.history.acquired(&pool, took);
            }
            self.inner.acquire_seconds.get_or_create(&PoolLabels { pool }).observe(took.as_secs_f64());
        }
    }

    /// A VM of `pool` (a configured pool: the engine's own) was reset after its lease.
    pub fn reset_took(&self, pool: &str, took: Duration) {
        self.inner.history.reset(pool, took);
        self.inner.reset_seconds.get_or_create(&PoolLabels { pool: pool.to_string() }).observe(took.as_secs_f64());
    }

    /// A multipassd call `op` took `took`, and failed or not.
    pub fn daemon_call(&self, op: &'static str, took: Duration, failed: bool) {
        let labels = OpLabels { op };
        self.inner.daemon_call_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        if failed {
            self.inner.daemon_call_errors.get_or_create(&labels).inc();
        }
    }

    /// An API call of `method` (one the server serves, or [`UNKNOWN`]) ended with the gRPC
    /// status `code` (a number outside the 17 codes counts as `Unknown`, as tonic reads it).
    pub fn grpc_error(&self, method: &'static str, code: i32) {
        let code = usize::try_from(code).ok().and_then(|c| GRPC_CODES.get(c)).copied().unwrap_or("Unknown");
        self.inner.grpc_errors.get_or_create(&GrpcLabels { method, code }).inc();
    }

    /// A state store write failed.
    pub fn store_write_failed(&self) {
        self.inner.store_write_failures.inc();
    }

    /// The last hour of acquire latency and reset duration per pool, one point per minute.
    pub fn history(&self) -> HistorySnapshot {
        self.inner.history.snapshot()
    }

    /// Everything in the Prometheus text format: the recorded metrics, then the pool-state
    /// gauges of `status` (none without it, e.g. when the engine has stopped).
    pub fn render(&self, status: Option<&Status>) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.inner.registry)?;
        if let Some(status) = status {
            prometheus_text::encode(&mut out, &gauges::registry(status, self.inner.host.as_deref()))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        m.render(None).expect("renders")
    }

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.grpc_error("Acquire", 5);
        m.grpc_error("Acquire", 5);
        m.daemon_call("start", Duration::from_millis(3), false);
        let text = text(&m);
        assert!(text.contains("# TYPE mpool_grpc_errors_total counter\n"), "{text}");
        assert!(text.contains("mpool_grpc_errors_total{method=\"Acquire\",code=\"NotFound\"} 2\n"), "{text}");
        assert!(text.contains("# TYPE mpool_daemon_call_seconds histogram\n"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_bucket{op=\"start\",le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_bucket{op=\"start\",le=\"0.0025\"} 0\n"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_bucket{op=\"start\",le=\"+Inf\"} 1\n"), "{text}");
        assert!(text.contains("mpool_daemon_call_seconds_count{op=\"start\"} 1\n"), "{text}");
        assert!(!text.contains("mpool_daemon_call_errors_total{"), "no failure yet: {text}");
        assert!(text.contains("mpool_store_write_failures_total 0\n"), "{text}");
        assert!(!text.contains("_total_total") && !text.contains(".."), "{text}");
    }

    #[test]
    fn only_configured_pools_become_labels() {
        let m = Metrics::default();
        m.set_pools(["ci".to_string()]);
        m.acquired("ci", None, Duration::ZERO);
        m.acquired("ci", Some(Served::Warm), Duration::from_millis(20));
        for i in 0..100 {
            m.acquired(&format!("nope-{i}"), None, Duration::ZERO);
        }
        let text = text(&m);
        assert!(text.contains("mpool_acquires_total{pool=\"ci\",outcome=\"error\"} 1\n"), "{text}");
        assert!(text.contains("mpool_acquires_total{pool=\"ci\",outcome=\"warm\"} 1\n"), "{text}");
        assert!(text.contains("mpool_acquires_total{pool=\"unknown\",outcome=\"error\"} 100\n"), "{text}");
        assert!(text.contains("mpool_acquire_seconds_count{pool=\"ci\"} 1\n"), "{text}");
        assert!(!text.contains("nope"), "{text}");
    }

    #[test]
    fn declared_pools_start_at_zero() {
        let m = Metrics::default();
        assert!(!text(&m).contains("mpool_acquires_total{"), "no pool, no series");
        m.set_pools(["ci".to_string(), "big".to_string()]);
        let text = text(&m);
        for pool in ["ci", "big", UNKNOWN] {
            for outcome in OUTCOMES {
                let line = format!("mpool_acquires_total{{pool=\"{pool}\",outcome=\"{outcome}\"}} 0\n");
                assert!(text.contains(&line), "{line} in:\n{text}");
            }
        }
        for name in ["mpool_acquire_seconds", "mpool_reset_seconds"] {
            assert!(text.contains(&format!("{name}_count{{pool=\"big\"}} 0\n")), "{name} in:\n{text}");
            assert!(!text.contains(&format!("{name}_count{{pool=\"unknown\"}}")), "{name} in:\n{text}");
        }
    }

    #[test]
    fn acquires_and_resets_feed_the_history() {
        let m = Metrics::default();
        m.set_pools(["ci".to_string()]);
        m.acquired("ci", Some(Served::Hot), Duration::from_millis(40));
        m.acquired("ci", None, Duration::from_secs(9));
        m.acquired("nope", Some(Served::Hot), Duration::from_millis(1));
        m.reset_took("ci", Duration::from_secs(2));
        let h = m.history();
        let pools: Vec<&str> = h.pools.iter().map(|p| p.pool.as_str()).collect();
        assert_eq!(pools, ["ci"], "only configured pools have a history");
        let (acquire, reset) = (h.pools[0].acquire.last().unwrap(), h.pools[0].reset.last().unwrap());
        assert_eq!((acquire.count, acquire.max), (1, 0.04), "failed acquires have no latency");
        assert_eq!((reset.count, reset.max), (1, 2.0));
    }

    #[test]
    fn every_series_of_a_host_carries_its_label() {
        let m = Metrics::for_host("mp-2");
        m.set_pools(["ci".to_string()]);
        m.grpc_error("Acquire", 5);
        let text = text(&m);
        assert!(
            text.contains("mpool_grpc_errors_total{host=\"mp-2\",method=\"Acquire\",code=\"NotFound\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("mpool_store_write_failures_total{host=\"mp-2\"} 0\n"), "{text}");
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!samples.is_empty());
        for line in samples {
            assert!(line.contains("host=\"mp-2\""), "{line}");
        }
    }

    #[test]
    fn codes_outside_grpc_count_as_unknown() {
        let m = Metrics::default();
        for code in [-1, 17, 99, i32::MAX] {
            m.grpc_error(UNKNOWN, code);
        }
        m.grpc_error(UNKNOWN, 16);
        let text = text(&m);
        assert!(text.contains("mpool_grpc_errors_total{method=\"unknown\",code=\"Unknown\"} 4\n"), "{text}");
        assert!(text.contains("mpool_grpc_errors_total{method=\"unknown\",code=\"Unauthenticated\"} 1\n"), "{text}");
    }
}
