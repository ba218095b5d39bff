//! What an upstream's answer does to an account: the health averages, the cooldown after a 429
//! (and per model after a 403), disabling after a 401, the circuit breaker after failures, and
//! the ceilings learned from `x-ratelimit-*` headers.

use super::{
    ewma, Account, AccountEvent, Circuit, Feedback, UpstreamOutcome, BASE_BACKOFF_MS,
    DEFAULT_COOLDOWN_MS, FAILURE_STREAK, MAX_BACKOFF_MS,
};
use crate::domain::time::Millis;

impl Account {
    /// Applies an upstream answer: latency and error averages, cooldown after a 429, the circuit
    /// breaker after failures, disabling after a 401, a per-model cooldown after a 403, and header
    /// tightening. Whatever the values (huge, negative), time arithmetic saturates: nothing here
    /// can panic and lose the commit that arrives in the same message.
    pub fn feedback(&mut self, fb: &Feedback, now: Millis, events: &mut Vec<AccountEvent>) {
        let was_open = self.open_for_leases(now);
        let failed = matches!(fb.outcome, UpstreamOutcome::Failure);
        self.latency_ewma = ewma(self.latency_ewma, fb.latency_ms as f64);
        self.error_ewma = ewma(self.error_ewma, if failed { 1.0 } else { 0.0 });
        match &fb.outcome {
            UpstreamOutcome::Success => {
                self.failures = 0;
                self.consecutive_429 = 0;
                self.circuit = Circuit::Closed;
            }
            UpstreamOutcome::RateLimited {
                retry_after_ms,
                capped,
            } => {
                self.consecutive_429 = self.consecutive_429.saturating_add(1);
                let fallback = [fb.headers.requests_reset_ms, fb.headers.tokens_reset_ms]
                    .into_iter()
                    .flatten()
                    .max();
                let backoff = DEFAULT_COOLDOWN_MS << (self.consecutive_429 - 1).min(6);
                let wait = retry_after_ms.or(fallback).unwrap_or(backoff).max(1);
                let until = now.saturating_add(wait);
                if until > self.cooldown_until {
                    self.cooldown_until = until;
                    events.push(AccountEvent::Cooldown {
                        until,
                        reason: if *capped {
                            "upstream_429_capped"
                        } else {
                            "upstream_429"
                        },
                    });
                }
            }
            UpstreamOutcome::Forbidden { model, cooldown_ms } => {
                let until = now.saturating_add((*cooldown_ms).max(1));
                match self.model_cooldowns.iter_mut().find(|(m, _)| m == model) {
                    Some((_, at)) => *at = (*at).max(until),
                    None => self.model_cooldowns.push((model.clone(), until)),
                }
                events.push(AccountEvent::Cooldown {
                    until,
                    reason: "upstream_403",
                });
                // Holders of leases for that model must stop too (the others ask again).
                self.revoke_leases();
            }
            UpstreamOutcome::Unauthorized => {
                if self.active {
                    let reason = "upstream rejected the key (401)".to_string();
                    self.active = false;
                    self.disabled_reason = Some(reason.clone());
                    events.push(AccountEvent::Disabled { reason });
                }
            }
            UpstreamOutcome::Failure => {
                self.failures += 1;
                let open = match self.circuit {
                    Circuit::Closed if self.failures >= FAILURE_STREAK => Some(BASE_BACKOFF_MS),
                    Circuit::HalfOpen { backoff, .. } => Some((backoff * 2).min(MAX_BACKOFF_MS)),
                    _ => None,
                };
                if let Some(backoff) = open {
                    let until = now.saturating_add(backoff);
                    self.circuit = Circuit::Open { until, backoff };
                    events.push(AccountEvent::Cooldown {
                        until,
                        reason: "upstream_failures",
                    });
                }
            }
        }
        let h = fb.headers;
        for (target, remaining, reset) in [
            (
                self.header_requests,
                h.requests_remaining,
                h.requests_reset_ms,
            ),
            (self.header_tokens, h.tokens_remaining, h.tokens_reset_ms),
        ] {
            if let (Some(i), Some(remaining), Some(reset)) = (target, remaining, reset) {
                self.windows[i].tighten(remaining, now.saturating_add(reset), now);
                if self.windows[i].remaining(now) == 0 {
                    // The upstream has less room than is leased out: holders stop at once.
                    self.revoke_leases();
                }
            }
        }
        if was_open && !self.open_for_leases(now) {
            // A 429, a refused key or an open circuit stops every holder at once.
            self.revoke_leases();
        }
        self.touch();
    }
}
