//! A pool that sizes itself (`autoscale = "demand"`): how many ready VMs it keeps, from what it
//! observed (when acquires arrived, how long a VM took to become ready again) and the time. By
//! Little's law a pool needs about `rate * refill_time` ready VMs to serve what arrives while
//! used ones are being reset or new ones launched: that is the number of acquires within one
//! refill time, counted over a sliding window. Acquires close together (less than a refill
//! time apart) form a burst; its size is the largest such count. The target is the expected
//! burst's size times `1 + MARGIN`, between `min_ready` and `max_size`:
//! - after a single burst (no period known yet), held for one window after its last acquire,
//!   then decaying with the pool's `autoscale_decay`;
//! - once bursts recur (the period between their starts is known), planned for: between bursts
//!   the need falls to nothing (idle VMs above `min_ready` go after the pool's `idle_timeout`,
//!   as always; a long `idle_timeout` keeps them) and rises again one lead before the next
//!   burst is due (the time a new VM takes, with margin, plus a tenth of the period for jitter),
//!   so the next burst is served warm without paying for VMs through the quiet; during a burst
//!   the need is lowered by the acquires it already took (their VMs come back through a reset;
//!   replacing them would build VMs nobody waits for); when the next burst is late it is held,
//!   and once overdue ([`HOLD_PERIODS`] periods after the last one started) it decays with
//!   `autoscale_decay`.
//!
//! Plain data and arithmetic, no I/O, no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::pool_config::{Autoscale, PoolConfig};

/// Head-room above the expected need: 25%.
pub const MARGIN: f64 = 0.25;

/// The refill time assumed before any was observed.
pub const DEFAULT_REFILL: Duration = Duration::from_secs(30);

/// Bursts keep their VMs this many periods after the last one started; later they decay.
pub const HOLD_PERIODS: f64 = 2.0;

/// Weight of each new refill observation in its moving average.
const REFILL_WEIGHT: f64 = 0.3;

/// The share of the period a burst is raised for ahead of its time (besides the time a new VM
/// takes), for a period that wavers.
pub const JITTER: f64 = 0.1;

/// Weight of each new interval between burst starts in the period's moving average.
const PERIOD_WEIGHT: f64 = 0.5;

/// Most acquires remembered for the window count (bounded memory, far above any pool's size).
const MAX_RECENT: usize = 4096;

/// Below this many VMs' worth, a decaying target counts as nothing (so it reaches its floor).
const NEGLIGIBLE: f64 = 1e-3;

/// Whether `gap` is two or more periods `p`, within [`JITTER`] of a period each: bursts that
/// did not come, not a longer period.
fn skipped(gap: f64, p: f64) -> bool {
    let k = (gap / p).round();
    k >= 2.0 && (gap - k * p).abs() <= JITTER * p * k
}

/// Acquires close together: a burst.
#[derive(Clone, Debug)]
struct Burst {
    /// Its first acquire.
    start: Instant,
    /// Its latest acquire.
    last: Instant,
    /// The most acquires it had within one window: the VMs it needed.
    size: usize,
    /// Acquires in it so far.
    taken: usize,
}

/// What a pool observed of its demand.
#[derive(Clone, Debug, Default)]
pub struct Demand {
    /// Acquires per second, decaying with the refill time (reported, not decided on).
    rate: f64,
    /// When `rate` was last brought up to date.
    at: Option<Instant>,
    /// Moving average of the refill time, in seconds.
    refill: Option<f64>,
    /// Moving average of the time a new VM took to be ready (a launch), in seconds.
    build: Option<f64>,
    /// The latest acquires, within one window of the newest.
    recent: VecDeque<Instant>,
    /// The current (or last) burst.
    burst: Option<Burst>,
    /// The size of the burst before it (0: none).
    previous: usize,
    /// Moving average of the time between burst starts, in seconds, once bursts recur.
    period: Option<f64>,
}

impl Demand {
    /// The refill time it works with: the observed average, or [`DEFAULT_REFILL`].
    pub fn refill_time(&self) -> Duration {
        self.refill.map_or(DEFAULT_REFILL, Duration::from_secs_f64)
    }

    /// The arrival rate (acquires per second) as of `now`.
    pub fn rate(&self, now: Instant) -> f64 {
        let Some(at) = self.at else {
            return 0.0;
        };
        self.rate * (-now.saturating_duration_since(at).as_secs_f64() / self.window()).exp()
    }

    /// The period between burst starts, once bursts recur.
    pub fn period(&self) -> Option<Duration> {
        self.period.map(Duration::from_secs_f64)
    }

    /// How long before a recurring burst is due its VMs are wanted ready: the time a new VM
    /// takes with [`MARGIN`], plus [`JITTER`] of the period. Until a launch was seen (after a
    /// restart of mpool), the refill time, at least [`DEFAULT_REFILL`]: a reset is quicker than a
    /// launch, and raising late serves the burst cold.
    pub fn lead(&self) -> Duration {
        let build = self.build.unwrap_or_else(|| self.refill_time().max(DEFAULT_REFILL).as_secs_f64());
        Duration::try_from_secs_f64(build * (1.0 + MARGIN) + JITTER * self.period.unwrap_or(0.0))
            .unwrap_or(DEFAULT_REFILL)
    }

    /// The window acquires are counted over, and the gap that ends a burst: the refill time
    /// (at least one second).
    fn window(&self) -> f64 {
        self.refill_time().as_secs_f64().max(1.0)
    }

    /// An acquire arrived.
    pub fn arrival(&mut self, now: Instant, decay: Duration) {
        let window = self.window();
        self.rate = self.rate(now) + 1.0 / window;
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
        while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t).as_secs_f64() >= window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let count = self.recent.len();
        match &mut self.burst {
            Some(b) if now.saturating_duration_since(b.last).as_secs_f64() < window => {
                b.last = b.last.max(now);
                b.size = b.size.max(count);
                b.taken += 1;
            }
            _ => {
                if let Some(b) = self.burst.take() {
                    // Bursts recur when the next one starts within the pool's memory.
                    let gap = now.saturating_duration_since(b.start).as_secs_f64();
                    self.period = (gap <= decay.as_secs_f64()).then(|| match self.period {
                        // A multiple of the period: bursts were skipped, the period stands.
                        Some(p) if skipped(gap, p) => p,
                        Some(p) => p + PERIOD_WEIGHT * (gap - p),
                        None => gap,
                    });
                    self.previous = b.size;
                }
                self.burst = Some(Burst { start: now, last: now, size: count, taken: 1 });
            }
        }
    }

    /// A VM became ready again after `took` (a reset after a release, or a launch).
    pub fn refilled(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.refill = Some(match self.refill {
            None => s,
            Some(avg) => avg + REFILL_WEIGHT * (s - avg),
        });
    }

    /// A new VM became ready after `took` (a launch; also counted by [`Demand::refilled`]).
    pub fn built(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.build = Some(match self.build {
            None => s,
            Some(avg) => avg + REFILL_WEIGHT * (s - avg),
        });
    }

    /// The VMs wanted ready at `now`, before rounding and bounds.
    fn need(&self, now: Instant, decay: Duration) -> f64 {
        let Some(b) = &self.burst else {
            return 0.0;
        };
        let full = self.previous.max(b.size) as f64 * (1.0 + MARGIN);
        let decaying = |from: Instant| {
            full * (-now.saturating_duration_since(from).as_secs_f64() / decay.as_secs_f64().max(1e-3)).exp()
        };
        let Some(period) = self.period else {
            // A single burst: its acquires count for one window (Little's law), then decay.
            let window = Duration::try_from_secs_f64(self.window()).unwrap_or(Duration::ZERO);
            return decaying(b.last.checked_add(window).unwrap_or(b.last));
        };
        if now.saturating_duration_since(b.last).as_secs_f64() < self.window() {
            // Within a burst of a known pattern: what is still to come of it.
            return (full - b.taken as f64).max(0.0);
        }
        // Between bursts: nothing until one lead before the next one is due; then held until it
        // is overdue, then decaying.
        let due = Duration::try_from_secs_f64(period).ok().and_then(|p| b.start.checked_add(p));
        if let Some(raise) = due.and_then(|due| due.checked_sub(self.lead()))
            && now < raise
        {
            return 0.0;
        }
        match Duration::try_from_secs_f64(HOLD_PERIODS * period).ok().and_then(|hold| b.start.checked_add(hold)) {
            Some(overdue) => decaying(overdue),
            None => full,
        }
    }

    /// The ready target at `now`: `min_ready` when autoscale is off; else the need, rounded
    /// up, between `min_ready` and `max_size`.
    pub fn target(&self, cfg: &PoolConfig, now: Instant) -> u32 {
        self.target_above(cfg, cfg.min_ready, now)
    }

    /// [`Demand::target`] with the floor `floor` (at least `min_ready`: a preheat or a
    /// schedule raises it), never above `max_size` (nor below `min_ready`).
    pub fn target_above(&self, cfg: &PoolConfig, floor: u32, now: Instant) -> u32 {
        let floor = floor.max(cfg.min_ready).min(cfg.max_size.max(cfg.min_ready));
        if cfg.autoscale == Autoscale::Off {
            return floor;
        }
        let need = self.need(now, cfg.autoscale_decay) - NEGLIGIBLE;
        let need = if need > 0.0 { need.ceil().min(f64::from(u32::MAX)) as u32 } else { 0 };
        need.clamp(floor, cfg.max_size.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(min_ready: u32, max_size: u32) -> PoolConfig {
        let mut c = PoolConfig::with_defaults("ci");
        (c.min_ready, c.max_size) = (min_ready, max_size);
        c.autoscale = Autoscale::Demand;
        c.autoscale_decay = Duration::from_secs(600);
        c
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A demand that saw refills of 30 s and `n` acquires within one second at `t0`.
    fn burst(t0: Instant, n: u32, c: &PoolConfig) -> Demand {
        let mut d = Demand::default();
        d.refilled(secs(30.0));
        for i in 0..n {
            d.arrival(t0 + secs(f64::from(i) / f64::from(n)), c.autoscale_decay);
        }
        d
    }

    #[test]
    fn off_is_min_ready_whatever_the_demand() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        let d = burst(t0, 12, &c);
        assert!(d.target(&c, t0 + secs(1.0)) > 2);
        c.autoscale = Autoscale::Off;
        assert_eq!(d.target(&c, t0 + secs(1.0)), 2);
    }

    #[test]
    fn a_burst_grows_the_target_to_about_its_size_with_margin() {
        let t0 = Instant::now();
        let c = cfg(2, 20);
        assert_eq!(Demand::default().target(&c, t0), 2, "no demand seen: min_ready");
        let d = burst(t0, 6, &c);
        let t = d.target(&c, t0 + secs(1.0));
        assert!((6..=8).contains(&t), "6 acquires within a second, 25% margin: {t}");
        let d = burst(t0, 40, &c);
        assert_eq!(d.target(&c, t0 + secs(1.0)), 20, "never above max_size");
    }

    #[test]
    fn the_target_decays_after_the_burst_down_to_min_ready() {
        let t0 = Instant::now();
        let c = cfg(2, 20);
        let d = burst(t0, 8, &c);
        let mut last = d.target(&c, t0 + secs(1.0));
        assert!(last >= 8);
        assert!(d.target(&c, t0 + secs(120.0)) >= 6, "the peak is held well past the refill time");
        for s in (60..=3600).step_by(60) {
            let t = d.target(&c, t0 + secs(f64::from(s)));
            assert!(t <= last, "the target only falls without arrivals");
            last = t;
        }
        assert_eq!(last, 2, "an hour later (6 decay constants): back at min_ready");
    }

    #[test]
    fn a_steady_rate_needs_rate_times_refill_time() {
        let t0 = Instant::now();
        let c = cfg(0, 50);
        let mut d = Demand::default();
        for _ in 0..10 {
            d.refilled(secs(30.0));
        }
        // One acquire every 5 s for an hour: 0.2/s * 30 s = 6 VMs, 7.5 with the margin.
        for i in 0..720 {
            d.arrival(t0 + secs(f64::from(i) * 5.0), c.autoscale_decay);
        }
        let t = d.target(&c, t0 + secs(3600.0));
        assert!((7..=9).contains(&t), "{t}");
    }

    #[test]
    fn refill_time_is_a_moving_average() {
        let mut d = Demand::default();
        assert_eq!(d.refill_time(), DEFAULT_REFILL);
        d.refilled(secs(10.0));
        assert_eq!(d.refill_time(), secs(10.0));
        d.refilled(secs(20.0));
        assert!((d.refill_time().as_secs_f64() - 13.0).abs() < 1e-9);
    }

    /// Bursts of `n` acquires within one second, every `every` seconds from `t0`, with refills of
    /// 2 s (so one burst's acquires are one window apart at most).
    fn bursts(t0: Instant, n: u32, every: f64, count: u32, c: &PoolConfig) -> Demand {
        let mut d = quick();
        for b in 0..count {
            burst_at(&mut d, t0 + secs(f64::from(b) * every), n, c);
        }
        d
    }

    /// A demand that saw resets and launches of 2 s.
    fn quick() -> Demand {
        let mut d = Demand::default();
        d.refilled(secs(2.0));
        d.built(secs(2.0));
        d
    }

    /// `n` acquires within one second from `at`.
    fn burst_at(d: &mut Demand, at: Instant, n: u32, c: &PoolConfig) {
        for i in 0..n {
            d.arrival(at + secs(f64::from(i) / f64::from(n)), c.autoscale_decay);
        }
    }

    #[test]
    fn recurring_bursts_are_planned_for_one_lead_before_they_are_due() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        c.autoscale_decay = Duration::from_secs(60);
        let mut d = bursts(t0, 6, 15.0, 3, &c);
        assert_eq!(d.period(), Some(secs(15.0)));
        // The lead: a new VM's time (2 s) with margin plus a tenth of the period.
        assert_eq!(d.lead(), secs(2.0 * 1.25 + 1.5));
        // The 3rd burst (30 s) is over a window after its last acquire: the quiet needs nothing
        // above min_ready, until one lead before the 4th (45 s) is due.
        for s in [3.0, 6.0, 10.9] {
            assert_eq!(d.target(&c, t0 + secs(30.0 + s)), 2, "{s} s after the 3rd burst");
        }
        // From then on: 6 acquires, 25% margin, not decayed.
        for s in [11.0, 14.9, 15.5, 20.0] {
            assert_eq!(d.target(&c, t0 + secs(30.0 + s)), 8, "{s} s after the 3rd burst");
        }
        // A new VM that takes longer raises it earlier: 6 s with margin plus 1.5 s, 9 s before.
        for _ in 0..30 {
            d.built(secs(6.0));
        }
        assert_eq!(d.target(&c, t0 + secs(35.9)), 2);
        assert_eq!(d.target(&c, t0 + secs(36.1)), 8);
        // A single burst decays from its last acquire: 15 s later it no longer covers 7.5 VMs.
        let one = bursts(t0, 6, 15.0, 1, &c);
        assert!(one.period().is_none());
        assert!(one.target(&c, t0 + secs(15.0)) < 8);
    }

    #[test]
    fn without_a_launch_seen_the_lead_is_at_least_the_default_refill() {
        let mut d = Demand::default();
        d.refilled(secs(2.0));
        assert_eq!(d.lead(), secs(30.0 * 1.25), "a reset's 2 s would raise a burst too late after a restart");
        d.built(secs(40.0));
        assert_eq!(d.lead(), secs(40.0 * 1.25));
    }

    #[test]
    fn a_skipped_burst_keeps_the_period() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        c.autoscale_decay = Duration::from_secs(60);
        let mut d = quick();
        // Every 15 s, but the burst at 45 s did not come.
        for start in [0.0, 15.0, 30.0, 60.0, 75.0] {
            if start == 75.0 {
                assert_eq!(d.target(&c, t0 + secs(74.99)), 8, "the burst after the skipped one is planned for");
                assert_eq!(d.target(&c, t0 + secs(68.0)), 2, "the quiet before it needs nothing");
            }
            burst_at(&mut d, t0 + secs(start), 6, &c);
        }
        assert_eq!(d.period(), Some(secs(15.0)));
    }

    #[test]
    fn a_period_that_wavers_still_finds_each_burst_raised() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        c.autoscale_decay = Duration::from_secs(60);
        let mut d = quick();
        // Bursts of 6 about every 15 s, each up to 1 s early or late.
        let mut start = 0.0;
        for (b, jitter) in [0.0, 0.8, -0.9, 0.5, -1.0, 1.0, -0.6, 0.3].into_iter().enumerate() {
            start += if b == 0 { 0.0 } else { 15.0 + jitter };
            if b >= 3 {
                let before = d.target(&c, t0 + secs(start - 0.01));
                assert_eq!(before, 8, "burst {b} at {start} s: the target right before it");
                let quiet = d.target(&c, t0 + secs(start - 7.0));
                assert_eq!(quiet, 2, "burst {b}: the quiet before it needs nothing");
            }
            burst_at(&mut d, t0 + secs(start), 6, &c);
        }
    }

    #[test]
    fn within_a_recurring_burst_the_target_falls_by_what_it_already_took() {
        let t0 = Instant::now();
        let c = cfg(2, 20);
        let mut d = bursts(t0, 6, 15.0, 2, &c);
        let third = t0 + secs(30.0);
        for i in 0..6 {
            d.arrival(third + secs(f64::from(i) / 6.0), c.autoscale_decay);
            let t = d.target(&c, third + secs(f64::from(i) / 6.0));
            // 7.5 expected, i + 1 taken: what is still to come (their VMs come back reset).
            assert_eq!(t, (8 - (i + 1)).max(2), "after {} acquires", i + 1);
        }
        // Once the burst is over (a window without acquires), the quiet needs nothing; the next
        // one is planned for again one lead (4 s) before it is due.
        assert_eq!(d.target(&c, third + secs(4.0)), 2);
        assert_eq!(d.target(&c, third + secs(11.5)), 8);
        // A burst larger than the pattern's: still within bounds, and remembered for the next.
        for i in 0..10 {
            d.arrival(t0 + secs(45.0 + f64::from(i) / 10.0), c.autoscale_decay);
        }
        assert_eq!(d.target(&c, t0 + secs(57.0)), 13, "before the next: 10 acquires, 25% margin");
    }

    #[test]
    fn when_the_bursts_stop_the_target_decays_to_min_ready() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        c.autoscale_decay = Duration::from_secs(60);
        let d = bursts(t0, 6, 15.0, 4, &c);
        let last = t0 + secs(45.0);
        // Raised before the next burst is due and held until it is overdue: two periods after
        // the last one started.
        assert_eq!(d.target(&c, last + secs(15.0)), 8);
        assert_eq!(d.target(&c, last + secs(29.0)), 8);
        let mut prev = 8;
        for s in (30..=600).step_by(5) {
            let t = d.target(&c, last + secs(f64::from(s)));
            assert!(t <= prev, "the target only falls without acquires ({s} s: {t} > {prev})");
            prev = t;
        }
        assert!(d.target(&c, last + secs(90.0)) < 8, "a decay constant after it was due");
        assert_eq!(prev, 2, "nine decay constants later: back at min_ready");
    }

    #[test]
    fn a_burst_after_a_long_quiet_starts_over_without_a_period() {
        let t0 = Instant::now();
        let mut c = cfg(2, 20);
        c.autoscale_decay = Duration::from_secs(60);
        let mut d = bursts(t0, 6, 15.0, 3, &c);
        assert!(d.period().is_some());
        // An hour later: not the same pattern; it decays from its own last acquire.
        let later = t0 + secs(3600.0);
        d.arrival(later, c.autoscale_decay);
        assert!(d.period().is_none());
        assert_eq!(d.target(&c, later), 8, "the largest burst it knows, with margin");
        assert_eq!(d.target(&c, later + secs(600.0)), 2);
    }

    #[test]
    fn a_preheat_or_schedule_floor_holds_under_a_recurring_pattern() {
        let t0 = Instant::now();
        let c = cfg(2, 20);
        let mut d = bursts(t0, 6, 15.0, 2, &c);
        let third = t0 + secs(30.0);
        burst_at(&mut d, third, 6, &c);
        assert_eq!(d.target(&c, third + secs(1.0)), 2, "the burst took what was planned for it");
        assert_eq!(d.target_above(&c, 5, third + secs(1.0)), 5, "a floor above the need holds");
        assert_eq!(d.target_above(&c, 5, third + secs(6.0)), 5, "the floor holds through the quiet");
        assert_eq!(d.target_above(&c, 5, third + secs(12.0)), 8, "a need above the floor wins");
        assert_eq!(d.target_above(&c, 50, third + secs(12.0)), 20, "never above max_size");
    }

    proptest! {
        /// Any trace of arrivals and refills: the target stays within [min_ready, max_size].
        #[test]
        fn the_target_stays_within_its_bounds(
            min_ready in 0..5u32,
            extra in 0..10u32,
            trace in proptest::collection::vec((0..100_000u64, proptest::option::of(0..600_000u64)), 0..80),
        ) {
            let c = cfg(min_ready, min_ready + extra);
            let t0 = Instant::now();
            let mut d = Demand::default();
            let mut now = t0;
            for (gap_ms, refill_ms) in trace {
                now += Duration::from_millis(gap_ms);
                match refill_ms {
                    Some(ms) => d.refilled(Duration::from_millis(ms)),
                    None => d.arrival(now, c.autoscale_decay),
                }
                let t = d.target(&c, now);
                prop_assert!(t >= c.min_ready && t <= c.max_size, "{t} outside [{}, {}]", c.min_ready, c.max_size);
            }
        }
    }
}
