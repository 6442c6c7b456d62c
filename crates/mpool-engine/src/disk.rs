//! Disk usage at release: `df` in the guest, over mpool's own SSH connection (no daemon call,
//! nothing blocks). A VM whose root filesystem uses more than its pool's `max_disk_usage` is
//! rebuilt instead of reset, since restoring a snapshot does not shrink its image.

use mpool_core::PoolConfig;
use mpool_core::types::SshEndpoint;

use crate::plans::Ctx;

/// The released VM's disk usage, bytes: measured unless its endpoint is unknown or a caller
/// waits for it and its pool sets no `max_disk_usage` (the measurement would only delay it).
pub async fn measure(
    ctx: &Ctx,
    vm: &str,
    pool: &PoolConfig,
    ssh: Option<&SshEndpoint>,
    for_waiters: bool,
) -> Option<u64> {
    let info = ssh?;
    if for_waiters && pool.max_disk_usage.is_none() {
        return None;
    }
    match ctx.ports.ssh.disk_used(vm.to_string(), info.clone()).await {
        Ok(used) => Some(used),
        Err(e) => {
            tracing::debug!(vm, "disk usage not measured: {}", e.message);
            None
        }
    }
}

/// Whether `used` is over the pool's `max_disk_usage` (the VM is then rebuilt, not reset).
pub fn over_limit(vm: &str, pool: &PoolConfig, used: Option<u64>) -> bool {
    match (pool.max_disk_usage, used) {
        (Some(max), Some(used)) if used > max => {
            tracing::info!(vm, used, max, "disk usage over the pool's max_disk_usage: rebuilt instead of reset");
            true
        }
        _ => false,
    }
}
