//! One request's walk over the pools serving its model: admitted from a shard where it can be,
//! else by asking the account (in a task of its own, so that a dropped request loses nothing).

use std::sync::Arc;

use super::view::{PoolView, Sticky};
use super::{local, Holders, ShardCell};
use crate::actors::account::{Broke, CheckAvailability, Exchange, ExchangeReply, Release};
use crate::actors::catalog::ProviderSpec;
use crate::actors::registry::{AccountEntry, ProviderEntry, Registry};
use crate::actors::reservation::{Reservation, ReservationGuard};
use crate::actors::system::AcquireError;
use crate::domain::account::{Denial, NeedGranted};
use crate::domain::lease::{ShardMiss, ShardTicket, Units};
use crate::domain::refusal::Refusals;
use crate::domain::time::{duration_ms, Millis};
use crate::metrics::Metrics;

/// What the synchronous part of a walk decided.
pub(super) enum Step {
    Done(Reservation),
    /// Ask this account's ledger (`cell`: an exchange of that shard was begun).
    Ask {
        entry: Arc<AccountEntry>,
        cell: Option<Arc<ShardCell>>,
        msg: Exchange,
    },
    /// Every member of the pool was tried.
    Exhausted,
}

/// One request's walk over one pool.
pub(super) struct Walk<'a> {
    holders: &'a Arc<Holders>,
    registry: &'a Arc<Registry>,
    provider: &'a Arc<ProviderEntry>,
    model: &'a Arc<str>,
    estimate: u64,
    exclude: &'a [Arc<str>],
    start: Option<usize>,
    k: usize,
    excluded: Vec<Arc<AccountEntry>>,
}

impl Walk<'_> {
    pub(super) fn reservation(
        &self,
        account: Arc<AccountEntry>,
        remaining: (Option<u64>, Option<u64>),
        guard: ReservationGuard,
    ) -> Reservation {
        Reservation {
            provider: self.provider.clone(),
            account,
            model: self.model.clone(),
            estimate: self.estimate,
            remaining_requests: remaining.0,
            remaining_tokens: remaining.1,
            guard: guard.counted_in(&self.holders.settings.outstanding),
        }
    }

    /// Tries members until one admits from its shard or one must be asked.
    pub(super) fn step(&mut self, refusals: &mut Refusals) -> Step {
        let holder = local(self.holders);
        holder.sync(self.registry);
        let now = self.holders.now();
        let mut pools = holder.pools.borrow_mut();
        let view = pools
            .entry(self.provider.spec.id.clone())
            .or_insert_with(|| {
                PoolView::new(self.provider, self.registry, now as u64 ^ self.holders.id)
            });
        let interval = duration_ms(self.holders.settings.report_interval);
        let start = *self.start.get_or_insert_with(|| view.start(now, interval));
        let need = Units::request(self.estimate);
        while self.k < view.members.len() {
            let i = view.at(start, self.k);
            self.k += 1;
            let member = &mut view.members[i];
            if self.exclude.contains(&member.entry.id) {
                self.excluded.push(member.entry.clone());
                continue;
            }
            let epoch = member.entry.control.epoch();
            if let Some(denial) = member.sticky(self.model, epoch, now) {
                count_refusal(
                    &self.holders.settings.metrics,
                    &self.provider.spec.id,
                    denial,
                );
                refusals.add(denial);
                continue;
            }
            let direct = Exchange {
                model: self.model.clone(),
                report: None,
                need,
                want: Units::ZERO,
                successes: None,
            };
            if !holder.ticking {
                return Step::Ask {
                    entry: member.entry.clone(),
                    cell: None,
                    msg: direct,
                };
            }
            let cell = member.cell(self.model, self.holders);
            let mut st = cell.lock();
            let deadline = self.holders.reservation_deadline(now);
            match st.shard.reserve(self.estimate, epoch, deadline) {
                Ok(ticket) => {
                    let free = st.shard.free();
                    let remaining = (
                        st.remaining.0.map(|r| r.saturating_add(free.requests)),
                        st.remaining.1.map(|r| r.saturating_add(free.tokens)),
                    );
                    let entry = st.entry.clone();
                    drop(st);
                    let guard = ReservationGuard::in_shard(cell.clone(), ticket, self.estimate);
                    return Step::Done(self.reservation(entry, remaining, guard));
                }
                Err(ShardMiss::Dry) => {
                    let msg = cell.begin(&mut st, Some(self.estimate));
                    let entry = st.entry.clone();
                    drop(st);
                    return Step::Ask {
                        entry,
                        cell: Some(cell),
                        msg,
                    };
                }
                Err(ShardMiss::Busy) => {
                    return Step::Ask {
                        entry: st.entry.clone(),
                        cell: None,
                        msg: direct,
                    }
                }
            }
        }
        Step::Exhausted
    }

    /// Takes the ledger's answer to an ask: a reservation, or a refusal to remember.
    pub(super) fn answer(
        &mut self,
        entry: Arc<AccountEntry>,
        cell: Option<Arc<ShardCell>>,
        asked: Asked,
        refusals: &mut Refusals,
    ) -> Option<Reservation> {
        let Asked { reply, ticket } = asked;
        let Some(reply) = reply else {
            // The actor is gone (a panic): its pool rebuilds it.
            self.provider.pool.do_send(Broke {
                account_id: entry.id.clone(),
            });
            refusals.add_unavailable();
            return None;
        };
        let holder = local(self.holders);
        if let Some(view) = holder.pools.borrow_mut().get_mut(&self.provider.spec.id) {
            view.learn(&entry.id, reply.summary);
            if let Some(Err(denial)) = &reply.exchanged.need {
                if let Some(&i) = view.index.get(&entry.id) {
                    view.members[i].sticky = Sticky::of(self.model, denial, reply.exchanged.epoch);
                }
            }
        }
        let remaining = (
            reply.exchanged.remaining_requests,
            reply.exchanged.remaining_tokens,
        );
        match reply.exchanged.need {
            Some(Ok(NeedGranted::InLease)) => {
                let (cell, ticket) = (cell?, ticket?);
                let free = cell.lock().shard.free();
                // The account's room beyond the leases, plus what this holder still has free.
                let remaining = (
                    remaining.0.map(|r| r.saturating_add(free.requests)),
                    remaining.1.map(|r| r.saturating_add(free.tokens)),
                );
                let guard = ReservationGuard::in_shard(cell, ticket, self.estimate);
                Some(self.reservation(entry, remaining, guard))
            }
            Some(Ok(NeedGranted::Reservation(grant))) => {
                let guard = ReservationGuard::at_ledger(
                    entry.addr.clone(),
                    grant.reservation,
                    self.estimate,
                );
                let remaining = (grant.remaining_requests, grant.remaining_tokens);
                Some(self.reservation(entry, remaining, guard))
            }
            Some(Err(denial)) => {
                count_refusal(
                    &self.holders.settings.metrics,
                    &self.provider.spec.id,
                    &denial,
                );
                refusals.add(&denial);
                None
            }
            None => {
                refusals.add_unavailable();
                None
            }
        }
    }
}

/// The ledger's answer to an ask; `ticket`: the request admitted from the shard's lease when the
/// ledger added its units there.
pub(super) struct Asked {
    reply: Option<ExchangeReply>,
    ticket: Option<ShardTicket>,
}

/// Sends an exchange and applies its answer to the shard, in a task of its own: a request dropped
/// while it waits (its client left) loses nothing — the task still ends the shard's exchange,
/// and gives back what the ledger granted for the request (the shard's units to its free ones, a
/// reservation of its own released). Runs inline where there is no tokio runtime to spawn on.
pub(super) async fn ask(
    entry: Arc<AccountEntry>,
    cell: Option<Arc<ShardCell>>,
    msg: Exchange,
    estimate: u64,
    deadline: Millis,
) -> Asked {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let work = async move {
        let reply = entry.addr.send(msg).await.ok().flatten();
        let mut ticket = None;
        if let Some(cell) = &cell {
            let mut st = cell.lock();
            cell.end_locked(&mut st, reply.as_ref());
            if let Some(Some(Ok(NeedGranted::InLease))) = reply.as_ref().map(|r| &r.exchanged.need)
            {
                ticket = Some(st.shard.admit_granted(estimate, deadline));
            }
        }
        let asked = Asked { reply, ticket };
        if let Err(gone) = tx.send(asked) {
            // Nobody waits any more: give back what was granted for the request.
            match (&gone.reply, gone.ticket, &cell) {
                (_, Some(ticket), Some(cell)) => cell.release(ticket),
                (Some(r), _, _) => {
                    if let Some(Ok(NeedGranted::Reservation(grant))) = &r.exchanged.need {
                        entry.addr.do_send(Release {
                            reservation: grant.reservation,
                        });
                    }
                }
                _ => {}
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work);
        }
        Err(_) => work.await,
    }
    rx.await.unwrap_or(Asked {
        reply: None,
        ticket: None,
    })
}

pub(super) fn count_refusal(metrics: &Metrics, provider_id: &str, denial: &Denial) {
    if let Denial::RateLimited { limit, .. } = denial {
        metrics
            .rate_limit_hits_total
            .with_label_values(&[provider_id, limit])
            .inc();
    }
}

/// Admits a request for `model` on an account of a provider serving it, trying providers in
/// turn (see [`super::QuotaSystem::acquire`]).
pub(crate) async fn acquire(
    holders: &Arc<Holders>,
    registry: Arc<Registry>,
    model: &str,
    estimate: impl Fn(&ProviderSpec) -> u64,
    exclude: &[Arc<str>],
) -> Result<Reservation, AcquireError> {
    let routes = registry.route(model);
    if routes.is_empty() {
        return Err(AcquireError::ModelNotFound(model.to_string()));
    }
    let mut refusals = Refusals::default();
    for (provider, upstream_model) in &routes {
        let mut walk = Walk {
            holders,
            registry: &registry,
            provider,
            model: upstream_model,
            // Every request costs at least one token, so a full token window is never passed.
            estimate: estimate(&provider.spec).max(1),
            exclude,
            start: None,
            k: 0,
            excluded: Vec::new(),
        };
        loop {
            match walk.step(&mut refusals) {
                Step::Done(reservation) => return Ok(reservation),
                Step::Exhausted => break,
                Step::Ask { entry, cell, msg } => {
                    let deadline = holders.reservation_deadline(holders.now());
                    let asked =
                        ask(entry.clone(), cell.clone(), msg, walk.estimate, deadline).await;
                    if let Some(r) = walk.answer(entry, cell, asked, &mut refusals) {
                        return Ok(r);
                    }
                }
            }
        }
        // Accounts already tried for this request are not reserved again, but when nothing else
        // has room their state (e.g. the cooldown an upstream 429 just set) decides the answer.
        for entry in std::mem::take(&mut walk.excluded) {
            let check = CheckAvailability {
                model: upstream_model.clone(),
                estimate: walk.estimate,
            };
            if let Ok(Err(denial)) = entry.addr.send(check).await {
                refusals.add(&denial);
            }
        }
    }
    Err(AcquireError::Refused(refusals.verdict()))
}
