//! What the daemon reports: health, drift of known VMs, reconciliation after a start or a store failure.

use super::{Effect, EngineState, Env, Golden, Vm};
use crate::pool::drift::{self, Drift};
use crate::pool::leases::LeaseBook;
use crate::pool::outcome::PlanKind;
use crate::pool::reconcile;
use crate::pool::vm::{Event, VmState};
use crate::pool_config::PoolConfig;
use crate::ports::{Observed, StepError};
use crate::store::Write;
use std::collections::HashMap;
use std::time::{Duration, Instant};

impl EngineState {
    pub(super) fn daemon_ok_now(&mut self, env: &Env<'_>) {
        if !self.daemon_ok {
            tracing::info!("multipassd answers again");
            self.daemon_ok = true;
            // It may have restarted and moved the leased VMs' SSH endpoints.
            if self.reconciled {
                let leased: Vec<String> = self
                    .vms
                    .values()
                    .filter(|v| v.state == VmState::Leased && !v.busy)
                    .map(|v| v.name.clone())
                    .collect();
                for name in leased {
                    self.start_plan(env, &name, PlanKind::Refresh);
                }
            }
        }
    }

    pub(super) fn daemon_down(&mut self, why: &str) {
        if self.daemon_ok {
            tracing::warn!("multipassd is unavailable: {why}");
        }
        self.daemon_ok = false;
    }

    /// Whether the daemon answered, when nothing else can be done with the answer.
    pub(super) fn observed_daemon(&mut self, result: &Result<Vec<Observed>, StepError>) {
        match result {
            Ok(_) => self.daemon_ok = true,
            Err(e) => self.daemon_down(&e.message),
        }
    }

    /// A fresh `list` from the observer: first contact reconciles; later ones check idle VMs.
    pub(super) fn observed(&mut self, env: &Env<'_>, result: Result<Vec<Observed>, StepError>, asked: Instant) {
        let list = match result {
            Ok(list) => list,
            Err(e) => return self.daemon_down(&e.message),
        };
        if !self.reconciled {
            self.daemon_ok = true;
            if self.reconcile_after.is_some_and(|after| asked < after) {
                // Asked before the store recovered: work aborted at the failure may have
                // changed the daemon since. The observation asked for at the recovery follows.
                return;
            }
            return self.reconcile(env, &list);
        }
        self.daemon_ok_now(env);
        let seen: HashMap<&str, crate::types::InstanceState> =
            list.iter().map(|o| (o.name.as_str(), o.state)).collect();
        let mut drifted = Vec::new();
        // A VM whose state settled after the list was asked for may show mid-change in it.
        for vm in self.vms.values_mut().filter(|v| !v.busy && v.settled_at < asked) {
            use crate::types::InstanceState as S;
            let state = seen.get(vm.name.as_str()).copied();
            if !matches!(state, Some(S::Starting | S::Restarting)) {
                vm.transient_since = None;
            }
            let transient_for = match state {
                Some(S::Starting | S::Restarting) if vm.state.is_idle() => {
                    Some(env.now.duration_since(*vm.transient_since.get_or_insert(env.now)))
                }
                _ => None,
            };
            let limit = self.pools.get(&vm.pool).map(|p| p.cfg.readiness_timeout).unwrap_or(Duration::from_secs(300));
            match drift::classify(vm.state, state, transient_for, limit) {
                Drift::Fine => {}
                d => drifted.push((vm.name.clone(), d)),
            }
        }
        for (name, d) in drifted {
            match d {
                Drift::Fine => {}
                Drift::Transient => {
                    // Its SSH host key may be new after a cold boot: the next check connects afresh.
                    self.batch.effects.push(Effect::ForgetSsh(name.clone()));
                    if let Some(v) = self.vms.get_mut(&name) {
                        v.ssh = None;
                    }
                }
                Drift::Check => {
                    // Health check of a hot VM over SSH; it stays hot (and counted) meanwhile.
                    self.start_plan(env, &name, PlanKind::Check);
                }
                Drift::Doubt => {
                    tracing::warn!(vm = %name, "suspended VM found running (daemon restart?); resetting it");
                    self.apply(env, &name, Event::Doubt);
                    self.persist_vm(&name, true);
                }
                Drift::Broken(state) => {
                    tracing::warn!(vm = %name, ?state, "idle VM found in an unexpected state; replacing it");
                    self.apply(env, &name, Event::Fail);
                    self.persist_vm(&name, true);
                }
                Drift::Gone => {
                    tracing::warn!(vm = %name, "instance disappeared from multipassd");
                    // Its lease ends, with no reset: there is nothing left to reset (a reset of
                    // a recreate pool would launch it again, behind the engine's back).
                    if let Some(id) = self.vms.get(&name).and_then(|v| v.lease.clone())
                        && let Some((_, writes)) = self.book.end(&id, "its VM disappeared", env.wall_ms, None)
                    {
                        tracing::info!(lease = %id, vm = %name, "lease ended: its VM disappeared");
                        self.persist(&writes, true);
                    }
                    self.vms.remove(&name);
                    self.persist(&[Write::DeleteVm(name)], true);
                }
            }
        }
    }

    pub(super) fn reconcile(&mut self, env: &Env<'_>, list: &[Observed]) {
        let snapshot = self.store_snapshot.take().unwrap_or_default();
        let pools: Vec<PoolConfig> = self.pools.values().map(|p| p.cfg.clone()).collect();
        let doubt = std::mem::take(&mut self.doubt);
        let r = reconcile::reconcile(
            &self.settings.prefix,
            &pools,
            &snapshot,
            list,
            env.wall_ms,
            self.settings.delete_strays,
            &doubt,
        );
        for n in &r.dropped {
            tracing::debug!(vm = %n, "reconcile: record dropped (not listed by multipassd)");
        }
        for a in &r.vms {
            tracing::debug!(vm = %a.record.name, state = ?a.state, pool = %a.record.pool, "reconcile: adopted");
        }
        let mut writes: Vec<Write> = r.dropped.iter().map(|n| Write::DeleteVm(n.clone())).collect();
        for a in &r.vms {
            writes.push(Write::PutVm(a.record.clone()));
            let mut vm =
                Vm::new(a.record.name.clone(), &a.record.pool, a.record.generation, a.state, env.now, env.wall_ms);
            vm.uses = a.record.uses;
            vm.lease = a.record.lease.clone();
            vm.created_ms = a.record.created_ms;
            // Adopted after a restart: what it was doing is not known for sure.
            vm.observe = true;
            self.vms.insert(a.record.name.clone(), vm);
        }
        let live = r
            .leases
            .iter()
            .map(|l| (l.clone(), env.now + Duration::from_millis(l.expires_ms.saturating_sub(env.wall_ms))))
            .collect();
        let (mut book, restore_writes) = LeaseBook::restore(live, &snapshot);
        writes.extend(restore_writes);
        for (l, why) in &r.ended {
            tracing::info!(lease = %l.id, vm = %l.vm, "lease ended: {why}");
            writes.extend(book.end_stored(l, why, env.wall_ms));
        }
        self.book = book;
        for (pool, (rec, ready)) in &r.golden {
            if let Some(p) = self.pools.get_mut(pool) {
                p.golden =
                    Some(Golden { name: rec.name.clone(), generation: rec.generation, ready: *ready, busy: false });
            }
        }
        self.persist(&writes, true);
        for stray in r.strays {
            tracing::warn!(instance = %stray, "deleting a stray instance with our prefix that the store does not know");
            self.batch.effects.push(Effect::DeleteStray(stray));
        }
        for name in r.ignored {
            tracing::warn!(instance = %name, "leaving an unknown instance with our prefix alone (delete_strays = false)");
        }
        // Leased VMs: their holders will exec again, so learn their SSH endpoints.
        let leased: Vec<String> =
            self.vms.values().filter(|v| v.state == VmState::Leased).map(|v| v.name.clone()).collect();
        for name in leased {
            self.start_plan(env, &name, PlanKind::Refresh);
        }
        self.reconciled = true;
        tracing::info!(vms = self.vms.len(), leases = self.book.len(), "reconciled with multipassd");
    }
}
