//! Samples the Multipass host's capacity every `interval`: `daemon_info` (1.15+; a cheap call),
//! statvfs of multipassd's data directory (configured, or the first of the usual places that
//! exists), and `[host]` for what older daemons do not report. The facts go to the engine
//! (status, GetPool, and the `mpool_host_*` gauges made from its status).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mpool_config::HostConfig;
use mpool_core::host::{self, ConfiguredFacts, DaemonFacts, HostFacts, VolumeFacts};
use mpool_engine::Engine;
use mpool_multipass::Client;

/// multipassd's data directory: the configured one, else the first usual place that exists.
pub fn data_dir(cfg: &HostConfig) -> Option<PathBuf> {
    if let Some(d) = &cfg.data_dir {
        return Some(d.clone());
    }
    let storage = std::env::var("MULTIPASS_STORAGE").ok();
    host::data_dir_candidates(storage.as_deref()).into_iter().find(|d| d.is_dir())
}

/// The filesystem holding `dir`: total and free bytes (off the async workers: statvfs of a
/// hung network filesystem blocks).
async fn volume(dir: &Path) -> Result<VolumeFacts, String> {
    let path = dir.to_path_buf();
    let stat = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path)).await;
    match stat {
        Ok(Ok(s)) => {
            let unit = s.fragment_size();
            Ok(VolumeFacts { total: s.blocks().saturating_mul(unit), free: s.blocks_free().saturating_mul(unit) })
        }
        Ok(Err(e)) => Err(format!("statvfs {}: {}", dir.display(), e.desc())),
        Err(e) => Err(format!("statvfs {}: {e}", dir.display())),
    }
}

/// One sample of the host's capacity.
pub async fn sample(client: &Client, cfg: &HostConfig, dir: Option<&Path>) -> HostFacts {
    let daemon = if client.daemon_version().has_daemon_info() {
        match client.daemon_info().await {
            Ok(i) => Some(DaemonFacts { disk_total: i.available_space, cpus: i.cpus, memory: i.memory }),
            Err(e) => {
                tracing::debug!("daemon_info: {e}");
                None
            }
        }
    } else {
        None
    };
    let vol = match dir {
        Some(d) => match volume(d).await {
            Ok(v) => Some((d.to_path_buf(), v)),
            Err(e) => {
                tracing::debug!("{e}");
                None
            }
        },
        None => None,
    };
    let configured = ConfiguredFacts { disk_total: cfg.disk, cpus: cfg.cpus, memory: cfg.memory };
    // Without statvfs the engine fills in the total minus its VMs' measured usage.
    let mut facts = host::combine(daemon, configured, vol);
    if let Some(d) = dir {
        let instances = d.join(host::INSTANCES_SUBDIR);
        facts.images = tokio::task::spawn_blocking(move || instance_files(&instances)).await.unwrap_or_default();
    }
    facts
}

/// Most instance directories looked at per sample.
const MAX_INSTANCES: usize = 4096;
/// Most entries counted per instance directory (multipassd keeps its image and ISO there; the
/// simulator keeps the guest's files).
const MAX_ENTRIES: usize = 20_000;

/// The bytes each instance's directory under `instances` takes on disk (allocated blocks, so a
/// sparse image counts what it holds), by instance name; empty when it cannot be read.
fn instance_files(instances: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(instances) else { return out };
    for entry in entries.flatten().take(MAX_INSTANCES) {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let mut budget = MAX_ENTRIES;
            out.insert(name, allocated(&entry.path(), 8, &mut budget));
        }
    }
    out
}

/// Allocated bytes of the files under `dir`, `depth` levels down, counting at most `budget`
/// entries (symbolic links are not followed).
fn allocated(dir: &Path, depth: u32, budget: &mut usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut total = 0u64;
    for entry in entries.flatten() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_dir() {
            if depth > 0 {
                total = total.saturating_add(allocated(&entry.path(), depth - 1, budget));
            }
        } else if meta.is_file() {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
    }
    total
}

/// Samples every `interval` until the returned task is aborted.
pub fn spawn(client: Client, cfg: HostConfig, engine: Engine, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let dir = data_dir(&cfg);
        match &dir {
            Some(d) => tracing::info!(data_dir = %d.display(), "watching multipassd's data volume"),
            None => tracing::warn!(
                "multipassd's data directory was not found (set [host] data_dir): free disk space is unknown"
            ),
        }
        loop {
            let facts = sample(&client, &cfg, dir.as_deref()).await;
            engine.set_host(facts).await;
            tokio::time::sleep(interval).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_files_count_allocated_bytes_per_instance_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let inst = d.path().join("vault/instances");
        std::fs::create_dir_all(inst.join("mpool-a/snapshots")).unwrap();
        std::fs::create_dir_all(inst.join("other")).unwrap();
        std::fs::write(inst.join("mpool-a/disk.img"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::write(inst.join("mpool-a/snapshots/s1"), vec![2u8; 32 * 1024]).unwrap();
        // A sparse file counts what it holds, not its length.
        let sparse = std::fs::File::create(inst.join("other/sparse.img")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        // A link out of the instance is not followed.
        std::os::unix::fs::symlink(d.path(), inst.join("mpool-a/escape")).unwrap();
        std::fs::write(inst.join("stray-file"), b"x").unwrap();
        let got = instance_files(&inst);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["mpool-a", "other"]);
        assert!((96 * 1024..=112 * 1024).contains(&got["mpool-a"]), "{got:?}");
        assert!(got["other"] < 1 << 20, "{got:?}");
        assert!(instance_files(&d.path().join("missing")).is_empty());
    }
}
