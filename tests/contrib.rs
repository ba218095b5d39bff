//! The Grafana dashboard (`contrib/grafana/quotagate.json`) and the Prometheus alert rules
//! (`contrib/prometheus/alerts.yml`) against what `/metrics` really exports: a running gateway
//! is driven until every metric family the files use has a series (requests served and refused
//! by a rate limit, an upstream 429, a forecast, a database sync), scraped, and every metric
//! named in a query or a rule must be among the exported names. The rules also pass
//! `promtool check rules` and their unit tests (`promtool test rules`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::status::{StatusFixture, PROVIDER};
use common::{eventually, Behavior};
use serde_json::{json, Value};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/grafana/quotagate.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus/alerts.yml");

/// The metric names a PromQL expression reads: identifiers that are not functions, aggregation
/// operators, keywords, label names (in `{…}` or in `by (…)`-style lists), durations, numbers,
/// strings or Grafana variables.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
    // Aggregation operators may put `by (…)` before their `(`.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let mut skip_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_list => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                skip_list = false;
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if LABEL_LISTS.contains(&word.as_str()) {
                    skip_list = next == Some(&'(');
                } else if next == Some(&'(')
                    || KEYWORDS.contains(&word.to_lowercase().as_str())
                    || AGGREGATIONS.contains(&word.as_str())
                {
                    // A function or an aggregation operator.
                } else {
                    out.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_metrics_and_nothing_else() {
    let names = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum by (provider, status) (rate(quotagate_requests_total{status=~"5..", x="a b"}[$__rate_interval]))"#
        ),
        ["quotagate_requests_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m]))) > 1e3 and on (a, b) group_left (c) info_metric offset 5m"),
        ["info_metric", "x_bucket"]
    );
    assert_eq!(
        names("quota_usage_percent >= 80 < 95"),
        ["quota_usage_percent"]
    );
}

/// Every metric name `/metrics` exports (histograms as their `_bucket`, `_sum`, `_count`).
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        if kind == "histogram" || kind == "summary" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_string());
    }
    names
}

/// A gateway whose `/metrics` has a series of every family the contrib files use.
async fn busy_gateway() -> (StatusFixture, BTreeSet<String>) {
    let f = StatusFixture::start("sync: { database_interval: 1s }\n").await;
    f.mock.set_usage(None, 900, 100);
    f.chat(3).await;
    // An upstream 429 (a cooldown event; retried on another account).
    f.mock.behave_times(
        "sk-status-busy-0123456789",
        Behavior::RateLimited { retry_after: 5 },
        1,
    );
    f.chat(3).await;
    // A limit the gateway enforces: one request a minute per account, so the next ones are held;
    // and a quota for every account, so the pool as a whole has a forecast.
    for name in ["busy", "idle", "spare"] {
        let body = match name {
            "spare" => json!({ "rate_limits": { "rpm": 1 }, "quota_limit": 1_000_000 }),
            _ => json!({ "rate_limits": { "rpm": 1 } }),
        };
        let r = f
            .http
            .send(
                "PATCH",
                &f.url(&format!("/api/v1/admin/accounts/{PROVIDER}%2F{name}")),
                Some(f.gw.admin_token()),
                &[("content-type", "application/json")],
                Some(body.to_string().as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
    }
    for _ in 0..4 {
        let _ = f
            .http
            .post_json(
                &f.url("/v1/chat/completions"),
                Some(f.gw.client_key()),
                &common::chat_body(&format!("{PROVIDER}/{}", common::MOCK_MODEL), "hi"),
            )
            .await;
    }
    f.wait_for_logged(6).await;
    let names = eventually(Duration::from_secs(20), async || {
        let text = f.http.get(&f.url("/metrics"), None).await.text();
        let names = exported(&text);
        let wanted = [
            "rate_limit_hits_total",
            "quotagate_sync_up",
            "quotagate_quota_exhausts_in_seconds",
            "quotagate_pool_quota_exhausts_in_seconds",
            "quotagate_account_info",
            "quotagate_available_accounts",
            "quotagate_events_total",
        ];
        wanted.iter().all(|w| names.contains(*w)).then_some(names)
    })
    .await
    .expect("every metric family shows up in /metrics");
    (f, names)
}

fn dashboard_queries(panel: &Value, out: &mut Vec<String>) {
    if let Some(targets) = panel["targets"].as_array() {
        for t in targets {
            if let Some(expr) = t["expr"].as_str() {
                out.push(expr.to_string());
            }
        }
    }
    for nested in panel["panels"].as_array().into_iter().flatten() {
        dashboard_queries(nested, out);
    }
}

#[actix_rt::test]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let (_f, exported) = busy_gateway().await;

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("valid JSON");
    assert_eq!(dashboard["title"], "quotagate");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            panel["title"].is_string() && panel["gridPos"].is_object(),
            "{panel}"
        );
        dashboard_queries(panel, &mut queries);
    }
    let mut used = BTreeSet::new();
    for expr in &queries {
        let names = promql_metrics(expr);
        assert!(!names.is_empty(), "no metric in `{expr}`");
        for name in names {
            assert!(
                exported.contains(&name),
                "the dashboard queries `{name}`, which /metrics does not export ({expr})"
            );
            used.insert(name);
        }
    }
    // What the dashboard is for: pools, quota, rate limits, errors, latency, sync, tracker.
    for needed in [
        "quotagate_available_accounts",
        "quota_usage_percent",
        "quotagate_quota_exhausts_in_seconds",
        "rate_limit_hits_total",
        "quotagate_requests_total",
        "quotagate_request_duration_seconds_bucket",
        "quotagate_sync_up",
        "quotagate_sync_lag_seconds",
        "quotagate_tracker_dropped_total",
        "quotagate_tracker_queue_depth",
    ] {
        assert!(used.contains(needed), "the dashboard shows no {needed}");
    }

    let rules: Value = yaml_serde::from_str(&std::fs::read_to_string(ALERTS).unwrap()).unwrap();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        assert!(group["name"].is_string());
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("an expression");
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: a summary"
            );
            let names = promql_metrics(expr);
            assert!(!names.is_empty(), "{name}: no metric");
            for metric in names {
                assert!(
                    exported.contains(&metric),
                    "{name} uses `{metric}`, which /metrics does not export"
                );
            }
            alerts.insert(name.to_string());
        }
    }
    for needed in [
        "QuotaHigh",
        "QuotaCritical",
        "QuotaExhausted",
        "FrequentRateLimiting",
        "PoolUnavailable",
        "UpstreamErrors",
        "SyncDown",
        "TrackerDroppingRows",
    ] {
        assert!(alerts.contains(needed), "no {needed} alert");
    }
}

/// promtool from Debian's `prometheus` package (`scripts/test` installs it).
fn promtool(args: &[&str]) -> std::process::Output {
    let dir = Path::new(ALERTS).parent().unwrap();
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)")
}

#[test]
#[ignore = "needs promtool: run scripts/test"]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "alerts.yml"]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
