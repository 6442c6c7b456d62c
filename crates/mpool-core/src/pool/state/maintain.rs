//! Maintenance: what each pool needs (provision, park, retire, resume), and golden VM builds.

use super::{Effect, EngineState, Env, Golden, PendingResize, Vm};
use crate::pool::decide::{self, Action, GoldenView, PoolView, VmView};
use crate::pool::outcome::PlanKind;
use crate::pool::vm::{Event, VmState};
use crate::pool_config::ResetStrategy;
use crate::store::{PhaseRecord, VmRecord, Write};
use std::time::Duration;

impl EngineState {
    /// One round of maintenance: what each pool needs (provisioning, parking, retiring,
    /// resuming interrupted work), then waiters served. The actor runs it after each batch of
    /// inputs.
    pub fn maintain(&mut self, env: &Env<'_>) {
        if !self.reconciled || self.degraded.is_some() {
            return;
        }
        self.rebuild_due(env);
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let actions = {
                let Some(p) = self.pools.get(&name) else {
                    continue;
                };
                let vms = self
                    .vms
                    .values()
                    .filter(|v| v.pool == name)
                    .map(|v| VmView {
                        name: v.name.clone(),
                        state: v.state,
                        busy: v.busy,
                        generation: v.generation,
                        target_hot: v.target_hot,
                        idle_for: if v.state.is_idle() { env.now.duration_since(v.idle_since) } else { Duration::ZERO },
                        resizable: p.resizable.contains_key(&v.generation),
                    })
                    .collect();
                let golden = match (&p.cfg.reset, &p.golden) {
                    (ResetStrategy::Clone, None) => GoldenView::Missing,
                    (ResetStrategy::Clone, Some(g)) if g.busy => GoldenView::Building,
                    (ResetStrategy::Clone, Some(g)) if g.ready => GoldenView::Ready(g.generation),
                    (ResetStrategy::Clone, Some(_)) => GoldenView::Missing,
                    _ => GoldenView::NotNeeded,
                };
                let view = PoolView {
                    cfg: &p.cfg,
                    generation: p.generation,
                    vms,
                    waiting: self.servable_waiters(&name),
                    ready_target: EngineState::ready_target(p, env) as usize,
                    golden,
                    daemon_ok: self.daemon_ok,
                };
                decide::decide(&view)
            };
            if !actions.iter().any(|a| matches!(a, Action::Provision { .. })) {
                // It needs no new VM now: would the host admit one?
                self.admission_not_needed(&name);
            }
            for a in actions {
                self.act(env, &name, a);
            }
            self.serve_waiters(env, &name);
            self.refuse_held_back(&name);
        }
        self.forget_drained();
    }

    pub(super) fn act(&mut self, env: &Env<'_>, pool: &str, action: Action) {
        match action {
            Action::Provision { count, hot } => {
                let count = self.admitted(pool, count);
                let Some(p) = self.pools.get(pool) else {
                    return;
                };
                let generation = p.generation;
                for i in 0..count {
                    let name = format!("{}{}-{}", self.settings.prefix, pool, env.ids.suffix());
                    let mut vm = Vm::new(name.clone(), pool, generation, VmState::Provisioning, env.now, env.wall_ms);
                    vm.target_hot = i < hot;
                    // Intent first: the record exists before the launch does.
                    self.persist(&[Write::PutVm(vm.record())], true);
                    self.vms.insert(name.clone(), vm);
                    self.start_plan(env, &name, PlanKind::Provision { hot: i < hot });
                }
            }
            Action::Reset { vm, hot } => self.rerun(env, &vm, PlanKind::Reset { hot }, hot),
            // An interrupted build resumes from what the daemon shows.
            Action::Resume { vm, hot } => self.rerun(env, &vm, PlanKind::Provision { hot }, hot),
            Action::Destroy { vm } => self.start_plan(env, &vm, PlanKind::Destroy),
            Action::Retire { vm } => {
                self.apply(env, &vm, Event::Retire);
                self.persist_vm(&vm, true);
                self.start_plan(env, &vm, PlanKind::Destroy);
            }
            Action::Resize { vm, hot } => self.resize(env, pool, &vm, hot),
            Action::Park { vm, hot } => {
                self.apply(env, &vm, Event::Park { hot });
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.target_hot = hot;
                }
                self.start_plan(env, &vm, PlanKind::Park { hot });
            }
            Action::BuildGolden => self.build_golden(env, pool),
        }
    }

    /// Starts resizing an idle VM in place, to park it as it was.
    fn resize(&mut self, env: &Env<'_>, pool: &str, vm: &str, hot: bool) {
        let Some(p) = self.pools.get(pool) else {
            return;
        };
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(from) = p.resizable.get(&v.generation).copied() else {
            return;
        };
        tracing::info!(vm, pool, generation = p.generation, "resizing in place");
        v.resize = Some(PendingResize { from, generation: p.generation });
        v.target_hot = hot;
        self.apply(env, vm, Event::Resize);
        self.persist_vm(vm, true);
        self.start_plan(env, vm, PlanKind::Resize { hot });
    }

    /// Runs a VM's interrupted plan again, to park it hot or warm.
    pub(super) fn rerun(&mut self, env: &Env<'_>, vm: &str, kind: PlanKind, hot: bool) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.target_hot = hot;
        }
        self.start_plan(env, vm, kind);
    }

    pub(super) fn build_golden(&mut self, env: &Env<'_>, pool: &str) {
        let name = format!("{}{}-golden-{}", self.settings.prefix, pool, env.ids.suffix());
        let Some(p) = self.pools.get_mut(pool) else {
            return;
        };
        let old = p.golden.take();
        p.golden = Some(Golden { name: name.clone(), generation: p.generation, ready: false, busy: true });
        let cfg = p.cfg.clone();
        let rec = VmRecord {
            name: name.clone(),
            pool: pool.to_string(),
            generation: p.generation,
            phase: PhaseRecord::Golden,
            uses: 0,
            lease: None,
            created_ms: env.wall_ms,
        };
        // A golden record is adopted as ready after a crash only if its instance is stopped,
        // which it only is once its build finished.
        let mut writes = vec![Write::PutVm(rec)];
        // The old golden VM is retired like any other VM (recorded as being deleted, then
        // deleted by the maintenance that finishes interrupted deletes): never left behind.
        if let Some(old) = old {
            let mut vm = Vm::new(old.name.clone(), pool, old.generation, VmState::Deleting, env.now, env.wall_ms);
            vm.observe = true;
            writes.push(Write::PutVm(vm.record()));
            self.vms.insert(old.name, vm);
        }
        self.persist(&writes, true);
        self.batch.effects.push(Effect::BuildGolden { pool: cfg, vm: name });
    }
}
