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

use crate::pool_config::PoolConfig;
use crate::ports::{Ids, Observed, StepError};
use crate::store::{LeaseRecord, RunOutcome, Snapshot, VmRecord, Write};
use crate::types::SshEndpoint;

use super::demand::Demand;
use super::error::EngineError;
use super::fair::{FairShare, count_by_owner};
use super::isolation::Isolation;
use super::leases::{AcquireRequest, LeaseBook, LeaseInfo, Served};
use super::outcome::PlanKind;
use super::preheat::{self, Preheats};
use super::status::{PoolCapacity, PoolStatus, Status, VmStatus};
use super::vm::VmState;

mod admission;
mod cleanup;
mod disk;
mod host;
mod leasing;
mod maintain;
mod observe;
mod plans;
mod rebuild;
mod reconfigure;
mod store;

/// Identifies a caller waiting for an answer (the actor keeps its reply channel).
pub type CallerId = u64;

/// What a decision may read of the world: time, name parts, and whether a caller still waits.
pub struct Env<'a> {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, on the wall clock (unix milliseconds).
    pub wall_ms: u64,
    /// The host's offset from UTC now, in seconds (for schedules in local time).
    pub local_offset_s: i32,
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
    /// The command of the Run a lease was granted for ended while nobody followed it: its
    /// outcome is recorded on the Run's request id now, kept if the lease then expires.
    NoteOutcome {
        /// Lease id.
        id: String,
        /// How the command ended.
        outcome: RunOutcome,
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
    Observed {
        /// The list, or why it could not be read.
        list: Result<Vec<Observed>, StepError>,
        /// When the daemon was asked: what changed in the engine since then is newer than the list.
        asked: Instant,
    },
    /// A probe of the failed store: what it holds, or why it still fails.
    StoreProbed(Result<Snapshot, String>),
    /// The isolation probe measured (sent before the outcome of the plan it ran in).
    Isolation {
        /// What it measured.
        report: Isolation,
        /// Until when the verdict counts as current (the next probe is due then).
        current_until: Instant,
    },
    /// Time passed: deadlines and maintenance.
    Tick,
    /// The pools were reconfigured (a reload): added, changed, removed.
    Reconfigure {
        /// The new pools (validated).
        pools: Vec<PoolConfig>,
        /// Who waits for the answer.
        caller: CallerId,
    },
    /// A caller raises a pool's ready floor to `count` for `duration`.
    Preheat {
        /// Pool.
        pool: String,
        /// Ready VMs wanted (at most `max_size`).
        count: u32,
        /// For how long (above zero, at most a day).
        duration: Duration,
        /// Who waits for the answer.
        caller: CallerId,
    },
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
    /// Resize in place on the way (`local.<vm>.*` settings and values; empty: no resize).
    pub resize: Vec<(String, String)>,
    /// Read the instance's state from the daemon first (the engine cannot be sure of it).
    pub observe: bool,
    /// Its known SSH endpoint.
    pub ssh: Option<SshEndpoint>,
    /// Callers of its pool are waiting (its daemon calls go first).
    pub for_waiters: bool,
    /// Live count of its pool's waiting callers (a VM they need stays running).
    pub waiting: Arc<AtomicUsize>,
    /// Another VM of the pool running idle (name and endpoint), for the isolation probe to try.
    pub peer: Option<(String, SshEndpoint)>,
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
    Start(Box<PlanOrder>),
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
    /// Who is served next among the waiters, and how many leases one owner may hold.
    fair: FairShare,
    /// Arrivals and refill times (for `autoscale = "demand"`).
    demand: Demand,
    /// Callers' preheats: a raised ready floor for a while.
    preheats: Preheats,
    golden: Option<Golden>,
    /// `waiters.len()` as of the last batch, for plans: a VM being reset or provisioned stays
    /// running when callers wait for it.
    waiting: Arc<AtomicUsize>,
    /// Left the config at a reload: draining (no new leases; gone once empty).
    removed: bool,
    /// Older generations whose VMs differ from the current one only in sizes it can be
    /// resized to in place, with their sizes (emptied by any other change).
    resizable: BTreeMap<u64, super::resize::Sizes>,
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
    /// Resize in place at its next reset (idle VMs, or released ones), from these sizes.
    resize: Option<PendingResize>,
    /// When the running plan started.
    busy_since: Instant,
    /// When its state last settled (created, adopted, or a plan ended): a daemon list asked
    /// for before then may show it mid-change.
    settled_at: Instant,
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
            resize: None,
            busy_since: now,
            settled_at: now,
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

/// A VM's resize in place that has not finished.
#[derive(Clone, Copy, Debug)]
struct PendingResize {
    /// Its sizes now.
    from: super::resize::Sizes,
    /// The generation it belongs to once resized (the pool's when its plan started).
    generation: u64,
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

    /// Its owner (empty: a caller without a token).
    fn owner(&self) -> &str {
        self.req.owner.as_deref().unwrap_or("")
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
    /// Reconcile only with a daemon list asked for after this (the store's recovery): an older
    /// one misses what work in flight at the failure did meanwhile.
    reconcile_after: Option<Instant>,
    /// VMs to reset before anyone gets them at the next reconciliation.
    doubt: HashSet<String>,
    /// Set while the store cannot be written.
    degraded: Option<Degraded>,
    /// What the isolation probe last measured, and until when that counts as current (a
    /// pool that requires isolation refuses at once only on a current verdict; otherwise its
    /// wake measures again).
    isolation: Isolation,
    isolation_current_until: Option<Instant>,
    /// VMs claimed by cleanup (busy, no plan): freed by [`EngineState::cleanup_done`].
    cleaning: HashSet<String>,
    /// The host's capacity, as last sampled.
    host: Option<crate::host::HostFacts>,
    /// The host's limits and the pools they hold back.
    admission: admission::Admission,
    /// When each pool's generation began (unix ms), for `rebuild_every`.
    generation_since: BTreeMap<String, u64>,
    /// Each VM's disk usage when last measured, bytes.
    disk_used: HashMap<String, u64>,
    batch: Batch,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EngineState {
    /// A state for these pools (with the generations the store gave them) and what the store
    /// holds; it reconciles at the first observation of the daemon.
    pub fn new(settings: StateSettings, pools: Vec<(PoolConfig, u64)>, snapshot: Snapshot) -> EngineState {
        let pools = pools.into_iter().map(|(cfg, generation)| (cfg.name.clone(), Pool::new(cfg, generation))).collect();
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
            reconcile_after: None,
            doubt: HashSet::new(),
            degraded: None,
            isolation: Isolation::default(),
            isolation_current_until: None,
            cleaning: HashSet::new(),
            host: None,
            admission: Default::default(),
            generation_since: BTreeMap::new(),
            disk_used: HashMap::new(),
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

    /// Leases each owner holds in a pool, or is being handed (a VM waking for it).
    fn held_by_owner(&self, pool: &str) -> std::collections::HashMap<String, usize> {
        let leases = self.book.iter().filter(|l| l.record.pool == pool).map(|l| l.record.owner.as_str());
        let waking = self.waking.values().filter(|w| w.req.pool == pool).map(Waiter::owner);
        count_by_owner(leases.chain(waking))
    }

    /// Waiters of a pool that a free VM could serve now (not held back by their owner's limit).
    fn servable_waiters(&self, pool: &str) -> usize {
        let Some(p) = self.pools.get(pool) else {
            return 0;
        };
        let owners: Vec<&str> = p.waiters.iter().map(Waiter::owner).collect();
        p.fair.servable(&owners, &self.held_by_owner(pool))
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
                | Input::NoteOutcome { caller, .. }
                | Input::Refresh { caller, .. }
                | Input::Preheat { caller, .. }
                | Input::Reconfigure { caller, .. } => self.reply(caller, Err(err)),
                Input::Observed { list, .. } => self.observed_daemon(&list),
                Input::StoreProbed(result) => self.store_probed(env, result),
                Input::Tick => self.retry_store(env),
                Input::Isolation { report, current_until } => self.isolation_measured(env, report, current_until),
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
                | Input::NoteOutcome { caller, .. }
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
            Input::NoteOutcome { id, outcome, caller } => {
                let r = match self.book.note_outcome(&id, outcome) {
                    Some(writes) => {
                        self.persist(&writes, true);
                        Ok(Answer::Done)
                    }
                    None => self.lease_info(&id, None).and_then(|_| {
                        Err(EngineError::InvalidArgument(format!(
                            "lease {id} was not granted for a Run with a request id"
                        )))
                    }),
                };
                self.reply(caller, r);
            }
            Input::Refresh { id, owner, caller } => self.refresh(env, &id, owner.as_deref(), caller),
            Input::PlanDone { vm, plan, result } => self.plan_done(env, &vm, plan, result),
            Input::GoldenDone { pool, vm, result } => self.golden_done(env, &pool, &vm, result),
            Input::Observed { list, asked } => self.observed(env, list, asked),
            Input::StoreProbed(result) => self.store_probed(env, result),
            Input::Tick => self.deadlines(env),
            Input::Isolation { report, current_until } => self.isolation_measured(env, report, current_until),
            Input::Reconfigure { pools, caller } => {
                self.reconfigure(env, pools);
                self.reply(caller, Ok(Answer::Done));
            }
            Input::Preheat { pool, count, duration, caller } => {
                let r = self.preheat(env, &pool, count, duration);
                self.reply(caller, r.map(|_| Answer::Done));
            }
        }
    }

    /// Raises a pool's ready floor for a while (maintenance provisions toward it).
    fn preheat(&mut self, env: &Env<'_>, pool: &str, count: u32, duration: Duration) -> Result<(), EngineError> {
        let p = self
            .pools
            .get_mut(pool)
            .filter(|p| !p.removed)
            .ok_or_else(|| EngineError::UnknownPool(pool.to_string()))?;
        if count > p.cfg.max_size {
            return Err(EngineError::InvalidArgument(format!(
                "count {count} is above pool {pool}'s max_size {}; ask for at most that many",
                p.cfg.max_size
            )));
        }
        if duration.is_zero() || duration > preheat::MAX_FOR {
            return Err(EngineError::InvalidArgument(format!(
                "for {duration:?} must be above zero and at most {:?}",
                preheat::MAX_FOR
            )));
        }
        p.preheats.add(count, env.now + duration, env.now);
        tracing::info!(pool, count, ?duration, "preheat");
        Ok(())
    }

    /// How many ready VMs a pool keeps now: `min_ready` raised by an active schedule or
    /// preheat, or what demand needs when it autoscales, never above `max_size`.
    fn ready_target(p: &Pool, env: &Env<'_>) -> u32 {
        let floor = EngineState::scheduled(p, env).max(p.preheats.floor(env.now).0);
        p.demand.target_above(&p.cfg, floor, env.now)
    }

    /// The `min_ready` of the pool's schedule active now (0: none).
    fn scheduled(p: &Pool, env: &Env<'_>) -> u32 {
        if p.cfg.schedules.is_empty() {
            return 0;
        }
        let millis = i64::try_from(env.wall_ms).unwrap_or(i64::MAX);
        let Some(utc) = chrono::DateTime::from_timestamp_millis(millis) else {
            return 0;
        };
        let offset =
            chrono::FixedOffset::east_opt(env.local_offset_s).unwrap_or_else(|| chrono::Offset::fix(&chrono::Utc));
        super::schedule::floor(&p.cfg.schedules, utc, offset)
    }

    /// Records the probe's verdict; waiters of pools that require isolation hear at once when
    /// it refuses them.
    fn isolation_measured(&mut self, env: &Env<'_>, report: Isolation, current_until: Instant) {
        let changed = report.state != self.isolation.state;
        self.isolation = report;
        self.isolation_current_until = Some(current_until);
        if changed && self.degraded.is_none() {
            let names: Vec<String> =
                self.pools.values().filter(|p| p.cfg.require_isolation).map(|p| p.cfg.name.clone()).collect();
            for name in names {
                self.serve_waiters(env, &name);
            }
        }
    }

    /// Why `pool` refuses leases: it requires isolation and the verdict is not "isolated".
    /// With `now`, only a verdict still current then counts (without one, the wake measures
    /// first); without, the last verdict counts whatever its age (at the grant, right after the
    /// wake measured).
    fn isolation_refusal(&self, pool: &str, now: Option<Instant>) -> Option<EngineError> {
        let requires = self.pools.get(pool).is_some_and(|p| p.cfg.require_isolation);
        let counts = now.is_none_or(|now| self.isolation_current_until.is_some_and(|t| now < t));
        if requires && counts { self.isolation.refusal(pool) } else { None }
    }

    /// Whether a request id is known for this key: answered (its lease live or ended, a Run's
    /// outcome recorded) or waiting for a VM. A retry of a known request gets that answer.
    pub fn knows_request(&self, key: &crate::store::RequestKey) -> bool {
        let same = |w: &Waiter| w.req.key().as_ref() == Some(key);
        self.book.request(key).is_some()
            || self.pools.values().any(|p| p.waiters.iter().any(same))
            || self.waking.values().any(same)
    }

    /// Each pool's ready target now, what raised it, and the measured arrival rate and refill
    /// time.
    pub fn capacity(&self, env: &Env<'_>) -> Vec<PoolCapacity> {
        let now = env.now;
        self.pools
            .values()
            .map(|p| PoolCapacity {
                name: p.cfg.name.clone(),
                ready_target: EngineState::ready_target(p, env),
                scheduled: EngineState::scheduled(p, env),
                preheat: p.preheats.floor(now).0,
                preheat_left: p.preheats.floor(now).1.map(|u| u.saturating_duration_since(now)),
                arrival_rate: p.demand.rate(now),
                refill_time: p.demand.refill_time(),
            })
            .collect()
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
                removed: p.removed,
                held_back: self.blocked(&p.cfg.name),
                disk_used: self.pool_disk_used(&p.cfg.name),
                image_bytes: self.pool_image_bytes(&p.cfg.name),
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
                disk_used: self.disk_used.get(&v.name).copied(),
                image_bytes: self.image_bytes(&v.name),
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
            isolation: self.isolation.clone(),
            host: self.host.clone(),
        }
    }
}
