//! multipassd restarts under a running `mpool serve` (issue 11, finding 2; reference §0.3): the
//! daemon is killed and comes back, auto-resuming its instances through Starting, cold-booting
//! the suspended ones with new SSH host keys, on new SSH ports. mpool must keep every healthy VM
//! (none replaced), reset the cold-booted ones, and keep the leases working: an exec on a lease
//! from before the restart reaches its VM at its new endpoint.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::stack::{Stack, acquire, exec};
use mpool_api::proto::v1;
use mpool_sim::Stop;

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nhot = 1\nmax_size = 3\n";

async fn vms(stack: &Stack) -> Vec<v1::Vm> {
    let mut c = stack.client().await;
    c.list_vms(v1::ListVmsRequest { pool: String::new() }).await.unwrap().into_inner().vms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_keeps_healthy_vms_and_leases_working() {
    let mut stack = Stack::start(POOL, |_| {}).await;
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "across a daemon restart").await.unwrap();
    exec(&mut c, &lease.id, &["sh", "-c", "echo before > work.txt"]).await.unwrap();
    stack.wait_idle("ci", 2).await;
    let before: BTreeSet<String> = vms(&stack).await.into_iter().map(|v| v.name).collect();
    let old_port = stack.sim().daemon().endpoint(&lease.vm).map(|e| e.port());

    let sim = stack.sim.take().expect("simulator");
    stack.sim = Some(sim.restart(Stop::Killed).await.expect("the simulator restarts"));
    assert_ne!(stack.sim().daemon().endpoint(&lease.vm).map(|e| e.port()), old_port, "a new SSH port");

    // The lease keeps working, at the VM's new endpoint, in the same VM.
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        match exec(&mut c, &lease.id, &["cat", "work.txt"]).await {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "the lease never worked again: {e:?}\nlog:\n{}", stack.log()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((out.0, out.1.as_str()), (0, "before\n"), "its own VM, not reset");

    // Every healthy VM is kept: the suspended one cold-booted and is reset, the hot one is
    // checked again over a fresh connection; none is deleted and replaced.
    stack.wait_idle("ci", 2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = vms(&stack).await;
        let names: BTreeSet<String> = now.iter().map(|v| v.name.clone()).collect();
        let settled = now.iter().all(|v| matches!(v.state.as_str(), "hot" | "warm" | "leased"));
        if settled && names == before {
            break;
        }
        assert!(
            names.is_superset(&before),
            "a healthy VM was replaced: before {before:?}, now {names:?}\nlog:\n{}",
            stack.log()
        );
        assert!(Instant::now() < deadline, "never settled: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!stack.log().contains("host key mismatch"), "no VM stuck on its old host key:\n{}", stack.log());
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.unwrap();
}
