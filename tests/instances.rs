//! Several instances, one limit (issue "Several instances"; API.md, "Several instances"): three
//! real gateway processes sharing one Postgres database and one Redis (standalone, or a 3-master
//! Redis Cluster), behind a strict upstream that answers 429 to any excess of its per-key limits
//! by its own clock. Clients drive all three above capacity.
//!
//! Each test prints its figures (run with `--nocapture`): the upstream's 429s (must be 0) and the
//! share of what the limits allow that the instances admitted together (must be ≥ 95 %), counted
//! as in `tests/precision.rs` (a request slot is held for the window plus the latency).

mod common;

use std::time::{Duration, Instant};

use common::app::http_get;
use common::load::{allowed, drive, slot_reuse, Load, Target};
use common::{chat_body, MockUpstream, StrictLimits, TestGateway, TestRedis, MOCK_MODEL};

const ACCOUNTS: u64 = 3;
const REQUESTS: u64 = 5;
const WINDOW: Duration = Duration::from_secs(2);
const CONCURRENT: u64 = 2;
/// 50 times the gateway's estimate of one request (see tests/precision.rs).
const TOKENS: u64 = 50 * 32;
const CLIENTS: usize = 12;
const LATENCY: Duration = Duration::from_millis(50);
/// Short enough for the tests to see a killed instance's leases expire.
const LEASE_TTL: Duration = Duration::from_secs(2);

const ADMIN_TOKEN: &str = "qg-admin-test-instances-0123456789abcdef";
const MASTER_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Where the instances meet.
struct Shared {
    database_url: String,
    /// `redis.host` and `redis.db`.
    redis_host: String,
    redis_db: i64,
}

fn standalone_redis() -> (String, i64) {
    let url = common::redis_database();
    let rest = url.trim_start_matches("redis://");
    let (host, db) = rest.split_once('/').expect("redis://host:port/db");
    (host.to_string(), db.parse().unwrap())
}

fn redis_cluster() -> (String, i64) {
    let nodes = std::env::var("QUOTAGATE_TEST_REDIS_CLUSTER")
        .expect("QUOTAGATE_TEST_REDIS_CLUSTER is not set: run scripts/test");
    (nodes, 0)
}

/// The mock, strict per key.
fn strict_mock() -> MockUpstream {
    let mock = MockUpstream::start();
    mock.set_strict(
        None,
        StrictLimits {
            requests: vec![(REQUESTS, WINDOW)],
            tokens: vec![(TOKENS, WINDOW)],
            concurrent: Some(CONCURRENT),
        },
    );
    mock.set_latency(None, LATENCY);
    mock
}

/// The YAML of instance `id`; `quota` per account (0: none), the same limits as the mock's.
fn yaml(shared: &Shared, mock: &MockUpstream, id: &str, quota: u64) -> String {
    let accounts: String = (1..=ACCOUNTS)
        .map(|i| {
            format!(
                "      - {{ name: a{i}, api_key: \"sk-instances-{i}\", quota_limit: {quota} }}\n"
            )
        })
        .collect();
    format!(
        "database: {{ url: \"{}\" }}
redis: {{ host: \"{}\", db: {} }}
instance: {{ id: \"{id}\" }}
security: {{ admin_token: \"{ADMIN_TOKEN}\", master_key: \"{MASTER_KEY}\" }}
sync: {{ lease_ttl: {}s, reservation_timeout: {}s }}
upstream: {{ timeout: 1s, retries: 0 }}
providers:
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
        shared.database_url,
        shared.redis_host,
        shared.redis_db,
        LEASE_TTL.as_secs(),
        LEASE_TTL.as_secs(),
        mock.base_url(),
        WINDOW.as_secs(),
        WINDOW.as_secs(),
    )
}

/// Three instances, started one after the other (the first hands out the client key).
fn three(shared: &Shared, mock: &MockUpstream, quota: u64) -> (Vec<TestGateway>, String) {
    let gateways: Vec<TestGateway> = (1..=3)
        .map(|i| TestGateway::start(&yaml(shared, mock, &format!("i{i}"), quota)))
        .collect();
    let key = gateways[0].client_key().to_string();
    (gateways, key)
}

fn targets(gateways: &[TestGateway], key: &str) -> Vec<Target> {
    gateways
        .iter()
        .map(|g| Target {
            url: g.url(),
            key: key.to_string(),
        })
        .collect()
}

fn body() -> Vec<u8> {
    serde_json::to_vec(&chat_body(MOCK_MODEL, "precision")).unwrap()
}

fn keys() -> Vec<String> {
    (1..=ACCOUNTS)
        .map(|i| format!("sk-instances-{i}"))
        .collect()
}

/// Prints the figures of a run and checks the upstream saw no excess; answers the admission
/// ratio and the slot reuse.
fn report(name: &str, mock: &MockUpstream, load: &Load, run: Duration) -> (f64, f64) {
    let upstream = mock.total();
    let held = WINDOW + load.mean_latency();
    let allowed = allowed(ACCOUNTS * REQUESTS, run, held);
    let admission = load.admitted() as f64 / allowed as f64;
    let (reuse, gap) = slot_reuse(&mock.received(), &keys(), REQUESTS as usize, held);
    println!(
        "{name}: upstream_429s: {} (statuses {:?}, max concurrency {}); admitted {} of {allowed} \
         allowed = {:.1} % (a slot held W + client latency {:.1} ms); slot reuse every {:.1} ms = \
         {:.1} %; gateway 429s {}; other answers {}",
        upstream.rejected_429,
        upstream.statuses,
        upstream.max_concurrency,
        load.admitted(),
        admission * 100.0,
        load.mean_latency().as_secs_f64() * 1000.0,
        gap.as_secs_f64() * 1000.0,
        reuse * 100.0,
        load.refused,
        load.other.len()
    );
    assert_eq!(
        upstream.rejected_429, 0,
        "{name}: the strict upstream saw an excess ({:?}): the instances let through more than \
         the limits together",
        upstream.rejected_by
    );
    assert!(upstream.max_concurrency <= CONCURRENT);
    (admission, reuse)
}

async fn three_instances_never_trip_a_strict_upstream_and_admit_nearly_all_it_allows(
    name: &str,
    redis: (String, i64),
) {
    let shared = Shared {
        database_url: common::pg_database(),
        redis_host: redis.0,
        redis_db: redis.1,
    };
    let mock = strict_mock();
    let (gateways, key) = three(&shared, &mock, 0);
    let run = Duration::from_secs(12);
    let load = drive(&targets(&gateways, &key), CLIENTS, run, &body()).await;
    assert!(
        load.other.is_empty() && load.lost.is_empty(),
        "unexpected answers: {:?} {:?}",
        &load.other[..load.other.len().min(5)],
        load.lost
    );
    let (admission, reuse) = report(name, &mock, &load, run);
    assert!(
        admission >= 0.95 && reuse >= 0.95,
        "{name}: admitted {:.1} %, slot reuse {:.1} % (< 95 %)",
        admission * 100.0,
        reuse * 100.0
    );
    for g in &gateways {
        let (status, body) = http_get(g.port(), "/readyz").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("\"ledger\":\"shared\""), "{body}");
    }
    // The database copy is the ledger's: once the workers gave their idle units back and every
    // instance flushed, each account's row holds the ledger's latest version.
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let http = common::Http::new();
    for g in &gateways {
        let r = http
            .send(
                "POST",
                &format!("{}/api/v1/admin/flush", g.url()),
                Some(ADMIN_TOKEN),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
    }
    let ledger = ledger_versions(&shared).await;
    let database = database_versions(&shared.database_url);
    assert_eq!(ledger.len(), ACCOUNTS as usize, "{ledger:?}");
    assert_eq!(database, ledger, "database copy vs ledger versions");
}

/// Each account's ledger version in Redis.
async fn ledger_versions(shared: &Shared) -> std::collections::BTreeMap<String, u64> {
    let config = quotagate::config::RedisConfig {
        host: shared.redis_host.clone(),
        db: shared.redis_db,
        ..Default::default()
    };
    let target = quotagate::ledger::RedisTarget::from_config(&config)
        .unwrap()
        .unwrap();
    let link = quotagate::ledger::LedgerLink::start(
        target,
        Duration::from_secs(2),
        Duration::from_secs(1),
        "reader".into(),
        std::sync::Arc::new(quotagate::ledger::LedgerClock::new(std::sync::Arc::new(
            quotagate::domain::time::SystemClock,
        ))),
        quotagate::metrics::Metrics::new().ledger,
        1,
    )
    .await;
    let mut versions = std::collections::BTreeMap::new();
    for id in database_versions(&shared.database_url).keys() {
        if let Some(value) = link.load(id).await.unwrap().value {
            versions.insert(id.clone(), quotagate::ledger::split(&value).unwrap().0);
        }
    }
    versions
}

/// Each account's saved state version in the database.
fn database_versions(url: &str) -> std::collections::BTreeMap<String, u64> {
    use diesel::{Connection, QueryableByName, RunQueryDsl};
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        account_id: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        version: i64,
    }
    let mut conn = diesel::PgConnection::establish(url).unwrap();
    diesel::sql_query("SELECT account_id, version FROM account_state")
        .load::<Row>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|r| (r.account_id, r.version as u64))
        .collect()
}

#[actix_rt::test]
#[ignore = "needs postgres and redis: run scripts/test"]
async fn three_instances_on_one_redis_keep_one_limit() {
    three_instances_never_trip_a_strict_upstream_and_admit_nearly_all_it_allows(
        "instances(redis)",
        standalone_redis(),
    )
    .await;
}

#[actix_rt::test]
#[ignore = "needs postgres and a redis cluster: run scripts/test"]
async fn three_instances_on_a_redis_cluster_keep_one_limit() {
    three_instances_never_trip_a_strict_upstream_and_admit_nearly_all_it_allows(
        "instances(cluster)",
        redis_cluster(),
    )
    .await;
}

#[actix_rt::test]
#[ignore = "needs postgres and redis: run scripts/test"]
async fn a_killed_instance_strands_its_units_for_its_lease_time_only() {
    let (host, db) = standalone_redis();
    let shared = Shared {
        database_url: common::pg_database(),
        redis_host: host,
        redis_db: db,
    };
    let mock = strict_mock();
    let (mut gateways, key) = three(&shared, &mock, 0);
    let run = Duration::from_secs(16);
    let kill_at = Duration::from_secs(4);
    let mut victim = gateways.pop().unwrap();
    let mut all = targets(&gateways, &key);
    all.push(Target {
        url: victim.url(),
        key: key.clone(),
    });
    let killer = actix_rt::spawn(async move {
        actix_rt::time::sleep(kill_at).await;
        victim.sigkill();
        victim
    });
    let load = drive(&all, CLIENTS, run, &body()).await;
    let _victim = killer.await.unwrap();
    assert!(
        load.other.is_empty(),
        "unexpected answers: {:?}",
        &load.other[..load.other.len().min(5)]
    );
    report("instances(kill)", &mock, &load, run);
    // Back to full speed within the lease time plus one window of the kill: measured on the
    // requests the upstream accepted from then on.
    let back = kill_at + LEASE_TTL + WINDOW;
    let started = load.started.unwrap();
    let after: Vec<_> = mock
        .received()
        .into_iter()
        .filter(|r| r.at >= started + back)
        .collect();
    let held = WINDOW + load.mean_latency();
    let (reuse, gap) = slot_reuse(&after, &keys(), REQUESTS as usize, held);
    let admitted = load.admitted_since(back);
    let allowed_after = allowed(ACCOUNTS * REQUESTS, run - back, held);
    println!(
        "instances(kill): from {:.0} s after the start (the kill + lease TTL + one window): \
         admitted {admitted} of {allowed_after} allowed; slot reuse every {:.1} ms = {:.1} %",
        back.as_secs_f64(),
        gap.as_secs_f64() * 1000.0,
        reuse * 100.0
    );
    assert!(
        reuse >= 0.95,
        "after the kill the survivors reuse slots at {:.1} % (< 95 %)",
        reuse * 100.0
    );
}

#[actix_rt::test]
#[ignore = "needs postgres and redis: run scripts/test"]
async fn a_daily_quota_shared_by_three_instances_is_never_exceeded() {
    const QUOTA: u64 = 600;
    let (host, db) = standalone_redis();
    let shared = Shared {
        database_url: common::pg_database(),
        redis_host: host,
        redis_db: db,
    };
    let mock = strict_mock();
    let (gateways, key) = three(&shared, &mock, QUOTA);
    // Long enough to spend every quota (about 31 requests each at the windows' pace).
    let run = Duration::from_secs(16);
    let load = drive(&targets(&gateways, &key), CLIENTS, run, &body()).await;
    assert!(load.lost.is_empty(), "{:?}", load.lost);
    let upstream = mock.total();
    assert_eq!(upstream.rejected_429, 0, "{:?}", upstream.rejected_by);
    let one_request = upstream.tokens() / upstream.answered.max(1);
    for key in keys() {
        let stats = mock.stats(&key);
        println!(
            "instances(quota): {key}: upstream served {} tokens in {} requests (quota {QUOTA}, \
             one request ≈ {one_request})",
            stats.tokens(),
            stats.answered
        );
        assert!(
            stats.tokens() <= QUOTA + one_request,
            "{key} served {} tokens over a quota of {QUOTA}",
            stats.tokens()
        );
        assert!(
            stats.tokens() + 2 * one_request > QUOTA,
            "{key} stopped at {} tokens, well before its quota of {QUOTA}",
            stats.tokens()
        );
    }
}

#[actix_rt::test]
#[ignore = "needs postgres and redis-server: run scripts/test"]
async fn redis_away_for_ten_seconds_then_back_empty_costs_no_429_and_no_5xx() {
    let mut redis = TestRedis::start();
    let shared = Shared {
        database_url: common::pg_database(),
        redis_host: format!("127.0.0.1:{}", redis.port()),
        redis_db: 0,
    };
    let mock = strict_mock();
    let (gateways, key) = three(&shared, &mock, 0);
    let run = Duration::from_secs(20);
    let (stop_at, back_at) = (Duration::from_secs(3), Duration::from_secs(13));
    let ports: Vec<u16> = gateways.iter().map(TestGateway::port).collect();
    let outage = actix_rt::spawn(async move {
        let start = Instant::now();
        actix_rt::time::sleep(stop_at).await;
        redis.stop();
        // Half-way through the outage every instance says so.
        actix_rt::time::sleep(Duration::from_secs(5)).await;
        let during: Vec<String> = ports
            .iter()
            .map(|p| http_get(*p, "/readyz").map(|r| r.1).unwrap_or_default())
            .collect();
        actix_rt::time::sleep(back_at.saturating_sub(start.elapsed())).await;
        redis.restart();
        (redis, during)
    });
    let load = drive(&targets(&gateways, &key), CLIENTS, run, &body()).await;
    let (_redis, during) = outage.await.unwrap();
    assert!(load.lost.is_empty(), "{:?}", load.lost);
    assert!(
        load.server_errors().is_empty() && load.other.is_empty(),
        "answers other than 200 and the gateway's 429: {:?}",
        &load.other[..load.other.len().min(5)]
    );
    report("instances(redis down)", &mock, &load, run);
    let served_after = load.admitted_since(back_at + WINDOW);
    println!("instances(redis down): admitted {served_after} after Redis came back");
    assert!(served_after > 0, "service resumed after Redis came back");
    for (readiness, g) in during.iter().zip(&gateways) {
        assert!(
            readiness.contains("\"ledger\":\"degraded\""),
            "during the outage: {readiness}"
        );
        let logs = g.logs();
        assert_eq!(
            logs.matches("\"ledger_degraded\"").count(),
            1,
            "one ledger_degraded line per instance"
        );
        let (status, body) = http_get(g.port(), "/readyz").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("\"ledger\":\"shared\""), "after: {body}");
    }
}

#[test]
#[ignore = "needs postgres and redis: run scripts/test"]
fn three_instances_starting_together_hand_out_the_first_secrets_once() {
    let (host, db) = standalone_redis();
    let database_url = common::pg_database();
    let mock = MockUpstream::start();
    let yaml = |id: &str| {
        format!(
            "database: {{ url: \"{database_url}\" }}
redis: {{ host: \"{host}\", db: {db} }}
instance: {{ id: \"{id}\" }}
security: {{ master_key: \"{MASTER_KEY}\" }}
providers:
  - name: p
    base_url: \"{}\"
    models: [{MOCK_MODEL}]
    accounts:
      - {{ name: a, api_key: \"sk-together\" }}
",
            mock.base_url()
        )
    };
    // Together: migrations, secrets and providers all at once on a fresh database.
    let starting: Vec<_> = (1..=3)
        .map(|i| {
            let yaml = yaml(&format!("t{i}"));
            std::thread::spawn(move || TestGateway::start(&yaml))
        })
        .collect();
    let gateways: Vec<TestGateway> = starting.into_iter().map(|t| t.join().unwrap()).collect();
    let outputs: Vec<String> = gateways.iter().map(TestGateway::stdout).collect();
    let admin_lines = outputs
        .iter()
        .map(|o| o.matches("admin token:").count())
        .sum::<usize>();
    let key_lines = outputs
        .iter()
        .map(|o| o.matches("client key:").count())
        .sum::<usize>();
    assert_eq!((admin_lines, key_lines), (1, 1), "{outputs:?}");
    let key = outputs
        .iter()
        .find_map(|o| o.lines().find_map(|l| l.split("client key:").nth(1)))
        .unwrap()
        .trim()
        .to_string();
    actix_rt::System::new().block_on(async {
        let http = common::Http::new();
        for g in &gateways {
            let r = http
                .post_json(
                    &format!("{}/v1/chat/completions", g.url()),
                    Some(&key),
                    &chat_body(MOCK_MODEL, "hello"),
                )
                .await;
            assert_eq!(r.status, 200, "{r}");
        }
    });

    // A fourth instance with another master key could not open the credentials: it refuses
    // to start, and says why.
    let other = yaml("t4").replace(MASTER_KEY, &"ab".repeat(32));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        common::app::config_yaml(&other),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args([
            "--config",
            &dir.path().join("config.yaml").display().to_string(),
            "serve",
        ])
        .env("QUOTAGATE__SERVER__PORT", common::free_port().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sealed with another master key"),
        "{stderr}"
    );
}
