//! What the runtime serves: providers with their upstream settings, models, and accounts with
//! their effective limits and (decrypted, in memory only) credentials. Built from the store, or
//! directly by tests and embedders.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Credentials;
use crate::domain::account::{AccountSpec, Limits};
use crate::domain::limits::{apply_overrides, LimitSpec, NamedLimit};
use crate::domain::schedule::Schedule;
use crate::domain::{Strategy, Tokenizer};
use crate::manage::open_credentials;
use crate::secrets::MasterKey;
use crate::store::{accounts, limits, providers, DbConn, StoreError};

/// How requests reach a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub base_url: String,
    pub auth_header: String,
    /// Empty: the bare key.
    pub auth_scheme: String,
    pub timeout: Option<Duration>,
    pub max_completion_tokens: u64,
    pub tokenizer: Tokenizer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: Arc<str>,
    /// Per million tokens.
    pub price_input: f64,
    pub price_output: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemberSpec {
    pub name: Arc<str>,
    pub spec: AccountSpec,
    /// `None` when the credentials could not be decrypted (the account is then inactive).
    pub credentials: Option<Arc<Credentials>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub active: bool,
    pub strategy: Strategy,
    pub upstream: Upstream,
    pub models: Vec<ModelSpec>,
    pub accounts: Vec<MemberSpec>,
}

impl ProviderSpec {
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| &*m.name == name)
    }
}

/// Settings every account shares.
#[derive(Debug, Clone)]
pub struct QuotaSettings {
    pub schedule: Schedule,
    pub warning_threshold: f64,
}

/// Reads every provider, model, limit and account from the store.
pub fn load(
    conn: &mut DbConn,
    key: &MasterKey,
    quota: &QuotaSettings,
) -> Result<Vec<ProviderSpec>, StoreError> {
    let mut limit_rows: HashMap<String, Vec<limits::RateLimitRow>> = HashMap::new();
    for row in limits::list_all(conn)? {
        limit_rows
            .entry(row.provider_id.clone())
            .or_default()
            .push(row);
    }
    let mut by_provider: HashMap<String, Vec<accounts::AccountRow>> = HashMap::new();
    for found in accounts::list(conn, None)? {
        by_provider
            .entry(found.account.provider_id.clone())
            .or_default()
            .push(found.account);
    }
    let mut specs = Vec::new();
    for p in providers::list(conn)? {
        let models = providers::list_models(conn, &p.id)?;
        let model_names: HashMap<&str, Arc<str>> = models
            .iter()
            .map(|m| (m.id.as_str(), Arc::from(m.name.as_str())))
            .collect();
        let rows = limit_rows.remove(&p.id).unwrap_or_default();
        let specs_of = |model: Option<&str>, account: Option<&str>| -> Vec<LimitSpec> {
            rows.iter()
                .filter(|r| r.model_id.as_deref() == model && r.account_id.as_deref() == account)
                .filter_map(|r| match r.spec() {
                    Ok(spec) => Some(spec),
                    Err(e) => {
                        log::error!(provider = p.name.as_str(); "ignoring a stored limit: {e}");
                        None
                    }
                })
                .collect()
        };
        let provider_limits = specs_of(None, None);
        let headers: Option<HeaderMap> = p
            .ratelimit_headers
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok());
        let mut members = Vec::new();
        // Accounts with the same effective limits share one copy of them.
        let mut shared: Vec<Limits> = Vec::new();
        for a in by_provider.remove(&p.id).unwrap_or_default() {
            let overrides = specs_of(None, Some(&a.id));
            let mut effective: Vec<(Option<Arc<str>>, LimitSpec)> =
                apply_overrides(provider_limits.clone(), &overrides)
                    .into_iter()
                    .map(|s| (None, s))
                    .collect();
            for m in &models {
                let model_overrides = specs_of(Some(&m.id), Some(&a.id));
                for s in apply_overrides(specs_of(Some(&m.id), None), &model_overrides) {
                    effective.push((model_names.get(m.id.as_str()).cloned(), s));
                }
            }
            let credentials = match open_credentials(key, &a) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    log::error!(account_id = a.id.as_str(), provider = p.name.as_str(); "account left inactive: {e}");
                    None
                }
            };
            let spec = AccountSpec {
                id: Arc::from(a.id.as_str()),
                active: a.active && p.active && credentials.is_some(),
                disabled_reason: if credentials.is_none() {
                    Some("credentials cannot be decrypted".into())
                } else if !p.active {
                    Some("provider inactive".into())
                } else {
                    a.disabled_reason.clone()
                },
                expires_at: a.expires_at.map(|t| t.and_utc().timestamp_millis()),
                quota_limit: u64::try_from(a.quota_limit).unwrap_or(0),
                quota_used: u64::try_from(a.quota_used).unwrap_or(0),
                quota_schedule: quota.schedule.clone(),
                warning_threshold: quota.warning_threshold,
                limits: match shared.iter().find(|l| ***l == *effective) {
                    Some(same) => same.clone(),
                    None => {
                        let limits: Limits = effective.into();
                        shared.push(limits.clone());
                        limits
                    }
                },
                header_requests: headers.as_ref().and_then(|h| h.requests),
                header_tokens: headers.as_ref().and_then(|h| h.tokens),
            };
            members.push(MemberSpec {
                name: Arc::from(a.name.as_str()),
                spec,
                credentials,
            });
        }
        specs.push(ProviderSpec {
            id: Arc::from(p.id.as_str()),
            name: Arc::from(p.name.as_str()),
            active: p.active,
            strategy: p.strategy.parse().unwrap_or_default(),
            upstream: Upstream {
                base_url: p.base_url.clone(),
                auth_header: p.auth_header.clone(),
                auth_scheme: p.auth_scheme.clone(),
                timeout: p
                    .timeout_ms
                    .map(|ms| Duration::from_millis(ms.max(0) as u64)),
                max_completion_tokens: u64::try_from(p.max_completion_tokens).unwrap_or(4096),
                tokenizer: p.tokenizer.parse().unwrap_or_default(),
            },
            models: models
                .iter()
                .map(|m| ModelSpec {
                    name: Arc::from(m.name.as_str()),
                    price_input: m.price_input,
                    price_output: m.price_output,
                })
                .collect(),
            accounts: members,
        });
    }
    Ok(specs)
}

/// The stored form of `ratelimit_headers`.
#[derive(Debug, serde::Deserialize)]
struct HeaderMap {
    requests: Option<NamedLimit>,
    tokens: Option<NamedLimit>,
}
