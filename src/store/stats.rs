//! Request statistics, read: the seed's queries (`GetUsageStats`, `GetProviderStats`,
//! `GetTopModels`, `GetErrorStats`) over the daily rollups and the request log.
//!
//! Why rollups: a query over a long range would otherwise scan every request row in it. Whole
//! UTC days inside a range `[from, to)` are read from the rollups; only the partial days at its
//! edges are read from `request_logs`, through its `ts` indexes:
//! - `provider_stats` (one row per provider and day) answers for a provider and for everyone;
//! - `usage_daily` (per day, provider, user and model) for one user and for the top models;
//! - `usage_daily_users` (who used a provider on a day) for unique users across days.
//!
//! [`super::rollup`] writes them: each tracker batch in the same transaction as the rows it sums,
//! so the two agree without ever rescanning the log, and the daily job recomputes one day from the
//! log, which also repairs a day whose rows were written around the rollups (e.g. by
//! `logs::insert_batch`). Rollups are kept when [`super::retention`] deletes the log: they are the
//! long-term history, so a range older than the retention still has its whole days (its partial
//! edge days, read from the deleted log, count nothing).
//!
//! The SQL is portable (placeholders are written `?`, see `super::sql`). Times are UTC.

use std::collections::BTreeMap;
use std::ops::Range;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use diesel::sql_types::{BigInt, Date, Text, Timestamp};
use diesel::{QueryableByName, RunQueryDsl as _};
use serde::Serialize;

use super::rollup::{midnight, next_day, rollup_sums, Sums, LOG_SUMS};
use super::rollup::{PROVIDER_STATS_SUM_COLUMNS, USAGE_DAILY_SUM_COLUMNS};
use super::sql::{statement, Statement};
use super::{DbConn, StoreError};

// The writers of the rollups and the actor the retention cleans, also named here for callers that
// predate the split of this module (the request tracker, the benchmarks).
pub use super::audit::RUNTIME_ACTOR;
pub use super::rollup::{aggregate_day, record_batch};

/// `from`–`to` of a statistic, as RFC 3339 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Period {
    fn new(from: NaiveDateTime, to: NaiveDateTime) -> Period {
        Period {
            from: from.and_utc(),
            to: to.and_utc(),
        }
    }
}

/// `GET /api/v1/stats/usage` (the seed's `GetUsageStats`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageStats {
    pub total_requests: i64,
    pub successful_requests: i64,
    /// Successful / total, a fraction from 0 to 1 (0 for no requests).
    pub success_rate: f64,
    pub total_input_tokens: i64,
    pub total_output_tokens: i64,
    pub total_cost: f64,
    /// 0 for no requests.
    pub avg_latency_ms: f64,
    pub period: Period,
}

/// `GET /api/v1/stats/providers/{provider_id}` (the seed's `ProviderStats` over a range).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderStats {
    pub provider_id: String,
    pub total_requests: i64,
    pub successful_requests: i64,
    /// Successful / total, a fraction from 0 to 1 (0 for no requests).
    pub success_rate: f64,
    pub avg_latency_ms: f64,
    pub total_input_tokens: i64,
    pub total_output_tokens: i64,
    pub total_tokens: i64,
    /// Failed requests other than timeouts, exhausted quotas and rate limits.
    pub error_count: i64,
    pub timeout_count: i64,
    pub quota_exhausted_count: i64,
    pub rate_limited_count: i64,
    pub total_cost: f64,
    /// Distinct users over the whole range (a user seen on several days counts once).
    pub unique_users: i64,
    pub period: Period,
}

/// One entry of `GET /api/v1/stats/models/top`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, QueryableByName)]
pub struct ModelUsage {
    #[diesel(sql_type = Text)]
    pub model: String,
    #[diesel(sql_type = BigInt)]
    pub request_count: i64,
    #[diesel(sql_type = BigInt)]
    pub total_tokens: i64,
}

/// `GET /api/v1/stats/errors/{provider_id}`: every failed request of the range, grouped by its
/// message (its `error_type` when the message is empty, `unknown` when both are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorStats {
    pub total_errors: i64,
    pub errors_by_type: BTreeMap<String, i64>,
}

// ---------------------------------------------------------------------------------------------
// Queries

/// A range `[from, to)` cut into what the rollups answer (whole UTC days) and the partial days
/// at its edges, read from the log. An empty or inverted range is empty everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Split {
    head: Range<NaiveDateTime>,
    days: Range<NaiveDate>,
    tail: Range<NaiveDateTime>,
}

impl Split {
    fn of(from: NaiveDateTime, to: NaiveDateTime) -> Split {
        let first_whole = if from.time() == NaiveTime::MIN {
            from.date()
        } else {
            next_day(from.date())
        };
        let end_whole = to.date();
        if from >= to || first_whole >= end_whole {
            // No whole day inside: the log answers for all of it.
            return Split {
                head: from..to,
                days: first_whole..first_whole,
                tail: to..to,
            };
        }
        Split {
            head: from..midnight(first_whole),
            days: first_whole..end_whole,
            tail: midnight(end_whole)..to,
        }
    }

    /// The two edge ranges, skipping empty ones.
    fn edges(&self) -> impl Iterator<Item = &Range<NaiveDateTime>> {
        [&self.head, &self.tail]
            .into_iter()
            .filter(|r| r.start < r.end)
    }
}

/// Whose requests a query covers.
#[derive(Debug, Clone, Copy)]
enum Scope<'a> {
    All,
    User(&'a str),
    Provider(&'a str),
}

impl Scope<'_> {
    /// The filter to append to a `WHERE`, with one placeholder when it has one.
    fn filter(&self) -> &'static str {
        match self {
            Scope::All => "",
            Scope::User(_) => " AND user_id = ?",
            Scope::Provider(_) => " AND provider_id = ?",
        }
    }

    fn bind(&self, query: Statement) -> Statement {
        match self {
            Scope::All => query,
            Scope::User(id) | Scope::Provider(id) => query.bind::<Text, _>(id.to_string()),
        }
    }
}

/// Sums of the requests in `scope` over `range`: whole days from the rollups, edges from the log.
fn sums(conn: &mut DbConn, scope: Scope, range: &Split) -> Result<Sums, StoreError> {
    let mut total = Sums::default();
    if range.days.start < range.days.end {
        // provider_stats holds one row per provider and day: it answers for a provider and for
        // the whole gateway. Only a user's usage needs the finer usage_daily.
        let (columns, table) = match scope {
            Scope::User(_) => (&USAGE_DAILY_SUM_COLUMNS, "usage_daily"),
            Scope::All | Scope::Provider(_) => (&PROVIDER_STATS_SUM_COLUMNS, "provider_stats"),
        };
        let sql = format!(
            "SELECT {} FROM {table} WHERE day >= ? AND day < ?{}",
            rollup_sums(columns),
            scope.filter()
        );
        let query = statement(conn, &sql)
            .bind::<Date, _>(range.days.start)
            .bind::<Date, _>(range.days.end);
        total.add(&scope.bind(query).get_result::<Sums>(conn)?);
    }
    for edge in range.edges() {
        let sql = format!(
            "SELECT {LOG_SUMS} FROM request_logs WHERE ts >= ? AND ts < ?{}",
            scope.filter()
        );
        let query = statement(conn, &sql)
            .bind::<Timestamp, _>(edge.start)
            .bind::<Timestamp, _>(edge.end);
        total.add(&scope.bind(query).get_result::<Sums>(conn)?);
    }
    Ok(total)
}

/// Usage over `[from, to)`, of one user or (`None`) of everyone (the seed's `GetUsageStats`).
pub fn usage_stats(
    conn: &mut DbConn,
    user_id: Option<&str>,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<UsageStats, StoreError> {
    let scope = user_id.map_or(Scope::All, Scope::User);
    let s = sums(conn, scope, &Split::of(from, to))?;
    Ok(UsageStats {
        total_requests: s.requests,
        successful_requests: s.successes,
        success_rate: s.success_rate(),
        total_input_tokens: s.input_tokens,
        total_output_tokens: s.output_tokens,
        total_cost: s.cost,
        avg_latency_ms: s.avg_latency_ms(),
        period: Period::new(from, to),
    })
}

/// One provider's statistics over `[from, to)` (the seed's `GetProviderStats`).
pub fn provider_stats(
    conn: &mut DbConn,
    provider_id: &str,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<ProviderStats, StoreError> {
    let split = Split::of(from, to);
    let s = sums(conn, Scope::Provider(provider_id), &split)?;
    Ok(ProviderStats {
        provider_id: provider_id.to_string(),
        total_requests: s.requests,
        successful_requests: s.successes,
        success_rate: s.success_rate(),
        avg_latency_ms: s.avg_latency_ms(),
        total_input_tokens: s.input_tokens,
        total_output_tokens: s.output_tokens,
        total_tokens: s.input_tokens + s.output_tokens,
        error_count: s.errors,
        timeout_count: s.timeouts,
        quota_exhausted_count: s.quota_exhausted,
        rate_limited_count: s.rate_limited,
        total_cost: s.cost,
        unique_users: unique_users(conn, provider_id, &split)?,
        period: Period::new(from, to),
    })
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Distinct users of a provider over the split range: the per-day user rollup for whole days,
/// united (not added) with the users of the edge rows.
fn unique_users(conn: &mut DbConn, provider_id: &str, split: &Split) -> Result<i64, StoreError> {
    let sql = "SELECT COUNT(*) AS n FROM ( \
        SELECT user_id FROM usage_daily_users WHERE provider_id = ? AND day >= ? AND day < ? \
        UNION SELECT user_id FROM request_logs WHERE provider_id = ? AND ts >= ? AND ts < ? \
            AND user_id IS NOT NULL AND user_id <> '' \
        UNION SELECT user_id FROM request_logs WHERE provider_id = ? AND ts >= ? AND ts < ? \
            AND user_id IS NOT NULL AND user_id <> '' \
        ) AS users";
    let mut query = statement(conn, sql)
        .bind::<Text, _>(provider_id.to_string())
        .bind::<Date, _>(split.days.start)
        .bind::<Date, _>(split.days.end);
    for edge in [&split.head, &split.tail] {
        query = query
            .bind::<Text, _>(provider_id.to_string())
            .bind::<Timestamp, _>(edge.start)
            .bind::<Timestamp, _>(edge.end);
    }
    Ok(query.get_result::<Count>(conn)?.n)
}

/// The `limit` most requested models over `[from, to)`, by request count (descending), then
/// name (the seed's `GetTopModels`). A model served by several providers counts once.
pub fn top_models(
    conn: &mut DbConn,
    limit: usize,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<Vec<ModelUsage>, StoreError> {
    let split = Split::of(from, to);
    let mut parts: Vec<ModelUsage> = Vec::new();
    if split.days.start < split.days.end {
        parts.extend(
            statement(
                conn,
                "SELECT model, CAST(SUM(requests) AS BIGINT) AS request_count, \
                 CAST(SUM(input_tokens + output_tokens) AS BIGINT) AS total_tokens \
                 FROM usage_daily WHERE day >= ? AND day < ? GROUP BY model",
            )
            .bind::<Date, _>(split.days.start)
            .bind::<Date, _>(split.days.end)
            .load::<ModelUsage>(conn)?,
        );
    }
    for edge in split.edges() {
        parts.extend(
            statement(
                conn,
                "SELECT model, COUNT(*) AS request_count, \
                 CAST(COALESCE(SUM(input_tokens + output_tokens), 0) AS BIGINT) AS total_tokens \
                 FROM request_logs WHERE ts >= ? AND ts < ? GROUP BY model",
            )
            .bind::<Timestamp, _>(edge.start)
            .bind::<Timestamp, _>(edge.end)
            .load::<ModelUsage>(conn)?,
        );
    }
    let mut merged: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for part in parts {
        let entry = merged.entry(part.model).or_default();
        entry.0 += part.request_count;
        entry.1 += part.total_tokens;
    }
    let mut models: Vec<ModelUsage> = merged
        .into_iter()
        .map(|(model, (request_count, total_tokens))| ModelUsage {
            model,
            request_count,
            total_tokens,
        })
        .collect();
    models.sort_by(|a, b| {
        b.request_count
            .cmp(&a.request_count)
            .then_with(|| a.model.cmp(&b.model))
    });
    models.truncate(limit);
    Ok(models)
}

#[derive(QueryableByName)]
struct ErrorCount {
    #[diesel(sql_type = Text)]
    error: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A provider's failed requests over `[from, to)`, grouped by message (the seed's
/// `GetErrorStats`). Read from the log (messages are not rolled up) through the partial index
/// on failed requests.
pub fn error_stats(
    conn: &mut DbConn,
    provider_id: &str,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<ErrorStats, StoreError> {
    let rows = statement(
        conn,
        "SELECT COALESCE(NULLIF(error_message, ''), NULLIF(error_type, ''), 'unknown') AS error, \
         COUNT(*) AS n FROM request_logs \
         WHERE provider_id = ? AND ts >= ? AND ts < ? AND NOT success \
         GROUP BY COALESCE(NULLIF(error_message, ''), NULLIF(error_type, ''), 'unknown')",
    )
    .bind::<Text, _>(provider_id.to_string())
    .bind::<Timestamp, _>(from)
    .bind::<Timestamp, _>(to)
    .load::<ErrorCount>(conn)?;
    Ok(ErrorStats {
        total_errors: rows.iter().map(|r| r.n).sum(),
        errors_by_type: rows.into_iter().map(|r| (r.error, r.n)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn a_range_is_cut_into_whole_days_and_partial_edges() {
        let split = Split::of(t("2026-11-01 12:00:00"), t("2026-11-04 06:00:00"));
        assert_eq!(
            split.head,
            t("2026-11-01 12:00:00")..t("2026-11-02 00:00:00")
        );
        assert_eq!(split.days, d("2026-11-02")..d("2026-11-04"));
        assert_eq!(
            split.tail,
            t("2026-11-04 00:00:00")..t("2026-11-04 06:00:00")
        );
    }

    #[test]
    fn a_range_on_midnights_is_all_whole_days() {
        let split = Split::of(t("2026-11-01 00:00:00"), t("2026-11-03 00:00:00"));
        assert_eq!(split.days, d("2026-11-01")..d("2026-11-03"));
        assert_eq!(split.edges().count(), 0);
    }

    #[test]
    fn a_range_without_a_whole_day_is_read_from_the_log() {
        let split = Split::of(t("2026-11-01 12:00:00"), t("2026-11-02 11:00:00"));
        assert_eq!(
            split.head,
            t("2026-11-01 12:00:00")..t("2026-11-02 11:00:00")
        );
        assert!(split.days.is_empty());
        assert_eq!(split.edges().count(), 1);
    }

    #[test]
    fn an_empty_or_inverted_range_is_empty_everywhere() {
        for (from, to) in [
            ("2026-11-01 12:00:00", "2026-11-01 12:00:00"),
            ("2026-11-05 00:00:00", "2026-11-01 00:00:00"),
        ] {
            let split = Split::of(t(from), t(to));
            assert!(split.days.is_empty());
            assert_eq!(split.edges().count(), 0, "{from} → {to}");
        }
    }
}
