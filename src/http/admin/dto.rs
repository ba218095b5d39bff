//! The admin API's HTTP types: the answers (views built from store rows, never the rows
//! themselves), and the bodies' shapes for the OpenAPI document (the bodies are read by the config
//! file's reader, see `super::bodies`, so these types only document them).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::config::{AuthConfig, RateLimitHeaders, RateLimitsConfig};
use crate::http::stats::dto::QuotaView;
use crate::store::keys::KeyWithUser;

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
    /// Account states written to the database (with Redis, the ledgers there are the live state
    /// already).
    pub accounts: usize,
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
    pub name: String,
    /// The user the key belongs to (created when new); default: the key's name.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AccountFilter {
    /// Only the accounts of this provider (name or id).
    pub provider: Option<String>,
}
