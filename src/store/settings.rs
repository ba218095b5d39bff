//! Small named values: the admin token's hash, the catalog version, and each instance's
//! clean-shutdown mark and sync heartbeat.

use diesel::prelude::*;

use super::schema::settings;
use super::{DbConn, StoreError};

/// The SHA-256 of the generated admin token (absent when the token is configured).
pub const ADMIN_TOKEN_HASH: &str = "admin_token_hash";

/// Changes with every write to providers, models, limits or accounts, so that a running server
/// notices what another process (the CLI) changed and reloads.
pub const CATALOG_VERSION: &str = "catalog_version";

/// Before instances had ids: the database's one sync heartbeat. No longer written; read only as
/// the fallback described at [`shutdown_mark`].
pub const LEGACY_HEARTBEAT: &str = "sync_heartbeat";

/// Before instances had ids: the database's one clean-shutdown mark. No longer written; read only
/// as the fallback described at [`shutdown_mark`].
pub const LEGACY_SHUTDOWN_MARK: &str = "shutdown_mark";

/// The key of an instance's clean-shutdown mark, `shutdown_mark/<instance id>`: present with the
/// value `clean` after a graceful shutdown flushed everything; any other value (or none) at start
/// means that instance's previous process stopped without it.
///
/// Per instance because several instances can share one database: a single mark would let one
/// instance's clean stop hide another's crash (whose unknown gap would then go uncharged).
///
/// Upgrade: an instance with no mark of its own yet reads [`LEGACY_SHUTDOWN_MARK`] and
/// [`LEGACY_HEARTBEAT`] instead (what the single process before it wrote), so that a
/// single-instance deployment keeps its exact restore across the upgrade.
pub fn shutdown_mark(instance_id: &str) -> String {
    format!("{LEGACY_SHUTDOWN_MARK}/{instance_id}")
}

/// The key of an instance's sync heartbeat, `sync_heartbeat/<instance id>`: ms since the epoch of
/// its last completed database sync tick, until when the database holds what it admitted.
///
/// Per instance for the same reason as [`shutdown_mark`]: another instance's later heartbeat says
/// nothing about until when this one's state was written.
pub fn heartbeat(instance_id: &str) -> String {
    format!("{LEGACY_HEARTBEAT}/{instance_id}")
}

/// Instances whose last process is running or stopped without its clean-shutdown mark: at most
/// that many (live or crashed) may be serving from this database now. An instance that cannot
/// reach Redis at start takes this as the number of instances to share the limits with.
pub fn unclean_instances(conn: &mut DbConn) -> Result<u64, StoreError> {
    let pattern = format!("{LEGACY_SHUTDOWN_MARK}/%");
    let count: i64 = settings::table
        .filter(settings::key.like(pattern))
        .filter(settings::value.ne("clean"))
        .count()
        .get_result(conn)?;
    Ok(count.max(0) as u64)
}

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
