"""The official OpenAI Python SDK against a running quotagate, unchanged.

Run by the Rust test `the_official_openai_python_sdk_works_unchanged` (tests/http_proxy.rs), which
starts a mock upstream and the gateway and passes:

  QG_BASE_URL     the gateway's /v1 URL
  QG_API_KEY      a client key
  QG_MODEL        a chat model the gateway routes
  QG_EMBED_MODEL  an embedding model it routes

The pool allows 4 requests per minute, so after the chat, streamed chat and embedding calls, the
loop at the end must meet a 429 that the SDK raises as `openai.RateLimitError`, with the gateway's
retry hint in the body (`retry_after`) and the `Retry-After` header.

Exits non-zero on the first failed check; prints `sdk: all checks passed` at the end.
"""

import math
import os
import sys

import openai


def check(condition, message):
    if not condition:
        print(f"sdk: FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    base_url = os.environ["QG_BASE_URL"]
    model = os.environ["QG_MODEL"]
    embed_model = os.environ["QG_EMBED_MODEL"]
    client = openai.OpenAI(
        base_url=base_url,
        api_key=os.environ["QG_API_KEY"],
        max_retries=0,
        timeout=20.0,
    )
    print(f"sdk: openai {openai.__version__} against {base_url}")

    # A chat completion.
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=16,
    )
    check(completion.object == "chat.completion", f"object: {completion!r}")
    check(bool(completion.choices[0].message.content), f"content: {completion!r}")
    check(completion.usage is not None and completion.usage.total_tokens > 0, f"usage: {completion!r}")
    print(f"sdk: chat ok: {completion.choices[0].message.content!r}, usage {completion.usage.total_tokens}")

    # The raw response carries the gateway's headers.
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "headers please"}],
        max_tokens=8,
    )
    check(raw.headers.get("x-quota-account"), f"x-quota-account header: {dict(raw.headers)}")
    check(raw.headers.get("x-request-id"), f"x-request-id header: {dict(raw.headers)}")
    check(raw.parse().choices, "the raw response parses")

    # A streamed one, with usage asked for.
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    check(pieces, "streamed content arrived")
    check(usage is not None and usage.total_tokens > 0, f"streamed usage: {usage!r}")
    print(f"sdk: stream ok: {''.join(pieces)!r}, usage {usage.total_tokens}")

    # Models.
    models = [m.id for m in client.models.list()]
    check(model in models and embed_model in models, f"models.list: {models}")
    print(f"sdk: models ok: {models}")

    # An embedding (the SDK asks for base64 by default and decodes it).
    embedding = client.embeddings.create(model=embed_model, input="embed me")
    vector = embedding.data[0].embedding
    check(len(vector) > 0 and all(isinstance(x, float) for x in vector), f"embedding: {vector!r}")
    check(embedding.usage.prompt_tokens > 0, f"embedding usage: {embedding.usage!r}")
    print(f"sdk: embedding ok: {len(vector)} dimensions")

    # The pool's 4 requests per minute are used up by now: a 429 with the retry hint.
    for attempt in range(6):
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "one more"}],
                max_tokens=8,
            )
        except openai.RateLimitError as e:
            check(e.status_code == 429, f"status {e.status_code}")
            body = e.body if isinstance(e.body, dict) else {}
            error = body.get("error", body)
            check(error.get("code") == "rate_limit_exceeded", f"code: {e.body!r}")
            retry_after = error.get("retry_after")
            check(isinstance(retry_after, (int, float)) and retry_after > 0, f"retry_after: {e.body!r}")
            header = e.response.headers.get("retry-after")
            check(header is not None and int(header) == math.ceil(retry_after),
                  f"Retry-After {header!r} vs retry_after {retry_after}")
            print(f"sdk: RateLimitError ok after {attempt} more requests: retry_after {retry_after}, Retry-After {header}")
            break
    else:
        check(False, "no RateLimitError although the pool allows 4 requests per minute")

    # A bad key is an AuthenticationError.
    bad = openai.OpenAI(base_url=base_url, api_key="qg_wrong", max_retries=0, timeout=20.0)
    try:
        bad.models.list()
        check(False, "a wrong key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"status {e.status_code}")

    print("sdk: all checks passed")


if __name__ == "__main__":
    main()
