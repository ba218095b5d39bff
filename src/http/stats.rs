//! The stats API (`/api/v1/stats/…`): live state from the actors (pool, quota, rate windows) and
//! history from the store's rollups (usage, providers, top models, errors).
//!
//! The admin token reads everything; a client key reads only its own usage (`user_id` is then its
//! own user; naming another user is refused). `from`/`to` are RFC 3339 times or plain dates
//! (whole UTC days, see [`super::dates`]) and default to the last 24 hours; the range is
//! `[from, to)`. Providers and accounts may be given by id or name.

use actix_web::{get, web, HttpRequest, HttpResponse};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use super::admin::{blocking, query};
use super::auth::{Admin, Reader};
use super::dates::range;
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::AppState;
use crate::actors::pool::{MemberStatus, PoolStatus};
use crate::domain::account::{QuotaStatus, WindowStats};
use crate::domain::time::to_datetime;
use crate::store::stats::{self, ErrorStats, ModelUsage, Period, ProviderStats, UsageStats};
use crate::store::{keys, providers, DbConn, StoreError};

const DEFAULT_TOP: usize = 10;
const MAX_TOP: usize = 1000;

/// Registers the stats routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(usage)
        .service(pool)
        .service(quota)
        .service(ratelimit)
        .service(provider)
        .service(top_models)
        .service(errors);
}

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
    from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    to: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// RFC 3339 or a date (its start, UTC); default `to` − 24 h.
    from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    to: Option<String>,
    /// A user's id or name (admin only; a client key reads its own user).
    user_id: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopQuery {
    /// How many models (1–1000, default 10).
    limit: Option<String>,
    /// RFC 3339 or a date (its start, UTC); default `to` − 24 h.
    from: Option<String>,
    /// RFC 3339 or a date (its end, UTC); default now.
    to: Option<String>,
}

// ------------------------------------------------------------------------------------------------
// Handlers
// ------------------------------------------------------------------------------------------------

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = []), ("client_key" = [])),
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage over the range (a client key: its own)", body = UsageView),
        (status = 400, description = "A bad date, or `from` after `to`", body = ErrorBody),
        (status = 403, description = "A client key asking for another user", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/usage")]
async fn usage(
    reader: Reader,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q: UsageQuery = query(&req)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let asked = q.user_id.filter(|u| !u.is_empty());
    let view = blocking(&state.store, move |conn| {
        let user_id = match (&reader, asked) {
            (Reader::Client(caller), asked) => {
                if let Some(asked) = asked {
                    if asked != *caller.user_id && asked != *caller.user {
                        return Ok(Err(ApiError::Forbidden(
                            "a client key reads only its own usage".into(),
                        )));
                    }
                }
                Some(caller.user_id.to_string())
            }
            (Reader::Admin, Some(asked)) => match keys::find_user(conn, &asked)? {
                Some(user) => Some(user.id),
                None => return Err(StoreError::NotFound(format!("user `{asked}`"))),
            },
            (Reader::Admin, None) => None,
        };
        let stats = stats::usage_stats(conn, user_id.as_deref(), from, to)?;
        Ok(Ok(UsageView::new(user_id, stats)))
    })
    .await??;
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(("provider_id" = String, Path, description = "The provider's id or name")),
    responses(
        (status = 200, description = "The pool's accounts, live, with each quota's exhaustion forecast", body = PoolView),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/pool/{provider_id}")]
async fn pool(
    _: Admin,
    state: web::Data<AppState>,
    page: Option<web::Data<super::status_page::StatusPage>>,
    provider_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let status = state.runtime.pool_status(&provider_id).await?;
    let forecasts = match page {
        Some(page) => page
            .board
            .quota_forecasts(&status)
            .await
            .unwrap_or_else(|e| {
                log::warn!("no quota forecast: {e}");
                Default::default()
            }),
        None => Default::default(),
    };
    let mut view = PoolView::from(status);
    for member in &mut view.accounts_status {
        member.exhausts_at = forecasts.get(&member.account_id).copied().flatten();
    }
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    responses(
        (status = 200, description = "The account's quota, live", body = QuotaView),
        (status = 400, description = "An ambiguous name (the candidates are listed)", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/quota/{account_id}")]
async fn quota(
    _: Admin,
    state: web::Data<AppState>,
    account_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let status = state.runtime.status(&account_id).await?;
    Ok(HttpResponse::Ok().json(QuotaView::from(status)))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    responses(
        (status = 200, description = "Each rate limit of the account, live", body = [WindowView]),
        (status = 400, description = "An ambiguous name (the candidates are listed)", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/ratelimit/{account_id}")]
async fn ratelimit(
    _: Admin,
    state: web::Data<AppState>,
    account_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let windows = state.runtime.rate_stats(&account_id).await?;
    let views: Vec<WindowView> = windows.into_iter().map(WindowView::from).collect();
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(
        ("provider_id" = String, Path, description = "The provider's id or name (the id also of a deleted provider)"),
        RangeQuery,
    ),
    responses(
        (status = 200, description = "The provider's usage over the range", body = ProviderStatsView),
        (status = 400, description = "A bad date, or `from` after `to`", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/providers/{provider_id}")]
async fn provider(
    _: Admin,
    state: web::Data<AppState>,
    provider_id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q: RangeQuery = query(&req)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let reference = provider_id.into_inner();
    let stats = blocking(&state.store, move |conn| {
        let id = provider_ref(conn, &reference)?;
        stats::provider_stats(conn, &id, from, to)
    })
    .await?;
    Ok(HttpResponse::Ok().json(ProviderStatsView::from(stats)))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(TopQuery),
    responses(
        (status = 200, description = "The most requested models over the range", body = [ModelUsageView]),
        (status = 400, description = "A bad date or limit, or `from` after `to`", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/models/top")]
async fn top_models(
    _: Admin,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q: TopQuery = query(&req)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_TOP,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_TOP).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("limit must be a whole number from 1 to {MAX_TOP}, got `{text}`"),
                    Some("limit"),
                )
            })?,
    };
    let models = blocking(&state.store, move |conn| {
        stats::top_models(conn, limit, from, to)
    })
    .await?;
    let views: Vec<ModelUsageView> = models.into_iter().map(ModelUsageView::from).collect();
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "stats",
    security(("admin_token" = [])),
    params(
        ("provider_id" = String, Path, description = "The provider's id or name (the id also of a deleted provider)"),
        RangeQuery,
    ),
    responses(
        (status = 200, description = "The provider's failed requests over the range, by message", body = ErrorStatsView),
        (status = 400, description = "A bad date, or `from` after `to`", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/stats/errors/{provider_id}")]
async fn errors(
    _: Admin,
    state: web::Data<AppState>,
    provider_id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q: RangeQuery = query(&req)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let reference = provider_id.into_inner();
    let (id, stats) = blocking(&state.store, move |conn| {
        let id = provider_ref(conn, &reference)?;
        let stats = stats::error_stats(conn, &id, from, to)?;
        Ok((id, stats))
    })
    .await?;
    Ok(HttpResponse::Ok().json(ErrorStatsView::new(id, stats, from, to)))
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// A provider's id from its id or name; a uuid that is no longer a provider still names its
/// history.
fn provider_ref(conn: &mut DbConn, reference: &str) -> Result<String, StoreError> {
    match providers::find(conn, reference) {
        Ok(row) => Ok(row.id),
        Err(StoreError::NotFound(_)) if uuid::Uuid::parse_str(reference).is_ok() => {
            Ok(reference.to_string())
        }
        Err(e) => Err(e),
    }
}

impl From<Period> for PeriodView {
    fn from(p: Period) -> Self {
        PeriodView {
            from: p.from,
            to: p.to,
        }
    }
}

impl UsageView {
    fn new(user_id: Option<String>, s: UsageStats) -> Self {
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
    fn new(provider_id: String, s: ErrorStats, from: NaiveDateTime, to: NaiveDateTime) -> Self {
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
