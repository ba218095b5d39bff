//! What the admin API does to the running runtime alone: quota resets (of one account, or of
//! every account of a provider) and flushing every account's state to the database and Redis.

use std::sync::Arc;

use actix_web::{post, web, HttpResponse};

use super::dto::{AccountResetView, FlushView, ProviderResetView};
use super::ACTOR;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::stats::dto::QuotaView;
use crate::http::{blocking, AppState};
use crate::manage;

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    responses(
        (status = 200, description = "Every account of the provider starts a new quota period", body = ProviderResetView),
        (status = 404, description = "No such provider in the runtime", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/providers/{id}/reset")]
pub(super) async fn reset_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let registry = state.runtime.registry();
    let provider = registry.provider(&id)?.clone();
    let accounts: Vec<Arc<str>> = registry
        .accounts()
        .iter()
        .filter(|a| a.provider_id == provider.spec.id)
        .map(|a| a.id.clone())
        .collect();
    let count = state.runtime.reset_provider(&provider.spec.id).await?;
    let reason = format!("provider `{}` reset", provider.spec.name);
    blocking(&state.store, move |conn| {
        manage::record_resets(conn, &accounts, ACTOR, &reason)
    })
    .await?;
    log::info!(event = "provider_reset", provider = &*provider.spec.name, accounts = count; "provider quota reset through the admin API");
    Ok(HttpResponse::Ok().json(ProviderResetView {
        provider_id: provider.spec.id.to_string(),
        accounts_reset: count,
    }))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    responses(
        (status = 200, description = "The account starts a new quota period", body = AccountResetView),
        (status = 404, description = "No such account in the runtime", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/accounts/{id}/reset")]
pub(super) async fn reset_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account_id = state.runtime.registry().account(&id)?.id.clone();
    let status = state.runtime.reset_account(&account_id).await?;
    let accounts = [account_id.clone()];
    blocking(&state.store, move |conn| {
        manage::record_resets(conn, &accounts, ACTOR, "quota reset")
    })
    .await?;
    log::info!(event = "account_reset", account_id = &*account_id; "account quota reset through the admin API");
    Ok(HttpResponse::Ok().json(AccountResetView {
        account_id: account_id.to_string(),
        status: QuotaView::from(status),
    }))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every account's state is written to the database", body = FlushView),
        (status = 503, description = "The database could not be written", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/flush")]
pub(super) async fn flush(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state
        .tracker
        .flush()
        .await
        .map_err(|_| ApiError::Unavailable("the tracker has stopped".into()))?;
    let report = state
        .syncer
        .send(crate::sync::syncer::Flush)
        .await
        .map_err(|_| ApiError::Unavailable("the sync has stopped".into()))?
        .map_err(|e| ApiError::Unavailable(format!("flush failed: {e}")))?;
    Ok(HttpResponse::Ok().json(FlushView {
        accounts: report.accounts,
    }))
}
