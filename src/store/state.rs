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
pub fn put(conn: &mut DbConn, rows: &[AccountStateRow]) -> Result<usize, StoreError> {
    conn.transaction(|conn| {
        let mut written = 0;
        for row in rows {
            let updated = diesel::update(
                account_state::table
                    .find(&row.account_id)
                    .filter(account_state::version.lt(row.version)),
            )
            .set((
                account_state::version.eq(row.version),
                account_state::state.eq(&row.state),
                account_state::updated_at.eq(row.updated_at),
            ))
            .execute(conn)?;
            if updated > 0 {
                written += 1;
                continue;
            }
            let exists = account_state::table
                .find(&row.account_id)
                .count()
                .get_result::<i64>(conn)?
                > 0;
            if !exists {
                diesel::insert_into(account_state::table)
                    .values(row)
                    .execute(conn)?;
                written += 1;
            }
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
