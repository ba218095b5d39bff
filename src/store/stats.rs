//! Request statistics: the daily rollups every tracker batch keeps up to date, the seed's queries
//! over them (`GetUsageStats`, `GetProviderStats`, `GetTopModels`, `GetErrorStats`), the daily
//! re-aggregation and the retention cleanup.
//!
//! Why rollups: a query over a long range would otherwise scan every request row in it. Whole
//! UTC days inside a range `[from, to)` are read from the rollups; only the partial days at its
//! edges are read from `request_logs`, through its `ts` indexes:
//! - `provider_stats` (one row per provider and day) answers for a provider and for everyone;
//! - `usage_daily` (per day, provider, user and model) for one user and for the top models;
//! - `usage_daily_users` (who used a provider on a day) for unique users across days.
//!
//! [`record_batch`] writes the rollups in the same transaction as the rows they sum, so the two
//! agree without ever rescanning the log; [`aggregate_day`] recomputes one day from the log (the
//! daily job), which also repairs a day whose rows were written around the rollups (e.g. by
//! `logs::insert_batch`). Rollups are kept when retention deletes the log: they are the long-term
//! history, so a range older than the retention still has its whole days (its partial edge days,
//! read from the deleted log, count nothing).
//!
//! The SQL is portable: placeholders are written `?` and renumbered `$n` for Postgres, and
//! `ON CONFLICT … DO UPDATE` exists on both backends (SQLite ≥ 3.24). Only the bulk writes differ
//! (see `Upsert` and `logs::insert_rows`). Times are UTC.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use diesel::connection::Connection as _;
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Date, Double, Text, Timestamp};
use diesel::{QueryableByName, RunQueryDsl as _};
use serde::Serialize;

use super::logs::{self, NewRequestLog};
use super::{DbConn, MultiBackend, StoreError};

/// The `actor` of audit rows written from runtime events (cooldowns, quota resets, …). They are
/// operational and as frequent as upstream 429s, so [`cleanup`] applies the log's retention to
/// them; changes made by people (`config`, `cli`, `admin-api`) are kept.
pub const RUNTIME_ACTOR: &str = "runtime";

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
struct Sums {
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    successes: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    timeouts: i64,
    #[diesel(sql_type = BigInt)]
    quota_exhausted: i64,
    #[diesel(sql_type = BigInt)]
    rate_limited: i64,
    #[diesel(sql_type = BigInt)]
    input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    latency_ms: i64,
    #[diesel(sql_type = Double)]
    cost: f64,
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

    fn add(&mut self, other: &Sums) {
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

    fn success_rate(&self) -> f64 {
        ratio(self.successes, self.requests)
    }

    fn avg_latency_ms(&self) -> f64 {
        ratio(self.latency_ms, self.requests)
    }
}

/// The sum columns of `usage_daily`: the names of the [`Sums`] fields, in order.
const USAGE_DAILY_SUM_COLUMNS: [&str; 10] = [
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
const PROVIDER_STATS_SUM_COLUMNS: [&str; 10] = [
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
const LOG_SUMS: &str = "\
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
fn rollup_sums(columns: &[&str; 10]) -> String {
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

/// Rows of one rollup table to upsert: `INSERT … ON CONFLICT (key) DO UPDATE` adding the new sums
/// to the stored ones (or `DO NOTHING` when there are none).
///
/// Postgres gets one statement whatever the batch, its rows as one array per column
/// (`UNNEST`): a few typed parameters parse and plan much faster than a `VALUES` list with
/// thousands. SQLite, which has no arrays, gets `VALUES` lists of bound scalars.
struct Upsert {
    table: &'static str,
    key: &'static [&'static str],
    added: &'static [&'static str],
    /// A column set to the new row's value on conflict (a timestamp).
    replaced: Option<&'static str>,
    /// Column-major: key columns, added columns, then the replaced column.
    values: Vec<Column>,
}

/// Rollup rows per SQLite statement: 14 binds each stays under its 32,766 bound values.
const ROLLUP_ROWS_PER_STATEMENT: usize = 1000;

impl Upsert {
    fn new(
        table: &'static str,
        key: &'static [&'static str],
        added: &'static [&'static str],
    ) -> Upsert {
        Upsert {
            table,
            key,
            added,
            replaced: None,
            values: Vec::new(),
        }
    }

    fn sql(&self, rows: &str) -> String {
        let columns: Vec<&str> = self
            .key
            .iter()
            .chain(self.added)
            .chain(&self.replaced)
            .copied()
            .collect();
        let table = self.table;
        let mut set: Vec<String> = self
            .added
            .iter()
            .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
            .collect();
        set.extend(self.replaced.map(|c| format!("{c} = excluded.{c}")));
        let action = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        format!(
            "INSERT INTO {table} ({}) {rows} ON CONFLICT ({}) {action}",
            columns.join(", "),
            self.key.join(", ")
        )
    }

    fn run(self, conn: &mut DbConn) -> Result<(), StoreError> {
        let rows = self.values.first().map_or(0, Column::len);
        if rows == 0 {
            return Ok(());
        }
        match conn {
            DbConn::Postgres(pg) => {
                let arrays: Vec<String> =
                    (1..=self.values.len()).map(|n| format!("${n}")).collect();
                let sql = self.sql(&format!("SELECT * FROM UNNEST({})", arrays.join(", ")));
                let mut query = diesel::sql_query(sql).into_boxed::<Pg>();
                for column in self.values {
                    query = column.bind_array(query);
                }
                query.execute(pg)?;
            }
            DbConn::Sqlite(_) => {
                for start in (0..rows).step_by(ROLLUP_ROWS_PER_STATEMENT) {
                    let end = (start + ROLLUP_ROWS_PER_STATEMENT).min(rows);
                    let tuple = format!("({})", vec!["?"; self.values.len()].join(", "));
                    let sql = self.sql(&format!("VALUES {}", vec![tuple; end - start].join(", ")));
                    let mut query = statement(conn, &sql);
                    for row in start..end {
                        for column in &self.values {
                            query = column.bind_value(row, query);
                        }
                    }
                    query.execute(conn)?;
                }
            }
        }
        Ok(())
    }
}

/// One column of the rows of an [`Upsert`].
enum Column {
    Date(Vec<NaiveDate>),
    Text(Vec<String>),
    BigInt(Vec<i64>),
    Double(Vec<f64>),
    Timestamp(Vec<NaiveDateTime>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Date(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::BigInt(v) => v.len(),
            Column::Double(v) => v.len(),
            Column::Timestamp(v) => v.len(),
        }
    }

    /// Binds row `i`'s value.
    fn bind_value(&self, i: usize, query: Statement) -> Statement {
        match self {
            Column::Date(v) => query.bind::<Date, _>(v[i]),
            Column::Text(v) => query.bind::<Text, _>(v[i].clone()),
            Column::BigInt(v) => query.bind::<BigInt, _>(v[i]),
            Column::Double(v) => query.bind::<Double, _>(v[i]),
            Column::Timestamp(v) => query.bind::<Timestamp, _>(v[i]),
        }
    }

    /// Binds the whole column as one Postgres array.
    fn bind_array(self, query: PgStatement) -> PgStatement {
        match self {
            Column::Date(v) => query.bind::<Array<Date>, _>(v),
            Column::Text(v) => query.bind::<Array<Text>, _>(v),
            Column::BigInt(v) => query.bind::<Array<BigInt>, _>(v),
            Column::Double(v) => query.bind::<Array<Double>, _>(v),
            Column::Timestamp(v) => query.bind::<Array<Timestamp>, _>(v),
        }
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

fn midnight(day: NaiveDate) -> NaiveDateTime {
    day.and_time(NaiveTime::MIN)
}

fn next_day(day: NaiveDate) -> NaiveDate {
    day.checked_add_days(Days::new(1)).unwrap_or(NaiveDate::MAX)
}

/// `[day 00:00, next day 00:00)`.
fn day_bounds(day: NaiveDate) -> (NaiveDateTime, NaiveDateTime) {
    (midnight(day), midnight(next_day(day)))
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

// ---------------------------------------------------------------------------------------------
// Raw statements

pub(super) type Statement = BoxedSqlQuery<'static, MultiBackend, SqlQuery>;
type PgStatement = BoxedSqlQuery<'static, Pg, SqlQuery>;

/// A raw statement for `conn`'s backend: the `?` placeholders of `sql` become `$1, $2, …` on
/// Postgres. (The statements of this module have no `?` inside string literals.)
pub(super) fn statement(conn: &DbConn, sql: &str) -> Statement {
    let text = match conn {
        DbConn::Postgres(_) => {
            let mut numbered = String::with_capacity(sql.len() + 32);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    numbered.push('$');
                    numbered.push_str(&n.to_string());
                } else {
                    numbered.push(c);
                }
            }
            numbered
        }
        DbConn::Sqlite(_) => sql.to_string(),
    };
    diesel::sql_query(text).into_boxed()
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
