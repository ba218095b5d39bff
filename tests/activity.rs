//! The status page's reads of the request log (`store::activity`), on embedded SQLite and on a
//! real Postgres (`scripts/test` starts it): per-minute counts per provider, each account's use
//! over the rate span, and each account's last upstream error.

mod common;

use chrono::{Duration, NaiveDateTime};
use quotagate::config::DatabaseBackend;
use quotagate::secrets::Secret;
use quotagate::store::activity::{self, MinuteCount};
use quotagate::store::logs::{self, NewRequestLog};
use quotagate::store::Store;

fn row(
    ts: NaiveDateTime,
    account: &str,
    status: i32,
    error_type: Option<&str>,
    tokens: i64,
) -> NewRequestLog {
    NewRequestLog {
        request_id: uuid::Uuid::new_v4().to_string(),
        ts,
        provider_id: "p1".into(),
        account_id: Some(account.into()),
        model: "m".into(),
        user_id: None,
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        status_code: status,
        latency_ms: 10,
        input_tokens: tokens,
        output_tokens: tokens / 2,
        success: status < 400,
        error_type: error_type.map(str::to_string),
        error_message: error_type.map(|t| format!("{t} happened")),
        estimated_cost: 0.0,
    }
}

fn recent_activity_is_read_by_minute_account_and_last_error(store: Store) {
    let now = quotagate::store::now();
    let mut conn = store.conn().unwrap();
    logs::insert_batch(
        &mut conn,
        &[
            row(now - Duration::seconds(30), "a1", 200, None, 10),
            row(
                now - Duration::seconds(90),
                "a1",
                502,
                Some("upstream_error"),
                0,
            ),
            row(
                now - Duration::minutes(20) - Duration::seconds(5),
                "a2",
                200,
                None,
                100,
            ),
            row(now - Duration::hours(2), "a1", 504, Some("timeout"), 0),
            row(
                now - Duration::seconds(10),
                "a2",
                499,
                Some("client_closed"),
                0,
            ),
        ],
    )
    .unwrap();
    let got = activity::recent(&mut conn, now, 60, Duration::minutes(15)).unwrap();

    let mut minutes = got.minutes.clone();
    minutes.sort_by_key(|m| m.ago);
    let minute = |ago, requests, errors| MinuteCount {
        provider_id: "p1".into(),
        ago,
        requests,
        errors,
    };
    assert_eq!(
        minutes,
        [minute(0, 2, 1), minute(1, 1, 1), minute(20, 1, 0)],
        "the two-hour-old row is out of the hour"
    );

    let mut used = got.account_use.clone();
    used.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(
        (
            used[0].account_id.as_str(),
            used[0].requests,
            used[0].tokens
        ),
        ("a1", 2, 15)
    );
    assert_eq!(
        (
            used[1].account_id.as_str(),
            used[1].requests,
            used[1].tokens
        ),
        ("a2", 1, 0),
        "the 20-minute-old row is outside the rate span"
    );

    assert_eq!(got.last_errors.len(), 1, "{:?}", got.last_errors);
    let e = &got.last_errors[0];
    assert_eq!(e.account_id, "a1");
    assert_eq!(e.status_code, 502);
    assert_eq!(e.error_message.as_deref(), Some("upstream_error happened"));
    assert_eq!(e.ts, now - Duration::seconds(90));
}

#[test]
fn sqlite_recent_activity() {
    let dir = tempfile::tempdir().unwrap();
    let backend = DatabaseBackend::Sqlite(dir.path().join("q.db"));
    let (store, _) = Store::open_and_migrate(&backend, 2).unwrap();
    recent_activity_is_read_by_minute_account_and_last_error(store);
}

#[test]
#[ignore = "needs postgres: run scripts/test"]
fn postgres_recent_activity() {
    let backend = DatabaseBackend::Postgres(Secret::new(common::pg_database()));
    let (store, _) = Store::open_and_migrate(&backend, 2).unwrap();
    recent_activity_is_read_by_minute_account_and_last_error(store);
}
