//! Catalog specs for tests that drive the runtime directly (no store, no config file).

use std::sync::Arc;
use std::time::Duration;

use quotagate::actors::catalog::{MemberSpec, ModelSpec, ProviderSpec, Upstream};
use quotagate::domain::account::AccountSpec;
use quotagate::domain::schedule::Schedule;
use quotagate::domain::{LimitKind, LimitSpec, NamedLimit, Strategy, Tokenizer};

/// The one model every provider of these specs serves.
pub const MODEL: &str = "m";

pub fn limit(kind: LimitKind, limit: u64, per_secs: Option<u64>) -> LimitSpec {
    LimitSpec {
        kind,
        limit,
        per: per_secs.map(Duration::from_secs),
        reset: None,
    }
}

pub fn account(id: &str, quota_limit: u64, limits: Vec<LimitSpec>) -> MemberSpec {
    MemberSpec {
        name: Arc::from(id),
        spec: AccountSpec {
            id: Arc::from(id),
            active: true,
            disabled_reason: None,
            expires_at: None,
            quota_limit,
            quota_used: 0,
            quota_schedule: Schedule::daily_utc(),
            warning_threshold: 0.8,
            limits: limits.into_iter().map(|l| (None, l)).collect(),
            header_requests: Some(NamedLimit::Rpm),
            header_tokens: None,
        },
        credentials: None,
    }
}

pub fn provider(name: &str, strategy: Strategy, accounts: Vec<MemberSpec>) -> ProviderSpec {
    ProviderSpec {
        id: Arc::from(format!("id-{name}")),
        name: Arc::from(name),
        active: true,
        strategy,
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
        accounts,
    }
}
