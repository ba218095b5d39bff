//! Management operations shared by the CLI and the admin API: each one validates its input,
//! writes the store, seals credentials and leaves an audit row, so both front ends behave the same.

use chrono::{DateTime, Utc};
use diesel::Connection as _;

use crate::config::{
    AuthConfig, Credentials, LimitValue, ModelConfig, Price, ProviderConfig, RateLimitsConfig,
    WindowConfig,
};
use crate::domain::{LimitKind, LimitSpec, NamedLimit, Strategy, Tokenizer};
use crate::secrets::{self, MasterKey, Secret, SecretsError};
use crate::store::accounts::{self, AccountRow, AccountWithProvider};
use crate::store::audit::{self, NewAudit};
use crate::store::keys::{self, KeyWithUser};
use crate::store::limits::{self, LimitOwner};
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, StoreError};

/// Prefix of client keys, so that they are recognisable in configs and leak scanners.
pub const CLIENT_KEY_PREFIX: &str = "qg_";
/// Prefix of the admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "qga_";

/// A provider to create (from the CLI or the API).
#[derive(Debug, Clone)]
pub struct NewProvider {
    pub name: String,
    pub base_url: String,
    pub strategy: Strategy,
    pub auth_header: String,
    pub auth_scheme: String,
    pub timeout_ms: Option<u64>,
    pub max_completion_tokens: u64,
    pub tokenizer: Tokenizer,
    /// Model names with their prices (input, output) per million tokens.
    pub models: Vec<(String, f64, f64)>,
    pub limits: Vec<LimitSpec>,
}

pub fn add_provider(
    conn: &mut DbConn,
    new: &NewProvider,
    source: Source,
) -> Result<ProviderRow, StoreError> {
    validate_name("provider", &new.name)?;
    if !(new.base_url.starts_with("http://") || new.base_url.starts_with("https://")) {
        return Err(StoreError::Invalid(format!(
            "base_url `{}` must start with http:// or https://",
            new.base_url
        )));
    }
    let now = store::now();
    let row = ProviderRow {
        id: store::new_id(),
        name: new.name.clone(),
        base_url: new.base_url.trim_end_matches('/').to_string(),
        strategy: new.strategy.as_str().to_string(),
        auth_header: new.auth_header.clone(),
        auth_scheme: new.auth_scheme.clone(),
        timeout_ms: new.timeout_ms.map(to_i64),
        max_completion_tokens: to_i64(new.max_completion_tokens),
        tokenizer: new.tokenizer.to_string(),
        ratelimit_headers: None,
        active: true,
        source: source.as_str().to_string(),
        created_at: now,
        updated_at: now,
    };
    conn.transaction(|conn| {
        providers::insert(conn, &row)?;
        for (model, input, output) in &new.models {
            validate_name("model", model)?;
            providers::upsert_model(conn, &row.id, model, *input, *output)?;
        }
        let owner = LimitOwner {
            provider_id: &row.id,
            model_id: None,
            account_id: None,
        };
        limits::replace(conn, owner, &new.limits)
    })?;
    Ok(row)
}

/// An account to create.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The provider's id or name.
    pub provider: String,
    pub name: String,
    pub credentials: Credentials,
    pub quota_limit: u64,
    pub expires_at: Option<DateTime<Utc>>,
    pub active: bool,
}

/// Creates an account with sealed credentials and an audit row.
pub fn add_account(
    conn: &mut DbConn,
    key: &MasterKey,
    new: &NewAccount,
    source: Source,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    validate_name("account", &new.name)?;
    if new.credentials.api_key.is_empty() {
        return Err(StoreError::Invalid("api_key must not be empty".into()));
    }
    conn.transaction(|conn| {
        let provider = providers::find(conn, &new.provider)?;
        let now = store::now();
        let id = store::new_id();
        let (sealed, hint) = seal_credentials(key, &id, &new.credentials);
        let row = AccountRow {
            id,
            provider_id: provider.id.clone(),
            user_id: None,
            name: new.name.clone(),
            credentials: sealed,
            credentials_hint: hint,
            active: new.active,
            disabled_reason: None,
            quota_limit: to_i64(new.quota_limit),
            quota_used: 0,
            last_reset: now,
            expires_at: new.expires_at.map(|t| t.naive_utc()),
            source: source.as_str().to_string(),
            created_at: now,
            updated_at: now,
        };
        accounts::insert(conn, &row).map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("account `{}/{}`", provider.name, row.name))
            }
            other => other,
        })?;
        audit::insert(
            conn,
            &[NewAudit::new(&row.id, actor, "create", "account created")],
        )?;
        Ok(AccountWithProvider {
            account: row,
            provider_name: provider.name,
        })
    })
}

/// Disables an account (by id, `provider/name` or unique name) and records why.
pub fn disable_account(
    conn: &mut DbConn,
    reference: &str,
    actor: &str,
    reason: &str,
) -> Result<AccountWithProvider, StoreError> {
    conn.transaction(|conn| {
        let mut found = accounts::find(conn, reference)?;
        accounts::set_active(conn, &found.account.id, false, Some(reason))?;
        audit::insert(
            conn,
            &[NewAudit::new(&found.account.id, actor, "disable", reason)],
        )?;
        found.account.active = false;
        found.account.disabled_reason = Some(reason.to_string());
        Ok(found)
    })
}

/// Creates a client key for `user` (created when absent); the plain key is returned once and only
/// its hash is stored.
pub fn create_key(
    conn: &mut DbConn,
    name: &str,
    user: &str,
) -> Result<(KeyWithUser, Secret), StoreError> {
    validate_name("key", name)?;
    validate_name("user", user)?;
    let token = secrets::generate_token(CLIENT_KEY_PREFIX);
    let prefix: String = token
        .expose()
        .chars()
        .take(CLIENT_KEY_PREFIX.len() + 6)
        .collect();
    let created = keys::create(
        conn,
        name,
        user,
        &secrets::hash_token(token.expose()),
        &prefix,
    )?;
    Ok((created, token))
}

/// Seals credentials for the account `account_id`; returns the sealed bytes and the masked hint.
pub fn seal_credentials(
    key: &MasterKey,
    account_id: &str,
    creds: &Credentials,
) -> (Vec<u8>, String) {
    let plain = creds.to_plain_json();
    let sealed = key.seal(plain.as_bytes(), account_id.as_bytes());
    (sealed, secrets::mask(creds.api_key.expose()))
}

/// Opens an account's credentials (in memory only).
pub fn open_credentials(
    key: &MasterKey,
    account: &AccountRow,
) -> Result<Credentials, SecretsError> {
    let plain = key.open(&account.credentials, account.id.as_bytes())?;
    let text = String::from_utf8(plain).map_err(|_| SecretsError::Decrypt)?;
    Credentials::from_plain_json(&text).map_err(|_| SecretsError::Decrypt)
}

/// Names are used in URLs and in `provider/account` references: no `/`, no surrounding spaces.
pub fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.trim().is_empty() || name.trim() != name || name.contains('/') {
        return Err(StoreError::Invalid(format!(
            "{what} name `{name}` must be non-empty, without `/` or surrounding spaces"
        )));
    }
    Ok(())
}

/// Counters and limits are `u64` in the domain and `BIGINT` in the store.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

// ------------------------------------------------------------------------------------------------
// Providers as declared (the config file's shape), for the admin API
// ------------------------------------------------------------------------------------------------

/// Creates a provider from a declaration in the config file's shape (its `accounts` are ignored:
/// accounts are created one by one). Models, per-model limits and provider-wide limits are written
/// in the same transaction.
pub fn create_provider(
    conn: &mut DbConn,
    declared: &ProviderConfig,
    source: Source,
) -> Result<ProviderRow, StoreError> {
    let now = store::now();
    let row = provider_row(declared, store::new_id(), true, source.as_str(), now, now);
    conn.transaction(|conn| {
        providers::insert(conn, &row)?;
        write_provider_parts(conn, &row.id, declared)?;
        Ok(row)
    })
}

/// Replaces every declared field of the provider `id` (its models and provider-wide limits too);
/// `active` `None` keeps the current flag. Accounts and their counters are not touched.
pub fn update_provider(
    conn: &mut DbConn,
    id: &str,
    declared: &ProviderConfig,
    active: Option<bool>,
) -> Result<ProviderRow, StoreError> {
    conn.transaction(|conn| {
        let existing = providers::find(conn, id)?;
        let row = provider_row(
            declared,
            existing.id.clone(),
            active.unwrap_or(existing.active),
            &existing.source,
            existing.created_at,
            store::now(),
        );
        providers::update(conn, &row)?;
        write_provider_parts(conn, &row.id, declared)?;
        Ok(row)
    })
}

/// Deletes a provider (by id or name) with its models, limits and accounts; every deleted account
/// leaves an audit row. Request history is kept.
pub fn delete_provider(
    conn: &mut DbConn,
    reference: &str,
    actor: &str,
) -> Result<ProviderRow, StoreError> {
    conn.transaction(|conn| {
        let provider = providers::find(conn, reference)?;
        let rows: Vec<NewAudit> = accounts::list(conn, Some(&provider.id))?
            .iter()
            .map(|a| {
                NewAudit::new(
                    &a.account.id,
                    actor,
                    "delete",
                    format!("provider `{}` deleted", provider.name),
                )
            })
            .collect();
        audit::insert(conn, &rows)?;
        providers::delete(conn, &provider.id)?;
        Ok(provider)
    })
}

/// Replaces the provider-wide limits of a provider (by id or name).
pub fn set_provider_limits(
    conn: &mut DbConn,
    reference: &str,
    specs: &[LimitSpec],
) -> Result<ProviderRow, StoreError> {
    conn.transaction(|conn| {
        let provider = providers::find(conn, reference)?;
        limits::replace(
            conn,
            LimitOwner {
                provider_id: &provider.id,
                model_id: None,
                account_id: None,
            },
            specs,
        )?;
        Ok(provider)
    })
}

/// A stored provider in the config file's shape (without accounts): what the admin API shows and
/// what a partial update is merged into.
pub fn provider_declaration(
    conn: &mut DbConn,
    row: &ProviderRow,
) -> Result<ProviderConfig, StoreError> {
    let limit_rows = limits::list_for_provider(conn, &row.id)?;
    let specs_of = |model_id: Option<&str>| -> Result<Vec<LimitSpec>, StoreError> {
        limit_rows
            .iter()
            .filter(|r| r.account_id.is_none() && r.model_id.as_deref() == model_id)
            .map(|r| r.spec())
            .collect()
    };
    let models = providers::list_models(conn, &row.id)?
        .into_iter()
        .map(|m| {
            Ok(ModelConfig {
                rate_limits: limits_config(&specs_of(Some(&m.id))?),
                price: Price {
                    input: m.price_input,
                    output: m.price_output,
                },
                name: m.name,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ProviderConfig {
        name: row.name.clone(),
        base_url: row.base_url.clone(),
        strategy: row.strategy.parse().unwrap_or_default(),
        auth: AuthConfig {
            header: row.auth_header.clone(),
            scheme: row.auth_scheme.clone(),
        },
        timeout: row
            .timeout_ms
            .map(|ms| std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        max_completion_tokens: u64::try_from(row.max_completion_tokens).unwrap_or(0),
        tokenizer: row.tokenizer.parse().unwrap_or_default(),
        ratelimit_headers: row
            .ratelimit_headers
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok()),
        rate_limits: limits_config(&specs_of(None)?),
        models,
        accounts: Vec::new(),
    })
}

/// The account's own overrides of its provider's limits (all models).
pub fn account_overrides(
    conn: &mut DbConn,
    account: &AccountRow,
) -> Result<RateLimitsConfig, StoreError> {
    let specs = limits::list_for_provider(conn, &account.provider_id)?
        .iter()
        .filter(|r| r.account_id.as_deref() == Some(&account.id) && r.model_id.is_none())
        .map(|r| r.spec())
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(limits_config(&specs))
}

/// Domain limits back in the config file's shape: a window of a named length (`rpm` …) under its
/// name, `concurrent`, and every other window under `windows`. The inverse of
/// [`RateLimitsConfig::specs`].
pub fn limits_config(specs: &[LimitSpec]) -> RateLimitsConfig {
    let mut config = RateLimitsConfig::default();
    for spec in specs {
        if spec.kind == LimitKind::Concurrent {
            config.concurrent = Some(spec.limit);
            continue;
        }
        let value = match &spec.reset {
            None => LimitValue::Plain(spec.limit),
            Some(reset) => LimitValue::Detailed {
                limit: spec.limit,
                reset: Some(reset.cron.clone()),
                timezone: Some(reset.timezone.clone()),
            },
        };
        let named = NamedLimit::ALL
            .into_iter()
            .find(|n| n.kind() == spec.kind && n.per().is_some() && n.per() == spec.per);
        let slot = match named {
            Some(NamedLimit::Rpm) => &mut config.rpm,
            Some(NamedLimit::Rph) => &mut config.rph,
            Some(NamedLimit::Rpd) => &mut config.rpd,
            Some(NamedLimit::Tpm) => &mut config.tpm,
            Some(NamedLimit::Tpd) => &mut config.tpd,
            _ => {
                config.windows.push(window_config(spec));
                continue;
            }
        };
        if slot.is_none() {
            *slot = Some(value);
        } else {
            config.windows.push(window_config(spec));
        }
    }
    config
}

fn window_config(spec: &LimitSpec) -> WindowConfig {
    WindowConfig {
        kind: spec.kind,
        limit: spec.limit,
        per: spec.per.unwrap_or_default(),
        reset: spec.reset.as_ref().map(|r| r.cron.clone()),
        timezone: spec.reset.as_ref().map(|r| r.timezone.clone()),
    }
}

fn provider_row(
    declared: &ProviderConfig,
    id: String,
    active: bool,
    source: &str,
    created_at: chrono::NaiveDateTime,
    updated_at: chrono::NaiveDateTime,
) -> ProviderRow {
    ProviderRow {
        id,
        name: declared.name.clone(),
        base_url: declared.base_url.trim_end_matches('/').to_string(),
        strategy: declared.strategy.as_str().to_string(),
        auth_header: declared.auth.header.clone(),
        auth_scheme: declared.auth.scheme.clone(),
        timeout_ms: declared
            .timeout
            .map(|t| to_i64(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))),
        max_completion_tokens: to_i64(declared.max_completion_tokens),
        tokenizer: declared.tokenizer.to_string(),
        ratelimit_headers: declared
            .ratelimit_headers
            .as_ref()
            .map(|h| serde_json::to_string(h).expect("a header mapping serialises")),
        active,
        source: source.to_string(),
        created_at,
        updated_at,
    }
}

/// Models (with their limits) and provider-wide limits of a declaration.
fn write_provider_parts(
    conn: &mut DbConn,
    provider_id: &str,
    declared: &ProviderConfig,
) -> Result<(), StoreError> {
    validate_name("provider", &declared.name)?;
    let scope = LimitOwner {
        provider_id,
        model_id: None,
        account_id: None,
    };
    limits::replace(conn, scope, &declared.rate_limits.specs())?;
    let names: Vec<&str> = declared.models.iter().map(|m| m.name.as_str()).collect();
    providers::delete_models_except(conn, provider_id, &names)?;
    for model in &declared.models {
        validate_name("model", &model.name)?;
        let row = providers::upsert_model(
            conn,
            provider_id,
            &model.name,
            model.price.input,
            model.price.output,
        )?;
        let model_scope = LimitOwner {
            model_id: Some(&row.id),
            ..scope
        };
        limits::replace(conn, model_scope, &model.rate_limits.specs())?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Accounts: create with overrides, change, delete
// ------------------------------------------------------------------------------------------------

/// [`add_account`] plus the account's overrides of its provider's limits, in one transaction.
pub fn create_account(
    conn: &mut DbConn,
    key: &MasterKey,
    new: &NewAccount,
    overrides: &[LimitSpec],
    source: Source,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    conn.transaction(|conn| {
        let created = add_account(conn, key, new, source, actor)?;
        limits::replace(
            conn,
            LimitOwner {
                provider_id: &created.account.provider_id,
                model_id: None,
                account_id: Some(&created.account.id),
            },
            overrides,
        )?;
        Ok(created)
    })
}

/// What a partial update of an account changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AccountChanges {
    pub active: Option<bool>,
    pub quota_limit: Option<u64>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub credentials: Option<Credentials>,
    /// Replaces the account's overrides of its provider's limits.
    pub rate_limits: Option<Vec<LimitSpec>>,
}

/// The columns a partial update writes. Usage counters (`quota_used`, `last_reset`) are left out
/// on purpose: the sync writes them concurrently, and a full-row write could put back an older
/// value.
#[derive(diesel::AsChangeset)]
#[diesel(table_name = crate::store::schema::accounts, treat_none_as_null = true)]
struct AccountSettings<'a> {
    active: bool,
    disabled_reason: Option<&'a str>,
    quota_limit: i64,
    expires_at: Option<chrono::NaiveDateTime>,
    credentials: &'a [u8],
    credentials_hint: &'a str,
    updated_at: chrono::NaiveDateTime,
}

/// Applies `changes` to an account (by id, `provider/name` or unique name); leaves one audit row
/// for the change (never with secrets) and one more when it is enabled or disabled.
pub fn update_account(
    conn: &mut DbConn,
    key: &MasterKey,
    reference: &str,
    changes: &AccountChanges,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    use crate::store::schema::accounts as table;
    use diesel::prelude::*;

    conn.transaction(|conn| {
        let mut found = accounts::find(conn, reference)?;
        let before = found.account.clone();
        let account = &mut found.account;
        let mut details = serde_json::Map::new();
        if let Some(limit) = changes.quota_limit {
            account.quota_limit = to_i64(limit);
            details.insert("quota_limit".into(), limit.into());
        }
        if let Some(expires_at) = changes.expires_at {
            account.expires_at = expires_at.map(|t| t.naive_utc());
            details.insert(
                "expires_at".into(),
                expires_at.map(|t| t.to_rfc3339()).into(),
            );
        }
        if let Some(credentials) = &changes.credentials {
            let (sealed, hint) = seal_credentials(key, &account.id, credentials);
            account.credentials = sealed;
            account.credentials_hint = hint;
            details.insert("credentials".into(), "replaced".into());
        }
        if let Some(active) = changes.active {
            account.active = active;
            account.disabled_reason = if active {
                None
            } else if before.active {
                Some(format!("disabled by {actor}"))
            } else {
                before.disabled_reason.clone()
            };
            details.insert("active".into(), active.into());
        }
        if let Some(specs) = &changes.rate_limits {
            limits::replace(
                conn,
                LimitOwner {
                    provider_id: &account.provider_id,
                    model_id: None,
                    account_id: Some(&account.id),
                },
                specs,
            )?;
            details.insert(
                "rate_limits".into(),
                serde_json::to_value(limits_config(specs)).unwrap_or_default(),
            );
        }
        account.updated_at = store::now();
        diesel::update(table::table.find(&account.id))
            .set(AccountSettings {
                active: account.active,
                disabled_reason: account.disabled_reason.as_deref(),
                quota_limit: account.quota_limit,
                expires_at: account.expires_at,
                credentials: &account.credentials,
                credentials_hint: &account.credentials_hint,
                updated_at: account.updated_at,
            })
            .execute(conn)?;
        store::settings::bump_catalog(conn)?;

        let mut rows = Vec::new();
        if !details.is_empty() {
            let fields: Vec<&str> = details.keys().map(String::as_str).collect();
            let mut row = NewAudit::new(
                &account.id,
                actor,
                "update",
                format!("changed {}", fields.join(", ")),
            );
            row.details = Some(serde_json::Value::Object(details.clone()).to_string());
            rows.push(row);
        }
        if account.active != before.active {
            let action = if account.active { "enable" } else { "disable" };
            rows.push(NewAudit::new(&account.id, actor, action, actor));
        }
        audit::insert(conn, &rows)?;
        Ok(found)
    })
}

/// Deletes an account (by id, `provider/name` or unique name); its audit trail and request
/// history are kept.
pub fn delete_account(
    conn: &mut DbConn,
    reference: &str,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    conn.transaction(|conn| {
        let found = accounts::find(conn, reference)?;
        audit::insert(
            conn,
            &[NewAudit::new(
                &found.account.id,
                actor,
                "delete",
                "account deleted",
            )],
        )?;
        accounts::delete(conn, &found.account.id)?;
        Ok(found)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_back_in_the_config_shape_are_the_limits_written() {
        let yaml = r#"
            rpm: 30
            rpd: { limit: 1000, reset: "0 0 * * *", timezone: America/Los_Angeles }
            tpm: 6000
            concurrent: 4
            windows:
              - { kind: requests, limit: 5, per: 2s }
              - { kind: tokens, limit: 900, per: 1h, reset: "0 * * * *", timezone: UTC }
        "#;
        let config: RateLimitsConfig = yaml_serde::from_str(yaml).unwrap();
        let back = limits_config(&config.specs());
        assert_eq!(back, config);
        assert_eq!(back.specs(), config.specs());
    }

    #[test]
    fn a_second_window_of_a_named_length_is_kept_as_a_window() {
        let minute = Some(std::time::Duration::from_secs(60));
        let specs = [
            LimitSpec {
                kind: LimitKind::Requests,
                limit: 30,
                per: minute,
                reset: None,
            },
            LimitSpec {
                kind: LimitKind::Requests,
                limit: 20,
                per: minute,
                reset: Some(crate::domain::FixedReset {
                    cron: "* * * * *".into(),
                    timezone: "UTC".into(),
                }),
            },
        ];
        let config = limits_config(&specs);
        assert_eq!(config.rpm, Some(LimitValue::Plain(30)));
        assert_eq!(config.windows.len(), 1);
        assert_eq!(config.specs(), specs);
    }
}
