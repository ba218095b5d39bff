//! The order in which a pool tries its accounts. Pure: the caller passes each candidate's summary
//! and the pool's cursor and random state.
//!
//! `best` scores each account by
//!
//! ```text
//! score = headroom × (1 − quota_fraction) × (1 − error_rate) / (1 + latency_ms / 1000)
//! ```
//!
//! where `headroom` is the smallest remaining fraction over the account's windows (1 = empty),
//! `quota_fraction` the used fraction of its quota (0 when unlimited), `error_rate` the moving
//! average of failed answers (0..1) and `latency_ms` the moving average latency. Highest first;
//! an account with no room anywhere scores 0 and is tried last.

use super::account::Summary;
use super::limits::Strategy;

/// Indices into `candidates`, in the order to try them. Unavailable accounts (disabled, expired,
/// exhausted, cooling down) go last, in their original order, so their denial still counts.
pub fn order(
    strategy: Strategy,
    candidates: &[Summary],
    cursor: &mut usize,
    rng: &mut u64,
) -> Vec<usize> {
    let n = candidates.len();
    let mut order: Vec<usize> = match strategy {
        Strategy::RoundRobin => {
            let start = if n == 0 { 0 } else { *cursor % n };
            *cursor = cursor.wrapping_add(1);
            (0..n).map(|i| (start + i) % n).collect()
        }
        Strategy::LeastUsed => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&a, &b| {
                let (a, b) = (&candidates[a], &candidates[b]);
                a.quota_fraction
                    .total_cmp(&b.quota_fraction)
                    .then(b.headroom.total_cmp(&a.headroom))
                    .then(a.inflight.cmp(&b.inflight))
            });
            idx
        }
        Strategy::Random => {
            let mut idx: Vec<usize> = (0..n).collect();
            // Fisher–Yates with xorshift64*: uniform enough, and no shared RNG state to lock.
            for i in (1..n).rev() {
                let j = (next_random(rng) % (i as u64 + 1)) as usize;
                idx.swap(i, j);
            }
            idx
        }
        Strategy::Best => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&a, &b| score(&candidates[b]).total_cmp(&score(&candidates[a])));
            idx
        }
    };
    // Stable: keeps the strategy's order within each group.
    order.sort_by_key(|&i| !candidates[i].available);
    order
}

/// The `best` strategy's score (see the module documentation).
pub fn score(s: &Summary) -> f64 {
    s.headroom.clamp(0.0, 1.0)
        * (1.0 - s.quota_fraction).clamp(0.0, 1.0)
        * (1.0 - s.error_rate).clamp(0.0, 1.0)
        / (1.0 + s.latency_ms.max(0.0) / 1000.0)
}

/// The next value of an xorshift64* generator kept in `state` (fast, not cryptographic).
pub fn next_random(state: &mut u64) -> u64 {
    if *state == 0 {
        *state = 0x9E37_79B9_7F4A_7C15;
    }
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(quota_fraction: f64, headroom: f64) -> Summary {
        Summary {
            available: true,
            quota_fraction,
            headroom,
            ..Summary::default()
        }
    }

    #[test]
    fn round_robin_rotates_its_start() {
        let c = vec![summary(0.0, 1.0); 3];
        let (mut cursor, mut rng) = (0, 1);
        assert_eq!(
            order(Strategy::RoundRobin, &c, &mut cursor, &mut rng),
            [0, 1, 2]
        );
        assert_eq!(
            order(Strategy::RoundRobin, &c, &mut cursor, &mut rng),
            [1, 2, 0]
        );
        assert_eq!(
            order(Strategy::RoundRobin, &c, &mut cursor, &mut rng),
            [2, 0, 1]
        );
    }

    #[test]
    fn least_used_prefers_the_lowest_quota_use_then_the_most_headroom() {
        let c = vec![summary(0.5, 1.0), summary(0.1, 0.2), summary(0.1, 0.9)];
        assert_eq!(order(Strategy::LeastUsed, &c, &mut 0, &mut 1), [2, 1, 0]);
    }

    #[test]
    fn best_scores_headroom_quota_errors_and_latency() {
        let mut slow = summary(0.0, 1.0);
        slow.latency_ms = 3000.0;
        let mut failing = summary(0.0, 1.0);
        failing.error_rate = 0.9;
        let c = vec![slow, failing, summary(0.0, 0.5), summary(0.0, 1.0)];
        assert_eq!(order(Strategy::Best, &c, &mut 0, &mut 1), [3, 2, 0, 1]);
    }

    #[test]
    fn random_is_a_permutation_and_unavailable_accounts_go_last() {
        let mut c = vec![summary(0.0, 1.0); 6];
        c[0].available = false;
        let mut rng = 42;
        let o = order(Strategy::Random, &c, &mut 0, &mut rng);
        assert_eq!(*o.last().unwrap(), 0);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 4, 5]);
        let again = order(Strategy::Random, &c, &mut 0, &mut rng);
        assert_ne!(o, again, "the generator advances");
    }
}
