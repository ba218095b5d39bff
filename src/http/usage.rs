//! What the gateway reads of an upstream's answers, without building a tree of them: the `usage`
//! of an answer, and of a stream event its usage, generated text, end marks and error. Everything
//! else is skipped by the scanner.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The `usage` of a plain answer.
#[derive(Deserialize)]
pub struct AnswerUsage {
    pub usage: Option<UsageFields>,
}

/// OpenAI's usage object.
#[derive(Deserialize)]
pub struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl UsageFields {
    /// (input, output): `total_tokens` minus the prompt when given, else prompt and completion;
    /// `None` when it says nothing.
    pub fn split(self) -> Option<(u64, u64)> {
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

/// The usage of a plain answer's body, if it reports one.
pub fn of_answer(body: &[u8]) -> Option<(u64, u64)> {
    serde_json::from_slice::<AnswerUsage>(body)
        .ok()?
        .usage?
        .split()
}

/// One stream event's data.
#[derive(Deserialize)]
pub struct StreamEvent<'a> {
    pub usage: Option<UsageFields>,
    #[serde(borrow)]
    pub choices: Option<Vec<StreamChoice<'a>>>,
    /// An error the upstream reports in the stream.
    #[serde(borrow)]
    pub error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub struct StreamChoice<'a> {
    #[serde(borrow)]
    pub delta: Option<StreamDelta<'a>>,
    #[serde(borrow)]
    pub finish_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub struct StreamDelta<'a> {
    #[serde(borrow)]
    pub content: Option<Cow<'a, str>>,
}

/// An upstream's error object (`{"message", "type", "code"}`), as providers write it in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The HTTP status the error means (see [`UpstreamError::parse`]).
    pub status: u16,
    pub message: String,
    /// The error object as the upstream wrote it, for the client.
    pub raw: String,
}

impl UpstreamError {
    /// Reads an error object. Its status: a numeric `code` (or `status`) in 400..=599; else what
    /// its `type` / `code` name means in OpenAI's, Anthropic's and Gemini's vocabularies; else 502.
    pub fn parse(raw: &RawValue) -> UpstreamError {
        #[derive(Deserialize, Default)]
        struct Fields<'a> {
            #[serde(borrow)]
            message: Option<Cow<'a, str>>,
            #[serde(borrow, rename = "type")]
            kind: Option<&'a RawValue>,
            #[serde(borrow)]
            code: Option<&'a RawValue>,
            #[serde(borrow)]
            status: Option<&'a RawValue>,
        }
        let fields: Fields<'_> = serde_json::from_str(raw.get()).unwrap_or_default();
        let numeric = [fields.code, fields.status]
            .into_iter()
            .flatten()
            .find_map(|v| v.get().trim_matches('"').parse::<u16>().ok())
            .filter(|s| (400..=599).contains(s));
        let named = [fields.kind, fields.code, fields.status]
            .into_iter()
            .flatten()
            .find_map(|v| status_of_name(v.get().trim_matches('"')));
        let message = fields
            .message
            .map(Cow::into_owned)
            .unwrap_or_else(|| raw.get().chars().take(300).collect());
        UpstreamError {
            status: numeric.or(named).unwrap_or(502),
            message,
            raw: raw.get().to_string(),
        }
    }
}

/// The status an error name means.
fn status_of_name(name: &str) -> Option<u16> {
    Some(match name.to_ascii_lowercase().as_str() {
        "invalid_request_error" | "invalid_request" | "invalid_argument" | "bad_request" => 400,
        "authentication_error" | "invalid_api_key" | "unauthenticated" => 401,
        "permission_error" | "permission_denied" | "forbidden" => 403,
        "not_found_error" | "not_found" | "model_not_found" => 404,
        "request_too_large" => 413,
        "rate_limit_error"
        | "rate_limit_exceeded"
        | "resource_exhausted"
        | "insufficient_quota" => 429,
        "overloaded_error" | "unavailable" | "service_unavailable" => 503,
        "server_error" | "api_error" | "internal" | "internal_error" => 500,
        "timeout" | "deadline_exceeded" => 504,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(json: &str) -> u16 {
        UpstreamError::parse(&serde_json::from_str::<Box<RawValue>>(json).unwrap()).status
    }

    #[test]
    fn an_error_names_its_status_by_number_or_by_name() {
        assert_eq!(
            status(r#"{"message":"no","type":"invalid_request_error","code":400}"#),
            400
        );
        assert_eq!(
            status(r#"{"message":"slow down","type":"rate_limit_exceeded"}"#),
            429
        );
        assert_eq!(
            status(r#"{"type":"overloaded_error","message":"busy"}"#),
            503
        );
        assert_eq!(status(r#"{"code":"429","message":"x"}"#), 429);
        assert_eq!(status(r#"{"status":"RESOURCE_EXHAUSTED","code":7}"#), 429);
        assert_eq!(
            status(r#"{"message":"?"}"#),
            502,
            "unknown: a failure of the upstream"
        );
        assert_eq!(status(r#""just text""#), 502);
    }

    #[test]
    fn usage_is_read_from_total_or_parts() {
        assert_eq!(
            of_answer(br#"{"usage":{"prompt_tokens":5,"total_tokens":12}}"#),
            Some((5, 7))
        );
        assert_eq!(
            of_answer(br#"{"usage":{"prompt_tokens":5,"completion_tokens":2}}"#),
            Some((5, 2))
        );
        assert_eq!(of_answer(br#"{"id":"x"}"#), None);
    }
}
