//! A pooled VM's life as a pure state machine: states, events, transitions. No I/O, no clock.
//!
//! ```text
//! Provisioning --Provisioned(hot)--> Hot | Warm
//! Hot  --Lease--> Leased                     (no daemon call)
//! Warm --Wake--> Waking --Woken--> Leased    (start = resume, then SSH answers)
//! Hot  --Wake--> Waking                      (a hot VM's readiness is checked too)
//! Waking --Unclaimed--> Hot                  (the caller left while it woke)
//! Provisioning | Waking | Parking | Hot | Warm --Doubt--> Resetting
//!                                            (its state is unknown: reset it to be sure)
//! Hot  --Park(warm)--> Parking --Parked--> Warm   (and Warm --Park(hot)--> Parking --> Hot)
//! Leased --Release--> Resetting --ResetDone(hot)--> Hot | Warm
//! Hot | Warm --Resize--> Resetting           (resized in place, then parked as after a reset)
//! Hot | Warm | Broken --Retire--> Deleting --Deleted--> (gone)
//! any busy state --Fail--> Broken
//! Golden: the stopped source of a clone pool; only Retire or Fail leave it.
//! ```

use crate::store::PhaseRecord;

/// Where a VM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Being created: launch, setup, clean snapshot, park.
    Provisioning,
    /// Idle and running: acquire costs no daemon call.
    Hot,
    /// Idle and suspended: acquire costs one resume.
    Warm,
    /// Being started for a waiting acquirer.
    Waking,
    /// Leased to a holder.
    Leased,
    /// Being reset after a lease.
    Resetting,
    /// Moving between hot and warm.
    Parking,
    /// Failed; waiting to be deleted and replaced.
    Broken,
    /// Being deleted.
    Deleting,
    /// The stopped source VM of a clone pool.
    Golden,
}

/// What happens to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Provisioning finished; the VM is parked hot (running) or warm (suspended).
    Provisioned {
        /// Parked running.
        hot: bool,
    },
    /// A hot VM is handed out.
    Lease,
    /// A warm VM is started for an acquirer.
    Wake,
    /// It answered over SSH and is handed out.
    Woken,
    /// A hot VM is suspended, or a warm one started, to match the pool's hot count.
    Park {
        /// Target is hot.
        hot: bool,
    },
    /// Parking finished.
    Parked {
        /// Now hot.
        hot: bool,
    },
    /// The woken VM's caller went away; it stays up, idle.
    Unclaimed,
    /// Its state is uncertain (the daemon went away mid-step, or a restart interrupted it).
    Doubt,
    /// The lease ended (released or expired).
    Release,
    /// An idle VM is resized in place (stopped, resized, its clean snapshot retaken).
    Resize,
    /// The reset finished.
    ResetDone {
        /// Parked running.
        hot: bool,
    },
    /// A step failed or timed out, or the VM was found in an unexpected state.
    Fail,
    /// The VM is to be deleted (scale-down, rotation, recycling, broken).
    Retire,
    /// The delete finished.
    Deleted,
}

/// The result of a transition: a new state, or the VM is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The VM moves to this state.
    State(VmState),
    /// The VM no longer exists.
    Gone,
}

/// An event that makes no sense in a state (a bug in the caller, logged and ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {event:?} is not valid in state {state:?}")]
pub struct InvalidTransition {
    /// The state.
    pub state: VmState,
    /// The event.
    pub event: Event,
}

impl VmState {
    /// Idle and ready to be handed out.
    pub fn is_idle(self) -> bool {
        matches!(self, VmState::Hot | VmState::Warm)
    }

    /// Counts toward the pool's `max_size` (everything but the golden source).
    pub fn counts_toward_size(self) -> bool {
        self != VmState::Golden
    }

    /// Will become idle without a lease: provisioning, parking or resetting.
    pub fn is_coming(self) -> bool {
        matches!(self, VmState::Provisioning | VmState::Parking | VmState::Resetting)
    }

    /// The persisted phase.
    pub fn record(self) -> PhaseRecord {
        match self {
            VmState::Provisioning => PhaseRecord::Provisioning,
            VmState::Hot => PhaseRecord::Hot,
            VmState::Warm | VmState::Parking => PhaseRecord::Warm,
            VmState::Waking => PhaseRecord::Starting,
            VmState::Leased => PhaseRecord::Leased,
            VmState::Resetting => PhaseRecord::Resetting,
            VmState::Broken => PhaseRecord::Broken,
            VmState::Deleting => PhaseRecord::Deleting,
            VmState::Golden => PhaseRecord::Golden,
        }
    }
}

/// The transition function.
pub fn transition(state: VmState, event: Event) -> Result<Next, InvalidTransition> {
    use Event as E;
    use VmState as S;
    let parked = |hot: bool| Next::State(if hot { S::Hot } else { S::Warm });
    let next = match (state, event) {
        (S::Provisioning, E::Provisioned { hot }) => parked(hot),
        (S::Hot, E::Lease) => Next::State(S::Leased),
        (S::Warm | S::Hot, E::Wake) => Next::State(S::Waking),
        (S::Waking, E::Unclaimed) => Next::State(S::Hot),
        (S::Provisioning | S::Waking | S::Parking | S::Hot | S::Warm, E::Doubt) => Next::State(S::Resetting),
        (S::Waking, E::Woken) => Next::State(S::Leased),
        (S::Hot, E::Park { hot: false }) | (S::Warm, E::Park { hot: true }) => Next::State(S::Parking),
        (S::Parking, E::Parked { hot }) => parked(hot),
        (S::Leased, E::Release) | (S::Hot | S::Warm, E::Resize) => Next::State(S::Resetting),
        (S::Resetting, E::ResetDone { hot }) => parked(hot),
        (
            S::Provisioning | S::Waking | S::Parking | S::Resetting | S::Hot | S::Warm | S::Golden | S::Leased,
            E::Fail,
        ) => Next::State(S::Broken),
        (S::Hot | S::Warm | S::Broken | S::Golden, E::Retire) => Next::State(S::Deleting),
        (S::Deleting, E::Deleted) => Next::Gone,
        (S::Deleting, E::Fail) => Next::State(S::Broken),
        (state, event) => return Err(InvalidTransition { state, event }),
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use VmState as S;

    fn go(s: S, e: E) -> S {
        match transition(s, e).unwrap() {
            Next::State(s) => s,
            Next::Gone => panic!("gone"),
        }
    }

    #[test]
    fn a_warm_vm_serves_a_lease_and_comes_back_warm() {
        let mut s = S::Provisioning;
        for (e, want) in [
            (E::Provisioned { hot: false }, S::Warm),
            (E::Wake, S::Waking),
            (E::Woken, S::Leased),
            (E::Release, S::Resetting),
            (E::ResetDone { hot: false }, S::Warm),
        ] {
            s = go(s, e);
            assert_eq!(s, want);
        }
    }

    #[test]
    fn a_hot_vm_is_leased_without_waking() {
        assert_eq!(go(S::Hot, E::Lease), S::Leased);
        assert!(transition(S::Warm, E::Lease).is_err(), "warm VMs must be woken first");
        assert_eq!(go(S::Hot, E::Wake), S::Waking, "or checked before they are handed out");
        assert_eq!(go(S::Waking, E::Unclaimed), S::Hot);
        assert_eq!(go(S::Parking, E::Doubt), S::Resetting);
        assert!(transition(S::Leased, E::Doubt).is_err(), "a holder's VM is never reset under it");
        assert_eq!(go(S::Leased, E::Release), S::Resetting);
        assert_eq!(go(S::Resetting, E::ResetDone { hot: true }), S::Hot);
    }

    #[test]
    fn parking_moves_between_hot_and_warm() {
        assert_eq!(go(go(S::Hot, E::Park { hot: false }), E::Parked { hot: false }), S::Warm);
        assert_eq!(go(go(S::Warm, E::Park { hot: true }), E::Parked { hot: true }), S::Hot);
        assert!(transition(S::Hot, E::Park { hot: true }).is_err());
    }

    #[test]
    fn only_idle_vms_are_resized_and_come_back_as_after_a_reset() {
        assert_eq!(go(go(S::Warm, E::Resize), E::ResetDone { hot: false }), S::Warm);
        assert_eq!(go(S::Hot, E::Resize), S::Resetting);
        for s in [S::Leased, S::Waking, S::Resetting, S::Provisioning, S::Parking, S::Golden] {
            assert!(transition(s, E::Resize).is_err(), "{s:?} must not be resized");
        }
    }

    #[test]
    fn leased_and_busy_vms_are_never_retired() {
        for s in [S::Leased, S::Waking, S::Resetting, S::Provisioning, S::Parking] {
            assert!(transition(s, E::Retire).is_err(), "{s:?} must not be reaped");
        }
        assert_eq!(go(S::Warm, E::Retire), S::Deleting);
        assert_eq!(transition(S::Deleting, E::Deleted).unwrap(), Next::Gone);
    }

    #[test]
    fn failures_break_and_broken_vms_are_deleted() {
        for s in [S::Provisioning, S::Waking, S::Resetting, S::Parking, S::Hot, S::Warm, S::Deleting] {
            assert_eq!(go(s, E::Fail), S::Broken);
        }
        assert_eq!(go(S::Broken, E::Retire), S::Deleting);
        assert!(transition(S::Broken, E::Lease).is_err());
    }

    #[test]
    fn counting_rules() {
        assert!(S::Hot.is_idle() && S::Warm.is_idle() && !S::Leased.is_idle());
        assert!(!S::Golden.counts_toward_size() && S::Resetting.counts_toward_size());
        assert!(S::Resetting.is_coming() && !S::Leased.is_coming());
    }
}
