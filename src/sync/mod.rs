//! Persistence of the runtime's account state in the database: the periodic sync, the restore on
//! start, and each instance's clean-shutdown mark and heartbeat.
//!
//! The database's copy is written from each instance's view of the account: without Redis, the
//! actor's state; with Redis, the ledger as last agreed, under the ledger's version. Several
//! instances write the same rows, and the database keeps the higher version. With Redis the
//! ledger itself is the live state (see [`crate::ledger`]); the copy is what a start restores
//! when Redis no longer holds an account's ledger, and all there is without Redis.
//!
//! The copy exists so that a restart (clean or not) never resets a counter below the truth. After
//! a clean stop the restore is exact. After a crash the interval since the instance's last
//! heartbeat is unknown and is charged conservatively (see `Account::charge_gap`), unless the crash
//! mark in `data_dir` says nothing was admitted since the last complete copy ([`crate::mark`]).
//!
//! The shutdown mark and the heartbeat are per instance (`settings::shutdown_mark`,
//! `settings::heartbeat`): several instances can share one database, and one's clean stop must
//! not hide another's crash.

pub mod restore;
pub mod syncer;
