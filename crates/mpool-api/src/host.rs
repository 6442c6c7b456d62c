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
    host::combine(daemon, configured, vol)
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
