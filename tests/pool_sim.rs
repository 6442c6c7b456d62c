//! The pool engine against `mpool sim` over its real socket, TLS and SSH: warm-up, no sharing
//! and FIFO under contention, resets for the snapshot and clone strategies, lease expiry,
//! random daemon failures, and the scheduler's priorities against the daemon lock.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mpool_config::{PoolConfig, ResetStrategy};
use mpool_core::ports::Ports;
use mpool_engine::{AcquireRequest, Engine, LeaseInfo, Settings, Status};
use mpool_multipass::port::MultipassPort;
use mpool_sim::EventKind;
use mpool_ssh::port::SshAdapter;
use mpool_ssh::{ConnectionCache, ExecRequest, SshOptions};
use mpool_store::Store;
use mpool_testkit::{TestSim, wait, wait_event};

struct Rig {
    ts: TestSim,
    engine: Engine,
    ssh: Arc<ConnectionCache>,
}

fn pool(name: &str, min_ready: u32, hot: u32, max_size: u32) -> PoolConfig {
    let mut p = PoolConfig::with_defaults(name);
    p.min_ready = min_ready;
    p.hot = hot;
    p.max_size = max_size;
    p.max_wait = Duration::from_secs(120);
    p
}

async fn rig(pools: Vec<PoolConfig>, tweak: impl FnOnce(&mut mpool_sim::SimConfig)) -> Rig {
    rig_with(pools, tweak, Duration::from_secs(30)).await
}

/// A rig whose quick daemon calls (list, ssh_info, ...) time out after `quick`.
async fn rig_with(pools: Vec<PoolConfig>, tweak: impl FnOnce(&mut mpool_sim::SimConfig), quick: Duration) -> Rig {
    let ts = TestSim::start(tweak).await;
    let client = ts.client("engine").await;
    let ssh = Arc::new(ConnectionCache::new(SshOptions::default()));
    let ports = Ports::new(
        Arc::new(MultipassPort::new(client, quick, Duration::from_secs(60))),
        Arc::new(SshAdapter::new(ssh.clone())),
    );
    let store = Arc::new(Store::open(&ts.dir.path().join("mpool.redb")).unwrap());
    let settings = Settings {
        reconcile_interval: Duration::from_millis(100),
        health_interval: Duration::from_secs(1),
        ..Settings::default()
    };
    let engine = Engine::start(settings, pools, ports, store).unwrap();
    Rig { ts, engine, ssh }
}

/// Polls the engine until `pred` holds (90 s at most, else panics with the last status).
async fn until(e: &Engine, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
    let last = RefCell::new(None);
    wait(what, Duration::from_secs(90))
        .until(|| async {
            let s = e.status().await.unwrap();
            if pred(&s) {
                return Some(s);
            }
            last.replace(Some(s));
            None
        })
        .await
        .unwrap_or_else(|err| panic!("{err}: {:?}", last.borrow()))
}

fn idle(s: &Status, pool: &str) -> usize {
    let p = s.pools.iter().find(|p| p.name == pool).unwrap();
    p.counts.get("hot").copied().unwrap_or(0) + p.counts.get("warm").copied().unwrap_or(0)
}

fn req(pool: &str, holder: &str) -> AcquireRequest {
    AcquireRequest { pool: pool.into(), holder: holder.into(), ..Default::default() }
}

/// Our instances as the simulator lists them.
async fn instances(ts: &TestSim) -> Vec<String> {
    let c = ts.client("engine").await;
    let mut v: Vec<String> =
        c.list().await.unwrap().into_iter().map(|i| i.name).filter(|n| n.starts_with("mpool-")).collect();
    v.sort();
    v
}

async fn sh(r: &Rig, lease: &LeaseInfo, line: &str) -> (Option<u32>, String) {
    let info = lease.ssh.clone().expect("lease carries its SSH endpoint");
    let out = r.ssh.run(&lease.record.vm, &info, ExecRequest::shell(line)).await.unwrap();
    (out.code, out.stdout_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reaches_min_ready_with_its_hot_tier() {
    let r = rig(vec![pool("ci", 3, 1, 5)], |_| {}).await;
    let s = until(&r.engine, "3 ready", |s| idle(s, "ci") == 3).await;
    assert_eq!(s.pools[0].counts.get("hot"), Some(&1));
    let names = instances(&r.ts).await;
    assert_eq!(names.len(), 3, "{names:?}");
    let c = r.ts.client("engine").await;
    let snaps = c.list_snapshots().await.unwrap();
    assert_eq!(snaps.iter().filter(|s| s.name == "mpool-clean").count(), 3, "each VM has its clean snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_acquirers_never_share_and_are_served_first_come_first_served() {
    let r = rig(vec![pool("ci", 8, 0, 8)], |_| {}).await;
    until(&r.engine, "8 ready", |s| idle(s, "ci") == 8).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, LeaseInfo)>();
    let spawn = |i: usize| {
        let (e, tx) = (r.engine.clone(), tx.clone());
        tokio::spawn(async move {
            let l = e.acquire(req("ci", &format!("t{i}"))).await.expect("acquired");
            let _ = tx.send((i, l));
        });
    };
    let mut held: Vec<(usize, LeaseInfo)> = Vec::new();
    let mut vms_held: HashSet<String> = HashSet::new();
    for i in 0..8 {
        spawn(i);
    }
    for _ in 0..8 {
        let (i, l) = rx.recv().await.unwrap();
        assert!(vms_held.insert(l.record.vm.clone()), "VM {} handed out twice", l.record.vm);
        held.push((i, l));
    }
    for i in 8..64 {
        spawn(i);
        // Fix the arrival order: the next caller starts once this one is queued.
        until(&r.engine, "queued", |s| s.pools[0].waiters >= i - 7).await;
    }
    let mut next = 8;
    while next < 64 {
        let (_, l) = held.remove(0);
        assert!(vms_held.remove(&l.record.vm));
        r.engine.release(&l.record.id, None).await.unwrap();
        let (i, l) = rx.recv().await.unwrap();
        assert_eq!(i, next, "served in arrival order");
        assert!(vms_held.insert(l.record.vm.clone()), "VM {} handed out while held", l.record.vm);
        held.push((i, l));
        next += 1;
    }
    assert!(instances(&r.ts).await.len() <= 8, "max_size 8 was respected");
}

async fn file_is_gone_for_the_next_holder(strategy: ResetStrategy) {
    let mut p = pool("ci", 1, 0, 1);
    p.reset = strategy;
    let r = rig(vec![p], |_| {}).await;
    until(&r.engine, "ready", |s| idle(s, "ci") == 1).await;
    let first = r.engine.acquire(req("ci", "first")).await.unwrap();
    let (code, _) = sh(&r, &first, "echo secret > left-behind.txt").await;
    assert_eq!(code, Some(0));
    r.engine.release(&first.record.id, None).await.unwrap();
    let second = r.engine.acquire(req("ci", "second")).await.unwrap();
    assert_eq!(second.record.vm, first.record.vm, "max_size 1: the same VM (name) again");
    let (code, out) = sh(&r, &second, "cat left-behind.txt 2>/dev/null || echo absent").await;
    assert_eq!((code, out.as_str()), (Some(0), "absent\n"), "the next holder sees a clean VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reset_removes_what_a_task_wrote() {
    file_is_gone_for_the_next_holder(ResetStrategy::Snapshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_reset_removes_what_a_task_wrote() {
    file_is_gone_for_the_next_holder(ResetStrategy::Clone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_its_vm_returns_reset() {
    let r = rig(vec![pool("ci", 1, 0, 1)], |_| {}).await;
    until(&r.engine, "ready", |s| idle(s, "ci") == 1).await;
    let mut ev = r.ts.sim.events();
    let lease =
        r.engine.acquire(AcquireRequest { ttl: Some(Duration::from_secs(1)), ..req("ci", "forgetful") }).await.unwrap();
    let (code, _) = sh(&r, &lease, "touch dirty").await;
    assert_eq!(code, Some(0));
    until(&r.engine, "expired and back", |s| s.leases.is_empty() && idle(s, "ci") == 1).await;
    wait_event(&mut ev, |e| e.op == "restore" && e.kind == EventKind::Working && e.instance == lease.record.vm).await;
    let err = r.engine.begin_use(&lease.record.id, None).await.unwrap_err();
    assert_eq!(err.kind(), mpool_engine::ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("expired"), "{err}");
    let again = r.engine.acquire(req("ci", "next")).await.unwrap();
    let (_, out) = sh(&r, &again, "ls").await;
    assert!(!out.contains("dirty"), "reset after expiry: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_daemon_failures_are_absorbed_and_nothing_leaks() {
    let r = rig(vec![pool("ci", 4, 1, 6)], |c| c.fail_rate = 0.05).await;
    until(&r.engine, "ready despite failures", |s| idle(s, "ci") == 4).await;
    for i in 0..24 {
        let l = r.engine.acquire(req("ci", &format!("t{i}"))).await.expect("acquire succeeds: broken VMs are replaced");
        r.engine.release(&l.record.id, None).await.unwrap();
    }
    let s = until(&r.engine, "back to min_ready, nothing broken or busy", |s| {
        idle(s, "ci") >= 4 && s.vms.iter().all(|v| !v.busy && (v.state == "hot" || v.state == "warm"))
    })
    .await;
    r.ts.sim.daemon().set_fail_rate(0.0);
    // Nothing leaked: every instance with our prefix is a VM the engine knows (a golden VM
    // aside), once the in-flight deletes of broken VMs are done.
    let known: HashSet<String> = s.vms.iter().map(|v| v.name.clone()).collect();
    let last = RefCell::new(String::new());
    wait("the daemon's instances are the engine's VMs", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async {
            let names = instances(&r.ts).await;
            let s = r.engine.status().await.unwrap();
            let known_now: HashSet<String> = s.vms.iter().map(|v| v.name.clone()).collect();
            last.replace(format!("daemon {names:?}, engine {known_now:?}"));
            names.iter().all(|n| known_now.contains(n)) && known_now.iter().all(|k| names.contains(k))
        })
        .await
        .unwrap_or_else(|e| panic!("leaked or lost instances: {e}: {} (was {known:?})", last.borrow()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_acquire_jumps_a_burst_of_twenty_resets() {
    let r = rig(vec![pool("ci", 21, 0, 21)], |_| {}).await;
    until(&r.engine, "21 ready", |s| idle(s, "ci") == 21).await;
    let mut leases = Vec::new();
    for i in 0..20 {
        leases.push(r.engine.acquire(req("ci", &format!("t{i}"))).await.unwrap());
    }
    // Now the daemon takes time: each reset is stop + restore + resume (with its clock sync)
    // + suspend, all but the resume's wait holding the daemon lock.
    r.ts.sim.daemon().set_time_scale(0.01);
    let mut ev = r.ts.sim.events();
    for l in &leases {
        r.engine.release(&l.record.id, None).await.unwrap();
    }
    // Wait until the burst is really in flight (the daemon is busy with resets and at least
    // ten of their calls wait in the scheduler)...
    wait_event(&mut ev, |e| e.op == "restore" && e.kind == EventKind::Working).await;
    let most = std::cell::Cell::new(0);
    wait("the burst queues in the scheduler", Duration::from_secs(30))
        .every(Duration::from_millis(5))
        .until(|| async {
            let queued = r.engine.status().await.unwrap().queued_daemon_calls;
            most.set(most.get().max(queued));
            queued >= 10
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: at most {} calls queued", most.get()));
    // ...then acquire the one warm VM, recording every daemon event from here on.
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (log2, mut ev2) = (log.clone(), r.ts.sim.events());
    let recorder = tokio::spawn(async move {
        while let Ok(e) = ev2.recv().await {
            log2.lock().unwrap().push(e);
        }
    });
    let warm = r.engine.acquire(req("ci", "urgent")).await.unwrap();
    let during = log.lock().unwrap().len();
    let blocking = |e: &mpool_sim::SimEvent| {
        e.kind == EventKind::LockAcquired && matches!(e.op, "stop" | "restore" | "suspend" | "snapshot" | "delete")
    };
    let jumped_over = {
        let events = log.lock().unwrap();
        events[..during].iter().filter(|e| blocking(e)).count()
    };
    until(&r.engine, "burst done", |s| idle(s, "ci") == 20).await;
    let after = log.lock().unwrap()[during..].iter().filter(|e| blocking(e)).count();
    recorder.abort();
    assert_eq!(warm.served, mpool_engine::Served::Warm);
    assert!(
        jumped_over <= 6,
        "the acquire waited for at most a few in-flight blocking ops, not the queue: {jumped_over}"
    );
    assert!(after >= 20, "most of the burst's blocking ops ran after the acquire was served: {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_turns_health_off_and_acquires_fail_fast() {
    let r = rig_with(vec![pool("ci", 1, 0, 2)], |_| {}, Duration::from_millis(500)).await;
    until(&r.engine, "ready", |s| idle(s, "ci") == 1).await;
    let mut healthy = r.engine.healthy();
    assert!(*healthy.borrow_and_update());
    // multipassd freezes whole (as one stuck SSH command inside it was seen to do).
    r.ts.sim.daemon().set_hang("list", true);
    r.ts.sim.daemon().set_hang("start", true);
    healthy.wait_for(|h| !*h).await.unwrap();
    // The daemon is still frozen: an answer at all proves the acquire did not hang with it.
    let err = r.engine.acquire(req("ci", "t")).await.unwrap_err();
    assert_eq!(err.kind(), mpool_engine::ErrorKind::Unavailable, "{err}");
    // It thaws: the engine notices by itself and serves again.
    r.ts.sim.daemon().set_hang("list", false);
    r.ts.sim.daemon().set_hang("start", false);
    healthy.wait_for(|h| *h).await.unwrap();
    r.engine.acquire(req("ci", "t")).await.expect("serving again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_daemon_restart_resumed_vms_are_re_parked() {
    let r = rig(vec![pool("ci", 2, 0, 2)], |_| {}).await;
    until(&r.engine, "ready", |s| idle(s, "ci") == 2).await;
    let cfg = r.ts.sim.daemon().cfg_clone();
    // multipassd restarts: it resumes suspended instances, so the pool's warm VMs run again.
    let Rig { ts, engine, ssh: _ssh } = r;
    let TestSim { dir, sim } = ts;
    sim.shutdown().await;
    let sim = mpool_sim::Simulator::start(cfg).await.unwrap();
    let ts = TestSim { dir, sim };
    let c = ts.client("engine").await;
    let last = RefCell::new(Vec::new());
    wait("the VMs are re-parked", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async {
            let states: Vec<_> = c.list().await.unwrap().into_iter().map(|i| i.state).collect();
            let engine_ok = {
                let s = engine.status().await.unwrap();
                s.daemon_ok && idle(&s, "ci") == 2 && s.vms.iter().all(|v| !v.busy)
            };
            let parked = states.iter().all(|s| *s == mpool_multipass::InstanceState::Suspended);
            last.replace(states);
            engine_ok && parked
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", last.borrow()));
    engine.acquire(req("ci", "after-restart")).await.expect("serving after the daemon restart");
}
