//! Cleanup (`Gc`, `mpool gc`, `POST /v1/gc`) against `mpool serve` + `mpool sim`: mpool's
//! deleted-but-not-purged instances are purged by name, the "Before restoring" snapshot a
//! non-destructive restore left on a pooled VM is deleted, and nothing without mpool's prefix is
//! touched; never through the Purge RPC; only admins may run it.
mod common;

use std::path::Path;
use std::time::Duration;

use common::MPOOL;
use common::tools;
use mpool_api::proto::v1;
use mpool_multipass::{InstanceState, LaunchOptions, Names};
use mpool_testkit::{Stack, StackOptions, pool, wait};

/// The pool's one VM, once it is warm and nothing runs on it.
async fn warm_vm(stack: &Stack) -> String {
    let c = stack.client().await;
    wait("the pool's VM is warm", Duration::from_secs(60))
        .until(|| async {
            let vms = c.clone().list_vms(v1::ListVmsRequest::default()).await.ok()?.into_inner().vms;
            vms.into_iter().find(|v| v.state == "warm").map(|v| v.name)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()))
}

async fn snapshots_of(d: &mpool_multipass::Client, vm: &str) -> Vec<String> {
    d.list_snapshots().await.unwrap().into_iter().filter(|s| s.instance == vm).map(|s| s.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_exactly_our_leftovers_and_nothing_else() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, pool("ci", 1, 0, 2))).await.expect("stack starts");
    let vm = warm_vm(&stack).await;

    // An operator restores the pooled VM without --destructive while mpool is down: multipassd
    // keeps a "Before restoring" snapshot. mpool resets the VM it finds stopped when it starts.
    stack.stop_serve().await;
    let d = stack.daemon_client().await.expect("daemon client");
    d.stop(&Names::one(vm.clone()), true).await.unwrap();
    d.restore(&vm, "mpool-clean", false).await.unwrap();
    let before = snapshots_of(&d, &vm).await;
    assert_eq!(before.len(), 2, "the clean snapshot and the safety one: {before:?}");
    stack.start_serve().await.expect("serve restarts");
    assert_eq!(warm_vm(&stack).await, vm, "the same VM, reset");

    // Leftovers of ours and of another user, made after mpool reconciled.
    for name in ["mpool-ci-gone", "theirs-gone", "theirs"] {
        d.launch(&LaunchOptions { name: name.into(), ..Default::default() }).await.unwrap();
    }
    d.delete(&Names::one("mpool-ci-gone"), false).await.unwrap();
    d.delete(&Names::one("theirs-gone"), false).await.unwrap();
    d.stop(&Names::one("theirs"), true).await.unwrap();
    d.snapshot("theirs", None, "their own").await.unwrap();

    // Only admins: the stack's token is not one.
    let mut tcp = stack.tcp_client(Some(&stack.token)).await;
    let err = tcp.gc(v1::GcRequest { dry_run: true }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("admin"), "{}", err.message());
    let http = stack.http("POST", "/v1/gc", Some(&stack.token), Some(&serde_json::json!({"dryRun": true}))).await;
    assert_eq!(http.status, 403, "{:?}", http.json);

    // A dry run over the CLI reports and touches nothing.
    let ep = format!("unix:{}", stack.socket.display());
    let o = tools::run(Path::new(MPOOL), &["gc", "--dry-run", "--endpoint", &ep], None, &[]).await;
    o.expect_code(0, "mpool gc --dry-run");
    let safety = before.iter().find(|s| *s != "mpool-clean").unwrap();
    for line in ["would purge mpool-ci-gone".to_string(), format!("would delete snapshot {vm}.{safety}")] {
        assert!(o.stdout.contains(&line), "{line:?} in:\n{}", o.stdout);
    }
    for line in
        ["not ours, untouched: instance theirs-gone (deleted)", "not ours, untouched: snapshot theirs.snapshot1"]
    {
        assert!(o.stdout.contains(line), "{line:?} in:\n{}", o.stdout);
    }
    assert_eq!(snapshots_of(&d, &vm).await.len(), 2, "a dry run deletes nothing");

    // The real run, over gRPC on the Unix socket, watched for the Purge RPC.
    let mut events = stack.sim().events();
    let r = stack.client().await.gc(v1::GcRequest { dry_run: false }).await.unwrap().into_inner();
    assert_eq!(r.purged, vec!["mpool-ci-gone"]);
    assert_eq!(r.snapshots_deleted, vec![format!("{vm}.{safety}")]);
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let mut ops = Vec::new();
    while let Ok(e) = events.try_recv() {
        ops.push((e.op, e.instance));
    }
    assert!(ops.iter().all(|(op, _)| *op != "purge"), "never the Purge RPC: {ops:?}");
    assert!(ops.iter().all(|(_, i)| !i.starts_with("theirs")), "never another's instance: {ops:?}");

    let listed = d.list().await.unwrap();
    let state = |n: &str| listed.iter().find(|i| i.name == n).map(|i| i.state);
    assert_eq!(state("mpool-ci-gone"), None, "ours purged");
    assert_eq!(state("theirs-gone"), Some(InstanceState::Deleted), "theirs left deleted, not purged");
    assert_eq!(snapshots_of(&d, &vm).await, vec!["mpool-clean"], "only our clean snapshot is left");
    assert_eq!(snapshots_of(&d, "theirs").await, vec!["snapshot1"]);

    // The VM it pruned is handed out as usual, from its clean state.
    let mut c = stack.client().await;
    let lease = c
        .acquire(v1::AcquireRequest { pool: "ci".into(), holder: "t".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.vm, vm);
    stack.stop().await;
}
