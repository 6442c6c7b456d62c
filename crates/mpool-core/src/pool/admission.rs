//! Admission: whether the host has room for more VMs, as a pure function of the host's
//! capacity ([`HostFacts`]), the `[host]` limits and what the pools hold. A VM counts its
//! pool's CPUs and memory against the host's times the overcommit ratio; new VMs are refused
//! while the data volume's free space is under `min_free_disk`. A limit whose host figure is
//! unknown does not apply.

use crate::host::HostFacts;
use crate::pool_config::PoolConfig;
use crate::sizes::parse_size;

/// The `[host]` limits (`None`: off).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Refuse new VMs while the data volume has less free space than this, bytes.
    pub min_free_disk: Option<u64>,
    /// The pools' VMs may have at most this many times the host's CPUs.
    pub cpu_overcommit: Option<f64>,
    /// The pools' VMs may have at most this many times the host's memory.
    pub memory_overcommit: Option<f64>,
}

impl Limits {
    /// No limit is set.
    pub fn is_off(&self) -> bool {
        self.min_free_disk.is_none() && self.cpu_overcommit.is_none() && self.memory_overcommit.is_none()
    }
}

/// How many of `want` new VMs of `pool` the host admits, given `live`: every pool's config
/// with its VM count (the new VMs' pool included); and why fewer, when fewer.
pub fn admit(
    limits: &Limits,
    host: &HostFacts,
    live: &[(&PoolConfig, usize)],
    pool: &PoolConfig,
    want: usize,
) -> (usize, Option<String>) {
    if let (Some(min), Some(free)) = (limits.min_free_disk, host.disk_free)
        && free < min
    {
        return (0, Some(format!("the host's free disk ({}) is under [host] min_free_disk ({})", gib(free), gib(min))));
    }
    let mut admitted = want;
    let mut why = None;
    let mut cap = |admitted: &mut usize, used: f64, each: f64, capacity: f64, what: &str| {
        if each <= 0.0 {
            return;
        }
        let room = ((capacity - used) / each).floor().max(0.0);
        if room < *admitted as f64 {
            *admitted = room as usize;
            why = Some(format!("{what}: the pools' VMs would exceed the host's"));
        }
    };
    if let (Some(ratio), Some(cpus)) = (limits.cpu_overcommit, host.cpus) {
        let used: f64 = live.iter().map(|(c, n)| f64::from(c.cpus) * *n as f64).sum();
        let capacity = f64::from(cpus) * ratio;
        cap(
            &mut admitted,
            used,
            f64::from(pool.cpus),
            capacity,
            &format!("CPUs ({used} of {cpus} x cpu_overcommit {ratio})"),
        );
    }
    if let (Some(ratio), Some(memory)) = (limits.memory_overcommit, host.memory) {
        let bytes = |c: &PoolConfig| parse_size(&c.memory).unwrap_or(0) as f64;
        let used: f64 = live.iter().map(|(c, n)| bytes(c) * *n as f64).sum();
        let capacity = memory as f64 * ratio;
        let what = format!("memory ({} of {} x memory_overcommit {ratio})", gib(used as u64), gib(memory));
        cap(&mut admitted, used, bytes(pool), capacity, &what);
    }
    (admitted, why.map(|w| format!("{w}; lower the pools' sizes or max_size, or raise the [host] limit")))
}

/// Whether every pool fits the host at its `max_size` (for `serve --check`): the problems, if any.
pub fn fits_at_max_size(limits: &Limits, host: &HostFacts, pools: &[PoolConfig]) -> Vec<String> {
    let mut out = Vec::new();
    let at_max: Vec<(&PoolConfig, usize)> = pools.iter().map(|p| (p, p.max_size as usize)).collect();
    if let (Some(ratio), Some(cpus)) = (limits.cpu_overcommit, host.cpus) {
        let need: f64 = at_max.iter().map(|(c, n)| f64::from(c.cpus) * *n as f64).sum();
        if need > f64::from(cpus) * ratio {
            out.push(format!(
                "at max_size the pools need {need} CPUs; the host allows {cpus} x cpu_overcommit {ratio}"
            ));
        }
    }
    if let (Some(ratio), Some(memory)) = (limits.memory_overcommit, host.memory) {
        let need: u64 = at_max.iter().map(|(c, n)| parse_size(&c.memory).unwrap_or(0).saturating_mul(*n as u64)).sum();
        if need as f64 > memory as f64 * ratio {
            out.push(format!(
                "at max_size the pools need {} of memory; the host allows {} x memory_overcommit {ratio}",
                gib(need),
                gib(memory)
            ));
        }
    }
    if let (Some(min), Some(free)) = (limits.min_free_disk, host.disk_free) {
        let disks: u64 = at_max.iter().map(|(c, n)| parse_size(&c.disk).unwrap_or(0).saturating_mul(*n as u64)).sum();
        if free.saturating_sub(disks) < min {
            out.push(format!(
                "at max_size the pools' disks ({}) could fill the free {} below min_free_disk ({})",
                gib(disks),
                gib(free),
                gib(min)
            ));
        }
    }
    out
}

fn gib(b: u64) -> String {
    format!("{:.1}G", b as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn pool(name: &str, cpus: u32, memory: &str, max_size: u32) -> PoolConfig {
        let mut p = PoolConfig::with_defaults(name);
        (p.cpus, p.memory, p.max_size, p.disk) = (cpus, memory.into(), max_size, "10G".into());
        p
    }

    fn host(cpus: u32, memory: u64, free: u64) -> HostFacts {
        HostFacts {
            cpus: Some(cpus),
            memory: Some(memory),
            disk_total: Some(100 * G),
            disk_free: Some(free),
            ..Default::default()
        }
    }

    #[test]
    fn cpus_and_memory_cap_how_many_are_admitted() {
        let (a, b) = (pool("a", 2, "2G", 4), pool("b", 1, "4G", 4));
        let limits = Limits { cpu_overcommit: Some(2.0), memory_overcommit: Some(1.0), ..Default::default() };
        // 8 CPUs x 2 = 16; used 2x2 + 1x1 = 5: room for 5 more of a (2 each) by CPU; memory
        // 16G used 2x2G + 4G = 8G: room for 4 of a by memory.
        let h = host(8, 16 * G, 50 * G);
        let (n, why) = admit(&limits, &h, &[(&a, 2), (&b, 1)], &a, 10);
        assert_eq!(n, 4);
        assert!(why.as_deref().is_some_and(|w| w.starts_with("memory")), "{why:?}");
        let (n, why) = admit(&limits, &h, &[(&a, 2), (&b, 1)], &a, 3);
        assert_eq!((n, why), (3, None), "within the limits nothing is said");
        let (n, why) = admit(&limits, &host(2, 64 * G, 50 * G), &[(&a, 2)], &a, 1);
        assert_eq!(n, 0);
        assert!(why.as_deref().is_some_and(|w| w.contains("cpu_overcommit 2")), "{why:?}");
    }

    #[test]
    fn low_free_disk_refuses_every_new_vm_and_unknown_figures_do_not_limit() {
        let a = pool("a", 1, "1G", 4);
        let limits = Limits { min_free_disk: Some(20 * G), cpu_overcommit: Some(1.0), ..Default::default() };
        let (n, why) = admit(&limits, &host(8, 16 * G, 10 * G), &[], &a, 2);
        assert_eq!(n, 0);
        assert!(why.unwrap().contains("min_free_disk (20.0G)"));
        assert_eq!(admit(&limits, &HostFacts::default(), &[(&a, 100)], &a, 2), (2, None));
        assert_eq!(admit(&Limits::default(), &host(1, G, 0), &[(&a, 100)], &a, 2), (2, None));
    }

    #[test]
    fn fit_at_max_size_names_each_limit_crossed() {
        let pools = [pool("a", 2, "2G", 4), pool("b", 1, "1G", 2)];
        let limits = Limits { min_free_disk: Some(10 * G), cpu_overcommit: Some(1.0), memory_overcommit: Some(1.0) };
        assert!(fits_at_max_size(&limits, &host(16, 32 * G, 200 * G), &pools).is_empty());
        let problems = fits_at_max_size(&limits, &host(4, 4 * G, 50 * G), &pools);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("10 CPUs"), "{problems:?}");
    }
}
