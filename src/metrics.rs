//! Prometheus metrics, registered once in one registry that `/metrics` renders.
//!
//! Names follow the seed where it had them (`quota_usage_percent`, `rate_limit_hits_total`).

use std::sync::Arc;
use std::time::Duration;

use crate::batch::PerThread;
use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of the process. Cloning is cheap (the collectors are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Quota use per account, 0–100 (the seed's gauge).
    pub quota_usage_percent: GaugeVec,
    /// Account refusals by the limit that held them (the seed's counter).
    pub rate_limit_hits_total: IntCounterVec,
    /// Runtime events by name (`quota_warning`, `cooldown`, …).
    pub events_total: IntCounterVec,
    /// Reservations granted and not yet settled, per provider.
    pub reservations_in_flight: IntGaugeVec,
    /// Accounts that could take a request now, per provider.
    pub available_accounts: IntGaugeVec,
    /// Actor messages that panicked (the actor kept its state from before the message).
    pub actor_panics_total: IntCounter,
    /// Webhook notifications dropped because the notifier's queue was full.
    pub notifications_dropped_total: IntCounter,
    /// Webhook notifications that failed after every retry.
    pub notifications_failed_total: IntCounter,
    /// Accounts loaded in the runtime.
    pub accounts_loaded: IntGauge,
    /// Failed sync rounds per copy (`redis`, `database`).
    pub sync_failures_total: IntCounterVec,
    /// Seconds since each copy was last written successfully.
    pub sync_lag_seconds: GaugeVec,
    /// 1 while the last write to the copy succeeded.
    pub sync_up: IntGaugeVec,
    /// The request tracker and the scheduled jobs.
    pub tracking: TrackingMetrics,
    /// The shared ledgers in Redis (several instances).
    pub ledger: LedgerMetrics,
    /// Client requests by provider (`-` when refused before one was chosen) and status.
    pub requests_total: IntCounterVec,
    /// Client request latency by provider and status, seconds.
    pub request_duration_seconds: HistogramVec,
    /// Log lines dropped because the log output could not keep up.
    pub log_lines_dropped_total: IntCounter,
    /// Finished client requests, gathered per worker thread (see [`Metrics::request_done`]).
    requests: PerThread<RequestSample>,
}

/// One finished client request, for `requests_total` and `request_duration_seconds`.
#[derive(Debug)]
struct RequestSample {
    provider: Arc<str>,
    status: u16,
    seconds: f64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "quotagate_requests_total",
                "Client requests by provider and status",
            ),
            &["provider", "status"],
        )
        .expect("valid metric");
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "quotagate_request_duration_seconds",
                "Client request latency by provider and status",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            &["provider", "status"],
        )
        .expect("valid metric");
        let m = Metrics {
            quota_usage_percent: GaugeVec::new(
                Opts::new("quota_usage_percent", "Current quota usage percentage"),
                &["account_id", "provider_id"],
            )
            .expect("valid metric"),
            rate_limit_hits_total: IntCounterVec::new(
                Opts::new("rate_limit_hits_total", "Total number of rate limit hits"),
                &["provider_id", "limit_type"],
            )
            .expect("valid metric"),
            events_total: IntCounterVec::new(
                Opts::new("quotagate_events_total", "Runtime events by kind"),
                &["event"],
            )
            .expect("valid metric"),
            reservations_in_flight: IntGaugeVec::new(
                Opts::new(
                    "quotagate_reservations_in_flight",
                    "Reservations granted and not yet settled",
                ),
                &["provider_id"],
            )
            .expect("valid metric"),
            available_accounts: IntGaugeVec::new(
                Opts::new(
                    "quotagate_available_accounts",
                    "Accounts of a pool that could take a request now",
                ),
                &["provider_id"],
            )
            .expect("valid metric"),
            actor_panics_total: IntCounter::new(
                "quotagate_actor_panics_total",
                "Actor messages that panicked (state kept from before the message)",
            )
            .expect("valid metric"),
            notifications_dropped_total: IntCounter::new(
                "quotagate_notifications_dropped_total",
                "Webhook notifications dropped because the queue was full",
            )
            .expect("valid metric"),
            notifications_failed_total: IntCounter::new(
                "quotagate_notifications_failed_total",
                "Webhook notifications that failed after every retry",
            )
            .expect("valid metric"),
            accounts_loaded: IntGauge::new("quotagate_accounts_loaded", "Accounts in the runtime")
                .expect("valid metric"),
            sync_failures_total: IntCounterVec::new(
                Opts::new(
                    "quotagate_sync_failures_total",
                    "Failed sync rounds per copy",
                ),
                &["target"],
            )
            .expect("valid metric"),
            sync_lag_seconds: GaugeVec::new(
                Opts::new(
                    "quotagate_sync_lag_seconds",
                    "Seconds since each copy was last written",
                ),
                &["target"],
            )
            .expect("valid metric"),
            sync_up: IntGaugeVec::new(
                Opts::new(
                    "quotagate_sync_up",
                    "1 while the last write to the copy succeeded",
                ),
                &["target"],
            )
            .expect("valid metric"),
            tracking: TrackingMetrics::new(),
            ledger: LedgerMetrics::new(),
            requests_total: requests_total.clone(),
            request_duration_seconds: request_duration_seconds.clone(),
            log_lines_dropped_total: IntCounter::new(
                "quotagate_log_lines_dropped_total",
                "Log lines dropped because the log output could not keep up",
            )
            .expect("valid metric"),
            requests: PerThread::new(REQUESTS_BATCH, REQUESTS_EVERY, move |samples| {
                record_requests(&requests_total, &request_duration_seconds, samples)
            }),
            registry,
        };
        for collector in [
            Box::new(m.quota_usage_percent.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.rate_limit_hits_total.clone()),
            Box::new(m.events_total.clone()),
            Box::new(m.reservations_in_flight.clone()),
            Box::new(m.available_accounts.clone()),
            Box::new(m.actor_panics_total.clone()),
            Box::new(m.notifications_dropped_total.clone()),
            Box::new(m.notifications_failed_total.clone()),
            Box::new(m.accounts_loaded.clone()),
            Box::new(m.sync_failures_total.clone()),
            Box::new(m.sync_lag_seconds.clone()),
            Box::new(m.sync_up.clone()),
            Box::new(m.requests_total.clone()),
            Box::new(m.request_duration_seconds.clone()),
            Box::new(m.log_lines_dropped_total.clone()),
        ] {
            m.registry
                .register(collector)
                .expect("metric names are unique");
        }
        for collector in m
            .tracking
            .collectors()
            .into_iter()
            .chain(m.ledger.collectors())
        {
            m.registry
                .register(collector)
                .expect("metric names are unique");
        }
        m
    }

    /// Registers another collector (e.g. the HTTP layer's).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(collector) {
            log::warn!("metric not registered: {e}");
        }
    }

    /// Counts a finished client request (`provider` is `-` when refused before one was
    /// chosen), with the thread's batch.
    pub fn request_done(&self, provider: &Arc<str>, status: u16, latency: Duration) {
        self.requests.push(RequestSample {
            provider: provider.clone(),
            status,
            seconds: latency.as_secs_f64(),
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.requests.flush_thread();
        let dropped = crate::logging::dropped_lines();
        let counted = self.log_lines_dropped_total.get();
        if dropped > counted {
            self.log_lines_dropped_total.inc_by(dropped - counted);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Requests a worker thread counts before adding them to the shared metrics, and how long at most.
const REQUESTS_BATCH: usize = 512;
const REQUESTS_EVERY: Duration = Duration::from_millis(100);

/// Adds one thread's batch of requests: one label lookup per provider and status, the latencies
/// observed locally and added at once.
fn record_requests(
    total: &IntCounterVec,
    duration: &HistogramVec,
    mut samples: Vec<RequestSample>,
) {
    samples.sort_by(|a, b| (&*a.provider, a.status).cmp(&(&*b.provider, b.status)));
    for group in samples.chunk_by(|a, b| a.provider == b.provider && a.status == b.status) {
        let labels = [&*group[0].provider, &*group[0].status.to_string()];
        total.with_label_values(&labels).inc_by(group.len() as u64);
        let histogram = duration.with_label_values(&labels).local();
        for sample in group {
            histogram.observe(sample.seconds);
        }
        histogram.flush();
    }
}

/// Metrics of the request tracker and the scheduled jobs (`actors::tracker`, `jobs`).
#[derive(Clone)]
pub struct TrackingMetrics {
    /// Rows (request logs and audit rows) received and not yet written.
    pub tracker_queue_depth: IntGauge,
    /// Rows dropped because the tracker's buffer or mailbox was full.
    pub tracker_dropped_total: IntCounter,
    /// Rows the database refused one by one after their batch failed (they cannot be written).
    pub tracker_rejected_total: IntCounter,
    /// Batch writes that failed (the rows are kept and retried).
    pub tracker_write_failures_total: IntCounter,
    /// Rows written.
    pub tracker_rows_written_total: IntCounter,
    /// Scheduled job runs by `job` (`cleanup`, `aggregate`) and `outcome` (`ok`, `failed`).
    pub job_runs_total: IntCounterVec,
}

impl TrackingMetrics {
    fn new() -> TrackingMetrics {
        TrackingMetrics {
            tracker_queue_depth: IntGauge::new(
                "quotagate_tracker_queue_depth",
                "Request log and audit rows received by the tracker and not yet written",
            )
            .expect("valid metric"),
            tracker_dropped_total: IntCounter::new(
                "quotagate_tracker_dropped_total",
                "Rows dropped because the tracker's buffer was full",
            )
            .expect("valid metric"),
            tracker_rejected_total: IntCounter::new(
                "quotagate_tracker_rejected_total",
                "Rows the database refused (written one by one after their batch failed)",
            )
            .expect("valid metric"),
            tracker_write_failures_total: IntCounter::new(
                "quotagate_tracker_write_failures_total",
                "Tracker batch writes that failed (rows kept and retried)",
            )
            .expect("valid metric"),
            tracker_rows_written_total: IntCounter::new(
                "quotagate_tracker_rows_written_total",
                "Rows written by the tracker",
            )
            .expect("valid metric"),
            job_runs_total: IntCounterVec::new(
                Opts::new("quotagate_job_runs_total", "Scheduled job runs"),
                &["job", "outcome"],
            )
            .expect("valid metric"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.tracker_queue_depth.clone()),
            Box::new(self.tracker_dropped_total.clone()),
            Box::new(self.tracker_rejected_total.clone()),
            Box::new(self.tracker_write_failures_total.clone()),
            Box::new(self.tracker_rows_written_total.clone()),
            Box::new(self.job_runs_total.clone()),
        ]
    }
}

/// Metrics of the shared ledgers in Redis (`ledger`): whether the instance reaches them, how
/// many instances share them, and what keeping them in step costs.
#[derive(Clone)]
pub struct LedgerMetrics {
    /// 1 while Redis answers; 0 while the instance keeps to its safe share (degraded).
    pub up: IntGauge,
    /// Live instances, as the heartbeats in Redis last said.
    pub instances: IntGauge,
    /// Accounts this instance serves from a safe share because their ledger is out of reach.
    pub degraded_accounts: IntGauge,
    /// Ledger writes (one per account operation that changed it).
    pub writes_total: IntCounter,
    /// Writes refused because another instance wrote first (retried on the newer ledger).
    pub conflicts_total: IntCounter,
}

impl LedgerMetrics {
    fn new() -> LedgerMetrics {
        LedgerMetrics {
            up: IntGauge::new(
                "quotagate_ledger_up",
                "1 while the shared ledgers in Redis answer; 0 while serving from a safe share",
            )
            .expect("valid metric"),
            instances: IntGauge::new(
                "quotagate_ledger_instances",
                "Live instances sharing the ledgers, by their heartbeats",
            )
            .expect("valid metric"),
            degraded_accounts: IntGauge::new(
                "quotagate_ledger_degraded_accounts",
                "Accounts served from a safe share because their ledger is out of reach",
            )
            .expect("valid metric"),
            writes_total: IntCounter::new(
                "quotagate_ledger_writes_total",
                "Writes to the shared ledgers",
            )
            .expect("valid metric"),
            conflicts_total: IntCounter::new(
                "quotagate_ledger_conflicts_total",
                "Ledger writes retried because another instance wrote first",
            )
            .expect("valid metric"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.up.clone()),
            Box::new(self.instances.clone()),
            Box::new(self.degraded_accounts.clone()),
            Box::new(self.writes_total.clone()),
            Box::new(self.conflicts_total.clone()),
        ]
    }
}
