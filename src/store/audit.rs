//! The audit trail of account state changes: who (actor), what (action) and why (reason).

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::account_audit;
use super::{DbConn, StoreError};

/// The `actor` of audit rows written from runtime events (cooldowns, quota resets, …). They are
/// operational and as frequent as upstream 429s, so the retention cleanup
/// ([`super::retention::cleanup`]) applies the log's retention to them; changes made by people
/// (`config`, `cli`, `admin-api`) are kept.
pub const RUNTIME_ACTOR: &str = "runtime";

#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = account_audit)]
pub struct AuditRow {
    pub id: i64,
    pub account_id: String,
    pub ts: NaiveDateTime,
    pub actor: String,
    pub action: String,
    pub reason: String,
    pub details: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = account_audit)]
pub struct NewAudit {
    pub account_id: String,
    pub ts: NaiveDateTime,
    /// `config`, `cli`, `admin-api`, `runtime`.
    pub actor: String,
    /// `create`, `enable`, `disable`, `cooldown`, `reset`, `update`, `expire`, `delete`.
    pub action: String,
    pub reason: String,
    /// Optional JSON with the changed fields (never secrets).
    pub details: Option<String>,
}

impl NewAudit {
    pub fn new(account_id: &str, actor: &str, action: &str, reason: impl Into<String>) -> Self {
        NewAudit {
            account_id: account_id.to_string(),
            ts: super::now(),
            actor: actor.to_string(),
            action: action.to_string(),
            reason: reason.into(),
            details: None,
        }
    }
}

/// Audit rows are few (state changes, not requests): one statement each keeps this portable.
/// A reason may quote text from outside (an operator's words, an upstream's): NULs become U+FFFD,
/// as Postgres refuses them.
pub fn insert(conn: &mut DbConn, rows: &[NewAudit]) -> Result<(), StoreError> {
    for row in rows {
        let clean = |t: &str| super::without_nul(t).into_owned();
        let row = NewAudit {
            account_id: clean(&row.account_id),
            actor: clean(&row.actor),
            action: clean(&row.action),
            reason: clean(&row.reason),
            details: row.details.as_deref().map(clean),
            ts: row.ts,
        };
        diesel::insert_into(account_audit::table)
            .values(&row)
            .execute(conn)?;
    }
    Ok(())
}

pub fn list_for_account(conn: &mut DbConn, account_id: &str) -> Result<Vec<AuditRow>, StoreError> {
    Ok(account_audit::table
        .filter(account_audit::account_id.eq(account_id))
        .order(account_audit::id)
        .select(AuditRow::as_select())
        .load(conn)?)
}
