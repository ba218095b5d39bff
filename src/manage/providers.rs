//! Providers, written from a declaration in the config file's shape ([`ProviderConfig`]): the row,
//! its models with their limits, and its provider-wide limits, in one transaction. The command
//! line's short form ([`NewProvider`]), the admin API's bodies and `config.yaml` all become such a
//! declaration first, so a provider is written one way whoever declares it.

use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::Connection as _;

use super::limits::limits_config;
use super::{to_i64, validate_name, Written};
use crate::config::{AuthConfig, ModelConfig, Price, ProviderConfig};
use crate::domain::{LimitSpec, Strategy, Tokenizer};
use crate::store::accounts;
use crate::store::audit::{self, NewAudit};
use crate::store::limits::{self, LimitOwner};
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, StoreError};

/// A provider as `quotagate provider add` gives it: the command line's short form of a
/// declaration (see [`NewProvider::declaration`]).
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

impl NewProvider {
    /// The same provider as a declaration in the config file's shape: its models without limits
    /// of their own, its limits as the provider's.
    pub fn declaration(&self) -> ProviderConfig {
        ProviderConfig {
            name: self.name.clone(),
            base_url: self.base_url.clone(),
            strategy: self.strategy,
            auth: AuthConfig {
                header: self.auth_header.clone(),
                scheme: self.auth_scheme.clone(),
            },
            timeout: self.timeout_ms.map(Duration::from_millis),
            max_completion_tokens: self.max_completion_tokens,
            tokenizer: self.tokenizer,
            ratelimit_headers: None,
            rate_limits: limits_config(&self.limits),
            models: self
                .models
                .iter()
                .map(|(name, input, output)| ModelConfig {
                    name: name.clone(),
                    price: Price {
                        input: *input,
                        output: *output,
                    },
                    rate_limits: Default::default(),
                })
                .collect(),
            accounts: Vec::new(),
        }
    }
}

/// Creates a provider given on the command line: its base URL must be an HTTP one (the config
/// reader checks that of a declaration), then as [`create_provider`].
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
    create_provider(conn, &new.declaration(), source)
}

/// Creates a provider from a declaration in the config file's shape (its `accounts` are ignored:
/// accounts are created one by one). Models, per-model limits and provider-wide limits are written
/// in the same transaction; the provider's and its models' names must pass [`validate_name`].
pub fn create_provider(
    conn: &mut DbConn,
    declared: &ProviderConfig,
    source: Source,
) -> Result<ProviderRow, StoreError> {
    let now = store::now();
    let row = provider_row(declared, store::new_id(), true, source.as_str(), now, now);
    conn.transaction(|conn| {
        providers::insert(conn, &row)?;
        validate_names(declared)?;
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
        validate_names(declared)?;
        write_provider_parts(conn, &row.id, declared)?;
        Ok(row)
    })
}

/// Writes a provider as `config.yaml` declares it: created when no provider has its name, else
/// its declared fields replaced, made active and marked as the file's (the file wins). The row is
/// written only when a field changed, so an unchanged file writes no row; models and limits are
/// replaced in any case.
///
/// No [`validate_name`] here: the config reader checked the declaration under the file's own
/// rules (a model name there may hold `/`).
pub fn declare_provider(
    conn: &mut DbConn,
    declared: &ProviderConfig,
) -> Result<(ProviderRow, Written), StoreError> {
    let now = store::now();
    let source = Source::Config.as_str();
    let (row, written) = match providers::find_by_name(conn, &declared.name)? {
        Some(existing) => {
            let wanted = provider_row(
                declared,
                existing.id.clone(),
                true,
                source,
                existing.created_at,
                now,
            );
            if same_provider(&existing, &wanted) {
                (existing, Written::Unchanged)
            } else {
                providers::update(conn, &wanted)?;
                (wanted, Written::Updated)
            }
        }
        None => {
            let row = provider_row(declared, store::new_id(), true, source, now, now);
            providers::insert(conn, &row)?;
            (row, Written::Created)
        }
    };
    write_provider_parts(conn, &row.id, declared)?;
    Ok((row, written))
}

/// Stops routing to a provider (its rows and history stay): a provider of the file that left it.
pub fn deactivate_provider(conn: &mut DbConn, row: &ProviderRow) -> Result<(), StoreError> {
    providers::update(
        conn,
        &ProviderRow {
            active: false,
            updated_at: store::now(),
            ..row.clone()
        },
    )
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
        limits::replace(conn, provider_scope(&provider.id), specs)?;
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
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
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

/// The row a declaration makes, with the identity and state given.
fn provider_row(
    declared: &ProviderConfig,
    id: String,
    active: bool,
    source: &str,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
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

/// Whether two rows differ only in their `updated_at`.
fn same_provider(a: &ProviderRow, b: &ProviderRow) -> bool {
    ProviderRow {
        updated_at: a.updated_at,
        ..b.clone()
    } == *a
}

/// The names people give must work in URLs and references (see [`validate_name`]).
fn validate_names(declared: &ProviderConfig) -> Result<(), StoreError> {
    validate_name("provider", &declared.name)?;
    declared
        .models
        .iter()
        .try_for_each(|model| validate_name("model", &model.name))
}

/// The provider-wide limits of a provider (no model, no account).
fn provider_scope(provider_id: &str) -> LimitOwner<'_> {
    LimitOwner {
        provider_id,
        model_id: None,
        account_id: None,
    }
}

/// Models (with their limits) and provider-wide limits of a declaration; models it no longer
/// lists are deleted with their limits.
fn write_provider_parts(
    conn: &mut DbConn,
    provider_id: &str,
    declared: &ProviderConfig,
) -> Result<(), StoreError> {
    let scope = provider_scope(provider_id);
    limits::replace(conn, scope, &declared.rate_limits.specs())?;
    let names: Vec<&str> = declared.models.iter().map(|m| m.name.as_str()).collect();
    providers::delete_models_except(conn, provider_id, &names)?;
    for model in &declared.models {
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
