//! An account's ledger shared with other instances (see [`crate::ledger`]): how the actor runs
//! its operations on it, takes another instance's newer ledger, serves from its share while Redis
//! is out of reach, and merges back.
//!
//! States: *joining* (no ledger agreed yet: the first write creates the ledger or finds it and
//! takes it), *in step* (every change that may grow what the ledger counts for this instance is
//! written over the version it was computed from before it is answered; the others — a worker's
//! lease refilled from the instance's reserve, units used or given back — are written with the
//! next write, at the latest after `LedgerTimes::ledger_flush`), *degraded* (Redis failed: the
//! account keeps to its share of what was left and remembers what it admitted; every
//! [`RETRY_EVERY`] it tries to merge back).
//!
//! A write that lost the race to another instance's is made again on that instance's ledger:
//! with nothing unwritten here the ledger is taken as it is; with changes not yet written, it is
//! merged with this instance's own leases and the usage noted since the last write
//! (`Account::merge`), so that nothing admitted here is lost.

use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use actix::fut::{ready as ready_now, wrap_future};
use actix::prelude::*;

use super::AccountActor;
use crate::domain::account::{Account, AccountEvent, LedgerState};
use crate::domain::time::Millis;
use crate::ledger::{split, LedgerLink, Loaded, Swapped};

/// An account operation: it may run more than once (again on a newer ledger after a conflict).
pub(super) type Op<R> = Rc<dyn Fn(&mut Account, Millis, &mut Vec<AccountEvent>) -> R>;

/// What the actor answers once its writes are done.
pub(super) type Task<T> = Pin<Box<dyn ActorFuture<AccountActor, Output = T>>>;

/// Conflicting writes in a row after which the account serves from its share (other instances
/// keep winning the race; it tries again at the next retry).
const MAX_CONFLICTS: u32 = 32;

/// How often a degraded account tries to merge back into its ledger.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The account's place in its shared ledger.
pub(super) struct Shared {
    link: LedgerLink,
    /// The ledger as last agreed with Redis; `None` while joining.
    synced: Option<Synced>,
    degraded: bool,
    /// Changes made here since the last write (see the module documentation).
    dirty: bool,
    /// A flush is scheduled.
    flushing: bool,
    /// This actor replaces one that panicked: joining ends every lease of the account.
    rebuilt: bool,
}

/// The ledger as last agreed: its version and lineage, and Redis' time then.
struct Synced {
    version: u64,
    lineage: u64,
    at: Millis,
}

/// A write to make: over `expected`, the ledger as `value` at `version`.
struct Write {
    expected: Option<u64>,
    version: u64,
    lineage: u64,
    value: String,
}

impl Shared {
    pub(super) fn new(link: LedgerLink, rebuilt: bool) -> Shared {
        Shared {
            link,
            synced: None,
            degraded: false,
            dirty: false,
            flushing: false,
            rebuilt,
        }
    }

    /// The version of the ledger as last agreed (0 before).
    pub(super) fn version(&self) -> u64 {
        self.synced.as_ref().map_or(0, |s| s.version)
    }
}

pub(super) fn ready<T: 'static>(value: T) -> Task<T> {
    Box::pin(ready_now(value))
}

/// A stored ledger's version and state; `None` when it cannot be read.
fn parse(value: &str) -> Option<(u64, LedgerState)> {
    let (version, json) = split(value)?;
    Some((version, serde_json::from_str(json).ok()?))
}

/// A new lineage: a ledger seeded afresh (Redis lost the previous one) is told apart by it.
fn new_lineage() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64).max(1)
}

impl AccountActor {
    /// Runs `op` on the account. Alone (no Redis) or degraded, it runs here and now. In step with
    /// a shared ledger, its result is written over the ledger's version before it is answered:
    /// when another instance wrote first, `op` runs again on that newer ledger; when Redis fails,
    /// the account goes degraded and `op` runs on its share. `None`: `op` panicked.
    pub(super) fn run<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        op: Op<R>,
    ) -> Task<Option<R>> {
        self.run_from(ctx, op, None, 0)
    }

    /// [`Self::run`] for an operation that may be written later: in step, when `must_write`
    /// says its result did not grow what the ledger counts for this instance, it is answered at
    /// once and written with the next write.
    pub(super) fn run_deferrable<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        op: Op<R>,
        must_write: fn(&R) -> bool,
    ) -> Task<Option<R>> {
        self.run_from(ctx, op, Some(must_write), 0)
    }

    fn run_from<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        op: Op<R>,
        must_write: Option<fn(&R) -> bool>,
        conflicts: u32,
    ) -> Task<Option<R>> {
        let before = self.account.version();
        let in_step = self
            .shared
            .as_ref()
            .is_some_and(|s| !s.degraded && s.synced.is_some());
        // What to go back to when the write does not stand.
        let pre = in_step.then(|| self.account.clone());
        let Some((result, events)) = self.attempt(ctx, &op) else {
            return ready(None);
        };
        if in_step
            && self.account.version() != before
            && must_write.is_some_and(|must| !must(&result))
        {
            self.mark_dirty(ctx);
            self.emit(events);
            return ready(Some(result));
        }
        let Some(write) = self.pending_write(before) else {
            self.emit(events);
            return ready(Some(result));
        };
        let link = self.link().clone();
        let id = self.who.account_id.clone();
        let Write {
            expected,
            version,
            lineage,
            value,
        } = write;
        let swap = async move { link.swap(&id, expected, value).await };
        Box::pin(
            wrap_future::<_, Self>(swap).then(move |swapped, act, ctx| match swapped {
                Ok(Swapped::Done { now }) => {
                    act.agreed(Synced {
                        version,
                        lineage,
                        at: now,
                    });
                    act.emit(events);
                    ready(Some(result))
                }
                Ok(Swapped::Conflict { now, current }) if conflicts < MAX_CONFLICTS => {
                    act.restore(pre);
                    act.adopt(ctx, current, now);
                    act.run_from(ctx, op, must_write, conflicts + 1)
                }
                Ok(Swapped::Conflict { .. }) => {
                    act.restore(pre);
                    act.degrade(ctx, "other instances kept writing first");
                    act.run_from(ctx, op, must_write, conflicts + 1)
                }
                Err(problem) => {
                    act.restore(pre);
                    act.degrade(ctx, &problem.to_string());
                    act.run_from(ctx, op, must_write, conflicts + 1)
                }
            }),
        )
    }

    fn link(&self) -> &LedgerLink {
        &self.shared.as_ref().expect("a shared ledger").link
    }

    /// Undoes an operation whose write did not stand (`pre`: the account before it; `None` while
    /// joining, when the ledger found replaces everything anyway).
    fn restore(&mut self, pre: Option<Account>) {
        if let Some(pre) = pre {
            self.account = pre;
        }
    }

    /// The write an operation calls for: none alone or degraded, or when it changed nothing
    /// (`before`: the version before it) and nothing waits to be written, once joined.
    fn pending_write(&mut self, before: u64) -> Option<Write> {
        let shared = self.shared.as_ref()?;
        let unchanged = self.account.version() == before && !shared.dirty;
        if shared.degraded || (shared.synced.is_some() && unchanged) {
            return None;
        }
        let (expected, version, lineage) = match &shared.synced {
            Some(s) => (Some(s.version), s.version + 1, s.lineage),
            None => (None, self.account.version().max(1), new_lineage()),
        };
        let mut state = self.account.ledger_state(self.now());
        state.counters.version = version;
        state.lineage = lineage;
        let json = serde_json::to_string(&state).expect("a ledger serialises");
        Some(Write {
            expected,
            version,
            lineage,
            value: format!("{version}\n{json}"),
        })
    }

    /// The account as it is here was written as `synced`.
    fn agreed(&mut self, synced: Synced) {
        if let Some(shared) = self.shared.as_mut() {
            shared.synced = Some(synced);
            shared.dirty = false;
            self.account.written();
        }
    }

    /// Notes a change made here and not written yet, and makes sure it is written within
    /// `ledger_flush`.
    fn mark_dirty(&mut self, ctx: &mut Context<Self>) {
        if let Some(shared) = self.shared.as_mut() {
            shared.dirty = true;
        }
        self.schedule_flush(ctx);
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        if shared.flushing {
            return;
        }
        shared.flushing = true;
        ctx.run_later(self.times.ledger_flush, |act, ctx| {
            if let Some(shared) = act.shared.as_mut() {
                shared.flushing = false;
            }
            let task = act.flush(ctx, false);
            ctx.wait(task.map(|(), act, ctx| {
                let again =
                    act.account.has_reserves() || act.shared.as_ref().is_some_and(|s| s.dirty);
                if again {
                    act.schedule_flush(ctx);
                }
            }));
        });
    }

    /// Writes what waits to be written, after giving back the reserves no worker drew from since
    /// the last flush (every reserve with `all`: the instance stops or flushes on demand).
    pub(super) fn flush(&mut self, ctx: &mut Context<Self>, all: bool) -> Task<()> {
        if self.shared.is_none() {
            return ready(());
        }
        let op: Op<()> = Rc::new(move |a, now, ev| {
            a.release_reserves(all, now, ev);
        });
        Box::pin(self.run(ctx, op).map(|_, act, ctx| act.changed(ctx)))
    }

    /// Takes the ledger another instance wrote (`current`; `None`: Redis has none any more).
    fn adopt(&mut self, ctx: &mut Context<Self>, current: Option<String>, now: Millis) {
        let Some(value) = current else {
            self.reseed(now);
            return;
        };
        let Some((version, state)) = parse(&value) else {
            log::error!(
                event = "ledger_unreadable", account_id = &*self.who.account_id;
                "the account's ledger in Redis cannot be read; serving from this instance's share (delete the key to seed it again)"
            );
            self.degrade(ctx, "unreadable ledger");
            return;
        };
        let known = self.shared.as_ref().and_then(|s| s.synced.as_ref());
        let dirty = self.shared.as_ref().is_some_and(|s| s.dirty);
        let merged = dirty || known.is_some_and(|s| s.lineage != state.lineage);
        if merged {
            // Changes of ours not written yet, or a ledger seeded afresh by another instance
            // after a loss: ours are our leases as we know them, and our unwritten usage — which
            // stay unwritten (and noted) until our next write.
            self.account.merge(&state, now);
        } else {
            self.account.load_ledger(&state, now);
        }
        if let Some(shared) = self.shared.as_mut() {
            shared.synced = Some(Synced {
                version,
                lineage: state.lineage,
                at: now,
            });
            shared.dirty = merged;
        }
    }

    /// Redis lost the ledger (a restart without persistence, or it expired): the next write seeds
    /// it from this instance's view, charged for what other instances may have admitted since
    /// the last write (see `Account::reseed`).
    fn reseed(&mut self, now: Millis) {
        let since = self
            .shared
            .as_ref()
            .and_then(|s| s.synced.as_ref())
            .map(|s| s.at);
        if let Some(since) = since {
            self.account.reseed(Some(now - since), now);
            log::warn!(
                event = "ledger_reseeded", account_id = &*self.who.account_id, stale_ms = now - since;
                "the account's ledger was gone from Redis; seeded again from this instance's last view, charged for the time since"
            );
        }
        if let Some(shared) = self.shared.as_mut() {
            shared.synced = None;
        }
    }

    /// Redis failed: serve from this instance's share of what was left, and try to merge back
    /// every [`RETRY_EVERY`].
    fn degrade(&mut self, ctx: &mut Context<Self>, why: &str) {
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        if shared.degraded {
            return;
        }
        log::debug!(event = "account_degraded", account_id = &*self.who.account_id; "{why}");
        let share = shared.link.share_for(&self.who.account_id);
        shared.link.metrics().degraded_accounts.inc();
        self.account.share_with(share);
        if let Some(shared) = self.shared.as_mut() {
            shared.degraded = true;
        }
        ctx.run_later(RETRY_EVERY, |act, ctx| act.recover(ctx));
    }

    /// Tries to merge back: reads the ledger, merges what this instance admitted meanwhile into
    /// it (or seeds it again when Redis lost it) and writes the result; on failure stays
    /// degraded and tries again later.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        if !self.shared.as_ref().is_some_and(|s| s.degraded) {
            return;
        }
        let link = self.link().clone();
        let id = self.who.account_id.clone();
        let load = async move { link.load(&id).await };
        ctx.wait(wrap_future::<_, Self>(load).then(|loaded, act, ctx| {
            let Ok(Loaded { now, value }) = loaded else {
                ctx.run_later(RETRY_EVERY, |act, ctx| act.recover(ctx));
                return ready(());
            };
            let before = act.account.clone();
            let remote = value.as_deref().and_then(parse);
            let since = act.shared.as_ref().and_then(|s| s.synced.as_ref()).map(|s| s.at);
            let (expected, lineage) = match &remote {
                Some((version, state)) => {
                    act.account.merge(state, now);
                    (Some(*version), state.lineage)
                }
                None => {
                    act.account.reseed(since.map(|at| now - at), now);
                    (None, new_lineage())
                }
            };
            let version = expected.map_or(act.account.version().max(1), |v| v + 1);
            let mut state = act.account.ledger_state(now);
            state.counters.version = version;
            state.lineage = lineage;
            let value = format!("{version}\n{}", serde_json::to_string(&state).expect("serialises"));
            let link = act.link().clone();
            let id = act.who.account_id.clone();
            let swap = async move { link.swap(&id, expected, value).await };
            Box::pin(wrap_future::<_, Self>(swap).map(move |swapped, act, ctx| {
                if let Ok(Swapped::Done { now }) = swapped {
                    act.agreed(Synced {
                        version,
                        lineage,
                        at: now,
                    });
                    if let Some(shared) = act.shared.as_mut() {
                        shared.degraded = false;
                        shared.link.metrics().degraded_accounts.dec();
                    }
                    act.control.publish(act.account.epoch());
                    log::info!(event = "account_merged", account_id = &*act.who.account_id; "merged back into the shared ledger");
                } else {
                    act.account = before;
                    ctx.run_later(RETRY_EVERY, |act, ctx| act.recover(ctx));
                }
            })) as Task<()>
        }));
    }

    /// With a shared ledger and in step: takes the ledger as another instance last wrote it, so
    /// that a reading (status, statistics) counts every instance. Alone or degraded: nothing.
    pub(super) fn refresh(&mut self) -> Task<()> {
        let Some(shared) = self
            .shared
            .as_ref()
            .filter(|s| !s.degraded && s.synced.is_some())
        else {
            return ready(());
        };
        let link = shared.link.clone();
        let id = self.who.account_id.clone();
        let load = async move { link.load(&id).await };
        Box::pin(wrap_future::<_, Self>(load).map(|loaded, act, ctx| {
            let known = act.shared.as_ref().map_or(0, Shared::version);
            if let Ok(Loaded {
                now,
                value: Some(value),
            }) = loaded
            {
                if split(&value).is_some_and(|(version, _)| version != known) {
                    act.adopt(ctx, Some(value), now);
                    act.control.publish(act.account.epoch());
                }
            }
        }))
    }

    /// Joins the shared ledger at start: takes it when Redis has it, else seeds it with this
    /// account's restored state. A rebuilt actor also ends every lease of the account.
    pub(super) fn join(&mut self, ctx: &mut Context<Self>) {
        let rebuilt = self.shared.as_ref().is_some_and(|s| s.rebuilt);
        let op: Op<()> = Rc::new(move |a, _, _| {
            if rebuilt {
                a.revoke_leases();
            }
        });
        let task = self.run(ctx, op);
        ctx.wait(task.map(|_, act, ctx| act.schedule_sweep(ctx)));
    }

    /// The actor stops: a degraded account no longer counts as one.
    pub(super) fn left(&mut self) {
        if let Some(shared) = self.shared.as_ref().filter(|s| s.degraded) {
            shared.link.metrics().degraded_accounts.dec();
        }
    }
}
