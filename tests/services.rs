//! Smoke tests of the test harness (tests/common/services.rs) against real servers.
//! Test names start with `services_` so that `scripts/test services` selects them.

mod common;

use std::time::Duration;

use common::{TestPostgres, TestRedis};
use diesel::pg::PgConnection;
use diesel::sql_types::Integer;
use diesel::{Connection, QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct One {
    #[diesel(sql_type = Integer)]
    one: i32,
}

fn select_one(url: &str) -> Result<i32, String> {
    let mut conn = PgConnection::establish(url).map_err(|e| e.to_string())?;
    let rows: Vec<One> = diesel::sql_query("SELECT 1 AS one")
        .load(&mut conn)
        .map_err(|e| e.to_string())?;
    Ok(rows[0].one)
}

fn redis_ping(url: &str) -> redis::RedisResult<String> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    redis::cmd("PING").query(&mut con)
}

#[test]
#[ignore = "needs postgres: run scripts/test"]
fn services_pg_database_is_fresh_and_answers() {
    let url = common::pg_database();
    assert!(url.contains("/qg_test_"), "unexpected URL {url}");
    assert_eq!(select_one(&url), Ok(1));
    assert_ne!(
        url,
        common::pg_database(),
        "each call creates a new database"
    );
}

#[test]
#[ignore = "needs redis: run scripts/test"]
fn services_redis_url_answers_ping() {
    assert_eq!(redis_ping(&common::redis_url()).unwrap(), "PONG");
}

#[test]
#[ignore = "needs redis: run scripts/test"]
fn services_redis_databases_are_isolated() {
    let (a, b) = (common::redis_database(), common::redis_database());
    assert_ne!(a, b);
    let mut con_a = redis::Client::open(a.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut con_b = redis::Client::open(b.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("from a")
        .query(&mut con_a)
        .unwrap();
    let seen_by_b: Option<String> = redis::cmd("GET").arg("k").query(&mut con_b).unwrap();
    assert_eq!(seen_by_b, None);
    let seen_by_a: Option<String> = redis::cmd("GET").arg("k").query(&mut con_a).unwrap();
    assert_eq!(seen_by_a.as_deref(), Some("from a"));
}

#[test]
#[ignore = "needs redis-server: run scripts/test"]
fn services_test_redis_password_stop_restart() {
    let mut redis = TestRedis::start_with_password(Some("pw"));

    let unauthenticated = redis_ping(&redis.url_without_password());
    let err = unauthenticated.expect_err("PING without the password must be refused");
    assert!(
        err.to_string().contains("NOAUTH") || err.to_string().contains("uthentication"),
        "unexpected error: {err}"
    );
    assert!(redis.url().contains(":pw@"), "{}", redis.url());
    assert_eq!(redis_ping(&redis.url()).unwrap(), "PONG");

    let port = redis.port();
    redis.stop();
    assert!(
        redis_ping(&redis.url()).is_err(),
        "a stopped Redis must not answer"
    );

    redis.restart();
    assert_eq!(redis.port(), port, "restart keeps the port");
    assert_eq!(redis_ping(&redis.url()).unwrap(), "PONG");
}

#[test]
#[ignore = "needs postgres binaries: run scripts/test"]
fn services_test_postgres_stop_restart() {
    let mut pg = TestPostgres::start();
    assert_eq!(select_one(&pg.url()), Ok(1));

    let port = pg.port();
    pg.stop();
    assert!(
        PgConnection::establish(&pg.url()).is_err(),
        "a stopped PostgreSQL must refuse connections"
    );

    pg.restart();
    assert_eq!(pg.port(), port, "restart keeps the port");
    assert_eq!(select_one(&pg.url()), Ok(1));
}
