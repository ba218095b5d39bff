//! Scheduled jobs (the seed's cron jobs): the retention cleanup of request logs older than
//! `tracking.retention_days` (`jobs.cleanup_cron`) and the aggregation of the previous UTC day
//! into the daily rollups (`jobs.aggregate_cron`). The daily quota reset is not here: each account
//! actor resets on its own schedule.
//!
//! The job functions are plain blocking functions (tests call them directly); the [`Scheduler`]
//! runs them on tokio's blocking threads, one job at a time, so the cleanup and the aggregation
//! never compete for the same rows. Each run logs one `event=job` line with `job`, `rows` and
//! `duration_ms`.

use std::time::{Duration, Instant};

use chrono::{Days, NaiveDate, NaiveDateTime};

use crate::config::{JobsConfig, TrackingConfig};
use crate::domain::schedule::Schedule;
use crate::domain::time::{to_datetime, Millis};
use crate::metrics::Metrics;
use crate::store::retention::{self, Cleanup};
use crate::store::rollup;
use crate::store::{Store, StoreError};

/// Rows per retention `DELETE`: small enough that each statement holds its locks briefly, large
/// enough that deleting a day of a busy gateway takes few round trips.
pub const CLEANUP_BATCH: usize = 5_000;

/// The longest the scheduler sleeps before looking at the wall clock again: tokio's timers follow
/// the monotonic clock, which a suspend or a clock correction leaves behind.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Deletes the request logs (and runtime audit rows) older than `retention_days` before `now`.
pub fn run_cleanup(
    store: &Store,
    now: NaiveDateTime,
    retention_days: u32,
) -> Result<Cleanup, StoreError> {
    let started = Instant::now();
    let cutoff = now
        .checked_sub_days(Days::new(u64::from(retention_days)))
        .unwrap_or(NaiveDateTime::MIN);
    let result = store
        .conn()
        .and_then(|mut conn| retention::cleanup(&mut conn, cutoff, CLEANUP_BATCH));
    let duration_ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(deleted) => log::info!(
            event = "job", job = "cleanup", rows = deleted.total(), duration_ms = duration_ms,
            request_logs = deleted.request_logs, audit_rows = deleted.audit_rows,
            cutoff:% = cutoff.and_utc().to_rfc3339();
            "retention cleanup deleted {} rows", deleted.total()
        ),
        Err(e) => log::error!(
            event = "job", job = "cleanup", rows = 0u64, duration_ms = duration_ms, error:% = e;
            "retention cleanup failed"
        ),
    }
    result
}

/// Recomputes `day`'s rollups from the request log; returns the number of request rows.
pub fn run_aggregation(store: &Store, day: NaiveDate) -> Result<u64, StoreError> {
    let started = Instant::now();
    let result = store
        .conn()
        .and_then(|mut conn| rollup::aggregate_day(&mut conn, day));
    let duration_ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(rows) => log::info!(
            event = "job", job = "aggregate", rows = rows, duration_ms = duration_ms,
            day:% = day;
            "daily aggregation of {day} done"
        ),
        Err(e) => log::error!(
            event = "job", job = "aggregate", rows = 0u64, duration_ms = duration_ms,
            day:% = day, error:% = e;
            "daily aggregation of {day} failed"
        ),
    }
    result
}

/// Runs the jobs on their cron schedules (UTC) until dropped.
#[must_use = "the scheduler stops when dropped"]
#[derive(Debug)]
pub struct Scheduler {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // A job already on a blocking thread finishes its current statement and stops there.
        self.task.abort();
    }
}

/// Which job is due.
#[derive(Debug, Clone, Copy)]
enum Job {
    Cleanup,
    Aggregate,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Cleanup => "cleanup",
            Job::Aggregate => "aggregate",
        }
    }
}

impl Scheduler {
    /// Starts the timer task on the current runtime. Fails only on a bad cron expression
    /// (validated with the config already).
    pub fn start(
        store: Store,
        jobs: &JobsConfig,
        tracking: &TrackingConfig,
        metrics: &Metrics,
    ) -> Result<Scheduler, String> {
        let cleanup = Schedule::new(&jobs.cleanup_cron, "UTC")
            .map_err(|e| format!("jobs.cleanup_cron: {e}"))?;
        let aggregate = Schedule::new(&jobs.aggregate_cron, "UTC")
            .map_err(|e| format!("jobs.aggregate_cron: {e}"))?;
        let retention_days = tracking.retention_days;
        let metrics = metrics.clone();
        let task = tokio::spawn(async move {
            let mut next_cleanup = cleanup.next_after(wall_ms());
            let mut next_aggregate = aggregate.next_after(wall_ms());
            loop {
                let now = wall_ms();
                let (job, due) = if next_cleanup <= next_aggregate {
                    (Job::Cleanup, next_cleanup)
                } else {
                    (Job::Aggregate, next_aggregate)
                };
                if now < due {
                    let wait = Duration::from_millis(u64::try_from(due - now).unwrap_or(0));
                    tokio::time::sleep(wait.min(MAX_SLEEP)).await;
                    continue;
                }
                let store = store.clone();
                let ran = tokio::task::spawn_blocking(move || match job {
                    Job::Cleanup => {
                        run_cleanup(&store, to_datetime(now).naive_utc(), retention_days)
                            .map(|_| ())
                    }
                    // The day before the one the job fires in: with the default 01:00, yesterday.
                    Job::Aggregate => {
                        let today = to_datetime(now).date_naive();
                        let yesterday = today.checked_sub_days(Days::new(1)).unwrap_or(today);
                        run_aggregation(&store, yesterday).map(|_| ())
                    }
                })
                .await;
                let outcome = match ran {
                    Ok(Ok(())) => "ok",
                    _ => "failed",
                };
                metrics
                    .tracking
                    .job_runs_total
                    .with_label_values(&[job.name(), outcome])
                    .inc();
                // From the end of the run: an occurrence missed while it ran is skipped, not
                // run twice in a row.
                match job {
                    Job::Cleanup => next_cleanup = cleanup.next_after(wall_ms()),
                    Job::Aggregate => next_aggregate = aggregate.next_after(wall_ms()),
                }
            }
        });
        Ok(Scheduler { task })
    }
}

fn wall_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}
