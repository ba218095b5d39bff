//! Talking to providers: the pooled HTTP client (awc, with rustls and bundled roots so HTTPS works
//! on a bare machine) and reading what the upstream's headers say about its limits.

use std::time::Duration;

use actix_web::http::header::HeaderMap;

use crate::domain::account::RateHeaders;
use crate::domain::time::Millis;

/// The `upstream` section, as the proxy uses it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub retries: u32,
}

/// A pooled client for one worker thread (awc clients are per thread). Redirects are not
/// followed: an API answer is returned as it is.
pub fn client(settings: &UpstreamSettings) -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().timeout(settings.connect_timeout))
        .timeout(settings.timeout)
        .disable_redirects()
        .finish()
}

/// The upstream's `retry-after`: seconds (possibly fractional) or an HTTP date.
pub fn retry_after_ms(headers: &HeaderMap, now: Millis) -> Option<Millis> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| (seconds * 1000.0).ceil() as Millis);
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.timestamp_millis() - now).max(0))
}

/// `x-ratelimit-remaining-{requests,tokens}` and `x-ratelimit-reset-{requests,tokens}`.
pub fn rate_headers(headers: &HeaderMap) -> RateHeaders {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    let reset = |name: &str| parse_reset(headers.get(name)?.to_str().ok()?);
    RateHeaders {
        requests_remaining: number("x-ratelimit-remaining-requests"),
        requests_reset_ms: reset("x-ratelimit-reset-requests"),
        tokens_remaining: number("x-ratelimit-remaining-tokens"),
        tokens_reset_ms: reset("x-ratelimit-reset-tokens"),
    }
}

/// A reset delay as providers write it: `1s`, `6m0s`, `2m59.56s`, `20ms`, `1h2m`, or bare seconds.
pub fn parse_reset(text: &str) -> Option<Millis> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| (seconds * 1000.0).ceil() as Millis);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Some(total.ceil() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn reset_delays_parse_as_providers_write_them() {
        assert_eq!(parse_reset("1s"), Some(1_000));
        assert_eq!(parse_reset("6m0s"), Some(360_000));
        assert_eq!(parse_reset("2m59.56s"), Some(179_560));
        assert_eq!(parse_reset("20ms"), Some(20));
        assert_eq!(parse_reset("1h2m"), Some(3_720_000));
        assert_eq!(parse_reset("0.5"), Some(500));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("5x"), None);
    }

    #[test]
    fn retry_after_reads_seconds_or_a_date() {
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after", "2")]), 0),
            Some(2_000)
        );
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after", "0.25")]), 0),
            Some(250)
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
            .unwrap()
            .timestamp_millis();
        let date = headers(&[("retry-after", "Sat, 28 Nov 2026 12:00:30 GMT")]);
        assert_eq!(retry_after_ms(&date, now), Some(30_000));
        assert_eq!(retry_after_ms(&headers(&[]), 0), None);
    }

    #[test]
    fn rate_limit_headers_are_read() {
        let h = rate_headers(&headers(&[
            ("x-ratelimit-remaining-requests", "29"),
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-remaining-tokens", "5900"),
        ]));
        assert_eq!(h.requests_remaining, Some(29));
        assert_eq!(h.requests_reset_ms, Some(2_000));
        assert_eq!(h.tokens_remaining, Some(5_900));
        assert_eq!(h.tokens_reset_ms, None);
    }
}
