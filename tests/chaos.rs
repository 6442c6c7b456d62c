//! Chaos (the reliability issue's must-show): tenants use a pool for a while under 5% daemon
//! faults, store write failures and repeated `kill -9` of `mpool serve`; every promise is
//! counted and must hold: no acknowledged lease lost, no dirty VM handed out, no double lease,
//! no leaked instance. `mpool bench chaos` runs the same thing longer and prints the figures.

use std::time::Duration;

use mpool::bench::chaos::{Params, chaos};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promises_hold_under_daemon_faults_store_failures_and_kill_9() {
    let p = Params {
        tenants: 4,
        duration: Duration::from_secs(15),
        kill_every: Duration::from_secs(3),
        daemon_fault_rate: 0.05,
        store_fault_rate: 0.02,
    };
    let o = chaos(std::path::Path::new(env!("CARGO_BIN_EXE_mpool")), &p).await.expect("the chaos run completes");
    eprintln!("chaos: {o:?}");
    assert!(o.acknowledged >= 10, "tenants got work done despite the faults: {o:?}");
    assert!(o.kills >= 4, "{o:?}");
    assert_eq!((o.lost, o.dirty, o.double, o.leaked), (0, 0, 0, 0), "promises broken: {:#?}", o.problems);
}
