//! The clock of instances that share ledgers: Redis' own time (`TIME`, read by every ledger
//! script), so that lease deadlines, windows and quota periods mean the same on every instance
//! whatever their clocks say.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::domain::time::{Clock, Millis, SharedClock};

/// An offset smaller than this is not worth following: it is within a round trip to Redis, and
/// following it would make time jitter back and forth.
const SLACK_MS: Millis = 20;

/// The local clock moved by the last offset seen between it and Redis' time (0 before the first
/// answer from Redis).
#[derive(Debug)]
pub struct LedgerClock {
    base: SharedClock,
    offset: AtomicI64,
}

impl LedgerClock {
    pub fn new(base: SharedClock) -> LedgerClock {
        LedgerClock {
            base,
            offset: AtomicI64::new(0),
        }
    }

    /// Takes Redis' time `redis_now` (ms) read just now: from then on this clock follows it when
    /// it differs by more than [`SLACK_MS`].
    pub fn observe(&self, redis_now: Millis) {
        let offset = redis_now - self.base.now_ms();
        if (offset - self.offset.load(Ordering::Relaxed)).abs() > SLACK_MS {
            self.offset.store(offset, Ordering::Relaxed);
        }
    }

    /// How far Redis' time is ahead of the local clock (ms; negative: behind).
    pub fn offset_ms(&self) -> Millis {
        self.offset.load(Ordering::Relaxed)
    }
}

impl Clock for LedgerClock {
    fn now_ms(&self) -> Millis {
        self.base.now_ms() + self.offset.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Debug)]
    struct Fixed(Millis);

    impl Clock for Fixed {
        fn now_ms(&self) -> Millis {
            self.0
        }
    }

    #[test]
    fn follows_redis_time_beyond_the_slack_and_only_then() {
        let clock = LedgerClock::new(Arc::new(Fixed(1_000_000)));
        assert_eq!(clock.now_ms(), 1_000_000);
        clock.observe(1_000_015);
        assert_eq!(
            clock.now_ms(),
            1_000_000,
            "within a round trip: not followed"
        );
        clock.observe(4_600_000);
        assert_eq!(clock.now_ms(), 4_600_000, "an hour ahead: followed");
        clock.observe(999_000);
        assert_eq!(clock.offset_ms(), -1_000);
        assert_eq!(clock.now_ms(), 999_000);
    }
}
