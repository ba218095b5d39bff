//! Shared helpers for the integration tests: every `tests/*.rs` declares `mod common;`.
//!
//! Not every test binary uses every helper, hence `dead_code` is allowed module-wide.
#![allow(dead_code)]

pub mod app;
pub mod load;
pub mod services;
pub mod specs;
pub mod status;
pub mod upstream;

// Re-exported so tests write `common::pg_database()`; not every binary uses every name.
#[allow(unused_imports)]
pub use services::{
    pg_database, redis_database, redis_url, unique_key_prefix, TestPostgres, TestRedis,
};

#[allow(unused_imports)]
pub use app::{
    chat_body, eventually, free_port, AccountInfo, Exit, Http, Resp, SseResp, TestGateway,
};

#[allow(unused_imports)]
pub use upstream::{Behavior, KeyStats, MockUpstream, SseEnd, StrictLimits, MOCK_MODEL};
