//! The access record of one client request: what it leaves behind when it is over — one
//! access-log line, the request metrics and one request-log row — written exactly once, whatever
//! way the request ends.
//!
//! A record that was never finished when it is dropped belongs to a request whose client went
//! away before the answer was complete (its handler or its stream was dropped): it is written with
//! status `499` and error type `client_closed` (API.md, "Logs"), and counts in the error
//! statistics.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, ResponseError as _};

use super::auth::Caller;
use super::error::ApiError;
use super::openai::Endpoint;
use super::AppState;
use crate::store::logs::NewRequestLog;

/// The status a request is logged with when its client went away first (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Why a request failed, as the statistics classify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<'a> {
    /// `rate_limited`, `timeout`, `upstream_error`, `stream_broken`, `client_closed`, …
    pub kind: &'static str,
    pub message: Cow<'a, str>,
}

impl<'a> Failure<'a> {
    pub fn new(kind: &'static str, message: impl Into<Cow<'a, str>>) -> Failure<'a> {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl<'a> From<&'a ApiError> for Failure<'static> {
    fn from(error: &'a ApiError) -> Failure<'static> {
        let kind = match error {
            ApiError::UpstreamTimeout => "timeout",
            ApiError::QuotaExceeded { .. } => "quota_exceeded",
            ApiError::RateLimited { .. } => "rate_limited",
            other => other.code(),
        };
        Failure::new(kind, error.to_string())
    }
}

/// What is known about one request so far.
pub struct AccessRecord {
    request_id: String,
    caller: Caller,
    endpoint: Endpoint,
    pub model: String,
    started: Instant,
    pub provider: Option<Arc<str>>,
    pub provider_id: Option<Arc<str>>,
    pub account_id: Option<Arc<str>>,
    /// Prices per million tokens (input, output) of the model that served.
    pub prices: (f64, f64),
    state: web::Data<AppState>,
    finished: bool,
}

impl AccessRecord {
    pub fn new(
        request_id: String,
        caller: Caller,
        endpoint: Endpoint,
        state: web::Data<AppState>,
    ) -> AccessRecord {
        AccessRecord {
            request_id,
            caller,
            endpoint,
            model: String::new(),
            started: Instant::now(),
            provider: None,
            provider_id: None,
            account_id: None,
            prices: (0.0, 0.0),
            state,
            finished: false,
        }
    }

    /// A refusal or failure answered with `error`.
    pub fn failed(mut self, error: &ApiError) {
        self.finish(error.status_code().as_u16(), 0, 0, Some(error.into()));
    }

    /// The request is over: the access-log line, the metrics and the request-log row (handed
    /// over in batches; a full tracker drops and counts rather than wait).
    pub fn finish(
        &mut self,
        status: u16,
        input_tokens: u64,
        output_tokens: u64,
        failure: Option<Failure<'_>>,
    ) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
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
            output_tokens = output_tokens,
            error = failure.as_ref().map(|f| f.kind);
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
            success: status < 400 && failure.is_none(),
            error_type: failure.as_ref().map(|f| f.kind.to_string()),
            error_message: failure.map(|f| f.message.into_owned()),
            estimated_cost: cost,
        });
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(
                CLIENT_CLOSED,
                0,
                0,
                Some(Failure::new(
                    "client_closed",
                    "the client went away before the answer was complete",
                )),
            );
        }
    }
}
