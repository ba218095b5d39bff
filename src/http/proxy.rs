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

use std::sync::Arc;

use actix_web::{get, post, web, HttpMessage as _, HttpRequest, HttpResponse, ResponseError as _};
use bytes::BytesMut;
use futures_util::StreamExt as _;
use serde_json::json;

use super::access::AccessRecord;
use super::attempt::{attempt, Attempt};
use super::auth::{Caller, ClientKey};
use super::error::ApiError;
use super::openai::{Endpoint, ProxyRequest};
use super::AppState;
use crate::actors::AcquireError;

/// Largest request body accepted (bigger is a 413).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
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
    // Dropped unfinished (the client left): written as 499 `client_closed`.
    let mut record = Some(AccessRecord::new(
        request_id,
        caller,
        endpoint,
        state.clone(),
    ));
    let length = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match forward(endpoint, (payload, length), &state, &client, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            if let Some(record) = record {
                record.failed(&error);
            }
            error.error_response()
        }
    }
}

/// The request body, at most [`MAX_BODY_BYTES`]; sized once from `Content-Length` when the
/// client gave one (growing by doubling would copy a large body several times).
async fn read_body(mut payload: web::Payload, length: Option<usize>) -> Result<BytesMut, ApiError> {
    let mut body = BytesMut::with_capacity(length.unwrap_or(0).min(MAX_BODY_BYTES));
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
    (payload, length): (web::Payload, Option<usize>),
    state: &web::Data<AppState>,
    client: &awc::Client,
    record: &mut Option<AccessRecord>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, length).await?;
    let request = ProxyRequest::parse(endpoint, body.freeze())?;
    if let Some(record) = record.as_mut() {
        record.model = request.model.clone();
    }
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
                    if let Some(record) = record.as_mut() {
                        record.finish(answer.status().as_u16(), 0, 0, None);
                    }
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
        if let Some(record) = record.as_mut() {
            record.provider = Some(lease.provider.spec.name.clone());
            record.provider_id = Some(lease.provider.spec.id.clone());
            record.model = lease.model.to_string();
            record.account_id = Some(lease.account.id.clone());
            record.prices = lease
                .provider
                .spec
                .model(&lease.model)
                .map_or((0.0, 0.0), |m| (m.price_input, m.price_output));
        }
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
            if let Some(record) = record.as_mut() {
                record.finish(answer.status().as_u16(), 0, 0, None);
            }
            Ok(answer)
        }
        (None, None) => Err(ApiError::NoAccountAvailable),
    }
}
