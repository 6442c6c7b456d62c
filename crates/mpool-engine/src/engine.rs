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
//! replies and plan spawns those messages cause wait in the batch until the write is done.
//!
//! A failed store write breaks no promise: the batch's replies fail (UNAVAILABLE with the
//! cause), none of its daemon calls start, health turns NOT_SERVING, and the engine forgets its
//! memory as a crash would, aborting every plan in flight. It then retries the store with backoff;
//! once a write works it reloads what the store holds and reconciles with the daemon exactly as
//! after a restart, resetting every VM the failed batch or an aborted plan touched before anyone
//! gets it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use mpool_core::store::{
    LeaseRecord, PhaseRecord, PoolRecord, RequestKind, RunOutcome, Snapshot, StateStore, StoreError, VmRecord, Write,
};
use mpool_core::types::{InstanceState, SshEndpoint as SshInfo};
use mpool_core::{PoolConfig, ResetStrategy};
use mpool_metrics::Metrics;

use super::plans::{Ctx, Run};
use super::scheduler::{Op, Priority, Scheduler};
use mpool_core::pool::decide::{self, Action, GoldenView, PoolView, VmView};
pub use mpool_core::pool::error::EngineError;
use mpool_core::pool::leases::LeaseBook;
pub use mpool_core::pool::leases::{AcquireRequest, LeaseInfo, MAX_REQUEST_ID, Served};
use mpool_core::pool::reconcile;
pub use mpool_core::pool::status::{PoolStatus, Status, VmStatus};
use mpool_core::pool::steps::{self, Facts, Step};
use mpool_core::pool::vm::{Event, Next, VmState, transition};
use mpool_core::ports::{Observed, Ports, StepError};

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
    /// First pause before retrying a store that failed (doubling up to [`STORE_RETRY_MAX`]).
    pub store_retry: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            prefix: "mpool-".into(),
            delete_strays: true,
            reconcile_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(30),
            priorities: true,
            store_retry: Duration::from_millis(500),
        }
    }
}

/// The longest pause between store retries.
pub const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Msg {
    Acquire(AcquireRequest, Reply<LeaseInfo>),
    Renew { id: String, ttl: Option<Duration>, owner: Option<String>, reply: Reply<LeaseInfo> },
    Release { id: String, owner: Option<String>, outcome: Option<RunOutcome>, reply: Reply<()> },
    BeginUse { id: String, owner: Option<String>, reply: Reply<LeaseInfo> },
    EndUse { id: String },
    Refresh { id: String, owner: Option<String>, reply: Reply<LeaseInfo> },
    Status(oneshot::Sender<Status>),
    PlanDone { vm: String, plan: PlanKind, result: Result<Option<SshInfo>, StepError> },
    GoldenDone { pool: String, vm: String, result: Result<(), StepError> },
    Observed(Result<Vec<Observed>, StepError>),
    StoreProbe(Result<Snapshot, String>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlanKind {
    Provision {
        hot: bool,
    },
    Reset {
        hot: bool,
    },
    Park {
        hot: bool,
    },
    /// Start (or check) an idle VM for a waiting caller.
    Wake,
    /// The periodic health check of a hot VM: it stays hot (and counted) meanwhile.
    Check,
    Destroy,
    /// Fetch a leased VM's SSH endpoint again (after a restart, or when SSH fails).
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
    pub fn start(
        settings: Settings,
        pools: Vec<PoolConfig>,
        ports: Ports,
        store: Arc<dyn StateStore>,
    ) -> Result<Engine, String> {
        Engine::start_with_metrics(settings, pools, ports, store, Metrics::default())
    }

    /// [`Engine::start`], recording reset durations into `metrics`.
    pub fn start_with_metrics(
        settings: Settings,
        pools: Vec<PoolConfig>,
        ports: Ports,
        store: Arc<dyn StateStore>,
        metrics: Metrics,
    ) -> Result<Engine, String> {
        let snapshot = store.load().map_err(|e| e.to_string())?;
        let mut writes = Vec::new();
        let mut pool_state = BTreeMap::new();
        for cfg in pools {
            let key = cfg.generation_key();
            let generation = match snapshot.pools.iter().find(|p| p.name == cfg.name) {
                Some(p) if p.key == key => p.generation,
                Some(p) => p.generation.saturating_add(1),
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
            book: LeaseBook::default(),
            waking: HashMap::new(),
            refreshing: HashMap::new(),
            daemon_ok: false,
            reconciled: false,
            health_tx,
            store_snapshot: Some(snapshot),
            doubt: HashSet::new(),
            degraded: None,
            metrics,
            batch: Batch::default(),
            tasks: JoinSet::new(),
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
    pub async fn renew(
        &self,
        id: &str,
        ttl: Option<Duration>,
        owner: Option<String>,
    ) -> Result<LeaseInfo, EngineError> {
        self.ask(|reply| Msg::Renew { id: id.into(), ttl, owner, reply }).await
    }

    /// Ends a lease; its VM is reset in the background. Releasing an ended lease is OK.
    pub async fn release(&self, id: &str, owner: Option<String>) -> Result<(), EngineError> {
        self.ask(|reply| Msg::Release { id: id.into(), owner, outcome: None, reply }).await
    }

    /// Ends a Run's lease and records how its command ended, so a retry of the Run (the same
    /// request id) gets that outcome instead of running again.
    pub async fn release_with_outcome(
        &self,
        id: &str,
        owner: Option<String>,
        outcome: RunOutcome,
    ) -> Result<(), EngineError> {
        self.ask(|reply| Msg::Release { id: id.into(), owner, outcome: Some(outcome), reply }).await
    }

    /// Marks the lease in use (an exec or transfer): it does not expire until [`Engine::end_use`].
    pub async fn begin_use(&self, id: &str, owner: Option<String>) -> Result<LeaseInfo, EngineError> {
        self.ask(|reply| Msg::BeginUse { id: id.into(), owner, reply }).await
    }

    /// Ends a use started with [`Engine::begin_use`].
    pub async fn end_use(&self, id: &str) {
        let _ = self.tx.send(Msg::EndUse { id: id.into() }).await;
    }

    /// Asks the daemon for the leased VM's SSH endpoint again (after an SSH connection to the
    /// old one failed: the daemon may have restarted and moved it) and returns the lease with
    /// the fresh endpoint.
    pub async fn refresh(&self, id: &str, owner: Option<String>) -> Result<LeaseInfo, EngineError> {
        self.ask(|reply| Msg::Refresh { id: id.into(), owner, reply }).await
    }

    /// The engine's state.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Status(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Whether mpool can serve: the daemon answers and the store takes writes (for health).
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
    /// Since when the daemon reports it Starting or Restarting (e.g. resumed by a daemon
    /// restart): transient, waited for up to the pool's readiness timeout.
    transient_since: Option<Instant>,
    /// The engine cannot be sure what the daemon did last (a crash, a call that failed): its
    /// next plan reads the instance's state from the daemon first.
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

/// The store failed: what the engine knows about its recovery.
struct Degraded {
    cause: String,
    retry_at: Instant,
    backoff: Duration,
    probing: bool,
}

struct Actor {
    settings: Settings,
    ctx: Ctx,
    store: Arc<dyn StateStore>,
    tx: mpsc::Sender<Msg>,
    pools: BTreeMap<String, Pool>,
    vms: BTreeMap<String, Vm>,
    book: LeaseBook,
    waking: HashMap<String, Waiter>,
    /// Callers waiting for a leased VM's endpoint to be read again, by VM.
    refreshing: HashMap<String, Vec<(Reply<LeaseInfo>, String)>>,
    daemon_ok: bool,
    reconciled: bool,
    health_tx: watch::Sender<bool>,
    /// What the store held at start (or after a store recovery), until reconciliation.
    store_snapshot: Option<Snapshot>,
    /// VMs to reset before anyone gets them, at the next reconciliation (touched by a batch
    /// whose write failed, or by a plan aborted then).
    doubt: HashSet<String>,
    /// Set while the store cannot be written.
    degraded: Option<Degraded>,
    metrics: Metrics,
    batch: Batch,
    /// Plans and other daemon work in flight (aborted when the store fails).
    tasks: JoinSet<()>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Now, on tokio's clock (virtual in tests with paused time) as a std instant, the kind the
/// core's decisions take.
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// At most this many queued messages share one store write.
pub const MAX_BATCH: usize = 256;

/// Sends a reply: the result, or the store's error when the batch's write failed.
type ReplyEffect = Box<dyn FnOnce(Option<&EngineError>) + Send>;

/// What a batch does once its writes are stored: a reply (told of a failed write instead) or
/// daemon work to start (dropped when the write failed).
enum Effect {
    Reply(ReplyEffect),
    Spawn(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// The writes and effects of the messages handled since the last flush.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    durable: bool,
    effects: Vec<Effect>,
}

impl Actor {
    /// The wall clock, unix milliseconds.
    fn now_ms(&self) -> u64 {
        self.ctx.ports.clock.wall_ms()
    }

    /// A random name part.
    fn suffix(&self) -> String {
        self.ctx.ports.ids.suffix()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        self.spawn_observer();
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        self.flush().await;
                        return;
                    };
                    if let Some(done) = self.take(msg) {
                        self.stop(done).await;
                        return;
                    }
                    // Group commit: what is already queued joins this batch.
                    for _ in 0..MAX_BATCH {
                        let Ok(msg) = rx.try_recv() else { break };
                        if let Some(done) = self.take(msg) {
                            self.stop(done).await;
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => self.deadlines(),
                _ = tick.tick() => {}
            }
            self.maintain();
            self.flush().await;
        }
    }

    /// Handles one message; returns the shutdown's reply channel when it was the shutdown.
    fn take(&mut self, msg: Msg) -> Option<oneshot::Sender<()>> {
        if let Msg::Shutdown(done) = msg {
            return Some(done);
        }
        self.handle(msg);
        None
    }

    async fn stop(&mut self, done: oneshot::Sender<()>) {
        self.flush().await;
        self.fail_all_waiters(EngineError::ShuttingDown);
        let _ = done.send(());
    }

    /// Stores the batch's writes (one transaction, durable if any write must be) off the async
    /// workers, then runs its effects in order; if the write fails, the effects learn it.
    async fn flush(&mut self) {
        for p in self.pools.values() {
            p.waiting.store(p.waiters.len(), std::sync::atomic::Ordering::Relaxed);
        }
        while self.tasks.try_join_next().is_some() {}
        let batch = std::mem::take(&mut self.batch);
        let result = if batch.writes.is_empty() {
            Ok(batch.writes)
        } else {
            let (store, writes, durable) = (self.store.clone(), batch.writes, batch.durable);
            let blocks = store.blocks();
            let write = move || match store.write(&writes, durable) {
                Ok(()) => Ok(writes),
                Err(e) => Err((e, writes)),
            };
            let done = if blocks { tokio::task::spawn_blocking(write).await } else { Ok(write()) };
            match done {
                Ok(Ok(w)) => Ok(w),
                Ok(Err((e, w))) => Err((e.to_string(), w)),
                Err(join) => Err((format!("the store write did not finish: {join}"), Vec::new())),
            }
        };
        match result {
            Ok(_) => {
                for effect in batch.effects {
                    match effect {
                        Effect::Reply(f) => f(None),
                        Effect::Spawn(fut) => {
                            self.tasks.spawn(fut);
                        }
                    }
                }
            }
            Err((cause, writes)) => self.store_failed(cause, &writes, batch.effects),
        }
    }

    /// A write failed: nothing of the batch happened as far as anyone outside knows. Fail its
    /// replies, start none of its work, abort all work in flight, forget memory (as a crash
    /// would) and retry the store with backoff.
    fn store_failed(&mut self, cause: String, writes: &[Write], effects: Vec<Effect>) {
        tracing::error!(
            store = %self.store.describe(),
            "state store write failed: {cause}; failing this batch's requests, starting none of its daemon calls, \
             and retrying the store"
        );
        self.metrics.count("mpool_store_write_failures_total", vec![], 1);
        let err = EngineError::StoreUnavailable(cause.clone());
        for effect in effects {
            if let Effect::Reply(f) = effect {
                f(Some(&err));
            }
        }
        self.doubt.extend(writes.iter().filter_map(|w| w.vm()).map(str::to_string));
        self.doubt.extend(self.vms.values().filter(|v| v.busy || v.state == VmState::Waking).map(|v| v.name.clone()));
        self.tasks.abort_all();
        self.fail_all_waiters(err.clone());
        for (_, waiting) in self.refreshing.drain() {
            for (reply, _) in waiting {
                let _ = reply.send(Err(err.clone()));
            }
        }
        self.vms.clear();
        self.book = LeaseBook::default();
        for p in self.pools.values_mut() {
            p.golden = None;
        }
        self.reconciled = false;
        self.store_snapshot = None;
        let backoff = self.settings.store_retry;
        self.degraded = Some(Degraded { cause, retry_at: clock_now() + backoff, backoff, probing: false });
        self.update_health();
    }

    /// Probes a failed store (a real durable write, then a read) when its retry is due.
    fn retry_store(&mut self) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        if d.probing || clock_now() < d.retry_at {
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
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let blocks = store.blocks();
            let probe = move || store.write(&probe, true).and_then(|_| store.load());
            let result = if blocks { tokio::task::spawn_blocking(probe).await } else { Ok(probe()) };
            let result = result
                .unwrap_or_else(|e| Err(StoreError::Db { path: String::new(), detail: e.to_string() }))
                .map_err(|e| e.to_string());
            let _ = tx.send(Msg::StoreProbe(result)).await;
        });
    }

    fn store_probed(&mut self, result: Result<Snapshot, String>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        d.probing = false;
        match result {
            Ok(snapshot) => {
                tracing::info!(store = %self.store.describe(), "state store takes writes again; reconciling with multipassd");
                self.degraded = None;
                self.store_snapshot = Some(snapshot);
                self.reconciled = false;
                self.update_health();
                self.observe_now();
            }
            Err(e) => {
                d.backoff = (d.backoff * 2).min(STORE_RETRY_MAX);
                d.retry_at = clock_now() + d.backoff;
                d.cause = e;
                tracing::warn!(retry_in = ?d.backoff, "state store still fails: {}", d.cause);
            }
        }
    }

    fn store_error(&self) -> Option<EngineError> {
        self.degraded.as_ref().map(|d| EngineError::StoreUnavailable(d.cause.clone()))
    }

    /// Replies once this batch's writes are stored (or with the store's error if they fail).
    fn reply_later<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, EngineError>) {
        self.batch.effects.push(Effect::Reply(Box::new(move |failed: Option<&EngineError>| {
            let _ = reply.send(match failed {
                Some(e) => Err(e.clone()),
                None => result,
            });
        })));
    }

    /// Spawns `fut` once this batch's writes are stored (intent first); never if they fail.
    fn spawn_later(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.batch.effects.push(Effect::Spawn(Box::pin(fut)));
    }

    /// Adds writes to the batch (stored by [`Actor::flush`] before any reply or spawn of it).
    fn persist(&mut self, writes: &[Write], durable: bool) {
        self.batch.writes.extend_from_slice(writes);
        self.batch.durable |= durable;
    }

    /// Periodic daemon observation: every health interval when all is well, every half second
    /// while the daemon (or the store) is not.
    fn spawn_observer(&self) {
        let (daemon, sched, tx) = (self.ctx.ports.daemon.clone(), self.ctx.sched.clone(), self.tx.clone());
        let mut healthy = self.health_tx.subscribe();
        let interval = self.settings.health_interval;
        tokio::spawn(async move {
            loop {
                let result = sched.run(Priority::Provision, "", Op::Quick, daemon.list()).await;
                let ok = result.is_ok();
                if tx.send(Msg::Observed(result)).await.is_err() {
                    return;
                }
                let pause = if ok && *healthy.borrow_and_update() { interval } else { Duration::from_millis(500) };
                // A change of health (the daemon or the store failing or coming back) ends the
                // pause: the engine wants to know at once.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = healthy.changed() => {}
                }
            }
        });
    }

    /// One observation now (the periodic one may be a health interval away).
    fn observe_now(&self) {
        let (daemon, sched, tx) = (self.ctx.ports.daemon.clone(), self.ctx.sched.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = sched.run(Priority::Acquire, "", Op::Quick, daemon.list()).await;
            let _ = tx.send(Msg::Observed(result)).await;
        });
    }

    fn next_deadline(&self) -> Instant {
        let far = clock_now() + Duration::from_secs(3600);
        let waiters = self.pools.values().flat_map(|p| p.waiters.iter().map(|w| w.deadline));
        let store = self.degraded.as_ref().filter(|d| !d.probing).map(|d| d.retry_at);
        waiters.chain(self.book.next_deadline()).chain(store).min().unwrap_or(far).min(far)
    }

    fn update_health(&self) {
        let healthy = self.daemon_ok && self.degraded.is_none();
        // Watchers (health, the observer) hear of changes only.
        self.health_tx.send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    fn handle(&mut self, msg: Msg) {
        if let Some(err) = self.store_error() {
            // Nothing can be promised while the store fails.
            match msg {
                Msg::Acquire(_, reply) => drop(reply.send(Err(err))),
                Msg::Renew { reply, .. } | Msg::BeginUse { reply, .. } | Msg::Refresh { reply, .. } => {
                    drop(reply.send(Err(err)))
                }
                Msg::Release { reply, .. } => drop(reply.send(Err(err))),
                Msg::Status(reply) => drop(reply.send(self.status())),
                Msg::Observed(result) => self.observed_daemon(&result),
                Msg::StoreProbe(result) => self.store_probed(result),
                // Work of the memory that was dropped: stale.
                Msg::EndUse { .. } | Msg::PlanDone { .. } | Msg::GoldenDone { .. } | Msg::Shutdown(_) => {}
            }
            return;
        }
        if !self.reconciled {
            // Leases are restored at reconciliation: until then nobody can be told about one.
            let err = EngineError::Unavailable("mpool has not reached multipassd yet".into());
            match msg {
                Msg::Renew { reply, .. } | Msg::BeginUse { reply, .. } | Msg::Refresh { reply, .. } => {
                    let _ = reply.send(Err(err));
                    return;
                }
                Msg::Release { reply, .. } => {
                    let _ = reply.send(Err(err));
                    return;
                }
                other => return self.handle_reconciled(other),
            }
        }
        self.handle_reconciled(msg);
    }

    fn handle_reconciled(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire(req, reply) => self.acquire(req, reply),
            Msg::Renew { id, ttl, owner, reply } => {
                let r = self.renew(&id, ttl, owner.as_deref());
                self.reply_later(reply, r);
            }
            Msg::Release { id, owner, outcome, reply } => {
                let r = self.release(&id, owner.as_deref(), "released", outcome);
                self.reply_later(reply, r);
            }
            Msg::BeginUse { id, owner, reply } => {
                let r = self.lease_info(&id, owner.as_deref());
                if r.is_ok() {
                    self.book.set_in_use(&id, true);
                }
                let _ = reply.send(r);
            }
            Msg::EndUse { id } => self.book.set_in_use(&id, false),
            Msg::Refresh { id, owner, reply } => self.refresh(&id, owner.as_deref(), reply),
            Msg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Msg::PlanDone { vm, plan, result } => self.plan_done(&vm, plan, result),
            Msg::GoldenDone { pool, vm, result } => self.golden_done(&pool, &vm, result),
            Msg::Observed(result) => self.observed(result),
            Msg::StoreProbe(result) => self.store_probed(result),
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
        if let Some(key) = req.key() {
            if key.request_id.len() > MAX_REQUEST_ID || key.request_id.chars().any(char::is_control) {
                let _ = reply.send(Err(EngineError::InvalidArgument(format!(
                    "request_id must be at most {MAX_REQUEST_ID} bytes of printable text"
                ))));
                return;
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
                // The lease may be in this very batch: answer once it is stored.
                self.reply_later(reply, answer);
                return;
            }
            // The same request is waiting for a VM: a place beside it (never for a Run).
            let same = |w: &Waiter| w.req.key().as_ref() == Some(&key);
            let waiter = match self.pools.get_mut(&req.pool).and_then(|p| p.waiters.iter_mut().find(|w| same(w))) {
                Some(w) => Some(w),
                None => self.waking.values_mut().find(|w| same(w)),
            };
            if let Some(w) = waiter {
                if w.req.kind == RequestKind::Run || req.kind == RequestKind::Run {
                    let _ =
                        reply.send(Err(EngineError::InProgress { request_id: key.request_id, lease: String::new() }));
                } else {
                    w.replies.push(reply);
                }
                return;
            }
        }
        if !self.reconciled {
            let _ = reply.send(Err(EngineError::Unavailable("mpool has not reached multipassd yet".into())));
            return;
        }
        let now = clock_now();
        let waiter = Waiter {
            req,
            replies: vec![reply],
            since: now,
            deadline: now + wait,
            ttl,
            served: Served::Cold,
            queued: false,
        };
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
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            while pool.waiters.front().is_some_and(Waiter::gone) {
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
            let Some(mut waiter) = self.pools.get_mut(pool_name).and_then(|p| p.waiters.pop_front()) else {
                return;
            };
            waiter.served = if waiter.queued { Served::Cold } else { served };
            self.apply(&vm, Event::Wake);
            self.waking.insert(vm.clone(), waiter);
            self.spawn_plan(&vm, PlanKind::Wake);
        }
    }

    fn grant(&mut self, vm_name: &str, waiter: Waiter, ssh: SshInfo) {
        let now = self.now_ms();
        let rec = LeaseRecord {
            id: format!("lease-{}{}", self.suffix(), self.suffix()),
            pool: waiter.req.pool.clone(),
            vm: vm_name.to_string(),
            holder: waiter.req.holder.clone(),
            request_id: waiter.req.request_id.clone(),
            granted_ms: now,
            expires_ms: now.saturating_add(millis(waiter.ttl)),
            owner: waiter.req.owner.clone().unwrap_or_default(),
        };
        self.apply(vm_name, Event::Woken);
        let Some(vm) = self.vms.get_mut(vm_name) else {
            return;
        };
        vm.lease = Some(rec.id.clone());
        vm.uses = vm.uses.saturating_add(1);
        vm.ssh = Some(ssh.clone());
        let vm_rec = vm.record();
        // Durable before the caller hears of it.
        let mut writes = vec![Write::PutVm(vm_rec)];
        writes.extend(self.book.grant(rec.clone(), clock_now() + waiter.ttl, waiter.req.kind));
        self.persist(&writes, true);
        let info = LeaseInfo {
            record: rec,
            ssh: Some(ssh),
            served: waiter.served,
            waited: clock_now().duration_since(waiter.since),
        };
        // Callers that joined the first with the same request id get the same lease, as a repeat.
        for (i, r) in waiter.replies.into_iter().enumerate() {
            let served = if i == 0 { info.served } else { Served::Repeat };
            self.reply_later(r, Ok(LeaseInfo { served, ..info.clone() }));
        }
    }

    fn lease_info(&self, id: &str, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
        let l = self.book.check(id, owner)?;
        let ssh = self.vms.get(&l.record.vm).and_then(|v| v.ssh.clone());
        Ok(LeaseInfo { record: l.record.clone(), ssh, served: Served::Repeat, waited: Duration::ZERO })
    }

    fn renew(&mut self, id: &str, ttl: Option<Duration>, owner: Option<&str>) -> Result<LeaseInfo, EngineError> {
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
            self.book.renew(id, ttl, clock_now(), self.now_ms()).ok_or_else(|| EngineError::UnknownLease(id.into()))?;
        self.persist(&writes, true);
        self.lease_info(id, owner)
    }

    /// Ends a lease (recording a Run's outcome) and starts its VM's reset.
    fn release(
        &mut self,
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
        let Some((lease, mut writes)) = self.book.end(id, reason, self.now_ms(), outcome) else {
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

    /// Re-reads a leased VM's SSH endpoint for a caller.
    fn refresh(&mut self, id: &str, owner: Option<&str>, reply: Reply<LeaseInfo>) {
        let vm = match self.book.check(id, owner) {
            Ok(l) => l.record.vm.clone(),
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !self.daemon_ok {
            let _ = reply.send(Err(EngineError::Unavailable("multipassd does not answer".into())));
            return;
        }
        let busy = self.vms.get(&vm).is_none_or(|v| v.busy);
        self.refreshing.entry(vm.clone()).or_default().push((reply, id.to_string()));
        if !busy {
            self.spawn_plan(&vm, PlanKind::Refresh);
        }
    }

    /// Expired waiters and leases.
    fn deadlines(&mut self) {
        self.retry_store();
        if self.degraded.is_some() {
            return;
        }
        let now = clock_now();
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let leased = self.vms.values().filter(|v| v.pool == name && v.state == VmState::Leased).count();
            let Some(pool) = self.pools.get_mut(&name) else {
                continue;
            };
            let max_size = pool.cfg.max_size;
            let (expired, kept): (Vec<Waiter>, Vec<Waiter>) = pool.waiters.drain(..).partition(|w| w.deadline <= now);
            pool.waiters = kept.into();
            for w in expired {
                let err = EngineError::Exhausted {
                    pool: name.clone(),
                    waited: clock_now().duration_since(w.since),
                    leased,
                    max_size,
                };
                for r in w.replies {
                    let _ = r.send(Err(err.clone()));
                }
            }
        }
        for id in self.book.expired(now) {
            let _ = self.release(&id, None, "expired", None);
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
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        match transition(vm.state, event) {
            Ok(Next::State(s)) => {
                if s.is_idle() && !vm.state.is_idle() {
                    vm.idle_since = clock_now();
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

    fn spawn_plan(&mut self, name: &str, plan: PlanKind) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = true;
        vm.busy_since = clock_now();
        let Some(pool) = self.pools.get(&vm.pool) else {
            return;
        };
        let cfg = pool.cfg.clone();
        let golden = pool.golden.as_ref().filter(|g| g.ready).map(|g| g.name.clone());
        let has_waiters = !pool.waiters.is_empty();
        let waiting = pool.waiting.clone();
        let (ctx, tx, name, rebuild, ssh, observe) =
            (self.ctx.clone(), self.tx.clone(), name.to_string(), vm.rebuild, vm.ssh.clone(), vm.observe);
        // A wake for a waiting caller of a hot VM only needs a round trip.
        let was_hot = ssh.is_some();
        self.spawn_later(async move {
            let has_setup = !cfg.setup.is_empty();
            // What a plan starts from: what the engine did, unless it cannot be sure (then the
            // daemon's view, so steps already done are skipped).
            let facts = |p: Priority, known: Facts| {
                let (ctx, name) = (&ctx, &name);
                async move { if observe { ctx.observe(p, name).await } else { Ok(known) } }
            };
            let result = match plan {
                PlanKind::Provision { hot } => {
                    let run = Run { vm: &name, pool: &cfg, priority: Priority::Provision, hot, waiting: None };
                    let plan = steps::provision(cfg.reset, golden.as_deref(), has_setup);
                    match facts(run.priority, Facts::absent()).await {
                        Ok(f) => ctx.execute(&run, &plan, f).await,
                        Err(e) => Err(e),
                    }
                }
                PlanKind::Reset { hot } => {
                    let priority = if has_waiters { Priority::Release } else { Priority::Reset };
                    let run = Run { vm: &name, pool: &cfg, priority, hot, waiting: Some(&waiting) };
                    let plan = steps::reset(cfg.reset, golden.as_deref(), has_setup, rebuild);
                    match facts(priority, Facts::running_clean()).await {
                        Ok(f) => ctx.execute(&run, &plan, f).await,
                        Err(e) => Err(e),
                    }
                }
                PlanKind::Park { hot } => {
                    let run = Run { vm: &name, pool: &cfg, priority: Priority::Reset, hot, waiting: None };
                    let (plan, known) = if hot {
                        (vec![Step::Start, Step::Ready], Facts::suspended_clean())
                    } else {
                        (vec![Step::Suspend], Facts::running_clean())
                    };
                    ctx.execute(&run, &plan, known).await
                }
                PlanKind::Wake if was_hot => ctx.check_alive(&name, ssh).await.map(Some),
                PlanKind::Wake => ctx.wake(&name).await.map(Some),
                PlanKind::Check => ctx.check(&name, ssh).await.map(Some),
                PlanKind::Destroy => ctx.destroy(Priority::Provision, &name).await.map(|_| None),
                PlanKind::Refresh => ctx.endpoint(&name).await.map(Some),
            };
            let _ = tx.send(Msg::PlanDone { vm: name, plan, result }).await;
        });
    }

    fn plan_done(&mut self, name: &str, plan: PlanKind, result: Result<Option<SshInfo>, StepError>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.busy = false;
        // After a failure the daemon may have done part of the plan: the next one looks first.
        vm.observe = result.is_err();
        let pool = vm.pool.clone();
        if matches!(plan, PlanKind::Reset { .. }) && result.is_ok() {
            self.metrics.observe(
                "mpool_reset_seconds",
                vec![("pool", pool.clone())],
                clock_now().duration_since(vm.busy_since),
            );
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
                            let rec = vm.record();
                            self.persist(&[Write::PutVm(rec)], false);
                        }
                    }
                    PlanKind::Park { hot } => {
                        vm.ssh = if hot { ssh } else { None };
                        self.apply(name, Event::Parked { hot });
                        if let Some(vm) = self.vms.get(name) {
                            let rec = vm.record();
                            self.persist(&[Write::PutVm(rec)], false);
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
                    PlanKind::Check => vm.ssh = ssh,
                    PlanKind::Destroy => {
                        self.apply(name, Event::Deleted);
                        self.persist(&[Write::DeleteVm(name.to_string())], true);
                    }
                    PlanKind::Refresh => {
                        vm.ssh = ssh;
                        self.answer_refresh(name, None);
                    }
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
                if plan == PlanKind::Refresh {
                    let err = EngineError::Unavailable(format!("cannot read the VM's SSH endpoint: {}", e.message));
                    self.answer_refresh(name, Some(err));
                }
                let event = match (e.unavailable, plan) {
                    (_, PlanKind::Refresh) | (true, PlanKind::Destroy | PlanKind::Check) => None,
                    // The daemon went away mid-plan: the same plan runs again once it is back
                    // (reading what was done first).
                    (true, _)
                        if self
                            .vms
                            .get(name)
                            .is_some_and(|v| matches!(v.state, VmState::Resetting | VmState::Provisioning)) =>
                    {
                        None
                    }
                    (true, _) => Some(Event::Doubt),
                    (false, _) => Some(Event::Fail),
                };
                if let Some(ev) = event {
                    self.apply(name, ev);
                    if let Some(vm) = self.vms.get_mut(name) {
                        vm.ssh = None;
                        let rec = vm.record();
                        self.persist(&[Write::PutVm(rec)], true);
                    }
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
            self.spawn_plan(name, PlanKind::Refresh);
        }
        self.serve_waiters(&pool);
    }

    /// Answers callers waiting for a leased VM's endpoint.
    fn answer_refresh(&mut self, vm: &str, err: Option<EngineError>) {
        for (reply, id) in self.refreshing.remove(vm).unwrap_or_default() {
            let _ = reply.send(match &err {
                Some(e) => Err(e.clone()),
                None => self.lease_info(&id, None),
            });
        }
    }

    fn golden_done(&mut self, pool: &str, vm: &str, result: Result<(), StepError>) {
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
                    created_ms: self.now_ms(),
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
                    self.spawn_plan(&name, PlanKind::Refresh);
                }
            }
        }
        self.update_health();
    }

    fn daemon_down(&mut self, why: &str) {
        if self.daemon_ok {
            tracing::warn!("multipassd is unavailable: {why}");
        }
        self.daemon_ok = false;
        self.update_health();
    }

    /// Whether the daemon answered, when nothing else can be done with the answer.
    fn observed_daemon(&mut self, result: &Result<Vec<Observed>, StepError>) {
        match result {
            Ok(_) => {
                self.daemon_ok = true;
                self.update_health();
            }
            Err(e) => self.daemon_down(&e.message),
        }
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
        if !self.reconciled {
            self.daemon_ok = true;
            self.reconcile(&list);
            self.update_health();
            return;
        }
        self.daemon_ok_now();
        let now = clock_now();
        let seen: HashMap<&str, InstanceState> = list.iter().map(|o| (o.name.as_str(), o.state)).collect();
        let mut doubt = Vec::new();
        let mut broken = Vec::new();
        let mut gone = Vec::new();
        let mut check = Vec::new();
        let mut transient = Vec::new();
        for vm in self.vms.values_mut().filter(|v| !v.busy) {
            use InstanceState as S;
            let state = seen.get(vm.name.as_str()).copied();
            if !matches!(state, Some(S::Starting | S::Restarting)) {
                vm.transient_since = None;
            }
            match (vm.state, state) {
                (_, None) if vm.state != VmState::Deleting => gone.push(vm.name.clone()),
                // Resumed or rebooted by a daemon restart: transient, waited for (with a deadline).
                (VmState::Hot | VmState::Warm, Some(S::Starting | S::Restarting)) => {
                    let since = *vm.transient_since.get_or_insert(now);
                    let limit =
                        self.pools.get(&vm.pool).map(|p| p.cfg.readiness_timeout).unwrap_or(Duration::from_secs(300));
                    if now.duration_since(since) > limit {
                        broken.push((vm.name.clone(), S::Starting));
                    } else {
                        transient.push(vm.name.clone());
                    }
                }
                (VmState::Hot, Some(S::Running)) => check.push(vm.name.clone()),
                (VmState::Warm, Some(S::Suspended)) => {}
                // A daemon restart resumes suspended instances: re-park (reset) it.
                (VmState::Warm, Some(S::Running)) => doubt.push(vm.name.clone()),
                (VmState::Warm | VmState::Hot, Some(s)) => broken.push((vm.name.clone(), s)),
                _ => {}
            }
        }
        for name in transient {
            // Its SSH host key may be new after a cold boot: the next check connects afresh.
            let ssh = self.ctx.ports.ssh.clone();
            let vm = name.clone();
            self.spawn_later(async move { ssh.forget(vm).await });
            if let Some(v) = self.vms.get_mut(&name) {
                v.ssh = None;
            }
        }
        for name in doubt {
            tracing::warn!(vm = %name, "suspended VM found running (daemon restart?); resetting it");
            self.apply(&name, Event::Doubt);
            if let Some(v) = self.vms.get(&name) {
                let rec = v.record();
                self.persist(&[Write::PutVm(rec)], true);
            }
        }
        for (name, state) in broken {
            tracing::warn!(vm = %name, ?state, "idle VM found in an unexpected state; replacing it");
            self.apply(&name, Event::Fail);
            if let Some(v) = self.vms.get(&name) {
                let rec = v.record();
                self.persist(&[Write::PutVm(rec)], true);
            }
        }
        for name in gone {
            tracing::warn!(vm = %name, "instance disappeared from multipassd");
            // Its lease ends, with no reset: there is nothing left to reset (a reset of a
            // recreate pool would launch it again, behind the engine's back).
            if let Some(id) = self.vms.get(&name).and_then(|v| v.lease.clone()) {
                let now = self.now_ms();
                if let Some((_, writes)) = self.book.end(&id, "its VM disappeared", now, None) {
                    tracing::info!(lease = %id, vm = %name, "lease ended: its VM disappeared");
                    self.persist(&writes, true);
                }
            }
            self.vms.remove(&name);
            self.persist(&[Write::DeleteVm(name)], true);
        }
        for name in check {
            // Health check of a hot VM over SSH, at background priority (no caller waiting).
            // It stays hot (and counted as ready) meanwhile.
            self.spawn_plan(&name, PlanKind::Check);
        }
    }

    fn reconcile(&mut self, list: &[Observed]) {
        let snapshot = self.store_snapshot.take().unwrap_or_default();
        let pools: Vec<PoolConfig> = self.pools.values().map(|p| p.cfg.clone()).collect();
        let doubt = std::mem::take(&mut self.doubt);
        let now_wall = self.now_ms();
        let r = reconcile::reconcile(
            &self.settings.prefix,
            &pools,
            &snapshot,
            list,
            now_wall,
            self.settings.delete_strays,
            &doubt,
        );
        let mut writes = Vec::new();
        for name in &r.dropped {
            writes.push(Write::DeleteVm(name.clone()));
        }
        let now = clock_now();
        for a in &r.vms {
            writes.push(Write::PutVm(a.record.clone()));
            let mut vm = Vm::new(a.record.name.clone(), &a.record.pool, a.record.generation, a.state, now, now_wall);
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
            .map(|l| (l.clone(), now + Duration::from_millis(l.expires_ms.saturating_sub(now_wall))))
            .collect();
        let (mut book, restore_writes) = LeaseBook::restore(live, &snapshot);
        writes.extend(restore_writes);
        for (l, why) in &r.ended {
            tracing::info!(lease = %l.id, vm = %l.vm, "lease ended: {why}");
            writes.extend(book.end_stored(l, why, now_wall));
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
        let leased: Vec<String> =
            self.vms.values().filter(|v| v.state == VmState::Leased).map(|v| v.name.clone()).collect();
        for name in leased {
            self.spawn_plan(&name, PlanKind::Refresh);
        }
        self.reconciled = true;
        tracing::info!(vms = self.vms.len(), leases = self.book.len(), "reconciled with multipassd");
    }

    // ------------------------------------------------------------------ maintenance

    fn maintain(&mut self) {
        if !self.reconciled || self.degraded.is_some() {
            return;
        }
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let actions = {
                let Some(p) = self.pools.get(&name) else {
                    continue;
                };
                let now = clock_now();
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
                self.act(&name, a);
            }
            self.serve_waiters(&name);
        }
    }

    fn act(&mut self, pool: &str, action: Action) {
        match action {
            Action::Provision { count, hot } => {
                let Some(p) = self.pools.get(pool) else {
                    return;
                };
                let generation = p.generation;
                for i in 0..count {
                    let name = format!("{}{}-{}", self.settings.prefix, pool, self.suffix());
                    let mut vm =
                        Vm::new(name.clone(), pool, generation, VmState::Provisioning, clock_now(), self.now_ms());
                    vm.target_hot = i < hot;
                    // Intent first: the record exists before the launch does.
                    let rec = vm.record();
                    self.persist(&[Write::PutVm(rec)], true);
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
            Action::Resume { vm, hot } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.target_hot = hot;
                }
                self.spawn_plan(&vm, PlanKind::Provision { hot });
            }
            Action::Destroy { vm } => self.spawn_plan(&vm, PlanKind::Destroy),
            Action::Retire { vm } => {
                self.apply(&vm, Event::Retire);
                if let Some(v) = self.vms.get(&vm) {
                    let rec = v.record();
                    self.persist(&[Write::PutVm(rec)], true);
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
        let name = format!("{}{}-golden-{}", self.settings.prefix, pool, self.suffix());
        let now_ms = self.now_ms();
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
            created_ms: now_ms,
        };
        // A golden record is adopted as ready after a crash only if its instance is stopped,
        // which it only is once its build finished.
        let mut writes = vec![Write::PutVm(rec)];
        // The old golden VM is retired like any other VM (recorded as being deleted, then
        // deleted by the maintenance that finishes interrupted deletes): never left behind.
        if let Some(old) = old {
            let mut vm = Vm::new(old.name.clone(), pool, old.generation, VmState::Deleting, clock_now(), now_ms);
            vm.observe = true;
            writes.push(Write::PutVm(vm.record()));
            self.vms.insert(old.name, vm);
        }
        self.persist(&writes, true);
        let (ctx, tx, pool) = (self.ctx.clone(), self.tx.clone(), pool.to_string());
        self.spawn_later(async move {
            let run = Run { vm: &name, pool: &cfg, priority: Priority::Provision, hot: false, waiting: None };
            let plan = steps::golden(!cfg.setup.is_empty());
            let result = ctx.execute(&run, &plan, Facts::absent()).await.map(|_| ());
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
            queued_daemon_calls: self.ctx.sched.queued(),
        }
    }
}
