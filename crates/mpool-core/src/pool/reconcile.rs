//! Startup reconciliation, as a pure function: what the store says, what the daemon reports,
//! and the config, in; what each VM and lease becomes, out.
//!
//! Rules: only instances with our name prefix are ever touched. Our instances with a record are
//! adopted: an unexpired lease is honoured; an expired lease is ended and its VM reset; idle
//! VMs found in the state they should be in are kept; an interrupted build resumes; anything
//! else in doubt (interrupted reset, wake or park, or an idle VM found in another state, e.g.
//! resumed by a daemon restart) is reset. Records without an instance are dropped (their leases end).
//! Instances with our prefix and no record are strays: deleted (if configured). VMs the engine
//! names as in doubt (touched by a store write that failed, or by work aborted then) are reset
//! rather than kept idle, unless a lease holds them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::pool_config::PoolConfig;
use crate::store::{LeaseRecord, PhaseRecord, Snapshot, VmRecord};
use crate::types::InstanceState;

use super::vm::VmState;
use crate::ports::Observed;

/// What to do with one adopted VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// Its record (phase already updated).
    pub record: VmRecord,
    /// Its state in memory.
    pub state: VmState,
}

/// The outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// VMs kept, with their state.
    pub vms: Vec<Adopted>,
    /// Golden VMs kept: pool -> (record, ready).
    pub golden: BTreeMap<String, (VmRecord, bool)>,
    /// Leases still valid.
    pub leases: Vec<LeaseRecord>,
    /// Leases to end, with why.
    pub ended: Vec<(LeaseRecord, &'static str)>,
    /// Records to drop (no such instance any more).
    pub dropped: Vec<String>,
    /// Our-prefix instances nobody knows: delete them.
    pub strays: Vec<String>,
    /// Our-prefix instances nobody knows, left alone because stray deletion is off.
    pub ignored: Vec<String>,
}

/// Reconciles. `now_ms` is the wall clock in unix milliseconds; `doubt` names VMs whose idle
/// state cannot be trusted.
pub fn reconcile(
    prefix: &str,
    pools: &[PoolConfig],
    store: &Snapshot,
    observed: &[Observed],
    now_ms: u64,
    delete_strays: bool,
    doubt: &HashSet<String>,
) -> Reconciled {
    let mut out = Reconciled::default();
    let seen: HashMap<&str, InstanceState> =
        observed.iter().filter(|o| o.name.starts_with(prefix)).map(|o| (o.name.as_str(), o.state)).collect();
    let leases: HashMap<&str, &LeaseRecord> = store.leases.iter().map(|l| (l.id.as_str(), l)).collect();
    let known_pool = |p: &str| pools.iter().any(|c| c.name == p);
    let mut recorded = std::collections::HashSet::new();
    let mut kept_leases = std::collections::HashSet::new();

    for rec in &store.vms {
        recorded.insert(rec.name.as_str());
        let Some(&obs) = seen.get(rec.name.as_str()) else {
            out.dropped.push(rec.name.clone());
            continue;
        };
        if rec.phase == PhaseRecord::Golden {
            // One golden VM per pool, the newest: any other is deleted (a replaced one whose
            // delete was interrupted).
            if known_pool(&rec.pool) && newest_golden(store, &seen, &rec.pool) == Some(rec.name.as_str()) {
                out.golden.insert(rec.pool.clone(), (rec.clone(), obs == InstanceState::Stopped));
            } else {
                out.vms.push(Adopted { record: with(rec.clone(), PhaseRecord::Deleting), state: VmState::Deleting });
            }
            continue;
        }
        let mut r = rec.clone();
        tracing::debug!(vm = %rec.name, phase = ?rec.phase, ?obs, known = known_pool(&rec.pool), lease = ?rec.lease, "reconcile: record");
        if !known_pool(&rec.pool) || obs == InstanceState::Deleted {
            r.lease = None;
            out.vms.push(Adopted { record: with(r, PhaseRecord::Deleting), state: VmState::Deleting });
            continue;
        }
        let lease = rec.lease.as_deref().and_then(|id| leases.get(id).copied());
        let state = adopted_state(rec.phase, obs, lease, now_ms, doubt.contains(&rec.name));
        if let (VmState::Leased, Some(l)) = (state, lease) {
            kept_leases.insert(l.id.as_str());
            out.leases.push(l.clone());
        }
        if state != VmState::Leased {
            r.lease = None;
        }
        out.vms.push(Adopted { record: with(r, state.record()), state });
    }
    for l in &store.leases {
        if !kept_leases.contains(l.id.as_str()) {
            let why = if l.expires_ms <= now_ms { "expired while mpool was down" } else { "its VM is gone" };
            out.ended.push((l.clone(), why));
        }
    }
    for o in observed.iter().filter(|o| o.name.starts_with(prefix)) {
        if !recorded.contains(o.name.as_str()) {
            if delete_strays {
                out.strays.push(o.name.clone());
            } else {
                out.ignored.push(o.name.clone());
            }
        }
    }
    out
}

/// The newest golden VM of `pool` that the daemon still has.
fn newest_golden<'a>(store: &'a Snapshot, seen: &HashMap<&str, InstanceState>, pool: &str) -> Option<&'a str> {
    store
        .vms
        .iter()
        .filter(|o| o.phase == PhaseRecord::Golden && o.pool == pool && seen.contains_key(o.name.as_str()))
        .max_by_key(|o| (o.generation, o.created_ms, o.name.clone()))
        .map(|o| o.name.as_str())
}

/// What an adopted VM of a known pool becomes, from its recorded phase, the daemon's state of
/// it, its lease (if the store has it) and whether it is in doubt.
fn adopted_state(
    phase: PhaseRecord,
    obs: InstanceState,
    lease: Option<&LeaseRecord>,
    now_ms: u64,
    in_doubt: bool,
) -> VmState {
    match (phase, lease) {
        (PhaseRecord::Leased, Some(l)) if l.expires_ms > now_ms => VmState::Leased,
        (PhaseRecord::Leased, _) => VmState::Resetting,
        (PhaseRecord::Hot | PhaseRecord::Warm, _) if in_doubt => VmState::Resetting,
        (PhaseRecord::Hot, _) if obs == InstanceState::Running => VmState::Hot,
        (PhaseRecord::Warm, _) if obs == InstanceState::Suspended => VmState::Warm,
        (PhaseRecord::Broken | PhaseRecord::Deleting, _) => VmState::Deleting,
        // Never leased yet: its build resumes from what the daemon shows.
        (PhaseRecord::Provisioning, _) => VmState::Provisioning,
        _ => VmState::Resetting,
    }
}

fn with(mut r: VmRecord, phase: PhaseRecord) -> VmRecord {
    r.phase = phase;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolConfig {
        PoolConfig::with_defaults("ci")
    }

    fn rec(name: &str, phase: PhaseRecord, lease: Option<&str>) -> VmRecord {
        VmRecord {
            name: name.into(),
            pool: "ci".into(),
            generation: 1,
            phase,
            uses: 1,
            lease: lease.map(Into::into),
            created_ms: 0,
        }
    }

    fn lease(id: &str, vm: &str, expires_ms: u64) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            pool: "ci".into(),
            vm: vm.into(),
            holder: "h".into(),
            request_id: None,
            granted_ms: 0,
            expires_ms,
            owner: String::new(),
        }
    }

    fn obs(name: &str, state: InstanceState) -> Observed {
        Observed { name: name.into(), state }
    }

    fn state_of(r: &Reconciled, name: &str) -> VmState {
        r.vms.iter().find(|a| a.record.name == name).map(|a| a.state).expect(name)
    }

    #[test]
    fn every_instance_is_accounted_for() {
        let store = Snapshot {
            vms: vec![
                rec("mpool-ci-leased", PhaseRecord::Leased, Some("l1")),
                rec("mpool-ci-expired", PhaseRecord::Leased, Some("l2")),
                rec("mpool-ci-warm", PhaseRecord::Warm, None),
                rec("mpool-ci-resumed", PhaseRecord::Warm, None),
                rec("mpool-ci-midreset", PhaseRecord::Resetting, None),
                rec("mpool-ci-midprov", PhaseRecord::Provisioning, None),
                rec("mpool-ci-gone", PhaseRecord::Warm, None),
                rec("mpool-ci-broken", PhaseRecord::Broken, None),
            ],
            leases: vec![lease("l1", "mpool-ci-leased", 2_000), lease("l2", "mpool-ci-expired", 500)],
            ..Default::default()
        };
        let observed = vec![
            obs("mpool-ci-leased", InstanceState::Running),
            obs("mpool-ci-expired", InstanceState::Running),
            obs("mpool-ci-warm", InstanceState::Suspended),
            obs("mpool-ci-resumed", InstanceState::Running),
            obs("mpool-ci-midreset", InstanceState::Stopped),
            obs("mpool-ci-midprov", InstanceState::Running),
            obs("mpool-ci-broken", InstanceState::Running),
            obs("mpool-ci-stray", InstanceState::Running),
            obs("someone-elses", InstanceState::Running),
        ];
        let r = reconcile("mpool-", &[pool()], &store, &observed, 1_000, true, &HashSet::new());
        assert_eq!(state_of(&r, "mpool-ci-leased"), VmState::Leased, "unexpired leases are honoured");
        assert_eq!(r.leases.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), vec!["l1"]);
        assert_eq!(state_of(&r, "mpool-ci-expired"), VmState::Resetting, "expired while down: reset");
        assert_eq!(r.ended.iter().map(|(l, _)| l.id.as_str()).collect::<Vec<_>>(), vec!["l2"]);
        assert_eq!(state_of(&r, "mpool-ci-warm"), VmState::Warm);
        assert_eq!(state_of(&r, "mpool-ci-resumed"), VmState::Resetting, "resumed by a daemon restart: re-parked");
        assert_eq!(state_of(&r, "mpool-ci-midreset"), VmState::Resetting);
        assert_eq!(state_of(&r, "mpool-ci-midprov"), VmState::Provisioning, "its build resumes");
        assert_eq!(state_of(&r, "mpool-ci-broken"), VmState::Deleting);
        assert_eq!(r.dropped, vec!["mpool-ci-gone"]);
        assert_eq!(r.strays, vec!["mpool-ci-stray"], "only our prefix; never someone else's");
        assert!(r.vms.iter().all(|a| a.state == VmState::Leased || a.record.lease.is_none()));
    }

    #[test]
    fn strays_are_left_alone_when_configured() {
        let r = reconcile(
            "mpool-",
            &[pool()],
            &Snapshot::default(),
            &[obs("mpool-x", InstanceState::Stopped)],
            0,
            false,
            &HashSet::new(),
        );
        assert!(r.strays.is_empty());
        assert_eq!(r.ignored, vec!["mpool-x"]);
    }

    #[test]
    fn vms_of_removed_pools_are_deleted() {
        let mut r0 = rec("mpool-old-a", PhaseRecord::Warm, None);
        r0.pool = "old".into();
        let store = Snapshot { vms: vec![r0], ..Default::default() };
        let r = reconcile(
            "mpool-",
            &[pool()],
            &store,
            &[obs("mpool-old-a", InstanceState::Suspended)],
            0,
            true,
            &HashSet::new(),
        );
        assert_eq!(state_of(&r, "mpool-old-a"), VmState::Deleting);
    }

    #[test]
    fn vms_in_doubt_are_reset_unless_a_lease_holds_them() {
        let store = Snapshot {
            vms: vec![
                rec("mpool-ci-hot", PhaseRecord::Hot, None),
                rec("mpool-ci-warm", PhaseRecord::Warm, None),
                rec("mpool-ci-leased", PhaseRecord::Leased, Some("l1")),
                rec("mpool-ci-calm", PhaseRecord::Warm, None),
            ],
            leases: vec![lease("l1", "mpool-ci-leased", 2_000)],
            ..Default::default()
        };
        let observed = vec![
            obs("mpool-ci-hot", InstanceState::Running),
            obs("mpool-ci-warm", InstanceState::Suspended),
            obs("mpool-ci-leased", InstanceState::Running),
            obs("mpool-ci-calm", InstanceState::Suspended),
        ];
        let doubt: HashSet<String> =
            ["mpool-ci-hot", "mpool-ci-warm", "mpool-ci-leased"].into_iter().map(String::from).collect();
        let r = reconcile("mpool-", &[pool()], &store, &observed, 1_000, true, &doubt);
        assert_eq!(state_of(&r, "mpool-ci-hot"), VmState::Resetting);
        assert_eq!(state_of(&r, "mpool-ci-warm"), VmState::Resetting);
        assert_eq!(state_of(&r, "mpool-ci-leased"), VmState::Leased, "an acknowledged lease is honoured");
        assert_eq!(state_of(&r, "mpool-ci-calm"), VmState::Warm);
    }

    #[test]
    fn one_golden_vm_per_pool_is_kept_the_newest() {
        let mut old = rec("mpool-ci-golden-old", PhaseRecord::Golden, None);
        old.generation = 1;
        let mut new = rec("mpool-ci-golden-new", PhaseRecord::Golden, None);
        new.generation = 2;
        let store = Snapshot { vms: vec![old, new], ..Default::default() };
        let observed = vec![
            obs("mpool-ci-golden-old", InstanceState::Stopped),
            obs("mpool-ci-golden-new", InstanceState::Stopped),
        ];
        let r = reconcile("mpool-", &[pool()], &store, &observed, 0, true, &HashSet::new());
        assert_eq!(r.golden.get("ci").map(|(g, ready)| (g.name.as_str(), *ready)), Some(("mpool-ci-golden-new", true)));
        assert_eq!(state_of(&r, "mpool-ci-golden-old"), VmState::Deleting, "the replaced one is deleted, not leaked");
    }
}
