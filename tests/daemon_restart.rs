//! multipassd restarts under a running `mpool serve` (issue 11, finding 2; reference §0.3): the
//! daemon is killed and comes back, auto-resuming its instances through Starting, cold-booting
//! the suspended ones with new SSH host keys, on new SSH ports. mpool must keep every healthy VM
//! (none replaced), reset the cold-booted ones, and keep the leases working: an exec on a lease
//! from before the restart reaches its VM at its new endpoint.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_sim::Stop;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions, wait};

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nhot = 1\nmax_size = 3\n";

async fn vms(stack: &Stack) -> Vec<v1::Vm> {
    let mut c = stack.client().await;
    c.list_vms(v1::ListVmsRequest { pool: String::new() }).await.unwrap().into_inner().vms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_keeps_healthy_vms_and_leases_working() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "across a daemon restart").await.unwrap();
    exec(&mut c, &lease.id, &["sh", "-c", "echo before > work.txt"]).await.unwrap();
    stack.wait_idle("ci", 2).await;
    let before: BTreeSet<String> = vms(&stack).await.into_iter().map(|v| v.name).collect();
    let old_port = stack.sim().daemon().endpoint(&lease.vm).map(|e| e.port());

    stack.restart_sim(Stop::Killed, |_| {}).await.expect("the simulator restarts");
    assert_ne!(stack.sim().daemon().endpoint(&lease.vm).map(|e| e.port()), old_port, "a new SSH port");

    // The lease keeps working, at the VM's new endpoint, in the same VM.
    let last = RefCell::new(None);
    let out = wait("the lease works again", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| {
            let (mut c, id, last) = (c.clone(), lease.id.clone(), &last);
            async move { exec(&mut c, &id, &["cat", "work.txt"]).await.map_err(|e| last.replace(Some(e))).ok() }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\nlog:\n{}", last.borrow(), stack.log()));
    assert_eq!((out.0, out.1.as_str()), (0, "before\n"), "its own VM, not reset");

    // Every healthy VM is kept: the suspended one cold-booted and is reset, the hot one is
    // checked again over a fresh connection; none is deleted and replaced.
    stack.wait_idle("ci", 2).await;
    let last = RefCell::new(Vec::new());
    wait("the pool settles with the same VMs", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async {
            let now = vms(&stack).await;
            let names: BTreeSet<String> = now.iter().map(|v| v.name.clone()).collect();
            if !names.is_superset(&before) {
                return Err(format!("a healthy VM was replaced: before {before:?}, now {names:?}"));
            }
            let settled = now.iter().all(|v| matches!(v.state.as_str(), "hot" | "warm" | "leased"));
            last.replace(now);
            Ok((settled && names == before).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; last seen {:?}\nlog:\n{}", last.borrow(), stack.log()));
    assert!(!stack.log().contains("host key mismatch"), "no VM stuck on its old host key:\n{}", stack.log());
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.unwrap();
}
