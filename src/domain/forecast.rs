//! The exhaustion forecast: at the current rate, when does a quota or a rate window run out —
//! for one account, and for a pool of them.
//!
//! Method (pure, `now` given):
//! - The *rate* is what the account used over a recent span (the caller measures it, e.g. over
//!   the last 15 minutes of request logs) divided by that span: [`Rate::over`].
//! - A budget runs out at `now + remaining / rate`, and the forecast says so only when that is
//!   before its *horizon*: the quota's reset, a fixed window's reset, or — for a sliding window of
//!   length `W` — `now + W`. Why `now + W` for sliding windows: every unit in the window now
//!   expires within `W`; if the remaining room lasts longer than that at this rate, the window
//!   settles at `rate × W` units, which is then at most its limit, so it never runs out. When it
//!   fills sooner, `now + remaining / rate` is the earliest it can (it assumes none of the current
//!   units expire first): a forecast for alerting errs early, never late.
//! - A pool runs out when every member has (the strategy moves traffic to the members with room):
//!   its remaining is the sum over members, its rate the sum of theirs, its horizon the earliest
//!   member's (a reset refills that member). A member without a limit means the pool never runs
//!   out.
//! - Already exhausted: the forecast is `now`. No rate: no forecast.

use super::time::Millis;

/// Consumption per millisecond of one unit (requests or tokens).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate(f64);

impl Rate {
    /// `units` used over the last `span_ms`.
    pub fn over(units: u64, span_ms: Millis) -> Rate {
        if span_ms <= 0 {
            return Rate(0.0);
        }
        Rate(units as f64 / span_ms as f64)
    }

    /// Units per minute (for display).
    pub fn per_minute(self) -> f64 {
        self.0 * 60_000.0
    }

    /// The sum of two rates (members of a pool).
    pub fn plus(self, other: Rate) -> Rate {
        Rate(self.0 + other.0)
    }
}

/// When a budget stops mattering: it is refilled then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Horizon {
    /// A quota period or a fixed window that resets at this time.
    ResetsAt(Millis),
    /// A sliding window of this length (ms).
    Sliding(Millis),
}

impl Horizon {
    fn at(self, now: Millis) -> Millis {
        match self {
            Horizon::ResetsAt(t) => t,
            Horizon::Sliding(w) => now.saturating_add(w),
        }
    }
}

/// A limit and what is used of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub used: u64,
    /// 0 = unlimited (never runs out).
    pub limit: u64,
    pub horizon: Horizon,
    pub rate: Rate,
}

impl Budget {
    fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// When one budget runs out at its rate, or `None` when not before its horizon (or never).
pub fn runs_out_at(budget: &Budget, now: Millis) -> Option<Millis> {
    if budget.limit == 0 {
        return None;
    }
    runs_out(budget.remaining(), budget.rate, budget.horizon.at(now), now)
}

/// When a pool of budgets (one per member, of the same limit) runs out: when the last member
/// does, with traffic moving to the members that have room. `None` when a member is unlimited,
/// for an empty pool, or when not before the earliest member's horizon.
pub fn pool_runs_out_at(members: &[Budget], now: Millis) -> Option<Millis> {
    if members.is_empty() || members.iter().any(|b| b.limit == 0) {
        return None;
    }
    let remaining = members.iter().map(Budget::remaining).sum::<u64>();
    let rate = members.iter().fold(Rate::default(), |r, b| r.plus(b.rate));
    let horizon = members.iter().map(|b| b.horizon.at(now)).min()?;
    runs_out(remaining, rate, horizon, now)
}

fn runs_out(remaining: u64, rate: Rate, horizon: Millis, now: Millis) -> Option<Millis> {
    if remaining == 0 {
        return Some(now);
    }
    // Also catches a NaN rate.
    if rate.0.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    // In f64: `remaining / rate` may be far beyond any time; compared before converting back.
    let at = now as f64 + (remaining as f64 / rate.0).ceil();
    (at < horizon as f64).then_some(at as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Millis = 60_000;
    const HOUR: Millis = 60 * MIN;
    const NOW: Millis = 1_700_000_000_000;

    fn budget(used: u64, limit: u64, horizon: Horizon, per_minute: u64) -> Budget {
        Budget {
            used,
            limit,
            horizon,
            rate: Rate::over(per_minute * 15, 15 * MIN),
        }
    }

    #[test]
    fn a_quota_runs_out_at_the_current_rate_before_its_reset() {
        // 600 left at 100 a minute: 6 minutes.
        let b = budget(400, 1000, Horizon::ResetsAt(NOW + HOUR), 100);
        assert_eq!(runs_out_at(&b, NOW), Some(NOW + 6 * MIN));
    }

    #[test]
    fn a_quota_that_lasts_until_its_reset_has_no_forecast() {
        let b = budget(400, 1000, Horizon::ResetsAt(NOW + 5 * MIN), 100);
        assert_eq!(runs_out_at(&b, NOW), None);
    }

    #[test]
    fn no_traffic_and_no_limit_have_no_forecast() {
        assert_eq!(
            runs_out_at(&budget(400, 1000, Horizon::ResetsAt(NOW + HOUR), 0), NOW),
            None
        );
        assert_eq!(
            runs_out_at(&budget(400, 0, Horizon::ResetsAt(NOW + HOUR), 100), NOW),
            None
        );
    }

    #[test]
    fn an_exhausted_budget_runs_out_now() {
        let b = budget(1000, 1000, Horizon::ResetsAt(NOW + HOUR), 0);
        assert_eq!(runs_out_at(&b, NOW), Some(NOW));
        let over = budget(1200, 1000, Horizon::ResetsAt(NOW + HOUR), 5);
        assert_eq!(runs_out_at(&over, NOW), Some(NOW));
    }

    #[test]
    fn a_sliding_window_runs_out_only_when_it_fills_within_one_window() {
        let day = 24 * HOUR;
        // rpd 1000 at 1 a minute: 1440 a day > 1000, fills in (1000 - 100) minutes.
        let b = budget(100, 1000, Horizon::Sliding(day), 1);
        assert_eq!(runs_out_at(&b, NOW), Some(NOW + 900 * MIN));
        // rpd 2000 at 1 a minute: settles at 1440 a day, never full.
        let b = budget(100, 2000, Horizon::Sliding(day), 1);
        assert_eq!(runs_out_at(&b, NOW), None);
        // Nearly full after a burst: 10 left at 1 a minute, within the window.
        let b = budget(1990, 2000, Horizon::Sliding(day), 1);
        assert_eq!(runs_out_at(&b, NOW), Some(NOW + 10 * MIN));
    }

    #[test]
    fn a_pool_runs_out_when_its_last_member_does() {
        let h = Horizon::ResetsAt(NOW + 10 * HOUR);
        // 600 + 300 left, 50 + 100 a minute: 6 minutes for the pool.
        let members = [budget(400, 1000, h, 50), budget(700, 1000, h, 100)];
        assert_eq!(pool_runs_out_at(&members, NOW), Some(NOW + 6 * MIN));
        // Each member alone would last longer or shorter; the pool sums them.
        assert_eq!(runs_out_at(&members[1], NOW), Some(NOW + 3 * MIN));
    }

    #[test]
    fn a_pool_with_an_unlimited_member_or_an_early_reset_has_no_forecast() {
        let h = Horizon::ResetsAt(NOW + 10 * HOUR);
        let members = [budget(400, 1000, h, 50), budget(0, 0, h, 100)];
        assert_eq!(pool_runs_out_at(&members, NOW), None);
        let members = [
            budget(400, 1000, h, 50),
            budget(700, 1000, Horizon::ResetsAt(NOW + 2 * MIN), 100),
        ];
        assert_eq!(
            pool_runs_out_at(&members, NOW),
            None,
            "a member refills first"
        );
        assert_eq!(pool_runs_out_at(&[], NOW), None);
    }

    #[test]
    fn huge_remainders_and_tiny_rates_do_not_overflow() {
        let b = Budget {
            used: 0,
            limit: u64::MAX,
            horizon: Horizon::ResetsAt(Millis::MAX),
            rate: Rate::over(1, Millis::MAX),
        };
        assert_eq!(runs_out_at(&b, NOW), None);
        let b = Budget {
            horizon: Horizon::Sliding(Millis::MAX),
            ..b
        };
        assert_eq!(runs_out_at(&b, NOW), None);
        assert_eq!(Rate::over(5, 0), Rate::default());
    }
}
