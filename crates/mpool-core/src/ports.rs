//! The engine's ports: what it needs from the daemon, SSH, the wall clock and a source of random
//! names, as traits, so the pool runs against multipassd, the simulator, or scripted fakes in
//! tests. The adapters live with what they adapt: `mpool_multipass::port`, `mpool_ssh::port`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::types::{InstanceState, LaunchOptions, SshEndpoint};

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
    /// Deletes one snapshot of an instance, permanently (a missing snapshot is not an error).
    fn delete_snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>>;
    /// SSH endpoint of a running instance.
    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshEndpoint, StepError>>;
    /// Writes a per-instance setting (`local.<vm>.cpus|memory|disk`) of a stopped instance
    /// (no daemon restart). A port that cannot refuses, so a resize fails rather than lies.
    fn set_instance(&self, key: String, value: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move { Err(StepError::failed(format!("this daemon port cannot set {key}={value}"))) })
    }
}

/// What the engine asks of SSH.
pub trait SshPort: Send + Sync + 'static {
    /// The VM answers over SSH (opening or reusing the pooled connection).
    fn ready(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<(), StepError>>;
    /// The VM still answers: a round trip on its open pooled connection when there is one,
    /// else (or if that fails) a full [`SshPort::ready`] check.
    fn alive(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<(), StepError>> {
        self.ready(vm, info)
    }
    /// Runs a setup script in the VM; a non-zero exit is an error carrying its output tail.
    fn run_script(&self, vm: String, info: SshEndpoint, script: String) -> BoxFut<'_, Result<(), StepError>>;
    /// Runs a bash script in the VM and returns what it printed on stdout (for probes whose
    /// answer is their output; a non-zero exit is an error).
    fn output(&self, vm: String, info: SshEndpoint, script: String) -> BoxFut<'_, Result<String, StepError>>;
    /// Bytes used on the VM's root filesystem (`df` in the guest, over the pooled connection).
    fn disk_used(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<u64, StepError>>;
    /// Drops the VM's pooled connection (it stopped, suspended, was reset or deleted).
    fn forget(&self, vm: String) -> BoxFut<'_, ()>;
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
