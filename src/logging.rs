//! Structured logs: the `log` crate's key-values, printed as one JSON object per line on stderr
//! (`logging.format: json`) or as readable text. `RUST_LOG`, when set, replaces `logging.level`.
//!
//! Every line carries `ts` (RFC 3339, UTC), `level`, `target` and `msg`, plus the call's
//! key-values (`request_id`, `provider`, `account_id`, `event`, …). Secrets never reach a log line:
//! they are [`crate::secrets::Secret`] values, which print as `***`.

use std::io::{self, Write};

use log::kv::{Error as KvError, Key, Value, VisitSource};

use crate::config::LogFormat;

/// Installs the global logger. Calling it twice keeps the first logger (tests start many apps).
pub fn init(level: &str, format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(filters) if !filters.trim().is_empty() => builder.parse_filters(&filters),
        _ => builder.parse_filters(level),
    };
    builder.target(env_logger::Target::Stderr);
    match format {
        LogFormat::Json => builder.format(write_json),
        LogFormat::Text => builder.format(write_text),
    };
    let _ = builder.try_init();
}

/// One record as a JSON line: `ts`, `level`, `target`, `msg`, then the key-values (typed), in
/// that order. Written straight to the output (no intermediate JSON tree): one line per request
/// is on the hot path.
pub fn write_json(out: &mut impl Write, record: &log::Record<'_>) -> io::Result<()> {
    use serde::ser::{SerializeMap as _, Serializer as _};
    let mut line = Vec::with_capacity(256);
    {
        let mut serializer = serde_json::Serializer::new(&mut line);
        let mut map = serializer.serialize_map(None).map_err(io::Error::other)?;
        map.serialize_entry("ts", &timestamp())
            .and_then(|()| map.serialize_entry("level", &Lowercase(record.level().as_str())))
            .and_then(|()| map.serialize_entry("target", record.target()))
            .and_then(|()| map.serialize_entry("msg", &Displayed(record.args())))
            .map_err(io::Error::other)?;
        let mut fields = JsonFields(&mut map, Ok(()));
        // A key-value that cannot be visited is dropped rather than losing the whole line.
        let _ = record.key_values().visit(&mut fields);
        fields.1.map_err(io::Error::other)?;
        map.end().map_err(io::Error::other)?;
    }
    line.push(b'\n');
    out.write_all(&line)
}

/// Serialises a `Display` value as a JSON string without an intermediate `String`.
struct Displayed<'a, T: std::fmt::Display>(&'a T);

impl<T: std::fmt::Display> serde::Serialize for Displayed<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self.0)
    }
}

/// A level name in lower case (`info`), as the log lines spell it.
struct Lowercase<'a>(&'a str);

impl serde::Serialize for Lowercase<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_ascii_lowercase())
    }
}

/// One record as readable text: `ts LEVEL target: msg key=value …`.
pub fn write_text(out: &mut impl Write, record: &log::Record<'_>) -> io::Result<()> {
    write!(
        out,
        "{} {:<5} {}: {}",
        timestamp(),
        record.level(),
        record.target(),
        record.args()
    )?;
    let mut fields = TextFields(out, Ok(()));
    let _ = record.key_values().visit(&mut fields);
    fields.1?;
    writeln!(out)
}

fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

struct JsonFields<'a, M>(&'a mut M, Result<(), serde_json::Error>);

impl<'kvs, M: serde::ser::SerializeMap<Error = serde_json::Error>> VisitSource<'kvs>
    for JsonFields<'_, M>
{
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), KvError> {
        if self.1.is_ok() {
            self.1 = self.0.serialize_entry(key.as_str(), &value);
        }
        Ok(())
    }
}

struct TextFields<'a, W>(&'a mut W, io::Result<()>);

impl<'kvs, W: Write> VisitSource<'kvs> for TextFields<'_, W> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), KvError> {
        if self.1.is_ok() {
            self.1 = write!(self.0, " {key}={value}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(f: fn(&mut Vec<u8>, &log::Record<'_>) -> io::Result<()>) -> String {
        let kvs: [(&str, Value<'_>); 3] = [
            ("request_id", Value::from("req-1")),
            ("status", Value::from(429u16)),
            ("latency_ms", Value::from(12.5f64)),
        ];
        let record = log::Record::builder()
            .args(format_args!("request done"))
            .level(log::Level::Warn)
            .target("quotagate::http")
            .key_values(&kvs)
            .build();
        let mut out = Vec::new();
        f(&mut out, &record).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_json_line_has_the_standard_keys_and_typed_fields() {
        let line = render(write_json);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["level"], "warn");
        assert_eq!(json["target"], "quotagate::http");
        assert_eq!(json["msg"], "request done");
        assert_eq!(json["request_id"], "req-1");
        assert_eq!(json["status"], 429);
        assert_eq!(json["latency_ms"], 12.5);
        let ts = json["ts"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn a_text_line_reads_naturally() {
        let line = render(write_text);
        assert!(
            line.contains("WARN  quotagate::http: request done request_id=req-1 status=429"),
            "{line}"
        );
    }
}
