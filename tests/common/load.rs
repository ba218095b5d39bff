//! Load above capacity for the precision tests: concurrent clients sending one chat request after
//! another to one gateway or several, and what a strict upstream's limits allow over the run.
//!
//! A client that is refused for the account's limits (429 `rate_limit_exceeded`) comes back when
//! the gateway says a slot frees (its `retry_after`, polling at least every 100 ms); any other
//! answer is recorded as unexpected. A client whose gateway no longer answers (killed) stops.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::app::Http;
use super::upstream::Received;

/// One gateway the clients are spread over: its base URL and a client key.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub key: String,
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Load {
    /// When each admitted request was answered (by the clients' clock).
    pub admitted_at: Vec<Instant>,
    /// Client latencies of the admitted requests.
    pub latencies: Vec<Duration>,
    /// Refusals for the account's limits (429 `rate_limit_exceeded`).
    pub refused: u64,
    /// Any other answer, as text (status and body).
    pub other: Vec<String>,
    /// Connections that failed (the gateway is gone); the client stopped there.
    pub lost: Vec<String>,
    pub started: Option<Instant>,
    pub elapsed: Duration,
}

impl Load {
    pub fn admitted(&self) -> u64 {
        self.admitted_at.len() as u64
    }

    /// Admitted requests answered from `from` (since the start) to the end.
    pub fn admitted_since(&self, from: Duration) -> u64 {
        let start = self.started.expect("a run");
        self.admitted_at
            .iter()
            .filter(|t| **t >= start + from)
            .count() as u64
    }

    pub fn mean_latency(&self) -> Duration {
        self.latencies.iter().sum::<Duration>() / self.latencies.len().max(1) as u32
    }

    /// Statuses of the unexpected answers that are server errors (5xx).
    pub fn server_errors(&self) -> Vec<&String> {
        self.other.iter().filter(|o| o.starts_with('5')).collect()
    }
}

/// Runs `clients` clients for `run`, spread round-robin over `targets`, each sending `body` to
/// `/v1/chat/completions` again and again.
pub async fn drive(targets: &[Target], clients: usize, run: Duration, body: &[u8]) -> Load {
    let load = Rc::new(RefCell::new(Load::default()));
    let http = Http::new();
    let started = Instant::now();
    load.borrow_mut().started = Some(started);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = targets[c % targets.len()].clone();
        let (http, load, body) = (http.clone(), load.clone(), body.to_vec());
        let url = format!("{}/v1/chat/completions", target.url);
        tasks.push(actix_rt::spawn(async move {
            while started.elapsed() < run {
                let sent = http
                    .try_send(
                        "POST",
                        &url,
                        Some(&target.key),
                        &[("Content-Type", "application/json")],
                        Some(&body),
                    )
                    .await;
                let r = match sent {
                    Ok(r) => r,
                    Err(e) => {
                        // The gateway is gone (killed): this client stops.
                        load.borrow_mut().lost.push(format!("{url}: {e}"));
                        return;
                    }
                };
                match r.status {
                    200 => {
                        let mut l = load.borrow_mut();
                        l.admitted_at.push(Instant::now());
                        l.latencies.push(r.elapsed);
                    }
                    429 if r.code().as_deref() == Some("rate_limit_exceeded") => {
                        load.borrow_mut().refused += 1;
                        let hint = r.json()["error"]["retry_after"].as_f64().unwrap_or(0.0);
                        let wait = Duration::from_secs_f64(hint)
                            .clamp(Duration::from_millis(2), Duration::from_millis(100));
                        actix_rt::time::sleep(wait).await;
                    }
                    _ => {
                        load.borrow_mut().other.push(r.to_string());
                        actix_rt::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut load = Rc::try_unwrap(load).expect("clients done").into_inner();
    load.elapsed = started.elapsed();
    load
}

/// The most a strict upstream lets through over `run`: each of `slots` request slots (accounts
/// × requests per window) is held for `held` = the window plus the latency, so it serves at most
/// ⌈run / held⌉ requests (at 0, held, 2·held, …).
pub fn allowed(slots: u64, run: Duration, held: Duration) -> u64 {
    slots * (run.as_secs_f64() / held.as_secs_f64()).ceil() as u64
}

/// How tightly slots are reused: per key, the k-th and the (k + `limit`)-th accepted request
/// share a slot, so they are at least `held` apart; answers `held` / their mean gap (1.0 at
/// best), and the mean gap.
pub fn slot_reuse(
    received: &[Received],
    keys: &[String],
    limit: usize,
    held: Duration,
) -> (f64, Duration) {
    let mut gaps = Vec::new();
    for key in keys {
        let times: Vec<Instant> = received
            .iter()
            .filter(|r| &r.key == key && r.status == Some(200))
            .map(|r| r.at)
            .collect();
        for pair in times.windows(limit + 1) {
            gaps.push(pair[limit] - pair[0]);
        }
    }
    let mean = gaps.iter().sum::<Duration>() / gaps.len().max(1) as u32;
    (held.as_secs_f64() / mean.as_secs_f64().max(1e-9), mean)
}
