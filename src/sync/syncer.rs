//! `Syncer`: every `sync.database_interval` it collects the accounts whose state changed and
//! writes them (and their `quota_used` / `last_reset`) to the database in one transaction, with
//! this instance's heartbeat (`settings::heartbeat`), even when nothing changed: the heartbeat
//! bounds what a crash of this instance can leave unknown.
//!
//! Each state is this instance's view of the account: with Redis, the ledger as last agreed,
//! under the ledger's version. Several instances write the same rows; the database keeps the
//! higher version. With Redis the ledger itself is the live state, and this copy is what a start
//! restores when Redis no longer holds it (see [`super::restore`]).
//!
//! A failing write keeps its pending states and is retried with backoff; the database's going down
//! and coming back are logged once each (and counted), not once per tick. Nothing here is on the
//! request path: the actors keep serving whatever the database does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use diesel::Connection as _;

use crate::actors::QuotaSystem;
use crate::backoff::Backoff;
use crate::domain::account::AccountState;
use crate::domain::time::{duration_ms, to_datetime, Millis, SharedClock};
use crate::metrics::Metrics;
use crate::store::state::AccountStateRow;
use crate::store::{accounts, settings, state, Store};

/// Waits before retrying a failing write: from 500 ms, doubling up to 30 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Syncs every account to the database now; answers when done (or failed).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<FlushReport, String>")]
pub struct Flush;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Account states collected (changed since the previous round) and written.
    pub accounts: usize,
}

/// The health of the database link.
#[derive(Debug, Clone, Copy)]
struct Link {
    up: bool,
    backoff: Backoff,
    retry_at: Millis,
    last_ok: Millis,
}

impl Link {
    fn new(now: Millis) -> Link {
        Link {
            up: true,
            backoff: BACKOFF,
            retry_at: 0,
            last_ok: now,
        }
    }

    /// Records a success; returns whether the link just came back.
    fn ok(&mut self, now: Millis) -> bool {
        let recovered = !self.up;
        *self = Link::new(now);
        recovered
    }

    /// Records a failure and schedules the retry; returns whether the link just went down.
    fn failed(&mut self, now: Millis) -> bool {
        let went_down = self.up;
        self.up = false;
        self.retry_at = now + duration_ms(self.backoff.next_delay());
        went_down
    }
}

pub struct SyncSettings {
    /// `sync.database_interval`: how often the sync ticks.
    pub database_interval: Duration,
    /// `instance.id`: names the heartbeat this instance writes (see `settings::heartbeat`).
    pub instance_id: String,
}

pub struct Syncer {
    runtime: QuotaSystem,
    store: Store,
    clock: SharedClock,
    metrics: Metrics,
    database_interval: Millis,
    /// The settings key of this instance's heartbeat.
    heartbeat_key: String,
    /// States not yet written to the database (the latest per account).
    pending_database: HashMap<Arc<str>, AccountState>,
    database_link: Link,
    last_database_tick: Millis,
    /// Accounts whose state changed in the last round.
    changed_last_round: usize,
}

impl Syncer {
    pub fn new(
        runtime: QuotaSystem,
        store: Store,
        settings: SyncSettings,
        metrics: Metrics,
    ) -> Syncer {
        let clock = runtime.clock().clone();
        let now = clock.now_ms();
        Syncer {
            runtime,
            store,
            clock,
            metrics,
            database_interval: duration_ms(settings.database_interval),
            heartbeat_key: settings::heartbeat(&settings.instance_id),
            pending_database: HashMap::new(),
            database_link: Link::new(now),
            last_database_tick: now,
            changed_last_round: 0,
        }
    }

    fn tick_every(&self) -> Duration {
        Duration::from_millis(self.database_interval.max(1) as u64)
    }

    fn schedule(&self, ctx: &mut Context<Self>) {
        ctx.run_later(self.tick_every(), |act, ctx| {
            ctx.wait(
                act.sync(false)
                    .then(|_, act, _ctx| act.mark_idle())
                    .map(|(), act, ctx| act.schedule(ctx)),
            );
        });
    }

    /// Marks the runtime idle in the crash mark (see [`super::mark`]) when a round changed
    /// nothing, the database holds every state collected so far and no lease is out; a crash then
    /// charges no gap. (With Redis the ledger is not enough: Redis may lose it, and the restore
    /// would then seed it from an older database copy with nothing charged.) The gate re-checks
    /// once no admission can start: what it collects then is queued for the database.
    fn mark_idle(&mut self) -> Pin<Box<dyn ActorFuture<Self, Output = ()>>> {
        let Some(gate) = self.runtime.admission_gate().cloned() else {
            return Box::pin(fut::ready(()));
        };
        if !gate.is_armed()
            || !self.pending_database.is_empty()
            || self.changed_last_round > 0
            || self.runtime.leases_out() > 0
        {
            return Box::pin(fut::ready(()));
        }
        let runtime = self.runtime.clone();
        let check = async move {
            let changed = runtime.collect_changed().await;
            (changed.is_empty() && runtime.leases_out() == 0, changed)
        };
        Box::pin(
            async move { gate.disarm(check).await }
                .into_actor(self)
                .map(|(_, changed), act, _ctx| {
                    for (id, state) in changed.into_iter().flatten() {
                        act.pending_database.insert(id, state);
                    }
                }),
        )
    }

    /// One round: collect, then write to the database when due (always when `force`).
    fn sync(
        &mut self,
        force: bool,
    ) -> Pin<Box<dyn ActorFuture<Self, Output = Result<FlushReport, String>>>> {
        let runtime = self.runtime.clone();
        Box::pin(
            async move {
                if force {
                    runtime.collect_flushed().await
                } else {
                    runtime.collect_changed().await
                }
            }
            .into_actor(self)
            .then(move |changed, act, _ctx| {
                let count = changed.len();
                act.changed_last_round = count;
                act.pending_database.extend(changed);
                act.update_lag_metrics();
                let now = act.clock.now_ms();
                let due = force
                    || (now - act.last_database_tick >= act.database_interval
                        && now >= act.database_link.retry_at);
                act.write_database(due).map(move |result, act, _ctx| {
                    act.update_lag_metrics();
                    result.map(|()| FlushReport { accounts: count })
                })
            }),
        )
    }

    /// Writes the pending states, usage counters and this instance's heartbeat in one transaction.
    fn write_database(
        &mut self,
        due: bool,
    ) -> Pin<Box<dyn ActorFuture<Self, Output = Result<(), String>>>> {
        if !due {
            return Box::pin(fut::ready(Ok(())));
        }
        // Accounts deleted meanwhile have no row to refer to.
        let registry = self.runtime.registry();
        self.pending_database
            .retain(|id, _| registry.account(id).is_ok());
        let states: Vec<(Arc<str>, AccountState)> = self
            .pending_database
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        let store = self.store.clone();
        let heartbeat_key = self.heartbeat_key.clone();
        let now = self.clock.now_ms();
        let write = tokio::task::spawn_blocking(move || {
            let mut conn = store.conn().map_err(|e| e.to_string())?;
            let updated_at = to_datetime(now).naive_utc();
            conn.transaction(|conn| {
                let rows: Vec<AccountStateRow> = states
                    .iter()
                    .map(|(id, s)| AccountStateRow {
                        account_id: id.to_string(),
                        version: i64::try_from(s.version).unwrap_or(i64::MAX),
                        state: serde_json::to_string(s).unwrap_or_default(),
                        updated_at,
                    })
                    .collect();
                state::put(conn, &rows)?;
                for (id, s) in &states {
                    let used = i64::try_from(s.quota.used).unwrap_or(i64::MAX);
                    accounts::record_usage(
                        conn,
                        id,
                        used,
                        to_datetime(s.quota.period_start).naive_utc(),
                    )?;
                }
                settings::put(conn, &heartbeat_key, &now.to_string())
            })
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(
                states
                    .into_iter()
                    .map(|(id, s)| (id, s.version))
                    .collect::<Vec<_>>(),
            )
        });
        Box::pin(write.into_actor(self).map(move |joined, act, _ctx| {
            let now = act.clock.now_ms();
            match joined.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(sent) => {
                    act.last_database_tick = now;
                    for (id, version) in sent {
                        if act.pending_database.get(&id).is_some_and(|s| s.version == version) {
                            act.pending_database.remove(&id);
                        }
                    }
                    if act.database_link.ok(now) {
                        log::info!(event = "sync_recovered", target = "database"; "database sync works again");
                    }
                    act.metrics.sync_up.with_label_values(&["database"]).set(1);
                    Ok(())
                }
                Err(problem) => {
                    act.metrics.sync_failures_total.with_label_values(&["database"]).inc();
                    act.metrics.sync_up.with_label_values(&["database"]).set(0);
                    if act.database_link.failed(now) {
                        log::warn!(
                            event = "sync_failed", target = "database";
                            "database sync failed; retrying with backoff: {problem}"
                        );
                    }
                    Err(problem)
                }
            }
        }))
    }

    fn update_lag_metrics(&self) {
        let now = self.clock.now_ms();
        let lag = (now - self.database_link.last_ok).max(0) as f64 / 1000.0;
        self.metrics
            .sync_lag_seconds
            .with_label_values(&["database"])
            .set(lag);
    }
}

impl Actor for Syncer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The failure counters exist from the start (at 0), so `rate()` and alerts on them work
        // before the first failure.
        self.metrics
            .sync_failures_total
            .with_label_values(&["database"]);
        self.schedule(ctx);
    }
}

impl Handler<Flush> for Syncer {
    type Result = AtomicResponse<Self, Result<FlushReport, String>>;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.sync(true))
    }
}
