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

use std::time::Duration;

use common::load::{allowed, drive, slot_reuse, Target};
use common::{chat_body, MockUpstream, StrictLimits, TestGateway, MOCK_MODEL};

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

    let body = serde_json::to_vec(&chat_body(MOCK_MODEL, "precision")).unwrap();
    let targets = [Target {
        url: gw.url(),
        key: gw.client_key().to_string(),
    }];
    let load = drive(&targets, CLIENTS, RUN, &body).await;
    let elapsed = load.elapsed;

    let upstream = mock.total();
    let mean_client = load.mean_latency();
    let received = mock.received();
    let upstream_latencies: Vec<Duration> = received.iter().filter_map(|r| r.latency).collect();
    let mean_upstream =
        upstream_latencies.iter().sum::<Duration>() / upstream_latencies.len().max(1) as u32;
    // Each request slot is held for h = W + the latency (see `common::load::allowed`).
    let slots = ACCOUNTS * REQUESTS;
    let held = WINDOW + mean_client;
    let per_slot = RUN.as_secs_f64() / held.as_secs_f64();
    let allowed = allowed(slots, RUN, held);
    let admission = load.admitted() as f64 / allowed as f64;
    // How tightly slots are reused, per account: insensitive to where the run's end falls,
    // unlike the count above.
    let keys: Vec<String> = (1..=ACCOUNTS)
        .map(|i| format!("sk-precision-{i}"))
        .collect();
    let (reuse, mean_gap) = slot_reuse(&received, &keys, REQUESTS as usize, held);

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
        load.admitted(),
        admission * 100.0,
        per_slot,
        WINDOW.as_millis(),
        mean_client.as_secs_f64() * 1000.0,
        mean_upstream.as_secs_f64() * 1000.0,
        load.refused
    );
    println!(
        "precision: slot reuse every {:.1} ms on average (W + latency = {:.1} ms): {:.1} %",
        mean_gap.as_secs_f64() * 1000.0,
        held.as_secs_f64() * 1000.0,
        reuse * 100.0
    );

    assert!(
        load.other.is_empty() && load.lost.is_empty(),
        "unexpected answers: {:?} {:?}",
        &load.other[..load.other.len().min(5)],
        load.lost
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
        load.admitted(),
        admission * 100.0
    );
    assert!(
        reuse >= 0.95,
        "slots were reused every {mean_gap:?} on average, {:.1} % of the best (W + latency = \
         {held:?}; < 95 %)",
        reuse * 100.0
    );
}
