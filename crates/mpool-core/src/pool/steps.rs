//! Plans as lists of idempotent steps, decided from facts: each [`Step`] says from what is known
//! about an instance whether it still has to run ([`Step::should_do`]) and what it leaves behind
//! ([`Step::leaves`]). The same plan run again after a crash, a daemon restart or a failed call
//! skips what was already done (a launched VM whose setup finished is kept, not thrown away),
//! because the engine first reads the facts from the daemon. Pure: no I/O; `plans` runs them.

use crate::pool_config::ResetStrategy;
use crate::types::InstanceState;

/// What is known about an instance when a plan starts: what the engine itself did (the usual
/// case, no daemon call), or what the daemon reports (after a crash or a failed call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The instance's state; `None` when it does not exist.
    pub state: Option<InstanceState>,
    /// Its clean snapshot exists.
    pub clean_snapshot: bool,
}

impl Facts {
    /// No such instance yet.
    pub fn absent() -> Facts {
        Facts { state: None, clean_snapshot: false }
    }

    /// A running instance with its clean snapshot (a VM that was leased or hot).
    pub fn running_clean() -> Facts {
        Facts { state: Some(InstanceState::Running), clean_snapshot: true }
    }

    /// A suspended instance with its clean snapshot (a warm VM).
    pub fn suspended_clean() -> Facts {
        Facts { state: Some(InstanceState::Suspended), clean_snapshot: true }
    }

    fn exists(&self) -> bool {
        self.state.is_some_and(|s| s != InstanceState::Deleted)
    }

    fn is(&self, s: InstanceState) -> bool {
        self.state == Some(s)
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Purge an instance left deleted but not purged (its name is taken until then).
    Purge,
    /// Delete and purge a used instance (a rebuild).
    Delete,
    /// Create and start it.
    Launch,
    /// Create it as a copy of this stopped golden VM.
    CloneFrom(String),
    /// Run the pool's setup commands (the step skips itself inside the VM once they ran).
    Setup,
    /// Stop gracefully so the disk is consistent for the clean snapshot.
    StopForSnapshot,
    /// Take the clean snapshot.
    Snapshot,
    /// Stop at once (its state is thrown away next).
    StopForce,
    /// Restore the clean snapshot (destructive).
    Restore,
    /// Write these per-instance settings (`local.<vm>.cpus|memory|disk`, value) on the stopped VM.
    Resize(Vec<(String, String)>),
    /// Delete the clean snapshot (it holds the old size: a restore would bring it back).
    DropSnapshot,
    /// Start (or resume).
    Start,
    /// Read the SSH endpoint and check the VM answers.
    Ready,
    /// Suspend, unless it is to stay running (hot, or callers wait).
    Suspend,
}

impl Step {
    /// Whether the step still has to run, given the facts (`stay_up`: the VM is to be left
    /// running).
    pub fn should_do(&self, f: &Facts, stay_up: bool) -> bool {
        use InstanceState as S;
        match self {
            Step::Purge => f.is(S::Deleted),
            Step::Delete => f.state.is_some(),
            Step::Launch | Step::CloneFrom(_) => !f.exists(),
            Step::Setup | Step::StopForSnapshot => !f.clean_snapshot && !f.is(S::Stopped),
            Step::Snapshot => !f.clean_snapshot,
            Step::StopForce => !f.is(S::Stopped),
            Step::Restore => true,
            Step::Resize(settings) => !settings.is_empty(),
            Step::DropSnapshot => f.clean_snapshot,
            Step::Start => !f.is(S::Running),
            Step::Ready => true,
            Step::Suspend => !stay_up && f.is(S::Running),
        }
    }

    /// What the facts are once the step ran.
    pub fn leaves(&self, f: &mut Facts) {
        use InstanceState as S;
        match self {
            Step::Purge | Step::Delete => *f = Facts::absent(),
            Step::Launch => f.state = Some(S::Running),
            Step::CloneFrom(_) => *f = Facts { state: Some(S::Stopped), clean_snapshot: false },
            Step::Setup | Step::Ready | Step::Resize(_) => {}
            Step::DropSnapshot => f.clean_snapshot = false,
            Step::StopForSnapshot | Step::StopForce => f.state = Some(S::Stopped),
            Step::Snapshot => f.clean_snapshot = true,
            Step::Restore => f.state = Some(S::Stopped),
            Step::Start => f.state = Some(S::Running),
            Step::Suspend => f.state = Some(S::Suspended),
        }
    }
}

/// Builds a pool VM: launched and set up (or cloned from `golden`), its clean snapshot taken,
/// started, checked, and parked (suspended unless it stays up).
pub fn provision(strategy: ResetStrategy, golden: Option<&str>, has_setup: bool) -> Vec<Step> {
    let mut plan = vec![Step::Purge];
    match (strategy, golden) {
        (ResetStrategy::Clone, Some(src)) => plan.push(Step::CloneFrom(src.to_string())),
        _ => {
            plan.push(Step::Launch);
            if has_setup {
                plan.push(Step::Setup);
            }
            plan.push(Step::StopForSnapshot);
        }
    }
    plan.extend([Step::Snapshot, Step::Start, Step::Ready, Step::Suspend]);
    plan
}

/// Returns a used VM to its clean state and parks it: restored from its clean snapshot, or
/// (clone and recreate pools, and VMs due for a rebuild) deleted and built again.
pub fn reset(strategy: ResetStrategy, golden: Option<&str>, has_setup: bool, rebuild: bool) -> Vec<Step> {
    if rebuild || strategy != ResetStrategy::Snapshot {
        let mut plan = vec![Step::Delete];
        plan.extend(provision(strategy, golden, has_setup));
        return plan;
    }
    vec![Step::StopForce, Step::Restore, Step::Start, Step::Ready, Step::Suspend]
}

/// Resizes an idle or released VM in place: restored to its clean state (stopped), the new
/// sizes written, its clean snapshot retaken at them, then started, checked and parked. A rerun
/// restores again while the clean snapshot exists (writing the same sizes again changes
/// nothing); one cut between the snapshot's delete and its retake finds no snapshot to restore
/// and fails, so the VM is replaced rather than handed out unclean.
pub fn resize(settings: Vec<(String, String)>) -> Vec<Step> {
    if settings.is_empty() {
        return reset(ResetStrategy::Snapshot, None, false, false);
    }
    vec![
        Step::StopForce,
        Step::Restore,
        Step::Resize(settings),
        Step::DropSnapshot,
        Step::Snapshot,
        Step::Start,
        Step::Ready,
        Step::Suspend,
    ]
}

/// Builds a clone pool's golden source: launched, set up, stopped (never leased).
pub fn golden(has_setup: bool) -> Vec<Step> {
    let mut plan = vec![Step::Purge, Step::Launch];
    if has_setup {
        plan.push(Step::Setup);
    }
    plan.push(Step::StopForSnapshot);
    plan
}

/// The steps of `plan` that run from `facts` (for tests and logs).
pub fn to_run(plan: &[Step], mut facts: Facts, stay_up: bool) -> Vec<Step> {
    let mut out = Vec::new();
    for step in plan {
        if step.should_do(&facts, stay_up) {
            out.push(step.clone());
            step.leaves(&mut facts);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState as S;

    fn facts(state: Option<S>, clean_snapshot: bool) -> Facts {
        Facts { state, clean_snapshot }
    }

    #[test]
    fn a_fresh_provision_runs_every_step_and_deletes_nothing() {
        let plan = provision(ResetStrategy::Snapshot, None, true);
        assert_eq!(
            to_run(&plan, Facts::absent(), false),
            vec![
                Step::Launch,
                Step::Setup,
                Step::StopForSnapshot,
                Step::Snapshot,
                Step::Start,
                Step::Ready,
                Step::Suspend
            ]
        );
        assert_eq!(to_run(&plan, Facts::absent(), true).last(), Some(&Step::Ready), "a hot VM stays up");
    }

    #[test]
    fn a_provision_resumed_after_a_crash_keeps_what_was_done() {
        let plan = provision(ResetStrategy::Snapshot, None, true);
        // Launched (setup maybe done: the step checks inside the VM).
        assert_eq!(to_run(&plan, facts(Some(S::Running), false), false)[0], Step::Setup, "not relaunched");
        // Set up and stopped: the snapshot is next.
        assert_eq!(
            to_run(&plan, facts(Some(S::Stopped), false), false),
            vec![Step::Snapshot, Step::Start, Step::Ready, Step::Suspend]
        );
        // Snapshot taken and started: only the check and parking remain.
        assert_eq!(to_run(&plan, facts(Some(S::Running), true), false), vec![Step::Ready, Step::Suspend]);
        // Deleted but not purged: purged, then built.
        assert_eq!(to_run(&plan, facts(Some(S::Deleted), false), false)[..2], [Step::Purge, Step::Launch]);
    }

    #[test]
    fn a_reset_restores_from_any_state_and_always_restores() {
        let plan = reset(ResetStrategy::Snapshot, None, false, false);
        assert_eq!(
            to_run(&plan, Facts::running_clean(), false),
            vec![Step::StopForce, Step::Restore, Step::Start, Step::Ready, Step::Suspend]
        );
        // Interrupted after the stop: the stop is not repeated, the restore is.
        assert_eq!(to_run(&plan, facts(Some(S::Stopped), true), true), vec![Step::Restore, Step::Start, Step::Ready]);
    }

    #[test]
    fn rebuilds_and_clone_pools_delete_then_build() {
        let plan = reset(ResetStrategy::Snapshot, None, false, true);
        assert_eq!(to_run(&plan, Facts::running_clean(), false)[..2], [Step::Delete, Step::Launch]);
        let plan = reset(ResetStrategy::Clone, Some("gold"), false, false);
        assert_eq!(
            to_run(&plan, Facts::running_clean(), true),
            vec![Step::Delete, Step::CloneFrom("gold".into()), Step::Snapshot, Step::Start, Step::Ready]
        );
        // A clone pool's VM interrupted after its delete: built again, not deleted twice.
        assert_eq!(to_run(&plan, Facts::absent(), true)[0], Step::CloneFrom("gold".into()));
    }

    #[test]
    fn a_resize_restores_sets_and_retakes_the_clean_snapshot() {
        let set = vec![("local.vm.cpus".to_string(), "2".to_string())];
        let plan = resize(set.clone());
        assert_eq!(
            to_run(&plan, Facts::suspended_clean(), false),
            vec![
                Step::StopForce,
                Step::Restore,
                Step::Resize(set.clone()),
                Step::DropSnapshot,
                Step::Snapshot,
                Step::Start,
                Step::Ready,
                Step::Suspend
            ]
        );
        // Run again after the snapshot was retaken: restored at the new size, set again (no-op).
        assert_eq!(
            to_run(&plan, facts(Some(S::Stopped), true), true)[..3],
            [Step::Restore, Step::Resize(set), Step::DropSnapshot]
        );
        // Nothing to set: a plain reset, the snapshot kept.
        assert!(!to_run(&resize(vec![]), Facts::running_clean(), false).contains(&Step::DropSnapshot));
    }

    #[test]
    fn a_golden_vm_is_built_and_left_stopped() {
        assert_eq!(
            to_run(&golden(true), Facts::absent(), false),
            vec![Step::Launch, Step::Setup, Step::StopForSnapshot]
        );
        assert_eq!(to_run(&golden(false), facts(Some(S::Stopped), false), false), vec![]);
    }
}
