//! What an account shows: the seed's `QuotaStatus`, per-window statistics, and the summary a
//! pool orders its candidates by.

use super::{Account, Circuit, QuotaStatus, Summary, WindowStats};
use crate::domain::limits::LimitKind;
use crate::domain::time::Millis;
use crate::domain::window::Block;

impl Account {
    /// The seed's `QuotaStatus`.
    pub fn status(&self, now: Millis) -> QuotaStatus {
        let reason = if !self.active {
            Some(
                self.disabled_reason
                    .clone()
                    .unwrap_or_else(|| "disabled".into()),
            )
        } else if self.expires_at.is_some_and(|t| now >= t) {
            Some("expired".into())
        } else if self.quota.is_exhausted() {
            Some("quota_exceeded".into())
        } else if now < self.cooldown_until {
            Some("cooldown".into())
        } else if matches!(self.circuit, Circuit::Open { until, .. } if now < until) {
            Some("circuit_open".into())
        } else {
            None
        };
        QuotaStatus {
            available: reason.is_none(),
            reason,
            current_usage: self.quota.used(),
            limit: self.quota.limit,
            usage_percent: self.quota.usage_fraction() * 100.0,
            reset_at: self.quota.reset_at(),
            in_flight: self.inflight,
            cooldown_until: (now < self.cooldown_until).then_some(self.cooldown_until),
            circuit_open_until: match self.circuit {
                Circuit::Open { until, .. } if now < until => Some(until),
                _ => None,
            },
        }
    }

    /// Per-window statistics (the seed's `GetStats`), plus `concurrent`.
    pub fn window_stats(&self, now: Millis) -> Vec<WindowStats> {
        let mut stats: Vec<WindowStats> = self
            .windows
            .iter()
            .map(|w| {
                let retry_after = match w.check(1, now) {
                    Ok(()) | Err(Block::Impossible { .. }) => 0.0,
                    Err(Block::Full { retry_at, .. }) => (retry_at - now).max(0) as f64 / 1000.0,
                };
                WindowStats {
                    limit_type: w.label().to_string(),
                    limit: w.limit(),
                    current: w.used(),
                    in_flight: w.inflight(),
                    window_start: w.window_start(now),
                    retry_after,
                    kind: w.kind(),
                    period_ms: w.per_ms(),
                    resets_at: w.resets_at(),
                }
            })
            .collect();
        let model_limits = self
            .model_slots
            .iter()
            .map(|m| (format!("{}:concurrent", m.model), m.limit, m.inflight));
        for (label, limit, inflight) in self
            .concurrent
            .map(|limit| ("concurrent".to_string(), limit, self.inflight))
            .into_iter()
            .chain(model_limits)
        {
            stats.push(WindowStats {
                limit_type: label,
                limit,
                current: inflight,
                in_flight: inflight,
                window_start: now,
                retry_after: if inflight >= limit {
                    self.expected_latency(now) as f64 / 1000.0
                } else {
                    0.0
                },
                kind: LimitKind::Concurrent,
                period_ms: 0,
                resets_at: None,
            });
        }
        stats
    }

    /// What the pool orders candidates by.
    pub fn summary(&self, now: Millis) -> Summary {
        let headroom = self
            .windows
            .iter()
            .filter(|w| w.model().is_none())
            .map(|w| w.remaining(now) as f64 / w.limit().max(1) as f64)
            .fold(1.0, f64::min);
        Summary {
            available: self.admissible_quick(now),
            quota_fraction: self.quota.usage_fraction(),
            headroom,
            error_rate: self.error_ewma,
            latency_ms: self.latency_ewma,
            inflight: self.inflight,
        }
    }

    fn admissible_quick(&self, now: Millis) -> bool {
        self.active
            && self.expires_at.is_none_or(|t| now < t)
            && !self.quota.is_exhausted()
            && now >= self.cooldown_until
            && !matches!(self.circuit, Circuit::Open { until, .. } if now < until)
    }
}
