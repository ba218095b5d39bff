//! Every write of the catalog: providers with their models and limits, accounts with their sealed
//! credentials, client keys, and the audit rows they leave. The command line, the admin API and
//! provisioning from `config.yaml` (`crate::provision`) all write through here, so each thing is
//! written one way whoever asks:
//!
//! - `providers`: a provider from its declaration in the config file's shape: create, update,
//!   declare (the file), deactivate, delete, replace its limits;
//! - `accounts`: create (sealing the key), change, disable, delete, declare (the file), and the
//!   audit trail of the runtime's quota resets;
//! - `keys`: client keys, stored hashed: create, revoke;
//! - `limits`: limits between the domain's specs and the config file's shape.
//!
//! Names: what people create through the command line or the admin API must work in URLs and in
//! `provider/account` references ([`validate_name`]). The file's declarations were checked by the
//! config reader under the file's own rules (a model name there may hold `/`), so the `declare_…`
//! functions do not check them again.

mod accounts;
mod keys;
mod limits;
mod providers;

pub use accounts::{
    account_overrides, add_account, create_account, deactivate_config_accounts, declare_account,
    delete_account, disable_account, open_credentials, record_resets, update_account,
    AccountChanges, NewAccount, REMOVED_FROM_CONFIG,
};
pub use keys::{create_key, revoke_key, ADMIN_TOKEN_PREFIX, CLIENT_KEY_PREFIX};
pub use limits::limits_config;
pub use providers::{
    add_provider, create_provider, deactivate_provider, declare_provider, delete_provider,
    provider_declaration, set_provider_limits, update_provider, NewProvider,
};

use crate::store::StoreError;

/// What writing a declaration of the file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    /// The store already held it as declared.
    Unchanged,
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
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
