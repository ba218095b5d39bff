//! Builds a [`Snapshot`] from its inputs — the pools' live state, the recent request log and the
//! recorded upstream trouble — without any I/O, so it is tested directly.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{
    AccountState, AccountView, ErrorView, Hold, PoolForecast, ProviderView, QuotaFigures, Snapshot,
    WindowFigures, WindowForecast, HISTORY_MINUTES, RATE_SPAN_MINUTES,
};
use crate::actors::pool::{MemberStatus, PoolStatus};
use crate::domain::account::WindowStats;
use crate::domain::forecast::{self, Budget, Horizon, Rate};
use crate::domain::time::{to_datetime, Millis};
use crate::domain::LimitKind;
use crate::store::activity::Activity;

/// Windows at least this long get a forecast: shorter ones free up faster than it would help.
pub const LONG_WINDOW_MS: Millis = 3_600_000;

/// One pool's live state, as the actors answered.
#[derive(Debug, Clone)]
pub struct PoolInput {
    pub status: PoolStatus,
    /// Whether the provider is routed to.
    pub active: bool,
    /// Each account's windows, by account id.
    pub windows: HashMap<String, Vec<WindowStats>>,
}

/// Upstream trouble an account had, as the runtime's events told it (a 429 retried elsewhere
/// leaves no failed request in the log, but it does cool the account down).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub at: Millis,
    /// Why the account cools down, when the trouble set a cooldown.
    pub cooldown_why: Option<String>,
    pub message: String,
}

/// An account's current rate, from the request log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AccountRate {
    pub requests: Rate,
    pub tokens: Rate,
}

/// Each account's rate over the rate span, by account id.
pub struct Rates<'a>(HashMap<&'a str, AccountRate>);

impl Rates<'_> {
    /// The rate of the account `account_id`: zero when it served nothing over the span.
    pub fn of(&self, account_id: &str) -> AccountRate {
        self.0.get(account_id).copied().unwrap_or_default()
    }
}

/// Each account's rate over the rate span.
pub fn rates(activity: &Activity) -> Rates<'_> {
    let span = RATE_SPAN_MINUTES * 60_000;
    Rates(
        activity
            .account_use
            .iter()
            .map(|u| {
                let rate = AccountRate {
                    requests: Rate::over(u.requests.max(0) as u64, span),
                    tokens: Rate::over(u.tokens.max(0) as u64, span),
                };
                (u.account_id.as_str(), rate)
            })
            .collect(),
    )
}

/// When a member's quota runs out at its rate (`None` when not before its reset).
pub fn quota_exhausts_at(m: &MemberStatus, rate: AccountRate, now: Millis) -> Option<Millis> {
    forecast::runs_out_at(&quota_budget(m, rate), now)
}

fn quota_budget(m: &MemberStatus, rate: AccountRate) -> Budget {
    Budget {
        used: m.quota_used,
        limit: m.quota_limit,
        horizon: Horizon::ResetsAt(m.reset_at),
        rate: rate.tokens,
    }
}

fn window_budget(w: &WindowStats, rate: AccountRate) -> Option<Budget> {
    let rate = match w.kind {
        LimitKind::Requests => rate.requests,
        LimitKind::Tokens => rate.tokens,
        LimitKind::Concurrent => return None,
    };
    (w.period_ms >= LONG_WINDOW_MS).then_some(Budget {
        used: w.current,
        limit: w.limit,
        horizon: match w.resets_at {
            Some(t) => Horizon::ResetsAt(t),
            None => Horizon::Sliding(w.period_ms),
        },
        rate,
    })
}

/// The whole picture at `now`.
pub fn compose(
    pools: Vec<PoolInput>,
    activity: &Activity,
    problems: &HashMap<String, Problem>,
    now: Millis,
) -> Snapshot {
    let rates = rates(activity);
    let mut history: HashMap<&str, (Vec<u64>, Vec<u64>)> = HashMap::new();
    for m in &activity.minutes {
        let Ok(ago) = usize::try_from(m.ago) else {
            continue;
        };
        if ago >= HISTORY_MINUTES {
            continue;
        }
        let (requests, errors) = history
            .entry(m.provider_id.as_str())
            .or_insert_with(|| (vec![0; HISTORY_MINUTES], vec![0; HISTORY_MINUTES]));
        requests[HISTORY_MINUTES - 1 - ago] += m.requests.max(0) as u64;
        errors[HISTORY_MINUTES - 1 - ago] += m.errors.max(0) as u64;
    }
    let last_errors: HashMap<&str, &crate::store::activity::LastError> = activity
        .last_errors
        .iter()
        .map(|e| (e.account_id.as_str(), e))
        .collect();

    let providers = pools
        .into_iter()
        .map(|pool| {
            let (requests_history, errors_history) = history
                .remove(pool.status.provider_id.as_str())
                .unwrap_or_else(|| (vec![0; HISTORY_MINUTES], vec![0; HISTORY_MINUTES]));
            let mut budgets: Vec<(Budget, Vec<(String, Budget)>)> = Vec::new();
            let accounts: Vec<AccountView> = pool
                .status
                .accounts_status
                .iter()
                .map(|m| {
                    let rate = rates.of(&m.account_id);
                    let windows = pool
                        .windows
                        .get(&m.account_id)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    let view = account(
                        m,
                        windows,
                        rate,
                        last_errors.get(m.account_id.as_str()).copied(),
                        problems.get(&m.account_id),
                        now,
                    );
                    if !matches!(view.state, AccountState::Disabled | AccountState::Expired) {
                        let long = windows
                            .iter()
                            .filter_map(|w| Some((w.limit_type.clone(), window_budget(w, rate)?)))
                            .collect();
                        budgets.push((quota_budget(m, rate), long));
                    }
                    view
                })
                .collect();
            let last = |series: &[u64]| series.last().copied().unwrap_or(0);
            ProviderView {
                provider_id: pool.status.provider_id.clone(),
                provider: pool.status.provider.clone(),
                strategy: pool.status.strategy.as_str().to_string(),
                active: pool.active,
                total_accounts: pool.status.total_accounts,
                available_accounts: pool.status.available_accounts,
                requests_per_minute: last(&requests_history),
                errors_per_minute: last(&errors_history),
                requests_history,
                errors_history,
                forecast: pool_forecast(&budgets, now),
                accounts,
            }
        })
        .collect();
    Snapshot {
        generated_at: to_datetime(now),
        rate_span_minutes: RATE_SPAN_MINUTES,
        providers,
    }
}

fn pool_forecast(members: &[(Budget, Vec<(String, Budget)>)], now: Millis) -> PoolForecast {
    let quotas: Vec<Budget> = members.iter().map(|(q, _)| *q).collect();
    // Only windows every usable member has: a member without one has no such limit.
    let labels: Vec<&String> = members
        .first()
        .map(|(_, ws)| ws.iter().map(|(l, _)| l).collect())
        .unwrap_or_default();
    let windows = labels
        .into_iter()
        .filter_map(|label| {
            let budgets: Option<Vec<Budget>> = members
                .iter()
                .map(|(_, ws)| ws.iter().find(|(l, _)| l == label).map(|(_, b)| *b))
                .collect();
            Some(WindowForecast {
                limit_type: label.clone(),
                exhausts_at: forecast::pool_runs_out_at(&budgets?, now).map(to_datetime),
            })
        })
        .collect();
    PoolForecast {
        quota_exhausts_at: forecast::pool_runs_out_at(&quotas, now).map(to_datetime),
        windows,
    }
}

fn account(
    m: &MemberStatus,
    windows: &[WindowStats],
    rate: AccountRate,
    logged: Option<&crate::store::activity::LastError>,
    problem: Option<&Problem>,
    now: Millis,
) -> AccountView {
    let state = if !m.active {
        AccountState::Disabled
    } else {
        match m.reason.as_deref() {
            Some("expired") => AccountState::Expired,
            Some("quota_exceeded") => AccountState::QuotaExhausted,
            _ if m.cooldown_until.is_some() => AccountState::CoolingDown,
            _ if m.circuit_open_until.is_some() => AccountState::CircuitOpen,
            // Anything else the runtime reports as unavailable (e.g. a disabled reason).
            Some(_) if !m.available => AccountState::Disabled,
            _ => AccountState::Active,
        }
    };
    let cooldown = m.cooldown_until.map(|until| Hold {
        until: to_datetime(until),
        why: problem
            .and_then(|p| p.cooldown_why.clone())
            .unwrap_or_else(|| "the upstream asked to wait".into()),
    });
    let logged = logged.map(|e| ErrorView {
        at: e.ts.and_utc(),
        status: u16::try_from(e.status_code).ok(),
        error_type: e.error_type.clone(),
        message: e
            .error_message
            .clone()
            .or_else(|| e.error_type.clone())
            .unwrap_or_else(|| format!("status {}", e.status_code)),
    });
    let seen = problem
        .filter(|p| now - p.at <= HISTORY_MINUTES as Millis * 60_000)
        .map(|p| ErrorView {
            at: to_datetime(p.at),
            status: None,
            error_type: None,
            message: p.message.clone(),
        });
    let last_error = match (logged, seen) {
        (Some(a), Some(b)) => Some(if b.at > a.at { b } else { a }),
        (a, b) => a.or(b),
    };
    AccountView {
        account_id: m.account_id.clone(),
        account: m.account.clone(),
        state,
        reason: m.reason.clone(),
        cooldown,
        circuit_open_until: m.circuit_open_until.map(to_datetime),
        quota: QuotaFigures {
            used: m.quota_used,
            limit: m.quota_limit,
            usage_percent: m.usage_percent,
            reset_at: to_datetime(m.reset_at),
            exhausts_at: quota_exhausts_at(m, rate, now).map(to_datetime),
        },
        windows: windows
            .iter()
            .map(|w| WindowFigures {
                limit_type: w.limit_type.clone(),
                limit: w.limit,
                current: w.current,
                in_flight: w.in_flight,
                usage_percent: percent(w.current, w.limit),
                retry_after: w.retry_after,
                resets_at: w.resets_at.map(to_datetime),
                exhausts_at: window_budget(w, rate)
                    .and_then(|b| forecast::runs_out_at(&b, now))
                    .map(to_datetime),
            })
            .collect(),
        in_flight: m.in_flight,
        requests_per_minute: rate.requests.per_minute(),
        tokens_per_minute: rate.tokens.per_minute(),
        last_error,
    }
}

fn percent(used: u64, limit: u64) -> f64 {
    if limit == 0 {
        0.0
    } else {
        used as f64 * 100.0 / limit as f64
    }
}

/// `at` as a time for people: `14:05:09 UTC`, with the date when it is not `now`'s day.
pub fn clock_time(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if at.date_naive() == now.date_naive() {
        at.format("%H:%M:%S UTC").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M UTC").to_string()
    }
}

/// How far `at` is from `now`, for people: `in 3 min`, `2 h ago`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (at - now).num_seconds();
    let span = secs.unsigned_abs();
    let text = if span < 60 {
        format!("{span} s")
    } else if span < 3600 {
        format!("{} min", span / 60)
    } else if span < 48 * 3600 {
        format!("{} h {} min", span / 3600, span % 3600 / 60)
    } else {
        format!("{} days", span / 86_400)
    };
    if secs >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests;
