//! Preheat: a caller raises a pool's ready floor for a while (e.g. a Kestra flow about to fan
//! out asks for 10 ready VMs for 5 minutes), so a burst is served warm instead of waiting for
//! cold VMs. Several preheats may be active at once; the floor is the highest of them, never
//! above `max_size`. Plain data, no clock: times come in.

use std::time::{Duration, Instant};

/// The most preheats a pool remembers at once (a new one beyond replaces the one that ends
/// first): callers cannot grow mpool's memory.
pub const MAX_ACTIVE: usize = 16;

/// The longest a preheat may last.
pub const MAX_FOR: Duration = Duration::from_secs(24 * 3600);

/// A pool's active preheats: (count, until).
#[derive(Clone, Debug, Default)]
pub struct Preheats {
    active: Vec<(u32, Instant)>,
}

impl Preheats {
    /// Adds a preheat of `count` ready VMs until `until`; drops the ended ones.
    pub fn add(&mut self, count: u32, until: Instant, now: Instant) {
        self.active.retain(|(_, u)| *u > now);
        if self.active.len() >= MAX_ACTIVE
            && let Some(i) = self.active.iter().enumerate().min_by_key(|(_, (_, u))| *u).map(|(i, _)| i)
        {
            self.active.swap_remove(i);
        }
        self.active.push((count, until));
    }

    /// The highest count active at `now` (0 when none), and until when it holds.
    pub fn floor(&self, now: Instant) -> (u32, Option<Instant>) {
        self.active
            .iter()
            .filter(|(_, u)| *u > now)
            .max_by_key(|(c, u)| (*c, *u))
            .map_or((0, None), |(c, u)| (*c, Some(*u)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_highest_active_preheat_until_it_ends() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Preheats::default();
        assert_eq!(p.floor(t0), (0, None));
        p.add(3, t0 + s(60), t0);
        p.add(5, t0 + s(30), t0);
        assert_eq!(p.floor(t0), (5, Some(t0 + s(30))));
        assert_eq!(p.floor(t0 + s(30)), (3, Some(t0 + s(60))), "the higher one ended");
        assert_eq!(p.floor(t0 + s(60)), (0, None), "both ended");
    }

    #[test]
    fn a_caller_cannot_grow_the_list() {
        let t0 = Instant::now();
        let mut p = Preheats::default();
        for i in 0..1000u32 {
            p.add(i % 7, t0 + Duration::from_secs(u64::from(i) + 1), t0);
        }
        assert!(p.active.len() <= MAX_ACTIVE);
        assert_eq!(p.floor(t0).0, 6, "the latest ones are kept");
    }
}
