//! Every way an upstream says "wait", read into one delay: pure functions from an answer's headers
//! (and, for Gemini, its body) and `now` to milliseconds, capped at `upstream.max_cooldown`.
//!
//! The forms real providers send (API.md, "Upstream timing"):
//!
//! | where | form | example |
//! |---|---|---|
//! | `retry-after` | seconds, integer or decimal | `7`, `0.25` |
//! | `retry-after` | an HTTP-date (IMF-fixdate, RFC 850, asctime) | `Sat, 28 Nov 2026 12:00:30 GMT` |
//! | `retry-after-ms` | milliseconds | `1500` |
//! | `x-ratelimit-reset-requests` / `-tokens` | a duration (OpenAI, Groq) | `1m30s`, `6m0s`, `500ms`, `2m59.56s` |
//! | `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset` | an RFC 3339 time | `2026-11-28T12:00:30Z` |
//! | `x-ratelimit-reset` | epoch milliseconds (OpenRouter) | `1795867230000` |
//! | 429 body | Gemini's `error.details[]` `google.rpc.RetryInfo` `retryDelay` | `"30s"` |
//!
//! Rules, whatever the form:
//! - the longest wait wins;
//! - a wait of zero or in the past says nothing usable: the caller's short default applies (never
//!   a hot loop on an account that just answered 429);
//! - a reset header whose own `…-remaining` says there is room left is not a wait: Groq sends the
//!   time its *daily* request window refills on a 429 caused by its minute token window;
//! - a number far too large for a delay (≥ 10⁹ seconds, ≥ 10¹² ms: over 31 years) is read as the
//!   epoch time it almost certainly is;
//! - every wait is capped at `cap` (`upstream.max_cooldown`), and the result says when it was cut;
//! - garbage, negative, NaN or absurdly large values never overflow or panic: they are ignored
//!   (garbage, negative) or saturate and are capped (huge).

use super::time::Millis;

/// Delay-seconds at or above this are an epoch time in seconds (2001-09-09), not a delay.
const EPOCH_SECONDS_FROM: f64 = 1e9;
/// Delay-milliseconds at or above this are an epoch time in milliseconds.
const EPOCH_MILLIS_FROM: f64 = 1e12;
/// Larger 429 bodies are not searched for Gemini's `RetryInfo` (a real one is a few hundred bytes).
const MAX_BODY_SCANNED: usize = 64 * 1024;

/// How long an upstream asked to wait, after the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The wait to apply, in ms: at least 1, at most the cap.
    pub ms: Millis,
    /// What the upstream asked for, in ms (saturated at `Millis::MAX`); above `ms` when cut.
    pub asked_ms: Millis,
    /// The header (or `body.retryDelay`) the longest wait came from.
    pub source: &'static str,
}

impl Wait {
    /// Whether the upstream asked for more than the cap.
    pub fn capped(&self) -> bool {
        self.asked_ms > self.ms
    }
}

/// The wait a 429 answer asks for: the longest of every form above, capped at `cap` ms; `None`
/// when no form gives a usable (positive) wait. `header` looks a header up by its lower-case name.
pub fn wait_after_429<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now: Millis,
    cap: Millis,
) -> Option<Wait> {
    let room_left = |remaining: &str| {
        header(remaining)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|n| n > 0.0)
    };
    let mut asked: Vec<(&'static str, Option<Millis>)> = vec![
        (
            "retry-after",
            header("retry-after").and_then(|v| retry_after(v, now)),
        ),
        (
            "retry-after-ms",
            header("retry-after-ms").and_then(|v| delay_ms(v, now)),
        ),
        ("body.retryDelay", gemini_retry_delay(body)),
    ];
    for (reset, remaining) in [
        (
            "x-ratelimit-reset-requests",
            "x-ratelimit-remaining-requests",
        ),
        ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
    ] {
        if !room_left(remaining) {
            asked.push((reset, header(reset).and_then(|v| reset_delay(v, now))));
        }
    }
    for (reset, remaining) in ANTHROPIC {
        if !room_left(remaining) {
            asked.push((reset, header(reset).and_then(|v| rfc3339_delay(v, now))));
        }
    }
    if !room_left("x-ratelimit-remaining") {
        asked.push((
            "x-ratelimit-reset",
            header("x-ratelimit-reset").and_then(|v| epoch_reset(v, now)),
        ));
    }
    asked
        .into_iter()
        .filter_map(|(source, ms)| Some((source, ms?)))
        .filter(|(_, ms)| *ms > 0)
        .max_by_key(|(_, ms)| *ms)
        .map(|(source, asked_ms)| Wait {
            ms: asked_ms.min(cap.max(1)),
            asked_ms,
            source,
        })
}

/// Anthropic's reset headers and the remaining count each goes with.
const ANTHROPIC: [(&str, &str); 4] = [
    (
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-requests-remaining",
    ),
    (
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-tokens-remaining",
    ),
    (
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-input-tokens-remaining",
    ),
    (
        "anthropic-ratelimit-output-tokens-reset",
        "anthropic-ratelimit-output-tokens-remaining",
    ),
];

/// `retry-after`: delay-seconds (integer or decimal) or an HTTP-date, as ms from `now` (negative
/// for a date in the past). `None` for garbage.
pub fn retry_after(value: &str, now: Millis) -> Option<Millis> {
    let value = value.trim();
    if let Some(seconds) = number(value) {
        return seconds_delay(seconds, now);
    }
    http_date(value).map(|at| at.saturating_sub(now))
}

/// `retry-after-ms`: milliseconds (an epoch time in ms when absurdly large for a delay).
pub fn delay_ms(value: &str, now: Millis) -> Option<Millis> {
    let ms = number(value.trim())?;
    if ms >= EPOCH_MILLIS_FROM {
        return Some(saturate(ms).saturating_sub(now));
    }
    Some(saturate(ms.ceil()))
}

/// An `x-ratelimit-reset-*` value as ms from `now`: a duration as providers write it (`1s`,
/// `6m0s`, `2m59.56s`, `20ms`, `1h2m`, `1d`), or bare seconds (an epoch time when too large for a
/// delay). `None` for garbage (a unit we do not know, a sign, nothing at all).
pub fn reset_delay(value: &str, now: Millis) -> Option<Millis> {
    let text = value.trim();
    if let Some(seconds) = number(text) {
        return seconds_delay(seconds, now);
    }
    parse_duration(text)
}

/// A duration written as number-unit pairs (`1m30s`, `500ms`, `2m59.56s`, `1h2m`, `1d`), in ms,
/// rounded up and saturated. `None` for anything else.
pub fn parse_duration(text: &str) -> Option<Millis> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Some(saturate(total.ceil()))
}

/// Anthropic's RFC 3339 reset time as ms from `now`.
fn rfc3339_delay(value: &str, now: Millis) -> Option<Millis> {
    let at = chrono::DateTime::parse_from_rfc3339(value.trim()).ok()?;
    Some(at.timestamp_millis().saturating_sub(now))
}

/// OpenRouter's `X-RateLimit-Reset`: epoch milliseconds. Epoch seconds and plain delay-seconds,
/// which other providers send under the same name, are told apart by size.
fn epoch_reset(value: &str, now: Millis) -> Option<Millis> {
    let n = number(value.trim())?;
    if n >= EPOCH_MILLIS_FROM {
        Some(saturate(n).saturating_sub(now))
    } else {
        seconds_delay(n, now)
    }
}

/// Gemini's `RetryInfo.retryDelay` in a 429 body: `{"error": {"details": [{"@type":
/// "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}`, the same wrapped in a
/// one-element array (its OpenAI-compatible endpoint), or `retryDelay` as `{seconds, nanos}`.
pub fn gemini_retry_delay(body: &[u8]) -> Option<Millis> {
    if body.len() > MAX_BODY_SCANNED || !body.windows(10).any(|w| w == b"retryDelay") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = match &value {
        serde_json::Value::Array(items) => items.first()?.get("error")?,
        other => other.get("error")?,
    };
    error
        .get("details")?
        .as_array()?
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .filter_map(|d| protobuf_duration(d.get("retryDelay")?))
        .max()
}

/// A protobuf `Duration` in JSON: `"30s"`, `"1.5s"`, or `{"seconds": "30", "nanos": 0}`.
fn protobuf_duration(value: &serde_json::Value) -> Option<Millis> {
    match value {
        serde_json::Value::String(text) => {
            let seconds = number(text.trim().strip_suffix('s')?)?;
            (seconds >= 0.0).then(|| saturate((seconds * 1000.0).ceil()))
        }
        serde_json::Value::Object(fields) => {
            let part = |name: &str| match fields.get(name) {
                None => Some(0.0),
                Some(serde_json::Value::String(s)) => number(s),
                Some(other) => other.as_f64(),
            };
            let ms = part("seconds")? * 1000.0 + part("nanos")? / 1e6;
            (ms >= 0.0).then(|| saturate(ms.ceil()))
        }
        _ => None,
    }
}

/// Delay-seconds as ms; a value too large for a delay is an epoch time in seconds.
fn seconds_delay(seconds: f64, now: Millis) -> Option<Millis> {
    if seconds < 0.0 {
        return None;
    }
    if seconds >= EPOCH_SECONDS_FROM && seconds.is_finite() {
        return Some(saturate(seconds * 1000.0).saturating_sub(now));
    }
    Some(saturate((seconds * 1000.0).ceil()))
}

/// A plain decimal number (digits, one optional `.`, an optional exponent), never `inf`, `NaN`
/// or a sign: what Rust's `f64` parser accepts beyond that is not a wait any provider sends.
fn number(text: &str) -> Option<f64> {
    let plain = !text.is_empty()
        && text.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    plain.then(|| text.parse::<f64>().ok()).flatten()
}

/// `ms` as `Millis`, saturating at the type's bounds (the `as` cast saturates and maps NaN to 0).
fn saturate(ms: f64) -> Millis {
    ms as Millis
}

/// An HTTP-date in any of the three forms RFC 9110 requires a recipient to accept, as epoch ms.
fn http_date(value: &str) -> Option<Millis> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc2822(value) {
        return Some(at.timestamp_millis());
    }
    // RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`).
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|format| chrono::NaiveDateTime::parse_from_str(value, format).ok())
        .map(|at| at.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// 2026-11-28T12:00:00Z.
    const NOW: Millis = 1_795_867_200_000;
    const HOUR: Millis = 3_600_000;

    fn wait(headers: &[(&str, &str)], body: &str) -> Option<Wait> {
        let map: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        wait_after_429(
            |name| map.get(name).map(String::as_str),
            body.as_bytes(),
            NOW,
            HOUR,
        )
    }

    fn ms(headers: &[(&str, &str)]) -> Option<Millis> {
        wait(headers, "").map(|w| w.ms)
    }

    #[test]
    fn retry_after_in_whole_or_decimal_seconds() {
        assert_eq!(ms(&[("retry-after", "7")]), Some(7_000));
        assert_eq!(ms(&[("retry-after", "0.25")]), Some(250));
        assert_eq!(ms(&[("retry-after", " 2 ")]), Some(2_000));
    }

    #[test]
    fn retry_after_as_an_http_date_in_each_of_its_three_forms() {
        assert_eq!(
            ms(&[("retry-after", "Sat, 28 Nov 2026 12:00:30 GMT")]),
            Some(30_000)
        );
        assert_eq!(
            ms(&[("retry-after", "Saturday, 28-Nov-26 12:00:45 GMT")]),
            Some(45_000)
        );
        assert_eq!(
            ms(&[("retry-after", "Sat Nov 28 12:01:00 2026")]),
            Some(60_000)
        );
    }

    #[test]
    fn an_http_date_in_the_past_or_a_zero_says_nothing_usable() {
        // The caller's short default applies: never a 1 ms cooldown and a hot loop.
        assert_eq!(
            ms(&[("retry-after", "Sat, 28 Nov 2026 11:59:50 GMT")]),
            None
        );
        assert_eq!(ms(&[("retry-after", "0")]), None);
        assert_eq!(ms(&[("retry-after-ms", "0")]), None);
    }

    #[test]
    fn retry_after_ms_in_milliseconds() {
        assert_eq!(ms(&[("retry-after-ms", "1500")]), Some(1_500));
        assert_eq!(ms(&[("retry-after-ms", "12.5")]), Some(13));
    }

    #[test]
    fn openai_reset_durations() {
        for (text, expected) in [
            ("1m30s", 90_000),
            ("6m0s", 360_000),
            ("500ms", 500),
            ("2m59.56s", 179_560),
            ("1h", 3_600_000),
            ("20ms", 20),
            ("1s", 1_000),
            ("0.5", 500),
        ] {
            assert_eq!(
                ms(&[("x-ratelimit-reset-tokens", text)]),
                Some(expected),
                "{text}"
            );
            assert_eq!(
                ms(&[("x-ratelimit-reset-requests", text)]),
                Some(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_combine_units_and_refuse_what_they_do_not_know() {
        assert_eq!(parse_duration("1h2m"), Some(3_720_000));
        assert_eq!(parse_duration("1d"), Some(86_400_000));
        assert_eq!(parse_duration("1.5s"), Some(1_500));
        for garbage in ["", "soon", "5x", "-1s", "1m-3s", "s", "1 m"] {
            assert_eq!(parse_duration(garbage), None, "{garbage}");
        }
    }

    #[test]
    fn a_reset_whose_window_still_has_room_is_not_a_wait() {
        // Groq: a 429 for the minute's tokens also carries the time its daily request window
        // refills, with requests left.
        let groq = [
            ("retry-after", "7"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ];
        let w = wait(&groq, "").unwrap();
        assert_eq!((w.ms, w.source), (7_660, "x-ratelimit-reset-tokens"));
    }

    #[test]
    fn anthropic_reset_times() {
        let w = wait(
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-11-28T12:00:20Z"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2026-11-28T12:00:40+00:00",
                ),
                ("anthropic-ratelimit-tokens-remaining", "5000"),
                ("anthropic-ratelimit-tokens-reset", "2026-11-28T12:05:00Z"),
            ],
            "",
        )
        .unwrap();
        assert_eq!(
            (w.ms, w.source),
            (40_000, "anthropic-ratelimit-output-tokens-reset")
        );
    }

    #[test]
    fn openrouter_epoch_millisecond_reset() {
        let at = (NOW + 12_345).to_string();
        assert_eq!(ms(&[("X-RateLimit-Reset", &at)]), Some(12_345));
        assert_eq!(
            ms(&[("x-ratelimit-reset", &at), ("x-ratelimit-remaining", "3")]),
            None,
            "room left: not a wait"
        );
        // The same name as epoch seconds, or as plain delay-seconds (other providers).
        assert_eq!(
            ms(&[("x-ratelimit-reset", &(NOW / 1000 + 20).to_string())]),
            Some(20_000)
        );
        assert_eq!(ms(&[("x-ratelimit-reset", "15")]), Some(15_000));
    }

    #[test]
    fn gemini_retry_info_in_the_body() {
        let body = r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
                       {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#;
        let w = wait(&[], body).unwrap();
        assert_eq!((w.ms, w.source), (30_000, "body.retryDelay"));
        // Wrapped in an array (the OpenAI-compatible endpoint), fractional, or as an object.
        assert_eq!(wait(&[], &format!("[{body}]")).unwrap().ms, 30_000);
        let fraction = r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1.5s"}]}}"#;
        assert_eq!(wait(&[], fraction).unwrap().ms, 1_500);
        let object = r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":{"seconds":"2","nanos":500000000}}]}}"#;
        assert_eq!(wait(&[], object).unwrap().ms, 2_500);
        assert_eq!(ms(&[]), None);
        assert_eq!(wait(&[], "not json retryDelay").map(|w| w.ms), None);
    }

    #[test]
    fn the_longest_of_several_waits_wins() {
        let w = wait(
            &[
                ("retry-after", "2"),
                ("retry-after-ms", "2500"),
                ("x-ratelimit-reset-tokens", "1m30s"),
            ],
            "",
        )
        .unwrap();
        assert_eq!((w.ms, w.source), (90_000, "x-ratelimit-reset-tokens"));
    }

    #[test]
    fn every_wait_is_capped_and_says_so() {
        let w = wait(&[("retry-after", "86400000")], "").unwrap();
        assert_eq!(w.ms, HOUR);
        assert_eq!(w.asked_ms, 86_400_000_000);
        assert!(w.capped());
        assert!(!wait(&[("retry-after", "3600")], "").unwrap().capped());
    }

    #[test]
    fn no_value_overflows_or_panics() {
        for value in [
            "1e300",
            "99999999999999999999999999999",
            "1e309",
            "inf",
            "NaN",
            "-5",
            "-1e300",
            "garbage",
            "",
            "5x",
            "1m-3s",
            "9223372036854775807",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
        ] {
            for name in [
                "retry-after",
                "retry-after-ms",
                "x-ratelimit-reset-requests",
                "x-ratelimit-reset",
                "anthropic-ratelimit-requests-reset",
            ] {
                if let Some(w) = wait(&[(name, value)], "") {
                    assert!((1..=HOUR).contains(&w.ms), "{name}: {value} gave {w:?}");
                }
            }
            let body = format!(
                r#"{{"error":{{"details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{value}s"}}]}}}}"#
            );
            if let Some(w) = wait(&[], &body) {
                assert!((1..=HOUR).contains(&w.ms), "body {value}: {w:?}");
            }
        }
        assert_eq!(ms(&[("retry-after", "1e300")]), Some(HOUR));
        assert_eq!(ms(&[("retry-after", "-5")]), None);
        assert_eq!(ms(&[("retry-after", "garbage")]), None);
    }

    #[test]
    fn an_epoch_time_where_a_delay_is_expected_is_read_as_the_time_it_is() {
        // 20 s from now, as epoch seconds in a `retry-after` and epoch ms in `retry-after-ms`.
        assert_eq!(
            ms(&[("retry-after", &(NOW / 1000 + 20).to_string())]),
            Some(20_000)
        );
        assert_eq!(
            ms(&[("retry-after-ms", &(NOW + 20_000).to_string())]),
            Some(20_000)
        );
        // One in the past says nothing usable.
        assert_eq!(ms(&[("retry-after", "1000000000")]), None);
    }
}
