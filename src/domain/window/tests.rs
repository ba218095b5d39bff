//! Tests of one window: the hold semantics, bounded buckets, fixed periods, ceilings.
use std::time::Duration;

use super::*;
use crate::domain::limits::FixedReset;

fn sliding(kind: LimitKind, limit: u64, per_ms: u64) -> Window {
    let spec = LimitSpec {
        kind,
        limit,
        per: Some(Duration::from_millis(per_ms)),
        reset: None,
    };
    Window::new(&spec, None, 0).unwrap().unwrap()
}

#[test]
fn a_full_sliding_window_frees_its_units_one_window_after_their_commit() {
    let mut w = sliding(LimitKind::Requests, 2, 64_000);
    for t in [0, 10] {
        w.roll(t);
        w.check(1, t).unwrap();
        w.reserve(1);
    }
    w.roll(20);
    // In flight: blocked, and only a lower bound is known.
    assert_eq!(
        w.check(1, 20),
        Err(Block::Full {
            retry_at: 64_020,
            lower_bound: true
        })
    );
    w.commit(1, 1, 1_000);
    w.commit(1, 1, 2_000);
    w.roll(3_000);
    assert_eq!(
        w.check(1, 3_000),
        Err(Block::Full {
            retry_at: 65_000,
            lower_bound: false
        })
    );
    w.roll(64_999);
    assert!(w.check(1, 64_999).is_err());
    w.roll(65_000);
    assert!(
        w.check(1, 65_000).is_ok(),
        "the first unit expired exactly at c + W"
    );
    assert_eq!(w.remaining(65_000), 1);
}

#[test]
fn buckets_round_expiry_up_never_down() {
    let mut w = sliding(LimitKind::Requests, 10, 6_400); // bucket = 100 ms
    w.reserve(1);
    w.commit(1, 1, 1_001); // expires at 7_401 → rounded to 7_500
    w.roll(7_499);
    assert_eq!(w.used(), 1);
    w.roll(7_500);
    assert_eq!(w.used(), 0);
}

#[test]
fn memory_stays_bounded_however_many_commits() {
    let mut w = sliding(LimitKind::Tokens, u64::MAX / 4, 86_400_000);
    for i in 0..100_000 {
        let now = i * 1_000;
        w.roll(now);
        w.reserve(10);
        w.commit(10, 12, now);
    }
    assert!(w.counters().buckets.len() as i64 <= BUCKETS_PER_WINDOW + 1);
}

#[test]
fn a_request_larger_than_the_limit_is_impossible() {
    let w = sliding(LimitKind::Tokens, 100, 60_000);
    assert_eq!(
        w.check(101, 0),
        Err(Block::Impossible {
            limit: 100,
            need: 101
        })
    );
}

#[test]
fn commits_correct_token_estimates_up_and_down() {
    let mut w = sliding(LimitKind::Tokens, 100, 60_000);
    w.reserve(50);
    w.reserve(30);
    assert_eq!(w.used(), 80);
    w.commit(50, 10, 0);
    assert_eq!(w.used(), 40);
    w.commit(30, 45, 0);
    assert_eq!(w.used(), 55);
    w.release(0);
    assert_eq!(w.inflight(), 0);
}

#[test]
fn a_fixed_window_resets_at_its_schedule_but_keeps_in_flight_units() {
    let spec = LimitSpec {
        kind: LimitKind::Requests,
        limit: 2,
        per: Some(Duration::from_secs(86_400)),
        reset: Some(FixedReset {
            cron: "0 0 * * *".into(),
            timezone: "UTC".into(),
        }),
    };
    let day = 86_400_000;
    let mut w = Window::new(&spec, None, 10).unwrap().unwrap();
    w.reserve(1);
    w.commit(1, 1, 100);
    w.reserve(1); // still in flight at midnight
    w.roll(200);
    assert_eq!(
        w.check(1, 200),
        Err(Block::Full {
            retry_at: day,
            lower_bound: true
        }),
        "the request in flight may give its unit back sooner"
    );
    w.roll(day);
    assert_eq!(w.used(), 1, "the in-flight request overlaps the new period");
    w.check(1, day).unwrap();
    w.commit(1, 1, day + 5);
    assert_eq!(w.used(), 1);
}

#[test]
fn upstream_headers_tighten_until_their_reset_and_never_loosen() {
    let mut w = sliding(LimitKind::Requests, 100, 60_000);
    w.tighten(1, 5_000, 0);
    w.check(1, 0).unwrap();
    w.reserve(1);
    assert_eq!(
        w.check(1, 1),
        Err(Block::Full {
            retry_at: 5_000,
            lower_bound: false
        })
    );
    // A looser report inside the same upstream window is ignored.
    w.tighten(50, 5_000, 2);
    assert!(w.check(1, 2).is_err());
    w.roll(5_000);
    w.check(1, 5_000).unwrap();
    // Headers can never raise the configured limit.
    w.tighten(1_000, 9_000, 5_000);
    assert_eq!(w.remaining(5_000), 99);
}

#[test]
fn counters_survive_a_round_trip() {
    let mut w = sliding(LimitKind::Requests, 5, 60_000);
    w.reserve(1);
    w.commit(1, 1, 1_000);
    let saved = w.counters();
    let mut fresh = sliding(LimitKind::Requests, 5, 60_000);
    fresh.restore(&saved, 1_000, 2_000);
    assert_eq!(fresh.used(), 1);
    fresh.roll(62_000);
    assert_eq!(fresh.used(), 0);
}
