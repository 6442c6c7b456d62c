//! Crash safety: `mpool serve` is killed with SIGKILL at several points of provisioning,
//! acquire, release and reset (the simulator holds the daemon operation there), then started
//! again. Every instance must be accounted for (leased, ready, or being reset), unexpired leases
//! must still work, nothing is leaked or duplicated, and stray `mpool-` instances are cleaned.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_multipass::LaunchOptions;
use mpool_sim::EventKind;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions, eventually, wait, wait_event};

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nmax_size = 3\n";

/// Waits until the daemon's `mpool-` instances and the engine's VMs are the same set, with
/// every VM settled (idle or leased) and at least `idle` of them idle; returns the instances.
async fn accounted(stack: &Stack, idle: usize) -> BTreeSet<String> {
    let d = stack.daemon_client().await.expect("daemon client");
    let c = stack.client().await;
    let last = RefCell::new(String::new());
    wait("every instance is accounted for", Duration::from_secs(90))
        .every(Duration::from_millis(50))
        .until(|| async {
            let on_daemon: BTreeSet<String> =
                d.list().await.unwrap().into_iter().map(|i| i.name).filter(|n| n.starts_with("mpool-")).collect();
            let vms = c.clone().list_vms(v1::ListVmsRequest { pool: String::new() }).await.unwrap().into_inner().vms;
            let known: BTreeSet<String> = vms.iter().map(|v| v.name.clone()).collect();
            let settled = vms.iter().all(|v| matches!(v.state.as_str(), "hot" | "warm" | "leased"));
            let n_idle = vms.iter().filter(|v| v.state == "hot" || v.state == "warm").count();
            if on_daemon == known && settled && n_idle >= idle && known.len() == vms.len() {
                return Some(known);
            }
            let states: Vec<_> = vms.iter().map(|v| (v.name.as_str(), v.state.as_str())).collect();
            last.replace(format!("daemon {on_daemon:?}, engine {states:?}"));
            None
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}\nlog:\n{}", last.borrow(), stack.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_provisioning() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL).sim(|c| c.hang_ops = vec!["snapshot".into()]))
        .await
        .expect("stack starts");
    // Subscribed before serve started: the first snapshot may hang before Stack::start returns.
    let mut ev = stack.events_from_start.take().expect("events");
    wait_event(&mut ev, |e| e.op == "snapshot" && e.kind == EventKind::Hung).await;
    stack.kill_serve();
    stack.sim().daemon().set_hang("snapshot", false);
    stack.start_serve().await.expect("mpool serve starts again");
    let vms = accounted(&stack, 2).await;
    assert_eq!(vms.len(), 2, "half-provisioned VMs were reset or replaced, not leaked: {vms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_waking_a_vm_for_an_acquire() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    stack.sim().daemon().set_hang("start", true);
    let mut ev = stack.sim().events();
    let mut c = stack.client().await;
    let pending = tokio::spawn(async move { acquire(&mut c, "ci", "doomed").await });
    wait_event(&mut ev, |e| e.op == "start" && e.kind == EventKind::Hung).await;
    stack.kill_serve();
    assert!(pending.await.unwrap().is_err(), "the caller sees the failure");
    stack.sim().daemon().set_hang("start", false);
    stack.start_serve().await.expect("mpool serve starts again");
    // The VM being woken is reset; a replacement whose build had begun before the kill resumes
    // (builds are kept, not thrown away), so the pool may hold max_size VMs for a while.
    let vms = accounted(&stack, 2).await;
    assert!((2..=3).contains(&vms.len()), "min_ready to max_size VMs, all accounted for: {vms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_reset_after_release() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "task").await.unwrap();
    exec(&mut c, &lease.id, &["sh", "-c", "echo dirty > dirty.txt"]).await.unwrap();
    stack.sim().daemon().set_hang("restore", true);
    let mut ev = stack.sim().events();
    c.release(v1::ReleaseRequest { lease_id: lease.id.clone() }).await.unwrap();
    wait_event(&mut ev, |e| e.op == "restore" && e.kind == EventKind::Hung).await;
    stack.kill_serve();
    stack.sim().daemon().set_hang("restore", false);
    stack.start_serve().await.expect("mpool serve starts again");
    let vms = accounted(&stack, 3).await;
    assert!(vms.contains(&lease.vm), "the VM being reset is still ours");
    // And it really was reset: every idle VM is clean.
    let mut c = stack.client().await;
    for _ in 0..3 {
        let l = acquire(&mut c, "ci", "check").await.unwrap();
        let (code, _, _) = exec(&mut c, &l.id, &["test", "-e", "dirty.txt"]).await.unwrap();
        assert_ne!(code, 0, "{} still has the old task's file", l.vm);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lease_survives_a_crash_and_strays_are_cleaned() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "long-task").await.unwrap();
    exec(&mut c, &lease.id, &["sh", "-c", "echo kept > work.txt"]).await.unwrap();
    stack.kill_serve();
    // While mpool is down, someone leaves an instance with our prefix behind.
    let d = stack.daemon_client().await.expect("daemon client");
    d.launch(&LaunchOptions { name: "mpool-ci-stray".into(), ..Default::default() }).await.unwrap();
    d.launch(&LaunchOptions { name: "somebody-else".into(), ..Default::default() }).await.unwrap();
    stack.start_serve().await.expect("mpool serve starts again");
    let vms = accounted(&stack, 2).await;
    assert!(!vms.contains("mpool-ci-stray"), "stray deleted");
    assert!(
        d.list().await.unwrap().iter().any(|i| i.name == "somebody-else"),
        "never touch instances without our prefix"
    );
    let mut c = stack.client().await;
    let (code, out, _) = exec(&mut c, &lease.id, &["cat", "work.txt"]).await.expect("the lease still works");
    assert_eq!((code, out.as_str()), (0, "kept\n"), "and its VM was not reset under it");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.unwrap();
    accounted(&stack, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expired_while_down_is_ended_and_its_vm_reset() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let lease = c
        .acquire(v1::AcquireRequest {
            pool: "ci".into(),
            holder: "short".into(),
            ttl: Some(mpool_api::proto::Duration { seconds: 1, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stack.kill_serve();
    let expires = lease.expires_at.unwrap();
    let expires = std::time::UNIX_EPOCH + Duration::new(expires.seconds as u64, expires.nanos as u32);
    eventually("the lease's expiry passes", Duration::from_secs(30), || async {
        std::time::SystemTime::now() > expires
    })
    .await;
    let mut ev = stack.sim().events();
    stack.start_serve().await.expect("mpool serve starts again");
    wait_event(&mut ev, |e| e.op == "restore" && e.instance == lease.vm && e.kind == EventKind::Working).await;
    // min_ready 2: the reset VM and the other idle one (a replacement provisioned before the
    // crash may make it 3).
    accounted(&stack, 2).await;
    let mut c = stack.client().await;
    let err = c.renew(v1::RenewRequest { lease_id: lease.id, ttl: None }).await.unwrap_err();
    assert!(matches!(err.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound), "{err:?}");
}
