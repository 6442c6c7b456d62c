//! The engine's state and every decision it makes, as a plain state machine: inputs (callers'
//! requests, plan outcomes, daemon observations, store probes, the passing of time) go in
//! through [`EngineState::handle`] (and [`EngineState::maintain`] after each batch); what to do comes out as a [`Batch`] of store writes and
//! [`Effect`]s (replies, plans to start, observations, probes). No I/O, no clock, no randomness:
//! time and name parts arrive in an [`Env`]. The actor in `mpool-engine` feeds it and performs
//! what it says.
//!
//! The batch protocol is the engine's promise: a batch's writes are stored (durably when any
//! must be) before any of its effects happen; if the write fails, [`EngineState::store_failed`]
//! makes the engine forget its memory as a crash would, and the batch's effects are dropped or
//! answered with the store's error. Reconciliation then runs again once the store works.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use crate::pool_config::{PoolConfig, ResetStrategy};
use crate::ports::{Ids, Observed, StepError};
use crate::store::{LeaseRecord, PhaseRecord, PoolRecord, RequestKind, RunOutcome, Snapshot, VmRecord, Write};
use crate::types::SshEndpoint;

use super::decide::{self, Action, GoldenView, PoolView, VmView};
use super::drift::{self, Drift};
use super::error::EngineError;
use super::leases::{AcquireRequest, LeaseBook, LeaseInfo, MAX_REQUEST_ID, Served};
use super::outcome::{self, PlanKind};
use super::reconcile;
use super::status::{PoolStatus, Status, VmStatus};
use super::vm::{Event, Next, VmState, transition};

/// Identifies a caller waiting for an answer (the actor keeps its reply channel).
pub type CallerId = u64;

/// What a decision may read of the world: time, name parts, and whether a caller still waits.
pub struct Env<'a> {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, on the wall clock (unix milliseconds).
    pub wall_ms: u64,
    /// Random name parts.
    pub ids: &'a dyn Ids,
    /// Whether a caller has gone away (its reply would reach nobody).
    pub gone: &'a dyn Fn(CallerId) -> bool,
}

/// Something that happened.
#[derive(Debug)]
pub enum Input {
    /// A caller wants a lease.
    Acquire(AcquireRequest, CallerId),
    /// A holder extends its lease by `ttl` (default: the pool's).
    Renew {
        /// Lease id.
        id: String,
        /// The new TTL from now.
        ttl: Option<Duration>,
        /// The caller's principal (`None`: any).
        owner: Option<String>,
        /// Who waits for the answer.
        caller: CallerId,
    },
    /// A holder ends its lease (a Run records its outcome).
    Release {
        /// Lease id.
        id: String,
        /// The caller's principal.
        owner: Option<String>,
        /// A Run's outcome.
        outcome: Option<RunOutcome>,
        /// Who waits for the answer.
        caller: CallerId,
    },
    /// An exec or transfer starts on a lease: it does not expire meanwhile.
    BeginUse {
        /// Lease id.
        id: String,
        /// The caller's principal.
        owner: Option<String>,
        /// Who waits for the answer.
        caller: CallerId,
    },
    /// An exec or transfer ended.
    EndUse {
        /// Lease id.
        id: String,
    },
    /// A holder wants its VM's SSH endpoint read again.
    Refresh {
        /// Lease id.
        id: String,
        /// The caller's principal.
        owner: Option<String>,
        /// Who waits for the answer.
        caller: CallerId,
    },
    /// A plan ended.
    PlanDone {
        /// Its VM.
        vm: String,
        /// Which plan.
        plan: PlanKind,
        /// The SSH endpoint when the VM was left running, or why it failed.
        result: Result<Option<SshEndpoint>, StepError>,
    },
    /// A golden VM's build ended.
    GoldenDone {
        /// Its pool.
        pool: String,
        /// The golden VM.
        vm: String,
        /// Whether it worked.
        result: Result<(), StepError>,
    },
    /// The daemon's list of instances (or why it could not be read).
    Observed(Result<Vec<Observed>, StepError>),
    /// A probe of the failed store: what it holds, or why it still fails.
    StoreProbed(Result<Snapshot, String>),
    /// Time passed: deadlines and maintenance.
    Tick,
}

/// An answer to a caller.
// One answer per call, moved once to its caller: boxing the lease would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Answer {
    /// A lease (acquire, renew, begin-use, refresh).
    Lease(LeaseInfo),
    /// Done (release).
    Done,
}

/// A plan to run on a VM, with everything it needs.
#[derive(Clone, Debug)]
pub struct PlanOrder {
    /// The VM.
    pub vm: String,
    /// Which plan.
    pub kind: PlanKind,
    /// Its pool's settings.
    pub pool: PoolConfig,
    /// The clone source (clone pools), when ready.
    pub golden: Option<String>,
    /// Rebuild instead of restoring.
    pub rebuild: bool,
    /// Read the instance's state from the daemon first (the engine cannot be sure of it).
    pub observe: bool,
    /// Its known SSH endpoint.
    pub ssh: Option<SshEndpoint>,
    /// Callers of its pool are waiting (its daemon calls go first).
    pub for_waiters: bool,
    /// Live count of its pool's waiting callers (a VM they need stays running).
    pub waiting: Arc<AtomicUsize>,
}

/// What to do once the batch's writes are stored.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Answer a caller.
    Reply {
        /// Who.
        caller: CallerId,
        /// What.
        answer: Result<Answer, EngineError>,
    },
    /// Run a plan.
    Start(PlanOrder),
    /// Build a clone pool's golden VM.
    BuildGolden {
        /// Pool.
        pool: PoolConfig,
        /// The new golden VM's name.
        vm: String,
    },
    /// Delete an instance with our prefix that the store does not know.
    DeleteStray(String),
    /// Drop a VM's pooled SSH connection (its host key may be new).
    ForgetSsh(String),
    /// Read the daemon's instances now.
    Observe,
    /// Probe the failed store with these writes, then read it.
    ProbeStore(Vec<Write>),
    /// A reset took this long (for metrics).
    ResetTook {
        /// Pool.
        pool: String,
        /// How long.
        took: Duration,
    },
}

/// The writes and effects of the inputs handled since the last [`EngineState::take_batch`].
#[derive(Debug, Default)]
pub struct Batch {
    /// Store writes, in order.
    pub writes: Vec<Write>,
    /// Whether they must be durable (fsync).
    pub durable: bool,
    /// What to do once they are stored, in order.
    pub effects: Vec<Effect>,
}

/// What the state machine is set up with.
#[derive(Clone, Debug)]
pub struct StateSettings {
    /// Name prefix of every instance mpool owns.
    pub prefix: String,
    /// Delete instances with our prefix that the store does not know.
    pub delete_strays: bool,
    /// First pause before retrying a store that failed.
    pub store_retry: Duration,
    /// The longest pause between store retries.
    pub store_retry_max: Duration,
}

struct Pool {
    cfg: PoolConfig,
    generation: u64,
    waiters: VecDeque<Waiter>,
    golden: Option<Golden>,
    /// `waiters.len()` as of the last batch, for plans: a VM being reset or provisioned stays
    /// running when callers wait for it.
    waiting: Arc<AtomicUsize>,
}

struct Golden {
    name: String,
    generation: u64,
    ready: bool,
    busy: bool,
}

struct Vm {
    name: String,
    pool: String,
    generation: u64,
    state: VmState,
    busy: bool,
    uses: u32,
    lease: Option<String>,
    ssh: Option<SshEndpoint>,
    target_hot: bool,
    idle_since: Instant,
    created_ms: u64,
    /// Rebuild instead of restoring on the next reset.
    rebuild: bool,
    /// When the running plan started.
    busy_since: Instant,
    /// Since when the daemon reports it Starting or Restarting: transient, waited for up to
    /// the pool's readiness timeout.
    transient_since: Option<Instant>,
    /// The engine cannot be sure what the daemon did last (a crash, a failed call): its next
    /// plan reads the instance's state from the daemon first.
    observe: bool,
}

impl Vm {
    fn new(name: String, pool: &str, generation: u64, state: VmState, now: Instant, now_ms: u64) -> Vm {
        Vm {
            name,
            pool: pool.to_string(),
            generation,
            state,
            busy: false,
            uses: 0,
            lease: None,
            ssh: None,
            target_hot: false,
            idle_since: now,
            created_ms: now_ms,
            rebuild: false,
            busy_since: now,
            transient_since: None,
            observe: false,
        }
    }

    fn record(&self) -> VmRecord {
        VmRecord {
            name: self.name.clone(),
            pool: self.pool.clone(),
            generation: self.generation,
            phase: self.state.record(),
            uses: self.uses,
            lease: self.lease.clone(),
            created_ms: self.created_ms,
        }
    }
}

struct Waiter {
    req: AcquireRequest,
    callers: Vec<CallerId>,
    since: Instant,
    deadline: Instant,
    ttl: Duration,
    /// How it was served (for reporting).
    served: Served,
    /// No VM was free when it arrived: it waited for one to be created or reset.
    queued: bool,
}

impl Waiter {
    fn gone(&self, env: &Env<'_>) -> bool {
        self.callers.iter().all(|c| (env.gone)(*c))
    }
}

/// The store failed: what the engine knows about its recovery.
struct Degraded {
    cause: String,
    retry_at: Instant,
    backoff: Duration,
    probing: bool,
}

/// The engine's state.
pub struct EngineState {
    settings: StateSettings,
    pools: BTreeMap<String, Pool>,
    vms: BTreeMap<String, Vm>,
    book: LeaseBook,
    waking: HashMap<String, Waiter>,
    /// Callers waiting for a leased VM's endpoint to be read again, by VM.
    refreshing: HashMap<String, Vec<(CallerId, String)>>,
    daemon_ok: bool,
    reconciled: bool,
    /// What the store held at start (or after a store recovery), until reconciliation.
    store_snapshot: Option<Snapshot>,
    /// VMs to reset before anyone gets them at the next reconciliation.
    doubt: HashSet<String>,
    /// Set while the store cannot be written.
    degraded: Option<Degraded>,
    batch: Batch,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EngineState {
    /// A state for these pools (with the generations the store gave them) and what the store
    /// holds; it reconciles at the first observation of the daemon.
    pub fn new(settings: StateSettings, pools: Vec<(PoolConfig, u64)>, snapshot: Snapshot) -> EngineState {
        let pools = pools
            .into_iter()
            .map(|(cfg, generation)| {
                (
                    cfg.name.clone(),
                    Pool { cfg, generation, waiters: VecDeque::new(), golden: None, waiting: Default::default() },
                )
            })
            .collect();
        EngineState {
            settings,
            pools,
            vms: BTreeMap::new(),
            book: LeaseBook::default(),
            waking: HashMap::new(),
            refreshing: HashMap::new(),
            daemon_ok: false,
            reconciled: false,
            store_snapshot: Some(snapshot),
            doubt: HashSet::new(),
            degraded: None,
            batch: Batch::default(),
        }
    }

    /// What the batch of the inputs handled so far does; also updates the waiting counts plans
    /// read.
    pub fn take_batch(&mut self) -> Batch {
        for p in self.pools.values() {
            p.waiting.store(p.waiters.len(), std::sync::atomic::Ordering::Relaxed);
        }
        std::mem::take(&mut self.batch)
    }

    /// Whether mpool can serve: the daemon answers and the store takes writes.
    pub fn healthy(&self) -> bool {
        self.daemon_ok && self.degraded.is_none()
    }

    /// When [`Input::Tick`] is next due (a waiter's or a lease's deadline, a store retry).
    pub fn next_deadline(&self) -> Option<Instant> {
        let waiters = self.pools.values().flat_map(|p| p.waiters.iter().map(|w| w.deadline));
        let store = self.degraded.as_ref().filter(|d| !d.probing).map(|d| d.retry_at);
        waiters.chain(self.book.next_deadline()).chain(store).min()
    }

    fn reply(&mut self, caller: CallerId, answer: Result<Answer, EngineError>) {
        self.batch.effects.push(Effect::Reply { caller, answer });
    }

    fn reply_lease(&mut self, caller: CallerId, answer: Result<LeaseInfo, EngineError>) {
        self.reply(caller, answer.map(Answer::Lease));
    }

    fn persist(&mut self, writes: &[Write], durable: bool) {
        self.batch.writes.extend_from_slice(writes);
        self.batch.durable |= durable;
    }

    fn persist_vm(&mut self, name: &str, durable: bool) {
        if let Some(v) = self.vms.get(name) {
            let rec = v.record();
            self.persist(&[Write::PutVm(rec)], durable);
        }
    }

    /// Handles one input.
    pub fn handle(&mut self, env: &Env<'_>, input: Input) {
        if let Some(d) = &self.degraded {
            // Nothing can be promised while the store fails.
            let err = EngineError::StoreUnavailable(d.cause.clone());
            match input {
                Input::Acquire(_, caller)
                | Input::Renew { caller, .. }
                | Input::Release { caller, .. }
                | Input::BeginUse { caller, .. }
                | Input::Refresh { caller, .. } => self.reply(caller, Err(err)),
                Input::Observed(result) => self.observed_daemon(&result),
                Input::StoreProbed(result) => self.store_probed(env, result),
                Input::Tick => self.retry_store(env),
                // Work of the memory that was dropped: stale.
                Input::EndUse { .. } | Input::PlanDone { .. } | Input::GoldenDone { .. } => {}
            }
            return;
        }
        if !self.reconciled {
            // Leases are restored at reconciliation: until then nobody can be told about one.
            let err = EngineError::Unavailable("mpool has not reached multipassd yet".into());
            match input {
                Input::Renew { caller, .. }
                | Input::Release { caller, .. }
                | Input::BeginUse { caller, .. }
                | Input::Refresh { caller, .. } => return self.reply(caller, Err(err)),
                _ => {}
            }
        }
        match input {
            Input::Acquire(req, caller) => self.acquire(env, req, caller),
            Input::Renew { id, ttl, owner, caller } => {
                let r = self.renew(env, &id, ttl, owner.as_deref());
                self.reply_lease(caller, r);
            }
            Input::Release { id, owner, outcome, caller } => {
                let r = self.release(env, &id, owner.as_deref(), "released", outcome);
                self.reply(caller, r.map(|_| Answer::Done));
            }
            Input::BeginUse { id, owner, caller } => {
                let r = self.lease_info(&id, owner.as_deref());
                if r.is_ok() {
                    self.book.set_in_use(&id, true);
                }
                self.reply_lease(caller, r);
            }
            Input::EndUse { id } => self.book.set_in_use(&id, false),
            Input::Refresh { id, owner, caller } => self.refresh(env, &id, owner.as_deref(), caller),
            Input::PlanDone { vm, plan, result } => self.plan_done(env, &vm, plan, result),
            Input::GoldenDone { pool, vm, result } => self.golden_done(env, &pool, &vm, result),
            Input::Observed(result) => self.observed(env, result),
            Input::StoreProbed(result) => self.store_probed(env, result),
            Input::Tick => self.deadlines(env),
        }
    }

    // ------------------------------------------------------------------ the store

    /// The batch's write failed: nothing of it happened as far as anyone outside knows. The
    /// actor fails the batch's replies and drops its other effects; here the engine forgets its
    /// memory (as a crash would), marks what the batch and the work in flight touched as in
    /// doubt, and answers everyone else waiting with the store's error. The returned effects
    /// happen at once (no write precedes them); the actor also aborts all work in flight.
    pub fn store_failed(&mut self, env: &Env<'_>, cause: String, writes: &[Write]) -> Vec<Effect> {
        tracing::error!(
            "state store write failed: {cause}; failing this batch's requests, starting none of its daemon calls, \
             and retrying the store"
        );
        let err = EngineError::StoreUnavailable(cause.clone());
        self.doubt.extend(writes.iter().filter_map(|w| w.vm()).map(str::to_string));
        self.doubt.extend(self.vms.values().filter(|v| v.busy || v.state == VmState::Waking).map(|v| v.name.clone()));
        let mut out = Vec::new();
        for p in self.pools.values_mut() {
            for w in p.waiters.drain(..) {
                out.extend(w.callers.into_iter().map(|caller| Effect::Reply { caller, answer: Err(err.clone()) }));
            }
            p.golden = None;
        }
        for (_, w) in self.waking.drain() {
            out.extend(w.callers.into_iter().map(|caller| Effect::Reply { caller, answer: Err(err.clone()) }));
        }
        for (_, waiting) in self.refreshing.drain() {
            out.extend(waiting.into_iter().map(|(caller, _)| Effect::Reply { caller, answer: Err(err.clone()) }));
        }
        self.vms.clear();
        self.book = LeaseBook::default();
        self.reconciled = false;
        self.store_snapshot = None;
        self.batch = Batch::default();
        let backoff = self.settings.store_retry;
        self.degraded = Some(Degraded { cause, retry_at: env.now + backoff, backoff, probing: false });
        out
    }

    /// Probes a failed store (a real durable write, then a read) when its retry is due.
    fn retry_store(&mut self, env: &Env<'_>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        if d.probing || env.now < d.retry_at {
            return;
        }
        d.probing = true;
        let probe: Vec<Write> = self
            .pools
            .values()
            .map(|p| {
                Write::PutPool(PoolRecord {
                    name: p.cfg.name.clone(),
                    generation: p.generation,
                    key: p.cfg.generation_key(),
                })
            })
            .collect();
        self.batch.effects.push(Effect::ProbeStore(probe));
    }

    fn store_probed(&mut self, env: &Env<'_>, result: Result<Snapshot, String>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        d.probing = false;
        match result {
            Ok(snapshot) => {
                tracing::info!("state store takes writes again; reconciling with multipassd");
                self.degraded = None;
                self.store_snapshot = Some(snapshot);
                self.reconciled = false;
                self.batch.effects.push(Effect::Observe);
            }
            Err(e) => {
                d.backoff = (d.backoff * 2).min(self.settings.store_retry_max);
                d.retry_at = env.now + d.backoff;
                d.cause = e;
                tracing::warn!(retry_in = ?d.backoff, "state store still fails: {}", d.cause);
            }
        }
    }

    // ------------------------------------------------------------------ leases

    fn acquire(&mut self, env: &Env<'_>, req: AcquireRequest, caller: CallerId) {
        let Some(pool) = self.pools.get(&req.pool) else {
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
            p.waiters.push_back(waiter);
        }
        self.serve_waiters(env, &pool_name);
        if let Some(p) = self.pools.get_mut(&pool_name) {
            for w in p.waiters.iter_mut() {
                w.queued = true;
            }
        }
    }

    /// Hands idle VMs to waiting callers, first come first served: hot VMs first (a readiness
    /// check only), then warm ones (a resume).
    fn serve_waiters(&mut self, env: &Env<'_>, pool_name: &str) {
        loop {
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            while pool.waiters.front().is_some_and(|w| w.gone(env)) {
                pool.waiters.pop_front();
            }
            if pool.waiters.is_empty() {
                return;
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
                        let callers: Vec<CallerId> = self
                            .pools
                            .get_mut(pool_name)
                            .map(|p| p.waiters.drain(..).flat_map(|w| w.callers).collect())
                            .unwrap_or_default();
                        for caller in callers {
                            self.reply(caller, Err(err.clone()));
                        }
                    }
                    return;
                }
            };
            let Some(mut waiter) = self.pools.get_mut(pool_name).and_then(|p| p.waiters.pop_front()) else {
                return;
            };
            waiter.served = if waiter.queued { Served::Cold } else { served };
            self.apply(env, &vm, Event::Wake);
            self.waking.insert(vm.clone(), waiter);
            self.start_plan(env, &vm, PlanKind::Wake);
        }
    }

    fn grant(&mut self, env: &Env<'_>, vm_name: &str, waiter: Waiter, ssh: SshEndpoint) {
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

    fn lease_info(&self, id: &str, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
        let l = self.book.check(id, owner)?;
        let ssh = self.vms.get(&l.record.vm).and_then(|v| v.ssh.clone());
        Ok(LeaseInfo { record: l.record.clone(), ssh, served: Served::Repeat, waited: Duration::ZERO })
    }

    fn renew(
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
    fn release(
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
            vm.rebuild = (max_uses > 0 && vm.uses >= max_uses) || vm.generation < generation;
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
    fn refresh(&mut self, env: &Env<'_>, id: &str, owner: Option<&str>, caller: CallerId) {
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
    fn deadlines(&mut self, env: &Env<'_>) {
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let leased = self.vms.values().filter(|v| v.pool == name && v.state == VmState::Leased).count();
            let Some(pool) = self.pools.get_mut(&name) else {
                continue;
            };
            let max_size = pool.cfg.max_size;
            let (expired, kept): (Vec<Waiter>, Vec<Waiter>) =
                pool.waiters.drain(..).partition(|w| w.deadline <= env.now);
            pool.waiters = kept.into();
            for w in expired {
                let waited = env.now.duration_since(w.since);
                let err = EngineError::Exhausted { pool: name.clone(), waited, leased, max_size };
                for caller in w.callers {
                    self.reply(caller, Err(err.clone()));
                }
            }
        }
        for id in self.book.expired(env.now) {
            let _ = self.release(env, &id, None, "expired", None);
        }
    }

    // ------------------------------------------------------------------ VMs and plans

    /// Applies an event to a VM through the state machine.
    fn apply(&mut self, env: &Env<'_>, name: &str, event: Event) {
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
    fn wants_hot(&self, pool: &str) -> bool {
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

    fn start_plan(&mut self, env: &Env<'_>, name: &str, kind: PlanKind) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = true;
        vm.busy_since = env.now;
        let Some(pool) = self.pools.get(&vm.pool) else {
            return;
        };
        let order = PlanOrder {
            vm: name.to_string(),
            kind,
            pool: pool.cfg.clone(),
            golden: pool.golden.as_ref().filter(|g| g.ready).map(|g| g.name.clone()),
            rebuild: vm.rebuild,
            observe: vm.observe,
            ssh: vm.ssh.clone(),
            for_waiters: !pool.waiters.is_empty(),
            waiting: pool.waiting.clone(),
        };
        self.batch.effects.push(Effect::Start(order));
    }

    fn plan_done(&mut self, env: &Env<'_>, name: &str, plan: PlanKind, result: Result<Option<SshEndpoint>, StepError>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = false;
        // After a failure the daemon may have done part of the plan: the next one looks first.
        vm.observe = result.is_err();
        let pool = vm.pool.clone();
        let state = vm.state;
        match result {
            Ok(ssh) => {
                if matches!(plan, PlanKind::Reset { .. }) {
                    let took = env.now.duration_since(vm.busy_since);
                    self.batch.effects.push(Effect::ResetTook { pool: pool.clone(), took });
                }
                match plan {
                    PlanKind::Wake => match (self.waking.remove(name), ssh) {
                        (Some(w), Some(info)) if !w.gone(env) => self.grant(env, name, w, info),
                        (_, info) => {
                            if let Some(vm) = self.vms.get_mut(name) {
                                vm.ssh = info;
                            }
                            self.apply(env, name, Event::Unclaimed);
                        }
                    },
                    PlanKind::Refresh => {
                        vm.ssh = ssh;
                        self.answer_refresh(name, None);
                    }
                    PlanKind::Check => vm.ssh = ssh,
                    _ => {
                        let running = ssh.is_some();
                        vm.ssh = ssh;
                        vm.rebuild &= !matches!(plan, PlanKind::Provision { .. } | PlanKind::Reset { .. });
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
            Err(e) => {
                tracing::warn!(vm = name, ?plan, unavailable = e.unavailable, "step failed: {}", e.message);
                if plan == PlanKind::Wake
                    && let Some(w) = self.waking.remove(name)
                {
                    // The caller keeps its place and gets another VM (or fails fast if the
                    // daemon is down).
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
        }
        // A refresh asked for while another plan ran on this VM.
        if self.refreshing.contains_key(name)
            && self.vms.get(name).is_some_and(|v| !v.busy && v.state == VmState::Leased)
        {
            self.start_plan(env, name, PlanKind::Refresh);
        }
        self.serve_waiters(env, &pool);
    }

    /// Answers callers waiting for a leased VM's endpoint.
    fn answer_refresh(&mut self, vm: &str, err: Option<EngineError>) {
        for (caller, id) in self.refreshing.remove(vm).unwrap_or_default() {
            let answer = match &err {
                Some(e) => Err(e.clone()),
                None => self.lease_info(&id, None),
            };
            self.reply_lease(caller, answer);
        }
    }

    fn golden_done(&mut self, env: &Env<'_>, pool: &str, vm: &str, result: Result<(), StepError>) {
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

    fn daemon_ok_now(&mut self, env: &Env<'_>) {
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

    fn daemon_down(&mut self, why: &str) {
        if self.daemon_ok {
            tracing::warn!("multipassd is unavailable: {why}");
        }
        self.daemon_ok = false;
    }

    /// Whether the daemon answered, when nothing else can be done with the answer.
    fn observed_daemon(&mut self, result: &Result<Vec<Observed>, StepError>) {
        match result {
            Ok(_) => self.daemon_ok = true,
            Err(e) => self.daemon_down(&e.message),
        }
    }

    /// A fresh `list` from the observer: first contact reconciles; later ones check idle VMs.
    fn observed(&mut self, env: &Env<'_>, result: Result<Vec<Observed>, StepError>) {
        let list = match result {
            Ok(list) => list,
            Err(e) => return self.daemon_down(&e.message),
        };
        if !self.reconciled {
            self.daemon_ok = true;
            return self.reconcile(env, &list);
        }
        self.daemon_ok_now(env);
        let seen: HashMap<&str, crate::types::InstanceState> =
            list.iter().map(|o| (o.name.as_str(), o.state)).collect();
        let mut drifted = Vec::new();
        for vm in self.vms.values_mut().filter(|v| !v.busy) {
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

    fn reconcile(&mut self, env: &Env<'_>, list: &[Observed]) {
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

    // ------------------------------------------------------------------ maintenance

    /// One round of maintenance: what each pool needs (provisioning, parking, retiring,
    /// resuming interrupted work), then waiters served. The actor runs it after each batch of
    /// inputs.
    pub fn maintain(&mut self, env: &Env<'_>) {
        if !self.reconciled || self.degraded.is_some() {
            return;
        }
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
                    waiting: p.waiters.len(),
                    golden,
                    daemon_ok: self.daemon_ok,
                };
                decide::decide(&view)
            };
            for a in actions {
                self.act(env, &name, a);
            }
            self.serve_waiters(env, &name);
        }
    }

    fn act(&mut self, env: &Env<'_>, pool: &str, action: Action) {
        match action {
            Action::Provision { count, hot } => {
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

    /// Runs a VM's interrupted plan again, to park it hot or warm.
    fn rerun(&mut self, env: &Env<'_>, vm: &str, kind: PlanKind, hot: bool) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.target_hot = hot;
        }
        self.start_plan(env, vm, kind);
    }

    fn build_golden(&mut self, env: &Env<'_>, pool: &str) {
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

    /// A report of the engine's state.
    pub fn status(&self, queued_daemon_calls: usize) -> Status {
        let mut pools = Vec::new();
        for p in self.pools.values() {
            let mut counts = BTreeMap::new();
            for v in self.vms.values().filter(|v| v.pool == p.cfg.name) {
                *counts.entry(format!("{:?}", v.state).to_lowercase()).or_insert(0) += 1;
            }
            pools.push(PoolStatus {
                name: p.cfg.name.clone(),
                generation: p.generation,
                counts,
                waiters: p.waiters.len() + self.waking.values().filter(|w| w.req.pool == p.cfg.name).count(),
                leases: self.book.iter().filter(|l| l.record.pool == p.cfg.name).count(),
                golden_ready: p.golden.as_ref().map(|g| g.ready),
                config: Some(p.cfg.clone()),
            });
        }
        let vms = self
            .vms
            .values()
            .map(|v| VmStatus {
                name: v.name.clone(),
                pool: v.pool.clone(),
                state: format!("{:?}", v.state).to_lowercase(),
                generation: v.generation,
                uses: v.uses,
                lease: v.lease.clone(),
                lease_owner: v.lease.as_ref().and_then(|id| self.book.get(id)).map(|l| l.record.owner.clone()),
                busy: v.busy,
            })
            .collect();
        let mut leases: Vec<LeaseRecord> = self.book.iter().map(|l| l.record.clone()).collect();
        leases.sort_by(|a, b| a.granted_ms.cmp(&b.granted_ms).then(a.id.cmp(&b.id)));
        Status {
            daemon_ok: self.daemon_ok,
            reconciled: self.reconciled,
            store_ok: self.degraded.is_none(),
            store_error: self.degraded.as_ref().map(|d| d.cause.clone()),
            pools,
            vms,
            leases,
            queued_daemon_calls,
        }
    }
}
