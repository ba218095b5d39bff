//! Input and exposure (issue 8, §8): NUL characters in client text on both backends, `/readyz`
//! without details, the admin token's minimum length and the throttle on failed admin attempts.
//!
//! Most tests drive the real route table in-process (`actix_web::test`) over the real runtime,
//! tracker and store: once on SQLite, once on the shared Postgres of `scripts/test` (where the
//! database refuses `0x00` in text, which is what broke). The mock upstream stands in for the
//! provider.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::Method;
use actix_web::{test, web, App};
use serde_json::{json, Value};

use common::{Behavior, MockUpstream, TestPostgres, MOCK_MODEL};
use quotagate::config::Config;
use quotagate::http::auth::Credentials;
use quotagate::http::upstream::UpstreamSettings;
use quotagate::http::AppState;
use quotagate::metrics::Metrics;
use quotagate::secrets::{hash_token, MasterKey};
use quotagate::store::logs::NewRequestLog;
use quotagate::store::{logs, settings};

const ADMIN: &str = "qga_hardening-admin-token-0123456789abcdef";

#[derive(Debug, Clone, Copy)]
enum Db {
    Sqlite,
    Postgres,
}

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    client_key: String,
}

impl Harness {
    /// A gateway over `db` with one provider `p` (account `a1`) at `upstream`.
    async fn start(db: Db, upstream: &str, redis_host: &str) -> Harness {
        let url = match db {
            Db::Sqlite => "sqlite://db/q.db".to_string(),
            Db::Postgres => common::pg_database(),
        };
        Harness::start_on(&url, upstream, redis_host).await
    }

    async fn start_on(url: &str, upstream: &str, redis_host: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "database: {{ url: \"{url}\" }}\nruntime: {{ arbiters: 0 }}\nredis: {{ host: \"{redis_host}\" }}\n\
             providers:\n  - name: p\n    base_url: \"{upstream}\"\n    models: [{MOCK_MODEL}]\n    \
             accounts:\n      - {{ name: a1, api_key: \"sk-hardening\" }}\n"
        );
        let config = Config::from_yaml(&yaml, &dir.path().join("config.yaml"), &BTreeMap::new())
            .expect("test config");
        let store = quotagate::store::open_store(&config).unwrap();
        let key = MasterKey::generate();
        quotagate::provision::apply(&mut store.conn().unwrap(), &key, &config.providers).unwrap();
        let metrics = Metrics::new();
        let node = quotagate::server::start_node(&config, &store, &key, &metrics)
            .await
            .unwrap();
        let credentials = Credentials::new(&config.security.admin_token);
        let client_key = {
            let mut conn = store.conn().unwrap();
            settings::put(&mut conn, settings::ADMIN_TOKEN_HASH, &hash_token(ADMIN)).unwrap();
            let (_, token) = quotagate::manage::create_key(&mut conn, "k", "user-1").unwrap();
            credentials.reload(&mut conn).unwrap();
            token.expose().to_string()
        };
        let tracker =
            quotagate::actors::tracker::Tracker::start(store.clone(), &config.tracking, &metrics);
        let state = AppState {
            store,
            redis: node.redis,
            ledger: node.ledger,
            runtime: node.runtime,
            credentials,
            syncer: node.syncer,
            master_key: key,
            upstream: UpstreamSettings {
                connect_timeout: Duration::from_secs(1),
                timeout: Duration::from_secs(5),
                stream_idle_timeout: Duration::from_secs(5),
                retries: 0,
                max_cooldown: Duration::from_secs(3600),
                forbidden_cooldown: Duration::from_secs(600),
            },
            renew_every: Duration::from_secs(60),
            tracker,
        };
        Harness {
            _dir: dir,
            state,
            client_key,
        }
    }

    /// Every request-log row, after the tracker wrote what it holds.
    async fn request_logs(&self) -> Vec<NewRequestLog> {
        self.state.tracker.flush().await.unwrap();
        let mut conn = self.state.store.conn().unwrap();
        logs::list_range(
            &mut conn,
            chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
            chrono::NaiveDate::from_ymd_opt(2100, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        )
        .unwrap()
    }
}

macro_rules! app {
    ($h:expr) => {
        test::init_service(
            App::new()
                .app_data(web::Data::new($h.state.clone()))
                .app_data(web::Data::new(quotagate::http::upstream::client(
                    &$h.state.upstream,
                )))
                .configure(quotagate::http::configure),
        )
        .await
    };
}

struct Resp {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

async fn call<S, B>(
    app: &S,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    peer: Option<SocketAddr>,
) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let mut req = test::TestRequest::default().method(method).uri(path);
    if let Some(token) = token {
        req = req.insert_header(("authorization", format!("Bearer {token}")));
    }
    if let Some(body) = body {
        req = req
            .insert_header(("content-type", "application/json"))
            .set_payload(body.to_string());
    }
    if let Some(peer) = peer {
        req = req.peer_addr(peer);
    }
    let res = test::call_service(app, req.to_request()).await;
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = test::read_body(res).await;
    Resp {
        status,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Runs `$name(Db)` as two tests: on SQLite, and on the shared Postgres of `scripts/test`.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[actix_rt::test]
            async fn sqlite() {
                super::$name(super::Db::Sqlite).await
            }

            #[actix_rt::test]
            #[ignore = "needs postgres: run scripts/test"]
            async fn postgres() {
                super::$name(super::Db::Postgres).await
            }
        }
    };
}

#[track_caller]
fn assert_invalid(r: &Resp, what: &str) {
    assert_eq!(r.status, 400, "{what}: {r}");
    assert_eq!(r.json()["error"]["code"], "invalid_request", "{what}: {r}");
}

// ------------------------------------------------------------------------------------------------
// NUL characters
// ------------------------------------------------------------------------------------------------

on_both_backends!(a_nul_in_an_id_or_a_query_of_any_path_is_a_400_never_a_500);
async fn a_nul_in_an_id_or_a_query_of_any_path_is_a_400_never_a_500(db: Db) {
    let h = Harness::start(db, "http://127.0.0.1:9/v1", "").await;
    let app = app!(h);
    let get = Method::GET;
    for (method, path) in [
        (get.clone(), "/api/v1/stats/errors/%00"),
        (
            get.clone(),
            "/api/v1/stats/providers/p%00?from=2026-01-01T00:00:00Z",
        ),
        (get.clone(), "/api/v1/stats/pool/%00"),
        (get.clone(), "/api/v1/stats/quota/p%2Fa%001"),
        (get.clone(), "/api/v1/stats/ratelimit/%00"),
        (get.clone(), "/api/v1/stats/usage?user_id=%00"),
        (get.clone(), "/api/v1/stats/models/top?from=%00"),
        (get.clone(), "/api/v1/admin/providers/%00"),
        (get.clone(), "/api/v1/admin/accounts/%00"),
        (Method::DELETE, "/api/v1/admin/keys/%00"),
        (Method::POST, "/api/v1/admin/accounts/%00/reset"),
    ] {
        let r = call(&app, method.clone(), path, Some(ADMIN), None, None).await;
        assert_invalid(&r, &format!("{method} {path}"));
    }
    // The same paths without the NUL still work: the guard only refuses NUL.
    let r = call(&app, get, "/api/v1/stats/errors/p", Some(ADMIN), None, None).await;
    assert_eq!(r.status, 200, "{r}");
}

on_both_backends!(a_nul_in_an_admin_body_is_refused_by_name);
async fn a_nul_in_an_admin_body_is_refused_by_name(db: Db) {
    let h = Harness::start(db, "http://127.0.0.1:9/v1", "").await;
    let app = app!(h);
    let cases = [
        (
            Method::POST,
            "/api/v1/admin/providers",
            json!({"name": "bad\u{0}name", "base_url": "http://127.0.0.1:9/v1", "models": ["m"]}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/admin/providers",
            json!({"name": "q", "base_url": "http://127.0.0.1:9/v1", "models": ["m", "m\u{0}"]}),
            "models[1]",
        ),
        (
            Method::POST,
            "/api/v1/admin/accounts",
            json!({"name": "a\u{0}2", "provider": "p", "api_key": "sk-1"}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/admin/keys",
            json!({"name": "key\u{0}", "user": "u"}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/admin/keys",
            json!({"name": "key", "user": "u\u{0}"}),
            "user",
        ),
        (
            Method::PATCH,
            "/api/v1/admin/accounts/p%2Fa1",
            json!({"credentials": {"api_key": "sk", "headers": {"X-Org": "o\u{0}"}}}),
            "credentials.headers.X-Org",
        ),
    ];
    for (method, path, body, param) in cases {
        let r = call(
            &app,
            method.clone(),
            path,
            Some(ADMIN),
            Some(&body.to_string()),
            None,
        )
        .await;
        assert_invalid(&r, &format!("{method} {path} {body}"));
        assert_eq!(r.json()["error"]["param"], param, "{r}");
    }
    // Nothing was written.
    let r = call(
        &app,
        Method::GET,
        "/api/v1/admin/providers",
        Some(ADMIN),
        None,
        None,
    )
    .await;
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{r}");
}

on_both_backends!(a_chat_request_whose_model_holds_a_nul_keeps_its_request_log_row);
async fn a_chat_request_whose_model_holds_a_nul_keeps_its_request_log_row(db: Db) {
    let mock = MockUpstream::start();
    let h = Harness::start(db, &mock.base_url(), "").await;
    let app = app!(h);
    let body = json!({"model": "mock\u{0}model", "messages": [{"role": "user", "content": "hi"}]});
    let r = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(&h.client_key),
        Some(&body.to_string()),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{r}");
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let rows = h.request_logs().await;
    let row = rows
        .iter()
        .find(|row| row.model.starts_with("mock"))
        .unwrap_or_else(|| panic!("the request-log row is kept: {rows:?}"));
    assert_eq!(row.model, "mock\u{FFFD}model");
    assert_eq!(row.status_code, 404);
    assert!(!row.error_message.as_deref().unwrap_or("").contains('\0'));
}

on_both_backends!(an_upstream_error_message_holding_a_nul_keeps_its_request_log_row);
async fn an_upstream_error_message_holding_a_nul_keeps_its_request_log_row(db: Db) {
    let mock = MockUpstream::start();
    mock.behave_all(Behavior::Raw {
        status: 500,
        headers: vec![],
        body: "upstream broke\u{0}here".to_string(),
    });
    let h = Harness::start(db, &mock.base_url(), "").await;
    let app = app!(h);
    let body = json!({"model": MOCK_MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let r = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(&h.client_key),
        Some(&body.to_string()),
        None,
    )
    .await;
    assert_eq!(r.status, 502, "{r}");
    // A good request in the same batch is kept too.
    mock.behave_all(Behavior::Normal);
    let ok = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(&h.client_key),
        Some(&body.to_string()),
        None,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok}");
    let rows = h.request_logs().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let failed = rows.iter().find(|r| r.status_code == 502).unwrap();
    let message = failed.error_message.as_deref().unwrap();
    assert!(message.contains("upstream broke\u{FFFD}here"), "{message}");
}

// ------------------------------------------------------------------------------------------------
// /readyz
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn readyz_reports_redis_unhealthy_without_its_address() {
    let port = common::free_port();
    let h = Harness::start(
        Db::Sqlite,
        "http://127.0.0.1:9/v1",
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let app = app!(h);
    let r = call(&app, Method::GET, "/readyz", None, None, None).await;
    assert_eq!(
        r.status, 200,
        "Redis down degrades, it does not make unready: {r}"
    );
    assert_eq!(r.json()["database"], "ok");
    assert_eq!(r.json()["redis"], "unhealthy");
    assert!(
        !r.body.contains("127.0.0.1") && !r.body.contains(&port.to_string()),
        "{r}"
    );
}

#[actix_rt::test]
#[ignore = "needs postgres: run scripts/test"]
async fn readyz_reports_the_database_unhealthy_without_host_user_or_database_names() {
    let mut pg = TestPostgres::start();
    let h = Harness::start_on(&pg.url(), "http://127.0.0.1:9/v1", "").await;
    let app = app!(h);
    let up = call(&app, Method::GET, "/readyz", None, None, None).await;
    assert_eq!(up.status, 200, "{up}");
    assert_eq!(
        (up.json()["database"].clone(), up.json()["redis"].clone()),
        (json!("ok"), json!("disabled"))
    );
    pg.stop();
    let down = call(&app, Method::GET, "/readyz", None, None, None).await;
    assert_eq!(down.status, 503, "{down}");
    assert_eq!(down.json()["database"], "unhealthy");
    assert_eq!(down.json()["ready"], false);
    for detail in [
        "127.0.0.1",
        &pg.port().to_string(),
        "postgres",
        "connect",
        "error",
    ] {
        assert!(!down.body.contains(detail), "`{detail}` in {down}");
    }
}

// ------------------------------------------------------------------------------------------------
// The admin token
// ------------------------------------------------------------------------------------------------

// (`test` is actix-web's module here: the built-in attribute by its full path.)
#[core::prelude::v1::test]
fn a_short_configured_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "database: { url: \"sqlite://data/q.db\" }\nsecurity: { admin_token: \"letmein-secret\" }\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .env("QUOTAGATE__SERVER__PORT", common::free_port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that accepts the token would run on: give it 20 s to refuse.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started with a short admin token");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("security.admin_token"), "{stderr}");
    assert!(lines[0].contains("at least 32"), "{stderr}");
    assert!(
        !stderr.contains("letmein"),
        "the token is not shown: {stderr}"
    );
}

#[actix_rt::test]
async fn failed_admin_attempts_are_throttled_per_address() {
    let h = Harness::start(Db::Sqlite, "http://127.0.0.1:9/v1", "").await;
    let app = app!(h);
    let attacker: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let operator: SocketAddr = "10.9.9.9:40000".parse().unwrap();
    let path = "/api/v1/admin/providers";
    for i in 0..quotagate::http::throttle::LIMIT {
        let r = call(
            &app,
            Method::GET,
            path,
            Some(&format!("wrong-{i}")),
            None,
            Some(attacker),
        )
        .await;
        assert_eq!(r.status, 401, "attempt {i}: {r}");
    }
    // Locked out now, the right token included, on every admin and stats route.
    for (token, route) in [
        ("wrong-again", path),
        (ADMIN, path),
        (ADMIN, "/api/v1/stats/usage"),
    ] {
        let r = call(&app, Method::GET, route, Some(token), None, Some(attacker)).await;
        assert_eq!(r.status, 429, "{route}: {r}");
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(r.json()["error"]["limit"], "admin_auth");
        let seconds: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&seconds), "{seconds}");
    }
    // Another address is not locked out, and neither are client keys on the client API.
    let r = call(&app, Method::GET, path, Some(ADMIN), None, Some(operator)).await;
    assert_eq!(r.status, 200, "{r}");
    let r = call(
        &app,
        Method::GET,
        "/v1/models",
        Some(&h.client_key),
        None,
        Some(attacker),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    // A client key reading its own usage is not a failed admin attempt.
    for _ in 0..quotagate::http::throttle::LIMIT + 2 {
        let r = call(
            &app,
            Method::GET,
            "/api/v1/stats/usage",
            Some(&h.client_key),
            None,
            Some(operator),
        )
        .await;
        assert_eq!(r.status, 200, "{r}");
    }
}
