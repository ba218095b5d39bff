//! Runtime events and their subscribers: structured log lines (`event=…`), metrics, Rust
//! callbacks (the seed's `SetWarningCallback` / `SetExhaustedCallback`) and the webhook notifier.
//!
//! Emitting never blocks an account: callbacks must be quick, and the notifier is fed with
//! `try_send` into a bounded mailbox; what does not fit is counted and dropped.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use crate::backoff::Backoff;
use crate::domain::account::AccountEvent;
use crate::domain::time::{to_datetime, Millis};
use crate::metrics::Metrics;

/// Which account an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountRef {
    pub account_id: Arc<str>,
    pub account: Arc<str>,
    pub provider_id: Arc<str>,
    pub provider: Arc<str>,
}

/// An event with its account and time.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub account: AccountRef,
    pub at: Millis,
    pub kind: AccountEvent,
}

impl Event {
    /// The stable name used in logs, metrics and webhooks.
    pub fn name(&self) -> &'static str {
        match self.kind {
            AccountEvent::QuotaWarning { .. } => "quota_warning",
            AccountEvent::QuotaExhausted { .. } => "quota_exhausted",
            AccountEvent::QuotaReset { .. } => "quota_reset",
            AccountEvent::Cooldown { .. } => "cooldown",
            AccountEvent::Disabled { .. } => "account_disabled",
            AccountEvent::Expired => "account_expired",
        }
    }

    /// The webhook body.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "event": self.name(),
            "at": to_datetime(self.at).to_rfc3339(),
            "account_id": &*self.account.account_id,
            "account": &*self.account.account,
            "provider_id": &*self.account.provider_id,
            "provider": &*self.account.provider,
        });
        let extra = match &self.kind {
            AccountEvent::QuotaWarning {
                used,
                limit,
                fraction,
            } => {
                serde_json::json!({"used": used, "limit": limit, "usage_percent": fraction * 100.0})
            }
            AccountEvent::QuotaExhausted { used, limit } => {
                serde_json::json!({"used": used, "limit": limit})
            }
            AccountEvent::QuotaReset { previous_used } => {
                serde_json::json!({"previous_used": previous_used})
            }
            AccountEvent::Cooldown { until, reason } => {
                serde_json::json!({"until": to_datetime(*until).to_rfc3339(), "reason": reason})
            }
            AccountEvent::Disabled { reason } => serde_json::json!({"reason": reason}),
            AccountEvent::Expired => serde_json::json!({}),
        };
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    }
}

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// Fans events out to every subscriber. Cloned into every actor.
#[derive(Clone)]
pub struct EventSink {
    callbacks: Arc<RwLock<Vec<Callback>>>,
    metrics: Metrics,
    notifier: Option<Recipient<Notify>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("webhook", &self.notifier.is_some())
            .finish()
    }
}

impl EventSink {
    pub fn new(metrics: Metrics, notifier: Option<Recipient<Notify>>) -> EventSink {
        EventSink {
            callbacks: Arc::new(RwLock::new(Vec::new())),
            metrics,
            notifier,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Calls `f` for every event from now on. Keep `f` quick: it runs on an account's thread.
    pub fn subscribe(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.callbacks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    pub fn emit(&self, event: Event) {
        let name = event.name();
        let account_id = &*event.account.account_id;
        let provider = &*event.account.provider;
        match &event.kind {
            AccountEvent::QuotaWarning { fraction, .. } => log::warn!(
                event = name, account_id = account_id, provider = provider, usage_percent = fraction * 100.0;
                "quota warning threshold reached"
            ),
            AccountEvent::QuotaExhausted { used, limit } => log::error!(
                event = name, account_id = account_id, provider = provider, used = used, limit = limit;
                "quota exhausted"
            ),
            AccountEvent::QuotaReset { previous_used } => log::info!(
                event = name, account_id = account_id, provider = provider, previous_used = previous_used;
                "quota reset"
            ),
            AccountEvent::Cooldown { until, reason } => log::warn!(
                event = name, account_id = account_id, provider = provider, reason = reason,
                until:% = to_datetime(*until).to_rfc3339();
                "account cooling down"
            ),
            AccountEvent::Disabled { reason } => log::error!(
                event = name, account_id = account_id, provider = provider, reason = reason.as_str();
                "account disabled"
            ),
            AccountEvent::Expired => log::warn!(
                event = name, account_id = account_id, provider = provider;
                "account expired"
            ),
        }
        self.metrics.events_total.with_label_values(&[name]).inc();
        let callbacks = self
            .callbacks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for callback in callbacks {
            callback(&event);
        }
        if let Some(notifier) = &self.notifier {
            if notifier.try_send(Notify(event)).is_err() {
                self.metrics.notifications_dropped_total.inc();
            }
        }
    }
}

/// One event for the webhook.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Notify(pub Event);

/// POSTs events as JSON to `notifications.webhook_url`, retrying with backoff; its mailbox is
/// bounded so a slow or dead webhook never grows memory.
pub struct Notifier {
    url: String,
    client: awc::Client,
    metrics: Metrics,
    retries: u32,
    first_backoff: Duration,
}

/// Events that may wait for the webhook.
pub const NOTIFIER_QUEUE: usize = 1024;

impl Notifier {
    pub fn new(url: String, metrics: Metrics) -> Notifier {
        Notifier {
            url,
            client: awc::Client::builder()
                .timeout(Duration::from_secs(10))
                .finish(),
            metrics,
            retries: 5,
            first_backoff: Duration::from_millis(200),
        }
    }

    /// Starts the notifier on the current arbiter.
    pub fn start_bounded(self) -> Addr<Notifier> {
        Notifier::create(|ctx| {
            ctx.set_mailbox_capacity(NOTIFIER_QUEUE);
            self
        })
    }
}

impl Actor for Notifier {
    type Context = Context<Self>;
}

impl Handler<Notify> for Notifier {
    /// Atomic: the next event waits until this one is delivered or given up, so the bounded
    /// mailbox really is the queue.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Notify, _ctx: &mut Context<Self>) -> Self::Result {
        let client = self.client.clone();
        let url = self.url.clone();
        let body = msg.0.to_json();
        let (retries, first_backoff) = (self.retries, self.first_backoff);
        let metrics = self.metrics.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut backoff = Backoff::new(first_backoff, Duration::from_secs(30));
                for attempt in 0..=retries {
                    match client.post(&url).send_json(&body).await {
                        Ok(resp) if resp.status().is_success() => return,
                        Ok(resp) => log::warn!(
                            event = "webhook_failed", status = resp.status().as_u16(), attempt = attempt;
                            "webhook answered with an error"
                        ),
                        Err(e) => log::warn!(
                            event = "webhook_failed", attempt = attempt, error:% = e;
                            "webhook not reachable"
                        ),
                    }
                    if attempt < retries {
                        actix_rt::time::sleep(backoff.next_delay()).await;
                    }
                }
                metrics.notifications_failed_total.inc();
            }
            .into_actor(self),
        ))
    }
}
