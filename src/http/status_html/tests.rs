use super::*;
use crate::status::{ErrorView, Hold, PoolForecast, QuotaFigures};

fn links() -> AssetLinks {
    AssetLinks {
        css: "/assets/status.css?v=1".into(),
        js: "/assets/status.js?v=1".into(),
    }
}

fn snapshot() -> Snapshot {
    let now: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
    Snapshot {
        generated_at: now,
        rate_span_minutes: 15,
        providers: vec![ProviderView {
            provider_id: "p1".into(),
            provider: "groq".into(),
            strategy: "least_used".into(),
            active: true,
            total_accounts: 1,
            available_accounts: 0,
            requests_per_minute: 1234,
            errors_per_minute: 2,
            requests_history: (0..60).collect(),
            errors_history: vec![1; 60],
            forecast: PoolForecast {
                quota_exhausts_at: Some(now + chrono::Duration::minutes(90)),
                windows: Vec::new(),
            },
            accounts: vec![AccountView {
                account_id: "a1".into(),
                account: "<script>alert(1)</script>".into(),
                state: AccountState::CoolingDown,
                reason: Some("cooldown".into()),
                cooldown: Some(Hold {
                    until: now + chrono::Duration::seconds(30),
                    why: "the upstream answered 429 (rate limited)".into(),
                }),
                circuit_open_until: None,
                quota: QuotaFigures {
                    used: 1500,
                    limit: 2000,
                    usage_percent: 75.0,
                    reset_at: now + chrono::Duration::hours(12),
                    exhausts_at: Some(now + chrono::Duration::hours(1)),
                },
                windows: vec![WindowFigures {
                    limit_type: "rpm".into(),
                    limit: 30,
                    current: 30,
                    in_flight: 1,
                    usage_percent: 100.0,
                    retry_after: 1.5,
                    resets_at: None,
                    exhausts_at: None,
                }],
                in_flight: 1,
                requests_per_minute: 2.0,
                tokens_per_minute: 100.0,
                last_error: Some(ErrorView {
                    at: now - chrono::Duration::minutes(1),
                    status: Some(502),
                    error_type: Some("upstream_error".into()),
                    message: "bad <gateway> & co".into(),
                }),
            }],
        }],
    }
}

#[test]
fn text_from_data_is_escaped() {
    assert_eq!(
        esc(r#"<a href="x">'&'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
    let html = fragment(&snapshot());
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("bad &lt;gateway&gt; &amp; co"));
}

#[test]
fn the_fragment_shows_pools_accounts_quota_windows_and_trouble() {
    let html = fragment(&snapshot());
    for expected in [
        "data-provider=\"groq\"",
        "data-state=\"cooling_down\"",
        "data-quota-used=\"1500\"",
        "1,500 / 2,000 tokens · 75.0 %",
        "the upstream answered 429 (rate limited)",
        "(in 30 s)",
        "runs out <time",
        "data-window=\"rpm\"",
        "full, frees in 1.5 s",
        "1,234",
        "502 bad",
        "class=\"fill ok\"",
        "class=\"fill full\"",
        "<figure class=\"chart\">",
    ] {
        assert!(html.contains(expected), "missing {expected}:\n{html}");
    }
    assert!(!html.contains("style="), "no inline styles (CSP)");
}

#[test]
fn the_login_form_shows_no_data() {
    let html = login(&links(), Some("That is not the admin token."));
    assert!(html.contains("<form method=\"post\" action=\"/login\">"));
    assert!(html.contains("type=\"password\""));
    assert!(html.contains("That is not the admin token."));
    assert!(!html.contains("<script"), "the login page needs no script");
    assert!(!html.contains("data-account"));
}

#[test]
fn the_page_loads_only_its_own_assets_and_offers_logout_to_sessions() {
    let html = page(&snapshot(), &links(), true);
    assert!(html.contains("<link rel=\"stylesheet\" href=\"/assets/status.css?v=1\">"));
    assert!(html.contains("<script src=\"/assets/status.js?v=1\" defer></script>"));
    assert!(html.contains("action=\"/logout\""));
    assert!(html.contains("data-live=\"/status/live\""));
    assert!(!page(&snapshot(), &links(), false).contains("/logout"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from elsewhere"
    );
}
