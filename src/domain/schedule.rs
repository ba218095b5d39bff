//! Reset schedules: a five-field cron expression in an IANA timezone (quota periods, fixed windows,
//! jobs). Pure: the caller passes `now`.

use std::fmt;
use std::sync::Arc;

use chrono::TimeZone as _;
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use super::time::Millis;

/// A recurring instant: `cron` evaluated in `timezone`.
#[derive(Clone)]
pub struct Schedule {
    cron: Arc<Cron>,
    timezone: Tz,
    text: Arc<str>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({} {})", self.text, self.timezone)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.timezone == other.timezone
    }
}

/// Parses a five-field cron expression (minute hour day-of-month month day-of-week), the dialect of
/// every schedule in `config.yaml`. Seconds and years are refused so that `0 0 * * *` means the
/// same to everyone reading the file.
pub fn parse_cron(expression: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| format!("invalid cron expression `{expression}`: {e}"))
}

/// Parses an IANA timezone name such as `America/Los_Angeles` or `UTC`.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown timezone `{name}` (use an IANA name such as UTC or Europe/Rome)")
    })
}

impl Schedule {
    pub fn new(cron: &str, timezone: &str) -> Result<Schedule, String> {
        Ok(Schedule {
            cron: Arc::new(parse_cron(cron)?),
            timezone: parse_timezone(timezone)?,
            text: Arc::from(cron),
        })
    }

    /// Every day at 00:00 UTC: the default quota period.
    pub fn daily_utc() -> Schedule {
        Schedule::new("0 0 * * *", "UTC").expect("the default schedule parses")
    }

    pub fn expression(&self) -> &str {
        &self.text
    }

    pub fn timezone(&self) -> &str {
        self.timezone.name()
    }

    /// The first occurrence strictly after `now`. A schedule that never fires again (an impossible
    /// date) yields a time far in the future rather than an error.
    pub fn next_after(&self, now: Millis) -> Millis {
        let Some(local) = self.timezone.timestamp_millis_opt(now).single() else {
            return Millis::MAX / 2;
        };
        self.cron
            .find_next_occurrence(&local, false)
            .map(|t| t.timestamp_millis())
            .unwrap_or(Millis::MAX / 2)
    }

    /// The last occurrence at or before `now` (the start of the current period).
    pub fn previous_at_or_before(&self, now: Millis) -> Millis {
        let Some(local) = self.timezone.timestamp_millis_opt(now).single() else {
            return 0;
        };
        self.cron
            .find_previous_occurrence(&local, true)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_daily_schedule_fires_at_the_next_midnight_in_its_timezone() {
        let utc = Schedule::daily_utc();
        assert_eq!(
            utc.next_after(ms("2026-11-28T22:00:00Z")),
            ms("2026-11-29T00:00:00Z")
        );
        assert_eq!(
            utc.next_after(ms("2026-11-29T00:00:00Z")),
            ms("2026-11-30T00:00:00Z"),
            "strictly after"
        );
        assert_eq!(
            utc.previous_at_or_before(ms("2026-11-29T00:00:00Z")),
            ms("2026-11-29T00:00:00Z")
        );
        let la = Schedule::new("0 0 * * *", "America/Los_Angeles").unwrap();
        assert_eq!(
            la.next_after(ms("2026-11-28T22:00:00Z")),
            ms("2026-11-29T08:00:00Z")
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(Schedule::new("* * *", "UTC").is_err());
        assert!(
            Schedule::new("0 0 * * * *", "UTC").is_err(),
            "no seconds field"
        );
        assert!(Schedule::new("0 0 * * *", "Mars/Olympus").is_err());
    }
}
