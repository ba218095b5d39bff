//! `StatusBoard`: gathers a [`Snapshot`] from a running runtime and its store.
//!
//! - The live part (pools, quotas, windows) is asked of the actors on every snapshot: one message
//!   per pool and one per account, no database.
//! - The request-log part (per-minute history, rates, last errors) is one read of the last hour,
//!   cached for [`ACTIVITY_TTL`] and shared by every viewer, so a page open in many browsers, the
//!   CLI and Prometheus scrapes cost one read every few seconds, however often they ask.
//! - Why an account cooled down comes from the runtime's events (the account keeps only until
//!   when), remembered here per account.
//! - Each snapshot also sets the forecast metrics (`quotagate_quota_exhausts_in_seconds`, the
//!   pool's, and `quotagate_account_info` to name the ids in dashboards).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::DateTime;
use chrono::Utc;
use futures_util::future::join_all;
use prometheus::{GaugeVec, IntGaugeVec, Opts};

use super::compose::{self, PoolInput, Problem};
use super::Snapshot;
use crate::actors::events::EventSink;
use crate::actors::pool::PoolStatus;
use crate::actors::system::QueryError;
use crate::actors::QuotaSystem;
use crate::domain::account::AccountEvent;
use crate::domain::time::{to_datetime, Millis};
use crate::store::activity::{self, Activity};
use crate::store::{Store, StoreError};

/// How long one read of the request log serves every snapshot.
pub const ACTIVITY_TTL: Duration = Duration::from_secs(5);

/// Why a snapshot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the database read did not finish: {0}")]
    Blocking(String),
}

/// The status page's source (see the module docs). Shared by every HTTP worker.
pub struct StatusBoard {
    store: Store,
    runtime: QuotaSystem,
    cached: Mutex<Option<(Instant, Arc<Activity>)>>,
    /// One database read at a time: viewers that ask while it runs wait for its result.
    reading: tokio::sync::Mutex<()>,
    problems: Arc<Mutex<HashMap<String, Problem>>>,
    gauges: Gauges,
    /// When the metrics were last set, for [`StatusBoard::refresh_metrics`].
    metrics_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

impl StatusBoard {
    /// A board over `runtime` and `store`; it subscribes to the runtime's events and registers
    /// its metrics in the runtime's registry.
    pub fn new(store: Store, runtime: QuotaSystem) -> StatusBoard {
        let problems: Arc<Mutex<HashMap<String, Problem>>> = Arc::default();
        watch(runtime.events(), problems.clone());
        let gauges = Gauges::new();
        gauges.register(runtime.events());
        StatusBoard {
            store,
            runtime,
            cached: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
            problems,
            gauges,
            metrics_at: Mutex::new(None),
        }
    }

    fn now(&self) -> Millis {
        self.runtime.clock().now_ms()
    }

    /// The recent request log, at most [`ACTIVITY_TTL`] old.
    pub async fn activity(&self) -> Result<Arc<Activity>, BoardError> {
        let fresh = |cached: &Mutex<Option<(Instant, Arc<Activity>)>>| {
            let guard = cached.lock().unwrap_or_else(|e| e.into_inner());
            guard
                .as_ref()
                .filter(|(at, _)| at.elapsed() < ACTIVITY_TTL)
                .map(|(_, a)| a.clone())
        };
        if let Some(a) = fresh(&self.cached) {
            return Ok(a);
        }
        let _reading = self.reading.lock().await;
        // Another viewer may have read it while this one waited.
        if let Some(a) = fresh(&self.cached) {
            return Ok(a);
        }
        let store = self.store.clone();
        let now = to_datetime(self.now()).naive_utc();
        let activity = tokio::task::spawn_blocking(move || {
            activity::recent(
                &mut *store.conn()?,
                now,
                super::HISTORY_MINUTES as i64,
                chrono::Duration::minutes(super::RATE_SPAN_MINUTES),
            )
        })
        .await
        .map_err(|e| BoardError::Blocking(e.to_string()))??;
        let activity = Arc::new(activity);
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), activity.clone()));
        Ok(activity)
    }

    /// Every pool and account, now.
    pub async fn snapshot(&self) -> Result<Snapshot, BoardError> {
        let registry = self.runtime.registry();
        let pools = join_all(registry.providers().iter().map(|p| {
            let id = p.spec.id.to_string();
            let active = p.spec.active;
            async move {
                let status = self.runtime.pool_status(&id).await?;
                let windows = join_all(status.accounts_status.iter().map(|m| async move {
                    // An account removed meanwhile just shows no windows.
                    let windows = self
                        .runtime
                        .rate_stats(&m.account_id)
                        .await
                        .unwrap_or_default();
                    (m.account_id.clone(), windows)
                }))
                .await
                .into_iter()
                .collect();
                Ok::<_, QueryError>(PoolInput {
                    status,
                    active,
                    windows,
                })
            }
        }))
        .await;
        let pools: Vec<PoolInput> = pools
            .into_iter()
            // A provider removed between the registry read and its pool's answer.
            .filter(|p| !matches!(p, Err(QueryError::Lookup(_))))
            .collect::<Result<_, _>>()?;
        let activity = self.activity().await?;
        let problems = self
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let snapshot = compose::compose(pools, &activity, &problems, self.now());
        self.gauges.set(&snapshot);
        *self.metrics_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(snapshot)
    }

    /// Sets the forecast metrics unless a snapshot did within `max_age` (for `/metrics`, so a
    /// scrape sees a forecast without anyone watching the page).
    pub async fn refresh_metrics(&self, max_age: Duration) {
        let recent = self
            .metrics_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < max_age);
        if !recent {
            if let Err(e) = self.snapshot().await {
                log::warn!("forecast metrics not refreshed: {e}");
            }
        }
    }

    /// When each member's quota runs out at its current rate (`None`: not before its reset),
    /// by account id (`GET /api/v1/stats/pool/{id}`).
    pub async fn quota_forecasts(
        &self,
        pool: &PoolStatus,
    ) -> Result<HashMap<String, Option<DateTime<Utc>>>, BoardError> {
        let activity = self.activity().await?;
        let rates = compose::rates(&activity);
        let now = self.now();
        Ok(pool
            .accounts_status
            .iter()
            .map(|m| {
                let rate = rates.of(&m.account_id);
                let at = compose::quota_exhausts_at(m, rate, now).map(to_datetime);
                (m.account_id.clone(), at)
            })
            .collect())
    }
}

/// Remembers each account's last upstream trouble from the runtime's events.
fn watch(events: &EventSink, problems: Arc<Mutex<HashMap<String, Problem>>>) {
    events.subscribe(move |event| {
        let (cooldown_why, message) = match &event.kind {
            AccountEvent::Cooldown { reason, .. } => {
                let why = match *reason {
                    "upstream_429" => "the upstream answered 429 (rate limited)".to_string(),
                    "upstream_failures" => "upstream failures opened the circuit".to_string(),
                    other => other.replace('_', " "),
                };
                (Some(why.clone()), why)
            }
            AccountEvent::Disabled { reason } => (None, format!("disabled: {reason}")),
            _ => return,
        };
        problems.lock().unwrap_or_else(|e| e.into_inner()).insert(
            event.account.account_id.to_string(),
            Problem {
                at: event.at,
                cooldown_why,
                message,
            },
        );
    });
}

/// The forecast metrics, and the names behind the ids.
struct Gauges {
    account: GaugeVec,
    pool: GaugeVec,
    info: IntGaugeVec,
    /// The label sets set last time, to remove those that no longer apply.
    set: Mutex<HashSet<Vec<String>>>,
}

impl Gauges {
    fn new() -> Gauges {
        Gauges {
            account: GaugeVec::new(
                Opts::new(
                    "quotagate_quota_exhausts_in_seconds",
                    "Seconds until the account's quota runs out at the current rate (absent: not before its reset)",
                ),
                &["account_id", "provider_id"],
            )
            .expect("valid metric"),
            pool: GaugeVec::new(
                Opts::new(
                    "quotagate_pool_quota_exhausts_in_seconds",
                    "Seconds until every account of the pool has run out of quota at the current rate (absent: not before a reset)",
                ),
                &["provider_id"],
            )
            .expect("valid metric"),
            info: IntGaugeVec::new(
                Opts::new(
                    "quotagate_account_info",
                    "Always 1: the names of an account and its provider, to join on account_id",
                ),
                &["account_id", "account", "provider_id", "provider"],
            )
            .expect("valid metric"),
            set: Mutex::default(),
        }
    }

    fn register(&self, events: &EventSink) {
        let metrics = events.metrics();
        metrics.register(Box::new(self.account.clone()));
        metrics.register(Box::new(self.pool.clone()));
        metrics.register(Box::new(self.info.clone()));
    }

    fn set(&self, snapshot: &Snapshot) {
        let now = snapshot.generated_at;
        let seconds = |at: DateTime<Utc>| (at - now).num_milliseconds().max(0) as f64 / 1000.0;
        let mut next: HashSet<Vec<String>> = HashSet::new();
        for p in &snapshot.providers {
            if let Some(at) = p.forecast.quota_exhausts_at {
                self.pool
                    .with_label_values(&[&p.provider_id])
                    .set(seconds(at));
                next.insert(vec![p.provider_id.clone()]);
            }
            for a in &p.accounts {
                if let Some(at) = a.quota.exhausts_at {
                    self.account
                        .with_label_values(&[&a.account_id, &p.provider_id])
                        .set(seconds(at));
                    next.insert(vec![a.account_id.clone(), p.provider_id.clone()]);
                }
                let names = [&a.account_id, &a.account, &p.provider_id, &p.provider];
                self.info.with_label_values(&names).set(1);
                next.insert(names.iter().map(|s| s.to_string()).collect());
            }
        }
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        for stale in set.difference(&next) {
            let labels: Vec<&str> = stale.iter().map(String::as_str).collect();
            // The vector the label set belongs to follows from its length.
            let _ = match labels.len() {
                1 => self.pool.remove_label_values(&labels),
                2 => self.account.remove_label_values(&labels),
                _ => self.info.remove_label_values(&labels),
            };
        }
        *set = next;
    }
}
