//! Admin bodies read **by the config file's own reader**: a provider body as `providers[0]` of a
//! config, an account body as an account of a placeholder provider, limits as a provider's
//! `rate_limits`. The API then accepts exactly what `config.yaml` accepts and refuses the same
//! mistakes with the same words; the key at fault, relative to the body, becomes `param`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::{AccountConfig, Config, ProviderConfig, RateLimitsConfig};
use crate::http::error::ApiError;
use crate::http::extract::field_of;

/// A provider declaration, read and checked as `providers[0]` of a config file.
pub(super) fn declared_provider(body: Value) -> Result<ProviderConfig, ApiError> {
    through_config(json!({ "providers": [body] }), "providers[0]")?
        .providers
        .pop()
        .ok_or_else(|| ApiError::Internal("the provider was lost while reading".into()))
}

/// An account declaration, read and checked as an account of a placeholder provider.
pub(super) fn declared_account(body: Value) -> Result<AccountConfig, ApiError> {
    let tree = json!({ "providers": [{
        "name": "provider",
        "base_url": "http://provider.invalid",
        "accounts": [body],
    }]});
    through_config(tree, "providers[0].accounts[0]")?
        .providers
        .pop()
        .and_then(|mut p| p.accounts.pop())
        .ok_or_else(|| ApiError::Internal("the account was lost while reading".into()))
}

/// A set of limits, read and checked as a provider's `rate_limits`.
pub(super) fn declared_limits(body: Value) -> Result<RateLimitsConfig, ApiError> {
    let tree = json!({ "providers": [{
        "name": "provider",
        "base_url": "http://provider.invalid",
        "rate_limits": body,
    }]});
    through_config(tree, "providers[0].rate_limits")?
        .providers
        .pop()
        .map(|p| p.rate_limits)
        .ok_or_else(|| ApiError::Internal("the limits were lost while reading".into()))
}

/// Reads `tree` with the config file's reader (no environment: nothing is overridden, and every
/// `$` is doubled so that `${…}` in a value stays literal text). The key at fault, relative to
/// `prefix`, becomes `param`.
fn through_config(mut tree: Value, prefix: &str) -> Result<Config, ApiError> {
    escape_dollars(&mut tree);
    Config::from_yaml(
        &tree.to_string(),
        Path::new("request-body"),
        &BTreeMap::new(),
    )
    .map_err(|e| {
        let param = match e.key.strip_prefix(prefix) {
            Some("") => field_of(&e.problem),
            Some(rest) => Some(rest.trim_start_matches('.').to_string()),
            None => None,
        };
        ApiError::invalid(e.problem, param.as_deref())
    })
}

fn escape_dollars(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('$') => *s = s.replace('$', "$$"),
        Value::Array(items) => items.iter_mut().for_each(escape_dollars),
        Value::Object(map) => map.values_mut().for_each(escape_dollars),
        _ => {}
    }
}
