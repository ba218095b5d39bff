//! Retry delays that double after each failure, up to a ceiling: the one backoff of the request
//! log writer (`actors::tracker`), the Redis and database sync (`sync::syncer`) and the webhook
//! notifier (`actors::events`).

use std::time::Duration;

/// The waits before the retries of a failing operation: `first`, then twice the previous one,
/// never more than `max`. After a success, a new value starts over at `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits of `first`, `2 × first`, `4 × first`, … capped at `max`.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { max, next: first }
    }

    /// How long to wait before the next attempt; the wait after it is twice as long (up to the
    /// ceiling).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.min(self.max);
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_the_ceiling() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(500), ms(30_000));
        let waits: Vec<u128> = (0..9).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
    }

    #[test]
    fn a_first_wait_above_the_ceiling_is_cut_to_it() {
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(backoff.next_delay(), Duration::from_secs(5));
        assert_eq!(backoff.next_delay(), Duration::from_secs(5));
    }
}
