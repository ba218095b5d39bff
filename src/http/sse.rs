//! Streamed answers (server-sent events): metered as they pass, judged before the first byte
//! goes to the client, and ended properly whatever the upstream or the client does (API.md,
//! "Streams that fail").
//!
//! - Before the first byte: the upstream's first event (comments and keep-alives skipped) is
//!   read first ([`probe`]). An error event is judged like a plain answer with the status it
//!   means; an upstream that ends, breaks or goes silent before any event is a failed attempt.
//!   Either way the request can still be retried elsewhere.
//! - After it: the stream passes through ([`MeteredStream`]). An upstream that breaks, goes
//!   silent, sends an event larger than [`MAX_EVENT_BYTES`], or ends without `data: [DONE]` or a
//!   finish reason, ends the client's stream with one `data: {"error": …}` event and no
//!   `[DONE]`; the request is logged as failed (`stream_broken`). A client that leaves is logged
//!   as `499 client_closed`.
//!
//! Settling (DESIGN.md): the reservation is committed when the stream ends, with the usage the
//! upstream reported, else the prompt estimate plus what was generated so far — never nothing,
//! since the upstream may have counted the request.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};

use super::access::{AccessRecord, Failure};
use super::usage::{StreamEvent, UpstreamError};
use crate::actors::ReservationGuard;
use crate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use crate::domain::estimate;
use crate::domain::Tokenizer;

/// The largest event the gateway holds while waiting for its end; a larger one ends the stream.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The upstream's body as it arrives.
pub type UpstreamBody = Pin<Box<dyn Stream<Item = Result<Bytes, awc::error::PayloadError>>>>;

/// Reads a server-sent-event stream as it passes: the usage the upstream reports, the generated
/// content (for when it reports none), whether it ended properly, and the first error it reports;
/// removes the usage-only chunk the gateway asked for when the client did not.
#[derive(Debug)]
pub struct Meter {
    buffer: BytesMut,
    keep_usage_chunk: bool,
    tokenizer: Tokenizer,
    prompt_estimate: u64,
    usage: Option<(u64, u64)>,
    generated: u64,
    /// Data events seen (comments and keep-alives not counted).
    events: u64,
    /// `data: [DONE]` or a finish reason was seen: the answer is complete.
    complete: bool,
    /// The first error event, and at which event it came.
    error: Option<(u64, UpstreamError)>,
}

/// An event larger than [`MAX_EVENT_BYTES`] was not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized;

impl Meter {
    pub fn new(keep_usage_chunk: bool, tokenizer: Tokenizer, prompt_estimate: u64) -> Meter {
        Meter {
            buffer: BytesMut::new(),
            keep_usage_chunk,
            tokenizer,
            prompt_estimate,
            usage: None,
            generated: 0,
            events: 0,
            complete: false,
            error: None,
        }
    }

    /// Takes a chunk of the upstream's bytes; returns the complete events to pass on.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, Oversized> {
        self.buffer.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.buffer) {
            let event = self.buffer.split_to(end);
            if self.inspect(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err(Oversized);
        }
        Ok(out.freeze())
    }

    /// Whatever is left when the upstream ends (an unterminated last event).
    pub fn rest(&mut self) -> Bytes {
        let event = self.buffer.split();
        if !event.is_empty() && self.inspect(&event) {
            return event.freeze();
        }
        Bytes::new()
    }

    /// Data events seen so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Whether the upstream said the answer is complete.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The first error event the upstream sent, if any.
    pub fn error(&self) -> Option<&UpstreamError> {
        self.error.as_ref().map(|(_, e)| e)
    }

    /// Whether the first data event was an error.
    pub fn starts_with_error(&self) -> bool {
        matches!(self.error, Some((1, _)))
    }

    /// Reads one event; returns whether it goes to the client.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let mut forward = true;
        for line in event.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data.is_empty() {
                continue;
            }
            self.events += 1;
            if data == b"[DONE]" {
                self.complete = true;
                continue;
            }
            let Ok(event) = serde_json::from_slice::<StreamEvent<'_>>(data) else {
                continue;
            };
            if let Some(raw) = event.error {
                if self.error.is_none() {
                    self.error = Some((self.events, UpstreamError::parse(raw)));
                }
            }
            let no_choices = event.choices.as_ref().is_none_or(|c| c.is_empty());
            if let Some(usage) = event.usage.and_then(|u| u.split()) {
                self.usage = Some(usage);
                if no_choices && !self.keep_usage_chunk {
                    forward = false;
                }
            }
            for choice in event.choices.iter().flatten() {
                if let Some(content) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    self.generated += estimate::count(self.tokenizer, content);
                }
                if choice.finish_reason.is_some_and(|r| r.get() != "null") {
                    self.complete = true;
                }
            }
        }
        forward
    }

    /// What to commit: the reported usage, else the prompt estimate plus what was generated.
    pub fn settlement(&self) -> (Usage, u64, u64) {
        match self.usage {
            Some((input, output)) => (Usage::Reported(input + output), input, output),
            None => (
                Usage::Reported(self.prompt_estimate + self.generated),
                self.prompt_estimate,
                self.generated,
            ),
        }
    }
}

/// The end of the first complete event (`\n\n` or `\r\n\r\n`), including the separator.
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the start of a stream showed.
#[derive(Debug)]
pub enum Probe {
    /// A first data event that is not an error: stream, starting with these bytes.
    Started(Bytes),
    /// The first data event is an error.
    Error(UpstreamError),
    /// The upstream ended, broke, or sent an oversized event before any data event.
    Ended(String),
    /// No event within the idle timeout.
    Silent,
}

/// Reads the upstream until its first data event (see the module documentation).
pub async fn probe(upstream: &mut UpstreamBody, meter: &mut Meter, idle: Duration) -> Probe {
    let mut prefix = BytesMut::new();
    loop {
        let next = match actix_rt::time::timeout(idle, upstream.next()).await {
            Err(_) => return Probe::Silent,
            Ok(next) => next,
        };
        match next {
            Some(Ok(chunk)) => match meter.feed(&chunk) {
                Ok(out) => prefix.extend_from_slice(&out),
                Err(Oversized) => {
                    return Probe::Ended(format!(
                        "the upstream sent an event over {MAX_EVENT_BYTES} bytes"
                    ))
                }
            },
            Some(Err(e)) => {
                return Probe::Ended(format!("the upstream stream broke before any event: {e}"))
            }
            None => {
                prefix.extend_from_slice(&meter.rest());
                if meter.events() == 0 {
                    return Probe::Ended(
                        "the upstream ended the stream before any event".to_string(),
                    );
                }
            }
        }
        if meter.starts_with_error() {
            let (_, error) = meter.error.take().expect("checked above");
            return Probe::Error(error);
        }
        if meter.events() > 0 {
            return Probe::Started(prefix.freeze());
        }
    }
}

/// One `data:` event carrying an error, the way OpenAI's streams report one.
fn error_event(message: &str) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "upstream_error",
        "param": null,
        "code": "stream_broken",
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

/// The upstream's stream passed to the client as it arrives, metered; the reservation is renewed
/// while it runs and settled when it ends — or when it is dropped because the client left.
pub struct MeteredStream {
    pub upstream: UpstreamBody,
    pub guard: Option<ReservationGuard>,
    pub meter: Meter,
    /// What the probe read, sent first.
    pub prefix: Option<Bytes>,
    pub idle: Pin<Box<actix_rt::time::Sleep>>,
    pub idle_timeout: Duration,
    pub renew: Pin<Box<actix_rt::time::Interval>>,
    pub started: Instant,
    pub headers: RateHeaders,
    pub record: Option<AccessRecord>,
}

impl MeteredStream {
    fn feedback(&self, outcome: UpstreamOutcome) -> Option<Feedback> {
        Some(Feedback {
            outcome,
            latency_ms: self.started.elapsed().as_millis() as u64,
            headers: self.headers,
        })
    }

    /// Settles and logs; `failure` when the stream did not end properly.
    fn settle(&mut self, failure: Option<Failure<'_>>) {
        let outcome = match failure {
            None => UpstreamOutcome::Success,
            Some(_) => UpstreamOutcome::Failure,
        };
        let feedback = self.feedback(outcome);
        if let Some(guard) = self.guard.take() {
            let (usage, input, output) = self.meter.settlement();
            guard.commit(usage, feedback);
            if let Some(mut record) = self.record.take() {
                record.finish(200, input, output, failure);
            }
        }
    }

    /// Ends the client's stream with an error event (no `[DONE]`).
    fn broken(&mut self, message: String) -> Poll<Option<Result<Bytes, actix_web::Error>>> {
        log::warn!(event = "stream_broken"; "{message}");
        let event = error_event(&message);
        self.settle(Some(Failure::new("stream_broken", message)));
        Poll::Ready(Some(Ok(event)))
    }

    /// The upstream ended: properly, or (no `[DONE]`, no finish reason) cut short.
    fn ended(&mut self) -> Poll<Option<Result<Bytes, actix_web::Error>>> {
        let rest = self.meter.rest();
        if let Some(error) = self.meter.error().cloned() {
            // The upstream reported the failure itself (its event went to the client).
            self.settle(Some(Failure::new("stream_broken", error.message)));
        } else if self.meter.complete() {
            self.settle(None);
        } else {
            return self.broken("the upstream ended the stream before it was complete".into());
        }
        Poll::Ready((!rest.is_empty()).then_some(Ok(rest)))
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(prefix)));
        }
        if this.guard.is_none() {
            return Poll::Ready(None);
        }
        while this.renew.as_mut().poll_tick(cx).is_ready() {
            if let Some(guard) = &this.guard {
                guard.renew();
            }
        }
        loop {
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = actix_rt::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    match this.meter.feed(&chunk) {
                        Ok(out) if !out.is_empty() => return Poll::Ready(Some(Ok(out))),
                        Ok(_) => {}
                        Err(Oversized) => {
                            return this.broken(format!(
                                "the upstream sent an event over {MAX_EVENT_BYTES} bytes"
                            ))
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return this.broken(format!("the upstream stream broke: {e}"))
                }
                Poll::Ready(None) => return this.ended(),
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        return this.broken(format!(
                            "the upstream stream went silent for {:?}",
                            this.idle_timeout
                        ));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // The client left mid-stream: commit what was generated so far (or reported); its record
        // is written as 499 client_closed when it drops.
        if let Some(guard) = self.guard.take() {
            log::info!(event = "client_disconnected"; "the client left a stream; committing what was generated");
            let (usage, input, output) = self.meter.settlement();
            guard.commit(usage, None);
            if let Some(mut record) = self.record.take() {
                record.finish(
                    super::access::CLIENT_CLOSED,
                    input,
                    output,
                    Some(Failure::new(
                        "client_closed",
                        "the client left before the stream ended",
                    )),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_strips_the_usage_chunk_only_when_the_client_did_not_ask() {
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
                      data: [DONE]\n\n";
        let mut hidden = Meter::new(false, Tokenizer::Bytes, 99);
        let mut out = hidden.feed(&events.as_bytes()[..30]).unwrap().to_vec();
        out.extend_from_slice(&hidden.feed(&events.as_bytes()[30..]).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Hello") && text.contains("[DONE]"));
        assert!(!text.contains("usage"), "{text}");
        assert_eq!(hidden.settlement().0, Usage::Reported(7));
        assert!(hidden.complete());

        let mut shown = Meter::new(true, Tokenizer::Bytes, 99);
        let text = String::from_utf8(shown.feed(events.as_bytes()).unwrap().to_vec()).unwrap();
        assert!(text.contains("\"usage\""));
    }

    #[test]
    fn without_reported_usage_the_meter_counts_what_was_generated() {
        let mut m = Meter::new(false, Tokenizer::Bytes, 10);
        m.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\r\n\r\n")
            .unwrap();
        assert_eq!(m.settlement(), (Usage::Reported(14), 10, 4));
        assert!(!m.complete(), "no [DONE], no finish reason");
        m.feed(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")
            .unwrap();
        assert!(m.complete(), "a finish reason ends the answer");
    }

    #[test]
    fn comments_are_not_events_and_an_error_first_is_noticed() {
        let mut m = Meter::new(false, Tokenizer::Bytes, 1);
        m.feed(b": keepalive\n\n").unwrap();
        assert_eq!(m.events(), 0);
        m.feed(b"data: {\"error\":{\"message\":\"bad\",\"type\":\"invalid_request_error\",\"code\":400}}\n\n")
            .unwrap();
        assert!(m.starts_with_error());
        assert_eq!(m.error().unwrap().status, 400);
    }

    #[test]
    fn an_event_that_never_ends_is_refused_past_the_cap() {
        let mut m = Meter::new(false, Tokenizer::Bytes, 1);
        let chunk = vec![b'x'; 64 * 1024];
        let mut fed = 0;
        let result = loop {
            let r = m.feed(&chunk);
            fed += chunk.len();
            if r.is_err() || fed > 2 * MAX_EVENT_BYTES {
                break r;
            }
        };
        assert_eq!(result, Err(Oversized));
        assert!(fed <= MAX_EVENT_BYTES + chunk.len(), "held at most the cap");
    }
}
