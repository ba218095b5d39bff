//! `/api/v1/admin/accounts`: list, create, read, change and delete accounts (their keys are
//! sealed at once and never shown again).

use actix_web::{delete, get, patch, post, web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::bodies::declared_account;
use super::dto::{AccountBody, AccountFilter, AccountPatch, AccountView};
use super::{write_catalog, ACTOR};
use crate::config::RateLimitsConfig;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{query, read_object};
use crate::http::stats::dto::QuotaView;
use crate::http::{blocking, AppState};
use crate::manage::{self, AccountChanges, NewAccount};
use crate::store::accounts::AccountWithProvider;
use crate::store::providers::{self, Source};
use crate::store::{self, DbConn, StoreError};

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(AccountFilter),
    responses(
        (status = 200, description = "Every account (of one provider with `provider`)", body = [AccountView]),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/accounts")]
pub(super) async fn list_accounts(
    _: Admin,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let filter: AccountFilter = query(&req)?;
    let found = blocking(&state.store, move |conn| {
        let provider = match &filter.provider {
            Some(p) => Some(providers::find(conn, p)?.id),
            None => None,
        };
        store::accounts::list(conn, provider.as_deref())?
            .into_iter()
            .map(|a| with_overrides(conn, a))
            .collect::<Result<Vec<_>, StoreError>>()
    })
    .await?;
    let mut views = Vec::with_capacity(found.len());
    for (account, overrides) in found {
        views.push(account_view(&state, account, overrides).await);
    }
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    request_body = AccountBody,
    responses(
        (status = 201, description = "Created; the key is never shown again, only its masked tail", body = AccountView),
        (status = 400, description = "A bad body (`param` names the field)", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 409, description = "The provider has an account of that name", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/accounts")]
pub(super) async fn create_account(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let mut body = read_object(body).await?;
    let provider = match body.remove("provider") {
        Some(Value::String(p)) if !p.trim().is_empty() => p,
        Some(_) => {
            return Err(ApiError::invalid(
                "provider must be a provider's name or id",
                Some("provider"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "missing field `provider`",
                Some("provider"),
            ))
        }
    };
    let declared = declared_account(Value::Object(body))?;
    manage::validate_name("account", &declared.name)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    let new = NewAccount {
        provider,
        name: declared.name,
        credentials: declared.credentials,
        quota_limit: declared.quota_limit,
        expires_at: declared.expires_at,
        active: declared.active.unwrap_or(true),
    };
    let overrides = declared.rate_limits.specs();
    let key = state.master_key.clone();
    let (created, overrides) = write_catalog(&state, move |conn| {
        let created = manage::create_account(conn, &key, &new, &overrides, Source::Api, ACTOR)?;
        with_overrides(conn, created)
    })
    .await?;
    log::info!(
        event = "account_created", provider = created.provider_name.as_str(), account_id = created.account.id.as_str();
        "account created through the admin API"
    );
    let view = account_view(&state, created, overrides).await;
    Ok(HttpResponse::Created().json(view))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    responses(
        (status = 200, description = "The account (without its secret) and its live status", body = AccountView),
        (status = 400, description = "An ambiguous name (the candidates are listed)", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/accounts/{id}")]
pub(super) async fn get_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let (found, overrides) = blocking(&state.store, move |conn| {
        let found = store::accounts::find(conn, &id)?;
        with_overrides(conn, found)
    })
    .await?;
    Ok(HttpResponse::Ok().json(account_view(&state, found, overrides).await))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    request_body = AccountPatch,
    responses(
        (status = 200, description = "The changed account; the runtime applies it at once, keeping the counters", body = AccountView),
        (status = 400, description = "A bad body (`param` names the field)", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
#[patch("/api/v1/admin/accounts/{id}")]
pub(super) async fn patch_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let patch = read_object(body).await?;
    const FIELDS: [&str; 6] = [
        "active",
        "quota_limit",
        "expires_at",
        "api_key",
        "credentials",
        "rate_limits",
    ];
    if let Some(unknown) = patch.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!(
                "unknown field `{unknown}` (expected any of {})",
                FIELDS.join(", ")
            ),
            Some(unknown),
        ));
    }
    // Read through the account reader; a placeholder name (and key, when none is given) makes it
    // whole, and only the fields present are applied.
    let mut probe = patch.clone();
    probe.insert("name".into(), json!("account"));
    let new_credentials = patch.contains_key("api_key") || patch.contains_key("credentials");
    if !new_credentials {
        probe.insert("api_key".into(), json!("unchanged"));
    }
    let declared = declared_account(Value::Object(probe))?;
    let given = |field: &str| patch.get(field).is_some_and(|v| !v.is_null());
    let changes = AccountChanges {
        active: declared.active.filter(|_| given("active")),
        quota_limit: given("quota_limit").then_some(declared.quota_limit),
        expires_at: patch
            .contains_key("expires_at")
            .then_some(declared.expires_at),
        credentials: new_credentials.then_some(declared.credentials),
        rate_limits: patch
            .contains_key("rate_limits")
            .then(|| declared.rate_limits.specs()),
    };
    let key = state.master_key.clone();
    let (updated, overrides) = write_catalog(&state, move |conn| {
        let updated = manage::update_account(conn, &key, &id, &changes, ACTOR)?;
        with_overrides(conn, updated)
    })
    .await?;
    log::info!(
        event = "account_updated", provider = updated.provider_name.as_str(), account_id = updated.account.id.as_str();
        "account changed through the admin API"
    );
    Ok(HttpResponse::Ok().json(account_view(&state, updated, overrides).await))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The account's id, `provider/account`, or its name when unique")),
    responses(
        (status = 204, description = "Deleted (its audit trail and request history are kept)"),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
#[delete("/api/v1/admin/accounts/{id}")]
pub(super) async fn delete_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let deleted =
        write_catalog(&state, move |conn| manage::delete_account(conn, &id, ACTOR)).await?;
    log::info!(
        event = "account_deleted", provider = deleted.provider_name.as_str(), account_id = deleted.account.id.as_str();
        "account deleted through the admin API"
    );
    Ok(HttpResponse::NoContent().finish())
}

/// An account with its own overrides of its provider's limits, which its view shows.
fn with_overrides(
    conn: &mut DbConn,
    found: AccountWithProvider,
) -> Result<(AccountWithProvider, RateLimitsConfig), StoreError> {
    let overrides = manage::account_overrides(conn, &found.account)?;
    Ok((found, overrides))
}

/// An account as the API shows it, with its live status when the runtime serves it.
async fn account_view(
    state: &AppState,
    found: AccountWithProvider,
    overrides: RateLimitsConfig,
) -> AccountView {
    let status = state.runtime.status(&found.account.id).await.ok();
    let account = found.account;
    AccountView {
        quota_used: status
            .as_ref()
            .map_or(u64::try_from(account.quota_used).unwrap_or(0), |s| {
                s.current_usage
            }),
        status: status.map(QuotaView::from),
        id: account.id,
        name: account.name,
        provider: found.provider_name,
        provider_id: account.provider_id,
        active: account.active,
        disabled_reason: account.disabled_reason,
        quota_limit: u64::try_from(account.quota_limit).unwrap_or(0),
        expires_at: account.expires_at.map(|t| t.and_utc()),
        api_key_hint: account.credentials_hint,
        rate_limits: overrides,
        source: account.source,
        created_at: account.created_at.and_utc(),
        updated_at: account.updated_at.and_utc(),
    }
}
