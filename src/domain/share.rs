//! An instance's part of a limit while the instances cannot reach their shared ledger (DESIGN.md,
//! "Capacity leases", level 2): `n` live instances split every limit so that their parts add up
//! to the limit exactly, whatever each one does meanwhile.

/// This instance's place among the `instances` sharing a limit: `rank` in `0..instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub instances: u64,
    pub rank: u64,
}

impl Share {
    /// The whole limit: one instance.
    pub const WHOLE: Share = Share {
        instances: 1,
        rank: 0,
    };

    /// `rank` (taken modulo `instances`) among `instances` (at least 1).
    pub fn new(instances: u64, rank: u64) -> Share {
        let instances = instances.max(1);
        Share {
            instances,
            rank: rank % instances,
        }
    }

    /// Its part of `total` units: `total / n`, plus one unit of the remainder for the first
    /// `total % n` ranks, so that the parts of all ranks add up to `total` (a limit of 2 shared by
    /// three instances: 1, 1 and 0).
    pub fn part(&self, total: u64) -> u64 {
        total / self.instances + u64::from(self.rank < total % self.instances)
    }
}

impl Default for Share {
    fn default() -> Self {
        Share::WHOLE
    }
}

/// Where an account's remainder units go: ranks rotated by the account (a stable hash of its
/// id, the same on every instance), so that with several accounts every instance gets some.
pub fn rank_for(account_id: &str, rank: u64) -> u64 {
    // FNV-1a: stable across processes and builds, unlike the standard library's hasher.
    let hash = account_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    rank.wrapping_add(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_of_every_rank_add_up_to_the_whole() {
        for n in 1..=7 {
            for total in 0..=40 {
                let sum: u64 = (0..n).map(|r| Share::new(n, r).part(total)).sum();
                assert_eq!(sum, total, "{total} over {n}");
            }
        }
        assert_eq!(
            (0..3).map(|r| Share::new(3, r).part(2)).collect::<Vec<_>>(),
            [1, 1, 0]
        );
        assert_eq!(Share::WHOLE.part(5), 5);
    }

    #[test]
    fn accounts_spread_the_remainders_over_the_instances() {
        let ranks: std::collections::HashSet<u64> = (0..12)
            .map(|a| rank_for(&format!("account-{a}"), 0) % 3)
            .collect();
        assert_eq!(ranks.len(), 3);
        assert_eq!(rank_for("x", 1), rank_for("x", 1), "stable");
    }
}
