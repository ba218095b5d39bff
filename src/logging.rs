//! Structured logs: the `log` crate's key-values, printed as one JSON object per line on stderr
//! (`logging.format: json`) or as readable text. `RUST_LOG`, when set, replaces `logging.level`.
//!
//! Every line carries `ts` (RFC 3339, UTC), `level`, `target` and `msg`, plus the call's
//! key-values (`request_id`, `provider`, `account_id`, `event`, …). Secrets never reach a log line:
//! they are [`crate::secrets::Secret`] values, which print as `***`.
//!
//! # Off the request path
//! A line is formatted on the thread that logs it, then handed to one writer thread that owns
//! stderr. The HTTP workers, whose access lines are one per request, gather their lines in a
//! buffer handed over when it is full or [`FLUSH_EVERY`] after its first line (see
//! [`batch_this_thread`]); other threads hand each line over at once. The hand-over never waits: the
//! writer's queue is bounded ([`QUEUE`] batches), and what does not fit is dropped and counted —
//! a slow log consumer never stalls a request. The writer reports drops in a line of its own.
//! [`flush`] writes everything out (at the end of `serve`).

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use log::kv::{Error as KvError, Key, Value, VisitSource};

use crate::config::LogFormat;

/// How long a worker's lines may wait before they are handed to the writer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A worker's buffer is handed over when it holds this many bytes.
const BATCH_BYTES: usize = 32 * 1024;
/// Batches the writer's queue holds; beyond it lines are dropped (and counted).
const QUEUE: usize = 256;

/// What goes to the writer thread.
enum Job {
    Lines(Vec<u8>),
    /// Answer once everything queued before is written.
    Flush(SyncSender<()>),
}

struct Logger {
    filter: env_filter::Filter,
    format: LogFormat,
    queue: SyncSender<Job>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();
/// Lines dropped because the writer's queue was full (reported by the writer, then reset).
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines dropped since the process started (for the metric).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Lines dropped since start because the log writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

/// Installs the global logger. Calling it twice keeps the first logger (tests start many apps).
pub fn init(level: &str, format: LogFormat) {
    let mut builder = env_filter::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(filters) if !filters.trim().is_empty() => builder.parse(&filters),
        _ => builder.parse(level),
    };
    let filter = builder.build();
    let max_level = filter.filter();
    let (queue, jobs) = mpsc::sync_channel(QUEUE);
    if LOGGER
        .set(Logger {
            filter,
            format,
            queue,
        })
        .is_err()
    {
        return;
    }
    let started = std::thread::Builder::new()
        .name("quotagate-log".into())
        .spawn(move || write_out(jobs));
    if started.is_ok() && log::set_logger(LOGGER.get().expect("set above")).is_ok() {
        log::set_max_level(max_level);
    }
}

/// The writer thread: writes each batch with one system call.
fn write_out(jobs: Receiver<Job>) {
    let stderr = io::stderr();
    for job in jobs {
        let mut out = stderr.lock();
        match job {
            Job::Lines(lines) => {
                let dropped = DROPPED.swap(0, Ordering::AcqRel);
                if dropped > 0 {
                    let _ = writeln!(
                        out,
                        "{{\"ts\":\"{}\",\"level\":\"warn\",\"target\":\"quotagate::logging\",\"msg\":\"{dropped} log lines dropped: the log output could not keep up\",\"event\":\"log_dropped\",\"lines\":{dropped}}}",
                        timestamp()
                    );
                }
                let _ = out.write_all(&lines);
            }
            Job::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

/// This thread's buffer of formatted lines (only on threads that asked for one).
struct Pending {
    lines: Vec<u8>,
    count: u64,
    /// A hand-over is scheduled.
    timer: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        // The thread ends: its lines go out with it.
        hand_over(std::mem::take(&mut self.lines), self.count);
    }
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

fn hand_over(lines: Vec<u8>, count: u64) {
    if lines.is_empty() {
        return;
    }
    let Some(logger) = LOGGER.get() else {
        return;
    };
    match logger.queue.try_send(Job::Lines(lines)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(count, Ordering::AcqRel);
            DROPPED_TOTAL.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// Makes this thread gather its lines and hand them over in batches (an HTTP worker: one access
/// line per request). Needs an actix runtime on the thread (the hand-over timer is a local task);
/// elsewhere, and when no logger is installed, it does nothing.
pub fn batch_this_thread() {
    if LOGGER.get().is_none() || actix_rt::Arbiter::try_current().is_none() {
        return;
    }
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_none() {
            *p = Some(Pending {
                lines: Vec::with_capacity(BATCH_BYTES),
                count: 0,
                timer: false,
            });
        }
    });
}

/// Hands this thread's lines to the writer now.
pub fn flush_thread() {
    let taken = PENDING.with(|p| {
        p.borrow_mut()
            .as_mut()
            .map(|p| (std::mem::take(&mut p.lines), std::mem::take(&mut p.count)))
    });
    if let Some((lines, count)) = taken {
        hand_over(lines, count);
    }
}

/// Writes out everything logged so far by this thread and handed over by others, waiting (at
/// most `limit`) for the writer.
pub fn flush(limit: Duration) {
    flush_thread();
    let Some(logger) = LOGGER.get() else {
        return;
    };
    let (done, wait) = mpsc::sync_channel(1);
    if logger.queue.send(Job::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(limit);
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let mut line = Vec::with_capacity(256);
        let written = match self.format {
            LogFormat::Json => write_json(&mut line, record),
            LogFormat::Text => write_text(&mut line, record),
        };
        if written.is_err() {
            return;
        }
        let batched = PENDING.with(|p| {
            let mut p = p.borrow_mut();
            let Some(pending) = p.as_mut() else {
                return Some(line);
            };
            pending.lines.extend_from_slice(&line);
            pending.count += 1;
            if pending.lines.len() >= BATCH_BYTES {
                let lines = std::mem::replace(&mut pending.lines, Vec::with_capacity(BATCH_BYTES));
                hand_over(lines, std::mem::take(&mut pending.count));
            } else if !pending.timer {
                pending.timer = true;
                actix_rt::spawn(async {
                    actix_rt::time::sleep(FLUSH_EVERY).await;
                    PENDING.with(|p| {
                        if let Some(p) = p.borrow_mut().as_mut() {
                            p.timer = false;
                        }
                    });
                    flush_thread();
                });
            }
            None
        });
        if let Some(line) = batched {
            hand_over(line, 1);
        }
    }

    fn flush(&self) {
        flush_thread();
    }
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
