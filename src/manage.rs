//! Management operations shared by the CLI and (later) the admin API: each one validates its input,
//! writes the store, seals credentials and leaves an audit row, so both front ends behave the same.

use chrono::{DateTime, Utc};
use diesel::Connection as _;

use crate::config::Credentials;
use crate::domain::{LimitSpec, Strategy, Tokenizer};
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
fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
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
