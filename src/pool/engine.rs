//! The engine: one actor task owns all pool state (VMs, leases, waiters) and applies every
//! event in order, so no two callers can ever get the same VM. Callers talk to it through the
//! cheap [`Engine`] handle; plans run in their own tasks and report back as messages.
//!
//! Durability: a lease granted or ended and a VM created or deleted are written (fsync) before
//! the caller hears about it or before the daemon call that follows; idle-state changes are
//! written lazily (losing one costs an extra reset after a crash, nothing more).
//!
//! Group commit: the actor handles every message already queued (up to [`MAX_BATCH`]) before it
//! writes, so concurrent acquires and releases share one store transaction and one fsync. The
//! replies and plan spawns those messages cause wait in the batch until the write is done, so
//! "written before the caller hears, before the daemon call" holds as before.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{PoolConfig, ResetStrategy};
use crate::metrics::Metrics;
use crate::multipass::SshInfo;
use crate::store::{LeaseRecord, PhaseRecord, PoolRecord, Store, VmRecord, Write};

use super::decide::{self, Action, GoldenView, PoolView, VmView};
use super::plans::Ctx;
use super::ports::{Observed, Ports, StepError};
use super::reconcile;
use super::scheduler::{Op, Priority, Scheduler};
use super::vm::{Event, Next, VmState, transition};

/// Engine settings (from `[engine]`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name prefix of every instance mpool owns.
    pub prefix: String,
    /// Delete instances with our prefix that the store does not know.
    pub delete_strays: bool,
    /// How often maintenance runs even without events.
    pub reconcile_interval: Duration,
    /// How often idle VMs are checked against the daemon (and hot ones over SSH).
    pub health_interval: Duration,
    /// Scheduler priorities (off only to measure what they buy).
    pub priorities: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            prefix: "mpool-".into(),
            delete_strays: true,
            reconcile_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(30),
            priorities: true,
        }
    }
}

/// How an acquire was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// A running VM: no daemon call.
    Hot,
    /// A suspended VM: one resume.
    Warm,
    /// No idle VM: the caller waited for one to be created or reset.
    Cold,
    /// The same request id was seen before: the same lease again.
    Repeat,
}

/// A granted lease.
#[derive(Clone, Debug)]
pub struct LeaseInfo {
    /// The stored record.
    pub record: LeaseRecord,
    /// How to reach the VM.
    pub ssh: Option<SshInfo>,
    /// How it was served.
    pub served: Served,
    /// How long the acquire took inside the engine.
    pub waited: Duration,
}

/// An acquire.
#[derive(Clone, Debug, Default)]
pub struct AcquireRequest {
    /// Pool name.
    pub pool: String,
    /// Who holds the lease (free text, e.g. a task run id).
    pub holder: String,
    /// Idempotency key: the same key returns the same lease.
    pub request_id: Option<String>,
    /// Lease time to live (default: the pool's `default_ttl`).
    pub ttl: Option<Duration>,
    /// How long to wait for a VM (default: the pool's `max_wait`; zero: do not wait).
    pub wait: Option<Duration>,
    /// The principal (token name); leases are only visible to their owner when set.
    pub owner: Option<String>,
}

/// Engine errors, each with the gRPC code it maps to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such pool.
    #[error("no pool named {0:?}; `mpool status` lists the configured pools")]
    UnknownPool(String),
    /// No such lease.
    #[error("no lease {0:?}; it never existed or ended long ago")]
    UnknownLease(String),
    /// The lease ended.
    #[error("lease {id} has ended ({reason}); acquire a new one")]
    LeaseEnded {
        /// Lease id.
        id: String,
        /// Why it ended.
        reason: String,
    },
    /// Another principal's lease.
    #[error("lease {0} belongs to another client")]
    NotOwner(String),
    /// No VM within the wait.
    #[error("pool {pool} has no free VM after waiting {waited:?} ({leased} leased, max_size {max_size}); retry later, wait longer, or raise max_size")]
    Exhausted {
        /// Pool.
        pool: String,
        /// How long the caller waited.
        waited: Duration,
        /// VMs leased.
        leased: usize,
        /// The pool's max_size.
        max_size: u32,
    },
    /// The daemon is down or frozen.
    #[error("multipassd is unavailable ({0}); retry shortly")]
    Unavailable(String),
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// The engine is shutting down or gone.
    #[error("mpool is shutting down")]
    ShuttingDown,
}

impl EngineError {
    /// The gRPC status code.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            EngineError::UnknownPool(_) | EngineError::UnknownLease(_) => Code::NotFound,
            EngineError::LeaseEnded { .. } => Code::FailedPrecondition,
            EngineError::NotOwner(_) => Code::PermissionDenied,
            EngineError::Exhausted { .. } => Code::ResourceExhausted,
            EngineError::Unavailable(_) | EngineError::ShuttingDown => Code::Unavailable,
            EngineError::InvalidArgument(_) => Code::InvalidArgument,
        }
    }
}

/// One VM in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// State (`VmState` debug name).
    pub state: String,
    /// Config generation.
    pub generation: u64,
    /// Leases served since the last rebuild.
    pub uses: u32,
    /// Lease holding it.
    pub lease: Option<String>,
    /// A plan is running.
    pub busy: bool,
}

/// One pool in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolStatus {
    /// Name.
    pub name: String,
    /// Generation.
    pub generation: u64,
    /// VMs per state.
    pub counts: BTreeMap<String, usize>,
    /// Callers waiting.
    pub waiters: usize,
    /// Leases.
    pub leases: usize,
    /// Golden VM ready (clone pools).
    pub golden_ready: Option<bool>,
    /// Config.
    #[serde(skip)]
    pub config: Option<PoolConfig>,
}

/// A snapshot of the engine's state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    /// The daemon answers.
    pub daemon_ok: bool,
    /// Startup reconciliation has run.
    pub reconciled: bool,
    /// Pools.
    pub pools: Vec<PoolStatus>,
    /// VMs.
    pub vms: Vec<VmStatus>,
    /// Leases.
    pub leases: Vec<LeaseRecord>,
    /// Daemon calls waiting for the scheduler.
    pub queued_daemon_calls: usize,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Msg {
    Acquire(AcquireRequest, Reply<LeaseInfo>),
    Renew { id: String, ttl: Option<Duration>, owner: Option<String>, reply: Reply<LeaseInfo> },
    Release { id: String, owner: Option<String>, reply: Reply<()> },
    BeginUse { id: String, owner: Option<String>, reply: Reply<LeaseInfo> },
    EndUse { id: String },
    Status(oneshot::Sender<Status>),
    PlanDone { vm: String, plan: PlanKind, result: Result<Option<SshInfo>, StepError> },
    GoldenDone { pool: String, vm: String, result: Result<(), StepError> },
    Observed(Result<Vec<Observed>, StepError>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlanKind {
    Provision { hot: bool },
    Reset { hot: bool },
    Park { hot: bool },
    Wake,
    Destroy,
    /// Fetch a leased VM's SSH endpoint again (after a restart).
    Refresh,
}

/// The engine handle; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    healthy: watch::Receiver<bool>,
}

impl Engine {
    /// Starts the engine: loads the store, then (once the daemon answers) reconciles and keeps
    /// the pools ready. Returns at once; [`Engine::status`] says when reconciliation ran.
    pub fn start(settings: Settings, pools: Vec<PoolConfig>, ports: Ports, store: Arc<Store>) -> Result<Engine, String> {
        Engine::start_with_metrics(settings, pools, ports, store, Metrics::default())
    }

    /// [`Engine::start`], recording reset durations into `metrics`.
    pub fn start_with_metrics(
        settings: Settings,
        pools: Vec<PoolConfig>,
        ports: Ports,
        store: Arc<Store>,
        metrics: Metrics,
    ) -> Result<Engine, String> {
        let snapshot = store.load().map_err(|e| e.to_string())?;
        let mut writes = Vec::new();
        let mut pool_state = BTreeMap::new();
        for cfg in pools {
            let key = cfg.generation_key();
            let generation = match snapshot.pools.iter().find(|p| p.name == cfg.name) {
                Some(p) if p.key == key => p.generation,
                Some(p) => p.generation + 1,
                None => 1,
            };
            writes.push(Write::PutPool(PoolRecord { name: cfg.name.clone(), generation, key }));
            pool_state.insert(cfg.name.clone(), Pool::new(cfg, generation));
        }
        store.write(&writes, true).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(1024);
        let (health_tx, healthy) = watch::channel(false);
        let sched = Scheduler::new(settings.priorities);
        let actor = Actor {
            ctx: Ctx { ports, sched },
            settings,
            store,
            tx: tx.clone(),
            pools: pool_state,
            vms: BTreeMap::new(),
            leases: HashMap::new(),
            requests: HashMap::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            waking: HashMap::new(),
            daemon_ok: false,
            reconciled: false,
            health_tx,
            next_waiter: 0,
            store_snapshot: Some(snapshot),
            metrics,
            batch: Default::default(),
        };
        tokio::spawn(actor.run(rx));
        Ok(Engine { tx, healthy })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Acquires a VM under a lease, waiting FIFO up to the request's wait.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<LeaseInfo, EngineError> {
        self.ask(|r| Msg::Acquire(req, r)).await
    }

    /// Extends a lease by `ttl` (default: the pool's default TTL) from now.
    pub async fn renew(&self, id: &str, ttl: Option<Duration>, owner: Option<String>) -> Result<LeaseInfo, EngineError> {
        self.ask(|reply| Msg::Renew { id: id.into(), ttl, owner, reply }).await
    }

    /// Ends a lease; its VM is reset in the background. Releasing an ended lease is OK.
    pub async fn release(&self, id: &str, owner: Option<String>) -> Result<(), EngineError> {
        self.ask(|reply| Msg::Release { id: id.into(), owner, reply }).await
    }

    /// Marks the lease in use (an exec or transfer): it does not expire until [`Engine::end_use`].
    pub async fn begin_use(&self, id: &str, owner: Option<String>) -> Result<LeaseInfo, EngineError> {
        self.ask(|reply| Msg::BeginUse { id: id.into(), owner, reply }).await
    }

    /// Ends a use started with [`Engine::begin_use`].
    pub async fn end_use(&self, id: &str) {
        let _ = self.tx.send(Msg::EndUse { id: id.into() }).await;
    }

    /// The engine's state.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Status(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Whether the daemon answers (for health checks).
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    /// Stops the actor (leases and VMs stay in the store).
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Pool {
    cfg: PoolConfig,
    generation: u64,
    waiters: VecDeque<Waiter>,
    golden: Option<Golden>,
    /// `waiters.len()` as of the last flush, for plans: a VM being reset or provisioned stays
    /// running when callers wait for it.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pool {
    fn new(cfg: PoolConfig, generation: u64) -> Pool {
        Pool { cfg, generation, waiters: VecDeque::new(), golden: None, waiting: Default::default() }
    }
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
    ssh: Option<SshInfo>,
    target_hot: bool,
    idle_since: Instant,
    created_ms: u64,
    /// Rebuild instead of restoring on the next reset.
    rebuild: bool,
    /// When the running plan started.
    busy_since: Instant,
}

impl Vm {
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

struct Lease {
    record: LeaseRecord,
    deadline: Instant,
    in_use: u32,
}

struct Waiter {
    req: AcquireRequest,
    replies: Vec<Reply<LeaseInfo>>,
    since: Instant,
    deadline: Instant,
    ttl: Duration,
    /// How it was served (for reporting).
    served: Served,
    /// No VM was free when it arrived: it waited for one to be created or reset.
    queued: bool,
}

impl Waiter {
    fn gone(&self) -> bool {
        self.replies.iter().all(|r| r.is_closed())
    }
}

struct Actor {
    settings: Settings,
    ctx: Ctx,
    store: Arc<Store>,
    tx: mpsc::Sender<Msg>,
    pools: BTreeMap<String, Pool>,
    vms: BTreeMap<String, Vm>,
    leases: HashMap<String, Lease>,
    requests: HashMap<(String, String), String>,
    ended: HashMap<String, String>,
    ended_order: VecDeque<String>,
    waking: HashMap<String, Waiter>,
    daemon_ok: bool,
    reconciled: bool,
    health_tx: watch::Sender<bool>,
    next_waiter: u64,
    store_snapshot: Option<crate::store::Snapshot>,
    metrics: Metrics,
    batch: std::cell::RefCell<Batch>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    (0..6).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

/// How many ended lease ids are remembered (so a late release or exec says "ended", not "unknown").
const ENDED_MEMORY: usize = 10_000;

/// At most this many queued messages share one store write.
pub const MAX_BATCH: usize = 256;

/// The writes and effects of the messages handled since the last flush.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    durable: bool,
    /// Replies and spawns, run in order once the writes are stored.
    after: Vec<Box<dyn FnOnce() + Send>>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        self.spawn_observer();
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        self.flush();
                        return;
                    };
                    if self.take(msg) {
                        return;
                    }
                    // Group commit: what is already queued joins this batch.
                    for _ in 0..MAX_BATCH {
                        let Ok(msg) = rx.try_recv() else { break };
                        if self.take(msg) {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => self.deadlines(),
                _ = tick.tick() => {}
            }
            self.maintain();
            self.flush();
        }
    }

    /// Handles one message; true when it was the shutdown.
    fn take(&mut self, msg: Msg) -> bool {
        if let Msg::Shutdown(done) = msg {
            self.flush();
            self.fail_all_waiters(EngineError::ShuttingDown);
            let _ = done.send(());
            return true;
        }
        self.handle(msg);
        false
    }

    /// Stores the batch's writes (one transaction, durable if any write must be), then runs
    /// its replies and spawns in order.
    fn flush(&self) {
        for p in self.pools.values() {
            p.waiting.store(p.waiters.len(), std::sync::atomic::Ordering::Relaxed);
        }
        let batch = std::mem::take(&mut *self.batch.borrow_mut());
        if !batch.writes.is_empty()
            && let Err(e) = self.store.write(&batch.writes, batch.durable)
        {
            tracing::error!("state store write failed: {e}");
        }
        for effect in batch.after {
            effect();
        }
    }

    /// Runs `effect` once this batch's writes are stored.
    fn later(&self, effect: impl FnOnce() + Send + 'static) {
        self.batch.borrow_mut().after.push(Box::new(effect));
    }

    /// Replies once this batch's writes are stored.
    fn reply_later<T: Send + 'static>(&self, reply: Reply<T>, result: Result<T, EngineError>) {
        self.later(move || {
            let _ = reply.send(result);
        });
    }

    /// Spawns `fut` once this batch's writes are stored (intent first).
    fn spawn_later(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.later(move || {
            tokio::spawn(fut);
        });
    }

    /// Periodic daemon observation: every health interval when the daemon answers, every
    /// second (with a cheap ping first) while it does not.
    fn spawn_observer(&self) {
        let (daemon, sched, tx) = (self.ctx.ports.daemon.clone(), self.ctx.sched.clone(), self.tx.clone());
        let healthy = self.health_tx.subscribe();
        let interval = self.settings.health_interval;
        tokio::spawn(async move {
            loop {
                let result = sched.run(Priority::Provision, "", Op::Quick, daemon.list()).await;
                let ok = result.is_ok();
                if tx.send(Msg::Observed(result)).await.is_err() {
                    return;
                }
                let pause = if ok && *healthy.borrow() { interval } else { Duration::from_millis(500) };
                tokio::time::sleep(pause).await;
            }
        });
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let waiters = self.pools.values().flat_map(|p| p.waiters.iter().map(|w| w.deadline));
        let leases = self.leases.values().filter(|l| l.in_use == 0).map(|l| l.deadline);
        waiters.chain(leases).min().unwrap_or(far).min(far)
    }

    /// Adds writes to the batch (stored by [`Actor::flush`] before any reply or spawn of it).
    fn persist(&self, writes: &[Write], durable: bool) {
        let mut b = self.batch.borrow_mut();
        b.writes.extend_from_slice(writes);
        b.durable |= durable;
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire(req, reply) => self.acquire(req, reply),
            Msg::Renew { id, ttl, owner, reply } => {
                let r = self.renew(&id, ttl, owner.as_deref());
                self.reply_later(reply, r);
            }
            Msg::Release { id, owner, reply } => {
                let r = self.release(&id, owner.as_deref(), "released");
                self.reply_later(reply, r);
            }
            Msg::BeginUse { id, owner, reply } => {
                let r = self.lease_info(&id, owner.as_deref());
                if r.is_ok()
                    && let Some(l) = self.leases.get_mut(&id)
                {
                    l.in_use += 1;
                }
                let _ = reply.send(r);
            }
            Msg::EndUse { id } => {
                if let Some(l) = self.leases.get_mut(&id) {
                    l.in_use = l.in_use.saturating_sub(1);
                }
            }
            Msg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Msg::PlanDone { vm, plan, result } => self.plan_done(&vm, plan, result),
            Msg::GoldenDone { pool, vm, result } => self.golden_done(&pool, &vm, result),
            Msg::Observed(result) => self.observed(result),
            Msg::Shutdown(_) => {}
        }
    }

    // ------------------------------------------------------------------ leases

    fn acquire(&mut self, req: AcquireRequest, reply: Reply<LeaseInfo>) {
        let Some(pool) = self.pools.get(&req.pool) else {
            let _ = reply.send(Err(EngineError::UnknownPool(req.pool.clone())));
            return;
        };
        let cfg = &pool.cfg;
        let ttl = req.ttl.unwrap_or(cfg.default_ttl);
        if ttl.is_zero() || ttl > cfg.max_ttl {
            let _ = reply.send(Err(EngineError::InvalidArgument(format!(
                "ttl {ttl:?} must be above zero and at most the pool's max_ttl {:?}",
                cfg.max_ttl
            ))));
            return;
        }
        let wait = req.wait.unwrap_or(cfg.max_wait);
        if wait > cfg.max_wait {
            let _ = reply.send(Err(EngineError::InvalidArgument(format!(
                "wait {wait:?} is longer than the pool's max_wait {:?}",
                cfg.max_wait
            ))));
            return;
        }
        if let Some(rid) = &req.request_id {
            if rid.len() > 256 {
                let _ = reply.send(Err(EngineError::InvalidArgument("request_id is longer than 256 bytes".into())));
                return;
            }
            // The same request again: the same lease, or a place beside the first caller.
            if let Some(id) = self.requests.get(&(req.pool.clone(), rid.clone())).cloned() {
                let r = self.lease_info(&id, req.owner.as_deref()).map(|mut i| {
                    i.served = Served::Repeat;
                    i
                });
                // The lease may be in this very batch: answer once it is stored.
                self.reply_later(reply, r);
                return;
            }
            let same = |w: &Waiter| w.req.request_id.as_deref() == Some(rid.as_str());
            if let Some(w) = self.pools.get_mut(&req.pool).and_then(|p| p.waiters.iter_mut().find(|w| same(w))) {
                w.replies.push(reply);
                return;
            }
            if let Some(w) = self.waking.values_mut().find(|w| w.req.pool == req.pool && same(w)) {
                w.replies.push(reply);
                return;
            }
        }
        if !self.reconciled {
            let _ = reply.send(Err(EngineError::Unavailable("mpool has not reached multipassd yet".into())));
            return;
        }
        let now = Instant::now();
        self.next_waiter += 1;
        let waiter =
            Waiter { req, replies: vec![reply], since: now, deadline: now + wait, ttl, served: Served::Cold, queued: false };
        let pool_name = waiter.req.pool.clone();
        if let Some(p) = self.pools.get_mut(&pool_name) {
            p.waiters.push_back(waiter);
        }
        self.serve_waiters(&pool_name);
        if let Some(p) = self.pools.get_mut(&pool_name) {
            for w in p.waiters.iter_mut() {
                w.queued = true;
            }
        }
    }

    /// Hands idle VMs to waiting callers, first come first served: hot VMs first (a readiness
    /// check only), then warm ones (a resume).
    fn serve_waiters(&mut self, pool_name: &str) {
        loop {
            let Some(pool) = self.pools.get_mut(pool_name) else { return };
            while pool.waiters.front().is_some_and(Waiter::gone) {
                pool.waiters.pop_front();
            }
            if pool.waiters.is_empty() {
                return;
            }
            let free = |s: VmState| {
                self.vms.values().filter(|v| v.pool == pool_name && v.state == s && !v.busy).map(|v| v.name.clone()).next()
            };
            let (vm, served) = match (free(VmState::Hot), free(VmState::Warm)) {
                (Some(vm), _) => (vm, Served::Hot),
                (None, Some(vm)) if self.daemon_ok => (vm, Served::Warm),
                _ => {
                    if !self.daemon_ok {
                        let err = EngineError::Unavailable("multipassd does not answer and no running VM is free".into());
                        if let Some(pool) = self.pools.get_mut(pool_name) {
                            for w in pool.waiters.drain(..) {
                                for r in w.replies {
                                    let _ = r.send(Err(err.clone()));
                                }
                            }
                        }
                    }
                    return;
                }
            };
            let Some(mut waiter) = self.pools.get_mut(pool_name).and_then(|p| p.waiters.pop_front()) else { return };
            waiter.served = if waiter.queued { Served::Cold } else { served };
            self.apply(&vm, Event::Wake);
            self.waking.insert(vm.clone(), waiter);
            self.spawn_plan(&vm, PlanKind::Wake);
        }
    }

    fn grant(&mut self, vm_name: &str, waiter: Waiter, ssh: SshInfo) {
        let now = now_ms();
        let rec = LeaseRecord {
            id: format!("lease-{}{}", random_suffix(), random_suffix()),
            pool: waiter.req.pool.clone(),
            vm: vm_name.to_string(),
            holder: waiter.req.holder.clone(),
            request_id: waiter.req.request_id.clone(),
            granted_ms: now,
            expires_ms: now + waiter.ttl.as_millis() as u64,
            owner: waiter.req.owner.clone().unwrap_or_default(),
        };
        self.apply(vm_name, Event::Woken);
        let Some(vm) = self.vms.get_mut(vm_name) else { return };
        vm.lease = Some(rec.id.clone());
        vm.uses += 1;
        vm.ssh = Some(ssh.clone());
        let vm_rec = vm.record();
        // Durable before the caller hears of it.
        self.persist(&[Write::PutVm(vm_rec), Write::PutLease(rec.clone())], true);
        if let Some(rid) = &rec.request_id {
            self.requests.insert((rec.pool.clone(), rid.clone()), rec.id.clone());
        }
        self.leases.insert(rec.id.clone(), Lease { record: rec.clone(), deadline: Instant::now() + waiter.ttl, in_use: 0 });
        let info = LeaseInfo { record: rec, ssh: Some(ssh), served: waiter.served, waited: waiter.since.elapsed() };
        let replies = waiter.replies;
        self.later(move || {
            for r in replies {
                let _ = r.send(Ok(info.clone()));
            }
        });
    }

    fn check_owner(&self, id: &str, owner: Option<&str>) -> Result<&Lease, EngineError> {
        let Some(l) = self.leases.get(id) else {
            return Err(match self.ended.get(id) {
                Some(reason) => EngineError::LeaseEnded { id: id.into(), reason: reason.clone() },
                None => EngineError::UnknownLease(id.into()),
            });
        };
        if let Some(o) = owner
            && l.record.owner != o
        {
            return Err(EngineError::NotOwner(id.into()));
        }
        Ok(l)
    }

    fn lease_info(&self, id: &str, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
        let l = self.check_owner(id, owner)?;
        let ssh = self.vms.get(&l.record.vm).and_then(|v| v.ssh.clone());
        Ok(LeaseInfo { record: l.record.clone(), ssh, served: Served::Repeat, waited: Duration::ZERO })
    }

    fn renew(&mut self, id: &str, ttl: Option<Duration>, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
        let l = self.check_owner(id, owner)?;
        let cfg = &self.pools.get(&l.record.pool).ok_or_else(|| EngineError::UnknownPool(l.record.pool.clone()))?.cfg;
        let ttl = ttl.unwrap_or(cfg.default_ttl);
        if ttl.is_zero() || ttl > cfg.max_ttl {
            return Err(EngineError::InvalidArgument(format!(
                "ttl {ttl:?} must be above zero and at most the pool's max_ttl {:?}",
                cfg.max_ttl
            )));
        }
        let rec = {
            let Some(l) = self.leases.get_mut(id) else { return Err(EngineError::UnknownLease(id.into())) };
            l.deadline = Instant::now() + ttl;
            l.record.expires_ms = now_ms() + ttl.as_millis() as u64;
            l.record.clone()
        };
        self.persist(&[Write::PutLease(rec)], true);
        self.lease_info(id, owner)
    }

    fn remember_ended(&mut self, id: &str, reason: &str) {
        self.ended.insert(id.to_string(), reason.to_string());
        self.ended_order.push_back(id.to_string());
        while self.ended_order.len() > ENDED_MEMORY {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }

    /// Ends a lease and starts its VM's reset.
    fn release(&mut self, id: &str, owner: Option<&str>, reason: &str) -> Result<(), EngineError> {
        match self.check_owner(id, owner) {
            Ok(_) => {}
            Err(EngineError::LeaseEnded { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(lease) = self.leases.remove(id) else { return Ok(()) };
        self.remember_ended(id, reason);
        if let Some(rid) = &lease.record.request_id {
            self.requests.remove(&(lease.record.pool.clone(), rid.clone()));
        }
        let vm_name = lease.record.vm.clone();
        let mut writes = vec![Write::DeleteLease(lease.record.clone())];
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
            self.apply(&vm_name, Event::Release);
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
            self.spawn_plan(&vm_name, PlanKind::Reset { hot });
        }
        Ok(())
    }

    /// Expired waiters and leases.
    fn deadlines(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let leased = self.vms.values().filter(|v| v.pool == name && v.state == VmState::Leased).count();
            let Some(pool) = self.pools.get_mut(&name) else { continue };
            let max_size = pool.cfg.max_size;
            let (expired, kept): (Vec<Waiter>, Vec<Waiter>) = pool.waiters.drain(..).partition(|w| w.deadline <= now);
            pool.waiters = kept.into();
            for w in expired {
                let err = EngineError::Exhausted { pool: name.clone(), waited: w.since.elapsed(), leased, max_size };
                for r in w.replies {
                    let _ = r.send(Err(err.clone()));
                }
            }
        }
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.in_use == 0 && l.deadline <= now).map(|(id, _)| id.clone()).collect();
        for id in expired {
            let _ = self.release(&id, None, "expired");
        }
    }

    fn fail_all_waiters(&mut self, err: EngineError) {
        for p in self.pools.values_mut() {
            for w in p.waiters.drain(..) {
                for r in w.replies {
                    let _ = r.send(Err(err.clone()));
                }
            }
        }
        for (_, w) in self.waking.drain() {
            for r in w.replies {
                let _ = r.send(Err(err.clone()));
            }
        }
    }

    // ------------------------------------------------------------------ VMs and plans

    /// Applies an event to a VM through the state machine.
    fn apply(&mut self, name: &str, event: Event) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        match transition(vm.state, event) {
            Ok(Next::State(s)) => {
                if s.is_idle() && !vm.state.is_idle() {
                    vm.idle_since = Instant::now();
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
        let Some(p) = self.pools.get(pool) else { return false };
        let hot = self
            .vms
            .values()
            .filter(|v| v.pool == pool)
            .filter(|v| v.state == VmState::Hot || (v.state.is_coming() && v.target_hot))
            .count();
        hot < p.cfg.hot as usize
    }

    fn spawn_plan(&mut self, name: &str, plan: PlanKind) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        vm.busy = true;
        vm.busy_since = Instant::now();
        let Some(pool) = self.pools.get(&vm.pool) else { return };
        let cfg = pool.cfg.clone();
        let golden = pool.golden.as_ref().filter(|g| g.ready).map(|g| g.name.clone());
        let has_waiters = !pool.waiters.is_empty();
        let waiting = pool.waiting.clone();
        let (ctx, tx, name, rebuild, ssh) = (self.ctx.clone(), self.tx.clone(), name.to_string(), vm.rebuild, vm.ssh.clone());
        let was_hot = ssh.is_some();
        // A wake for a waiting caller (not a health check) of a hot VM only needs a round trip.
        let for_caller = self.waking.contains_key(&name);
        self.spawn_later(async move {
            let result = match plan {
                PlanKind::Provision { hot } => {
                    ctx.provision(Priority::Provision, &name, &cfg, golden.as_deref(), hot, None).await
                }
                PlanKind::Reset { hot } => {
                    let p = if has_waiters { Priority::Release } else { Priority::Reset };
                    ctx.reset(p, &name, &cfg, golden.as_deref(), rebuild, hot, Some(&waiting)).await
                }
                PlanKind::Park { hot: true } => ctx.park(Priority::Reset, &name, true).await,
                PlanKind::Park { hot: false } => ctx.cool(Priority::Reset, &name).await.map(|_| None),
                PlanKind::Wake if was_hot && for_caller => ctx.check_alive(&name, ssh).await.map(Some),
                PlanKind::Wake if was_hot => ctx.check(&name, ssh).await.map(Some),
                PlanKind::Wake => ctx.wake(&name).await.map(Some),
                PlanKind::Destroy => ctx.destroy(Priority::Provision, &name).await.map(|_| None),
                PlanKind::Refresh => ctx.endpoint(&name).await.map(Some),
            };
            let _ = tx.send(Msg::PlanDone { vm: name, plan, result }).await;
        });
    }

    fn plan_done(&mut self, name: &str, plan: PlanKind, result: Result<Option<SshInfo>, StepError>) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        vm.busy = false;
        let pool = vm.pool.clone();
        if matches!(plan, PlanKind::Reset { .. }) && result.is_ok() {
            self.metrics.observe("mpool_reset_seconds", vec![("pool", pool.clone())], vm.busy_since.elapsed());
        }
        match result {
            Ok(ssh) => {
                match plan {
                    PlanKind::Provision { .. } | PlanKind::Reset { .. } => {
                        vm.ssh = ssh.clone();
                        vm.rebuild = false;
                        let hot = ssh.is_some();
                        let ev = if vm.state == VmState::Provisioning {
                            Event::Provisioned { hot }
                        } else {
                            Event::ResetDone { hot }
                        };
                        self.apply(name, ev);
                        if let Some(vm) = self.vms.get(name) {
                            self.persist(&[Write::PutVm(vm.record())], false);
                        }
                    }
                    PlanKind::Park { hot } => {
                        vm.ssh = if hot { ssh } else { None };
                        self.apply(name, Event::Parked { hot });
                        if let Some(vm) = self.vms.get(name) {
                            self.persist(&[Write::PutVm(vm.record())], false);
                        }
                    }
                    PlanKind::Wake => match (self.waking.remove(name), ssh) {
                        (Some(w), Some(info)) if !w.gone() => self.grant(name, w, info),
                        (_, info) => {
                            if let Some(vm) = self.vms.get_mut(name) {
                                vm.ssh = info;
                            }
                            self.apply(name, Event::Unclaimed);
                        }
                    },
                    PlanKind::Destroy => {
                        self.apply(name, Event::Deleted);
                        self.persist(&[Write::DeleteVm(name.to_string())], true);
                    }
                    PlanKind::Refresh => vm.ssh = ssh,
                }
                self.daemon_ok_now();
            }
            Err(e) => {
                tracing::warn!(vm = name, ?plan, unavailable = e.unavailable, "step failed: {}", e.message);
                if plan == PlanKind::Wake
                    && let Some(w) = self.waking.remove(name)
                {
                    // The caller keeps its place and gets another VM (or fails fast if the daemon is down).
                    if e.unavailable {
                        for r in w.replies {
                            let _ = r.send(Err(EngineError::Unavailable(e.message.clone())));
                        }
                    } else if let Some(p) = self.pools.get_mut(&pool) {
                        p.waiters.push_front(w);
                    }
                }
                let event = match (e.unavailable, plan) {
                    (_, PlanKind::Refresh) | (true, PlanKind::Destroy) => None,
                    (true, _) if self.vms.get(name).is_some_and(|v| v.state == VmState::Resetting) => None,
                    (true, _) => Some(Event::Doubt),
                    (false, _) => Some(Event::Fail),
                };
                if let Some(ev) = event {
                    self.apply(name, ev);
                }
                if let Some(vm) = self.vms.get_mut(name) {
                    vm.ssh = None;
                    let rec = vm.record();
                    self.persist(&[Write::PutVm(rec)], true);
                }
                if e.unavailable {
                    self.daemon_down(&e.message);
                }
            }
        }
        self.serve_waiters(&pool);
    }

    fn golden_done(&mut self, pool: &str, vm: &str, result: Result<(), StepError>) {
        let Some(p) = self.pools.get_mut(pool) else { return };
        let Some(g) = p.golden.as_mut().filter(|g| g.name == vm) else { return };
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
                    created_ms: now_ms(),
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

    fn daemon_ok_now(&mut self) {
        if !self.daemon_ok {
            tracing::info!("multipassd answers again");
        }
        self.daemon_ok = true;
        self.health_tx.send_replace(true);
    }

    fn daemon_down(&mut self, why: &str) {
        if self.daemon_ok {
            tracing::warn!("multipassd is unavailable: {why}");
        }
        self.daemon_ok = false;
        self.health_tx.send_replace(false);
    }

    /// A fresh `list` from the observer: first contact reconciles; later ones check idle VMs.
    fn observed(&mut self, result: Result<Vec<Observed>, StepError>) {
        let list = match result {
            Ok(list) => list,
            Err(e) => {
                self.daemon_down(&e.message);
                return;
            }
        };
        self.daemon_ok_now();
        if !self.reconciled {
            self.reconcile(&list);
            return;
        }
        let seen: HashMap<&str, crate::multipass::InstanceState> = list.iter().map(|o| (o.name.as_str(), o.state)).collect();
        let mut doubt = Vec::new();
        let mut broken = Vec::new();
        let mut gone = Vec::new();
        let mut check = Vec::new();
        for vm in self.vms.values().filter(|v| !v.busy) {
            use crate::multipass::InstanceState as S;
            match (vm.state, seen.get(vm.name.as_str())) {
                (_, None) if vm.state != VmState::Deleting => gone.push(vm.name.clone()),
                (VmState::Hot, Some(S::Running)) => check.push(vm.name.clone()),
                (VmState::Warm, Some(S::Suspended)) => {}
                // A daemon restart resumes suspended instances: re-park (reset) it.
                (VmState::Warm, Some(S::Running)) => doubt.push(vm.name.clone()),
                (VmState::Warm | VmState::Hot, Some(s)) => broken.push((vm.name.clone(), *s)),
                _ => {}
            }
        }
        for name in doubt {
            tracing::warn!(vm = %name, "suspended VM found running (daemon restart?); resetting it");
            self.apply(&name, Event::Doubt);
        }
        for (name, state) in broken {
            tracing::warn!(vm = %name, ?state, "idle VM found in an unexpected state; replacing it");
            self.apply(&name, Event::Fail);
            if let Some(v) = self.vms.get(&name) {
                self.persist(&[Write::PutVm(v.record())], true);
            }
        }
        for name in gone {
            tracing::warn!(vm = %name, "instance disappeared from multipassd");
            if let Some(id) = self.vms.get(&name).and_then(|v| v.lease.clone()) {
                let _ = self.release(&id, None, "its VM disappeared");
            }
            self.vms.remove(&name);
            self.persist(&[Write::DeleteVm(name)], true);
        }
        for name in check {
            // Health check of a hot VM over SSH, at background priority (no caller waiting).
            self.apply(&name, Event::Wake);
            self.spawn_plan(&name, PlanKind::Wake);
        }
    }

    fn reconcile(&mut self, list: &[Observed]) {
        let snapshot = self.store_snapshot.take().unwrap_or_default();
        let pools: Vec<PoolConfig> = self.pools.values().map(|p| p.cfg.clone()).collect();
        let r = reconcile::reconcile(&self.settings.prefix, &pools, &snapshot, list, now_ms(), self.settings.delete_strays);
        let mut writes = Vec::new();
        for name in &r.dropped {
            writes.push(Write::DeleteVm(name.clone()));
        }
        for (l, why) in &r.ended {
            tracing::info!(lease = %l.id, vm = %l.vm, "lease ended: {why}");
            writes.push(Write::DeleteLease(l.clone()));
            self.remember_ended(&l.id, why);
        }
        let now = Instant::now();
        for a in &r.vms {
            writes.push(Write::PutVm(a.record.clone()));
            self.vms.insert(
                a.record.name.clone(),
                Vm {
                    name: a.record.name.clone(),
                    pool: a.record.pool.clone(),
                    generation: a.record.generation,
                    state: a.state,
                    busy: false,
                    uses: a.record.uses,
                    lease: a.record.lease.clone(),
                    ssh: None,
                    target_hot: false,
                    idle_since: now,
                    created_ms: a.record.created_ms,
                    rebuild: false,
                    busy_since: now,
                },
            );
        }
        for l in &r.leases {
            let left = Duration::from_millis(l.expires_ms.saturating_sub(now_ms()));
            if let Some(rid) = &l.request_id {
                self.requests.insert((l.pool.clone(), rid.clone()), l.id.clone());
            }
            self.leases.insert(l.id.clone(), Lease { record: l.clone(), deadline: now + left, in_use: 0 });
        }
        for (pool, (rec, ready)) in &r.golden {
            if let Some(p) = self.pools.get_mut(pool) {
                p.golden = Some(Golden { name: rec.name.clone(), generation: rec.generation, ready: *ready, busy: false });
            }
        }
        self.persist(&writes, true);
        for stray in r.strays {
            tracing::warn!(instance = %stray, "deleting a stray instance with our prefix that the store does not know");
            let ctx = self.ctx.clone();
            self.spawn_later(async move {
                if let Err(e) = ctx.destroy(Priority::Provision, &stray).await {
                    tracing::warn!(instance = %stray, "could not delete stray: {}", e.message);
                }
            });
        }
        for name in r.ignored {
            tracing::warn!(instance = %name, "leaving an unknown instance with our prefix alone (delete_strays = false)");
        }
        // Leased VMs: their holders will exec again, so learn their SSH endpoints.
        let leased: Vec<String> = self.vms.values().filter(|v| v.state == VmState::Leased).map(|v| v.name.clone()).collect();
        for name in leased {
            self.spawn_plan(&name, PlanKind::Refresh);
        }
        self.reconciled = true;
        tracing::info!(vms = self.vms.len(), leases = self.leases.len(), "reconciled with multipassd");
    }

    // ------------------------------------------------------------------ maintenance

    fn maintain(&mut self) {
        if !self.reconciled {
            return;
        }
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let actions = {
                let Some(p) = self.pools.get(&name) else { continue };
                let now = Instant::now();
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
                        idle_for: if v.state.is_idle() { now.duration_since(v.idle_since) } else { Duration::ZERO },
                    })
                    .collect();
                let golden = match (&p.cfg.reset, &p.golden) {
                    (ResetStrategy::Clone, None) => GoldenView::Missing,
                    (ResetStrategy::Clone, Some(g)) if g.busy => GoldenView::Building,
                    (ResetStrategy::Clone, Some(g)) if g.ready => GoldenView::Ready(g.generation),
                    (ResetStrategy::Clone, Some(_)) => GoldenView::Missing,
                    _ => GoldenView::NotNeeded,
                };
                let view = PoolView { cfg: &p.cfg, generation: p.generation, vms, waiting: p.waiters.len(), golden, daemon_ok: self.daemon_ok };
                decide::decide(&view)
            };
            for a in actions {
                self.act(&name, a);
            }
            self.serve_waiters(&name);
        }
    }

    fn act(&mut self, pool: &str, action: Action) {
        match action {
            Action::Provision { count, hot } => {
                let Some(p) = self.pools.get(pool) else { return };
                let generation = p.generation;
                for i in 0..count {
                    let name = format!("{}{}-{}", self.settings.prefix, pool, random_suffix());
                    let vm = Vm {
                        name: name.clone(),
                        pool: pool.to_string(),
                        generation,
                        state: VmState::Provisioning,
                        busy: false,
                        uses: 0,
                        lease: None,
                        ssh: None,
                        target_hot: i < hot,
                        idle_since: Instant::now(),
                        created_ms: now_ms(),
                        rebuild: false,
                        busy_since: Instant::now(),
                    };
                    // Intent first: the record exists before the launch does.
                    self.persist(&[Write::PutVm(vm.record())], true);
                    self.vms.insert(name.clone(), vm);
                    self.spawn_plan(&name, PlanKind::Provision { hot: i < hot });
                }
            }
            Action::Reset { vm, hot } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.target_hot = hot;
                }
                self.spawn_plan(&vm, PlanKind::Reset { hot });
            }
            Action::Destroy { vm } => self.spawn_plan(&vm, PlanKind::Destroy),
            Action::Retire { vm } => {
                self.apply(&vm, Event::Retire);
                if let Some(v) = self.vms.get(&vm) {
                    self.persist(&[Write::PutVm(v.record())], true);
                }
                self.spawn_plan(&vm, PlanKind::Destroy);
            }
            Action::Park { vm, hot } => {
                self.apply(&vm, Event::Park { hot });
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.target_hot = hot;
                }
                self.spawn_plan(&vm, PlanKind::Park { hot });
            }
            Action::BuildGolden => self.build_golden(pool),
        }
    }

    fn build_golden(&mut self, pool: &str) {
        let Some(p) = self.pools.get_mut(pool) else { return };
        let old = p.golden.take().map(|g| g.name);
        let name = format!("{}{}-golden-{}", self.settings.prefix, pool, random_suffix());
        p.golden = Some(Golden { name: name.clone(), generation: p.generation, ready: false, busy: true });
        let cfg = p.cfg.clone();
        let rec = VmRecord {
            name: name.clone(),
            pool: pool.to_string(),
            generation: p.generation,
            phase: PhaseRecord::Provisioning,
            uses: 0,
            lease: None,
            created_ms: now_ms(),
        };
        // A golden record in Provisioning is adopted as "in doubt" and rebuilt after a crash.
        self.persist(&[Write::PutVm(VmRecord { phase: PhaseRecord::Golden, ..rec })], true);
        let (ctx, tx, pool) = (self.ctx.clone(), self.tx.clone(), pool.to_string());
        self.spawn_later(async move {
            if let Some(old) = old {
                let _ = ctx.destroy(Priority::Provision, &old).await;
            }
            let result = ctx.golden(&name, &cfg).await;
            let _ = tx.send(Msg::GoldenDone { pool, vm: name, result }).await;
        });
    }

    fn status(&self) -> Status {
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
                leases: self.leases.values().filter(|l| l.record.pool == p.cfg.name).count(),
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
                busy: v.busy,
            })
            .collect();
        let mut leases: Vec<LeaseRecord> = self.leases.values().map(|l| l.record.clone()).collect();
        leases.sort_by(|a, b| a.granted_ms.cmp(&b.granted_ms).then(a.id.cmp(&b.id)));
        Status {
            daemon_ok: self.daemon_ok,
            reconciled: self.reconciled,
            pools,
            vms,
            leases,
            queued_daemon_calls: self.ctx.sched.queued(),
        }
    }
}
