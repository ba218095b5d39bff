//! The seed's own URLs (issue 11): `from`/`to` written as plain dates, as the seed's guide does
//! (`GET /api/v1/stats/usage?from=2024-01-01&to=2024-01-31`), mean whole UTC days — `from` the
//! start of its day, `to` the end of its day — on every stats route that takes them.

mod common;

use chrono::NaiveDateTime;
use common::status::{StatusFixture, PROVIDER};
use quotagate::config::{Config, DatabaseBackend};
use quotagate::store::logs::NewRequestLog;
use quotagate::store::{rollup, Store};

fn at(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap()
}

fn row(ts: &str, provider_id: &str, success: bool) -> NewRequestLog {
    NewRequestLog {
        request_id: format!("seed-{ts}"),
        ts: at(ts),
        provider_id: provider_id.to_string(),
        account_id: None,
        model: "seed-model".into(),
        user_id: None,
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        status_code: if success { 200 } else { 502 },
        latency_ms: 100,
        input_tokens: 10,
        output_tokens: 5,
        success,
        error_type: (!success).then(|| "upstream_error".to_string()),
        error_message: (!success).then(|| "the upstream failed".to_string()),
        estimated_cost: 0.0,
    }
}

#[actix_rt::test]
async fn the_seeds_usage_url_with_plain_dates_counts_whole_utc_days() {
    let f = StatusFixture::start("").await;
    // January 2024 in the gateway's own database: its first and last instants count, the
    // instants just outside do not.
    let config = Config::load(f.gw.config_path()).unwrap();
    let DatabaseBackend::Sqlite(_) = config.database_backend() else {
        panic!("the fixture runs on SQLite");
    };
    let store = Store::open_and_migrate(&config.database_backend(), 2)
        .unwrap()
        .0;
    let pid = f.provider_id.clone();
    rollup::record_batch(
        &mut store.conn().unwrap(),
        &[
            row("2023-12-31 23:59:59.999999", &pid, true),
            row("2024-01-01 00:00:00", &pid, true),
            row("2024-01-15 12:00:00", &pid, false),
            row("2024-01-31 23:59:59.999999", &pid, true),
            row("2024-02-01 00:00:00", &pid, true),
        ],
    )
    .unwrap();

    let usage = f
        .admin_get("/api/v1/stats/usage?from=2024-01-01&to=2024-01-31")
        .await;
    assert_eq!(usage.status, 200, "{usage}");
    let usage = usage.json();
    assert_eq!(usage["total_requests"], 3, "{usage}");
    assert_eq!(usage["successful_requests"], 2, "{usage}");
    assert_eq!(usage["total_input_tokens"], 30);
    assert_eq!(usage["period"]["from"], "2024-01-01T00:00:00Z");
    assert_eq!(usage["period"]["to"], "2024-02-01T00:00:00Z");

    // One day, both ends the same date.
    let day = f
        .admin_get("/api/v1/stats/usage?from=2024-01-31&to=2024-01-31")
        .await
        .json();
    assert_eq!(day["total_requests"], 1, "{day}");

    // Mixed with RFC 3339, and on the other routes that take a range.
    let mixed = f
        .admin_get("/api/v1/stats/usage?from=2024-01-15T00:00:00Z&to=2024-01-31")
        .await
        .json();
    assert_eq!(mixed["total_requests"], 2, "{mixed}");
    let provider = f
        .admin_get(&format!(
            "/api/v1/stats/providers/{PROVIDER}?from=2024-01-01&to=2024-01-31"
        ))
        .await;
    assert_eq!(provider.status, 200, "{provider}");
    assert_eq!(provider.json()["total_requests"], 3, "{provider}");
    let errors = f
        .admin_get(&format!(
            "/api/v1/stats/errors/{PROVIDER}?from=2024-01-01&to=2024-01-31"
        ))
        .await
        .json();
    assert_eq!(errors["total_errors"], 1, "{errors}");
    let top = f
        .admin_get("/api/v1/stats/models/top?from=2024-01-01&to=2024-01-31")
        .await
        .json();
    assert_eq!(top[0]["model"], "seed-model", "{top}");
    assert_eq!(top[0]["request_count"], 3, "{top}");

    // A client key reads its own usage with the same URL.
    let own = f
        .http
        .get(
            &f.url("/api/v1/stats/usage?from=2024-01-01&to=2024-01-31"),
            Some(f.gw.client_key()),
        )
        .await;
    assert_eq!(own.status, 200, "{own}");

    // A date that is no date is still a 400 naming its parameter.
    let bad = f
        .admin_get("/api/v1/stats/usage?from=2024-01-01&to=2024-13-01")
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "to", "{bad}");
}
