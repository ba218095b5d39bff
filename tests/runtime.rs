//! The actor runtime driven by messages, as its users will drive it: built from in-memory specs
//! (no store, sync off), on the caller's arbiter, under tokio's paused clock (no sleeps).

use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::specs::{account, limit, provider, MODEL};
use quotagate::actors::catalog::{ModelSpec, ProviderSpec, QuotaSettings};
use quotagate::actors::events::Event;
use quotagate::actors::{AcquireError, QuotaSystem, Reservation, RuntimeSettings, TokioClock};
use quotagate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use quotagate::domain::refusal::Verdict;
use quotagate::domain::schedule::Schedule;
use quotagate::domain::{LimitKind, Strategy, Tokenizer};
use quotagate::metrics::Metrics;

/// 2026-11-28T23:00:00Z: one hour before the daily quota reset.
const START: i64 = 1_795_906_800_000;

fn settings(arbiters: usize) -> RuntimeSettings {
    RuntimeSettings {
        clock: Arc::new(TokioClock::starting_at(START)),
        arbiters,
        reservation_timeout: Duration::from_secs(600),
        report_interval: Duration::from_millis(25),
        lease_ttl: Duration::from_secs(10),
        peak_interval: Duration::from_secs(1),
        quota: QuotaSettings {
            schedule: Schedule::daily_utc(),
            warning_threshold: 0.8,
        },
        metrics: Metrics::new(),
        webhook_url: None,
        source: None,
        ledger: None,
    }
}

/// Starts the runtime on the test's arbiter with a paused clock.
async fn start(specs: Vec<ProviderSpec>) -> QuotaSystem {
    tokio::time::pause();
    start_another(specs).await
}

/// Another runtime in the same (already paused) test.
async fn start_another(specs: Vec<ProviderSpec>) -> QuotaSystem {
    QuotaSystem::start(settings(0), specs, Default::default())
        .await
        .unwrap()
}

async fn acquire(qs: &QuotaSystem, estimate: u64) -> Result<Reservation, AcquireError> {
    qs.acquire(MODEL, |_| estimate, &[]).await
}

fn refused(result: Result<Reservation, AcquireError>) -> Verdict {
    match result {
        Err(AcquireError::Refused(v)) => v,
        Err(other) => panic!("expected a refusal, got {other:?}"),
        Ok(lease) => panic!("expected a refusal, got a lease on {}", lease.account.name),
    }
}

fn collect_events(qs: &QuotaSystem) -> Arc<Mutex<Vec<Event>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    qs.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
    seen
}

fn names(events: &Arc<Mutex<Vec<Event>>>) -> Vec<&'static str> {
    events.lock().unwrap().iter().map(Event::name).collect()
}

/// Lets queued `do_send` messages run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    settle().await;
}

/// Advances by `d` one second at a time, so that the workers' reports keep their leases.
async fn advance_steadily(d: Duration) {
    for _ in 0..d.as_secs() {
        advance(Duration::from_secs(1)).await;
    }
}

#[actix::test]
async fn a_reservation_is_committed_with_real_usage_and_released_when_unsent() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 1000, vec![])],
    )])
    .await;
    let lease = acquire(&qs, 100).await.unwrap();
    assert_eq!(&*lease.account.name, "a");
    let mut guard = lease.guard;
    guard.mark_sent();
    guard.commit(Usage::Reported(30), None);
    settle().await;
    assert_eq!(qs.status("a").await.unwrap().current_usage, 30);

    let lease = acquire(&qs, 100).await.unwrap();
    lease.guard.release();
    settle().await;
    let status = qs.status("p/a").await.unwrap();
    assert_eq!(status.current_usage, 30, "a release consumes nothing");
    assert!(status.available);

    // Dropped after being sent: the outcome is unknown, so the estimate is committed.
    let mut lease = acquire(&qs, 100).await.unwrap();
    lease.guard.mark_sent();
    drop(lease);
    settle().await;
    assert_eq!(qs.status("a").await.unwrap().current_usage, 130);
}

#[actix::test]
async fn refusals_follow_the_precedence_rate_then_quota_then_impossible_then_none() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![
            account("rate", 0, vec![limit(LimitKind::Requests, 1, Some(60))]),
            account("quota", 50, vec![]),
            account("small", 0, vec![limit(LimitKind::Tokens, 10, Some(60))]),
        ],
    )])
    .await;
    // Fill `rate` and `quota`.
    let held: Vec<Reservation> = vec![
        acquire(&qs, 40).await.unwrap(),
        acquire(&qs, 40).await.unwrap(),
    ];
    let on: Vec<&str> = held.iter().map(|l| &*l.account.name).collect();
    assert!(on.contains(&"rate") && on.contains(&"quota"), "{on:?}");
    // Both holds come from requests in flight: `rate`'s request counts until W after its
    // commit, `quota`'s reserved tokens may come back at its commit. The sooner one names the
    // verdict, and only as a lower bound.
    match refused(acquire(&qs, 40).await) {
        Verdict::RateLimited {
            limit,
            retry_at,
            lower_bound,
        } => {
            assert_eq!(&*limit, "quota");
            assert!(
                lower_bound,
                "blocked by a request in flight: only a lower bound"
            );
            assert!(retry_at < START + 60_000, "{retry_at}");
        }
        other => panic!("{other:?}"),
    }
    for lease in held {
        let mut g = lease.guard;
        g.mark_sent();
        g.commit(Usage::Reported(40), None);
    }
    settle().await;
    match refused(acquire(&qs, 40).await) {
        Verdict::RateLimited {
            retry_at,
            lower_bound,
            ..
        } => {
            assert!(!lower_bound, "settled usage gives the exact time");
            assert!(
                (START + 60_000..=START + 61_000).contains(&retry_at),
                "{retry_at}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Past the rate window only the quota blocks `quota`, and `rate` is free again.
    advance(Duration::from_secs(62)).await;
    let lease = acquire(&qs, 40).await.unwrap();
    assert_eq!(&*lease.account.name, "rate");
    drop(lease);
    settle().await;

    let qs2 = start_another(vec![provider(
        "q",
        Strategy::RoundRobin,
        vec![account("quota", 50, vec![])],
    )])
    .await;
    qs2.consume_quota("quota", MODEL, 50).await.unwrap();
    assert_eq!(
        refused(acquire(&qs2, 10).await),
        Verdict::QuotaExceeded {
            reset_at: START + 3_600_000
        }
    );

    let qs3 = start_another(vec![provider(
        "r",
        Strategy::RoundRobin,
        vec![account(
            "small",
            0,
            vec![limit(LimitKind::Tokens, 10, Some(60))],
        )],
    )])
    .await;
    assert!(matches!(
        refused(acquire(&qs3, 11).await),
        Verdict::Impossible {
            need: 11,
            limit_value: 10,
            ..
        }
    ));

    let mut disabled = account("off", 0, vec![]);
    disabled.spec.active = false;
    let qs4 = start_another(vec![provider("s", Strategy::RoundRobin, vec![disabled])]).await;
    assert_eq!(refused(acquire(&qs4, 1).await), Verdict::NoAccountAvailable);
    assert!(matches!(
        qs4.acquire("unknown-model", |_| 1, &[]).await,
        Err(AcquireError::ModelNotFound(_))
    ));
}

#[actix::test]
async fn a_full_pool_falls_back_to_the_next_provider_serving_the_model() {
    let one = |p: &str| {
        provider(
            p,
            Strategy::LeastUsed,
            vec![account(
                &format!("{p}-a"),
                0,
                vec![limit(LimitKind::Requests, 1, Some(60))],
            )],
        )
    };
    let qs = start(vec![one("alpha"), one("beta")]).await;
    let first = acquire(&qs, 1).await.unwrap();
    let second = acquire(&qs, 1).await.unwrap();
    assert_ne!(first.provider.spec.name, second.provider.spec.name);
    assert!(matches!(
        refused(acquire(&qs, 1).await),
        Verdict::RateLimited { .. }
    ));
    // `provider/model` picks one provider.
    let only_beta = qs.acquire("beta/m", |_| 1, &[]).await;
    assert!(matches!(only_beta, Err(AcquireError::Refused(_))));
}

#[actix::test]
async fn the_quota_resets_at_the_cron_boundary_and_warns_once_per_period() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 100, vec![])],
    )])
    .await;
    let events = collect_events(&qs);
    let warnings = Arc::new(AtomicU64::new(0));
    let w = warnings.clone();
    qs.on_warning(move |_, fraction| {
        assert!(fraction >= 0.8);
        w.fetch_add(1, Ordering::SeqCst);
    });
    let exhausted = Arc::new(AtomicU64::new(0));
    let x = exhausted.clone();
    qs.on_exhausted(move |_| {
        x.fetch_add(1, Ordering::SeqCst);
    });
    for _ in 0..3 {
        qs.consume_quota("a", MODEL, 40).await.unwrap();
    }
    assert_eq!(warnings.load(Ordering::SeqCst), 1);
    assert_eq!(exhausted.load(Ordering::SeqCst), 1);
    let status = qs.status("a").await.unwrap();
    assert!(!status.available);
    assert_eq!(status.reason.as_deref(), Some("quota_exceeded"));
    assert_eq!(status.reset_at, START + 3_600_000);

    // The boundary passes while the account is idle: the reset happens (and is announced) on time
    // (tokio fires a timer on the first millisecond tick at or after its deadline).
    advance(Duration::from_millis(3_600_010)).await;
    assert!(
        names(&events).contains(&"quota_reset"),
        "{:?}",
        names(&events)
    );
    let status = qs.status("a").await.unwrap();
    assert_eq!((status.current_usage, status.available), (0, true));
    assert_eq!(status.reset_at, START + 3_600_000 + 86_400_000);
    qs.consume_quota("a", MODEL, 90).await.unwrap();
    assert_eq!(
        warnings.load(Ordering::SeqCst),
        2,
        "a new period warns again"
    );
}

#[actix::test]
async fn an_unsettled_reservation_is_committed_at_its_estimate_when_it_expires() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account(
            "a",
            1000,
            vec![limit(LimitKind::Concurrent, 1, None)],
        )],
    )])
    .await;
    let lease = acquire(&qs, 77).await.unwrap();
    std::mem::forget(lease.guard); // a handler that vanished without settling
    assert!(matches!(
        refused(acquire(&qs, 1).await),
        Verdict::RateLimited { .. }
    ));
    advance(Duration::from_secs(599)).await;
    assert_eq!(qs.status("a").await.unwrap().current_usage, 0);
    advance(Duration::from_secs(2)).await;
    assert_eq!(qs.status("a").await.unwrap().current_usage, 77);
    let stats = qs.rate_stats("a").await.unwrap();
    let concurrent = stats.iter().find(|s| s.limit_type == "concurrent").unwrap();
    assert_eq!(concurrent.current, 0, "the concurrency slot is free again");
    acquire(&qs, 1).await.unwrap();
}

#[actix::test]
async fn a_request_dropped_while_its_account_answers_leaks_nothing() {
    // Concurrency 1: the room is tight, so the request asks the account for a reservation of
    // its own. Dropped after asking and before the answer (its client left), it must not keep
    // the only slot until the reservation times out.
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 0, vec![limit(LimitKind::Concurrent, 1, None)])],
    )])
    .await;
    let mut cut = Box::pin(acquire(&qs, 10));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(cut.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the request waits for its account");
    drop(cut);
    settle().await;
    let lease = acquire(&qs, 10).await.expect("the slot is free at once");
    lease.guard.release();
    settle().await;
    let concurrent = qs
        .rate_stats("a")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.limit_type == "concurrent")
        .unwrap();
    assert_eq!(concurrent.current, 0);
}

#[actix::test]
async fn a_request_dropped_while_its_worker_refills_leaves_the_lease_usable() {
    // No limits: requests are admitted from the worker's lease. The first one finds the lease
    // empty and asks the account to fill it; dropped meanwhile, the refill must still complete
    // so that the next requests are admitted from the lease again.
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 0, vec![])],
    )])
    .await;
    let mut cut = Box::pin(acquire(&qs, 10));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(cut.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the request waits for the refill");
    drop(cut);
    settle().await;
    for _ in 0..3 {
        let lease = acquire(&qs, 10).await.unwrap();
        assert!(lease.guard.from_lease(), "admitted from the worker's lease");
        lease.guard.release();
    }
}

#[actix::test]
async fn a_renewed_reservation_outlives_the_timeout() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 1000, vec![])],
    )])
    .await;
    let lease = acquire(&qs, 50).await.unwrap();
    // In steps shorter than the lease TTL, as the worker's reports run in real time: a single
    // jump past it would expire the worker's whole lease (its holder silent that long).
    advance_steadily(Duration::from_secs(500)).await;
    lease.guard.renew();
    advance_steadily(Duration::from_secs(500)).await;
    assert_eq!(
        qs.status("a").await.unwrap().current_usage,
        0,
        "still in flight"
    );
    let mut g = lease.guard;
    g.mark_sent();
    g.commit(Usage::Reported(20), None);
    settle().await;
    assert_eq!(qs.status("a").await.unwrap().current_usage, 20);
}

fn feedback(outcome: UpstreamOutcome) -> Option<Feedback> {
    Some(Feedback {
        outcome,
        latency_ms: 100,
        headers: RateHeaders::default(),
    })
}

async fn answer(qs: &QuotaSystem, outcome: UpstreamOutcome) {
    let mut g = acquire(qs, 1).await.unwrap().guard;
    g.mark_sent();
    g.commit(Usage::RequestOnly, feedback(outcome));
    settle().await;
}

#[actix::test]
async fn an_upstream_429_cools_the_account_down_for_its_retry_after() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 0, vec![])],
    )])
    .await;
    let events = collect_events(&qs);
    answer(
        &qs,
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(5_000),
            capped: false,
        },
    )
    .await;
    assert!(names(&events).contains(&"cooldown"));
    match refused(acquire(&qs, 1).await) {
        Verdict::RateLimited {
            limit, retry_at, ..
        } => {
            assert_eq!(&*limit, "cooldown");
            assert_eq!(retry_at, START + 5_000);
        }
        other => panic!("{other:?}"),
    }
    advance(Duration::from_millis(5_000)).await;
    acquire(&qs, 1).await.unwrap();
}

#[actix::test]
async fn repeated_failures_open_the_circuit_then_one_probe_at_a_time_closes_it() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 0, vec![])],
    )])
    .await;
    for _ in 0..3 {
        answer(&qs, UpstreamOutcome::Failure).await;
    }
    assert!(
        matches!(refused(acquire(&qs, 1).await), Verdict::RateLimited { ref limit, .. } if &**limit == "circuit_open")
    );
    advance(Duration::from_secs(5)).await;
    let probe = acquire(&qs, 1).await.unwrap();
    assert!(
        matches!(refused(acquire(&qs, 1).await), Verdict::RateLimited { ref limit, .. } if &**limit == "circuit_probe")
    );
    // The probe fails: open again, for twice as long.
    let mut g = probe.guard;
    g.mark_sent();
    g.commit(Usage::RequestOnly, feedback(UpstreamOutcome::Failure));
    settle().await;
    advance(Duration::from_secs(9)).await;
    assert!(acquire(&qs, 1).await.is_err());
    advance(Duration::from_secs(1)).await;
    let probe = acquire(&qs, 1).await.unwrap();
    let mut g = probe.guard;
    g.mark_sent();
    g.commit(Usage::Reported(1), feedback(UpstreamOutcome::Success));
    settle().await;
    let (a, b) = (
        acquire(&qs, 1).await.unwrap(),
        acquire(&qs, 1).await.unwrap(),
    );
    drop((a, b));
}

#[actix::test]
async fn an_upstream_401_disables_the_account_with_an_event() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 0, vec![]), account("b", 0, vec![])],
    )])
    .await;
    let events = collect_events(&qs);
    let mut lease = acquire(&qs, 1).await.unwrap();
    let bad = lease.account.name.clone();
    lease.guard.mark_sent();
    lease
        .guard
        .commit(Usage::RequestOnly, feedback(UpstreamOutcome::Unauthorized));
    settle().await;
    assert_eq!(names(&events), ["account_disabled"]);
    let status = qs.status(&bad).await.unwrap();
    assert!(!status.available);
    assert!(status.reason.unwrap().contains("401"));
    for _ in 0..3 {
        let lease = acquire(&qs, 1).await.unwrap();
        assert_ne!(
            lease.account.name, bad,
            "the disabled account is never chosen"
        );
    }
}

#[actix::test]
async fn upstream_headers_tighten_the_mapped_window() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account(
            "a",
            0,
            vec![limit(LimitKind::Requests, 100, Some(60))],
        )],
    )])
    .await;
    let mut g = acquire(&qs, 1).await.unwrap().guard;
    g.mark_sent();
    g.commit(
        Usage::Reported(1),
        Some(Feedback {
            outcome: UpstreamOutcome::Success,
            latency_ms: 10,
            headers: RateHeaders {
                requests_remaining: Some(1),
                requests_reset_ms: Some(10_000),
                ..RateHeaders::default()
            },
        }),
    );
    settle().await;
    let _one = acquire(&qs, 1).await.unwrap();
    assert!(
        matches!(refused(acquire(&qs, 1).await), Verdict::RateLimited { retry_at, .. } if retry_at == START + 10_000)
    );
}

#[actix::test]
async fn the_catalog_changes_at_run_time_without_losing_counters() {
    let spec = |limit_value: u64, extra: bool| {
        let mut accounts = vec![account(
            "a",
            1000,
            vec![limit(LimitKind::Requests, limit_value, Some(60))],
        )];
        if extra {
            accounts.push(account("b", 1000, vec![]));
        }
        provider("p", Strategy::RoundRobin, accounts)
    };
    let qs = start(vec![spec(2, false)]).await;
    qs.consume_quota("a", MODEL, 123).await.unwrap();
    let held = acquire(&qs, 10).await.unwrap();
    let change = qs.apply_catalog(vec![spec(3, true)]).await.unwrap();
    assert_eq!((change.accounts_added, change.accounts_updated), (1, 1));
    assert_eq!(
        qs.status("a").await.unwrap().current_usage,
        123,
        "usage survives the update"
    );
    let stats = qs.rate_stats("a").await.unwrap();
    let rpm = stats.iter().find(|s| s.limit_type == "rpm").unwrap();
    assert_eq!(
        (rpm.limit, rpm.current, rpm.in_flight),
        (3, 2, 1),
        "the window kept its counts"
    );
    let mut g = held.guard;
    g.mark_sent();
    g.commit(Usage::Reported(7), None);
    settle().await;
    assert_eq!(
        qs.status("a").await.unwrap().current_usage,
        130,
        "a reservation from before the update settles"
    );
    assert!(qs.status("b").await.is_ok());

    let change = qs.apply_catalog(vec![spec(3, false)]).await.unwrap();
    assert_eq!(change.accounts_removed, 1);
    assert!(qs.status("b").await.is_err());
    let change = qs.apply_catalog(vec![]).await.unwrap();
    assert_eq!(change.pools_removed, 1);
    assert!(matches!(
        acquire(&qs, 1).await,
        Err(AcquireError::ModelNotFound(_))
    ));
}

#[actix::test]
async fn pool_status_reset_strategy_and_the_seeds_direct_calls() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("a", 100, vec![]), account("b", 100, vec![])],
    )])
    .await;
    qs.consume_quota("a", MODEL, 100).await.unwrap();
    assert!(qs.check_availability("a", MODEL, 1).await.unwrap().is_err());
    assert!(qs.check_availability("b", MODEL, 1).await.unwrap().is_ok());
    let pool = qs.pool_status("p").await.unwrap();
    assert_eq!((pool.total_accounts, pool.available_accounts), (2, 1));
    let a = pool
        .accounts_status
        .iter()
        .find(|s| s.account == "a")
        .unwrap();
    assert_eq!(
        (a.quota_used, a.quota_limit, a.usage_percent),
        (100, 100, 100.0)
    );
    assert_eq!(qs.reset_account("a").await.unwrap().current_usage, 0);
    qs.consume_quota("b", MODEL, 60).await.unwrap();
    assert_eq!(qs.reset_provider("p").await.unwrap(), 2);
    assert_eq!(qs.status("b").await.unwrap().current_usage, 0);
}

#[cfg(feature = "fault-injection")]
#[actix::test]
async fn a_panic_inside_a_message_loses_only_that_message() {
    use quotagate::domain::account::PANIC_MODEL;
    let mut spec = provider("p", Strategy::RoundRobin, vec![account("a", 1000, vec![])]);
    spec.models.push(ModelSpec {
        name: Arc::from(PANIC_MODEL),
        price_input: 0.0,
        price_output: 0.0,
    });
    let qs = start(vec![spec]).await;
    qs.consume_quota("a", MODEL, 42).await.unwrap();
    let held = acquire(&qs, 5).await.unwrap();
    // The pool keeps each member's last collected state (the sync collects it every interval).
    assert_eq!(qs.collect_changed().await.len(), 1);
    let result = qs.acquire(PANIC_MODEL, |_| 1, &[]).await;
    assert_eq!(refused(result), Verdict::NoAccountAvailable);
    assert_eq!(qs.events().metrics().actor_panics_total.get(), 1);
    settle().await;
    // Only that operation is lost: the account is rebuilt from its last state, charged like a
    // crash (what was in flight then counts as used), and serves again.
    assert!(qs.registry().account("a").unwrap().addr.connected());
    let stats = qs.rate_stats("a").await.unwrap();
    assert!(stats.is_empty());
    let before = qs.status("a").await.unwrap().current_usage;
    assert!(
        before >= 42,
        "the state from before the message survives: {before}"
    );
    let mut g = held.guard;
    g.mark_sent();
    g.commit(Usage::Reported(8), None);
    settle().await;
    assert_eq!(
        qs.status("a").await.unwrap().current_usage,
        before + 8,
        "the reservation from before settles"
    );
    acquire(&qs, 1).await.unwrap();
}

#[test]
fn the_runtime_runs_in_its_own_thread_for_callers_without_actix() {
    fn assert_send<T: Send>(_: &T) {}
    let mut s = settings(1);
    s.clock = Arc::new(quotagate::domain::time::SystemClock);
    let qs = QuotaSystem::start_in_thread(
        s,
        vec![provider(
            "p",
            Strategy::Random,
            vec![account("a", 10, vec![])],
        )],
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fut = qs.acquire(MODEL, |_| 4, &[]);
    assert_send(&fut);
    let lease = rt.block_on(fut).unwrap();
    let mut g = lease.guard;
    g.mark_sent();
    g.commit(Usage::Reported(3), None);
    let status = rt.block_on(async {
        // `do_send` is queued; the status message is processed after it.
        qs.status("a").await.unwrap()
    });
    assert_eq!(status.current_usage, 3);
    qs.shutdown();
}

/// Many concurrent callers on several pools (on real arbiters and the real clock): never more
/// admitted than the limits allow, never more in flight than the concurrency limit, no slot lost.
#[test]
fn a_stress_of_concurrent_callers_never_over_admits_nor_leaks_a_slot() {
    const PER_ACCOUNT: u64 = 40;
    let mut s = settings(2);
    s.clock = Arc::new(quotagate::domain::time::SystemClock);
    let pool = |p: &str| {
        let accounts = (0..4)
            .map(|i| {
                account(
                    &format!("{p}-{i}"),
                    0,
                    vec![
                        limit(LimitKind::Requests, PER_ACCOUNT, Some(3600)),
                        limit(LimitKind::Concurrent, 3, None),
                    ],
                )
            })
            .collect();
        provider(p, Strategy::LeastUsed, accounts)
    };
    let qs = QuotaSystem::start_in_thread(s, vec![pool("x"), pool("y"), pool("z")]).unwrap();
    let in_flight: Arc<Mutex<std::collections::HashMap<String, u64>>> = Default::default();
    let admitted: Arc<Mutex<std::collections::HashMap<String, u64>>> = Default::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (qs, in_flight, admitted) = (qs.clone(), in_flight.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                let mut refusals = 0;
                while refusals < 50 {
                    match qs.acquire(MODEL, |_| 1, &[]).await {
                        Ok(lease) => {
                            let name = lease.account.name.to_string();
                            {
                                let mut f = in_flight.lock().unwrap();
                                let n = f.entry(name.clone()).or_default();
                                *n += 1;
                                assert!(*n <= 3, "concurrency exceeded on {name}");
                            }
                            *admitted.lock().unwrap().entry(name.clone()).or_default() += 1;
                            tokio::task::yield_now().await;
                            *in_flight.lock().unwrap().get_mut(&name).unwrap() -= 1;
                            let mut g = lease.guard;
                            g.mark_sent();
                            g.commit(Usage::Reported(1), None);
                        }
                        Err(AcquireError::Refused(_)) => {
                            refusals += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let admitted = admitted.lock().unwrap();
    assert_eq!(admitted.len(), 12);
    for (name, n) in admitted.iter() {
        assert_eq!(*n, PER_ACCOUNT, "{name} admitted {n}");
    }
    rt.block_on(async {
        for name in admitted.keys() {
            let stats = qs.rate_stats(name).await.unwrap();
            for s in stats {
                assert_eq!(s.in_flight, 0, "{name} {} leaked", s.limit_type);
            }
            assert!(qs.status(name).await.unwrap().available);
        }
    });
    qs.shutdown();
}

#[actix::test]
async fn an_account_actor_that_dies_is_recreated_from_its_last_state_and_charged_like_a_crash() {
    let qs = start(vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account(
            "a",
            1000,
            vec![limit(LimitKind::Requests, 10, Some(60))],
        )],
    )])
    .await;
    qs.consume_quota("a", MODEL, 42).await.unwrap();
    let held = acquire(&qs, 8).await.unwrap();
    let collected = qs.collect_changed().await;
    assert_eq!(
        collected.len(),
        1,
        "the pool keeps the last state of each member"
    );
    let saved = &collected[0].1;
    let held_tokens: u64 = saved.in_flight.iter().map(|(t, _)| *t).sum::<u64>()
        + saved.leased.iter().map(|l| l.tokens).sum::<u64>();
    assert!(
        held_tokens >= 8,
        "the reservation in flight is in the saved state: {saved:?}"
    );
    assert!(
        qs.collect_changed().await.is_empty(),
        "nothing changed since"
    );

    // Kill the actor behind the runtime's back.
    let old = qs.registry().account("a").unwrap().addr.clone();
    old.do_send(quotagate::actors::account::Stop);
    settle().await;
    assert!(!old.connected());
    drop(held); // its settle message goes to the dead actor: it was counted in the saved state

    // The next exchange with it (a request's or a report's) finds it dead and has it revived;
    // the registry then points at the new actor.
    advance(Duration::from_millis(60)).await;
    settle().await;
    assert!(qs.registry().account("a").unwrap().addr.connected());
    let status = qs.status("a").await.unwrap();
    assert!(
        status.current_usage >= 42 + 8,
        "usage and the in-flight estimate survive: {}",
        status.current_usage
    );
    let rpm = qs
        .rate_stats("a")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.limit_type == "rpm")
        .unwrap();
    assert_eq!(
        rpm.current, rpm.limit,
        "the unknown gap is charged: the window is full"
    );
    assert!(
        matches!(refused(acquire(&qs, 1).await), Verdict::RateLimited { ref limit, .. } if &**limit == "rpm")
    );
}

/// A minimal webhook receiver: records every JSON body it gets.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = got.clone();
    let server = HttpServer::new(move || {
        let sink = sink.clone();
        App::new().route(
            "/hook",
            web::post().to(move |body: web::Json<serde_json::Value>| {
                sink.lock().unwrap().push(body.into_inner());
                async { HttpResponse::Ok().finish() }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    actix_web::rt::spawn(server.run());
    (format!("http://127.0.0.1:{port}/hook"), got)
}

#[actix::test]
async fn events_reach_the_webhook_and_a_stuck_webhook_only_costs_dropped_events() {
    let (url, got) = webhook_receiver().await;
    let mut s = settings(0);
    s.clock = Arc::new(quotagate::domain::time::SystemClock);
    s.webhook_url = Some(url);
    let qs = QuotaSystem::start(
        s,
        vec![provider(
            "p",
            Strategy::RoundRobin,
            vec![account("a", 100, vec![])],
        )],
        Default::default(),
    )
    .await
    .unwrap();
    qs.consume_quota("a", MODEL, 85).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no webhook call");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let body = got.lock().unwrap()[0].clone();
    assert_eq!(body["event"], "quota_warning");
    assert_eq!(body["account"], "a");
    assert_eq!(body["provider"], "p");
    assert!(body["usage_percent"].as_f64().unwrap() >= 85.0);

    // A webhook that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = settings(0);
    s.clock = Arc::new(quotagate::domain::time::SystemClock);
    s.webhook_url = Some(format!("http://{}/hook", listener.local_addr().unwrap()));
    let stuck = QuotaSystem::start(
        s,
        vec![provider(
            "q",
            Strategy::RoundRobin,
            vec![account("b", 100, vec![])],
        )],
        Default::default(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..1_200 {
        stuck.reset_account("b").await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "emitting never waits for the webhook"
    );
    let dropped = stuck.events().metrics().notifications_dropped_total.get();
    assert!(dropped >= 1_200 - 1_024 - 2, "dropped {dropped}");
}

#[actix::test]
async fn changes_written_to_the_store_by_another_process_reach_the_runtime() {
    use quotagate::actors::catalog;
    use quotagate::actors::supervisor::CatalogSource;
    use quotagate::config::{Credentials, DatabaseBackend};
    use quotagate::manage::{self, NewAccount, NewProvider};
    use quotagate::secrets::{MasterKey, Secret};
    use quotagate::store::{providers::Source, Store};

    let dir = tempfile::tempdir().unwrap();
    let (store, _) =
        Store::open_and_migrate(&DatabaseBackend::Sqlite(dir.path().join("q.db")), 2).unwrap();
    let key = MasterKey::generate();
    let quota = QuotaSettings {
        schedule: Schedule::daily_utc(),
        warning_threshold: 0.8,
    };
    let new_account = |name: &str| NewAccount {
        provider: "p".into(),
        name: name.into(),
        credentials: Credentials {
            api_key: Secret::new(format!("sk-{name}-0123456789")),
            headers: Default::default(),
        },
        quota_limit: 500,
        expires_at: None,
        active: true,
    };
    {
        let mut conn = store.conn().unwrap();
        let provider = NewProvider {
            name: "p".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            strategy: Strategy::LeastUsed,
            auth_header: "Authorization".into(),
            auth_scheme: "Bearer".into(),
            timeout_ms: None,
            max_completion_tokens: 64,
            tokenizer: Tokenizer::Bytes,
            models: vec![(MODEL.into(), 0.0, 0.0)],
            limits: vec![limit(LimitKind::Requests, 5, Some(60))],
        };
        manage::add_provider(&mut conn, &provider, Source::Api).unwrap();
        manage::add_account(&mut conn, &key, &new_account("a1"), Source::Api, "test").unwrap();
    }
    let specs = catalog::load(&mut store.conn().unwrap(), &key, &quota).unwrap();
    assert_eq!(
        specs[0].accounts[0]
            .credentials
            .as_ref()
            .unwrap()
            .api_key
            .expose(),
        "sk-a1-0123456789"
    );
    let mut s = settings(0);
    s.clock = Arc::new(quotagate::domain::time::SystemClock);
    s.source = Some(CatalogSource {
        store: store.clone(),
        key: key.clone(),
        quota,
        poll_every: Duration::from_millis(100),
    });
    let qs = QuotaSystem::start(s, specs, Default::default())
        .await
        .unwrap();
    qs.consume_quota("a1", MODEL, 77).await.unwrap();

    // "The CLI" adds an account and disables the first one.
    {
        let mut conn = store.conn().unwrap();
        manage::add_account(&mut conn, &key, &new_account("a2"), Source::Api, "cli").unwrap();
        manage::disable_account(&mut conn, "p/a1", "cli", "rotated").unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while qs.registry().account("a2").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new account never arrived"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let a1 = qs.status("a1").await.unwrap();
    assert!(
        !a1.available && a1.reason.as_deref() == Some("rotated"),
        "{a1:?}"
    );
    assert_eq!(a1.current_usage, 77, "counters survive the reload");
    let lease = qs.acquire(MODEL, |_| 1, &[]).await.unwrap();
    assert_eq!(&*lease.account.name, "a2");
    assert_eq!(
        lease.account.credentials.as_ref().unwrap().api_key.expose(),
        "sk-a2-0123456789"
    );
}

#[actix::test]
async fn a_changed_strategy_applies_to_the_next_acquire() {
    let pool = |strategy| {
        provider(
            "p",
            strategy,
            vec![account("a", 100, vec![]), account("b", 100, vec![])],
        )
    };
    let qs = start(vec![pool(Strategy::RoundRobin)]).await;
    let first = acquire(&qs, 1).await.unwrap();
    let second = acquire(&qs, 1).await.unwrap();
    assert_ne!(
        first.account.name, second.account.name,
        "round robin alternates"
    );
    drop((first, second));
    settle().await;
    qs.consume_quota("a", MODEL, 50).await.unwrap();
    qs.apply_catalog(vec![pool(Strategy::LeastUsed)])
        .await
        .unwrap();
    // Each worker's view learns the accounts' usage from their replies (at least every report
    // interval); after one round it stays on `b`.
    let _ = acquire(&qs, 1).await.unwrap();
    advance(Duration::from_millis(60)).await;
    for _ in 0..4 {
        let lease = acquire(&qs, 1).await.unwrap();
        assert_eq!(
            &*lease.account.name, "b",
            "least used picks the account with less quota used"
        );
    }
}
