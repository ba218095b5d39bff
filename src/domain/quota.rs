//! An account's token quota for the current period (the seed's `Manager`): `limit` tokens per
//! period (0 = unlimited), reset on a schedule, with a warning and an exhaustion event each emitted
//! once per period.

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use super::time::Millis;

/// The persisted part of a quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QuotaCounters {
    pub used: u64,
    pub period_start: Millis,
    pub period_end: Millis,
    pub warned: bool,
    pub exhausted: bool,
}

/// What crossing a threshold produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuotaEvent {
    Warning {
        used: u64,
        limit: u64,
        fraction: f64,
    },
    Exhausted {
        used: u64,
        limit: u64,
    },
    Reset {
        previous_used: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Quota {
    /// Tokens per period; 0 = unlimited.
    pub limit: u64,
    /// Committed tokens this period.
    used: u64,
    /// Estimates of reservations not yet settled.
    reserved: u64,
    period_start: Millis,
    period_end: Millis,
    schedule: Schedule,
    warning_threshold: f64,
    warned: bool,
    exhausted: bool,
    /// While instances sharing the quota cannot reach their shared ledger, this one keeps below
    /// this many tokens used and reserved (its part of what was left).
    share_cap: Option<u64>,
}

impl Quota {
    pub fn new(
        limit: u64,
        used: u64,
        schedule: Schedule,
        warning_threshold: f64,
        now: Millis,
    ) -> Quota {
        let mut quota = Quota {
            limit,
            used,
            reserved: 0,
            period_start: schedule.previous_at_or_before(now),
            period_end: schedule.next_after(now),
            schedule,
            warning_threshold,
            warned: false,
            exhausted: false,
            share_cap: None,
        };
        // A restored usage that is already past a threshold must not fire again.
        quota.warned = quota.past_warning();
        quota.exhausted = quota.is_exhausted();
        quota
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// When the current period ends (the seed's `ResetAt`).
    pub fn reset_at(&self) -> Millis {
        self.period_end
    }

    pub fn period_start(&self) -> Millis {
        self.period_start
    }

    pub fn unlimited(&self) -> bool {
        self.limit == 0
    }

    /// Used fraction of the limit (0 when unlimited).
    pub fn usage_fraction(&self) -> f64 {
        if self.unlimited() {
            0.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }

    /// Tokens left this period, counting reservations; `u64::MAX` when unlimited.
    pub fn remaining(&self) -> u64 {
        if self.unlimited() {
            u64::MAX
        } else {
            self.cap().saturating_sub(self.used + self.reserved)
        }
    }

    /// The tokens this process may use and reserve: the limit, or its share of it.
    fn cap(&self) -> u64 {
        self.share_cap.map_or(self.limit, |c| c.min(self.limit))
    }

    /// Keeps below `cap` tokens used and reserved from now on (`None`: the whole limit).
    pub fn set_share_cap(&mut self, cap: Option<u64>) {
        self.share_cap = cap.filter(|_| !self.unlimited());
    }

    pub fn has_share_cap(&self) -> bool {
        self.share_cap.is_some()
    }

    /// Tokens used and reserved this period.
    pub fn committed_and_reserved(&self) -> u64 {
        self.used.saturating_add(self.reserved)
    }

    pub fn is_exhausted(&self) -> bool {
        !self.unlimited() && self.used >= self.limit
    }

    fn past_warning(&self) -> bool {
        !self.unlimited() && self.usage_fraction() >= self.warning_threshold
    }

    /// Starts a new period when `now` reached the end of the current one.
    pub fn roll(&mut self, now: Millis) -> Option<QuotaEvent> {
        if now < self.period_end {
            return None;
        }
        let previous_used = self.used;
        self.used = 0;
        self.warned = false;
        self.exhausted = false;
        self.period_start = self.schedule.previous_at_or_before(now);
        self.period_end = self.schedule.next_after(now);
        Some(QuotaEvent::Reset { previous_used })
    }

    /// Whether `need` more tokens fit (`Err(true)` when they never can).
    pub fn check(&self, need: u64) -> Result<(), bool> {
        if self.unlimited() {
            return Ok(());
        }
        if need > self.limit {
            return Err(true);
        }
        if self.used + self.reserved + need > self.cap() {
            return Err(false);
        }
        Ok(())
    }

    /// Whether `need` more tokens would pass the limit (or this process's share of it) by settled
    /// usage alone: what is reserved cannot change that.
    pub fn exhausted_by_use(&self, need: u64) -> bool {
        !self.unlimited() && self.used + need > self.cap()
    }

    pub fn reserve(&mut self, tokens: u64) {
        self.reserved += tokens;
    }

    pub fn release(&mut self, tokens: u64) {
        self.reserved = self.reserved.saturating_sub(tokens);
    }

    /// Settles a reservation of `reserved` tokens that used `actual`; returns the thresholds it
    /// crossed (each at most once per period).
    pub fn commit(&mut self, reserved: u64, actual: u64, out: &mut Vec<QuotaEvent>) {
        self.release(reserved);
        self.record(actual, out);
    }

    /// Adds `tokens` as used (the seed's `ConsumeQuota`).
    pub fn record(&mut self, tokens: u64, out: &mut Vec<QuotaEvent>) {
        self.used = self.used.saturating_add(tokens);
        if !self.warned && self.past_warning() {
            self.warned = true;
            out.push(QuotaEvent::Warning {
                used: self.used,
                limit: self.limit,
                fraction: self.usage_fraction(),
            });
        }
        if !self.exhausted && self.is_exhausted() {
            self.exhausted = true;
            out.push(QuotaEvent::Exhausted {
                used: self.used,
                limit: self.limit,
            });
        }
    }

    /// An operator's reset: usage to zero, a new period from now.
    pub fn reset(&mut self, now: Millis) -> QuotaEvent {
        let previous_used = self.used;
        self.used = 0;
        self.warned = false;
        self.exhausted = false;
        self.period_start = now;
        self.period_end = self.schedule.next_after(now);
        QuotaEvent::Reset { previous_used }
    }

    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
        self.warned = self.past_warning();
        self.exhausted = self.is_exhausted();
    }

    pub fn counters(&self) -> QuotaCounters {
        QuotaCounters {
            used: self.used,
            period_start: self.period_start,
            period_end: self.period_end,
            warned: self.warned,
            exhausted: self.exhausted,
        }
    }

    /// Restores counters saved at `saved_at`, under the schedule in force now — which may not be
    /// the one they were counted under (a changed `quota.timezone` or `reset_cron`). The usage is
    /// dropped only when a reset of the current schedule fell between `saved_at` and `now` (all of
    /// it was counted before that reset); otherwise it is kept until the current schedule's next
    /// reset. Keeping the saved period's own end instead would grant an extra reset whenever the
    /// old schedule resets before the new one.
    pub fn restore(&mut self, c: &QuotaCounters, saved_at: Millis, now: Millis) {
        let last_reset = self.schedule.previous_at_or_before(now);
        if last_reset > saved_at {
            self.used = 0;
            self.warned = false;
            self.exhausted = false;
            self.period_start = last_reset;
        } else {
            self.used = c.used;
            self.warned = c.warned;
            self.exhausted = c.exhausted;
            self.period_start = c.period_start.min(now);
        }
        self.period_end = self.schedule.next_after(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Millis = 86_400_000;

    fn quota(limit: u64) -> Quota {
        Quota::new(limit, 0, Schedule::daily_utc(), 0.8, 1_000)
    }

    #[test]
    fn warning_and_exhaustion_fire_once_per_period() {
        let mut q = quota(100);
        let mut events = Vec::new();
        q.record(79, &mut events);
        assert!(events.is_empty());
        q.record(1, &mut events);
        assert!(matches!(events[..], [QuotaEvent::Warning { used: 80, .. }]));
        q.record(30, &mut events);
        assert_eq!(events.len(), 2);
        assert!(matches!(
            events[1],
            QuotaEvent::Exhausted {
                used: 110,
                limit: 100
            }
        ));
        q.record(5, &mut events);
        assert_eq!(events.len(), 2, "no repeats within the period");

        assert!(matches!(
            q.roll(DAY),
            Some(QuotaEvent::Reset { previous_used: 115 })
        ));
        assert_eq!(q.reset_at(), 2 * DAY);
        q.record(90, &mut events);
        assert_eq!(events.len(), 3, "a new period warns again");
    }

    #[test]
    fn reservations_count_against_the_quota_until_settled() {
        let mut q = quota(100);
        q.reserve(60);
        assert_eq!(q.check(50), Err(false));
        assert_eq!(q.check(101), Err(true));
        let mut events = Vec::new();
        q.commit(60, 20, &mut events);
        assert_eq!((q.used(), q.reserved()), (20, 0));
        assert!(q.check(80).is_ok());
    }

    fn ms(rfc3339: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_restore_under_a_changed_timezone_grants_no_extra_reset() {
        // Counted under UTC midnights, saved at 23:00 UTC; restored at 23:30 UTC under Los
        // Angeles midnights (08:00 UTC in November).
        let utc = Schedule::daily_utc();
        let la = Schedule::new("0 0 * * *", "America/Los_Angeles").unwrap();
        let saved_at = ms("2026-11-28T23:00:00Z");
        let mut before = Quota::new(1_000, 0, utc, 0.8, ms("2026-11-28T01:00:00Z"));
        before.record(700, &mut Vec::new());
        let saved = before.counters();
        let mut q = Quota::new(1_000, 0, la, 0.8, ms("2026-11-28T23:30:00Z"));
        q.restore(&saved, saved_at, ms("2026-11-28T23:30:00Z"));
        assert_eq!(q.used(), 700);
        assert_eq!(
            q.reset_at(),
            ms("2026-11-29T08:00:00Z"),
            "the new schedule's reset"
        );
        assert!(
            q.roll(ms("2026-11-29T00:00:00Z")).is_none(),
            "no reset at UTC midnight"
        );
        assert_eq!(q.used(), 700);
        assert!(q.roll(ms("2026-11-29T08:00:00Z")).is_some());
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn a_restore_after_a_reset_of_the_current_schedule_starts_a_new_period() {
        let mut before = quota(100);
        before.record(60, &mut Vec::new());
        let saved = before.counters();
        let mut same = quota(100);
        same.restore(&saved, 2_000, DAY - 1);
        assert_eq!(
            (same.used(), same.reset_at()),
            (60, DAY),
            "same period: kept"
        );
        let mut next = quota(100);
        next.restore(&saved, 2_000, DAY + 5);
        assert_eq!(
            (next.used(), next.reset_at()),
            (0, 2 * DAY),
            "a reset passed: dropped"
        );
        assert_eq!(next.period_start(), DAY);
    }

    #[test]
    fn an_unlimited_quota_admits_everything_and_still_counts() {
        let mut q = quota(0);
        assert!(q.check(u64::MAX / 2).is_ok());
        q.record(5, &mut Vec::new());
        assert_eq!(q.used(), 5);
        assert_eq!(q.remaining(), u64::MAX);
    }
}
