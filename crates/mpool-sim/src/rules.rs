//! multipassd's state rules as plain functions: which operation is allowed in which state, what
//! it does there, and the exact status code and message when it is refused (reference §7, §3.3).
//! No I/O: the daemon core asks these before it acts.

use serde::{Deserialize, Serialize};
use tonic::Code;

use mpool_multipass::proto::multipass::instance_status::Status;

/// An instance's state inside the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Powered off.
    Stopped,
    /// Booting or resuming.
    Starting,
    /// Running, SSH endpoint up.
    Running,
    /// Rebooting.
    Restarting,
    /// Running with a shutdown scheduled.
    DelayedShutdown,
    /// Saving memory state.
    Suspending,
    /// Memory state saved.
    Suspended,
}

impl VmState {
    /// The wire status.
    pub fn status(self) -> Status {
        match self {
            VmState::Stopped => Status::Stopped,
            VmState::Starting => Status::Starting,
            VmState::Running => Status::Running,
            VmState::Restarting => Status::Restarting,
            VmState::DelayedShutdown => Status::DelayedShutdown,
            VmState::Suspending => Status::Suspending,
            VmState::Suspended => Status::Suspended,
        }
    }

    /// Running or about to shut down: SSH works.
    pub fn is_up(self) -> bool {
        matches!(self, VmState::Running | VmState::DelayedShutdown)
    }
}

/// A refusal: the gRPC code and multipassd's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Status code.
    pub code: Code,
    /// Message, as multipassd words it.
    pub message: String,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }

    /// `instance "x" does not exist` (NOT_FOUND).
    pub fn missing(name: &str) -> Refusal {
        Refusal::new(Code::NotFound, format!("instance \"{name}\" does not exist"))
    }

    /// `instance "x" is deleted` (INVALID_ARGUMENT).
    pub fn deleted(name: &str) -> Refusal {
        Refusal::new(Code::InvalidArgument, format!("instance \"{name}\" is deleted"))
    }

    /// `instance "x" already exists` (INVALID_ARGUMENT).
    pub fn exists(name: &str) -> Refusal {
        Refusal::new(Code::InvalidArgument, format!("instance \"{name}\" already exists"))
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        tonic::Status::new(r.code, r.message)
    }
}

/// multipass's `utils::valid_hostname`: `^([a-zA-Z]|[a-zA-Z][a-zA-Z0-9\-]*[a-zA-Z0-9])$`.
pub fn valid_hostname(name: &str) -> bool {
    let b = name.as_bytes();
    match b {
        [] => false,
        [c] => c.is_ascii_alphabetic(),
        [first, middle @ .., last] => {
            first.is_ascii_alphabetic()
                && last.is_ascii_alphanumeric()
                && middle.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        }
    }
}

pub use mpool_multipass::sizes::{DEFAULT_DISK, DEFAULT_MEMORY, MIN_DISK, MIN_MEMORY, parse_size};

/// What `start` does to an instance in a given state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPlan {
    /// Boot from stopped.
    Boot,
    /// Resume from suspended (start *is* the resume operation).
    Resume,
    /// Already running: nothing.
    Nothing,
    /// Starting or restarting: wait for the running start.
    Join,
    /// Delayed shutdown: cancel it.
    CancelShutdown,
}

/// The start rule.
pub fn start(name: &str, state: VmState) -> Result<StartPlan, Refusal> {
    match state {
        VmState::Stopped => Ok(StartPlan::Boot),
        VmState::Suspended => Ok(StartPlan::Resume),
        VmState::Running => Ok(StartPlan::Nothing),
        VmState::Starting | VmState::Restarting => Ok(StartPlan::Join),
        VmState::DelayedShutdown => Ok(StartPlan::CancelShutdown),
        VmState::Suspending => {
            Err(Refusal::new(Code::FailedPrecondition, format!("Cannot start the instance '{name}' while suspending.")))
        }
    }
}

/// What `stop` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopPlan {
    /// Power down and wait for the guest.
    Graceful,
    /// Kill (discarding any suspend image).
    Force,
    /// Already stopped: nothing.
    Nothing,
}

/// The stop rule.
pub fn stop(name: &str, state: VmState, force: bool) -> Result<StopPlan, Refusal> {
    match (state, force) {
        (VmState::Stopped, _) => Ok(StopPlan::Nothing),
        (_, true) => Ok(StopPlan::Force),
        (VmState::Running | VmState::DelayedShutdown, false) => Ok(StopPlan::Graceful),
        (VmState::Suspended, false) => {
            Err(Refusal::new(Code::FailedPrecondition, format!("Cannot shut down suspended instance {name}.")))
        }
        (VmState::Suspending, false) => {
            Err(Refusal::new(Code::FailedPrecondition, format!("Cannot shut down instance {name} while suspending.")))
        }
        (VmState::Starting | VmState::Restarting, false) => {
            Err(Refusal::new(Code::FailedPrecondition, format!("Cannot shut down instance {name} while starting.")))
        }
    }
}

/// The suspend rule: true to suspend, false to ignore (stopped or already suspended).
pub fn suspend(name: &str, state: VmState) -> Result<bool, Refusal> {
    match state {
        VmState::Running | VmState::DelayedShutdown => Ok(true),
        VmState::Stopped | VmState::Suspended => Ok(false),
        VmState::Starting | VmState::Restarting | VmState::Suspending => Err(Refusal::new(
            Code::FailedPrecondition,
            format!("Cannot suspend instance {name} while it is {}.", state.status().as_str_name().to_lowercase()),
        )),
    }
}

/// The restart rule: only running or delayed-shutdown instances; anything else gets
/// multipassd's (odd but real) "already running, but in an unknown state" (reference §0.3).
pub fn restart(name: &str, state: VmState) -> Result<(), Refusal> {
    if state.is_up() {
        Ok(())
    } else {
        Err(Refusal::new(
            Code::FailedPrecondition,
            format!(
                "Instance '{name}' is already running, but in an unknown state.\nTry to stop and start it instead."
            ),
        ))
    }
}

/// The snapshot rule: stopped only (suspended is not accepted).
pub fn snapshot(state: VmState) -> Result<(), Refusal> {
    if state == VmState::Stopped {
        Ok(())
    } else {
        Err(Refusal::new(Code::FailedPrecondition, "Multipass can only take snapshots of stopped instances."))
    }
}

/// The restore rule: stopped only (checked after the snapshot's existence).
pub fn restore(state: VmState) -> Result<(), Refusal> {
    if state == VmState::Stopped {
        Ok(())
    } else {
        Err(Refusal::new(Code::FailedPrecondition, "Multipass can only restore snapshots of stopped instances."))
    }
}

/// The clone rule: stopped only.
pub fn clone(state: VmState) -> Result<(), Refusal> {
    if state == VmState::Stopped {
        Ok(())
    } else {
        Err(Refusal::new(Code::FailedPrecondition, "Multipass can only clone stopped instances."))
    }
}

/// The ssh_info/exec rule: running or delayed shutdown.
pub fn ssh(name: &str, state: VmState) -> Result<(), Refusal> {
    if state.is_up() { Ok(()) } else { Err(Refusal::new(Code::Aborted, format!("instance \"{name}\" is not running"))) }
}

/// A snapshot name check: valid hostname, else INVALID_ARGUMENT.
pub fn snapshot_name(name: &str) -> Result<(), Refusal> {
    if valid_hostname(name) {
        Ok(())
    } else {
        Err(Refusal::new(Code::InvalidArgument, format!("Invalid snapshot name: \"{name}\".")))
    }
}

/// The refusal for a snapshot name already taken on `instance`.
pub fn snapshot_taken(instance: &str, name: &str) -> Refusal {
    Refusal::new(Code::InvalidArgument, format!("Snapshot name taken: {instance}.{name}"))
}

/// The refusal for a missing snapshot.
pub fn no_such_snapshot(instance: &str, name: &str) -> Refusal {
    Refusal::new(Code::NotFound, format!("No such snapshot: {instance}.{name}"))
}

/// A clone destination check.
pub fn clone_destination(name: &str) -> Result<(), Refusal> {
    if valid_hostname(name) {
        Ok(())
    } else {
        Err(Refusal::new(Code::InvalidArgument, format!("Invalid destination instance name: \"{name}\".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_follow_multipass() {
        for ok in ["a", "vm1", "mpool-ci-3", "A-b-C"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "1vm", "vm-", "-vm", "vm_1", "vm.1", "vm 1", "é"] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn start_resumes_suspended_and_refuses_suspending() {
        assert_eq!(start("a", VmState::Suspended), Ok(StartPlan::Resume));
        assert_eq!(start("a", VmState::Stopped), Ok(StartPlan::Boot));
        assert_eq!(start("a", VmState::Running), Ok(StartPlan::Nothing));
        assert_eq!(start("a", VmState::Starting), Ok(StartPlan::Join));
        assert_eq!(start("a", VmState::Suspending).unwrap_err().code, Code::FailedPrecondition);
    }

    #[test]
    fn stop_of_suspended_needs_force() {
        let r = stop("a", VmState::Suspended, false).unwrap_err();
        assert_eq!(r, Refusal::new(Code::FailedPrecondition, "Cannot shut down suspended instance a."));
        assert_eq!(stop("a", VmState::Suspended, true), Ok(StopPlan::Force));
        assert_eq!(stop("a", VmState::Stopped, true), Ok(StopPlan::Nothing));
        assert_eq!(stop("a", VmState::Running, false), Ok(StopPlan::Graceful));
        assert_eq!(stop("a", VmState::Starting, false).unwrap_err().code, Code::FailedPrecondition);
    }

    #[test]
    fn suspend_of_stopped_is_ignored() {
        assert_eq!(suspend("a", VmState::Stopped), Ok(false));
        assert_eq!(suspend("a", VmState::Suspended), Ok(false));
        assert_eq!(suspend("a", VmState::Running), Ok(true));
    }

    #[test]
    fn snapshot_restore_clone_need_stopped() {
        for s in [VmState::Running, VmState::Suspended, VmState::Starting] {
            assert_eq!(snapshot(s).unwrap_err().message, "Multipass can only take snapshots of stopped instances.");
            assert_eq!(restore(s).unwrap_err().code, Code::FailedPrecondition);
            assert_eq!(clone(s).unwrap_err().message, "Multipass can only clone stopped instances.");
        }
        assert!(
            snapshot(VmState::Stopped).is_ok() && restore(VmState::Stopped).is_ok() && clone(VmState::Stopped).is_ok()
        );
    }

    #[test]
    fn ssh_needs_running() {
        assert!(ssh("a", VmState::Running).is_ok());
        let r = ssh("a", VmState::Suspended).unwrap_err();
        assert_eq!((r.code, r.message.as_str()), (Code::Aborted, "instance \"a\" is not running"));
    }
}
