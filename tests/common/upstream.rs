//! A mock OpenAI upstream for the end-to-end tests: real HTTP/1.1 on `127.0.0.1:<free port>`,
//! served from its own thread with its own actix `System`, so it is independent of the test's
//! runtime (a test may block, pause or stop its own runtime without stopping the mock).
//!
//! It speaks just enough HTTP/1.1 by hand (keep-alive, `Content-Length` and chunked request
//! bodies, chunked SSE answers) to be able to misbehave on purpose: hang, drop the connection
//! before answering or in the middle of a stream.
//!
//! Routes (any prefix before them is ignored, so a provider `base_url` of `{url}/v1` works):
//! `POST …/chat/completions` (plain, or SSE with `stream: true`; a final `choices: []` chunk with
//! `usage` when `stream_options.include_usage` is true), `POST …/embeddings`, `GET …/models`.
//!
//! What it does is chosen per API key (the `Authorization: Bearer <key>` the gateway sends) or
//! for every key ([`Behavior`], usage numbers, extra headers, latency, stream pacing), and what
//! it received is counted per key ([`KeyStats`]). [`StrictLimits`] make it enforce per-key
//! sliding-window limits by its own clock, answering 429 to any excess and counting those 429s.
//!
//! Default usage (so that the gateway's default estimate, `chars:3` + 4 per message + 3 +
//! the completion bound, is always an upper bound): `prompt_tokens` = content bytes / 4 rounded
//! up + 1, `completion_tokens` = min(the request's `max_completion_tokens`/`max_tokens`, 16) × `n`.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Completion tokens the mock "generates" when nothing else is configured (capped by the
/// request's own bound).
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// The model `GET /v1/models` lists.
pub const MOCK_MODEL: &str = "mock-model";

/// What the mock does with a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Answers normally (200 with usage; SSE for `stream: true`).
    #[default]
    Normal,
    /// 429 with `retry-after: N` (seconds) and an OpenAI error body.
    RateLimited { retry_after: u64 },
    /// This status with an OpenAI error body (401, 403, 500, 503, 400, …).
    Status(u16),
    /// Reads the request and never answers (the connection is held until the client closes it
    /// or the mock stops).
    Hang,
    /// Reads the request, then closes the connection without a byte of answer.
    Drop,
    /// Sends the head and `after` SSE chunks (for a non-streaming request: the head and half the
    /// body), then closes the connection.
    DropMidStream { after: usize },
    /// Answers exactly this: `status`, these headers (plus the key's extra headers) and this
    /// body, as `application/json` unless `headers` names a `content-type`.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A 200 `text/event-stream` answer of exactly these events (each written as its own chunk
    /// with `\n\n` after it, 5 ms apart), then `end`.
    Sse { events: Vec<String>, end: SseEnd },
}

/// How a scripted stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseEnd {
    /// The terminating chunk: a clean end.
    Clean,
    /// The connection closes without the terminating chunk.
    Close,
    /// Nothing more, and the connection stays open.
    Silent,
}

/// Per-key sliding-window limits the mock enforces by its own clock (strict mode).
///
/// A request is counted in a window from its arrival until `W` after its answer was written (it
/// is in flight in between, and counted all along): the latest moment an upstream could count
/// it, so the strictest reading. Tokens are the usage the mock reports for it (known at arrival).
/// Any excess is answered 429 (`retry-after: 1`) and counted in [`KeyStats::rejected_429`];
/// refused requests count in no window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrictLimits {
    /// `(limit, W)`: at most `limit` requests per sliding `W`.
    pub requests: Vec<(u64, Duration)>,
    /// `(limit, W)`: at most `limit` tokens (reported usage) per sliding `W`.
    pub tokens: Vec<(u64, Duration)>,
    /// At most this many requests in flight at once.
    pub concurrent: Option<u64>,
}

/// What one key (or all keys together) received.
#[derive(Debug, Clone, Default)]
pub struct KeyStats {
    /// Requests received on any route, whatever the outcome.
    pub requests: u64,
    /// Answers completed with a 2xx and usage, counted just before their last bytes are written
    /// (so a client that has read one sees it here; a stream cut short is not counted).
    pub answered: u64,
    /// Reported usage of the completed answers.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Statuses sent (a dropped or hanging request has none).
    pub statuses: BTreeMap<u16, u64>,
    /// 429s sent because a [`StrictLimits`] limit would have been exceeded.
    pub rejected_429: u64,
    /// Which strict limit each of those 429s was for (`requests`, `tokens`, `concurrent`).
    pub rejected_by: BTreeMap<String, u64>,
    /// Highest number of this key's requests in flight at once.
    pub max_concurrency: u64,
    /// The JSON bodies received, in order.
    pub bodies: Vec<Value>,
}

impl KeyStats {
    /// Tokens of the completed answers (prompt + completion).
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn add(&mut self, other: &KeyStats) {
        self.requests += other.requests;
        self.answered += other.answered;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        for (s, n) in &other.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        self.rejected_429 += other.rejected_429;
        for (s, n) in &other.rejected_by {
            *self.rejected_by.entry(s.clone()).or_default() += n;
        }
        self.max_concurrency = self.max_concurrency.max(other.max_concurrency);
        self.bodies.extend(other.bodies.iter().cloned());
    }
}

/// One received request, in arrival order.
#[derive(Debug, Clone)]
pub struct Received {
    /// The mock's id of this request (also in the answer's `id`: `chatcmpl-mock-<id>`).
    pub id: u64,
    /// The bearer key (empty when none was sent).
    pub key: String,
    pub method: String,
    pub path: String,
    pub at: Instant,
    /// The status answered, once known (`None`: dropped, hanging or still in flight).
    pub status: Option<u16>,
    /// Arrival to the end of the exchange (the answer's last byte written, or the connection
    /// given up), once it has ended.
    pub latency: Option<Duration>,
}

/// What the mock does for a key: every field left `None` falls back to the global plan.
#[derive(Debug, Clone, Default)]
struct KeyPlan {
    behavior: Option<Behavior>,
    /// `behavior` applies to this many more requests, then the key answers normally.
    times: Option<u64>,
    usage: Option<(u64, u64)>,
    headers: Option<Vec<(String, String)>>,
    latency: Option<Duration>,
    strict: Option<StrictLimits>,
}

#[derive(Debug, Clone)]
struct StreamPacing {
    chunks: usize,
    delay: Duration,
}

/// Strict-mode bookkeeping of one key.
#[derive(Debug, Default)]
struct StrictState {
    records: Vec<StrictRecord>,
}

#[derive(Debug)]
struct StrictRecord {
    /// The request's id.
    id: u64,
    /// When its answer ended; `None` while in flight.
    done: Option<Instant>,
    tokens: u64,
}

#[derive(Debug, Default)]
struct State {
    global: KeyPlan,
    keys: HashMap<String, KeyPlan>,
    pacing: Option<StreamPacing>,
    stats: HashMap<String, KeyStats>,
    in_flight: HashMap<String, u64>,
    strict: HashMap<String, StrictState>,
    received: Vec<Received>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the mock's counts from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running mock; stopped (its thread joined, every connection closed) on drop.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// A mock answering every request normally.
    pub fn start() -> MockUpstream {
        let listener = StdListener::bind("127.0.0.1:0").expect("mock: bind");
        listener.set_nonblocking(true).expect("mock: nonblocking");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pacing: Some(StreamPacing {
                    chunks: 3,
                    delay: Duration::from_millis(5),
                }),
                ..State::default()
            }),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mock-upstream".into())
            .spawn(move || {
                let system = actix_rt::System::new();
                system.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("mock: listener");
                    tokio::select! {
                        _ = accept_loop(listener, for_thread) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runner drops every connection task (and so every socket).
            })
            .expect("mock: thread");
        MockUpstream {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1`, what a provider's `base_url` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `key` behaves like this from now on.
    pub fn behave(&self, key: &str, behavior: Behavior) {
        let mut s = self.shared.lock();
        let plan = s.keys.entry(key.to_string()).or_default();
        plan.behavior = Some(behavior);
        plan.times = None;
    }

    /// `key` behaves like this for its next `times` requests, then answers normally.
    pub fn behave_times(&self, key: &str, behavior: Behavior, times: u64) {
        let mut s = self.shared.lock();
        let plan = s.keys.entry(key.to_string()).or_default();
        plan.behavior = Some(behavior);
        plan.times = Some(times);
    }

    /// Every key without a behavior of its own behaves like this.
    pub fn behave_all(&self, behavior: Behavior) {
        self.shared.lock().global.behavior = Some(behavior);
    }

    /// Forgets every per-key setting and the global behavior, usage, headers and latency
    /// (counts are kept: see [`MockUpstream::reset_counts`]).
    pub fn reset_behavior(&self) {
        let mut s = self.shared.lock();
        s.global = KeyPlan::default();
        s.keys.clear();
    }

    /// Answers of `key` (`None`: every key) report this usage.
    pub fn set_usage(&self, key: Option<&str>, prompt_tokens: u64, completion_tokens: u64) {
        self.with_plan(key, |p| p.usage = Some((prompt_tokens, completion_tokens)));
    }

    /// Extra headers on the answers of `key` (`None`: every key), e.g.
    /// `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests`.
    pub fn set_headers(&self, key: Option<&str>, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self.with_plan(key, |p| p.headers = Some(headers));
    }

    /// Time between reading a request and the first byte of its answer.
    pub fn set_latency(&self, key: Option<&str>, latency: Duration) {
        self.with_plan(key, |p| p.latency = Some(latency));
    }

    /// Streamed answers have `chunks` content chunks, `delay` apart (defaults: 3, 5 ms).
    pub fn set_stream(&self, chunks: usize, delay: Duration) {
        self.shared.lock().pacing = Some(StreamPacing { chunks, delay });
    }

    /// Strict per-key limits for `key` (`None`: each key separately, with these limits).
    pub fn set_strict(&self, key: Option<&str>, limits: StrictLimits) {
        self.with_plan(key, |p| p.strict = Some(limits));
    }

    fn with_plan(&self, key: Option<&str>, f: impl FnOnce(&mut KeyPlan)) {
        let mut s = self.shared.lock();
        match key {
            Some(k) => f(s.keys.entry(k.to_string()).or_default()),
            None => f(&mut s.global),
        }
    }

    /// What `key` received (empty stats for a key never seen).
    pub fn stats(&self, key: &str) -> KeyStats {
        self.shared
            .lock()
            .stats
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Every key's stats.
    pub fn all_stats(&self) -> HashMap<String, KeyStats> {
        self.shared.lock().stats.clone()
    }

    /// All keys added up (`max_concurrency` is the highest of any single key).
    pub fn total(&self) -> KeyStats {
        let s = self.shared.lock();
        let mut total = KeyStats::default();
        for stats in s.stats.values() {
            total.add(stats);
        }
        total
    }

    /// Every request received, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// The keys of the requests received, in arrival order.
    pub fn keys_in_order(&self) -> Vec<String> {
        self.shared
            .lock()
            .received
            .iter()
            .map(|r| r.key.clone())
            .collect()
    }

    /// Requests of `key` in flight right now.
    pub fn in_flight(&self, key: &str) -> u64 {
        self.shared.lock().in_flight.get(key).copied().unwrap_or(0)
    }

    /// Forgets every count (and the strict windows' history).
    pub fn reset_counts(&self) {
        let mut s = self.shared.lock();
        s.stats.clear();
        s.received.clear();
        s.strict.clear();
    }

    /// Waits until `done` holds for the stats of `key` (up to `timeout`); returns them.
    pub fn wait_for(
        &self,
        key: &str,
        timeout: Duration,
        done: impl Fn(&KeyStats) -> bool,
    ) -> KeyStats {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats(key);
            if done(&stats) || Instant::now() > deadline {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The server

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off a little rather than spin.
            actix_rt::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        actix_rt::spawn(async move {
            let _ = serve_connection(stream, shared).await;
        });
    }
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn bearer(&self) -> String {
        self.header("authorization")
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string())
            .unwrap_or_default()
    }
}

/// Reads one request from `stream` (`buf` keeps what was read past it). `None` at a clean EOF.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 1 << 20 {
            return Err(std::io::Error::other("head too large"));
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let version = first.next().unwrap_or("HTTP/1.1").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let keep_alive = match get("connection") {
        Some(c) if c.contains("close") => false,
        Some(c) if c.contains("keep-alive") => true,
        _ => version == "HTTP/1.1",
    };
    let body = if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        read_chunked(stream, buf).await?
    } else {
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let mut chunk = [0u8; 16384];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len).collect()
    };
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
        keep_alive,
    }))
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            fill(stream, buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected), then the final CRLF.
            loop {
                if let Some(i) = find(buf, b"\r\n") {
                    let empty = i == 0;
                    buf.drain(..i + 2);
                    if empty {
                        return Ok(body);
                    }
                } else {
                    fill(stream, buf).await?;
                }
            }
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    while let Some(request) = read_request(&mut stream, &mut buf).await? {
        let keep_alive = request.keep_alive;
        if !handle(&mut stream, request, &shared).await? || !keep_alive {
            break;
        }
    }
    Ok(())
}

/// Everything the handler needs, decided under the lock at arrival.
struct Decision {
    key: String,
    behavior: Behavior,
    usage: (u64, u64),
    headers: Vec<(String, String)>,
    latency: Duration,
    pacing: StreamPacing,
    /// 429 because of this strict limit.
    strict_refusal: Option<&'static str>,
    /// This request holds a strict record (to close when it ends).
    strict: bool,
    id: u64,
}

/// Keeps the in-flight count and the strict record right whatever way the handler ends.
struct InFlight<'a> {
    shared: &'a Shared,
    key: String,
    id: u64,
    strict: bool,
    arrived: Instant,
}

impl InFlight<'_> {
    /// The answer with `status` is complete and about to be written: counted now, so that a
    /// client that has read it also sees it in the stats. (The in-flight count and the strict
    /// windows' record end only once it was written: see `Drop`.)
    fn answered(&self, status: u16, usage: Option<(u64, u64)>) {
        let mut s = self.shared.lock();
        let stats = s.stats.entry(self.key.clone()).or_default();
        *stats.statuses.entry(status).or_default() += 1;
        if let Some((p, c)) = usage {
            stats.answered += 1;
            stats.prompt_tokens += p;
            stats.completion_tokens += c;
        }
        if let Some(r) = s.received.iter_mut().rev().find(|r| r.id == self.id) {
            r.status = Some(status);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let latency = self.arrived.elapsed();
        let mut s = self.shared.lock();
        if let Some(r) = s.received.iter_mut().rev().find(|r| r.id == self.id) {
            r.latency = Some(latency);
        }
        if let Some(n) = s.in_flight.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
        if self.strict {
            let id = self.id;
            if let Some(record) = s
                .strict
                .get_mut(&self.key)
                .and_then(|st| st.records.iter_mut().rev().find(|r| r.id == id))
            {
                record.done = Some(Instant::now());
            }
        }
    }
}

fn decide(shared: &Shared, request: &Request, body: Option<&Value>) -> Decision {
    let key = request.bearer();
    let mut s = shared.lock();
    let now = Instant::now();
    s.next_id += 1;
    let id = s.next_id;
    let global = s.global.clone();
    let plan = s.keys.get(&key).cloned().unwrap_or_default();
    let mut behavior = plan
        .behavior
        .clone()
        .or(global.behavior.clone())
        .unwrap_or_default();
    if let (Some(_), Some(times)) = (&plan.behavior, plan.times) {
        let entry = s.keys.get_mut(&key).expect("the plan was just read");
        if times <= 1 {
            entry.behavior = None;
            entry.times = None;
        } else {
            entry.times = Some(times - 1);
        }
        if times == 0 {
            behavior = Behavior::Normal;
        }
    }
    let usage = plan
        .usage
        .or(global.usage)
        .unwrap_or_else(|| default_usage(&request.path, body));
    let headers = plan.headers.or(global.headers).unwrap_or_default();
    let latency = plan.latency.or(global.latency).unwrap_or_default();
    let strict = plan.strict.or(global.strict);
    let pacing = s.pacing.clone().unwrap_or(StreamPacing {
        chunks: 3,
        delay: Duration::ZERO,
    });

    s.received.push(Received {
        id,
        key: key.clone(),
        method: request.method.clone(),
        path: request.path.clone(),
        at: now,
        status: None,
        latency: None,
    });
    let in_flight = s.in_flight.get(&key).copied().unwrap_or(0);
    let stats = s.stats.entry(key.clone()).or_default();
    stats.requests += 1;
    if let Some(body) = body {
        stats.bodies.push(body.clone());
    }

    let mut strict_refusal = None;
    let mut strict_held = false;
    if let Some(limits) = strict.filter(|_| request.method == "POST") {
        let state = s.strict.entry(key.clone()).or_default();
        let longest = limits
            .requests
            .iter()
            .chain(&limits.tokens)
            .map(|(_, w)| *w)
            .max()
            .unwrap_or_default();
        // A finished record older than the longest window can no longer count.
        if let Some(cutoff) = now.checked_sub(longest) {
            state
                .records
                .retain(|r| r.done.is_none_or(|done| done > cutoff));
        }
        let counted = |w: Duration| {
            let cutoff = now.checked_sub(w);
            state
                .records
                .iter()
                .filter(move |r| match (r.done, cutoff) {
                    (Some(done), Some(cutoff)) => done > cutoff,
                    _ => true,
                })
        };
        let tokens = usage.0 + usage.1;
        if limits.concurrent.is_some_and(|c| in_flight + 1 > c) {
            strict_refusal = Some("concurrent");
        } else if limits
            .requests
            .iter()
            .any(|(limit, w)| counted(*w).count() as u64 + 1 > *limit)
        {
            strict_refusal = Some("requests");
        } else if limits
            .tokens
            .iter()
            .any(|(limit, w)| counted(*w).map(|r| r.tokens).sum::<u64>() + tokens > *limit)
        {
            strict_refusal = Some("tokens");
        } else {
            state.records.push(StrictRecord {
                id,
                done: None,
                tokens,
            });
            strict_held = true;
        }
    }
    if strict_refusal.is_none() {
        let n = s.in_flight.entry(key.clone()).or_default();
        *n += 1;
        let now_in_flight = *n;
        let stats = s.stats.get_mut(&key).unwrap();
        stats.max_concurrency = stats.max_concurrency.max(now_in_flight);
    }
    Decision {
        key,
        behavior,
        usage,
        headers,
        latency,
        pacing,
        strict_refusal,
        strict: strict_held,
        id,
    }
}

fn default_usage(path: &str, body: Option<&Value>) -> (u64, u64) {
    let Some(body) = body else { return (1, 0) };
    if path.ends_with("/embeddings") {
        let bytes: usize = match &body["input"] {
            Value::String(s) => s.len(),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map_or(i.to_string().len(), str::len))
                .sum(),
            other => other.to_string().len(),
        };
        return ((bytes as u64).div_ceil(4) + 1, 0);
    }
    let mut bytes = 0usize;
    if let Some(messages) = body["messages"].as_array() {
        for m in messages {
            match &m["content"] {
                Value::String(s) => bytes += s.len(),
                Value::Array(parts) => {
                    for p in parts {
                        bytes += p["text"].as_str().map_or(0, str::len);
                    }
                }
                _ => {}
            }
        }
    }
    let bound = body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_COMPLETION_TOKENS);
    let n = body["n"].as_u64().unwrap_or(1).max(1);
    (
        (bytes as u64).div_ceil(4) + 1,
        bound.min(DEFAULT_COMPLETION_TOKENS) * n,
    )
}

/// Handles one request; `Ok(false)` when the connection must be closed.
async fn handle(
    stream: &mut TcpStream,
    request: Request,
    shared: &Shared,
) -> std::io::Result<bool> {
    let body: Option<Value> = serde_json::from_slice(&request.body).ok();
    let d = decide(shared, &request, body.as_ref());
    let route = route_of(&request.method, &request.path);

    if let Some(limit) = d.strict_refusal {
        {
            let mut s = shared.lock();
            let stats = s.stats.entry(d.key.clone()).or_default();
            stats.rejected_429 += 1;
            *stats.rejected_by.entry(limit.to_string()).or_default() += 1;
            *stats.statuses.entry(429).or_default() += 1;
            if let Some(r) = s.received.iter_mut().rev().find(|r| r.id == d.id) {
                r.status = Some(429);
            }
        }
        let body = error_body(429, &format!("mock strict limit exceeded: {limit}"));
        write_json(stream, 429, &[("retry-after".into(), "1".into())], &body).await?;
        return Ok(true);
    }
    let guard = InFlight {
        shared,
        key: d.key.clone(),
        id: d.id,
        strict: d.strict,
        arrived: Instant::now(),
    };

    if !d.latency.is_zero() {
        actix_rt::time::sleep(d.latency).await;
    }

    match &d.behavior {
        Behavior::Hang => {
            // Hold the connection until the client gives up (or the mock stops).
            let mut scratch = [0u8; 1024];
            loop {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return Ok(false),
                    Ok(_) => {}
                }
            }
        }
        Behavior::Drop => {
            drop(guard);
            return Ok(false);
        }
        Behavior::RateLimited { retry_after } => {
            let body = error_body(429, "Rate limit reached for requests (mock)");
            let mut headers = d.headers.clone();
            headers.push(("retry-after".into(), retry_after.to_string()));
            guard.answered(429, None);
            write_json(stream, 429, &headers, &body).await?;
            return Ok(true);
        }
        Behavior::Status(status) => {
            let body = error_body(*status, &format!("mock answers {status}"));
            guard.answered(*status, None);
            write_json(stream, *status, &d.headers, &body).await?;
            return Ok(true);
        }
        Behavior::Raw {
            status,
            headers,
            body,
        } => {
            let mut all = d.headers.clone();
            all.extend(headers.iter().cloned());
            guard.answered(*status, None);
            write_raw(stream, *status, &all, body).await?;
            return Ok(true);
        }
        Behavior::Sse { events, end } => {
            guard.answered(200, None);
            stream
                .write_all(head(200, "text/event-stream", &d.headers, None).as_bytes())
                .await?;
            for event in events {
                write_chunk(stream, format!("{event}\n\n").as_bytes()).await?;
                stream.flush().await?;
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            return match end {
                SseEnd::Clean => {
                    stream.write_all(b"0\r\n\r\n").await?;
                    Ok(true)
                }
                SseEnd::Close => Ok(false),
                SseEnd::Silent => {
                    actix_rt::time::sleep(Duration::from_secs(3600)).await;
                    Ok(false)
                }
            };
        }
        Behavior::Normal | Behavior::DropMidStream { .. } => {}
    }

    let drop_after = match d.behavior {
        Behavior::DropMidStream { after } => Some(after),
        _ => None,
    };
    match route {
        Route::Chat => {
            let Some(body) = body else {
                let err = error_body(400, "mock: the body is not JSON");
                guard.answered(400, None);
                write_json(stream, 400, &d.headers, &err).await?;
                return Ok(true);
            };
            let model = body["model"].as_str().unwrap_or(MOCK_MODEL).to_string();
            if body["stream"].as_bool() == Some(true) {
                let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
                let done = write_stream(stream, &d, &model, include_usage, drop_after, || {
                    guard.answered(200, Some(d.usage))
                })
                .await?;
                return Ok(done);
            }
            let answer = chat_completion(d.id, &model, d.usage);
            if let Some(_after) = drop_after {
                write_truncated(stream, &d.headers, &answer).await?;
                return Ok(false);
            }
            guard.answered(200, Some(d.usage));
            write_json(stream, 200, &d.headers, &answer).await?;
            Ok(true)
        }
        Route::Embeddings => {
            let Some(body) = body else {
                let err = error_body(400, "mock: the body is not JSON");
                guard.answered(400, None);
                write_json(stream, 400, &d.headers, &err).await?;
                return Ok(true);
            };
            let answer = embeddings(&body, d.usage.0);
            if drop_after.is_some() {
                write_truncated(stream, &d.headers, &answer).await?;
                return Ok(false);
            }
            guard.answered(200, Some((d.usage.0, 0)));
            write_json(stream, 200, &d.headers, &answer).await?;
            Ok(true)
        }
        Route::Models => {
            let answer = json!({
                "object": "list",
                "data": [{"id": MOCK_MODEL, "object": "model", "created": 0, "owned_by": "mock"}],
            });
            guard.answered(200, None);
            write_json(stream, 200, &d.headers, &answer).await?;
            Ok(true)
        }
        Route::NotFound => {
            let err = error_body(404, "mock: no such route");
            guard.answered(404, None);
            write_json(stream, 404, &d.headers, &err).await?;
            Ok(true)
        }
    }
}

enum Route {
    Chat,
    Embeddings,
    Models,
    NotFound,
}

fn route_of(method: &str, path: &str) -> Route {
    let path = path.split('?').next().unwrap_or("");
    match method {
        "POST" if path.ends_with("/chat/completions") => Route::Chat,
        "POST" if path.ends_with("/embeddings") => Route::Embeddings,
        "GET" if path.ends_with("/models") => Route::Models,
        _ => Route::NotFound,
    }
}

fn usage_json(usage: (u64, u64)) -> Value {
    json!({
        "prompt_tokens": usage.0,
        "completion_tokens": usage.1,
        "total_tokens": usage.0 + usage.1,
    })
}

fn chat_completion(id: u64, model: &str, usage: (u64, u64)) -> Value {
    json!({
        "id": format!("chatcmpl-mock-{id}"),
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the mock upstream."},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage_json(usage),
        "system_fingerprint": null,
    })
}

fn embeddings(body: &Value, prompt_tokens: u64) -> Value {
    let inputs = match &body["input"] {
        Value::Array(items) => items.len().max(1),
        _ => 1,
    };
    let vector = [0.125f32, -0.25, 0.5, 1.0];
    let base64 = body["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": body["model"].as_str().unwrap_or(MOCK_MODEL),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

fn error_body(status: u16, message: &str) -> Value {
    let (kind, code) = match status {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        403 => ("permission_error", Value::Null),
        429 => ("requests", json!("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", Value::Null),
        _ => ("server_error", Value::Null),
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn head(
    status: u16,
    content_type: &str,
    extra: &[(String, String)],
    length: Option<usize>,
) -> String {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\n",
        reason(status)
    );
    match length {
        Some(n) => head.push_str(&format!("content-length: {n}\r\n")),
        None => head.push_str("transfer-encoding: chunked\r\ncache-control: no-cache\r\n"),
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

async fn write_json(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let mut out = head(status, "application/json", headers, Some(body.len()));
    out.push_str(&body);
    stream.write_all(out.as_bytes()).await
}

/// `body` as it is, with `headers` (a `content-type` among them replaces the JSON one).
async fn write_raw(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<()> {
    let is_type = |n: &str| n.eq_ignore_ascii_case("content-type");
    let content_type = headers
        .iter()
        .find(|(n, _)| is_type(n))
        .map_or("application/json", |(_, v)| v.as_str());
    let rest: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !is_type(n))
        .cloned()
        .collect();
    let mut out = head(status, content_type, &rest, Some(body.len()));
    out.push_str(body);
    stream.write_all(out.as_bytes()).await
}

/// The head and half of `body`, then the caller closes the connection.
async fn write_truncated(
    stream: &mut TcpStream,
    headers: &[(String, String)],
    body: &Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let mut out = head(200, "application/json", headers, Some(body.len()));
    out.push_str(&body[..body.len() / 2]);
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

/// Streams the SSE answer; `Ok(true)` when it was written whole.
async fn write_stream(
    stream: &mut TcpStream,
    d: &Decision,
    model: &str,
    include_usage: bool,
    drop_after: Option<usize>,
    before_last_write: impl FnOnce(),
) -> std::io::Result<bool> {
    stream
        .write_all(head(200, "text/event-stream", &d.headers, None).as_bytes())
        .await?;
    let id = format!("chatcmpl-mock-{}", d.id);
    let chunks = d.pacing.chunks.max(1);
    let mut events: Vec<Value> = Vec::with_capacity(chunks + 2);
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000u64,
            "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    events.push(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    for i in 0..chunks {
        events.push(chunk(json!({"content": format!("tok{i} ")}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000u64,
            "model": model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage_json(d.usage),
        }));
    }
    for (i, event) in events.iter().enumerate() {
        if drop_after.is_some_and(|after| i >= after) {
            stream.flush().await?;
            return Ok(false);
        }
        if i > 0 && !d.pacing.delay.is_zero() {
            actix_rt::time::sleep(d.pacing.delay).await;
        }
        write_chunk(stream, format!("data: {event}\n\n").as_bytes()).await?;
    }
    before_last_write();
    let mut last = format!("{:x}\r\n", b"data: [DONE]\n\n".len()).into_bytes();
    last.extend_from_slice(b"data: [DONE]\n\n\r\n0\r\n\r\n");
    stream.write_all(&last).await?;
    Ok(true)
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await
}
