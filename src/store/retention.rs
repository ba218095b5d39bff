//! Retention: the daily cleanup of the request log and of the runtime's audit rows older than
//! `tracking.retention_days`. The rollups are kept: they are the long-term history (see
//! [`super::stats`]).

use chrono::NaiveDateTime;
use diesel::sql_types::{BigInt, Text, Timestamp};
use diesel::RunQueryDsl as _;

use super::audit::RUNTIME_ACTOR;
use super::sql::{statement, Statement};
use super::{DbConn, StoreError};

/// What [`cleanup`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub request_logs: u64,
    /// Audit rows of the runtime ([`RUNTIME_ACTOR`]).
    pub audit_rows: u64,
}

impl Cleanup {
    pub fn total(&self) -> u64 {
        self.request_logs + self.audit_rows
    }
}

/// Deletes `request_logs` rows with `ts < cutoff`, and runtime audit rows ([`RUNTIME_ACTOR`])
/// older than it, `batch_size` rows per statement: each delete is its own short transaction, so
/// the tracker's writes never wait long behind it.
pub fn cleanup(
    conn: &mut DbConn,
    cutoff: NaiveDateTime,
    batch_size: usize,
) -> Result<Cleanup, StoreError> {
    let batch = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let request_logs = delete_in_batches(
        conn,
        "DELETE FROM request_logs WHERE id IN \
         (SELECT id FROM request_logs WHERE ts < ? LIMIT ?)",
        |q| q.bind::<Timestamp, _>(cutoff).bind::<BigInt, _>(batch),
        batch,
    )?;
    let audit_rows = delete_in_batches(
        conn,
        "DELETE FROM account_audit WHERE id IN \
         (SELECT id FROM account_audit WHERE actor = ? AND ts < ? LIMIT ?)",
        |q| {
            q.bind::<Text, _>(RUNTIME_ACTOR)
                .bind::<Timestamp, _>(cutoff)
                .bind::<BigInt, _>(batch)
        },
        batch,
    )?;
    Ok(Cleanup {
        request_logs,
        audit_rows,
    })
}

/// Runs a `DELETE … LIMIT batch` until it deletes fewer than `batch` rows (then none are left).
fn delete_in_batches(
    conn: &mut DbConn,
    sql: &str,
    bind: impl Fn(Statement) -> Statement,
    batch: i64,
) -> Result<u64, StoreError> {
    let mut deleted = 0u64;
    loop {
        let n = bind(statement(conn, sql)).execute(conn)?;
        deleted += n as u64;
        if (n as i64) < batch {
            return Ok(deleted);
        }
    }
}
