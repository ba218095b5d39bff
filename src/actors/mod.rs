//! The actor runtime: a supervisor, one pool actor per provider and one account actor per account.
//! Actors are thin owners of `domain` state; nothing here awaits the database or Redis on the
//! reservation path.
//!
//! # Glossary
//! Admission, from the bottom up:
//! - **units** ([`crate::domain::lease::Units`]): requests, tokens and concurrency slots of an
//!   account's limits;
//! - **lease**: units an account's ledger (its actor; with Redis, the shared ledger) hands to a
//!   **holder** (a worker thread's [`crate::domain::lease::Shard`]; with Redis, the instance's
//!   *reserve*), which admits requests from them alone and reports at every report tick;
//! - **reservation**: one request's units — from a shard (a [`crate::domain::lease::ShardTicket`])
//!   or, when the room is too tight to lease, granted by the actor alone (a
//!   [`crate::domain::account::Grant`]); [`Reservation`] is what the proxy gets, and its
//!   [`ReservationGuard`] settles it exactly once (commit, release, or on drop); [`Served`] is
//!   the same without the guard.
//!
//! Refusal, from the bottom up:
//! - [`crate::domain::window::Block`]: one window is full (until when) or can never fit;
//! - [`crate::domain::account::Denial`]: why one account refuses (disabled, expired, impossible,
//!   quota exceeded, rate limited);
//! - [`crate::domain::refusal::Refusals`]: every refusing account's denial, reduced; its
//!   [`crate::domain::refusal::Verdict`] is the one answer by API.md's precedence, and
//!   [`AcquireError::Refused`] carries it to the HTTP layer.

pub mod account;
pub mod catalog;
pub mod events;
pub mod holder;
pub mod pool;
pub mod registry;
pub mod reservation;
pub mod supervisor;
pub mod system;
pub mod tracker;

pub use reservation::{Reservation, ReservationGuard, Served};
pub use system::{AcquireError, QuotaSystem, RuntimeSettings};

use crate::domain::time::{Clock, Millis};

/// A clock that follows tokio's time, so that tests under `tokio::time::pause()` control it with
/// `advance`. Starts at `base` (ms since the epoch).
#[derive(Debug)]
pub struct TokioClock {
    base: Millis,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(base: Millis) -> TokioClock {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> Millis {
        self.base + self.start.elapsed().as_millis() as Millis
    }
}
