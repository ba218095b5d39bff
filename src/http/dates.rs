//! `from`/`to` of the stats API: RFC 3339 times, or plain dates (`2024-01-31`, the form the
//! seed's guide writes). A plain date means a whole UTC day: as `from` its start, as `to` its
//! end — the next midnight, since ranges are `[from, to)`, so the day's last instant counts.

use chrono::{DateTime, Days, Duration, NaiveDate, NaiveDateTime, Utc};

use super::error::ApiError;

/// The default range, back from `to`.
pub const DEFAULT_RANGE: Duration = Duration::hours(24);

/// Which end of a range a value gives: a plain date means the start of its day as `from` and
/// the end of its day as `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    From,
    To,
}

impl End {
    fn param(self) -> &'static str {
        match self {
            End::From => "from",
            End::To => "to",
        }
    }
}

/// One end of a range: an RFC 3339 time, or a plain `YYYY-MM-DD` date (UTC).
pub fn parse(text: &str, end: End) -> Result<DateTime<Utc>, ApiError> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let param = end.param();
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        ApiError::invalid(
            format!(
                "{param} `{text}` is neither an RFC 3339 time nor a date; write e.g. \
                 2026-11-28T00:00:00Z or 2026-11-28"
            ),
            Some(param),
        )
    })?;
    let day = match end {
        End::From => Some(day),
        // The end of the day is the next midnight: ranges exclude their end.
        End::To => day.checked_add_days(Days::new(1)),
    };
    day.and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| ApiError::invalid(format!("{param} `{text}` is out of range"), Some(param)))
}

/// `from`/`to` as stored (UTC): the last 24 hours by default, `from` ≤ `to`.
pub fn range(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(NaiveDateTime, NaiveDateTime), ApiError> {
    range_at(from, to, Utc::now())
}

/// [`range`] with `now` given (tests).
pub fn range_at(
    from: Option<&str>,
    to: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(NaiveDateTime, NaiveDateTime), ApiError> {
    fn given(v: Option<&str>) -> Option<&str> {
        v.filter(|s| !s.trim().is_empty())
    }
    let to = match given(to) {
        Some(text) => parse(text, End::To)?,
        None => now,
    };
    let from = match given(from) {
        Some(text) => parse(text, End::From)?,
        None => to - DEFAULT_RANGE,
    };
    if from > to {
        return Err(ApiError::invalid(
            format!(
                "from ({}) is after to ({})",
                from.to_rfc3339(),
                to.to_rfc3339()
            ),
            Some("from"),
        ));
    }
    Ok((from.naive_utc(), to.naive_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        DateTime::parse_from_rfc3339(s).unwrap().naive_utc()
    }

    fn param_of(err: &ApiError) -> Option<&str> {
        match err {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn plain_dates_cover_whole_utc_days() {
        let (from, to) = range(Some("2024-01-01"), Some("2024-01-31")).unwrap();
        assert_eq!(from, at("2024-01-01T00:00:00Z"));
        assert_eq!(to, at("2024-02-01T00:00:00Z"));
    }

    #[test]
    fn the_same_plain_date_on_both_ends_is_that_one_day() {
        let (from, to) = range(Some("2024-02-29"), Some("2024-02-29")).unwrap();
        assert_eq!(from, at("2024-02-29T00:00:00Z"));
        assert_eq!(to, at("2024-03-01T00:00:00Z"));
    }

    #[test]
    fn rfc3339_times_are_taken_as_they_are() {
        let (from, to) = range(
            Some("2024-01-01T10:00:00+02:00"),
            Some("2024-01-02T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(from, at("2024-01-01T08:00:00Z"));
        assert_eq!(to, at("2024-01-02T00:00:00Z"));
    }

    #[test]
    fn a_plain_from_with_a_default_to_runs_until_now() {
        let now = DateTime::parse_from_rfc3339("2024-01-10T12:00:00Z")
            .unwrap()
            .to_utc();
        let (from, to) = range_at(Some("2024-01-09"), None, now).unwrap();
        assert_eq!(from, at("2024-01-09T00:00:00Z"));
        assert_eq!(to, now.naive_utc());
        let (from, _) = range_at(None, Some("2024-01-09"), now).unwrap();
        assert_eq!(
            from,
            at("2024-01-09T00:00:00Z"),
            "24 h before the end of the 9th"
        );
    }

    #[test]
    fn bad_dates_name_their_parameter() {
        for (from, to, param) in [
            (Some("2024-13-01"), None, "from"),
            (None, Some("31/01/2024"), "to"),
            (Some("2024-01-01T25:00:00Z"), None, "from"),
        ] {
            let err = range(from, to).unwrap_err();
            assert_eq!(param_of(&err), Some(param), "{from:?} {to:?}: {err}");
        }
        let err = range(Some("2024-02-02"), Some("2024-01-31")).unwrap_err();
        assert_eq!(param_of(&err), Some("from"));
    }
}
