//! One shard of one thread, shared with the guards of its requests: the holder's side of a
//! lease behind an uncontended lock, and its exchanges with the account.

use std::sync::{Arc, Mutex, MutexGuard};

use actix::prelude::*;

use super::Holders;
use crate::actors::account::{Exchange, ExchangeReply, Feed};
use crate::actors::registry::AccountEntry;
use crate::actors::reservation::Ticket;
use crate::domain::account::{Feedback, RateHeaders, Successes, UpstreamOutcome};
use crate::domain::lease::{Shard, ShardTicket, Units};
use crate::domain::time::Millis;

/// One shard of one thread, shared with the guards of its requests (which may settle on another
/// thread). The lock is never contended in the steady state: only its thread and its own
/// requests' guards take it, each for a few arithmetic operations.
pub struct ShardCell {
    pub(super) state: Mutex<CellState>,
    pub(super) model: Arc<str>,
    pub(super) holders: Arc<Holders>,
    /// Counts the shard as unsettled until its last report is queued (when dropped).
    pub(super) _ticket: Ticket,
}

pub(super) struct CellState {
    pub(super) shard: Shard,
    /// The account, as of the thread's view (replaced when its actor is rebuilt).
    pub(super) entry: Arc<AccountEntry>,
    pub(super) successes: Successes,
    /// The account's room as of the last exchange.
    pub(super) remaining: (Option<u64>, Option<u64>),
}

impl std::fmt::Debug for ShardCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCell")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl ShardCell {
    pub(super) fn new(
        entry: Arc<AccountEntry>,
        model: Arc<str>,
        holders: Arc<Holders>,
    ) -> ShardCell {
        ShardCell {
            state: Mutex::new(CellState {
                shard: Shard::new(),
                entry,
                successes: Successes::default(),
                remaining: (None, None),
            }),
            model,
            _ticket: holders.settings.outstanding.ticket(),
            holders,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, CellState> {
        // A panic while holding the lock leaves plain counters: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an exchange (the caller holds the lock): the report, the successes, and `need`.
    pub(super) fn begin(&self, st: &mut CellState, waiting: Option<u64>) -> Exchange {
        let now = self.holders.now();
        let ex = st
            .shard
            .begin_exchange(now, self.holders.horizon(), waiting);
        Exchange {
            model: self.model.clone(),
            report: ex.report,
            need: waiting.map_or(Units::ZERO, Units::request),
            want: ex.want,
            successes: Some(std::mem::take(&mut st.successes)),
        }
    }

    /// Applies the ledger's answer (or its absence) to the exchange in flight.
    pub(super) fn end(&self, reply: Option<&ExchangeReply>) {
        let mut st = self.lock();
        self.end_locked(&mut st, reply);
    }

    /// [`ShardCell::end`] with the lock held.
    pub(super) fn end_locked(&self, st: &mut CellState, reply: Option<&ExchangeReply>) {
        match reply {
            Some(r) => {
                st.shard
                    .end_exchange(Some((r.exchanged.lease, r.exchanged.epoch)));
                st.remaining = (r.exchanged.remaining_requests, r.exchanged.remaining_tokens);
            }
            None => st.shard.end_exchange(None),
        }
    }

    pub(in crate::actors) fn commit(
        self: &Arc<Self>,
        ticket: ShardTicket,
        tokens: u64,
        feedback: Option<Feedback>,
    ) {
        let now = self.holders.now();
        let mut st = self.lock();
        st.shard.commit(ticket, tokens, now);
        let used = Units {
            requests: 1,
            tokens,
            slots: 0,
        };
        match feedback {
            Some(fb) if fb.outcome == UpstreamOutcome::Success => {
                st.successes.count += 1;
                st.successes.latency_ms_sum += fb.latency_ms;
                if has_remaining(&fb.headers) {
                    st.successes.headers = fb.headers;
                    st.successes.used_since = Units::ZERO;
                    let free = st.shard.free();
                    let below = |seen: Option<u64>, held: u64| seen.is_some_and(|n| n < held);
                    if below(fb.headers.requests_remaining, free.requests)
                        || below(fb.headers.tokens_remaining, free.tokens)
                    {
                        // The upstream has less room than this holder holds: stop, and let the
                        // ledger apply the word now rather than at the next tick.
                        st.shard.withhold();
                        drop(st);
                        self.report_soon();
                    }
                } else {
                    st.successes.used_since = st.successes.used_since.saturating_add(used);
                }
            }
            None => st.successes.used_since = st.successes.used_since.saturating_add(used),
            Some(fb) => {
                // A 429, a refused key or a failure: this holder stops at once; the actor decides
                // for everyone when it hears.
                st.shard.withhold();
                let addr = st.entry.addr.clone();
                drop(st);
                addr.do_send(Feed(fb));
            }
        }
    }

    pub(in crate::actors) fn feed(&self, feedback: Feedback) {
        let mut st = self.lock();
        st.shard.withhold();
        let addr = st.entry.addr.clone();
        drop(st);
        addr.do_send(Feed(feedback));
    }

    pub(in crate::actors) fn release(&self, ticket: ShardTicket) {
        self.lock().shard.release(ticket);
    }

    pub(in crate::actors) fn renew(&self, ticket: ShardTicket) {
        let deadline = self.holders.reservation_deadline(self.holders.now());
        self.lock().shard.renew(ticket, deadline);
    }

    /// Reports in the background, on this thread's runtime (where there is one; else the next
    /// tick or exchange does).
    pub(super) fn report_soon(self: &Arc<Self>) {
        if actix_rt::Arbiter::try_current().is_some() {
            actix_rt::spawn(self.clone().report_now());
        }
    }

    /// Reports to the ledger now and waits for its answer.
    pub(in crate::actors) async fn report_now(self: Arc<Self>) -> Result<(), MailboxError> {
        let (addr, msg) = {
            let mut st = self.lock();
            if !st.shard.wants_exchange(Millis::MAX) {
                return Ok(());
            }
            let msg = self.begin(&mut st, None);
            (st.entry.addr.clone(), msg)
        };
        // The exchange ends in a task of its own: a caller that stops waiting (a status read
        // whose client left) must not leave the shard's exchange open forever.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cell = self.clone();
        let work = async move {
            let reply = addr.send(msg).await;
            cell.end(reply.as_ref().ok().and_then(Option::as_ref));
            let _ = tx.send(reply.map(|_| ()));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(work);
            }
            Err(_) => work.await,
        }
        rx.await.unwrap_or(Err(MailboxError::Closed))
    }
}

impl Drop for ShardCell {
    fn drop(&mut self) {
        // The holder is gone (its thread ended, or it was idle): report what was used and give
        // back the rest. `do_send` is always queued.
        let now = self.holders.now();
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let report = st.shard.close(now);
        let successes = std::mem::take(&mut st.successes);
        if report.is_some() || successes.count > 0 {
            st.entry.addr.do_send(Exchange {
                model: self.model.clone(),
                report,
                need: Units::ZERO,
                want: Units::ZERO,
                successes: Some(successes),
            });
        }
    }
}

/// Whether an answer said how much room the upstream has left.
pub(super) fn has_remaining(h: &RateHeaders) -> bool {
    h.requests_remaining.is_some() || h.tokens_remaining.is_some()
}
