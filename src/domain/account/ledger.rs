//! The account as a ledger of capacity leases (see [`crate::domain::lease`]): holding and
//! settling units, the room left, and the exchange with a holder — its report settled, a waiting
//! request answered (from its lease when the room is ample, else as a reservation of its own),
//! and its lease grown by a fair share.

use std::sync::Arc;

use super::{
    units, Account, AccountEvent, Circuit, Denial, Feedback, Grant, Lease, RateHeaders,
    UpstreamOutcome, EWMA_WEIGHT,
};
use crate::domain::lease::{fair_share, LeaseReport, LeaseState, Units};
use crate::domain::limits::LimitKind;
use crate::domain::time::Millis;

/// What an exchange gave the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanged {
    /// The holder's lease after the exchange; `None` when it holds nothing now.
    pub lease: Option<LeaseState>,
    /// The answer to the request that was waiting, if one was.
    pub need: Option<Result<NeedGranted, Denial>>,
    /// The epoch the lease was granted under.
    pub epoch: u64,
    /// The room left after the exchange over the model's request (token) windows; `None` when the
    /// model has no such window.
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// Successful upstream answers seen by a holder since its last exchange, summed (failures are
/// told one by one, at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Successes {
    pub count: u64,
    pub latency_ms_sum: u64,
    /// The rate-limit headers of the latest answer that had any.
    pub headers: RateHeaders,
    /// Units this holder used after that answer: the upstream's remainder did not count them.
    pub used_since: Units,
}

/// How a waiting request was admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeedGranted {
    /// Its units were added to the holder's lease: the holder admits it from there.
    InLease,
    /// The room is tight: a reservation of its own, settled at once by the holder.
    Reservation(Grant),
}

impl Account {
    /// Bit `i` set for every window that counts requests for `model`.
    pub(super) fn mask_for(&self, model: &str) -> u64 {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.applies_to(model))
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// The smallest remainder over `model`'s request windows and over its token windows (the
    /// `x-ratelimit-remaining-*` a client sees); `None` where the model has no such window.
    pub fn window_room(&self, model: &str, now: Millis) -> (Option<u64>, Option<u64>) {
        let (mut requests, mut tokens) = (None::<u64>, None::<u64>);
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            let left = w.remaining(now);
            let slot = match w.kind() {
                LimitKind::Requests => &mut requests,
                _ => &mut tokens,
            };
            *slot = Some(slot.map_or(left, |s| s.min(left)));
        }
        (requests, tokens)
    }

    /// Counts `held` as in flight in the windows of `mask`, the quota and the concurrency slots
    /// (the account's and `model`'s).
    pub(super) fn hold(&mut self, mask: u64, model: &str, held: Units) {
        for (i, w) in self.windows.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                w.reserve(units(w.kind(), held.requests, held.tokens));
            }
        }
        self.quota.reserve(held.tokens);
        self.inflight += held.slots;
        if let Some(m) = self.model_slots.iter_mut().find(|m| &*m.model == model) {
            m.inflight += held.slots;
        }
    }

    /// Settles a lease removed from the table: `used` committed at `at`, the rest freed.
    pub(super) fn close_lease(
        &mut self,
        lease: &Lease,
        used: Units,
        at: Millis,
        events: &mut Vec<AccountEvent>,
    ) {
        let held = lease.held;
        for (i, w) in self.windows.iter_mut().enumerate() {
            if lease.mask & (1 << i) != 0 {
                w.commit(
                    units(w.kind(), held.requests, held.tokens),
                    units(w.kind(), used.requests, used.tokens),
                    at,
                );
            }
        }
        let mut quota_events = Vec::new();
        self.quota
            .commit(held.tokens, used.tokens, &mut quota_events);
        events.extend(quota_events.into_iter().map(AccountEvent::from));
        self.note_unshared(&lease.model, used, at);
        self.inflight = self.inflight.saturating_sub(held.slots);
        if let Some(m) = self.model_slots.iter_mut().find(|m| m.model == lease.model) {
            m.inflight = m.inflight.saturating_sub(held.slots);
        }
        if lease.probe {
            self.end_probe();
        }
        self.touch();
    }

    /// Records units used without a lease (the seed's `RecordRequest`, a restored reservation, a
    /// report on a lease the ledger no longer knows), committed at `at`.
    pub(super) fn record_used(
        &mut self,
        model: &str,
        used: Units,
        at: Millis,
        events: &mut Vec<AccountEvent>,
    ) {
        for w in self.windows.iter_mut().filter(|w| w.applies_to(model)) {
            w.record(units(w.kind(), used.requests, used.tokens), at);
        }
        let mut quota_events = Vec::new();
        self.quota.record(used.tokens, &mut quota_events);
        events.extend(quota_events.into_iter().map(AccountEvent::from));
        self.note_unshared(&Arc::from(model), used, at);
        self.peak.add(used.requests, used.tokens, at);
        self.touch();
    }

    /// Opens a lease of `held` units for `model` (after an admission check); returns its id.
    pub(super) fn open_lease(
        &mut self,
        model: &str,
        held: Units,
        now: Millis,
        deadline: Millis,
        probe: bool,
        holder: bool,
    ) -> u64 {
        let mask = self.mask_for(model);
        self.hold(mask, model, held);
        if !holder {
            // A reservation is one request admitted; a holder's lease counts as it is used.
            self.peak.add(held.requests, held.tokens, now);
        }
        let id = (self.owner << 40) | self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                model: Arc::from(model),
                mask,
                held,
                granted_at: now,
                deadline,
                probe,
                holder,
                owner: self.owner,
            },
        );
        self.touch();
        id
    }

    /// Claims the one probe a half-open circuit lets through, if it is free.
    pub(super) fn take_probe(&mut self) -> bool {
        if let Circuit::HalfOpen {
            probing: false,
            backoff,
        } = self.circuit
        {
            self.circuit = Circuit::HalfOpen {
                probing: true,
                backoff,
            };
            return true;
        }
        false
    }

    /// Units that may still be leased for `model` now, per dimension (`u64::MAX` where nothing
    /// limits). Call [`Account::roll`] first.
    pub fn room(&self, model: &str, now: Millis) -> Units {
        let mut room = Units {
            requests: u64::MAX,
            tokens: self.quota.remaining(),
            slots: self.concurrent.map_or(u64::MAX, |c| {
                self.concurrency_cap(c).saturating_sub(self.inflight)
            }),
        };
        if let Some(m) = self.model_slots.iter().find(|m| &*m.model == model) {
            let cap = self.concurrency_cap(m.limit);
            room.slots = room.slots.min(cap.saturating_sub(m.inflight));
        }
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            let left = w.remaining(now);
            match w.kind() {
                LimitKind::Requests => room.requests = room.requests.min(left),
                _ => room.tokens = room.tokens.min(left),
            }
        }
        room
    }

    /// Whether holders may be granted new units: nothing refuses the account as a whole.
    pub fn open_for_leases(&self, now: Millis) -> bool {
        self.active
            && self.expires_at.is_none_or(|t| now < t)
            && !self.quota.is_exhausted()
            && now >= self.cooldown_until
            && self.circuit == Circuit::Closed
    }

    fn holder_leases(&self) -> u64 {
        self.leases.values().filter(|l| l.holder).count() as u64
    }

    /// Adds `units` to the holder lease `lease` (opening one when there is none).
    fn grow(
        &mut self,
        lease: &mut Option<u64>,
        model: &str,
        units: Units,
        now: Millis,
        deadline: Millis,
    ) {
        match lease.and_then(|id| self.leases.get(&id).map(|l| l.mask)) {
            Some(mask) => {
                // Not admitted yet: the peak counts a lease's units as they are reported used.
                self.hold(mask, model, units);
                if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.held = l.held.saturating_add(units);
                }
            }
            None => *lease = Some(self.open_lease(model, units, now, deadline, false, true)),
        }
    }

    /// Applies a holder's batch of successes: one latency sample at their mean, the error
    /// average decayed as by `count` successes, and the latest headers (their ceilings also
    /// counting what was used after them).
    pub fn successes(&mut self, batch: &Successes, now: Millis, events: &mut Vec<AccountEvent>) {
        if batch.count == 0 {
            return;
        }
        let fb = Feedback {
            outcome: UpstreamOutcome::Success,
            latency_ms: batch.latency_ms_sum / batch.count,
            headers: batch.headers,
        };
        self.feedback(&fb, now, events);
        let h = batch.headers;
        for (target, seen, used) in [
            (
                self.header_requests,
                h.requests_remaining,
                batch.used_since.requests,
            ),
            (
                self.header_tokens,
                h.tokens_remaining,
                batch.used_since.tokens,
            ),
        ] {
            if let (Some(i), Some(_)) = (target, seen) {
                self.windows[i].charge_ceiling(used, now);
            }
        }
        let more = i32::try_from(batch.count - 1).unwrap_or(i32::MAX);
        self.error_ewma *= (1.0 - EWMA_WEIGHT).powi(more);
    }

    /// One exchange with a holder of `model` units: settles its `report` (what it used is
    /// committed at the report's `used_at`, what it keeps stays held, the rest is freed), answers
    /// the `need` of a waiting request (nothing when zero), grows the lease by up to `want` within
    /// a fair share of the room, and renews it until `now + lease_ttl`. A single-request
    /// reservation (when the room is tight) lasts until `now + reservation_ttl`. The holder's
    /// `successes` are applied after its report and before its need.
    #[allow(clippy::too_many_arguments)]
    pub fn exchange(
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
    ) -> Exchanged {
        self.roll(now, events);
        let lease_deadline = now.saturating_add(lease_ttl);
        let mut lease: Option<u64> = None;
        let model_cooling = self
            .model_cooldowns
            .iter()
            .any(|(m, until)| &**m == model && now < *until);
        // Stopped admitting (a cooldown, an open circuit…): only requests in flight keep units.
        let closed = model_cooling || !self.open_for_leases(now);
        if let Some(report) = report {
            match report.lease.and_then(|id| self.leases.remove(&id)) {
                Some(mut held) if held.holder => {
                    let id = report.lease.unwrap_or_default();
                    let wanted = if closed {
                        report.keep.min(report.open)
                    } else {
                        report.keep
                    };
                    let keep = wanted.min(held.held.saturating_sub(Units {
                        slots: 0,
                        ..report.used
                    }));
                    self.close_lease(&held, report.used, report.used_at.min(now), events);
                    let used_at = report.used_at.min(now);
                    self.peak
                        .add(report.used.requests, report.used.tokens, used_at);
                    if !keep.is_zero() {
                        let model = held.model.clone();
                        self.hold(held.mask, &model, keep);
                        held.held = keep;
                        self.leases.insert(id, held);
                        lease = Some(id);
                    }
                }
                Some(reservation) => {
                    // Not a holder's lease: leave it to its own settling.
                    self.leases
                        .insert(report.lease.unwrap_or_default(), reservation);
                }
                None if !report.used.is_zero() => {
                    // The lease expired or the ledger was rebuilt: what was used still counts.
                    self.record_used(model, report.used, report.used_at.min(now), events);
                }
                None => {}
            }
        }
        if let Some(batch) = successes {
            self.successes(batch, now, events);
        }
        let holders = self.holder_leases() + u64::from(lease.is_none());
        let mut answer = None;
        if !need.is_zero() {
            answer = Some(match self.admissible_units(model, need, now) {
                Err(denial) => Err(denial),
                Ok(()) => {
                    let probe = self.take_probe();
                    let share = fair_share(self.room(model, now), holders);
                    let ample = !probe
                        && (lease.is_some() || !want.is_zero())
                        && share.covers(&need.saturating_add(need));
                    if ample {
                        self.grow(&mut lease, model, need, now, lease_deadline);
                        Ok(NeedGranted::InLease)
                    } else {
                        let deadline = now.saturating_add(reservation_ttl);
                        let id = self.open_lease(model, need, now, deadline, probe, false);
                        Ok(NeedGranted::Reservation(Grant {
                            reservation: id,
                            deadline,
                            remaining_requests: None,
                            remaining_tokens: None,
                        }))
                    }
                }
            });
        }
        let denied = matches!(answer, Some(Err(_)));
        if !want.is_zero() && !denied && !closed && self.open_for_leases(now) {
            let room = self.room(model, now);
            let share = fair_share(room, holders);
            let extra = want.min(share).min(room);
            // Near a limit (a fair share does not cover two requests like the holder's) no lease
            // grows: every request asks alone and settles at once, so that an upstream using more
            // than its estimate is known before the next request is admitted.
            let per_request = Units {
                requests: 1,
                tokens: want.tokens.div_ceil(want.requests.max(1)),
                slots: 1,
            };
            let roomy = share.covers(&per_request.saturating_add(per_request));
            // Units that cannot admit a single request are not worth holding: every dimension
            // the holder asked for must get some (one it did not ask for, it has enough of —
            // typically the concurrency slots of a holder whose requests end quickly).
            let some = |extra: u64, want: u64| extra > 0 || want == 0;
            if roomy
                && !extra.is_zero()
                && some(extra.requests, want.requests)
                && some(extra.tokens, want.tokens)
                && some(extra.slots, want.slots)
            {
                self.grow(&mut lease, model, extra, now, lease_deadline);
            }
        }
        let state = lease.and_then(|id| {
            let l = self.leases.get_mut(&id)?;
            l.deadline = lease_deadline;
            Some(LeaseState {
                id,
                held: l.held,
                deadline: lease_deadline,
            })
        });
        let (remaining_requests, remaining_tokens) = self.window_room(model, now);
        if let Some(Ok(NeedGranted::Reservation(grant))) = answer.as_mut() {
            grant.remaining_requests = remaining_requests;
            grant.remaining_tokens = remaining_tokens;
        }
        self.touch();
        Exchanged {
            lease: state,
            need: answer,
            epoch: self.epoch,
            remaining_requests,
            remaining_tokens,
        }
    }
}
