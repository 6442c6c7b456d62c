//! What a plan's outcome means for its VM: the event the state machine gets.

use super::vm::{Event, VmState};

/// The kinds of plan the engine runs on a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// Build a new VM (or resume an interrupted build), parked hot or warm.
    Provision {
        /// Park it running.
        hot: bool,
    },
    /// Make a used VM clean again, parked hot or warm.
    Reset {
        /// Park it running.
        hot: bool,
    },
    /// Resize an idle VM in place (its clean snapshot retaken), parked hot or warm.
    Resize {
        /// Park it running.
        hot: bool,
    },
    /// Move an idle VM between hot and warm.
    Park {
        /// To hot.
        hot: bool,
    },
    /// Start (or check) an idle VM for a waiting caller.
    Wake,
    /// The periodic health check of a hot VM: it stays hot (and counted) meanwhile.
    Check,
    /// Delete and purge.
    Destroy,
    /// Read a leased VM's SSH endpoint again (after a restart, or when SSH fails).
    Refresh,
}

/// The event of a plan that succeeded (`running`: the VM was left running); `None` when the
/// VM's state does not change (checks, refreshes) or the caller handles it (a wake).
pub fn on_success(plan: PlanKind, state: VmState, running: bool) -> Option<Event> {
    match plan {
        PlanKind::Provision { .. } | PlanKind::Reset { .. } if state == VmState::Provisioning => {
            Some(Event::Provisioned { hot: running })
        }
        PlanKind::Provision { .. } | PlanKind::Reset { .. } | PlanKind::Resize { .. } => {
            Some(Event::ResetDone { hot: running })
        }
        PlanKind::Park { hot } => Some(Event::Parked { hot }),
        PlanKind::Destroy => Some(Event::Deleted),
        PlanKind::Wake | PlanKind::Check | PlanKind::Refresh => None,
    }
}

/// The event of a plan that failed (`unavailable`: the daemon was down or cut the call, so the
/// VM is not at fault); `None` when the VM stays as it is.
pub fn on_failure(plan: PlanKind, state: VmState, unavailable: bool) -> Option<Event> {
    match (unavailable, plan) {
        (_, PlanKind::Refresh) | (true, PlanKind::Destroy | PlanKind::Check) => None,
        // The same plan runs again once the daemon is back, reading what was done first.
        (true, _) if matches!(state, VmState::Resetting | VmState::Provisioning) => None,
        // Its state is unknown: reset it to be sure.
        (true, _) => Some(Event::Doubt),
        (false, _) => Some(Event::Fail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_resets_park_as_they_were_left() {
        assert_eq!(
            on_success(PlanKind::Provision { hot: true }, VmState::Provisioning, true),
            Some(Event::Provisioned { hot: true })
        );
        assert_eq!(
            on_success(PlanKind::Reset { hot: false }, VmState::Resetting, true),
            Some(Event::ResetDone { hot: true }),
            "callers waited"
        );
        assert_eq!(
            on_success(PlanKind::Park { hot: false }, VmState::Parking, false),
            Some(Event::Parked { hot: false })
        );
        assert_eq!(
            on_success(PlanKind::Resize { hot: false }, VmState::Resetting, false),
            Some(Event::ResetDone { hot: false })
        );
        assert_eq!(on_success(PlanKind::Check, VmState::Hot, true), None);
        assert_eq!(on_success(PlanKind::Destroy, VmState::Deleting, false), Some(Event::Deleted));
    }

    #[test]
    fn failures_break_the_vm_unless_the_daemon_was_away() {
        assert_eq!(on_failure(PlanKind::Reset { hot: false }, VmState::Resetting, false), Some(Event::Fail));
        assert_eq!(on_failure(PlanKind::Reset { hot: false }, VmState::Resetting, true), None, "runs again");
        assert_eq!(on_failure(PlanKind::Resize { hot: true }, VmState::Resetting, true), None, "runs again");
        assert_eq!(on_failure(PlanKind::Resize { hot: true }, VmState::Resetting, false), Some(Event::Fail));
        assert_eq!(on_failure(PlanKind::Provision { hot: false }, VmState::Provisioning, true), None, "resumes");
        assert_eq!(on_failure(PlanKind::Park { hot: true }, VmState::Parking, true), Some(Event::Doubt));
        assert_eq!(on_failure(PlanKind::Wake, VmState::Waking, true), Some(Event::Doubt));
        assert_eq!(on_failure(PlanKind::Check, VmState::Hot, true), None);
        assert_eq!(on_failure(PlanKind::Check, VmState::Hot, false), Some(Event::Fail));
        assert_eq!(
            on_failure(PlanKind::Refresh, VmState::Leased, false),
            None,
            "a holder's VM is never broken by a read"
        );
    }
}
