//! Declarative providers: the providers, models, limits and accounts of `config.yaml` are upserted
//! at start, idempotently.
//!
//! Precedence (API.md): the file wins for what it declares; an account removed from the file is
//! deactivated, not deleted; providers and accounts created through the API or the CLI are left
//! alone; usage counters (`quota_used`, `last_reset`) are never touched here.

use diesel::Connection as _;

use crate::config::{AccountConfig, ProviderConfig};
use crate::manage::{open_credentials, seal_credentials, to_i64};
use crate::secrets::MasterKey;
use crate::store::accounts::{self, AccountRow};
use crate::store::audit::{self, NewAudit};
use crate::store::limits::{self, LimitOwner};
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, StoreError};

/// Why the provisioner disabled an account: it re-enables only what it disabled itself.
pub const REMOVED_FROM_CONFIG: &str = "removed from config";
const ACTOR: &str = "config";

/// What one run changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub providers_created: usize,
    pub providers_updated: usize,
    pub providers_deactivated: usize,
    pub accounts_created: usize,
    pub accounts_updated: usize,
    pub accounts_deactivated: usize,
}

/// Applies the file's providers in one transaction.
pub fn apply(
    conn: &mut DbConn,
    key: &MasterKey,
    declared: &[ProviderConfig],
) -> Result<Report, StoreError> {
    conn.transaction(|conn| {
        let mut report = Report::default();
        for provider in declared {
            apply_provider(conn, key, provider, &mut report)?;
        }
        // Config providers that left the file stop serving; their rows and history stay.
        for row in providers::list(conn)? {
            let still_declared = declared.iter().any(|p| p.name == row.name);
            if row.source == Source::Config.as_str() && !still_declared && row.active {
                providers::update(
                    conn,
                    &ProviderRow {
                        active: false,
                        updated_at: store::now(),
                        ..row.clone()
                    },
                )?;
                report.providers_deactivated += 1;
                report.accounts_deactivated += deactivate_config_accounts(conn, &row.id, &[])?;
            }
        }
        Ok(report)
    })
}

fn apply_provider(
    conn: &mut DbConn,
    key: &MasterKey,
    declared: &ProviderConfig,
    report: &mut Report,
) -> Result<(), StoreError> {
    let now = store::now();
    let ratelimit_headers = declared
        .ratelimit_headers
        .as_ref()
        .map(|h| serde_json::to_string(h).expect("header mapping serialises"));
    let fields = |id: String, created_at| ProviderRow {
        id,
        name: declared.name.clone(),
        base_url: declared.base_url.trim_end_matches('/').to_string(),
        strategy: declared.strategy.as_str().to_string(),
        auth_header: declared.auth.header.clone(),
        auth_scheme: declared.auth.scheme.clone(),
        timeout_ms: declared.timeout.map(|t| to_i64(t.as_millis() as u64)),
        max_completion_tokens: to_i64(declared.max_completion_tokens),
        tokenizer: declared.tokenizer.to_string(),
        ratelimit_headers: ratelimit_headers.clone(),
        active: true,
        source: Source::Config.as_str().to_string(),
        created_at,
        updated_at: now,
    };
    let provider = match providers::find_by_name(conn, &declared.name)? {
        Some(existing) => {
            let wanted = fields(existing.id.clone(), existing.created_at);
            if !same_provider(&existing, &wanted) {
                providers::update(conn, &wanted)?;
                report.providers_updated += 1;
            }
            wanted
        }
        None => {
            let row = fields(store::new_id(), now);
            providers::insert(conn, &row)?;
            report.providers_created += 1;
            row
        }
    };

    let provider_scope = LimitOwner {
        provider_id: &provider.id,
        model_id: None,
        account_id: None,
    };
    limits::replace(conn, provider_scope, &declared.rate_limits.specs())?;

    let model_names: Vec<&str> = declared.models.iter().map(|m| m.name.as_str()).collect();
    providers::delete_models_except(conn, &provider.id, &model_names)?;
    for model in &declared.models {
        let row = providers::upsert_model(
            conn,
            &provider.id,
            &model.name,
            model.price.input,
            model.price.output,
        )?;
        let model_scope = LimitOwner {
            model_id: Some(&row.id),
            ..provider_scope
        };
        limits::replace(conn, model_scope, &model.rate_limits.specs())?;
    }

    for account in &declared.accounts {
        apply_account(conn, key, &provider, account, report)?;
    }
    let names: Vec<&str> = declared.accounts.iter().map(|a| a.name.as_str()).collect();
    report.accounts_deactivated += deactivate_config_accounts(conn, &provider.id, &names)?;
    Ok(())
}

fn apply_account(
    conn: &mut DbConn,
    key: &MasterKey,
    provider: &ProviderRow,
    declared: &AccountConfig,
    report: &mut Report,
) -> Result<(), StoreError> {
    let now = store::now();
    let expires_at = declared.expires_at.map(|t| t.naive_utc());
    let account_id = match accounts::find_in_provider(conn, &provider.id, &declared.name)? {
        Some(existing) => {
            let mut wanted = AccountRow {
                quota_limit: to_i64(declared.quota_limit),
                expires_at,
                source: Source::Config.as_str().to_string(),
                ..existing.clone()
            };
            // Re-seal only when the key really changed, so an unchanged file writes nothing.
            let same_credentials = open_credentials(key, &existing)
                .map(|current| current == declared.credentials)
                .unwrap_or(false);
            if !same_credentials {
                let (sealed, hint) = seal_credentials(key, &existing.id, &declared.credentials);
                wanted.credentials = sealed;
                wanted.credentials_hint = hint;
            }
            match declared.active {
                Some(active) => wanted.active = active,
                // Back in the file after being removed: serve again.
                None if existing.disabled_reason.as_deref() == Some(REMOVED_FROM_CONFIG) => {
                    wanted.active = true;
                }
                None => {}
            }
            if wanted.active {
                wanted.disabled_reason = None;
            } else if existing.active {
                wanted.disabled_reason = Some("disabled in config".to_string());
            }
            if wanted != existing {
                wanted.updated_at = now;
                accounts::update(conn, &wanted)?;
                if wanted.active != existing.active {
                    let action = if wanted.active { "enable" } else { "disable" };
                    audit::insert(
                        conn,
                        &[NewAudit::new(&existing.id, ACTOR, action, "config file")],
                    )?;
                }
                report.accounts_updated += 1;
            }
            existing.id
        }
        None => {
            let id = store::new_id();
            let (sealed, hint) = seal_credentials(key, &id, &declared.credentials);
            let active = declared.active.unwrap_or(true);
            let row = AccountRow {
                id: id.clone(),
                provider_id: provider.id.clone(),
                user_id: None,
                name: declared.name.clone(),
                credentials: sealed,
                credentials_hint: hint,
                active,
                disabled_reason: (!active).then(|| "disabled in config".to_string()),
                quota_limit: to_i64(declared.quota_limit),
                quota_used: 0,
                last_reset: now,
                expires_at,
                source: Source::Config.as_str().to_string(),
                created_at: now,
                updated_at: now,
            };
            accounts::insert(conn, &row)?;
            audit::insert(
                conn,
                &[NewAudit::new(&id, ACTOR, "create", "declared in config")],
            )?;
            report.accounts_created += 1;
            id
        }
    };
    let override_scope = LimitOwner {
        provider_id: &provider.id,
        model_id: None,
        account_id: Some(&account_id),
    };
    limits::replace(conn, override_scope, &declared.rate_limits.specs())
}

/// Deactivates the provider's config-sourced accounts whose names are not in `keep`.
fn deactivate_config_accounts(
    conn: &mut DbConn,
    provider_id: &str,
    keep: &[&str],
) -> Result<usize, StoreError> {
    let mut count = 0;
    for found in accounts::list(conn, Some(provider_id))? {
        let account = found.account;
        let declared = keep.contains(&account.name.as_str());
        if account.source == Source::Config.as_str() && !declared && account.active {
            accounts::set_active(conn, &account.id, false, Some(REMOVED_FROM_CONFIG))?;
            audit::insert(
                conn,
                &[NewAudit::new(
                    &account.id,
                    ACTOR,
                    "disable",
                    REMOVED_FROM_CONFIG,
                )],
            )?;
            count += 1;
        }
    }
    Ok(count)
}

/// Whether two rows differ only in their `updated_at`.
fn same_provider(a: &ProviderRow, b: &ProviderRow) -> bool {
    ProviderRow {
        updated_at: a.updated_at,
        ..b.clone()
    } == *a
}
