-- quotagate schema (Postgres). Ids are uuids stored as TEXT and timestamps are UTC written by the
-- application, so that one diesel schema serves Postgres and SQLite alike.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMP NOT NULL
);

-- Client keys are stored as SHA-256 hashes of high-entropy random tokens; `prefix` is a short
-- non-secret start of the key so that people can tell keys apart.
CREATE TABLE client_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP
);

CREATE TABLE providers (
    id                     TEXT PRIMARY KEY,
    name                   TEXT NOT NULL UNIQUE,
    base_url               TEXT NOT NULL,
    strategy               TEXT NOT NULL,
    auth_header            TEXT NOT NULL,
    auth_scheme            TEXT NOT NULL,
    timeout_ms             BIGINT,
    max_completion_tokens  BIGINT NOT NULL,
    tokenizer              TEXT NOT NULL,
    -- JSON object {"requests": "rpm", "tokens": "tpm"} or NULL.
    ratelimit_headers      TEXT,
    active                 BOOLEAN NOT NULL,
    -- 'config' (declared in config.yaml) or 'api' (created through the API or the CLI).
    source                 TEXT NOT NULL,
    created_at             TIMESTAMP NOT NULL,
    updated_at             TIMESTAMP NOT NULL
);

CREATE TABLE models (
    id            TEXT PRIMARY KEY,
    provider_id   TEXT NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    -- Prices per million tokens.
    price_input   DOUBLE PRECISION NOT NULL,
    price_output  DOUBLE PRECISION NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    UNIQUE (provider_id, name)
);

CREATE TABLE accounts (
    id                TEXT PRIMARY KEY,
    provider_id       TEXT NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    user_id           TEXT REFERENCES users (id) ON DELETE SET NULL,
    name              TEXT NOT NULL,
    -- Credentials JSON sealed with XChaCha20-Poly1305 under the master key (nonce || ciphertext).
    credentials       BYTEA NOT NULL,
    -- A masked tail of the key (`…a1b2`), the only part ever shown.
    credentials_hint  TEXT NOT NULL,
    active            BOOLEAN NOT NULL,
    disabled_reason   TEXT,
    quota_limit       BIGINT NOT NULL,
    quota_used        BIGINT NOT NULL,
    last_reset        TIMESTAMP NOT NULL,
    expires_at        TIMESTAMP,
    source            TEXT NOT NULL,
    created_at        TIMESTAMP NOT NULL,
    updated_at        TIMESTAMP NOT NULL,
    UNIQUE (provider_id, name)
);
CREATE INDEX accounts_provider_idx ON accounts (provider_id);

-- One row per limit. Scope: provider-wide (model_id and account_id NULL), per model (model_id set),
-- or an account's override (account_id set, optionally with model_id).
CREATE TABLE rate_limits (
    id              TEXT PRIMARY KEY,
    provider_id     TEXT NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    model_id        TEXT REFERENCES models (id) ON DELETE CASCADE,
    account_id      TEXT REFERENCES accounts (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    limit_value     BIGINT NOT NULL,
    -- Window length; NULL for `concurrent`.
    period_ms       BIGINT,
    -- Fixed windows only: cron schedule and IANA timezone of the reset.
    reset_cron      TEXT,
    reset_timezone  TEXT,
    created_at      TIMESTAMP NOT NULL
);
CREATE INDEX rate_limits_provider_idx ON rate_limits (provider_id);

CREATE TABLE request_logs (
    id              BIGSERIAL PRIMARY KEY,
    request_id      TEXT NOT NULL,
    ts              TIMESTAMP NOT NULL,
    provider_id     TEXT NOT NULL,
    account_id      TEXT,
    model           TEXT NOT NULL,
    user_id         TEXT,
    method          TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    status_code     INTEGER NOT NULL,
    latency_ms      BIGINT NOT NULL,
    input_tokens    BIGINT NOT NULL,
    output_tokens   BIGINT NOT NULL,
    success         BOOLEAN NOT NULL,
    -- Why a request failed, for error stats: timeout, rate_limited, quota_exceeded, upstream_error, …
    error_type      TEXT,
    error_message   TEXT,
    estimated_cost  DOUBLE PRECISION NOT NULL
);
CREATE INDEX request_logs_ts_idx ON request_logs (ts);
CREATE INDEX request_logs_user_ts_idx ON request_logs (user_id, ts);
CREATE INDEX request_logs_provider_ts_idx ON request_logs (provider_id, ts);

-- Daily aggregates per provider (the seed's ProviderStats), kept as sums so that they can be
-- updated incrementally; rates and averages are derived when read.
CREATE TABLE provider_stats (
    provider_id          TEXT NOT NULL,
    day                  DATE NOT NULL,
    total_requests       BIGINT NOT NULL,
    successful_requests  BIGINT NOT NULL,
    error_count          BIGINT NOT NULL,
    timeout_count        BIGINT NOT NULL,
    quota_exhausted      BIGINT NOT NULL,
    rate_limited         BIGINT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    total_latency_ms     BIGINT NOT NULL,
    total_cost           DOUBLE PRECISION NOT NULL,
    updated_at           TIMESTAMP NOT NULL,
    PRIMARY KEY (provider_id, day)
);

-- Who changed an account's state, what and why.
CREATE TABLE account_audit (
    id          BIGSERIAL PRIMARY KEY,
    account_id  TEXT NOT NULL,
    ts          TIMESTAMP NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    details     TEXT
);
CREATE INDEX account_audit_account_ts_idx ON account_audit (account_id, ts);

-- The runtime state of an account (windows, cooldown, in-flight estimates) for restore after a
-- restart. `version` increases with every change: the higher version wins, not the later clock.
CREATE TABLE account_state (
    account_id  TEXT PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);

-- Small named values: the admin token's hash, the clean-shutdown mark, the heartbeat.
CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);
