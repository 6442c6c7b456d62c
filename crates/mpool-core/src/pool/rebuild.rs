//! `rebuild_every`: when a pool's generation is due for a bump, so its VMs are rebuilt from
//! the image (picking up image and package updates) and idle ones rotate as on a config
//! change. The time a generation began is stored with it, so the schedule survives restarts.

use std::time::Duration;

use crate::pool_config::PoolConfig;
use crate::store::PoolRecord;

/// Whether a generation that began at `since_ms` is due for a rebuild at `now_ms`.
pub fn due(cfg: &PoolConfig, since_ms: u64, now_ms: u64) -> bool {
    cfg.rebuild_every.is_some_and(|every| now_ms.saturating_sub(since_ms) >= millis(every))
}

/// A pool's generation at start, and when it began: the stored one while the config's key is
/// the same (a record without a start time starts its clock now), the next one when the key
/// changed or a rebuild fell due while mpool was down, 1 for a new pool.
pub fn generation_at_start(cfg: &PoolConfig, key: &str, record: Option<&PoolRecord>, now_ms: u64) -> (u64, u64) {
    match record {
        Some(r) if r.key == key => {
            let since = if r.since_ms == 0 { now_ms } else { r.since_ms };
            if due(cfg, since, now_ms) { (r.generation.saturating_add(1), now_ms) } else { (r.generation, since) }
        }
        Some(r) => (r.generation.saturating_add(1), now_ms),
        None => (1, now_ms),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn cfg(every: Option<Duration>) -> PoolConfig {
        let mut p = PoolConfig::with_defaults("ci");
        p.rebuild_every = every;
        p
    }

    fn rec(generation: u64, key: &str, since_ms: u64) -> PoolRecord {
        PoolRecord { name: "ci".into(), generation, key: key.into(), since_ms }
    }

    #[test]
    fn a_generation_is_due_once_its_period_has_passed() {
        let week = cfg(Some(Duration::from_secs(7 * 86_400)));
        assert!(!due(&week, 10 * DAY, 16 * DAY));
        assert!(due(&week, 10 * DAY, 17 * DAY));
        assert!(!due(&cfg(None), 0, 1000 * DAY), "off by default");
    }

    #[test]
    fn the_schedule_survives_a_restart_and_catches_up_after_downtime() {
        let week = cfg(Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(generation_at_start(&week, "k", None, 5 * DAY), (1, 5 * DAY));
        assert_eq!(generation_at_start(&week, "k", Some(&rec(3, "k", 2 * DAY)), 5 * DAY), (3, 2 * DAY), "kept");
        assert_eq!(
            generation_at_start(&week, "k", Some(&rec(3, "k", 2 * DAY)), 9 * DAY),
            (4, 9 * DAY),
            "due while down"
        );
        assert_eq!(
            generation_at_start(&week, "new", Some(&rec(3, "k", 2 * DAY)), 5 * DAY),
            (4, 5 * DAY),
            "config changed"
        );
        assert_eq!(
            generation_at_start(&week, "k", Some(&rec(3, "k", 0)), 5 * DAY),
            (3, 5 * DAY),
            "old record: clock starts now"
        );
    }
}
