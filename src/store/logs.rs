//! Request logs: one row per proxied (or refused) request, written in batches.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::request_logs;
use super::{DbConn, StoreError};

/// A request log row as written (the seed's `TrackingRequest` plus account, model, request id and
/// timestamp).
#[derive(Debug, Clone, PartialEq, Insertable, Queryable, Selectable)]
#[diesel(table_name = request_logs)]
// `None` is written as NULL rather than DEFAULT (the same for these columns): SQLite can then take
// a whole batch in one statement instead of one per row, and Postgres a binary COPY.
#[diesel(treat_none_as_default_value = false)]
pub struct NewRequestLog {
    pub request_id: String,
    pub ts: NaiveDateTime,
    pub provider_id: String,
    pub account_id: Option<String>,
    pub model: String,
    pub user_id: Option<String>,
    pub method: String,
    pub endpoint: String,
    pub status_code: i32,
    pub latency_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub success: bool,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub estimated_cost: f64,
}

/// Inserts `rows` in one transaction, in chunks that stay under both backends' bind limits.
/// Only the log: [`super::stats::record_batch`] also keeps the daily rollups up to date.
pub fn insert_batch(conn: &mut DbConn, rows: &[NewRequestLog]) -> Result<(), StoreError> {
    conn.transaction(|conn| insert_rows(conn, rows))
}

/// The statements of [`insert_batch`], for callers that already hold a transaction. Postgres
/// takes the rows as one binary `COPY` (several times faster than an `INSERT` with thousands of
/// parameters); SQLite as multi-row `INSERT`s under its bind limit.
pub(super) fn insert_rows(conn: &mut DbConn, rows: &[NewRequestLog]) -> Result<(), StoreError> {
    match conn {
        DbConn::Postgres(c) => {
            diesel::copy_from(request_logs::table)
                .from_insertable(rows)
                .execute(c)?;
        }
        DbConn::Sqlite(c) => {
            // One prepared statement (cached by the connection) run per row: a multi-row
            // INSERT is a new statement of thousands of parameters to build and parse per batch.
            for row in rows {
                diesel::insert_into(request_logs::table)
                    .values(row)
                    .execute(c)?;
            }
        }
    }
    Ok(())
}

pub fn count(conn: &mut DbConn) -> Result<i64, StoreError> {
    Ok(request_logs::table.count().get_result(conn)?)
}

/// Rows in `[from, to)`, oldest first.
pub fn list_range(
    conn: &mut DbConn,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<Vec<NewRequestLog>, StoreError> {
    Ok(request_logs::table
        .filter(request_logs::ts.ge(from))
        .filter(request_logs::ts.lt(to))
        .order(request_logs::id)
        .select(NewRequestLog::as_select())
        .load(conn)?)
}
