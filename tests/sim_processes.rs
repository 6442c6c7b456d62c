//! A simulated VM's processes die with it, however they detached (issue 10): a forced stop
//! and restore hand the next tenant a VM where nothing of the previous one still runs, and a
//! simulator killed with SIGKILL takes its VMs' processes with it.

use std::time::Duration;

use mpool_multipass::{Client, LaunchOptions, Names};
use mpool_testkit::{SimProcess, TestSim, eventually, wait};

/// Kills a test's process when dropped, so a failing test leaves nothing behind (only if the
/// pid still runs a command of ours: it may have been reused).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let ours = std::fs::read(format!("/proc/{}/cmdline", self.0))
            .is_ok_and(|c| c.starts_with(b"sh\0-c\0echo $$ > writer.pid") || c.starts_with(b"sleep\x001000"));
        if ours {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
    })
}

async fn exec(c: &Client, vm: &str, line: &str) -> mpool_ssh::ExecOutput {
    let info = c.ssh_info(vm).await.unwrap();
    let conn = mpool_ssh::Connection::connect(&info, &Default::default()).await.unwrap();
    let out = conn.run(mpool_ssh::ExecRequest::shell(line)).await.unwrap();
    conn.close().await;
    out
}

/// Starts a loop that detaches with setsid and writes into the VM; returns its pid.
async fn detached_writer(ts: &TestSim, c: &Client, vm: &str) -> u32 {
    let out = exec(
        c,
        vm,
        "setsid sh -c 'echo $$ > writer.pid; while :; do date >> tenant-a.log; sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    assert!(out.success(), "{}", out.stderr_text());
    let file = ts.root(vm).join("writer.pid");
    eventually("the writer starts", Duration::from_secs(30), || async {
        std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse().ok())
    })
    .await
}

#[tokio::test]
async fn a_forced_stop_kills_what_a_task_left_behind_with_setsid() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    let vm = "mpool-ci-1";
    c.launch(&LaunchOptions { name: vm.into(), ..Default::default() }).await.unwrap();
    c.stop(&Names::one(vm), false).await.unwrap();
    c.snapshot(vm, Some("clean"), "").await.unwrap();
    c.start(&Names::one(vm), 0).await.unwrap();

    // Tenant A leaves a writer behind, detached from everything it was started with.
    let pid = detached_writer(&ts, &c, vm).await;
    let _cleanup = KillOnDrop(pid);
    assert!(running(pid), "the writer runs after A's command ended");

    // The pool resets the VM: forced stop, restore, start.
    c.stop(&Names::one(vm), true).await.unwrap();
    assert!(!running(pid), "the writer survived the VM's forced stop");
    c.restore(vm, "clean", true).await.unwrap();
    c.start(&Names::one(vm), 0).await.unwrap();
    // Tenant B finds nothing of A, and nothing of A runs.
    let out = exec(&c, vm, "test ! -e tenant-a.log").await;
    assert!(out.success(), "tenant B finds tenant A's file");
    assert!(!running(pid), "tenant A's writer runs in tenant B's VM");
}

#[test]
fn a_killed_simulator_takes_its_vms_processes_with_it() {
    let mut sim = SimProcess::start(env!("CARGO_BIN_EXE_mpool"), &[]).expect("mpool sim starts");
    let mp = |sim: &SimProcess, args: &[&str]| sim.run_multipass("client", args).expect("mpool multipass runs");
    assert!(mp(&sim, &["launch", "--name", "vm1"]).status.success());
    let out = mp(&sim, &["exec", "vm1", "--", "sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"]);
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a pid");
    let _cleanup = KillOnDrop(pid);
    assert!(running(pid));
    sim.child.kill().unwrap();
    sim.child.wait().unwrap();
    wait("the VM's process dies with the simulator", Duration::from_secs(30))
        .until_blocking(|| !running(pid))
        .unwrap_or_else(|e| panic!("{e}"));
}
