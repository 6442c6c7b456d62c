//! Cleanup in the engine: how it uses each instance (for [`crate::pool::cleanup::decide`]), and
//! the claim on the idle VMs whose snapshots cleanup deletes, so nobody gets one meanwhile.

use super::{EngineState, Env};
use crate::pool::cleanup::{self, Cleanup, Use};
use crate::pool::error::EngineError;
use crate::ports::Observed;

impl EngineState {
    /// What cleanup removes now, from the daemon's instances and snapshots; `clean` names the
    /// snapshot VMs are reset to. Unless `dry_run`, the VMs whose snapshots it deletes are
    /// claimed (busy, handed to nobody) until [`EngineState::cleanup_done`].
    pub fn cleanup(
        &mut self,
        env: &Env<'_>,
        clean: &str,
        instances: &[Observed],
        snapshots: &[(String, String)],
        dry_run: bool,
    ) -> Result<Cleanup, EngineError> {
        if let Some(d) = &self.degraded {
            return Err(EngineError::StoreUnavailable(d.cause.clone()));
        }
        if !self.reconciled {
            // Until then the engine does not know which of our instances are its own.
            return Err(EngineError::Unavailable("mpool has not reached multipassd yet".into()));
        }
        let usage = |name: &str| match self.vms.get(name) {
            Some(v) => {
                let waiting = self.pools.get(&v.pool).is_some_and(|p| !p.waiters.is_empty());
                if v.state.is_idle() && !v.busy && v.lease.is_none() && !waiting { Use::Idle } else { Use::InUse }
            }
            // A golden VM is the clone source of its pool: left alone.
            None if self.pools.values().filter_map(|p| p.golden.as_ref()).any(|g| g.name == name) => Use::InUse,
            None => Use::Unknown,
        };
        let found = cleanup::decide(&self.settings.prefix, clean, instances, snapshots, usage);
        if !dry_run {
            for s in &found.delete_snapshots {
                if let Some(v) = self.vms.get_mut(&s.instance) {
                    v.busy = true;
                    v.busy_since = env.now;
                    self.cleaning.insert(s.instance.clone());
                }
            }
        }
        Ok(found)
    }

    /// Cleanup is done with a VM it claimed: it is free again, and waiters are served.
    pub fn cleanup_done(&mut self, env: &Env<'_>, vm: &str) {
        if !self.cleaning.remove(vm) {
            return;
        }
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        v.busy = false;
        v.settled_at = env.now;
        let pool = v.pool.clone();
        self.serve_waiters(env, &pool);
    }
}
