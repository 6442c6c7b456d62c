//! The engine: one actor task owns the engine's state (`mpool_core::pool::state`) and feeds it
//! every event in order, so no two callers can ever get the same VM; the state decides, the
//! actor performs: it stores the writes, answers callers, and runs plans, observations and
//! store probes in their own tasks, which report back as messages. Callers talk to it through
//! the cheap [`Engine`] handle.
//!
//! Durability: a lease granted or ended and a VM created or deleted are written (fsync) before
//! the caller hears about it or before the daemon call that follows; idle-state changes are
//! written lazily (losing one costs an extra reset after a crash, nothing more).
//!
//! Group commit: the actor handles every message already queued (up to [`MAX_BATCH`]) before it
//! writes, so concurrent acquires and releases share one store transaction and one fsync; the
//! write runs off the async workers. The replies and plans those messages cause wait until the
//! write is done.
//!
//! A failed store write breaks no promise: the batch's replies fail (UNAVAILABLE with the
//! cause), none of its daemon calls start, health turns NOT_SERVING, every plan in flight is
//! aborted and the state forgets its memory as a crash would. The store is retried with backoff;
//! once a write works the state reloads what the store holds and reconciles with the daemon
//! exactly as after a restart, resetting every VM the failed batch or an aborted plan touched
//! before anyone gets it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use mpool_core::PoolConfig;
pub use mpool_core::pool::error::EngineError;
pub use mpool_core::pool::leases::{AcquireRequest, LeaseInfo, MAX_REQUEST_ID, Served};
use mpool_core::pool::outcome::PlanKind;
use mpool_core::pool::state::{Answer, Batch, CallerId, Effect, EngineState, Env, Input, PlanOrder, StateSettings};
pub use mpool_core::pool::status::{PoolCapacity, PoolStatus, Status, VmStatus};
use mpool_core::pool::steps::{self, Facts, Step};
use mpool_core::ports::{DaemonPort, Observed, Ports, StepError};
use mpool_core::store::{PoolRecord, RunOutcome, Snapshot, StateStore, StoreError, Write};
use mpool_core::types::SshEndpoint;
use mpool_metrics::Metrics;

use crate::isolation::{ProbeSettings, Prober};
use crate::plans::{Ctx, Run};

mod gc;
use crate::scheduler::{Op, Priority, Scheduler};
pub use gc::GcReport;

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
    /// The isolation probe (`None`: off).
    pub isolation: Option<ProbeSettings>,
    /// How often cleanup runs on its own (zero: only on demand, [`Engine::gc`]).
    pub gc_interval: Duration,
    /// The `[host]` limits new VMs are admitted under (default: none).
    pub limits: mpool_core::pool::admission::Limits,
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
            isolation: None,
            gc_interval: Duration::ZERO,
            limits: Default::default(),
        }
    }
}

/// The longest pause between store retries.
pub const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

/// At most this many queued messages share one store write.
pub const MAX_BATCH: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Msg {
    Acquire(AcquireRequest, Reply<LeaseInfo>),
    Renew {
        id: String,
        ttl: Option<Duration>,
        owner: Option<String>,
        reply: Reply<LeaseInfo>,
    },
    Release {
        id: String,
        owner: Option<String>,
        outcome: Option<RunOutcome>,
        reply: Reply<()>,
    },
    BeginUse {
        id: String,
        owner: Option<String>,
        reply: Reply<LeaseInfo>,
    },
    NoteOutcome {
        id: String,
        outcome: RunOutcome,
        reply: Reply<()>,
    },
    EndUse {
        id: String,
    },
    Refresh {
        id: String,
        owner: Option<String>,
        reply: Reply<LeaseInfo>,
    },
    Reconfigure {
        pools: Vec<PoolConfig>,
        reply: Reply<()>,
    },
    Preheat {
        pool: String,
        count: u32,
        duration: Duration,
        reply: Reply<()>,
    },
    KnowsRequest(mpool_core::store::RequestKey, oneshot::Sender<bool>),
    Status(oneshot::Sender<Status>),
    Capacity(oneshot::Sender<Vec<PoolCapacity>>),
    /// A step of a cleanup run.
    Gc(gc::GcMsg),
    /// The host's capacity was sampled.
    Host(mpool_core::host::HostFacts),
    /// A VM's disk usage was measured (`None`: unknown again, it is being rebuilt).
    DiskUsed {
        vm: String,
        bytes: Option<u64>,
    },
    /// What a task reports back.
    Done(Input),
    Shutdown(oneshot::Sender<()>),
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
        let mut with_generations = Vec::new();
        let mut since = Vec::new();
        let now_ms = ports.clock.wall_ms();
        for cfg in pools {
            let key = cfg.generation_key();
            let record = snapshot.pools.iter().find(|p| p.name == cfg.name);
            let (generation, since_ms) = mpool_core::pool::rebuild::generation_at_start(&cfg, &key, record, now_ms);
            writes.push(Write::PutPool(PoolRecord { name: cfg.name.clone(), generation, key, since_ms }));
            since.push((cfg.name.clone(), since_ms));
            with_generations.push((cfg, generation));
        }
        store.write(&writes, true).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(1024);
        let (health_tx, healthy) = watch::channel(false);
        let state_settings = StateSettings {
            prefix: settings.prefix.clone(),
            delete_strays: settings.delete_strays,
            store_retry: settings.store_retry,
            store_retry_max: STORE_RETRY_MAX,
        };
        let mut state = EngineState::new(state_settings, with_generations, snapshot);
        state.set_limits(settings.limits);
        state.set_generation_since(since);
        let actor = Actor {
            state,
            ctx: Ctx {
                ports,
                sched: Scheduler::new(settings.priorities),
                prober: settings.isolation.clone().map(|s| Arc::new(Prober::new(s))),
            },
            settings,
            store,
            tx: tx.clone(),
            health_tx,
            metrics,
            callers: HashMap::new(),
            next_caller: 0,
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

    /// Records how the command of the Run lease `id` was granted for ended, while the lease
    /// lives (nobody followed it to the end): a retry after the lease expired gets it. A release
    /// with an outcome replaces it.
    pub async fn note_outcome(&self, id: &str, outcome: RunOutcome) -> Result<(), EngineError> {
        self.ask(|reply| Msg::NoteOutcome { id: id.into(), outcome, reply }).await
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

    /// Applies a new list of pools (a reload; validated by the caller): added ones start,
    /// changed ones take their settings at once and rotate their VMs when what shapes a VM
    /// changed, removed ones drain. Leased VMs are never touched.
    pub async fn reconfigure(&self, pools: Vec<PoolConfig>) -> Result<(), EngineError> {
        self.ask(|reply| Msg::Reconfigure { pools, reply }).await
    }

    /// Raises `pool`'s ready floor to `count` VMs for `duration` (a fan-out is coming) and
    /// returns the pool's capacity with it.
    pub async fn preheat(&self, pool: &str, count: u32, duration: Duration) -> Result<PoolCapacity, EngineError> {
        self.ask(|reply| Msg::Preheat { pool: pool.into(), count, duration, reply }).await?;
        let capacity = self.capacity().await?;
        capacity.into_iter().find(|c| c.name == pool).ok_or_else(|| EngineError::UnknownPool(pool.into()))
    }

    /// Whether the engine knows a request id (answered, live or ended, or waiting): a retry
    /// of it gets that answer rather than a new lease.
    pub async fn knows_request(&self, key: mpool_core::store::RequestKey) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::KnowsRequest(key, tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// The engine's state.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Status(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Each pool's ready target now (`min_ready`, or what demand needs when it autoscales), with
    /// the measured arrival rate and refill time.
    pub async fn capacity(&self) -> Result<Vec<PoolCapacity>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Capacity(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Cleanup: purges our instances left deleted but not purged and deletes snapshots on our
    /// idle VMs that are not ours; reports what it found and did (a dry run only reports).
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport, EngineError> {
        self.ask(|reply| Msg::Gc(gc::GcMsg::Start { dry_run, reply: Some(reply) })).await
    }

    /// Tells the engine the host's capacity (sampled outside it: `daemon_info`, statvfs).
    pub async fn set_host(&self, facts: mpool_core::host::HostFacts) {
        let _ = self.tx.send(Msg::Host(facts)).await;
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

/// Where a caller's answer goes.
enum Caller {
    Lease(Reply<LeaseInfo>),
    Done(Reply<()>),
}

impl Caller {
    fn is_closed(&self) -> bool {
        match self {
            Caller::Lease(r) => r.is_closed(),
            Caller::Done(r) => r.is_closed(),
        }
    }

    fn send(self, answer: Result<Answer, EngineError>) {
        match (self, answer) {
            (Caller::Lease(r), Ok(Answer::Lease(info))) => drop(r.send(Ok(info))),
            (Caller::Done(r), Ok(_)) => drop(r.send(Ok(()))),
            (Caller::Lease(r), Ok(Answer::Done)) => {
                drop(r.send(Err(EngineError::Unavailable("the engine answered without a lease".into()))))
            }
            (Caller::Lease(r), Err(e)) => drop(r.send(Err(e))),
            (Caller::Done(r), Err(e)) => drop(r.send(Err(e))),
        }
    }
}

struct Actor {
    state: EngineState,
    settings: Settings,
    ctx: Ctx,
    store: Arc<dyn StateStore>,
    tx: mpsc::Sender<Msg>,
    health_tx: watch::Sender<bool>,
    metrics: Metrics,
    /// Callers waiting for an answer, by the id the state knows them by.
    callers: HashMap<CallerId, Caller>,
    next_caller: CallerId,
    /// Plans and other daemon work in flight (aborted when the store fails).
    tasks: JoinSet<()>,
}

/// The host's offset from UTC at `wall_ms`, in seconds (its time zone's, DST included).
fn local_offset(wall_ms: u64) -> i32 {
    use chrono::{Offset, TimeZone};
    let millis = i64::try_from(wall_ms).unwrap_or(i64::MAX);
    chrono::Local.timestamp_millis_opt(millis).single().map_or(0, |t| t.offset().fix().local_minus_utc())
}

/// Now, on tokio's clock (virtual in tests with paused time), as the std instant the state
/// takes.
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        self.spawn_observer();
        self.spawn_gc_timer(self.settings.gc_interval);
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let far = clock_now() + Duration::from_secs(3600);
            let deadline = self.state.next_deadline().unwrap_or(far).min(far);
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        self.flush().await;
                        return;
                    };
                    if let Some(done) = self.take(msg) {
                        return self.stop(done).await;
                    }
                    // Group commit: what is already queued joins this batch.
                    for _ in 0..MAX_BATCH {
                        let Ok(msg) = rx.try_recv() else { break };
                        if let Some(done) = self.take(msg) {
                            return self.stop(done).await;
                        }
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => self.input(Input::Tick),
                _ = tick.tick() => {}
            }
            self.with_env(|state, env| state.maintain(env));
            self.flush().await;
        }
    }

    /// Runs `f` on the state with what its decisions may read: the clock, name parts, and
    /// which callers went away.
    fn with_env<R>(&mut self, f: impl FnOnce(&mut EngineState, &Env<'_>) -> R) -> R {
        let (ids, callers) = (self.ctx.ports.ids.clone(), &self.callers);
        let gone = |c: CallerId| callers.get(&c).is_none_or(Caller::is_closed);
        let wall_ms = self.ctx.ports.clock.wall_ms();
        let env =
            Env { now: clock_now(), wall_ms, local_offset_s: local_offset(wall_ms), ids: ids.as_ref(), gone: &gone };
        f(&mut self.state, &env)
    }

    /// Feeds one input to the state.
    fn input(&mut self, input: Input) {
        self.with_env(|state, env| state.handle(env, input));
    }

    fn caller(&mut self, c: Caller) -> CallerId {
        self.next_caller += 1;
        self.callers.insert(self.next_caller, c);
        self.next_caller
    }

    /// Handles one message; returns the shutdown's reply channel when it was the shutdown.
    fn take(&mut self, msg: Msg) -> Option<oneshot::Sender<()>> {
        let input = match msg {
            Msg::Shutdown(done) => return Some(done),
            Msg::KnowsRequest(key, reply) => {
                let _ = reply.send(self.state.knows_request(&key));
                return None;
            }
            Msg::Status(reply) => {
                let _ = reply.send(self.state.status(self.ctx.sched.queued()));
                return None;
            }
            Msg::Capacity(reply) => {
                let _ = reply.send(self.with_env(|state, env| state.capacity(env)));
                return None;
            }
            Msg::Acquire(req, reply) => Input::Acquire(req, self.caller(Caller::Lease(reply))),
            Msg::Renew { id, ttl, owner, reply } => {
                Input::Renew { id, ttl, owner, caller: self.caller(Caller::Lease(reply)) }
            }
            Msg::Release { id, owner, outcome, reply } => {
                Input::Release { id, owner, outcome, caller: self.caller(Caller::Done(reply)) }
            }
            Msg::BeginUse { id, owner, reply } => {
                Input::BeginUse { id, owner, caller: self.caller(Caller::Lease(reply)) }
            }
            Msg::NoteOutcome { id, outcome, reply } => {
                Input::NoteOutcome { id, outcome, caller: self.caller(Caller::Done(reply)) }
            }
            Msg::EndUse { id } => Input::EndUse { id },
            Msg::Reconfigure { pools, reply } => Input::Reconfigure { pools, caller: self.caller(Caller::Done(reply)) },
            Msg::Preheat { pool, count, duration, reply } => {
                Input::Preheat { pool, count, duration, caller: self.caller(Caller::Done(reply)) }
            }
            Msg::Refresh { id, owner, reply } => {
                Input::Refresh { id, owner, caller: self.caller(Caller::Lease(reply)) }
            }
            Msg::DiskUsed { vm, bytes } => {
                self.state.set_disk_used(&vm, bytes);
                return None;
            }
            Msg::Host(facts) => {
                self.state.set_host(facts);
                return None;
            }
            Msg::Gc(step) => {
                self.gc(step);
                return None;
            }
            Msg::Done(input) => input,
        };
        self.input(input);
        None
    }

    async fn stop(&mut self, done: oneshot::Sender<()>) {
        self.flush().await;
        // Everyone still waiting hears that mpool is shutting down.
        for (_, c) in self.callers.drain() {
            c.send(Err(EngineError::ShuttingDown));
        }
        let _ = done.send(());
    }

    /// Stores the batch's writes (one transaction, durable if any write must be) off the async
    /// workers, then performs its effects in order; if the write fails, the replies learn it and
    /// nothing else of the batch happens.
    async fn flush(&mut self) {
        while self.tasks.try_join_next().is_some() {}
        let Batch { writes, durable, effects } = self.state.take_batch();
        let written = if writes.is_empty() { Ok(writes) } else { self.write(writes, durable).await };
        match written {
            Ok(_) => {
                for effect in effects {
                    self.perform(effect);
                }
            }
            Err((cause, writes)) => {
                self.metrics.store_write_failed();
                let err = EngineError::StoreUnavailable(cause.clone());
                for effect in effects {
                    if let Effect::Reply { caller, .. } = effect {
                        self.perform(Effect::Reply { caller, answer: Err(err.clone()) });
                    }
                }
                self.tasks.abort_all();
                for effect in self.with_env(|state, env| state.store_failed(env, cause, &writes)) {
                    self.perform(effect);
                }
            }
        }
        let healthy = self.state.healthy();
        self.health_tx.send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// One store write, on a blocking thread unless the store does not block.
    async fn write(&self, writes: Vec<Write>, durable: bool) -> Result<Vec<Write>, (String, Vec<Write>)> {
        let store = self.store.clone();
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
    }

    /// Does what the state said.
    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Reply { caller, answer } => {
                if let Some(c) = self.callers.remove(&caller) {
                    c.send(answer);
                }
            }
            Effect::Start(order) => {
                let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let (vm, plan) = (order.vm.clone(), order.kind);
                    let result = run_plan(&ctx, &tx, *order).await;
                    // A probe's verdict reaches the state before the outcome of its plan: a
                    // wake in a pool that requires isolation grants on it.
                    if let Some(news) = ctx.isolation_news() {
                        let _ = tx.send(Msg::Done(news)).await;
                    }
                    let _ = tx.send(Msg::Done(Input::PlanDone { vm, plan, result })).await;
                });
            }
            Effect::BuildGolden { pool, vm } => {
                let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let run = Run {
                        vm: &vm,
                        pool: &pool,
                        priority: Priority::Provision,
                        hot: false,
                        waiting: None,
                        peer: None,
                    };
                    let plan = steps::golden(!pool.setup.is_empty());
                    let result = ctx.execute(&run, &plan, Facts::absent()).await.map(|_| ());
                    let _ = tx.send(Msg::Done(Input::GoldenDone { pool: pool.name.clone(), vm, result })).await;
                });
            }
            Effect::DeleteStray(name) => {
                let ctx = self.ctx.clone();
                self.tasks.spawn(async move {
                    if let Err(e) = ctx.destroy(Priority::Provision, &name).await {
                        tracing::warn!(instance = %name, "could not delete stray: {}", e.message);
                    }
                });
            }
            Effect::ForgetSsh(vm) => {
                let ssh = self.ctx.ports.ssh.clone();
                self.tasks.spawn(async move { ssh.forget(vm).await });
            }
            Effect::Observe => {
                let (daemon, sched, tx) = (self.ctx.ports.daemon.clone(), self.ctx.sched.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let (list, asked) = sched.run(Priority::Acquire, "", Op::Quick, ask_list(&daemon)).await;
                    let _ = tx.send(Msg::Done(Input::Observed { list, asked })).await;
                });
            }
            Effect::ProbeStore(probe) => {
                let (store, tx) = (self.store.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let blocks = store.blocks();
                    let probe = move || store.write(&probe, true).and_then(|_| store.load());
                    let result = if blocks { tokio::task::spawn_blocking(probe).await } else { Ok(probe()) };
                    let result: Result<Snapshot, String> = result
                        .unwrap_or_else(|e| Err(StoreError::Db { path: String::new(), detail: e.to_string() }))
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Msg::Done(Input::StoreProbed(result))).await;
                });
            }
            Effect::ResetTook { pool, took } => self.metrics.reset_took(&pool, took),
        }
    }

    /// Periodic daemon observation: every health interval when all is well, every half second
    /// while the daemon (or the store) is not, and at once when health changes.
    fn spawn_observer(&self) {
        let (daemon, sched, tx) = (self.ctx.ports.daemon.clone(), self.ctx.sched.clone(), self.tx.clone());
        let mut healthy = self.health_tx.subscribe();
        let interval = self.settings.health_interval;
        tokio::spawn(async move {
            loop {
                let (list, asked) = sched.run(Priority::Provision, "", Op::Quick, ask_list(&daemon)).await;
                let ok = list.is_ok();
                if tx.send(Msg::Done(Input::Observed { list, asked })).await.is_err() {
                    return;
                }
                let pause = if ok && *healthy.borrow_and_update() { interval } else { Duration::from_millis(500) };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = healthy.changed() => {}
                }
            }
        });
    }
}

/// The daemon's list, and when it was asked for (once the scheduler let the call through).
async fn ask_list(daemon: &Arc<dyn DaemonPort>) -> (Result<Vec<Observed>, StepError>, Instant) {
    let asked = clock_now();
    (daemon.list().await, asked)
}

/// Runs one plan: its steps from the facts the engine knows, or (when it cannot be sure) from
/// what the daemon reports, so steps already done are skipped.
async fn run_plan(ctx: &Ctx, tx: &mpsc::Sender<Msg>, order: PlanOrder) -> Result<Option<SshEndpoint>, StepError> {
    let PlanOrder { vm, kind, pool, golden, rebuild, resize, observe, ssh, for_waiters, waiting, peer } = order;
    let peer = peer.as_ref();
    let has_setup = !pool.setup.is_empty();
    let facts = |p: Priority, known: Facts| {
        let vm = &vm;
        async move { if observe { ctx.observe(p, vm).await } else { Ok(known) } }
    };
    match kind {
        PlanKind::Provision { hot } => {
            let run = Run { vm: &vm, pool: &pool, priority: Priority::Provision, hot, waiting: None, peer };
            let plan = steps::provision(pool.reset, golden.as_deref(), has_setup);
            let f = facts(run.priority, Facts::absent()).await?;
            ctx.execute(&run, &plan, f).await
        }
        PlanKind::Reset { hot } => {
            let used = crate::disk::measure(ctx, &vm, &pool, ssh.as_ref(), for_waiters).await;
            let over = crate::disk::over_limit(&vm, &pool, used);
            if used.is_some() {
                // A VM rebuilt for its usage starts afresh: its figure is unknown until measured again.
                let _ = tx.send(Msg::DiskUsed { vm: vm.clone(), bytes: used.filter(|_| !over) }).await;
            }
            let rebuild = rebuild || over;
            let priority = if for_waiters { Priority::Release } else { Priority::Reset };
            let run = Run { vm: &vm, pool: &pool, priority, hot, waiting: Some(&waiting), peer };
            let plan = if rebuild || resize.is_empty() {
                steps::reset(pool.reset, golden.as_deref(), has_setup, rebuild)
            } else {
                steps::resize(resize)
            };
            let f = facts(priority, Facts::running_clean()).await?;
            ctx.execute(&run, &plan, f).await
        }
        // An idle VM resized in place: clean already, so nothing is measured.
        PlanKind::Resize { hot } => {
            let run = Run { vm: &vm, pool: &pool, priority: Priority::Reset, hot, waiting: Some(&waiting), peer };
            let known = if ssh.is_some() { Facts::running_clean() } else { Facts::suspended_clean() };
            let f = facts(run.priority, known).await?;
            ctx.execute(&run, &steps::resize(resize), f).await
        }
        PlanKind::Park { hot } => {
            let run = Run { vm: &vm, pool: &pool, priority: Priority::Reset, hot, waiting: None, peer };
            let (plan, known) = if hot {
                (vec![Step::Start, Step::Ready], Facts::suspended_clean())
            } else {
                (vec![Step::Suspend], Facts::running_clean())
            };
            ctx.execute(&run, &plan, known).await
        }
        // A wake for a waiting caller of a hot VM only needs a round trip.
        PlanKind::Wake => {
            let info = if ssh.is_some() { ctx.check_alive(&vm, ssh).await? } else { ctx.wake(&vm).await? };
            if pool.require_isolation {
                ctx.probe(&vm, &info, peer, true).await;
            }
            Ok(Some(info))
        }
        PlanKind::Check => {
            let info = ctx.check(&vm, ssh).await?;
            ctx.probe(&vm, &info, peer, false).await;
            Ok(Some(info))
        }
        PlanKind::Destroy => ctx.destroy(Priority::Provision, &vm).await.map(|_| None),
        PlanKind::Refresh => ctx.endpoint(&vm).await.map(Some),
    }
}
