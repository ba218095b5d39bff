//! The holders of level 1 (DESIGN.md, "Capacity leases"): every thread that admits requests —
//! an HTTP worker — keeps, per account and model it serves, a [`Shard`] of a lease from the
//! account's actor, and its own view of each pool (members, their last summaries, the strategy's
//! order). Admission and settling are plain calls on the shard; nothing crosses threads per
//! request. A timer per thread (`lease.report_interval`) reports what was used, gives back what
//! sits idle and refills what runs low, one [`Exchange`] per active shard; a shard that runs dry
//! mid-interval exchanges at once, and a request that finds the room tight (or the shard busy)
//! asks the ledger for a reservation of its own — today's exact path, just slower.
//!
//! A thread that is not an actix arbiter (a caller of the runtime's own thread, a plain tokio
//! runtime) has no timer: it always asks the ledger per request.
//!
//! The views learn accounts' refusals that last (disabled, expired, quota exhausted, cooling down,
//! a full window held by settled usage) and skip those accounts without a message until the
//! refusal's time, or until the account's lease epoch moves (an operator change, a reset).

mod admission;
mod cell;
mod view;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::account::Broke;
use super::registry::{self, Registry, SharedRegistry};
use super::reservation::Outstanding;
use crate::batch::OnThreadExit;
use crate::domain::time::{duration_ms, Millis, SharedClock};
use crate::metrics::Metrics;

pub(crate) use admission::acquire;
pub use cell::ShardCell;
use view::PoolView;

/// How the holders of one runtime work.
#[derive(Clone)]
pub struct HolderSettings {
    pub clock: SharedClock,
    /// How often each thread reports and refills; zero: no leases, every request asks the ledger.
    pub report_interval: Duration,
    pub reservation_timeout: Duration,
    pub metrics: Metrics,
    pub outstanding: Outstanding,
    /// Who is who: views follow it.
    pub registry: SharedRegistry,
}

/// What every holder of one runtime shares.
pub struct Holders {
    id: u64,
    settings: HolderSettings,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Holders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holders").field("id", &self.id).finish()
    }
}

impl Holders {
    pub fn new(settings: HolderSettings) -> Arc<Holders> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Holders {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            settings,
            stopped: AtomicBool::new(false),
        })
    }

    /// Ends every thread's holder at its next tick: leases are reported and closed.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    fn now(&self) -> Millis {
        self.settings.clock.now_ms()
    }

    fn horizon(&self) -> Millis {
        3 * duration_ms(self.settings.report_interval)
    }

    fn reservation_deadline(&self, now: Millis) -> Millis {
        now.saturating_add(duration_ms(self.settings.reservation_timeout))
    }
}

/// One thread's holder for one runtime.
struct Holder {
    holders: Arc<Holders>,
    /// Whether a report timer runs on this thread (else every request asks the ledger).
    ticking: bool,
    registry: RefCell<Option<Arc<Registry>>>,
    pools: RefCell<HashMap<Arc<str>, PoolView>>,
}

thread_local! {
    /// This thread's holders; when the thread ends their shards report (see `ShardCell`'s drop).
    static HOLDERS: OnThreadExit<Vec<Rc<Holder>>> = const { OnThreadExit(RefCell::new(Vec::new())) };
}

/// This thread's holder for `holders`' runtime, created (and its timer started) on first use.
fn local(holders: &Arc<Holders>) -> Rc<Holder> {
    HOLDERS.with(|all| {
        if let Some(h) = all.0.borrow().iter().find(|h| h.holders.id == holders.id) {
            return h.clone();
        }
        let ticking = !holders.settings.report_interval.is_zero()
            && !holders.stopped.load(Ordering::Acquire)
            && actix_rt::Arbiter::try_current().is_some();
        let holder = Rc::new(Holder {
            holders: holders.clone(),
            ticking,
            registry: RefCell::new(None),
            pools: RefCell::new(HashMap::new()),
        });
        if ticking {
            actix_rt::spawn(run_timer(holder.clone()));
        }
        all.0.borrow_mut().push(holder.clone());
        holder
    })
}

fn forget(holders: &Arc<Holders>) {
    let gone = HOLDERS.with(|all| {
        let mut all = all.0.borrow_mut();
        let i = all.iter().position(|h| h.holders.id == holders.id)?;
        Some(all.swap_remove(i))
    });
    if let Some(holder) = gone {
        holder.pools.borrow_mut().clear();
    }
}

impl Holder {
    /// Brings the views up to date with `registry` (cheap when it did not change).
    fn sync(&self, registry: &Arc<Registry>) {
        let mut seen = self.registry.borrow_mut();
        if seen.as_ref().is_some_and(|r| Arc::ptr_eq(r, registry)) {
            return;
        }
        let mut pools = self.pools.borrow_mut();
        pools.retain(|id, _| registry.provider(id).is_ok());
        for (id, view) in pools.iter_mut() {
            if let Ok(provider) = registry.provider(id) {
                view.refresh(provider, registry);
            }
        }
        *seen = Some(registry.clone());
    }

    /// Every shard of this thread (for the timer and for flushes).
    fn cells(&self, account: Option<&str>) -> Vec<Arc<ShardCell>> {
        self.sync(&registry::read(&self.holders.settings.registry));
        self.pools
            .borrow()
            .values()
            .flat_map(|v| v.members.iter())
            .filter(|m| account.is_none_or(|a| *m.entry.id == *a))
            .flat_map(|m| m.cells.iter().cloned())
            .collect()
    }

    /// One report round: expire forgotten requests, exchange where something changed, drop
    /// shards that went idle.
    async fn tick(&self) {
        self.sync(&registry::read(&self.holders.settings.registry));
        let now = self.holders.now();
        let renew_before = now.saturating_add(4 * self.holders.horizon());
        let mut asks = Vec::new();
        {
            let mut pools = self.pools.borrow_mut();
            for view in pools.values_mut() {
                for member in &mut view.members {
                    // Idle shards go (only the view holds them: no request is in flight).
                    member
                        .cells
                        .retain(|c| !(Arc::strong_count(c) == 1 && c.lock().shard.is_idle()));
                    for cell in &member.cells {
                        let mut st = cell.lock();
                        st.shard.expire(now);
                        if st.shard.wants_exchange(renew_before) {
                            let msg = cell.begin(&mut st, None);
                            asks.push((cell.clone(), st.entry.addr.clone(), msg));
                        }
                    }
                }
            }
        }
        if asks.is_empty() {
            return;
        }
        let replies = join_all(
            asks.into_iter()
                .map(|(cell, addr, msg)| async move { (cell, addr.send(msg).await) }),
        )
        .await;
        let registry = self.registry.borrow().clone();
        let mut pools = self.pools.borrow_mut();
        for (cell, reply) in replies {
            let reply = reply.ok().flatten();
            cell.end(reply.as_ref());
            let entry = cell.lock().entry.clone();
            match reply {
                Some(r) => {
                    if let Some(view) = pools.get_mut(&entry.provider_id) {
                        view.learn(&entry.id, r.summary);
                    }
                }
                None => {
                    // The actor is gone (a panic): its pool rebuilds it.
                    if let Some(provider) = registry
                        .as_ref()
                        .and_then(|r| r.provider(&entry.provider_id).ok())
                    {
                        provider.pool.do_send(Broke {
                            account_id: entry.id.clone(),
                        });
                    }
                }
            }
        }
    }
}

async fn run_timer(holder: Rc<Holder>) {
    let mut every = actix_rt::time::interval(holder.holders.settings.report_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if holder.holders.stopped.load(Ordering::Acquire) {
            forget(&holder.holders);
            return;
        }
        holder.tick().await;
    }
}

/// Reports every shard of this thread (of one account, or all) now and waits for the answers:
/// reads that follow see what this thread admitted.
pub(super) async fn flush_local(holders: &Arc<Holders>, account: Option<&str>) {
    let cells = local(holders).cells(account);
    for cell in cells {
        let _ = cell.report_now().await;
    }
}
