//! End-to-end tests of the OpenAI-compatible front door: the real `quotagate serve` binary in front
//! of the mock upstream of `tests/common/upstream.rs`, checked against `shared/API.md` (the error
//! table and its precedence, fallback, cooldown, deactivation, streaming, headers, models, logs,
//! malformed input), plus issue 4's SIGTERM-during-a-burst and SIGKILL-then-restart checks and the
//! official OpenAI Python SDK (`tests/sdk/test_openai_sdk.py`).
//!
//! Every test starts its own mock and gateway (SQLite in a temp dir) and is bounded in time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{
    chat_body, Behavior, Http, MockUpstream, Resp, StrictLimits, TestGateway, MOCK_MODEL,
};
use serde_json::{json, Value};

// ------------------------------------------------------------------------------------------------
// Config helpers
// ------------------------------------------------------------------------------------------------

/// One provider's YAML (an item of `providers:`). `settings` are extra provider-level lines
/// (`timeout: 1s`, `rate_limits: {…}`), `accounts` flow mappings (`{ name: a1, api_key: "k" }`).
fn provider(
    name: &str,
    base_url: &str,
    models: &[&str],
    settings: &[&str],
    accounts: &[String],
) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    base_url: \"{base_url}\"\n    strategy: round_robin\n    models: [{}]\n",
        models.join(", ")
    );
    for line in settings {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("    accounts:\n");
    for account in accounts {
        yaml.push_str(&format!("      - {account}\n"));
    }
    yaml
}

fn providers(list: &[String]) -> String {
    format!("providers:\n{}", list.concat())
}

/// `{ name: NAME, api_key: "KEY" }` plus extra fields.
fn account(name: &str, key: &str, extra: &str) -> String {
    if extra.is_empty() {
        format!("{{ name: {name}, api_key: \"{key}\" }}")
    } else {
        format!("{{ name: {name}, api_key: \"{key}\", {extra} }}")
    }
}

/// A unique upstream key (so logs can be searched for it).
fn key(label: &str) -> String {
    format!(
        "sk-test-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn chat_url(gw: &TestGateway) -> String {
    format!("{}/v1/chat/completions", gw.url())
}

/// The reservation estimate of API.md for one `user` message under `chars:3` (the default
/// tokenizer): every text sent (the role and the content, each rounded up) + 4 per message + 3,
/// plus the completion bound.
fn estimate_chars3(content: &str, completion_bound: u64) -> u64 {
    let tokens = |s: &str| (s.chars().count() as u64).div_ceil(3);
    tokens("user") + tokens(content) + 4 + 3 + completion_bound
}

/// Sends a chat request with `max_tokens`.
async fn chat(http: &Http, gw: &TestGateway, model: &str, max_tokens: u64) -> Resp {
    let mut body = chat_body(model, "hi");
    body["max_tokens"] = json!(max_tokens);
    http.post_json(&chat_url(gw), Some(gw.client_key()), &body)
        .await
}

/// `GET /api/v1/stats/quota/{id}` with the admin token.
async fn quota_stats(http: &Http, gw: &TestGateway, account_id: &str) -> Resp {
    http.get(
        &format!("{}/api/v1/stats/quota/{account_id}", gw.url()),
        Some(gw.admin_token()),
    )
    .await
}

/// `current_usage` of an account from the stats API (panics on anything but a 200).
async fn current_usage(http: &Http, gw: &TestGateway, account_id: &str) -> u64 {
    let r = quota_stats(http, gw, account_id).await;
    assert_eq!(r.status, 200, "GET /api/v1/stats/quota/{account_id}: {r}");
    r.json()["current_usage"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric current_usage in {r}"))
}

/// Waits (up to 5 s) until the account's `current_usage` is `want`; returns the last value.
async fn wait_usage(http: &Http, gw: &TestGateway, account_id: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = current_usage(http, gw, account_id).await;
        if now == want || Instant::now() > deadline {
            return now;
        }
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    }
}

#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "expected {status} {code}, got {r}");
    let body = r.json();
    assert_eq!(
        body["error"]["code"], code,
        "expected error.code {code}: {r}"
    );
    assert!(
        body["error"]["message"].is_string() && body["error"]["type"].is_string(),
        "an OpenAI-shaped error has a message and a type: {r}"
    );
}

#[track_caller]
fn assert_param(r: &Resp, param: &str) {
    assert_error(r, 400, "invalid_request");
    assert_eq!(
        r.json()["error"]["param"],
        param,
        "param should name `{param}`: {r}"
    );
}

// ------------------------------------------------------------------------------------------------
// The mock itself (no gateway): the harness must be right before it judges the gateway.
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn mock_answers_streams_and_counts_what_it_received() {
    let mock = MockUpstream::start();
    let http = Http::new();
    let url = |p: &str| format!("{}{p}", mock.base_url());

    let r = http
        .post_json(
            &url("/chat/completions"),
            Some("k1"),
            &chat_body("m", "hello world!"),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    let usage = &r.json()["usage"];
    assert_eq!(usage["prompt_tokens"], 4, "12 bytes / 4 + 1: {r}");
    assert_eq!(
        usage["completion_tokens"],
        common::upstream::DEFAULT_COMPLETION_TOKENS
    );

    let mut body = chat_body("m", "x");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = http
        .stream(&url("/chat/completions"), Some("k1"), &body, None)
        .await;
    assert_eq!(s.status, 200);
    assert!(s.done(), "ends with [DONE]: {}", s.text());
    let last = s.chunks().last().cloned().unwrap();
    assert_eq!(last["choices"], json!([]), "{}", s.text());
    assert_eq!(s.usage().unwrap()["total_tokens"], 2 + 16);
    assert_eq!(s.content(), "tok0 tok1 tok2 ");

    body["stream_options"] = json!({"include_usage": false});
    let s = http
        .stream(&url("/chat/completions"), Some("k2"), &body, None)
        .await;
    assert!(s.usage().is_none() && s.done(), "{}", s.text());

    let r = http
        .post_json(
            &url("/embeddings"),
            Some("k2"),
            &json!({"model": "e", "input": "abcdefgh"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["usage"]["prompt_tokens"], 3);
    let r = http.get(&url("/models"), Some("k2")).await;
    assert_eq!(r.json()["data"][0]["id"], MOCK_MODEL);

    let k1 = mock.stats("k1");
    assert_eq!((k1.requests, k1.answered), (2, 2));
    assert_eq!(k1.tokens(), 4 + 16 + 2 + 16);
    assert_eq!(k1.bodies[0]["messages"][0]["content"], "hello world!");
    let k2 = mock.stats("k2");
    assert_eq!((k2.requests, k2.answered, k2.tokens()), (3, 2, 2 + 16 + 3));
    assert_eq!(mock.keys_in_order(), ["k1", "k1", "k2", "k2", "k2"]);
}

#[actix_rt::test]
async fn mock_misbehaves_on_demand() {
    let mock = MockUpstream::start();
    let http = Http::with_timeout(Duration::from_millis(500));
    let url = format!("{}/chat/completions", mock.base_url());
    let body = chat_body("m", "x");

    mock.behave("limited", Behavior::RateLimited { retry_after: 7 });
    let r = http.post_json(&url, Some("limited"), &body).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
    mock.behave("gone", Behavior::Status(401));
    assert_eq!(http.post_json(&url, Some("gone"), &body).await.status, 401);
    mock.behave_times("flaky", Behavior::Status(503), 2);
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(http.post_json(&url, Some("flaky"), &body).await.status);
        }
        v
    };
    assert_eq!(statuses, [503, 503, 200]);
    mock.set_headers(Some("hinted"), &[("x-ratelimit-remaining-requests", "3")]);
    let r = http.post_json(&url, Some("hinted"), &body).await;
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("3"));

    mock.behave("hang", Behavior::Hang);
    let bytes = serde_json::to_vec(&body).unwrap();
    let hung = http
        .try_send(
            "POST",
            &url,
            Some("hang"),
            &[("Content-Type", "application/json")],
            Some(&bytes),
        )
        .await;
    assert!(hung.is_err(), "a hanging upstream never answers: {hung:?}");
    mock.behave("drop", Behavior::Drop);
    let dropped = http
        .try_send(
            "POST",
            &url,
            Some("drop"),
            &[("Content-Type", "application/json")],
            Some(&bytes),
        )
        .await;
    assert!(
        dropped.is_err(),
        "a dropped connection is an error: {dropped:?}"
    );
    mock.behave("cut", Behavior::DropMidStream { after: 2 });
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = Http::new().stream(&url, Some("cut"), &streamed, None).await;
    assert_eq!(s.events.len(), 2, "{}", s.text());
    assert!(!s.done(), "no [DONE] after a drop: {}", s.text());
    let cut = mock.wait_for("cut", Duration::from_secs(2), |s| s.requests == 1);
    assert_eq!(
        cut.answered, 0,
        "an answer cut short is not counted as served"
    );
    assert_eq!(mock.stats("hang").answered, 0);
}

#[actix_rt::test]
async fn mock_strict_mode_refuses_any_excess_by_its_own_clock() {
    let mock = MockUpstream::start();
    let http = Http::new();
    let url = format!("{}/chat/completions", mock.base_url());
    mock.set_strict(
        None,
        StrictLimits {
            requests: vec![(3, Duration::from_millis(400))],
            tokens: vec![(1000, Duration::from_millis(400))],
            concurrent: None,
        },
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            http.post_json(&url, Some("s"), &chat_body("m", "x"))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    actix_rt::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        http.post_json(&url, Some("s"), &chat_body("m", "x"))
            .await
            .status,
        200
    );
    let stats = mock.stats("s");
    assert_eq!((stats.rejected_429, stats.answered), (1, 4));
    assert_eq!(stats.rejected_by.get("requests"), Some(&1));

    // Tokens: 2 + 16 = 18 per request here; 40 allows two.
    mock.set_strict(
        Some("t"),
        StrictLimits {
            requests: vec![],
            tokens: vec![(40, Duration::from_secs(5))],
            concurrent: None,
        },
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            http.post_json(&url, Some("t"), &chat_body("m", "x"))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 429]);

    // Concurrency: a slow answer holds its slot.
    mock.set_strict(
        Some("c"),
        StrictLimits {
            concurrent: Some(1),
            ..StrictLimits::default()
        },
    );
    mock.set_latency(Some("c"), Duration::from_millis(300));
    let first = {
        let (http, url) = (http.clone(), url.clone());
        actix_rt::spawn(async move {
            http.post_json(&url, Some("c"), &chat_body("m", "x"))
                .await
                .status
        })
    };
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let second = http
        .post_json(&url, Some("c"), &chat_body("m", "x"))
        .await
        .status;
    assert_eq!((first.await.unwrap(), second), (200, 429));
    let c = mock.stats("c");
    assert_eq!(
        (c.max_concurrency, c.rejected_by.get("concurrent").copied()),
        (1, Some(1))
    );
}

// ------------------------------------------------------------------------------------------------
// The error table
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn client_errors_are_openai_shaped_and_reach_no_upstream() {
    let mock = MockUpstream::start();
    let k = key("client-errors");
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &["rate_limits: { tpm: 1000 }"],
        &[account("a1", &k, "")],
    )]));
    let http = Http::new();
    let url = chat_url(&gw);
    let ck = gw.client_key();
    let json_ct = [("Content-Type", "application/json")];
    let valid = serde_json::to_vec(&chat_body(MOCK_MODEL, "hi")).unwrap();

    // 401: missing, unknown, malformed.
    let r = http.send("POST", &url, None, &json_ct, Some(&valid)).await;
    assert_error(&r, 401, "invalid_api_key");
    let r = http
        .send(
            "POST",
            &url,
            Some("qg_not-a-real-key"),
            &json_ct,
            Some(&valid),
        )
        .await;
    assert_error(&r, 401, "invalid_api_key");
    let r = http
        .send(
            "POST",
            &url,
            None,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Basic {ck}")),
            ],
            Some(&valid),
        )
        .await;
    assert_error(&r, 401, "invalid_api_key");
    let r = http.get(&format!("{}/v1/models", gw.url()), None).await;
    assert_error(&r, 401, "invalid_api_key");

    // 400: not JSON, not an object, missing and ill-typed fields.
    let send = |body: &'static str| {
        let (http, url, ck) = (http.clone(), url.clone(), ck.to_string());
        async move {
            http.send(
                "POST",
                &url,
                Some(&ck),
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .await
        }
    };
    let r = send("{not json").await;
    assert_error(&r, 400, "invalid_request");
    let r = send("[1, 2]").await;
    assert_error(&r, 400, "invalid_request");
    assert_param(&send("{}").await, "model");
    assert_param(
        &send(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).await,
        "model",
    );
    assert_param(
        &send(r#"{"model": 3, "messages": [{"role": "user", "content": "hi"}]}"#).await,
        "model",
    );
    assert_param(&send(r#"{"model": "mock-model"}"#).await, "messages");
    assert_param(
        &send(r#"{"model": "mock-model", "messages": "hi"}"#).await,
        "messages",
    );
    assert_param(
        &send(r#"{"model": "mock-model", "messages": []}"#).await,
        "messages",
    );
    assert_param(
        &send(r#"{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}"#).await,
        "stream",
    );
    assert_param(
        &send(r#"{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#).await,
        "max_tokens",
    );
    assert_param(
        &send(r#"{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}"#).await,
        "max_tokens",
    );
    let r = http
        .send(
            "POST",
            &format!("{}/v1/embeddings", gw.url()),
            Some(ck),
            &json_ct,
            Some(br#"{"model": "mock-model"}"#),
        )
        .await;
    assert_param(&r, "input");

    // A body over the limit: 413 (API.md allows it for "too large") with the envelope.
    let mut huge = chat_body(MOCK_MODEL, "");
    huge["messages"][0]["content"] = json!("x".repeat(5 << 20));
    let bytes = serde_json::to_vec(&huge).unwrap();
    let r = http.try_send("POST", &url, Some(ck), &json_ct, Some(&bytes)).await.unwrap_or_else(|e| {
        panic!("a too-large body must get an answer (413 with the error envelope), not a dropped connection: {e}")
    });
    assert!(
        r.status == 413 || r.status == 400,
        "too large: {} {}",
        r.status,
        &r.text()[..r.text().len().min(300)]
    );
    assert_eq!(
        r.code().as_deref(),
        Some("invalid_request"),
        "too large: {r}"
    );

    // The request's own estimate exceeds a limit of every account: 400 naming the field.
    let r = chat(&http, &gw, MOCK_MODEL, 5000).await;
    assert_param(&r, "max_tokens");

    // 404: nobody serves the model.
    let r = chat(&http, &gw, "no-such-model", 10).await;
    assert_error(&r, 404, "model_not_found");
    let r = chat(&http, &gw, "nobody/mock-model", 10).await;
    assert_error(&r, 404, "model_not_found");

    assert_eq!(
        mock.total().requests,
        0,
        "no refused request reaches the upstream"
    );
    // A refused request consumes nothing.
    let id = gw.account_id("p/a1");
    assert_eq!(
        current_usage(&http, &gw, &id).await,
        0,
        "refusals consume nothing"
    );
    // And a good one still passes.
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_eq!(r.status, 200, "{r}");
}

#[actix_rt::test]
async fn refusals_follow_the_precedence_rate_then_quota_then_impossible_then_none() {
    let mock = MockUpstream::start();
    let (rl, qt, sm) = (key("rl"), key("qt"), key("sm"));
    let base = mock.base_url();
    let gw = TestGateway::start(&providers(&[
        provider(
            "rl",
            &base,
            &["m-rate"],
            &["rate_limits: { windows: [ { kind: requests, limit: 1, per: 60s } ] }"],
            &[account("rl1", &rl, "")],
        ),
        provider(
            "qt",
            &base,
            &["m-rate", "m-quota"],
            &[],
            &[account("qt1", &qt, "quota_limit: 30")],
        ),
        provider(
            "off",
            &base,
            &["m-quota", "m-small", "m-off"],
            &[],
            &[
                account("off1", &key("off1"), "active: false"),
                account("off2", &key("off2"), "expires_at: \"2020-01-01T00:00:00Z\""),
            ],
        ),
        provider(
            "small",
            &base,
            &["m-small"],
            &["rate_limits: { tpm: 40 }"],
            &[account("sm1", &sm, "")],
        ),
    ]));
    let http = Http::new();
    mock.set_usage(Some(&qt), 100, 0);

    // Exhaust qt1's quota (the only active account for m-quota), then fill rl1's window.
    let r = chat(&http, &gw, "m-quota", 10).await;
    assert_eq!(
        (r.status, r.header("x-quota-provider")),
        (200, Some("qt")),
        "{r}"
    );
    let r = chat(&http, &gw, "m-rate", 10).await;
    assert_eq!(
        (r.status, r.header("x-quota-provider")),
        (200, Some("rl")),
        "qt1 is exhausted, so m-rate goes to rl: {r}"
    );

    // m-rate: rl1 rate-limited (would pass later) and qt1 exhausted → rate_limit_exceeded.
    let r = chat(&http, &gw, "m-rate", 10).await;
    assert_error(&r, 429, "rate_limit_exceeded");
    let retry_after = r.json()["error"]["retry_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("retry_after is a number of seconds: {r}"));
    assert!(
        retry_after > 50.0 && retry_after <= 61.0,
        "rl1 frees in ~60 s: {r}"
    );
    let header: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("Retry-After header: {r}"))
        .parse()
        .unwrap();
    assert_eq!(
        header,
        retry_after.ceil() as u64,
        "Retry-After is retry_after rounded up: {r}"
    );

    // m-quota: qt1 exhausted, off1 inactive, off2 expired → quota_exceeded with reset_at.
    let r = chat(&http, &gw, "m-quota", 10).await;
    assert_error(&r, 429, "quota_exceeded");
    let reset_at = r.json()["error"]["reset_at"].as_str().map(str::to_string);
    let reset_at = chrono::DateTime::parse_from_rfc3339(reset_at.as_deref().unwrap_or(""))
        .unwrap_or_else(|e| panic!("reset_at is RFC 3339 ({e}): {r}"));
    assert!(
        reset_at > chrono::Utc::now(),
        "reset_at is in the future: {r}"
    );

    // m-small: this request (10 + 100 tokens) can never fit tpm 40 → 400 naming max_tokens;
    // off1/off2 do not change that.
    let r = chat(&http, &gw, "m-small", 100).await;
    assert_param(&r, "max_tokens");
    let r = chat(&http, &gw, "m-small", 5).await;
    assert_eq!(r.status, 200, "a request that fits passes: {r}");

    // m-off: only an inactive and an expired account → 503.
    let r = chat(&http, &gw, "m-off", 5).await;
    assert_error(&r, 503, "no_account_available");

    assert_eq!(
        mock.total().requests,
        3,
        "only the three accepted requests went upstream"
    );
}

#[actix_rt::test]
async fn upstream_5xx_and_dropped_connections_are_retried_on_other_accounts_then_502() {
    let mock = MockUpstream::start();
    let keys: Vec<String> = (1..=4).map(|i| key(&format!("5xx-{i}"))).collect();
    let accounts: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| account(&format!("a{}", i + 1), k, ""))
        .collect();
    let gw = TestGateway::start(&format!(
        "upstream: {{ retries: 2 }}\n{}",
        providers(&[provider(
            "p",
            &mock.base_url(),
            &[MOCK_MODEL],
            &[],
            &accounts
        )])
    ));
    let http = Http::new();

    mock.behave_all(Behavior::Status(500));
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_error(&r, 502, "upstream_error");
    assert_eq!(r.json()["error"]["upstream_status"], 500, "{r}");
    let tried = mock.keys_in_order();
    assert_eq!(
        tried.len(),
        3,
        "one try + upstream.retries (2) retries: {tried:?}"
    );
    assert_eq!(
        tried.iter().collect::<BTreeSet<_>>().len(),
        3,
        "each retry on another account: {tried:?}"
    );

    mock.reset_counts();
    mock.behave_all(Behavior::Status(503));
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_error(&r, 502, "upstream_error");
    assert_eq!(r.json()["error"]["upstream_status"], 503, "{r}");

    mock.reset_counts();
    mock.behave_all(Behavior::Drop);
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_error(&r, 502, "upstream_error");
    assert!(
        r.json()["error"]["upstream_status"].is_null(),
        "no upstream status for a dropped connection: {r}"
    );
    assert_eq!(mock.total().requests, 3, "{:?}", mock.keys_in_order());

    // One failing account among good ones: the client never notices.
    mock.reset_behavior();
    mock.reset_counts();
    mock.behave(&keys[0], Behavior::Status(500));
    for _ in 0..4 {
        let r = chat(&http, &gw, MOCK_MODEL, 10).await;
        assert_eq!(r.status, 200, "{r}");
    }
}

#[actix_rt::test]
async fn a_hanging_upstream_answers_504_after_the_provider_timeout() {
    let mock = MockUpstream::start();
    let k = key("hang");
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &["timeout: 1s"],
        &[account("a1", &k, "")],
    )]));
    let http = Http::new();
    mock.behave(&k, Behavior::Hang);
    let started = Instant::now();
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    let took = started.elapsed();
    assert_error(&r, 504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "the provider's 1 s timeout applies: took {took:?}"
    );
    // The outcome is unknown: the estimate is committed.
    let id = gw.account_id("p/a1");
    let estimate = estimate_chars3("hi", 10);
    assert_eq!(
        wait_usage(&http, &gw, &id, estimate).await,
        estimate,
        "a timed-out request commits its estimate"
    );
}

// ------------------------------------------------------------------------------------------------
// Routing: fallback, cooldown, deactivation
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn requests_fall_back_across_accounts_and_providers() {
    let mock = MockUpstream::start();
    let base = mock.base_url();
    let one_per_minute = "rate_limits: { windows: [ { kind: requests, limit: 1, per: 60s } ] }";
    let gw = TestGateway::start(&providers(&[
        provider(
            "p1",
            &base,
            &[MOCK_MODEL],
            &[one_per_minute],
            &[
                account("a1", &key("fa1"), ""),
                account("a2", &key("fa2"), ""),
            ],
        ),
        provider(
            "p2",
            &base,
            &[MOCK_MODEL],
            &[one_per_minute],
            &[account("b1", &key("fb1"), "")],
        ),
    ]));
    let http = Http::new();
    let mut providers_seen = BTreeMap::new();
    let mut accounts_seen = BTreeSet::new();
    for i in 0..3 {
        let r = chat(&http, &gw, MOCK_MODEL, 10).await;
        assert_eq!(
            r.status, 200,
            "request {i}: three accounts have room for one each: {r}"
        );
        *providers_seen
            .entry(r.header("x-quota-provider").unwrap_or("-").to_string())
            .or_insert(0) += 1;
        accounts_seen.insert(r.header("x-quota-account").unwrap_or("-").to_string());
    }
    assert_eq!(
        providers_seen,
        BTreeMap::from([("p1".to_string(), 2), ("p2".to_string(), 1)]),
        "both of p1's accounts, then p2"
    );
    assert_eq!(
        accounts_seen.len(),
        3,
        "three different accounts: {accounts_seen:?}"
    );
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_error(&r, 429, "rate_limit_exceeded");

    // `provider/model` picks the provider.
    let gw2 = TestGateway::start(&providers(&[
        provider(
            "p1",
            &base,
            &[MOCK_MODEL],
            &[],
            &[account("a1", &key("pm1"), "")],
        ),
        provider(
            "p2",
            &base,
            &[MOCK_MODEL],
            &[],
            &[account("b1", &key("pm2"), "")],
        ),
    ]));
    for _ in 0..3 {
        let r = chat(&http, &gw2, &format!("p2/{MOCK_MODEL}"), 10).await;
        assert_eq!(
            (r.status, r.header("x-quota-provider")),
            (200, Some("p2")),
            "{r}"
        );
    }
}

#[actix_rt::test]
async fn an_upstream_429_cools_the_account_down_and_the_request_goes_elsewhere() {
    let mock = MockUpstream::start();
    let (k1, k2, solo) = (key("cool1"), key("cool2"), key("solo"));
    let base = mock.base_url();
    let gw = TestGateway::start(&providers(&[
        provider(
            "p",
            &base,
            &[MOCK_MODEL],
            &[],
            &[account("a1", &k1, ""), account("a2", &k2, "")],
        ),
        provider(
            "s",
            &base,
            &["solo-model"],
            &[],
            &[account("s1", &solo, "")],
        ),
    ]));
    let http = Http::new();
    mock.behave(&k1, Behavior::RateLimited { retry_after: 3 });
    for i in 0..6 {
        let r = chat(&http, &gw, MOCK_MODEL, 10).await;
        assert_eq!(r.status, 200, "request {i} is retried on a2: {r}");
        assert_eq!(
            r.header("x-quota-account"),
            Some(gw.account_id("p/a2").as_str())
        );
    }
    assert_eq!(
        mock.stats(&k1).requests,
        1,
        "a1 is not tried again during its 3 s cooldown"
    );
    assert_eq!(mock.stats(&k2).answered, 6);

    // A single account: the 429 reaches the client, then the gateway itself refuses until the
    // upstream's retry-after has passed.
    mock.behave_times(&solo, Behavior::RateLimited { retry_after: 2 }, 1);
    let r = chat(&http, &gw, "solo-model", 10).await;
    assert_eq!(r.status, 429, "{r}");
    let r = chat(&http, &gw, "solo-model", 10).await;
    assert_error(&r, 429, "rate_limit_exceeded");
    let retry_after = r.json()["error"]["retry_after"].as_f64().unwrap_or(-1.0);
    assert!(
        retry_after > 0.0 && retry_after <= 2.1,
        "the upstream's retry-after (2 s): {r}"
    );
    assert_eq!(
        mock.stats(&solo).requests,
        1,
        "refused by the gateway during the cooldown"
    );
    actix_rt::time::sleep(Duration::from_secs_f64(retry_after + 0.1)).await;
    let r = chat(&http, &gw, "solo-model", 10).await;
    assert_eq!(
        r.status, 200,
        "after retry_after the account serves again: {r}"
    );
}

#[actix_rt::test]
// A 403 cools the account down for that model instead: tests/upstream_timing.rs.
async fn an_upstream_401_deactivates_the_account_and_the_request_is_retried() {
    let mock = MockUpstream::start();
    let (k1, k2) = (key("revoked"), key("good"));
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &[],
        &[account("a1", &k1, ""), account("a2", &k2, "")],
    )]));
    let http = Http::new();
    mock.behave(&k1, Behavior::Status(401));
    for i in 0..6 {
        let r = chat(&http, &gw, MOCK_MODEL, 10).await;
        assert_eq!(r.status, 200, "request {i} retried elsewhere: {r}");
    }
    assert_eq!(
        mock.stats(&k1).requests,
        1,
        "a1 gets one request, then is disabled"
    );
    for name in ["a1"] {
        let id = gw.account_id(&format!("p/{name}"));
        let r = quota_stats(&http, &gw, &id).await;
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(
            r.json()["available"],
            false,
            "{name} is no longer available: {r}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = gw.accounts().into_iter().find(|a| a.id == id).unwrap();
            if row.active.starts_with("no") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is stored as inactive: {row:?}"
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let id = gw.account_id("p/a2");
    assert_eq!(quota_stats(&http, &gw, &id).await.json()["available"], true);
}

// ------------------------------------------------------------------------------------------------
// Streaming, usage, headers, models, embeddings
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn streams_pass_through_and_their_usage_is_committed_with_or_without_client_usage() {
    let mock = MockUpstream::start();
    let k = key("stream");
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &["max_completion_tokens: 64"],
        &[account("a1", &k, "")],
    )]));
    let http = Http::new();
    let id = gw.account_id("p/a1");
    mock.set_usage(None, 7, 11);
    mock.set_stream(4, Duration::from_millis(5));

    // Without stream_options: the gateway asks for usage and strips the extra chunk.
    let mut body = chat_body(MOCK_MODEL, "stream me");
    body["stream"] = json!(true);
    let s = http
        .stream(&chat_url(&gw), Some(gw.client_key()), &body, None)
        .await;
    assert_eq!(s.status, 200, "{}", s.text());
    assert!(
        s.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        s.headers
    );
    assert!(s.done(), "the stream ends with [DONE]: {}", s.text());
    assert_eq!(
        s.content(),
        "tok0 tok1 tok2 tok3 ",
        "content passes unchanged"
    );
    assert!(
        s.chunks()
            .iter()
            .all(|c| c["choices"] != json!([]) && c.get("usage").is_none_or(Value::is_null)),
        "no usage chunk when the client did not ask for one: {}",
        s.text()
    );
    assert_eq!(s.header("x-quota-account"), Some(id.as_str()));
    assert_eq!(s.header("x-quota-provider"), Some("p"));
    assert!(s.header("x-request-id").is_some());
    let sent = &mock.stats(&k).bodies[0];
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "the gateway asks the upstream for usage: {sent}"
    );
    assert_eq!(
        wait_usage(&http, &gw, &id, 18).await,
        18,
        "usage committed (7 + 11)"
    );

    // With include_usage: the client gets the usage chunk.
    body["stream_options"] = json!({"include_usage": true});
    let s = http
        .stream(&chat_url(&gw), Some(gw.client_key()), &body, None)
        .await;
    assert!(s.done(), "{}", s.text());
    let usage = s
        .usage()
        .unwrap_or_else(|| panic!("the usage chunk was asked for: {}", s.text()));
    assert_eq!(usage["total_tokens"], 18);
    assert_eq!(s.chunks().last().unwrap()["choices"], json!([]));
    assert_eq!(wait_usage(&http, &gw, &id, 36).await, 36);

    // Not streamed: the provider's completion bound is sent when the request sets none.
    let r = http
        .post_json(
            &chat_url(&gw),
            Some(gw.client_key()),
            &chat_body(MOCK_MODEL, "plain"),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.json()["usage"]["total_tokens"],
        18,
        "the answer is unchanged: {r}"
    );
    let sent = mock.stats(&k).bodies[2].clone();
    let bound = sent["max_tokens"]
        .as_u64()
        .or(sent["max_completion_tokens"].as_u64());
    assert_eq!(
        bound,
        Some(64),
        "max_completion_tokens of the provider is sent: {sent}"
    );
    let r = chat(&http, &gw, MOCK_MODEL, 10).await;
    assert_eq!(r.status, 200);
    let sent = mock.stats(&k).bodies[3].clone();
    assert_eq!(
        sent["max_tokens"], 10,
        "the client's own bound is kept: {sent}"
    );
    assert_eq!(wait_usage(&http, &gw, &id, 72).await, 72);

    // A client that hangs up mid-stream: the usage is still committed.
    mock.set_stream(20, Duration::from_millis(100));
    body["stream_options"] = json!({"include_usage": false});
    let s = http
        .stream(&chat_url(&gw), Some(gw.client_key()), &body, Some(3))
        .await;
    assert_eq!(s.status, 200);
    assert!(!s.done());
    let deadline = Instant::now() + Duration::from_secs(8);
    let after = loop {
        let now = current_usage(&http, &gw, &id).await;
        if now > 72 || Instant::now() > deadline {
            break now;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    let estimate = estimate_chars3("stream me", 64);
    assert!(
        after > 72 && after <= 72 + estimate.max(18),
        "a disconnected stream commits what was generated or the estimate ({estimate}): usage {after}"
    );
}

#[actix_rt::test]
async fn an_upstream_that_drops_mid_stream_ends_the_stream_and_still_commits() {
    let mock = MockUpstream::start();
    let k = key("cut");
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &["max_completion_tokens: 64"],
        &[account("a1", &k, "")],
    )]));
    let http = Http::new();
    let id = gw.account_id("p/a1");
    mock.set_stream(6, Duration::from_millis(20));
    mock.behave(&k, Behavior::DropMidStream { after: 3 });
    let mut body = chat_body(MOCK_MODEL, "cut me off");
    body["stream"] = json!(true);
    let s = http
        .stream(&chat_url(&gw), Some(gw.client_key()), &body, None)
        .await;
    assert_eq!(s.status, 200, "the stream had started: {}", s.text());
    assert!(
        s.content().starts_with("tok0 tok1 "),
        "what the upstream sent passes: {}",
        s.text()
    );
    assert!(
        !s.text().contains("tok2"),
        "nothing after the drop: {}",
        s.text()
    );
    assert_eq!(
        mock.stats(&k).requests,
        1,
        "no retry once bytes reached the client"
    );
    // Usage: what was generated, or the estimate — never nothing.
    let estimate = estimate_chars3("cut me off", 64);
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        let now = current_usage(&http, &gw, &id).await;
        if now > 0 || Instant::now() > deadline {
            break now;
        }
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        used > 0 && used <= estimate,
        "a stream cut by the upstream commits what was generated or the estimate ({estimate}): {used}"
    );
}

#[actix_rt::test]
async fn responses_carry_request_id_provider_account_and_remaining_headers() {
    let mock = MockUpstream::start();
    let k = key("headers");
    let gw = TestGateway::start(&providers(&[provider(
        "p1",
        &mock.base_url(),
        &[MOCK_MODEL],
        &["rate_limits: { tpm: 10000, windows: [ { kind: requests, limit: 5, per: 60s } ] }"],
        &[account("a1", &k, "")],
    )]));
    let http = Http::new();
    let id = gw.account_id("p1/a1");
    let mut body = chat_body(MOCK_MODEL, "hi");
    body["max_tokens"] = json!(10);

    let r = http
        .post_json_with(
            &chat_url(&gw),
            Some(gw.client_key()),
            &[("x-request-id", "my-request-42")],
            &body,
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.header("x-request-id"), Some("my-request-42"), "echoed");
    assert_eq!(r.header("x-quota-provider"), Some("p1"));
    let account_header = r.header("x-quota-account").unwrap_or_default();
    assert_eq!(account_header, id, "the account's id");
    assert!(
        !account_header.contains(&k) && !account_header.contains("sk-"),
        "never its key"
    );
    assert_eq!(
        r.header("x-ratelimit-remaining-requests"),
        Some("4"),
        "{:?}",
        r.headers
    );
    let tokens: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap_or_else(|| panic!("x-ratelimit-remaining-tokens: {:?}", r.headers))
        .parse()
        .unwrap();
    assert!(tokens < 10000, "the reservation is counted: {tokens}");

    let r2 = http
        .post_json(&chat_url(&gw), Some(gw.client_key()), &body)
        .await;
    assert_eq!(r2.header("x-ratelimit-remaining-requests"), Some("3"));
    let generated = r2.header("x-request-id").unwrap_or_default();
    assert!(!generated.is_empty(), "generated when not given");
    let r3 = http
        .post_json(&chat_url(&gw), Some(gw.client_key()), &body)
        .await;
    assert_ne!(
        r3.header("x-request-id"),
        Some(generated),
        "a fresh id per request"
    );

    // Errors carry it too, echoed or generated.
    let r = http
        .post_json_with(&chat_url(&gw), None, &[("x-request-id", "denied-1")], &body)
        .await;
    assert_eq!(
        (r.status, r.header("x-request-id")),
        (401, Some("denied-1"))
    );
    let r = chat(&http, &gw, "no-such-model", 10).await;
    assert!(r.header("x-request-id").is_some(), "{r}");
}

#[actix_rt::test]
async fn models_and_embeddings() {
    let mock = MockUpstream::start();
    let k = key("emb");
    let base = mock.base_url();
    let gw = TestGateway::start(&providers(&[
        provider(
            "p1",
            &base,
            &[MOCK_MODEL, "embed-small"],
            &[],
            &[account("a1", &k, "")],
        ),
        provider(
            "p2",
            &base,
            &[MOCK_MODEL, "other-model"],
            &[],
            &[account("b1", &key("emb2"), "")],
        ),
    ]));
    let http = Http::new();

    let r = http
        .get(&format!("{}/v1/models", gw.url()), Some(gw.client_key()))
        .await;
    assert_eq!(r.status, 200, "{r}");
    let list = r.json();
    assert_eq!(list["object"], "list", "{r}");
    let ids: BTreeSet<String> = list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("data is a list: {r}"))
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model", "{m}");
            m["id"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    for model in [MOCK_MODEL, "embed-small", "other-model"] {
        assert!(ids.contains(model), "{model} is listed: {ids:?}");
    }
    assert_eq!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["id"] == MOCK_MODEL)
            .count(),
        1,
        "a model served by two providers is listed once: {r}"
    );

    let r = http
        .post_json(
            &format!("{}/v1/embeddings", gw.url()),
            Some(gw.client_key()),
            &json!({"model": "embed-small", "input": "embed this text please"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.json()["data"][0]["embedding"].as_array().map(Vec::len),
        Some(4),
        "{r}"
    );
    assert_eq!(r.header("x-quota-provider"), Some("p1"));
    let got = mock.stats(&k);
    assert_eq!(got.bodies[0]["input"], "embed this text please");
    let id = gw.account_id("p1/a1");
    assert_eq!(
        wait_usage(&http, &gw, &id, got.tokens()).await,
        got.tokens(),
        "embedding usage committed"
    );
}

// ------------------------------------------------------------------------------------------------
// Logs and malformed input
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn secrets_never_reach_the_logs_and_each_request_gets_an_access_line() {
    let mock = MockUpstream::start();
    let (k1, k2) = (key("log-secret-one"), key("log-secret-two"));
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &[],
        &[account("a1", &k1, ""), account("a2", &k2, "")],
    )]));
    let http = Http::new();
    mock.behave(&k1, Behavior::Status(401));
    let mut body = chat_body(MOCK_MODEL, "hello");
    for _ in 0..3 {
        let r = http
            .post_json_with(
                &chat_url(&gw),
                Some(gw.client_key()),
                &[("x-request-id", "log-check-1")],
                &body,
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
    }
    body["stream"] = json!(true);
    let s = http
        .stream(&chat_url(&gw), Some(gw.client_key()), &body, None)
        .await;
    assert_eq!(s.status, 200);
    let _ = http
        .post_json(&chat_url(&gw), Some("qg_guessed-key-123"), &body)
        .await;
    let _ = http
        .get(
            &format!("{}/api/v1/stats/quota/p/a1", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    actix_rt::time::sleep(Duration::from_millis(300)).await;

    let logs = gw.logs();
    for secret in [k1.as_str(), k2.as_str(), gw.client_key(), gw.admin_token()] {
        assert!(
            !logs.contains(secret),
            "a secret ({}…) is in the logs:\n{logs}",
            &secret[..8]
        );
    }
    let records = gw.log_records();
    let line = records
        .iter()
        .find(|r| r["request_id"] == "log-check-1" && r["status"] == 200)
        .unwrap_or_else(|| panic!("an access-log line for request log-check-1:\n{logs}"));
    for field in ["provider", "account_id", "model", "status", "latency_ms"] {
        assert!(
            line.get(field).is_some(),
            "the access line has `{field}`: {line}"
        );
    }
    assert_eq!(line["model"], MOCK_MODEL);
}

/// Requests the fuzz test sends: (method, path, headers, body).
type Fuzzed = (String, String, Vec<(String, String)>, Vec<u8>);

fn fuzz_strategy(client_key: String) -> impl proptest::strategy::Strategy<Value = Fuzzed> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z0-9 /_.-]{0,12}".prop_map(Value::String),
        "\\PC{0,40}".prop_map(Value::String),
        Just(json!(MOCK_MODEL)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
    ];
    let field = prop_oneof![
        Just("model".to_string()),
        Just("messages".to_string()),
        Just("stream".to_string()),
        Just("max_tokens".to_string()),
        Just("max_completion_tokens".to_string()),
        Just("n".to_string()),
        Just("input".to_string()),
        Just("stream_options".to_string()),
        Just("role".to_string()),
        Just("content".to_string()),
        "[a-z_]{1,10}",
    ];
    let value = leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(field.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    // A valid request with one field replaced (or removed) by something arbitrary.
    let mutated = (
        prop_oneof![
            Just("model"),
            Just("messages"),
            Just("stream"),
            Just("max_tokens"),
            Just("n"),
            Just("stream_options"),
            Just("temperature"),
        ],
        prop::option::of(value.clone()),
    )
        .prop_map(|(field, v)| {
            let mut body = chat_body(MOCK_MODEL, "fuzz");
            match v {
                Some(v) => body[field] = v,
                None => {
                    body.as_object_mut().unwrap().remove(field);
                }
            }
            serde_json::to_vec(&body).unwrap()
        });
    // Valid messages with a broken message inside.
    let bad_message = value.clone().prop_map(|m| {
        let body = json!({"model": MOCK_MODEL, "messages": [{"role": "user", "content": "ok"}, m]});
        serde_json::to_vec(&body).unwrap()
    });
    let body = prop_oneof![
        3 => mutated,
        2 => bad_message,
        2 => value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => "\\PC{0,80}".prop_map(String::into_bytes),
        1 => Just(b"{\"model\": \"mock-model\", \"messages\": [".to_vec()),
    ];
    let auth = prop_oneof![
        6 => Just(Some(format!("Bearer {client_key}"))),
        1 => Just(None),
        1 => Just(Some("Bearer ".to_string())),
        1 => "[ -~]{0,40}".prop_map(Some),
        1 => Just(Some(format!("bearer {client_key}"))),
        1 => Just(Some(format!("Bearer {client_key}x"))),
    ];
    let content_type = prop_oneof![
        4 => Just(Some("application/json".to_string())),
        1 => Just(None),
        1 => Just(Some("text/plain".to_string())),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let request_id = prop_oneof![
        4 => Just(None),
        1 => "[!-~]{0,300}".prop_map(Some),
    ];
    let target = prop_oneof![
        8 => Just(("POST", "/v1/chat/completions")),
        3 => Just(("POST", "/v1/embeddings")),
        1 => Just(("GET", "/v1/models")),
        1 => Just(("GET", "/v1/chat/completions")),
        1 => Just(("PUT", "/v1/embeddings")),
        1 => Just(("POST", "/v1/chat/completions?stream=true")),
    ];
    (target, auth, content_type, request_id, body).prop_map(
        |((method, path), auth, ct, rid, body)| {
            let mut headers = Vec::new();
            if let Some(a) = auth {
                headers.push(("Authorization".to_string(), a));
            }
            if let Some(c) = ct {
                headers.push(("Content-Type".to_string(), c));
            }
            if let Some(r) = rid {
                headers.push(("x-request-id".to_string(), r));
            }
            (method.to_string(), path.to_string(), headers, body)
        },
    )
}

#[actix_rt::test]
async fn thousands_of_malformed_requests_get_no_5xx_and_no_crash() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    const CASES: usize = 3000;
    const IN_FLIGHT: usize = 8;
    let mock = MockUpstream::start();
    mock.set_stream(2, Duration::ZERO);
    let mut gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL],
        &[],
        &[
            account("a1", &key("fuzz1"), ""),
            account("a2", &key("fuzz2"), ""),
        ],
    )]));
    let strategy = fuzz_strategy(gw.client_key().to_string());
    let mut runner = TestRunner::deterministic();
    let cases: Vec<Fuzzed> = (0..CASES)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("generating a case")
                .current()
        })
        .collect();

    let http = Http::new();
    let base = gw.url();
    let cases = Rc::new(std::cell::RefCell::new(cases.into_iter().enumerate()));
    let failures = Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
    let statuses = Rc::new(std::cell::RefCell::new(BTreeMap::<u16, usize>::new()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (cases, failures, statuses, http, base) = (
            cases.clone(),
            failures.clone(),
            statuses.clone(),
            http.clone(),
            base.clone(),
        );
        workers.push(actix_rt::spawn(async move {
            loop {
                let next = cases.borrow_mut().next();
                let Some((i, (method, path, headers, body))) = next else {
                    break;
                };
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let url = format!("{base}{path}");
                match http
                    .try_send(&method, &url, None, &headers, Some(&body))
                    .await
                {
                    Ok(r) => {
                        *statuses.borrow_mut().entry(r.status).or_default() += 1;
                        if r.status >= 500 {
                            failures.borrow_mut().push(format!(
                                "case {i}: {method} {path} {headers:?} body {:?} → {r}",
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    }
                    // The client refusing to send an odd header is not the gateway's fault;
                    // anything else (a reset, a timeout) is.
                    Err(e) if e.contains("header") => {}
                    Err(e) => failures.borrow_mut().push(format!(
                        "case {i}: {method} {path} {headers:?} body {:?} → transport error {e}",
                        String::from_utf8_lossy(&body)
                    )),
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.borrow();
    println!(
        "{CASES} generated requests in {:.1} s: statuses {:?}",
        started.elapsed().as_secs_f64(),
        statuses.borrow()
    );
    assert!(
        failures.is_empty(),
        "{} of {CASES} malformed requests got a 5xx or broke the connection; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(gw.is_running(), "the gateway survived");
    assert!(
        statuses.borrow().get(&200).copied().unwrap_or(0) > 0,
        "some generated requests were valid and served: {:?}",
        statuses.borrow()
    );
    assert!(!gw.logs().contains("panicked"), "no panic in the logs");
}

// ------------------------------------------------------------------------------------------------
// Issue 4: SIGTERM during a burst, SIGKILL under load then restart
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn sigterm_during_a_burst_commits_exactly_what_was_used() {
    const BURST: usize = 24;
    let mock = MockUpstream::start();
    let keys: Vec<String> = (1..=4).map(|i| key(&format!("term{i}"))).collect();
    let accounts: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| account(&format!("a{}", i + 1), k, ""))
        .collect();
    let mut gw = TestGateway::start(&format!(
        "server: {{ host: 127.0.0.1, workers: 2, shutdown_grace: 2s }}\n{}",
        providers(&[provider(
            "p",
            &mock.base_url(),
            &[MOCK_MODEL],
            &["max_completion_tokens: 20"],
            &accounts
        )])
    ));
    mock.set_latency(None, Duration::from_millis(300));
    mock.set_usage(None, 5, 7);
    mock.set_stream(10, Duration::from_millis(50));
    // a4 never answers: its requests are cut at the end of shutdown_grace and settled at their
    // estimate.
    mock.behave(&keys[3], Behavior::Hang);
    let content = "burst";
    let estimate = estimate_chars3(content, 20);

    let http = Http::new();
    let url = chat_url(&gw);
    let ck = gw.client_key().to_string();
    let mut clients = Vec::new();
    for i in 0..BURST {
        let (http, url, ck) = (http.clone(), url.clone(), ck.clone());
        let mut body = chat_body(MOCK_MODEL, content);
        if i % 3 == 0 {
            body["stream"] = json!(true);
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        clients.push(actix_rt::spawn(async move {
            http.try_send(
                "POST",
                &url,
                Some(&ck),
                &[("Content-Type", "application/json")],
                Some(&bytes),
            )
            .await
            .map(|r| r.status)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.total().requests < BURST as u64 {
        assert!(
            Instant::now() < deadline,
            "the burst reached the upstream: {:?}",
            mock.total()
        );
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    gw.send_sigterm();
    let exit = gw.wait_exit(Duration::from_secs(20));
    assert!(
        exit.status.success(),
        "exit 0 after SIGTERM: {:?}\n{}",
        exit.status,
        exit.stderr
    );
    let mut outcomes = BTreeMap::new();
    for c in clients {
        let outcome = match c.await.unwrap() {
            Ok(status) => status.to_string(),
            Err(_) => "cut".to_string(),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }

    let rows = gw.accounts();
    let mut report = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let stats = mock.stats(k);
        let unanswered = stats.requests - stats.answered;
        let expected = stats.tokens() + unanswered * estimate;
        let name = format!("p/a{}", i + 1);
        let row = rows.iter().find(|r| r.name == name).unwrap();
        report.push(format!(
            "{name}: received {}, answered {} ({} tokens), settled at shutdown {unanswered} × {estimate}; quota_used {}",
            stats.requests,
            stats.answered,
            stats.tokens(),
            row.quota_used
        ));
        assert_eq!(
            row.quota_used,
            expected,
            "quota_used of {name} after SIGTERM = real tokens of the answered requests + the \
             estimate of those settled at shutdown\n{}\nclients: {outcomes:?}",
            report.join("\n")
        );
    }
    assert!(
        mock.stats(&keys[3]).requests > 0,
        "some requests were cut at shutdown"
    );
    println!("{}\nclients: {outcomes:?}", report.join("\n"));
}

/// Keeps `clients` loops sending requests until `stop` is set; counts the answers by status.
struct Load {
    statuses: Rc<std::cell::RefCell<BTreeMap<u16, u64>>>,
    errors: Rc<std::cell::Cell<u64>>,
    stop: Rc<std::cell::Cell<bool>>,
    workers: Vec<actix_rt::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, client_key: String, clients: usize, content: &'static str) -> Load {
        let load = Load {
            statuses: Rc::default(),
            errors: Rc::default(),
            stop: Rc::default(),
            workers: Vec::new(),
        };
        let http = Http::with_timeout(Duration::from_secs(10));
        let mut workers = Vec::new();
        for _ in 0..clients {
            let (http, url, ck) = (http.clone(), url.clone(), client_key.clone());
            let (statuses, errors, stop) = (
                load.statuses.clone(),
                load.errors.clone(),
                load.stop.clone(),
            );
            workers.push(actix_rt::spawn(async move {
                let body = serde_json::to_vec(&chat_body(MOCK_MODEL, content)).unwrap();
                while !stop.get() {
                    let r = http
                        .try_send(
                            "POST",
                            &url,
                            Some(&ck),
                            &[("Content-Type", "application/json")],
                            Some(&body),
                        )
                        .await;
                    match r {
                        Ok(r) => {
                            *statuses.borrow_mut().entry(r.status).or_default() += 1;
                            if r.status == 429 {
                                actix_rt::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        Err(_) => {
                            errors.set(errors.get() + 1);
                            actix_rt::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        Load { workers, ..load }
    }

    async fn stop(self) -> (BTreeMap<u16, u64>, u64) {
        self.stop.set(true);
        for w in self.workers {
            let _ = w.await;
        }
        let statuses = self.statuses.borrow().clone();
        (statuses, self.errors.get())
    }

    /// Answers with `status` so far.
    fn count(&self, status: u16) -> u64 {
        self.statuses.borrow().get(&status).copied().unwrap_or(0)
    }
}

#[actix_rt::test]
async fn sigkill_under_load_then_restart_never_undercounts_and_trips_no_upstream_limit() {
    const TOKEN_LIMIT: u64 = 1000;
    const WINDOW: Duration = Duration::from_secs(2);
    const DB_INTERVAL: Duration = Duration::from_secs(1);
    const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
    let mock = MockUpstream::start();
    let keys: Vec<String> = (1..=3).map(|i| key(&format!("kill{i}"))).collect();
    let accounts: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| account(&format!("a{}", i + 1), k, ""))
        .collect();
    let limits = "rate_limits: { concurrent: 4, windows: [ { kind: requests, limit: 20, per: 2s }, { kind: tokens, limit: 1000, per: 2s } ] }";
    let mut gw = TestGateway::start(&format!(
        "sync: {{ database_interval: 1s, redis_interval: 1s }}\ntracking: {{ flush_interval: 1s }}\n{}",
        providers(&[provider(
            "p",
            &mock.base_url(),
            &[MOCK_MODEL],
            &["max_completion_tokens: 20", limits],
            &accounts
        )])
    ));
    mock.set_strict(
        None,
        StrictLimits {
            requests: vec![(20, WINDOW)],
            tokens: vec![(TOKEN_LIMIT, WINDOW)],
            concurrent: Some(4),
        },
    );
    mock.set_latency(None, Duration::from_millis(20));
    let ids: Vec<String> = (1..=3).map(|i| gw.account_id(&format!("p/a{i}"))).collect();

    // Load, then SIGKILL while it runs.
    let started = Instant::now();
    let load = Load::start(chat_url(&gw), gw.client_key().to_string(), 8, "kill test");
    actix_rt::time::sleep(Duration::from_millis(3200)).await;
    let served_before_kill = load.count(200);
    let load_secs = started.elapsed().as_secs_f64();
    gw.sigkill();
    let (before, _) = load.stop().await;
    let served: Vec<u64> = keys.iter().map(|k| mock.stats(k).tokens()).collect();
    assert!(
        before.get(&200).copied().unwrap_or(0) > 0,
        "the load was served: {before:?}"
    );

    gw.restart();
    let http = Http::new();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    // Restored usage: never below what the upstream served, at most the charged gap above it.
    // The gap is what an account could be admitted in one database interval (1 s): bounded by
    // its token window, 1000 per 2 s — counted twice, as an interval may straddle two windows.
    let gap_bound = 2 * TOKEN_LIMIT;
    for (i, id) in ids.iter().enumerate() {
        let restored = current_usage(&http, &gw, id).await;
        report.push(format!(
            "a{}: upstream served {} tokens, restored quota_used {restored} (allowed {}..={})",
            i + 1,
            served[i],
            served[i],
            served[i] + gap_bound
        ));
        if restored < served[i] || restored > served[i] + gap_bound {
            failures.push(format!(
                "restored usage of a{} ({restored}) is outside [served, served + charged gap] = [{}, {}]",
                i + 1,
                served[i],
                served[i] + gap_bound
            ));
        }
    }

    // Request-log rows lost: at most one flush interval's worth (plus the requests in flight).
    // Counted on the successful requests, which are logged whatever the tracker does with
    // refusals.
    let rows = count_request_logs(&gw.sqlite_path(), Some(200));
    let all_rows = count_request_logs(&gw.sqlite_path(), None);
    let rate = served_before_kill as f64 / load_secs;
    let allowed_loss = (rate * FLUSH_INTERVAL.as_secs_f64()).ceil() as u64 + 8;
    let lost = served_before_kill.saturating_sub(rows);
    report.push(format!(
        "request-log rows with status 200: {rows} for {served_before_kill} answered 200 before the kill \
         ({rate:.0}/s): lost {lost}, allowed {allowed_loss} (one flush interval's worth + 8 in flight); \
         {all_rows} rows in all"
    ));
    if lost > allowed_loss {
        failures.push(format!(
            "{lost} request-log rows lost, more than one flush interval's worth ({allowed_loss})"
        ));
    }

    // Full speed right after the restart: the strict upstream sees no 429, before or after.
    let load = Load::start(chat_url(&gw), gw.client_key().to_string(), 8, "kill test");
    actix_rt::time::sleep(Duration::from_millis(3000)).await;
    let (after, errors) = load.stop().await;
    let total = mock.total();
    report.push(format!(
        "before the kill: {before:?}; after the restart: {after:?} ({errors} transport errors); \
         upstream answers: {:?}",
        total.statuses
    ));
    if after.get(&200).copied().unwrap_or(0) == 0 {
        failures.push("nothing was served after the restart".to_string());
    }
    if total.rejected_429 != 0 {
        failures.push(format!(
            "the strict upstream answered {} 429s ({:?})",
            total.rejected_429, total.rejected_by
        ));
    }
    let _ = DB_INTERVAL;
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "SIGKILL under load, then restart:\n{}\n--\n{}",
        failures.join("\n"),
        report.join("\n")
    );
}

/// Rows in `request_logs` of an SQLite database (with that status, if given).
fn count_request_logs(path: &std::path::Path, status: Option<i32>) -> u64 {
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = diesel::sqlite::SqliteConnection::establish(&path.display().to_string())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let query = match status {
        Some(status) => {
            format!("SELECT COUNT(*) AS n FROM request_logs WHERE status_code = {status}")
        }
        None => "SELECT COUNT(*) AS n FROM request_logs".to_string(),
    };
    let count: Count = diesel::sql_query(query)
        .get_result(&mut conn)
        .expect("counting request_logs");
    count.n as u64
}

// ------------------------------------------------------------------------------------------------
// The official OpenAI Python SDK
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
#[ignore = "needs python openai: run scripts/test"]
async fn the_official_openai_python_sdk_works_unchanged() {
    let python = std::env::var("QUOTAGATE_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("QUOTAGATE_TEST_PYTHON is not set: run scripts/test (it installs the openai package into a venv)")
    });
    let check = std::process::Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        check.status.success(),
        "the openai package is missing for {python}: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let mock = MockUpstream::start();
    let gw = TestGateway::start(&providers(&[provider(
        "p",
        &mock.base_url(),
        &[MOCK_MODEL, "embed-model"],
        &["rate_limits: { windows: [ { kind: requests, limit: 4, per: 60s } ] }"],
        &[account("a1", &key("sdk"), "")],
    )]));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_openai_sdk.py");
    let url = gw.url();
    let client_key = gw.client_key().to_string();
    let out = actix_rt::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .env("QG_BASE_URL", format!("{url}/v1"))
            .env("QG_API_KEY", client_key)
            .env("QG_MODEL", MOCK_MODEL)
            .env("QG_EMBED_MODEL", "embed-model")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .output()
            .expect("running the SDK test")
    })
    .await
    .unwrap();
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the SDK test failed ({}):\n{text}",
        out.status
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sdk: all checks passed"),
        "{text}"
    );
    println!("{text}");
}
