//! The host's capacity as the engine last heard it (sampled outside the engine).

use super::EngineState;
use crate::host::HostFacts;

impl EngineState {
    /// The host's capacity was sampled.
    pub fn set_host(&mut self, facts: HostFacts) {
        self.host = Some(facts);
    }
}
