//! The engine's ports: what it needs from the daemon and from SSH, as traits, so the pool core
//! runs against multipassd (through `multipass::Client`), the simulator, or a scripted fake in
//! unit tests. Adapters for the real parts live at the bottom of this file.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::multipass::{self, Client, InstanceState, LaunchOptions, Names, SshInfo};

/// A boxed, sendable future (the ports are used as trait objects).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A failed step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// The daemon was unreachable or did not answer in time: retry later, the VM is not at fault.
    pub unavailable: bool,
    /// The daemon said the instance (or snapshot) does not exist.
    pub not_found: bool,
    /// What happened.
    pub message: String,
}

impl StepError {
    /// A failure that is the VM's (or the step's) fault.
    pub fn failed(message: impl Into<String>) -> StepError {
        StepError { unavailable: false, not_found: false, message: message.into() }
    }

    /// The daemon is down or frozen.
    pub fn unavailable(message: impl Into<String>) -> StepError {
        StepError { unavailable: true, not_found: false, message: message.into() }
    }
}

impl From<multipass::Error> for StepError {
    fn from(e: multipass::Error) -> StepError {
        StepError {
            unavailable: e.is_unavailable(),
            not_found: e.code() == tonic::Code::NotFound,
            message: e.to_string(),
        }
    }
}

/// An instance as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Name.
    pub name: String,
    /// State.
    pub state: InstanceState,
}

/// What the engine asks of multipassd. Every call has a deadline (the adapter's).
pub trait DaemonPort: Send + Sync + 'static {
    /// Cheap liveness probe.
    fn ping(&self) -> BoxFut<'_, Result<(), StepError>>;
    /// All instances (no IP collection).
    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>>;
    /// All snapshots as (instance, snapshot).
    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>>;
    /// Creates and starts an instance.
    fn launch(&self, opts: LaunchOptions) -> BoxFut<'_, Result<(), StepError>>;
    /// Starts or resumes.
    fn start(&self, name: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Stops (forced: kill, discarding any suspend image).
    fn stop(&self, name: String, force: bool) -> BoxFut<'_, Result<(), StepError>>;
    /// Suspends.
    fn suspend(&self, name: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Snapshots a stopped instance.
    fn snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Restores a stopped instance, destructively.
    fn restore(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Clones a stopped instance.
    fn clone_vm(&self, source: String, destination: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Deletes and purges (a missing instance is not an error).
    fn delete(&self, name: String) -> BoxFut<'_, Result<(), StepError>>;
    /// SSH endpoint of a running instance.
    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshInfo, StepError>>;
}

/// What the engine asks of SSH.
pub trait SshPort: Send + Sync + 'static {
    /// The VM answers over SSH (opening or reusing the pooled connection).
    fn ready(&self, vm: String, info: SshInfo) -> BoxFut<'_, Result<(), StepError>>;
    /// The VM still answers: a round trip on its open pooled connection when there is one,
    /// else (or if that fails) a full [`SshPort::ready`] check.
    fn alive(&self, vm: String, info: SshInfo) -> BoxFut<'_, Result<(), StepError>> {
        self.ready(vm, info)
    }
    /// Runs a setup script in the VM; a non-zero exit is an error carrying its output tail.
    fn run_script(&self, vm: String, info: SshInfo, script: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Drops the VM's pooled connection (it stopped, suspended, was reset or deleted).
    fn forget(&self, vm: String) -> BoxFut<'_, ()>;
}

/// The daemon port over a real `multipass::Client`: quick calls and blocking calls get their
/// own deadlines.
pub struct MultipassPort {
    quick: Client,
    slow: Client,
    metrics: crate::metrics::Metrics,
}

impl MultipassPort {
    /// Wraps a connected client.
    pub fn new(client: Client, quick: Duration, slow: Duration) -> MultipassPort {
        MultipassPort {
            quick: client.with_timeout(quick),
            slow: client.with_timeout(slow),
            metrics: crate::metrics::Metrics::default(),
        }
    }

    /// Records each call's latency and failures into `metrics`.
    pub fn with_metrics(self, metrics: crate::metrics::Metrics) -> MultipassPort {
        MultipassPort { metrics, ..self }
    }

    /// Runs one daemon call, timing it.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        let t = std::time::Instant::now();
        let r = fut.await;
        self.metrics.observe("mpool_daemon_call_seconds", vec![("op", op.into())], t.elapsed());
        if r.is_err() {
            self.metrics.count("mpool_daemon_call_errors_total", vec![("op", op.into())], 1);
        }
        r
    }
}

impl DaemonPort for MultipassPort {
    fn ping(&self) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("ping", async move { Ok(self.quick.ping().await?) }))
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>> {
        Box::pin(self.timed("list", async move {
            Ok(self.quick.list().await?.into_iter().map(|i| Observed { name: i.name, state: i.state }).collect())
        }))
    }

    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>> {
        Box::pin(self.timed("snapshots", async move {
            Ok(self.quick.list_snapshots().await?.into_iter().map(|s| (s.instance, s.name)).collect())
        }))
    }

    fn launch(&self, opts: LaunchOptions) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("launch", async move {
            self.slow.launch(&opts).await?;
            Ok(())
        }))
    }

    fn start(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("start", async move { Ok(self.slow.start(&Names::one(name), 0).await?) }))
    }

    fn stop(&self, name: String, force: bool) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("stop", async move { Ok(self.slow.stop(&Names::one(name), force).await?) }))
    }

    fn suspend(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("suspend", async move { Ok(self.slow.suspend(&Names::one(name)).await?) }))
    }

    fn snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("snapshot", async move {
            self.slow.snapshot(&name, Some(&snapshot), "mpool clean state").await?;
            Ok(())
        }))
    }

    fn restore(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("restore", async move { Ok(self.slow.restore(&name, &snapshot, true).await?) }))
    }

    fn clone_vm(&self, source: String, destination: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("clone", async move { Ok(self.slow.clone_instance(&source, &destination).await?) }))
    }

    fn delete(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("delete", async move {
            match self.slow.delete(&Names::one(name), true).await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        }))
    }

    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshInfo, StepError>> {
        Box::pin(self.timed("ssh_info", async move { Ok(self.quick.ssh_info(&name).await?) }))
    }
}

/// The wall clock, as the engine reads it (leases carry wall-clock expiry times so they survive
/// a restart). Tests drive it with virtual time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in unix milliseconds.
    fn wall_ms(&self) -> u64;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Where the engine gets the random parts of instance names and lease ids. Tests use a
/// counter, so a failing script replays exactly.
pub trait Ids: Send + Sync + 'static {
    /// Six characters from `[a-z2-9]` without look-alikes.
    fn suffix(&self) -> String;
}

/// Random suffixes.
pub struct RandomIds;

/// The alphabet of suffixes: lower-case letters and digits without `l`, `o`, `0` and `1`.
pub const SUFFIX_ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";

impl Ids for RandomIds {
    fn suffix(&self) -> String {
        (0..6).map(|_| SUFFIX_ALPHABET[rand::random_range(0..SUFFIX_ALPHABET.len())] as char).collect()
    }
}

/// Shared handles to the ports.
#[derive(Clone)]
pub struct Ports {
    /// The daemon.
    pub daemon: Arc<dyn DaemonPort>,
    /// SSH.
    pub ssh: Arc<dyn SshPort>,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// Random name parts.
    pub ids: Arc<dyn Ids>,
}

impl Ports {
    /// The daemon and SSH ports, with the system clock.
    pub fn new(daemon: Arc<dyn DaemonPort>, ssh: Arc<dyn SshPort>) -> Ports {
        Ports { daemon, ssh, clock: Arc::new(SystemClock), ids: Arc::new(RandomIds) }
    }
}

/// The SSH endpoint of `ssh_info` as the SSH module wants it.
pub fn ssh_target(info: &SshInfo) -> crate::ssh::SshTarget {
    crate::ssh::SshTarget {
        host: info.host.clone(),
        port: info.port,
        username: info.username.clone(),
        private_key: info.private_key.clone(),
    }
}

/// The SSH port over the pooled connections of [`crate::ssh::ConnectionCache`], keyed by VM
/// name: the connection a readiness check opens is the one the lease's commands then use.
pub struct SshAdapter {
    cache: Arc<crate::ssh::ConnectionCache>,
}

impl SshAdapter {
    /// Wraps the cache.
    pub fn new(cache: Arc<crate::ssh::ConnectionCache>) -> SshAdapter {
        SshAdapter { cache }
    }
}

impl SshPort for SshAdapter {
    fn ready(&self, vm: String, info: SshInfo) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let out = self
                .cache
                .run(&vm, &ssh_target(&info), crate::ssh::ExecRequest::argv(["true"]))
                .await
                .map_err(|e| StepError::failed(format!("{vm} does not answer over SSH: {e}")))?;
            out.check().map_err(|e| StepError::failed(format!("{vm} readiness check: {e}")))
        })
    }

    fn alive(&self, vm: String, info: SshInfo) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            match self.cache.ping(&vm, Duration::from_secs(5)).await {
                Some(Ok(())) => Ok(()),
                // No open connection, or it failed: reconnect and run `true`.
                Some(Err(_)) | None => self.ready(vm, info).await,
            }
        })
    }

    fn run_script(&self, vm: String, info: SshInfo, script: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let req = crate::ssh::ExecRequest::script(crate::ssh::ScriptShell::Bash, script);
            let out = self
                .cache
                .run(&vm, &ssh_target(&info), req)
                .await
                .map_err(|e| StepError::failed(format!("setup of {vm}: {e}")))?;
            if out.success() {
                return Ok(());
            }
            let tail: String =
                out.stderr_text().chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            Err(StepError::failed(format!(
                "setup of {vm} failed ({}): {tail}",
                out.check().err().map(|e| e.to_string()).unwrap_or_default()
            )))
        })
    }

    fn forget(&self, vm: String) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.cache.close(&vm).await;
        })
    }
}
