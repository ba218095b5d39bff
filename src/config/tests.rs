use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::domain::FixedReset;
use crate::domain::{LimitKind, LimitSpec, NamedLimit, Strategy, Tokenizer};

const FILE: &str = "/etc/q/config.yaml";

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(yaml: &str) -> Config {
    load_env(yaml, &[])
}

fn load_env(yaml: &str, vars: &[(&str, &str)]) -> Config {
    Config::from_yaml(yaml, Path::new(FILE), &env(vars)).unwrap_or_else(|e| panic!("{e}"))
}

fn error_env(yaml: &str, vars: &[(&str, &str)]) -> ConfigError {
    match Config::from_yaml(yaml, Path::new(FILE), &env(vars)) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e,
    }
}

/// Asserts the one-line message names the file and `key`, and mentions `fragment`.
fn assert_refused_env(yaml: &str, vars: &[(&str, &str)], key: &str, fragment: &str) {
    let message = error_env(yaml, vars).to_string();
    assert!(
        message.starts_with(&format!("{FILE}: {key}: ")),
        "expected key `{key}` in: {message}"
    );
    assert!(
        message.contains(fragment),
        "expected `{fragment}` in: {message}"
    );
    assert!(!message.contains('\n'), "not one line: {message}");
}

fn assert_refused(yaml: &str, key: &str, fragment: &str) {
    assert_refused_env(yaml, &[], key, fragment);
}

fn provider(extra: &str) -> String {
    format!(
        "providers:\n  - name: p\n    base_url: https://example.test/v1\n{}",
        extra
            .lines()
            .map(|line| format!("    {line}\n"))
            .collect::<String>()
    )
}

const API_EXAMPLE: &str = r#"
server:   { host: 127.0.0.1, port: 8080, workers: 0, shutdown_grace: 30s }
runtime:  { arbiters: auto }
data_dir: data
database: { url: "sqlite://data/quotagate.db", pool_size: 8 }
redis:    { host: "", password: "", db: 0 }
sync:     { redis_interval: 1s, database_interval: 5s, reservation_timeout: 10m }
upstream: { connect_timeout: 5s, timeout: 120s, stream_idle_timeout: 60s, retries: 2 }
quota:    { warning_threshold: 0.8, reset_cron: "0 0 * * *", timezone: UTC }
tracking: { batch_size: 500, flush_interval: 1s, buffer: 100000, retention_days: 90 }
jobs:     { cleanup_cron: "0 2 * * *", aggregate_cron: "0 1 * * *" }
notifications: { webhook_url: "" }
security: { admin_token: "${QUOTAGATE_ADMIN_TOKEN:-}", master_key: "${QUOTAGATE_MASTER_KEY:-}" }
logging:  { level: info, format: json }
providers:
  - name: groq
    base_url: https://api.groq.com/openai/v1
    strategy: least_used
    auth: { header: Authorization, scheme: Bearer }
    timeout: 60s
    max_completion_tokens: 4096
    tokenizer: "chars:3"
    ratelimit_headers: { requests: rpm, tokens: tpm }
    rate_limits:
      rpm: 30
      rph: 1000
      rpd: { limit: 14400, reset: "0 0 * * *", timezone: America/Los_Angeles }
      tpm: 6000
      tpd: 500000
      concurrent: 10
      windows: [ { kind: requests, limit: 5, per: 2s } ]
    models:
      - llama-3.1-8b-instant
      - { name: llama-3.3-70b-versatile, price: { input: 0.59, output: 0.79 }, rate_limits: { rpd: 1000, tpm: 12000 } }
    accounts:
      - { name: groq-1, api_key: "${GROQ_KEY_1}", quota_limit: 500000, expires_at: null }
      - { name: groq-2, credentials: { api_key: "${GROQ_KEY_2}", headers: { X-Org: "${GROQ_ORG_2:-}" } },
          quota_limit: 0, rate_limits: { rpm: 60 } }
"#;

fn sliding(kind: LimitKind, limit: u64, secs: u64) -> LimitSpec {
    LimitSpec {
        kind,
        limit,
        per: Some(Duration::from_secs(secs)),
        reset: None,
    }
}

// --- the shipped file and the contract's example ---

#[test]
fn the_shipped_config_loads_with_every_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
    let config = Config::load_with_env(&path, &BTreeMap::new()).unwrap_or_else(|e| panic!("{e}"));
    let empty = load("");

    assert_eq!(config.path, path);
    assert_eq!(
        config.data_dir,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
    );
    assert_eq!(
        config.database_backend(),
        DatabaseBackend::Sqlite(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quotagate.db"))
    );
    // The file states exactly the built-in defaults.
    assert_eq!(config.server, empty.server);
    assert_eq!(config.runtime, empty.runtime);
    assert_eq!(config.database, empty.database);
    assert_eq!(config.redis, empty.redis);
    assert_eq!(config.sync, empty.sync);
    assert_eq!(config.upstream, empty.upstream);
    assert_eq!(config.quota, empty.quota);
    assert_eq!(config.tracking, empty.tracking);
    assert_eq!(config.jobs, empty.jobs);
    assert_eq!(config.notifications, empty.notifications);
    assert_eq!(config.security, empty.security);
    assert_eq!(config.logging, empty.logging);
    assert!(config.providers.is_empty());
    assert!(config.security.admin_token.is_empty() && config.security.master_key.is_empty());
}

#[test]
fn the_shipped_example_provider_loads_once_uncommented() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
        .expect("config.yaml");
    let (head, example) = text
        .split_once("\n# providers:\n")
        .expect("the example block starts with `# providers:`");
    let head = head.replace("\nproviders: []\n", "\n");
    let example: String = example
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .unwrap_or(line.trim_start_matches('#'))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let yaml = format!("{head}\nproviders:\n{example}");

    let config = load_env(&yaml, &[("GROQ_KEY_1", "k1"), ("GROQ_KEY_2", "k2")]);
    let groq = &config.providers[0];
    assert_eq!(groq.name, "groq");
    assert_eq!(groq.models.len(), 2);
    assert_eq!(groq.accounts.len(), 2);
    assert_eq!(groq.accounts[0].active, Some(true));
    assert_eq!(groq.accounts[1].credentials.headers["X-Org"].expose(), "");
}

#[test]
fn an_empty_file_gives_every_default() {
    for text in ["", "# nothing but a comment\n", "server:\nsync: ~\n"] {
        let config = load(text);
        assert_eq!(config.server.host, "127.0.0.1");
        assert_eq!(config.server.port, 8080);
        assert_eq!(config.server.workers, 0);
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.runtime.arbiters, Arbiters::Auto);
        assert_eq!(config.data_dir, PathBuf::from("/etc/q/data"));
        assert_eq!(config.database.url.expose(), "sqlite://data/quotagate.db");
        assert_eq!(config.database.pool_size, 8);
        assert_eq!(config.redis.host, "");
        assert_eq!(config.redis.db, 0);
        assert_eq!(config.sync.redis_interval, Duration::from_secs(1));
        assert_eq!(config.sync.database_interval, Duration::from_secs(5));
        assert_eq!(config.sync.reservation_timeout, Duration::from_secs(600));
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.upstream.timeout, Duration::from_secs(120));
        assert_eq!(config.upstream.stream_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.upstream.retries, 2);
        assert_eq!(config.quota.warning_threshold, 0.8);
        assert_eq!(config.quota.reset_cron, "0 0 * * *");
        assert_eq!(config.quota.timezone, "UTC");
        assert_eq!(config.tracking.batch_size, 500);
        assert_eq!(config.tracking.flush_interval, Duration::from_secs(1));
        assert_eq!(config.tracking.buffer, 100_000);
        assert_eq!(config.tracking.retention_days, 90);
        assert_eq!(config.jobs.cleanup_cron, "0 2 * * *");
        assert_eq!(config.jobs.aggregate_cron, "0 1 * * *");
        assert_eq!(config.notifications.webhook_url, "");
        assert_eq!(config.logging.level, "info");
        assert_eq!(config.logging.format, LogFormat::Json);
        assert!(config.providers.is_empty());
    }
}

#[test]
fn the_api_contract_example_loads_with_its_values() {
    let config = load_env(
        API_EXAMPLE,
        &[
            ("GROQ_KEY_1", "gsk-one"),
            ("GROQ_KEY_2", "gsk-two"),
            ("GROQ_ORG_2", "org-2"),
        ],
    );
    assert!(config.security.admin_token.is_empty());

    let groq = &config.providers[0];
    assert_eq!(groq.name, "groq");
    assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
    assert_eq!(groq.strategy, Strategy::LeastUsed);
    assert_eq!(groq.auth, AuthConfig::default());
    assert_eq!(groq.timeout, Some(Duration::from_secs(60)));
    assert_eq!(groq.max_completion_tokens, 4096);
    assert_eq!(groq.tokenizer, Tokenizer::Chars(3));
    assert_eq!(
        groq.ratelimit_headers,
        Some(RateLimitHeaders {
            requests: Some(NamedLimit::Rpm),
            tokens: Some(NamedLimit::Tpm)
        })
    );

    assert_eq!(
        groq.rate_limits.specs(),
        vec![
            sliding(LimitKind::Requests, 30, 60),
            sliding(LimitKind::Requests, 1000, 3600),
            LimitSpec {
                kind: LimitKind::Requests,
                limit: 14400,
                per: Some(Duration::from_secs(86_400)),
                reset: Some(FixedReset {
                    cron: "0 0 * * *".to_string(),
                    timezone: "America/Los_Angeles".to_string(),
                }),
            },
            sliding(LimitKind::Tokens, 6000, 60),
            sliding(LimitKind::Tokens, 500_000, 86_400),
            LimitSpec {
                kind: LimitKind::Concurrent,
                limit: 10,
                per: None,
                reset: None,
            },
            sliding(LimitKind::Requests, 5, 2),
        ]
    );

    let [small, large] = &groq.models[..] else {
        panic!("two models")
    };
    assert_eq!(small.name, "llama-3.1-8b-instant");
    assert_eq!(small.price, Price::default());
    assert!(small.rate_limits.is_empty());
    assert_eq!(large.name, "llama-3.3-70b-versatile");
    assert_eq!(
        large.price,
        Price {
            input: 0.59,
            output: 0.79
        }
    );
    assert_eq!(
        large.rate_limits.specs(),
        vec![
            sliding(LimitKind::Requests, 1000, 86_400),
            sliding(LimitKind::Tokens, 12000, 60),
        ]
    );

    let [one, two] = &groq.accounts[..] else {
        panic!("two accounts")
    };
    assert_eq!(one.name, "groq-1");
    assert_eq!(one.credentials.api_key.expose(), "gsk-one");
    assert!(one.credentials.headers.is_empty());
    assert_eq!(one.quota_limit, 500_000);
    assert_eq!(one.expires_at, None);
    assert!(one.rate_limits.is_empty());
    assert_eq!(two.name, "groq-2");
    assert_eq!(two.credentials.api_key.expose(), "gsk-two");
    assert_eq!(two.credentials.headers["X-Org"].expose(), "org-2");
    assert_eq!(two.quota_limit, 0);
    assert_eq!(two.rate_limits.rpm, Some(LimitValue::Plain(60)));
}

#[test]
fn an_accounts_limits_override_the_providers_of_the_same_window() {
    let config = load_env(API_EXAMPLE, &[("GROQ_KEY_1", "a"), ("GROQ_KEY_2", "b")]);
    let groq = &config.providers[0];
    let specs = groq
        .rate_limits
        .specs_overridden_by(&groq.accounts[1].rate_limits);
    assert_eq!(specs.len(), groq.rate_limits.specs().len());
    assert_eq!(specs[0], sliding(LimitKind::Requests, 60, 60));
    assert_eq!(specs[1..], groq.rate_limits.specs()[1..]);

    let extra = RateLimitsConfig {
        windows: vec![WindowConfig {
            kind: LimitKind::Tokens,
            limit: 100,
            per: Duration::from_secs(1),
            reset: None,
            timezone: None,
        }],
        ..RateLimitsConfig::default()
    };
    let specs = groq.rate_limits.specs_overridden_by(&extra);
    assert_eq!(specs.last(), Some(&sliding(LimitKind::Tokens, 100, 1)));
}

#[test]
fn an_expiry_is_read_as_rfc_3339() {
    let config = load(&provider(
        "accounts: [ { name: a, api_key: k, expires_at: \"2026-12-31T23:59:59+01:00\" } ]",
    ));
    assert_eq!(
        config.providers[0].accounts[0]
            .expires_at
            .map(|t| t.to_rfc3339()),
        Some("2026-12-31T22:59:59+00:00".to_string())
    );
    assert_refused(
        &provider("accounts: [ { name: a, api_key: k, expires_at: 2026-12-31 } ]"),
        "providers[0].accounts[0].expires_at",
        "RFC 3339",
    );
}

// --- refusals: each names the file and the key ---

#[test]
fn an_unknown_top_level_key_is_refused_by_name() {
    assert_refused("servr: { port: 1 }\n", "servr", "unknown key");
    assert_refused("server: { prot: 1 }\n", "server.prot", "unknown key");
}

#[test]
fn an_unknown_key_deep_inside_an_account_is_refused_with_its_full_path() {
    let yaml = provider(
        "accounts:\n  - { name: a, api_key: k }\n  - { name: b, api_key: k, quota_limt: 5 }",
    );
    assert_refused(&yaml, "providers[0].accounts[1].quota_limt", "unknown key");
    assert_refused(
        &provider("rate_limits: { rpd: { limit: 5, rest: \"0 0 * * *\" } }"),
        "providers[0].rate_limits.rpd.rest",
        "unknown key",
    );
    assert_refused(
        &provider("models: [ { name: m, price: { in: 1 } } ]"),
        "providers[0].models[0].price.in",
        "unknown key",
    );
    assert_refused(
        &provider("accounts: [ { name: a, credentials: { api_key: k, header: {} } } ]"),
        "providers[0].accounts[0].credentials.header",
        "unknown key",
    );
}

#[test]
fn a_bad_duration_is_refused_by_key() {
    let error = error_env("sync: { redis_interval: 5 parsecs }\n", &[]);
    assert_eq!(
        error.to_string(),
        "/etc/q/config.yaml: sync.redis_interval: invalid duration `5 parsecs` (use 500ms, 1s, 5m, 24h)"
    );
    assert_refused(
        "server: { shutdown_grace: 30 }\n",
        "server.shutdown_grace",
        "give a unit",
    );
    assert_refused(
        &provider("rate_limits: { windows: [ { kind: requests, limit: 1, per: soon } ] }"),
        "providers[0].rate_limits.windows[0].per",
        "invalid duration",
    );
}

#[test]
fn timings_that_would_lose_a_reservation_or_a_lease_are_refused() {
    assert_refused(
        "upstream: { timeout: 10m }\nsync: { reservation_timeout: 10m }\n",
        "upstream.timeout",
        "shorter than sync.reservation_timeout",
    );
    assert_refused(
        "sync: { report_interval: 2s, lease_ttl: 10s }\n",
        "sync.lease_ttl",
        "ten times sync.report_interval",
    );
}

#[test]
fn zero_durations_that_make_no_sense_are_refused() {
    assert_refused(
        "sync: { database_interval: 0s }\n",
        "sync.database_interval",
        "longer than 0",
    );
    assert_refused(
        "upstream: { timeout: 0ms }\n",
        "upstream.timeout",
        "longer than 0",
    );
    assert_refused(
        &provider("timeout: 0s"),
        "providers[0].timeout",
        "longer than 0",
    );
    assert_refused(
        &provider("rate_limits: { windows: [ { kind: tokens, limit: 1, per: 0s } ] }"),
        "providers[0].rate_limits.windows[0].per",
        "longer than 0",
    );
    // A zero grace period is meaningful: stop at once.
    assert_eq!(
        load("server: { shutdown_grace: 0s }\n")
            .server
            .shutdown_grace,
        Duration::ZERO
    );
}

#[test]
fn negative_numbers_are_refused_by_key() {
    assert_refused(
        &provider("rate_limits: { rpm: -5 }"),
        "providers[0].rate_limits.rpm",
        "negative",
    );
    assert_refused(
        &provider("rate_limits: { concurrent: -1 }"),
        "providers[0].rate_limits.concurrent",
        "negative",
    );
    assert_refused(
        &provider("accounts: [ { name: a, api_key: k, quota_limit: -1 } ]"),
        "providers[0].accounts[0].quota_limit",
        "must not be negative (got -1)",
    );
    assert_refused(
        "database: { pool_size: -3 }\n",
        "database.pool_size",
        "negative",
    );
    assert_refused("redis: { db: -1 }\n", "redis.db", "negative");
    assert_refused("runtime: { arbiters: -2 }\n", "runtime.arbiters", "-2");
}

#[test]
fn limits_must_admit_at_least_one() {
    assert_refused(
        &provider("rate_limits: { tpm: 0 }"),
        "providers[0].rate_limits.tpm",
        "at least 1",
    );
    assert_refused(
        &provider("rate_limits: { windows: [ { kind: requests, limit: 0, per: 1s } ] }"),
        "providers[0].rate_limits.windows[0].limit",
        "at least 1",
    );
}

#[test]
fn an_unset_variable_is_refused_naming_the_key_and_the_variable() {
    assert_refused(
        &provider("accounts: [ { name: a, api_key: \"${NOPE_KEY}\" } ]"),
        "providers[0].accounts[0].api_key",
        "NOPE_KEY is not set",
    );
    assert_refused(
        "database: { url: \"${DB\" }\n",
        "database.url",
        "unterminated",
    );
    assert_refused(
        "redis: { host: \"${1X}\" }\n",
        "redis.host",
        "invalid variable",
    );
}

#[test]
fn a_bad_cron_expression_is_refused() {
    assert_refused(
        "quota: { reset_cron: \"every day\" }\n",
        "quota.reset_cron",
        "invalid cron",
    );
    assert_refused(
        "jobs: { cleanup_cron: \"0 0 2 * * *\" }\n",
        "jobs.cleanup_cron",
        "5 fields",
    );
    assert_refused(
        &provider("rate_limits: { rpd: { limit: 1, reset: \"61 0 * * *\" } }"),
        "providers[0].rate_limits.rpd.reset",
        "invalid cron",
    );
}

#[test]
fn a_bad_timezone_is_refused() {
    assert_refused(
        "quota: { timezone: Mars/Olympus }\n",
        "quota.timezone",
        "unknown timezone",
    );
    assert_refused(
        &provider("rate_limits: { rpd: { limit: 1, reset: \"0 0 * * *\", timezone: Nowhere } }"),
        "providers[0].rate_limits.rpd.timezone",
        "unknown timezone",
    );
}

#[test]
fn a_timezone_without_a_reset_is_refused() {
    assert_refused(
        &provider("rate_limits: { rpd: { limit: 1, timezone: UTC } }"),
        "providers[0].rate_limits.rpd.timezone",
        "needs a reset",
    );
    assert_refused(
        &provider("rate_limits: { concurrent: { limit: 1, reset: \"0 0 * * *\" } }"),
        "providers[0].rate_limits.concurrent",
        "no reset",
    );
}

#[test]
fn a_window_given_twice_is_refused() {
    assert_refused(
        &provider("rate_limits: { rpm: 5, windows: [ { kind: requests, limit: 9, per: 1m } ] }"),
        "providers[0].rate_limits.windows[0]",
        "same window as rpm",
    );
    assert_refused(
        &provider("rate_limits: { windows: [ { kind: concurrent, limit: 9, per: 1m } ] }"),
        "providers[0].rate_limits.windows[0].kind",
        "rate_limits.concurrent",
    );
}

#[test]
fn ratelimit_headers_must_name_a_window_of_their_kind() {
    assert_refused(
        &provider("ratelimit_headers: { requests: tpm }"),
        "providers[0].ratelimit_headers.requests",
        "not a requests window",
    );
    assert_refused(
        &provider("ratelimit_headers: { tokens: rpd }"),
        "providers[0].ratelimit_headers.tokens",
        "not a tokens window",
    );
    assert_refused(
        &provider("ratelimit_headers: { tokens: concurrent }"),
        "providers[0].ratelimit_headers.tokens",
        "unknown window",
    );
}

#[test]
fn an_unknown_quotagate_variable_is_refused() {
    assert_refused_env(
        "",
        &[("QUOTAGATE__SERVER__PROT", "1")],
        "QUOTAGATE__SERVER__PROT",
        "unknown variable",
    );
    assert_refused_env(
        "",
        &[("QUOTAGATE__SERVER", "1")],
        "QUOTAGATE__SERVER",
        "is a section",
    );
    assert_refused_env(
        "",
        &[("QUOTAGATE__PROVIDERS", "[]")],
        "QUOTAGATE__PROVIDERS",
        "providers",
    );
    assert_refused_env(
        "",
        &[("QUOTAGATE__DATA_DIR__X", "1")],
        "QUOTAGATE__DATA_DIR__X",
        "unknown variable",
    );
    // One underscore is not our prefix: such variables are left for ${VAR}.
    load_env("", &[("QUOTAGATE_ADMIN_TOKEN", "x")]);
}

#[test]
fn a_database_url_of_another_scheme_is_refused_without_showing_it() {
    let error = error_env("database: { url: \"mysql://root:hunter2@db/q\" }\n", &[]);
    assert_eq!(error.key, "database.url");
    assert!(error.problem.contains("`mysql`"), "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    assert_refused(
        "database: { url: \"q.db\" }\n",
        "database.url",
        "not a database URL",
    );
    assert_refused(
        "database: { url: \"sqlite://\" }\n",
        "database.url",
        "no file",
    );
}

#[test]
fn a_malformed_master_key_is_refused_without_showing_it() {
    let error = error_env("security: { master_key: \"not-a-key\" }\n", &[]);
    assert_eq!(error.key, "security.master_key");
    assert!(error.problem.contains("32 bytes"), "{error}");
    assert!(!error.to_string().contains("not-a-key"), "{error}");
    // 31 bytes of hex is too short.
    assert_refused(
        &format!("security: {{ master_key: \"{}\" }}\n", "ab".repeat(31)),
        "security.master_key",
        "32 bytes",
    );

    let hex = "0123456789abcdef".repeat(4);
    let base64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for key in [hex.as_str(), base64] {
        let config = load(&format!("security: {{ master_key: \"{key}\" }}\n"));
        assert_eq!(config.security.master_key.expose(), key);
    }
}

#[test]
fn a_short_configured_admin_token_is_refused_without_showing_it() {
    let error = error_env("security: { admin_token: \"hunter2-admin\" }\n", &[]);
    assert_eq!(error.key, "security.admin_token");
    assert!(error.problem.contains("at least 32"), "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    // From the environment too, as the shipped file takes it.
    let short = error_env(
        "security: { admin_token: \"${QUOTAGATE_ADMIN_TOKEN:-}\" }\n",
        &[("QUOTAGATE_ADMIN_TOKEN", "0123456789abcdef0123456789abcde")],
    );
    assert!(short.problem.contains("31 characters"), "{short}");
    let long = "0123456789abcdef".repeat(2);
    let config = load(&format!("security: {{ admin_token: \"{long}\" }}\n"));
    assert_eq!(config.security.admin_token.expose(), long);
    assert!(
        load("").security.admin_token.is_empty(),
        "empty: one is generated"
    );
}

#[test]
fn upstream_cooldown_caps_default_to_an_hour_and_ten_minutes_and_must_be_positive() {
    let config = load("");
    assert_eq!(config.upstream.max_cooldown, Duration::from_secs(3600));
    assert_eq!(config.upstream.forbidden_cooldown, Duration::from_secs(600));
    let set = load("upstream: { max_cooldown: 5m, forbidden_cooldown: 30s }\n");
    assert_eq!(set.upstream.max_cooldown, Duration::from_secs(300));
    assert_eq!(set.upstream.forbidden_cooldown, Duration::from_secs(30));
    assert_refused(
        "upstream: { max_cooldown: 0s }\n",
        "upstream.max_cooldown",
        "longer than 0",
    );
    assert_refused(
        "upstream: { forbidden_cooldown: 0s }\n",
        "upstream.forbidden_cooldown",
        "longer than 0",
    );
}

#[test]
fn a_name_holding_a_nul_is_refused() {
    assert_refused(
        "providers:\n  - { name: \"p\\0\", base_url: \"https://a.test\" }\n",
        "providers[0].name",
        "NUL",
    );
    assert_refused(
        &provider("models: [ \"m\\0\" ]"),
        "providers[0].models[0].name",
        "NUL",
    );
    assert_refused(
        &provider("accounts: [ { name: \"a\\0\", api_key: k } ]"),
        "providers[0].accounts[0].name",
        "NUL",
    );
}

#[test]
fn duplicate_names_are_refused() {
    let yaml = "providers:\n  - { name: p, base_url: \"https://a.test\" }\n  - { name: p, base_url: \"https://b.test\" }\n";
    assert_refused(yaml, "providers[1].name", "duplicate provider name `p`");
    assert_refused(
        &provider("models: [ m, { name: m } ]"),
        "providers[0].models[1].name",
        "duplicate model",
    );
    assert_refused(
        &provider("accounts: [ { name: a, api_key: k }, { name: a, api_key: j } ]"),
        "providers[0].accounts[1].name",
        "duplicate account",
    );
}

#[test]
fn provider_names_and_urls_are_checked() {
    let yaml = "providers: [ { name: \"a/b\", base_url: \"https://a.test\" } ]\n";
    assert_refused(yaml, "providers[0].name", "`/`");
    let yaml = "providers: [ { name: \" \", base_url: \"https://a.test\" } ]\n";
    assert_refused(yaml, "providers[0].name", "empty");
    let yaml = "providers: [ { name: a, base_url: \"ftp://a.test\" } ]\n";
    assert_refused(yaml, "providers[0].base_url", "http");
    assert_refused("providers: [ { name: a } ]\n", "providers[0]", "base_url");
    assert_refused(
        &provider("auth: { header: \"X Key\" }"),
        "providers[0].auth.header",
        "header name",
    );
    assert_refused(
        &provider("strategy: fastest"),
        "providers[0].strategy",
        "round_robin",
    );
    assert_refused(
        &provider("tokenizer: \"chars:0\""),
        "providers[0].tokenizer",
        "chars:N",
    );
}

#[test]
fn an_account_gives_its_key_exactly_once() {
    assert_refused(
        &provider("accounts: [ { name: a, api_key: k, credentials: { api_key: j } } ]"),
        "providers[0].accounts[0]",
        "not both",
    );
    assert_refused(
        &provider("accounts: [ { name: a } ]"),
        "providers[0].accounts[0]",
        "missing api_key",
    );
    assert_refused(
        &provider("accounts: [ { name: a, credentials: { headers: { X-Org: o } } } ]"),
        "providers[0].accounts[0]",
        "no api_key",
    );
    assert_refused(
        &provider("accounts: [ { name: a, api_key: \"${EMPTY:-}\" } ]"),
        "providers[0].accounts[0].api_key",
        "empty",
    );
}

#[test]
fn a_warning_threshold_outside_zero_to_one_is_refused() {
    for value in ["0", "1.5", "-0.1", "80", ".nan"] {
        assert_refused(
            &format!("quota: {{ warning_threshold: {value} }}\n"),
            "quota.warning_threshold",
            "at most 1",
        );
    }
    assert_eq!(
        load("quota: { warning_threshold: 1 }\n")
            .quota
            .warning_threshold,
        1.0
    );
}

#[test]
fn other_section_values_are_checked() {
    assert_refused("redis: { host: localhost }\n", "redis.host", "host:port");
    assert_refused(
        "redis: { host: \"localhost:99999\" }\n",
        "redis.host",
        "invalid port",
    );
    assert_refused(
        "redis: { host: \"redis://localhost:6379\" }\n",
        "redis.host",
        "not a URL",
    );
    assert_eq!(
        load("redis: { host: \"[::1]:6379\" }\n").redis.host,
        "[::1]:6379"
    );
    assert_refused(
        "logging: { level: loud }\n",
        "logging.level",
        "unknown level",
    );
    assert_eq!(load("logging: { level: DEBUG }\n").logging.level, "DEBUG");
    assert_refused("logging: { format: xml }\n", "logging.format", "json");
    assert_refused(
        "notifications: { webhook_url: hooks.test }\n",
        "notifications.webhook_url",
        "http",
    );
    assert_refused(
        "database: { pool_size: 0 }\n",
        "database.pool_size",
        "at least 1",
    );
    assert_refused("data_dir: \"\"\n", "data_dir", "empty");
    assert_refused("server: { port: 70000 }\n", "server.port", "at most 65535");
}

#[test]
fn invalid_yaml_is_refused_with_its_line_and_column() {
    let error = error_env("server:\n  port: 8080\n bad indent: [\n", &[]);
    assert!(error.key.starts_with("line "), "{error}");
    assert!(error.key.contains(" column "), "{error}");
    assert!(error.problem.starts_with("invalid YAML"), "{error}");
    assert!(
        error.to_string().starts_with(&format!("{FILE}: line ")),
        "{error}"
    );
    assert!(!error.to_string().contains('\n'));

    let error = error_env("- just\n- a list\n", &[]);
    assert!(
        error
            .to_string()
            .starts_with(&format!("{FILE}: the file must be a mapping")),
        "{error}"
    );
    let error = error_env("server: {}\nserver: {}\n", &[]);
    assert!(error.problem.contains("duplicate"), "{error}");
}

#[test]
fn a_missing_file_is_refused_naming_it() {
    let path = Path::new("/nonexistent/quotagate/config.yaml");
    let error = Config::load_with_env(path, &BTreeMap::new()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "/nonexistent/quotagate/config.yaml: cannot read the file: No such file or directory (os error 2)"
    );
}

// --- environment ---

#[test]
fn environment_variables_override_a_number_and_a_string() {
    let config = load_env(
        "server: { port: 8080 }\n",
        &[
            ("QUOTAGATE__SERVER__PORT", "9090"),
            ("QUOTAGATE__DATABASE__URL", "postgres://qg:pw@db/quotagate"),
            ("quotagate__quota__warning_threshold", "0.5"),
            ("QUOTAGATE__SYNC__REDIS_INTERVAL", "250ms"),
            ("QUOTAGATE__RUNTIME__ARBITERS", "0"),
            ("QUOTAGATE__REDIS__PASSWORD", "123456"),
            ("QUOTAGATE__DATA_DIR", "/var/lib/q"),
        ],
    );
    assert_eq!(config.server.port, 9090);
    assert_eq!(
        config.database_backend(),
        DatabaseBackend::Postgres(Secret::new("postgres://qg:pw@db/quotagate"))
    );
    assert_eq!(config.quota.warning_threshold, 0.5);
    assert_eq!(config.sync.redis_interval, Duration::from_millis(250));
    assert_eq!(config.runtime.arbiters, Arbiters::Count(0));
    // A numeric-looking value of a string key stays text.
    assert_eq!(config.redis.password.expose(), "123456");
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/q"));
}

#[test]
fn a_bad_override_names_the_key_and_the_variable() {
    assert_refused_env(
        "",
        &[("QUOTAGATE__SERVER__PORT", "http")],
        "server.port",
        "(set by QUOTAGATE__SERVER__PORT)",
    );
    assert_refused_env(
        "",
        &[("QUOTAGATE__QUOTA__TIMEZONE", "Moon/Base")],
        "quota.timezone",
        "(set by QUOTAGATE__QUOTA__TIMEZONE)",
    );
}

#[test]
fn variables_expand_in_strings_and_overrides_but_never_in_comments() {
    let yaml = "# ${NOT_EXPANDED}\nredis: { host: \"${RHOST}:6379\", password: \"p$$w${SUFFIX:-rd}$x\" }\n";
    let config = load_env(
        yaml,
        &[
            ("RHOST", "cache"),
            (
                "QUOTAGATE__NOTIFICATIONS__WEBHOOK_URL",
                "https://${HOOK_HOST}/q",
            ),
            ("HOOK_HOST", "hooks.test"),
        ],
    );
    assert_eq!(config.redis.host, "cache:6379");
    assert_eq!(config.redis.password.expose(), "p$wrd$x");
    assert_eq!(config.notifications.webhook_url, "https://hooks.test/q");
}

#[test]
fn a_default_applies_when_the_variable_is_unset_or_empty() {
    let yaml = "logging: { level: \"${LEVEL:-warn}\" }\nredis: { password: \"${RPW:-}\" }\n";
    assert_eq!(load(yaml).logging.level, "warn");
    assert_eq!(load_env(yaml, &[("LEVEL", "")]).logging.level, "warn");
    assert_eq!(load_env(yaml, &[("LEVEL", "debug")]).logging.level, "debug");
    assert!(load(yaml).redis.password.is_empty());
    // An expanded value is not expanded again.
    let config = load_env("redis: { password: \"${A}\" }\n", &[("A", "${B}")]);
    assert_eq!(config.redis.password.expose(), "${B}");
}

// --- paths ---

#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let config = load("data_dir: state\ndatabase: { url: \"sqlite://./db/q.db\" }\n");
    assert_eq!(config.data_dir, PathBuf::from("/etc/q/state"));
    assert_eq!(
        config.database_backend(),
        DatabaseBackend::Sqlite(PathBuf::from("/etc/q/db/q.db"))
    );

    let config = load("data_dir: /srv/q\ndatabase: { url: \"sqlite:///var/lib/q.db\" }\n");
    assert_eq!(config.data_dir, PathBuf::from("/srv/q"));
    assert_eq!(
        config.database_backend(),
        DatabaseBackend::Sqlite(PathBuf::from("/var/lib/q.db"))
    );

    let config = load("database: { url: \"postgresql://u@h/q\" }\n");
    assert_eq!(
        config.database_backend(),
        DatabaseBackend::Postgres(Secret::new("postgresql://u@h/q"))
    );

    // A relative config path is taken from the current directory.
    let config = Config::from_yaml("", Path::new("conf/q.yaml"), &BTreeMap::new()).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(config.path, cwd.join("conf/q.yaml"));
    assert_eq!(config.data_dir, cwd.join("conf/data"));
}

// --- secrets ---

#[test]
fn no_secret_appears_in_debug_or_in_the_serialised_config() {
    let yaml = format!(
        "database: {{ url: \"postgres://qg:db-secret@db/q\" }}\n\
         redis: {{ host: \"r:6379\", password: redis-secret }}\n\
         security: {{ admin_token: admin-secret-0123456789abcdef0123456789, master_key: \"{}\" }}\n{}",
        "ab".repeat(32),
        provider(
            "accounts: [ { name: a, credentials: { api_key: key-secret, headers: { X-Org: org-secret } } } ]"
        ),
    );
    let config = load(&yaml);
    let debug = format!("{config:?}");
    let json = serde_json::to_string(&config).unwrap();
    for shown in [&debug, &json] {
        for secret in [
            "db-secret",
            "redis-secret",
            "admin-secret-0123456789abcdef0123456789",
            &"ab".repeat(32),
            "key-secret",
            "org-secret",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
    }
    assert!(json.contains("postgres://qg:***@db/q"), "{json}");
}

#[test]
fn credentials_round_trip_through_plain_json_with_their_real_values() {
    let credentials = Credentials {
        api_key: Secret::new("sk-1"),
        headers: BTreeMap::from([("X-Org".to_string(), Secret::new("org"))]),
    };
    let plain = credentials.to_plain_json();
    assert!(plain.contains("sk-1") && plain.contains("org"));
    assert_eq!(Credentials::from_plain_json(&plain).unwrap(), credentials);
    assert_eq!(
        Credentials::from_plain_json(r#"{"api_key":"k"}"#)
            .unwrap()
            .headers,
        BTreeMap::new()
    );
    assert!(!serde_json::to_string(&credentials)
        .unwrap()
        .contains("sk-1"));
}

// --- robustness ---

#[test]
fn no_input_makes_loading_panic() {
    let inputs = [
        "",
        "~",
        "42",
        "[",
        "{",
        "'",
        "server: [1, 2]",
        "server: 5",
        "providers: 5",
        "providers: [5]",
        "providers: [~]",
        "providers: [{ name: a, base_url: 'https://a', models: [[]] }]",
        "providers: [{ name: a, base_url: 'https://a', rate_limits: { rpm: 1.5 } }]",
        "providers: [{ name: a, base_url: 'https://a', rate_limits: { rpm: 99999999999999999999999 } }]",
        "providers: [{ name: a, base_url: 'https://a', rate_limits: { windows: [{ kind: tokens, limit: 1, per: 99999999999h }] } }]",
        "quota: { reset_cron: '@reboot' }",
        "quota: { reset_cron: '*/0 * * * *' }",
        "quota: { reset_cron: '0 0 31 2 *' }",
        "quota: { reset_cron: '' }",
        "jobs: { cleanup_cron: '0 0 * * 8' }",
        "jobs: { cleanup_cron: '0-99 * * * *' }",
        "a: &x [*x]",
        "<<: 5",
        "!tag {}",
        "server: !tag { port: 1 }",
        "1: 2",
        "database: { url: '${' }",
        "database: { url: '$$${A:-' }",
        "database: { url: 'sqlite://:memory:' }",
        "\u{feff}server: {}",
        "server: { host: \"\\0\" }",
    ];
    for input in inputs {
        let result = std::panic::catch_unwind(|| {
            let _ = Config::from_yaml(input, Path::new(FILE), &BTreeMap::new());
        });
        assert!(result.is_ok(), "panicked on {input:?}");
    }
    let result = std::panic::catch_unwind(|| {
        for var in [
            "QUOTAGATE__",
            "QUOTAGATE____",
            "QUOTAGATE__SERVER__PORT__X",
            "QUOTAGATE__SERVER__",
        ] {
            let _ = Config::from_yaml("server: 5", Path::new(FILE), &env(&[(var, "1")]));
        }
    });
    assert!(result.is_ok());
}
