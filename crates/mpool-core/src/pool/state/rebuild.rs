//! `rebuild_every` in the engine: a pool whose generation is due ([`crate::pool::rebuild::due`])
//! gets the next one, stored with its start time; maintenance then rotates its idle VMs.

use super::{EngineState, Env};
use crate::pool::rebuild;
use crate::store::{PoolRecord, Write};

impl EngineState {
    /// When each pool's current generation began (unix ms), as the store had it at start.
    pub fn set_generation_since(&mut self, since: Vec<(String, u64)>) {
        self.generation_since.extend(since);
    }

    /// Bumps the generation of every pool whose `rebuild_every` has passed.
    pub(super) fn rebuild_due(&mut self, env: &Env<'_>) {
        let mut writes = Vec::new();
        for p in self.pools.values_mut() {
            let since = *self.generation_since.entry(p.cfg.name.clone()).or_insert(env.wall_ms);
            if !rebuild::due(&p.cfg, since, env.wall_ms) {
                continue;
            }
            p.generation = p.generation.saturating_add(1);
            p.resizable.clear();
            self.generation_since.insert(p.cfg.name.clone(), env.wall_ms);
            tracing::info!(pool = %p.cfg.name, generation = p.generation, "rebuild_every: a new generation; idle VMs rotate");
            writes.push(Write::PutPool(PoolRecord {
                name: p.cfg.name.clone(),
                generation: p.generation,
                key: p.cfg.generation_key(),
                since_ms: env.wall_ms,
            }));
        }
        if !writes.is_empty() {
            self.persist(&writes, true);
        }
    }
}
