//! Engine unit tests: the actor against the scripted fake daemon, on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use crate::ErrorKind;
use crate::engine::{AcquireRequest, Engine, EngineError, Served, Settings, Status};
use crate::fake::Fake;
use mpool_core::ports::Ports;
use mpool_core::{Autoscale, PoolConfig, ResetStrategy};
use mpool_store::memory::MemStore;
use mpool_store::{RequestKind, RunOutcome, StateStore, Store};

fn pool(min_ready: u32, hot: u32, max_size: u32) -> PoolConfig {
    let mut p = PoolConfig::with_defaults("ci");
    (p.min_ready, p.hot, p.max_size) = (min_ready, hot, max_size);
    p.default_ttl = Duration::from_secs(600);
    p.max_ttl = Duration::from_secs(3600);
    p.max_wait = Duration::from_secs(60);
    p.idle_timeout = Duration::from_secs(300);
    p
}

struct Harness {
    fake: Fake,
    engine: Engine,
    _dir: tempfile::TempDir,
    store_path: std::path::PathBuf,
}

fn settings() -> Settings {
    Settings {
        health_interval: Duration::from_secs(30),
        reconcile_interval: Duration::from_secs(1),
        ..Settings::default()
    }
}

fn start(cfg: PoolConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("state.redb");
    let fake = Fake::default();
    let engine = restart(&fake, &store_path, cfg);
    Harness { fake, engine, _dir: dir, store_path }
}

fn restart(fake: &Fake, store_path: &std::path::Path, cfg: PoolConfig) -> Engine {
    start_on(fake, Arc::new(Store::open(store_path).unwrap()), cfg)
}

fn start_on(fake: &Fake, store: Arc<dyn StateStore>, cfg: PoolConfig) -> Engine {
    let ports = Ports::new(Arc::new(fake.clone()), Arc::new(fake.clone()));
    Engine::start(settings(), vec![cfg], ports, store).unwrap()
}

/// An engine on an in-memory store whose writes the test can make fail.
fn start_mem(cfg: PoolConfig) -> (Fake, Arc<MemStore>, Engine) {
    let fake = Fake::default();
    let store = Arc::new(MemStore::new());
    let engine = start_on(&fake, store.clone(), cfg);
    (fake, store, engine)
}

/// Polls the engine's status until `pred` holds (bounded; time is paused, so this is cheap).
async fn until(engine: &Engine, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
    for _ in 0..20_000 {
        let s = engine.status().await.unwrap();
        if pred(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never reached: {what}: {:?}", engine.status().await.unwrap());
}

fn count(s: &Status, state: &str) -> usize {
    s.pools[0].counts.get(state).copied().unwrap_or(0)
}

fn req(holder: &str) -> AcquireRequest {
    AcquireRequest { pool: "ci".into(), holder: holder.into(), ..Default::default() }
}

#[tokio::test(start_paused = true)]
async fn pool_reaches_min_ready_with_its_hot_tier() {
    let h = start(pool(3, 1, 5));
    let s = until(&h.engine, "3 ready", |s| count(s, "hot") == 1 && count(s, "warm") == 2).await;
    assert!(s.daemon_ok && s.reconciled);
    assert_eq!(h.fake.count("launch"), 3);
    assert_eq!(h.fake.count("snapshot"), 3, "each VM gets its clean snapshot");
    assert_eq!(h.fake.count("suspend"), 2, "warm ones are suspended, the hot one is not");
}

#[tokio::test(start_paused = true)]
async fn hot_acquire_makes_no_daemon_call_and_warm_acquire_one_resume() {
    let h = start(pool(1, 1, 2));
    let s = until(&h.engine, "ready", |s| count(s, "hot") == 1).await;
    let vm = s.vms[0].name.clone();
    let (starts, infos) = (h.fake.count(&format!("start {vm}")), h.fake.count(&format!("ssh_info {vm}")));
    let hot = h.engine.acquire(req("a")).await.unwrap();
    assert_eq!((hot.served, hot.record.vm.as_str()), (Served::Hot, vm.as_str()));
    assert_eq!(
        (h.fake.count(&format!("start {vm}")), h.fake.count(&format!("ssh_info {vm}"))),
        (starts, infos),
        "no daemon call for a hot VM"
    );
    assert!(hot.ssh.is_some());

    let h = start(pool(1, 0, 2));
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let vm = s.vms[0].name.clone();
    let starts = h.fake.count(&format!("start {vm}"));
    let warm = h.engine.acquire(req("b")).await.unwrap();
    assert_eq!((warm.served, warm.record.vm.as_str()), (Served::Warm, vm.as_str()));
    assert_eq!(h.fake.count(&format!("start {vm}")), starts + 1, "one resume");
}

#[tokio::test(start_paused = true)]
async fn the_same_request_id_returns_the_same_lease() {
    let h = start(pool(1, 0, 2));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let r = AcquireRequest { request_id: Some("task-1-attempt-1".into()), ..req("a") };
    let (a, b) = tokio::join!(h.engine.acquire(r.clone()), h.engine.acquire(r.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.record.id, b.record.id, "concurrent duplicates share one lease");
    let c = h.engine.acquire(r).await.unwrap();
    assert_eq!((c.record.id.as_str(), c.served), (a.record.id.as_str(), Served::Repeat));
    let s = h.engine.status().await.unwrap();
    assert_eq!(s.leases.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let first = h.engine.acquire(req("first")).await.unwrap();
    let mut waiting = Vec::new();
    for i in 0..4 {
        let e = h.engine.clone();
        waiting.push(tokio::spawn(async move { e.acquire(req(&format!("w{i}"))).await }));
        until(&h.engine, "queued", |s| s.pools[0].waiters == i + 1).await;
    }
    h.engine.release(&first.record.id, None).await.unwrap();
    let mut order = Vec::new();
    for w in waiting {
        let lease = w.await.unwrap().unwrap();
        assert_eq!(lease.served, Served::Cold);
        order.push(lease.record.holder.clone());
        h.engine.release(&lease.record.id, None).await.unwrap();
    }
    assert_eq!(order, vec!["w0", "w1", "w2", "w3"]);
    assert_eq!(h.fake.st.lock().unwrap().high_water, 1, "max_size 1 was never exceeded");
}

fn owned(owner: &str, holder: &str) -> AcquireRequest {
    AcquireRequest { owner: Some(owner.into()), ..req(holder) }
}

#[tokio::test(start_paused = true)]
async fn waiting_owners_are_served_in_turn_first_come_first_served_within_each() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let first = h.engine.acquire(owned("carol", "first")).await.unwrap();
    let mut waiting = Vec::new();
    for (i, (owner, holder)) in
        [("alice", "a0"), ("alice", "a1"), ("alice", "a2"), ("bob", "b0"), ("bob", "b1")].into_iter().enumerate()
    {
        let e = h.engine.clone();
        waiting.push(tokio::spawn(async move { e.acquire(owned(owner, holder)).await }));
        until(&h.engine, "queued", |s| s.pools[0].waiters == i + 1).await;
    }
    h.engine.release(&first.record.id, Some("carol".into())).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..waiting.len() {
        // Whoever was served releases; the next one in turn gets the VM.
        let s = until(&h.engine, "granted", |s| s.leases.len() == 1).await;
        let l = &s.leases[0];
        order.push(l.holder.clone());
        h.engine.release(&l.id, Some(l.owner.clone())).await.unwrap();
    }
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    assert_eq!(order, vec!["a0", "b0", "a1", "b1", "a2"], "a fan-out does not starve a later owner");
}

#[tokio::test(start_paused = true)]
async fn an_owner_at_its_limit_waits_for_its_own_release_while_others_are_served() {
    let mut cfg = pool(2, 0, 3);
    cfg.max_leases_per_owner = 1;
    let h = start(cfg);
    until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    let mine = h.engine.acquire(owned("alice", "a0")).await.unwrap();
    let short = AcquireRequest { wait: Some(Duration::from_secs(5)), ..owned("alice", "a1") };
    let err = h.engine.acquire(short).await.unwrap_err();
    assert_eq!(h.engine.capacity().await.unwrap()[0].ready_target, 2, "autoscale off: min_ready");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(matches!(err, EngineError::OwnerLimit { held: 1, limit: 1, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("\"alice\"") && text.contains("max_leases_per_owner (1)"), "{text}");
    assert_eq!(h.engine.status().await.unwrap().leases.len(), 1, "a free VM was there, but not for alice");

    let e = h.engine.clone();
    let next = tokio::spawn(async move { e.acquire(owned("alice", "a2")).await });
    until(&h.engine, "alice waits", |s| s.pools[0].waiters == 1).await;
    let other = h.engine.acquire(owned("bob", "b0")).await.unwrap();
    assert_eq!(other.record.owner, "bob", "bob is served past alice's held-back caller");
    let s = h.engine.status().await.unwrap();
    assert_eq!((s.pools[0].waiters, s.leases.len()), (1, 2));
    h.engine.release(&mine.record.id, Some("alice".into())).await.unwrap();
    let again = next.await.unwrap().unwrap();
    assert_eq!(again.record.holder, "a2");
    let s = h.engine.status().await.unwrap();
    assert_eq!(s.leases.iter().filter(|l| l.owner == "alice").count(), 1);
    assert!(s.vms.len() <= 3);
}

#[tokio::test(start_paused = true)]
async fn a_vm_reset_for_a_waiting_caller_is_handed_over_running() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let first = h.engine.acquire(req("first")).await.unwrap();
    let vm = first.record.vm.clone();
    let e = h.engine.clone();
    let next = tokio::spawn(async move { e.acquire(req("next")).await });
    until(&h.engine, "queued", |s| s.pools[0].waiters == 1).await;
    let (suspends, starts) = (h.fake.count(&format!("suspend {vm}")), h.fake.count(&format!("start {vm}")));
    h.engine.release(&first.record.id, None).await.unwrap();
    let lease = next.await.unwrap().unwrap();
    assert_eq!((lease.served, lease.record.vm.as_str()), (Served::Cold, vm.as_str()));
    assert_eq!(h.fake.count(&format!("suspend {vm}")), suspends, "not suspended only to be resumed");
    assert_eq!(h.fake.count(&format!("start {vm}")), starts + 1, "one boot after the restore, no resume");
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_answers_resource_exhausted_after_the_wait() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let _held = h.engine.acquire(req("a")).await.unwrap();
    let err = h.engine.acquire(AcquireRequest { wait: Some(Duration::from_secs(5)), ..req("b") }).await.unwrap_err();
    assert!(matches!(err, EngineError::Exhausted { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
}

#[tokio::test(start_paused = true)]
async fn an_unrenewed_lease_expires_and_its_vm_is_reset() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(AcquireRequest { ttl: Some(Duration::from_secs(10)), ..req("a") }).await.unwrap();
    h.engine.renew(&lease.record.id, Some(Duration::from_secs(20)), None).await.unwrap();
    until(&h.engine, "expired and reset", |s| s.leases.is_empty() && count(s, "warm") == 1).await;
    assert_eq!(h.fake.count(&format!("restore {}", lease.record.vm)), 1);
    let err = h.engine.renew(&lease.record.id, None, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_lease_in_use_does_not_expire() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(AcquireRequest { ttl: Some(Duration::from_secs(10)), ..req("a") }).await.unwrap();
    h.engine.begin_use(&lease.record.id, None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.engine.status().await.unwrap().leases.len(), 1);
    h.engine.end_use(&lease.record.id).await;
    until(&h.engine, "expired", |s| s.leases.is_empty()).await;
}

#[tokio::test(start_paused = true)]
async fn release_is_idempotent_and_unknown_leases_are_not_found() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(req("a")).await.unwrap();
    h.engine.release(&lease.record.id, None).await.unwrap();
    h.engine.release(&lease.record.id, None).await.unwrap();
    assert_eq!(h.engine.release("lease-nope", None).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(h.engine.begin_use(&lease.record.id, None).await.unwrap_err().kind(), ErrorKind::FailedPrecondition);
    let err = h.engine.acquire(AcquireRequest { pool: "nope".into(), ..req("a") }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err =
        h.engine.acquire(AcquireRequest { ttl: Some(Duration::from_secs(99_999)), ..req("a") }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn another_owners_lease_is_refused() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(AcquireRequest { owner: Some("alice".into()), ..req("a") }).await.unwrap();
    let err = h.engine.begin_use(&lease.record.id, Some("bob".into())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    h.engine.begin_use(&lease.record.id, Some("alice".into())).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_vm_failing_its_readiness_check_is_replaced_and_the_caller_gets_another() {
    let h = start(pool(2, 0, 3));
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    let first = s.vms[0].name.clone();
    h.fake.st.lock().unwrap().ssh_broken.insert(first.clone());
    let lease = h.engine.acquire(req("a")).await.unwrap();
    assert_ne!(lease.record.vm, first);
    until(&h.engine, "broken one replaced", |s| !s.vms.iter().any(|v| v.name == first) && count(s, "warm") == 2).await;
    assert_eq!(h.fake.count(&format!("delete {first}")), 1, "deleted once, as broken (a fresh build deletes nothing)");
}

#[tokio::test(start_paused = true)]
async fn a_failed_reset_breaks_the_vm_and_a_replacement_is_provisioned() {
    let h = start(pool(1, 0, 2));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(req("a")).await.unwrap();
    h.fake.st.lock().unwrap().fail_next.push(format!("restore {}", lease.record.vm));
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "replaced", |s| count(s, "warm") == 1 && !s.vms.iter().any(|v| v.name == lease.record.vm)).await;
    assert!(!h.fake.st.lock().unwrap().instances.contains_key(&lease.record.vm), "broken VM deleted");
}

#[tokio::test(start_paused = true)]
async fn a_down_daemon_fails_acquires_fast_and_the_engine_recovers() {
    let h = start(pool(1, 0, 2));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    h.fake.st.lock().unwrap().down = true;
    until(&h.engine, "noticed", |s| !s.daemon_ok).await;
    assert!(!*h.engine.healthy().borrow());
    let err = h.engine.acquire(req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    h.fake.st.lock().unwrap().down = false;
    until(&h.engine, "back", |s| s.daemon_ok).await;
    h.engine.acquire(req("a")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_vms_scale_down_to_min_ready() {
    let h = start(pool(1, 0, 4));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let mut leases = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let e = h.engine.clone();
        tasks.push(tokio::spawn(async move { e.acquire(req(&format!("t{i}"))).await }));
    }
    for t in tasks {
        leases.push(t.await.unwrap().unwrap());
    }
    for l in &leases {
        h.engine.release(&l.record.id, None).await.unwrap();
    }
    until(&h.engine, "all idle", |s| count(s, "warm") >= 3).await;
    until(&h.engine, "scaled down", |s| s.vms.len() == 1 && count(s, "warm") == 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_demand_sized_pool_keeps_what_a_burst_needed_then_decays_to_min_ready() {
    let mut cfg = pool(1, 0, 10);
    (cfg.autoscale, cfg.autoscale_decay) = (Autoscale::Demand, Duration::from_secs(120));
    cfg.idle_timeout = Duration::from_secs(30);
    let h = start(cfg.clone());
    h.fake.st.lock().unwrap().op_delay = Duration::from_secs(2);
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let e = h.engine.clone();
        tasks.push(tokio::spawn(async move { e.acquire(req(&format!("t{i}"))).await }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap().unwrap());
    }
    for l in &leases {
        h.engine.release(&l.record.id, None).await.unwrap();
    }
    let cap = h.engine.capacity().await.unwrap();
    assert!(cap[0].ready_target >= 6 && cap[0].ready_target <= 10, "{cap:?}");
    assert!(cap[0].arrival_rate > 0.0 && !cap[0].refill_time.is_zero(), "{cap:?}");
    let idle = |s: &Status| count(s, "warm") + count(s, "hot");
    until(&h.engine, "all idle", |s| idle(s) >= 6).await;
    // Past idle_timeout: a static pool would be back at min_ready (`idle_vms_scale_down_to_min_ready`).
    tokio::time::sleep(cfg.idle_timeout + Duration::from_secs(15)).await;
    let s = h.engine.status().await.unwrap();
    assert!(idle(&s) >= 4, "the burst's need is kept while it decays: {:?}", s.pools[0].counts);
    assert!(s.vms.len() <= 10);
    until(&h.engine, "decayed to min_ready", |s| s.vms.len() == 1 && idle(s) == 1).await;
    assert_eq!(h.engine.capacity().await.unwrap()[0].ready_target, 1);
}

#[tokio::test(start_paused = true)]
async fn sixty_four_acquirers_never_share_a_vm_or_exceed_max_size() {
    let h = start(pool(2, 1, 8));
    until(&h.engine, "ready", |s| count(s, "hot") + count(s, "warm") == 2).await;
    let holders = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (e, holders) = (h.engine.clone(), holders.clone());
        tasks.push(tokio::spawn(async move {
            let l = e
                .acquire(AcquireRequest { wait: Some(Duration::from_secs(60)), ..req(&format!("t{i}")) })
                .await
                .unwrap();
            assert!(holders.lock().unwrap().insert(l.record.vm.clone()), "{} handed out twice", l.record.vm);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(holders.lock().unwrap().remove(&l.record.vm));
            e.release(&l.record.id, None).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(h.fake.st.lock().unwrap().high_water <= 8);
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_leases_resets_the_rest_and_deletes_strays() {
    let h = start(pool(2, 0, 3));
    until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    let lease = h.engine.acquire(req("a")).await.unwrap();
    h.engine.shutdown().await;
    h.fake.st.lock().unwrap().instances.insert("mpool-ci-stray".into(), mpool_core::types::InstanceState::Running);
    h.fake.st.lock().unwrap().instances.insert("not-ours".into(), mpool_core::types::InstanceState::Running);
    let engine = restart(&h.fake, &h.store_path, pool(2, 0, 3));
    until(&engine, "reconciled", |s| s.reconciled && count(s, "warm") == 2).await;
    let again = engine.begin_use(&lease.record.id, None).await.unwrap();
    assert_eq!(again.record.vm, lease.record.vm, "the lease survived the restart");
    until(&engine, "stray gone", |_| !h.fake.st.lock().unwrap().instances.contains_key("mpool-ci-stray")).await;
    assert!(h.fake.st.lock().unwrap().instances.contains_key("not-ours"), "never touch other instances");
}

#[tokio::test(start_paused = true)]
async fn clone_pools_build_a_golden_vm_and_clone_it() {
    let mut cfg = pool(2, 0, 2);
    cfg.reset = ResetStrategy::Clone;
    let h = start(cfg);
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    assert_eq!(s.pools[0].golden_ready, Some(true));
    assert_eq!(h.fake.count("launch"), 1, "only the golden VM is launched");
    assert_eq!(h.fake.count("clone"), 2);
    let lease = h.engine.acquire(req("a")).await.unwrap();
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "recloned", |_| h.fake.count("clone") == 3).await;
    until(&h.engine, "ready again", |s| count(s, "warm") == 2).await;
}

#[tokio::test(start_paused = true)]
async fn max_uses_recycles_the_vm() {
    let mut cfg = pool(1, 0, 1);
    cfg.max_uses = 2;
    let h = start(cfg);
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    for _ in 0..2 {
        let l = h.engine.acquire(req("a")).await.unwrap();
        h.engine.release(&l.record.id, None).await.unwrap();
        until(&h.engine, "idle", |s| count(s, "warm") == 1).await;
    }
    assert_eq!(h.fake.count("launch"), 2, "rebuilt after two uses");
    assert_eq!(h.fake.count("restore"), 1, "the first release was a plain reset");
}

#[tokio::test(start_paused = true)]
async fn an_idle_vm_found_stopped_is_replaced() {
    let h = start(pool(1, 0, 2));
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let vm = s.vms[0].name.clone();
    // Someone stops it behind mpool's back.
    h.fake.st.lock().unwrap().instances.insert(vm.clone(), mpool_core::types::InstanceState::Stopped);
    until(&h.engine, "replaced", |s| count(s, "warm") == 1 && !s.vms.iter().any(|v| v.name == vm)).await;
    assert!(!h.fake.st.lock().unwrap().instances.contains_key(&vm), "deleted with purge");
}

#[tokio::test(start_paused = true)]
async fn a_new_config_generation_rotates_idle_vms() {
    let h = start(pool(2, 0, 3));
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    assert_eq!(s.pools[0].generation, 1);
    let old: Vec<String> = s.vms.iter().map(|v| v.name.clone()).collect();
    h.engine.shutdown().await;
    let mut changed = pool(2, 0, 3);
    changed.image = "22.04".into();
    let engine = restart(&h.fake, &h.store_path, changed);
    let s = until(&engine, "rotated", |s| {
        count(s, "warm") == 2 && s.vms.iter().all(|v| v.generation == 2 && !old.contains(&v.name))
    })
    .await;
    assert_eq!(s.pools[0].generation, 2);
    assert!(old.iter().all(|n| !h.fake.st.lock().unwrap().instances.contains_key(n)), "old VMs deleted");
}

/// Finding 1 of the reliability issue: with the store's disk full, Acquire answered with a lease
/// and health stayed SERVING (the flush logged the error and sent its replies anyway).
#[tokio::test(start_paused = true)]
async fn a_failed_store_write_fails_the_acquire_and_health_then_recovers_without_a_restart() {
    let (fake, store, engine) = start_mem(pool(1, 1, 2));
    let s = until(&engine, "ready", |s| count(s, "hot") == 1).await;
    let vm = s.vms[0].name.clone();
    assert!(*engine.healthy().borrow());
    store.set_failing(Some("No space left on device (os error 28)"));
    let err = engine.acquire(req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("No space left"), "the cause is named: {err}");
    let s = until(&engine, "degraded", |s| !s.store_ok).await;
    assert!(!*engine.healthy().borrow(), "health turns NOT_SERVING");
    assert!(s.leases.is_empty());
    assert!(store.durable().leases.is_empty(), "no lease was stored");
    let err = engine.acquire(req("b")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "nothing is promised while the store fails: {err}");
    let restores = fake.count(&format!("restore {vm}"));
    store.set_failing(None);
    until(&engine, "serving again", |s| s.store_ok && s.reconciled).await;
    until(&engine, "healthy", |_| *engine.healthy().borrow()).await;
    // The VM the failed batch touched is reset before anyone gets it.
    until(&engine, "touched VM reset", |_| fake.count(&format!("restore {vm}")) > restores).await;
    let lease = engine.acquire(req("c")).await.unwrap();
    assert_eq!(store.durable().leases.len(), 1, "the lease is durable before the caller hears of it");
    if lease.record.vm == vm {
        assert!(fake.count(&format!("restore {vm}")) > restores);
    }
}

/// Finding 1: a release whose write fails starts none of its daemon calls (no reset of a VM
/// whose lease is still on disk), and the lease, acknowledged before, survives.
#[tokio::test(start_paused = true)]
async fn a_release_whose_write_fails_starts_no_reset_and_keeps_the_lease() {
    let (fake, store, engine) = start_mem(pool(1, 0, 2));
    until(&engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = engine.acquire(req("a")).await.unwrap();
    let vm = lease.record.vm.clone();
    let stops = fake.count(&format!("stop {vm}"));
    store.set_failing(Some("injected"));
    let err = engine.release(&lease.record.id, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.count(&format!("stop {vm}")), stops, "no daemon call of the failed batch");
    assert_eq!(fake.count(&format!("restore {vm}")), 0);
    store.set_failing(None);
    let s = until(&engine, "back", |s| s.store_ok && s.reconciled).await;
    assert_eq!(s.leases.len(), 1, "the acknowledged lease is still there");
    let again = engine.begin_use(&lease.record.id, None).await.unwrap();
    engine.end_use(&again.record.id).await;
    engine.release(&lease.record.id, None).await.unwrap();
    until(&engine, "reset", |_| fake.count(&format!("restore {vm}")) == 1).await;
}

/// Finding 4: min_ready 2 / hot 1 settled at 3 idle VMs, 4/2 at 6, and with a short idle
/// timeout the pool launched and deleted VMs: a hot VM under its health check counted as
/// neither idle nor coming.
#[tokio::test(start_paused = true)]
async fn an_idle_pool_settles_at_exactly_its_ready_target_without_churn() {
    for (min_ready, hot) in [(2, 1), (4, 2)] {
        let mut cfg = pool(min_ready, hot, 8);
        cfg.idle_timeout = Duration::from_secs(5);
        let h = start(cfg);
        until(&h.engine, "ready", |s| {
            count(s, "hot") == hot as usize && count(s, "warm") == (min_ready - hot) as usize
        })
        .await;
        let launches = h.fake.count("launch");
        let calls_before = h.fake.st.lock().unwrap().calls.len();
        // Many health intervals (30 s each) later...
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = h.engine.status().await.unwrap();
            assert!(s.vms.len() <= min_ready as usize, "never more VMs than the ready target: {:?}", s.pools[0].counts);
        }
        let s = h.engine.status().await.unwrap();
        assert_eq!(s.vms.len(), min_ready as usize);
        assert_eq!(h.fake.count("launch"), launches, "no churn");
        let calls = h.fake.st.lock().unwrap().calls[calls_before..].to_vec();
        assert!(
            calls.iter().all(|c| c.starts_with("list") || c.starts_with("ssh-ready")),
            "only health reads: {calls:?}"
        );
    }
}

/// Finding 5: Bob's Acquire with Alice's request id joined her request and got her lease.
#[tokio::test(start_paused = true)]
async fn request_ids_are_scoped_by_owner() {
    let h = start(pool(2, 0, 3));
    until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    let rid = Some("task-1".to_string());
    let alice = AcquireRequest { owner: Some("alice".into()), request_id: rid.clone(), ..req("a") };
    let bob = AcquireRequest { owner: Some("bob".into()), request_id: rid, ..req("b") };
    let (a, b) = tokio::join!(h.engine.acquire(alice.clone()), h.engine.acquire(bob));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.record.id, b.record.id, "two owners, two requests");
    assert_ne!(a.record.vm, b.record.vm);
    assert_eq!(b.record.owner, "bob");
    let again = h.engine.acquire(alice).await.unwrap();
    assert_eq!((again.record.id, again.served), (a.record.id.clone(), Served::Repeat));
}

/// Finding 6: a Run retried with its request id while the first runs is refused (it used to
/// share the first's VM and release it under it); after the first ended, the retry gets its
/// recorded outcome, also after a restart.
#[tokio::test(start_paused = true)]
async fn a_retried_run_never_disturbs_the_first_and_then_gets_its_outcome() {
    let h = start(pool(2, 0, 3));
    until(&h.engine, "ready", |s| count(s, "warm") == 2).await;
    let run = AcquireRequest { request_id: Some("run-1".into()), kind: RequestKind::Run, ..req("r") };
    let first = h.engine.acquire(run.clone()).await.unwrap();
    let err = h.engine.acquire(run.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains(&first.record.id), "names the running lease: {err}");
    let plain = AcquireRequest { kind: RequestKind::Acquire, ..run.clone() };
    assert_eq!(h.engine.acquire(plain).await.unwrap_err().kind(), ErrorKind::AlreadyExists);
    let outcome = RunOutcome { code: Some(3), vm: first.record.vm.clone(), duration_ms: 1500, ..Default::default() };
    h.engine.release_with_outcome(&first.record.id, None, outcome.clone()).await.unwrap();
    let ended = |e: EngineError| match e {
        EngineError::RequestEnded { lease, outcome, .. } => (lease, outcome),
        other => panic!("{other}"),
    };
    let (lease, got) = ended(h.engine.acquire(run.clone()).await.unwrap_err());
    assert_eq!((lease.as_str(), got.as_deref()), (first.record.id.as_str(), Some(&outcome)));
    h.engine.shutdown().await;
    let engine = restart(&h.fake, &h.store_path, pool(2, 0, 3));
    until(&engine, "reconciled", |s| s.reconciled).await;
    let (_, got) = ended(engine.acquire(run).await.unwrap_err());
    assert_eq!(got.as_deref(), Some(&outcome), "remembered across a restart");
}

/// A plain Acquire retried after its lease ended is told so (not given a second lease).
#[tokio::test(start_paused = true)]
async fn an_acquire_retried_after_its_lease_ended_is_told_it_ended() {
    let h = start(pool(1, 0, 2));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let r = AcquireRequest { request_id: Some("once".into()), ..req("a") };
    let lease = h.engine.acquire(r.clone()).await.unwrap();
    h.engine.release(&lease.record.id, None).await.unwrap();
    let err = h.engine.acquire(r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains(&lease.record.id), "{err}");
}

/// Issue 11, finding 2: auto-resumed instances pass through Starting after a daemon restart;
/// they are transient, not broken, and a hot VM's pooled SSH connection is dropped so its
/// (possibly new) host key is learnt again.
#[tokio::test(start_paused = true)]
async fn a_starting_vm_after_a_daemon_restart_is_waited_for_not_replaced() {
    let h = start(pool(2, 1, 3));
    let s = until(&h.engine, "ready", |s| count(s, "hot") == 1 && count(s, "warm") == 1).await;
    let names: Vec<String> = s.vms.iter().map(|v| v.name.clone()).collect();
    {
        let mut st = h.fake.st.lock().unwrap();
        for n in &names {
            st.instances.insert(n.clone(), mpool_core::types::InstanceState::Starting);
        }
    }
    // A few observations while they are Starting.
    for _ in 0..90 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(names.iter().all(|n| h.fake.count(&format!("delete {n}")) == 0), "nothing replaced");
    {
        let mut st = h.fake.st.lock().unwrap();
        for n in &names {
            st.instances.insert(n.clone(), mpool_core::types::InstanceState::Running);
        }
    }
    until(&h.engine, "settled", |s| count(s, "hot") == 1 && count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy))
        .await;
    let s = h.engine.status().await.unwrap();
    assert!(s.vms.iter().all(|v| names.contains(&v.name)), "the same VMs: {:?}", s.vms);
    assert!(h.fake.count("forget") >= 1, "the hot VM's connection was dropped");
}

/// Issue 12 (plans of idempotent steps): a build cut short after its launch and setup is
/// resumed from what the daemon shows, not thrown away and started over.
#[tokio::test(start_paused = true)]
async fn an_interrupted_build_resumes_without_relaunching() {
    let mut cfg = pool(1, 0, 2);
    cfg.setup = vec!["echo set up".into()];
    let h = start(cfg.clone());
    // The graceful stop after the setup is cut (the daemon stopped the VM, then aborted).
    h.fake.st.lock().unwrap().fail_next.push("cut stop *".into());
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let vm = s.vms[0].name.clone();
    assert_eq!(h.fake.count(&format!("launch {vm}")), 1, "launched once");
    assert_eq!(h.fake.count(&format!("delete {vm}")), 0, "never thrown away");
    assert_eq!(h.fake.count(&format!("snapshot {vm}")), 1);
    assert_eq!(h.fake.count(&format!("ssh-script {vm}")), 1, "the setup ran before the cut, and was not needed after");

    // The same after a crash in the middle of a build: the restarted engine resumes it.
    let h = start(cfg.clone());
    h.fake.st.lock().unwrap().fail_next.push("cut snapshot *".into());
    h.fake.st.lock().unwrap().down = false;
    let s = until(&h.engine, "cut", |s| s.vms.len() == 1 && !s.vms[0].busy).await;
    let vm = s.vms[0].name.clone();
    h.engine.shutdown().await;
    let engine = restart(&h.fake, &h.store_path, cfg);
    until(&engine, "ready after the restart", |s| count(s, "warm") == 1).await;
    assert_eq!(h.fake.count(&format!("launch {vm}")), 1, "not relaunched after the restart");
    assert_eq!(h.fake.count(&format!("delete {vm}")), 0);
}

/// An engine whose isolation probe runs every `interval` (the fake's VMs are on loopback, so
/// the host is probed there).
fn start_probing(cfg: PoolConfig, open_network: bool, interval: Duration) -> (Fake, Engine) {
    let fake = Fake::default();
    fake.st.lock().unwrap().open_network = open_network;
    let ports = Ports::new(Arc::new(fake.clone()), Arc::new(fake.clone()));
    let probe = crate::ProbeSettings { host: None, host_ports: vec![7443], interval };
    let settings = Settings { isolation: Some(probe), ..settings() };
    let engine = Engine::start(settings, vec![cfg], ports, Arc::new(MemStore::new())).unwrap();
    (fake, engine)
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_requires_isolation_refuses_leases_while_vms_reach_the_host() {
    use mpool_core::pool::isolation::IsolationState;
    let mut cfg = pool(1, 0, 2);
    cfg.require_isolation = true;
    let (fake, engine) = start_probing(cfg, true, Duration::from_secs(300));
    // The first VM's provisioning measured it.
    let s = until(&engine, "measured", |s| s.isolation.state != IsolationState::Unknown).await;
    assert_eq!(s.isolation.state, IsolationState::NotIsolated, "{:?}", s.isolation);
    until(&engine, "ready", |s| count(s, "warm") == 1).await;
    let starts = fake.count("start");
    let err = engine.acquire(req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("requires isolation") && msg.contains("127.0.0.1:22"), "{msg}");
    assert!(msg.contains("mpool isolation rules"), "names the fix: {msg}");
    assert_eq!(fake.count("start"), starts, "refused before any VM was woken");
    assert!(engine.status().await.unwrap().leases.is_empty());

    // The host is fixed: once the verdict is stale, the next wake measures again and grants.
    fake.st.lock().unwrap().open_network = false;
    tokio::time::sleep(Duration::from_secs(301)).await;
    let probes = fake.count("ssh-output");
    engine.acquire(req("b")).await.expect("granted once isolation holds");
    let s = engine.status().await.unwrap();
    assert_eq!(s.isolation.state, IsolationState::Isolated, "{:?}", s.isolation);
    assert!(fake.count("ssh-output") > probes, "measured again before the grant");
}

#[tokio::test(start_paused = true)]
async fn a_wake_measures_before_it_grants_and_an_open_network_sends_the_vm_back_idle() {
    use mpool_core::pool::isolation::IsolationState;
    let mut cfg = pool(1, 1, 2);
    cfg.require_isolation = true;
    // The periodic probe is closed; the network opens after it measured "isolated".
    let (fake, engine) = start_probing(cfg, false, Duration::from_secs(60));
    let s = until(&engine, "hot and measured", |s| count(s, "hot") == 1 && s.isolation.checked_ms > 0).await;
    assert_eq!(s.isolation.state, IsolationState::Isolated, "{:?}", s.isolation);
    fake.st.lock().unwrap().open_network = true;
    tokio::time::advance(Duration::from_secs(61)).await;
    let err = engine.acquire(req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let s = until(&engine, "back idle", |s| count(s, "hot") == 1 && !s.vms[0].busy).await;
    assert!(s.leases.is_empty() && s.vms[0].lease.is_none(), "{s:?}");

    // A pool without the requirement serves on the same host and only reports.
    let (_fake, engine) = start_probing(pool(1, 1, 2), true, Duration::from_secs(60));
    until(&engine, "hot", |s| count(s, "hot") == 1).await;
    engine.acquire(req("a")).await.expect("served");
    assert_eq!(engine.status().await.unwrap().isolation.state, IsolationState::NotIsolated);
}

#[tokio::test(start_paused = true)]
async fn a_preheat_raises_the_ready_floor_for_a_while_then_the_pool_shrinks_back() {
    let h = start(pool(1, 0, 4));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let c = h.engine.preheat("ci", 3, Duration::from_secs(120)).await.unwrap();
    assert_eq!((c.ready_target, c.preheat), (3, 3), "{c:?}");
    assert!(c.preheat_left.is_some_and(|l| l <= Duration::from_secs(120)), "{c:?}");
    until(&h.engine, "3 ready", |s| count(s, "warm") == 3).await;
    // The preheat ends; idle VMs above min_ready go after idle_timeout (300 s).
    tokio::time::sleep(Duration::from_secs(121)).await;
    assert_eq!(h.engine.capacity().await.unwrap()[0].ready_target, 1);
    until(&h.engine, "back to 1", |s| count(s, "warm") == 1 && s.vms.len() == 1).await;

    for (count, secs, what) in [(5, 60, "above pool ci's max_size 4"), (2, 0, "above zero"), (2, 90_000, "at most")] {
        let err = h.engine.preheat("ci", count, Duration::from_secs(secs)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
    let err = h.engine.preheat("nope", 1, Duration::from_secs(60)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_schedule_raises_the_floor_only_while_its_period_matches() {
    use mpool_core::pool::schedule::{Schedule, parse_period};
    let always = Schedule { periods: vec![parse_period("* * * * * *").unwrap()], min_ready: 3, local: false };
    let never = Schedule { periods: vec![parse_period("0 0 0 1 1 * 2099").unwrap()], min_ready: 4, local: true };
    let mut cfg = pool(1, 0, 4);
    cfg.schedules = vec![always, never.clone()];
    let h = start(cfg);
    let s = until(&h.engine, "the scheduled floor", |s| count(s, "warm") == 3).await;
    assert_eq!(s.vms.len(), 3, "{s:?}");
    let c = h.engine.capacity().await.unwrap();
    assert_eq!((c[0].ready_target, c[0].scheduled), (3, 3), "{c:?}");

    let mut cfg = pool(1, 0, 4);
    cfg.schedules = vec![never];
    let h = start(cfg);
    until(&h.engine, "min_ready", |s| count(s, "warm") == 1).await;
    let c = h.engine.capacity().await.unwrap();
    assert_eq!((c[0].ready_target, c[0].scheduled), (1, 0), "a period that does not match leaves min_ready: {c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_reload_adds_changes_and_drains_pools_without_touching_leased_vms() {
    let h = start(pool(1, 0, 3));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let held = h.engine.acquire(req("a")).await.unwrap();
    let vm = held.record.vm.clone();
    let destructive = |fake: &Fake| {
        ["stop", "suspend", "restore", "delete", "snapshot"]
            .iter()
            .map(|op| fake.count(&format!("{op} {vm}")))
            .sum::<usize>()
    };
    let before = destructive(&h.fake);

    // ci: a new image (its VMs rotate) and a bigger floor; a new pool "web".
    let mut ci = pool(2, 0, 3);
    ci.image = "22.04".into();
    let mut web = pool(1, 0, 1);
    web.name = "web".into();
    h.engine.reconfigure(vec![ci.clone(), web.clone()]).await.unwrap();
    let s = until(&h.engine, "rotated and added", |s| {
        let ci = s.vms.iter().filter(|v| v.pool == "ci" && v.state == "warm" && v.generation == 2).count();
        let web = s.vms.iter().filter(|v| v.pool == "web" && v.state == "warm").count();
        ci == 2 && web == 1
    })
    .await;
    assert_eq!(s.pools.iter().find(|p| p.name == "ci").unwrap().generation, 2);
    assert_eq!(destructive(&h.fake), before, "the leased VM was not touched");
    let leased = s.vms.iter().find(|v| v.name == vm).unwrap();
    assert_eq!((leased.state.as_str(), leased.generation), ("leased", 1), "{leased:?}");
    // Released, it is rebuilt for the new generation.
    h.engine.release(&held.record.id, None).await.unwrap();
    until(&h.engine, "the released VM rebuilt", |s| {
        s.vms.iter().find(|v| v.name == vm).is_none_or(|v| v.generation == 2 && v.state == "warm")
    })
    .await;

    // web leaves the config while one of its VMs is leased: it drains.
    let web_lease = h.engine.acquire(AcquireRequest { pool: "web".into(), ..req("b") }).await.unwrap();
    h.engine.reconfigure(vec![ci]).await.unwrap();
    let err = h.engine.acquire(AcquireRequest { pool: "web".into(), ..req("c") }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    h.engine.renew(&web_lease.record.id, None, None).await.expect("its lease runs on");
    let s = h.engine.status().await.unwrap();
    assert!(s.pools.iter().any(|p| p.name == "web" && p.removed), "draining while leased: {:?}", s.pools);
    h.engine.release(&web_lease.record.id, None).await.unwrap();
    until(&h.engine, "web drained", |s| {
        !s.pools.iter().any(|p| p.name == "web") && !s.vms.iter().any(|v| v.pool == "web")
    })
    .await;
    assert_eq!(
        h.fake.st.lock().unwrap().instances.keys().filter(|n| n.contains("-web-")).count(),
        0,
        "its VMs are deleted"
    );
}

#[tokio::test(start_paused = true)]
async fn gc_purges_and_prunes_exactly_our_stuff_and_frees_the_vms_it_claims() {
    use mpool_core::types::InstanceState as S;
    let h = start(pool(2, 1, 3));
    let s = until(&h.engine, "ready", |s| count(s, "hot") == 1 && count(s, "warm") == 1).await;
    let vm = |state: &str| s.vms.iter().find(|v| v.state == state).unwrap().name.clone();
    let (hot, warm) = (vm("hot"), vm("warm"));
    {
        let mut st = h.fake.st.lock().unwrap();
        st.instances.insert("mpool-ci-gone".into(), S::Deleted);
        st.instances.insert("other-gone".into(), S::Deleted);
        st.instances.insert("other-vm".into(), S::Stopped);
        for (i, snap) in [(&warm, "snapshot2"), (&hot, "snapshot2"), (&"other-vm".to_string(), "snapshot1")] {
            st.snapshots.insert((i.clone(), snap.into()));
        }
    }

    let dry = h.engine.gc(true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.found.purge, vec!["mpool-ci-gone"]);
    assert_eq!(
        dry.found.delete_snapshots.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        [format!("{warm}.snapshot2")]
    );
    assert_eq!(dry.found.deferred.iter().map(|d| d.what.clone()).collect::<Vec<_>>(), [format!("{hot}.snapshot2")]);
    assert_eq!(dry.found.foreign_snapshots.len(), 1);
    assert_eq!(h.fake.count("delete"), 0, "a dry run touches nothing");

    let done = h.engine.gc(false).await.unwrap();
    assert_eq!((done.found.purge.len(), done.found.delete_snapshots.len()), (1, 1));
    assert!(done.failed.is_empty(), "{:?}", done.failed);
    {
        let st = h.fake.st.lock().unwrap();
        assert!(!st.instances.contains_key("mpool-ci-gone"), "ours purged");
        assert_eq!(st.instances.get("other-gone"), Some(&S::Deleted), "never another's");
        assert!(!st.snapshots.contains(&(warm.clone(), "snapshot2".into())));
        assert!(st.snapshots.contains(&(warm.clone(), "mpool-clean".into())), "never our clean snapshot");
        assert!(st.snapshots.contains(&(hot.clone(), "snapshot2".into())), "never on a running VM");
        assert!(st.snapshots.contains(&("other-vm".into(), "snapshot1".into())));
        assert_eq!(st.calls.iter().filter(|c| c.contains("other")).count(), 0, "{:?}", st.calls);
    }
    assert_eq!(h.fake.count("purge"), 0, "never the Purge RPC");
    // The warm VM it claimed is free again.
    let s = h.engine.status().await.unwrap();
    assert!(s.vms.iter().all(|v| !v.busy), "{:?}", s.vms);
    let (a, b) = tokio::join!(h.engine.acquire(req("a")), h.engine.acquire(req("b")));
    let mut leased = [a.unwrap().record.vm, b.unwrap().record.vm];
    leased.sort();
    let mut idle = [hot, warm];
    idle.sort();
    assert_eq!(leased, idle, "both idle VMs are handed out, the pruned one too");
}

/// A wall clock the test sets.
#[derive(Default)]
struct SetClock(std::sync::atomic::AtomicU64);

impl mpool_core::ports::Clock for SetClock {
    fn wall_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn rebuild_every_bumps_the_generation_on_schedule_and_keeps_it_across_restarts() {
    use std::sync::atomic::Ordering;
    const HOUR: u64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("state.redb");
    let (fake, clock) = (Fake::default(), Arc::new(SetClock::default()));
    clock.0.store(1_000 * HOUR, Ordering::SeqCst);
    let mut cfg = pool(1, 0, 2);
    cfg.rebuild_every = Some(Duration::from_secs(24 * 3600));
    let start = |cfg: PoolConfig| {
        let mut ports = Ports::new(Arc::new(fake.clone()), Arc::new(fake.clone()));
        ports.clock = clock.clone();
        Engine::start(settings(), vec![cfg], ports, Arc::new(Store::open(&store_path).unwrap())).unwrap()
    };
    let engine = start(cfg.clone());
    let s = until(&engine, "ready", |s| count(s, "warm") == 1).await;
    let first = s.vms[0].name.clone();
    assert_eq!(s.pools[0].generation, 1);

    // Not yet due: nothing changes.
    clock.0.store(1_020 * HOUR, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(engine.status().await.unwrap().pools[0].generation, 1);

    // Due: a new generation, and the idle VM is rotated for one built from it.
    clock.0.store(1_025 * HOUR, Ordering::SeqCst);
    let s = until(&engine, "rotated", |s| {
        s.pools[0].generation == 2 && s.vms.len() == 1 && s.vms[0].generation == 2 && count(s, "warm") == 1
    })
    .await;
    assert_ne!(s.vms[0].name, first);
    engine.shutdown().await;

    // A restart keeps the generation and when it began: not due again until a day later.
    let engine = start(cfg.clone());
    until(&engine, "ready", |s| count(s, "warm") == 1).await;
    assert_eq!(engine.status().await.unwrap().pools[0].generation, 2);
    engine.shutdown().await;
    // Due while mpool was down: the next generation at start.
    clock.0.store(1_050 * HOUR, Ordering::SeqCst);
    let engine = start(cfg);
    assert_eq!(engine.status().await.unwrap().pools[0].generation, 3);
}

#[tokio::test(start_paused = true)]
async fn a_vm_over_max_disk_usage_is_rebuilt_at_release_instead_of_reset() {
    let mut cfg = pool(1, 0, 1);
    cfg.max_disk_usage = Some(1 << 30);
    let h = start(cfg);
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(req("a")).await.unwrap();
    let vm = lease.record.vm.clone();
    h.fake.st.lock().unwrap().disk_used.insert(vm.clone(), 2 << 30);
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "back", |s| count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy)).await;
    assert_eq!(h.fake.count(&format!("ssh-df {vm}")), 1, "measured at release");
    assert_eq!(h.fake.count(&format!("launch {vm}")), 2, "rebuilt from the image");
    assert_eq!(h.fake.count(&format!("restore {vm}")), 0, "not restored");
    let s = h.engine.status().await.unwrap();
    assert_eq!((s.vms[0].disk_used, s.pools[0].disk_used), (None, 0), "rebuilt: its usage is unknown again");

    // Under the limit: reset as usual.
    h.fake.st.lock().unwrap().disk_used.insert(vm.clone(), 1 << 29);
    let lease = h.engine.acquire(req("b")).await.unwrap();
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "back", |s| count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy)).await;
    assert_eq!(h.fake.count(&format!("restore {vm}")), 1, "restored");
    assert_eq!(h.fake.count(&format!("launch {vm}")), 2);
    let s = h.engine.status().await.unwrap();
    assert_eq!((s.vms[0].disk_used, s.pools[0].disk_used), (Some(1 << 29), 1 << 29), "the measured usage is reported");
}

/// The sizes the fake daemon holds for `vm`.
fn sizes_of(fake: &Fake, vm: &str) -> mpool_core::pool::resize::Sizes {
    *fake.st.lock().unwrap().sizes.get(vm).expect("the instance exists")
}

#[tokio::test(start_paused = true)]
async fn a_reload_of_sizes_only_resizes_idle_vms_in_place_and_leased_ones_at_release() {
    use mpool_core::pool::resize::Sizes;
    let h = start(pool(2, 1, 3));
    until(&h.engine, "ready", |s| count(s, "hot") == 1 && count(s, "warm") == 1).await;
    let held = h.engine.acquire(req("a")).await.unwrap();
    let leased = held.record.vm.clone();
    let s = until(&h.engine, "refilled", |s| {
        count(s, "hot") == 1 && count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy)
    })
    .await;
    let idle: Vec<String> = s.vms.iter().filter(|v| v.name != leased).map(|v| v.name.clone()).collect();
    let launches = h.fake.count("launch ");
    let touched = |fake: &Fake, vm: &str| {
        ["stop", "suspend", "restore", "delete", "snapshot", "set"]
            .iter()
            .map(|op| fake.count(&format!("{op} {vm}")))
            .sum::<usize>()
    };
    let leased_before = touched(&h.fake, &leased);

    let mut bigger = pool(2, 1, 3);
    (bigger.cpus, bigger.memory, bigger.disk) = (2, "2G".into(), "8G".into());
    h.engine.reconfigure(vec![bigger.clone()]).await.unwrap();
    let s = until(&h.engine, "resized", |s| {
        s.vms.iter().filter(|v| idle.contains(&v.name) && v.generation == 2 && !v.busy).count() == 2
            && count(s, "hot") == 1
            && count(s, "warm") == 1
    })
    .await;
    let new = Sizes { cpus: 2, memory: 2 << 30, disk: 8 << 30 };
    for vm in &idle {
        assert_eq!(sizes_of(&h.fake, vm), new, "{vm} resized");
        assert_eq!(h.fake.count(&format!("set {vm}.cpus=2")), 1, "{vm}");
        assert_eq!(h.fake.count(&format!("delete_snapshot {vm}.mpool-clean")), 1, "{vm}: old clean snapshot dropped");
    }
    assert_eq!(h.fake.count("launch "), launches, "no VM rebuilt");
    assert_eq!(s.pools[0].generation, 2);
    let l = s.vms.iter().find(|v| v.name == leased).unwrap();
    assert_eq!((l.state.as_str(), l.generation), ("leased", 1), "{l:?}");
    assert_eq!(touched(&h.fake, &leased), leased_before, "the leased VM was not touched");

    // The new size survives a reset: the retaken snapshot holds it.
    let lease = h.engine.acquire(req("b")).await.unwrap();
    let vm = lease.record.vm.clone();
    assert!(idle.contains(&vm));
    let restores = h.fake.count(&format!("restore {vm}"));
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "reset", |s| s.vms.iter().all(|v| !v.busy) && count(s, "leased") == 1).await;
    assert_eq!(h.fake.count(&format!("restore {vm}")), restores + 1, "reset by a restore");
    assert_eq!(sizes_of(&h.fake, &vm), new, "the size survived the reset");

    // The leased VM is resized at its release, not rebuilt.
    h.engine.release(&held.record.id, None).await.unwrap();
    until(&h.engine, "the released VM resized", |s| {
        s.vms.iter().find(|v| v.name == leased).is_some_and(|v| v.generation == 2 && !v.busy && v.state != "leased")
    })
    .await;
    assert_eq!(sizes_of(&h.fake, &leased), new);
    assert_eq!(h.fake.count(&format!("launch {leased}")), 1, "kept, not relaunched");
    assert_eq!(h.fake.count("launch "), launches);
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_shrinks_the_disk_rotates_instead() {
    let mut cfg = pool(1, 0, 2);
    cfg.disk = "10G".into();
    let h = start(cfg);
    let s = until(&h.engine, "ready", |s| count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy)).await;
    let old = s.vms[0].name.clone();
    let mut smaller = pool(1, 0, 2);
    (smaller.disk, smaller.cpus) = ("8G".into(), 2);
    h.engine.reconfigure(vec![smaller]).await.unwrap();
    let s = until(&h.engine, "rotated", |s| {
        count(s, "warm") == 1 && s.vms.iter().all(|v| v.generation == 2 && v.name != old && !v.busy)
    })
    .await;
    assert_eq!(h.fake.count("set "), 0, "nothing resized");
    assert!(!h.fake.st.lock().unwrap().instances.contains_key(&old), "the old VM is deleted");
    assert_eq!(sizes_of(&h.fake, &s.vms[0].name).disk, 8 << 30, "the new one launched at the new size");
}

#[tokio::test(start_paused = true)]
async fn without_statvfs_free_disk_is_the_total_minus_the_vms_measured_usage() {
    use mpool_core::host::HostFacts;
    const G: u64 = 1 << 30;
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let no_statvfs = HostFacts { disk_total: Some(100 * G), ..Default::default() };
    h.engine.set_host(no_statvfs.clone()).await;
    let host = h.engine.status().await.unwrap().host.unwrap();
    assert_eq!(host.disk_free, None, "nothing measured yet: unknown, not guessed");

    let lease = h.engine.acquire(req("a")).await.unwrap();
    h.fake.st.lock().unwrap().disk_used.insert(lease.record.vm.clone(), 3 * G);
    h.engine.release(&lease.record.id, None).await.unwrap();
    until(&h.engine, "back", |s| count(s, "warm") == 1 && s.vms.iter().all(|v| !v.busy)).await;
    h.engine.set_host(no_statvfs).await;
    let host = h.engine.status().await.unwrap().host.unwrap();
    assert_eq!(host.disk_free, Some(97 * G));
    assert_eq!(host.disk_free_source, "total minus instance disk usage");

    // statvfs's figure, when there is one, is kept.
    let measured = HostFacts {
        disk_total: Some(100 * G),
        disk_free: Some(10 * G),
        disk_free_source: "statvfs /data".into(),
        ..Default::default()
    };
    h.engine.set_host(measured.clone()).await;
    assert_eq!(h.engine.status().await.unwrap().host, Some(measured));
}
