//! Engine unit tests: the actor against the scripted fake daemon, on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use super::engine::{AcquireRequest, Engine, EngineError, Served, Settings, Status};
use super::fake::Fake;
use super::ports::Ports;
use crate::config::{PoolConfig, ResetStrategy};
use crate::store::Store;

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
    Settings { health_interval: Duration::from_secs(30), reconcile_interval: Duration::from_secs(1), ..Settings::default() }
}

fn start(cfg: PoolConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("state.redb");
    let fake = Fake::default();
    let engine = restart(&fake, &store_path, cfg);
    Harness { fake, engine, _dir: dir, store_path }
}

fn restart(fake: &Fake, store_path: &std::path::Path, cfg: PoolConfig) -> Engine {
    let store = Arc::new(Store::open(store_path).unwrap());
    let ports = Ports { daemon: Arc::new(fake.clone()), ssh: Arc::new(fake.clone()) };
    Engine::start(settings(), vec![cfg], ports, store).unwrap()
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
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
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
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
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
    assert_eq!(h.engine.release("lease-nope", None).await.unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(h.engine.begin_use(&lease.record.id, None).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let err = h.engine.acquire(AcquireRequest { pool: "nope".into(), ..req("a") }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = h.engine.acquire(AcquireRequest { ttl: Some(Duration::from_secs(99_999)), ..req("a") }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn another_owners_lease_is_refused() {
    let h = start(pool(1, 0, 1));
    until(&h.engine, "ready", |s| count(s, "warm") == 1).await;
    let lease = h.engine.acquire(AcquireRequest { owner: Some("alice".into()), ..req("a") }).await.unwrap();
    let err = h.engine.begin_use(&lease.record.id, Some("bob".into())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
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
    assert_eq!(h.fake.count(&format!("delete {first}")), 2, "deleted (once before provisioning, once as broken)");
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
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
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
async fn sixty_four_acquirers_never_share_a_vm_or_exceed_max_size() {
    let h = start(pool(2, 1, 8));
    until(&h.engine, "ready", |s| count(s, "hot") + count(s, "warm") == 2).await;
    let holders = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (e, holders) = (h.engine.clone(), holders.clone());
        tasks.push(tokio::spawn(async move {
            let l = e.acquire(AcquireRequest { wait: Some(Duration::from_secs(60)), ..req(&format!("t{i}")) }).await.unwrap();
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
    h.fake.st.lock().unwrap().instances.insert("mpool-ci-stray".into(), crate::multipass::InstanceState::Running);
    h.fake.st.lock().unwrap().instances.insert("not-ours".into(), crate::multipass::InstanceState::Running);
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
    h.fake.st.lock().unwrap().instances.insert(vm.clone(), crate::multipass::InstanceState::Stopped);
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
