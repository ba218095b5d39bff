//! Time as the domain sees it: milliseconds since the Unix epoch, read from one injected clock.
//!
//! Wall-clock milliseconds (not a monotonic instant) because account state is persisted and
//! restored across restarts, where only wall time means the same thing. Tests drive a clock that
//! follows tokio's paused time; `chrono::Utc::now()` is never read inside the domain.

use std::sync::Arc;

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = i64;

/// Where "now" comes from. Implementations must be cheap: it is read on every reservation.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> Millis;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A shared handle to the clock in use.
pub type SharedClock = Arc<dyn Clock>;

/// `ms` as an RFC 3339 UTC time, for people and APIs.
pub fn to_datetime(ms: Millis) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Converts a duration to milliseconds, saturating.
pub fn duration_ms(d: std::time::Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
