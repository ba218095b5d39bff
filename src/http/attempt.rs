//! One attempt of a client request on one reserved account: send it upstream with the account's
//! key, judge the answer, settle the reservation (API.md): an answer with `usage` commits that
//! usage; an error answer (4xx, 5xx, 429) commits its request slot and no tokens; a timeout or a
//! broken connection, whose outcome is unknown, commits the estimate; a connection that could not
//! even be opened releases it. A streamed answer is judged on its first event (see [`super::sse`]).

use std::future::Future;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use bytes::Bytes;

use super::access::AccessRecord;
use super::error::ApiError;
use super::openai::ProxyRequest;
use super::sse::{self, Meter, MeteredStream, Probe};
use super::upstream::{rate_headers, wait_after_429};
use super::usage;
use super::AppState;
use crate::actors::{Reservation, ReservationGuard, Served};
use crate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use crate::domain::time::duration_ms;

/// Largest non-streamed upstream answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// What one attempt came to.
pub enum Attempt {
    /// An answer for the client (success, streamed, or an upstream 4xx returned as it is).
    Answered(HttpResponse),
    /// The account could not serve (429, no credentials): try another, without counting a failure.
    TryAnother,
    /// The upstream refused the account (401 disabled it, 403 cooled it down for the model): try
    /// another; this answer goes back to the client if none can serve.
    TookOut(HttpResponse),
    /// The upstream failed (connection, timeout, 5xx): retry within `upstream.retries`.
    Failed(ApiError),
}

/// What the judging of an answer needs besides the answer.
struct Judge<'a> {
    state: &'a web::Data<AppState>,
    lease: &'a Served,
    started: Instant,
    headers: RateHeaders,
    may_take_out: bool,
}

impl Judge<'_> {
    fn feedback(&self, outcome: UpstreamOutcome) -> Option<Feedback> {
        Some(Feedback {
            outcome,
            latency_ms: self.started.elapsed().as_millis() as u64,
            headers: self.headers,
        })
    }

    /// An upstream answer for the client as it came, with the quota headers.
    fn as_is(&self, status: StatusCode, content_type: &str, body: Bytes) -> HttpResponse {
        let mut builder = HttpResponse::build(status);
        builder.insert_header((CONTENT_TYPE, content_type));
        quota_headers(&mut builder, self.lease);
        builder.body(body)
    }

    /// Judges a non-success answer (a plain one, or a stream whose first event is an error):
    /// 429 cools the account down and tries another; 401/403 take the account out once per
    /// request; 5xx is a failure; any other status goes back to the client as it is.
    fn error_answer(
        &self,
        guard: ReservationGuard,
        status: StatusCode,
        response_headers: &HeaderMap,
        body: Bytes,
        record: &mut Option<AccessRecord>,
    ) -> Attempt {
        let upstream = &self.state.upstream;
        match status.as_u16() {
            429 => {
                let now = self.state.runtime.clock().now_ms();
                let wait = wait_after_429(response_headers, &body, now, upstream.max_cooldown);
                let outcome = UpstreamOutcome::RateLimited {
                    retry_after_ms: wait.map(|w| w.ms),
                    capped: wait.is_some_and(|w| w.capped()),
                };
                guard.commit(Usage::RequestOnly, self.feedback(outcome));
                Attempt::TryAnother
            }
            401 | 403 if self.may_take_out => {
                let outcome = if status.as_u16() == 401 {
                    UpstreamOutcome::Unauthorized
                } else {
                    UpstreamOutcome::Forbidden {
                        model: self.lease.model.clone(),
                        cooldown_ms: duration_ms(upstream.forbidden_cooldown),
                    }
                };
                guard.commit(Usage::RequestOnly, self.feedback(outcome));
                Attempt::TookOut(self.as_is(status, "application/json", body))
            }
            500..=599 => {
                guard.commit(Usage::RequestOnly, self.feedback(UpstreamOutcome::Failure));
                let detail = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                Attempt::Failed(ApiError::Upstream {
                    status: Some(status.as_u16()),
                    message: format!("the upstream answered {status}: {detail}"),
                })
            }
            _ => {
                // The request itself was wrong for the upstream, or a second 401/403 in this
                // request (which takes nothing out): its answer goes back as it is.
                let health = (!matches!(status.as_u16(), 401 | 403))
                    .then(|| self.feedback(UpstreamOutcome::Success))
                    .flatten();
                guard.commit(Usage::RequestOnly, health);
                if let Some(record) = record.as_mut() {
                    record.finish(status.as_u16(), 0, 0, None);
                }
                Attempt::Answered(self.as_is(status, "application/json", body))
            }
        }
    }
}

/// `x-quota-provider`, `x-quota-account` and the remaining-units headers of a reservation.
pub fn quota_headers(builder: &mut actix_web::HttpResponseBuilder, lease: &Served) {
    builder.insert_header(("x-quota-provider", &*lease.provider.spec.name));
    builder.insert_header(("x-quota-account", &*lease.account.id));
    if let Some(n) = lease.remaining_requests {
        builder.insert_header(("x-ratelimit-remaining-requests", n));
    }
    if let Some(n) = lease.remaining_tokens {
        builder.insert_header(("x-ratelimit-remaining-tokens", n));
    }
}

/// Awaits `work`, renewing the reservation while it runs when it may outlast the reservation's
/// timeout (a provider's `timeout` above `sync.reservation_timeout`).
async fn renewing<F: Future>(
    guard: &ReservationGuard,
    every: Duration,
    timeout: Duration,
    work: F,
) -> F::Output {
    if timeout <= every {
        return work.await;
    }
    let mut work = std::pin::pin!(work);
    let mut ticks = actix_rt::time::interval_at(actix_rt::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => guard.renew(),
        }
    }
}

/// Sends `request` upstream on the reserved account and settles (see the module documentation).
/// `record` is finished here for answers that go to the client (and moved into the stream of a
/// streamed one).
pub async fn attempt(
    request: &ProxyRequest,
    lease: Reservation,
    state: &web::Data<AppState>,
    client: &awc::Client,
    record: &mut Option<AccessRecord>,
    may_take_out: bool,
) -> Attempt {
    let provider = lease.provider.clone();
    let spec = &provider.spec;
    let Some(credentials) = lease.account.credentials.clone() else {
        lease.guard.release();
        return Attempt::TryAnother;
    };
    let url = format!("{}{}", spec.upstream.base_url, request.endpoint.path());
    let auth = if spec.upstream.auth_scheme.is_empty() {
        credentials.api_key.expose().to_string()
    } else {
        format!(
            "{} {}",
            spec.upstream.auth_scheme,
            credentials.api_key.expose()
        )
    };
    let timeout = spec.upstream.timeout.unwrap_or(state.upstream.timeout);
    let mut upstream = client
        .post(&url)
        .timeout(timeout)
        .insert_header((CONTENT_TYPE, "application/json"))
        .insert_header((spec.upstream.auth_header.as_str(), auth));
    for (name, value) in &credentials.headers {
        if !value.is_empty() {
            upstream = upstream.insert_header((name.as_str(), value.expose()));
        }
    }
    let body = request.upstream_body(&lease.model, spec.upstream.max_completion_tokens);
    let (mut guard, lease) = lease.split();
    // From here on the upstream may count the request, even if this future is dropped.
    guard.mark_sent();
    let started = Instant::now();
    let failed = || {
        Some(Feedback {
            outcome: UpstreamOutcome::Failure,
            latency_ms: started.elapsed().as_millis() as u64,
            headers: RateHeaders::default(),
        })
    };
    let sent = renewing(&guard, state.renew_every, timeout, upstream.send_body(body)).await;
    let mut response = match sent {
        Ok(response) => response,
        Err(awc::error::SendRequestError::Connect(e)) => {
            // The connection was never opened: nothing reached the upstream.
            guard.release_unsent();
            return Attempt::Failed(ApiError::Upstream {
                status: None,
                message: format!("cannot connect to the upstream: {e}"),
            });
        }
        Err(awc::error::SendRequestError::Timeout) => {
            guard.commit(Usage::Estimate, failed());
            return Attempt::Failed(ApiError::UpstreamTimeout);
        }
        Err(e) => {
            guard.commit(Usage::Estimate, failed());
            return Attempt::Failed(ApiError::Upstream {
                status: None,
                message: format!("the upstream connection failed: {e}"),
            });
        }
    };
    let status = response.status();
    let judge = Judge {
        state,
        lease: &lease,
        started,
        headers: rate_headers(
            response.headers(),
            state.runtime.clock().now_ms(),
            state.upstream.max_cooldown,
        ),
        may_take_out,
    };
    if status.is_success() && request.stream {
        let tokenizer = spec.upstream.tokenizer;
        let mut meter = Meter::new(
            request.client_wants_stream_usage,
            tokenizer,
            request.prompt_tokens(tokenizer),
        );
        let headers = response.headers().clone();
        let mut upstream: sse::UpstreamBody = Box::pin(response);
        let idle = state.upstream.stream_idle_timeout;
        let probed = renewing(
            &guard,
            state.renew_every,
            idle,
            sse::probe(&mut upstream, &mut meter, idle),
        )
        .await;
        let prefix = match probed {
            Probe::Started(prefix) => prefix,
            Probe::Error(error) => {
                // Nothing went to the client yet: judged like a plain answer with that status.
                let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = Bytes::from(format!("{{\"error\":{}}}", error.raw));
                return judge.error_answer(guard, status, &headers, body, record);
            }
            Probe::Ended(message) => {
                guard.commit(Usage::Estimate, failed());
                return Attempt::Failed(ApiError::Upstream {
                    status: Some(status.as_u16()),
                    message,
                });
            }
            Probe::Silent => {
                guard.commit(Usage::Estimate, failed());
                return Attempt::Failed(ApiError::UpstreamTimeout);
            }
        };
        let stream = MeteredStream {
            upstream,
            guard: Some(guard),
            meter,
            prefix: Some(prefix),
            idle: Box::pin(actix_rt::time::sleep(idle)),
            idle_timeout: idle,
            renew: Box::pin(actix_rt::time::interval(state.renew_every)),
            started,
            headers: judge.headers,
            record: record.take(),
        };
        let mut builder = HttpResponse::build(StatusCode::OK);
        builder
            .insert_header((CONTENT_TYPE, "text/event-stream"))
            .insert_header(("cache-control", "no-cache"));
        quota_headers(&mut builder, &lease);
        return Attempt::Answered(builder.streaming(stream));
    }
    let read = renewing(
        &guard,
        state.renew_every,
        timeout,
        response.body().limit(MAX_ANSWER_BYTES),
    )
    .await;
    let body = match read {
        Ok(body) => body,
        Err(e) => {
            guard.commit(Usage::Estimate, judge.feedback(UpstreamOutcome::Failure));
            return Attempt::Failed(ApiError::Upstream {
                status: Some(status.as_u16()),
                message: format!("reading the upstream's answer failed: {e}"),
            });
        }
    };
    if !status.is_success() {
        return judge.error_answer(guard, status, response.headers(), body, record);
    }
    let (usage, input, output) = match usage::of_answer(&body) {
        Some((input, output)) => (Usage::Reported(input + output), input, output),
        // No usage in a success: the estimate stands (counted, never under-counted).
        None => (Usage::Estimate, lease.estimate, 0),
    };
    guard.commit(usage, judge.feedback(UpstreamOutcome::Success));
    if let Some(record) = record.as_mut() {
        record.finish(status.as_u16(), input, output, None);
    }
    Attempt::Answered(judge.as_is(status, "application/json", body))
}
