//! Fair share of one pool among owners (the token identities callers acquire under): no owner
//! holds more than the pool's `max_leases_per_owner`, and when the pool is contended the next
//! free VM goes to the waiting owner served least recently (round-robin across owners, first
//! come first served within one owner), so one owner's fan-out cannot starve another's.
//! Plain data and rules, no I/O, no clock.

use std::collections::HashMap;

/// The fair-share rules of one pool and whose turn it is.
#[derive(Clone, Debug, Default)]
pub struct FairShare {
    /// Most leases one owner may hold (or be handed) at once; 0 = unlimited.
    limit: u32,
    /// When each owner was last served (a grant counter; never served: 0).
    turns: HashMap<String, u64>,
    /// The last grant's number.
    counter: u64,
}

/// Beyond this many remembered owners (more than waiters), owners that do not wait are forgotten.
const MEMORY_SLACK: usize = 64;

impl FairShare {
    /// Rules with this per-owner limit (0 = unlimited).
    pub fn new(limit: u32) -> FairShare {
        FairShare { limit, ..FairShare::default() }
    }

    /// The per-owner limit (0 = unlimited).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether an owner holding `held` leases may be handed another.
    pub fn may_take(&self, held: usize) -> bool {
        self.limit == 0 || held < self.limit as usize
    }

    /// The waiter to serve next, as an index into `waiting` (owners in arrival order): among
    /// waiters whose owner is under the limit (`held`: leases each owner holds or is being
    /// handed), the one whose owner was served least recently, the earliest of that owner's.
    /// `None` when every waiting owner is at its limit (or nobody waits).
    pub fn pick(&self, waiting: &[&str], held: &HashMap<String, usize>) -> Option<usize> {
        let held_by = |o: &str| held.get(o).copied().unwrap_or(0);
        waiting
            .iter()
            .enumerate()
            .filter(|(_, o)| self.may_take(held_by(o)))
            .min_by_key(|(i, o)| (self.turns.get(**o).copied().unwrap_or(0), *i))
            .map(|(i, _)| i)
    }

    /// How many of the waiters could be handed a VM now if there were enough: per owner, its
    /// waiters up to the room its limit leaves. (Waiters beyond it need a release, not a VM.)
    pub fn servable(&self, waiting: &[&str], held: &HashMap<String, usize>) -> usize {
        let mut per_owner: HashMap<&str, usize> = HashMap::new();
        for o in waiting {
            *per_owner.entry(o).or_default() += 1;
        }
        per_owner
            .into_iter()
            .map(|(o, n)| {
                if self.limit == 0 {
                    n
                } else {
                    n.min((self.limit as usize).saturating_sub(held.get(o).copied().unwrap_or(0)))
                }
            })
            .sum()
    }

    /// Records that `owner` was served; `waiting` are the owners still waiting (a pool nobody
    /// waits in forgets the turns, so memory stays bounded).
    pub fn served(&mut self, owner: &str, waiting: &[&str]) {
        self.counter += 1;
        self.turns.insert(owner.to_string(), self.counter);
        self.forget(waiting);
    }

    /// Forgets the turns of owners that no longer wait when nobody waits, or when more owners
    /// are remembered than can matter.
    pub fn forget(&mut self, waiting: &[&str]) {
        if waiting.is_empty() {
            self.turns.clear();
        } else if self.turns.len() > waiting.len() + MEMORY_SLACK {
            self.turns.retain(|o, _| waiting.contains(&o.as_str()));
        }
    }
}

/// Leases each owner holds or is being handed, from owner names (one per lease or grant).
pub fn count_by_owner<'a>(owners: impl IntoIterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut held = HashMap::new();
    for o in owners {
        *held.entry(o.to_string()).or_default() += 1;
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `waiting` one VM at a time (nobody releases): the owners in grant order.
    fn serve_all(fair: &mut FairShare, waiting: &mut Vec<&'static str>, held: &mut HashMap<String, usize>) -> String {
        let mut order = Vec::new();
        while let Some(i) = fair.pick(waiting, held) {
            let o = waiting.remove(i);
            fair.served(o, waiting);
            *held.entry(o.to_string()).or_default() += 1;
            order.push(o);
        }
        order.concat()
    }

    #[test]
    fn unlimited_and_one_owner_is_first_come_first_served() {
        let mut f = FairShare::new(0);
        let mut w = vec!["a", "a", "a"];
        assert_eq!(f.pick(&w, &HashMap::new()), Some(0));
        assert_eq!(serve_all(&mut f, &mut w, &mut HashMap::new()), "aaa");
    }

    #[test]
    fn a_fan_out_does_not_starve_a_later_owner() {
        let mut f = FairShare::new(0);
        let mut w = vec!["a", "a", "a", "a", "b", "b", "c"];
        assert_eq!(serve_all(&mut f, &mut w, &mut HashMap::new()), "abcabaa");
    }

    #[test]
    fn two_waiting_owners_alternate_across_arrivals() {
        let mut f = FairShare::new(0);
        let held = HashMap::new();
        let mut w = vec!["a", "a", "a", "b"];
        let mut order = String::new();
        for arrival in ["b", "a", "b"] {
            let i = f.pick(&w, &held).unwrap();
            let o = w.remove(i);
            f.served(o, &w);
            order.push_str(o);
            w.push(arrival);
        }
        assert_eq!(order, "aba");
        let i = f.pick(&w, &held).unwrap();
        assert_eq!(w[i], "b", "b was served less recently than a");
    }

    #[test]
    fn an_owner_at_its_limit_waits_and_others_are_served() {
        let f = FairShare::new(2);
        let held = count_by_owner(["a", "a", "b"]);
        assert_eq!(f.pick(&["a", "a", "b"], &held), Some(2));
        assert_eq!(f.pick(&["a", "a"], &held), None, "a holds 2 of 2: no VM for a");
        assert!(!f.may_take(2) && f.may_take(1));
        assert_eq!(f.servable(&["a", "a", "b", "b", "c"], &held), 1 + 1, "a: none; b: one more; c: one");
        assert_eq!(FairShare::new(0).servable(&["a", "a"], &held), 2);
    }

    #[test]
    fn grants_never_exceed_the_limit() {
        let mut f = FairShare::new(2);
        let mut held = HashMap::new();
        let mut w = vec!["a", "a", "a", "b", "b", "b", "c"];
        assert_eq!(serve_all(&mut f, &mut w, &mut held), "abcab");
        assert_eq!(w, vec!["a", "b"], "one of each waits for a release");
        assert!(held.values().all(|n| *n <= 2));
    }

    #[test]
    fn memory_of_turns_is_bounded() {
        let mut f = FairShare::new(0);
        let names: Vec<String> = (0..500).map(|i| format!("o{i}")).collect();
        for n in &names {
            f.served(n, &["x"]);
        }
        assert!(f.turns.len() <= 1 + MEMORY_SLACK + 1);
        f.forget(&[]);
        assert!(f.turns.is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Arrive(usize),
        Grant,
        Release(usize),
    }

    const WHO: [&str; 3] = ["a", "b", "c"];

    use proptest::prelude::*;

    proptest! {
        /// Driven as the engine drives it: no owner ever exceeds the limit, and an owner is
        /// never served twice in a row while another owner has a waiter it could serve.
        #[test]
        fn turns_alternate_and_limits_hold(
            limit in 0..3u32,
            ops in proptest::collection::vec(
                prop_oneof![
                    3 => (0..3usize).prop_map(Op::Arrive),
                    3 => Just(Op::Grant),
                    1 => (0..3usize).prop_map(Op::Release),
                ],
                1..60,
            ),
        ) {
            let mut f = FairShare::new(limit);
            let mut waiting: Vec<&str> = Vec::new();
            let mut held: HashMap<String, usize> = HashMap::new();
            let mut last: Option<&str> = None;
            for op in ops {
                match op {
                    Op::Arrive(o) => waiting.push(WHO[o]),
                    Op::Release(o) => {
                        if let Some(n) = held.get_mut(WHO[o]) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    Op::Grant => {
                        let Some(i) = f.pick(&waiting, &held) else {
                            let blocked = waiting.iter().all(|o| !f.may_take(held.get(*o).copied().unwrap_or(0)));
                            prop_assert!(blocked, "nobody picked though someone could be served");
                            continue;
                        };
                        let o = waiting.remove(i);
                        let n = held.entry(o.to_string()).or_default();
                        *n += 1;
                        prop_assert!(limit == 0 || *n <= limit as usize, "{o} holds {n} > {limit}");
                        if last == Some(o) {
                            let others = waiting.iter().filter(|w| **w != o);
                            let servable = others.filter(|w| f.may_take(held.get(**w).copied().unwrap_or(0))).count();
                            prop_assert_eq!(servable, 0, "{} served twice in a row while another could be", o);
                        }
                        f.served(o, &waiting);
                        // A pool nobody waits in starts over (the engine forgets the turns too).
                        last = if waiting.is_empty() { None } else { Some(o) };
                    }
                }
            }
        }
    }
}
