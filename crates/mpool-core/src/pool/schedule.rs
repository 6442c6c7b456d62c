//! Schedules (`[[pools.schedule]]`): a pool keeps a higher `min_ready` during recurring
//! periods (working hours, a nightly batch), as GitLab's autoscaler policies do. A period is a
//! cron expression with seconds (`sec min hour day month weekday [year]`, e.g.
//! `* * 8-18 * * mon-fri`): the schedule is active while the current time matches it, in UTC
//! or the host's local time. Pure: the time comes in.

use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Utc};

/// One schedule of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Cron expressions (with seconds), parsed once ([`parse_period`]); active while any
    /// matches.
    pub periods: Vec<cron::Schedule>,
    /// Ready VMs kept while active (at most the pool's `max_size`).
    pub min_ready: u32,
    /// Periods are in the host's local time (else UTC).
    pub local: bool,
}

/// A period, parsed; or why it is not usable, for the config's error message.
pub fn parse_period(period: &str) -> Result<cron::Schedule, String> {
    let fields: Vec<&str> = period.split_whitespace().collect();
    if !(6..=7).contains(&fields.len()) {
        return Err(format!(
            "{period:?} has {} fields; a period is a cron expression with seconds: \"sec min hour day month weekday [year]\", e.g. \"* * 8-18 * * mon-fri\"",
            fields.len()
        ));
    }
    // Weekday numbers differ between cron dialects (0 or 1 for Sunday, or Monday): names only.
    if fields[5].chars().any(|c| c.is_ascii_digit()) {
        return Err(format!(
            "{period:?}: write the weekday field with names (mon-fri, sat,sun): numbers mean different days in different cron dialects"
        ));
    }
    cron::Schedule::from_str(period).map_err(|e| format!("{period:?} is not a cron expression: {e}"))
}

/// The highest `min_ready` of the schedules active at `utc` (0 when none is), with `local` the
/// host's offset from UTC at that time.
pub fn floor(schedules: &[Schedule], utc: DateTime<Utc>, local: FixedOffset) -> u32 {
    schedules
        .iter()
        .filter(|s| {
            let at = if s.local { utc.with_timezone(&local) } else { utc.fixed_offset() };
            s.periods.iter().any(|c| c.includes(at))
        })
        .map(|s| s.min_ready)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn schedule(period: &str, min_ready: u32, local: bool) -> Schedule {
        Schedule { periods: vec![parse_period(period).unwrap()], min_ready, local }
    }

    fn working_hours(min_ready: u32, local: bool) -> Schedule {
        schedule("* * 8-17 * * mon-fri", min_ready, local)
    }

    #[test]
    fn a_schedule_is_active_while_its_period_matches() {
        let utc = FixedOffset::east_opt(0).unwrap();
        let s = [working_hours(4, false), schedule("* * 2 * * *", 2, false)];
        let tuesday = |h, m| Utc.with_ymd_and_hms(2026, 12, 1, h, m, 0).unwrap();
        assert_eq!(floor(&s, tuesday(9, 30), utc), 4);
        assert_eq!(floor(&s, tuesday(17, 59), utc), 4);
        assert_eq!(floor(&s, tuesday(18, 0), utc), 0);
        assert_eq!(floor(&s, tuesday(2, 15), utc), 2, "the nightly one");
        let saturday = Utc.with_ymd_and_hms(2026, 12, 5, 9, 30, 0).unwrap();
        assert_eq!(floor(&s, saturday, utc), 0);
        assert_eq!(floor(&[], tuesday(9, 30), utc), 0);
    }

    #[test]
    fn local_periods_follow_the_hosts_offset() {
        let berlin = FixedOffset::east_opt(3600).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 12, 1, 7, 30, 0).unwrap(); // 08:30 in Berlin
        assert_eq!(floor(&[working_hours(3, true)], at, berlin), 3);
        assert_eq!(floor(&[working_hours(3, false)], at, berlin), 0, "07:30 UTC is before 8");
    }

    #[test]
    fn periods_are_checked_with_a_hint() {
        assert!(parse_period("* * 8-17 * * mon-fri").is_ok());
        assert!(parse_period("0 0 2 * * * 2027").is_ok());
        assert!(parse_period("* 8-17 * * mon-fri").unwrap_err().contains("with seconds"));
        assert!(parse_period("* * 8-17 * * 1-5").unwrap_err().contains("names"));
        assert!(parse_period("* * 25 * * *").unwrap_err().contains("not a cron expression"));
    }
}
