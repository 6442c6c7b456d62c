//! The pool-state gauges, made at scrape time from the engine's status into a registry of
//! their own: a fresh one per scrape, so a state or pool that is gone leaves no stale series
//! and concurrent scrapes never see each other's half-set values. Their labels are bounded by
//! the configuration (pools) and the engine (VM states).

use mpool_core::pool::isolation::IsolationState;
use mpool_core::pool::status::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::PoolLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    pool: String,
    state: String,
}

/// A count as a gauge value.
fn value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A gauge holding `v`.
fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// `mpool_vms`, `mpool_leases`, `mpool_waiters`, `mpool_pool_held_back`,
/// `mpool_pool_disk_used_bytes`, `mpool_pool_image_bytes`, `mpool_daemon_up`, `mpool_daemon_queue`, `mpool_store_up`,
/// `mpool_network_isolated` and the `mpool_host_*` figures as `status` has them, each with the
/// `host` label when there is a host.
pub(crate) fn registry(status: &Status, host: Option<&str>) -> Registry {
    let vms = Family::<VmLabels, Gauge>::default();
    let leases = Family::<PoolLabels, Gauge>::default();
    let waiters = Family::<PoolLabels, Gauge>::default();
    let held_back = Family::<PoolLabels, Gauge>::default();
    let disk_used = Family::<PoolLabels, Gauge>::default();
    let images = Family::<PoolLabels, Gauge>::default();
    for p in &status.pools {
        for (state, n) in &p.counts {
            vms.get_or_create(&VmLabels { pool: p.name.clone(), state: state.clone() }).set(value(*n));
        }
        let pool = PoolLabels { pool: p.name.clone() };
        leases.get_or_create(&pool).set(value(p.leases));
        waiters.get_or_create(&pool).set(value(p.waiters));
        held_back.get_or_create(&pool).set(i64::from(p.held_back.is_some()));
        disk_used.get_or_create(&pool).set(i64::try_from(p.disk_used).unwrap_or(i64::MAX));
        images.get_or_create(&pool).set(i64::try_from(p.image_bytes).unwrap_or(i64::MAX));
    }
    let mut r = super::registry_for(host);
    r.register("mpool_vms", "VMs per pool and state", vms);
    r.register("mpool_leases", "Leases per pool", leases);
    r.register("mpool_waiters", "Callers waiting for a VM, per pool", waiters);
    r.register("mpool_pool_held_back", "1 while the host's [host] limits admit no more of the pool's VMs", held_back);
    r.register(
        "mpool_pool_disk_used_bytes",
        "The pool's VMs' disk usage as last measured (df in the guest at release), bytes",
        disk_used,
    );
    r.register(
        "mpool_pool_image_bytes",
        "The pool's VMs' files on the host's data volume (multipassd's vault/instances), bytes",
        images,
    );
    r.register("mpool_daemon_up", "1 when multipassd answers", gauge(i64::from(status.daemon_ok)));
    r.register(
        "mpool_daemon_queue",
        "Daemon calls waiting for the scheduler",
        gauge(value(status.queued_daemon_calls)),
    );
    r.register("mpool_store_up", "1 when the state store takes writes", gauge(i64::from(status.store_ok)));
    let isolated = match status.isolation.state {
        IsolationState::Isolated => 1,
        IsolationState::NotIsolated => 0,
        IsolationState::Unknown => -1,
    };
    r.register(
        "mpool_network_isolated",
        "1 when the isolation probe measured the VMs cut off from each other and the host, 0 when a VM reached one, -1 while unknown",
        gauge(isolated),
    );
    // The host's figures, once known (an unknown figure has no series rather than a false 0).
    let facts = status.host.clone().unwrap_or_default();
    let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let Some(v) = facts.disk_free {
        r.register("mpool_host_disk_free_bytes", "Free bytes on multipassd's data volume", gauge(bytes(v)));
    }
    if let Some(v) = facts.disk_total {
        r.register("mpool_host_disk_total_bytes", "Size of multipassd's data volume, bytes", gauge(bytes(v)));
    }
    if let Some(v) = facts.cpus {
        r.register("mpool_host_cpus", "CPUs of the Multipass host", gauge(i64::from(v)));
    }
    if let Some(v) = facts.memory {
        r.register("mpool_host_memory_bytes", "Memory of the Multipass host, bytes", gauge(bytes(v)));
    }
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mpool_core::pool::status::PoolStatus;

    use crate::Metrics;

    use super::*;

    fn status(counts: &[(&str, usize)], daemon_ok: bool) -> Status {
        Status {
            daemon_ok,
            reconciled: true,
            store_ok: true,
            store_error: None,
            pools: vec![PoolStatus {
                name: "ci".into(),
                generation: 1,
                counts: counts.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
                waiters: 3,
                leases: 2,
                golden_ready: None,
                removed: false,
                held_back: None,
                disk_used: 0,
                image_bytes: 0,
                config: None,
            }],
            vms: vec![],
            leases: vec![],
            queued_daemon_calls: 4,
            isolation: Default::default(),
            host: None,
        }
    }

    #[test]
    fn gauges_follow_each_status() {
        let m = Metrics::default();
        let text = m.render(Some(&status(&[("hot", 1), ("leased", 2)], true))).expect("renders");
        for line in [
            "# TYPE mpool_vms gauge\n",
            "mpool_vms{pool=\"ci\",state=\"hot\"} 1\n",
            "mpool_vms{pool=\"ci\",state=\"leased\"} 2\n",
            "mpool_leases{pool=\"ci\"} 2\n",
            "mpool_waiters{pool=\"ci\"} 3\n",
            "mpool_daemon_up 1\n",
            "mpool_daemon_queue 4\n",
            "mpool_store_up 1\n",
            "mpool_network_isolated -1\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        // The next scrape has no hot VM: no stale series of the last one.
        let mut s = status(&[("leased", 2)], false);
        s.isolation.state = IsolationState::NotIsolated;
        let text = m.render(Some(&s)).expect("renders");
        assert!(text.contains("mpool_network_isolated 0\n"), "{text}");
        assert!(!text.contains("state=\"hot\""), "{text}");
        assert!(text.contains("mpool_daemon_up 0\n"), "{text}");
        // Without a status (the engine has stopped), no gauges at all.
        let text = m.render(None).expect("renders");
        assert!(!text.contains("mpool_vms") && !text.contains("mpool_daemon_up"), "{text}");
        // A host's gauges carry its label.
        let text = Metrics::for_host("mp-1").render(Some(&status(&[("hot", 1)], true))).expect("renders");
        assert!(text.contains("mpool_vms{host=\"mp-1\",pool=\"ci\",state=\"hot\"} 1\n"), "{text}");
        assert!(text.contains("mpool_daemon_up{host=\"mp-1\"} 1\n"), "{text}");
    }
}
