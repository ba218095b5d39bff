//! Prometheus metrics, registered once in one registry that `/metrics` renders.
//!
//! Names follow the seed where it had them (`quota_usage_percent`, `rate_limit_hits_total`).

use prometheus::{
    Encoder as _, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
        ] {
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

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
