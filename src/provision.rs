//! Declarative providers: the providers, models, limits and accounts of `config.yaml` are upserted
//! at start, idempotently.
//!
//! Precedence (API.md): the file wins for what it declares; an account removed from the file is
//! deactivated, not deleted; providers and accounts created through the API or the CLI are left
//! alone; usage counters (`quota_used`, `last_reset`) are never touched here.

use diesel::Connection as _;

use crate::config::ProviderConfig;
use crate::manage::{self, Written};
use crate::secrets::MasterKey;
use crate::store::providers::{self, Source};
use crate::store::{DbConn, StoreError};

/// The `actor` of the audit rows provisioning leaves.
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
                manage::deactivate_provider(conn, &row)?;
                report.providers_deactivated += 1;
                report.accounts_deactivated +=
                    manage::deactivate_config_accounts(conn, &row.id, &[], ACTOR)?;
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
    let (provider, written) = manage::declare_provider(conn, declared)?;
    match written {
        Written::Created => report.providers_created += 1,
        Written::Updated => report.providers_updated += 1,
        Written::Unchanged => {}
    }
    for account in &declared.accounts {
        match manage::declare_account(conn, key, &provider, account, ACTOR)? {
            Written::Created => report.accounts_created += 1,
            Written::Updated => report.accounts_updated += 1,
            Written::Unchanged => {}
        }
    }
    let names: Vec<&str> = declared.accounts.iter().map(|a| a.name.as_str()).collect();
    report.accounts_deactivated +=
        manage::deactivate_config_accounts(conn, &provider.id, &names, ACTOR)?;
    Ok(())
}
