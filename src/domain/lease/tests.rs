//! Tests of the holder's shard of a lease.
use super::*;

fn granted(shard: &mut Shard, held: Units, epoch: u64) {
    let ex = shard.begin_exchange(0, 100, Some(1));
    assert!(ex.report.is_none() || ex.report.unwrap().keep == Units::ZERO);
    shard.end_exchange(Some((
        Some(LeaseState {
            id: 7,
            held,
            deadline: 10_000,
        }),
        epoch,
    )));
}

#[test]
fn a_shard_admits_from_its_lease_until_it_runs_dry() {
    let mut s = Shard::new();
    assert_eq!(s.reserve(10, 1, 500), Err(ShardMiss::Dry));
    granted(
        &mut s,
        Units {
            requests: 2,
            tokens: 25,
            slots: 2,
        },
        1,
    );
    let a = s.reserve(10, 1, 500).unwrap();
    let _b = s.reserve(10, 1, 500).unwrap();
    assert_eq!(s.reserve(1, 1, 500), Err(ShardMiss::Dry), "no request left");
    assert!(s.commit(a, 4, 20));
    assert!(!s.commit(a, 4, 20), "a ticket settles once");
    // The commit gave back 6 tokens and the slot, but not the request unit.
    assert_eq!(
        s.free(),
        Units {
            requests: 0,
            tokens: 11,
            slots: 1
        }
    );
}

#[test]
fn a_revoked_lease_admits_nothing_more() {
    let mut s = Shard::new();
    granted(
        &mut s,
        Units::request(100).saturating_add(Units::request(100)),
        1,
    );
    assert!(s.reserve(10, 1, 500).is_ok());
    assert_eq!(s.reserve(10, 2, 500), Err(ShardMiss::Dry));
    assert_eq!(s.free(), Units::ZERO, "the free units go back");
}

#[test]
fn a_report_commits_what_was_used_keeps_what_is_in_flight_and_frees_the_rest() {
    let mut s = Shard::new();
    granted(
        &mut s,
        Units {
            requests: 10,
            tokens: 1_000,
            slots: 10,
        },
        1,
    );
    let a = s.reserve(100, 1, 500).unwrap();
    let b = s.reserve(100, 1, 500).unwrap();
    assert!(s.release(b));
    assert!(s.commit(a, 30, 40));
    let c = s.reserve(50, 1, 500).unwrap();
    // A long horizon at the measured rate keeps some free units; a zero rate keeps none.
    let ex = s.begin_exchange(1_000, 1, None);
    let report = ex.report.unwrap();
    assert_eq!(report.lease, Some(7));
    assert_eq!(
        report.used,
        Units {
            requests: 1,
            tokens: 30,
            slots: 0
        }
    );
    assert_eq!(report.used_at, 40);
    assert!(report.keep.covers(&Units::request(50)), "c is in flight");
    s.end_exchange(Some((
        Some(LeaseState {
            id: 7,
            held: report.keep,
            deadline: 20_000,
        }),
        1,
    )));
    assert!(s.commit(c, 50, 1_010));
    let ex = s.begin_exchange(2_000, 1, None);
    assert_eq!(ex.report.unwrap().used.tokens, 50);
}

#[test]
fn an_overrun_is_reported_in_full() {
    let mut s = Shard::new();
    granted(&mut s, Units::request(10), 1);
    let a = s.reserve(10, 1, 500).unwrap();
    assert!(s.commit(a, 25, 5));
    let report = s.begin_exchange(10, 10, None).report.unwrap();
    assert_eq!(report.used.tokens, 25);
}

#[test]
fn unsettled_requests_expire_at_their_estimate() {
    let mut s = Shard::new();
    granted(
        &mut s,
        Units::request(10).saturating_add(Units::request(10)),
        1,
    );
    let a = s.reserve(10, 1, 500).unwrap();
    let b = s.reserve(10, 1, 900).unwrap();
    assert!(s.renew(b, 2_000));
    assert_eq!(s.expire(600), 1);
    assert!(!s.commit(a, 1, 700), "expired already");
    assert!(s.commit(b, 1, 700));
    let report = s.close(800).unwrap();
    assert_eq!(report.used.requests, 2);
    assert_eq!(report.used.tokens, 11);
    assert_eq!(report.keep, Units::ZERO);
    assert!(s.is_idle());
}

#[test]
fn the_fair_share_leaves_room_for_others_and_keeps_unlimited_dimensions_unlimited() {
    let room = Units {
        requests: 100,
        tokens: u64::MAX,
        slots: 3,
    };
    assert_eq!(
        fair_share(room, 2),
        Units {
            requests: 25,
            tokens: u64::MAX,
            slots: 0
        }
    );
}
