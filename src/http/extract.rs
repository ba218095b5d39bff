//! Reading a request's query string and JSON body, with every refusal in the error envelope
//! (`param` naming the field at fault) rather than actix's plain text.

use actix_web::{web, HttpRequest};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Largest JSON body accepted (an admin provider with many models stays far below).
const BODY_LIMIT: usize = 1024 * 1024;

/// The query string as `T`; a bad one is a 400 envelope (not actix's plain text).
pub fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            let message = e.to_string();
            let param = field_of(&message);
            ApiError::invalid(format!("bad query string: {message}"), param.as_deref())
        })
}

/// Reads the body as JSON (at most `BODY_LIMIT`, 1 MiB); malformed JSON is a 400 envelope.
pub async fn read_json(payload: web::Payload) -> Result<Value, ApiError> {
    let bytes = payload
        .to_bytes_limited(BODY_LIMIT)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit: BODY_LIMIT })?
        .map_err(|e| ApiError::invalid(format!("cannot read the body: {e}"), None))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    match nul_at(&value, "") {
        Some(param) => Err(ApiError::invalid(
            "a text holds a NUL character (\\u0000), which no name, key or value may contain",
            Some(&param),
        )),
        None => Ok(value),
    }
}

/// [`read_json`] for a body that must be a JSON object (a patch, a body to complete).
pub async fn read_object(payload: web::Payload) -> Result<Map<String, Value>, ApiError> {
    match read_json(payload).await? {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::invalid("the body must be a JSON object", None)),
    }
}

/// Where in `value` a string (or a key) holds a NUL, as a `param` path (`models[1].name`). Every
/// admin body goes to the store, and Postgres refuses NUL in text: refused here, by name.
fn nul_at(value: &Value, at: &str) -> Option<String> {
    let join = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => {
            Some(if at.is_empty() { ".".into() } else { at.into() })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, &format!("{at}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_at(v, &join(k))
            }
        }),
        _ => None,
    }
}

/// A small body read directly; the field at fault becomes `param`.
pub fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let param = if path == "." {
            field_of(&message)
        } else {
            Some(path)
        };
        ApiError::invalid(message, param.as_deref())
    })
}

/// The field a message names: serde's `missing field `x`` / `unknown field `x``, or the config
/// reader's `missing x (…)`.
pub fn field_of(message: &str) -> Option<String> {
    let quoted = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|start| message.split_once(start))
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field.to_string());
    quoted.or_else(|| {
        message
            .strip_prefix("missing ")
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|word| word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_string)
    })
}
