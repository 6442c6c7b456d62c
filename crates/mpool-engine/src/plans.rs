//! Plans: runs the steps of [`super::steps`] against the daemon and SSH, each daemon call
//! through the scheduler. A plan starts from facts (what the engine did, or what the daemon
//! reports when the engine cannot be sure) and runs only the steps those facts still call for,
//! so running a plan again after a crash or a failed call is always safe.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mpool_core::PoolConfig;
use mpool_core::types::{InstanceState, LaunchOptions, SshEndpoint};

use super::isolation::Prober;
use super::scheduler::{Op, Priority, Scheduler};
use mpool_core::pool::steps::{Facts, Step};
use mpool_core::ports::{Ports, StepError};

/// The snapshot every pooled VM is restored to.
pub const CLEAN_SNAPSHOT: &str = "mpool-clean";

/// Marks, inside a VM, that the pool's setup commands ran (so running them again is skipped).
const SETUP_MARKER: &str = ".mpool/setup-done";

/// What plans run with.
#[derive(Clone)]
pub struct Ctx {
    /// Daemon and SSH.
    pub ports: Ports,
    /// The daemon scheduler.
    pub sched: Scheduler,
    /// The isolation probe (`None`: off).
    pub prober: Option<Arc<Prober>>,
}

/// One run of a plan on one VM.
pub struct Run<'a> {
    /// The VM.
    pub vm: &'a str,
    /// Its pool.
    pub pool: &'a PoolConfig,
    /// Priority of its daemon calls.
    pub priority: Priority,
    /// Leave it running at the end.
    pub hot: bool,
    /// Its pool's waiting callers: a VM they wait for stays running when it is up (suspending
    /// it only to resume it for them would cost a suspend and a resume).
    pub waiting: Option<&'a AtomicUsize>,
    /// Another idle running VM the isolation probe may try.
    pub peer: Option<&'a (String, SshEndpoint)>,
}

impl Ctx {
    async fn daemon<T>(
        &self,
        p: Priority,
        vm: &str,
        op: Op,
        fut: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        self.sched.run(p, vm, op, fut).await
    }

    /// What the daemon reports about `vm`: its state and whether its clean snapshot exists.
    pub async fn observe(&self, p: Priority, vm: &str) -> Result<Facts, StepError> {
        let list = self.daemon(p, vm, Op::Quick, self.ports.daemon.list()).await?;
        let state = list.iter().find(|o| o.name == vm).map(|o| o.state);
        let clean_snapshot = match state {
            Some(InstanceState::Deleted) | None => false,
            Some(_) => {
                let snaps = self.daemon(p, vm, Op::Quick, self.ports.daemon.snapshots()).await?;
                snaps.iter().any(|(i, s)| i == vm && s == CLEAN_SNAPSHOT)
            }
        };
        Ok(Facts { state, clean_snapshot })
    }

    /// Runs the steps of `plan` that `facts` still call for; returns the SSH endpoint when the
    /// VM is left running.
    pub async fn execute(
        &self,
        run: &Run<'_>,
        plan: &[Step],
        mut facts: Facts,
    ) -> Result<Option<SshEndpoint>, StepError> {
        let mut ssh = None;
        for step in plan {
            let stay_up = run.hot || run.waiting.is_some_and(|w| w.load(Ordering::Relaxed) > 0);
            if !step.should_do(&facts, stay_up) {
                continue;
            }
            if let Some(info) = self.step(run, step).await? {
                ssh = Some(info);
            }
            step.leaves(&mut facts);
            if facts.state != Some(InstanceState::Running) {
                ssh = None;
            }
        }
        Ok(ssh)
    }

    /// Runs one step.
    async fn step(&self, run: &Run<'_>, step: &Step) -> Result<Option<SshEndpoint>, StepError> {
        let (p, vm, daemon) = (run.priority, run.vm, &self.ports.daemon);
        match step {
            Step::Purge | Step::Delete => {
                self.ports.ssh.forget(vm.into()).await;
                self.daemon(p, vm, Op::Blocking, daemon.delete(vm.into())).await?;
            }
            Step::Launch => {
                self.daemon(p, vm, Op::Quick, daemon.launch(launch_options(vm, run.pool))).await?;
            }
            Step::CloneFrom(src) => {
                self.daemon(p, vm, Op::Blocking, daemon.clone_vm(src.clone(), vm.into())).await?;
            }
            Step::Setup => self.setup(run).await?,
            Step::StopForSnapshot | Step::StopForce => {
                self.ports.ssh.forget(vm.into()).await;
                let force = *step == Step::StopForce;
                self.daemon(p, vm, Op::Blocking, daemon.stop(vm.into(), force)).await?;
            }
            Step::Snapshot => {
                self.daemon(p, vm, Op::Blocking, daemon.snapshot(vm.into(), CLEAN_SNAPSHOT.into())).await?;
            }
            Step::Restore => {
                self.daemon(p, vm, Op::Blocking, daemon.restore(vm.into(), CLEAN_SNAPSHOT.into())).await?;
            }
            Step::Resize(settings) => {
                for (key, value) in settings {
                    self.daemon(p, vm, Op::Blocking, daemon.set_instance(key.clone(), value.clone())).await?;
                }
            }
            Step::DropSnapshot => {
                let drop = daemon.delete_snapshot(vm.into(), CLEAN_SNAPSHOT.into());
                self.daemon(p, vm, Op::Blocking, drop).await?;
            }
            Step::Start => self.daemon(p, vm, Op::Quick, daemon.start(vm.into())).await?,
            Step::Ready => {
                let info = self.ready(p, vm).await?;
                // The periodic isolation probe, never while a caller waits for this plan.
                if matches!(p, Priority::Provision | Priority::Reset) {
                    self.probe(vm, &info, run.peer, false).await;
                }
                return Ok(Some(info));
            }
            Step::Suspend => {
                self.ports.ssh.forget(vm.into()).await;
                self.daemon(p, vm, Op::Blocking, daemon.suspend(vm.into())).await?;
            }
        }
        Ok(None)
    }

    /// Runs the pool's setup commands unless they already ran in this VM (a marker file says
    /// so), then leaves the marker.
    async fn setup(&self, run: &Run<'_>) -> Result<(), StepError> {
        self.daemon(run.priority, run.vm, Op::Quick, self.ports.daemon.start(run.vm.into())).await?;
        let info = self.ready(run.priority, run.vm).await?;
        let script = format!(
            "if [ -e {SETUP_MARKER} ]; then exit 0; fi\nset -e\n{}\nmkdir -p .mpool && touch {SETUP_MARKER}\n",
            run.pool.setup.join("\n")
        );
        self.ports.ssh.run_script(run.vm.into(), info, script).await
    }

    /// Runs the isolation probe from `vm` when it is due, or (`required`: a pool that requires
    /// isolation is about to hand `vm` out) whenever the verdict is not a current "isolated".
    pub async fn probe(&self, vm: &str, info: &SshEndpoint, peer: Option<&(String, SshEndpoint)>, required: bool) {
        let Some(prober) = &self.prober else {
            return;
        };
        let now = tokio::time::Instant::now().into_std();
        let run = if required { !prober.isolated_now(now) } else { prober.claim(now) };
        if run {
            let wall_ms = self.ports.clock.wall_ms();
            prober.run(self.ports.ssh.as_ref(), vm, info, peer, now, wall_ms).await;
        }
    }

    /// The isolation probe's verdict the state has not heard yet.
    pub fn isolation_news(&self) -> Option<mpool_core::pool::state::Input> {
        self.prober.as_ref().and_then(|p| p.news())
    }

    /// SSH endpoint, then a readiness check over SSH.
    async fn ready(&self, p: Priority, vm: &str) -> Result<SshEndpoint, StepError> {
        let info = self.daemon(p, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await?;
        self.ports.ssh.ready(vm.into(), info.clone()).await?;
        Ok(info)
    }

    /// Starts (resumes) a VM for a caller and checks it answers over SSH.
    pub async fn wake(&self, vm: &str) -> Result<SshEndpoint, StepError> {
        // No new daemon-blocking operation starts until the daemon's part is done: the resume's
        // clock sync and ssh_info take the daemon's lock and would each wait for it.
        let hold = self.sched.hold();
        self.daemon(Priority::Acquire, vm, Op::Quick, self.ports.daemon.start(vm.into())).await?;
        let info = self.daemon(Priority::Acquire, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await?;
        drop(hold);
        self.ports.ssh.ready(vm.into(), info.clone()).await?;
        Ok(info)
    }

    /// The SSH endpoint of a running VM (a holder's VM after a restart).
    pub async fn endpoint(&self, vm: &str) -> Result<SshEndpoint, StepError> {
        self.daemon(Priority::Acquire, vm, Op::Quick, self.ports.daemon.ssh_info(vm.into())).await
    }

    /// Checks a hot VM still answers (the periodic health check: a full check over SSH).
    pub async fn check(&self, vm: &str, info: Option<SshEndpoint>) -> Result<SshEndpoint, StepError> {
        match info {
            Some(info) => {
                self.ports.ssh.ready(vm.into(), info.clone()).await?;
                Ok(info)
            }
            None => self.ready(Priority::Reset, vm).await,
        }
    }

    /// Checks a hot VM still answers before it is handed to a caller: one round trip on its
    /// pooled connection. The full check (`true` over SSH) ran when the VM was parked and runs
    /// again at every health check; this proves it is still up now, without starting a process
    /// in it.
    pub async fn check_alive(&self, vm: &str, info: Option<SshEndpoint>) -> Result<SshEndpoint, StepError> {
        match info {
            Some(info) => {
                self.ports.ssh.alive(vm.into(), info.clone()).await?;
                Ok(info)
            }
            None => self.ready(Priority::Acquire, vm).await,
        }
    }

    /// Deletes and purges a VM.
    pub async fn destroy(&self, p: Priority, vm: &str) -> Result<(), StepError> {
        self.ports.ssh.forget(vm.into()).await;
        self.daemon(p, vm, Op::Blocking, self.ports.daemon.delete(vm.into())).await
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
