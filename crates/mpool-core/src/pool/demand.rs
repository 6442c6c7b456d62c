//! A pool that sizes itself (`autoscale = "demand"`): how many ready VMs it keeps, from what it
//! observed (when acquires arrived, how long a VM took to become ready again) and the time. By
//! Little's law a pool needs about `rate * refill_time` ready VMs to serve what arrives while
//! used ones are being reset or new ones launched; the target is that times `1 + MARGIN`,
//! between `min_ready` and `max_size`. After a burst the target decays with the pool's
//! `autoscale_decay` time constant. Plain data and arithmetic, no I/O, no clock.

use std::time::{Duration, Instant};

use crate::pool_config::{Autoscale, PoolConfig};

/// Head-room above the estimated need: 25%.
pub const MARGIN: f64 = 0.25;

/// The refill time assumed before any was observed.
pub const DEFAULT_REFILL: Duration = Duration::from_secs(30);

/// Weight of each new refill observation in its moving average.
const REFILL_WEIGHT: f64 = 0.3;

/// Below this many VMs' worth, a decaying target counts as nothing (so it reaches its floor).
const NEGLIGIBLE: f64 = 1e-3;

/// What a pool observed of its demand.
#[derive(Clone, Debug, Default)]
pub struct Demand {
    /// Acquires per second, decaying with the refill time (a burst of N within one refill
    /// time reads as about N per refill time).
    rate: f64,
    /// The highest need seen (in VMs), decaying with `autoscale_decay`.
    peak: f64,
    /// When `rate` and `peak` were last brought up to date.
    at: Option<Instant>,
    /// Moving average of the refill time, in seconds.
    refill: Option<f64>,
}

impl Demand {
    /// The refill time it works with: the observed average, or [`DEFAULT_REFILL`].
    pub fn refill_time(&self) -> Duration {
        self.refill.map_or(DEFAULT_REFILL, Duration::from_secs_f64)
    }

    /// The arrival rate (acquires per second) as of `now`.
    pub fn rate(&self, now: Instant, decay: Duration) -> f64 {
        self.decayed(now, decay).0
    }

    /// `rate` and `peak` as of `now`.
    fn decayed(&self, now: Instant, decay: Duration) -> (f64, f64) {
        let Some(at) = self.at else {
            return (0.0, 0.0);
        };
        let dt = now.saturating_duration_since(at).as_secs_f64();
        let rate = self.rate * (-dt / self.attack()).exp();
        let peak = self.peak * (-dt / decay.as_secs_f64().max(1e-3)).exp();
        (rate, peak)
    }

    /// The time constant of the arrival rate: the refill time (at least one second).
    fn attack(&self) -> f64 {
        self.refill_time().as_secs_f64().max(1.0)
    }

    /// VMs needed for this rate.
    fn need(&self, rate: f64) -> f64 {
        rate * self.refill_time().as_secs_f64() * (1.0 + MARGIN)
    }

    /// An acquire arrived.
    pub fn arrival(&mut self, now: Instant, decay: Duration) {
        let (rate, peak) = self.decayed(now, decay);
        self.rate = rate + 1.0 / self.attack();
        self.peak = peak.max(self.need(self.rate));
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    /// A VM became ready again after `took` (a reset after a release, or a launch).
    pub fn refilled(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.refill = Some(match self.refill {
            None => s,
            Some(avg) => avg + REFILL_WEIGHT * (s - avg),
        });
    }

    /// The ready target at `now`: `min_ready` when autoscale is off; else the decayed need,
    /// rounded up, between `min_ready` and `max_size`.
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
        let (rate, peak) = self.decayed(now, cfg.autoscale_decay);
        let need = peak.max(self.need(rate)) - NEGLIGIBLE;
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
