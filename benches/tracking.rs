//! `cargo bench --bench tracking`: request tracking throughput and the stats query on a large log.
//!
//! Prints one line per figure, comparable over time:
//!
//! ```text
//! tracker_rows_per_sec_sqlite: N          sustained rows/s through the Tracker (config defaults:
//!                                         batches of 500, buffer 100,000), rollups included
//! single_insert_rows_per_sec_sqlite: N    one INSERT (its own transaction) per row, same run
//! tracker_rows_per_sec_postgres: N
//! single_insert_rows_per_sec_postgres: N
//! stats_query_ms_10m_rows: N              usage stats for the last 24 hours (never aligned to
//!                                         midnight: a day of rows read from the log) with 10
//!                                         million rows in request_logs; median of 21 runs
//! stats_query_ms_10m_rows_*: N            the same for other ranges (informative)
//! ```
//!
//! The Postgres parts run only when `QUOTAGATE_BENCH_PG_URL` is set to a URL that may create
//! databases: the benchmark creates `qg_bench_<uuid>`, migrates it and drops it at the end.
//! The 10-million-row part runs only under `cargo bench` (it takes a few minutes to generate);
//! under `cargo test` every other part runs once on a few rows, as a smoke test.
//!
//! Against a throwaway cluster (as root on Debian, the way `scripts/test` starts one; the
//! settings trade durability for speed, so absolute figures are optimistic for both methods):
//!
//! ```sh
//! PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1); PD=$(mktemp -d /tmp/qg-bench.XXXX)
//! chown postgres:postgres "$PD"
//! runuser -u postgres -- "$PGBIN/initdb" -D "$PD/data" -U postgres --auth=trust --no-locale
//! runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PD/data" -l "$PD/pg.log" -w \
//!   -o "-p 54329 -c listen_addresses=127.0.0.1 -k $PD -c fsync=off -c synchronous_commit=off" start
//! QUOTAGATE_BENCH_PG_URL=postgres://postgres@127.0.0.1:54329/postgres cargo bench --bench tracking
//! runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PD/data" stop && rm -rf "$PD"
//! ```

use std::time::{Duration, Instant};

use chrono::{Days, NaiveDate, NaiveDateTime, NaiveTime};
use diesel::connection::SimpleConnection as _;
use diesel::{Connection as _, RunQueryDsl as _};
use quotagate::actors::tracker::Tracker;
use quotagate::config::{DatabaseBackend, TrackingConfig};
use quotagate::metrics::Metrics;
use quotagate::secrets::Secret;
use quotagate::store::logs::{self, NewRequestLog};
use quotagate::store::{stats, Store};

const PG_URL_ENV: &str = "QUOTAGATE_BENCH_PG_URL";

/// How much work each part does: a smoke test under `cargo test`, real figures under `--bench`.
struct Sizes {
    tracker_rows: usize,
    single_rows: usize,
    large_log: bool,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            tracker_rows: 300_000,
            single_rows: 10_000,
            large_log: true,
        }
    } else {
        Sizes {
            tracker_rows: 2_000,
            single_rows: 50,
            large_log: false,
        }
    };

    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = open(&DatabaseBackend::Sqlite(dir.path().join("bench.db")));
    let (tracked, single) = throughput(&sqlite, &sizes);
    println!("tracker_rows_per_sec_sqlite: {tracked:.0}");
    println!("single_insert_rows_per_sec_sqlite: {single:.0}");

    let Some(admin_url) = std::env::var(PG_URL_ENV).ok().filter(|u| !u.is_empty()) else {
        println!("tracker_rows_per_sec_postgres: skipped: set {PG_URL_ENV}");
        println!("single_insert_rows_per_sec_postgres: skipped: set {PG_URL_ENV}");
        println!("stats_query_ms_10m_rows: skipped: set {PG_URL_ENV}");
        return;
    };
    let database = BenchDatabase::create(&admin_url);
    let postgres = open(&DatabaseBackend::Postgres(Secret::new(
        database.url.clone(),
    )));
    let (tracked, single) = throughput(&postgres, &sizes);
    println!("tracker_rows_per_sec_postgres: {tracked:.0}");
    println!("single_insert_rows_per_sec_postgres: {single:.0}");

    if sizes.large_log {
        // A fresh database: the throughput rows above would only blur the data set.
        let large = BenchDatabase::create(&admin_url);
        let store = open(&DatabaseBackend::Postgres(Secret::new(large.url.clone())));
        stats_queries(&store);
    } else {
        println!("stats_query_ms_10m_rows: skipped: runs under cargo bench only");
    }
}

fn open(backend: &DatabaseBackend) -> Store {
    Store::open_and_migrate(backend, 4)
        .expect("bench database")
        .0
}

fn row(i: usize, ts: NaiveDateTime) -> NewRequestLog {
    NewRequestLog {
        request_id: format!("bench-{i}"),
        ts,
        provider_id: format!("provider-{}", i % 3),
        account_id: Some(format!("account-{}", i % 30)),
        model: format!("model-{}", i % 7),
        user_id: Some(format!("user-{}", i % 100)),
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        status_code: 200,
        latency_ms: 120 + (i % 500) as i64,
        input_tokens: 200 + (i % 300) as i64,
        output_tokens: 50 + (i % 200) as i64,
        success: !i.is_multiple_of(50),
        error_type: i.is_multiple_of(50).then(|| "upstream_error".to_string()),
        error_message: i.is_multiple_of(50).then(|| "bad gateway".to_string()),
        estimated_cost: 0.0002,
    }
}

/// (tracker rows/s, single-insert rows/s) on one store.
fn throughput(store: &Store, sizes: &Sizes) -> (f64, f64) {
    let now = quotagate::store::now();
    let rows: Vec<NewRequestLog> = (0..sizes.tracker_rows).map(|i| row(i, now)).collect();
    let tracked = tracker_rate(store, rows);

    let mut conn = store.conn().expect("connection");
    let rows: Vec<NewRequestLog> = (0..sizes.single_rows)
        .map(|i| row(sizes.tracker_rows + i, now))
        .collect();
    let start = Instant::now();
    for row in &rows {
        logs::insert_batch(&mut conn, std::slice::from_ref(row)).expect("insert");
    }
    let single = rows.len() as f64 / start.elapsed().as_secs_f64();
    (tracked, single)
}

/// Feeds `rows` to a tracker from another thread as fast as it takes them, then flushes; rows
/// written per second. The producer pauses while the tracker's queue is half full or its
/// mailbox holds thousands of rows: a gateway never sends that fast, and a dropped row would not
/// measure the database.
fn tracker_rate(store: &Store, rows: Vec<NewRequestLog>) -> f64 {
    const MAX_IN_MAILBOX: u64 = 4096;
    let settings = TrackingConfig::default();
    let half_buffer = (settings.buffer / 2) as u64;
    let total = rows.len() as u64;
    let before = count(store);
    actix::System::new().block_on(async move {
        let metrics = Metrics::new();
        let tracker = Tracker::start(store.clone(), &settings, &metrics);
        let start = Instant::now();
        let producer = std::thread::spawn({
            let (tracker, m) = (tracker.clone(), metrics.tracking.clone());
            move || {
                for (sent, row) in rows.into_iter().enumerate() {
                    let sent = sent as u64;
                    if sent.is_multiple_of(256) {
                        loop {
                            let depth = m.tracker_queue_depth.get().max(0) as u64;
                            let taken = m.tracker_rows_written_total.get() + depth;
                            if depth <= half_buffer && sent.saturating_sub(taken) <= MAX_IN_MAILBOX
                            {
                                break;
                            }
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    }
                    tracker.track(row);
                }
            }
        });
        tokio::task::spawn_blocking(move || producer.join())
            .await
            .expect("join")
            .expect("producer");
        tracker.flush().await.expect("flush");
        let elapsed = start.elapsed().as_secs_f64();
        let m = &metrics.tracking;
        let written = m.tracker_rows_written_total.get();
        assert_eq!(
            m.tracker_dropped_total.get(),
            0,
            "the producer outran the tracker"
        );
        assert_eq!(written, total);
        assert_eq!(count(store) - before, total as i64);
        written as f64 / elapsed
    })
}

fn count(store: &Store) -> i64 {
    logs::count(&mut store.conn().expect("connection")).expect("count")
}

/// 10 million rows over the 90 days before `END` (the default retention), with the rollups of
/// each day, then the usage-stats query over several ranges.
fn stats_queries(store: &Store) {
    const ROWS: i64 = 10_000_000;
    const DAYS: u64 = 90;
    const CHUNK: i64 = 1_000_000;
    let end = NaiveDate::from_ymd_opt(2026, 11, 28).expect("date");
    let start = end.checked_sub_days(Days::new(DAYS)).expect("date");
    let mut conn = store.conn().expect("connection");
    let quotagate::store::DbConn::Postgres(pg) = &mut *conn else {
        unreachable!("a Postgres store");
    };
    let ms_per_row = (DAYS * 86_400_000) as f64 / ROWS as f64;
    let generated = Instant::now();
    for first in (0..ROWS).step_by(CHUNK as usize) {
        // In time order, as a gateway appends them; one row in 50 failed.
        diesel::sql_query(format!(
            "INSERT INTO request_logs (request_id, ts, provider_id, account_id, model, user_id, \
             method, endpoint, status_code, latency_ms, input_tokens, output_tokens, success, \
             error_type, error_message, estimated_cost) \
             SELECT 'bench-' || g, TIMESTAMP '{start} 00:00:00' + g * {ms_per_row} * INTERVAL \
             '1 millisecond', 'provider-' || g % 3, 'account-' || g % 30, 'model-' || g % 7, \
             'user-' || g % 5000, 'POST', '/v1/chat/completions', \
             CASE WHEN g % 50 = 0 THEN 502 ELSE 200 END, 50 + g % 1000, 100 + g % 500, \
             50 + g % 300, g % 50 <> 0, CASE WHEN g % 50 = 0 THEN 'upstream_error' END, \
             CASE WHEN g % 50 = 0 THEN 'bad gateway' END, (g % 100) * 0.0001 \
             FROM generate_series({first}, {last}) AS g",
            last = first + CHUNK - 1
        ))
        .execute(pg)
        .expect("generate rows");
        eprintln!("generated {} rows", first + CHUNK);
    }
    let generate_s = generated.elapsed().as_secs_f64();
    let aggregated = Instant::now();
    let mut day = start;
    while day < end {
        stats::aggregate_day(&mut conn, day).expect("aggregate");
        day = day.checked_add_days(Days::new(1)).expect("date");
    }
    let aggregate_s = aggregated.elapsed().as_secs_f64();
    let quotagate::store::DbConn::Postgres(pg) = &mut *conn else {
        unreachable!("a Postgres store");
    };
    pg.batch_execute("VACUUM ANALYZE").expect("analyze");
    eprintln!("generated in {generate_s:.0} s, rollups in {aggregate_s:.0} s");

    // "Now" is mid-afternoon of the last day: the API's default range, the last 24 hours.
    let now = end
        .checked_sub_days(Days::new(1))
        .expect("date")
        .and_time(NaiveTime::from_hms_opt(14, 27, 0).expect("time"));
    let day_ago = now - chrono::Duration::hours(24);
    let midnight = end.and_time(NaiveTime::MIN);
    let ranges = [
        ("stats_query_ms_10m_rows", None, day_ago, now),
        (
            "stats_query_ms_10m_rows_one_user",
            Some("user-42"),
            day_ago,
            now,
        ),
        (
            "stats_query_ms_10m_rows_whole_day",
            None,
            midnight - chrono::Duration::hours(24),
            midnight,
        ),
        (
            "stats_query_ms_10m_rows_30_days",
            None,
            now - chrono::Duration::days(30),
            now,
        ),
    ];
    for (name, user, from, to) in ranges {
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let start = Instant::now();
                let stats = stats::usage_stats(&mut conn, user, from, to).expect("usage stats");
                assert!(stats.total_requests > 0);
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("{name}: {:.1}", times[times.len() / 2]);
    }
}

/// A database created for this run in the cluster of `admin_url`, dropped at the end.
struct BenchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    fn create(admin_url: &str) -> BenchDatabase {
        let name = format!("qg_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = diesel::PgConnection::establish(admin_url)
            .unwrap_or_else(|e| panic!("{PG_URL_ENV}: {e}"));
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .expect("CREATE DATABASE");
        let url = with_database(admin_url, &name);
        BenchDatabase {
            admin_url: admin_url.to_string(),
            name,
            url,
        }
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = diesel::PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name))
                .execute(&mut admin);
        }
    }
}

/// `url` with its database (the path) replaced by `name`, query parameters kept.
fn with_database(url: &str, name: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(scheme_end);
    let (authority, after) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let query = after.find('?').map_or("", |i| &after[i..]);
    format!("{head}{authority}/{name}{query}")
}
