//! The last hour of acquire latency and reset duration per pool, one point per minute, in
//! memory: what the status page draws its small charts from (`GET /v1/history`).
//!
//! Each series is a ring of at most [`MINUTES`] points (count, sum and max of the minute's
//! figures), fed where the histograms are fed, under a mutex of its own held for a few
//! additions (never the engine's). Pools are the metrics' bounded label set, so memory is
//! bounded too. Only aggregate figures are kept: no holder, lease or owner. Minutes come from
//! a [`Clock`] (the system's wall clock unless a test injects one).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How many minutes a series keeps: one hour.
pub const MINUTES: usize = 60;

/// Where [`History`] reads the time.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// One minute of one series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    /// The minute: whole minutes since the Unix epoch.
    pub minute: u64,
    /// How many figures fell into the minute.
    pub count: u64,
    /// Their sum, seconds.
    pub sum: f64,
    /// The largest, seconds (0 without any).
    pub max: f64,
}

impl Point {
    /// The mean, seconds (`None` without any figure).
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// A series: at most [`MINUTES`] points, oldest first, one per minute that had figures.
#[derive(Clone, Debug, Default)]
struct Ring {
    points: VecDeque<Point>,
}

impl Ring {
    /// Adds `secs` to `minute`'s point. A minute older than the newest point (the wall clock
    /// stepped back) counts in the newest, so points stay in order.
    fn record(&mut self, minute: u64, secs: f64) {
        match self.points.back_mut() {
            Some(p) if p.minute >= minute => {
                p.count += 1;
                p.sum += secs;
                p.max = p.max.max(secs);
            }
            _ => self.points.push_back(Point { minute, count: 1, sum: secs, max: secs }),
        }
        self.forget_before(minute);
    }

    /// Drops the points that fell out of the hour ending at `now` (and any beyond the bound).
    fn forget_before(&mut self, now: u64) {
        let oldest = now.saturating_sub(MINUTES as u64 - 1);
        while self.points.front().is_some_and(|p| p.minute < oldest) || self.points.len() > MINUTES {
            self.points.pop_front();
        }
    }

    /// The hour ending at minute `now`: [`MINUTES`] points, oldest first, zero where a minute
    /// had no figure.
    fn hour(&self, now: u64) -> Vec<Point> {
        let first = now.saturating_sub(MINUTES as u64 - 1);
        let mut out: Vec<Point> = (first..=now).map(|minute| Point { minute, ..Point::default() }).collect();
        for p in &self.points {
            if let Some(slot) = p.minute.checked_sub(first).and_then(|i| out.get_mut(i as usize)) {
                *slot = *p;
            }
        }
        out
    }
}

/// The two series of one pool.
#[derive(Clone, Debug, Default)]
struct PoolRings {
    acquire: Ring,
    reset: Ring,
}

/// One pool's last hour.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolHistory {
    /// The pool.
    pub pool: String,
    /// Time to serve an Acquire (successful ones), per minute.
    pub acquire: Vec<Point>,
    /// Time to reset a VM after its lease, per minute.
    pub reset: Vec<Point>,
}

/// Every pool's last hour, as of one minute.
#[derive(Clone, Debug, PartialEq)]
pub struct HistorySnapshot {
    /// The current minute (the last point of every series).
    pub now: u64,
    /// The pools, by name.
    pub pools: Vec<PoolHistory>,
}

/// The per-minute rings of every pool; shared by the clones of a [`crate::Metrics`].
pub struct History {
    clock: Clock,
    pools: Mutex<BTreeMap<String, PoolRings>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("pools", &self.lock().len()).finish()
    }
}

impl Default for History {
    fn default() -> History {
        History::new(Arc::new(SystemTime::now))
    }
}

/// Whole minutes since the Unix epoch at `t` (0 before it).
fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() / 60
}

impl History {
    /// An empty history reading the time from `clock`.
    pub fn new(clock: Clock) -> History {
        History { clock, pools: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, PoolRings>> {
        // A panic while holding the lock leaves at worst one half-added figure: keep going.
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        minute_of((self.clock)())
    }

    /// Keeps exactly `pools` (empty series for new ones; a pool no longer configured goes).
    pub fn set_pools(&self, pools: &std::collections::BTreeSet<String>) {
        let mut map = self.lock();
        map.retain(|name, _| pools.contains(name));
        for p in pools {
            map.entry(p.clone()).or_default();
        }
    }

    /// An Acquire of `pool` was served in `took`.
    pub fn acquired(&self, pool: &str, took: Duration) {
        let now = self.now();
        self.lock().entry(pool.to_string()).or_default().acquire.record(now, took.as_secs_f64());
    }

    /// A VM of `pool` was reset in `took`.
    pub fn reset(&self, pool: &str, took: Duration) {
        let now = self.now();
        self.lock().entry(pool.to_string()).or_default().reset.record(now, took.as_secs_f64());
    }

    /// The last hour of every pool, as of now.
    pub fn snapshot(&self) -> HistorySnapshot {
        let now = self.now();
        let pools = self
            .lock()
            .iter()
            .map(|(pool, r)| PoolHistory { pool: pool.clone(), acquire: r.acquire.hour(now), reset: r.reset.hour(now) })
            .collect();
        HistorySnapshot { now, pools }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock the test moves: seconds since the epoch.
    fn clock() -> (Arc<AtomicU64>, Clock) {
        let secs = Arc::new(AtomicU64::new(1_000 * 60));
        let s = secs.clone();
        (secs, Arc::new(move || UNIX_EPOCH + Duration::from_secs(s.load(Ordering::SeqCst))))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_minute_aggregates_and_the_next_starts_a_new_point() {
        let (secs, clock) = clock();
        let h = History::new(clock);
        h.acquired("ci", ms(100));
        secs.fetch_add(59, Ordering::SeqCst); // still minute 1000
        h.acquired("ci", ms(300));
        secs.fetch_add(1, Ordering::SeqCst); // minute 1001
        h.acquired("ci", ms(50));
        h.reset("ci", ms(2_000));

        let s = h.snapshot();
        assert_eq!(s.now, 1_001);
        let ci = &s.pools[0];
        assert_eq!((ci.pool.as_str(), ci.acquire.len(), ci.reset.len()), ("ci", MINUTES, MINUTES));
        let (prev, last) = (ci.acquire[MINUTES - 2], ci.acquire[MINUTES - 1]);
        assert_eq!((prev.minute, prev.count, prev.max), (1_000, 2, 0.3));
        assert!((prev.mean().unwrap() - 0.2).abs() < 1e-9, "{prev:?}");
        assert_eq!((last.minute, last.count, last.sum, last.max), (1_001, 1, 0.05, 0.05));
        assert_eq!(ci.acquire[0], Point { minute: 1_001 - 59, ..Point::default() });
        assert_eq!(ci.acquire[0].mean(), None);
        assert_eq!((ci.reset[MINUTES - 1].count, ci.reset[MINUTES - 2].count), (1, 0));
    }

    #[test]
    fn the_ring_is_bounded_and_forgets_what_is_older_than_an_hour() {
        let (secs, clock) = clock();
        let h = History::new(clock);
        for _ in 0..500 {
            h.acquired("ci", ms(10));
            secs.fetch_add(60, Ordering::SeqCst);
        }
        let now = 1_000 + 500;
        assert_eq!(h.lock()["ci"].acquire.points.len(), MINUTES, "one point per minute, at most an hour");
        let s = h.snapshot();
        assert_eq!(s.now, now);
        let a = &s.pools[0].acquire;
        assert_eq!(a.len(), MINUTES);
        assert_eq!(a.first().unwrap().minute, now - 59);
        assert_eq!(a.last().unwrap().count, 0, "nothing yet in the current minute");
        assert!(a[..MINUTES - 1].iter().all(|p| p.count == 1), "{a:?}");

        // An idle hour later, everything has rolled out, though the ring still holds points.
        secs.fetch_add(3_600, Ordering::SeqCst);
        assert!(h.snapshot().pools[0].acquire.iter().all(|p| p.count == 0));
        h.acquired("ci", ms(10));
        assert_eq!(h.lock()["ci"].acquire.points.len(), 1, "recording drops the stale points");
    }

    #[test]
    fn a_clock_stepping_back_counts_in_the_newest_minute() {
        let (secs, clock) = clock();
        let h = History::new(clock);
        h.reset("ci", ms(10));
        secs.fetch_sub(600, Ordering::SeqCst);
        h.reset("ci", ms(20));
        let ring = &h.lock()["ci"].reset;
        assert_eq!(ring.points.len(), 1);
        assert_eq!((ring.points[0].minute, ring.points[0].count), (1_000, 2));
    }

    #[test]
    fn pools_follow_the_configuration() {
        let h = History::default();
        h.acquired("old", ms(1));
        h.set_pools(&["ci".to_string(), "big".to_string()].into());
        let names: Vec<String> = h.snapshot().pools.into_iter().map(|p| p.pool).collect();
        assert_eq!(names, ["big", "ci"]);
    }
}
