//! `mpool sim` in-process on a temporary directory ([`TestSim`]), clients for it, and waiting
//! for its events ([`wait_event`]); `mpool sim` as a process ([`SimProcess`]) and `mpool
//! multipass` commands for it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mpool_multipass::{Client, ClientIdentity, ClientOptions, DaemonAddress, ServerVerification};
use mpool_sim::{EventKind, SimConfig, SimEvent, Simulator, Stop};
use tokio::sync::broadcast;

use crate::{Error, Result, wait};

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

/// `mpool sim --time-scale 0` as a child process of the `mpool` binary, on a temporary
/// directory (`sim.sock` and `state/` in it); killed with SIGKILL when dropped.
pub struct SimProcess {
    /// The temporary directory; [`SimProcess::multipass`] clients keep their data in it too.
    pub dir: tempfile::TempDir,
    /// The simulator process (tests wait for it, signal it, kill it).
    pub child: Child,
    mpool: PathBuf,
}

impl SimProcess {
    /// Starts `MPOOL sim` with `extra` flags on a new temporary directory; see
    /// [`SimProcess::start_in`].
    pub fn start(mpool: impl Into<PathBuf>, extra: &[&str]) -> Result<SimProcess> {
        SimProcess::start_in(mpool, tempfile::tempdir()?, extra)
    }

    /// Starts `MPOOL sim` with `extra` flags on `dir` and waits (30 s at most) until its socket
    /// appears. A simulator that exits meanwhile fails this with its exit status.
    pub fn start_in(mpool: impl Into<PathBuf>, dir: tempfile::TempDir, extra: &[&str]) -> Result<SimProcess> {
        let mpool = mpool.into();
        let sock = dir.path().join("sim.sock");
        let child = Command::new(&mpool)
            .args(["sim", "--time-scale", "0", "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::new(format!("{} sim: {e}", mpool.display())))?;
        let mut sim = SimProcess { dir, child, mpool };
        let child = &mut sim.child;
        wait(format!("mpool sim opens {}", sock.display()), Duration::from_secs(30)).until_blocking(|| match child
            .try_wait()
        {
            Ok(Some(status)) => Err(format!("mpool sim exited with {status}")),
            Err(e) => Err(format!("mpool sim: {e}")),
            Ok(None) => Ok(sock.exists().then_some(())),
        })?;
        Ok(sim)
    }

    /// The simulator's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("sim.sock")
    }

    /// `MPOOL --data-dir <dir>/<who> multipass --own-cert --daemon unix:<socket>`, for the
    /// caller to add arguments to: client `who` with its own certificate.
    pub fn multipass(&self, who: &str) -> Command {
        multipass_command(&self.mpool, &self.dir.path().join(who), &self.socket())
    }

    /// Runs [`SimProcess::multipass`] with `args` to completion.
    pub fn run_multipass(&self, who: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.multipass(who);
        cmd.args(args);
        cmd.output().map_err(|e| Error::new(format!("{cmd:?}: {e}")))
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `MPOOL --data-dir <data_dir> multipass --own-cert --daemon unix:<socket>`: an `mpool
/// multipass` client with its own certificate, whether or not a daemon listens there.
pub fn multipass_command(mpool: &Path, data_dir: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(mpool);
    cmd.arg("--data-dir").arg(data_dir).args(["multipass", "--own-cert", "--daemon"]);
    cmd.arg(format!("unix:{}", socket.display()));
    cmd
}
