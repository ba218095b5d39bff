//! Failed admin-token attempts, throttled per client address.
//!
//! Policy: an address that presents a wrong token to an admin route (or a stats route) [`LIMIT`]
//! times within [`WINDOW`] of its first failure is refused with 429 `rate_limit_exceeded`
//! (`limit: admin_auth`) until that window ends — the right token included, so that guesses
//! cannot be tested during the lock-out. Successes change nothing.
//!
//! Why per address and not global: a global counter would let anyone lock the operator out by
//! failing on purpose. The cost: behind a reverse proxy every client shares the proxy's address
//! (`X-Forwarded-For` is not trusted: anyone can write it), so one client failing locks all of
//! them out of the admin API for a minute — never out of the client API. Memory is bounded:
//! at most [`MAX_TRACKED`] addresses are kept; beyond that, new addresses share one bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per address within [`WINDOW`].
pub const LIMIT: u32 = 10;
/// How long failures count, from an address's first failure.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most.
const MAX_TRACKED: usize = 10_000;

/// Failures of one address since `since`.
#[derive(Debug, Clone, Copy)]
struct Strikes {
    since: Instant,
    failures: u32,
}

impl Strikes {
    fn current(&self, now: Instant) -> bool {
        now < self.since + WINDOW
    }
}

/// Failed admin attempts by client address (`None`: an address we cannot tell, and the shared
/// bucket when the table is full).
#[derive(Debug, Default)]
pub struct AdminThrottle {
    strikes: Mutex<HashMap<Option<IpAddr>, Strikes>>,
}

impl AdminThrottle {
    /// Runs `check` (is this the right token?) for `peer` unless it is locked out. `Ok(passed)`,
    /// or `Err(wait)`: locked out for `wait` more; a failed check is counted.
    pub fn attempt(
        &self,
        peer: Option<IpAddr>,
        now: Instant,
        check: impl FnOnce() -> bool,
    ) -> Result<bool, Duration> {
        let mut strikes = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        let key = if strikes.contains_key(&peer) || strikes.len() < MAX_TRACKED {
            peer
        } else {
            strikes.retain(|_, s| s.current(now));
            if strikes.len() < MAX_TRACKED {
                peer
            } else {
                None
            }
        };
        if let Some(s) = strikes.get(&key).filter(|s| s.current(now)) {
            if s.failures >= LIMIT {
                return Err(s.since + WINDOW - now);
            }
        }
        if check() {
            return Ok(true);
        }
        let entry = strikes.entry(key).or_insert(Strikes {
            since: now,
            failures: 0,
        });
        if !entry.current(now) {
            *entry = Strikes {
                since: now,
                failures: 0,
            };
        }
        entry.failures += 1;
        if entry.failures == LIMIT {
            log::warn!(
                event = "admin_auth_throttled", peer:? = key;
                "{LIMIT} failed admin-token attempts within {WINDOW:?}: refusing this address until the window ends"
            );
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn an_address_is_locked_out_after_the_limit_until_its_window_ends() {
        let t = AdminThrottle::default();
        let t0 = Instant::now();
        for i in 0..LIMIT {
            let at = t0 + Duration::from_secs(u64::from(i));
            assert_eq!(t.attempt(ip(1), at, || false), Ok(false));
        }
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            t.attempt(ip(1), later, || true),
            Err(Duration::from_secs(40)),
            "even the right token waits: no guess can be tested while locked out"
        );
        assert_eq!(t.attempt(ip(2), later, || true), Ok(true), "others are not");
        assert_eq!(t.attempt(ip(1), t0 + WINDOW, || true), Ok(true));
        assert_eq!(
            t.attempt(ip(1), t0 + WINDOW, || false),
            Ok(false),
            "a new window"
        );
    }

    #[test]
    fn successes_and_failures_below_the_limit_pass() {
        let t = AdminThrottle::default();
        let now = Instant::now();
        for _ in 0..LIMIT - 1 {
            assert_eq!(t.attempt(None, now, || false), Ok(false));
        }
        assert_eq!(t.attempt(None, now, || true), Ok(true));
        assert_eq!(t.attempt(None, now, || false), Ok(false));
        assert!(t.attempt(None, now, || true).is_err());
    }

    #[test]
    fn memory_stays_bounded_however_many_addresses_fail() {
        let t = AdminThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let addr = Some(IpAddr::from(i.to_be_bytes()));
            let _ = t.attempt(addr, now, || false);
        }
        assert!(t.strikes.lock().unwrap().len() <= MAX_TRACKED + 1);
    }
}
