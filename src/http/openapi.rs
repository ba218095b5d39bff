//! `GET /openapi.json`: the OpenAPI 3 document of every route, generated from the code. Each
//! handler carries its `#[utoipa::path]` next to its actix route macro (so path and method come
//! from the route itself), and every answer is a `ToSchema` type: the document cannot drift from
//! what is served.
//!
//! The client API and the operational routes are handled elsewhere (`proxy`, `http::mod`); until
//! their handlers carry their own `#[utoipa::path]`, they are described here on placeholder
//! functions ([`client`], [`operations`]) that are never routed.

use std::sync::OnceLock;

use actix_web::{get, web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{admin, stats};

/// Registers `GET /openapi.json`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(document);
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "quotagate",
        description = "One OpenAI-compatible endpoint over a pool of LLM provider accounts, with exact quotas and rate limits."
    ),
    paths(
        crate::http::proxy::chat_completions,
        crate::http::proxy::embeddings,
        crate::http::proxy::models,
        stats::usage,
        stats::pool,
        stats::quota,
        stats::ratelimit,
        stats::provider,
        stats::top_models,
        stats::errors,
        admin::list_providers,
        admin::create_provider,
        admin::get_provider,
        admin::patch_provider,
        admin::delete_provider,
        admin::get_provider_limits,
        admin::put_provider_limits,
        admin::reset_provider,
        admin::list_accounts,
        admin::create_account,
        admin::get_account,
        admin::patch_account,
        admin::delete_account,
        admin::reset_account,
        admin::list_keys,
        admin::create_key,
        admin::revoke_key,
        admin::flush,
        crate::http::metrics,
        crate::http::healthz,
        crate::http::readyz,
        crate::http::status_page::index,
        crate::http::status_page::live,
        crate::http::status_page::login,
        crate::http::status_page::logout,
        crate::http::status_page::status_json,
        document,
    ),
    modifiers(&BearerTokens),
    tags(
        (name = "client", description = "OpenAI-compatible API (client key)"),
        (name = "stats", description = "Usage history and live quota state (admin token; a client key reads its own usage)"),
        (name = "admin", description = "Providers, accounts, limits and client keys (admin token); changes apply at once"),
        (name = "operations", description = "Health, readiness, metrics, the status page and this document"),
    )
)]
pub struct ApiDoc;

/// The document as served (built once).
pub fn json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serialises")
    })
}

#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3)", content_type = "application/json"))
)]
#[get("/openapi.json")]
async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(json())
}

/// The error envelope of every error answer (OpenAI's shape, with the seed's codes): `message`,
/// `type`, `param` and `code` always, the code's extra fields where API.md lists them.
#[allow(dead_code)] // documents `ApiError::body`
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

/// The two bearer tokens: the admin token and client keys.
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "admin_token",
                "The admin token: `Authorization: Bearer <admin token>`",
            ),
            (
                "client_key",
                "A client key: `Authorization: Bearer <client key>`",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The client API (OpenAI-compatible). These functions only describe the routes, which are
/// served by the proxy; move each description onto its real handler.
pub mod client {
    use super::*;

    /// An OpenAI chat request; fields other than these are passed upstream as they are.
    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct ChatRequest {
        /// A model a provider lists, or `provider/model`.
        model: String,
        messages: Vec<ChatMessage>,
        /// Answer as server-sent events.
        stream: Option<bool>,
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        n: Option<u64>,
    }

    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct ChatMessage {
        role: String,
        /// Text, or OpenAI's content parts.
        #[schema(value_type = Object)]
        content: serde_json::Value,
    }

    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct EmbeddingsRequest {
        model: String,
        /// A string, an array of strings, or token arrays.
        #[schema(value_type = Object)]
        input: serde_json::Value,
    }

    /// OpenAI's model list.
    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct ModelList {
        /// `list`.
        object: String,
        data: Vec<ModelEntry>,
    }

    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct ModelEntry {
        id: String,
        /// `model`.
        object: String,
        /// The provider.
        owned_by: String,
    }
}

/// The schemas of the health and readiness answers.
pub mod operations {
    use super::*;

    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct Health {
        /// `ok`.
        status: String,
    }

    #[allow(dead_code)]
    #[derive(ToSchema)]
    pub struct Readiness {
        ready: bool,
        /// `ok` or `unhealthy` (details only in the log).
        database: String,
        /// `ok`, `unhealthy` or `disabled` (details only in the log).
        redis: String,
        /// `local` (no Redis), `shared` (the account ledgers live in Redis, for every instance)
        /// or `degraded` (Redis out of reach: this instance serves within its share).
        ledger: String,
        pools: usize,
        accounts: usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_envelope_always_has_message_type_param_and_code() {
        let doc: serde_json::Value = serde_json::from_str(json()).unwrap();
        let detail = &doc["components"]["schemas"]["ErrorDetail"];
        let required: Vec<&str> = detail["required"]
            .as_array()
            .unwrap_or_else(|| panic!("no required list: {detail}"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for field in ["message", "type", "param", "code"] {
            assert!(required.contains(&field), "{field} not required: {detail}");
        }
        let param = detail["properties"]["param"].to_string();
        assert!(param.contains("null"), "param is nullable: {param}");
    }
}
