//! `GET /openapi.json`: the OpenAPI 3 document of every route ([`super::ApiDoc`]), generated from
//! the code. Each handler carries its `#[utoipa::path]` next to its actix route macro (so path and
//! method come from the route itself), and every answer is a `ToSchema` type: the document cannot
//! drift from what is served.
//!
//! Also here: the two bearer-token schemes, and the schemas of the client API's bodies ([`client`]),
//! which the proxy forwards without a type of its own.

use std::sync::OnceLock;

use actix_web::{get, web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::ApiDoc;
// The proxy's annotations name the error envelope here; it lives beside `ApiError`.
pub use super::error::ErrorBody;

/// Registers `GET /openapi.json`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(document);
}

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
pub(super) async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(json())
}

/// The two bearer tokens: the admin token and client keys.
pub(super) struct BearerTokens;

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

/// The bodies of the client API (OpenAI-compatible), for the document only: the proxy reads the
/// few fields it needs from the raw bytes (see `super::openai`) and forwards the rest untouched.
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
