//! Plans: the daemon and SSH steps of each VM transition, in order, each through the scheduler.
//!
//! Every step is safe to run again on an instance that already went through it, because the
//! daemon's own rules make it so: stopping a stopped instance, suspending a suspended one and
//! starting a running one do nothing, a destructive restore always lands on the clean state, and
//! delete tolerates a missing instance. So after a crash the engine simply runs the plan again
//! from the start (a reset for anything in doubt); no per-transition recovery code exists.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{PoolConfig, ResetStrategy};
use crate::multipass::{LaunchOptions, SshInfo};

use super::ports::{Ports, StepError};
use super::scheduler::{Op, Priority, Scheduler};

/// The snapshot every pooled VM is restored to.
pub const CLEAN_SNAPSHOT: &str = "mpool-clean";

/// What plans run with.
#[derive(Clone)]
pub struct Ctx {
    /// Daemon and SSH.
    pub ports: Ports,
    /// The daemon scheduler.
    pub sched: Scheduler,
}

impl Ctx {
    async fn start(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.sched.run(p, vm, Op::Quick, self.ports.daemon.start(vm.into())).await
    }

    async fn stop(&self, p: Priority, vm: &str, force: bool) -> Result<(), StepError> {
        self.ports.ssh.forget(vm.into()).await;
        self.sched.run(p, vm, Op::Blocking, self.ports.daemon.stop(vm.into(), force)).await
    }

    async fn suspend(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.ports.ssh.forget(vm.into()).await;
        self.sched.run(p, vm, Op::Blocking, self.ports.daemon.suspend(vm.into())).await
    }

    async fn delete(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.ports.ssh.forget(vm.into()).await;
        self.sched.run(p, vm, Op::Blocking, self.ports.daemon.delete(vm.into())).await
    }

    /// SSH endpoint, then a readiness check over SSH.
    async fn ready(&self, p: Priority, vm: &str) -> Result<SshInfo, StepError> {
        let info = self.sched.run(p, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await?;
        self.ports.ssh.ready(vm.into(), info.clone()).await?;
        Ok(info)
    }

    /// Starts the VM and waits until it answers over SSH; then suspends it unless it is to
    /// stay hot. Returns the SSH endpoint when it stays up.
    pub async fn park(&self, p: Priority, vm: &str, hot: bool) -> Result<Option<SshInfo>, StepError> {
        self.park_for(p, vm, hot, None).await
    }

    /// [`Ctx::park`], but the VM also stays running if callers are waiting for a VM of its pool
    /// when it is up (`waiting`): suspending it only to resume it for them would cost a
    /// suspend and a resume.
    async fn park_for(
        &self,
        p: Priority,
        vm: &str,
        hot: bool,
        waiting: Option<&AtomicUsize>,
    ) -> Result<Option<SshInfo>, StepError> {
        self.start(p, vm).await?;
        let info = self.ready(p, vm).await?;
        if hot || waiting.is_some_and(|w| w.load(Ordering::Relaxed) > 0) {
            return Ok(Some(info));
        }
        self.suspend(p, vm).await?;
        Ok(None)
    }

    /// Puts a running VM to sleep (hot -> warm).
    pub async fn cool(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.suspend(p, vm).await
    }

    /// Starts (resumes) a VM for a caller and checks it answers over SSH.
    pub async fn wake(&self, vm: &str) -> Result<SshInfo, StepError> {
        // No new daemon-blocking operation starts until the daemon's part is done: the resume's
        // clock sync and ssh_info take the daemon's lock and would each wait for it.
        let hold = self.sched.hold();
        self.start(Priority::Acquire, vm).await?;
        let info = self.sched.run(Priority::Acquire, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await?;
        drop(hold);
        self.ports.ssh.ready(vm.into(), info.clone()).await?;
        Ok(info)
    }

    /// The SSH endpoint of a running VM (a holder's VM after a restart).
    pub async fn endpoint(&self, vm: &str) -> Result<SshInfo, StepError> {
        self.sched.run(Priority::Acquire, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await
    }

    /// Checks a hot VM still answers before it is handed out.
    pub async fn check(&self, vm: &str, info: Option<SshInfo>) -> Result<SshInfo, StepError> {
        match info {
            Some(info) => {
                self.ports.ssh.ready(vm.into(), info.clone()).await?;
                Ok(info)
            }
            None => self.ready(Priority::Acquire, vm).await,
        }
    }

    /// Checks a hot VM still answers before it is handed to a caller: one round trip on its
    /// pooled connection. The full check (`true` over SSH) ran when the VM was parked and runs
    /// again at every health check; this proves it is still up now, without starting a process
    /// in it.
    pub async fn check_alive(&self, vm: &str, info: Option<SshInfo>) -> Result<SshInfo, StepError> {
        match info {
            Some(info) => {
                self.ports.ssh.alive(vm.into(), info.clone()).await?;
                Ok(info)
            }
            None => self.ready(Priority::Acquire, vm).await,
        }
    }

    fn launch_options(vm: &str, pool: &PoolConfig) -> LaunchOptions {
        LaunchOptions {
            name: vm.to_string(),
            image: pool.image.clone(),
            cpus: i32::try_from(pool.cpus).unwrap_or(i32::MAX),
            memory: pool.memory.clone(),
            disk: pool.disk.clone(),
            cloud_init: pool.cloud_init.clone().unwrap_or_default(),
            timeout_secs: i32::try_from(pool.readiness_timeout.as_secs()).unwrap_or(i32::MAX),
        }
    }

    /// Launches a VM and runs the pool's setup commands in it, leaving it stopped gracefully
    /// (a consistent disk for the snapshot or clone that follows).
    async fn build(&self, p: Priority, vm: &str, pool: &PoolConfig) -> Result<(), StepError> {
        let launch = self.ports.daemon.launch(Self::launch_options(vm, pool));
        self.sched.run(p, vm, Op::Quick, launch).await?;
        if !pool.setup.is_empty() {
            let info = self.ready(p, vm).await?;
            let script = format!("set -e\n{}\n", pool.setup.join("\n"));
            self.ports.ssh.run_script(vm.into(), info, script).await?;
        }
        self.stop(p, vm, false).await
    }

    /// Builds a clone pool's golden source VM (stopped, never leased).
    pub async fn golden(&self, vm: &str, pool: &PoolConfig) -> Result<(), StepError> {
        self.delete(Priority::Provision, vm).await?;
        self.build(Priority::Provision, vm, pool).await
    }

    /// Creates a pool VM ready to serve: built (snapshot/recreate) or cloned from `golden`,
    /// with its clean snapshot taken, then parked. Anything left of an earlier attempt under
    /// the same name is deleted first. With `waiting` (its pool's waiting callers), it stays
    /// running if someone waits when it is up.
    pub async fn provision(
        &self,
        p: Priority,
        vm: &str,
        pool: &PoolConfig,
        golden: Option<&str>,
        hot: bool,
        waiting: Option<&AtomicUsize>,
    ) -> Result<Option<SshInfo>, StepError> {
        self.delete(p, vm).await?;
        match (pool.reset, golden) {
            (ResetStrategy::Clone, Some(src)) => {
                let clone = self.ports.daemon.clone_vm(src.into(), vm.into());
                self.sched.run(p, vm, Op::Blocking, clone).await?;
            }
            (ResetStrategy::Clone, None) => {
                return Err(StepError::failed(format!("pool {}: no golden VM to clone from", pool.name)));
            }
            _ => self.build(p, vm, pool).await?,
        }
        // Clones carry no snapshots: every strategy takes its own clean snapshot.
        let snap = self.ports.daemon.snapshot(vm.into(), CLEAN_SNAPSHOT.into());
        self.sched.run(p, vm, Op::Blocking, snap).await?;
        self.park_for(p, vm, hot, waiting).await
    }

    /// Returns a used VM to its clean state and parks it. Snapshot pools stop it (forced: its
    /// state is thrown away anyway) and restore the clean snapshot; clone and recreate pools,
    /// and VMs that are to be rebuilt (`max_uses`, a new config generation), are replaced
    /// under the same name. `waiting`: see [`Ctx::provision`].
    #[allow(clippy::too_many_arguments)]
    pub async fn reset(
        &self,
        p: Priority,
        vm: &str,
        pool: &PoolConfig,
        golden: Option<&str>,
        rebuild: bool,
        hot: bool,
        waiting: Option<&AtomicUsize>,
    ) -> Result<Option<SshInfo>, StepError> {
        if rebuild || pool.reset != ResetStrategy::Snapshot {
            return self.provision(p, vm, pool, golden, hot, waiting).await;
        }
        self.stop(p, vm, true).await?;
        let restore = self.ports.daemon.restore(vm.into(), CLEAN_SNAPSHOT.into());
        self.sched.run(p, vm, Op::Blocking, restore).await?;
        self.park_for(p, vm, hot, waiting).await
    }

    /// Deletes and purges a VM.
    pub async fn destroy(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.delete(p, vm).await
    }
}
