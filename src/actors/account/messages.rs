//! The messages of an [`super::AccountActor`], and what its holders share with it: the lease
//! epoch ([`LeaseControl`]) and the timing of reservations and leases ([`LedgerTimes`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::domain::account::{
    AccountSpec, AccountState, Denial, Exchanged, Feedback, QuotaStatus, Successes, Summary, Usage,
    WindowStats,
};
use crate::domain::lease::{LeaseReport, Units};

// ------------------------------------------------------------------------------------------------

/// A holder's exchange: settles its report on its lease, answers the `need` of a waiting request
/// (zero: none), grows the lease by up to `want`, and takes the successes the holder saw since its
/// last exchange. Answers `None` when the operation failed (the actor then stops and is rebuilt).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Option<ExchangeReply>")]
pub struct Exchange {
    pub model: Arc<str>,
    pub report: Option<LeaseReport>,
    pub need: Units,
    pub want: Units,
    pub successes: Option<Successes>,
}

/// What an exchange gave, and the account's summary for the holder's view of its pool.
#[derive(Debug, Clone)]
pub struct ExchangeReply {
    pub exchanged: Exchanged,
    pub summary: Summary,
}

/// The upstream's answer to a request admitted from a lease, when it must act at once (a 429, a
/// refused key, a failure): settling happens in the holder's report.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Feed(pub Feedback);

/// Settles a reservation with what it used, and the upstream's feedback when there was an answer.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Commit {
    pub reservation: u64,
    pub usage: Usage,
    pub feedback: Option<Feedback>,
}

/// Returns a reservation that never reached the upstream.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Release {
    pub reservation: u64,
}

/// Extends a long stream's reservation by `sync.reservation_timeout`; `false` when unknown.
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct Renew {
    pub reservation: u64,
}

/// The seed's `QuotaStatus`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "QuotaStatus")]
pub struct GetStatus;

/// The seed's per-limit `GetStats`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<WindowStats>")]
pub struct GetRateStats;

/// Resets quota usage, windows, cooldown and circuit (an operator's action).
#[derive(Message, Debug, Clone)]
#[rtype(result = "QuotaStatus")]
pub struct Reset;

/// Applies changed settings (limits, quota_limit, active, expires_at), keeping every counter.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), String>")]
pub struct UpdateAccount {
    pub spec: AccountSpec,
}

/// The persisted state, or `None` when nothing changed since `since_version`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Option<AccountState>")]
pub struct Snapshot {
    pub since_version: Option<u64>,
    /// With a shared ledger: give back the instance's reserves and write what waits to be
    /// written first.
    pub flush: bool,
}

/// Whether a reservation would pass now, without taking it (the seed's non-atomic check).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), Denial>")]
pub struct CheckAvailability {
    pub model: Arc<str>,
    pub estimate: u64,
}

/// Records usage directly, without a reservation (the seed's `ConsumeQuota`).
#[derive(Message, Debug, Clone)]
#[rtype(result = "QuotaStatus")]
pub struct ConsumeQuota {
    pub model: Arc<str>,
    pub tokens: u64,
}

/// Brings quota periods and windows up to now (sent by the pool at each quota boundary, so an
/// idle account resets, and says so, on time).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Roll;

/// Stops the actor (the account was removed). Reservations still in flight are dropped with it.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Stop;

/// What a holder reads without a message: the account's lease epoch (see
/// [`crate::domain::lease`]). Shared by the account's actor (which sets it after every
/// operation) and every holder of its leases; it outlives a rebuilt actor.
#[derive(Debug, Default)]
pub struct LeaseControl {
    epoch: AtomicU64,
}

impl LeaseControl {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(super) fn publish(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Ends every lease granted so far (the actor is being replaced): the next actor starts
    /// from an epoch above every earlier one.
    pub fn retire(&self) -> u64 {
        self.epoch.fetch_add(1 << 32, Ordering::AcqRel) + (1 << 32)
    }
}

/// Timing of an account's reservations and leases.
#[derive(Debug, Clone, Copy)]
pub struct LedgerTimes {
    /// A single-request reservation never settled counts as settled at its estimate after this.
    pub reservation_timeout: Duration,
    /// A holder lease not renewed by a report within this counts as used in full.
    pub lease_ttl: Duration,
    /// With a shared ledger: the longest a change made here waits to be written to it (see
    /// `shared`).
    pub ledger_flush: Duration,
}

/// Told to the pool when an actor stopped on its own (a panic), so that it is rebuilt.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Broke {
    pub account_id: Arc<str>,
}
