//! Several instances, one limit per account (DESIGN.md, "Capacity leases", level 2; API.md,
//! "Several instances"): every account's ledger lives in Redis, standalone or Cluster, and every
//! instance's account actor works on it.
//!
//! The ledger is the account's whole state ([`crate::domain::account::LedgerState`]: windows,
//! quota, concurrency, cooldowns, circuit, and every lease out with the instance that holds it).
//! An account operation (an exchange with a holder, a commit, an upstream's 429, a reset…) runs
//! the same domain code as in one process on the ledger as last read, and the result is written
//! back only over the version it was computed from (the `SWAP` script): when another instance
//! wrote first, the operation runs again on the newer ledger. So the instances apply their
//! operations one after the other, exactly as one process's messages, and the ledger's
//! guarantee (DESIGN.md, "The guarantee") holds across instances as it does across threads.
//! The worker threads' leases keep Redis off the hot path, and the instance's *reserve* (see
//! `domain::account::reserve`) keeps most of their refills off Redis: an exchange that leaves
//! what the ledger counts for the instance no larger is written with the next write (at the
//! latest ten report intervals later); only one that grows it waits for its write — about once
//! per `RESERVE_EXCHANGES` reports far from the limits, once per request when the room is too
//! tight to lease.
//!
//! Redis' `TIME` is the clock ([`LedgerClock`]). A dead instance's leases expire after
//! `sync.lease_ttl` and count as used; Redis out of reach: each instance keeps to its share of
//! what was left ([`crate::domain::account::Account::share_with`]) and merges what it admitted
//! when Redis is back; a ledger Redis lost is seeded again, conservatively, from an instance's
//! last view of it.

mod clock;
mod conn;
mod link;
mod scripts;

pub use clock::LedgerClock;
pub use conn::{classify, RedisConn, RedisProblem, RedisTarget};
pub use link::{LedgerLink, MISSED_BEATS};
pub use scripts::{ledger_key, split, Loaded, Swapped, INSTANCES_KEY, LEDGER_KEEP};
