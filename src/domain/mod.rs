//! Plain types and pure logic: no actix, no diesel, no Redis, no HTTP.
//!
//! Everything here takes `now` as an argument where time matters, so it is tested directly.

pub mod limits;

pub use limits::{FixedReset, LimitKind, LimitScope, LimitSpec, NamedLimit, Strategy, Tokenizer};
pub mod account;
pub mod forecast;
pub mod quota;
pub mod refusal;
pub mod schedule;
pub mod selection;
pub mod share;
pub mod time;
pub mod upstream_timing;
pub mod window;

pub mod estimate;
pub mod lease;
#[cfg(test)]
mod tests;
