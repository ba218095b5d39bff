use super::*;
use crate::domain::Strategy;
use crate::store::activity::{AccountUse, LastError, MinuteCount};

const NOW: Millis = 1_764_590_400_000; // 2025-12-01T12:00:00Z
const MIN: Millis = 60_000;

fn member(id: &str, used: u64, limit: u64) -> MemberStatus {
    MemberStatus {
        account_id: id.into(),
        account: format!("name-{id}"),
        active: true,
        available: true,
        reason: None,
        quota_used: used,
        quota_limit: limit,
        usage_percent: used as f64 * 100.0 / limit.max(1) as f64,
        reset_at: NOW + 10 * 60 * MIN,
        in_flight: 0,
        cooldown_until: None,
        circuit_open_until: None,
    }
}

fn pool(members: Vec<MemberStatus>, windows: HashMap<String, Vec<WindowStats>>) -> PoolInput {
    PoolInput {
        status: PoolStatus {
            provider_id: "p1".into(),
            provider: "groq".into(),
            strategy: Strategy::LeastUsed,
            total_accounts: members.len(),
            available_accounts: members.iter().filter(|m| m.available).count(),
            accounts_status: members,
        },
        active: true,
        windows,
    }
}

fn tpd(current: u64, limit: u64) -> WindowStats {
    WindowStats {
        limit_type: "tpd".into(),
        limit,
        current,
        in_flight: 0,
        window_start: NOW - 24 * 60 * MIN,
        retry_after: 0.0,
        kind: LimitKind::Tokens,
        period_ms: 24 * 60 * MIN,
        resets_at: None,
    }
}

fn used(account: &str, requests: i64, tokens: i64) -> AccountUse {
    AccountUse {
        account_id: account.into(),
        requests,
        tokens,
    }
}

#[test]
fn accounts_get_their_rate_and_quota_forecast_from_the_log() {
    // 1500 tokens over the 15-minute span: 100 a minute; 600 left: 6 minutes.
    let activity = Activity {
        account_use: vec![used("a", 15, 1500)],
        ..Activity::default()
    };
    let s = compose(
        vec![pool(
            vec![member("a", 400, 1000), member("b", 0, 1000)],
            HashMap::new(),
        )],
        &activity,
        &HashMap::new(),
        NOW,
    );
    let a = &s.providers[0].accounts[0];
    assert_eq!(a.requests_per_minute, 1.0);
    assert_eq!(a.tokens_per_minute, 100.0);
    assert_eq!(a.quota.exhausts_at, Some(to_datetime(NOW + 6 * MIN)));
    assert_eq!(
        s.providers[0].accounts[1].quota.exhausts_at, None,
        "no traffic"
    );
    // The pool: 1600 left at 100 a minute.
    assert_eq!(
        s.providers[0].forecast.quota_exhausts_at,
        Some(to_datetime(NOW + 16 * MIN))
    );
}

#[test]
fn long_windows_get_a_forecast_for_the_account_and_the_pool() {
    let windows = HashMap::from([
        ("a".to_string(), vec![tpd(9000, 10_000)]),
        ("b".to_string(), vec![tpd(0, 10_000)]),
    ]);
    let activity = Activity {
        account_use: vec![used("a", 15, 1500)],
        ..Activity::default()
    };
    let s = compose(
        vec![pool(vec![member("a", 0, 0), member("b", 0, 0)], windows)],
        &activity,
        &HashMap::new(),
        NOW,
    );
    let w = &s.providers[0].accounts[0].windows[0];
    assert_eq!(w.exhausts_at, Some(to_datetime(NOW + 10 * MIN)));
    assert_eq!(w.usage_percent, 90.0);
    assert_eq!(
        s.providers[0].forecast.quota_exhausts_at, None,
        "unlimited quota"
    );
    let pool_tpd = &s.providers[0].forecast.windows[0];
    assert_eq!(pool_tpd.limit_type, "tpd");
    assert_eq!(pool_tpd.exhausts_at, Some(to_datetime(NOW + 110 * MIN)));
}

#[test]
fn the_history_is_a_minute_series_per_provider_ending_now() {
    let activity = Activity {
        minutes: vec![
            MinuteCount {
                provider_id: "p1".into(),
                ago: 0,
                requests: 7,
                errors: 2,
            },
            MinuteCount {
                provider_id: "p1".into(),
                ago: 59,
                requests: 3,
                errors: 0,
            },
            MinuteCount {
                provider_id: "p1".into(),
                ago: 60,
                requests: 100,
                errors: 0,
            },
        ],
        ..Activity::default()
    };
    let s = compose(
        vec![pool(vec![], HashMap::new())],
        &activity,
        &HashMap::new(),
        NOW,
    );
    let p = &s.providers[0];
    assert_eq!(p.requests_history.len(), HISTORY_MINUTES);
    assert_eq!(p.requests_history[0], 3);
    assert_eq!(p.requests_history[59], 7);
    assert_eq!((p.requests_per_minute, p.errors_per_minute), (7, 2));
    assert_eq!(
        p.requests_history.iter().sum::<u64>(),
        10,
        "older than an hour is left out"
    );
}

#[test]
fn states_follow_the_runtime_and_cooldowns_say_why() {
    let mut cooling = member("c", 0, 1000);
    cooling.available = false;
    cooling.reason = Some("cooldown".into());
    cooling.cooldown_until = Some(NOW + MIN);
    let mut exhausted = member("x", 1000, 1000);
    exhausted.available = false;
    exhausted.reason = Some("quota_exceeded".into());
    let mut disabled = member("d", 0, 1000);
    disabled.active = false;
    disabled.available = false;
    disabled.reason = Some("upstream rejected the key (401/403)".into());
    let mut open = member("o", 0, 1000);
    open.available = false;
    open.reason = Some("circuit_open".into());
    open.circuit_open_until = Some(NOW + MIN);
    let problems = HashMap::from([(
        "c".to_string(),
        Problem {
            at: NOW - MIN,
            cooldown_why: Some("the upstream answered 429 (rate limited)".into()),
            message: "the upstream answered 429 (rate limited)".into(),
        },
    )]);
    let s = compose(
        vec![pool(
            vec![member("a", 0, 1000), cooling, exhausted, disabled, open],
            HashMap::new(),
        )],
        &Activity::default(),
        &problems,
        NOW,
    );
    let states: Vec<AccountState> = s.providers[0].accounts.iter().map(|a| a.state).collect();
    assert_eq!(
        states,
        [
            AccountState::Active,
            AccountState::CoolingDown,
            AccountState::QuotaExhausted,
            AccountState::Disabled,
            AccountState::CircuitOpen
        ]
    );
    let c = &s.providers[0].accounts[1];
    let hold = c.cooldown.as_ref().unwrap();
    assert_eq!(hold.until, to_datetime(NOW + MIN));
    assert!(hold.why.contains("429"));
    assert!(c.last_error.as_ref().unwrap().message.contains("429"));
    // A disabled member does not count toward the pool's quota.
    assert_eq!(
        s.providers[0].forecast.quota_exhausts_at, None,
        "no traffic, no forecast"
    );
}

#[test]
fn the_last_error_is_the_latest_of_the_log_and_the_events() {
    let logged = LastError {
        account_id: "a".into(),
        ts: to_datetime(NOW - 2 * MIN).naive_utc(),
        status_code: 502,
        error_type: Some("upstream_error".into()),
        error_message: Some("the upstream failed".into()),
    };
    let activity = Activity {
        last_errors: vec![logged],
        ..Activity::default()
    };
    let old = HashMap::from([(
        "a".to_string(),
        Problem {
            at: NOW - 5 * MIN,
            cooldown_why: None,
            message: "older".into(),
        },
    )]);
    let s = compose(
        vec![pool(vec![member("a", 0, 1000)], HashMap::new())],
        &activity,
        &old,
        NOW,
    );
    let e = s.providers[0].accounts[0].last_error.clone().unwrap();
    assert_eq!(
        (e.status, e.message.as_str()),
        (Some(502), "the upstream failed")
    );
    let newer = HashMap::from([(
        "a".to_string(),
        Problem {
            at: NOW - MIN,
            cooldown_why: None,
            message: "newer".into(),
        },
    )]);
    let s = compose(
        vec![pool(vec![member("a", 0, 1000)], HashMap::new())],
        &activity,
        &newer,
        NOW,
    );
    assert_eq!(
        s.providers[0].accounts[0]
            .last_error
            .as_ref()
            .unwrap()
            .message,
        "newer"
    );
}

#[test]
fn times_read_well() {
    let now = to_datetime(NOW);
    assert_eq!(clock_time(to_datetime(NOW + 65_000), now), "12:01:05 UTC");
    assert_eq!(
        clock_time(to_datetime(NOW + 24 * 60 * MIN), now),
        "2025-12-02 12:00 UTC"
    );
    assert_eq!(relative(to_datetime(NOW + 30_000), now), "in 30 s");
    assert_eq!(relative(to_datetime(NOW - 5 * MIN), now), "5 min ago");
    assert_eq!(relative(to_datetime(NOW + 125 * MIN), now), "in 2 h 5 min");
    assert_eq!(
        relative(to_datetime(NOW + 3 * 24 * 60 * MIN), now),
        "in 3 days"
    );
}
