//! End-to-end tests of what upstream refusals do to an account (issue 8, §1, §3 and §7): every
//! way an upstream says "wait" (API.md, "Upstream timing"), the cap `upstream.max_cooldown` on
//! cooldowns and on ceilings learned from `x-ratelimit-*` headers, the error envelope of the
//! gateway's own refusals, and the 403 rule (a cooldown for that model; only a 401 disables; one
//! request takes at most one account out).
//!
//! The real `quotagate serve` binary in front of the mock upstream, which answers once with
//! exactly the status, headers and body under test ([`Behavior::Raw`]) and normally afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{chat_body, Behavior, Http, MockUpstream, Resp, TestGateway, MOCK_MODEL};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// One provider's YAML with one account per key (`a1`, `a2`, …).
fn provider(name: &str, base_url: &str, settings: &[&str], keys: &[&str]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    base_url: \"{base_url}\"\n    strategy: round_robin\n    models: [{MOCK_MODEL}, other-model]\n"
    );
    for line in settings {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("    accounts:\n");
    for (i, key) in keys.iter().enumerate() {
        yaml.push_str(&format!(
            "      - {{ name: a{}, api_key: \"{key}\" }}\n",
            i + 1
        ));
    }
    yaml
}

fn key(label: &str) -> String {
    format!(
        "sk-timing-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A 429 answer with these headers and body, once.
fn raw_429(headers: &[(&str, &str)], body: &str) -> Behavior {
    Behavior::Raw {
        status: 429,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: body.to_string(),
    }
}

const ERROR_429: &str = r#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;

async fn chat(http: &Http, gw: &TestGateway, model: &str) -> Resp {
    let mut body = chat_body(model, "hi");
    body["max_tokens"] = 10.into();
    http.post_json(
        &format!("{}/v1/chat/completions", gw.url()),
        Some(gw.client_key()),
        &body,
    )
    .await
}

/// The gateway's own `retry_after` (seconds) of a 429 `rate_limit_exceeded`.
#[track_caller]
fn retry_after(r: &Resp) -> f64 {
    assert_eq!(r.status, 429, "{r}");
    assert_eq!(r.code().as_deref(), Some("rate_limit_exceeded"), "{r}");
    r.json()["error"]["retry_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("no retry_after in {r}"))
}

#[track_caller]
fn assert_between(value: f64, low: f64, high: f64, what: &str) {
    assert!(
        (low..=high).contains(&value),
        "{what}: {value} is not within [{low}, {high}]"
    );
}

/// An HTTP-date `offset_secs` from now.
fn http_date(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The log records with `event = cooldown` for an account.
fn cooldown_events(gw: &TestGateway, account_id: &str) -> Vec<Value> {
    gw.log_records()
        .into_iter()
        .filter(|r| r["event"] == "cooldown" && r["account_id"] == account_id)
        .collect()
}

// ------------------------------------------------------------------------------------------------
// §1: the examples of the issue
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_retry_after_date_in_the_past_cools_down_for_the_short_default_not_a_hot_loop() {
    let mock = MockUpstream::start();
    let k = key("past");
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    mock.behave_times(
        &k,
        raw_429(&[("retry-after", &http_date(-10))], ERROR_429),
        1,
    );
    let first = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&first), 0.5, 1.0, "the short default (1 s)");
    assert_eq!(first.header("retry-after"), Some("1"));
    actix_rt::time::sleep(Duration::from_millis(10)).await;
    let again = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&again), 0.4, 1.0, "still cooling down");
    assert_eq!(
        mock.stats(&k).requests,
        1,
        "a request 10 ms later does not reach the account"
    );
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
}

#[actix_rt::test]
async fn retry_after_ms_alone_cools_down_for_its_milliseconds() {
    let mock = MockUpstream::start();
    let k = key("ms");
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    mock.behave_times(&k, raw_429(&[("retry-after-ms", "1500")], ERROR_429), 1);
    let started = Instant::now();
    let first = chat(&http, &gw, MOCK_MODEL).await;
    let answered = Instant::now();
    assert_between(retry_after(&first), 1.0, 1.5, "1.5 s");
    assert_eq!(
        first.header("retry-after"),
        Some("2"),
        "whole seconds, rounded up"
    );
    actix_rt::time::sleep(Duration::from_millis(1150).saturating_sub(started.elapsed())).await;
    let still = chat(&http, &gw, MOCK_MODEL).await;
    assert_eq!(
        still.status, 429,
        "1.15 s later: still cooling down: {still}"
    );
    assert_eq!(mock.stats(&k).requests, 1);
    actix_rt::time::sleep(Duration::from_millis(1550).saturating_sub(answered.elapsed())).await;
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
}

#[actix_rt::test]
async fn a_huge_retry_after_is_capped_at_max_cooldown_with_an_event() {
    let mock = MockUpstream::start();
    let k = key("huge");
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    let id = gw.account_id("p/a1");
    mock.behave_times(&k, raw_429(&[("retry-after", "86400000")], ERROR_429), 1);
    let r = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&r), 3590.0, 3600.0, "capped at the default 1 h");
    let events = cooldown_events(&gw, &id);
    assert!(
        events.iter().any(|e| e["reason"] == "upstream_429_capped"),
        "an event says the wait was cut: {events:?}"
    );
    // The cooldown restored after a restart is the capped one, not ~1000 days.
    let mut gw = gw;
    gw.sigterm();
    gw.restart();
    let after = chat(&Http::new(), &gw, MOCK_MODEL).await;
    assert_between(retry_after(&after), 3500.0, 3600.0, "after a restart");
}

#[actix_rt::test]
async fn a_capped_cooldown_ends_at_max_cooldown() {
    let mock = MockUpstream::start();
    let k = key("capped");
    let gw = TestGateway::start(&format!(
        "upstream: {{ max_cooldown: 1s }}\nproviders:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    mock.behave_times(&k, raw_429(&[("retry-after", "1e300")], ERROR_429), 1);
    let r = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&r), 0.5, 1.0, "capped at 1 s");
    actix_rt::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
}

// ------------------------------------------------------------------------------------------------
// §1: one test per form (each provider `pN` has one account that answers one 429)
// ------------------------------------------------------------------------------------------------

/// One 429 to answer: its headers and body, and the `retry_after` expected (low, high).
type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, f64, f64);

#[actix_rt::test]
async fn every_form_of_wait_real_providers_send_sets_the_cooldown() {
    // One provider per case (the count of `cases` below).
    const CASES: usize = 12;
    let mock = MockUpstream::start();
    let keys: Vec<String> = (0..CASES).map(|i| key(&format!("form{i}"))).collect();
    let yaml: String = keys
        .iter()
        .enumerate()
        .map(|(i, k)| provider(&format!("p{i}"), &mock.base_url(), &[], &[k.as_str()]))
        .collect();
    let gw = TestGateway::start(&format!("providers:\n{yaml}"));
    // Times relative to now, taken once the gateway runs; the bounds allow a few slow seconds.
    let in_20s = chrono::DateTime::from_timestamp_millis(now_ms() + 20_000)
        .unwrap()
        .to_rfc3339();
    let openrouter_reset = (now_ms() + 15_000).to_string();
    let date_in_12s = http_date(12);
    let gemini = r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#;
    // (headers, body, expected seconds: low, high)
    let cases: Vec<Case> = vec![
        (vec![("retry-after", "7")], ERROR_429, 6.5, 7.0),
        (vec![("retry-after", "2.5")], ERROR_429, 2.0, 2.5),
        (vec![("retry-after", &date_in_12s)], ERROR_429, 8.0, 12.0),
        (vec![("retry-after-ms", "1500")], ERROR_429, 1.0, 1.5),
        (
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1m30s"),
            ],
            ERROR_429,
            88.0,
            90.0,
        ),
        (
            vec![
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            ERROR_429,
            358.0,
            360.0,
        ),
        (
            vec![("x-ratelimit-reset-tokens", "500ms")],
            ERROR_429,
            0.1,
            0.5,
        ),
        (
            vec![
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", &in_20s),
            ],
            ERROR_429,
            16.0,
            20.0,
        ),
        (
            vec![
                ("X-RateLimit-Limit", "20"),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", &openrouter_reset),
            ],
            ERROR_429,
            11.0,
            15.0,
        ),
        (vec![], gemini, 28.0, 30.0),
        // The longest of several wins.
        (
            vec![
                ("retry-after", "3"),
                ("retry-after-ms", "4000"),
                ("x-ratelimit-reset-tokens", "9s"),
            ],
            ERROR_429,
            8.5,
            9.0,
        ),
        // A reset whose window still has room is not a wait (Groq's daily requests on a 429 for
        // the minute's tokens): the retry-after decides.
        (
            vec![
                ("retry-after", "4"),
                ("x-ratelimit-remaining-requests", "14370"),
                ("x-ratelimit-reset-requests", "2m59.56s"),
            ],
            ERROR_429,
            3.5,
            4.0,
        ),
    ];
    assert_eq!(cases.len(), CASES);
    let http = Http::new();
    for (i, (headers, body, low, high)) in cases.iter().enumerate() {
        mock.behave_times(&keys[i], raw_429(headers, body), 1);
        let r = chat(&http, &gw, &format!("p{i}/{MOCK_MODEL}")).await;
        assert_between(retry_after(&r), *low, *high, &format!("{headers:?} {body}"));
        assert_eq!(mock.stats(&keys[i]).requests, 1);
    }
}

#[actix_rt::test]
async fn no_wait_value_overflows_panics_or_loses_the_commit() {
    let values = [
        "1e300",
        "1e309",
        "99999999999999999999999999",
        "-5",
        "garbage",
        "NaN",
        "inf",
        "9223372036854775807",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "1767225600",
    ];
    let names = [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-reset",
        "anthropic-ratelimit-requests-reset",
    ];
    let mock = MockUpstream::start();
    let mut cases = Vec::new();
    for value in values {
        for name in names {
            cases.push((name, value));
        }
    }
    let keys: Vec<String> = (0..cases.len()).map(|i| key(&format!("bad{i}"))).collect();
    let yaml: String = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            provider(
                &format!("p{i}"),
                &mock.base_url(),
                &["rate_limits: { rpm: 100 }"],
                &[k.as_str()],
            )
        })
        .collect();
    let gw = TestGateway::start(&format!("providers:\n{yaml}"));
    let http = Http::new();
    for (i, (name, value)) in cases.iter().enumerate() {
        mock.behave_times(&keys[i], raw_429(&[(name, value)], ERROR_429), 1);
        let r = chat(&http, &gw, &format!("p{i}/{MOCK_MODEL}")).await;
        assert_between(retry_after(&r), 0.001, 3600.0, &format!("{name}: {value}"));
        // The request slot of the 429, committed in the same message as the feedback, stands.
        let stats = http
            .get(
                &format!("{}/api/v1/stats/ratelimit/p{i}%2Fa1", gw.url()),
                Some(gw.admin_token()),
            )
            .await;
        assert_eq!(stats.status, 200, "{stats}");
        assert_eq!(stats.json()[0]["current"], 1, "{name}: {value}: {stats}");
    }
    let logs = gw.logs();
    assert!(!logs.contains("actor_panic"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[actix_rt::test]
async fn a_ceiling_learned_from_ratelimit_headers_lasts_at_most_max_cooldown() {
    let mock = MockUpstream::start();
    let k = key("ceiling");
    let gw = TestGateway::start(&format!(
        "upstream: {{ max_cooldown: 1s }}\nproviders:\n{}",
        provider(
            "p",
            &mock.base_url(),
            &[
                "ratelimit_headers: { requests: rpm }",
                "rate_limits: { rpm: 100 }"
            ],
            &[&k]
        )
    ));
    let http = Http::new();
    mock.set_headers(
        Some(&k),
        &[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1000h"),
        ],
    );
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    mock.set_headers(Some(&k), &[]);
    // The worker that saw the headers stops at once and tells the account at once; a request
    // another worker admits from its own lease in the meantime is not what this test is about:
    // give the word one report interval to arrive.
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    let held = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&held), 0.3, 1.0, "the ceiling is capped at 1 s");
    actix_rt::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
}

// ------------------------------------------------------------------------------------------------
// §3: the error envelope of the gateway's own refusals
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn the_gateways_refusals_carry_message_type_param_and_code() {
    let mock = MockUpstream::start();
    let k = key("envelope");
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    mock.behave_times(&k, raw_429(&[("retry-after", "10")], ERROR_429), 1);
    let cooldown = chat(&http, &gw, MOCK_MODEL).await;
    let unknown_model = chat(&http, &gw, "no-such-model").await;
    let bad_body = http
        .send(
            "POST",
            &format!("{}/v1/chat/completions", gw.url()),
            Some(gw.client_key()),
            &[("content-type", "application/json")],
            Some(b"{not json"),
        )
        .await;
    let no_key = http.get(&format!("{}/v1/models", gw.url()), None).await;
    let no_route = http
        .get(
            &format!("{}/v1/no-such-route", gw.url()),
            Some(gw.client_key()),
        )
        .await;
    for r in [&cooldown, &unknown_model, &bad_body, &no_key, &no_route] {
        let error = r.json()["error"].clone();
        let fields = error
            .as_object()
            .unwrap_or_else(|| panic!("no envelope: {r}"));
        for field in ["message", "type", "param", "code"] {
            assert!(fields.contains_key(field), "`{field}` missing: {r}");
        }
        assert!(
            error["param"].is_null() || error["param"].is_string(),
            "{r}"
        );
        assert!(!r.text().contains("\"None\""), "{r}");
    }
    assert_eq!(cooldown.json()["error"]["param"], Value::Null);
    assert_eq!(cooldown.json()["error"]["limit"], "cooldown");
    assert_eq!(no_route.status, 404);
}

#[actix_rt::test]
async fn quota_exceeded_carries_a_retry_after_header_with_the_seconds_to_reset_at() {
    let mock = MockUpstream::start();
    let k = key("quota");
    let gw = TestGateway::start(&format!(
        "providers:\n  - name: p\n    base_url: \"{}\"\n    models: [{MOCK_MODEL}]\n    accounts:\n      - {{ name: a1, api_key: \"{k}\", quota_limit: 100 }}\n",
        mock.base_url()
    ));
    let http = Http::new();
    mock.set_usage(None, 90, 20);
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    let r = chat(&http, &gw, MOCK_MODEL).await;
    assert_eq!(r.status, 429, "{r}");
    assert_eq!(r.code().as_deref(), Some("quota_exceeded"), "{r}");
    assert_eq!(r.json()["error"]["param"], Value::Null);
    let reset_at = chrono::DateTime::parse_from_rfc3339(
        r.json()["error"]["reset_at"].as_str().expect("reset_at"),
    )
    .unwrap();
    let expected = (reset_at.timestamp_millis() - now_ms()) as f64 / 1000.0;
    let header: f64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {r}"))
        .parse()
        .unwrap();
    assert_between(
        header,
        expected - 2.0,
        expected + 2.0,
        "seconds to reset_at",
    );
}

// ------------------------------------------------------------------------------------------------
// §7: 403 is not 401
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_403_cools_that_account_down_for_that_model_and_the_request_is_retried() {
    let mock = MockUpstream::start();
    let (k1, k2) = (key("forbidden"), key("good"));
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k1, &k2])
    ));
    let http = Http::new();
    let id1 = gw.account_id("p/a1");
    mock.behave(&k1, Behavior::Status(403));
    for i in 0..4 {
        let r = chat(&http, &gw, MOCK_MODEL).await;
        assert_eq!(r.status, 200, "request {i} retried elsewhere: {r}");
    }
    assert_eq!(
        mock.stats(&k1).requests,
        1,
        "a1 gets one request for the model, then cools down"
    );
    // Not disabled: still active, still available, and still serving another model.
    let status = http
        .get(
            &format!("{}/api/v1/stats/quota/{id1}", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(status.json()["available"], true, "{status}");
    assert!(gw
        .accounts()
        .into_iter()
        .any(|a| a.id == id1 && a.active == "yes"));
    mock.behave(&k1, Behavior::Normal);
    let before = mock.stats(&k1).requests;
    for _ in 0..4 {
        assert_eq!(chat(&http, &gw, "other-model").await.status, 200);
    }
    assert!(
        mock.stats(&k1).requests > before,
        "a1 still serves other-model"
    );
    let events = cooldown_events(&gw, &id1);
    assert!(
        events.iter().any(|e| e["reason"] == "upstream_403"),
        "{events:?}"
    );
    assert!(
        !gw.logs().contains("account_disabled"),
        "a 403 never disables"
    );
}

#[actix_rt::test]
async fn a_403_cooldown_lasts_forbidden_cooldown() {
    let mock = MockUpstream::start();
    let k = key("forbidden-short");
    let gw = TestGateway::start(&format!(
        "upstream: {{ forbidden_cooldown: 1s }}\nproviders:\n{}",
        provider("p", &mock.base_url(), &[], &[&k])
    ));
    let http = Http::new();
    mock.behave_times(&k, Behavior::Status(403), 1);
    let first = chat(&http, &gw, MOCK_MODEL).await;
    assert_eq!(
        first.status, 403,
        "no other account: the upstream's 403 as it is: {first}"
    );
    assert_eq!(first.json()["error"]["message"], "mock answers 403");
    let held = chat(&http, &gw, MOCK_MODEL).await;
    assert_between(retry_after(&held), 0.3, 1.0, "forbidden_cooldown: 1s");
    assert_eq!(held.json()["error"]["limit"], "model_cooldown");
    actix_rt::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    assert_eq!(mock.stats(&k).requests, 2);
}

#[actix_rt::test]
async fn only_a_401_disables_with_an_event_and_an_audit_row() {
    let mock = MockUpstream::start();
    let (k1, k2) = (key("revoked"), key("fine"));
    let gw = TestGateway::start(&format!(
        "providers:\n{}",
        provider("p", &mock.base_url(), &[], &[&k1, &k2])
    ));
    let http = Http::new();
    let id1 = gw.account_id("p/a1");
    mock.behave(&k1, Behavior::Status(401));
    for _ in 0..3 {
        assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
    }
    assert_eq!(mock.stats(&k1).requests, 1);
    assert!(gw
        .log_records()
        .iter()
        .any(|r| r["event"] == "account_disabled" && r["account_id"] == id1.as_str()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = gw.accounts().into_iter().find(|a| a.id == id1).unwrap();
        if row.active.starts_with("no") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a1 is stored as inactive: {row:?}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = eventually_audit(&gw, &id1).await;
    assert!(
        audit.contains("disable"),
        "an audit row for the disabled account: {audit}"
    );
}

/// The audit rows of an account (`action reason; …`) once one says `disable`, read through the
/// store (or what there is after 10 s).
async fn eventually_audit(gw: &TestGateway, account_id: &str) -> String {
    let store = quotagate::store::Store::open(
        &quotagate::config::DatabaseBackend::Sqlite(gw.sqlite_path()),
        1,
    )
    .expect("the gateway's SQLite file");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows =
            quotagate::store::audit::list_for_account(&mut store.conn().unwrap(), account_id)
                .unwrap();
        let text: Vec<String> = rows
            .iter()
            .map(|r| format!("{} {}", r.action, r.reason))
            .collect();
        if rows.iter().any(|r| r.action == "disable") || Instant::now() > deadline {
            return text.join("; ");
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn one_request_takes_at_most_one_account_out() {
    for status in [403u16, 401] {
        let mock = MockUpstream::start();
        let keys: Vec<String> = (1..=3).map(|i| key(&format!("out{status}-{i}"))).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let gw = TestGateway::start(&format!(
            "providers:\n{}",
            provider("p", &mock.base_url(), &[], &refs)
        ));
        let http = Http::new();
        for k in &keys {
            mock.behave(k, Behavior::Status(status));
        }
        let r = chat(&http, &gw, MOCK_MODEL).await;
        assert_eq!(
            r.status, status,
            "the second {status} goes back as it is: {r}"
        );
        assert_eq!(
            r.json()["error"]["message"],
            format!("mock answers {status}")
        );
        let tried: Vec<u64> = keys.iter().map(|k| mock.stats(k).requests).collect();
        assert_eq!(
            tried.iter().sum::<u64>(),
            2,
            "one account taken out, then the next answer returned: {tried:?}"
        );
        // Exactly one account was taken out: once the upstream accepts the keys again, the two
        // others serve and the first stays out.
        for k in &keys {
            mock.behave(k, Behavior::Normal);
        }
        mock.reset_counts();
        for _ in 0..6 {
            assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
        }
        let served: Vec<u64> = keys.iter().map(|k| mock.stats(k).requests).collect();
        assert_eq!(
            served.iter().filter(|n| **n == 0).count(),
            1,
            "{status}: exactly one account is out: {served:?}"
        );
        let disabled = gw
            .accounts()
            .into_iter()
            .filter(|a| a.active.starts_with("no"))
            .count();
        assert!(disabled <= 1, "{status}: {disabled} accounts disabled");
    }
}
