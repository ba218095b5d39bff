//! The admin API, the stats API and `/openapi.json`, driven in-process: the real route table over
//! the real runtime, syncer and store (SQLite in a temp dir), with `actix_web::test`.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::Method;
use actix_web::{test, web, App};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use quotagate::config::Config;
use quotagate::http::auth::Credentials;
use quotagate::http::upstream::UpstreamSettings;
use quotagate::http::AppState;
use quotagate::metrics::Metrics;
use quotagate::secrets::{hash_token, MasterKey};
use quotagate::store::audit;
use quotagate::store::logs::NewRequestLog;
use quotagate::store::{rollup, settings, Store};

const ADMIN: &str = "qga_test-admin-token";
const CONFIG_SECRET: &str = "sk-config-secret-9f8e7d6c";

/// A config with one declared provider and account.
const PROVIDERS: &str = r#"
providers:
  - name: groq
    base_url: http://127.0.0.1:9/v1
    rate_limits: { rpm: 30, tpm: 6000 }
    models: [llama, { name: big, price: { input: 1, output: 2 } }]
    accounts:
      - { name: groq-1, api_key: "sk-config-secret-9f8e7d6c", quota_limit: 1000 }
"#;

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "database: {{ url: \"sqlite://db/q.db\" }}\nruntime: {{ arbiters: 0 }}\n{PROVIDERS}"
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
        {
            let mut conn = store.conn().unwrap();
            settings::put(&mut conn, settings::ADMIN_TOKEN_HASH, &hash_token(ADMIN)).unwrap();
            credentials.reload(&mut conn).unwrap();
        }
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
        Harness { _dir: dir, state }
    }

    fn store(&self) -> &Store {
        &self.state.store
    }
}

/// The app over the harness's state.
macro_rules! app {
    ($h:expr) => {
        test::init_service(
            App::new()
                .app_data(web::Data::new($h.state.clone()))
                .configure(quotagate::http::configure),
        )
        .await
    };
}

/// An answer read whole.
struct Resp {
    status: u16,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn param(&self) -> Value {
        self.json()["error"]["param"].clone()
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
    let res = test::call_service(app, req.to_request()).await;
    let status = res.status().as_u16();
    let body = test::read_body(res).await;
    Resp {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get<S, B>(app: &S, path: &str) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    call(app, Method::GET, path, Some(ADMIN), None).await
}

async fn send<S, B>(app: &S, method: Method, path: &str, body: Value) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    call(app, method, path, Some(ADMIN), Some(&body.to_string())).await
}

#[track_caller]
fn assert_status(resp: &Resp, status: u16) {
    assert_eq!(resp.status, status, "{resp}");
}

#[track_caller]
fn assert_invalid(resp: &Resp, param: &str) {
    assert_eq!(resp.status, 400, "{resp}");
    assert_eq!(resp.json()["error"]["code"], "invalid_request", "{resp}");
    assert_eq!(resp.param(), json!(param), "{resp}");
}

// ------------------------------------------------------------------------------------------------
// Providers
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn providers_are_created_read_changed_and_deleted() {
    let h = Harness::start().await;
    let app = app!(h);

    let list = get(&app, "/api/v1/admin/providers").await;
    assert_status(&list, 200);
    assert_eq!(list.json().as_array().unwrap().len(), 1);
    let groq = &list.json()[0];
    assert_eq!(groq["name"], "groq");
    assert_eq!(groq["source"], "config");
    assert_eq!(groq["accounts"], 1);
    assert_eq!(groq["rate_limits"], json!({ "rpm": 30, "tpm": 6000 }));
    assert_eq!(groq["models"][0]["name"], "big");
    assert_eq!(
        groq["models"][0]["price"],
        json!({ "input": 1.0, "output": 2.0 })
    );
    assert!(uuid::Uuid::parse_str(groq["id"].as_str().unwrap()).is_ok());

    let created = send(
        &app,
        Method::POST,
        "/api/v1/admin/providers",
        json!({
            "name": "mistral",
            "base_url": "https://api.mistral.ai/v1/",
            "strategy": "round_robin",
            "timeout": "30s",
            "tokenizer": "bytes",
            "rate_limits": { "rpd": { "limit": 100, "reset": "0 0 * * *" }, "windows": [{ "kind": "requests", "limit": 5, "per": "2s" }] },
            "models": ["small", { "name": "large", "rate_limits": { "tpm": 500 } }],
        }),
    )
    .await;
    assert_status(&created, 201);
    let p = created.json();
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(p["base_url"], "https://api.mistral.ai/v1");
    assert_eq!(p["strategy"], "round_robin");
    assert_eq!(p["timeout"], "30s");
    assert_eq!(p["tokenizer"], "bytes");
    assert_eq!(p["source"], "api");
    assert_eq!(p["active"], true);
    assert_eq!(p["rate_limits"]["rpd"]["limit"], 100);
    assert_eq!(p["rate_limits"]["windows"][0]["per"], "2s");
    assert_eq!(p["models"][0]["name"], "large");
    assert_eq!(p["models"][0]["rate_limits"], json!({ "tpm": 500 }));
    // The runtime serves it at once.
    assert!(h.state.runtime.registry().provider("mistral").is_ok());
    assert_eq!(h.state.runtime.registry().route("large").len(), 1);

    // By id or by name.
    assert_eq!(
        get(&app, &format!("/api/v1/admin/providers/{id}"))
            .await
            .json()["name"],
        "mistral"
    );
    assert_eq!(
        get(&app, "/api/v1/admin/providers/mistral").await.json()["id"],
        json!(id)
    );

    // A partial change keeps the rest.
    let patched = send(
        &app,
        Method::PATCH,
        "/api/v1/admin/providers/mistral",
        json!({ "strategy": "least_used", "timeout": null, "models": ["small"] }),
    )
    .await;
    assert_status(&patched, 200);
    let p = patched.json();
    assert_eq!(p["strategy"], "least_used");
    assert_eq!(p["timeout"], Value::Null);
    assert_eq!(p["tokenizer"], "bytes");
    assert_eq!(p["rate_limits"]["rpd"]["limit"], 100);
    assert_eq!(p["models"].as_array().unwrap().len(), 1);
    assert!(h.state.runtime.registry().route("large").is_empty());

    // Rename, then deactivate.
    let renamed = send(
        &app,
        Method::PATCH,
        &format!("/api/v1/admin/providers/{id}"),
        json!({ "name": "mistral-eu", "active": false }),
    )
    .await;
    assert_status(&renamed, 200);
    assert_eq!(renamed.json()["active"], false);
    assert!(
        !h.state
            .runtime
            .registry()
            .provider("mistral-eu")
            .unwrap()
            .spec
            .active
    );

    // Limits: read, replace.
    let limits = get(&app, "/api/v1/admin/providers/groq/rate-limits").await;
    assert_eq!(limits.json(), json!({ "rpm": 30, "tpm": 6000 }));
    let put = send(
        &app,
        Method::PUT,
        "/api/v1/admin/providers/groq/rate-limits",
        json!({ "rpm": 10, "concurrent": 2 }),
    )
    .await;
    assert_status(&put, 200);
    assert_eq!(put.json(), json!({ "rpm": 10, "concurrent": 2 }));
    assert_eq!(
        get(&app, "/api/v1/admin/providers/groq/rate-limits")
            .await
            .json(),
        json!({ "rpm": 10, "concurrent": 2 })
    );
    let windows = h.state.runtime.rate_stats("groq/groq-1").await.unwrap();
    let rpm = windows
        .iter()
        .find(|w| w.limit_type == "rpm")
        .expect("rpm window");
    assert_eq!(rpm.limit, 10);
    assert!(windows.iter().all(|w| w.limit_type != "tpm"), "{windows:?}");

    // Delete.
    assert_status(
        &call(
            &app,
            Method::DELETE,
            &format!("/api/v1/admin/providers/{id}"),
            Some(ADMIN),
            None,
        )
        .await,
        204,
    );
    assert_status(
        &get(&app, &format!("/api/v1/admin/providers/{id}")).await,
        404,
    );
    assert!(h.state.runtime.registry().provider(&id).is_err());
    assert_status(
        &call(
            &app,
            Method::DELETE,
            "/api/v1/admin/providers/nope",
            Some(ADMIN),
            None,
        )
        .await,
        404,
    );
}

#[actix_rt::test]
async fn bad_provider_bodies_are_400_naming_the_field_and_duplicates_409() {
    let h = Harness::start().await;
    let app = app!(h);
    let post = |body: Value| {
        let app = &app;
        async move { send(app, Method::POST, "/api/v1/admin/providers", body).await }
    };

    assert_invalid(&post(json!({ "name": "x" })).await, "base_url");
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "ftp://x" })).await,
        "base_url",
    );
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "strategy": "fastest" })).await,
        "strategy",
    );
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "rate_limits": { "rpm": 0 } })).await,
        "rate_limits.rpm",
    );
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "rate_limits": { "rpd": { "limit": 5, "reset": "every day" } } })).await,
        "rate_limits.rpd.reset",
    );
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "timeout": 5 })).await,
        "timeout",
    );
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "colour": "red" })).await,
        "colour",
    );
    assert_invalid(
        &post(json!({ "name": "a/b", "base_url": "http://x" })).await,
        "name",
    );
    assert_invalid(&post(json!({ "name": "x", "base_url": "http://x", "models": [{ "name": "m", "price": { "input": -1 } }] })).await, "models[0].price.input");
    assert_invalid(
        &post(json!({ "name": "x", "base_url": "http://x", "accounts": [] })).await,
        "accounts",
    );

    // Not JSON at all: still the envelope.
    let garbage = call(
        &app,
        Method::POST,
        "/api/v1/admin/providers",
        Some(ADMIN),
        Some("{not json"),
    )
    .await;
    assert_eq!(garbage.status, 400, "{garbage}");
    assert_eq!(garbage.json()["error"]["code"], "invalid_request");

    // `${VAR}` is not expanded: it is text.
    let literal = post(json!({ "name": "lit", "base_url": "http://x/${HOME}" })).await;
    assert_status(&literal, 201);
    assert_eq!(literal.json()["base_url"], "http://x/${HOME}");

    let dup = post(json!({ "name": "groq", "base_url": "http://x" })).await;
    assert_status(&dup, 409);
    assert_eq!(dup.json()["error"]["code"], "conflict");
    let rename = send(
        &app,
        Method::PATCH,
        "/api/v1/admin/providers/lit",
        json!({ "name": "groq" }),
    )
    .await;
    assert_status(&rename, 409);

    assert_invalid(
        &send(
            &app,
            Method::PATCH,
            "/api/v1/admin/providers/groq",
            json!({ "active": "yes" }),
        )
        .await,
        "active",
    );
    assert_invalid(
        &send(
            &app,
            Method::PUT,
            "/api/v1/admin/providers/groq/rate-limits",
            json!({ "rpm": -1 }),
        )
        .await,
        "rpm",
    );
    assert_status(
        &send(
            &app,
            Method::PATCH,
            "/api/v1/admin/providers/nope",
            json!({}),
        )
        .await,
        404,
    );
    assert_status(
        &send(
            &app,
            Method::PUT,
            "/api/v1/admin/providers/nope/rate-limits",
            json!({}),
        )
        .await,
        404,
    );
}

// ------------------------------------------------------------------------------------------------
// Accounts
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn accounts_are_created_read_changed_and_deleted_with_an_audit_trail() {
    let h = Harness::start().await;
    let app = app!(h);

    let created = send(
        &app,
        Method::POST,
        "/api/v1/admin/accounts",
        json!({ "name": "groq-2", "provider": "groq", "api_key": "sk-new-account-key-a1b2", "quota_limit": 5000, "expires_at": "2099-01-01T00:00:00Z", "rate_limits": { "rpm": 3 } }),
    )
    .await;
    assert_status(&created, 201);
    let a = created.json();
    let id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["name"], "groq-2");
    assert_eq!(a["provider"], "groq");
    assert_eq!(a["api_key_hint"], "…a1b2");
    assert_eq!(a["quota_limit"], 5000);
    assert_eq!(a["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(a["rate_limits"], json!({ "rpm": 3 }));
    assert_eq!(a["status"]["available"], true);
    assert_eq!(a["status"]["limit"], 5000);
    assert_eq!(a["source"], "api");
    // The runtime serves it at once, with its override.
    let windows = h.state.runtime.rate_stats(&id).await.unwrap();
    assert_eq!(
        windows
            .iter()
            .find(|w| w.limit_type == "rpm")
            .unwrap()
            .limit,
        3
    );

    // By id, `provider/name` or unique name; the list has both accounts.
    for reference in [id.as_str(), "groq%2Fgroq-2", "groq-2"] {
        let one = get(&app, &format!("/api/v1/admin/accounts/{reference}")).await;
        assert_status(&one, 200);
        assert_eq!(one.json()["id"], json!(id));
    }
    let list = get(&app, "/api/v1/admin/accounts").await;
    assert_eq!(list.json().as_array().unwrap().len(), 2);
    let filtered = get(&app, "/api/v1/admin/accounts?provider=groq").await;
    assert_eq!(filtered.json().as_array().unwrap().len(), 2);
    assert_status(
        &get(&app, "/api/v1/admin/accounts?provider=nope").await,
        404,
    );

    // Errors.
    let dup = send(
        &app,
        Method::POST,
        "/api/v1/admin/accounts",
        json!({ "name": "groq-2", "provider": "groq", "api_key": "sk-x-123456789" }),
    )
    .await;
    assert_status(&dup, 409);
    assert_status(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "provider": "nope", "api_key": "sk-x-123456789" }),
        )
        .await,
        404,
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "api_key": "k" }),
        )
        .await,
        "provider",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "provider": "groq" }),
        )
        .await,
        "api_key",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "provider": "groq", "api_key": "k", "quota_limit": -1 }),
        )
        .await,
        "quota_limit",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "provider": "groq", "api_key": "k", "expires_at": "tomorrow" }),
        )
        .await,
        "expires_at",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "z", "provider": "groq", "api_key": "k", "rate_limits": { "rpm": 0 } }),
        )
        .await,
        "rate_limits.rpm",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/accounts",
            json!({ "name": "a/b", "provider": "groq", "api_key": "k" }),
        )
        .await,
        "name",
    );
    assert_invalid(
        &send(
            &app,
            Method::PATCH,
            &format!("/api/v1/admin/accounts/{id}"),
            json!({ "name": "renamed" }),
        )
        .await,
        "name",
    );
    assert_invalid(
        &send(
            &app,
            Method::PATCH,
            &format!("/api/v1/admin/accounts/{id}"),
            json!({ "quota_limit": "lots" }),
        )
        .await,
        "quota_limit",
    );
    assert_status(
        &send(
            &app,
            Method::PATCH,
            "/api/v1/admin/accounts/nope",
            json!({}),
        )
        .await,
        404,
    );
    assert_status(&get(&app, "/api/v1/admin/accounts/nope").await, 404);

    // An ambiguous bare name is a 400 listing the candidates.
    send(
        &app,
        Method::POST,
        "/api/v1/admin/providers",
        json!({ "name": "other", "base_url": "http://x" }),
    )
    .await;
    let twin = send(
        &app,
        Method::POST,
        "/api/v1/admin/accounts",
        json!({ "name": "groq-2", "provider": "other", "api_key": "sk-twin-123456789" }),
    )
    .await;
    assert_status(&twin, 201);
    let ambiguous = get(&app, "/api/v1/admin/accounts/groq-2").await;
    assert_eq!(ambiguous.status, 400, "{ambiguous}");
    assert!(
        ambiguous.body.contains("groq/groq-2") && ambiguous.body.contains("other/groq-2"),
        "{ambiguous}"
    );

    // Change, expiry removed.
    let patched = send(
        &app,
        Method::PATCH,
        "/api/v1/admin/accounts/groq%2Fgroq-2",
        json!({ "quota_limit": 7000, "expires_at": null, "active": false }),
    )
    .await;
    assert_status(&patched, 200);
    let a = patched.json();
    assert_eq!(a["quota_limit"], 7000);
    assert_eq!(a["expires_at"], Value::Null);
    assert_eq!(a["active"], false);
    assert_eq!(a["rate_limits"], json!({ "rpm": 3 }));
    assert_eq!(a["status"]["available"], false);

    // Delete.
    assert_status(
        &call(
            &app,
            Method::DELETE,
            "/api/v1/admin/accounts/groq%2Fgroq-2",
            Some(ADMIN),
            None,
        )
        .await,
        204,
    );
    assert_status(
        &get(&app, &format!("/api/v1/admin/accounts/{id}")).await,
        404,
    );
    assert!(h.state.runtime.registry().account(&id).is_err());

    let trail = audit::list_for_account(&mut h.store().conn().unwrap(), &id).unwrap();
    let actions: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r.actor.as_str(), r.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("admin-api", "create"),
            ("admin-api", "update"),
            ("admin-api", "disable"),
            ("admin-api", "delete")
        ],
        "{trail:?}"
    );
}

#[actix_rt::test]
async fn an_account_change_reaches_the_runtime_at_once_without_losing_counters() {
    let h = Harness::start().await;
    let app = app!(h);
    let runtime = &h.state.runtime;
    runtime
        .consume_quota("groq/groq-1", "llama", 120)
        .await
        .unwrap();
    let before = runtime.status("groq/groq-1").await.unwrap();
    assert_eq!(before.current_usage, 120);
    let tpm_before = runtime
        .rate_stats("groq/groq-1")
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.limit_type == "tpm")
        .unwrap();

    let patched = send(
        &app,
        Method::PATCH,
        "/api/v1/admin/accounts/groq-1",
        json!({ "rate_limits": { "rpm": 2 }, "quota_limit": 500 }),
    )
    .await;
    assert_status(&patched, 200);
    assert_eq!(patched.json()["quota_used"], 120);

    let status = runtime.status("groq/groq-1").await.unwrap();
    assert_eq!(status.current_usage, 120, "the counter survived");
    assert_eq!(status.limit, 500);
    let windows = runtime.rate_stats("groq/groq-1").await.unwrap();
    assert_eq!(
        windows
            .iter()
            .find(|w| w.limit_type == "rpm")
            .unwrap()
            .limit,
        2
    );
    let tpm = windows.iter().find(|w| w.limit_type == "tpm").unwrap();
    assert_eq!(tpm.current, tpm_before.current, "window counters survived");

    // Disabled: unavailable at once, counters still there; enabled again: available.
    let off = send(
        &app,
        Method::PATCH,
        "/api/v1/admin/accounts/groq-1",
        json!({ "active": false }),
    )
    .await;
    assert_status(&off, 200);
    let status = runtime.status("groq/groq-1").await.unwrap();
    assert!(!status.available);
    assert_eq!(status.current_usage, 120);
    assert_eq!(
        runtime
            .pool_status("groq")
            .await
            .unwrap()
            .available_accounts,
        0
    );
    send(
        &app,
        Method::PATCH,
        "/api/v1/admin/accounts/groq-1",
        json!({ "active": true }),
    )
    .await;
    assert!(runtime.status("groq/groq-1").await.unwrap().available);

    // A new key is used upstream from now on; only its tail is shown.
    let rekeyed = send(&app, Method::PATCH, "/api/v1/admin/accounts/groq-1", json!({ "credentials": { "api_key": "sk-rotated-key-7777", "headers": { "X-Org": "org-1" } } })).await;
    assert_status(&rekeyed, 200);
    assert_eq!(rekeyed.json()["api_key_hint"], "…7777");
    let entry = runtime.registry().account("groq/groq-1").unwrap().clone();
    let creds = entry.credentials.as_ref().unwrap();
    assert_eq!(creds.api_key.expose(), "sk-rotated-key-7777");
    assert_eq!(creds.headers["X-Org"].expose(), "org-1");
    assert_eq!(
        runtime.status("groq/groq-1").await.unwrap().current_usage,
        120
    );

    // Resets.
    let reset = call(
        &app,
        Method::POST,
        "/api/v1/admin/accounts/groq-1/reset",
        Some(ADMIN),
        None,
    )
    .await;
    assert_status(&reset, 200);
    assert_eq!(reset.json()["status"]["current_usage"], 0);
    runtime
        .consume_quota("groq/groq-1", "llama", 10)
        .await
        .unwrap();
    let reset = call(
        &app,
        Method::POST,
        "/api/v1/admin/providers/groq/reset",
        Some(ADMIN),
        None,
    )
    .await;
    assert_status(&reset, 200);
    assert_eq!(reset.json()["accounts_reset"], 1);
    assert_eq!(
        runtime.status("groq/groq-1").await.unwrap().current_usage,
        0
    );
    assert_status(
        &call(
            &app,
            Method::POST,
            "/api/v1/admin/accounts/nope/reset",
            Some(ADMIN),
            None,
        )
        .await,
        404,
    );
    assert_status(
        &call(
            &app,
            Method::POST,
            "/api/v1/admin/providers/nope/reset",
            Some(ADMIN),
            None,
        )
        .await,
        404,
    );

    let id = entry.id.to_string();
    let trail = audit::list_for_account(&mut h.store().conn().unwrap(), &id).unwrap();
    let resets = trail
        .iter()
        .filter(|r| r.action == "reset" && r.actor == "admin-api")
        .count();
    assert_eq!(resets, 2, "{trail:?}");
    let update = trail
        .iter()
        .find(|r| {
            r.details
                .as_deref()
                .is_some_and(|d| d.contains("credentials"))
        })
        .unwrap();
    assert!(
        !update.details.as_deref().unwrap().contains("sk-rotated"),
        "{update:?}"
    );

    // Flush writes every account.
    let flushed = call(&app, Method::POST, "/api/v1/admin/flush", Some(ADMIN), None).await;
    assert_status(&flushed, 200);
    assert!(flushed.json()["accounts"].as_u64().is_some());
}

#[actix_rt::test]
async fn secrets_appear_in_no_admin_answer() {
    let h = Harness::start().await;
    let app = app!(h);
    let key = "sk-very-secret-account-key-0042";
    let header = "org-header-secret-9999";
    let mut bodies = Vec::new();
    let created = send(
        &app,
        Method::POST,
        "/api/v1/admin/accounts",
        json!({ "name": "sec", "provider": "groq", "credentials": { "api_key": key, "headers": { "X-Org": header } } }),
    )
    .await;
    assert_status(&created, 201);
    bodies.push(created.body.clone());
    bodies.push(
        send(
            &app,
            Method::PATCH,
            "/api/v1/admin/accounts/sec",
            json!({ "api_key": "sk-another-secret-5555" }),
        )
        .await
        .body,
    );
    bodies.push(
        send(
            &app,
            Method::PATCH,
            "/api/v1/admin/accounts/sec",
            json!({ "api_key": key, "quota_limit": "x" }),
        )
        .await
        .body,
    );
    for path in [
        "/api/v1/admin/accounts",
        "/api/v1/admin/accounts/sec",
        "/api/v1/admin/accounts/groq-1",
        "/api/v1/admin/providers",
        "/api/v1/admin/providers/groq",
        "/api/v1/admin/keys",
        "/api/v1/stats/pool/groq",
        "/api/v1/stats/quota/sec",
        "/openapi.json",
    ] {
        let resp = get(&app, path).await;
        assert_status(&resp, 200);
        bodies.push(resp.body);
    }
    for body in &bodies {
        for secret in [key, header, "sk-another-secret-5555", CONFIG_SECRET] {
            assert!(!body.contains(secret), "a secret in an answer: {body}");
        }
    }
    assert!(bodies[0].contains("…0042"));
}

// ------------------------------------------------------------------------------------------------
// Keys and auth
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_key_created_works_at_once_and_a_revoked_one_is_refused_at_once() {
    let h = Harness::start().await;
    let app = app!(h);

    assert_status(
        &call(&app, Method::GET, "/api/v1/admin/providers", None, None).await,
        401,
    );
    assert_status(
        &call(
            &app,
            Method::GET,
            "/api/v1/admin/providers",
            Some("wrong"),
            None,
        )
        .await,
        401,
    );

    let created = send(
        &app,
        Method::POST,
        "/api/v1/admin/keys",
        json!({ "name": "alice-laptop", "user": "alice" }),
    )
    .await;
    assert_status(&created, 201);
    let k = created.json();
    let key = k["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("qg_"));
    assert_eq!(k["user"], "alice");
    let user_id = k["user_id"].as_str().unwrap().to_string();

    // Usable at once, for its own usage only.
    let own = call(&app, Method::GET, "/api/v1/stats/usage", Some(&key), None).await;
    assert_status(&own, 200);
    assert_eq!(own.json()["user_id"], json!(user_id));
    let by_name = call(
        &app,
        Method::GET,
        "/api/v1/stats/usage?user_id=alice",
        Some(&key),
        None,
    )
    .await;
    assert_status(&by_name, 200);
    let other = call(
        &app,
        Method::GET,
        "/api/v1/stats/usage?user_id=bob",
        Some(&key),
        None,
    )
    .await;
    assert_status(&other, 403);
    // Not an admin.
    assert_status(
        &call(&app, Method::GET, "/api/v1/admin/keys", Some(&key), None).await,
        401,
    );
    assert_status(
        &call(
            &app,
            Method::GET,
            "/api/v1/stats/pool/groq",
            Some(&key),
            None,
        )
        .await,
        401,
    );

    // The list never shows the key.
    let list = get(&app, "/api/v1/admin/keys").await;
    assert_status(&list, 200);
    assert!(!list.body.contains(&key));
    assert_eq!(list.json()[0]["name"], "alice-laptop");
    assert_eq!(list.json()[0]["active"], true);

    // Default user: the key's name. Duplicates: 409. Bad bodies: 400.
    let solo = send(
        &app,
        Method::POST,
        "/api/v1/admin/keys",
        json!({ "name": "solo" }),
    )
    .await;
    assert_eq!(solo.json()["user"], "solo");
    assert_status(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/keys",
            json!({ "name": "solo" }),
        )
        .await,
        409,
    );
    assert_invalid(
        &send(&app, Method::POST, "/api/v1/admin/keys", json!({})).await,
        "name",
    );
    assert_invalid(
        &send(
            &app,
            Method::POST,
            "/api/v1/admin/keys",
            json!({ "name": "x", "extra": 1 }),
        )
        .await,
        "extra",
    );

    // Revoked: refused at once.
    let revoked = call(
        &app,
        Method::DELETE,
        &format!("/api/v1/admin/keys/{}", k["id"].as_str().unwrap()),
        Some(ADMIN),
        None,
    )
    .await;
    assert_status(&revoked, 204);
    assert_status(
        &call(&app, Method::GET, "/api/v1/stats/usage", Some(&key), None).await,
        401,
    );
    let list = get(&app, "/api/v1/admin/keys").await;
    assert_eq!(list.json()[0]["active"], false);
    assert_status(
        &call(
            &app,
            Method::DELETE,
            "/api/v1/admin/keys/nope",
            Some(ADMIN),
            None,
        )
        .await,
        404,
    );
}

// ------------------------------------------------------------------------------------------------
// Stats
// ------------------------------------------------------------------------------------------------

fn log_row(
    provider_id: &str,
    user_id: &str,
    model: &str,
    ts: DateTime<Utc>,
    success: bool,
) -> NewRequestLog {
    NewRequestLog {
        request_id: uuid::Uuid::new_v4().to_string(),
        ts: ts.naive_utc(),
        provider_id: provider_id.to_string(),
        account_id: None,
        model: model.to_string(),
        user_id: Some(user_id.to_string()),
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        status_code: if success { 200 } else { 502 },
        latency_ms: 100,
        input_tokens: 10,
        output_tokens: 5,
        success,
        error_type: (!success).then(|| "upstream_error".to_string()),
        error_message: (!success).then(|| "bad gateway".to_string()),
        estimated_cost: 0.001,
    }
}

#[actix_rt::test]
async fn stats_answer_the_api_fields_by_id_or_name() {
    let h = Harness::start().await;
    let app = app!(h);
    let provider_id = h
        .state
        .runtime
        .registry()
        .provider("groq")
        .unwrap()
        .spec
        .id
        .to_string();
    let account_id = h
        .state
        .runtime
        .registry()
        .account("groq-1")
        .unwrap()
        .id
        .to_string();
    h.state
        .runtime
        .consume_quota(&account_id, "llama", 250)
        .await
        .unwrap();

    let alice = send(
        &app,
        Method::POST,
        "/api/v1/admin/keys",
        json!({ "name": "a", "user": "alice" }),
    )
    .await
    .json();
    let bob = send(
        &app,
        Method::POST,
        "/api/v1/admin/keys",
        json!({ "name": "b", "user": "bob" }),
    )
    .await
    .json();
    let now = Utc::now();
    let rows = vec![
        log_row(
            &provider_id,
            alice["user_id"].as_str().unwrap(),
            "llama",
            now - chrono::Duration::minutes(5),
            true,
        ),
        log_row(
            &provider_id,
            alice["user_id"].as_str().unwrap(),
            "llama",
            now - chrono::Duration::minutes(4),
            false,
        ),
        log_row(
            &provider_id,
            bob["user_id"].as_str().unwrap(),
            "big",
            now - chrono::Duration::minutes(3),
            true,
        ),
        log_row(
            &provider_id,
            bob["user_id"].as_str().unwrap(),
            "big",
            now - chrono::Duration::days(3),
            true,
        ),
    ];
    rollup::record_batch(&mut h.store().conn().unwrap(), &rows).unwrap();

    // Usage: everyone (admin), one user (admin), own (client key).
    let all = get(&app, "/api/v1/stats/usage").await;
    assert_status(&all, 200);
    let u = all.json();
    for field in [
        "total_requests",
        "successful_requests",
        "success_rate",
        "total_input_tokens",
        "total_output_tokens",
        "total_cost",
        "avg_latency_ms",
        "period",
    ] {
        assert!(u.get(field).is_some(), "no {field}: {u}");
    }
    assert_eq!(u["total_requests"], 3);
    assert_eq!(u["successful_requests"], 2);
    assert!(DateTime::parse_from_rfc3339(u["period"]["from"].as_str().unwrap()).is_ok());
    let for_bob = get(&app, "/api/v1/stats/usage?user_id=bob").await;
    assert_eq!(for_bob.json()["total_requests"], 1);
    let alice_own = call(
        &app,
        Method::GET,
        "/api/v1/stats/usage",
        Some(alice["key"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(alice_own.json()["total_requests"], 2);
    let week = get(
        &app,
        &format!(
            "/api/v1/stats/usage?from={}",
            (now - chrono::Duration::days(7))
                .to_rfc3339()
                .replace('+', "%2B")
        ),
    )
    .await;
    assert_eq!(week.json()["total_requests"], 4, "{week}");
    assert_status(&get(&app, "/api/v1/stats/usage?user_id=nobody").await, 404);

    // Dates.
    assert_invalid(
        &get(&app, "/api/v1/stats/usage?from=yesterday").await,
        "from",
    );
    assert_invalid(
        &get(&app, "/api/v1/stats/usage?to=2026-13-01T00:00:00Z").await,
        "to",
    );
    assert_invalid(
        &get(
            &app,
            "/api/v1/stats/usage?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
        )
        .await,
        "from",
    );
    assert_invalid(
        &get(&app, "/api/v1/stats/providers/groq?from=nope").await,
        "from",
    );
    assert_invalid(
        &get(
            &app,
            "/api/v1/stats/errors/groq?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
        )
        .await,
        "from",
    );
    assert_invalid(&get(&app, "/api/v1/stats/models/top?to=x").await, "to");
    assert_invalid(
        &get(&app, "/api/v1/stats/models/top?limit=0").await,
        "limit",
    );
    assert_invalid(
        &get(&app, "/api/v1/stats/models/top?limit=ten").await,
        "limit",
    );

    // Pool, by name and id.
    for reference in ["groq", provider_id.as_str()] {
        let pool = get(&app, &format!("/api/v1/stats/pool/{reference}")).await;
        assert_status(&pool, 200);
        let p = pool.json();
        assert_eq!(p["provider_id"], json!(provider_id));
        assert_eq!(p["total_accounts"], 1);
        assert_eq!(p["available_accounts"], 1);
        let member = &p["accounts_status"][0];
        for field in [
            "account_id",
            "active",
            "available",
            "quota_used",
            "quota_limit",
            "usage_percent",
        ] {
            assert!(member.get(field).is_some(), "no {field}: {member}");
        }
        assert_eq!(member["quota_used"], 250);
        assert_eq!(member["quota_limit"], 1000);
    }
    assert_status(&get(&app, "/api/v1/stats/pool/nope").await, 404);

    // Quota, by id, provider/name or name.
    for reference in [account_id.as_str(), "groq%2Fgroq-1", "groq-1"] {
        let quota = get(&app, &format!("/api/v1/stats/quota/{reference}")).await;
        assert_status(&quota, 200);
        let q = quota.json();
        assert_eq!(q["available"], true);
        assert_eq!(q["current_usage"], 250);
        assert_eq!(q["limit"], 1000);
        assert_eq!(q["usage_percent"], 25.0);
        assert!(
            DateTime::parse_from_rfc3339(q["reset_at"].as_str().unwrap()).is_ok(),
            "{q}"
        );
    }
    assert_status(&get(&app, "/api/v1/stats/quota/nope").await, 404);

    // Rate limits.
    let rl = get(&app, "/api/v1/stats/ratelimit/groq-1").await;
    assert_status(&rl, 200);
    let windows = rl.json();
    let tpm = windows
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["limit_type"] == "tpm")
        .expect("tpm");
    assert_eq!(tpm["limit"], 6000);
    assert_eq!(tpm["current"], 250);
    assert!(
        DateTime::parse_from_rfc3339(tpm["window_start"].as_str().unwrap()).is_ok(),
        "{tpm}"
    );
    assert!(tpm["retry_after"].as_f64().is_some());
    assert_status(&get(&app, "/api/v1/stats/ratelimit/nope").await, 404);

    // Provider history, by name and id.
    for reference in ["groq", provider_id.as_str()] {
        let ps = get(&app, &format!("/api/v1/stats/providers/{reference}")).await;
        assert_status(&ps, 200);
        let p = ps.json();
        assert_eq!(p["provider_id"], json!(provider_id));
        assert_eq!(p["total_requests"], 3);
        assert_eq!(p["unique_users"], 2);
        assert_eq!(p["total_tokens"], 45);
    }
    assert_status(&get(&app, "/api/v1/stats/providers/nope").await, 404);

    // Top models.
    let top = get(&app, "/api/v1/stats/models/top?limit=1").await;
    assert_status(&top, 200);
    assert_eq!(
        top.json(),
        json!([{ "model": "llama", "request_count": 2, "total_tokens": 30 }])
    );

    // Errors.
    let errors = get(&app, "/api/v1/stats/errors/groq").await;
    assert_status(&errors, 200);
    assert_eq!(errors.json()["total_errors"], 1);
    assert_eq!(errors.json()["errors_by_type"], json!({ "bad gateway": 1 }));
}

// ------------------------------------------------------------------------------------------------
// OpenAPI
// ------------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn the_openapi_document_lists_every_route_of_the_api() {
    let h = Harness::start().await;
    let app = app!(h);
    let doc = call(&app, Method::GET, "/openapi.json", None, None).await;
    assert_status(&doc, 200);
    let doc = doc.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let routes = [
        ("post", "/v1/chat/completions"),
        ("post", "/v1/embeddings"),
        ("get", "/v1/models"),
        ("get", "/api/v1/stats/usage"),
        ("get", "/api/v1/stats/pool/{provider_id}"),
        ("get", "/api/v1/stats/quota/{account_id}"),
        ("get", "/api/v1/stats/ratelimit/{account_id}"),
        ("get", "/api/v1/stats/providers/{provider_id}"),
        ("get", "/api/v1/stats/models/top"),
        ("get", "/api/v1/stats/errors/{provider_id}"),
        ("get", "/api/v1/admin/providers"),
        ("post", "/api/v1/admin/providers"),
        ("get", "/api/v1/admin/providers/{id}"),
        ("patch", "/api/v1/admin/providers/{id}"),
        ("delete", "/api/v1/admin/providers/{id}"),
        ("get", "/api/v1/admin/providers/{id}/rate-limits"),
        ("put", "/api/v1/admin/providers/{id}/rate-limits"),
        ("post", "/api/v1/admin/providers/{id}/reset"),
        ("get", "/api/v1/admin/accounts"),
        ("post", "/api/v1/admin/accounts"),
        ("get", "/api/v1/admin/accounts/{id}"),
        ("patch", "/api/v1/admin/accounts/{id}"),
        ("delete", "/api/v1/admin/accounts/{id}"),
        ("post", "/api/v1/admin/accounts/{id}/reset"),
        ("get", "/api/v1/admin/keys"),
        ("post", "/api/v1/admin/keys"),
        ("delete", "/api/v1/admin/keys/{id}"),
        ("post", "/api/v1/admin/flush"),
        ("get", "/metrics"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/openapi.json"),
        // The status page (issue 11).
        ("get", "/"),
        ("get", "/status/live"),
        ("post", "/login"),
        ("post", "/logout"),
        ("get", "/api/v1/status"),
    ];
    for (method, path) in routes {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }
    let listed: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                .count()
        })
        .sum();
    assert_eq!(
        listed,
        routes.len(),
        "the document lists routes the API does not have"
    );
    // The answers are described by schemas, the path parameters are declared.
    assert!(doc["components"]["schemas"]["AccountView"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
    let params = &doc["paths"]["/api/v1/admin/accounts/{id}"]["get"]["parameters"];
    assert_eq!(params.as_array().unwrap().len(), 1, "{params}");
    assert_eq!(params[0]["name"], "id");
}
