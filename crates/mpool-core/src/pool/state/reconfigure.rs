//! Live reconfiguration of the pools (a reload): pools added, changed and removed while leases
//! run. A changed pool takes its new settings at once (sizes, TTLs, fair share, schedules);
//! when what shapes a VM changed (image, size, cloud-init, setup, reset strategy: its
//! generation key), its generation goes up and its VMs rotate as after a restart with a new
//! config: idle ones are rebuilt, leased ones when released. A removed pool drains: it takes no
//! new leases (NOT_FOUND), its waiters hear so, leases run to their end, its idle VMs (and a
//! clone pool's golden VM) are deleted, and it disappears once it has none left. Leased VMs are
//! never touched. When only sizes changed ([`crate::pool::resize`]), the older generation's
//! idle VMs are resized in place instead of rebuilt, and leased ones at their release.

use super::{EngineState, Env, Pool, Vm};
use crate::pool::demand::Demand;
use crate::pool::error::EngineError;
use crate::pool::fair::FairShare;
use crate::pool::preheat::Preheats;
use crate::pool::resize::{self, Change};
use crate::pool::vm::VmState;
use crate::pool_config::PoolConfig;
use crate::store::{PoolRecord, Write};

impl EngineState {
    /// Applies a new list of pools (validated by the caller).
    pub(super) fn reconfigure(&mut self, env: &Env<'_>, pools: Vec<PoolConfig>) {
        let mut writes = Vec::new();
        let names: std::collections::HashSet<String> = pools.iter().map(|c| c.name.clone()).collect();
        for cfg in pools {
            let key = cfg.generation_key();
            match self.pools.get_mut(&cfg.name) {
                Some(p) => {
                    if p.cfg.generation_key() != key {
                        match resize::change(&p.cfg, &cfg) {
                            Change::InPlace(from) => {
                                p.resizable.insert(p.generation, from);
                            }
                            Change::Same | Change::Rotate => p.resizable.clear(),
                        }
                        p.generation = p.generation.saturating_add(1);
                        self.generation_since.insert(cfg.name.clone(), env.wall_ms);
                    }
                    let since_ms = *self.generation_since.entry(cfg.name.clone()).or_insert(env.wall_ms);
                    p.fair = FairShare::new(cfg.max_leases_per_owner);
                    p.removed = false;
                    if p.cfg != cfg {
                        tracing::info!(pool = %cfg.name, generation = p.generation, "pool reconfigured");
                    }
                    p.cfg = cfg;
                    let (name, generation) = (p.cfg.name.clone(), p.generation);
                    writes.push(Write::PutPool(PoolRecord { name, generation, key, since_ms }));
                }
                None => {
                    tracing::info!(pool = %cfg.name, "pool added");
                    self.generation_since.insert(cfg.name.clone(), env.wall_ms);
                    let since_ms = env.wall_ms;
                    writes.push(Write::PutPool(PoolRecord { name: cfg.name.clone(), generation: 1, key, since_ms }));
                    self.pools.insert(cfg.name.clone(), Pool::new(cfg, 1));
                }
            }
        }
        let gone: Vec<String> = self.pools.keys().filter(|n| !names.contains(*n)).cloned().collect();
        for name in gone {
            self.remove_pool(env, &name);
        }
        self.persist(&writes, true);
    }

    /// Starts draining a pool that left the config.
    fn remove_pool(&mut self, env: &Env<'_>, name: &str) {
        let Some(p) = self.pools.get_mut(name) else {
            return;
        };
        if !p.removed {
            tracing::info!(pool = name, "pool removed: draining (leases run to their end, idle VMs are deleted)");
        }
        p.removed = true;
        // Nothing new: no ready VMs kept, none provisioned, idle ones go at once.
        (p.cfg.min_ready, p.cfg.hot, p.cfg.max_size) = (0, 0, 0);
        p.cfg.idle_timeout = std::time::Duration::ZERO;
        p.cfg.autoscale = crate::pool_config::Autoscale::Off;
        p.cfg.schedules.clear();
        p.preheats = Preheats::default();
        let waiters: Vec<_> = p.waiters.drain(..).flat_map(|w| w.callers).collect();
        // A clone pool's golden VM is deleted like any retired VM.
        if let Some(g) = p.golden.take() {
            let mut vm = Vm::new(g.name.clone(), name, g.generation, VmState::Deleting, env.now, env.wall_ms);
            vm.observe = true;
            self.persist(&[Write::PutVm(vm.record())], true);
            self.vms.insert(g.name, vm);
        }
        for caller in waiters {
            self.reply(caller, Err(EngineError::UnknownPool(name.to_string())));
        }
    }

    /// Drops drained pools that have no VM and no lease left.
    pub(super) fn forget_drained(&mut self) {
        let drained: Vec<String> = self
            .pools
            .values()
            .filter(|p| p.removed)
            .filter(|p| !self.vms.values().any(|v| v.pool == p.cfg.name))
            .filter(|p| !self.book.iter().any(|l| l.record.pool == p.cfg.name))
            .map(|p| p.cfg.name.clone())
            .collect();
        for name in drained {
            tracing::info!(pool = %name, "removed pool drained");
            self.pools.remove(&name);
        }
    }
}

impl Pool {
    /// A pool with nothing yet.
    pub(super) fn new(cfg: PoolConfig, generation: u64) -> Pool {
        Pool {
            fair: FairShare::new(cfg.max_leases_per_owner),
            demand: Demand::default(),
            preheats: Preheats::default(),
            cfg,
            generation,
            waiters: Default::default(),
            golden: None,
            waiting: Default::default(),
            removed: false,
            resizable: Default::default(),
        }
    }
}
