//! The OpenAI-compatible client API: `POST /v1/chat/completions`, `POST /v1/embeddings`,
//! `GET /v1/models`.
//!
//! One request: validate → reserve on an account of a provider serving the model (the runtime
//! falls back across accounts and providers) → forward with that account's key → settle.
//! Settling follows API.md: once anything may have reached the upstream the reservation is
//! committed (real usage from the answer; the request slot and no tokens for an error answer; the
//! estimate when the outcome is unknown), and it is released only when the connection could not
//! even be opened. An upstream 429 cools the account down, a 401 disables it, a 403 keeps it away
//! from that model for `upstream.forbidden_cooldown`, and each is retried on another account — but
//! one request takes at most one account out: a second 401/403 goes back to the client as it is.
//! Connection errors, timeouts and 5xx are retried up to `upstream.retries` times. Retries happen
//! only before the first byte went to the client.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpMessage as _, HttpRequest, HttpResponse, ResponseError as _};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use serde_json::json;

use super::auth::{Caller, ClientKey};
use super::error::ApiError;
use super::openai::{Endpoint, ProxyRequest};
use super::upstream::{rate_headers, wait_after_429};
use super::AppState;
use crate::actors::{AcquireError, Reservation};
use crate::domain::account::{Feedback, RateHeaders, UpstreamOutcome, Usage};
use crate::domain::estimate;
use crate::domain::time::duration_ms;
use crate::domain::Tokenizer;
use crate::store::logs::NewRequestLog;

/// Largest request body accepted (bigger is a 413).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest non-streamed upstream answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Attempts at most for one request (429s and 401s are retried on other accounts too).
const MAX_ATTEMPTS: usize = 8;

#[utoipa::path(
    tag = "client",
    security(("client_key" = [])),
    request_body = super::openapi::client::ChatRequest,
    responses(
        (status = 200, description = "The upstream's answer, unchanged (JSON, or SSE with `stream: true`)",
            content((Object = "application/json"), (String = "text/event-stream")),
            headers(
                ("x-request-id" = String, description = "Echoed from the request, or generated"),
                ("x-quota-provider" = String, description = "The provider that served"),
                ("x-quota-account" = String, description = "The account's id (never its key)"),
                ("x-ratelimit-remaining-requests" = u64, description = "The account's smallest remainder over its request windows"),
                ("x-ratelimit-remaining-tokens" = u64, description = "The account's smallest remainder over its token windows"),
            )),
        (status = 400, description = "A bad body, or a request that exceeds a limit everywhere", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or unknown client key", body = super::openapi::ErrorBody),
        (status = 404, description = "No provider serves the model", body = super::openapi::ErrorBody),
        (status = 429, description = "Rate limited (`retry_after`, `Retry-After`) or quota exhausted (`reset_at`)", body = super::openapi::ErrorBody,
            headers(("Retry-After" = u64, description = "Whole seconds, rounded up"))),
        (status = 502, description = "The upstream failed", body = super::openapi::ErrorBody),
        (status = 503, description = "No active account serves the model", body = super::openapi::ErrorBody),
        (status = 504, description = "The upstream did not answer in time", body = super::openapi::ErrorBody),
    )
)]
#[post("/v1/chat/completions")]
pub async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    caller: ClientKey,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    proxy(Endpoint::Chat, req, payload, caller.0, state, client).await
}

#[utoipa::path(
    tag = "client",
    security(("client_key" = [])),
    request_body = super::openapi::client::EmbeddingsRequest,
    responses(
        (status = 200, description = "The upstream's answer, unchanged", content_type = "application/json"),
        (status = 400, description = "A bad body", body = super::openapi::ErrorBody),
        (status = 401, description = "Missing or unknown client key", body = super::openapi::ErrorBody),
        (status = 404, description = "No provider serves the model", body = super::openapi::ErrorBody),
        (status = 429, description = "Rate limited or quota exhausted", body = super::openapi::ErrorBody),
        (status = 502, description = "The upstream failed", body = super::openapi::ErrorBody),
        (status = 503, description = "No active account serves the model", body = super::openapi::ErrorBody),
        (status = 504, description = "The upstream did not answer in time", body = super::openapi::ErrorBody),
    )
)]
#[post("/v1/embeddings")]
pub async fn embeddings(
    req: HttpRequest,
    payload: web::Payload,
    caller: ClientKey,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    proxy(Endpoint::Embeddings, req, payload, caller.0, state, client).await
}

/// The routable models in OpenAI's list format: each model once (owned by its first provider), and
/// each `provider/model` for clients that want to pick a provider.
#[utoipa::path(
    tag = "client",
    security(("client_key" = [])),
    responses(
        (status = 200, description = "The models that can be routed", body = super::openapi::client::ModelList),
        (status = 401, description = "Missing or unknown client key", body = super::openapi::ErrorBody),
    )
)]
#[get("/v1/models")]
pub async fn models(_caller: ClientKey, state: web::Data<AppState>) -> HttpResponse {
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::new();
    for (provider, model) in state.runtime.registry().models() {
        if seen.insert(model.clone()) {
            data.push(
                json!({"id": &*model, "object": "model", "created": 0, "owned_by": &*provider}),
            );
        }
        data.push(json!({"id": format!("{provider}/{model}"), "object": "model", "created": 0, "owned_by": &*provider}));
    }
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// What is known about one request, for its access-log line, its metrics and its request-log row.
#[derive(Clone)]
struct Record {
    request_id: String,
    caller: Caller,
    endpoint: Endpoint,
    model: String,
    started: Instant,
    provider: Option<Arc<str>>,
    provider_id: Option<Arc<str>>,
    account_id: Option<Arc<str>>,
    /// Prices per million tokens (input, output) of the model that served.
    prices: (f64, f64),
    state: web::Data<AppState>,
}

impl Record {
    /// The request is over: one access-log line, the metrics, and a request-log row (tracked
    /// asynchronously; a full tracker drops and counts rather than wait).
    fn done(&self, status: u16, input_tokens: u64, output_tokens: u64, error: Option<&ApiError>) {
        let latency = self.started.elapsed();
        let provider = self.provider.as_deref().unwrap_or("-");
        let metrics = self.state.runtime.events().metrics();
        match &self.provider {
            Some(p) => metrics.request_done(p, status, latency),
            None => metrics.request_done(&Arc::from("-"), status, latency),
        }
        log::info!(
            request_id = self.request_id.as_str(),
            user = &*self.caller.user,
            provider = provider,
            account_id = self.account_id.as_deref().unwrap_or("-"),
            model = self.model.as_str(),
            status = status,
            latency_ms = latency.as_millis() as u64,
            input_tokens = input_tokens,
            output_tokens = output_tokens;
            "request done"
        );
        let cost =
            (input_tokens as f64 * self.prices.0 + output_tokens as f64 * self.prices.1) / 1e6;
        self.state.tracker.track(NewRequestLog {
            request_id: self.request_id.clone(),
            ts: crate::store::now(),
            provider_id: self.provider_id.as_deref().unwrap_or("").to_string(),
            account_id: self.account_id.as_deref().map(str::to_string),
            model: self.model.clone(),
            user_id: Some(self.caller.user_id.to_string()),
            method: "POST".to_string(),
            endpoint: format!("/v1{}", self.endpoint.path()),
            status_code: i32::from(status),
            latency_ms: latency.as_millis() as i64,
            input_tokens: input_tokens as i64,
            output_tokens: output_tokens as i64,
            success: status < 400,
            error_type: error.map(|e| error_type(e).to_string()),
            error_message: error.map(|e| e.to_string()),
            estimated_cost: cost,
        });
    }
}

/// How a failed request is classified in the statistics.
fn error_type(error: &ApiError) -> &'static str {
    match error {
        ApiError::UpstreamTimeout => "timeout",
        ApiError::QuotaExceeded { .. } => "quota_exceeded",
        ApiError::RateLimited { .. } => "rate_limited",
        other => other.code(),
    }
}

async fn proxy(
    endpoint: Endpoint,
    req: HttpRequest,
    payload: web::Payload,
    caller: Caller,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    // One access line per request: this worker hands its lines over in batches.
    crate::logging::batch_this_thread();
    let request_id = req
        .extensions()
        .get::<super::RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let mut record = Record {
        request_id,
        caller,
        endpoint,
        model: String::new(),
        started: Instant::now(),
        provider: None,
        provider_id: None,
        account_id: None,
        prices: (0.0, 0.0),
        state: state.clone(),
    };
    match forward(endpoint, payload, &state, &client, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            record.done(error.status_code().as_u16(), 0, 0, Some(&error));
            error.error_response()
        }
    }
}

async fn read_body(mut payload: web::Payload) -> Result<BytesMut, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("cannot read the body: {e}"), None))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reserves, forwards and settles; retries on other accounts where API.md says so.
async fn forward(
    endpoint: Endpoint,
    payload: web::Payload,
    state: &web::Data<AppState>,
    client: &awc::Client,
    record: &mut Record,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload).await?;
    let request = ProxyRequest::parse(endpoint, body.freeze())?;
    record.model = request.model.clone();
    let settings = state.upstream;
    let mut tried: Vec<Arc<str>> = Vec::new();
    let mut failures = 0u32;
    let mut last_failure: Option<ApiError> = None;
    // The upstream's answer that took an account out (401/403); only one per request.
    let mut took_out: Option<HttpResponse> = None;
    for _ in 0..MAX_ATTEMPTS {
        let acquired = state
            .runtime
            .acquire(
                &request.model,
                |spec| {
                    request.estimate(spec.upstream.tokenizer, spec.upstream.max_completion_tokens)
                },
                &tried,
            )
            .await;
        let lease = match acquired {
            Ok(lease) => lease,
            Err(AcquireError::ModelNotFound(model)) => return Err(ApiError::ModelNotFound(model)),
            Err(AcquireError::Refused(verdict)) => {
                if let Some(failure) = last_failure {
                    return Err(failure);
                }
                if let Some(answer) = took_out {
                    // No other account could serve: the upstream's own refusal says more than a
                    // cooldown would.
                    record.done(answer.status().as_u16(), 0, 0, None);
                    return Ok(answer);
                }
                let now = state.runtime.clock().now_ms();
                let param = match &verdict {
                    crate::domain::refusal::Verdict::Impossible { limit_value, .. } => {
                        // A request without its own bound got each provider's default.
                        let default_bound = state
                            .runtime
                            .registry()
                            .route(&request.model)
                            .iter()
                            .map(|(p, _)| p.spec.upstream.max_completion_tokens)
                            .min()
                            .unwrap_or(0);
                        request.too_large_param(*limit_value, default_bound)
                    }
                    _ => "messages",
                };
                return Err(ApiError::from_verdict(&verdict, now, param));
            }
        };
        tried.push(lease.account.id.clone());
        record.provider = Some(lease.provider.spec.name.clone());
        record.provider_id = Some(lease.provider.spec.id.clone());
        record.model = lease.model.to_string();
        record.account_id = Some(lease.account.id.clone());
        record.prices = lease
            .provider
            .spec
            .model(&lease.model)
            .map_or((0.0, 0.0), |m| (m.price_input, m.price_output));
        match attempt(&request, lease, state, client, record, took_out.is_none()).await {
            Attempt::Answered(response) => return Ok(response),
            Attempt::TryAnother => {}
            Attempt::TookOut(answer) => took_out = Some(answer),
            Attempt::Failed(error) => {
                failures += 1;
                if failures > settings.retries {
                    return Err(error);
                }
                last_failure = Some(error);
            }
        }
    }
    match (last_failure, took_out) {
        (Some(failure), _) => Err(failure),
        (None, Some(answer)) => {
            record.done(answer.status().as_u16(), 0, 0, None);
            Ok(answer)
        }
        (None, None) => Err(ApiError::NoAccountAvailable),
    }
}

enum Attempt {
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

fn feedback(outcome: UpstreamOutcome, started: Instant, headers: RateHeaders) -> Option<Feedback> {
    Some(Feedback {
        outcome,
        latency_ms: started.elapsed().as_millis() as u64,
        headers,
    })
}

/// The `usage` of an answer.
#[derive(serde::Deserialize)]
struct AnswerUsage {
    usage: Option<UsageFields>,
}

#[derive(serde::Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl UsageFields {
    /// (input, output): `total_tokens` minus the prompt when given, else prompt and completion.
    fn split(self) -> Option<(u64, u64)> {
        let input = self.prompt_tokens.unwrap_or(0);
        match self.total_tokens {
            Some(total) => Some((input, total.saturating_sub(input))),
            None => {
                let output = self.completion_tokens.unwrap_or(0);
                (input + output > 0).then_some((input, output))
            }
        }
    }
}

/// What the meter reads of one stream event: the usage, and the generated text (for when the
/// upstream reports no usage). Everything else is skipped by the scanner, never built.
#[derive(serde::Deserialize)]
struct StreamEvent<'a> {
    usage: Option<UsageFields>,
    #[serde(borrow)]
    choices: Option<Vec<StreamChoice<'a>>>,
}

#[derive(serde::Deserialize)]
struct StreamChoice<'a> {
    #[serde(borrow)]
    delta: Option<StreamDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct StreamDelta<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

async fn attempt(
    request: &ProxyRequest,
    lease: Reservation,
    state: &web::Data<AppState>,
    client: &awc::Client,
    record: &mut Record,
    may_take_out: bool,
) -> Attempt {
    let spec = &lease.provider.spec;
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
    let mut upstream = client
        .post(&url)
        .timeout(spec.upstream.timeout.unwrap_or(state.upstream.timeout))
        .insert_header((CONTENT_TYPE, "application/json"))
        .insert_header((spec.upstream.auth_header.as_str(), auth));
    for (name, value) in &credentials.headers {
        if !value.is_empty() {
            upstream = upstream.insert_header((name.as_str(), value.expose()));
        }
    }
    let body = request.upstream_body(&lease.model, spec.upstream.max_completion_tokens);
    let mut guard = lease.guard;
    // From here on the upstream may count the request, even if this future is dropped.
    guard.mark_sent();
    let started = Instant::now();
    let sent = upstream.send_body(body).await;
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
            guard.commit(
                Usage::Estimate,
                feedback(UpstreamOutcome::Failure, started, RateHeaders::default()),
            );
            return Attempt::Failed(ApiError::UpstreamTimeout);
        }
        Err(e) => {
            guard.commit(
                Usage::Estimate,
                feedback(UpstreamOutcome::Failure, started, RateHeaders::default()),
            );
            return Attempt::Failed(ApiError::Upstream {
                status: None,
                message: format!("the upstream connection failed: {e}"),
            });
        }
    };
    let status = response.status();
    let headers = rate_headers(
        response.headers(),
        state.runtime.clock().now_ms(),
        state.upstream.max_cooldown,
    );
    let remaining = (lease.remaining_requests, lease.remaining_tokens);
    if status.is_success() && request.stream {
        let tokenizer = spec.upstream.tokenizer;
        let meter = Meter::new(
            request.client_wants_stream_usage,
            tokenizer,
            request.prompt_tokens(tokenizer),
        );
        let stream = MeteredStream {
            upstream: Box::pin(response),
            guard: Some(guard),
            meter,
            idle: Box::pin(actix_rt::time::sleep(state.upstream.stream_idle_timeout)),
            idle_timeout: state.upstream.stream_idle_timeout,
            renew: Box::pin(actix_rt::time::interval(state.renew_every)),
            started,
            headers,
            record: Some(record.clone()),
        };
        let mut builder = HttpResponse::build(StatusCode::OK);
        builder
            .insert_header((CONTENT_TYPE, "text/event-stream"))
            .insert_header(("cache-control", "no-cache"));
        add_quota_headers(
            &mut builder,
            &lease.provider.spec.name,
            &lease.account.id,
            remaining,
        );
        return Attempt::Answered(builder.streaming(stream));
    }
    let body = match response.body().limit(MAX_ANSWER_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            guard.commit(
                Usage::Estimate,
                feedback(UpstreamOutcome::Failure, started, headers),
            );
            return Attempt::Failed(ApiError::Upstream {
                status: Some(status.as_u16()),
                message: format!("reading the upstream's answer failed: {e}"),
            });
        }
    };
    match status.as_u16() {
        200..=299 => {
            // Only `usage` is read; serde skips the rest without building it.
            let parsed: Option<AnswerUsage> = serde_json::from_slice(&body).ok();
            let (usage, input, output) = match parsed.and_then(|a| a.usage).and_then(|u| u.split())
            {
                Some((input, output)) => (Usage::Reported(input + output), input, output),
                // No usage in a success: the estimate stands (counted, never under-counted).
                None => (Usage::Estimate, lease.estimate, 0),
            };
            guard.commit(usage, feedback(UpstreamOutcome::Success, started, headers));
            record.done(status.as_u16(), input, output, None);
            let mut builder = HttpResponse::build(status);
            builder.insert_header((CONTENT_TYPE, "application/json"));
            add_quota_headers(
                &mut builder,
                &lease.provider.spec.name,
                &lease.account.id,
                remaining,
            );
            Attempt::Answered(builder.body(body))
        }
        429 => {
            let now = state.runtime.clock().now_ms();
            let wait = wait_after_429(response.headers(), &body, now, state.upstream.max_cooldown);
            let outcome = UpstreamOutcome::RateLimited {
                retry_after_ms: wait.map(|w| w.ms),
                capped: wait.is_some_and(|w| w.capped()),
            };
            guard.commit(Usage::RequestOnly, feedback(outcome, started, headers));
            Attempt::TryAnother
        }
        401 | 403 if may_take_out => {
            let outcome = if status.as_u16() == 401 {
                UpstreamOutcome::Unauthorized
            } else {
                UpstreamOutcome::Forbidden {
                    model: lease.model.clone(),
                    cooldown_ms: duration_ms(state.upstream.forbidden_cooldown),
                }
            };
            guard.commit(Usage::RequestOnly, feedback(outcome, started, headers));
            Attempt::TookOut(as_is(
                status,
                body,
                &lease.provider.spec.name,
                &lease.account.id,
                remaining,
            ))
        }
        500..=599 => {
            guard.commit(
                Usage::RequestOnly,
                feedback(UpstreamOutcome::Failure, started, headers),
            );
            let detail = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            Attempt::Failed(ApiError::Upstream {
                status: Some(status.as_u16()),
                message: format!("the upstream answered {status}: {detail}"),
            })
        }
        _ => {
            // The request itself was wrong for the upstream, or a second 401/403 in this request
            // (which takes nothing out): its answer goes back as it is.
            let health = (!matches!(status.as_u16(), 401 | 403))
                .then(|| feedback(UpstreamOutcome::Success, started, headers))
                .flatten();
            guard.commit(Usage::RequestOnly, health);
            record.done(status.as_u16(), 0, 0, None);
            Attempt::Answered(as_is(
                status,
                body,
                &lease.provider.spec.name,
                &lease.account.id,
                remaining,
            ))
        }
    }
}

/// An upstream answer for the client as it came, with the quota headers.
fn as_is(
    status: StatusCode,
    body: Bytes,
    provider: &str,
    account_id: &str,
    remaining: (Option<u64>, Option<u64>),
) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    builder.insert_header((CONTENT_TYPE, "application/json"));
    add_quota_headers(&mut builder, provider, account_id, remaining);
    builder.body(body)
}

fn add_quota_headers(
    builder: &mut actix_web::HttpResponseBuilder,
    provider: &str,
    account_id: &str,
    remaining: (Option<u64>, Option<u64>),
) {
    builder.insert_header(("x-quota-provider", provider));
    builder.insert_header(("x-quota-account", account_id));
    if let Some(n) = remaining.0 {
        builder.insert_header(("x-ratelimit-remaining-requests", n.to_string()));
    }
    if let Some(n) = remaining.1 {
        builder.insert_header(("x-ratelimit-remaining-tokens", n.to_string()));
    }
}

// ------------------------------------------------------------------------------------------------
// Streaming
// ------------------------------------------------------------------------------------------------

/// Reads a server-sent-event stream as it passes: keeps the usage the upstream reports, counts the
/// generated content (for when it reports none), and removes the usage-only chunk the gateway
/// asked for when the client did not.
struct Meter {
    buffer: BytesMut,
    keep_usage_chunk: bool,
    tokenizer: Tokenizer,
    prompt_estimate: u64,
    usage: Option<(u64, u64)>,
    generated: u64,
}

impl Meter {
    fn new(keep_usage_chunk: bool, tokenizer: Tokenizer, prompt_estimate: u64) -> Meter {
        Meter {
            buffer: BytesMut::new(),
            keep_usage_chunk,
            tokenizer,
            prompt_estimate,
            usage: None,
            generated: 0,
        }
    }

    /// Takes a chunk of the upstream's bytes; returns the complete events to pass on.
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.buffer.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.buffer) {
            let event = self.buffer.split_to(end);
            if self.inspect(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// Whatever is left when the upstream ends (an unterminated last event).
    fn rest(&mut self) -> Bytes {
        let event = self.buffer.split();
        if !event.is_empty() && self.inspect(&event) {
            return event.freeze();
        }
        Bytes::new()
    }

    /// Reads one event; returns whether it goes to the client.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let mut forward = true;
        for line in event.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<StreamEvent<'_>>(data) else {
                continue;
            };
            let no_choices = event.choices.as_ref().is_none_or(|c| c.is_empty());
            if let Some(usage) = event.usage.and_then(UsageFields::split) {
                self.usage = Some(usage);
                if no_choices && !self.keep_usage_chunk {
                    forward = false;
                }
            }
            for choice in event.choices.iter().flatten() {
                if let Some(content) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    self.generated += estimate::count(self.tokenizer, content);
                }
            }
        }
        forward
    }

    /// What to commit: the reported usage, else the prompt estimate plus what was generated.
    fn settlement(&self) -> (Usage, u64, u64) {
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

type UpstreamBody = Pin<Box<dyn Stream<Item = Result<Bytes, awc::error::PayloadError>>>>;

/// The upstream's stream passed to the client as it arrives, metered; the reservation is renewed
/// while it runs and settled when it ends — or when it is dropped because the client left.
struct MeteredStream {
    upstream: UpstreamBody,
    guard: Option<crate::actors::ReservationGuard>,
    meter: Meter,
    idle: Pin<Box<actix_rt::time::Sleep>>,
    idle_timeout: Duration,
    renew: Pin<Box<actix_rt::time::Interval>>,
    started: Instant,
    headers: RateHeaders,
    record: Option<Record>,
}

impl MeteredStream {
    fn settle(&mut self, outcome: UpstreamOutcome) {
        if let Some(guard) = self.guard.take() {
            let (usage, input, output) = self.meter.settlement();
            guard.commit(usage, feedback(outcome, self.started, self.headers));
            if let Some(record) = self.record.take() {
                record.done(200, input, output, None);
            }
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
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
                    let out = this.meter.feed(&chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    log::warn!(event = "stream_broken"; "the upstream stream broke: {e}");
                    this.settle(UpstreamOutcome::Failure);
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    let rest = this.meter.rest();
                    this.settle(UpstreamOutcome::Success);
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        log::warn!(event = "stream_idle"; "the upstream stream went silent; closing it");
                        this.settle(UpstreamOutcome::Failure);
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // The client left mid-stream: commit what was generated so far (or reported).
        if self.guard.is_some() {
            log::info!(event = "client_disconnected"; "the client left a stream; committing what was generated");
            self.settle(UpstreamOutcome::Success);
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
        let mut out = hidden.feed(&events.as_bytes()[..30]).to_vec();
        out.extend_from_slice(&hidden.feed(&events.as_bytes()[30..]));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Hello") && text.contains("[DONE]"));
        assert!(!text.contains("usage"), "{text}");
        assert_eq!(hidden.settlement().0, Usage::Reported(7));

        let mut shown = Meter::new(true, Tokenizer::Bytes, 99);
        let text = String::from_utf8(shown.feed(events.as_bytes()).to_vec()).unwrap();
        assert!(text.contains("\"usage\""));
    }

    #[test]
    fn without_reported_usage_the_meter_counts_what_was_generated() {
        let mut m = Meter::new(false, Tokenizer::Bytes, 10);
        m.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\r\n\r\n");
        assert_eq!(m.settlement(), (Usage::Reported(14), 10, 4));
    }
}
