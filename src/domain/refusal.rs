//! Combining the refusals of many accounts (of one or several pools) into one answer, with the
//! precedence of API.md: rate-limited if any account would pass later by rate (soonest
//! `retry_after`), else quota-exceeded (earliest `reset_at`), else impossible (the request exceeds
//! a limit on every account that could serve it), else no account available.

use std::sync::Arc;

use super::account::Denial;
use super::time::Millis;

/// The soonest rate-limit hold seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub limit: Arc<str>,
    pub retry_at: Millis,
    pub lower_bound: bool,
}

/// What every refusing account said, reduced to what the verdict needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    pub rate_limited: Option<Hold>,
    pub quota_reset_at: Option<Millis>,
    pub impossible: Option<(Arc<str>, u64, u64)>,
    /// Disabled, expired, or failed internally.
    pub unavailable: usize,
}

/// The one answer for a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    RateLimited {
        limit: Arc<str>,
        retry_at: Millis,
        lower_bound: bool,
    },
    QuotaExceeded {
        reset_at: Millis,
    },
    /// The request needs more than `limit_value` of `limit` on every account: it can never pass.
    Impossible {
        limit: Arc<str>,
        limit_value: u64,
        need: u64,
    },
    NoAccountAvailable,
}

impl Refusals {
    pub fn add(&mut self, denial: &Denial) {
        match denial {
            Denial::Disabled { .. } | Denial::Expired => self.unavailable += 1,
            Denial::Impossible {
                limit,
                limit_value,
                need,
            } => {
                if self.impossible.is_none() {
                    self.impossible = Some((limit.clone(), *limit_value, *need));
                }
            }
            Denial::QuotaExceeded { reset_at } => {
                self.quota_reset_at =
                    Some(self.quota_reset_at.map_or(*reset_at, |t| t.min(*reset_at)));
            }
            Denial::RateLimited {
                limit,
                retry_at,
                lower_bound,
            } => {
                let sooner = self
                    .rate_limited
                    .as_ref()
                    .is_none_or(|h| *retry_at < h.retry_at);
                if sooner {
                    self.rate_limited = Some(Hold {
                        limit: limit.clone(),
                        retry_at: *retry_at,
                        lower_bound: *lower_bound,
                    });
                }
            }
        }
    }

    pub fn add_unavailable(&mut self) {
        self.unavailable += 1;
    }

    pub fn merge(&mut self, other: &Refusals) {
        if let Some(h) = &other.rate_limited {
            self.add(&Denial::RateLimited {
                limit: h.limit.clone(),
                retry_at: h.retry_at,
                lower_bound: h.lower_bound,
            });
        }
        if let Some(reset_at) = other.quota_reset_at {
            self.add(&Denial::QuotaExceeded { reset_at });
        }
        if self.impossible.is_none() {
            self.impossible = other.impossible.clone();
        }
        self.unavailable += other.unavailable;
    }

    pub fn verdict(&self) -> Verdict {
        if let Some(h) = &self.rate_limited {
            return Verdict::RateLimited {
                limit: h.limit.clone(),
                retry_at: h.retry_at,
                lower_bound: h.lower_bound,
            };
        }
        if let Some(reset_at) = self.quota_reset_at {
            return Verdict::QuotaExceeded { reset_at };
        }
        if let Some((limit, limit_value, need)) = &self.impossible {
            return Verdict::Impossible {
                limit: limit.clone(),
                limit_value: *limit_value,
                need: *need,
            };
        }
        Verdict::NoAccountAvailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(at: Millis) -> Denial {
        Denial::RateLimited {
            limit: Arc::from("rpm"),
            retry_at: at,
            lower_bound: false,
        }
    }

    #[test]
    fn rate_limits_win_with_the_soonest_retry() {
        let mut r = Refusals::default();
        r.add(&Denial::QuotaExceeded { reset_at: 10 });
        r.add(&rate(500));
        r.add(&rate(300));
        r.add(&Denial::Expired);
        assert!(matches!(
            r.verdict(),
            Verdict::RateLimited { retry_at: 300, .. }
        ));
    }

    #[test]
    fn quota_comes_before_impossible_and_impossible_before_nothing() {
        let mut r = Refusals::default();
        r.add(&Denial::Disabled { reason: None });
        assert_eq!(r.verdict(), Verdict::NoAccountAvailable);
        r.add(&Denial::Impossible {
            limit: Arc::from("tpm"),
            limit_value: 10,
            need: 20,
        });
        assert!(matches!(r.verdict(), Verdict::Impossible { .. }));
        let mut other = Refusals::default();
        other.add(&Denial::QuotaExceeded { reset_at: 99 });
        other.add(&Denial::QuotaExceeded { reset_at: 42 });
        r.merge(&other);
        assert_eq!(r.verdict(), Verdict::QuotaExceeded { reset_at: 42 });
    }
}
