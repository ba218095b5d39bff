//! `Tracker`: the batched writer of request logs (the seed's `TrackRequest`) and of account audit
//! rows. It owns the rows received and not yet written, at most `tracking.buffer` of them.
//!
//! Nothing that tracks ever waits: [`TrackerHandle::track`] gathers rows per HTTP worker thread
//! and hands them over in batches ([`crate::batch`]), [`TrackerHandle::audit`] sends each row; both
//! use `try_send` into a bounded mailbox, and the actor only queues the rows. Rows go to the database
//! in batches of up to `tracking.batch_size` (as soon as a batch is full, else every
//! `tracking.flush_interval`), one write at a time, on tokio's blocking threads; each batch is
//! one transaction that also adds its sums to the daily rollups (`store::stats::record_batch`).
//!
//! When the database is down or slow, the batch is kept and retried with backoff while new rows
//! wait in the buffer; beyond `tracking.buffer` (or a full mailbox) rows are dropped and counted
//! (`quotagate_tracker_dropped_total`), so a slow database never grows memory without bound. Log
//! lines mark transitions only: writes failing / recovered, dropping started / stopped.
//!
//! A batch the database refuses while it answers (a bad value, say) is written row by row so
//! that only the refused rows are lost (`quotagate_tracker_rejected_total`), never the stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::connection::Connection as _;
use diesel::result::Error as DieselError;
use tokio::sync::oneshot;

use super::events::{Event, EventSink};
use crate::backoff::Backoff;
use crate::batch::PerThread;
use crate::config::TrackingConfig;
use crate::domain::account::AccountEvent;
use crate::domain::time::to_datetime;
use crate::metrics::{Metrics, TrackingMetrics};
use crate::store::audit::{self, NewAudit};
use crate::store::logs::NewRequestLog;
use crate::store::stats::{self, RUNTIME_ACTOR};
use crate::store::{Store, StoreError};

/// The most messages that may wait in the mailbox (never more than `tracking.buffer`): the actor
/// drains it at memory speed, so it only absorbs bursts; the buffer is the real queue.
const MAX_MAILBOX: usize = 16_384;
/// Waits before retrying a failed write: from 100 ms, doubling up to 5 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Request-log rows a worker thread gathers before handing them over, and how long at most.
const ROWS_BATCH: usize = 256;
const ROWS_EVERY: Duration = Duration::from_millis(50);
/// How long a flush waits for the rows other threads still gather.
const ROWS_WAIT: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------------

/// Queues the rows one worker thread gathered.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct TrackBatch(pub Vec<NewRequestLog>);

/// Queues one audit row (written with the same batches).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Audit(pub NewAudit);

/// Answers once every row received before it is written (or, if the database refused it,
/// given up). Waits as long as the database is down: bound it with a timeout.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Flush;

// ------------------------------------------------------------------------------------------------
// Handle
// ------------------------------------------------------------------------------------------------

/// What callers hold: cheap to clone, `Send`, and never blocks.
#[derive(Clone)]
pub struct TrackerHandle {
    addr: Addr<Tracker>,
    drops: Arc<Drops>,
    metrics: TrackingMetrics,
    /// Request-log rows gathered per worker thread.
    rows: PerThread<NewRequestLog>,
}

impl std::fmt::Debug for TrackerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrackerHandle")
    }
}

impl TrackerHandle {
    /// Queues a request log row (with its thread's batch); a full mailbox drops it (counted).
    pub fn track(&self, row: NewRequestLog) {
        self.rows.push(row);
    }

    /// Queues an audit row; a full mailbox drops it (counted).
    pub fn audit(&self, row: NewAudit) {
        if self.addr.try_send(Audit(row)).is_err() {
            self.drops.record(&self.metrics);
        }
    }

    /// Resolves when everything received so far is written (see [`Flush`]); an error only when
    /// the tracker has stopped.
    pub async fn flush(&self) -> Result<(), MailboxError> {
        // Rows other worker threads still gather reach the tracker within a batch interval.
        self.rows.drain(ROWS_WAIT).await;
        self.addr.send(Flush).await
    }
}

/// Writes the runtime's account events as audit rows (actor [`RUNTIME_ACTOR`]) through
/// `tracker`: cooldowns, disabled and expired accounts, quota resets and exhausted quotas.
/// Quota warnings change nothing and are not audited.
pub fn audit_runtime_events(events: &EventSink, tracker: TrackerHandle) {
    events.subscribe(move |event| {
        if let Some(row) = audit_row(event) {
            tracker.audit(row);
        }
    });
}

fn audit_row(event: &Event) -> Option<NewAudit> {
    let (action, reason) = match &event.kind {
        AccountEvent::Cooldown { reason, .. } => ("cooldown", reason.to_string()),
        AccountEvent::Disabled { reason } => ("disable", reason.clone()),
        AccountEvent::Expired => ("expire", "expired".to_string()),
        AccountEvent::QuotaReset { .. } => ("reset", "quota reset".to_string()),
        AccountEvent::QuotaExhausted { .. } => ("quota_exhausted", "quota exhausted".to_string()),
        AccountEvent::QuotaWarning { .. } => return None,
    };
    Some(NewAudit {
        account_id: event.account.account_id.to_string(),
        ts: to_datetime(event.at).naive_utc(),
        actor: RUNTIME_ACTOR.to_string(),
        action: action.to_string(),
        reason,
        // The event as the webhook sends it: names, ids and numbers, never secrets.
        details: Some(event.to_json().to_string()),
    })
}

/// Dropped rows, counted by both the handle (full mailbox) and the actor (full buffer), so that
/// one warning marks the start of a dropping episode and one summary its end.
#[derive(Debug, Default)]
struct Drops {
    rows: AtomicU64,
    dropping: AtomicBool,
}

impl Drops {
    fn record(&self, metrics: &TrackingMetrics) {
        metrics.tracker_dropped_total.inc();
        self.rows.fetch_add(1, Ordering::AcqRel);
        if !self.dropping.swap(true, Ordering::AcqRel) {
            log::warn!(
                event = "tracker_dropping";
                "request tracker buffer full: dropping rows until the database catches up"
            );
        }
    }

    /// Ends a dropping episode (the buffer has room again) with its summary line.
    fn settle(&self) {
        if self.dropping.swap(false, Ordering::AcqRel) {
            let rows = self.rows.swap(0, Ordering::AcqRel);
            log::warn!(
                event = "tracker_dropped", rows = rows;
                "request tracker has room again after dropping {rows} rows"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Actor
// ------------------------------------------------------------------------------------------------

/// A row waiting to be written.
#[derive(Debug)]
enum Row {
    Log(NewRequestLog),
    Audit(NewAudit),
}

/// Rows written in one transaction.
#[derive(Debug, Default)]
struct Batch {
    logs: Vec<NewRequestLog>,
    audits: Vec<NewAudit>,
}

impl Batch {
    fn len(&self) -> usize {
        self.logs.len() + self.audits.len()
    }
}

/// What a write did. Rows not written yet and still worth trying come back in `retry`.
#[derive(Debug)]
struct WriteReport {
    written: usize,
    rejected: usize,
    retry: Option<(Batch, StoreError)>,
}

/// Since when writes fail, and how long to wait before the next attempt.
#[derive(Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
    backoff: Backoff,
}

/// The actor behind [`TrackerHandle`]: owns the rows not yet written (see the module docs).
pub struct Tracker {
    store: Store,
    batch_size: usize,
    flush_interval: Duration,
    buffer: usize,
    metrics: TrackingMetrics,
    drops: Arc<Drops>,
    /// Received, not yet in a write.
    pending: VecDeque<Row>,
    /// The batch whose write failed, written first at the next attempt.
    retry: Option<Batch>,
    /// Rows of the write under way or awaiting retry (counted against the buffer).
    in_flight: usize,
    writing: bool,
    /// Waiting for a retry's backoff to end.
    backing_off: bool,
    failing: Option<Failing>,
    /// Rows accepted since the start: `received - outstanding` rows are done.
    received: u64,
    /// `Flush` callers, each with the `received` count it waits for.
    waiters: Vec<(u64, oneshot::Sender<()>)>,
}

impl Tracker {
    /// Starts the tracker on the current arbiter. `settings` gives `batch_size`,
    /// `flush_interval` and `buffer` (`retention_days` belongs to the cleanup job).
    pub fn start(store: Store, settings: &TrackingConfig, metrics: &Metrics) -> TrackerHandle {
        let metrics = metrics.tracking.clone();
        let drops = Arc::new(Drops::default());
        let buffer = settings.buffer.max(1);
        let tracker = Tracker {
            store,
            batch_size: settings.batch_size.max(1),
            flush_interval: settings.flush_interval,
            buffer,
            metrics: metrics.clone(),
            drops: drops.clone(),
            pending: VecDeque::new(),
            retry: None,
            in_flight: 0,
            writing: false,
            backing_off: false,
            failing: None,
            received: 0,
            waiters: Vec::new(),
        };
        let addr = Tracker::create(|ctx| {
            ctx.set_mailbox_capacity(buffer.min(MAX_MAILBOX));
            tracker
        });
        let rows = {
            let (addr, drops, metrics) = (addr.clone(), drops.clone(), metrics.clone());
            PerThread::new(ROWS_BATCH, ROWS_EVERY, move |rows: Vec<NewRequestLog>| {
                let count = rows.len();
                if addr.try_send(TrackBatch(rows)).is_err() {
                    for _ in 0..count {
                        drops.record(&metrics);
                    }
                }
            })
        };
        TrackerHandle {
            addr,
            drops,
            metrics,
            rows,
        }
    }

    fn outstanding(&self) -> usize {
        self.pending.len() + self.in_flight
    }

    fn receive(&mut self, row: Row, ctx: &mut Context<Self>) {
        if self.outstanding() >= self.buffer {
            self.drops.record(&self.metrics);
            return;
        }
        self.pending.push_back(row);
        self.received += 1;
        self.metrics
            .tracker_queue_depth
            .set(self.outstanding() as i64);
        if self.pending.len() >= self.batch_size {
            self.write_next(ctx);
        }
    }

    /// Starts the next write unless one is under way or waiting for its backoff.
    fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.backing_off {
            return;
        }
        let batch = match self.retry.take() {
            Some(batch) => batch,
            None if self.pending.is_empty() => return,
            None => {
                let n = self.pending.len().min(self.batch_size);
                let mut batch = Batch::default();
                for row in self.pending.drain(..n) {
                    match row {
                        Row::Log(row) => batch.logs.push(row),
                        Row::Audit(row) => batch.audits.push(row),
                    }
                }
                batch
            }
        };
        self.writing = true;
        self.in_flight = batch.len();
        let store = self.store.clone();
        let write = tokio::task::spawn_blocking(move || write(&store, batch));
        ctx.spawn(write.into_actor(self).map(|joined, act, ctx| {
            let report = joined.unwrap_or_else(|e| {
                // A panic inside the write: its rows are gone; count them, keep tracking.
                log::error!(event = "tracker_rejected", error:% = e; "request log write panicked");
                WriteReport {
                    written: 0,
                    rejected: act.in_flight,
                    retry: None,
                }
            });
            act.written(report, ctx);
        }));
    }

    fn written(&mut self, report: WriteReport, ctx: &mut Context<Self>) {
        self.writing = false;
        self.in_flight = 0;
        self.metrics
            .tracker_rows_written_total
            .inc_by(report.written as u64);
        if report.rejected > 0 {
            self.metrics
                .tracker_rejected_total
                .inc_by(report.rejected as u64);
        }
        match report.retry {
            Some((batch, error)) => {
                self.in_flight = batch.len();
                self.retry = Some(batch);
                self.metrics.tracker_write_failures_total.inc();
                let failing = self.failing.get_or_insert_with(|| {
                    log::warn!(
                        event = "tracker_write_failed", error:% = error;
                        "request log writes failing; keeping the rows and retrying"
                    );
                    Failing {
                        since: Instant::now(),
                        attempts: 0,
                        backoff: BACKOFF,
                    }
                });
                failing.attempts += 1;
                let wait = failing.backoff.next_delay();
                self.backing_off = true;
                ctx.run_later(wait, |act, ctx| {
                    act.backing_off = false;
                    act.write_next(ctx);
                });
            }
            None => {
                if let Some(failing) = self.failing.take() {
                    log::info!(
                        event = "tracker_write_recovered", attempts = failing.attempts,
                        down_ms = failing.since.elapsed().as_millis() as u64;
                        "request log writes work again"
                    );
                }
            }
        }
        self.metrics
            .tracker_queue_depth
            .set(self.outstanding() as i64);
        if self.outstanding() < self.buffer {
            self.drops.settle();
        }
        self.answer_waiters(self.received - self.outstanding() as u64);
        // A full batch, or a flush waiting, does not wait for the next tick.
        if self.pending.len() >= self.batch_size || !self.waiters.is_empty() {
            self.write_next(ctx);
        }
    }

    /// Answers the `Flush` callers whose rows are all done.
    fn answer_waiters(&mut self, done: u64) {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(target, _)| *target <= done);
        self.waiters = waiting;
        for (_, tx) in ready {
            let _ = tx.send(());
        }
    }
}

impl Actor for Tracker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.flush_interval, |act, ctx| {
            act.write_next(ctx);
            if act.outstanding() < act.buffer {
                act.drops.settle();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        let rows = self.outstanding();
        if rows > 0 {
            log::warn!(
                event = "tracker_stopped", rows = rows;
                "request tracker stopped with {rows} unwritten rows (flush before stopping)"
            );
        }
    }
}

impl Handler<TrackBatch> for Tracker {
    type Result = ();

    fn handle(&mut self, msg: TrackBatch, ctx: &mut Context<Self>) {
        for row in msg.0 {
            self.receive(Row::Log(row), ctx);
        }
    }
}

impl Handler<Audit> for Tracker {
    type Result = ();

    fn handle(&mut self, msg: Audit, ctx: &mut Context<Self>) {
        self.receive(Row::Audit(msg.0), ctx);
    }
}

impl Handler<Flush> for Tracker {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Flush, ctx: &mut Context<Self>) -> Self::Result {
        if self.outstanding() == 0 {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push((self.received, tx));
        self.write_next(ctx);
        Box::pin(async move {
            // A dropped sender means the tracker stopped: nothing more will be written.
            let _ = rx.await;
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Writing (blocking, on tokio's blocking threads)
// ------------------------------------------------------------------------------------------------

/// Writes `batch` in one transaction; when the database refuses it while it answers, row by
/// row so that only the refused rows are lost.
fn write(store: &Store, batch: Batch) -> WriteReport {
    match write_batch(store, &batch.logs, &batch.audits) {
        Ok(()) => WriteReport {
            written: batch.len(),
            rejected: 0,
            retry: None,
        },
        Err(e) if worth_retrying(store, &e) => WriteReport {
            written: 0,
            rejected: 0,
            retry: Some((batch, e)),
        },
        Err(e) => write_one_by_one(store, batch, e),
    }
}

fn write_batch(
    store: &Store,
    logs: &[NewRequestLog],
    audits: &[NewAudit],
) -> Result<(), StoreError> {
    let mut conn = store.conn()?;
    conn.transaction(|conn| {
        stats::record_batch(conn, logs)?;
        audit::insert(conn, audits)
    })
}

fn write_one_by_one(store: &Store, batch: Batch, batch_error: StoreError) -> WriteReport {
    let mut report = WriteReport {
        written: 0,
        rejected: 0,
        retry: None,
    };
    let mut logs = batch.logs.into_iter();
    let mut audits = batch.audits.into_iter();
    loop {
        let (result, row) = if let Some(row) = logs.next() {
            let result = write_batch(store, std::slice::from_ref(&row), &[]);
            (result, Row::Log(row))
        } else if let Some(row) = audits.next() {
            let result = write_batch(store, &[], std::slice::from_ref(&row));
            (result, Row::Audit(row))
        } else {
            break;
        };
        match result {
            Ok(()) => report.written += 1,
            Err(e) if worth_retrying(store, &e) => {
                // The database went away meanwhile: keep this row and the rest for the retry.
                let mut rest = Batch::default();
                match row {
                    Row::Log(row) => rest.logs.push(row),
                    Row::Audit(row) => rest.audits.push(row),
                }
                rest.logs.extend(logs);
                rest.audits.extend(audits);
                report.retry = Some((rest, e));
                break;
            }
            Err(_) => report.rejected += 1,
        }
    }
    if report.rejected > 0 {
        log::error!(
            event = "tracker_rejected", rows = report.rejected, error:% = batch_error;
            "the database refused request log rows; they are dropped"
        );
    }
    report
}

/// Whether a failed write should be retried with its rows kept: a transient error, SQLite busy
/// beyond its timeout (another writer holds the lock), or any error while the database does not
/// even answer a ping (a connection lost mid-statement can surface as an unclassified error).
fn worth_retrying(store: &Store, error: &StoreError) -> bool {
    let busy = matches!(
        error,
        StoreError::Query(DieselError::DatabaseError(_, info))
            if info.message().contains("database is locked")
    );
    error.is_transient() || busy || store.ping().is_err()
}
