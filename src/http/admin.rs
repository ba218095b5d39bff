//! The admin API (`/api/v1/admin/…`, admin token): providers and their limits, accounts, client
//! keys, resets and flush. Every write goes through [`crate::manage`] (the same operations as the
//! CLI) and is then applied to the running actors at once ([`QuotaSystem::reload`] keeps the
//! counters of accounts that stay).
//!
//! Bodies are read in the config file's shape **by the config file's own reader**: a provider body
//! is checked as `providers[0]` of a config, an account body as one of its `accounts`. So the API
//! accepts exactly what `config.yaml` accepts (shorthands, durations, fixed windows), refuses the
//! same mistakes with the same words, and cannot drift from it; the key at fault becomes `param`.
//!
//! Answers are HTTP types of their own ([`ProviderView`], [`AccountView`], [`KeyView`]): a store
//! row is never serialised, and credentials appear only as their masked tail (`api_key_hint`).
//!
//! [`QuotaSystem::reload`]: crate::actors::QuotaSystem::reload

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use actix_web::{delete, get, patch, post, put, web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Caller};
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::stats::QuotaView;
use super::AppState;
use crate::config::{
    AccountConfig, AuthConfig, Config, ProviderConfig, RateLimitHeaders, RateLimitsConfig,
};
use crate::manage::{self, AccountChanges, NewAccount};
use crate::store::accounts::AccountWithProvider;
use crate::store::keys::{self, KeyWithUser};
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, Store, StoreError};

/// The `actor` of audit rows written by this API.
pub const ACTOR: &str = "admin-api";

/// Largest admin body accepted (a provider with many models stays far below).
const BODY_LIMIT: usize = 1024 * 1024;

/// Registers the admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(list_providers)
        .service(create_provider)
        .service(get_provider)
        .service(patch_provider)
        .service(delete_provider)
        .service(get_provider_limits)
        .service(put_provider_limits)
        .service(reset_provider)
        .service(list_accounts)
        .service(create_account)
        .service(get_account)
        .service(patch_account)
        .service(delete_account)
        .service(reset_account)
        .service(list_keys)
        .service(create_key)
        .service(revoke_key)
        .service(flush);
}

// ------------------------------------------------------------------------------------------------
// Answers
// ------------------------------------------------------------------------------------------------

/// A provider as the admin API shows it: the config file's fields plus its identity and state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderView {
    pub id: String,
    pub name: String,
    pub base_url: String,
    /// `round_robin`, `least_used`, `random` or `best`.
    pub strategy: String,
    #[schema(value_type = AuthDoc)]
    pub auth: AuthConfig,
    /// The provider's own request timeout (`60s`); none = `upstream.timeout`.
    pub timeout: Option<String>,
    pub max_completion_tokens: u64,
    /// `chars:N`, `bytes`, `o200k` or `cl100k`.
    pub tokenizer: String,
    #[schema(value_type = Option<RateLimitHeadersDoc>)]
    pub ratelimit_headers: Option<RateLimitHeaders>,
    /// Limits of each account, across all models.
    #[schema(value_type = RateLimitsDoc)]
    pub rate_limits: RateLimitsConfig,
    pub models: Vec<ModelView>,
    pub active: bool,
    /// `config` (declared in config.yaml: the file wins at the next start) or `api`.
    pub source: String,
    /// How many accounts the provider has.
    pub accounts: usize,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    pub name: String,
    pub price: PriceDoc,
    /// Limits per account for this model, on top of the provider's.
    #[schema(value_type = RateLimitsDoc)]
    pub rate_limits: RateLimitsConfig,
}

/// An account without its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    /// The provider's name.
    pub provider: String,
    pub provider_id: String,
    pub active: bool,
    pub disabled_reason: Option<String>,
    /// Tokens per quota period; 0 = unlimited.
    pub quota_limit: u64,
    /// Tokens used in the current period (live when the runtime serves the account).
    pub quota_used: u64,
    pub expires_at: Option<DateTime<Utc>>,
    /// The masked tail of the key, like `…a1b2`.
    pub api_key_hint: String,
    /// The account's overrides of its provider's limits.
    #[schema(value_type = RateLimitsDoc)]
    pub rate_limits: RateLimitsConfig,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The live quota status (absent when the runtime does not serve the account).
    pub status: Option<QuotaView>,
}

/// A client key without its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    /// The user's name.
    pub user: String,
    pub user_id: String,
    /// The first characters of the key, safe to show.
    pub prefix: String,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new client key: the only answer that carries the key itself.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NewKeyView {
    pub id: String,
    pub name: String,
    pub user: String,
    pub user_id: String,
    /// The client key; shown only here (it is stored hashed).
    pub key: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccountResetView {
    pub account_id: String,
    pub status: QuotaView,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderResetView {
    pub provider_id: String,
    pub accounts_reset: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlushView {
    /// Account states written.
    pub accounts: usize,
    /// Whether Redis got them too (false when Redis is off or down).
    pub redis: bool,
}

// ------------------------------------------------------------------------------------------------
// Bodies, for the document only: they are read by the config's reader (see the module doc)
// ------------------------------------------------------------------------------------------------

/// A set of limits as in `config.yaml`; a limit left out is unlimited.
#[allow(dead_code)] // documents the shape; read as `config::RateLimitsConfig`
#[derive(ToSchema)]
pub struct RateLimitsDoc {
    rpm: Option<LimitValueDoc>,
    rph: Option<LimitValueDoc>,
    rpd: Option<LimitValueDoc>,
    tpm: Option<LimitValueDoc>,
    tpd: Option<LimitValueDoc>,
    /// Requests in flight at once.
    concurrent: Option<u64>,
    /// Other windows, e.g. `{kind: requests, limit: 5, per: 2s}`.
    windows: Option<Vec<WindowDoc>>,
}

/// A sliding limit (`30`), or a fixed one that resets on a schedule.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(untagged)]
pub enum LimitValueDoc {
    Plain(u64),
    Fixed {
        limit: u64,
        /// Five-field cron expression.
        reset: Option<String>,
        /// IANA timezone of `reset` (default UTC).
        timezone: Option<String>,
    },
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WindowDoc {
    /// `requests` or `tokens`.
    kind: String,
    limit: u64,
    /// A duration: `500ms`, `2s`, `5m`, `24h`.
    per: String,
    reset: Option<String>,
    timezone: Option<String>,
}

/// How an account's key is sent: `<header>: <scheme> <key>`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AuthDoc {
    /// Default `Authorization`.
    header: String,
    /// Default `Bearer`; empty sends the bare key.
    scheme: String,
}

/// Which windows the upstream's `x-ratelimit-*` headers describe.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct RateLimitHeadersDoc {
    /// `rpm`, `rph` or `rpd`.
    requests: Option<String>,
    /// `tpm` or `tpd`.
    tokens: Option<String>,
}

/// Price per million tokens.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PriceDoc {
    pub input: f64,
    pub output: f64,
}

/// A model: its name, or its name with prices and limits.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(untagged)]
pub enum ModelDoc {
    Name(String),
    Detailed {
        name: String,
        price: Option<PriceDoc>,
        rate_limits: Option<Box<RateLimitsDoc>>,
    },
}

/// A provider as in `config.yaml` (without `accounts`).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ProviderBody {
    name: String,
    base_url: String,
    strategy: Option<String>,
    auth: Option<AuthDoc>,
    timeout: Option<String>,
    max_completion_tokens: Option<u64>,
    tokenizer: Option<String>,
    ratelimit_headers: Option<RateLimitHeadersDoc>,
    rate_limits: Option<RateLimitsDoc>,
    models: Option<Vec<ModelDoc>>,
}

/// Any fields of a provider (each replaces the stored one; `null` restores its default), and
/// `active`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ProviderPatch {
    name: Option<String>,
    base_url: Option<String>,
    strategy: Option<String>,
    auth: Option<AuthDoc>,
    timeout: Option<String>,
    max_completion_tokens: Option<u64>,
    tokenizer: Option<String>,
    ratelimit_headers: Option<RateLimitHeadersDoc>,
    rate_limits: Option<RateLimitsDoc>,
    models: Option<Vec<ModelDoc>>,
    active: Option<bool>,
}

/// The key and any extra headers sent upstream.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct CredentialsDoc {
    api_key: String,
    headers: Option<BTreeMap<String, String>>,
}

/// A new account: `api_key`, or `credentials` with extra headers.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AccountBody {
    name: String,
    /// The provider's name or id.
    provider: String,
    api_key: Option<String>,
    credentials: Option<CredentialsDoc>,
    /// Tokens per quota period; 0 (default) = unlimited.
    quota_limit: Option<u64>,
    /// RFC 3339.
    expires_at: Option<DateTime<Utc>>,
    active: Option<bool>,
    /// Overrides of the provider's limits.
    rate_limits: Option<RateLimitsDoc>,
}

/// Any of these fields; `expires_at: null` removes the expiry, `rate_limits` replaces the
/// account's overrides.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct AccountPatch {
    active: Option<bool>,
    quota_limit: Option<u64>,
    expires_at: Option<DateTime<Utc>>,
    api_key: Option<String>,
    credentials: Option<CredentialsDoc>,
    rate_limits: Option<RateLimitsDoc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: String,
    /// The user the key belongs to (created when new); default: the key's name.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AccountFilter {
    /// Only the accounts of this provider (name or id).
    provider: Option<String>,
}

// ------------------------------------------------------------------------------------------------
// Providers
// ------------------------------------------------------------------------------------------------

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every provider", body = [ProviderView]),
        (status = 401, description = "Not the admin token", body = ErrorBody),
    )
)]
#[get("/api/v1/admin/providers")]
async fn list_providers(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
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
async fn create_provider(
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
    let view = blocking(&state.store, move |conn| {
        let row = manage::create_provider(conn, &declared, Source::Api)?;
        provider_view(conn, &row, &BTreeMap::new())
    })
    .await?;
    apply(&state).await;
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
async fn get_provider(
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
async fn patch_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let Value::Object(patch) = read_json(body).await? else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
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
    let view = blocking(&state.store, move |conn| {
        let row = manage::update_provider(conn, &provider_id, &declared, active)?;
        let counts = account_counts(conn)?;
        provider_view(conn, &row, &counts)
    })
    .await?;
    apply(&state).await;
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
async fn delete_provider(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let deleted = blocking(&state.store, move |conn| {
        manage::delete_provider(conn, &id, ACTOR)
    })
    .await?;
    apply(&state).await;
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
async fn get_provider_limits(
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
async fn put_provider_limits(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let limits = declared_limits(read_json(body).await?)?;
    let specs = limits.specs();
    blocking(&state.store, move |conn| {
        manage::set_provider_limits(conn, &id, &specs)
    })
    .await?;
    apply(&state).await;
    Ok(HttpResponse::Ok().json(manage::limits_config(&limits.specs())))
}

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
async fn reset_provider(
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
        let rows: Vec<_> = accounts
            .iter()
            .map(|id| store::audit::NewAudit::new(id, ACTOR, "reset", reason.clone()))
            .collect();
        store::audit::insert(conn, &rows)
    })
    .await?;
    log::info!(event = "provider_reset", provider = &*provider.spec.name, accounts = count; "provider quota reset through the admin API");
    Ok(HttpResponse::Ok().json(ProviderResetView {
        provider_id: provider.spec.id.to_string(),
        accounts_reset: count,
    }))
}

// ------------------------------------------------------------------------------------------------
// Accounts
// ------------------------------------------------------------------------------------------------

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
async fn list_accounts(
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
            .map(|a| {
                let overrides = manage::account_overrides(conn, &a.account)?;
                Ok((a, overrides))
            })
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
async fn create_account(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Value::Object(mut body) = read_json(body).await? else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
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
    let (created, overrides) = blocking(&state.store, move |conn| {
        let created = manage::create_account(conn, &key, &new, &overrides, Source::Api, ACTOR)?;
        let overrides = manage::account_overrides(conn, &created.account)?;
        Ok((created, overrides))
    })
    .await?;
    apply(&state).await;
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
async fn get_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let (found, overrides) = blocking(&state.store, move |conn| {
        let found = store::accounts::find(conn, &id)?;
        let overrides = manage::account_overrides(conn, &found.account)?;
        Ok((found, overrides))
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
async fn patch_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let Value::Object(patch) = read_json(body).await? else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
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
    let (updated, overrides) = blocking(&state.store, move |conn| {
        let updated = manage::update_account(conn, &key, &id, &changes, ACTOR)?;
        let overrides = manage::account_overrides(conn, &updated.account)?;
        Ok((updated, overrides))
    })
    .await?;
    apply(&state).await;
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
async fn delete_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let deleted = blocking(&state.store, move |conn| {
        manage::delete_account(conn, &id, ACTOR)
    })
    .await?;
    apply(&state).await;
    log::info!(
        event = "account_deleted", provider = deleted.provider_name.as_str(), account_id = deleted.account.id.as_str();
        "account deleted through the admin API"
    );
    Ok(HttpResponse::NoContent().finish())
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
async fn reset_account(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account_id = state.runtime.registry().account(&id)?.id.clone();
    let status = state.runtime.reset_account(&account_id).await?;
    blocking(&state.store, {
        let account_id = account_id.clone();
        move |conn| {
            store::audit::insert(
                conn,
                &[store::audit::NewAudit::new(
                    &account_id,
                    ACTOR,
                    "reset",
                    "quota reset",
                )],
            )
        }
    })
    .await?;
    log::info!(event = "account_reset", account_id = &*account_id; "account quota reset through the admin API");
    Ok(HttpResponse::Ok().json(AccountResetView {
        account_id: account_id.to_string(),
        status: QuotaView::from(status),
    }))
}

// ------------------------------------------------------------------------------------------------
// Client keys
// ------------------------------------------------------------------------------------------------

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every client key (never the key itself)", body = [KeyView]))
)]
#[get("/api/v1/admin/keys")]
async fn list_keys(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let keys = blocking(&state.store, keys::list).await?;
    let views: Vec<KeyView> = keys.into_iter().map(KeyView::from).collect();
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    request_body = KeyBody,
    responses(
        (status = 201, description = "Created and usable at once; the key is shown only here", body = NewKeyView),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 409, description = "A key of that name exists", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/keys")]
async fn create_key(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: KeyBody = typed(read_json(body).await?)?;
    let user = body.user.clone().unwrap_or_else(|| body.name.clone());
    manage::validate_name("key", &body.name)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    manage::validate_name("user", &user)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("user")))?;
    let (created, token) = blocking(&state.store, move |conn| {
        manage::create_key(conn, &body.name, &user)
    })
    .await?;
    state.credentials.add_key(
        created.key.key_hash.clone(),
        Caller {
            key_id: Arc::from(created.key.id.as_str()),
            user_id: Arc::from(created.key.user_id.as_str()),
            user: Arc::from(created.user_name.as_str()),
        },
    );
    log::info!(event = "key_created", key_id = created.key.id.as_str(), user = created.user_name.as_str(); "client key created through the admin API");
    Ok(HttpResponse::Created().json(NewKeyView {
        id: created.key.id,
        name: created.key.name,
        user: created.user_name,
        user_id: created.key.user_id,
        key: token.expose().to_string(),
        created_at: created.key.created_at.and_utc(),
    }))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The key's id or name")),
    responses(
        (status = 204, description = "Revoked; refused from now on (revoking twice is not an error)"),
        (status = 404, description = "No such key", body = ErrorBody),
    )
)]
#[delete("/api/v1/admin/keys/{id}")]
async fn revoke_key(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let revoked = blocking(&state.store, move |conn| keys::revoke(conn, &id)).await?;
    state.credentials.remove_key(&revoked.id);
    log::info!(event = "key_revoked", key_id = revoked.id.as_str(); "client key revoked through the admin API");
    Ok(HttpResponse::NoContent().finish())
}

// ------------------------------------------------------------------------------------------------
// Flush
// ------------------------------------------------------------------------------------------------

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every account's state is written to the database (and Redis when on)", body = FlushView),
        (status = 503, description = "The database could not be written", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/flush")]
async fn flush(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
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
        redis: report.redis,
    }))
}

// ------------------------------------------------------------------------------------------------
// Helpers (shared with the stats routes)
// ------------------------------------------------------------------------------------------------

/// Runs a store function off the async threads.
pub(crate) async fn blocking<T, F>(store: &Store, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConn) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    web::block(move || {
        let mut conn = store.conn()?;
        f(&mut conn)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))?
    .map_err(ApiError::from)
}

/// The query string as `T`; a bad one is a 400 envelope (not actix's plain text).
pub(crate) fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            let message = e.to_string();
            let param = field_of(&message);
            ApiError::invalid(format!("bad query string: {message}"), param.as_deref())
        })
}

/// Applies what was just written to the running actors. A failure is logged, not returned: the
/// write is stored, and the runtime also picks the change up by itself within seconds (it polls
/// the catalog version), so answering an error would only invite a duplicate retry.
async fn apply(state: &AppState) {
    if let Err(e) = state.runtime.reload().await {
        log::error!(event = "catalog_reload_failed"; "the change is stored but not yet applied to the runtime: {e}");
    }
}

/// Reads the body as JSON (at most [`BODY_LIMIT`] bytes); malformed JSON is a 400 envelope.
async fn read_json(payload: web::Payload) -> Result<Value, ApiError> {
    let bytes = payload
        .to_bytes_limited(BODY_LIMIT)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit: BODY_LIMIT })?
        .map_err(|e| ApiError::invalid(format!("cannot read the body: {e}"), None))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    match nul_at(&value, "") {
        Some(param) => Err(ApiError::invalid(
            "a text holds a NUL character (\\u0000), which no name, key or value may contain",
            Some(&param),
        )),
        None => Ok(value),
    }
}

/// Where in `value` a string (or a key) holds a NUL, as a `param` path (`models[1].name`). Every
/// admin body goes to the store, and Postgres refuses NUL in text: refused here, by name.
fn nul_at(value: &Value, at: &str) -> Option<String> {
    let join = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => {
            Some(if at.is_empty() { ".".into() } else { at.into() })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, &format!("{at}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_at(v, &join(k))
            }
        }),
        _ => None,
    }
}

/// A small body read directly; the field at fault becomes `param`.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let param = if path == "." {
            field_of(&message)
        } else {
            Some(path)
        };
        ApiError::invalid(message, param.as_deref())
    })
}

/// A provider declaration, read and checked as `providers[0]` of a config file.
fn declared_provider(body: Value) -> Result<ProviderConfig, ApiError> {
    through_config(json!({ "providers": [body] }), "providers[0]")?
        .providers
        .pop()
        .ok_or_else(|| ApiError::Internal("the provider was lost while reading".into()))
}

/// An account declaration, read and checked as an account of a placeholder provider.
fn declared_account(body: Value) -> Result<AccountConfig, ApiError> {
    let tree = json!({ "providers": [{
        "name": "provider",
        "base_url": "http://provider.invalid",
        "accounts": [body],
    }]});
    through_config(tree, "providers[0].accounts[0]")?
        .providers
        .pop()
        .and_then(|mut p| p.accounts.pop())
        .ok_or_else(|| ApiError::Internal("the account was lost while reading".into()))
}

/// A set of limits, read and checked as a provider's `rate_limits`.
fn declared_limits(body: Value) -> Result<RateLimitsConfig, ApiError> {
    let tree = json!({ "providers": [{
        "name": "provider",
        "base_url": "http://provider.invalid",
        "rate_limits": body,
    }]});
    through_config(tree, "providers[0].rate_limits")?
        .providers
        .pop()
        .map(|p| p.rate_limits)
        .ok_or_else(|| ApiError::Internal("the limits were lost while reading".into()))
}

/// Reads `tree` with the config file's reader (no environment: nothing is overridden, and every
/// `$` is doubled so that `${…}` in a value stays literal text). The key at fault, relative to
/// `prefix`, becomes `param`.
fn through_config(mut tree: Value, prefix: &str) -> Result<Config, ApiError> {
    escape_dollars(&mut tree);
    Config::from_yaml(
        &tree.to_string(),
        Path::new("request-body"),
        &BTreeMap::new(),
    )
    .map_err(|e| {
        let param = match e.key.strip_prefix(prefix) {
            Some("") => field_of(&e.problem),
            Some(rest) => Some(rest.trim_start_matches('.').to_string()),
            None => None,
        };
        ApiError::invalid(e.problem, param.as_deref())
    })
}

fn escape_dollars(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('$') => *s = s.replace('$', "$$"),
        Value::Array(items) => items.iter_mut().for_each(escape_dollars),
        Value::Object(map) => map.values_mut().for_each(escape_dollars),
        _ => {}
    }
}

/// The field a message names: serde's `missing field `x`` / `unknown field `x``, or the config
/// reader's `missing x (…)`.
fn field_of(message: &str) -> Option<String> {
    let quoted = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|start| message.split_once(start))
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field.to_string());
    quoted.or_else(|| {
        message
            .strip_prefix("missing ")
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|word| word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_string)
    })
}

/// Accounts per provider id.
fn account_counts(conn: &mut DbConn) -> Result<BTreeMap<String, usize>, StoreError> {
    let mut counts = BTreeMap::new();
    for a in store::accounts::list(conn, None)? {
        *counts.entry(a.account.provider_id).or_insert(0) += 1;
    }
    Ok(counts)
}

fn provider_view(
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

impl From<KeyWithUser> for KeyView {
    fn from(k: KeyWithUser) -> Self {
        KeyView {
            active: k.key.revoked_at.is_none(),
            id: k.key.id,
            name: k.key.name,
            user: k.user_name,
            user_id: k.key.user_id,
            prefix: k.key.prefix,
            created_at: k.key.created_at.and_utc(),
            revoked_at: k.key.revoked_at.map(|t| t.and_utc()),
        }
    }
}
