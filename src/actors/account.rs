//! `AccountActor`: owns one account's [`Account`] state — the ledger of its capacity leases
//! (DESIGN.md, "Capacity leases"). Thin: every message runs one domain operation.
//!
//! Holders (the worker threads) exchange with it in batches ([`Exchange`]); a request that finds
//! the room tight gets a reservation of its own, settled with [`Commit`] / [`Release`], which are
//! sent with `do_send` and so always queued: a reservation is never lost
//! ([`super::reservation::ReservationGuard`] makes that impossible to forget).
//!
//! Panics: an operation runs under `catch_unwind` directly on the state (no copy per message).
//! A panic may leave the state half-changed, so the actor stops; its pool rebuilds it from its
//! last collected state with the crash charge (see `PoolActor`), and the lease epoch, shared with
//! the holders, moves on so that no holder admits from a lease of the old actor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::events::{AccountRef, Event, EventSink};
use crate::domain::account::{
    Account, AccountEvent, AccountSpec, AccountState, Denial, Exchanged, Feedback, QuotaStatus,
    Successes, Summary, Usage, WindowStats,
};
use crate::domain::lease::{LeaseReport, Units};
use crate::domain::time::{Millis, SharedClock};

// ------------------------------------------------------------------------------------------------
// Messages
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

    fn publish(&self, epoch: u64) {
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
}

/// Told to the pool when an actor stopped on its own (a panic), so that it is rebuilt.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Broke {
    pub account_id: Arc<str>,
}

// ------------------------------------------------------------------------------------------------
// The actor
// ------------------------------------------------------------------------------------------------

pub struct AccountActor {
    account: Account,
    who: AccountRef,
    clock: SharedClock,
    times: LedgerTimes,
    events: EventSink,
    control: Arc<LeaseControl>,
    /// Told when the actor stops on its own (a panic), so that it is rebuilt.
    on_broken: Option<Recipient<Broke>>,
    /// A panic left the state in doubt: the actor stops and is rebuilt.
    broken: bool,
    /// The pending expiry sweep, if any.
    sweep: Option<(SpawnHandle, Millis)>,
    /// This account's `quota_usage_percent` (looked up once, set after every change).
    usage_gauge: prometheus::Gauge,
    /// The provider's in-flight gauge, and how much of it is this account's reservations.
    inflight_gauge: prometheus::IntGauge,
    inflight_reported: i64,
}

impl AccountActor {
    pub fn new(
        account: Account,
        who: AccountRef,
        clock: SharedClock,
        times: LedgerTimes,
        events: EventSink,
        control: Arc<LeaseControl>,
        on_broken: Option<Recipient<Broke>>,
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
            times,
            inflight_gauge,
            inflight_reported: 0,
            events,
            control,
            on_broken,
            broken: false,
            sweep: None,
        }
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Runs a domain operation on the state under `catch_unwind`; events it produced are emitted
    /// after it, and the lease epoch is published to the holders. A panic stops the actor (its
    /// state may be half-changed): the pool rebuilds it from its last collected state.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        op: impl FnOnce(&mut Account, &mut Vec<AccountEvent>) -> R,
    ) -> Option<R> {
        if self.broken {
            return None;
        }
        let mut events = Vec::new();
        match catch_unwind(AssertUnwindSafe(|| op(&mut self.account, &mut events))) {
            Ok(result) => {
                self.control.publish(self.account.epoch());
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
                self.broken = true;
                self.events.metrics().actor_panics_total.inc();
                log::error!(
                    event = "actor_panic", account_id = &*self.who.account_id, provider = &*self.who.provider;
                    "an account operation panicked; the account is rebuilt from its last saved state"
                );
                ctx.stop();
                None
            }
        }
    }

    /// Moves the provider's in-flight gauge by this account's change since the last call.
    fn publish_inflight(&mut self) {
        let now = self.account.reservations_in_flight() as i64;
        self.inflight_gauge.add(now - self.inflight_reported);
        self.inflight_reported = now;
    }

    fn publish_usage(&self) {
        self.usage_gauge
            .set(self.account.quota().usage_fraction() * 100.0);
    }

    /// Makes sure a sweep runs at the earliest reservation or lease deadline.
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
            let expired = act.guarded(ctx, |a, ev| a.expire(now, ev)).unwrap_or(0);
            act.publish_inflight();
            if expired > 0 {
                log::warn!(
                    event = "reservation_expired", account_id = &*act.who.account_id, count = expired;
                    "unsettled reservations or leases committed in full"
                );
                act.publish_usage();
            }
            act.schedule_sweep(ctx);
        });
        self.sweep = Some((handle, deadline));
    }

    /// After any change: gauges and the sweep follow the state.
    fn changed(&mut self, ctx: &mut Context<Self>) {
        self.publish_usage();
        self.publish_inflight();
        self.schedule_sweep(ctx);
    }
}

impl Actor for AccountActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.control.publish(self.account.epoch());
        self.schedule_sweep(ctx);
        self.publish_usage();
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // A removed account's reservations no longer count.
        self.inflight_gauge.sub(self.inflight_reported);
        if self.broken {
            if let Some(pool) = &self.on_broken {
                pool.do_send(Broke {
                    account_id: self.who.account_id.clone(),
                });
            }
        }
    }
}

impl Handler<Exchange> for AccountActor {
    type Result = Option<ExchangeReply>;

    fn handle(&mut self, msg: Exchange, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let (lease_ttl, reservation_ttl) = (
            crate::domain::time::duration_ms(self.times.lease_ttl),
            crate::domain::time::duration_ms(self.times.reservation_timeout),
        );
        let exchanged = self.guarded(ctx, |a, ev| {
            #[cfg(feature = "fault-injection")]
            if &*msg.model == crate::domain::account::PANIC_MODEL {
                panic!("injected panic in an exchange");
            }
            a.exchange(
                &msg.model,
                msg.report.as_ref(),
                msg.successes.as_ref(),
                msg.need,
                msg.want,
                now,
                lease_ttl,
                reservation_ttl,
                ev,
            )
        })?;
        self.changed(ctx);
        Some(ExchangeReply {
            exchanged,
            summary: self.account.summary(now),
        })
    }
}

impl Handler<Feed> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Feed, ctx: &mut Context<Self>) {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.feedback(&msg.0, now, ev));
        self.publish_usage();
    }
}

impl Handler<Commit> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Commit, ctx: &mut Context<Self>) {
        let now = self.now();
        self.guarded(ctx, |a, ev| {
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

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        self.guarded(ctx, |a, _| a.release(msg.reservation));
        self.publish_inflight();
    }
}

impl Handler<Renew> for AccountActor {
    type Result = bool;

    fn handle(&mut self, msg: Renew, ctx: &mut Context<Self>) -> bool {
        let now = self.now();
        let timeout = crate::domain::time::duration_ms(self.times.reservation_timeout);
        // The sweep, when it fires early, finds nothing due and reschedules itself.
        self.guarded(ctx, |a, _| a.renew(msg.reservation, now, timeout))
            .unwrap_or(false)
    }
}

impl Handler<GetStatus> for AccountActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.roll(now, ev));
        MessageResult(self.account.status(now))
    }
}

impl Handler<GetRateStats> for AccountActor {
    type Result = Vec<WindowStats>;

    fn handle(&mut self, _msg: GetRateStats, ctx: &mut Context<Self>) -> Vec<WindowStats> {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.roll(now, ev));
        self.account.window_stats(now)
    }
}

impl Handler<Reset> for AccountActor {
    type Result = MessageResult<Reset>;

    fn handle(&mut self, _msg: Reset, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.reset(now, ev));
        self.publish_usage();
        MessageResult(self.account.status(now))
    }
}

impl Handler<UpdateAccount> for AccountActor {
    type Result = Result<(), String>;

    fn handle(&mut self, msg: UpdateAccount, ctx: &mut Context<Self>) -> Result<(), String> {
        let now = self.now();
        let result = self
            .guarded(ctx, |a, _| a.update(&msg.spec, now))
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

    fn handle(&mut self, msg: CheckAvailability, ctx: &mut Context<Self>) -> Result<(), Denial> {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.roll(now, ev));
        self.account.admissible(&msg.model, msg.estimate, now)
    }
}

impl Handler<ConsumeQuota> for AccountActor {
    type Result = MessageResult<ConsumeQuota>;

    fn handle(&mut self, msg: ConsumeQuota, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.consume(&msg.model, msg.tokens, now, ev));
        self.publish_usage();
        MessageResult(self.account.status(now))
    }
}

impl Handler<Roll> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Roll, ctx: &mut Context<Self>) {
        let now = self.now();
        self.guarded(ctx, |a, ev| a.roll(now, ev));
        self.publish_usage();
    }
}

impl Handler<Stop> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
