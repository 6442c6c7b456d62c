//! Lease calls: acquire (waiters, request ids, grants), renew, release, refresh, expiries.

use super::{CallerId, EngineState, Env, PendingResize, Waiter, millis};
use crate::pool::error::EngineError;
use crate::pool::leases::{AcquireRequest, LeaseInfo, MAX_REQUEST_ID, Served};
use crate::pool::outcome::PlanKind;
use crate::pool::vm::{Event, VmState};
use crate::store::{LeaseRecord, RequestKind, RunOutcome, Write};
use crate::types::SshEndpoint;
use std::time::Duration;

impl EngineState {
    pub(super) fn acquire(&mut self, env: &Env<'_>, req: AcquireRequest, caller: CallerId) {
        let Some(pool) = self.pools.get(&req.pool).filter(|p| !p.removed) else {
            return self.reply(caller, Err(EngineError::UnknownPool(req.pool.clone())));
        };
        let cfg = &pool.cfg;
        let ttl = req.ttl.unwrap_or(cfg.default_ttl);
        if ttl.is_zero() || ttl > cfg.max_ttl {
            let msg = format!("ttl {ttl:?} must be above zero and at most the pool's max_ttl {:?}", cfg.max_ttl);
            return self.reply(caller, Err(EngineError::InvalidArgument(msg)));
        }
        let wait = req.wait.unwrap_or(cfg.max_wait);
        if wait > cfg.max_wait {
            let msg = format!("wait {wait:?} is longer than the pool's max_wait {:?}", cfg.max_wait);
            return self.reply(caller, Err(EngineError::InvalidArgument(msg)));
        }
        if let Some(key) = req.key() {
            if key.request_id.len() > MAX_REQUEST_ID || key.request_id.chars().any(char::is_control) {
                let msg = format!("request_id must be at most {MAX_REQUEST_ID} bytes of printable text");
                return self.reply(caller, Err(EngineError::InvalidArgument(msg)));
            }
            if let Some(r) = self.book.request(&key) {
                let run = r.kind == RequestKind::Run || req.kind == RequestKind::Run;
                let answer = match (r.ended_ms, self.book.get(&r.lease)) {
                    (None, Some(_)) if run => {
                        Err(EngineError::InProgress { request_id: key.request_id.clone(), lease: r.lease.clone() })
                    }
                    // The same request again: the same lease.
                    (None, Some(_)) => self.lease_info(&r.lease, None).map(|mut i| {
                        i.served = Served::Repeat;
                        i
                    }),
                    _ => Err(EngineError::RequestEnded {
                        request_id: key.request_id.clone(),
                        lease: r.lease.clone(),
                        outcome: if r.kind == RequestKind::Run { r.outcome.clone().map(Box::new) } else { None },
                    }),
                };
                return self.reply_lease(caller, answer);
            }
            // The same request is waiting for a VM: a place beside it (never for a Run).
            let same = |w: &Waiter| w.req.key().as_ref() == Some(&key);
            let waiter = match self.pools.get_mut(&req.pool).and_then(|p| p.waiters.iter_mut().find(|w| same(w))) {
                Some(w) => Some(w),
                None => self.waking.values_mut().find(|w| same(w)),
            };
            if let Some(w) = waiter {
                if w.req.kind == RequestKind::Run || req.kind == RequestKind::Run {
                    let err = EngineError::InProgress { request_id: key.request_id, lease: String::new() };
                    self.reply(caller, Err(err));
                } else {
                    w.callers.push(caller);
                }
                return;
            }
        }
        if !self.reconciled {
            return self.reply(caller, Err(EngineError::Unavailable("mpool has not reached multipassd yet".into())));
        }
        if let Some(err) = self.isolation_refusal(&req.pool, Some(env.now)) {
            return self.reply(caller, Err(err));
        }
        let waiter = Waiter {
            req,
            callers: vec![caller],
            since: env.now,
            deadline: env.now + wait,
            ttl,
            served: Served::Cold,
            queued: false,
        };
        let pool_name = waiter.req.pool.clone();
        if let Some(p) = self.pools.get_mut(&pool_name) {
            p.demand.arrival(env.now, p.cfg.autoscale_decay);
            p.waiters.push_back(waiter);
        }
        self.serve_waiters(env, &pool_name);
        if let Some(p) = self.pools.get_mut(&pool_name) {
            for w in p.waiters.iter_mut() {
                w.queued = true;
            }
        }
    }

    /// Hands idle VMs to waiting callers: hot VMs first (a readiness check only), then warm
    /// ones (a resume); the next caller is the fair share's pick (round-robin across owners,
    /// first come first served within one, never beyond an owner's limit).
    pub(super) fn serve_waiters(&mut self, env: &Env<'_>, pool_name: &str) {
        loop {
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            pool.waiters.retain(|w| !w.gone(env));
            if pool.waiters.is_empty() {
                pool.fair.forget(&[]);
                return;
            }
            if let Some(err) = self.isolation_refusal(pool_name, Some(env.now)) {
                return self.refuse_waiters(pool_name, &err);
            }
            let free = |s: VmState| {
                self.vms
                    .values()
                    .filter(|v| v.pool == pool_name && v.state == s && !v.busy)
                    .map(|v| v.name.clone())
                    .next()
            };
            let (vm, served) = match (free(VmState::Hot), free(VmState::Warm)) {
                (Some(vm), _) => (vm, Served::Hot),
                (None, Some(vm)) if self.daemon_ok => (vm, Served::Warm),
                _ => {
                    if !self.daemon_ok {
                        let err =
                            EngineError::Unavailable("multipassd does not answer and no running VM is free".into());
                        self.refuse_waiters(pool_name, &err);
                    }
                    return;
                }
            };
            let held = self.held_by_owner(pool_name);
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            let owners: Vec<&str> = pool.waiters.iter().map(Waiter::owner).collect();
            let Some(i) = pool.fair.pick(&owners, &held) else {
                // Every waiting owner holds its limit: they wait for their own releases.
                return;
            };
            let Some(mut waiter) = pool.waiters.remove(i) else {
                return;
            };
            let owners: Vec<&str> = pool.waiters.iter().map(Waiter::owner).collect();
            pool.fair.served(waiter.owner(), &owners);
            waiter.served = if waiter.queued { Served::Cold } else { served };
            self.apply(env, &vm, Event::Wake);
            self.waking.insert(vm.clone(), waiter);
            self.start_plan(env, &vm, PlanKind::Wake);
        }
    }

    /// Answers every waiter of a pool with `err`.
    fn refuse_waiters(&mut self, pool_name: &str, err: &EngineError) {
        let callers: Vec<CallerId> = self
            .pools
            .get_mut(pool_name)
            .map(|p| p.waiters.drain(..).flat_map(|w| w.callers).collect())
            .unwrap_or_default();
        for caller in callers {
            self.reply(caller, Err(err.clone()));
        }
    }

    pub(super) fn grant(&mut self, env: &Env<'_>, vm_name: &str, waiter: Waiter, ssh: SshEndpoint) {
        let now = env.wall_ms;
        let rec = LeaseRecord {
            id: format!("lease-{}{}", env.ids.suffix(), env.ids.suffix()),
            pool: waiter.req.pool.clone(),
            vm: vm_name.to_string(),
            holder: waiter.req.holder.clone(),
            request_id: waiter.req.request_id.clone(),
            granted_ms: now,
            expires_ms: now.saturating_add(millis(waiter.ttl)),
            owner: waiter.req.owner.clone().unwrap_or_default(),
        };
        self.apply(env, vm_name, Event::Woken);
        let Some(vm) = self.vms.get_mut(vm_name) else {
            return;
        };
        vm.lease = Some(rec.id.clone());
        vm.uses = vm.uses.saturating_add(1);
        vm.ssh = Some(ssh.clone());
        // Durable before the caller hears of it.
        let mut writes = vec![Write::PutVm(vm.record())];
        writes.extend(self.book.grant(rec.clone(), env.now + waiter.ttl, waiter.req.kind));
        self.persist(&writes, true);
        let info = LeaseInfo {
            record: rec,
            ssh: Some(ssh),
            served: waiter.served,
            waited: env.now.duration_since(waiter.since),
        };
        // Callers that joined the first with the same request id get the same lease, as a repeat.
        for (i, caller) in waiter.callers.into_iter().enumerate() {
            let served = if i == 0 { info.served } else { Served::Repeat };
            self.reply_lease(caller, Ok(LeaseInfo { served, ..info.clone() }));
        }
    }

    pub(super) fn lease_info(&self, id: &str, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
        let l = self.book.check(id, owner)?;
        let ssh = self.vms.get(&l.record.vm).and_then(|v| v.ssh.clone());
        Ok(LeaseInfo { record: l.record.clone(), ssh, served: Served::Repeat, waited: Duration::ZERO })
    }

    pub(super) fn renew(
        &mut self,
        env: &Env<'_>,
        id: &str,
        ttl: Option<Duration>,
        owner: Option<&str>,
    ) -> Result<LeaseInfo, EngineError> {
        let l = self.book.check(id, owner)?;
        let cfg = &self.pools.get(&l.record.pool).ok_or_else(|| EngineError::UnknownPool(l.record.pool.clone()))?.cfg;
        let ttl = ttl.unwrap_or(cfg.default_ttl);
        if ttl.is_zero() || ttl > cfg.max_ttl {
            return Err(EngineError::InvalidArgument(format!(
                "ttl {ttl:?} must be above zero and at most the pool's max_ttl {:?}",
                cfg.max_ttl
            )));
        }
        let writes =
            self.book.renew(id, ttl, env.now, env.wall_ms).ok_or_else(|| EngineError::UnknownLease(id.into()))?;
        self.persist(&writes, true);
        self.lease_info(id, owner)
    }

    /// Ends a lease (recording a Run's outcome) and starts its VM's reset.
    pub(super) fn release(
        &mut self,
        env: &Env<'_>,
        id: &str,
        owner: Option<&str>,
        reason: &str,
        outcome: Option<RunOutcome>,
    ) -> Result<(), EngineError> {
        match self.book.check(id, owner) {
            Ok(_) => {}
            Err(EngineError::LeaseEnded { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some((lease, mut writes)) = self.book.end(id, reason, env.wall_ms, outcome) else {
            return Ok(());
        };
        let vm_name = lease.record.vm.clone();
        if let Some(vm) = self.vms.get_mut(&vm_name) {
            vm.lease = None;
            let pool = self.pools.get(&vm.pool);
            let max_uses = pool.map(|p| p.cfg.max_uses).unwrap_or(0);
            let generation = pool.map(|p| p.generation).unwrap_or(0);
            let used_up = max_uses > 0 && vm.uses >= max_uses;
            // Out of date only in sizes: a snapshot pool's VM is resized in place by its reset.
            let resize_from = pool
                .filter(|p| p.cfg.reset == crate::pool_config::ResetStrategy::Snapshot)
                .and_then(|p| p.resizable.get(&vm.generation).copied())
                .filter(|_| vm.generation < generation && !used_up);
            vm.resize = resize_from.map(|from| PendingResize { from, generation });
            vm.rebuild = used_up || (vm.generation < generation && vm.resize.is_none());
            if vm.rebuild {
                vm.uses = 0;
                vm.generation = generation;
            }
        }
        if self.vms.get(&vm_name).is_some_and(|v| v.state == VmState::Leased) {
            self.apply(env, &vm_name, Event::Release);
            if let Some(vm) = self.vms.get(&vm_name) {
                writes.push(Write::PutVm(vm.record()));
            }
        }
        self.persist(&writes, true);
        tracing::info!(lease = id, vm = %vm_name, reason, "lease ended");
        if self.vms.get(&vm_name).is_some_and(|v| v.state == VmState::Resetting && !v.busy) {
            let hot = self.wants_hot(&lease.record.pool);
            if let Some(vm) = self.vms.get_mut(&vm_name) {
                vm.target_hot = hot;
            }
            self.start_plan(env, &vm_name, PlanKind::Reset { hot });
        }
        Ok(())
    }

    /// Re-reads a leased VM's SSH endpoint for a caller.
    pub(super) fn refresh(&mut self, env: &Env<'_>, id: &str, owner: Option<&str>, caller: CallerId) {
        let vm = match self.book.check(id, owner) {
            Ok(l) => l.record.vm.clone(),
            Err(e) => return self.reply(caller, Err(e)),
        };
        if !self.daemon_ok {
            return self.reply(caller, Err(EngineError::Unavailable("multipassd does not answer".into())));
        }
        let busy = self.vms.get(&vm).is_none_or(|v| v.busy);
        self.refreshing.entry(vm.clone()).or_default().push((caller, id.to_string()));
        if !busy {
            self.start_plan(env, &vm, PlanKind::Refresh);
        }
    }

    /// Expired waiters and leases; a due store retry.
    pub(super) fn deadlines(&mut self, env: &Env<'_>) {
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let leased = self.vms.values().filter(|v| v.pool == name && v.state == VmState::Leased).count();
            let held = self.held_by_owner(&name);
            let Some(pool) = self.pools.get_mut(&name) else {
                continue;
            };
            let max_size = pool.cfg.max_size;
            let (expired, kept): (Vec<Waiter>, Vec<Waiter>) =
                pool.waiters.drain(..).partition(|w| w.deadline <= env.now);
            pool.waiters = kept.into();
            let answers: Vec<(Vec<CallerId>, EngineError)> = expired
                .into_iter()
                .map(|w| {
                    let waited = env.now.duration_since(w.since);
                    let owner = w.owner().to_string();
                    let err = match held.get(&owner).copied().unwrap_or(0) {
                        // Held back by its owner's limit, not by the pool's size.
                        n if !pool.fair.may_take(n) => EngineError::OwnerLimit {
                            pool: name.clone(),
                            owner,
                            held: n,
                            limit: pool.fair.limit(),
                            waited,
                        },
                        _ => EngineError::Exhausted { pool: name.clone(), waited, leased, max_size },
                    };
                    (w.callers, err)
                })
                .collect();
            for (callers, err) in answers {
                for caller in callers {
                    self.reply(caller, Err(err.clone()));
                }
            }
        }
        for id in self.book.expired(env.now) {
            let _ = self.release(env, &id, None, "expired", None);
        }
    }
}
