//! Model-based tests of the engine: random scripts of acquires (several owners, with and without
//! request ids, Acquire and Run), releases, renewals, expiries, crashes and restarts of mpool,
//! daemon failures, outages and freezes, store write failures, VMs that vanish or are found
//! in another state, and a network between VMs that opens and closes, run against the real engine (through its public handle) with the
//! in-memory fake daemon, SSH and store, on virtual time. After every step they check the
//! promises mpool makes:
//!
//! - no VM is in two live leases, and a leased VM is never stopped, suspended, restored,
//!   deleted or relaunched while its lease lives;
//! - every VM handed out was reset (restored, launched or cloned) since its last lease;
//! - a lease acknowledged to a caller survives crashes, restarts and store failures;
//! - a request id never crosses owners and never answers with a second lease;
//! - the pool never has more than `max_size` VMs, and no owner holds more than the pool's
//!   `max_leases_per_owner`;
//! - the pool requires isolation: no lease is granted once the VMs have reached each other
//!   and the host for longer than the probe interval (the fake's network opens and closes);
//! - healed and left alone, the pool settles at exactly its ready target with no leaked
//!   instance and makes no daemon calls but health reads.
//!
//! Each "life" of mpool runs in its own tokio runtime with paused time: a crash drops the
//! runtime (every task dies mid-step) and the store loses what was not committed durably.
//!
//! `cargo test` runs [`DEFAULT_CASES`] scripts; `MPOOL_MODEL_CASES=50000 cargo test --release
//! --lib model_` runs many more (README "Reliability"). A failure is shrunk to a short script
//! and printed; keep it as a regular test in [`regressions`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::ErrorKind;
use crate::engine::{AcquireRequest, Engine, EngineError, LeaseInfo, Served, Settings, Status};
use crate::fake::Fake;
use mpool_core::ports::{Clock, Ids, Ports, SUFFIX_ALPHABET};
use mpool_core::store::{RequestKind, RunOutcome};
use mpool_core::types::InstanceState;
use mpool_core::{Autoscale, PoolConfig, ResetStrategy};
use mpool_store::memory::MemStore;

/// Scripts per `cargo test` run (override with `MPOOL_MODEL_CASES`).
pub const DEFAULT_CASES: u32 = 2000;

const POOL: &str = "ci";
const TTL: Duration = Duration::from_secs(600);
/// How often the isolation probe runs (the pool requires isolation).
const PROBE: Duration = Duration::from_secs(120);
const OWNERS: [&str; 3] = ["", "alice", "bob"];

/// One step of a script.
#[derive(Clone, Debug)]
pub enum Step {
    /// A caller asks for a VM.
    Acquire {
        /// Index into [`OWNERS`].
        owner: u8,
        /// A request id (small, so retries happen), or none.
        rid: Option<u8>,
        /// A Run rather than an Acquire.
        run: bool,
        /// Waits up to 30 s rather than not at all.
        wait: bool,
    },
    /// The holder of an acknowledged lease releases it (a Run with an outcome).
    Release {
        /// Which lease.
        pick: u8,
    },
    /// A held Run's command ended while nobody followed it: its outcome is noted.
    Note {
        /// Which lease.
        pick: u8,
    },
    /// The holder renews.
    Renew {
        /// Which lease.
        pick: u8,
    },
    /// Time passes.
    Advance {
        /// Seconds.
        secs: u16,
    },
    /// mpool is killed (`kill -9`) and started again.
    Crash,
    /// mpool stops cleanly and starts again.
    Restart,
    /// multipassd goes away / comes back.
    Daemon {
        /// Up.
        up: bool,
    },
    /// multipassd freezes (calls hang to their deadline) / thaws.
    Freeze {
        /// Frozen.
        frozen: bool,
    },
    /// The next daemon call of this kind fails.
    FailNext {
        /// Index into the operations.
        op: u8,
    },
    /// A VM stops answering over SSH.
    SshBreak {
        /// Which instance.
        pick: u8,
    },
    /// The next `n` store writes fail.
    StoreFailNext {
        /// How many.
        n: u8,
    },
    /// The store's disk fills up / has room again.
    Store {
        /// Writes work.
        ok: bool,
    },
    /// An instance disappears behind mpool's back.
    Vanish {
        /// Which instance.
        pick: u8,
    },
    /// multipassd's lists come back this many seconds after they read the instances (0: at once).
    SlowList {
        /// Seconds.
        secs: u8,
    },
    /// The config is reloaded: another image (its VMs rotate) or not, another min_ready.
    Reload {
        /// Switch the image.
        image: bool,
        /// The new min_ready (1-3; hot stays 1, max_size 4).
        min_ready: u8,
    },
    /// The VMs reach each other and the host (the host's rules were removed) / no longer do.
    Network {
        /// Open.
        open: bool,
    },
    /// An instance is found in another state (someone ran `multipass stop/start/suspend`).
    Tamper {
        /// Which instance.
        pick: u8,
        /// Stopped, Running or Suspended.
        state: u8,
    },
}

const OPS: [&str; 8] = ["launch", "start", "stop", "suspend", "snapshot", "restore", "delete", "ssh_info"];

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..3u8, proptest::option::weighted(0.6, 0..4u8), proptest::bool::weighted(0.3), any::<bool>())
            .prop_map(|(owner, rid, run, wait)| Step::Acquire { owner, rid, run, wait }),
        6 => any::<u8>().prop_map(|pick| Step::Release { pick }),
        1 => any::<u8>().prop_map(|pick| Step::Renew { pick }),
        1 => any::<u8>().prop_map(|pick| Step::Note { pick }),
        3 => (1..120u16).prop_map(|secs| Step::Advance { secs }),
        1 => Just(Step::Advance { secs: 700 }),
        1 => Just(Step::Crash),
        1 => Just(Step::Restart),
        1 => any::<bool>().prop_map(|up| Step::Daemon { up }),
        1 => any::<bool>().prop_map(|frozen| Step::Freeze { frozen }),
        2 => (0..OPS.len() as u8).prop_map(|op| Step::FailNext { op }),
        1 => any::<u8>().prop_map(|pick| Step::SshBreak { pick }),
        1 => (1..4u8).prop_map(|n| Step::StoreFailNext { n }),
        1 => any::<bool>().prop_map(|ok| Step::Store { ok }),
        1 => any::<u8>().prop_map(|pick| Step::Vanish { pick }),
        1 => (0..4u8).prop_map(|secs| Step::SlowList { secs }),
        1 => (any::<u8>(), 0..3u8).prop_map(|(pick, state)| Step::Tamper { pick, state }),
        1 => any::<bool>().prop_map(|open| Step::Network { open }),
        1 => (any::<bool>(), 1..4u8).prop_map(|(image, min_ready)| Step::Reload { image, min_ready }),
    ]
}

/// A script: the pool's shape and its steps.
#[derive(Clone, Debug)]
pub struct Script {
    /// The reset strategy.
    pub strategy: ResetStrategy,
    /// The pool's max_leases_per_owner (0 = unlimited).
    pub per_owner: u32,
    /// The pool sizes itself by demand (decay 60 s; daemon calls take 1 s, so bursts count).
    pub autoscale: bool,
    /// The steps.
    pub steps: Vec<Step>,
}

fn script_strategy() -> impl Strategy<Value = Script> {
    let strategy = prop_oneof![4 => Just(ResetStrategy::Snapshot), 1 => Just(ResetStrategy::Recreate), 1 => Just(ResetStrategy::Clone)];
    let per_owner = prop_oneof![2 => Just(0u32), 1 => Just(1), 1 => Just(2)];
    (strategy, per_owner, any::<bool>(), proptest::collection::vec(step_strategy(), 1..40))
        .prop_map(|(strategy, per_owner, autoscale, steps)| Script { strategy, per_owner, autoscale, steps })
}

/// Virtual wall-clock time: it advances with the paused tokio clock of each life and carries
/// over from one life to the next.
#[derive(Default)]
struct VirtualClock {
    st: Mutex<(u64, Option<tokio::time::Instant>)>,
}

impl VirtualClock {
    fn now(&self) -> u64 {
        let st = self.st.lock().unwrap();
        st.0 + st.1.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0)
    }

    /// Called inside a new life's runtime.
    fn new_life(&self) {
        let now = self.now();
        *self.st.lock().unwrap() = (now, Some(tokio::time::Instant::now()));
    }

    /// Called inside the dying life's runtime.
    fn end_life(&self) {
        let now = self.now();
        *self.st.lock().unwrap() = (now + 1, None);
    }
}

impl Clock for VirtualClock {
    fn wall_ms(&self) -> u64 {
        1_800_000_000_000 + self.now()
    }
}

/// Name parts from a counter: the same script makes the same names, so it replays exactly.
#[derive(Default)]
struct CountingIds(std::sync::atomic::AtomicU64);

impl Ids for CountingIds {
    fn suffix(&self) -> String {
        let mut n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut s = String::new();
        for _ in 0..6 {
            s.push(SUFFIX_ALPHABET[(n % SUFFIX_ALPHABET.len() as u64) as usize] as char);
            n /= SUFFIX_ALPHABET.len() as u64;
        }
        s.chars().rev().collect()
    }
}

/// A lease the model knows a caller holds.
#[derive(Clone, Debug)]
struct Held {
    vm: String,
    owner: String,
    kind: RequestKind,
    /// Index into the fake's call log when it was acknowledged.
    since_call: usize,
    /// Virtual wall-clock deadline (ms).
    deadline: u64,
}

/// What the model knows of a request id.
#[derive(Clone, Debug)]
struct Asked {
    lease: String,
    /// Its lease ended, as acknowledged by a release.
    released: bool,
    outcome: Option<RunOutcome>,
    /// An outcome noted (acknowledged) while its lease lived.
    noted: Option<RunOutcome>,
}

/// An acquire in flight: its task, owner, request id, kind and when it was sent (virtual ms).
type Pending = (tokio::task::JoinHandle<Answer>, String, Option<String>, RequestKind, u64);

/// An acquire's answer and, for a new lease, what the tenant found at that very moment: was
/// the VM dirty, and the call log's length (the start of the window nothing may touch it in).
type Answer = (Result<LeaseInfo, EngineError>, Option<(bool, usize)>);

struct Life {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    pending: Vec<Pending>,
}

struct World {
    fake: Fake,
    store: Arc<MemStore>,
    clock: Arc<VirtualClock>,
    ids: Arc<CountingIds>,
    cfg: PoolConfig,
    life: Option<Life>,
    held: BTreeMap<String, Held>,
    asked: HashMap<(String, String), Asked>,
    /// Leases acknowledged and not known to have ended: must be there after a restart.
    must_survive: HashSet<String>,
    /// Leases the model gave up protecting (expired, or their VM taken away): a repeat of one
    /// is not a new hold.
    let_go: HashSet<String>,
    /// VMs taken away from under the engine: a lease on one, even one answered after it went
    /// (the grant raced with the taking), is not protected.
    vanished: HashSet<String>,
    /// Since when (virtual ms) the network between VMs is open, while it is.
    network_open_since: Option<u64>,
    /// It was opened at least once (refusals for isolation are then expected).
    network_ever_open: bool,
    steps: usize,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn is_destructive(call: &str, vm: &str) -> bool {
    ["stop", "suspend", "restore", "delete", "launch", "snapshot", "clone"]
        .iter()
        .any(|op| call == format!("{op} {vm}"))
}

impl World {
    fn new(strategy: ResetStrategy, per_owner: u32, autoscale: bool) -> World {
        let mut cfg = PoolConfig::with_defaults(POOL);
        (cfg.min_ready, cfg.hot, cfg.max_size) = (2, 1, 4);
        cfg.default_ttl = TTL;
        cfg.max_ttl = Duration::from_secs(3600);
        cfg.max_wait = Duration::from_secs(30);
        cfg.idle_timeout = Duration::from_secs(60);
        cfg.readiness_timeout = Duration::from_secs(60);
        cfg.reset = strategy;
        cfg.max_leases_per_owner = per_owner;
        cfg.require_isolation = true;
        let fake = Fake::default();
        if autoscale {
            (cfg.autoscale, cfg.autoscale_decay) = (Autoscale::Demand, Duration::from_secs(60));
            // Refills take time, so bursts raise the target.
            fake.st.lock().unwrap().op_delay = Duration::from_secs(1);
        }
        World {
            fake,
            store: Arc::new(MemStore::new()),
            clock: Arc::new(VirtualClock::default()),
            ids: Arc::new(CountingIds::default()),
            cfg,
            life: None,
            held: BTreeMap::new(),
            asked: HashMap::new(),
            must_survive: HashSet::new(),
            let_go: HashSet::new(),
            vanished: HashSet::new(),
            network_open_since: None,
            network_ever_open: false,
            steps: 0,
        }
    }

    fn start(&mut self) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let settings = Settings {
            health_interval: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(1),
            store_retry: Duration::from_millis(500),
            isolation: Some(crate::ProbeSettings { host: None, host_ports: vec![], interval: PROBE }),
            ..Settings::default()
        };
        let mut ports = Ports::new(Arc::new(self.fake.clone()), Arc::new(self.fake.clone()));
        ports.clock = self.clock.clone();
        ports.ids = self.ids.clone();
        let (cfg, store, clock) = (self.cfg.clone(), self.store.clone(), self.clock.clone());
        let engine = rt.block_on(async move {
            clock.new_life();
            Engine::start(settings, vec![cfg], ports, store)
        });
        let engine = match engine {
            Ok(e) => e,
            // The store refused the start-up write (a failing disk): mpool exits; try again later.
            Err(e) if e.contains("state store") => {
                drop(rt);
                return Ok(());
            }
            Err(e) => return Err(fail(format!("engine did not start: {e}"))),
        };
        self.life = Some(Life { rt, engine, pending: Vec::new() });
        Ok(())
    }

    /// Virtual time (ms), read inside the life's runtime (its clock is the paused one).
    fn vnow(&self) -> u64 {
        let clock = self.clock.clone();
        self.block_on(async move { clock.now() }).unwrap_or_else(|| self.clock.now())
    }

    fn calls(&self) -> Vec<String> {
        self.fake.st.lock().unwrap().calls.clone()
    }

    fn call_count(&self) -> usize {
        self.fake.st.lock().unwrap().calls.len()
    }

    /// Runs the current life for `secs` of virtual time.
    fn advance(&mut self, secs: u64) {
        let Some(life) = &self.life else { return };
        // One sleep: the paused clock jumps from timer to timer, running what each wakes.
        life.rt.block_on(async move { tokio::time::sleep(Duration::from_secs(secs)).await });
    }

    fn block_on<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        self.life.as_ref().map(|l| l.rt.block_on(fut))
    }

    fn status(&self) -> Option<Status> {
        let engine = self.life.as_ref()?.engine.clone();
        self.block_on(async move { engine.status().await.ok() }).flatten()
    }

    /// Ends a lease in the model: checks nothing touched its VM while it was held.
    fn close(&mut self, id: &str, until_call: usize) -> Result<(), TestCaseError> {
        let Some(h) = self.held.remove(id) else {
            return Ok(());
        };
        self.let_go.insert(id.to_string());
        let calls = self.calls();
        if let Some(c) = calls[h.since_call..until_call.min(calls.len())].iter().find(|c| is_destructive(c, &h.vm)) {
            return Err(fail(format!("leased VM {} was touched while lease {id} lived: {c:?}", h.vm)));
        }
        Ok(())
    }

    /// Leases whose deadline passed may have been ended by the engine: from now on the model
    /// no longer protects them.
    fn expire_held(&mut self, after: u64) -> Result<(), TestCaseError> {
        let at = self.call_count();
        let gone: Vec<String> =
            self.held.iter().filter(|(_, h)| h.deadline <= after).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.close(&id, at)?;
            self.must_survive.remove(&id);
        }
        Ok(())
    }

    /// An acquire sent at `sent` (virtual ms) answered with a lease.
    fn check_acquired(
        &mut self,
        owner: &str,
        rid: Option<&str>,
        kind: RequestKind,
        sent: u64,
        info: LeaseInfo,
        found: Option<(bool, usize)>,
    ) -> Result<(), TestCaseError> {
        let id = info.record.id.clone();
        let vm = info.record.vm.clone();
        if info.record.owner != owner {
            return Err(fail(format!("{owner:?} got lease {id} of owner {:?}", info.record.owner)));
        }
        if let Some(rid) = rid {
            if let Some(a) = self.asked.get(&(owner.to_string(), rid.to_string())) {
                if a.lease != id {
                    return Err(fail(format!(
                        "request id {rid:?} of {owner:?} answered with {id}, before with {}",
                        a.lease
                    )));
                }
                if a.released {
                    return Err(fail(format!("request id {rid:?} answered with {id} after that lease was released")));
                }
            }
            self.asked.insert(
                (owner.to_string(), rid.to_string()),
                Asked { lease: id.clone(), released: false, outcome: None, noted: None },
            );
        }
        if self.held.contains_key(&id) || self.let_go.contains(&id) {
            if info.served != Served::Repeat {
                return Err(fail(format!("lease {id} granted twice")));
            }
            return Ok(());
        }
        if let Some(open) = self.network_open_since
            && open + PROBE.as_millis() as u64 <= sent
        {
            return Err(fail(format!(
                "lease {id} granted at or after {sent} ms although the VMs have reached each other since {open} ms (the pool requires isolation)"
            )));
        }
        if let Some((other, _)) = self.held.iter().find(|(_, h)| h.vm == vm) {
            return Err(fail(format!("VM {vm} handed out under {id} while lease {other} holds it")));
        }
        if self.vanished.contains(&vm) {
            // Granted on a VM that was taken away meanwhile: the lease may end at any time.
            self.let_go.insert(id);
            return Ok(());
        }
        if found.is_none() && info.served == Served::Repeat {
            // A retry got a lease whose first answer the model never collected: that caller's
            // task finished (and looked at the VM) while a crash dropped it. The lease's deadline
            // ran from that first grant, which the model never saw: it is not protected.
            self.let_go.insert(id);
            return Ok(());
        }
        let Some((dirty, since_call)) = found else {
            return Err(fail(format!("lease {id} served as {:?} was not looked at by its tenant", info.served)));
        };
        if dirty {
            return Err(fail(format!("VM {vm} handed out under {id} with the previous tenant's files")));
        }
        // The engine's deadline is at least this late: the model stops protecting it no later.
        let deadline = sent + TTL.as_millis() as u64;
        if deadline <= self.vnow() {
            // Granted and expired while the model looked away (a long advance).
            self.let_go.insert(id);
            return Ok(());
        }
        self.held.insert(id.clone(), Held { vm, owner: owner.to_string(), kind, since_call, deadline });
        self.must_survive.insert(id);
        Ok(())
    }

    fn check_refused(
        &self,
        owner: &str,
        rid: Option<&str>,
        kind: RequestKind,
        e: &EngineError,
    ) -> Result<(), TestCaseError> {
        use ErrorKind as Code;
        let ok = match e.kind() {
            Code::Unavailable | Code::ResourceExhausted => true,
            Code::AlreadyExists => kind == RequestKind::Run || rid.is_some(),
            Code::FailedPrecondition => {
                rid.is_some() || (matches!(e, EngineError::NotIsolated { .. }) && self.network_ever_open)
            }
            _ => false,
        };
        if !ok {
            return Err(fail(format!("acquire by {owner:?} (request id {rid:?}) refused with {:?}: {e}", e.kind())));
        }
        if let (Some(rid), EngineError::RequestEnded { lease, outcome, .. }) = (rid, e)
            && let Some(a) = self.asked.get(&(owner.to_string(), rid.to_string()))
        {
            if &a.lease != lease {
                return Err(fail(format!(
                    "request id {rid:?} said ended with {lease}, but it was answered with {}",
                    a.lease
                )));
            }
            if a.released && a.outcome.is_some() && kind == RequestKind::Run && outcome.as_deref() != a.outcome.as_ref()
            {
                return Err(fail(format!("request id {rid:?}: outcome {outcome:?}, recorded {:?}", a.outcome)));
            }
            // An acknowledged note outlives the lease (expired, lost, restarted) unless a
            // release brought another.
            if !(a.released && a.outcome.is_some())
                && let Some(noted) = &a.noted
                && outcome.as_deref() != Some(noted)
            {
                return Err(fail(format!("request id {rid:?}: outcome {outcome:?}, noted {noted:?}")));
            }
        }
        Ok(())
    }

    /// Collects the acquires that have answered.
    fn collect(&mut self) -> Result<(), TestCaseError> {
        let Some(life) = self.life.as_mut() else {
            return Ok(());
        };
        let pending = std::mem::take(&mut life.pending);
        let mut still = Vec::new();
        let mut done = Vec::new();
        for p in pending {
            if p.0.is_finished() { done.push(p) } else { still.push(p) }
        }
        if let Some(l) = self.life.as_mut() {
            l.pending = still;
        }
        for (handle, owner, rid, kind, sent) in done {
            let Some(Ok((result, found))) = self.block_on(handle) else {
                continue;
            };
            tracing::debug!(
                ?owner,
                ?rid,
                ?kind,
                "model: acquire answered {:?}",
                result.as_ref().map(|i| (&i.record.id, &i.record.vm, i.served))
            );
            match result {
                Ok(info) => self.check_acquired(&owner, rid.as_deref(), kind, sent, info, found)?,
                Err(e) => self.check_refused(&owner, rid.as_deref(), kind, &e)?,
            }
        }
        Ok(())
    }

    /// A held lease, by the order they were acknowledged (names are random; picks must not be).
    fn pick_held(&self, pick: u8) -> Option<(String, Held)> {
        let mut held: Vec<(&String, &Held)> = self.held.iter().collect();
        if held.is_empty() {
            return None;
        }
        held.sort_by_key(|(_, h)| h.since_call);
        held.get(pick as usize % held.len()).map(|(id, h)| ((*id).clone(), (*h).clone()))
    }

    /// An instance, by the order they were created.
    fn pick_instance(&self, pick: u8) -> Option<String> {
        let st = self.fake.st.lock().unwrap();
        let born = |n: &str| st.calls.iter().position(|c| *c == format!("launch {n}") || *c == format!("clone {n}"));
        let mut names: Vec<&String> = st.instances.keys().filter(|n| !n.contains("-golden-")).collect();
        if names.is_empty() {
            return None;
        }
        names.sort_by_key(|n| born(n));
        Some(names[pick as usize % names.len()].clone())
    }

    /// A VM taken away from under a lease: the lease may end.
    fn lose(&mut self, vm: &str) -> Result<(), TestCaseError> {
        let at = self.call_count();
        let ids: Vec<String> = self.held.iter().filter(|(_, h)| h.vm == vm).map(|(id, _)| id.clone()).collect();
        for id in ids {
            self.close(&id, at)?;
            self.must_survive.remove(&id);
        }
        Ok(())
    }

    fn kill(&mut self, clean: bool) {
        if let Some(life) = self.life.take() {
            let clock = self.clock.clone();
            let engine = life.engine.clone();
            life.rt.block_on(async move {
                if clean {
                    engine.shutdown().await;
                }
                clock.end_life();
            });
            life.rt.shutdown_background();
        }
        if !clean {
            self.store.crash();
        }
    }

    /// After a restart (or a store recovery): every lease acknowledged and not known to have
    /// ended is there.
    fn check_survivors(&self) -> Result<(), TestCaseError> {
        let Some(s) = self.status() else {
            return Ok(());
        };
        if !s.reconciled {
            return Ok(());
        }
        let live: HashSet<&str> = s.leases.iter().map(|l| l.id.as_str()).collect();
        for id in &self.must_survive {
            if !live.contains(id.as_str()) {
                return Err(fail(format!("acknowledged lease {id} was lost; live: {live:?}")));
            }
        }
        Ok(())
    }

    /// No owner holds more leases in the pool than its `max_leases_per_owner`.
    fn check_fair_share(&self) -> Result<(), TestCaseError> {
        let limit = self.cfg.max_leases_per_owner as usize;
        let Some(s) = self.status().filter(|_| limit > 0) else {
            return Ok(());
        };
        for owner in OWNERS {
            let n = s.leases.iter().filter(|l| l.owner == owner).count();
            if n > limit {
                return Err(fail(format!("owner {owner:?} holds {n} leases, above max_leases_per_owner {limit}")));
            }
        }
        Ok(())
    }

    fn check_size(&self) -> Result<(), TestCaseError> {
        let st = self.fake.st.lock().unwrap();
        let vms = st.instances.keys().filter(|n| !n.contains("-golden-")).count();
        if vms > self.cfg.max_size as usize {
            return Err(fail(format!("{vms} VMs, above max_size {}: {:?}", self.cfg.max_size, st.instances)));
        }
        Ok(())
    }

    fn run_step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        self.steps += 1;
        tracing::debug!(now = self.vnow(), "model step: {step:?}");
        if self.life.is_none() && !matches!(step, Step::Store { .. } | Step::StoreFailNext { .. }) {
            self.start()?;
        }
        match step {
            Step::Acquire { owner, rid, run, wait } => {
                let owner = OWNERS[*owner as usize % OWNERS.len()].to_string();
                let rid = rid.map(|r| format!("req-{r}"));
                let kind = if *run { RequestKind::Run } else { RequestKind::Acquire };
                let req = AcquireRequest {
                    pool: POOL.into(),
                    holder: "model".into(),
                    request_id: rid.clone(),
                    wait: Some(if *wait { Duration::from_secs(30) } else { Duration::ZERO }),
                    owner: (!owner.is_empty()).then(|| owner.clone()),
                    kind,
                    ..Default::default()
                };
                let sent = self.vnow();
                let fake = self.fake.clone();
                if let Some(life) = self.life.as_mut() {
                    let engine = life.engine.clone();
                    let handle = life.rt.spawn(async move {
                        let result = engine.acquire(req).await;
                        // The tenant looks for the last tenant's marker, then writes its own.
                        let found = result.as_ref().ok().filter(|i| i.served != Served::Repeat).map(|i| {
                            let mut st = fake.st.lock().unwrap();
                            let dirty = !st.dirty.insert(i.record.vm.clone());
                            (dirty, st.calls.len())
                        });
                        (result, found)
                    });
                    life.pending.push((handle, owner, rid, kind, sent));
                }
            }
            Step::Release { pick } => {
                let Some((id, h)) = self.pick_held(*pick) else {
                    return Ok(());
                };
                let at = self.call_count();
                let engine = self.life.as_ref().map(|l| l.engine.clone());
                let owner = (!h.owner.is_empty()).then(|| h.owner.clone());
                let outcome = (h.kind == RequestKind::Run).then(|| RunOutcome {
                    code: Some(7),
                    vm: h.vm.clone(),
                    ..Default::default()
                });
                let id2 = id.clone();
                let result = match (engine, outcome.clone()) {
                    (Some(e), Some(o)) => self.block_on(async move { e.release_with_outcome(&id2, owner, o).await }),
                    (Some(e), None) => self.block_on(async move { e.release(&id2, owner).await }),
                    _ => None,
                };
                match result {
                    Some(Ok(())) => {
                        self.close(&id, at)?;
                        self.must_survive.remove(&id);
                        for a in self.asked.values_mut().filter(|a| a.lease == id) {
                            a.released = true;
                            a.outcome = outcome.clone();
                        }
                    }
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable => {}
                    Some(Err(e)) => {
                        return Err(fail(format!("release of held lease {id} failed: {e}")));
                    }
                    None => {}
                }
            }
            Step::Note { pick } => {
                let Some((id, h)) = self.pick_held(*pick) else {
                    return Ok(());
                };
                let Some(engine) = self.life.as_ref().map(|l| l.engine.clone()) else {
                    return Ok(());
                };
                let noted = RunOutcome { code: Some(4), vm: h.vm.clone(), ..Default::default() };
                let (id2, o) = (id.clone(), noted.clone());
                let asked = self.asked.values().any(|a| a.lease == id);
                match self.block_on(async move { engine.note_outcome(&id2, o).await }) {
                    Some(Ok(())) if h.kind == RequestKind::Run && asked => {
                        for a in self.asked.values_mut().filter(|a| a.lease == id) {
                            a.noted = Some(noted.clone());
                        }
                    }
                    Some(Ok(())) => {
                        return Err(fail(format!("an outcome was noted on {id}, not a Run's with a request id")));
                    }
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable => {}
                    Some(Err(e))
                        if (h.kind != RequestKind::Run || !asked) && e.kind() == ErrorKind::InvalidArgument => {}
                    Some(Err(e)) => return Err(fail(format!("noting the outcome of held lease {id} failed: {e}"))),
                    None => {}
                }
            }
            Step::Renew { pick } => {
                let Some((id, h)) = self.pick_held(*pick) else {
                    return Ok(());
                };
                let engine = self.life.as_ref().map(|l| l.engine.clone());
                let owner = (!h.owner.is_empty()).then(|| h.owner.clone());
                let before = self.vnow();
                let id2 = id.clone();
                let result = engine.and_then(|e| self.block_on(async move { e.renew(&id2, Some(TTL), owner).await }));
                match result {
                    Some(Ok(_)) => {
                        if let Some(h) = self.held.get_mut(&id) {
                            h.deadline = before + TTL.as_millis() as u64;
                        }
                    }
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable => {}
                    Some(Err(e)) => return Err(fail(format!("renew of a held lease failed: {e}"))),
                    None => {}
                }
            }
            Step::Advance { secs } => {
                let after = self.vnow() + u64::from(*secs) * 1000 + 3000;
                self.expire_held(after)?;
                self.advance(u64::from(*secs));
            }
            Step::Crash | Step::Restart => {
                self.kill(matches!(step, Step::Restart));
                self.start()?;
            }
            Step::Daemon { up } => self.fake.st.lock().unwrap().down = !up,
            Step::Reload { image, min_ready } => {
                if *image {
                    self.cfg.image = if self.cfg.image == "24.04" { "22.04".into() } else { "24.04".into() };
                }
                self.cfg.min_ready = u32::from(*min_ready);
                let (engine, cfg) = (self.life.as_ref().map(|l| l.engine.clone()), self.cfg.clone());
                let result = engine.and_then(|e| self.block_on(async move { e.reconfigure(vec![cfg]).await }));
                match result {
                    // Not running: the next start reads the new file.
                    Some(Ok(())) | None => {}
                    // The store failed: it may or may not have been applied; the operator
                    // reloads again (healing does).
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable => {}
                    Some(Err(e)) => return Err(fail(format!("reload refused: {e}"))),
                }
            }
            Step::Network { open } => {
                self.fake.st.lock().unwrap().open_network = *open;
                self.network_ever_open |= *open;
                self.network_open_since = match (*open, self.network_open_since) {
                    (true, Some(t)) => Some(t),
                    (true, None) => Some(self.vnow()),
                    (false, _) => None,
                };
            }
            Step::Freeze { frozen } => self.fake.st.lock().unwrap().frozen = *frozen,
            Step::SlowList { secs } => {
                self.fake.st.lock().unwrap().list_lag = Duration::from_secs(u64::from(*secs));
            }
            Step::FailNext { op } => {
                self.fake.st.lock().unwrap().fail_next.push(format!("{} *", OPS[*op as usize % OPS.len()]))
            }
            Step::SshBreak { pick } => {
                if let Some(vm) = self.pick_instance(*pick) {
                    self.fake.st.lock().unwrap().ssh_broken.insert(vm);
                }
            }
            Step::StoreFailNext { n } => self.store.fail_next(u32::from(*n)),
            Step::Store { ok } => {
                self.store.set_failing(if *ok { None } else { Some("No space left on device (os error 28)") })
            }
            Step::Vanish { pick } => {
                if let Some(vm) = self.pick_instance(*pick) {
                    tracing::debug!(vm, "model: vanish");
                    self.lose(&vm)?;
                    self.vanished.insert(vm.clone());
                    let mut st = self.fake.st.lock().unwrap();
                    st.instances.remove(&vm);
                    st.dirty.remove(&vm);
                }
            }
            Step::Tamper { pick, state } => {
                if let Some(vm) = self.pick_instance(*pick) {
                    let s =
                        [InstanceState::Stopped, InstanceState::Running, InstanceState::Suspended][*state as usize % 3];
                    self.fake.st.lock().unwrap().instances.insert(vm, s);
                }
            }
        }
        // Let the engine work for a few virtual seconds, then check.
        let after = self.vnow() + 3000;
        self.expire_held(after)?;
        self.advance(3);
        self.collect()?;
        self.check_size()?;
        self.check_survivors()?;
        self.check_fair_share()?;
        let at = self.call_count();
        let calls = self.calls();
        for (id, h) in &self.held {
            if let Some(c) = calls[h.since_call..at].iter().find(|c| is_destructive(c, &h.vm)) {
                return Err(fail(format!("leased VM {} was touched while lease {id} lived: {c:?}", h.vm)));
            }
        }
        Ok(())
    }

    /// Heals every fault, releases every lease and leaves the pool alone: it must settle at
    /// exactly its ready target, leak nothing, and then only read.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        {
            let mut st = self.fake.st.lock().unwrap();
            (st.down, st.frozen) = (false, false);
            st.fail_next.clear();
            st.ssh_broken.clear();
            st.open_network = false;
        }
        self.network_open_since = None;
        self.store.set_failing(None);
        self.store.fail_next(0);
        if self.life.is_none() {
            self.start()?;
        }
        // The store retries with backoff (at most 10 s apart), then reconciles with a list
        // asked for after that (a slow daemon's takes its lag to come back).
        let lag = self.fake.st.lock().unwrap().list_lag.as_secs();
        let wait = 15 + 2 * lag;
        let after = self.vnow() + wait * 1000;
        self.expire_held(after)?;
        self.advance(wait);
        self.collect()?;
        // A reload the store refused is done again, as an operator would.
        let (engine, cfg) = (self.life.as_ref().map(|l| l.engine.clone()), self.cfg.clone());
        if let Some(Err(e)) = engine.and_then(|e| self.block_on(async move { e.reconfigure(vec![cfg]).await })) {
            return Err(fail(format!("reload after healing: {e}")));
        }
        let ids: Vec<(String, Held)> = self.held.iter().map(|(id, h)| (id.clone(), h.clone())).collect();
        for (id, h) in ids {
            let engine = self.life.as_ref().map(|l| l.engine.clone());
            let owner = (!h.owner.is_empty()).then(|| h.owner.clone());
            let at = self.call_count();
            let id2 = id.clone();
            let r = engine.and_then(|e| self.block_on(async move { e.release(&id2, owner).await }));
            if let Some(Err(e)) = r {
                return Err(fail(format!("final release of {id} after healing: {e}")));
            }
            self.close(&id, at)?;
        }
        self.must_survive.clear();
        // Long enough for resets, replacements, health checks and scale-down after idle_timeout.
        self.advance(900);
        self.collect()?;
        let s = self.status().ok_or_else(|| fail("no engine".into()))?;
        let count = |k: &str| s.pools[0].counts.get(k).copied().unwrap_or(0);
        let want = self.cfg.min_ready as usize;
        if !(s.reconciled && s.store_ok && s.daemon_ok) {
            return Err(fail(format!("not serving after healing: {s:?}")));
        }
        if !s.leases.is_empty()
            || s.vms.len() != want
            || count("hot") != self.cfg.hot as usize
            || count("warm") != want - self.cfg.hot as usize
        {
            return Err(fail(format!(
                "did not settle at {want} ready ({} hot): {:?} leases {:?}",
                self.cfg.hot, s.pools[0].counts, s.leases
            )));
        }
        let known: HashSet<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
        let st = self.fake.st.lock().unwrap();
        let leaked: Vec<&String> =
            st.instances.keys().filter(|n| !n.contains("-golden-") && !known.contains(n.as_str())).collect();
        if !leaked.is_empty() {
            return Err(fail(format!("leaked instances: {leaked:?}")));
        }
        let goldens = st.instances.keys().filter(|n| n.contains("-golden-")).count();
        if goldens > usize::from(self.cfg.reset == ResetStrategy::Clone) {
            return Err(fail(format!("leaked golden VMs: {:?}", st.instances.keys().collect::<Vec<_>>())));
        }
        let at = st.calls.len();
        drop(st);
        self.advance(300);
        let calls = self.calls();
        if let Some(c) = calls[at..]
            .iter()
            .find(|c| !(c.starts_with("list") || c.starts_with("ssh-ready") || c.starts_with("ssh-output")))
        {
            return Err(fail(format!("a settled pool made a daemon call other than a health read: {c:?}")));
        }
        Ok(())
    }
}

/// Runs one script; `Err` names the broken promise.
pub fn run(script: &Script) -> Result<usize, TestCaseError> {
    let mut w = World::new(script.strategy, script.per_owner, script.autoscale);
    w.start()?;
    let result = (|| {
        for step in &script.steps {
            w.run_step(step)?;
        }
        w.settle()
    })();
    let steps = w.steps;
    w.kill(true);
    result.map(|_| steps)
}

fn cases() -> u32 {
    std::env::var("MPOOL_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES)
}

#[test]
fn model_the_engine_keeps_its_promises_under_random_faults() {
    let cases = cases();
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let steps = std::sync::atomic::AtomicUsize::new(0);
    let started = std::time::Instant::now();
    let result = runner.run(&script_strategy(), |script| {
        let n = run(&script)?;
        steps.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    let steps = steps.into_inner();
    eprintln!(
        "model: {cases} scripts, {steps} steps ({:.1} per script), {:.1} s",
        steps as f64 / f64::from(cases.max(1)),
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, script)) => {
            panic!("{why}\nshrunk script (keep it in `regressions`):\n{script:#?}")
        }
        Err(e) => panic!("{e}"),
    }
}

/// Failing scripts found by the property test, shrunk and kept.
mod regressions {
    use super::*;

    fn check(strategy: ResetStrategy, steps: Vec<Step>) {
        if std::env::var_os("MPOOL_MODEL_TRACE").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(std::env::var("MODEL_LOG").unwrap_or_else(|_| "mpool=debug".into()))
                .try_init();
        }
        if let Err(e) = run(&Script { strategy, per_owner: 0, autoscale: false, steps }) {
            panic!("{e}");
        }
    }

    #[test]
    fn a_leased_vm_vanishes_in_a_recreate_pool() {
        let acquire = Step::Acquire { owner: 0, rid: None, run: false, wait: false };
        check(
            ResetStrategy::Recreate,
            vec![acquire.clone(), acquire.clone(), acquire.clone(), acquire, Step::Vanish { pick: 50 }],
        );
    }

    #[test]
    fn a_lease_granted_just_before_a_store_failure() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Crash,
                Step::Daemon { up: false },
                Step::Acquire { owner: 1, rid: Some(3), run: false, wait: false },
                Step::Vanish { pick: 20 },
                Step::Acquire { owner: 1, rid: Some(3), run: false, wait: false },
                Step::StoreFailNext { n: 1 },
                Step::Daemon { up: true },
                Step::Release { pick: 0 },
            ],
        );
    }

    #[test]
    fn a_vm_taken_away_while_it_is_granted_is_not_protected() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Crash,
                Step::Store { ok: true },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::FailNext { op: 1 },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Store { ok: true },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Vanish { pick: 0 },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: true },
                Step::Vanish { pick: 43 },
                Step::StoreFailNext { n: 1 },
                Step::Release { pick: 0 },
            ],
        );
    }

    #[test]
    fn a_list_asked_before_the_store_recovered_is_not_reconciled_with() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Freeze { frozen: true },
                Step::StoreFailNext { n: 1 },
                Step::Freeze { frozen: false },
                Step::SlowList { secs: 1 },
            ],
        );
    }

    #[test]
    fn a_list_asked_before_a_vm_settled_does_not_judge_it() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Daemon { up: false },
                Step::SlowList { secs: 1 },
                Step::FailNext { op: 0 },
                Step::Daemon { up: true },
            ],
        );
    }

    #[test]
    fn slow_lists_after_a_store_failure_still_reconcile() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Store { ok: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Daemon { up: true },
                Step::Daemon { up: true },
                Step::Advance { secs: 34 },
                Step::Freeze { frozen: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::SlowList { secs: 3 },
                Step::Freeze { frozen: true },
                Step::Daemon { up: false },
                Step::Advance { secs: 74 },
                Step::Daemon { up: false },
                Step::FailNext { op: 0 },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
            ],
        );
    }

    #[test]
    fn a_store_failure_after_a_grant() {
        check(
            ResetStrategy::Snapshot,
            vec![
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::StoreFailNext { n: 1 },
                Step::Acquire { owner: 0, rid: None, run: false, wait: true },
            ],
        );
    }

    #[test]
    fn a_retry_after_a_crash_gets_the_lease_its_first_caller_never_heard_of() {
        let script = Script {
            strategy: ResetStrategy::Snapshot,
            per_owner: 0,
            autoscale: true,
            steps: vec![
                Step::Acquire { owner: 0, rid: Some(2), run: false, wait: true },
                Step::FailNext { op: 7 },
                Step::Acquire { owner: 0, rid: None, run: false, wait: false },
                Step::Crash,
                Step::Acquire { owner: 0, rid: Some(2), run: false, wait: false },
            ],
        };
        run(&script).unwrap();
    }

    /// A Run's noted outcome survives a crash and its lease's expiry: the retry gets it.
    #[test]
    fn a_noted_outcome_is_what_a_retry_after_the_expiry_gets() {
        let script = Script {
            strategy: ResetStrategy::Snapshot,
            per_owner: 0,
            autoscale: false,
            steps: vec![
                Step::Acquire { owner: 1, rid: Some(3), run: true, wait: true },
                Step::Note { pick: 0 },
                Step::Crash,
                Step::Advance { secs: 700 },
                Step::Acquire { owner: 1, rid: Some(3), run: true, wait: false },
            ],
        };
        run(&script).unwrap();
    }

    /// A placeholder shape for kept scripts: the pool settles after one acquire and release.
    #[test]
    fn one_acquire_and_release_settles() {
        let script = Script {
            strategy: ResetStrategy::Snapshot,
            per_owner: 0,
            autoscale: false,
            steps: vec![Step::Acquire { owner: 1, rid: Some(0), run: false, wait: true }, Step::Release { pick: 0 }],
        };
        run(&script).unwrap();
    }
}
