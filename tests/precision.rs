//! Precision: a strict upstream (429 on any excess of its per-key limits, by its own clock) behind
//! a pool of 3 accounts configured with the same limits, driven above capacity by concurrent
//! clients for 12 s (6 windows of 2 s). The upstream must see zero 429s, and the gateway must
//! admit at least 95 % of what the limits allow, counting each request slot as held for the
//! window `W` plus the measured latency (the gateway must hold it from before sending until `W`
//! after the answer, so that is the most it can do): both as a count (slots × ⌈run / (W +
//! latency)⌉) and as how soon each slot is used again (mean gap between an account's k-th and
//! (k + limit)-th admission, against W + latency).
//!
//! Run with `--nocapture` to see the figures.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{chat_body, Http, MockUpstream, StrictLimits, TestGateway, MOCK_MODEL};

const ACCOUNTS: u64 = 3;
/// Requests per window per account.
const REQUESTS: u64 = 5;
const WINDOW: Duration = Duration::from_secs(2);
const CONCURRENT: u64 = 2;
/// The gateway's estimate of one request: "user" (2) + "precision" (3) + 4 + 3 + 20 = 32 tokens
/// under `chars:3`; the token limit is 50 times that.
const ESTIMATE: u64 = 32;
const TOKENS: u64 = 50 * ESTIMATE;
const RUN: Duration = Duration::from_secs(12);
const CLIENTS: usize = 12;
const UPSTREAM_LATENCY: Duration = Duration::from_millis(50);

#[actix_rt::test]
async fn the_gateway_never_trips_a_strict_upstream_and_admits_nearly_all_it_allows() {
    let mock = MockUpstream::start();
    mock.set_strict(
        None,
        StrictLimits {
            requests: vec![(REQUESTS, WINDOW)],
            tokens: vec![(TOKENS, WINDOW)],
            concurrent: Some(CONCURRENT),
        },
    );
    mock.set_latency(None, UPSTREAM_LATENCY);
    let accounts: String = (1..=ACCOUNTS)
        .map(|i| format!("      - {{ name: a{i}, api_key: \"sk-precision-{i}\" }}\n"))
        .collect();
    let gw = TestGateway::start(&format!(
        "providers:
  - name: strict
    base_url: \"{}\"
    strategy: least_used
    max_completion_tokens: 20
    models: [{MOCK_MODEL}]
    rate_limits:
      concurrent: {CONCURRENT}
      windows:
        - {{ kind: requests, limit: {REQUESTS}, per: {}s }}
        - {{ kind: tokens, limit: {TOKENS}, per: {}s }}
    accounts:
{accounts}",
        mock.base_url(),
        WINDOW.as_secs(),
        WINDOW.as_secs()
    ));

    let admitted = Rc::new(Cell::new(0u64));
    let refused = Rc::new(Cell::new(0u64));
    let other = Rc::new(RefCell::new(Vec::<String>::new()));
    let latencies = Rc::new(RefCell::new(Vec::<Duration>::new()));
    let http = Http::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let body = serde_json::to_vec(&chat_body(MOCK_MODEL, "precision")).unwrap();
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, body, key) = (
            http.clone(),
            url.clone(),
            body.clone(),
            gw.client_key().to_string(),
        );
        let (admitted, refused, other, latencies) = (
            admitted.clone(),
            refused.clone(),
            other.clone(),
            latencies.clone(),
        );
        clients.push(actix_rt::spawn(async move {
            while started.elapsed() < RUN {
                let r = http
                    .send(
                        "POST",
                        &url,
                        Some(&key),
                        &[("Content-Type", "application/json")],
                        Some(&body),
                    )
                    .await;
                match r.status {
                    200 => {
                        admitted.set(admitted.get() + 1);
                        latencies.borrow_mut().push(r.elapsed);
                    }
                    429 if r.code().as_deref() == Some("rate_limit_exceeded") => {
                        refused.set(refused.get() + 1);
                        // Come back when the gateway says a slot frees (exact when settled
                        // usage blocks), polling at least every 100 ms.
                        let hint = r.json()["error"]["retry_after"].as_f64().unwrap_or(0.0);
                        let wait = Duration::from_secs_f64(hint)
                            .clamp(Duration::from_millis(2), Duration::from_millis(100));
                        actix_rt::time::sleep(wait).await;
                    }
                    _ => {
                        other.borrow_mut().push(r.to_string());
                        actix_rt::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = started.elapsed();

    let upstream = mock.total();
    let mut latencies = latencies.borrow().clone();
    latencies.sort();
    let mean_client = latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32;
    let received = mock.received();
    let upstream_latencies: Vec<Duration> = received.iter().filter_map(|r| r.latency).collect();
    let mean_upstream =
        upstream_latencies.iter().sum::<Duration>() / upstream_latencies.len().max(1) as u32;
    // Each request slot is held for h = W + the latency, so over the run each of the
    // ACCOUNTS × REQUESTS slots can serve at most ceil(RUN / h) requests (at 0, h, 2h, …).
    let slots = ACCOUNTS * REQUESTS;
    let held = WINDOW + mean_client;
    let per_slot = RUN.as_secs_f64() / held.as_secs_f64();
    let allowed = slots * per_slot.ceil() as u64;
    let admission = admitted.get() as f64 / allowed as f64;

    // How tightly slots are reused, per account: the k-th and the (k + REQUESTS)-th admission
    // share a slot, so they are at least h apart; the closer to h, the better. Insensitive to
    // where the run's end falls, unlike the count above.
    let mut gaps = Vec::new();
    for i in 1..=ACCOUNTS {
        let key = format!("sk-precision-{i}");
        let times: Vec<Instant> = received
            .iter()
            .filter(|r| r.key == key && r.status == Some(200))
            .map(|r| r.at)
            .collect();
        for pair in times.windows(REQUESTS as usize + 1) {
            gaps.push(pair[REQUESTS as usize] - pair[0]);
        }
    }
    let mean_gap = gaps.iter().sum::<Duration>() / gaps.len().max(1) as u32;
    let reuse = held.as_secs_f64() / mean_gap.as_secs_f64().max(1e-9);

    println!(
        "precision: run {:.1} s, {CLIENTS} clients, {ACCOUNTS} accounts × ({REQUESTS} requests + \
         {TOKENS} tokens per {} s, {CONCURRENT} concurrent)",
        elapsed.as_secs_f64(),
        WINDOW.as_secs()
    );
    println!(
        "precision: upstream_429s: {} (upstream statuses {:?}, max concurrency {})",
        upstream.rejected_429, upstream.statuses, upstream.max_concurrency
    );
    println!(
        "precision: admitted {} of {allowed} allowed = {:.1} % ({slots} slots × ceil({:.2}), a slot \
         held W {} ms + client latency {:.1} ms; upstream latency {:.1} ms); gateway 429s {}",
        admitted.get(),
        admission * 100.0,
        per_slot,
        WINDOW.as_millis(),
        mean_client.as_secs_f64() * 1000.0,
        mean_upstream.as_secs_f64() * 1000.0,
        refused.get()
    );
    println!(
        "precision: slot reuse every {:.1} ms on average (W + latency = {:.1} ms): {:.1} %",
        mean_gap.as_secs_f64() * 1000.0,
        held.as_secs_f64() * 1000.0,
        reuse * 100.0
    );

    assert!(
        other.borrow().is_empty(),
        "unexpected answers: {:?}",
        &other.borrow()[..other.borrow().len().min(5)]
    );
    assert_eq!(
        upstream.rejected_429, 0,
        "the strict upstream saw an excess ({:?}): the gateway let through more than the limits",
        upstream.rejected_by
    );
    assert!(
        upstream.max_concurrency <= CONCURRENT,
        "concurrency {} > {CONCURRENT}",
        upstream.max_concurrency
    );
    assert!(
        admission >= 0.95,
        "the gateway admitted {} requests, {:.1} % of the {allowed} the limits allow (< 95 %)",
        admitted.get(),
        admission * 100.0
    );
    assert!(
        reuse >= 0.95,
        "slots were reused every {mean_gap:?} on average, {:.1} % of the best (W + latency = \
         {held:?}; < 95 %)",
        reuse * 100.0
    );
}
