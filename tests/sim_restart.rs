//! Restarts and aborts of the simulated daemon, as a live multipassd 1.16.3 showed them
//! (reference §0.3), and the client's side: reads cut by an abort are sent again, mutating
//! calls are not, and the calls in flight are capped.

use std::time::Duration;

use mpool_multipass::{Client, Error, InstanceState, LaunchOptions, Names, RetryPolicy};
use mpool_sim::{EventKind, Exit, Simulator, Stop};
use mpool_testkit::{TestSim, is, wait, wait_event};

fn launch_opts(name: &str) -> LaunchOptions {
    LaunchOptions { name: name.into(), ..Default::default() }
}

/// Retries generous enough to ride out an in-process restart however slow the machine.
fn patient() -> RetryPolicy {
    RetryPolicy { attempts: 200, first_backoff: Duration::from_millis(20), max_backoff: Duration::from_millis(100) }
}

async fn state(c: &Client, name: &str) -> InstanceState {
    c.list().await.unwrap().into_iter().find(|i| i.name == name).map(|i| i.state).expect("listed")
}

/// The SSH host key fingerprint and port of a running instance, read by connecting to it.
async fn host_key(c: &Client, name: &str) -> (String, u16) {
    let info = c.ssh_info(name).await.unwrap();
    let conn = mpool_ssh::Connection::connect(&info, &Default::default()).await.unwrap();
    let fp = conn.host_key_fingerprint().to_string();
    conn.close().await;
    (fp, info.port)
}

/// Restarts `ts`'s simulator (the test keeps its temp dir).
async fn restart(ts: TestSim, how: Stop, tweak: impl FnOnce(&mut mpool_sim::SimConfig)) -> TestSim {
    ts.restart(how, tweak).await
}

#[tokio::test]
async fn fact_the_daemon_can_abort_mid_call() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await.with_retry(RetryPolicy::NONE);
    c.launch(&launch_opts("vm")).await.unwrap();
    ts.sim.daemon().abort_next("list", 1);
    let err = c.list().await.unwrap_err();
    assert!(err.is_connection_lost(), "a cut, not a refusal: {err:?}");
    assert!(err.is_unavailable(), "the daemon is gone: {err}");
    assert!(err.to_string().contains("was cut off"), "{err}");
    assert_eq!(ts.sim.exited().await, Exit::Aborted);
    // The dead daemon left its socket file: connecting is refused until it is restarted.
    assert!(ts.sim.socket().exists(), "a dead process does not unlink its socket");
    let err = c.version_text().await.unwrap_err();
    assert!(matches!(&err, Error::Unavailable { detail, .. } if detail.contains("connection refused")), "{err:?}");
    let ts = restart(ts, Stop::Killed, |_| {}).await;
    let c = ts.client("ops").await;
    assert_eq!(c.list().await.unwrap().len(), 1, "state survived the abort");
}

#[tokio::test]
async fn a_read_cut_by_a_daemon_abort_is_sent_again() {
    let ts = TestSim::start(|_| {}).await;
    let c = Client::connect(ts.options("ops").with_retry(patient())).await.unwrap();
    c.launch(&launch_opts("vm")).await.unwrap();
    ts.sim.daemon().abort_next("list", 1);
    let mut ev = ts.sim.events();
    let list = tokio::spawn({
        let c = c.clone();
        async move { c.list().await }
    });
    wait_event(&mut ev, is("list", EventKind::Aborted)).await;
    assert_eq!(ts.sim.exited().await, Exit::Aborted);
    // The service manager brings the daemon back; the cut list is sent again and answers.
    let ts = restart(ts, Stop::Killed, |_| {}).await;
    let listed = list.await.unwrap().expect("the list was sent again after the abort");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "vm");
    drop(ts);
}

#[tokio::test]
async fn a_mutating_call_cut_by_an_abort_is_not_sent_again() {
    let ts = TestSim::start(|_| {}).await;
    let c = Client::connect(ts.options("ops").with_retry(patient())).await.unwrap();
    c.launch(&launch_opts("vm")).await.unwrap();
    ts.sim.daemon().abort_next("snapshot", 1);
    c.stop(&Names::one("vm"), false).await.unwrap();
    let mut ev = ts.sim.events();
    let err = c.snapshot("vm", None, "").await.unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
    wait_event(&mut ev, is("snapshot", EventKind::Aborted)).await;
    let ts = restart(ts, Stop::Killed, |_| {}).await;
    let c = ts.client("ops").await;
    // Re-observe: the cut snapshot did not happen, and nothing sent it again.
    assert!(c.list_snapshots().await.unwrap().is_empty());
    assert_eq!(c.snapshot("vm", None, "").await.unwrap(), "snapshot1");
}

#[tokio::test]
async fn calls_in_flight_are_capped() {
    let ts = TestSim::start(|_| {}).await;
    let c = Client::connect(ts.options("ops").with_max_in_flight(2)).await.unwrap();
    assert_eq!(c.max_in_flight(), Some(2));
    c.launch(&launch_opts("vm")).await.unwrap();
    let d = ts.sim.daemon().clone();
    d.set_hang("list", true);
    let mut ev = ts.sim.events();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.list().await })
        })
        .collect();
    // Two reach the daemon (one holds its main thread, one waits for it) ...
    wait_event(&mut ev, is("list", EventKind::Hung)).await;
    wait_event(&mut ev, is("list", EventKind::LockWaiting)).await;
    // ... and four wait for a slot in the client.
    wait("four calls queue behind the cap", Duration::from_secs(30))
        .every(Duration::from_millis(1))
        .until(|| async { c.queued_calls() >= 4 })
        .await
        .unwrap_or_else(|e| panic!("{e} ({} do)", c.queued_calls()));
    assert_eq!(d.calls_in_flight(), 2, "the daemon sees only two");
    d.set_hang("list", false);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().len(), 1);
    }
    assert_eq!(d.max_calls_in_flight(), 2, "never more than the cap at once");
}

#[tokio::test]
async fn fact_after_a_daemon_restart_auto_resumed_instances_pass_through_starting() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    for n in ["run", "warm", "off"] {
        c.launch(&launch_opts(n)).await.unwrap();
    }
    c.suspend(&Names::one("warm")).await.unwrap();
    c.stop(&Names::one("off"), false).await.unwrap();
    // Hold the auto-started instances in Starting to look at them.
    let ts = restart(ts, Stop::Graceful, |c| c.hang_ops = vec!["autostart".into()]).await;
    let mut ev = ts.sim.events();
    let c = ts.client("ops").await;
    assert_eq!(state(&c, "run").await, InstanceState::Starting);
    assert_eq!(state(&c, "warm").await, InstanceState::Starting);
    assert_eq!(state(&c, "off").await, InstanceState::Stopped, "stopped instances stay stopped");
    let err = c.ssh_info("warm").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "not running yet: {err}");
    // A start joins the one in progress.
    let start = tokio::spawn({
        let c = c.clone();
        async move { c.start(&Names::one("warm"), 0).await }
    });
    ts.sim.daemon().set_hang("autostart", false);
    for _ in 0..2 {
        wait_event(&mut ev, is("autostart", EventKind::Done)).await;
    }
    start.await.unwrap().expect("start joined the auto-start");
    assert_eq!(state(&c, "run").await, InstanceState::Running);
    assert_eq!(state(&c, "warm").await, InstanceState::Running, "resumed");
}

#[tokio::test]
async fn fact_a_killed_daemon_cold_boots_suspended_instances_with_a_new_host_key() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("warm")).await.unwrap();
    c.launch(&launch_opts("run")).await.unwrap();
    let (warm_key, _) = host_key(&c, "warm").await;
    let (run_key, _) = host_key(&c, "run").await;
    c.suspend(&Names::one("warm")).await.unwrap();

    // A clean restart resumes the suspended instance: same host key.
    let ts = restart(ts, Stop::Graceful, |_| {}).await;
    let mut ev = ts.sim.events();
    for _ in 0..2 {
        wait_event(&mut ev, is("autostart", EventKind::Done)).await;
    }
    let c = ts.client("ops").await;
    assert_eq!(host_key(&c, "warm").await.0, warm_key, "a resumed guest keeps its host key");
    c.suspend(&Names::one("warm")).await.unwrap();

    // kill -9: the suspend image is lost, the guest boots cold and makes new host keys.
    let ts = restart(ts, Stop::Killed, |_| {}).await;
    let mut ev = ts.sim.events();
    for _ in 0..2 {
        wait_event(&mut ev, is("autostart", EventKind::Done)).await;
    }
    let c = ts.client("ops").await;
    assert_ne!(host_key(&c, "warm").await.0, warm_key, "a cold-booted suspended guest has a new host key");
    assert_eq!(host_key(&c, "run").await.0, run_key, "a rebooted running guest keeps its host key");
}

#[tokio::test]
async fn ssh_endpoints_are_new_after_a_restart() {
    let mut ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    let mut port = c.ssh_info("vm").await.unwrap().port;
    for how in [Stop::Killed, Stop::Graceful, Stop::Killed] {
        ts = restart(ts, how, |_| {}).await;
        let mut ev = ts.sim.events();
        wait_event(&mut ev, is("autostart", EventKind::Done)).await;
        let c = ts.client("ops").await;
        let now = c.ssh_info("vm").await.unwrap().port;
        assert_ne!(now, port, "{how:?}: the instance comes back on a new SSH port");
        // And the old one is closed.
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "{how:?}: old port closed");
        port = now;
    }
}

#[tokio::test]
async fn fact_set_with_a_call_in_flight_never_exits() {
    let ts = TestSim::start(|c| {
        c.set_wedges_if_busy = true;
        c.passphrase = Some("pw".into());
    })
    .await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    c.stop(&Names::one("vm"), false).await.unwrap();
    let d = ts.sim.daemon().clone();
    d.set_hang("boot", true);
    let mut ev = ts.sim.events();
    let start = tokio::spawn({
        let c = c.with_timeout(Duration::from_millis(500)).with_retry(RetryPolicy::NONE);
        async move { c.start(&Names::one("vm"), 0).await }
    });
    wait_event(&mut ev, is("boot", EventKind::Hung)).await;
    // The set is answered; then the daemon wedges: socket gone, process alive, no exit.
    c.set("local.passphrase", "new").await.expect("the reply arrives");
    wait_event(&mut ev, is("set", EventKind::Wedged)).await;
    assert!(d.is_wedged());
    assert!(!ts.sim.socket().exists(), "the socket is gone");
    let err = Client::connect(ts.options("ops")).await.err().expect("nobody can connect");
    assert!(matches!(&err, Error::Unavailable { detail, .. } if detail.contains("no such file")), "{err:?}");
    // The call in flight is never answered: only its deadline ends it.
    d.set_hang("boot", false);
    let err = start.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { op: "start", .. }), "{err:?}");
    // And the daemon did not end (no exit to restart it from, as with multipassd).
    assert_eq!(d.exit_reason(), None, "a wedged daemon does not exit");
}

#[tokio::test]
async fn set_without_calls_in_flight_still_exits_42() {
    let ts = TestSim::start(|c| c.set_wedges_if_busy = true).await;
    let c = ts.client("ops").await;
    c.set("local.passphrase", "x").await.unwrap();
    assert_eq!(ts.sim.exited().await, Exit::SettingsChanged);
    assert!(!ts.sim.daemon().is_wedged());
}

#[tokio::test]
async fn an_old_simulator_shutting_down_leaves_the_new_ones_socket() {
    let old = TestSim::start(|_| {}).await;
    old.client("ops").await;
    // A new simulator takes over the same socket path (a restart racing the old one's exit).
    let mut cfg = old.sim.config().clone();
    cfg.state_dir = old.dir.path().join("new-state");
    let new = Simulator::start(cfg).await.unwrap();
    let TestSim { dir, sim } = old;
    sim.shutdown().await;
    assert!(new.socket().exists(), "the old simulator unlinked the new one's socket");
    let mut o = mpool_multipass::ClientOptions::new(dir.path().join("clients/new"));
    o.address = Some(mpool_multipass::DaemonAddress::Unix(new.socket().to_path_buf()));
    o.identity = mpool_multipass::ClientIdentity::Own;
    o.verification = mpool_multipass::ServerVerification::RootCert(new.root_cert());
    let c = Client::connect(o).await.expect("the new simulator still answers");
    assert_eq!(c.daemon_version_text(), "1.16.3");
    new.shutdown().await;
    assert!(!dir.path().join("sim.sock").exists(), "its own socket is removed");
}
