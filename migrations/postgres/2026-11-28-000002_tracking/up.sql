-- Request tracking (Postgres): daily rollups kept up to date by every tracker batch, so that
-- statistics over whole days never rescan the request log, and the indexes the stats queries and
-- the retention job need. Rollups outlive the log's retention: they are the long-term history.

-- Sums per (day, provider, user, model). `user_id` is '' for requests without a user (a primary
-- key column cannot be NULL). The outcome counters follow the tracker's classification: a failed
-- request is a timeout, quota_exhausted or rate_limited by its error_type, else an error.
CREATE TABLE usage_daily (
    day              DATE NOT NULL,
    provider_id      TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    model            TEXT NOT NULL,
    requests         BIGINT NOT NULL,
    successes        BIGINT NOT NULL,
    errors           BIGINT NOT NULL,
    timeouts         BIGINT NOT NULL,
    quota_exhausted  BIGINT NOT NULL,
    rate_limited     BIGINT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    latency_ms       BIGINT NOT NULL,
    cost             DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, provider_id, user_id, model)
);
-- Usage of one user over a range of days.
CREATE INDEX usage_daily_user_day_idx ON usage_daily (user_id, day);

-- Which users a provider served on a day: unique users over several days are the distinct
-- user_ids of these rows, not a sum of daily counts.
CREATE TABLE usage_daily_users (
    provider_id  TEXT NOT NULL,
    day          DATE NOT NULL,
    user_id      TEXT NOT NULL,
    PRIMARY KEY (provider_id, day, user_id)
);

-- Error stats read only the failed requests of a provider: a partial index keeps that read small
-- and costs nothing for successful requests.
CREATE INDEX request_logs_failed_idx ON request_logs (provider_id, ts) WHERE NOT success;

-- Retention deletes old audit rows written by the runtime (cooldowns, resets, …) by time.
CREATE INDEX account_audit_actor_ts_idx ON account_audit (actor, ts);
