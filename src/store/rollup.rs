//! The daily rollups of the request log, written: every tracker batch adds its sums to them in
//! the same transaction as its rows ([`record_batch`]), and the daily job recomputes a day from
//! the log ([`aggregate_day`]). What they hold and why is in [`super::stats`], which reads them.
//!
//! - `provider_stats`: one row per provider and day;
//! - `usage_daily`: per day, provider, user and model;
//! - `usage_daily_users`: who used a provider on a day.
//!
//! A batch's sums go in with `INSERT … ON CONFLICT … DO UPDATE` (see `super::upsert`), a day's
//! re-aggregation with `INSERT … SELECT` from the log. Times are UTC.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Days, NaiveDate, NaiveDateTime, NaiveTime};
use diesel::connection::Connection as _;
use diesel::sql_types::{BigInt, Date, Double, Timestamp};
use diesel::{QueryableByName, RunQueryDsl as _};

use super::logs::{self, NewRequestLog};
use super::sql::statement;
use super::upsert::{Column, Upsert};
use super::{DbConn, StoreError};

// ---------------------------------------------------------------------------------------------
// Classification and sums

/// How a request counts. The SQL twin is [`LOG_SUMS`]: keep them in step.
fn classify(row: &NewRequestLog) -> Outcome {
    if row.success {
        return Outcome::Success;
    }
    match row.error_type.as_deref() {
        Some("timeout") => Outcome::Timeout,
        Some("quota_exceeded") => Outcome::QuotaExhausted,
        Some("rate_limited") => Outcome::RateLimited,
        _ => Outcome::Error,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Error,
    Timeout,
    QuotaExhausted,
    RateLimited,
}

/// The sums every rollup keeps; rates and averages are derived when read.
#[derive(Debug, Clone, Copy, Default, PartialEq, QueryableByName)]
pub(super) struct Sums {
    #[diesel(sql_type = BigInt)]
    pub(super) requests: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) successes: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) errors: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) timeouts: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) quota_exhausted: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) rate_limited: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) latency_ms: i64,
    #[diesel(sql_type = Double)]
    pub(super) cost: f64,
}

impl Sums {
    fn of(row: &NewRequestLog) -> Sums {
        let outcome = classify(row);
        let one = |o: Outcome| i64::from(outcome == o);
        Sums {
            requests: 1,
            successes: one(Outcome::Success),
            errors: one(Outcome::Error),
            timeouts: one(Outcome::Timeout),
            quota_exhausted: one(Outcome::QuotaExhausted),
            rate_limited: one(Outcome::RateLimited),
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            latency_ms: row.latency_ms,
            cost: row.estimated_cost,
        }
    }

    pub(super) fn add(&mut self, other: &Sums) {
        self.requests += other.requests;
        self.successes += other.successes;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.quota_exhausted += other.quota_exhausted;
        self.rate_limited += other.rate_limited;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.latency_ms += other.latency_ms;
        self.cost += other.cost;
    }

    pub(super) fn success_rate(&self) -> f64 {
        ratio(self.successes, self.requests)
    }

    pub(super) fn avg_latency_ms(&self) -> f64 {
        ratio(self.latency_ms, self.requests)
    }
}

/// The sum columns of `usage_daily`: the names of the [`Sums`] fields, in order.
pub(super) const USAGE_DAILY_SUM_COLUMNS: [&str; 10] = [
    "requests",
    "successes",
    "errors",
    "timeouts",
    "quota_exhausted",
    "rate_limited",
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "cost",
];

/// The sum columns of `provider_stats` (the seed's names), in [`Sums`] field order.
pub(super) const PROVIDER_STATS_SUM_COLUMNS: [&str; 10] = [
    "total_requests",
    "successful_requests",
    "error_count",
    "timeout_count",
    "quota_exhausted",
    "rate_limited",
    "input_tokens",
    "output_tokens",
    "total_latency_ms",
    "total_cost",
];

/// `a / b`, 0 when there is nothing to divide by (an empty range is zeros, never NaN).
fn ratio(a: i64, b: i64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// [`Sums`] over `request_logs` rows, with the classification of [`classify`]. Every sum is cast
/// to BIGINT: Postgres sums BIGINTs as NUMERIC.
pub(super) const LOG_SUMS: &str = "\
    COUNT(*) AS requests, \
    CAST(COALESCE(SUM(CASE WHEN success THEN 1 ELSE 0 END), 0) AS BIGINT) AS successes, \
    CAST(COALESCE(SUM(CASE WHEN NOT success AND COALESCE(error_type, '') \
        NOT IN ('timeout', 'quota_exceeded', 'rate_limited') THEN 1 ELSE 0 END), 0) AS BIGINT) \
        AS errors, \
    CAST(COALESCE(SUM(CASE WHEN NOT success AND error_type = 'timeout' THEN 1 ELSE 0 END), 0) \
        AS BIGINT) AS timeouts, \
    CAST(COALESCE(SUM(CASE WHEN NOT success AND error_type = 'quota_exceeded' THEN 1 ELSE 0 END), \
        0) AS BIGINT) AS quota_exhausted, \
    CAST(COALESCE(SUM(CASE WHEN NOT success AND error_type = 'rate_limited' THEN 1 ELSE 0 END), \
        0) AS BIGINT) AS rate_limited, \
    CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
    CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
    CAST(COALESCE(SUM(latency_ms), 0) AS BIGINT) AS latency_ms, \
    CAST(COALESCE(SUM(estimated_cost), 0) AS DOUBLE PRECISION) AS cost";

/// The `SELECT` list that sums a rollup's sum `columns` (in [`Sums`] field order) into [`Sums`].
pub(super) fn rollup_sums(columns: &[&str; 10]) -> String {
    columns
        .iter()
        .zip(USAGE_DAILY_SUM_COLUMNS)
        .map(|(column, field)| {
            let ty = if field == "cost" {
                "DOUBLE PRECISION"
            } else {
                "BIGINT"
            };
            format!("CAST(COALESCE(SUM({column}), 0) AS {ty}) AS {field}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Inserts `rows` and adds their sums to the daily rollups and `provider_stats`, in one
/// transaction (so the rollups never disagree with the log).
pub fn record_batch(conn: &mut DbConn, rows: &[NewRequestLog]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    // The rollups key on the model name too: cleaned once, for both.
    let rows = &*logs::without_nuls(rows);
    let rollup = Rollup::of(rows);
    conn.transaction(|conn| {
        logs::insert_rows(conn, rows)?;
        rollup.add_to(conn)
    })
}

/// A batch's contribution to the rollups. Ordered maps: concurrent writers lock rollup rows in the
/// same order, so two of them cannot deadlock on each other.
#[derive(Debug, Default)]
struct Rollup {
    /// (day, provider_id, user_id or '', model)
    usage: BTreeMap<(NaiveDate, String, String, String), Sums>,
    /// (provider_id, day)
    providers: BTreeMap<(String, NaiveDate), Sums>,
    /// (provider_id, day, user_id)
    users: BTreeSet<(String, NaiveDate, String)>,
}

impl Rollup {
    fn of(rows: &[NewRequestLog]) -> Rollup {
        let mut rollup = Rollup::default();
        for row in rows {
            let day = row.ts.date();
            let sums = Sums::of(row);
            let user = row.user_id.clone().unwrap_or_default();
            rollup
                .providers
                .entry((row.provider_id.clone(), day))
                .or_default()
                .add(&sums);
            if !user.is_empty() {
                rollup
                    .users
                    .insert((row.provider_id.clone(), day, user.clone()));
            }
            rollup
                .usage
                .entry((day, row.provider_id.clone(), user, row.model.clone()))
                .or_default()
                .add(&sums);
        }
        rollup
    }

    /// Adds the batch's sums to the stored ones (creating the rows of new keys).
    fn add_to(&self, conn: &mut DbConn) -> Result<(), StoreError> {
        let mut usage = Upsert::new(
            "usage_daily",
            &["day", "provider_id", "user_id", "model"],
            &USAGE_DAILY_SUM_COLUMNS,
        );
        let (mut days, mut providers, mut users, mut models) = (vec![], vec![], vec![], vec![]);
        let mut sums = SumColumns::default();
        for ((day, provider, user, model), s) in &self.usage {
            days.push(*day);
            providers.push(provider.clone());
            users.push(user.clone());
            models.push(model.clone());
            sums.push(s);
        }
        usage.values = vec![
            Column::Date(days),
            Column::Text(providers),
            Column::Text(users),
            Column::Text(models),
        ];
        usage.values.extend(sums.into_columns());
        usage.run(conn)?;

        let mut per_provider = Upsert::new(
            "provider_stats",
            &["provider_id", "day"],
            &PROVIDER_STATS_SUM_COLUMNS,
        );
        per_provider.replaced = Some("updated_at");
        let (mut providers, mut days) = (vec![], vec![]);
        let mut sums = SumColumns::default();
        for ((provider, day), s) in &self.providers {
            providers.push(provider.clone());
            days.push(*day);
            sums.push(s);
        }
        let updated_at = vec![super::now(); providers.len()];
        per_provider.values = vec![Column::Text(providers), Column::Date(days)];
        per_provider.values.extend(sums.into_columns());
        per_provider.values.push(Column::Timestamp(updated_at));
        per_provider.run(conn)?;

        let mut day_users =
            Upsert::new("usage_daily_users", &["provider_id", "day", "user_id"], &[]);
        let (mut providers, mut days, mut users) = (vec![], vec![], vec![]);
        for (provider, day, user) in &self.users {
            providers.push(provider.clone());
            days.push(*day);
            users.push(user.clone());
        }
        day_users.values = vec![
            Column::Text(providers),
            Column::Date(days),
            Column::Text(users),
        ];
        day_users.run(conn)
    }
}

/// [`Sums`] of many rows, column by column.
#[derive(Default)]
struct SumColumns {
    counts: [Vec<i64>; 9],
    cost: Vec<f64>,
}

impl SumColumns {
    fn push(&mut self, s: &Sums) {
        let counts = [
            s.requests,
            s.successes,
            s.errors,
            s.timeouts,
            s.quota_exhausted,
            s.rate_limited,
            s.input_tokens,
            s.output_tokens,
            s.latency_ms,
        ];
        for (column, value) in self.counts.iter_mut().zip(counts) {
            column.push(value);
        }
        self.cost.push(s.cost);
    }

    /// In [`Sums`] field order.
    fn into_columns(self) -> impl Iterator<Item = Column> {
        self.counts
            .into_iter()
            .map(Column::BigInt)
            .chain([Column::Double(self.cost)])
    }
}
/// Recomputes `day`'s rollups (`usage_daily`, `usage_daily_users`, `provider_stats`) from
/// `request_logs`; idempotent. Returns the number of request rows of that day. Run it for days
/// the log still holds: a day past the retention would be recomputed as empty.
pub fn aggregate_day(conn: &mut DbConn, day: NaiveDate) -> Result<u64, StoreError> {
    let (start, end) = day_bounds(day);
    conn.transaction(|conn| {
        // A tracker batch committing between our DELETE and our INSERT … SELECT would be counted
        // twice or not at all; on Postgres, lock the rollups against writers (the tracker waits,
        // its buffer holds the rows). On SQLite the first DELETE already takes the write lock.
        if matches!(conn, DbConn::Postgres(_)) {
            statement(
                conn,
                "LOCK TABLE usage_daily, usage_daily_users, provider_stats IN EXCLUSIVE MODE",
            )
            .execute(conn)?;
        }
        for table in ["usage_daily", "usage_daily_users", "provider_stats"] {
            statement(conn, &format!("DELETE FROM {table} WHERE day = ?"))
                .bind::<Date, _>(day)
                .execute(conn)?;
        }
        statement(
            conn,
            &format!(
                "INSERT INTO usage_daily (day, provider_id, user_id, model, {}) \
                 SELECT ?, provider_id, COALESCE(user_id, ''), model, {LOG_SUMS} \
                 FROM request_logs WHERE ts >= ? AND ts < ? \
                 GROUP BY provider_id, COALESCE(user_id, ''), model",
                USAGE_DAILY_SUM_COLUMNS.join(", ")
            ),
        )
        .bind::<Date, _>(day)
        .bind::<Timestamp, _>(start)
        .bind::<Timestamp, _>(end)
        .execute(conn)?;
        statement(
            conn,
            "INSERT INTO usage_daily_users (provider_id, day, user_id) \
             SELECT DISTINCT provider_id, ?, user_id FROM request_logs \
             WHERE ts >= ? AND ts < ? AND user_id IS NOT NULL AND user_id <> ''",
        )
        .bind::<Date, _>(day)
        .bind::<Timestamp, _>(start)
        .bind::<Timestamp, _>(end)
        .execute(conn)?;
        statement(
            conn,
            &format!(
                "INSERT INTO provider_stats (provider_id, day, {}, updated_at) \
                 SELECT provider_id, ?, {LOG_SUMS}, ? \
                 FROM request_logs WHERE ts >= ? AND ts < ? GROUP BY provider_id",
                PROVIDER_STATS_SUM_COLUMNS.join(", ")
            ),
        )
        .bind::<Date, _>(day)
        .bind::<Timestamp, _>(super::now())
        .bind::<Timestamp, _>(start)
        .bind::<Timestamp, _>(end)
        .execute(conn)?;
        let total = statement(
            conn,
            &format!(
                "SELECT {} FROM provider_stats WHERE day = ?",
                rollup_sums(&PROVIDER_STATS_SUM_COLUMNS)
            ),
        )
        .bind::<Date, _>(day)
        .get_result::<Sums>(conn)?;
        Ok(total.requests.max(0) as u64)
    })
}

pub(super) fn midnight(day: NaiveDate) -> NaiveDateTime {
    day.and_time(NaiveTime::MIN)
}

pub(super) fn next_day(day: NaiveDate) -> NaiveDate {
    day.checked_add_days(Days::new(1)).unwrap_or(NaiveDate::MAX)
}

/// `[day 00:00, next day 00:00)`.
fn day_bounds(day: NaiveDate) -> (NaiveDateTime, NaiveDateTime) {
    (midnight(day), midnight(next_day(day)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    #[test]
    fn failures_are_classified_by_error_type() {
        let row = |success: bool, error_type: Option<&str>| NewRequestLog {
            request_id: "r".into(),
            ts: t("2026-11-01 00:00:00"),
            provider_id: "p".into(),
            account_id: None,
            model: "m".into(),
            user_id: None,
            method: "POST".into(),
            endpoint: "/v1/chat/completions".into(),
            status_code: 200,
            latency_ms: 1,
            input_tokens: 0,
            output_tokens: 0,
            success,
            error_type: error_type.map(str::to_string),
            error_message: None,
            estimated_cost: 0.0,
        };
        assert_eq!(classify(&row(true, Some("timeout"))), Outcome::Success);
        assert_eq!(classify(&row(false, Some("timeout"))), Outcome::Timeout);
        assert_eq!(
            classify(&row(false, Some("quota_exceeded"))),
            Outcome::QuotaExhausted
        );
        assert_eq!(
            classify(&row(false, Some("rate_limited"))),
            Outcome::RateLimited
        );
        assert_eq!(
            classify(&row(false, Some("upstream_error"))),
            Outcome::Error
        );
        assert_eq!(classify(&row(false, None)), Outcome::Error);
    }
}
