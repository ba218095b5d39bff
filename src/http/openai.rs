//! The OpenAI request bodies the gateway reads: validated field by field (a bad field is a 400
//! naming it in `param`), kept as JSON so everything else is forwarded unchanged, and measured for
//! the reservation estimate.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::domain::estimate;
use crate::domain::Tokenizer;

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    pub endpoint: Endpoint,
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk of a stream itself.
    pub client_wants_stream_usage: bool,
    /// `max_completion_tokens` / `max_tokens` of the request.
    pub completion_bound: Option<u64>,
    /// `n` (choices), at least 1.
    pub choices: u64,
    /// The texts whose size is the prompt, and how many messages carry them.
    texts: Vec<String>,
    messages: usize,
}

/// Most choices a request may ask for.
const MAX_CHOICES: u64 = 128;

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

fn positive_integer(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(
                format!("`{field}` must be a positive integer"),
                field,
            )),
        },
    }
}

impl ProxyRequest {
    /// Parses and validates a body for `endpoint`.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<ProxyRequest, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
        let Value::Object(body) = value else {
            return Err(ApiError::invalid("the body must be a JSON object", None));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
            Some(_) => return Err(invalid("`model` must be a non-empty string", "model")),
            None => return Err(invalid("`model` is required", "model")),
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("`stream` must be a boolean", "stream")),
        };
        let client_wants_stream_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(invalid(
                        "`stream_options.include_usage` must be a boolean",
                        "stream_options",
                    ))
                }
            },
            Some(_) => {
                return Err(invalid(
                    "`stream_options` must be an object",
                    "stream_options",
                ))
            }
        };
        let completion_bound = match positive_integer(&body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => positive_integer(&body, "max_tokens")?,
        };
        let choices = positive_integer(&body, "n")?.unwrap_or(1);
        if choices > MAX_CHOICES {
            return Err(invalid(format!("`n` must be at most {MAX_CHOICES}"), "n"));
        }
        let (texts, messages) = match endpoint {
            Endpoint::Chat => chat_texts(&body)?,
            Endpoint::Embeddings => (embedding_texts(&body)?, 0),
        };
        Ok(ProxyRequest {
            endpoint,
            body,
            model,
            stream: stream && endpoint == Endpoint::Chat,
            client_wants_stream_usage,
            completion_bound,
            choices,
            texts,
            messages,
        })
    }

    /// The prompt's size by `tokenizer` (plus per-message overheads for chat).
    pub fn prompt_tokens(&self, tokenizer: Tokenizer) -> u64 {
        let texts = self.texts.iter().map(String::as_str);
        match self.endpoint {
            Endpoint::Chat => estimate::chat_prompt(tokenizer, self.messages, texts),
            Endpoint::Embeddings => texts.map(|t| estimate::count(tokenizer, t)).sum(),
        }
    }

    /// The completion bound in force for a provider whose default is `provider_bound`.
    pub fn completion_bound(&self, provider_bound: u64) -> u64 {
        match self.endpoint {
            Endpoint::Chat => self.completion_bound.unwrap_or(provider_bound),
            Endpoint::Embeddings => 0,
        }
    }

    /// The reservation estimate for a provider.
    pub fn estimate(&self, tokenizer: Tokenizer, provider_bound: u64) -> u64 {
        let prompt = self.prompt_tokens(tokenizer);
        match self.endpoint {
            Endpoint::Chat => {
                estimate::reservation(prompt, self.choices, self.completion_bound(provider_bound))
            }
            Endpoint::Embeddings => prompt.max(1),
        }
    }

    /// Which field to name when the estimate exceeds a limit of `limit` everywhere.
    pub fn too_large_param(&self, limit: u64, provider_bound: u64) -> &'static str {
        match self.endpoint {
            Endpoint::Embeddings => "input",
            Endpoint::Chat if self.choices * self.completion_bound(provider_bound) > limit => {
                "max_tokens"
            }
            Endpoint::Chat => "messages",
        }
    }

    /// The body to send upstream: the upstream's model name, the completion bound made explicit
    /// (the provider's, when the request set none), and the usage chunk asked for on streams.
    pub fn upstream_body(&self, upstream_model: &str, provider_bound: u64) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if self.endpoint == Endpoint::Chat && self.completion_bound.is_none() {
            body.insert("max_tokens".into(), Value::from(provider_bound));
        }
        if self.stream {
            let options = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = options {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        serde_json::to_vec(&Value::Object(body)).expect("a JSON map serialises")
    }
}

/// The texts of a chat request's messages, validated.
fn chat_texts(body: &Map<String, Value>) -> Result<(Vec<String>, usize), ApiError> {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(invalid("`messages` must not be empty", "messages")),
        Some(_) => return Err(invalid("`messages` must be an array", "messages")),
        None => return Err(invalid("`messages` is required", "messages")),
    };
    let mut texts = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(m) = message else {
            return Err(invalid(
                format!("`messages[{i}]` must be an object"),
                "messages",
            ));
        };
        match m.get("role") {
            Some(Value::String(r)) if !r.is_empty() => texts.push(r.clone()),
            _ => {
                return Err(invalid(
                    format!("`messages[{i}].role` must be a string"),
                    "messages",
                ))
            }
        }
        match m.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => texts.push(s.clone()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(Value::String(t)) = part.get("text") {
                        texts.push(t.clone());
                    } else if !part.is_object() {
                        return Err(invalid(
                            format!("`messages[{i}].content` parts must be objects"),
                            "messages",
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(invalid(
                    format!("`messages[{i}].content` must be a string, an array of parts or null"),
                    "messages",
                ))
            }
        }
        // Names and tool calls are sent upstream too, so they count.
        for key in ["name", "tool_calls", "function_call", "tool_call_id"] {
            if let Some(v) = m.get(key) {
                texts.push(v.to_string());
            }
        }
    }
    for key in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(key) {
            texts.push(v.to_string());
        }
    }
    Ok((texts, messages.len()))
}

/// The texts of an embeddings request's input, validated.
fn embedding_texts(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match body.get("input") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                // Token arrays: one token each; counted as that many characters' worth.
                Value::Array(tokens) if tokens.iter().all(Value::is_u64) => {
                    Ok("x".repeat(tokens.len()))
                }
                Value::Number(_) => Ok("x".to_string()),
                _ => Err(invalid(
                    "`input` items must be strings or token arrays",
                    "input",
                )),
            })
            .collect(),
        Some(_) => Err(invalid(
            "`input` must be a string or a non-empty array",
            "input",
        )),
        None => Err(invalid("`input` is required", "input")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ProxyRequest, ApiError> {
        ProxyRequest::parse(Endpoint::Chat, body.as_bytes())
    }

    fn param(e: ApiError) -> Option<String> {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(param(chat("{}").unwrap_err()), Some("model".into()));
        assert_eq!(
            param(chat(r#"{"model": 3}"#).unwrap_err()),
            Some("model".into())
        );
        assert_eq!(
            param(chat(r#"{"model": "m"}"#).unwrap_err()),
            Some("messages".into())
        );
        assert_eq!(
            param(chat(r#"{"model": "m", "messages": []}"#).unwrap_err()),
            Some("messages".into())
        );
        let with = |extra: &str| {
            chat(&format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], {extra}}}"#
            ))
        };
        assert_eq!(
            param(with(r#""max_tokens": -1"#).unwrap_err()),
            Some("max_tokens".into())
        );
        assert_eq!(param(with(r#""n": 1000"#).unwrap_err()), Some("n".into()));
        assert_eq!(
            param(with(r#""stream": "yes""#).unwrap_err()),
            Some("stream".into())
        );
        assert_eq!(param(chat("[1]").unwrap_err()), None);
        assert_eq!(param(chat("{not json").unwrap_err()), None);
    }

    #[test]
    fn the_upstream_body_names_the_upstream_model_and_makes_bounds_explicit() {
        let r = chat(r#"{"model": "groq/llama", "messages": [{"role": "user", "content": "hi"}], "stream": true, "temperature": 0.2}"#).unwrap();
        assert!(r.stream && !r.client_wants_stream_usage);
        let sent: Value = serde_json::from_slice(&r.upstream_body("llama", 512)).unwrap();
        assert_eq!(sent["model"], "llama");
        assert_eq!(sent["max_tokens"], 512);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["temperature"], 0.2, "other fields pass unchanged");
        assert_eq!(
            r.estimate(Tokenizer::Bytes, 512),
            r.prompt_tokens(Tokenizer::Bytes) + 512
        );
    }

    #[test]
    fn embeddings_estimate_their_input() {
        let r = ProxyRequest::parse(
            Endpoint::Embeddings,
            br#"{"model": "e", "input": ["abcd", "ef"]}"#,
        )
        .unwrap();
        assert_eq!(r.estimate(Tokenizer::Bytes, 512), 6);
        let bad = ProxyRequest::parse(Endpoint::Embeddings, br#"{"model": "e", "input": {}}"#);
        assert_eq!(param(bad.unwrap_err()), Some("input".into()));
    }
}
