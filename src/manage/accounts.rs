//! Accounts: created with their key sealed under the master key (bound to the account id),
//! changed, disabled, deleted, and kept as `config.yaml` declares them. Every change leaves an
//! audit row, never with a secret.

use chrono::{DateTime, Utc};
use diesel::Connection as _;

use super::limits::limits_config;
use super::{to_i64, validate_name, Written};
use crate::config::{AccountConfig, Credentials, RateLimitsConfig};
use crate::domain::LimitSpec;
use crate::secrets::{self, MasterKey, SecretsError};
use crate::store::accounts::{self, AccountRow, AccountWithProvider};
use crate::store::audit::{self, NewAudit};
use crate::store::limits::{self, LimitOwner};
use crate::store::providers::{self, ProviderRow, Source};
use crate::store::{self, DbConn, StoreError};

/// Why provisioning disabled an account: it re-enables only what it disabled itself.
pub const REMOVED_FROM_CONFIG: &str = "removed from config";
/// Why an account the file declares inactive is off.
const DISABLED_IN_CONFIG: &str = "disabled in config";

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

/// [`create_account`] without overrides of the provider's limits (`quotagate account add`).
pub fn add_account(
    conn: &mut DbConn,
    key: &MasterKey,
    new: &NewAccount,
    source: Source,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    create_account(conn, key, new, &[], source, actor)
}

/// Creates an account with sealed credentials, an audit row and its overrides of its provider's
/// limits, in one transaction. Its name must pass [`validate_name`] and its key must not be empty.
pub fn create_account(
    conn: &mut DbConn,
    key: &MasterKey,
    new: &NewAccount,
    overrides: &[LimitSpec],
    source: Source,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    validate_name("account", &new.name)?;
    if new.credentials.api_key.is_empty() {
        return Err(StoreError::Invalid("api_key must not be empty".into()));
    }
    conn.transaction(|conn| {
        let provider = providers::find(conn, &new.provider)?;
        insert_account(conn, key, &provider, new, overrides, source, actor)
    })
}

/// The one place a new account row is made: the key sealed, the row, its `create` audit row and
/// its limit overrides. What the audit row says, and why an account created inactive is off,
/// depend on who declared it: the file says so; the API and the command line give no reason.
fn insert_account(
    conn: &mut DbConn,
    key: &MasterKey,
    provider: &ProviderRow,
    new: &NewAccount,
    overrides: &[LimitSpec],
    source: Source,
    actor: &str,
) -> Result<AccountWithProvider, StoreError> {
    let (note, inactive_reason) = match source {
        Source::Config => ("declared in config", Some(DISABLED_IN_CONFIG)),
        Source::Api => ("account created", None),
    };
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
        disabled_reason: inactive_reason.filter(|_| !new.active).map(str::to_string),
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
    audit::insert(conn, &[NewAudit::new(&row.id, actor, "create", note)])?;
    limits::replace(conn, overrides_scope(&provider.id, &row.id), overrides)?;
    Ok(AccountWithProvider {
        account: row,
        provider_name: provider.name.clone(),
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
            let scope = overrides_scope(&account.provider_id, &account.id);
            limits::replace(conn, scope, specs)?;
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

/// Records quota resets the runtime made: one `reset` audit row per account, saying why (the
/// runtime holds the counters; the store keeps the trail).
pub fn record_resets(
    conn: &mut DbConn,
    account_ids: &[impl AsRef<str>],
    actor: &str,
    reason: &str,
) -> Result<(), StoreError> {
    let rows: Vec<NewAudit> = account_ids
        .iter()
        .map(|id| NewAudit::new(id.as_ref(), actor, "reset", reason))
        .collect();
    audit::insert(conn, &rows)
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

/// Writes an account as `config.yaml` declares it in `provider`: created when the provider has no
/// account of its name; else the file wins for what it declares (quota, expiry, key, `active`)
/// and the account becomes the file's. An account the file had removed and declares again serves
/// again. Usage counters are never touched, and an unchanged declaration writes nothing but its
/// limit overrides. No [`validate_name`]: the config reader checked the declaration.
pub fn declare_account(
    conn: &mut DbConn,
    key: &MasterKey,
    provider: &ProviderRow,
    declared: &AccountConfig,
    actor: &str,
) -> Result<Written, StoreError> {
    let overrides = declared.rate_limits.specs();
    let Some(existing) = accounts::find_in_provider(conn, &provider.id, &declared.name)? else {
        let new = NewAccount {
            provider: provider.id.clone(),
            name: declared.name.clone(),
            credentials: declared.credentials.clone(),
            quota_limit: declared.quota_limit,
            expires_at: declared.expires_at,
            active: declared.active.unwrap_or(true),
        };
        insert_account(conn, key, provider, &new, &overrides, Source::Config, actor)?;
        return Ok(Written::Created);
    };
    let mut wanted = AccountRow {
        quota_limit: to_i64(declared.quota_limit),
        expires_at: declared.expires_at.map(|t| t.naive_utc()),
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
        wanted.disabled_reason = Some(DISABLED_IN_CONFIG.to_string());
    }
    let written = if wanted == existing {
        Written::Unchanged
    } else {
        wanted.updated_at = store::now();
        accounts::update(conn, &wanted)?;
        if wanted.active != existing.active {
            let action = if wanted.active { "enable" } else { "disable" };
            audit::insert(
                conn,
                &[NewAudit::new(&existing.id, actor, action, "config file")],
            )?;
        }
        Written::Updated
    };
    limits::replace(
        conn,
        overrides_scope(&provider.id, &existing.id),
        &overrides,
    )?;
    Ok(written)
}

/// Deactivates the provider's accounts of the file whose names are not in `keep` (removed from
/// it); their rows and history stay, and [`declare_account`] serves them again if they come back.
pub fn deactivate_config_accounts(
    conn: &mut DbConn,
    provider_id: &str,
    keep: &[&str],
    actor: &str,
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
                    actor,
                    "disable",
                    REMOVED_FROM_CONFIG,
                )],
            )?;
            count += 1;
        }
    }
    Ok(count)
}

/// Seals credentials for the account `account_id`; returns the sealed bytes and the masked hint.
fn seal_credentials(key: &MasterKey, account_id: &str, creds: &Credentials) -> (Vec<u8>, String) {
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

/// An account's overrides of its provider's limits, for all models.
fn overrides_scope<'a>(provider_id: &'a str, account_id: &'a str) -> LimitOwner<'a> {
    LimitOwner {
        provider_id,
        model_id: None,
        account_id: Some(account_id),
    }
}
