//! `AccountActor`: owns one account's [`Account`] state. Thin: every message runs one domain
//! operation under `catch_unwind` on a copy that replaces the state only on success, so a panic
//! loses only the message that caused it.
//!
//! Settling messages (`Commit`, `Release`) are sent with `do_send`, which is always queued: a
//! reservation is never lost. [`ReservationGuard`] makes that impossible to forget.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::events::{AccountRef, Event, EventSink};
use crate::domain::account::{
    Account, AccountEvent, AccountSpec, AccountState, Denial, Feedback, Grant, QuotaStatus,
    Summary, Usage, WindowStats,
};
use crate::domain::time::{Millis, SharedClock};

// ------------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------------

/// Reserves `estimate` tokens and a slot in every window that applies to `model`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(Grant, Summary), (Rejection, Summary)>")]
pub struct Reserve {
    pub model: Arc<str>,
    pub estimate: u64,
}

/// Why an account did not reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Denied(Denial),
    /// The operation panicked; the account kept its state from before the message.
    Internal,
}

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

// ------------------------------------------------------------------------------------------------
// The actor
// ------------------------------------------------------------------------------------------------

pub struct AccountActor {
    account: Account,
    who: AccountRef,
    clock: SharedClock,
    reservation_timeout: Millis,
    events: EventSink,
    /// The pending expiry sweep, if any.
    sweep: Option<(SpawnHandle, Millis)>,
    /// This account's `quota_usage_percent` (looked up once, set after every change).
    usage_gauge: prometheus::Gauge,
    /// The provider's in-flight gauge, and how much of it is this account's.
    inflight_gauge: prometheus::IntGauge,
    inflight_reported: i64,
}

impl AccountActor {
    pub fn new(
        account: Account,
        who: AccountRef,
        clock: SharedClock,
        reservation_timeout: Duration,
        events: EventSink,
    ) -> AccountActor {
        let inflight_gauge = events
            .metrics()
            .reservations_in_flight
            .with_label_values(&[&*who.provider_id]);
        let usage_gauge = events
            .metrics()
            .quota_usage_percent
            .with_label_values(&[&*who.account_id, &*who.provider_id]);
        AccountActor {
            account,
            usage_gauge,
            who,
            clock,
            reservation_timeout: crate::domain::time::duration_ms(reservation_timeout),
            inflight_gauge,
            inflight_reported: 0,
            events,
            sweep: None,
        }
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Runs a domain operation on a copy of the state; the copy replaces the state only if the
    /// operation returns. Events it produced are emitted after the swap.
    fn guarded<R>(
        &mut self,
        op: impl FnOnce(&mut Account, &mut Vec<AccountEvent>) -> R,
    ) -> Option<R> {
        let mut copy = self.account.clone();
        let mut events = Vec::new();
        match catch_unwind(AssertUnwindSafe(|| op(&mut copy, &mut events))) {
            Ok(result) => {
                self.account = copy;
                let at = self.now();
                for kind in events {
                    self.events.emit(Event {
                        account: self.who.clone(),
                        at,
                        kind,
                    });
                }
                Some(result)
            }
            Err(_) => {
                self.events.metrics().actor_panics_total.inc();
                log::error!(
                    event = "actor_panic", account_id = &*self.who.account_id, provider = &*self.who.provider;
                    "an account operation panicked; the account keeps its state from before the message"
                );
                None
            }
        }
    }

    /// Moves the provider's in-flight gauge by this account's change since the last call.
    fn publish_inflight(&mut self) {
        let now = self.account.inflight() as i64;
        self.inflight_gauge.add(now - self.inflight_reported);
        self.inflight_reported = now;
    }

    fn publish_usage(&self) {
        self.usage_gauge
            .set(self.account.quota().usage_fraction() * 100.0);
    }

    /// Makes sure a sweep runs at the earliest reservation deadline.
    fn schedule_sweep(&mut self, ctx: &mut Context<Self>) {
        let Some(deadline) = self.account.next_deadline() else {
            return;
        };
        if let Some((handle, at)) = self.sweep {
            if at <= deadline {
                return;
            }
            ctx.cancel_future(handle);
        }
        let delay = Duration::from_millis((deadline - self.now()).max(0) as u64);
        let handle = ctx.run_later(delay, |act, ctx| {
            act.sweep = None;
            let now = act.now();
            let expired = act.guarded(|a, ev| a.expire(now, ev)).unwrap_or(0);
            act.publish_inflight();
            if expired > 0 {
                log::warn!(
                    event = "reservation_expired", account_id = &*act.who.account_id, count = expired;
                    "unsettled reservations committed at their estimate"
                );
                act.publish_usage();
            }
            act.schedule_sweep(ctx);
        });
        self.sweep = Some((handle, deadline));
    }
}

impl Actor for AccountActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.schedule_sweep(ctx);
        self.publish_usage();
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // A removed account's reservations no longer count.
        self.inflight_gauge.sub(self.inflight_reported);
    }
}

impl Handler<Reserve> for AccountActor {
    type Result = Result<(Grant, Summary), (Rejection, Summary)>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let timeout = self.reservation_timeout;
        let result = self.guarded(|a, ev| a.reserve(&msg.model, msg.estimate, now, timeout, ev));
        let summary = self.account.summary(now);
        self.publish_inflight();
        match result {
            Some(Ok(grant)) => {
                self.schedule_sweep(ctx);
                Ok((grant, summary))
            }
            Some(Err(denial)) => Err((Rejection::Denied(denial), summary)),
            None => Err((Rejection::Internal, summary)),
        }
    }
}

impl Handler<Commit> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Commit, _ctx: &mut Context<Self>) {
        let now = self.now();
        self.guarded(|a, ev| {
            a.commit(msg.reservation, msg.usage, now, ev);
            if let Some(fb) = &msg.feedback {
                a.feedback(fb, now, ev);
            }
        });
        self.publish_usage();
        self.publish_inflight();
    }
}

impl Handler<Release> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Release, _ctx: &mut Context<Self>) {
        self.guarded(|a, _| a.release(msg.reservation));
        self.publish_inflight();
    }
}

impl Handler<Renew> for AccountActor {
    type Result = bool;

    fn handle(&mut self, msg: Renew, _ctx: &mut Context<Self>) -> bool {
        let (now, timeout) = (self.now(), self.reservation_timeout);
        // The sweep, when it fires early, finds nothing due and reschedules itself.
        self.guarded(|a, _| a.renew(msg.reservation, now, timeout))
            .unwrap_or(false)
    }
}

impl Handler<GetStatus> for AccountActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(|a, ev| a.roll(now, ev));
        MessageResult(self.account.status(now))
    }
}

impl Handler<GetRateStats> for AccountActor {
    type Result = Vec<WindowStats>;

    fn handle(&mut self, _msg: GetRateStats, _ctx: &mut Context<Self>) -> Vec<WindowStats> {
        let now = self.now();
        self.guarded(|a, ev| a.roll(now, ev));
        self.account.window_stats(now)
    }
}

impl Handler<Reset> for AccountActor {
    type Result = MessageResult<Reset>;

    fn handle(&mut self, _msg: Reset, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(|a, ev| a.reset(now, ev));
        self.publish_usage();
        MessageResult(self.account.status(now))
    }
}

impl Handler<UpdateAccount> for AccountActor {
    type Result = Result<(), String>;

    fn handle(&mut self, msg: UpdateAccount, _ctx: &mut Context<Self>) -> Result<(), String> {
        let now = self.now();
        let result = self
            .guarded(|a, _| a.update(&msg.spec, now))
            .unwrap_or_else(|| Err("the update panicked".to_string()));
        self.publish_usage();
        result
    }
}

impl Handler<Snapshot> for AccountActor {
    type Result = Option<AccountState>;

    fn handle(&mut self, msg: Snapshot, _ctx: &mut Context<Self>) -> Option<AccountState> {
        if msg.since_version == Some(self.account.version()) {
            return None;
        }
        Some(self.account.state(self.now()))
    }
}

impl Handler<CheckAvailability> for AccountActor {
    type Result = Result<(), Denial>;

    fn handle(&mut self, msg: CheckAvailability, _ctx: &mut Context<Self>) -> Result<(), Denial> {
        let now = self.now();
        self.guarded(|a, ev| a.roll(now, ev));
        self.account.admissible(&msg.model, msg.estimate, now)
    }
}

impl Handler<ConsumeQuota> for AccountActor {
    type Result = MessageResult<ConsumeQuota>;

    fn handle(&mut self, msg: ConsumeQuota, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(|a, ev| a.consume(&msg.model, msg.tokens, now, ev));
        self.publish_usage();
        MessageResult(self.account.status(now))
    }
}

impl Handler<Roll> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Roll, _ctx: &mut Context<Self>) {
        let now = self.now();
        self.guarded(|a, ev| a.roll(now, ev));
        self.publish_usage();
    }
}

impl Handler<Stop> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

// ------------------------------------------------------------------------------------------------
// The settling guard
// ------------------------------------------------------------------------------------------------

/// A granted reservation that must be settled exactly once. Dropping it unsettled settles it:
/// released when nothing was sent upstream, else committed at the estimate (the outcome is
/// unknown). Both go through `do_send`, which is always queued.
#[derive(Debug)]
pub struct ReservationGuard {
    addr: Addr<AccountActor>,
    reservation: u64,
    sent_upstream: bool,
    settled: bool,
    /// Counts the guard as outstanding until its settling message is queued (dropped last).
    _ticket: Option<Ticket>,
}

/// Counts reservations not yet settled, so a shutdown can wait until every settling message of
/// the requests it cut is queued before it flushes the state.
#[derive(Debug, Clone, Default)]
pub struct Outstanding(Arc<std::sync::atomic::AtomicUsize>);

/// One outstanding reservation; dropping it counts it as settled.
#[derive(Debug)]
pub struct Ticket(Arc<std::sync::atomic::AtomicUsize>);

impl Outstanding {
    pub fn ticket(&self) -> Ticket {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ticket(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ReservationGuard {
    pub fn new(addr: Addr<AccountActor>, reservation: u64) -> ReservationGuard {
        ReservationGuard {
            addr,
            reservation,
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

    pub fn reservation(&self) -> u64 {
        self.reservation
    }

    pub fn account(&self) -> &Addr<AccountActor> {
        &self.addr
    }

    /// From now on the upstream may count the request: it can no longer be released.
    pub fn mark_sent(&mut self) {
        self.sent_upstream = true;
    }

    /// Settles with what the request used.
    pub fn commit(mut self, usage: Usage, feedback: Option<Feedback>) {
        self.settled = true;
        self.addr.do_send(Commit {
            reservation: self.reservation,
            usage,
            feedback,
        });
    }

    /// Settles like [`ReservationGuard::commit`] and waits until the account has applied it.
    pub async fn commit_confirmed(
        mut self,
        usage: Usage,
        feedback: Option<Feedback>,
    ) -> Result<(), MailboxError> {
        self.settled = true;
        let commit = Commit {
            reservation: self.reservation,
            usage,
            feedback,
        };
        self.addr.send(commit).await
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

    /// Extends the reservation (long streams).
    pub fn renew(&self) {
        self.addr.do_send(Renew {
            reservation: self.reservation,
        });
    }

    fn settle_unknown(&self) {
        if self.sent_upstream {
            self.addr.do_send(Commit {
                reservation: self.reservation,
                usage: Usage::Estimate,
                feedback: None,
            });
        } else {
            self.addr.do_send(Release {
                reservation: self.reservation,
            });
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
