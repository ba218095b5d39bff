//! The serialized runtime state of accounts (windows, cooldown, in-flight estimates), kept for
//! restore. A write only replaces a row with a lower version: "newer" is the higher version.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::account_state;
use super::{DbConn, StoreError};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = account_state)]
pub struct AccountStateRow {
    pub account_id: String,
    pub version: i64,
    pub state: String,
    pub updated_at: NaiveDateTime,
}

/// Writes each row unless the stored version is already the same or higher. Returns how many
/// rows were written.
///
/// One `INSERT … ON CONFLICT DO UPDATE … WHERE` per row: a row whose stored version is not lower
/// is left alone and counts as not written (both backends report it as no change).
pub fn put(conn: &mut DbConn, rows: &[AccountStateRow]) -> Result<usize, StoreError> {
    use account_state::{state, updated_at, version};
    use diesel::query_dsl::methods::FilterDsl as _;
    use diesel::upsert::excluded;
    conn.transaction(|conn| {
        let mut written = 0;
        for row in rows {
            let upsert = diesel::insert_into(account_state::table)
                .values(row)
                .on_conflict(account_state::account_id)
                .do_update()
                .set((
                    version.eq(excluded(version)),
                    state.eq(excluded(state)),
                    updated_at.eq(excluded(updated_at)),
                ))
                .filter(version.lt(excluded(version)));
            written += super::sql::execute_native(conn, upsert)?;
        }
        Ok(written)
    })
}

pub fn get(conn: &mut DbConn, account_id: &str) -> Result<Option<AccountStateRow>, StoreError> {
    Ok(account_state::table
        .find(account_id)
        .select(AccountStateRow::as_select())
        .first(conn)
        .optional()?)
}

pub fn list(conn: &mut DbConn) -> Result<Vec<AccountStateRow>, StoreError> {
    Ok(account_state::table
        .select(AccountStateRow::as_select())
        .load(conn)?)
}
