//! The `providers` section: declarative pools with their models, accounts and limits.
//!
//! Shorthands of the file are normalised while reading, so the rest of the program sees one shape:
//! a model given as a bare name becomes a [`ModelConfig`] with no price and no limits, and an
//! account's key given as `api_key: X` or as `credentials: {api_key: X, headers: …}` becomes
//! [`Credentials`] either way.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::codec;
use crate::domain::FixedReset;
use crate::domain::{LimitKind, LimitSpec, NamedLimit, Strategy, Tokenizer};
use crate::secrets::Secret;

/// One provider: an OpenAI-compatible upstream and the pool of accounts that call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Unique, non-empty, without `/` (clients may write `provider/model`).
    pub name: String,
    /// `http://…` or `https://…`, up to and including the API version (`…/openai/v1`).
    pub base_url: String,
    /// How the pool picks among accounts that have room.
    #[serde(default, with = "codec::from_str")]
    pub strategy: Strategy,
    /// How an account's key is sent upstream.
    #[serde(default)]
    pub auth: AuthConfig,
    /// This provider's request timeout, replacing `upstream.timeout`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "codec::option_duration"
    )]
    pub timeout: Option<Duration>,
    /// The completion bound used (and sent upstream) when a request sets none.
    #[serde(default = "default_max_completion_tokens")]
    pub max_completion_tokens: u64,
    /// How a prompt's size is estimated before it is sent.
    #[serde(default, with = "codec::from_str")]
    pub tokenizer: Tokenizer,
    /// Which windows the upstream's `x-ratelimit-*` headers describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratelimit_headers: Option<RateLimitHeaders>,
    /// Limits of each account, across all models.
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
}

fn default_max_completion_tokens() -> u64 {
    4096
}

/// How an account's key is sent: `<header>: <scheme> <key>`, or `<header>: <key>` when the scheme
/// is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub header: String,
    pub scheme: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            header: "Authorization".to_string(),
            scheme: "Bearer".to_string(),
        }
    }
}

/// Which of the account's windows the upstream's `x-ratelimit-remaining-requests` and
/// `x-ratelimit-remaining-tokens` headers describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitHeaders {
    /// A requests window: `rpm`, `rph` or `rpd`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "codec::option_named_window::deserialize"
    )]
    pub requests: Option<NamedLimit>,
    /// A tokens window: `tpm` or `tpd`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "codec::option_named_window::deserialize"
    )]
    pub tokens: Option<NamedLimit>,
}

/// A set of limits (of a provider, a model or an account). A limit left out is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<LimitValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rph: Option<LimitValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpd: Option<LimitValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<LimitValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpd: Option<LimitValue>,
    /// Requests in flight at once. A plain number: it has no window, so no reset either.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_concurrent"
    )]
    pub concurrent: Option<u64>,
    /// Windows other than the named ones, e.g. 5 requests per 2s.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowConfig>,
}

impl RateLimitsConfig {
    /// The named limits with their names, in a fixed order.
    pub(super) fn named(&self) -> [(NamedLimit, Option<&LimitValue>); 5] {
        [
            (NamedLimit::Rpm, self.rpm.as_ref()),
            (NamedLimit::Rph, self.rph.as_ref()),
            (NamedLimit::Rpd, self.rpd.as_ref()),
            (NamedLimit::Tpm, self.tpm.as_ref()),
            (NamedLimit::Tpd, self.tpd.as_ref()),
        ]
    }

    /// The limits as domain specs: the named ones (rpm, rph, rpd, tpm, tpd), then `concurrent`,
    /// then the custom windows. A fixed window's timezone defaults to UTC.
    pub fn specs(&self) -> Vec<LimitSpec> {
        let named = self.named().into_iter().filter_map(|(named, value)| {
            value.map(|v| LimitSpec {
                kind: named.kind(),
                limit: v.limit(),
                per: named.per(),
                reset: v.fixed_reset(),
            })
        });
        let concurrent = self.concurrent.map(|limit| LimitSpec {
            kind: LimitKind::Concurrent,
            limit,
            per: None,
            reset: None,
        });
        let windows = self.windows.iter().map(|w| LimitSpec {
            kind: w.kind,
            limit: w.limit,
            per: Some(w.per),
            reset: fixed_reset(w.reset.as_deref(), w.timezone.as_deref()),
        });
        named.chain(concurrent).chain(windows).collect()
    }

    /// These limits with `overrides` applied: a spec of `overrides` replaces the one of the same
    /// kind and window length (sliding or fixed alike), others are added. This is how an account's
    /// `rate_limits` override its provider's.
    pub fn specs_overridden_by(&self, overrides: &RateLimitsConfig) -> Vec<LimitSpec> {
        crate::domain::limits::apply_overrides(self.specs(), &overrides.specs())
    }

    /// No limit at all (everything unlimited).
    pub fn is_empty(&self) -> bool {
        self.named().iter().all(|(_, value)| value.is_none())
            && self.concurrent.is_none()
            && self.windows.is_empty()
    }
}

/// `concurrent: 10`. A map is refused with a reason rather than a type error, because people
/// write `{limit, reset}` here by analogy with the windows.
fn deserialize_concurrent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct ConcurrentVisitor;

    impl<'de> Visitor<'de> for ConcurrentVisitor {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number of requests in flight")
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map(Some)
                .map_err(|_| E::custom(format!("must not be negative (got {n})")))
        }

        fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom(
                "concurrent takes a plain number: it has no window, so no reset or timezone",
            ))
        }
    }

    d.deserialize_any(ConcurrentVisitor)
}

/// A named limit's value: `30` (sliding window) or `{limit: 14400, reset: "0 0 * * *",
/// timezone: America/Los_Angeles}` (fixed window that resets on a schedule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LimitValue {
    Plain(u64),
    Detailed {
        limit: u64,
        /// Five-field cron expression; without it the window slides.
        #[serde(skip_serializing_if = "Option::is_none")]
        reset: Option<String>,
        /// IANA timezone of `reset` (default UTC); only with `reset`.
        #[serde(skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
    },
}

impl LimitValue {
    pub fn limit(&self) -> u64 {
        match self {
            LimitValue::Plain(limit) | LimitValue::Detailed { limit, .. } => *limit,
        }
    }

    pub fn reset(&self) -> Option<&str> {
        match self {
            LimitValue::Plain(_) => None,
            LimitValue::Detailed { reset, .. } => reset.as_deref(),
        }
    }

    pub fn timezone(&self) -> Option<&str> {
        match self {
            LimitValue::Plain(_) => None,
            LimitValue::Detailed { timezone, .. } => timezone.as_deref(),
        }
    }

    fn fixed_reset(&self) -> Option<FixedReset> {
        fixed_reset(self.reset(), self.timezone())
    }
}

fn fixed_reset(reset: Option<&str>, timezone: Option<&str>) -> Option<FixedReset> {
    reset.map(|cron| FixedReset {
        cron: cron.to_string(),
        timezone: timezone.unwrap_or("UTC").to_string(),
    })
}

/// Hand-written rather than `#[serde(untagged)]`: an untagged enum reports only "did not match
/// any variant", while this names the problem (a negative number, an unknown key inside the map,
/// with its full path).
impl<'de> Deserialize<'de> for LimitValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Detailed {
            limit: u64,
            #[serde(default)]
            reset: Option<String>,
            #[serde(default)]
            timezone: Option<String>,
        }

        struct LimitVisitor;

        impl<'de> Visitor<'de> for LimitVisitor {
            type Value = LimitValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number, or a map with limit, reset and timezone")
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<LimitValue, E> {
                Ok(LimitValue::Plain(n))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<LimitValue, E> {
                u64::try_from(n)
                    .map(LimitValue::Plain)
                    .map_err(|_| E::custom(format!("must not be negative (got {n})")))
            }

            // The map access comes from the path-tracking deserializer, so errors inside the
            // map keep their full key path.
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LimitValue, A::Error> {
                let d = Detailed::deserialize(MapAccessDeserializer::new(map))?;
                Ok(LimitValue::Detailed {
                    limit: d.limit,
                    reset: d.reset,
                    timezone: d.timezone,
                })
            }
        }

        deserializer.deserialize_any(LimitVisitor)
    }
}

/// A window other than the named ones: `{kind: requests, limit: 5, per: 2s}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `requests` or `tokens` (`concurrent` has its own key).
    #[serde(with = "codec::from_str")]
    pub kind: LimitKind,
    pub limit: u64,
    #[serde(with = "codec::duration")]
    pub per: Duration,
    /// Five-field cron expression; without it the window slides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
    /// IANA timezone of `reset` (default UTC); only with `reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// A model a provider serves. In the file either a bare name or `{name, price?, rate_limits?}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub name: String,
    pub price: Price,
    /// Limits per account for this model, on top of the provider's.
    pub rate_limits: RateLimitsConfig,
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Detailed {
            name: String,
            #[serde(default)]
            price: Price,
            #[serde(default)]
            rate_limits: RateLimitsConfig,
        }

        struct ModelVisitor;

        impl<'de> Visitor<'de> for ModelVisitor {
            type Value = ModelConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a model name, or a map with name, price and rate_limits")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<ModelConfig, E> {
                Ok(ModelConfig {
                    name: name.to_string(),
                    price: Price::default(),
                    rate_limits: RateLimitsConfig::default(),
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ModelConfig, A::Error> {
                let d = Detailed::deserialize(MapAccessDeserializer::new(map))?;
                Ok(ModelConfig {
                    name: d.name,
                    price: d.price,
                    rate_limits: d.rate_limits,
                })
            }
        }

        deserializer.deserialize_any(ModelVisitor)
    }
}

/// Price in currency units per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// One account (API key) of a provider's pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AccountFile")]
pub struct AccountConfig {
    /// Unique within its provider.
    pub name: String,
    pub credentials: Credentials,
    /// Tokens per quota period; 0 = unlimited.
    pub quota_limit: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// `None` when the file does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Overrides of the provider's limits (see [`RateLimitsConfig::specs_overridden_by`]).
    pub rate_limits: RateLimitsConfig,
}

/// An account as written in the file, with its two ways of giving the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    name: String,
    #[serde(default)]
    api_key: Option<Secret>,
    #[serde(default)]
    credentials: Option<CredentialsFile>,
    #[serde(default)]
    quota_limit: u64,
    #[serde(default, deserialize_with = "codec::option_rfc3339::deserialize")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    rate_limits: RateLimitsConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    api_key: Option<Secret>,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
}

impl TryFrom<AccountFile> for AccountConfig {
    type Error = &'static str;

    fn try_from(file: AccountFile) -> Result<Self, Self::Error> {
        let credentials = match (file.api_key, file.credentials) {
            (Some(api_key), None) => Credentials {
                api_key,
                headers: BTreeMap::new(),
            },
            (
                None,
                Some(CredentialsFile {
                    api_key: Some(api_key),
                    headers,
                }),
            ) => Credentials { api_key, headers },
            (None, Some(CredentialsFile { api_key: None, .. })) => {
                return Err("credentials has no api_key");
            }
            (Some(_), Some(_)) => {
                return Err("give the key either as api_key or inside credentials, not both");
            }
            (None, None) => return Err("missing api_key (or credentials: {api_key: …})"),
        };
        Ok(AccountConfig {
            name: file.name,
            credentials,
            quota_limit: file.quota_limit,
            expires_at: file.expires_at,
            active: file.active,
            rate_limits: file.rate_limits,
        })
    }
}

/// What is sent upstream to authenticate an account: its key, plus any extra headers (an
/// organisation id, say). Serialises with `***` for every value; use [`Credentials::to_plain_json`]
/// to store it (encrypted) and [`Credentials::from_plain_json`] to read it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub api_key: Secret,
    /// Extra request headers, name → value.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

impl Credentials {
    /// JSON with the real values, `{"api_key": "…", "headers": {…}}`: only for encrypting before
    /// storage, never for logs or answers.
    pub fn to_plain_json(&self) -> String {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().into()))
            .collect();
        serde_json::json!({ "api_key": self.api_key.expose(), "headers": headers }).to_string()
    }

    /// Reads what [`Credentials::to_plain_json`] wrote (`headers` may be missing).
    pub fn from_plain_json(json: &str) -> Result<Credentials, serde_json::Error> {
        // `Secret` deserialises the plain value, so the derived impl reads it as it is.
        serde_json::from_str(json)
    }
}
