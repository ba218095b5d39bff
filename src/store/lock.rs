//! The start lock: what several instances sharing one database must not do at the same time —
//! apply migrations, generate the first secrets, write the providers declared in their config —
//! is done under one lock, held by one instance at a time.
//!
//! Postgres: a session-level advisory lock (`pg_advisory_lock`), released by the same connection
//! afterwards, or by Postgres itself when the holder dies. SQLite: no lock is needed beyond the
//! file's own (one writer at a time), and several instances on one SQLite file are not a
//! supported deployment.

use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;

use super::{DbConn, StoreError};

/// The advisory lock's key: "quotagat" in ASCII, so that it names this application.
const START_LOCK: i64 = 0x71_75_6f_74_61_67_61_74;

/// Runs `f` on `conn` while this instance holds the start lock (waiting for it).
pub fn with_start_lock<T, E: From<StoreError>>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, E>,
) -> Result<T, E> {
    if !matches!(conn, DbConn::Postgres(_)) {
        return f(conn);
    }
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(START_LOCK)
        .execute(conn)
        .map_err(|e| E::from(e.into()))?;
    let result = f(conn);
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(START_LOCK)
        .execute(conn);
    let value = result?;
    unlocked.map_err(|e| E::from(e.into()))?;
    Ok(value)
}
