//! The OpenAI request bodies the gateway reads, without building a tree of them: only the fields
//! the gateway needs are read (`model`, `stream`, `stream_options`, `n`, the completion bounds, and
//! the texts whose size is the prompt), each validated (a bad field is a 400 naming it in
//! `param`); the rest of the client's bytes are forwarded untouched, with only the documented
//! edits (the upstream's model name, the usage chunk asked for on streams, the provider's
//! completion bound made explicit).
//!
//! Memory: a body is at most [`super::proxy::MAX_BODY_BYTES`]; nested values are validated by
//! the JSON scanner without being built (no tree of `[0,0,0,…]`), and texts are kept as offsets
//! into the body, so a request costs about its own size.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

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

/// Where a top-level key is: in the body (unescaped), or decoded (it had escapes).
#[derive(Debug, Clone)]
enum Key {
    Span(Range<usize>),
    Owned(String),
}

/// A text of the prompt: a JSON string literal in the body (quotes included), or a raw JSON
/// value (tool calls, schemas) counted as written.
#[derive(Debug, Clone)]
enum Text {
    String(Range<usize>),
    Raw(Range<usize>),
}

/// A validated request.
#[derive(Debug)]
pub struct ProxyRequest {
    pub endpoint: Endpoint,
    /// The client's bytes.
    body: Bytes,
    /// The top-level fields in order: key and value's place in the body.
    fields: Vec<(Key, Range<usize>)>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk of a stream itself.
    pub client_wants_stream_usage: bool,
    /// Whether the client sent a `stream_options` object (edited, not added, on streams).
    stream_options: Option<Range<usize>>,
    /// `max_completion_tokens` / `max_tokens` of the request.
    pub completion_bound: Option<u64>,
    /// `n` (choices), at least 1.
    pub choices: u64,
    /// The texts whose size is the prompt, how many messages carry them, and token ids given as
    /// such (embeddings), counted one each.
    texts: Vec<Text>,
    messages: usize,
    token_ids: u64,
    /// Prompt sizes already counted, per tokenizer (a request is usually counted once).
    counted: RefCell<Vec<(Tokenizer, u64)>>,
    /// The last upstream body built: (model, completion bound) and its bytes.
    built: RefCell<Option<(String, u64, Bytes)>>,
}

/// Most choices a request may ask for.
const MAX_CHOICES: u64 = 128;

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// Where `part` (a slice of `whole`) starts and ends in it.
fn span(whole: &[u8], part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// The top-level object, in order, without building its values.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// Counts the token ids of a token array without keeping them.
struct TokenIds(u64);

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TokenIds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of token ids")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TokenIds, A::Error> {
                let mut n = 0;
                while seq.next_element::<u64>()?.is_some() {
                    n += 1;
                }
                Ok(TokenIds(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What a JSON value is, by its first byte (values from the scanner are valid JSON).
fn kind(v: &RawValue) -> u8 {
    v.get().as_bytes().first().copied().unwrap_or(b'n')
}

fn positive_integer(v: Option<&RawValue>, field: &str) -> Result<Option<u64>, ApiError> {
    match v {
        None => Ok(None),
        Some(v) if v.get() == "null" => Ok(None),
        Some(v) => match serde_json::from_str::<u64>(v.get()) {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(
                format!("`{field}` must be a positive integer"),
                field,
            )),
        },
    }
}

fn boolean(v: Option<&RawValue>, message: &str, param: &str) -> Result<bool, ApiError> {
    match v.map(RawValue::get) {
        None | Some("null") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(invalid(message, param)),
    }
}

impl ProxyRequest {
    /// Parses and validates a body for `endpoint`.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<ProxyRequest, ApiError> {
        let raw = &body[..];
        let fields: Fields<'_> = serde_json::from_slice(raw).map_err(|e| {
            if e.is_data() {
                ApiError::invalid("the body must be a JSON object", None)
            } else {
                ApiError::invalid(format!("the body is not valid JSON: {e}"), None)
            }
        })?;
        let field = |name: &str| {
            fields
                .0
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| *v)
        };
        let model = match field("model") {
            Some(v) if kind(v) == b'"' => {
                let m: Cow<'_, str> = serde_json::from_str(v.get())
                    .map_err(|_| invalid("`model` must be a non-empty string", "model"))?;
                if m.trim().is_empty() {
                    return Err(invalid("`model` must be a non-empty string", "model"));
                }
                m.into_owned()
            }
            Some(_) => return Err(invalid("`model` must be a non-empty string", "model")),
            None => return Err(invalid("`model` is required", "model")),
        };
        let stream = boolean(field("stream"), "`stream` must be a boolean", "stream")?;
        let (client_wants_stream_usage, stream_options) = match field("stream_options") {
            None => (false, None),
            Some(v) if v.get() == "null" => (false, None),
            Some(v) if kind(v) == b'{' => {
                #[derive(Deserialize)]
                struct Options<'a> {
                    #[serde(borrow)]
                    include_usage: Option<&'a RawValue>,
                }
                let o: Options<'_> = serde_json::from_str(v.get())
                    .map_err(|_| invalid("`stream_options` must be an object", "stream_options"))?;
                let wants = boolean(
                    o.include_usage,
                    "`stream_options.include_usage` must be a boolean",
                    "stream_options",
                )?;
                (wants, Some(span(raw, v.get())))
            }
            Some(_) => {
                return Err(invalid(
                    "`stream_options` must be an object",
                    "stream_options",
                ))
            }
        };
        let completion_bound =
            match positive_integer(field("max_completion_tokens"), "max_completion_tokens")? {
                Some(n) => Some(n),
                None => positive_integer(field("max_tokens"), "max_tokens")?,
            };
        let choices = positive_integer(field("n"), "n")?.unwrap_or(1);
        if choices > MAX_CHOICES {
            return Err(invalid(format!("`n` must be at most {MAX_CHOICES}"), "n"));
        }
        let mut prompt = Prompt::default();
        match endpoint {
            Endpoint::Chat => prompt.chat(raw, field("messages"), &field)?,
            Endpoint::Embeddings => prompt.embeddings(raw, field("input"))?,
        }
        let fields = fields
            .0
            .iter()
            .map(|(k, v)| {
                let key = match k {
                    Cow::Borrowed(k) => Key::Span(span(raw, k)),
                    Cow::Owned(k) => Key::Owned(k.clone()),
                };
                (key, span(raw, v.get()))
            })
            .collect();
        Ok(ProxyRequest {
            endpoint,
            fields,
            model,
            stream: stream && endpoint == Endpoint::Chat,
            client_wants_stream_usage,
            stream_options,
            completion_bound,
            choices,
            texts: prompt.texts,
            messages: prompt.messages,
            token_ids: prompt.token_ids,
            counted: RefCell::new(Vec::new()),
            built: RefCell::new(None),
            body,
        })
    }

    /// The prompt's size by `tokenizer` (plus per-message overheads for chat), counted once per
    /// tokenizer.
    pub fn prompt_tokens(&self, tokenizer: Tokenizer) -> u64 {
        if let Some((_, n)) = self.counted.borrow().iter().find(|(t, _)| *t == tokenizer) {
            return *n;
        }
        let content: u64 = self
            .texts
            .iter()
            .map(|t| estimate::count(tokenizer, &self.text(t)))
            .sum();
        let n = match self.endpoint {
            Endpoint::Chat => estimate::chat_prompt(self.messages, content),
            Endpoint::Embeddings => content.saturating_add(self.token_ids),
        };
        self.counted.borrow_mut().push((tokenizer, n));
        n
    }

    /// One text of the prompt as the upstream reads it (decoded only when it has escapes).
    fn text(&self, text: &Text) -> Cow<'_, str> {
        let slice = |r: &Range<usize>| std::str::from_utf8(&self.body[r.clone()]).unwrap_or("");
        match text {
            Text::Raw(r) => Cow::Borrowed(slice(r)),
            Text::String(r) => {
                let quoted = slice(r);
                if quoted.contains('\\') {
                    Cow::Owned(serde_json::from_str::<String>(quoted).unwrap_or_default())
                } else {
                    Cow::Borrowed(quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(""))
                }
            }
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

    /// The body to send upstream: the client's bytes with the upstream's model name, the
    /// completion bound made explicit (the provider's, when the request set none), and the usage
    /// chunk asked for on streams. The client's own bytes when nothing changes; built once per
    /// model and bound (retries on the same provider reuse it).
    pub fn upstream_body(&self, upstream_model: &str, provider_bound: u64) -> Bytes {
        let add_bound = self.endpoint == Endpoint::Chat && self.completion_bound.is_none();
        let add_usage = self.stream && !self.client_wants_stream_usage;
        if upstream_model == self.model && !add_bound && !add_usage {
            return self.body.clone();
        }
        if let Some((m, b, bytes)) = &*self.built.borrow() {
            if m == upstream_model && *b == provider_bound {
                return bytes.clone();
            }
        }
        let mut out = BytesMut::with_capacity(self.body.len() + upstream_model.len() + 64);
        out.put_u8(b'{');
        let mut first = true;
        let mut comma = |out: &mut BytesMut| {
            if !std::mem::take(&mut first) {
                out.put_u8(b',');
            }
        };
        let mut wrote_model = false;
        let mut wrote_options = false;
        for (key, value) in &self.fields {
            let name: &str = match key {
                Key::Span(r) => std::str::from_utf8(&self.body[r.clone()]).unwrap_or(""),
                Key::Owned(k) => k,
            };
            let replace_model = name == "model";
            let edit_options = add_usage
                && name == "stream_options"
                && Some(value) == self.stream_options.as_ref();
            if (replace_model && wrote_model)
                || (name == "stream_options" && add_usage && wrote_options)
            {
                // A duplicate key: the last one counts, and the edited one stands for it.
                continue;
            }
            comma(&mut out);
            write_json(&mut out, name);
            out.put_u8(b':');
            if replace_model {
                write_json(&mut out, upstream_model);
                wrote_model = true;
            } else if edit_options {
                let mut options: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&self.body[value.clone()]).unwrap_or_default();
                options.insert("include_usage".into(), serde_json::Value::Bool(true));
                write_json(&mut out, &options);
                wrote_options = true;
            } else if name == "stream_options" && add_usage {
                // `null`: replaced.
                out.put_slice(br#"{"include_usage":true}"#);
                wrote_options = true;
            } else {
                out.put_slice(&self.body[value.clone()]);
            }
        }
        if add_bound {
            comma(&mut out);
            out.put_slice(b"\"max_tokens\":");
            out.put_slice(provider_bound.to_string().as_bytes());
        }
        if add_usage && !wrote_options {
            comma(&mut out);
            out.put_slice(br#""stream_options":{"include_usage":true}"#);
        }
        out.put_u8(b'}');
        let bytes = out.freeze();
        *self.built.borrow_mut() =
            Some((upstream_model.to_string(), provider_bound, bytes.clone()));
        bytes
    }
}

fn write_json(out: &mut BytesMut, value: &(impl serde::Serialize + ?Sized)) {
    let _ = serde_json::to_writer(out.writer(), value);
}

/// The prompt's parts while parsing.
#[derive(Default)]
struct Prompt {
    texts: Vec<Text>,
    messages: usize,
    token_ids: u64,
}

impl Prompt {
    /// A chat request's messages (validated) and the other fields sent upstream that count.
    fn chat<'a>(
        &mut self,
        raw: &[u8],
        messages: Option<&'a RawValue>,
        field: &dyn Fn(&str) -> Option<&'a RawValue>,
    ) -> Result<(), ApiError> {
        let messages: Vec<&RawValue> = match messages {
            Some(v) if kind(v) == b'[' => serde_json::from_str(v.get())
                .map_err(|_| invalid("`messages` must be an array", "messages"))?,
            Some(_) => return Err(invalid("`messages` must be an array", "messages")),
            None => return Err(invalid("`messages` is required", "messages")),
        };
        if messages.is_empty() {
            return Err(invalid("`messages` must not be empty", "messages"));
        }
        #[derive(Deserialize)]
        struct Message<'a> {
            #[serde(borrow)]
            role: Option<&'a RawValue>,
            #[serde(borrow)]
            content: Option<&'a RawValue>,
            #[serde(borrow)]
            name: Option<&'a RawValue>,
            #[serde(borrow)]
            tool_calls: Option<&'a RawValue>,
            #[serde(borrow)]
            function_call: Option<&'a RawValue>,
            #[serde(borrow)]
            tool_call_id: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Part<'a> {
            #[serde(borrow)]
            text: Option<&'a RawValue>,
        }
        for (i, message) in messages.iter().enumerate() {
            if kind(message) != b'{' {
                return Err(invalid(
                    format!("`messages[{i}]` must be an object"),
                    "messages",
                ));
            }
            let m: Message<'_> = serde_json::from_str(message.get())
                .map_err(|_| invalid(format!("`messages[{i}]` must be an object"), "messages"))?;
            match m.role {
                Some(r) if kind(r) == b'"' && r.get().len() > 2 => {
                    self.texts.push(Text::String(span(raw, r.get())))
                }
                _ => {
                    return Err(invalid(
                        format!("`messages[{i}].role` must be a string"),
                        "messages",
                    ))
                }
            }
            match m.content {
                None => {}
                Some(c) => match kind(c) {
                    b'n' => {}
                    b'"' => self.texts.push(Text::String(span(raw, c.get()))),
                    b'[' => {
                        let parts: Vec<&RawValue> =
                            serde_json::from_str(c.get()).unwrap_or_default();
                        for part in parts {
                            if kind(part) != b'{' {
                                return Err(invalid(
                                    format!("`messages[{i}].content` parts must be objects"),
                                    "messages",
                                ));
                            }
                            let p: Part<'_> = serde_json::from_str(part.get()).map_err(|_| {
                                invalid(
                                    format!("`messages[{i}].content` parts must be objects"),
                                    "messages",
                                )
                            })?;
                            if let Some(t) = p.text.filter(|t| kind(t) == b'"') {
                                self.texts.push(Text::String(span(raw, t.get())));
                            }
                        }
                    }
                    _ => {
                        return Err(invalid(
                            format!(
                            "`messages[{i}].content` must be a string, an array of parts or null"
                        ),
                            "messages",
                        ))
                    }
                },
            }
            // Names and tool calls are sent upstream too, so they count.
            for v in [m.name, m.tool_calls, m.function_call, m.tool_call_id]
                .into_iter()
                .flatten()
            {
                self.texts.push(Text::Raw(span(raw, v.get())));
            }
        }
        for key in ["tools", "functions", "response_format"] {
            if let Some(v) = field(key) {
                self.texts.push(Text::Raw(span(raw, v.get())));
            }
        }
        self.messages = messages.len();
        Ok(())
    }

    /// An embeddings request's input: a string, an array of strings, a token array, or an array
    /// of token arrays (each token id counts one token, whatever the tokenizer).
    fn embeddings(&mut self, raw: &[u8], input: Option<&RawValue>) -> Result<(), ApiError> {
        let bad = || invalid("`input` must be a string or a non-empty array", "input");
        let input = input.ok_or_else(|| invalid("`input` is required", "input"))?;
        match kind(input) {
            b'"' => {
                self.texts.push(Text::String(span(raw, input.get())));
                Ok(())
            }
            b'[' => {
                let items: Vec<&RawValue> = serde_json::from_str(input.get()).map_err(|_| bad())?;
                if items.is_empty() {
                    return Err(bad());
                }
                for item in items {
                    match kind(item) {
                        b'"' => self.texts.push(Text::String(span(raw, item.get()))),
                        b'0'..=b'9' => self.token_ids += 1,
                        b'[' => {
                            let ids: TokenIds = serde_json::from_str(item.get()).map_err(|_| {
                                invalid("`input` items must be strings or token arrays", "input")
                            })?;
                            self.token_ids += ids.0;
                        }
                        _ => {
                            return Err(invalid(
                                "`input` items must be strings or token arrays",
                                "input",
                            ))
                        }
                    }
                }
                Ok(())
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests;
