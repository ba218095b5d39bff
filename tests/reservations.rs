//! The life of a reservation end to end (issue 8 §6): a call that outlives
//! `sync.reservation_timeout` keeps its reservation (renewed) and commits its real usage; a
//! per-model `concurrent` limit holds only that model. (A request dropped while its account
//! answers is in `tests/runtime.rs`.)

mod common;

use std::time::Duration;

use common::{chat_body, Http, MockUpstream, TestGateway, MOCK_MODEL};

fn key(label: &str) -> String {
    format!(
        "sk-resv-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn chat(http: &Http, gw: &TestGateway, model: &str) -> common::Resp {
    let mut body = chat_body(model, "hi");
    body["max_tokens"] = 50.into();
    http.post_json(
        &format!("{}/v1/chat/completions", gw.url()),
        Some(gw.client_key()),
        &body,
    )
    .await
}

#[actix_rt::test]
async fn a_call_longer_than_the_reservation_timeout_keeps_its_reservation() {
    let mock = MockUpstream::start();
    let k = key("slow");
    mock.set_latency(None, Duration::from_millis(3_500));
    mock.set_usage(None, 7, 5);
    // The provider allows 10 s; reservations time out after 2 s unless renewed.
    let gw = TestGateway::start(&format!(
        "sync: {{ reservation_timeout: 2s }}
upstream: {{ timeout: 1s }}
providers:
  - name: p
    base_url: \"{}\"
    timeout: 10s
    models: [{MOCK_MODEL}]
    rate_limits: {{ concurrent: 1 }}
    accounts:
      - {{ name: a1, api_key: \"{k}\", quota_limit: 100000 }}",
        mock.base_url()
    ));
    let http = Http::new();
    let r = chat(&http, &gw, MOCK_MODEL).await;
    assert_eq!(r.status, 200, "{r}");
    let quota = http
        .get(
            &format!("{}/api/v1/stats/quota/p%2Fa1", gw.url()),
            Some(gw.admin_token()),
        )
        .await;
    assert_eq!(
        quota.json()["current_usage"],
        12,
        "the real usage, not the estimate: the reservation never expired ({quota})"
    );
    assert!(
        !gw.logs().contains("reservation_expired"),
        "nothing expired mid-call"
    );
    // And the slot is free again.
    mock.set_latency(None, Duration::ZERO);
    assert_eq!(chat(&http, &gw, MOCK_MODEL).await.status, 200);
}

#[actix_rt::test]
async fn a_per_model_concurrency_limit_holds_only_that_model() {
    let mock = MockUpstream::start();
    let k = key("models");
    mock.set_latency(None, Duration::from_millis(400));
    let gw = TestGateway::start(&format!(
        "providers:
  - name: p
    base_url: \"{}\"
    models:
      - {{ name: narrow, rate_limits: {{ concurrent: 1 }} }}
      - wide
    accounts:
      - {{ name: a1, api_key: \"{k}\" }}",
        mock.base_url()
    ));
    let http = Http::new();
    let both = |model: &'static str| {
        let (http, gw) = (&http, &gw);
        async move { tokio::join!(chat(http, gw, model), chat(http, gw, model)) }
    };
    let (a, b) = both("wide").await;
    assert_eq!((a.status, b.status), (200, 200), "{a} / {b}");
    let (a, b) = both("narrow").await;
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 429], "{a} / {b}");
    let refused = if a.status == 429 { a } else { b };
    assert_eq!(
        refused.json()["error"]["limit"],
        "narrow:concurrent",
        "{refused}"
    );
}
