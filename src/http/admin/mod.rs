//! The admin API (`/api/v1/admin/…`, admin token): providers and their limits, accounts, client
//! keys, resets and flush. Every write goes through [`crate::manage`] (the same operations as the
//! CLI) and is then applied to the running actors at once ([`QuotaSystem::reload`] keeps the
//! counters of accounts that stay).
//!
//! Bodies are read in the config file's shape **by the config file's own reader**: a provider body
//! is checked as `providers[0]` of a config, an account body as one of its `accounts` (see
//! `bodies`). So the API accepts exactly what `config.yaml` accepts (shorthands, durations, fixed
//! windows), refuses the same mistakes with the same words, and cannot drift from it; the key at
//! fault becomes `param`.
//!
//! Answers are HTTP types of their own (`dto`: `ProviderView`, `AccountView`, `KeyView`): a store
//! row is never serialised, and credentials appear only as their masked tail (`api_key_hint`).
//!
//! - `providers`, `accounts`, `keys`: the catalog's routes;
//! - `runtime`: what acts on the running runtime only (quota resets, flush).
//!
//! [`QuotaSystem::reload`]: crate::actors::QuotaSystem::reload

pub(super) mod accounts;
mod bodies;
pub(super) mod dto;
pub(super) mod keys;
pub(super) mod providers;
pub(super) mod runtime;

use actix_web::web;

use super::error::ApiError;
use super::{blocking, AppState};
use crate::store::{DbConn, StoreError};

/// The `actor` of audit rows written by this API.
pub const ACTOR: &str = "admin-api";

/// Registers the admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(providers::list_providers)
        .service(providers::create_provider)
        .service(providers::get_provider)
        .service(providers::patch_provider)
        .service(providers::delete_provider)
        .service(providers::get_provider_limits)
        .service(providers::put_provider_limits)
        .service(runtime::reset_provider)
        .service(accounts::list_accounts)
        .service(accounts::create_account)
        .service(accounts::get_account)
        .service(accounts::patch_account)
        .service(accounts::delete_account)
        .service(runtime::reset_account)
        .service(keys::list_keys)
        .service(keys::create_key)
        .service(keys::revoke_key)
        .service(runtime::flush);
}

/// Writes the catalog off the async threads, then has the running actors reload it, so the change
/// applies at once.
async fn write_catalog<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConn) -> Result<T, StoreError> + Send + 'static,
{
    let written = blocking(&state.store, f).await?;
    reload_runtime(state).await;
    Ok(written)
}

/// Has the running actors reload the catalog. A failure is logged, not returned: the write is
/// stored, and the runtime also picks the change up by itself within seconds (it polls the catalog
/// version), so answering an error would only invite a duplicate retry.
async fn reload_runtime(state: &AppState) {
    if let Err(e) = state.runtime.reload().await {
        log::error!(event = "catalog_reload_failed"; "the change is stored but not yet applied to the runtime: {e}");
    }
}
