//! The plain types an account is built from and answers with: its spec, a grant and a denial,
//! what a request used, what the upstream said, the events it emits, and its status views.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::limits::{LimitKind, LimitSpec, NamedLimit};
use crate::domain::quota::QuotaEvent;
use crate::domain::schedule::Schedule;
use crate::domain::time::Millis;

/// An account's effective limits: `None` model = every model. Shared between accounts that have
/// the same limits.
pub type Limits = Arc<[(Option<Arc<str>>, LimitSpec)]>;

/// Everything needed to build an account's state.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountSpec {
    pub id: Arc<str>,
    pub active: bool,
    pub disabled_reason: Option<String>,
    pub expires_at: Option<Millis>,
    /// Tokens per quota period; 0 = unlimited.
    pub quota_limit: u64,
    /// Usage already recorded this period (from the store).
    pub quota_used: u64,
    pub quota_schedule: Schedule,
    pub warning_threshold: f64,
    /// Effective limits (the account's overrides applied): `None` model = every model. Shared:
    /// accounts with the same limits hold one copy.
    pub limits: Limits,
    /// Which windows the upstream's `x-ratelimit-*` headers describe.
    pub header_requests: Option<NamedLimit>,
    pub header_tokens: Option<NamedLimit>,
}

/// A reservation granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub reservation: u64,
    pub deadline: Millis,
    /// Smallest remainder over the request windows after this reservation (`None`: no window).
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// Why an account refuses a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Disabled by an operator, by the config, or after an upstream 401.
    Disabled {
        reason: Option<String>,
    },
    Expired,
    /// The request needs more than a limit allows at all: it can never pass here.
    Impossible {
        limit: Arc<str>,
        limit_value: u64,
        need: u64,
    },
    QuotaExceeded {
        reset_at: Millis,
    },
    /// Held by a rate limit, a cooldown or the circuit breaker until `retry_at`. `lower_bound`:
    /// the time is not exact because in-flight work decides it (a request in flight may hold
    /// its units longer, or leased units may come back unused sooner).
    RateLimited {
        limit: Arc<str>,
        retry_at: Millis,
        lower_bound: bool,
    },
}

/// What a settled request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The upstream reported this many tokens (prompt + completion).
    Reported(u64),
    /// The upstream answered with an error: its request slot counts, no tokens.
    RequestOnly,
    /// The outcome is unknown (timeout, broken connection, expiry, shutdown): the estimate.
    Estimate,
}

/// How the upstream answered, for health and cooldown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Success,
    /// 429: cool down for `retry_after_ms` (or a default), already capped at
    /// `upstream.max_cooldown` by whoever read it; `capped` when the upstream asked for more.
    RateLimited {
        retry_after_ms: Option<Millis>,
        capped: bool,
    },
    /// 401: the key is not accepted; the account is disabled.
    Unauthorized,
    /// 403 (a model not enabled for this key, a region, a policy): the account stays away from
    /// `model` for `cooldown_ms` (`upstream.forbidden_cooldown`), and keeps serving other models.
    Forbidden {
        model: Arc<str>,
        cooldown_ms: Millis,
    },
    /// 5xx, connection error, timeout.
    Failure,
}

/// The upstream's `x-ratelimit-*` headers, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests_remaining: Option<u64>,
    pub requests_reset_ms: Option<Millis>,
    pub tokens_remaining: Option<u64>,
    pub tokens_reset_ms: Option<Millis>,
}

/// Feedback from one upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub outcome: UpstreamOutcome,
    pub latency_ms: u64,
    pub headers: RateHeaders,
}

/// Something worth telling subscribers.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountEvent {
    QuotaWarning {
        used: u64,
        limit: u64,
        fraction: f64,
    },
    QuotaExhausted {
        used: u64,
        limit: u64,
    },
    QuotaReset {
        previous_used: u64,
    },
    Cooldown {
        until: Millis,
        reason: &'static str,
    },
    Disabled {
        reason: String,
    },
    Expired,
}

impl From<QuotaEvent> for AccountEvent {
    fn from(e: QuotaEvent) -> Self {
        match e {
            QuotaEvent::Warning {
                used,
                limit,
                fraction,
            } => AccountEvent::QuotaWarning {
                used,
                limit,
                fraction,
            },
            QuotaEvent::Exhausted { used, limit } => AccountEvent::QuotaExhausted { used, limit },
            QuotaEvent::Reset { previous_used } => AccountEvent::QuotaReset { previous_used },
        }
    }
}

/// The circuit breaker: closed (normal), open until a time, or half-open (one probe at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Circuit {
    Closed,
    Open { until: Millis, backoff: Millis },
    HalfOpen { probing: bool, backoff: Millis },
}

/// The seed's `QuotaStatus`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaStatus {
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub current_usage: u64,
    pub limit: u64,
    pub usage_percent: f64,
    pub reset_at: Millis,
    /// Reservations not yet settled (the status page's "in flight").
    pub in_flight: u64,
    /// While an upstream's "wait" holds the account: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_until: Option<Millis>,
    /// While the circuit breaker is open: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_open_until: Option<Millis>,
}

/// The seed's per-limit `GetStats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowStats {
    pub limit_type: String,
    pub limit: u64,
    pub current: u64,
    pub in_flight: u64,
    pub window_start: Millis,
    /// Seconds until one more request (of one unit) could pass; 0 when it can now.
    pub retry_after: f64,
    /// What the window counts (`requests`, `tokens`, `concurrent`), for forecasts.
    pub kind: LimitKind,
    /// The window's length in ms (0 for `concurrent`).
    pub period_ms: Millis,
    /// When a fixed window's period ends; `None` for a sliding window.
    pub resets_at: Option<Millis>,
}

/// What the pool needs to order its candidates, refreshed with every reply.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub available: bool,
    pub quota_fraction: f64,
    /// Smallest remaining fraction over the account-wide windows (1 = empty).
    pub headroom: f64,
    pub error_rate: f64,
    pub latency_ms: f64,
    pub inflight: u64,
}
