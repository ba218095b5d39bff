//! `/api/v1/admin/providers`: list, create, read, change and delete providers, and replace their
//! provider-wide limits.

use std::collections::BTreeMap;

use actix_web::{delete, get, patch, post, put, web, HttpResponse};
use serde_json::Value;

use super::bodies::{declared_limits, declared_provider};
use super::dto::{ModelView, PriceDoc, ProviderBody, ProviderPatch, ProviderView, RateLimitsDoc};
use super::{write_catalog, ACTOR};
use crate::http::auth::Admin;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{read_json, read_object};
use crate::http::{blocking, AppState};
use crate::manage;
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, StoreError};

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every provider", body = [ProviderView]),
        (status = 401, description = "Not the admin token", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/providers")]
pub(super) async fn list_providers(
    _: Admin,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let views = blocking(&state.store, |conn| {
        let counts = account_counts(conn)?;
        providers::list(conn)?
            .iter()
            .map(|row| provider_view(conn, row, &counts))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    request_body = ProviderBody,
    responses(
        (status = 201, description = "Created", body = ProviderView),
        (status = 400, description = "A bad body (`param` names the field)", body = ErrorBody),
        (status = 409, description = "A provider of that name exists", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/providers")]
pub(super) async fn create_provider(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(body).await?;
    if let Some(accounts) = body.get("accounts") {
        if !accounts.is_null() {
            return Err(ApiError::invalid(
                "create accounts with POST /api/v1/admin/accounts",
                Some("accounts"),
            ));
        }
    }
    let declared = declared_provider(body)?;
    let view = write_catalog(&state, move |conn| {
        let row = manage::create_provider(conn, &declared, Source::Api)?;
        provider_view(conn, &row, &BTreeMap::new())
    })
    .await?;
    log::info!(event = "provider_created", provider = view.name.as_str(); "provider created through the admin API");
    Ok(HttpResponse::Created().json(view))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    responses(
        (status = 200, description = "The provider", body = ProviderView),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/providers/{id}")]
pub(super) async fn get_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let view = blocking(&state.store, move |conn| {
        let row = providers::find(conn, &id)?;
        let counts = account_counts(conn)?;
        provider_view(conn, &row, &counts)
    })
    .await?;
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    request_body = ProviderPatch,
    responses(
        (status = 200, description = "The changed provider", body = ProviderView),
        (status = 400, description = "A bad body (`param` names the field)", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 409, description = "The new name is taken", body = ErrorBody),
    )
)]
#[patch("/api/v1/admin/providers/{id}")]
pub(super) async fn patch_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let patch = read_object(body).await?;
    // The stored declaration with the given fields replaced, read again as a whole, so a patch
    // is checked exactly like a full declaration.
    let current = blocking(&state.store, {
        let id = id.clone();
        move |conn| {
            let row = providers::find(conn, &id)?;
            Ok((row.id.clone(), manage::provider_declaration(conn, &row)?))
        }
    })
    .await?;
    let (provider_id, declared) = current;
    let Ok(Value::Object(mut merged)) = serde_json::to_value(&declared) else {
        return Err(ApiError::Internal(
            "a provider declaration does not serialise".into(),
        ));
    };
    merged.remove("accounts");
    let mut active = None;
    for (key, value) in patch {
        match key.as_str() {
            "active" => {
                active = Some(value.as_bool().ok_or_else(|| {
                    ApiError::invalid("active must be true or false", Some("active"))
                })?);
            }
            "accounts" => {
                return Err(ApiError::invalid(
                    "change accounts with /api/v1/admin/accounts",
                    Some("accounts"),
                ))
            }
            _ => {
                merged.insert(key, value);
            }
        }
    }
    let declared = declared_provider(Value::Object(merged))?;
    let view = write_catalog(&state, move |conn| {
        let row = manage::update_provider(conn, &provider_id, &declared, active)?;
        let counts = account_counts(conn)?;
        provider_view(conn, &row, &counts)
    })
    .await?;
    log::info!(event = "provider_updated", provider = view.name.as_str(); "provider changed through the admin API");
    Ok(HttpResponse::Ok().json(view))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    responses(
        (status = 204, description = "Deleted, with its models, limits and accounts (request history is kept)"),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[delete("/api/v1/admin/providers/{id}")]
pub(super) async fn delete_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let deleted = write_catalog(&state, move |conn| {
        manage::delete_provider(conn, &id, ACTOR)
    })
    .await?;
    log::info!(event = "provider_deleted", provider = deleted.name.as_str(); "provider deleted through the admin API");
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    responses(
        (status = 200, description = "The provider-wide limits (per account, all models)", body = RateLimitsDoc),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/providers/{id}/rate-limits")]
pub(super) async fn get_provider_limits(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let limits = blocking(&state.store, move |conn| {
        let row = providers::find(conn, &id)?;
        Ok(manage::provider_declaration(conn, &row)?.rate_limits)
    })
    .await?;
    Ok(HttpResponse::Ok().json(limits))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The provider's id or name")),
    request_body = RateLimitsDoc,
    responses(
        (status = 200, description = "The new set, which replaced the old one", body = RateLimitsDoc),
        (status = 400, description = "A bad limit (`param` names it)", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
    )
)]
#[put("/api/v1/admin/providers/{id}/rate-limits")]
pub(super) async fn put_provider_limits(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let limits = declared_limits(read_json(body).await?)?;
    let specs = limits.specs();
    write_catalog(&state, move |conn| {
        manage::set_provider_limits(conn, &id, &specs)
    })
    .await?;
    Ok(HttpResponse::Ok().json(manage::limits_config(&limits.specs())))
}

/// Accounts per provider id.
fn account_counts(conn: &mut DbConn) -> Result<BTreeMap<String, usize>, StoreError> {
    let mut counts = BTreeMap::new();
    for a in store::accounts::list(conn, None)? {
        *counts.entry(a.account.provider_id).or_insert(0) += 1;
    }
    Ok(counts)
}

/// A provider as the API shows it, with its account count from `counts`.
pub(super) fn provider_view(
    conn: &mut DbConn,
    row: &ProviderRow,
    counts: &BTreeMap<String, usize>,
) -> Result<ProviderView, StoreError> {
    let declared = manage::provider_declaration(conn, row)?;
    Ok(ProviderView {
        id: row.id.clone(),
        name: declared.name,
        base_url: declared.base_url,
        strategy: declared.strategy.as_str().to_string(),
        auth: declared.auth,
        timeout: declared
            .timeout
            .map(|t| humantime::format_duration(t).to_string()),
        max_completion_tokens: declared.max_completion_tokens,
        tokenizer: declared.tokenizer.to_string(),
        ratelimit_headers: declared.ratelimit_headers,
        rate_limits: declared.rate_limits,
        models: declared
            .models
            .into_iter()
            .map(|m| ModelView {
                name: m.name,
                price: PriceDoc {
                    input: m.price.input,
                    output: m.price.output,
                },
                rate_limits: m.rate_limits,
            })
            .collect(),
        active: row.active,
        source: row.source.clone(),
        accounts: counts.get(&row.id).copied().unwrap_or(0),
        created_at: row.created_at.and_utc(),
        updated_at: row.updated_at.and_utc(),
    })
}
