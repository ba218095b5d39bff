//! The guarantee across several holders of one or several instances (sharing one ledger state, as
//! through Redis): random interleavings of admissions from shards,
//! commits, releases, reports and refills (exchanges), revocations and time passing, checked
//! against an independent record of what the upstream could have counted. No window may ever
//! hold more than its limit, the quota and the concurrency limit never be exceeded, and once
//! every holder has closed, no unit may be left held.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::{Shard, ShardMiss, ShardTicket, Units};
use crate::domain::account::{Account, AccountSpec, LedgerState, NeedGranted, Usage};
use crate::domain::limits::{FixedReset, LimitKind, LimitSpec};
use crate::domain::schedule::Schedule;
use crate::domain::time::Millis;

const T0: Millis = 20_000 * 86_400_000 + 3_600_000;
const MODEL: &str = "m";
/// Long enough that no lease expires in a run: expiry is tested on its own.
const LEASE_TTL: Millis = 10_000_000;
const HORIZON: Millis = 50;

#[derive(Debug, Clone)]
enum Limit {
    Sliding {
        kind: LimitKind,
        limit: u64,
        per_ms: u64,
    },
    Fixed {
        kind: LimitKind,
        limit: u64,
    },
}

#[derive(Debug, Clone)]
struct Setup {
    limits: Vec<Limit>,
    concurrent: Option<u64>,
    quota: u64,
    holders: usize,
    /// Instances sharing the ledger (each with its own copy, synced through the shared state,
    /// as through Redis); holder `h` belongs to instance `h % instances`.
    instances: usize,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A request of this estimate arrives at a holder.
    Reserve {
        holder: usize,
        estimate: u64,
    },
    /// A request in flight ends, having used this per-mille of its estimate.
    Commit {
        pick: usize,
        per_mille: u16,
    },
    Release {
        pick: usize,
    },
    /// A holder's report tick (report, give back, refill).
    Tick {
        holder: usize,
    },
    Revoke,
}

fn limit_gen() -> impl Strategy<Value = Limit> {
    prop_oneof![
        (1u64..12, 500u64..5_000).prop_map(|(limit, per_ms)| Limit::Sliding {
            kind: LimitKind::Requests,
            limit,
            per_ms
        }),
        (50u64..2_000, 500u64..5_000).prop_map(|(limit, per_ms)| Limit::Sliding {
            kind: LimitKind::Tokens,
            limit,
            per_ms
        }),
        (1u64..12).prop_map(|limit| Limit::Fixed {
            kind: LimitKind::Requests,
            limit
        }),
        (50u64..2_000).prop_map(|limit| Limit::Fixed {
            kind: LimitKind::Tokens,
            limit
        }),
        // Far above the load: leases are large and rarely refilled.
        Just(Limit::Sliding {
            kind: LimitKind::Requests,
            limit: 100_000,
            per_ms: 60_000
        }),
    ]
}

fn setup_gen() -> impl Strategy<Value = Setup> {
    (
        prop::collection::vec(limit_gen(), 0..4),
        prop::option::of(1u64..8),
        prop_oneof![Just(0u64), 100u64..5_000],
        2usize..=4,
        1usize..=3,
    )
        .prop_map(|(limits, concurrent, quota, holders, instances)| Setup {
            limits,
            concurrent,
            quota,
            holders,
            instances,
        })
}

fn op_gen() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..4, 1u64..60).prop_map(|(holder, estimate)| Op::Reserve { holder, estimate }),
        4 => (any::<usize>(), 0u16..=1_000).prop_map(|(pick, per_mille)| Op::Commit { pick, per_mille }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        3 => (0usize..4).prop_map(|holder| Op::Tick { holder }),
        1 => Just(Op::Revoke),
    ]
}

fn steps_gen() -> impl Strategy<Value = Vec<(Millis, Op)>> {
    let dt = prop_oneof![8 => 0i64..200, 1 => 200i64..6_000];
    prop::collection::vec((dt, op_gen()), 1..120)
}

impl Setup {
    fn spec(&self) -> AccountSpec {
        let mut limits: Vec<(Option<Arc<str>>, LimitSpec)> = self
            .limits
            .iter()
            .map(|l| {
                let spec = match *l {
                    Limit::Sliding {
                        kind,
                        limit,
                        per_ms,
                    } => LimitSpec {
                        kind,
                        limit,
                        per: Some(Duration::from_millis(per_ms)),
                        reset: None,
                    },
                    Limit::Fixed { kind, limit } => LimitSpec {
                        kind,
                        limit,
                        per: Some(Duration::from_secs(60)),
                        reset: Some(FixedReset {
                            cron: "* * * * *".into(),
                            timezone: "UTC".into(),
                        }),
                    },
                };
                (None, spec)
            })
            .collect();
        if let Some(c) = self.concurrent {
            limits.push((
                None,
                LimitSpec {
                    kind: LimitKind::Concurrent,
                    limit: c,
                    per: None,
                    reset: None,
                },
            ));
        }
        AccountSpec {
            id: Arc::from("acct"),
            active: true,
            disabled_reason: None,
            expires_at: None,
            quota_limit: self.quota,
            quota_used: 0,
            quota_schedule: Schedule::daily_utc(),
            warning_threshold: 0.8,
            limits: limits.into(),
            header_requests: None,
            header_tokens: None,
        }
    }
}

/// How a request in flight was admitted.
#[derive(Debug, Clone, Copy)]
enum Admission {
    Shard(usize, ShardTicket),
    Reservation(u64),
}

/// What the upstream could count of one request.
#[derive(Debug, Clone)]
struct Request {
    admission: Admission,
    estimate: u64,
    reserved_at: Millis,
    /// (commit time, tokens) once it reached the upstream.
    committed: Option<(Millis, u64)>,
    released: bool,
}

impl Request {
    fn open(&self) -> bool {
        self.committed.is_none() && !self.released
    }
}

/// The ledger as several instances see it: each has its own `Account`, and they take turns
/// through the shared state (one writer at a time, as Redis's swap over a version makes it).
struct Ledgers {
    instances: Vec<Account>,
    shared: Option<LedgerState>,
    current: usize,
}

impl Ledgers {
    fn new(s: &Setup) -> Ledgers {
        let instances = (0..s.instances)
            .map(|i| {
                let mut a = Account::new(&s.spec(), T0).expect("a valid spec");
                a.set_owner(i as u64 + 1);
                a
            })
            .collect();
        Ledgers {
            instances,
            shared: None,
            current: 0,
        }
    }

    /// Instance `i`'s account, holding the latest shared state.
    fn at(&mut self, i: usize, now: Millis) -> &mut Account {
        let i = i % self.instances.len();
        if i != self.current {
            self.shared = Some(self.instances[self.current].ledger_state(now));
            self.instances[self.current].written();
            if let Some(shared) = &self.shared {
                self.instances[i].load_ledger(shared, now);
            }
            self.current = i;
        }
        &mut self.instances[i]
    }
}

/// One exchange of holder `h` with the ledger, as the runtime does it.
fn exchange(
    a: &mut Account,
    shard: &mut Shard,
    now: Millis,
    need: Units,
) -> Option<Result<NeedGranted, ()>> {
    let waiting = (!need.is_zero()).then_some(need.tokens);
    let ex = shard.begin_exchange(now, HORIZON, waiting);
    let out = a.exchange(
        MODEL,
        ex.report.as_ref(),
        None,
        need,
        ex.want,
        now,
        LEASE_TTL,
        LEASE_TTL,
        &mut Vec::new(),
    );
    shard.end_exchange(Some((out.lease, out.epoch)));
    out.need.map(|n| n.map_err(|_| ()))
}

fn check_ledger(s: &Setup, a: &Account) -> Result<(), TestCaseError> {
    for w in a.windows() {
        prop_assert!(
            w.used() <= w.limit(),
            "{} holds {} > {}",
            w.label(),
            w.used(),
            w.limit()
        );
    }
    if s.quota > 0 {
        prop_assert!(a.quota().used() + a.quota().reserved() <= s.quota);
    }
    if let Some(c) = s.concurrent {
        prop_assert!(a.inflight() <= c, "{} slots held > {c}", a.inflight());
    }
    Ok(())
}

/// Sliding: at no time do the units of requests holding `[r, c + W)` exceed `N`. Fixed: no
/// period holds more than `N`, counting a request in every period `[r, c]` overlaps.
fn check_guarantee(s: &Setup, log: &[Request]) -> Result<(), TestCaseError> {
    let counted: Vec<&Request> = log.iter().filter(|r| r.committed.is_some()).collect();
    let units = |r: &Request, kind: LimitKind| match kind {
        LimitKind::Requests => 1,
        _ => r.committed.unwrap().1,
    };
    for limit in &s.limits {
        match *limit {
            Limit::Sliding {
                kind,
                limit,
                per_ms,
            } => {
                for probe in &counted {
                    let t = probe.reserved_at;
                    let total: u64 = counted
                        .iter()
                        .filter(|r| {
                            r.reserved_at <= t && t < r.committed.unwrap().0 + per_ms as Millis
                        })
                        .map(|r| units(r, kind))
                        .sum();
                    prop_assert!(total <= limit, "sliding {kind} {limit}/{per_ms}ms: {total}");
                }
            }
            Limit::Fixed { kind, limit } => {
                let mut per_period: HashMap<i64, u64> = HashMap::new();
                for r in &counted {
                    let (from, to) = (r.reserved_at, r.committed.unwrap().0);
                    for k in from.div_euclid(60_000)..=to.div_euclid(60_000) {
                        *per_period.entry(k).or_default() += units(r, kind);
                    }
                }
                for (k, total) in per_period {
                    prop_assert!(
                        total <= limit,
                        "fixed {kind} {limit}: {total} in period {k}"
                    );
                }
            }
        }
    }
    Ok(())
}

fn run(s: &Setup, steps: &[(Millis, Op)]) -> Result<(), TestCaseError> {
    let mut l = Ledgers::new(s);
    let mut shards: Vec<Shard> = (0..s.holders).map(|_| Shard::new()).collect();
    let mut log: Vec<Request> = Vec::new();
    let mut now = T0;
    for &(dt, op) in steps {
        now += dt;
        let open: Vec<usize> = (0..log.len()).filter(|&i| log[i].open()).collect();
        let pick = |p: usize| (!open.is_empty()).then(|| open[p % open.len()]);
        match op {
            Op::Reserve { holder, estimate } => {
                let h = holder % s.holders;
                let epoch = l.at(h, now).epoch();
                let admission = match shards[h].reserve(estimate, epoch, now + LEASE_TTL) {
                    Ok(ticket) => Some(Admission::Shard(h, ticket)),
                    Err(miss) => {
                        let need = Units::request(estimate);
                        let answer = if miss == ShardMiss::Dry {
                            exchange(l.at(h, now), &mut shards[h], now, need)
                        } else {
                            let out = l.at(h, now).exchange(
                                MODEL,
                                None,
                                None,
                                need,
                                Units::ZERO,
                                now,
                                LEASE_TTL,
                                LEASE_TTL,
                                &mut Vec::new(),
                            );
                            out.need.map(|n| n.map_err(|_| ()))
                        };
                        match answer {
                            Some(Ok(NeedGranted::InLease)) => Some(Admission::Shard(
                                h,
                                shards[h].admit_granted(estimate, now + LEASE_TTL),
                            )),
                            Some(Ok(NeedGranted::Reservation(g))) => {
                                Some(Admission::Reservation(g.reservation))
                            }
                            _ => None,
                        }
                    }
                };
                if let Some(admission) = admission {
                    log.push(Request {
                        admission,
                        estimate,
                        reserved_at: now,
                        committed: None,
                        released: false,
                    });
                }
            }
            Op::Commit { pick: p, per_mille } => {
                if let Some(i) = pick(p) {
                    let tokens = log[i].estimate * u64::from(per_mille) / 1_000;
                    let settled = match log[i].admission {
                        Admission::Shard(h, ticket) => shards[h].commit(ticket, tokens, now),
                        Admission::Reservation(id) => {
                            l.at(i, now)
                                .commit(id, Usage::Reported(tokens), now, &mut Vec::new())
                        }
                    };
                    prop_assert!(settled);
                    log[i].committed = Some((now, tokens));
                }
            }
            Op::Release { pick: p } => {
                if let Some(i) = pick(p) {
                    let settled = match log[i].admission {
                        Admission::Shard(h, ticket) => shards[h].release(ticket),
                        Admission::Reservation(id) => l.at(i, now).release(id),
                    };
                    prop_assert!(settled);
                    log[i].released = true;
                }
            }
            Op::Tick { holder } => {
                let h = holder % s.holders;
                if shards[h].wants_exchange(now + HORIZON) {
                    exchange(l.at(h, now), &mut shards[h], now, Units::ZERO);
                }
            }
            Op::Revoke => l.at(0, now).revoke_leases(),
        }
        check_ledger(s, l.at(0, now))?;
    }

    // Everything ends: settle what is in flight, close every holder; nothing may stay held.
    now += 1;
    for r in log.iter_mut().filter(|r| r.open()) {
        let settled = match r.admission {
            Admission::Shard(h, ticket) => shards[h].commit(ticket, r.estimate, now),
            Admission::Reservation(id) => {
                l.at(0, now)
                    .commit(id, Usage::Estimate, now, &mut Vec::new())
            }
        };
        prop_assert!(settled);
        r.committed = Some((now, r.estimate));
    }
    for (h, shard) in shards.iter_mut().enumerate() {
        let report = shard.close(now);
        l.at(h, now).exchange(
            MODEL,
            report.as_ref(),
            None,
            Units::ZERO,
            Units::ZERO,
            now,
            LEASE_TTL,
            LEASE_TTL,
            &mut Vec::new(),
        );
        prop_assert!(shard.is_idle());
    }
    let a = l.at(0, now);
    check_ledger(s, a)?;
    prop_assert_eq!(a.inflight(), 0, "slots left held");
    prop_assert_eq!(a.quota().reserved(), 0, "quota tokens left held");
    prop_assert!(
        a.windows().iter().all(|w| w.inflight() == 0),
        "units left held"
    );
    prop_assert_eq!(a.next_deadline(), None, "a lease stayed open");
    let used: u64 = log.iter().filter_map(|r| r.committed.map(|c| c.1)).sum();
    prop_assert_eq!(a.quota().used(), used, "every used token counted once");
    check_guarantee(s, &log)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn leases_across_holders_and_instances_never_overfill_a_limit_nor_lose_a_unit(
        s in setup_gen(),
        steps in steps_gen(),
    ) {
        run(&s, &steps)?;
    }
}
