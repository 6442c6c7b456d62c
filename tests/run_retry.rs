//! Finding 6 of the reliability issue: a Run retried with the same request id used to be served
//! REPEAT on the first's VM, run its command there too, and release the lease under the first
//! (which then died by SIGTERM). Now the retry never disturbs the first: while it runs, the
//! retry gets ALREADY_EXISTS naming its lease; once it ended, the retry gets its recorded exit
//! status (served REPEAT) without running anything.

mod common;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions};

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nhot = 2\nmax_size = 3\n";

fn run_request(rid: &str, line: &str) -> v1::RunRequest {
    v1::RunRequest {
        pool: "ci".into(),
        holder: "retry-test".into(),
        request_id: rid.into(),
        command: Some(v1::Command { argv: vec!["sh".into(), "-c".into(), line.into()], ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_run_never_disturbs_the_first_and_then_gets_its_result() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    // The first run waits for a file the test writes into its VM, then exits 3.
    let line = "echo started; while [ ! -e go ]; do sleep 0.05; done; echo ran >> runs; exit 3";
    let mut first = c.run(futures::stream::iter([run_request("run-1", line)])).await.unwrap().into_inner();
    let lease = match first.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Lease(l)) => l,
        other => panic!("expected the lease first, got {other:?}"),
    };
    match first.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Stdout(t)) => assert_eq!(t, "started\n"),
        other => panic!("expected the command's first output, got {other:?}"),
    }

    let mut c2 = stack.client().await;
    let err = match c2.run(futures::stream::iter([run_request("run-1", line)])).await {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("a retry while the first runs is refused"),
    };
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&lease.id), "names the running lease: {err:?}");

    std::fs::write(stack.sim().daemon().root(&lease.vm).join("go"), b"").unwrap();
    let mut exit = None;
    while let Some(ev) = first.message().await.unwrap() {
        if let Some(v1::run_event::Event::Result(r)) = ev.event {
            exit = r.exit;
        }
    }
    let exit = exit.expect("the first run reports its exit");
    assert_eq!((exit.code, exit.signal.as_str()), (3, ""), "the first run was not disturbed: {exit:?}");

    let mut again = c2.run(futures::stream::iter([run_request("run-1", line)])).await.unwrap().into_inner();
    let mut result = None;
    while let Some(ev) = again.message().await.unwrap() {
        match ev.event {
            Some(v1::run_event::Event::Result(r)) => result = Some(r),
            Some(v1::run_event::Event::Stdout(t)) => panic!("the command ran again: {t:?}"),
            _ => {}
        }
    }
    let result = result.expect("the retry gets the first's result");
    assert_eq!(result.exit.map(|e| e.code), Some(3));
    assert_eq!(result.served, v1::Served::Repeat as i32);
    assert_eq!(result.vm, lease.vm);
    let runs = std::fs::read_to_string(stack.sim().daemon().root(&lease.vm).join("runs"));
    assert!(runs.as_ref().map_or(true, |r| r == "ran\n"), "ran once (the VM may already be reset): {runs:?}");
}
