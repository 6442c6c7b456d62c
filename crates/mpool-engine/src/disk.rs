//! Disk usage at release: a VM whose root filesystem uses more than its pool's
//! `max_disk_usage` (`df` in the guest, over mpool's own SSH connection: no daemon call, nothing
//! blocks) is rebuilt instead of reset, since restoring a snapshot does not shrink its image.

use mpool_core::PoolConfig;
use mpool_core::types::SshEndpoint;

use crate::plans::Ctx;

/// Whether the released VM is over its pool's `max_disk_usage` (false when the pool sets none,
/// the VM's endpoint is unknown, or `df` fails: it is then reset as usual).
pub async fn over_limit(ctx: &Ctx, vm: &str, pool: &PoolConfig, ssh: Option<&SshEndpoint>) -> bool {
    let (Some(max), Some(info)) = (pool.max_disk_usage, ssh) else {
        return false;
    };
    match ctx.ports.ssh.disk_used(vm.to_string(), info.clone()).await {
        Ok(used) if used > max => {
            tracing::info!(vm, used, max, "disk usage over the pool's max_disk_usage: rebuilt instead of reset");
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::debug!(vm, "disk usage not measured: {}", e.message);
            false
        }
    }
}
