//! The host's capacity as the engine last heard it (sampled outside the engine).

use super::EngineState;
use crate::host::HostFacts;

impl EngineState {
    /// The host's capacity was sampled. Where statvfs gave no free space, it is the total
    /// minus the sum of the VMs' measured disk usage (when any was measured).
    pub fn set_host(&mut self, facts: HostFacts) {
        let used = (!self.disk_used.is_empty()).then(|| self.disk_used.values().sum());
        self.host = Some(crate::host::free_fallback(facts, used));
    }
}
