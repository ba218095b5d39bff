//! Plain types and pure logic: no actix, no diesel, no Redis, no HTTP.
//!
//! Everything here takes `now` as an argument where time matters, so it is tested directly.

pub mod limits;

pub use limits::{FixedReset, LimitKind, LimitScope, LimitSpec, NamedLimit, Strategy, Tokenizer};
