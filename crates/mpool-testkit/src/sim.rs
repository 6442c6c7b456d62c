//! `mpool sim` in-process on a temporary directory ([`TestSim`]), clients for it, and waiting
//! for its events ([`wait_event`]).

use std::path::PathBuf;
use std::time::Duration;

use mpool_multipass::{Client, ClientIdentity, ClientOptions, DaemonAddress, ServerVerification};
use mpool_sim::{EventKind, SimConfig, SimEvent, Simulator, Stop};
use tokio::sync::broadcast;

/// A simulator on a temporary directory (`sim.sock` and `state/` in it).
pub struct TestSim {
    /// The temporary directory; tests may put their own files in it.
    pub dir: tempfile::TempDir,
    /// The simulator.
    pub sim: Simulator,
}

impl TestSim {
    /// Starts a simulator at time scale 0 that interleaves log-only replies as multipassd does
    /// (reference §0.3), after `tweak` adjusts its config. Panics if it cannot start.
    pub async fn start(tweak: impl FnOnce(&mut SimConfig)) -> TestSim {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = SimConfig::new(dir.path().join("sim.sock"), dir.path().join("state"));
        cfg.time_scale = 0.0;
        cfg.log_lines = true;
        tweak(&mut cfg);
        let sim = Simulator::start(cfg).await.expect("simulator starts");
        TestSim { dir, sim }
    }

    /// Options for a client with its own identity under `<dir>/clients/<who>`.
    pub fn options(&self, who: &str) -> ClientOptions {
        let mut o = ClientOptions::new(self.dir.path().join("clients").join(who));
        o.address = Some(DaemonAddress::Unix(self.sim.socket().to_path_buf()));
        o.identity = ClientIdentity::Own;
        o.verification = ServerVerification::RootCert(self.sim.root_cert());
        o.call_timeout = Duration::from_secs(30);
        o
    }

    /// A connected client (the first one is trusted by the first-client rule). Panics if it
    /// cannot connect.
    pub async fn client(&self, who: &str) -> Client {
        Client::connect(self.options(who)).await.expect("client connects")
    }

    /// Restarts the simulator on the same state dir and socket, as multipassd's service
    /// manager would: `Stop::Graceful` after a clean stop, `Stop::Killed` after `kill -9` (or an
    /// abort). Instances that were running or suspended come back through Starting, on new SSH
    /// ports; after a kill, suspended ones cold-boot with new SSH host keys. `tweak` adjusts
    /// the new simulator's config, e.g. `c.hang_ops = vec!["autostart".into()]` holds the
    /// auto-started instances in Starting until `daemon().set_hang("autostart", false)`.
    /// See `mpool_sim::Simulator::restart_with`.
    pub async fn restart(self, how: Stop, tweak: impl FnOnce(&mut SimConfig)) -> TestSim {
        let TestSim { dir, sim } = self;
        let sim = sim.restart_with(how, tweak).await.expect("simulator restarts");
        TestSim { dir, sim }
    }

    /// The instance's root directory on the host.
    pub fn root(&self, name: &str) -> PathBuf {
        self.sim.daemon().root(name)
    }
}

/// Waits (30 s at most, else panics) for an event matching `pred`, returning it.
pub async fn wait_event(rx: &mut broadcast::Receiver<SimEvent>, pred: impl Fn(&SimEvent) -> bool) -> SimEvent {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut).await.expect("event within 30 s")
}

/// True for `op`'s event of `kind`.
pub fn is(op: &'static str, kind: EventKind) -> impl Fn(&SimEvent) -> bool {
    move |e| e.op == op && e.kind == kind
}
