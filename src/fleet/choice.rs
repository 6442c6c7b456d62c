//! Which host to ask for a VM, and in what order: a pure function of what each host said about
//! the pool (GetPool), so it is unit-tested here and the same for `mpool run`, `mpool acquire`
//! and `mpool bench fleet`.
//!
//! 1. Hosts with a ready VM (hot or warm), the most ready first, each asked not to wait: a VM
//!    taken by someone else in the meantime costs one quick RESOURCE_EXHAUSTED, then the next.
//! 2. Then one host to wait on: the best `ready + coming - waiting` (VMs idle, VMs being
//!    provisioned or reset, callers already in line). Only if it becomes unreachable is the
//!    next best waited on (never several at once: a wait holds a place in a host's line).
//! 3. Hosts that did not answer GetPool come last (they may be back); draining hosts never.
//!
//! Ties are spread: among equal hosts the order starts at a caller-chosen offset (random per
//! call), so many clients do not all pick the first of equals.

/// What one host said about the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// It answered GetPool.
    Pool {
        /// Idle VMs (hot and warm).
        ready: u32,
        /// VMs being provisioned or reset.
        coming: u32,
        /// Callers waiting for a VM.
        waiting: u32,
        /// The host drains: it takes no new leases.
        draining: bool,
    },
    /// It did not answer (unreachable, or an error that is not about the pool).
    Silent,
    /// It answered, but it has no such pool (or the caller may not use it there).
    NoPool,
}

impl Seen {
    /// `ready + coming - waiting`: how soon a new caller in line there can expect a VM.
    fn outlook(&self) -> i64 {
        match *self {
            Seen::Pool { ready, coming, waiting, .. } => i64::from(ready) + i64::from(coming) - i64::from(waiting),
            _ => i64::MIN,
        }
    }

    fn usable(&self) -> bool {
        matches!(self, Seen::Pool { draining: false, .. })
    }

    fn ready(&self) -> u32 {
        match *self {
            Seen::Pool { ready, .. } => ready,
            _ => 0,
        }
    }
}

/// One step of the plan: ask host `host` (its index), waiting for a VM or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Index of the host in the caller's list.
    pub host: usize,
    /// Wait for a VM there (the caller's wait), or fail at once when none is idle.
    pub wait: bool,
}

/// The order to ask the hosts in, given what each said (`seen[i]` for host `i`); `spread`
/// (any number, random per call) rotates the order among equals.
pub fn plan(seen: &[Seen], spread: usize) -> Vec<Attempt> {
    let n = seen.len().max(1);
    // Host indices rotated by `spread`: a stable sort then keeps that rotation among equals.
    let rotated = |keep: &dyn Fn(&Seen) -> bool| -> Vec<usize> {
        (0..seen.len()).map(|i| (i + spread) % n).filter(|&i| keep(&seen[i])).collect()
    };
    let mut ready = rotated(&|s| s.usable() && s.ready() > 0);
    ready.sort_by_key(|&i| std::cmp::Reverse(seen[i].ready()));
    let mut waits = rotated(&Seen::usable);
    waits.sort_by_key(|&i| std::cmp::Reverse(seen[i].outlook()));
    let silent = rotated(&|s| matches!(s, Seen::Silent));
    let now = ready.into_iter().map(|host| Attempt { host, wait: false });
    let later = waits.into_iter().chain(silent).map(|host| Attempt { host, wait: true });
    now.chain(later).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ready: u32, coming: u32, waiting: u32) -> Seen {
        Seen::Pool { ready, coming, waiting, draining: false }
    }

    fn hosts(p: &[Attempt]) -> Vec<(usize, bool)> {
        p.iter().map(|a| (a.host, a.wait)).collect()
    }

    #[test]
    fn the_most_ready_host_goes_first_without_waiting() {
        let seen = [pool(1, 0, 0), pool(3, 0, 0), pool(0, 2, 0)];
        let p = plan(&seen, 0);
        assert_eq!(&hosts(&p)[..2], [(1, false), (0, false)]);
        // Then the wait goes to the best outlook: 3, then 2, then 1.
        assert_eq!(&hosts(&p)[2..], [(1, true), (2, true), (0, true)]);
    }

    #[test]
    fn with_no_ready_vm_it_waits_on_the_best_outlook() {
        // ready + coming - waiting: 0+2-3 = -1, 0+1-0 = 1, 0+4-1 = 3.
        let seen = [pool(0, 2, 3), pool(0, 1, 0), pool(0, 4, 1)];
        assert_eq!(hosts(&plan(&seen, 0)), [(2, true), (1, true), (0, true)]);
    }

    #[test]
    fn draining_and_poolless_hosts_are_skipped_and_silent_ones_come_last() {
        let seen =
            [Seen::Silent, Seen::Pool { ready: 9, coming: 0, waiting: 0, draining: true }, Seen::NoPool, pool(0, 0, 0)];
        assert_eq!(hosts(&plan(&seen, 0)), [(3, true), (0, true)]);
        assert!(plan(&[Seen::NoPool, Seen::Pool { ready: 1, coming: 0, waiting: 0, draining: true }], 0).is_empty());
        assert!(plan(&[], 3).is_empty());
    }

    #[test]
    fn ties_are_spread() {
        let seen = [pool(2, 0, 0), pool(2, 0, 0), pool(2, 0, 0)];
        let firsts: Vec<usize> = (0..3).map(|spread| plan(&seen, spread)[0].host).collect();
        assert_eq!(firsts, [0, 1, 2]);
        // A clear winner wins whatever the spread.
        let seen = [pool(1, 0, 0), pool(5, 0, 0), pool(1, 0, 0)];
        assert!((0..6).all(|spread| plan(&seen, spread)[0].host == 1));
    }
}
