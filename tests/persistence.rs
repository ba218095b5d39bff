//! Persistence of the runtime's state with real Redis and databases: clean restarts restore
//! exactly (from the ledgers in Redis, or from the database when Redis is empty or off), instances
//! sharing one database keep their own clean-shutdown marks, and the gateway keeps serving while
//! Redis or Postgres go away and come back.

mod common;

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix::Addr;
use quotagate::actors::QuotaSystem;
use quotagate::config::Config;
use quotagate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use quotagate::ledger::ledger_key;
use quotagate::metrics::Metrics;
use quotagate::secrets::MasterKey;
use quotagate::server::{mark_clean, start_node};
use quotagate::store::open_store;
use quotagate::store::{settings, Store};
use quotagate::sync::syncer::{Flush, Syncer};

// ------------------------------------------------------------------------------------------------
// A logger that records `event` key-values, to count the sync's down/up lines.
// ------------------------------------------------------------------------------------------------

struct Capture(Mutex<Vec<(String, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let kv = record.key_values();
        if let Some(event) = kv.get(log::kv::Key::from("event")) {
            let target = kv
                .get(log::kv::Key::from("target"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            self.0.lock().unwrap().push((event.to_string(), target));
        }
    }
    fn flush(&self) {}
}

fn captured() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        let _ = log::set_logger(capture);
        log::set_max_level(log::LevelFilter::Info);
        capture
    })
}

fn count_events(event: &str, target: &str) -> usize {
    captured()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(e, t)| e == event && t == target)
        .count()
}

// ------------------------------------------------------------------------------------------------
// A node: what `quotagate serve` starts, minus HTTP.
// ------------------------------------------------------------------------------------------------

struct Node {
    runtime: QuotaSystem,
    syncer: Addr<Syncer>,
    store: Store,
    metrics: Metrics,
}

/// `(host:port, db)` of a Redis URL `redis://host:port[/db]`.
fn redis_parts(url: &str) -> (String, i64) {
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap();
    match rest.split_once('/') {
        Some((host, db)) => (host.to_string(), db.parse().unwrap_or(0)),
        None => (rest.to_string(), 0),
    }
}

fn config(dir: &Path, database_url: &str, redis_url: Option<&str>) -> Config {
    instance_config(dir, database_url, redis_url, "")
}

/// The config of the instance `instance` (`instance.id`; empty: the default id).
fn instance_config(
    dir: &Path,
    database_url: &str,
    redis_url: Option<&str>,
    instance: &str,
) -> Config {
    let redis = match redis_url {
        Some(url) => {
            let (host, db) = redis_parts(url);
            format!("redis: {{ host: \"{host}\", db: {db} }}")
        }
        None => String::new(),
    };
    let yaml = format!(
        r#"
database: {{ url: "{database_url}" }}
{redis}
instance: {{ id: "{instance}" }}
runtime: {{ arbiters: 0 }}
sync: {{ redis_interval: 100ms, database_interval: 200ms }}
security: {{ master_key: "{key}" }}
providers:
  - name: p
    base_url: http://127.0.0.1:9/v1
    models: [m]
    rate_limits: {{ rpm: 3 }}
    accounts:
      - {{ name: a, api_key: "sk-persist-0000", quota_limit: 100000 }}
"#,
        key = "11".repeat(32)
    );
    Config::from_yaml(&yaml, &dir.join("config.yaml"), &Default::default()).unwrap()
}

async fn boot(config: &Config) -> Node {
    let store = open_store(config).unwrap();
    let (key, _) =
        MasterKey::load_or_generate(&config.security.master_key, &config.data_dir).unwrap();
    quotagate::provision::apply(&mut store.conn().unwrap(), &key, &config.providers).unwrap();
    let metrics = Metrics::new();
    let node = start_node(config, &store, &key, &metrics).await.unwrap();
    Node {
        runtime: node.runtime,
        syncer: node.syncer,
        store,
        metrics,
    }
}

/// What a graceful shutdown does after the HTTP server stopped.
async fn stop_cleanly(node: Node, config: &Config) {
    node.syncer.send(Flush).await.unwrap().unwrap();
    mark_clean(&node.store, &config.instance.id).await.unwrap();
    node.runtime.shutdown();
}

/// A crash right after a sync tick: everything is in the database, no clean mark.
async fn crash(node: Node) {
    node.syncer.send(Flush).await.unwrap().unwrap();
    node.runtime.shutdown();
}

async fn request(node: &Node, tokens: u64, feedback: Option<Feedback>) -> bool {
    match node.runtime.acquire("m", |_| 50, &[]).await {
        Ok(lease) => {
            let mut guard = lease.guard;
            guard.mark_sent();
            guard
                .commit_confirmed(Usage::Reported(tokens), feedback)
                .await
                .unwrap();
            true
        }
        Err(_) => false,
    }
}

/// Fills the rpm window (3 requests, 10 tokens each) and cools the account down after a 429.
async fn use_the_account(node: &Node) {
    assert!(request(node, 10, None).await);
    assert!(request(node, 10, None).await);
    let cooldown = Feedback {
        outcome: UpstreamOutcome::RateLimited {
            retry_after_ms: Some(120_000),
            capped: false,
        },
        latency_ms: 5,
        headers: RateHeaders::default(),
    };
    assert!(request(node, 10, Some(cooldown)).await);
    assert!(!request(node, 10, None).await, "the window is full");
}

async fn assert_restored_exactly(node: &Node) {
    let status = node.runtime.status("p/a").await.unwrap();
    assert_eq!(status.current_usage, 30, "usage restored exactly");
    assert_eq!(
        status.reason.as_deref(),
        Some("cooldown"),
        "the cooldown survives"
    );
    let rpm = node
        .runtime
        .rate_stats("p/a")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.limit_type == "rpm")
        .unwrap();
    assert_eq!(
        (rpm.current, rpm.in_flight),
        (3, 0),
        "a full window is still full"
    );
    assert!(
        rpm.retry_after > 50.0,
        "and not re-opened early: {}",
        rpm.retry_after
    );
    assert!(!request(node, 1, None).await);
}

async fn clean_restart(database_url: String, with_redis: bool, empty_redis_before_restart: bool) {
    let redis_url = with_redis.then(common::redis_database);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &database_url, redis_url.as_deref());
    let node = boot(&config).await;
    use_the_account(&node).await;
    stop_cleanly(node, &config).await;
    if let (Some(url), true) = (&redis_url, empty_redis_before_restart) {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let () = redis::cmd("FLUSHDB").query(&mut conn).unwrap();
    }
    let node = boot(&config).await;
    assert_restored_exactly(&node).await;
    node.runtime.shutdown();
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("q.db").display())
}

#[actix::test]
async fn a_clean_restart_restores_exactly_without_redis() {
    let db = tempfile::tempdir().unwrap();
    clean_restart(sqlite_url(&db), false, false).await;
}

#[actix::test]
#[ignore = "needs redis: run scripts/test"]
async fn a_clean_restart_restores_exactly_from_redis() {
    let db = tempfile::tempdir().unwrap();
    clean_restart(sqlite_url(&db), true, false).await;
}

#[actix::test]
#[ignore = "needs postgres and redis: run scripts/test"]
async fn a_clean_restart_restores_exactly_from_postgres_when_redis_is_empty() {
    clean_restart(common::pg_database(), true, true).await;
}

#[actix::test]
#[ignore = "needs postgres and redis: run scripts/test"]
async fn a_clean_restart_restores_exactly_from_redis_over_postgres() {
    clean_restart(common::pg_database(), true, false).await;
}

#[actix::test]
async fn without_the_clean_mark_the_restore_charges_the_unknown_gap() {
    let db = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sqlite_url(&db), None);
    let node = boot(&config).await;
    assert!(request(&node, 10, None).await);
    node.syncer.send(Flush).await.unwrap().unwrap();
    // A crash: no clean mark (the process dies right after a sync tick).
    node.runtime.shutdown();
    let node = boot(&config).await;
    let status = node.runtime.status("p/a").await.unwrap();
    assert!(
        status.current_usage >= 10,
        "never below the truth: {}",
        status.current_usage
    );
    let rpm = node
        .runtime
        .rate_stats("p/a")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.limit_type == "rpm")
        .unwrap();
    assert_eq!(rpm.current, 3, "the gap is charged up to the window's room");
    node.runtime.shutdown();
}

#[actix::test]
async fn instances_on_one_database_keep_their_own_marks_so_a_clean_stop_hides_no_crash() {
    let db = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = instance_config(dir_a.path(), &sqlite_url(&db), None, "a");
    let b = instance_config(dir_b.path(), &sqlite_url(&db), None, "b");
    // Both ran on this database before and stopped cleanly.
    let store = open_store(&a).unwrap();
    for id in ["a", "b"] {
        settings::put(
            &mut store.conn().unwrap(),
            &settings::shutdown_mark(id),
            "clean",
        )
        .unwrap();
    }

    let node = boot(&b).await;
    use_the_account(&node).await;
    crash(node).await;
    // `a` starts after `b` crashed and stops cleanly: one database-wide mark would now say
    // `clean`, and `b`'s crash would go uncharged.
    stop_cleanly(boot(&a).await, &a).await;

    let node = boot(&a).await;
    assert_restored_exactly(&node).await;
    stop_cleanly(node, &a).await;
    let node = boot(&b).await;
    let used = node.runtime.status("p/a").await.unwrap().current_usage;
    assert!(
        used > 30,
        "`b` is charged the gap its crash left unknown: {used}"
    );
    node.runtime.shutdown();
}

#[actix::test]
async fn after_an_upgrade_the_database_wide_marks_of_the_previous_version_still_count() {
    let db = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = instance_config(dir.path(), &sqlite_url(&db), None, "a");
    let node = boot(&config).await;
    use_the_account(&node).await;
    stop_cleanly(node, &config).await;
    // What the previous version left: the database-wide marks only.
    let store = open_store(&config).unwrap();
    {
        let mut conn = store.conn().unwrap();
        let own = settings::shutdown_mark("a");
        let mark = settings::get(&mut conn, &own).unwrap().unwrap();
        let heartbeat = settings::heartbeat("a");
        let beat = settings::get(&mut conn, &heartbeat).unwrap().unwrap();
        settings::put(&mut conn, settings::LEGACY_SHUTDOWN_MARK, &mark).unwrap();
        settings::put(&mut conn, settings::LEGACY_HEARTBEAT, &beat).unwrap();
        assert!(settings::delete(&mut conn, &own).unwrap());
        assert!(settings::delete(&mut conn, &heartbeat).unwrap());
    }
    let node = boot(&config).await;
    assert_restored_exactly(&node).await;
    let mine = settings::get(&mut store.conn().unwrap(), &settings::shutdown_mark("a")).unwrap();
    assert_eq!(
        mine.as_deref(),
        Some("running"),
        "from now on the instance's own mark"
    );
    node.runtime.shutdown();
}

/// Sends requests until `stop`, counting refusals that are not the account's limits.
async fn keep_requesting(node: &Node, for_how_long: Duration) -> (usize, usize) {
    let started = Instant::now();
    let (mut served, mut failed) = (0, 0);
    while started.elapsed() < for_how_long {
        match node.runtime.acquire("m", |_| 1, &[]).await {
            Ok(lease) => {
                let mut guard = lease.guard;
                guard.mark_sent();
                guard
                    .commit_confirmed(Usage::Reported(1), None)
                    .await
                    .unwrap();
                served += 1;
            }
            Err(_) => failed += 1,
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    (served, failed)
}

fn unlimited_config(dir: &Path, database_url: &str, redis_url: Option<&str>) -> Config {
    let mut c = config(dir, database_url, redis_url);
    c.providers[0].rate_limits = Default::default();
    c
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
#[ignore = "needs redis-server: run scripts/test"]
async fn redis_going_away_and_coming_back_costs_no_request_and_is_logged_once_each_way() {
    captured();
    let mut redis = common::TestRedis::start();
    let db = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = unlimited_config(dir.path(), &sqlite_url(&db), Some(&redis.url()));
    let node = boot(&config).await;
    let (served, failed) = keep_requesting(&node, Duration::from_millis(300)).await;
    assert!(served > 0 && failed == 0);
    let up = node.metrics.ledger.up.clone();
    assert_eq!(up.get(), 1);

    redis.stop();
    let (served, failed) = keep_requesting(&node, Duration::from_millis(1500)).await;
    assert!(served > 0);
    assert_eq!(failed, 0, "no request fails because Redis is down");
    assert_eq!(up.get(), 0);
    assert_eq!(node.metrics.ledger.degraded_accounts.get(), 1);

    redis.restart();
    wait_until("the ledger to be shared again", || {
        up.get() == 1 && node.metrics.ledger.degraded_accounts.get() == 0
    })
    .await;
    let (_, failed) = keep_requesting(&node, Duration::from_millis(300)).await;
    assert_eq!(failed, 0);
    assert_eq!(
        count_events("ledger_degraded", ""),
        1,
        "one line when the ledgers go out of reach"
    );
    assert_eq!(
        count_events("ledger_recovered", ""),
        1,
        "one line when they are back"
    );

    // What was admitted meanwhile is in the ledger: once the account wrote what waits to be
    // written (at the latest ten report intervals later; here a flush), Redis holds the runtime's
    // current usage.
    node.runtime.collect_flushed().await;
    let account = node.runtime.registry().account("p/a").unwrap().id.clone();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let stored: String = redis::cmd("GET")
        .arg(ledger_key(&account))
        .query(&mut conn)
        .unwrap();
    let (_, json) = quotagate::ledger::split(&stored).unwrap();
    let ledger: serde_json::Value = serde_json::from_str(json).unwrap();
    let used = node.runtime.status("p/a").await.unwrap().current_usage;
    assert_eq!(ledger["counters"]["quota"]["used"].as_u64().unwrap(), used);
    node.runtime.shutdown();
}

#[actix::test]
#[ignore = "needs postgres: run scripts/test"]
async fn postgres_going_away_and_coming_back_costs_no_request_and_the_sync_catches_up() {
    let mut pg = common::TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = unlimited_config(dir.path(), &pg.url(), None);
    let node = boot(&config).await;
    let (_, failed) = keep_requesting(&node, Duration::from_millis(300)).await;
    assert_eq!(failed, 0);

    pg.stop();
    let (served, failed) = keep_requesting(&node, Duration::from_millis(1500)).await;
    assert!(served > 0);
    assert_eq!(failed, 0, "no request fails because the database is down");
    // The failing write waits for the pool's connection timeout before it is counted.
    let up = node.metrics.sync_up.with_label_values(&["database"]);
    wait_until("the database sync to notice", || up.get() == 0).await;

    pg.restart();
    wait_until("the database sync to come back", || up.get() == 1).await;
    node.syncer.send(Flush).await.unwrap().unwrap();
    let used = node.runtime.status("p/a").await.unwrap().current_usage as i64;
    let store = node.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        quotagate::store::accounts::find(&mut conn, "p/a")
            .unwrap()
            .account
            .quota_used
    })
    .await
    .unwrap();
    assert_eq!(
        stored, used,
        "the database caught up with every request served meanwhile"
    );
    let key = settings::shutdown_mark(&config.instance.id);
    let mark = settings::get(&mut node.store.conn().unwrap(), &key).unwrap();
    assert_eq!(mark.as_deref(), Some("running"));
    node.runtime.shutdown();
}
