//! The instance's reserve driven by a real holder ([`Shard`]): which exchanges must be written to
//! the shared ledger first, and that the ledger never counts less than what was admitted.

use std::sync::Arc;
use std::time::Duration;

use super::super::{Account, AccountSpec};
use crate::domain::lease::{Shard, Units};
use crate::domain::limits::{LimitKind, LimitSpec};
use crate::domain::schedule::Schedule;
use crate::domain::time::Millis;

const T0: Millis = 1_800_000_000_000;
const M: &str = "llama";
const REPORT: Millis = 25;
const TTL: Millis = 10_000;

fn account(limits: &[(LimitKind, u64)], quota: u64) -> Account {
    let spec = AccountSpec {
        id: Arc::from("acct"),
        active: true,
        disabled_reason: None,
        expires_at: None,
        quota_limit: quota,
        quota_used: 0,
        quota_schedule: Schedule::daily_utc(),
        warning_threshold: 0.8,
        limits: limits
            .iter()
            .map(|&(kind, limit)| {
                let per = (kind != LimitKind::Concurrent).then(|| Duration::from_secs(60));
                (
                    None,
                    LimitSpec {
                        kind,
                        limit,
                        per,
                        reset: None,
                    },
                )
            })
            .collect(),
        header_requests: None,
        header_tokens: None,
    };
    let mut a = Account::new(&spec, T0).expect("a valid spec");
    a.set_owner(7);
    a
}

/// One exchange of `shard` through the reserve (`waiting`: a request found the shard dry);
/// returns whether it had to be written first.
fn exchange(a: &mut Account, shard: &mut Shard, waiting: Option<u64>, now: Millis) -> bool {
    let ex = shard.begin_exchange(now, REPORT, waiting);
    let mut events = Vec::new();
    let answer = a.exchange_via_reserve(
        M,
        ex.report.as_ref(),
        None,
        Units::ZERO,
        ex.want,
        now,
        TTL,
        TTL,
        &mut events,
    );
    shard.end_exchange(Some((answer.exchanged.lease, answer.exchanged.epoch)));
    answer.must_write
}

/// One report interval of a busy worker: admits up to `n` requests of 10 tokens (each uses 8),
/// asking for more when its lease runs dry, then reports; returns the exchanges that had to be
/// written first, and the requests admitted.
fn interval(a: &mut Account, shard: &mut Shard, n: u64, now: Millis) -> (u64, u64) {
    let (mut writes, mut admitted) = (0, 0);
    let mut tries = 0;
    while admitted < n && tries < 3 {
        match shard.reserve(10, a.epoch(), now + TTL) {
            Ok(ticket) => {
                shard.commit(ticket, 8, now);
                admitted += 1;
            }
            Err(_) => {
                tries += 1;
                writes += u64::from(exchange(a, shard, Some(10), now));
            }
        }
    }
    writes += u64::from(exchange(a, shard, None, now));
    (writes, admitted)
}

#[test]
fn far_from_the_limits_a_busy_worker_is_refilled_from_the_reserve_without_writes() {
    let mut a = account(
        &[
            (LimitKind::Requests, 1_000_000),
            (LimitKind::Tokens, 100_000_000),
            (LimitKind::Concurrent, 10_000),
        ],
        0,
    );
    let mut shard = Shard::new();
    let (mut writes, mut admitted) = (0, 0);
    for i in 0..400 {
        let (w, n) = interval(&mut a, &mut shard, 20, T0 + i * REPORT);
        writes += w;
        admitted += n;
    }
    assert!(admitted >= 400 * 20 / 2, "{admitted}");
    // Growing the lease and the reserve takes a few writes; the steady state about one per
    // RESERVE_EXCHANGES reports.
    assert!(writes <= 400 / 10, "{writes} writes for 400 intervals");
    assert!(a.has_reserves());
}

#[test]
fn near_a_limit_the_reserve_admits_nothing_beyond_it() {
    let mut a = account(&[(LimitKind::Requests, 4)], 0);
    let mut shard = Shard::new();
    let (mut writes, mut admitted) = (0, 0);
    for i in 0..6 {
        let (w, n) = interval(&mut a, &mut shard, 1, T0 + i * REPORT);
        writes += w;
        admitted += n;
    }
    // Four requests in the window at most; the first grant was written.
    assert!((1..=4).contains(&admitted), "{admitted}");
    assert!(writes >= 1);
    a.release_reserves(true, T0 + 6 * REPORT, &mut Vec::new());
    let mut events = Vec::new();
    let report = shard.begin_exchange(T0 + 6 * REPORT, REPORT, None);
    a.exchange(
        M,
        report.report.as_ref(),
        None,
        Units::ZERO,
        Units::ZERO,
        T0 + 6 * REPORT,
        TTL,
        TTL,
        &mut events,
    );
    assert_eq!(a.footprint(T0 + 6 * REPORT).remaining, vec![4 - admitted]);
}

#[test]
fn an_exchange_the_reserve_covers_never_grows_what_the_ledger_counts() {
    let mut a = account(
        &[
            (LimitKind::Requests, 10_000),
            (LimitKind::Tokens, 1_000_000),
        ],
        500_000,
    );
    let mut shard = Shard::new();
    for i in 0..200 {
        let now = T0 + i * REPORT;
        a.roll(now, &mut Vec::new());
        let before = a.footprint(now);
        let n = [3, 40, 0, 15][i as usize % 4];
        if interval(&mut a, &mut shard, n, now).0 == 0 {
            assert!(a.footprint(now).within(&before), "interval {i}");
        }
    }
}

#[test]
fn idle_reserves_go_back_and_all_of_them_at_a_stop() {
    let mut a = account(&[(LimitKind::Requests, 1_000_000)], 0);
    let mut shard = Shard::new();
    for i in 0..10 {
        interval(&mut a, &mut shard, 20, T0 + i * REPORT);
    }
    assert!(a.has_reserves());
    let now = T0 + 10 * REPORT;
    let mut events = Vec::new();
    // Drawn from since the last flush: kept once, then given back when idle.
    assert!(!a.release_reserves(false, now, &mut events));
    assert!(a.has_reserves());
    assert!(a.release_reserves(false, now, &mut events));
    assert!(!a.has_reserves());
    interval(&mut a, &mut shard, 20, now + REPORT);
    interval(&mut a, &mut shard, 20, now + 2 * REPORT);
    assert!(a.has_reserves());
    assert!(a.release_reserves(true, now + 2 * REPORT, &mut events));
    assert!(!a.has_reserves());
}

#[test]
fn a_holder_that_keeps_its_slots_is_refilled_at_its_reports_without_running_dry() {
    // Requests that end quickly: the worker always has its one slot back, so it asks for more
    // requests and tokens but no slot. The ledger must grow the lease all the same, else every
    // request finds the lease dry and asks the ledger alone (the exchange this lease avoids).
    let mut a = account(&[(LimitKind::Requests, 1_000_000)], 0);
    a.shares_ledger = false;
    let mut shard = Shard::new();
    let mut dry = 0;
    for i in 0..40 {
        let now = T0 + i * REPORT;
        for _ in 0..20 {
            match shard.reserve(10, a.epoch(), now + TTL) {
                Ok(ticket) => {
                    shard.commit(ticket, 8, now);
                }
                Err(_) => {
                    dry += 1;
                    exchange(&mut a, &mut shard, Some(10), now);
                }
            }
        }
        exchange(&mut a, &mut shard, None, now);
    }
    assert!(dry <= 5, "the lease ran dry {dry} times in 800 requests");
}

#[test]
fn the_peak_counts_what_a_lease_admitted_not_what_it_held() {
    // The crash-gap charge of a kind without a window is bounded by the peak admitted per
    // interval: a large lease granted to a worker that used 3 requests of it is a peak of 3.
    let mut a = account(&[(LimitKind::Requests, 1_000_000)], 0);
    a.shares_ledger = false;
    let mut shard = Shard::new();
    let mut used = 0;
    for i in 0..3 {
        let now = T0 + i;
        match shard.reserve(10, a.epoch(), now + TTL) {
            Ok(ticket) => {
                shard.commit(ticket, 8, now);
            }
            Err(_) => {
                exchange(&mut a, &mut shard, Some(10), now);
                let ticket = shard.reserve(10, a.epoch(), now + TTL).unwrap();
                shard.commit(ticket, 8, now);
            }
        }
        used += 1;
    }
    exchange(&mut a, &mut shard, None, T0 + 5);
    assert_eq!(used, 3);
    assert_eq!(a.state(T0 + 5).peak_requests, 3);
}
