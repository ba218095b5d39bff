//! A gateway for the status page, the status CLI and the dashboard tests: the real binary on the
//! shipped defaults (no providers in the file), with one provider and three accounts added through
//! the admin API in front of the mock upstream, as an operator would.
//!
//! The quota resets once a year (`0 0 1 1 *`), so a forecast made from a few requests lands
//! before the reset (except in the last hours of a year); the tracker flushes every 200 ms.

use std::time::Duration;

use serde_json::{json, Value};

use super::app::{chat_body, eventually, Http, Resp, TestGateway};
use super::upstream::{MockUpstream, MOCK_MODEL};

/// The provider the fixture adds.
pub const PROVIDER: &str = "mockai";
/// Its accounts: `busy` and `idle` have a quota of [`QUOTA`] tokens, `spare` none.
pub const ACCOUNTS: [&str; 3] = ["busy", "idle", "spare"];
pub const QUOTA: u64 = 100_000;

/// The YAML every fixture starts from (before the caller's).
pub const BASE_YAML: &str =
    "quota: { reset_cron: \"0 0 1 1 *\" }\ntracking: { flush_interval: 200ms }\n";

/// The running gateway, its mock upstream and a client.
pub struct StatusFixture {
    pub gw: TestGateway,
    pub mock: MockUpstream,
    pub http: Http,
    /// The provider's id.
    pub provider_id: String,
}

impl StatusFixture {
    /// Starts the gateway (defaults + [`BASE_YAML`] + `extra`) and adds the provider and its
    /// accounts through the admin API.
    pub async fn start(extra: &str) -> StatusFixture {
        let mock = MockUpstream::start();
        let gw = TestGateway::start(&format!("{BASE_YAML}{extra}"));
        let http = Http::new();
        let created = http
            .post_json(
                &format!("{}/api/v1/admin/providers", gw.url()),
                Some(gw.admin_token()),
                &json!({
                    "name": PROVIDER,
                    "base_url": mock.base_url(),
                    "strategy": "round_robin",
                    "models": [MOCK_MODEL],
                    "rate_limits": { "rpm": 1000, "tpd": 5_000_000 },
                }),
            )
            .await;
        assert_eq!(created.status, 201, "{created}");
        let provider_id = created.json()["id"].as_str().unwrap().to_string();
        for (name, quota) in [("busy", QUOTA), ("idle", QUOTA), ("spare", 0)] {
            let created = http
                .post_json(
                    &format!("{}/api/v1/admin/accounts", gw.url()),
                    Some(gw.admin_token()),
                    &json!({
                        "name": name,
                        "provider": PROVIDER,
                        "api_key": format!("sk-status-{name}-0123456789"),
                        "quota_limit": quota,
                    }),
                )
                .await;
            assert_eq!(created.status, 201, "{created}");
        }
        StatusFixture {
            gw,
            mock,
            http,
            provider_id,
        }
    }

    /// The gateway's URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gw.url())
    }

    /// `GET path` with the admin token.
    pub async fn admin_get(&self, path: &str) -> Resp {
        self.http
            .get(&self.url(path), Some(self.gw.admin_token()))
            .await
    }

    /// Sends `n` chat requests with the client key; each must succeed.
    pub async fn chat(&self, n: usize) {
        for _ in 0..n {
            let r = self
                .http
                .post_json(
                    &self.url("/v1/chat/completions"),
                    Some(self.gw.client_key()),
                    &chat_body(&format!("{PROVIDER}/{MOCK_MODEL}"), "hello"),
                )
                .await;
            assert_eq!(r.status, 200, "{r}");
        }
    }

    /// `GET /api/v1/stats/pool/{provider}`.
    pub async fn pool_stats(&self) -> Value {
        let r = self
            .admin_get(&format!("/api/v1/stats/pool/{PROVIDER}"))
            .await;
        assert_eq!(r.status, 200, "{r}");
        r.json()
    }

    /// Waits until the request log holds `n` rows (the tracker writes in batches).
    pub async fn wait_for_logged(&self, n: i64) {
        let logged = eventually(Duration::from_secs(15), async || {
            let r = self.admin_get("/api/v1/stats/usage").await;
            (r.json()["total_requests"].as_i64() >= Some(n)).then_some(())
        })
        .await;
        assert!(logged.is_some(), "the request log never held {n} rows");
    }
}
