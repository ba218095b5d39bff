//! How individual fields are written in `config.yaml`: durations as `30s`, enums through their
//! `FromStr` (whose messages list the accepted values), RFC 3339 timestamps, named windows.
//!
//! Each module here is used with `#[serde(with = "…")]` (or `serialize_with`/`deserialize_with`)
//! and serialises back to the same form it reads, so `quotagate doctor` prints what a user writes.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

const DURATION_HINT: &str = "(use 500ms, 1s, 5m, 24h)";

/// Reads `500ms`, `1s`, `5m`, `24h` (anything humantime accepts); a bare number is refused because
/// its unit would be a guess.
struct DurationVisitor;

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration {DURATION_HINT}")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        humantime::parse_duration(text.trim())
            .map_err(|_| E::custom(format!("invalid duration `{text}` {DURATION_HINT}")))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "invalid duration `{n}`: give a unit {DURATION_HINT}"
        )))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        Err(E::custom(format!("invalid duration `{n}` {DURATION_HINT}")))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "invalid duration `{n}`: give a unit {DURATION_HINT}"
        )))
    }
}

/// A required [`Duration`], written `30s`.
pub(super) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// An optional [`Duration`]; the field is left out (or empty) when there is none.
pub(super) mod option_duration {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.collect_str(&humantime::format_duration(*d)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        deserializer.deserialize_any(DurationVisitor).map(Some)
    }
}

/// A type written as its `Display` and read through its `FromStr` (strategy, tokenizer, limit
/// kind): their own error messages already name the accepted values.
pub(super) mod from_str {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An optional RFC 3339 timestamp (`2026-12-31T23:59:59Z`), stored in UTC.
pub(super) mod option_rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(text.trim())
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid timestamp `{text}`: {e} (use RFC 3339, e.g. 2026-12-31T23:59:59Z)"
                ))
            })
    }
}

/// An optional window name for `ratelimit_headers`: `rpm`, `rph`, `rpd`, `tpm` or `tpd`.
pub(super) mod option_named_window {
    use serde::{Deserialize, Deserializer};

    use crate::domain::NamedLimit;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<NamedLimit>, D::Error> {
        let text = String::deserialize(deserializer)?;
        NamedLimit::ALL
            .into_iter()
            .filter(|named| named.per().is_some())
            .find(|named| named.as_str() == text)
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown window `{text}` (expected rpm, rph, rpd, tpm or tpd)"
                ))
            })
    }
}

/// `database.url` is printed redacted (`postgres://user:***@host/db`) rather than as `***`, so
/// `quotagate doctor` still shows which database is meant. A URL that [`redact_url`] leaves
/// unchanged although it holds a `user@` part (a password with an unescaped `/`, say) is printed
/// as `***`: better to hide a harmless URL than to show a password.
///
/// [`redact_url`]: crate::secrets::redact_url
pub(super) fn redacted_url<S: Serializer>(
    url: &crate::secrets::Secret,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let url = url.expose();
    let redacted = crate::secrets::redact_url(url);
    if redacted == url && url.contains('@') {
        serializer.serialize_str("***")
    } else {
        serializer.serialize_str(&redacted)
    }
}
