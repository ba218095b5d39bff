//! Tests of the account domain as a whole: unit tests through [`Account`], and property tests
//! that check the guarantees of `window.rs` against an independent reference model kept here.
//!
//! Time is plain [`Millis`] passed in; nothing sleeps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::account::{
    Account, AccountEvent, AccountSpec, AccountState, Denial, Feedback, Grant, RateHeaders,
    Summary, UpstreamOutcome, Usage, BASE_BACKOFF_MS, DEFAULT_COOLDOWN_MS, FAILURE_STREAK,
};
use super::limits::{FixedReset, LimitKind, LimitSpec, NamedLimit, Strategy as Pick};
use super::schedule::Schedule;
use super::selection::order;
use super::time::Millis;

const DAY: Millis = 86_400_000;
/// 01:00 UTC on a day boundary's day: minutes, seconds and days are all aligned.
const T0: Millis = 20_000 * DAY + 3_600_000;
/// The next quota reset of the default daily schedule after `T0`.
const MIDNIGHT: Millis = 20_001 * DAY;
const TIMEOUT: Millis = 600_000;
const M: &str = "llama";
/// A custom window of 64 s: its buckets are exactly 1 s, so expiries are easy to predict.
const PER_64S: u64 = 64_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn sliding(kind: LimitKind, limit: u64, per_ms: u64) -> LimitSpec {
    LimitSpec {
        kind,
        limit,
        per: Some(Duration::from_millis(per_ms)),
        reset: None,
    }
}

fn named(n: NamedLimit, limit: u64) -> LimitSpec {
    LimitSpec {
        kind: n.kind(),
        limit,
        per: n.per(),
        reset: None,
    }
}

fn fixed(kind: LimitKind, limit: u64, cron: &str) -> LimitSpec {
    LimitSpec {
        kind,
        limit,
        per: Some(Duration::from_secs(60)),
        reset: Some(FixedReset {
            cron: cron.into(),
            timezone: "UTC".into(),
        }),
    }
}

fn concurrent(limit: u64) -> LimitSpec {
    LimitSpec {
        kind: LimitKind::Concurrent,
        limit,
        per: None,
        reset: None,
    }
}

/// An active account with provider-wide `limits` and no quota.
fn spec(limits: Vec<LimitSpec>) -> AccountSpec {
    AccountSpec {
        id: Arc::from("acct"),
        active: true,
        disabled_reason: None,
        expires_at: None,
        quota_limit: 0,
        quota_used: 0,
        quota_schedule: Schedule::daily_utc(),
        warning_threshold: 0.8,
        limits: limits.into_iter().map(|l| (None, l)).collect(),
        header_requests: None,
        header_tokens: None,
    }
}

fn with_quota(limit: u64, limits: Vec<LimitSpec>) -> AccountSpec {
    AccountSpec {
        quota_limit: limit,
        ..spec(limits)
    }
}

fn open(spec: &AccountSpec) -> Account {
    Account::new(spec, T0).expect("a valid spec")
}

fn reserve(a: &mut Account, model: &str, estimate: u64, now: Millis) -> Result<Grant, Denial> {
    a.reserve(model, estimate, now, TIMEOUT, &mut Vec::new())
}

fn granted(a: &mut Account, model: &str, estimate: u64, now: Millis) -> u64 {
    match reserve(a, model, estimate, now) {
        Ok(g) => g.reservation,
        Err(d) => panic!("expected a grant at {now}, got {d:?}"),
    }
}

fn commit(a: &mut Account, id: u64, usage: Usage, now: Millis) -> Vec<AccountEvent> {
    let mut events = Vec::new();
    assert!(
        a.commit(id, usage, now, &mut events),
        "reservation {id} was open"
    );
    events
}

fn feedback(a: &mut Account, outcome: UpstreamOutcome, now: Millis) -> Vec<AccountEvent> {
    let fb = Feedback {
        outcome,
        latency_ms: 0,
        headers: RateHeaders::default(),
    };
    let mut events = Vec::new();
    a.feedback(&fb, now, &mut events);
    events
}

/// Everything a reservation can hold: (used, in flight) per window, quota used and reserved,
/// and the account's in-flight count.
fn footprint(a: &Account) -> (Vec<(u64, u64)>, u64, u64, u64) {
    (
        a.windows()
            .iter()
            .map(|w| (w.used(), w.inflight()))
            .collect(),
        a.quota().used(),
        a.quota().reserved(),
        a.inflight(),
    )
}

fn used(a: &Account, label: &str) -> u64 {
    a.windows()
        .iter()
        .find(|w| &**w.label() == label)
        .unwrap_or_else(|| panic!("no window {label}"))
        .used()
}

fn label(a: &Account, i: usize) -> Arc<str> {
    a.windows()[i].label().clone()
}

fn rate_limited(limit: Arc<str>, retry_at: Millis, lower_bound: bool) -> Denial {
    Denial::RateLimited {
        limit,
        retry_at,
        lower_bound,
    }
}

// ---------------------------------------------------------------------------------------------
// Reserve, commit, release
// ---------------------------------------------------------------------------------------------

#[test]
fn a_reservation_holds_a_slot_in_every_window_the_quota_and_concurrency_until_committed() {
    let s = with_quota(
        10_000,
        vec![
            named(NamedLimit::Rpm, 10),
            named(NamedLimit::Tpm, 1_000),
            concurrent(4),
        ],
    );
    let mut a = open(&s);
    let g = reserve(&mut a, M, 100, T0).unwrap();
    assert_eq!(g.deadline, T0 + TIMEOUT);
    assert_eq!(
        (g.remaining_requests, g.remaining_tokens),
        (Some(9), Some(900))
    );
    assert_eq!(footprint(&a), (vec![(1, 1), (100, 100)], 0, 100, 1));

    commit(&mut a, g.reservation, Usage::Reported(80), T0 + 500);
    assert_eq!(footprint(&a), (vec![(1, 0), (80, 0)], 80, 0, 0));
    assert!(
        !a.commit(g.reservation, Usage::Estimate, T0 + 600, &mut Vec::new()),
        "a settled reservation cannot be settled twice"
    );
    assert_eq!(footprint(&a), (vec![(1, 0), (80, 0)], 80, 0, 0));
}

#[test]
fn releasing_returns_every_unit_a_reservation_took() {
    let s = with_quota(
        10_000,
        vec![
            named(NamedLimit::Rpm, 10),
            named(NamedLimit::Tpm, 1_000),
            concurrent(1),
        ],
    );
    let mut a = open(&s);
    let id = granted(&mut a, M, 300, T0);
    assert!(a.release(id));
    assert_eq!(footprint(&a), (vec![(0, 0), (0, 0)], 0, 0, 0));
    assert!(
        !a.release(id),
        "an unknown reservation is not released twice"
    );
    granted(&mut a, M, 1_000, T0 + 1);
}

#[test]
fn a_reservation_refused_by_one_limit_takes_nothing_from_any_other() {
    let s = with_quota(
        1_000,
        vec![
            named(NamedLimit::Rpm, 10),
            named(NamedLimit::Tpm, 100),
            concurrent(3),
        ],
    );
    let mut a = open(&s);
    granted(&mut a, M, 90, T0);

    let before = footprint(&a);
    assert!(matches!(
        reserve(&mut a, M, 20, T0 + 1),
        Err(Denial::RateLimited { limit, .. }) if &*limit == "tpm"
    ));
    assert_eq!(
        footprint(&a),
        before,
        "the token window refused: nothing taken"
    );

    granted(&mut a, M, 1, T0 + 2);
    granted(&mut a, M, 1, T0 + 3);
    let before = footprint(&a);
    assert!(matches!(
        reserve(&mut a, M, 1, T0 + 4),
        Err(Denial::RateLimited { limit, .. }) if &*limit == "concurrent"
    ));
    assert_eq!(footprint(&a), before, "concurrency refused: nothing taken");

    let mut q = open(&with_quota(100, vec![named(NamedLimit::Rpm, 10)]));
    granted(&mut q, M, 60, T0);
    let before = footprint(&q);
    assert!(matches!(
        reserve(&mut q, M, 50, T0 + 1),
        Err(Denial::RateLimited { limit, lower_bound: true, .. }) if &*limit == "quota"
    ));
    assert_eq!(
        footprint(&q),
        before,
        "the quota refused: no request slot taken"
    );
}

#[test]
fn per_model_windows_count_only_their_model_while_provider_windows_count_every_model() {
    let mut s = spec(vec![named(NamedLimit::Rpm, 10)]);
    let mut limits = s.limits.to_vec();
    limits.push((Some(Arc::from("small")), named(NamedLimit::Rpm, 1)));
    s.limits = limits.into();
    let mut a = open(&s);
    assert_eq!(&*label(&a, 1), "small:rpm");

    granted(&mut a, "small", 1, T0);
    assert!(matches!(
        reserve(&mut a, "small", 1, T0 + 1),
        Err(Denial::RateLimited { limit, .. }) if &*limit == "small:rpm"
    ));
    granted(&mut a, "large", 1, T0 + 2);
    granted(&mut a, "large", 1, T0 + 3);
    assert_eq!(used(&a, "rpm"), 3);
    assert_eq!(used(&a, "small:rpm"), 1);
}

// ---------------------------------------------------------------------------------------------
// Denial precedence inside one account: Disabled, Expired, Impossible, QuotaExceeded, RateLimited
// ---------------------------------------------------------------------------------------------

/// An account where every refusal applies at once: full request window, exhausted quota, and a
/// token window that a large request can never fit.
fn everything_refuses(active: bool, expires_at: Option<Millis>) -> Account {
    let mut s = with_quota(
        500,
        vec![named(NamedLimit::Rpm, 1), named(NamedLimit::Tpm, 100)],
    );
    s.active = active;
    s.disabled_reason = (!active).then(|| "by operator".to_string());
    s.expires_at = expires_at;
    let mut a = open(&s);
    a.consume(M, 500, T0, &mut Vec::new());
    a
}

#[test]
fn a_disabled_account_refuses_as_disabled_before_anything_else() {
    let mut a = everything_refuses(false, Some(T0));
    assert_eq!(
        reserve(&mut a, M, 1_000, T0 + 1),
        Err(Denial::Disabled {
            reason: Some("by operator".into())
        })
    );
}

#[test]
fn an_expired_account_refuses_as_expired_before_any_limit_and_says_so_once() {
    let mut a = everything_refuses(true, Some(T0 + 10));
    let mut events = Vec::new();
    assert_eq!(
        a.reserve(M, 1_000, T0 + 10, TIMEOUT, &mut events),
        Err(Denial::Expired)
    );
    assert_eq!(
        a.reserve(M, 1_000, T0 + 11, TIMEOUT, &mut events),
        Err(Denial::Expired)
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == AccountEvent::Expired)
            .count(),
        1,
        "the expiry event fires once"
    );
    assert_eq!(a.status(T0 + 11).reason.as_deref(), Some("expired"));
}

#[test]
fn a_request_larger_than_a_window_is_impossible_even_when_the_quota_is_exhausted() {
    let mut a = everything_refuses(true, None);
    assert_eq!(
        reserve(&mut a, M, 150, T0 + 1),
        Err(Denial::Impossible {
            limit: Arc::from("tpm"),
            limit_value: 100,
            need: 150
        })
    );
}

#[test]
fn a_request_larger_than_the_quota_is_impossible() {
    let mut a = everything_refuses(true, None);
    assert_eq!(
        reserve(&mut a, M, 600, T0 + 1),
        Err(Denial::Impossible {
            limit: Arc::from("quota"),
            limit_value: 500,
            need: 600
        })
    );
}

#[test]
fn an_exhausted_quota_refuses_before_a_full_window() {
    let mut a = everything_refuses(true, None);
    assert_eq!(
        reserve(&mut a, M, 10, T0 + 1),
        Err(Denial::QuotaExceeded { reset_at: MIDNIGHT })
    );
    // Raising the quota above its use lets the full request window speak.
    a.update(
        &AccountSpec {
            quota_limit: 1_000,
            ..with_quota(
                1_000,
                vec![named(NamedLimit::Rpm, 1), named(NamedLimit::Tpm, 100)],
            )
        },
        T0 + 2,
    )
    .unwrap();
    assert!(matches!(
        reserve(&mut a, M, 10, T0 + 3),
        Err(Denial::RateLimited { limit, .. }) if &*limit == "rpm" || &*limit == "tpm"
    ));
}

#[test]
fn when_several_limits_hold_the_latest_one_names_the_retry_time() {
    let mut a = open(&spec(vec![sliding(LimitKind::Requests, 1, PER_64S)]));
    let id = granted(&mut a, M, 1, T0);
    commit(&mut a, id, Usage::Reported(1), T0);
    feedback(
        &mut a,
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(100_000),
            capped: false,
        },
        T0 + 1,
    );
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 2),
        Err(rate_limited(Arc::from("cooldown"), T0 + 100_001, false))
    );
}

// ---------------------------------------------------------------------------------------------
// retry_after
// ---------------------------------------------------------------------------------------------

#[test]
fn retry_after_is_exact_for_settled_usage() {
    let mut a = open(&spec(vec![sliding(LimitKind::Requests, 2, PER_64S)]));
    let window = label(&a, 0);
    let first = granted(&mut a, M, 1, T0);
    commit(&mut a, first, Usage::Reported(1), T0 + 1_000);
    let second = granted(&mut a, M, 1, T0 + 2_000);
    commit(&mut a, second, Usage::Reported(1), T0 + 3_000);

    assert_eq!(
        reserve(&mut a, M, 1, T0 + 5_000),
        Err(rate_limited(window.clone(), T0 + 65_000, false)),
        "the first commit frees its slot one window after its commit"
    );
    assert!(reserve(&mut a, M, 1, T0 + 64_999).is_err());
    granted(&mut a, M, 1, T0 + 65_000);
}

#[test]
fn retry_after_is_a_lower_bound_while_in_flight_work_blocks() {
    let mut a = open(&spec(vec![sliding(LimitKind::Requests, 1, PER_64S)]));
    let window = label(&a, 0);
    granted(&mut a, M, 1, T0);
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 2_000),
        Err(rate_limited(window, T0 + 66_000, true)),
        "the in-flight request holds at least one window after now"
    );
}

#[test]
fn the_lower_bound_flag_stays_when_another_limit_decides_the_retry_time() {
    // The window frees a settled slot at T0 + 64 s (exact), but the concurrency slot is held by a
    // request in flight whose end nobody knows: the answer can only be a lower bound.
    let mut a = open(&spec(vec![
        sliding(LimitKind::Requests, 2, PER_64S),
        concurrent(1),
    ]));
    let window = label(&a, 0);
    let first = granted(&mut a, M, 1, T0);
    commit(&mut a, first, Usage::Reported(1), T0);
    granted(&mut a, M, 1, T0 + 1_000);
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 2_000),
        Err(rate_limited(window, T0 + 64_000, true))
    );
}

#[test]
fn an_upstream_ceiling_does_not_hide_that_in_flight_work_may_block_longer() {
    let mut s = spec(vec![named(NamedLimit::Rpm, 1)]);
    s.header_requests = Some(NamedLimit::Rpm);
    let mut a = open(&s);
    granted(&mut a, M, 1, T0);
    let fb = Feedback {
        outcome: UpstreamOutcome::Success,
        latency_ms: 10,
        headers: RateHeaders {
            requests_remaining: Some(0),
            requests_reset_ms: Some(90_000),
            ..RateHeaders::default()
        },
    };
    a.feedback(&fb, T0, &mut Vec::new());
    // The ceiling lifts at T0 + 90 s, but the request still in flight holds the window until
    // 60 s after it is settled, which may be later.
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 1),
        Err(rate_limited(Arc::from("rpm"), T0 + 90_000, true))
    );
}

#[test]
fn a_fixed_window_retry_is_exact_once_nothing_in_flight_can_give_units_back() {
    let mut a = open(&spec(vec![fixed(LimitKind::Requests, 4, "* * * * *")]));
    let window = label(&a, 0);
    for t in [T0, T0 + 1] {
        let id = granted(&mut a, M, 1, t);
        commit(&mut a, id, Usage::Reported(1), t);
    }
    let third = granted(&mut a, M, 1, T0 + 2);
    let fourth = granted(&mut a, M, 1, T0 + 3);
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 4),
        Err(rate_limited(window.clone(), T0 + 60_000, true)),
        "two in flight plus one fit into the next minute's limit of four, but either may be \
         released unused before it"
    );
    for id in [third, fourth] {
        commit(&mut a, id, Usage::Reported(1), T0 + 4);
    }
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 5),
        Err(rate_limited(window.clone(), T0 + 60_000, false)),
        "all settled: the next minute, exactly"
    );
    for t in 0..4 {
        granted(&mut a, M, 1, T0 + 60_000 + t);
    }
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 60_004),
        Err(rate_limited(window, T0 + 120_000, true)),
        "four in flight still count in the next minute"
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency, quota
// ---------------------------------------------------------------------------------------------

#[test]
fn the_concurrency_limit_holds_until_a_request_is_settled() {
    let mut a = open(&spec(vec![concurrent(2)]));
    let first = granted(&mut a, M, 1, T0);
    granted(&mut a, M, 1, T0 + 1);
    match reserve(&mut a, M, 1, T0 + 2) {
        Err(Denial::RateLimited {
            limit,
            retry_at,
            lower_bound,
        }) => {
            assert_eq!(&*limit, "concurrent");
            assert!(retry_at > T0 + 2);
            assert!(lower_bound, "nobody knows when a request in flight ends");
        }
        other => panic!("expected the concurrency limit, got {other:?}"),
    }
    assert_eq!(a.inflight(), 2);
    commit(&mut a, first, Usage::RequestOnly, T0 + 3);
    granted(&mut a, M, 1, T0 + 3);
}

#[test]
fn a_per_model_concurrency_limit_holds_only_that_models_requests() {
    let mut limits: Vec<(Option<Arc<str>>, LimitSpec)> = vec![(None, concurrent(3))];
    limits.push((Some(Arc::from(M)), concurrent(1)));
    let mut a = open(&AccountSpec {
        limits: limits.into(),
        ..spec(vec![])
    });
    let first = granted(&mut a, M, 1, T0);
    match reserve(&mut a, M, 1, T0 + 1) {
        Err(Denial::RateLimited { limit, .. }) => assert_eq!(&*limit, "llama:concurrent"),
        other => panic!("expected the model's concurrency limit, got {other:?}"),
    }
    // Other models only meet the account-wide limit.
    granted(&mut a, "other", 1, T0 + 1);
    granted(&mut a, "other", 1, T0 + 1);
    match reserve(&mut a, "other", 1, T0 + 2) {
        Err(Denial::RateLimited { limit, .. }) => assert_eq!(&*limit, "concurrent"),
        other => panic!("expected the account's concurrency limit, got {other:?}"),
    }
    commit(&mut a, first, Usage::RequestOnly, T0 + 3);
    assert!(a
        .window_stats(T0 + 3)
        .iter()
        .any(|s| s.limit_type == "llama:concurrent" && s.current == 0));
}

#[test]
fn the_quota_resets_at_its_cron_boundary_and_says_so() {
    let mut a = open(&with_quota(1_000, vec![]));
    let id = granted(&mut a, M, 400, T0);
    commit(&mut a, id, Usage::Reported(400), T0 + 1);
    let late = granted(&mut a, M, 200, T0 + 2);
    assert!(
        matches!(
            reserve(&mut a, M, 500, T0 + 3),
            Err(Denial::RateLimited { limit, lower_bound: true, .. }) if &*limit == "quota"
        ),
        "the 200 in flight may come back unused: held, not exhausted"
    );
    assert_eq!(
        reserve(&mut a, M, 700, MIDNIGHT - 1),
        Err(Denial::QuotaExceeded { reset_at: MIDNIGHT }),
        "settled usage alone leaves no room for 700: exhausted until the reset"
    );

    let mut events = Vec::new();
    let g = a.reserve(M, 500, MIDNIGHT, TIMEOUT, &mut events).unwrap();
    assert_eq!(
        events,
        vec![AccountEvent::QuotaReset { previous_used: 400 }]
    );
    assert_eq!(a.quota().used(), 0);
    assert_eq!(
        a.quota().reserved(),
        700,
        "the reservation across midnight stays reserved"
    );
    assert_eq!(a.quota().reset_at(), MIDNIGHT + DAY);
    assert_eq!(a.quota().period_start(), MIDNIGHT);

    commit(&mut a, late, Usage::Reported(150), MIDNIGHT + 1);
    commit(&mut a, g.reservation, Usage::Reported(100), MIDNIGHT + 2);
    assert_eq!(
        a.quota().used(),
        250,
        "commits after the reset count in the new period"
    );
}

#[test]
fn warning_and_exhaustion_are_each_announced_once_per_period() {
    let mut a = open(&with_quota(100, vec![]));
    let spend = |a: &mut Account, tokens: u64, now: Millis| {
        let mut events = Vec::new();
        let id = a
            .reserve(M, tokens, now, TIMEOUT, &mut events)
            .unwrap()
            .reservation;
        assert!(a.commit(id, Usage::Reported(tokens), now, &mut events));
        events
    };
    assert!(spend(&mut a, 50, T0).is_empty());
    assert!(matches!(
        spend(&mut a, 40, T0 + 1)[..],
        [AccountEvent::QuotaWarning {
            used: 90,
            limit: 100,
            ..
        }]
    ));
    assert!(spend(&mut a, 5, T0 + 2).is_empty(), "no second warning");
    assert_eq!(
        spend(&mut a, 5, T0 + 3),
        vec![AccountEvent::QuotaExhausted {
            used: 100,
            limit: 100
        }]
    );
    let mut events = Vec::new();
    a.consume(M, 5, T0 + 4, &mut events);
    assert!(events.is_empty(), "no second exhaustion");
    assert_eq!(a.status(T0 + 4).reason.as_deref(), Some("quota_exceeded"));

    let events = spend(&mut a, 85, MIDNIGHT);
    assert!(matches!(
        events[..],
        [
            AccountEvent::QuotaReset { previous_used: 105 },
            AccountEvent::QuotaWarning { used: 85, .. }
        ]
    ));
}

// ---------------------------------------------------------------------------------------------
// Settling
// ---------------------------------------------------------------------------------------------

#[test]
fn a_commit_corrects_the_token_estimate_down_and_up() {
    let mut a = open(&with_quota(10_000, vec![named(NamedLimit::Tpm, 1_000)]));
    let id = granted(&mut a, M, 100, T0);
    commit(&mut a, id, Usage::Reported(40), T0 + 1);
    assert_eq!((used(&a, "tpm"), a.quota().used()), (40, 40));
    let id = granted(&mut a, M, 100, T0 + 2);
    commit(&mut a, id, Usage::Reported(250), T0 + 3);
    assert_eq!((used(&a, "tpm"), a.quota().used()), (290, 290));
    assert_eq!(a.quota().reserved(), 0);
}

#[test]
fn an_upstream_error_counts_its_request_slot_but_no_tokens() {
    let mut a = open(&with_quota(
        10_000,
        vec![named(NamedLimit::Rpm, 10), named(NamedLimit::Tpm, 1_000)],
    ));
    let id = granted(&mut a, M, 100, T0);
    commit(&mut a, id, Usage::RequestOnly, T0 + 1);
    assert_eq!(footprint(&a), (vec![(1, 0), (0, 0)], 0, 0, 0));
}

#[test]
fn an_unknown_outcome_is_committed_at_the_estimate() {
    let mut a = open(&with_quota(
        10_000,
        vec![named(NamedLimit::Rpm, 10), named(NamedLimit::Tpm, 1_000)],
    ));
    let id = granted(&mut a, M, 100, T0);
    commit(&mut a, id, Usage::Estimate, T0 + 1);
    assert_eq!(footprint(&a), (vec![(1, 0), (100, 0)], 100, 0, 0));
}

#[test]
fn an_unsettled_reservation_expires_at_its_deadline_and_is_committed_at_its_estimate() {
    let mut a = open(&with_quota(
        10_000,
        vec![named(NamedLimit::Tpm, 1_000), concurrent(1)],
    ));
    let mut events = Vec::new();
    let g = a.reserve(M, 300, T0, 1_000, &mut events).unwrap();
    assert_eq!(a.next_deadline(), Some(T0 + 1_000));
    assert_eq!(a.expire(T0 + 999, &mut events), 0);

    assert!(
        a.renew(g.reservation, T0 + 500, 1_000),
        "a long stream renews"
    );
    assert_eq!(a.next_deadline(), Some(T0 + 1_500));
    assert_eq!(
        a.expire(T0 + 1_000, &mut events),
        0,
        "renewed past the old deadline"
    );
    assert_eq!(a.expire(T0 + 1_500, &mut events), 1);
    assert_eq!(footprint(&a), (vec![(300, 0)], 300, 0, 0));
    assert_eq!(a.next_deadline(), None);

    assert!(!a.commit(g.reservation, Usage::Reported(10), T0 + 1_600, &mut events));
    assert!(!a.renew(g.reservation, T0 + 1_600, 1_000));
    assert!(!a.release(g.reservation));
    assert_eq!(
        footprint(&a),
        (vec![(300, 0)], 300, 0, 0),
        "a late settle changes nothing"
    );
    granted(&mut a, M, 1, T0 + 1_600);
}

// ---------------------------------------------------------------------------------------------
// Upstream feedback: cooldown, circuit breaker, 401, headers
// ---------------------------------------------------------------------------------------------

#[test]
fn an_upstream_429_cools_the_account_down_for_its_retry_after() {
    let mut a = open(&spec(vec![]));
    let events = feedback(
        &mut a,
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(7_000),
            capped: false,
        },
        T0,
    );
    assert_eq!(
        events,
        vec![AccountEvent::Cooldown {
            until: T0 + 7_000,
            reason: "upstream_429"
        }]
    );
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 1),
        Err(rate_limited(Arc::from("cooldown"), T0 + 7_000, false))
    );
    assert_eq!(a.status(T0 + 6_999).reason.as_deref(), Some("cooldown"));
    granted(&mut a, M, 1, T0 + 7_000);
}

#[test]
fn a_429_without_retry_after_uses_the_reset_header_or_a_doubling_default() {
    let mut a = open(&spec(vec![]));
    let fb = Feedback {
        outcome: UpstreamOutcome::RateLimited {
            retry_after_ms: None,
            capped: false,
        },
        latency_ms: 0,
        headers: RateHeaders {
            tokens_reset_ms: Some(3_000),
            ..RateHeaders::default()
        },
    };
    let mut events = Vec::new();
    a.feedback(&fb, T0, &mut events);
    assert!(matches!(events[..], [AccountEvent::Cooldown { until, .. }] if until == T0 + 3_000));

    let mut b = open(&spec(vec![]));
    let limited = UpstreamOutcome::RateLimited {
        retry_after_ms: None,
        capped: false,
    };
    let until = |events: Vec<AccountEvent>| match events[..] {
        [AccountEvent::Cooldown { until, .. }] => until,
        _ => panic!("expected one cooldown, got {events:?}"),
    };
    assert_eq!(
        until(feedback(&mut b, limited.clone(), T0)),
        T0 + DEFAULT_COOLDOWN_MS
    );
    let t1 = T0 + DEFAULT_COOLDOWN_MS;
    assert_eq!(
        until(feedback(&mut b, limited.clone(), t1)),
        t1 + 2 * DEFAULT_COOLDOWN_MS
    );
    feedback(&mut b, UpstreamOutcome::Success, t1 + 1);
    let t2 = t1 + 10 * DEFAULT_COOLDOWN_MS;
    assert_eq!(
        until(feedback(&mut b, limited.clone(), t2)),
        t2 + DEFAULT_COOLDOWN_MS,
        "a success resets the doubling"
    );
}

#[test]
fn a_failure_streak_opens_the_circuit_and_half_open_lets_one_probe_through_at_a_time() {
    let mut a = open(&spec(vec![]));
    for i in 0..FAILURE_STREAK - 1 {
        assert!(feedback(&mut a, UpstreamOutcome::Failure, T0 + i as Millis).is_empty());
    }
    let id = granted(&mut a, M, 1, T0 + 10);
    assert!(
        a.release(id),
        "the circuit is still closed below the streak"
    );

    let opened = T0 + 20;
    let events = feedback(&mut a, UpstreamOutcome::Failure, opened);
    let until = opened + BASE_BACKOFF_MS;
    assert_eq!(
        events,
        vec![AccountEvent::Cooldown {
            until,
            reason: "upstream_failures"
        }]
    );
    assert_eq!(
        reserve(&mut a, M, 1, opened + 1),
        Err(rate_limited(Arc::from("circuit_open"), until, false))
    );
    assert_eq!(a.status(opened + 1).reason.as_deref(), Some("circuit_open"));
    assert!(reserve(&mut a, M, 1, until - 1).is_err());

    // Half-open: one probe, the rest wait for it.
    let probe = granted(&mut a, M, 1, until);
    assert!(matches!(
        reserve(&mut a, M, 1, until + 1),
        Err(Denial::RateLimited { limit, lower_bound: true, .. }) if &*limit == "circuit_probe"
    ));

    // The probe fails: open again, twice as long.
    let failed = until + 100;
    let events = feedback(&mut a, UpstreamOutcome::Failure, failed);
    let reopened = failed + 2 * BASE_BACKOFF_MS;
    assert_eq!(
        events,
        vec![AccountEvent::Cooldown {
            until: reopened,
            reason: "upstream_failures"
        }]
    );
    commit(&mut a, probe, Usage::RequestOnly, failed);
    assert_eq!(
        reserve(&mut a, M, 1, reopened - 1),
        Err(rate_limited(Arc::from("circuit_open"), reopened, false))
    );

    // The next probe succeeds: closed, and everyone passes again.
    let probe = granted(&mut a, M, 1, reopened);
    assert!(reserve(&mut a, M, 1, reopened + 1).is_err());
    feedback(&mut a, UpstreamOutcome::Success, reopened + 50);
    commit(&mut a, probe, Usage::Reported(1), reopened + 50);
    for i in 0..5 {
        granted(&mut a, M, 1, reopened + 60 + i);
    }
}

#[test]
fn a_probe_settled_without_feedback_lets_the_next_probe_through() {
    let mut a = open(&spec(vec![]));
    for i in 0..FAILURE_STREAK {
        feedback(&mut a, UpstreamOutcome::Failure, T0 + i as Millis);
    }
    let half_open = T0 + FAILURE_STREAK as Millis - 1 + BASE_BACKOFF_MS;
    let probe = granted(&mut a, M, 1, half_open);
    assert!(reserve(&mut a, M, 1, half_open + 1).is_err());
    assert!(a.release(probe));
    granted(&mut a, M, 1, half_open + 2);
    assert!(
        reserve(&mut a, M, 1, half_open + 3).is_err(),
        "still one probe at a time"
    );
    let mut events = Vec::new();
    assert_eq!(
        a.expire(half_open + 2 + TIMEOUT, &mut events),
        1,
        "an expired probe ends too"
    );
    granted(&mut a, M, 1, half_open + 2 + TIMEOUT);
}

#[test]
fn an_upstream_401_disables_the_account_once_and_refuses_from_then_on() {
    let mut a = open(&spec(vec![]));
    let id = granted(&mut a, M, 1, T0);
    let events = feedback(&mut a, UpstreamOutcome::Unauthorized, T0 + 1);
    let reason = "upstream rejected the key (401)".to_string();
    assert_eq!(
        events,
        vec![AccountEvent::Disabled {
            reason: reason.clone()
        }]
    );
    assert!(feedback(&mut a, UpstreamOutcome::Unauthorized, T0 + 2).is_empty());
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 3),
        Err(Denial::Disabled {
            reason: Some(reason.clone())
        })
    );
    assert!(!a.is_active());
    assert!(!a.status(T0 + 3).available);
    assert!(!a.summary(T0 + 3).available);
    commit(&mut a, id, Usage::RequestOnly, T0 + 4);
    assert_eq!(a.inflight(), 0, "in-flight work still settles");
}

#[test]
fn an_upstream_403_cools_the_account_down_for_that_model_only() {
    let mut a = open(&spec(vec![]));
    let forbidden = UpstreamOutcome::Forbidden {
        model: Arc::from(M),
        cooldown_ms: 600_000,
    };
    let events = feedback(&mut a, forbidden, T0);
    assert_eq!(
        events,
        vec![AccountEvent::Cooldown {
            until: T0 + 600_000,
            reason: "upstream_403"
        }]
    );
    assert!(a.is_active(), "a 403 never disables");
    assert_eq!(
        reserve(&mut a, M, 1, T0 + 1),
        Err(rate_limited(
            Arc::from("model_cooldown"),
            T0 + 600_000,
            false
        ))
    );
    granted(&mut a, "other-model", 1, T0 + 1);
    assert!(
        a.summary(T0 + 1).available,
        "the account serves other models"
    );

    // Persisted, and restored while it lasts.
    let saved = a.state(T0 + 2);
    let mut b = open(&spec(vec![]));
    b.restore(&saved, T0 + 3, None);
    assert!(reserve(&mut b, M, 1, T0 + 4).is_err());
    granted(&mut b, M, 1, T0 + 600_000);
    let mut c = open(&spec(vec![]));
    c.restore(&saved, T0 + 600_000, None);
    assert!(
        c.state(T0 + 600_000).model_cooldowns.is_empty(),
        "lapsed ones are dropped"
    );

    // An operator's reset lifts it.
    a.reset(T0 + 5, &mut Vec::new());
    granted(&mut a, M, 1, T0 + 6);
}

#[test]
fn no_feedback_value_can_overflow_and_lose_the_commit_of_the_same_message() {
    let mut s = spec(vec![named(NamedLimit::Rpm, 10)]);
    s.header_requests = Some(NamedLimit::Rpm);
    let mut a = open(&s);
    let id = granted(&mut a, M, 1, T0);
    // What the actor does for one `Commit` message: commit, then feedback.
    commit(&mut a, id, Usage::Reported(1), T0 + 1);
    for outcome in [
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(Millis::MAX),
            capped: false,
        },
        UpstreamOutcome::Forbidden {
            model: Arc::from(M),
            cooldown_ms: Millis::MAX,
        },
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(Millis::MIN),
            capped: false,
        },
    ] {
        let fb = Feedback {
            outcome,
            latency_ms: u64::MAX,
            headers: RateHeaders {
                requests_remaining: Some(0),
                requests_reset_ms: Some(Millis::MAX),
                ..RateHeaders::default()
            },
        };
        a.feedback(&fb, T0 + 2, &mut Vec::new());
    }
    for _ in 0..100 {
        feedback(
            &mut a,
            UpstreamOutcome::RateLimited {
                retry_after_ms: None,
                capped: false,
            },
            T0 + 3,
        );
    }
    assert_eq!(used(&a, "rpm"), 1, "the commit stands");
}

#[test]
fn a_capped_wait_says_so_in_its_cooldown_event() {
    let mut a = open(&spec(vec![]));
    let events = feedback(
        &mut a,
        UpstreamOutcome::RateLimited {
            retry_after_ms: Some(3_600_000),
            capped: true,
        },
        T0,
    );
    assert_eq!(
        events,
        vec![AccountEvent::Cooldown {
            until: T0 + 3_600_000,
            reason: "upstream_429_capped"
        }]
    );
}

#[test]
fn rate_limit_headers_tighten_the_mapped_windows_until_their_reset() {
    let mut s = spec(vec![
        named(NamedLimit::Rpm, 100),
        named(NamedLimit::Tpm, 10_000),
    ]);
    let mut limits = s.limits.to_vec();
    limits.push((Some(Arc::from("other")), named(NamedLimit::Rpm, 50)));
    s.limits = limits.into();
    s.header_requests = Some(NamedLimit::Rpm);
    s.header_tokens = Some(NamedLimit::Tpm);
    let mut a = open(&s);
    let fb = Feedback {
        outcome: UpstreamOutcome::Success,
        latency_ms: 10,
        headers: RateHeaders {
            requests_remaining: Some(2),
            requests_reset_ms: Some(5_000),
            tokens_remaining: Some(5_000),
            tokens_reset_ms: Some(30_000),
        },
    };
    a.feedback(&fb, T0, &mut Vec::new());
    let g = reserve(&mut a, M, 100, T0 + 1).unwrap();
    assert_eq!(
        (g.remaining_requests, g.remaining_tokens),
        (Some(1), Some(4_900))
    );
    assert_eq!(
        a.windows()[2].counters().ceiling,
        None,
        "the per-model window is not the header's"
    );
    granted(&mut a, M, 100, T0 + 2);
    assert_eq!(
        reserve(&mut a, M, 100, T0 + 3),
        Err(rate_limited(Arc::from("rpm"), T0 + 5_000, false))
    );
    assert!(matches!(
        reserve(&mut a, M, 4_900, T0 + 5_000),
        Err(Denial::RateLimited { limit, retry_at, .. }) if &*limit == "tpm" && retry_at == T0 + 30_000
    ));
    granted(&mut a, M, 100, T0 + 5_000);
}

#[test]
fn rate_limit_headers_never_loosen_beyond_the_configured_limit() {
    let mut s = spec(vec![named(NamedLimit::Rpm, 3)]);
    s.header_requests = Some(NamedLimit::Rpm);
    let mut a = open(&s);
    granted(&mut a, M, 1, T0);
    let fb = Feedback {
        outcome: UpstreamOutcome::Success,
        latency_ms: 10,
        headers: RateHeaders {
            requests_remaining: Some(1_000),
            requests_reset_ms: Some(60_000),
            ..RateHeaders::default()
        },
    };
    a.feedback(&fb, T0 + 1, &mut Vec::new());
    assert_eq!(a.windows()[0].remaining(T0 + 1), 2);
    granted(&mut a, M, 1, T0 + 2);
    granted(&mut a, M, 1, T0 + 3);
    assert!(
        reserve(&mut a, M, 1, T0 + 4).is_err(),
        "the config's 3 per minute still rule"
    );
}

// ---------------------------------------------------------------------------------------------
// Update, state and restore
// ---------------------------------------------------------------------------------------------

#[test]
fn an_update_keeps_counters_and_in_flight_reservations_across_a_limit_change() {
    let limits = |requests: u64| {
        vec![
            sliding(LimitKind::Requests, requests, PER_64S),
            named(NamedLimit::Tpm, 1_000),
        ]
    };
    let mut a = open(&with_quota(1_000, limits(3)));
    let done = granted(&mut a, M, 100, T0);
    commit(&mut a, done, Usage::Reported(100), T0 + 1);
    let open_one = granted(&mut a, M, 200, T0 + 2);

    a.update(&with_quota(2_000, limits(2)), T0 + 10).unwrap();
    assert_eq!(footprint(&a), (vec![(2, 1), (300, 200)], 100, 200, 1));
    assert_eq!(a.quota().limit, 2_000);
    assert!(
        matches!(
            reserve(&mut a, M, 1, T0 + 11),
            Err(Denial::RateLimited { .. })
        ),
        "the tighter limit counts what was admitted before"
    );

    commit(&mut a, open_one, Usage::Reported(150), T0 + 12);
    assert_eq!(footprint(&a), (vec![(2, 0), (250, 0)], 250, 0, 0));

    a.update(&with_quota(2_000, limits(5)), T0 + 13).unwrap();
    assert_eq!(footprint(&a), (vec![(2, 0), (250, 0)], 250, 0, 0));
    granted(&mut a, M, 1, T0 + 14);
}

#[test]
fn a_full_window_is_still_full_after_a_restore() {
    let s = with_quota(1_000, vec![sliding(LimitKind::Requests, 2, PER_64S)]);
    let mut a = open(&s);
    for t in [T0, T0 + 1] {
        let id = granted(&mut a, M, 10, t);
        commit(&mut a, id, Usage::Reported(10), T0 + 1_000);
    }
    let saved = a.state(T0 + 2_000);

    let mut b = Account::new(&s, T0 + 3_000).unwrap();
    b.restore(&saved, T0 + 3_000, None);
    assert!(b.version() > saved.version);
    assert_eq!(b.quota().used(), 20);
    assert_eq!(
        reserve(&mut b, M, 1, T0 + 3_000),
        Err(rate_limited(label(&b, 0), T0 + 65_000, false))
    );
    granted(&mut b, M, 1, T0 + 65_000);
}

#[test]
fn reservations_in_flight_at_save_time_count_as_committed_at_their_estimate_after_restore() {
    let s = with_quota(
        5_000,
        vec![
            named(NamedLimit::Rpm, 10),
            named(NamedLimit::Tpm, 1_000),
            concurrent(1),
        ],
    );
    let mut a = open(&s);
    let id = granted(&mut a, M, 100, T0);
    commit(&mut a, id, Usage::Reported(100), T0 + 1);
    granted(&mut a, M, 300, T0 + 2);
    let saved = a.state(T0 + 3);
    assert_eq!(saved.in_flight, vec![(300, M.to_string())]);

    let mut b = Account::new(&s, T0 + 10).unwrap();
    b.restore(&saved, T0 + 10, None);
    assert_eq!(footprint(&b), (vec![(2, 0), (400, 0)], 400, 0, 0));
    granted(&mut b, M, 1, T0 + 11);
}

#[test]
fn a_crash_gap_is_charged_up_to_the_tightest_window_of_each_kind_and_never_over_a_limit() {
    let mut s = with_quota(
        100_000,
        vec![
            named(NamedLimit::Rpm, 10),
            named(NamedLimit::Rph, 20),
            named(NamedLimit::Tpm, 1_000),
            named(NamedLimit::Tpd, 5_000),
        ],
    );
    let mut limits = s.limits.to_vec();
    limits.push((Some(Arc::from("small")), named(NamedLimit::Rpm, 2)));
    s.limits = limits.into();
    let mut a = open(&s);
    for (i, model) in ["small", "small", "large"].into_iter().enumerate() {
        let id = granted(&mut a, model, 100, T0 + i as Millis);
        commit(&mut a, id, Usage::Reported(100), T0 + 10);
    }
    let saved = a.state(T0 + 20);

    let mut b = Account::new(&s, T0 + 100).unwrap();
    b.restore(&saved, T0 + 100, Some(1_000));
    // Requests: min(10 - 3, 20 - 3) = 7; tokens: min(1000 - 300, 5000 - 300) = 700.
    assert_eq!(used(&b, "rpm"), 10);
    assert_eq!(used(&b, "rph"), 10);
    assert_eq!(
        used(&b, "small:rpm"),
        2,
        "a window already full is not pushed over"
    );
    assert_eq!(used(&b, "tpm"), 1_000);
    assert_eq!(used(&b, "tpd"), 1_000);
    assert_eq!(b.quota().used(), 1_000);
    for w in b.windows() {
        assert!(w.used() <= w.limit(), "{} over its limit", w.label());
    }
}

#[test]
fn a_crash_gap_without_a_window_of_a_kind_is_charged_at_the_peak_per_interval() {
    let s = with_quota(100_000, vec![named(NamedLimit::Rpm, 10)]);
    let mut a = open(&s);
    a.set_peak_interval(1_000);
    for i in 0..3 {
        let id = granted(&mut a, M, 100, T0 + i);
        commit(&mut a, id, Usage::Reported(100), T0 + 10);
    }
    let saved = a.state(T0 + 20);
    assert_eq!((saved.peak_requests, saved.peak_tokens), (3, 300));

    let mut b = Account::new(&s, T0 + 100).unwrap();
    b.set_peak_interval(1_000);
    b.restore(&saved, T0 + 100, Some(1_500));
    // A gap of 1.5 intervals spans two: 2 × 300 tokens on top of the 300 saved.
    assert_eq!(b.quota().used(), 900);
    assert_eq!(used(&b, "rpm"), 10);
}

#[test]
fn a_crash_gap_never_charges_the_quota_beyond_its_own_room() {
    let s = with_quota(100_000, vec![named(NamedLimit::Tpm, 100_000_000)]);
    let mut a = open(&s);
    let id = granted(&mut a, M, 100, T0);
    commit(&mut a, id, Usage::Reported(300), T0 + 1);
    let saved = a.state(T0 + 2);
    let mut b = open(&s);
    b.restore(&saved, T0 + 100, Some(1_000));
    assert_eq!(b.quota().used(), 100_000, "not 100 000 300");
    assert_eq!(
        used(&b, "tpm"),
        100_000_000,
        "the window is charged its room"
    );
}

#[test]
fn an_account_with_no_saved_copy_is_charged_the_gap_and_keeps_its_stored_usage() {
    let mut s = with_quota(
        10_000,
        vec![named(NamedLimit::Rpm, 10), named(NamedLimit::Tpm, 600)],
    );
    s.quota_used = 250;
    let mut a = open(&s);
    a.restore(&AccountState::missing(), T0 + 10, Some(500));
    assert_eq!(used(&a, "rpm"), 10);
    assert_eq!(used(&a, "tpm"), 600);
    assert_eq!(a.quota().used(), 850, "the stored 250 plus the gap's 600");
    let mut clean = open(&s);
    clean.restore(&AccountState::missing(), T0 + 10, None);
    assert_eq!((used(&clean, "rpm"), clean.quota().used()), (0, 250));
}

#[test]
fn an_unreadable_saved_copy_fills_every_window_and_restores_above_its_version() {
    let mut s = with_quota(
        10_000,
        vec![
            named(NamedLimit::Rpm, 10),
            sliding(LimitKind::Tokens, 500, PER_64S),
        ],
    );
    s.quota_used = 40;
    let mut a = open(&s);
    a.restore(&AccountState::unreadable(1_000), T0, None);
    assert!(
        a.version() > 1_000,
        "its next writes are newer than the unreadable copy"
    );
    assert_eq!((used(&a, "rpm"), a.quota().used()), (10, 40));
    assert!(a.windows().iter().all(|w| w.remaining(T0) == 0));
    // Held one window length, no longer.
    granted(&mut a, M, 1, T0 + 64_000);
}

#[test]
fn turning_a_sliding_limit_fixed_or_back_keeps_its_counters_across_a_restart() {
    let daily_sliding = vec![named(NamedLimit::Rpd, 100)];
    let daily_fixed = vec![LimitSpec {
        reset: Some(FixedReset {
            cron: "0 0 * * *".into(),
            timezone: "UTC".into(),
        }),
        ..named(NamedLimit::Rpd, 100)
    }];
    // Sliding, then fixed: the 3 requests of the last hours still count today.
    let mut a = open(&spec(daily_sliding.clone()));
    for i in 0..3 {
        let id = granted(&mut a, M, 1, T0 + i);
        commit(&mut a, id, Usage::Reported(1), T0 + 10);
    }
    let saved = a.state(T0 + 20);
    let mut fixed = open(&spec(daily_fixed.clone()));
    fixed.restore(&saved, T0 + 30, None);
    assert_eq!(used(&fixed, "rpd:fixed"), 3);
    fixed.roll(MIDNIGHT, &mut Vec::new());
    assert_eq!(used(&fixed, "rpd:fixed"), 0, "its next reset frees them");

    // Fixed, then sliding: held one window length after the period's end or now.
    let mut b = open(&spec(daily_fixed));
    for i in 0..4 {
        let id = granted(&mut b, M, 1, T0 + i);
        commit(&mut b, id, Usage::Reported(1), T0 + 10);
    }
    let saved = b.state(T0 + 20);
    let mut back = open(&spec(daily_sliding));
    back.restore(&saved, T0 + 30, None);
    assert_eq!(used(&back, "rpd"), 4);
    back.roll(MIDNIGHT, &mut Vec::new());
    assert_eq!(
        used(&back, "rpd"),
        4,
        "a sliding day holds them past midnight"
    );
}

#[test]
fn turning_a_sliding_limit_fixed_at_run_time_keeps_its_counters() {
    let mut a = open(&spec(vec![named(NamedLimit::Rpm, 5)]));
    for i in 0..2 {
        let id = granted(&mut a, M, 1, T0 + i);
        commit(&mut a, id, Usage::Reported(1), T0 + 10);
    }
    let fixed = spec(vec![fixed(LimitKind::Requests, 5, "* * * * *")]);
    a.update(&fixed, T0 + 20).unwrap();
    assert_eq!(a.windows()[0].used(), 2);
}

#[test]
fn a_fixed_window_whose_schedule_changed_resets_at_the_new_schedule_only() {
    let utc = vec![LimitSpec {
        reset: Some(FixedReset {
            cron: "0 0 * * *".into(),
            timezone: "UTC".into(),
        }),
        ..named(NamedLimit::Rpd, 100)
    }];
    let tokyo = vec![LimitSpec {
        reset: Some(FixedReset {
            cron: "0 0 * * *".into(),
            timezone: "Asia/Tokyo".into(),
        }),
        ..named(NamedLimit::Rpd, 100)
    }];
    // T0 is 01:00 UTC = 10:00 in Tokyo; Tokyo's next midnight is 15:00 UTC.
    let mut a = open(&spec(utc));
    let id = granted(&mut a, M, 1, T0);
    commit(&mut a, id, Usage::Reported(1), T0 + 10);
    let saved = a.state(T0 + 20);
    let mut b = open(&spec(tokyo));
    b.restore(&saved, T0 + 30, None);
    assert_eq!(used(&b, "rpd:fixed"), 1);
    b.roll(T0 + 13 * 3_600_000, &mut Vec::new());
    assert_eq!(used(&b, "rpd:fixed"), 1, "no reset before Tokyo's midnight");
    b.roll(T0 + 14 * 3_600_000, &mut Vec::new());
    assert_eq!(used(&b, "rpd:fixed"), 0);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random operation sequences against a reference model
// ---------------------------------------------------------------------------------------------

/// How the reference model describes one window of a generated account.
#[derive(Debug, Clone)]
enum WindowGen {
    Sliding {
        kind: LimitKind,
        limit: u64,
        per_ms: u64,
        model: Option<usize>,
    },
    /// Resets every `minutes` minutes (cron `* * * * *` or `*/2 * * * *`, UTC).
    Fixed {
        kind: LimitKind,
        limit: u64,
        minutes: i64,
    },
}

#[derive(Debug, Clone)]
struct AccountGen {
    models: usize,
    windows: Vec<WindowGen>,
    concurrent: Option<u64>,
    quota: u64,
}

#[derive(Debug, Clone, Copy)]
enum UsageGen {
    /// The reported tokens as a per-mille of the estimate (never above it: token windows are
    /// exact up to the estimate).
    Reported(u16),
    RequestOnly,
    Estimate,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Reserve {
        model: usize,
        estimate: u64,
        timeout: Millis,
    },
    Commit {
        pick: usize,
        usage: UsageGen,
    },
    Release {
        pick: usize,
    },
    Renew {
        pick: usize,
        timeout: Millis,
    },
    Expire,
    Success {
        latency: u64,
    },
    /// Settling a reservation that is already settled does nothing.
    SettleStale {
        pick: usize,
    },
}

fn window_gen() -> impl Strategy<Value = WindowGen> {
    let model = prop::option::of(0usize..3);
    prop_oneof![
        (1u64..6, 1_000u64..10_000, model.clone()).prop_map(|(limit, per_ms, model)| {
            WindowGen::Sliding {
                kind: LimitKind::Requests,
                limit,
                per_ms,
                model,
            }
        }),
        (60u64..400, 1_000u64..10_000, model).prop_map(|(limit, per_ms, model)| {
            WindowGen::Sliding {
                kind: LimitKind::Tokens,
                limit,
                per_ms,
                model,
            }
        }),
        // A custom short window: 5 per 2 s.
        Just(WindowGen::Sliding {
            kind: LimitKind::Requests,
            limit: 5,
            per_ms: 2_000,
            model: None
        }),
        (1u64..6, 1i64..=2).prop_map(|(limit, minutes)| WindowGen::Fixed {
            kind: LimitKind::Requests,
            limit,
            minutes
        }),
        (60u64..400, 1i64..=2).prop_map(|(limit, minutes)| WindowGen::Fixed {
            kind: LimitKind::Tokens,
            limit,
            minutes
        }),
    ]
}

fn account_gen() -> impl Strategy<Value = AccountGen> {
    (
        2usize..=3,
        prop::collection::vec(window_gen(), 0..6),
        prop::option::of(1u64..5),
        prop_oneof![Just(0u64), 200u64..3_000],
    )
        .prop_map(|(models, windows, concurrent, quota)| AccountGen {
            models,
            windows,
            concurrent,
            quota,
        })
}

fn op_gen() -> impl Strategy<Value = Op> {
    let usage = prop_oneof![
        3 => (0u16..=1_000).prop_map(UsageGen::Reported),
        1 => Just(UsageGen::RequestOnly),
        1 => Just(UsageGen::Estimate),
    ];
    prop_oneof![
        5 => (0usize..3, 1u64..=120, 500i64..20_000)
            .prop_map(|(model, estimate, timeout)| Op::Reserve { model, estimate, timeout }),
        3 => (any::<usize>(), usage).prop_map(|(pick, usage)| Op::Commit { pick, usage }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (any::<usize>(), 500i64..20_000).prop_map(|(pick, timeout)| Op::Renew { pick, timeout }),
        1 => Just(Op::Expire),
        1 => (0u64..2_000).prop_map(|latency| Op::Success { latency }),
        1 => any::<usize>().prop_map(|pick| Op::SettleStale { pick }),
    ]
}

fn steps_gen() -> impl Strategy<Value = Vec<(Millis, Op)>> {
    let dt = prop_oneof![8 => 0i64..1_500, 1 => 1_500i64..20_000];
    prop::collection::vec((dt, op_gen()), 1..60)
}

fn model_name(i: usize) -> String {
    format!("model-{i}")
}

impl AccountGen {
    fn spec(&self) -> AccountSpec {
        let mut limits: Vec<(Option<Arc<str>>, LimitSpec)> = self
            .windows
            .iter()
            .map(|w| match *w {
                WindowGen::Sliding {
                    kind,
                    limit,
                    per_ms,
                    model,
                } => (
                    model.map(|m| Arc::from(model_name(m % self.models))),
                    sliding(kind, limit, per_ms),
                ),
                WindowGen::Fixed {
                    kind,
                    limit,
                    minutes,
                } => {
                    let cron = if minutes == 1 {
                        "* * * * *"
                    } else {
                        "*/2 * * * *"
                    };
                    (None, fixed(kind, limit, cron))
                }
            })
            .collect();
        if let Some(c) = self.concurrent {
            limits.push((None, concurrent(c)));
        }
        AccountSpec {
            quota_limit: self.quota,
            limits: limits.into(),
            ..spec(vec![])
        }
    }

    fn applies(&self, w: &WindowGen, model: usize) -> bool {
        match w {
            WindowGen::Sliding { model: Some(m), .. } => m % self.models == model,
            _ => true,
        }
    }
}

/// The reference model's record of one admitted request.
#[derive(Debug, Clone)]
struct Admitted {
    id: u64,
    model: usize,
    estimate: u64,
    reserved_at: Millis,
    deadline: Millis,
    /// (commit time, tokens committed) once settled upstream-visible.
    committed: Option<(Millis, u64)>,
    released: bool,
}

impl Admitted {
    fn is_open(&self) -> bool {
        self.committed.is_none() && !self.released
    }

    fn units(&self, kind: LimitKind) -> u64 {
        match kind {
            LimitKind::Requests => 1,
            _ => self.committed.map_or(self.estimate, |(_, tokens)| tokens),
        }
    }
}

fn tokens_for(usage: UsageGen, estimate: u64) -> (Usage, u64) {
    match usage {
        UsageGen::Reported(per_mille) => {
            let t = estimate * u64::from(per_mille) / 1_000;
            (Usage::Reported(t), t)
        }
        UsageGen::RequestOnly => (Usage::RequestOnly, 0),
        UsageGen::Estimate => (Usage::Estimate, estimate),
    }
}

/// Checks what must hold after every operation; returns a description of the first violation.
fn check_invariants(g: &AccountGen, a: &Account, log: &[Admitted]) -> Result<(), TestCaseError> {
    let open: Vec<&Admitted> = log.iter().filter(|r| r.is_open()).collect();
    prop_assert_eq!(a.inflight(), open.len() as u64, "in-flight count");
    if let Some(c) = g.concurrent {
        prop_assert!(a.inflight() <= c, "concurrency {} over {}", a.inflight(), c);
    }
    let committed_tokens: u64 = log.iter().filter_map(|r| r.committed.map(|(_, t)| t)).sum();
    let reserved_tokens: u64 = open.iter().map(|r| r.estimate).sum();
    prop_assert_eq!(
        a.quota().used(),
        committed_tokens,
        "quota used = sum of commits"
    );
    prop_assert_eq!(
        a.quota().reserved(),
        reserved_tokens,
        "quota reserved = open estimates"
    );
    if g.quota > 0 {
        prop_assert!(
            a.quota().used() + a.quota().reserved() <= g.quota,
            "quota over its limit"
        );
    }
    for (w, spec) in a.windows().iter().zip(&g.windows) {
        prop_assert!(
            w.used() <= w.limit(),
            "window {} holds {} > {}",
            w.label(),
            w.used(),
            w.limit()
        );
        let kind = match spec {
            WindowGen::Sliding { kind, .. } | WindowGen::Fixed { kind, .. } => *kind,
        };
        let expected: u64 = open
            .iter()
            .filter(|r| g.applies(spec, r.model))
            .map(|r| r.units(kind))
            .sum();
        prop_assert_eq!(w.inflight(), expected, "window {} in flight", w.label());
    }
    Ok(())
}

/// The guarantee of `window.rs`, checked on the final record: sliding — at no time do the units
/// of requests holding `[r, c + W)` exceed `N`; fixed — no period holds more than `N`, counting
/// each request in every period that `[r, c]` overlaps.
fn check_guarantee(g: &AccountGen, log: &[Admitted]) -> Result<(), TestCaseError> {
    let upstream: Vec<&Admitted> = log.iter().filter(|r| r.committed.is_some()).collect();
    for spec in &g.windows {
        let counted: Vec<&&Admitted> = upstream
            .iter()
            .filter(|r| g.applies(spec, r.model))
            .collect();
        match *spec {
            WindowGen::Sliding {
                kind,
                limit,
                per_ms,
                ..
            } => {
                let hold =
                    |r: &Admitted| (r.reserved_at, r.committed.unwrap().0 + per_ms as Millis);
                // The sum is piecewise constant and only rises at a reservation time.
                for probe in &counted {
                    let t = probe.reserved_at;
                    let total: u64 = counted
                        .iter()
                        .filter(|r| {
                            let (from, until) = hold(r);
                            from <= t && t < until
                        })
                        .map(|r| r.units(kind))
                        .sum();
                    prop_assert!(
                        total <= limit,
                        "sliding {kind} {limit}/{per_ms}ms holds {total} at {t}"
                    );
                }
            }
            WindowGen::Fixed {
                kind,
                limit,
                minutes,
            } => {
                let period = minutes * 60_000;
                let mut per_period: HashMap<i64, u64> = HashMap::new();
                for r in &counted {
                    let (from, to) = (r.reserved_at, r.committed.unwrap().0);
                    for k in from.div_euclid(period)..=to.div_euclid(period) {
                        *per_period.entry(k).or_default() += r.units(kind);
                    }
                }
                for (k, total) in per_period {
                    prop_assert!(
                        total <= limit,
                        "fixed {kind} {limit} per {minutes} min holds {total} in period {k}"
                    );
                }
            }
        }
    }
    Ok(())
}

fn run(g: &AccountGen, steps: &[(Millis, Op)]) -> Result<(), TestCaseError> {
    let mut a = Account::new(&g.spec(), T0).expect("a generated spec is valid");
    let mut log: Vec<Admitted> = Vec::new();
    let mut now = T0;
    let mut events = Vec::new();
    for &(dt, op) in steps {
        now += dt;
        let open: Vec<usize> = (0..log.len()).filter(|&i| log[i].is_open()).collect();
        let pick = |p: usize| (!open.is_empty()).then(|| open[p % open.len()]);
        match op {
            Op::Reserve {
                model,
                estimate,
                timeout,
            } => {
                let model = model % g.models;
                match a.reserve(&model_name(model), estimate, now, timeout, &mut events) {
                    Ok(grant) => {
                        prop_assert_eq!(grant.deadline, now + timeout);
                        prop_assert!(
                            log.iter().all(|r| r.id != grant.reservation),
                            "ids are unique"
                        );
                        log.push(Admitted {
                            id: grant.reservation,
                            model,
                            estimate,
                            reserved_at: now,
                            deadline: now + timeout,
                            committed: None,
                            released: false,
                        });
                    }
                    Err(Denial::Impossible {
                        need, limit_value, ..
                    }) => {
                        prop_assert!(need > limit_value, "impossible but {need} <= {limit_value}");
                    }
                    Err(Denial::RateLimited { retry_at, .. }) => {
                        prop_assert!(retry_at > now, "retry_at {retry_at} not after {now}");
                    }
                    Err(Denial::QuotaExceeded { reset_at }) => {
                        prop_assert!(reset_at > now);
                        prop_assert!(
                            g.quota > 0
                                && a.quota().used() + a.quota().reserved() + estimate > g.quota,
                            "quota refused with room left"
                        );
                    }
                    Err(other) => {
                        return Err(TestCaseError::fail(format!("unexpected denial {other:?}")))
                    }
                }
            }
            Op::Commit { pick: p, usage } => {
                if let Some(i) = pick(p) {
                    let (usage, tokens) = tokens_for(usage, log[i].estimate);
                    prop_assert!(a.commit(log[i].id, usage, now, &mut events));
                    log[i].committed = Some((now, tokens));
                }
            }
            Op::Release { pick: p } => {
                if let Some(i) = pick(p) {
                    prop_assert!(a.release(log[i].id));
                    log[i].released = true;
                }
            }
            Op::Renew { pick: p, timeout } => {
                if let Some(i) = pick(p) {
                    prop_assert!(a.renew(log[i].id, now, timeout));
                    log[i].deadline = now + timeout;
                }
            }
            Op::Expire => {
                let mut due = 0;
                for r in log.iter_mut().filter(|r| r.is_open() && r.deadline <= now) {
                    r.committed = Some((now, r.estimate));
                    due += 1;
                }
                prop_assert_eq!(a.expire(now, &mut events), due, "expired reservations");
            }
            Op::Success { latency } => {
                let fb = Feedback {
                    outcome: UpstreamOutcome::Success,
                    latency_ms: latency,
                    headers: RateHeaders::default(),
                };
                a.feedback(&fb, now, &mut events);
            }
            Op::SettleStale { pick: p } => {
                let settled: Vec<u64> = log.iter().filter(|r| !r.is_open()).map(|r| r.id).collect();
                if !settled.is_empty() {
                    let id = settled[p % settled.len()];
                    prop_assert!(!a.commit(id, Usage::Estimate, now, &mut events));
                    prop_assert!(!a.release(id));
                    prop_assert!(!a.renew(id, now, 1_000));
                }
            }
        }
        check_invariants(g, &a, &log)?;
    }

    // Settle everything: no slot may leak.
    now += 1;
    for (n, r) in log.iter_mut().filter(|r| r.is_open()).enumerate() {
        if n % 2 == 0 {
            prop_assert!(a.commit(r.id, Usage::Estimate, now, &mut events));
            r.committed = Some((now, r.estimate));
        } else {
            prop_assert!(a.release(r.id));
            r.released = true;
        }
    }
    check_invariants(g, &a, &log)?;
    prop_assert_eq!(a.inflight(), 0);
    prop_assert_eq!(a.quota().reserved(), 0);
    prop_assert!(a.windows().iter().all(|w| w.inflight() == 0));
    prop_assert_eq!(a.next_deadline(), None);
    check_guarantee(g, &log)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_never_overfill_a_window_leak_a_slot_or_miscount_the_quota(
        g in account_gen(),
        steps in steps_gen(),
    ) {
        run(&g, &steps)?;
    }

    #[test]
    fn selection_orders_a_permutation_with_unavailable_accounts_last(
        candidates in prop::collection::vec(summary_gen(), 0..10),
        strategy in prop_oneof![
            Just(Pick::RoundRobin),
            Just(Pick::LeastUsed),
            Just(Pick::Random),
            Just(Pick::Best),
        ],
        mut cursor in any::<usize>(),
        mut rng in any::<u64>(),
    ) {
        let o = order(strategy, &candidates, &mut cursor, &mut rng);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..candidates.len()).collect::<Vec<_>>());
        let first_unavailable = o.iter().position(|&i| !candidates[i].available).unwrap_or(o.len());
        prop_assert!(
            o[first_unavailable..].iter().all(|&i| !candidates[i].available),
            "an available account after an unavailable one: {:?}", o
        );
    }
}

fn summary_gen() -> impl Strategy<Value = Summary> {
    (
        any::<bool>(),
        any::<f64>(),
        -0.5f64..1.5,
        0.0f64..1.0,
        0.0f64..5_000.0,
        0u64..10,
    )
        .prop_map(
            |(available, headroom, quota_fraction, error_rate, latency_ms, inflight)| Summary {
                available,
                quota_fraction,
                headroom,
                error_rate,
                latency_ms,
                inflight,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// The shared ledger (several instances)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_shared_ledger_state_round_trips_with_its_leases_and_counters() {
    let spec = with_quota(1_000, vec![sliding(LimitKind::Requests, 10, PER_64S)]);
    let mut a = open(&spec);
    a.set_owner(1);
    let done = granted(&mut a, M, 40, T0);
    commit(&mut a, done, Usage::Reported(30), T0 + 1);
    let open_id = granted(&mut a, M, 50, T0 + 2);
    let shared = a.ledger_state(T0 + 3);
    let json = serde_json::to_string(&shared).unwrap();

    let mut b = open(&spec);
    b.set_owner(2);
    b.load_ledger(&serde_json::from_str(&json).unwrap(), T0 + 4);
    assert_eq!(b.windows()[0].used(), 2, "one committed, one in flight");
    assert_eq!((b.quota().used(), b.quota().reserved()), (30, 50));
    assert_eq!(b.inflight(), 1);
    // Another instance settles what the first granted, and grants ids of its own.
    commit(&mut b, open_id, Usage::Reported(20), T0 + 5);
    let mine = granted(&mut b, M, 1, T0 + 6);
    assert_eq!(mine >> 40, 2, "ids carry their instance");
    assert_ne!(mine, open_id);
    assert_eq!(b.quota().used(), 50);
}

#[test]
fn out_of_reach_of_the_shared_ledger_an_instance_keeps_to_its_share_and_reports_it_after() {
    let spec = spec(vec![sliding(LimitKind::Requests, 10, PER_64S)]);
    let mut a = open(&spec);
    a.set_owner(1);
    for t in 0..4 {
        let id = granted(&mut a, M, 1, T0 + t);
        commit(&mut a, id, Usage::RequestOnly, T0 + t);
    }
    // The ledger as this instance last wrote it.
    let remote = a.ledger_state(T0 + 10);
    a.written();
    // Three instances: this one (the last rank) keeps to 10 / 3 = 3 of the window, and the 4
    // already used leave it nothing until they expire.
    a.share_with(crate::domain::share::Share::new(3, 2));
    assert!(reserve(&mut a, M, 1, T0 + 11).is_err());
    let later = T0 + 70_000;
    for i in 0..3 {
        let id = granted(&mut a, M, 1, later + i);
        commit(&mut a, id, Usage::RequestOnly, later + i);
    }
    assert!(
        reserve(&mut a, M, 1, later + 5).is_err(),
        "its share is 3 of 10"
    );
    // Meanwhile another instance went on with the shared ledger.
    let mut other = open(&spec);
    other.set_owner(2);
    other.load_ledger(&remote, later);
    for i in 0..2 {
        let id = granted(&mut other, M, 1, later + i);
        commit(&mut other, id, Usage::RequestOnly, later + i);
    }
    // Back: the shared ledger plus what this instance admitted meanwhile, and no share any more.
    a.merge(&other.ledger_state(later + 6), later + 7);
    assert_eq!(a.windows()[0].used(), 5);
    for i in 0..5 {
        granted(&mut a, M, 1, later + 8 + i);
    }
    assert!(reserve(&mut a, M, 1, later + 20).is_err(), "10 in all");
}

#[test]
fn a_lost_ledger_is_seeded_again_full_for_the_time_it_was_out_of_sight_whatever_the_share() {
    let spec = spec(vec![
        sliding(LimitKind::Requests, 10, PER_64S),
        named(NamedLimit::Concurrent, 3),
    ]);
    let mut a = open(&spec);
    a.set_owner(1);
    let id = granted(&mut a, M, 1, T0);
    commit(&mut a, id, Usage::RequestOnly, T0);
    // Out of reach: a third of every limit (this rank gets 4 of 10 requests, 1 of 3 slots).
    let share = crate::domain::share::Share::new(3, 0);
    a.share_with(share);
    assert_eq!(share.part(10), 4);
    let id = granted(&mut a, M, 1, T0 + 1);
    commit(&mut a, id, Usage::RequestOnly, T0 + 1);
    // Redis came back empty: this instance seeds the ledger, charged for the 10 s it could not
    // see — the whole window, not its part of it — and keeps to no share any more.
    a.reseed(Some(10_000), T0 + 10_000);
    assert!(!a.is_sharing());
    assert_eq!(a.windows()[0].used(), 10, "every request the window allows");
    assert!(reserve(&mut a, M, 1, T0 + 10_001).is_err());
    // Nothing it never saw is charged when it never saw the ledger at all.
    let mut fresh = open(&spec);
    fresh.share_with(share);
    fresh.reseed(None, T0);
    assert_eq!(fresh.windows()[0].used(), 0);
    for t in 0..3 {
        granted(&mut fresh, M, 1, T0 + t);
    }
    assert!(
        reserve(&mut fresh, M, 1, T0 + 4).is_err(),
        "every concurrency slot again, and only those"
    );
}
