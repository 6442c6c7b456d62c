//! Cleanup (`mpool gc`), as a pure function: what the daemon lists (instances and snapshots)
//! and how the engine uses each instance, in; what to purge, which snapshots to delete, what to
//! leave for later and what is not ours, out.
//!
//! Rules: only names with our prefix are ever touched; everything else is reported, never
//! touched. Our instances left deleted but not purged are purged by name (never with the Purge
//! RPC, which purges every deleted instance on the host, other users' too), unless the engine
//! is deleting them itself. On our instances, every snapshot but the clean one is deleted (e.g.
//! the "Before restoring" snapshot a non-destructive restore leaves), but only on a VM the
//! engine holds idle and the daemon shows stopped or suspended: never on a leased or busy VM,
//! nor on a running one (snapshot deletion on a running instance is unverified, reference §7).

use serde::Serialize;

use crate::ports::Observed;
use crate::types::InstanceState;

/// How the engine uses an instance, as cleanup needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// The engine has no VM by that name.
    Unknown,
    /// Idle, no plan running, and its pool has no waiting callers: it may be claimed.
    Idle,
    /// Leased, a plan is running on it, or callers wait for its pool.
    InUse,
}

/// One snapshot of one instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SnapshotRef {
    /// The instance.
    pub instance: String,
    /// The snapshot.
    pub snapshot: String,
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.instance, self.snapshot)
    }
}

/// Something of ours left for a later run, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deferred {
    /// An instance, or `instance.snapshot`.
    pub what: String,
    /// Why not now.
    pub why: String,
}

/// What cleanup found, and what it does about it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Cleanup {
    /// Our instances deleted but not purged: purge each by name.
    pub purge: Vec<String>,
    /// Snapshots on our idle VMs that are not the clean one: delete each.
    pub delete_snapshots: Vec<SnapshotRef>,
    /// Ours, but not now.
    pub deferred: Vec<Deferred>,
    /// Instances without our prefix (name and state): reported, never touched.
    pub foreign_instances: Vec<String>,
    /// Snapshots of instances without our prefix: reported, never touched.
    pub foreign_snapshots: Vec<SnapshotRef>,
}

impl Cleanup {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.purge.is_empty() && self.delete_snapshots.is_empty()
    }
}

/// Decides what to clean. `prefix` names our instances, `clean` our snapshot; `usage` says how
/// the engine uses an instance of ours.
pub fn decide(
    prefix: &str,
    clean: &str,
    instances: &[Observed],
    snapshots: &[(String, String)],
    usage: impl Fn(&str) -> Use,
) -> Cleanup {
    let mut out = Cleanup::default();
    let state_of = |name: &str| instances.iter().find(|o| o.name == name).map(|o| o.state);
    for o in instances {
        if !o.name.starts_with(prefix) {
            out.foreign_instances.push(format!("{} ({})", o.name, o.state.as_str_name().to_lowercase()));
            continue;
        }
        if o.state == InstanceState::Deleted {
            match usage(&o.name) {
                Use::Unknown => out.purge.push(o.name.clone()),
                _ => out.deferred.push(Deferred { what: o.name.clone(), why: "the engine is deleting it".into() }),
            }
        }
    }
    for (instance, snapshot) in snapshots {
        let s = SnapshotRef { instance: instance.clone(), snapshot: snapshot.clone() };
        if !instance.starts_with(prefix) {
            out.foreign_snapshots.push(s);
            continue;
        }
        if snapshot == clean {
            continue;
        }
        let why = match (state_of(instance), usage(instance)) {
            // multipassd refuses to delete snapshots of deleted instances; a purge takes them.
            (None | Some(InstanceState::Deleted), _) => continue,
            (_, Use::Unknown) => "not one of the engine's VMs (a stray, deleted at the next start)",
            (_, Use::InUse) => "leased, busy, or its pool has waiting callers",
            (Some(InstanceState::Stopped | InstanceState::Suspended), Use::Idle) => {
                out.delete_snapshots.push(s);
                continue;
            }
            (Some(_), Use::Idle) => "running (snapshots are deleted only on stopped or suspended VMs)",
        };
        out.deferred.push(Deferred { what: s.to_string(), why: why.into() });
    }
    out.purge.sort();
    out.delete_snapshots.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState as S;

    fn obs(name: &str, state: InstanceState) -> Observed {
        Observed { name: name.into(), state }
    }

    fn snap(i: &str, s: &str) -> (String, String) {
        (i.into(), s.into())
    }

    fn r(i: &str, s: &str) -> SnapshotRef {
        SnapshotRef { instance: i.into(), snapshot: s.into() }
    }

    #[test]
    fn exactly_our_stuff_and_nothing_without_the_prefix() {
        let instances = [
            obs("mpool-ci-aaaaaa", S::Suspended),
            obs("mpool-ci-gone", S::Deleted),
            obs("other-gone", S::Deleted),
            obs("other-vm", S::Stopped),
            obs("mpoolish", S::Deleted),
        ];
        let snapshots = [
            snap("mpool-ci-aaaaaa", "mpool-clean"),
            snap("mpool-ci-aaaaaa", "snapshot2"),
            snap("other-vm", "snapshot1"),
            snap("other-vm", "mpool-clean"),
        ];
        let c = decide("mpool-", "mpool-clean", &instances, &snapshots, |n| {
            if n == "mpool-ci-aaaaaa" { Use::Idle } else { Use::Unknown }
        });
        assert_eq!(c.purge, vec!["mpool-ci-gone"], "our deleted instance only, never another's");
        assert_eq!(c.delete_snapshots, vec![r("mpool-ci-aaaaaa", "snapshot2")], "never the clean one");
        assert_eq!(c.foreign_instances, vec!["other-gone (deleted)", "other-vm (stopped)", "mpoolish (deleted)"]);
        assert_eq!(c.foreign_snapshots, vec![r("other-vm", "snapshot1"), r("other-vm", "mpool-clean")]);
        assert!(c.deferred.is_empty(), "{:?}", c.deferred);
    }

    #[test]
    fn busy_leased_running_and_unknown_vms_keep_their_snapshots() {
        let instances = [
            obs("mpool-ci-leased", S::Running),
            obs("mpool-ci-hot", S::Running),
            obs("mpool-ci-stray", S::Stopped),
            obs("mpool-ci-warm", S::Suspended),
        ];
        let snapshots = [
            snap("mpool-ci-leased", "snapshot1"),
            snap("mpool-ci-hot", "snapshot1"),
            snap("mpool-ci-stray", "snapshot1"),
            snap("mpool-ci-warm", "snapshot1"),
        ];
        let c = decide("mpool-", "mpool-clean", &instances, &snapshots, |n| match n {
            "mpool-ci-leased" | "mpool-ci-warm" => Use::InUse,
            "mpool-ci-hot" => Use::Idle,
            _ => Use::Unknown,
        });
        assert!(c.delete_snapshots.is_empty(), "{:?}", c.delete_snapshots);
        let what: Vec<&str> = c.deferred.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "mpool-ci-leased.snapshot1",
                "mpool-ci-hot.snapshot1",
                "mpool-ci-stray.snapshot1",
                "mpool-ci-warm.snapshot1"
            ]
        );
        assert!(c.deferred[1].why.starts_with("running"), "{:?}", c.deferred[1]);
    }

    #[test]
    fn a_deleted_vm_the_engine_still_deletes_is_left_to_it() {
        let c = decide("mpool-", "mpool-clean", &[obs("mpool-ci-x", S::Deleted)], &[], |_| Use::InUse);
        assert!(c.purge.is_empty());
        assert_eq!(c.deferred.len(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn stopped_vms_such_as_golden_ones_are_pruned_too() {
        let c = decide(
            "mpool-",
            "mpool-clean",
            &[obs("mpool-ci-golden-x", S::Stopped)],
            &[snap("mpool-ci-golden-x", "snapshot1")],
            |_| Use::Idle,
        );
        assert_eq!(c.delete_snapshots, vec![r("mpool-ci-golden-x", "snapshot1")]);
    }
}
