//! Level 2 of the capacity leases seen from one instance (DESIGN.md, "Capacity leases"): the
//! instance's *reserve*, a lease it holds in the shared ledger for each busy model, from which
//! its worker threads' leases are refilled without writing to Redis.
//!
//! An exchange that the reserve covers leaves the instance's *footprint* — what the shared
//! ledger counts for it in every window, the quota and the concurrency slots — no larger than
//! the ledger last stored: the units only move between this instance's leases, or turn from
//! leased into used (held at least as long), or come back free. Such an exchange need not be
//! written before it is answered; the instance writes it with its next write (see
//! `actors::account::shared`). Any exchange the reserve does not cover is written at once, as
//! is every exchange while the room is tight (no reserve is held then): near a limit every
//! grant is agreed in Redis first, exact as with one instance.

use std::sync::Arc;

use super::{Account, AccountEvent, Exchanged, Lease, NeedGranted, Successes};
use crate::domain::lease::{fair_share, LeaseReport, Units};
use crate::domain::time::Millis;

/// How many exchanges like the one that ran the reserve dry a new reserve covers (within a fair
/// share of the room): with workers reporting every `sync.report_interval`, about one write to
/// Redis per this many reports of a busy instance.
pub const RESERVE_EXCHANGES: u64 = 32;

/// An instance's reserve for one model.
#[derive(Debug, Clone)]
pub(super) struct Reserve {
    model: Arc<str>,
    lease: u64,
    /// Whether a worker's lease was refilled from it since the last [`Account::release_reserves`].
    drawn: bool,
}

/// What the shared ledger counts for this instance, to tell whether an operation grew it: every
/// window's remainder, the quota's, and the concurrency slots held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    remaining: Vec<u64>,
    quota_remaining: u64,
    slots: Vec<u64>,
}

impl Footprint {
    /// Whether `self` (after an operation) counts no more than `before` anywhere.
    pub fn within(&self, before: &Footprint) -> bool {
        self.quota_remaining >= before.quota_remaining
            && self.remaining.len() == before.remaining.len()
            && self.slots.len() == before.slots.len()
            && self
                .remaining
                .iter()
                .zip(&before.remaining)
                .all(|(after, before)| after >= before)
            && self
                .slots
                .iter()
                .zip(&before.slots)
                .all(|(after, before)| after <= before)
    }
}

/// An exchange through the reserve, and whether it must be written to the shared ledger before
/// it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveExchanged {
    pub exchanged: Exchanged,
    pub must_write: bool,
}

impl Account {
    /// See [`Footprint`]. Call [`Account::roll`] first.
    pub fn footprint(&self, now: Millis) -> Footprint {
        let mut slots = vec![self.inflight];
        slots.extend(self.model_slots.iter().map(|m| m.inflight));
        Footprint {
            remaining: self.windows.iter().map(|w| w.remaining(now)).collect(),
            quota_remaining: self.quota.remaining(),
            slots,
        }
    }

    /// Runs `op` (periods and windows rolled first) and says whether the shared ledger must hear
    /// of it before it is answered: it moved the epoch, or grew the instance's footprint. An
    /// account whose ledger is not shared measures nothing (`true`: there is nothing to defer).
    pub fn with_footprint_check<R>(
        &mut self,
        now: Millis,
        events: &mut Vec<AccountEvent>,
        op: impl FnOnce(&mut Account, &mut Vec<AccountEvent>) -> R,
    ) -> (R, bool) {
        if !self.shares_ledger {
            return (op(self, events), true);
        }
        self.roll(now, events);
        let (before, epoch) = (self.footprint(now), self.epoch);
        let result = op(self, events);
        let must_write = self.epoch != epoch || !self.footprint(now).within(&before);
        (result, must_write)
    }

    /// Whether this instance holds any reserve.
    pub fn has_reserves(&self) -> bool {
        !self.reserves.is_empty()
    }

    /// [`Account::exchange`] for a holder of this instance, its lease refilled from the instance's
    /// reserve for `model` when that covers it (then `must_write` is false unless the epoch
    /// moved); otherwise the exchange runs on the ledger's room and the reserve grows to about
    /// [`RESERVE_EXCHANGES`] such exchanges within a fair share of the room (`must_write`). An
    /// account whose ledger is not shared holds no reserve: the plain exchange.
    #[allow(clippy::too_many_arguments)]
    pub fn exchange_via_reserve(
        &mut self,
        model: &str,
        report: Option<&LeaseReport>,
        successes: Option<&Successes>,
        need: Units,
        want: Units,
        now: Millis,
        lease_ttl: Millis,
        reservation_ttl: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> ReserveExchanged {
        // Only a shared ledger has a footprint to keep (the single-process path measures nothing).
        let before = self.shares_ledger.then(|| {
            self.roll(now, events);
            self.footprint(now)
        });
        let epoch = self.epoch;
        let reserved = self.take_reserve(model, now, events);
        let reported = report
            .and_then(|r| r.lease.zip(Some(r.used)))
            .and_then(|(id, used)| {
                let held = self.leases.get(&id).filter(|l| l.holder)?.held;
                Some(held.saturating_sub(Units { slots: 0, ..used }))
            })
            .unwrap_or(Units::ZERO);
        let exchanged = self.exchange(
            model,
            report,
            successes,
            need,
            want,
            now,
            lease_ttl,
            reservation_ttl,
            events,
        );
        let Some(before) = before else {
            return ReserveExchanged {
                exchanged,
                must_write: true,
            };
        };
        let mut granted = exchanged.lease.map_or(Units::ZERO, |l| l.held);
        if let Some(Ok(NeedGranted::Reservation(_))) = &exchanged.need {
            granted = granted.saturating_add(need);
        }
        let budget = reserved.saturating_add(reported);
        let open = self.open_for_leases(now) && exchanged.epoch == epoch;
        let deadline = now.saturating_add(lease_ttl);
        if budget.covers(&granted) {
            let left = budget.saturating_sub(granted);
            if open && admits_one(&left) {
                // Drawn from only when the worker's lease grew beyond what it gave back: the last
                // reports of a worker going idle do not keep the reserve.
                let drawn = !reported.covers(&granted);
                self.hold_reserve(model, left, now, deadline, drawn);
            }
            let must_write = exchanged.epoch != epoch || !self.footprint(now).within(&before);
            return ReserveExchanged {
                exchanged,
                must_write,
            };
        }
        if open {
            // About RESERVE_EXCHANGES more exchanges like this one, in every dimension it grew.
            let short = granted.saturating_sub(budget).max(want).max(need);
            let target = Units {
                requests: short.requests.saturating_mul(RESERVE_EXCHANGES),
                tokens: short.tokens.saturating_mul(RESERVE_EXCHANGES),
                slots: short.slots.saturating_mul(RESERVE_EXCHANGES),
            };
            let room = self.room(model, now);
            let holders = self.leases.values().filter(|l| l.holder).count() as u64 + 1;
            let size = target.min(fair_share(room, holders)).min(room);
            // Near a limit a fair share does not cover even one more exchange like this one:
            // no reserve, every grant is written first (exact, as with one instance).
            if admits_one(&size) && size.covers(&short) {
                self.hold_reserve(model, size, now, deadline, false);
            }
        }
        ReserveExchanged {
            exchanged,
            must_write: true,
        }
    }

    /// Gives back the reserves no worker drew from since the last call (all of them with
    /// `all`: the instance stops); returns whether any was given back.
    pub fn release_reserves(
        &mut self,
        all: bool,
        now: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> bool {
        let mut released = false;
        for reserve in std::mem::take(&mut self.reserves) {
            if all || !reserve.drawn {
                if let Some(lease) = self.leases.remove(&reserve.lease) {
                    self.close_lease(&lease, Units::ZERO, now, events);
                    released = true;
                }
            } else {
                self.reserves.push(Reserve {
                    drawn: false,
                    ..reserve
                });
            }
        }
        released
    }

    /// Frees the reserve for `model` (if any) and returns the units it held.
    fn take_reserve(&mut self, model: &str, now: Millis, events: &mut Vec<AccountEvent>) -> Units {
        let Some(i) = self.reserves.iter().position(|r| &*r.model == model) else {
            return Units::ZERO;
        };
        let reserve = self.reserves.swap_remove(i);
        match self.leases.remove(&reserve.lease) {
            Some(lease) => {
                self.close_lease(&lease, Units::ZERO, now, events);
                lease.held
            }
            None => Units::ZERO,
        }
    }

    /// Holds `units` for `model` as this instance's reserve (not counted as admitted: the
    /// workers' leases drawn from it are).
    fn hold_reserve(
        &mut self,
        model: &str,
        units: Units,
        now: Millis,
        deadline: Millis,
        drawn: bool,
    ) {
        let model: Arc<str> = Arc::from(model);
        let mask = self.mask_for(&model);
        self.hold(mask, &model, units);
        let id = (self.owner << 40) | self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                model: model.clone(),
                mask,
                held: units,
                granted_at: now,
                deadline,
                probe: false,
                holder: true,
                owner: self.owner,
            },
        );
        self.touch();
        self.reserves.push(Reserve {
            model,
            lease: id,
            drawn,
        });
    }
}

/// Units that can admit a request (concurrency slots aside: a reserve without slots still
/// serves workers that keep their own).
fn admits_one(units: &Units) -> bool {
    units.requests > 0 && units.tokens > 0
}

#[cfg(test)]
#[path = "reserve_tests.rs"]
mod tests;
