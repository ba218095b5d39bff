//! Restore after a crash (issue 8, §5), end to end: the real binary killed with SIGKILL (or
//! stopped) and started again on the same data, in front of the mock upstream.
//!
//! What a crash may cost (README, "Persistence, restarts and backups"): nothing when the
//! gateway was idle (the crash mark in `data_dir` says so); otherwise what could really have been
//! admitted since the last complete copy, up to the moment the process was last known alive —
//! never less than the truth, and never beyond the quota's own room.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    chat_body, Behavior, Http, MockUpstream, Resp, TestGateway, TestPostgres, MOCK_MODEL,
};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// One provider `name` serving `MOCK_MODEL` with one account `a1` (key `key`).
fn provider(
    name: &str,
    base_url: &str,
    settings: &[&str],
    account_extra: &str,
    key: &str,
) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    base_url: \"{base_url}\"\n    models: [{MOCK_MODEL}]\n    max_completion_tokens: 10\n"
    );
    for line in settings {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str(&format!(
        "    accounts:\n      - {{ name: a1, api_key: \"{key}\"{account_extra} }}\n"
    ));
    yaml
}

fn key(label: &str) -> String {
    format!(
        "sk-crash-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn chat(http: &Http, gw: &TestGateway, model: &str) -> Resp {
    http.post_json(
        &format!("{}/v1/chat/completions", gw.url()),
        Some(gw.client_key()),
        &chat_body(model, "hi"),
    )
    .await
}

async fn quota(http: &Http, gw: &TestGateway, account: &str) -> Value {
    let r = http
        .get(
            &format!(
                "{}/api/v1/stats/quota/{}",
                gw.url(),
                account.replace('/', "%2F")
            ),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    r.json()
}

async fn used(http: &Http, gw: &TestGateway, account: &str) -> u64 {
    quota(http, gw, account).await["current_usage"]
        .as_u64()
        .expect("current_usage")
}

/// `current` of the window labelled `label` of `account`.
async fn window(http: &Http, gw: &TestGateway, account: &str, label: &str) -> u64 {
    let r = http
        .get(
            &format!(
                "{}/api/v1/stats/ratelimit/{}",
                gw.url(),
                account.replace('/', "%2F")
            ),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["limit_type"] == label)
        .unwrap_or_else(|| panic!("no window {label}: {r}"))["current"]
        .as_u64()
        .unwrap()
}

/// The crash mark the gateway keeps in its `data_dir`.
fn mark(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join("data/runtime.mark")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until the crash mark says idle (everything synced, nothing in flight).
async fn wait_idle(gw: &TestGateway) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !mark(gw.dir()).is_some_and(|m| m["idle_since"].is_number()) {
        assert!(
            Instant::now() < deadline,
            "the gateway never marked itself idle: {:?}",
            mark(gw.dir())
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// The idle gateway
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn an_idle_gateway_killed_and_restarted_is_charged_nothing() {
    let mock = MockUpstream::start();
    mock.set_usage(None, 5, 10);
    let (k1, k2, k3) = (key("huge-tpm"), key("tpm"), key("no-window"));
    let gw = TestGateway::start(&format!(
        "sync: {{ database_interval: 1s }}\nproviders:\n{}{}{}",
        provider(
            "huge",
            &mock.base_url(),
            &["rate_limits: { tpm: 100000000 }"],
            ", quota_limit: 100000",
            &k1
        ),
        provider(
            "tpm",
            &mock.base_url(),
            &["rate_limits: { tpm: 6000 }"],
            "",
            &k2
        ),
        provider(
            "plain",
            &mock.base_url(),
            &["rate_limits: { rpm: 1000 }"],
            "",
            &k3
        ),
    ));
    let mut gw = gw;
    let http = Http::new();
    for p in ["huge", "tpm", "plain"] {
        for _ in 0..3 {
            let r = chat(&http, &gw, &format!("{p}/{MOCK_MODEL}")).await;
            assert_eq!(r.status, 200, "{r}");
        }
    }
    wait_idle(&gw).await;
    gw.sigkill();
    gw.restart();
    let http = Http::new();
    for p in ["huge", "tpm", "plain"] {
        let account = format!("{p}/a1");
        assert_eq!(
            used(&http, &gw, &account).await,
            45,
            "{account}: 3 × 15 tokens, no gap"
        );
    }
    assert_eq!(window(&http, &gw, "huge/a1", "tpm").await, 45);
    assert_eq!(window(&http, &gw, "tpm/a1", "tpm").await, 45);
    assert_eq!(
        chat(&http, &gw, &format!("huge/{MOCK_MODEL}")).await.status,
        200
    );
    let logs = gw.logs();
    assert!(logs.contains("\"clean\":false"), "it was a crash: {logs}");
}

#[actix_rt::test]
async fn a_busy_gateway_killed_is_charged_no_more_than_the_quotas_room() {
    let mock = MockUpstream::start();
    mock.set_usage(None, 5, 10);
    let k = key("busy");
    let mut gw = TestGateway::start(&format!(
        "sync: {{ database_interval: 1s }}\nproviders:\n{}",
        provider(
            "huge",
            &mock.base_url(),
            &["rate_limits: { tpm: 100000000 }"],
            ", quota_limit: 100000",
            &k
        ),
    ));
    let http = Http::new();
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    // Its state is in the database...
    wait_idle(&gw).await;
    // ...and a request in flight at the kill makes the gateway busy.
    mock.behave(&k, Behavior::Hang);
    let url = format!("{}/v1/chat/completions", gw.url());
    let token = gw.client_key().to_string();
    let hanging = actix_rt::spawn(async move {
        let _ = Http::with_timeout(Duration::from_secs(20))
            .try_send(
                "POST",
                &url,
                Some(&token),
                &[("content-type", "application/json")],
                Some(chat_body(MOCK_MODEL, "hi").to_string().as_bytes()),
            )
            .await;
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.in_flight(&k) == 0 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    gw.sigkill();
    hanging.abort();
    mock.behave(&k, Behavior::Normal);
    gw.restart();
    let http = Http::new();
    let restored = quota(&http, &gw, "huge/a1").await;
    assert_eq!(
        restored["current_usage"], 100_000,
        "charged up to the quota's room, not the 100 000 000 of the window: {restored}"
    );
    assert_eq!(
        chat(&http, &gw, MOCK_MODEL).await.code().as_deref(),
        Some("quota_exceeded")
    );
}

// ------------------------------------------------------------------------------------------------
// The unknown gap ends where the process was last alive
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
#[ignore = "needs postgres: run scripts/test"]
async fn with_the_database_down_the_gap_runs_until_the_process_was_last_alive() {
    let mut pg = TestPostgres::start();
    let mock = MockUpstream::start();
    mock.set_usage(None, 50, 50);
    let k = key("outage");
    let mut gw = TestGateway::start(&format!(
        "database: {{ url: \"{}\" }}\nsync: {{ database_interval: 1s }}\nproviders:\n{}",
        pg.url(),
        provider(
            "p",
            &mock.base_url(),
            &["rate_limits: { windows: [ { kind: tokens, limit: 1000, per: 1s } ] }"],
            "",
            &k
        ),
    ));
    let http = Http::new();
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    actix_rt::time::sleep(Duration::from_millis(2500)).await;

    // The database goes away; the gateway serves on from memory for several intervals.
    pg.stop();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let r = chat(&http, &gw, MOCK_MODEL).await;
        assert!(r.status == 200 || r.status == 429, "{r}");
        actix_rt::time::sleep(Duration::from_millis(250)).await;
    }
    let served = mock.stats(&k).tokens();
    gw.sigkill();
    pg.restart();
    gw.restart();
    let restored = used(&Http::new(), &gw, "p/a1").await;
    assert!(
        restored >= served,
        "the outage's usage is not forgotten: restored {restored}, the upstream served {served}"
    );
}

// ------------------------------------------------------------------------------------------------
// Accounts the copies miss
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn an_account_with_no_saved_copy_is_charged_the_gap() {
    let mock = MockUpstream::start();
    mock.set_usage(None, 5, 10);
    let k = key("never-synced");
    // No copy is ever written: the first database sync would come after an hour.
    let mut gw = TestGateway::start(&format!(
        "sync: {{ database_interval: 1h }}\nproviders:\n{}",
        provider(
            "p",
            &mock.base_url(),
            &["rate_limits: { tpm: 6000 }"],
            ", quota_limit: 1000000",
            &k
        ),
    ));
    let http = Http::new();
    for _ in 0..4 {
        assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    }
    let served = mock.stats(&k).tokens();
    assert_eq!(served, 60);
    gw.sigkill();
    gw.restart();
    let http = Http::new();
    let restored = used(&http, &gw, "p/a1").await;
    assert!(restored >= served, "restored {restored}, served {served}");
    assert_eq!(
        window(&http, &gw, "p/a1", "tpm").await,
        6000,
        "the window is charged full"
    );
}

#[actix_rt::test]
async fn an_unreadable_saved_state_does_not_freeze_the_accounts_database_copy() {
    let mock = MockUpstream::start();
    let k = key("unreadable");
    let mut gw = TestGateway::start(&format!(
        "sync: {{ database_interval: 1s }}\nproviders:\n{}",
        provider("p", &mock.base_url(), &["rate_limits: { rpm: 5 }"], "", &k),
    ));
    let http = Http::new();
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    let id = gw.account_id("p/a1");
    assert!(gw.sigterm().status.success());
    sqlite(
        &gw,
        &format!("UPDATE account_state SET state = '{{not json', version = 1000000 WHERE account_id = '{id}'"),
    );
    gw.restart();
    let http = Http::new();
    // Its counters are unknown: the window restarts full.
    assert_eq!(window(&http, &gw, "p/a1", "rpm").await, 5);
    let flushed = http
        .send(
            "POST",
            &format!("{}/api/v1/admin/flush", gw.url()),
            Some(gw.admin_token()),
            &[],
            None,
        )
        .await;
    assert_eq!(flushed.status, 200, "{flushed}");
    let (version, state) = state_row(&gw, &id);
    assert!(
        version > 1_000_000,
        "the copy is written again: version {version}"
    );
    let state: Value = serde_json::from_str(&state).expect("a readable state again");
    assert_eq!(state["version"].as_i64(), Some(version));
}

// ------------------------------------------------------------------------------------------------
// Changed limits
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn turning_a_sliding_limit_fixed_and_back_keeps_its_counters() {
    let mock = MockUpstream::start();
    let k = key("expiry");
    let config = |rpd: &str| {
        format!(
            "providers:\n{}",
            provider(
                "p",
                &mock.base_url(),
                &[&format!("rate_limits: {{ rpd: {rpd} }}")],
                "",
                &k
            )
        )
    };
    let mut gw = TestGateway::start(&config("100"));
    let http = Http::new();
    for _ in 0..3 {
        assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    }
    // The workers' leases count as in flight until their next reports give back what they did
    // not use (an idle worker keeps nothing after two report intervals).
    let started = Instant::now();
    let mut counted = window(&http, &gw, "p/a1", "rpd").await;
    while counted != 3 && started.elapsed() < Duration::from_secs(2) {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        counted = window(&http, &gw, "p/a1", "rpd").await;
    }
    assert_eq!(counted, 3);
    assert!(gw.sigterm().status.success());
    rewrite_config(
        &gw,
        &config("{ limit: 100, reset: \"0 0 * * *\", timezone: UTC }"),
    );
    gw.restart();
    assert_eq!(
        window(&Http::new(), &gw, "p/a1", "rpd:fixed").await,
        3,
        "sliding to fixed keeps the counters"
    );
    assert!(gw.sigterm().status.success());
    rewrite_config(&gw, &config("100"));
    gw.restart();
    assert_eq!(
        window(&Http::new(), &gw, "p/a1", "rpd").await,
        3,
        "fixed to sliding keeps them too"
    );
}

/// Replaces the `providers` part of the gateway's config with `providers` (the sections the
/// harness wrote are kept).
fn rewrite_config(gw: &TestGateway, providers: &str) {
    let path = gw.config_path();
    let old = std::fs::read_to_string(path).unwrap();
    let head = &old[..old.find("providers:").expect("a providers section")];
    std::fs::write(path, format!("{head}{providers}\n")).unwrap();
}

fn sqlite(gw: &TestGateway, statement: &str) {
    use diesel::{Connection, RunQueryDsl};
    let path = gw.sqlite_path();
    let mut conn = diesel::sqlite::SqliteConnection::establish(&path.display().to_string())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    diesel::sql_query(statement).execute(&mut conn).unwrap();
}

/// `(version, state)` of an account's `account_state` row.
fn state_row(gw: &TestGateway, account_id: &str) -> (i64, String) {
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        version: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        state: String,
    }
    let path = gw.sqlite_path();
    let mut conn =
        diesel::sqlite::SqliteConnection::establish(&path.display().to_string()).unwrap();
    let row: Row = diesel::sql_query(format!(
        "SELECT version, state FROM account_state WHERE account_id = '{account_id}'"
    ))
    .get_result(&mut conn)
    .unwrap();
    (row.version, row.state)
}
