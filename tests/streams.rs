//! Streams that fail (issue 8 §2, §4; API.md "Streams that fail", "Logs"): every way a streamed
//! answer can end badly, before or after its first byte reached the client, and the client that
//! leaves — each against the real binary and a scripted mock stream, with what the client gets,
//! what is logged (request-log rows) and what is charged.

mod common;

use std::time::Duration;

use common::{chat_body, Behavior, Http, MockUpstream, SseEnd, SseResp, TestGateway, MOCK_MODEL};
use serde_json::Value;

/// A gateway with one provider of `keys.len()` accounts (`a1`, `a2`, …, round robin), each with
/// a daily quota, over `mock`; streams go silent after 1 s.
fn gateway(mock: &MockUpstream, keys: &[&str]) -> TestGateway {
    let accounts: String = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "      - {{ name: a{}, api_key: \"{k}\", quota_limit: 1000000 }}\n",
                i + 1
            )
        })
        .collect();
    TestGateway::start(&format!(
        "upstream: {{ stream_idle_timeout: 1s, retries: 1 }}
providers:
  - name: p
    base_url: \"{}\"
    strategy: round_robin
    models: [{MOCK_MODEL}]
    accounts:
{accounts}",
        mock.base_url()
    ))
}

fn key(label: &str) -> String {
    format!(
        "sk-stream-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn chunk(content: &str) -> String {
    format!(
        r#"data: {{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":null}}]}}"#
    )
}

const FINISH: &str = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

fn script(events: &[String], end: SseEnd) -> Behavior {
    Behavior::Sse {
        events: events.to_vec(),
        end,
    }
}

async fn stream(http: &Http, gw: &TestGateway, hang_up_after: Option<usize>) -> SseResp {
    let mut body = chat_body(MOCK_MODEL, "hello there");
    body["stream"] = true.into();
    body["max_tokens"] = 20.into();
    http.stream(
        &format!("{}/v1/chat/completions", gw.url()),
        Some(gw.client_key()),
        &body,
        hang_up_after,
    )
    .await
}

/// The request-log rows, after the gateway wrote what it holds: (status, error type, success,
/// input + output tokens), oldest first.
async fn logged(http: &Http, gw: &TestGateway) -> Vec<(i64, Option<String>, bool, i64)> {
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
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        status_code: i32,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        error_type: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        success: bool,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        tokens: i64,
    }
    let path = gw.sqlite_path();
    let mut conn = diesel::sqlite::SqliteConnection::establish(&path.display().to_string())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT status_code, error_type, success, input_tokens + output_tokens AS tokens \
         FROM request_logs ORDER BY ts, id",
    )
    .load(&mut conn)
    .expect("reading request_logs");
    rows.into_iter()
        .map(|r| (i64::from(r.status_code), r.error_type, r.success, r.tokens))
        .collect()
}

/// The one request-log row (waits until it is there).
async fn only_row(http: &Http, gw: &TestGateway) -> (i64, Option<String>, bool, i64) {
    for _ in 0..50 {
        let rows = logged(http, gw).await;
        if let [row] = rows.as_slice() {
            return row.clone();
        }
        assert!(rows.len() < 2, "more than one row: {rows:?}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no request-log row");
}

async fn quota_used(http: &Http, gw: &TestGateway, account: &str) -> u64 {
    let r = http
        .get(
            &format!("{}/api/v1/stats/quota/p%2F{account}", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    r.json()["current_usage"].as_u64().unwrap()
}

/// An operator's reset of `p/<account>` (cooldowns and circuit included).
async fn reset(http: &Http, gw: &TestGateway, account: &str) {
    let r = http
        .send(
            "POST",
            &format!("{}/api/v1/admin/accounts/p%2F{account}/reset", gw.url()),
            Some(gw.admin_token()),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
}

/// The error event the gateway ends a broken stream with.
#[track_caller]
fn ends_with_error_event(r: &SseResp) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.done(), "no [DONE] after a broken stream: {}", r.text());
    let last = r.chunks().pop().expect("events");
    assert!(
        last["error"]["message"].is_string() && last["error"]["code"] == "stream_broken",
        "the last event is an error: {}",
        r.text()
    );
    last
}

// ------------------------------------------------------------------------------------------------
// After the first byte
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn an_upstream_that_closes_mid_stream_ends_the_clients_stream_with_an_error_event() {
    let mock = MockUpstream::start();
    let k = key("cut");
    let gw = gateway(&mock, &[&k]);
    mock.behave_all(script(&[chunk("Hel"), chunk("lo")], SseEnd::Close));
    let http = Http::new();
    let r = stream(&http, &gw, None).await;
    let last = ends_with_error_event(&r);
    assert_eq!(r.content(), "Hello", "both events reached the client first");
    assert_eq!(last["error"]["param"], Value::Null);
    let (status, error, success, tokens) = only_row(&http, &gw).await;
    assert_eq!(
        (status, error.as_deref(), success),
        (200, Some("stream_broken"), false)
    );
    assert!(tokens > 0, "what was generated is charged");
    assert!(quota_used(&http, &gw, "a1").await > 0);
    // Counted in the error statistics.
    let errors = http
        .get(
            &format!("{}/api/v1/stats/errors/p", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(errors.json()["total_errors"], 1, "{errors}");
}

#[actix_rt::test]
async fn every_other_way_a_started_stream_ends_badly_is_told_and_logged() {
    let mock = MockUpstream::start();
    let k = key("bad-ends");
    let gw = gateway(&mock, &[&k]);
    let http = Http::new();
    let cases: Vec<(&str, Behavior)> = vec![
        // A clean end of the body, but no [DONE] and no finish reason: the answer is cut.
        (
            "clean end without [DONE]",
            script(&[chunk("a"), chunk("b")], SseEnd::Clean),
        ),
        // The upstream goes silent after two events (idle timeout 1 s).
        (
            "silent mid-stream",
            script(&[chunk("a"), chunk("b")], SseEnd::Silent),
        ),
        // One event longer than the gateway holds (1 MiB) without an end.
        (
            "an event that never ends",
            script(
                &[chunk("a"), format!("data: {}", "x".repeat(1_100_000))],
                SseEnd::Clean,
            ),
        ),
    ];
    for (i, (what, behavior)) in cases.into_iter().enumerate() {
        mock.behave_all(behavior);
        let r = stream(&http, &gw, None).await;
        ends_with_error_event(&r);
        let rows = logged(&http, &gw).await;
        assert_eq!(rows.len(), i + 1, "{what}: {rows:?}");
        let (status, error, success, _) = rows.last().unwrap().clone();
        assert_eq!(
            (status, error.as_deref(), success),
            (200, Some("stream_broken"), false),
            "{what}"
        );
        // Each broken stream counts as an upstream failure (three open the circuit): start over.
        reset(&http, &gw, "a1").await;
    }
    // An error event the upstream sends mid-stream reaches the client as it is.
    mock.behave_all(script(
        &[
            chunk("a"),
            r#"data: {"error":{"message":"overloaded mid-way","type":"server_error"}}"#.into(),
        ],
        SseEnd::Clean,
    ));
    let r = stream(&http, &gw, None).await;
    assert!(!r.done(), "{}", r.text());
    assert_eq!(
        r.chunks().last().unwrap_or_else(|| panic!("{}", r.text()))["error"]["message"],
        "overloaded mid-way"
    );
    let (_, error, success, _) = logged(&http, &gw).await.pop().unwrap();
    assert_eq!((error.as_deref(), success), (Some("stream_broken"), false));
    // A stream that ends properly is a success: [DONE], or a finish reason then a clean end.
    for ending in [
        vec![chunk("ok"), "data: [DONE]".to_string()],
        vec![chunk("ok"), FINISH.to_string()],
    ] {
        mock.behave_all(script(&ending, SseEnd::Clean));
        let r = stream(&http, &gw, None).await;
        assert!(
            r.chunks().iter().all(|c| c.get("error").is_none()),
            "{}",
            r.text()
        );
        let (status, error, success, _) = logged(&http, &gw).await.pop().unwrap();
        assert_eq!((status, error, success), (200, None, true));
    }
}

// ------------------------------------------------------------------------------------------------
// Before the first byte
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn an_error_as_the_first_event_is_answered_with_the_status_it_means() {
    let mock = MockUpstream::start();
    let k = key("first-error");
    let gw = gateway(&mock, &[&k]);
    mock.behave_all(script(
        &[
            ": keepalive".into(),
            r#"data: {"error":{"message":"messages[0] is wrong","type":"invalid_request_error","code":400}}"#.into(),
        ],
        SseEnd::Close,
    ));
    let http = Http::new();
    let r = stream(&http, &gw, None).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body: Value = serde_json::from_slice(&r.raw).expect("a JSON error, not a stream");
    assert_eq!(body["error"]["message"], "messages[0] is wrong");
    assert_eq!(mock.stats(&k).requests, 1, "a client error is not retried");
    let (status, _, success, _) = only_row(&http, &gw).await;
    assert_eq!((status, success), (400, false));
}

#[actix_rt::test]
async fn a_first_event_that_says_wait_or_fail_is_retried_on_another_account() {
    let mock = MockUpstream::start();
    let (k1, k2) = (key("limited"), key("fine"));
    let gw = gateway(&mock, &[&k1, &k2]);
    let http = Http::new();
    let cases = [
        (
            "a 429 as the first event",
            script(
                &[r#"data: {"error":{"message":"slow down","type":"rate_limit_error"}}"#.into()],
                SseEnd::Clean,
            ),
        ),
        (
            "a 5xx as the first event",
            script(
                &[r#"data: {"error":{"message":"oops","type":"server_error","code":500}}"#.into()],
                SseEnd::Clean,
            ),
        ),
        (
            "closed after the headers, no event",
            script(&[], SseEnd::Close),
        ),
        ("a clean end without any event", script(&[], SseEnd::Clean)),
        (
            "silent before the first event",
            script(&[": keepalive".into()], SseEnd::Silent),
        ),
    ];
    for (what, behavior) in cases {
        mock.reset_behavior();
        mock.behave(&k1, behavior);
        let before = (mock.stats(&k1).requests, mock.stats(&k2).requests);
        // Whichever account the round robin picks first: when it is a1, its failure is retried
        // on a2 within the same request. Go on until a1 was tried.
        for _ in 0..6 {
            let r = stream(&http, &gw, None).await;
            assert!(r.status == 200 && r.done(), "{what}: {}", r.text());
            if mock.stats(&k1).requests > before.0 {
                break;
            }
        }
        assert!(mock.stats(&k1).requests > before.0, "{what}: a1 was tried");
        assert!(mock.stats(&k2).requests > before.1, "{what}: a2 served");
        // Lift any cooldown before the next case.
        reset(&http, &gw, "a1").await;
        reset(&http, &gw, "a2").await;
    }
    // With no account able to serve, the failure is the gateway's error.
    mock.reset_behavior();
    mock.behave_all(script(&[], SseEnd::Close));
    let r = stream(&http, &gw, None).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
}

// ------------------------------------------------------------------------------------------------
// The client that leaves
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_client_that_leaves_mid_stream_is_logged_499_client_closed_and_charged() {
    let mock = MockUpstream::start();
    let k = key("leaver");
    let gw = gateway(&mock, &[&k]);
    mock.set_stream(12, Duration::from_millis(50));
    let http = Http::new();
    let r = stream(&http, &gw, Some(2)).await;
    assert_eq!(r.events.len(), 2, "{}", r.text());
    let (status, error, success, tokens) = only_row(&http, &gw).await;
    assert_eq!(
        (status, error.as_deref(), success),
        (499, Some("client_closed"), false)
    );
    assert!(tokens > 0, "the usage is charged as generated, never 0");
    assert!(quota_used(&http, &gw, "a1").await > 0);
    let usage = http
        .get(
            &format!("{}/api/v1/stats/usage", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(usage.json()["successful_requests"], 0, "{usage}");
}
