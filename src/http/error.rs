//! The one place where errors become HTTP answers: OpenAI-shaped bodies with the seed's codes.
//!
//! ```json
//! {"error": {"message": "…", "type": "…", "param": null, "code": "quota_exceeded", "reset_at": "…"}}
//! ```
//!
//! `message`, `type`, `param` and `code` are always there, as in OpenAI's own errors (`param` is
//! a real JSON `null` when no field is at fault); the codes' extra fields follow API.md.
//!
//! Internal details (database messages, panics) are logged, never returned.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::actors::registry::Lookup;
use crate::actors::system::QueryError;
use crate::domain::refusal::Verdict;
use crate::domain::time::{to_datetime, Millis};
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: a bad body, a bad field (`param` names it), a bad query.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// 413: the body is larger than the limit.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 401: missing or unknown client key (or admin token).
    #[error("{0}")]
    InvalidApiKey(String),
    /// 403: a client key asking for what only the admin may see.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `model_not_found`.
    #[error("no provider serves model `{0}`")]
    ModelNotFound(String),
    /// 404 for an unknown id or name in the admin and stats APIs.
    #[error("{0}")]
    NotFound(String),
    /// 409: a duplicate name.
    #[error("{0}")]
    Conflict(String),
    /// 429 `rate_limit_exceeded`.
    #[error("rate limit reached ({limit}); retry after {retry_after:.3} s")]
    RateLimited {
        limit: String,
        retry_after: f64,
        lower_bound: bool,
    },
    /// 429 `quota_exceeded`: `reset_at` is the earliest quota reset of the accounts serving the
    /// model; `retry_after` the whole seconds from the refusal to it, rounded up (the
    /// `Retry-After` header).
    #[error("quota exhausted on every account serving this model")]
    QuotaExceeded { reset_at: Millis, retry_after: u64 },
    /// 503 `no_account_available`.
    #[error("no active account serves this model")]
    NoAccountAvailable,
    /// 502 `upstream_error`.
    #[error("{message}")]
    Upstream {
        status: Option<u16>,
        message: String,
    },
    /// 504 `upstream_timeout`.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// 503: a dependency (the database) is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug; the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    /// The seed's error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::PayloadTooLarge { .. } => "invalid_request",
            ApiError::InvalidApiKey(_) => "invalid_api_key",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::QuotaExceeded { .. } => "quota_exceeded",
            ApiError::NoAccountAvailable => "no_account_available",
            ApiError::Upstream { .. } => "upstream_error",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// OpenAI's error `type`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound(_)
            | ApiError::Conflict(_) => "invalid_request_error",
            ApiError::InvalidApiKey(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::QuotaExceeded { .. } => "insufficient_quota",
            ApiError::Upstream { .. } | ApiError::UpstreamTimeout => "upstream_error",
            ApiError::NoAccountAvailable | ApiError::Unavailable(_) | ApiError::Internal(_) => {
                "server_error"
            }
        }
    }

    /// The error body.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("message".into(), json!(self.to_string()));
        error.insert("type".into(), json!(self.kind()));
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        };
        error.insert("param".into(), json!(param));
        error.insert("code".into(), json!(self.code()));
        match self {
            ApiError::RateLimited {
                retry_after,
                lower_bound,
                limit,
            } => {
                error.insert("retry_after".into(), json!(retry_after));
                error.insert("limit".into(), json!(limit));
                if *lower_bound {
                    // Work in flight decides the real time: this is the earliest it can be.
                    error.insert("retry_after_is_lower_bound".into(), json!(true));
                }
            }
            ApiError::QuotaExceeded { reset_at, .. } => {
                error.insert(
                    "reset_at".into(),
                    json!(to_datetime(*reset_at).to_rfc3339()),
                );
            }
            ApiError::Upstream { status, .. } => {
                error.insert("upstream_status".into(), json!(status));
            }
            _ => {}
        }
        json!({ "error": error })
    }

    /// A refusal of the runtime, as the client sees it (`now` to turn times into seconds).
    pub fn from_verdict(verdict: &Verdict, now: Millis, param: &str) -> ApiError {
        match verdict {
            Verdict::RateLimited {
                limit,
                retry_at,
                lower_bound,
            } => ApiError::RateLimited {
                limit: limit.to_string(),
                retry_after: ((retry_at - now).max(0) as f64) / 1000.0,
                lower_bound: *lower_bound,
            },
            Verdict::QuotaExceeded { reset_at } => ApiError::QuotaExceeded {
                reset_at: *reset_at,
                // Whole seconds, rounded up: never earlier than the reset.
                retry_after: u64::try_from(reset_at.saturating_sub(now).max(0))
                    .unwrap_or(0)
                    .div_ceil(1000),
            },
            Verdict::Impossible {
                limit,
                limit_value,
                need,
            } => ApiError::invalid(
                format!(
                    "this request needs up to {need} tokens, more than the limit {limit} ({limit_value}) \
                     of every account serving the model: lower max_tokens or shorten the prompt"
                ),
                Some(param),
            ),
            Verdict::NoAccountAvailable => ApiError::NoAccountAvailable,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::NoAccountAvailable | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            log::error!(event = "internal_error"; "{detail}");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up, as the header requires.
                response
                    .insert_header((header::RETRY_AFTER, retry_after.ceil().max(1.0).to_string()));
            }
            ApiError::QuotaExceeded { retry_after, .. } => {
                response.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

/// The error envelope of every error answer (OpenAI's shape, with the seed's codes): `message`,
/// `type`, `param` and `code` always, the code's extra fields where API.md lists them.
#[allow(dead_code)] // documents `ApiError::body` in the OpenAPI document
#[derive(ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ErrorDetail {
    message: String,
    /// OpenAI's error type (`invalid_request_error`, `rate_limit_error`, …).
    #[schema(rename = "type")]
    kind: String,
    /// `invalid_request`, `invalid_api_key`, `model_not_found`, `rate_limit_exceeded`,
    /// `quota_exceeded`, `no_account_available`, `upstream_error`, `upstream_timeout`,
    /// `not_found`, `conflict`, `forbidden`, …
    code: String,
    /// The field at fault (400); always present, `null` when no field is at fault.
    #[schema(required = true)]
    param: Option<String>,
    /// Seconds (429 `rate_limit_exceeded`).
    retry_after: Option<f64>,
    /// When the quota resets, RFC 3339 (429 `quota_exceeded`).
    reset_at: Option<String>,
    /// The upstream's status (502).
    upstream_status: Option<u16>,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::Invalid(message) => ApiError::invalid(message, None),
            // The last line of defence: every entry point refuses NUL before the store.
            e if crate::store::is_nul_refusal(&e) => {
                ApiError::invalid("text must not contain a NUL character", None)
            }
            e if e.is_transient() => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<Lookup> for ApiError {
    fn from(e: Lookup) -> Self {
        match e {
            Lookup::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            ambiguous @ Lookup::Ambiguous { .. } => ApiError::invalid(ambiguous.to_string(), None),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Lookup(l) => l.into(),
            QueryError::Stopped => ApiError::Unavailable("the runtime is stopping".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody as _;

    fn body_of(e: &ApiError) -> Value {
        let bytes = e.error_response().into_body().try_into_bytes().unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_rate_limit_carries_seconds_and_a_rounded_up_header() {
        let e = ApiError::RateLimited {
            limit: "rpm".into(),
            retry_after: 1.2,
            lower_bound: false,
        };
        let response = e.error_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers().get("retry-after").unwrap(), "2");
        let body = body_of(&e);
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["retry_after"], 1.2);
    }

    #[test]
    fn every_code_of_the_table_has_its_status() {
        let cases = [
            (
                ApiError::invalid("x", Some("model")),
                400,
                "invalid_request",
            ),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                413,
                "invalid_request",
            ),
            (ApiError::InvalidApiKey("no".into()), 401, "invalid_api_key"),
            (ApiError::ModelNotFound("m".into()), 404, "model_not_found"),
            (
                ApiError::QuotaExceeded {
                    reset_at: 0,
                    retry_after: 0,
                },
                429,
                "quota_exceeded",
            ),
            (ApiError::NoAccountAvailable, 503, "no_account_available"),
            (
                ApiError::Upstream {
                    status: Some(500),
                    message: "x".into(),
                },
                502,
                "upstream_error",
            ),
            (ApiError::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status_code().as_u16(), status, "{e:?}");
            assert_eq!(body_of(&e)["error"]["code"], code);
        }
        assert_eq!(
            body_of(&ApiError::invalid("x", Some("model")))["error"]["param"],
            "model"
        );
        assert_eq!(
            body_of(&ApiError::QuotaExceeded {
                reset_at: 0,
                retry_after: 0
            })["error"]["reset_at"],
            "1970-01-01T00:00:00+00:00"
        );
        assert_eq!(
            body_of(&ApiError::Upstream {
                status: Some(503),
                message: "x".into()
            })["error"]["upstream_status"],
            503
        );
    }

    /// One of each variant.
    fn every_variant() -> Vec<ApiError> {
        vec![
            ApiError::invalid("x", Some("model")),
            ApiError::invalid("x", None),
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::InvalidApiKey("no".into()),
            ApiError::Forbidden("no".into()),
            ApiError::ModelNotFound("m".into()),
            ApiError::NotFound("x".into()),
            ApiError::Conflict("x".into()),
            ApiError::RateLimited {
                limit: "cooldown".into(),
                retry_after: 9.95,
                lower_bound: false,
            },
            ApiError::QuotaExceeded {
                reset_at: 0,
                retry_after: 0,
            },
            ApiError::NoAccountAvailable,
            ApiError::Upstream {
                status: None,
                message: "x".into(),
            },
            ApiError::UpstreamTimeout,
            ApiError::Unavailable("x".into()),
            ApiError::Internal("x".into()),
        ]
    }

    #[test]
    fn every_error_has_message_type_param_and_code_with_real_nulls() {
        for e in every_variant() {
            let body = body_of(&e);
            let error = body["error"].as_object().unwrap();
            for field in ["message", "type", "param", "code"] {
                assert!(error.contains_key(field), "{field} missing: {body}");
            }
            assert!(error["message"].is_string() && error["type"].is_string());
            assert!(error["code"].is_string(), "{body}");
            let param_ok = error["param"].is_null() || error["param"].is_string();
            assert!(param_ok, "{body}");
            assert!(!body.to_string().contains("\"None\""), "{body}");
        }
        // The example of the issue: a cooldown refusal.
        let cooldown = body_of(&ApiError::RateLimited {
            limit: "cooldown".into(),
            retry_after: 9.95,
            lower_bound: false,
        });
        assert_eq!(cooldown["error"]["param"], Value::Null);
        assert_eq!(
            body_of(&ApiError::invalid("x", Some("model")))["error"]["param"],
            "model"
        );
    }

    #[test]
    fn quota_exceeded_says_when_to_retry_in_whole_seconds_to_the_reset() {
        let verdict = Verdict::QuotaExceeded { reset_at: 100_500 };
        let e = ApiError::from_verdict(&verdict, 10_000, "messages");
        let response = e.error_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers().get("retry-after").unwrap(), "91");
        let at_reset = ApiError::from_verdict(&verdict, 100_500, "messages");
        assert_eq!(
            at_reset
                .error_response()
                .headers()
                .get("retry-after")
                .unwrap(),
            "0"
        );
    }

    #[test]
    fn internal_details_are_not_returned() {
        let body = body_of(&ApiError::Internal("db password wrong".into()));
        assert_eq!(body["error"]["message"], "internal error");
    }
}
