//! `cargo bench --bench runtime`: the reservation path in-process.
//!
//! Criterion reports the statistics of each benchmark; at the end the binary prints one line per
//! figure, so runs can be compared over time:
//!
//! ```text
//! baseline_message_roundtrip_us: N   an empty actix message to an actor on the same arbiter
//! domain_reserve_commit_ns: N        reserve + commit on one account with six windows (no actor)
//! shard_reserve_commit_ns: N         reserve + commit on a worker's lease shard (the hot path of
//!                                    a request far from its limits) at 10,000 requests a second,
//!                                    reporting every 25 ms
//! actor_acquire_commit_p50_us: N     acquire through the pool and account actors + confirmed commit
//! actor_acquire_commit_p99_us: N
//! pool_reservations_per_sec: N       one pool of 16 accounts on its own arbiter, 64 callers
//! memory_per_account_bytes: N        resident memory per account with 10,000 accounts loaded
//! start_10k_accounts_ms: N           time to start the runtime with 10,000 accounts
//! ```
//!
//! Under `cargo test` (no `--bench` argument) every part runs once, briefly, as a smoke test.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use criterion::Criterion;
use quotagate::actors::catalog::{MemberSpec, ModelSpec, ProviderSpec, QuotaSettings, Upstream};
use quotagate::actors::{QuotaSystem, RuntimeSettings};
use quotagate::domain::account::{Account, AccountSpec, NeedGranted, Usage};
use quotagate::domain::lease::{Shard, Units};
use quotagate::domain::schedule::Schedule;
use quotagate::domain::time::{Clock, SystemClock};
use quotagate::domain::{LimitKind, LimitSpec, Strategy, Tokenizer};
use quotagate::metrics::Metrics;

const MODEL: &str = "m";

fn six_windows() -> Vec<(Option<Arc<str>>, LimitSpec)> {
    let w = |kind, limit, secs| LimitSpec {
        kind,
        limit,
        per: Some(Duration::from_secs(secs)),
        reset: None,
    };
    vec![
        (None, w(LimitKind::Requests, u64::MAX / 4, 60)),
        (None, w(LimitKind::Requests, u64::MAX / 4, 3600)),
        (None, w(LimitKind::Requests, u64::MAX / 4, 86_400)),
        (None, w(LimitKind::Tokens, u64::MAX / 4, 60)),
        (None, w(LimitKind::Tokens, u64::MAX / 4, 86_400)),
        (None, w(LimitKind::Requests, u64::MAX / 4, 2)),
    ]
}

fn account_spec(id: &str) -> AccountSpec {
    AccountSpec {
        id: Arc::from(id),
        active: true,
        disabled_reason: None,
        expires_at: None,
        quota_limit: 0,
        quota_used: 0,
        quota_schedule: Schedule::daily_utc(),
        warning_threshold: 0.8,
        limits: six_windows().into(),
        header_requests: None,
        header_tokens: None,
    }
}

fn provider(name: &str, accounts: usize) -> ProviderSpec {
    ProviderSpec {
        id: Arc::from(format!("id-{name}")),
        name: Arc::from(name),
        active: true,
        strategy: Strategy::RoundRobin,
        upstream: Upstream {
            base_url: "http://127.0.0.1:9/v1".into(),
            auth_header: "Authorization".into(),
            auth_scheme: "Bearer".into(),
            timeout: None,
            max_completion_tokens: 100,
            tokenizer: Tokenizer::Bytes,
        },
        models: vec![ModelSpec {
            name: Arc::from(MODEL),
            price_input: 0.0,
            price_output: 0.0,
        }],
        accounts: (0..accounts)
            .map(|i| MemberSpec {
                name: Arc::from(format!("{name}-{i}")),
                spec: account_spec(&format!("{name}-{i}")),
                credentials: None,
            })
            .collect(),
    }
}

fn settings(arbiters: usize) -> RuntimeSettings {
    RuntimeSettings {
        clock: Arc::new(SystemClock),
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

struct Echo;
impl Actor for Echo {
    type Context = Context<Self>;
}
#[derive(Message)]
#[rtype(result = "()")]
struct Ping;
impl Handler<Ping> for Echo {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// Median of `batches` timings of `per_batch` calls of `f`, per call.
fn median_per_call(batches: usize, per_batch: u64, mut f: impl FnMut(u64) -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..batches)
        .map(|_| f(per_batch) / per_batch as u32)
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Runs `op` (given the time now) under criterion as `name`, then returns its median cost per call
/// over batches of `per_batch` calls.
fn bench_op(c: &mut Criterion, name: &str, per_batch: u64, op: &mut impl FnMut(i64)) -> Duration {
    let clock = SystemClock;
    c.bench_function(name, |b| {
        let now = clock.now_ms();
        b.iter(|| op(now))
    });
    median_per_call(11, per_batch, |n| {
        let now = clock.now_ms();
        let t = Instant::now();
        for _ in 0..n {
            op(now);
        }
        t.elapsed()
    })
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = |n: u64| if full { n } else { (n / 1000).max(2) };
    let mut c = Criterion::default().configure_from_args();
    let system = System::new();
    let clock = SystemClock;

    // --- domain ---------------------------------------------------------------------------------
    let mut account = Account::new(&account_spec("a"), clock.now_ms()).unwrap();
    let mut events = Vec::new();
    let mut domain_op = |now: i64| {
        let grant = account
            .reserve(MODEL, black_box(120), now, 600_000, &mut events)
            .unwrap();
        account.commit(grant.reservation, Usage::Reported(100), now, &mut events);
        events.clear();
    };
    let domain = bench_op(
        &mut c,
        "domain_reserve_commit",
        scale(200_000),
        &mut domain_op,
    );

    // --- a worker's lease shard -----------------------------------------------------------------
    let mut ledger = Account::new(&account_spec("s"), clock.now_ms()).unwrap();
    let mut shard = Shard::new();
    let mut admitted = 0u64;
    // A worker serving 10,000 requests a second: the clock moves 1 ms every 10 requests, and it
    // reports every sync.report_interval (25 ms, 250 requests).
    let start = clock.now_ms();
    let mut shard_op = |_: i64| {
        let now = start + (admitted / 10) as i64;
        match shard.reserve(black_box(120), ledger.epoch(), now + 600_000) {
            Ok(ticket) => {
                shard.commit(ticket, 100, now);
            }
            Err(_) => {
                // What a worker does when its lease runs dry: an exchange that also answers the
                // waiting request, from its lease or as a reservation of its own.
                let ex = shard.begin_exchange(now, 25, Some(120));
                let answer = ledger.exchange(
                    MODEL,
                    ex.report.as_ref(),
                    None,
                    Units::request(120),
                    ex.want,
                    now,
                    10_000,
                    600_000,
                    &mut events,
                );
                shard.end_exchange(Some((answer.lease, answer.epoch)));
                match answer.need {
                    Some(Ok(NeedGranted::InLease)) => {
                        let ticket = shard.admit_granted(120, now + 600_000);
                        shard.commit(ticket, 100, now);
                    }
                    Some(Ok(NeedGranted::Reservation(grant))) => {
                        ledger.commit(grant.reservation, Usage::Reported(100), now, &mut events);
                    }
                    other => panic!("refused: {other:?}"),
                }
                events.clear();
            }
        }
        admitted += 1;
        if admitted.is_multiple_of(250) {
            // A report tick: usage reported, the lease refilled.
            let ex = shard.begin_exchange(now, 25, None);
            let answer = ledger.exchange(
                MODEL,
                ex.report.as_ref(),
                None,
                Units::ZERO,
                ex.want,
                now,
                10_000,
                600_000,
                &mut events,
            );
            shard.end_exchange(Some((answer.lease, answer.epoch)));
            events.clear();
        }
    };
    let shard_cost = bench_op(
        &mut c,
        "shard_reserve_commit",
        scale(200_000),
        &mut shard_op,
    );

    // --- baseline actix round trip --------------------------------------------------------------
    let echo = system.block_on(async { Echo.start() });
    c.bench_function("baseline_message_roundtrip", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    echo.send(Ping).await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    let baseline = median_per_call(11, scale(100_000), |n| {
        system.block_on(async {
            let t = Instant::now();
            for _ in 0..n {
                echo.send(Ping).await.unwrap();
            }
            t.elapsed()
        })
    });

    // --- acquire + commit through pool and account actors (same arbiter) ------------------------
    let qs = system
        .block_on(QuotaSystem::start(
            settings(0),
            vec![provider("p", 16)],
            Default::default(),
        ))
        .unwrap();
    let acquire_commit = |qs: QuotaSystem| async move {
        let lease = qs.acquire(MODEL, |_| 120, &[]).await.unwrap();
        let mut guard = lease.guard;
        guard.mark_sent();
        guard
            .commit_confirmed(Usage::Reported(100), None)
            .await
            .unwrap();
    };
    c.bench_function("actor_acquire_commit", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    acquire_commit(qs.clone()).await;
                }
                t.elapsed()
            })
        })
    });
    let mut samples: Vec<Duration> = system.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..scale(100_000) {
            let t = Instant::now();
            acquire_commit(qs.clone()).await;
            samples.push(t.elapsed());
        }
        samples
    });
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    qs.shutdown();

    // --- one pool of 16 accounts on its own arbiter, many callers -------------------------------
    let pool = system
        .block_on(QuotaSystem::start(
            settings(1),
            vec![provider("q", 16)],
            Default::default(),
        ))
        .unwrap();
    let run_for = if full {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(100)
    };
    let done = Arc::new(AtomicU64::new(0));
    let elapsed = system.block_on(async {
        let t = Instant::now();
        let mut callers = Vec::new();
        for _ in 0..64 {
            let (pool, done) = (pool.clone(), done.clone());
            callers.push(actix_rt::spawn(async move {
                while t.elapsed() < run_for {
                    acquire_commit(pool.clone()).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for caller in callers {
            caller.await.unwrap();
        }
        t.elapsed()
    });
    let per_sec = done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    pool.shutdown();

    // --- 10,000 accounts: start time and resident memory ----------------------------------------
    let accounts = if full { 10_000 } else { 200 };
    let specs: Vec<ProviderSpec> = (0..accounts / 100)
        .map(|i| provider(&format!("big{i}"), 100))
        .collect();
    let before = resident_bytes();
    let t = Instant::now();
    let big = system
        .block_on(QuotaSystem::start(settings(2), specs, Default::default()))
        .unwrap();
    let start_ms = t.elapsed().as_secs_f64() * 1000.0;
    let per_account = resident_bytes().saturating_sub(before) / accounts as u64;
    assert_eq!(big.registry().accounts().len(), accounts);
    big.shutdown();

    c.final_summary();
    println!();
    println!(
        "baseline_message_roundtrip_us: {:.3}",
        baseline.as_secs_f64() * 1e6
    );
    println!(
        "domain_reserve_commit_ns: {:.0}",
        domain.as_secs_f64() * 1e9
    );
    println!(
        "shard_reserve_commit_ns: {:.0}",
        shard_cost.as_secs_f64() * 1e9
    );
    println!(
        "actor_acquire_commit_p50_us: {:.3}",
        p50.as_secs_f64() * 1e6
    );
    println!(
        "actor_acquire_commit_p99_us: {:.3}",
        p99.as_secs_f64() * 1e6
    );
    println!("pool_reservations_per_sec: {per_sec:.0}");
    println!("memory_per_account_bytes: {per_account}");
    let count = if accounts >= 1000 {
        format!("{}k", accounts / 1000)
    } else {
        accounts.to_string()
    };
    println!("start_{count}_accounts_ms: {start_ms:.1}");
}
