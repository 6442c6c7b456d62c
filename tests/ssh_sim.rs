//! The same exec and transfer suite as `tests/ssh.rs`, against the simulator's own SSH
//! endpoints (reached through multipassd's `ssh_info`, as mpool does).

mod common;

use std::sync::Arc;

use common::suite::{self, Remote};
use mpool_multipass::LaunchOptions;
use mpool_testkit::TestSim;

/// A simulator with one running instance, and the suite's view of its SSH endpoint.
async fn remote() -> (TestSim, Remote) {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ssh").await;
    c.launch(&LaunchOptions { name: "vm".into(), ..Default::default() }).await.unwrap();
    let info = c.ssh_info("vm").await.unwrap();
    let endpoint = ts.sim.daemon().endpoint("vm").expect("running instance has an endpoint");
    let scratch = ts.root("vm").join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let r = Remote {
        target: info.clone(),
        connections: Arc::new(move || endpoint.connections_accepted() as usize),
        scratch: scratch.display().to_string(),
    };
    (ts, r)
}

macro_rules! against_sim {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_ts, r) = remote().await;
            suite::$name(&r).await;
        }
    )*};
}

against_sim!(
    exit_codes_and_streams,
    stdin_env_cwd,
    argv_is_inert,
    scripts,
    output_streams_in_chunks,
    timeout_and_cancel_kill_the_process_group,
    close_stops_running_commands,
    many_execs_one_connection,
    ping_uses_the_pooled_connection,
);

macro_rules! against_sim_with_dir {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_ts, r) = remote().await;
            let local = tempfile::tempdir().unwrap();
            suite::$name(&r, local.path()).await;
        }
    )*};
}

against_sim_with_dir!(large_file_round_trip, tree_round_trip, paths_are_confined);
