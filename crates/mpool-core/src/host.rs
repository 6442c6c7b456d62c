//! The Multipass host's capacity, as facts from several sources: what the daemon reports
//! (`daemon_info`, 1.15+: CPUs and memory from 1.15.1, and `available_space`, which is the data
//! volume's *total* size, reference §2.8), the free space of the filesystem holding
//! multipassd's data directory, and the configuration for what older daemons do not report.
//! Pure: the sampler in `mpool-api` does the I/O.

use std::path::PathBuf;

use serde::Serialize;

/// What `daemon_info` reported (zero: not reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonFacts {
    /// The data volume's total size, bytes (`available_space`).
    pub disk_total: u64,
    /// CPUs (1.15.1+).
    pub cpus: u32,
    /// Memory, bytes (1.15.1+).
    pub memory: u64,
}

/// What the configuration says of the host (`[host]`), for daemons that do not report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfiguredFacts {
    /// The data volume's total size, bytes.
    pub disk_total: Option<u64>,
    /// CPUs.
    pub cpus: Option<u32>,
    /// Memory, bytes.
    pub memory: Option<u64>,
}

/// The filesystem holding multipassd's data directory, as statvfs reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeFacts {
    /// Total bytes.
    pub total: u64,
    /// Free bytes (multipassd runs as root: the root reserve counts).
    pub free: u64,
}

/// The host's capacity as mpool knows it; `None`: unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// CPUs.
    pub cpus: Option<u32>,
    /// Memory, bytes.
    pub memory: Option<u64>,
    /// The data volume's total size, bytes.
    pub disk_total: Option<u64>,
    /// Free bytes on the data volume.
    pub disk_free: Option<u64>,
    /// Where the free figure comes from: `statvfs <dir>`, `total minus instance disk usage`,
    /// or empty when unknown.
    pub disk_free_source: String,
    /// Bytes each instance's files take on the data volume (allocated blocks of
    /// `<data_dir>/vault/instances/<name>`, [`INSTANCES_SUBDIR`]), by instance name.
    #[serde(skip)]
    pub images: std::collections::BTreeMap<String, u64>,
}

/// Where multipassd keeps each instance's files (its disk image, with snapshots inside it, and
/// its cloud-init ISO), under its data directory: `vault/instances/<name>/` (multipass's
/// `BaseVirtualMachineFactory::instances_subdir`).
pub const INSTANCES_SUBDIR: &str = "vault/instances";

/// Combines the sources: the daemon's report first, then the configuration; free space from
/// the data directory's filesystem (else unknown here: see [`free_fallback`]).
pub fn combine(
    daemon: Option<DaemonFacts>,
    config: ConfiguredFacts,
    volume: Option<(PathBuf, VolumeFacts)>,
) -> HostFacts {
    let d = daemon.unwrap_or_default();
    let nonzero = |v: u64| (v > 0).then_some(v);
    let disk_total =
        nonzero(d.disk_total).or(config.disk_total).or_else(|| volume.as_ref().map(|(_, v)| v.total).and_then(nonzero));
    let (disk_free, disk_free_source) = match &volume {
        Some((dir, v)) => (Some(v.free), format!("statvfs {}", dir.display())),
        None => (None, String::new()),
    };
    HostFacts {
        cpus: (d.cpus > 0).then_some(d.cpus).or(config.cpus),
        memory: nonzero(d.memory).or(config.memory),
        disk_total,
        disk_free,
        disk_free_source,
        images: Default::default(),
    }
}

/// The free space where statvfs of the data directory gave none: the total minus what the
/// instances use (`instances_use`: the sum of the VMs' measured disk usage, `None` when none
/// was measured). Facts that have a free figure, or no total, are returned as they are.
pub fn free_fallback(mut facts: HostFacts, instances_use: Option<u64>) -> HostFacts {
    if facts.disk_free.is_none()
        && let (Some(total), Some(used)) = (facts.disk_total, instances_use)
    {
        facts.disk_free = Some(total.saturating_sub(used));
        facts.disk_free_source = "total minus instance disk usage".into();
    }
    facts
}

/// Where multipassd keeps its data, most likely first (reference §5.3): `$MULTIPASS_STORAGE/data`
/// when set, the snap's directory, then a non-snap root install's.
pub fn data_dir_candidates(multipass_storage: Option<&str>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(s) = multipass_storage.filter(|s| !s.is_empty()) {
        out.push(PathBuf::from(s).join("data"));
    }
    out.push(PathBuf::from("/var/snap/multipass/common/data/multipassd"));
    out.push(PathBuf::from("/root/.local/share/multipassd"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn the_daemon_first_then_the_config() {
        let config = ConfiguredFacts { disk_total: Some(50 * G), cpus: Some(4), memory: Some(8 * G) };
        let full = DaemonFacts { disk_total: 100 * G, cpus: 16, memory: 64 * G };
        let h = combine(Some(full), config, None);
        assert_eq!((h.cpus, h.memory, h.disk_total), (Some(16), Some(64 * G), Some(100 * G)));
        // 1.15.0 reports the disk only; older daemons nothing.
        let h = combine(Some(DaemonFacts { disk_total: 100 * G, ..Default::default() }), config, None);
        assert_eq!((h.cpus, h.memory, h.disk_total), (Some(4), Some(8 * G), Some(100 * G)));
        let h = combine(None, config, None);
        assert_eq!((h.cpus, h.memory, h.disk_total), (Some(4), Some(8 * G), Some(50 * G)));
        assert_eq!(combine(None, ConfiguredFacts::default(), None), HostFacts::default());
    }

    #[test]
    fn free_space_from_the_data_volume_else_total_minus_instances() {
        let vol =
            (PathBuf::from("/var/snap/multipass/common/data/multipassd"), VolumeFacts { total: 200 * G, free: 30 * G });
        let h = free_fallback(combine(None, ConfiguredFacts::default(), Some(vol)), Some(5 * G));
        assert_eq!((h.disk_total, h.disk_free), (Some(200 * G), Some(30 * G)), "statvfs wins");
        assert!(h.disk_free_source.starts_with("statvfs /var/snap"), "{}", h.disk_free_source);
        let d = DaemonFacts { disk_total: 100 * G, ..Default::default() };
        let h = free_fallback(combine(Some(d), ConfiguredFacts::default(), None), Some(40 * G));
        assert_eq!(h.disk_free, Some(60 * G));
        assert_eq!(h.disk_free_source, "total minus instance disk usage");
        let h = free_fallback(combine(Some(d), ConfiguredFacts::default(), None), None);
        assert_eq!((h.disk_free, h.disk_free_source.as_str()), (None, ""), "unknown, not guessed");
        let h = free_fallback(combine(None, ConfiguredFacts::default(), None), Some(40 * G));
        assert_eq!(h.disk_free, None, "no total to subtract from");
    }

    #[test]
    fn data_dirs_follow_multipass_storage_then_the_snap() {
        assert_eq!(data_dir_candidates(Some("/srv/mp"))[0], PathBuf::from("/srv/mp/data"));
        assert_eq!(data_dir_candidates(None)[0], PathBuf::from("/var/snap/multipass/common/data/multipassd"));
        assert_eq!(data_dir_candidates(Some("")).len(), 2);
    }
}
