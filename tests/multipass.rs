//! The multipassd client against `mpool sim` over its Unix socket with TLS: trust, the whole
//! lifecycle, the daemon lock, bad input, persistence.

use mpool_multipass::proto::multipass::launch_error::ErrorCodes;
use mpool_multipass::proto::multipass::start_error;
use mpool_multipass::{Client, Error, InstanceState, LaunchOptions, Names};
use mpool_sim::EventKind;
use mpool_testkit::{TestSim, is, wait_event};
use tonic::Code;

fn launch_opts(name: &str) -> LaunchOptions {
    LaunchOptions { name: name.into(), image: "24.04".into(), ..Default::default() }
}

async fn state(c: &Client, name: &str) -> InstanceState {
    c.list().await.unwrap().into_iter().find(|i| i.name == name).map(|i| i.state).expect("instance listed")
}

/// Runs a shell line in the instance over SSH, as a task would.
async fn exec(c: &Client, vm: &str, line: &str) -> mpool_ssh::ExecOutput {
    let info = c.ssh_info(vm).await.unwrap();
    let conn = mpool_ssh::Connection::connect(&info, &Default::default()).await.unwrap();
    let out = conn.run(mpool_ssh::ExecRequest::shell(line)).await.unwrap();
    conn.close().await;
    out
}

fn code(e: &Error) -> Code {
    e.code()
}

#[tokio::test]
async fn trust_first_client_then_passphrase() {
    let ts = TestSim::start(|c| c.passphrase = Some("s3cret".into())).await;
    // The store is empty: the first client on the Unix socket is trusted by its first call.
    let first = ts.client("first").await;
    first.ping().await.expect("trusted after first call");

    // The store is not empty now: another certificate is refused, quickly and cleanly.
    let err = Client::connect(ts.options("second")).await.err().expect("untrusted client refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.to_string().contains("not authenticated"), "{err}");
    assert!(err.to_string().contains("passphrase"), "the message names the fix: {err}");

    // A wrong passphrase: INVALID_ARGUMENT with multipassd's message.
    let mut wrong = ts.options("second");
    wrong.passphrase = Some("guess".into());
    let err = Client::connect(wrong).await.err().expect("wrong passphrase refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("Passphrase is not correct"), "{err}");

    // The right passphrase trusts the certificate, persistently.
    let mut right = ts.options("second");
    right.passphrase = Some("s3cret".into());
    let second = Client::connect(right).await.expect("authenticated");
    second.ping().await.expect("trusted");
    let again = Client::connect(ts.options("second")).await.expect("still trusted without passphrase");
    assert_eq!(again.version_text().await.unwrap(), "1.16.3");
}

#[tokio::test]
async fn authenticate_without_a_passphrase_set_is_a_failed_precondition() {
    let ts = TestSim::start(|_| {}).await;
    let _first = ts.client("first").await;
    let mut o = ts.options("second");
    o.passphrase = Some("anything".into());
    let err = Client::connect(o).await.err().expect("refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.to_string().contains("Passphrase is not set"), "{err}");
}

#[tokio::test]
async fn ping_never_trusts_on_first_use_and_socket_opens_after_trust() {
    use std::os::unix::fs::PermissionsExt;
    let ts = TestSim::start(|_| {}).await;
    let mode = |ts: &TestSim| std::fs::metadata(ts.sim.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ts), 0o660, "socket is 0660 while nobody is trusted");
    let raw = Client::open(&ts.options("first")).await.unwrap();
    match raw.ping().await.unwrap_err() {
        Error::Untrusted { message } => {
            assert!(message.starts_with("UNAUTHENTICATED"), "empty daemon message: {message}")
        }
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
    assert_eq!(mode(&ts), 0o660, "ping did not trust on first use");
    raw.version_text().await.expect("any other call trusts the first client");
    raw.ping().await.expect("now trusted");
    assert_eq!(mode(&ts), 0o666, "socket is 0666 once a client is trusted");
}

#[tokio::test]
async fn whole_lifecycle() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    let vm = "mpool-life";
    assert_eq!(c.launch(&launch_opts(vm)).await.unwrap(), vm);
    assert_eq!(state(&c, vm).await, InstanceState::Running);

    let err = c.snapshot(vm, Some("clean"), "").await.unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    assert!(err.to_string().contains("only take snapshots of stopped instances"), "{err}");

    c.stop(&Names::one(vm), false).await.unwrap();
    assert_eq!(state(&c, vm).await, InstanceState::Stopped);
    assert_eq!(c.snapshot(vm, Some("clean"), "pristine").await.unwrap(), "clean");
    assert_eq!(c.snapshot(vm, None, "").await.unwrap(), "snapshot2", "auto names are snapshotN");
    c.start(&Names::one(vm), 0).await.unwrap();

    // A task writes a file in the VM, over exec.
    let out = exec(&c, vm, "echo dirty > task-output.txt && cat task-output.txt").await;
    assert_eq!((out.code, out.stdout_text().as_str()), (Some(0), "dirty\n"));
    c.stop(&Names::one(vm), true).await.unwrap();
    c.restore(vm, "clean", true).await.unwrap();
    c.start(&Names::one(vm), 0).await.unwrap();
    let out = exec(&c, vm, "test -e task-output.txt").await;
    assert_eq!(out.code, Some(1), "restore brings back the clean state: the file is gone");

    // Suspend, then start resumes.
    c.suspend(&Names::one(vm)).await.unwrap();
    assert_eq!(state(&c, vm).await, InstanceState::Suspended);
    let err = c.stop(&Names::one(vm), false).await.unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition, "graceful stop of a suspended instance: {err}");
    let mut ev = ts.sim.events();
    c.start(&Names::one(vm), 0).await.unwrap();
    assert_eq!(state(&c, vm).await, InstanceState::Running);
    wait_event(&mut ev, is("start", EventKind::Working)).await;

    // Clone: refused while running, works when stopped, copies no snapshots.
    let err = c.clone_instance(vm, "mpool-copy").await.unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    assert!(err.to_string().contains("only clone stopped instances"), "{err}");
    c.stop(&Names::one(vm), false).await.unwrap();
    c.clone_instance(vm, "mpool-copy").await.unwrap();
    assert_eq!(state(&c, "mpool-copy").await, InstanceState::Stopped);
    let snaps = c.list_snapshots().await.unwrap();
    assert!(snaps.iter().all(|s| s.instance == vm), "clones carry no snapshots: {snaps:?}");
    assert!(snaps.iter().any(|s| s.name == "clean"));

    // Delete with purge: gone from the list and from disk.
    let purged = c.delete(&Names::new(vec![vm.into(), "mpool-copy".into()]).unwrap(), true).await.unwrap();
    assert_eq!(purged.len(), 2);
    assert!(c.list().await.unwrap().is_empty());
    assert!(!ts.root(vm).exists());
}

#[tokio::test]
async fn suspend_of_a_stopped_instance_is_ignored() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    c.stop(&Names::one("vm"), false).await.unwrap();
    c.suspend(&Names::one("vm")).await.expect("ignored, not an error");
    assert_eq!(state(&c, "vm").await, InstanceState::Stopped, "the recipe's 'reset then suspend' leaves it stopped");
}

#[tokio::test]
async fn list_waits_for_a_running_suspend() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("slow")).await.unwrap();
    let d = ts.sim.daemon().clone();
    d.set_hang("suspend", true);
    let mut ev = ts.sim.events();

    let c1 = c.clone();
    let suspend = tokio::spawn(async move { c1.suspend(&Names::one("slow")).await });
    wait_event(&mut ev, is("suspend", EventKind::Hung)).await;

    let c2 = c.clone();
    let list = tokio::spawn(async move { c2.list().await });
    // The list call arrived and had to wait for the daemon's main thread.
    wait_event(&mut ev, is("list", EventKind::LockWaiting)).await;
    assert!(!list.is_finished() || !suspend.is_finished(), "nothing finished before the suspend is released");

    d.set_hang("suspend", false);
    let first_done = wait_event(&mut ev, |e| e.kind == EventKind::Done && (e.op == "suspend" || e.op == "list")).await;
    assert_eq!(first_done.op, "suspend", "list completed only after the suspend");
    suspend.await.unwrap().unwrap();
    let listed = list.await.unwrap().unwrap();
    assert_eq!(listed[0].state, InstanceState::Suspended, "list saw the finished suspend");
}

#[tokio::test]
async fn bad_input_gets_the_reference_status() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;

    let err = c.launch(&launch_opts("1-bad-name")).await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    assert_eq!(err.launch_error_codes(), vec![ErrorCodes::InvalidHostname]);
    let mut small = launch_opts("tiny");
    small.memory = "64M".into();
    small.disk = "lots".into();
    let err = c.launch(&small).await.unwrap_err();
    assert_eq!(err.launch_error_codes(), vec![ErrorCodes::InvalidMemSize, ErrorCodes::InvalidDiskSize]);

    let err = c.start(&Names::one("ghost"), 0).await.unwrap_err();
    assert_eq!(code(&err), Code::Aborted);
    match &err {
        Error::Daemon { start_error: Some(se), .. } => {
            assert_eq!(se.instance_errors["ghost"], start_error::ErrorCode::DoesNotExist as i32)
        }
        other => panic!("expected StartError details, got {other:?}"),
    }
    let err = c.stop(&Names::one("ghost"), false).await.unwrap_err();
    assert_eq!(
        (code(&err), err.to_string().contains("instance \"ghost\" does not exist")),
        (Code::NotFound, true),
        "{err}"
    );
    let err = c.ssh_info("ghost").await.unwrap_err();
    assert_eq!(code(&err), Code::NotFound);

    c.launch(&launch_opts("vm")).await.unwrap();
    let err = c.launch(&launch_opts("vm")).await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    assert!(err.to_string().contains("already exists"), "{err}");
    c.stop(&Names::one("vm"), false).await.unwrap();
    let err = c.snapshot("vm", Some("bad_name"), "").await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    assert!(err.to_string().contains("Invalid snapshot name"), "{err}");
    c.snapshot("vm", Some("clean"), "").await.unwrap();
    let err = c.snapshot("vm", Some("clean"), "").await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "duplicate snapshot name");
    let err = c.restore("vm", "nope", true).await.unwrap_err();
    assert_eq!(code(&err), Code::NotFound, "unknown snapshot: {err}");
    let err = c.ssh_info("vm").await.unwrap_err();
    assert_eq!(code(&err), Code::Aborted, "ssh_info of a stopped instance: {err}");
    let err = c.clone_instance("vm", "bad_dest").await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    c.delete(&Names::one("vm"), false).await.unwrap();
    let err = c.start(&Names::one("vm"), 0).await.unwrap_err();
    assert_eq!(code(&err), Code::Aborted, "starting a deleted instance");
    c.recover(&Names::one("vm")).await.unwrap();
    c.start(&Names::one("vm"), 0).await.expect("recovered instances start");

    // The typed API cannot express an empty list (multipassd would read it as ALL).
    assert_eq!(Names::new(vec![]).unwrap_err().code(), Code::InvalidArgument);
    // The server is still up and answering.
    assert_eq!(c.version_text().await.unwrap(), "1.16.3");
}

#[tokio::test]
async fn non_destructive_restore_takes_a_safety_snapshot() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    c.stop(&Names::one("vm"), false).await.unwrap();
    c.snapshot("vm", Some("clean"), "").await.unwrap();
    c.restore("vm", "clean", false).await.unwrap();
    let snaps = c.list_snapshots().await.unwrap();
    let safety = snaps.iter().find(|s| s.name == "snapshot2").expect("safety snapshot taken");
    assert_eq!(safety.comment, "Before restoring clean");
}

#[tokio::test]
async fn deleting_a_snapshot_answers_the_purge_prompt() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    c.stop(&Names::one("vm"), false).await.unwrap();
    c.snapshot("vm", Some("old"), "").await.unwrap();
    c.delete_snapshot("vm", "old").await.unwrap();
    assert!(c.list_snapshots().await.unwrap().is_empty());
}

#[tokio::test]
async fn state_survives_a_restart_and_running_instances_are_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |d: &std::path::Path| {
        let mut c = mpool_sim::SimConfig::new(d.join("sim.sock"), d.join("state"));
        c.time_scale = 0.0;
        c
    };
    let opts = |d: &std::path::Path| {
        let mut o = mpool_multipass::ClientOptions::new(d.join("client"));
        o.address = Some(mpool_multipass::DaemonAddress::Unix(d.join("sim.sock")));
        o.identity = mpool_multipass::ClientIdentity::Own;
        o.verification = mpool_multipass::ServerVerification::RootCert(d.join("state/multipass_root_cert.pem"));
        o
    };
    let sim = mpool_sim::Simulator::start(cfg(dir.path())).await.unwrap();
    let c = Client::connect(opts(dir.path())).await.unwrap();
    for n in ["a", "b", "c"] {
        c.launch(&launch_opts(n)).await.unwrap();
    }
    c.suspend(&Names::one("b")).await.unwrap();
    c.stop(&Names::one("c"), false).await.unwrap();
    c.snapshot("c", Some("clean"), "").await.unwrap();
    sim.shutdown().await;

    let sim = mpool_sim::Simulator::start(cfg(dir.path())).await.unwrap();
    let mut ev = sim.events();
    // Same certificate: the trust store survived too.
    let c = Client::connect(opts(dir.path())).await.expect("still trusted after a restart");
    // Like multipassd, the restarted simulator resumes what was running or suspended.
    while c.list().await.unwrap().iter().any(|i| i.name != "c" && i.state != InstanceState::Running) {
        wait_event(&mut ev, |e| e.op == "autostart").await;
    }
    let list = c.list().await.unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list.iter().find(|i| i.name == "c").unwrap().state, InstanceState::Stopped);
    assert_eq!(c.list_snapshots().await.unwrap().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn fault_injection_fails_and_hangs_on_demand() {
    let ts = TestSim::start(|c| c.fail_ops = vec!["snapshot".into()]).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    c.stop(&Names::one("vm"), false).await.unwrap();
    let err = c.snapshot("vm", Some("x"), "").await.unwrap_err();
    assert_eq!(code(&err), Code::Internal);
    // A hung daemon makes calls time out rather than hang the client.
    ts.sim.daemon().set_hang("version", true);
    let err = c.with_timeout(std::time::Duration::from_millis(300)).version_text().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { op: "version", .. }), "{err}");
    assert_eq!(err.code(), Code::Unavailable);
    ts.sim.daemon().set_hang("version", false);
    assert_eq!(c.version_text().await.unwrap(), "1.16.3");
}

#[tokio::test]
async fn version_gating() {
    let ts = TestSim::start(|c| c.daemon_version = "1.12.2".into()).await;
    let err = Client::connect(ts.options("old")).await.err().expect("1.12 is refused");
    assert!(err.to_string().contains("1.13.0 to 1.16.x"), "{err}");
    let mut o = ts.options("old");
    o.allow_untested_daemon = true;
    let c = Client::connect(o).await.expect("allowed when asked");
    assert!(!c.daemon_version().has_clone());
    let err = c.clone_instance("a", "b").await.unwrap_err();
    assert!(err.to_string().contains("1.15+"), "{err}");
}

#[tokio::test]
async fn unreachable_daemon_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = mpool_multipass::ClientOptions::new(dir.path());
    o.address = Some(mpool_multipass::DaemonAddress::Unix(dir.path().join("nothing.sock")));
    o.identity = mpool_multipass::ClientIdentity::Own;
    o.verification = mpool_multipass::ServerVerification::InsecureSkipVerify;
    let err = Client::connect(o).await.err().expect("no daemon");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

/// Every call the simulator received (its `Received` events) until `until` happens.
async fn calls_until(
    ev: &mut tokio::sync::broadcast::Receiver<mpool_sim::SimEvent>,
    until: &'static str,
) -> Vec<&'static str> {
    let mut calls = Vec::new();
    loop {
        let e = wait_event(ev, |e| e.kind == EventKind::Received).await;
        if e.op == until {
            return calls;
        }
        calls.push(e.op);
    }
}

#[tokio::test]
async fn connecting_takes_one_call_and_the_version_needs_no_other() {
    let ts = TestSim::start(|_| {}).await;
    ts.client("ops").await; // trusted by the first-client rule
    let mut ev = ts.sim.events();
    let c = Client::connect(ts.options("ops")).await.unwrap();
    assert_eq!(c.daemon_version_text(), "1.16.3");
    assert_eq!(c.daemon_version().to_string(), "1.16.3");
    c.list().await.unwrap();
    assert_eq!(calls_until(&mut ev, "list").await, vec!["version"], "one call to connect a trusted client");

    // An untrusted client with the passphrase: version (refused), authenticate, version.
    let ts = TestSim::start(|c| c.passphrase = Some("pw".into())).await;
    ts.client("first").await;
    let mut ev = ts.sim.events();
    let mut o = ts.options("second");
    o.passphrase = Some("pw".into());
    let c = Client::connect(o).await.unwrap();
    c.list().await.unwrap();
    assert_eq!(calls_until(&mut ev, "list").await, vec!["version", "authenticate", "version"]);
}

#[tokio::test]
async fn the_version_command_is_one_call() {
    let ts = TestSim::start(|_| {}).await;
    let mut ev = ts.sim.events();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mpool"))
        .arg("--data-dir")
        .arg(ts.dir.path().join("clients/cli"))
        .args(["multipass", "--own-cert", "--daemon"])
        .arg(format!("unix:{}", ts.sim.socket().display()))
        .arg("--root-cert")
        .arg(ts.sim.root_cert())
        .arg("version")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1.16.3"));
    // A marker call after the process ended: everything before it was the process's.
    ts.client("cli").await.list().await.unwrap();
    let calls = calls_until(&mut ev, "list").await;
    assert_eq!(calls, vec!["version", "version"], "the process's one call, then the marker client's connect");
}

/// A call given up at any point (its task aborted, as the engine aborts work in flight when the
/// store fails) never reaches the daemon as a request without its names: multipassd reads a
/// stream that closes before its first message as the default request, and for `delete` an
/// empty name list means every instance on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_never_arrives_as_a_request_for_all_instances() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("bystander")).await.unwrap();
    for round in 0..300u32 {
        let client = c.clone();
        let victim = format!("victim-{round}");
        let call = tokio::spawn(async move { client.delete(&Names::one(victim), true).await });
        // Give up on it at a different point each round: before it is sent, while its
        // request is on the way, while the daemon works on it.
        let spin = std::time::Duration::from_micros(u64::from(round % 100) * 15);
        let t = std::time::Instant::now();
        while t.elapsed() < spin {
            std::hint::spin_loop();
        }
        call.abort();
        let _ = call.await;
        let seen = c.list().await.unwrap();
        let bystander = seen.iter().find(|i| i.name == "bystander").map(|i| i.state);
        assert_eq!(bystander, Some(InstanceState::Running), "round {round}: the bystander was deleted: {seen:?}");
    }
}
