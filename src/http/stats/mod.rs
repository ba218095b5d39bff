//! The stats API (`/api/v1/stats/…`): live state from the actors (pool, quota, rate windows) and
//! history from the store's rollups (usage, providers, top models, errors).
//!
//! The admin token reads everything; a client key reads only its own usage (`user_id` is then its
//! own user; naming another user is refused). `from`/`to` are RFC 3339 times or plain dates
//! (whole UTC days, see [`super::dates`]) and default to the last 24 hours; the range is
//! `[from, to)`. Providers and accounts may be given by id or name.

pub(super) mod dto;

use actix_web::{get, web, HttpRequest, HttpResponse};

use super::auth::{Admin, Reader};
use super::dates::range;
use super::error::{ApiError, ErrorBody};
use super::extract::query;
use super::{blocking, AppState};
use crate::store::stats;
use crate::store::{keys, providers, DbConn, StoreError};
use dto::{
    ErrorStatsView, ModelUsageView, PoolView, ProviderStatsView, QuotaView, RangeQuery, TopQuery,
    UsageQuery, UsageView, WindowView,
};

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
