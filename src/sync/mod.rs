//! Persistence of the runtime's account state: periodic sync to Redis and the database, restore on
//! start from whichever copy is newer, and the clean-shutdown mark.
//!
//! The state lives in the actors; these copies exist so a restart (clean or not) never resets a
//! counter below the truth. After a clean stop the restore is exact. After a crash the interval
//! since the last heartbeat is unknown and is charged conservatively (see
//! `Account::charge_gap`), unless the crash mark in `data_dir` says nothing was admitted since
//! the last complete copy ([`crate::mark`]).
//!
//! Redis keys (the account id is a hash tag, so a Redis Cluster could shard by account later):
//! - `quotagate:account:{<account id>}` — the account's state as JSON, with its version;
//! - `quotagate:heartbeat` — ms since the epoch of the last completed sync tick.

pub mod redis_link;
pub mod restore;
pub mod syncer;

pub use redis_link::{classify, client, ping, RedisProblem};
