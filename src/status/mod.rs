//! The status picture of every pool: what the status page (`GET /`), `GET /api/v1/status` and
//! `quotagate status` show. One [`Snapshot`] type for all three, so the page, the JSON and the
//! terminal table never disagree.
//!
//! - [`compose`]: builds a snapshot from the actors' live state (pools, quotas, windows), the
//!   recent request log (rates, per-minute history, last errors) and the recorded cooldown
//!   reasons — pure, with the forecast of [`crate::domain::forecast`].
//! - [`board`]: gathers those inputs from a running runtime and store, caches the database part
//!   for a few seconds, remembers why accounts cooled down, and exports the forecast as metrics.
//! - [`table`]: the snapshot as a terminal table, for `quotagate status` (`crate::cli`), which
//!   reads a running gateway or, through [`offline`], the database.

pub mod board;
pub mod compose;
pub mod offline;
pub mod table;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use board::StatusBoard;

/// Minutes of per-minute history kept for each provider (the page's chart).
pub const HISTORY_MINUTES: usize = 60;
/// The span over which an account's current rate is measured for the forecast.
pub const RATE_SPAN_MINUTES: i64 = 15;

/// Every pool and account, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub generated_at: DateTime<Utc>,
    /// Rates and forecasts use the traffic of this many last minutes.
    pub rate_span_minutes: i64,
    pub providers: Vec<ProviderView>,
}

/// One provider's pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
// Named apart from the admin API's `ProviderView` in the OpenAPI document.
#[schema(as = StatusProviderView)]
pub struct ProviderView {
    pub provider_id: String,
    pub provider: String,
    /// `round_robin`, `least_used`, `random` or `best`.
    pub strategy: String,
    /// Whether the provider is routed to.
    pub active: bool,
    pub total_accounts: usize,
    pub available_accounts: usize,
    /// Requests in the last 60 seconds.
    pub requests_per_minute: u64,
    /// Failed requests in the last 60 seconds.
    pub errors_per_minute: u64,
    /// Requests per minute over the last hour, oldest first (the last entry is the last 60 s).
    pub requests_history: Vec<u64>,
    /// Failed requests per minute over the last hour, oldest first.
    pub errors_history: Vec<u64>,
    /// When the pool as a whole runs out at the current rate.
    pub forecast: PoolForecast,
    pub accounts: Vec<AccountView>,
}

/// When a pool runs out, every member's traffic moving to the members with room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PoolForecast {
    /// When the pool's quota (the sum of its members') runs out; `null` when not before the
    /// earliest reset, or when a member has no quota limit.
    pub quota_exhausts_at: Option<DateTime<Utc>>,
    /// The same for each long window (an hour or more) that every member has.
    pub windows: Vec<WindowForecast>,
}

/// When one window runs out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WindowForecast {
    pub limit_type: String,
    pub exhausts_at: Option<DateTime<Utc>>,
}

/// What an account is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// Takes requests (a rate window may still hold the next one for a moment).
    Active,
    /// An upstream said "wait" (429, `retry-after`).
    CoolingDown,
    /// Upstream failures opened the circuit breaker.
    CircuitOpen,
    /// Its quota is used up until the reset.
    QuotaExhausted,
    /// Past its `expires_at`.
    Expired,
    /// Disabled by an operator, the config, or an upstream that rejected its key.
    Disabled,
}

impl AccountState {
    /// The snake_case name (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Active => "active",
            AccountState::CoolingDown => "cooling_down",
            AccountState::CircuitOpen => "circuit_open",
            AccountState::QuotaExhausted => "quota_exhausted",
            AccountState::Expired => "expired",
            AccountState::Disabled => "disabled",
        }
    }

    /// Words for people.
    pub fn label(self) -> &'static str {
        match self {
            AccountState::Active => "active",
            AccountState::CoolingDown => "cooling down",
            AccountState::CircuitOpen => "circuit open",
            AccountState::QuotaExhausted => "quota used up",
            AccountState::Expired => "expired",
            AccountState::Disabled => "disabled",
        }
    }
}

/// One account of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
// Named apart from the admin API's `AccountView` in the OpenAPI document.
#[schema(as = StatusAccountView)]
pub struct AccountView {
    pub account_id: String,
    pub account: String,
    pub state: AccountState,
    /// Why it is not available (`disabled`'s reason, `cooldown`, …).
    pub reason: Option<String>,
    /// While cooling down: until when and why.
    pub cooldown: Option<Hold>,
    /// While the circuit breaker is open: until when.
    pub circuit_open_until: Option<DateTime<Utc>>,
    pub quota: QuotaFigures,
    pub windows: Vec<WindowFigures>,
    /// Requests reserved and not yet settled.
    pub in_flight: u64,
    /// Requests and tokens per minute over the rate span.
    pub requests_per_minute: f64,
    pub tokens_per_minute: f64,
    /// The last failed request this account served or the last upstream trouble it had, in the
    /// last hour.
    pub last_error: Option<ErrorView>,
}

/// Until when, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hold {
    pub until: DateTime<Utc>,
    pub why: String,
}

/// An account's quota.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuotaFigures {
    pub used: u64,
    /// 0 = unlimited.
    pub limit: u64,
    pub usage_percent: f64,
    pub reset_at: DateTime<Utc>,
    /// When it runs out at the current rate; `null` when not before `reset_at`.
    pub exhausts_at: Option<DateTime<Utc>>,
}

/// One rate limit of an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WindowFigures {
    /// `rpm`, `tpd`, `concurrent`, or a custom window like `requests/2s`.
    pub limit_type: String,
    pub limit: u64,
    /// Units held now (settled and in flight).
    pub current: u64,
    pub in_flight: u64,
    pub usage_percent: f64,
    /// Seconds until one more unit could pass; 0 when it can now.
    pub retry_after: f64,
    /// When a fixed window resets; `null` for a sliding one.
    pub resets_at: Option<DateTime<Utc>>,
    /// For windows of an hour or more: when it runs out at the current rate (`null`: not
    /// before it frees up).
    pub exhausts_at: Option<DateTime<Utc>>,
}

/// A failed request or an upstream's trouble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorView {
    pub at: DateTime<Utc>,
    /// The HTTP status the client got (absent for trouble seen without a failed request, such
    /// as a 429 that was retried on another account).
    pub status: Option<u16>,
    pub error_type: Option<String>,
    pub message: String,
}

/// `1234567` → `1,234,567`: how the page and the terminal table both print counts.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
