//! `Syncer`: every `sync.redis_interval` it collects the accounts whose state changed and writes
//! them to Redis in pipelined batches; every `sync.database_interval` it writes them (and their
//! `quota_used` / `last_reset`) to the database in one transaction. Each completed tick also writes
//! a heartbeat, even when nothing changed, which bounds what a crash can leave unknown.
//!
//! A failing copy keeps its pending states and is retried with backoff; the link's going down and
//! coming back are logged once each (and counted), not once per tick. Nothing here is on the
//! request path: the actors keep serving from memory whatever Redis or the database do.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use diesel::Connection as _;

use super::redis_link::{account_key, classify, HEARTBEAT_KEY};
use crate::actors::QuotaSystem;
use crate::backoff::Backoff;
use crate::domain::account::AccountState;
use crate::domain::time::{duration_ms, to_datetime, Millis, SharedClock};
use crate::metrics::Metrics;
use crate::store::state::AccountStateRow;
use crate::store::{accounts, settings, state, Store};

/// States per Redis round trip.
const REDIS_BATCH: usize = 500;
/// Waits before retrying a failing copy: from 500 ms, doubling up to 30 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Syncs every account to the database and Redis now; answers when done (or failed).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<FlushReport, String>")]
pub struct Flush;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub accounts: usize,
    pub redis: bool,
}

/// The health of one copy.
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
    pub redis_interval: Duration,
    pub database_interval: Duration,
}

pub struct Syncer {
    runtime: QuotaSystem,
    store: Store,
    redis: Option<redis::Client>,
    redis_conn: Option<redis::aio::MultiplexedConnection>,
    clock: SharedClock,
    metrics: Metrics,
    redis_interval: Millis,
    database_interval: Millis,
    /// States not yet written to each copy (the latest per account).
    pending_redis: HashMap<Arc<str>, AccountState>,
    pending_database: HashMap<Arc<str>, AccountState>,
    redis_link: Link,
    database_link: Link,
    last_database_tick: Millis,
    /// Accounts whose state changed in the last round.
    changed_last_round: usize,
}

impl Syncer {
    pub fn new(
        runtime: QuotaSystem,
        store: Store,
        redis: Option<redis::Client>,
        settings: SyncSettings,
        metrics: Metrics,
    ) -> Syncer {
        let clock = runtime.clock().clone();
        let now = clock.now_ms();
        Syncer {
            runtime,
            store,
            redis,
            redis_conn: None,
            clock,
            metrics,
            redis_interval: duration_ms(settings.redis_interval),
            database_interval: duration_ms(settings.database_interval),
            pending_redis: HashMap::new(),
            pending_database: HashMap::new(),
            redis_link: Link::new(now),
            database_link: Link::new(now),
            last_database_tick: now,
            changed_last_round: 0,
        }
    }

    fn tick_every(&self) -> Duration {
        let ms = if self.redis.is_some() {
            self.redis_interval.min(self.database_interval)
        } else {
            self.database_interval
        };
        Duration::from_millis(ms.max(1) as u64)
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
    /// charges no gap. (Redis alone is not enough: it may lose what it holds, and the restore
    /// would then fall back to an older database copy with nothing charged.) The gate re-checks
    /// once no admission can start: what it collects then is queued for the copies.
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
                        if act.redis.is_some() {
                            act.pending_redis.insert(id.clone(), state.clone());
                        }
                        act.pending_database.insert(id, state);
                    }
                }),
        )
    }

    /// One round: collect, then write each copy that is due (all of them when `force`).
    fn sync(
        &mut self,
        force: bool,
    ) -> Pin<Box<dyn ActorFuture<Self, Output = Result<FlushReport, String>>>> {
        let runtime = self.runtime.clone();
        Box::pin(
            async move { runtime.collect_changed().await }
                .into_actor(self)
                .then(move |changed, act, _ctx| {
                    let count = changed.len();
                    act.changed_last_round = count;
                    for (id, state) in changed {
                        if act.redis.is_some() {
                            act.pending_redis.insert(id.clone(), state.clone());
                        }
                        act.pending_database.insert(id, state);
                    }
                    act.update_lag_metrics();
                    let now = act.clock.now_ms();
                    let redis_due =
                        act.redis.is_some() && (force || now >= act.redis_link.retry_at);
                    act.write_redis(redis_due).then(move |redis_ok, act, _ctx| {
                        let now = act.clock.now_ms();
                        let database_due = force
                            || (now - act.last_database_tick >= act.database_interval
                                && now >= act.database_link.retry_at);
                        act.write_database(database_due)
                            .map(move |db_result, act, _ctx| {
                                act.update_lag_metrics();
                                db_result.map(|()| FlushReport {
                                    accounts: count,
                                    redis: redis_ok,
                                })
                            })
                    })
                }),
        )
    }

    /// Writes the pending states and the heartbeat to Redis; resolves to whether Redis is current.
    fn write_redis(&mut self, due: bool) -> Pin<Box<dyn ActorFuture<Self, Output = bool>>> {
        let Some(client) = self.redis.clone().filter(|_| due) else {
            return Box::pin(fut::ready(false));
        };
        let batch: Vec<(String, String)> = self
            .pending_redis
            .iter()
            .map(|(id, s)| {
                (
                    account_key(id),
                    serde_json::to_string(s).unwrap_or_default(),
                )
            })
            .collect();
        let sent: Vec<(Arc<str>, u64)> = self
            .pending_redis
            .iter()
            .map(|(id, s)| (id.clone(), s.version))
            .collect();
        let conn = self.redis_conn.clone();
        let now = self.clock.now_ms();
        let write = async move {
            let addr = client.get_connection_info().addr().to_string();
            let mut conn = match conn {
                Some(c) => c,
                None => client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| classify(&addr, &e).to_string())?,
            };
            for chunk in batch.chunks(REDIS_BATCH) {
                let mut pipe = redis::pipe();
                for (key, json) in chunk {
                    pipe.set(key, json).ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| classify(&addr, &e).to_string())?;
            }
            redis::cmd("SET")
                .arg(HEARTBEAT_KEY)
                .arg(now)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| classify(&addr, &e).to_string())?;
            Ok::<_, String>(conn)
        };
        Box::pin(write.into_actor(self).map(move |result, act, _ctx| {
            let now = act.clock.now_ms();
            match result {
                Ok(conn) => {
                    act.redis_conn = Some(conn);
                    // Only what was sent leaves the queue: a newer state collected meanwhile stays.
                    for (id, version) in sent {
                        if act.pending_redis.get(&id).is_some_and(|s| s.version == version) {
                            act.pending_redis.remove(&id);
                        }
                    }
                    if act.redis_link.ok(now) {
                        log::info!(event = "sync_recovered", target = "redis"; "Redis is reachable again; account state written back");
                    }
                    act.metrics.sync_up.with_label_values(&["redis"]).set(1);
                    true
                }
                Err(problem) => {
                    act.redis_conn = None;
                    act.metrics.sync_failures_total.with_label_values(&["redis"]).inc();
                    act.metrics.sync_up.with_label_values(&["redis"]).set(0);
                    if act.redis_link.failed(now) {
                        log::warn!(
                            event = "sync_failed", target = "redis";
                            "Redis sync failed; serving from memory and retrying with backoff: {problem}"
                        );
                    }
                    false
                }
            }
        }))
    }

    /// Writes the pending states, usage counters and the heartbeat in one transaction.
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
                settings::put(conn, settings::HEARTBEAT, &now.to_string())
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
        let lag = |link: &Link| (now - link.last_ok).max(0) as f64 / 1000.0;
        self.metrics
            .sync_lag_seconds
            .with_label_values(&["database"])
            .set(lag(&self.database_link));
        if self.redis.is_some() {
            self.metrics
                .sync_lag_seconds
                .with_label_values(&["redis"])
                .set(lag(&self.redis_link));
        }
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
        if self.redis.is_some() {
            self.metrics
                .sync_failures_total
                .with_label_values(&["redis"]);
        }
        self.schedule(ctx);
    }
}

impl Handler<Flush> for Syncer {
    type Result = AtomicResponse<Self, Result<FlushReport, String>>;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.sync(true))
    }
}
