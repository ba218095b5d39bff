use super::*;
use serde_json::Value;

fn chat(body: &str) -> Result<ProxyRequest, ApiError> {
    ProxyRequest::parse(Endpoint::Chat, Bytes::copy_from_slice(body.as_bytes()))
}

fn embeddings(body: &str) -> Result<ProxyRequest, ApiError> {
    ProxyRequest::parse(
        Endpoint::Embeddings,
        Bytes::copy_from_slice(body.as_bytes()),
    )
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
    let r = embeddings(r#"{"model": "e", "input": ["abcd", "ef"]}"#).unwrap();
    assert_eq!(r.estimate(Tokenizer::Bytes, 512), 6);
    let bad = embeddings(r#"{"model": "e", "input": {}}"#);
    assert_eq!(param(bad.unwrap_err()), Some("input".into()));
}

#[test]
fn token_arrays_count_one_token_per_id_whatever_the_tokenizer() {
    let ids: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    let one = format!(r#"{{"model": "e", "input": [{}]}}"#, ids.join(","));
    let r = embeddings(&one).unwrap();
    assert_eq!(r.estimate(Tokenizer::Chars(3), 0), 30, "not 30 / 3");
    let many = format!(
        r#"{{"model": "e", "input": [[{0}], [{0}], "abc"]}}"#,
        ids.join(",")
    );
    assert_eq!(embeddings(&many).unwrap().estimate(Tokenizer::Bytes, 0), 63);
    let bad = embeddings(r#"{"model": "e", "input": [[1, "x"]]}"#);
    assert_eq!(param(bad.unwrap_err()), Some("input".into()));
}

#[test]
fn escaped_texts_are_counted_as_the_upstream_reads_them() {
    let r =
        chat(r#"{"model": "m", "messages": [{"role": "user", "content": "a\nb\u00e8"}]}"#).unwrap();
    // "user" (4) + "a\nbè" (4 characters, 5 bytes) + 4 + 3.
    assert_eq!(r.prompt_tokens(Tokenizer::Bytes), 4 + 5 + 4 + 3);
    assert_eq!(r.prompt_tokens(Tokenizer::Chars(1)), 4 + 4 + 4 + 3);
}

#[test]
fn a_body_that_needs_no_edit_is_forwarded_as_the_client_sent_it() {
    let text =
        r#"{"model": "m",  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}"#;
    let r = chat(text).unwrap();
    assert_eq!(
        r.upstream_body("m", 512),
        Bytes::from(text),
        "byte for byte"
    );
    // Another upstream name: only the model changes; other values keep their bytes.
    let sent = r.upstream_body("other", 512);
    let sent: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(sent["model"], "other");
    assert_eq!(sent["max_tokens"], 5);
    assert_eq!(sent["messages"][0]["content"], "hi");
}

#[test]
fn a_streams_own_options_are_kept_and_the_usage_chunk_added() {
    let r = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"x": 1}, "max_tokens": 5}"#)
        .unwrap();
    let sent: Value = serde_json::from_slice(&r.upstream_body("m", 512)).unwrap();
    assert_eq!(
        sent["stream_options"],
        serde_json::json!({"x": 1, "include_usage": true})
    );
    let asked = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5}"#)
        .unwrap();
    assert!(asked.client_wants_stream_usage);
    assert_eq!(asked.upstream_body("m", 512), asked.body, "nothing to add");
}

#[test]
fn a_huge_nested_value_costs_no_tree() {
    // 4 MiB of `[0,0,0,…]` in a field the gateway does not read: scanned, never built, and
    // forwarded as it came.
    let zeros = vec!["0"; 2 * 1024 * 1024 - 64].join(",");
    let text = format!(
        r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 5, "logit_bias_junk": [{zeros}]}}"#
    );
    let r = chat(&text).unwrap();
    assert_eq!(r.fields.len(), 4);
    assert_eq!(r.texts.len(), 2);
    assert_eq!(r.upstream_body("m", 512).len(), text.len());
}
