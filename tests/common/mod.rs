//! Shared helpers for the integration tests: every `tests/*.rs` declares `mod common;`.
//!
//! Not every test binary uses every helper, hence `dead_code` is allowed module-wide.
#![allow(dead_code)]

pub mod services;

// Re-exported so tests write `common::pg_database()`; not every binary uses every name.
#[allow(unused_imports)]
pub use services::{
    pg_database, redis_database, redis_url, unique_key_prefix, TestPostgres, TestRedis,
};
