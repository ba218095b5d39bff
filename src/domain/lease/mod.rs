//! Capacity leases: the protocol between a *ledger*, which decides which units of an account's
//! limits are free, and its *holders*, which admit requests on their own from units leased to them
//! (DESIGN.md, "Capacity leases"). The same types serve both levels: a worker thread holding a
//! lease from its account actor, and (with several instances) an account actor holding a lease
//! from the ledger in Redis.
//!
//! # The guarantee across holders
//! The ledger counts every leased unit as held (in flight) from the grant until the holder reports
//! it. A unit the holder used is then committed at the time of its use — the latest use of the
//! batch, which is never earlier than the real one, so it is held at least until `W` after its
//! real commit; a unit not used comes back free. The ledger never leases a unit that is not free,
//! so "no interval of length `W` holds more than `N`" holds across all holders exactly, whatever
//! the lease sizes.
//!
//! # Sizing
//! A holder asks for about what it will use before its next report (a moving average of its
//! admissions over a horizon); the ledger grants at most a fair part of the room left
//! ([`fair_share`]). Near a limit the share falls below what one more request needs and the
//! ledger answers with a single-request reservation instead: every request asks the ledger, exact
//! and just slower.
//!
//! # Revocation
//! The ledger has an epoch, raised by anything that must stop admission at once (an upstream 429
//! or 401, a cooldown, an open circuit, an operator change or reset). A lease granted under an
//! older epoch admits nothing more; its units come back at the holder's next report.

use serde::{Deserialize, Serialize};

use super::time::Millis;

/// Units of an account's limits, by dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Units {
    /// One per request in every request window.
    pub requests: u64,
    /// In every token window and the quota.
    pub tokens: u64,
    /// Concurrency slots (given back when a request ends, never committed).
    pub slots: u64,
}

impl Units {
    pub const ZERO: Units = Units {
        requests: 0,
        tokens: 0,
        slots: 0,
    };

    /// What one request with a token estimate of `estimate` takes.
    pub fn request(estimate: u64) -> Units {
        Units {
            requests: 1,
            tokens: estimate,
            slots: 1,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Units::ZERO
    }

    /// Whether `self` is at least `other` in every dimension.
    pub fn covers(&self, other: &Units) -> bool {
        self.requests >= other.requests && self.tokens >= other.tokens && self.slots >= other.slots
    }

    pub fn saturating_add(self, other: Units) -> Units {
        Units {
            requests: self.requests.saturating_add(other.requests),
            tokens: self.tokens.saturating_add(other.tokens),
            slots: self.slots.saturating_add(other.slots),
        }
    }

    pub fn saturating_sub(self, other: Units) -> Units {
        Units {
            requests: self.requests.saturating_sub(other.requests),
            tokens: self.tokens.saturating_sub(other.tokens),
            slots: self.slots.saturating_sub(other.slots),
        }
    }

    /// The smaller of each dimension.
    pub fn min(self, other: Units) -> Units {
        Units {
            requests: self.requests.min(other.requests),
            tokens: self.tokens.min(other.tokens),
            slots: self.slots.min(other.slots),
        }
    }

    /// The larger of each dimension.
    pub fn max(self, other: Units) -> Units {
        Units {
            requests: self.requests.max(other.requests),
            tokens: self.tokens.max(other.tokens),
            slots: self.slots.max(other.slots),
        }
    }
}

/// The most a holder may be granted of `room` free units when `holders` hold leases on the same
/// account (counting the asker): half of an equal split, so that a holder that asks later still
/// finds room, and idle holders strand little. Unlimited dimensions (`u64::MAX`) stay unlimited.
pub fn fair_share(room: Units, holders: u64) -> Units {
    let split = |units: u64| {
        if units == u64::MAX {
            u64::MAX
        } else {
            units / (2 * holders.max(1))
        }
    };
    Units {
        requests: split(room.requests),
        tokens: split(room.tokens),
        slots: split(room.slots),
    }
}

/// A holder's account of one lease, sent to its ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseReport {
    /// The lease reported on; `None` for usage of a lease the ledger no longer knows (it expired,
    /// or the ledger was rebuilt): committed all the same.
    pub lease: Option<u64>,
    /// Units used since the last report (`slots` unused: slots are never committed).
    pub used: Units,
    /// When the latest of those uses was committed (ms).
    pub used_at: Millis,
    /// What the holder keeps from now on: the units of its requests still in flight and the free
    /// units it wants to go on admitting from. Everything else held comes back free.
    pub keep: Units,
    /// The part of `keep` that its requests in flight hold: all the ledger keeps when the account
    /// stopped admitting (a cooldown, an open circuit…).
    #[serde(default)]
    pub open: Units,
}

/// A lease as the ledger sees it after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub id: u64,
    /// Units held in all (the holder's kept units plus what was added).
    pub held: Units,
    /// The lease ends here unless renewed by a report; its units then count as used.
    pub deadline: Millis,
}

/// How long a holder averages its rate over, relative to its report interval.
const RATE_WEIGHT: f64 = 0.3;
/// Most that running dry may multiply what a holder asks for.
const MAX_BOOST: u32 = 64;

/// One request admitted by a [`Shard`]; settle it exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardTicket {
    key: u32,
    serial: u64,
}

/// Why a shard cannot admit a request on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardMiss {
    /// No lease, too few free units, or a revoked lease: exchange with the ledger.
    Dry,
    /// An exchange is already in flight: ask the ledger for this request alone.
    Busy,
}

/// What a holder sends at an exchange: the report on its lease and what it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardExchange {
    /// `None` when the holder has no lease and nothing to report.
    pub report: Option<LeaseReport>,
    /// Free units wanted beyond what it keeps.
    pub want: Units,
}

#[derive(Debug, Clone, Copy)]
struct HeldLease {
    id: u64,
    /// The ledger's epoch when the lease was last granted to; admission stops when it moves on.
    epoch: u64,
    /// Free units, ready for new requests.
    free: Units,
    deadline: Millis,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    serial: u64,
    estimate: u64,
    deadline: Millis,
}

/// The holder's side of one lease: one account, one model, one holder. Admission and settling
/// are plain calls (no I/O, no waiting); exchanges with the ledger happen between them.
///
/// Units a shard holds are always free, reserved by a request in flight, or used and not yet
/// reported; their sum never exceeds what the ledger counts for the lease (a request that used
/// more tokens than its estimate reports the excess, which the ledger commits as it does for
/// any overrun).
#[derive(Debug, Default)]
pub struct Shard {
    lease: Option<HeldLease>,
    /// Used since the last report, and when the latest use was committed.
    used: Units,
    used_at: Millis,
    /// Requests in flight: a slab, so admission allocates nothing in the steady state.
    entries: Vec<Option<Entry>>,
    vacant: Vec<u32>,
    next_serial: u64,
    /// Units of the requests in flight.
    open: Units,
    /// Admitted since the last report, and the most requests open at once since then.
    admitted: Units,
    peak_open: u64,
    /// Whether anything was admitted between the last two reports: an idle holder keeps nothing,
    /// so that an idle worker strands capacity for at most one report interval.
    idle: bool,
    last_report_at: Option<Millis>,
    /// Admissions per ms (requests, tokens), averaged over reports.
    rate: (f64, f64),
    /// Multiplies what is asked for after running dry (grows ×2, shrinks when units come back).
    boost: u32,
    /// The exchange in flight, while one is: what it keeps, and what it reports as used (to put
    /// back when the ledger never got it).
    exchanging: Option<(Units, Units, Millis)>,
    /// The estimates of the last requests (for sizing before a rate is known).
    last_estimate: u64,
}

impl Shard {
    pub fn new() -> Shard {
        Shard {
            boost: 1,
            ..Shard::default()
        }
    }

    /// Admits a request of `estimate` tokens from the lease, if it has room and was granted under
    /// the ledger's current `epoch`. `deadline`: when an unsettled request counts as settled at
    /// its estimate (see [`Shard::expire`]).
    pub fn reserve(
        &mut self,
        estimate: u64,
        epoch: u64,
        deadline: Millis,
    ) -> Result<ShardTicket, ShardMiss> {
        let need = Units::request(estimate);
        let miss = if self.exchanging.is_some() {
            ShardMiss::Busy
        } else {
            ShardMiss::Dry
        };
        let Some(lease) = self.lease.as_mut() else {
            return Err(miss);
        };
        if lease.epoch != epoch {
            // Revoked: nothing more from this lease; its free units go back at the next report.
            lease.free = Units::ZERO;
            return Err(miss);
        }
        if !lease.free.covers(&need) {
            return Err(miss);
        }
        lease.free = lease.free.saturating_sub(need);
        Ok(self.admit(estimate, deadline))
    }

    fn admit(&mut self, estimate: u64, deadline: Millis) -> ShardTicket {
        let need = Units::request(estimate);
        self.next_serial += 1;
        let entry = Entry {
            serial: self.next_serial,
            estimate,
            deadline,
        };
        let key = match self.vacant.pop() {
            Some(key) => {
                self.entries[key as usize] = Some(entry);
                key
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u32
            }
        };
        self.open = self.open.saturating_add(need);
        self.admitted = self.admitted.saturating_add(need);
        self.peak_open = self.peak_open.max(self.open.slots);
        self.last_estimate = estimate;
        ShardTicket {
            key,
            serial: self.next_serial,
        }
    }

    fn take(&mut self, ticket: ShardTicket) -> Option<Entry> {
        let slot = self.entries.get_mut(ticket.key as usize)?;
        match slot {
            Some(entry) if entry.serial == ticket.serial => {
                let entry = slot.take();
                self.vacant.push(ticket.key);
                if let Some(e) = &entry {
                    self.open = self.open.saturating_sub(Units::request(e.estimate));
                }
                entry
            }
            _ => None,
        }
    }

    /// Settles a request that reached the upstream: its request slot and `tokens` are used
    /// (committed at `now` by the next report); the rest of its estimate and its concurrency slot
    /// come back free. `false` when the ticket was already settled.
    pub fn commit(&mut self, ticket: ShardTicket, tokens: u64, now: Millis) -> bool {
        let Some(entry) = self.take(ticket) else {
            return false;
        };
        self.used_one(entry.estimate, tokens, now);
        true
    }

    fn used_one(&mut self, estimate: u64, tokens: u64, now: Millis) {
        self.used.requests += 1;
        self.used.tokens = self.used.tokens.saturating_add(tokens);
        self.used_at = self.used_at.max(now);
        if let Some(lease) = self.lease.as_mut() {
            lease.free.slots += 1;
            if tokens <= estimate {
                lease.free.tokens += estimate - tokens;
            } else {
                // An overrun eats into the free units first; what they cannot cover the report
                // carries as used beyond what was held.
                lease.free.tokens = lease.free.tokens.saturating_sub(tokens - estimate);
            }
        }
    }

    /// Gives back a request that never reached the upstream. `false` when already settled.
    pub fn release(&mut self, ticket: ShardTicket) -> bool {
        let Some(entry) = self.take(ticket) else {
            return false;
        };
        if let Some(lease) = self.lease.as_mut() {
            lease.free = lease.free.saturating_add(Units::request(entry.estimate));
        }
        true
    }

    /// Moves a request's deadline (a long stream). `false` when already settled.
    pub fn renew(&mut self, ticket: ShardTicket, deadline: Millis) -> bool {
        match self.entries.get_mut(ticket.key as usize) {
            Some(Some(entry)) if entry.serial == ticket.serial => {
                entry.deadline = deadline;
                true
            }
            _ => false,
        }
    }

    /// Settles every request past its deadline at its estimate (its outcome is unknown); returns
    /// how many.
    pub fn expire(&mut self, now: Millis) -> usize {
        let due: Vec<ShardTicket> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(key, e)| {
                e.filter(|e| e.deadline <= now).map(|e| ShardTicket {
                    key: key as u32,
                    serial: e.serial,
                })
            })
            .collect();
        for ticket in &due {
            if let Some(entry) = self.take(*ticket) {
                self.used_one(entry.estimate, entry.estimate, now);
            }
        }
        due.len()
    }

    /// Stops admitting from the lease until the next exchange (the holder saw an upstream 429,
    /// a refused key or a failure itself, before the ledger could revoke).
    pub fn withhold(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            lease.free = Units::ZERO;
            lease.epoch = 0;
        }
    }

    /// Requests in flight.
    pub fn open_requests(&self) -> u64 {
        self.open.slots
    }

    /// The free units of the lease (zero without one).
    pub fn free(&self) -> Units {
        self.lease.map_or(Units::ZERO, |l| l.free)
    }

    /// When the lease must be renewed by, if there is one.
    pub fn deadline(&self) -> Option<Millis> {
        self.lease.map(|l| l.deadline)
    }

    /// Nothing held, nothing in flight, nothing to report: the shard can be dropped.
    pub fn is_idle(&self) -> bool {
        self.lease.is_none()
            && self.open.is_zero()
            && self.used.is_zero()
            && self.exchanging.is_none()
    }

    /// Whether an exchange is worth sending now (at a report tick): something was used, units
    /// sit idle, or the lease must be renewed before `renew_before`.
    pub fn wants_exchange(&self, renew_before: Millis) -> bool {
        if self.exchanging.is_some() {
            return false;
        }
        !self.used.is_zero()
            || !self.admitted.is_zero()
            || self
                .lease
                .is_some_and(|l| !l.free.is_zero() || l.deadline <= renew_before)
    }

    /// Starts an exchange: reports what was used, keeps the units of the requests in flight plus
    /// the free units worth keeping for the next `horizon` ms at the current rate, gives back the
    /// rest, and asks for what is missing. `waiting`: the estimate of a request that found too
    /// few free units (ask for more than the rate says; its own units are asked for separately).
    /// Call [`Shard::end_exchange`] with the ledger's answer.
    pub fn begin_exchange(
        &mut self,
        now: Millis,
        horizon: Millis,
        waiting: Option<u64>,
    ) -> ShardExchange {
        self.update_rate(now);
        let dry = waiting.is_some();
        if let Some(estimate) = waiting {
            self.boost = (self.boost * 2).min(MAX_BOOST);
            self.last_estimate = self.last_estimate.max(estimate);
        }
        let mut desired = self.desired_free(horizon);
        if dry {
            // Demand outran the rate: at least `boost` more requests like the one waiting.
            let boost = u64::from(self.boost);
            desired = desired.max(Units {
                requests: boost,
                tokens: boost.saturating_mul(self.last_estimate.max(1)),
                slots: boost.min(self.peak_open + 1).max(1),
            });
        }
        let free = self.free();
        let kept_free = free.min(desired);
        if !dry && kept_free == free && !free.is_zero() && free.covers(&desired) {
            // More than enough came back unused: ask for less next time.
            self.boost = (self.boost / 2).max(1);
        }
        let keep = self.open.saturating_add(kept_free);
        let report = (self.lease.is_some() || !self.used.is_zero()).then(|| LeaseReport {
            lease: self.lease.map(|l| l.id),
            used: self.used,
            used_at: self.used_at,
            keep,
            open: self.open,
        });
        if let Some(lease) = self.lease.as_mut() {
            lease.free = kept_free;
        }
        self.exchanging = Some((keep, self.used, self.used_at));
        self.used = Units::ZERO;
        ShardExchange {
            report,
            want: desired.saturating_sub(kept_free),
        }
    }

    /// Applies the ledger's answer to the exchange in flight: the lease as the ledger now holds it
    /// (`None`: the ledger holds nothing for this holder) and the epoch it was granted under. Units
    /// beyond what the holder kept become free. Without an answer (the ledger was unreachable),
    /// pass `None`: what was reported as used is reported again next time (the units given back
    /// stay counted by the ledger until then: conservative).
    pub fn end_exchange(&mut self, answer: Option<(Option<LeaseState>, u64)>) {
        let Some((kept, used, used_at)) = self.exchanging.take() else {
            return;
        };
        let Some((state, epoch)) = answer else {
            self.used = self.used.saturating_add(used);
            self.used_at = self.used_at.max(used_at);
            return;
        };
        match state {
            Some(state) => {
                // The ledger may hold more than was kept (it granted more) or less (the account
                // stopped admitting: only the requests in flight keep their units).
                let free = self.lease.map_or(Units::ZERO, |l| l.free);
                self.lease = Some(HeldLease {
                    id: state.id,
                    epoch,
                    free: free.saturating_add(state.held).saturating_sub(kept),
                    deadline: state.deadline,
                });
            }
            None => self.lease = None,
        }
    }

    /// Units the holder would like free for the next `horizon` ms.
    fn desired_free(&self, horizon: Millis) -> Units {
        let boost = f64::from(self.boost);
        let horizon = horizon.max(1) as f64;
        let (requests, tokens) = (self.rate.0 * horizon * boost, self.rate.1 * horizon * boost);
        if (requests < 0.5 || self.idle) && self.open.is_zero() {
            // Idle: keep nothing.
            return Units::ZERO;
        }
        let requests = (requests.ceil() as u64).max(1);
        let per_request = if self.rate.0 > 0.0 {
            (self.rate.1 / self.rate.0).ceil() as u64
        } else {
            self.last_estimate
        }
        .max(self.last_estimate);
        Units {
            requests,
            tokens: (tokens.ceil() as u64).max(requests.saturating_mul(per_request)),
            // Little's law keeps about the peak number open; a few more for bursts.
            slots: (self.peak_open + self.peak_open / 2).max(1),
        }
    }

    fn update_rate(&mut self, now: Millis) {
        let since = self.last_report_at.replace(now);
        if let Some(since) = since {
            let elapsed = (now - since).max(1) as f64;
            let sample = (
                self.admitted.requests as f64 / elapsed,
                self.admitted.tokens as f64 / elapsed,
            );
            self.rate = (
                self.rate.0 + RATE_WEIGHT * (sample.0 - self.rate.0),
                self.rate.1 + RATE_WEIGHT * (sample.1 - self.rate.1),
            );
        }
        self.idle = self.admitted.is_zero();
        self.admitted = Units::ZERO;
        self.peak_open = self.open.slots;
    }

    /// Admits a request whose units the ledger just added to the lease for it (an exchange that
    /// answered a `need`), bypassing the free units' check.
    pub fn admit_granted(&mut self, estimate: u64, deadline: Millis) -> ShardTicket {
        if let Some(lease) = self.lease.as_mut() {
            lease.free = lease.free.saturating_sub(Units::request(estimate));
        }
        self.admit(estimate, deadline)
    }

    /// Ends the holder: what it must report so that the ledger counts what was used and frees the
    /// rest (requests still in flight count as used at their estimate). The shard is empty after.
    pub fn close(&mut self, now: Millis) -> Option<LeaseReport> {
        let open: Vec<Entry> = self.entries.iter().flatten().copied().collect();
        for entry in open {
            self.used_one(entry.estimate, entry.estimate, now);
        }
        self.entries.clear();
        self.vacant.clear();
        self.open = Units::ZERO;
        let report = (self.lease.is_some() || !self.used.is_zero()).then(|| LeaseReport {
            lease: self.lease.map(|l| l.id),
            used: self.used,
            used_at: self.used_at,
            keep: Units::ZERO,
            open: Units::ZERO,
        });
        self.lease = None;
        self.used = Units::ZERO;
        report
    }
}

#[cfg(test)]
mod guarantee_tests;
#[cfg(test)]
mod tests;
