//! One request's reservation and the guard that settles it exactly once.
//!
//! A reservation is held either in a worker's shard of a lease (the common case: settling is a
//! plain call, reported to the account in the worker's next batch) or, when the room is tight, at
//! the account actor itself (settled by a `Commit` / `Release` message, sent with `do_send`, which
//! is always queued). Dropping a guard unsettled settles it: released when nothing was sent
//! upstream, else committed at the estimate (the outcome is unknown).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::account::{AccountActor, Commit, Feed, Release, Renew};
use super::holder::ShardCell;
use super::registry::{AccountEntry, ProviderEntry};
use crate::domain::account::{Feedback, Usage};
use crate::domain::lease::ShardTicket;

/// A request admitted on one account, ready to be sent upstream.
#[derive(Debug)]
pub struct Reservation {
    pub provider: Arc<ProviderEntry>,
    pub account: Arc<AccountEntry>,
    /// The model name to send upstream.
    pub model: Arc<str>,
    pub estimate: u64,
    /// The account's smallest remainder over its request (token) windows after this
    /// reservation, as last known (`None`: no such window).
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// Settles the reservation; dropping it settles too.
    pub guard: ReservationGuard,
}

/// A reservation without its guard: which account serves, and what was reserved.
#[derive(Debug, Clone)]
pub struct Served {
    pub provider: Arc<ProviderEntry>,
    pub account: Arc<AccountEntry>,
    pub model: Arc<str>,
    pub estimate: u64,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

impl Reservation {
    /// The guard (to settle with) and the rest.
    pub fn split(self) -> (ReservationGuard, Served) {
        let Reservation {
            provider,
            account,
            model,
            estimate,
            remaining_requests,
            remaining_tokens,
            guard,
        } = self;
        let served = Served {
            provider,
            account,
            model,
            estimate,
            remaining_requests,
            remaining_tokens,
        };
        (guard, served)
    }
}

/// Where a reservation's units are held.
#[derive(Debug)]
enum Held {
    /// In a worker's shard of a lease.
    Shard {
        cell: Arc<ShardCell>,
        ticket: ShardTicket,
    },
    /// At the account actor (a single-request reservation).
    Ledger {
        addr: Addr<AccountActor>,
        reservation: u64,
    },
}

/// A granted reservation that must be settled exactly once.
#[derive(Debug)]
pub struct ReservationGuard {
    held: Held,
    estimate: u64,
    sent_upstream: bool,
    settled: bool,
    /// Counts the guard as outstanding until its settling is queued (dropped last).
    _ticket: Option<Ticket>,
}

/// Counts what is not yet settled (reservations, and the shards that still hold leases), so a
/// shutdown can wait until every settling of the requests it cut is queued before it flushes the
/// state.
#[derive(Debug, Clone, Default)]
pub struct Outstanding(Arc<AtomicUsize>);

/// One outstanding item; dropping it counts it as settled.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Outstanding {
    pub fn ticket(&self) -> Ticket {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ticket(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReservationGuard {
    /// A reservation held at the account actor.
    pub fn at_ledger(addr: Addr<AccountActor>, reservation: u64, estimate: u64) -> Self {
        ReservationGuard::new(Held::Ledger { addr, reservation }, estimate)
    }

    /// A reservation held in a worker's shard.
    pub(super) fn in_shard(cell: Arc<ShardCell>, ticket: ShardTicket, estimate: u64) -> Self {
        ReservationGuard::new(Held::Shard { cell, ticket }, estimate)
    }

    fn new(held: Held, estimate: u64) -> Self {
        ReservationGuard {
            held,
            estimate,
            sent_upstream: false,
            settled: false,
            _ticket: None,
        }
    }

    /// Counts this guard in `outstanding` until it is settled.
    pub fn counted_in(mut self, outstanding: &Outstanding) -> ReservationGuard {
        self._ticket = Some(outstanding.ticket());
        self
    }

    /// Whether the units come from this worker's lease (settled locally and reported in a
    /// batch) rather than from a reservation of its own at the account.
    pub fn from_lease(&self) -> bool {
        matches!(self.held, Held::Shard { .. })
    }

    /// From now on the upstream may count the request: it can no longer be released.
    pub fn mark_sent(&mut self) {
        self.sent_upstream = true;
    }

    /// Settles with what the request used, and the upstream's word on the answer.
    pub fn commit(mut self, usage: Usage, feedback: Option<Feedback>) {
        self.settled = true;
        match &self.held {
            Held::Ledger { addr, reservation } => addr.do_send(Commit {
                reservation: *reservation,
                usage,
                feedback,
            }),
            Held::Shard { cell, ticket } => {
                let tokens = match usage {
                    Usage::Reported(t) => t,
                    Usage::RequestOnly => 0,
                    Usage::Estimate => self.estimate,
                };
                cell.commit(*ticket, tokens, feedback);
            }
        }
    }

    /// Settles like [`ReservationGuard::commit`] and waits until the account has applied it.
    pub async fn commit_confirmed(
        mut self,
        usage: Usage,
        feedback: Option<Feedback>,
    ) -> Result<(), MailboxError> {
        self.settled = true;
        match &self.held {
            Held::Ledger { addr, reservation } => {
                let commit = Commit {
                    reservation: *reservation,
                    usage,
                    feedback,
                };
                addr.send(commit).await
            }
            Held::Shard { cell, ticket } => {
                let tokens = match usage {
                    Usage::Reported(t) => t,
                    Usage::RequestOnly => 0,
                    Usage::Estimate => self.estimate,
                };
                cell.commit(*ticket, tokens, feedback);
                cell.clone().report_now().await
            }
        }
    }

    /// Returns a reservation whose request provably never left (the connection to the upstream
    /// could not be opened), even after [`ReservationGuard::mark_sent`].
    pub fn release_unsent(mut self) {
        self.sent_upstream = false;
        self.settled = true;
        self.settle_unknown();
    }

    /// Returns the reservation; only valid while nothing was sent upstream (else it commits at
    /// the estimate, as the guarantee requires).
    pub fn release(mut self) {
        self.settled = true;
        self.settle_unknown();
    }

    /// Extends the reservation's deadline (long streams).
    pub fn renew(&self) {
        match &self.held {
            Held::Ledger { addr, reservation } => addr.do_send(Renew {
                reservation: *reservation,
            }),
            Held::Shard { cell, ticket } => cell.renew(*ticket),
        }
    }

    /// Tells the account at once what the upstream said, without settling (a 429 seen mid-way).
    pub fn feed(&self, feedback: Feedback) {
        match &self.held {
            Held::Ledger { addr, .. } => addr.do_send(Feed(feedback)),
            Held::Shard { cell, .. } => cell.feed(feedback),
        }
    }

    fn settle_unknown(&self) {
        match (&self.held, self.sent_upstream) {
            (Held::Ledger { addr, reservation }, true) => addr.do_send(Commit {
                reservation: *reservation,
                usage: Usage::Estimate,
                feedback: None,
            }),
            (Held::Ledger { addr, reservation }, false) => addr.do_send(Release {
                reservation: *reservation,
            }),
            (Held::Shard { cell, ticket }, true) => cell.commit(*ticket, self.estimate, None),
            (Held::Shard { cell, ticket }, false) => cell.release(*ticket),
        }
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if !self.settled {
            self.settle_unknown();
        }
    }
}
