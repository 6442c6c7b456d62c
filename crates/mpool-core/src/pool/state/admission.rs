//! Admission in the engine: provisioning clamped to what the host admits
//! ([`crate::pool::admission::admit`]), the reason kept per pool (status, one log line when it
//! changes), and callers of a pool that cannot grow told so at once (RESOURCE_EXHAUSTED with
//! the reason) when nothing is on its way to them, instead of waiting out their wait.

use std::collections::BTreeMap;

use super::{CallerId, EngineState};
use crate::pool::admission::{self, Limits};
use crate::pool::error::EngineError;
use crate::pool_config::PoolConfig;

/// The host's limits and which pools they hold back.
#[derive(Debug, Default)]
pub(super) struct Admission {
    /// The `[host]` limits.
    pub(super) limits: Limits,
    /// Pools that could not grow, and why.
    pub(super) blocked: BTreeMap<String, String>,
}

impl EngineState {
    /// Sets the `[host]` limits admission applies.
    pub fn set_limits(&mut self, limits: Limits) {
        self.admission.limits = limits;
    }

    /// How many of `want` new VMs of `pool` the host admits now; records (and logs once) why
    /// fewer, or that the pool may grow again.
    pub(super) fn admitted(&mut self, pool: &str, want: usize) -> usize {
        let (limits, Some(host)) = (self.admission.limits, self.host.as_ref()) else {
            return want;
        };
        if limits.is_off() {
            return want;
        }
        let Some(cfg) = self.pools.get(pool).map(|p| &p.cfg) else {
            return want;
        };
        let live: Vec<(&PoolConfig, usize)> = self
            .pools
            .values()
            .map(|p| {
                let vms = self.vms.values().filter(|v| v.pool == p.cfg.name && v.state.counts_toward_size()).count();
                (&p.cfg, vms + usize::from(p.golden.is_some()))
            })
            .collect();
        let (n, why) = admission::admit(&limits, host, &live, cfg, want);
        match why {
            Some(why) => {
                if self.admission.blocked.get(pool) != Some(&why) {
                    tracing::warn!(pool, admitted = n, wanted = want, "provisioning held back: {why}");
                    self.admission.blocked.insert(pool.to_string(), why);
                }
            }
            None => {
                if self.admission.blocked.remove(pool).is_some() {
                    tracing::info!(pool, "the host admits this pool's VMs again");
                }
            }
        }
        n
    }

    /// `pool` wants no new VM now: whether the host would admit one more (so the pool keeps
    /// saying why it cannot grow, or stops saying so once it can).
    pub(super) fn admission_not_needed(&mut self, pool: &str) {
        self.admitted(pool, 1);
    }

    /// Why `pool` cannot grow, while it cannot.
    pub(super) fn blocked(&self, pool: &str) -> Option<String> {
        self.admission.blocked.get(pool).cloned()
    }

    /// Callers of a pool the host holds back, with no VM on its way to them, are told why now.
    pub(super) fn refuse_held_back(&mut self, pool: &str) {
        let Some(reason) = self.blocked(pool) else {
            return;
        };
        let coming = self.vms.values().any(|v| v.pool == pool && (v.state.is_coming() || v.state.is_idle()));
        if coming {
            return;
        }
        let callers: Vec<CallerId> =
            self.pools.get_mut(pool).map(|p| p.waiters.drain(..).flat_map(|w| w.callers).collect()).unwrap_or_default();
        for caller in callers {
            let err = EngineError::Refused { pool: pool.to_string(), reason: reason.clone() };
            self.reply(caller, Err(err));
        }
    }
}
