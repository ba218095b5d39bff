//! Talking to providers: the pooled HTTP client (awc, with rustls and bundled roots so HTTPS works
//! on a bare machine) and reading what the upstream's headers say about its limits.

use std::time::Duration;

use actix_web::http::header::HeaderMap;

use crate::domain::account::RateHeaders;
use crate::domain::time::{duration_ms, Millis};
use crate::domain::upstream_timing;

/// The `upstream` section, as the proxy uses it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub retries: u32,
    /// The longest wait an upstream can impose on an account (`upstream.max_cooldown`).
    pub max_cooldown: Duration,
    /// How long an upstream 403 keeps an account away from that model
    /// (`upstream.forbidden_cooldown`).
    pub forbidden_cooldown: Duration,
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

/// The wait a 429 answer asks for, in any of the forms of [`upstream_timing`], capped at `cap`
/// (`upstream.max_cooldown`); `None` when it names no usable wait (the account's short default
/// then applies).
pub fn wait_after_429(
    headers: &HeaderMap,
    body: &[u8],
    now: Millis,
    cap: Duration,
) -> Option<upstream_timing::Wait> {
    upstream_timing::wait_after_429(
        |name| headers.get(name)?.to_str().ok(),
        body,
        now,
        duration_ms(cap),
    )
}

/// `x-ratelimit-remaining-{requests,tokens}` and `x-ratelimit-reset-{requests,tokens}`. A reset
/// is capped at `cap` (`upstream.max_cooldown`): the ceiling it sets never loosens before it
/// lapses, so an absurd reset must not hold an account for days.
pub fn rate_headers(headers: &HeaderMap, now: Millis, cap: Duration) -> RateHeaders {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    let reset = |name: &str| {
        upstream_timing::reset_delay(headers.get(name)?.to_str().ok()?, now)
            .filter(|ms| *ms > 0)
            .map(|ms| ms.min(duration_ms(cap)))
    };
    RateHeaders {
        requests_remaining: number("x-ratelimit-remaining-requests"),
        requests_reset_ms: reset("x-ratelimit-reset-requests"),
        tokens_remaining: number("x-ratelimit-remaining-tokens"),
        tokens_reset_ms: reset("x-ratelimit-reset-tokens"),
    }
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

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_429_wait_is_read_from_the_header_map_whatever_the_case() {
        let h = headers(&[("Retry-After-Ms", "1500")]);
        assert_eq!(wait_after_429(&h, b"", 0, HOUR).map(|w| w.ms), Some(1_500));
        assert_eq!(wait_after_429(&headers(&[]), b"", 0, HOUR), None);
    }

    #[test]
    fn rate_limit_headers_are_read_and_their_resets_capped() {
        let h = rate_headers(
            &headers(&[
                ("x-ratelimit-remaining-requests", "29"),
                ("x-ratelimit-reset-requests", "2s"),
                ("x-ratelimit-remaining-tokens", "5900"),
                ("x-ratelimit-reset-tokens", "1000h"),
            ]),
            0,
            HOUR,
        );
        assert_eq!(h.requests_remaining, Some(29));
        assert_eq!(h.requests_reset_ms, Some(2_000));
        assert_eq!(h.tokens_remaining, Some(5_900));
        assert_eq!(h.tokens_reset_ms, Some(3_600_000));
        let garbage = rate_headers(
            &headers(&[
                ("x-ratelimit-reset-requests", "-1s"),
                ("x-ratelimit-reset-tokens", "1e300"),
            ]),
            0,
            HOUR,
        );
        assert_eq!(garbage.requests_reset_ms, None);
        assert_eq!(garbage.tokens_reset_ms, Some(3_600_000));
    }
}
