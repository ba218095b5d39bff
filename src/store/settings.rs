//! Small named values: the admin token's hash, the clean-shutdown mark, the heartbeat.

use diesel::prelude::*;

use super::schema::settings;
use super::{DbConn, StoreError};

/// The SHA-256 of the generated admin token (absent when the token is configured).
pub const ADMIN_TOKEN_HASH: &str = "admin_token_hash";

/// Changes with every write to providers, models, limits or accounts, so that a running server
/// notices what another process (the CLI) changed and reloads.
pub const CATALOG_VERSION: &str = "catalog_version";

/// ms since the epoch of the last completed database sync tick.
pub const HEARTBEAT: &str = "sync_heartbeat";

/// Present with the value `clean` after a graceful shutdown flushed everything; any other value
/// (or none) at start means the previous process stopped without it.
pub const SHUTDOWN_MARK: &str = "shutdown_mark";

/// Marks the catalog as changed (called by every function that writes it).
pub fn bump_catalog(conn: &mut DbConn) -> Result<(), StoreError> {
    put(conn, CATALOG_VERSION, &super::new_id())
}

pub fn get(conn: &mut DbConn, key: &str) -> Result<Option<String>, StoreError> {
    Ok(settings::table
        .find(key)
        .select(settings::value)
        .first(conn)
        .optional()?)
}

/// Sets `key` to `value`, creating it when absent (one `INSERT … ON CONFLICT DO UPDATE`).
pub fn put(conn: &mut DbConn, key: &str, value: &str) -> Result<(), StoreError> {
    let now = super::now();
    let upsert = diesel::insert_into(settings::table)
        .values((
            settings::key.eq(key),
            settings::value.eq(value),
            settings::updated_at.eq(now),
        ))
        .on_conflict(settings::key)
        .do_update()
        .set((settings::value.eq(value), settings::updated_at.eq(now)));
    super::sql::execute_native(conn, upsert)?;
    Ok(())
}

pub fn delete(conn: &mut DbConn, key: &str) -> Result<bool, StoreError> {
    Ok(diesel::delete(settings::table.find(key)).execute(conn)? > 0)
}
