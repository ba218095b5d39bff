//! Recent activity for the status page and the exhaustion forecast, read from the request log:
//! requests and errors per provider and minute over the last hour, what each account used over
//! a recent span (its rate), and each account's last upstream error.
//!
//! Why the log and not counters in the actors: the request path stays untouched, the figures
//! survive a restart, and several instances sharing one database see the same picture. The reads
//! go through the `ts` index and cover at most one hour; the status page caches them for a few
//! seconds, so many viewers cost one read.

use chrono::{Duration, NaiveDateTime};
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamp};
use diesel::{QueryableByName, RunQueryDsl as _};

use super::sql::statement;
use super::{DbConn, StoreError};

/// Requests and failed requests of a provider in one minute.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct MinuteCount {
    #[diesel(sql_type = Text)]
    pub provider_id: String,
    /// Whole minutes before `now`: 0 is the last 60 seconds.
    #[diesel(sql_type = BigInt)]
    pub ago: i64,
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    #[diesel(sql_type = BigInt)]
    pub errors: i64,
}

/// What an account used over a span.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct AccountUse {
    #[diesel(sql_type = Text)]
    pub account_id: String,
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    /// Input and output tokens.
    #[diesel(sql_type = BigInt)]
    pub tokens: i64,
}

/// The last failed request an account served.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct LastError {
    #[diesel(sql_type = Text)]
    pub account_id: String,
    #[diesel(sql_type = Timestamp)]
    pub ts: NaiveDateTime,
    #[diesel(sql_type = Integer)]
    pub status_code: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub error_type: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error_message: Option<String>,
}

/// Everything [`recent`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    pub minutes: Vec<MinuteCount>,
    pub account_use: Vec<AccountUse>,
    pub last_errors: Vec<LastError>,
}

/// Requests per provider and minute over the last `minutes` minutes before `now`; each account's
/// use over the last `rate_span`; each account's last failed request in the last `minutes`
/// minutes (a client that went away is not the upstream's error).
pub fn recent(
    conn: &mut DbConn,
    now: NaiveDateTime,
    minutes: i64,
    rate_span: Duration,
) -> Result<Activity, StoreError> {
    let since = now - Duration::minutes(minutes);
    // Minutes before `now`, as a whole number: each backend has its own date arithmetic.
    let ago = match conn {
        DbConn::Postgres(_) => {
            "CAST(FLOOR(EXTRACT(EPOCH FROM (CAST(? AS TIMESTAMP) - ts)) / 60) AS BIGINT)"
        }
        DbConn::Sqlite(_) => "CAST((julianday(?) - julianday(ts)) * 1440.0 AS INTEGER)",
    };
    let minutes = statement(
        conn,
        &format!(
            "SELECT provider_id, {ago} AS ago, COUNT(*) AS requests, \
             CAST(COALESCE(SUM(CASE WHEN success THEN 0 ELSE 1 END), 0) AS BIGINT) AS errors \
             FROM request_logs WHERE ts >= ? AND ts < ? GROUP BY provider_id, ago"
        ),
    )
    .bind::<Timestamp, _>(now)
    .bind::<Timestamp, _>(since)
    .bind::<Timestamp, _>(now)
    .load::<MinuteCount>(conn)?;

    let account_use = statement(
        conn,
        "SELECT account_id, COUNT(*) AS requests, \
         CAST(COALESCE(SUM(input_tokens + output_tokens), 0) AS BIGINT) AS tokens \
         FROM request_logs WHERE ts >= ? AND ts < ? AND account_id IS NOT NULL \
         GROUP BY account_id",
    )
    .bind::<Timestamp, _>(now - rate_span)
    .bind::<Timestamp, _>(now)
    .load::<AccountUse>(conn)?;

    let last_errors = statement(
        conn,
        "SELECT r.account_id AS account_id, r.ts AS ts, r.status_code AS status_code, \
         r.error_type AS error_type, r.error_message AS error_message \
         FROM request_logs r JOIN (SELECT MAX(id) AS id FROM request_logs \
           WHERE ts >= ? AND ts < ? AND NOT success AND account_id IS NOT NULL \
           AND (error_type IS NULL OR error_type <> 'client_closed') \
           GROUP BY account_id) m ON r.id = m.id",
    )
    .bind::<Timestamp, _>(since)
    .bind::<Timestamp, _>(now)
    .load::<LastError>(conn)?;

    Ok(Activity {
        minutes: minutes.into_iter().filter(|m| m.ago >= 0).collect(),
        account_use,
        last_errors,
    })
}
