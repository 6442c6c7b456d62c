//! VMs' disk usage as last measured (`df` in the guest at release) and their files on the
//! host's data volume as last sampled, for status and metrics.

use super::EngineState;

impl EngineState {
    /// A VM's disk usage was measured (`None`: unknown again); VMs that are gone are forgotten.
    pub fn set_disk_used(&mut self, vm: &str, bytes: Option<u64>) {
        match bytes {
            Some(b) if self.vms.contains_key(vm) => {
                self.disk_used.insert(vm.to_string(), b);
            }
            _ => {
                self.disk_used.remove(vm);
            }
        }
        let vms = &self.vms;
        self.disk_used.retain(|name, _| vms.contains_key(name));
    }

    /// The sum of a pool's VMs' measured disk usage.
    pub(super) fn pool_disk_used(&self, pool: &str) -> u64 {
        self.vms.values().filter(|v| v.pool == pool).filter_map(|v| self.disk_used.get(&v.name)).sum()
    }

    /// A VM's files on the host's data volume, as last sampled.
    pub(super) fn image_bytes(&self, vm: &str) -> Option<u64> {
        self.host.as_ref()?.images.get(vm).copied()
    }

    /// The sum of a pool's VMs' files on the host's data volume.
    pub(super) fn pool_image_bytes(&self, pool: &str) -> u64 {
        self.vms.values().filter(|v| v.pool == pool).filter_map(|v| self.image_bytes(&v.name)).sum()
    }
}
