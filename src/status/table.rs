//! A [`Snapshot`] as text for a terminal: one block per pool, one line per account (state, a
//! quota bar, the rate windows, in flight, cooldown or last error). Colours only on a terminal.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::compose::{clock_time, relative};
use super::{thousands, AccountState, AccountView, ProviderView, Snapshot};

/// Cells of a quota bar.
const BAR: usize = 10;

/// ANSI colours, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colors {
    On,
    Off,
}

impl Colors {
    fn paint(self, code: &str, text: &str) -> String {
        match self {
            Colors::On => format!("\x1b[{code}m{text}\x1b[0m"),
            Colors::Off => text.to_string(),
        }
    }
}

/// `[████░░░░░░]` for `percent` (0–100).
pub fn bar(percent: f64) -> String {
    let p = if percent.is_finite() {
        percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    let full = ((p / 100.0) * BAR as f64).round() as usize;
    format!("[{}{}]", "█".repeat(full), "░".repeat(BAR - full))
}

fn state_color(state: AccountState) -> &'static str {
    match state {
        AccountState::Active => "32",
        AccountState::CoolingDown | AccountState::CircuitOpen => "33",
        _ => "31",
    }
}

/// The whole picture; `source` says where it came from (a URL, or the database).
pub fn render(s: &Snapshot, source: &str, colors: Colors) -> String {
    let now = s.generated_at;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "quotagate status at {} — {source}",
        now.format("%Y-%m-%d %H:%M:%S UTC")
    );
    if s.providers.is_empty() {
        out.push_str("\nno providers\n");
    }
    for p in &s.providers {
        provider(&mut out, p, now, colors);
    }
    out
}

fn provider(out: &mut String, p: &ProviderView, now: DateTime<Utc>, colors: Colors) {
    let forecast = match p.forecast.quota_exhausts_at {
        Some(at) => format!("{} ({})", clock_time(at, now), relative(at, now)),
        None => "not before a reset".to_string(),
    };
    let _ = writeln!(
        out,
        "\n{}  {}{}  available {}/{}  {} req/min  {} err/min  pool quota runs out: {forecast}",
        colors.paint("1", &p.provider),
        p.strategy,
        if p.active { "" } else { "  (not routed)" },
        p.available_accounts,
        p.total_accounts,
        p.requests_per_minute,
        p.errors_per_minute,
    );
    if p.accounts.is_empty() {
        out.push_str("  no accounts\n");
        return;
    }
    let mut rows = vec![[
        "ACCOUNT",
        "STATE",
        "QUOTA",
        "WINDOWS",
        "IN FLIGHT",
        "COOLDOWN / LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    let mut states = Vec::new();
    for a in &p.accounts {
        rows.push(account_row(a, now));
        states.push(a.state);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                let padded = format!("{cell:<w$}");
                match (c, i.checked_sub(1).and_then(|r| states.get(r))) {
                    (1, Some(&state)) => colors.paint(state_color(state), &padded),
                    _ => padded,
                }
            })
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
}

fn account_row(a: &AccountView, now: DateTime<Utc>) -> Vec<String> {
    let quota = if a.quota.limit == 0 {
        format!("{} tokens, no limit", thousands(a.quota.used))
    } else {
        let mut q = format!(
            "{} {}/{} {:.1}%",
            bar(a.quota.usage_percent),
            thousands(a.quota.used),
            thousands(a.quota.limit),
            a.quota.usage_percent
        );
        if let Some(at) = a.quota.exhausts_at {
            let _ = write!(q, " runs out {}", clock_time(at, now));
        }
        q
    };
    let windows = if a.windows.is_empty() {
        "-".to_string()
    } else {
        a.windows
            .iter()
            .map(|w| {
                format!(
                    "{} {}/{}",
                    w.limit_type,
                    thousands(w.current),
                    thousands(w.limit)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = if let Some(hold) = &a.cooldown {
        format!(
            "until {} ({}): {}",
            clock_time(hold.until, now),
            relative(hold.until, now),
            hold.why
        )
    } else if let Some(until) = a.circuit_open_until {
        format!("circuit open until {}", clock_time(until, now))
    } else if let Some(e) = &a.last_error {
        let status = e.status.map(|s| format!("{s} ")).unwrap_or_default();
        let message: String = e.message.chars().take(80).collect();
        format!("{}: {status}{message}", clock_time(e.at, now))
    } else if matches!(a.state, AccountState::Disabled | AccountState::Expired) {
        a.reason.clone().unwrap_or_default()
    } else {
        "-".to_string()
    };
    vec![
        a.account.clone(),
        a.state.label().to_string(),
        quota,
        windows,
        a.in_flight.to_string(),
        note,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PoolForecast, QuotaFigures};

    fn snapshot() -> Snapshot {
        let now: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
        let account = |name: &str, state, used| AccountView {
            account_id: format!("id-{name}"),
            account: name.to_string(),
            state,
            reason: None,
            cooldown: None,
            circuit_open_until: None,
            quota: QuotaFigures {
                used,
                limit: 1000,
                usage_percent: used as f64 / 10.0,
                reset_at: now + chrono::Duration::hours(12),
                exhausts_at: None,
            },
            windows: Vec::new(),
            in_flight: 0,
            requests_per_minute: 0.0,
            tokens_per_minute: 0.0,
            last_error: None,
        };
        Snapshot {
            generated_at: now,
            rate_span_minutes: 15,
            providers: vec![ProviderView {
                provider_id: "p1".into(),
                provider: "groq".into(),
                strategy: "least_used".into(),
                active: true,
                total_accounts: 2,
                available_accounts: 1,
                requests_per_minute: 3,
                errors_per_minute: 0,
                requests_history: vec![0; 60],
                errors_history: vec![0; 60],
                forecast: PoolForecast {
                    quota_exhausts_at: None,
                    windows: Vec::new(),
                },
                accounts: vec![
                    account("groq-1", AccountState::Active, 250),
                    account("groq-2", AccountState::QuotaExhausted, 1000),
                ],
            }],
        }
    }

    #[test]
    fn bars_fill_with_the_percentage_and_stay_in_bounds() {
        assert_eq!(bar(0.0), "[░░░░░░░░░░]");
        assert_eq!(bar(50.0), "[█████░░░░░]");
        assert_eq!(bar(250.0), "[██████████]");
        assert_eq!(bar(f64::NAN), "[░░░░░░░░░░]");
    }

    #[test]
    fn every_account_is_a_line_with_its_state_and_quota() {
        let text = render(&snapshot(), "from the database", Colors::Off);
        assert!(text.contains("groq  least_used  available 1/2"), "{text}");
        let line = text.lines().find(|l| l.contains("groq-1")).unwrap();
        assert!(
            line.contains("active") && line.contains("250/1,000 25.0%"),
            "{line}"
        );
        let line = text.lines().find(|l| l.contains("groq-2")).unwrap();
        assert!(
            line.contains("quota used up") && line.contains("[██████████]"),
            "{line}"
        );
        assert!(!text.contains('\x1b'), "no colours off a terminal");
        assert!(render(&snapshot(), "x", Colors::On).contains("\x1b[32m"));
    }
}
