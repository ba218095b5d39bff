//! The stats API's HTTP types: answers converted from the runtime's and the store's own types
//! (never serialised straight), and the query strings.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::actors::pool::{MemberStatus, PoolStatus};
use crate::domain::account::{QuotaStatus, WindowStats};
use crate::domain::time::to_datetime;
use crate::store::stats::{ErrorStats, ModelUsage, Period, ProviderStats, UsageStats};

// ------------------------------------------------------------------------------------------------
// Answers
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PeriodView {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageView {
    /// The user the figures are for; absent for all users.
    pub user_id: Option<String>,
    pub total_requests: i64,
    pub successful_requests: i64,
    /// Successful / total, from 0 to 1.
    pub success_rate: f64,
    pub total_input_tokens: i64,
    pub total_output_tokens: i64,
    pub total_cost: f64,
    pub avg_latency_ms: f64,
    pub period: PeriodView,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PoolView {
    pub provider_id: String,
    pub provider: String,
    pub strategy: String,
    pub total_accounts: usize,
    pub available_accounts: usize,
    pub accounts_status: Vec<MemberView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberView {
    pub account_id: String,
    /// The account's name.
    pub account: String,
    pub active: bool,
    pub available: bool,
    /// Why it is not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub quota_used: u64,
    pub quota_limit: u64,
    pub usage_percent: f64,
    /// When the quota runs out at the account's current rate (over the last 15 minutes);
    /// `null` when not before `reset_at`.
    pub exhausts_at: Option<DateTime<Utc>>,
    /// When the quota period ends.
    pub reset_at: DateTime<Utc>,
}

/// An account's quota, live.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QuotaView {
    pub available: bool,
    /// Why it is not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub current_usage: u64,
    /// 0 = unlimited.
    pub limit: u64,
    pub usage_percent: f64,
    /// When the current quota period ends.
    pub reset_at: DateTime<Utc>,
}

/// One rate limit of an account, live.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WindowView {
    /// `rpm`, `tpd`, `concurrent`, or a custom window like `requests/2s`.
    pub limit_type: String,
    pub limit: u64,
    /// Units held now (settled and in flight).
    pub current: u64,
    /// Of which in flight.
    pub in_flight: u64,
    pub window_start: DateTime<Utc>,
    /// Seconds until one more unit could pass; 0 when it can now.
    pub retry_after: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderStatsView {
    pub provider_id: String,
    pub total_requests: i64,
    pub successful_requests: i64,
    pub success_rate: f64,
    pub avg_latency_ms: f64,
    pub total_input_tokens: i64,
    pub total_output_tokens: i64,
    pub total_tokens: i64,
    pub error_count: i64,
    pub timeout_count: i64,
    pub quota_exhausted_count: i64,
    pub rate_limited_count: i64,
    pub total_cost: f64,
    /// Distinct users over the whole range.
    pub unique_users: i64,
    pub period: PeriodView,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelUsageView {
    pub model: String,
    pub request_count: i64,
    pub total_tokens: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorStatsView {
    pub provider_id: String,
    pub total_errors: i64,
    /// Failed requests by message.
    pub errors_by_type: BTreeMap<String, i64>,
    pub period: PeriodView,
}

// ------------------------------------------------------------------------------------------------
// Queries
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// RFC 3339 or a date (its start, UTC); default `to` − 24 h.
    pub from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    pub to: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// RFC 3339 or a date (its start, UTC); default `to` − 24 h.
    pub from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    pub to: Option<String>,
    /// A user's id or name (admin only; a client key reads its own user).
    pub user_id: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopQuery {
    /// How many models (1–1000, default 10).
    pub limit: Option<String>,
    /// RFC 3339 or a date (its start, UTC); default `to` − 24 h.
    pub from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    pub to: Option<String>,
}

// ------------------------------------------------------------------------------------------------
// From the runtime's and the store's types
// ------------------------------------------------------------------------------------------------

impl From<Period> for PeriodView {
    fn from(p: Period) -> Self {
        PeriodView {
            from: p.from,
            to: p.to,
        }
    }
}

impl UsageView {
    pub(super) fn new(user_id: Option<String>, s: UsageStats) -> Self {
        UsageView {
            user_id,
            total_requests: s.total_requests,
            successful_requests: s.successful_requests,
            success_rate: s.success_rate,
            total_input_tokens: s.total_input_tokens,
            total_output_tokens: s.total_output_tokens,
            total_cost: s.total_cost,
            avg_latency_ms: s.avg_latency_ms,
            period: s.period.into(),
        }
    }
}

impl From<PoolStatus> for PoolView {
    fn from(p: PoolStatus) -> Self {
        PoolView {
            provider_id: p.provider_id,
            provider: p.provider,
            strategy: p.strategy.as_str().to_string(),
            total_accounts: p.total_accounts,
            available_accounts: p.available_accounts,
            accounts_status: p
                .accounts_status
                .into_iter()
                .map(MemberView::from)
                .collect(),
        }
    }
}

impl From<MemberStatus> for MemberView {
    fn from(m: MemberStatus) -> Self {
        MemberView {
            account_id: m.account_id,
            account: m.account,
            active: m.active,
            available: m.available,
            reason: m.reason,
            quota_used: m.quota_used,
            quota_limit: m.quota_limit,
            usage_percent: m.usage_percent,
            exhausts_at: None,
            reset_at: to_datetime(m.reset_at),
        }
    }
}

impl From<QuotaStatus> for QuotaView {
    fn from(s: QuotaStatus) -> Self {
        QuotaView {
            available: s.available,
            reason: s.reason,
            current_usage: s.current_usage,
            limit: s.limit,
            usage_percent: s.usage_percent,
            reset_at: to_datetime(s.reset_at),
        }
    }
}

impl From<WindowStats> for WindowView {
    fn from(w: WindowStats) -> Self {
        WindowView {
            limit_type: w.limit_type,
            limit: w.limit,
            current: w.current,
            in_flight: w.in_flight,
            window_start: to_datetime(w.window_start),
            retry_after: w.retry_after,
        }
    }
}

impl From<ProviderStats> for ProviderStatsView {
    fn from(s: ProviderStats) -> Self {
        ProviderStatsView {
            provider_id: s.provider_id,
            total_requests: s.total_requests,
            successful_requests: s.successful_requests,
            success_rate: s.success_rate,
            avg_latency_ms: s.avg_latency_ms,
            total_input_tokens: s.total_input_tokens,
            total_output_tokens: s.total_output_tokens,
            total_tokens: s.total_tokens,
            error_count: s.error_count,
            timeout_count: s.timeout_count,
            quota_exhausted_count: s.quota_exhausted_count,
            rate_limited_count: s.rate_limited_count,
            total_cost: s.total_cost,
            unique_users: s.unique_users,
            period: s.period.into(),
        }
    }
}

impl From<ModelUsage> for ModelUsageView {
    fn from(m: ModelUsage) -> Self {
        ModelUsageView {
            model: m.model,
            request_count: m.request_count,
            total_tokens: m.total_tokens,
        }
    }
}

impl ErrorStatsView {
    pub(super) fn new(
        provider_id: String,
        s: ErrorStats,
        from: NaiveDateTime,
        to: NaiveDateTime,
    ) -> Self {
        ErrorStatsView {
            provider_id,
            total_errors: s.total_errors,
            errors_by_type: s.errors_by_type,
            period: PeriodView {
                from: from.and_utc(),
                to: to.and_utc(),
            },
        }
    }
}
