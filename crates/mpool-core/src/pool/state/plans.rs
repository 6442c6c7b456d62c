//! VM events and plans: start a plan, map its outcome to the VM's next state, golden VMs.

use super::{Effect, EngineState, Env, PlanOrder};
use crate::pool::error::EngineError;
use crate::pool::outcome::{self, PlanKind};
use crate::pool::vm::{Event, Next, VmState, transition};
use crate::ports::StepError;
use crate::store::{PhaseRecord, VmRecord, Write};
use crate::types::SshEndpoint;

impl EngineState {
    /// Applies an event to a VM through the state machine.
    pub(super) fn apply(&mut self, env: &Env<'_>, name: &str, event: Event) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        match transition(vm.state, event) {
            Ok(Next::State(s)) => {
                if s.is_idle() && !vm.state.is_idle() {
                    vm.idle_since = env.now;
                }
                vm.state = s;
            }
            Ok(Next::Gone) => {
                self.vms.remove(name);
            }
            Err(e) => tracing::error!(vm = name, "ignored: {e}"),
        }
    }

    /// Whether the next VM to become idle in `pool` should stay running.
    pub(super) fn wants_hot(&self, pool: &str) -> bool {
        let Some(p) = self.pools.get(pool) else {
            return false;
        };
        let hot = self
            .vms
            .values()
            .filter(|v| v.pool == pool)
            .filter(|v| v.state == VmState::Hot || (v.state.is_coming() && v.target_hot))
            .count();
        hot < p.cfg.hot as usize
    }

    pub(super) fn start_plan(&mut self, env: &Env<'_>, name: &str, kind: PlanKind) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = true;
        vm.busy_since = env.now;
        let Some(pool) = self.pools.get(&vm.pool) else {
            return;
        };
        let peer = self
            .vms
            .values()
            .filter(|v| v.name != name && v.pool == pool.cfg.name && v.state == VmState::Hot && !v.busy)
            .find_map(|v| Some((v.name.clone(), v.ssh.clone()?)));
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        // A resize goes to the pool's sizes now, and only while they are still its own
        // generation's but for sizes (a rotation since drops it: the VM is replaced).
        let resize = match vm.resize.as_mut() {
            Some(r) if pool.resizable.contains_key(&vm.generation) => {
                r.generation = pool.generation;
                crate::pool::resize::settings(name, r.from, &pool.cfg)
            }
            _ => {
                vm.resize = None;
                Vec::new()
            }
        };
        let vm = &*vm;
        let order = PlanOrder {
            vm: name.to_string(),
            kind,
            pool: pool.cfg.clone(),
            golden: pool.golden.as_ref().filter(|g| g.ready).map(|g| g.name.clone()),
            rebuild: vm.rebuild,
            resize,
            observe: vm.observe,
            ssh: vm.ssh.clone(),
            for_waiters: !pool.waiters.is_empty(),
            waiting: pool.waiting.clone(),
            peer,
        };
        self.batch.effects.push(Effect::Start(Box::new(order)));
    }

    /// A plan ended (well or not): the VM is free again, a refresh asked for meanwhile starts, waiters are served.
    pub(super) fn plan_done(
        &mut self,
        env: &Env<'_>,
        name: &str,
        plan: PlanKind,
        result: Result<Option<SshEndpoint>, StepError>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = false;
        vm.settled_at = env.now;
        // After a failure the daemon may have done part of the plan: the next one looks first.
        vm.observe = result.is_err();
        let pool = vm.pool.clone();
        match result {
            Ok(ssh) => self.plan_succeeded(env, name, plan, ssh),
            Err(e) => self.plan_failed(env, name, plan, e),
        }
        // A refresh asked for while another plan ran on this VM.
        if self.refreshing.contains_key(name)
            && self.vms.get(name).is_some_and(|v| !v.busy && v.state == VmState::Leased)
        {
            self.start_plan(env, name, PlanKind::Refresh);
        }
        self.serve_waiters(env, &pool);
    }

    /// A plan ended well: the VM's next state from the outcome table, the caller of a wake or a
    /// refresh answered, the daemon known to answer.
    fn plan_succeeded(&mut self, env: &Env<'_>, name: &str, plan: PlanKind, ssh: Option<SshEndpoint>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let pool = vm.pool.clone();
        let state = vm.state;
        if matches!(plan, PlanKind::Reset { .. } | PlanKind::Provision { .. }) {
            // How long a VM takes to be ready again: what a demand-sized pool plans ahead for.
            let took = env.now.duration_since(vm.busy_since);
            if let Some(p) = self.pools.get_mut(&pool) {
                p.demand.refilled(took);
                if matches!(plan, PlanKind::Provision { .. }) {
                    p.demand.built(took);
                }
            }
            if matches!(plan, PlanKind::Reset { .. }) {
                self.batch.effects.push(Effect::ResetTook { pool: pool.clone(), took });
            }
        }
        match plan {
            PlanKind::Wake => match (self.waking.remove(name), ssh) {
                // A pool that requires isolation grants only on the verdict its wake measured.
                (Some(w), Some(info)) if !w.gone(env) => match self.isolation_refusal(&pool, None) {
                    None => self.grant(env, name, w, info),
                    Some(err) => {
                        for caller in w.callers {
                            self.reply(caller, Err(err.clone()));
                        }
                        if let Some(vm) = self.vms.get_mut(name) {
                            vm.ssh = Some(info);
                        }
                        self.apply(env, name, Event::Unclaimed);
                    }
                },
                (_, info) => {
                    if let Some(vm) = self.vms.get_mut(name) {
                        vm.ssh = info;
                    }
                    self.apply(env, name, Event::Unclaimed);
                }
            },
            PlanKind::Refresh => {
                if let Some(vm) = self.vms.get_mut(name) {
                    vm.ssh = ssh;
                }
                self.answer_refresh(name, None);
            }
            PlanKind::Check => {
                if let Some(vm) = self.vms.get_mut(name) {
                    vm.ssh = ssh;
                }
            }
            _ => {
                let running = ssh.is_some();
                if let Some(vm) = self.vms.get_mut(name) {
                    let renewed =
                        matches!(plan, PlanKind::Provision { .. } | PlanKind::Reset { .. } | PlanKind::Resize { .. });
                    vm.rebuild &= !renewed;
                    // Resized (or rebuilt at the current sizes): of the generation it was resized to.
                    if let Some(r) = vm.resize.take_if(|_| renewed) {
                        vm.generation = r.generation;
                    }
                    vm.ssh = ssh;
                }
                if let Some(ev) = outcome::on_success(plan, state, running) {
                    self.apply(env, name, ev);
                }
                match plan {
                    PlanKind::Destroy => self.persist(&[Write::DeleteVm(name.to_string())], true),
                    // Idle states are written lazily: losing one costs one extra reset.
                    _ => self.persist_vm(name, false),
                }
            }
        }
        self.daemon_ok_now(env);
    }

    /// A plan failed: a waking caller keeps its place (or hears that the daemon is down), a
    /// refresh is answered with the cause, and the VM's next state comes from the outcome table.
    fn plan_failed(&mut self, env: &Env<'_>, name: &str, plan: PlanKind, e: StepError) {
        let Some(vm) = self.vms.get(name) else {
            return;
        };
        let pool = vm.pool.clone();
        let state = vm.state;
        tracing::warn!(vm = name, ?plan, unavailable = e.unavailable, "step failed: {}", e.message);
        if plan == PlanKind::Wake
            && let Some(w) = self.waking.remove(name)
        {
            // The caller keeps its place and gets another VM (or fails fast if the daemon is down).
            if e.unavailable {
                for caller in w.callers {
                    self.reply(caller, Err(EngineError::Unavailable(e.message.clone())));
                }
            } else if let Some(p) = self.pools.get_mut(&pool) {
                p.waiters.push_front(w);
            }
        }
        if plan == PlanKind::Refresh {
            let err = EngineError::Unavailable(format!("cannot read the VM's SSH endpoint: {}", e.message));
            self.answer_refresh(name, Some(err));
        }
        if let Some(ev) = outcome::on_failure(plan, state, e.unavailable) {
            self.apply(env, name, ev);
            if let Some(vm) = self.vms.get_mut(name) {
                vm.ssh = None;
            }
            self.persist_vm(name, true);
        }
        if e.unavailable {
            self.daemon_down(&e.message);
        }
    }

    /// Answers callers waiting for a leased VM's endpoint.
    pub(super) fn answer_refresh(&mut self, vm: &str, err: Option<EngineError>) {
        for (caller, id) in self.refreshing.remove(vm).unwrap_or_default() {
            let answer = match &err {
                Some(e) => Err(e.clone()),
                None => self.lease_info(&id, None),
            };
            self.reply_lease(caller, answer);
        }
    }

    pub(super) fn golden_done(&mut self, env: &Env<'_>, pool: &str, vm: &str, result: Result<(), StepError>) {
        let Some(p) = self.pools.get_mut(pool) else {
            return;
        };
        let Some(g) = p.golden.as_mut().filter(|g| g.name == vm) else {
            return;
        };
        g.busy = false;
        match result {
            Ok(()) => {
                g.ready = true;
                let rec = VmRecord {
                    name: vm.to_string(),
                    pool: pool.to_string(),
                    generation: g.generation,
                    phase: PhaseRecord::Golden,
                    uses: 0,
                    lease: None,
                    created_ms: env.wall_ms,
                };
                self.persist(&[Write::PutVm(rec)], true);
            }
            Err(e) => {
                tracing::warn!(pool, vm, "building the golden VM failed: {}", e.message);
                if e.unavailable {
                    self.daemon_down(&e.message);
                }
            }
        }
    }
}
