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

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;

use super::account::{Broke, CheckAvailability, Exchange, ExchangeReply, Feed, Release};
use super::catalog::ProviderSpec;
use super::registry::{self, AccountEntry, ProviderEntry, Registry, SharedRegistry};
use super::reservation::{Outstanding, Reservation, ReservationGuard, Ticket};
use super::system::AcquireError;
use crate::domain::account::{
    Denial, Feedback, NeedGranted, RateHeaders, Successes, Summary, UpstreamOutcome,
};
use crate::domain::lease::{Shard, ShardMiss, ShardTicket, Units};
use crate::domain::refusal::Refusals;
use crate::domain::selection;
use crate::domain::time::{duration_ms, Millis, SharedClock};
use crate::domain::Strategy;
use crate::metrics::Metrics;

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

// ------------------------------------------------------------------------------------------------
// Shards
// ------------------------------------------------------------------------------------------------

/// One shard of one thread, shared with the guards of its requests (which may settle on another
/// thread). The lock is never contended in the steady state: only its thread and its own
/// requests' guards take it, each for a few arithmetic operations.
pub struct ShardCell {
    state: Mutex<CellState>,
    model: Arc<str>,
    holders: Arc<Holders>,
    /// Counts the shard as unsettled until its last report is queued (when dropped).
    _ticket: Ticket,
}

struct CellState {
    shard: Shard,
    /// The account, as of the thread's view (replaced when its actor is rebuilt).
    entry: Arc<AccountEntry>,
    successes: Successes,
    /// The account's room as of the last exchange.
    remaining: (Option<u64>, Option<u64>),
}

impl std::fmt::Debug for ShardCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCell")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl ShardCell {
    fn new(entry: Arc<AccountEntry>, model: Arc<str>, holders: Arc<Holders>) -> ShardCell {
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

    fn lock(&self) -> MutexGuard<'_, CellState> {
        // A panic while holding the lock leaves plain counters: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an exchange (the caller holds the lock): the report, the successes, and `need`.
    fn begin(&self, st: &mut CellState, waiting: Option<u64>) -> Exchange {
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
    fn end(&self, reply: Option<&ExchangeReply>) {
        let mut st = self.lock();
        self.end_locked(&mut st, reply);
    }

    /// [`ShardCell::end`] with the lock held.
    fn end_locked(&self, st: &mut CellState, reply: Option<&ExchangeReply>) {
        match reply {
            Some(r) => {
                st.shard
                    .end_exchange(Some((r.exchanged.lease, r.exchanged.epoch)));
                st.remaining = (r.exchanged.remaining_requests, r.exchanged.remaining_tokens);
            }
            None => st.shard.end_exchange(None),
        }
    }

    pub(super) fn commit(
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

    pub(super) fn feed(&self, feedback: Feedback) {
        let mut st = self.lock();
        st.shard.withhold();
        let addr = st.entry.addr.clone();
        drop(st);
        addr.do_send(Feed(feedback));
    }

    pub(super) fn release(&self, ticket: ShardTicket) {
        self.lock().shard.release(ticket);
    }

    pub(super) fn renew(&self, ticket: ShardTicket) {
        let deadline = self.holders.reservation_deadline(self.holders.now());
        self.lock().shard.renew(ticket, deadline);
    }

    /// Reports in the background, on this thread's runtime (where there is one; else the next
    /// tick or exchange does).
    fn report_soon(self: &Arc<Self>) {
        if actix_rt::Arbiter::try_current().is_some() {
            actix_rt::spawn(self.clone().report_now());
        }
    }

    /// Reports to the ledger now and waits for its answer.
    pub(super) async fn report_now(self: Arc<Self>) -> Result<(), MailboxError> {
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
fn has_remaining(h: &RateHeaders) -> bool {
    h.requests_remaining.is_some() || h.tokens_remaining.is_some()
}

// ------------------------------------------------------------------------------------------------
// A thread's views of the pools
// ------------------------------------------------------------------------------------------------

/// A refusal that lasts: skipped without a message until `until` or an epoch change. Kept per
/// model (some refusals, like a 403's cooldown, hold one model only).
#[derive(Debug, Clone)]
struct Sticky {
    model: Arc<str>,
    denial: Denial,
    epoch: u64,
    until: Millis,
}

impl Sticky {
    /// The refusals worth remembering: none of them can end before `until` unless the account's
    /// epoch moves.
    fn of(model: &Arc<str>, denial: &Denial, epoch: u64) -> Option<Sticky> {
        let until = match denial {
            Denial::Disabled { .. } | Denial::Expired => Millis::MAX,
            Denial::QuotaExceeded { reset_at } => *reset_at,
            Denial::RateLimited {
                retry_at,
                lower_bound: false,
                ..
            } => *retry_at,
            _ => return None,
        };
        Some(Sticky {
            model: model.clone(),
            denial: denial.clone(),
            epoch,
            until,
        })
    }
}

struct Member {
    entry: Arc<AccountEntry>,
    summary: Summary,
    sticky: Option<Sticky>,
    /// This thread's shards of the account, one per model.
    cells: Vec<Arc<ShardCell>>,
}

impl Member {
    fn new(entry: Arc<AccountEntry>) -> Member {
        Member {
            entry,
            summary: Summary {
                available: true,
                headroom: 1.0,
                ..Summary::default()
            },
            sticky: None,
            cells: Vec::new(),
        }
    }

    fn sticky(&mut self, model: &str, epoch: u64, now: Millis) -> Option<&Denial> {
        if self
            .sticky
            .as_ref()
            .is_some_and(|s| s.epoch != epoch || now >= s.until)
        {
            self.sticky = None;
        }
        self.sticky
            .as_ref()
            .filter(|s| &*s.model == model)
            .map(|s| &s.denial)
    }

    fn cell(&mut self, model: &Arc<str>, holders: &Arc<Holders>) -> Arc<ShardCell> {
        // Pointer equality first: the registry hands out the same name every time.
        if let Some(cell) = self
            .cells
            .iter()
            .find(|c| Arc::ptr_eq(&c.model, model) || c.model == *model)
        {
            return cell.clone();
        }
        let cell = Arc::new(ShardCell::new(
            self.entry.clone(),
            model.clone(),
            holders.clone(),
        ));
        self.cells.push(cell.clone());
        cell
    }
}

struct PoolView {
    strategy: Strategy,
    members: Vec<Member>,
    index: HashMap<Arc<str>, usize>,
    /// The strategy's order, for the strategies that sort (recomputed when summaries changed).
    order: Vec<usize>,
    order_stale: bool,
    ordered_at: Millis,
    cursor: usize,
    rng: u64,
}

impl PoolView {
    fn new(provider: &ProviderEntry, registry: &Registry, seed: u64) -> PoolView {
        let mut view = PoolView {
            strategy: provider.spec.strategy,
            members: Vec::new(),
            index: HashMap::new(),
            order: Vec::new(),
            order_stale: true,
            ordered_at: 0,
            cursor: 0,
            rng: seed | 1,
        };
        view.refresh(provider, registry);
        view
    }

    /// Follows a new registry: members added, removed or rebuilt, keeping what is known of the
    /// others.
    fn refresh(&mut self, provider: &ProviderEntry, registry: &Registry) {
        self.strategy = provider.spec.strategy;
        let mut old: HashMap<Arc<str>, Member> = self
            .members
            .drain(..)
            .map(|m| (m.entry.id.clone(), m))
            .collect();
        for entry in registry.accounts_of(&provider.spec.id) {
            let member = match old.remove(&entry.id) {
                Some(mut m) => {
                    if !Arc::ptr_eq(&m.entry, entry) {
                        for cell in &m.cells {
                            cell.lock().entry = entry.clone();
                        }
                        m.entry = entry.clone();
                    }
                    m
                }
                None => Member::new(entry.clone()),
            };
            self.members.push(member);
        }
        self.index = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.entry.id.clone(), i))
            .collect();
        self.order_stale = true;
    }

    /// Where a walk over the members starts (round robin and random move on each time).
    fn start(&mut self, now: Millis, interval: Millis) -> usize {
        let n = self.members.len().max(1);
        match self.strategy {
            Strategy::RoundRobin => {
                self.cursor = self.cursor.wrapping_add(1);
                self.cursor % n
            }
            Strategy::Random => (selection::next_random(&mut self.rng) % n as u64) as usize,
            Strategy::LeastUsed | Strategy::Best => {
                if self.order_stale && (interval == 0 || now - self.ordered_at >= interval) {
                    let summaries: Vec<Summary> = self.members.iter().map(|m| m.summary).collect();
                    self.order = selection::order(
                        self.strategy,
                        &summaries,
                        &mut self.cursor,
                        &mut self.rng,
                    );
                    self.order_stale = false;
                    self.ordered_at = now;
                }
                0
            }
        }
    }

    /// The `k`-th member of a walk that started at `start`.
    fn at(&self, start: usize, k: usize) -> usize {
        match self.strategy {
            Strategy::RoundRobin | Strategy::Random => (start + k) % self.members.len(),
            Strategy::LeastUsed | Strategy::Best => self
                .order
                .get(k)
                .copied()
                .filter(|&i| i < self.members.len())
                .unwrap_or(k % self.members.len()),
        }
    }

    fn learn(&mut self, account: &str, summary: Summary) {
        if let Some(&i) = self.index.get(account) {
            if self.members[i].summary != summary {
                self.members[i].summary = summary;
                self.order_stale = true;
            }
        }
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
    static HOLDERS: RefCell<Vec<Rc<Holder>>> = const { RefCell::new(Vec::new()) };
}

/// This thread's holder for `holders`' runtime, created (and its timer started) on first use.
fn local(holders: &Arc<Holders>) -> Rc<Holder> {
    HOLDERS.with(|all| {
        if let Some(h) = all.borrow().iter().find(|h| h.holders.id == holders.id) {
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
        all.borrow_mut().push(holder.clone());
        holder
    })
}

fn forget(holders: &Arc<Holders>) {
    let gone = HOLDERS.with(|all| {
        let mut all = all.borrow_mut();
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

// ------------------------------------------------------------------------------------------------
// Admission
// ------------------------------------------------------------------------------------------------

/// What the synchronous part of a walk decided.
enum Step {
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
struct Walk<'a> {
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
    fn reservation(
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
    fn step(&mut self, refusals: &mut Refusals) -> Step {
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
    fn answer(
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
struct Asked {
    reply: Option<ExchangeReply>,
    ticket: Option<ShardTicket>,
}

/// Sends an exchange and applies its answer to the shard, in a task of its own: a request dropped
/// while it waits (its client left) loses nothing — the task still ends the shard's exchange,
/// and gives back what the ledger granted for the request (the shard's units to its free ones, a
/// reservation of its own released). Runs inline where there is no tokio runtime to spawn on.
async fn ask(
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

fn count_refusal(metrics: &Metrics, provider_id: &str, denial: &Denial) {
    if let Denial::RateLimited { limit, .. } = denial {
        metrics
            .rate_limit_hits_total
            .with_label_values(&[provider_id, limit])
            .inc();
    }
}

/// Admits a request for `model` on an account of a provider serving it, trying providers in
/// turn (see [`super::QuotaSystem::acquire`]).
pub(super) async fn acquire(
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
