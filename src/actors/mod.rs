//! The actor runtime: a supervisor, one pool actor per provider and one account actor per account.
//! Actors are thin owners of `domain` state; nothing here awaits the database or Redis on the
//! reservation path.

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
