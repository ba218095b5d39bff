//! The shared ledger against a real Redis (and a real Redis Cluster): the scripts themselves
//! (`LOAD`, `SWAP`, `BEAT`), then two runtimes sharing one account's ledger as two instances
//! would — a lease granted by one counts for the other, reports settle it, a dead instance's
//! lease expires and counts as used, a 429 seen by one revokes for both, and Redis' clock decides
//! whatever the instances' clocks say.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::specs::{account, limit, provider, MODEL};
use quotagate::actors::catalog::QuotaSettings;
use quotagate::actors::{AcquireError, QuotaSystem, Reservation, RuntimeSettings};
use quotagate::config::RedisConfig;
use quotagate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use quotagate::domain::refusal::Verdict;
use quotagate::domain::schedule::Schedule;
use quotagate::domain::time::{Clock, Millis, SharedClock, SystemClock};
use quotagate::domain::{LimitKind, Strategy};
use quotagate::ledger::{ledger_key, LedgerClock, LedgerLink, RedisTarget, Swapped, LEDGER_KEEP};
use quotagate::metrics::Metrics;

/// `redis.*` for a fresh logical database of the shared test Redis.
fn standalone() -> RedisConfig {
    let url = common::redis_database();
    let rest = url.trim_start_matches("redis://");
    let (host, db) = rest.split_once('/').expect("redis://host:port/db");
    RedisConfig {
        host: host.to_string(),
        db: db.parse().unwrap(),
        ..RedisConfig::default()
    }
}

/// `redis.*` for the test Redis Cluster (`QUOTAGATE_TEST_REDIS_CLUSTER`, set by scripts/test).
fn cluster() -> RedisConfig {
    let nodes = std::env::var("QUOTAGATE_TEST_REDIS_CLUSTER")
        .expect("QUOTAGATE_TEST_REDIS_CLUSTER is not set: run scripts/test");
    RedisConfig {
        host: nodes,
        ..RedisConfig::default()
    }
}

async fn link(redis: &RedisConfig, id: &str, clock: Arc<LedgerClock>) -> LedgerLink {
    let target = RedisTarget::from_config(redis).unwrap().unwrap();
    LedgerLink::start(
        target,
        redis.timeout,
        Duration::from_secs(1),
        id.to_string(),
        clock,
        Metrics::new().ledger,
        1,
    )
    .await
}

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

async fn the_swap_writes_only_over_the_version_it_was_computed_from(redis: RedisConfig) {
    let clock = Arc::new(LedgerClock::new(Arc::new(SystemClock)));
    let link = link(&redis, &unique("i"), clock).await;
    let account = unique("acct");
    let local = SystemClock.now_ms();
    let loaded = link.load(&account).await.unwrap();
    assert_eq!(loaded.value, None);
    assert!(
        (loaded.now - local).abs() < 5_000,
        "Redis' clock, in ms: {} vs {local}",
        loaded.now
    );

    let done = |s: Swapped| matches!(s, Swapped::Done { .. });
    assert!(done(
        link.swap(&account, None, "1\na".into()).await.unwrap()
    ));
    match link.swap(&account, None, "1\nb".into()).await.unwrap() {
        Swapped::Conflict { current, .. } => assert_eq!(current.as_deref(), Some("1\na")),
        other => panic!("a second creation must conflict: {other:?}"),
    }
    match link.swap(&account, Some(7), "8\nc".into()).await.unwrap() {
        Swapped::Conflict { current, .. } => assert_eq!(current.as_deref(), Some("1\na")),
        other => panic!("a write over another version must conflict: {other:?}"),
    }
    assert!(done(
        link.swap(&account, Some(1), "2\nd".into()).await.unwrap()
    ));
    assert_eq!(
        link.load(&account).await.unwrap().value.as_deref(),
        Some("2\nd")
    );

    // Kept long enough for a week's counts, and not for ever.
    let target = RedisTarget::from_config(&redis).unwrap().unwrap();
    let mut conn = target.connect(Duration::from_secs(2)).await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(ledger_key(&account))
        .query_async(&mut conn)
        .await
        .unwrap();
    let keep = LEDGER_KEEP.as_millis() as i64;
    assert!(ttl > keep - 60_000 && ttl <= keep, "PTTL {ttl}");
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn the_swap_script_on_redis() {
    the_swap_writes_only_over_the_version_it_was_computed_from(standalone()).await;
}

#[actix::test]
#[ignore = "needs a redis cluster: run scripts/test"]
async fn the_swap_script_on_a_redis_cluster() {
    the_swap_writes_only_over_the_version_it_was_computed_from(cluster()).await;
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn the_heartbeat_counts_live_instances_and_forgets_those_that_left() {
    let redis = standalone();
    let clock = || Arc::new(LedgerClock::new(Arc::new(SystemClock)));
    let a = link(&redis, "a", clock()).await;
    let b = link(&redis, "b", clock()).await;
    a.beat().await;
    assert_eq!(a.live_instances(), 2);
    assert_ne!(
        a.owner(),
        b.owner(),
        "each instance has its own lease-owner tag"
    );
    b.leave().await;
    a.beat().await;
    assert_eq!(a.live_instances(), 1);
}

/// A clock `offset_ms` away from the system's.
#[derive(Debug)]
struct Skewed(Millis);

impl Clock for Skewed {
    fn now_ms(&self) -> Millis {
        SystemClock.now_ms() + self.0
    }
}

/// One instance: a runtime whose accounts share their ledgers through `redis`.
struct Instance {
    qs: QuotaSystem,
    clock: Arc<LedgerClock>,
}

const LEASE_TTL: Duration = Duration::from_secs(1);
const RESERVATION_TIMEOUT: Duration = Duration::from_secs(2);

async fn instance(
    redis: &RedisConfig,
    id: &str,
    base: SharedClock,
    limits: Vec<quotagate::domain::LimitSpec>,
) -> Instance {
    let clock = Arc::new(LedgerClock::new(base));
    let link = link(redis, id, clock.clone()).await;
    let settings = RuntimeSettings {
        clock: clock.clone(),
        arbiters: 0,
        reservation_timeout: RESERVATION_TIMEOUT,
        report_interval: Duration::from_millis(25),
        lease_ttl: LEASE_TTL,
        peak_interval: Duration::from_secs(1),
        quota: QuotaSettings {
            schedule: Schedule::daily_utc(),
            warning_threshold: 0.8,
        },
        metrics: Metrics::new(),
        webhook_url: None,
        source: None,
        ledger: Some(link),
    };
    let specs = vec![provider(
        "p",
        Strategy::RoundRobin,
        vec![account("shared-account", 0, limits)],
    )];
    let qs = QuotaSystem::start(settings, specs, Default::default())
        .await
        .unwrap();
    Instance { qs, clock }
}

async fn acquire(i: &Instance) -> Result<Reservation, AcquireError> {
    i.qs.acquire(MODEL, |_| 1, &[]).await
}

/// What the window counts now on `i`: committed units and units in flight (an instance writes
/// a settlement with its next write: until then the others count that unit as in flight).
async fn used(i: &Instance, limit_type: &str) -> u64 {
    let stats = i.qs.rate_stats("shared-account").await.unwrap();
    let w = stats.iter().find(|w| w.limit_type == limit_type).unwrap();
    w.current
}

/// Distinct accounts per test: every test gets its own logical database.
fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn two_instances_grant_and_settle_from_one_limit() {
    let redis = standalone();
    let rpm = vec![limit(LimitKind::Requests, 10, Some(60))];
    let a = instance(&redis, "a", system(), rpm.clone()).await;
    let b = instance(&redis, "b", system(), rpm).await;
    for _ in 0..6 {
        let mut guard = acquire(&a).await.unwrap().guard;
        guard.mark_sent();
        guard
            .commit_confirmed(Usage::Reported(5), None)
            .await
            .unwrap();
    }
    // What a's worker leased and does not use comes back at its next report (25 ms), and a's
    // reserve at a's next flush once no worker draws from it (at most two flushes, 500 ms): b
    // may wait that long for the last units.
    let mut from_b = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        match acquire(&b).await {
            Ok(lease) => {
                let mut guard = lease.guard;
                guard.mark_sent();
                guard
                    .commit_confirmed(Usage::Reported(5), None)
                    .await
                    .unwrap();
                from_b += 1;
            }
            Err(_) => actix_rt::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(from_b, 4, "b gets exactly what a left");
    assert!(acquire(&a).await.is_err(), "a sees b's admissions too");
    assert_eq!(used(&a, "rpm").await, 10);
    assert_eq!(used(&b, "rpm").await, 10);
}

/// Acquires on `i` and settles as used once sent; the guard's commit is confirmed by the actor.
/// Units the other instance leased come back at its next report or flush: waits that long.
async fn use_one(i: &Instance) {
    let started = Instant::now();
    let reservation = loop {
        match acquire(i).await {
            Ok(r) => break r,
            Err(e) if started.elapsed() > Duration::from_millis(1200) => panic!("{e:?}"),
            Err(_) => actix_rt::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut guard = reservation.guard;
    guard.mark_sent();
    guard
        .commit_confirmed(Usage::Reported(5), None)
        .await
        .unwrap();
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn usage_settled_before_its_write_survives_reads_and_lost_races() {
    // Settling is written with an instance's next write, not before it is answered. Between
    // the two, the other instance writes, this one reads the ledger (taking the other's
    // changes) and loses a race: its settled usage must survive all of it.
    let redis = standalone();
    let rpm = vec![limit(LimitKind::Requests, 5, Some(60))];
    let a = instance(&redis, "a", system(), rpm.clone()).await;
    let b = instance(&redis, "b", system(), rpm).await;
    let mut second = acquire(&a).await.unwrap().guard;
    use_one(&a).await;
    use_one(&b).await;
    a.qs.status("shared-account").await.unwrap();
    second.mark_sent();
    second
        .commit_confirmed(Usage::Reported(5), None)
        .await
        .unwrap();
    use_one(&b).await;
    use_one(&a).await;
    // Five used: neither instance admits a sixth, now or once everything is written.
    assert!(acquire(&b).await.is_err(), "b admitted a sixth request");
    assert!(acquire(&a).await.is_err(), "a admitted a sixth request");
    actix_rt::time::sleep(Duration::from_millis(600)).await;
    assert!(acquire(&b).await.is_err(), "b admitted a sixth request");
    assert_eq!(used(&a, "rpm").await, 5);
    assert_eq!(used(&b, "rpm").await, 5);
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn a_dead_instance_holds_its_units_until_its_reservations_expire_and_they_count_as_used() {
    let redis = standalone();
    let limits = vec![
        limit(LimitKind::Concurrent, 2, None),
        limit(LimitKind::Requests, 100, Some(60)),
    ];
    let a = instance(&redis, "a", system(), limits.clone()).await;
    let b = instance(&redis, "b", system(), limits).await;
    let held: Vec<Reservation> = vec![acquire(&a).await.unwrap(), acquire(&a).await.unwrap()];
    // A dies: its actors stop without a word, its reservations are never settled.
    a.qs.shutdown();
    for r in held {
        std::mem::forget(r);
    }
    let died = Instant::now();
    assert!(
        matches!(acquire(&b).await, Err(AcquireError::Refused(_))),
        "the dead instance's slots still count"
    );
    let freed = loop {
        if let Ok(lease) = acquire(&b).await {
            break lease;
        }
        assert!(
            died.elapsed() < RESERVATION_TIMEOUT + Duration::from_secs(3),
            "the dead instance's reservations never expired"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        died.elapsed() >= RESERVATION_TIMEOUT - Duration::from_millis(300),
        "freed after {:?}, before the reservation timeout",
        died.elapsed()
    );
    freed.guard.release();
    assert_eq!(
        used(&b, "rpm").await,
        2,
        "the dead instance's requests count as used"
    );
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn a_429_seen_by_one_instance_holds_the_account_on_every_instance() {
    let redis = standalone();
    let rpm = vec![limit(LimitKind::Requests, 100, Some(60))];
    let a = instance(&redis, "a", system(), rpm.clone()).await;
    let b = instance(&redis, "b", system(), rpm).await;
    assert!(acquire(&b).await.is_ok_and(|r| {
        r.guard.release();
        true
    }));
    let mut guard = acquire(&a).await.unwrap().guard;
    guard.mark_sent();
    guard
        .commit_confirmed(
            Usage::RequestOnly,
            Some(Feedback {
                outcome: UpstreamOutcome::RateLimited {
                    retry_after_ms: Some(30_000),
                    capped: false,
                },
                latency_ms: 10,
                headers: RateHeaders::default(),
            }),
        )
        .await
        .unwrap();
    let status = b.qs.status("shared-account").await.unwrap();
    assert!(
        status
            .cooldown_until
            .is_some_and(|t| t > b.clock.now_ms() + 20_000),
        "b sees a's cooldown: {status:?}"
    );
    match acquire(&b).await {
        Err(AcquireError::Refused(Verdict::RateLimited { .. } | Verdict::NoAccountAvailable)) => {}
        other => panic!("b must hold the account too: {other:?}"),
    }
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn redis_time_decides_whatever_the_instances_clocks_say() {
    let redis = standalone();
    let limits = vec![limit(LimitKind::Concurrent, 1, None)];
    let a = instance(&redis, "a", system(), limits.clone()).await;
    // An hour ahead: by its own clock, a's reservation would be long past its deadline.
    let b = instance(&redis, "b", Arc::new(Skewed(3_600_000)), limits).await;
    assert!(
        (a.clock.now_ms() - b.clock.now_ms()).abs() < 200,
        "both follow Redis' clock: {} vs {}",
        a.clock.now_ms(),
        b.clock.now_ms()
    );
    let held = acquire(&a).await.unwrap();
    assert!(
        matches!(acquire(&b).await, Err(AcquireError::Refused(_))),
        "b must not expire a's fresh reservation"
    );
    held.guard.release();
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn an_operators_reset_on_one_instance_resets_the_account_for_every_instance() {
    let redis = standalone();
    let rpm = vec![limit(LimitKind::Requests, 3, Some(60))];
    let a = instance(&redis, "a", system(), rpm.clone()).await;
    let b = instance(&redis, "b", system(), rpm).await;
    for _ in 0..3 {
        let mut guard = acquire(&a).await.unwrap().guard;
        guard.mark_sent();
        guard
            .commit_confirmed(Usage::Reported(5), None)
            .await
            .unwrap();
    }
    assert_eq!(used(&b, "rpm").await, 3);
    a.qs.reset_account("shared-account").await.unwrap();
    assert_eq!(used(&b, "rpm").await, 0, "b reads the reset ledger");
    let lease = acquire(&b).await.expect("b admits again at once");
    lease.guard.release();
}
