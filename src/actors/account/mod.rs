//! `AccountActor`: owns one account's [`Account`] state — the ledger of its capacity leases
//! (DESIGN.md, "Capacity leases"). Thin: every message runs one domain operation.
//!
//! Holders (the worker threads) exchange with it in batches ([`Exchange`]); a request that finds
//! the room tight gets a reservation of its own, settled with [`Commit`] / [`Release`], which are
//! sent with `do_send` and so always queued: a reservation is never lost
//! ([`super::reservation::ReservationGuard`] makes that impossible to forget).
//!
//! With several instances (Redis configured) the account's ledger is shared ([`shared`]): an
//! operation that changed it is written to Redis before its answer goes out, and the actor takes
//! no other message meanwhile (`AtomicResponse`), so its operations stay one at a time.
//!
//! Panics: an operation runs under `catch_unwind` directly on the state (no copy per message).
//! A panic may leave the state half-changed, so the actor stops; its pool rebuilds it from its
//! last collected state with the crash charge (see `PoolActor`), and the lease epoch, shared with
//! the holders, moves on so that no holder admits from a lease of the old actor.

mod messages;
mod shared;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::events::{AccountRef, Event, EventSink};
use crate::domain::account::{
    Account, AccountEvent, AccountState, Denial, QuotaStatus, ReserveExchanged, WindowStats,
};
use crate::domain::time::{duration_ms, Millis, SharedClock};
use crate::ledger::LedgerLink;

pub use messages::*;
use shared::{ready, Op, Shared, Task};

pub struct AccountActor {
    account: Account,
    who: AccountRef,
    clock: SharedClock,
    times: LedgerTimes,
    events: EventSink,
    control: Arc<LeaseControl>,
    /// The account's ledger shared with other instances (Redis configured), else `None`.
    shared: Option<Shared>,
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

/// How an account actor starts.
pub struct AccountSetup {
    pub who: AccountRef,
    pub clock: SharedClock,
    pub times: LedgerTimes,
    pub events: EventSink,
    pub control: Arc<LeaseControl>,
    pub on_broken: Option<Recipient<Broke>>,
    /// The link to the shared ledgers (Redis configured), and whether this actor replaces one
    /// that panicked (it then ends every lease of the account, everywhere).
    pub ledger: Option<(LedgerLink, bool)>,
}

impl AccountActor {
    pub fn new(mut account: Account, setup: AccountSetup) -> AccountActor {
        let who = setup.who;
        let events = setup.events;
        let inflight_gauge = events
            .metrics()
            .reservations_in_flight
            .with_label_values(&[&*who.provider_id]);
        let usage_gauge = events
            .metrics()
            .quota_usage_percent
            .with_label_values(&[&*who.account_id, &*who.provider_id]);
        let shared = setup.ledger.map(|(link, rebuilt)| {
            account.set_owner(link.owner());
            Shared::new(link, rebuilt)
        });
        AccountActor {
            account,
            usage_gauge,
            who,
            clock: setup.clock,
            times: setup.times,
            inflight_gauge,
            inflight_reported: 0,
            events,
            control: setup.control,
            shared,
            on_broken: setup.on_broken,
            broken: false,
            sweep: None,
        }
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Runs a domain operation on the state under `catch_unwind`, and publishes the lease epoch
    /// to the holders; answers its result and the events it produced (emitted by the caller once
    /// the operation stands). A panic stops the actor (its state may be half-changed): the pool
    /// rebuilds it from its last collected state.
    fn attempt<R>(
        &mut self,
        ctx: &mut Context<Self>,
        op: &Op<R>,
    ) -> Option<(R, Vec<AccountEvent>)> {
        if self.broken {
            return None;
        }
        let mut events = Vec::new();
        let now = self.now();
        match catch_unwind(AssertUnwindSafe(|| op(&mut self.account, now, &mut events))) {
            Ok(result) => {
                self.control.publish(self.account.epoch());
                Some((result, events))
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

    fn emit(&self, events: Vec<AccountEvent>) {
        let at = self.now();
        for kind in events {
            self.events.emit(Event {
                account: self.who.clone(),
                at,
                kind,
            });
        }
    }

    /// Runs `op` (see [`Self::run`]) and then `then` with its result (`None`: it panicked), as
    /// one atomic answer: no other message runs until both are done.
    fn operate<R: 'static, T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        op: impl Fn(&mut Account, Millis, &mut Vec<AccountEvent>) -> R + 'static,
        then: impl FnOnce(Option<R>, &mut Self, &mut Context<Self>) -> T + 'static,
    ) -> AtomicResponse<Self, T> {
        let task: Task<Option<R>> = self.run(ctx, Rc::new(op));
        AtomicResponse::new(Box::pin(task.map(then)))
    }

    /// Brings periods and windows up to now. Rolling follows the clock, so every instance does it
    /// alike: nothing to share.
    fn roll(&mut self, ctx: &mut Context<Self>) {
        let op: Op<()> = Rc::new(|a, now, ev| a.roll(now, ev));
        if let Some(((), events)) = self.attempt(ctx, &op) {
            self.emit(events);
        }
    }

    /// Answers `answer` on the account as it is now: with a shared ledger, as last written by
    /// any instance (see [`Self::refresh`]); periods and windows rolled up to now.
    fn read<T: 'static>(
        &mut self,
        answer: impl FnOnce(&mut Self, Millis) -> T + 'static,
    ) -> AtomicResponse<Self, T> {
        AtomicResponse::new(Box::pin(self.refresh().map(|(), act, ctx| {
            act.roll(ctx);
            let now = act.now();
            answer(act, now)
        })))
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
            let task = act.run(ctx, Rc::new(|a, now, ev| a.expire(now, ev)));
            ctx.wait(task.map(|expired, act, ctx| {
                act.publish_inflight();
                if expired.unwrap_or(0) > 0 {
                    log::warn!(
                        event = "reservation_expired", account_id = &*act.who.account_id, count = expired.unwrap_or(0);
                        "unsettled reservations or leases committed in full"
                    );
                    act.publish_usage();
                }
                act.schedule_sweep(ctx);
            }));
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
        if self.shared.is_some() {
            self.join(ctx);
        }
        self.schedule_sweep(ctx);
        self.publish_usage();
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // A removed account's reservations no longer count.
        self.inflight_gauge.sub(self.inflight_reported);
        self.left();
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
    type Result = AtomicResponse<Self, Option<ExchangeReply>>;

    fn handle(&mut self, msg: Exchange, ctx: &mut Context<Self>) -> Self::Result {
        let lease_ttl = duration_ms(self.times.lease_ttl);
        let reservation_ttl = duration_ms(self.times.reservation_timeout);
        // With a shared ledger the workers refill from this instance's reserve (see
        // `domain::account::reserve`): most exchanges then need no write to Redis first.
        let op: Op<ReserveExchanged> = Rc::new(move |a, now, ev| {
            #[cfg(feature = "fault-injection")]
            if &*msg.model == crate::domain::account::PANIC_MODEL {
                panic!("injected panic in an exchange");
            }
            a.exchange_via_reserve(
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
        });
        let task = self.run_deferrable(ctx, op, |r| r.must_write);
        AtomicResponse::new(Box::pin(task.map(|answer, act, ctx| {
            let answer = answer?;
            act.changed(ctx);
            Some(ExchangeReply {
                exchanged: answer.exchanged,
                summary: act.account.summary(act.now()),
            })
        })))
    }
}

impl Handler<Feed> for AccountActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Feed, ctx: &mut Context<Self>) -> Self::Result {
        self.operate(
            ctx,
            move |a, now, ev| a.feedback(&msg.0, now, ev),
            |_, act, _| act.publish_usage(),
        )
    }
}

impl Handler<Commit> for AccountActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Commit, ctx: &mut Context<Self>) -> Self::Result {
        // Settling gives units back or commits what was held: with a shared ledger it is written
        // with the next write, unless it grew the footprint (an overrun) or moved the epoch.
        let op: Op<((), bool)> = Rc::new(move |a, now, ev| {
            a.with_footprint_check(now, ev, |a, ev| {
                a.commit(msg.reservation, msg.usage, now, ev);
                if let Some(fb) = &msg.feedback {
                    a.feedback(fb, now, ev);
                }
            })
        });
        let task = self.run_deferrable(ctx, op, |r| r.1);
        AtomicResponse::new(Box::pin(task.map(|_, act, _| {
            act.publish_usage();
            act.publish_inflight();
        })))
    }
}

impl Handler<Release> for AccountActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) -> Self::Result {
        let op: Op<(bool, bool)> = Rc::new(move |a, now, ev| {
            a.with_footprint_check(now, ev, |a, _| a.release(msg.reservation))
        });
        let task = self.run_deferrable(ctx, op, |r| r.1);
        AtomicResponse::new(Box::pin(task.map(|_, act, _| act.publish_inflight())))
    }
}

impl Handler<Renew> for AccountActor {
    type Result = AtomicResponse<Self, bool>;

    fn handle(&mut self, msg: Renew, ctx: &mut Context<Self>) -> Self::Result {
        let timeout = duration_ms(self.times.reservation_timeout);
        // The sweep, when it fires early, finds nothing due and reschedules itself.
        self.operate(
            ctx,
            move |a, now, _| a.renew(msg.reservation, now, timeout),
            |renewed, _, _| renewed.unwrap_or(false),
        )
    }
}

impl Handler<GetStatus> for AccountActor {
    type Result = AtomicResponse<Self, QuotaStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        self.read(|act, now| act.account.status(now))
    }
}

impl Handler<GetRateStats> for AccountActor {
    type Result = AtomicResponse<Self, Vec<WindowStats>>;

    fn handle(&mut self, _msg: GetRateStats, _ctx: &mut Context<Self>) -> Self::Result {
        self.read(|act, now| act.account.window_stats(now))
    }
}

impl Handler<CheckAvailability> for AccountActor {
    type Result = AtomicResponse<Self, Result<(), Denial>>;

    fn handle(&mut self, msg: CheckAvailability, _ctx: &mut Context<Self>) -> Self::Result {
        self.read(move |act, now| act.account.admissible(&msg.model, msg.estimate, now))
    }
}

impl Handler<Reset> for AccountActor {
    type Result = AtomicResponse<Self, QuotaStatus>;

    fn handle(&mut self, _msg: Reset, ctx: &mut Context<Self>) -> Self::Result {
        self.operate(
            ctx,
            |a, now, ev| a.reset(now, ev),
            |_, act, _| {
                act.publish_usage();
                act.account.status(act.now())
            },
        )
    }
}

impl Handler<UpdateAccount> for AccountActor {
    type Result = AtomicResponse<Self, Result<(), String>>;

    fn handle(&mut self, msg: UpdateAccount, ctx: &mut Context<Self>) -> Self::Result {
        self.operate(
            ctx,
            move |a, now, _| a.update(&msg.spec, now),
            |result, act, _| {
                act.publish_usage();
                result.unwrap_or_else(|| Err("the update panicked".to_string()))
            },
        )
    }
}

impl Handler<Snapshot> for AccountActor {
    type Result = AtomicResponse<Self, Option<AccountState>>;

    fn handle(&mut self, msg: Snapshot, ctx: &mut Context<Self>) -> Self::Result {
        let flushed = if msg.flush {
            self.flush(ctx, true)
        } else {
            ready(())
        };
        AtomicResponse::new(Box::pin(flushed.map(move |(), act, _| {
            // Shared: the copy is the ledger as last agreed, under the ledger's version.
            let version = act
                .shared
                .as_ref()
                .map_or(act.account.version(), Shared::version);
            if msg.since_version == Some(version) {
                return None;
            }
            let mut state = act.account.state(act.now());
            state.version = version;
            Some(state)
        })))
    }
}

impl Handler<ConsumeQuota> for AccountActor {
    type Result = AtomicResponse<Self, QuotaStatus>;

    fn handle(&mut self, msg: ConsumeQuota, ctx: &mut Context<Self>) -> Self::Result {
        self.operate(
            ctx,
            move |a, now, ev| a.consume(&msg.model, msg.tokens, now, ev),
            |_, act, _| {
                act.publish_usage();
                act.account.status(act.now())
            },
        )
    }
}

impl Handler<Roll> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Roll, ctx: &mut Context<Self>) {
        self.roll(ctx);
        self.publish_usage();
    }
}

impl Handler<Stop> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
