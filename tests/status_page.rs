//! The status page over HTTP (issue 11), against the real binary with a provider added through
//! the admin API: the login form and nothing else without the admin token, session cookies
//! (flags, expiry, logout, an admin-token rotation ending them), the page's content matching the
//! stats API, the exhaustion forecast in the pool stats and in `/metrics`, and `/api/v1/status`.
//! The browser drives the page in `tests/status_browser.rs`.

mod common;

use std::time::Duration;

use common::status::{StatusFixture, ACCOUNTS, PROVIDER, QUOTA};
use common::{eventually, Behavior, Resp};
use serde_json::Value;

/// `POST /login` with `token` as the form's field.
async fn login(f: &StatusFixture, token: &str) -> Resp {
    let body = format!("token={}", urlencode(token));
    f.http
        .send(
            "POST",
            &f.url("/login"),
            None,
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(body.as_bytes()),
        )
        .await
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `name=value` of a `Set-Cookie` header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_string()
}

async fn get_with_cookie(f: &StatusFixture, path: &str, cookie: &str) -> Resp {
    f.http
        .send("GET", &f.url(path), None, &[("cookie", cookie)], None)
        .await
}

async fn logged_in(f: &StatusFixture) -> String {
    let r = login(f, f.gw.admin_token()).await;
    assert_eq!(r.status, 303, "{r}");
    cookie_pair(r.header("set-cookie").expect("a session cookie"))
}

#[actix_rt::test]
async fn without_the_admin_token_the_page_is_a_login_form_and_nothing_else() {
    let f = StatusFixture::start("").await;
    f.chat(2).await;
    let page = f.http.get(&f.url("/"), None).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("action=\"/login\"") && html.contains("type=\"password\""));
    for secret in ACCOUNTS.iter().chain([&PROVIDER, &f.provider_id.as_str()]) {
        assert!(
            !html.contains(secret),
            "`{secret}` shown without the token:\n{html}"
        );
    }
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
    assert_eq!(page.header("cache-control"), Some("no-store"));

    // A wrong token, a client key, a forged cookie: still nothing.
    let wrong = login(&f, "not-the-token").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("That is not the admin token."));
    assert!(wrong.header("set-cookie").is_none());
    assert_eq!(login(&f, f.gw.client_key()).await.status, 401);
    for path in ["/status/live", "/api/v1/status"] {
        assert_eq!(f.http.get(&f.url(path), None).await.status, 401, "{path}");
        let client = f.http.get(&f.url(path), Some(f.gw.client_key())).await;
        assert_eq!(client.status, 401, "{path} with a client key");
        let forged = get_with_cookie(&f, path, "quotagate_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await;
        assert_eq!(forged.status, 401, "{path} with a forged cookie");
    }
    let forged = get_with_cookie(&f, "/", "quotagate_session=garbage").await;
    assert!(!forged.text().contains("busy"));
}

#[actix_rt::test]
async fn the_login_form_sets_an_httponly_samesite_strict_cookie_that_shows_the_pools() {
    let f = StatusFixture::start("").await;
    let r = login(&f, f.gw.admin_token()).await;
    assert_eq!(r.status, 303, "{r}");
    assert_eq!(r.header("location"), Some("/"));
    let set_cookie = r.header("set-cookie").unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.contains(flag), "{flag} missing: {set_cookie}");
    }
    let cookie = cookie_pair(set_cookie);
    assert!(
        !cookie.contains(f.gw.admin_token()),
        "the cookie is not the token"
    );

    let page = get_with_cookie(&f, "/", &cookie).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    for name in ACCOUNTS {
        assert!(
            html.contains(&format!("data-account=\"{name}\"")),
            "{name}:\n{html}"
        );
    }
    assert!(html.contains("action=\"/logout\""));
    assert!(!html.contains(f.gw.admin_token()) && !html.contains("sk-status-"));
    let live = get_with_cookie(&f, "/status/live", &cookie).await;
    assert_eq!(live.status, 200);
    assert!(live.text().contains("data-account=\"busy\""));

    // Another site's form cannot log a browser in.
    let foreign = f
        .http
        .send(
            "POST",
            &f.url("/login"),
            None,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", "http://evil.example"),
            ],
            Some(format!("token={}", urlencode(f.gw.admin_token())).as_bytes()),
        )
        .await;
    assert_eq!(foreign.status, 403);
    assert!(foreign.header("set-cookie").is_none());

    // Logging out ends the session.
    let out = f
        .http
        .send(
            "POST",
            &f.url("/logout"),
            None,
            &[("cookie", &cookie)],
            None,
        )
        .await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        get_with_cookie(&f, "/status/live", &cookie).await.status,
        401
    );
}

#[actix_rt::test]
async fn sessions_expire() {
    let f = StatusFixture::start("security: { session_ttl: 2s }\n").await;
    let cookie = logged_in(&f).await;
    assert_eq!(
        get_with_cookie(&f, "/status/live", &cookie).await.status,
        200
    );
    actix_rt::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        get_with_cookie(&f, "/status/live", &cookie).await.status,
        401
    );
    assert!(get_with_cookie(&f, "/", &cookie)
        .await
        .text()
        .contains("action=\"/login\""));
}

#[actix_rt::test]
async fn rotating_the_admin_token_ends_every_session() {
    let f = StatusFixture::start("").await;
    let cookie = logged_in(&f).await;
    assert_eq!(
        get_with_cookie(&f, "/status/live", &cookie).await.status,
        200
    );
    let rotated = f.gw.cli(&["admin-token", "rotate"]);
    assert!(rotated.status.success(), "{rotated:?}");
    let new_token = String::from_utf8_lossy(&rotated.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    // The server picks the new token up within a few seconds.
    let ended = eventually(Duration::from_secs(15), async || {
        (get_with_cookie(&f, "/status/live", &cookie).await.status == 401).then_some(())
    })
    .await;
    assert!(
        ended.is_some(),
        "the old session still works after the rotation"
    );
    let r = login(&f, &new_token).await;
    assert_eq!(r.status, 303, "the new token logs in: {r}");
}

#[actix_rt::test]
async fn the_page_and_the_status_json_agree_with_the_stats_api() {
    let f = StatusFixture::start("").await;
    f.chat(6).await;
    // Until the workers report, their leases' units count as in flight and move from one read to
    // the next: compare once two reads of the stats agree (an idle worker keeps nothing after two
    // report intervals).
    let mut stats = f.pool_stats().await;
    let quiet = eventually(Duration::from_secs(2), async || {
        actix_rt::time::sleep(Duration::from_millis(60)).await;
        let again = f.pool_stats().await;
        let same = again["accounts_status"] == stats["accounts_status"];
        stats = again;
        same.then_some(())
    })
    .await;
    assert!(quiet.is_some(), "the pool's figures keep moving: {stats}");
    let status = f.admin_get("/api/v1/status").await;
    assert_eq!(status.status, 200, "{status}");
    let status = status.json();
    let pool = &status["providers"][0];
    assert_eq!(pool["provider"], PROVIDER);
    assert_eq!(pool["total_accounts"], stats["total_accounts"]);
    assert_eq!(pool["available_accounts"], stats["available_accounts"]);
    // A bearer admin token shows the page too.
    let html = f.admin_get("/").await.text();
    for member in stats["accounts_status"].as_array().unwrap() {
        let name = member["account"].as_str().unwrap();
        let account = pool["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == name)
            .unwrap_or_else(|| panic!("{name} missing from /api/v1/status"));
        assert_eq!(account["quota"]["used"], member["quota_used"], "{name}");
        assert_eq!(account["quota"]["limit"], member["quota_limit"], "{name}");
        assert_eq!(account["state"], "active");
        let row = format!(
            "data-account=\"{name}\" data-account-id=\"{}\" data-state=\"active\" data-quota-used=\"{}\" data-quota-limit=\"{}\"",
            member["account_id"].as_str().unwrap(),
            member["quota_used"],
            member["quota_limit"]
        );
        assert!(html.contains(&row), "{row} not in the page:\n{html}");
    }
    let used: u64 = stats["accounts_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["quota_used"].as_u64().unwrap())
        .sum();
    assert!(used > 0, "the requests were counted: {stats}");
    // The per-minute history counts the requests once the tracker wrote them.
    f.wait_for_logged(6).await;
    let counted = eventually(Duration::from_secs(15), async || {
        let s = f.admin_get("/api/v1/status").await.json();
        (s["providers"][0]["requests_per_minute"] == 6).then_some(s)
    })
    .await
    .expect("six requests in the last minute");
    let history = counted["providers"][0]["requests_history"]
        .as_array()
        .unwrap();
    assert_eq!(history.len(), 60);
}

#[actix_rt::test]
async fn the_pool_stats_and_the_metrics_forecast_when_a_quota_runs_out() {
    let f = StatusFixture::start("").await;
    // 10,000 tokens a request: an account that served two has its quota forecast within the
    // hour, well before the yearly reset (so only the last hour of a year could fail this).
    f.mock.set_usage(None, 9000, 1000);
    f.chat(4).await;
    f.wait_for_logged(4).await;
    let stats = eventually(Duration::from_secs(15), async || {
        let s = f.pool_stats().await;
        let members = s["accounts_status"].as_array().unwrap().clone();
        members
            .iter()
            .any(|m| m["exhausts_at"].is_string())
            .then_some(s)
    })
    .await
    .expect("a forecast for the accounts that served");
    let now = chrono::Utc::now();
    for m in stats["accounts_status"].as_array().unwrap() {
        let name = m["account"].as_str().unwrap();
        let used = m["quota_used"].as_u64().unwrap();
        let reset: chrono::DateTime<chrono::Utc> = m["reset_at"].as_str().unwrap().parse().unwrap();
        match (name, &m["exhausts_at"]) {
            // No limit: never runs out.
            ("spare", at) => assert!(at.is_null(), "{m}"),
            (_, Value::String(at)) => {
                let at: chrono::DateTime<chrono::Utc> = at.parse().unwrap();
                assert!(used > 0, "{m}");
                assert!(at > now && at < reset, "{m}");
                // What it used, over the 15-minute span, is its rate.
                let left = (QUOTA - used) as f64 / (used as f64 / 15.0);
                let expected = now + chrono::Duration::seconds((left * 60.0) as i64);
                assert!(
                    (at - expected).num_seconds().abs() < 120,
                    "{m}: expected ~{expected}"
                );
            }
            (_, at) => assert!(
                at.is_null() && used == 0,
                "an account that served has a forecast: {m}"
            ),
        }
    }
    let metrics = f.http.get(&f.url("/metrics"), None).await.text();
    let busy_id = stats["accounts_status"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["exhausts_at"].is_string())
        .unwrap()["account_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("quotagate_quota_exhausts_in_seconds{") && l.contains(&busy_id)),
        "{metrics}"
    );
    assert!(metrics.contains("quotagate_account_info{account=\"busy\""));
}

#[actix_rt::test]
async fn a_cooling_account_says_until_when_and_why() {
    let f = StatusFixture::start("").await;
    f.mock.behave_all(Behavior::RateLimited { retry_after: 60 });
    let r = f
        .http
        .post_json(
            &f.url("/v1/chat/completions"),
            Some(f.gw.client_key()),
            &common::chat_body(&format!("{PROVIDER}/{}", common::MOCK_MODEL), "hi"),
        )
        .await;
    assert_eq!(r.status, 429, "{r}");
    let status = f.admin_get("/api/v1/status").await.json();
    let cooling: Vec<&Value> = status["providers"][0]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "cooling_down")
        .collect();
    assert!(!cooling.is_empty(), "{status}");
    for a in &cooling {
        assert!(
            a["cooldown"]["why"].as_str().unwrap().contains("429"),
            "{a}"
        );
        let until: chrono::DateTime<chrono::Utc> =
            a["cooldown"]["until"].as_str().unwrap().parse().unwrap();
        assert!(
            until > chrono::Utc::now() + chrono::Duration::seconds(30),
            "{a}"
        );
    }
    let html = f.admin_get("/status/live").await.text();
    assert!(html.contains("data-state=\"cooling_down\""));
    assert!(
        html.contains("the upstream answered 429 (rate limited)"),
        "{html}"
    );
}

#[actix_rt::test]
async fn the_assets_are_embedded_and_cacheable() {
    let f = StatusFixture::start("").await;
    let html = f.admin_get("/").await.text();
    for (prefix, kind) in [
        ("/assets/status.css?v=", "text/css"),
        ("/assets/status.js?v=", "text/javascript"),
    ] {
        let start = html
            .find(prefix)
            .unwrap_or_else(|| panic!("{prefix} not linked"));
        let link = &html[start..start + html[start..].find('"').unwrap()];
        let r = f.http.get(&f.url(link), None).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with(kind));
        assert!(r.header("cache-control").unwrap().contains("immutable"));
    }
}

#[actix_rt::test]
async fn the_openapi_document_has_the_status_routes_and_the_forecast() {
    let f = StatusFixture::start("").await;
    let doc = f.http.get(&f.url("/openapi.json"), None).await.json();
    for (method, path) in [
        ("get", "/"),
        ("get", "/status/live"),
        ("post", "/login"),
        ("post", "/logout"),
        ("get", "/api/v1/status"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["MemberView"]["properties"]["exhausts_at"].is_object());
    assert!(schemas["Snapshot"]["properties"]["providers"].is_object());
    assert!(schemas["QuotaFigures"]["properties"]["exhausts_at"].is_object());
    // The page's account and provider schemas do not replace the admin API's.
    assert!(schemas["StatusAccountView"]["properties"]["quota"].is_object());
    assert!(schemas["StatusProviderView"]["properties"]["accounts"].is_object());
    assert!(schemas["AccountView"]["properties"]["api_key_hint"].is_object());
    let usage = &doc["paths"]["/api/v1/stats/usage"]["get"]["parameters"];
    let from = usage
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "from")
        .unwrap();
    assert!(
        from["description"].as_str().unwrap().contains("date"),
        "{from}"
    );
}
