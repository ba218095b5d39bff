//! Checks that types alone cannot make: ranges, cron expressions, timezones, unique names, URLs,
//! key formats. The first problem found is reported, with the key it belongs to.

use std::collections::HashSet;
use std::time::Duration;

use super::error::Issue;
use super::providers::{AccountConfig, ModelConfig, ProviderConfig, RateLimitsConfig};
use super::Config;
use crate::domain::schedule::{parse_cron, parse_timezone};
use crate::domain::LimitKind;
use crate::secrets::MasterKey;

const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

pub(super) fn validate(config: &Config) -> Result<(), Issue> {
    let check = |ok: bool, key: &str, problem: &str| {
        if ok {
            Ok(())
        } else {
            Err(Issue::new(key, problem))
        }
    };

    check(
        !config.server.host.trim().is_empty(),
        "server.host",
        "must not be empty",
    )?;
    check(
        config.database.pool_size >= 1,
        "database.pool_size",
        "must be at least 1",
    )?;
    redis_host(&config.redis.host).map_err(|p| Issue::new("redis.host", p))?;
    check(config.redis.db >= 0, "redis.db", "must not be negative")?;
    check(
        config.redis.nodes().len() < 2 || config.redis.db == 0,
        "redis.db",
        "must be 0 with several redis.host nodes (a Redis Cluster has only database 0)",
    )?;
    positive("redis.timeout", config.redis.timeout)?;
    check(
        config.redis.timeout < config.sync.lease_ttl,
        "redis.timeout",
        "must be shorter than sync.lease_ttl (a lease must outlive a call that renews it)",
    )?;
    check(
        config
            .instance
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c)),
        "instance.id",
        "may hold only letters, digits and . _ - :",
    )?;

    positive("sync.redis_interval", config.sync.redis_interval)?;
    positive("sync.database_interval", config.sync.database_interval)?;
    positive("sync.reservation_timeout", config.sync.reservation_timeout)?;
    positive("sync.lease_ttl", config.sync.lease_ttl)?;
    check(
        config.sync.lease_ttl >= 10 * config.sync.report_interval,
        "sync.lease_ttl",
        "must be at least ten times sync.report_interval (leases are renewed at every report)",
    )?;
    positive("security.session_ttl", config.security.session_ttl)?;
    positive("upstream.connect_timeout", config.upstream.connect_timeout)?;
    positive("upstream.timeout", config.upstream.timeout)?;
    check(
        config.upstream.timeout < config.sync.reservation_timeout,
        "upstream.timeout",
        "must be shorter than sync.reservation_timeout (a call still waiting for its answer \
         would otherwise outlive its reservation)",
    )?;
    positive(
        "upstream.stream_idle_timeout",
        config.upstream.stream_idle_timeout,
    )?;
    positive("upstream.max_cooldown", config.upstream.max_cooldown)?;
    positive(
        "upstream.forbidden_cooldown",
        config.upstream.forbidden_cooldown,
    )?;

    let threshold = config.quota.warning_threshold;
    check(
        threshold > 0.0 && threshold <= 1.0,
        "quota.warning_threshold",
        &format!("must be above 0 and at most 1 (a fraction of the quota), got {threshold}"),
    )?;
    cron("quota.reset_cron", &config.quota.reset_cron)?;
    timezone("quota.timezone", &config.quota.timezone)?;

    check(
        config.tracking.batch_size >= 1,
        "tracking.batch_size",
        "must be at least 1",
    )?;
    positive("tracking.flush_interval", config.tracking.flush_interval)?;
    check(
        config.tracking.buffer >= 1,
        "tracking.buffer",
        "must be at least 1",
    )?;
    check(
        config.tracking.retention_days >= 1,
        "tracking.retention_days",
        "must be at least 1",
    )?;

    cron("jobs.cleanup_cron", &config.jobs.cleanup_cron)?;
    cron("jobs.aggregate_cron", &config.jobs.aggregate_cron)?;

    let webhook = &config.notifications.webhook_url;
    check(
        webhook.is_empty() || is_http_url(webhook),
        "notifications.webhook_url",
        "must be empty or an http:// or https:// URL",
    )?;

    master_key(config.security.master_key.expose())
        .map_err(|p| Issue::new("security.master_key", p))?;
    admin_token(config.security.admin_token.expose())
        .map_err(|p| Issue::new("security.admin_token", p))?;

    let level = &config.logging.level;
    check(
        LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)),
        "logging.level",
        &format!(
            "unknown level `{level}` (expected one of {})",
            LOG_LEVELS.join(", ")
        ),
    )?;

    let mut names = HashSet::new();
    for (i, provider) in config.providers.iter().enumerate() {
        let at = format!("providers[{i}]");
        provider_config(&at, provider)?;
        check(
            names.insert(provider.name.as_str()),
            &format!("{at}.name"),
            &format!("duplicate provider name `{}`", provider.name),
        )?;
    }
    Ok(())
}

fn provider_config(at: &str, provider: &ProviderConfig) -> Result<(), Issue> {
    name(&format!("{at}.name"), &provider.name)?;
    if provider.name.contains('/') {
        return Err(Issue::new(
            format!("{at}.name"),
            "must not contain `/` (clients write provider/model)",
        ));
    }
    if !is_http_url(&provider.base_url) {
        return Err(Issue::new(
            format!("{at}.base_url"),
            "must be an http:// or https:// URL",
        ));
    }
    if !is_header_name(&provider.auth.header) {
        return Err(Issue::new(
            format!("{at}.auth.header"),
            format!("`{}` is not a valid HTTP header name", provider.auth.header),
        ));
    }
    if provider
        .auth
        .scheme
        .contains(|c: char| c.is_whitespace() || c.is_control())
    {
        return Err(Issue::new(
            format!("{at}.auth.scheme"),
            "must be one word, like Bearer (or empty to send the bare key)",
        ));
    }
    if let Some(timeout) = provider.timeout {
        positive(&format!("{at}.timeout"), timeout)?;
    }
    if provider.max_completion_tokens == 0 {
        return Err(Issue::new(
            format!("{at}.max_completion_tokens"),
            "must be at least 1",
        ));
    }
    if let Some(headers) = &provider.ratelimit_headers {
        for (field, window, kind) in [
            ("requests", headers.requests, LimitKind::Requests),
            ("tokens", headers.tokens, LimitKind::Tokens),
        ] {
            if let Some(window) = window.filter(|w| w.kind() != kind) {
                return Err(Issue::new(
                    format!("{at}.ratelimit_headers.{field}"),
                    format!("`{window}` is not a {kind} window"),
                ));
            }
        }
    }
    rate_limits(&format!("{at}.rate_limits"), &provider.rate_limits)?;

    let mut models = HashSet::new();
    for (j, model) in provider.models.iter().enumerate() {
        let at = format!("{at}.models[{j}]");
        model_config(&at, model)?;
        if !models.insert(model.name.as_str()) {
            return Err(Issue::new(
                format!("{at}.name"),
                format!("duplicate model `{}` in this provider", model.name),
            ));
        }
    }

    let mut accounts = HashSet::new();
    for (j, account) in provider.accounts.iter().enumerate() {
        let at = format!("{at}.accounts[{j}]");
        account_config(&at, account)?;
        if !accounts.insert(account.name.as_str()) {
            return Err(Issue::new(
                format!("{at}.name"),
                format!("duplicate account `{}` in this provider", account.name),
            ));
        }
    }
    Ok(())
}

fn model_config(at: &str, model: &ModelConfig) -> Result<(), Issue> {
    name(&format!("{at}.name"), &model.name)?;
    for (field, price) in [("input", model.price.input), ("output", model.price.output)] {
        if !(price.is_finite() && price >= 0.0) {
            return Err(Issue::new(
                format!("{at}.price.{field}"),
                format!("must be a price of 0 or more, got {price}"),
            ));
        }
    }
    rate_limits(&format!("{at}.rate_limits"), &model.rate_limits)
}

fn account_config(at: &str, account: &AccountConfig) -> Result<(), Issue> {
    name(&format!("{at}.name"), &account.name)?;
    if account.credentials.api_key.is_empty() {
        return Err(Issue::new(format!("{at}.api_key"), "must not be empty"));
    }
    for (header, value) in &account.credentials.headers {
        let key = format!("{at}.credentials.headers.{header}");
        if !is_header_name(header) {
            return Err(Issue::new(key, "not a valid HTTP header name"));
        }
        if value.expose().contains(['\r', '\n', '\0']) {
            return Err(Issue::new(key, "a header value cannot contain line breaks"));
        }
    }
    rate_limits(&format!("{at}.rate_limits"), &account.rate_limits)
}

/// Limits of one set: each at least 1, fixed resets well-formed, and no two limits on the same
/// window (the second would silently shadow the first).
fn rate_limits(at: &str, limits: &RateLimitsConfig) -> Result<(), Issue> {
    let mut seen: Vec<(LimitKind, Option<Duration>, String)> = Vec::new();
    for (named, value) in limits.named() {
        let Some(value) = value else { continue };
        let key = format!("{at}.{named}");
        at_least_one(&key, value.limit())?;
        fixed_reset(&key, value.reset(), value.timezone())?;
        seen.push((named.kind(), named.per(), named.to_string()));
    }
    if let Some(concurrent) = limits.concurrent {
        at_least_one(&format!("{at}.concurrent"), concurrent)?;
    }
    for (i, window) in limits.windows.iter().enumerate() {
        let key = format!("{at}.windows[{i}]");
        if window.kind == LimitKind::Concurrent {
            return Err(Issue::new(
                format!("{key}.kind"),
                "a window counts requests or tokens; use rate_limits.concurrent for requests in flight",
            ));
        }
        at_least_one(&format!("{key}.limit"), window.limit)?;
        positive(&format!("{key}.per"), window.per)?;
        fixed_reset(&key, window.reset.as_deref(), window.timezone.as_deref())?;
        if let Some((.., other)) = seen
            .iter()
            .find(|(kind, per, _)| *kind == window.kind && *per == Some(window.per))
        {
            return Err(Issue::new(
                key,
                format!("the same window as {other}: give each window once"),
            ));
        }
        seen.push((window.kind, Some(window.per), format!("windows[{i}]")));
    }
    Ok(())
}

fn fixed_reset(at: &str, reset: Option<&str>, tz: Option<&str>) -> Result<(), Issue> {
    match (reset, tz) {
        (Some(reset), tz) => {
            cron(&format!("{at}.reset"), reset)?;
            tz.map_or(Ok(()), |tz| timezone(&format!("{at}.timezone"), tz))
        }
        (None, Some(_)) => Err(Issue::new(
            format!("{at}.timezone"),
            "a timezone needs a reset schedule (reset: \"0 0 * * *\"); a window without one slides",
        )),
        (None, None) => Ok(()),
    }
}

fn name(key: &str, name: &str) -> Result<(), Issue> {
    if name.trim().is_empty() {
        Err(Issue::new(key, "must not be empty"))
    } else if name.contains('\0') {
        // Postgres refuses it in text: provisioning would fail on the first write.
        Err(Issue::new(key, "must not contain a NUL character"))
    } else {
        Ok(())
    }
}

fn at_least_one(key: &str, limit: u64) -> Result<(), Issue> {
    if limit >= 1 {
        Ok(())
    } else {
        Err(Issue::new(
            key,
            "must be at least 1 (leave the limit out for no limit)",
        ))
    }
}

/// Shortest admin token accepted in the config: 32 characters, 128 bits as hex (the generated
/// tokens carry 256). The admin API resets counters and reads credentials' owners; a short
/// configured token is the weak point an attacker would try first.
const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// A configured admin token is empty (one is generated) or at least [`MIN_ADMIN_TOKEN_CHARS`]
/// long. The message never shows the token.
fn admin_token(token: &str) -> Result<(), String> {
    let length = token.chars().count();
    if token.is_empty() || length >= MIN_ADMIN_TOKEN_CHARS {
        Ok(())
    } else {
        Err(format!(
            "is {length} characters long: a configured admin token needs at least \
             {MIN_ADMIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`), or leave it empty to have one \
             generated"
        ))
    }
}

fn positive(key: &str, duration: Duration) -> Result<(), Issue> {
    if duration.is_zero() {
        Err(Issue::new(key, "must be longer than 0"))
    } else {
        Ok(())
    }
}

fn cron(key: &str, expression: &str) -> Result<(), Issue> {
    parse_cron(expression)
        .map(drop)
        .map_err(|problem| Issue::new(key, problem))
}

fn timezone(key: &str, name: &str) -> Result<(), Issue> {
    parse_timezone(name)
        .map(drop)
        .map_err(|problem| Issue::new(key, problem))
}

/// Empty (no Redis), `host:port` as the seed writes it, or several comma-separated (the seed
/// nodes of a Redis Cluster).
fn redis_host(hosts: &str) -> Result<(), String> {
    hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .try_for_each(one_redis_host)
}

fn one_redis_host(host: &str) -> Result<(), String> {
    if host.contains("://") {
        return Err("give host:port (e.g. localhost:6379), not a URL".to_string());
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() => match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(()),
            _ => Err(format!("invalid port `{port}` in `{host}`")),
        },
        _ => Err(format!(
            "`{host}` is not host:port (e.g. localhost:6379; empty for no Redis)"
        )),
    }
}

/// Empty (the runtime generates one) or what [`MasterKey::parse`] accepts: one parser, so a key
/// this check lets through is a key the runtime can use. Its messages never show the key.
fn master_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Ok(());
    }
    MasterKey::parse(key).map(drop).map_err(|problem| {
        format!(
            "{problem}: give 32 bytes as 64 hex digits or base64 (e.g. `openssl rand -hex 32`), \
             or leave it empty to generate one"
        )
    })
}

fn is_http_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
}

/// An RFC 9110 field name: one or more token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
