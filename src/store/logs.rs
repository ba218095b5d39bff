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

impl NewRequestLog {
    fn texts(&self) -> [Option<&str>; 9] {
        [
            Some(&self.request_id),
            Some(&self.provider_id),
            self.account_id.as_deref(),
            Some(&self.model),
            self.user_id.as_deref(),
            Some(&self.method),
            Some(&self.endpoint),
            self.error_type.as_deref(),
            self.error_message.as_deref(),
        ]
    }

    fn has_nul(&self) -> bool {
        self.texts().into_iter().flatten().any(|t| t.contains('\0'))
    }

    /// The row with every NUL replaced by U+FFFD.
    fn without_nul(&self) -> NewRequestLog {
        let clean = |t: &String| super::without_nul(t).into_owned();
        NewRequestLog {
            request_id: clean(&self.request_id),
            provider_id: clean(&self.provider_id),
            account_id: self.account_id.as_ref().map(clean),
            model: clean(&self.model),
            user_id: self.user_id.as_ref().map(clean),
            method: clean(&self.method),
            endpoint: clean(&self.endpoint),
            error_type: self.error_type.as_ref().map(clean),
            error_message: self.error_message.as_ref().map(clean),
            ..self.clone()
        }
    }
}

/// `rows` with every NUL in their text replaced by U+FFFD (borrowed when there is none). Client
/// text (a model name) and upstream text (an error message) may hold NUL, which Postgres refuses
/// in any text column: such a row would be lost, and its batch's COPY with it. Cleaned on both
/// backends, so both store the same row.
pub(super) fn without_nuls(rows: &[NewRequestLog]) -> std::borrow::Cow<'_, [NewRequestLog]> {
    if rows.iter().any(NewRequestLog::has_nul) {
        std::borrow::Cow::Owned(rows.iter().map(NewRequestLog::without_nul).collect())
    } else {
        std::borrow::Cow::Borrowed(rows)
    }
}

/// Inserts `rows` in one transaction, in chunks that stay under both backends' bind limits.
/// Only the log: [`super::rollup::record_batch`] also keeps the daily rollups up to date.
pub fn insert_batch(conn: &mut DbConn, rows: &[NewRequestLog]) -> Result<(), StoreError> {
    conn.transaction(|conn| insert_rows(conn, rows))
}

/// The statements of [`insert_batch`], for callers that already hold a transaction. Postgres
/// takes the rows as one binary `COPY` (several times faster than an `INSERT` with thousands of
/// parameters); SQLite with one cached prepared `INSERT` per row.
pub(super) fn insert_rows(conn: &mut DbConn, rows: &[NewRequestLog]) -> Result<(), StoreError> {
    let rows = &*without_nuls(rows);
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
