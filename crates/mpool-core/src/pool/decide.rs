//! Maintenance decisions for one pool, as a pure function of what the engine knows: what to
//! provision, park, retry, rotate and reap. No I/O, no clock (idle times are inputs).

use std::time::Duration;

use crate::pool_config::PoolConfig;

use super::vm::VmState;

/// One VM as the decision sees it.
#[derive(Clone, Debug)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// A plan is running on it.
    pub busy: bool,
    /// Its config generation.
    pub generation: u64,
    /// Whether, once idle, it will be hot (for VMs being provisioned, reset or parked).
    pub target_hot: bool,
    /// How long it has been idle (zero when not idle).
    pub idle_for: Duration,
    /// Of an older generation that differs only in sizes it can be resized to in place
    /// ([`super::resize`]).
    pub resizable: bool,
}

/// The golden source of a clone pool, as the decision sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoldenView {
    /// Not a clone pool.
    NotNeeded,
    /// No golden VM yet (or an outdated one is gone).
    Missing,
    /// Being built.
    Building,
    /// Ready, of this generation.
    Ready(u64),
}

/// A pool as the decision sees it.
#[derive(Clone, Debug)]
pub struct PoolView<'a> {
    /// Its config.
    pub cfg: &'a PoolConfig,
    /// Its current generation.
    pub generation: u64,
    /// Its VMs (not the golden one).
    pub vms: Vec<VmView>,
    /// Callers waiting with no VM assigned yet (that a free VM could serve).
    pub waiting: usize,
    /// Idle VMs to keep ready: `min_ready`, or the demand's target when the pool autoscales.
    pub ready_target: usize,
    /// The golden VM.
    pub golden: GoldenView,
    /// The daemon answers; when it does not, nothing that needs it is started.
    pub daemon_ok: bool,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create this many VMs, this many of them hot.
    Provision {
        /// How many.
        count: usize,
        /// How many of them stay running.
        hot: usize,
    },
    /// Run (again) the reset of a VM in doubt or whose reset was interrupted.
    Reset {
        /// VM.
        vm: String,
        /// Park it hot.
        hot: bool,
    },
    /// Run (again) the provisioning of a VM whose build was interrupted (it keeps what was done).
    Resume {
        /// VM.
        vm: String,
        /// Park it hot.
        hot: bool,
    },
    /// Run (again) a delete.
    Destroy {
        /// VM.
        vm: String,
    },
    /// Retire an idle or broken VM (scale-down, rotation, failure).
    Retire {
        /// VM.
        vm: String,
    },
    /// Resize an idle VM of an older generation in place, parked as it was.
    Resize {
        /// VM.
        vm: String,
        /// Park it hot.
        hot: bool,
    },
    /// Move an idle VM between hot and warm.
    Park {
        /// VM.
        vm: String,
        /// To hot (start) or to warm (suspend).
        hot: bool,
    },
    /// Build the golden VM of a clone pool.
    BuildGolden,
}

/// Decides one round of maintenance: unfinished work first, then rotation, the golden VM of
/// a clone pool, scaling up, the hot tier, and scaling down.
pub fn decide(p: &PoolView<'_>) -> Vec<Action> {
    let mut out = unfinished_work(p);
    if !p.daemon_ok {
        return out;
    }
    let retiring = rotation(p, &mut out);
    if golden_pending(p, &mut out) {
        return out;
    }
    let resizing: Vec<&VmView> = p.vms.iter().filter(|v| rotates(p, v) && v.resizable).collect();
    let stays = |v: &&VmView| !retiring.contains(&v.name.as_str());
    let idle: Vec<&VmView> = p.vms.iter().filter(|v| v.state.is_idle()).filter(stays).collect();
    // Resized VMs are on their way back, parked as they were.
    let coming: Vec<(&VmView, bool)> = p
        .vms
        .iter()
        .filter(|v| v.state.is_coming())
        .map(|v| (v, v.target_hot))
        .chain(resizing.iter().map(|v| (*v, v.state == VmState::Hot)))
        .collect();
    let hot_now = idle.iter().filter(|v| v.state == VmState::Hot).count() + coming.iter().filter(|c| c.1).count();
    if let Some(provision) = scale_up(p, idle.len() + coming.len(), hot_now) {
        out.push(provision);
        return out;
    }
    balance_hot(p, &idle, hot_now, &mut out);
    scale_down(p, &idle, &mut out);
    out
}

/// Broken VMs go; interrupted deletes, resets and builds run again (only the first while the
/// daemon is down).
fn unfinished_work(p: &PoolView<'_>) -> Vec<Action> {
    let mut out = Vec::new();
    for v in p.vms.iter().filter(|v| !v.busy) {
        match v.state {
            VmState::Broken => out.push(Action::Retire { vm: v.name.clone() }),
            VmState::Deleting if p.daemon_ok => out.push(Action::Destroy { vm: v.name.clone() }),
            VmState::Resetting if p.daemon_ok => out.push(Action::Reset { vm: v.name.clone(), hot: v.target_hot }),
            VmState::Provisioning if p.daemon_ok => out.push(Action::Resume { vm: v.name.clone(), hot: v.target_hot }),
            _ => {}
        }
    }
    out
}

/// Whether an idle VM is out of date (of an older generation) and free to rotate or resize.
fn rotates(p: &PoolView<'_>, v: &VmView) -> bool {
    !v.busy && v.state.is_idle() && v.generation < p.generation
}

/// Rotation: idle VMs of an older generation are resized in place when only their sizes
/// differ, else replaced. Returns the names of those that go (both leave the idle set).
fn rotation<'a>(p: &'a PoolView<'_>, out: &mut Vec<Action>) -> Vec<&'a str> {
    let mut taken = Vec::new();
    for v in p.vms.iter().filter(|v| rotates(p, v)) {
        taken.push(v.name.as_str());
        out.push(if v.resizable {
            Action::Resize { vm: v.name.clone(), hot: v.state == VmState::Hot }
        } else {
            Action::Retire { vm: v.name.clone() }
        });
    }
    taken
}

/// Clone pools need their golden VM (of the current generation) first: whether the round has
/// to wait for it.
fn golden_pending(p: &PoolView<'_>, out: &mut Vec<Action>) -> bool {
    match p.golden {
        GoldenView::Missing => {
            out.push(Action::BuildGolden);
            true
        }
        GoldenView::Building => true,
        GoldenView::Ready(g) if g < p.generation => {
            // The engine retires the old golden VM and builds a new one.
            out.push(Action::BuildGolden);
            true
        }
        GoldenView::Ready(_) | GoldenView::NotNeeded => false,
    }
}

/// Scale up to the ready target plus one per waiting caller, never beyond max_size (`have`: idle and
/// coming VMs; `hot_now`: idle hot ones and those being made hot).
fn scale_up(p: &PoolView<'_>, have: usize, hot_now: usize) -> Option<Action> {
    let cfg = p.cfg;
    let total = p.vms.iter().filter(|v| v.state.counts_toward_size()).count();
    let want = p.ready_target + p.waiting;
    let room = (cfg.max_size as usize).saturating_sub(total);
    let count = want.saturating_sub(have).min(room);
    if count == 0 {
        return None;
    }
    // VMs made for waiting callers stay running: suspending them only to resume them at once
    // would cost a suspend and a resume.
    let hot = ((cfg.hot as usize).saturating_sub(hot_now) + p.waiting).min(count);
    Some(Action::Provision { count, hot })
}

/// Keep `hot` idle VMs running: start warm ones, or suspend extra hot ones.
fn balance_hot(p: &PoolView<'_>, idle: &[&VmView], hot_now: usize, out: &mut Vec<Action>) {
    let hot = p.cfg.hot as usize;
    let free_idle = |s: VmState| idle.iter().filter(move |v| !v.busy && v.state == s);
    if hot_now < hot {
        for v in free_idle(VmState::Warm).take(hot - hot_now) {
            out.push(Action::Park { vm: v.name.clone(), hot: true });
        }
    } else if hot_now > hot && p.waiting == 0 {
        for v in free_idle(VmState::Hot).take(hot_now - hot) {
            out.push(Action::Park { vm: v.name.clone(), hot: false });
        }
    }
}

/// Scale down idle VMs above the ready target once they have idled long enough, longest idle
/// first. Only idle VMs with no plan running go: never a leased one, one being handed out, or
/// one being reset.
fn scale_down(p: &PoolView<'_>, idle: &[&VmView], out: &mut Vec<Action>) {
    let min_ready = p.ready_target;
    if p.waiting > 0 || idle.len() <= min_ready {
        return;
    }
    let mut candidates: Vec<&&VmView> = idle.iter().filter(|v| !v.busy && v.idle_for >= p.cfg.idle_timeout).collect();
    candidates.sort_by(|a, b| b.idle_for.cmp(&a.idle_for).then(a.name.cmp(&b.name)));
    for v in candidates.into_iter().take(idle.len() - min_ready) {
        out.push(Action::Retire { vm: v.name.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_ready: u32, hot: u32, max_size: u32) -> PoolConfig {
        let mut p = PoolConfig::with_defaults("ci");
        (p.min_ready, p.hot, p.max_size) = (min_ready, hot, max_size);
        p.idle_timeout = Duration::from_secs(300);
        p
    }

    fn vm(name: &str, state: VmState) -> VmView {
        VmView {
            name: name.into(),
            state,
            busy: false,
            generation: 1,
            target_hot: false,
            idle_for: Duration::ZERO,
            resizable: false,
        }
    }

    fn view(cfg: &PoolConfig, vms: Vec<VmView>, waiting: usize) -> PoolView<'_> {
        let ready_target = cfg.min_ready as usize;
        PoolView { cfg, generation: 1, vms, waiting, ready_target, golden: GoldenView::NotNeeded, daemon_ok: true }
    }

    #[test]
    fn an_empty_pool_provisions_min_ready_with_hot_ones() {
        let c = cfg(3, 1, 5);
        assert_eq!(decide(&view(&c, vec![], 0)), vec![Action::Provision { count: 3, hot: 1 }]);
    }

    #[test]
    fn resets_and_provisioning_count_as_coming_and_toward_max_size() {
        let c = cfg(2, 0, 3);
        let vms = vec![vm("a", VmState::Leased), vm("b", VmState::Resetting), vm("c", VmState::Provisioning)];
        let mut v = view(&c, vms, 5);
        for x in &mut v.vms {
            x.busy = true;
        }
        assert_eq!(decide(&v), vec![], "max_size reached: no more, however many wait");
    }

    #[test]
    fn waiting_callers_scale_up_within_max_size() {
        let c = cfg(1, 0, 4);
        let vms = vec![vm("a", VmState::Leased), vm("b", VmState::Leased)];
        assert_eq!(
            decide(&view(&c, vms, 3)),
            vec![Action::Provision { count: 2, hot: 2 }],
            "made for callers: kept running"
        );
    }

    #[test]
    fn warm_vms_are_started_to_refill_the_hot_tier_and_extra_hot_ones_suspended() {
        let c = cfg(2, 1, 4);
        let v = view(&c, vec![vm("a", VmState::Warm), vm("b", VmState::Warm)], 0);
        assert_eq!(decide(&v), vec![Action::Park { vm: "a".into(), hot: true }]);
        let v = view(&c, vec![vm("a", VmState::Hot), vm("b", VmState::Hot)], 0);
        assert_eq!(decide(&v), vec![Action::Park { vm: "a".into(), hot: false }]);
    }

    #[test]
    fn idle_vms_above_min_ready_are_reaped_after_idle_timeout_never_leased_ones() {
        let c = cfg(1, 0, 4);
        let mut old = vm("old", VmState::Warm);
        old.idle_for = Duration::from_secs(900);
        let mut older = vm("older", VmState::Warm);
        older.idle_for = Duration::from_secs(1000);
        let young = vm("young", VmState::Warm);
        let leased = vm("leased", VmState::Leased);
        let v = view(&c, vec![old, older, young, leased], 0);
        assert_eq!(decide(&v), vec![Action::Retire { vm: "older".into() }, Action::Retire { vm: "old".into() }]);
        // With a caller waiting, nothing is reaped.
        let mut v2 = v.clone();
        v2.waiting = 1;
        assert!(!decide(&v2).iter().any(|a| matches!(a, Action::Retire { .. })));
    }

    #[test]
    fn broken_vms_are_retired_and_interrupted_work_resumes() {
        let c = cfg(0, 0, 4);
        let mut r = vm("r", VmState::Resetting);
        r.target_hot = true;
        let v =
            view(&c, vec![vm("b", VmState::Broken), r, vm("d", VmState::Deleting), vm("p", VmState::Provisioning)], 0);
        assert_eq!(
            decide(&v),
            vec![
                Action::Retire { vm: "b".into() },
                Action::Reset { vm: "r".into(), hot: true },
                Action::Destroy { vm: "d".into() },
                Action::Resume { vm: "p".into(), hot: false },
            ]
        );
    }

    #[test]
    fn nothing_needing_the_daemon_starts_while_it_is_down() {
        let c = cfg(2, 0, 4);
        let mut v = view(&c, vec![vm("r", VmState::Resetting), vm("b", VmState::Broken)], 3);
        v.daemon_ok = false;
        assert_eq!(decide(&v), vec![Action::Retire { vm: "b".into() }]);
    }

    #[test]
    fn old_generations_rotate_and_clone_pools_build_golden_first() {
        let c = cfg(1, 0, 2);
        let mut v = view(&c, vec![vm("a", VmState::Warm)], 0);
        v.generation = 2;
        let acts = decide(&v);
        assert!(acts.contains(&Action::Retire { vm: "a".into() }));
        assert!(acts.contains(&Action::Provision { count: 1, hot: 0 }), "{acts:?}");
        let mut v = view(&c, vec![], 0);
        v.golden = GoldenView::Missing;
        assert_eq!(decide(&v), vec![Action::BuildGolden]);
        v.golden = GoldenView::Ready(1);
        assert_eq!(decide(&v), vec![Action::Provision { count: 1, hot: 0 }]);
    }

    #[test]
    fn old_generations_that_differ_only_in_size_are_resized_not_replaced() {
        let c = cfg(2, 1, 2);
        let (mut a, mut b) = (vm("a", VmState::Hot), vm("b", VmState::Warm));
        (a.resizable, b.resizable) = (true, true);
        let mut leased = vm("l", VmState::Leased);
        leased.resizable = true;
        let mut v = view(&c, vec![a, b, leased], 0);
        v.generation = 2;
        assert_eq!(
            decide(&v),
            vec![Action::Resize { vm: "a".into(), hot: true }, Action::Resize { vm: "b".into(), hot: false }],
            "no replacement provisioned, no park, the leased VM untouched"
        );
        // A resizable VM that is busy waits; one that is not resizable rotates.
        v.vms[0].busy = true;
        v.vms[1].resizable = false;
        assert_eq!(decide(&v), vec![Action::Retire { vm: "b".into() }]);
    }

    #[test]
    fn a_demand_target_replaces_min_ready_and_only_idle_free_vms_go_below_it() {
        let c = cfg(1, 0, 8);
        let mut v = view(&c, vec![vm("a", VmState::Warm)], 0);
        v.ready_target = 4;
        assert_eq!(decide(&v), vec![Action::Provision { count: 3, hot: 0 }], "up to the target, not min_ready");
        let old = |name: &str, state: VmState, busy: bool| {
            let mut x = vm(name, state);
            (x.idle_for, x.busy) = (Duration::from_secs(3600), busy);
            x
        };
        let vms = vec![
            old("leased", VmState::Leased, false),
            old("waking", VmState::Waking, true),
            old("resetting", VmState::Resetting, true),
            old("parking", VmState::Warm, true),
            old("w1", VmState::Warm, false),
            old("w2", VmState::Warm, false),
        ];
        let mut v = view(&c, vms, 0);
        v.ready_target = 2;
        let retired: Vec<Action> = decide(&v).into_iter().filter(|a| matches!(a, Action::Retire { .. })).collect();
        assert_eq!(retired, vec![Action::Retire { vm: "w1".into() }], "3 idle, target 2: one free idle VM goes");
        v.ready_target = 0;
        let retired: Vec<Action> = decide(&v).into_iter().filter(|a| matches!(a, Action::Retire { .. })).collect();
        assert_eq!(retired.len(), 2, "never the leased, waking, resetting or busy one: {retired:?}");
    }
}
