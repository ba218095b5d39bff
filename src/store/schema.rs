//! The one diesel schema for both backends (portable column types only: ids are `Text`, times are
//! `Timestamp` in UTC). Keep it in step with `migrations/postgres` and `migrations/sqlite`.

diesel::table! {
    users (id) {
        id -> Text,
        name -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    client_keys (id) {
        id -> Text,
        name -> Text,
        user_id -> Text,
        key_hash -> Text,
        prefix -> Text,
        created_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    providers (id) {
        id -> Text,
        name -> Text,
        base_url -> Text,
        strategy -> Text,
        auth_header -> Text,
        auth_scheme -> Text,
        timeout_ms -> Nullable<BigInt>,
        max_completion_tokens -> BigInt,
        tokenizer -> Text,
        ratelimit_headers -> Nullable<Text>,
        active -> Bool,
        source -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    models (id) {
        id -> Text,
        provider_id -> Text,
        name -> Text,
        price_input -> Double,
        price_output -> Double,
        created_at -> Timestamp,
    }
}

diesel::table! {
    accounts (id) {
        id -> Text,
        provider_id -> Text,
        user_id -> Nullable<Text>,
        name -> Text,
        credentials -> Binary,
        credentials_hint -> Text,
        active -> Bool,
        disabled_reason -> Nullable<Text>,
        quota_limit -> BigInt,
        quota_used -> BigInt,
        last_reset -> Timestamp,
        expires_at -> Nullable<Timestamp>,
        source -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    rate_limits (id) {
        id -> Text,
        provider_id -> Text,
        model_id -> Nullable<Text>,
        account_id -> Nullable<Text>,
        kind -> Text,
        limit_value -> BigInt,
        period_ms -> Nullable<BigInt>,
        reset_cron -> Nullable<Text>,
        reset_timezone -> Nullable<Text>,
        created_at -> Timestamp,
    }
}

diesel::table! {
    request_logs (id) {
        id -> BigInt,
        request_id -> Text,
        ts -> Timestamp,
        provider_id -> Text,
        account_id -> Nullable<Text>,
        model -> Text,
        user_id -> Nullable<Text>,
        method -> Text,
        endpoint -> Text,
        status_code -> Integer,
        latency_ms -> BigInt,
        input_tokens -> BigInt,
        output_tokens -> BigInt,
        success -> Bool,
        error_type -> Nullable<Text>,
        error_message -> Nullable<Text>,
        estimated_cost -> Double,
    }
}

diesel::table! {
    provider_stats (provider_id, day) {
        provider_id -> Text,
        day -> Date,
        total_requests -> BigInt,
        successful_requests -> BigInt,
        error_count -> BigInt,
        timeout_count -> BigInt,
        quota_exhausted -> BigInt,
        rate_limited -> BigInt,
        input_tokens -> BigInt,
        output_tokens -> BigInt,
        total_latency_ms -> BigInt,
        total_cost -> Double,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// Daily sums per (day, provider, user, model); `user_id` is '' for requests without a user.
    usage_daily (day, provider_id, user_id, model) {
        day -> Date,
        provider_id -> Text,
        user_id -> Text,
        model -> Text,
        requests -> BigInt,
        successes -> BigInt,
        errors -> BigInt,
        timeouts -> BigInt,
        quota_exhausted -> BigInt,
        rate_limited -> BigInt,
        input_tokens -> BigInt,
        output_tokens -> BigInt,
        latency_ms -> BigInt,
        cost -> Double,
    }
}

diesel::table! {
    /// The users each provider served on each day (for unique users across days).
    usage_daily_users (provider_id, day, user_id) {
        provider_id -> Text,
        day -> Date,
        user_id -> Text,
    }
}

diesel::table! {
    account_audit (id) {
        id -> BigInt,
        account_id -> Text,
        ts -> Timestamp,
        actor -> Text,
        action -> Text,
        reason -> Text,
        details -> Nullable<Text>,
    }
}

diesel::table! {
    account_state (account_id) {
        account_id -> Text,
        version -> BigInt,
        state -> Text,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    settings (key) {
        key -> Text,
        value -> Text,
        updated_at -> Timestamp,
    }
}

diesel::joinable!(client_keys -> users (user_id));
diesel::joinable!(models -> providers (provider_id));
diesel::joinable!(accounts -> providers (provider_id));
diesel::joinable!(rate_limits -> providers (provider_id));
diesel::joinable!(account_state -> accounts (account_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    client_keys,
    providers,
    models,
    accounts,
    rate_limits,
    request_logs,
    provider_stats,
    usage_daily,
    usage_daily_users,
    account_audit,
    account_state,
    settings,
);
