//! Admission: reserving one request's units all or nothing, checking whether a request would
//! pass, settling (commit, release), renewing and expiring reservations, and recording usage
//! directly (the seed's `ConsumeQuota`).

use std::sync::Arc;

#[cfg(feature = "fault-injection")]
use super::PANIC_MODEL;
use super::{units, Account, AccountEvent, Circuit, Denial, Grant, Usage};
use crate::domain::lease::Units;
use crate::domain::time::Millis;
use crate::domain::window::Block;

impl Account {
    /// Reserves `estimate` tokens and one request slot in every window that applies to `model`,
    /// plus a concurrency slot: all or nothing.
    pub fn reserve(
        &mut self,
        model: &str,
        estimate: u64,
        now: Millis,
        timeout: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> Result<Grant, Denial> {
        #[cfg(feature = "fault-injection")]
        if model == PANIC_MODEL {
            // Mutate first, so a test can see that the state from before the message survives.
            self.inflight += 1_000;
            panic!("injected panic while reserving");
        }
        // Every request costs at least one token, so a full token window can never be passed.
        let estimate = estimate.max(1);
        self.roll(now, events);
        self.admissible(model, estimate, now)?;
        let probe = self.take_probe();
        let deadline = now.saturating_add(timeout);
        let id = self.open_lease(model, Units::request(estimate), now, deadline, probe, false);
        let (remaining_requests, remaining_tokens) = self.window_room(model, now);
        Ok(Grant {
            reservation: id,
            deadline,
            remaining_requests,
            remaining_tokens,
        })
    }

    /// Whether a reservation would pass now, without taking it (the seed's `CheckAvailability`).
    /// Call [`Account::roll`] first.
    pub fn admissible(&self, model: &str, estimate: u64, now: Millis) -> Result<(), Denial> {
        self.admissible_units(model, Units::request(estimate), now)
    }

    /// Whether `need` would fit now (a request, or several at once). Call [`Account::roll`]
    /// first.
    pub fn admissible_units(&self, model: &str, need: Units, now: Millis) -> Result<(), Denial> {
        let estimate = need.tokens;
        if !self.active {
            return Err(Denial::Disabled {
                reason: self.disabled_reason.clone(),
            });
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return Err(Denial::Expired);
        }
        // A request that can never pass here says so, whatever else holds the account now.
        let quota = self.quota.check(estimate);
        if quota == Err(true) {
            return Err(Denial::Impossible {
                limit: Arc::from("quota"),
                limit_value: self.quota.limit,
                need: estimate,
            });
        }
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            let need = units(w.kind(), need.requests, estimate);
            if need > w.limit() {
                return Err(Denial::Impossible {
                    limit: w.label().clone(),
                    limit_value: w.limit(),
                    need,
                });
            }
        }
        // Exhausted by settled usage: until the reset. Held only by work in flight (reserved
        // or leased tokens may come back unused): like a full concurrency limit, for now.
        let quota_held = quota == Err(false) && !self.quota.exhausted_by_use(estimate);
        if quota == Err(false) && !quota_held {
            return Err(Denial::QuotaExceeded {
                reset_at: self.quota.reset_at(),
            });
        }
        // The latest block names the time; it is a lower bound when any block is one, since
        // in-flight work may hold longer than the others' times.
        let mut held: Option<(Arc<str>, Millis, bool)> = None;
        let mut hold = |label: &Arc<str>, at: Millis, lower: bool| match held.as_mut() {
            Some((_, t, l)) if at <= *t => *l |= lower,
            Some((_, _, l)) => held = Some((label.clone(), at, *l || lower)),
            None => held = Some((label.clone(), at, lower)),
        };
        if quota_held {
            hold(&Arc::from("quota"), now + self.expected_latency(now), true);
        }
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            match w.check(units(w.kind(), need.requests, estimate), now) {
                Ok(()) => {}
                Err(Block::Impossible { limit, need }) => {
                    return Err(Denial::Impossible {
                        limit: w.label().clone(),
                        limit_value: limit,
                        need,
                    })
                }
                Err(Block::Full {
                    retry_at,
                    lower_bound,
                }) => hold(w.label(), retry_at, lower_bound),
            }
        }
        if now < self.cooldown_until {
            hold(&Arc::from("cooldown"), self.cooldown_until, false);
        }
        if let Some((_, until)) = self
            .model_cooldowns
            .iter()
            .find(|(m, until)| **m == *model && now < *until)
        {
            hold(&Arc::from("model_cooldown"), *until, false);
        }
        match self.circuit {
            Circuit::Open { until, .. } if now < until => {
                hold(&Arc::from("circuit_open"), until, false)
            }
            Circuit::HalfOpen { probing: true, .. } => hold(
                &Arc::from("circuit_probe"),
                now + self.expected_latency(now),
                true,
            ),
            _ => {}
        }
        if let Some(limit) = self.concurrent {
            if self.inflight + need.slots > self.concurrency_cap(limit) {
                hold(
                    &Arc::from("concurrent"),
                    now + self.expected_latency(now),
                    true,
                );
            }
        }
        if let Some(m) = self.model_slots.iter().find(|m| &*m.model == model) {
            if m.inflight + need.slots > self.concurrency_cap(m.limit) {
                hold(
                    &Arc::from(format!("{model}:concurrent")),
                    now + self.expected_latency(now),
                    true,
                );
            }
        }
        match held {
            None => Ok(()),
            Some((limit, retry_at, lower_bound)) => Err(Denial::RateLimited {
                limit,
                retry_at,
                lower_bound,
            }),
        }
    }

    /// A guess at when the oldest request in flight finishes: the average latency less its age,
    /// at least 50 ms. Only used as a lower-bound hint.
    pub(super) fn expected_latency(&self, now: Millis) -> Millis {
        let oldest = self
            .leases
            .values()
            .filter(|l| !l.holder)
            .map(|l| l.granted_at)
            .min();
        let age = oldest.map_or(0, |t| now - t);
        (self.latency_ewma as Millis - age).max(50)
    }

    /// Settles a reservation with what it used; `false` when it was already settled (e.g.
    /// expired), which is not an error.
    pub fn commit(
        &mut self,
        reservation: u64,
        usage: Usage,
        now: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> bool {
        self.roll(now, events);
        let Some(lease) = self.leases.remove(&reservation) else {
            return false;
        };
        let tokens = match usage {
            Usage::Reported(t) => t,
            Usage::RequestOnly => 0,
            Usage::Estimate => lease.held.tokens,
        };
        let used = Units {
            requests: lease.held.requests,
            tokens,
            slots: 0,
        };
        self.close_lease(&lease, used, now, events);
        true
    }

    /// Returns a reservation that never reached the upstream; `false` when unknown.
    pub fn release(&mut self, reservation: u64) -> bool {
        let Some(lease) = self.leases.remove(&reservation) else {
            return false;
        };
        self.close_lease(&lease, Units::ZERO, 0, &mut Vec::new());
        true
    }

    /// A probe that ended without feedback lets the next one through.
    pub(super) fn end_probe(&mut self) {
        if let Circuit::HalfOpen {
            probing: true,
            backoff,
        } = self.circuit
        {
            self.circuit = Circuit::HalfOpen {
                probing: false,
                backoff,
            };
        }
    }

    /// Extends a long stream's reservation; `false` when unknown.
    pub fn renew(&mut self, reservation: u64, now: Millis, timeout: Millis) -> bool {
        match self.leases.get_mut(&reservation) {
            Some(r) => {
                r.deadline = now.saturating_add(timeout);
                self.touch();
                true
            }
            None => false,
        }
    }

    /// Commits every reservation and lease past its deadline as used in full (its outcome is
    /// unknown); returns how many.
    pub fn expire(&mut self, now: Millis, events: &mut Vec<AccountEvent>) -> usize {
        self.roll(now, events);
        let due: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            if let Some(lease) = self.leases.remove(id) {
                let used = Units {
                    slots: 0,
                    ..lease.held
                };
                self.close_lease(&lease, used, now, events);
            }
        }
        due.len()
    }

    /// Single-request reservations in flight (leases of holders not counted).
    pub fn reservations_in_flight(&self) -> u64 {
        self.leases.values().filter(|l| !l.holder).count() as u64
    }

    /// Records usage directly (the seed's `ConsumeQuota` + `RecordRequest`), without a reservation.
    pub fn consume(
        &mut self,
        model: &str,
        tokens: u64,
        now: Millis,
        events: &mut Vec<AccountEvent>,
    ) {
        self.roll(now, events);
        let used = Units {
            requests: 1,
            tokens,
            slots: 0,
        };
        self.record_used(model, used, now, events);
    }
}
