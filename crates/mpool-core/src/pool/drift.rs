//! What the daemon's view of an idle VM means, when no plan is working on it: the periodic
//! observation compares each VM's state in the engine with the instance's state in multipassd.

use std::time::Duration;

use crate::types::InstanceState;

use super::vm::VmState;

/// What an observation means for one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// As expected (or not the engine's business now).
    Fine,
    /// The instance is gone from the daemon.
    Gone,
    /// Starting or restarting, e.g. resumed or rebooted by a daemon restart: wait for it (its
    /// SSH host key may be new after a cold boot, so its pooled connection is dropped).
    Transient,
    /// A hot VM that is running: check it over SSH.
    Check,
    /// A suspended VM found running (a daemon restart resumed it): reset it to be sure.
    Doubt,
    /// An idle VM in an unexpected state, or transient for too long: replace it.
    Broken(InstanceState),
}

/// Classifies one VM: its state in the engine, the daemon's state of its instance (`None`:
/// not listed), and how long it has been transient so far (`limit`: how long that may last).
pub fn classify(vm: VmState, seen: Option<InstanceState>, transient_for: Option<Duration>, limit: Duration) -> Drift {
    use InstanceState as S;
    match (vm, seen) {
        (VmState::Deleting, None) => Drift::Fine,
        (_, None) => Drift::Gone,
        (VmState::Hot | VmState::Warm, Some(s @ (S::Starting | S::Restarting))) => {
            if transient_for.is_some_and(|t| t > limit) { Drift::Broken(s) } else { Drift::Transient }
        }
        (VmState::Hot, Some(S::Running)) => Drift::Check,
        (VmState::Warm, Some(S::Suspended)) => Drift::Fine,
        (VmState::Warm, Some(S::Running)) => Drift::Doubt,
        (VmState::Warm | VmState::Hot, Some(s)) => Drift::Broken(s),
        _ => Drift::Fine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState as S;

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn idle_vms_as_expected_are_fine_or_checked() {
        assert_eq!(classify(VmState::Warm, Some(S::Suspended), None, LIMIT), Drift::Fine);
        assert_eq!(classify(VmState::Hot, Some(S::Running), None, LIMIT), Drift::Check);
        assert_eq!(classify(VmState::Leased, Some(S::Stopped), None, LIMIT), Drift::Fine, "a holder's VM is its own");
    }

    #[test]
    fn a_daemon_restart_is_waited_for_then_resets_resumed_vms() {
        for s in [S::Starting, S::Restarting] {
            assert_eq!(classify(VmState::Warm, Some(s), None, LIMIT), Drift::Transient);
            assert_eq!(classify(VmState::Hot, Some(s), Some(Duration::from_secs(30)), LIMIT), Drift::Transient);
            assert_eq!(classify(VmState::Hot, Some(s), Some(Duration::from_secs(61)), LIMIT), Drift::Broken(s));
        }
        assert_eq!(classify(VmState::Warm, Some(S::Running), None, LIMIT), Drift::Doubt);
    }

    #[test]
    fn vanished_or_tampered_vms() {
        assert_eq!(classify(VmState::Warm, None, None, LIMIT), Drift::Gone);
        assert_eq!(classify(VmState::Leased, None, None, LIMIT), Drift::Gone);
        assert_eq!(classify(VmState::Deleting, None, None, LIMIT), Drift::Fine);
        assert_eq!(classify(VmState::Hot, Some(S::Stopped), None, LIMIT), Drift::Broken(S::Stopped));
        assert_eq!(classify(VmState::Warm, Some(S::Stopped), None, LIMIT), Drift::Broken(S::Stopped));
    }
}
